//! Enrolment on an SKF key (GM/T 0016): `keys.generate` with `SM2` makes a signing key pair in a
//! container (SKF_GenECCKeyPair), the PKCS#10 request is signed by it (SM3withSM2 over
//! e = SM3(Z ‖ M), default user ID), and `certificates.import` writes the issued certificate
//! into the signing slot of the container whose key it carries (SKF_ImportCertificate).
//!
//! - The container is named by the request's `label` (created, or an existing empty one used);
//!   one that holds a key already is INVALID_PARAMS, nothing is touched.
//! - The PIN is the first application's (the one `tokens.list` reports for the key).
//! - One dialog each, with the PIN; the PIN is verified once (never retried by us) and cleared
//!   (SKF_ClearSecureState) when the request ends: SKF has no PIN cache.
//! - A request that cannot be made after the key was generated deletes the container again, so
//!   a failure leaves nothing behind, as a cancelled dialog does (it comes before any change).
//! - Import finds the container by the certificate's public key before asking anyone: a
//!   stranger's certificate is CERTIFICATE_NOT_FOUND with no dialog. A container has one signing
//!   certificate slot, so a different certificate for a key that has one is INVALID_PARAMS
//!   unless `replace` (renewing with a new key keeps both, in two containers).

use std::sync::Arc;

use browser_bridge::protocol::{CertificatesImportParams, KeysGenerateParams};
use browser_bridge::RequestContext;
use sha2::Digest as _;
use skf_shim::{ApplicationId, ImportMode, NewContainer, SecretPin};

use crate::backend::{self, LoginState, TokenError};
use crate::consent::{first_question, DialogBuilder};
use crate::dialog::{KeyCertificate, ShownCertificate, Unlock};
use crate::enroll;

use super::super::{blocking, common_name, Failure, Service};

/// An SKF key enrolment works on.
pub(crate) struct SkfToken {
    pub(crate) library: skf_shim::Library,
    pub(crate) id: skf_shim::TokenId,
    pub(crate) label: String,
}

impl SkfToken {
    /// The application whose PIN enrolment verifies: the key's first one.
    async fn application(&self) -> Result<ApplicationId, Failure> {
        let (library, id) = (self.library.clone(), self.id.clone());
        let apps = blocking(move || library.applications(&id).map_err(TokenError::from))
            .await?
            .map_err(Failure::Token)?;
        apps.into_iter()
            .next()
            .map(|a| a.id)
            .ok_or_else(|| Failure::Algorithm("this SKF key has no application to enrol in".into()))
    }

    /// The first question: the PIN, with the key's warnings; a locked PIN stops before it.
    async fn first_question(&self, app: &ApplicationId) -> Result<Option<Unlock>, Failure> {
        let (library, app) = (self.library.clone(), app.clone());
        let st = blocking(move || library.pin_status(&app).map_err(TokenError::from))
            .await?
            .map_err(Failure::Token)?;
        if st.locked {
            return Err(Failure::Token(TokenError::PinLocked));
        }
        Ok(first_question(
            LoginState::NeedsPin(backend::pin_status(st)),
            false,
        ))
    }

    /// SKF_ClearSecureState at the end of an enrolment; a failure is only logged.
    async fn logout(&self, app: &ApplicationId) {
        let (library, app) = (self.library.clone(), app.clone());
        match blocking(move || library.logout(&app).map_err(TokenError::from)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(Failure::Token(e)) => {
                tracing::warn!(error = %e, "SKF_ClearSecureState after enrolment failed");
            }
            Err(e) => tracing::warn!(error = %e, "SKF_ClearSecureState after enrolment failed"),
        }
    }
}

/// The PIN the user typed, as the SKF shim takes it (an SKF key has no PIN pad).
pub(crate) fn skf_pin(credential: backend::Credential) -> Result<SecretPin, TokenError> {
    match credential {
        backend::Credential::Pin(mut pin) => Ok(SecretPin::from(std::mem::take(&mut *pin))),
        backend::Credential::None | backend::Credential::PinPad => Err(TokenError::LoginRequired {
            kind: backend::LoginKind::User,
            pin: backend::PinStatus::default(),
            pin_pad: false,
        }),
    }
}

