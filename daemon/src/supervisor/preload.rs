//! Preloaded programs: started once, forked for each try (SPEC.md "Preload").
//!
//! The problem: a program that boots slowly (a Rails app, a Python program
//! importing its libraries, a model read at start) pays its boot on every
//! exec'd try. A program declared with `preload: true` is started once, at
//! its first try (lazily: a daemon whose preloaded types never run never
//! boots them), with a `SOCK_SEQPACKET` Unix socket as its stdin and
//! `TASKRUNNER_PRELOAD=1`. It boots, says hello, and then for each request
//! (the try's environment, working directory, limits, and its stdin, stdout
//! and stderr passed with `SCM_RIGHTS`) creates a child with
//! `clone(CLONE_PARENT)` and answers with the child's pid. The protocol is
//! in the README ("Preload protocol").
//!
//! Decision: the child is made the *daemon's* child (`CLONE_PARENT`), not
//! the preloaded parent's, and not adopted through a child subreaper. So
//! from the moment its pid is known the try is a process like any other:
//! the daemon waits for it (pidfd, `waitpid`), gets its exact exit status,
//! reaps it (no zombie), and its parent-death signal is tied to the
//! daemon's thread as for an exec'd task; the preloaded parent's death
//! touches no running try. A subreaper would make the daemon the parent of
//! every orphan of every task (setsid grandchildren included), to be reaped
//! by a wait on any child, which would race the daemon's own waits; a status
//! reported by the parent would be lost with the parent.
//!
//! Failures: a program that exits, or says something else, before its hello
//! does not speak the protocol: one warning line, and its tries are exec'd
//! until the config is reloaded. A parent that dies after its hello is
//! replaced at the next try (after a backoff when it keeps dying, with one
//! line each time). A parent whose executable, or the script an
//! interpreter runs ([`files_of`]), changed on disk is retired (its socket closed, so that it exits
//! through its exit handlers; killed if it lingers; its children are the
//! daemon's and go on) and a new one started at the next try; so is every
//! parent on a config reload (SIGHUP) and at the daemon's stop. One parent
//! serves every type started the same way ([`Key`]).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spawner::{CgroupJoin, Child, Exec, OurEnds, Recipe};

/// The program's first message once it has booted.
pub(crate) const HELLO: &[u8] = b"hello\0taskrunner-preload-1\0";

/// How long a program may take to boot and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a try whose parent stopped answering waits for the search for
/// the child it may have forked ([`unanswered_children`]).
const ORPHAN_SEARCH: Duration = Duration::from_secs(10);

/// How long a parent with requests waiting may go without answering any
/// (each answer is a fork): a parent working through a queue of requests is
/// busy, not stuck, however long the queue.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// [`REPLY_TIMEOUT`], shorter in tests.
fn reply_timeout() -> Duration {
    crate::test_hooks::shortened(REPLY_TIMEOUT, "TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS")
}

/// A parent that lived this long before dying restarts without delay.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The longest wait before a parent that keeps dying is started again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// How long a parent retired in order (a reload, a deploy, the daemon's
/// stop) has to exit once its socket is closed, before it is killed.
pub(crate) const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// One preloaded parent per start: program, arguments, directory,
/// environment (without the try's own variables) and credentials. Two task
/// types whose commands differ only in their arguments (`[python3, a.py]`
/// and `[python3, b.py]`) boot two parents: keyed by the program alone,
/// the second type's tries were forked from the first type's program.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    program: PathBuf,
    args: Vec<String>,
    workdir: PathBuf,
    env: Vec<(OsString, OsString)>,
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Vec<u32>,
}

impl Key {
    /// The parent that serves `recipe`'s tries.
    pub(crate) fn of(recipe: &Recipe) -> Key {
        Key {
            program: recipe.program.clone(),
            args: recipe.args.clone(),
            workdir: recipe.workdir.clone(),
            env: parent_env(recipe),
            uid: recipe.uid,
            gid: recipe.gid,
            groups: recipe.groups.clone(),
        }
    }
}

/// The variables a try has for itself alone: its parent boots without them.
const PER_TRY: [&[u8]; 4] = [
    b"TASKRUNNER_TASK",
    b"TASKRUNNER_TRY",
    b"TASKRUNNER_REQUEST_ID",
    b"TASKRUNNER_BATCH_ID",
];

/// The environment a parent boots with: `recipe`'s, without the try's own
/// variables, and with `TASKRUNNER_PRELOAD=1`.
fn parent_env(recipe: &Recipe) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = recipe
        .env
        .iter()
        .filter(|(name, _)| !PER_TRY.contains(&name.as_bytes()))
        .cloned()
        .collect();
    env.push(("TASKRUNNER_PRELOAD".into(), "1".into()));
    env
}

/// The preloaded parents of one daemon; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Pool {
    /// A lock per program, held through its parent's boot and its restart
    /// backoff: one program's long boot holds up its own tries only (with
    /// one lock for all, every other program's tries waited through it,
    /// holding their slots). The map's own lock is held for a look-up.
    programs: Arc<std::sync::Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Program>>>>>,
}

/// What is known of one program.
#[derive(Default)]
struct Program {
    parent: Option<Arc<Parent>>,
    /// It did not speak the protocol: its tries are exec'd.
    exec_instead: bool,
    /// Deaths in a row, each within STABLE_AFTER of its start.
    deaths: u32,
    restart_at: Option<Instant>,
    /// The line saying why a type's tries are exec'd ([`only_execd`]) was
    /// logged.
    told_only_execd: bool,
}

/// Why the try of `recipe` cannot be a child of its preloaded parent: a
/// `nice` value below the daemon's, for a try run as another user than a
/// root daemon. The parent keeps the daemon's priority and runs as that
/// user, who may not lower a nice value: each child would fail its try
/// (exit status 127), where an exec'd try sets its nice value before it
/// drops to the user.
fn only_execd(recipe: &Recipe) -> Option<String> {
    let nice = recipe.limits.nice?;
    let user = recipe.uid.filter(|&uid| uid != 0)?;
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    // SAFETY: getpriority of the calling thread; -1 is a value here too,
    // and any error leaves the try preloaded, as before.
    let daemons = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    (nice < daemons).then(|| {
        format!(
            "{} runs as uid {user} at nice {nice}, below the daemon's {daemons}, which its preloaded parent keeps and a child may not lower",
            recipe.program.display()
        )
    })
}

