//! Signature algorithms, their inputs, and what the shim computes itself: the SM2 user hash
//! Z and message hash e (GM/T 0003.2 / GM/T 0009), SM2 signature encodings, and the PKCS#1
//! DigestInfo an RSA container signs.

use const_oid::ObjectIdentifier;
use der::asn1::{AnyRef, OctetStringRef};
use der::{Encode, EncodeValue, FixedTag, Length, Tag, Writer};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use sm2::elliptic_curve::sec1::ToSec1Point as _;
use spki::AlgorithmIdentifierRef;

use crate::certificate::CertificateId;
use crate::error::Error;

/// The SM2 user ID GM/T 0009 names as the default: the ASCII string `1234567812345678`.
pub const DEFAULT_SM2_USER_ID: &str = "1234567812345678";

/// A hash for RSA signatures.
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

    fn oid(self) -> ObjectIdentifier {
        match self {
            HashAlg::Sha256 => const_oid::db::rfc5912::ID_SHA_256,
            HashAlg::Sha384 => const_oid::db::rfc5912::ID_SHA_384,
            HashAlg::Sha512 => const_oid::db::rfc5912::ID_SHA_512,
        }
    }
}

/// How an SM2 signature is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sm2Encoding {
    /// `SEQUENCE { INTEGER r, INTEGER s }` (GM/T 0009), what OpenSSL and X.509 use.
    Der,
    /// `r ‖ s`, 32 bytes each.
    Raw,
}

/// What to sign with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SignAlgorithm {
    /// SM2 with SM3 (SM3withSM2). `user_id` enters Z for [`SignInput::Message`] inputs.
    Sm2 {
        /// The signer's distinguishing identifier (default [`DEFAULT_SM2_USER_ID`]).
        user_id: String,
        /// Output encoding.
        encoding: Sm2Encoding,
    },
    /// RSA PKCS#1 v1.5 with this hash (SKF_RSASignData over the DigestInfo).
    RsaPkcs1(HashAlg),
}

impl SignAlgorithm {
    /// SM2 with the default user ID.
    pub fn sm2(encoding: Sm2Encoding) -> SignAlgorithm {
        SignAlgorithm::Sm2 {
            user_id: DEFAULT_SM2_USER_ID.to_owned(),
            encoding,
        }
    }
}

/// One thing to sign.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SignInput {
    /// The message itself: the shim hashes it (SM2: e = SM3(Z ‖ M); RSA: the hash).
    Message(Vec<u8>),
    /// Already hashed: for SM2 the 32-byte e = SM3(Z ‖ M) (the user ID plays no part then);
    /// for RSA the digest.
    Digest(Vec<u8>),
}

/// A signing job: plain data, so it can cross a process boundary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignRequest {
    /// The container's signing certificate.
    pub certificate: CertificateId,
    /// Algorithm and output encoding.
    pub algorithm: SignAlgorithm,
    /// One signature per input, in order.
    pub inputs: Vec<SignInput>,
    /// SKF_ClearSecureState after the batch (the PIN is asked again next time).
    pub logout_after: bool,
}

/// Z = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA) for the public key `04‖xA‖yA` (GM/T 0003.2
/// §5.5). The curve constants come from the `sm2` crate.
pub fn sm2_z(public_key: &[u8], user_id: &str) -> Result<[u8; 32], Error> {
    use primeorder::PrimeCurveParams;
    use sm2::elliptic_curve::ff::PrimeField as _;
    use sm3::Digest as _;

    let point = sm2::PublicKey::from_sec1_bytes(public_key)
        .map_err(|_| Error::InvalidInput("not an SM2 public key".to_owned()))?
        .to_sec1_point(false);
    let (Some(xa), Some(ya)) = (point.x(), point.y()) else {
        return Err(Error::InvalidInput("not an SM2 public key".to_owned()));
    };
    let entl = user_id
        .len()
        .checked_mul(8)
        .and_then(|bits| u16::try_from(bits).ok())
        .ok_or_else(|| {
            Error::InvalidInput("the SM2 user ID is longer than 8191 bytes".to_owned())
        })?;
    let g = sm2::AffinePoint::GENERATOR.to_sec1_point(false);
    let (Some(xg), Some(yg)) = (g.x(), g.y()) else {
        return Err(Error::Encoding("the SM2 generator".to_owned()));
    };
    let mut h = sm3::Sm3::new();
    h.update(entl.to_be_bytes());
    h.update(user_id.as_bytes());
    h.update(<sm2::Sm2 as PrimeCurveParams>::EQUATION_A.to_repr());
    h.update(<sm2::Sm2 as PrimeCurveParams>::EQUATION_B.to_repr());
    h.update(xg);
    h.update(yg);
    h.update(xa);
    h.update(ya);
    Ok(h.finalize().into())
}

