//! The signing service behind the WebSocket: each request flows origin policy → consent (and
//! PIN) → token → output format → audit. It implements the bridge's [`Backend`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use browser_bridge::protocol::{
    self, AuthAlgorithm, AuthenticateParams, AuthenticateResult, Base64Bytes, BatchSignature,
    CertificateEntry, CertificateFilter, CertificatesListParams, CertificatesListResult,
    DigestAlgorithm, EcdsaEncoding as WireEcdsa, HelloResult, KeyUsage as WireKeyUsage,
    PinState as WirePinState, Reason, Request, RequestAccessResult, RpcError, SignBatchParams,
    SignBatchResult, SignFormat, SignInput as WireInput, SignOptions, SignParams, SignProgress,
    SignResult, SignatureAlgorithm, Timestamp, TokenEntry, TokensListResult, ValidAt,
};
use browser_bridge::{Backend, ConnectionId, Origin, RequestContext};
use pkcs11_shim::{
    CertificateId, EcdsaEncoding, HashAlg, KeyAlgorithm, KeyUsage, LoginState, PinAnswer,
    SecretPin, SignAlgorithm, SignFailure, SignInput, SignRequest,
};
use serde_json::Value;
use tracing::Instrument;

use crate::audit::{AuditLog, AuditRecord, Operation, Outcome};
use crate::cms::{self, CmsSignatureAlg, DigestAlg};
use crate::config::{Config, ConsentMode, SigningKeyUsage, UnknownOrigins};
use crate::consent::{confirm_only, DialogBuilder, DialogOutcome, DialogPinProvider, PreAsked};
use crate::dialog::{Consent, Document, OriginDecision, PinState, Signer, Texts, Unlock};
use crate::origins::{OriginStore, Standing};
use crate::pinentry::{DialogCancel, DialogError, Pinentry};
use crate::tokens::{CertificateView, TokenSet, TokenView};
use crate::webeid;

/// The agent's version, as `hello` and Web eID's `appVersion` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Capabilities built in this agent (`keys.generate` is not built yet, so it is not claimed).
const CAPABILITIES: &[&str] = &[
    "certificates",
    "sign",
    "sign.batch",
    "cms",
    "authenticate",
    "events",
];

