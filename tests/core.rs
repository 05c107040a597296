//! The core contract: rows inserted by plain SQL run in their own process,
//! and the row records what happened.

use std::time::Duration;

use crate::util::{cli, most_at_once, poll, wait_until, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(20);

/// A daemon idle on its own: no poll, a lease renewal every 10 s.
const QUIET_DAEMON: &str = "poll_interval: 60s\nheartbeat_interval: 10s\nlease_timeout: 30s\n";

both_backends!(
    plain_sql_noop_finishes,
    failing_command_retries_with_backoff,
    a_types_own_backoff_and_jitter_spread_its_retries,
    a_failed_task_that_names_its_next_tries_delay_gets_it,
    future_delay_until_in_iso_form_is_honoured,
    extra_application_column_disturbs_nothing,
    invalid_yaml_is_rejected_and_unknown_types_fail,
    max_concurrent_is_never_exceeded,
    sigterm_drains_then_interrupts,
    activerecord_timestamps_and_ruby_yaml_work,
    cli_enqueue_list_show_retry_cancel_purge,
    large_options_reach_the_task_whole,
    a_row_inserted_by_another_process_starts_at_once,
    an_exhausted_row_given_more_tries_by_plain_sql_starts_at_once,
);

async fn plain_sql_noop_finishes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let bare = db.insert_row(NewRow::new("NoOp")).await;
    let with_options = db
        .insert_row(NewRow::new("NoOp").options("created_from: psql"))
        .await;
    for (id, text) in [
        (bare, format!("NOOP {bare}: OK!")),
        (
            with_options,
            format!("NOOP {with_options}: OK! created from: psql"),
        ),
    ] {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1);
        assert_eq!(row.pid, None);
        assert_eq!(row.result_text.as_deref(), Some(text.as_str()));
        assert!(row.started_at.is_some() && row.completed_at.is_some() && row.host.is_some());
    }
    assert!(daemon.stop().success());
    // A finished try gets no line of its own at the default level; the
    // tries that ended are summed up (here at shutdown).
    let log = daemon.log_text();
    assert!(
        log.contains("2 tries ended in the last") && log.contains(": 2 finished"),
        "log:\n{log}"
    );
}

/// Options far beyond a pipe's capacity reach the task byte for byte (the
/// daemon writes the rest while the task reads), and a task that never reads
/// its options still finishes.
async fn large_options_reach_the_task_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Count:\n    command: [/usr/bin/wc, -c]\n  Ignore:\n    command: [/bin/true]\n",
    );
    let options = format!("data: {}", "x".repeat(300_000));
    let counted = db.enqueue("Count", Some(&options)).await;
    let ignored = db.enqueue("Ignore", Some(&options)).await;
    let row = db.wait_for_state(counted, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.as_deref().map(str::trim),
        Some(options.len().to_string().as_str())
    );
    db.wait_for_state(ignored, "FINISHED", WAIT).await;
    assert!(daemon.stop().success(), "log:\n{}", daemon.log_text());
}

async fn failing_command_retries_with_backoff(backend: Backend) {
    let db = TestDb::new(backend).await;
    let tries_log = db.scratch.join("tries.log");
    let mut daemon = db
        .daemon("d")
        .set("retry_delay", "1s")
        .set("retry_multiplier", 2)
        .shell_task(
            "Flaky",
            &format!(
                "date +%s.%N >> {}; echo \"it broke on try $TASKRUNNER_TRY\" >&2; exit 1",
                tries_log.display()
            ),
        )
        .start();
    let id = db.insert_row(NewRow::new("Flaky").try_limit(3)).await;
    let row = db
        .wait_for(id, WAIT, "exhausted", |r| {
            r.tries == 3 && r.result.as_deref() == Some("FAILED") && r.pid.is_none()
        })
        .await;
    let text = row.result_text.unwrap();
    assert!(text.starts_with("exit status 1\n"), "{text}");
    assert!(text.contains("it broke on try 3"), "{text}");
    let starts: Vec<f64> = std::fs::read_to_string(&tries_log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 3);
    // retry_delay × multiplier^(tries-1): 1s after the first, 2s after the second.
    let gaps = [starts[1] - starts[0], starts[2] - starts[1]];
    assert!((1.0..1.9).contains(&gaps[0]), "first gap {gaps:?}");
    assert!((2.0..2.9).contains(&gaps[1]), "second gap {gaps:?}");
    // Exhausted: left alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db.row(id).await.tries, 3);
    assert!(daemon.stop().success());
}

