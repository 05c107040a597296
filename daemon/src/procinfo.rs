//! What the kernel says about a process: its start time in clock ticks and the
//! boot id, which together with the pid identify one process across pid reuse
//! and reboots. The reaper trusts a stored pid only when all three match.

use std::path::Path;

/// Where this process's pids mean something: this boot's id
/// (`/proc/sys/kernel/random/boot_id`), and, in any PID namespace but the
/// first (a container), `+ns` and that namespace's inode after it. Empty if
/// unreadable. Read once: it cannot change while we run.
///
/// A pid names a process only within its PID namespace. Containers share
/// the kernel's boot id, and with the host's network (Docker's
/// `--network host`, Kubernetes' `hostNetwork`) its host name too: without
/// the namespace, a daemon took another container's tries for its own
/// host's, found their pids gone or naming other processes, and killed and
/// ran them again while they ran.
pub fn boot_id() -> String {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|id| id.trim().to_string())
                .unwrap_or_default();
            match pid_namespace() {
                Some(namespace) if !boot.is_empty() && namespace != INITIAL_PID_NAMESPACE => {
                    format!("{boot}+ns{namespace}")
                }
                _ => boot,
            }
        })
        .clone()
}

/// The inode of the first PID namespace, the same on every Linux since
/// 3.8 (`PROC_PID_INIT_INO`).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// The inode of this process's PID namespace.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
pub fn start_ticks(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<i64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // after_name starts with field 3 (state); starttime is field 22.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The CPU time (user and system, all its threads) the process itself
/// used: fields 14 and 15 of `/proc/PID/stat`, without its children's
/// (`wait4`'s usage counts the children it waited for too). Readable until
/// the process is reaped.
pub(crate) fn own_cpu_time(pid: i64) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_own_cpu_ticks(&stat).and_then(ticks_to_duration)
}

fn parse_own_cpu_ticks(stat: &str) -> Option<u64> {
    // After the name, field 3 (state) first: utime is field 14, stime 15.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

fn ticks_to_duration(ticks: u64) -> Option<std::time::Duration> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| std::time::Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// Whether the process is a zombie (exited, not yet waited for by its parent).
pub(crate) fn is_zombie(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = stat[stat.rfind(')')? + 1..].to_string();
            after_name
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// A process's parent pid and process group, from `/proc/PID/stat`.
pub(crate) fn parent_and_group(pid: i64) -> Option<(i64, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

/// A process's parent pid and session, from `/proc/PID/stat` (readable
/// for a zombie too).
pub(crate) fn parent_and_session(pid: i64) -> Option<(i64, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    let parent = fields.next()?.parse().ok()?;
    let session = fields.nth(1)?.parse().ok()?;
    Some((parent, session))
}

/// Whether no live process has this pid (none at all, or a zombie).
pub(crate) fn is_gone(pid: i64) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
}

/// The live processes of process group `group` that started at or after
/// tick `since`: what is left of a try whose leader (pid = `group`) is gone.
pub(crate) fn group_members_since(group: i64, since: i64) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            // Fields from 3 on: state, ppid, pgrp, …, starttime (22).
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            fields.first() != Some(&"Z")
                && fields.get(2).and_then(|g| g.parse::<i64>().ok()) == Some(group)
                && fields
                    .get(19)
                    .and_then(|t| t.parse::<i64>().ok())
                    .is_some_and(|ticks| ticks >= since)
        })
        .collect()
}

/// The live (not zombie) processes whose parent is `parent`, found by a walk
/// of `/proc` (`/proc/PID/task/TID/children` needs a kernel option many
/// kernels lack).
pub(crate) fn live_children(parent: i64) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter(|&pid| {
            !is_zombie(pid) && parent_and_group(pid).is_some_and(|(ppid, _)| ppid == parent)
        })
        .collect()
}

/// The children of `parent` (running, or exited and unreaped) whose
/// session is `session`, oldest first (by start, then pid). A zombie has no
/// descriptors, command line or environment left; its session still says
/// who forked it (a preloaded parent leads its own session).
pub(crate) fn children_in_session(parent: i64, session: i64) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<(i64, i64)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields from 3 on: state, ppid, pgrp, session, …, starttime (22).
            let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
            let number = |index: usize| fields.get(index)?.parse::<i64>().ok();
            (number(1) == Some(parent) && number(3) == Some(session)).then_some((number(19)?, pid))
        })
        .collect();
    children.sort_unstable();
    children.into_iter().map(|(_, pid)| pid).collect()
}

