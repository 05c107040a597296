//! Latency: requests inserted one at a time, at fixed gaps, by another OS
//! process (this binary in its `inserter` mode) into an idle daemon. The
//! delay is `started_at − created_at` of each row: both written by the
//! database clock (`created_at` by the inserting statement, `started_at` by
//! the daemon's claim, just before it spawns the task), so no clocks of two
//! processes are compared. It includes the inserter's own commit; the
//! inserter also times each of its INSERTs (statement and commit, by its own
//! clock), so that the table can show the delay counted from the moment the
//! commit returned, which is all the daemon can see.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::{ConnectOptions, Connection};

use crate::daemon::{self, Daemon};
use crate::database::{Backend, Bench};
use crate::report::{ms, Table};

/// How the requests get in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A plain `INSERT` by an application's connection.
    Sql,
    /// `taskrunner-cli enqueue`, which also wakes the daemon over its socket.
    Cli,
}

pub struct Case {
    pub backend: Backend,
    pub path: Path,
    /// Insert-to-start delays, in milliseconds, sorted.
    pub delays_ms: Vec<f64>,
    /// Each row's delay less the inserter's own INSERT (statement and
    /// commit): from the commit's return to the start, milliseconds, sorted.
    /// Empty for the CLI path (its time is a whole process's).
    pub after_commit_ms: Vec<f64>,
}

#[derive(clap::Args)]
pub struct InserterArgs {
    /// The database to insert into
    #[arg(long)]
    url: String,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    gap_ms: u64,
    /// Insert through this taskrunner-cli instead of SQL
    #[arg(long)]
    cli: Option<PathBuf>,
    /// The daemon's config, for taskrunner-cli (it finds the socket there)
    #[arg(long)]
    config: Option<PathBuf>,
}

pub async fn run(
    bench: &Bench,
    backends: &[Backend],
    count: usize,
    gap_ms: u64,
) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &backend in backends {
        for path in [Path::Sql, Path::Cli] {
            eprintln!(
                "latency: {} {count} requests through {}, {gap_ms} ms apart",
                backend.name(),
                path_name(path)
            );
            cases.push(measure(bench, backend, path, count, gap_ms).await?);
        }
    }
    Ok(cases)
}

async fn measure(
    bench: &Bench,
    backend: Backend,
    path: Path,
    count: usize,
    gap_ms: u64,
) -> Result<Case> {
    let dir = bench.case_dir(&format!("latency-{backend:?}-{path:?}").to_lowercase())?;
    let database = bench.database(backend, &dir).await?;
    // The poll is only the safety net: every start below is a wake-up.
    let daemon = Daemon::start(
        bench,
        &dir,
        &database.url,
        "max_concurrent: 2\npoll_interval: 60s\n",
    )
    .await?;
    // Let the daemon settle (LISTEN connected, SQLite change watcher primed).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("inserter")
        .arg("--url")
        .arg(&database.url)
        .arg("--count")
        .arg(count.to_string())
        .arg("--gap-ms")
        .arg(gap_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if path == Path::Cli {
        command
            .arg("--cli")
            .arg(bench.binary(daemon::CLI))
            .arg("--config")
            .arg(&daemon.config);
    }
    let mut inserter = command.spawn().context("starting the inserter")?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(gap_ms) * count as u32
        + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = inserter.try_wait()? {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = inserter.kill();
            let _ = inserter.wait();
            bail!("the inserter did not finish in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !status.success() {
        let mut text = String::new();
        if let Some(mut stderr) = inserter.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        }
        bail!("the inserter failed ({status}): {text}");
    }
    let mut own_inserts = String::new();
    if let Some(mut stdout) = inserter.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut own_inserts)?;
    }
    database
        .wait_finished(count, Duration::from_secs(60))
        .await?;
    daemon.stop().await?;
    let mut delays_ms = database
        .floats(&format!(
            "SELECT 1000.0 * {} FROM task_runner_requests ORDER BY id",
            database.seconds_between("created_at", "started_at")
        ))
        .await?;
    database.close().await;
    if backend == Backend::Sqlite {
        // Whole milliseconds stored; julianday arithmetic adds float noise.
        delays_ms
            .iter_mut()
            .for_each(|delay| *delay = delay.round());
    }
    // One inserter inserts the rows one after the other, so ids follow its
    // lines; each line is one INSERT's time by its own clock.
    let own_inserts_ms = own_inserts
        .lines()
        .map(str::parse::<f64>)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the inserter's INSERT times")?;
    let mut after_commit_ms = if path == Path::Sql && own_inserts_ms.len() == delays_ms.len() {
        delays_ms
            .iter()
            .zip(&own_inserts_ms)
            .map(|(delay, own)| (delay - own).max(0.0))
            .collect()
    } else {
        Vec::new()
    };
    after_commit_ms.sort_by(f64::total_cmp);
    delays_ms.sort_by(f64::total_cmp);
    Ok(Case {
        backend,
        path,
        delays_ms,
        after_commit_ms,
    })
}

