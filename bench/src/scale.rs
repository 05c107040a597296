//! Scale: the time of taskrunner's own claim (`Store::claim`, one row, the
//! statement the scheduler runs) on a table that already holds many rows,
//! nine in ten of them FINISHED and one in ten pending, as a table looks
//! after months of use without purging; and the large table once more with
//! a fifth of its rows delayed into the future (reminders for tomorrow),
//! enqueued before the pending ones; and once more with a fifth of its rows
//! in a paused queue, enqueued before the pending ones (a backlog held back
//! while its service is down), claimed as a daemon serving every queue does.

use std::time::Instant;

use anyhow::Result;
use taskrunner::store::{Purpose, Store};

use crate::database::{Backend, Bench};
use crate::latency::percentile;
use crate::report::{ms, Table};

/// Claims timed per table (after a few untimed ones).
const CLAIMS: usize = 1_000;
const WARM_UP: usize = 20;

pub struct Case {
    pub backend: Backend,
    pub rows: usize,
    pub pending: usize,
    /// Rows delayed by years, with lower ids than the pending ones.
    pub delayed: usize,
    /// Rows of a paused queue, with lower ids than the pending ones.
    pub paused: usize,
    /// Each claim's duration in milliseconds, sorted.
    pub claims_ms: Vec<f64>,
}

impl Case {
    fn mean_ms(&self) -> f64 {
        self.claims_ms.iter().sum::<f64>() / self.claims_ms.len().max(1) as f64
    }
}

/// Measures each backend on a table of each size, then on the largest
/// with a fifth of its rows delayed, then with a fifth paused.
pub async fn run(bench: &Bench, backends: &[Backend], sizes: &[usize]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &backend in backends {
        for &rows in sizes {
            cases.push(measure(bench, backend, rows, (0, 0)).await?);
        }
        if let Some(&largest) = sizes.iter().max() {
            cases.push(measure(bench, backend, largest, (largest / 5, 0)).await?);
            cases.push(measure(bench, backend, largest, (0, largest / 5)).await?);
        }
    }
    Ok(cases)
}

/// One table: `rows` in all, of them `delayed` and `paused` ahead of the
/// pending ones.
async fn measure(
    bench: &Bench,
    backend: Backend,
    rows: usize,
    (delayed, paused): (usize, usize),
) -> Result<Case> {
    let pending = (rows / 10).max(WARM_UP + 100);
    let finished = rows.saturating_sub(pending + delayed + paused);
    eprintln!(
        "scale: {} with {finished} FINISHED + {delayed} delayed + {paused} paused + {pending} pending rows",
        backend.name()
    );
    let dir =
        bench.case_dir(&format!("scale-{backend:?}-{rows}-{delayed}-{paused}").to_lowercase())?;
    let database = bench.database(backend, &dir).await?;
    let loading = Instant::now();
    // Old finished rows first (low ids), then the backlog, as in real life.
    let long_ago = "'2026-01-01 00:00:00.000'";
    database
        .bulk_insert(
            finished,
            &[
                ("task_class_name", "'NoOp'"),
                ("created_at", long_ago),
                ("started_at", long_ago),
                ("completed_at", long_ago),
                ("heartbeat_at", long_ago),
                ("result", "'FINISHED'"),
                ("result_text", "'NOOP: OK!'"),
                ("tries", "1"),
                ("host", "'bench'"),
            ],
        )
        .await?;
    database
        .bulk_insert(
            delayed,
            &[
                ("task_class_name", "'NoOp'"),
                ("delay_until", "'2099-01-01 00:00:00.000'"),
            ],
        )
        .await?;
    database
        .bulk_insert(
            paused,
            &[("task_class_name", "'NoOp'"), ("queue", "'held'")],
        )
        .await?;
    database
        .bulk_insert(pending, &[("task_class_name", "'NoOp'")])
        .await?;
    match backend {
        // What autovacuum does within a minute of a bulk load.
        Backend::Postgres => {
            database
                .execute("VACUUM ANALYZE task_runner_requests")
                .await?;
        }
        // What InnoDB's persistent statistics do after a large change.
        Backend::Mysql => {
            database
                .execute("ANALYZE TABLE task_runner_requests")
                .await?;
        }
        Backend::Sqlite => {}
    }
    eprintln!("scale: loaded in {:.1}s", loading.elapsed().as_secs_f64());

    let store = Store::open(&database.url, Purpose::Daemon)?;
    let claims = CLAIMS.min(pending - WARM_UP);
    let mut claims_ms = Vec::with_capacity(claims);
    let instance = taskrunner::instance::InstanceId::new("bench");
    let held = ["held".to_string()];
    for index in 0..WARM_UP + claims {
        let token = instance.claim_token(index);
        let started = Instant::now();
        let by = taskrunner::store::Claimant {
            token: &token,
            instance: &instance,
            host: "bench",
        };
        let claimed = if paused > 0 {
            store.claim_outside(by, 1, &held).await?
        } else {
            store.claim(by, 1).await?
        };
        let elapsed = started.elapsed();
        anyhow::ensure!(claimed.len() == 1, "claim {index} found no runnable row");
        if index >= WARM_UP {
            claims_ms.push(elapsed.as_secs_f64() * 1000.0);
        }
    }
    store.close().await;
    database.close().await;
    claims_ms.sort_by(f64::total_cmp);
    Ok(Case {
        backend,
        rows,
        pending,
        delayed,
        paused,
        claims_ms,
    })
}

pub fn table(cases: &[Case]) -> Table {
    let mut table = Table::new(
        "Scale: Store::claim of one row, on a small and on a large table, and on the large one with rows delayed ahead, or paused ahead",
        &[
            "backend",
            "rows in table",
            "of them pending",
            "delayed ahead",
            "paused ahead",
            "claims timed",
            "mean ms",
            "p50 ms",
            "p99 ms",
            "mean vs smallest",
            "target",
        ],
    );
    for case in cases {
        let smallest = cases
            .iter()
            .filter(|other| other.backend == case.backend)
            .min_by_key(|other| other.rows)
            .map_or(f64::NAN, Case::mean_ms);
        table.row(vec![
            case.backend.name().to_string(),
            case.rows.to_string(),
            case.pending.to_string(),
            case.delayed.to_string(),
            case.paused.to_string(),
            case.claims_ms.len().to_string(),
            ms(case.mean_ms()),
            ms(percentile(&case.claims_ms, 0.50)),
            ms(percentile(&case.claims_ms, 0.99)),
            format!("{:.2}×", case.mean_ms() / smallest),
            if case.paused > 0 {
                "none (measured)"
            } else {
                "within 2×"
            }
            .to_string(),
        ]);
    }
    table.note(
        "Each claim is taskrunner's own Store::claim (limit 1) through the library, from this process, \
         one at a time, each its own transaction (with its commit: on PostgreSQL a WAL flush). \
         Finished rows have low ids, pending ones high ids, and the delayed rows (delay_until in 2099) \
         or the paused queue's rows lie between them (paused: Store::claim_outside, as a daemon serving \
         every queue claims while a queue is paused); PostgreSQL is VACUUM ANALYZEd and \
         MariaDB's table ANALYZEd after the load.",
    );
    table
}
