//! `taskrunner-cli run`: one task in the foreground, by hand (type and
//! options, or a stored row's); with `--record`, claimed and recorded as a
//! try of that row.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::{mpsc, watch};

use crate::attempt::{self, TryInput};
use crate::config::Config;
use crate::request::{RequestId, State};
use crate::store::{Store, Write};
use crate::supervisor::{Gate, StopReason};
use crate::task_types::Registry;

pub(super) async fn run_command(
    config: &Config,
    open: impl Fn() -> Result<Store>,
    task: Option<String>,
    options: Option<String>,
    id: Option<RequestId>,
    record: bool,
) -> Result<ExitCode> {
    let registry = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Registry::load(&config)).await??
    };
    let setup = crate::task_types::Setup::new(config.clone(), registry);
    let context = attempt::Context {
        config: setup.config.clone(),
        setup: setup.channel(),
        spawner: crate::supervisor::start_spawner()?,
    };
    let (stop_sender, stop) = watch::channel(None);
    let stop_sender = Arc::new(stop_sender);
    // Ctrl-C stops the task the way a daemon shutdown would.
    let on_ctrl_c = stop_sender.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.send_replace(Some(StopReason::Shutdown));
            std::future::pending::<()>().await;
        }
    });
    // Without --record: the task runs here and nothing is written; with an
    // id, it runs as that row's next try would.
    let (task, options, try_number, batch_id) = match id {
        None => (
            task.expect("clap requires a task without --id"),
            options.unwrap_or_default(),
            1,
            None,
        ),
        Some(id) if record => {
            let verdict =
                run_and_record(config, &context, open()?, id, (stop_sender, stop)).await?;
            return Ok(exit_code_for(verdict));
        }
        Some(id) => {
            let Some(request) = open()?.show(id).await? else {
                bail!("no request {id}")
            };
            (
                request.task_class_name.clone(),
                request.options.clone().unwrap_or_default(),
                request.tries.saturating_add(1),
                request.batch_id.or(request.callback_of_batch),
            )
        }
    };
    let input = TryInput {
        id,
        task: &task,
        options: options.as_bytes(),
        try_number,
        echo_stderr: true,
        batch_id,
        claim_token: None,
        options_left_out: None,
    };
    let verdict = attempt::run(&context, input, Gate::open(), stop, None, |_| {}).await;
    Ok(exit_code_for(verdict))
}

/// Prints the outcome: the result text when FINISHED, else the state and
/// the first line of the reason (the task's standard error was shown as it
/// came).
fn exit_code_for(verdict: attempt::Verdict) -> ExitCode {
    if verdict.state == State::Finished {
        outln!("{}", verdict.result_text);
        ExitCode::SUCCESS
    } else {
        let reason = verdict.result_text.lines().next().unwrap_or_default();
        eprintln!("{}: {reason}", verdict.state);
        ExitCode::FAILURE
    }
}

