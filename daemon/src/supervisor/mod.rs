//! The supervisor: one OS process per try. Spawns it (own process group,
//! limits, environment, options on stdin), captures bounded output, enforces
//! the timeout and stop requests with SIGTERM → SIGKILL escalation, and
//! reports how the process ended. It knows nothing of the database.
//!
//! Invariant: the outcome is decided when the task process exits (not when
//! its pipes close: a grandchild may hold them), and the whole process group
//! is killed then, and with it the try's cgroup where it has one, so nothing
//! the task started outlives its try (without a cgroup, a grandchild that
//! left the group with `setsid` escapes).

pub(crate) mod cgroup;
pub(crate) mod fence;
pub mod isolation;
mod limits;
mod output;
mod preload;
pub mod priority;
pub mod resources;
mod slots;
mod spawner;
pub use spawner::restore_child_signal;
pub mod watchdog;

pub use preload::send_with_fds;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::TaskSettings;
use crate::units::format_duration;
use output::Capture;
pub(crate) use output::Tail;
pub(crate) use slots::{Slots, Ticket};
pub(crate) use spawner::{is_daemon_short, DaemonShort, Recipe};

/// The variables of the daemon's environment a task inherits: the ones
/// every program expects, nothing that could hold a secret (the daemon's
/// `DATABASE_URL`, `PG*`, or whatever else its environment carries). A task
/// that needs more gets it through `env:` in the config.
pub(crate) const INHERITED_VARIABLES: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TERM",
];

/// A recipe's variables from `pairs`, of which the later of two with one
/// name wins (a recipe's variables are added to the environment as they
/// are, and a process reads the first of two).
pub(crate) fn later_wins<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = Vec::new();
    for (name, value) in pairs {
        env.retain(|(existing, _)| existing.as_os_str() != name);
        env.push((name.into(), value.into()));
    }
    env
}

pub(crate) fn is_inherited(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    INHERITED_VARIABLES
        .iter()
        .any(|allowed| match allowed.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix.as_bytes()),
            None => name == allowed.as_bytes(),
        })
}

/// Starts the thread that starts task processes; every task's environment
/// is the daemon's allowlisted variables, read now, plus its own.
pub(crate) fn start_spawner() -> std::io::Result<Spawner> {
    let exec = spawner::Exec::start(
        std::env::vars_os()
            .filter(|(name, _)| is_inherited(name))
            .collect(),
    )?;
    Ok(Spawner {
        exec,
        preloaded: Default::default(),
    })
}

/// Starts task processes: with clone and exec ([`spawner`]), or forked
/// from their program's preloaded parent ([`preload`]); cheap to clone.
/// It holds both, so that neither module needs the other's caller.
#[derive(Clone)]
pub(crate) struct Spawner {
    exec: spawner::Exec,
    preloaded: preload::Pool,
}