/// The `inserter` mode: `count` requests, the i-th at start + i × gap (or at
/// once when late), each committed on its own; prints each INSERT's time
/// (statement and commit, milliseconds) on a line of its own.
pub async fn run_inserter(args: InserterArgs) -> Result<()> {
    enum Target {
        Sqlite(sqlx::SqliteConnection),
        Postgres(sqlx::PgConnection),
        Mysql(sqlx::MySqlConnection),
        Cli(PathBuf, PathBuf),
    }
    let mut target = match (&args.cli, &args.config) {
        (Some(cli), Some(config)) => Target::Cli(cli.clone(), config.clone()),
        (Some(_), None) => bail!("--cli needs --config"),
        _ if args.url.starts_with("sqlite:") => Target::Sqlite(
            sqlx::sqlite::SqliteConnectOptions::from_str(&args.url)?
                .busy_timeout(Duration::from_secs(10))
                .connect()
                .await?,
        ),
        _ if args.url.starts_with("mysql:") || args.url.starts_with("mariadb:") => {
            Target::Mysql(sqlx::MySqlConnection::connect(&args.url).await?)
        }
        _ => Target::Postgres(sqlx::PgConnection::connect(&args.url).await?),
    };
    const INSERT: &str = "INSERT INTO task_runner_requests (task_class_name, options) VALUES ('NoOp', 'created_from: bench')";
    let gap = Duration::from_millis(args.gap_ms);
    let start = tokio::time::Instant::now();
    for index in 0..args.count {
        tokio::time::sleep_until(start + gap * index as u32).await;
        let began = std::time::Instant::now();
        match &mut target {
            Target::Sqlite(connection) => {
                sqlx::query(INSERT).execute(&mut *connection).await?;
            }
            Target::Postgres(connection) => {
                sqlx::query(INSERT).execute(&mut *connection).await?;
            }
            Target::Mysql(connection) => {
                sqlx::query(INSERT).execute(&mut *connection).await?;
            }
            Target::Cli(cli, config) => {
                let output = tokio::process::Command::new(cli)
                    .arg("--config")
                    .arg(config)
                    .args(["enqueue", "NoOp", "--options", "created_from: bench"])
                    .env_remove("DATABASE_URL")
                    .output()
                    .await?;
                if !output.status.success() {
                    bail!(
                        "taskrunner-cli enqueue failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            }
        }
        println!("{:.3}", began.elapsed().as_secs_f64() * 1000.0);
    }
    match target {
        Target::Sqlite(connection) => connection.close().await?,
        Target::Postgres(connection) => connection.close().await?,
        Target::Mysql(connection) => connection.close().await?,
        Target::Cli(..) => {}
    }
    Ok(())
}

fn path_name(path: Path) -> &'static str {
    match path {
        Path::Sql => "INSERT by another process",
        Path::Cli => "taskrunner-cli enqueue",
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn table(cases: &[Case], count: usize, gap_ms: u64) -> Table {
    let mut table = Table::new(
        &format!("Latency: {count} requests inserted one at a time, {gap_ms} ms apart, into an idle daemon"),
        &["backend", "inserted by", "p50 ms", "p95 ms", "p99 ms", "max ms", "target"],
    );
    for case in cases {
        let target = match (case.backend, case.path) {
            (Backend::Sqlite, Path::Sql) => "p99 < 10 ms",
            (Backend::Postgres, Path::Sql) => "p50 < 3 ms, p99 < 10 ms",
            // Issue 18: no NOTIFY; two index look-ups every 100 ms.
            (Backend::Mysql, Path::Sql) => "< 200 ms",
            (_, Path::Cli) => "< 10 ms",
        };
        let row = |path: &str, delays: &[f64], target: &str| {
            vec![
                case.backend.name().to_string(),
                path.to_string(),
                ms(percentile(delays, 0.50)),
                ms(percentile(delays, 0.95)),
                ms(percentile(delays, 0.99)),
                ms(delays.last().copied().unwrap_or(f64::NAN)),
                target.to_string(),
            ]
        };
        table.row(row(path_name(case.path), &case.delays_ms, target));
        if !case.after_commit_ms.is_empty() {
            table.row(row(
                "the same, from its commit's return",
                &case.after_commit_ms,
                "",
            ));
        }
    }
    table.note(
        "Insert-to-start = started_at − created_at of each row, both written by the database clock \
         (created_at by the inserting statement, started_at by the daemon's claim just before the task process \
         is spawned); it includes the inserter's own commit. \"From its commit's return\" subtracts each \
         INSERT's own time as the inserter measured it (statement and commit; with SQLite's default \
         synchronous=FULL an fsync of the log), which leaves what the daemon can act on. SQLite stores milliseconds, so its values are \
         whole milliseconds. MariaDB has no NOTIFY: the daemon looks for new rows every 100 ms.",
    );
    table
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
    }
}
