//! Issue 7, scheduling: unique requests, waiting for results, retention,
//! and cron schedules (one row per slot across daemons; catch-up once).

use std::time::{Duration, Instant};

use crate::util::{cli, holds_for, now_ns, poll_blocking_every, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    duplicate_unique_key_inserts_nothing,
    wait_returns_as_soon_as_the_task_ends,
    wait_fails_for_an_exhausted_request_and_times_out_cleanly,
    retention_prunes_only_old_final_rows_while_work_runs,
    retention_deletes_ended_batches_and_flows_once_no_request_refers_to_them,
    retention_keeps_the_rows_an_applications_foreign_key_references,
    cron_catches_up_once_after_downtime,
    a_cron_schedule_in_a_time_zone_enqueues_the_slot_of_its_clock,
    a_delayed_row_comes_due_while_a_backlog_fills_every_claim,
    a_released_row_postponed_by_the_application_waits_for_its_new_time,
    a_failed_lookup_of_the_next_delay_is_retried_not_left_to_the_poll,
    a_burst_of_delayed_rows_is_shared_by_the_daemons,
    a_schedule_whose_request_the_database_refuses_holds_up_no_other,
    a_schedule_added_by_a_reload_starts_with_its_next_slot,
    a_schedule_removed_and_added_back_runs_no_slot_it_missed,
);

/// An application's trigger that refuses every request of type `Refused`,
/// and (SQLite, PostgreSQL: a MariaDB trigger cannot) one that skips every
/// request of type `Skipped` without an error.
fn refusing_a_type(backend: Backend) -> Vec<&'static str> {
    match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_type BEFORE INSERT ON task_runner_requests \
               WHEN NEW.task_class_name = 'Refused' \
               BEGIN SELECT RAISE(ABORT, 'the application refuses type Refused'); END",
            "CREATE TRIGGER skip_type BEFORE INSERT ON task_runner_requests \
               WHEN NEW.task_class_name = 'Skipped' BEGIN SELECT RAISE(IGNORE); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_type() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.task_class_name = 'Refused' THEN \
                 RAISE EXCEPTION 'the application refuses type Refused'; \
               END IF; \
               IF NEW.task_class_name = 'Skipped' THEN RETURN NULL; END IF; \
               RETURN NEW; END $$",
            "CREATE TRIGGER refuse_type BEFORE INSERT ON task_runner_requests \
               FOR EACH ROW EXECUTE FUNCTION refuse_type()",
        ],
        Backend::MySql => vec![
            "CREATE TRIGGER refuse_type BEFORE INSERT ON task_runner_requests \
               FOR EACH ROW BEGIN \
                 IF NEW.task_class_name = 'Refused' THEN \
                   SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the application refuses type Refused'; \
                 END IF; \
               END",
        ],
    }
}

/// A schedule whose request the database refuses (here an application's
/// trigger refuses its type) ended each tick of the cron loop with that
/// error: the schedules after it by name never fired, and the error line
/// named no schedule. It is now logged once, naming it, and tried again
/// each second; the others go on. A trigger that skips the row without an
/// error (SQLite's `RAISE(IGNORE)`, a PostgreSQL `BEFORE` trigger that
/// returns NULL) gave the insert no id back: the cron loop panicked, and
/// the daemon stopped, at every start. Now it is such a refusal too, and
/// the CLI's `enqueue` says it in one line.
async fn a_schedule_whose_request_the_database_refuses_holds_up_no_other(backend: Backend) {
    let db = TestDb::new(backend).await;
    for sql in refusing_a_type(backend) {
        db.execute(sql).await;
    }
    let skips = backend != Backend::MySql;
    let mut schedules =
        "schedules:\n  a:\n    every: 1s\n    task: Refused\n  b:\n    every: 1s\n    task: NoOp\n"
            .to_string();
    if skips {
        schedules.push_str("  c:\n    every: 1s\n    task: Skipped\n");
    }
    let mut daemon = Daemon::start(&db, "d", &schedules);
    db.wait_for_at_least(
        "SELECT count(*) FROM task_runner_requests WHERE schedule = 'b'",
        3,
        WAIT,
    )
    .await;
    let line = "schedule a: the database refuses its request";
    daemon.wait_for_log(line, WAIT);
    let log = daemon.log_text();
    assert_eq!(log.matches(line).count(), 1, "{log}");
    assert!(
        log.contains("the application refuses type Refused"),
        "{log}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE schedule = 'a'")
            .await,
        0
    );
    if skips {
        let line = "schedule c: the database refuses its request, trying again every second (the other schedules go on): the database stored no row";
        daemon.wait_for_log(line, WAIT);
        let (code, out, err) = cli(&db, &["enqueue", "Skipped"]);
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("the database stored no row"), "{err}");
        // With a unique key (before: "its holder keeps changing").
        let (code, out, err) = cli(&db, &["enqueue", "Skipped", "--unique-key", "k"]);
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("the database stored no row"), "{err}");
    }
    assert!(daemon.stop().success());
}

