//! The host's side: greet, then answer jobs in order until the agent goes.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frame::{
    write_frame, FrameError, FrameReader, FromHost, Greeting, ToHost, PROTOCOL_VERSION,
};

/// Inside a host, the library's own calls are never cut short: the agent's deadline is the
/// one that counts (it stops the whole host).
pub const NO_DEADLINE_IN_HOST: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// The socket the supervisor hands a host: its standard input.
pub fn socket_from_stdin() -> std::io::Result<UnixStream> {
    Ok(UnixStream::from(
        std::io::stdin().as_fd().try_clone_to_owned()?,
    ))
}

/// The start of every host mode: confine the process ([`super::sandbox::confine`]), then take
/// the agent's socket from standard input. `None` once the failure is logged (`what` names the
/// host in the message); the host then exits with status 2.
pub fn confined_socket(what: &str) -> Option<UnixStream> {
    if let Err(e) = super::sandbox::confine() {
        tracing::error!(error = %e, "the {what} host could not confine itself");
        return None;
    }
    socket_from_stdin()
        .inspect_err(
            |e| tracing::error!(error = %e, "the {what} host has no socket on its standard input"),
        )
        .ok()
}

/// What a running job may use besides its input: its cancel flag (set when the agent sends
/// [`ToHost::Cancel`]) and a way to send interim answers (progress).
#[derive(Debug)]
pub struct JobContext<A> {
    id: u64,
    cancel: Arc<AtomicBool>,
    writer: Arc<Mutex<UnixStream>>,
    _answers: PhantomData<fn(A)>,
}

impl<A> Clone for JobContext<A> {
    fn clone(&self) -> Self {
        JobContext {
            id: self.id,
            cancel: Arc::clone(&self.cancel),
            writer: Arc::clone(&self.writer),
            _answers: PhantomData,
        }
    }
}

impl<A: Serialize> JobContext<A> {
    /// Set once the agent cancelled this job.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Sends an interim answer (the agent re-arms the job's deadline on it).
    pub fn interim(&self, answer: A) -> Result<(), FrameError> {
        write_frame(
            &mut *lock(&self.writer),
            &FromHost::Interim {
                id: self.id,
                answer,
            },
        )
    }
}

/// [`serve_with`] for a handler that needs neither cancel nor interim answers.
pub fn serve<J, A, H>(socket: UnixStream, mut handle: H) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J) -> A + Send + 'static,
{
    serve_with(socket, move |job, _ctx: &JobContext<A>| handle(job))
}

/// Greets the agent, then answers each job with `handle`, one at a time, on a thread of its
/// own, while this thread keeps reading (so a cancel reaches a running job). Returns as soon as
/// the agent closes its end — also while a job is stuck in the library, so the caller should
/// exit the process right away.
pub fn serve_with<J, A, H>(socket: UnixStream, handle: H) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J, &JobContext<A>) -> A + Send + 'static,
{
    serve_inner(socket, handle, None, None)
}

/// [`serve_with`], where a job that `quick` accepts and that finds no other job queued or
/// running is answered on the reading thread itself: no hand-off to the job thread (a wake-up
/// and two context switches per job). While it runs nobody reads the socket, so `quick` must
/// accept only jobs a cancel cannot stop midway (one signature, a listing): a cancel sent
/// meanwhile is read after the answer and finds nothing to cancel. Should such a job hang, the
/// host still ends with the agent: a thread waits for nothing but the socket's hang-up
/// ([`exit_on_hangup`]), and the agent's deadline stops the host.
pub fn serve_with_quick<J, A, H>(
    socket: UnixStream,
    handle: H,
    quick: fn(&J) -> bool,
) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J, &JobContext<A>) -> A + Send + 'static,
{
    serve_inner(socket, handle, None, Some(quick))
}

/// Jobs answered beside the others (on a thread of their own, in their own order): a wait for
/// a device event must not hold up a signature, nor wait behind one. The agent's supervisor
/// must know them too ([`super::supervisor::Supervisor::set_side_jobs`]): its view of the job
/// running is about the others only.
pub struct SideJobs<J, A> {
    pub is_side: fn(&J) -> bool,
    pub handle: SideHandler<J, A>,
}

