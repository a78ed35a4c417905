//! The append-only, HMAC-chained audit log: one JSON line per signature, login or approval.
//!
//! Each line is
//! `{"seq":N,"time":"RFC 3339 UTC","origin":…,"operation":…,"certificate":{"subject","sha256"}|null,
//! "digests":["hex",…],"outcome":"granted"|"refused:REASON"|"error:REASON","mac":"hex"}`.
//!
//! `mac = HMAC-SHA256(key, prev_mac ‖ canonical)` where `canonical` is the line's JSON without
//! `"mac"`, serialised compactly with the fields in the order above (the way [`AuditLog`] writes
//! it; [`verify`] re-serialises each parsed line the same way), and `prev_mac` is the previous
//! line's 32-byte MAC, or 32 zero bytes for the first line. `seq` starts at 1 and grows by one.
//!
//! What the chain shows: an edited, inserted, removed or reordered line is reported by
//! [`verify`] with its line number, and every line after the first break is reported
//! *unverified* (what follows a break is only as good as the break's anchor).
//!
//! The head: after each line is durable, its `seq` and MAC go to a **head file** kept apart
//! from the log (beside the audit key, or in the configuration folder when the key is in the OS
//! keyring), mode 0600, two alternating slots so a torn write leaves the older one, each
//! itself MACed with the key
//! (`head_mac = HMAC(key, "keyport audit head v1" ‖ seq as 8 bytes big-endian ‖ mac)`), so it
//! cannot be forged without the key. Removing the last lines, or emptying the log, leaves the
//! head ahead of the log: [`verify`] reports it and [`AuditLog::open`] refuses to continue such a
//! log. What remains open: someone with the user's rights who saved an old head can put it back
//! together with a log cut to match; the head only moves that from "truncate one file" to
//! "keep and restore two".
//!
//! Crash safety: a line (or a group of lines, see below) is written with one `write_all` of
//! the complete lines and their `\n`, then `sync_data`. [`AuditLog::open`] cuts a trailing
//! partial line (a crash mid-write) and continues the chain from the last whole line, so a
//! crash never breaks verification. The head is written only after its lines are durable, so
//! the head on disk is never ahead of the log; the agent syncs the head lazily (when the writer
//! goes idle, and at least once a second), so a crash may leave it behind the log, which
//! [`AuditLog::open`] brings level and [`verify`] accepts.
//!
//! Group commit: the agent appends through an [`AuditWriter`], a thread of its own that takes
//! every record waiting when it is free and writes them as one group ([`AuditLog::append_group`]:
//! one `write`, one `fdatasync`). Each caller's answer comes once its group is durable, and a
//! failed group fails every request in it: a signature is still released only after its own
//! record is on disk.
//!
//! Thread safety: [`AuditLog`] is `Send`; share it behind a `Mutex`, or hand it to an
//! [`AuditWriter`].
//!
//! Several processes (the agent and `keyport sign`) may append to one log: each append holds an
//! exclusive lock on the file (`flock`) and, if the file grew since this handle last wrote,
//! first re-reads the head so that the chain continues from the other writer's last line.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};

use crate::files;
pub use group::AuditWriter;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use zeroize::Zeroizing;

mod group;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Length of the MAC and of the chain's starting value.
const MAC_LEN: usize = 32;

/// Errors of the audit log.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading, writing or syncing the log file (or creating its directory) failed.
    #[error("audit log {path}: {action} failed")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The last whole line of an existing log cannot be chained from: it is not a valid line,
    /// or its MAC does not verify with this key (the log was edited, or the key changed).
    #[error("audit log {path}: line {line} does not verify with this key ({problem}); run `keyport audit --verify`")]
    BadHead {
        /// The log file.
        path: PathBuf,
        /// The 1-based line number of the last line.
        line: usize,
        /// What is wrong with it.
        problem: Problem,
    },
    /// The head file says the log went further than it does: lines were cut from its end, or
    /// the file was emptied or replaced.
    #[error("audit log {path} ends at seq {last_seq} but its head ({head}) says seq {head_seq} was written: the end of the log was removed; run `keyport audit --verify`, keep the damaged log as evidence (move it and the head aside) to start a new one")]
    Cut {
        /// The log file.
        path: PathBuf,
        /// The head file.
        head: PathBuf,
        /// The last seq in the log (0: empty).
        last_seq: u64,
        /// The seq the head records.
        head_seq: u64,
    },
    /// The head file exists but is not one this key wrote.
    #[error("audit head {0} is not valid for this key; run `keyport audit --verify`")]
    BadHeadFile(PathBuf),
    /// The key is shorter than 32 bytes.
    #[error("audit key is {0} bytes; at least 32 are needed")]
    KeyTooShort(usize),
    /// A record could not be serialised (cannot happen with the types here; kept typed).
    #[error("audit record could not be serialised")]
    Serialize(#[source] serde_json::Error),
    /// The group this record was written in failed; every request in it gets this error.
    #[error(transparent)]
    Group(std::sync::Arc<AuditError>),
    /// The [`AuditWriter`]'s thread is gone (it could not start, or the agent is stopping).
    #[error("the audit writer is not running")]
    WriterGone,
}

/// The secret key that chains the log. Zeroed on drop; never printed.
#[derive(Clone)]
pub struct AuditKey(Zeroizing<Vec<u8>>);