/// A running preloaded parent.
struct Parent {
    pid: u32,
    /// Opened while it was our unreaped child: it names this process even
    /// once its pid is reused.
    pidfd: OwnedFd,
    socket: AsyncFd<OwnedFd>,
    /// Requests sent and not answered yet, oldest first. The parent reads
    /// one request at a time and answers it before it reads the next, so
    /// the answers come in this order; several may be on their way, so
    /// that the parent forks the next try while the daemon takes in the
    /// last one (see [`answer_requests`]). A std mutex: held for a send,
    /// never across an await.
    pending: std::sync::Mutex<VecDeque<Pending>>,
    /// Requests sent so far (the next one's [`Pending::id`]).
    requests: std::sync::atomic::AtomicU64,
    /// When it last answered a request (or started).
    answered_at: std::sync::Mutex<Instant>,
    alive: Arc<AtomicBool>,
    /// Its death was counted towards the restart backoff (by its watcher,
    /// or by a try that found it dead first).
    death_counted: AtomicBool,
    /// Changes once the process has exited (and was reaped).
    exited: tokio::sync::watch::Receiver<bool>,
    started: Instant,
    /// Its executable and the script it runs, as they were when it
    /// started (see [`files_of`]).
    files: Vec<Option<FileId>>,
    /// Its children were seen joining their cgroups by themselves.
    joins_itself: JoinsItself,
    /// How its children get into their cgroups (by its user).
    join: CgroupJoin,
}

/// A request sent to a parent: who waits for its child, our ends of the
/// try's pipes, and when it was sent.
struct Pending {
    /// Which request, for the try that sent it (see [`Parent::forked_for`]).
    id: u64,
    reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
    ours: OurEnds,
    sent: std::time::SystemTime,
}

type FileId = (u64, u64, u64, i64, i64);

/// The program's code as it is now: its executable and, when that is an
/// interpreter ([`INTERPRETERS`]), the script it runs ([`scripts_of`]): a
/// change to any (a deploy of `app.py` in `[python3, app.py]`, not only of
/// `python3`) retires the parent. The other arguments are the program's
/// own: a file one names (`data.sqlite` in `[app, --db, data.sqlite]`,
/// `input.csv` after the script) may change at every try, and retired the
/// parent at every try when every argument's file was watched.
fn files_of(recipe: &Recipe, spawner: &Exec) -> Vec<Option<FileId>> {
    let executable = resolve(recipe, spawner);
    let mut files = vec![file_id(&executable)];
    files.extend(
        scripts_of(&executable, &recipe.args, recipe, &|command| {
            resolve(command, spawner)
        })
        .iter()
        .map(|path| file_id(path)),
    );
    files
}

/// The files an interpreter at `executable` runs, given `args` (relative
/// to the recipe's directory): the first argument naming a file, and each
/// later one that names source code ([`is_source`]) up to the first one
/// that does not follow an option, the script (`tracing.js` and
/// `server.js` in `[node, -r, tracing.js, server.js, data.txt]`; `app.py`
/// in `[python3, -u, app.py, data.txt]`). `env` runs its command (`[env,
/// A=1, python3, app.py]`): that command and its scripts. Nothing for other
/// programs.
fn scripts_of(
    executable: &std::path::Path,
    args: &[String],
    recipe: &Recipe,
    resolve: &dyn Fn(&Recipe) -> PathBuf,
) -> Vec<PathBuf> {
    match interpreter(executable) {
        Some("env") => {
            let mut rest = args
                .iter()
                .skip_while(|arg| arg.starts_with('-') || arg.contains('='));
            let Some(command) = rest.next() else {
                return Vec::new();
            };
            let command = resolve(&Recipe {
                program: PathBuf::from(command),
                env: recipe.env.clone(),
                workdir: recipe.workdir.clone(),
                ..Recipe::default()
            });
            let rest: Vec<String> = rest.cloned().collect();
            let mut files = scripts_of(&command, &rest, recipe, resolve);
            files.insert(0, command);
            files
        }
        Some(_) => {
            let mut files = Vec::new();
            let mut after_an_option = false;
            for arg in args {
                let path = recipe.workdir.join(arg);
                if path.is_file() {
                    // An option's value (`-r tracing.js`) or a flag's
                    // script (`-u app.py`): which, the name alone cannot
                    // say, so a later file is taken only for source code.
                    if files.is_empty() || is_source(&path) {
                        files.push(path);
                    }
                    if !after_an_option {
                        break;
                    }
                }
                after_an_option = arg.len() > 1 && arg.starts_with('-') && !arg.contains('=');
            }
            files
        }
        None => Vec::new(),
    }
}

/// Programs that run the script their arguments name, by the name of their
/// executable less a version (`python3.11`, `ruby3.2`).
const INTERPRETERS: &[&str] = &[
    "python", "ruby", "node", "nodejs", "perl", "php", "bash", "sh", "dash", "zsh", "ksh", "env",
    "java", "lua", "luajit", "Rscript", "deno", "bun", "tclsh", "pypy", "elixir", "escript",
];

/// Whether `path` names source code by its extension (`app.py`, not
/// `data.txt`).
fn is_source(path: &std::path::Path) -> bool {
    const SOURCE: &[&str] = &[
        "py", "pyc", "pyz", "rb", "js", "mjs", "cjs", "ts", "php", "pl", "pm", "lua", "jar", "sh",
        "bash", "tcl", "ex", "exs", "erl", "r",
    ];
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| SOURCE.contains(&extension.to_ascii_lowercase().as_str()))
}

/// Which of [`INTERPRETERS`] `executable` is, if one.
fn interpreter(executable: &std::path::Path) -> Option<&'static str> {
    let name = executable.file_name()?.to_str()?;
    let name = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-');
    INTERPRETERS.iter().copied().find(|&known| known == name)
}

fn file_id(path: &std::path::Path) -> Option<FileId> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    ))
}

/// Set once a child of a parent was found in its try's cgroup when the
/// daemon first looked: that parent's children join by themselves (the
/// protocol's `cgroup` field), and the daemon need not check the next ones.
pub(crate) type JoinsItself = Arc<AtomicBool>;

/// The start of a try that no longer waits for it (see [`super::Spawner::spawn`]).
pub(crate) fn not_waited_for() -> io::Error {
    io::Error::other("the try stopped waiting for its start: no child was made")
}

/// Why a preloaded start did not happen: run the try exec'd, or fail it.
pub(crate) enum Refused {
    ExecInstead,
    Failed(io::Error),
}

/// How often the cgroup of a try is touched while its start waits for a
/// preloaded parent (see [`Pool::spawn`]).
const KEEP_YOUNG_EVERY: Duration = Duration::from_secs(2);
const _: () = assert!(KEEP_YOUNG_EVERY.as_secs() * 3 < super::cgroup::SWEEP_AFTER.as_secs());

