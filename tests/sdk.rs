//! Task types written with task-sdk (the `example-tasks` program of
//! `examples/`), run by the real daemon: typed options, panics, rejected
//! options, retries, progress and a clean stop, duplicate names at start,
//! `taskrunner-cli run`, the typed enqueue inside a transaction, and waiting
//! for a request's final result through the SDK.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use task_sdk::wait::Target;
use task_sdk::{wait_for, Batch, Context, Enqueue, FinalState, Task, WaitError};

use crate::util::{poll_every, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(20);

both_backends!(
    typed_options_arrive_intact_from_ruby_yaml,
    a_panic_fails_the_try_with_its_message,
    options_that_do_not_fit_are_rejected,
    flaky_step_finishes_on_its_second_try,
    word_count_reads_a_file_and_writes_a_report,
    countdown_reports_progress_and_cleans_up_when_stopped,
    a_task_name_registered_twice_stops_the_daemon_at_start,
    typed_enqueue_commits_with_the_callers_transaction,
    sdk_wait_returns_the_result_as_the_task_ends,
    sdk_wait_returns_an_exhausted_failure_and_a_rejection,
    sdk_wait_times_out_and_knows_missing_requests,
    a_batch_with_a_bad_member_inserts_nothing,
);

/// The example task program, built beside the daemon by
/// `cargo build --workspace --bins` (scripts/test does that first).
fn example_tasks() -> PathBuf {
    crate::util::built_beside_the_daemon("example-tasks")
}

fn with_example_tasks(extra: &str) -> String {
    format!("programs: [{}]\n{extra}", example_tasks().display())
}

/// What `Inspect` echoes for the options below, written as plain YAML.
const INSPECTED: &str = "
name: nightly
tags: [fast, db]
limits: { cpu: 2, memory_mb: 512 }
owner: { name: Ada, email: ada@example.com }
steps:
  - { run: backup, args: ['--full', '--to=s3'], env: { REGION: eu-west-1 } }
  - { run: verify, args: [], env: {} }
dry_run: true
";

/// The same options as Ruby's `to_yaml` writes a HashWithIndifferentAccess
/// with symbol keys.
const RUBY_OPTIONS: &str = "--- !ruby/hash:ActiveSupport::HashWithIndifferentAccess
:name: nightly
:tags:
- !ruby/sym fast
- db
:limits:
  :cpu: 2
  :memory_mb: 512
:owner: !ruby/hash:ActiveSupport::HashWithIndifferentAccess
  :name: Ada
  :email: ada@example.com
:steps:
- :run: backup
  :args:
  - \"--full\"
  - \"--to=s3\"
  :env:
    :REGION: eu-west-1
- :run: verify
:dry_run: true
";

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn typed_options_arrive_intact_from_ruby_yaml(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let ruby = db.enqueue("Inspect", Some(RUBY_OPTIONS)).await;
    let plain = db.enqueue("Inspect", Some(INSPECTED)).await;
    for id in [ruby, plain] {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1);
        assert_eq!(
            yaml(row.result_text.as_deref().unwrap()),
            yaml(INSPECTED),
            "request {id}"
        );
    }
    assert!(daemon.stop().success());
}

async fn a_panic_fails_the_try_with_its_message(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let id = db
        .insert_row(
            NewRow::new("Explode")
                .options("message: the reactor is on fire")
                .try_limit(1),
        )
        .await;
    let row = db.wait_for_state(id, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.starts_with("exit status 1\n"), "{text}");
    assert!(text.contains("panicked at examples/src/main.rs:"), "{text}");
    assert!(text.contains(": the reactor is on fire"), "{text}");
    assert!(
        !text.contains("RUST_BACKTRACE"),
        "one line, no backtrace note: {text}"
    );
    assert_eq!(row.tries, 1);
    assert!(daemon.stop().success());
}

async fn options_that_do_not_fit_are_rejected(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let wrong_type = db.enqueue("Countdown", Some("from: soon")).await;
    let misspelt = db.enqueue("Countdown", Some(":form: 3")).await;
    let missing = db.enqueue("Inspect", Some("tags: [a]")).await;
    for (id, needle) in [(wrong_type, "from"), (misspelt, "form"), (missing, "name")] {
        let row = db.wait_for_state(id, "REJECTED", WAIT).await;
        let text = row.result_text.unwrap();
        assert!(text.starts_with("exit status 65"), "{text}");
        assert!(text.contains("options do not fit"), "{text}");
        assert!(text.contains(needle), "{text}");
        assert_eq!(row.tries, 1, "a rejected request is not retried");
    }
    assert!(daemon.stop().success());
}