/// The cron loop slept up to 30 s (10 s here being the bound) between
/// looks at the config: a schedule added by a reload started that much
/// later, and a slot in between was skipped ("a new schedule starts with
/// its next slot" held from when the loop noticed it). A reload now wakes
/// the loop.
async fn a_schedule_added_by_a_reload_starts_with_its_next_slot(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    daemon.wait_for_log("taskrunnerd started", WAIT);
    let base = crate::util::base_config(&db, &daemon.dir);
    std::fs::write(
        &daemon.config,
        crate::util::merge_yaml(
            &base,
            "schedules:\n  tick:\n    every: 1s\n    task: NoOp\n",
        ),
    )
    .unwrap();
    daemon.reload();
    daemon.wait_for_log("config reloaded", WAIT);
    db.wait_for_at_least(
        "SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(daemon.stop().success());
}

/// A schedule removed by a reload, then added back: its latest slot
/// recorded in the database (from before the removal) counted, and the
/// newest slot it missed while removed was enqueued at once (a nightly job
/// disabled for a week and enabled again at noon ran at noon). Added back,
/// it starts with its next slot, as a new one does; and so does a
/// schedule whose `cron`, `every` or `time_zone` a reload changes.
async fn a_schedule_removed_and_added_back_runs_no_slot_it_missed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let tick = "schedules:\n  tick:\n    every: 1s\n    task: NoOp\n";
    let daemon = Daemon::start(&db, "d", tick);
    let count = "SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick'";
    db.wait_for_at_least(count, 1, WAIT).await;
    daemon.reload_with(&db, "schedules: {}\n");
    daemon.wait_for_log("config reloaded", WAIT);
    let before = db.scalar(count).await;
    // Removed for three slots and more.
    holds_for(
        Duration::from_secs(3),
        "no slot of the removed schedule to be enqueued",
        async || match db.scalar(count).await {
            n if n <= before + 1 => Ok(()),
            n => Err(format!("{n} rows")),
        },
    )
    .await;
    let last_id = db
        .scalar("SELECT coalesce(max(id), 0) FROM task_runner_requests")
        .await;
    let added_back = chrono::Utc::now();
    daemon.reload_with(&db, tick);
    db.wait_for_at_least(
        &format!("{count} AND id > {last_id}"),
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        db.scalar(&format!(
            "{count} AND id > {last_id} AND planned_at < {}",
            time_literal(backend, added_back)
        ))
        .await,
        0,
        "a slot from before the schedule was added back was enqueued"
    );
    let mut daemon = daemon;
    assert!(daemon.stop().success());
}

/// `taskrunner-cli wait ID …` as a child process, not waited for yet.
fn spawn_wait(db: &TestDb, args: &[&str]) -> std::process::Child {
    let args: Vec<&str> = std::iter::once("wait")
        .chain(args.iter().copied())
        .collect();
    crate::util::spawn_cli(db, &args)
}

