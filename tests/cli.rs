//! `taskrunner-cli` as a newcomer meets it: what `migrate` says it did, one
//! line naming the database and the remedy for each database error, and the
//! options and filters a job-runner user expects.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use taskrunner::request::RequestId;

use crate::util::{
    bare_cli, cli, holds_for, poll, spawn_cli, wait_until, within, Backend, Daemon, NewRow,
    PrivateServer, Scratch, TestDb, CLI,
};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    migrate_says_what_it_did,
    run_record_keeps_its_rows_lease_while_the_task_runs,
    processes_migrating_at_once_take_turns_and_each_says_what_it_did,
    an_upgrade_adds_the_later_indexes_in_place_without_a_rebuild,
    an_upgrade_notes_what_the_rows_already_there_made,
    a_daemon_waiting_for_another_processs_migration_stops_when_told,
    a_schema_newer_than_the_binary_is_refused_and_left_as_it_is,
    enqueue_sets_every_column_an_app_can_set,
    enqueue_refuses_options_that_are_not_yaml_and_an_empty_type,
    enqueue_refuses_a_wait_of_more_than_fifty_years,
    enqueue_refuses_names_longer_than_their_columns,
    batch_create_refuses_the_callback_names_enqueue_refuses,
    run_shows_all_of_the_tasks_standard_error_before_it_exits,
    retry_of_a_row_whose_unique_key_is_held_names_the_holder_and_goes_on,
    list_filters_by_type_queue_host_and_state_and_shows_due_times,
    list_and_cancel_filter_by_batch,
    cancel_of_a_fail_fast_batchs_members_cancels_each_and_exits_0,
    retry_of_a_filter_reads_only_the_rows_ids_not_their_outputs,
    list_shows_the_tasks_own_error_without_progress_lines,
    retry_and_cancel_take_several_ids_or_a_filter,
    retry_and_cancel_whose_reader_went_away_act_on_every_row,
    a_retry_by_filter_leaves_a_row_that_moved_on_since_it_was_selected,
    second_sigterm_during_the_drain_stops_tasks_at_once,
    run_record_writes_what_the_daemon_writes,
    run_record_writes_its_outcome_through_a_database_outage,
    run_record_whose_claim_was_lost_exits_1_even_when_its_try_finished,
    empty_or_zero_filters_and_bad_flags_are_refused_in_one_line_changing_nothing,
);
multi_host_backends!(
    run_record_stopped_has_its_task_killed_before_the_lease_lapses,
    a_run_record_cut_off_for_less_than_its_lease_is_not_reaped_by_a_daemon_of_a_shorter_one,
);

/// The error line: exactly one line on stderr.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    lines[0]
}

/// `cancel --task "$TYPE"` with `TYPE` unset (or `--queue ''`, `--host ''`,
/// `--batch 0`, `--flow 0`) was read as no filter at all: every pending row
/// was cancelled and every running one asked to stop; `retry` so made every
/// ended row, FINISHED ones too, run again. They are refused now, with
/// exit status 2 and one line, as any bad flag is (clap's own reports of a
/// bad flag were three to six lines).
async fn empty_or_zero_filters_and_bad_flags_are_refused_in_one_line_changing_nothing(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let pending = db.insert_row(NewRow::new("NoOp")).await;
    let ended = db
        .insert_row(NewRow::new("NoOp").ended(backend, "FINISHED", 1, 60))
        .await;
    for args in [
        &["cancel", "--task", ""][..],
        &["cancel", "--queue", ""],
        &["cancel", "--host", ""],
        &["cancel", "--batch", "0"],
        &["retry", "--flow", "0"],
        &["retry", "--task", ""],
        &["list", "--limit", "0"],
        &["show", "abc"],
        &["show"],
    ] {
        let (status, stdout, stderr) = cli(&db, args);
        assert_eq!(status, 2, "{args:?}: {stdout}{stderr}");
        let line = one_line(&stderr);
        assert!(
            line.starts_with("taskrunner-cli: ") && line.ends_with("(see --help)"),
            "{args:?}: {line}"
        );
    }
    assert_eq!(db.row(pending).await.result, None);
    assert_eq!(db.row(ended).await.result.as_deref(), Some("FINISHED"));
}

/// Runs `taskrunner-cli --database-url URL COMMAND` in `scratch`, which must
/// fail with one line of error saying each of `says`.
fn one_failure_line_says(scratch: &Scratch, url: &str, command: &str, says: &[&str]) {
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", url, command]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    for text in says {
        assert!(line.contains(text), "{line}");
    }
}

async fn migrate_says_what_it_did(backend: Backend) {
    let db = TestDb::unmigrated(backend).await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains(": created (version "), "{stdout}");
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(stdout.contains(": up to date (version "), "{stdout}");
    let latest = db
        .scalar("SELECT max(version) FROM task_runner_schema_migrations")
        .await;
    // Forget the last migration (it can run again: it replaces an index).
    db.execute("DELETE FROM task_runner_schema_migrations WHERE version = 3")
        .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    if latest == 3 {
        assert!(
            stdout.contains(": upgraded from version 2 to 3"),
            "{stdout}"
        );
    } else {
        assert!(stdout.contains(": up to date"), "{stdout}");
    }
}

/// What the daemon could only reject is refused before a row is written:
/// options that are not YAML (the row would be REJECTED), an empty task
/// type (FAILED as unknown), and an empty `--node` (the row waited for a
/// node "" for ever), `--not-node`, `--queue` or `--unique-key` (a shell
/// variable left unset), each with one line and exit status 2.
async fn enqueue_refuses_options_that_are_not_yaml_and_an_empty_type(backend: Backend) {
    let db = TestDb::new(backend).await;
    for (args, says) in [
        (
            &["enqueue", "NoOp", "--options", "a: [1,"][..],
            "--options: not valid YAML",
        ),
        (&["enqueue", " "][..], "the task type is empty"),
        (
            &["enqueue", "NoOp", "--node", ""][..],
            "--node: the value is empty",
        ),
        (
            &["enqueue", "NoOp", "--not-node", ""][..],
            "--not-node: the value is empty",
        ),
        (
            &["enqueue", "NoOp", "--queue", " "][..],
            "--queue: the value is empty",
        ),
        (
            &["enqueue", "NoOp", "--unique-key", ""][..],
            "--unique-key: the value is empty",
        ),
    ] {
        let (status, stdout, stderr) = cli(&db, args);
        assert_eq!(status, 2, "{args:?}: {stdout}{stderr}");
        assert!(one_line(&stderr).contains(says), "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        0
    );
    // YAML, and no options at all, are fine.
    for args in [
        &["enqueue", "NoOp", "--options", "a: [1, 2]"][..],
        &["enqueue", "NoOp", "--options", ""],
    ] {
        let (status, _, stderr) = cli(&db, args);
        assert_eq!(status, 0, "{stderr}");
    }
}

/// `enqueue --delay 99999999999d` wrote a row on SQLite that ran at once:
/// its time arithmetic past the year 9999 gives no time at all (NULL, no
/// delay); PostgreSQL and MariaDB failed with their database's error
/// ("timestamp out of range", "datetime field overflow"). A wait (`--delay`, `--at`, `--period`) of more than fifty years
/// is refused with one line, and no row is written.
async fn enqueue_refuses_a_wait_of_more_than_fifty_years(backend: Backend) {
    let db = TestDb::new(backend).await;
    for args in [
        &["enqueue", "NoOp", "--delay", "99999999999d"][..],
        &["enqueue", "NoOp", "--delay", "18263d"],
        &["enqueue", "NoOp", "--period", "36500d"],
        &["enqueue", "NoOp", "--at", "9999-12-31T23:59:59-05:00"],
        &["enqueue", "NoOp", "--at", "2090-01-01"],
    ] {
        let (status, stdout, stderr) = cli(&db, args);
        assert_eq!(status, 2, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains("more than 50 years"), "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        0
    );
    // Up to fifty years is a wait like any other.
    for args in [
        &["enqueue", "NoOp", "--delay", "18262d"][..],
        &["enqueue", "NoOp", "--at", "2070-01-01"],
        &["enqueue", "NoOp", "--period", "3650d"],
    ] {
        let (status, _, stderr) = cli(&db, args);
        assert_eq!(status, 0, "{args:?}: {stderr}");
    }
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE delay_until > {}",
            crate::util::sql_now_plus(backend, 40 * 365 * 86_400)
        ))
        .await,
        2
    );
}

