//! The recorder's writes about one try are applied in the order they were
//! queued, even when one batch holds several of them.

use taskrunner::instance::{ClaimToken, InstanceId};
use taskrunner::request::{RequestId, State};
use taskrunner::store::{Outcome, Purpose, Store, Write};

use std::time::Duration;

use crate::batches::Hold;
use crate::util::{process_exists, wait_until, Backend, Daemon, NewRow, TestDb};

both_backends!(
    a_give_back_queued_behind_an_outcome_never_overrides_it,
    a_batch_of_outcomes_is_written_in_a_few_statements_each_on_its_own_claim,
    a_row_an_outcome_causes_that_the_database_refuses_holds_back_no_outcome,
    outcomes_with_large_texts_queued_together_are_all_recorded,
);
multi_host_backends!(
    an_outcome_held_back_by_a_row_lock_is_neither_given_back_nor_reaped,
    an_application_lock_on_one_running_row_holds_back_that_rows_writes_alone,
);

fn outcome(id: RequestId, token: &ClaimToken, state: State, give_back_try: bool) -> Write {
    Write::Outcome(Outcome {
        id,
        claim_token: token.clone(),
        state,
        result_text: format!("{state:?}"),
        retry_after: None,
        give_back_try,
        composed: false,
    })
}

/// A try ends FINISHED and its outcome waits in the recorder's queue; the
/// heartbeat, seeing the row still held with no try running it, queues a
/// give-back behind it. When both land in one batch, the outcome stands:
/// the give-back (a write about the same claim, made after it) changes
/// nothing, and the finished work is not run again.
async fn a_give_back_queued_behind_an_outcome_never_overrides_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    let token = InstanceId::new("recording").claim_token(1);
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'RUNNING', claim_token = '{token}', tries = 1"
    ))
    .await;
    let store = Store::open(&db.url, Purpose::Cli).unwrap();
    let batch = vec![
        outcome(ids[0], &token, State::Finished, false),
        outcome(ids[1], &token, State::Finished, false),
        outcome(ids[0], &token, State::Interrupted, true),
        outcome(ids[2], &token, State::Failed, false),
        outcome(ids[2], &token, State::Interrupted, true),
    ];
    let applied = store.record(&batch).await.unwrap();
    assert_eq!(applied, vec![true, true, false, true, false]);
    for (id, result) in [
        (ids[0], "FINISHED"),
        (ids[1], "FINISHED"),
        (ids[2], "FAILED"),
    ] {
        let row = store.show(id).await.unwrap().unwrap();
        assert_eq!(
            row.result.as_deref(),
            Some(result),
            "request {id}: {row:#?}"
        );
        assert_eq!(row.tries, 1, "request {id}: its try counts");
    }
    store.close().await;
}

/// A try ends while an application holds its row locked (a long
/// transaction, say): its outcome waits in the recorder, and the row stays
/// RUNNING under this daemon's claim with no try running it. The heartbeat
/// must not take it for a row whose claim's answer was lost and give it
/// back: the outcome is on its way, and is written once the lock goes.
/// Nor may another host's reaper take it for crashed once its lease has
/// lapsed meanwhile: its daemon lives, and renews its own row.
async fn an_outcome_held_back_by_a_row_lock_is_neither_given_back_nor_reaped(backend: Backend) {
    let db = TestDb::new(backend).await;
    let daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Short:\n    command: [/bin/sh, -c, 'sleep 0.5']\n",
    );
    let id = db.enqueue("Short", None).await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND result = 'RUNNING' AND pid IS NOT NULL"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    let hold = Hold::take(&db, id).await;
    // The task ends under the lock; the heartbeats (1 s) see the row held
    // until its lease (5 s) has lapsed.
    daemon.wait_for_log("executor: finished", Duration::from_secs(30));
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND heartbeat_at < {}",
            crate::util::sql_ago(backend, 6)
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    // Another host's reaper leaves the row to its daemon, which lives:
    // before, it took the row for crashed, and its mark, queued behind
    // the same lock as the outcome, could come first.
    let elsewhere = db.scratch.join("elsewhere.yml");
    std::fs::write(
        &elsewhere,
        "host_id: elsewhere\nheartbeat_interval: 1s\nkill_grace: 2s\nlease_timeout: 5s\n",
    )
    .unwrap();
    let (code, out, err) = crate::util::cli(
        &db,
        &["--config", elsewhere.to_str().unwrap(), "reap", "--dry-run"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.lines().any(|line| line.starts_with(&format!("{id} "))),
        "{out}"
    );
    hold.release().await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND result = 'FINISHED'"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    // The outcome's first call may be given up at the 5 s answer bound
    // and written by the server once the lock goes ("not recorded again:
    // written by the call whose answer was lost"): it was, once.
    let log = daemon.log_text();
    assert!(
        !log.contains("giving them back") && !log.contains("no longer this try's claim"),
        "{log}"
    );
    assert_eq!(db.row(id).await.tries, 1);
}

