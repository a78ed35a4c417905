//! The module-host supervisor against a real child process: answers, crashes (SIGSEGV,
//! abort, exit), hangs past the deadline, the sandbox, the host's descriptors.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // tests panic on purpose

mod support;

use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::host::HostError;
use support::test_host::{call_after_backoff, supervisor, TestAnswer, TestJob, CALL};

const HOST: &str = "host_child";

#[test]
#[ignore = "runs only as a host started by the tests below"]
fn host_child() {
    support::test_host::run_host_if_asked();
}

#[test]
fn a_host_answers_and_stdout_noise_does_not_reach_the_frames() {
    let s = supervisor(HOST);
    assert_eq!(
        s.call(TestJob::Echo(vec![1, 2, 3]), CALL),
        Ok(TestAnswer::Echo(vec![1, 2, 3]))
    );
    assert_eq!(
        s.call(TestJob::PrintThenEcho(vec![4]), CALL),
        Ok(TestAnswer::Echo(vec![4]))
    );
    let status = s.status();
    assert!(status.pid.is_some());
    assert_eq!(status.restarts, 0);
}

#[test]
fn crashes_fail_the_call_in_flight_and_the_next_call_gets_a_new_host() {
    let s = supervisor(HOST);
    for (job, expect) in [
        (TestJob::Segv, "SIGSEGV"),
        (TestJob::Abort, "SIGABRT"),
        (TestJob::Exit(1), "exited with status 1"),
    ] {
        let before = s.ensure_running().unwrap();
        match s.call(job, CALL) {
            Err(HostError::Died { how }) => assert!(how.contains(expect), "{how}"),
            other => panic!("expected the host to die with {expect}: {other:?}"),
        }
        assert_eq!(
            call_after_backoff(&s, TestJob::Echo(vec![9])),
            Ok(TestAnswer::Echo(vec![9]))
        );
        let status = s.status();
        assert_ne!(status.pid, Some(before), "a new host");
        assert!(status.last_failure.is_some_and(|f| f.contains(expect)));
    }
    assert_eq!(s.status().restarts, 3);
}

#[test]
fn a_hang_past_the_deadline_stops_the_host_and_the_next_call_works() {
    let s = supervisor(HOST);
    let pid = s.ensure_running().unwrap();
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    assert_eq!(
        s.call(TestJob::Hang, deadline),
        Err(HostError::TimedOut { after: deadline })
    );
    assert!(started.elapsed() < deadline + Duration::from_secs(2));
    assert_eq!(
        call_after_backoff(&s, TestJob::Echo(vec![1])),
        Ok(TestAnswer::Echo(vec![1]))
    );
    assert_ne!(s.status().pid, Some(pid));
    assert!(s
        .status()
        .last_failure
        .is_some_and(|f| f.contains("no answer")));
}

#[test]
fn a_host_opens_no_network_socket_and_holds_no_descriptor_of_the_agent() {
    let s = supervisor(HOST);
    assert_eq!(
        s.call(TestJob::Tcp, CALL),
        Ok(TestAnswer::Tcp(Err(libc::EACCES)))
    );
    // An open file of the agent's must not reach the host, nor one it holds without
    // close-on-exec (as an inherited descriptor or a library's file would be).
    let marker = tempfile::NamedTempFile::new().unwrap();
    let leaked = tempfile::NamedTempFile::new().unwrap();
    rustix::io::fcntl_setfd(leaked.as_file(), rustix::io::FdFlags::empty()).unwrap();
    assert!(inherited_descriptors().contains(&(leaked.as_file().as_raw_fd().unsigned_abs())));
    s.stop();
    let Ok(TestAnswer::Descriptors(fds)) = call_after_backoff(&s, TestJob::Descriptors) else {
        panic!("no descriptor list");
    };
    for path in [marker.path(), leaked.path()] {
        let path = path.display().to_string();
        assert!(!fds.iter().any(|(_, f)| f == &path), "{path} in {fds:?}");
    }
    // Its standard streams (0 is its socket; 1 and 2 go wherever the agent's stderr goes: a
    // terminal, a pipe, a file), clones of its socket, /proc/self/fd being read: nothing else,
    // not even what this process inherited without close-on-exec (cargo's jobserver pipe).
    let unexpected: Vec<&(u32, String)> = fds
        .iter()
        .filter(|(fd, f)| {
            *fd > 2
                && !(f.starts_with("socket:") || f.starts_with("/proc/") || f.starts_with("/dev/"))
        })
        .collect();
    assert!(unexpected.is_empty(), "{fds:?}");
}

/// This process's descriptors above 2 without close-on-exec.
fn inherited_descriptors() -> Vec<u32> {
    const O_CLOEXEC: u32 = 0o2000000;
    std::fs::read_dir("/proc/self/fdinfo")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
            (fd > 2 && flags & O_CLOEXEC == 0).then_some(fd)
        })
        .collect()
}

#[test]
fn interim_answers_arrive_in_order_and_rearm_the_deadline() {
    let s = supervisor(HOST);
    let mut steps = Vec::new();
    // 12 steps of 100 ms: 1.2 s in all, past the 1 s deadline, but no step is.
    let answer = s.call_with(
        TestJob::Steps {
            count: 12,
            every_ms: 100,
        },
        Duration::from_secs(1),
        None,
        &mut |a| steps.push(a),
    );
    assert_eq!(answer, Ok(TestAnswer::Echo(Vec::new())));
    assert_eq!(steps, (0..12).map(TestAnswer::Step).collect::<Vec<_>>());
    assert_eq!(s.status().restarts, 0);
}

