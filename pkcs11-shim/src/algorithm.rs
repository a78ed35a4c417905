//! Signature algorithms, their inputs, and the encodings the shim builds itself
//! (PKCS#1 DigestInfo, ECDSA DER ↔ IEEE P1363).

use const_oid::ObjectIdentifier;
use der::asn1::{AnyRef, OctetStringRef, UintRef};
use der::{Decode, Encode, EncodeValue, FixedTag, Length, Reader, SliceReader, Tag, Writer};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use spki::AlgorithmIdentifierRef;

use crate::certificate::CertificateId;
use crate::error::Error;

/// A hash function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Hashes `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha256 => sha2::Sha256::digest(data).to_vec(),
            HashAlg::Sha384 => sha2::Sha384::digest(data).to_vec(),
            HashAlg::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// The digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// "SHA256", "SHA384", "SHA512".
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "SHA256",
            HashAlg::Sha384 => "SHA384",
            HashAlg::Sha512 => "SHA512",
        }
    }

    /// The hash's OID (NIST hashAlgs arc).
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            HashAlg::Sha256 => const_oid::db::rfc5912::ID_SHA_256,
            HashAlg::Sha384 => const_oid::db::rfc5912::ID_SHA_384,
            HashAlg::Sha512 => const_oid::db::rfc5912::ID_SHA_512,
        }
    }
}

/// How an ECDSA signature is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EcdsaEncoding {
    /// `SEQUENCE { INTEGER r, INTEGER s }` (X.509, CMS, OpenSSL).
    Der,
    /// `r ‖ s`, each the curve's size (WebCrypto, JOSE) — what PKCS#11 returns.
    P1363,
}

/// A signature algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SignAlgorithm {
    /// RSASSA-PKCS1-v1_5.
    RsaPkcs1v15(HashAlg),
    /// RSASSA-PSS, MGF1 with the same hash, salt length = hash length.
    RsaPss(HashAlg),
    /// ECDSA.
    Ecdsa(HashAlg, EcdsaEncoding),
    /// Pure Ed25519 over the message.
    Ed25519,
}

impl SignAlgorithm {
    /// The hash applied to the message, if the algorithm hashes.
    pub fn hash(self) -> Option<HashAlg> {
        match self {
            SignAlgorithm::RsaPkcs1v15(h)
            | SignAlgorithm::RsaPss(h)
            | SignAlgorithm::Ecdsa(h, _) => Some(h),
            SignAlgorithm::Ed25519 => None,
        }
    }

    /// A short name for errors and logs, e.g. "RSA-PSS-SHA256".
    pub fn name(self) -> String {
        match self {
            SignAlgorithm::RsaPkcs1v15(h) => format!("RSA-PKCS1-{}", h.name()),
            SignAlgorithm::RsaPss(h) => format!("RSA-PSS-{}", h.name()),
            SignAlgorithm::Ecdsa(h, _) => format!("ECDSA-{}", h.name()),
            SignAlgorithm::Ed25519 => "Ed25519".to_owned(),
        }
    }
}

/// One thing to sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignInput {
    /// A digest already made with the algorithm's hash; its length is checked.
    Digest(Vec<u8>),
    /// The message; the shim hashes it, or lets the token hash-and-sign.
    Data(Vec<u8>),
}

/// A signing request: one certificate's key, one algorithm, N inputs, one login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignRequest {
    /// The certificate whose private key signs.
    pub certificate: CertificateId,
    /// The algorithm.
    pub algorithm: SignAlgorithm,
    /// The inputs; the result has one signature per input, in order.
    pub inputs: Vec<SignInput>,
    /// C_Logout when the request ends (success or not); otherwise the login stays cached.
    pub logout_after: bool,
}

/// Checks an input against the algorithm before anything touches the token.
pub(crate) fn check_input(alg: SignAlgorithm, input: &SignInput) -> Result<(), Error> {
    match (alg.hash(), input) {
        (None, SignInput::Digest(_)) => Err(Error::InvalidInput(
            "Ed25519 signs the message itself; a pre-computed digest cannot be signed".to_owned(),
        )),
        (Some(h), SignInput::Digest(d)) if d.len() != h.output_len() => {
            Err(Error::InvalidInput(format!(
                "a {} digest is {} bytes, got {}",
                h.name(),
                h.output_len(),
                d.len()
            )))
        }
        _ => Ok(()),
    }
}

/// `DigestInfo ::= SEQUENCE { digestAlgorithm AlgorithmIdentifier, digest OCTET STRING }`
/// (RFC 8017 §9.2), the input of CKM_RSA_PKCS when the shim hashed.
struct DigestInfo<'a> {
    algorithm: AlgorithmIdentifierRef<'a>,
    digest: &'a OctetStringRef,
}

impl EncodeValue for DigestInfo<'_> {
    fn value_len(&self) -> der::Result<Length> {
        self.algorithm.encoded_len()? + self.digest.encoded_len()?
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        self.algorithm.encode(writer)?;
        self.digest.encode(writer)
    }
}

impl FixedTag for DigestInfo<'_> {
    const TAG: Tag = Tag::Sequence;
}

