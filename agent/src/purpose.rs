//! What a certificate, and a user's consent, are for.
//!
//! **One key, one purpose.** A Web eID login token is a signature over
//! `H(H(origin) ‖ H(nonce))`; a document signature is a signature over whatever digest a page
//! sends. If one key did both, any site could ask for a "document" signature over
//! `H(H("https://bank.example") ‖ H(nonce))` and log in to the bank as the user. So a certificate
//! either signs documents or logs in:
//! - **login**: it has the clientAuth extended key usage (what relying parties such as Web
//!   eID's validators accept for a login, so such a key never signs a digest a page chose), or
//!   its keyUsage allows digitalSignature but not nonRepudiation;
//! - **documents**: every other certificate — keyUsage with nonRepudiation (contentCommitment),
//!   or no keyUsage at all.
//!
//! `signing_key_usage = "any"` turns the second kind of login certificate (digitalSignature,
//! no clientAuth) into a document-signing one, which then no longer logs in; a clientAuth
//! certificate stays a login certificate. The administrator may let named certificates do both
//! (`dual_use_certificates`, by the SHA-256 of the certificate), accepting the risk above.
//!
//! **Session consent** (`consent = "session"`) covers one kind of operation with one
//! certificate on one connection: the "Log in" the user agreed to never covers a document
//! signature (nor the reverse), and a signature with one certificate never covers another
//! certificate. Documents are one kind: `sign` and `sign.batch` with the same certificate.

use crate::backend::{CertificateInfo, KeyUsage};
use sha2::Digest as _;

use crate::config::{Config, SigningKeyUsage};

/// True when the certificate may make document signatures under this configuration.
pub fn may_sign_documents(info: &CertificateInfo, config: &Config) -> bool {
    dual_use(info, config) || for_documents(info, config.signing_key_usage)
}

/// True when the certificate may sign Web eID login tokens under this configuration.
pub fn may_log_in(info: &CertificateInfo, config: &Config) -> bool {
    dual_use(info, config)
        || (!for_documents(info, config.signing_key_usage)
            && (info.key_usage.is_empty() || info.key_usage.contains(&KeyUsage::DigitalSignature)))
}

/// The certificate's purpose is document signatures (else it is login).
fn for_documents(info: &CertificateInfo, policy: SigningKeyUsage) -> bool {
    if info.extended_key_usage.iter().any(|e| e == "clientAuth") {
        return false;
    }
    info.key_usage.is_empty()
        || info.key_usage.contains(&KeyUsage::NonRepudiation)
        || policy == SigningKeyUsage::Any
}

fn dual_use(info: &CertificateInfo, config: &Config) -> bool {
    if config.dual_use_certificates.is_empty() {
        return false;
    }
    let fingerprint = hex::encode(sha2::Sha256::digest(&info.der));
    config
        .dual_use_certificates
        .iter()
        .any(|f| f.eq_ignore_ascii_case(&fingerprint))
}

/// The kind of operation a session consent was given for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentKind {
    /// `authenticate`.
    Login,
    /// `sign` and `sign.batch`: document signatures.
    Documents,
}

/// A consent given once on a connection: for this kind, with this certificate (SHA-256 of its
/// DER) only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConsent {
    kind: ConsentKind,
    certificate: [u8; 32],
}

impl SessionConsent {
    pub fn new(kind: ConsentKind, info: &CertificateInfo) -> SessionConsent {
        SessionConsent {
            kind,
            certificate: sha2::Sha256::digest(&info.der).into(),
        }
    }
}
