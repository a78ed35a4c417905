//! Signing: check the request, log in once, pick a mechanism per input, sign N inputs. A key
//! with CKA_ALWAYS_AUTHENTICATE signs by the specification: C_SignInit, then
//! C_Login(CKU_CONTEXT_SPECIFIC), then one single-part C_Sign (see `crate::raw`).

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::types::Ulong;

use super::{pin_status, Found, Worker};
use crate::algorithm::{
    check_input, digest_info, ecdsa_p1363_to_der, EcdsaEncoding, HashAlg, SignAlgorithm, SignInput,
};
use crate::certificate::KeyAlgorithm;
use crate::error::{from_cryptoki, Error, SignFailure};
use crate::module::{Progress, SignJob};
use crate::pin::{Credential, LoginKind};
use crate::token::TokenId;

impl Worker {
    pub(super) fn sign(&mut self, job: SignJob) -> Result<Vec<Vec<u8>>, SignFailure> {
        let SignJob {
            req,
            credential,
            progress,
            cancel,
        } = job;
        let span = tracing::info_span!(
            "sign",
            certificate = %req.certificate,
            algorithm = %req.algorithm.name(),
            inputs = req.inputs.len()
        );
        let _entered = span.enter();
        let token = req.certificate.token_id().clone();
        let mut completed = Vec::with_capacity(req.inputs.len());

        let result = self.sign_batch(
            &token,
            &req,
            &credential,
            progress.as_ref(),
            &|| cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)),
            &mut completed,
        );
        drop(credential);
        if let Err(e) = &result {
            if e.is_removal() {
                self.forget(&token);
            } else if !matches!(
                e,
                Error::InvalidInput(_)
                    | Error::MechanismNotSupported { .. }
                    | Error::LoginRequired { .. }
            ) {
                // An operation may still be active in the session (say, a context login that
                // failed after C_SignInit): continue in a fresh session, keeping the login.
                self.renew_session(&token);
            }
        }
        if req.logout_after {
            if let Err(e) = self.logout(&token) {
                tracing::warn!(token = %token, error = %e, "C_Logout after the request failed");
            }
        }
        match result {
            Ok(()) => {
                tracing::info!(signatures = completed.len(), "signed");
                Ok(completed)
            }
            Err(error) => {
                tracing::info!(error = %error, completed = completed.len(), "signing stopped");
                Err(SignFailure { error, completed })
            }
        }
    }

    fn sign_batch(
        &mut self,
        token: &TokenId,
        req: &crate::algorithm::SignRequest,
        credential: &Credential,
        progress: Option<&mpsc::Sender<Progress>>,
        cancelled: &dyn Fn() -> bool,
        completed: &mut Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        // Everything that can be checked without the token is checked first.
        if req.inputs.is_empty() {
            return Err(Error::InvalidInput("nothing to sign".to_owned()));
        }
        for input in &req.inputs {
            check_input(req.algorithm, input)?;
        }
        // The one health probe of the request (its C_GetTokenInfo serves every step up to the
        // login): a token that moved is found in its new slot, a removed one fails here.
        let found = self.find(token)?;
        let entry = self.entry_at(&req.certificate, &found)?;
        let key_alg = entry.info.key_algorithm;
        check_key(req.algorithm, key_alg)?;
        let mechanisms = self.mechanisms_at(token, found.slot)?;
        // Fail on an unsupported mechanism before any login.
        for input in &req.inputs {
            plan(req.algorithm, input, &mechanisms)?;
        }

        if cancelled() {
            return Err(Error::Cancelled);
        }
        let mut found = self.ensure_user_login(token, found, credential)?;

        // After login the private key is visible; scan again if it was not before.
        let entry = match entry.private_key {
            Some(_) => entry,
            None => self.entry_at(&req.certificate, &found)?,
        };
        let key = entry.private_key.ok_or(Error::KeyNotFound)?;
        let always_auth = entry.info.always_authenticate;
        // An always-authenticate key: the credential serves one signature's context login.
        let mut context_credential = Some(credential);

        let total = req.inputs.len();
        for (i, input) in req.inputs.iter().enumerate() {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let planned = plan(req.algorithm, input, &mechanisms)?;
            let raw = if always_auth {
                let credential = context_credential
                    .take()
                    .filter(|c| c.is_some())
                    .ok_or_else(|| Error::LoginRequired {
                        kind: LoginKind::ContextSpecific,
                        pin: pin_status(&found.info),
                        pin_pad: found.info.protected_authentication_path(),
                    })?;
                self.sign_always_authenticate(token, &mut found, key, &planned, credential)?
            } else {
                self.cached_session(token)?
                    .sign(&planned.mech.to_cryptoki(), key, &planned.data)
                    .map_err(from_cryptoki)?
            };
            let sig = match req.algorithm {
                SignAlgorithm::Ecdsa(_, EcdsaEncoding::Der) => {
                    check_ecdsa_len(&raw, key_alg)?;
                    ecdsa_p1363_to_der(&raw)?
                }
                SignAlgorithm::Ecdsa(_, EcdsaEncoding::P1363) => {
                    check_ecdsa_len(&raw, key_alg)?;
                    raw
                }
                _ => raw,
            };
            completed.push(sig);
            if let Some(p) = progress {
                // The receiver may be gone (a caller that stopped listening); signing goes on.
                let _ = p.send(Progress { done: i + 1, total });
            }
        }
        Ok(())
    }

    /// One signature with a CKA_ALWAYS_AUTHENTICATE key: C_SignInit, C_Login
    /// (CKU_CONTEXT_SPECIFIC) with the credential, then a single-part C_Sign. A failed login
    /// leaves the operation active; the caller renews the session.
    pub(super) fn sign_always_authenticate(
        &mut self,
        token: &TokenId,
        found: &mut Found,
        key: ObjectHandle,
        planned: &Planned,
        credential: &Credential,
    ) -> Result<Vec<u8>, Error> {
        if self.raw.is_none() {
            return Err(Error::MechanismNotSupported {
                algorithm: format!(
                    "{} on a key that asks for the PIN per signature (the module's C_Sign \
                     could not be loaded)",
                    planned.mech.algorithm_name()
                ),
                key: "this".to_owned(),
            });
        }
        self.cached_session(token)?
            .sign_init(&planned.mech.to_cryptoki(), key)
            .map_err(from_cryptoki)?;
        self.login(token, found, LoginKind::ContextSpecific, credential)?;
        let session = self.cached_session(token)?;
        let raw = self.raw.as_ref().ok_or(Error::WorkerGone)?;
        raw.sign(session, &planned.data).map_err(from_cryptoki)
    }

    /// The token's open session, without the health probe (inside a batch).
    pub(super) fn cached_session(
        &self,
        token: &TokenId,
    ) -> Result<&cryptoki::session::Session, Error> {
        self.tokens
            .get(token)
            .and_then(|s| s.session.as_ref())
            .ok_or(Error::TokenNotPresent)
    }
}

