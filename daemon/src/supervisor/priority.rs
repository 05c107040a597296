//! The daemon's priority over its tasks. With more runnable tasks than CPUs,
//! a daemon at its tasks' priority gets only its fair share of a CPU: tasks
//! that have exited wait to be reaped, and their slots to be refilled, while
//! the CPUs run what is left (measured at `max_concurrent` 8 on 2 CPUs: up
//! to seven exited tasks at once waiting for the daemon, 15% of the CPU
//! idle). So `taskrunnerd` raises its own priority by [`RAISE`] nice levels
//! at start, when it may (root, CAP_SYS_NICE, or an RLIMIT_NICE that allows
//! it), and starts its tasks at the nice value it was itself started with,
//! or at the type's `nice:`. Without the permission nothing changes: daemon
//! and tasks share the priority the daemon was started with.

use std::sync::OnceLock;

/// How many nice levels the daemon raises itself above its tasks.
pub(crate) const RAISE: i32 = 5;

/// What [`raise_daemon`] did: the nice value the daemon was started with if
/// it raised itself, and a description for the log.
static RAISED: OnceLock<(Option<i32>, String)> = OnceLock::new();

/// Raises the priority of the calling thread, and so of every thread it
/// starts later: call it in the daemon's main thread before any other
/// thread exists.
pub fn raise_daemon() {
    let _ = RAISED.set(raise());
}

fn raise() -> (Option<i32>, String) {
    // SAFETY: errno is this thread's; getpriority can return -1 as a value,
    // so an error shows only in errno.
    let started = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if started == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
        return (
            None,
            format!("nice unknown: {}", std::io::Error::last_os_error()),
        );
    }
    let raised = (started - RAISE).max(-20);
    if raised == started {
        return (
            None,
            format!("nice {started}, as its tasks (already the highest)"),
        );
    }
    // SAFETY: setpriority on the calling thread (who = 0) has no other effect.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, raised) } != 0 {
        let why = std::io::Error::last_os_error();
        return (
            None,
            format!("nice {started}, as its tasks (raising it needs CAP_SYS_NICE: {why})"),
        );
    }
    (Some(started), format!("nice {raised}, tasks at {started}"))
}

/// The daemon's priority, for its start-up log line.
pub(crate) fn describe() -> &'static str {
    RAISED
        .get()
        .map_or("as its tasks", |(_, text)| text.as_str())
}

/// The nice value for a task whose type sets none: the daemon's starting
/// one, if it has raised itself since (else a task inherits the daemon's).
pub(crate) fn task_nice() -> Option<i32> {
    RAISED.get().and_then(|(nice, _)| *nice)
}
