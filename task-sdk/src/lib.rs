//! Write taskrunner task types in Rust.
//!
//! A task type has a registered name, typed options read from the request's
//! YAML, and a `run` method. One call in `main` registers any number of them
//! and speaks taskrunner's process protocol: `--list-tasks` prints the names;
//! otherwise the type named by `TASKRUNNER_TASK` (or the first argument) runs
//! with its options read from standard input, its result text goes to
//! standard output, and the exit status tells the daemon how it went
//! (0 finished, 65 options that do not fit the type, 1 failed).
//!
//! ```
//! use serde::Deserialize;
//! use task_sdk::{Context, ResultExt, Task, Tasks};
//!
//! #[derive(Deserialize)]
//! struct GreetOptions {
//!     name: String,
//!     #[serde(default)]
//!     times: u32,
//! }
//!
//! struct Greet;
//!
//! impl Task for Greet {
//!     const NAME: &'static str = "Greet";
//!     type Options = GreetOptions;
//!
//!     fn run(&self, options: GreetOptions, context: &Context) -> task_sdk::Result<String> {
//!         context.progress("greeting");
//!         if options.name.is_empty() {
//!             // `?` converts any error; `context` says what was being done.
//!             std::fs::read_to_string("/nonexistent/names.txt").context("looking up a name")?;
//!         }
//!         Ok(format!("hello {} x{}", options.name, options.times.max(1)))
//!     }
//! }
//!
//! // In `main`: `fn main() -> std::process::ExitCode { Tasks::new().register(Greet).serve() }`
//! let tasks = Tasks::new().register(Greet);
//! assert_eq!(tasks.names(), vec!["Greet"]);
//! // Ruby's `:key:` spelling reads like `key:`.
//! let outcome = tasks.run_one("Greet", b":name: Ada\n:times: 2\n", &Context::for_test(7, 1));
//! assert_eq!(outcome.unwrap(), "hello Ada x2");
//! // Options that do not fit the type are rejected (exit 65, REJECTED) ...
//! let outcome = tasks.run_one("Greet", b"nme: Ada\n", &Context::for_test(8, 1));
//! assert!(matches!(outcome, Err(task_sdk::RunError::Rejected(_))));
//! // ... and an error fails the try with its whole chain of causes.
//! let outcome = tasks.run_one("Greet", b"name: ''\n", &Context::for_test(9, 1));
//! assert_eq!(
//!     outcome.unwrap_err().to_string(),
//!     "looking up a name: No such file or directory (os error 2)"
//! );
//! ```
//!
//! With the cargo feature `enqueue`, `Enqueue` inserts typed requests
//! through an application's own sqlx pool, connection or transaction, and
//! `wait_for` (or `Enqueue::insert_and_wait`) waits for a request's final
//! result (LISTEN/NOTIFY on PostgreSQL, `PRAGMA data_version` on SQLite).
//!
//! # Writing a task type
//!
//! - Write the result text to the returned `String`, not to standard
//!   output: whatever the task prints there becomes part of result_text.
//!   Log with [`Context::log`] (standard error, kept when a try fails).
//! - Return an error (anything that implements `std::error::Error`, or
//!   [`Error::msg`]) to fail the try: the daemon retries it after its
//!   backoff while tries remain. A panic is a failure too, reported with its
//!   message and location (unless the program is built with `panic = "abort"`).
//! - Tasks run at least once: make them idempotent.
#![warn(missing_docs)]

mod callback;
#[cfg(feature = "enqueue")]
pub mod enqueue;
mod flow;
mod options;
mod preload;
#[cfg(feature = "enqueue")]
pub mod wait;

use std::fmt;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use serde::de::DeserializeOwned;

pub use callback::{BatchCallback, BatchSummary, Failure, NoOptions, Parent, RequestCallback};
#[cfg(feature = "enqueue")]
pub use enqueue::{Batch, Enqueue, StartFlow, LONGEST_DELAY, LONGEST_NAME};
pub use flow::{Flow, OptionType};
pub use options::parse_options;
#[cfg(feature = "enqueue")]
pub use wait::{wait_for, wait_for_flow, FinalState, Finished, FlowEnd, WaitError};