/// `batch create --on-complete ""` (a shell variable left unset) stored a
/// callback of type "": at the batch's end it failed as an unknown type,
/// every try, and the callback was lost. `batch create` now refuses an
/// empty or too long callback name as `enqueue` does: one line, exit
/// status 2, no batch written.
async fn batch_create_refuses_the_callback_names_enqueue_refuses(backend: Backend) {
    let db = TestDb::new(backend).await;
    let long = "x".repeat(256);
    for (flag, value, says) in [
        ("--on-complete", "", "--on-complete: the value is empty"),
        ("--on-failure", " ", "--on-failure: the value is empty"),
        (
            "--on-complete",
            long.as_str(),
            "--on-complete: a name is at most 255 characters",
        ),
    ] {
        let (status, stdout, stderr) = cli(&db, &["batch", "create", flag, value]);
        assert_eq!(status, 2, "{flag} {value:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(says) && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert!(stdout.is_empty(), "{stdout}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches").await,
        0
    );
    let (status, _, stderr) = cli(&db, &["batch", "create", "--on-complete", "Done"]);
    assert_eq!(status, 0, "{stderr}");
}

/// `run` copies the task's standard error to its own on a thread of its
/// own (a standard error nobody reads blocks only that thread), and exited
/// once the task had: what the thread had not written yet was lost (a
/// loaded CI machine lost all of an SDK task's error line). It now waits
/// for that thread, for a bounded while, before it says how the task ended.
async fn run_shows_all_of_the_tasks_standard_error_before_it_exits(backend: Backend) {
    let db = TestDb::new(backend).await;
    std::fs::write(
        db.scratch.join("taskrunner.yml"),
        "tasks:\n  Loud:\n    command: [/bin/sh, -c, 'i=0; while [ $i -lt 400 ]; do echo \"line $i of the error\" >&2; i=$((i+1)); done; exit 3']\n",
    )
    .unwrap();
    for _ in 0..5 {
        let (status, _, stderr) = cli(&db, &["run", "Loud"]);
        assert_eq!(status, 1, "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 401, "{stderr}");
        assert_eq!(lines[399], "line 399 of the error", "{stderr}");
        assert!(lines[400].starts_with("FAILED: exit status 3"), "{stderr}");
    }
}

/// Names longer than the 255-character columns that hold them: MariaDB
/// refused the row with its own error, SQLite and PostgreSQL stored it,
/// and a callback's name was refused only at its parent's end, when the
/// callback could not be made (a line in the daemon's log). Now `enqueue`
/// refuses each with one line and writes nothing.
async fn enqueue_refuses_names_longer_than_their_columns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let long = "x".repeat(256);
    for flag in [
        "--on-success",
        "--on-failure",
        "--queue",
        "--node",
        "--not-node",
        "--unique-key",
    ] {
        let (status, stdout, stderr) = cli(&db, &["enqueue", "NoOp", flag, &long]);
        assert_eq!(status, 2, "{flag}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("{flag}: a name is at most 255 characters"))
                && stderr.contains("has 256")
                && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    let (status, _, stderr) = cli(&db, &["enqueue", &long]);
    assert_eq!(status, 2, "{stderr}");
    let (status, _, stderr) = cli(&db, &["enqueue", "NoOp", "--on-success", ""]);
    assert_eq!(status, 2, "{stderr}");
    assert!(
        stderr.contains("--on-success: the value is empty"),
        "{stderr}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        0
    );
    // 255 characters fit.
    let fits = "é".repeat(255);
    let (status, _, stderr) = cli(
        &db,
        &[
            "enqueue",
            "NoOp",
            "--on-success",
            &fits,
            "--unique-key",
            &fits,
        ],
    );
    assert_eq!(status, 0, "{stderr}");
}

/// `retry` of an ended row whose `unique_key` a newer request, not ended,
/// holds: the unique index refuses it. Before, `retry` failed with the
/// database's `UNIQUE constraint failed` and stopped there, leaving the
/// other ids it was given (or its filter selected) untouched. Now it names
/// the holder and goes on with the rest.
async fn retry_of_a_row_whose_unique_key_is_held_names_the_holder_and_goes_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ended = db
        .insert_row(
            NewRow::new("NoOp")
                .unique_key("nightly")
                .ended(backend, "FINISHED", 1, 60),
        )
        .await;
    let holder = db
        .insert_row(
            NewRow::new("NoOp")
                .unique_key("nightly")
                .delayed(backend, 3600),
        )
        .await;
    let failed = db
        .insert_row(NewRow::new("NoOp").exhausted(backend, 1, 60))
        .await;
    let (status, stdout, stderr) = cli(&db, &["retry", &ended.to_string(), &failed.to_string()]);
    assert_eq!(status, 1, "{stdout}{stderr}");
    assert_eq!(
        one_line(&stderr),
        format!(
            "taskrunner-cli: request {ended} was not retried: request {holder}, not ended yet, \
             holds its unique_key `nightly` (at most one pending or running request per key); \
             cancel or wait for it first"
        )
    );
    assert!(
        stdout.contains(&format!("request {failed} will run again")),
        "{stdout}"
    );
    assert_eq!(db.row(failed).await.result, None);
    assert_eq!(db.row(ended).await.result.as_deref(), Some("FINISHED"));
}

/// Runs `taskrunner-cli migrate` in `count` processes at once; returns
/// each one's (status, stdout, stderr).
fn migrate_at_once(db: &TestDb, count: usize) -> Vec<(i32, String, String)> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..count)
            .map(|_| scope.spawn(|| cli(db, &["migrate"])))
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    })
}

/// Daemons started together (and `taskrunner-cli migrate` beside them)
/// each migrate the schema: they take turns, none fails, and only one
/// says it created the schema.
async fn processes_migrating_at_once_take_turns_and_each_says_what_it_did(backend: Backend) {
    let db = TestDb::unmigrated(backend).await;
    let runs = migrate_at_once(&db, 6);
    let said: Vec<&str> = runs.iter().map(|(_, stdout, _)| stdout.as_str()).collect();
    for (status, stdout, stderr) in &runs {
        assert_eq!(*status, 0, "{stdout}{stderr}");
        assert!(!stdout.contains("repaired"), "{said:?}");
    }
    let created = said
        .iter()
        .filter(|s| s.contains(": created (version "))
        .count();
    let up_to_date = said
        .iter()
        .filter(|s| s.contains(": up to date (version "))
        .count();
    assert_eq!((created, up_to_date), (1, 5), "{said:?}");
}

/// A new SQLite file that an application is writing to (its first rows,
/// in SQLite's default rollback journal) holds `migrate` back until the
/// application commits; then `migrate` creates the schema. Before, the
/// switch to write-ahead logging that each connection makes failed at once
/// with "database is locked": SQLite does not wait for that lock with its
/// busy handler. Processes started together on a new file (two daemons and
/// `migrate` from their init scripts) failed the same way, now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrate_waits_for_an_applications_write_to_a_new_file() {
    let db = TestDb::unmigrated(Backend::Sqlite).await;
    let application = db.holding("BEGIN IMMEDIATE").await;
    let mut migrate = spawn_cli(&db, &["migrate"]);
    let database = db.scratch.join("requests.db");
    let has_it_open = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == database))
    };
    wait_until(WAIT, "migrate opening the database", || {
        has_it_open(migrate.id()) || migrate.try_wait().unwrap().is_some()
    });
    // Long enough for a `migrate` that does not wait to have failed.
    let ended_meanwhile = within(Duration::from_millis(300), || {
        migrate.try_wait().unwrap().is_some()
    });
    drop(application);
    let output = migrate.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "{}: {stdout}{stderr}",
        output.status
    );
    assert!(
        !ended_meanwhile,
        "it ended while the application wrote: {stdout}"
    );
    assert!(stdout.contains(": created (version "), "{stdout}");
}