/// `run --id N --record`: claims the row as a daemon would (a fresh claim
/// token) and runs it through the daemon's own sequence
/// ([`attempt::run_claimed`]); its writes (the pid, then the outcome and
/// what it causes) are applied in order with [`Store::record`], as the
/// daemon's recorder applies them.
async fn run_and_record(
    config: &Config,
    context: &attempt::Context,
    store: Store,
    id: RequestId,
    (stop_sender, stop): (
        Arc<watch::Sender<Option<StopReason>>>,
        watch::Receiver<Option<StopReason>>,
    ),
) -> Result<attempt::Verdict> {
    // A type this config does not know would be claimed and fail as
    // unknown: a try spent, and at the last one `on_failure` and the
    // exhausted hooks fired. A daemon waits for a deploy that may add it; a
    // run by hand in the wrong directory names the mistake and writes nothing.
    if let Some(request) = store.show(id).await? {
        let known = context
            .setup
            .borrow()
            .registry
            .resolve(config, &request.task_class_name)
            .is_some();
        if !known {
            bail!(
                "request {id}: task type `{}` is not in this config ({}); give the config of the daemons that run it (--config): nothing was written",
                crate::escape::one_line(&request.task_class_name),
                config
                    .file
                    .as_ref()
                    .map_or("no config file".to_string(), |file| file.display().to_string())
            );
        }
    }
    let instance = crate::instance::InstanceId::new(&config.host_id);
    let token = instance.claim_token("cli");
    // As a daemon's: other hosts' reapers judge this run's row by the
    // longer of their lease and this one (before, by theirs alone: a
    // daemon's shorter lease took the row of a run that had lost the
    // database for a while and ran it again beside its task, which this
    // run's fence, by its own lease, let run on). Best effort, as a
    // daemon's: the renewals write it again.
    let me = presence(&instance, config);
    if let Err(error) = store.register_daemon(&me).await {
        eprintln!(
            "request {id}: could not write this run's row in task_runner_daemons: {}",
            crate::error_line(&error)
        );
    }
    let claim_sent = Instant::now();
    let claim_sent_boot = crate::supervisor::fence::boot_clock();
    let Some(claimed) = store
        .claim_one(
            id,
            crate::store::Claimant {
                token: &token,
                instance: &instance,
                host: &config.host_id,
            },
        )
        .await?
    else {
        let Some(request) = store.show(id).await? else {
            bail!("no request {id}")
        };
        bail!(
            "request {id} is not runnable ({}, {} of {} tries): it cannot be claimed",
            request.result.as_deref().unwrap_or("pending"),
            request.tries,
            request.try_limit
        );
    };
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Where several hosts share the database, a fencing watchdog kills the
    // task once the lease has gone unrenewed for as long as a daemon's
    // would allow, also when this process does not run (a Ctrl-Z, a
    // `SIGSTOP`, a debugger), and when it dies (before, the task ran on,
    // and beside its rerun once the row's lease lapsed).
    let watchdog = (store.backend() != crate::store::Backend::Sqlite).then(|| {
        let watchdog = Arc::new(crate::supervisor::watchdog::Watchdog::default());
        let after = config.watchdog_after();
        watchdog.set_deadline(claim_sent_boot, Some(claim_sent_boot + after));
        (watchdog, after)
    });
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    if let Some((watchdog, _)) = &watchdog {
        tokio::spawn(
            watchdog
                .clone()
                .run(context.spawner.clone(), watchdog_stop.clone()),
        );
    }
    let _stop_the_watchdog = watchdog_stop.clone().drop_guard();
    let instance_text = instance.to_string();
    let presence_store = store.clone();
    let lease = tokio::spawn(keep_lease(
        config.clone(),
        store.clone(),
        instance,
        (id, token),
        claim_sent,
        (stop_sender, ended.clone()),
        watchdog,
    ));
    let (sender, mut writes) = mpsc::unbounded_channel::<Write>();
    let patience = config.lease_timeout;
    let writer = tokio::spawn(async move {
        let mut recorded = false;
        while let Some(write) = writes.recv().await {
            if matches!(write, Write::Outcome(_)) {
                recorded = record_outcome(&store, write, patience).await?;
            } else {
                // A pid that could not be written: the try goes on.
                let _ = store.record(std::slice::from_ref(&write)).await;
            }
        }
        Ok::<_, anyhow::Error>(recorded)
    });
    let send = |write| {
        let _ = sender.send(write);
    };
    let (verdict, outcome) = attempt::run_claimed(
        context,
        &claimed,
        true,
        Gate::open(),
        stop,
        None,
        send,
        |_| {},
    )
    .await;
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    send(Write::Outcome(outcome));
    drop(sender);
    // The lease is kept while the outcome is written, however many times.
    let recorded = writer.await?;
    lease.abort();
    let _ = presence_store.daemon_stopped(&instance_text).await;
    if recorded? {
        eprintln!(
            "recorded try {} of request {} as {}",
            claimed.tries, claimed.id, verdict.state
        );
    } else {
        // Exit 1 whatever the try's own end: the row is another's now, and
        // runs again (before, a FINISHED try not recorded exited 0).
        bail!(
            "request {}: the try ended {}, but the outcome was not recorded (the claim was lost)",
            claimed.id,
            verdict.state
        );
    }
    Ok(verdict)
}

