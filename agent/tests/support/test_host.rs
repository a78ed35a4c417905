//! A module host for the supervisor tests: this test binary again, running only the test
//! named [`HOST_TEST`] with [`HOST_ENV`] set, serving [`TestJob`]s the way a library host
//! serves a library's jobs — including crashing, exiting and hanging on request.

use std::ffi::OsString;
use std::time::Duration;

use agent::host::supervisor::{HostCommand, Supervisor};
use agent::host::HostError;
use serde::{Deserialize, Serialize};

pub const HOST_ENV: &str = "KEYPORT_TEST_HOST";
pub const CALL: Duration = Duration::from_secs(20);

/// What the test host can be told to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum TestJob {
    Echo(Vec<u8>),
    /// Print to standard output, then echo: the frames must not be disturbed.
    PrintThenEcho(Vec<u8>),
    Segv,
    Abort,
    Exit(i32),
    Hang,
    Descriptors,
    /// Try to open a TCP socket: the sandbox must refuse it.
    Tcp,
    /// Send this many interim `Step`s, one every `every_ms`, then answer `Echo([])`.
    Steps {
        count: u32,
        every_ms: u64,
    },
    /// Wait until the agent cancels this job, then answer `Cancelled`.
    WaitForCancel,
    /// A side job (answered beside the others, as an SKF host answers a device-event wait):
    /// echo.
    Side(Vec<u8>),
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestAnswer {
    Echo(Vec<u8>),
    /// Each open descriptor: its number and what it points at.
    Descriptors(Vec<(u32, String)>),
    Tcp(Result<(), i32>),
    Step(u32),
    Cancelled,
}

pub type TestSupervisor = Supervisor<TestJob, TestAnswer>;

/// A supervisor of the test host, whose backoff after a death is 1 ms, doubling to 8 ms.
pub fn supervisor(host_test: &str) -> TestSupervisor {
    let exe = std::env::current_exe().unwrap();
    let mut s = Supervisor::new(
        HostCommand {
            program: exe,
            args: [host_test, "--exact", "--include-ignored", "--nocapture"]
                .map(OsString::from)
                .to_vec(),
            env: vec![(HOST_ENV.into(), "1".into())],
        },
        None,
    );
    s.set_backoff(Duration::from_millis(1), Duration::from_millis(8));
    s.set_side_jobs(|job| matches!(job, TestJob::Side(_)));
    s
}

/// Waits out the backoff after a death (what the next caller would see), then calls.
pub fn call_after_backoff(s: &TestSupervisor, job: TestJob) -> Result<TestAnswer, HostError> {
    loop {
        match s.ensure_running() {
            Err(HostError::Restarting { retry_in }) => std::thread::sleep(retry_in),
            Err(e) => return Err(e),
            Ok(_) => return s.call(job, CALL),
        }
    }
}

/// The body of the host test: serves until the supervisor closes the socket, then exits.
pub fn run_host_if_asked() {
    if std::env::var_os(HOST_ENV).is_none() {
        return;
    }
    let socket = agent::host::serve::socket_from_stdin().unwrap();
    agent::host::sandbox::confine().unwrap();
    let side = agent::host::serve::SideJobs {
        is_side: |job: &TestJob| matches!(job, TestJob::Side(_)),
        handle: Box::new(
            |job: TestJob, _ctx: &agent::host::serve::JobContext<TestAnswer>| match job {
                TestJob::Side(b) => TestAnswer::Echo(b),
                _ => TestAnswer::Cancelled,
            },
        ),
    };
    let served = agent::host::serve::serve_with_side(
        socket,
        |job: TestJob, ctx| match job {
            TestJob::Echo(b) => TestAnswer::Echo(b),
            TestJob::PrintThenEcho(b) => {
                println!("a library writing to stdout");
                TestAnswer::Echo(b)
            }
            TestJob::Segv => {
                // The standard library's SIGSEGV handler (stack-overflow detection) lets a signal
                // sent with kill() pass and restores the default action, and two pending SIGSEGVs
                // are one: send until the default action kills the process.
                loop {
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::SEGV,
                    );
                    std::thread::yield_now();
                }
            }
            TestJob::Abort => std::process::abort(),
            TestJob::Exit(code) => std::process::exit(code),
            TestJob::Hang => loop {
                std::thread::park();
            },
            TestJob::Descriptors => TestAnswer::Descriptors(
                std::fs::read_dir("/proc/self/fd")
                    .unwrap()
                    .filter_map(|e| {
                        let e = e.ok()?;
                        let fd = e.file_name().to_str()?.parse().ok()?;
                        Some((fd, std::fs::read_link(e.path()).ok()?.display().to_string()))
                    })
                    .collect(),
            ),
            TestJob::Tcp => TestAnswer::Tcp(
                std::net::TcpListener::bind("127.0.0.1:0")
                    .map(drop)
                    .map_err(|e| e.raw_os_error().unwrap_or(-1)),
            ),
            TestJob::Steps { count, every_ms } => {
                for i in 0..count {
                    // A slow library call, not a synchronisation.
                    std::thread::sleep(Duration::from_millis(every_ms));
                    ctx.interim(TestAnswer::Step(i)).unwrap();
                }
                TestAnswer::Echo(Vec::new())
            }
            TestJob::WaitForCancel => {
                let cancel = ctx.cancel_flag();
                while !cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::park_timeout(Duration::from_millis(5));
                }
                TestAnswer::Cancelled
            }
            TestJob::Side(_) => unreachable!("side jobs go to the side handler"),
        },
        side,
    );
    std::process::exit(i32::from(served.is_err()));
}
