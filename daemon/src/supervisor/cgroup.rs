//! A cgroup per try (SPEC.md "Limits through cgroups"): `memory_limit`
//! (resident memory), `max_processes` and `cpu_quota` limit everything a try
//! starts, and ending a try kills everything in its cgroup, `setsid`
//! escapes included.
//!
//! Which mechanism is in force is decided once, at start ([`init`]):
//! - cgroup v2, where the daemon's own cgroup is delegated to it (systemd
//!   `Delegate=yes`: the `trusted.delegate` mark, or a cgroup owned by a
//!   non-root daemon's user) and offers `memory`, `pids` or `cpu`. The daemon
//!   moves itself into a leaf (`taskrunnerd`) so that its cgroup may hand
//!   those controllers to its children, and each try gets `try-…` beside it;
//! - else the cgroup v1 `memory`, `pids` and `cpu` controllers that are
//!   mounted and writable: each try gets `taskrunner/try-…` under the
//!   daemon's own cgroup of each hierarchy;
//! - else rlimits only (see limits.rs). `TASKRUNNER_CGROUPS=off` in the
//!   daemon's environment chooses rlimits too.
//!
//! A try's cgroup is named after its claim token and row id (a hash), so that a
//! restarted daemon's start-up reaper finds the cgroup of a try its dead
//! predecessor ran, and kills what is left in it. The child joins its
//! cgroup itself between clone and exec, by writing `0` to join files
//! opened here (open, write: async-signal-safe), so that nothing of the try
//! ever runs outside it; a preloaded parent's child is asked to do the same
//! (the `cgroup` field of the preload protocol), and is moved by the daemon
//! when it is adopted in case it did not.
//!
//! A try without limits, on cgroup v1, gets the daemon's spare: the emptied
//! cgroup of an earlier try, renamed after it (see [`Cgroups::keep_spares`]):
//! a `mkdir` and an `rmdir` of a cgroup each cost more of the daemon's CPU
//! than the rest of its work on a no-op try.
//!
//! The join file is `tasks` on cgroup v1 and `cgroup.procs` on v2 (see
//! [`join_file`]): on v1, a single-threaded process that moves itself
//! through `tasks` takes no global lock, where a write to `cgroup.procs`
//! write-locks the kernel's `cgroup_threadgroup_rwsem`, which waits for an
//! RCU grace period (8–20 ms measured on the 2-CPU machine) whenever no
//! other migration happened on the machine within the last few
//! milliseconds: each try's start waited that long on a quiet machine
//! (docs/performance.md, "Where claim-to-start goes").

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::units::format_size;

/// A cgroup controller that enforces one of the task settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    /// `memory_limit`
    Memory,
    /// `max_processes`
    Pids,
    /// `cpu_quota`
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// One mounted hierarchy the tries' cgroups are made in.
#[derive(Debug, Clone)]
struct Hierarchy {
    v2: bool,
    controllers: Vec<Controller>,
    /// The directory each try's cgroup is made in.
    base: PathBuf,
}

/// The cgroups in force (none: rlimits only).
#[derive(Debug)]
pub(crate) struct Cgroups {
    hierarchies: Vec<Hierarchy>,
    /// Why cgroups (or some controllers) are not used.
    note: Option<String>,
    /// Whether emptied cgroups are kept for the next try ([`Cgroups::keep_spares`]).
    keeping: AtomicBool,
    /// The emptied cgroups kept, each still named after the try that ran in it.
    spares: Mutex<Vec<Spare>>,
    /// The directory spares are in (the tracking hierarchy's base), open
    /// while spares are kept: renamed relative to it, with no path to walk.
    spares_dir: OnceLock<OwnedFd>,
}

/// The emptied cgroup of a try without limits, kept for the next one: its
/// name in the tracking hierarchy's base (still that of the try that ran in
/// it), its join file, open, and when its modification time was last set.
#[derive(Debug)]
struct Spare {
    name: CString,
    join: OwnedFd,
    count: Option<OwnedFd>,
    touched: std::time::Instant,
}

/// At most this many spares are kept (as many as tries ran at once, at most).
const MAX_SPARES: usize = 64;

/// A spare's modification time is set to now when it is reused, if it was
/// set longer ago than this: a reused cgroup is always far younger than
/// [`SWEEP_AFTER`], as a new one is.
const TOUCH_AFTER: Duration = Duration::from_secs(1);

static DETECTED: OnceLock<Cgroups> = OnceLock::new();

/// Finds (and for cgroup v2 sets up) the cgroups tries will run in; once per
/// process, the first call decides. The daemon calls it at start.
pub(crate) fn init() -> &'static Cgroups {
    DETECTED.get_or_init(detect)
}

/// The cgroups in force, once [`init`] has found some.
pub(crate) fn in_force() -> Option<&'static Cgroups> {
    DETECTED
        .get()
        .filter(|cgroups| !cgroups.hierarchies.is_empty())
}

