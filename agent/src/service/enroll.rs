//! `keys.generate` and `certificates.import`: enrolment from a CA's portal. Each is one consent
//! dialog with the PIN (the same loop as signing: ask → act with that answer → on a wrong PIN
//! ask again with the token's warning → stop at anything else), then the token's work, then an
//! audit record.
//!
//! The token side is PKCS#11 ([`pkcs11_shim::Module::generate_key`] and friends) or SKF
//! (`skf_shim::Library::generate_sm2` / `import_certificate`, in [`skf`]):
//! [`Service::enrolment_token`] is where the back end is chosen, and [`key_generation`] says
//! which key types each makes (SM2 on SKF keys only, the others on PKCS#11 tokens only; a
//! mismatch is ALGORITHM_NOT_SUPPORTED before any dialog).

pub(crate) mod skf;

use std::sync::Arc;

use browser_bridge::protocol::{
    Answer, Base64Bytes, CertificatesImportParams, CertificatesImportResult, GenerateAlgorithm,
    KeysGenerateParams, KeysGenerateResult,
};
use browser_bridge::RequestContext;
use der::Decode as _;
use pkcs11_shim::{
    DeleteKeyRequest, GenerateRequest, ImportMode, ImportRequest, KeySignRequest, KeySpec,
    LoginState, SignInput, TokenId,
};
use sha2::Digest as _;

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::backend::{self, Backend, TokenError};
use crate::consent::{
    self, credential as credential_from, first_question, DialogBuilder, Next, Scope,
};
use crate::dialog::{KeyCertificate, ShownCertificate, Unlock};
use crate::enroll::{self, NewKeyType};

use super::{blocking, common_name, Failure, Service};

/// A PKCS#11 token enrolment works on.
struct EnrolmentToken {
    module: pkcs11_shim::Module,
    id: TokenId,
    label: String,
}

/// The token a `tokenId` names, by back end.
enum Enrolment {
    Pkcs11(EnrolmentToken),
    Skf(skf::SkfToken),
}