/// A mechanism choice, free of cryptoki's borrowed parameter types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mech {
    /// CKM_RSA_PKCS over a DigestInfo.
    RsaPkcs,
    /// CKM_SHAxxx_RSA_PKCS over the message.
    ShaRsaPkcs(HashAlg),
    /// CKM_RSA_PKCS_PSS over a digest.
    RsaPss(HashAlg),
    /// CKM_SHAxxx_RSA_PKCS_PSS over the message.
    ShaRsaPss(HashAlg),
    /// CKM_ECDSA over a digest.
    Ecdsa,
    /// CKM_ECDSA_SHAxxx over the message.
    EcdsaSha(HashAlg),
    /// CKM_EDDSA (pure) over the message.
    Eddsa,
}

impl Mech {
    /// A short human name: what is signed, and how.
    fn algorithm_name(self) -> String {
        match self {
            Mech::RsaPkcs => "RSA PKCS#1 v1.5 over a digest".to_owned(),
            Mech::ShaRsaPkcs(h) => format!("RSA PKCS#1 v1.5 with {}", h.name()),
            Mech::RsaPss(h) => format!("RSA-PSS over a {} digest", h.name()),
            Mech::ShaRsaPss(h) => format!("RSA-PSS with {}", h.name()),
            Mech::Ecdsa => "ECDSA over a digest".to_owned(),
            Mech::EcdsaSha(h) => format!("ECDSA with {}", h.name()),
            Mech::Eddsa => "EdDSA".to_owned(),
        }
    }

    fn mechanism_type(self) -> MechanismType {
        match self {
            Mech::RsaPkcs => MechanismType::RSA_PKCS,
            Mech::ShaRsaPkcs(HashAlg::Sha256) => MechanismType::SHA256_RSA_PKCS,
            Mech::ShaRsaPkcs(HashAlg::Sha384) => MechanismType::SHA384_RSA_PKCS,
            Mech::ShaRsaPkcs(HashAlg::Sha512) => MechanismType::SHA512_RSA_PKCS,
            Mech::RsaPss(_) => MechanismType::RSA_PKCS_PSS,
            Mech::ShaRsaPss(HashAlg::Sha256) => MechanismType::SHA256_RSA_PKCS_PSS,
            Mech::ShaRsaPss(HashAlg::Sha384) => MechanismType::SHA384_RSA_PKCS_PSS,
            Mech::ShaRsaPss(HashAlg::Sha512) => MechanismType::SHA512_RSA_PKCS_PSS,
            Mech::Ecdsa => MechanismType::ECDSA,
            Mech::EcdsaSha(HashAlg::Sha256) => MechanismType::ECDSA_SHA256,
            Mech::EcdsaSha(HashAlg::Sha384) => MechanismType::ECDSA_SHA384,
            Mech::EcdsaSha(HashAlg::Sha512) => MechanismType::ECDSA_SHA512,
            Mech::Eddsa => MechanismType::EDDSA,
        }
    }

