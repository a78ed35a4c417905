//! Resident memory of the agent and of its module hosts (its child processes, with
//! `module_isolation`: each holds one PKCS#11 module or SKF library).
//!
//! Each RSS row gives the agent's VmRSS, the hosts' VmRSS, their sum, and the sum of their
//! PSS (`/proc/PID/smaps_rollup`): the agent and its hosts run the same `keyport` program and
//! share libc and its other libraries, so the plain sum counts those pages twice; PSS counts a
//! page shared by two processes half in each.
//!
//! With `KEYPORT_BENCH_SMAPS_DIR` set, each row also copies `/proc/PID/smaps` of every process
//! it counts into that directory (`NN-agent-PID.smaps`, `NN-host-PID.smaps`), for reading by
//! mapping afterwards.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, Result};

/// One process's resident memory, KiB.
#[derive(Debug, Clone, Copy)]
pub struct Resident {
    pub pid: u32,
    pub rss: u64,
    pub pss: u64,
    /// Of `rss`, the anonymous pages (heap, malloc arenas, thread stacks, written data): what
    /// the process allocated. The rest is file pages (its program and libraries), shared
    /// with every process that maps the same files; how much of them is mapped varies with
    /// what the page cache holds (the kernel maps the cached neighbours of a page it faults in).
    pub anon: u64,
}

/// The agent's and its hosts' resident memory at one moment.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub agent: Resident,
    pub hosts: Vec<Resident>,
}

impl Footprint {
    /// Reads it now; with `KEYPORT_BENCH_SMAPS_DIR` set, also keeps a copy of each process's
    /// smaps, named after `label`.
    pub fn of(agent_pid: u32, label: &str) -> Result<Footprint> {
        let agent = resident(agent_pid)?;
        // A host that ends between the listing and the read is not counted.
        let hosts = children(agent_pid)
            .into_iter()
            .filter_map(|pid| resident(pid).ok())
            .collect();
        let footprint = Footprint { agent, hosts };
        footprint.keep_smaps(label);
        Ok(footprint)
    }

    pub fn hosts_rss(&self) -> u64 {
        self.hosts.iter().map(|h| h.rss).sum()
    }

    pub fn total_rss(&self) -> u64 {
        self.agent.rss + self.hosts_rss()
    }

    pub fn total_pss(&self) -> u64 {
        self.agent.pss + self.hosts.iter().map(|h| h.pss).sum::<u64>()
    }

    fn keep_smaps(&self, label: &str) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let Some(dir) = std::env::var_os("KEYPORT_BENCH_SMAPS_DIR") else {
            return;
        };
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::path::PathBuf::from(dir);
        let slug: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let procs = std::iter::once(("agent", self.agent.pid))
            .chain(self.hosts.iter().map(|h| ("host", h.pid)));
        for (what, pid) in procs {
            let to = dir.join(format!("{n:02}-{slug}-{what}-{pid}.smaps"));
            if let Err(e) = std::fs::copy(format!("/proc/{pid}/smaps"), &to) {
                eprintln!("could not keep /proc/{pid}/smaps: {e}");
            }
        }
    }
}

impl fmt::Display for Footprint {
    /// "agent 9092 (anon 700) + 1 host 15132 (anon 1700) = 24224 KiB; PSS 10520 KiB"
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.hosts.len();
        write!(
            f,
            "agent {} (anon {}) + {n} host{} {} (anon {}) = {} KiB; PSS {} KiB",
            self.agent.rss,
            self.agent.anon,
            if n == 1 { "" } else { "s" },
            self.hosts_rss(),
            self.hosts.iter().map(|h| h.anon).sum::<u64>(),
            self.total_rss(),
            self.total_pss()
        )
    }
}

/// VmRSS and PSS of one process, KiB.
pub fn resident(pid: u32) -> Result<Resident> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<u64> {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/smaps_rollup"))
    };
    Ok(Resident {
        pid,
        rss: field("Rss:")?,
        pss: field("Pss:")?,
        anon: field("Anonymous:")?,
    })
}

/// The live child processes of `pid` (from `/proc/PID/task/*/children`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