async fn flaky_step_finishes_on_its_second_try(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks("retry_delay: 1s\n"));
    let id = db.enqueue("FlakyStep", Some("step: charge card")).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2);
    assert_eq!(
        row.result_text.as_deref(),
        Some("step `charge card` succeeded on try 2")
    );
    // The first try's error chain was on the row in between; the daemon logs it too.
    let log = daemon.log_text();
    assert!(
        log.contains(
            "step `charge card` failed on try 1: calling the upstream service: connection refused"
        ),
        "{log}"
    );
    assert!(daemon.stop().success());
}

async fn word_count_reads_a_file_and_writes_a_report(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let input = db.scratch.join("poem.txt");
    let report = db.scratch.join("poem.counts");
    std::fs::write(&input, "So much depends\nupon\na red wheel\nbarrow\nglazed with rain\nwater\nbeside the white\nchickens. So so.\n").unwrap();
    let options = format!(
        "input: {}\noutput: {}\ntop: 2\nignore: [the, a]\n",
        input.display(),
        report.display()
    );
    let id = db.enqueue("WordCount", Some(&options)).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let text = row.result_text.unwrap();
    assert_eq!(
        text,
        format!(
            "16 words, 14 distinct in {}; top: so (3), barrow (1)",
            input.display()
        )
    );
    let written = std::fs::read_to_string(&report).unwrap();
    assert!(written.starts_with("so 3\nbarrow 1\n"), "{written}");
    let missing = db
        .enqueue("WordCount", Some("input: no-such-file.txt"))
        .await;
    let row = db.wait_for_state(missing, "FAILED", WAIT).await;
    assert!(row
        .result_text
        .unwrap()
        .contains("reading no-such-file.txt: No such file"));
    assert!(daemon.stop().success());
}

async fn countdown_reports_progress_and_cleans_up_when_stopped(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks("timeout: 2s\n"));
    let short = db
        .enqueue("Countdown", Some("from: 3\ninterval_ms: 100"))
        .await;
    let row = db.wait_for_state(short, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("liftoff after 3 steps"));
    let long = db
        .enqueue("Countdown", Some("from: 100\ninterval_ms: 200"))
        .await;
    let row = db
        .wait_for(long, WAIT, "counting down", |row| {
            row.progress
                .as_deref()
                .is_some_and(|p| p.ends_with(" left"))
        })
        .await;
    assert_eq!(row.result.as_deref(), Some("RUNNING"));
    // The timeout's SIGTERM sets the stop flag; the task logs its clean-up and returns.
    let row = db.wait_for_state(long, "TIMEOUT", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.contains("cleaning up: stopped with"), "{text}");
    assert!(daemon.stop().success());
}

async fn a_task_name_registered_twice_stops_the_daemon_at_start(backend: Backend) {
    let db = TestDb::new(backend).await;
    let original = example_tasks();
    let copy = db.scratch.join("other-tasks");
    crate::util::copy_executable(&original, &copy);
    for (name, extra, expected) in [
        (
            "two-programs",
            format!("programs: [{}, {}]\n", original.display(), copy.display()),
            format!(
                "task type `WordCount` is registered twice: by {} and by {}",
                original.display(),
                copy.display()
            ),
        ),
        (
            "program-and-config",
            with_example_tasks("tasks:\n  Countdown:\n    command: [/bin/true]\n"),
            format!(
                "task type `Countdown` is registered twice: by {} and by the config's `tasks:`",
                original.display()
            ),
        ),
    ] {
        let dir = db.scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(
            &config,
            crate::util::merge_yaml(&crate::util::base_config(&db, &dir), &extra),
        )
        .unwrap();
        let mut daemon = Daemon::start_with_config(&config, &[]);
        let status = daemon.wait_exit(WAIT);
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(log.contains(&expected), "expected `{expected}` in:\n{log}");
        assert!(!log.contains("taskrunnerd started"), "{log}");
    }
}