/// Whether process `pid` runs this process's own executable: a child the
/// daemon's spawner has made and that has not reached its `execve` yet
/// (it holds copies of all the daemon's descriptors until then).
pub(crate) fn runs_our_executable(pid: i64) -> bool {
    match (
        std::fs::read_link(format!("/proc/{pid}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    }
}

/// The inodes of the pipes process `pid` has open (`pipe:[INODE]` in
/// `/proc/PID/fd`); empty if its descriptors cannot be read.
pub(crate) fn pipes_held(pid: i64) -> Vec<u64> {
    held(pid, "pipe")
}

/// The inodes of the open files of `kind` (`pipe`, `socket`) of process
/// `pid`: `KIND:[INODE]` in `/proc/PID/fd`.
fn held(pid: i64, kind: &str) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix(kind)?
                .strip_prefix(":[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The process at the other end of a TCP connection on this machine whose
/// ends are `peer` (its end) and `local` (ours), among the processes
/// `among` takes: the socket in `/proc/net/tcp` (or `tcp6`) with those
/// ends, then the process holding it (whose descriptors are read only if
/// `among` takes it first). `None` when it is not found (another
/// machine's, gone, not among them, or a process this one may not see).
pub(crate) fn tcp_peer_pid(
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
    among: impl Fn(i64) -> bool,
) -> Option<i64> {
    let plain = |address: std::net::SocketAddr| match address.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, |v4| {
            std::net::SocketAddr::new(std::net::IpAddr::V4(v4), address.port())
        }),
        std::net::IpAddr::V4(_) => address,
    };
    let (peer, local) = (plain(peer), plain(local));
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (ours, theirs, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
                (parse_proc_address(ours)? == peer && parse_proc_address(theirs)? == local)
                    .then(|| inode.parse::<u64>().ok())
                    .flatten()
                    .filter(|inode| *inode != 0)
            })
        })?;
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .find(|pid| among(*pid) && held(*pid, "socket").contains(&inode))
}

/// An address of `/proc/net/tcp`: `0100007F:1F90` (the IPv4 address as a
/// word in the host's byte order, the port in hex), or 32 hex digits of
/// IPv6 in four such words. An IPv4 address mapped into IPv6 is read as IPv4 (a
/// listener on `::` accepts IPv4 peers so).
fn parse_proc_address(text: &str) -> Option<std::net::SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..address.len() / 8)
        .map(|i| u32::from_str_radix(address.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            v6.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Seconds since the epoch at which the process started, from its ticks.
pub(crate) fn start_time_epoch(start_ticks: i64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot_time: f64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return None;
    }
    Some(boot_time + start_ticks as f64 / ticks_per_second as f64)
}

/// What the reaper concludes about a stored pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The recorded process still runs.
    Alive,
    /// Gone, or the pid now names another process; the text says which.
    Dead(String),
    /// Recorded on another boot: another machine sharing this host id, or
    /// this machine before a reboot. Not ours to judge: the lease decides.
    Foreign,
    /// A process has the pid, but the caller cannot see it in `/proc`
    /// (mounted with `hidepid`, and another user's process): whether it
    /// is the task cannot be told, only that something runs. Not ours to
    /// judge either: the lease decides.
    Unseen,
}

/// The identity recorded when a task process was spawned (or what a row
/// written by hand has of it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    pub(crate) pid: i64,
    pub(crate) boot_id: Option<String>,
    pub(crate) start_ticks: Option<i64>,
    /// The row's `started_at`, seconds since the epoch.
    pub(crate) started_at: Option<f64>,
}

/// Whether a process has the pid, seen or not: `kill(pid, 0)` succeeds, or
/// fails for want of permission (`EPERM`) rather than for want of a process
/// (`ESRCH`). Sends nothing.
fn exists(pid: i64) -> bool {
    // SAFETY: signal 0 only checks; no memory is touched.
    let sent = unsafe { libc::kill(pid as libc::pid_t, 0) };
    sent == 0 || io_errno() == libc::EPERM
}

