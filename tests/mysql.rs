//! MariaDB/MySQL's own promises (issue 18), beside the suite that runs every
//! behaviour test there too: the claim's plan, `unique_key` and times
//! written with the `mysql` client, case-sensitive type names, and ids
//! after a server restart.

use std::time::Duration;

use crate::util::{
    cli, holds_for, mysql_client, poll, spawn_cli, Backend, Daemon, NewRow, PrivateServer, TestDb,
};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `sql` with the `mysql` client on the test's database; its stdout.
fn client(db: &TestDb, sql: &str) -> String {
    let output = mysql_client(&db.url, sql).expect("the mysql client runs");
    assert!(
        output.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The claim reads the range `ready_rank IS NOT NULL` of its index in
/// claim order: no filesort, and no look at the finished rows, nor at the
/// rows delayed into the future ahead of the due ones, however many there
/// are (migration 0011; before it, the range held the delayed rows too and
/// the plan read 2,050 rows here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_reads_the_runnable_index_range_without_a_filesort() {
    let db = TestDb::new(Backend::MySql).await;
    let finished = NewRow::new("NoOp").ended(db.backend, "FINISHED", 1, 0);
    db.insert_copies(finished, 5000).await;
    let delayed = NewRow::new("NoOp").delayed(db.backend, 86_400);
    db.insert_copies(delayed, 2000).await;
    db.insert_copies(NewRow::new("NoOp").sql("priority", "i % 3"), 50)
        .await;
    db.execute("ANALYZE TABLE task_runner_requests").await;
    let select = taskrunner::store::sql::SQL
        .of(taskrunner::store::Backend::MySql)
        .claim_select
        .replace("AND task_class_name NOT IN ({excluded})", "")
        .replace("AND queue NOT IN ({excluded_queues})", "")
        .replace("$4", "8")
        .replace("$5", "'host-a'")
        .replace("$6", "''")
        .replace("$7", "''");
    let plan = client(&db, &format!("EXPLAIN {select}"));
    println!("{plan}");
    let line = plan.lines().next().expect("one line of plan");
    let columns: Vec<&str> = line.split('\t').collect();
    // id, select_type, table, type, possible_keys, key, key_len, ref, rows, Extra
    assert_eq!(columns[3], "range", "{plan}");
    assert_eq!(columns[5], "task_runner_requests_ready", "{plan}");
    assert!(!columns[9].contains("filesort"), "{plan}");
    assert!(
        columns[8].parse::<i64>().unwrap() < 500,
        "reads the due rows, not the finished or delayed ones: {plan}"
    );
}

/// `INSERT … ON DUPLICATE KEY UPDATE id = id` from the `mysql` client
/// honours `unique_key` while its holder is pending or running, and not once
/// it is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_key_collision_from_the_mysql_client_inserts_nothing() {
    let db = TestDb::new(Backend::MySql).await;
    // By hand, here and below: the statement the `mysql` client sends.
    let insert = "INSERT INTO task_runner_requests (task_class_name, unique_key, delay_until) \
                  VALUES ('NoOp', 'report-7', UTC_TIMESTAMP() + INTERVAL 1 HOUR) \
                  ON DUPLICATE KEY UPDATE id = id";
    client(&db, insert);
    client(&db, insert);
    let keyed = "SELECT count(*) FROM task_runner_requests WHERE unique_key = 'report-7'";
    assert_eq!(db.scalar(keyed).await, 1);
    // The CLI's enqueue finds the same holder.
    let (status, stdout, stderr) =
        crate::util::cli(&db, &["enqueue", "NoOp", "--unique-key", "report-7"]);
    assert_eq!(status, 0, "{stderr}");
    let holder = db
        .scalar("SELECT id FROM task_runner_requests WHERE unique_key = 'report-7'")
        .await;
    assert_eq!(stdout.trim(), holder.to_string());
    // A key differing only in case is another key (binary collation).
    client(
        &db,
        "INSERT INTO task_runner_requests (task_class_name, unique_key) VALUES ('NoOp', 'REPORT-7') \
         ON DUPLICATE KEY UPDATE id = id",
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE unique_key IN ('report-7', 'REPORT-7')")
            .await,
        2
    );
    // Final: the key is free again.
    db.execute("UPDATE task_runner_requests SET result = 'FINISHED' WHERE unique_key = 'report-7'")
        .await;
    client(&db, insert);
    assert_eq!(db.scalar(keyed).await, 2);
}

