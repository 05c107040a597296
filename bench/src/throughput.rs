//! Throughput: a table full of NoOp requests, drained by one daemon at a
//! given `max_concurrent`, next to the ceiling: the same task process spawned
//! and waited for directly, with no database and no daemon, at the same
//! concurrency. Also the daemon's peak memory while it drains.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::{self, Daemon, Usage};
use crate::database::{Backend, Bench};
use crate::report::{ms, Table};

pub struct Case {
    pub backend: Backend,
    pub concurrency: usize,
    /// The same process as the ceiling, forced through fork + exec by a
    /// `pre_exec` hook (processes per second, measured once).
    pub fork_ceiling: f64,
    pub rows: usize,
    /// Each a ceiling measured right before a drain: the machine's speed
    /// drifts by several percent within minutes, so ratios are taken pairwise
    /// and the case is reported by its median round.
    pub rounds: Vec<Round>,
}

pub struct Round {
    /// Tasks per second, first `started_at` to last `completed_at`.
    pub rate: f64,
    /// Spawn-and-wait rate as Rust's `Command` does it (posix_spawn).
    pub ceiling: f64,
    /// The daemon's usage at the end of the drain.
    pub usage: Usage,
    /// Busy CPU time of the whole machine during the drain.
    pub machine_cpu: Duration,
    /// Database statements (round trips) the daemon sent during the drain.
    pub statements: u64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.rate / self.ceiling
    }

    /// The CPUs a drain at 90% of the ceiling would keep busy, if each task
    /// cost the machine what it cost in this drain.
    fn cpus_at_target(&self, rows: usize) -> f64 {
        0.9 * self.ceiling * self.machine_cpu.as_secs_f64() / rows.max(1) as f64
    }
}

impl Case {
    /// The round with the median ratio (the lower middle one of an even count).
    fn median(&self) -> &Round {
        let mut rounds: Vec<&Round> = self.rounds.iter().collect();
        rounds.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        rounds[(rounds.len() - 1) / 2]
    }

    /// The lowest and highest ratio over the rounds.
    fn ratio_range(&self) -> (f64, f64) {
        let ratios = self.rounds.iter().map(Round::ratio);
        let low = ratios.clone().fold(f64::INFINITY, f64::min);
        (low, ratios.fold(0.0, f64::max))
    }
}

pub async fn run(
    bench: &Bench,
    backends: &[Backend],
    concurrency: &[usize],
    rows: usize,
    rounds: usize,
) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &backend in backends {
        for &level in concurrency {
            eprintln!(
                "throughput: fork+exec ceiling, {rows} NoOp processes at concurrency {level}"
            );
            let fork_ceiling = ceiling(bench, level, rows, true)?;
            let mut case = Case {
                backend,
                concurrency: level,
                fork_ceiling,
                rows,
                rounds: Vec::new(),
            };
            for round in 1..=rounds.max(1) {
                // The ceiling right before the drain, so that both see the same machine.
                eprintln!(
                    "throughput: round {round}: spawn ceiling, then {} draining {rows} NoOp requests, max_concurrent {level}",
                    backend.name()
                );
                let ceiling = ceiling(bench, level, rows, false)?;
                let (rate, usage, machine_cpu, statements) =
                    drain(bench, backend, level, rows, round).await?;
                case.rounds.push(Round {
                    rate,
                    ceiling,
                    usage,
                    machine_cpu,
                    statements,
                });
            }
            cases.push(case);
        }
    }
    Ok(cases)
}

/// Drains `rows` NoOp requests; returns tasks per second (by the database
/// clock, first start to last completion), the daemon's usage, the
/// machine's busy CPU time during the drain, and the daemon's statements.
async fn drain(
    bench: &Bench,
    backend: Backend,
    concurrency: usize,
    rows: usize,
    round: usize,
) -> Result<(f64, Usage, Duration, u64)> {
    let dir =
        bench.case_dir(&format!("throughput-{backend:?}-{concurrency}-{round}").to_lowercase())?;
    let database = bench.database(backend, &dir).await?;
    database
        .bulk_insert(rows, &[("task_class_name", "'NoOp'")])
        .await?;
    let cpu_before = machine_busy_cpu()?;
    let daemon = Daemon::start(
        bench,
        &dir,
        &database.url,
        &format!("max_concurrent: {concurrency}\n"),
    )
    .await?;
    let statements_before = daemon.statements(bench)?;
    let timeout = Duration::from_secs(60) + Duration::from_millis(50) * rows as u32;
    database.wait_finished(rows, timeout).await?;
    let usage = daemon.usage()?;
    let statements = daemon.statements(bench)?.saturating_sub(statements_before);
    let machine_cpu = machine_busy_cpu()?.saturating_sub(cpu_before);
    daemon.stop().await?;
    let span = database
        .floats(&format!(
            "SELECT {} FROM task_runner_requests WHERE result = 'FINISHED'",
            database.seconds_between("min(started_at)", "max(completed_at)")
        ))
        .await?;
    database.close().await;
    let span = span.first().copied().unwrap_or(0.0);
    if span <= 0.0 {
        bail!("the drain took no measurable time");
    }
    Ok((rows as f64 / span, usage, machine_cpu, statements))
}

