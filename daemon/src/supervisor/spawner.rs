//! Which threads start task processes, and how they start them.
//!
//! Linux ties the parent-death signal to the *thread* that created the
//! child, not to the process: a child started from a tokio blocking-pool
//! thread would be killed when that thread retires. So every task is started
//! from one of the spawner's own threads, which never end before the daemon
//! does (once every handle is gone they wait in their epoll forever).
//!
//! A task is started with `clone(CLONE_VM | CLONE_VFORK)` and `execve`, the
//! way `posix_spawn` does it, not with `fork`: a fork of the daemon copies its
//! page tables and then makes every thread of the daemon take copy-on-write
//! faults, which cost more CPU per task than everything else the daemon does
//! (measured: 1.6 ms against 0.85 ms of daemon CPU per task). The child shares
//! the daemon's memory until it execs, so it runs only async-signal-safe
//! system calls on data prepared here before the clone, on a stack of its own.
//!
//! `CLONE_VFORK` suspends the starting thread until the child has set itself
//! up and exec'd (about 150 µs). That is why the starts are not made on the
//! runtime's thread (as they once were): there, every start held up the
//! reaping of every other slot's exit, and at `max_concurrent` 2 the daemon
//! reached only 68–80 % of the spawn ceiling. The runtime hands each start to
//! a free spawner thread and runs on; with one thread per CPU (at least
//! [`MIN_THREADS`]) two starts never wait for each other either.
//!
//! The threads wait together in one epoll ([`Pool`]): for start requests (an
//! eventfd counting them), and for the exit of every process they started
//! for a try that holds a slot (a pidfd of its own, one-shot, so that one
//! thread sees each exit). Seeing an exit, a thread kills the process's group
//! and hands its slot on ([`super::slots`]), starting the next armed try
//! itself: the runtime's thread, which reaps the process and does the rest
//! of its try's end, is not on the path from one task's exit to the next
//! task's start.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// A start that failed for the daemon's own lack of resources (file
/// descriptors, processes, memory), not for anything of the task's: the try
/// is given back rather than counted (see `attempt::run`).
#[derive(Debug)]
pub(crate) struct DaemonShort(pub(crate) io::Error);

impl std::fmt::Display for DaemonShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for DaemonShort {}

impl DaemonShort {
    /// An error of `kind` that says `text`, marked as the daemon's shortage.
    pub(crate) fn error(kind: io::ErrorKind, text: String) -> io::Error {
        io::Error::new(kind, DaemonShort(io::Error::new(kind, text)))
    }
}

/// Sets SIGCHLD back to its default where this process was started with it
/// ignored (a launcher's `$SIG{CHLD} = "IGNORE"` stays across `execve`):
/// the kernel then reaped each task at its exit, the wait for it failed
/// ("No child processes"), and every try was recorded FAILED and counted.
/// A handler (tokio's) is left alone. Called first by both executables
/// (the CLI's `run` and `config check` wait for children too).
pub fn restore_child_signal() {
    // SAFETY: reads, then sets, this process's disposition of one signal.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut current) == 0
            && (current.sa_sigaction == libc::SIG_IGN
                || current.sa_sigaction == libc::SIG_DFL
                    && current.sa_flags & libc::SA_NOCLDWAIT != 0)
        {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGCHLD, &default, std::ptr::null_mut());
        }
    }
}

/// Whether `error` (or what it wraps) is a [`DaemonShort`].
pub(crate) fn is_daemon_short(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DaemonShort>().is_some())
}

/// Marks an error of the daemon's own side as [`DaemonShort`] when its errno
/// says a resource ran out: EMFILE/ENFILE (descriptors), EAGAIN (processes),
/// ENOMEM (memory), ENOSPC (the user's epoll watches, registering a pipe
/// with the runtime).
pub(super) fn mark_shortage(error: io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOSPC) => {
            io::Error::new(error.kind(), DaemonShort(error))
        }
        _ => error,
    }
}

/// Everything the child needs, decided before it exists.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recipe {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    /// Variables added to the spawner's base environment (or replacing
    /// one of the same name).
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) workdir: PathBuf,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    /// The supplementary groups a root daemon gives the process with
    /// `uid` (its user's, as a login does); none without.
    pub(crate) groups: Vec<u32>,
    pub(crate) limits: ChildLimits,
    /// The bytes the task reads on stdin (its options), then end of file.
    pub(crate) stdin: Vec<u8>,
    /// Instead of `stdin`: this descriptor (a preloaded parent's socket).
    pub(crate) stdin_fd: Option<Arc<OwnedFd>>,
    /// Run as a child of the program's preloaded parent (preload.rs).
    pub(crate) preload: bool,
    /// The try's cgroup, which the child joins first (cgroup.rs).
    pub(crate) cgroup: Option<Arc<super::cgroup::TryCgroup>>,
    /// No parent-death signal: the process outlives the daemon (the
    /// fencing watchdog alone, which kills the daemon's tries when it
    /// dies; watchdog.rs).
    pub(crate) outlives_the_daemon: bool,
    /// Its own session (`setsid`) instead of its own process group: a
    /// preloaded parent, whose children (made with `CLONE_PARENT`, the
    /// daemon's own) then carry its pid as their session's, even as
    /// zombies (preload.rs, [`super::preload`]'s search for orphans).
    pub(crate) leads_a_session: bool,
    /// A try's stop (a cancel, a lost claim, a shutdown's end): its start
    /// is not made once this says stop, nor once the daemon is past its
    /// fence ([`Recipe::withdrawn`]). `None`: not a try's.
    pub(crate) stop: Option<tokio::sync::watch::Receiver<Option<super::StopReason>>>,
}

impl Recipe {
    /// Why a try's start is not to be made now, if it is not: its stop
    /// said so (read at once, on whichever thread: a lost claim's stop is
    /// set before the fence moves on, where the try's own task, which
    /// withdraws its armed start, runs later), or the daemon is past its
    /// fence ([`super::fence::past_the_fence`]).
    pub(crate) fn withdrawn(&self) -> Option<super::StopReason> {
        let stop = self.stop.as_ref()?;
        // The fence first: the heartbeat tells the tries of lost claims,
        // then moves the fence; read the other way round, a stop read
        // before it was set and a fence read after it moved let a lost
        // try start.
        let fenced = super::fence::past_the_fence();
        let said = *stop.borrow();
        said.or(fenced.then_some(super::StopReason::LostClaim))
    }
}

/// Limits set in the child before exec (see limits.rs for what each means).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ChildLimits {
    pub(crate) address_space: Option<u64>,
    pub(crate) cpu_seconds: Option<u64>,
    pub(crate) processes: Option<u64>,
    pub(crate) nice: Option<i32>,
    /// `RLIMIT_NOFILE` (soft, hard): the one the daemon was started with.
    pub(crate) open_files: Option<(u64, u64)>,
    /// Written to `/proc/self/oom_score_adj` (see isolation.rs).
    pub(crate) oom_score_adj: Option<i32>,
}