impl Pool {
    /// Starts the try of `recipe` as a child of its program's preloaded
    /// parent (starting the parent first if need be). The try's cgroup is
    /// empty until the child joins it, which can take the parent's whole
    /// boot (up to a minute): it is touched every [`KEEP_YOUNG_EVERY`]
    /// meanwhile, so that no daemon's sweep of old empty cgroups takes it
    /// (the child could not join, and its try failed).
    pub(crate) async fn spawn(
        &self,
        spawner: &Exec,
        recipe: &Recipe,
        abandoned: &CancellationToken,
    ) -> Result<Child, Refused> {
        let starting = self.start(spawner, recipe, abandoned);
        let Some(cgroup) = &recipe.cgroup else {
            return starting.await;
        };
        tokio::pin!(starting);
        loop {
            tokio::select! {
                started = &mut starting => return started,
                _ = tokio::time::sleep(KEEP_YOUNG_EVERY) => cgroup.touch(),
            }
        }
    }

    async fn start(
        &self,
        spawner: &Exec,
        recipe: &Recipe,
        abandoned: &CancellationToken,
    ) -> Result<Child, Refused> {
        let key = Key::of(recipe);
        if let Some(why) = only_execd(recipe) {
            let program = self.program(&key);
            let mut program = program.lock().await;
            if !std::mem::replace(&mut program.told_only_execd, true) {
                tracing::warn!("{why}: its tries are exec'd");
            }
            return Err(Refused::ExecInstead);
        }
        // A parent that died, or stopped answering, while it was asked is
        // replaced once: the try never began, and a new parent starts it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let parent = self.parent_for(spawner, &key, recipe).await?;
            // The try stopped waiting meanwhile (its program booted, or
            // waited out its restart backoff): no child for it.
            if abandoned.is_cancelled() {
                return Err(Refused::Failed(not_waited_for()));
            }
            if let Some(stopped) = recipe.withdrawn() {
                return Err(Refused::Failed(super::not_made(stopped)));
            }
            match parent.request(spawner, recipe).await {
                Ok(child) => return Ok(child),
                // A broken protocol retires the parent before the try hears
                // of it: its death is not why this try has no child.
                Err(error)
                    if error.kind() != io::ErrorKind::InvalidData
                        && !parent.alive.load(Ordering::SeqCst)
                        && attempts < 2 =>
                {
                    tracing::debug!("preloaded parent died while starting a try: {error}");
                }
                Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE) => {
                    // A request is one message, at most the socket's send
                    // buffer (net.core.wmem_max, about 208 KiB): a larger
                    // environment (a huge `env:` value) would fail every
                    // try that the same environment runs exec'd.
                    tracing::warn!(
                        "a try's request to the preloaded parent of {} is larger than its socket takes (its environment is too large); this try is exec'd",
                        key.program.display()
                    );
                    return Err(Refused::ExecInstead);
                }
                Err(error) => {
                    if error.kind() == io::ErrorKind::InvalidData {
                        // The program broke the protocol: exec from now on.
                        tracing::warn!(
                            "{} does not speak the preload protocol ({error}); its tries are exec'd",
                            key.program.display()
                        );
                        let program = self.program(&key);
                        let mut program = program.lock().await;
                        program.exec_instead = true;
                        if let Some(parent) = program.parent.take() {
                            parent.retire();
                        }
                        return Err(Refused::ExecInstead);
                    }
                    return Err(Refused::Failed(error));
                }
            }
        }
    }

    /// Whether the children of the running parent of `key` join their
    /// cgroups by themselves, as far as is known; `None` without a parent,
    /// or while a parent is being started (the lock is held for its boot):
    /// the caller then checks the child, which is always safe.
    pub(crate) fn joins_itself(&self, key: &Key) -> Option<JoinsItself> {
        let program = self.programs().get(key)?.clone();
        let program = program.try_lock().ok()?;
        let parent = program.parent.as_ref()?;
        Some(parent.joins_itself.clone())
    }

    /// Retires every parent in order ([`Parent::close`]; a config reload,
    /// the daemon's stop): each program starts anew at its next try. A
    /// parent still booting is retired once its boot ends. The handles end
    /// once each parent is gone.
    pub(crate) fn retire_all(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let programs = std::mem::take(&mut *self.programs());
        programs
            .into_values()
            .map(|program| {
                tokio::spawn(async move {
                    let parent = program.lock().await.parent.take();
                    if let Some(parent) = parent {
                        parent.close().await;
                    }
                })
            })
            .collect()
    }

    fn programs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<tokio::sync::Mutex<Program>>>> {
        self.programs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The program of `key` (known from now on).
    fn program(&self, key: &Key) -> Arc<tokio::sync::Mutex<Program>> {
        self.programs().entry(key.clone()).or_default().clone()
    }

    async fn parent_for(
        &self,
        spawner: &Exec,
        key: &Key,
        recipe: &Recipe,
    ) -> Result<Arc<Parent>, Refused> {
        let program = self.program(key);
        let mut program = program.lock().await;
        let program = &mut *program;
        if program.exec_instead {
            return Err(Refused::ExecInstead);
        }
        if let Some(parent) = program.parent.clone() {
            let parent = &parent;
            let alive = parent.alive.load(Ordering::SeqCst);
            if alive && parent.files == files_of(recipe, spawner) {
                return Ok(parent.clone());
            }
            if !alive {
                // Dead before its watcher noted it: counted here, so that
                // a program that keeps dying under steady load still waits
                // its backoff (before, the try started a new parent at once,
                // and the watcher, finding another current, counted nothing).
                count_death(program, key, parent);
            }
            if alive {
                tracing::info!(
                    "{} changed on disk: its preloaded parent (pid {}) is retired, a new one starts",
                    key.program.display(),
                    parent.pid
                );
                program.deaths = 0;
                program.restart_at = None;
            }
            // Retired in order either way: one taken for dead while its
            // process lives (it closed its socket, or sent an empty
            // message) is killed after the grace. Before, it was dropped
            // and lived on, one booted program more at each replacement.
            let parent = parent.clone();
            tokio::spawn(async move { parent.close().await });
            program.parent = None;
        }
        if let Some(at) = program.restart_at {
            tokio::time::sleep_until(at).await;
        }
        let parent = match Parent::start(spawner, recipe).await {
            Ok(parent) => Arc::new(parent),
            Err(StartError::NotSpoken(reason)) => {
                tracing::warn!(
                    "{} does not speak the preload protocol ({reason}); its tries are exec'd",
                    key.program.display()
                );
                program.exec_instead = true;
                return Err(Refused::ExecInstead);
            }
            Err(StartError::Io(error)) => return Err(Refused::Failed(error)),
        };
        tracing::info!("{} preloaded (pid {})", key.program.display(), parent.pid);
        tokio::spawn(answer_requests(parent.clone()));
        program.parent = Some(parent.clone());
        watch_death(self.clone(), key.clone(), parent.clone());
        Ok(parent)
    }
}

