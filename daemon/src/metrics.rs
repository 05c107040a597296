//! Prometheus metrics (`/metrics`, `taskrunner-cli metrics`).
//!
//! Two kinds: what one daemon counts as it works ([`Metrics`]: tries by
//! type, queue and outcome, durations, claims, reaped rows, database
//! errors), and what the table holds, read at scrape time ([`QueueGauges`]:
//! per queue waiting, running, exhausted and lag), with bounded queries
//! (store::web) whose answer is kept for a second, so that scrapers in a
//! loop cost the database little. No label ever holds a request id: label
//! values are task types, queues and states, and since types and queues are
//! the rows' text, at most 1,000 types and 100 queues get values of their
//! own (the rest are `(other)`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

use crate::request::State;
use crate::store::web::{Capped, QueueStats};
use crate::store::Store;

/// Counts stop here per queue at scrape time: the gauges are bounded, and
/// read "at least" this many above it.
pub(crate) const QUEUE_COUNT_CAP: i64 = 100_000;

/// At most this many queues are reported.
pub(crate) const MAX_QUEUES: usize = 100;

/// How long a database reading is served again.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// At most this many task types get label values of their own in the
/// per-type metrics; the rest are counted under [`OTHER`].
const MAX_TYPE_LABELS: usize = 1000;

/// The label value of the types, or queues, past their cap.
const OTHER: &str = "(other)";

/// The task types and queues given label values of their own so far. Both
/// are the rows' text: an application that puts an id into either would
/// otherwise make new series of every per-type metric for each row, held
/// in the daemon's memory and in every scrape without end.
#[derive(Default)]
struct Labels {
    types: HashSet<String>,
    queues: HashSet<String>,
}

impl Labels {
    /// `value`'s label in `seen`, admitted while fewer than `cap` are; past
    /// that [`OTHER`], said once in the log.
    fn admit<'a>(seen: &mut HashSet<String>, value: &'a str, cap: usize, kind: &str) -> &'a str {
        if seen.contains(value) {
            return value;
        }
        if seen.len() < cap {
            seen.insert(value.to_string());
            return value;
        }
        if seen.insert(OTHER.to_string()) {
            tracing::warn!(
                "more than {cap} {kind} seen: the rest are counted as {OTHER} in the metrics (their rows name them)"
            );
        }
        OTHER
    }
}

/// What one daemon counts.
pub(crate) struct Metrics {
    registry: Registry,
    labels: Mutex<Labels>,
    tries: IntCounterVec,
    exhausted: IntCounterVec,
    try_duration: HistogramVec,
    wait_before_start: HistogramVec,
    spawn: Histogram,
    claimed: IntCounter,
    reaped: IntCounter,
    database_errors: IntCounter,
    running: IntGauge,
    slots: IntGauge,
}