#[test]
fn a_cancel_reaches_the_running_job_as_a_message() {
    let s = supervisor(HOST);
    let cancel = AtomicBool::new(true);
    assert_eq!(
        s.call_with(TestJob::WaitForCancel, CALL, Some(&cancel), &mut |_| {}),
        Ok(TestAnswer::Cancelled)
    );
}

#[test]
fn a_job_queued_behind_a_watched_long_one_is_busy_and_the_host_lives_on() {
    let s = Arc::new(supervisor(HOST));
    let pid = s.ensure_running().unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let long = {
        let (s, cancel) = (Arc::clone(&s), Arc::clone(&cancel));
        std::thread::spawn(move || {
            s.call_with(TestJob::WaitForCancel, CALL, Some(&cancel), &mut |_| {})
        })
    };
    // The long job is watched by its caller, within its deadline: the short one behind it
    // gives up without stopping the host.
    let deadline = Duration::from_millis(300);
    let mut busy = s.call(TestJob::Echo(vec![1]), deadline);
    while busy == Ok(TestAnswer::Echo(vec![1])) {
        // The long job had not reached the host yet: try again.
        busy = s.call(TestJob::Echo(vec![1]), deadline);
    }
    assert_eq!(busy, Err(HostError::Busy { after: deadline }));
    assert_eq!(s.status().pid, Some(pid));
    cancel.store(true, Ordering::SeqCst);
    assert_eq!(long.join().unwrap(), Ok(TestAnswer::Cancelled));
    assert_eq!(
        s.call(TestJob::Echo(vec![2]), CALL),
        Ok(TestAnswer::Echo(vec![2]))
    );
    assert_eq!(s.status().pid, Some(pid));
    assert_eq!(s.status().restarts, 0);
}

#[test]
fn a_side_job_is_answered_while_another_job_runs() {
    let s = Arc::new(supervisor(HOST));
    let cancel = Arc::new(AtomicBool::new(false));
    let running = {
        let (s, cancel) = (Arc::clone(&s), Arc::clone(&cancel));
        std::thread::spawn(move || {
            s.call_with(TestJob::WaitForCancel, CALL, Some(&cancel), &mut |_| {})
        })
    };
    // The host said it started the long job.
    let until = Instant::now() + CALL;
    while !s.is_busy() {
        assert!(Instant::now() < until, "the long job never started");
        std::thread::yield_now();
    }
    // Answered beside it, not after it (it would wait behind it and fail with Busy).
    assert_eq!(
        s.call(TestJob::Side(vec![9]), Duration::from_secs(2)),
        Ok(TestAnswer::Echo(vec![9]))
    );
    assert!(s.is_busy(), "the long job still runs");
    cancel.store(true, Ordering::SeqCst);
    assert_eq!(running.join().unwrap(), Ok(TestAnswer::Cancelled));
    assert_eq!(s.status().restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_call_starts_a_host_gets_interim_answers_and_a_hang_stops_the_host() {
    let s = Arc::new(supervisor(HOST));
    // No host yet: the call starts one (on the blocking pool), then is answered.
    assert_eq!(
        Arc::clone(&s)
            .call_async(TestJob::Echo(vec![7]), CALL, None, |_| {})
            .await,
        Ok(TestAnswer::Echo(vec![7]))
    );
    let pid = s.status().pid;
    assert!(pid.is_some());
    let steps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&steps);
    let job = TestJob::Steps {
        count: 3,
        every_ms: 1,
    };
    assert_eq!(
        Arc::clone(&s)
            .call_async(job, CALL, None, move |a| seen.lock().unwrap().push(a))
            .await,
        Ok(TestAnswer::Echo(vec![]))
    );
    assert_eq!(
        *steps.lock().unwrap(),
        vec![
            TestAnswer::Step(0),
            TestAnswer::Step(1),
            TestAnswer::Step(2)
        ]
    );
    // A cancel set before the call reaches the job as a message.
    let cancel = Arc::new(AtomicBool::new(true));
    assert_eq!(
        Arc::clone(&s)
            .call_async(TestJob::WaitForCancel, CALL, Some(cancel), |_| {})
            .await,
        Ok(TestAnswer::Cancelled)
    );
    assert_eq!(s.status().pid, pid);
    // A hang past the deadline stops the host; a later call gets a new one.
    let deadline = Duration::from_millis(300);
    assert_eq!(
        Arc::clone(&s)
            .call_async(TestJob::Hang, deadline, None, |_| {})
            .await,
        Err(HostError::TimedOut { after: deadline })
    );
    let answer = loop {
        match Arc::clone(&s)
            .call_async(TestJob::Echo(vec![8]), CALL, None, |_| {})
            .await
        {
            Err(HostError::Restarting { retry_in }) => tokio::time::sleep(retry_in).await,
            other => break other,
        }
    };
    assert_eq!(answer, Ok(TestAnswer::Echo(vec![8])));
    assert_ne!(s.status().pid, pid);
    assert_eq!(s.status().restarts, 1);
}