/// The program's path as the spawner would run it.
fn resolve(recipe: &Recipe, spawner: &Exec) -> PathBuf {
    spawner
        .resolve_program(recipe)
        .unwrap_or_else(|_| recipe.program.clone())
}

/// Notes a parent's death (once its process has exited), logs one line, and
/// sets the backoff for the next start when it keeps dying.
fn watch_death(pool: Pool, key: Key, parent: Arc<Parent>) {
    let mut exited = parent.exited.clone();
    let weak = Arc::downgrade(&parent);
    drop(parent);
    tokio::spawn(async move {
        let _ = exited.wait_for(|&exited| exited).await;
        let Some(program) = pool.programs().get(&key).cloned() else {
            return;
        };
        let mut program = program.lock().await;
        let program = &mut *program;
        let Some(current) = &program.parent else {
            return;
        };
        let Some(parent) = weak.upgrade() else {
            return;
        };
        if !Arc::ptr_eq(current, &parent) {
            return;
        }
        program.parent = None;
        count_death(program, &key, &parent);
    });
}

/// Counts `parent`'s death once (its watcher, or a try that found it dead
/// first), sets the backoff for the next start when it keeps dying, and
/// logs one line.
fn count_death(program: &mut Program, key: &Key, parent: &Parent) {
    if parent.death_counted.swap(true, Ordering::SeqCst) {
        return;
    }
    if parent.started.elapsed() >= STABLE_AFTER {
        program.deaths = 0;
    }
    program.deaths += 1;
    let delay = if program.deaths <= 1 {
        Duration::ZERO
    } else {
        Duration::from_secs(1 << (program.deaths - 2).min(5)).min(MAX_RESTART_DELAY)
    };
    program.restart_at = Some(Instant::now() + delay);
    if delay.is_zero() {
        tracing::warn!(
            "preloaded parent of {} (pid {}) died; tries already running go on, a new parent starts at the next try",
            key.program.display(),
            parent.pid
        );
    } else {
        tracing::warn!(
            "preloaded parent of {} (pid {}) died again ({} deaths in a row); tries already running go on, a new parent starts in {}s",
            key.program.display(),
            parent.pid,
            program.deaths,
            delay.as_secs()
        );
    }
}

/// A preloaded parent's output line longer than this is logged in pieces.
const MAX_LINE: usize = 4096;

/// Logs what a preloaded parent writes on `stream`, a line at a time, until
/// it closes it: a line longer than [`MAX_LINE`] in pieces, bytes that are
/// not UTF-8 replaced. (Read as text, one such byte ended the reading, and
/// the parent's next write into the closed pipe failed.)
async fn log_output(fd: OwnedFd, program: String, pid: u32, stream: &'static str) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd) else {
        return;
    };
    let mut reader = tokio::io::BufReader::new(pipe);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let mut piece = (&mut reader).take(MAX_LINE as u64);
        match piece.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.strip_suffix('\n').unwrap_or(&text);
                tracing::info!("preloaded {program} (pid {pid}) {stream}: {text}");
            }
        }
    }
}

enum StartError {
    NotSpoken(String),
    Io(io::Error),
}

impl Parent {
    async fn start(spawner: &Exec, recipe: &Recipe) -> Result<Parent, StartError> {
        // Out of descriptors here is the daemon's shortage, as in a spawn:
        // the try is given back, not failed.
        let (ours, theirs) =
            seqpacket_pair().map_err(|e| StartError::Io(super::spawner::mark_shortage(e)))?;
        let parent_recipe = Recipe {
            program: recipe.program.clone(),
            args: recipe.args.clone(),
            env: parent_env(recipe),
            workdir: recipe.workdir.clone(),
            uid: recipe.uid,
            gid: recipe.gid,
            groups: recipe.groups.clone(),
            // The boot may need more than one try is allowed; each child
            // sets the try's limits and nice value. The parent keeps the
            // daemon's priority: it is on every start's path, as the
            // daemon's own thread is for an exec'd try. What a child
            // cannot set back by itself, the parent gets as an exec'd
            // try does and hands down: the OOM killer's score the daemon
            // lowered for itself, and the open files limit it raised
            // (before, every preloaded try kept the daemon's).
            limits: super::spawner::ChildLimits {
                open_files: recipe.limits.open_files,
                oom_score_adj: recipe.limits.oom_score_adj,
                ..Default::default()
            },
            stdin: Vec::new(),
            stdin_fd: Some(Arc::new(theirs)),
            preload: false,
            // Not a try's: it outlives them all.
            cgroup: None,
            outlives_the_daemon: false,
            leads_a_session: true,
            stop: None,
        };
        let files = files_of(recipe, spawner);
        let mut child = spawner.spawn(parent_recipe).await.map_err(StartError::Io)?;
        let pid = child.pid;
        // Unreaped (its waiter starts below): the pid is still its own.
        let pidfd = super::spawner::pidfd_open(pid)
            .map_err(|e| StartError::Io(super::spawner::mark_shortage(e)))?;
        let alive = Arc::new(AtomicBool::new(true));
        let program = recipe.program.display().to_string();
        // Its output goes to the daemon's log, a line at a time.
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for (fd, stream) in [(stdout, "stdout"), (stderr, "stderr")] {
            if let Some(fd) = fd {
                tokio::spawn(log_output(fd, program.clone(), pid, stream));
            }
        }
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        let (status_tx, mut status_rx) = tokio::sync::oneshot::channel();
        // The socket's end for its answers' reader once the parent is gone:
        // a process it started may hold the parent's end (inherited as its
        // stdin), and the reader would never see the end of file, find no
        // child forked before an answer, and wait for ever.
        let ending = ours
            .try_clone()
            .map_err(|e| StartError::Io(super::spawner::mark_shortage(e)))?;
        {
            let alive = alive.clone();
            tokio::spawn(async move {
                let status = child.wait().await;
                alive.store(false, Ordering::SeqCst);
                // SAFETY: shutdown of a socket whose descriptor we own.
                unsafe { libc::shutdown(ending.as_raw_fd(), libc::SHUT_RDWR) };
                drop(ending);
                let _ = status_tx.send(status);
                let _ = exited_tx.send(true);
            });
        }
        // SAFETY: the OwnedFd stays open, on the same socket, for as long as
        // the AsyncFd owns it.
        let socket = unsafe {
            AsyncFd::register_with_interest(
                ours,
                tokio::io::Interest::READABLE.add(tokio::io::Interest::WRITABLE),
            )
        }
        .map_err(|e| StartError::Io(super::spawner::mark_shortage(io::Error::from(e))))?;
        let parent = Parent {
            pid,
            pidfd,
            socket,
            pending: Default::default(),
            requests: Default::default(),
            answered_at: std::sync::Mutex::new(Instant::now()),
            alive,
            death_counted: AtomicBool::new(false),
            exited,
            started: Instant::now(),
            files,
            joins_itself: Default::default(),
            // A child of another user cannot open the join files (root's):
            // given their paths, it would exit 127 at each try.
            join: if recipe
                .uid
                .is_some_and(|uid| uid != nix::unistd::geteuid().as_raw())
            {
                CgroupJoin::Left
            } else {
                CgroupJoin::Paths
            },
        };
        let mut buffer = [0u8; 256];
        let hello = tokio::select! {
            received = parent.receive(&mut buffer) => received,
            status = &mut status_rx => {
                let status = match status {
                    Ok(Ok(status)) => status.to_string(),
                    _ => "ended".to_string(),
                };
                return Err(StartError::NotSpoken(format!("it exited with {status} before its hello")));
            }
            _ = tokio::time::sleep(HELLO_TIMEOUT) => {
                parent.retire();
                return Err(StartError::NotSpoken(format!(
                    "no hello within {}s", HELLO_TIMEOUT.as_secs()
                )));
            }
        };
        let hello = hello.map(|count| &buffer[..count.min(buffer.len())]);
        match hello {
            Ok(hello) if hello == HELLO => Ok(parent),
            Ok([]) => {
                // Most often it is exiting: say how.
                let reason = match tokio::time::timeout(Duration::from_secs(1), status_rx).await {
                    Ok(Ok(Ok(status))) => format!("it exited with {status} before its hello"),
                    _ => "it closed its socket before its hello".to_string(),
                };
                parent.retire();
                Err(StartError::NotSpoken(reason))
            }
            Ok(other) => {
                let said = String::from_utf8_lossy(other).into_owned();
                parent.retire();
                Err(StartError::NotSpoken(format!(
                    "its first message is {said:?}, not the hello",
                )))
            }
            Err(error) => {
                parent.retire();
                Err(StartError::NotSpoken(format!("reading its hello: {error}")))
            }
        }
    }

