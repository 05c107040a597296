//! The reaper: finds RUNNING rows whose process is gone and marks them
//! CRASHED, so that they run again at once (the task did nothing wrong; its
//! daemon died). One pass; the daemon runs it at start and every
//! `reap_interval` (`daemon/reaper.rs`), and `taskrunner-cli reap` once.
//!
//! A try whose daemon is gone before any task process was recorded for it
//! is given back, not counted (see [`unrecorded`]).
//!
//! Three probes: rows of this host are checked against the process identity
//! recorded at spawn (`procinfo::probe`; a reused pid is never taken for the
//! task, and nothing is ever signalled), and a row whose process is gone is
//! left to the daemon holding it while that daemon lives (it reaped the
//! process itself, and its outcome is on its way); rows of this host without
//! a pid against the identity of the daemon holding them (in `claimed_by`);
//! rows of any host whose heartbeat is older than `lease_timeout` (or than
//! the lease their holder wrote into its daemon's row, when that is longer)
//! have lost their lease, except on SQLite while their daemon lives.

use std::time::Duration;

use anyhow::Result;

use crate::procinfo::{self, Identity, Probe};
use crate::request::RequestId;
use crate::store::{Backend, Store, NOT_COUNTED};

/// A row the reaper marked (or, in a dry run, would mark), and why.
#[derive(Debug, Clone)]
pub(crate) struct Reaped {
    pub(crate) id: RequestId,
    pub(crate) reason: String,
}

/// Reaps once. `own_instance` names the calling daemon, whose rows it
/// supervises itself and the reaper leaves alone ("" from the CLI).
/// `clock`: the daemon's watch on the database's clock, by which leases are
/// not judged while that clock has just jumped ahead (see [`ClockWatch`]);
/// `None` (the CLI's one pass): always judged.
pub(crate) async fn reap(
    store: &Store,
    host: &str,
    own_instance: &str,
    lease_timeout: Duration,
    dry_run: bool,
    clock: Option<&mut ClockWatch>,
) -> Result<Vec<Reaped>> {
    let mut reaped = Vec::new();
    // A process of this host that still runs keeps its row even with a stale
    // heartbeat (its daemon may only have lost the database for a while),
    // and so does a dead try's leftover this reaper may not kill.
    let mut alive_here = Vec::new();
    for row in store
        .answered(store.running_on_host(host, own_instance))
        .await?
    {
        let identity = Identity {
            pid: row.pid,
            boot_id: row.boot_id.clone(),
            start_ticks: row.start_ticks,
            started_at: row.started_at,
        };
        let why = match procinfo::probe(&identity) {
            Probe::Dead(why) => why,
            Probe::Alive => {
                alive_here.push(row.id);
                continue;
            }
            // Another machine's (or boot's) row, or a process we cannot
            // see: only its lease can tell.
            Probe::Foreign | Probe::Unseen => continue,
        };
        // The process has ended, but the daemon holding the row lives: it
        // has reaped its child and writes the try's outcome (which may wait
        // for a lock or a slow database). Marking the row CRASHED now would
        // run a finished try again. Should that daemon hang, its lease lapses
        // (on PostgreSQL and MariaDB; on SQLite it keeps the row until it is
        // stopped, see the lapsed-lease pass below).
        if holder_lives(&row.claimed_by) {
            continue;
        }
        {
            let mut reason = format!("crashed: {why} (found by the reaper on {host})");
            if !dry_run {
                let killed = match kill_remnants(&identity).await {
                    Ok(killed) => killed,
                    Err(left) => {
                        // Rerun now, and the next try runs beside it; nor
                        // may the lapsed-lease pass below take the row.
                        alive_here.push(row.id);
                        tracing::warn!(
                            "request {} is left running: its try's process is gone, but this reaper could not kill process {} that it left in its process group ({}); a reaper that may (the daemon's, or one run as the tasks' user or root) will",
                            row.id,
                            left.pid,
                            left.error
                        );
                        continue;
                    }
                };
                if killed > 0 {
                    reason.push_str(&format!(
                        "; killed {killed} process(es) its try left in its process group"
                    ));
                }
                let killed = kill_cgroup_leftovers(row.claim_token.as_deref(), row.id).await;
                if killed > 0 {
                    reason.push_str(&format!(
                        "; killed {killed} process(es) its try left in its cgroup"
                    ));
                }
            }
            if dry_run
                || mark(
                    store,
                    row.id,
                    row.claim_token.as_ref(),
                    &reason,
                    false,
                    None,
                )
                .await?
            {
                reaped.push(Reaped { id: row.id, reason });
            }
        }
    }
    // Rows whose task never started (claimed ahead, or ended before its pid
    // was written): their daemon's own process identity tells.
    for row in store
        .answered(store.unstarted_on_host(host, own_instance))
        .await?
    {
        let Some(holder) = crate::instance::InstanceId::holder_identity(&row.claimed_by) else {
            continue;
        };
        let Probe::Dead(why) = procinfo::probe(&holder) else {
            continue;
        };
        let why = why.replace("process", "daemon process");
        if !dry_run {
            // Its cgroup may have been made (and its process started) just
            // before its daemon died.
            kill_cgroup_leftovers(row.claim_token.as_deref(), row.id).await;
        }
        let (reason, give_back) = unrecorded(
            &format!("its daemon is gone ({why})"),
            row.given_back_before,
            host,
        );
        if dry_run
            || mark(
                store,
                row.id,
                row.claim_token.as_ref(),
                &reason,
                give_back,
                None,
            )
            .await?
        {
            reaped.push(Reaped { id: row.id, reason });
        }
    }
    let lapsed = store
        .answered(store.lapsed_leases(lease_timeout, own_instance))
        .await?;
    // The database's clock read once the leases are judged by it: a jump
    // since the last pass's reading, during the query too, made living
    // daemons' leases look lapsed.
    if let Some(clock) = clock {
        if !clock.leases_judged(store.database_now().await.ok(), lease_timeout) {
            return Ok(reaped);
        }
    }
    for row in lapsed {
        if alive_here.contains(&row.id) || reaped.iter().any(|r: &Reaped| r.id == row.id) {
            continue;
        }
        // On SQLite every daemon of the file runs on this host and none
        // fences itself (it supervises through a lock and records later):
        // a row whose daemon lives is that daemon's, whatever its
        // heartbeat says. Taking it ran a finished try again, or started a
        // claimed one beside its holder's start.
        if store.backend() == Backend::Sqlite && holder_lives(&row.claimed_by) {
            continue;
        }
        let lapsed = format!(
            "lease expired, no heartbeat from host {} since {} (lease_timeout {})",
            if row.host.is_empty() { "?" } else { &row.host },
            row.heartbeat_at.as_deref().unwrap_or("its claim"),
            crate::units::format_duration(row.lease)
        );
        let (reason, give_back) = if row.pid_recorded {
            (format!("crashed: {lapsed}"), false)
        } else {
            unrecorded(&lapsed, row.given_back_before, host)
        };
        let marked = dry_run
            || mark(
                store,
                row.id,
                row.claim_token.as_ref(),
                &reason,
                give_back,
                Some(row.lease),
            )
            .await?;
        if marked {
            reaped.push(Reaped { id: row.id, reason });
        }
    }
    Ok(reaped)
}