/// DER DigestInfo for `digest` made with `hash` (parameters NULL, as RFC 8017 requires).
pub fn digest_info(hash: HashAlg, digest: &[u8]) -> Result<Vec<u8>, Error> {
    if digest.len() != hash.output_len() {
        return Err(Error::InvalidInput(format!(
            "a {} digest is {} bytes, got {}",
            hash.name(),
            hash.output_len(),
            digest.len()
        )));
    }
    let info = DigestInfo {
        algorithm: AlgorithmIdentifierRef {
            oid: hash.oid(),
            parameters: Some(AnyRef::NULL),
        },
        digest: OctetStringRef::new(digest).map_err(Error::Encoding)?,
    };
    info.to_der().map_err(Error::Encoding)
}

/// `r ‖ s` (each half the same length) → `SEQUENCE { INTEGER r, INTEGER s }`.
pub fn ecdsa_p1363_to_der(sig: &[u8]) -> Result<Vec<u8>, Error> {
    if sig.is_empty() || sig.len() % 2 != 0 {
        return Err(Error::InvalidInput(format!(
            "an r||s ECDSA signature has an even, non-zero length; got {}",
            sig.len()
        )));
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let r = UintRef::new(r).map_err(Error::Encoding)?;
    let s = UintRef::new(s).map_err(Error::Encoding)?;
    let len = (r.encoded_len().map_err(Error::Encoding)?
        + s.encoded_len().map_err(Error::Encoding)?)
    .map_err(Error::Encoding)?;
    let mut out = Vec::with_capacity(sig.len() + 8);
    der::Header::new(Tag::Sequence, len)
        .encode_to_vec(&mut out)
        .map_err(Error::Encoding)?;
    r.encode_to_vec(&mut out).map_err(Error::Encoding)?;
    s.encode_to_vec(&mut out).map_err(Error::Encoding)?;
    Ok(out)
}

/// `SEQUENCE { INTEGER r, INTEGER s }` → `r ‖ s`, each left-padded to `half_len` bytes.
pub fn ecdsa_der_to_p1363(sig: &[u8], half_len: usize) -> Result<Vec<u8>, Error> {
    let mut reader = SliceReader::new(sig).map_err(Error::Encoding)?;
    let (r, s) = reader
        .sequence(|seq| {
            let r = UintRef::decode(seq)?;
            let s = UintRef::decode(seq)?;
            Ok::<_, der::Error>((r.as_bytes().to_vec(), s.as_bytes().to_vec()))
        })
        .map_err(Error::Encoding)?;
    reader.finish().map_err(Error::Encoding)?;
    if r.len() > half_len || s.len() > half_len {
        return Err(Error::InvalidInput(format!(
            "ECDSA integers longer than {half_len} bytes"
        )));
    }
    let mut out = vec![0u8; half_len * 2];
    out[half_len - r.len()..half_len].copy_from_slice(&r);
    out[2 * half_len - s.len()..].copy_from_slice(&s);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_info_matches_rfc8017_prefixes() {
        // RFC 8017 §9.2 note 1 lists these DER prefixes.
        let cases: [(HashAlg, &str); 3] = [
            (HashAlg::Sha256, "3031300d060960864801650304020105000420"),
            (HashAlg::Sha384, "3041300d060960864801650304020205000430"),
            (HashAlg::Sha512, "3051300d060960864801650304020305000440"),
        ];
        for (h, prefix) in cases {
            let digest = h.digest(b"abc");
            let info = digest_info(h, &digest).expect("encode");
            assert_eq!(hex::encode(&info[..19]), prefix, "{h:?}");
            assert_eq!(&info[19..], &digest[..]);
        }
    }

    #[test]
    fn digest_info_rejects_a_wrong_length() {
        assert!(matches!(
            digest_info(HashAlg::Sha256, &[0u8; 31]),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn hashes_have_the_right_lengths() {
        for h in [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            assert_eq!(h.digest(b"").len(), h.output_len());
        }
        assert_eq!(
            hex::encode(HashAlg::Sha256.digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ecdsa_der_and_p1363_round_trip() {
        // r has its top bit set (needs a 0x00 pad in DER), s has leading zero bytes.
        let mut p1363 = vec![0u8; 64];
        p1363[0] = 0x80;
        p1363[31] = 1;
        p1363[34] = 0x7f;
        p1363[63] = 9;
        let der = ecdsa_p1363_to_der(&p1363).expect("to der");
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        let back = ecdsa_der_to_p1363(&der, 32).expect("to p1363");
        assert_eq!(back, p1363);
    }

    #[test]
    fn ecdsa_conversion_rejects_garbage() {
        assert!(ecdsa_p1363_to_der(&[1, 2, 3]).is_err());
        assert!(ecdsa_der_to_p1363(&[0x30, 0x03, 0x02, 0x01], 32).is_err());
    }

    #[test]
    fn inputs_are_checked_against_the_algorithm() {
        let ecdsa = SignAlgorithm::Ecdsa(HashAlg::Sha384, EcdsaEncoding::Der);
        assert!(check_input(ecdsa, &SignInput::Digest(vec![0; 48])).is_ok());
        assert!(check_input(ecdsa, &SignInput::Digest(vec![0; 32])).is_err());
        assert!(check_input(ecdsa, &SignInput::Data(vec![1, 2, 3])).is_ok());
        assert!(check_input(SignAlgorithm::Ed25519, &SignInput::Digest(vec![0; 32])).is_err());
        assert!(check_input(SignAlgorithm::Ed25519, &SignInput::Data(vec![])).is_ok());
    }
}
