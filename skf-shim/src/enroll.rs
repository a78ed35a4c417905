//! Enrollment on an SKF key: an SM2 signing key pair generated inside the key
//! ([`crate::Library::generate_sm2`]), and the certificate a CA issued for it written beside it
//! ([`crate::Library::import_certificate`]). The certificate request between the two is the
//! agent's (`agent::enroll`): the shim hands out the new key's SubjectPublicKeyInfo and signs
//! the request's bytes like any message.
//!
//! Renewal: a container has one signing-certificate slot (GM/T 0016), so a second certificate
//! for the same key can only replace the first. It never does so silently: the import is
//! refused with [`crate::Error::CertificateSlotTaken`] unless the caller passes
//! [`ImportMode::Replace`] (after asking the user). Renewing with a new key — what Chinese CAs'
//! portals do — makes a new container, and both certificates stay listed.

use const_oid::db::rfc5912;
use der::asn1::BitString;
use der::{Any, Encode as _};
use serde::{Deserialize, Serialize};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::certificate::{CertificateId, SM2_CURVE_OID};
use crate::error::Error;

/// Where [`crate::Library::generate_sm2`] puts the new key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NewContainer {
    /// A new container named by KeyPort: `KeyPort-YYYYMMDD-HHMMSS-xxxx` (UTC, ASCII, 28 bytes,
    /// within every vendor's length limit we know of).
    Generated,
    /// A container with this name (the library's bytes): created, or used when it exists and
    /// is empty. One that holds a key is refused ([`crate::Error::ContainerExists`]).
    Named(Vec<u8>),
}

/// A key pair generated on the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedKey {
    /// The container; its signing certificate's id once one is imported.
    pub id: CertificateId,
    /// The public key, DER `SubjectPublicKeyInfo`: id-ecPublicKey with the SM2 curve
    /// (1.2.156.10197.1.301) and the uncompressed point.
    pub public_key_der: Vec<u8>,
    /// True when the container was created for this key (false: an existing empty one).
    pub created_container: bool,
}

/// What [`crate::Library::import_certificate`] does when the container already has a signing
/// certificate (a different one: importing the same certificate again changes nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImportMode {
    /// Refuse ([`crate::Error::CertificateSlotTaken`]); the default.
    KeepExisting,
    /// Replace it: the user has agreed to lose the old certificate (the key stays).
    Replace,
}

/// The DER SubjectPublicKeyInfo of an SM2 public key `04 ‖ X ‖ Y`.
pub fn sm2_spki(point: &[u8]) -> Result<Vec<u8>, Error> {
    let encoding = |e: der::Error| Error::Encoding(e.to_string());
    let spki = SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: rfc5912::ID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&SM2_CURVE_OID).map_err(encoding)?),
        },
        subject_public_key: BitString::from_bytes(point).map_err(encoding)?,
    };
    spki.to_der().map_err(encoding)
}

/// A new container name: `KeyPort-YYYYMMDD-HHMMSS-xxxx`, `salt` varying the last part.
pub(crate) fn container_name(salt: u32) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc();
    let tail = (now.nanosecond() ^ salt.wrapping_mul(0x9E37_79B9)) & 0xFFFF;
    format!(
        "KeyPort-{:04}{:02}{:02}-{:02}{:02}{:02}-{tail:04x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode as _;

    #[test]
    fn the_spki_names_the_sm2_curve_and_holds_the_point() {
        let mut point = [0x11u8; 65];
        point[0] = 0x04;
        let der = sm2_spki(&point).expect("spki");
        let spki = SubjectPublicKeyInfoOwned::from_der(&der).expect("parse");
        assert_eq!(spki.algorithm.oid, rfc5912::ID_EC_PUBLIC_KEY);
        let curve: const_oid::ObjectIdentifier = spki
            .algorithm
            .parameters
            .expect("curve")
            .decode_as()
            .expect("oid");
        assert_eq!(curve, SM2_CURVE_OID);
        assert_eq!(spki.subject_public_key.as_bytes(), Some(&point[..]));
    }

    #[test]
    fn new_container_names_are_short_ascii() {
        let a = container_name(1);
        assert!(a.starts_with(b"KeyPort-") && a.len() == 28 && a.is_ascii());
    }
}