/// What answers a side job.
pub type SideHandler<J, A> = Box<dyn FnMut(J, &JobContext<A>) -> A + Send>;

impl<J, A> std::fmt::Debug for SideJobs<J, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideJobs").finish_non_exhaustive()
    }
}

/// [`serve_with`], with some jobs answered beside the others.
pub fn serve_with_side<J, A, H>(
    socket: UnixStream,
    handle: H,
    side: SideJobs<J, A>,
) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J, &JobContext<A>) -> A + Send + 'static,
{
    serve_inner(socket, handle, Some(side), None)
}

fn serve_inner<J, A, H>(
    socket: UnixStream,
    handle: H,
    side: Option<SideJobs<J, A>>,
    quick: Option<fn(&J) -> bool>,
) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J, &JobContext<A>) -> A + Send + 'static,
{
    let reader = socket.try_clone()?;
    let writer = Arc::new(Mutex::new(socket));
    write_frame(
        &mut *lock(&writer),
        &Greeting {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        },
    )?;
    if quick.is_some() {
        let watched = reader.try_clone()?;
        std::thread::Builder::new()
            .name("host-hangup".into())
            .spawn(move || exit_on_hangup(&watched))?;
    }
    // Cancel flags of the jobs queued or running.
    let flags: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    // Jobs handed to the job thread and not answered yet.
    let handed = Arc::new(AtomicUsize::new(0));
    // The job thread's, and the reader's for a quick job when the job thread is idle (so the
    // lock is never waited for).
    let handle = Arc::new(Mutex::new(handle));
    let (jobs, queue) = mpsc::channel::<(u64, J, Arc<AtomicBool>)>();
    let (job_writer, job_flags) = (Arc::clone(&writer), Arc::clone(&flags));
    let (job_handle, job_handed) = (Arc::clone(&handle), Arc::clone(&handed));
    std::thread::Builder::new()
        .name("host-jobs".into())
        .spawn(move || {
            for (id, job, cancel) in queue {
                let ctx = JobContext {
                    id,
                    cancel,
                    writer: Arc::clone(&job_writer),
                    _answers: PhantomData,
                };
                // Each write takes the writer's lock for itself only: the job sends interim
                // answers in between. No message says the job started: the agent knows the
                // order the jobs run in.
                let answer = (*lock(&job_handle))(job, &ctx);
                let sent = write_frame(&mut *lock(&job_writer), &FromHost::Answer { id, answer });
                lock(&job_flags).remove(&id);
                // After the answer is out: a quick job the reader runs now is answered after it.
                job_handed.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = sent {
                    tracing::error!(error = %e, "the agent's socket failed; the host stops answering");
                    break;
                }
            }
        })?;
    let side = match side {
        Some(SideJobs {
            is_side,
            handle: mut side_handle,
        }) => {
            let (side_jobs, side_queue) = mpsc::channel::<(u64, J)>();
            let side_writer = Arc::clone(&writer);
            std::thread::Builder::new()
                .name("host-side-jobs".into())
                .spawn(move || {
                    for (id, job) in side_queue {
                        let ctx = JobContext {
                            id,
                            cancel: Arc::new(AtomicBool::new(false)),
                            writer: Arc::clone(&side_writer),
                            _answers: PhantomData,
                        };
                        let answer = side_handle(job, &ctx);
                        let sent =
                            write_frame(&mut *lock(&side_writer), &FromHost::Answer { id, answer });
                        if let Err(e) = sent {
                            tracing::error!(error = %e, "the agent's socket failed; the host stops answering");
                            break;
                        }
                    }
                })?;
            Some((is_side, side_jobs))
        }
        None => None,
    };
    let mut frames = FrameReader::new(reader);
    while let Some(message) = frames.read_frame::<ToHost<J>>()? {
        match message {
            ToHost::Job { id, job } if side.as_ref().is_some_and(|(is, _)| is(&job)) => {
                if let Some((_, side_jobs)) = &side {
                    if side_jobs.send((id, job)).is_err() {
                        break;
                    }
                }
            }
            ToHost::Job { id, job }
                if quick.is_some_and(|q| q(&job)) && handed.load(Ordering::SeqCst) == 0 =>
            {
                let ctx = JobContext {
                    id,
                    cancel: Arc::new(AtomicBool::new(false)),
                    writer: Arc::clone(&writer),
                    _answers: PhantomData,
                };
                let answer = (*lock(&handle))(job, &ctx);
                write_frame(&mut *lock(&writer), &FromHost::Answer { id, answer })?;
            }
            ToHost::Job { id, job } => {
                let cancel = Arc::new(AtomicBool::new(false));
                lock(&flags).insert(id, Arc::clone(&cancel));
                handed.fetch_add(1, Ordering::SeqCst);
                if jobs.send((id, job, cancel)).is_err() {
                    break;
                }
            }
            ToHost::Cancel { id } => {
                if let Some(flag) = lock(&flags).get(&id) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    }
    Ok(())
}

/// Waits for the agent's end of `socket` to close, then kills the process: a host whose reader
/// is inside a job that hangs would otherwise outlive the agent. It waits for the hang-up
/// alone (`POLLRDHUP`), so frames arriving on the socket do not wake it.
fn exit_on_hangup(socket: &UnixStream) {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(socket, PollFlags::RDHUP)];
        match poll(&mut fds, None) {
            Ok(_) if !fds[0].revents().is_empty() => {
                tracing::debug!("the agent closed the socket; the host ends");
                // Not `exit`: the reader may be ending the process at the same moment (it saw
                // the end too), and a second `exit` waits forever for the first, whose atexit
                // handlers (the library's destructors) may wait on this process's other
                // threads. SIGKILL to the host's process group (it leads one) ends every
                // thread, and any helper the library forked, at once — what the agent does to a
                // host it stops.
                let me = rustix::process::getpid();
                let _ = rustix::process::kill_process_group(me, rustix::process::Signal::KILL);
                return;
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the host cannot watch its socket for a hang-up");
                return;
            }
        }
    }
}