/// What limits the tries (for the start line and `status`).
pub(crate) fn describe() -> String {
    init().describe()
}

/// The limits a try's cgroup gets.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub(crate) memory: Option<u64>,
    pub(crate) processes: Option<u64>,
    /// CPUs (0.5 for `50%`).
    pub(crate) cpu: Option<f64>,
}

impl Limits {
    fn none(&self) -> bool {
        self.memory.is_none() && self.processes.is_none() && self.cpu.is_none()
    }
}

impl Cgroups {
    fn new(hierarchies: Vec<Hierarchy>, note: Option<String>) -> Cgroups {
        Cgroups {
            hierarchies,
            note,
            keeping: AtomicBool::new(false),
            spares: Mutex::new(Vec::new()),
            spares_dir: OnceLock::new(),
        }
    }

    /// From now on, the emptied cgroup of a try without limits is kept, and
    /// the next try without limits gets it, renamed after that try, instead
    /// of a new one: on cgroup v1 only (cgroup v2 cannot rename a cgroup).
    /// A spare is still named after the try that ran in it, so that until
    /// it is reused it is what it was: the daemon's reaper and sweep
    /// (`sweep_empty`) treat it as that try's cgroup, and a spare left by a
    /// daemon killed -9 is swept like any empty try cgroup. The daemon keeps
    /// spares while it runs and removes them at its end
    /// ([`Cgroups::release_spares`]).
    pub(crate) fn keep_spares(&self) {
        let Some(hierarchy) = self.hierarchies.get(self.tracking()) else {
            return;
        };
        if hierarchy.v2 {
            return;
        }
        if self.spares_dir.get().is_none() {
            let Ok(dir) = std::fs::File::open(&hierarchy.base) else {
                return;
            };
            let _ = self.spares_dir.set(OwnedFd::from(dir));
        }
        self.keeping.store(true, Ordering::Relaxed);
    }

