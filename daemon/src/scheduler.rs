//! The scheduler: claims runnable rows up to the free slots and starts a
//! supervised try for each. It claims when woken (a row was enqueued, a try
//! ended, a delay came due) and at the latest every `poll_interval`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::attempt::{self, TryInput};
use crate::daemon::{LiveTry, Shared};
use crate::health::Backoff;
use crate::request::{Claimed, State};
use crate::store::Write;

/// Runs until the daemon stops claiming and every try it started has ended.
pub async fn run(shared: Arc<Shared>) {
    let mut tries: JoinSet<String> = JoinSet::new();
    // Tries per queue, counted here (not from the live map, which a new try
    // joins only once its task starts) so that a queue's limit always holds.
    let mut running_by_queue: HashMap<String, usize> = HashMap::new();
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
            match claim_round(&shared, &config, &token, free, &running_by_queue).await {
                Ok((claimed, all_slots_filled)) => {
                    shared.health.succeeded();
                    backoff.reset();
                    for row in claimed {
                        *running_by_queue.entry(row.queue.clone()).or_default() += 1;
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
            Some(ended) = tries.join_next(), if !tries.is_empty() => {
                if let Ok(queue) = ended {
                    if let Some(count) = running_by_queue.get_mut(&queue) {
                        *count = count.saturating_sub(1);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_claim) => {}
            _ = shared.stop_claiming.cancelled() => {}
        }
    }
    while tries.join_next().await.is_some() {}
}

/// Claims for up to `free` slots: per served queue (each within its own
/// limit), task types with a concurrency limit apart, under their lock.
/// Returns the claimed rows and whether every claim filled what it asked for
/// (so more rows may be waiting).
async fn claim_round(
    shared: &Shared,
    config: &crate::config::Config,
    token: &str,
    mut free: usize,
    running_by_queue: &HashMap<String, usize>,
) -> anyhow::Result<(Vec<Claimed>, bool)> {
    let limited: Vec<(&str, u32)> = config
        .tasks
        .iter()
        .filter_map(|(name, task)| task.concurrency.map(|limit| (name.as_str(), limit)))
        .collect();
    let excluded: Vec<String> = limited.iter().map(|(name, _)| name.to_string()).collect();
    // (queue, room in it); `None` serves every queue.
    let queues: Vec<(Option<&str>, usize)> = if config.queues.is_empty() {
        vec![(None, free)]
    } else {
        config
            .queues
            .iter()
            .map(|(queue, limit)| {
                let running = running_by_queue.get(queue).copied().unwrap_or(0);
                (Some(queue.as_str()), limit.saturating_sub(running))
            })
            .collect()
    };
    let store = &shared.store;
    let (host, instance) = (config.host_id.as_str(), shared.instance.as_str());
    let mut claimed = Vec::new();
    let mut all_filled = true;
    for (queue, mut room) in queues {
        let filter = crate::store::ClaimFilter {
            node: &config.node_name,
            queue,
            task: None,
            excluded_tasks: &excluded,
        };
        let want = room.min(free);
        if want > 0 {
            let rows = store
                .claim_filtered(host, instance, token, want, &filter)
                .await?;
            all_filled &= rows.len() == want;
            room -= rows.len();
            free -= rows.len();
            claimed.extend(rows);
        }
        for (task, limit) in &limited {
            let want = room.min(free);
            if want == 0 {
                break;
            }
            let filter = crate::store::ClaimFilter {
                task: Some(task),
                ..filter.clone()
            };
            let rows = store
                .claim_limited(host, instance, token, want, &filter, *limit)
                .await?;
            room -= rows.len();
            free -= rows.len();
            claimed.extend(rows);
        }
    }
    Ok((claimed, all_filled))
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
/// Returns the row's queue, for the scheduler's count.
async fn supervise(shared: Arc<Shared>, row: Claimed) -> String {
    let queue = row.queue.clone();
    let span = tracing::info_span!("task", request = %row.id, task = %row.task_class_name, r#try = row.tries);
    run_claimed(shared, row).instrument(span).await;
    queue
}

async fn run_claimed(shared: Arc<Shared>, row: Claimed) {
    let config = shared.config();
    let (stop_sender, stop) = watch::channel(None);
    let (progress_sender, progress) = watch::channel(None);
    shared.live().insert(
        row.id,
        LiveTry {
            task: row.task_class_name.clone(),
            queue: row.queue.clone(),
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

    let outcome = attempt::outcome(&row, &verdict, &config);
    match verdict.state {
        State::Finished => tracing::info!("finished"),
        State::Interrupted | State::Cancelled => tracing::info!("{}", verdict.result_text),
        _ => {
            let first_line = verdict.result_text.lines().next().unwrap_or_default();
            let retry = match outcome.retry_after {
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
    shared.recorder.send(Write::Outcome(outcome));
}

/// The last few lines of a task's stderr, for a log line.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