fn buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        900.0, 3600.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let tries = IntCounterVec::new(
            Opts::new(
                "taskrunner_tries_total",
                "Tries this daemon ended, by task type, queue and outcome (a state of the result column)",
            ),
            &["type", "queue", "outcome"],
        )
        .expect("valid metric");
        let exhausted = IntCounterVec::new(
            Opts::new(
                "taskrunner_exhausted_total",
                "Tries that failed with no try left: their rows are exhausted",
            ),
            &["type", "queue"],
        )
        .expect("valid metric");
        let try_duration = HistogramVec::new(
            HistogramOpts::new(
                "taskrunner_try_duration_seconds",
                "How long a try's process ran, from its start to its exit",
            )
            .buckets(buckets()),
            &["type", "queue"],
        )
        .expect("valid metric");
        let wait_before_start = HistogramVec::new(
            HistogramOpts::new(
                "taskrunner_wait_before_start_seconds",
                "From when a row became runnable (created_at, or delay_until) to its claim",
            )
            .buckets(buckets()),
            &["queue"],
        )
        .expect("valid metric");
        let spawn = Histogram::with_opts(
            HistogramOpts::new(
                "taskrunner_spawn_seconds",
                "From the start of a try to its process running (clone and exec)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
            ]),
        )
        .expect("valid metric");
        let claimed = IntCounter::new("taskrunner_claimed_total", "Rows this daemon claimed")
            .expect("valid metric");
        let reaped = IntCounter::new(
            "taskrunner_reaped_total",
            "Rows this daemon's reaper found with their process, daemon or lease gone (CRASHED, or INTERRUPTED with the try given back)",
        )
        .expect("valid metric");
        let database_errors = IntCounter::new(
            "taskrunner_database_errors_total",
            "Database calls that failed; the daemon retries each after a backoff",
        )
        .expect("valid metric");
        let running = IntGauge::new(
            "taskrunner_running_tries",
            "Tries whose process this daemon runs now (not the rows it claimed ahead for its slots)",
        )
            .expect("valid metric");
        let slots = IntGauge::new(
            "taskrunner_slots",
            "Tries this daemon may run at once (max_concurrent)",
        )
        .expect("valid metric");
        for collector in [
            Box::new(tries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(exhausted.clone()),
            Box::new(try_duration.clone()),
            Box::new(wait_before_start.clone()),
            Box::new(spawn.clone()),
            Box::new(claimed.clone()),
            Box::new(reaped.clone()),
            Box::new(database_errors.clone()),
            Box::new(running.clone()),
            Box::new(slots.clone()),
        ] {
            registry.register(collector).expect("names are unique");
        }
        Metrics {
            registry,
            labels: Mutex::default(),
            tries,
            exhausted,
            try_duration,
            wait_before_start,
            spawn,
            claimed,
            reaped,
            database_errors,
            running,
            slots,
        }
    }

    /// A try ended. `ran_for` is `None` when its process never started.
    pub(crate) fn try_ended(
        &self,
        task: &str,
        queue: &str,
        state: State,
        exhausted: bool,
        ran_for: Option<Duration>,
    ) {
        let (task, queue) = {
            let mut labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            (
                Labels::admit(&mut labels.types, task, MAX_TYPE_LABELS, "task types"),
                Labels::admit(&mut labels.queues, queue, MAX_QUEUES, "queues"),
            )
        };
        self.tries
            .with_label_values(&[task, queue, state.as_str()])
            .inc();
        if exhausted {
            self.exhausted.with_label_values(&[task, queue]).inc();
        }
        if let Some(ran_for) = ran_for {
            self.try_duration
                .with_label_values(&[task, queue])
                .observe(ran_for.as_secs_f64());
        }
    }

    /// A row was claimed after waiting `waited` seconds since it became runnable.
    pub(crate) fn claimed(&self, queue: &str, waited: f64) {
        let queue = {
            let mut labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            Labels::admit(&mut labels.queues, queue, MAX_QUEUES, "queues")
        };
        self.claimed.inc();
        self.wait_before_start
            .with_label_values(&[queue])
            .observe(waited.max(0.0));
    }

    pub(crate) fn spawned(&self, took: Duration) {
        self.spawn.observe(took.as_secs_f64());
    }

    pub(crate) fn reaped(&self, rows: usize) {
        self.reaped.inc_by(rows as u64);
    }

    /// Sets what is read from the daemon's state at scrape time: tries
    /// running, slots, and the failed database calls counted by `Health`.
    pub(crate) fn set_daemon_state(&self, running: usize, slots: usize, database_errors: u64) {
        self.running.set(running as i64);
        self.slots.set(slots as i64);
        let counted = self.database_errors.get();
        if database_errors > counted {
            self.database_errors.inc_by(database_errors - counted);
        }
    }

    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

/// Per-queue readings of the table, cached for a second.
#[derive(Default)]
pub(crate) struct QueueGauges {
    cache: tokio::sync::Mutex<Option<(Instant, TableReading)>>,
    /// How long the latest database reading took (for the benchmark).
    pub(crate) last_read: Mutex<Option<Duration>>,
    /// The queues read with open rows before (at most [`MAX_QUEUES`]): one
    /// drained since reads 0, where its series vanished, and a dashboard
    /// showed no data, and an alert on `== 0` or `absent()` misfired.
    seen: Mutex<std::collections::BTreeSet<String>>,
}

/// What the metrics read from the tables: the queues' stats and the pauses.
#[derive(Clone)]
pub(crate) struct TableReading {
    stats: Vec<QueueStats>,
    pauses: Vec<crate::store::Pause>,
}