    /// Removes the spares and keeps no more (the daemon's end).
    pub(crate) fn release_spares(&self) {
        self.keeping.store(false, Ordering::Relaxed);
        let spares = std::mem::take(&mut *self.spares.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(dir) = self.spares_dir.get() else {
            return;
        };
        for spare in spares {
            // SAFETY: a NUL-terminated name in the open directory.
            unsafe { libc::unlinkat(dir.as_raw_fd(), spare.name.as_ptr(), libc::AT_REMOVEDIR) };
        }
    }

    /// The cgroup v2 directory the tries' cgroups are made in, if cgroup v2
    /// is in force.
    pub(crate) fn v2_base(&self) -> Option<&Path> {
        self.hierarchies
            .iter()
            .find(|hierarchy| hierarchy.v2)
            .map(|hierarchy| hierarchy.base.as_path())
    }

    /// The hierarchy that tracks every try's processes: pids, else the first.
    fn tracking(&self) -> usize {
        self.hierarchies
            .iter()
            .position(|hierarchy| hierarchy.controllers.contains(&Controller::Pids))
            .unwrap_or(0)
    }

    /// A spare renamed `name`, for a try without limits; None when there is
    /// none, or it is gone (the sweep of an idle daemon's spare, once 10 s
    /// old, or an operator's rmdir): then a new cgroup is made.
    fn reuse_spare(&self, name: &str) -> Option<TryCgroup> {
        let dir = self.spares_dir.get()?.as_raw_fd();
        let new_name = CString::new(name).ok()?;
        let mut spare = self
            .spares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()?;
        let hierarchy = &self.hierarchies[self.tracking()];
        // Touched before it takes the new name: a sweep that finds it under
        // that name finds it young, and leaves it to the try that joins it.
        let mut usable = true;
        if spare.touched.elapsed() >= TOUCH_AFTER {
            // SAFETY: a NUL-terminated name in the open directory; a null
            // `times` means now.
            usable = unsafe { libc::utimensat(dir, spare.name.as_ptr(), std::ptr::null(), 0) } == 0;
            spare.touched = std::time::Instant::now();
        }
        // SAFETY: NUL-terminated names in the open directory.
        usable = usable
            && unsafe { libc::renameat(dir, spare.name.as_ptr(), dir, new_name.as_ptr()) } == 0;
        if !usable {
            // SAFETY: as above.
            unsafe { libc::unlinkat(dir, spare.name.as_ptr(), libc::AT_REMOVEDIR) };
            return None;
        }
        let path = hierarchy.base.join(name);
        Some(TryCgroup {
            dirs: vec![Dir {
                path,
                v2: hierarchy.v2,
                controllers: hierarchy.controllers.clone(),
            }],
            procs: vec![spare.join],
            count: spare.count,
            limits: Limits::default(),
            touched: spare.touched,
            spare: true,
            emptied: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        })
    }

    /// Whether `controller` is in force (else its setting is an rlimit, or
    /// not enforced).
    pub(crate) fn controls(&self, controller: Controller) -> bool {
        self.hierarchies
            .iter()
            .any(|hierarchy| hierarchy.controllers.contains(&controller))
    }

    fn describe(&self) -> String {
        let Some(first) = self.hierarchies.first() else {
            return format!("rlimits ({})", self.note.as_deref().unwrap_or("no cgroup"));
        };
        let names: Vec<&str> = Controller::ALL
            .iter()
            .filter(|c| self.controls(**c))
            .map(|c| c.name())
            .collect();
        let mut text = if first.v2 {
            format!(
                "cgroup v2 ({}) under {}",
                names.join(", "),
                first.base.display()
            )
        } else {
            format!("cgroup v1 ({})", names.join(", "))
        };
        let missing: Vec<&str> = Controller::ALL
            .iter()
            .filter(|c| !self.controls(**c))
            .map(|c| match c {
                Controller::Memory => "memory_limit is RLIMIT_AS",
                Controller::Pids => "max_processes is RLIMIT_NPROC",
                Controller::Cpu => "cpu_quota is not enforced",
            })
            .collect();
        if !missing.is_empty() {
            text.push_str(&format!("; {}", missing.join(", ")));
        }
        text
    }

    /// Makes the cgroup of the try named `key` ([`try_key`]) with
    /// `limits`, ready for its process to join.
    pub(crate) fn create(&self, key: &str, limits: &Limits) -> io::Result<TryCgroup> {
        let name = cgroup_name(key);
        let spare = limits.none() && self.keeping.load(Ordering::Relaxed);
        if spare {
            if let Some(reused) = self.reuse_spare(&name) {
                return Ok(reused);
            }
        }
        let mut made = TryCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            count: None,
            limits: *limits,
            touched: std::time::Instant::now(),
            spare,
            emptied: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        };
        // A hierarchy whose controllers limit nothing of this try is left
        // out (each cgroup costs a mkdir, a join and an rmdir), except the
        // one that tracks the try's processes (pids, else the first).
        let tracking = self.tracking();
        for (index, hierarchy) in self.hierarchies.iter().enumerate() {
            let limits_something =
                hierarchy
                    .controllers
                    .iter()
                    .any(|controller| match controller {
                        Controller::Memory => limits.memory.is_some(),
                        Controller::Pids => limits.processes.is_some(),
                        Controller::Cpu => limits.cpu.is_some(),
                    });
            if index != tracking && !limits_something {
                continue;
            }
            let path = hierarchy.base.join(&name);
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => {
                    made.remove_now();
                    return Err(with_path(error, "creating", &path));
                }
            }
            made.dirs.push(Dir {
                path: path.clone(),
                v2: hierarchy.v2,
                controllers: hierarchy.controllers.clone(),
            });
            if let Err(error) = set_limits(&path, hierarchy, limits) {
                made.remove_now();
                return Err(refused_or_short(error));
            }
            let join = join_file(&path, hierarchy.v2);
            match std::fs::OpenOptions::new().write(true).open(&join) {
                Ok(file) => made.procs.push(OwnedFd::from(file)),
                Err(error) => {
                    made.remove_now();
                    return Err(with_path(error, "opening", &join));
                }
            }
        }
        // A spare to be is asked whether it is empty through its process
        // count, kept open (see `TryCgroup::count`).
        if let (true, [dir]) = (spare, made.dirs.as_slice()) {
            if !dir.v2 && dir.controllers.contains(&Controller::Pids) {
                made.count = std::fs::File::open(dir.path.join("pids.current"))
                    .ok()
                    .map(OwnedFd::from);
            }
        }
        Ok(made)
    }

    /// Kills whatever is left in the cgroup of the try named `key` ([`try_key`]; a try
    /// of a daemon that died) and removes it; returns how many processes
    /// were killed.
    pub(crate) async fn kill_leftovers(&self, key: &str) -> usize {
        let name = cgroup_name(key);
        let leftover = TryCgroup {
            dirs: self
                .hierarchies
                .iter()
                .map(|hierarchy| Dir {
                    path: hierarchy.base.join(&name),
                    v2: hierarchy.v2,
                    controllers: hierarchy.controllers.clone(),
                })
                .filter(|dir| dir.path.is_dir())
                .collect(),
            procs: Vec::new(),
            count: None,
            limits: Limits::default(),
            touched: std::time::Instant::now(),
            spare: false,
            emptied: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        };
        if leftover.dirs.is_empty() {
            return 0;
        }
        let killed = leftover.kill_all();
        leftover.remove().await;
        killed
    }
}

/// How old an empty `try-…` cgroup must be before [`Cgroups::sweep_empty`]
/// removes it. A live daemon's try cgroup is empty only between its `mkdir`
/// and the child's join (milliseconds; a preloaded try's start can wait for
/// its parent's boot, and is [touched](TryCgroup::touch) meanwhile), or
/// after its try ended, while that daemon removes it: one a few seconds old
/// and empty is nobody's.
pub(crate) const SWEEP_AFTER: Duration = Duration::from_secs(10);