    pub(super) fn to_cryptoki(self) -> Mechanism<'static> {
        match self {
            Mech::RsaPkcs => Mechanism::RsaPkcs,
            Mech::ShaRsaPkcs(HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
            Mech::ShaRsaPkcs(HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
            Mech::ShaRsaPkcs(HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
            Mech::RsaPss(h) => Mechanism::RsaPkcsPss(pss_params(h)),
            Mech::ShaRsaPss(h @ HashAlg::Sha256) => Mechanism::Sha256RsaPkcsPss(pss_params(h)),
            Mech::ShaRsaPss(h @ HashAlg::Sha384) => Mechanism::Sha384RsaPkcsPss(pss_params(h)),
            Mech::ShaRsaPss(h @ HashAlg::Sha512) => Mechanism::Sha512RsaPkcsPss(pss_params(h)),
            Mech::Ecdsa => Mechanism::Ecdsa,
            Mech::EcdsaSha(HashAlg::Sha256) => Mechanism::EcdsaSha256,
            Mech::EcdsaSha(HashAlg::Sha384) => Mechanism::EcdsaSha384,
            Mech::EcdsaSha(HashAlg::Sha512) => Mechanism::EcdsaSha512,
            Mech::Eddsa => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        }
    }
}

/// PSS with MGF1 over the same hash and a salt as long as the hash.
fn pss_params(h: HashAlg) -> PkcsPssParams {
    let (hash_alg, mgf) = match h {
        HashAlg::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        HashAlg::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
        HashAlg::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
    };
    PkcsPssParams {
        hash_alg,
        mgf,
        s_len: Ulong::from(h.output_len() as u64),
    }
}

/// What to call C_Sign with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Planned {
    pub(super) mech: Mech,
    pub(super) data: Vec<u8>,
}

/// Picks the mechanism for one input: the token's combined hash-and-sign mechanism for a
/// message when it offers one, else hash here and use the raw mechanism. An empty
/// `offered` list means "unknown": the raw mechanisms are tried.
pub(super) fn plan(
    alg: SignAlgorithm,
    input: &SignInput,
    offered: &[MechanismType],
) -> Result<Planned, Error> {
    let has = |m: Mech| offered.contains(&m.mechanism_type());
    let has_or_unknown = |m: Mech| offered.is_empty() || has(m);
    let unsupported = || Error::MechanismNotSupported {
        algorithm: alg.name(),
        key: "this token".to_owned(),
    };
    let digest = |h: HashAlg| match input {
        SignInput::Digest(d) => d.clone(),
        SignInput::Data(m) => h.digest(m),
    };
    let (combined, raw) = match alg {
        SignAlgorithm::RsaPkcs1v15(h) => (Mech::ShaRsaPkcs(h), Mech::RsaPkcs),
        SignAlgorithm::RsaPss(h) => (Mech::ShaRsaPss(h), Mech::RsaPss(h)),
        SignAlgorithm::Ecdsa(h, _) => (Mech::EcdsaSha(h), Mech::Ecdsa),
        SignAlgorithm::Ed25519 => {
            return match input {
                SignInput::Data(m) if has_or_unknown(Mech::Eddsa) => Ok(Planned {
                    mech: Mech::Eddsa,
                    data: m.clone(),
                }),
                SignInput::Data(_) => Err(unsupported()),
                SignInput::Digest(_) => Err(Error::InvalidInput(
                    "Ed25519 signs the message itself, not a digest".to_owned(),
                )),
            };
        }
    };
    if let SignInput::Data(m) = input {
        if has(combined) {
            return Ok(Planned {
                mech: combined,
                data: m.clone(),
            });
        }
    }
    if !has_or_unknown(raw) {
        return Err(unsupported());
    }
    let Some(h) = alg.hash() else {
        return Err(unsupported());
    };
    let d = digest(h);
    let data = match raw {
        Mech::RsaPkcs => digest_info(h, &d)?,
        _ => d,
    };
    Ok(Planned { mech: raw, data })
}

/// Refuses an algorithm the key cannot do.
pub(super) fn check_key(alg: SignAlgorithm, key: KeyAlgorithm) -> Result<(), Error> {
    let ok = matches!(
        (alg, key),
        (
            SignAlgorithm::RsaPkcs1v15(_) | SignAlgorithm::RsaPss(_),
            KeyAlgorithm::Rsa { .. }
        ) | (
            SignAlgorithm::Ecdsa(..),
            KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 | KeyAlgorithm::EcP521
        ) | (SignAlgorithm::Ed25519, KeyAlgorithm::Ed25519)
    );
    if ok {
        Ok(())
    } else {
        Err(Error::MechanismNotSupported {
            algorithm: alg.name(),
            key: key.wire_name(),
        })
    }
}

/// PKCS#11 returns ECDSA signatures as r‖s with both halves the curve's size.
pub(super) fn check_ecdsa_len(sig: &[u8], key: KeyAlgorithm) -> Result<(), Error> {
    match key.ec_field_len() {
        Some(n) if sig.len() == 2 * n => Ok(()),
        _ => Err(Error::InvalidInput(format!(
            "the token returned a {}-byte ECDSA signature for a {} key",
            sig.len(),
            key.wire_name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOFTHSM_LIKE: &[MechanismType] = &[
        MechanismType::RSA_PKCS,
        MechanismType::SHA256_RSA_PKCS,
        MechanismType::SHA384_RSA_PKCS,
        MechanismType::SHA512_RSA_PKCS,
        MechanismType::RSA_PKCS_PSS,
        MechanismType::SHA256_RSA_PKCS_PSS,
        MechanismType::ECDSA,
        MechanismType::EDDSA,
    ];

    #[test]
    fn messages_use_hash_and_sign_when_offered() {
        let p = plan(
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha384),
            &SignInput::Data(b"hello".to_vec()),
            SOFTHSM_LIKE,
        )
        .expect("plan");
        assert_eq!(p.mech, Mech::ShaRsaPkcs(HashAlg::Sha384));
        assert_eq!(p.data, b"hello");
    }

    #[test]
    fn digests_use_the_raw_mechanism_with_a_digest_info() {
        let d = HashAlg::Sha256.digest(b"hello");
        let p = plan(
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            &SignInput::Digest(d.clone()),
            SOFTHSM_LIKE,
        )
        .expect("plan");
        assert_eq!(p.mech, Mech::RsaPkcs);
        assert_eq!(p.data, digest_info(HashAlg::Sha256, &d).expect("di"));
    }

    #[test]
    fn ecdsa_without_combined_mechanism_hashes_in_software() {
        let p = plan(
            SignAlgorithm::Ecdsa(HashAlg::Sha384, EcdsaEncoding::Der),
            &SignInput::Data(b"m".to_vec()),
            SOFTHSM_LIKE,
        )
        .expect("plan");
        assert_eq!(p.mech, Mech::Ecdsa);
        assert_eq!(p.data, HashAlg::Sha384.digest(b"m"));
    }

    #[test]
    fn pss_with_a_hash_the_token_does_not_combine_falls_back_to_raw_pss() {
        let p = plan(
            SignAlgorithm::RsaPss(HashAlg::Sha512),
            &SignInput::Data(b"m".to_vec()),
            SOFTHSM_LIKE,
        )
        .expect("plan");
        assert_eq!(p.mech, Mech::RsaPss(HashAlg::Sha512));
        assert_eq!(p.data, HashAlg::Sha512.digest(b"m"));
        let params = pss_params(HashAlg::Sha512);
        assert_eq!(params.hash_alg, MechanismType::SHA512);
    }

    #[test]
    fn missing_mechanisms_are_reported_before_signing() {
        let only_rsa = [MechanismType::RSA_PKCS];
        let e = plan(
            SignAlgorithm::Ed25519,
            &SignInput::Data(b"m".to_vec()),
            &only_rsa,
        );
        assert!(matches!(e, Err(Error::MechanismNotSupported { .. })));
        let e = plan(
            SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::P1363),
            &SignInput::Data(b"m".to_vec()),
            &only_rsa,
        );
        assert!(matches!(e, Err(Error::MechanismNotSupported { .. })));
    }

    #[test]
    fn ed25519_signs_messages_only() {
        let p = plan(SignAlgorithm::Ed25519, &SignInput::Data(b"m".to_vec()), &[]).expect("plan");
        assert_eq!(p.mech, Mech::Eddsa);
        assert!(matches!(
            plan(SignAlgorithm::Ed25519, &SignInput::Digest(vec![0; 32]), &[]),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn algorithms_must_fit_the_key() {
        assert!(check_key(
            SignAlgorithm::RsaPss(HashAlg::Sha256),
            KeyAlgorithm::Rsa { bits: 2048 }
        )
        .is_ok());
        assert!(check_key(
            SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
            KeyAlgorithm::Rsa { bits: 2048 }
        )
        .is_err());
        assert!(check_key(SignAlgorithm::Ed25519, KeyAlgorithm::EcP256).is_err());
    }
}
