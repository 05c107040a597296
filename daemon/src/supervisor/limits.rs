//! Set-up that runs in the forked child before exec, and limits.
//!
//! Only async-signal-safe calls happen in the child (prctl, getppid,
//! close_range, setrlimit, setpriority): the daemon is multi-threaded, and
//! anything that may take a lock (allocation, name lookups) could deadlock.
//!
//! Limits are rlimits, named for what they limit: `memory_limit` is
//! RLIMIT_AS (address space, not resident memory), `cpu_limit` is RLIMIT_CPU
//! (SIGXCPU at the limit, SIGKILL one second later), `max_processes` is
//! RLIMIT_NPROC (counted per user, and not enforced for root).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use crate::config::TaskSettings;
use crate::units::{format_duration, format_size};

/// Installs the child-side set-up on `command`.
pub fn apply_in_child(command: &mut tokio::process::Command, settings: &TaskSettings) {
    let daemon_pid = std::process::id() as libc::pid_t;
    let memory = settings.memory_limit;
    let cpu_seconds = settings
        .cpu_limit
        .map(|limit| limit.as_secs_f64().ceil().max(1.0) as u64);
    let processes = settings.max_processes;
    let nice = settings.nice;
    // SAFETY: the closure only makes async-signal-safe system calls and
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // Die with the daemon (with the spawning thread, precisely; see
            // spawner.rs), so that no task runs unsupervised.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon may have died between fork and prctl.
            if libc::getppid() != daemon_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // File descriptors 0-2 only: mark every other one close-on-exec
            // (not closed here: std's own exec-error pipe must survive).
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
            if let Some(bytes) = memory {
                set_limit(libc::RLIMIT_AS, bytes, bytes)?;
            }
            if let Some(seconds) = cpu_seconds {
                set_limit(libc::RLIMIT_CPU, seconds, seconds + 1)?;
            }
            if let Some(count) = processes {
                set_limit(libc::RLIMIT_NPROC, count, count)?;
            }
            if let Some(nice) = nice {
                if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Names the limit a process broke, judging by how it ended and what it said.
/// An address-space limit shows as a failed allocation: an abort, a
/// segfault, or an error message, depending on the program.
pub fn broken_limit(status: &ExitStatus, stderr: &str, settings: &TaskSettings) -> Option<String> {
    if let Some(cpu) = settings.cpu_limit {
        if status.signal() == Some(libc::SIGXCPU) {
            return Some(format!(
                "cpu_limit {} exceeded (RLIMIT_CPU)",
                format_duration(cpu)
            ));
        }
    }
    if let Some(memory) = settings.memory_limit {
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
    if let Some(count) = settings.max_processes {
        if !status.success() && stderr.contains("Resource temporarily unavailable") {
            return Some(format!("max_processes {count} reached (RLIMIT_NPROC)"));
        }
    }
    None
}
