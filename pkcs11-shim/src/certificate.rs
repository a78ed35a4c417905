//! Certificates on tokens: stable ids, the parsed fields KeyPort shows and checks, and the
//! public key material used to pair a certificate with its private key.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use const_oid::db::{rfc5280, rfc5912, rfc8410};
use const_oid::ObjectIdentifier;
use der::asn1::UintRef;
use der::{Decode, Reader, SliceReader};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_cert::ext::pkix::{ExtendedKeyUsage, KeyUsage as KeyUsageExt};
use x509_cert::Certificate;

use crate::error::Error;
use crate::token::{ParseIdError, TokenId};

/// A certificate's stable identity: its token's id and the key's CKA_ID (hex), as
/// `tok-…/<hex>`; when CKA_ID is empty, `tok-…/x<hash>` with a SHA-256 prefix of the
/// certificate instead.
///
/// A key may hold several certificates (a renewal for the same key is stored beside the old
/// one, never over it). Then `tok-…/<hex>` names the one with the earliest notBefore (the one
/// that had the id first, for a renewal), and each other one is listed as its *exact* id
/// `tok-…/<hex>.<16 hex>`, the suffix being the first 8 bytes of the SHA-256 of its DER.
/// Every certificate's exact id names it for as long as it exists, however it is listed
/// ([`CertificateId::names`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CertificateId {
    token: TokenId,
    /// Lowercase hex of CKA_ID, or `x` + hex of a certificate hash.
    key_ref: String,
}

impl CertificateId {
    /// The id for the certificate with `cka_id` (or, if that is empty, `der`) on `token`.
    pub fn new(token: &TokenId, cka_id: &[u8], der: &[u8]) -> CertificateId {
        let key_ref = if cka_id.is_empty() {
            let h = Sha256::digest(der);
            format!("x{}", hex::encode(&h[..16]))
        } else {
            hex::encode(cka_id)
        };
        CertificateId {
            token: token.clone(),
            key_ref,
        }
    }

    /// The id naming exactly this certificate of the key with `cka_id` (not empty):
    /// `tok-…/<hex>.<first 8 bytes of SHA-256(der), hex>`.
    pub fn exact(token: &TokenId, cka_id: &[u8], der: &[u8]) -> CertificateId {
        let h = Sha256::digest(der);
        CertificateId {
            token: token.clone(),
            key_ref: format!("{}.{}", hex::encode(cka_id), hex::encode(&h[..8])),
        }
    }

    /// The key's id without a certificate suffix: the id the key's first certificate has.
    pub fn key(&self) -> CertificateId {
        CertificateId {
            token: self.token.clone(),
            key_ref: self.key_part().to_owned(),
        }
    }

    /// True for an exact id (`<hex>.<suffix>`).
    pub fn is_exact(&self) -> bool {
        self.key_ref.contains('.')
    }

    /// Whether this id names the certificate `der` listed as `listed`: the same id, or this
    /// certificate's exact id.
    pub fn names(&self, listed: &CertificateId, der: &[u8]) -> bool {
        if self == listed {
            return true;
        }
        self.is_exact()
            && self.token == listed.token
            && self.key_part() == listed.key_part()
            && self
                .cka_id()
                .is_some_and(|cka| *self == CertificateId::exact(&self.token, &cka, der))
    }

    fn key_part(&self) -> &str {
        self.key_ref
            .split_once('.')
            .map_or(self.key_ref.as_str(), |(key, _)| key)
    }

    /// The token part.
    pub fn token_id(&self) -> &TokenId {
        &self.token
    }

    /// The CKA_ID the id names, or `None` for a hash-named certificate (empty CKA_ID).
    pub fn cka_id(&self) -> Option<Vec<u8>> {
        if self.key_ref.starts_with('x') {
            None
        } else {
            hex::decode(self.key_part()).ok()
        }
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.token, self.key_ref)
    }
}

