//! What the command line does with tokens: list them, list certificates, sign a file, enrol
//! (`local/enroll.rs`). The same
//! planning, PIN dialog and output code as the WebSocket service, without a page.

mod enroll;

pub use enroll::{
    generate_key, import_certificate, remove_certificate, GenerateKeyRequest, GeneratedKey,
    ImportedCertificate, RemovedCertificate,
};

use std::path::Path;

use crate::backend::{
    Backend, CertificateId, Credential, LoginState, SignFailure, SignRequest, TokenError,
};
use browser_bridge::protocol::{
    Base64Bytes, DigestAlgorithm, Display, EcdsaEncoding as WireEcdsa, SignFormat,
    SignInput as WireInput, SignOptions, SignatureAlgorithm, Title,
};
use serde_json::Value;

use crate::audit::{AuditLog, AuditRecord, Operation, Outcome};
use crate::config::Config;
use crate::consent::{self, credential as credential_from, first_question, DialogBuilder, Next};
use crate::dialog::{Document, Signer, Texts};
use crate::pinentry::{DialogCancel, Pinentry};
use crate::service::{
    certificate_entry, common_name, signing_allowed, token_entry, Failure, SignPlan,
};
use crate::tokens::{CertificateView, TokenSet};

/// What `keyport sign` was asked.
#[derive(Debug, Clone)]
pub struct SignFileRequest<'a> {
    pub certificate: &'a str,
    pub input: &'a Path,
    pub output: &'a Path,
    pub format: SignFormat,
    pub hash: Option<DigestAlgorithm>,
    pub ecdsa_encoding: Option<WireEcdsa>,
    pub signature_algorithm: Option<SignatureAlgorithm>,
}

/// The `tokens.list` entries, as JSON.
pub fn tokens_json(tokens: &TokenSet) -> Value {
    Value::Array(
        tokens
            .tokens()
            .iter()
            .map(|t| browser_bridge::protocol::to_json(&token_entry(t)))
            .collect(),
    )
}

/// The `certificates.list` entries with `label` (CKA_LABEL) added, as JSON.
pub fn certificates_json(tokens: &TokenSet) -> Value {
    Value::Array(
        tokens
            .certificates()
            .iter()
            .filter_map(|c| {
                let mut v = browser_bridge::protocol::to_json(&certificate_entry(&c.info)?);
                if let Value::Object(m) = &mut v {
                    m.insert("label".into(), Value::String(c.info.label.clone()));
                }
                Some(v)
            })
            .collect(),
    )
}

/// What `keyport sign` made.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The certificate holder's name.
    pub holder: String,
    /// The signature's size in bytes.
    pub bytes: usize,
}

/// The terminal this command runs in (`/dev/pts/N`), from standard input or else standard
/// error, for a terminal pinentry; `None` when neither is a terminal (a service, a pipe).
pub fn terminal_name() -> Option<String> {
    ["/proc/self/fd/0", "/proc/self/fd/2"]
        .iter()
        .find_map(|fd| {
            let target = std::fs::read_link(fd).ok()?;
            let name = target.to_str()?;
            (name.starts_with("/dev/pts/") || name.starts_with("/dev/tty")).then(|| name.to_owned())
        })
}