/// A UTC time as the backend compares it with a timestamp column.
fn time_literal(backend: Backend, time: chrono::DateTime<chrono::Utc>) -> String {
    match backend {
        Backend::Sqlite => format!("'{}'", time.format("%Y-%m-%d %H:%M:%S%.3f")),
        Backend::Postgres => format!("'{}'::timestamptz", time.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
        Backend::MySql => format!("'{}'", time.format("%Y-%m-%d %H:%M:%S%.3f")),
    }
}

async fn duplicate_unique_key_inserts_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Delayed, so it stays pending.
    let (status, first, stderr) = cli(
        &db,
        &[
            "enqueue",
            "NoOp",
            "--unique-key",
            "report-7",
            "--delay",
            "1h",
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    let (status, second, stderr) = cli(&db, &["enqueue", "NoOp", "--unique-key", "report-7"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(first.trim(), second.trim(), "the existing id is printed");
    // Plain SQL, as an application would write it, honours the same rule.
    // (By hand: each backend's own way to ignore a conflict is the point.)
    let ignore = match backend {
        Backend::Sqlite => "INSERT OR IGNORE INTO task_runner_requests (task_class_name, unique_key) VALUES ('NoOp', 'report-7')",
        Backend::Postgres => "INSERT INTO task_runner_requests (task_class_name, unique_key) VALUES ('NoOp', 'report-7') ON CONFLICT DO NOTHING",
        Backend::MySql => "INSERT INTO task_runner_requests (task_class_name, unique_key) VALUES ('NoOp', 'report-7') ON DUPLICATE KEY UPDATE id = id",
    };
    db.execute(ignore).await;
    let keyed = "SELECT count(*) FROM task_runner_requests WHERE unique_key = 'report-7'";
    assert_eq!(db.scalar(keyed).await, 1);

    // Once the holder has finished, the key is free again.
    let mut daemon = Daemon::start(&db, "d", "");
    let (_, held, _) = cli(&db, &["enqueue", "NoOp", "--unique-key", "once"]);
    let held: i64 = held.trim().parse().unwrap();
    db.wait_for_state(taskrunner::request::RequestId(held), "FINISHED", WAIT)
        .await;
    let (status, again, _) = cli(&db, &["enqueue", "NoOp", "--unique-key", "once"]);
    assert_eq!(status, 0);
    let again: i64 = again.trim().parse().unwrap();
    assert_ne!(again, held, "a finished request no longer holds its key");
    db.wait_for_state(taskrunner::request::RequestId(again), "FINISHED", WAIT)
        .await;
    assert!(daemon.stop().success());
}

async fn wait_returns_as_soon_as_the_task_ends(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ended = db.scratch.join("ended");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Nap:\n    command: [/bin/sh, -c, 'sleep 1.5; date +%s%N > {}; echo rested']\n",
            ended.display()
        ),
    );
    let mut latencies = Vec::new();
    for _ in 0..3 {
        let _ = std::fs::remove_file(&ended);
        let id = db.enqueue("Nap", None).await;
        let mut waiter = spawn_wait(&db, &[&id.to_string(), "--timeout", "30s"]);
        let status = poll_blocking_every(Duration::from_millis(1), WAIT, "wait to return", || {
            waiter.try_wait().unwrap().ok_or("running")
        });
        let returned = now_ns();
        let output = waiter.wait_with_output().unwrap();
        assert!(
            status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "rested");
        let ended_at: u128 = std::fs::read_to_string(&ended)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        latencies.push((returned - ended_at) as f64 / 1e6);
    }
    let best = latencies.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!("{backend:?}: wait returned {latencies:.1?} ms after the task ended");
    let bound = match backend {
        Backend::Postgres => 100.0,
        // Waiters check every 100 ms there (no NOTIFY).
        Backend::Sqlite | Backend::MySql => 400.0,
    };
    assert!(
        best < bound,
        "wait latency {latencies:?} ms, bound {bound} ms"
    );
    let median = {
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[1]
    };
    assert!(median < bound * 2.0, "wait latency {latencies:?} ms");
    assert!(daemon.stop().success());
}

async fn wait_fails_for_an_exhausted_request_and_times_out_cleanly(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Times out: a request that will not run for an hour.
    let (_, pending, _) = cli(&db, &["enqueue", "NoOp", "--delay", "1h"]);
    let started = Instant::now();
    let (status, stdout, stderr) = cli(&db, &["wait", pending.trim(), "--timeout", "500ms"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("is not final after 500ms"),
        "one clear line: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // No such request.
    let (status, _, stderr) = cli(&db, &["wait", "999999"]);
    assert_eq!(status, 1);
    assert!(stderr.contains("no request 999999"), "{stderr}");

    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Broken:\n    command: [/bin/sh, -c, 'echo it went wrong >&2; exit 3']\n",
    );
    let (_, id, _) = cli(&db, &["enqueue", "Broken", "--try-limit", "2"]);
    let (status, stdout, stderr) = cli(&db, &["wait", id.trim(), "--timeout", "30s"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("FAILED"), "{stderr}");
    assert!(stderr.contains("2 of 2 tries"), "{stderr}");
    assert!(stderr.contains("it went wrong"), "{stderr}");
    assert!(daemon.stop().success());
}

/// Batches and flows are deleted by retention too, once ended and once no
/// request refers to them any more (their members, steps and callbacks went
/// by the rules for requests). Before, their rows stayed for ever: a batch
/// per import, a flow per order, and the tables only grew.
async fn retention_deletes_ended_batches_and_flows_once_no_request_refers_to_them(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let batch_with = async |db: &TestDb| {
        let batch = db
            .insert("INSERT INTO task_runner_batches (on_complete) VALUES ('NoOp') RETURNING id")
            .await;
        db.insert_row(NewRow::new("NoOp").batch(batch.0)).await;
        batch.0
    };
    // Ends FINISHED, its member and callback FINISHED: all of it goes.
    let finished = batch_with(&db).await;
    db.execute(&format!(
        "UPDATE task_runner_batches SET sealed_at = CURRENT_TIMESTAMP WHERE id = {finished}"
    ))
    .await;
    // Cancelled: its CANCELLED member is kept (no rule for them), so is it.
    let cancelled = batch_with(&db).await;
    let (status, _, stderr) = cli(&db, &["batch", "cancel", &cancelled.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    let flow = crate::flows::insert_flow(&db, "one", None).await;
    let count = async |sql: String| db.scalar(&sql).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "reap_interval: 1s\nretention:\n  finished: 1s\nflows:\n  one:\n    steps:\n      - { name: s1, task: NoOp }\n",
    );
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_batches WHERE id = {finished}"),
        0,
        WAIT,
    )
    .await;
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_flows WHERE id = {flow}"),
        0,
        WAIT,
    )
    .await;
    assert_eq!(
        count(format!("SELECT count(*) FROM task_runner_requests WHERE batch_id = {finished} OR callback_of_batch = {finished} OR flow_id = {flow}")).await,
        0
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM task_runner_batches WHERE id = {cancelled}"
        ))
        .await,
        1
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {cancelled}"
        ))
        .await,
        1
    );
    assert!(
        daemon.log_text().contains("batches_and_flows="),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.stop().success());
}

