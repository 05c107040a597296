//! What keeps a task away from its daemon when both run as one user: the
//! daemon is not dumpable (so no process of its uid may read
//! `/proc/<daemon>/environ` or `mem`, or ptrace it), tasks inherit only an
//! allowlist of its environment (see [`super::INHERITED_VARIABLES`]), and the
//! OOM killer prefers a task to the daemon. None of this isolates tasks from
//! the daemon's files: that needs `user:` (a uid of their own).

use std::sync::OnceLock;

/// How far below its tasks the daemon sets its `oom_score_adj`.
const OOM_MARGIN: i32 = 500;

/// The `oom_score_adj` tasks get, when it differs from the daemon's.
static TASK_OOM_SCORE_ADJ: OnceLock<i32> = OnceLock::new();

/// What [`protect_daemon`] did, for the start-up log line.
static PROTECTION: OnceLock<String> = OnceLock::new();

/// Makes the daemon non-dumpable and the OOM killer's last choice among it
/// and its tasks. Call early in `main`.
pub fn protect_daemon() {
    let _ = PROTECTION.set(protect());
}

/// What [`protect_daemon`] did.
pub(crate) fn describe() -> &'static str {
    PROTECTION.get().map_or("dumpable", |text| text.as_str())
}

fn protect() -> String {
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory effects.
    let dumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    let oom = match read_oom_score_adj() {
        Some(started) => {
            let lowered = (started - OOM_MARGIN).max(-1000);
            if lowered < started
                && std::fs::write("/proc/self/oom_score_adj", lowered.to_string()).is_ok()
            {
                // Tasks go back to where the daemon started.
                let _ = TASK_OOM_SCORE_ADJ.set(started);
                format!("oom_score_adj {lowered}, tasks {started}")
            } else {
                // Lowering needs CAP_SYS_RESOURCE; raising the tasks' does not.
                let raised = (started + OOM_MARGIN).min(1000);
                let _ = TASK_OOM_SCORE_ADJ.set(raised);
                if nix::unistd::geteuid().is_root() {
                    format!("oom_score_adj {started}, tasks {raised}")
                } else {
                    // The child of a daemon that is not dumpable has root's
                    // `/proc` files until its exec: its write is refused (a
                    // preloaded program's child, of a dumpable parent, makes
                    // it). Said so rather than claimed.
                    format!(
                        "oom_score_adj {started}, preloaded tasks {raised}, exec'd tasks {started}"
                    )
                }
            }
        }
        None => "oom_score_adj unknown".to_string(),
    };
    format!(
        "{}, {oom}",
        if dumpable {
            "not dumpable"
        } else {
            "dumpable (prctl failed)"
        }
    )
}

fn read_oom_score_adj() -> Option<i32> {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The `oom_score_adj` a task process sets for itself before exec.
pub(crate) fn task_oom_score_adj() -> Option<i32> {
    TASK_OOM_SCORE_ADJ.get().copied()
}

/// A warning when a daemon running as root would run task types as root:
/// nothing then separates a task from the daemon (its config, its database,
/// its process).
pub(crate) fn root_warning(config: &crate::config::Config, names: &[String]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let as_root: Vec<&str> = names
        .iter()
        .filter(|name| config.settings_for(name).user.is_none())
        .map(|name| name.as_str())
        .collect();
    (!as_root.is_empty()).then(|| {
        format!(
            "the daemon runs as root and these task types run as root too (no user:): {}; \
             set user: (at the top level for all) so that tasks cannot reach the daemon",
            as_root.join(", ")
        )
    })
}