impl Spawner {
    /// Starts a process from `recipe`: forked from its program's preloaded
    /// parent if it asks for one and the parent serves, else with exec.
    ///
    /// A preloaded start runs as a task of its own: a try that stops
    /// waiting for it ([`run`]) drops only the answer, so that a boot under
    /// way goes on for the next tries (dropped, it killed the booting
    /// parent). The start then sends no request, and execs nothing: a try
    /// cancelled, or whose claim was lost, while its program booted got a
    /// child after the boot all the same, which began the task before it
    /// was killed (its [`spawner::Child`] dropped). A child made for it
    /// after all (its request was on its way) is killed and reaped so.
    pub(crate) async fn spawn(&self, recipe: Recipe) -> std::io::Result<spawner::Child> {
        if !recipe.preload {
            return self.exec.spawn(recipe).await;
        }
        let this = self.clone();
        let abandoned = tokio_util::sync::CancellationToken::new();
        // Dropped with this future: the try no longer waits.
        let _waits = abandoned.clone().drop_guard();
        tokio::spawn(async move {
            match this.preloaded.spawn(&this.exec, &recipe, &abandoned).await {
                Ok(child) => Ok(child),
                Err(preload::Refused::Failed(error)) => Err(error),
                Err(preload::Refused::ExecInstead) if abandoned.is_cancelled() => {
                    Err(preload::not_waited_for())
                }
                Err(preload::Refused::ExecInstead) => this.exec.spawn(recipe).await,
            }
        })
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error)))
    }

    /// Retires every preloaded parent (config reload); each exits in its
    /// own time (a few seconds at most).
    pub(crate) fn retire_preloaded(&self) {
        self.preloaded.retire_all();
    }

    /// Retires every preloaded parent and waits for them to exit, each
    /// running its exit handlers (the daemon's stop, once no try runs). A
    /// parent still booting is left to the parent-death signal.
    pub(crate) async fn stop_preloaded(&self) {
        let deadline = tokio::time::Instant::now() + preload::RETIRE_GRACE + Duration::from_secs(1);
        for gone in self.preloaded.retire_all() {
            let _ = tokio::time::timeout_at(deadline, gone).await;
        }
    }

    /// Runs a question to a program (`PROGRAM --list-tasks`, `--list-flows`,
    /// `--help TYPE`) as the user and group the tasks run as (`creds`:
    /// uid, gid, groups; `None`: as the daemon), started as a task is
    /// (clone and exec, environment `env` over the allowlisted variables,
    /// its own process group), and returns its output (at most 4 MiB of
    /// each stream) and exit status; `None` once it ran past `bound` (its
    /// group is killed).
    ///
    /// Before, the daemon asked with its own credentials: a daemon run as
    /// root ran a program its tasks run as `user: app` as root at every
    /// start and reload, and whoever may replace that program (its deploy,
    /// as `app`) had root.
    pub(crate) async fn ask(
        &self,
        program: &std::path::Path,
        args: &[&str],
        env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
        creds: Option<(u32, u32, Vec<u32>)>,
        bound: Duration,
    ) -> std::io::Result<Option<std::process::Output>> {
        use tokio::io::AsyncReadExt;
        /// More output than any answer has is not kept.
        const MOST: usize = 4 << 20;
        let recipe = Recipe {
            program: program.to_path_buf(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            env,
            workdir: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            uid: creds.as_ref().map(|(uid, ..)| *uid),
            gid: creds.as_ref().map(|(_, gid, _)| *gid),
            groups: creds.map(|(.., groups)| groups).unwrap_or_default(),
            limits: Default::default(),
            stdin: Vec::new(),
            stdin_fd: None,
            preload: false,
            cgroup: None,
            outlives_the_daemon: false,
            leads_a_session: false,
            stop: None,
        };
        let mut child = self.exec.spawn(recipe).await?;
        // Read to the end (a program whose output is cut short would die
        // of SIGPIPE), kept up to MOST.
        let read = |fd: Option<std::os::fd::OwnedFd>| async move {
            let mut kept = Vec::new();
            if let Some(mut pipe) =
                fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd).ok())
            {
                let mut chunk = vec![0; 64 << 10];
                while let Ok(count @ 1..) = pipe.read(&mut chunk).await {
                    let room = MOST.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..count.min(room)]);
                }
            }
            kept
        };
        let (stdout, stderr) = (read(child.stdout.take()), read(child.stderr.take()));
        let answered = async {
            let (stdout, stderr, status) =
                tokio::join!(stdout, stderr, child.wait_ending_its_group());
            status.map(|status| std::process::Output {
                status,
                stdout,
                stderr,
            })
        };
        let answer = tokio::time::timeout(bound, answered).await;
        match answer {
            Ok(output) => output.map(Some),
            Err(_) => {
                // Its group was killed as it exited; one that has not
                // exited leads its group still (a reaped one's number is
                // free, and may be another's by now).
                if !child.reaped() {
                    // SAFETY: a signal to the group made for this question,
                    // whose leader, our unreaped child, holds its number.
                    unsafe { libc::killpg(child.pid as libc::pid_t, libc::SIGKILL) };
                }
                // Reaped here, or (stuck in the kernel) by its drop.
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                Ok(None)
            }
        }
    }

    /// New slots for task processes, whose freed slots start the next try on
    /// the spawner thread that saw the exit ([`slots`]).
    pub(crate) fn slots(&self) -> std::sync::Arc<Slots> {
        Slots::new(self.exec.clone())
    }

    /// Starts `recipe` once `gate` lets it: `None` when it never may.
    async fn start_at(
        &self,
        gate: Gate<impl std::future::Future<Output = ()>>,
        recipe: Recipe,
    ) -> Option<(std::io::Result<spawner::Child>, Option<Ticket>, bool)> {
        match gate {
            Gate::Open => Some((self.spawn(recipe).await, None, false)),
            Gate::Slot(mut ticket, give_up) => {
                let (child, waited) = match ticket.start(recipe, give_up).await {
                    slots::Turn::Started { child, waited } => (child, waited),
                    // A preloaded try: its start is a message the runtime sends.
                    slots::Turn::Slot(recipe) => (self.spawn(recipe).await, false),
                    slots::Turn::Withdrawn => return None,
                };
                Some((child, Some(ticket), waited))
            }
        }
    }
}