/// An application's table whose foreign key references requests (Rails'
/// `references :task_runner_request, foreign_key: true`: no ON DELETE rule).
/// Before, the one old row it referenced failed every batch of deletes it
/// was in: `purge` failed and retention deleted nothing, for ever. Now such
/// rows are kept, every other one goes, and a key with ON DELETE CASCADE
/// still lets its rows go (and the application's rows with them). The same
/// for an ended batch that an application's key references.
async fn retention_keeps_the_rows_an_applications_foreign_key_references(backend: Backend) {
    let db = TestDb::new(backend).await;
    let old = NewRow::new("NoOp")
        .options("old")
        .ended(backend, "FINISHED", 1, 2 * 86_400);
    db.insert_copies(old, 1200).await;
    let first = db.scalar("SELECT min(id) FROM task_runner_requests").await;
    let (middle, cascading) = (first + 700, first + 5);
    db.create_referencing_table("reports", "request_id", "task_runner_requests", "")
        .await;
    db.create_referencing_table(
        "notes",
        "request_id",
        "task_runner_requests",
        "ON DELETE CASCADE",
    )
    .await;
    db.execute(&format!(
        "INSERT INTO reports (request_id) VALUES ({first}), ({middle})"
    ))
    .await;
    db.execute(&format!(
        "INSERT INTO notes (request_id) VALUES ({cascading})"
    ))
    .await;
    // Two batches that ended long ago, one of them referenced too.
    let mut batches = Vec::new();
    for _ in 0..2 {
        let batch = db
            .insert("INSERT INTO task_runner_batches (name) VALUES ('ended') RETURNING id")
            .await;
        batches.push(batch.0);
    }
    let long_ago = crate::util::sql_now_plus(backend, -2 * 86_400);
    db.execute(&format!(
        "UPDATE task_runner_batches SET state = 'FINISHED', sealed_at = {long_ago}, finished_at = {long_ago}"
    ))
    .await;
    db.create_referencing_table("batch_reports", "batch_id", "task_runner_batches", "")
        .await;
    db.execute(&format!(
        "INSERT INTO batch_reports (batch_id) VALUES ({})",
        batches[0]
    ))
    .await;
    let (status, stdout, stderr) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("deleted 1198 requests"), "{stdout}");
    assert!(
        stdout.contains("deleted 1 ended batches and flows"),
        "{stdout}"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_batches WHERE id = {}",
            batches[0]
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id IN ({first}, {middle})"
        ))
        .await,
        2
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        2
    );
    assert_eq!(db.scalar("SELECT count(*) FROM notes").await, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM reports").await, 2);
    // Once the application lets go of a row, it goes.
    db.execute(&format!("DELETE FROM reports WHERE request_id = {first}"))
        .await;
    let (status, stdout, stderr) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        1
    );
    // The daemon's retention passes, the same: 600 more old rows go, the
    // one still referenced stays, and no pass fails.
    let old = NewRow::new("NoOp")
        .options("old")
        .ended(backend, "FINISHED", 1, 2 * 86_400);
    db.insert_copies(old, 600).await;
    let mut daemon = Daemon::start(&db, "d", "reap_interval: 1s\nretention:\n  finished: 1h\n");
    db.wait_for_count("SELECT count(*) FROM task_runner_requests", 1, WAIT)
        .await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {middle}"
        ))
        .await,
        1
    );
    daemon.wait_for_log("pruned requests past their retention", WAIT);
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    assert!(
        !log.contains("FOREIGN KEY") && !log.contains("foreign key"),
        "{log}"
    );
}

