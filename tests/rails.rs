//! Rails: a test database loaded from `schema.rb` (ActiveRecord's default
//! schema format, which drops triggers, SQL defaults and taskrunner's
//! migration records) is repaired by `taskrunner-cli migrate`, and the
//! daemon works on it afterwards. Uses Debian's ruby-activerecord,
//! ruby-sqlite3, ruby-pg and ruby-mysql2 (scripts/test installs them).

use std::process::Command;
use std::time::Duration;

use crate::util::{cli, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    a_missing_trigger_or_index_is_restored_keeping_the_rows,
    a_repair_keeps_the_applications_own_columns,
    a_repair_hands_out_no_id_again,
    a_repair_never_takes_an_applications_foreign_keys_or_views_along,
    a_ruby_class_runs_as_a_task,
    tables_loaded_from_schema_rb_are_repaired_and_run,
    a_repair_keeps_batch_members_and_rows_a_later_rule_refuses,
    a_repair_waits_for_the_daemons_running_on_the_tables,
);

const ROUND_TRIP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/ruby/schema_rb_round_trip.rb"
);

/// Drops an index migration 1 makes: the tables then need a repair.
async fn drop_the_runnable_index(db: &TestDb, backend: Backend) {
    db.execute(match backend {
        Backend::MySql => "DROP INDEX task_runner_requests_runnable ON task_runner_requests",
        Backend::Sqlite | Backend::Postgres => "DROP INDEX task_runner_requests_runnable",
    })
    .await;
}

/// Runs `migrate`, which must refuse with one line saying that nothing
/// was changed; returns that line.
fn migrate_refused(db: &TestDb) -> String {
    let (status, stdout, stderr) = cli(db, &["migrate"]);
    assert_eq!(status, 1, "{stdout}{stderr}");
    let line = stderr.trim().to_string();
    assert_eq!(line.lines().count(), 1, "{stderr}");
    assert!(line.contains("nothing was changed"), "{line}");
    line
}