/// Builds the request for `subject` and the key just generated, signed by it (the PIN still
/// verified): SM3withSM2 over e = SM3(Z ‖ M) with the default user ID, Z from the container's
/// key. Returns the key id, the DER request and the SHA-256 of what the key signed.
pub(crate) fn sm2_request(
    library: &skf_shim::Library,
    key: &skf_shim::GeneratedKey,
    subject: &str,
) -> Result<(String, Vec<u8>, Vec<u8>), TokenError> {
    let pending = enroll::request(subject, &key.public_key_der)
        .map_err(|e| TokenError::InvalidInput(format!("certificate request: {e}")))?;
    let message = pending.message().to_vec();
    let signed_digest = sha2::Sha256::digest(&message).to_vec();
    let mut signatures = library
        .sign(
            skf_shim::SignRequest {
                certificate: key.id.clone(),
                algorithm: skf_shim::SignAlgorithm::sm2(skf_shim::Sm2Encoding::Der),
                inputs: vec![skf_shim::SignInput::Message(message)],
                // The verification stays for an undo; the caller ends it.
                logout_after: false,
            },
            None,
        )
        .map_err(|f| TokenError::from(f.error))?;
    let signature = signatures
        .pop()
        .ok_or_else(|| TokenError::InvalidInput("the key gave no signature".into()))?;
    let csr = pending
        .finish(&signature)
        .map_err(|e| TokenError::InvalidInput(format!("certificate request: {e}")))?;
    Ok((
        backend::CertificateId::Skf(key.id.clone()).to_string(),
        csr,
        signed_digest,
    ))
}

/// A request the key could not sign: the token's error as it is; one we could not build is ours.
pub(crate) fn request_failure(e: TokenError) -> Failure {
    match e {
        TokenError::InvalidInput(m) => Failure::Internal(format!("SM2 certificate request: {m}")),
        other => Failure::Token(other),
    }
}

/// What an import into `container` does to its present certificate: only `replace` replaces
/// one (a container has one signing-certificate slot).
pub(crate) fn key_certificate(
    listed: &[skf_shim::CertificateInfo],
    container: &skf_shim::CertificateId,
    der: &[u8],
    replace: bool,
) -> KeyCertificate {
    let occupied = listed.iter().any(|c| &c.id == container && c.der != der);
    if occupied && replace {
        KeyCertificate::Replaced
    } else {
        KeyCertificate::None
    }
}

/// The SM2 public key (`04 ‖ X ‖ Y`) a certificate carries, if it reads as one.
pub(crate) fn certificate_point(cert: &x509_cert::Certificate) -> Option<Vec<u8>> {
    cert.tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
}

