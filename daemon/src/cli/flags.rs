//! `taskrunner-cli`'s flags (clap structs, raw, their `///` docs are the
//! help text) and the dispatch: one arm per command, from flags to the
//! config, the store and an exit status.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand};

use super::render::{describe_tasks, render_schedules, render_show, render_status, render_table};
use super::run::run_command;
use super::{batch, flow};
use crate::config::{Config, Overrides};
use crate::escape::one_line;
use crate::request::{RequestId, State};
use crate::store::{
    check_pause_name, in_flow_text, key_held_text, Change, ListQuery, NewRequest, PauseKind,
    Purpose, Seen, Store,
};
use crate::task_types::Registry;
use crate::units::{parse_duration, parse_wait, LONGEST_WAIT};

/// Enqueue, inspect, run and recover taskrunner requests.
///
/// The flags before the command apply to every command that uses them; each
/// command also takes, after its name, those it uses.
#[derive(Debug, Parser)]
#[command(name = "taskrunner-cli", version)]
pub(crate) struct Flags {
    /// Config file (default: ./taskrunner.yml, else /etc/taskrunner/taskrunner.yml)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL (overrides DATABASE_URL and the config)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Host id whose rows `reap` probes (default: the config's, else the hostname)
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// The daemon's control socket (default: the config's `socket`)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the database is: for every command that opens it.
#[derive(Debug, Clone, Default, clap::Args)]
struct DatabaseFlags {
    /// Config file (default: ./taskrunner.yml, else /etc/taskrunner/taskrunner.yml)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL (overrides DATABASE_URL and the config)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

/// What `pause` and `resume` name.
#[derive(Debug, Clone, clap::Args)]
struct PauseTargets {
    /// A queue (repeatable)
    #[arg(long, value_name = "NAME")]
    queue: Vec<String>,
    /// A task type, in every queue (repeatable)
    #[arg(long, value_name = "NAME")]
    task: Vec<String>,
}

/// The daemon's control socket: for commands that wake or ask the daemon.
#[derive(Debug, Clone, Default, clap::Args)]
struct SocketFlag {
    /// The daemon's control socket (default: the config's `socket`)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// The host whose rows are probed or claimed.
#[derive(Debug, Clone, Default, clap::Args)]
struct HostFlag {
    /// Host id (default: the config's, else the hostname)
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
}

/// Which requests `retry` and `cancel` act on: the ids given, or every row
/// the filter selects (one of the two, not both).
#[derive(Debug, Clone, clap::Args)]
struct Selection {
    #[arg(value_name = "ID", required_unless_present_any = ["result", "task", "queue", "host", "batch", "flow"])]
    ids: Vec<RequestId>,
    #[command(flatten)]
    filter: RowFilter,
}

/// Which requests: for `list`, and for `retry` and `cancel` without ids.
///
/// An empty name or an id of 0 is refused: the store reads them as "any"
/// (`$2 = '' OR …`), and `cancel --task "$UNSET"` cancelled every row.
#[derive(Debug, Clone, Default, clap::Args)]
struct RowFilter {
    /// Only this state: a result (FAILED, RUNNING…), `pending` (never run),
    /// `retrying` (failed, will run again) or `exhausted` (failed, no tries left)
    #[arg(long, visible_alias = "state", value_name = "R", value_parser = parse_state_filter)]
    result: Option<String>,
    /// Only this task type
    #[arg(long, value_name = "TYPE", value_parser = NonEmptyStringValueParser::new())]
    task: Option<String>,
    /// Only this queue
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    queue: Option<String>,
    /// Only rows that ran (or run) on this host
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    host: Option<String>,
    /// Only the members of this batch, and its callback
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    batch: Option<i64>,
    /// Only the step and revert rows of this flow
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    flow: Option<i64>,
}

impl RowFilter {
    fn is_empty(&self) -> bool {
        self.result.is_none()
            && self.task.is_none()
            && self.queue.is_none()
            && self.host.is_none()
            && self.batch.is_none()
            && self.flow.is_none()
    }