/// A started task process: its pid, its pipes, and a pidfd to wait on.
pub(crate) struct Child {
    pub(crate) pid: u32,
    /// Set only when the options did not all fit in the pipe before the
    /// start: the pipe, and the bytes still to write to it.
    pub(crate) stdin: Option<(pipe::Sender, Vec<u8>)>,
    /// Our ends of the output pipes, non-blocking, not yet watched by the runtime.
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    /// When the start left the daemon's runtime and when the process
    /// existed (see [`super::StartTimes`]).
    pub(super) handed_off: std::time::SystemTime,
    pub(super) created: std::time::SystemTime,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    /// The CPU time it used (user and system), once reaped: its own when it
    /// was killed by `SIGKILL` (what RLIMIT_CPU counts, read before the
    /// reap), else with its waited-for children's (`wait4`'s).
    cpu_time: Option<std::time::Duration>,
}

impl Child {
    /// Whether `pid` is a child the daemon supervises (a try's, or a
    /// preloaded parent's).
    pub(super) fn is_supervised(pid: u32) -> bool {
        supervised().contains(&pid)
    }

    /// Takes charge of `pid`, a child of the daemon that `parent` (a
    /// preloaded parent, with `CLONE_PARENT`) created, with our ends of its
    /// pipes. Fails with `InvalidData` when `pid` is not a new child of the
    /// daemon: one supervised already (another try's, the parent itself)
    /// is left alone; one that is not the daemon's child is killed only if
    /// it is `parent`'s (a plain fork, which would run unsupervised), so
    /// that a parent naming any other process (a bug, or a program bent on
    /// it) gets the daemon to signal nothing.
    pub(super) fn adopt(pid: u32, parent: u32, ours: OurEnds) -> io::Result<Child> {
        if supervised().contains(&pid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("pid {pid} is not a new child: the daemon supervises it already"),
            ));
        }
        // Nothing else reaps our children, so if it is our child its pid
        // cannot have been reused.
        let pidfd = match pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            // Out of descriptors (or memory): the daemon's shortage, and
            // the try given back. Its child must not run unsupervised: if a
            // wait finds it ours (so its pid is not reused), it is killed
            // and reaped.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                ) =>
            {
                kill_unsupervised_child(pid);
                return Err(mark_shortage(error));
            }
            Err(error) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the child it named (pid {pid}) cannot be found: {error}"),
                ))
            }
        };
        if child_state(&pidfd).is_none() {
            // The parent's plain fork would run unsupervised: killed,
            // through its pidfd (the very process checked). Any other
            // process is not the daemon's to signal.
            if crate::procinfo::parent_and_group(i64::from(pid))
                .is_some_and(|(ppid, _)| ppid == i64::from(parent))
            {
                // SAFETY: a signal through a pidfd we own.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0 as libc::c_uint,
                    )
                };
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("pid {pid} is not the daemon's child (create it with clone(CLONE_PARENT))"),
            ));
        }
        Child::supervise(Started {
            pid,
            handed_off: std::time::SystemTime::UNIX_EPOCH,
            created: std::time::SystemTime::UNIX_EPOCH,
            pidfd,
            stdin: ours.stdin,
            stdout: ours.stdout,
            stderr: ours.stderr,
        })
    }

    /// Whether the process was reaped (its pid may be another's since).
    pub(crate) fn reaped(&self) -> bool {
        self.status.is_some()
    }

    /// The CPU time the process used, once [`wait`](Child::wait) reaped it.
    pub(crate) fn cpu_time(&self) -> Option<std::time::Duration> {
        self.cpu_time
    }

    /// Waits for the process to exit and reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.wait_then_reap(false).await
    }

    /// Whether it has exited (and waits to be reaped): a stop that comes
    /// now comes too late to change how it ended.
    pub(crate) fn has_exited(&self) -> bool {
        self.status.is_some() || child_state(self.pidfd.get_ref()) == Some(true)
    }

    /// Waits for the process, a try's, to exit; kills what is left in its
    /// process group (the try's leftovers) while the exited process still
    /// holds the group's number; then reaps it. Once reaped, its pid, and
    /// with it the number of a group that has no member left, may go to a
    /// new process: a `killpg` by that number after the reap could kill
    /// another program's group.
    pub(crate) async fn wait_ending_its_group(&mut self) -> io::Result<ExitStatus> {
        self.wait_then_reap(true).await
    }

    async fn wait_then_reap(&mut self, end_group: bool) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        loop {
            let mut ready = self.pidfd.readable().await?;
            let ended = child_ended(self.pidfd.get_ref());
            if end_group && ended.is_some() {
                // SAFETY: a signal to the group of our exited, unreaped
                // child: its pid holds the number, so the group (if it has
                // one of that number) is the one it made.
                unsafe { libc::killpg(self.pid as libc::pid_t, libc::SIGKILL) };
            }
            // A SIGKILL may be RLIMIT_CPU's, past its hard limit, which
            // counts the process's own time: `wait4`'s counts the children
            // it waited for too, and a task killed by another hand after
            // its children used that much was taken for one past its
            // `cpu_limit`. Read while it is unreaped.
            let own_cpu = (ended == Some(Some(libc::SIGKILL)))
                .then(|| crate::procinfo::own_cpu_time(self.pid as i64))
                .flatten();
            let mut raw = 0;
            // SAFETY: wait4 on our own child, writing into locals.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let reaped = unsafe {
                libc::wait4(self.pid as libc::pid_t, &mut raw, libc::WNOHANG, &mut usage)
            };
            if reaped == self.pid as libc::pid_t {
                supervised().remove(&self.pid);
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                let time = |t: libc::timeval| {
                    std::time::Duration::new(t.tv_sec.max(0) as u64, t.tv_usec.max(0) as u32 * 1000)
                };
                self.cpu_time = own_cpu.or(Some(time(usage.ru_utime) + time(usage.ru_stime)));
                return Ok(status);
            }
            if reaped < 0 {
                return Err(io::Error::last_os_error());
            }
            ready.clear_ready();
        }
    }
}

impl Drop for Child {
    /// Nothing of a child dropped unreaped (a start no try waits for any
    /// more) runs on, and no zombie stays: it is killed with the process
    /// group it leads (what its task started; before, only its pid), and
    /// reaped once it has exited, by a task on the runtime when there is
    /// one: no thread waits (a process in uninterruptible sleep may take
    /// long to die), and nothing here can fail for want of a thread. It
    /// stays among the supervised until then, so that the search for a
    /// dead parent's orphans does not take it.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.pid;
        kill_with_its_group(pid);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(reap_when_ended(pid))),
            Err(_) => {
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut 0, 0) };
                supervised().remove(&pid);
            }
        }
    }
}