impl QueueGauges {
    /// The per-queue stats and the pauses, read again if the cached ones
    /// are older than a second.
    pub(crate) async fn read(&self, store: &Store) -> Result<TableReading> {
        let mut cache = self.cache.lock().await;
        if let Some((at, reading)) = &*cache {
            if at.elapsed() < CACHE_FOR {
                return Ok(reading.clone());
            }
        }
        let started = Instant::now();
        let mut stats = store.all_queue_stats(MAX_QUEUES, QUEUE_COUNT_CAP).await?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            for stat in &stats {
                if seen.len() < MAX_QUEUES || seen.contains(&stat.queue) {
                    seen.insert(stat.queue.clone());
                }
            }
            // A read that stopped at the bound did not see every queue with
            // open rows: none is taken for drained then.
            let every_queue_read = stats.len() < MAX_QUEUES;
            let drained: Vec<String> = seen
                .iter()
                .filter(|queue| every_queue_read && !stats.iter().any(|stat| &stat.queue == *queue))
                .cloned()
                .collect();
            stats.extend(drained.into_iter().map(|queue| QueueStats {
                queue,
                ..QueueStats::default()
            }));
        }
        let reading = TableReading {
            stats,
            pauses: store.pauses().await?,
        };
        *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(started.elapsed());
        *cache = Some((Instant::now(), reading.clone()));
        Ok(reading)
    }
}

fn table_families(reading: &TableReading) -> Vec<prometheus::proto::MetricFamily> {
    let mut families = queue_families(&reading.stats);
    let registry = Registry::new();
    let paused = prometheus::GaugeVec::new(
        Opts::new(
            "taskrunner_paused",
            "1 for each queue (kind=\"queue\") and task type (kind=\"task\") paused: no daemon claims its rows",
        ),
        &["kind", "name"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(paused.clone()))
        .expect("names are unique");
    for pause in reading.pauses.iter().take(MAX_QUEUES) {
        paused
            .with_label_values(&[pause.kind.word(), pause.name.as_str()])
            .set(1.0);
    }
    families.extend(registry.gather());
    families
}

fn queue_families(stats: &[QueueStats]) -> Vec<prometheus::proto::MetricFamily> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str| {
        let gauge =
            prometheus::GaugeVec::new(Opts::new(name, help), &["queue"]).expect("valid metric");
        registry
            .register(Box::new(gauge.clone()))
            .expect("names are unique");
        gauge
    };
    let waiting = gauge(
        "taskrunner_queue_waiting",
        "Rows of the queue waiting to run (never run, or to be retried; delayed ones included)",
    );
    let running = gauge(
        "taskrunner_queue_running",
        "Rows of the queue running now, on any daemon",
    );
    let failed = gauge(
        "taskrunner_queue_failed",
        "Rows of the queue whose latest try failed and that will be retried",
    );
    let exhausted = gauge(
        "taskrunner_queue_exhausted",
        "Rows of the queue that failed with no try left",
    );
    let lag = gauge(
        "taskrunner_queue_lag_seconds",
        "Age of the queue's oldest runnable row, from when it became runnable",
    );
    let capped = gauge(
        "taskrunner_queue_counts_capped",
        "1 when one of the queue's counts stopped at the cap (100000 rows each of running, exhausted, and the others): the true number is larger",
    );
    for stat in stats {
        let total = stat.total();
        let label = [stat.queue.as_str()];
        waiting.with_label_values(&label).set(total.waiting as f64);
        running.with_label_values(&label).set(total.running as f64);
        failed.with_label_values(&label).set(total.failed as f64);
        exhausted
            .with_label_values(&label)
            .set(total.exhausted as f64);
        lag.with_label_values(&label).set(stat.lag_seconds);
        capped
            .with_label_values(&label)
            .set(if stat.capped == Capped::default() {
                0.0
            } else {
                1.0
            });
    }
    registry.gather()
}

/// The Prometheus text: the daemon's own metrics (if any) and the queues'.
///
/// A daemon's own metrics never wait on the database: when the queues'
/// gauges cannot be read in time ([`crate::health::read_for_display`]: an
/// outage; a daemon reads them on its web page's pool, not on its own
/// SQLite connection), they are left out, with a comment line that says why, and the
/// rest is answered. A database outage is when
/// `taskrunner_database_errors_total` matters most. Without a daemon there
/// is nothing else to show: the error is returned.
pub(crate) async fn render(
    store: &Store,
    gauges: &QueueGauges,
    daemon: Option<&Metrics>,
) -> Result<String> {
    let mut families = daemon.map(Metrics::gather).unwrap_or_default();
    let mut out = Vec::new();
    if daemon.is_none() {
        families.extend(table_families(&gauges.read(store).await?));
    } else {
        match crate::health::read_for_display(gauges.read(store)).await {
            Ok(reading) => families.extend(table_families(&reading)),
            Err(why) => out.extend_from_slice(
                format!("# taskrunner_queue_* left out: the database did not answer: {why}\n")
                    .as_bytes(),
            ),
        }
    }
    prometheus::TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