/// The database's clock, watched against the reaper's own monotonic one
/// from pass to pass. Leases are judged by the database's clock (every
/// daemon agrees on it): when it jumps forward (a failover to a server
/// whose clock is ahead, a step of its NTP), every lease looks lapsed at
/// once, those of living daemons too, and a pass marked all their running
/// rows crashed, to run again beside the tries their holders still ran.
/// After such a jump leases are not judged for a lease's time by the
/// reaper's clock, by which every living holder has renewed its own by the
/// new clock. (`taskrunner-cli reap`, one pass, has nothing to compare.)
#[derive(Debug, Default)]
pub(crate) struct ClockWatch {
    /// The database's clock (seconds since the epoch) at the last pass,
    /// and the reaper's then.
    last: Option<(f64, std::time::Instant)>,
    /// Leases are not judged before this.
    hold_until: Option<std::time::Instant>,
}

/// A forward jump of the database's clock past this, beyond the time the
/// reaper's own clock measured (and a hundredth of that time, for the
/// clocks' drift between passes far apart), holds the judging of leases.
const CLOCK_JUMP: Duration = Duration::from_secs(1);

impl ClockWatch {
    /// Whether leases may be judged now, the database's clock reading
    /// `database_now` (`None`: unread, and so unchecked).
    pub(crate) fn leases_judged(&mut self, database_now: Option<f64>, lease: Duration) -> bool {
        let now = std::time::Instant::now();
        if let Some(database_now) = database_now {
            if let Some((then_database, then)) = self.last {
                let elapsed = now.saturating_duration_since(then).as_secs_f64();
                let ahead = (database_now - then_database) - elapsed;
                if ahead > CLOCK_JUMP.as_secs_f64() + elapsed / 100.0 {
                    tracing::warn!(
                        "the database's clock jumped {ahead:.1}s ahead of this daemon's: no row is reaped for a lapsed lease for the next {} (its holder may live, and renew by the new clock)",
                        crate::units::format_duration(lease)
                    );
                    self.hold_until = Some(now + lease);
                }
            }
            self.last = Some((database_now, now));
        }
        match self.hold_until {
            Some(until) if now < until => false,
            Some(_) => {
                self.hold_until = None;
                true
            }
            None => true,
        }
    }
}