/// What a try waits for before its start (see [`run`]).
pub(crate) enum Gate<G> {
    /// Nothing: it starts at once (`taskrunner-cli run`).
    Open,
    /// Its slot ([`Ticket`]); `G` resolves when it must stop waiting (it
    /// was stopped, or given back). The slot is released when its process
    /// has exited.
    Slot(Ticket, G),
}

impl Gate<std::future::Pending<()>> {
    /// [`Gate::Open`], typed.
    pub(crate) fn open() -> Self {
        Gate::Open
    }
}

/// Everything needed to start one try's process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) settings: TaskSettings,
    /// `TASKRUNNER_*` variables for this try.
    pub(crate) env: Vec<(String, String)>,
    /// The request's options, written to stdin byte for byte.
    pub(crate) stdin: Vec<u8>,
    /// Also copy the task's standard error to ours as it arrives
    /// (`taskrunner-cli run`: log and progress lines live).
    pub(crate) echo_stderr: bool,
    /// Forked from the program's preloaded parent (`preload: true`).
    pub(crate) preload: bool,
    /// Names the try's cgroup (`cgroup::try_key`), so that a restarted
    /// daemon finds it; `None`: a name of this process's own.
    pub(crate) cgroup_key: Option<String>,
}

/// Why the supervisor was asked to stop a running task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A user cancelled the request.
    Cancel,
    /// The daemon is shutting down and the drain time is over.
    Shutdown,
    /// The daemon lost its claim (or its database lease): kill at once, so
    /// another daemon never runs the row while this one still does.
    LostClaim,
}

/// The process's identity, known right after the spawn.
#[derive(Debug, Clone)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) start_ticks: i64,
}

/// When each step of a start happened, by the wall clock (which the task
/// and the database also read): what `scripts/bench` breaks claim-to-start
/// into, logged at debug level under the `taskrunner::start_timing` target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StartTimes {
    /// The try had its slot, with its start ready: its options, program,
    /// environment and cgroup were made before it waited. (Now always
    /// `asked`: a try waits for its slot with its start in the line.)
    pub(crate) launched: std::time::SystemTime,
    /// The start was asked of the spawner: when the try reached its gate
    /// holding a slot, or when the slot was handed to it armed.
    pub(crate) asked: std::time::SystemTime,
    /// A spawner thread took it (exec'd), or the request was sent to the
    /// preloaded parent.
    pub(crate) handed_off: std::time::SystemTime,
    /// `clone` returned in the spawner thread (the child has exec'd), or the
    /// preloaded parent's answer (the child's pid) arrived.
    pub(crate) created: std::time::SystemTime,
    /// The runtime's thread holds the child (its pidfd registered).
    pub(crate) spawned: std::time::SystemTime,
}

/// How a try's process ended.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: Tail,
    pub(crate) stderr: Tail,
    pub(crate) ran_for: Duration,
    /// How long the spawner took to start the process (clone and exec).
    pub(crate) spawn_took: Duration,
    pub(crate) start_times: StartTimes,
    /// Set when the process was stopped by us, and why.
    pub(crate) stopped: Option<Stopped>,
    /// A limit this process was found to have broken (named for the result text).
    pub(crate) limit_broken: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    Timeout(Duration),
    Requested(StopReason),
}

/// How long a process runs before `on_running` announces it. A task that
/// ends sooner is never announced: its pid is not worth a database write
/// (its outcome clears the pid anyway) nor a read of its start time.
pub(crate) const ANNOUNCE_AFTER: Duration = Duration::from_millis(10);