/// `retry_delay`, `retry_multiplier` and `retry_jitter` are task settings:
/// a type's own take the place of the top level's. Twenty rows of a type
/// with 100 s ± 50% that failed together come back spread over that
/// window, each within it; a row of a type without its own waits the top
/// level's hour.
async fn a_types_own_backoff_and_jitter_spread_its_retries(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = db
        .daemon("d")
        .set("retry_delay", "1h")
        .task("Plain", &["/bin/false"], "")
        .task(
            "Spread",
            &["/bin/false"],
            "retry_delay: 100s\nretry_jitter: 50%\n",
        )
        .start();
    let plain = db.insert_row(NewRow::new("Plain").try_limit(2)).await;
    let mut spread = Vec::new();
    for _ in 0..20 {
        spread.push(db.insert_row(NewRow::new("Spread").try_limit(2)).await);
    }
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FAILED' AND tries = 1",
        21,
        WAIT,
    )
    .await;
    assert!(daemon.stop().success());
    let waits = |id: taskrunner::request::RequestId| {
        let seconds = match backend {
            Backend::Sqlite => {
                "CAST(round((julianday(delay_until) - julianday(completed_at)) * 86400) AS INTEGER)"
            }
            Backend::Postgres => "round(extract(epoch from delay_until - completed_at))::bigint",
            Backend::MySql => {
                "ROUND(TIMESTAMPDIFF(MICROSECOND, completed_at, delay_until) / 1000000)"
            }
        };
        let sql = format!("SELECT {seconds} FROM task_runner_requests WHERE id = {id}");
        let db = &db;
        async move { db.scalar(&sql).await }
    };
    assert_eq!(waits(plain).await, 3600);
    let mut delays = Vec::new();
    for id in spread {
        delays.push(waits(id).await);
    }
    assert!(
        delays.iter().all(|delay| (50..=150).contains(delay)),
        "{delays:?}"
    );
    delays.sort();
    delays.dedup();
    assert!(delays.len() >= 10, "not spread: {delays:?}");
}

/// A failing task that writes `retry_after: 2s` on standard error (a
/// rate-limited API's `Retry-After`) is tried again 2 s later, not after
/// the hour of its type's backoff; the try counts.
async fn a_failed_task_that_names_its_next_tries_delay_gets_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = db
        .daemon("d")
        .set("retry_delay", "1h")
        .shell_task(
            "RateLimited",
            "echo 'HTTP 429'; echo 'retry_after: 2s' >&2; exit 1",
        )
        // Past what a duration may be (a hundred years): at most a day
        // still (before, the line was passed over: the backoff, 1 h).
        .shell_task("Patient", "echo 'retry_after: 40000d' >&2; exit 1")
        .start();
    let patient = db.insert_row(NewRow::new("Patient").try_limit(2)).await;
    let started = std::time::Instant::now();
    let id = db.insert_row(NewRow::new("RateLimited").try_limit(2)).await;
    let row = db
        .wait_for(id, WAIT, "two failed tries", |r| {
            r.tries == 2 && r.result.as_deref() == Some("FAILED")
        })
        .await;
    let took = started.elapsed();
    assert!(
        row.result_text
            .as_deref()
            .unwrap_or_default()
            .contains("retry_after: 2s"),
        "{row:#?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "the second try came after {took:?}"
    );
    let log = daemon.log_text();
    assert!(log.contains("retry in 2.0s"), "{log}");
    db.wait_for(patient, WAIT, "a failed try", |r| r.tries == 1)
        .await;
    daemon.wait_for_log("retry in 86400.0s", WAIT);
    assert!(daemon.stop().success());
}

