//! Enrolment on a PKCS#11 token: a key pair generated inside the token, a signature by that key
//! before any certificate exists (the certificate request), and the issued certificate stored
//! beside its key.
//!
//! Jobs are plain data with owned fields (they cross to the worker thread, and later to a host
//! process). Like a signing job, each brings the user's one [`crate::Credential`]; the worker
//! logs in with it at most once and answers [`crate::Error::LoginRequired`] or
//! [`crate::Error::PinIncorrect`] for the caller to ask again.
//!
//! What the token holds afterwards:
//! - the private key: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, CKA_SIGN true, CKA_EXTRACTABLE
//!   false, CKA_ALWAYS_AUTHENTICATE when asked; the public key: CKA_TOKEN, CKA_VERIFY true,
//!   CKA_PRIVATE false;
//! - both with the label asked for and the same CKA_ID: the SHA-1 of the subjectPublicKey bits
//!   (RFC 5280's key identifier method 1, what CAs put in the certificate's subject key
//!   identifier and what OpenSC's tools derive). The id is set with C_SetAttributeValue after
//!   C_GenerateKeyPair (it depends on the key); a token that refuses that (CKA_MODIFIABLE
//!   false on new keys) fails the job and the new objects are destroyed;
//! - after an import, a CKO_CERTIFICATE (CKC_X_509, public) with the key's CKA_ID and label and
//!   the certificate's subject, issuer and serial.
//!
//! Renewal: a second, different certificate for a key that has one is stored beside it, never
//! over it: both are listed, the first under the key's id and the new one under its exact id
//! ([`crate::CertificateId`]), until the user removes the old one
//! ([`crate::Module::delete_certificate`], which keeps a key's last certificate). With
//! [`ImportMode::Replace`] (after asking the user) the old ones are deleted once the new one is
//! stored. Renewing with a new key makes a new key, and both certificates stay too.

use const_oid::db::{rfc5912, rfc8410};
use const_oid::ObjectIdentifier;
use der::asn1::{BitString, OctetString, UintRef};
use der::{Any, Decode as _, Encode as _};
use serde::{Deserialize, Serialize};
use sha1::{Digest as _, Sha1};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::algorithm::{SignAlgorithm, SignInput};
use crate::certificate::{CertificateId, CertificateInfo};
use crate::error::Error;
use crate::pin::Credential;
use crate::token::TokenId;

/// A key type the shim generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeySpec {
    /// ECDSA on P-256 (CKM_EC_KEY_PAIR_GEN).
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA with this modulus size (CKM_RSA_PKCS_KEY_PAIR_GEN, public exponent 65537).
    Rsa {
        /// 2048 or 3072 (others are refused: see [`KeySpec::rsa`]).
        bits: u32,
    },
    /// Ed25519 (CKM_EC_EDWARDS_KEY_PAIR_GEN), where the token offers it.
    Ed25519,
}

impl KeySpec {
    /// RSA of a size KeyPort generates (2048 or 3072 bits).
    pub fn rsa(bits: u32) -> Result<KeySpec, Error> {
        match bits {
            2048 | 3072 => Ok(KeySpec::Rsa { bits }),
            _ => Err(Error::InvalidInput(format!(
                "RSA keys are generated with 2048 or 3072 bits, not {bits}"
            ))),
        }
    }

    /// "EC-P256", "EC-P384", "RSA-2048", "RSA-3072", "Ed25519" (the protocol's names).
    pub fn wire_name(self) -> String {
        match self {
            KeySpec::EcP256 => "EC-P256".to_owned(),
            KeySpec::EcP384 => "EC-P384".to_owned(),
            KeySpec::Rsa { bits } => format!("RSA-{bits}"),
            KeySpec::Ed25519 => "Ed25519".to_owned(),
        }
    }

    /// The named curve of an EC key.
    pub(crate) fn curve(self) -> Option<ObjectIdentifier> {
        match self {
            KeySpec::EcP256 => Some(rfc5912::SECP_256_R_1),
            KeySpec::EcP384 => Some(rfc5912::SECP_384_R_1),
            _ => None,
        }
    }
}