/// An application holds one running row locked (a long transaction that
/// read it `FOR UPDATE`, Rails' `with_lock`) while its try writes a
/// progress line (the heartbeat's write, each second) and ends. That row's writes wait; the daemon's other tries
/// run and are recorded meanwhile. Before, the recorder's write waited for
/// the lock, was given up at the call's bound and tried again, and every
/// outcome of the daemon queued behind it until the application's
/// transaction ended. Once the lock goes, the held row gets its progress
/// and its outcome, in their order, once. (SQLite has no row locks: an
/// application's write transaction holds every writer.)
async fn an_application_lock_on_one_running_row_holds_back_that_rows_writes_alone(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let (fifo, barrier) = crate::batches::fifo_barrier(&db);
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 4\ntasks:\n  Held:\n    command: [/bin/sh, -c, 'cat {} > /dev/null; echo \"progress: half way\" >&2; sleep 1.5; echo done']\n  Quick:\n    command: [/bin/sh, -c, 'echo quick']\n",
            fifo.display()
        ),
    );
    let held = db.enqueue("Held", None).await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {held} AND result = 'RUNNING' AND pid IS NOT NULL"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    let hold = Hold::take(&db, held).await;
    drop(barrier);
    daemon.wait_for_log("executor: finished", Duration::from_secs(30));
    let mut quick = Vec::new();
    for _ in 0..3 {
        quick.push(db.enqueue("Quick", None).await);
    }
    // Before, none was recorded while the lock stood.
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Quick' AND result = 'FINISHED'",
        3,
        Duration::from_secs(20),
    )
    .await;
    let row = db.row(held).await;
    assert_eq!(row.result.as_deref(), Some("RUNNING"), "{row:#?}");
    assert_eq!(row.progress, None, "{row:#?}");
    hold.release().await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {held} AND result = 'FINISHED'"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    let row = db.row(held).await;
    assert_eq!(row.progress.as_deref(), Some("half way"), "{row:#?}");
    assert_eq!(row.tries, 1, "{row:#?}");
    assert!(
        row.result_text.as_deref().unwrap_or("").contains("done"),
        "{row:#?}"
    );
    let log = daemon.log_text();
    assert!(!log.contains("not recorded"), "{log}");
    assert!(daemon.stop().success());
}

/// The recorder's batch of outcomes passes over rows another session
/// holds locked by a select that locks the batch's rows: its plan, run on
/// 200 running rows, must run that select once. Written `IN (…)`, it was
/// the inner side of a nested loop, run again for each row of the batch
/// (`loops=200`): a batch of 459 outcomes took 1.5 s, and the bench's drain
/// at `max_concurrent` 8 fell to 30% of the spawn ceiling. The statement is
/// the daemon's own, run in a transaction that is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_of_outcomes_locks_its_rows_in_one_pass() {
    let db = TestDb::new(Backend::Postgres).await;
    db.insert_copies(NewRow::new("NoOp"), 200).await;
    db.execute("UPDATE task_runner_requests SET result = 'RUNNING', claim_token = 't', tries = 1")
        .await;
    db.execute("ANALYZE task_runner_requests").await;
    let batch = &taskrunner::store::sql::SQL
        .of(taskrunner::store::Backend::Postgres)
        .record_outcomes_batch;
    let ids: Vec<i64> = (1..=200).collect();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut transaction = pool.begin().await.unwrap();
    let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, COSTS OFF) {batch}"));
    let plan: Vec<String> = sqlx::query_scalar(explain)
        .bind(&ids)
        .bind(vec!["t"; 200])
        .bind(vec!["FINISHED"; 200])
        .bind(vec![""; 200])
        .bind(vec![0_i64; 200])
        .bind(vec![None::<f64>; 200])
        .fetch_all(&mut *transaction)
        .await
        .unwrap();
    transaction.rollback().await.unwrap();
    pool.close().await;
    let plan = plan.join("\n");
    let locks: Vec<&str> = plan
        .lines()
        .filter(|line| line.contains("LockRows"))
        .collect();
    assert_eq!(locks.len(), 1, "{plan}");
    assert!(locks[0].contains("rows=200 loops=1"), "{plan}");
}

