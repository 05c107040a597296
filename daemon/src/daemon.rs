//! The daemon: starts its parts, and stops them in the SPEC's order.
//!
//! Parts (each in its own module under `daemon/`): the `scheduler` claims
//! rows into `slots` and starts an `executor` for each (one supervised
//! try, kept among the live `tries`); the `recorder` writes their results;
//! the `heartbeat` renews leases, delivers cancels and fences itself off
//! when it loses the database; the `reaper` marks crashed rows; the
//! `pruner` deletes rows past their retention; `cron` enqueues scheduled
//! rows; `wakeup` listens for new rows; `checkpoint` keeps SQLite's
//! write-ahead log short; `control` answers on the socket.
//!
//! Shutdown order (SIGTERM/SIGINT or `stop` on the socket): stop claiming;
//! let running tries finish for up to `shutdown_timeout` (a second
//! SIGTERM/SIGINT cuts this short); then stop them
//! (SIGTERM, repeated every `kill_retry`, SIGKILL after `kill_grace`) and
//! record them INTERRUPTED, their try given back; flush the recorder; exit.

mod checkpoint;
mod control;
mod cron;
mod executor;
mod heartbeat;
mod pauses;
mod pruner;
mod reaper;
mod recorder;
mod scheduler;
mod tries;
mod view;
mod wakeup;

use tries::Tries;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::{Backoff, Health};
use crate::instance::InstanceId;
use crate::store::{Purpose, Store};
use crate::supervisor::{Spawner, StopReason};
use crate::task_types::{Asking, Registry, Setup};

/// Options for one daemon run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub no_migrate: bool,
    /// What a reload reads again: the config file, with these flags over it.
    pub overrides: crate::config::Overrides,
}

/// What stops or reloads a running daemon from outside (the signals of
/// `taskrunnerd`, a test).
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// Drain and stop: the first SIGTERM or SIGINT (`stop` on the control
    /// socket cancels it too).
    pub shutdown: CancellationToken,
    /// Cut the drain short: a second SIGTERM or SIGINT stops the running
    /// tasks at once (SIGTERM, then SIGKILL after their kill_grace), recorded
    /// INTERRUPTED, as RQ and Sidekiq users expect of a second Ctrl-C.
    pub stop_now: CancellationToken,
    /// Read the config file again (SIGHUP), with the same flags over it; a
    /// file that does not load is refused and the old config stays.
    pub reload: Arc<Notify>,
}