/// Exit status for options that do not fit the type (EX_DATAERR): the daemon
/// marks the request REJECTED and does not retry it.
pub const EXIT_REJECTED: u8 = 65;

/// What a task's `run` returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A task's error: any error converts into it (with `?`); its whole chain of
/// causes becomes the failed try's result text, joined with `: `.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself
/// (that would conflict with the blanket conversion). An `anyhow::Error`
/// converts with `Error::msg(format!("{error:#}"))`.
pub struct Error {
    inner: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl Error {
    /// An error with just a message.
    pub fn msg(message: impl fmt::Display) -> Error {
        Error {
            inner: message.to_string().into(),
        }
    }

    /// This error, with `message` in front saying what was being done.
    pub fn context(self, message: impl fmt::Display) -> Error {
        Error {
            inner: Box::new(WithContext {
                message: message.to_string(),
                source: self.inner,
            }),
        }
    }

    /// The message and every cause, joined with `: `.
    pub fn chain(&self) -> String {
        let mut text = self.inner.to_string();
        let mut source = self.inner.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Error {
    fn from(error: E) -> Error {
        Error {
            inner: Box::new(error),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}

/// A message in front of a cause: one link of an error chain.
#[derive(Debug)]
struct WithContext {
    message: String,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl fmt::Display for WithContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WithContext {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Adds what was being done to an error, as `anyhow::Context` does:
/// `std::fs::read(&path).context(format!("reading {}", path.display()))?`.
pub trait ResultExt<T> {
    /// On error, puts `message` in front of it.
    fn context(self, message: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, message: impl fmt::Display) -> Result<T> {
        self.map_err(|error| error.into().context(message))
    }
}

/// A task type.
pub trait Task: Send + Sync + 'static {
    /// The registered name, as written in `task_class_name`. Names are
    /// global to a daemon: two programs registering one name stop it at
    /// start.
    const NAME: &'static str;
    /// The options, deserialized from the request's YAML. Ruby's `:key:`
    /// spelling and `!ruby/...` tags are accepted. An empty `options`
    /// column reads as an empty map (or `null` for types that take one, such
    /// as `Option<…>` or `()`). Options that do not deserialize make the
    /// request REJECTED, not retried; `#[serde(deny_unknown_fields)]` makes
    /// misspelt keys count as not fitting.
    type Options: DeserializeOwned;
    /// One line on what the type does and what its options mean, shown by
    /// `PROGRAM --help`, `taskrunner-cli tasks NAME` and `taskrunner-cli
    /// enqueue NAME --help` (with the options' names, read from `Options`).
    const DESCRIPTION: &'static str = "";
    /// Runs one try; the returned text becomes the request's result_text,
    /// an error or a panic fails the try.
    fn run(&self, options: Self::Options, context: &Context) -> Result<String>;
}

/// What a running task knows about its request, and how it talks back.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Context {
    /// The request's id (0 when run by hand without a row).
    pub request_id: i64,
    /// The try number, 1 on the first try (`TASKRUNNER_TRY`).
    pub try_number: u32,
    /// The type name being run.
    pub task: String,
    /// The batch the request is a member of, or whose end this callback
    /// answers (`TASKRUNNER_BATCH_ID`). A running member adds members to
    /// its own batch with `Enqueue::batch` in the application's own
    /// transaction (feature `enqueue`).
    pub batch_id: Option<i64>,
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALL_STOP_HANDLER: Once = Once::new();

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

impl Context {
    fn from_env(task: &str) -> Context {
        let number = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        Context {
            request_id: number("TASKRUNNER_REQUEST_ID").unwrap_or(0),
            try_number: number("TASKRUNNER_TRY").map_or(1, |n| n.clamp(1, u32::MAX as i64) as u32),
            task: task.to_string(),
            batch_id: number("TASKRUNNER_BATCH_ID").filter(|id| *id > 0),
        }
    }

    /// A context for unit tests of task types.
    pub fn for_test(request_id: i64, try_number: u32) -> Context {
        Context {
            request_id,
            try_number,
            task: String::new(),
            batch_id: None,
        }
    }

    /// Reports progress: the daemon keeps the latest line on the row's
    /// `progress` column, shown by `taskrunner-cli show` and `status`.
    /// Text past [`PROGRESS_TEXT_MAX`] bytes is cut (at a character), with
    /// `…`.
    pub fn progress(&self, text: impl fmt::Display) {
        eprintln!("{}", progress_line(&text.to_string()));
    }

    /// Asks for the next try `delay` from now instead of after the type's
    /// backoff, should this try fail (return an error): a rate-limited
    /// API's `Retry-After`, an input not there yet. The try counts as any
    /// failed one; the latest call wins; at most a day. It writes the line
    /// `retry_after: DURATION` to standard error, which any program may
    /// write itself.
    pub fn retry_after(&self, delay: std::time::Duration) {
        eprintln!("{}", retry_after_line(delay));
    }

    /// Writes a log line to standard error (its tail is kept in result_text
    /// if the try fails).
    pub fn log(&self, text: impl fmt::Display) {
        eprintln!("{text}");
    }

    /// Whether the daemon asked this task to stop (timeout, cancel,
    /// shutdown): check it between steps, clean up and return.
    ///
    /// The first call opts in: from then on SIGTERM no longer kills the
    /// process but sets this flag, so the task can clean up and return (an
    /// error, usually; the daemon records the try as TIMEOUT, CANCELLED or
    /// INTERRUPTED whatever it returns). The daemon repeats SIGTERM every
    /// `kill_retry` and sends SIGKILL after `kill_grace`. A task that never
    /// calls it simply dies on the first SIGTERM. Call it once at the start
    /// of `run` to opt in before any long step.
    pub fn stop_requested(&self) -> bool {
        INSTALL_STOP_HANDLER.call_once(|| {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe {
                libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
            }
        });
        STOP_REQUESTED.load(Ordering::SeqCst)
    }
}

/// The most text of a progress line the daemon keeps: it passes over a
/// longer line (1 KiB with `progress: `). (Before, [`Context::progress`]
/// wrote the whole text, and a long one was never seen.)
pub const PROGRESS_TEXT_MAX: usize = 1024 - "progress: ".len();

/// The line [`Context::progress`] writes for `text`: one line, at most
/// [`PROGRESS_TEXT_MAX`] bytes of text.
pub fn progress_line(text: &str) -> String {
    let mut text = text.replace(['\n', '\r'], " ");
    if text.len() > PROGRESS_TEXT_MAX {
        let mut cut = PROGRESS_TEXT_MAX - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    format!("progress: {text}")
}

/// The line [`Context::retry_after`] writes (milliseconds, rounded up).
#[doc(hidden)]
pub fn retry_after_line(delay: std::time::Duration) -> String {
    format!("retry_after: {}ms", delay.as_micros().div_ceil(1000))
}

/// Why one run did not produce a result.
#[derive(Debug)]
pub enum RunError {
    /// The options do not fit the type (exit 65, REJECTED).
    Rejected(String),
    /// The task returned an error or panicked (exit 1, FAILED).
    Failed(String),
    /// No type of that name is registered (exit 1, FAILED).
    Unknown(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Rejected(message)
            | RunError::Failed(message)
            | RunError::Unknown(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for RunError {}

type Runner = Box<dyn Fn(&[u8], &Context) -> std::result::Result<String, RunError> + Send + Sync>;

/// The latest panic seen by the hook `serve` installs: `at FILE:LINE:COL: MESSAGE`.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// The task types of one program.
#[derive(Default)]
pub struct Tasks {
    tasks: Vec<(&'static str, Runner)>,
    setup: Option<Box<dyn FnOnce() + Send>>,
    /// Per type, in registration order: its description and option names.
    help: Vec<TypeHelp>,
    /// Flows whose steps are (mostly) this program's types (`--list-flows`).
    flows: Vec<Flow>,
}

/// What `--help` says about one type.
struct TypeHelp {
    name: &'static str,
    description: &'static str,
    options: Option<&'static [&'static str]>,
}

impl Tasks {
    /// No task types yet.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Adds a task type. Registering one name twice panics: it is a
    /// programming mistake, caught the first time the program runs.
    pub fn register<T: Task>(mut self, task: T) -> Tasks {
        assert!(
            self.tasks.iter().all(|(name, _)| *name != T::NAME),
            "task type `{}` is registered twice",
            T::NAME
        );
        assert!(
            !T::NAME.is_empty() && !T::NAME.contains(char::is_whitespace),
            "task type name `{}` must be one word",
            T::NAME
        );
        let runner: Runner = Box::new(move |input, context| {
            let options: T::Options = parse_options(input).map_err(|error| {
                RunError::Rejected(format!("options do not fit {}: {error}", T::NAME))
            })?;
            LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            match catch_unwind(AssertUnwindSafe(|| task.run(options, context))) {
                Ok(Ok(text)) => Ok(text),
                Ok(Err(error)) => Err(RunError::Failed(error.chain())),
                Err(panic) => {
                    let seen_by_hook = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
                    Err(RunError::Failed(match seen_by_hook {
                        Some(located) => format!("panicked {located}"),
                        None => format!("panicked: {}", panic_message(&*panic)),
                    }))
                }
            }
        });
        self.tasks.push((T::NAME, runner));
        self.help.push(TypeHelp {
            name: T::NAME,
            description: T::DESCRIPTION,
            options: options::option_names::<T::Options>(),
        });
        self
    }

    /// The program's one-time initialization (load a model, read a large
    /// config, warm a cache), run by [`serve`](Tasks::serve) before the
    /// first task runs. Keep what it makes in a `static` (e.g. a
    /// `std::sync::OnceLock`) for the tasks to use.
    ///
    /// Keep no open descriptor for the tasks (a connection, a file, a log
    /// handle): a preloaded try starts with descriptors 0-2 only, as an
    /// exec'd one does, so a connection the setup made is closed in every
    /// try, and its number may be reused by the next file the task opens
    /// (its writes would land there). Connect in the task, e.g. in a
    /// `OnceLock` the task fills on first use.
    ///
    /// This is what preload (`preload: true` in the daemon's config) saves:
    /// a preloaded program runs its setup once, then forks a child for each
    /// try, which starts with everything the setup made. Exec'd, it runs
    /// before each try. It must leave no thread running: a fork copies only
    /// the calling thread, so the SDK refuses to preload (and says why) while
    /// more than one thread is alive; the daemon then runs the program's
    /// tries exec'd.
    pub fn setup(mut self, init: impl FnOnce() + Send + 'static) -> Tasks {
        self.setup = Some(Box::new(init));
        self
    }

    /// Declares a flow (see [`Flow`]); the daemon learns it from
    /// `PROGRAM --list-flows`. Declaring one name twice panics.
    pub fn flow(mut self, flow: Flow) -> Tasks {
        assert!(
            self.flows.iter().all(|f| f.name() != flow.name()),
            "flow `{}` is declared twice",
            flow.name()
        );
        let _ = flow.definition(); // checks it has steps, at once
        self.flows.push(flow);
        self
    }

    /// What `PROGRAM --list-flows` prints: the flows as YAML (the config's
    /// `flows:` format), nothing when there are none.
    pub fn flows_yaml(&self) -> String {
        flow::flows_yaml(&self.flows)
    }

    /// What `PROGRAM --help [TYPE]` prints: each type (or the one named),
    /// its description and its options.
    pub fn help(&self, only: Option<&str>) -> String {
        let mut out = String::new();
        for help in self
            .help
            .iter()
            .filter(|h| only.is_none_or(|name| h.name == name))
        {
            out += help.name;
            if !help.description.is_empty() {
                out += &format!(": {}", help.description);
            }
            out += "\n";
            match help.options {
                Some([]) | None => out += "  options: (none declared)\n",
                Some(names) => out += &format!("  options: {}\n", names.join(", ")),
            }
        }
        out
    }

    /// The registered names, in registration order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(name, _)| *name).collect()
    }

    /// Runs one type with raw options (what `serve` does after reading
    /// stdin); handy in tests.
    pub fn run_one(
        &self,
        task: &str,
        options: &[u8],
        context: &Context,
    ) -> std::result::Result<String, RunError> {
        let (_, runner) = self
            .tasks
            .iter()
            .find(|(name, _)| *name == task)
            .ok_or_else(|| {
                RunError::Unknown(format!(
                    "unknown task type `{task}`; this program has: {}",
                    self.names().join(", ")
                ))
            })?;
        runner(options, context)
    }

    /// Implements the process protocol; call it from `main` and return its
    /// exit code:
    ///
    /// - `PROGRAM --list-tasks` prints the registered names, one a line;
    /// - `PROGRAM --list-flows` prints the declared flows as YAML;
    /// - `PROGRAM --help [TYPE]` describes the types and their options;
    /// - otherwise the type named by `TASKRUNNER_TASK` (or the first
    ///   argument, for running it by hand) runs with the options read from
    ///   standard input; its result text goes to standard output and the
    ///   exit status is 0; an error or a panic goes to standard error with
    ///   exit status 1; options that do not fit exit with 65;
    /// - with `TASKRUNNER_PRELOAD=1` (set by the daemon for a program with
    ///   `preload: true`) it runs the setup once and then serves the
    ///   daemon's requests on standard input (the README's "Preload
    ///   protocol"), forking a child per try.
    pub fn serve(mut self) -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().is_some_and(|a| a == "--help" || a == "-h") {
            let only = args.get(1).map(String::as_str);
            if only.is_some_and(|name| !self.names().contains(&name)) {
                eprintln!(
                    "unknown task type `{}`; this program has: {}",
                    only.unwrap_or_default(),
                    self.names().join(", ")
                );
                return ExitCode::from(2);
            }
            if only.is_none() {
                println!(
                    "task types (run one: set TASKRUNNER_TASK or pass its name first, options as YAML on standard input; --list-tasks lists the names):\n"
                );
            }
            print!("{}", self.help(only));
            return ExitCode::SUCCESS;
        }
        if args.iter().any(|a| a == "--list-flows") {
            let mut out = std::io::stdout().lock();
            return if out
                .write_all(self.flows_yaml().as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
            {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        if args.iter().any(|a| a == "--list-tasks") {
            let mut out = std::io::stdout().lock();
            for name in self.names() {
                if writeln!(out, "{name}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
            return if out.flush().is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        if let Some(setup) = self.setup.take() {
            setup();
        }
        if std::env::var_os("TASKRUNNER_PRELOAD").is_some_and(|v| v == "1") {
            return preload::serve(&self);
        }
        ExitCode::from(self.run_from_env(&args))
    }

    /// Runs the type the environment (or the first argument) names, with
    /// the options on stdin; returns the exit status.
    fn run_from_env(&self, args: &[String]) -> u8 {
        let task = match std::env::var("TASKRUNNER_TASK")
            .ok()
            .or_else(|| args.first().cloned())
        {
            Some(task) => task,
            None => {
                eprintln!(
                    "usage: set TASKRUNNER_TASK (or pass the type as the first argument), options as YAML on stdin; --list-tasks lists: {}",
                    self.names().join(", ")
                );
                return 2;
            }
        };
        let mut options = Vec::new();
        if let Err(error) = read_stdin(&mut options) {
            eprintln!("cannot read options from stdin: {error}");
            return 1;
        }
        install_panic_hook();
        match self.run_one(&task, &options, &Context::from_env(&task)) {
            Ok(text) => {
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    Ok(()) => 0,
                    Err(_) => 1,
                }
            }
            Err(RunError::Rejected(message)) => {
                eprintln!("{message}");
                EXIT_REJECTED
            }
            Err(RunError::Failed(message)) | Err(RunError::Unknown(message)) => {
                eprintln!("{message}");
                1
            }
        }
    }
}

/// Reads standard input to its end, straight from descriptor 0: the
/// options are read once, whole (std's `stdin()` allocates a buffer first,
/// and a `File` asks the size of what is a pipe).
fn read_stdin(into: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        // SAFETY: read into a live buffer of its length.
        let count = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
        match count {
            0 => return Ok(()),
            1.. => into.extend_from_slice(&chunk[..count as usize]),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// Replaces the default panic output (a multi-line message and a backtrace
/// note) with one line: a panic in the task's own thread is remembered for
/// the runner to report once; a panic in another thread is logged as it
/// happens, since the task may well survive it.
fn install_panic_hook() {
    let task_thread = std::thread::current().id();
    std::panic::set_hook(Box::new(move |info| {
        let message = panic_message(info.payload());
        let located = match info.location() {
            Some(location) => format!("at {location}: {message}"),
            None => format!(": {message}"),
        };
        if std::thread::current().id() == task_thread {
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(located);
        } else {
            let thread = std::thread::current();
            eprintln!(
                "thread `{}` panicked {located}",
                thread.name().unwrap_or("unnamed")
            );
        }
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_progress_text_is_cut_at_a_character_to_what_the_daemon_keeps() {
        let line = super::progress_line(&"é".repeat(2000));
        assert!(line.len() <= 1024, "{}", line.len());
        assert!(line.starts_with("progress: é") && line.ends_with('…'));
        assert_eq!(super::progress_line("a\nb"), "progress: a b");
    }

    use super::*;
    use serde::Deserialize;

    struct Fails;

    impl Task for Fails {
        const NAME: &'static str = "Fails";
        type Options = ();

        fn run(&self, _: (), _: &Context) -> Result<String> {
            let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
            Err(Error::from(io)
                .context("reading input.txt")
                .context("counting words"))
        }
    }

    struct Panics;

    #[derive(Deserialize)]
    struct PanicOptions {
        message: String,
    }

    impl Task for Panics {
        const NAME: &'static str = "Panics";
        type Options = PanicOptions;

        fn run(&self, options: PanicOptions, _: &Context) -> Result<String> {
            panic!("{}", options.message)
        }
    }

    #[test]
    fn an_error_fails_with_its_whole_chain() {
        let tasks = Tasks::new().register(Fails);
        let error = tasks
            .run_one("Fails", b"", &Context::for_test(1, 1))
            .unwrap_err();
        assert!(matches!(error, RunError::Failed(_)));
        assert_eq!(
            error.to_string(),
            "counting words: reading input.txt: no such file"
        );
    }

    #[test]
    fn a_panic_fails_with_its_message() {
        let tasks = Tasks::new().register(Panics);
        let error = tasks
            .run_one("Panics", b"message: boom", &Context::for_test(1, 1))
            .unwrap_err();
        assert!(matches!(error, RunError::Failed(_)));
        assert!(error.to_string().contains("boom"), "{error}");
    }

    #[test]
    fn an_unknown_type_names_the_known_ones() {
        let tasks = Tasks::new().register(Fails).register(Panics);
        let error = tasks
            .run_one("Nope", b"", &Context::for_test(1, 1))
            .unwrap_err();
        assert!(matches!(error, RunError::Unknown(_)));
        assert!(error.to_string().contains("Fails, Panics"), "{error}");
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn registering_a_name_twice_panics() {
        let _ = Tasks::new().register(Fails).register(Fails);
    }

    #[test]
    fn context_reads_its_environment_leniently() {
        let context = Context::from_env("X");
        assert!(context.try_number >= 1);
        assert_eq!(context.task, "X");
    }
}
