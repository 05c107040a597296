//! `taskrunnerd`: flags → config → `daemon::run` → exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use taskrunner::config::{Config, LogFormat, Overrides};
use taskrunner::daemon::{self, RunOptions, Triggers};
use taskrunner::service::{self, Pidfile};
use taskrunner::supervisor::watchdog;
use taskrunner::units::parse_duration;

/// Runs requests from the task_runner_requests table, each in its own process.
#[derive(Debug, Parser)]
#[command(name = "taskrunnerd", version)]
struct Flags {
    /// Config file (default: ./taskrunner.yml, else /etc/taskrunner/taskrunner.yml)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://path.db, sqlite:///abs/path.db or postgres://… (overrides DATABASE_URL)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Poll the table at least this often (e.g. 60s)
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    poll_interval: Option<Duration>,
    /// Run at most this many tasks at once
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent: Option<u32>,
    /// Write the daemon's pid here, held with flock
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Listen for status/wake/stop on this local socket path
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The host id recorded on rows (default: the hostname)
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// The node name that rows' `node`/`not_node` refer to (default: the host id)
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Log format on stderr
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Do not create or upgrade the schema at start
    #[arg(long)]
    no_migrate: bool,
    /// Detach into the background once ready (stdout/stderr go to log_file)
    #[arg(long)]
    daemonize: bool,
}

fn main() -> ExitCode {
    // First: the init of a container (below) waits for its children too.
    taskrunner::supervisor::restore_child_signal();
    // The daemon's fencing watchdog: this executable, started by the daemon.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|flag| flag == watchdog::FLAG) {
        return watchdog::main(&args[1..]);
    }
    let flags: Flags = taskrunner::parse_or_exit("taskrunnerd");
    // PID 1 of a container: this process stays its init, and the daemon
    // runs as its child (see `service::run_as_init`). A daemon told to
    // detach leaves PID 1 at once anyway.
    if service::is_pid_1() && !flags.daemonize {
        return service::run_as_init();
    }
    let overrides = Overrides {
        config: flags.config,
        database_url: flags.database_url,
        host_id: flags.host_id,
        node_name: flags.node_name,
        socket: flags.socket,
        pidfile: flags.pidfile,
        poll_interval: flags.poll_interval,
        max_concurrent: flags.max_concurrent.map(|n| n as usize),
        log_format: flags.log_format,
    };
    let config = match Config::resolve(&overrides) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    // The one bare fork: before the runtime (and any thread) exists.
    // Its log file is opened again at each SIGHUP (a rotation moved it).
    let log_file = config.log_file.clone().filter(|_| flags.daemonize);
    let ready_pipe = if flags.daemonize {
        match service::daemonize(config.log_file.as_deref()) {
            Ok(pipe) => Some(pipe),
            Err(error) => return fail(&error),
        }
    } else {
        None
    };
    // Taken by whoever reports first: readiness, or the error that ends the start.
    let ready_pipe = Arc::new(Mutex::new(ready_pipe));
    // Before any thread starts (the log's writer, the runtime's): they all
    // inherit the priority.
    taskrunner::supervisor::priority::raise_daemon();
    taskrunner::supervisor::resources::raise_open_files();
    taskrunner::supervisor::isolation::protect_daemon();
    taskrunner::init_logging(config.log_format, taskrunner::LogWriter::Queued);
    // One runtime thread, this main thread: the daemon's own work per task
    // is small, and a single thread saves the cross-thread wake-ups that
    // dominated its CPU time. Task processes are started right here too (this
    // thread lives as long as the process, see supervisor/spawner.rs);
    // blocking work goes to the blocking pool, whose threads are kept once
    // made: when the system refuses a thread (out of processes: `TasksMax`,
    // a full pids cgroup) and the pool has none, tokio panics in
    // `spawn_blocking`. Before, the pool's idle threads ended after 10 s,
    // and in such a shortage a try with large options, or the reaper's
    // sweep, or a reconnection by host name, panicked: the try was counted
    // CRASHED, or the daemon stopped. With a thread kept (the start's task
    // type load makes the first one), the work waits for it instead. At
    // most 32 are made (tokio's default is 512): each kept thread counts
    // against the same process limit as the tasks.
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::MAX)
        .max_blocking_threads(32)
        .build()
    {
        Ok(runtime) => {
            let result = runtime.block_on(serve(
                config,
                overrides,
                flags.no_migrate,
                ready_pipe.clone(),
                log_file,
            ));
            runtime.shutdown_timeout(Duration::from_secs(1));
            result
        }
        Err(error) => Err(anyhow::Error::new(error).context("starting the runtime")),
    };
    // The last lines (the stop, the error) are out before the exit.
    taskrunner::flush_log(LOG_FLUSH_WITHIN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A daemonized start that failed: the launching process prints it.
            if let Some(pipe) = take(&ready_pipe) {
                pipe.failed(
                    taskrunner::exit_code_for(&error),
                    &taskrunner::error_line(&error),
                );
            }
            fail(&error)
        }
    }
}