/// At most this many `sign.progress` events a second.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// After a `cancel` (or the connection's end) during a signature, how long the token gets to
/// stop before the page is told USER_CANCELLED anyway (a module may hang in C_Sign).
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Everything that can end a request, mapped to the wire in one place: [`Failure::to_rpc`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Token(#[from] pkcs11_shim::Error),
    #[error("{error} after {} signatures", completed.len())]
    Batch {
        error: pkcs11_shim::Error,
        completed: Vec<Vec<u8>>,
    },
    #[error(transparent)]
    Dialog(Arc<DialogError>),
    #[error("the origin is not approved and no dialog could ask")]
    OriginNotApproved,
    #[error("the origin was denied")]
    OriginDenied,
    #[error("a dialog for this origin is already open")]
    Busy,
    #[error("{0}")]
    KeyUsage(String),
    #[error("{0}")]
    Algorithm(String),
    #[error("{0}")]
    InvalidParams(String),
    #[error("{0} is not built yet in this agent")]
    NotBuilt(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Failure {
    /// The one mapping from internal errors to PROTOCOL.md's reasons. The page learns what it
    /// needs to act, never internal detail.
    pub fn to_rpc(&self) -> RpcError {
        use pkcs11_shim::Error as E;
        match self {
            Failure::Token(e) | Failure::Batch { error: e, .. } => {
                let base = match e {
                    E::PinIncorrect {
                        count_low,
                        final_try,
                    } => RpcError::pin_incorrect(*count_low, *final_try),
                    E::PinLocked => RpcError::new(Reason::PinLocked, "the token's PIN is locked"),
                    E::PinNotInitialized => {
                        RpcError::new(Reason::PinLocked, "the token's PIN is not initialised")
                    }
                    E::UserCancelled | E::Cancelled => RpcError::user_cancelled(),
                    E::TokenNotPresent | E::TokenNotFound(_) => {
                        RpcError::new(Reason::TokenNotPresent, "the token is not present")
                    }
                    E::CertificateNotFound(_) | E::KeyNotFound => RpcError::new(
                        Reason::CertificateNotFound,
                        "no such certificate with its key on a present token",
                    ),
                    E::MechanismNotSupported { algorithm, key } => RpcError::new(
                        Reason::AlgorithmNotSupported,
                        format!(
                            "{algorithm} is not possible with {} on this token",
                            a_key(key)
                        ),
                    ),
                    E::InvalidInput(m) => RpcError::invalid_params(m.clone()),
                    E::Pkcs11 { function, rv, .. } => {
                        RpcError::token_error(function, format!("{function} failed: {rv}"))
                    }
                    E::Busy { .. } => RpcError::new(
                        Reason::Busy,
                        "the token is busy: its module did not answer in time",
                    ),
                    E::ModuleLoad { .. } | E::WorkerGone => {
                        RpcError::new(Reason::TokenError, "the token's module is not working")
                    }
                    _ => RpcError::new(Reason::TokenError, e.to_string()),
                };
                match self {
                    Failure::Batch { completed, .. } => {
                        let results: Vec<BatchSignature> = completed
                            .iter()
                            .map(|s| BatchSignature {
                                signature: Base64Bytes(s.clone()),
                            })
                            .collect();
                        base.batch_failed(&results)
                    }
                    _ => base,
                }
            }
            Failure::Dialog(e) => match e.as_ref() {
                DialogError::Cancelled => RpcError::user_cancelled(),
                DialogError::Timeout => {
                    RpcError::new(Reason::Timeout, "the user did not answer in time")
                }
                other => RpcError::internal(format!("no dialog could be shown: {other}")),
            },
            Failure::OriginNotApproved => RpcError::new(
                Reason::OriginNotApproved,
                "this origin is not approved and no approval dialog was shown",
            ),
            Failure::OriginDenied => RpcError::new(Reason::OriginDenied, "this origin was denied"),
            Failure::Busy => {
                RpcError::new(Reason::Busy, "a dialog for this origin is already open")
            }
            Failure::KeyUsage(m) => RpcError::new(Reason::KeyUsageNotAllowed, m.clone()),
            Failure::Algorithm(m) => RpcError::new(Reason::AlgorithmNotSupported, m.clone()),
            Failure::InvalidParams(m) => RpcError::invalid_params(m.clone()),
            Failure::NotBuilt(method) => RpcError::new(
                Reason::MethodNotFound,
                format!("{method} is not built yet in this agent"),
            ),
            Failure::Internal(m) => RpcError::internal(m.clone()),
        }
    }

    /// The audit outcome of a failed request.
    fn outcome(&self) -> Outcome {
        let reason = self.to_rpc().reason;
        match reason {
            Reason::UserCancelled | Reason::OriginDenied | Reason::Timeout | Reason::Busy => {
                Outcome::Refused(reason.as_str().to_owned())
            }
            _ => Outcome::Error(reason.as_str().to_owned()),
        }
    }
}

/// What the service knows of one connection.
#[derive(Debug, Default, Clone, Copy)]
struct ConnState {
    /// "Allow once" for this connection.
    approved_once: bool,
    /// The user consented once on this connection (origins with `consent = "session"`).
    consented: bool,
}

/// The service. One per agent, shared by every connection.
#[derive(Debug)]
pub struct Service {
    config: Config,
    tokens: TokenSet,
    origins: Mutex<OriginStore>,
    /// Origins the user denied in a dialog: refused until the agent restarts.
    denied_now: Mutex<HashSet<String>>,
    pinentry: Pinentry,
    texts: Texts,
    audit: Option<Mutex<AuditLog>>,
    busy: Arc<Mutex<HashSet<String>>>,
    connections: Mutex<HashMap<ConnectionId, ConnState>>,
    /// A generation per token, so a delayed logout does not end a newer cached login.
    pin_cache: Arc<Mutex<HashMap<String, u64>>>,
}

impl Service {
    pub fn new(
        config: Config,
        tokens: TokenSet,
        origins: OriginStore,
        pinentry: Pinentry,
        texts: Texts,
        audit: Option<AuditLog>,
    ) -> Service {
        Service {
            config,
            tokens,
            origins: Mutex::new(origins),
            denied_now: Mutex::new(HashSet::new()),
            pinentry,
            texts,
            audit: audit.map(Mutex::new),
            busy: Arc::new(Mutex::new(HashSet::new())),
            connections: Mutex::new(HashMap::new()),
            pin_cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn tokens(&self) -> &TokenSet {
        &self.tokens
    }

    /// Whether events may go to connections of this origin (approved always, or once on some
    /// connection is not enough: events go to origins approved for good).
    pub fn is_approved_origin(&self, origin: &str) -> bool {
        !self.is_denied_now(origin)
            && self
                .origins
                .lock()
                .map(|o| o.standing(origin) == Standing::Allowed)
                .unwrap_or(false)
    }

    fn is_denied_now(&self, origin: &str) -> bool {
        self.denied_now
            .lock()
            .map(|d| d.contains(origin))
            .unwrap_or(true)
    }

    fn conn(&self, id: ConnectionId) -> ConnState {
        self.connections
            .lock()
            .ok()
            .and_then(|c| c.get(&id).copied())
            .unwrap_or_default()
    }

    fn update_conn(&self, id: ConnectionId, f: impl FnOnce(&mut ConnState)) {
        if let Ok(mut c) = self.connections.lock() {
            f(c.entry(id).or_default());
        }
    }

    fn approved(&self, ctx: &RequestContext) -> bool {
        self.is_approved_origin(ctx.origin.as_str()) || self.conn(ctx.connection).approved_once
    }

    /// Claims the one dialog slot of an origin.
    fn claim_dialog(&self, origin: &str) -> Result<BusyGuard, Failure> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| Failure::Internal("busy set poisoned".into()))?;
        if !busy.insert(origin.to_owned()) {
            return Err(Failure::Busy);
        }
        Ok(BusyGuard {
            set: Arc::clone(&self.busy),
            origin: origin.to_owned(),
        })
    }

    fn audit(&self, record: AuditRecord) {
        if let Some(log) = &self.audit {
            match log.lock() {
                Ok(mut log) => {
                    if let Err(e) = log.append(&record) {
                        tracing::error!(error = %e, "audit log append failed");
                    }
                }
                Err(_) => tracing::error!("audit log lock poisoned"),
            }
        }
    }

    /// Audits a request that failed before it reached a certificate; gives the failure back.
    fn audit_failure(&self, origin: &str, operation: &Operation, failure: Failure) -> Failure {
        self.audit(
            AuditRecord::new(origin.to_owned(), operation.clone()).outcome(failure.outcome()),
        );
        failure
    }

    async fn dispatch(&self, ctx: &RequestContext, request: Request) -> Result<Value, Failure> {
        match request {
            Request::Hello(_) => Ok(self.hello(ctx)),
            Request::RequestAccess => self.request_access(ctx).await,
            Request::TokensList => {
                self.ensure_approved(ctx).await?;
                self.tokens_list().await
            }
            Request::CertificatesList(p) => {
                self.ensure_approved(ctx).await?;
                self.certificates_list(p).await
            }
            Request::Sign(p) => {
                self.ensure_approved(ctx).await?;
                self.sign(ctx, p).await
            }
            Request::SignBatch(p) => {
                self.ensure_approved(ctx).await?;
                self.sign_batch(ctx, p).await
            }
            Request::Authenticate(p) => {
                self.ensure_approved(ctx).await?;
                self.authenticate(ctx, p).await
            }
            Request::KeysGenerate(_) => Err(Failure::NotBuilt("keys.generate")),
            Request::CertificatesImport(_) => Err(Failure::NotBuilt("certificates.import")),
            Request::Cancel { .. } => Err(Failure::Internal(
                "cancel reached the service; the bridge answers it".into(),
            )),
            _ => Err(Failure::Internal("unknown request kind".into())),
        }
    }

    fn hello(&self, ctx: &RequestContext) -> Value {
        let mut hello = HelloResult::new("keyport", VERSION, &ctx.origin, self.approved(ctx));
        hello.capabilities = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
        protocol::to_json(&hello)
    }

    async fn request_access(&self, ctx: &RequestContext) -> Result<Value, Failure> {
        let origin = ctx.origin.as_str();
        if self.is_denied_now(origin) {
            return Err(Failure::OriginDenied);
        }
        if self.is_approved_origin(origin) {
            return Ok(protocol::to_json(&RequestAccessResult {
                approved: true,
                remembered: true,
            }));
        }
        if self.conn(ctx.connection).approved_once {
            return Ok(protocol::to_json(&RequestAccessResult {
                approved: true,
                remembered: false,
            }));
        }
        let remembered = self.ask_origin(ctx).await?;
        Ok(protocol::to_json(&RequestAccessResult {
            approved: true,
            remembered,
        }))
    }

    /// Every method but `hello` needs an approved origin; an unapproved one is asked first.
    async fn ensure_approved(&self, ctx: &RequestContext) -> Result<(), Failure> {
        if self.is_denied_now(ctx.origin.as_str()) {
            return Err(Failure::OriginDenied);
        }
        if self.approved(ctx) {
            return Ok(());
        }
        self.ask_origin(ctx).await.map(|_| ())
    }

    /// Shows "Allow ORIGIN to use your certificates?"; returns whether it was remembered.
    async fn ask_origin(&self, ctx: &RequestContext) -> Result<bool, Failure> {
        if self.config.unknown_origins == UnknownOrigins::Unapproved {
            // The administrator allows no dialog for origins off the list.
            return Err(Failure::OriginNotApproved);
        }
        let origin = ctx.origin.as_str().to_owned();
        let _slot = self.claim_dialog(&origin)?;
        let dialog = self.texts.origin_approval(&origin);
        let pinentry = self.pinentry.clone();
        let cancel = DialogCancel::new();
        let c2 = cancel.clone();
        let answer = run_cancellable(ctx, &cancel, move || pinentry.confirm(&dialog, &c2)).await?;
        let decision = match OriginDecision::from_answer(answer) {
            Ok(d) => d,
            Err(DialogError::Timeout) => {
                return Err(Failure::Dialog(Arc::new(DialogError::Timeout)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "origin dialog could not be shown");
                return Err(Failure::OriginNotApproved);
            }
        };
        if ctx.cancel.is_cancelled() {
            return Err(Failure::Dialog(Arc::new(DialogError::Cancelled)));
        }
        match decision {
            OriginDecision::AllowAlways => {
                self.origins
                    .lock()
                    .map_err(|_| Failure::Internal("origin store poisoned".into()))?
                    .allow(&origin)
                    .map_err(|e| Failure::Internal(e.to_string()))?;
                self.audit(
                    AuditRecord::new(origin.clone(), Operation::OriginApprove)
                        .outcome(Outcome::Granted),
                );
                Ok(true)
            }
            OriginDecision::AllowOnce => {
                self.update_conn(ctx.connection, |c| c.approved_once = true);
                Ok(false)
            }
            OriginDecision::Deny => {
                if let Ok(mut d) = self.denied_now.lock() {
                    d.insert(origin.clone());
                }
                Err(self.audit_failure(&origin, &Operation::OriginApprove, Failure::OriginDenied))
            }
        }
    }

    async fn tokens_list(&self) -> Result<Value, Failure> {
        let tokens = self.tokens.clone();
        let list = blocking(move || tokens.tokens()).await?;
        Ok(protocol::to_json(&TokensListResult {
            tokens: list.iter().map(token_entry).collect(),
        }))
    }

    async fn certificates_list(&self, p: CertificatesListParams) -> Result<Value, Failure> {
        let tokens = self.tokens.clone();
        let certs = blocking(move || tokens.certificates()).await?;
        let filter = p.filter.unwrap_or_default();
        let now = time::OffsetDateTime::now_utc();
        let certificates = certs
            .iter()
            .filter(|c| matches_filter(&c.info, &filter, now))
            .filter_map(|c| certificate_entry(&c.info))
            .collect();
        Ok(protocol::to_json(&CertificatesListResult { certificates }))
    }

    async fn find_certificate(&self, id: &str) -> Result<CertificateView, Failure> {
        let id: CertificateId = id.parse().map_err(|_| {
            Failure::Token(pkcs11_shim::Error::InvalidInput(
                "certificateId is not a certificate id of this agent".into(),
            ))
        })?;
        let tokens = self.tokens.clone();
        blocking(move || tokens.certificate(&id))
            .await?
            .map_err(Failure::Token)
    }

    async fn sign(&self, ctx: &RequestContext, p: SignParams) -> Result<Value, Failure> {
        let items = vec![p.input];
        let (sigs, plan) = self
            .sign_items(ctx, &p.certificate_id, items, &p.options, false)
            .await?;
        let signature = sigs
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Internal("the token returned no signature".into()))?;
        Ok(protocol::to_json(&SignResult {
            signature: Base64Bytes(signature),
            format: plan.format,
            signature_algorithm: plan.wire_algorithm,
            digest_algorithm: plan.digest_algorithm,
            certificate: Base64Bytes(plan.certificate),
        }))
    }

    async fn sign_batch(&self, ctx: &RequestContext, p: SignBatchParams) -> Result<Value, Failure> {
        let items = p.items.into_iter().map(|i| i.input).collect();
        let (sigs, _plan) = self
            .sign_items(ctx, &p.certificate_id, items, &p.options, true)
            .await?;
        Ok(protocol::to_json(&SignBatchResult {
            results: sigs
                .into_iter()
                .map(|s| BatchSignature {
                    signature: Base64Bytes(s),
                })
                .collect(),
        }))
    }

    /// The heart of `sign` and `sign.batch`.
    async fn sign_items(
        &self,
        ctx: &RequestContext,
        certificate_id: &str,
        items: Vec<WireInput>,
        options: &SignOptions,
        batch: bool,
    ) -> Result<(Vec<Vec<u8>>, SignPlan), Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let operation = if batch {
            Operation::SignBatch
        } else {
            Operation::Sign
        };
        // The origin's one dialog slot is claimed before anything reaches the token: the
        // token's worker may be blocked by this origin's open dialog, and a second request must
        // get BUSY at once rather than queue behind it.
        let _slot = self
            .claim_dialog(&origin)
            .map_err(|e| self.audit_failure(&origin, &operation, e))?;
        let cert = self
            .find_certificate(certificate_id)
            .await
            .map_err(|e| self.audit_failure(&origin, &operation, e))?;
        let result = self.sign_with(ctx, &cert, items, options, batch).await;
        let mut record = AuditRecord::new(origin, operation)
            .certificate(cert.info.subject.clone(), &cert.info.der);
        match &result {
            Ok((_, plan)) => {
                for d in &plan.message_digests {
                    record = record.digest(d);
                }
                record = record.outcome(Outcome::Granted);
            }
            Err((e, digests)) => {
                for d in digests {
                    record = record.digest(d);
                }
                record = record.outcome(e.outcome());
            }
        }
        self.audit(record);
        result.map_err(|(e, _)| e)
    }

    async fn sign_with(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        items: Vec<WireInput>,
        options: &SignOptions,
        batch: bool,
    ) -> Result<(Vec<Vec<u8>>, SignPlan), (Failure, Vec<Vec<u8>>)> {
        let info = &cert.info;
        if !signing_allowed(&info.key_usage, self.config.signing_key_usage) {
            return Err((
                Failure::KeyUsage(
                    "this certificate is not for document signatures (keyUsage lacks nonRepudiation)"
                        .into(),
                ),
                Vec::new(),
            ));
        }
        let plan = SignPlan::new(info, &items, options).map_err(|e| (e, Vec::new()))?;
        let digests = plan.message_digests.clone();
        let (inputs, cms_attrs) = plan
            .token_inputs(items, info)
            .map_err(|e| (e, digests.clone()))?;

        let signer_holder = info.holder.clone();
        let signer_issuer = common_name(&info.issuer);
        let token_label = self.token_label(&info.token_id).await.unwrap_or_default();
        let origin = ctx.origin.as_str().to_owned();
        let title = options.display.title.as_str().to_owned();
        let summary = options
            .display
            .summary
            .as_ref()
            .map(|s| s.as_str().to_owned());
        let first_digest = digests.first().cloned().unwrap_or_default();
        let count = digests.len();
        let build: DialogBuilder = Arc::new(move |texts, unlock| {
            let signer = Signer {
                origin: &origin,
                holder: &signer_holder,
                issuer: &signer_issuer,
                token_label: &token_label,
            };
            let doc = Document {
                title: &title,
                summary: summary.as_deref(),
                digest: &first_digest,
            };
            if batch {
                texts.sign_batch(&signer, &doc, count, unlock)
            } else {
                texts.sign(&signer, &doc, unlock)
            }
        });

        let progress = batch.then(|| progress_sender(ctx));
        let req = SignRequest {
            certificate: info.id.clone(),
            algorithm: plan.algorithm,
            inputs,
            logout_after: self.config.pin_cache_seconds == 0,
        };
        let sigs = self
            .run_token(ctx, cert, req, build, progress)
            .await
            .map_err(|e| (e, digests.clone()))?;
        let sigs = plan
            .finish(sigs, &cms_attrs, info)
            .map_err(|e| (e, digests.clone()))?;
        Ok((sigs, plan))
    }

    async fn token_label(&self, token: &pkcs11_shim::TokenId) -> Option<String> {
        let tokens = self.tokens.clone();
        let token = token.clone();
        blocking(move || tokens.token(&token))
            .await
            .ok()
            .flatten()
            .map(|t| t.info.label.trim().to_owned())
    }

    /// Consent, PIN and signatures on the token (the caller holds the origin's dialog slot),
    /// `cancel` honoured, and the PIN cache kept.
    async fn run_token(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        req: SignRequest,
        build: DialogBuilder,
        progress: Option<pkcs11_shim::Progress>,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let module = cert.module.clone();
        let token_id = cert.info.token_id.clone();
        let dialog_cancel = DialogCancel::new();

        let state = {
            let module = module.clone();
            let token_id = token_id.clone();
            blocking(move || module.login_state(&token_id)).await??
        };
        let session_consent = self.config.consent_mode(ctx.origin.as_str()) == ConsentMode::Session
            && self.conn(ctx.connection).consented;
        tracing::debug!(?state, session_consent, "token login state");
        if state == LoginState::Locked {
            return Err(Failure::Token(pkcs11_shim::Error::PinLocked));
        }
        if state == LoginState::LoggedIn {
            if !session_consent {
                let pinentry = self.pinentry.clone();
                let texts = self.texts;
                let c2 = dialog_cancel.clone();
                let b2 = Arc::clone(&build);
                let answer = run_cancellable(ctx, &dialog_cancel, move || {
                    confirm_only(&pinentry, &c2, &texts, &b2)
                })
                .await?;
                answer.map_err(|e| Failure::Dialog(Arc::new(e)))?;
            }
            // Consent is given (now, or once for this connection); the token is logged in. A
            // key that wants its own PIN per signature, or a cache that expired just now, asks
            // with the same text.
            let outcome = DialogOutcome::default();
            let provider = DialogPinProvider::new(
                self.pinentry.clone(),
                dialog_cancel.clone(),
                self.texts,
                build,
                outcome.clone(),
            );
            let result = self
                .sign_on_token(
                    ctx,
                    module,
                    req,
                    dialog_cancel,
                    Box::new(provider),
                    progress,
                )
                .await;
            return match (result, outcome.error()) {
                (Err(Failure::Token(pkcs11_shim::Error::UserCancelled)), Some(e)) => {
                    Err(Failure::Dialog(e))
                }
                (other, _) => {
                    if other.is_ok() {
                        self.update_conn(ctx.connection, |c| c.consented = true);
                    }
                    other
                }
            };
        }
        // The consent and PIN dialog is shown here, off the module's worker thread; the token
        // work starts only with the user's answer. A wrong PIN comes back here for the next
        // dialog, with the token's warning.
        let protected = state == LoginState::ProtectedPath;
        let mut pin_state = match state {
            LoginState::NeedsPin(st) => PinState {
                wrong_pin: false,
                count_low: st.count_low,
                final_try: st.final_try,
            },
            _ => PinState::default(),
        };
        let mut progress = progress;
        loop {
            let unlock = if protected {
                Unlock::PinPad(pin_state)
            } else {
                Unlock::Pin(pin_state)
            };
            let dialog = build(&self.texts, unlock);
            let pinentry = self.pinentry.clone();
            let c2 = dialog_cancel.clone();
            let answer = run_cancellable(ctx, &dialog_cancel, move || dialog.ask(&pinentry, &c2))
                .await?
                .map_err(|e| Failure::Dialog(Arc::new(e)))?;
            let first = match answer {
                Consent::Pin(mut pin) => PinAnswer::Pin(SecretPin::from(std::mem::take(&mut *pin))),
                Consent::Confirmed => PinAnswer::Confirmed,
            };
            let wrong = Arc::new(Mutex::new(None));
            let outcome = DialogOutcome::default();
            let fallback = DialogPinProvider::new(
                self.pinentry.clone(),
                dialog_cancel.clone(),
                self.texts,
                Arc::clone(&build),
                outcome.clone(),
            );
            let provider = PreAsked::new(first, Arc::clone(&wrong), fallback);
            // `Module::sign` takes the request; a wrong PIN sends it again, so each attempt
            // gets a copy of the inputs (at most `max_message_bytes`, next to a human dialog).
            let result = self
                .sign_on_token(
                    ctx,
                    module.clone(),
                    req.clone(),
                    dialog_cancel.clone(),
                    Box::new(provider),
                    progress.take(),
                )
                .await;
            // (A batch cancelled before its first signature is a `Failure::Token`: see
            // `sign_on_token`.)
            if matches!(
                &result,
                Err(Failure::Token(pkcs11_shim::Error::UserCancelled))
            ) {
                if let Some(flags) = wrong.lock().ok().and_then(|w| *w) {
                    // A wrong PIN: the user may try again, in a new dialog that says so.
                    pin_state = PinState {
                        wrong_pin: true,
                        count_low: flags.count_low,
                        final_try: flags.final_try,
                    };
                    if progress.is_none() && req.inputs.len() > 1 {
                        progress = Some(progress_sender(ctx));
                    }
                    continue;
                }
                if let Some(e) = outcome.error() {
                    return Err(Failure::Dialog(e));
                }
            }
            if result.is_ok() {
                self.update_conn(ctx.connection, |c| c.consented = true);
            }
            return result;
        }
    }

    async fn sign_on_token(
        &self,
        ctx: &RequestContext,
        module: pkcs11_shim::Module,
        req: SignRequest,
        dialog_cancel: DialogCancel,
        provider: Box<dyn pkcs11_shim::PinProvider>,
        progress: Option<pkcs11_shim::Progress>,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let flag = Arc::new(AtomicBool::new(false));
        let token_id = req.certificate.token_id().clone();
        let card_mark = self.tokens.card_mark();
        let f2 = Arc::clone(&flag);
        let (m2, t2) = (module.clone(), token_id.clone());
        let logout_after = req.logout_after;
        // A thread of its own rather than a blocking task: a module that hangs in C_Sign must
        // hold up neither this answer (see the cancel below) nor the runtime's shutdown.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("keyport-sign".into())
            .spawn(move || {
                let result = m2.sign(req, provider, progress, Some(f2));
                if tx.send(result).is_err() && !logout_after {
                    // Given up on after a cancel; a login it made is not left cached.
                    let _ = m2.logout(&t2);
                }
            })
            .map_err(|e| Failure::Internal(format!("cannot start a signing thread: {e}")))?;
        let joined = tokio::select! {
            r = &mut rx => r,
            () = ctx.cancel.cancelled() => {
                flag.store(true, Ordering::SeqCst);
                dialog_cancel.cancel();
                match tokio::time::timeout(CANCEL_GRACE, &mut rx).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            path = %module.path().display(),
                            token = %token_id,
                            "the token did not stop within {} s of the cancel; the signature is left to end in the background",
                            CANCEL_GRACE.as_secs()
                        );
                        return Err(Failure::Token(pkcs11_shim::Error::Cancelled));
                    }
                }
            }
        };
        let mut result = joined
            .map_err(|_| Failure::Internal("the signing thread ended without an answer".into()))?;
        if let Err(failure) = &mut result {
            // A device error may be a card pulled in the middle of a command.
            if matches!(failure.error, pkcs11_shim::Error::Pkcs11 { .. }) {
                let (tokens, m, t) = (self.tokens.clone(), module.clone(), token_id.clone());
                if blocking(move || tokens.card_was_pulled(card_mark, &m, &t))
                    .await
                    .unwrap_or(false)
                {
                    tracing::info!(error = %failure.error, "the card was removed during the operation");
                    failure.error = pkcs11_shim::Error::TokenNotPresent;
                }
            }
        }
        if !logout_after {
            self.schedule_logout(module, token_id);
        }
        result.map_err(|SignFailure { error, completed }| {
            if completed.is_empty() {
                Failure::Token(error)
            } else {
                Failure::Batch { error, completed }
            }
        })
    }

    /// With `pin_cache_seconds`, logs the token out that long after its last use.
    fn schedule_logout(&self, module: pkcs11_shim::Module, token: pkcs11_shim::TokenId) {
        let secs = self.config.pin_cache_seconds;
        let cache = Arc::clone(&self.pin_cache);
        let key = token.to_string();
        let generation = match cache.lock() {
            Ok(mut c) => {
                let g = c.entry(key.clone()).or_insert(0);
                *g += 1;
                *g
            }
            Err(_) => return,
        };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let current = cache.lock().ok().and_then(|c| c.get(&key).copied());
            if current == Some(generation) {
                let _ = tokio::task::spawn_blocking(move || module.logout(&token)).await;
                tracing::debug!("PIN cache expired; token logged out");
            }
        });
    }

    async fn authenticate(
        &self,
        ctx: &RequestContext,
        p: AuthenticateParams,
    ) -> Result<Value, Failure> {
        let origin = ctx.origin.as_str().to_owned();
        // As in `sign_items`: BUSY before the token is touched.
        let _slot = self
            .claim_dialog(&origin)
            .map_err(|e| self.audit_failure(&origin, &Operation::Authenticate, e))?;
        let cert = match &p.certificate_id {
            Some(id) => self.find_certificate(id).await,
            None => self.pick_login_certificate().await,
        }
        .map_err(|e| self.audit_failure(&origin, &Operation::Authenticate, e))?;
        let result = self.authenticate_with(ctx, &cert, &p).await;
        let mut record = AuditRecord::new(origin, Operation::Authenticate)
            .certificate(cert.info.subject.clone(), &cert.info.der);
        record = match &result {
            Ok((_, digest)) => record.digest(digest).outcome(Outcome::Granted),
            Err(e) => record.outcome(e.outcome()),
        };
        self.audit(record);
        result.map(|(v, _)| v)
    }

    async fn authenticate_with(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        p: &AuthenticateParams,
    ) -> Result<(Value, Vec<u8>), Failure> {
        let info = &cert.info;
        if !info.key_usage.is_empty() && !info.key_usage.contains(&KeyUsage::DigitalSignature) {
            return Err(Failure::KeyUsage(
                "this certificate may not be used to log in (keyUsage lacks digitalSignature)"
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
        let build: DialogBuilder = Arc::new(move |texts, unlock| {
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
        };
        let sig = self
            .run_token(ctx, cert, req, build, None)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Internal("the token returned no signature".into()))?;
        let algorithm: AuthAlgorithm = serde_json::from_value(Value::String(alg.jwa.to_owned()))
            .map_err(|e| Failure::Internal(format!("algorithm name: {e}")))?;
        let token = AuthenticateResult::new(info.der.clone(), algorithm, sig, VERSION);
        Ok((protocol::to_json(&token), shown_digest))
    }

    /// Without a `certificateId`: the certificate made for logging in (clientAuth), else the
    /// first that allows digitalSignature.
    async fn pick_login_certificate(&self) -> Result<CertificateView, Failure> {
        let tokens = self.tokens.clone();
        let certs = blocking(move || tokens.certificates()).await?;
        let allows = |c: &&CertificateView| {
            c.info.key_usage.is_empty() || c.info.key_usage.contains(&KeyUsage::DigitalSignature)
        };
        certs
            .iter()
            .filter(allows)
            .find(|c| c.info.extended_key_usage.iter().any(|e| e == "clientAuth"))
            .or_else(|| certs.iter().find(allows))
            .cloned()
            .ok_or(Failure::Token(pkcs11_shim::Error::KeyNotFound))
    }
}

impl Backend for Service {
    /// The configuration's and the user's persisted lists decide here (403). An origin the user
    /// denied in a dialog since the agent started still connects, so its page can tell the user
    /// ORIGIN_DENIED rather than "the agent is not running"; every call but `hello` is refused.
    fn admit_origin(&self, origin: &Origin) -> bool {
        self.origins
            .lock()
            .map(|o| o.admits(origin.as_str()))
            .unwrap_or(false)
    }

    async fn handle(&self, ctx: RequestContext, request: Request) -> Result<Value, RpcError> {
        let method = request.method();
        let span = tracing::info_span!(
            "request",
            id = %ctx.request_id,
            origin = %ctx.origin.as_str(),
            conn = %ctx.connection,
            method
        );
        let result = self.dispatch(&ctx, request).instrument(span.clone()).await;
        match result {
            Ok(v) => {
                tracing::info!(parent: &span, "done");
                Ok(v)
            }
            Err(e) => {
                tracing::info!(parent: &span, error = %e, "failed");
                Err(e.to_rpc())
            }
        }
    }

    fn connection_closed(&self, conn: ConnectionId) {
        if let Ok(mut c) = self.connections.lock() {
            c.remove(&conn);
        }
    }
}

/// Frees an origin's dialog slot when the request ends, however it ends.
struct BusyGuard {
    set: Arc<Mutex<HashSet<String>>>,
    origin: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.origin);
        }
    }
}