/// Reaps `pid`, our killed child, once it has exited.
async fn reap_when_ended(pid: u32) {
    // Unreaped, its pid is still its own: the pidfd names it.
    if let Ok(pidfd) = pidfd_open(pid) {
        // SAFETY: the OwnedFd stays open, on the same pidfd, for as long
        // as the AsyncFd owns it.
        let watched =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
        if let Ok(pidfd) = watched {
            let _ = pidfd.readable().await;
        }
    }
    // SAFETY: a waitpid on our own child that does not block.
    while unsafe { libc::waitpid(pid as libc::pid_t, &mut 0, libc::WNOHANG) } == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    supervised().remove(&pid);
}

/// Our ends of a try's pipes.
pub(super) struct OurEnds {
    stdin: Option<StdinRest>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl OurEnds {
    /// The inodes of the try's output pipes (both ends of a pipe have the
    /// same): only the try's process, and what it starts, holds the other
    /// ends, so a process holding one of them is running this try.
    pub(super) fn output_pipes(&self) -> Vec<u64> {
        [&self.stdout, &self.stderr]
            .into_iter()
            .filter_map(|fd| {
                let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
                // SAFETY: fstat of a descriptor we own, into a local.
                let done = unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) };
                // SAFETY: fstat filled it in when it returned 0.
                (done == 0).then(|| unsafe { stat.assume_init() }.st_ino)
            })
            .collect()
    }
}

/// A try's pipes made for a preloaded parent's child: the ends it gets
/// (stdin, stdout, stderr), and ours.
pub(super) struct PreloadStdio {
    pub(crate) child_ends: [OwnedFd; 3],
    pub(crate) ours: OurEnds,
}

/// How a preloaded parent's child gets into its try's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupJoin {
    /// It joins by itself: each join file's path in a `cgroup` field (a
    /// parent of the daemon's own user, which may open them).
    Paths,
    /// The daemon moves it when it gets its pid: a parent of another user
    /// (`user:`), whose child could not open the files (root's) and would
    /// exit 127. Not the daemon's descriptors of the files either: opened
    /// by root, they would let the program move any process into the
    /// try's cgroup (the kernel checks the opener's credentials), to be
    /// killed at the try's end.
    Left,
}

/// The descriptors and pid a start hands back to the async side.
pub(super) struct Started {
    pid: u32,
    /// When a spawner thread took the request, and when `clone` returned.
    handed_off: std::time::SystemTime,
    created: std::time::SystemTime,
    pidfd: OwnedFd,
    stdin: Option<StdinRest>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Started {
    /// Kills the process's group and reaps it.
    pub(super) fn kill_and_reap(self) {
        // SAFETY: signalling our own child's group and reaping the child.
        unsafe {
            libc::killpg(self.pid as libc::pid_t, libc::SIGKILL);
            let mut raw = 0;
            libc::waitpid(self.pid as libc::pid_t, &mut raw, 0);
        }
    }
}

/// Our end of a stdin pipe and the bytes still to write to it.
type StdinRest = (OwnedFd, Vec<u8>);

/// The line of tries waiting for slots (slots.rs), as the spawner threads
/// see it: where the slot of a watched process goes when it exits, and
/// where a start made for a slot is delivered. (A trait, so that the line
/// can name the threads that serve it, and not the other way round.)
pub(super) trait Line: Send + Sync {
    /// The slot `place` holds is free (its process exited): it goes to the
    /// next try in line; returns that try's start to make, if it is armed.
    fn slot_freed(self: Arc<Self>, place: u64) -> Option<Handover>;
    /// Gives `place` the start made for it; gives the start back when
    /// nobody will take it (its try is gone).
    fn deliver_start(
        &self,
        place: u64,
        started: io::Result<Started>,
    ) -> Result<(), io::Result<Started>>;
}

/// A start to make for a try a slot was just handed to.
pub(super) struct Handover {
    pub(super) line: Arc<dyn Line>,
    pub(super) place: u64,
    pub(super) recipe: Box<Recipe>,
}

/// What a spawner thread is asked to do.
enum Job {
    /// Start a process and answer with it.
    Spawn(Box<Recipe>, oneshot::Sender<io::Result<Started>>),
    /// Start the try a slot was handed to, and deliver it to its place.
    HandOver(Handover),
}

/// What every start needs besides its recipe, made once.
struct Kit {
    base: Vec<BaseVariable>,
    /// The stdin of a task whose options are empty.
    null: OwnedFd,
    /// One stack for every child this thread starts: they start one at a
    /// time, and each is done with it once the thread resumes.
    stack: Vec<u8>,
}

impl Kit {
    fn new(base: Vec<(OsString, OsString)>) -> io::Result<Kit> {
        let base = base
            .into_iter()
            .map(|(name, value)| {
                let entry = c_string(&[name.as_bytes(), b"=", value.as_bytes()].concat())?;
                Ok(BaseVariable { name, value, entry })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Kit {
            base,
            null: OwnedFd::from(std::fs::File::open("/dev/null")?),
            stack: vec![0u8; CHILD_STACK],
        })
    }

    fn start(&mut self, recipe: &Recipe) -> io::Result<Started> {
        // Checked here, on the spawner thread, where a start handed over at
        // a slot's end happens without the runtime: a daemon stopped (or
        // its runtime stuck) past its fence started the tries it had
        // claimed ahead as soon as it resumed, before its heartbeat could
        // find their rows taken over, and ran them beside their reruns;
        // and after the heartbeat had, before their tasks withdrew them.
        let losses = super::fence::claims_lost_count();
        if let Some(stopped) = recipe.withdrawn() {
            return Err(super::not_made(stopped));
        }
        let handed_off = std::time::SystemTime::now();
        let mut started = start(recipe, losses, &self.base, &self.null, &mut self.stack)
            .map_err(mark_shortage)?;
        started.handed_off = handed_off;
        Ok(started)
    }
}

/// Spawner threads: at least this many, so that one start never waits for another.
const MIN_THREADS: usize = 2;
/// At most this many: a thread starts several thousand processes a second.
const MAX_THREADS: usize = 8;

/// Starts task processes with clone and exec, from threads that live as
/// long as the process; cheap to clone. (A preloaded parent's children are
/// started by the supervisor's `Spawner`, which holds both.)
#[derive(Clone)]
pub(super) struct Exec {
    pool: Arc<Pool>,
    /// The base environment (what `Kit` holds, for preloaded tries).
    base: Arc<Vec<(OsString, OsString)>>,
}

/// What the spawner threads share. They all wait in `epoll` for either of:
/// a start request (`jobs_ready`, an eventfd in semaphore mode counting
/// `jobs`: each read takes one), or the exit of a process watched for its
/// slot (a pidfd, registered one-shot under the key of its entry in `watched`).
struct Pool {
    epoll: OwnedFd,
    jobs_ready: OwnedFd,
    jobs: Mutex<VecDeque<Job>>,
    watched: Mutex<HashMap<u64, Watched>>,
    next_key: AtomicU64,
}

/// A running process whose exit frees a slot.
struct Watched {
    /// A pidfd of our own (not a `dup` of the runtime's: closing it must
    /// take it out of the epoll, which a shared open file would not).
    pidfd: OwnedFd,
    line: Arc<dyn Line>,
    place: u64,
}

/// The epoll key of `jobs_ready`; watched processes get keys from 1.
const JOBS: u64 = 0;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pidfd for the process `pid`. It names that process for good, but the
/// pid may have been reused before the call unless the process is the
/// daemon's child and not reaped yet.
pub(super) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int)
}