async fn retention_prunes_only_old_final_rows_while_work_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let two_days = 2 * 86_400;
    let day = 86_400;
    let row = |options: &str| NewRow::new("NoOp").options(options).try_limit(5);
    // 1,200 old FINISHED rows: several batches of 500.
    let old = NewRow::new("NoOp")
        .options("old")
        .ended(backend, "FINISHED", 1, two_days);
    db.insert_copies(old, 1200).await;
    let sentinels = [
        // young FINISHED: kept
        row("young-finished").ended(backend, "FINISHED", 1, 0),
        // old but not final: pending (delayed), failed with tries left
        row("old-pending").delayed(backend, day),
        row("old-failed-retryable")
            .ended(backend, "FAILED", 1, two_days)
            .delayed(backend, day),
        // old and final, but no rule for its kind
        row("old-cancelled").ended(backend, "CANCELLED", 0, two_days),
        // old exhausted: pruned
        row("old-exhausted").exhausted(backend, 5, two_days),
    ];
    for sentinel in sentinels {
        db.insert_row(sentinel).await;
    }
    // 1,000 new requests, claimed and finished while the pruner works.
    db.insert_copies(NewRow::new("NoOp").options("batch: new"), 1000)
        .await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "reap_interval: 1s\nmax_concurrent: 8\nretention:\n  finished: 1h\n  exhausted: 1h\n",
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE options = 'old'",
        0,
        WAIT,
    )
    .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE options = 'batch: new' AND result = 'FINISHED'",
        1000,
        Duration::from_secs(240),
    )
    .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE options = 'old-exhausted'",
        0,
        WAIT,
    )
    .await;
    for kept in [
        "young-finished",
        "old-pending",
        "old-failed-retryable",
        "old-cancelled",
    ] {
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE options = '{kept}'"
            ))
            .await,
            1,
            "{kept} must be kept"
        );
    }
    // The pass that deleted the last of them says so once it has ended.
    daemon.wait_for_log("pruned requests past their retention", WAIT);
    assert!(daemon.stop().success());

    // `purge` without --older-than applies the config's rules.
    db.insert_row(
        NewRow::new("NoOp")
            .options("old-again")
            .ended(backend, "FINISHED", 1, two_days),
    )
    .await;
    let config = daemon.config.display().to_string();
    let (status, stdout, stderr) = cli(&db, &["--config", &config, "purge"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout.trim(), "deleted 1 requests");
    let (status, stdout, _) = cli(&db, &["purge"]);
    assert_eq!(status, 0);
    assert!(stdout.contains("nothing deleted"), "{stdout}");
}

// The three daemons share one PostgreSQL (or MariaDB) database; each slot of an
// `every: 1s` schedule must give exactly one request.
multi_host_backends!(cron_every_second_with_three_daemons_gives_one_row_per_slot_on_postgres);

async fn cron_every_second_with_three_daemons_gives_one_row_per_slot_on_postgres(backend: Backend) {
    let db = TestDb::new(backend).await;
    let schedule =
        "schedules:\n  tick:\n    every: 1s\n    task: NoOp\n    options: {created_from: cron}\n";
    let mut daemons: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|name| Daemon::start(&db, name, schedule))
        .collect();
    let count = "SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick'";
    db.wait_for_at_least(count, 6, WAIT).await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    let rows = db.scalar(count).await;
    let distinct = db
        .scalar(
            "SELECT count(DISTINCT planned_at) FROM task_runner_requests WHERE schedule = 'tick'",
        )
        .await;
    let span = db
        .scalar(match backend {
            Backend::MySql => "SELECT TIMESTAMPDIFF(SECOND, min(planned_at), max(planned_at)) FROM task_runner_requests WHERE schedule = 'tick'",
            Backend::Sqlite | Backend::Postgres => "SELECT extract(epoch from max(planned_at) - min(planned_at))::bigint FROM task_runner_requests WHERE schedule = 'tick'",
        })
        .await;
    let slots = db
        .scalar("SELECT count(*) FROM task_runner_schedule_slots WHERE schedule = 'tick' AND request_id IS NOT NULL")
        .await;
    eprintln!("{rows} rows, {distinct} distinct slots spanning {span}s");
    assert_eq!(rows, distinct, "one row per slot");
    assert_eq!(span, rows - 1, "slots are consecutive seconds");
    assert_eq!(slots, rows, "every request is recorded on its slot");
    let whole_second = match backend {
        Backend::MySql => "MICROSECOND(s.slot) = 0",
        Backend::Sqlite | Backend::Postgres => "s.slot = date_trunc('second', s.slot)",
    };
    let whole_seconds = db
        .scalar(&format!("SELECT count(*) FROM task_runner_requests r JOIN task_runner_schedule_slots s ON s.request_id = r.id \
                  WHERE r.schedule = 'tick' AND r.planned_at = s.slot AND {whole_second}"))
        .await;
    assert_eq!(whole_seconds, rows);
    let options = db
        .scalar("SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick' AND options LIKE '%created_from: cron%'")
        .await;
    assert_eq!(options, rows, "mapping options are stored as YAML");
}

async fn cron_catches_up_once_after_downtime(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The last slot enqueued 30 s ago: the daemon was down since.
    // Whole seconds, as `every: 1s` slots are.
    let slot = match backend {
        Backend::Sqlite => "strftime('%Y-%m-%d %H:%M:%S.000', 'now', '-30 seconds')",
        Backend::Postgres => "date_trunc('second', now() - interval '30 seconds')",
        Backend::MySql => "UTC_TIMESTAMP() - INTERVAL 30 SECOND",
    };
    // By hand: the one row of the daemons' own slot table a past daemon left.
    db.execute(&format!(
        "INSERT INTO task_runner_schedule_slots (schedule, slot) VALUES ('tick', {slot})"
    ))
    .await;
    let before_start = chrono::Utc::now() - chrono::Duration::milliseconds(1500);
    let mut daemon = Daemon::start(
        &db,
        "d",
        "schedules:\n  tick:\n    every: 1s\n    task: NoOp\n",
    );
    let count = "SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick'";
    db.wait_for_at_least(count, 3, WAIT).await;
    assert!(daemon.stop().success());
    let missed = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE schedule = 'tick' AND planned_at < {}",
            time_literal(backend, before_start)
        ))
        .await;
    assert_eq!(
        missed, 0,
        "no slot of the downtime is enqueued but the newest"
    );
    let rows = db.scalar(count).await;
    let distinct = db
        .scalar(
            "SELECT count(DISTINCT planned_at) FROM task_runner_requests WHERE schedule = 'tick'",
        )
        .await;
    assert_eq!(rows, distinct);
    assert!(rows < 10, "caught up once, not 30 times: {rows} rows");
}

