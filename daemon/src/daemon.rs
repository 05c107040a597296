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
mod pruner;
mod reaper;
mod recorder;
mod scheduler;
mod slots;
mod tries;
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
use crate::task_types::{Registry, Setup};
use recorder::Recorder;

/// State shared by the daemon's parts.
pub struct Shared {
    /// The config and task types: a reload is one send.
    pub setup: watch::Sender<Setup>,
    pub store: Store,
    pub spawner: Spawner,
    pub recorder: Recorder,
    pub health: Arc<Health>,
    /// Unique per daemon process; rows it claims carry it in `claimed_by`.
    pub instance: InstanceId,
    pub tries: Arc<Tries>,
    /// Poll now: a row was enqueued, a try ended, a delay came due.
    pub wake: Arc<Notify>,
    /// Look for cancel requests now rather than at the next heartbeat: a
    /// `wake` on the control socket (the CLI sends one after `cancel`).
    pub check_cancels: Notify,
    /// Stop claiming (the first step of shutdown).
    pub stop_claiming: CancellationToken,
    /// Cut the drain short (see [`Triggers::stop_now`]).
    pub stop_now: CancellationToken,
    pub started: Instant,
    /// When the scheduler will next poll unprompted (for `status`).
    pub next_poll: Mutex<Option<Instant>>,
    /// What this daemon counts for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// The per-queue readings of `/metrics`, cached for a second.
    pub queue_gauges: crate::metrics::QueueGauges,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.setup.borrow().config.clone()
    }

    /// The Prometheus text of `/metrics` (and `metrics` on the control socket).
    /// `store` reads the per-queue gauges (the web page's own pool, so that
    /// a scrape never waits for the daemon's SQLite writer, nor it for a scrape).
    pub async fn metrics_text(&self, store: &Store) -> Result<String> {
        self.metrics.set_daemon_state(
            self.tries.len(),
            self.config().max_concurrent,
            self.health.errors(),
        );
        crate::metrics::render(store, &self.queue_gauges, Some(&self.metrics)).await
    }
}

impl crate::web::Daemon for Shared {
    fn wake(&self) {
        self.wake.notify_one();
    }