/// `keys.generate` as the worker receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The token to generate on.
    pub token: TokenId,
    /// The key type.
    pub spec: KeySpec,
    /// CKA_LABEL of both halves (UTF-8).
    pub label: String,
    /// Ask for CKA_ALWAYS_AUTHENTICATE on the private key (a PIN for every signature).
    pub always_authenticate: bool,
    /// C_Logout after the job (no PIN cache). A caller that signs the certificate request next
    /// keeps the login and logs out after that signature.
    pub logout_after: bool,
}

/// A key pair generated on a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedKey {
    /// The key: its token and CKA_ID. It is also the id the certificate imported for it gets.
    pub id: CertificateId,
    /// The public key, DER `SubjectPublicKeyInfo`.
    pub public_key_der: Vec<u8>,
    /// CKA_ID (SHA-1 of the subjectPublicKey bits).
    pub cka_id: Vec<u8>,
    /// The private key has CKA_ALWAYS_AUTHENTICATE (read back from the token).
    pub always_authenticate: bool,
}

/// One signature by a key named by its CKA_ID, which needs no certificate (the certificate
/// request of a key just generated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySignRequest {
    /// The key: its token and CKA_ID (as [`GeneratedKey::id`]).
    pub key: CertificateId,
    /// How to sign.
    pub algorithm: SignAlgorithm,
    /// What to sign.
    pub input: SignInput,
    /// C_Logout after the job.
    pub logout_after: bool,
}

/// Undoes a generation whose certificate request could not be made (the user cancelled the
/// request's own PIN dialog, say): destroys the key pair, in the login the generation made.
/// A key that has a certificate is never destroyed ([`Error::CertificateExists`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteKeyRequest {
    /// The key, as [`GeneratedKey::id`].
    pub key: CertificateId,
    /// C_Logout after the job.
    pub logout_after: bool,
}

/// What an import does when the key already has a different certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImportMode {
    /// Keep it: the new one is stored beside it and both are listed; the default.
    #[default]
    KeepExisting,
    /// Delete the old certificate object and store the new one (the key stays).
    Replace,
}

/// Deletes one certificate of a key that has another one (the old one, after a renewal for
/// the same key). The key's last certificate is never deleted ([`Error::OnlyCertificate`]), nor
/// the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteCertificateRequest {
    /// The certificate, by its listed or its exact id.
    pub certificate: CertificateId,
    /// C_Logout after the job.
    pub logout_after: bool,
}

/// A certificate deleted by [`crate::Module::delete_certificate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The id it was listed under.
    pub certificate: CertificateId,
    /// The key's certificate that stays, as listed now.
    pub kept: CertificateId,
}

/// `certificates.import` as the worker receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// The token holding the key.
    pub token: TokenId,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// See [`ImportMode`].
    pub mode: ImportMode,
    /// C_Logout after the job.
    pub logout_after: bool,
}

/// A certificate stored on a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// As `certificates` lists it now.
    pub certificate: CertificateInfo,
    /// False when the token held this very certificate already (nothing was written).
    pub stored: bool,
    /// An older certificate of the key was deleted ([`ImportMode::Replace`]).
    pub replaced: bool,
}

/// A job for the worker: the request and the user's answer (plain data).
#[derive(Debug)]
pub(crate) struct EnrolJob<R> {
    pub(crate) req: R,
    pub(crate) credential: Credential,
}

/// CKA_ID of a key: SHA-1 of the subjectPublicKey bits of its `SubjectPublicKeyInfo`.
pub fn key_id(public_key_der: &[u8]) -> Result<Vec<u8>, Error> {
    let spki = SubjectPublicKeyInfoOwned::from_der(public_key_der).map_err(Error::Encoding)?;
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| Error::InvalidInput("the public key has unused bits".to_owned()))?;
    Ok(Sha1::digest(bits).to_vec())
}

