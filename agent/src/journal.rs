//! Every audit record also goes to the system journal, with structured fields, so that a
//! fleet's existing log collection (journald forwarding, rsyslog, a SIEM) gathers them.
//!
//! The journal's native protocol (a datagram of `FIELD=value` / length-prefixed fields on
//! `/run/systemd/journal/socket`) is spoken by `tracing-journald`, through a `tracing`
//! dispatcher of its own: audit records never mix with the debug log, and the debug log never
//! reaches the journal through this path. One record is one journal entry:
//!
//! | field | value |
//! | --- | --- |
//! | `MESSAGE` | `keyport audit #SEQ: OPERATION by ORIGIN: OUTCOME` |
//! | `MESSAGE_ID` | [`MESSAGE_ID`], the same for every audit record (`journalctl MESSAGE_ID=…`) |
//! | `PRIORITY` | 5 (notice) when granted, 4 (warning) when refused or failed |
//! | `SYSLOG_IDENTIFIER` | `keyport` |
//! | `KEYPORT_SEQ` | the record's sequence number in the local log |
//! | `KEYPORT_ORIGIN`, `KEYPORT_OPERATION`, `KEYPORT_OUTCOME` | as in the local log |
//! | `KEYPORT_CERT_SUBJECT`, `KEYPORT_CERT_SHA256` | the certificate, when there is one |
//! | `KEYPORT_DIGESTS` | the digests signed, hex, separated by spaces |
//!
//! What is guaranteed: the local HMAC-chained file is the record of truth and is written
//! first; the journal copy follows each durable line. What is not: delivery to the journal (a
//! datagram socket; a full or stopped journald loses the copy, which the local log still
//! holds), and the journal copy carries no MAC (journald's own sealing, `Seal=yes`, covers it
//! where the fleet enables it).

use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;

use crate::audit::AuditLine;

/// The journal's catalogue id of a KeyPort audit record.
pub const MESSAGE_ID: &str = "6b3f1c2a9d8e4f7b8a5c0e1d2f3a4b5c";

/// Where journald listens (fixed by systemd; `tracing-journald` uses it).
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// A connection to the journal for audit records.
#[derive(Clone)]
pub struct Journal {
    dispatch: Dispatch,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

impl Journal {
    /// The journal, when its socket exists and answers; `None` otherwise (no systemd, a
    /// container): then records go to the local log only.
    pub fn connect() -> Option<Journal> {
        let layer = match tracing_journald::layer() {
            Ok(layer) => layer,
            Err(e) => {
                tracing::debug!(error = %e, "no system journal: audit records stay local");
                return None;
            }
        };
        let layer = layer
            .with_field_prefix(Some("KEYPORT".into()))
            .with_syslog_identifier("keyport".into())
            .with_custom_fields([("MESSAGE_ID", MESSAGE_ID)]);
        Some(Journal {
            dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
        })
    }

    /// Sends one audit line (best effort: a lost datagram is not an error, the local log has
    /// the record).
    pub fn send(&self, line: &AuditLine) {
        let subject = line
            .certificate
            .as_ref()
            .map(|c| c.subject.as_str())
            .unwrap_or_default();
        let sha256 = line
            .certificate
            .as_ref()
            .map(|c| c.sha256.as_str())
            .unwrap_or_default();
        let digests = line.digests.join(" ");
        let message = format!(
            "keyport audit #{}: {} by {}: {}",
            line.seq, line.operation, line.origin, line.outcome
        );
        tracing::dispatcher::with_default(&self.dispatch, || {
            if line.outcome == "granted" {
                tracing::info!(
                    target: "keyport::audit",
                    seq = line.seq,
                    origin = %line.origin,
                    operation = %line.operation,
                    outcome = %line.outcome,
                    cert_subject = subject,
                    cert_sha256 = sha256,
                    digests = %digests,
                    "{message}"
                );
            } else {
                tracing::warn!(
                    target: "keyport::audit",
                    seq = line.seq,
                    origin = %line.origin,
                    operation = %line.operation,
                    outcome = %line.outcome,
                    cert_subject = subject,
                    cert_sha256 = sha256,
                    digests = %digests,
                    "{message}"
                );
            }
        });
    }
}