impl AuditKey {
    /// A key from at least 32 bytes of secret.
    pub fn new(bytes: Vec<u8>) -> Result<AuditKey, AuditError> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < MAC_LEN {
            return Err(AuditError::KeyTooShort(bytes.len()));
        }
        Ok(AuditKey(bytes))
    }

    /// A short public name for the key (hex of the first 8 bytes of an HMAC of a fixed label),
    /// to tell keys apart in messages without revealing them.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.mac(&[0u8; MAC_LEN], b"keyport audit key fingerprint")[..8])
    }

    fn mac(&self, prev: &[u8; MAC_LEN], canonical: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(prev);
        mac.update(canonical);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

/// What was asked.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `sign`.
    Sign,
    /// `sign.batch`.
    SignBatch,
    /// `authenticate`.
    Authenticate,
    /// `keys.generate`.
    KeysGenerate,
    /// `certificates.import`.
    CertificatesImport,
    /// `keyport certs remove` (no wire method).
    CertificatesRemove,
    /// The user approved an origin.
    OriginApprove,
    /// An origin approval was revoked.
    OriginRevoke,
    /// Anything else, by name.
    Other(String),
}

impl Operation {
    /// The name written in the log.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Sign => "sign",
            Operation::SignBatch => "sign.batch",
            Operation::Authenticate => "authenticate",
            Operation::KeysGenerate => "keys.generate",
            Operation::CertificatesImport => "certificates.import",
            Operation::CertificatesRemove => "certificates.remove",
            Operation::OriginApprove => "origin.approve",
            Operation::OriginRevoke => "origin.revoke",
            Operation::Other(s) => s,
        }
    }
}

/// How a request ended.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done as asked.
    Granted,
    /// Refused by the user or by policy; the reason is a wire reason such as `USER_CANCELLED`.
    Refused(String),
    /// Failed; the reason is a wire reason such as `TOKEN_ERROR`.
    Error(String),
}

impl Outcome {
    /// `granted`, `refused:REASON` or `error:REASON`.
    pub fn render(&self) -> String {
        match self {
            Outcome::Granted => "granted".to_owned(),
            Outcome::Refused(r) => format!("refused:{r}"),
            Outcome::Error(r) => format!("error:{r}"),
        }
    }
}

/// The certificate a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRef {
    /// RFC 4514 subject.
    pub subject: String,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub sha256: String,
}

/// One event to log. Build with [`AuditRecord::new`] and the chained setters.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// When it happened (written as RFC 3339 UTC). Defaults to now.
    pub time: time::OffsetDateTime,
    /// The Origin header's value (or `local` for the CLI).
    pub origin: String,
    /// What was asked.
    pub operation: Operation,
    /// The certificate used, if any.
    pub certificate: Option<CertificateRef>,
    /// Digests signed (hex), in order.
    pub digests: Vec<String>,
    /// How it ended. Defaults to [`Outcome::Granted`].
    pub outcome: Outcome,
}

impl AuditRecord {
    /// A record of `operation` by `origin`, at the current time, outcome granted.
    pub fn new(origin: impl Into<String>, operation: Operation) -> AuditRecord {
        AuditRecord {
            time: time::OffsetDateTime::now_utc(),
            origin: origin.into(),
            operation,
            certificate: None,
            digests: Vec::new(),
            outcome: Outcome::Granted,
        }
    }

    /// Set the time.
    pub fn at(mut self, time: time::OffsetDateTime) -> Self {
        self.time = time;
        self
    }

    /// Name the certificate by subject and DER (its SHA-256 is computed here).
    pub fn certificate(mut self, subject: impl Into<String>, cert_der: &[u8]) -> Self {
        self.certificate = Some(CertificateRef {
            subject: subject.into(),
            sha256: hex::encode(sha2::Sha256::digest(cert_der)),
        });
        self
    }

    /// Add a digest that was (or was to be) signed.
    pub fn digest(mut self, digest: &[u8]) -> Self {
        self.digests.push(hex::encode(digest));
        self
    }

    /// Set the outcome.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

/// One line of the log as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLine {
    /// Sequence number, from 1.
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    /// The origin.
    pub origin: String,
    /// The operation name.
    pub operation: String,
    /// The certificate, if any.
    pub certificate: Option<CertificateRef>,
    /// Hex digests.
    pub digests: Vec<String>,
    /// `granted`, `refused:REASON` or `error:REASON`.
    pub outcome: String,
    /// Hex HMAC-SHA256.
    pub mac: String,
}

/// The fields the MAC covers, in their fixed order (everything but `mac`).
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    time: &'a str,
    origin: &'a str,
    operation: &'a str,
    certificate: &'a Option<CertificateRef>,
    digests: &'a [String],
    outcome: &'a str,
}

impl AuditLine {
    fn canonical(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&Canonical {
            seq: self.seq,
            time: &self.time,
            origin: &self.origin,
            operation: &self.operation,
            certificate: &self.certificate,
            digests: &self.digests,
            outcome: &self.outcome,
        })
    }

    fn mac_bytes(&self) -> Option<[u8; MAC_LEN]> {
        let v = hex::decode(&self.mac).ok()?;
        v.try_into().ok()
    }
}