    fn query(&self, limit: i64) -> ListQuery {
        ListQuery {
            state: self.result.clone(),
            task: self.task.clone(),
            queue: self.queue.clone(),
            host: self.host.clone(),
            batch: self.batch,
            flow: self.flow,
            limit,
        }
    }
}

/// `--result`'s value: a state as stored (any case), or a word for several.
fn parse_state_filter(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    if ["pending", "retrying", "exhausted"].contains(&lower.as_str()) {
        return Ok(lower);
    }
    text.parse::<State>()
        .map(|state| state.as_str().to_string())
        .map_err(|_| {
            format!(
                "unknown state `{text}` (a result such as FAILED or RUNNING, or pending, retrying, exhausted)"
            )
        })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the schema, and say which
    Migrate {
        #[command(flatten)]
        database: DatabaseFlags,
    },
    /// Insert a request and print its id
    Enqueue {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        socket: SocketFlag,
        /// The task type, e.g. NoOp
        task: String,
        /// Options as YAML
        #[arg(long, value_name = "YAML")]
        options: Option<String>,
        /// Do not run before this long from now (e.g. 10m)
        #[arg(long, value_name = "DUR", value_parser = parse_wait, conflicts_with = "at")]
        delay: Option<Duration>,
        /// Do not run before this time (e.g. 2026-11-24T07:00:00Z, or 2026-11-24 for its midnight; UTC if no offset)
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<String>,
        /// Tries allowed (default 5)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=i64::from(i32::MAX)))]
        try_limit: Option<i64>,
        /// Higher runs first (default 0; from -2147483647 to 2147483647,
        /// what every backend stores and claims)
        #[arg(long, value_name = "N", allow_hyphen_values = true,
              value_parser = clap::value_parser!(i64).range(crate::request::PRIORITIES))]
        priority: Option<i64>,
        /// While a pending or running request has this key, insert nothing
        /// and print that request's id instead
        #[arg(long, value_name = "KEY")]
        unique_key: Option<String>,
        /// The queue (default: `default`); daemons serve the queues of their `queues:`
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        /// Run only on the daemon whose `node_name` is this
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Never run on the daemon whose `node_name` is this
        #[arg(long, value_name = "NAME")]
        not_node: Option<String>,
        /// Repeat: when a try ends (finished or exhausted), the next
        /// occurrence is enqueued this long after this one's planned start (e.g. 1h)
        #[arg(long, value_name = "DUR", value_parser = parse_period)]
        period: Option<i64>,
        /// A member of this batch (refused once the batch has ended)
        #[arg(long, value_name = "ID")]
        batch: Option<i64>,
        /// Task type run once when this request FINISHED
        #[arg(long, value_name = "TYPE")]
        on_success: Option<String>,
        /// Task type run once when this request is exhausted or REJECTED
        #[arg(long, value_name = "TYPE")]
        on_failure: Option<String>,
    },
    /// Show requests as a table, newest first
    List {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        filter: RowFilter,
        /// At most this many rows
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// One JSON object per row, a line each, every column
        #[arg(long)]
        json: bool,
    },
    /// Show one request, every column, the full result_text
    Show {
        #[command(flatten)]
        database: DatabaseFlags,
        #[arg(value_name = "ID")]
        id: RequestId,
        /// As one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Run one task in the foreground (for debugging); exits 0 on success
    Run {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        host: HostFlag,
        /// The task type (without --id)
        #[arg(required_unless_present = "id", conflicts_with = "id")]
        task: Option<String>,
        /// Options as YAML (without --id)
        #[arg(long, value_name = "YAML", conflicts_with = "id")]
        options: Option<String>,
        /// Run this stored request's task and options, without changing the row
        #[arg(long, value_name = "ID")]
        id: Option<RequestId>,
        /// With --id: claim the row and record the outcome as a try
        #[arg(long)]
        record: bool,
    },
    /// Mark RUNNING rows whose process or daemon is gone as CRASHED (a try with
    /// no process recorded is given back: INTERRUPTED)
    Reap {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        host: HostFlag,
        #[command(flatten)]
        socket: SocketFlag,
        /// Only print what would be marked
        #[arg(long)]
        dry_run: bool,
    },
    /// Make requests run again (tries back to 0): the given ids, or those
    /// the filter selects (e.g. --result FAILED --task Thumbnail)
    Retry {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        socket: SocketFlag,
        #[command(flatten)]
        selection: Selection,
    },
    /// Cancel requests (a running one is stopped by its daemon): the given
    /// ids, or those the filter selects
    Cancel {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        socket: SocketFlag,
        #[command(flatten)]
        selection: Selection,
    },
    /// Delete finished, cancelled, rejected and exhausted requests
    /// (without --older-than: as the config's `retention:` says)
    Purge {
        #[command(flatten)]
        database: DatabaseFlags,
        /// Completed longer ago than this (e.g. 30d), whatever their kind
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
    /// Wait until a request is final; print its result_text; exit 0 if it FINISHED
    Wait {
        #[command(flatten)]
        database: DatabaseFlags,
        #[arg(value_name = "ID")]
        id: RequestId,
        /// Give up after this long (exit status 1)
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Ask the running daemon what it is doing
    Status {
        /// Config file, for its `socket:`
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketFlag,
        /// Print the daemon's answer as JSON
        #[arg(long)]
        json: bool,
    },
    /// Batches: jobs of many requests with a callback that runs once
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// Flows: steps with execute and revert, resumed where they stopped
    #[command(subcommand)]
    Flow(flow::FlowCommand),
    /// Check or create a config file
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Serve the web page on the database (with or without a running daemon)
    Web {
        #[command(flatten)]
        database: DatabaseFlags,
        /// Address and port (default: the config's http.listen, else 127.0.0.1:8080);
        /// other than loopback only with http.auth
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Print the Prometheus metrics once (the daemon's, through its socket,
    /// when one answers; else those read from the database)
    Metrics {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        socket: SocketFlag,
    },
    /// Stop claiming the rows of a queue or a task type, on every daemon,
    /// until `resume` (running tries go on); without --queue or --task,
    /// list what is paused
    Pause {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        targets: PauseTargets,
        /// Why, shown by `pause`, `status` and the daemons' logs
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Let the daemons claim the rows of a paused queue or task type again
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["queue", "task"])))]
    Resume {
        #[command(flatten)]
        database: DatabaseFlags,
        #[command(flatten)]
        targets: PauseTargets,
    },
    /// The config's schedules: when each runs (cron in its time zone),
    /// the latest slot enqueued and its request, and the next slot
    Schedules {
        #[command(flatten)]
        database: DatabaseFlags,
    },
    /// The task types the config and its programs offer, with their
    /// settings; with a name, the options that type takes
    Tasks {
        #[command(flatten)]
        database: DatabaseFlags,
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    /// Print a shell completion script (e.g. `taskrunner-cli completions bash
    /// > /etc/bash_completion.d/taskrunner-cli`)
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write man pages (taskrunner-cli.1 and one per command) into a directory
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective config
    Check {
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        database: DatabaseFlags,
    },
    /// Write a commented starter config
    Init {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
}

/// Parses `--period` into whole seconds (at least one).
fn parse_period(text: &str) -> Result<i64, String> {
    let period = parse_wait(text)?;
    let seconds = period.as_secs_f64().round() as i64;
    if seconds < 1 {
        return Err(format!("`{text}`: a period is at least 1s"));
    }
    Ok(seconds)
}

/// Parses `--at` into RFC 3339 UTC; at most [`LONGEST_WAIT`] ahead of this
/// machine's clock.
fn parse_time(text: &str) -> Result<String, String> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    let time = DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            [
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%d %H:%M",
                "%Y-%m-%dT%H:%M:%S",
            ]
            .into_iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .ok()
                    .map(|day| day.and_time(chrono::NaiveTime::MIN))
            })
            .map(|time| time.and_utc())
        })
        .ok_or_else(|| {
            format!("cannot read `{text}` as a time (write e.g. 2026-11-24T07:00:00Z)")
        })?;
    if (time - Utc::now())
        .to_std()
        .is_ok_and(|ahead| ahead > LONGEST_WAIT)
    {
        return Err(format!("`{text}` is more than 50 years ahead"));
    }
    Ok(time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

/// `enqueue TYPE --help`: the arguments without `--help`, when they name
/// a type (the help then also shows that type's options).
fn enqueue_type_help(args: &[String]) -> Option<Vec<String>> {
    const TAKES_VALUE: [&str; 13] = [
        "--options",
        "--delay",
        "--at",
        "--try-limit",
        "--priority",
        "--unique-key",
        "--queue",
        "--node",
        "--not-node",
        "--period",
        "--config",
        "--database-url",
        "--socket",
    ];
    let start = args.iter().position(|a| a == "enqueue")?;
    let (mut help, mut task, mut skip) = (false, false, false);
    for arg in &args[start + 1..] {
        if skip {
            skip = false;
        } else if arg == "--help" || arg == "-h" {
            help = true;
        } else if TAKES_VALUE.contains(&arg.as_str()) {
            skip = true;
        } else if !arg.starts_with('-') {
            task = true;
        }
    }
    (help && task).then(|| {
        args.iter()
            .filter(|a| *a != "--help" && *a != "-h")
            .cloned()
            .collect()
    })
}

/// Prints `enqueue`'s help, then the options of the type named.
fn print_enqueue_type_help(flags: Flags) -> ExitCode {
    let mut enqueue = <Flags as clap::CommandFactory>::command()
        .find_subcommand("enqueue")
        .expect("enqueue is a command")
        .clone()
        .bin_name("taskrunner-cli enqueue");
    outln!("{}", enqueue.render_help());
    let Command::Enqueue { task, .. } = &flags.command else {
        return ExitCode::SUCCESS;
    };
    let described = Config::resolve(&overrides_for(&flags)).and_then(|config| {
        let registry = Registry::load(&config)?;
        describe_tasks(&config, &registry, Some(task))
    });
    match described {
        Ok(text) => {
            out!("Task type {text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskrunner-cli: {}", crate::error_line(&error));
            ExitCode::from(crate::usage::exit_code_for(&error))
        }
    }
}

/// Runs the CLI and returns its exit status.
pub fn main() -> ExitCode {
    // Lossy: only to look for a type's `--help`; clap reads the arguments
    // themselves, and refuses one that is not UTF-8 in one line (before,
    // `std::env::args` panicked on it).
    let args: Vec<String> = std::env::args_os()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    if let Some(without_help) = enqueue_type_help(&args) {
        if let Ok(flags) = Flags::try_parse_from(&without_help) {
            return print_enqueue_type_help(flags);
        }
    }
    let flags: Flags = crate::parse_or_exit("taskrunner-cli");
    crate::init_logging(crate::config::LogFormat::Text, crate::LogWriter::Stderr);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskrunner-cli: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(flags));
    runtime.shutdown_timeout(Duration::from_millis(200));
    // A failure to write standard output is told beside the command's own
    // error, whose exit status stands.
    if let Some(failure) = super::stdout::failure() {
        eprintln!("taskrunner-cli: {failure}");
        if result.is_ok() {
            return ExitCode::FAILURE;
        }
    }
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("taskrunner-cli: {}", crate::error_line(&error));
            ExitCode::from(crate::usage::exit_code_for(&error))
        }
    }
}

