//! Origin policy: `hello`, `requestAccess`, the approval dialog, and each origin's one dialog
//! slot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use browser_bridge::protocol::{self, HelloResult, RequestAccessResult};
use browser_bridge::RequestContext;
use serde_json::Value;

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::config::UnknownOrigins;
use crate::dialog::OriginDecision;
use crate::origins::Standing;
use crate::pinentry::{DialogCancel, DialogError};

use super::{run_cancellable, Failure, Service, VERSION};

/// Capabilities built in this agent (`keys.generate` is not built yet, so it is not claimed).
const CAPABILITIES: &[&str] = &[
    "certificates",
    "sign",
    "sign.batch",
    "cms",
    "authenticate",
    "events",
];

impl Service {
    pub(super) fn hello(&self, ctx: &RequestContext) -> Value {
        let mut hello = HelloResult::new("keyport", VERSION, &ctx.origin, self.approved(ctx));
        hello.capabilities = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
        protocol::to_json(&hello)
    }

    pub(super) async fn request_access(&self, ctx: &RequestContext) -> Result<Value, Failure> {
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
    pub(super) async fn ensure_approved(&self, ctx: &RequestContext) -> Result<(), Failure> {
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
                if let Ok(o) = self.origins.lock() {
                    o.deny_for_now(&origin);
                }
                Err(self.audit_failure(&origin, &Operation::OriginApprove, Failure::OriginDenied))
            }
        }
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
        self.origins
            .lock()
            .map(|o| o.is_denied_for_now(origin))
            .unwrap_or(true)
    }

    fn approved(&self, ctx: &RequestContext) -> bool {
        self.is_approved_origin(ctx.origin.as_str()) || self.conn(ctx.connection).approved_once
    }

    /// Claims the one dialog slot of an origin.
    pub(super) fn claim_dialog(&self, origin: &str) -> Result<BusyGuard, Failure> {
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
}

/// Frees an origin's dialog slot when the request ends, however it ends.
pub(super) struct BusyGuard {
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
