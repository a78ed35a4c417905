//! The agent's side: one [`Supervisor`] per vendor library, owning at most one live host.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frame::{
    write_frame, FrameError, FrameReader, FromHost, Greeting, ToHost, PROTOCOL_VERSION,
};

/// The first wait after a host died; doubled after each death, up to [`MAX_BACKOFF`], and back
/// to this after a call answered.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a new host has to greet.
const GREETING_WAIT: Duration = Duration::from_secs(10);
/// How often a call with a cancel flag looks at it.
const CANCEL_POLL: Duration = Duration::from_millis(20);
/// How long a write to a host may make no progress before the host counts as hung. A host
/// reads its socket whenever it is not inside a quick job itself (see
/// [`super::serve::serve_with_quick`]), so a socket that stays full this long (≈ 200 KiB of
/// jobs unread) means a stuck host; the bound keeps an async caller, which writes its job
/// itself on a runtime worker, from blocking that worker for longer.
const WRITE_WAIT: Duration = Duration::from_secs(2);

/// Why a call got no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostError {
    #[error("the module host could not be started: {0}")]
    Start(String),
    #[error("the module host ended during the call: {how}")]
    Died { how: String },
    #[error("the module host did not answer within {after:?} and was stopped")]
    TimedOut { after: Duration },
    #[error("the module host is being restarted (next try in {retry_in:?})")]
    Restarting { retry_in: Duration },
    #[error("the module host connection failed: {0}")]
    Connection(String),
    /// The host is busy with another job that is still within its own deadline (a long batch,
    /// a PIN-pad login); this one was given up on and will be skipped. The host lives on.
    #[error("the module host is busy with another job (waited {after:?})")]
    Busy { after: Duration },
}

/// What `keyport doctor` shows of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStatus {
    /// The live host's process id.
    pub pid: Option<u32>,
    /// Hosts started after the first.
    pub restarts: u32,
    /// How the last host ended, or why the last start failed.
    pub last_failure: Option<String>,
}

/// How to start a host: a program (normally this `keyport` binary) and its arguments.
#[derive(Debug, Clone)]
pub struct HostCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

/// Called (on the host's reader thread) when a host ends, with how it ended.
pub type OnExit = Arc<dyn Fn(&str) + Send + Sync>;

/// Starts hosts for one library and calls them. Calls may come from many threads; the host
/// answers them in the order they arrive.
pub struct Supervisor<J, A> {
    command: HostCommand,
    on_exit: Option<OnExit>,
    /// The jobs a host answers beside the others ([`super::serve::SideJobs`]); they run out
    /// of the queue's order.
    is_side: fn(&J) -> bool,
    state: Mutex<State<A>>,
    _jobs: PhantomData<fn(J)>,
}

impl<J, A> std::fmt::Debug for Supervisor<J, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("program", &self.command.program)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

struct State<A> {
    live: Option<Live<A>>,
    min_backoff: Duration,
    max_backoff: Duration,
    started: u32,
    last_failure: Option<String>,
    /// No new host before this.
    next_start: Option<Instant>,
    backoff: Duration,
}

struct Live<A> {
    pid: u32,
    writer: Arc<Mutex<UnixStream>>,
    shared: Arc<Shared<A>>,
}

/// A message for a waiting caller.
enum Delivery<A> {
    Interim(A),
    Final(A),
}

/// The way to a waiting caller: a thread blocked on a channel ([`Supervisor::call_with`]), or
/// a task awaiting one ([`Supervisor::call_async`]), which the reader thread wakes directly.
enum Waiter<A> {
    Blocking(mpsc::Sender<Delivery<A>>),
    Async(tokio::sync::mpsc::UnboundedSender<Delivery<A>>),
}

impl<A> Waiter<A> {
    /// Hands `d` over; a caller that gave up (or a future that was dropped) is not there.
    fn deliver(&self, d: Delivery<A>) {
        match self {
            Waiter::Blocking(tx) => {
                let _ = tx.send(d);
            }
            Waiter::Async(tx) => {
                let _ = tx.send(d);
            }
        }
    }
}

/// What a caller holds of the live host for one call.
struct Handle<A> {
    pid: u32,
    writer: Arc<Mutex<UnixStream>>,
    shared: Arc<Shared<A>>,
}