async fn future_delay_until_in_iso_form_is_honoured(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let due = chrono::Utc::now() + chrono::Duration::seconds(3);
    let mut iso = due.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    if backend == Backend::MySql {
        // MariaDB's DATETIME refuses a zone suffix (strict mode): the
        // insert fails loudly and stores nothing; the ISO form without it
        // (UTC, as the session's time zone is) is read right. (By hand: a
        // refused insert, the text as an application sends it.)
        let refused = db
            .try_execute(&format!(
                "INSERT INTO task_runner_requests (task_class_name, delay_until) VALUES ('NoOp', '{iso}')"
            ))
            .await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("Incorrect datetime value")),
            "{refused:?}"
        );
        assert_eq!(
            db.scalar("SELECT count(*) FROM task_runner_requests").await,
            0
        );
        iso = due.format("%Y-%m-%dT%H:%M:%S").to_string();
    }
    let id = db.insert_row(NewRow::new("NoOp").delay_until(&iso)).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let started = chrono::NaiveDateTime::parse_from_str(
        row.started_at.as_deref().unwrap(),
        "%Y-%m-%d %H:%M:%S%.f",
    )
    .unwrap()
    .and_utc();
    let due_whole_second = due.with_nanosecond_zero();
    assert!(
        started >= due_whole_second,
        "started {started} before {due_whole_second}"
    );
    assert!(
        started < due_whole_second + chrono::Duration::milliseconds(1500),
        "started late: {started}"
    );
    assert!(daemon.stop().success());
}

trait NanoZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl NanoZero for chrono::DateTime<chrono::Utc> {
    fn with_nanosecond_zero(self) -> Self {
        chrono::Timelike::with_nanosecond(&self, 0).unwrap()
    }
}

async fn extra_application_column_disturbs_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.execute("ALTER TABLE task_runner_requests ADD COLUMN tenant TEXT NOT NULL DEFAULT 'acme'")
        .await;
    let mut daemon = Daemon::start(&db, "d", "");
    let id = db.enqueue("NoOp", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.unwrap(), format!("NOOP {id}: OK!"));
    let (status, stdout, _) = cli(&db, &["show", &id.to_string()]);
    assert_eq!(status, 0);
    assert!(stdout.contains("FINISHED"));
    assert!(daemon.stop().success());
}

async fn invalid_yaml_is_rejected_and_unknown_types_fail(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran");
    let mut daemon = db
        .daemon("d")
        .set("retry_delay", "30s")
        .task("Touch", &["/usr/bin/touch", &ran.display().to_string()], "")
        .start();
    let rejected = db.enqueue("Touch", Some("key: [unclosed")).await;
    let unknown = db.enqueue("Thumbnail", None).await;
    let row = db.wait_for_state(rejected, "REJECTED", WAIT).await;
    assert!(row.result_text.unwrap().contains("not valid YAML"));
    assert_eq!(row.tries, 1);
    assert!(!ran.exists(), "a rejected request must not run its command");
    let row = db.wait_for_state(unknown, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.contains("unknown task type `Thumbnail`"), "{text}");
    assert!(text.contains("NoOp") && text.contains("Touch"), "{text}");
    assert!(
        row.delay_until.is_some(),
        "an unknown type is retried after the backoff"
    );
    assert!(daemon.stop().success());
}

async fn max_concurrent_is_never_exceeded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("intervals.log");
    let mut daemon = db
        .daemon("d")
        .set("max_concurrent", 2)
        .shell_task(
            "Nap",
            &format!(
                "echo start $(date +%s%N) >> {log}; sleep 0.3; echo end $(date +%s%N) >> {log}",
                log = log.display()
            ),
        )
        .start();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(db.enqueue("Nap", None).await);
    }
    for id in &ids {
        db.wait_for_state(*id, "FINISHED", WAIT).await;
    }
    let (_, most) = most_at_once(&log);
    assert_eq!(
        most, 2,
        "at most two tasks at once, and two did run together"
    );
    assert!(daemon.stop().success());
}