/// Runs the daemon until `triggers.shutdown` is cancelled, then drains and
/// returns. `on_ready` is called once the daemon is serving (pidfile, systemd).
pub async fn run(
    config: Config,
    options: RunOptions,
    triggers: Triggers,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let shutdown = triggers.shutdown.clone();
    // The page's settings are the config's: checked before the database is
    // (before, a token file that could not be read was found only once the
    // database answered, after an outage that lasted).
    crate::web::check_settings(&config, config.http.as_ref().and_then(|http| http.listen))?;
    let store = Store::open(&config.database_url, Purpose::Daemon)?;
    store.set_hooks(config.hooks());
    store.set_max_options(config.max_options);
    store.set_answer_bound(config.lease_timeout);
    let health = Arc::new(Health::default());
    if !options.no_migrate {
        let mut backoff = Backoff::default();
        loop {
            let migrated = match store.check_encoding().await {
                // Under systemd, a start that migrates is given more time
                // while it does (a table of millions of rows takes minutes).
                Ok(()) => {
                    let extend = format!(
                        "EXTEND_TIMEOUT_USEC={}",
                        (crate::store::MIGRATING_EVERY * 3).as_micros()
                    );
                    let migrating = || crate::service::notify_systemd(&extend);
                    store.migrate_unless(shutdown.cancelled(), migrating).await
                }
                Err(error) => Err(error),
            };
            match migrated {
                // Told to stop while another process migrated.
                Ok(None) => return Ok(()),
                Ok(Some(migration)) => {
                    tracing::info!("schema of {}: {migration}", store.display_url);
                    break;
                }
                Err(error) if is_permanent(&error) => return Err(error),
                Err(error) => {
                    let error = crate::store::diagnose::explain(error, &config.database_url).await;
                    health.failed("migrating the schema", &error)
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        health.succeeded("migrating the schema");
    } else {
        // Without migrating, the schema must be exactly this binary's: an
        // older or missing one would fail every statement for ever.
        let mut backoff = Backoff::default();
        loop {
            match store.check_schema().await {
                Ok(()) => break,
                Err(error) if is_permanent(&error) => return Err(error),
                Err(error) => health.failed("checking the schema", &error),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        health.succeeded("checking the schema");
    }
    // Before the first try: which limits hold, and (cgroup v2) the daemon
    // moved into a leaf of its delegated cgroup. Emptied cgroups are kept
    // for the next tries while the daemon runs. The spawner asks the
    // programs for their task types too.
    crate::supervisor::cgroup::init().keep_spares();
    let spawner = crate::supervisor::start_spawner().context("preparing to start tasks")?;
    let registry = {
        let config = config.clone();
        let asking = Asking::Through(spawner.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || Registry::load_asking(&config, &asking))
            .await
            .context("loading task types")??
    };
    // Bound before `on_ready`, so that a `status` right after start finds it.
    let control = match &config.socket {
        Some(path) => Some(control::Listening::bind(path)?),
        None => None,
    };
    if let Some(warning) = crate::supervisor::resources::open_files_warning(config.max_concurrent) {
        tracing::warn!("{warning}");
    }
    let wake = Arc::new(Notify::new());
    let (recorder, writer) = recorder::Writer::new(store.clone(), health.clone(), wake.clone());
    let instance = InstanceId::new(&config.host_id);
    let setup = Setup::new(config, registry).channel();
    let tries: Arc<Tries> = Arc::default();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let check_cancels = Arc::new(Notify::new());
    let stop_claiming = CancellationToken::new();
    let stop_now = triggers.stop_now.clone();
    let next_poll = Arc::new(Mutex::new(None));
    let paused: Arc<pauses::Pauses> = Arc::default();
    let readers = Store::open(&Setup::current_config(&setup).database_url, Purpose::Cli)?;
    let view = Arc::new(view::View {
        setup: setup.clone(),
        store: store.clone(),
        readers: readers.clone(),
        instance: instance.clone(),
        tries: tries.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        queue_gauges: Default::default(),
        wake: wake.clone(),
        check_cancels: check_cancels.clone(),
        started: Instant::now(),
        next_poll: next_poll.clone(),
        paused: paused.clone(),
        stop_claiming: stop_claiming.clone(),
    });
    // The lease this daemon's row holds (see `Heartbeat::published`).
    let mut published = None;
    {
        let config = Setup::current_config(&setup);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            database = %store.display_url,
            host = %config.host_id,
            instance = %instance,
            max_concurrent = config.max_concurrent,
            priority = crate::supervisor::priority::describe(),
            isolation = crate::supervisor::isolation::describe(),
            limits = %crate::supervisor::cgroup::describe(),
            task_types = %setup.borrow().registry.names(&config).join(", "),
            "taskrunnerd started"
        );
        // For people (the web page's daemons), and for other daemons'
        // reapers (this daemon's lease): the heartbeat writes it again.
        let me = presence(&instance, &config);
        match store.register_daemon(&me).await {
            Ok(()) => published = Some(config.lease_timeout),
            Err(error) => tracing::warn!(
                "could not write this daemon's row in task_runner_daemons: {}; the heartbeat renews every second until it is written",
                crate::error_line(&error)
            ),
        }
        let names = setup.borrow().registry.names(&config);
        if let Some(warning) = crate::supervisor::isolation::root_warning(&config, &names) {
            tracing::warn!("{warning}");
        }
    }

    // Every service runs until `services` is cancelled at the end of the
    // shutdown (the scheduler until it stops claiming and its tries have
    // ended). One that ends before (a panic, an error, a bug) leaves the
    // daemon without its lease renewal, reaping, claims or recording: the
    // daemon then shuts down in the SPEC's order and exits 1. Each service
    // holds only the handles it uses.
    let services = CancellationToken::new();
    let mut supervised = Supervised::default();
    let scheduler = scheduler::Scheduler {
        setup: setup.clone(),
        store: store.clone(),
        instance: instance.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        tries: tries.clone(),
        wake: wake.clone(),
        next_poll,
        paused,
        executor: Arc::new(executor::Executor {
            setup: setup.clone(),
            spawner: spawner.clone(),
            tries: tries.clone(),
            recorder: recorder.clone(),
            metrics: metrics.clone(),
        }),
    };
    supervised.spawn("scheduler", scheduler.run(stop_claiming.clone()));
    supervised.spawn(RECORDER, writer.run(services.clone()));
    // Where the daemon fences itself off, a process apart fences it off
    // when it does not run (supervisor/watchdog.rs).
    let watchdog = (store.backend() != crate::store::Backend::Sqlite).then(|| {
        let watchdog = Arc::new(crate::supervisor::watchdog::Watchdog::default());
        supervised.spawn(
            "fencing watchdog",
            watchdog.clone().run(spawner.clone(), services.clone()),
        );
        watchdog
    });
    let heartbeat = heartbeat::Heartbeat {
        published,
        setup: setup.clone(),
        store: store.clone(),
        instance: instance.clone(),
        tries: tries.clone(),
        health: health.clone(),
        recorder: recorder.clone(),
        check_cancels: check_cancels.clone(),
        watchdog,
        wake: wake.clone(),
    };
    supervised.spawn("heartbeat", heartbeat.run(services.clone()));
    let reaper = reaper::Reaper {
        setup: setup.clone(),
        store: store.clone(),
        instance: instance.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        wake: wake.clone(),
    };
    supervised.spawn("reaper", reaper.run(services.clone()));
    let database_url = Setup::current_config(&setup).database_url.clone();
    let wakeup = wakeup::Wakeup {
        store: store.clone(),
        database_url: database_url.clone(),
        wake: wake.clone(),
    };
    supervised.spawn("wakeup", wakeup.run(services.clone()));
    let checkpointer = checkpoint::Checkpointer {
        store: store.clone(),
        database_url,
    };
    supervised.spawn("checkpoint", checkpointer.run(services.clone()));
    let pruner = pruner::Pruner {
        setup: setup.clone(),
        store: store.clone(),
        health: health.clone(),
    };
    supervised.spawn("retention", pruner.run(services.clone()));
    let cron = cron::Cron {
        setup: setup.clone(),
        store: store.clone(),
        health: health.clone(),
        wake: wake.clone(),
    };
    supervised.spawn("cron", cron.run(services.clone()));
    let reloader = Reloader {
        setup: setup.clone(),
        store: store.clone(),
        spawner: spawner.clone(),
        wake: wake.clone(),
        trigger: triggers.reload.clone(),
        overrides: options.overrides.clone(),
    };
    supervised.spawn("reload", reloader.run(services.clone()));
    if let Some(listening) = control {
        let control = control::Control {
            listening,
            view: view.clone(),
            shutdown: shutdown.clone(),
        };
        supervised.spawn("control socket", control.run(services.clone()));
    }
    // The web page and /metrics (`http: { listen }`), reading on `readers`.
    let http_listen = Setup::current_config(&setup)
        .http
        .as_ref()
        .and_then(|http| http.listen);
    if let Some(address) = http_listen {
        let config = Setup::current_config(&setup);
        let web = Arc::new(crate::web::Web::new(
            readers,
            config,
            Some(view.clone() as Arc<dyn crate::web::Daemon>),
        )?);
        let server = crate::web::Server::bind(address, web).await?;
        supervised.spawn("web", server.run(services.clone()));
    }
    on_ready();

    let mut failure: Option<String> = None;
    let mut scheduler_ended = false;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some((name, ended)) = supervised.next_end() => {
            scheduler_ended = name == "scheduler";
            let what = ended.err().unwrap_or_else(|| format!("the {name} service ended"));
            tracing::error!("{what} unexpectedly: stopping the daemon");
            failure = Some(what);
        }
    }
    let config = Setup::current_config(&setup);
    tracing::info!(
        running = tries.len(),
        "shutting down: no new claims; waiting up to {} for running tasks",
        crate::units::format_duration(config.shutdown_timeout)
    );
    stop_claiming.cancel();
    tries.no_new_ones();
    wake.notify_one();
    let drained = tokio::select! {
        drained = wait_until_idle(&tries, config.shutdown_timeout) => drained,
        _ = stop_now.cancelled() => {
            tracing::warn!(
                running = tries.len(),
                "second stop request: stopping the running tasks now (they will run again)"
            );
            false
        }
    };
    if !drained {
        if !stop_now.is_cancelled() {
            tracing::warn!(
                running = tries.len(),
                "shutdown_timeout passed: stopping the remaining tasks (they will run again)"
            );
        }
        tries.stop_all(StopReason::Shutdown);
        let longest_grace = config
            .tasks
            .values()
            .map(|t| t.settings.kill_grace)
            .chain([config.defaults.kill_grace])
            .max()
            .unwrap_or_default();
        wait_until_idle(&tries, longest_grace + Duration::from_secs(2)).await;
    }
    // Every try has ended (their tasks hold the spawner's children): the
    // scheduler joins them before it returns.
    while !scheduler_ended {
        let Some((name, ended)) = supervised.next_end().await else {
            break;
        };
        scheduler_ended = name == "scheduler";
        let what = match ended {
            Ok(()) if scheduler_ended => continue,
            Ok(()) => format!("the {name} service ended"),
            Err(what) => what,
        };
        tracing::error!("{what} unexpectedly during the shutdown");
        failure.get_or_insert(what);
    }
    // No try runs: the preloaded parents go too.
    spawner.stop_preloaded().await;
    crate::supervisor::cgroup::init().release_spares();
    // The other services stop; the recorder first applies every write
    // queued (the tries' outcomes), retrying through an outage for a while.
    services.cancel();
    if !supervised.stop_all().await {
        tracing::error!(
            "could not record every result before exiting; the reaper will rerun those rows"
        );
    }
    // The last two steps wait on the database: bounded together, so that a
    // database that does not answer cannot keep a stopped daemon from exiting.
    let last_steps = tokio::time::Instant::now() + LAST_STEPS;
    match tokio::time::timeout_at(last_steps, store.daemon_stopped(&instance)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(
                "could not mark this daemon stopped in task_runner_daemons: {}",
                crate::error_line(&error)
            )
        }
        Err(_) => tracing::warn!(
            "the database did not answer within {}: this daemon's row in task_runner_daemons is not marked stopped",
            crate::units::format_duration(LAST_STEPS)
        ),
    }
    if tokio::time::timeout_at(last_steps, store.close())
        .await
        .is_err()
    {
        tracing::warn!("exiting without closing every database connection cleanly");
    }
    if let Some(failure) = failure {
        anyhow::bail!("{failure}; the daemon stopped");
    }
    tracing::info!("taskrunnerd stopped");
    Ok(())
}

/// The recorder's name among the services: the one a shutdown waits for.
const RECORDER: &str = "recorder";

/// How long the recorder has, once every try has ended, to write what is
/// queued (retrying through an outage).
const RECORDER_STOP: Duration = Duration::from_secs(30);

/// How long the other services have to end once told to. They end at once
/// unless a database call holds them (a database that does not answer);
/// what they leave undone (a renewal, a reaper's or retention's pass, a
/// cron tick, each in its own transactions) their next pass, in this
/// daemon's successor or another daemon, does again.
const SERVICE_GRACE: Duration = Duration::from_secs(2);

/// `work`, unless `stop` is cancelled and `work` has still not finished
/// [`SERVICE_GRACE`] later: then `None`, and `work` is dropped where it
/// waits. For a service's database calls, which a database that does not
/// answer would hold up for ever; none of them is the one write of a result.
async fn unless_stopping<T>(
    stop: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(SERVICE_GRACE).await;
        } => None,
    }
}