/// How long a process runs before its output pipes are watched. Until then
/// nothing of the daemon wakes when it writes; a task that ends sooner has its
/// output read once, after its exit, and one that fills a pipe (64 KiB) before
/// then waits at most this long to be read.
const WATCH_OUTPUT_AFTER: Duration = Duration::from_millis(10);

/// A try that was not started because its `gate` said no, or because it
/// was stopped while its preloaded start waited (see [`run`]): why, when
/// the run knows.
#[derive(Debug)]
pub(crate) struct NotStarted(Option<StopReason>);

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not started")
    }
}

impl std::error::Error for NotStarted {}

/// A try's start not made ([`Recipe::withdrawn`]): its stop said so, or
/// the daemon is past its fence, its lease unrenewed for as long as its own
/// fence allows (a daemon stopped, or its runtime stuck, with a start due
/// on a spawner thread; given back as a try whose claim was lost).
fn not_made(stopped: StopReason) -> std::io::Error {
    std::io::Error::other(NotStarted(Some(stopped)))
}

/// Whether `error` is [`run`]'s "not started", and the stop that made it
/// so when the run knows it.
pub(crate) fn not_started(error: &std::io::Error) -> Option<Option<StopReason>> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<NotStarted>())
        .map(|not_started| not_started.0)
}