/// The application's own copy of the type's options (an application that
/// links the task program's types would use them directly).
#[derive(Serialize, Deserialize)]
struct InspectOptions {
    name: String,
    tags: Vec<String>,
    limits: BTreeMap<String, u64>,
    owner: Option<Owner>,
    steps: Vec<Step>,
    dry_run: bool,
}

#[derive(Serialize, Deserialize)]
struct Owner {
    name: String,
    email: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Step {
    run: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

struct Inspect;

impl Task for Inspect {
    const NAME: &'static str = "Inspect";
    type Options = InspectOptions;
    fn run(&self, _: InspectOptions, _: &Context) -> task_sdk::Result<String> {
        unreachable!("runs in example-tasks")
    }
}

/// Inserts through the application's pool inside a transaction that rolls
/// back, then inside one that commits; returns (rows seen inside the
/// rolled-back transaction, rows after its rollback, the committed ids).
/// The same code for both backends: sqlx needs the concrete pool type, so a
/// macro. (Ids are compared by count, not by id: SQLite hands a rolled-back
/// id out again.)
macro_rules! enqueue_in_transactions {
    ($pool:expr, $options:expr) => {{
        let pool = $pool;
        let count = "SELECT count(*) FROM task_runner_requests";
        let mut rolled_back = pool.begin().await.unwrap();
        Enqueue::new::<Inspect>($options)
            .insert(&mut *rolled_back)
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar(count)
            .fetch_one(&mut *rolled_back)
            .await
            .unwrap();
        rolled_back.rollback().await.unwrap();
        let after_rollback: i64 = sqlx::query_scalar(count).fetch_one(&pool).await.unwrap();
        let mut committed = pool.begin().await.unwrap();
        let now = Enqueue::new::<Inspect>($options)
            .try_limit(2)
            .insert(&mut *committed)
            .await
            .unwrap();
        let later = Enqueue::new::<Inspect>($options)
            .delay(Duration::from_millis(1500))
            .insert(&mut *committed)
            .await
            .unwrap();
        committed.commit().await.unwrap();
        pool.close().await;
        (seen, after_rollback, now, later)
    }};
}

async fn typed_enqueue_commits_with_the_callers_transaction(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let options: InspectOptions = serde_yaml::from_str(INSPECTED).unwrap();
    let (seen, after_rollback, now, later) = match backend {
        Backend::Sqlite => {
            enqueue_in_transactions!(sqlx::SqlitePool::connect(&db.url).await.unwrap(), &options)
        }
        Backend::Postgres => {
            enqueue_in_transactions!(sqlx::PgPool::connect(&db.url).await.unwrap(), &options)
        }
        Backend::MySql => {
            enqueue_in_transactions!(crate::util::mysql_app_pool(&db.url).await, &options)
        }
    };
    assert_eq!(seen, 1, "the row exists inside its transaction");
    assert_eq!(after_rollback, 0, "a rolled-back transaction leaves no row");
    let row = db
        .wait_for_state(taskrunner::request::RequestId(now), "FINISHED", WAIT)
        .await;
    assert_eq!(row.try_limit, 2);
    assert_eq!(yaml(row.result_text.as_deref().unwrap()), yaml(INSPECTED));
    let row = db
        .wait_for_state(taskrunner::request::RequestId(later), "FINISHED", WAIT)
        .await;
    let delayed_by = seconds_between(
        row.created_at.as_deref().unwrap(),
        row.started_at.as_deref().unwrap(),
    );
    assert!(
        delayed_by >= 1.4,
        "started {delayed_by}s after it was created"
    );
    assert_eq!(yaml(row.result_text.as_deref().unwrap()), yaml(INSPECTED));
    // The URL form, as a script would use it.
    let id = Enqueue::named(
        "Countdown",
        &BTreeMap::from([("from", 1), ("interval_ms", 10)]),
    )
    .insert_url(&db.url)
    .await
    .unwrap();
    let row = db
        .wait_for_state(taskrunner::request::RequestId(id), "FINISHED", WAIT)
        .await;
    assert_eq!(row.result_text.as_deref(), Some("liftoff after 1 steps"));
    assert!(daemon.stop().success());
}

/// The application's own pool, of the test's backend.
#[derive(Clone)]
enum AppPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

impl AppPool {
    async fn connect(db: &TestDb) -> AppPool {
        match db.backend {
            Backend::Sqlite => AppPool::Sqlite(sqlx::SqlitePool::connect(&db.url).await.unwrap()),
            Backend::Postgres => AppPool::Postgres(sqlx::PgPool::connect(&db.url).await.unwrap()),
            Backend::MySql => AppPool::MySql(crate::util::mysql_app_pool(&db.url).await),
        }
    }

    fn target(&self) -> Target<'_> {
        match self {
            AppPool::Sqlite(pool) => pool.into(),
            AppPool::Postgres(pool) => pool.into(),
            AppPool::MySql(pool) => pool.into(),
        }
    }

    async fn close(&self) {
        match self {
            AppPool::Sqlite(pool) => pool.close().await,
            AppPool::Postgres(pool) => pool.close().await,
            AppPool::MySql(pool) => pool.close().await,
        }
    }
}

fn countdown(from: u32, interval_ms: u32) -> Enqueue {
    Enqueue::named(
        "Countdown",
        &BTreeMap::from([("from", from), ("interval_ms", interval_ms)]),
    )
}

async fn sdk_wait_returns_the_result_as_the_task_ends(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks(""));
    let pool = AppPool::connect(&db).await;
    let id = countdown(3, 100).insert_url(&db.url).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let finished = wait_for(pool.target(), id, WAIT).await;
            (finished, Instant::now())
        })
    };
    // The test's own view of when the task ended: the row, read every 5 ms.
    let every = Duration::from_millis(5);
    let seen = poll_every(
        every,
        WAIT,
        &format!("request {id} to finish"),
        async || {
            let row = db.row(taskrunner::request::RequestId(id)).await;
            match row.result.as_deref() {
                Some("FINISHED") => Ok(Instant::now()),
                _ => Err(row),
            }
        },
    )
    .await;
    let (finished, returned) = waiter.await.unwrap();
    let finished = finished.unwrap();
    let gap_ms = if returned >= seen {
        (returned - seen).as_secs_f64() * 1000.0
    } else {
        -((seen - returned).as_secs_f64() * 1000.0)
    };
    println!("{backend:?}: wait_for returned {gap_ms:+.1} ms after the row was seen FINISHED");
    assert!(
        returned <= seen + Duration::from_secs(1),
        "wait_for returned {gap_ms:.1} ms after the task ended"
    );
    assert_eq!(finished.id, id);
    assert_eq!(finished.state, FinalState::Finished);
    assert!(finished.is_success());
    assert_eq!(
        finished.result_text.as_deref(),
        Some("liftoff after 3 steps")
    );
    assert_eq!((finished.tries, finished.try_limit), (1, 5));
    // A request that ended before the wait began is returned at once.
    let started = Instant::now();
    let again = wait_for(pool.target(), id, WAIT).await.unwrap();
    assert_eq!(again, finished);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Insert and wait in one call, through the pool and through the URL.
    let finished = countdown(1, 10)
        .insert_and_wait(pool.target(), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (finished.state, finished.result_text.as_deref()),
        (FinalState::Finished, Some("liftoff after 1 steps"))
    );
    let finished = countdown(2, 10)
        .insert_and_wait(&db.url, WAIT)
        .await
        .unwrap();
    assert_eq!(
        finished.result_text.as_deref(),
        Some("liftoff after 2 steps")
    );
    pool.close().await;
    assert!(daemon.stop().success());
}