/// Runs `migrate`, which must succeed; returns what it printed.
fn migrate_succeeds(db: &TestDb) -> String {
    let (status, stdout, stderr) = cli(db, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    stdout
}

/// Dumps `from` to schema.rb with ActiveRecord and loads it into `to`.
fn schema_rb_round_trip(from: &TestDb, to: &TestDb) {
    let schema = to.scratch.join("schema.rb");
    let output = Command::new("ruby")
        .arg(ROUND_TRIP)
        .arg(&from.url)
        .arg(&to.url)
        .arg(&schema)
        .output()
        .expect("running ruby (scripts/test installs ruby and ruby-activerecord)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn tables_loaded_from_schema_rb_are_repaired_and_run(backend: Backend) {
    let development = TestDb::new(backend).await;
    let test = TestDb::unmigrated(backend).await;
    schema_rb_round_trip(&development, &test);
    // Before the repair, the app inserts a row the way Rails does (an ISO
    // timestamp with a zone; on MySQL, Rails' adapter writes UTC without
    // one): it must survive the repair.
    let (created, due) = match backend {
        Backend::MySql => ("2026-01-01 10:00:00", "2000-01-01 00:00:00"),
        Backend::Sqlite | Backend::Postgres => ("2026-01-01T10:00:00Z", "2000-01-01T00:00:00Z"),
    };
    let early = test
        .insert_row(
            NewRow::new("NoOp")
                .text("created_at", created)
                .delay_until(due),
        )
        .await;
    let (status, stdout, stderr) = cli(&test, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains(": repaired tables with later columns but no migration recorded"),
        "{stdout}"
    );
    assert!(stdout.contains("1 rows kept"), "{stdout}");
    // schema.rb holds taskrunner's columns and indexes only: none is taken
    // for the application's own.
    assert!(!stdout.contains("application's"), "{stdout}");
    assert!(!stdout.contains("indexes "), "{stdout}");
    let (_, stdout, _) = cli(&test, &["migrate"]);
    assert!(stdout.contains(": up to date"), "{stdout}");
    // The triggers are back: an application's timestamp is normalised
    // (on MySQL: one written in a session on local time is stored in UTC).
    let later = match backend {
        Backend::MySql => {
            // By hand: the statements the `mysql` client sends.
            let output = crate::util::mysql_client(
                &test.url,
                "SET time_zone = '+02:00'; \
                 INSERT INTO task_runner_requests (task_class_name, delay_until) VALUES ('NoOp', '2000-01-01 02:00:00')",
            )
            .expect("running the mysql client");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let id = test
                .scalar("SELECT max(id) FROM task_runner_requests")
                .await;
            taskrunner::request::RequestId(id)
        }
        Backend::Sqlite | Backend::Postgres => {
            test.insert_row(NewRow::new("NoOp").delay_until("2000-01-01T00:00:00Z"))
                .await
        }
    };
    if backend != Backend::Postgres {
        assert_eq!(
            test.row(later).await.delay_until.as_deref(),
            Some("2000-01-01 00:00:00.000")
        );
    }
    let mut daemon = Daemon::start(&test, "d", "");
    for id in [early, later] {
        test.wait_for_state(id, "FINISHED", WAIT).await;
    }
    // A row enqueued while the daemon runs wakes it at once (PostgreSQL:
    // the NOTIFY trigger restored; MySQL: its wake-up's indexes).
    let (_, stdout, _) = cli(&test, &["enqueue", "NoOp"]);
    let id = taskrunner::request::RequestId(stdout.trim().parse().unwrap());
    test.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

async fn a_missing_trigger_or_index_is_restored_keeping_the_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db.enqueue("NoOp", Some("a: 1")).await;
    match backend {
        Backend::Sqlite => {
            db.execute("DROP TRIGGER task_runner_requests_normalise_insert")
                .await
        }
        Backend::Postgres => {
            db.execute("DROP TRIGGER task_runner_requests_notify ON task_runner_requests")
                .await
        }
        Backend::MySql => {
            db.execute("DROP TRIGGER task_runner_requests_normalise_insert")
                .await
        }
    }
    drop_the_runnable_index(&db, backend).await;
    let stdout = migrate_succeeds(&db);
    assert!(
        stdout.contains("repaired tables missing indexes or triggers ("),
        "{stdout}"
    );
    assert!(stdout.contains("task_runner_requests_runnable"), "{stdout}");
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(stdout.contains(": up to date"), "{stdout}");
    let row = db.row(id).await;
    assert_eq!(row.options.as_deref(), Some("a: 1"));
    // New rows get ids after the kept ones.
    let next = db.enqueue("NoOp", None).await;
    assert!(next.0 > id.0);
}

/// The README lets an application add columns of its own to the table.
/// A repair (here of an index the application's schema tool dropped) used
/// to rebuild the table by the migrations alone and lose those columns,
/// their values, and the application's indexes and triggers; now it adds
/// the columns back as they were (type, NOT NULL, default), copies their
/// values and makes the indexes and triggers again.
/// A repair rebuilds the tables and copies the rows back: the counters
/// restarted at the highest id left plus one, and a new row got the id of
/// one deleted at the top. Old rows that still named that id (`next_of`, a
/// callback's key) made the new row's follow-ups count as made: its
/// periodic chain stopped, its callback never came. Ids are never handed
/// out again now.
async fn a_repair_hands_out_no_id_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id > {}",
        ids[0]
    ))
    .await;
    drop_the_runnable_index(&db, backend).await;
    let stdout = migrate_succeeds(&db);
    assert!(
        stdout.contains("rebuilt by the migrations, 1 rows kept"),
        "{stdout}"
    );
    let next = db.enqueue("NoOp", None).await;
    assert!(
        next.0 > ids[2].0,
        "id {next} handed out again (the highest was {})",
        ids[2]
    );
}