/// Signs a file with a certificate's key, asking the PIN through pinentry, and writes the
/// signature (raw or CMS) to the output file. Nothing is written on failure.
pub fn sign_file(
    config: &Config,
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    audit: &mut AuditLog,
    req: &SignFileRequest<'_>,
) -> Result<Signed, SignFileError> {
    let id: CertificateId = req.certificate.parse().map_err(|_| {
        SignFileError::Usage(format!(
            "{:?} is not a certificate id (see `keyport certs`)",
            req.certificate
        ))
    })?;
    let data = std::fs::read(req.input).map_err(|e| SignFileError::Read {
        path: req.input.display().to_string(),
        source: e,
    })?;
    let cert = tokens
        .certificate(&id)
        .map_err(|e| SignFileError::Failure(Failure::Token(e)))?;
    // From here on every outcome is audited, as the agent audits a page's request; the
    // signature reaches the output file only once its record is on disk.
    let mut digests = Vec::new();
    let result = sign_with(
        config,
        tokens,
        pinentry,
        texts,
        req,
        data,
        &cert,
        &mut digests,
    );
    let mut record = AuditRecord::new(LOCAL_ORIGIN, Operation::Sign)
        .certificate(cert.info.subject.clone(), &cert.info.der);
    for d in &digests {
        record = record.digest(d);
    }
    record = record.outcome(match &result {
        Ok(_) => Outcome::Granted,
        Err(SignFileError::Failure(f)) => f.outcome(),
        Err(SignFileError::Usage(_)) => Outcome::Error("INVALID_PARAMS".into()),
        Err(SignFileError::Read { .. } | SignFileError::Write { .. } | SignFileError::Audit(_)) => {
            Outcome::Error("INTERNAL".into())
        }
    });
    audit.append(&record).map_err(SignFileError::Audit)?;
    let (sig, output) = result?;
    output.commit(&sig)?;
    Ok(Signed {
        holder: cert.info.holder.clone(),
        bytes: sig.len(),
    })
}

/// The audit log's origin for what the command line does.
pub const LOCAL_ORIGIN: &str = "local";

