//! Detached CMS `SignedData` (RFC 5652) whose signature comes from a token, built in two phases.
//!
//! The private key lives on a token behind another layer, so the structure is built in two steps:
//!
//! 1. [`signed_attributes`] builds the signed attributes — contentType (id-data), messageDigest,
//!    signingTime and signingCertificateV2 (RFC 5035) — and [`SignedAttributes::to_be_signed`]
//!    gives the DER `SET OF Attribute` the token must sign: hashed with the digest algorithm for
//!    RSA and ECDSA, or given whole as the message for Ed25519 (RFC 8419) and SM2 (which signs
//!    e = SM3(Z ‖ attributes) with the default user ID, GM/T 0010 and GM/T 0009).
//! 2. [`assemble`] wraps the attributes, the signer's certificate and the token's signature into
//!    a DER `ContentInfo` holding a `SignedData` with no encapsulated content (detached).
//!
//! Everything is encoded by the `der` / `cms` / `x509-cert` types; no DER is written by hand.
//! The result is a CAdES-B-B style signature that `openssl cms -verify` accepts.

use cms::cert::IssuerAndSerialNumber;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use const_oid::db::{rfc5911, rfc5912, rfc8410};
use der::asn1::{ObjectIdentifier, OctetString, SetOfVec, UintRef};
use der::{Any, Decode, Encode, Sequence};
use sha2::Digest as _;
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;
use x509_cert::Certificate;

/// Errors from building a CMS structure.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    /// The signer certificate is not a DER X.509 certificate.
    #[error("the signer certificate is not a valid DER X.509 certificate")]
    Certificate(#[source] der::Error),
    /// The message digest has the wrong length for its algorithm.
    #[error("message digest is {actual} bytes, {algorithm:?} needs {expected}")]
    DigestLength {
        /// The digest algorithm named by the caller.
        algorithm: DigestAlg,
        /// The length that algorithm produces.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The signing time cannot be encoded (before 1970 or past 9999).
    #[error("signing time {0} cannot be encoded")]
    SigningTime(time::OffsetDateTime),
    /// The signature algorithm does not fit the signed attributes.
    #[error("signature algorithm {signature:?} needs digest {needs:?}, but the attributes were built with {built:?}")]
    DigestMismatch {
        /// The signature algorithm given to [`assemble`].
        signature: CmsSignatureAlg,
        /// The digest algorithm the signature algorithm requires.
        needs: DigestAlg,
        /// The digest algorithm the attributes were built with.
        built: DigestAlg,
    },
    /// [`assemble`] was given another certificate than [`signed_attributes`].
    #[error("the certificate differs from the one named in the signed attributes")]
    CertificateMismatch,
    /// An ECDSA signature is not a DER `Ecdsa-Sig-Value` (or a raw one has an odd length).
    #[error("ECDSA signature is not in the expected encoding")]
    EcdsaSignature(#[source] Option<der::Error>),
    /// The signature is empty.
    #[error("the signature is empty")]
    EmptySignature,
    /// No signature algorithm identifier exists for this combination (RSA or ECDSA with SM3).
    #[error("no algorithm identifier for {0:?}")]
    Unsupported(CmsSignatureAlg),
    /// Encoding failed (a size limit of the DER encoder was exceeded).
    #[error("DER encoding failed")]
    Encode(#[source] der::Error),
}

/// Digest algorithm of the signed content and of the signed attributes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// SM3 (GM/T 0004; OID of GM/T 0006).
    Sm3,
}

/// SM3 (GM/T 0006 `1.2.156.10197.1.401`).
pub const SM3: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.401");
/// SM2 signature with SM3 (GM/T 0006 / GM/T 0010 `1.2.156.10197.1.501`).
pub const SM2_WITH_SM3: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");

impl DigestAlg {
    /// The object identifier of the algorithm.
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            DigestAlg::Sha256 => rfc5912::ID_SHA_256,
            DigestAlg::Sha384 => rfc5912::ID_SHA_384,
            DigestAlg::Sha512 => rfc5912::ID_SHA_512,
            DigestAlg::Sm3 => SM3,
        }
    }

    /// Length of the digest in bytes.
    pub fn output_len(self) -> usize {
        match self {
            DigestAlg::Sha256 | DigestAlg::Sm3 => 32,
            DigestAlg::Sha384 => 48,
            DigestAlg::Sha512 => 64,
        }
    }

    /// Hash `data` with this algorithm.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            DigestAlg::Sha256 => sha2::Sha256::digest(data).to_vec(),
            DigestAlg::Sha384 => sha2::Sha384::digest(data).to_vec(),
            DigestAlg::Sha512 => sha2::Sha512::digest(data).to_vec(),
            DigestAlg::Sm3 => sm3::Sm3::digest(data).to_vec(),
        }
    }

    /// The `AlgorithmIdentifier`, parameters absent (RFC 5754 section 2).
    fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: self.oid(),
            parameters: None,
        }
    }
}