impl Service {
    /// `keys.generate` with `SM2` on an SKF key: consent and PIN, the key pair in the container
    /// `label` names, the request signed by it. Returns the key id, the DER request and the
    /// SHA-256 of what the key signed (for the audit record).
    pub(super) async fn generate_sm2(
        &self,
        ctx: &RequestContext,
        p: &KeysGenerateParams,
        token: SkfToken,
    ) -> Result<(String, Vec<u8>, Vec<u8>), Failure> {
        if p.always_authenticate.unwrap_or(false) {
            return Err(Failure::Algorithm(
                "an SKF key cannot ask for its PIN at every signature".into(),
            ));
        }
        let subject = p.subject.as_str().to_owned();
        let container = p.label.as_str().to_owned();
        let app = token.application().await?;
        let first = token.first_question(&app).await?;

        let (origin, label, shown_container) = (
            ctx.origin.as_str().to_owned(),
            token.label.clone(),
            container.clone(),
        );
        let shown_subject = subject.clone();
        let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            texts.generate_key(
                &origin,
                &label,
                Some(&shown_container),
                "SM2",
                &shown_subject,
                unlock,
            )
        });
        let (library, a) = (token.library.clone(), app.clone());
        let name = NewContainer::Named(container.into_bytes());
        let generated = self
            .with_consent(ctx, &build, first, move |credential| {
                Ok(library.generate_sm2(&a, name.clone(), skf_pin(credential)?)?)
            })
            .await;
        let key = match generated {
            Ok(key) => key,
            Err(e) => {
                token.logout(&app).await;
                return Err(e);
            }
        };
        tracing::info!(key = %key.id, "SM2 key pair generated on the SKF key");

        // The PIN is still verified: the request is signed without another dialog.
        let (library, generated) = (token.library.clone(), key.clone());
        let result = blocking(move || sm2_request(&library, &generated, &subject))
            .await
            .and_then(|r| r.map_err(request_failure));
        if let Err(e) = &result {
            // No request, no use for the key: leave no container behind.
            let (library, id) = (token.library.clone(), key.id.clone());
            let undo =
                blocking(move || library.delete_new_container(&id).map_err(TokenError::from)).await;
            match undo {
                Ok(Ok(())) => {
                    tracing::info!(key = %key.id, error = %e, "no certificate request: the new container is deleted");
                }
                Ok(Err(undo)) => {
                    tracing::warn!(key = %key.id, error = %e, undo = %undo, "no certificate request, and the new container stays on the key");
                }
                Err(undo) => {
                    tracing::warn!(key = %key.id, error = %e, undo = %undo, "no certificate request, and the new container stays on the key");
                }
            }
        }
        token.logout(&app).await;
        result
    }

    /// `certificates.import` on an SKF key: the container whose key the certificate carries,
    /// then consent and PIN, then SKF_ImportCertificate into its signing slot.
    pub(super) async fn import_sm2(
        &self,
        ctx: &RequestContext,
        p: &CertificatesImportParams,
        cert: &x509_cert::Certificate,
        token: SkfToken,
    ) -> Result<String, Failure> {
        let replace = p.replace.unwrap_or(false);
        let point = certificate_point(cert).ok_or(Failure::NoMatchingKey)?;
        let (library, id) = (token.library.clone(), token.id.clone());
        let container =
            blocking(move || library.key_container(&id, point).map_err(TokenError::from))
                .await?
                .map_err(Failure::Token)?
                .ok_or(Failure::NoMatchingKey)?;
        let app = container.application().clone();
        let first = token.first_question(&app).await?;
        // The container's present certificate, which only `replace` replaces.
        let (library, id) = (token.library.clone(), token.id.clone());
        let listed = blocking(move || library.certificates(Some(&id)).map_err(TokenError::from))
            .await?
            .map_err(Failure::Token)?;
        let old = key_certificate(&listed, &container, &p.certificate.0, replace);

        let tbs = cert.tbs_certificate();
        let (origin, label, name) = (
            ctx.origin.as_str().to_owned(),
            token.label.clone(),
            container.container(),
        );
        let subject = tbs.subject().to_string();
        let issuer = common_name(&tbs.issuer().to_string());
        let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
            let cert = ShownCertificate {
                subject: &subject,
                issuer: &issuer,
                ..Default::default()
            };
            texts.import_certificate(&origin, &label, Some(&name), cert, old, unlock)
        });
        let mode = if replace {
            ImportMode::Replace
        } else {
            ImportMode::KeepExisting
        };
        let (library, c, der) = (
            token.library.clone(),
            container.clone(),
            p.certificate.0.clone(),
        );
        let imported = self
            .with_consent(ctx, &build, first, move |credential| {
                library.verify_pin(c.application(), skf_pin(credential)?)?;
                Ok(library.import_certificate(&c, der.clone(), mode)?)
            })
            .await;
        token.logout(&app).await;
        Ok(backend::CertificateId::Skf(imported?.id).to_string())
    }
}
