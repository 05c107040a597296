//! Limits of a task process (set in the child by spawner.rs) and how a
//! broken one is recognised.
//!
//! Where the try has a cgroup (cgroup.rs), `memory_limit`, `max_processes`
//! and `cpu_quota` are its cgroup's and hold for everything the try starts.
//! The rest are rlimits, named for what they limit: `cpu_limit` is
//! RLIMIT_CPU (SIGXCPU at the limit, SIGKILL one second later); without a
//! memory or pids cgroup `memory_limit` is RLIMIT_AS (address space, not
//! resident memory) and `max_processes` RLIMIT_NPROC (counted per user, and
//! not enforced for root).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use crate::config::TaskSettings;
use crate::units::{format_duration, format_size};

/// The limits of the try's cgroup, from the task's settings.
pub(crate) fn cgroup_limits(settings: &TaskSettings) -> super::cgroup::Limits {
    super::cgroup::Limits {
        memory: settings.memory_limit,
        processes: settings.max_processes,
        cpu: settings.cpu_quota,
    }
}

/// The rlimits and such to set in the child, from the task's settings.
pub(crate) fn child_limits(settings: &TaskSettings) -> super::spawner::ChildLimits {
    use super::cgroup::{in_force, Controller};
    let by_cgroup = |controller| in_force().is_some_and(|cgroups| cgroups.controls(controller));
    super::spawner::ChildLimits {
        address_space: settings
            .memory_limit
            .filter(|_| !by_cgroup(Controller::Memory)),
        cpu_seconds: settings
            .cpu_limit
            .map(|limit| limit.as_secs_f64().ceil().max(1.0) as u64),
        processes: settings
            .max_processes
            .filter(|_| !by_cgroup(Controller::Pids)),
        nice: settings.nice.or_else(super::priority::task_nice),
        open_files: super::resources::task_open_files(),
        oom_score_adj: super::isolation::task_oom_score_adj(),
    }
}

/// Names the limit a process broke, judging by how it ended and what it said.
/// An address-space limit shows as a failed allocation: an abort, a
/// segfault, or an error message, depending on the program.
///
/// `cpu_time` is what the process used: a task that ignores `SIGXCPU` (Go
/// programs do) is killed by the kernel one second past the limit, with
/// `SIGKILL`, which alone says nothing (before, such a try was `CRASHED`).
pub(crate) fn broken_limit(
    status: &ExitStatus,
    cpu_time: Option<std::time::Duration>,
    stderr: &str,
    settings: &TaskSettings,
) -> Option<String> {
    if let Some(cpu) = settings.cpu_limit {
        let soft = child_limits(settings).cpu_seconds.unwrap_or_default();
        let past_the_hard_limit = status.signal() == Some(libc::SIGKILL)
            && cpu_time.is_some_and(|used| used.as_secs() >= soft);
        if status.signal() == Some(libc::SIGXCPU) || past_the_hard_limit {
            return Some(format!(
                "cpu_limit {} exceeded (RLIMIT_CPU)",
                format_duration(cpu)
            ));
        }
    }
    let limits = child_limits(settings);
    if let Some(memory) = limits.address_space {
        let killed = matches!(
            status.signal(),
            Some(libc::SIGABRT | libc::SIGSEGV | libc::SIGBUS)
        );
        let said_so = [
            "memory allocation",
            "MemoryError",
            "Cannot allocate memory",
            "out of memory",
            "Out of memory",
            "std::bad_alloc",
        ]
        .iter()
        .any(|needle| stderr.contains(needle));
        if (killed || !status.success()) && said_so || killed && stderr.is_empty() {
            return Some(format!(
                "memory_limit {} exceeded (RLIMIT_AS, address space)",
                format_size(memory)
            ));
        }
    }
    if let Some(count) = limits.processes {
        if !status.success() && stderr.contains("Resource temporarily unavailable") {
            return Some(format!("max_processes {count} reached (RLIMIT_NPROC)"));
        }
    }
    None
}