    /// Retires the parent as the protocol says: the daemon ends its sending
    /// on the socket, the parent answers the requests it holds, reads the
    /// end, and exits, running its exit handlers (a Rails application's
    /// `at_exit`, a flush of its metrics); one still there after
    /// [`RETIRE_GRACE`] is killed. Its children, the daemon's own, go on.
    /// (Before, every retirement was a `SIGKILL`; then the end was both
    /// ways, and a parent retired with a request in hand could not answer
    /// it: the daemon took it for unanswered and killed the parent.)
    async fn close(&self) {
        // SAFETY: shutdown of our own socket, which stays open.
        unsafe { libc::shutdown(self.socket.get_ref().as_raw_fd(), libc::SHUT_WR) };
        let mut exited = self.exited.clone();
        let gone = exited.wait_for(|exited| *exited);
        if tokio::time::timeout(RETIRE_GRACE, gone).await.is_err() {
            tracing::warn!(
                "preloaded parent (pid {}) did not exit within {}s of the end of its socket: it is killed",
                self.pid,
                RETIRE_GRACE.as_secs()
            );
            self.retire();
        }
    }

    /// Stops the parent at once (SIGKILL: it may be blocked anywhere in
    /// its own code); its children are the daemon's own and go on. It is
    /// handed no request from here on, even while it lives: a process in
    /// uninterruptible sleep dies only when it wakes (before, it counted
    /// as alive until it was reaped, and each new try waited for its
    /// answer in vain).
    ///
    /// Through its pidfd, which names this process for good: `alive` is no
    /// guide, since it turns false when the socket ends, while the process
    /// may live on (a `close` whose parent does not exit, a parent that
    /// closed its socket with requests unanswered); a kill by pid once it
    /// was reaped could hit another process.
    fn retire(&self) {
        self.alive.store(false, Ordering::SeqCst);
        // SAFETY: a signal through a pidfd we own.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
    }