/// What is wrong with a line.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a valid log line (JSON, fields, or MAC encoding).
    BadJson,
    /// The MAC does not match: the line was edited, or the line before it was removed,
    /// inserted or moved.
    BadMac,
    /// Sequence numbers were skipped: lines before this one were removed.
    SeqGap {
        /// The seq this line should have had.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// The seq goes backwards or repeats: lines were reordered or inserted.
    Reordered {
        /// The seq this line should have had.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// The last line has no final newline (a crash mid-write; [`AuditLog::open`] cuts it).
    Truncated,
    /// After an earlier break: this line cannot be proved genuine.
    Unverified {
        /// The line of the first break.
        after: usize,
    },
    /// The head records a later line than the log ends with: its end was removed (or the
    /// whole log emptied). Reported at the line after the last one.
    Cut {
        /// The last seq in the log (0: none).
        last_seq: u64,
        /// The seq the head records.
        head_seq: u64,
    },
    /// The head records this seq with another MAC: the last line was replaced.
    HeadMismatch,
    /// There is a log but no head: whether its end was cut cannot be told.
    HeadMissing,
    /// The head file is not one this key wrote.
    HeadInvalid,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadJson => f.write_str("not a valid audit line"),
            Problem::BadMac => {
                f.write_str("MAC does not match (edited, or a neighbour removed/inserted/moved)")
            }
            Problem::SeqGap { expected, found } => {
                write!(
                    f,
                    "sequence gap: expected {expected}, found {found} (lines removed)"
                )
            }
            Problem::Reordered { expected, found } => {
                write!(f, "sequence out of order: expected {expected}, found {found} (lines reordered or inserted)")
            }
            Problem::Truncated => f.write_str("partial last line (interrupted write)"),
            Problem::Unverified { after } => {
                write!(f, "not verifiable after the break at line {after}")
            }
            Problem::Cut { last_seq, head_seq } => write!(
                f,
                "the log ends at seq {last_seq} but seq {head_seq} was written: lines were \
                 removed from the end (or the log emptied)"
            ),
            Problem::HeadMismatch => {
                f.write_str("the last line is not the one the head recorded (replaced)")
            }
            Problem::HeadMissing => {
                f.write_str("no head record: whether lines were cut from the end cannot be told")
            }
            Problem::HeadInvalid => f.write_str("the head record does not verify with this key"),
        }
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of lines read (a partial last line included).
    pub lines: usize,
    /// Problems found, as (1-based line number, problem), in file order.
    pub problems: Vec<(usize, Problem)>,
}

impl VerifyReport {
    /// No problem found. (The removal of the last lines cannot be seen; see the module docs.)
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    /// The text `keyport audit --verify` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            return writeln!(f, "audit log OK: {} lines, chain intact", self.lines);
        }
        writeln!(
            f,
            "audit log has {} problem(s) in {} lines:",
            self.problems.len(),
            self.lines
        )?;
        let mut i = 0;
        while i < self.problems.len() {
            let (line, problem) = &self.problems[i];
            // A run of unverified lines is one entry.
            let mut end = i;
            while let (Problem::Unverified { .. }, Some((next, Problem::Unverified { .. }))) =
                (problem, self.problems.get(end + 1))
            {
                if *next != self.problems[end].0 + 1 {
                    break;
                }
                end += 1;
            }
            if end > i {
                writeln!(f, "  lines {line}-{}: {problem}", self.problems[end].0)?;
            } else {
                writeln!(f, "  line {line}: {problem}")?;
            }
            i = end + 1;
        }
        Ok(())
    }
}

/// The open log, positioned to append.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
    head_file: File,
    file: File,
    key: AuditKey,
    next_seq: u64,
    prev_mac: [u8; MAC_LEN],
    len: u64,
    /// A copy of each durable line goes to the system journal (`crate::journal`).
    journal: Option<crate::journal::Journal>,
}

impl AuditLog {
    /// Open (or create, mode 0600, parent directory 0700, never through a symbolic link) the
    /// log at `path`, cut a partial last line left by a crash, and continue the chain from the
    /// last whole line, whose MAC must verify with `key` (else [`AuditError::BadHead`]) and which
    /// must not be behind the head file `head` (else [`AuditError::Cut`]). Only the tail of the
    /// file is read.
    pub fn open(path: &Path, key: AuditKey, head: &Path) -> Result<AuditLog, AuditError> {
        let io = |action: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| AuditError::Io {
                path: p,
                action,
                source,
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            files::create_private_dir(parent).map_err(io("creating the directory", parent))?;
        }
        let mut file = files::open_append_nofollow(path)
            .map_err(io("opening (not through a symbolic link)", path))?;
        if !file
            .metadata()
            .map_err(io("reading metadata of", path))?
            .is_file()
        {
            return Err(AuditError::Io {
                path: path.to_path_buf(),
                action: "opening",
                source: std::io::Error::other("not a regular file"),
            });
        }
        let meta = file.metadata().map_err(io("reading metadata of", path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "audit log was readable by others; setting mode 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io("setting the mode of", path))?;
        }

        let mut len = meta.len();
        let tail = read_tail(&mut file, len).map_err(io("reading", path))?;
        // Cut a partial last line (no final '\n'): it is what a crash mid-write leaves.
        let whole_end = tail
            .bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(tail.start, |i| tail.start + i as u64 + 1);
        if whole_end < len {
            tracing::warn!(path = %path.display(), bytes = len - whole_end, "cutting a partial last line from the audit log");
            file.set_len(whole_end).map_err(io("truncating", path))?;
            file.sync_data().map_err(io("syncing", path))?;
            len = whole_end;
        }
        let whole = &tail.bytes[..(whole_end - tail.start) as usize];
        let mut lines: Vec<&[u8]> = whole.split(|&b| b == b'\n').collect();
        lines.pop(); // the empty piece after the final '\n'

        let (next_seq, prev_mac) = match lines.as_slice() {
            [] => (1, [0u8; MAC_LEN]),
            [.., last] => {
                let line_no = count_lines(&mut file, whole_end).map_err(io("reading", path))?;
                let bad = |problem| AuditError::BadHead {
                    path: path.to_path_buf(),
                    line: line_no,
                    problem,
                };
                let last = parse_line(last).ok_or_else(|| bad(Problem::BadJson))?;
                let last_mac = last.mac_bytes().ok_or_else(|| bad(Problem::BadJson))?;
                // The MAC before it: the previous line's, or zeros if this is the first line.
                let prev = if lines.len() >= 2 {
                    let before =
                        parse_line(lines[lines.len() - 2]).ok_or_else(|| bad(Problem::BadJson))?;
                    before.mac_bytes().ok_or_else(|| bad(Problem::BadJson))?
                } else if tail.start == 0 {
                    [0u8; MAC_LEN]
                } else {
                    // read_tail always returns two whole lines or the file start.
                    return Err(bad(Problem::BadJson));
                };
                let canonical = last.canonical().map_err(AuditError::Serialize)?;
                if key.mac(&prev, &canonical) != last_mac {
                    return Err(bad(Problem::BadMac));
                }
                (last.seq + 1, last_mac)
            }
        };
        let last_seq = next_seq - 1;
        let head_seq = match read_head(head, &key) {
            HeadState::Missing => None,
            HeadState::Invalid => return Err(AuditError::BadHeadFile(head.to_path_buf())),
            HeadState::Valid { seq, .. } if seq > last_seq => {
                return Err(AuditError::Cut {
                    path: path.to_path_buf(),
                    head: head.to_path_buf(),
                    last_seq,
                    head_seq: seq,
                })
            }
            HeadState::Valid { seq, .. } => Some(seq),
        };
        if let Some(dir) = head.parent().filter(|p| !p.as_os_str().is_empty()) {
            files::create_private_dir(dir).map_err(io("creating the directory", dir))?;
        }
        let head_file = files::open_rw_nofollow(head)
            .map_err(io("opening (not through a symbolic link)", head))?;
        if last_seq > 0 && head_seq != Some(last_seq) {
            // A crash between a line and its head leaves the head one behind (or a log from
            // before heads existed has none): bring it level.
            write_head(&head_file, &key, last_seq, &prev_mac)
                .and_then(|()| head_file.sync_data())
                .map_err(io("writing the head", head))?;
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            head: head.to_path_buf(),
            head_file,
            file,
            key,
            next_seq,
            prev_mac,
            len,
            journal: None,
        })
    }

