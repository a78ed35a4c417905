//! `keyport keys generate --algorithm SM2` and `keyport certs import` on an SKF key: what
//! `service::enroll::skf` does for a page, from the command line (the same steps, dialogs and
//! undo; see there).

use std::sync::Arc;

use skf_shim::{ApplicationId, ImportMode, NewContainer};

use super::{with_dialogs, GenerateKeyRequest};
use crate::backend::{self, LoginState, TokenError};
use crate::consent::{first_question, DialogBuilder};
use crate::dialog::{ShownCertificate, Texts, Unlock};
use crate::pinentry::Pinentry;
use crate::service::enroll_skf::{
    certificate_point, key_certificate, request_failure, skf_pin, sm2_request,
};
use crate::service::{common_name, Failure};

/// An SKF key enrolment works on.
pub(super) struct SkfToken {
    pub(super) library: skf_shim::Library,
    pub(super) id: skf_shim::TokenId,
    pub(super) label: String,
}

impl SkfToken {
    /// The application whose PIN enrolment verifies: the key's first one.
    fn application(&self) -> Result<ApplicationId, Failure> {
        let apps = self
            .library
            .applications(&self.id)
            .map_err(|e| Failure::Token(e.into()))?;
        apps.into_iter()
            .next()
            .map(|a| a.id)
            .ok_or_else(|| Failure::Algorithm("this SKF key has no application to enrol in".into()))
    }

    fn first_question(&self, app: &ApplicationId) -> Result<Option<Unlock>, Failure> {
        let st = self
            .library
            .pin_status(app)
            .map_err(|e| Failure::Token(e.into()))?;
        if st.locked {
            return Err(Failure::Token(TokenError::PinLocked));
        }
        Ok(first_question(
            LoginState::NeedsPin(backend::pin_status(st)),
            false,
        ))
    }

    fn logout(&self, app: &ApplicationId) {
        if let Err(e) = self.library.logout(app) {
            tracing::warn!(error = %e, "SKF_ClearSecureState after enrolment failed");
        }
    }
}

/// The key pair in the container `--label` names (default: the subject's CN), its request.
pub(super) fn generate_sm2(
    token: &SkfToken,
    pinentry: &Pinentry,
    texts: Texts,
    req: &GenerateKeyRequest<'_>,
) -> Result<(String, Vec<u8>, Vec<u8>), Failure> {
    if req.always_authenticate {
        return Err(Failure::Algorithm(
            "an SKF key cannot ask for its PIN at every signature".into(),
        ));
    }
    let container = req
        .label
        .map_or_else(|| common_name(req.subject), str::to_owned);
    let app = token.application()?;
    let first = token.first_question(&app)?;
    let (origin, label, shown, subject) = (
        texts.command_line_program("keys generate"),
        token.label.clone(),
        container.clone(),
        req.subject.to_owned(),
    );
    let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
        texts.generate_key(&origin, &label, Some(&shown), "SM2", &subject, unlock)
    });
    let name = NewContainer::Named(container.into_bytes());
    let key = match with_dialogs(pinentry, texts, &build, first, |credential| {
        Ok(token
            .library
            .generate_sm2(&app, name.clone(), skf_pin(credential)?)?)
    }) {
        Ok(key) => key,
        Err(e) => {
            token.logout(&app);
            return Err(e);
        }
    };
    let result = sm2_request(&token.library, &key, req.subject).map_err(request_failure);
    if let Err(e) = &result {
        // No request, no use for the key: leave no container behind.
        if let Err(undo) = token.library.delete_new_container(&key.id) {
            tracing::warn!(key = %key.id, error = %e, undo = %undo, "the new container stays on the key");
        }
    }
    token.logout(&app);
    result
}

/// The certificate into the signing slot of the container whose key it carries.
pub(super) fn import_sm2(
    token: &SkfToken,
    pinentry: &Pinentry,
    texts: Texts,
    cert: &x509_cert::Certificate,
    der: &[u8],
    replace: bool,
) -> Result<String, Failure> {
    let point = certificate_point(cert).ok_or(Failure::NoMatchingKey)?;
    let container = token
        .library
        .key_container(&token.id, point)
        .map_err(|e| Failure::Token(e.into()))?
        .ok_or(Failure::NoMatchingKey)?;
    let app = container.application().clone();
    let first = token.first_question(&app)?;
    let listed = token
        .library
        .certificates(Some(&token.id))
        .map_err(|e| Failure::Token(e.into()))?;
    let old = key_certificate(&listed, &container, der, replace);
    let tbs = cert.tbs_certificate();
    let (origin, label, name) = (
        texts.command_line_program("certs import"),
        token.label.clone(),
        container.container(),
    );
    let (subject, issuer) = (
        tbs.subject().to_string(),
        common_name(&tbs.issuer().to_string()),
    );
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
    let imported = with_dialogs(pinentry, texts, &build, first, |credential| {
        token
            .library
            .verify_pin(&app, skf_pin(credential)?)
            .map_err(TokenError::from)?;
        Ok(token
            .library
            .import_certificate(&container, der.to_vec(), mode)?)
    });
    token.logout(&app);
    Ok(backend::CertificateId::Skf(imported?.id).to_string())
}