/// What a signing request turned into: algorithm, digests, output format.
#[derive(Debug, Clone)]
pub(crate) struct SignPlan {
    pub(crate) algorithm: SignAlgorithm,
    pub(crate) wire_algorithm: SignatureAlgorithm,
    digest_algorithm: DigestAlgorithm,
    format: SignFormat,
    /// The digest of each document (what the dialog and audit show).
    pub(crate) message_digests: Vec<Vec<u8>>,
    certificate: Vec<u8>,
}

impl SignPlan {
    pub(crate) fn new(
        info: &pkcs11_shim::CertificateInfo,
        items: &[WireInput],
        options: &SignOptions,
    ) -> Result<SignPlan, Failure> {
        let format = options.format.unwrap_or_default();
        let key = info.key_algorithm;
        let ed = matches!(key, KeyAlgorithm::Ed25519);
        // One hash for the whole request.
        let mut hash: Option<DigestAlgorithm> = None;
        for item in items {
            let h = match item {
                WireInput::Digest(d) => d.algorithm,
                WireInput::Data(_) => {
                    if ed {
                        DigestAlgorithm::Sha512
                    } else {
                        options.data_hash()
                    }
                }
            };
            if hash.is_some_and(|x| x != h) {
                return Err(Failure::InvalidParams(
                    "every item of a batch must use the same digest algorithm".into(),
                ));
            }
            hash = Some(h);
        }
        let digest_algorithm = hash.unwrap_or_default();
        if ed {
            let has_digest = items.iter().any(|i| matches!(i, WireInput::Digest(_)));
            if has_digest
                && (format == SignFormat::Raw || digest_algorithm != DigestAlgorithm::Sha512)
            {
                return Err(Failure::InvalidParams(
                    "Ed25519 signs the document itself: send data, not a digest".into(),
                ));
            }
        }
        let h = hash_alg(digest_algorithm);
        let encoding = match (format, options.ecdsa_encoding.unwrap_or_default()) {
            (SignFormat::Cms, _) | (_, WireEcdsa::Der) => EcdsaEncoding::Der,
            (_, WireEcdsa::P1363) => EcdsaEncoding::P1363,
        };
        let requested = options.signature_algorithm;
        let (algorithm, wire_algorithm) = match (key, requested) {
            (KeyAlgorithm::Rsa { .. }, None | Some(SignatureAlgorithm::RsaPkcs1v15)) => (
                SignAlgorithm::RsaPkcs1v15(h),
                SignatureAlgorithm::RsaPkcs1v15,
            ),
            (KeyAlgorithm::Rsa { .. }, Some(SignatureAlgorithm::RsaPss)) => {
                (SignAlgorithm::RsaPss(h), SignatureAlgorithm::RsaPss)
            }
            (
                KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 | KeyAlgorithm::EcP521,
                None | Some(SignatureAlgorithm::Ecdsa),
            ) => (SignAlgorithm::Ecdsa(h, encoding), SignatureAlgorithm::Ecdsa),
            (KeyAlgorithm::Ed25519, None | Some(SignatureAlgorithm::Ed25519)) => {
                (SignAlgorithm::Ed25519, SignatureAlgorithm::Ed25519)
            }
            (key, asked) => return Err(cannot_sign(key, asked)),
        };
        if options.ecdsa_encoding.is_some() && wire_algorithm != SignatureAlgorithm::Ecdsa {
            return Err(Failure::InvalidParams(
                "ecdsaEncoding applies to ECDSA only".into(),
            ));
        }
        let message_digests = items
            .iter()
            .map(|i| match i {
                WireInput::Digest(d) => d.value.0.clone(),
                WireInput::Data(data) => h.digest(&data.0),
            })
            .collect();
        Ok(SignPlan {
            algorithm,
            wire_algorithm,
            digest_algorithm,
            format,
            message_digests,
            certificate: info.der.clone(),
        })
    }