    /// One message from the parent, as much of it as `buffer` holds: its
    /// length (0 when the parent closed the socket), which is more than
    /// the buffer's when the rest was cut off.
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        receive(&self.socket, buffer).await
    }

    /// Asks the parent for a child running `recipe`'s try; its answer
    /// comes through [`answer_requests`].
    async fn request(&self, spawner: &Exec, recipe: &Recipe) -> io::Result<Child> {
        let (message, stdio) = spawner.preload_request(recipe, self.join)?;
        let fds = [
            stdio.child_ends[0].as_raw_fd(),
            stdio.child_ends[1].as_raw_fd(),
            stdio.child_ends[2].as_raw_fd(),
        ];
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut reply = Some(reply);
        let id = self.requests.fetch_add(1, Ordering::Relaxed);
        let mut deadline = tokio::time::Instant::now() + reply_timeout();
        loop {
            {
                // Sent and queued under one lock: the queue's order is the
                // order of the requests on the socket.
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if !self.alive.load(Ordering::SeqCst) {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the preloaded parent closed its socket",
                    ));
                }
                match send_with_fds(self.socket.get_ref().as_raw_fd(), &message, &fds) {
                    Ok(()) => {
                        pending.push_back(Pending {
                            id,
                            reply: reply.take().expect("sent once"),
                            ours: stdio.ours,
                            sent: std::time::SystemTime::now(),
                        });
                        break;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => {
                        if gone(&error) {
                            // It died (or closed its socket) just now, before
                            // its answers' reader saw the socket's end: the
                            // try never began, and a new parent starts it.
                            self.alive.store(false, Ordering::SeqCst);
                        }
                        return Err(error);
                    }
                }
            }
            // Its socket's buffer is full: the parent reads no requests (it
            // is stopped, or stuck), or has many ahead of this one (large
            // requests, slow forks). The daemon's thread does not wait in
            // the send; the try waits here, as it would for an answer, and
            // as there, answers coming meanwhile extend the wait (before, a
            // busy parent was killed as stuck once the send had waited
            // `REPLY_TIMEOUT`, and every request queued behind failed).
            match tokio::time::timeout_at(deadline, self.socket.writable()).await {
                Ok(Ok(mut ready)) => ready.clear_ready(),
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    if let Some(later) = self.answering_until() {
                        deadline = later;
                        continue;
                    }
                    return Err(self.stopped_answering().await);
                }
            }
        }
        drop(stdio.child_ends);
        tokio::pin!(answer);
        loop {
            match tokio::time::timeout_at(deadline, &mut answer).await {
                Ok(Ok(child)) => return child,
                Ok(Err(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the preloaded parent closed its socket",
                    ))
                }
                Err(_) => {
                    // Answers to the requests ahead of this one came
                    // meanwhile: it works through its queue.
                    if let Some(later) = self.answering_until() {
                        deadline = later;
                        continue;
                    }
                    let error = self.stopped_answering().await;
                    // It may have forked for this request just before: its
                    // answers' reader, once it is gone, finds such a child
                    // and answers with it, so that the try is not asked
                    // again beside it. One killed that lives on (in
                    // uninterruptible sleep) closes no socket, and the
                    // child is looked for here.
                    if *self.exited.borrow() {
                        if let Ok(Ok(Ok(child))) =
                            tokio::time::timeout(ORPHAN_SEARCH, &mut answer).await
                        {
                            return Ok(child);
                        }
                    }
                    return self.forked_for(id).await.unwrap_or(Err(error));
                }
            }
        }
    }

    /// The child this parent, killed for not answering and not gone (in
    /// uninterruptible sleep: its kill waits for its wake-up, and it forks
    /// no more), made for request `id` before it stopped: one of the
    /// daemon's children no try supervises, holding the try's pipes. It
    /// runs the try, supervised; `None` when there is none (or the request
    /// was answered meanwhile), and a new parent is asked. (Before, the
    /// try was asked of a new parent beside it, and its task ran twice at
    /// once.)
    async fn forked_for(&self, id: u64) -> Option<io::Result<Child>> {
        let pending = {
            let mut queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let at = queue.iter().position(|pending| pending.id == id)?;
            queue.remove(at)?
        };
        let pipes = pending.ours.output_pipes();
        let found = tokio::task::spawn_blocking(move || {
            unsupervised_holding_pipes()
                .into_iter()
                .find(|(_, held)| held.iter().any(|pipe| pipes.contains(pipe)))
                .map(|(pid, _)| pid)
        })
        .await
        .ok()
        .flatten()?;
        tracing::warn!(
            "preloaded parent (pid {}) stopped before its answer; its child (pid {found}) runs the try, supervised",
            self.pid
        );
        Some(
            Child::adopt(found, self.pid, pending.ours).map(|mut child| {
                (child.handed_off, child.created) = (pending.sent, std::time::SystemTime::now());
                child
            }),
        )
    }

    /// Until when a try may wait for this parent when it answered a
    /// request less than [`REPLY_TIMEOUT`] ago (it works through its
    /// queue); `None` when it has not.
    fn answering_until(&self) -> Option<Instant> {
        let answered = *self.answered_at.lock().unwrap_or_else(|e| e.into_inner());
        Some(answered + reply_timeout()).filter(|&until| until > Instant::now())
    }

    /// The parent took more than [`REPLY_TIMEOUT`] to take a request in
    /// and answer it: it is retired (killed), and the caller, once it is
    /// gone (marked dead), asks a new parent.
    async fn stopped_answering(&self) -> io::Error {
        tracing::warn!(
            "preloaded parent (pid {}) did not answer a request within {}s: it is killed, and a new one starts the try (unless it forked for it already)",
            self.pid,
            reply_timeout().as_secs()
        );
        // Its socket closes: every request still waiting fails.
        self.retire();
        let mut exited = self.exited.clone();
        let gone = exited.wait_for(|exited| *exited);
        let _ = tokio::time::timeout(Duration::from_secs(1), gone).await;
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the preloaded parent did not answer within {}s",
                reply_timeout().as_secs()
            ),
        )
    }
}

/// Reads a parent's answers, for as long as its socket is open, and hands
/// each to the request it answers (the oldest one waiting). A child whose
/// request nobody waits for any more is killed and reaped (dropping a
/// [`Child`] does that): no try runs unsupervised. Once the socket closes,
/// every request still waiting fails, with the parent marked dead (a try
/// then asks a new parent, once).
async fn answer_requests(parent: Arc<Parent>) {
    // An `error` text longer than this (a backtrace) is cut here; the
    // answer keeps its meaning (before, a cut answer had lost its last
    // NUL, and the program was taken for one that does not speak the
    // protocol).
    let mut buffer = vec![0u8; 16 * 1024];
    // An answer that broke the protocol: who waits for it, the pipes of its
    // try, and why.
    let mut refused: Option<(
        tokio::sync::oneshot::Sender<io::Result<Child>>,
        Vec<u64>,
        io::Error,
    )> = None;
    loop {
        let count = match parent.receive(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        let answer = if count > buffer.len() {
            // Cut: its last byte becomes the NUL that ends its text.
            let last = buffer.len() - 1;
            buffer[last] = 0;
            &buffer[..]
        } else {
            &buffer[..count]
        };
        let answered = std::time::SystemTime::now();
        *parent.answered_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let next = parent
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let Some(pending) = next else {
            tracing::warn!(
                "preloaded parent (pid {}) answered a request it was not sent; it is retired",
                parent.pid
            );
            // The child such an answer names (a request answered twice)
            // runs a try unknown to the daemon: no timeout, no cancel, its
            // output read by no one, then a zombie. It is killed (before,
            // it ran on).
            if let Some(pid) = answered_pid(answer) {
                tokio::task::spawn_blocking(move || super::spawner::kill_unsupervised_child(pid));
            }
            parent.retire();
            break;
        };
        let pipes = pending.ours.output_pipes();
        match read_answer(answer, parent.pid, pending.ours) {
            Ok(mut child) => {
                (child.handed_off, child.created) = (pending.sent, answered);
                let _ = pending.reply.send(Ok(child));
            }
            // A malformed answer, or a pid that is not the child it forked
            // (its own, a previous try's): that child, if any, runs the try
            // unknown to the daemon. The parent is retired, the child found
            // by its pipes and killed below, and then the try is exec'd
            // (before, it was exec'd at once, beside the child, which ran on
            // unsupervised and stayed a zombie).
            Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                refused = Some((pending.reply, pipes, error));
                break;
            }
            Err(error) => {
                let _ = pending.reply.send(Err(error));
            }
        }
    }
    let waiting: Vec<Pending> = {
        let mut pending = parent.pending.lock().unwrap_or_else(|e| e.into_inner());
        parent.alive.store(false, Ordering::SeqCst);
        pending.drain(..).collect()
    };
    if waiting.is_empty() && refused.is_none() {
        return;
    }
    let Orphans { live, mut unnamed } = unanswered_children(&parent).await;
    let held_by = |pipes: &[u64]| {
        live.iter()
            .find(|(_, held)| held.iter().any(|pipe| pipes.contains(pipe)))
            .map(|&(pid, _)| pid)
    };
    // A parent that broke the protocol may have made no child for the
    // request it refused (a plain fork, a garbled answer): the order of
    // forks says nothing then, and its children no pipe names are killed
    // below rather than given to the requests that wait.
    let in_order = refused.is_none();
    if let Some((reply, pipes, error)) = refused {
        if let Some(pid) = held_by(&pipes) {
            tracing::warn!(
                "preloaded parent (pid {}) answered with something else than its child (pid {pid}) for a try: the child is killed",
                parent.pid
            );
            // Off the runtime's thread: the wait for its death may be long
            // (a process in uninterruptible sleep).
            let _ =
                tokio::task::spawn_blocking(move || super::spawner::kill_unsupervised_child(pid))
                    .await;
        }
        let _ = reply.send(Err(error));
    }
    for pending in waiting {
        let pipes = pending.ours.output_pipes();
        // A parent forks for its requests in their order: a child no
        // pipe names (it has exited, or closed them) belongs to the oldest
        // request left whose child was not found by its pipes.
        let found = held_by(&pipes)
            .or_else(|| (in_order && !unnamed.is_empty()).then(|| unnamed.remove(0)))
            .map(|pid| match crate::procinfo::is_zombie(i64::from(pid)) {
                true => (pid, "had run the try and exited: its status is the try's"),
                false => (pid, "runs the try, supervised"),
            });
        let reply = match found {
            // Forked, and the parent gone before its answer: the try runs,
            // or ran, and is supervised from here like any other (a child
            // whose request nobody waits for any more is killed and reaped).
            Some((pid, what)) => {
                tracing::warn!(
                    "preloaded parent (pid {}) died between a fork and its answer; its child (pid {pid}) {what}",
                    parent.pid
                );
                Child::adopt(pid, parent.pid, pending.ours).map(|mut child| {
                    (child.handed_off, child.created) =
                        (pending.sent, std::time::SystemTime::now());
                    child
                })
            }
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the preloaded parent closed its socket",
            )),
        };
        let _ = pending.reply.send(reply);
    }
    // Its children no request is left for: killed and reaped, nothing of
    // them runs unsupervised and no zombie stays.
    for pid in unnamed {
        let _ =
            tokio::task::spawn_blocking(move || super::spawner::kill_unsupervised_child(pid)).await;
    }
}