/// Runs one process to its end.
///
/// Everything the start needs (environment, the try's cgroup, the recipe) is
/// made first; then the try waits at its `gate`, the last thing before the
/// start: for the daemon's slot, with its start left ready in the line. A
/// try claimed ahead thus waits for its slot with all its set-up done, and a
/// freed slot starts the next process at once, on the spawner thread that
/// saw the exit (the mkdir of a cgroup alone costs about 100 µs). A try that
/// stops waiting before it has its slot (it was stopped or given back) ends
/// the run with a [`NotStarted`] error, the cgroup removed; one whose start
/// was handed over already runs, and is stopped like any running one.
///
/// `on_running` is called once the process has
/// run for [`ANNOUNCE_AFTER`] (with its pid and start time, read while it
/// surely is our unreaped child); the slot is released as soon as the process
/// has exited and its group is killed, before its output is drained and its
/// cgroup emptied; `stop` delivers stop requests; progress lines are
/// published on `progress`.
pub(crate) async fn run(
    spawner: &Spawner,
    launch: Launch,
    gate: Gate<impl std::future::Future<Output = ()>>,
    mut stop: watch::Receiver<Option<StopReason>>,
    progress: Option<watch::Sender<Option<String>>>,
    on_running: impl FnOnce(&Spawned),
) -> std::io::Result<Ended> {
    let settings = launch.settings;
    // The user's own variables (`HOME`, `USER` …) where it runs as another
    // user, the type's `env:`, then the try's own (later entries win).
    let login = settings.user.as_ref().map(|user| user.login_env());
    let env = later_wins(
        login
            .iter()
            .flatten()
            .map(|(n, v)| (*n, *v))
            .chain(settings.env.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .chain(launch.env.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
    );
    // The try's cgroup, where cgroups are in force: made before the process,
    // which joins it before it execs.
    let try_cgroup = match cgroup::in_force() {
        Some(cgroups) => {
            let key = launch.cgroup_key.clone().unwrap_or_else(|| {
                static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("run:{}:{run}", std::process::id())
            });
            let made = cgroups.create(&key, &limits::cgroup_limits(&settings));
            Some(std::sync::Arc::new(made.map_err(|error| {
                if cgroup::is_limit_refused(&error) {
                    return error;
                }
                spawner::DaemonShort::error(
                    error.kind(),
                    format!("cannot make the try's cgroup: {error}"),
                )
            })?))
        }
        None => None,
    };
    let recipe = Recipe {
        program: launch.program.clone(),
        args: launch.args,
        env,
        workdir: settings.workdir.clone(),
        uid: settings.user.as_ref().map(|user| user.uid),
        gid: settings.gid(),
        groups: settings
            .user
            .as_ref()
            .map(|user| user.groups_with(settings.gid()))
            .unwrap_or_default(),
        limits: limits::child_limits(&settings),
        stdin: launch.stdin,
        stdin_fd: None,
        preload: launch.preload,
        cgroup: try_cgroup.clone(),
        outlives_the_daemon: false,
        leads_a_session: false,
        stop: Some(stop.clone()),
    };

    let preloaded_from =
        (launch.preload && try_cgroup.is_some()).then(|| preload::Key::of(&recipe));
    let asked = std::time::SystemTime::now();
    // A preloaded start can wait for its program's boot (up to a minute)
    // or its restart backoff: a cancel, a lost claim or the end of a
    // shutdown's drain ends the wait, and the try is not started (before,
    // each was heard only once the child existed). Its start goes on
    // without it ([`Spawner::spawn`]).
    let starting = spawner.start_at(gate, recipe);
    let (started, stopped) = if launch.preload {
        tokio::pin!(starting);
        tokio::select! {
            started = &mut starting => (started, None),
            reason = stopped_waiting(&mut stop) => (None, Some(reason)),
        }
    } else {
        (starting.await, None)
    };
    let Some((spawned, ticket, waited)) = started else {
        if let Some(cgroup) = try_cgroup {
            cgroup.remove().await;
        }
        return Err(std::io::Error::other(NotStarted(stopped)));
    };
    if spawned.is_err() {
        if let Some(cgroup) = try_cgroup.clone() {
            cgroup.remove().await;
        }
    }
    let mut child = spawned.map_err(|error| {
        // Not made: its stop said so, or the daemon is past its fence.
        if not_started(&error).is_some() {
            return error;
        }
        let text = format!("cannot start {}: {error}", launch.program.display());
        // A preloaded try's start holds no error of the task's own with an
        // errno (its parent's answers are text): out of descriptors there
        // is the daemon's side, wherever it was not marked (the suite saw a
        // preloaded try FAILED so, one in about two runs under 40
        // descriptors).
        // The same for a request the socket could not take for want of
        // memory or of descriptors in flight (ENOBUFS, ENOMEM,
        // ETOOMANYREFS): before, the try was FAILED and counted.
        let out_of_descriptors = launch.preload
            && matches!(
                error.raw_os_error(),
                Some(
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ETOOMANYREFS
                )
            );
        if is_daemon_short(&error) || out_of_descriptors {
            spawner::DaemonShort::error(error.kind(), text)
        } else {
            std::io::Error::new(error.kind(), text)
        }
    })?;
    // A try that waited armed got its slot, and was started, on the spawner
    // thread that handed the slot over.
    let asked = if waited { child.handed_off } else { asked };
    let start_times = StartTimes {
        launched: asked,
        asked,
        handed_off: child.handed_off,
        created: child.created,
        spawned: std::time::SystemTime::now(),
    };
    let spawn_took = start_times
        .spawned
        .duration_since(asked)
        .unwrap_or_default();
    if let (true, Some(cgroup)) = (launch.preload, &try_cgroup) {
        // A preloaded program that ignored the `cgroup` field: its child
        // is moved now (what it started before this runs outside). Once a
        // child of its parent was in its cgroup at the first look, the
        // parent's children join by themselves and are not checked: the
        // check races the child's own join, and a move writes
        // `cgroup.procs`, which takes the kernel's global cgroup lock.
        let joins = preloaded_from
            .as_ref()
            .and_then(|key| spawner.preloaded.joins_itself(key));
        let joins = joins.as_ref();
        if !joins.is_some_and(|joins| joins.load(std::sync::atomic::Ordering::Relaxed)) {
            match cgroup.adopt(child.pid) {
                Ok(true) => {
                    if let Some(joins) = joins {
                        joins.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!("cannot move a preloaded try into its cgroup: {error}")
                }
            }
        }
    }
    // From here: the boot of a preloaded parent is not the try's time.
    let started = Instant::now();
    let pid = child.pid;
    let process_group = Pid::from_raw(pid as i32);
    let mut on_running = Some(on_running);
    let announce_at = started + ANNOUNCE_AFTER;

    // Options too long for the pipe: the rest is written while the task reads.
    let writer = child.stdin.take().map(|(mut stdin, rest)| {
        tokio::spawn(async move {
            // A task that does not read its options gets EPIPE here; that is
            // fine. Dropping the pipe end closes the task's stdin.
            let _ = stdin.write_all(&rest).await;
        })
    });
    let mut stdout = Capture::new(settings.output_tail, None);
    let mut stderr = Capture::new(settings.output_tail, progress);
    if launch.echo_stderr {
        stderr.echo_to_stderr();
    }
    let (stdout_pipe, stderr_pipe) = (child.stdout.take(), child.stderr.take());
    let exited = CancellationToken::new();
    let (status, stopped, ran_for, cpu_time) = {
        // Both streams are read in this task, next to the wait, from
        // WATCH_OUTPUT_AFTER on or once the process has exited.
        let watch_output_at = started + WATCH_OUTPUT_AFTER;
        let begin = || async {
            tokio::select! {
                _ = tokio::time::sleep_until(watch_output_at) => {}
                _ = exited.cancelled() => {}
            }
        };
        // The try's process and its group (and cgroup) are gone: what the
        // pipes hold then is the last of its output.
        let group_gone = CancellationToken::new();
        let capture = async {
            tokio::join!(
                stdout.read_pipe(
                    stdout_pipe.expect("stdout is piped"),
                    begin(),
                    group_gone.cancelled()
                ),
                stderr.read_pipe(
                    stderr_pipe.expect("stderr is piped"),
                    begin(),
                    group_gone.cancelled()
                ),
            )
        };
        tokio::pin!(capture);
        let mut captured = false;
        let timeout_at = settings.timeout.map(|timeout| started + timeout);
        let mut stopped: Option<Stopped> = None;
        let mut escalation: Option<Escalation> = None;
        // Until the claim is lost or the daemon drops the handle.
        let mut listening = true;
        let status = loop {
            let next_signal = escalation.as_ref().map(|e| e.next_at);
            tokio::select! {
                biased;
                // Its group's leftovers are killed as it is reaped.
                status = child.wait_ending_its_group() => break status?,
                _ = &mut capture, if !captured => captured = true,
                _ = tokio::time::sleep_until(announce_at), if on_running.is_some() => {
                    if let Some(announce) = on_running.take() {
                        announce(&Spawned {
                            pid,
                            start_ticks: crate::procinfo::start_ticks(i64::from(pid)).unwrap_or(0),
                        });
                    }
                }
                // A timeout or a stop that comes after the process exited,
                // before the runtime saw its exit, changes nothing: the loop
                // reaps it next (before, a try that had exited 0 was
                // recorded CANCELLED, or TIMEOUT, by that moment's race).
                _ = crate::units::sleep_until_opt(timeout_at), if stopped.is_none() => {
                    if child.has_exited() {
                        break child.wait_ending_its_group().await?;
                    }
                    let timeout = settings.timeout.unwrap_or_default();
                    stopped = Some(Stopped::Timeout(timeout));
                    escalation = Some(Escalation::begin(process_group, &settings));
                }
                // Heard while the try is being stopped too: a lost claim
                // (the row taken over, or its lease about to lapse) kills at
                // once a task that a timeout, a cancel or a shutdown gave its
                // `kill_grace` (before, it ran on to the grace's end, beside
                // another daemon's try of the row).
                changed = stop.changed(), if listening => {
                    let reason = match changed {
                        Ok(()) => *stop.borrow_and_update(),
                        // The daemon dropped our handle: treat as a shutdown.
                        Err(_) => {
                            listening = false;
                            Some(StopReason::Shutdown)
                        }
                    };
                    match reason {
                        // An exit before the heartbeat's deadline kill of a
                        // row it could not renew (still this daemon's) is the
                        // try's end, recorded as it ended; a claim truly lost
                        // records nothing either way.
                        Some(StopReason::LostClaim) if child.has_exited() => listening = false,
                        Some(StopReason::LostClaim) => {
                            listening = false;
                            stopped.get_or_insert(Stopped::Requested(StopReason::LostClaim));
                            if let Some(cgroup) = &try_cgroup {
                                cgroup.kill_all();
                            }
                            escalation = Some(Escalation::kill_now(process_group));
                        }
                        // The exit is reaped at the loop's next turn.
                        Some(_) if stopped.is_none() && child.has_exited() => {}
                        Some(reason) if stopped.is_none() => {
                            stopped = Some(Stopped::Requested(reason));
                            escalation = Some(Escalation::begin(process_group, &settings));
                        }
                        _ => {}
                    }
                }
                _ = crate::units::sleep_until_opt(next_signal), if escalation.is_some() => {
                    if let Some(escalation) = escalation.as_mut() {
                        escalation.next(process_group, &settings);
                    }
                }
            }
        };
        let ran_for = started.elapsed();
        let cpu_time = child.cpu_time();
        crate::test_hooks::wait_for_file_when_told("TASKRUNNER_TEST_AFTER_TRY_REAPED").await;
        exited.cancel();
        if let Some(ticket) = &ticket {
            ticket.release();
        }
        // Let the try that got our slot start its process before we empty
        // the cgroup, drain and judge this one (a cgroup's kill and the read
        // of its members cost more than the group's kill).
        tokio::task::yield_now().await;
        // Everything in its cgroup, `setsid` escapes included.
        if let Some(cgroup) = &try_cgroup {
            cgroup.kill_all();
        }
        if let Some(writer) = writer {
            writer.abort();
        }
        // Pipes close once the group is gone; a grandchild that left the
        // group (setsid) may hold them: the readers take what the pipes hold
        // now, and stop.
        if !captured {
            group_gone.cancel();
            let _ = tokio::time::timeout(Duration::from_millis(500), capture).await;
        }
        (status, stopped, ran_for, cpu_time)
    };
    stderr.finish_echo().await;

    let limit_broken = match try_cgroup {
        Some(cgroup) => {
            let broken = cgroup.broken_limit();
            cgroup.remove().await;
            broken
        }
        None => None,
    }
    .or_else(|| limits::broken_limit(&status, cpu_time, &stderr.tail.text(), &settings));
    Ok(Ended {
        spawn_took,
        start_times,
        status,
        stdout: stdout.tail,
        stderr: stderr.tail,
        ran_for,
        stopped,
        limit_broken,
    })
}

/// The reason of the next stop sent on `stop`; never, once its sender is
/// gone (nobody can stop the try any more: `taskrunner-cli run`'s).
async fn stopped_waiting(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        match stop.changed().await {
            Ok(()) => {
                if let Some(reason) = *stop.borrow_and_update() {
                    return reason;
                }
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
}

/// SIGTERM, repeated every `kill_retry`, then SIGKILL once `kill_grace` has passed.
struct Escalation {
    began: Instant,
    next_at: Instant,
}

/// Signals the try's process group; while there is none yet, the process
/// itself. A preloaded child makes its group itself, an instant after the
/// daemon learns its pid: before, a stop in that instant found no group,
/// and its signal waited for the next one (`kill_retry`, or its group's
/// making). Called only while the process is our unreaped child, whose pid
/// cannot name another.
fn signal_try(group: Pid, signal: Signal) {
    if killpg(group, signal) == Err(nix::errno::Errno::ESRCH) {
        let _ = nix::sys::signal::kill(group, signal);
    }
}

impl Escalation {
    fn begin(group: Pid, settings: &TaskSettings) -> Escalation {
        signal_try(group, Signal::SIGTERM);
        let began = Instant::now();
        Escalation {
            began,
            next_at: began + settings.kill_retry.min(settings.kill_grace),
        }
    }

    fn kill_now(group: Pid) -> Escalation {
        signal_try(group, Signal::SIGKILL);
        let now = Instant::now();
        Escalation {
            began: now,
            next_at: now + Duration::from_secs(1),
        }
    }

    fn next(&mut self, group: Pid, settings: &TaskSettings) {
        let now = Instant::now();
        let grace_over = self.began + settings.kill_grace;
        if now >= grace_over {
            signal_try(group, Signal::SIGKILL);
            self.next_at = now + Duration::from_secs(1);
        } else {
            signal_try(group, Signal::SIGTERM);
            self.next_at =
                (now + settings.kill_retry.max(Duration::from_millis(10))).min(grace_over);
        }
    }
}

/// The first line of a failed try's result_text: why it ended.
pub(crate) fn describe_end(ended: &Ended) -> String {
    if let Some(Stopped::Timeout(timeout)) = ended.stopped {
        return format!(
            "timed out after {} (ran {:.1}s)",
            format_duration(timeout),
            ended.ran_for.as_secs_f64()
        );
    }
    let base = match (ended.status.code(), ended.status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}{}", signal_name(signal)),
        (None, None) => "ended in an unknown way".to_string(),
    };
    match &ended.limit_broken {
        Some(limit) => format!("{base}: {limit}"),
        None => base,
    }
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| format!(" ({})", s.as_str()))
        .unwrap_or_default()
}