/// A schema two migrations behind (version 10: without migration 11's
/// column and indexes and migration 12's) is upgraded by those migrations
/// alone, by several processes at once: not taken for tables missing
/// indexes and rebuilt (every table dropped and copied back, while other
/// daemons may be using them).
async fn an_upgrade_adds_the_later_indexes_in_place_without_a_rebuild(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The newest migration (MariaDB/MySQL has one of its own).
    let latest = latest_migration(backend);
    let id = db.enqueue("NoOp", Some("a: 1")).await;
    let was_due = db
        .insert_row(NewRow::new("NoOp").delayed(backend, -1))
        .await;
    let tomorrow = db
        .insert_row(NewRow::new("NoOp").delayed(backend, 86_400))
        .await;
    // An application's table with a foreign key to the requests: an upgrade
    // (unlike a repair) changes the table in place, and keeps it working.
    db.create_referencing_table(
        "reports",
        "request_id",
        "task_runner_requests",
        "ON DELETE CASCADE",
    )
    .await;
    db.execute(&format!("INSERT INTO reports (request_id) VALUES ({id})"))
        .await;
    // Migrations 17 (MariaDB's 18), 16 (MariaDB's 17), 15 (MariaDB's 16),
    // 14, 12 and 11 undone: no notes of what ends made, no trigger
    // counting a row that joins a batch by an update,
    // no daemons' leases, no pauses' table, version 10's claim indexes,
    // without their columns. (Migration 13, and MariaDB's 15, are only
    // unrecorded: they make their triggers again when run again.)
    let runnable = "WHERE pid IS NULL \
          AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')) \
          AND tries < try_limit";
    let undo: Vec<String> = match backend {
        Backend::Sqlite | Backend::Postgres => {
            let indexes = [
                ("runnable", "priority DESC, id"),
                ("runnable_of_queue", "queue, priority DESC, id"),
                ("runnable_of_type", "task_class_name, priority DESC, id"),
            ];
            let mut undo = follow_ups_undone(backend);
            undo.extend([
                match backend {
                    Backend::Postgres => {
                        "DROP TRIGGER task_runner_requests_batch_join ON task_runner_requests; \
                                          DROP FUNCTION task_runner_requests_batch_join()"
                    }
                    _ => "DROP TRIGGER task_runner_requests_batch_join",
                }
                .to_string(),
                "ALTER TABLE task_runner_daemons DROP COLUMN lease_ms".to_string(),
                "DROP TABLE task_runner_pauses".to_string(),
                "DROP INDEX task_runner_requests_next_of".to_string(),
                "ALTER TABLE task_runner_requests DROP COLUMN next_of".to_string(),
                "DROP INDEX task_runner_requests_waiting".to_string(),
            ]);
            if backend == Backend::Postgres {
                // The trigger as migration 1 made it.
                undo.push(
                    "DROP TRIGGER task_runner_requests_notify ON task_runner_requests; \
                     CREATE TRIGGER task_runner_requests_notify \
                     AFTER INSERT OR UPDATE OF result, pid, delay_until ON task_runner_requests \
                     FOR EACH ROW WHEN (NEW.pid IS NULL AND (NEW.result IS NULL \
                       OR NEW.result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))) \
                     EXECUTE FUNCTION task_runner_requests_notify()"
                        .into(),
                );
            }
            undo.extend(
                indexes
                    .iter()
                    .map(|(name, _)| format!("DROP INDEX task_runner_requests_{name}")),
            );
            undo.push("ALTER TABLE task_runner_requests DROP COLUMN delay_passed_at".into());
            undo.extend(indexes.iter().map(|(name, columns)| {
                format!("CREATE INDEX task_runner_requests_{name} ON task_runner_requests ({columns}) {runnable}")
            }));
            undo
        }
        Backend::MySql => follow_ups_undone(backend)
            .into_iter()
            .chain([
            "DROP TRIGGER task_runner_requests_batch_join".into(),
            "ALTER TABLE task_runner_daemons DROP COLUMN lease_ms".into(),
            "DROP TABLE task_runner_pauses".into(),
            "DROP INDEX task_runner_requests_next_of ON task_runner_requests".into(),
            "ALTER TABLE task_runner_requests DROP COLUMN next_of".into(),
            "DROP INDEX task_runner_requests_ready ON task_runner_requests".into(),
            "DROP INDEX task_runner_requests_ready_of_queue ON task_runner_requests".into(),
            "DROP INDEX task_runner_requests_waiting ON task_runner_requests".into(),
            "DROP INDEX task_runner_requests_runnable_of_type ON task_runner_requests".into(),
            "ALTER TABLE task_runner_requests DROP COLUMN waiting_until, DROP COLUMN ready_rank, \
             DROP COLUMN delay_passed_at"
                .into(),
            "CREATE INDEX task_runner_requests_runnable_of_type \
             ON task_runner_requests (task_class_name, claim_rank, id)"
                .into(),
        ])
        .collect(),
    };
    // In one call, on one connection: SQLite prepares a CREATE INDEX with
    // the schema its connection last read, so another connection of the
    // pool can still see the index just dropped ("already exists").
    match backend {
        Backend::Sqlite | Backend::Postgres => db.execute(&undo.join("; ")).await,
        Backend::MySql => {
            for statement in &undo {
                db.execute(statement).await;
            }
        }
    }
    db.execute(
        "DELETE FROM task_runner_schema_migrations WHERE version IN (11, 12, 13, 14, 15, 16, 17, 18, 19)",
    )
    .await;
    let runs = migrate_at_once(&db, 4);
    let said: Vec<&str> = runs.iter().map(|(_, stdout, _)| stdout.as_str()).collect();
    for (status, stdout, stderr) in &runs {
        assert_eq!(*status, 0, "{stdout}{stderr}");
    }
    let upgraded = said
        .iter()
        .filter(|s| s.contains(&format!(": upgraded from version 10 to {latest}")))
        .count();
    assert_eq!(upgraded, 1, "{said:?}");
    assert!(
        said.iter()
            .all(|s| s.contains(": upgraded") || s.contains(": up to date")),
        "{said:?}"
    );
    // The indexes are back: a check finds nothing to repair.
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(
        stdout.contains(&format!(": up to date (version {latest})")),
        "{stdout}"
    );
    assert_eq!(db.row(id).await.options.as_deref(), Some("a: 1"));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM reports WHERE request_id = {id}"
        ))
        .await,
        1
    );
    // The rows delayed before the upgrade: the one due runs, the other waits.
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(was_due, "FINISHED", WAIT).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(db.row(tomorrow).await.result, None);
    assert!(daemon.stop().success());
}

/// The newest migration (MariaDB/MySQL has two of its own, the second
/// refusing the lowest priority; SQLite's 18 normalises the cancels an
/// application writes and its 19 the names written as BLOBs; PostgreSQL's
/// 18 notifies on more tries).
fn latest_migration(backend: Backend) -> i64 {
    match backend {
        Backend::MySql | Backend::Sqlite => 19,
        Backend::Postgres => 18,
    }
}

/// The migration that notes apart what a request's end made: 17, MariaDB's 18.
fn follow_ups_migration(backend: Backend) -> i64 {
    match backend {
        Backend::MySql => 18,
        Backend::Sqlite | Backend::Postgres => 17,
    }
}

/// The statements that undo migration 17 (MariaDB's 18): the notes of what
/// requests' ends made, and their trigger.
fn follow_ups_undone(backend: Backend) -> Vec<String> {
    let trigger = match backend {
        Backend::Postgres => {
            "DROP TRIGGER task_runner_requests_follow_ups_gone ON task_runner_requests; \
             DROP FUNCTION task_runner_requests_follow_ups_gone()"
        }
        Backend::Sqlite | Backend::MySql => "DROP TRIGGER task_runner_requests_follow_ups_gone",
    };
    vec![trigger.into(), "DROP TABLE task_runner_follow_ups".into()]
}

/// Migration 17 (MariaDB's 18) notes apart what a request's end made, so
/// that retention's deleting it does not let a retried row make it again;
/// an upgrade notes what the rows already there say was made (a next
/// occurrence's `next_of`, a callback's `callback_of` and `unique_key`),
/// and nothing for a row gone or an application's row of no cause.
async fn an_upgrade_notes_what_the_rows_already_there_made(backend: Backend) {
    let db = TestDb::new(backend).await;
    let cause = db
        .insert_row(NewRow::new("Nightly").period(60).exhausted(backend, 1, 60))
        .await;
    for (columns, values) in [
        ("next_of", format!("{cause}")),
        (
            "callback_of, unique_key",
            format!("{cause}, 'request:{cause}:failure'"),
        ),
        (
            "callback_of, unique_key",
            format!("{cause}, 'flow:{cause}:exhausted'"),
        ),
        ("next_of", "999999".to_string()),
    ] {
        db.execute(&format!(
            "INSERT INTO task_runner_requests (task_class_name, {columns}) VALUES ('Made', {values})"
        ))
        .await;
    }
    for statement in follow_ups_undone(backend) {
        db.execute(&statement).await;
    }
    let latest = latest_migration(backend);
    db.execute(&format!(
        "DELETE FROM task_runner_schema_migrations WHERE version >= {}",
        follow_ups_migration(backend)
    ))
    .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("to {latest}")), "{stdout}");
    let noted = |cause_name: &str| {
        format!(
            "SELECT count(*) FROM task_runner_follow_ups WHERE request_id = {cause} AND cause = '{cause_name}'"
        )
    };
    assert_eq!(db.scalar(&noted("next")).await, 1);
    assert_eq!(db.scalar(&noted("failure")).await, 1);
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_follow_ups")
            .await,
        2
    );
}

/// A rolling upgrade: a newer release migrated the schema (here a made-up
/// migration 99 that replaced an index with a column) while an older
/// daemon or CLI still runs somewhere. The older one must refuse with one
/// line and touch nothing. Before, it took the index it no longer found
/// for a damaged schema and rebuilt the tables by its own migrations,
/// dropping the newer column (and its values) and the newer migration's record.
async fn a_schema_newer_than_the_binary_is_refused_and_left_as_it_is(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db.enqueue("NoOp", None).await;
    db.execute(
        "INSERT INTO task_runner_schema_migrations \
           (version, description, installed_on, success, checksum, execution_time) \
         SELECT 99, 'from a newer release', installed_on, success, checksum, execution_time \
           FROM task_runner_schema_migrations WHERE version = 14",
    )
    .await;
    db.execute(match backend {
        Backend::MySql => "DROP INDEX task_runner_requests_waiting ON task_runner_requests",
        Backend::Sqlite | Backend::Postgres => "DROP INDEX task_runner_requests_waiting",
    })
    .await;
    db.execute("ALTER TABLE task_runner_requests ADD COLUMN added_by_99 BIGINT")
        .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET added_by_99 = 7 WHERE id = {id}"
    ))
    .await;
    let says = |line: &str| {
        assert!(line.contains("migration(s) 0099"), "{line}");
        assert!(
            line.contains("upgrade taskrunnerd and taskrunner-cli"),
            "{line}"
        );
    };
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 1, "{stdout}{stderr}");
    says(one_line(&stderr));
    // A daemon exits 1 with the same line, at once (retrying cannot fix it).
    let (code, log) = db.daemon("d").refused();
    assert_eq!(code, Some(1), "{log}");
    says(&log);
    assert!(!log.contains("rebuilding"), "{log}");
    // Nothing was touched.
    assert_eq!(
        db.scalar(&format!(
            "SELECT added_by_99 FROM task_runner_requests WHERE id = {id}"
        ))
        .await,
        7
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_schema_migrations WHERE version = 14")
            .await,
        1
    );
}

