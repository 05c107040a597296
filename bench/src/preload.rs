//! Preload: the built-in NoOp forked from a preloaded parent
//! (`tasks: {NoOp: {preload: true}}`), drained at each concurrency beside
//! two ceilings measured right before it: the exec spawn ceiling (the same
//! as the throughput part's) and a fork-only ceiling (this process forking
//! a child that exits at once, and waiting for it: no exec, no daemon).
//! Also claim-to-start (the task's own clock at the start of its `run`
//! against the row's `started_at`, written by the claim), exec'd and
//! preloaded, the daemon's and the parent's memory, and a program whose
//! setup takes 200 ms, run with and without preload.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::{self, Daemon, Usage};
use crate::database::{Backend, Bench, Database};
use crate::report::{ms, Table};

/// The task-sdk probe program of `examples/` (built by `--workspace`).
pub const PROBE: &str = "preload-probe";

pub struct Case {
    pub backend: Backend,
    pub concurrency: usize,
    pub rate: f64,
    pub exec_ceiling: f64,
    pub fork_ceiling: f64,
    pub daemon: Usage,
    pub parent_rss_kib: u64,
}

pub struct Latency {
    pub backend: Backend,
    pub preload: bool,
    /// `started_at` to the task's `run`, in milliseconds, sorted.
    pub delays_ms: Vec<f64>,
    /// Each try's start, step by step (from the daemon's debug line).
    pub steps: Vec<Steps>,
}

/// One try's start, step by step, in milliseconds (see
/// `taskrunner::supervisor::StartTimes` for what each instant is).
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    /// Where the row's `started_at` falls after the claim was sent (the
    /// database's clock: PostgreSQL's `now()` is its transaction's start;
    /// SQLite truncates to the millisecond, so it may fall before).
    pub started_at_after_sent: f64,
    /// The claim: statement and commit, until its rows are back.
    pub claim: f64,
    /// Rows back → the try has its slot (type, options, environment and
    /// cgroup are made before it waits for the slot).
    pub to_supervisor: f64,
    /// Slot → the spawner is asked.
    pub to_spawner: f64,
    /// Asked → a spawner thread took it (exec'd) / the request was sent to
    /// the preloaded parent (pipes, message).
    pub hand_off: f64,
    /// Taken → `clone` returned, the child exec'd (exec'd) / sent → the
    /// parent's answer (its fork) arrived (preloaded).
    pub create: f64,
    /// Created → the runtime's thread holds the child.
    pub back_on_runtime: f64,
    /// Created → the task's `run` (exec'd: the end of execve, loading,
    /// `main`; preloaded: the child after its fork, which may run before
    /// the answer arrives).
    pub to_run: f64,
    /// Rows back → the task's `run`: claim-to-start once the claim holds.
    pub claimed_to_run: f64,
}