impl FromStr for CertificateId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.to_owned());
        let (token, key_ref) = s.split_once('/').ok_or_else(bad)?;
        let token = token.parse::<TokenId>().map_err(|_| bad())?;
        let is_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        let hex_ok = |h: &str| !h.is_empty() && h.len() % 2 == 0 && h.bytes().all(is_hex);
        let ok = match key_ref.split_once('.') {
            // An exact id: a CKA_ID and 8 bytes of the certificate's hash.
            Some((key, suffix)) => hex_ok(key) && suffix.len() == 16 && hex_ok(suffix),
            None => hex_ok(key_ref.strip_prefix('x').unwrap_or(key_ref)),
        };
        if !ok {
            return Err(bad());
        }
        Ok(CertificateId {
            token,
            key_ref: key_ref.to_owned(),
        })
    }
}

/// The key pair's algorithm, from the certificate's SubjectPublicKeyInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// RSA with this modulus size.
    Rsa {
        /// Modulus bits.
        bits: u32,
    },
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// ECDSA on P-521.
    EcP521,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    /// "RSA-2048", "EC-P256", "EC-P384", "EC-P521", "Ed25519".
    pub fn wire_name(self) -> String {
        match self {
            KeyAlgorithm::Rsa { bits } => format!("RSA-{bits}"),
            KeyAlgorithm::EcP256 => "EC-P256".to_owned(),
            KeyAlgorithm::EcP384 => "EC-P384".to_owned(),
            KeyAlgorithm::EcP521 => "EC-P521".to_owned(),
            KeyAlgorithm::Ed25519 => "Ed25519".to_owned(),
        }
    }

    /// "RSA", "EC" or "Ed25519".
    pub fn family(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa { .. } => "RSA",
            KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 | KeyAlgorithm::EcP521 => "EC",
            KeyAlgorithm::Ed25519 => "Ed25519",
        }
    }

    /// For EC keys, the byte length of one coordinate (= half a P1363 signature).
    pub fn ec_field_len(self) -> Option<usize> {
        match self {
            KeyAlgorithm::EcP256 => Some(32),
            KeyAlgorithm::EcP384 => Some(48),
            KeyAlgorithm::EcP521 => Some(66),
            _ => None,
        }
    }
}

/// An RFC 5280 key usage bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyUsage {
    /// digitalSignature
    DigitalSignature,
    /// nonRepudiation (contentCommitment)
    NonRepudiation,
    /// keyEncipherment
    KeyEncipherment,
    /// dataEncipherment
    DataEncipherment,
    /// keyAgreement
    KeyAgreement,
    /// keyCertSign
    KeyCertSign,
    /// cRLSign
    CrlSign,
    /// encipherOnly
    EncipherOnly,
    /// decipherOnly
    DecipherOnly,
}

impl KeyUsage {
    /// The name RFC 5280 gives the bit, e.g. "digitalSignature".
    pub fn rfc5280_name(self) -> &'static str {
        match self {
            KeyUsage::DigitalSignature => "digitalSignature",
            KeyUsage::NonRepudiation => "nonRepudiation",
            KeyUsage::KeyEncipherment => "keyEncipherment",
            KeyUsage::DataEncipherment => "dataEncipherment",
            KeyUsage::KeyAgreement => "keyAgreement",
            KeyUsage::KeyCertSign => "keyCertSign",
            KeyUsage::CrlSign => "cRLSign",
            KeyUsage::EncipherOnly => "encipherOnly",
            KeyUsage::DecipherOnly => "decipherOnly",
        }
    }
}

/// A certificate whose private key is on a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Stable id (see [`CertificateId`]).
    pub id: CertificateId,
    /// The token holding the key.
    pub token_id: TokenId,
    /// The certificate object's CKA_LABEL.
    pub label: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// The key's algorithm.
    pub key_algorithm: KeyAlgorithm,
    /// Key usage bits (empty when the extension is absent).
    pub key_usage: Vec<KeyUsage>,
    /// Extended key usages: "clientAuth", "serverAuth", … or the dotted OID.
    pub extended_key_usage: Vec<String>,
    /// The private key has CKA_ALWAYS_AUTHENTICATE (a PIN for every signature). Only known
    /// when the key object is visible, i.e. public or after login.
    pub always_authenticate: bool,
    /// Who holds it: the subject's CN, else the full subject.
    pub holder: String,
}

/// A public key as the certificate states it, to compare with key objects on the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PublicKeyMaterial {
    /// RSA modulus, without leading zero bytes.
    Rsa(Vec<u8>),
    /// EC point (uncompressed `04‖X‖Y`) or Ed25519's 32 bytes.
    Point(Vec<u8>),
}