/// What a parent gone with requests unanswered left: the daemon's
/// children no try supervises that hold pipes (which name their try,
/// [`OurEnds::output_pipes`]), and the parent's other children, oldest
/// first: exited ones, and any that closed their pipes.
struct Orphans {
    live: Vec<(u32, Vec<u64>)>,
    unnamed: Vec<u32>,
}

/// The daemon's children that a parent, which closed its socket with
/// requests unanswered, forked for them ([`Orphans`]).
///
/// The problem: a parent that dies (an OOM kill, a crash, a retirement for
/// not answering) between a fork and its answer leaves a child that runs
/// the try (`CLONE_PARENT`: the daemon's child) although the daemon never
/// learnt its pid. Its try, asked again of a new parent, would run twice at
/// once, and the first child stay a zombie until the daemon exits. So the
/// parent is made sure to be gone (no fork can come after), and the
/// daemon's children no try supervises are looked for, once per death with
/// requests waiting (a walk of `/proc`). A running child is known by the
/// try's pipes it holds. One that has already exited holds none: it is
/// known by its session, its parent's pid (the parent leads a session of
/// its own), and matched to its request by the order of forks. Before, it
/// was not found: its try ran a second time, and it stayed a zombie.
async fn unanswered_children(parent: &Parent) -> Orphans {
    parent.retire();
    let mut exited = parent.exited.clone();
    let gone = exited.wait_for(|exited| *exited);
    let _ = tokio::time::timeout(ORPHAN_SEARCH / 2, gone).await;
    let daemon = i64::from(std::process::id());
    let session = i64::from(parent.pid);
    tokio::task::spawn_blocking(move || {
        let live = unsupervised_holding_pipes();
        let unnamed = crate::procinfo::children_in_session(daemon, session)
            .iter()
            .filter_map(|&pid| u32::try_from(pid).ok())
            .filter(|pid| !live.iter().any(|(named, _)| named == pid))
            .filter(|&pid| still_an_orphan_of(pid, daemon, session))
            .collect();
        Orphans { live, unnamed }
    })
    .await
    .unwrap_or(Orphans {
        live: Vec::new(),
        unnamed: Vec::new(),
    })
}

/// The daemon's running children no try supervises that hold pipes, with
/// the pipes each holds: a dead or stuck parent's children, each known by
/// its try's pipes ([`OurEnds::output_pipes`]). A walk of `/proc`: off the
/// runtime's thread.
fn unsupervised_holding_pipes() -> Vec<(u32, Vec<u64>)> {
    crate::procinfo::live_children(i64::from(std::process::id()))
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok())
        .filter(|&pid| !Child::is_supervised(pid))
        // A process the spawner is starting (a new parent, a try) holds
        // every descriptor of the daemon until its exec: taken for the
        // orphan, it was adopted by each waiting try (seen in CI once).
        .filter(|&pid| !crate::procinfo::runs_our_executable(i64::from(pid)))
        .map(|pid| (pid, crate::procinfo::pipes_held(i64::from(pid))))
        .filter(|(_, held)| !held.is_empty())
        .collect()
}

/// Whether `pid`, found among the children of `session`, still is one no
/// try supervises, unreaped, now that it is pinned by a pidfd. The walk
/// of `/proc` reads a child before the supervised set is asked: a try's
/// child reaped meanwhile (its waiter reaps it, then lets its pid go) would
/// pass, its pid maybe another process's by then, and be taken for an
/// orphan of the parent, given to a request and killed or adopted.
fn still_an_orphan_of(pid: u32, daemon: i64, session: i64) -> bool {
    let Ok(pidfd) = super::spawner::pidfd_open(pid) else {
        return false;
    };
    crate::procinfo::parent_and_session(i64::from(pid)) == Some((daemon, session))
        && !Child::is_supervised(pid)
        && super::spawner::child_state(&pidfd).is_some()
}

/// The child the answer of `parent` (its pid) names, or its error.
/// The pid a `pid` answer names, if it is one (a number above 1).
fn answered_pid(answer: &[u8]) -> Option<u32> {
    match answer.split(|&b| b == 0).collect::<Vec<_>>().as_slice() {
        [b"pid", pid, b""] => std::str::from_utf8(pid)
            .ok()
            .and_then(|pid| pid.parse().ok())
            .filter(|&pid| pid > 1),
        _ => None,
    }
}