/// e = SM3(Z ‖ M), what SKF_ECCSignData signs.
pub fn sm2_e(public_key: &[u8], user_id: &str, message: &[u8]) -> Result<[u8; 32], Error> {
    use sm3::Digest as _;
    let z = sm2_z(public_key, user_id)?;
    let mut h = sm3::Sm3::new();
    h.update(z);
    h.update(message);
    Ok(h.finalize().into())
}

/// Encodes an SM2 signature; r and s must be in [1, n-1] (checked by the `sm2` crate).
pub fn sm2_signature(r: &[u8; 32], s: &[u8; 32], encoding: Sm2Encoding) -> Result<Vec<u8>, Error> {
    let sig = sm2::dsa::Signature::from_scalars(*r, *s)
        .map_err(|_| Error::Encoding("the key returned an invalid SM2 signature".to_owned()))?;
    Ok(match encoding {
        Sm2Encoding::Raw => sig.to_bytes().to_vec(),
        Sm2Encoding::Der => sig.to_der().to_bytes().into_vec(),
    })
}

/// `DigestInfo ::= SEQUENCE { digestAlgorithm AlgorithmIdentifier, digest OCTET STRING }`
/// (RFC 8017 §9.2), what an RSA container signs.
pub fn digest_info(hash: HashAlg, digest: &[u8]) -> Result<Vec<u8>, Error> {
    if digest.len() != hash.output_len() {
        return Err(Error::InvalidInput(format!(
            "a {hash:?} digest is {} bytes, got {}",
            hash.output_len(),
            digest.len()
        )));
    }
    let info = DigestInfo {
        algorithm: AlgorithmIdentifierRef {
            oid: hash.oid(),
            parameters: Some(AnyRef::NULL),
        },
        digest: OctetStringRef::new(digest).map_err(|e| Error::Encoding(e.to_string()))?,
    };
    info.to_der().map_err(|e| Error::Encoding(e.to_string()))
}

struct DigestInfo<'a> {
    algorithm: AlgorithmIdentifierRef<'a>,
    digest: &'a OctetStringRef,
}

impl FixedTag for DigestInfo<'_> {
    const TAG: Tag = Tag::Sequence;
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

#[cfg(test)]
mod tests {
    use super::*;
    use sm2::dsa::signature::hazmat::PrehashSigner as _;
    use sm2::dsa::signature::Verifier as _;

    /// Our e, signed as a prehash, must verify as a signature over the *message* with the
    /// `sm2` crate's own Z: the two Z computations agree.
    #[test]
    fn our_e_matches_the_sm2_crates_own_hashing() {
        let secret = sm2::SecretKey::from_slice(&[0x42; 32]).expect("scalar");
        let public = secret.public_key().to_sec1_bytes();
        for id in [DEFAULT_SM2_USER_ID, "ALICE123@YAHOO.COM", "张三"] {
            let e = sm2_e(&public, id, b"message digest").expect("e");
            let signer = sm2::dsa::SigningKey::new(id, &secret).expect("key");
            let sig: sm2::dsa::Signature = signer.sign_prehash(&e).expect("sign");
            signer
                .verifying_key()
                .verify(b"message digest", &sig)
                .expect("the sm2 crate agrees on Z and e");
        }
    }

    #[test]
    fn encodings_hold_the_same_r_and_s() {
        let (r, s) = ([0x11u8; 32], [0x22u8; 32]);
        let raw = sm2_signature(&r, &s, Sm2Encoding::Raw).expect("raw");
        assert_eq!(&raw[..32], &r);
        assert_eq!(&raw[32..], &s);
        let der = sm2_signature(&r, &s, Sm2Encoding::Der).expect("der");
        assert_eq!(der[0], 0x30);
        let back = sm2::dsa::Signature::from_der(&der).expect("parse");
        assert_eq!(back.to_bytes().as_slice(), raw.as_slice());
        assert!(
            sm2_signature(&[0; 32], &s, Sm2Encoding::Der).is_err(),
            "r = 0"
        );
    }

    #[test]
    fn digest_info_matches_rfc8017_prefix() {
        let d = HashAlg::Sha256.digest(b"abc");
        let info = digest_info(HashAlg::Sha256, &d).expect("encode");
        assert_eq!(
            hex::encode(&info[..19]),
            "3031300d060960864801650304020105000420"
        );
        assert!(digest_info(HashAlg::Sha256, &d[..31]).is_err());
    }
}
