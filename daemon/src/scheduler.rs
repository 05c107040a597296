//! The scheduler: claims runnable rows up to the free slots and starts a
//! supervised try for each. It claims when woken (a row was enqueued, a try
//! ended, a delay came due) and at the latest every `poll_interval`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::attempt::{self, TryInput};
use crate::daemon::{LiveTry, Shared};
use crate::health::Backoff;
use crate::request::{backoff_seconds, Claimed, State};
use crate::store::{Outcome, Write};

/// Runs until the daemon stops claiming and every try it started has ended.
pub async fn run(shared: Arc<Shared>) {
    let mut tries = JoinSet::new();
    let mut claim_counter: u64 = 0;
    let mut backoff = Backoff::default();
    loop {
        if shared.stop_claiming.is_cancelled() {
            break;
        }
        let config = shared.config();
        let free = config.max_concurrent.saturating_sub(tries.len());
        // When is the next unprompted claim due: the poll, or an earlier delay.
        let mut next_claim = Instant::now() + config.poll_interval;
        if free > 0 {
            claim_counter += 1;
            let token = format!("{}:{claim_counter}", shared.instance);
            match shared
                .store
                .claim(&config.host_id, &shared.instance, &token, free)
                .await
            {
                Ok(claimed) => {
                    shared.health.succeeded();
                    backoff.reset();
                    let all_slots_filled = claimed.len() == free;
                    for row in claimed {
                        tries.spawn(supervise(shared.clone(), row));
                    }
                    if !all_slots_filled {
                        if let Some(due) = next_delay(&shared).await {
                            next_claim = next_claim.min(due);
                        }
                    }
                }
                Err(error) => {
                    shared.health.failed("claiming requests", &error);
                    next_claim = Instant::now() + backoff.next_delay();
                }
            }
        }
        *shared.next_poll.lock().unwrap_or_else(|e| e.into_inner()) = Some(next_claim.into_std());
        tokio::select! {
            _ = shared.wake.notified() => {}
            Some(_) = tries.join_next(), if !tries.is_empty() => {}
            _ = tokio::time::sleep_until(next_claim) => {}
            _ = shared.stop_claiming.cancelled() => {}
        }
    }
    while tries.join_next().await.is_some() {}
}

/// When the earliest delayed row comes due (never later than an hour, so a
/// clock step cannot park us).
async fn next_delay(shared: &Shared) -> Option<Instant> {
    match shared.store.seconds_until_next_delay().await {
        Ok(Some(seconds)) => {
            let seconds = seconds.clamp(0.0, 3600.0);
            // A hair later than due, so the row's delay has passed on the database's clock too.
            Some(Instant::now() + Duration::from_secs_f64(seconds) + Duration::from_millis(5))
        }
        Ok(None) => None,
        Err(error) => {
            shared.health.failed("looking for delayed requests", &error);
            None
        }
    }
}

/// Runs one claimed row's try and queues its outcome.
async fn supervise(shared: Arc<Shared>, row: Claimed) {
    let span = tracing::info_span!("task", request = %row.id, task = %row.task_class_name, r#try = row.tries);
    run_claimed(shared, row).instrument(span).await
}

async fn run_claimed(shared: Arc<Shared>, row: Claimed) {
    let config = shared.config();
    let (stop_sender, stop) = watch::channel(None);
    let (progress_sender, progress) = watch::channel(None);
    shared.live().insert(
        row.id,
        LiveTry {
            task: row.task_class_name.clone(),
            claim_token: row.claim_token.clone(),
            pid: None,
            started: std::time::Instant::now(),
            try_number: row.tries,
            stop: stop_sender,
            progress,
            progress_written: None,
        },
    );
    let context = attempt::Context {
        config: config.clone(),
        registry: shared.registry.clone(),
        spawner: shared.spawner.clone(),
    };
    let input = TryInput {
        id: Some(row.id),
        task: &row.task_class_name,
        options: &row.options,
        try_number: row.tries,
    };
    let on_spawn = |spawned: &crate::supervisor::Spawned| {
        if let Some(live) = shared.live().get_mut(&row.id) {
            live.pid = Some(spawned.pid);
        }
        tracing::debug!(pid = spawned.pid, "started");
        shared.recorder.send(Write::Pid {
            id: row.id,
            claim_token: row.claim_token.clone(),
            pid: i64::from(spawned.pid),
            boot_id: crate::procinfo::boot_id(),
            start_ticks: spawned.start_ticks,
        });
    };
    let verdict = attempt::run(&context, input, stop, Some(progress_sender), on_spawn).await;
    shared.live().remove(&row.id);

    let retry_after = matches!(
        verdict.state,
        State::Failed | State::Crashed | State::Timeout
    )
    .then(|| {
        backoff_seconds(
            config.retry_delay.as_secs_f64(),
            config.retry_multiplier,
            row.tries,
        )
    });
    match verdict.state {
        State::Finished => tracing::info!("finished"),
        State::Interrupted | State::Cancelled => tracing::info!("{}", verdict.result_text),
        _ => {
            let first_line = verdict.result_text.lines().next().unwrap_or_default();
            let retry = match retry_after {
                Some(seconds) if row.tries < row.try_limit => format!("; retry in {seconds:.1}s"),
                Some(_) => format!("; no tries left ({} of {})", row.tries, row.try_limit),
                None => String::new(),
            };
            match verdict
                .stderr_tail
                .as_deref()
                .filter(|t| !t.trim().is_empty())
            {
                Some(tail) => {
                    tracing::warn!(stderr_tail = %last_lines(tail), "{}: {first_line}{retry}", verdict.state)
                }
                None => tracing::warn!("{}: {first_line}{retry}", verdict.state),
            }
        }
    }
    shared.recorder.send(Write::Outcome(Outcome {
        id: row.id,
        claim_token: row.claim_token,
        state: verdict.state,
        result_text: verdict.result_text,
        retry_after,
        give_back_try: verdict.state == State::Interrupted,
    }));
}

/// The last few lines of a task's stderr, for a log line.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
