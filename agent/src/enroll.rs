//! Certificate requests (PKCS#10) for keys generated on a token.
//!
//! The key never leaves the token, so the request is built in two steps around the token's
//! signature: [`request`] builds the `CertificationRequestInfo` for the portal's subject and
//! the new key's public key (with the RustCrypto `x509-cert` request builder) and says what the
//! key must sign and how ([`RequestToSign::message`], [`RequestSignature`]); the caller has the
//! token sign it; [`RequestToSign::finish`] puts the signature in and gives the DER request.
//!
//! Signature algorithms: ECDSA with SHA-256 (P-256) or SHA-384 (P-384), RSA PKCS#1 v1.5 with
//! SHA-256, Ed25519, and SM2 with SM3 (GM/T 0010 `1.2.156.10197.1.501`, signed over
//! e = SM3(Z ‖ M) with the default user ID `1234567812345678`, as GM/T 0009 and OpenSSL's
//! `req -verify -vfyopt distid:1234567812345678` expect).

use std::str::FromStr as _;

use const_oid::db::{rfc5912, rfc8410};
use const_oid::ObjectIdentifier;
use der::asn1::{BitString, Null};
use der::{Any, Decode as _, Encode as _};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::builder::Builder as _;
use x509_cert::name::Name;
use x509_cert::request::RequestBuilder;

/// The SM2 curve (GM/T 0006), as the parameter of `id-ecPublicKey`.
pub const SM2_CURVE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");
/// SM2 signature with SM3 (GM/T 0010).
pub const SM2_WITH_SM3: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");

/// A key type enrolment generates: one a PKCS#11 token makes, or SM2 in an SKF key's
/// container (`keys.generate`'s `algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NewKeyType {
    Pkcs11(pkcs11_shim::KeySpec),
    /// An SM2 signing key pair (SKF keys only).
    Sm2,
}

impl NewKeyType {
    /// The protocol's name: "EC-P256", …, "SM2".
    pub fn wire_name(self) -> String {
        match self {
            NewKeyType::Pkcs11(spec) => spec.wire_name(),
            NewKeyType::Sm2 => "SM2".to_owned(),
        }
    }
}

/// How the new key signs its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestSignature {
    /// ECDSA P-256 over SHA-256; the signature DER `SEQUENCE { r, s }`.
    EcdsaSha256,
    /// ECDSA P-384 over SHA-384; the signature DER.
    EcdsaSha384,
    /// RSA PKCS#1 v1.5 with SHA-256 (any modulus size).
    RsaSha256,
    /// Ed25519 over the message itself.
    Ed25519,
    /// SM2 over e = SM3(Z ‖ M), default user ID; the signature DER `SEQUENCE { r, s }`.
    Sm2Sm3,
}

impl RequestSignature {
    /// The signature algorithm a request signed by this public key carries.
    pub fn for_key(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, EnrollError> {
        let unsupported = || EnrollError::UnsupportedKey(spki.algorithm.oid.to_string());
        match spki.algorithm.oid {
            rfc5912::RSA_ENCRYPTION => Ok(RequestSignature::RsaSha256),
            rfc8410::ID_ED_25519 => Ok(RequestSignature::Ed25519),
            rfc5912::ID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                    .ok_or_else(unsupported)?;
                match curve {
                    rfc5912::SECP_256_R_1 => Ok(RequestSignature::EcdsaSha256),
                    rfc5912::SECP_384_R_1 => Ok(RequestSignature::EcdsaSha384),
                    SM2_CURVE => Ok(RequestSignature::Sm2Sm3),
                    _ => Err(unsupported()),
                }
            }
            _ => Err(unsupported()),
        }
    }

