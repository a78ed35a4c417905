//! `keyport keys generate` and `keyport certs import`: the service's enrolment without a page.
//! The same dialogs (with the command line in the origin's place), the same consent loop as
//! `keyport sign`, the same audit records under the origin `local`. PKCS#11 tokens here, SKF
//! keys (SM2) in [`skf`].

mod skf;

use std::path::Path;
use std::sync::Arc;

use pkcs11_shim::{
    DeleteKeyRequest, GenerateRequest, ImportMode, ImportRequest, KeySignRequest, KeySpec,
    LoginState, SignInput, TokenId,
};
use sha2::Digest as _;

use super::{PendingOutput, SignFileError, LOCAL_ORIGIN};
use crate::audit::{AuditLog, AuditRecord, Operation, Outcome};
use crate::backend::{self, Backend, TokenError};
use crate::consent::{self, credential as credential_from, first_question, DialogBuilder, Next};
use crate::dialog::{KeyCertificate, ShownCertificate, Texts, Unlock};
use crate::enroll::{self, NewKeyType};
use crate::pinentry::{DialogCancel, Pinentry};
use crate::service::{common_name, generation_failure, Failure};
use crate::tokens::TokenSet;

/// What `keyport keys generate` was asked.
#[derive(Debug, Clone)]
pub struct GenerateKeyRequest<'a> {
    /// The token id, as `keyport tokens` shows it.
    pub token: &'a str,
    pub key_type: NewKeyType,
    /// CKA_LABEL (SKF: the container's name); `None`: the subject's common name.
    pub label: Option<&'a str>,
    /// RFC 4514.
    pub subject: &'a str,
    pub always_authenticate: bool,
    /// Where the request goes: PEM when the name ends in `.pem`, else DER.
    pub output: &'a Path,
}

/// What `keyport keys generate` made.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The key's id: the certificate id its certificate will have.
    pub key_id: String,
    /// The request was written as PEM.
    pub pem: bool,
}

/// Generates a key pair on the token and writes its certificate request (signed by the new
/// key) to the output file, after the user's consent and PIN. Nothing is written on failure.
pub fn generate_key(
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    audit: &mut AuditLog,
    req: &GenerateKeyRequest<'_>,
) -> Result<GeneratedKey, SignFileError> {
    enroll::check_subject(req.subject).map_err(|e| SignFileError::Usage(e.to_string()))?;
    let token = find_token(tokens, req.token)?;
    // The output must be writable before anyone is asked for a PIN.
    let output = PendingOutput::create(req.output)?;
    let pem = req
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pem"));
    let result = match (&token, req.key_type) {
        (Enrolment::Pkcs11(token), NewKeyType::Pkcs11(spec)) => {
            generate_with(token, spec, pinentry, texts, req)
        }
        (Enrolment::Skf(token), NewKeyType::Sm2) => skf::generate_sm2(token, pinentry, texts, req),
        (Enrolment::Pkcs11(_), NewKeyType::Sm2) => Err(Failure::Algorithm(
            "this token cannot generate SM2 keys (SM2 keys are made on SKF keys)".into(),
        )),
        (Enrolment::Skf(_), other) => Err(Failure::Algorithm(format!(
            "an SKF key generates SM2 keys, not {}",
            other.wire_name()
        ))),
    };
    let mut record = AuditRecord::new(LOCAL_ORIGIN, Operation::KeysGenerate);
    match &result {
        Ok((_, _, digest)) => record = record.digest(digest).outcome(Outcome::Granted),
        Err(f) => record = record.outcome(f.outcome()),
    }
    audit.append(&record).map_err(SignFileError::Audit)?;
    let (key_id, csr, _) = result.map_err(SignFileError::Failure)?;
    let bytes = if pem {
        der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &csr)
            .map_err(|e| SignFileError::Failure(Failure::Internal(format!("PEM: {e}"))))?
            .into_bytes()
    } else {
        csr
    };
    output.commit(&bytes)?;
    Ok(GeneratedKey { key_id, pem })
}