/// The default collations of MySQL compare case-insensitively; taskrunner's
/// table does not: a row of type `noop` is not run as `NoOp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_name_differing_in_case_is_not_run_as_another_type() {
    let db = TestDb::new(Backend::MySql).await;
    db.insert_rows([
        NewRow::new("noop").try_limit(1),
        NewRow::new("NoOp").try_limit(1),
    ])
    .await;
    let mut daemon = Daemon::start(&db, "d", "");
    let lower = taskrunner::request::RequestId(
        db.scalar("SELECT id FROM task_runner_requests WHERE task_class_name = 'noop'")
            .await,
    );
    let exact = taskrunner::request::RequestId(
        db.scalar("SELECT id FROM task_runner_requests WHERE task_class_name = 'NoOp'")
            .await,
    );
    assert_ne!(lower, exact);
    let row = db.wait_for_state(exact, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.as_deref(),
        Some(&*format!("NOOP {exact}: OK!"))
    );
    let row = db.wait_for_state(lower, "FAILED", WAIT).await;
    assert!(
        row.result_text
            .as_deref()
            .unwrap_or_default()
            .contains("unknown task type"),
        "{row:?}"
    );
    assert!(daemon.stop().success());
}

/// A callback's options carry the parent's options twice and its output:
/// here 7 MB, 7 MB and 4 MB, each under its own bound, together past the
/// server's 16 MiB `max_allowed_packet`, whatever `max_options` says. Such
/// an insert closes the connection, so the outcome would be retried for
/// ever; the daemon cuts what it composes to 8 MiB on MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_past_the_servers_packet_limit_is_cut_and_holds_back_no_outcome() {
    let db = TestDb::new(Backend::MySql).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_options: 64MiB\noutput_tail: 4MiB\ntasks:\n  Loud:\n    command: [/bin/sh, -c, \"head -c 4000000 /dev/zero | tr '\\\\0' x; echo the end\"]\n  Done:\n    command: [/bin/cat]\n",
    );
    let parent = db
        .insert_row(
            NewRow::new("Loud")
                .options(&format!("note: {}", "y".repeat(7_000_000)))
                .on_success("Done"),
        )
        .await;
    // The parent's outcome is written, and outcomes after it.
    db.wait_for_state(parent, "FINISHED", WAIT).await;
    let canary = db.insert_row(NewRow::new("NoOp")).await;
    db.wait_for_state(canary, "FINISHED", WAIT).await;
    let done = db.finished_callback_of(parent, WAIT).await;
    assert!(daemon.stop().success());
    let length = db
        .scalar(&format!(
            "SELECT length(options) FROM task_runner_requests WHERE id = {}",
            done.id
        ))
        .await;
    assert!(length <= 8 << 20 && length > 7 << 20, "{length}");
}

/// An outcome whose text is 12 MB (4 MB of output that is not UTF-8, each
/// byte written as U+FFFD's three bytes; `output_tail` allows 4 MiB) is
/// written, alone and as a batch member's: under the server's 16 MiB
/// `max_allowed_packet`. Before, the one-row outcome statement carried its
/// text twice (once for a cancel's prefix), 24 MB: the server closed the
/// connection, and the daemon retried that write for ever, recording no
/// outcome again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_of_twelve_megabytes_of_text_is_written_once_and_holds_back_nothing() {
    let db = TestDb::new(Backend::MySql).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "output_tail: 4MiB\ntasks:\n  Zeros:\n    command: [/bin/sh, -c, 'head -c 4000000 /dev/zero']\n",
    );
    let alone = db.insert_row(NewRow::new("Zeros")).await;
    db.wait_for_state(alone, "FINISHED", WAIT).await;
    let batch = db
        .insert("INSERT INTO task_runner_batches (on_complete) VALUES ('NoOp') RETURNING id")
        .await
        .0;
    let member = db.insert_row(NewRow::new("Zeros").batch(batch)).await;
    db.wait_for_state(member, "FINISHED", WAIT).await;
    let canary = db.insert_row(NewRow::new("NoOp")).await;
    db.wait_for_state(canary, "FINISHED", WAIT).await;
    for id in [alone, member] {
        let length = db
            .scalar(&format!(
                "SELECT length(result_text) FROM task_runner_requests WHERE id = {id}"
            ))
            .await;
        assert_eq!(length, 12_000_000, "row {id}");
    }
    assert!(daemon.stop().success());
}