    /// Also send every record, once it is durable here, to the system journal.
    pub fn with_journal(mut self, journal: Option<crate::journal::Journal>) -> AuditLog {
        self.journal = journal;
        self
    }

    /// Append one record: one `write_all` of the whole line, then `sync_data`, then the head
    /// (written and synced). If the write fails the file is cut back to its previous length and
    /// the chain does not advance.
    pub fn append(&mut self, rec: &AuditRecord) -> Result<(), AuditError> {
        self.append_group(std::slice::from_ref(rec))?;
        self.sync_head()
    }

    /// Append records as one group: their lines chained in order, written with one
    /// `write_all`, made durable with one `sync_data`, then the head written for the last of
    /// them (not synced: see [`AuditLog::sync_head`]). All or none: if the write or its sync
    /// fails, the file is cut back to its previous length, the chain does not advance and the
    /// error is the whole group's.
    pub fn append_group(&mut self, recs: &[AuditRecord]) -> Result<(), AuditError> {
        if recs.is_empty() {
            return Ok(());
        }
        let lock_err = |source| AuditError::Io {
            path: self.path.clone(),
            action: "locking",
            source,
        };
        self.file.lock().map_err(lock_err)?;
        let appended = self.resync().and_then(|()| self.append_locked(recs));
        if let Err(e) = self.file.unlock() {
            tracing::warn!(error = %e, "could not unlock the audit log");
        }
        appended
    }

    /// Makes the last head written durable (`fdatasync` of the head file). The log's lines are
    /// durable before their head is written, so a head on disk never runs ahead of the log; a
    /// head not yet synced at a crash only leaves the head on disk behind the log, which
    /// [`AuditLog::open`] brings level and [`verify`] accepts.
    pub fn sync_head(&self) -> Result<(), AuditError> {
        self.head_file.sync_data().map_err(|source| AuditError::Io {
            path: self.head.clone(),
            action: "syncing the head of",
            source,
        })
    }

    /// Continues the chain from another writer's last line if the file changed under us.
    fn resync(&mut self) -> Result<(), AuditError> {
        let len = self
            .file
            .metadata()
            .map_err(|source| AuditError::Io {
                path: self.path.clone(),
                action: "reading metadata of",
                source,
            })?
            .len();
        if len == self.len {
            return Ok(());
        }
        let fresh = AuditLog::open(&self.path, self.key.clone(), &self.head)?;
        self.next_seq = fresh.next_seq;
        self.prev_mac = fresh.prev_mac;
        self.len = fresh.len;
        Ok(())
    }