/// `time_zone:` moves a cron schedule's slots to that zone's clock. Both
/// schedules missed their midnight while no daemon ran (a slot recorded
/// three days ago): catch-up enqueues the latest one at once, Kathmandu's
/// (UTC+05:45) at 18:15 UTC, UTC's at 00:00.
async fn a_cron_schedule_in_a_time_zone_enqueues_the_slot_of_its_clock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let three_days_ago = match backend {
        Backend::Sqlite => "strftime('%Y-%m-%d %H:%M:%S.000', 'now', '-3 days')",
        Backend::Postgres => "date_trunc('second', now() - interval '3 days')",
        Backend::MySql => "UTC_TIMESTAMP() - INTERVAL 3 DAY",
    };
    for schedule in ["kathmandu", "utc"] {
        db.execute(&format!(
            "INSERT INTO task_runner_schedule_slots (schedule, slot) VALUES ('{schedule}', {three_days_ago})"
        ))
        .await;
    }
    let mut daemon = Daemon::start(
        &db,
        "d",
        "schedules:\n  kathmandu:\n    cron: '0 0 * * *'\n    time_zone: Asia/Kathmandu\n    task: NoOp\n  \
         utc:\n    cron: '0 0 * * *'\n    task: NoOp\n",
    );
    let count = "SELECT count(*) FROM task_runner_requests WHERE schedule IS NOT NULL";
    db.wait_for_count(count, 2, WAIT).await;
    assert!(daemon.stop().success());
    let epoch = match backend {
        Backend::Sqlite => "CAST(strftime('%s', planned_at) AS INTEGER)",
        Backend::Postgres => "extract(epoch from planned_at)::bigint",
        Backend::MySql => "TIMESTAMPDIFF(SECOND, '1970-01-01', planned_at)",
    };
    let now = chrono::Utc::now().timestamp();
    for (schedule, time_of_day) in [("kathmandu", 18 * 3600 + 15 * 60), ("utc", 0)] {
        let planned = db
            .scalar(&format!(
                "SELECT {epoch} FROM task_runner_requests WHERE schedule = '{schedule}'"
            ))
            .await;
        assert_eq!(
            planned.rem_euclid(86_400),
            time_of_day,
            "{schedule}: planned at {planned}"
        );
        assert!(
            planned <= now && now - planned < 86_400,
            "{schedule}: the latest midnight, not {planned} (now {now})"
        );
    }
    // `taskrunner-cli schedules` names each one's request and next slot,
    // on the zone's clock too.
    let config = daemon.config.display().to_string();
    let (status, stdout, stderr) = cli(&db, &["--config", &config, "schedules"]);
    assert_eq!(status, 0, "{stderr}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"))
            .to_string()
    };
    let kathmandu = line("kathmandu");
    let request = db
        .scalar("SELECT id FROM task_runner_requests WHERE schedule = 'kathmandu'")
        .await;
    assert!(
        kathmandu.contains("cron: '0 0 * * *', time_zone: Asia/Kathmandu")
            && kathmandu.contains(&format!("  {request}  "))
            && kathmandu.contains(" 18:15:00 UTC (")
            && kathmandu.ends_with(" 00:00 +0545)"),
        "{stdout}"
    );
    assert!(line("utc").ends_with(" 00:00:00 UTC"), "{stdout}");
}

/// A delayed row is claimable once a daemon has released it (seen its
/// delay pass: `delay_passed_at`), so that claims never walk the rows
/// delayed into the future. The scheduler learns the next delay after a
/// claim that comes back short; behind a backlog every claim fills, and the
/// release runs on its own clock: the urgent row due in 2 s runs before
/// the 6 s backlog has drained.
async fn a_delayed_row_comes_due_while_a_backlog_fills_every_claim(backend: Backend) {
    let db = TestDb::new(backend).await;
    for _ in 0..60 {
        db.insert_row(NewRow::new("Slow")).await;
    }
    let urgent = db
        .insert_row(NewRow::new("Urgent").priority(10).delayed(backend, 2))
        .await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 1\ntasks:\n  Slow:\n    command: [/bin/sh, -c, 'sleep 0.1']\n  Urgent:\n    command: [/bin/true]\n",
    );
    db.wait_for_state(urgent, "FINISHED", WAIT).await;
    let backlog = db
        .scalar("SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Slow' AND result IS NULL")
        .await;
    assert!(
        backlog > 0,
        "the urgent row ran only once the backlog had drained"
    );
    let early = format!(
        "SELECT count(*) FROM task_runner_requests WHERE id = {urgent} AND started_at < delay_until"
    );
    assert_eq!(db.scalar(&early).await, 0, "started before its delay");
    assert!(daemon.stop().success());
}