/// The DER `SubjectPublicKeyInfo` of an RSA key from CKA_MODULUS and CKA_PUBLIC_EXPONENT.
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, Error> {
    let key = pkcs1::RsaPublicKey {
        modulus: UintRef::new(modulus).map_err(Error::Encoding)?,
        public_exponent: UintRef::new(exponent).map_err(Error::Encoding)?,
    };
    let bits = key.to_der().map_err(Error::Encoding)?;
    let null = Any::encode_from(&der::asn1::Null).map_err(Error::Encoding)?;
    spki_der(rfc5912::RSA_ENCRYPTION, Some(null), &bits)
}

/// The DER `SubjectPublicKeyInfo` of an EC or Ed25519 key from its CKA_EC_POINT (a DER OCTET
/// STRING by the specification; some tokens give the raw point, which is accepted too).
pub(crate) fn ec_spki(spec: KeySpec, ec_point: &[u8]) -> Result<Vec<u8>, Error> {
    let point = match OctetString::from_der(ec_point) {
        Ok(os) => os.as_bytes().to_vec(),
        Err(_) => ec_point.to_vec(),
    };
    let bad = |what: &str| {
        Error::InvalidInput(format!(
            "the token returned a {}-byte {what} public key",
            point.len()
        ))
    };
    match spec {
        KeySpec::EcP256 | KeySpec::EcP384 => {
            let field = if spec == KeySpec::EcP256 { 32 } else { 48 };
            if point.len() != 1 + 2 * field || point.first() != Some(&4) {
                return Err(bad("EC"));
            }
            let curve = spec
                .curve()
                .ok_or_else(|| Error::InvalidInput("not an EC key".to_owned()))?;
            let params = Any::encode_from(&curve).map_err(Error::Encoding)?;
            spki_der(rfc5912::ID_EC_PUBLIC_KEY, Some(params), &point)
        }
        KeySpec::Ed25519 => {
            if point.len() != 32 {
                return Err(bad("Ed25519"));
            }
            spki_der(rfc8410::ID_ED_25519, None, &point)
        }
        KeySpec::Rsa { .. } => Err(Error::InvalidInput("an RSA key has no EC point".to_owned())),
    }
}

fn spki_der(oid: ObjectIdentifier, parameters: Option<Any>, bits: &[u8]) -> Result<Vec<u8>, Error> {
    SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned { oid, parameters },
        subject_public_key: BitString::from_bytes(bits).map_err(Error::Encoding)?,
    }
    .to_der()
    .map_err(Error::Encoding)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    #[test]
    fn rsa_sizes_other_than_2048_and_3072_are_refused() {
        assert!(KeySpec::rsa(2048).is_ok());
        assert!(KeySpec::rsa(3072).is_ok());
        assert!(matches!(KeySpec::rsa(1024), Err(Error::InvalidInput(_))));
        assert_eq!(KeySpec::Rsa { bits: 3072 }.wire_name(), "RSA-3072");
    }

    #[test]
    fn ec_points_are_accepted_wrapped_or_raw_and_checked_for_length() {
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        let wrapped = OctetString::new(point.clone()).unwrap().to_der().unwrap();
        let a = ec_spki(KeySpec::EcP256, &wrapped).unwrap();
        let b = ec_spki(KeySpec::EcP256, &point).unwrap();
        assert_eq!(a, b);
        assert!(ec_spki(KeySpec::EcP384, &point).is_err());
        assert!(ec_spki(KeySpec::Ed25519, &point).is_err());
        // The id is the SHA-1 of the point itself, not of the DER around it.
        assert_eq!(key_id(&a).unwrap(), Sha1::digest(&point).to_vec());
    }

    #[test]
    fn an_rsa_public_key_round_trips_through_its_spki() {
        let modulus = [0xc5u8; 256];
        let der = rsa_spki(&modulus, &[1, 0, 1]).unwrap();
        let spki = SubjectPublicKeyInfoOwned::from_der(&der).unwrap();
        assert_eq!(spki.algorithm.oid, rfc5912::RSA_ENCRYPTION);
        let key = pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(
            spki.subject_public_key.as_bytes().unwrap(),
        )
        .unwrap();
        assert_eq!(key.modulus.as_bytes(), &modulus[..]);
        assert_eq!(key.public_exponent.as_bytes(), &[1, 0, 1]);
    }
}