    fn append_locked(&mut self, recs: &[AuditRecord]) -> Result<(), AuditError> {
        let mut bytes = Vec::with_capacity(recs.len() * 512);
        let mut lines = Vec::with_capacity(recs.len());
        let (mut seq, mut prev) = (self.next_seq, self.prev_mac);
        for rec in recs {
            let time = rec
                .time
                .to_offset(time::UtcOffset::UTC)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| "invalid-time".to_owned());
            let mut line = AuditLine {
                seq,
                time,
                origin: rec.origin.clone(),
                operation: rec.operation.as_str().to_owned(),
                certificate: rec.certificate.clone(),
                digests: rec.digests.clone(),
                outcome: rec.outcome.render(),
                mac: String::new(),
            };
            let canonical = line.canonical().map_err(AuditError::Serialize)?;
            prev = self.key.mac(&prev, &canonical);
            line.mac = hex::encode(prev);
            serde_json::to_writer(&mut bytes, &line).map_err(AuditError::Serialize)?;
            bytes.push(b'\n');
            lines.push(line);
            seq += 1;
        }

        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            // Best effort: remove what part of the lines got out; open() would cut a partial
            // last line anyway, and the whole group is refused.
            if let Err(e) = self.file.set_len(self.len) {
                tracing::error!(error = %e, "could not cut a failed audit write");
            }
            return Err(AuditError::Io {
                path: self.path.clone(),
                action: "appending to",
                source,
            });
        }
        self.len += bytes.len() as u64;
        self.next_seq = seq;
        self.prev_mac = prev;
        // The lines are durable; now the head, so that cutting them off shows.
        write_head(&self.head_file, &self.key, seq - 1, &prev).map_err(|source| {
            AuditError::Io {
                path: self.head.clone(),
                action: "writing the head of",
                source,
            }
        })?;
        if let Some(journal) = &self.journal {
            for line in &lines {
                journal.send(line);
            }
        }
        Ok(())
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Verify the whole log at `path` with `key` and its head file `head`. Each edited, inserted,
/// removed or reordered line is reported with its 1-based line number, and every later line
/// that has no problem of its own is reported [`Problem::Unverified`]. Then the head: a log
/// that ends before the seq the head records ([`Problem::Cut`]), a last line the head does not
/// match, or a non-empty log with no head is reported at the line after the last.
pub fn verify(path: &Path, key: &AuditKey, head: &Path) -> Result<VerifyReport, AuditError> {
    let data = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        action: "reading",
        source,
    })?;
    let mut problems = Vec::new();
    let mut prev = [0u8; MAC_LEN];
    let mut expected: u64 = 1;
    let mut prev_unknown = false;
    let mut lines = 0;
    let complete = data.last().is_none_or(|&b| b == b'\n');
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if complete {
        pieces.pop();
    }
    let count = pieces.len();
    let mut last_good: Option<(u64, [u8; MAC_LEN])> = None;
    for (i, raw) in pieces.into_iter().enumerate() {
        let n = i + 1;
        lines = n;
        if n == count && !complete {
            problems.push((n, Problem::Truncated));
            break;
        }
        let Some((line, mac)) = parse_line(raw).and_then(|l| l.mac_bytes().map(|m| (l, m))) else {
            last_good = None;
            problems.push((n, Problem::BadJson));
            // It held a seq; the next line's MAC cannot be checked (its `prev` is unreadable).
            expected = expected.saturating_add(1);
            prev_unknown = true;
            continue;
        };
        let canonical = line.canonical().map_err(AuditError::Serialize)?;
        let mac_ok = prev_unknown || key.mac(&prev, &canonical) == mac;
        prev_unknown = false;
        if line.seq > expected {
            problems.push((
                n,
                Problem::SeqGap {
                    expected,
                    found: line.seq,
                },
            ));
        } else if line.seq < expected {
            problems.push((
                n,
                Problem::Reordered {
                    expected,
                    found: line.seq,
                },
            ));
        } else if !mac_ok {
            problems.push((n, Problem::BadMac));
        } else if let Some(&(first, _)) = problems.first() {
            problems.push((n, Problem::Unverified { after: first }));
        }
        last_good = (line.seq == expected && mac_ok).then_some((line.seq, mac));
        expected = expected.max(line.seq.saturating_add(1));
        prev = mac;
    }
    let end = lines + 1;
    match read_head(head, key) {
        HeadState::Missing if lines > 0 => problems.push((end, Problem::HeadMissing)),
        HeadState::Missing => {}
        HeadState::Invalid => problems.push((end, Problem::HeadInvalid)),
        HeadState::Valid { seq, mac } => {
            let last_seq = expected.saturating_sub(1);
            if seq > last_seq {
                problems.push((
                    end,
                    Problem::Cut {
                        last_seq,
                        head_seq: seq,
                    },
                ));
            } else if seq == last_seq && last_good.is_some_and(|(_, m)| m != mac) {
                problems.push((end, Problem::HeadMismatch));
            }
        }
    }
    Ok(VerifyReport { lines, problems })
}

/// What the head file holds.
enum HeadState {
    Missing,
    Invalid,
    Valid { seq: u64, mac: [u8; MAC_LEN] },
}

/// Bytes of one slot of the head file. Two slots alternate by seq (even at 0, odd at 256), so a
/// write torn by a crash leaves the other, older, intact; each write is one `pwrite` (and an
/// `fdatasync` when [`AuditLog::sync_head`] says), no rename.
const HEAD_SLOT: usize = 256;

/// One slot of the head file: `{"seq":N,"mac":"hex","head_mac":"hex"}`, padded with spaces and
/// ending in a newline.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadRecord {
    seq: u64,
    mac: String,
    head_mac: String,
}

fn head_mac(key: &AuditKey, seq: u64, mac: &[u8; MAC_LEN]) -> [u8; MAC_LEN] {
    let mut body = b"keyport audit head v1".to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(mac);
    key.mac(&[0xff; MAC_LEN], &body)
}

/// The head: the valid slot with the highest seq. An empty file (opened, nothing logged yet) is
/// [`HeadState::Missing`]; a file with bytes but no valid slot (edited, another key's) is
/// [`HeadState::Invalid`].
fn read_head(path: &Path, key: &AuditKey) -> HeadState {
    let bytes = match std::fs::read(path) {
        Ok(t) if t.is_empty() => return HeadState::Missing,
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HeadState::Missing,
        Err(_) => return HeadState::Invalid,
    };
    bytes
        .chunks(HEAD_SLOT)
        .filter_map(|slot| read_slot(slot, key))
        .max_by_key(|(seq, _)| *seq)
        .map_or(HeadState::Invalid, |(seq, mac)| HeadState::Valid {
            seq,
            mac,
        })
}