/// A time written by the `mysql` client in a session on local time (here
/// UTC+02:00, as on a server in Europe) and one written in UTC are read at
/// the same instant; so is the `created_at` default of a local session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_written_in_local_time_and_in_utc_are_read_at_the_right_instant() {
    let db = TestDb::new(Backend::MySql).await;
    // By hand, here and below: the statements the `mysql` client sends in
    // a session on local time.
    client(
        &db,
        "SET time_zone = '+02:00'; \
         INSERT INTO task_runner_requests (task_class_name, delay_until, options) \
         VALUES ('NoOp', '2030-06-01 09:00:00', 'form: local');",
    );
    client(
        &db,
        "SET time_zone = '+00:00'; \
         INSERT INTO task_runner_requests (task_class_name, delay_until, options) \
         VALUES ('NoOp', '2030-06-01T07:00:00.000000', 'form: utc');",
    );
    for form in ["local", "utc"] {
        let id = db
            .scalar(&format!(
                "SELECT id FROM task_runner_requests WHERE options = 'form: {form}'"
            ))
            .await;
        let row = db.row(taskrunner::request::RequestId(id)).await;
        assert_eq!(
            row.delay_until.as_deref(),
            Some("2030-06-01 07:00:00.000"),
            "{form}"
        );
        let created = chrono::NaiveDateTime::parse_from_str(
            row.created_at.as_deref().unwrap(),
            "%Y-%m-%d %H:%M:%S%.f",
        )
        .unwrap()
        .and_utc();
        let off = (chrono::Utc::now() - created).num_seconds().abs();
        assert!(off < 60, "{form}: created_at {created} is {off}s from now");
    }
    // A due time written in local time runs when due, not two hours late.
    let mut daemon = Daemon::start(&db, "d", "");
    let due = chrono::Utc::now() + chrono::Duration::hours(2) + chrono::Duration::seconds(2);
    client(
        &db,
        &format!(
            "SET time_zone = '+02:00'; \
             INSERT INTO task_runner_requests (task_class_name, delay_until, options) \
             VALUES ('NoOp', '{}', 'form: due');",
            due.format("%Y-%m-%d %H:%M:%S%.6f")
        ),
    );
    let id = db
        .scalar("SELECT id FROM task_runner_requests WHERE options = 'form: due'")
        .await;
    db.wait_for_state(taskrunner::request::RequestId(id), "FINISHED", WAIT)
        .await;
    assert!(daemon.stop().success());
}

/// InnoDB keeps the AUTO_INCREMENT counter across a restart: the id of a
/// deleted newest row is not handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_never_reused_after_the_server_restarts() {
    let mut server = PrivateServer::start(Backend::MySql);
    let db = server.test_db().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(db.enqueue("NoOp", None).await.0);
    }
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id >= {}",
        ids[1]
    ))
    .await;
    server.stop();
    server.start_again();
    // A fresh connection after the restart (the test's pool reconnects).
    let after = server_insert(&db).await;
    assert!(
        after > ids[2],
        "id {after} after the restart; {ids:?} were handed out before"
    );
}