    fn metrics_text<'a>(
        &'a self,
        store: &'a Store,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>> {
        Box::pin(Shared::metrics_text(self, store))
    }
}

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
    let store = Store::open(&config.database_url, Purpose::Daemon)?;
    store.set_hooks(config.hooks());
    store.set_max_options(config.max_options);
    let health = Arc::new(Health::default());
    if !options.no_migrate {
        let mut backoff = Backoff::default();
        loop {
            let migrated = match store.check_encoding().await {
                Ok(()) => store.migrate().await,
                Err(error) => Err(error),
            };
            match migrated {
                Ok(migration) => {
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
    let registry = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Registry::load(&config))
            .await
            .context("loading task types")??
    };
    // Bound before `on_ready`, so that a `status` right after start finds it.
    let control = match &config.socket {
        Some(path) => Some(control::Control::bind(path)?),
        None => None,
    };
    // Before the first try: which limits hold, and (cgroup v2) the daemon
    // moved into a leaf of its delegated cgroup.
    crate::supervisor::cgroup::init();
    let spawner = crate::supervisor::start_spawner().context("preparing to start tasks")?;
    if let Some(warning) = crate::supervisor::resources::open_files_warning(config.max_concurrent) {
        tracing::warn!("{warning}");
    }
    let wake = Arc::new(Notify::new());
    let (recorder, recorder_done) = Recorder::start(store.clone(), health.clone(), wake.clone());
    let shared = Arc::new(Shared {
        instance: InstanceId::new(&config.host_id),
        setup: Setup::new(config, registry).channel(),
        store,
        spawner,
        recorder,
        health,
        tries: Arc::default(),
        wake,
        check_cancels: Notify::new(),
        stop_claiming: CancellationToken::new(),
        stop_now: triggers.stop_now.clone(),
        started: Instant::now(),
        next_poll: Mutex::new(None),
        metrics: crate::metrics::Metrics::new(),
        queue_gauges: Default::default(),
    });
    {
        let config = shared.config();
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            database = %shared.store.display_url,
            host = %config.host_id,
            instance = %shared.instance,
            max_concurrent = config.max_concurrent,
            priority = crate::supervisor::priority::describe(),
            isolation = crate::supervisor::isolation::describe(),
            limits = %crate::supervisor::cgroup::describe(),
            task_types = %shared.setup.borrow().registry.names(&config).join(", "),
            "taskrunnerd started"
        );
        // For people (the web page's daemons): a failure costs nothing else.
        let me = crate::store::daemons::DaemonPresence {
            instance: &shared.instance,
            host: &config.host_id,
            node_name: Some(config.node_name.as_str()).filter(|n| !n.is_empty()),
            pid: std::process::id(),
            max_concurrent: config.max_concurrent,
        };
        if let Err(error) = shared.store.register_daemon(&me).await {
            tracing::debug!("could not write this daemon's row in task_runner_daemons: {error:#}");
        }
    }

    // Every service runs until `services` is cancelled at the end of the
    // shutdown. One that ends before (a panic, a bug) leaves the daemon
    // without its lease renewal, reaping or claims: the daemon then shuts
    // down in the SPEC's order and exits 1.
    {
        let config = shared.config();
        let names = shared.setup.borrow().registry.names(&config);
        if let Some(warning) = crate::supervisor::isolation::root_warning(&config, &names) {
            tracing::warn!("{warning}");
        }
    }
    // Every service runs until `services` is cancelled at the end of the
    // shutdown (the scheduler until it stops claiming and its tries have
    // ended). One that ends before (a panic, an error, a bug) leaves the
    // daemon without its lease renewal, reaping or claims: the daemon then
    // shuts down in the SPEC's order and exits 1.
    let services = CancellationToken::new();
    let mut supervised = Supervised::default();
    let ok = |service| async move {
        service.await;
        Ok(())
    };
    supervised.spawn(
        "scheduler",
        ok(Box::pin(scheduler::run(shared.clone())) as Unit),
    );
    supervised.spawn(
        "heartbeat",
        ok(Box::pin(heartbeat::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "reaper",
        ok(Box::pin(reaper::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "wakeup",
        ok(Box::pin(wakeup::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "checkpoint",
        ok(Box::pin(checkpoint::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "retention",
        ok(Box::pin(pruner::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "cron",
        ok(Box::pin(cron::run(shared.clone(), services.clone()))),
    );
    supervised.spawn(
        "reload",
        reload_on(
            shared.clone(),
            triggers.reload.clone(),
            options.overrides.clone(),
            services.clone(),
        ),
    );
    if let Some(control) = control {
        supervised.spawn(
            "control socket",
            ok(Box::pin(control.serve(
                shared.clone(),
                services.clone(),
                shutdown.clone(),
            ))),
        );
    }
    // The web page and /metrics (`http: { listen }`), on a pool of its own.
    let http_listen = shared.config().http.as_ref().and_then(|http| http.listen);
    if let Some(address) = http_listen {
        let config = shared.config();
        let web_store = Store::open(&config.database_url, Purpose::Cli)?;
        let web = Arc::new(crate::web::Web::new(
            web_store,
            &config,
            Some(shared.clone() as Arc<dyn crate::web::Daemon>),
        )?);
        let listener = crate::web::bind(address, &web).await?;
        supervised.spawn("web", crate::web::serve(listener, web, services.clone()));
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
    let config = shared.config();
    let running = shared.tries.len();
    tracing::info!(
        running,
        "shutting down: no new claims; waiting up to {} for running tasks",
        crate::units::format_duration(config.shutdown_timeout)
    );
    shared.stop_claiming.cancel();
    shared.wake.notify_one();
    let drained = tokio::select! {
        drained = wait_until_idle(&shared, config.shutdown_timeout) => drained,
        _ = shared.stop_now.cancelled() => {
            tracing::warn!(
                running = shared.tries.len(),
                "second stop request: stopping the running tasks now (they will run again)"
            );
            false
        }
    };
    if !drained {
        if !shared.stop_now.is_cancelled() {
            tracing::warn!(
                running = shared.tries.len(),
                "shutdown_timeout passed: stopping the remaining tasks (they will run again)"
            );
        }
        shared.tries.stop_all(StopReason::Shutdown);
        let longest_grace = config
            .tasks
            .values()
            .map(|t| t.settings.kill_grace)
            .chain([config.defaults.kill_grace])
            .max()
            .unwrap_or_default();
        wait_until_idle(&shared, longest_grace + Duration::from_secs(2)).await;
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
    shared.spawner.retire_preloaded().await;
    services.cancel();
    while supervised.next_end().await.is_some() {}
    shared.recorder.close();
    if tokio::time::timeout(Duration::from_secs(30), recorder_done)
        .await
        .is_err()
    {
        tracing::error!(
            "could not record every result before exiting; the reaper will rerun those rows"
        );
    }
    if let Err(error) = shared.store.daemon_stopped(&shared.instance).await {
        tracing::debug!("could not mark this daemon stopped in task_runner_daemons: {error:#}");
    }
    shared.store.close().await;
    if let Some(failure) = failure {
        anyhow::bail!("{failure}; the daemon stopped");
    }
    tracing::info!("taskrunnerd stopped");
    Ok(())
}

/// A service's future, before it is supervised.
type Unit = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The daemon's services, in one `JoinSet`, each known by its name.
#[derive(Default)]
struct Supervised {
    set: tokio::task::JoinSet<Result<()>>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Supervised {
    fn spawn(
        &mut self,
        name: &'static str,
        service: impl std::future::Future<Output = Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(service);
        self.names.insert(handle.id(), name);
    }

    /// The next service to end: its name, and what went wrong (an error or
    /// a panic) as a sentence; `Ok` if it returned.
    async fn next_end(&mut self) -> Option<(&'static str, Result<(), String>)> {
        let ended = self.set.join_next_with_id().await?;
        let id = match &ended {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        Some((
            name,
            match ended {
                Ok((_, Ok(()))) => Ok(()),
                Ok((_, Err(error))) => Err(format!("the {name} service failed: {error:#}")),
                Err(error) if error.is_panic() => Err(format!(
                    "the {name} service panicked: {}",
                    panic_message(error.into_panic())
                )),
                Err(error) => Err(format!("the {name} service ended: {error}")),
            },
        ))
    }
}

/// The text of a panic's payload.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Waits until no try runs, for at most `limit`; true if none runs.
async fn wait_until_idle(shared: &Shared, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if shared.tries.is_empty() {
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

/// Reloads the config at each [`Triggers::reload`], until `stop`.
async fn reload_on(
    shared: Arc<Shared>,
    trigger: Arc<Notify>,
    overrides: crate::config::Overrides,
    stop: CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = trigger.notified() => reload(&shared, &overrides).await,
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// SIGHUP: reloads the config file (task types, limits, intervals) without
/// touching running tasks. A file that does not load is refused, with the
/// reason, and the old config stays. The database URL, host id, pidfile and
/// socket are fixed for the daemon's life.
async fn reload(shared: &Shared, overrides: &crate::config::Overrides) {
    let overrides = overrides.clone();
    let current = shared.config();
    let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, Registry)> {
        // The file again, with the command line's flags applied over it.
        let mut config = Config::resolve(&overrides)?;
        config.database_url = current.database_url.clone();
        config.host_id = current.host_id.clone();
        config.pidfile = current.pidfile.clone();
        config.socket = current.socket.clone();
        config.log_format = current.log_format;
        let registry = Registry::load(&config)?;
        Ok((config, registry))
    })
    .await;
    match loaded {
        Ok(Ok((config, registry))) => {
            let names = registry.names(&config).join(", ");
            shared.store.set_hooks(config.hooks());
            shared.store.set_max_options(config.max_options);
            shared.setup.send_replace(Setup::new(config, registry));
            // Preloaded programs boot again with the new config at their next try.
            shared.spawner.retire_preloaded().await;
            shared.wake.notify_one();
            tracing::info!(task_types = %names, "config reloaded");
        }
        Ok(Err(error)) => {
            tracing::error!("config reload refused, keeping the old config: {error:#}")
        }
        Err(error) => tracing::error!("config reload failed: {error}"),
    }
}