/// The pids of the daemon's children a [`Child`] supervises now (tries and
/// preloaded parents): a preloaded parent's answer naming one of them is
/// not a new child.
fn supervised() -> std::sync::MutexGuard<'static, std::collections::HashSet<u32>> {
    static SUPERVISED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<u32>>> =
        std::sync::OnceLock::new();
    SUPERVISED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Kills and reaps `pid`, and the process group it leads, if it is a child
/// of the daemon that no try supervises (a preloaded parent's child whose
/// answer was refused): nothing of it runs on unsupervised. Unreaped, its
/// pid and group are still its own.
pub(super) fn kill_unsupervised_child(pid: u32) {
    if supervised().contains(&pid) || !is_own_child(pid) {
        return;
    }
    kill_with_its_group(pid);
    // SAFETY: reaping our own unreaped child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut 0, 0) };
}

/// Sends `SIGKILL` to `pid`, our unreaped child, and to the process group
/// it leads if it leads one: unreaped, its pid and that group's number are
/// still its own.
fn kill_with_its_group(pid: u32) {
    let leads_its_group = crate::procinfo::parent_and_group(i64::from(pid))
        .is_some_and(|(_, group)| group == i64::from(pid));
    // SAFETY: signals to our own unreaped child and the group it leads.
    unsafe {
        if leads_its_group {
            libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
        }
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Whether `pid` is the daemon's child, not yet reaped (so that the pid
/// cannot have been reused); needs no descriptor. Reaps nothing.
fn is_own_child(pid: u32) -> bool {
    // SAFETY: a waitid that reaps nothing (WNOWAIT), into a local.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// Whether the process of `pidfd` is the daemon's child (`None`: it is
/// not, so it cannot be waited for) and, if it is, whether it has exited.
/// Reaps nothing.
pub(super) fn child_state(pidfd: &OwnedFd) -> Option<bool> {
    peek(pidfd).map(|info| info.is_some())
}

/// Whether our child has ended, without reaping it: `None` while it runs
/// (or when it cannot be waited for), else the signal that killed it
/// (`None` for an exit).
fn child_ended(pidfd: &OwnedFd) -> Option<Option<libc::c_int>> {
    let info = peek(pidfd).flatten()?;
    let killed = matches!(info.si_code, libc::CLD_KILLED | libc::CLD_DUMPED);
    // SAFETY: the status of an ended child, as the kernel filled it.
    Some(killed.then(|| unsafe { info.si_status() }))
}

/// `waitid(WNOWAIT)` on the process of `pidfd`: `None` when it is not our
/// child, `Some(None)` while it runs, else how it ended. Reaps nothing.
fn peek(pidfd: &OwnedFd) -> Option<Option<libc::siginfo_t>> {
    // SAFETY: a waitid that reaps nothing (WNOWAIT), into a local.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let ours = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0;
        ours.then(|| (info.si_pid() != 0).then_some(info))
    }
}

/// A new descriptor from a system call's return value.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Pool {
    fn new() -> io::Result<Pool> {
        // SAFETY: plain system calls creating descriptors.
        let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let jobs_ready = owned(unsafe {
            libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE,
            )
        })?;
        let pool = Pool {
            epoll,
            jobs_ready,
            jobs: Mutex::default(),
            watched: Mutex::default(),
            next_key: AtomicU64::new(JOBS + 1),
        };
        pool.add(pool.jobs_ready.as_raw_fd(), JOBS, libc::EPOLLIN as u32)?;
        Ok(pool)
    }

    fn add(&self, fd: libc::c_int, key: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: key };
        // SAFETY: registers a descriptor we hold with our epoll.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Queues a job for the first free spawner thread.
    fn submit(&self, job: Job) {
        lock(&self.jobs).push_back(job);
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd (it fails only at a count
        // near 2^64).
        unsafe { libc::write(self.jobs_ready.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// A spawner thread's life: one event at a time, so that the other
    /// threads take the next ones meanwhile.
    fn serve(&self, kit: &mut Kit) -> ! {
        loop {
            let mut event = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: waits on our epoll, writing one event into a local.
            let count = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, -1) };
            if count != 1 {
                continue; // EINTR
            }
            let key = event.u64;
            if key == JOBS {
                let mut taken: u64 = 0;
                // SAFETY: an 8-byte read from our non-blocking eventfd; it
                // fails when another thread took the last job first.
                let read = unsafe {
                    libc::read(
                        self.jobs_ready.as_raw_fd(),
                        (&mut taken as *mut u64).cast(),
                        8,
                    )
                };
                if read != 8 {
                    continue;
                }
                let job = lock(&self.jobs).pop_front();
                match job {
                    Some(Job::Spawn(recipe, reply)) => {
                        if let Err(Ok(started)) = reply.send(kit.start(&recipe)) {
                            // Nobody waits for it any more (the try was dropped
                            // while it started): it must not run unsupervised.
                            started.kill_and_reap();
                        }
                    }
                    Some(Job::HandOver(handover)) => self.hand_over(kit, handover),
                    None => {}
                }
                continue;
            }
            let watched = lock(&self.watched).remove(&key);
            if let Some(watched) = watched {
                // The process exited. Nothing it left in its group may run
                // beside the next try.
                kill_group(&watched.pidfd);
                drop(watched.pidfd);
                if let Some(handover) = watched.line.slot_freed(watched.place) {
                    self.hand_over(kit, handover);
                }
            }
        }
    }

    /// Starts the try a slot was handed to, on this thread, and delivers it;
    /// one nobody takes any more is killed, reaped, and its slot handed on.
    fn hand_over(&self, kit: &mut Kit, mut handover: Handover) {
        loop {
            let started = kit.start(&handover.recipe);
            if let Ok(started) = &started {
                self.watch(started.pid, &handover.line, handover.place);
            }
            let Handover { line, place, .. } = handover;
            let Err(undelivered) = line.deliver_start(place, started) else {
                return;
            };
            if let Ok(started) = undelivered {
                started.kill_and_reap();
            }
            match line.slot_freed(place) {
                Some(next) => handover = next,
                None => return,
            }
        }
    }

    /// Watches `pid`, our unreaped child holding `place`'s slot, for its
    /// exit. Best effort: unwatched, its slot is released by the runtime
    /// once it has reaped it.
    fn watch(&self, pid: u32, line: &Arc<dyn Line>, place: u64) {
        // Our own child, not yet reaped (the runtime has not got it yet),
        // so its pid cannot have been reused.
        let Ok(pidfd) = pidfd_open(pid) else {
            return;
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let fd = pidfd.as_raw_fd();
        // In the map before the epoll, which may report the exit at once.
        lock(&self.watched).insert(
            key,
            Watched {
                pidfd,
                line: line.clone(),
                place,
            },
        );
        if self
            .add(fd, key, (libc::EPOLLIN | libc::EPOLLONESHOT) as u32)
            .is_err()
        {
            lock(&self.watched).remove(&key);
        }
    }
}

/// Kills the group of an exited process through its pidfd (Linux 6.9:
/// `PIDFD_SIGNAL_PROCESS_GROUP`), which names that process and no other even
/// once it is reaped and its pid reused. On an older kernel it is skipped:
/// the runtime kills the group by number as it sees the exit, before the
/// reap, while the exited process holds the number
/// ([`Child::wait_ending_its_group`]).
fn kill_group(pidfd: &OwnedFd) {
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(error) = kill_through(pidfd, true) {
        if error.raw_os_error() == Some(libc::EINVAL) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
    }
}

/// `SIGKILL` through `pidfd`, to the process's group if `group` (Linux 6.9
/// and later: `EINVAL` before).
pub(super) fn kill_through(pidfd: &OwnedFd, group: bool) -> io::Result<()> {
    const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;
    let flags = if group { PIDFD_SIGNAL_PROCESS_GROUP } else { 0 };
    // SAFETY: a signal through a pidfd we own, with no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    match sent {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

impl Exec {
    /// Every task's environment is `base` plus its recipe's `env`. Starts
    /// the spawner threads (one per CPU, within [`MIN_THREADS`] and
    /// [`MAX_THREADS`]).
    pub(super) fn start(base: Vec<(OsString, OsString)>) -> io::Result<Exec> {
        let threads = std::thread::available_parallelism()
            .map_or(MIN_THREADS, |n| n.get())
            .clamp(MIN_THREADS, MAX_THREADS);
        let pool = Arc::new(Pool::new()?);
        for index in 0..threads {
            let mut kit = Kit::new(base.clone())?;
            let pool = pool.clone();
            // A thread never ends: children it started may still run, and
            // they get SIGKILL when it ends (their parent-death signal).
            std::thread::Builder::new()
                .name(format!("taskrunner-spawner-{index}"))
                .spawn(move || pool.serve(&mut kit))?;
        }
        Ok(Exec {
            pool,
            base: Arc::new(base),
        })
    }

    /// Makes a start a slot was handed to on a spawner thread.
    pub(super) fn hand_over(&self, handover: Handover) {
        self.pool.submit(Job::HandOver(handover));
    }

    /// The path `recipe`'s program is run from.
    pub(super) fn resolve_program(&self, recipe: &Recipe) -> io::Result<PathBuf> {
        let base: Vec<BaseVariable> = self
            .base
            .iter()
            .filter(|(name, _)| name == "PATH")
            .map(|(name, value)| BaseVariable {
                name: name.clone(),
                value: value.clone(),
                entry: CString::default(),
            })
            .collect();
        resolve_program(recipe, &base)
    }

    /// A preloaded parent's request for `recipe` (see the README's
    /// "Preload protocol"), and the try's pipes; the try's cgroup as
    /// `joining` says.
    pub(super) fn preload_request(
        &self,
        recipe: &Recipe,
        joining: CgroupJoin,
    ) -> io::Result<(Vec<u8>, PreloadStdio)> {
        let mut message = Vec::new();
        let mut field = |name: &[u8], value: &[u8]| -> io::Result<()> {
            if value.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in the environment or the working directory",
                ));
            }
            message.extend_from_slice(name);
            message.push(0);
            message.extend_from_slice(value);
            message.push(0);
            Ok(())
        };
        field(b"daemon_pid", std::process::id().to_string().as_bytes())?;
        field(b"workdir", recipe.workdir.as_os_str().as_bytes())?;
        let replaced = |name: &OsStr| recipe.env.iter().any(|(added, _)| added == name);
        for (name, value) in self
            .base
            .iter()
            .filter(|(name, _)| !replaced(name))
            .chain(recipe.env.iter())
        {
            field(b"env", &[name.as_bytes(), b"=", value.as_bytes()].concat())?;
        }
        let limits = recipe.limits;
        for (name, value) in [
            (&b"rlimit_as"[..], limits.address_space),
            (b"rlimit_cpu", limits.cpu_seconds),
            (b"rlimit_nproc", limits.processes),
        ] {
            if let Some(value) = value {
                field(name, value.to_string().as_bytes())?;
            }
        }
        if let Some(nice) = limits.nice {
            field(b"nice", nice.to_string().as_bytes())?;
        }
        if joining == CgroupJoin::Paths {
            for procs in recipe.cgroup.iter().flat_map(|cgroup| cgroup.procs_paths()) {
                field(b"cgroup", procs.as_os_str().as_bytes())?;
            }
        }
        // Out of descriptors here is the daemon's shortage, as in `start`.
        let (stdin_child, stdin_ours) = if recipe.stdin.is_empty() {
            let null = std::fs::File::open("/dev/null").map_err(mark_shortage)?;
            (OwnedFd::from(null), None)
        } else {
            stdin_pipe(&recipe.stdin).map_err(mark_shortage)?
        };
        let (stdout_ours, stdout_child) = pipe_pair().map_err(mark_shortage)?;
        let (stderr_ours, stderr_child) = pipe_pair().map_err(mark_shortage)?;
        Ok((
            message,
            PreloadStdio {
                child_ends: [stdin_child, stdout_child, stderr_child],
                ours: OurEnds {
                    stdin: stdin_ours,
                    stdout: stdout_ours,
                    stderr: stderr_ours,
                },
            },
        ))
    }

    /// Starts a process from `recipe` with clone and exec, on a spawner thread.
    pub(super) async fn spawn(&self, recipe: Recipe) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        self.pool.submit(Job::Spawn(Box::new(recipe), reply));
        let started = answer
            .await
            .map_err(|_| io::Error::other("a spawner thread dropped a request"))??;
        Child::supervise(started)
    }
}