/// A batch of outcomes is written in a few statements however many it
/// holds, plus a look-up per outcome that did not apply (one on SQLite and
/// PostgreSQL; four on MariaDB, which has no
/// `UPDATE … RETURNING`: it wrote one statement per outcome), and each
/// outcome still applies to its own row only while its claim holds: a
/// retry delay, a cancel that overrides a failure, a given-back try, and an
/// outcome whose claim was taken (not applied, the row untouched).
async fn a_batch_of_outcomes_is_written_in_a_few_statements_each_on_its_own_claim(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    let token = InstanceId::new("recording").claim_token(1);
    let other = InstanceId::new("another").claim_token(1);
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'RUNNING', claim_token = '{token}', tries = 1"
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET cancel_requested_at = created_at WHERE id = {}",
        ids[2]
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET claim_token = '{other}' WHERE id = {}",
        ids[4]
    ))
    .await;
    let store = Store::open(&db.url, Purpose::Cli).unwrap();
    let mut retried = outcome(ids[1], &token, State::Failed, false);
    if let Write::Outcome(outcome) = &mut retried {
        outcome.retry_after = Some(3600.0);
    }
    let batch = vec![
        outcome(ids[0], &token, State::Finished, false),
        retried,
        outcome(ids[2], &token, State::Failed, false),
        outcome(ids[3], &token, State::Interrupted, true),
        outcome(ids[4], &token, State::Finished, false),
    ];
    let before = store.statements_sent();
    let applied = store.record(&batch).await.unwrap();
    let statements = store.statements_sent() - before;
    assert_eq!(applied, vec![true, true, true, true, false]);
    // Plus one look-up for the outcome that did not apply: is its claim
    // still held (its row gained a callback since), or lost?
    assert!(
        statements <= 4 + 1,
        "{statements} statements for a batch of {} outcomes",
        batch.len()
    );
    let expected = [
        ("FINISHED", 1, false),
        ("FAILED", 1, true),
        ("CANCELLED", 1, false),
        ("INTERRUPTED", 0, false),
        ("RUNNING", 1, false),
    ];
    for (id, (result, tries, delayed)) in ids.iter().zip(expected) {
        let row = store.show(*id).await.unwrap().unwrap();
        assert_eq!(row.result.as_deref(), Some(result), "{row:#?}");
        assert_eq!(row.tries, tries, "{row:#?}");
        assert_eq!(row.delay_until.is_some(), delayed, "{row:#?}");
        assert_eq!(row.completed_at.is_some(), result != "RUNNING", "{row:#?}");
    }
    let cancelled = store.show(ids[2]).await.unwrap().unwrap();
    assert!(
        cancelled
            .result_text
            .as_deref()
            .is_some_and(|text| text.contains("cancelled by a user") && text.contains("FAILED")),
        "{cancelled:#?}"
    );
    store.close().await;
}