async fn a_repair_keeps_the_applications_own_columns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db.enqueue("NoOp", Some("a: 1")).await;
    db.execute("ALTER TABLE task_runner_requests ADD COLUMN tenant_id BIGINT")
        .await;
    db.execute(
        "ALTER TABLE task_runner_requests ADD COLUMN origin VARCHAR(20) NOT NULL DEFAULT 'web'",
    )
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET tenant_id = 42, origin = 'api' WHERE id = {id}"
    ))
    .await;
    db.execute("CREATE INDEX app_by_tenant ON task_runner_requests (tenant_id, origin)")
        .await;
    // An audit trigger of the application's: it must come back, and not
    // fire on the repair's copy of the rows.
    db.execute("CREATE TABLE request_audit (request_id BIGINT)")
        .await;
    let audit: &[&str] = match backend {
        Backend::Sqlite => &[
            "CREATE TRIGGER app_audit AFTER INSERT ON task_runner_requests \
             BEGIN INSERT INTO request_audit VALUES (NEW.id); END",
        ],
        Backend::Postgres => &[
            "CREATE FUNCTION app_audit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO request_audit VALUES (NEW.id); RETURN NEW; END $$",
            "CREATE TRIGGER app_audit AFTER INSERT ON task_runner_requests \
             FOR EACH ROW EXECUTE FUNCTION app_audit()",
        ],
        Backend::MySql => &[
            "CREATE TRIGGER app_audit AFTER INSERT ON task_runner_requests \
             FOR EACH ROW INSERT INTO request_audit VALUES (NEW.id)",
        ],
    };
    for statement in audit {
        db.execute(statement).await;
    }
    let has_index = match backend {
        Backend::Sqlite => "SELECT count(*) FROM sqlite_master WHERE name = 'app_by_tenant'",
        Backend::Postgres => "SELECT count(*) FROM pg_indexes WHERE indexname = 'app_by_tenant'",
        Backend::MySql => {
            "SELECT count(DISTINCT index_name) FROM information_schema.statistics \
              WHERE table_schema = DATABASE() AND index_name = 'app_by_tenant'"
        }
    };
    drop_the_runnable_index(&db, backend).await;
    let stdout = migrate_succeeds(&db);
    assert!(
        stdout.contains("rebuilt by the migrations, 1 rows kept"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the application's columns task_runner_requests.tenant_id, task_runner_requests.origin, and indexes and triggers app_by_tenant, app_audit"
        ),
        "{stdout}"
    );
    assert_eq!(db.scalar(has_index).await, 1);
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(stdout.contains(": up to date"), "{stdout}");
    let kept = format!("SELECT count(*) FROM task_runner_requests WHERE id = {id}");
    assert_eq!(
        db.scalar(&format!("{kept} AND tenant_id = 42 AND origin = 'api'"))
            .await,
        1
    );
    assert_eq!(db.scalar("SELECT count(*) FROM request_audit").await, 0);
    // The default and NOT NULL came back with the column, and the trigger.
    let next = db.enqueue("NoOp", None).await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM request_audit WHERE request_id = {next}"
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {next} AND origin = 'web' AND tenant_id IS NULL"
        ))
        .await,
        1
    );
    let refused = db
        .try_execute("UPDATE task_runner_requests SET origin = NULL")
        .await
        .is_err();
    assert!(refused, "origin is NOT NULL again");
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(next, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// An application's table with a foreign key to the requests (Rails'
/// `references :task_runner_request, foreign_key: true`), or a view on them.
/// A repair drops and rebuilds the tables: before, PostgreSQL's `DROP …
/// CASCADE` took the foreign key and the view along without a word, SQLite's
/// implicit DELETE removed the rows that cascade from the requests, and
/// MariaDB failed halfway with some of taskrunner's tables dropped. Now a
/// foreign key (and on PostgreSQL a view) makes the repair refuse with one
/// line and change nothing; on SQLite and MariaDB a view survives it.
async fn a_repair_never_takes_an_applications_foreign_keys_or_views_along(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db.enqueue("NoOp", None).await;
    db.create_referencing_table(
        "reports",
        "request_id",
        "task_runner_requests",
        "ON DELETE CASCADE",
    )
    .await;
    db.execute(&format!("INSERT INTO reports (request_id) VALUES ({id})"))
        .await;
    drop_the_runnable_index(&db, backend).await;
    let line = migrate_refused(&db);
    assert!(line.contains("reports → task_runner_requests"), "{line}");
    assert_eq!(db.scalar("SELECT count(*) FROM reports").await, 1);
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches").await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_schema_migrations WHERE version = 11")
            .await,
        1
    );
    // The key still holds: a report of a request that does not exist is refused.
    let dangling = "INSERT INTO reports (request_id) VALUES (999999)";
    let refused = db.try_execute(dangling).await.is_err();
    assert!(refused, "the foreign key is still there");
    // Without the foreign key, a view on the requests.
    db.execute("DROP TABLE reports").await;
    db.execute(
        "CREATE VIEW waiting_requests AS SELECT id FROM task_runner_requests WHERE result IS NULL",
    )
    .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    match backend {
        Backend::Postgres => {
            // The view depends on the table: the repair refuses.
            assert_eq!(status, 1, "{stdout}{stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
            assert!(
                stderr.contains("waiting_requests → task_runner_requests"),
                "{stderr}"
            );
            assert_eq!(
                db.scalar("SELECT count(*) FROM task_runner_schema_migrations WHERE version = 11")
                    .await,
                1
            );
        }
        Backend::Sqlite | Backend::MySql => {
            assert_eq!(status, 0, "{stdout}{stderr}");
            assert!(
                stdout.contains("rebuilt by the migrations, 1 rows kept"),
                "{stdout}"
            );
        }
    }
    assert_eq!(db.scalar("SELECT count(*) FROM waiting_requests").await, 1);
}