async fn dispatch(flags: Flags) -> Result<ExitCode> {
    let overrides = overrides_for(&flags);
    match &flags.command {
        Command::Config(command) => return config_command(command, &overrides),
        Command::Completions { shell } => {
            let mut command = <Flags as clap::CommandFactory>::command();
            // Into memory first: clap_complete panics on a closed stdout.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "taskrunner-cli", &mut script);
            let _ = std::io::stdout().write_all(&script);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            let written = write_man_pages(dir)?;
            outln!("wrote {written} man pages into {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let config = Config::resolve(&overrides)?;
    match command(flags.command, &config).await {
        Ok(code) => Ok(code),
        Err(error) => Err(crate::store::diagnose::explain(error, &config.database_url).await),
    }
}

/// The flags given before the command, overridden by those given after it.
fn overrides_for(flags: &Flags) -> Overrides {
    let mut overrides = Overrides {
        config: flags.config.clone(),
        database_url: flags.database_url.clone(),
        host_id: flags.host_id.clone(),
        socket: flags.socket.clone(),
        ..Overrides::default()
    };
    let (database, socket, host) = match &flags.command {
        Command::Migrate { database }
        | Command::List { database, .. }
        | Command::Show { database, .. }
        | Command::Purge { database, .. }
        | Command::Wait { database, .. }
        | Command::Web { database, .. }
        | Command::Config(ConfigCommand::Check { database, .. }) => (Some(database), None, None),
        Command::Enqueue {
            database, socket, ..
        }
        | Command::Retry {
            database, socket, ..
        }
        | Command::Metrics { database, socket }
        | Command::Cancel {
            database, socket, ..
        } => (Some(database), Some(socket), None),
        Command::Run { database, host, .. } => (Some(database), None, Some(host)),
        Command::Reap {
            database,
            socket,
            host,
            ..
        } => (Some(database), Some(socket), Some(host)),
        Command::Status { config, socket, .. } => {
            if config.is_some() {
                overrides.config = config.clone();
            }
            (None, Some(socket), None)
        }
        Command::Tasks { database, .. }
        | Command::Schedules { database }
        | Command::Pause { database, .. }
        | Command::Resume { database, .. } => (Some(database), None, None),
        Command::Config(ConfigCommand::Init { .. })
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Batch(_)
        | Command::Flow(_) => (None, None, None),
    };
    if let Some(database) = database {
        if database.config.is_some() {
            overrides.config = database.config.clone();
        }
        if database.database_url.is_some() {
            overrides.database_url = database.database_url.clone();
        }
    }
    if let Some(SocketFlag {
        socket: Some(socket),
    }) = socket
    {
        overrides.socket = Some(socket.clone());
    }
    if let Some(HostFlag {
        host_id: Some(host_id),
    }) = host
    {
        overrides.host_id = Some(host_id.clone());
    }
    overrides
}

/// Runs one command, then closes the databases it opened: an unclosed
/// SQLite connection leaves its -wal and -shm files behind, with this
/// user's owner and mode.
async fn command(command: Command, config: &Config) -> Result<ExitCode> {
    let opened = std::sync::Mutex::new(Vec::new());
    let result = run_one(command, config, &opened).await;
    let stores: Vec<Store> = std::mem::take(&mut *opened.lock().unwrap_or_else(|e| e.into_inner()));
    for store in stores {
        store.close().await;
    }
    result
}

async fn run_one(
    command: Command,
    config: &Config,
    opened: &std::sync::Mutex<Vec<Store>>,
) -> Result<ExitCode> {
    let config = config.clone();
    let open = |purpose| -> Result<Store> {
        let store = Store::open(&config.database_url, purpose)?;
        store.set_hooks(config.hooks());
        store.set_max_options(config.max_options);
        opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(store.clone());
        Ok(store)
    };
    match command {
        Command::Migrate { .. } => {
            let store = open(Purpose::Migrate)?;
            let migration = store.migrate().await?;
            outln!("schema of {}: {migration}", store.display_url);
        }
        Command::Enqueue {
            task,
            options,
            delay,
            at,
            try_limit,
            priority,
            unique_key,
            queue,
            node,
            not_node,
            period,
            batch,
            on_success,
            on_failure,
            ..
        } => {
            // What the daemon would only reject (REJECTED, or FAILED as an
            // unknown type) is refused here, before a row is written.
            if task.trim().is_empty() {
                return Err(crate::usage::UsageError("TASK: the task type is empty".into()).into());
            }
            crate::request::check_names(&[
                ("TASK", Some(&task)),
                ("--queue", queue.as_ref()),
                ("--node", node.as_ref()),
                ("--not-node", not_node.as_ref()),
                ("--unique-key", unique_key.as_ref()),
                ("--on-success", on_success.as_ref()),
                ("--on-failure", on_failure.as_ref()),
            ])
            .map_err(crate::usage::UsageError)?;
            if node.is_some() && node == not_node {
                return Err(crate::usage::UsageError(format!(
                    "--node and --not-node: both name {}; no daemon could run the row",
                    crate::escape::one_line(node.as_deref().unwrap_or_default())
                ))
                .into());
            }
            if let Some(options) = &options {
                crate::request::check_options(options.as_bytes()).map_err(|e| {
                    crate::usage::UsageError(format!("--options: not valid YAML: {e}"))
                })?;
            }
            let store = open(Purpose::Cli)?;
            let id = store
                .enqueue(&NewRequest {
                    task_class_name: task,
                    options,
                    try_limit,
                    delay_seconds: delay.map(|d| d.as_secs_f64()),
                    at,
                    priority: priority.unwrap_or(0),
                    unique_key,
                    queue,
                    node,
                    not_node,
                    period,
                    batch_id: batch,
                    on_success,
                    on_failure,
                })
                .await
                .with_context(|| format!("enqueueing into {}", store.display_url))?;
            outln!("{id}");
            wake_daemon(&config).await;
        }
        Command::List {
            filter,
            limit,
            json,
            ..
        } => {
            let rows = open(Purpose::Cli)?.list_where(&filter.query(limit)).await?;
            if json {
                for row in &rows {
                    outln!("{}", serde_json::to_string(row)?);
                }
            } else {
                out!("{}", render_table(&rows));
            }
        }
        Command::Show { id, json, .. } => {
            let store = open(Purpose::Cli)?;
            let Some(request) = store.show(id).await? else {
                bail!("no request {id}")
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&request)?);
            } else {
                out!("{}", render_show(&request));
            }
        }
        Command::Run {
            record: true,
            id: None,
            ..
        } => return Err(crate::usage::UsageError("--record needs --id".into()).into()),
        Command::Run {
            task,
            options,
            id,
            record,
            ..
        } => return run_command(&config, || open(Purpose::Cli), task, options, id, record).await,
        Command::Reap { dry_run, .. } => {
            let store = open(Purpose::Cli)?;
            let reaped = crate::reaper::reap(
                &store,
                &config.host_id,
                "",
                config.lease_timeout,
                dry_run,
                None,
            )
            .await?;
            for row in &reaped {
                outln!(
                    "{} {}{}",
                    row.id,
                    if dry_run { "(dry run) " } else { "" },
                    row.reason
                );
            }
            if reaped.is_empty() {
                eprintln!("nothing to reap");
            } else if !dry_run {
                wake_daemon(&config).await;
            }
        }
        Command::Retry { selection, .. } => {
            let store = open(Purpose::Cli)?;
            let ids = select_ids(&store, selection).await?;
            let mut refused = 0;
            for (id, seen) in &ids {
                let id = *id;
                crate::test_hooks::pause_when_told("TASKRUNNER_TEST_BULK_ROW_DELAY_MS").await;
                match store.retry(id, seen.as_ref()).await? {
                    Change::Done | Change::Requested => outln!("request {id} will run again"),
                    Change::NotFound => {
                        refused += 1;
                        eprintln!("taskrunner-cli: no request {id}");
                    }
                    Change::Refused(_) => {
                        refused += 1;
                        eprintln!(
                            "taskrunner-cli: request {id} is RUNNING: cancel it first, or wait for it to end"
                        );
                    }
                    Change::KeyHeld { key, by } => {
                        refused += 1;
                        eprintln!("taskrunner-cli: {}", key_held_text(id, &key, by));
                    }
                    Change::InFlow(flow) => {
                        refused += 1;
                        eprintln!("taskrunner-cli: {}", in_flow_text(id, flow));
                    }
                    Change::Moved { state, tries } => {
                        refused += 1;
                        let seen = seen.as_ref().map_or(String::new(), |seen| {
                            format!(" ({}, {} tries)", seen.state, seen.tries)
                        });
                        eprintln!(
                            "taskrunner-cli: request {id} was not retried: it changed since it was selected{seen}, and is now {} after {tries} tries",
                            state.as_deref().unwrap_or("pending")
                        );
                    }
                }
            }
            if refused < ids.len() {
                wake_daemon(&config).await;
            }
            if refused > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Cancel { selection, .. } => {
            let store = open(Purpose::Cli)?;
            let ids = select_ids(&store, selection).await?;
            // Each row's state before this command's first cancel: a cancel
            // can end others of the ids (a fail-fast batch cancels its other
            // members, a flow its steps), which are then cancelled as asked,
            // not refused (before, such a command exited 1).
            let mut before = Vec::with_capacity(ids.len());
            for (id, seen) in &ids {
                before.push(match seen {
                    Some(seen) => Some(seen.state.clone()),
                    None => store.state_of(*id).await?,
                });
            }
            let mut refused = 0;
            let mut running = Vec::new();
            for (&(id, _), before) in ids.iter().zip(&before) {
                match store.cancel(id).await? {
                    Change::Done => outln!("request {id} cancelled"),
                    Change::Requested => running.push(id),
                    Change::NotFound => {
                        refused += 1;
                        eprintln!("taskrunner-cli: no request {id}");
                    }
                    Change::Refused(Some(state))
                        if state == "CANCELLED"
                            && before.as_ref().is_some_and(|was| was != "CANCELLED") =>
                    {
                        outln!(
                            "request {id} cancelled meanwhile (by the end of its batch or flow, or another cancel)"
                        );
                    }
                    Change::Refused(state) => {
                        refused += 1;
                        eprintln!(
                            "taskrunner-cli: request {id} is already {}: nothing to cancel",
                            state.unwrap_or_else(|| "final".into())
                        );
                    }
                    // Only `retry` meets a unique key, a flow or a row moved on.
                    Change::KeyHeld { .. } | Change::InFlow(_) | Change::Moved { .. } => {
                        refused += 1
                    }
                }
            }
            if !running.is_empty() {
                let woken = wake_daemon(&config).await;
                for id in running {
                    if woken {
                        outln!("request {id} is running: its daemon is stopping it");
                    } else {
                        outln!(
                            "request {id} is running: its daemon will stop it within a heartbeat"
                        );
                    }
                }
            }
            if refused > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Tasks { name, .. } => {
            let registry = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || Registry::load(&config)).await??
            };
            out!("{}", describe_tasks(&config, &registry, name.as_deref())?);
        }
        Command::Schedules { .. } => {
            let store = open(Purpose::Cli)?;
            let lines = crate::web::schedule_lines(&store, &config.schedules).await?;
            out!("{}", render_schedules(&lines));
        }
        Command::Pause {
            targets, reason, ..
        } => {
            let store = open(Purpose::Cli)?;
            pause(&config, &store, &targets.checked()?, reason.as_deref()).await?;
        }
        Command::Resume { targets, .. } => {
            let store = open(Purpose::Cli)?;
            let mut resumed = false;
            for (kind, name) in targets.checked()? {
                if store.resume(kind, &name).await? {
                    resumed = true;
                    outln!("resumed {} {}", kind.word(), one_line(&name));
                } else {
                    outln!("{} {} was not paused", kind.word(), one_line(&name));
                }
            }
            // The daemon on this host claims the rows at once.
            if resumed {
                if let Some(Err(why)) = local_daemon_reads_pauses(&config).await {
                    eprintln!("the daemon on this host has not read it yet: {why}");
                }
            }
        }
        Command::Purge { older_than, .. } => {
            let retention = match older_than {
                Some(age) => crate::retention::Retention::all(age),
                None if config.retention.is_empty() => {
                    outln!(
                        "no `retention:` rules in the config and no --older-than: nothing deleted"
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                None => config.retention.clone(),
            };
            let store = open(Purpose::Cli)?;
            let pruned = crate::prune::prune(&store, &retention, Duration::ZERO, None).await?;
            outln!("deleted {} requests", pruned.requests);
            if pruned.parents > 0 {
                outln!(
                    "deleted {} ended batches and flows left without requests",
                    pruned.parents
                );
            }
        }
        Command::Web { listen, .. } => {
            let address = listen
                .or_else(|| config.http.as_ref().and_then(|http| http.listen))
                .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
            let has_auth = config.http.as_ref().is_some_and(|http| http.auth.is_some());
            crate::web::check_listen(address, has_auth)?;
            let store = open(Purpose::Cli)?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let on_signal = shutdown.clone();
            // Ctrl-C or SIGTERM: finish the requests in flight, then exit 0.
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                on_signal.cancel();
            });
            crate::web::run_standalone(&config, address, store, shutdown).await?;
        }
        Command::Metrics { .. } => {
            let from_daemon = match &config.socket {
                Some(socket) => crate::control::request(socket, "metrics").await.ok(),
                None => None,
            };
            let text = match from_daemon
                .as_ref()
                .and_then(|answer| answer.get("metrics"))
                .and_then(|text| text.as_str())
            {
                Some(text) => text.to_string(),
                None => {
                    let store = open(Purpose::Cli)?;
                    crate::metrics::render(&store, &Default::default(), None).await?
                }
            };
            out!("{text}");
        }
        Command::Wait { id, timeout, .. } => {
            // The SDK's wait (`task_sdk::wait_for`), the one implementation.
            let request =
                match task_sdk::wait_for(config.database_url.as_str(), id.0, timeout).await {
                    Ok(request) => request,
                    Err(task_sdk::WaitError::TimedOut { waited, .. }) => {
                        let waited = crate::units::format_duration(waited);
                        eprintln!("taskrunner-cli: request {id} is not final after {waited}");
                        return Ok(ExitCode::FAILURE);
                    }
                    Err(error) => return Err(error.into()),
                };
            let text = request.result_text.as_deref().unwrap_or_default();
            if request.is_success() {
                outln!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "request {id} {} ({} of {} tries): {text}",
                request.state, request.tries, request.try_limit
            );
            return Ok(ExitCode::FAILURE);
        }
        Command::Status { json, .. } => {
            let Some(socket) = &config.socket else {
                bail!(
                    "no control socket configured (set `socket:` in the config or pass --socket)"
                );
            };
            let answer = crate::control::request(socket, "status").await?;
            if json {
                outln!("{answer}");
            } else {
                let status: crate::control::Status = serde_json::from_value(answer)?;
                out!("{}", render_status(&status));
            }
        }
        Command::Batch(command) => {
            let store = open(Purpose::Cli)?;
            batch::run(&store, command).await?;
            wake_daemon(&config).await;
        }
        Command::Flow(command) => {
            let writes = !matches!(
                command,
                flow::FlowCommand::List { .. } | flow::FlowCommand::Show { .. }
            );
            flow::run(&config, || open(Purpose::Cli), command).await?;
            if writes {
                wake_daemon(&config).await;
            }
        }
        Command::Config(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled in dispatch")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ids given, or those the filter selects; prints how many first.
/// The requests a selection names; for a filter, each with its state and
/// tries as selected (a retry applies to it only while it is still so).
async fn select_ids(store: &Store, selection: Selection) -> Result<Vec<(RequestId, Option<Seen>)>> {
    let Selection { ids, filter } = selection;
    if !ids.is_empty() && !filter.is_empty() {
        return Err(crate::usage::UsageError(
            "give ids or a filter (--result, --task, --queue, --host, --batch, --flow), not both"
                .into(),
        )
        .into());
    }
    let by_filter = ids.is_empty();
    let ids: Vec<(RequestId, Option<Seen>)> = if by_filter {
        store
            .select_where(&filter.query(i64::MAX))
            .await?
            .into_iter()
            .rev()
            .map(|(id, result, tries)| {
                let seen = Seen {
                    state: result.unwrap_or_else(|| "PENDING".into()),
                    tries,
                };
                (id, Some(seen))
            })
            .collect()
    } else {
        ids.into_iter().map(|id| (id, None)).collect()
    };
    match ids.len() {
        0 => outln!("no requests match"),
        1 if !by_filter => {}
        1 => outln!("1 request"),
        n => outln!("{n} requests"),
    }
    Ok(ids)
}

/// Tells a local daemon to poll now and to look for cancel requests, if one
/// listens; silent otherwise. Returns whether a daemon answered.
async fn wake_daemon(config: &Config) -> bool {
    let Some(socket) = &config.socket else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            crate::control::request(socket, "wake"),
        )
        .await,
        Ok(Ok(_))
    )
}

/// `taskrunner-cli.1`, and `taskrunner-cli-COMMAND.1` for each command.
fn write_man_pages(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = <Flags as clap::CommandFactory>::command();
    let mut pages = vec![(String::from("taskrunner-cli"), root.clone())];
    for sub in root.get_subcommands() {
        let name = format!("taskrunner-cli-{}", sub.get_name());
        let command = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("taskrunner-cli {}", sub.get_name()));
        pages.push((name, command));
    }
    for (name, command) in &pages {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone()).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(pages.len())
}

impl PauseTargets {
    /// The names given, each checked ([`check_pause_name`]).
    fn checked(self) -> Result<Vec<(PauseKind, String)>> {
        let targets: Vec<(PauseKind, String)> = self
            .queue
            .into_iter()
            .map(|name| (PauseKind::Queue, name))
            .chain(self.task.into_iter().map(|name| (PauseKind::Task, name)))
            .collect();
        for (kind, name) in &targets {
            check_pause_name(*kind, name)?;
        }
        Ok(targets)
    }
}

/// `pause`: pauses each target, or lists the pauses when none is given.
async fn pause(
    config: &Config,
    store: &Store,
    targets: &[(PauseKind, String)],
    reason: Option<&str>,
) -> Result<()> {
    if targets.is_empty() {
        let pauses = store.pauses().await?;
        if pauses.is_empty() {
            outln!("nothing is paused");
        }
        for pause in pauses {
            outln!("{}", pause.describe());
        }
        return Ok(());
    }
    let mut paused = Vec::new();
    for (kind, name) in targets {
        match store.pause(*kind, name, reason).await? {
            Some(held) => outln!("{} was paused already", held.describe()),
            None => paused.push((kind, name)),
        }
    }
    if paused.is_empty() {
        return Ok(());
    }
    let local = local_daemon_reads_pauses(config).await;
    for (kind, name) in paused {
        let (kind, name) = (kind.word(), one_line(name));
        match &local {
            Some(Ok(pid)) => outln!(
                "paused {kind} {name}: the daemon on this host (pid {pid}) claims none of its rows from now on, every other daemon from a second on (tries running go on)"
            ),
            _ => outln!(
                "paused {kind} {name}: no daemon claims its rows from a second on (tries running go on)"
            ),
        }
    }
    if let Some(Err(why)) = local {
        eprintln!("the daemon on this host has not read the pause yet: {why}");
    }
    Ok(())
}

/// Has the daemon on this host (the config's control socket) read the
/// pauses just written, before its next claim: its pid; `None` where no
/// daemon listens; the error says why it has not.
async fn local_daemon_reads_pauses(config: &Config) -> Option<Result<u64, String>> {
    let socket = config.socket.as_ref()?;
    // The daemon answers within 5 s, or says why not.
    let asked = crate::control::request(socket, "pauses");
    match tokio::time::timeout(Duration::from_secs(6), asked).await {
        Ok(Ok(answer)) => Some(Ok(answer["pid"].as_u64().unwrap_or_default())),
        Ok(Err(error)) if error.downcast_ref::<crate::control::NoDaemon>().is_some() => None,
        Ok(Err(error)) => Some(Err(crate::error_line(&error))),
        Err(_) => Some(Err("it did not answer within 6 s".into())),
    }
}

fn config_command(command: &ConfigCommand, overrides: &Overrides) -> Result<ExitCode> {
    match command {
        ConfigCommand::Check { file, .. } => {
            let config = match file {
                Some(file) => Config::load_file(file)?,
                None => Config::resolve(overrides)?,
            };
            let registry = Registry::load(&config)?;
            // The page's settings, as the daemon checks them at start.
            let listen = config.http.as_ref().and_then(|http| http.listen);
            crate::web::check_settings(&config, listen)
                .map_err(|error| crate::usage::UsageError(crate::error_line(&error)))?;
            out!("{}", config.to_yaml());
            outln!("# task types: {}", registry.names(&config).join(", "));
        }
        ConfigCommand::Init { path } => {
            write_starter_config(path)?;
            outln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_starter_config(path: &Path) -> Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(STARTER_CONFIG.as_bytes())?;
    Ok(())
}

/// The commented starter config (`config init`).
const STARTER_CONFIG: &str = include_str!("../starter-config.yml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_numbers() {
        let error = Flags::try_parse_from(["taskrunner-cli", "show", "abc"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(Flags::try_parse_from(["taskrunner-cli", "show", "12"]).is_ok());
    }

    #[test]
    fn delay_and_at_exclude_each_other() {
        assert!(Flags::try_parse_from([
            "taskrunner-cli",
            "enqueue",
            "NoOp",
            "--delay",
            "5s",
            "--at",
            "2026-11-24T07:00:00Z"
        ])
        .is_err());
        assert!(
            Flags::try_parse_from(["taskrunner-cli", "enqueue", "NoOp", "--delay", "5s"]).is_ok()
        );
        assert!(
            Flags::try_parse_from(["taskrunner-cli", "enqueue", "NoOp", "--try-limit", "0"])
                .is_err()
        );
        // The 32-bit columns of PostgreSQL and MariaDB: refused there only
        // by the database, and stored on SQLite where the claim's order
        // had to take them.
        let enqueue = |flag: &str, value: &str| {
            Flags::try_parse_from(["taskrunner-cli", "enqueue", "NoOp", flag, value]).is_ok()
        };
        assert!(enqueue("--try-limit", "2147483647"));
        assert!(!enqueue("--try-limit", "2147483648"));
        assert!(enqueue("--priority", "-2147483647"));
        assert!(enqueue("--priority", "2147483647"));
        // MariaDB's claim order negates it (`claim_rank`, 32 bits).
        assert!(!enqueue("--priority", "-2147483648"));
        assert!(!enqueue("--priority", "-9223372036854775808"));
    }

    #[test]
    fn run_takes_a_task_or_an_id() {
        assert!(Flags::try_parse_from(["taskrunner-cli", "run"]).is_err());
        assert!(Flags::try_parse_from(["taskrunner-cli", "run", "NoOp"]).is_ok());
        assert!(Flags::try_parse_from(["taskrunner-cli", "run", "--id", "3", "--record"]).is_ok());
    }

    #[test]
    fn times_are_read_in_common_forms() {
        assert_eq!(
            parse_time("2026-11-24T07:00:00Z").unwrap(),
            "2026-11-24T07:00:00.000Z"
        );
        assert_eq!(
            parse_time("2026-11-24T09:00:00+02:00").unwrap(),
            "2026-11-24T07:00:00.000Z"
        );
        assert_eq!(
            parse_time("2026-11-24 07:00").unwrap(),
            "2026-11-24T07:00:00.000Z"
        );
        assert!(parse_time("tomorrow").is_err());
    }
}
