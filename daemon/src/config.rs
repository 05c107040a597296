//! The config file, command-line flags and environment, resolved into the one
//! validated [`Config`] the daemon and the CLI see. Names of users and groups
//! are resolved here, at load, never in a forked child.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::units::{format_duration, serde_units};
use crate::usage::UsageError;

pub(crate) mod http;
#[macro_use]
mod task_settings;

pub use task_settings::{Group, TaskSettings, User};

/// The built-in types, served by the built-in task binary (see
/// [`crate::task_types`]).
pub(crate) const BUILTIN_TYPES: [&str; 1] = ["NoOp"];

/// The longest `host_id` and `node_name`: a claim writes the host id and
/// the daemon's instance (pid, start ticks, boot id with its PID namespace
/// in a container, a random part: at most 117 characters more with the
/// claim's round) into `claim_token`, a
/// VARCHAR(255) on MariaDB and an indexed column on PostgreSQL; the node
/// name goes into `task_runner_daemons.node_name`, a VARCHAR(255).
pub(crate) const MAX_HOST_ID: usize = 128;

/// The most tries a daemon may run at once (`max_concurrent`).
pub(crate) const MAX_CONCURRENT: usize = 1_000_000;

/// `max_options` by default: far more than options need, far less than
/// what would stall the daemon.
pub(crate) const DEFAULT_MAX_OPTIONS: u64 = 4 * 1024 * 1024;

/// The smallest `max_options`: room for a callback's options (with its
/// parent's output) and a flow's store beside its `on_exhausted` summary.
/// Below it nearly every row, callback and flow was `REJECTED` (0, a
/// likely mistake where 0 turns other limits off, rejected them all).
pub(crate) const MIN_MAX_OPTIONS: u64 = 16 * 1024;

with_task_settings! {
    /// Task settings as written, before defaults are applied.
    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {}
}

with_task_settings! {
    /// The config file as written; also what `config check` prints.
    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct FileConfig {
        database_url: Option<String>,
        host_id: Option<String>,
        node_name: Option<String>,
        queues: Option<BTreeMap<String, usize>>,
        log_format: Option<LogFormat>,
        poll_interval: Option<Duration> => "serde_units::duration",
        max_concurrent: Option<usize>,
        reap_interval: Option<Duration> => "serde_units::duration",
        heartbeat_interval: Option<Duration> => "serde_units::duration",
        lease_timeout: Option<Duration> => "serde_units::duration",
        shutdown_timeout: Option<Duration> => "serde_units::duration",
        max_options: Option<u64> => "serde_units::size",
        pidfile: Option<PathBuf>,
        socket: Option<PathBuf>,
        log_file: Option<PathBuf>,
        programs: Option<Vec<FileProgram>>,
        tasks: Option<BTreeMap<String, FileTask>>,
        // Issue 7: retention and cron schedules (types in retention.rs, cron.rs).
        retention: Option<crate::retention::FileRetention>,
        schedules: Option<BTreeMap<String, crate::cron::FileSchedule>>,
        // Issue 19: the web page and /metrics (types in config/http.rs).
        http: Option<http::FileHttp>,
        // Issue 16: a task type run once when any request is exhausted or REJECTED.
        on_exhausted: Option<String>,
        // Issue 17: flows of steps with execute and revert (types in flow.rs).
        flows: Option<BTreeMap<String, crate::flow::Definition>>,
    }
}

with_task_settings! {
    /// An entry under `tasks:` as written.
    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct FileTask {
        command: Option<Vec<String>>,
        concurrency: Option<u32>,
        preload: Option<bool>,
        options: Option<BTreeMap<String, String>>,
        on_exhausted: Option<String>,
    }
}

/// An entry under `programs:`: a path, or `{path: …, preload: true}`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum FileProgram {
    Path(PathBuf),
    Entry(FileProgramEntry),
}