/// A server whose `max_allowed_packet` is under MariaDB's 16 MiB default
/// (MySQL 5.7's was 4 MiB): a statement past it closes the connection, so
/// an outcome too large for it (a result text of up to 12 MiB, outcomes
/// written together, a callback's options) would be retried for ever.
/// Refused at start with one line; before, the daemon started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_max_allowed_packet_is_under_16_mib_is_refused_at_start() {
    let server = PrivateServer::start(Backend::MySql);
    let db = server.test_db().await;
    db.execute("SET GLOBAL max_allowed_packet = 4194304").await;
    let (code, log) = db.daemon("d").refused();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("max_allowed_packet is 4MiB") && log.contains("at least 16MiB"),
        "{log}"
    );
    db.execute("SET GLOBAL max_allowed_packet = 16777216").await;
    let mut daemon = Daemon::start(&db, "e", "");
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// Inserts a row with the `mysql` client (by hand: the id the server hands
/// out to the statement is what the test is about), retrying until the
/// server answers; the row's id.
async fn server_insert(db: &TestDb) -> i64 {
    poll(WAIT, "an insert with the mysql client", async || {
        match mysql_client(
            &db.url,
            "INSERT INTO task_runner_requests (task_class_name) VALUES ('NoOp'); SELECT LAST_INSERT_ID();",
        ) {
            Ok(output) if output.status.success() => {
                Ok(String::from_utf8_lossy(&output.stdout).trim().parse().unwrap())
            }
            other => Err(other),
        }
    })
    .await
}

/// A MariaDB server whose sessions start with autocommit off (`autocommit
/// = 0` in its config, which some DBAs set): a single statement stays in a
/// transaction that nothing commits. `taskrunner-cli enqueue` printed an id,
/// exit 0, and the row was gone when it disconnected; the SDK's
/// `insert_url` the same. The daemon's, the CLI's and the web page's
/// sessions now set autocommit on, and `insert_url` commits its insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_autocommit_off_by_default_loses_no_enqueued_request() {
    let server = PrivateServer::start(Backend::MySql);
    let db = server.test_db().await;
    db.execute("SET GLOBAL autocommit = 0").await;
    assert_eq!(client(&db, "SELECT @@autocommit").trim(), "0");
    let (status, stdout, stderr) = crate::util::cli(&db, &["enqueue", "NoOp"]);
    assert_eq!(status, 0, "{stderr}");
    let by_cli: i64 = stdout.trim().parse().unwrap();
    let by_sdk = task_sdk::Enqueue::named("NoOp", &())
        .insert_url(&db.url)
        .await
        .unwrap();
    let seen = |id: i64| {
        client(
            &db,
            &format!("SELECT count(*) FROM task_runner_requests WHERE id = {id}"),
        )
    };
    assert_eq!(seen(by_cli).trim(), "1", "the CLI's row is gone");
    assert_eq!(seen(by_sdk).trim(), "1", "the SDK's row is gone");
    let mut daemon = Daemon::start(&db, "d", "");
    for id in [by_cli, by_sdk] {
        db.wait_for_state(taskrunner::request::RequestId(id), "FINISHED", WAIT)
            .await;
    }
    // Written for good: seen by a new session.
    let finished = client(
        &db,
        &format!("SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND id IN ({by_cli}, {by_sdk})"),
    );
    assert_eq!(finished.trim(), "2");
    assert!(daemon.stop().success());
}

/// `taskrunner-cli wait` and task-sdk's `wait_for_flow` on a server set to
/// `autocommit = 0`: their first read opened a transaction that nothing
/// ended, and each later read saw its snapshot (REPEATABLE READ), so that
/// the wait never saw its request or flow end (the CLI gave up after its
/// timeout, exit 1; a wait without one waited for ever). Now their
/// sessions read with autocommit on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_on_a_server_with_autocommit_off_see_the_end() {
    let server = PrivateServer::start(Backend::MySql);
    let db = server.test_db().await;
    let config = "tasks:\n  Slow:\n    command: [sleep, '1']\n\
                  flows:\n  slow:\n    steps:\n      - { name: only, task: Slow }\n";
    let request = db.insert_row(NewRow::new("Slow")).await;
    let flow = crate::flows::insert_flow(&db, "slow", None).await;
    db.execute("SET GLOBAL autocommit = 0").await;
    // Both read the rows not ended yet: the daemon starts after them, and
    // its tries take a second.
    let cli_wait = spawn_cli(&db, &["wait", &request.to_string(), "--timeout", "20s"]);
    let url = db.url.clone();
    let flow_wait = tokio::spawn(async move {
        task_sdk::wait_for_flow(url.as_str(), flow, Duration::from_secs(20)).await
    });
    let mut daemon = Daemon::start(&db, "d", config);
    let output = cli_wait.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let ended = flow_wait.await.unwrap().expect("the flow's end");
    assert_eq!(ended.state, "FINISHED", "{ended:?}");
    assert!(daemon.stop().success());
}