/// Once released, a row stays claimable only while its delay is the one a
/// daemon saw pass: an application that postpones it (a later
/// `delay_until`) makes it wait for the new time, without anything to clear,
/// and one that brings the time back runs it at once.
async fn a_released_row_postponed_by_the_application_waits_for_its_new_time(backend: Backend) {
    let db = TestDb::new(backend).await;
    let later = db
        .insert_row(NewRow::new("Record").queue("b").delayed(backend, 1))
        .await;
    // A daemon of queue `a` releases the row of queue `b` (releases are for
    // any row), and does not claim it.
    let mut releaser = Daemon::start(
        &db,
        "a",
        "queues: { a: 1 }\ntasks:\n  Record:\n    command: [/bin/true]\n",
    );
    let released = format!(
        "SELECT count(*) FROM task_runner_requests WHERE id = {later} AND delay_passed_at IS NOT NULL"
    );
    db.wait_for_count(&released, 1, WAIT).await;
    assert!(releaser.stop().success());
    let postpone = format!(
        "UPDATE task_runner_requests SET delay_until = {} WHERE id = {later}",
        crate::util::sql_now_plus(backend, 86_400)
    );
    db.execute(&postpone).await;

    // A daemon of every queue runs a row enqueued after it, not it.
    let mut daemon = Daemon::start(&db, "d", "tasks:\n  Record:\n    command: [/bin/true]\n");
    let after = db.insert_row(NewRow::new("Record").queue("b")).await;
    db.wait_for_state(after, "FINISHED", WAIT).await;
    let row = db.row(later).await;
    assert_eq!((row.result.as_deref(), row.tries), (None, 0), "{row:?}");

    // Brought back to now, it runs.
    let now = format!(
        "UPDATE task_runner_requests SET delay_until = {} WHERE id = {later}",
        crate::util::sql_now_plus(backend, 0)
    );
    db.execute(&now).await;
    db.wait_for_state(later, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// The lookup of when the next delayed row comes due fails (a connection
/// reset, a failover; here each one for 1.5 s), on an idle daemon polling
/// every minute:
/// it is looked up again after a backoff, and the row runs on time. Before,
/// nothing looked again until the next poll: the row started up to
/// `poll_interval` late, and the outage stayed open in the log and in
/// `status` until then.
async fn a_failed_lookup_of_the_next_delay_is_retried_not_left_to_the_poll(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        "poll_interval: 60s\nheartbeat_interval: 60s\nlease_timeout: 120s\ntasks:\n  Record:\n    command: [/bin/true]\n",
        &[("TASKRUNNER_TEST_FAIL_DELAY_LOOKUPS_MS", "1500")],
    );
    let inserted = std::time::Instant::now();
    let id = db
        .insert_row(NewRow::new("Record").delayed(backend, 2))
        .await;
    daemon.wait_for_log("the lookup of the next delayed row fails", WAIT);
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(
        inserted.elapsed() < Duration::from_secs(15),
        "ran {:?} after its insert, delayed 2s",
        inserted.elapsed()
    );
    daemon.wait_for_log("database available again", WAIT);
    assert!(daemon.stop().success());
}

/// PostgreSQL's claim reads no row delayed into the future: 2,000 of them
/// ahead of 50 due rows (lower ids, higher priority), and the claim's plan,
/// run, removes no row by its filter (before migration 0011 it read and
/// dropped all 2,000 at each claim). The statement is the daemon's own,
/// run in a transaction that is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_read_no_row_delayed_into_the_future() {
    let db = TestDb::new(Backend::Postgres).await;
    db.insert_copies(
        NewRow::new("NoOp").priority(5).delayed(db.backend, 86_400),
        2000,
    )
    .await;
    db.insert_copies(NewRow::new("NoOp"), 50).await;
    db.execute("ANALYZE task_runner_requests").await;
    let claim = &taskrunner::store::sql::SQL
        .of(taskrunner::store::Backend::Postgres)
        .claim;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut transaction = pool.begin().await.unwrap();
    let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, COSTS OFF) {claim}"));
    let plan: Vec<String> = sqlx::query_scalar(explain)
        .bind("token")
        .bind("instance")
        .bind("host")
        .bind(8_i64)
        .bind("host")
        .bind("")
        .bind("")
        .bind("[]")
        .bind(1_000_000_i64)
        .bind("[]")
        .fetch_all(&mut *transaction)
        .await
        .unwrap();
    transaction.rollback().await.unwrap();
    pool.close().await;
    let plan = plan.join("\n");
    assert!(plan.contains("task_runner_requests_runnable"), "{plan}");
    assert!(plan.contains("rows=8 loops=1"), "claims 8 rows: {plan}");
    let removed: i64 = plan
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Rows Removed by Filter: "))
        .map(|n| n.parse::<i64>().unwrap())
        .sum();
    assert!(removed < 50, "read past the delayed rows: {plan}");
}

