//! Origin-bound login in Web eID's authentication token format (`web-eid:1.0`).
//!
//! The token signs `H(H(origin) ‖ H(challenge))`: the algorithm's hash over the concatenation of
//! the hashes of the origin (the Origin header's value, UTF-8) and of the nonce *string as
//! received*. A response made for one site therefore fails at another, and relying parties check
//! it with Web eID's published validation libraries unchanged.

use crate::backend::{EcdsaEncoding, HashAlg, KeyAlgorithm, SignAlgorithm};
use sha2::{Digest, Sha256};

/// The smallest nonce a relying party may send, once decoded.
pub const MIN_NONCE_BYTES: usize = 32;

/// A JWA algorithm name and how the token makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginAlgorithm {
    pub jwa: &'static str,
    pub hash: LoginHash,
    pub sign: SignAlgorithm,
}

/// The H of `H(origin) ‖ H(challenge)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginHash {
    Sha(HashAlg),
    /// SM3, for SM2 keys (which then sign e = SM3(Z ‖ that message), default user ID).
    Sm3,
}

impl LoginHash {
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            LoginHash::Sha(h) => h.digest(data),
            LoginHash::Sm3 => {
                use sm3::Digest as _;
                sm3::Sm3::digest(data).to_vec()
            }
        }
    }
}

/// Picks the algorithm for a key: P-256 → ES256, P-384 → ES384, P-521 → ES512, RSA → RS256 (PS256
/// when asked), Ed25519 → EdDSA. `requested` is the page's `algorithm`, if any.
pub fn algorithm_for(key: KeyAlgorithm, requested: Option<&str>) -> Result<LoginAlgorithm, String> {
    let ecdsa = |jwa, hash| LoginAlgorithm {
        jwa,
        hash: LoginHash::Sha(hash),
        sign: SignAlgorithm::Ecdsa(hash, EcdsaEncoding::P1363),
    };
    let chosen = match key {
        KeyAlgorithm::EcP256 => ecdsa("ES256", HashAlg::Sha256),
        KeyAlgorithm::EcP384 => ecdsa("ES384", HashAlg::Sha384),
        KeyAlgorithm::EcP521 => ecdsa("ES512", HashAlg::Sha512),
        KeyAlgorithm::Rsa { .. } => match requested {
            Some("PS256") => LoginAlgorithm {
                jwa: "PS256",
                hash: LoginHash::Sha(HashAlg::Sha256),
                sign: SignAlgorithm::RsaPss(HashAlg::Sha256),
            },
            Some("PS384") => LoginAlgorithm {
                jwa: "PS384",
                hash: LoginHash::Sha(HashAlg::Sha384),
                sign: SignAlgorithm::RsaPss(HashAlg::Sha384),
            },
            Some("RS384") => LoginAlgorithm {
                jwa: "RS384",
                hash: LoginHash::Sha(HashAlg::Sha384),
                sign: SignAlgorithm::RsaPkcs1v15(HashAlg::Sha384),
            },
            _ => LoginAlgorithm {
                jwa: "RS256",
                hash: LoginHash::Sha(HashAlg::Sha256),
                sign: SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            },
        },
        KeyAlgorithm::Ed25519 => LoginAlgorithm {
            jwa: "EdDSA",
            hash: LoginHash::Sha(HashAlg::Sha256),
            sign: SignAlgorithm::Ed25519,
        },
        // Outside Web eID's list, like EdDSA: SM3(origin) ‖ SM3(challenge), signed r ‖ s.
        KeyAlgorithm::Sm2 => LoginAlgorithm {
            jwa: "SM2",
            hash: LoginHash::Sm3,
            sign: SignAlgorithm::Sm2(EcdsaEncoding::P1363),
        },
    };
    match requested {
        Some(r) if r != chosen.jwa => Err(format!("the key makes {}, not {r}", chosen.jwa)),
        _ => Ok(chosen),
    }
}

/// The message the token signs with the algorithm's own hash-and-sign: `H(origin) ‖ H(challenge)`.
/// For EdDSA, H is SHA-256 and these 64 bytes are the signed message.
pub fn signed_message(alg: &LoginAlgorithm, origin: &str, challenge: &str) -> Vec<u8> {
    let mut out = match alg.sign {
        SignAlgorithm::Ed25519 => {
            let mut v = Sha256::digest(origin.as_bytes()).to_vec();
            v.extend_from_slice(&Sha256::digest(challenge.as_bytes()));
            return v;
        }
        _ => alg.hash.digest(origin.as_bytes()),
    };
    out.extend_from_slice(&alg.hash.digest(challenge.as_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_follow_the_key() {
        assert_eq!(
            algorithm_for(KeyAlgorithm::EcP256, None).map(|a| a.jwa),
            Ok("ES256")
        );
        assert_eq!(
            algorithm_for(KeyAlgorithm::EcP384, None).map(|a| a.jwa),
            Ok("ES384")
        );
        assert_eq!(
            algorithm_for(KeyAlgorithm::Rsa { bits: 2048 }, None).map(|a| a.jwa),
            Ok("RS256")
        );
        assert_eq!(
            algorithm_for(KeyAlgorithm::Rsa { bits: 2048 }, Some("PS256")).map(|a| a.jwa),
            Ok("PS256")
        );
        assert_eq!(
            algorithm_for(KeyAlgorithm::Ed25519, None).map(|a| a.jwa),
            Ok("EdDSA")
        );
        assert_eq!(
            algorithm_for(KeyAlgorithm::Sm2, None).map(|a| a.jwa),
            Ok("SM2")
        );
        assert!(algorithm_for(KeyAlgorithm::EcP256, Some("RS256")).is_err());
        assert!(algorithm_for(KeyAlgorithm::Sm2, Some("ES256")).is_err());
    }

    #[test]
    fn the_message_binds_origin_and_nonce_string() {
        let alg = algorithm_for(KeyAlgorithm::EcP384, None).expect("ES384");
        let m = signed_message(&alg, "https://a.example", "bm9uY2U=");
        assert_eq!(m.len(), 96);
        assert_eq!(
            &m[..48],
            HashAlg::Sha384.digest(b"https://a.example").as_slice()
        );
        assert_eq!(&m[48..], HashAlg::Sha384.digest(b"bm9uY2U=").as_slice());
        let other = signed_message(&alg, "https://b.example", "bm9uY2U=");
        assert_ne!(m, other);
        let ed = algorithm_for(KeyAlgorithm::Ed25519, None).expect("EdDSA");
        assert_eq!(signed_message(&ed, "https://a.example", "x").len(), 64);
    }
}