impl Cgroups {
    /// Removes the `try-…` cgroups that hold no process and were made more
    /// than `older_than` ago: those a daemon killed -9 left behind (its
    /// tries died with it, but their cgroups stay; the start-up reaper
    /// removes only those of the rows it reaps). A cgroup that still holds
    /// a process is never touched (`rmdir` refuses it): the reaper kills
    /// the remains of a dead try, by its row, first. Returns how many were
    /// removed.
    pub(crate) fn sweep_empty(&self, older_than: Duration) -> usize {
        let mut removed = 0;
        for hierarchy in &self.hierarchies {
            let Ok(entries) = std::fs::read_dir(&hierarchy.base) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_name().as_bytes().starts_with(b"try-") {
                    continue;
                }
                let old_enough = entry
                    .metadata()
                    .and_then(|metadata| metadata.modified())
                    .ok()
                    .and_then(|made| made.elapsed().ok())
                    .is_some_and(|age| age >= older_than);
                // rmdir removes only an empty cgroup (EBUSY otherwise).
                if old_enough && std::fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// The key naming the cgroup of the try of row `id` under `claim_token`
/// (one claim statement's rows share a token: the id tells them apart).
pub(crate) fn try_key(claim_token: &str, id: i64) -> String {
    format!("{claim_token}/{id}")
}

/// A try's cgroup name: a hash of its key (a claim token may hold any
/// character), the same in every daemon that reads the row.
fn cgroup_name(key: &str) -> String {
    // FNV-1a, 64 bits: stable across builds, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("try-{hash:016x}")
}

/// A try's limit that the kernel refused to set (EINVAL): a `cpu_quota`
/// above the one of the daemon's own cgroup on cgroup v1. Not the daemon's
/// shortage:
/// trying again at once would be refused the same way, for ever (before,
/// such a try was given back and claimed again without end, each time
/// pausing the daemon's claims). The try fails, saying what was refused.
#[derive(Debug)]
pub(crate) struct LimitRefused(io::Error);

impl std::fmt::Display for LimitRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the kernel refused the try's limits ({}): is the type's limit above that of the daemon's own cgroup?",
            self.0
        )
    }
}

impl std::error::Error for LimitRefused {}

/// Whether `error` is a [`LimitRefused`].
pub(crate) fn is_limit_refused(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<LimitRefused>().is_some())
}

/// `error`, from setting a try's limits, marked [`LimitRefused`] when the
/// kernel refused the value, as it is otherwise (taken for the daemon's own
/// trouble: a limit file it may not write, or that is gone, is no fault of
/// the type's, and may be mended).
fn refused_or_short(error: io::Error) -> io::Error {
    match error.kind() {
        io::ErrorKind::InvalidInput => io::Error::new(error.kind(), LimitRefused(error)),
        _ => error,
    }
}

fn with_path(error: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{doing} {}: {error}", path.display()))
}

/// Writes `value` to the cgroup file `path`, which must exist (opened
/// without `O_CREAT`: cgroupfs answers EACCES to a create, which would hide
/// that the file is missing).
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(|error| with_path(error, "writing", path))
}

/// The period of the CPU bandwidth limit (the kernel's default, 100 ms).
const CPU_PERIOD_MICROS: u64 = 100_000;