fn generate_with(
    token: &EnrolmentToken,
    spec: KeySpec,
    pinentry: &Pinentry,
    texts: Texts,
    req: &GenerateKeyRequest<'_>,
) -> Result<(String, Vec<u8>, Vec<u8>), Failure> {
    let module = &token.module;
    let label = req
        .label
        .map_or_else(|| common_name(req.subject), str::to_owned);
    let (origin, token_label) = (
        texts.command_line_program("keys generate"),
        token.label.clone(),
    );
    let (algorithm, subject) = (spec.wire_name(), req.subject.to_owned());
    let (origin2, label2, subject2) = (origin.clone(), token_label.clone(), subject.clone());
    let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
        texts.generate_key(&origin, &token_label, None, &algorithm, &subject, unlock)
    });
    // Only a key that asks for its PIN at every signature shows this one.
    let build_request: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
        texts.sign_new_key_request(&origin2, &label2, &subject2, unlock)
    });
    let generate = GenerateRequest {
        token: token.id.clone(),
        spec,
        label,
        always_authenticate: req.always_authenticate,
        logout_after: false,
    };
    // A type the token cannot make is refused before anyone is asked.
    module
        .check_generation(&token.id, spec)
        .map_err(|e| generation_failure(e, spec))?;
    let first = first_dialog(token)?;
    let result = (|| {
        let key = with_dialogs(pinentry, texts, &build, first, |credential| {
            Ok(module.generate_key(generate.clone(), credential.into_pkcs11())?)
        })
        .map_err(|e| match e {
            Failure::Token(e) => generation_failure(e, spec),
            other => other,
        })?;
        let pending = enroll::request(req.subject, &key.public_key_der)
            .map_err(|e| Failure::Internal(format!("certificate request: {e}")))?;
        let algorithm = pending.signature().pkcs11_algorithm().ok_or_else(|| {
            Failure::Algorithm("SM2 requests are made on SKF keys, not PKCS#11 tokens".into())
        })?;
        let digest = sha2::Sha256::digest(pending.message()).to_vec();
        let sign = KeySignRequest {
            key: key.id.clone(),
            algorithm,
            input: SignInput::Data(pending.message().to_vec()),
            logout_after: false,
        };
        let signature = with_dialogs(pinentry, texts, &build_request, None, |credential| {
            Ok(module.sign_with_key(sign.clone(), credential.into_pkcs11())?)
        })
        .inspect_err(|_| {
            // No request, no use for the key: a cancel here leaves nothing behind either.
            let undo = DeleteKeyRequest {
                key: key.id.clone(),
                logout_after: false,
            };
            if let Err(e) = module.delete_new_key(undo) {
                tracing::warn!(key = %key.id, error = %e, "the new key stays on the token");
            }
        })?;
        let csr = pending
            .finish(&signature)
            .map_err(|e| Failure::Internal(format!("certificate request: {e}")))?;
        Ok((key.id.to_string(), csr, digest))
    })();
    if let Err(e) = module.logout(&token.id) {
        tracing::warn!(error = %e, "C_Logout after keys generate failed");
    }
    result
}

/// What `keyport certs import` stored.
#[derive(Debug, Clone)]
pub struct ImportedCertificate {
    pub certificate_id: String,
    pub subject: String,
}

/// Stores a certificate (DER or PEM file) beside its key on the token, after the user's
/// consent and PIN.
pub fn import_certificate(
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    audit: &mut AuditLog,
    token: &str,
    input: &Path,
    replace: bool,
) -> Result<ImportedCertificate, SignFileError> {
    let bytes = std::fs::read(input).map_err(|e| SignFileError::Read {
        path: input.display().to_string(),
        source: e,
    })?;
    let der = match der::pem::decode_vec(&bytes) {
        Ok(("CERTIFICATE", der)) => der,
        Ok((label, _)) => {
            return Err(SignFileError::Usage(format!(
                "{} holds a {label}, not a CERTIFICATE",
                input.display()
            )))
        }
        Err(_) => bytes,
    };
    let cert = <x509_cert::Certificate as der::Decode>::from_der(&der).map_err(|_| {
        SignFileError::Usage(format!(
            "{} is not an X.509 certificate (DER or PEM)",
            input.display()
        ))
    })?;
    let token = match find_token(tokens, token)? {
        Enrolment::Pkcs11(token) => token,
        Enrolment::Skf(token) => {
            let result = skf::import_sm2(&token, pinentry, texts, &cert, &der, replace);
            return finish_import(audit, subject_of(&cert), &der, result);
        }
    };
    let tbs = cert.tbs_certificate();
    let subject = tbs.subject().to_string();
    let (origin, token_label) = (
        texts.command_line_program("certs import"),
        token.label.clone(),
    );
    let (shown, issuer) = (subject.clone(), common_name(&tbs.issuer().to_string()));
    // A renewal for the same key: the dialog says what becomes of the present certificate.
    let renewal = token
        .module
        .certificates(Some(&token.id))
        .map_err(|e| SignFileError::Failure(Failure::Token(e.into())))?
        .iter()
        .any(|c| c.der != der && enroll::same_key(&c.der, &cert));
    let old = match (renewal, replace) {
        (false, _) => KeyCertificate::None,
        (true, false) => KeyCertificate::KeptBeside,
        (true, true) => KeyCertificate::Replaced,
    };
    let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
        let cert = ShownCertificate {
            subject: &shown,
            issuer: &issuer,
            ..Default::default()
        };
        texts.import_certificate(&origin, &token_label, None, cert, old, unlock)
    });
    let request = ImportRequest {
        token: token.id.clone(),
        der: der.clone(),
        mode: if replace {
            ImportMode::Replace
        } else {
            ImportMode::KeepExisting
        },
        logout_after: true,
    };
    let result = first_dialog(&token)
        .and_then(|first| {
            with_dialogs(pinentry, texts, &build, first, |credential| {
                Ok(token
                    .module
                    .import_certificate(request.clone(), credential.into_pkcs11())?)
            })
        })
        .map(|imported| imported.certificate.id.to_string());
    finish_import(audit, subject, &der, result)
}