/// How often the host tells the agent of a job's progress: half the agent's own
/// `sign.progress` interval, so pages still see ten events a second. A message per signature
/// woke a thread in the host and one in the agent per signature (issue 12: a batch of 1000
/// spent a fifth of its CPU so).
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// One thread for the host's life that sends a job's progress to the agent (as interim
/// answers made by `wrap`) while the job runs on the job thread; a thread per job cost
/// ≈ 0.5 ms per signature in a debug build. It looks at the job's progress every
/// [`PROGRESS_EVERY`] and sends the latest count, and the last one when the job ends: the job
/// only queues its counts, which wakes nobody.
pub struct InterimForwarder<P, A> {
    jobs: mpsc::Sender<ForwardJob<P, A>>,
}

/// A job's progress, its context, the job's end, and the forwarder's answer once all of its
/// progress went out.
type ForwardJob<P, A> = (
    mpsc::Receiver<P>,
    JobContext<A>,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
);

impl<P, A> std::fmt::Debug for InterimForwarder<P, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterimForwarder").finish_non_exhaustive()
    }
}

impl<P: Send + 'static, A: Serialize + Send + 'static> InterimForwarder<P, A> {
    pub fn start(wrap: fn(P) -> A) -> std::io::Result<InterimForwarder<P, A>> {
        let (jobs, queue) = mpsc::channel::<ForwardJob<P, A>>();
        std::thread::Builder::new()
            .name("host-progress".into())
            .spawn(move || {
                for (progress, ctx, ended, done) in queue {
                    let send_latest = || {
                        let (latest, closed) = latest(&progress);
                        if let Some(p) = latest {
                            if let Err(e) = ctx.interim(wrap(p)) {
                                tracing::debug!(error = %e, "a progress message did not reach the agent");
                            }
                        }
                        closed
                    };
                    loop {
                        if send_latest() {
                            break;
                        }
                        match ended.recv_timeout(PROGRESS_EVERY) {
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            // The job ended (or its handle was dropped): its last count goes out.
                            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                                send_latest();
                                break;
                            }
                        }
                    }
                    let _ = done.send(());
                }
            })?;
        Ok(InterimForwarder { jobs })
    }

    /// A sender for one job's progress, and the handle to [`Forwarded::finish`] once the job
    /// ended (before its answer, so that all of its progress precedes the answer).
    pub fn forward(&self, ctx: JobContext<A>) -> (mpsc::Sender<P>, Forwarded) {
        let (tx, rx) = mpsc::channel();
        let (ended, ended_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        // Should the forwarder be gone, progress is dropped and the answer not held up: the
        // job's `done` sender is dropped with it, so `finish` returns at once.
        let _ = self.jobs.send((rx, ctx, ended_rx, done_tx));
        (tx, Forwarded { ended, done })
    }
}