/// A daemon started while another process migrates the schema (and holds
/// its turn: a long upgrade, or a stuck `migrate`) waits, and SIGTERM stops
/// it there (before: it waited for the turn, deaf to signals).
async fn a_daemon_waiting_for_another_processs_migration_stops_when_told(backend: Backend) {
    let db = TestDb::unmigrated(backend).await;
    // The other process's turn, held on a connection of the test's.
    let holder = db
        .holding(match backend {
            // SQLite's turn is its write lock.
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "SELECT pg_advisory_lock(hashtext('taskrunner:migrate'))",
            Backend::MySql => {
                "SELECT GET_LOCK(CONCAT('taskrunner:migrate:', LEFT(SHA1(DATABASE()), 32)), 0)"
            }
        })
        .await;
    let config = db.daemon("d").write_config();
    let mut daemon = Daemon::start_with_config(&config, &[]);
    let waiting = match backend {
        Backend::Sqlite => "database is locked",
        Backend::Postgres | Backend::MySql => "waiting for another process to end its migration",
    };
    daemon.wait_for_log(waiting, WAIT);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", daemon.log_text());
    assert!(!daemon.log_text().contains("taskrunnerd started"));
    drop(holder);
}

#[test]
fn missing_sqlite_file_says_to_migrate() {
    let scratch = Scratch::new("missing-db");
    let url = format!("sqlite://{}", scratch.join("requests.db").display());
    one_failure_line_says(
        &scratch,
        &url,
        "list",
        &["requests.db does not exist yet", "taskrunner-cli migrate"],
    );
    assert!(
        !scratch.join("requests.db").exists(),
        "list creates nothing"
    );
}

#[test]
fn missing_sqlite_directory_is_named() {
    let scratch = Scratch::new("missing-dir");
    let url = format!("sqlite://{}", scratch.join("nowhere/requests.db").display());
    one_failure_line_says(
        &scratch,
        &url,
        "migrate",
        &[
            "the directory ",
            "nowhere of the SQLite database",
            "does not exist",
        ],
    );
}

/// Runs the CLI as user `nobody` (the tests run as root, which passes every
/// permission check); skipped when not root.
fn cli_as_nobody(dir: &std::path::Path, args: &[&str]) -> Option<(i32, String)> {
    if !crate::util::runs_as_root("needs root to run as another user") {
        return None;
    }
    let output = Command::new("runuser")
        .args(["-u", "nobody", "--", CLI])
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("runuser");
    Some((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn permission_denied_names_the_directory_or_file_and_the_user() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("perm");
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Every directory above must be enterable by nobody.
    let db = scratch.join("requests.db");
    let url = format!("sqlite://{}", db.display());
    // A directory nobody cannot write: no database can be created there.
    let Some((status, stderr)) = cli_as_nobody(&scratch.path, &["--database-url", &url, "migrate"])
    else {
        return;
    };
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.starts_with("taskrunner-cli: permission denied: user nobody (uid "),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "directory {} (owner root:root, mode 0755)",
            scratch.path.display()
        )),
        "{line}"
    );
    // A file nobody cannot write.
    assert_eq!(
        bare_cli(&scratch.path, &["--database-url", &url, "migrate"]).0,
        0
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, stderr) =
        cli_as_nobody(&scratch.path, &["--database-url", &url, "enqueue", "NoOp"]).unwrap();
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.contains(&format!(
            "cannot write the file {} (owner root:root, mode 0644)",
            db.display()
        )),
        "{line}"
    );
}

#[test]
fn refused_postgres_connection_names_host_and_port() {
    let port = crate::util::free_port();
    let scratch = Scratch::new("refused");
    let url = format!("postgres://taskrunner@127.0.0.1:{port}/tasks");
    one_failure_line_says(
        &scratch,
        &url,
        "list",
        &[&format!(
            "PostgreSQL at 127.0.0.1:{port}: connection refused"
        )],
    );
}

#[test]
fn unknown_postgres_host_is_named() {
    let scratch = Scratch::new("unknown-host");
    let url = "postgres://taskrunner@no-such-host.invalid/tasks";
    one_failure_line_says(
        &scratch,
        url,
        "list",
        &["unknown host `no-such-host.invalid`"],
    );
}

#[test]
fn missing_postgres_database_says_createdb() {
    let admin = crate::util::postgres_admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let url = format!("{base}/taskrunner_never_created");
    let scratch = Scratch::new("no-pg-db");
    one_failure_line_says(
        &scratch,
        &url,
        "list",
        &["\"taskrunner_never_created\" does not exist: create it (createdb"],
    );
}