/// Told apart by the value's shape, so that a mapping's mistake is named
/// (an unknown key, a missing path): serde's untagged reading said only
/// that the entry matched neither form.
impl<'de> Deserialize<'de> for FileProgram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(path) => Ok(FileProgram::Path(path.into())),
            entry @ serde_yaml::Value::Mapping(_) => FileProgramEntry::deserialize(entry)
                .map(FileProgram::Entry)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom(
                "a program is a path, or a mapping {path: PATH, preload: true}",
            )),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileProgramEntry {
    path: PathBuf,
    #[serde(default)]
    preload: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// An entry under `tasks:`. With `command`, it declares a command task type
/// (a program and its fixed arguments); without, it sets the settings of a
/// built-in or task-sdk type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CommandTask {
    pub(crate) command: Option<Vec<String>>,
    pub(crate) settings: TaskSettings,
    /// At most this many tries of the type run at once, across all daemons.
    pub(crate) concurrency: Option<u32>,
    /// Tries are forked from a preloaded parent (supervisor/preload.rs).
    pub(crate) preload: bool,
    /// `options:`: each option of the type and what it means, for
    /// `taskrunner-cli tasks NAME` and `enqueue NAME --help`.
    pub(crate) options: BTreeMap<String, String>,
    /// Task type run once when a request of this type is exhausted or REJECTED.
    pub(crate) on_exhausted: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    pub(crate) database_url: String,
    pub(crate) host_id: String,
    /// The name rows' `node` / `not_node` refer to (default: the host id).
    pub(crate) node_name: String,
    /// Queues this daemon serves, each with how many of its tasks run at
    /// once here. Empty: every queue, limited only by `max_concurrent`.
    pub(crate) queues: BTreeMap<String, usize>,
    pub log_format: LogFormat,
    pub(crate) poll_interval: Duration,
    pub(crate) max_concurrent: usize,
    pub(crate) reap_interval: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) lease_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Largest `options` a try accepts; a larger row is REJECTED.
    pub(crate) max_options: u64,
    pub pidfile: Option<PathBuf>,
    pub(crate) socket: Option<PathBuf>,
    /// Where `--daemonize` sends stdout and stderr (default /dev/null).
    pub log_file: Option<PathBuf>,
    pub(crate) programs: Vec<PathBuf>,
    /// The programs declared with `preload: true` (a subset of `programs`).
    pub(crate) preloaded_programs: Vec<PathBuf>,
    /// Settings for types not listed under `tasks:` (built-in and SDK programs).
    pub defaults: TaskSettings,
    pub(crate) tasks: BTreeMap<String, CommandTask>,
    // Issue 7:
    /// How long final rows are kept (`retention:`); empty keeps everything.
    pub(crate) retention: crate::retention::Retention,
    /// Requests enqueued on a schedule (`schedules:`), by name.
    pub(crate) schedules: BTreeMap<String, crate::cron::Schedule>,
    /// `http:`: where the daemon serves the web page and `/metrics`.
    pub(crate) http: Option<http::Http>,
    /// Task type run once when any request is exhausted or REJECTED (a
    /// type's own `on_exhausted` wins).
    pub(crate) on_exhausted: Option<String>,
    /// `flows:`: each flow's steps, retry and declared options, by name.
    pub(crate) flows: BTreeMap<String, crate::flow::Definition>,
}

/// What the command line (and environment) contribute; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub database_url: Option<String>,
    pub host_id: Option<String>,
    pub node_name: Option<String>,
    pub socket: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    pub poll_interval: Option<Duration>,
    pub max_concurrent: Option<usize>,
    pub log_format: Option<LogFormat>,
}

const DEFAULT_CONFIG_PATHS: [&str; 2] = ["taskrunner.yml", "/etc/taskrunner/taskrunner.yml"];

impl Config {
    /// How long after a renewal was sent, if none succeeds meanwhile, the
    /// daemon fences itself off (`SIGTERM` to its tasks, `SIGKILL` `kill_grace`
    /// later): `lease_timeout − kill_grace − margin`. The database wrote the
    /// leases after the renewal was sent, so they lapse `margin` or more after
    /// the `SIGKILL`. The margin is `heartbeat_interval` (with the defaults,
    /// 60 − 10 − 10: 40 s), or, where the lease leaves less room than that, half
    /// of what it leaves beyond one interval: the deadline must fall after the
    /// next renewal is due, or every interval would fence off a daemon whose
    /// renewals all succeed (with a lease of 12 s, an interval of 10 s and a
    /// grace of 1 s, it did, 1 s after each renewal; now 10.5 s after it).
    pub(crate) fn fence_after(&self) -> Duration {
        let room = self
            .lease_timeout
            .saturating_sub(self.heartbeat_interval + self.defaults.kill_grace);
        let margin = self.heartbeat_interval.min(room / 2);
        self.lease_timeout
            .saturating_sub(self.defaults.kill_grace + margin)
    }

    /// How long after a renewal was sent a fencing watchdog kills the
    /// tasks no later renewal kept: when the heartbeat's own fence, had it
    /// run, would have sent them `SIGKILL` after its `SIGTERM` and
    /// `kill_grace` (supervisor/watchdog.rs).
    pub(crate) fn watchdog_after(&self) -> Duration {
        self.fence_after() + self.defaults.kill_grace
    }