impl PublicKeyMaterial {
    /// Does a token key with this CKA_MODULUS match?
    pub(crate) fn matches_modulus(&self, modulus: &[u8]) -> bool {
        matches!(self, PublicKeyMaterial::Rsa(n) if n.as_slice() == strip_zeros(modulus))
    }

    /// Does a token key with this CKA_EC_POINT (raw, or wrapped in a DER OCTET STRING as
    /// the spec says) match?
    pub(crate) fn matches_ec_point(&self, ec_point: &[u8]) -> bool {
        let PublicKeyMaterial::Point(p) = self else {
            return false;
        };
        if p.as_slice() == ec_point {
            return true;
        }
        der::asn1::OctetString::from_der(ec_point)
            .map(|os| os.as_bytes() == p.as_slice())
            .unwrap_or(false)
    }
}

/// Everything the shim reads out of a certificate.
#[derive(Debug)]
pub(crate) struct ParsedCertificate {
    pub(crate) subject: String,
    pub(crate) issuer: String,
    pub(crate) serial_hex: String,
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    pub(crate) key_algorithm: KeyAlgorithm,
    pub(crate) key_usage: Vec<KeyUsage>,
    pub(crate) extended_key_usage: Vec<String>,
    pub(crate) holder: String,
    pub(crate) public_key: PublicKeyMaterial,
}

/// Parses a certificate as read from a token (CKA_VALUE) and returns the subject, holder and
/// key algorithm name the agent would show, or the error. For the fuzzer
/// (`fuzz/fuzz_targets/certificate.rs`).
#[doc(hidden)]
pub fn parse_certificate_for_fuzzing(der: &[u8]) -> Result<(String, String, String), Error> {
    ParsedCertificate::parse(der).map(|p| (p.subject, p.holder, p.key_algorithm.wire_name()))
}

impl ParsedCertificate {
    /// Parses a DER certificate.
    pub(crate) fn parse(der: &[u8]) -> Result<ParsedCertificate, Error> {
        let cert = Certificate::from_der(der).map_err(Error::Certificate)?;
        let tbs = cert.tbs_certificate();
        let spki = tbs.subject_public_key_info();
        let key_bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or(Error::Certificate(der::ErrorKind::Failed.into()))?;
        let (key_algorithm, public_key) = match spki.algorithm.oid {
            rfc5912::RSA_ENCRYPTION => {
                let modulus = rsa_modulus(key_bytes)?;
                let bits = modulus_bits(&modulus);
                (KeyAlgorithm::Rsa { bits }, PublicKeyMaterial::Rsa(modulus))
            }
            rfc5912::ID_EC_PUBLIC_KEY => {
                let curve: ObjectIdentifier = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .ok_or(Error::Certificate(der::ErrorKind::Failed.into()))?
                    .decode_as()
                    .map_err(Error::Certificate)?;
                let alg = match curve {
                    rfc5912::SECP_256_R_1 => KeyAlgorithm::EcP256,
                    rfc5912::SECP_384_R_1 => KeyAlgorithm::EcP384,
                    rfc5912::SECP_521_R_1 => KeyAlgorithm::EcP521,
                    other => return Err(unsupported_key(other)),
                };
                (alg, PublicKeyMaterial::Point(key_bytes.to_vec()))
            }
            rfc8410::ID_ED_25519 => (
                KeyAlgorithm::Ed25519,
                PublicKeyMaterial::Point(key_bytes.to_vec()),
            ),
            other => return Err(unsupported_key(other)),
        };

        let key_usage = match tbs.get_extension::<KeyUsageExt>() {
            Ok(Some((_, ku))) => key_usages(&ku),
            Ok(None) => Vec::new(),
            Err(e) => return Err(Error::Certificate(e)),
        };
        let extended_key_usage = match tbs.get_extension::<ExtendedKeyUsage>() {
            Ok(Some((_, eku))) => eku.0.iter().map(eku_name).collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(Error::Certificate(e)),
        };

        let subject = tbs.subject().to_string();
        let holder = match tbs.subject().common_name() {
            Ok(Some(cn)) => cn.value().into_owned(),
            _ => subject.clone(),
        };
        let validity = tbs.validity();
        Ok(ParsedCertificate {
            issuer: tbs.issuer().to_string(),
            serial_hex: hex::encode(tbs.serial_number().as_bytes()),
            not_before: to_offset(validity.not_before.to_unix_duration())?,
            not_after: to_offset(validity.not_after.to_unix_duration())?,
            key_algorithm,
            key_usage,
            extended_key_usage,
            holder,
            subject,
            public_key,
        })
    }
}

