//! `taskrunner-bench`: the performance benchmark of issue 6. It drives the
//! real release binaries (`taskrunnerd`, `taskrunner-cli`,
//! `taskrunner-builtin-tasks`) as separate processes against SQLite files,
//! PostgreSQL and MariaDB databases it creates, and prints one table per
//! measurement. Run it through `scripts/bench`, which builds the binaries and
//! starts private PostgreSQL and MariaDB servers; `docs/performance.md`
//! explains the method.
//!
//! # Layout
//!
//! - [`database`]: a fresh, migrated request table per case, and raw SQL on it.
//! - [`daemon`]: one `taskrunnerd` process with a generated config.
//! - [`throughput`]: drain a full table, next to the spawn-only ceiling.
//! - [`latency`]: insert-to-start delay of rows inserted by another process
//!   (the `inserter` mode of this same binary).
//! - [`scale`]: the library's claim on a small and on a huge table.
//! - [`web`]: the web page's and `/metrics`' times on a table of a million rows.
//! - [`report`]: the tables, as aligned markdown.

mod daemon;
mod database;
mod latency;
mod preload;
mod report;
mod scale;
mod throughput;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use database::{Backend, Bench};
use report::Report;

/// Benchmarks taskrunner on SQLite, PostgreSQL and MariaDB: throughput against the
/// spawn-only ceiling, insert-to-start latency, claim time on a huge table,
/// and the daemon's peak memory.
#[derive(Parser)]
#[command(name = "taskrunner-bench", args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Inserts requests one at a time at fixed gaps (the "other process" of
    /// the latency measurement).
    #[command(hide = true)]
    Inserter(latency::InserterArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// A fast smoke test: 1,000 rows, 100,000 scale rows, 100 latency requests
    #[arg(long)]
    quick: bool,
    /// NoOp requests drained per throughput case (default 10000; 1000 with --quick)
    #[arg(long)]
    rows: Option<usize>,
    /// Rows in the large table of the scale case (default 1000000; 100000 with --quick)
    #[arg(long)]
    scale_rows: Option<usize>,
    /// Rows in the small table of the scale case
    #[arg(long, default_value_t = 10_000)]
    small_scale_rows: usize,
    /// Requests inserted per latency case (default 500; 100 with --quick)
    #[arg(long)]
    latency_requests: Option<usize>,
    /// Gap between two latency inserts, in milliseconds
    #[arg(long, default_value_t = 20)]
    latency_gap_ms: u64,
    /// Rounds (spawn ceiling, then drain) per throughput case (default 3; 1 with --quick)
    #[arg(long)]
    rounds: Option<usize>,
    /// The max_concurrent values of the throughput cases
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    concurrency: Vec<usize>,
    /// Which backends to measure
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
    backends: Vec<Backend>,
    /// Which measurements to run
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,scale,memory,web,preload"
    )]
    only: Vec<Part>,
    /// A PostgreSQL server to create scratch databases on (any database name in the URL)
    #[arg(long, env = "TASKRUNNER_BENCH_DATABASE_URL")]
    postgres_url: Option<String>,
    /// A MariaDB (or MySQL) server to create scratch databases on, as
    /// mysql://user@host:port/db (any existing database name in the URL)
    #[arg(long, env = "TASKRUNNER_BENCH_MYSQL_URL")]
    mysql_url: Option<String>,
    /// Where taskrunnerd, taskrunner-cli and taskrunner-builtin-tasks are
    /// (default: beside this executable, i.e. target/release)
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write the tables as markdown to this file
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Throughput,
    Latency,
    Scale,
    Memory,
    Web,
    /// Preloaded tries beside the exec and fork ceilings, claim-to-start, a slow start.
    Preload,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // One thread: daemons are spawned from it, and their parent-death signal
    // (see `daemon`) is tied to the thread that spawned them.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskrunner-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Some(Command::Inserter(inserter)) => latency::run_inserter(inserter).await,
            None => run(args.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("taskrunner-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let rows = args.rows.unwrap_or(if args.quick { 1_000 } else { 10_000 });
    let scale_rows = args
        .scale_rows
        .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    let latency_requests = args
        .latency_requests
        .unwrap_or(if args.quick { 100 } else { 500 });
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let bin_dir = match args.bin_dir {
        // Absolute: the daemons it starts run in other directories.
        Some(dir) => {
            std::path::absolute(&dir).with_context(|| format!("--bin-dir {}", dir.display()))?
        }
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .context("this executable has no directory")?
            .to_path_buf(),
    };
    for binary in [daemon::DAEMON, daemon::CLI, daemon::TASKS] {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "{} is missing: build with `cargo build --release --workspace`, or pass --bin-dir",
                bin_dir.join(binary).display()
            );
        }
    }
    let mut backends = args.backends.clone();
    backends.dedup();
    if backends.contains(&Backend::Postgres) && args.postgres_url.is_none() {
        eprintln!(
            "taskrunner-bench: no PostgreSQL server (set TASKRUNNER_BENCH_DATABASE_URL, or run scripts/bench): SQLite only"
        );
        backends.retain(|backend| *backend != Backend::Postgres);
    }
    if backends.contains(&Backend::Mysql) && args.mysql_url.is_none() {
        eprintln!(
            "taskrunner-bench: no MariaDB server (set TASKRUNNER_BENCH_MYSQL_URL, or run scripts/bench): no MariaDB cases"
        );
        backends.retain(|backend| *backend != Backend::Mysql);
    }
    let bench = Bench::new(bin_dir, args.postgres_url.clone(), args.mysql_url.clone())?;
    let started = Instant::now();
    let mut report = Report::new(&bench, &backends).await;
    let wants = |part: Part| args.only.contains(&part);

    let result: Result<()> = async {
        if wants(Part::Throughput) || wants(Part::Memory) {
            let cases = throughput::run(&bench, &backends, &args.concurrency, rows, rounds).await?;
            if wants(Part::Throughput) {
                report.add(throughput::table(&cases, rows));
            }
            if wants(Part::Memory) {
                report.add(throughput::memory_table(&cases, rows));
            }
        }
        if wants(Part::Latency) {
            let cases =
                latency::run(&bench, &backends, latency_requests, args.latency_gap_ms).await?;
            report.add(latency::table(
                &cases,
                latency_requests,
                args.latency_gap_ms,
            ));
        }
        if wants(Part::Web) {
            // The web page's million-row load is written for SQLite and
            // PostgreSQL (date arithmetic); issue 18 asks no web times of MariaDB.
            let web_backends: Vec<Backend> = backends
                .iter()
                .copied()
                .filter(|backend| *backend != Backend::Mysql)
                .collect();
            let cases = web::run(&bench, &web_backends, scale_rows).await?;
            report.add(web::table(&cases));
        }
        if wants(Part::Preload) {
            let results = preload::run(
                &bench,
                &backends,
                &args.concurrency,
                rows,
                latency_requests.min(200),
            )
            .await?;
            for table in preload::tables(&results, rows) {
                report.add(table);
            }
        }
        if wants(Part::Scale) {
            let cases = scale::run(&bench, &backends, &[args.small_scale_rows, scale_rows]).await?;
            report.add(scale::table(&cases));
        }
        Ok(())
    }
    .await;
    bench.cleanup().await;
    result?;

    report.finish(started.elapsed());
    print!("{}", report.render());
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.render())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("taskrunner-bench: wrote {}", path.display());
    }
    Ok(())
}
