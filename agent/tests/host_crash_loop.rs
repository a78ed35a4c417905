//! 100 host crashes in a row leave no zombie process and no leaked descriptor in the agent.
//! Alone in its file, so no other test's hosts are counted.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // tests panic on purpose

mod support;

use agent::host::HostError;
use support::test_host::{call_after_backoff, supervisor, TestAnswer, TestJob, CALL};

const HOST: &str = "host_child";

#[test]
#[ignore = "runs only as a host started by the test below"]
fn host_child() {
    support::test_host::run_host_if_asked();
}

#[test]
fn a_hundred_crashes_leave_no_zombie_and_no_descriptor_behind() {
    let s = supervisor(HOST);
    assert_eq!(
        s.call(TestJob::Echo(vec![]), CALL),
        Ok(TestAnswer::Echo(vec![]))
    );
    let fds_before = count_fds();
    for i in 0..100 {
        let job = if i % 2 == 0 {
            TestJob::Exit(3)
        } else {
            TestJob::Abort
        };
        assert!(matches!(
            call_after_backoff(&s, job),
            Err(HostError::Died { .. })
        ));
    }
    assert_eq!(
        call_after_backoff(&s, TestJob::Echo(vec![])),
        Ok(TestAnswer::Echo(vec![]))
    );
    assert_eq!(zombie_children(), Vec::<u32>::new());
    // One live host again: its socket and reader thread, as before the crashes.
    assert_eq!(count_fds(), fds_before);
    assert_eq!(s.status().restarts, 100);
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Children of this process in state Z.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let mut f = rest.split_whitespace();
                let state = f.next();
                let ppid = f.next();
                state == Some("Z") && ppid == Some(me.as_str())
            })
        })
        .collect()
}