/// examples/rails/lib/task_runner_task.rb runs a Ruby class with the row's
/// options (plain Ruby here; `bin/rails runner` in an app).
async fn a_ruby_class_runs_as_a_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let rails = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rails");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  WordCount:\n    command: [ruby, -I, app/tasks, -r, word_count_task, lib/task_runner_task.rb, WordCountTask]\n    workdir: {rails}\n"
        ),
    );
    // Ruby's symbol keys, as ActiveRecord's YAML coder writes them.
    let counted = db
        .enqueue(
            "WordCount",
            Some("---\n:text: the cat and the hat\n:top: 1\n"),
        )
        .await;
    let broken = db
        .insert_row(NewRow::new("WordCount").options("top: 2").try_limit(1))
        .await;
    let row = db.wait_for_state(counted, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("the 2"));
    let row = db.wait_for_state(broken, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(
        text.starts_with("exit status 1\nArgumentError: option `text` is required"),
        "{text}"
    );
    assert!(daemon.stop().success());
}

/// A repair copies the rows back into tables the migrations made, triggers
/// included. The trigger that counts a batch's members fired on the copy:
/// members came back before their batch, each was refused (`the batch does
/// not exist or is final`), the copy failed, and the next start found the
/// new tables complete and ran on them, empty, every request left in
/// `task_runner_requests_before_repair` out of sight. Rows that a later
/// rule refuses (written while its trigger was missing) failed the copy
/// the same way. The migrations' triggers are now dropped around the copy
/// and made again; and tables left by a repair that stopped midway are
/// refused at start, naming them, until their rows are back.
async fn a_repair_keeps_batch_members_and_rows_a_later_rule_refuses(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = db
        .insert("INSERT INTO task_runner_batches (name) VALUES ('b') RETURNING id")
        .await;
    let member = db
        .insert_row(NewRow::new("NoOp").batch(batch.0).options("a: 1"))
        .await;
    // Written while the rules' trigger was missing: the repair's cause.
    let dropped = match backend {
        Backend::Postgres => {
            "DROP TRIGGER task_runner_requests_check_insert ON task_runner_requests"
        }
        Backend::Sqlite | Backend::MySql => "DROP TRIGGER task_runner_requests_check_insert",
    };
    db.execute(dropped).await;
    let negative = db.insert_row(NewRow::new("NoOp").tries(-1)).await;

    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(
            "repaired tables missing indexes or triggers (task_runner_requests_check_insert)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("3 rows kept"), "{stdout}");
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(stdout.contains(": up to date"), "{stdout}");
    assert_eq!(db.row(member).await.batch_id, Some(batch.0));
    assert_eq!(db.row(negative).await.tries, -1);
    // Counted once, as before the repair; and the rules are back.
    let counted = format!(
        "SELECT count(*) FROM task_runner_batches WHERE id = {batch} AND total = 1 AND pending = 1"
    );
    assert_eq!(db.scalar(&counted).await, 1);
    assert!(db
        .try_execute(
            "INSERT INTO task_runner_requests (task_class_name, tries) VALUES ('NoOp', -1)"
        )
        .await
        .is_err());

    // A repair that stopped midway: its copy of the rows left beside the
    // tables. Refused, naming it, and nothing is changed.
    db.execute(
        "CREATE TABLE task_runner_requests_before_repair AS SELECT * FROM task_runner_requests",
    )
    .await;
    let (status, _, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("a repair of taskrunner's tables stopped midway and left their rows in task_runner_requests_before_repair"),
        "{stderr}"
    );
    let (code, log) = db.daemon("d").refused();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("stopped midway"), "{log}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests_before_repair")
            .await,
        2
    );
    db.execute("DROP TABLE task_runner_requests_before_repair")
        .await;
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(member, "FINISHED", Duration::from_secs(30))
        .await;
    assert!(daemon.stop().success());
}