    /// What the token signs for each item: the digest or data itself (raw), or the DER signed
    /// attributes (CMS), which are kept to assemble the SignedData afterwards.
    pub(crate) fn token_inputs(
        &self,
        items: Vec<WireInput>,
        info: &pkcs11_shim::CertificateInfo,
    ) -> Result<(Vec<SignInput>, Vec<cms::SignedAttributes>), Failure> {
        match self.format {
            SignFormat::Raw => Ok((
                items
                    .into_iter()
                    .map(|i| match i {
                        WireInput::Digest(d) => SignInput::Digest(d.value.0),
                        WireInput::Data(d) => SignInput::Data(d.0),
                    })
                    .collect(),
                Vec::new(),
            )),
            SignFormat::Cms => {
                let now = time::OffsetDateTime::now_utc();
                let attrs = self
                    .message_digests
                    .iter()
                    .map(|md| {
                        cms::signed_attributes(
                            cms_digest(self.digest_algorithm),
                            md,
                            now,
                            &info.der,
                        )
                        .map_err(|e| Failure::Internal(format!("CMS: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let inputs = attrs
                    .iter()
                    .map(|a| SignInput::Data(a.to_be_signed().to_vec()))
                    .collect();
                Ok((inputs, attrs))
            }
        }
    }

    /// Turns the token's signatures into the requested output.
    pub(crate) fn finish(
        &self,
        sigs: Vec<Vec<u8>>,
        attrs: &[cms::SignedAttributes],
        info: &pkcs11_shim::CertificateInfo,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        if self.format == SignFormat::Raw {
            return Ok(sigs);
        }
        let h = cms_digest(self.digest_algorithm);
        let alg = match self.algorithm {
            SignAlgorithm::RsaPkcs1v15(_) => CmsSignatureAlg::RsaPkcs1(h),
            SignAlgorithm::RsaPss(_) => CmsSignatureAlg::RsaPss(h),
            SignAlgorithm::Ecdsa(..) => CmsSignatureAlg::EcdsaWith(h),
            SignAlgorithm::Ed25519 => CmsSignatureAlg::Ed25519,
        };
        sigs.iter()
            .zip(attrs)
            .map(|(sig, a)| {
                cms::assemble(a, &info.der, alg, sig)
                    .map_err(|e| Failure::Internal(format!("CMS: {e}")))
            })
            .collect()
    }
}

/// ALGORITHM_NOT_SUPPORTED for a key asked for a signature it cannot make, in the protocol's
/// names: "an EC-P256 key cannot sign RSA-PSS".
fn cannot_sign(key: KeyAlgorithm, asked: Option<SignatureAlgorithm>) -> Failure {
    let key = a_key(&key.wire_name());
    Failure::Algorithm(match asked {
        Some(asked) => format!("{key} cannot sign {}", asked.as_str()),
        None => format!("{key} cannot sign here"),
    })
}

/// "an RSA-2048 key": every key name the protocol has (RSA-…, EC-…, Ed25519) is read with a
/// vowel sound first.
fn a_key(name: &str) -> String {
    format!("an {name} key")
}

fn hash_alg(d: DigestAlgorithm) -> HashAlg {
    match d {
        DigestAlgorithm::Sha256 => HashAlg::Sha256,
        DigestAlgorithm::Sha384 => HashAlg::Sha384,
        DigestAlgorithm::Sha512 => HashAlg::Sha512,
    }
}

fn cms_digest(d: DigestAlgorithm) -> DigestAlg {
    match d {
        DigestAlgorithm::Sha256 => DigestAlg::Sha256,
        DigestAlgorithm::Sha384 => DigestAlg::Sha384,
        DigestAlgorithm::Sha512 => DigestAlg::Sha512,
    }
}

/// Certificates may sign documents with nonRepudiation, or with no keyUsage at all, unless the
/// policy allows any.
pub(crate) fn signing_allowed(usage: &[KeyUsage], policy: SigningKeyUsage) -> bool {
    policy == SigningKeyUsage::Any || usage.is_empty() || usage.contains(&KeyUsage::NonRepudiation)
}

fn matches_filter(
    c: &pkcs11_shim::CertificateInfo,
    f: &CertificateFilter,
    now: time::OffsetDateTime,
) -> bool {
    if let Some(wanted) = &f.key_usage {
        let have: Vec<Option<WireKeyUsage>> =
            c.key_usage.iter().map(|k| wire_key_usage(*k)).collect();
        if !wanted.iter().all(|w| have.contains(&Some(*w))) {
            return false;
        }
    }
    if let Some(issuer) = &f.issuer {
        if !c.issuer.contains(issuer.as_str()) {
            return false;
        }
    }
    if let Some(subject) = &f.subject {
        if !c.subject.contains(subject.as_str()) {
            return false;
        }
    }
    if let Some(at) = &f.valid_at {
        let t = match at {
            ValidAt::Now(_) => now,
            ValidAt::At(Timestamp(t)) => *t,
        };
        if t < c.not_before || t > c.not_after {
            return false;
        }
    }
    if let Some(algs) = &f.key_algorithm {
        let Some(alg) = wire_key_algorithm(c.key_algorithm) else {
            return false;
        };
        if !algs.iter().any(|a| a.matches(alg)) {
            return false;
        }
    }
    if let Some(token) = &f.token_id {
        if c.token_id.as_str() != token {
            return false;
        }
    }
    true
}

fn wire_key_usage(k: KeyUsage) -> Option<WireKeyUsage> {
    serde_json::from_value(Value::String(k.rfc5280_name().to_owned())).ok()
}

fn wire_key_algorithm(k: KeyAlgorithm) -> Option<protocol::KeyAlgorithm> {
    serde_json::from_value(Value::String(k.wire_name())).ok()
}

/// The protocol's entry for a certificate; `None` for a key size the protocol cannot name.
pub fn certificate_entry(c: &pkcs11_shim::CertificateInfo) -> Option<CertificateEntry> {
    Some(CertificateEntry {
        id: c.id.to_string(),
        token_id: c.token_id.to_string(),
        certificate: Base64Bytes(c.der.clone()),
        subject: c.subject.clone(),
        issuer: c.issuer.clone(),
        serial_number: c.serial_hex.clone(),
        not_before: Timestamp(c.not_before),
        not_after: Timestamp(c.not_after),
        key_algorithm: wire_key_algorithm(c.key_algorithm)?,
        key_usage: c
            .key_usage
            .iter()
            .filter_map(|k| wire_key_usage(*k))
            .collect(),
        extended_key_usage: c.extended_key_usage.clone(),
    })
}

/// The protocol's entry for a token.
pub fn token_entry(t: &TokenView) -> TokenEntry {
    TokenEntry {
        id: t.info.id.to_string(),
        label: t.info.label.trim().to_owned(),
        manufacturer: t.info.manufacturer.trim().to_owned(),
        model: t.info.model.trim().to_owned(),
        serial: t.info.serial.trim().to_owned(),
        reader: t.reader.clone(),
        pin_pad: t.info.pin_pad,
        pin: WirePinState {
            initialized: t.info.pin.initialized,
            count_low: t.info.pin.count_low,
            final_try: t.info.pin.final_try,
            locked: t.info.pin.locked,
        },
    }
}

/// `CN=Alice,O=X` → `Alice`; the whole string when there is no CN.
pub fn common_name(dn: &str) -> String {
    dn.split(',')
        .find_map(|part| part.trim().strip_prefix("CN="))
        .map_or_else(|| dn.to_owned(), str::to_owned)
}

/// `sign.progress` at most ten times a second, and always the last one.
fn progress_sender(ctx: &RequestContext) -> pkcs11_shim::Progress {
    let notifier = ctx.notifier.clone();
    let request_id = ctx.request_id.clone();
    let mut last: Option<Instant> = None;
    Box::new(move |done, total| {
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL);
        if due || done == total {
            last = Some(now);
            notifier.send_event(&SignProgress {
                request_id: request_id.clone(),
                done: u32::try_from(done).unwrap_or(u32::MAX),
                total: u32::try_from(total).unwrap_or(u32::MAX),
            });
        }
    })
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Internal(format!("blocking task failed: {e}")))
}

/// Runs a dialog off the async workers; the request's cancel closes it.
async fn run_cancellable<T: Send + 'static>(
    ctx: &RequestContext,
    cancel: &DialogCancel,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    let mut task = tokio::task::spawn_blocking(f);
    let joined = tokio::select! {
        r = &mut task => r,
        () = ctx.cancel.cancelled() => {
            cancel.cancel();
            task.await
        }
    };
    joined.map_err(|e| Failure::Internal(format!("dialog task failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_algorithm_mismatch_is_told_in_the_protocols_names() {
        let message = |f: Failure| f.to_rpc().message;
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::EcP256,
                Some(SignatureAlgorithm::RsaPss)
            )),
            "an EC-P256 key cannot sign RSA-PSS"
        );
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::Rsa { bits: 2048 },
                Some(SignatureAlgorithm::Ed25519)
            )),
            "an RSA-2048 key cannot sign Ed25519"
        );
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::Ed25519,
                Some(SignatureAlgorithm::RsaPkcs1v15)
            )),
            "an Ed25519 key cannot sign RSASSA-PKCS1-v1_5"
        );
        assert_eq!(
            message(Failure::Token(pkcs11_shim::Error::MechanismNotSupported {
                algorithm: "RSA-PSS-SHA256".into(),
                key: "EC-P384".into(),
            })),
            "RSA-PSS-SHA256 is not possible with an EC-P384 key on this token"
        );
    }
}