fn read_answer(answer: &[u8], parent: u32, ours: OurEnds) -> io::Result<Child> {
    let fields: Vec<&[u8]> = answer.split(|&b| b == 0).collect();
    match fields.as_slice() {
        [b"pid", _, b""] => {
            let pid = answered_pid(answer).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "a pid that is not a number")
            })?;
            Child::adopt(pid, parent, ours)
        }
        [word @ (b"error" | b"short"), text, b""] => {
            let text = format!(
                "the preloaded parent could not fork: {}",
                String::from_utf8_lossy(text)
            );
            // `short`: out of processes or memory, the machine's shortage
            // and not the task's; the try never began and is given back
            // uncounted.
            Err(match *word {
                b"short" => super::spawner::DaemonShort::error(io::ErrorKind::Other, text),
                _ => io::Error::other(text),
            })
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "an answer that is neither pid, error nor short: {:?}",
                String::from_utf8_lossy(answer)
            ),
        )),
    }
}

/// One message from `socket`, as much of it as `buffer` holds: its length
/// (0 once the other end closed it and every message was read), which is
/// more than the buffer's when the rest was cut off.
///
/// A peer that closes its end with messages of ours unread in its queue
/// (a parent that died, or exited, with requests it had not read) makes
/// the kernel report `ECONNRESET` once, at the next read, even when its
/// answers wait before the end (`unix_release_sock`). That error is passed
/// over and the answers read: before, the reader stopped at it, and a
/// try whose child had already answered, and often exited, was asked of
/// the next parent and ran twice.
async fn receive(socket: &AsyncFd<OwnedFd>, buffer: &mut [u8]) -> io::Result<usize> {
    let mut reset_seen = false;
    loop {
        let mut ready = socket.readable().await?;
        // SAFETY: recv into a live buffer from our socket.
        let count = unsafe {
            libc::recv(
                socket.get_ref().as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if count >= 0 {
            return Ok(count as usize);
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::WouldBlock => ready.clear_ready(),
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::ConnectionReset if !reset_seen => reset_seen = true,
            _ => return Err(error),
        }
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let done = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether a send failed because the other end of the socket is gone.
fn gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECONNREFUSED)
    )
}

/// Sends one message with three descriptors (SCM_RIGHTS), without waiting:
/// a socket whose buffer is full (a parent that reads no requests) gives
/// `WouldBlock`. Public for the benchmark, which plays the daemon's part of
/// the protocol.
pub fn send_with_fds(
    socket: libc::c_int,
    message: &[u8],
    fds: &[libc::c_int; 3],
) -> io::Result<()> {
    // SAFETY: msghdr and its control buffer are built on the stack following
    // cmsg(3); every pointer stays valid for the sendmsg call.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: message.as_ptr() as *mut libc::c_void,
            iov_len: message.len(),
        };
        let fds_len = std::mem::size_of_val(fds) as libc::c_uint;
        let space = libc::CMSG_SPACE(fds_len) as usize;
        let mut control = vec![0u8; space];
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fds_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        loop {
            let sent = libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT);
            if sent >= 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreters_are_known_by_their_name_less_a_version() {
        for name in [
            "/usr/bin/python3",
            "/usr/bin/python3.11",
            "ruby3.2",
            "node",
            "bash",
            "env",
        ] {
            assert!(interpreter(std::path::Path::new(name)).is_some(), "{name}");
        }
        for name in [
            "/opt/app/bin/app",
            "/usr/bin/python-app",
            "my-tasks",
            "rails",
        ] {
            assert!(interpreter(std::path::Path::new(name)).is_none(), "{name}");
        }
    }

    #[test]
    fn an_interpreters_scripts_are_the_files_up_to_one_not_after_an_option() {
        let dir = std::env::temp_dir().join(format!("taskrunner-scripts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["app.py", "data.txt", "tracing.js", "server.js", "python3"] {
            std::fs::write(dir.join(file), "").unwrap();
        }
        let recipe = Recipe {
            workdir: dir.clone(),
            ..Recipe::default()
        };
        // `env`'s command, looked up as the spawner would: here, in `dir`.
        let resolve = |command: &Recipe| dir.join(&command.program);
        let scripts = |executable: &str, args: &[&str]| -> Vec<String> {
            let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
            scripts_of(std::path::Path::new(executable), &args, &recipe, &resolve)
                .iter()
                .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(scripts("python3", &["app.py", "data.txt"]), ["app.py"]);
        assert_eq!(
            scripts("python3", &["-u", "app.py", "data.txt"]),
            ["app.py"]
        );
        assert_eq!(
            scripts("node", &["-r", "tracing.js", "server.js", "data.txt"]),
            ["tracing.js", "server.js"]
        );
        assert_eq!(
            scripts(
                "/usr/bin/env",
                &["-i", "A=1", "python3", "app.py", "data.txt"]
            ),
            ["python3", "app.py"]
        );
        assert!(scripts("my-app", &["--db", "data.txt"]).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A parent that answered one request and then closed its socket with
    /// another one unread: its answer is read, then the end.
    #[tokio::test]
    async fn an_answer_before_a_close_with_requests_unread_is_read() {
        let (ours, theirs) = seqpacket_pair().unwrap();
        // SAFETY: the OwnedFd stays open, on the same socket, for as long
        // as the AsyncFd owns it.
        let ours = unsafe { AsyncFd::register(ours) }.unwrap();
        send_with_fds(ours.get_ref().as_raw_fd(), b"request 1\0", &[0, 1, 2]).unwrap();
        send_with_fds(ours.get_ref().as_raw_fd(), b"request 2\0", &[0, 1, 2]).unwrap();
        let mut buffer = [0u8; 64];
        // SAFETY: recv into a live buffer from a socket of ours (the
        // parent's end), which reads request 1 and leaves request 2.
        let read = unsafe {
            libc::recv(
                theirs.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        assert!(read > 0);
        // SAFETY: send from a live buffer on the parent's end.
        let sent = unsafe { libc::send(theirs.as_raw_fd(), c"pid 4711".as_ptr().cast(), 9, 0) };
        assert_eq!(sent, 9);
        drop(theirs);
        let count = receive(&ours, &mut buffer).await.unwrap();
        assert_eq!(&buffer[..count], b"pid 4711\0");
        assert_eq!(
            receive(&ours, &mut buffer).await.unwrap(),
            0,
            "then the end"
        );
    }
}