/// What a live host's reader thread and its callers share.
struct Shared<A> {
    pending: Mutex<HashMap<u64, Waiter<A>>>,
    /// The jobs sent and not answered yet, side jobs aside, in the order the host got them
    /// (each is pushed while its frame is written): the host runs them one at a time in that
    /// order, so the first is the one running. Known without a message from the host, which
    /// would wake the reader thread once more per job.
    queue: Mutex<VecDeque<u64>>,
    /// Jobs whose caller gave up while they were queued: nobody watches them any more, so a
    /// later caller that times out behind one of them stops the host.
    abandoned: Mutex<HashSet<u64>>,
    /// How the host ended, once it has.
    ended: Mutex<Option<String>>,
    next_id: AtomicU64,
}

impl<J, A> Supervisor<J, A>
where
    J: Serialize,
    A: DeserializeOwned + Send + 'static,
{
    pub fn new(command: HostCommand, on_exit: Option<OnExit>) -> Self {
        Supervisor {
            command,
            on_exit,
            is_side: |_| false,
            state: Mutex::new(State {
                live: None,
                min_backoff: MIN_BACKOFF,
                max_backoff: MAX_BACKOFF,
                started: 0,
                last_failure: None,
                next_start: None,
                backoff: MIN_BACKOFF,
            }),
            _jobs: PhantomData,
        }
    }

    /// Which jobs the hosts answer beside the others (as their [`super::serve::SideJobs`]
    /// say): none unless set.
    pub fn set_side_jobs(&mut self, is_side: fn(&J) -> bool) {
        self.is_side = is_side;
    }

    /// The first and the longest wait after a death (tests shorten them).
    pub fn set_backoff(&mut self, min: Duration, max: Duration) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.min_backoff = min;
        state.max_backoff = max.max(min);
        state.backoff = min;
    }

    /// Starts a host unless one is running or the backoff has not passed.
    pub fn ensure_running(&self) -> Result<u32, HostError> {
        let mut state = lock(&self.state);
        self.live(&mut state).map(|l| l.pid)
    }

    /// Sends `job` and waits at most `deadline` for its answer. Past the deadline the host is
    /// killed (its other callers get [`HostError::Died`]) and the next call starts a new one.
    pub fn call(&self, job: J, deadline: Duration) -> Result<A, HostError> {
        self.call_with(job, deadline, None, &mut |_| {})
    }

    /// [`Self::call`] for a job that may send interim answers (each goes to `interim` and
    /// re-arms the deadline) and may be cancelled: once `cancel` is set, the host is told, and
    /// the call goes on waiting for the job's answer.
    ///
    /// A job that is still queued behind another one at its deadline does not stop the host
    /// while that other job's caller still waits within its own deadline: it fails with
    /// [`HostError::Busy`] and the host is told to cancel it. Otherwise (the job running, or
    /// the job ahead of it abandoned) the host is killed and the call fails with
    /// [`HostError::TimedOut`].
    pub fn call_with(
        &self,
        job: J,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(A),
    ) -> Result<A, HostError> {
        let host = {
            let mut state = lock(&self.state);
            let live = self.live(&mut state)?;
            live.handle()
        };
        let (tx, rx) = mpsc::channel();
        let id = self.submit(&host, job, Waiter::Blocking(tx))?;
        let mut step_end = Instant::now() + deadline;
        let mut cancel_sent = false;
        loop {
            let watch_cancel = cancel.is_some() && !cancel_sent;
            let left = step_end.saturating_duration_since(Instant::now());
            let wait = if watch_cancel {
                left.min(CANCEL_POLL)
            } else {
                left
            };
            match rx.recv_timeout(wait) {
                Ok(Delivery::Interim(answer)) => {
                    interim(answer);
                    step_end = Instant::now() + deadline;
                }
                Ok(Delivery::Final(answer)) => {
                    self.answered(false);
                    return Ok(answer);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if watch_cancel && cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                        cancel_sent = true;
                        let _ = write_frame(&mut *lock(&host.writer), &ToHost::<J>::Cancel { id });
                    }
                    if Instant::now() >= step_end {
                        return Err(self.give_up(&host, id, deadline));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.died(&host.shared)),
            }
        }
    }

    /// [`Self::call_with`] for a task on a tokio runtime, with the same deadlines, cancel and
    /// restarts, and no thread of ours between the task and the host: the task writes its job
    /// to the host's socket itself (a short write: the host's reader drains the socket while
    /// jobs run; [`WRITE_WAIT`] bounds it), and the host's reader thread wakes the task with
    /// the answer. Only starting a host (spawning it, waiting for its greeting) blocks, so it
    /// runs on the runtime's blocking pool. Dropping the future gives the job up as a timeout
    /// behind a long job does: the host still runs it, and a later call that times out behind
    /// it stops the host.
    pub async fn call_async(
        self: Arc<Self>,
        job: J,
        deadline: Duration,
        cancel: Option<Arc<AtomicBool>>,
        mut interim: impl FnMut(A) + Send,
    ) -> Result<A, HostError>
    where
        J: Send + 'static,
        A: Send + 'static,
    {
        let host = match self.up() {
            Some(host) => host,
            None => {
                let starter = Arc::clone(&self);
                let start = move || starter.ensure_running();
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => runtime
                        .spawn_blocking(start)
                        .await
                        .map_err(|e| HostError::Start(e.to_string()))??,
                    Err(_) => start()?,
                };
                let mut state = lock(&self.state);
                self.live(&mut state)?.handle()
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.submit(&host, job, Waiter::Async(tx))?;
        let mut waiting = AbandonOnDrop {
            shared: &host.shared,
            id: Some(id),
        };
        let mut step_end = Instant::now() + deadline;
        let mut cancel_sent = false;
        loop {
            let watch_cancel = cancel.is_some() && !cancel_sent;
            let left = step_end.saturating_duration_since(Instant::now());
            let wait = if watch_cancel {
                left.min(CANCEL_POLL)
            } else {
                left
            };
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(Delivery::Interim(answer))) => {
                    interim(answer);
                    step_end = Instant::now() + deadline;
                }
                Ok(Some(Delivery::Final(answer))) => {
                    waiting.id = None;
                    self.answered(true);
                    return Ok(answer);
                }
                Ok(None) => {
                    waiting.id = None;
                    return Err(self.died(&host.shared));
                }
                Err(_) => {
                    if watch_cancel && cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
                        cancel_sent = true;
                        let _ = write_frame(&mut *lock(&host.writer), &ToHost::<J>::Cancel { id });
                    }
                    if Instant::now() >= step_end {
                        waiting.id = None;
                        return Err(self.give_up(&host, id, deadline));
                    }
                }
            }
        }
    }

    /// The live host without starting one or waiting on a start under way: `None` if there is
    /// none, it ended, or another caller holds the state (it may be starting one).
    fn up(&self) -> Option<Handle<A>> {
        let state = self.state.try_lock().ok()?;
        state
            .live
            .as_ref()
            .filter(|l| lock(&l.shared.ended).is_none())
            .map(Live::handle)
    }

    /// Registers `waiter` for a new job and sends the job; its id.
    fn submit(&self, host: &Handle<A>, job: J, waiter: Waiter<A>) -> Result<u64, HostError> {
        let shared = &host.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&shared.pending).insert(id, waiter);
        if lock(&shared.ended).is_some() {
            // Ended between taking it and registering: the reader thread will not see us.
            lock(&shared.pending).remove(&id);
            return Err(self.died(shared));
        }
        let queued = !(self.is_side)(&job);
        let sent = {
            let mut writer = lock(&host.writer);
            if queued {
                lock(&shared.queue).push_back(id);
            }
            write_frame(&mut *writer, &ToHost::Job { id, job })
        };
        if let Err(e) = sent {
            lock(&shared.pending).remove(&id);
            lock(&shared.queue).retain(|&q| q != id);
            kill_group(host.pid);
            return Err(match e {
                FrameError::TooLarge(_) => HostError::Connection(e.to_string()),
                _ => self.died(shared),
            });
        }
        Ok(id)
    }

    /// A call was answered: the next death waits the shortest backoff again. From a runtime
    /// worker (`from_task`) the state is only taken if free: a caller holding it may be starting
    /// a host, and the worker must not wait for that.
    fn answered(&self, from_task: bool) {
        let state = if from_task {
            self.state.try_lock().ok()
        } else {
            Some(lock(&self.state))
        };
        if let Some(mut state) = state {
            state.backoff = state.min_backoff;
        }
    }

    /// Job `id` got no answer within `deadline`: given up as busy if a job ahead of it is
    /// still watched by its caller, else the host is stopped.
    fn give_up(&self, host: &Handle<A>, id: u64, deadline: Duration) -> HostError {
        let (pid, shared) = (host.pid, &host.shared);
        lock(&shared.pending).remove(&id);
        let running = lock(&shared.queue).front().copied();
        let ahead_is_watched =
            running.is_some_and(|r| r != id && !lock(&shared.abandoned).contains(&r));
        if ahead_is_watched {
            lock(&shared.abandoned).insert(id);
            let _ = write_frame(&mut *lock(&host.writer), &ToHost::<J>::Cancel { id });
            tracing::debug!(pid, "a job queued behind a long one was given up on");
            return HostError::Busy { after: deadline };
        }
        tracing::warn!(
            pid,
            ?deadline,
            "module host did not answer in time; stopping it"
        );
        {
            let mut state = lock(&self.state);
            if state.live.as_ref().is_some_and(|l| l.pid == pid) {
                state.live = None;
                state.last_failure = Some(format!("no answer within {} s", deadline.as_secs_f32()));
                Self::schedule_restart(&mut state);
            }
        }
        kill_group(pid);
        HostError::TimedOut { after: deadline }
    }

    /// Stops the live host, if any (the agent is shutting down, or the library is unloaded).
    pub fn stop(&self) {
        let live = lock(&self.state).live.take();
        if let Some(live) = live {
            kill_group(live.pid);
        }
    }

    fn died(&self, shared: &Shared<A>) -> HostError {
        HostError::Died {
            how: lock(&shared.ended)
                .clone()
                .unwrap_or_else(|| "the connection closed".into()),
        }
    }

    fn schedule_restart(state: &mut State<A>) {
        state.next_start = Some(Instant::now() + state.backoff);
        state.backoff = (state.backoff * 2).min(state.max_backoff);
    }

    /// The live host, started now if there is none and the backoff allows.
    fn live<'s>(&self, state: &'s mut State<A>) -> Result<&'s Live<A>, HostError> {
        if forget_ended(state) {
            Self::schedule_restart(state);
        }
        if state.live.is_none() {
            if let Some(at) = state.next_start {
                let now = Instant::now();
                if now < at {
                    return Err(HostError::Restarting { retry_in: at - now });
                }
            }
            match self.start() {
                Ok(live) => {
                    state.started += 1;
                    state.next_start = None;
                    state.live = Some(live);
                }
                Err(e) => {
                    state.last_failure = Some(e.to_string());
                    Self::schedule_restart(state);
                    return Err(e);
                }
            }
        }
        state
            .live
            .as_ref()
            .ok_or_else(|| HostError::Start("no host".into()))
    }

    fn start(&self) -> Result<Live<A>, HostError> {
        let start_err =
            |what: &str, e: &dyn std::fmt::Display| HostError::Start(format!("{what}: {e}"));
        let (ours, theirs) = UnixStream::pair().map_err(|e| start_err("socket pair", &e))?;
        // One reader for the host's life: the greeting, then (on the reader thread) answers.
        let mut frames = FrameReader::new(ours.try_clone().map_err(|e| start_err("socket", &e))?);
        // A library that prints to standard output must not reach the agent's: the host's
        // stdout goes where the agent's stderr goes.
        let stdout = std::io::stderr()
            .as_fd_owned()
            .map_err(|e| start_err("stderr", &e))?;
        // Descriptors this process inherited without close-on-exec (a jobserver pipe, a
        // session manager's leak) or that a library opened so: none may reach the host. They
        // are marked close-on-exec here, not closed (their owners may still use them in this
        // process); the host's socket and streams are duplicated onto 0, 1 and 2 by the spawn,
        // which clears the flag on those copies.
        #[cfg(unix)]
        close_fds::set_fds_cloexec_threadsafe(3, &[]);
        let mut cmd = Command::new(&self.command.program);
        cmd.args(&self.command.args)
            .envs(self.command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| start_err(&self.command.program.display().to_string(), &e))?;
        let pid = child.id();
        let greeted = ours
            .set_read_timeout(Some(GREETING_WAIT))
            .map_err(FrameError::from)
            .and_then(|()| frames.read_frame::<Greeting>());
        let failed = |why: String, child: &mut Child| {
            kill_group(pid);
            let how = child.wait().map(describe).unwrap_or_else(|e| e.to_string());
            HostError::Start(format!("{why} ({how})"))
        };
        match greeted {
            Ok(Some(g)) if g.version == PROTOCOL_VERSION => {}
            Ok(Some(g)) => {
                return Err(failed(
                    format!(
                        "the host speaks version {}, not {PROTOCOL_VERSION}",
                        g.version
                    ),
                    &mut child,
                ))
            }
            Ok(None) => return Err(failed("the host ended before greeting".into(), &mut child)),
            Err(e) => return Err(failed(format!("no greeting: {e}"), &mut child)),
        }
        // The timeout is the socket's: it held for `frames`' handle too, and ends for both.
        ours.set_read_timeout(None)
            .map_err(|e| start_err("socket", &e))?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            abandoned: Mutex::new(HashSet::new()),
            ended: Mutex::new(None),
            next_id: AtomicU64::new(1),
        });
        let on_exit = self.on_exit.clone();
        let for_reader = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("host-{pid}"))
            .spawn(move || read_answers(frames, child, for_reader, on_exit))
            .map_err(|e| start_err("reader thread", &e))?;
        ours.set_write_timeout(Some(WRITE_WAIT))
            .map_err(|e| start_err("socket", &e))?;
        tracing::info!(pid, program = %self.command.program.display(), "module host started");
        Ok(Live {
            pid,
            writer: Arc::new(Mutex::new(ours)),
            shared,
        })
    }
}

