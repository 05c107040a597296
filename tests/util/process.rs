//! What `/proc` tells of processes: whether one exists, its memory, its
//! zombie children; a pid a task wrote to a file, a stray process killed;
//! how many tasks ran at once by their own log; and the clock as task
//! scripts read it.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use taskrunner::request::RequestId;

use super::{wait_until, TestDb};

/// The daemon's children that are its fencing watchdog.
pub fn watchdogs_of(daemon: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let parent = stat
                .rfind(')')
                .and_then(|close| stat[close + 1..].split_whitespace().nth(1))
                .and_then(|parent| parent.parse::<i32>().ok());
            let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            parent == Some(daemon)
                && command
                    .split(|byte| *byte == 0)
                    .any(|arg| arg == b"--fencing-watchdog")
        })
        .collect()
}

/// Whether process `holder` holds a pidfd of process `pid` (the fencing
/// watchdog pins the daemon's tries so).
pub fn holds_a_pidfd_of(holder: i32, pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|link| link.to_string_lossy() == "anon_inode:[pidfd]")
            && std::fs::read_to_string(format!(
                "/proc/{holder}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .is_ok_and(|info| info.lines().any(|line| line == format!("Pid:\t{pid}")))
    })
}

/// Whether a process exists (for grandchild checks).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
}

/// The pid a task's script writes to `file` (a line ending in a newline),
/// once it is there.
pub fn read_pid_file(file: &Path) -> i32 {
    wait_until(Duration::from_secs(30), "a pid in its file", || {
        std::fs::read_to_string(file).is_ok_and(|text| text.ends_with('\n'))
    });
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Kills `pid` (SIGKILL) if it still exists; whether it did.
pub fn kill_if_alive(pid: i32) -> bool {
    let alive = process_exists(pid);
    if alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    alive
}

/// SIGKILLs a process (a daemonized one, or a child the test gave up
/// waiting for) if it still runs when the guard is dropped: when the test
/// fails before it ends.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_if_alive(self.0);
    }
}

/// The fields of `/proc/PID/stat` after the command name (which ends at
/// the last `)`): 0 is the state (field 3 in proc(5)), 1 the parent's pid,
/// 3 the session, 11 and 12 the user and system CPU ticks, 16 the nice
/// value. `pid` is a number or `self`.
pub fn stat_fields(pid: impl std::fmt::Display) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A free loopback port (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestDb {
    /// `kill -9` of request `id`'s try once it runs; waits until the row
    /// is CRASHED ("killed by signal 9") or already running again, and
    /// returns when the kill was sent.
    pub async fn kill_running_try(&self, id: RequestId) -> Instant {
        let wait = Duration::from_secs(30);
        let row = self.wait_for_pid(id, wait).await;
        let killed_at = Instant::now();
        kill(Pid::from_raw(row.pid.unwrap() as i32), Signal::SIGKILL).unwrap();
        let crashed = self
            .wait_for(id, wait, "CRASHED or rerun", |r| {
                r.result.as_deref() != Some("RUNNING") || r.tries == 2
            })
            .await;
        if crashed.tries == 1 {
            assert_eq!(crashed.result.as_deref(), Some("CRASHED"));
            assert!(crashed
                .result_text
                .unwrap()
                .starts_with("killed by signal 9"));
        }
        killed_at
    }
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Asserts that process `pid`'s peak memory (`VmHWM`) grew by less than
/// `bound_mib` MiB since it read `peak_before` KiB, and returns by how
/// many MiB it grew.
pub fn peak_grew_under(pid: i32, peak_before: u64, bound_mib: u64) -> u64 {
    let (peak_after, _) = memory_kib(pid);
    let grew_mib = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        grew_mib < bound_mib,
        "the peak memory of process {pid} grew by {grew_mib} MiB (bound {bound_mib} MiB)"
    );
    grew_mib
}

/// Zombie children of `pid`.
pub fn zombie_children(pid: i32) -> Vec<i32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z")
            && fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid)
        {
            zombies.push(child);
        }
    }
    zombies
}

/// Nanoseconds since the epoch (to compare with `date +%s%N` in task scripts).
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// From a log to which each task appended `start NANOS` and `end NANOS`
/// (`date +%s%N`): how many lines it holds, and the most tasks that ran at
/// once. An end sorts before a start at the same instant.
pub fn most_at_once(log: &Path) -> (usize, i32) {
    let mut events: Vec<(u128, i32)> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| {
            let (kind, at) = line.split_once(' ').unwrap();
            (at.parse().unwrap(), if kind == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, delta) in &events {
        running += delta;
        most = most.max(running);
    }
    (events.len(), most)
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`), which the
/// threads and processes it then starts inherit, across exec too: each short
/// sleep lasts up to `slack` longer, as on a heavily loaded machine.
/// Async-signal-safe: for a `pre_exec` hook.
pub fn set_timer_slack(slack: std::time::Duration) -> std::io::Result<()> {
    let nanos = slack.as_nanos() as libc::c_ulong;
    // SAFETY: prctl with an integer argument; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanos, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the test runs as root (to run tasks as another user, make
/// cgroups, namespaces or mounts); without, it prints that it is skipped,
/// and `why`.
pub fn runs_as_root(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("skipped: {why}");
    }
    root
}

/// Writes `text` to `path` as an executable file (a script the test runs
/// as a task or a program).
pub fn write_executable(path: &Path, text: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Copies the executable `from` to `to` with `cp`, a process of its own.
/// Copied here, the file's descriptor open for writing would be inherited
/// by any child another test thread forks meanwhile, until that child's
/// `exec`: an `exec` of the copy in that window fails with "Text file
/// busy" (seen with six tests at a time).
pub fn copy_executable(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

/// A user of this machine that /etc/group lists as a member of a group
/// other than its primary one: (name, that group's gid, its primary gid).
/// Debian's `postgres` is in `ssl-cert`.
pub fn user_with_a_supplementary_group() -> Option<(String, u32, u32)> {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let gid: u32 = fields.get(2)?.parse().ok()?;
        let user = fields.get(3)?.split(',').find(|user| !user.is_empty())?;
        let entry = nix::unistd::User::from_name(user).ok()??;
        (entry.gid.as_raw() != gid).then(|| (user.to_string(), gid, entry.gid.as_raw()))
    })
}