/// The signature algorithm the token used.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmsSignatureAlg {
    /// RSASSA-PKCS1-v1_5 over the hash of the signed attributes.
    RsaPkcs1(DigestAlg),
    /// RSASSA-PSS, MGF1 with the same hash, salt as long as the hash, trailer field 1.
    RsaPss(DigestAlg),
    /// ECDSA over the hash; the signature passed to [`assemble`] must be DER.
    EcdsaWith(DigestAlg),
    /// Ed25519 (pure) over the DER signed attributes; the digest algorithm is SHA-512 (RFC 8419).
    Ed25519,
    /// SM2 over e = SM3(Z ‖ DER signed attributes), default user ID; digest SM3 (GM/T 0010).
    /// The signature passed to [`assemble`] must be DER `SEQUENCE { r, s }`.
    Sm2,
}

impl CmsSignatureAlg {
    /// The digest algorithm this signature algorithm uses in `SignerInfo.digestAlgorithm`.
    pub fn digest_alg(self) -> DigestAlg {
        match self {
            CmsSignatureAlg::RsaPkcs1(d)
            | CmsSignatureAlg::RsaPss(d)
            | CmsSignatureAlg::EcdsaWith(d) => d,
            CmsSignatureAlg::Ed25519 => DigestAlg::Sha512,
            CmsSignatureAlg::Sm2 => DigestAlg::Sm3,
        }
    }

    fn algorithm_identifier(self) -> Result<AlgorithmIdentifierOwned, CmsError> {
        let (oid, parameters) = match self {
            CmsSignatureAlg::RsaPkcs1(d) => {
                let oid = match d {
                    DigestAlg::Sha256 => rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
                    DigestAlg::Sha384 => rfc5912::SHA_384_WITH_RSA_ENCRYPTION,
                    DigestAlg::Sha512 => rfc5912::SHA_512_WITH_RSA_ENCRYPTION,
                    DigestAlg::Sm3 => return Err(CmsError::Unsupported(self)),
                };
                // RFC 4055 section 5: the parameters of the PKCS #1 v1.5 identifiers are NULL.
                (oid, Some(Any::null()))
            }
            CmsSignatureAlg::RsaPss(d) => {
                let params = RsaPssParams {
                    hash_algorithm: d.algorithm_identifier(),
                    mask_gen_algorithm: AlgorithmIdentifierOwned {
                        oid: rfc5912::ID_MGF_1,
                        parameters: Some(
                            Any::encode_from(&d.algorithm_identifier())
                                .map_err(CmsError::Encode)?,
                        ),
                    },
                    salt_length: u32::try_from(d.output_len()).unwrap_or(u32::MAX),
                };
                (
                    rfc5912::ID_RSASSA_PSS,
                    Some(Any::encode_from(&params).map_err(CmsError::Encode)?),
                )
            }
            CmsSignatureAlg::EcdsaWith(d) => {
                let oid = match d {
                    DigestAlg::Sha256 => rfc5912::ECDSA_WITH_SHA_256,
                    DigestAlg::Sha384 => rfc5912::ECDSA_WITH_SHA_384,
                    DigestAlg::Sha512 => rfc5912::ECDSA_WITH_SHA_512,
                    DigestAlg::Sm3 => return Err(CmsError::Unsupported(self)),
                };
                // RFC 5758 section 3.2: parameters absent.
                (oid, None)
            }
            // RFC 8410 section 3: parameters absent.
            CmsSignatureAlg::Ed25519 => (rfc8410::ID_ED_25519, None),
            // GM/T 0010: parameters absent.
            CmsSignatureAlg::Sm2 => (SM2_WITH_SM3, None),
        };
        Ok(AlgorithmIdentifierOwned { oid, parameters })
    }
}