    /// How a PKCS#11 token makes this signature (`None`: SM2, which SKF keys make).
    pub fn pkcs11_algorithm(self) -> Option<pkcs11_shim::SignAlgorithm> {
        use pkcs11_shim::{EcdsaEncoding, HashAlg, SignAlgorithm};
        match self {
            RequestSignature::EcdsaSha256 => {
                Some(SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der))
            }
            RequestSignature::EcdsaSha384 => {
                Some(SignAlgorithm::Ecdsa(HashAlg::Sha384, EcdsaEncoding::Der))
            }
            RequestSignature::RsaSha256 => Some(SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256)),
            RequestSignature::Ed25519 => Some(SignAlgorithm::Ed25519),
            RequestSignature::Sm2Sm3 => None,
        }
    }

    fn algorithm_identifier(self) -> Result<AlgorithmIdentifierOwned, EnrollError> {
        let (oid, parameters) = match self {
            RequestSignature::EcdsaSha256 => (rfc5912::ECDSA_WITH_SHA_256, None),
            RequestSignature::EcdsaSha384 => (rfc5912::ECDSA_WITH_SHA_384, None),
            RequestSignature::RsaSha256 => (
                rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
                Some(Any::encode_from(&Null)?),
            ),
            RequestSignature::Ed25519 => (rfc8410::ID_ED_25519, None),
            RequestSignature::Sm2Sm3 => (SM2_WITH_SM3, None),
        };
        Ok(AlgorithmIdentifierOwned { oid, parameters })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The subject is not an RFC 4514 distinguished name.
    #[error("the subject {0:?} is not a distinguished name such as \"CN=Li Lei,O=Example,C=CN\"")]
    BadSubject(String),
    /// The token's public key is not one a request can be made for.
    #[error("no certificate request can be made for a key of type {0}")]
    UnsupportedKey(String),
    #[error("the public key could not be read")]
    PublicKey(#[source] der::Error),
    #[error("the signature is not of the key's kind")]
    BadSignature,
    #[error("the certificate request could not be built")]
    Build(#[source] x509_cert::builder::Error),
    #[error("the certificate request could not be encoded")]
    Encoding(#[from] der::Error),
}

/// A request built and waiting for the token's signature.
pub struct RequestToSign {
    builder: RequestBuilder,
    key: TokenKey,
    info: Vec<u8>,
}

/// Whether the certificate `listed_der` certifies the same public key as `cert` (a renewal for
/// the same key). A listed certificate that does not parse certifies nothing.
pub fn same_key(listed_der: &[u8], cert: &x509_cert::Certificate) -> bool {
    let spki = |c: &x509_cert::Certificate| c.tbs_certificate().subject_public_key_info().to_der();
    match (x509_cert::Certificate::from_der(listed_der), spki(cert)) {
        (Ok(listed), Ok(new)) => spki(&listed).is_ok_and(|old| old == new),
        _ => false,
    }
}

/// Checks that `subject` is a distinguished name a request can carry, before anything is asked
/// of the user or the token.
pub fn check_subject(subject: &str) -> Result<(), EnrollError> {
    match Name::from_str(subject) {
        Ok(name) if !name.is_empty() => Ok(()),
        _ => Err(EnrollError::BadSubject(subject.to_owned())),
    }
}

/// Builds the request for `subject` (RFC 4514, e.g. `CN=Li Lei,O=Example,C=CN`) and the new
/// key's public key (`SubjectPublicKeyInfo`, DER).
pub fn request(subject: &str, public_key_der: &[u8]) -> Result<RequestToSign, EnrollError> {
    let name = Name::from_str(subject).map_err(|_| EnrollError::BadSubject(subject.to_owned()))?;
    if name.is_empty() {
        return Err(EnrollError::BadSubject(subject.to_owned()));
    }
    let spki =
        SubjectPublicKeyInfoOwned::from_der(public_key_der).map_err(EnrollError::PublicKey)?;
    let signature = RequestSignature::for_key(&spki)?;
    let key = TokenKey {
        public_key: SpkiDer(spki.to_der()?),
        signature,
    };
    let mut builder = RequestBuilder::new(name).map_err(EnrollError::Build)?;
    let info = builder.finalize(&key).map_err(EnrollError::Build)?;
    Ok(RequestToSign { builder, key, info })
}

impl std::fmt::Debug for RequestToSign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestToSign")
            .field("signature", &self.key.signature)
            .field("message_len", &self.info.len())
            .finish_non_exhaustive()
    }
}

impl RequestToSign {
    /// The bytes the key signs (the DER `CertificationRequestInfo`); the token hashes them as
    /// [`RequestToSign::signature`] says.
    pub fn message(&self) -> &[u8] {
        &self.info
    }

    pub fn signature(&self) -> RequestSignature {
        self.key.signature
    }

    /// The DER certificate request, with the token's signature over [`RequestToSign::message`]:
    /// ECDSA and SM2 as DER `SEQUENCE { r, s }`, RSA and Ed25519 as the raw signature.
    pub fn finish(self, signature: &[u8]) -> Result<Vec<u8>, EnrollError> {
        match self.key.signature {
            RequestSignature::EcdsaSha256
            | RequestSignature::EcdsaSha384
            | RequestSignature::Sm2Sm3 => {
                use der::Tagged as _;
                der::asn1::Any::from_der(signature)
                    .ok()
                    .filter(|a| a.tag() == der::Tag::Sequence)
                    .ok_or(EnrollError::BadSignature)?;
            }
            RequestSignature::Ed25519 if signature.len() != 64 => {
                return Err(EnrollError::BadSignature)
            }
            RequestSignature::RsaSha256 | RequestSignature::Ed25519 => {}
        }
        let bits = BitString::from_bytes(signature)?;
        let request = self
            .builder
            .assemble(bits, &self.key)
            .map_err(EnrollError::Build)?;
        Ok(request.to_der()?)
    }
}

/// The token's key as the request builder sees it: its public key and its signature
/// algorithm. It signs nothing itself: the token does, between `finalize` and `assemble`.
#[derive(Debug, Clone)]
struct TokenKey {
    public_key: SpkiDer,
    signature: RequestSignature,
}

/// A DER `SubjectPublicKeyInfo`, as the builder wants a verifying key.
#[derive(Debug, Clone)]
struct SpkiDer(Vec<u8>);

impl spki::EncodePublicKey for SpkiDer {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::try_from(self.0.as_slice())?)
    }
}