impl Child {
    /// Wraps a started process, watched through its pidfd.
    pub(super) fn supervise(started: Started) -> io::Result<Child> {
        let pid = started.pid;
        // From here on the Child owns the process: an error below kills and reaps it.
        // SAFETY: an OwnedFd stays open, on the same pidfd, for as long as
        // the AsyncFd owns it.
        let pidfd = unsafe {
            AsyncFd::register_with_interest(started.pidfd, tokio::io::Interest::READABLE)
        };
        let pidfd = match pidfd.map_err(|e| mark_shortage(io::Error::from(e))) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                // SAFETY: signalling and reaping our own child.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    let mut raw = 0;
                    libc::waitpid(pid as libc::pid_t, &mut raw, 0);
                }
                return Err(error);
            }
        };
        supervised().insert(pid);
        let mut child = Child {
            pid,
            stdin: None,
            stdout: None,
            stderr: None,
            handed_off: started.handed_off,
            created: started.created,
            pidfd,
            status: None,
            cpu_time: None,
        };
        // Our ends, known to be pipes of the right direction: the unchecked
        // constructors skip tokio's fstat and flag reads.
        if let Some((stdin, rest)) = started.stdin {
            let stdin = pipe::Sender::from_owned_fd_unchecked(stdin).map_err(mark_shortage)?;
            child.stdin = Some((stdin, rest));
        }
        child.stdout = Some(nonblocking(started.stdout).map_err(mark_shortage)?);
        child.stderr = Some(nonblocking(started.stderr).map_err(mark_shortage)?);
        Ok(child)
    }
}