/// The signed attributes of one signer, ready to be signed by the token.
#[derive(Debug, Clone)]
pub struct SignedAttributes {
    attrs: SetOfVec<Attribute>,
    der: Vec<u8>,
    digest_alg: DigestAlg,
    cert_sha256: Vec<u8>,
}

impl SignedAttributes {
    /// DER of the `SET OF Attribute` (tag 0x31): what the signer hashes (RSA, ECDSA) or signs
    /// as the message (Ed25519). RFC 5652 section 5.4.
    pub fn to_be_signed(&self) -> &[u8] {
        &self.der
    }

    /// The digest algorithm the attributes were built with.
    pub fn digest_alg(&self) -> DigestAlg {
        self.digest_alg
    }
}

/// Build the signed attributes for a detached signature over content whose digest (computed
/// with `digest_alg`) is `message_digest`.
///
/// `signing_time` is encoded as UTCTime through 2049 and GeneralizedTime after (RFC 5652
/// section 11.3). For Ed25519 use [`DigestAlg::Sha512`] (RFC 8419 section 3).
pub fn signed_attributes(
    digest_alg: DigestAlg,
    message_digest: &[u8],
    signing_time: time::OffsetDateTime,
    signer_cert_der: &[u8],
) -> Result<SignedAttributes, CmsError> {
    if message_digest.len() != digest_alg.output_len() {
        return Err(CmsError::DigestLength {
            algorithm: digest_alg,
            expected: digest_alg.output_len(),
            actual: message_digest.len(),
        });
    }
    let cert = Certificate::from_der(signer_cert_der).map_err(CmsError::Certificate)?;
    let cert_sha256 = sha2::Sha256::digest(signer_cert_der).to_vec();
    let tbs = cert.tbs_certificate();

    let content_type = attribute(rfc5911::ID_CONTENT_TYPE, &rfc5911::ID_DATA)?;
    let digest = attribute(
        rfc5911::ID_MESSAGE_DIGEST,
        &OctetString::new(message_digest).map_err(CmsError::Encode)?,
    )?;
    let signing_time = attribute(rfc5911::ID_SIGNING_TIME, &to_cms_time(signing_time)?)?;
    let ess = SigningCertificateV2 {
        certs: vec![EssCertIdV2 {
            // DEFAULT id-sha256: omitted in DER.
            hash_algorithm: None,
            cert_hash: OctetString::new(cert_sha256.clone()).map_err(CmsError::Encode)?,
            issuer_serial: Some(IssuerSerial {
                issuer: vec![GeneralName::DirectoryName(tbs.issuer().clone())],
                serial_number: tbs.serial_number().clone(),
            }),
        }],
    };
    let signing_certificate = attribute(rfc5911::ID_AA_SIGNING_CERTIFICATE_V_2, &ess)?;

    // SetOfVec sorts its elements by their DER encoding, as a DER SET OF must be.
    let attrs = SetOfVec::try_from(vec![
        content_type,
        digest,
        signing_time,
        signing_certificate,
    ])
    .map_err(CmsError::Encode)?;
    let der = attrs.to_der().map_err(CmsError::Encode)?;
    Ok(SignedAttributes {
        attrs,
        der,
        digest_alg,
        cert_sha256,
    })
}

