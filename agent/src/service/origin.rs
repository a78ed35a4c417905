//! Origin policy: `hello`, `requestAccess`, the approval dialog, and each origin's dialog
//! line (one dialog shown, a few waiting in order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use browser_bridge::protocol::Answer;
use browser_bridge::protocol::{HelloResult, RequestAccessResult};
use browser_bridge::RequestContext;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::config::UnknownOrigins;
use crate::dialog::OriginDecision;
use crate::origins::OriginCheck;
use crate::pinentry::{DialogCancel, DialogError};

use super::{run_cancellable, Failure, Service, VERSION};

/// Capabilities built in this agent (`keys.generate` covers `certificates.import` too).
const CAPABILITIES: &[&str] = &[
    "certificates",
    "sign",
    "sign.batch",
    "cms",
    "authenticate",
    "keys.generate",
    "events",
];

impl Service {
    pub(super) fn hello(&self, ctx: &RequestContext) -> Answer {
        let mut hello = HelloResult::new("keyport", VERSION, &ctx.origin, self.approved(ctx));
        hello.capabilities = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
        Answer::of(&hello)
    }

    pub(super) async fn request_access(&self, ctx: &RequestContext) -> Result<Answer, Failure> {
        let check = self.origin_check(ctx.origin.as_str());
        if check.denied_for_now {
            return Err(Failure::OriginDenied);
        }
        if check.is_approved() {
            return Ok(Answer::of(&RequestAccessResult {
                approved: true,
                remembered: true,
            }));
        }
        if self.conn(ctx.connection).approved_once {
            return Ok(Answer::of(&RequestAccessResult {
                approved: true,
                remembered: false,
            }));
        }
        let remembered = self.ask_origin(ctx).await?;
        Ok(Answer::of(&RequestAccessResult {
            approved: true,
            remembered,
        }))
    }

    /// Every method but `hello` needs an approved origin; an unapproved one is asked first.
    pub(super) async fn ensure_approved(&self, ctx: &RequestContext) -> Result<(), Failure> {
        let check = self.origin_check(ctx.origin.as_str());
        if check.denied_for_now {
            return Err(Failure::OriginDenied);
        }
        if check.is_approved() || self.conn(ctx.connection).approved_once {
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
        let _turn = self.dialog_turn(ctx).await?;
        // Another request of this origin may have asked while this one waited.
        let check = self.origin_check(&origin);
        if check.denied_for_now {
            return Err(Failure::OriginDenied);
        }
        if check.is_approved() {
            return Ok(true);
        }
        if self.conn(ctx.connection).approved_once {
            return Ok(false);
        }
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
                )
                .await;
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
                Err(self
                    .audit_failure(&origin, &Operation::OriginApprove, Failure::OriginDenied)
                    .await)
            }
        }
    }

    /// Whether events may go to connections of this origin (approved always, or once on some
    /// connection is not enough: events go to origins approved for good).
    pub fn is_approved_origin(&self, origin: &str) -> bool {
        self.origin_check(origin).is_approved()
    }

    /// The origin's standing, from one look at the user's decisions file; a poisoned store
    /// answers denied.
    fn origin_check(&self, origin: &str) -> OriginCheck {
        self.origins
            .lock()
            .map(|o| o.check(origin))
            .unwrap_or(OriginCheck::DENIED)
    }

    fn approved(&self, ctx: &RequestContext) -> bool {
        self.is_approved_origin(ctx.origin.as_str()) || self.conn(ctx.connection).approved_once
    }

    /// Waits for this origin's dialog turn: at once when no dialog of the origin is open,
    /// else in order behind it, with at most [`MAX_WAITING`] requests waiting (the next gets
    /// BUSY at once). A `cancel` (or the connection's end) while waiting answers USER_CANCELLED.
    /// Only a request about to show a dialog calls this: one that needs no dialog never waits.
    pub(super) async fn dialog_turn(&self, ctx: &RequestContext) -> Result<DialogTurn, Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let turn = {
            let mut lines = self
                .dialog_lines
                .lock()
                .map_err(|_| Failure::Internal("dialog lines poisoned".into()))?;
            let line = lines.entry(origin.clone()).or_default();
            if let Ok(permit) = Arc::clone(&line.turn).try_acquire_owned() {
                return Ok(DialogTurn::new(permit, &self.dialog_lines, origin));
            }
            if line.waiting >= MAX_WAITING {
                return Err(Failure::Busy);
            }
            line.waiting += 1;
            Arc::clone(&line.turn)
        };
        let _waiting = Waiting {
            lines: Arc::clone(&self.dialog_lines),
            origin: origin.clone(),
        };
        tokio::select! {
            permit = turn.acquire_owned() => permit
                .map(|p| DialogTurn::new(p, &self.dialog_lines, origin))
                .map_err(|_| Failure::Internal("dialog turn closed".into())),
            () = ctx.cancel.cancelled() => Err(Failure::Dialog(Arc::new(DialogError::Cancelled))),
        }
    }
}

