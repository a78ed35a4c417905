//! Containers' signing certificates: stable ids and the parsed fields KeyPort shows and checks.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use const_oid::db::rfc5912;
use const_oid::ObjectIdentifier;
use der::asn1::UintRef;
use der::{Decode, Reader, SliceReader};
use time::OffsetDateTime;
use x509_cert::ext::pkix::{ExtendedKeyUsage, KeyUsage as KeyUsageExt};
use x509_cert::Certificate;

use crate::error::Error;
use crate::token::{hex_name, ApplicationId, ParseIdError, TokenId};

/// The SM2 curve (GM/T 0006: 1.2.156.10197.1.301), the parameter of an SM2 key's
/// id-ecPublicKey.
pub const SM2_CURVE_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");

/// A certificate's stable identity: its application and container.
/// String form: `skf-…/<hex of the application name>/<hex of the container name>` (the names'
/// bytes as the library gave them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CertificateId {
    application: ApplicationId,
    container: Vec<u8>,
}

impl CertificateId {
    /// The signing certificate of `container` in `application`.
    pub fn new(application: ApplicationId, container: &str) -> CertificateId {
        CertificateId::from_raw(application, container.as_bytes())
    }

    /// The signing certificate of the container whose name is these bytes.
    pub fn from_raw(application: ApplicationId, container: &[u8]) -> CertificateId {
        CertificateId {
            application,
            container: container.to_vec(),
        }
    }

    /// The token.
    pub fn token_id(&self) -> &TokenId {
        self.application.token()
    }

    /// The application (whose PIN guards the key).
    pub fn application(&self) -> &ApplicationId {
        &self.application
    }

    /// The container's name for display (non-UTF-8 bytes replaced).
    pub fn container(&self) -> String {
        String::from_utf8_lossy(&self.container).into_owned()
    }

    /// The container name's bytes, as the library reported them.
    pub fn raw_container(&self) -> &[u8] {
        &self.container
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.application, hex::encode(&self.container))
    }
}

impl FromStr for CertificateId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.to_owned());
        let (app, container) = s.rsplit_once('/').ok_or_else(bad)?;
        Ok(CertificateId {
            application: app.parse()?,
            container: hex_name(container).ok_or_else(bad)?,
        })
    }
}

/// The key behind a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// SM2 (GM/T 0003) on its 256-bit curve.
    Sm2,
    /// RSA with this modulus size.
    Rsa {
        /// Modulus bits.
        bits: u32,
    },
}

impl KeyAlgorithm {
    /// "SM2" or "RSA-2048".
    pub fn wire_name(self) -> String {
        match self {
            KeyAlgorithm::Sm2 => "SM2".to_owned(),
            KeyAlgorithm::Rsa { bits } => format!("RSA-{bits}"),
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

/// A container's signing certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Stable id.
    pub id: CertificateId,
    /// The certificate, DER (from SKF_ExportCertificate with bSignFlag = TRUE).
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
    /// Who holds it: the subject's CN, else the full subject.
    pub holder: String,
    /// The container's encryption certificate (dual-certificate keys), DER, if it has one.
    pub encryption_certificate: Option<Vec<u8>>,
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
    /// The subjectPublicKey bits: `04‖X‖Y` for SM2, the RSAPublicKey DER for RSA.
    pub(crate) public_key: Vec<u8>,
}

impl ParsedCertificate {
    /// Parses a DER certificate with an SM2 or RSA key.
    pub(crate) fn parse(der: &[u8]) -> Result<ParsedCertificate, Error> {
        let failed = || Error::Certificate(der::ErrorKind::Failed.into());
        let cert = Certificate::from_der(der).map_err(Error::Certificate)?;
        let tbs = cert.tbs_certificate();
        let spki = tbs.subject_public_key_info();
        let key_bytes = spki.subject_public_key.as_bytes().ok_or_else(failed)?;
        let key_algorithm = match spki.algorithm.oid {
            rfc5912::RSA_ENCRYPTION => KeyAlgorithm::Rsa {
                bits: rsa_modulus_bits(key_bytes)?,
            },
            rfc5912::ID_EC_PUBLIC_KEY => {
                let curve: ObjectIdentifier = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .ok_or_else(failed)?
                    .decode_as()
                    .map_err(Error::Certificate)?;
                if curve != SM2_CURVE_OID || key_bytes.len() != 65 || key_bytes[0] != 0x04 {
                    return Err(unsupported_key(&curve.to_string()));
                }
                KeyAlgorithm::Sm2
            }
            other => return Err(unsupported_key(&other.to_string())),
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
            public_key: key_bytes.to_vec(),
        })
    }
}

fn unsupported_key(what: &str) -> Error {
    Error::MechanismNotSupported {
        algorithm: "signing".to_owned(),
        key: what.to_owned(),
    }
}

fn to_offset(d: std::time::Duration) -> Result<OffsetDateTime, Error> {
    let secs = i64::try_from(d.as_secs())
        .map_err(|_| Error::Certificate(der::ErrorKind::DateTime.into()))?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| Error::Certificate(der::ErrorKind::DateTime.into()))
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` → modulus bits.
fn rsa_modulus_bits(key: &[u8]) -> Result<u32, Error> {
    let mut reader = SliceReader::new(key).map_err(Error::Certificate)?;
    let n = reader
        .sequence(|seq| {
            let n = UintRef::decode(seq)?;
            let _e = UintRef::decode(seq)?;
            Ok::<_, der::Error>(n.as_bytes().to_vec())
        })
        .map_err(Error::Certificate)?;
    let first = n.iter().position(|&x| x != 0).unwrap_or(n.len());
    let n = &n[first..];
    Ok(match n.first() {
        None => 0,
        Some(&top) => {
            let len = u32::try_from(n.len()).unwrap_or(u32::MAX / 8);
            (len - 1) * 8 + (8 - top.leading_zeros())
        }
    })
}

/// The RFC 5280 name of an extended key usage, or its dotted OID.
fn eku_name(oid: &ObjectIdentifier) -> String {
    use const_oid::db::rfc5280;
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
        .map_or_else(|| oid.to_string(), |(_, name)| (*name).to_owned())
}

fn key_usages(ku: &KeyUsageExt) -> Vec<KeyUsage> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn certificate_ids_round_trip() {
        let t = TokenId::derive(Path::new("/l.so"), "S", "", "");
        let id = CertificateId::new(ApplicationId::new(t, "APP"), "SM2/签名");
        assert_eq!(id.to_string().parse::<CertificateId>(), Ok(id.clone()));
        assert_eq!(id.container(), "SM2/签名");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            ParsedCertificate::parse(b"\x30\x03\x02\x01\x01"),
            Err(Error::Certificate(_))
        ));
    }
}