async fn sigterm_drains_then_interrupts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "shutdown_timeout: 1s\ntasks:\n  Long:\n    command: [/bin/sleep, '60']\n",
    );
    let id = db.enqueue("Long", None).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let started = std::time::Instant::now();
    let status = daemon.stop();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.log_text()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "the daemon must drain for shutdown_timeout first ({waited:?})"
    );
    let row = db.row(id).await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"));
    assert_eq!(row.tries, 0, "an interrupted try is given back");
    assert_eq!(row.pid, None);
    assert_eq!(row.started_at, running.started_at, "started_at is kept");
    assert!(row.completed_at.is_some());
    assert!(
        row.delay_until.is_none(),
        "an interrupted row runs again at once"
    );
    assert!(!crate::util::process_exists(running.pid.unwrap() as i32));
}

async fn activerecord_timestamps_and_ruby_yaml_work(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "tasks:\n  Echo:\n    command: [/bin/cat]\n");
    let ruby = "--- !ruby/hash:ActiveSupport::HashWithIndifferentAccess\n:created_from: rails\n:sizes:\n- 1\n- 2\n:mode: !ruby/sym fast\n";
    let noop = db
        .insert_row(
            NewRow::new("NoOp")
                .options(ruby)
                .text("created_at", "2026-11-24 07:00:00.123456")
                .delay_until("2020-01-01 07:00:00.123456"),
        )
        .await;
    let echo = db.enqueue("Echo", Some(ruby)).await;
    let row = db.wait_for_state(noop, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.unwrap(),
        format!("NOOP {noop}: OK! created from: rails")
    );
    assert!(row
        .created_at
        .unwrap()
        .starts_with("2026-11-24 07:00:00.123"));
    assert!(
        row.delay_until.is_none()
            || row
                .delay_until
                .unwrap()
                .starts_with("2020-01-01 07:00:00.123")
    );
    let row = db.wait_for_state(echo, "FINISHED", WAIT).await;
    // Options reach a command byte for byte (less the one trailing newline).
    assert_eq!(row.result_text.unwrap(), ruby.trim_end_matches('\n'));
    assert!(daemon.stop().success());
}