/// The signature of `data`, and the output file waiting for it; `digests` gets what is (to
/// be) signed as soon as it is known.
#[allow(clippy::too_many_arguments)] // one call site, each argument a different part
fn sign_with(
    config: &Config,
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    req: &SignFileRequest<'_>,
    data: Vec<u8>,
    cert: &CertificateView,
    digests: &mut Vec<Vec<u8>>,
) -> Result<(Vec<u8>, PendingOutput), SignFileError> {
    if !signing_allowed(&cert.info.key_usage, config.signing_key_usage) {
        return Err(SignFileError::Failure(Failure::KeyUsage(
            "this certificate is not for document signatures (keyUsage lacks nonRepudiation); \
             `signing_key_usage = \"any\"` in the configuration allows it, unless the \
             administrator's policy forbids it (`keyport doctor` shows which)"
                .into(),
        )));
    }
    let name = req.input.file_name().map_or_else(
        || req.input.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let title = Title::parse(name.chars().take(200).filter(|c| !c.is_control()).collect())
        .map_err(|e| SignFileError::Usage(format!("file name: {e}")))?;
    let options = SignOptions {
        hash: req.hash,
        signature_algorithm: req.signature_algorithm,
        format: Some(req.format),
        ecdsa_encoding: req.ecdsa_encoding,
        sm2_user_id: None,
        display: Display {
            title,
            summary: None,
        },
    };
    let items = vec![WireInput::Data(Base64Bytes(data))];
    let plan = SignPlan::new(&cert.info, &items, &options).map_err(SignFileError::Failure)?;
    digests.clone_from(&plan.message_digests);
    let digest = plan.message_digests.first().cloned().unwrap_or_default();
    let (inputs, attrs) = plan
        .token_inputs(items, &cert.info)
        .map_err(SignFileError::Failure)?;

    let token_label = tokens
        .token(&cert.info.token_id)
        .map(|t| t.info.label.trim().to_owned())
        .unwrap_or_default();
    let holder = cert.info.holder.clone();
    let issuer = common_name(&cert.info.issuer);
    let build: DialogBuilder = std::sync::Arc::new(move |texts, unlock, _scope| {
        texts.sign(
            &Signer {
                origin: texts.command_line_origin(),
                holder: &holder,
                issuer: &issuer,
                token_label: &token_label,
            },
            &Document {
                title: &name,
                summary: None,
                digest: &digest,
            },
            unlock,
        )
    });
    // The output must be writable before anyone is asked for a PIN.
    let output = PendingOutput::create(req.output)?;
    let sign_req = SignRequest {
        certificate: cert.info.id.clone(),
        algorithm: plan.algorithm,
        inputs,
        logout_after: true,
        sm2_user_id: None,
    };
    let sigs = sign_with_dialogs(&cert.module, sign_req, pinentry, texts, &build)
        .map_err(SignFileError::Failure)?;
    let out = plan
        .finish(sigs, &attrs, &cert.info)
        .map_err(SignFileError::Failure)?;
    let sig = out
        .into_iter()
        .next()
        .ok_or_else(|| SignFileError::Failure(Failure::Internal("no signature".into())))?;
    Ok((sig, output))
}

/// The command line's consent and PIN loop, the service's without a page: ask (consent and
/// PIN in one dialog), sign with the answer, on a wrong PIN ask again with the token's warning,
/// stop at a cancel, a lock or any other error. One file, so one signature: a key that asks for
/// its PIN per signature is served by the same dialog.
fn sign_with_dialogs(
    module: &Backend,
    req: SignRequest,
    pinentry: &Pinentry,
    texts: Texts,
    build: &DialogBuilder,
) -> Result<Vec<Vec<u8>>, Failure> {
    let state = module
        .login_state(&req.certificate)
        .map_err(Failure::Token)?;
    if state == LoginState::Locked {
        return Err(Failure::Token(TokenError::PinLocked));
    }
    let mut question = first_question(state, false);
    let mut last = None;
    loop {
        let mut credential = Credential::None;
        if let Some(unlock) = question.take() {
            let consent = build(&texts, unlock, consent::Scope::All)
                .ask(pinentry, &DialogCancel::new())
                .map_err(|e| Failure::Dialog(std::sync::Arc::new(e)))?;
            credential = credential_from(consent, unlock);
            last = Some(unlock);
        }
        match module.sign(req.clone(), credential, None, None) {
            Ok(sigs) => return Ok(sigs),
            Err(SignFailure { error, .. }) => match consent::after(error, last) {
                Next::Ask(unlock) => question = Some(unlock),
                Next::Stop(error) => return Err(Failure::Token(error)),
            },
        }
    }
}

/// The output file's temporary sibling, created before signing (so an unwritable output fails
/// before any dialog) and renamed over the output only once the signature is there. Removed
/// if the run fails: a failed run leaves no file behind.
#[derive(Debug)]
struct PendingOutput {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl PendingOutput {
    fn create(path: &Path) -> Result<PendingOutput, SignFileError> {
        let write_err = |source| SignFileError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut name = path
            .file_name()
            .ok_or_else(|| write_err(std::io::Error::other("not a file name")))?
            .to_os_string();
        if path.is_dir() {
            return Err(write_err(std::io::Error::other("it is a directory")));
        }
        name.push(".keyport-tmp");
        let tmp = path.with_file_name(name);
        let file = std::fs::File::create(&tmp).map_err(write_err)?;
        Ok(PendingOutput {
            tmp,
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    fn commit(mut self, bytes: &[u8]) -> Result<(), SignFileError> {
        use std::io::Write;
        let result = match self.file.take() {
            Some(mut file) => file
                .write_all(bytes)
                .and_then(|()| file.sync_all())
                .and_then(|()| std::fs::rename(&self.tmp, &self.path)),
            None => Err(std::io::Error::other("output already written")),
        };
        result.map_err(|source| SignFileError::Write {
            path: self.path.display().to_string(),
            source,
        })
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        // After a successful rename the temporary name is gone and this fails harmlessly.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignFileError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", describe(.0))]
    Failure(Failure),
    /// The audit record could not be written: the signature is not released.
    #[error("the signature was not released because its audit record could not be written")]
    Audit(#[source] crate::audit::AuditError),
}

/// A one-line description for the terminal: the protocol's reason and what it means here.
fn describe(f: &Failure) -> String {
    let rpc = f.to_rpc();
    format!("{} ({})", rpc.message, rpc.reason.as_str())
}