/// Marks row `id` crashed (see [`Store::mark_crashed`]; a row taken for
/// its `lapsed` lease only if it has still lapsed): whether it was.
/// A row that an application's transaction holds, or whose batch or flow
/// row it holds, is left for a later pass, and the pass goes on with the others. Before, the
/// pass waited for that lock, up to the call's bound, and then ended: no
/// crashed row after it ran again until the application committed.
async fn mark(
    store: &Store,
    id: RequestId,
    claim_token: Option<&crate::instance::ClaimToken>,
    reason: &str,
    give_back: bool,
    lapsed: Option<Duration>,
) -> Result<bool> {
    match store
        .answered(store.mark_crashed(id, claim_token, reason, give_back, lapsed))
        .await?
    {
        Ok(marked) => Ok(marked),
        Err(locked) => {
            tracing::info!(request = %id, "not reaped in this pass: {locked}; a later pass takes it");
            Ok(false)
        }
    }
}

/// How a row is reaped whose daemon is gone (`what`: how it is known) and
/// for whose try no task process was recorded: its result text, and whether
/// its try is given back.
///
/// Such a try is the daemon's failure, not the request's: mostly a row
/// claimed ahead that waited for a slot, or a try that ended within the
/// 10 ms before its pid is written and whose outcome died with its daemon.
/// Counting it let a row that never ran end exhausted after a few daemon
/// deaths (a reaped row runs again at once, at the head of the line, and is
/// claimed ahead again). It is given back, unless the try before it was
/// given back so too: a task that kills its own daemon (say a cgroup's OOM
/// kill taking the whole service down) within its first milliseconds still
/// reaches its try limit, at every second such try.
fn unrecorded(what: &str, given_back_before: bool, host: &str) -> (String, bool) {
    if given_back_before {
        (
            format!(
                "crashed: {what} and no task process was recorded, for the second try in a row: \
                 this one counts (found by the reaper on {host})"
            ),
            false,
        )
    } else {
        (
            format!(
                "{NOT_COUNTED}{what} and no task process was recorded (found by the reaper on {host})"
            ),
            true,
        )
    }
}

/// Whether the daemon instance named in `claimed_by` is a live process of
/// this host and boot (false when the name carries no identity).
fn holder_lives(claimed_by: &str) -> bool {
    crate::instance::InstanceId::holder_identity(claimed_by)
        .is_some_and(|holder| matches!(procinfo::probe(&holder), Probe::Alive | Probe::Unseen))
}

/// Kills what is left in the cgroup of row `id`'s try under `claim_token` and
/// removes it: where cgroups are in force, everything a dead try started,
/// `setsid` escapes included. The cgroup is found under the calling
/// daemon's own cgroup, so a daemon restarted in its predecessor's place
/// (the same systemd unit, the same shell) finds it; `taskrunner-cli reap`
/// makes no cgroups and kills only process groups.
async fn kill_cgroup_leftovers(claim_token: Option<&str>, id: RequestId) -> usize {
    use crate::supervisor::cgroup;
    match (cgroup::in_force(), claim_token) {
        (Some(cgroups), Some(token)) => cgroups.kill_leftovers(&cgroup::try_key(token, id.0)).await,
        _ => 0,
    }
}

/// A process of a dead try that the reaper could not kill.
#[derive(Debug)]
struct Left {
    pid: i64,
    error: std::io::Error,
}

/// Kills what a dead try left in its process group (a grandchild survives
/// the parent-death signal that killed the task with its daemon), so that
/// its next try never runs beside it: the members of the group named by
/// the task's pid that started at or after the task did, on this boot, and
/// only while no process has that pid any more (a pid is not reused while
/// it names a group). Waits up to 2 s for them to be gone; returns how
/// many were killed, or the first it may not kill (`EPERM`: a reaper run
/// as another user than the tasks'). A grandchild that left the group
/// (`setsid`) escapes.
async fn kill_remnants(identity: &Identity) -> Result<usize, Left> {
    let (Some(boot), Some(started)) = (&identity.boot_id, identity.start_ticks) else {
        return Ok(0);
    };
    // A pid an application wrote (0, 1, negative) names no task's group:
    // 0 is the kernel threads' group, whose members it walked and killed.
    if identity.pid <= 1 || *boot != procinfo::boot_id() || !procinfo::is_gone(identity.pid) {
        return Ok(0);
    }
    let mut killed = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let members = procinfo::group_members_since(identity.pid, started);
        if members.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
        for pid in members {
            // SAFETY: kill has no memory effects.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.insert(pid);
                continue;
            }
            let error = std::io::Error::last_os_error();
            // ESRCH: it ended meanwhile.
            if error.raw_os_error() != Some(libc::ESRCH) {
                return Err(Left { pid, error });
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(killed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row an application wrote with pid 0 (or 1, or below) and this
    /// boot's id: no process group of a task's. Group 0 is the kernel
    /// threads': the reaper walked `/proc` for two seconds and "killed"
    /// them (as root; otherwise it left the row running for ever).
    #[tokio::test]
    async fn a_pid_no_task_can_have_leaves_nothing_to_kill() {
        for pid in [-5, 0, 1] {
            let identity = Identity {
                pid,
                boot_id: Some(procinfo::boot_id()),
                start_ticks: Some(0),
                started_at: None,
            };
            assert!(matches!(kill_remnants(&identity).await, Ok(0)), "pid {pid}");
        }
    }
}