/// Spawns the built-in task binary `count` times, `concurrency` at a time,
/// exactly as the daemon would for NoOp (environment, empty stdin, stdout and
/// stderr piped and read), and returns processes per second.
pub fn ceiling(bench: &Bench, concurrency: usize, count: usize, fork: bool) -> Result<f64> {
    let program = bench.binary(daemon::TASKS);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        spawn_noop(&program, fork)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a spawning thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn spawn_noop(program: &std::path::Path, fork: bool) -> Result<()> {
    let mut command = Command::new(program);
    command
        .env("TASKRUNNER_TASK", "NoOp")
        .env("TASKRUNNER_REQUEST_ID", "1")
        .env("TASKRUNNER_TRY", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if fork {
        // SAFETY: an empty hook; its only effect is that std forks instead
        // of using posix_spawn.
        unsafe { command.pre_exec(|| Ok(())) };
    }
    // `output` closes stdin at once (empty options) and reads both pipes.
    let output = command
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() || !output.stdout.starts_with(b"NOOP 1: OK!") {
        bail!(
            "{} failed: {}: {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Busy CPU time of all CPUs since boot (everything in /proc/stat but idle and iowait).
fn machine_busy_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let first = stat.lines().next().unwrap_or_default();
    let ticks: Vec<u64> = first
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(index, _)| *index != 3 && *index != 4)
        .map(|(_, value)| value)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Duration::from_secs_f64(busy as f64 / per_second))
}

fn per_task(cpu: Duration, rows: usize) -> String {
    ms(cpu.as_secs_f64() * 1000.0 / rows.max(1) as f64)
}

pub fn table(cases: &[Case], rows: usize) -> Table {
    let mut table = Table::new(
        &format!("Throughput: {rows} NoOp requests inserted up front, drained"),
        &[
            "backend",
            "max_concurrent",
            "tasks/s",
            "spawn ceiling/s",
            "ratio",
            "target",
            "ratio range",
            "fork+exec ceiling/s",
            "daemon CPU ms/task",
            "task CPU ms/task",
            "machine CPU ms/task",
            "CPUs at 90%",
            "daemon context switches/task",
            "DB statements/task",
        ],
    );
    for case in cases {
        // Issue 20: at every max_concurrent, on every backend.
        let target = "≥ 90%";
        let median = case.median();
        let (low, high) = case.ratio_range();
        table.row(vec![
            case.backend.name().to_string(),
            case.concurrency.to_string(),
            format!("{:.0}", median.rate),
            format!("{:.0}", median.ceiling),
            format!("{:.0}%", 100.0 * median.ratio()),
            target.to_string(),
            format!(
                "{:.0}–{:.0}% ({} rounds)",
                100.0 * low,
                100.0 * high,
                case.rounds.len()
            ),
            format!("{:.0}", case.fork_ceiling),
            per_task(median.usage.cpu, case.rows),
            per_task(median.usage.children_cpu, case.rows),
            per_task(median.machine_cpu, case.rows),
            format!("{:.2}", median.cpus_at_target(case.rows)),
            format!(
                "{:.1}",
                median.usage.context_switches as f64 / case.rows.max(1) as f64
            ),
            format!("{:.2}", median.statements as f64 / case.rows.max(1) as f64),
        ]);
    }
    table.note(
        "Each case runs in rounds: the spawn ceiling, then a drain, each round on a fresh table; \
         the row shows the round with the median ratio, and the range of the ratio over all rounds. \
         tasks/s: rows ÷ (last completed_at − first started_at), by the database clock. \
         Spawn ceiling: the same NoOp process spawned and waited for directly (std::process, posix_spawn), \
         no database, same concurrency, measured right before the drain; fork+exec: the same forced through fork by a pre_exec hook (the daemon starts tasks with clone(CLONE_VM|CLONE_VFORK), like posix_spawn). \
         CPU per task: the daemon's own, its task processes', and the whole machine's busy time during the drain \
         (the rest is the database server, the kernel, and anything else running on the machine); \
         CPUs at 90%: the CPUs that a drain at 90% of the ceiling would keep busy, at this drain's machine CPU per task \
         (more than the machine has: the target needs less CPU per task, not less waiting); \
         context switches: all the daemon's threads, voluntary and not. \
         DB statements/task: database round trips the daemon sent during the drain (claims, writes about tries, \
         heartbeats, reaping, change checks; BEGIN and COMMIT count), from `status`, ÷ rows.",
    );
    table
}

pub fn memory_table(cases: &[Case], rows: usize) -> Table {
    let mut table = Table::new(
        &format!("Memory: the daemon while {rows} rows wait and max_concurrent run"),
        &[
            "backend",
            "max_concurrent",
            "peak RSS (VmHWM)",
            "RSS at the end",
            "target",
        ],
    );
    let busiest = cases.iter().map(|case| case.concurrency).max().unwrap_or(0);
    for case in cases.iter().filter(|case| case.concurrency == busiest) {
        let peak_kib = case
            .rounds
            .iter()
            .map(|round| round.usage.peak_rss_kib)
            .max()
            .unwrap_or(0);
        table.row(vec![
            case.backend.name().to_string(),
            case.concurrency.to_string(),
            format!("{:.1} MiB", peak_kib as f64 / 1024.0),
            format!("{:.1} MiB", case.median().usage.rss_kib as f64 / 1024.0),
            "< 50 MiB".to_string(),
        ]);
    }
    table.note(
        "VmHWM of taskrunnerd from /proc/PID/status, read when the last row finished (the highest over the rounds); \
         RSS at the end: of the median round.",
    );
    table
}
