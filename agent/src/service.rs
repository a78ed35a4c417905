//! The signing service behind the WebSocket: each request flows origin policy → consent (and
//! PIN) → token → output format → audit. It implements the bridge's [`Backend`].
//!
//! This file holds the service's state, the dispatch and the helpers every operation shares;
//! each operation group has its own file under `service/`.

mod enroll;
mod failure;
mod listing;
mod login;
mod origin;
mod pin_cache;
mod sign;

pub(crate) use enroll::generation_failure;
pub(crate) use enroll::skf as enroll_skf;
pub use failure::Failure;
pub use listing::{certificate_entry, token_entry};
pub(crate) use sign::{signing_allowed, SignPlan};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backend::{CertificateId, TokenError, TokenId};
use browser_bridge::protocol::{Answer, Request, RpcError};
use browser_bridge::{Backend, ConnectionId, Origin, RequestContext};
use tracing::Instrument;

use crate::audit::{AuditRecord, AuditWriter, Operation};
use crate::config::Config;
use crate::dialog::Texts;
use crate::origins::OriginStore;
use crate::pinentry::{DialogCancel, Pinentry};
use crate::tokens::{CertificateView, TokenSet};

/// The agent's version, as `hello` and Web eID's `appVersion` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the service knows of one connection.
#[derive(Debug, Default, Clone, Copy)]
struct ConnState {
    /// "Allow once" for this connection.
    approved_once: bool,
    /// The user consented once on this connection (origins with `consent = "session"`): for
    /// this kind of operation with this certificate only.
    consented: Option<crate::purpose::SessionConsent>,
}

/// The service. One per agent, shared by every connection.
#[derive(Debug)]
pub struct Service {
    config: Config,
    tokens: TokenSet,
    /// The configuration's and user's origin lists, and this run's dialog denials.
    origins: Mutex<OriginStore>,
    pinentry: Pinentry,
    texts: Texts,
    /// The audit log's group-commit writer.
    audit: Option<AuditWriter>,
    /// Each origin's dialogs: one shown, at most `origin::MAX_WAITING` waiting.
    dialog_lines: origin::DialogLines,
    connections: Mutex<HashMap<ConnectionId, ConnState>>,
    /// The PIN cache's logout timer of each token.
    pin_cache: pin_cache::LogoutTimers,
    /// Held while a signature's lookup lists every certificate: the signatures arriving
    /// meanwhile wait for that listing and find their certificate in the cache it fills,
    /// rather than each looking theirs up on its token.
    certificate_listing: tokio::sync::Mutex<()>,
}