/// Writes the outcome of `run --record`'s try (and what it causes), and
/// whether it was recorded under this run's claim. A write that fails (the
/// database restarting, unreachable, or a lock it waited for too long) is
/// tried again with backoff, for `patience` (the lease) after the first
/// failure, with one line when it first fails; the claim fences each
/// attempt, so one that lands after a reaper took the row records nothing.
/// Before, one failed write ended the run with an error: the try had run,
/// its outcome was lost, and the row stayed RUNNING until it was reaped as
/// crashed and run again.
async fn record_outcome(store: &Store, write: Write, patience: Duration) -> Result<bool> {
    let Write::Outcome(outcome) = &write else {
        unreachable!("only an outcome is recorded here");
    };
    let mut backoff = crate::health::Backoff::default();
    let mut failing_since = None;
    loop {
        match store.record(std::slice::from_ref(&write)).await {
            // Not applied after a write that failed: that write may have
            // been committed, its answer lost.
            Ok(applied) if applied.first() != Some(&true) && failing_since.is_some() => {
                return Ok(store.holds_outcome(outcome).await.unwrap_or(false));
            }
            Ok(applied) => return Ok(applied.first() == Some(&true)),
            Err(error) => {
                let since = *failing_since.get_or_insert_with(|| {
                    eprintln!(
                        "request {}: the outcome ({}) could not be written: {}; trying again for up to {}",
                        outcome.id,
                        outcome.state,
                        crate::error_line(&error),
                        crate::units::format_duration(patience)
                    );
                    Instant::now()
                });
                if since.elapsed() >= patience {
                    return Err(error.context(format!(
                        "request {}: the outcome ({}) was not written in {}; the row stays RUNNING until a reaper takes it as crashed",
                        outcome.id,
                        outcome.state,
                        crate::units::format_duration(patience)
                    )));
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Keeps the lease of the row `run --record` runs, as a daemon's heartbeat
/// does (before, nothing renewed it: a try longer than `lease_timeout` was
/// reaped by a daemon of another host and run again beside this one). The
/// lease is renewed every `heartbeat_interval`, and at least every second:
/// the run has no row in `task_runner_daemons` that would tell other
/// hosts' reapers its lease, so each judges the row by its own, which may
/// be shorter than this config's interval (before, a run with a config of
/// the default 10 s interval was reaped by a daemon whose lease is 6 s,
/// and its row ran again beside it). The task is stopped when
/// the row is no longer held under this claim (reaped, taken over), when a
/// user asks to cancel it, and, on PostgreSQL and MariaDB/MySQL, when no
/// renewal has renewed the row for as long as a daemon's own fence allows
/// ([`Config::fence_after`]), before its lease lapses. Ends once the try
/// has been told to stop for a lost claim. Once the try has `ended`, it
/// renews quietly while the outcome is written (however many times), and
/// ends when the row is no longer held (written, or taken).
async fn keep_lease(
    config: Config,
    store: Store,
    instance: crate::instance::InstanceId,
    (id, token): (RequestId, crate::instance::ClaimToken),
    claim_sent: Instant,
    (stop, ended): (
        Arc<watch::Sender<Option<StopReason>>>,
        Arc<std::sync::atomic::AtomicBool>,
    ),
    watchdog: Option<(Arc<crate::supervisor::watchdog::Watchdog>, Duration)>,
) {
    let ended = || ended.load(std::sync::atomic::Ordering::SeqCst);
    let fenced = store.backend() != crate::store::Backend::Sqlite;
    let every = config.heartbeat_interval.min(Duration::from_secs(1));
    let mut renewed = claim_sent;
    let mut next = claim_sent + every;
    loop {
        let fence = renewed + config.fence_after();
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = tokio::time::sleep_until(fence.into()), if fenced && !ended() => {
                eprintln!(
                    "request {id}: its lease was not renewed for {:.1}s: stopping the task before the lease lapses",
                    renewed.elapsed().as_secs_f64()
                );
                stop.send_replace(Some(StopReason::LostClaim));
                return;
            }
        }
        let (sent, sent_boot) = (Instant::now(), crate::supervisor::fence::boot_clock());
        next = sent + every;
        let renewal =
            tokio::time::timeout_at(fence.max(next).into(), store.renew_heartbeats(&instance))
                .await;
        match renewal {
            Ok(Ok(held)) => match held.iter().find(|h| h.id == id && h.claim_token == token) {
                None if ended() => return,
                None => {
                    eprintln!(
                        "request {id}: this run no longer holds the row (reaped or taken over): stopping the task"
                    );
                    stop.send_replace(Some(StopReason::LostClaim));
                    return;
                }
                Some(held) => {
                    if held.renewed {
                        renewed = sent;
                        let _ = store
                            .daemon_heartbeat(&presence(&instance, &config), 1)
                            .await;
                        if let Some((watchdog, after)) = &watchdog {
                            watchdog.set_deadline(sent_boot, Some(sent_boot + *after));
                        }
                    }
                    if held.cancel_requested && stop.borrow().is_none() && !ended() {
                        eprintln!("request {id}: cancel requested: stopping the task");
                        stop.send_replace(Some(StopReason::Cancel));
                    }
                }
            },
            // Once the try has ended, the outcome's write says it once.
            Ok(Err(_)) | Err(_) if ended() => {}
            Ok(Err(error)) => eprintln!(
                "request {id}: could not renew the row's lease: {}",
                crate::error_line(&error)
            ),
            Err(_) => eprintln!("request {id}: the lease renewal did not answer in time"),
        }
    }
}

/// This run's row in `task_runner_daemons`, as a daemon's (one try at most).
fn presence<'a>(
    instance: &'a str,
    config: &'a Config,
) -> crate::store::daemons::DaemonPresence<'a> {
    crate::store::daemons::DaemonPresence {
        instance,
        host: &config.host_id,
        node_name: None,
        pid: std::process::id(),
        max_concurrent: 1,
        lease: config.lease_timeout,
    }
}