/// Requests of one origin that may wait for its open dialog, beyond the one shown.
pub(crate) const MAX_WAITING: usize = 4;

/// One origin's dialogs: one shown at a time, and how many requests wait for their turn.
#[derive(Debug)]
pub(super) struct DialogLine {
    turn: Arc<Semaphore>,
    waiting: usize,
}

impl Default for DialogLine {
    fn default() -> Self {
        DialogLine {
            turn: Arc::new(Semaphore::new(1)),
            waiting: 0,
        }
    }
}

pub(super) type DialogLines = Arc<Mutex<HashMap<String, DialogLine>>>;

/// The right to show a dialog for an origin; the next waiting request's turn comes when it is
/// dropped.
#[derive(Debug)]
pub(super) struct DialogTurn {
    permit: Option<OwnedSemaphorePermit>,
    lines: DialogLines,
    origin: String,
}

impl DialogTurn {
    fn new(permit: OwnedSemaphorePermit, lines: &DialogLines, origin: String) -> Self {
        DialogTurn {
            permit: Some(permit),
            lines: Arc::clone(lines),
            origin,
        }
    }
}

impl Drop for DialogTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Ok(mut lines) = self.lines.lock() {
            prune(&mut lines, &self.origin);
        }
    }
}

/// Forgets an origin's line once no dialog of it is shown and none waits, so that the map holds
/// only origins with dialogs (a page cannot grow it by opening many origins' dialogs in turn).
fn prune(lines: &mut HashMap<String, DialogLine>, origin: &str) {
    let idle = lines
        .get(origin)
        .is_some_and(|line| line.waiting == 0 && line.turn.available_permits() == 1);
    if idle {
        lines.remove(origin);
    }
}

/// Counts a request as waiting while it waits, however the wait ends.
struct Waiting {
    lines: DialogLines,
    origin: String,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut lines) = self.lines.lock() {
            if let Some(line) = lines.get_mut(&self.origin) {
                line.waiting = line.waiting.saturating_sub(1);
            }
            prune(&mut lines, &self.origin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(lines: &DialogLines, origin: &str) -> DialogTurn {
        let turn = {
            let mut map = lines.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(&map.entry(origin.to_owned()).or_default().turn)
        };
        let permit = turn.try_acquire_owned().expect("the turn is free");
        DialogTurn::new(permit, lines, origin.to_owned())
    }

    fn has(lines: &DialogLines, origin: &str) -> bool {
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(origin)
    }

    #[test]
    fn an_origins_line_is_forgotten_once_no_dialog_is_shown_or_waits() {
        let lines: DialogLines = Arc::default();
        let first = acquire(&lines, "https://a.example");
        // A second request waits behind the first.
        if let Some(line) = lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut("https://a.example")
        {
            line.waiting += 1;
        }
        let waiting = Waiting {
            lines: Arc::clone(&lines),
            origin: "https://a.example".into(),
        };
        drop(first);
        assert!(has(&lines, "https://a.example"), "a request still waits");
        let second = acquire(&lines, "https://a.example");
        drop(waiting);
        assert!(has(&lines, "https://a.example"), "a dialog is still shown");
        drop(second);
        assert!(!has(&lines, "https://a.example"));
        assert!(lines.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    }
}