fn subject_of(cert: &x509_cert::Certificate) -> String {
    cert.tbs_certificate().subject().to_string()
}

/// The import's audit record, then its answer.
fn finish_import(
    audit: &mut AuditLog,
    subject: String,
    der: &[u8],
    result: Result<String, Failure>,
) -> Result<ImportedCertificate, SignFileError> {
    let record = AuditRecord::new(LOCAL_ORIGIN, Operation::CertificatesImport)
        .certificate(subject.clone(), der)
        .outcome(match &result {
            Ok(_) => Outcome::Granted,
            Err(f) => f.outcome(),
        });
    audit.append(&record).map_err(SignFileError::Audit)?;
    let certificate_id = result.map_err(SignFileError::Failure)?;
    Ok(ImportedCertificate {
        certificate_id,
        subject,
    })
}

/// A PKCS#11 token enrolment works on.
struct EnrolmentToken {
    module: pkcs11_shim::Module,
    id: TokenId,
    label: String,
}

/// The token `--token` names, by back end.
enum Enrolment {
    Pkcs11(EnrolmentToken),
    Skf(skf::SkfToken),
}

fn find_token(tokens: &TokenSet, id: &str) -> Result<Enrolment, SignFileError> {
    let parsed: backend::TokenId = id.parse().map_err(|_| {
        SignFileError::Usage(format!("{id:?} is not a token id (see `keyport tokens`)"))
    })?;
    let view = tokens
        .token(&parsed)
        .ok_or(SignFileError::Failure(Failure::Token(
            TokenError::TokenNotPresent,
        )))?;
    match (view.module, view.info.id) {
        (Backend::Pkcs11(module), backend::TokenId::Pkcs11(id)) => {
            Ok(Enrolment::Pkcs11(EnrolmentToken {
                module,
                id,
                label: view.info.label.trim().to_owned(),
            }))
        }
        (Backend::Skf(library), backend::TokenId::Skf(id)) => Ok(Enrolment::Skf(skf::SkfToken {
            library,
            id,
            label: view.info.label.trim().to_owned(),
        })),
        _ => Err(SignFileError::Failure(Failure::Internal(
            "a token's id and its library are of different back ends".into(),
        ))),
    }
}

/// Enrolment always asks: a PIN dialog, or a confirmation when no PIN is typed here.
fn first_dialog(token: &EnrolmentToken) -> Result<Option<Unlock>, Failure> {
    let state = token
        .module
        .login_state(&token.id)
        .map_err(|e| Failure::Token(e.into()))?;
    if state == LoginState::Locked {
        return Err(Failure::Token(TokenError::PinLocked));
    }
    Ok(first_question(state, false))
}

/// The command line's consent loop around one token job (as `keyport sign`'s): ask, act with
/// the answer, ask again on a wrong PIN or a login the answer could not serve, stop otherwise.
fn with_dialogs<T>(
    pinentry: &Pinentry,
    texts: Texts,
    build: &DialogBuilder,
    first: Option<Unlock>,
    mut job: impl FnMut(backend::Credential) -> Result<T, TokenError>,
) -> Result<T, Failure> {
    let mut question = first;
    let mut last = None;
    loop {
        let mut credential = backend::Credential::None;
        if let Some(unlock) = question.take() {
            let consent = build(&texts, unlock, consent::Scope::All)
                .ask(pinentry, &DialogCancel::new())
                .map_err(|e| Failure::Dialog(Arc::new(e)))?;
            credential = credential_from(consent, unlock);
            last = Some(unlock);
        }
        match job(credential) {
            Ok(v) => return Ok(v),
            Err(error) => match consent::after(error, last) {
                Next::Ask(unlock) => question = Some(unlock),
                Next::Stop(error) => return Err(Failure::Token(error)),
            },
        }
    }
}