fn set_limits(dir: &Path, hierarchy: &Hierarchy, limits: &Limits) -> io::Result<()> {
    let has = |controller| hierarchy.controllers.contains(&controller);
    let cpu_quota = limits
        .cpu
        .map(|cpus| ((cpus * CPU_PERIOD_MICROS as f64) as u64).max(1000));
    // The same file on both versions.
    if has(Controller::Pids) {
        if let Some(count) = limits.processes {
            write_file(&dir.join("pids.max"), &count.to_string())?;
        }
    }
    if hierarchy.v2 {
        if has(Controller::Memory) {
            if let Some(bytes) = limits.memory {
                write_file(&dir.join("memory.max"), &bytes.to_string())?;
                // Resident means resident: no escape into swap. Best effort
                // (no swap accounting, no file).
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                // The OOM killer takes the whole try, not one of its processes.
                let _ = std::fs::write(dir.join("memory.oom.group"), "1");
            }
        }
        if has(Controller::Cpu) {
            if let Some(quota) = cpu_quota {
                write_file(
                    &dir.join("cpu.max"),
                    &format!("{quota} {CPU_PERIOD_MICROS}"),
                )?;
            }
        }
    } else {
        if has(Controller::Memory) {
            if let Some(bytes) = limits.memory {
                write_file(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                // Memory plus swap at the same value: no escape into swap
                // (present only with swap accounting).
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
            }
        }
        if has(Controller::Cpu) {
            if let Some(quota) = cpu_quota {
                write_file(
                    &dir.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_MICROS.to_string(),
                )?;
                write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Dir {
    path: PathBuf,
    v2: bool,
    controllers: Vec<Controller>,
}

/// One try's cgroup (a directory in each hierarchy).
#[derive(Debug)]
pub(crate) struct TryCgroup {
    dirs: Vec<Dir>,
    /// Each directory's join file ([`join_file`]), open for writing: the
    /// child writes `0` to each to join.
    procs: Vec<OwnedFd>,
    /// Its only directory's `pids.current` (cgroup v1), open: read again
    /// from its start, it tells whether any process is left without the
    /// path walk, the list and the sort of reading `cgroup.procs`, which
    /// were a tenth of the daemon's runtime thread.
    count: Option<OwnedFd>,
    limits: Limits,
    /// When its directory was made, or its modification time last set.
    touched: std::time::Instant,
    /// Kept as a spare at its end, once emptied (a try without limits, while
    /// the daemon keeps spares: one directory, cgroup v1).
    spare: bool,
    /// The last [`TryCgroup::kill_all`] left no process in it.
    emptied: AtomicBool,
    /// Removed, or kept as a spare: nothing is left to do when it is dropped.
    ended: AtomicBool,
}

/// At most this many hierarchies (memory, pids, cpu each on its own).
pub(crate) const MAX_HIERARCHIES: usize = 3;

impl TryCgroup {
    /// The join-file descriptors the child writes `0` to (-1: none).
    pub(crate) fn join_fds(&self) -> [libc::c_int; MAX_HIERARCHIES] {
        let mut fds = [-1; MAX_HIERARCHIES];
        for (slot, fd) in fds.iter_mut().zip(&self.procs) {
            *slot = fd.as_raw_fd();
        }
        fds
    }

    /// The join files ([`join_file`]), for a preloaded parent's child to
    /// write `0` to.
    pub(crate) fn procs_paths(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| join_file(&dir.path, dir.v2))
            .collect()
    }

    /// Moves `pid` (and whatever it has started since) into the cgroup: a
    /// preloaded parent's child that did not join itself. True when it was
    /// in every directory already: it joined by itself (the cgroup was
    /// empty when the try got it, and only this moves another process in).
    pub(crate) fn adopt(&self, pid: u32) -> io::Result<bool> {
        let mut joined = true;
        for dir in &self.dirs {
            let procs = dir.path.join("cgroup.procs");
            let current = std::fs::read_to_string(&procs).unwrap_or_default();
            if current.lines().any(|line| line.trim() == pid.to_string()) {
                continue;
            }
            joined = false;
            write_file(&procs, &pid.to_string())?;
        }
        Ok(joined)
    }

    /// The processes in the cgroup now.
    fn members(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            let Ok(text) = std::fs::read_to_string(dir.path.join("cgroup.procs")) else {
                continue;
            };
            for pid in text
                .lines()
                .filter_map(|line| line.trim().parse::<i32>().ok())
            {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Sets the modification time of its directories to now. A try's
    /// cgroup is empty until its process joins it, and
    /// [`Cgroups::sweep_empty`] takes an empty one older than
    /// [`SWEEP_AFTER`] for one nobody uses: a try whose start waits longer
    /// (its preloaded parent booting) is touched meanwhile.
    pub(crate) fn touch(&self) {
        for dir in &self.dirs {
            let Ok(path) = CString::new(dir.path.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated path; a null `times` means now.
            unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), std::ptr::null(), 0) };
        }
    }

    /// SIGKILL to every process in the cgroup, again until none is left
    /// (a process may fork while the list is read); returns how many.
    pub(crate) fn kill_all(&self) -> usize {
        self.emptied.store(false, Ordering::Relaxed);
        if self.counts_none() {
            self.emptied.store(true, Ordering::Relaxed);
            return 0;
        }
        // cgroup v2 kills the whole cgroup in one write (Linux 5.14).
        for dir in self.dirs.iter().filter(|dir| dir.v2) {
            let _ = std::fs::write(dir.path.join("cgroup.kill"), "1");
        }
        let mut killed = std::collections::HashSet::new();
        for _ in 0..1000 {
            let members = self.members();
            if members.is_empty() {
                self.emptied.store(true, Ordering::Relaxed);
                break;
            }
            for pid in members {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.insert(pid);
            }
        }
        killed.len()
    }

    /// Whether the process count of its only directory (`count`) is 0:
    /// no process, not even one that has exited and was not yet reaped.
    fn counts_none(&self) -> bool {
        let Some(count) = &self.count else {
            return false;
        };
        let mut text = [0u8; 32];
        // SAFETY: a read into a local buffer from our descriptor, at offset 0
        // (which makes the kernel print the count afresh).
        let read =
            unsafe { libc::pread(count.as_raw_fd(), text.as_mut_ptr().cast(), text.len(), 0) };
        read > 0 && text[..read as usize].trim_ascii() == b"0"
    }

    /// The limit the cgroup's kernel counters say was hit: the OOM killer
    /// acted in it (memory), or a fork was refused at `pids.max`.
    pub(crate) fn broken_limit(&self) -> Option<String> {
        for dir in &self.dirs {
            if let (Some(bytes), true) = (
                self.limits.memory,
                dir.controllers.contains(&Controller::Memory),
            ) {
                if killed_at_its_memory_limit(&dir.path, dir.v2) {
                    return Some(format!(
                        "memory limit {} exceeded (killed by the OOM killer)",
                        format_size(bytes)
                    ));
                }
            }
        }
        for dir in &self.dirs {
            if let (Some(count), true) = (
                self.limits.processes,
                dir.controllers.contains(&Controller::Pids),
            ) {
                if counter(&dir.path.join("pids.events"), "max") > 0 {
                    return Some(format!(
                        "max_processes {count} reached (the try's pids cgroup refused a fork)"
                    ));
                }
            }
        }
        None
    }

    /// Kills what is left and removes the cgroup: each directory once it is
    /// empty (killed processes take a moment to exit). Gives up after a few
    /// seconds with one warning line.
    ///
    /// The cgroup of a try without limits that [`TryCgroup::kill_all`] left
    /// empty is kept as the daemon's spare instead ([`Cgroups::keep_spares`]):
    /// nothing can enter a cgroup with no process in it but through its
    /// join file, which only the next try's process writes to.
    pub(crate) async fn remove(&self) {
        if self.keep_as_spare() {
            self.ended.store(true, Ordering::Relaxed);
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut removed = true;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(&dir.path) {
                    Ok(()) => break,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                    Err(error) => {
                        if tokio::time::Instant::now() > deadline {
                            tracing::warn!(
                                "cannot remove the try's cgroup {}: {error}",
                                dir.path.display()
                            );
                            removed = false;
                            break;
                        }
                        self.kill_all();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        self.ended.store(removed, Ordering::Relaxed);
    }

    /// Hands the emptied cgroup to the daemon's spares; false if it is not
    /// to be kept (limits, cgroup v2, not known empty, enough spares).
    fn keep_as_spare(&self) -> bool {
        let (true, true, [dir], [join]) = (
            self.spare,
            self.emptied.load(Ordering::Relaxed),
            self.dirs.as_slice(),
            self.procs.as_slice(),
        ) else {
            return false;
        };
        let Some(cgroups) = in_force().filter(|c| c.keeping.load(Ordering::Relaxed)) else {
            return false;
        };
        let count = match &self.count {
            Some(count) => match count.try_clone() {
                Ok(count) => Some(count),
                Err(_) => return false,
            },
            None => None,
        };
        let (Ok(join), Some(Ok(name))) = (
            join.try_clone(),
            dir.path
                .file_name()
                .map(|name| CString::new(name.as_bytes())),
        ) else {
            return false;
        };
        let mut spares = cgroups.spares.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() >= MAX_SPARES {
            return false;
        }
        spares.push(Spare {
            name,
            join,
            count,
            touched: self.touched,
        });
        true
    }

    /// Removes what was made so far (a failed creation; nothing joined yet).
    fn remove_now(&self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(&dir.path);
        }
    }
}

impl Drop for TryCgroup {
    /// A try whose supervision was dropped midway (its caller gone) leaves
    /// nothing running either: best effort, without waiting.
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Relaxed) && self.dirs.iter().any(|dir| dir.path.exists()) {
            self.kill_all();
            self.remove_now();
        }
    }
}

/// Whether the OOM killer killed a process of the cgroup at `dir` because
/// the cgroup's own memory limit was reached. On cgroup v2, `oom_kill` also
/// counts the machine-wide OOM killer's victims; `oom` counts only the
/// times the cgroup's own limit was reached. Cgroup v1 keeps no such
/// count (`failcnt` also grows when the page cache is reclaimed at the
/// limit), so there any OOM kill in the cgroup counts.
fn killed_at_its_memory_limit(dir: &Path, v2: bool) -> bool {
    if v2 {
        let events = dir.join("memory.events");
        counter(&events, "oom") > 0 && counter(&events, "oom_kill") > 0
    } else {
        counter(&dir.join("memory.oom_control"), "oom_kill") > 0
    }
}

/// The value of `name` in a flat-keyed cgroup file (`name value` lines).
fn counter(path: &Path, name: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn detect() -> Cgroups {
    let none = |note: String| Cgroups::new(Vec::new(), Some(note));
    if std::env::var_os("TASKRUNNER_CGROUPS").is_some_and(|value| value == "off") {
        return none("TASKRUNNER_CGROUPS=off".into());
    }
    let (Ok(mountinfo), Ok(own)) = (
        std::fs::read_to_string("/proc/self/mountinfo"),
        std::fs::read_to_string("/proc/self/cgroup"),
    ) else {
        return none("cannot read /proc/self/mountinfo or /proc/self/cgroup".into());
    };
    let mounts = parse_mounts(&mountinfo);
    let v2_note = match set_up_v2(&mounts, &own) {
        Ok(hierarchy) => return Cgroups::new(vec![hierarchy], None),
        Err(why) => why,
    };
    let (hierarchies, v1_note) = set_up_v1(&mounts, &own);
    if hierarchies.is_empty() {
        return none(format!("{v2_note}; {v1_note}"));
    }
    Cgroups::new(hierarchies, (!v1_note.is_empty()).then_some(v1_note))
}

/// A cgroup mount: its mount point, whether it is cgroup2, and (v1) the
/// controllers it holds.
struct Mount {
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(separator) = fields.iter().position(|field| *field == "-") else {
            continue;
        };
        let (Some(point), Some(fstype), Some(options)) = (
            fields.get(4),
            fields.get(separator + 1),
            fields.get(separator + 3),
        ) else {
            continue;
        };
        if *fstype != "cgroup" && *fstype != "cgroup2" {
            continue;
        }
        mounts.push(Mount {
            point: PathBuf::from(point.replace("\\040", " ")),
            v2: *fstype == "cgroup2",
            options: options.split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// The daemon's own cgroup path in the hierarchy whose `/proc/self/cgroup`
/// line matches `controllers` ("" for cgroup v2).
fn own_path(own: &str, matches: impl Fn(&str) -> bool) -> Option<&str> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        matches(controllers).then_some(path)
    })
}

fn join_own(point: &Path, path: &str) -> PathBuf {
    point.join(path.trim_start_matches('/'))
}

fn set_up_v2(mounts: &[Mount], own: &str) -> Result<Hierarchy, String> {
    let Some(mount) = mounts.iter().find(|mount| mount.v2) else {
        return Err("no cgroup v2".into());
    };
    let Some(path) = own_path(own, |controllers| controllers.is_empty()) else {
        return Err("no cgroup v2 path in /proc/self/cgroup".into());
    };
    let dir = join_own(&mount.point, path);
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let controllers: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| available.split_whitespace().any(|name| name == c.name()))
        .collect();
    if controllers.is_empty() {
        return Err(format!(
            "cgroup v2 at {} offers none of memory, pids, cpu",
            dir.display()
        ));
    }
    if !is_delegated(&dir) {
        return Err(format!(
            "cgroup v2 {} is not delegated to the daemon (systemd: Delegate=yes)",
            dir.display()
        ));
    }
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|name| name == c.name()))
        .map(|c| format!("+{}", c.name()))
        .collect();
    if !missing.is_empty() {
        // A cgroup with processes cannot hand controllers to its children:
        // the daemon moves into a leaf of its own first.
        let leaf = dir.join("taskrunnerd");
        let moved = match std::fs::create_dir(&leaf) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => true,
            Err(_) => false,
        } && std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .is_ok();
        let enabled =
            moved && std::fs::write(dir.join("cgroup.subtree_control"), missing.join(" ")).is_ok();
        if !enabled {
            if moved {
                let _ = std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string());
            }
            let _ = std::fs::remove_dir(&leaf);
            return Err(format!(
                "cannot enable {} in cgroup v2 {} (other processes in it?)",
                missing.join(" "),
                dir.display()
            ));
        }
    }
    probe_writable(&dir)?;
    Ok(Hierarchy {
        v2: true,
        controllers,
        base: dir,
    })
}