/// Makes our end of a pipe non-blocking. One call: a pipe end has no other
/// status flag that `F_SETFL` would clear (its access mode is not changed).
fn nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The task's stdin when its options are not empty: a pipe holding them. As
/// much as fits is written now, before the task exists, so that a task with
/// small options needs no writer at all. Returns the task's end, and our end
/// with the bytes left only when some are.
fn stdin_pipe(options: &[u8]) -> io::Result<(OwnedFd, Option<StdinRest>)> {
    let (child_end, ours) = pipe_pair()?;
    let ours = nonblocking(ours)?;
    let mut written = 0;
    while written < options.len() {
        let rest = &options[written..];
        // SAFETY: write from a live slice to a descriptor we own.
        let count = unsafe { libc::write(ours.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if count < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => return Err(error),
            }
        }
        written += count as usize;
    }
    let ours = (written < options.len()).then(|| (ours, options[written..].to_vec()));
    Ok((child_end, ours))
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub(super) fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in an argument or the environment",
        )
    })
}

/// A variable of the base environment, with its `NAME=value` C string made once.
struct BaseVariable {
    name: OsString,
    value: OsString,
    entry: CString,
}

/// A bare program name is looked up in the task's `PATH`, here in the parent.
fn resolve_program(recipe: &Recipe, base: &[BaseVariable]) -> io::Result<PathBuf> {
    let program = &recipe.program;
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(recipe.workdir.join(program));
    }
    let path = recipe
        .env
        .iter()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value)
        .or_else(|| base.iter().find(|v| v.name == "PATH").map(|v| &v.value))
        .cloned()
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = recipe.workdir.join(dir).join(program);
        let bytes = c_string(candidate.as_os_str().as_bytes())?;
        // SAFETY: access reads a NUL-terminated path.
        if unsafe { libc::access(bytes.as_ptr(), libc::X_OK) } == 0 && !candidate.is_dir() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "No such file or directory (searched PATH)",
    ))
}

/// What the child reads; every pointer stays valid until the clone returns.
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    workdir: *const libc::c_char,
    stdio: [libc::c_int; 3],
    /// Where a failing child leaves the step and errno (shared memory: the
    /// parent reads it once the clone returns).
    failure: *mut [libc::c_int; 2],
    daemon_pid: libc::pid_t,
    /// Set the parent-death signal (see [`Recipe::outlives_the_daemon`]).
    dies_with_the_daemon: bool,
    /// `setsid` instead of `setpgid` (see [`Recipe::leads_a_session`]).
    leads_a_session: bool,
    /// A try's: withdrawn if the daemon is past its fence, or lost claims
    /// since `losses` (see [`Recipe::withdrawn`]), checked last before the
    /// exec.
    fenced: bool,
    losses: u64,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    /// The supplementary groups, set by a root daemon (see [`Recipe::groups`]).
    groups: *const libc::gid_t,
    groups_len: usize,
    limits: ChildLimits,
    /// `cgroup.procs` of the try's cgroup in each hierarchy (-1: none).
    cgroup_procs: [libc::c_int; super::cgroup::MAX_HIERARCHIES],
}

/// The step at which a try's child found the daemon past its fence
/// (not in [`STEPS`]: its start is withdrawn, not failed).
const FENCED: usize = 9;

/// Steps of the child's set-up, reported with the errno when one fails.
const STEPS: [&str; 9] = [
    "setting up stdio",
    "entering the working directory",
    "changing user or group",
    "setting the parent-death signal",
    "checking the daemon is alive",
    "setting resource limits",
    "setting the nice value",
    "executing",
    "joining the try's cgroup",
];

/// Whether the child's set-up failing at `step` (of [`STEPS`]) with
/// `errno` is the daemon's shortage, not the task's: the try is then given
/// back uncounted. A cgroup that cannot be joined; descriptors run out
/// while stdio is set up in the copy of the daemon's table; the machine's
/// file table full (ENFILE); kernel memory (ENOMEM), unless the try has a
/// memory limit of its own (`memory_limit` as RLIMIT_AS, or its cgroup,
/// joined first), which may be why, and a try given back each time would
/// never end.
/// (Before, only the first two were; the errno of the others was lost in
/// their text.)
fn child_step_is_a_shortage(step: usize, errno: libc::c_int, memory_limited: bool) -> bool {
    const CGROUP: usize = 8;
    const STDIO: usize = 0;
    match errno {
        _ if step == CGROUP => true,
        libc::ENFILE => true,
        libc::EMFILE => step == STDIO,
        libc::ENOMEM => !memory_limited,
        _ => false,
    }
}

/// The child's stack between clone and exec.
const CHILD_STACK: usize = 256 * 1024;