async fn cli_enqueue_list_show_retry_cancel_purge(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (status, stdout, stderr) = cli(
        &db,
        &[
            "enqueue",
            "NoOp",
            "--options",
            "created_from: cli",
            "--delay",
            "1h",
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    let delayed: i64 = stdout.trim().parse().expect("enqueue prints the id alone");
    let (_, stdout, _) = cli(&db, &["list"]);
    assert!(stdout.lines().next().unwrap().starts_with("ID"), "{stdout}");
    assert!(stdout.contains("pending (due 20"), "{stdout}");
    assert_eq!(cli(&db, &["cancel", &delayed.to_string()]).0, 0);
    assert_eq!(
        db.row(taskrunner::request::RequestId(delayed))
            .await
            .result
            .as_deref(),
        Some("CANCELLED")
    );
    let (status, _, stderr) = cli(&db, &["cancel", &delayed.to_string()]);
    assert_eq!(status, 1);
    assert!(stderr.contains("already CANCELLED"), "{stderr}");
    assert_eq!(cli(&db, &["retry", &delayed.to_string()]).0, 0);
    let row = db.row(taskrunner::request::RequestId(delayed)).await;
    assert_eq!((row.result, row.tries, row.delay_until), (None, 0, None));
    // Bad ids: unknown is 1, non-numeric is 2; one line, no panic.
    let (status, _, stderr) = cli(&db, &["show", "999999"]);
    assert_eq!(status, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(cli(&db, &["show", "x"]).0, 2);
    // run a stored request without touching the row
    let (status, stdout, _) = cli(&db, &["run", "--id", &delayed.to_string()]);
    assert_eq!(status, 0);
    assert_eq!(
        stdout.trim(),
        format!("NOOP {delayed}: OK! created from: cli")
    );
    assert_eq!(
        db.row(taskrunner::request::RequestId(delayed)).await.result,
        None
    );
    let (status, _, stderr) = cli(&db, &["run", "--id", &delayed.to_string(), "--record"]);
    assert_eq!(status, 0, "{stderr}");
    let row = db.row(taskrunner::request::RequestId(delayed)).await;
    assert_eq!((row.result.as_deref(), row.tries), (Some("FINISHED"), 1));
    // purge keeps young rows, removes old ones
    let (_, stdout, _) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(stdout.trim(), "deleted 0 requests");
    db.execute("UPDATE task_runner_requests SET completed_at = '2020-01-01 00:00:00'")
        .await;
    let (_, stdout, _) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(stdout.trim(), "deleted 1 requests");
}

multi_host_backends!(two_daemons_on_postgres_run_every_row_exactly_once);

async fn two_daemons_on_postgres_run_every_row_exactly_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran.log");
    let task = format!(
        "max_concurrent: 4\ntasks:\n  Append:\n    command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {}']\n",
        ran.display()
    );
    let mut first = Daemon::start(&db, "first", &task);
    let mut second = Daemon::start(&db, "second", &task);
    db.insert_copies(NewRow::new("Append"), 500).await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        500,
        Duration::from_secs(120),
    )
    .await;
    let mut seen: Vec<i64> = std::fs::read_to_string(&ran)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    seen.sort();
    let total = seen.len();
    seen.dedup();
    assert_eq!(total, 500, "every id exactly once");
    assert_eq!(seen.len(), 500);
    assert_eq!(
        db.scalar("SELECT count(DISTINCT host || claimed_by) FROM task_runner_requests")
            .await,
        2,
        "both daemons took part"
    );
    assert!(first.stop().success());
    assert!(second.stop().success());
}

/// The daemon checkpoints SQLite's write-ahead log on a connection of its
/// own, about once a second: what it writes reaches the database file
/// itself, though its writer would checkpoint only after thousands of pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_is_checkpointed_while_the_daemon_runs() {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};

    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    for id in ids {
        db.wait_for_state(id, "FINISHED", WAIT).await;
    }
    let path = db.url.strip_prefix("sqlite://").unwrap();
    // `immutable` reads the database file alone, without the log.
    let file_only = SqliteConnectOptions::new()
        .filename(path)
        .immutable(true)
        .read_only(true);
    poll(
        WAIT,
        "the database file to hold the 20 finished rows",
        async || {
            let mut connection = file_only.connect().await.unwrap();
            let in_file: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
            )
            .fetch_one(&mut connection)
            .await
            .unwrap_or(0);
            connection.close().await.unwrap();
            match in_file {
                20 => Ok(()),
                in_file => Err(in_file),
            }
        },
    )
    .await;
    assert!(daemon.stop().success());
}

/// A row inserted by another process (Python's sqlite3 module, or `psql`) starts without waiting for a poll: on SQLite the daemon watches the
/// write-ahead log. Broken, SQLite rows wait for the once-a-second safety
/// check (about 500 ms on average); the deadline is generous against a loaded
/// machine, the numbers are in scripts/bench.
async fn a_row_inserted_by_another_process_starts_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "poll_interval: 60s\n");
    let delays = delays_of_rows_inserted_by_another_process(&db).await;
    assert!(
        delays.iter().all(|&ms| ms < 400),
        "insert-to-start delays (ms): {delays:?}"
    );
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    assert!(!log.contains("write-ahead log"), "log:\n{log}");
}

/// The same when the daemon's `database_url` names a symbolic link to the
/// file: SQLite keeps the write-ahead log beside the file the link names,
/// and the watch was on the link's directory, for the link's name: it
/// never fired, and rows waited for the once-a-second safety check
/// without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_row_inserted_by_another_process_starts_at_once_through_a_symbolic_link() {
    let db = TestDb::new(Backend::Sqlite).await;
    let file = db.url.strip_prefix("sqlite://").unwrap();
    let link = db.scratch.join("link-to-the-database.db");
    std::os::unix::fs::symlink(file, &link).unwrap();
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "database_url: sqlite://{}\npoll_interval: 60s\n",
            link.display()
        ),
    );
    let delays = delays_of_rows_inserted_by_another_process(&db).await;
    assert!(
        delays.iter().all(|&ms| ms < 400),
        "insert-to-start delays (ms): {delays:?}"
    );
    assert!(daemon.stop().success());
}