/// A limited type's claim waits a while for another daemon's claim of that
/// type (its named lock, the database's own). It went on without the lock when the wait ran out
/// (10 s), so that two daemons could count the type's running rows and
/// claim at once, past its limit (with `lease_timeout: 30s` here, the row
/// ran while the lock was held). It now claims none of the type's rows, and
/// waits at most half of `lease_timeout` (the tests' 5 s: 2 s): a longer wait
/// was given up as a database that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_types_claim_that_cannot_get_its_lock_claims_none_of_its_rows() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::MySql).await;
    let mut holder = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
    let got: Option<i64> = sqlx::query_scalar(
        "SELECT GET_LOCK(CONCAT('taskrunner:', SHA1(CONCAT(DATABASE(), ':Limited'))), 0)",
    )
    .fetch_one(&mut holder)
    .await
    .unwrap();
    assert_eq!(got, Some(1));
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Limited:\n    command: [/bin/true]\n    concurrency: 1\n",
    );
    let id = db.enqueue("Limited", None).await;
    daemon.wait_for_log("claiming none of its rows this time", WAIT);
    assert_eq!(db.row(id).await.result, None, "claimed without the lock");
    // The lock is this database's own: a daemon of another database on the
    // same server claims its own type of that name meanwhile (before, the
    // lock's name was the server's, and it waited too).
    let other = TestDb::new(Backend::MySql).await;
    let mut other_daemon = Daemon::start(
        &other,
        "other",
        "tasks:\n  Limited:\n    command: [/bin/true]\n    concurrency: 1\n",
    );
    let theirs = other.enqueue("Limited", None).await;
    other.wait_for_state(theirs, "FINISHED", WAIT).await;
    assert!(!other_daemon
        .log_text()
        .contains("claiming none of its rows"));
    assert!(other_daemon.stop().success());
    assert_eq!(db.row(id).await.result, None, "claimed without the lock");
    sqlx::query("DO RELEASE_LOCK(CONCAT('taskrunner:', SHA1(CONCAT(DATABASE(), ':Limited'))))")
        .execute(&mut holder)
        .await
        .unwrap();
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// `planned_at` and `cancel_requested_at` written by a session on local
/// time were stored as written, where `created_at` and `delay_until` were
/// stored as UTC (migration 0001): a periodic row's next occurrence was
/// planned from the wrong time (on a session behind UTC it ran at once),
/// and a cancel written by plain SQL from such a session fell before the
/// row's last end, taken by the claim for a stale one. Migration 0015 stores
/// them as UTC too, on insert and on update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_and_cancel_times_written_in_local_time_are_stored_as_utc() {
    let db = TestDb::new(Backend::MySql).await;
    client(
        &db,
        "SET time_zone = '+02:00'; \
         INSERT INTO task_runner_requests (task_class_name, period, planned_at, delay_until, cancel_requested_at, options) \
         VALUES ('NoOp', 3600, '2030-06-01 09:00:00', '2030-06-01 09:00:00', '2030-06-01 09:30:00', 'form: insert'); \
         INSERT INTO task_runner_requests (task_class_name, options) VALUES ('NoOp', 'form: update'); \
         UPDATE task_runner_requests \
            SET planned_at = '2030-06-01 10:00:00', cancel_requested_at = '2030-06-01 10:30:00' \
          WHERE options = 'form: update';",
    );
    for (form, planned, cancel) in [
        ("insert", "2030-06-01 07:00:00", "2030-06-01 07:30:00"),
        ("update", "2030-06-01 08:00:00", "2030-06-01 08:30:00"),
    ] {
        let found = db
            .scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE options = 'form: {form}' \
                   AND planned_at = '{planned}' AND cancel_requested_at = '{cancel}'"
            ))
            .await;
        let seen = client(
            &db,
            &format!(
                "SELECT planned_at, cancel_requested_at FROM task_runner_requests WHERE options = 'form: {form}'"
            ),
        );
        assert_eq!(found, 1, "{form}: {seen}");
    }
}