/// Whether the daemon may manage the cgroup `dir`: systemd marks a
/// delegated one (`trusted.delegate`, or `user.delegate` for a user
/// manager); a non-root daemon's own cgroup is delegated when it owns it.
fn is_delegated(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    for name in [c"trusted.delegate", c"user.delegate"] {
        let mut value = [0u8; 8];
        // SAFETY: getxattr reads a NUL-terminated path and name into a local buffer.
        let length = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if length > 0 && value[0] == b'1' {
            return true;
        }
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    euid != 0
        && std::fs::metadata(dir.join("cgroup.procs"))
            .is_ok_and(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == euid)
}

/// Makes and removes a child cgroup in `dir`: can the daemon make tries' cgroups there?
fn probe_writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|error| format!("cannot make a cgroup in {}: {error}", dir.display()))
}

fn set_up_v1(mounts: &[Mount], own: &str) -> (Vec<Hierarchy>, String) {
    let mut hierarchies: Vec<Hierarchy> = Vec::new();
    let mut notes = Vec::new();
    for controller in Controller::ALL {
        let name = controller.name();
        let Some(mount) = mounts
            .iter()
            .find(|mount| !mount.v2 && mount.options.iter().any(|option| option == name))
        else {
            notes.push(format!("no cgroup v1 {name} controller"));
            continue;
        };
        if let Some(hierarchy) = hierarchies
            .iter_mut()
            .find(|hierarchy| hierarchy.base.starts_with(&mount.point))
        {
            // One hierarchy holding several controllers (cpu,cpuacct,…).
            hierarchy.controllers.push(controller);
            continue;
        }
        let Some(path) = own_path(own, |controllers| {
            controllers.split(',').any(|held| held == name)
        }) else {
            notes.push(format!("no cgroup v1 {name} path in /proc/self/cgroup"));
            continue;
        };
        let base = join_own(&mount.point, path).join("taskrunner");
        let made = match std::fs::create_dir(&base) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(format!("cannot make {}: {error}", base.display())),
        }
        .and_then(|()| probe_writable(&base));
        match made {
            Ok(()) => hierarchies.push(Hierarchy {
                v2: false,
                controllers: vec![controller],
                base,
            }),
            Err(why) => notes.push(why),
        }
    }
    (hierarchies, notes.join("; "))
}