/// Inserts five rows one at a time from another process, each with its
/// database's own command line tool and defaults, waits for each to
/// finish, and returns each one's delay from `created_at` to `started_at`.
async fn delays_of_rows_inserted_by_another_process(db: &TestDb) -> Vec<i64> {
    let backend = db.backend;
    // By hand: the statement another process's own tool sends.
    let insert = "INSERT INTO task_runner_requests (task_class_name) VALUES ('NoOp') RETURNING id;";
    let since = match backend {
        Backend::Sqlite => "(julianday(started_at) - julianday(created_at)) * 86400000.0",
        Backend::Postgres => "extract(epoch from started_at - created_at) * 1000.0",
        Backend::MySql => "TIMESTAMPDIFF(MICROSECOND, created_at, started_at) / 1000.0",
    };
    let mut delays = Vec::new();
    for _ in 0..5 {
        let output = match backend {
            // Python's sqlite3 module, with SQLite's default settings.
            Backend::Sqlite => std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sqlite3, sys\n\
                     db = sqlite3.connect(sys.argv[1])\n\
                     print(db.execute(sys.argv[2]).fetchone()[0])\n\
                     db.commit()",
                    db.url.strip_prefix("sqlite://").unwrap(),
                    insert,
                ])
                .output(),
            Backend::Postgres => std::process::Command::new("psql")
                .args(["-qtA", "-v", "ON_ERROR_STOP=1", &db.url, "-c", insert])
                .output(),
            // The mysql client (MariaDB has INSERT … RETURNING).
            Backend::MySql => crate::util::mysql_client(&db.url, insert),
        }
        .expect("the database's command line tool runs");
        assert!(output.status.success(), "{output:?}");
        let id: i64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("an id from {output:?}"));
        let id = taskrunner::request::RequestId(id);
        db.wait_for_state(id, "FINISHED", WAIT).await;
        let delay_ms = db
            .scalar(&format!(
                "SELECT CAST({since} AS {}) FROM task_runner_requests WHERE id = {id}",
                crate::util::bigint(backend)
            ))
            .await;
        delays.push(delay_ms);
    }
    delays
}

/// An application retries an exhausted row by giving it more tries. On
/// PostgreSQL that sent no NOTIFY (the trigger fired on other columns
/// only), and the row waited for the next poll, a minute by default
/// (migration 0018 there). The other backends noticed it already.
async fn an_exhausted_row_given_more_tries_by_plain_sql_starts_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db
        .insert_row(NewRow::new("NoOp").exhausted(backend, 2, 10))
        .await;
    let sentinel = db.insert_row(NewRow::new("NoOp")).await;
    let mut daemon = Daemon::start(&db, "d", QUIET_DAEMON);
    // Its claims have passed the row by, and it idles.
    db.wait_for_state(sentinel, "FINISHED", WAIT).await;
    crate::util::holds_for(
        Duration::from_secs(1),
        "the row left alone",
        async || match db.row(id).await.tries {
            2 => Ok(()),
            tries => Err(tries),
        },
    )
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET try_limit = try_limit + 1 WHERE id = {}",
        id.0
    ))
    .await;
    let row = db
        .wait_for_state(id, "FINISHED", Duration::from_secs(10))
        .await;
    assert_eq!(row.tries, 3, "{row:?}");
    assert!(daemon.stop().success());
}