fn read_slot(slot: &[u8], key: &AuditKey) -> Option<(u64, [u8; MAC_LEN])> {
    let end = slot.iter().rposition(|&b| !matches!(b, b' ' | b'\n' | 0))? + 1;
    let record: HeadRecord = serde_json::from_slice(&slot[..end]).ok()?;
    let decode = |h: &str| -> Option<[u8; MAC_LEN]> { hex::decode(h).ok()?.try_into().ok() };
    let (mac, hm) = (decode(&record.mac)?, decode(&record.head_mac)?);
    (head_mac(key, record.seq, &mac) == hm).then_some((record.seq, mac))
}

/// Writes the head for `seq` into its slot (not synced: the caller decides when).
fn write_head(file: &File, key: &AuditKey, seq: u64, mac: &[u8; MAC_LEN]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let record = HeadRecord {
        seq,
        mac: hex::encode(mac),
        head_mac: hex::encode(head_mac(key, seq, mac)),
    };
    let mut bytes = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
    if bytes.len() >= HEAD_SLOT {
        return Err(std::io::Error::other(
            "audit head record longer than its slot",
        ));
    }
    bytes.resize(HEAD_SLOT - 1, b' ');
    bytes.push(b'\n');
    file.write_all_at(&bytes, (seq % 2) * HEAD_SLOT as u64)
}

/// Whether the audit log can take a record now: a probe of 4 KiB is written and synced in the
/// log's folder (then removed). None when it can; else what is wrong and what to do, for
/// `keyport doctor`. The agent refuses every signature and login whose record cannot be written.
pub fn write_problem(path: &Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        return None; // Created, 0700, when the agent starts.
    }
    let probe = dir.join(".keyport-audit-probe");
    let written = (|| {
        let _ = std::fs::remove_file(&probe);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        std::io::Write::write_all(&mut f, &[0u8; 4096])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    let e = written.err()?;
    let why = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => format!(
            "the file system holding the audit log ({}) is full: every signature and login is \
             refused (INTERNAL) until its audit record can be written; free space there",
            dir.display()
        ),
        Some(libc::EROFS) => format!(
            "the audit log's folder {} is read-only: every signature and login is refused until \
             it is writable",
            dir.display()
        ),
        _ => format!(
            "the audit log's folder {} cannot be written ({e}): every signature and login is \
             refused until it can",
            dir.display()
        ),
    };
    Some(why)
}

/// Every line of the log that parses, for `keyport audit` to print. Lines that do not parse are
/// skipped; [`verify`] reports them.
pub fn read_lines(path: &Path) -> Result<Vec<AuditLine>, AuditError> {
    let data = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        action: "reading",
        source,
    })?;
    Ok(data.split(|&b| b == b'\n').filter_map(parse_line).collect())
}

/// One line of `keyport audit` output.
pub fn render_line(line: &AuditLine) -> String {
    let cert = line
        .certificate
        .as_ref()
        .map_or_else(|| "-".to_owned(), |c| c.subject.clone());
    let digests = match line.digests.as_slice() {
        [] => String::new(),
        [one] => format!(" digest {}…", &one[..one.len().min(16)]),
        many => format!(" {} digests", many.len()),
    };
    format!(
        "{:>6} {} {} {} [{}]{} → {}",
        line.seq, line.time, line.origin, line.operation, cert, digests, line.outcome
    )
}

fn parse_line(raw: &[u8]) -> Option<AuditLine> {
    serde_json::from_slice(raw).ok()
}

/// One raw line as [`verify`] reads it: the parsed line and whether its MAC field decodes. For
/// the fuzzer (`fuzz/fuzz_targets/audit_line.rs`).
#[doc(hidden)]
pub fn parse_line_for_fuzzing(raw: &[u8]) -> Option<(AuditLine, bool)> {
    let line = parse_line(raw)?;
    let mac_ok = line.mac_bytes().is_some();
    // The canonical form must serialise whatever parsed.
    line.canonical().ok()?;
    Some((line, mac_ok))
}

struct Tail {
    start: u64,
    bytes: Vec<u8>,
}

/// Read the end of the file: enough to hold the last two whole lines and any partial line after
/// them (or the whole file).
fn read_tail(file: &mut File, len: u64) -> std::io::Result<Tail> {
    let mut want: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(want);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut bytes)?;
        // Three newlines: the one ending the line before the last two, and theirs.
        let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || newlines >= 4 {
            // Keep only whole lines: drop a leading piece that may be a line's middle.
            if start > 0 {
                if let Some(first) = bytes.iter().position(|&b| b == b'\n') {
                    bytes.drain(..=first);
                    return Ok(Tail {
                        start: start + first as u64 + 1,
                        bytes,
                    });
                }
            }
            return Ok(Tail { start, bytes });
        }
        want = want.saturating_mul(4);
    }
}