/// How long the last steps of a shutdown (this daemon's row marked stopped,
/// the connections closed) may wait on the database, together.
const LAST_STEPS: Duration = Duration::from_secs(5);

/// The daemon's services, in one `JoinSet`, each known by its name.
#[derive(Default)]
struct Supervised {
    set: tokio::task::JoinSet<Result<()>>,
    names: std::collections::HashMap<tokio::task::Id, (&'static str, tokio::task::AbortHandle)>,
}

impl Supervised {
    fn spawn(
        &mut self,
        name: &'static str,
        service: impl std::future::Future<Output = Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(service);
        self.names.insert(handle.id(), (name, handle));
    }

    /// The next service to end: its name, and what went wrong (an error or
    /// a panic) as a sentence; `Ok` if it returned.
    async fn next_end(&mut self) -> Option<(&'static str, Result<(), String>)> {
        let ended = self.set.join_next_with_id().await?;
        let id = match &ended {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let name = self.names.remove(&id).map_or("unnamed", |(name, _)| name);
        Some((
            name,
            match ended {
                Ok((_, Ok(()))) => Ok(()),
                Ok((_, Err(error))) => Err(format!(
                    "the {name} service failed: {}",
                    crate::error_line(&error)
                )),
                Err(error) if error.is_panic() => Err(format!(
                    "the {name} service panicked: {}",
                    panic_message(error.into_panic())
                )),
                Err(error) => Err(format!("the {name} service ended: {error}")),
            },
        ))
    }

    /// Waits for the services, told to stop, to end: the recorder for up to
    /// [`RECORDER_STOP`], the others for [`SERVICE_GRACE`], after which they
    /// are stopped where they wait (one line names them). False if the
    /// recorder did not end (then every service left is stopped).
    async fn stop_all(&mut self) -> bool {
        let began = tokio::time::Instant::now();
        let mut grace = Some(began + SERVICE_GRACE);
        let mut stopped: Vec<&'static str> = Vec::new();
        let mut recorded = false;
        loop {
            tokio::select! {
                ended = self.next_end() => match ended {
                    None => return true,
                    Some((name, ended)) => {
                        recorded |= name == RECORDER;
                        match ended {
                            Err(what) if !stopped.contains(&name) => {
                                tracing::error!("{what} during the shutdown");
                            }
                            _ => {}
                        }
                    }
                },
                _ = crate::units::sleep_until_opt(grace) => {
                    grace = None;
                    for (name, handle) in self.names.values() {
                        if *name != RECORDER {
                            handle.abort();
                            stopped.push(name);
                        }
                    }
                    if !stopped.is_empty() {
                        stopped.sort_unstable();
                        tracing::warn!(
                            "the {} service(s) did not end within {} of the shutdown (waiting on the database?): stopped",
                            stopped.join(", "),
                            crate::units::format_duration(SERVICE_GRACE)
                        );
                    }
                }
                _ = tokio::time::sleep_until(began + RECORDER_STOP) => {
                    self.set.abort_all();
                    return recorded;
                }
            }
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Waits until no try runs, for at most `limit`; true if none runs.
async fn wait_until_idle(tries: &Tries, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if tries.is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Errors that retrying cannot fix (a migration that does not apply).
fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<crate::store::SchemaMismatch>()
            || matches!(
                cause.downcast_ref::<sqlx::migrate::MigrateError>(),
                Some(
                    sqlx::migrate::MigrateError::VersionMissing(_)
                        | sqlx::migrate::MigrateError::VersionMismatch(_)
                        | sqlx::migrate::MigrateError::Dirty(_)
                )
            )
    })
}

/// Reloads the config at each [`Triggers::reload`] (SIGHUP): reads the
/// config file again (task types, limits, intervals) without touching
/// running tasks. A file that does not load is refused, with the reason, and
/// the old config stays. The database URL, host id, pidfile and socket are
/// fixed for the daemon's life.
struct Reloader {
    setup: watch::Sender<Setup>,
    store: Store,
    spawner: Spawner,
    wake: Arc<Notify>,
    trigger: Arc<Notify>,
    /// The command line's flags, applied over the file again.
    overrides: crate::config::Overrides,
}

impl Reloader {
    async fn run(self, cancel: CancellationToken) -> Result<()> {
        loop {
            tokio::select! {
                _ = self.trigger.notified() => self.reload().await,
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    async fn reload(&self) {
        let overrides = self.overrides.clone();
        let current = Setup::current_config(&self.setup);
        let asking = Asking::Through(self.spawner.clone(), tokio::runtime::Handle::current());
        let loaded =
            tokio::task::spawn_blocking(move || -> Result<(Config, Registry, Vec<&str>)> {
                let mut config = Config::resolve(&overrides)?;
                // What a restart takes, said once if the file changed it.
                let listen = |config: &Config| config.http.as_ref().and_then(|http| http.listen);
                let kept: Vec<&str> = [
                    ("database_url", config.database_url != current.database_url),
                    ("host_id", config.host_id != current.host_id),
                    ("pidfile", config.pidfile != current.pidfile),
                    ("socket", config.socket != current.socket),
                    ("log_format", config.log_format != current.log_format),
                    // The file SIGHUP reopens is the one named at start.
                    ("log_file", config.log_file != current.log_file),
                    ("http.listen", listen(&config) != listen(&current)),
                ]
                .into_iter()
                .filter_map(|(key, changed)| changed.then_some(key))
                .collect();
                // A node name taken from the host id follows the host id kept
                // (before, it took the file's new host id while the daemon kept
                // its own: rows for its node waited, others' ran here).
                if config.node_name == config.host_id {
                    config.node_name = current.host_id.clone();
                }
                config.database_url = current.database_url.clone();
                config.host_id = current.host_id.clone();
                config.pidfile = current.pidfile.clone();
                config.socket = current.socket.clone();
                config.log_format = current.log_format;
                config.log_file = current.log_file.clone();
                // So does the page, bound once: its address stays in the
                // config, so that each reload's settings are checked against
                // the address it listens on (before, the config took the
                // file's: a second reload checked a loopback address the
                // page did not listen on, and let `auth` go on 0.0.0.0).
                let listening = listen(&current);
                match (config.http.as_mut(), listening) {
                    (Some(http), _) => http.listen = listening,
                    (None, Some(address)) => {
                        config.http = Some(crate::config::http::Http {
                            listen: Some(address),
                            read_only: false,
                            auth: None,
                        })
                    }
                    (None, None) => {}
                }
                crate::web::check_settings(&config, listening)?;
                let registry = Registry::load_asking(&config, &asking)?;
                Ok((config, registry, kept))
            })
            .await;
        match loaded {
            Ok(Ok((config, registry, kept))) => {
                if !kept.is_empty() {
                    tracing::warn!(
                        "config reload: {} changed in the file; the daemon keeps its own until a restart",
                        kept.join(", ")
                    );
                }
                let names = registry.names(&config).join(", ");
                self.store.set_hooks(config.hooks());
                self.store.set_max_options(config.max_options);
                self.store.set_answer_bound(config.lease_timeout);
                self.setup.send_replace(Setup::new(config, registry));
                // Preloaded programs boot again with the new config at their next try.
                self.spawner.retire_preloaded();
                self.wake.notify_one();
                tracing::info!(task_types = %names, "config reloaded");
            }
            Ok(Err(error)) => {
                tracing::error!(
                    "config reload refused, keeping the old config: {}",
                    crate::error_line(&error)
                )
            }
            Err(error) => tracing::error!("config reload failed: {error}"),
        }
    }
}

/// This daemon, running `instance` with `config`, as its row of
/// `task_runner_daemons` shows it.
fn presence<'a>(
    instance: &'a str,
    config: &'a crate::config::Config,
) -> crate::store::daemons::DaemonPresence<'a> {
    crate::store::daemons::DaemonPresence {
        instance,
        host: &config.host_id,
        node_name: Some(config.node_name.as_str()).filter(|n| !n.is_empty()),
        pid: std::process::id(),
        max_concurrent: config.max_concurrent,
        lease: config.lease_timeout,
    }
}