/// A database created with the server's default character set, `latin1`
/// (a server left at its defaults): the tables are `utf8mb4`, but the
/// columns of the `JSON_TABLE`s the daemon reads its parameters through
/// took the database's default. Outcomes written in a batch lost every
/// character `latin1` lacks (`ü 😀 日本` stored as `ü ? ??`), and a task
/// type paused under a Japanese name matched no row, and ran. They are
/// the tables' character set now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_whose_default_character_set_is_latin1_keeps_every_character() {
    let db = TestDb::new(Backend::MySql).await;
    db.execute("ALTER DATABASE CHARACTER SET latin1").await;
    let text = "ü 😀 日本";
    let (code, out, err) = cli(&db, &["pause", "--task", "翻訳"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 8\ntasks:\n  Say:\n    command: [printf, '{text}']\n  翻訳:\n    command: [printf, '{text}']\n"
        ),
    );
    let paused = db.enqueue("翻訳", None).await;
    db.insert_copies(NewRow::new("Say"), 24).await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Say' AND result = 'FINISHED'",
        24,
        WAIT,
    )
    .await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Say' AND result_text = '{text}'"
        ))
        .await,
        24
    );
    holds_for(
        Duration::from_secs(1),
        "the paused type's row to wait",
        async || match db.row(paused).await.result {
            None => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(daemon.stop().success());
}

/// MariaDB's claim order holds −priority in 32-bit generated columns
/// (`claim_rank`, `ready_rank`), which −2147483648 overflows. An UPDATE
/// could give a running row that priority; when its try then failed with
/// tries left, the daemon's outcome write (which makes the row runnable)
/// was refused, "Out of range value for column 'claim_rank'", and retried
/// for ever: no later outcome of that daemon was recorded. Migration 0019
/// refuses the value with an error naming the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowest_priority_given_to_a_running_row_is_refused_and_holds_up_no_outcome() {
    let db = TestDb::new(Backend::MySql).await;
    let gate = db.scratch.join("gate");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Fails:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done; exit 1']\n",
            gate.display()
        ),
    );
    let id = db.insert_row(NewRow::new("Fails").try_limit(2)).await;
    db.wait_for_pid(id, WAIT).await;
    let error = db
        .try_execute(&format!(
            "UPDATE task_runner_requests SET priority = -2147483648 WHERE id = {}",
            id.0
        ))
        .await
        .expect_err("the lowest priority is refused");
    assert!(
        error.contains("priority must be from -2147483647 to 2147483647"),
        "{error}"
    );
    std::fs::write(&gate, "").unwrap();
    db.wait_for_state(id, "FAILED", WAIT).await;
    let after = db.enqueue("NoOp", None).await;
    db.wait_for_state(after, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// A row given the priority −2147483648 before migration 0019 (which now
/// refuses it) would still break its outcome write: the migration gives it
/// the lowest priority allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_given_the_lowest_priority_before_migration_0019_is_raised_by_it() {
    let db = TestDb::new(Backend::MySql).await;
    let id = db
        .insert_row(NewRow::new("NoOp").ended(db.backend, "FINISHED", 1, 0))
        .await;
    // As before migration 0019: no rule, and the row was given the value.
    db.execute("DROP TRIGGER task_runner_requests_check_update")
        .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET priority = -2147483648 WHERE id = {}",
        id.0
    ))
    .await;
    // The triggers back (a missing one would have the tables repaired), and
    // the migration to be applied again.
    let migration = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../migrations/mysql/0019_the_lowest_priority_is_refused.sql"
    ))
    .unwrap();
    let triggers = migration
        .find("DROP TRIGGER")
        .map(|at| &migration[at..])
        .unwrap();
    db.execute(triggers).await;
    db.execute("DELETE FROM task_runner_schema_migrations WHERE version = 19")
        .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    let priority = db
        .scalar(&format!(
            "SELECT priority FROM task_runner_requests WHERE id = {}",
            id.0
        ))
        .await;
    assert_eq!(priority, -2147483647, "{stdout}");
}