async fn enqueue_sets_every_column_an_app_can_set(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (status, stdout, stderr) = cli(
        &db,
        &[
            "enqueue",
            "NoOp",
            "--queue",
            "mail",
            "--node",
            "n1",
            "--not-node",
            "n2",
            "--period",
            "1h",
            "--priority",
            "-3",
            "--unique-key",
            "k1",
            "--try-limit",
            "2",
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    let id: i64 = stdout.trim().parse().unwrap();
    let (status, stdout, stderr) = cli(&db, &["show", &id.to_string(), "--json"]);
    assert_eq!(status, 0, "{stderr}");
    let row: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(row["queue"], "mail");
    assert_eq!(row["node"], "n1");
    assert_eq!(row["not_node"], "n2");
    assert_eq!(row["period"], 3600);
    assert_eq!(row["priority"], -3);
    assert_eq!(row["unique_key"], "k1");
    assert_eq!(row["try_limit"], 2);
    // The unique key holds: the same id again.
    let (_, again, _) = cli(&db, &["enqueue", "NoOp", "--unique-key", "k1"]);
    assert_eq!(again.trim(), id.to_string());
    // Without --queue, the column default.
    let (_, plain, _) = cli(&db, &["enqueue", "NoOp"]);
    let plain = db.row(RequestId(plain.trim().parse().unwrap())).await;
    assert_eq!(plain.queue, "default");
    // Bad values are one usage line.
    let (status, _, stderr) = cli(&db, &["enqueue", "NoOp", "--period", "0s"]);
    assert_eq!(status, 2, "{stderr}");
}

async fn list_filters_by_type_queue_host_and_state_and_shows_due_times(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = db.insert_row(NewRow::new("Alpha").queue("qa")).await;
    let b = db
        .insert_row(
            NewRow::new("Beta")
                .queue("qb")
                .host("hostb")
                .result("FAILED")
                .tries(3)
                .try_limit(3)
                .result_text("exit status 1"),
        )
        .await;
    let c = db
        .insert_row(NewRow::new("Alpha").delay_until("2099-01-02 03:04:05"))
        .await;
    let d = db
        .insert_row(
            NewRow::new("Beta")
                .result("FAILED")
                .tries(1)
                .try_limit(3)
                .delay_until("2099-01-02 03:04:05"),
        )
        .await;
    let ids = |args: &[&str]| -> Vec<i64> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = cli(&db, &all);
        assert_eq!(status, 0, "{stderr}");
        stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(ids(&[]), vec![d.0, c.0, b.0, a.0]);
    assert_eq!(ids(&["--task", "Alpha"]), vec![c.0, a.0]);
    assert_eq!(ids(&["--queue", "qb"]), vec![b.0]);
    assert_eq!(ids(&["--host", "hostb"]), vec![b.0]);
    assert_eq!(ids(&["--result", "exhausted"]), vec![b.0]);
    assert_eq!(ids(&["--result", "retrying"]), vec![d.0]);
    assert_eq!(ids(&["--state", "pending"]), vec![c.0, a.0]);
    assert_eq!(ids(&["--result", "failed"]), vec![d.0, b.0]);
    assert_eq!(
        ids(&["--task", "Beta", "--result", "pending"]),
        Vec::<i64>::new()
    );
    let (status, _, stderr) = cli(&db, &["list", "--result", "DONE"]);
    assert_eq!(status, 2);
    assert!(stderr.contains("unknown state `DONE`"), "{stderr}");
    // The table says when delayed rows are due.
    let (_, table, _) = cli(&db, &["list"]);
    assert!(
        table.contains("pending (due 2099-01-02 03:04:05)"),
        "{table}"
    );
    assert!(
        table.contains("FAILED (retry due 2099-01-02 03:04:05)"),
        "{table}"
    );
    assert!(table.contains("FAILED (exhausted)"), "{table}");
}

async fn list_and_cancel_filter_by_batch(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id_of = |args: &[&str]| -> String {
        let (status, stdout, stderr) = cli(&db, args);
        assert_eq!(status, 0, "{stderr}");
        stdout.trim().to_string()
    };
    let batch = id_of(&["batch", "create", "--open", "--on-complete", "Done"]);
    let other = id_of(&["batch", "create", "--open"]);
    let m1 = id_of(&["enqueue", "NoOp", "--batch", &batch]);
    let m2 = id_of(&["enqueue", "NoOp", "--batch", &batch]);
    let stranger = id_of(&["enqueue", "NoOp", "--batch", &other]);
    let _loose = id_of(&["enqueue", "NoOp"]);
    let listed = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = cli(&db, &all);
        assert_eq!(status, 0, "{stderr}");
        stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
            .collect()
    };
    assert_eq!(listed(&["--batch", &batch]), vec![m2.clone(), m1.clone()]);
    // The batch's callback is listed with its members.
    let callback = db
        .insert_row(NewRow::new("Done").callback_of_batch(batch.parse().unwrap()))
        .await;
    assert_eq!(
        listed(&["--batch", &batch]),
        vec![callback.0.to_string(), m2.clone(), m1.clone()]
    );
    assert_eq!(listed(&["--batch", &batch, "--result", "pending"]).len(), 3);
    assert_eq!(listed(&["--batch", "999999"]), Vec::<String>::new());
    // cancel by filter touches only the batch's rows.
    let (status, out, stderr) = cli(&db, &["cancel", "--batch", &batch, "--task", "NoOp"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(out.contains('2'), "{out}");
    assert_eq!(
        listed(&["--result", "CANCELLED"]),
        vec![m2.clone(), m1.clone()]
    );
    // --batch or --flow alone is a filter too (clap asked for ids).
    let (status, out, stderr) = cli(&db, &["cancel", "--batch", &other]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        out.contains(&format!("request {stranger} cancelled")),
        "{out}"
    );
    assert_eq!(listed(&["--result", "CANCELLED"]), vec![stranger, m2, m1]);
    let (status, out, stderr) = cli(&db, &["retry", "--flow", "999999"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(out.contains("no requests match"), "{out}");
}

/// `cancel --batch B` (or the members' ids) of a sealed fail-fast batch:
/// the first member's cancel fails the batch fast, which cancels the
/// other; that one was reported "already CANCELLED: nothing to cancel"
/// and the command exited 1, though every row was cancelled as asked.
async fn cancel_of_a_fail_fast_batchs_members_cancels_each_and_exits_0(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id_of = |args: &[&str]| -> String {
        let (status, stdout, stderr) = cli(&db, args);
        assert_eq!(status, 0, "{stderr}");
        stdout.trim().to_string()
    };
    let sealed_batch = || {
        let batch = id_of(&["batch", "create", "--open", "--on-failure", "Alert"]);
        let members = [
            id_of(&["enqueue", "NoOp", "--batch", &batch]),
            id_of(&["enqueue", "NoOp", "--batch", &batch]),
        ];
        id_of(&["batch", "seal", &batch]);
        (batch, members)
    };
    let (by_filter, _) = sealed_batch();
    let (by_ids, [first, second]) = sealed_batch();
    for args in [
        vec!["cancel", "--batch", by_filter.as_str()],
        vec!["cancel", first.as_str(), second.as_str()],
    ] {
        let (status, out, stderr) = cli(&db, &args);
        assert_eq!(status, 0, "{args:?}: {out}{stderr}");
        assert!(out.contains("cancelled meanwhile"), "{out}");
    }
    for batch in [by_filter, by_ids] {
        let cancelled = format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'CANCELLED'"
        );
        assert_eq!(db.scalar(&cancelled).await, 2);
    }
    // A row cancelled before the command is still refused.
    let (status, _, stderr) = cli(&db, &["cancel", first.as_str()]);
    assert_eq!(status, 1);
    assert!(stderr.contains("already CANCELLED"), "{stderr}");
}

/// `retry --result FAILED` (and `cancel` of a filter) read every column
/// of every matching row at once, their outputs too: 400 failed rows with
/// 256 KiB of output each needed over 100 MiB (200,000 such rows, 50 GB).
/// It reads their ids, states and tries now, within 80 MiB of data.
async fn retry_of_a_filter_reads_only_the_rows_ids_not_their_outputs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let output = match backend {
        Backend::Sqlite => "printf('%.*c', 262144, 'x')",
        Backend::Postgres | Backend::MySql => "repeat('x', 262144)",
    };
    let failed = NewRow::new("NoOp")
        .text("result", "FAILED")
        .number("tries", 1)
        .sql("result_text", output);
    db.insert_copies(failed, 400).await;
    // Its data (heap and private mappings) limited to 80 MiB: the rows'
    // outputs alone are 100 MiB. (Its peak RSS, as `wait4` reports it,
    // counts the test process's too: the child shares its memory until it
    // execs.)
    let mut command = std::process::Command::new(crate::util::CLI);
    command
        .args([
            "--database-url",
            db.url.as_str(),
            "retry",
            "--result",
            "FAILED",
        ])
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit only, in the child before it execs.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 80 << 20,
                rlim_max: 80 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "within 80 MiB of data: {said}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result IS NULL")
            .await,
        400
    );
}

async fn list_shows_the_tasks_own_error_without_progress_lines(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Broken:\n    command: [/bin/sh, -c, 'echo \"progress: 1/2\" >&2; echo \"disk full on /srv\" >&2; echo \"progress: 2/2\" >&2; exit 1']\n",
    );
    let id = db.insert_row(NewRow::new("Broken").try_limit(1)).await;
    let row = db.wait_for_state(id, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert_eq!(
        text.trim_end(),
        "exit status 1\ndisk full on /srv",
        "{text}"
    );
    let (_, table, _) = cli(&db, &["list"]);
    assert!(
        table.contains("exit status 1: disk full on /srv"),
        "{table}"
    );
    assert!(daemon.stop().success());
}

/// A bulk `retry` or `cancel` whose output is piped into a reader that
/// has gone away (`| head -1`) acts on every row it selected, as does a
/// `list` end quietly. Before, the first line written after the pipe
/// closed panicked (`println!` on `EPIPE`), and the rest of the rows were
/// left undone. An argument that is not UTF-8 is refused in one line
/// (it panicked too).
async fn retry_and_cancel_whose_reader_went_away_act_on_every_row(backend: Backend) {
    use std::os::unix::ffi::OsStrExt;
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let row = NewRow::new("Thumbnail")
            .result("FAILED")
            .tries(5)
            .try_limit(5);
        ids.push(db.insert_row(row).await);
    }
    let closed_reader = |args: &[&str]| {
        let mut child = spawn_cli(&db, args);
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (output.status.code(), stderr)
    };
    let (code, stderr) = closed_reader(&["retry", "--result", "FAILED"]);
    assert_eq!(code, Some(0), "{stderr}");
    for &id in &ids {
        assert_eq!(db.row(id).await.result, None, "{stderr}");
    }
    let (code, stderr) = closed_reader(&["cancel", "--task", "Thumbnail"]);
    assert_eq!(code, Some(0), "{stderr}");
    for &id in &ids {
        assert_eq!(
            db.row(id).await.result.as_deref(),
            Some("CANCELLED"),
            "{stderr}"
        );
    }
    let (code, stderr) = closed_reader(&["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    let output = Command::new(CLI)
        .args(["--database-url", db.url.as_str(), "list", "--queue"])
        .arg(std::ffi::OsStr::from_bytes(b"\xff"))
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(one_line(&stderr).contains("UTF-8"), "{stderr}");
}

async fn retry_and_cancel_take_several_ids_or_a_filter(backend: Backend) {
    let db = TestDb::new(backend).await;
    let failed = |task: &str| NewRow::new(task).result("FAILED").tries(5).try_limit(5);
    let t1 = db.insert_row(failed("Thumbnail")).await;
    let t2 = db.insert_row(failed("Thumbnail")).await;
    // Failed with tries left: cancellable (an exhausted row is final).
    let other = db
        .insert_row(NewRow::new("Mail").result("FAILED").tries(1).try_limit(5))
        .await;
    let (status, stdout, stderr) =
        cli(&db, &["retry", "--result", "FAILED", "--task", "Thumbnail"]);
    assert_eq!(status, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2 requests", "{stdout}");
    assert_eq!(lines.len(), 3, "{stdout}");
    for id in [t1, t2] {
        assert_eq!(db.row(id).await.result, None);
    }
    assert_eq!(db.row(other).await.result.as_deref(), Some("FAILED"));
    // Several ids: all cancelled, the count first.
    let (status, stdout, stderr) = cli(
        &db,
        &[
            "cancel",
            &t1.to_string(),
            &t2.to_string(),
            &other.to_string(),
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("3 requests"), "{stdout}");
    for id in [t1, t2, other] {
        assert_eq!(db.row(id).await.result.as_deref(), Some("CANCELLED"));
    }
    // One refused among several: the others done, exit 1.
    let (status, _, stderr) = cli(&db, &["retry", &t1.to_string(), "999999"]);
    assert_eq!(status, 1);
    assert!(stderr.contains("no request 999999"), "{stderr}");
    assert_eq!(db.row(t1).await.result, None);
    // A filter that matches nothing says so.
    let (status, stdout, _) = cli(&db, &["cancel", "--task", "Nothing"]);
    assert_eq!((status, stdout.trim()), (0, "no requests match"));
    // Neither ids nor a filter: usage.
    assert_eq!(cli(&db, &["retry"]).0, 2);
}

/// `retry --result FAILED` selected the rows, then retried each: a row
/// that its daemon's own retry ran to its end meanwhile (FINISHED) was
/// reset and ran again. Each row selected by a filter is now retried only
/// while it is as selected; one that moved on is left, with one line.
async fn a_retry_by_filter_leaves_a_row_that_moved_on_since_it_was_selected(backend: Backend) {
    let db = TestDb::new(backend).await;
    let failed = || {
        NewRow::new("Thumbnail")
            .result("FAILED")
            .tries(5)
            .try_limit(9)
    };
    let first = db.insert_row(failed()).await;
    let second = db.insert_row(failed()).await;
    let retry = std::process::Command::new(CLI)
        .args([
            "--database-url",
            db.url.as_str(),
            "retry",
            "--result",
            "FAILED",
        ])
        .env_remove("DATABASE_URL")
        .env("TASKRUNNER_TEST_BULK_ROW_DELAY_MS", "700")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Oldest first, one each 700 ms.
    db.wait_for(first, Duration::from_secs(10), "retried", |row| {
        row.result.is_none()
    })
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FINISHED', tries = 6 WHERE id = {second}"
    ))
    .await;
    let output = retry.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("taskrunner-cli:"))
        .collect();
    assert_eq!(
        said,
        [format!("taskrunner-cli: request {second} was not retried: it changed since it was selected (FAILED, 5 tries), and is now FINISHED after 6 tries")],
        "{stderr}"
    );
    assert_eq!(db.row(second).await.result.as_deref(), Some("FINISHED"));
    assert_eq!(db.row(first).await.result, None);
}

async fn second_sigterm_during_the_drain_stops_tasks_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "shutdown_timeout: 120s\ntasks:\n  Long:\n    command: [/bin/sleep, '60']\n",
    );
    let id = db.enqueue("Long", None).await;
    db.wait_for_pid(id, WAIT).await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_for_log("shutting down", WAIT);
    let second = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success());
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "stopped at once, not after the 120s drain: {:?}",
        second.elapsed()
    );
    let row = db.row(id).await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:#?}");
    assert!(daemon.log_text().contains("SIGTERM received again"));
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let scratch = Scratch::new("completions");
    for shell in ["bash", "zsh", "fish"] {
        let (status, stdout, stderr) = bare_cli(&scratch.path, &["completions", shell]);
        assert_eq!(status, 0, "{stderr}");
        assert!(stdout.contains("enqueue"), "{shell}: {stdout}");
        assert!(stdout.contains("unique-key"), "{shell}");
    }
    assert_eq!(bare_cli(&scratch.path, &["completions", "tcsh"]).0, 2);
    let dir = scratch.join("man");
    let (status, stdout, stderr) = bare_cli(&scratch.path, &["man", dir.to_str().unwrap()]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.starts_with("wrote "), "{stdout}");
    let enqueue = std::fs::read_to_string(dir.join("taskrunner-cli-enqueue.1")).unwrap();
    assert!(enqueue.contains(".TH taskrunner-cli-enqueue"), "{enqueue}");
    assert!(enqueue.contains("not\\-node"), "{enqueue}");
    assert!(dir.join("taskrunner-cli.1").exists());
}