/// A repair rebuilds the tables (copy aside, drop, migrate, copy back): a
/// daemon running on them meanwhile would lose what it wrote between the
/// copy and the copy back (an outcome, a claim). Before, `migrate` rebuilt
/// them under running daemons; now it refuses, naming them, and changes
/// nothing until they stop. A daemon of this host killed -9 does not count
/// (its process is gone; before, its row counted for 5 minutes).
async fn a_repair_waits_for_the_daemons_running_on_the_tables(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut stopped = Daemon::start(&db, "d1", "");
    let mut killed = Daemon::start(&db, "d2", "");
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    drop_the_runnable_index(&db, backend).await;
    let line = migrate_refused(&db);
    assert!(line.contains("daemons run on them"), "{line}");
    for daemon in [&stopped, &killed] {
        assert!(line.contains(&format!("pid {}", daemon.pid())), "{line}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'")
            .await,
        1
    );
    // One stopped, the other killed -9 (its row says it runs, but its
    // process on this host is gone: before, it counted for 5 minutes).
    assert!(stopped.stop().success());
    killed.kill();
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("rebuilt by the migrations"), "{stdout}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'")
            .await,
        1
    );
}

/// Two processes repairing one SQLite file at once (a daemon and
/// `taskrunner-cli migrate` started together; SQLite has no turn for
/// them): both judge the tables in need before either begins. The second
/// one's first step ran between the first one's migrations and its copy
/// back: it dropped the first one's copy of the rows (`DROP TABLE IF
/// EXISTS …_before_repair`), copied the new empty tables aside instead, and
/// every row was gone. It now stops there with one line, nothing changed,
/// and the first repair keeps every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_repair_at_once_loses_no_row() {
    let db = TestDb::new(Backend::Sqlite).await;
    for _ in 0..3 {
        db.enqueue("NoOp", None).await;
    }
    drop_the_runnable_index(&db, Backend::Sqlite).await;
    let migrate = |variable: &str, file: &std::path::Path| {
        Command::new(crate::util::CLI)
            .args(["--database-url", db.url.as_str(), "migrate"])
            .current_dir(&db.scratch.path)
            .env(variable, file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running taskrunner-cli migrate")
    };
    let waits = |file: &std::path::Path| {
        let mut waiting = file.as_os_str().to_owned();
        waiting.push(".waiting");
        let waiting = std::path::PathBuf::from(waiting);
        crate::util::wait_until(WAIT, "a repair to reach its hook", || waiting.exists());
    };
    // The second has judged the tables and waits before its first step.
    let second_go = db.scratch.join("second-go");
    let second = migrate("TASKRUNNER_TEST_REPAIR_BEFORE_ASIDE", &second_go);
    waits(&second_go);
    // The first has copied the rows aside and run the migrations.
    let first_go = db.scratch.join("first-go");
    let first = migrate("TASKRUNNER_TEST_REPAIR_BEFORE_COPY_BACK", &first_go);
    waits(&first_go);
    std::fs::write(&second_go, b"").unwrap();
    let second = second.wait_with_output().unwrap();
    std::fs::write(&first_go, b"").unwrap();
    let first = first.wait_with_output().unwrap();
    let text = |output: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("rebuilt by the migrations, 3 rows kept"),
        "{}",
        text(&first)
    );
    assert!(!second.status.success(), "{}", text(&second));
    // One error line (after its warning that it begins).
    let stderr = String::from_utf8_lossy(&second.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("taskrunner-cli:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("another process is repairing taskrunner's tables"),
        "{stderr}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        3
    );
    migrate_succeeds(&db);
}