impl<A> Live<A> {
    fn handle(&self) -> Handle<A> {
        Handle {
            pid: self.pid,
            writer: Arc::clone(&self.writer),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// An async call's job while its future waits: if the future is dropped then, nobody will
/// watch the job any more (as after [`HostError::Busy`]), so a later call that times out
/// behind it stops the host instead of waiting behind it.
struct AbandonOnDrop<'s, A> {
    shared: &'s Shared<A>,
    id: Option<u64>,
}

impl<A> Drop for AbandonOnDrop<'_, A> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            lock(&self.shared.pending).remove(&id);
            lock(&self.shared.abandoned).insert(id);
        }
    }
}

impl<J, A> Supervisor<J, A> {
    /// True while the live host runs a job (a call now would queue behind it).
    pub fn is_busy(&self) -> bool {
        lock(&self.state)
            .live
            .as_ref()
            .is_some_and(|l| !lock(&l.shared.queue).is_empty())
    }

    pub fn status(&self) -> HostStatus {
        let mut state = lock(&self.state);
        forget_ended(&mut state);
        HostStatus {
            pid: state.live.as_ref().map(|l| l.pid),
            restarts: state.started.saturating_sub(1),
            last_failure: state.last_failure.clone(),
        }
    }
}

impl<J, A> Drop for Supervisor<J, A> {
    fn drop(&mut self) {
        if let Some(live) = lock(&self.state).live.take() {
            kill_group(live.pid);
        }
    }
}