#[test]
fn flags_appear_only_on_the_commands_that_use_them() {
    let scratch = Scratch::new("help");
    let help = |command: &[&str]| {
        let mut args = command.to_vec();
        args.push("--help");
        let (status, stdout, stderr) = bare_cli(&scratch.path, &args);
        assert_eq!(status, 0, "{stderr}");
        stdout
    };
    let init = help(&["config", "init"]);
    for flag in ["--database-url", "--socket", "--host-id"] {
        assert!(
            !init.contains(flag),
            "config init --help shows {flag}: {init}"
        );
    }
    assert!(help(&["list"]).contains("--database-url"));
    assert!(!help(&["list"]).contains("--socket"));
    assert!(help(&["status"]).contains("--socket"));
    assert!(!help(&["status"]).contains("--database-url"));
    assert!(help(&["reap"]).contains("--host-id"));
    assert!(!help(&["enqueue"]).contains("--host-id"));
    // Given after the command, or before it: both work.
    let url = format!("sqlite://{}", scratch.join("x.db").display());
    assert_eq!(
        bare_cli(&scratch.path, &["migrate", "--database-url", &url]).0,
        0
    );
    assert_eq!(
        bare_cli(&scratch.path, &["--database-url", &url, "list"]).0,
        0
    );
}

/// `run` copies the task's standard error as it comes, not at its end.
#[test]
fn run_shows_the_tasks_stderr_live() {
    let scratch = Scratch::new("run-live");
    let config = scratch.join("taskrunner.yml");
    std::fs::write(
        &config,
        "tasks:\n  Chatty:\n    command: [/bin/sh, -c, 'echo \"progress: starting\" >&2; echo working >&2; exec sleep 60']\n",
    )
    .unwrap();
    let mut child = Command::new(CLI)
        .args(["--config", config.to_str().unwrap(), "run", "Chatty"])
        .current_dir(&scratch.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    wait_until(WAIT, "the task's stderr while it runs", || {
        seen.extend(received.try_iter());
        seen.iter().any(|l| l == "working")
    });
    assert!(child.try_wait().unwrap().is_none(), "still running");
    assert!(seen.iter().any(|l| l == "progress: starting"), "{seen:?}");
    // Ctrl-C stops the task; the reason closes the output.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
}

/// README, "Sharing the SQLite file": an application running as its own user
/// (here `nobody`, in the file's group) enqueues into the service's SQLite
/// file while the daemon (root here) holds it open, its -wal and -shm files
/// included. Needs root (skipped otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_enqueues_into_the_services_sqlite_file() {
    use std::os::unix::fs::PermissionsExt;
    if !crate::util::runs_as_root("needs root to run as another user") {
        return;
    }
    let scratch = Scratch::new("shared-sqlite");
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The recipe: a setgid directory of the shared group, mode 2770; the
    // file created by the daemon's user, then made group-writable.
    let dir = scratch.join("db");
    std::fs::create_dir(&dir).unwrap();
    let group = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup");
    nix::unistd::chown(&dir, None, Some(group.gid)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let db = dir.join("taskrunner.db");
    let url = format!("sqlite://{}", db.display());
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", &url, "migrate"]);
    assert_eq!(status, 0, "{stderr}");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o660)).unwrap();
    let config = scratch.join("taskrunner.yml");
    std::fs::write(
        &config,
        format!("database_url: {url}\npoll_interval: 1s\nheartbeat_interval: 1s\nlease_timeout: 5s\nkill_grace: 2s\n"),
    )
    .unwrap();
    let mut daemon = Daemon::start_with_config(&config, &[]);
    daemon.wait_ready();
    let as_app = |args: &[&str]| {
        let output = Command::new("runuser")
            .args([
                "-u",
                "nobody",
                "-g",
                "nogroup",
                "--",
                CLI,
                "--database-url",
                &url,
            ])
            .args(args)
            .current_dir(&scratch.path)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let store = taskrunner::store::Store::open(&url, taskrunner::store::Purpose::Cli).unwrap();
    for _ in 0..2 {
        let (status, stdout, stderr) = as_app(&["enqueue", "NoOp"]);
        assert_eq!(status, 0, "nobody enqueues: {stderr}");
        let id = RequestId(stdout.trim().parse().unwrap());
        poll(WAIT, &format!("request {id} to run"), async || {
            let row = store.show(id).await.unwrap().unwrap();
            match row.result.as_deref() {
                Some("FINISHED") => Ok(()),
                _ => Err(row),
            }
        })
        .await;
    }
    let wal = std::path::PathBuf::from(format!("{}-wal", db.display()));
    assert!(wal.exists(), "the daemon holds the file in WAL mode");
    let (status, stdout, stderr) = as_app(&["list"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("FINISHED"), "{stdout}");
    store.close().await;
    assert!(daemon.stop().success());
}

/// The service's config gives tasks a working directory the systemd unit
/// leaves writable to the daemon's user (its StateDirectory), not the
/// config's own directory (/etc/taskrunner, read-only under the unit).
#[test]
fn the_service_config_gives_tasks_a_writable_workdir() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let config = taskrunner::config::Config::load_file(std::path::Path::new(&format!(
        "{root}/init/taskrunner.yml"
    )))
    .expect("init/taskrunner.yml loads");
    assert_eq!(
        config.defaults.workdir,
        std::path::PathBuf::from("/var/lib/taskrunner")
    );
    let unit = std::fs::read_to_string(format!("{root}/init/taskrunner.service")).unwrap();
    assert!(unit.contains("\nStateDirectory=taskrunner\n"), "{unit}");
    assert!(unit.contains("\nWorkingDirectory=/var/lib/taskrunner\n"));
}