/// Starts one process (on the thread that starts them all). `losses`:
/// how many claims were lost when the start was checked (a try's child
/// checks again, [`super::fence::claims_lost_since`]).
fn start(
    recipe: &Recipe,
    losses: u64,
    base: &[BaseVariable],
    null: &OwnedFd,
    stack: &mut [u8],
) -> io::Result<Started> {
    let program = resolve_program(recipe, base)?;
    let program_c = c_string(program.as_os_str().as_bytes())?;
    let mut argv_c = vec![c_string(recipe.program.as_os_str().as_bytes())?];
    for arg in &recipe.args {
        argv_c.push(c_string(arg.as_bytes())?);
    }
    let mut envp_c = Vec::with_capacity(recipe.env.len());
    for (name, value) in &recipe.env {
        let mut entry = name.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        envp_c.push(c_string(&entry)?);
    }
    let workdir_c = c_string(recipe.workdir.as_os_str().as_bytes())?;
    let argv: Vec<*const libc::c_char> = argv_c
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let replaced = |name: &OsStr| recipe.env.iter().any(|(added, _)| added == name);
    let envp: Vec<*const libc::c_char> = base
        .iter()
        .filter(|variable| !replaced(&variable.name))
        .map(|variable| variable.entry.as_ptr())
        .chain(envp_c.iter().map(|e| e.as_ptr()))
        .chain([std::ptr::null()])
        .collect();

    let (stdin_child, stdin_parent) = if let Some(fd) = &recipe.stdin_fd {
        (Some(fd.try_clone()?), None)
    } else if recipe.stdin.is_empty() {
        (None, None)
    } else {
        let (child_end, ours) = stdin_pipe(&recipe.stdin)?;
        (Some(child_end), ours)
    };
    let (stdout_parent, stdout_child) = pipe_pair()?;
    let (stderr_parent, stderr_child) = pipe_pair()?;
    let mut failure: [libc::c_int; 2] = [-1, 0];
    let args = ChildArgs {
        program: program_c.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        workdir: workdir_c.as_ptr(),
        stdio: [
            stdin_child.as_ref().unwrap_or(null).as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        failure: &mut failure,
        daemon_pid: std::process::id() as libc::pid_t,
        dies_with_the_daemon: !recipe.outlives_the_daemon,
        leads_a_session: recipe.leads_a_session,
        fenced: recipe.stop.is_some(),
        losses,
        uid: recipe.uid,
        gid: recipe.gid,
        groups: recipe.groups.as_ptr(),
        groups_len: recipe.groups.len(),
        limits: recipe.limits,
        cgroup_procs: recipe
            .cgroup
            .as_ref()
            .map_or([-1; super::cgroup::MAX_HIERARCHIES], |cgroup| {
                cgroup.join_fds()
            }),
    };
    // SAFETY: the child runs `child_main` on its own stack with the daemon's
    // memory shared (CLONE_VM) while this thread is suspended (CLONE_VFORK)
    // until it execs or exits; `args` and everything it points to outlive
    // that. Every signal is blocked across the clone, so no handler of the
    // daemon runs in the child before the child resets them.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let top = stack.as_mut_ptr().add(stack.len());
        let top = (top as usize & !15) as *mut libc::c_void;
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        pid
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let created = std::time::SystemTime::now();
    drop((stdin_child, stdout_child, stderr_child));
    // The child has exec'd, or failed and left its step and errno in
    // `failure` before it exited (CLONE_VFORK: either has happened by now).
    // SAFETY: a local the child may have written through its pointer.
    let [step, errno] = unsafe { std::ptr::read_volatile(&failure) };
    if step >= 0 {
        let step = step as usize;
        // SAFETY: reaping the child that just failed.
        unsafe {
            let mut raw = 0;
            libc::waitpid(pid, &mut raw, 0);
        }
        if step == FENCED {
            return Err(super::not_made(super::StopReason::LostClaim));
        }
        let error = io::Error::from_raw_os_error(errno);
        let limited = recipe.limits.address_space.is_some() || recipe.cgroup.is_some();
        let text = format!(
            "{}: {error}",
            STEPS.get(step).copied().unwrap_or("starting")
        );
        return Err(match child_step_is_a_shortage(step, errno, limited) {
            true => DaemonShort::error(error.kind(), text),
            false => io::Error::new(error.kind(), text),
        });
    }
    // Our own child, not yet reaped.
    let pidfd = match pidfd_open(pid as u32) {
        Ok(pidfd) => pidfd,
        Err(error) => {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                let mut raw = 0;
                libc::waitpid(pid, &mut raw, 0);
            }
            return Err(error);
        }
    };
    Ok(Started {
        pid: pid as u32,
        handed_off: created,
        created,
        pidfd,
        stdin: stdin_parent,
        stdout: stdout_parent,
        stderr: stderr_parent,
    })
}