impl Service {
    pub(super) async fn keys_generate(
        &self,
        ctx: &RequestContext,
        p: KeysGenerateParams,
    ) -> Result<Answer, Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let operation = Operation::KeysGenerate;
        let result = self.generate_with(ctx, &p).await;
        match result {
            Ok((key_id, csr, signed_digest)) => {
                // The request leaves only with its durable audit record.
                self.audit_durable(
                    AuditRecord::new(origin, operation)
                        .digest(&signed_digest)
                        .outcome(Outcome::Granted),
                )
                .await?;
                Ok(Answer::of(&KeysGenerateResult {
                    key_id,
                    csr: Base64Bytes(csr),
                }))
            }
            Err(e) => Err(self.audit_failure(&origin, &operation, e).await),
        }
    }

    /// Consent and PIN, the key pair, then the certificate request signed by the new key.
    /// Returns the key id, the DER request and the SHA-256 of what the key signed.
    async fn generate_with(
        &self,
        ctx: &RequestContext,
        p: &KeysGenerateParams,
    ) -> Result<(String, Vec<u8>, Vec<u8>), Failure> {
        let subject = p.subject.as_str().to_owned();
        enroll::check_subject(&subject).map_err(|e| Failure::InvalidParams(e.to_string()))?;
        let token = match (
            self.enrolment_token(&p.token_id).await?,
            key_generation(p.algorithm),
        ) {
            (Enrolment::Pkcs11(token), NewKeyType::Pkcs11(spec)) => (token, spec),
            (Enrolment::Skf(token), NewKeyType::Sm2) => {
                return self.generate_sm2(ctx, p, token).await
            }
            (Enrolment::Pkcs11(_), NewKeyType::Sm2) => {
                return Err(Failure::Algorithm(
                    "this token cannot generate SM2 keys (SM2 keys are made on SKF keys)".into(),
                ))
            }
            (Enrolment::Skf(_), other) => {
                return Err(Failure::Algorithm(format!(
                    "an SKF key generates SM2 keys, not {}",
                    other.wire_name()
                )))
            }
        };
        let (token, spec) = token;
        let always_authenticate = p.always_authenticate.unwrap_or(false);
        let logout_after = self.config.pin_cache_seconds == 0;

        let origin = ctx.origin.as_str().to_owned();
        let label = token.label.clone();
        let algorithm = spec.wire_name();
        let shown_subject = subject.clone();
        let (origin2, label2, subject2) = (origin.clone(), label.clone(), subject.clone());
        let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            texts.generate_key(&origin, &label, None, &algorithm, &shown_subject, unlock)
        });
        // Only a key that asks for its PIN at every signature shows this one.
        let build_request: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            texts.sign_new_key_request(&origin2, &label2, &subject2, unlock)
        });

        let module = token.module.clone();
        let request = GenerateRequest {
            token: token.id.clone(),
            spec,
            label: p.label.as_str().to_owned(),
            always_authenticate,
            // The request's signature follows with the same login.
            logout_after: false,
        };
        // A type the token cannot make is refused before anyone is asked.
        let (m, id) = (module.clone(), token.id.clone());
        blocking(move || m.check_generation(&id, spec))
            .await?
            .map_err(|e| generation_failure(e, spec))?;
        let first = self.first_enrolment_question(&token).await?;
        let m = module.clone();
        let key = self
            .with_consent(ctx, &build, first, move |credential| {
                Ok(m.generate_key(request.clone(), credential.into_pkcs11())?)
            })
            .await
            .map_err(|e| match e {
                Failure::Token(e) => generation_failure(e, spec),
                other => other,
            });
        let key = match key {
            Ok(key) => key,
            Err(e) => {
                self.end_enrolment(&module, &token.id, logout_after).await;
                return Err(e);
            }
        };
        tracing::info!(key = %key.id, "key pair generated on the token");

        let result = async {
            let pending = enroll::request(&subject, &key.public_key_der)
                .map_err(|e| Failure::Internal(format!("certificate request: {e}")))?;
            let algorithm = pending.signature().pkcs11_algorithm().ok_or_else(|| {
                Failure::Algorithm("SM2 requests are made on SKF keys, not PKCS#11 tokens".into())
            })?;
            let message = pending.message().to_vec();
            let signed_digest = sha2::Sha256::digest(&message).to_vec();
            let sign = KeySignRequest {
                key: key.id.clone(),
                algorithm,
                input: SignInput::Data(message),
                // The login stays for an undo; `end_enrolment` ends it.
                logout_after: false,
            };
            // Logged in already: no dialog, unless the key asks for its PIN per signature.
            let m = module.clone();
            let signature = self
                .with_consent(ctx, &build_request, None, move |credential| {
                    Ok(m.sign_with_key(sign.clone(), credential.into_pkcs11())?)
                })
                .await?;
            let csr = pending
                .finish(&signature)
                .map_err(|e| Failure::Internal(format!("certificate request: {e}")))?;
            Ok((key.id.to_string(), csr, signed_digest))
        }
        .await;
        if let Err(e) = &result {
            // No request, no use for the key: a cancel here leaves nothing behind either.
            let (m, undo) = (
                module.clone(),
                DeleteKeyRequest {
                    key: key.id.clone(),
                    logout_after: false,
                },
            );
            match blocking(move || m.delete_new_key(undo)).await {
                Ok(Ok(())) => {
                    tracing::info!(key = %key.id, error = %e, "no certificate request: the new key is destroyed");
                }
                Ok(Err(undo)) => {
                    tracing::warn!(key = %key.id, error = %e, undo = %undo, "no certificate request, and the new key stays on the token");
                }
                Err(undo) => {
                    tracing::warn!(key = %key.id, error = %e, undo = %undo, "no certificate request, and the new key stays on the token");
                }
            }
        }
        self.end_enrolment(&module, &token.id, logout_after).await;
        result
    }

    pub(super) async fn certificates_import(
        &self,
        ctx: &RequestContext,
        p: CertificatesImportParams,
    ) -> Result<Answer, Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let der = p.certificate.0.clone();
        let cert = match x509_cert::Certificate::from_der(&der) {
            Ok(cert) => cert,
            Err(_) => {
                return Err(self
                    .audit_failure(
                        &origin,
                        &Operation::CertificatesImport,
                        Failure::InvalidParams("certificate is not a DER X.509 certificate".into()),
                    )
                    .await)
            }
        };
        let subject = cert.tbs_certificate().subject().to_string();
        let result = self.import_with(ctx, &p, &cert).await;
        let record =
            AuditRecord::new(origin, Operation::CertificatesImport).certificate(subject, &der);
        match result {
            Ok(id) => {
                self.audit_durable(record.outcome(Outcome::Granted)).await?;
                Ok(Answer::of(&CertificatesImportResult { certificate_id: id }))
            }
            Err(e) => {
                self.audit(record.outcome(e.outcome())).await;
                Err(e)
            }
        }
    }

    async fn import_with(
        &self,
        ctx: &RequestContext,
        p: &CertificatesImportParams,
        cert: &x509_cert::Certificate,
    ) -> Result<String, Failure> {
        let token = match self.enrolment_token(&p.token_id).await? {
            Enrolment::Pkcs11(token) => token,
            Enrolment::Skf(token) => return self.import_sm2(ctx, p, cert, token).await,
        };
        let replace = p.replace.unwrap_or(false);
        let logout_after = self.config.pin_cache_seconds == 0;
        // A renewal for the same key: the dialog says what becomes of the present certificate.
        let listed = token
            .module
            .certificates_async(Some(&token.id))
            .await
            .map_err(|e| Failure::Token(e.into()))?;
        let renewal = listed
            .iter()
            .any(|c| c.der != p.certificate.0 && enroll::same_key(&c.der, cert));
        let old = match (renewal, replace) {
            (false, _) => KeyCertificate::None,
            (true, false) => KeyCertificate::KeptBeside,
            (true, true) => KeyCertificate::Replaced,
        };
        let tbs = cert.tbs_certificate();
        let origin = ctx.origin.as_str().to_owned();
        let label = token.label.clone();
        let subject = tbs.subject().to_string();
        let issuer = common_name(&tbs.issuer().to_string());
        let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            let cert = ShownCertificate {
                subject: &subject,
                issuer: &issuer,
                ..Default::default()
            };
            texts.import_certificate(&origin, &label, None, cert, old, unlock)
        });
        let request = ImportRequest {
            token: token.id.clone(),
            der: p.certificate.0.clone(),
            mode: if replace {
                ImportMode::Replace
            } else {
                ImportMode::KeepExisting
            },
            logout_after,
        };
        let first = self.first_enrolment_question(&token).await?;
        let module = token.module.clone();
        let m = module.clone();
        let imported = self
            .with_consent(ctx, &build, first, move |credential| {
                Ok(m.import_certificate(request.clone(), credential.into_pkcs11())?)
            })
            .await;
        self.end_enrolment(&module, &token.id, logout_after).await;
        Ok(imported?.certificate.id.to_string())
    }

    /// The token a `tokenId` names, as enrolment sees it: a PKCS#11 token or an SKF key.
    async fn enrolment_token(&self, token_id: &str) -> Result<Enrolment, Failure> {
        let id: backend::TokenId = token_id.parse().map_err(|_| {
            Failure::InvalidParams("tokenId is not a token id of this agent".into())
        })?;
        let tokens = self.tokens.clone();
        let view = blocking(move || tokens.token(&id))
            .await?
            .ok_or(Failure::Token(TokenError::TokenNotPresent))?;
        match (view.module, view.info.id) {
            (Backend::Pkcs11(module), backend::TokenId::Pkcs11(id)) => {
                Ok(Enrolment::Pkcs11(EnrolmentToken {
                    module,
                    id,
                    label: view.info.label.trim().to_owned(),
                }))
            }
            (Backend::Skf(library), backend::TokenId::Skf(id)) => {
                Ok(Enrolment::Skf(skf::SkfToken {
                    library,
                    id,
                    label: view.info.label.trim().to_owned(),
                }))
            }
            _ => Err(Failure::Internal(
                "a token's id and its library are of different back ends".into(),
            )),
        }
    }

    /// Enrolment always asks the user: a PIN dialog, or a confirmation when the token is
    /// logged in (PIN cache) or has a PIN pad. A locked PIN stops before any dialog.
    async fn first_enrolment_question(
        &self,
        token: &EnrolmentToken,
    ) -> Result<Option<Unlock>, Failure> {
        let state = token
            .module
            .login_state_async(&token.id)
            .await
            .map_err(|e| Failure::Token(e.into()))?;
        if state == LoginState::Locked {
            return Err(Failure::Token(TokenError::PinLocked));
        }
        Ok(first_question(state, false))
    }

    /// The consent loop around one token job: ask `first` (if any) → run the job with that
    /// answer → on a wrong PIN, or a login the answer could not serve, ask again → stop at
    /// anything else. Never retries a PIN by itself.
    async fn with_consent<T: Send + 'static>(
        &self,
        ctx: &RequestContext,
        build: &DialogBuilder,
        first: Option<Unlock>,
        job: impl Fn(backend::Credential) -> Result<T, TokenError> + Send + Sync + Clone + 'static,
    ) -> Result<T, Failure> {
        let mut question = first;
        let mut last = None;
        loop {
            let mut credential = backend::Credential::None;
            if let Some(unlock) = question.take() {
                let consent = self.ask(ctx, build, unlock, Scope::All).await?;
                credential = credential_from(consent, unlock);
                last = Some(unlock);
            }
            let job = job.clone();
            match blocking(move || job(credential)).await? {
                Ok(v) => return Ok(v),
                Err(error) => match consent::after(error, last) {
                    Next::Ask(unlock) => question = Some(unlock),
                    Next::Stop(error) => return Err(Failure::Token(error)),
                },
            }
        }
    }

    /// Ends an enrolment's login: now (before the answer, so that no later request races
    /// with it) without a PIN cache, else when the cache expires.
    async fn end_enrolment(&self, module: &pkcs11_shim::Module, token: &TokenId, logout_now: bool) {
        if logout_now {
            let (module, token) = (module.clone(), token.clone());
            let result = blocking(move || module.logout(&token)).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "C_Logout after enrolment failed");
            }
        } else {
            self.schedule_logout(
                Backend::Pkcs11(module.clone()),
                backend::TokenId::Pkcs11(token.clone()),
            );
        }
    }
}

