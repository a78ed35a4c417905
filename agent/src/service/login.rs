//! `authenticate`: a Web eID login token signed with the user's certificate.

use std::sync::Arc;

use crate::backend::{SignInput, SignRequest, TokenError};
use browser_bridge::protocol::{Answer, AuthAlgorithm, AuthenticateParams, AuthenticateResult};
use browser_bridge::RequestContext;
use serde_json::Value;

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::consent::DialogBuilder;
use crate::dialog::Signer;
use crate::purpose::ConsentKind;
use crate::tokens::CertificateView;
use crate::webeid;

use super::{common_name, Failure, Service, VERSION};

impl Service {
    pub(super) async fn authenticate(
        &self,
        ctx: &RequestContext,
        p: AuthenticateParams,
    ) -> Result<Answer, Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let found = match &p.certificate_id {
            Some(id) => self.find_certificate(id).await,
            None => self.pick_login_certificate().await,
        };
        let cert = match found {
            Ok(cert) => cert,
            Err(e) => {
                return Err(self
                    .audit_failure(&origin, &Operation::Authenticate, e)
                    .await)
            }
        };
        let result = self.authenticate_with(ctx, &cert, &p).await;
        let mut record = AuditRecord::new(origin, Operation::Authenticate)
            .certificate(cert.info.subject.clone(), &cert.info.der);
        record = match &result {
            Ok((_, digest)) => record.digest(digest).outcome(Outcome::Granted),
            Err(e) => record.outcome(e.outcome()),
        };
        if result.is_ok() {
            // Fails closed: no login token leaves without its durable audit record.
            self.audit_durable(record).await?;
        } else {
            self.audit(record).await;
        }
        result.map(|(v, _)| v)
    }

    async fn authenticate_with(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        p: &AuthenticateParams,
    ) -> Result<(Answer, Vec<u8>), Failure> {
        let info = &cert.info;
        if !crate::purpose::may_log_in(info, &self.config) {
            return Err(Failure::KeyUsage(
                "this certificate is not for logging in (it signs documents, or its keyUsage \
                 lacks digitalSignature)"
                    .into(),
            ));
        }
        let alg = webeid::algorithm_for(info.key_algorithm, p.algorithm.map(AuthAlgorithm::as_str))
            .map_err(Failure::Algorithm)?;
        let message = webeid::signed_message(&alg, ctx.origin.as_str(), p.challenge.as_str());
        let shown_digest = alg.hash.digest(&message);

        let origin = ctx.origin.as_str().to_owned();
        let holder = info.holder.clone();
        let issuer = common_name(&info.issuer);
        let token_label = self.token_label(&info.token_id).await.unwrap_or_default();
        let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            texts.login(
                &Signer {
                    origin: &origin,
                    holder: &holder,
                    issuer: &issuer,
                    token_label: &token_label,
                },
                unlock,
            )
        });
        let req = SignRequest {
            certificate: info.id.clone(),
            algorithm: alg.sign,
            inputs: vec![SignInput::Data(message)],
            logout_after: self.config.pin_cache_seconds == 0,
            sm2_user_id: None,
        };
        let sig = self
            .run_token(ctx, cert, req, build, false, ConsentKind::Login)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Internal("the token returned no signature".into()))?;
        let algorithm: AuthAlgorithm = serde_json::from_value(Value::String(alg.jwa.to_owned()))
            .map_err(|e| Failure::Internal(format!("algorithm name: {e}")))?;
        let token = AuthenticateResult::new(info.der.clone(), algorithm, sig, VERSION);
        Ok((Answer::of(&token), shown_digest))
    }

    /// Without a `certificateId`: the certificate made for logging in (clientAuth), else the
    /// first that allows digitalSignature.
    async fn pick_login_certificate(&self) -> Result<CertificateView, Failure> {
        let certs = self.certificates_cached().await?;
        let allows = |c: &&CertificateView| crate::purpose::may_log_in(&c.info, &self.config);
        certs
            .iter()
            .filter(allows)
            .find(|c| c.info.extended_key_usage.iter().any(|e| e == "clientAuth"))
            .or_else(|| certs.iter().find(allows))
            .cloned()
            .ok_or(Failure::Token(TokenError::KeyNotFound))
    }
}