fn unsupported_key(oid: ObjectIdentifier) -> Error {
    Error::MechanismNotSupported {
        algorithm: "signing".to_owned(),
        key: oid.to_string(),
    }
}

fn to_offset(d: std::time::Duration) -> Result<OffsetDateTime, Error> {
    let secs = i64::try_from(d.as_secs())
        .map_err(|_| Error::Certificate(der::ErrorKind::DateTime.into()))?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| Error::Certificate(der::ErrorKind::DateTime.into()))
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` → modulus bytes.
fn rsa_modulus(key: &[u8]) -> Result<Vec<u8>, Error> {
    let mut reader = SliceReader::new(key).map_err(Error::Certificate)?;
    let n = reader
        .sequence(|seq| {
            let n = UintRef::decode(seq)?;
            let _e = UintRef::decode(seq)?;
            Ok::<_, der::Error>(n.as_bytes().to_vec())
        })
        .map_err(Error::Certificate)?;
    Ok(strip_zeros(&n).to_vec())
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

fn modulus_bits(n: &[u8]) -> u32 {
    let n = strip_zeros(n);
    match n.first() {
        None => 0,
        Some(&top) => (n.len() as u32 - 1) * 8 + (8 - top.leading_zeros()),
    }
}

pub(crate) fn key_usages(ku: &KeyUsageExt) -> Vec<KeyUsage> {
    let bits = [
        (ku.digital_signature(), KeyUsage::DigitalSignature),
        (ku.non_repudiation(), KeyUsage::NonRepudiation),
        (ku.key_encipherment(), KeyUsage::KeyEncipherment),
        (ku.data_encipherment(), KeyUsage::DataEncipherment),
        (ku.key_agreement(), KeyUsage::KeyAgreement),
        (ku.key_cert_sign(), KeyUsage::KeyCertSign),
        (ku.crl_sign(), KeyUsage::CrlSign),
        (ku.encipher_only(), KeyUsage::EncipherOnly),
        (ku.decipher_only(), KeyUsage::DecipherOnly),
    ];
    bits.into_iter()
        .filter_map(|(set, usage)| set.then_some(usage))
        .collect()
}

pub(crate) fn eku_name(oid: &ObjectIdentifier) -> String {
    let known = [
        (rfc5280::ID_KP_SERVER_AUTH, "serverAuth"),
        (rfc5280::ID_KP_CLIENT_AUTH, "clientAuth"),
        (rfc5280::ID_KP_CODE_SIGNING, "codeSigning"),
        (rfc5280::ID_KP_EMAIL_PROTECTION, "emailProtection"),
        (rfc5280::ID_KP_TIME_STAMPING, "timeStamping"),
        (rfc5280::ID_KP_OCSP_SIGNING, "OCSPSigning"),
    ];
    known
        .iter()
        .find(|(k, _)| k == oid)
        .map(|(_, name)| (*name).to_owned())
        .unwrap_or_else(|| oid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use x509_cert::ext::pkix::KeyUsages;

    fn token() -> TokenId {
        TokenId::derive(Path::new("/m.so"), "abc", "", "")
    }

    #[test]
    fn certificate_id_round_trips_and_names_its_token() {
        let id = CertificateId::new(&token(), &[0x01, 0xab], b"cert");
        assert!(id.to_string().ends_with("/01ab"));
        let parsed: CertificateId = id.to_string().parse().expect("parse");
        assert_eq!(parsed, id);
        assert_eq!(parsed.token_id(), &token());
        assert_eq!(parsed.cka_id(), Some(vec![0x01, 0xab]));
    }

    #[test]
    fn certificate_id_without_cka_id_uses_a_hash() {
        let a = CertificateId::new(&token(), &[], b"cert one");
        let b = CertificateId::new(&token(), &[], b"cert two");
        assert_ne!(a, b);
        assert_eq!(a.cka_id(), None);
        assert_eq!(a.to_string().parse::<CertificateId>().expect("parse"), a);
    }

    #[test]
    fn exact_ids_name_one_certificate_of_a_key_and_parse_back() {
        let plain = CertificateId::new(&token(), &[0x01, 0xab], b"old");
        let exact = CertificateId::exact(&token(), &[0x01, 0xab], b"new");
        assert!(exact.to_string().starts_with(&format!("{plain}.")));
        assert_eq!(exact.to_string().len(), plain.to_string().len() + 17);
        assert_eq!(
            exact.to_string().parse::<CertificateId>().expect("parse"),
            exact
        );
        assert_eq!(exact.cka_id(), Some(vec![0x01, 0xab]));
        assert_eq!(exact.key(), plain);
        // The exact id names its certificate however it is listed; never another one.
        assert!(exact.names(&plain, b"new"));
        assert!(exact.names(&exact, b"new"));
        assert!(!exact.names(&plain, b"old"));
        assert!(plain.names(&plain, b"old"));
        assert!(!plain.names(&exact, b"new"));
        let other_key = CertificateId::new(&token(), &[0x02], b"new");
        assert!(!CertificateId::exact(&token(), &[0x02], b"new").names(&plain, b"new"));
        assert!(CertificateId::exact(&token(), &[0x02], b"new").names(&other_key, b"new"));
    }

    #[test]
    fn certificate_id_rejects_malformed_strings() {
        let t = token();
        for s in [
            String::new(),
            format!("{t}"),
            format!("{t}/"),
            format!("{t}/abc"),
            format!("{t}/zz"),
            format!("{t}/01ab."),
            format!("{t}/01ab.0011"),
            format!("{t}/.0011223344556677"),
            format!("{t}/x01.0011223344556677"),
            format!("{t}/01ab.0011223344556677.00"),
            "tok-1/00".to_owned(),
        ] {
            assert!(s.parse::<CertificateId>().is_err(), "{s}");
        }
    }

    #[test]
    fn key_usage_bits_map_to_rfc5280_names() {
        let ku = KeyUsageExt(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation);
        let usages = key_usages(&ku);
        assert_eq!(
            usages,
            vec![KeyUsage::DigitalSignature, KeyUsage::NonRepudiation]
        );
        let names: Vec<_> = usages.iter().map(|u| u.rfc5280_name()).collect();
        assert_eq!(names, ["digitalSignature", "nonRepudiation"]);
        assert_eq!(
            key_usages(&KeyUsageExt(KeyUsages::CRLSign.into())),
            vec![KeyUsage::CrlSign]
        );
    }

    #[test]
    fn eku_names_known_and_unknown() {
        assert_eq!(eku_name(&rfc5280::ID_KP_CLIENT_AUTH), "clientAuth");
        let odd = ObjectIdentifier::new_unwrap("1.2.3.4.5");
        assert_eq!(eku_name(&odd), "1.2.3.4.5");
    }

    #[test]
    fn key_algorithm_names() {
        assert_eq!(KeyAlgorithm::Rsa { bits: 2048 }.wire_name(), "RSA-2048");
        assert_eq!(KeyAlgorithm::EcP256.wire_name(), "EC-P256");
        assert_eq!(KeyAlgorithm::Ed25519.wire_name(), "Ed25519");
        assert_eq!(KeyAlgorithm::EcP384.family(), "EC");
        assert_eq!(KeyAlgorithm::Rsa { bits: 3072 }.family(), "RSA");
    }

    #[test]
    fn modulus_bits_and_matching_ignore_leading_zeros() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        let m = PublicKeyMaterial::Rsa(vec![0xc0, 0x01]);
        assert!(m.matches_modulus(&[0x00, 0xc0, 0x01]));
        assert!(!m.matches_modulus(&[0xc0, 0x02]));
    }

    #[test]
    fn ec_point_matches_raw_and_octet_string_wrapped() {
        let point = vec![0x04, 1, 2, 3, 4];
        let m = PublicKeyMaterial::Point(point.clone());
        assert!(m.matches_ec_point(&point));
        let mut wrapped = vec![0x04, point.len() as u8];
        wrapped.extend_from_slice(&point);
        assert!(m.matches_ec_point(&wrapped));
        assert!(!m.matches_ec_point(&[0x04, 1, 2, 3, 5]));
        assert!(!m.matches_modulus(&point));
    }
}