async fn sdk_wait_returns_an_exhausted_failure_and_a_rejection(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &with_example_tasks("retry_delay: 1s\n"));
    let pool = AppPool::connect(&db).await;
    // The first failure leaves a try: the wait goes on to the second.
    let finished = Enqueue::named(
        "WordCount",
        &BTreeMap::from([("input", "no-such-file.txt")]),
    )
    .try_limit(2)
    .insert_and_wait(pool.target(), WAIT)
    .await
    .unwrap();
    assert_eq!(finished.state, FinalState::Failed);
    assert!(!finished.is_success());
    assert_eq!((finished.tries, finished.try_limit), (2, 2));
    let text = finished.result_text.unwrap();
    assert!(
        text.contains("reading no-such-file.txt: No such file"),
        "{text}"
    );
    let finished = Enqueue::named("Countdown", &BTreeMap::from([("from", "soon")]))
        .insert_and_wait(pool.target(), WAIT)
        .await
        .unwrap();
    assert_eq!((finished.state, finished.tries), (FinalState::Rejected, 1));
    let text = finished.result_text.unwrap();
    assert!(text.contains("options do not fit"), "{text}");
    pool.close().await;
    assert!(daemon.stop().success());
}

async fn sdk_wait_times_out_and_knows_missing_requests(backend: Backend) {
    let db = TestDb::new(backend).await;
    let pool = AppPool::connect(&db).await;
    // No daemon: the request stays pending.
    let id = countdown(1, 10).insert_url(&db.url).await.unwrap();
    let started = Instant::now();
    let error = wait_for(pool.target(), id, Duration::from_millis(300))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(error, WaitError::TimedOut { id: timed_out, .. } if timed_out == id),
        "{error}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("request {id} is not done after 300ms")
    );
    let error = wait_for(&db.url, id + 1000, WAIT).await.unwrap_err();
    assert!(
        matches!(error, WaitError::NotFound(missing) if missing == id + 1000),
        "{error}"
    );
    pool.close().await;
}