/// Drops the live host if it has ended, recording how; true if it did.
fn forget_ended<A>(state: &mut State<A>) -> bool {
    let ended = state
        .live
        .as_ref()
        .and_then(|l| lock(&l.shared.ended).clone());
    match ended {
        Some(how) => {
            state.live = None;
            state.last_failure = Some(how);
            true
        }
        None => false,
    }
}

/// A host's reader thread: hands each answer to its caller; when the host ends, reaps it,
/// records how it ended, and fails every call still waiting.
fn read_answers<A: DeserializeOwned>(
    mut frames: FrameReader<UnixStream>,
    mut child: Child,
    shared: Arc<Shared<A>>,
    on_exit: Option<OnExit>,
) {
    let pid = child.id();
    let why = loop {
        match frames.read_frame::<FromHost<A>>() {
            Ok(Some(FromHost::Interim { id, answer })) => {
                if let Some(waiter) = lock(&shared.pending).get(&id) {
                    waiter.deliver(Delivery::Interim(answer));
                }
            }
            Ok(Some(FromHost::Answer { id, answer })) => {
                {
                    let mut queue = lock(&shared.queue);
                    if queue.front() == Some(&id) {
                        queue.pop_front();
                    } else {
                        queue.retain(|&q| q != id);
                    }
                }
                lock(&shared.abandoned).remove(&id);
                if let Some(waiter) = lock(&shared.pending).remove(&id) {
                    // The caller may have given up (deadline); its answer is dropped.
                    waiter.deliver(Delivery::Final(answer));
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    // Zeroes what the reader still holds before the wait below.
    drop(frames);
    // A host that broke the protocol is stopped like one that crashed.
    kill_group(pid);
    let how = match child.wait() {
        Ok(status) => describe(status),
        Err(e) => format!("could not be reaped: {e}"),
    };
    let how = match why {
        Some(why) => format!("{why}; {how}"),
        None => how,
    };
    tracing::warn!(pid, %how, "module host ended");
    *lock(&shared.ended) = Some(how.clone());
    lock(&shared.pending).clear();
    if let Some(on_exit) = on_exit {
        on_exit(&how);
    }
}

/// "killed by signal 11 (SIGSEGV)", "exited with status 1".
fn describe(status: ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        let name = match sig {
            6 => " (SIGABRT)",
            9 => " (SIGKILL)",
            11 => " (SIGSEGV)",
            15 => " (SIGTERM)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "ended".into(),
        }
    }
}

/// SIGKILL to the host's process group (the host leads it), so helpers it forked go too.
fn kill_group(pid: u32) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        if e != rustix::io::Errno::SRCH {
            tracing::warn!(error = %e, "could not stop a module host");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> io::Result<OwnedFd>;
}

impl AsFdOwned for std::io::Stderr {
    fn as_fd_owned(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd as _;
        self.as_fd().try_clone_to_owned()
    }
}
