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
//! use task_sdk::{Context, Task, Tasks};
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
//!         Ok(format!("hello {} x{}", options.name, options.times.max(1)))
//!     }
//! }
//!
//! // In `main`: `fn main() -> std::process::ExitCode { Tasks::new().register(Greet).serve() }`
//! let tasks = Tasks::new().register(Greet);
//! assert_eq!(tasks.names(), vec!["Greet"]);
//! let outcome = tasks.run_one("Greet", b":name: Ada\n:times: 2\n", &Context::for_test(7, 1));
//! assert_eq!(outcome.unwrap(), "hello Ada x2");
//! ```
#![warn(missing_docs)]

mod options;

use std::fmt;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use serde::de::DeserializeOwned;

pub use options::parse_options;

/// Exit status for options that do not fit the type (EX_DATAERR): the daemon
/// marks the request REJECTED and does not retry it.
pub const EXIT_REJECTED: u8 = 65;

/// What a task's `run` returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A task's error: any error converts into it; its whole chain of causes
/// becomes the failed try's result text.
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

/// A task type.
pub trait Task: Send + Sync + 'static {
    /// The registered name, as written in `task_class_name`.
    const NAME: &'static str;
    /// The options, deserialized from the request's YAML. Ruby's `:key:`
    /// spelling and `!ruby/...` tags are accepted. An empty `options`
    /// column reads as an empty map (or `null` for types that take one).
    type Options: DeserializeOwned;
    /// Runs one try; the returned text becomes the request's result_text.
    fn run(&self, options: Self::Options, context: &Context) -> Result<String>;
}

/// What a running task knows about its request.
#[derive(Debug, Clone)]
pub struct Context {
    /// The request's id (0 when run by hand without a row).
    pub request_id: i64,
    /// The try number, 1 on the first try.
    pub try_number: u32,
    /// The type name being run.
    pub task: String,
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALL_STOP_HANDLER: Once = Once::new();

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

impl Context {
    fn from_env(task: &str) -> Context {
        let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Context {
            request_id: number("TASKRUNNER_REQUEST_ID").unwrap_or(0),
            try_number: number("TASKRUNNER_TRY").map_or(1, |n: i64| n.clamp(1, u32::MAX as i64) as u32),
            task: task.to_string(),
        }
    }

    /// A context for unit tests of task types.
    pub fn for_test(request_id: i64, try_number: u32) -> Context {
        Context {
            request_id,
            try_number,
            task: String::new(),
        }
    }

    /// Reports progress; the daemon keeps the latest line on the row.
    pub fn progress(&self, text: impl fmt::Display) {
        let line = text.to_string().replace('\n', " ");
        eprintln!("progress: {line}");
    }

    /// Writes a log line to stderr (kept in result_text if the try fails).
    pub fn log(&self, text: impl fmt::Display) {
        eprintln!("{text}");
    }

    /// Whether the daemon asked this task to stop (timeout, cancel,
    /// shutdown). The first call opts in: from then on SIGTERM no longer
    /// kills the process but sets this flag, so the task can clean up and
    /// return; the daemon still sends SIGKILL after `kill_grace`. A task that
    /// never calls it simply dies on SIGTERM.
    pub fn stop_requested(&self) -> bool {
        INSTALL_STOP_HANDLER.call_once(|| {
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
            }
        });
        STOP_REQUESTED.load(Ordering::SeqCst)
    }
}

/// Why one run did not produce a result.
#[derive(Debug)]
pub enum RunError {
    /// The options do not fit the type (exit 65, REJECTED).
    Rejected(String),
    /// The task returned an error or panicked (exit 1, FAILED).
    Failed(String),
    /// No type of that name is registered.
    Unknown(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Rejected(message) | RunError::Failed(message) | RunError::Unknown(message) => {
                f.write_str(message)
            }
        }
    }
}

type Runner = Box<dyn Fn(&[u8], &Context) -> std::result::Result<String, RunError> + Send + Sync>;

/// The task types of one program.
#[derive(Default)]
pub struct Tasks {
    tasks: Vec<(&'static str, Runner)>,
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
        let runner: Runner = Box::new(move |input, context| {
            let options: T::Options = parse_options(input).map_err(|error| {
                RunError::Rejected(format!("options do not fit {}: {error}", T::NAME))
            })?;
            match catch_unwind(AssertUnwindSafe(|| task.run(options, context))) {
                Ok(Ok(text)) => Ok(text),
                Ok(Err(error)) => Err(RunError::Failed(error.chain())),
                Err(panic) => Err(RunError::Failed(format!("panicked: {}", panic_message(&panic)))),
            }
        });
        self.tasks.push((T::NAME, runner));
        self
    }

    /// The registered names, in registration order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(name, _)| *name).collect()
    }

    /// Runs one type with raw options (what `serve` does after reading stdin).
    pub fn run_one(&self, task: &str, options: &[u8], context: &Context) -> std::result::Result<String, RunError> {
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
    /// exit code.
    pub fn serve(self) -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--list-tasks") {
            let mut out = std::io::stdout().lock();
            for name in self.names() {
                let _ = writeln!(out, "{name}");
            }
            return ExitCode::SUCCESS;
        }
        let task = match std::env::var("TASKRUNNER_TASK").ok().or_else(|| args.first().cloned()) {
            Some(task) => task,
            None => {
                eprintln!(
                    "usage: set TASKRUNNER_TASK (or pass the type as the first argument), options as YAML on stdin; --list-tasks lists: {}",
                    self.names().join(", ")
                );
                return ExitCode::from(2);
            }
        };
        let mut options = Vec::new();
        if let Err(error) = std::io::stdin().read_to_end(&mut options) {
            eprintln!("cannot read options from stdin: {error}");
            return ExitCode::FAILURE;
        }
        // Panics are reported by `register`'s runner; keep the default
        // hook's noise out of the result text.
        std::panic::set_hook(Box::new(|_| {}));
        match self.run_one(&task, &options, &Context::from_env(&task)) {
            Ok(text) => {
                let mut out = std::io::stdout().lock();
                let written = out.write_all(text.as_bytes()).and_then(|_| out.flush());
                if written.is_err() {
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Err(RunError::Rejected(message)) => {
                eprintln!("{message}");
                ExitCode::from(EXIT_REJECTED)
            }
            Err(RunError::Failed(message)) | Err(RunError::Unknown(message)) => {
                eprintln!("{message}");
                ExitCode::FAILURE
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}