/// The latest of the progress queued in `progress`, and whether its sender is gone.
fn latest<P>(progress: &mpsc::Receiver<P>) -> (Option<P>, bool) {
    let mut latest = None;
    loop {
        match progress.try_recv() {
            Ok(p) => latest = Some(p),
            Err(mpsc::TryRecvError::Empty) => return (latest, false),
            Err(mpsc::TryRecvError::Disconnected) => return (latest, true),
        }
    }
}

/// One job's progress being forwarded ([`InterimForwarder::forward`]).
#[derive(Debug)]
pub struct Forwarded {
    ended: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl Forwarded {
    /// Tells the forwarder the job ended and waits until its last progress went out.
    pub fn finish(self) {
        let _ = self.ended.send(());
        let _ = self.done.recv();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use std::time::Instant;

    use super::super::frame::FrameReader;
    use super::*;

    /// A job's context whose interim answers go to `socket`.
    fn context(socket: UnixStream) -> JobContext<usize> {
        JobContext {
            id: 7,
            cancel: Arc::default(),
            writer: Arc::new(Mutex::new(socket)),
            _answers: PhantomData,
        }
    }

    /// The counts of the interim answers on `socket` until the one with `last`.
    fn interims_until(socket: &mut FrameReader<UnixStream>, last: usize) -> Vec<usize> {
        let mut counts = Vec::new();
        loop {
            match socket.read_frame::<FromHost<usize>>().unwrap() {
                Some(FromHost::Interim { id: 7, answer }) => {
                    counts.push(answer);
                    if answer == last {
                        return counts;
                    }
                }
                other => panic!("{other:?} after {counts:?}"),
            }
        }
    }

    #[test]
    fn a_burst_of_progress_reaches_the_agent_as_a_few_messages_ending_with_the_last_count() {
        let (host, agent) = UnixStream::pair().unwrap();
        let mut agent = FrameReader::new(agent);
        let forwarder = InterimForwarder::start(|done: usize| done).unwrap();
        let started = Instant::now();
        let (progress, forwarded) = forwarder.forward(context(host));
        for done in 1..=1000 {
            progress.send(done).unwrap();
        }
        drop(progress);
        forwarded.finish();
        let elapsed = started.elapsed();
        let counts = interims_until(&mut agent, 1000);
        // One message each time the forwarder looks, and the last: never one per signature.
        let looks = elapsed.as_millis() / PROGRESS_EVERY.as_millis() + 2;
        assert!(
            counts.len() as u128 <= looks,
            "{} messages in {elapsed:?}: {counts:?}",
            counts.len()
        );
        assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    }

    #[test]
    fn progress_goes_out_while_the_job_runs_not_only_at_its_end() {
        let (host, agent) = UnixStream::pair().unwrap();
        let mut agent = FrameReader::new(agent);
        let forwarder = InterimForwarder::start(|done: usize| done).unwrap();
        let (progress, forwarded) = forwarder.forward(context(host));
        let seen = Arc::new(AtomicBool::new(false));
        let job_saw = Arc::clone(&seen);
        // A slow job: a signature every 2 ms until the agent has seen some progress.
        let job = std::thread::spawn(move || {
            let mut done = 0;
            while !job_saw.load(Ordering::SeqCst) && done < 5000 {
                done += 1;
                progress.send(done).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(progress);
            forwarded.finish();
            done
        });
        let first = match agent.read_frame::<FromHost<usize>>().unwrap() {
            Some(FromHost::Interim { id: 7, answer }) => answer,
            other => panic!("{other:?}"),
        };
        seen.store(true, Ordering::SeqCst);
        let last = job.join().unwrap();
        assert!(
            last < 5000,
            "no progress reached the agent while the job ran"
        );
        assert!(first <= last);
        if first < last {
            let rest = interims_until(&mut agent, last);
            assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
        }
    }
}