/// The file a new, single-threaded try process writes `0` ("the caller")
/// to, to join the cgroup at `dir`. On cgroup v1 that is `tasks`: it moves
/// the calling thread, which is the whole process while it has one thread,
/// and the kernel takes no global lock for a thread that moves itself. A
/// write to `cgroup.procs` moves a whole thread group and so write-locks
/// `cgroup_threadgroup_rwsem`, which first waits for an RCU grace period
/// unless another migration on the machine did so a moment before: 8–20 ms
/// on the 2-CPU machine, on every start of a quiet daemon. On cgroup v2
/// `cgroup.threads` may not cross domains, so it stays `cgroup.procs`.
fn join_file(dir: &Path, v2: bool) -> PathBuf {
    dir.join(if v2 { "cgroup.procs" } else { "tasks" })
}

/// Opens nothing, allocates nothing: writes `0` ("the caller") to each
/// join-file descriptor ([`join_file`]), in the child between clone and
/// exec, while it has one thread. False when a write failed.
pub(crate) fn join_in_child(fds: &[libc::c_int; MAX_HIERARCHIES]) -> bool {
    for fd in fds.iter().filter(|fd| **fd >= 0) {
        // SAFETY: a write of a constant byte to a descriptor the parent opened.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_joins_through_tasks_on_v1_and_cgroup_procs_on_v2() {
        // v1: a thread that moves itself takes no global lock in the kernel.
        let dir = Path::new("/sys/fs/cgroup/pids/taskrunner/try-x");
        assert_eq!(join_file(dir, false), dir.join("tasks"));
        assert_eq!(join_file(dir, true), dir.join("cgroup.procs"));
    }

    #[test]
    fn names_are_stable_and_safe() {
        let name = cgroup_name("host/with:odd chars:123");
        assert_eq!(name, cgroup_name("host/with:odd chars:123"));
        assert_ne!(name, cgroup_name("host/with:odd chars:124"));
        assert!(name.starts_with("try-") && !name.contains('/'), "{name}");
    }

    #[test]
    fn mounts_and_own_paths_are_read() {
        let mountinfo =
            "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                         23 1 0:21 / /proc rw - proc proc rw\n";
        let mounts = parse_mounts(mountinfo);
        assert_eq!(mounts.len(), 2);
        assert!(mounts[0].options.iter().any(|o| o == "cpuacct"));
        assert!(mounts[1].v2);
        let own = "4:memory:/a/b\n1:cpu,cpuacct:/\n0::/user.slice\n";
        assert_eq!(own_path(own, |c| c.is_empty()), Some("/user.slice"));
        assert_eq!(
            own_path(own, |c| c.split(',').any(|x| x == "cpu")),
            Some("/")
        );
        assert_eq!(own_path(own, |c| c == "memory"), Some("/a/b"));
    }

    #[test]
    fn counters_are_read_by_name() {
        let file = std::env::temp_dir().join(format!("cgroup-counter-{}", std::process::id()));
        std::fs::write(&file, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert_eq!(counter(&file, "oom_kill"), 2);
        assert_eq!(counter(&file, "max"), 0);
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn only_an_oom_kill_at_the_cgroups_own_limit_is_its_broken_limit() {
        let dir = std::env::temp_dir().join(format!("cgroup-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = |text: &str| std::fs::write(dir.join("memory.events"), text).unwrap();
        events("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n");
        assert!(killed_at_its_memory_limit(&dir, true));
        // The machine ran out of memory and its OOM killer chose the try.
        events("low 0\nhigh 0\nmax 0\noom 0\noom_kill 1\noom_group_kill 0\n");
        assert!(!killed_at_its_memory_limit(&dir, true));
        // The limit was reached and the allocation failed, but nothing was killed.
        events("low 0\nhigh 0\nmax 2\noom 1\noom_kill 0\noom_group_kill 0\n");
        assert!(!killed_at_its_memory_limit(&dir, true));
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(killed_at_its_memory_limit(&dir, false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
