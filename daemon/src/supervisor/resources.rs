//! The daemon's own file descriptors. Each running try holds three or four
//! of them (its stdout and stderr pipes, a pidfd, sometimes a stdin pipe),
//! and a start briefly needs six more. systemd's default soft limit (1,024)
//! is far below what the kernel allows, so the daemon raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start, warns when `max_concurrent`
//! cannot fit even then, and gives its tasks the soft limit it was started
//! with (programs that use `select()` expect at most 1,024). A start that
//! fails all the same is given back, not counted (see `spawner::DaemonShort`).

use std::sync::OnceLock;

/// Descriptors a running try holds in the daemon (at most).
pub(crate) const PER_TRY: u64 = 4;

/// The `RLIMIT_NOFILE` the daemon was started with (soft, hard).
static STARTED_WITH: OnceLock<(u64, u64)> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard)
/// as they are now. Call once, early in `main`.
pub fn raise_open_files() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    let _ = STARTED_WITH.set((limit.rlim_cur, limit.rlim_max));
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads a local; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return (raised.rlim_cur, raised.rlim_max);
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// The `RLIMIT_NOFILE` a task gets: the one the daemon was started with,
/// if the daemon raised its own since, under the daemon's hard limit now.
///
/// A hard limit lowered while the daemon runs (`prlimit --nofile=4096`)
/// cannot be raised again by a process without privilege: each child of a
/// daemon not run as root failed its `setrlimit` with EPERM, and every try
/// was FAILED, counted ("setting resource limits: Operation not
/// permitted"), and so were preloaded parents' starts.
pub(crate) fn task_open_files() -> Option<(u64, u64)> {
    let (soft, hard) = *STARTED_WITH.get()?;
    if soft >= hard {
        return None;
    }
    let (_, hard_now) = open_files_limits()?;
    let hard = hard.min(hard_now);
    let soft = soft.min(hard);
    (soft < hard).then_some((soft, hard))
}

/// The daemon's `RLIMIT_NOFILE` now: (soft, hard).
fn open_files_limits() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some((limit.rlim_cur, limit.rlim_max))
}

/// A warning when `max_concurrent` tries cannot all hold their descriptors
/// under the daemon's limit, counting what it has open now.
pub(crate) fn open_files_warning(max_concurrent: usize) -> Option<String> {
    let (limit, _) = open_files_limits()?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    // Room for a start's pipes and the database connections that come and go.
    let needed = open + PER_TRY * max_concurrent as u64 + 16;
    (needed > limit).then(|| {
        format!(
            "max_concurrent {max_concurrent} may not fit in this daemon's file descriptor limit \
             ({open} open, {limit} allowed, about {needed} needed): tasks will wait for descriptors; \
             raise LimitNOFILE (ulimit -n) or lower max_concurrent"
        )
    })
}

/// How many descriptors the connections of the control socket, and apart
/// those of the web page, may hold at once: `most`, or an eighth of the
/// daemon's limit if that is fewer (at least one), so that idle connections
/// never take the descriptors that task starts need. (At 64, 32 idle
/// connections and the daemon's own 27 left too few for a start: each was
/// given back while they lasted.)
pub(crate) fn connection_limit(most: usize) -> usize {
    open_files_limits().map_or(most, |(limit, _)| {
        usize::try_from(limit / 8)
            .unwrap_or(usize::MAX)
            .clamp(1, most)
    })
}