impl signature::Keypair for TokenKey {
    type VerifyingKey = SpkiDer;

    fn verifying_key(&self) -> SpkiDer {
        self.public_key.clone()
    }
}

impl spki::DynSignatureAlgorithmIdentifier for TokenKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        self.signature
            .algorithm_identifier()
            .map_err(|_| spki::Error::KeyMalformed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Makes a software key with OpenSSL standing in for the token, builds a request, has
    /// OpenSSL sign the message as the token would, and returns the request's DER.
    fn request_signed_by_openssl(
        genpkey: &[&str],
        sign: &[&str],
        subject: &str,
    ) -> (tempfile::TempDir, Vec<u8>, RequestSignature) {
        let dir = tempfile::tempdir().unwrap();
        let mut gen = vec!["genpkey", "-out", "key.pem"];
        gen.extend_from_slice(genpkey);
        openssl(&gen, dir.path());
        let spki = openssl(
            &["pkey", "-in", "key.pem", "-pubout", "-outform", "DER"],
            dir.path(),
        );
        let pending = request(subject, &spki).unwrap();
        let kind = pending.signature();
        std::fs::write(dir.path().join("tbs"), pending.message()).unwrap();
        // `sign` names the message file `tbs`.
        let signature = openssl(sign, dir.path());
        let der = pending.finish(&signature).unwrap();
        std::fs::write(dir.path().join("req.der"), &der).unwrap();
        (dir, der, kind)
    }

    fn verify_with_openssl(dir: &Path, extra: &[&str]) -> String {
        let mut args = vec![
            "req", "-verify", "-inform", "DER", "-in", "req.der", "-noout", "-subject",
        ];
        args.extend_from_slice(extra);
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("verify OK"), "{text}");
        text
    }

    #[test]
    fn p256_and_p384_requests_verify_with_openssl() {
        for (curve, digest, kind) in [
            ("P-256", "-sha256", RequestSignature::EcdsaSha256),
            ("P-384", "-sha384", RequestSignature::EcdsaSha384),
        ] {
            let curve_opt = format!("ec_paramgen_curve:{curve}");
            let (dir, _, got) = request_signed_by_openssl(
                &["-algorithm", "EC", "-pkeyopt", &curve_opt],
                &["dgst", digest, "-sign", "key.pem", "tbs"],
                "CN=Li Lei,O=Example Bank,C=CN",
            );
            assert_eq!(got, kind);
            let text = verify_with_openssl(dir.path(), &[]);
            assert!(text.contains("CN = Li Lei"), "{text}");
        }
    }

    #[test]
    fn rsa_and_ed25519_requests_verify_with_openssl() {
        let (dir, _, kind) = request_signed_by_openssl(
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            &["dgst", "-sha256", "-sign", "key.pem", "tbs"],
            "CN=Notary Office 7,C=DE",
        );
        assert_eq!(kind, RequestSignature::RsaSha256);
        verify_with_openssl(dir.path(), &[]);
        let (dir, _, kind) = request_signed_by_openssl(
            &["-algorithm", "ED25519"],
            &[
                "pkeyutl", "-sign", "-rawin", "-inkey", "key.pem", "-in", "tbs",
            ],
            "CN=Ed Signer",
        );
        assert_eq!(kind, RequestSignature::Ed25519);
        verify_with_openssl(dir.path(), &[]);
    }

    #[test]
    fn an_sm2_request_verifies_with_openssl_and_the_default_user_id() {
        let (dir, der, kind) = request_signed_by_openssl(
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:SM2"],
            &[
                "dgst",
                "-sm3",
                "-sign",
                "key.pem",
                "-sigopt",
                "distid:1234567812345678",
                "tbs",
            ],
            "CN=张伟,O=示例银行,C=CN",
        );
        assert_eq!(kind, RequestSignature::Sm2Sm3);
        verify_with_openssl(dir.path(), &["-vfyopt", "distid:1234567812345678"]);
        let req = x509_cert::request::CertReq::from_der(&der).unwrap();
        assert_eq!(req.algorithm.oid, SM2_WITH_SM3);
    }

    #[test]
    fn bad_subjects_keys_and_signatures_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "key.pem",
            ],
            dir.path(),
        );
        let spki = openssl(
            &["pkey", "-in", "key.pem", "-pubout", "-outform", "DER"],
            dir.path(),
        );
        assert!(matches!(
            request("not a name", &spki),
            Err(EnrollError::BadSubject(_))
        ));
        assert!(matches!(
            request("", &spki),
            Err(EnrollError::BadSubject(_))
        ));
        assert!(matches!(
            request("CN=x", b"\x30\x03\x02\x01\x00"),
            Err(EnrollError::PublicKey(_))
        ));
        openssl(
            &["genpkey", "-algorithm", "X25519", "-out", "x.pem"],
            dir.path(),
        );
        let x25519 = openssl(
            &["pkey", "-in", "x.pem", "-pubout", "-outform", "DER"],
            dir.path(),
        );
        assert!(matches!(
            request("CN=x", &x25519),
            Err(EnrollError::UnsupportedKey(_))
        ));
        let pending = request("CN=x", &spki).unwrap();
        // A P1363 (r ‖ s) signature where DER is due.
        assert!(matches!(
            pending.finish(&[7u8; 64]),
            Err(EnrollError::BadSignature)
        ));
    }
}