impl Service {
    pub fn new(
        config: Config,
        tokens: TokenSet,
        origins: OriginStore,
        pinentry: Pinentry,
        texts: Texts,
        audit: Option<AuditWriter>,
    ) -> Service {
        Service {
            config,
            tokens,
            origins: Mutex::new(origins),
            pinentry,
            texts,
            audit,
            dialog_lines: Arc::new(Mutex::new(HashMap::new())),
            connections: Mutex::new(HashMap::new()),
            pin_cache: pin_cache::LogoutTimers::default(),
            certificate_listing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn tokens(&self) -> &TokenSet {
        &self.tokens
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

    async fn audit(&self, record: AuditRecord) {
        if let Err(e) = self.audit_durable(record).await {
            tracing::error!(error = %e, "audit log append failed");
        }
    }

    /// Appends the record and returns once it is on disk (its group's `fdatasync`). A granted
    /// signature or login is released only after this succeeds (fails closed: INTERNAL,
    /// nothing released).
    async fn audit_durable(&self, record: AuditRecord) -> Result<(), Failure> {
        let Some(writer) = &self.audit else {
            return Ok(());
        };
        writer.append(record).await.map_err(|e| {
            tracing::error!(error = %crate::tokens::error_chain(&e), "audit record not written: the result is withheld");
            Failure::Internal(format!("the audit record could not be written: {e}"))
        })
    }

    /// Audits a request that failed before it reached a certificate; gives the failure back.
    async fn audit_failure(
        &self,
        origin: &str,
        operation: &Operation,
        failure: Failure,
    ) -> Failure {
        self.audit(
            AuditRecord::new(origin.to_owned(), operation.clone()).outcome(failure.outcome()),
        )
        .await;
        failure
    }

    async fn dispatch(&self, ctx: &RequestContext, request: Request) -> Result<Answer, Failure> {
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
            Request::KeysGenerate(p) => {
                self.ensure_approved(ctx).await?;
                let answer = self.keys_generate(ctx, p).await;
                // A new key (its login, too) may change what certificates.list shows.
                self.tokens.certificates_changed();
                answer
            }
            Request::CertificatesImport(p) => {
                self.ensure_approved(ctx).await?;
                let answer = self.certificates_import(ctx, p).await;
                self.tokens.certificates_changed();
                answer
            }
            Request::Cancel { .. } => Err(Failure::Internal(
                "cancel reached the service; the bridge answers it".into(),
            )),
            _ => Err(Failure::Internal("unknown request kind".into())),
        }
    }

    async fn find_certificate(&self, id: &str) -> Result<CertificateView, Failure> {
        let id: CertificateId = id.parse().map_err(|_| {
            Failure::Token(TokenError::InvalidInput(
                "certificateId is not a certificate id of this agent".into(),
            ))
        })?;
        // certificates.list's cache (issue 12) spares the sign path a hop to the module's worker.
        if let Some(found) = self.tokens.cached_certificate(&id) {
            return Ok(found);
        }
        // No cache, or one only aged (another program may have changed a token): every
        // certificate is listed (see `certificate_listing_due` for when not), so that the
        // signatures after this one find theirs in the cache. Looking one up on its token costs
        // the module a search of every object each time (the worker's check for changes by
        // other programs).
        let listing_under_way = self.certificate_listing.try_lock().is_err();
        if listing_under_way || self.tokens.certificate_listing_due() {
            let _turn = self.certificate_listing.lock().await;
            if let Some(found) = self.tokens.cached_certificate(&id) {
                return Ok(found);
            }
            if self.tokens.certificate_listing_due() {
                let tokens = self.tokens.clone();
                let listed = blocking(move || tokens.certificates_cached_or_busy()).await;
                if let Ok((certs, busy)) = listed {
                    if let Some(found) = certs.iter().find(|c| id.names(&c.info)) {
                        return Ok(found.clone());
                    }
                    // A library that did not answer in time was waited for once: what
                    // looking the certificate up on its token would say after waiting again.
                    if let Some(busy) = busy {
                        return Err(Failure::Token(busy));
                    }
                }
            }
        }
        let mark = self.tokens.card_mark();
        let e = match self.tokens.certificate_async(&id).await {
            Ok(found) => return Ok(found),
            Err(e) => e,
        };
        // A module host that failed while a card was pulled (a module that deadlocked on the
        // removal): the page learns the token is gone, if it is.
        let e = if matches!(e, TokenError::ModuleHost(_)) {
            let (tokens, token) = (self.tokens.clone(), id.token_id());
            if blocking(move || tokens.token_was_pulled(mark, &token))
                .await
                .unwrap_or(false)
            {
                tracing::info!(error = %e, "the card was removed while its module host failed");
                TokenError::TokenNotPresent
            } else {
                e
            }
        } else {
            e
        };
        if e.is_removal() {
            self.tokens.certificates_changed();
        }
        Err(Failure::Token(e))
    }

    /// The token's label for a dialog: as the last listing saw it, else from a listing now.
    async fn token_label(&self, token: &TokenId) -> Option<String> {
        if let Some(label) = self.tokens.known_label(token) {
            return Some(label);
        }
        let tokens = self.tokens.clone();
        let token = token.clone();
        blocking(move || tokens.token(&token))
            .await
            .ok()
            .flatten()
            .map(|t| t.info.label.trim().to_owned())
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

    /// Listed or remembered origins get the common connection pool; the others share the
    /// bridge's small pool of strangers.
    fn is_approved(&self, origin: &Origin) -> bool {
        self.is_approved_origin(origin.as_str())
    }

    async fn handle(&self, ctx: RequestContext, request: Request) -> Result<Answer, RpcError> {
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

/// `CN=Alice,O=X` → `Alice`; the whole string when there is no CN.
pub fn common_name(dn: &str) -> String {
    dn.split(',')
        .find_map(|part| part.trim().strip_prefix("CN="))
        .map_or_else(|| dn.to_owned(), str::to_owned)
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