/// The rows a final outcome causes (a callback, a batch's callback, a
/// periodic row's next occurrence) are inserted in the transaction that
/// records it. When the database refused one for its data (a callback type
/// name longer than 255 characters, which SQLite's and PostgreSQL's triggers
/// refuse, in a row written before migration 0013; a next occurrence past the year 9999, which MariaDB refuses), the
/// whole transaction failed, and the recorder retried it for ever: no try's
/// outcome was recorded again (the canaries below stayed RUNNING), and at
/// shutdown every one was lost and its row ran again. Now the refused row
/// alone is not made, and one error line says so.
async fn a_row_an_outcome_causes_that_the_database_refuses_holds_back_no_outcome(backend: Backend) {
    let db = TestDb::new(backend).await;
    let long = "X".repeat(300);
    let mut refused = Vec::new();
    if backend == Backend::MySql {
        // MariaDB's VARCHAR(255) columns refuse such a name when it is written.
        let insert = format!(
            "INSERT INTO task_runner_requests (task_class_name, on_success) VALUES ('Ok', '{long}')"
        );
        assert!(db.try_execute(&insert).await.is_err());
    } else {
        // Rows written before migration 0013, which refuses such names now.
        db.with_the_rules_before_0013().await;
        let success = db.insert_row(NewRow::new("Ok").on_success(&long)).await;
        refused.push(format!("request {success}'s on_success callback `XXXX"));
        let failure = db
            .insert_row(NewRow::new("Fail").try_limit(1).on_failure(&long))
            .await;
        refused.push(format!("request {failure}'s on_failure callback `XXXX"));
        let batch = db
            .insert(&format!(
                "INSERT INTO task_runner_batches (on_complete) VALUES ('{long}') RETURNING id"
            ))
            .await;
        db.insert_row(NewRow::new("Ok").batch(batch.0)).await;
        db.execute(&format!(
            "UPDATE task_runner_batches SET sealed_at = CURRENT_TIMESTAMP WHERE id = {batch}"
        ))
        .await;
        refused.push(format!("batch {batch}'s on_complete callback `XXXX"));
    }
    // A daily row planned for the last day the databases hold.
    let last_day = db
        .insert_row(
            NewRow::new("Ok")
                .period(86_400)
                .sql("planned_at", "'9999-12-31 00:00:00'"),
        )
        .await;
    if backend == Backend::MySql {
        refused.push(format!("request {last_day}'s next occurrence"));
    }
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Ok: { command: [/bin/echo, ok] }\n  Fail: { command: [/bin/false] }\n",
    );
    let mut canaries = Vec::new();
    for _ in 0..3 {
        canaries.push(db.insert_row(NewRow::new("Ok")).await.to_string());
    }
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND id IN ({})",
            canaries.join(", ")
        ),
        3,
        Duration::from_secs(30),
    )
    .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING' OR (result IS NULL AND delay_until IS NULL)",
        0,
        Duration::from_secs(30),
    )
    .await;
    for needle in &refused {
        daemon.wait_for_log(needle, Duration::from_secs(10));
    }
    let log = daemon.log_text();
    assert_eq!(
        log.matches("was not created: the database refused it")
            .count(),
        refused.len(),
        "{log}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE callback_of IS NOT NULL OR callback_of_batch IS NOT NULL").await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches WHERE state = 'FINISHED'")
            .await,
        i64::from(backend != Backend::MySql)
    );
    // Every try ran once; the two that fail or finish without their
    // callback are final all the same.
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE tries > 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'FAILED'")
            .await,
        i64::from(backend != Backend::MySql)
    );
    // The next occurrence past the year 9999: on SQLite at the last time it
    // holds (its arithmetic gives no time at all, which ran the next one at
    // once, and the next, without end), on PostgreSQL in the year 10000,
    // on MariaDB none (refused, above).
    let next = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE period = 86400 AND id <> {last_day}"
        ))
        .await;
    assert_eq!(next, i64::from(backend != Backend::MySql));
    if next == 1 {
        let id = db
            .scalar(&format!(
                "SELECT max(id) FROM task_runner_requests WHERE period = 86400 AND id <> {last_day}"
            ))
            .await;
        let row = db.row(RequestId(id)).await;
        assert_eq!(row.result, None);
        let planned = row.delay_until.unwrap_or_default();
        assert!(
            planned.starts_with("9999-12-31 23:59:59") || planned.starts_with("10000-01-01"),
            "{planned}"
        );
    }
    assert!(daemon.stop().success());
    assert!(
        !daemon.log_text().contains("could not record every result"),
        "{}",
        daemon.log_text()
    );
}

/// Outcomes that queued together while the database was busy were written
/// in one statement however much text they carried. MariaDB refuses a
/// statement past its `max_allowed_packet` (16 MiB by default) and closes
/// the connection: 24 outcomes of 1 MiB each, queued behind a held lock,
/// were retried for ever, and neither they nor any later outcome was
/// recorded. A batch now carries at most 2 MiB of text.
async fn outcomes_with_large_texts_queued_together_are_all_recorded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (fifo, barrier) = crate::batches::fifo_barrier(&db);
    let mut ids = Vec::new();
    for _ in 0..24 {
        ids.push(db.enqueue("Big", None).await);
    }
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 24\noutput_tail: 1MiB\ntasks:\n  Big:\n    command: [/bin/sh, -c, 'cat {} > /dev/null; head -c 1048576 /dev/zero | tr \"\\0\" a']\n",
            fifo.display()
        ),
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING' AND pid IS NOT NULL",
        24,
        Duration::from_secs(60),
    )
    .await;
    wait_until(Duration::from_secs(30), "24 tasks at the barrier", || {
        crate::batches::count_fifo_readers(&fifo) >= 24
    });
    let mut pids = Vec::new();
    for id in &ids {
        pids.push(db.row(*id).await.pid.expect("recorded") as i32);
    }
    // The first outcome's write waits for this lock; the others queue.
    let hold = Hold::take(&db, ids[0]).await;
    drop(barrier);
    wait_until(Duration::from_secs(30), "every task to exit", || {
        pids.iter().all(|pid| !process_exists(*pid))
    });
    hold.release().await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND length(result_text) = 1048576",
        24,
        Duration::from_secs(60),
    )
    .await;
    assert!(daemon.stop().success());
}