fn seconds_between(from: &str, to: &str) -> f64 {
    let parse =
        |text: &str| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap();
    (parse(to) - parse(from)).num_milliseconds() as f64 / 1000.0
}

/// `taskrunner-cli run TASK` runs an SDK program's type in the foreground,
/// without a database.
#[test]
fn cli_run_runs_sdk_task_types() {
    let scratch = crate::util::Scratch::new("sdk-cli-run");
    let config = scratch.join("taskrunner.yml");
    let database = scratch.join("never-created.db");
    std::fs::write(
        &config,
        format!(
            "database_url: sqlite://{}\n{}",
            database.display(),
            with_example_tasks("")
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(crate::util::CLI)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (status, stdout, stderr) = run(&["Inspect", &format!("--options={RUBY_OPTIONS}")]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(yaml(&stdout), yaml(INSPECTED));
    let (status, stdout, _) = run(&["FlakyStep", "--options", "succeed_on_try: 1"]);
    assert_eq!(
        (status, stdout.trim()),
        (Some(0), "step `sync` succeeded on try 1")
    );
    let (status, _, stderr) = run(&["Explode"]);
    assert_eq!(status, Some(1));
    assert!(
        stderr.contains("panicked at examples/src/main.rs:") && stderr.contains("boom"),
        "{stderr}"
    );
    let (status, _, stderr) = run(&["Countdown", "--options", "from: [1]"]);
    assert_ne!(status, Some(0));
    assert!(stderr.contains("options do not fit Countdown"), "{stderr}");
    assert!(!database.exists(), "`run` never creates a database file");
}

/// The three cases of [`a_batch_with_a_bad_member_inserts_nothing`] on one
/// backend's pool: a bad batch on a plain connection, the same in the
/// caller's transaction beside a row of its own, and a good batch.
macro_rules! batch_inserts {
    ($pool:expr) => {{
        let pool = $pool;
        let bad = Batch::new().on_complete_named("NoOp").members([
            Enqueue::named("NoOp", &()),
            Enqueue::named("NoOp", &()),
            Enqueue::named("", &()),
        ]);
        let mut connection = pool.acquire().await.unwrap();
        let plain = bad.insert(&mut *connection).await;
        let mut transaction = pool.begin().await.unwrap();
        let own = Enqueue::named("NoOp", &())
            .insert(&mut *transaction)
            .await
            .unwrap();
        let within = bad.insert(&mut *transaction).await;
        transaction.commit().await.unwrap();
        let good = Batch::new()
            .on_complete_named("NoOp")
            .member(Enqueue::named("NoOp", &()))
            .insert(&mut *connection)
            .await
            .unwrap();
        (
            plain.map_err(|e| e.to_string()),
            within.map_err(|e| e.to_string()),
            own,
            good,
        )
    }};
}

/// `Batch::insert` on a plain connection with a bad third member: it
/// failed, but the batch and the two members before it stayed. The members
/// ran, and the batch, never sealed, never ended: its `on_complete` never
/// ran. It is all or nothing now (a savepoint within the caller's
/// transaction, whose own row stays).
async fn a_batch_with_a_bad_member_inserts_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (plain, within, own, good) = match backend {
        Backend::Sqlite => batch_inserts!(sqlx::SqlitePool::connect(&db.url).await.unwrap()),
        Backend::Postgres => batch_inserts!(sqlx::PgPool::connect(&db.url).await.unwrap()),
        Backend::MySql => batch_inserts!(crate::util::mysql_app_pool(&db.url).await),
    };
    for result in [&plain, &within] {
        assert!(
            result.as_ref().is_err_and(|e| e.contains("empty")),
            "{result:?}"
        );
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches").await,
        1,
        "only the good batch"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_batches WHERE id = {good} AND sealed_at IS NOT NULL"
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {own} OR batch_id = {good}"
        ))
        .await,
        2
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        2,
        "no member of a bad batch"
    );
}