/// A release by one daemon wakes the others on PostgreSQL, as a row made
/// runnable does (NOTIFY): the daemon that released a burst of due rows may
/// not have the slots for all of them, and another whose claim ran just
/// before the release committed would otherwise wait for its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_release_wakes_the_listening_daemons() {
    let db = TestDb::new(Backend::Postgres).await;
    let id = db
        .insert_row(NewRow::new("NoOp").delayed(db.backend, -1))
        .await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("task_runner_requests").await.unwrap();
    // What `Store::release_delays` writes.
    db.execute(&format!(
        "UPDATE task_runner_requests SET delay_passed_at = now() WHERE id = {id}"
    ))
    .await;
    let notified = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(notified, Ok(Ok(_))),
        "no notification: {notified:?}"
    );
}

/// A burst of rows delayed to the same moment, more than one daemon has
/// slots for: released by whichever daemon comes first, run by both, each
/// row once and not before its time.
async fn a_burst_of_delayed_rows_is_shared_by_the_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = |host: &str| {
        format!("host_id: {host}\nmax_concurrent: 2\ntasks:\n  Nap:\n    command: [/bin/sleep, '0.3']\n")
    };
    let mut a = Daemon::start(&db, "a", &config("host-a"));
    let mut b = Daemon::start(&db, "b", &config("host-b"));
    db.insert_copies(NewRow::new("Nap").delayed(backend, 2), 24)
        .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        24,
        WAIT,
    )
    .await;
    let count = async |condition: &str| {
        let sql = format!("SELECT count(*) FROM task_runner_requests WHERE {condition}");
        db.scalar(&sql).await
    };
    assert_eq!(count("tries <> 1").await, 0, "a row ran more than once");
    assert_eq!(
        count("started_at < delay_until").await,
        0,
        "a row ran early"
    );
    let (on_a, on_b) = (
        count("host = 'host-a'").await,
        count("host = 'host-b'").await,
    );
    assert_eq!(on_a + on_b, 24);
    assert!(
        on_a > 0 && on_b > 0,
        "one daemon ran them all: {on_a} + {on_b}"
    );
    assert!(a.stop().success());
    assert!(b.stop().success());
}

multi_host_backends!(a_daemon_slower_through_its_missed_slots_enqueues_none_twice);

/// After downtime each daemon lists the missed slots after the latest one
/// recorded (`catch_up` of them) and takes them one by one. A faster daemon
/// took them all, then forgot the slots older than an hour (all but the
/// latest); a slower one, its list read before, then took the forgotten
/// ones again: two requests for one slot. A slot older than one already
/// taken is no longer taken. (The slower daemon here pauses 3 s before each
/// slot, a test hook of debug builds.)
async fn a_daemon_slower_through_its_missed_slots_enqueues_none_twice(backend: Backend) {
    let db = TestDb::new(backend).await;
    let hour = 3600;
    let latest = (chrono::Utc::now().timestamp() / hour) * hour - 5 * hour;
    let latest = chrono::DateTime::from_timestamp(latest, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S");
    let zone = if backend == Backend::Postgres {
        "+00"
    } else {
        ""
    };
    db.execute(&format!(
        "INSERT INTO task_runner_schedule_slots (schedule, slot) VALUES ('hourly', '{latest}{zone}')"
    ))
    .await;
    let schedule = "schedules:\n  hourly:\n    every: 1h\n    catch_up: 3\n    task: NoOp\n";
    let mut slow = Daemon::start_in_env(
        &db,
        "slow",
        schedule,
        &[("TASKRUNNER_TEST_SLOT_DELAY_MS", "3000")],
    );
    let mut fast = Daemon::start(&db, "fast", schedule);
    let count = "SELECT count(*) FROM task_runner_requests WHERE schedule = 'hourly'";
    db.wait_for_at_least(count, 3, WAIT).await;
    // While the slower daemon goes through its three slots (3 s each).
    holds_for(
        Duration::from_secs(12),
        "three requests, one per slot",
        async || match db.scalar(count).await {
            3 => Ok(()),
            seen => Err(seen),
        },
    )
    .await;
    assert!(fast.stop().success());
    assert!(slow.stop().success());
    let distinct = db
        .scalar(
            "SELECT count(DISTINCT planned_at) FROM task_runner_requests WHERE schedule = 'hourly'",
        )
        .await;
    assert_eq!((db.scalar(count).await, distinct), (3, 3));
}
