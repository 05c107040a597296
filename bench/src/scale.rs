//! Scale: the time of taskrunner's own claim (`Store::claim`, one row, the
//! statement the scheduler runs) on a table that already holds many rows,
//! nine in ten of them FINISHED and one in ten pending, as a table looks
//! after months of use without purging; and the large table once more with
//! a fifth of its rows delayed into the future (reminders for tomorrow),
//! enqueued before the pending ones; and once more with a fifth of its rows
//! in a paused queue, enqueued before the pending ones (a backlog held back
//! while its service is down), claimed as a daemon serving every queue does;
//! and with a fifth of its rows of a task type the claim leaves out (one
//! with a concurrency limit, claimed apart, or paused), and with that type
//! left out but none of its rows.

use std::time::Instant;

use anyhow::Result;
use taskrunner::store::{ApartBy, Purpose, Store};

use crate::database::{Backend, Bench};
use crate::latency::percentile;
use crate::report::{ms, Table};

/// Claims timed per table (after a few untimed ones).
const CLAIMS: usize = 1_000;
const WARM_UP: usize = 20;

/// The rows between the finished ones and the pending ones, which the claim
/// must not take.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    Nothing,
    /// Rows delayed by years.
    Delayed(usize),
    /// Rows of a paused queue.
    PausedQueue(usize),
    /// Rows of a task type the claim leaves out (none: only the claim of a
    /// daemon leaving a type out, which has no rows).
    LeftOutType(usize),
}

impl Ahead {
    fn rows(self) -> usize {
        match self {
            Ahead::Nothing => 0,
            Ahead::Delayed(rows) | Ahead::PausedQueue(rows) | Ahead::LeftOutType(rows) => rows,
        }
    }

    fn describe(self) -> String {
        match self {
            Ahead::Nothing => "none".into(),
            Ahead::Delayed(rows) => format!("{rows} delayed"),
            Ahead::PausedQueue(rows) => format!("{rows} of a paused queue"),
            Ahead::LeftOutType(rows) => format!("{rows} of a type left out"),
        }
    }
}

pub struct Case {
    pub backend: Backend,
    pub rows: usize,
    pub pending: usize,
    /// What lies ahead of the pending rows (lower ids).
    pub ahead: Ahead,
    /// Each claim's duration in milliseconds, sorted.
    pub claims_ms: Vec<f64>,
}

impl Case {
    fn mean_ms(&self) -> f64 {
        self.claims_ms.iter().sum::<f64>() / self.claims_ms.len().max(1) as f64
    }
}

/// Measures each backend on a table of each size, then on the largest
/// with a fifth of its rows delayed, then paused, then of a type left out,
/// then with a type left out that has no rows.
pub async fn run(bench: &Bench, backends: &[Backend], sizes: &[usize]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &backend in backends {
        for &rows in sizes {
            cases.push(measure(bench, backend, rows, Ahead::Nothing).await?);
        }
        if let Some(&largest) = sizes.iter().max() {
            for ahead in [
                Ahead::Delayed(largest / 5),
                Ahead::PausedQueue(largest / 5),
                Ahead::LeftOutType(largest / 5),
                Ahead::LeftOutType(0),
            ] {
                cases.push(measure(bench, backend, largest, ahead).await?);
            }
        }
    }
    Ok(cases)
}

/// One table: `rows` in all, of them the rows `ahead` of the pending ones.
async fn measure(bench: &Bench, backend: Backend, rows: usize, ahead: Ahead) -> Result<Case> {
    let pending = (rows / 10).max(WARM_UP + 100);
    let finished = rows.saturating_sub(pending + ahead.rows());
    eprintln!(
        "scale: {} with {finished} FINISHED + {} + {pending} pending rows",
        backend.name(),
        ahead.describe()
    );
    let case = match ahead {
        Ahead::Nothing => "".to_string(),
        Ahead::Delayed(rows) => format!("-{rows}-delayed"),
        Ahead::PausedQueue(rows) => format!("-{rows}-paused"),
        Ahead::LeftOutType(rows) => format!("-{rows}-left-out"),
    };
    let dir = bench.case_dir(&format!("scale-{backend:?}-{rows}{case}").to_lowercase())?;
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
    let ahead_columns: &[(&str, &str)] = match ahead {
        Ahead::Nothing => &[],
        Ahead::Delayed(_) => &[
            ("task_class_name", "'NoOp'"),
            ("delay_until", "'2099-01-01 00:00:00.000'"),
        ],
        Ahead::PausedQueue(_) => &[("task_class_name", "'NoOp'"), ("queue", "'held'")],
        Ahead::LeftOutType(_) => &[("task_class_name", "'Throttled'")],
    };
    // (SQLite's series has one row at the least.)
    if ahead.rows() > 0 {
        database.bulk_insert(ahead.rows(), ahead_columns).await?;
    }
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
    let (queue, task) = (["held".to_string()], ["Throttled".to_string()]);
    for index in 0..WARM_UP + claims {
        let token = instance.claim_token(index);
        let started = Instant::now();
        let by = taskrunner::store::Claimant {
            token: &token,
            instance: &instance,
            host: "bench",
        };
        let claimed = match ahead {
            Ahead::PausedQueue(_) => store.claim_outside(by, 1, (ApartBy::Queue, &queue)).await?,
            Ahead::LeftOutType(_) => store.claim_outside(by, 1, (ApartBy::Type, &task)).await?,
            Ahead::Nothing | Ahead::Delayed(_) => store.claim(by, 1).await?,
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
        ahead,
        claims_ms,
    })
}

pub fn table(cases: &[Case]) -> Table {
    let mut table = Table::new(
        "Scale: Store::claim of one row, on a small and on a large table, and on the large one with rows delayed ahead, or paused ahead, or of a type left out",
        &[
            "backend",
            "rows in table",
            "of them pending",
            "ahead of them",
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
            case.ahead.describe(),
            case.claims_ms.len().to_string(),
            ms(case.mean_ms()),
            ms(percentile(&case.claims_ms, 0.50)),
            ms(percentile(&case.claims_ms, 0.99)),
            format!("{:.2}×", case.mean_ms() / smallest),
            match case.ahead {
                Ahead::PausedQueue(_) | Ahead::LeftOutType(_) => "none (measured)",
                Ahead::Nothing | Ahead::Delayed(_) => "within 2×",
            }
            .to_string(),
        ]);
    }
    table.note(
        "Each claim is taskrunner's own Store::claim (limit 1) through the library, from this process, \
         one at a time, each its own transaction (with its commit: on PostgreSQL a WAL flush). \
         Finished rows have low ids, pending ones high ids, and the delayed rows (delay_until in 2099) \
         or the paused queue's rows, or those of a type left out (Throttled), lie between them (paused \
         queue, type left out: Store::claim_outside, as a daemon serving every queue claims while a \
         queue is paused, or while a type is paused or has a concurrency limit); PostgreSQL is \
         VACUUM ANALYZEd and \
         MariaDB's table ANALYZEd after the load.",
    );
    table
}