/// How long the exit waits for queued log lines to be written: a log
/// reader that stopped reading must not hold the exit up for ever.
const LOG_FLUSH_WITHIN: Duration = Duration::from_secs(2);

fn take(ready_pipe: &Mutex<Option<service::ReadyPipe>>) -> Option<service::ReadyPipe> {
    ready_pipe.lock().unwrap_or_else(|e| e.into_inner()).take()
}

async fn serve(
    config: Config,
    mut overrides: Overrides,
    no_migrate: bool,
    ready_pipe: Arc<Mutex<Option<service::ReadyPipe>>>,
    log_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    // Held (locked) until this function returns, removed on drop.
    let _pidfile = match &config.pidfile {
        Some(path) => Some(Pidfile::acquire(path)?),
        None => None,
    };
    let triggers = Triggers::default();
    // A reload reads the same file and applies the same flags again.
    overrides.config = config.file.clone();
    let file = overrides.config.clone();
    // Set once the daemon serves: a SIGHUP before is ignored.
    let ready = Arc::new(AtomicBool::new(false));
    // Installed before the daemon reports ready: a SIGHUP sent by an init
    // script after `start` returns must reload, not kill (its default).
    let signals = tokio::spawn(handle_signals(
        Signals::install()?,
        triggers.clone(),
        ready.clone(),
        file,
        log_file,
    ));
    let stopping = triggers.shutdown.clone();
    let notify_stopping = tokio::spawn(async move {
        stopping.cancelled().await;
        service::notify_systemd("STOPPING=1");
    });
    let result = daemon::run(
        config,
        RunOptions {
            no_migrate,
            overrides,
        },
        triggers,
        || {
            ready.store(true, Ordering::SeqCst);
            service::notify_systemd("READY=1");
            if let Some(pipe) = take(&ready_pipe) {
                pipe.ready();
            }
        },
    )
    .await;
    signals.abort();
    notify_stopping.abort();
    result
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use anyhow::Context;
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).context("installing signal handlers");
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }
}

/// SIGTERM/SIGINT: graceful stop; a second one during the drain stops the
/// tasks at once. SIGHUP: reopen `log_file` (a daemonized daemon's, which
/// logrotate moved away: `init/taskrunner.logrotate`), then reload the
/// config file.
async fn handle_signals(
    mut signals: Signals,
    triggers: Triggers,
    ready: Arc<AtomicBool>,
    file: Option<PathBuf>,
    log_file: Option<PathBuf>,
) {
    let stop = |name: &str| {
        if triggers.shutdown.is_cancelled() {
            tracing::info!("{name} received again: stopping the running tasks now");
            triggers.stop_now.cancel();
        } else {
            tracing::info!("{name} received");
            triggers.shutdown.cancel();
        }
    };
    loop {
        tokio::select! {
            _ = signals.term.recv() => stop("SIGTERM"),
            _ = signals.int.recv() => stop("SIGINT"),
            _ = signals.hup.recv() => {
                reopen(log_file.as_deref());
                match (ready.load(Ordering::SeqCst), &file) {
                (true, Some(path)) => {
                    tracing::info!("SIGHUP received: reloading {}", path.display());
                    triggers.reload.notify_one();
                }
                (false, _) => tracing::warn!("SIGHUP before the daemon was ready: ignored"),
                (_, None) => tracing::warn!("SIGHUP: no config file to reload"),
                }
            }
        }
    }
}

/// Opens `log_file` again onto stdout and stderr, logging the outcome:
/// the line written before the reopen goes to the old file, the rest to
/// the new one.
fn reopen(log_file: Option<&std::path::Path>) {
    let Some(path) = log_file else {
        return;
    };
    match service::reopen_log(path) {
        Ok(()) => tracing::info!("SIGHUP received: log file {} opened again", path.display()),
        Err(error) => tracing::error!(
            "SIGHUP received: log file {} not opened again, logging on to the old one: {}",
            path.display(),
            taskrunner::error_line(&error)
        ),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("taskrunnerd: {}", taskrunner::error_line(error));
    ExitCode::from(taskrunner::exit_code_for(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_counts_are_checked_by_the_parser() {
        assert!(Flags::try_parse_from(["taskrunnerd", "--poll-interval", "250ms"]).is_ok());
        assert!(Flags::try_parse_from(["taskrunnerd", "--poll-interval", "soon"]).is_err());
        assert!(Flags::try_parse_from(["taskrunnerd", "--max-concurrent", "0"]).is_err());
        assert!(Flags::try_parse_from(["taskrunnerd", "--log-format", "xml"]).is_err());
    }
}
