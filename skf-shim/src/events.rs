//! Device insertion and removal: SKF_WaitForDevEvent on a thread of its own (it blocks), its
//! answers on a channel. Dropping [`DeviceEvents`] cancels the wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{from_sar, Error};
use crate::ffi::{RawEvent, Skf};

/// What happened to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceEventKind {
    /// Plugged in.
    Inserted,
    /// Pulled out.
    Removed,
}

/// One SKF_WaitForDevEvent answer. The device is named as SKF_EnumDev names it; list the
/// tokens again to learn its token id.
#[derive(Clone, Debug, PartialEq, Eq)]
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
            skf,
            stop,
            watching,
            thread: Some(thread),
            finished,
            stop_timeout,
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

impl Drop for DeviceEvents {
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