/// An idle daemon on SQLite checks for others' rows about once a second
/// (the safety net beside the log watch), not ten times a second as the
/// `data_version` poll did: fewer statements than that poll alone sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sqlite_daemon_does_not_poll_for_changes() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(&db, "d", QUIET_DAEMON);
    let config = daemon.config.to_string_lossy().into_owned();
    let statements = || {
        let (code, out, err) = cli(&db, &["--config", &config, "status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["database_statements"].as_u64().unwrap()
    };
    let before = statements();
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "3 s to pass", || {
        started.elapsed() >= Duration::from_secs(3)
    });
    let sent = statements() - before;
    let seconds = started.elapsed().as_secs_f64();
    // The old poll alone: 10 a second. Now: a change check and a checkpoint
    // a second, a heartbeat now and then.
    assert!(
        (sent as f64) < 5.0 * seconds,
        "{sent} statements in {seconds:.1} s of idling"
    );
    assert!(daemon.stop().success());
}

/// A commit published long after its write to SQLite's write-ahead log
/// (the inserter syncs the log before it publishes the commit, and a sync
/// can take hundreds of milliseconds on a loaded disk) starts its row soon
/// after the commit. The daemon's checks after a write to the log ended
/// 518 ms after it, their delay doubled up to 256 ms: with a sync of 600 ms
/// the row started at the next once-a-second check, about 900 ms after its
/// commit. The slow sync is real: the inserter's `fsync` and `fdatasync`
/// sleep first (a shim preloaded into it). Nothing else may tell the daemon
/// of the commit: a reader holds the log, so that the insert does not
/// restart it (a restart changes `data_version` at once, and the claim
/// that follows waits for the inserter's lock), and the heartbeat writes
/// every 10 s only (a write of the daemon's own, held by that lock, would
/// land right after the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_published_long_after_its_write_to_the_log_starts_at_once() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(&db, "d", QUIET_DAEMON);
    let shim = db.scratch.join("slow_sync.so");
    let source = db.scratch.join("slow_sync.c");
    // The syncs are slow once this file exists.
    let flag = db.scratch.join("slow_sync");
    std::fs::write(
        &source,
        "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <stdlib.h>\n#include <unistd.h>\n\
         static int slow(const char *name, int fd) {\n\
             const char *flag = getenv(\"SLOW_SYNC_FLAG\");\n\
             if (flag && access(flag, F_OK) == 0) usleep(600000);\n\
             int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);\n\
             return real(fd);\n\
         }\n\
         int fsync(int fd) { return slow(\"fsync\", fd); }\n\
         int fdatasync(int fd) { return slow(\"fdatasync\", fd); }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("cc runs (Rust links with it)");
    assert!(built.status.success(), "{built:?}");
    // Python's sqlite3 module with SQLite's default `synchronous=FULL` (the
    // log is synced at each commit). It prints the row's id and when its
    // commit returned.
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\n\
             db = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             reader = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             db.execute('CREATE TABLE filler (x)')\n\
             reader.execute('BEGIN')\n\
             reader.execute('SELECT count(*) FROM filler').fetchone()\n\
             time.sleep(0.3)\n\
             open(sys.argv[2], 'w').close()\n\
             db.execute('BEGIN')\n\
             id = db.execute(\"INSERT INTO task_runner_requests (task_class_name) VALUES ('NoOp') RETURNING id\").fetchall()[0][0]\n\
             db.execute('COMMIT')\n\
             print(id, int(time.time() * 1000))",
        ])
        .arg(db.url.strip_prefix("sqlite://").unwrap())
        .arg(&flag)
        .env("LD_PRELOAD", &shim)
        .env("SLOW_SYNC_FLAG", &flag)
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    let (id, committed_ms) = printed
        .trim()
        .split_once(' ')
        .and_then(|(id, at)| Some((id.parse::<i64>().ok()?, at.parse::<i64>().ok()?)))
        .unwrap_or_else(|| panic!("an id and a time from {output:?}"));
    let id = taskrunner::request::RequestId(id);
    db.wait_for_state(id, "FINISHED", WAIT).await;
    let started_ms = db
        .scalar(&format!(
            "SELECT CAST((julianday(started_at) - 2440587.5) * 86400000.0 AS INTEGER) \
             FROM task_runner_requests WHERE id = {id}"
        ))
        .await;
    let late = started_ms - committed_ms;
    println!("started {late} ms after its commit returned");
    assert!(late < 200, "started {late} ms after its commit returned");
    assert!(daemon.stop().success());
}