/// `tasks` lists every type with its source and settings; `tasks NAME` and
/// `enqueue NAME --help` show a type's options: a command type's from the
/// config's `options:`, a task-sdk type's from its options struct (the
/// program's `--help NAME`).
#[test]
fn tasks_and_enqueue_help_show_a_types_options() {
    let scratch = Scratch::new("tasks");
    let example_tasks = std::path::PathBuf::from(crate::util::DAEMON)
        .parent()
        .unwrap()
        .join("example-tasks");
    let config = scratch.join("taskrunner.yml");
    std::fs::write(
        &config,
        format!(
            "programs: [{}]\ntasks:\n  Resize:\n    command: [/bin/cat]\n    timeout: 10m\n    concurrency: 2\n    options:\n      width: pixels, the longer side\n      format: png or jpeg\n",
            example_tasks.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (status, stdout, stderr) = bare_cli(&scratch.path, &["--config", config, "tasks"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("Resize  (command /bin/cat; timeout 10m, concurrency 2"),
        "{stdout}"
    );
    assert!(stdout.contains("WordCount  (program "), "{stdout}");
    assert!(stdout.contains("NoOp  (built in"), "{stdout}");
    let (status, stdout, stderr) =
        bare_cli(&scratch.path, &["--config", config, "tasks", "Resize"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("    width   pixels, the longer side"),
        "{stdout}"
    );
    let (status, stdout, stderr) =
        bare_cli(&scratch.path, &["--config", config, "tasks", "WordCount"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("counts the words of the file `input`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("options: input, output, top, ignore"),
        "{stdout}"
    );
    let (status, stdout, stderr) = bare_cli(
        &scratch.path,
        &["--config", config, "enqueue", "WordCount", "--help"],
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("--unique-key"),
        "the enqueue flags: {stdout}"
    );
    assert!(stdout.contains("Task type WordCount"), "{stdout}");
    assert!(
        stdout.contains("options: input, output, top, ignore"),
        "{stdout}"
    );
    let (status, _, stderr) = bare_cli(&scratch.path, &["--config", config, "tasks", "Nope"]);
    assert_eq!(status, 1);
    assert!(
        one_line(&stderr).contains("unknown task type `Nope`"),
        "{stderr}"
    );
    // A task program's own --help lists its types and their options.
    let output = Command::new(&example_tasks).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        help.contains("Countdown\n  options: from, interval_ms"),
        "{help}"
    );
}

/// `taskrunner-cli run` copies the task's standard error to its own as
/// it comes; when nobody reads that (a pipe left unread by whatever
/// started the CLI), the task's supervision goes on: its timeout fires and
/// the task is stopped. Before, the copy was written in the capture of the
/// task's output, blocked there, and held the timeout (and, with
/// `--record`, the lease's renewal and the cancel): the task ran on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_whose_standard_error_nobody_reads_still_times_out() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.scratch.join("taskrunner.yml");
    let pid_file = db.scratch.join("task.pid");
    std::fs::write(
        &config,
        format!(
            "tasks:\n  Loud:\n    command: [/bin/sh, -c, 'echo $$ > {}; head -c 300000 /dev/zero >&2; exec sleep 60']\n    timeout: 2s\n",
            pid_file.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    // Its stderr is a pipe the test does not read.
    let mut run = spawn_cli(&db, &["--config", &config, "run", "Loud"]);
    let task: i32 = poll(WAIT, "the task to start", async || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or("no pid yet")
    })
    .await;
    poll(
        Duration::from_secs(20),
        "the task stopped at its timeout (2s)",
        async || {
            if crate::util::process_exists(task) {
                Err("running")
            } else {
                Ok(())
            }
        },
    )
    .await;
    // The CLI itself may wait to write its last line to that pipe.
    let _ = run.kill();
    let output = run.wait_with_output().unwrap();
    let echoed = output.stderr.iter().filter(|&&byte| byte == 0).count();
    assert!(echoed >= 60_000, "{echoed} bytes echoed");
}

/// `run --id N --record` claimed the row once and renewed its lease
/// never: a try longer than `lease_timeout` was reaped by a daemon of
/// another host (`CRASHED`, "lease expired") and run again beside the one
/// still running by hand. It now renews the lease as a daemon does, and at
/// least every second: it has no row telling the daemons its lease, and
/// one run with a config of a longer interval (here 5 s, against the
/// daemon's 3 s lease) was reaped all the same.
async fn run_record_keeps_its_rows_lease_while_the_task_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("ran.log");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "host_id: b\nlease_timeout: 3s\nheartbeat_interval: 1s\nkill_grace: 1s\nreap_interval: 1s\n\
             tasks:\n  Slow:\n    command: [/bin/sh, -c, 'echo start >> {l}; sleep 6; echo end >> {l}']\n",
            l = log.display()
        ),
    );
    // Delayed, so that the daemon leaves it to the hand-run.
    let id = db
        .insert_row(NewRow::new("Slow").delayed(backend, 3600))
        .await;
    let config = daemon.config.to_str().unwrap().to_string();
    let longer = db.scratch.join("longer-interval.yml");
    std::fs::write(
        &longer,
        format!(
            "lease_timeout: 20s\nheartbeat_interval: 5s\nkill_grace: 1s\n\
             tasks:\n  Slow:\n    command: [/bin/sh, -c, 'echo start >> {l}; sleep 6; echo end >> {l}']\n",
            l = log.display()
        ),
    )
    .unwrap();
    let (status, stdout, stderr) = cli(
        &db,
        &[
            "--config",
            longer.to_str().unwrap(),
            "--host-id",
            "a",
            "run",
            "--id",
            &id.to_string(),
            "--record",
        ],
    );
    assert_eq!(status, 0, "{stdout}{stderr}\n{}", daemon.log_text());
    let row = db.row(id).await;
    assert_eq!(
        (row.result.as_deref(), row.tries),
        (Some("FINISHED"), 1),
        "{row:#?}\n{stderr}"
    );
    let ran = std::fs::read_to_string(&log).unwrap();
    assert_eq!(ran.lines().collect::<Vec<_>>(), ["start", "end"], "{ran}");
    // A cancel stops it too (before, the task ran to its end, its outcome
    // then made CANCELLED).
    let id = db
        .insert_row(NewRow::new("Slow").delayed(backend, 3600))
        .await;
    let mut run = spawn_cli(
        &db,
        &[
            "--config",
            &config,
            "--host-id",
            "a",
            "run",
            "--id",
            &id.to_string(),
            "--record",
        ],
    );
    db.wait_for_pid(id, Duration::from_secs(30)).await;
    let cancelled_at = Instant::now();
    assert_eq!(cli(&db, &["cancel", &id.to_string()]).0, 0);
    let status = crate::util::poll_blocking(Duration::from_secs(30), "the run to end", || {
        run.try_wait().unwrap().ok_or("still running")
    });
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "the task ran on for {:?} after its cancel",
        cancelled_at.elapsed()
    );
    assert!(!status.success());
    assert_eq!(db.row(id).await.result.as_deref(), Some("CANCELLED"));
    assert!(daemon.stop().success());
}

/// `run --id N --record` records its try through the daemon's sequence
/// (`attempt::run_claimed`): a failed try with tries left gets its backoff,
/// and an exhausted one what its end causes, the config's `on_exhausted`
/// hook included (the CLI's own copy of the sequence left the hook out).
async fn run_record_writes_what_the_daemon_writes(backend: Backend) {
    let db = TestDb::new(backend).await;
    std::fs::write(
        db.scratch.join("taskrunner.yml"),
        "retry_delay: 1h\non_exhausted: Alert\ntasks:\n  Boom:\n    command: [/bin/sh, -c, 'echo broken >&2; exit 1']\n",
    )
    .unwrap();
    let boom = db.insert_row(NewRow::new("Boom").try_limit(2)).await;
    let run_and_record = || cli(&db, &["run", "--id", &boom.to_string(), "--record"]);
    // A type this config does not know: nothing is claimed nor written
    // (before, the try was recorded FAILED as an unknown type).
    let elsewhere = db.insert_row(NewRow::new("Elsewhere").try_limit(1)).await;
    let (status, stdout, stderr) = cli(&db, &["run", "--id", &elsewhere.to_string(), "--record"]);
    assert_eq!(status, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "request {elsewhere}: task type `Elsewhere` is not in this config"
        )) && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    let row = db.row(elsewhere).await;
    assert_eq!((row.result, row.tries), (None, 0));
    let (status, _, stderr) = run_and_record();
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("recorded try 1 of request {boom} as FAILED")),
        "{stderr}"
    );
    let row = db.row(boom).await;
    assert_eq!((row.result.as_deref(), row.tries), (Some("FAILED"), 1));
    assert!(row.delay_until.is_some(), "the retry waits for its backoff");
    assert!(
        row.result_text
            .as_deref()
            .unwrap_or_default()
            .contains("broken"),
        "{:?}",
        row.result_text
    );
    // The last try: the hook's row is written with the outcome.
    let (status, _, stderr) = run_and_record();
    assert_eq!(status, 1, "{stderr}");
    let row = db.row(boom).await;
    assert_eq!((row.result.as_deref(), row.tries), (Some("FAILED"), 2));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE callback_of = {boom} AND task_class_name = 'Alert'"
        ))
        .await,
        1
    );
    // Exhausted: nothing left to claim.
    let (status, _, stderr) = run_and_record();
    assert_eq!(status, 1);
    assert!(stderr.contains("cannot be claimed"), "{stderr}");
}