/// The child, between clone and exec. Only async-signal-safe system calls;
/// no allocation, no locks: it shares the daemon's memory.
extern "C" fn child_main(raw: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `raw` points to the parent's ChildArgs, alive until we exec.
    let args = unsafe { &*(raw as *const ChildArgs) };
    // SAFETY: plain system calls on values prepared by the parent.
    unsafe {
        let fail = |step: libc::c_int| -> libc::c_int {
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(args.failure, [step, errno]);
            libc::_exit(127)
        };
        // Handlers of the daemon must not run here, and a task ignores no
        // signal because the daemon's launcher did (an ignored signal stays
        // ignored across execve): back to the defaults (this child has its
        // own copy of the handler table).
        for signal in 1..65 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction != libc::SIG_DFL
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        // Into the try's cgroup first: its limits hold from here on, and
        // whatever it starts is found there at the end of the try.
        if !super::cgroup::join_in_child(&args.cgroup_procs) {
            return fail(8);
        }
        // Its own process group: a Ctrl-C at the terminal reaches only the
        // daemon, and stopping a task reaches everything it started. A
        // session makes one too.
        if args.leads_a_session {
            libc::setsid();
        } else {
            libc::setpgid(0, 0);
        }
        // Stdio: copy the pipe ends above 2 first, so that none is clobbered
        // whatever numbers they had, then onto 0, 1 and 2.
        let mut high = [0; 3];
        for (slot, fd) in args.stdio.iter().enumerate() {
            high[slot] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
            if high[slot] < 0 {
                return fail(0);
            }
        }
        for (target, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                return fail(0);
            }
        }
        if libc::chdir(args.workdir) != 0 {
            return fail(1);
        }
        // Before the credentials change: going back up from a lowered
        // value needs the daemon's privilege. Best effort.
        if let Some(adjust) = args.limits.oom_score_adj {
            write_oom_score_adj(adjust);
        }
        // Before it too: a nice value below the one inherited (the daemon
        // raised itself) needs the privilege the change drops. (After it,
        // `user: app` with `nice: -10` failed every try.)
        if let Some(nice) = args.limits.nice {
            if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return fail(6);
            }
        }
        // The system calls themselves, not the C library's wrappers: in a
        // process with threads those make every thread of the process
        // change too (glibc's set-id broadcast: a lock shared with the
        // daemon through CLONE_VM, and a signal to each of its threads),
        // which this child, sharing the daemon's memory, must not do.
        let limits = args.limits;
        let rlimits = [
            (libc::RLIMIT_AS, limits.address_space.map(|b| (b, b))),
            (libc::RLIMIT_CPU, limits.cpu_seconds.map(|s| (s, s + 1))),
            (libc::RLIMIT_NPROC, limits.processes.map(|n| (n, n))),
            (libc::RLIMIT_NOFILE, limits.open_files),
        ];
        if args.uid.is_some() || args.gid.is_some() {
            // Before it as well: a hard limit above the daemon's own (a
            // unit's `LimitCPU=`) can be raised only while the privilege
            // lasts (after it, `user: app` with such a `cpu_limit` failed
            // every try). Only the hard limit: the soft ones, which the
            // credentials change reads (`RLIMIT_NPROC`), are set below.
            if libc::geteuid() == 0 {
                for (resource, value) in rlimits {
                    let Some((_, hard)) = value else { continue };
                    let mut current: libc::rlimit = std::mem::zeroed();
                    if libc::getrlimit(resource, &mut current) == 0
                        && current.rlim_max < hard as libc::rlim_t
                    {
                        current.rlim_max = hard as libc::rlim_t;
                        // Any failure is the setrlimit's below.
                        libc::setrlimit(resource, &current);
                    }
                }
            }
            if libc::geteuid() == 0
                && libc::syscall(
                    libc::SYS_setgroups,
                    args.groups_len as libc::c_long,
                    args.groups,
                ) != 0
            {
                return fail(2);
            }
            if let Some(gid) = args.gid {
                if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                    return fail(2);
                }
            }
            if let Some(uid) = args.uid {
                if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                    return fail(2);
                }
            }
        }
        // Die with the daemon (with this thread, precisely), so that no task
        // runs unsupervised. Set after the credentials change, which clears it.
        if args.dies_with_the_daemon
            && libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
        {
            return fail(3);
        }
        // The daemon may have died before prctl (or before this process
        // outlives it on purpose: the watchdog, which checks again).
        if libc::getppid() != args.daemon_pid {
            *libc::__errno_location() = libc::ESRCH;
            return fail(4);
        }
        // File descriptors 0-2 only: every other one closes on exec.
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        for (resource, value) in rlimits {
            if let Some((soft, hard)) = value {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return fail(5);
                }
            }
        }
        let none: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Last, a try's: not past the daemon's fence, and no claim lost
        // since its spawner thread read its stop (atomics of the daemon's
        // memory, which this child shares, and the boot clock; a claim
        // lost meanwhile may be another try's, and this start is given
        // back all the same). A spawner thread stopped with the daemon
        // between its own check and the clone (a `SIGSTOP`) made the
        // process when the daemon resumed, seconds later, when another
        // daemon had run the row.
        if args.fenced
            && (super::fence::past_the_fence() || super::fence::claims_lost_since(args.losses))
        {
            *libc::__errno_location() = 0;
            return fail(FENCED as libc::c_int);
        }
        libc::execve(args.program, args.argv, args.envp);
        fail(7)
    }
}

/// Writes `value` to `/proc/self/oom_score_adj`, in the child: no
/// allocation, only open, write and close.
fn write_oom_score_adj(value: i32) {
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    // SAFETY: open, write and close on a constant path and a local buffer.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, digits[at..].as_ptr().cast(), digits.len() - at);
            libc::close(fd);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_childs_set_up_failing_for_the_machines_resources_is_the_daemons_shortage() {
        let (stdio, user, exec, cgroup) = (0, 2, 7, 8);
        assert!(child_step_is_a_shortage(cgroup, libc::EACCES, false));
        assert!(child_step_is_a_shortage(stdio, libc::EMFILE, false));
        assert!(child_step_is_a_shortage(exec, libc::ENFILE, true));
        assert!(child_step_is_a_shortage(user, libc::ENOMEM, false));
        assert!(child_step_is_a_shortage(exec, libc::ENOMEM, false));
        // The try's own limits may be why: its fault, counted.
        assert!(!child_step_is_a_shortage(exec, libc::ENOMEM, true));
        assert!(!child_step_is_a_shortage(user, libc::ENOMEM, true));
        assert!(!child_step_is_a_shortage(exec, libc::EMFILE, false));
        assert!(!child_step_is_a_shortage(exec, libc::EAGAIN, false));
        assert!(!child_step_is_a_shortage(exec, libc::ENOENT, false));
    }

    /// A recipe running `program` with `args` in `/` (also the slots' tests').
    pub(in crate::supervisor) fn recipe(program: &str, args: &[&str]) -> Recipe {
        Recipe {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            workdir: "/".into(),
            ..Recipe::default()
        }
    }

    #[tokio::test]
    async fn a_failed_set_up_names_its_step_and_errno() {
        let spawner = Exec::start(vec![]).unwrap();
        // Not executable: execve fails after every other step.
        let file = std::env::temp_dir().join(format!("not-executable-{}", std::process::id()));
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let error = spawner
            .spawn(recipe(file.to_str().unwrap(), &[]))
            .await
            .err()
            .expect("no start");
        std::fs::remove_file(&file).unwrap();
        assert!(error.to_string().starts_with("executing: "), "{error}");
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        let mut gone = recipe("/bin/true", &[]);
        gone.workdir = "/no/such/directory".into();
        let error = spawner.spawn(gone).await.err().expect("no start");
        assert!(
            error
                .to_string()
                .starts_with("entering the working directory: "),
            "{error}"
        );
    }

    /// Runs `recipe` to a successful end and returns its stdout.
    async fn stdout_of(spawner: &Exec, recipe: Recipe) -> String {
        let mut child = spawner.spawn(recipe).await.unwrap();
        let mut out = String::new();
        let mut stdout =
            pipe::Receiver::from_owned_fd_unchecked(child.stdout.take().unwrap()).unwrap();
        stdout.read_to_string(&mut out).await.unwrap();
        assert!(child.wait().await.unwrap().success());
        out
    }

    #[tokio::test]
    async fn options_and_environment_reach_the_child() {
        let spawner = Exec::start(vec![("KEPT".into(), "base".into())]).unwrap();
        let mut cat = recipe("cat", &[]);
        cat.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
        cat.stdin = b"options".to_vec();
        assert_eq!(stdout_of(&spawner, cat).await, "options");

        let mut env = recipe("/usr/bin/env", &[]);
        env.env = vec![("ADDED".into(), "1".into())];
        let out = stdout_of(&spawner, env).await;
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        assert_eq!(lines, ["ADDED=1", "KEPT=base"]);
    }
}