/// The instants of the daemon's `start times` debug lines, by request id.
fn start_times(log: &str) -> std::collections::HashMap<i64, [u64; 7]> {
    const KEYS: [&str; 7] = [
        "claim_sent",
        "claim_returned",
        "launched",
        "asked",
        "handed_off",
        "created",
        "spawned",
    ];
    let mut found = std::collections::HashMap::new();
    for line in log.lines().filter(|line| line.contains("start times")) {
        let value = |key: &str| -> Option<u64> {
            let marker = format!("{key}=");
            let at = line.find(&marker)? + marker.len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        let Some(request) = value("request") else {
            continue;
        };
        let mut instants = [0u64; 7];
        if KEYS
            .iter()
            .zip(instants.iter_mut())
            .all(|(key, slot)| value(key).map(|v| *slot = v).is_some())
        {
            found.insert(request as i64, instants);
        }
    }
    found
}

pub struct SlowStart {
    pub backend: Backend,
    pub exec_per_try: Duration,
    pub preload_per_try: Duration,
}

pub struct Results {
    pub cases: Vec<Case>,
    pub latencies: Vec<Latency>,
    pub slow_starts: Vec<SlowStart>,
    /// Request sent → the task's `run`, in milliseconds, sorted: the probe
    /// served by this process directly (no daemon, no database), each
    /// request [`FLOOR_GAP`] after the last one's end, and after
    /// [`FLOOR_IDLE_GAP`].
    pub floor_ms: Vec<f64>,
    pub floor_idle_ms: Vec<f64>,
}

/// The floor's requests follow each other this closely, about as closely
/// as the daemon's in the claim-to-start measure (the next row is inserted
/// once the bench, polling every 2 ms, sees the last one end).
const FLOOR_GAP: Duration = Duration::from_millis(2);

/// And again after this much idleness: a request into an idle machine.
const FLOOR_IDLE_GAP: Duration = Duration::from_millis(20);

pub async fn run(
    bench: &Bench,
    backends: &[Backend],
    concurrency: &[usize],
    rows: usize,
    latency_requests: usize,
) -> Result<Results> {
    if !bench.binary(PROBE).is_file() {
        bail!(
            "{} is missing: build with `cargo build --release --workspace`",
            bench.binary(PROBE).display()
        );
    }
    let mut results = Results {
        cases: Vec::new(),
        latencies: Vec::new(),
        slow_starts: Vec::new(),
        floor_ms: Vec::new(),
        floor_idle_ms: Vec::new(),
    };
    eprintln!("preload: the floor of a preloaded start (the probe served without a daemon)");
    results.floor_ms = preload_floor(bench, latency_requests, FLOOR_GAP)?;
    results.floor_idle_ms = preload_floor(bench, latency_requests, FLOOR_IDLE_GAP)?;
    for &backend in backends {
        for &level in concurrency {
            eprintln!(
                "preload: ceilings (exec, fork only), then {} draining {rows} preloaded NoOp requests, max_concurrent {level}",
                backend.name()
            );
            let exec_ceiling = crate::throughput::ceiling(bench, level, rows, false)?;
            let fork_ceiling = fork_ceiling(level, rows)?;
            let (rate, daemon, parent_rss_kib) = drain(bench, backend, level, rows).await?;
            results.cases.push(Case {
                backend,
                concurrency: level,
                rate,
                exec_ceiling,
                fork_ceiling,
                daemon,
                parent_rss_kib,
            });
        }
        for preload in [false, true] {
            eprintln!(
                "preload: claim-to-start on {}, {}",
                backend.name(),
                if preload { "preloaded" } else { "exec'd" }
            );
            let (delays_ms, steps) =
                claim_to_start(bench, backend, preload, latency_requests).await?;
            results.latencies.push(Latency {
                backend,
                preload,
                delays_ms,
                steps,
            });
        }
        eprintln!(
            "preload: a program with a 200 ms setup on {}",
            backend.name()
        );
        results.slow_starts.push(slow_start(bench, backend).await?);
    }
    Ok(results)
}

/// A child forked and waited for, `count` times, `concurrency` at a time:
/// what a preloaded parent costs at the least.
fn fork_ceiling(concurrency: usize, count: usize) -> Result<f64> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        // SAFETY: the child only calls _exit.
                        let pid = unsafe { libc::fork() };
                        if pid == 0 {
                            // SAFETY: leaving the child at once.
                            unsafe { libc::_exit(0) };
                        }
                        if pid < 0 {
                            return Err(std::io::Error::last_os_error()).context("fork");
                        }
                        let mut status = 0;
                        // SAFETY: reaping the child just forked.
                        unsafe { libc::waitpid(pid, &mut status, 0) };
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a forking thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The floor of a preloaded start: this process plays the daemon's part of
/// the preload protocol (README, "Preload protocol") with the probe program
/// itself, with no daemon and no database: for each request its three
/// pipes are made (the options written), the request is sent, and the delay
/// is the task's clock at the start of its `run` less the instant of the
/// send. It holds only what a preloaded start cannot do without: the
/// parent's wake-up, its fork, and the child's set-up up to `run`.
fn preload_floor(bench: &Bench, count: usize, gap: Duration) -> Result<Vec<f64>> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let pair = |kind: libc::c_int| -> Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair and pipe2 write two new descriptors into the array.
        let made = unsafe {
            if kind == 0 {
                libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
            } else {
                libc::socketpair(
                    libc::AF_UNIX,
                    kind | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            }
        };
        if made != 0 {
            return Err(std::io::Error::last_os_error()).context("making a pipe or socket pair");
        }
        // SAFETY: both were just created and are owned only here.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (socket, theirs) = pair(libc::SOCK_SEQPACKET)?;
    let mut parent = std::process::Command::new(bench.binary(PROBE))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TASKRUNNER_PRELOAD", "1")
        .stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the probe preloaded")?;
    let mut buffer = [0u8; 256];
    let receive = |buffer: &mut [u8]| -> Result<Vec<u8>> {
        // SAFETY: recv into a live buffer from our socket.
        let count = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if count <= 0 {
            bail!("the preloaded probe closed its socket");
        }
        Ok(buffer[..count as usize].to_vec())
    };
    if receive(&mut buffer)? != b"hello\0taskrunner-preload-1\0" {
        bail!("the preloaded probe did not say hello");
    }
    let mut delays = Vec::with_capacity(count);
    for request in 1..=count {
        let (stdin_child, stdin_ours) = pair(0)?;
        let (mut stdout_ours, stdout_child) = pair(0).map(|(r, w)| (std::fs::File::from(r), w))?;
        let (_stderr_ours, stderr_child) = pair(0)?;
        // The options, all in the pipe before the request (as the daemon does).
        std::io::Write::write_all(&mut std::fs::File::from(stdin_ours), b"clock: true")
            .context("writing the options")?;
        let mut message = Vec::new();
        for (name, value) in [
            ("daemon_pid", std::process::id().to_string()),
            ("workdir", "/".to_string()),
            ("env", "PATH=/usr/bin:/bin".to_string()),
            ("env", "TASKRUNNER_TASK=Probe".to_string()),
            ("env", format!("TASKRUNNER_REQUEST_ID={request}")),
            ("env", "TASKRUNNER_TRY=1".to_string()),
        ] {
            for part in [name.as_bytes(), value.as_bytes()] {
                message.extend_from_slice(part);
                message.push(0);
            }
        }
        let fds = [
            stdin_child.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ];
        let sent = std::time::SystemTime::now();
        taskrunner::supervisor::send_with_fds(socket.as_raw_fd(), &message, &fds)
            .context("sending a request to the probe")?;
        let answer = receive(&mut buffer)?;
        drop((stdin_child, stdout_child, stderr_child));
        let pid: libc::pid_t = std::str::from_utf8(&answer)
            .ok()
            .and_then(|text| text.strip_prefix("pid\0")?.strip_suffix('\0')?.parse().ok())
            .with_context(|| {
                format!("the probe answered {:?}", String::from_utf8_lossy(&answer))
            })?;
        let mut output = String::new();
        stdout_ours
            .read_to_string(&mut output)
            .context("reading the try's output")?;
        let mut status = 0;
        // SAFETY: reaping the try, our child (CLONE_PARENT).
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let run_ns: f64 = output
            .trim()
            .parse()
            .with_context(|| format!("the probe's try printed {output:?}"))?;
        let sent_ns = sent.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as f64;
        delays.push((run_ns - sent_ns) / 1e6);
        // An idle moment between two requests.
        std::thread::sleep(gap);
    }
    drop(socket);
    parent.wait().context("waiting for the preloaded probe")?;
    delays.sort_by(f64::total_cmp);
    Ok(delays)
}

/// The pid of the preloaded parent a daemon started last, from its log.
fn parent_pid(daemon: &Daemon) -> Option<u32> {
    let log = daemon.log_text();
    let line = log.lines().rev().find(|l| l.contains(" preloaded (pid "))?;
    line.rsplit_once("(pid ")?
        .1
        .trim_end_matches(')')
        .parse()
        .ok()
}

async fn drain(
    bench: &Bench,
    backend: Backend,
    concurrency: usize,
    rows: usize,
) -> Result<(f64, Usage, u64)> {
    let dir = bench.case_dir(&format!("preload-{backend:?}-{concurrency}").to_lowercase())?;
    let database = bench.database(backend, &dir).await?;
    database
        .bulk_insert(rows, &[("task_class_name", "'NoOp'")])
        .await?;
    let daemon = Daemon::start(
        bench,
        &dir,
        &database.url,
        &format!("max_concurrent: {concurrency}\ntasks: {{NoOp: {{preload: true}}}}\n"),
    )
    .await?;
    let timeout = Duration::from_secs(60) + Duration::from_millis(50) * rows as u32;
    database.wait_finished(rows, timeout).await?;
    let usage = daemon.usage()?;
    let parent_rss_kib = parent_pid(&daemon)
        .and_then(|pid| daemon::usage_of(pid).ok())
        .map_or(0, |usage| usage.peak_rss_kib);
    if parent_rss_kib == 0 {
        bail!(
            "the NoOp tries were not preloaded; the daemon's log:\n{}",
            daemon.log_text()
        );
    }
    daemon.stop().await?;
    let rate = finished_rate(&database, rows).await?;
    database.close().await;
    Ok((rate, usage, parent_rss_kib))
}

async fn finished_rate(database: &Database, rows: usize) -> Result<f64> {
    let span = database
        .floats(&format!(
            "SELECT {} FROM task_runner_requests WHERE result = 'FINISHED'",
            database.seconds_between("min(started_at)", "max(completed_at)")
        ))
        .await?;
    match span.first().copied() {
        Some(span) if span > 0.0 => Ok(rows as f64 / span),
        _ => bail!("the drain took no measurable time"),
    }
}

/// Requests for the probe's `clock` one at a time into an idle daemon
/// (max_concurrent 1, nothing claimed ahead): the task's clock at the start
/// of its `run`, less `started_at`; and each start step by step, from the
/// daemon's `taskrunner::start_timing` debug lines.
async fn claim_to_start(
    bench: &Bench,
    backend: Backend,
    preload: bool,
    count: usize,
) -> Result<(Vec<f64>, Vec<Steps>)> {
    let name = format!("claim-{backend:?}-{preload}").to_lowercase();
    let dir = bench.case_dir(&name)?;
    let database = bench.database(backend, &dir).await?;
    let program = bench.binary(PROBE);
    let daemon = Daemon::start_logging(
        bench,
        &dir,
        &database.url,
        &format!(
            "max_concurrent: 1\nprograms: [{{path: {}, preload: {preload}}}]\n",
            program.display()
        ),
        Some("info,taskrunner::start_timing=debug"),
    )
    .await?;
    for done in 1..=count {
        database
            .execute("INSERT INTO task_runner_requests (task_class_name, options) VALUES ('Probe', 'clock: true')")
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while (database
            .integer("SELECT count(*) FROM task_runner_requests WHERE result IS NOT NULL AND result <> 'RUNNING'")
            .await? as usize)
            < done
        {
            if Instant::now() > deadline {
                bail!("a Probe request did not end within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let log = daemon.log_text();
    daemon.stop().await?;
    let epoch = database.epoch_seconds("started_at");
    let (clock, id) = match backend {
        Backend::Sqlite => ("CAST(result_text AS REAL)", "CAST(id AS REAL)"),
        Backend::Postgres => ("result_text::float8", "id::float8"),
        Backend::Mysql => ("CAST(result_text AS DOUBLE)", "CAST(id AS DOUBLE)"),
    };
    let column = |expression: &str| {
        format!(
            "SELECT {expression} FROM task_runner_requests WHERE result = 'FINISHED' ORDER BY id"
        )
    };
    let ids = database.floats(&column(id)).await?;
    let started_at = database.floats(&column(&epoch)).await?;
    let runs_ns = database.floats(&column(clock)).await?;
    database.close().await;
    if ids.len() != count {
        bail!("only {} of {count} Probe requests finished", ids.len());
    }
    let times = start_times(&log);
    let mut delays = Vec::new();
    let mut steps = Vec::new();
    for ((id, started_at), run_ns) in ids.iter().zip(&started_at).zip(&runs_ns) {
        delays.push((run_ns / 1e9 - started_at) * 1000.0);
        let Some(&[sent, returned, launched, asked, handed_off, created, spawned]) =
            times.get(&(*id as i64))
        else {
            continue;
        };
        // Milliseconds from `from` to `to`, both in ns since the epoch.
        let between = |from: u64, to: f64| (to - from as f64) / 1e6;
        steps.push(Steps {
            started_at_after_sent: between(sent, started_at * 1e9),
            claim: between(sent, returned as f64),
            to_supervisor: between(returned, launched as f64),
            to_spawner: between(launched, asked as f64),
            hand_off: between(asked, handed_off as f64),
            create: between(handed_off, created as f64),
            back_on_runtime: between(created, spawned as f64),
            to_run: between(created, *run_ns),
            claimed_to_run: between(returned, *run_ns),
        });
    }
    if steps.len() != count {
        bail!(
            "the daemon logged the start times of {} of {count} tries",
            steps.len()
        );
    }
    delays.sort_by(f64::total_cmp);
    Ok((delays, steps))
}

/// The probe with a 200 ms setup: 20 tries exec'd, 200 preloaded, one at a time.
async fn slow_start(bench: &Bench, backend: Backend) -> Result<SlowStart> {
    let mut per_try = Vec::new();
    for (preload, rows) in [(false, 20), (true, 200)] {
        let dir = bench.case_dir(&format!("slow-{backend:?}-{preload}").to_lowercase())?;
        let database = bench.database(backend, &dir).await?;
        database
            .bulk_insert(
                rows,
                &[("task_class_name", "'Probe'"), ("options", "'quiet: true'")],
            )
            .await?;
        let daemon = Daemon::start(
            bench,
            &dir,
            &database.url,
            &format!(
                "max_concurrent: 1\nenv: {{PROBE_SETUP_MS: '200'}}\nprograms: [{{path: {}, preload: {preload}}}]\n",
                bench.binary(PROBE).display()
            ),
        )
        .await?;
        database
            .wait_finished(rows, Duration::from_secs(120))
            .await?;
        daemon.stop().await?;
        let rate = finished_rate(&database, rows).await?;
        database.close().await;
        per_try.push(Duration::from_secs_f64(1.0 / rate));
    }
    Ok(SlowStart {
        backend,
        exec_per_try: per_try[0],
        preload_per_try: per_try[1],
    })
}

pub fn tables(results: &Results, rows: usize) -> Vec<Table> {
    let mut throughput = Table::new(
        &format!("Preload: {rows} NoOp requests, each try forked from a preloaded parent"),
        &[
            "backend",
            "max_concurrent",
            "tasks/s",
            "exec spawn ceiling/s",
            "× exec ceiling",
            "fork-only ceiling/s",
            "of fork ceiling",
            "daemon CPU ms/task",
            "daemon peak RSS",
            "parent peak RSS",
        ],
    );
    for case in &results.cases {
        throughput.row(vec![
            case.backend.name().to_string(),
            case.concurrency.to_string(),
            format!("{:.0}", case.rate),
            format!("{:.0}", case.exec_ceiling),
            format!("{:.2}×", case.rate / case.exec_ceiling),
            format!("{:.0}", case.fork_ceiling),
            format!("{:.0}%", 100.0 * case.rate / case.fork_ceiling),
            ms(case.daemon.cpu.as_secs_f64() * 1000.0 / rows.max(1) as f64),
            format!("{:.1} MiB", case.daemon.peak_rss_kib as f64 / 1024.0),
            format!("{:.1} MiB", case.parent_rss_kib as f64 / 1024.0),
        ]);
    }
    throughput.note(
        "One round per case (`tasks: {NoOp: {preload: true}}`). tasks/s: rows ÷ (last completed_at − first started_at). \
         Exec spawn ceiling: as in the throughput table (posix_spawn of the NoOp binary, waited for), measured right before; \
         fork-only ceiling: the bench forking a child that exits at once and waiting for it, same concurrency, no daemon. \
         Targets at max_concurrent 8: ≥ 2× the exec ceiling, ≥ 70% of the fork ceiling. \
         Memory: VmHWM of the daemon and of the preloaded parent (taskrunner-builtin-tasks) at the end of the drain.",
    );
    let mut latency = Table::new(
        "Preload: claim-to-start, one request at a time into an idle daemon",
        &[
            "backend",
            "tries, measured",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
        ],
    );
    for case in &results.latencies {
        let at = |q: f64| {
            let delays = &case.delays_ms;
            delays[((delays.len() as f64 - 1.0) * q).round() as usize]
        };
        latency.row(vec![
            case.backend.name().to_string(),
            format!(
                "{}, started_at → run",
                if case.preload { "preloaded" } else { "exec'd" }
            ),
            ms(at(0.5)),
            ms(at(0.95)),
            ms(at(0.99)),
            ms(at(1.0)),
        ]);
    }
    latency.note(
        "started_at → run: the probe program (examples/src/preload_probe.rs) reads the wall clock first thing in its task's `run`; \
         started_at is written by the claim, by the database's clock, on the same machine. \
         SQLite stores started_at in whole milliseconds, so its values are ± 1 ms; PostgreSQL's and MariaDB's are microseconds. \
         The claim's commit (on PostgreSQL and MariaDB a log flush) is inside this measure; the next table splits it.",
    );
    for case in &results.latencies {
        let mut values: Vec<f64> = case.steps.iter().map(|s| s.claimed_to_run).collect();
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize];
        latency.row(vec![
            case.backend.name().to_string(),
            format!(
                "{}, claim's rows back → run",
                if case.preload { "preloaded" } else { "exec'd" }
            ),
            ms(at(0.5)),
            ms(at(0.95)),
            ms(at(0.99)),
            ms(at(1.0)),
        ]);
    }
    for (values, gap) in [
        (&results.floor_ms, FLOOR_GAP),
        (&results.floor_idle_ms, FLOOR_IDLE_GAP),
    ] {
        if values.is_empty() {
            continue;
        }
        let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize];
        latency.row(vec![
            "none".to_string(),
            format!(
                "preloaded, no daemon: request sent → run, {} ms after the last",
                gap.as_millis()
            ),
            ms(at(0.5)),
            ms(at(0.95)),
            ms(at(0.99)),
            ms(at(1.0)),
        ]);
    }
    latency.note(
        "claim's rows back → run: from the moment the daemon holds the claimed row (its claim committed and returned) \
         to the task's `run`, both by the machine's wall clock. Target: p50 under 0.3 ms preloaded. \
         no daemon: the bench itself sends the probe's preloaded parent its requests (pipes made, options written, \
         then the request sent and timed), no database, no daemon: the floor of a preloaded start on this machine \
         (the parent's wake-up, its fork, the child's set-up up to `run`). Each request is sent 2 ms after the last one's \
         end, about as soon as the daemon's here (the next row is inserted once the bench, polling every 2 ms, sees the last \
         one end), and again 20 ms after: a request into a machine that was idle for a while costs more (cold caches, \
         the CPUs' idle states)."
    );
    let mut steps = Table::new(
        "Preload: where claim-to-start goes, step by step (p50 of each step, ms)",
        &[
            "backend",
            "tries",
            "started_at after claim sent",
            "claim (statement + commit)",
            "rows back → slot (set-up first)",
            "slot → spawner asked",
            "hand-off",
            "create",
            "created → run",
            "created → back on runtime",
        ],
    );
    for case in &results.latencies {
        let p50 = |step: fn(&Steps) -> f64| {
            let mut values: Vec<f64> = case.steps.iter().map(step).collect();
            values.sort_by(f64::total_cmp);
            ms(values[(values.len() - 1) / 2])
        };
        steps.row(vec![
            case.backend.name().to_string(),
            if case.preload { "preloaded" } else { "exec'd" }.to_string(),
            p50(|s| s.started_at_after_sent),
            p50(|s| s.claim),
            p50(|s| s.to_supervisor),
            p50(|s| s.to_spawner),
            p50(|s| s.hand_off),
            p50(|s| s.create),
            p50(|s| s.to_run),
            p50(|s| s.back_on_runtime),
        ]);
    }
    steps.note(
        "From the daemon's debug line per try (TASKRUNNER_LOG=info,taskrunner::start_timing=debug), by the wall clock. \
         started_at after claim sent: where the row's started_at (the database's clock) falls after the daemon sent the claim \
         (PostgreSQL's now() is its transaction's start; SQLite truncates to the millisecond, so it can fall before). \
         hand-off: exec'd, the request taken by a spawner thread; preloaded, the request (pipes, message) sent to the parent. \
         create: exec'd, clone until the child's execve released the spawner thread; preloaded, the parent's fork until its answer arrived. \
         created → run: exec'd, the rest of execve, dynamic loading and main; preloaded, the child after its fork \
         (it runs while the answer travels, so this can be near zero or negative). \
         created → back on runtime: the runtime's thread holds the child (pidfd registered), in parallel with the task.",
    );
    let mut slow = Table::new(
        "Preload: a program whose setup takes 200 ms (max_concurrent 1)",
        &["backend", "exec'd ms/try", "preloaded ms/try", "speed-up"],
    );
    for case in &results.slow_starts {
        slow.row(vec![
            case.backend.name().to_string(),
            ms(case.exec_per_try.as_secs_f64() * 1000.0),
            ms(case.preload_per_try.as_secs_f64() * 1000.0),
            format!(
                "{:.0}×",
                case.exec_per_try.as_secs_f64() / case.preload_per_try.as_secs_f64()
            ),
        ]);
    }
    slow.note(
        "The probe with PROBE_SETUP_MS=200 (Tasks::setup sleeps 200 ms): 20 tries exec'd, 200 preloaded, drained one at a time. Target: ≥ 50×.",
    );
    vec![throughput, latency, steps, slow]
}