/// Assemble the DER `ContentInfo` (id-signedData) from the signed attributes, the signer's
/// certificate (the same as given to [`signed_attributes`]) and the token's signature over
/// [`SignedAttributes::to_be_signed`]. ECDSA signatures must be DER (see [`ecdsa_raw_to_der`]).
pub fn assemble(
    attrs: &SignedAttributes,
    signer_cert_der: &[u8],
    signature_alg: CmsSignatureAlg,
    signature: &[u8],
) -> Result<Vec<u8>, CmsError> {
    let needs = signature_alg.digest_alg();
    if needs != attrs.digest_alg {
        return Err(CmsError::DigestMismatch {
            signature: signature_alg,
            needs,
            built: attrs.digest_alg,
        });
    }
    if sha2::Sha256::digest(signer_cert_der).as_slice() != attrs.cert_sha256.as_slice() {
        return Err(CmsError::CertificateMismatch);
    }
    if signature.is_empty() {
        return Err(CmsError::EmptySignature);
    }
    if let CmsSignatureAlg::EcdsaWith(_) | CmsSignatureAlg::Sm2 = signature_alg {
        EcdsaSigValue::from_der(signature).map_err(|e| CmsError::EcdsaSignature(Some(e)))?;
    }
    let cert = Certificate::from_der(signer_cert_der).map_err(CmsError::Certificate)?;
    let tbs = cert.tbs_certificate();
    let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
        issuer: tbs.issuer().clone(),
        serial_number: tbs.serial_number().clone(),
    });

    let signer_info = SignerInfo {
        // Version 1: the signer is identified by issuer and serial number (RFC 5652 5.3).
        version: CmsVersion::V1,
        sid,
        digest_alg: needs.algorithm_identifier(),
        signed_attrs: Some(attrs.attrs.clone()),
        signature_algorithm: signature_alg.algorithm_identifier()?,
        signature: OctetString::new(signature).map_err(CmsError::Encode)?,
        unsigned_attrs: None,
    };
    let mut certificates = CertificateSet(SetOfVec::new());
    certificates
        .0
        .insert(cms::cert::CertificateChoices::Certificate(cert))
        .map_err(CmsError::Encode)?;
    let mut digest_algorithms = SetOfVec::new();
    digest_algorithms
        .insert(needs.algorithm_identifier())
        .map_err(CmsError::Encode)?;
    let mut signer_infos = SignerInfos(SetOfVec::new());
    signer_infos
        .0
        .insert(signer_info)
        .map_err(CmsError::Encode)?;

    let signed_data = SignedData {
        // Version 1: only X.509 certificates, id-data content, version 1 SignerInfos (5.1).
        version: CmsVersion::V1,
        digest_algorithms,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: rfc5911::ID_DATA,
            // Detached: the content is not carried.
            econtent: None,
        },
        certificates: Some(certificates),
        crls: None,
        signer_infos,
    };
    let content_info = ContentInfo {
        content_type: rfc5911::ID_SIGNED_DATA,
        content: Any::encode_from(&signed_data).map_err(CmsError::Encode)?,
    };
    content_info.to_der().map_err(CmsError::Encode)
}

/// Convert a raw ECDSA signature `r ‖ s` (IEEE P1363, what PKCS#11 `CKM_ECDSA` returns) into the
/// DER `Ecdsa-Sig-Value` CMS needs.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, CmsError> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(CmsError::EcdsaSignature(None));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let value = EcdsaSigValue {
        r: UintRef::new(r).map_err(|e| CmsError::EcdsaSignature(Some(e)))?,
        s: UintRef::new(s).map_err(|e| CmsError::EcdsaSignature(Some(e)))?,
    };
    value.to_der().map_err(CmsError::Encode)
}