fn io_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Decides whether the process a row names is the task (SPEC.md, Guarantees):
/// with a recorded identity, boot id and start ticks must match exactly; for a
/// row without one, a live process that started more than a second before
/// the row's `started_at` is not the task. Never signals anything.
pub(crate) fn probe(identity: &Identity) -> Probe {
    let pid = identity.pid;
    if pid <= 0 || pid > i64::from(i32::MAX) {
        return Probe::Dead(format!("pid {pid} is not a valid process id"));
    }
    if identity
        .boot_id
        .as_ref()
        .is_some_and(|boot| !boot.is_empty() && *boot != boot_id())
    {
        return Probe::Foreign;
    }
    let ticks_now = if Path::new(&format!("/proc/{pid}")).exists() {
        start_ticks(pid)
    } else {
        None
    };
    let Some(ticks_now) = ticks_now else {
        // Gone, or hidden from us: before, a `taskrunner-cli reap` by a
        // user who cannot see the tasks (`hidepid`) took each running one
        // for dead, and it ran again beside itself.
        return if exists(pid) {
            Probe::Unseen
        } else {
            Probe::Dead(format!("process {pid} is gone"))
        };
    };
    if is_zombie(pid) {
        return Probe::Dead(format!("process {pid} has exited (zombie)"));
    }
    match (&identity.boot_id, identity.start_ticks) {
        (Some(boot), Some(ticks)) if !boot.is_empty() => {
            if *boot != boot_id() {
                Probe::Foreign
            } else if ticks != ticks_now {
                Probe::Dead(format!(
                    "pid {pid} now names another process (started at tick {ticks_now}, not {ticks})"
                ))
            } else {
                Probe::Alive
            }
        }
        _ => match (identity.started_at, start_time_epoch(ticks_now)) {
            (Some(row_started), Some(process_started)) if process_started < row_started - 1.0 => {
                Probe::Dead(format!(
                    "pid {pid} names a process that started {:.0}s before the task did",
                    row_started - process_started
                ))
            }
            _ => Probe::Alive,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_proc_net_tcp_are_read() {
        let read = |text| parse_proc_address(text).map(|address| address.to_string());
        assert_eq!(read("0100007F:1F90").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(
            read("00000000000000000000000001000000:1F90").as_deref(),
            Some("[::1]:8080")
        );
        assert_eq!(
            read("0000000000000000FFFF00000100007F:0050").as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(read("0100007F"), None);
        assert_eq!(read("zz00007F:1F90"), None);
    }

    /// The process at the other end of a loopback connection is found: this
    /// one, at both ends.
    #[test]
    fn the_peer_of_a_loopback_connection_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(
            tcp_peer_pid(peer, server.local_addr().unwrap(), |_| true),
            Some(i64::from(std::process::id()))
        );
        assert_eq!(
            tcp_peer_pid(peer, server.local_addr().unwrap(), |_| false),
            None
        );
    }

    #[test]
    fn start_ticks_survive_odd_command_names() {
        let stat =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
    }

    #[test]
    fn own_cpu_ticks_are_user_and_system_without_the_childrens() {
        // utime 7, stime 5, cutime 300, cstime 200.
        let stat =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 5 300 200 20 0 1 0 987654";
        assert_eq!(parse_own_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn our_own_process_is_alive_and_identified() {
        let pid = i64::from(std::process::id());
        let identity = Identity {
            pid,
            boot_id: Some(boot_id()),
            start_ticks: start_ticks(pid),
            started_at: None,
        };
        assert_eq!(probe(&identity), Probe::Alive);
    }

    #[test]
    fn a_mismatched_start_time_is_another_process() {
        let pid = i64::from(std::process::id());
        let identity = Identity {
            pid,
            boot_id: Some(boot_id()),
            start_ticks: Some(start_ticks(pid).unwrap() + 1),
            started_at: None,
        };
        assert!(
            matches!(probe(&identity), Probe::Dead(reason) if reason.contains("another process"))
        );
    }

    #[test]
    fn a_hand_written_row_rejects_an_older_process() {
        let pid = i64::from(std::process::id());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let older = Identity {
            pid,
            started_at: Some(now + 3600.0),
            ..Default::default()
        };
        assert!(matches!(probe(&older), Probe::Dead(_)));
        let fresh = Identity {
            pid,
            started_at: Some(now - 3600.0),
            ..Default::default()
        };
        assert_eq!(probe(&fresh), Probe::Alive);
    }

    #[test]
    fn nonsense_pids_are_dead() {
        assert!(matches!(
            probe(&Identity {
                pid: -5,
                ..Default::default()
            }),
            Probe::Dead(_)
        ));
        assert!(matches!(
            probe(&Identity {
                pid: 1 << 40,
                ..Default::default()
            }),
            Probe::Dead(_)
        ));
    }
}