/// ALGORITHM_NOT_SUPPORTED in the protocol's words for a key type the token cannot make.
pub(crate) fn generation_failure(e: impl Into<TokenError>, spec: KeySpec) -> Failure {
    match e.into() {
        TokenError::MechanismNotSupported { .. } => Failure::Algorithm(format!(
            "this token cannot generate {} keys",
            spec.wire_name()
        )),
        other => Failure::Token(other),
    }
}

/// The key type for a wire algorithm.
pub(crate) fn key_generation(algorithm: GenerateAlgorithm) -> NewKeyType {
    match algorithm {
        GenerateAlgorithm::EcP256 => NewKeyType::Pkcs11(KeySpec::EcP256),
        GenerateAlgorithm::EcP384 => NewKeyType::Pkcs11(KeySpec::EcP384),
        GenerateAlgorithm::Rsa2048 => NewKeyType::Pkcs11(KeySpec::Rsa { bits: 2048 }),
        GenerateAlgorithm::Rsa3072 => NewKeyType::Pkcs11(KeySpec::Rsa { bits: 3072 }),
        GenerateAlgorithm::Ed25519 => NewKeyType::Pkcs11(KeySpec::Ed25519),
        GenerateAlgorithm::Sm2 => NewKeyType::Sm2,
    }
}