/// What `keyport certs remove` removed.
#[derive(Debug, Clone)]
pub struct RemovedCertificate {
    /// The id it was listed under.
    pub certificate_id: String,
    pub subject: String,
    /// The id of the key's certificate that stays.
    pub kept_id: String,
}

/// Removes one certificate of a key that has another one (the old one after a renewal for the
/// same key), after the user's consent and PIN. A key's last certificate is refused before any
/// dialog, and the key itself is never touched. PKCS#11 tokens only: an SKF container holds one
/// signing certificate (`keyport certs import --replace` replaces it).
pub fn remove_certificate(
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    audit: &mut AuditLog,
    token: &str,
    certificate: &str,
) -> Result<RemovedCertificate, SignFileError> {
    let asked: backend::CertificateId = certificate.parse().map_err(|_| {
        SignFileError::Usage(format!(
            "{certificate:?} is not a certificate id (see `keyport certs`)"
        ))
    })?;
    if asked.token_id().as_str() != token {
        return Err(SignFileError::Usage(format!(
            "certificate {certificate} is not on token {token}"
        )));
    }
    let token = match find_token(tokens, token)? {
        Enrolment::Pkcs11(token) => token,
        Enrolment::Skf(_) => {
            return Err(SignFileError::Usage(
                "an SKF key's container holds one signing certificate: replace it with \
                 `keyport certs import --replace`"
                    .into(),
            ))
        }
    };
    let backend::CertificateId::Pkcs11(id) = asked else {
        return Err(SignFileError::Usage(format!(
            "certificate {certificate} is not on token {}",
            token.id
        )));
    };
    let listed = token
        .module
        .certificates(Some(&token.id))
        .map_err(|e| SignFileError::Failure(Failure::Token(e.into())))?;
    let gone = listed
        .iter()
        .find(|c| id.names(&c.id, &c.der))
        .ok_or_else(|| {
            SignFileError::Failure(Failure::Token(TokenError::CertificateNotFound(
                backend::CertificateId::Pkcs11(id.clone()),
            )))
        })?
        .clone();
    // The key keeps a certificate: the one it has beside this one.
    let kept = listed
        .iter()
        .find(|c| c.id.cka_id().is_some() && c.id.key() == gone.id.key() && c.der != gone.der)
        .ok_or_else(|| {
            SignFileError::Failure(Failure::Token(
                pkcs11_shim::Error::OnlyCertificate(gone.id.clone()).into(),
            ))
        })?;
    let (origin, token_label) = (
        texts.command_line_program("certs remove"),
        token.label.clone(),
    );
    let (subject, issuer) = (gone.subject.clone(), common_name(&gone.issuer));
    let (until, serial, kept_until) = (
        gone.not_after.date().to_string(),
        gone.serial_hex.clone(),
        kept.not_after.date().to_string(),
    );
    let build: DialogBuilder = Arc::new(move |texts, unlock, _scope| {
        let cert = ShownCertificate {
            subject: &subject,
            issuer: &issuer,
            valid_until: Some(&until),
            serial: Some(&serial),
        };
        texts.remove_certificate(&origin, &token_label, cert, &kept_until, unlock)
    });
    let request = pkcs11_shim::DeleteCertificateRequest {
        certificate: gone.id.clone(),
        logout_after: true,
    };
    let result = first_dialog(&token).and_then(|first| {
        with_dialogs(pinentry, texts, &build, first, |credential| {
            Ok(token
                .module
                .delete_certificate(request.clone(), credential.into_pkcs11())?)
        })
    });
    let record = AuditRecord::new(LOCAL_ORIGIN, Operation::CertificatesRemove)
        .certificate(gone.subject.clone(), &gone.der)
        .outcome(match &result {
            Ok(_) => Outcome::Granted,
            Err(f) => f.outcome(),
        });
    audit.append(&record).map_err(SignFileError::Audit)?;
    let removed = result.map_err(SignFileError::Failure)?;
    Ok(RemovedCertificate {
        certificate_id: removed.certificate.to_string(),
        subject: gone.subject,
        kept_id: removed.kept.to_string(),
    })
}