/// One attribute with a single value.
fn attribute(oid: ObjectIdentifier, value: &impl Encode) -> Result<Attribute, CmsError> {
    let value =
        Any::from_der(&value.to_der().map_err(CmsError::Encode)?).map_err(CmsError::Encode)?;
    let values = SetOfVec::try_from(vec![value]).map_err(CmsError::Encode)?;
    Ok(Attribute { oid, values })
}

fn to_cms_time(t: time::OffsetDateTime) -> Result<Time, CmsError> {
    let secs = u64::try_from(t.unix_timestamp()).map_err(|_| CmsError::SigningTime(t))?;
    let dt = der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs))
        .map_err(|_| CmsError::SigningTime(t))?;
    // Time::from picks UTCTime through 2049 and GeneralizedTime after.
    Ok(Time::from(dt))
}

/// `RSASSA-PSS-params` (RFC 4055 section 3.1); the trailer field is always its default (1).
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct RsaPssParams {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    hash_algorithm: AlgorithmIdentifierOwned,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT")]
    mask_gen_algorithm: AlgorithmIdentifierOwned,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT")]
    salt_length: u32,
}

/// `SigningCertificateV2` (RFC 5035 section 3); no policies.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct SigningCertificateV2 {
    certs: Vec<EssCertIdV2>,
}

/// `ESSCertIDv2` (RFC 5035 section 4).
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct EssCertIdV2 {
    #[asn1(optional = "true")]
    hash_algorithm: Option<AlgorithmIdentifierOwned>,
    cert_hash: OctetString,
    #[asn1(optional = "true")]
    issuer_serial: Option<IssuerSerial>,
}

/// `IssuerSerial` (RFC 5035 section 4).
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct IssuerSerial {
    issuer: Vec<GeneralName>,
    serial_number: SerialNumber,
}

/// `Ecdsa-Sig-Value` (RFC 5912 / RFC 3279 section 2.2.3).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_length_is_checked() {
        let err = signed_attributes(
            DigestAlg::Sha384,
            &[0; 32],
            time::OffsetDateTime::now_utc(),
            &[],
        );
        assert!(matches!(
            err,
            Err(CmsError::DigestLength {
                expected: 48,
                actual: 32,
                ..
            })
        ));
    }

    #[test]
    fn bad_certificate_is_refused() {
        let err = signed_attributes(
            DigestAlg::Sha256,
            &[0; 32],
            time::OffsetDateTime::now_utc(),
            b"nope",
        );
        assert!(matches!(err, Err(CmsError::Certificate(_))));
    }

    #[test]
    fn ecdsa_raw_to_der_strips_leading_zeros_and_pads_high_bits() {
        let mut raw = vec![0u8; 64];
        raw[1] = 0x01; // r = 0x0001.. (leading zero byte stripped)
        raw[32] = 0x80; // s has its high bit set (gets a 0x00 pad)
        let der = ecdsa_raw_to_der(&raw).expect("encodes");
        let parsed = EcdsaSigValue::from_der(&der).expect("parses");
        assert_eq!(parsed.r.as_bytes(), &raw[1..32]);
        assert_eq!(parsed.s.as_bytes(), &raw[32..]);
        assert_eq!(der[0], 0x30);
        assert!(ecdsa_raw_to_der(&raw[..63]).is_err());
    }

    #[test]
    fn time_is_utc_until_2049_and_generalized_after() {
        let t2049 = time::macros::datetime!(2049-12-31 23:59:59 UTC);
        let t2050 = time::macros::datetime!(2050-01-01 00:00:00 UTC);
        assert!(matches!(to_cms_time(t2049), Ok(Time::UtcTime(_))));
        assert!(matches!(to_cms_time(t2050), Ok(Time::GeneralTime(_))));
        assert!(to_cms_time(time::macros::datetime!(1960-01-01 00:00:00 UTC)).is_err());
    }
}