    /// Flags, then `DATABASE_URL`, then the file, then defaults (SPEC.md).
    pub fn resolve(overrides: &Overrides) -> Result<Config> {
        let file = match &overrides.config {
            Some(path) => Some(path.clone()),
            None => DEFAULT_CONFIG_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|path| path.is_file()),
        };
        let (raw, dir) = match &file {
            Some(path) => (read_file(path)?, absolute_dir_of(path)?),
            None => (FileConfig::default(), std::env::current_dir()?),
        };
        let mut config = Config::from_file(raw, &dir, file.clone())?;
        if let Some(url) = &overrides.database_url {
            config.database_url = url.clone();
        } else if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            config.database_url = url;
        }
        if let Some(host_id) = &overrides.host_id {
            // The node name follows the host id unless set on its own.
            if config.node_name == config.host_id {
                config.node_name = host_id.clone();
            }
            config.host_id = host_id.clone();
        }
        set_if_some(&mut config.node_name, &overrides.node_name);
        set_if_some(&mut config.log_format, &overrides.log_format);
        set_if_some(&mut config.poll_interval, &overrides.poll_interval);
        set_if_some(&mut config.max_concurrent, &overrides.max_concurrent);
        if overrides.socket.is_some() {
            config.socket = overrides.socket.clone();
        }
        if overrides.pidfile.is_some() {
            config.pidfile = overrides.pidfile.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates one file alone (`config check`, SIGHUP reload).
    pub fn load_file(path: &Path) -> Result<Config> {
        let config =
            Config::from_file(read_file(path)?, &absolute_dir_of(path)?, Some(path.into()))?;
        config.validate()?;
        Ok(config)
    }

    fn from_file(raw: FileConfig, dir: &Path, file: Option<PathBuf>) -> Result<Config> {
        let usage = |message: String| -> anyhow::Error {
            let origin = file
                .as_ref()
                .map_or("config".into(), |f| f.display().to_string());
            UsageError(format!("{origin}: {message}")).into()
        };
        let global_settings = raw.settings();
        let defaults = global_settings.resolve(None, dir).map_err(&usage)?;
        let mut tasks = BTreeMap::new();
        for (name, task) in raw.tasks.unwrap_or_default() {
            crate::request::name_fits(&format!("tasks.{name}"), &name).map_err(&usage)?;
            if let Some(on_exhausted) = &task.on_exhausted {
                crate::request::name_fits(&format!("tasks.{name}.on_exhausted"), on_exhausted)
                    .map_err(&usage)?;
            }
            if let Some(command) = &task.command {
                if command.is_empty() || command[0].is_empty() {
                    return Err(usage(format!("tasks.{name}.command: must name a program")));
                }
            }
            if task.concurrency == Some(0) {
                return Err(usage(format!(
                    "tasks.{name}.concurrency: must be at least 1"
                )));
            }
            let own = task.settings();
            let settings = own
                .resolve(Some(&global_settings), dir)
                .map_err(|message| usage(format!("tasks.{name}.{message}")))?;
            let command = task.command.map(|mut command| {
                command[0] = resolve_program(dir, &command[0]);
                command
            });
            let concurrency = task.concurrency;
            if task.on_exhausted.as_deref() == Some("") {
                return Err(usage(format!(
                    "tasks.{name}.on_exhausted: must name a task type"
                )));
            }
            tasks.insert(
                name,
                CommandTask {
                    command,
                    settings,
                    concurrency,
                    preload: task.preload.unwrap_or(false),
                    options: task.options.unwrap_or_default(),
                    on_exhausted: task.on_exhausted,
                },
            );
        }
        let database_url = match raw.database_url {
            Some(url) => resolve_sqlite_url(&url, dir),
            // `taskrunner.db` in the working directory, spelled absolute so
            // that `config check` prints where it is, not a path that would
            // mean another file when read from the printed config's directory.
            None => match std::env::current_dir() {
                Ok(cwd) => resolve_sqlite_url("sqlite://taskrunner.db", &cwd),
                Err(_) => "sqlite://taskrunner.db".to_string(),
            },
        };
        let host_id = raw.host_id.unwrap_or_else(default_host_id);
        // Issue 7:
        let schedules = crate::cron::resolve_schedules(raw.schedules).map_err(&usage)?;
        let http = raw
            .http
            .map(|http| http.resolve(dir))
            .transpose()
            .map_err(&usage)?;
        let programs: Vec<(PathBuf, bool)> = raw
            .programs
            .unwrap_or_default()
            .into_iter()
            .map(|entry| {
                let (path, preload) = match entry {
                    FileProgram::Path(path) => (path, false),
                    FileProgram::Entry(entry) => (entry.path, entry.preload),
                };
                (
                    PathBuf::from(resolve_program(dir, &path.to_string_lossy())),
                    preload,
                )
            })
            .collect();
        // Issue 16:
        if raw.on_exhausted.as_deref() == Some("") {
            return Err(usage("on_exhausted: must name a task type".into()));
        }
        if let Some(on_exhausted) = &raw.on_exhausted {
            crate::request::name_fits("on_exhausted", on_exhausted).map_err(&usage)?;
        }
        let on_exhausted = raw.on_exhausted;
        // Issue 17:
        let flows = raw.flows.unwrap_or_default();
        for (name, flow) in &flows {
            crate::request::name_fits(&format!("flows.{name}"), name).map_err(&usage)?;
            flow.check(name).map_err(&usage)?;
        }
        Ok(Config {
            file,
            database_url,
            node_name: raw.node_name.unwrap_or_else(|| host_id.clone()),
            queues: raw.queues.unwrap_or_default(),
            host_id,
            log_format: raw.log_format.unwrap_or_default(),
            poll_interval: raw.poll_interval.unwrap_or(Duration::from_secs(60)),
            max_concurrent: raw
                .max_concurrent
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            reap_interval: raw.reap_interval.unwrap_or(Duration::from_secs(60)),
            heartbeat_interval: raw.heartbeat_interval.unwrap_or(Duration::from_secs(10)),
            lease_timeout: raw.lease_timeout.unwrap_or(Duration::from_secs(60)),
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
            max_options: raw.max_options.unwrap_or(DEFAULT_MAX_OPTIONS),
            pidfile: raw.pidfile.map(|p| dir.join(p)),
            socket: raw.socket.map(|p| dir.join(p)),
            log_file: raw.log_file.map(|p| dir.join(p)),
            programs: programs.iter().map(|(path, _)| path.clone()).collect(),
            preloaded_programs: programs
                .iter()
                .filter(|(_, preload)| *preload)
                .map(|(path, _)| path.clone())
                .collect(),
            defaults,
            tasks,
            retention: crate::retention::Retention::from_file(raw.retention),
            schedules,
            http,
            on_exhausted,
            flows,
        })
    }

    fn validate(&self) -> Result<()> {
        let origin = self
            .file
            .as_ref()
            .map_or("config".into(), |f| f.display().to_string());
        let fail = |message: &str| -> Result<()> {
            Err(UsageError(format!("{origin}: {message}")).into())
        };
        for (key, value) in [("host_id", &self.host_id), ("node_name", &self.node_name)] {
            let length = value.chars().count();
            if length == 0 {
                return fail(&format!("{key}: must not be empty"));
            }
            if length > MAX_HOST_ID {
                return fail(&format!(
                    "{key}: at most {MAX_HOST_ID} characters (each claim writes the host id and the daemon's instance, about a hundred characters more, into 255-character columns); this one has {length}"
                ));
            }
        }
        // The bound keeps the daemon's arithmetic on it (descriptors per
        // try, rows claimed ahead per slot) far from overflowing: a value
        // near 2^62 panicked at start.
        if !(1..=MAX_CONCURRENT).contains(&self.max_concurrent) {
            return fail(&format!(
                "max_concurrent: must be from 1 to {MAX_CONCURRENT} (got {})",
                self.max_concurrent
            ));
        }
        if self.max_options < MIN_MAX_OPTIONS {
            return fail(&format!(
                "max_options: must be at least {} (got {})",
                crate::units::format_size(MIN_MAX_OPTIONS),
                crate::units::format_size(self.max_options)
            ));
        }
        if let Some((queue, _)) = self.queues.iter().find(|(_, limit)| **limit == 0) {
            return fail(&format!("queues.{queue}: must be at least 1"));
        }
        for (key, value) in [
            ("poll_interval", self.poll_interval),
            ("reap_interval", self.reap_interval),
            ("heartbeat_interval", self.heartbeat_interval),
        ] {
            if value.is_zero() {
                return fail(&format!("{key}: must be longer than 0s"));
            }
        }
        if self.lease_timeout <= self.heartbeat_interval + self.defaults.kill_grace {
            return fail(&format!(
                "lease_timeout: must be longer than heartbeat_interval + kill_grace ({} + {}), so that a daemon that lost its database stops its tasks before another daemon takes them over",
                format_duration(self.heartbeat_interval),
                format_duration(self.defaults.kill_grace)
            ));
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("mysql://")
            || self.database_url.starts_with("mariadb://"))
        {
            return fail(
                "database_url: must start with sqlite:, postgres://, postgresql://, mysql:// or mariadb://",
            );
        }
        // Without programs every task type is known here; with programs,
        // the daemon checks once it has asked them (`check_flow_types`).
        if self.programs.is_empty() {
            let mut known: Vec<String> = self.tasks.keys().cloned().collect();
            known.extend(BUILTIN_TYPES.iter().map(|t| t.to_string()));
            known.sort();
            known.dedup();
            if let Err(message) = self.check_flow_types(&known) {
                return fail(&message);
            }
        }
        Ok(())
    }

    /// Every task type the flows name is one of `known`; the error names
    /// the flow and the step.
    pub(crate) fn check_flow_types(&self, known: &[String]) -> std::result::Result<(), String> {
        for (name, flow) in &self.flows {
            flow.check_types(name, known)?;
        }
        Ok(())
    }

    /// The `on_exhausted:` hooks, for the store's finalization path.
    pub(crate) fn hooks(&self) -> crate::store::Hooks {
        crate::store::Hooks {
            on_exhausted: self.on_exhausted.clone(),
            on_exhausted_by_type: self
                .tasks
                .iter()
                .filter_map(|(name, task)| Some((name.clone(), task.on_exhausted.clone()?)))
                .collect(),
        }
    }

    /// The `on_exhausted` hook of a task type (see [`crate::store::Hooks`]).
    pub(crate) fn on_exhausted_for(&self, task: &str) -> Option<&str> {
        self.tasks
            .get(task)
            .and_then(|t| t.on_exhausted.as_deref())
            .or(self.on_exhausted.as_deref())
            .filter(|hook| *hook != task)
    }

    /// The settings that apply to a task type (its own, else the defaults).
    pub(crate) fn settings_for(&self, task_name: &str) -> &TaskSettings {
        self.tasks
            .get(task_name)
            .map_or(&self.defaults, |task| &task.settings)
    }

    /// The config as a file would write it, every key spelled out with
    /// its effective value: read back, it is this config again (paths are
    /// absolute, defaults written out).
    fn as_written(&self) -> FileConfig {
        let tasks = self.tasks.iter().map(|(name, task)| {
            let mut written = FileTask {
                command: task.command.clone(),
                concurrency: task.concurrency,
                preload: task.preload.then_some(true),
                options: (!task.options.is_empty()).then(|| task.options.clone()),
                on_exhausted: task.on_exhausted.clone(),
                ..FileTask::default()
            };
            written.set_settings(task.settings.as_written(Some(&self.defaults)));
            (name.clone(), written)
        });
        let programs = self.programs.iter().map(|path| {
            if self.preloaded_programs.contains(path) {
                FileProgram::Entry(FileProgramEntry {
                    path: path.clone(),
                    preload: true,
                })
            } else {
                FileProgram::Path(path.clone())
            }
        });
        let mut written = FileConfig {
            database_url: Some(self.database_url.clone()),
            host_id: Some(self.host_id.clone()),
            node_name: Some(self.node_name.clone()),
            queues: (!self.queues.is_empty()).then(|| self.queues.clone()),
            log_format: Some(self.log_format),
            poll_interval: Some(self.poll_interval),
            max_concurrent: Some(self.max_concurrent),
            reap_interval: Some(self.reap_interval),
            heartbeat_interval: Some(self.heartbeat_interval),
            lease_timeout: Some(self.lease_timeout),
            shutdown_timeout: Some(self.shutdown_timeout),
            max_options: Some(self.max_options),
            pidfile: self.pidfile.clone(),
            socket: self.socket.clone(),
            log_file: self.log_file.clone(),
            programs: (!self.programs.is_empty()).then(|| programs.collect()),
            tasks: (!self.tasks.is_empty()).then(|| tasks.collect()),
            retention: self.retention.as_written(),
            schedules: (!self.schedules.is_empty()).then(|| {
                self.schedules
                    .iter()
                    .map(|(name, schedule)| (name.clone(), schedule.as_written()))
                    .collect()
            }),
            http: self.http.as_ref().map(http::Http::as_written),
            on_exhausted: self.on_exhausted.clone(),
            flows: (!self.flows.is_empty()).then(|| self.flows.clone()),
            ..FileConfig::default()
        };
        written.set_settings(self.defaults.as_written(None));
        written
    }

    /// The effective config as YAML (`config check`): [`Config::as_written`]
    /// serialized, with the database password left out.
    pub(crate) fn to_yaml(&self) -> String {
        let mut written = self.as_written();
        written.database_url = Some(crate::store::url::redact_url(&self.database_url));
        let origin = self
            .file
            .as_ref()
            .map_or(String::new(), |f| format!(" from {}", f.display()));
        let yaml = serde_yaml::to_string(&written)
            .unwrap_or_else(|error| format!("# cannot write the config as YAML: {error}\n"));
        format!("# effective config{origin}\n{yaml}")
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("{}: cannot read config: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())).into())
}

fn absolute_dir_of(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).context("resolving the config file's directory")?;
    Ok(absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/")))
}

/// A program named with a slash is a path relative to the config's directory;
/// a bare name is looked up in `PATH` when it runs.
fn resolve_program(dir: &Path, program: &str) -> String {
    if program.contains('/') {
        dir.join(program).to_string_lossy().into_owned()
    } else {
        program.to_string()
    }
}

/// `sqlite://relative.db` in a config file is relative to the file's
/// directory, and so is `sqlite:relative.db` (sqlx reads both forms; the
/// second was left relative to the working directory, so the daemon and the
/// CLI, started from different ones, opened different files).
fn resolve_sqlite_url(url: &str, dir: &Path) -> String {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"));
    match path {
        Some(path) if !path.is_empty() && !path.starts_with('/') && !path.starts_with(':') => {
            format!("sqlite://{}", dir.join(path).display())
        }
        _ => url.to_string(),
    }
}

fn set_if_some<T: Clone>(target: &mut T, value: &Option<T>) {
    if let Some(value) = value {
        *target = value.clone();
    }
}

fn default_host_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        let dir =
            std::env::temp_dir().join(format!("taskrunner-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.yml", text.len()));
        std::fs::write(&path, text).unwrap();
        Config::load_file(&path)
    }

    /// A config that sets every key, some in their rarer forms (a task
    /// that turns off the default timeout, a user whose group is derived,
    /// relative paths, options as a map).
    const EVERY_KEY: &str = "\
database_url: sqlite://data/q.db
host_id: h1
node_name: n1
queues: { default: 2, mail: 1 }
log_format: json
poll_interval: 30s
max_concurrent: 3
reap_interval: 1m
heartbeat_interval: 5s
lease_timeout: 1m
shutdown_timeout: 20s
retry_delay: 250ms
retry_multiplier: 1.5
max_options: 1MiB
pidfile: run/d.pid
socket: run/d.sock
log_file: log/d.log
programs: [bin/sdk-tasks, { path: /usr/bin/preloaded, preload: true }, bare-name]
timeout: 1h
memory_limit: 64MiB
cpu_limit: 30s
max_processes: 50
cpu_quota: 50%
nice: 5
user: root
env: { A: '1', B: two }
workdir: work
kill_retry: 2s
kill_grace: 3s
output_tail: 16KiB
on_exhausted: Alert
tasks:
  Resize:
    command: [bin/resize, --fast]
    concurrency: 2
    preload: true
    options: { width: pixels, height: pixels }
    on_exhausted: Page
    timeout: 0s
    env: { B: three, C: '4' }
    group: root
  Alert:
    command: [/bin/cat]
retention: { finished: 7d, exhausted: 1h }
schedules:
  nightly: { cron: '0 3 * * *', task: Resize, options: { width: 10 }, catch_up: 2, try_limit: 3, priority: 4 }
  often: { every: 90s, task: Alert, options: 'text: hi' }
http:
  listen: 127.0.0.1:8080
  read_only: true
  auth: { token_file: secrets/token }
flows:
  deploy:
    steps:
      - { name: fetch, task: Resize, revert: Alert, provides: artifact, try_limit: 2 }
      - { name: install, task: Alert }
    retry: { times: 1 }
    options:
      port: { help: port to serve on, default: 8887 }
";

    /// `config check` prints the effective config by serializing it; read
    /// back, that is the same config: for the starter config, the configs
    /// the repository ships and one that sets every key.
    #[test]
    fn the_effective_config_reads_back_into_an_equal_config() {
        let dir = std::env::temp_dir().join(format!(
            "taskrunner-config-round-trip-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Config::load_file(&path)
        };
        let configs = [
            ("starter", include_str!("starter-config.yml")),
            ("example", include_str!("../../examples/taskrunner.yml")),
            ("service", include_str!("../../init/taskrunner.yml")),
            ("every-key", EVERY_KEY),
            // No database_url: the default file in the working directory.
            ("no-database-url", "{}"),
        ];
        for (name, text) in configs {
            let config = read(&format!("{name}.yml"), text).unwrap();
            let printed = config.to_yaml();
            let mut again = read(&format!("{name}-printed.yml"), &printed)
                .unwrap_or_else(|error| panic!("{name}: {error:#}\n{printed}"));
            again.file = config.file.clone();
            assert_eq!(again, config, "{name}:\n{printed}");
        }
        // Every key is there, and the printed config prints the same again.
        let config = read("every-key.yml", EVERY_KEY).unwrap();
        let printed = config.to_yaml();
        for key in [
            "cpu_quota: 50%",
            "timeout: 0s",
            "group: root",
            "preload: true",
            "every: 90s",
            "token_file:",
            "flows:",
        ] {
            assert!(printed.contains(key), "{key}:\n{printed}");
        }
        let again = read("every-key-printed.yml", &printed).unwrap();
        let reprinted = again.to_yaml();
        assert_eq!(
            printed.lines().skip(1).collect::<Vec<_>>(),
            reprinted.lines().skip(1).collect::<Vec<_>>()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every task setting the list in config/task_settings.rs declares is
    /// read at the top level and under `tasks:`; a type's own value wins
    /// over the top-level one, which wins over the built-in default;
    /// `config check` writes each back, and what it prints reads back into
    /// an equal config; the README's table of task settings names each key
    /// with its built-in default.
    #[test]
    fn every_declared_task_setting_is_read_inherited_and_written_back() {
        let dir =
            std::env::temp_dir().join(format!("taskrunner-config-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Config::load_file(&path)
        };
        let yaml = |text: &str| serde_yaml::from_str::<serde_yaml::Value>(text).unwrap();
        let built_in = serde_yaml::to_value(Partial::built_in()).unwrap();
        let mut text = String::from("database_url: sqlite:///tmp/settings.db\n");
        for (key, top, _) in task_settings::EXAMPLES {
            text += &format!("{key}: {top}\n");
        }
        text += "tasks:\n  Own:\n    command: [/bin/true]\n";
        for (key, _, own) in task_settings::EXAMPLES {
            text += &format!("    {key}: {own}\n");
        }
        text += "  Inherits:\n    command: [/bin/true]\n";
        let config = read("every-setting.yml", &text).unwrap();
        let printed = config.to_yaml();
        let written = yaml(&printed);
        for (key, top, own) in task_settings::EXAMPLES {
            let (top, own) = (yaml(top), yaml(own));
            assert!(
                top != own && top != built_in[key] && own != built_in[key],
                "{key}"
            );
            assert_eq!(written[key], top, "{key} at the top level:\n{printed}");
            let tasks = &written["tasks"];
            assert_eq!(tasks["Own"][key], own, "{key} of a type:\n{printed}");
            assert_eq!(tasks["Inherits"][key], top, "{key} inherited:\n{printed}");
        }
        let mut again = read("every-setting-printed.yml", &printed).unwrap();
        again.file = config.file.clone();
        assert_eq!(again, config, "{printed}");

        // Unwritten, a setting is its built-in default (or none).
        let defaults = read("no-setting.yml", "tasks:\n  T:\n    command: [/bin/true]\n").unwrap();
        for settings in [&defaults.defaults, &defaults.tasks["T"].settings] {
            let written = serde_yaml::to_value(settings.as_written(None)).unwrap();
            assert_eq!(written, built_in);
        }

        let readme = include_str!("../../README.md");
        let table = readme
            .split_once("Task settings, per type under `tasks:`")
            .and_then(|(_, after)| after.split("\n\n").nth(1))
            .expect("the README's table of task settings");
        for (key, _, _) in task_settings::EXAMPLES {
            let row = table
                .lines()
                .find(|row| {
                    row.split('|')
                        .nth(1)
                        .is_some_and(|keys| keys.contains(&format!("`{key}`")))
                })
                .unwrap_or_else(|| panic!("README: no row for the task setting `{key}`"));
            if let Some(default) = built_in[key].as_str() {
                let column = row.split('|').nth(2).unwrap_or_default().trim();
                assert_eq!(
                    column,
                    format!("`{default}`"),
                    "README: the default of `{key}`"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_printed_database_url_has_no_password() {
        let mut config = load("{}").unwrap();
        config.database_url = "postgres://app:s3cret@db/app".into();
        let printed = config.to_yaml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("database_url: postgres://app:"),
            "{printed}"
        );
    }

    #[test]
    fn programs_and_command_types_may_be_preloaded() {
        let config = load("programs: [/bin/a, {path: /bin/b, preload: true}]\ntasks:\n  T:\n    command: [/bin/t]\n    preload: true\n  U:\n    command: [/bin/u]\n").unwrap();
        assert_eq!(
            config.programs,
            [PathBuf::from("/bin/a"), PathBuf::from("/bin/b")]
        );
        assert_eq!(config.preloaded_programs, [PathBuf::from("/bin/b")]);
        assert!(config.tasks["T"].preload && !config.tasks["U"].preload);
        assert!(load("programs: [{path: /bin/b, preload: yes-please}]\n").is_err());
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = load("{}").unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(60));
        assert_eq!(config.defaults.retry_delay, Duration::from_secs(10));
        assert_eq!(config.defaults.retry_multiplier, 2.0);
        assert_eq!(config.defaults.retry_jitter, 0.0);
        assert_eq!(config.defaults.output_tail, 65_536);
        assert_eq!(config.defaults.kill_grace, Duration::from_secs(10));
        assert!(config.database_url.ends_with("/taskrunner.db"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let error = load("poll_interval: 1s\ntasks:\n  Thumb:\n    command: [x]\n    timout: 5s\n")
            .unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("timout"), "{message}");
        assert!(message.contains("line 5"), "{message}");
        assert!(error.downcast_ref::<UsageError>().is_some());
    }

    /// A `programs:` entry's mistake is named: it said only "data did not
    /// match any variant of untagged enum FileProgram".
    #[test]
    fn a_program_entrys_unknown_key_is_named() {
        for (yaml, named) in [
            ("programs: [{path: /bin/x, prelaod: true}]\n", "prelaod"),
            ("programs: [{preload: true}]\n", "path"),
            ("programs: [[/bin/x]]\n", "a program is a path"),
        ] {
            let error = load(yaml).unwrap_err();
            let message = format!("{error:#}");
            assert!(message.contains(named), "{yaml}: {message}");
            assert!(message.contains("line 1"), "{yaml}: {message}");
            assert!(error.downcast_ref::<UsageError>().is_some());
        }
        let config = load("programs: [/bin/x, {path: /bin/y, preload: true}]\n").unwrap();
        assert_eq!(config.programs.len(), 2);
    }

    #[test]
    fn task_settings_inherit_the_top_level_defaults() {
        let config = load("memory_limit: 64MiB\nkill_grace: 2s\nenv: {A: '1'}\ntasks:\n  T:\n    command: [/bin/true]\n    kill_grace: 3s\n    env: {B: '2'}\n").unwrap();
        let task = &config.tasks["T"].settings;
        assert_eq!(task.memory_limit, Some(64 << 20));
        assert_eq!(task.kill_grace, Duration::from_secs(3));
        assert_eq!(task.env.len(), 2);
    }

    /// `memory_limit: 0` and `cpu_limit: 0s` turn off an inherited limit, as
    /// `timeout: 0s` does. Before, the first set a limit of no memory (every
    /// try of the type failed), the second one second of CPU.
    #[test]
    fn a_zero_limit_turns_off_the_inherited_one() {
        let config = load(
            "memory_limit: 64MiB\ncpu_limit: 30s\ntasks:\n  T:\n    command: [/bin/true]\n    memory_limit: 0\n    cpu_limit: 0s\n  U:\n    command: [/bin/true]\n",
        )
        .unwrap();
        let off = &config.tasks["T"].settings;
        assert_eq!((off.memory_limit, off.cpu_limit), (None, None));
        let inherited = &config.tasks["U"].settings;
        assert_eq!(inherited.memory_limit, Some(64 << 20));
        assert_eq!(inherited.cpu_limit, Some(Duration::from_secs(30)));
        // Printed back, the type still turns them off.
        let printed = config.to_yaml();
        let again = load(&printed).unwrap();
        let off = &again.tasks["T"].settings;
        assert_eq!((off.memory_limit, off.cpu_limit), (None, None), "{printed}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let message = format!(
            "{:#}",
            load("tasks:\n  T:\n    command: [x]\n    nice: 40\n").unwrap_err()
        );
        assert!(message.contains("tasks.T.nice"), "{message}");
        let message = format!("{:#}", load("poll_interval: soon\n").unwrap_err());
        assert!(
            message.contains("poll_interval") || message.contains("invalid duration"),
            "{message}"
        );
        let message = format!("{:#}", load("user: no-such-user-here\n").unwrap_err());
        assert!(message.contains("no such user"), "{message}");
        // More processes than Linux allows: every try's cgroup limit was
        // refused by the kernel.
        let message = format!("{:#}", load("max_processes: 5000000\n").unwrap_err());
        assert!(
            message.contains("max_processes") && message.contains("at most 4194304"),
            "{message}"
        );
        assert!(load("max_processes: 4194304\n").is_ok());
        // A larger tail could make an outcome MariaDB refuses to store.
        let message = format!(
            "{:#}",
            load("tasks:\n  T:\n    command: [x]\n    output_tail: 5MiB\n").unwrap_err()
        );
        assert!(
            message.contains("tasks.T.output_tail") && message.contains("more than 4MiB"),
            "{message}"
        );
        assert!(load("output_tail: 4MiB\n").is_ok());
        // A host id or node name longer than a claim's columns hold, or empty.
        for (key, text) in [
            ("host_id", format!("host_id: {}\n", "é".repeat(129))),
            ("node_name", format!("node_name: {}\n", "n".repeat(129))),
            ("host_id", "host_id: ''\n".to_string()),
        ] {
            let message = format!("{:#}", load(&text).unwrap_err());
            assert!(message.contains(&format!("{key}: ")), "{message}");
        }
        assert!(load(&format!("host_id: {}\n", "é".repeat(128))).is_ok());
        // Names longer than the columns that hold them.
        let long = "x".repeat(256);
        for text in [
            format!("tasks:\n  {long}:\n    command: [x]\n"),
            format!("tasks:\n  T:\n    command: [x]\n    on_exhausted: {long}\n"),
            format!("on_exhausted: {long}\n"),
            format!("schedules:\n  {long}:\n    every: 1m\n    task: NoOp\n"),
            format!("schedules:\n  s:\n    every: 1m\n    task: {long}\n"),
            format!("flows:\n  {long}:\n    steps:\n      - {{ name: a, task: NoOp }}\n"),
        ] {
            let message = format!("{:#}", load(&text).unwrap_err());
            assert!(
                message.contains("a name is at most 255 characters") && message.contains("has 256"),
                "{message}"
            );
            assert!(message.len() < 300, "{message}");
        }
        let fits = "x".repeat(255);
        assert!(load(&format!(
            "schedules:\n  {fits}:\n    every: 1m\n    task: {fits}\n"
        ))
        .is_ok());
        // Values whose arithmetic overflowed, or whose check took a day.
        let message = format!(
            "{:#}",
            load("max_concurrent: 4611686018427387904\n").unwrap_err()
        );
        assert!(
            message.contains("max_concurrent: must be from 1 to 1000000"),
            "{message}"
        );
        assert!(load("max_concurrent: 1000000\n").is_ok());
        let cost_31 = "$2b$31$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
        let message = format!(
            "{:#}",
            load(&format!(
                "http:\n  auth:\n    user: ops\n    password_hash: '{cost_31}'\n"
            ))
            .unwrap_err()
        );
        assert!(
            message.contains("http.auth.password_hash: bcrypt cost 31 is more than 14"),
            "{message}"
        );
        // The hash of "": the user's name alone would log in.
        let empty = bcrypt::hash_with_salt("", 4, [7; 16]).unwrap().to_string();
        let message = format!(
            "{:#}",
            load(&format!(
                "http:\n  auth:\n    user: ops\n    password_hash: '{empty}'\n"
            ))
            .unwrap_err()
        );
        assert!(
            message.contains("http.auth.password_hash: the hash of an empty password"),
            "{message}"
        );
        let real = bcrypt::hash_with_salt("s3cret", 4, [7; 16])
            .unwrap()
            .to_string();
        assert!(load(&format!(
            "http:\n  auth:\n    user: ops\n    password_hash: '{real}'\n"
        ))
        .is_ok());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let config = load("database_url: sqlite://data/q.db\npidfile: run/d.pid\ntasks:\n  T:\n    command: [bin/t]\n").unwrap();
        let dir = config
            .file
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        assert_eq!(
            config.database_url,
            format!("sqlite://{}", dir.join("data/q.db").display())
        );
        assert_eq!(config.pidfile.unwrap(), dir.join("run/d.pid"));
        assert_eq!(
            config.tasks["T"].command.as_ref().unwrap()[0],
            dir.join("bin/t").to_string_lossy()
        );
        // The same directory (see `load`).
        let config = load("database_url: sqlite:data/q.db?mode=rwc\n").unwrap();
        assert_eq!(
            config.database_url,
            format!("sqlite://{}", dir.join("data/q.db?mode=rwc").display())
        );
        for kept in ["sqlite:/abs/q.db", "sqlite::memory:", "sqlite:///abs/q.db"] {
            let config = load(&format!("database_url: '{kept}'\n")).unwrap();
            assert_eq!(config.database_url, kept);
        }
    }
}