/// PostgreSQL: `wait_for` reads its row again every 5 s, in case a
/// notification was lost (or a change made none: a row deleted). Each
/// notification for another row put that re-read off by 5 s more: on a
/// table where rows end more often than that, a deleted row was never seen
/// gone (here `TimedOut` after 20 s; a wait without a timeout waited for
/// ever). The re-read is now counted once per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_wait_reads_its_row_again_on_a_busy_table() {
    let db = TestDb::new(Backend::Postgres).await;
    let waited_for = db.insert_row(NewRow::new("NoOp")).await;
    let busy = db.insert_row(NewRow::new("NoOp")).await;
    let url = db.url.clone();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let result = wait_for(&url, waited_for.0, Duration::from_secs(20)).await;
        (result, started.elapsed())
    });
    // Another row changes every 300 ms (each change a notification); the
    // one waited for goes without one.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let changing = tokio::spawn(async move {
        for n in 0.. {
            let result = if n % 2 == 0 { "'FAILED'" } else { "NULL" };
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "UPDATE task_runner_requests SET result = {result} WHERE id = {busy}"
            )))
            .execute(&pool)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // The wait has read its row once (on its listening connection) before
    // the row goes.
    poll_every(
        Duration::from_millis(20),
        Duration::from_secs(10),
        "the wait to read its row",
        async || match db
            .scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT result, result_text%'")
            .await
        {
            0 => Err("not yet"),
            _ => Ok(()),
        },
    )
    .await;
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id = {waited_for}"
    ))
    .await;
    let (result, took) = waiting.await.unwrap();
    changing.abort();
    assert!(
        matches!(result, Err(WaitError::NotFound(id)) if id == waited_for.0),
        "{result:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// PostgreSQL: `Enqueue::delay` counted from `now()`, the start of the
/// application's transaction. An insert late in a transaction that had run
/// for longer than the delay wrote a `delay_until` already past, and the
/// row started as soon as it was committed. It counts from the insert now
/// (`clock_timestamp()`), as on SQLite and MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_delay_counts_from_the_insert_not_from_the_transactions_start() {
    let db = TestDb::new(Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_sleep(2)")
        .execute(&mut *transaction)
        .await
        .unwrap();
    let id = Enqueue::named("NoOp", &())
        .delay(Duration::from_millis(1500))
        .insert(&mut *transaction)
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    let ahead: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM delay_until - clock_timestamp())::float8 FROM task_runner_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(ahead > 1.0, "delay_until {ahead:.2}s from now, not 1.5s");
}

/// SQLite: a batch sealed by the SDK got `sealed_at` to the second
/// (`CURRENT_TIMESTAMP`), where taskrunner writes times to the millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sealed_by_the_sdk_on_sqlite_has_its_time_to_the_millisecond() {
    let db = TestDb::new(Backend::Sqlite).await;
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let mut connection = pool.acquire().await.unwrap();
    let batch = Batch::new()
        .member(Enqueue::named("NoOp", &()))
        .insert(&mut *connection)
        .await
        .unwrap();
    let sealed: String =
        sqlx::query_scalar("SELECT sealed_at FROM task_runner_batches WHERE id = ?")
            .bind(batch)
            .fetch_one(&mut *connection)
            .await
            .unwrap();
    assert_eq!(sealed.len(), "2026-01-01 00:00:00.000".len(), "{sealed}");
}