/// Number of lines in the first `end` bytes (for error messages only).
fn count_lines(file: &mut File, end: u64) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::new(Read::by_ref(file).take(end));
    let mut buf = [0u8; 64 * 1024];
    let mut count = 0;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(count);
        }
        count += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_file(log: &Path) -> PathBuf {
        log.with_extension("head")
    }

    fn key() -> AuditKey {
        AuditKey::new(vec![7; 32]).expect("32 bytes")
    }

    fn record(i: usize) -> AuditRecord {
        AuditRecord::new("https://portal.example", Operation::Sign)
            .certificate("CN=Signer", b"cert")
            .digest(&[i as u8; 32])
            .outcome(if i.is_multiple_of(3) {
                Outcome::Refused("USER_CANCELLED".into())
            } else {
                Outcome::Granted
            })
    }

    fn write_log(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.log");
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("open");
        for i in 1..=n {
            log.append(&record(i)).expect("append");
        }
        (dir, path)
    }

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .expect("write");
    }

    #[test]
    fn append_then_verify_and_reopen_continues_the_chain() {
        let (_dir, path) = write_log(3);
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("reopen");
        assert_eq!(log.next_seq(), 4);
        log.append(&AuditRecord::new(
            "https://b.example",
            Operation::OriginApprove,
        ))
        .expect("append");
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report,
            VerifyReport {
                lines: 4,
                problems: vec![]
            }
        );
        assert!(report.to_string().contains("OK: 4 lines"));

        let lines = read_lines(&path).expect("read");
        assert_eq!(lines[0].seq, 1);
        assert_eq!(lines[0].operation, "sign");
        assert_eq!(lines[2].outcome, "refused:USER_CANCELLED");
        assert_eq!(lines[3].certificate, None);
        assert_eq!(lines[1].digests, vec![hex::encode([2u8; 32])]);
        assert!(lines[0].time.ends_with('Z'), "{}", lines[0].time);
        assert_eq!(
            lines[0].certificate.as_ref().map(|c| c.sha256.clone()),
            Some(hex::encode(sha2::Sha256::digest(b"cert")))
        );
        assert!(render_line(&lines[0]).contains("https://portal.example sign [CN=Signer]"));

        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn first_mac_chains_from_zeros_over_the_canonical_json() {
        let (_dir, path) = write_log(1);
        let line = &lines_of(&path)[0];
        let (body, mac) = line.rsplit_once(",\"mac\":\"").expect("mac last");
        let mut h = HmacSha256::new_from_slice(&[7; 32]).expect("key");
        h.update(&[0u8; 32]);
        h.update(format!("{body}}}").as_bytes());
        assert_eq!(
            hex::encode(h.finalize().into_bytes()),
            mac.trim_end_matches("\"}")
        );
    }

    #[test]
    fn wrong_key_fails_every_line_and_open() {
        let (_dir, path) = write_log(2);
        let other = AuditKey::new(vec![8; 32]).expect("key");
        let report = verify(&path, &other, &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (1, Problem::BadMac),
                (2, Problem::BadMac),
                (3, Problem::HeadInvalid)
            ]
        );
        assert!(matches!(
            AuditLog::open(&path, other, &head_file(&path)),
            Err(AuditError::BadHead {
                line: 2,
                problem: Problem::BadMac,
                ..
            })
        ));
    }

    #[test]
    fn edited_line_is_reported_at_its_number() {
        let (_dir, path) = write_log(5);
        let mut lines = lines_of(&path);
        lines[2] = lines[2].replace("https://portal.example", "https://evil.example");
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (3, Problem::BadMac),
                (4, Problem::Unverified { after: 3 }),
                (5, Problem::Unverified { after: 3 })
            ]
        );
        let text = report.to_string();
        assert!(text.contains("line 3: MAC does not match"), "{text}");
        assert!(
            text.contains("lines 4-5: not verifiable after the break at line 3"),
            "{text}"
        );
    }

    #[test]
    fn garbage_line_is_bad_json() {
        let (_dir, path) = write_log(4);
        let mut lines = lines_of(&path);
        lines[1] = "{not json".into();
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        // Nothing after the unreadable line 2 can be vouched for.
        assert_eq!(
            report.problems,
            vec![
                (2, Problem::BadJson),
                (3, Problem::Unverified { after: 2 }),
                (4, Problem::Unverified { after: 2 })
            ]
        );
    }

    #[test]
    fn a_forged_line_after_a_garbage_line_is_not_passed_as_verified() {
        let (_dir, path) = write_log(4);
        let mut lines = lines_of(&path);
        lines[1] = "garbage".into();
        // A made-up line 3 with any MAC: its predecessor is unreadable, so the MAC cannot
        // clear it, and it must not count as verified.
        lines[2] = lines[2].replace("https://portal.example", "https://forged.example");
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert!(report
            .problems
            .contains(&(3, Problem::Unverified { after: 2 })));
        assert!(!report.is_ok());
    }

    #[test]
    fn removed_line_is_a_gap_at_the_next_line() {
        let (_dir, path) = write_log(5);
        let mut lines = lines_of(&path);
        lines.remove(2);
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (
                    3,
                    Problem::SeqGap {
                        expected: 3,
                        found: 4
                    }
                ),
                (4, Problem::Unverified { after: 3 })
            ]
        );
    }

    #[test]
    fn removed_first_line_is_detected() {
        let (_dir, path) = write_log(3);
        let mut lines = lines_of(&path);
        lines.remove(0);
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (
                    1,
                    Problem::SeqGap {
                        expected: 1,
                        found: 2
                    }
                ),
                (2, Problem::Unverified { after: 1 })
            ]
        );
    }

    #[test]
    fn removed_last_lines_and_an_emptied_log_show_through_the_head() {
        let (_dir, path) = write_log(3);
        let whole = lines_of(&path);
        let mut lines = whole.clone();
        lines.pop();
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![(
                3,
                Problem::Cut {
                    last_seq: 2,
                    head_seq: 3
                }
            )]
        );
        assert!(matches!(
            AuditLog::open(&path, key(), &head_file(&path)),
            Err(AuditError::Cut {
                last_seq: 2,
                head_seq: 3,
                ..
            })
        ));
        std::fs::write(&path, b"").expect("empty");
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![(
                1,
                Problem::Cut {
                    last_seq: 0,
                    head_seq: 3
                }
            )]
        );
        // The last line replaced by an older genuine one with the same seq is not possible
        // (seqs are unique), but a head from another key is refused.
        write_lines(&path, &whole);
        std::fs::write(
            head_file(&path),
            b"{\"seq\":9,\"mac\":\"00\",\"head_mac\":\"00\"}",
        )
        .expect("forge");
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(report.problems, vec![(4, Problem::HeadInvalid)]);
        std::fs::remove_file(head_file(&path)).expect("rm");
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(report.problems, vec![(4, Problem::HeadMissing)]);
    }

    #[test]
    fn a_log_opened_twice_before_its_first_line_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        drop(AuditLog::open(&path, key(), &head_file(&path)).expect("first open"));
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("second open");
        log.append(&record(1)).expect("append");
        assert!(verify(&path, &key(), &head_file(&path))
            .expect("verify")
            .is_ok());
    }

    #[test]
    fn a_torn_head_write_leaves_the_older_slot() {
        let (_dir, path) = write_log(3);
        let head = head_file(&path);
        // Line 3's slot (odd) is torn by a crash; line 2's slot still vouches.
        let mut bytes = std::fs::read(&head).expect("read");
        assert_eq!(bytes.len(), 2 * HEAD_SLOT);
        bytes[HEAD_SLOT..HEAD_SLOT + 40].fill(b'#');
        std::fs::write(&head, &bytes).expect("write");
        assert!(matches!(
            read_head(&head, &key()),
            HeadState::Valid { seq: 2, .. }
        ));
        // One behind is what a crash between a line and its head looks like: no problem, and
        // opening brings the head level again.
        assert!(verify(&path, &key(), &head).expect("verify").is_ok());
        let log = AuditLog::open(&path, key(), &head).expect("open");
        assert_eq!(log.next_seq(), 4);
        assert!(matches!(
            read_head(&head, &key()),
            HeadState::Valid { seq: 3, .. }
        ));
    }

    #[test]
    fn swapped_lines_are_reported() {
        let (_dir, path) = write_log(6);
        let mut lines = lines_of(&path);
        lines.swap(2, 3);
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (
                    3,
                    Problem::SeqGap {
                        expected: 3,
                        found: 4
                    }
                ),
                (
                    4,
                    Problem::Reordered {
                        expected: 5,
                        found: 3
                    }
                ),
                (5, Problem::BadMac),
                (6, Problem::Unverified { after: 3 }),
            ]
        );
    }

    #[test]
    fn inserted_line_is_reported() {
        let (_dir, path) = write_log(4);
        let mut lines = lines_of(&path);
        // A forged copy of line 2 with a new digest, put in as the new line 3.
        let forged = lines[1]
            .replace(&hex::encode([2u8; 32]), &hex::encode([9u8; 32]))
            .replace("\"seq\":2", "\"seq\":3");
        lines.insert(2, forged);
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems,
            vec![
                (3, Problem::BadMac),
                (
                    4,
                    Problem::Reordered {
                        expected: 4,
                        found: 3
                    }
                ),
                (5, Problem::Unverified { after: 3 })
            ]
        );
    }

    #[test]
    fn duplicated_line_is_reported() {
        let (_dir, path) = write_log(3);
        let mut lines = lines_of(&path);
        let copy = lines[1].clone();
        lines.insert(2, copy);
        write_lines(&path, &lines);
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report.problems[0],
            (
                3,
                Problem::Reordered {
                    expected: 3,
                    found: 2
                }
            )
        );
    }

    #[test]
    fn partial_trailing_line_is_cut_on_open_and_the_chain_continues() {
        let (_dir, path) = write_log(3);
        let whole = std::fs::read(&path).expect("read");
        // A crash in the middle of writing line 4.
        let mut crashed = whole.clone();
        crashed.extend_from_slice(b"{\"seq\":4,\"time\":\"2026-");
        std::fs::write(&path, &crashed).expect("write");
        let report = verify(&path, &key(), &head_file(&path)).expect("verify");
        assert_eq!(
            report,
            VerifyReport {
                lines: 4,
                problems: vec![(4, Problem::Truncated)]
            }
        );

        let mut log =
            AuditLog::open(&path, key(), &head_file(&path)).expect("open cuts the partial line");
        assert_eq!(std::fs::read(&path).expect("read"), whole);
        assert_eq!(log.next_seq(), 4);
        log.append(&record(4)).expect("append");
        assert_eq!(
            verify(&path, &key(), &head_file(&path)).expect("verify"),
            VerifyReport {
                lines: 4,
                problems: vec![]
            }
        );
    }

    #[test]
    fn partial_first_line_is_cut_to_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"{\"seq\":1,").expect("write");
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("open");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        log.append(&record(1)).expect("append");
        assert!(verify(&path, &key(), &head_file(&path))
            .expect("verify")
            .is_ok());
    }

    #[test]
    fn open_reads_only_the_tail_of_a_long_log() {
        // More than one 64 KiB tail block of lines, with large batch lines near the end.
        let (_dir, path) = write_log(400);
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("open");
        let mut big = AuditRecord::new("https://portal.example", Operation::SignBatch);
        for i in 0..1000u32 {
            big = big.digest(&i.to_be_bytes().repeat(8));
        }
        log.append(&big).expect("append");
        log.append(&big).expect("append");
        drop(log);
        let mut log = AuditLog::open(&path, key(), &head_file(&path)).expect("open");
        assert_eq!(log.next_seq(), 403);
        log.append(&record(1)).expect("append");
        assert!(verify(&path, &key(), &head_file(&path))
            .expect("verify")
            .is_ok());
    }

    #[test]
    fn loose_mode_is_tightened_and_short_key_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let _log = AuditLog::open(&path, key(), &head_file(&path)).expect("open");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            AuditKey::new(vec![1; 31]),
            Err(AuditError::KeyTooShort(31))
        ));
        assert_eq!(format!("{:?}", key()), "AuditKey([redacted])");
    }
}
