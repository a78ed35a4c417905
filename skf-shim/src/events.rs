//! Device insertion and removal: SKF_WaitForDevEvent on a thread of its own (it blocks), its
//! answers on a channel. Dropping [`DeviceEvents`] cancels the wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{from_sar, Error};
use crate::ffi::{RawEvent, Skf};
use crate::remote::{Job, Reply, Transport};

/// What happened to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeviceEventKind {
    /// Plugged in.
    Inserted,
    /// Pulled out.
    Removed,
}

/// One SKF_WaitForDevEvent answer. The device is named as SKF_EnumDev names it; list the
/// tokens again to learn its token id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceEvent {
    /// The device name.
    pub device_name: String,
    /// Inserted or removed.
    pub kind: DeviceEventKind,
}

/// A running watch. Events arrive in the library's order; after an error (the library cannot
/// wait for events, or the wait failed) no more arrive and the caller should poll instead.
#[derive(Debug)]
pub struct DeviceEvents {
    rx: mpsc::Receiver<Result<DeviceEvent, Error>>,
    /// Stops the watch when dropped (after `rx`'s sender may have gone).
    _watch: Watch,
}

#[derive(Debug)]
#[expect(dead_code, reason = "held only so that dropping it stops the watch")]
enum Watch {
    Local(LocalWatch),
    Remote(RemoteWatch),
}

/// SKF_WaitForDevEvent in this process.
#[derive(Debug)]
struct LocalWatch {
    skf: Arc<Skf>,
    stop: Arc<AtomicBool>,
    /// The library's "a watch runs" flag, cleared when this one ends.
    watching: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    finished: mpsc::Receiver<()>,
    stop_timeout: Duration,
}

impl DeviceEvents {
    pub(crate) fn start(
        skf: Arc<Skf>,
        watching: Arc<AtomicBool>,
        stop_timeout: Duration,
    ) -> Result<DeviceEvents, Error> {
        let (tx, rx) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let skf = Arc::clone(&skf);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("skf-events".to_owned())
                .spawn(move || {
                    let _finished = finished_tx;
                    watch(&skf, &stop, &tx);
                })
                .map_err(|_| Error::WorkerGone)?
        };
        Ok(DeviceEvents {
            rx,
            _watch: Watch::Local(LocalWatch {
                skf,
                stop,
                watching,
                thread: Some(thread),
                finished,
                stop_timeout,
            }),
        })
    }

    /// The events of a hosted library: a thread asks the host for the next event, a wait
    /// slice at a time, while the host runs (a host that ended is started again by the next
    /// other call, never by this watch, so that its tokens' going is seen first).
    pub(crate) fn start_remote(
        transport: Arc<dyn Transport>,
        watching: Arc<AtomicBool>,
        call_timeout: Duration,
    ) -> Result<DeviceEvents, Error> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("skf-events-remote".to_owned())
                .spawn(move || watch_remote(transport.as_ref(), &stop, &tx, call_timeout))
                .map_err(|_| Error::WorkerGone)?
        };
        Ok(DeviceEvents {
            rx,
            _watch: Watch::Remote(RemoteWatch {
                stop,
                watching,
                thread: Some(thread),
            }),
        })
    }

    /// The next event, waiting at most `timeout`; `None` when none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Result<DeviceEvent, Error>> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event if one is waiting.
    pub fn try_recv(&self) -> Option<Result<DeviceEvent, Error>> {
        self.rx.try_recv().ok()
    }
}

fn watch(skf: &Skf, stop: &AtomicBool, tx: &mpsc::Sender<Result<DeviceEvent, Error>>) {
    while !stop.load(Ordering::SeqCst) {
        let answer = skf.wait_for_dev_event();
        if stop.load(Ordering::SeqCst) {
            return; // our own cancel, whatever the library answered
        }
        let event = match answer {
            Ok((device_name, RawEvent::Inserted)) => DeviceEvent {
                device_name,
                kind: DeviceEventKind::Inserted,
            },
            Ok((device_name, RawEvent::Removed)) => DeviceEvent {
                device_name,
                kind: DeviceEventKind::Removed,
            },
            Ok((device_name, RawEvent::Other(code))) => {
                tracing::debug!(device = %device_name, code, "unknown SKF device event ignored");
                continue;
            }
            Err(sar) => {
                // Report and stop: a library that fails at once would otherwise spin.
                let _ = tx.send(Err(from_sar(sar)));
                return;
            }
        };
        if tx.send(Ok(event)).is_err() {
            return;
        }
    }
}

/// A hosted library's events, asked for by a thread of this process.
#[derive(Debug)]
struct RemoteWatch {
    stop: Arc<AtomicBool>,
    watching: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long one [`Job::NextEvent`] waits in the host: also the longest a stop waits.
const REMOTE_SLICE: Duration = Duration::from_millis(500);

fn watch_remote(
    t: &dyn Transport,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<DeviceEvent, Error>>,
    call_timeout: Duration,
) {
    let wait_ms = u64::try_from(REMOTE_SLICE.as_millis()).unwrap_or(500);
    while !stop.load(Ordering::SeqCst) {
        if !t.is_up() {
            std::thread::sleep(REMOTE_SLICE);
            continue;
        }
        let job = Job::NextEvent { wait_ms };
        match t.run(job, call_timeout + REMOTE_SLICE, None, &mut |_| {}) {
            Ok(Reply::Event(Ok(None))) => {}
            Ok(Reply::Event(Ok(Some(event)))) => {
                if tx.send(Ok(event)).is_err() {
                    return;
                }
            }
            Ok(Reply::Event(Err(e))) => {
                // The library cannot wait for events: report and stop (the caller polls).
                let _ = tx.send(Err(e.into()));
                return;
            }
            Ok(other) => {
                let _ = tx.send(Err(crate::remote::unexpected(&other)));
                return;
            }
            // The host ended (its supervisor reports that) or is busy: wait for the next.
            Err(e) => {
                tracing::debug!(error = ?e, "no device event from the SKF library host");
                std::thread::sleep(REMOTE_SLICE);
            }
        }
    }
}

impl Drop for RemoteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // Ends within one slice, or one call deadline if the host stops answering.
            let _ = thread.join();
        }
        self.watching.store(false, Ordering::SeqCst);
    }
}

impl Drop for LocalWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else {
            self.watching.store(false, Ordering::SeqCst);
            return;
        };
        // A cancel only ends a wait in progress: the thread may be between two waits when the
        // first one comes, so cancel again until it is out, within a bounded time (a library that
        // ignores cancels keeps its thread, which is then left behind).
        let deadline = Instant::now() + self.stop_timeout;
        loop {
            if let Err(sar) = self.skf.cancel_wait_for_dev_event() {
                tracing::debug!(error = %from_sar(sar), "SKF_CancelWaitForDevEvent failed");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.finished.recv_timeout(left.min(CANCEL_REPEAT)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if left > CANCEL_REPEAT => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!("SKF_WaitForDevEvent did not return after the cancel; leaving its thread behind");
                    return;
                }
            }
        }
        let _ = thread.join();
        // Only a finished wait frees the library for the next watch.
        self.watching.store(false, Ordering::SeqCst);
    }
}

/// How often the cancel is repeated while the event thread has not ended.
const CANCEL_REPEAT: Duration = Duration::from_millis(100);