/// `run --id N --record` wrote its try's outcome once: when the database
/// was down as the try ended (a restart; on SQLite, another writer
/// holding the database past the busy timeout), the run ended with an
/// error, the outcome was lost, and the row stayed RUNNING until a reaper
/// took it as crashed and ran it again. The write is tried again now, the
/// lease kept meanwhile, with one line saying so.
async fn run_record_writes_its_outcome_through_a_database_outage(backend: Backend) {
    let mut server = (backend != Backend::Sqlite).then(|| PrivateServer::start(backend));
    let db = match &server {
        Some(server) => server.test_db().await,
        None => TestDb::new(backend).await,
    };
    let open = write_gate_config(&db);
    let id = db.insert_row(NewRow::new("Gate")).await;
    let mut run = run_record_command(&db, id)
        .env("TASKRUNNER_TEST_SQLITE_BUSY_TIMEOUT_MS", "200")
        .spawn()
        .unwrap();
    let (said, lines) = std::sync::mpsc::channel();
    let stderr = run.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = said.send(line);
        }
    });
    db.wait_for_pid(id, WAIT).await;
    // The database goes away, and then the try ends.
    let held = match &mut server {
        Some(server) => {
            server.stop();
            None
        }
        None => Some(db.hold_after("SELECT 1").await),
    };
    std::fs::write(&open, "").unwrap();
    let mut stderr = Vec::new();
    let ended = crate::util::poll_blocking(WAIT, "the run to fail its outcome's write", || {
        stderr.extend(lines.try_iter());
        if stderr
            .iter()
            .any(|line| line.contains("could not be written"))
        {
            return Ok(None);
        }
        run.try_wait().unwrap().map(Some).ok_or("still running")
    });
    assert!(
        ended.is_none(),
        "the run ended ({ended:?}) before the database was back:\n{}",
        stderr.join("\n")
    );
    match (&mut server, held) {
        (Some(server), _) => server.start_again(),
        (None, Some(held)) => held.release().await,
        (None, None) => unreachable!(),
    }
    let status = crate::util::poll_blocking(WAIT, "the run to end", || {
        run.try_wait().unwrap().ok_or("still running")
    });
    stderr.extend(lines.iter());
    let stderr = stderr.join("\n");
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("recorded try 1 of request {id} as FINISHED")),
        "{stderr}"
    );
    // One line for the outage: the lease's renewals meanwhile say nothing,
    // nor does the one that finds the row written.
    assert!(
        !stderr.contains("renew") && !stderr.contains("no longer holds"),
        "{stderr}"
    );
    let row = db.row(id).await;
    assert_eq!((row.result.as_deref(), row.tries), (Some("FINISHED"), 1));
}

/// On PostgreSQL the purge deleted `WHERE id IN (SELECT id … WHERE
/// prunable LIMIT n)`: a row a `retry` had made runnable while the purge
/// waited for its lock was deleted all the same (in READ COMMITTED, a row
/// changed meanwhile is checked again against the outer `WHERE` only,
/// which named its id alone), after the CLI had said it would run again.
/// The outer `WHERE` now repeats the conditions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_row_retried_while_a_purge_waits_for_it_is_kept() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    let id = db.enqueue("NoOp", None).await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FAILED', tries = 5, try_limit = 5, \
                completed_at = now() - interval '2 hours' WHERE id = {id}"
    ))
    .await;
    // What `retry` writes, its transaction not committed yet.
    let mut retry = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; UPDATE task_runner_requests SET result = NULL, tries = 0, completed_at = NULL \
          WHERE id = {id}"
    )))
    .execute(&mut retry)
    .await
    .unwrap();
    let purge = spawn_cli(&db, &["purge", "--older-than", "1h"]);
    db.wait_for_a_statement_waiting_on_a_lock("DELETE FROM task_runner_requests")
        .await;
    sqlx::raw_sql("COMMIT").execute(&mut retry).await.unwrap();
    let output = purge.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "deleted 0 requests");
    assert_eq!(db.row(id).await.result, None);
}

/// `run --id N --record` whose claim is lost while its try runs (a reaper
/// took the row, someone retried it by hand): the try then finished, its
/// outcome was not recorded, and the run said so, but exited 0, as for a
/// recorded success: a script took the work as done while the row was to
/// run again. It exits 1 now, with the one line.
async fn run_record_whose_claim_was_lost_exits_1_even_when_its_try_finished(backend: Backend) {
    let db = TestDb::new(backend).await;
    let open = write_gate_config(&db);
    let id = db.insert_row(NewRow::new("Gate")).await;
    let run = run_record_command(&db, id).spawn().unwrap();
    db.wait_for_pid(id, WAIT).await;
    // Taken by another claim, then the try ends (most often before the
    // run's next renewal, a second away, sees the row gone and stops it:
    // the run exits 1 then too).
    db.execute(&format!(
        "UPDATE task_runner_requests SET claim_token = 'another-claim' WHERE id = {id}"
    ))
    .await;
    std::fs::write(&open, "").unwrap();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("but the outcome was not recorded (the claim was lost)"),
        "{stderr}"
    );
}

/// `run --id N --record` stopped while its try runs (a Ctrl-Z, `SIGSTOP`,
/// a debugger), on a database several hosts share: nothing renewed the
/// row's lease, and the task ran on; once the lease lapsed, another host's
/// reaper took the row and ran it beside. A fencing watchdog, a daemon's,
/// now kills the task before the lease lapses.
async fn run_record_stopped_has_its_task_killed_before_the_lease_lapses(backend: Backend) {
    let db = TestDb::new(backend).await;
    std::fs::write(
        db.scratch.join("taskrunner.yml"),
        "heartbeat_interval: 2s\nkill_grace: 1s\nlease_timeout: 8s\n\
         tasks:\n  Long:\n    command: [/bin/sleep, '60']\n",
    )
    .unwrap();
    let id = db.insert_row(NewRow::new("Long")).await;
    let run = run_record_command(&db, id).spawn().unwrap();
    let task = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    // SAFETY: signals to the run's own process.
    unsafe { libc::kill(run.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    wait_until(WAIT, "the stopped run's task to be killed", || {
        !crate::util::process_exists(task)
    });
    // The lease (8 s) runs from the run's last renewal, at most 1 s before.
    assert!(
        stopped.elapsed() < Duration::from_secs(7),
        "killed {:?} after the stop",
        stopped.elapsed()
    );
    // SAFETY: as above.
    unsafe { libc::kill(run.id() as i32, libc::SIGCONT) };
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
}

/// `run --id N --record` with a longer lease (20 s) than the daemons' (4 s)
/// is stopped for 8 s (a Ctrl-Z; a network cut off for a while): its own
/// fence and watchdog, by its own lease, let its task run on, but a
/// daemon's reaper judged the row by the daemon's lease alone, took it at
/// 4 s and ran it again beside: two tries at once. The run now writes its
/// lease in `task_runner_daemons`, as a daemon does, and reapers wait for
/// the longer one.
async fn a_run_record_cut_off_for_less_than_its_lease_is_not_reaped_by_a_daemon_of_a_shorter_one(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let (log, open) = (db.scratch.join("starts.log"), db.scratch.join("open"));
    let task = format!(
        "tasks:\n  Once:\n    command: [/bin/sh, -c, 'echo start >> {}; until [ -e {} ]; do sleep 0.02; done']\n",
        log.display(),
        open.display()
    );
    std::fs::write(
        db.scratch.join("taskrunner.yml"),
        format!("heartbeat_interval: 1s\nkill_grace: 2s\nlease_timeout: 20s\n{task}"),
    )
    .unwrap();
    let id = db.insert_row(NewRow::new("Once")).await;
    let run = run_record_command(&db, id).spawn().unwrap();
    db.wait_for_pid(id, WAIT).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "host_id: elsewhere\nheartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 4s\nreap_interval: 1s\n{task}"
        ),
    );
    // SAFETY: signals to the run's own process.
    unsafe { libc::kill(run.id() as i32, libc::SIGSTOP) };
    holds_for(Duration::from_secs(8), "one try, the run's", async || {
        let row = db.row(id).await;
        let starts = std::fs::read_to_string(&log).unwrap_or_default();
        match (row.result.as_deref(), row.tries, starts.lines().count()) {
            (Some("RUNNING"), 1, 1) => Ok(()),
            _ => Err(format!("{row:?}; started {} times", starts.lines().count())),
        }
    })
    .await;
    // SAFETY: as above.
    unsafe { libc::kill(run.id() as i32, libc::SIGCONT) };
    std::fs::write(&open, "").unwrap();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    assert!(daemon.stop().success());
}

/// Writes the scratch directory's `taskrunner.yml` with one task type,
/// `Gate`, whose task waits for the file returned to exist.
fn write_gate_config(db: &TestDb) -> std::path::PathBuf {
    let open = db.scratch.join("open");
    std::fs::write(
        db.scratch.join("taskrunner.yml"),
        format!(
            "tasks:\n  Gate:\n    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.02; done']\n",
            open.display()
        ),
    )
    .unwrap();
    open
}

/// `taskrunner-cli run --id ID --record` in the test's scratch directory
/// (its `taskrunner.yml`), its standard error piped.
fn run_record_command(db: &TestDb, id: RequestId) -> Command {
    let mut command = Command::new(CLI);
    command
        .args([
            "--database-url",
            &db.url,
            "run",
            "--id",
            &id.to_string(),
            "--record",
        ])
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}
