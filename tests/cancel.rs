//! Cancelling a running request: once `cancel` accepted, no further try runs,
//! whichever ends first, the try or the daemon's stop.

use std::time::{Duration, Instant};

use crate::util::{cli, sql_now_plus, Backend, Daemon, NewRow, TestDb};
use taskrunner::request::RequestId;

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    cancel_of_a_try_that_times_out_first_is_not_retried,
    cancel_of_a_try_that_fails_first_is_not_retried,
    cancel_of_a_try_that_finishes_first_leaves_it_finished,
    local_cancel_stops_the_task_at_once,
    a_cancel_written_by_sql_before_the_claim_is_kept_and_nothing_starts,
    cancel_of_an_exhausted_row_is_refused_and_changes_nothing,
);

/// A daemon whose heartbeat (which delivers cancels from other hosts) comes
/// far later than the tries below end: the try's own outcome arrives first.
pub(crate) const SLOW_HEARTBEAT: &str = "heartbeat_interval: 60s\nlease_timeout: 120s\n";

/// Regression: the outcome write of a try that ended before its daemon acted
/// on a cancel cleared the request, and the row ran a second try.
async fn cancel_of_a_try_that_times_out_first_is_not_retried(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "{SLOW_HEARTBEAT}tasks:\n  Slow:\n    command: [/bin/sleep, '60']\n    timeout: 2s\n"
        ),
    );
    let id = db.enqueue("Slow", None).await;
    db.wait_for_pid(id, WAIT).await;
    let (status, stdout, _) = cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0);
    assert!(stdout.contains("within a heartbeat"), "{stdout}");
    let row = db
        .wait_for(id, WAIT, "final", |r| {
            r.result.as_deref() != Some("RUNNING") && r.result.is_some()
        })
        .await;
    assert_eq!(row.result.as_deref(), Some("CANCELLED"), "{row:#?}");
    assert_eq!(row.tries, 1);
    let text = row.result_text.unwrap();
    assert!(
        text.starts_with("cancelled by a user; the running try ended TIMEOUT: "),
        "{text}"
    );
    assert!(daemon.stop().success());
}

/// Regression: as above, for a command that fails once it has been
/// cancelled (its heartbeat too slow to tell the daemon before the end).
/// The task waits for a gate the test opens after the cancel: with `sleep
/// 2`, a cancel that a loaded CI machine delayed past the task's end was a
/// cancel of the row after its try ("cancelled before it ran"), and the
/// test failed once.
async fn cancel_of_a_try_that_fails_first_is_not_retried(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "{SLOW_HEARTBEAT}tasks:\n  Fails:\n    command: [/bin/sh, -c, 'echo broke >&2; while [ ! -e {} ]; do sleep 0.05; done; exit 1']\n",
            gate.display()
        ),
    );
    let id = db.enqueue("Fails", None).await;
    db.wait_for_pid(id, WAIT).await;
    assert_eq!(cli(&db, &["cancel", &id.to_string()]).0, 0);
    std::fs::write(&gate, "").unwrap();
    let row = db
        .wait_for(id, WAIT, "final", |r| {
            r.result.as_deref() != Some("RUNNING") && r.result.is_some()
        })
        .await;
    assert_eq!(row.result.as_deref(), Some("CANCELLED"), "{row:#?}");
    let text = row.result_text.unwrap();
    assert!(
        text.starts_with("cancelled by a user; the running try ended FAILED: "),
        "{text}"
    );
    assert_eq!(row.tries, 1);
    assert!(daemon.stop().success());
}

/// The work is done: a cancel that came too late leaves FINISHED standing.
async fn cancel_of_a_try_that_finishes_first_leaves_it_finished(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "{SLOW_HEARTBEAT}tasks:\n  Quick:\n    command: [/bin/sh, -c, 'sleep 1; echo done']\n"
        ),
    );
    let id = db.enqueue("Quick", None).await;
    db.wait_for_pid(id, WAIT).await;
    assert_eq!(cli(&db, &["cancel", &id.to_string()]).0, 0);
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("done"));
    assert!(daemon.stop().success());
}

/// With the daemon's control socket in the config, `cancel` wakes the
/// daemon, which stops the task at once rather than at its next heartbeat.
async fn local_cancel_stops_the_task_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("{SLOW_HEARTBEAT}tasks:\n  Long:\n    command: [/bin/sleep, '60']\n"),
    );
    let id = db.enqueue("Long", None).await;
    db.wait_for_pid(id, WAIT).await;
    let config = daemon.config.display().to_string();
    let asked = Instant::now();
    let (status, stdout, stderr) = cli(&db, &["--config", &config, "cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("its daemon is stopping it"), "{stdout}");
    cancelled_at_once(&db, id, asked).await;
    assert!(daemon.stop().success());
}

/// Waits for row `id` to end CANCELLED by the cancel asked at `asked`, of a
/// daemon whose heartbeat comes every minute ([`SLOW_HEARTBEAT`]): at once,
/// so by a daemon woken for it.
pub(crate) async fn cancelled_at_once(db: &TestDb, id: RequestId, asked: Instant) {
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "stopped at once, not at the 60s heartbeat: {:?}",
        asked.elapsed()
    );
    assert!(
        row.result_text
            .as_deref()
            .unwrap_or_default()
            .starts_with("cancelled by a user after"),
        "{row:#?}"
    );
}

/// An application cancels from SQL the way `cancel` does a running row,
/// setting `cancel_requested_at`, without knowing whether the row runs yet.
/// While it waited, the claim cleared the column and ran the try: the
/// task did its work and the row ended FINISHED, the cancel lost. The claim
/// keeps it now, and the try ends CANCELLED without starting; a cancel
/// older than the row's last end (for the try it ended) does not stop a
/// row the application made to run again.
async fn a_cancel_written_by_sql_before_the_claim_is_kept_and_nothing_starts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let marker = db.scratch.join("started");
    let id = db
        .insert_row(NewRow::new("Work").sql("cancel_requested_at", sql_now_plus(backend, 0)))
        .await;
    let after = db.enqueue("Work", None).await;
    // Cancelled while it ran, long ago, then made to run again by plain SQL
    // (the application's retry): that cancel was for the try it ended.
    let retried = db
        .insert_row(
            NewRow::new("Work")
                .ended(backend, "CANCELLED", 1, 50)
                .sql("cancel_requested_at", sql_now_plus(backend, -60)),
        )
        .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = NULL, tries = 0 WHERE id = {retried}"
    ))
    .await;
    // On SQLite, times an application writes in another form: a cancel
    // written with an offset after the row's failed try ended (its text
    // sorted before that end's, and the row ran), and an old one in `T…Z`
    // form on a row retried since (its text sorted after that end's).
    let (offset, t_form) = if backend == Backend::Sqlite {
        let offset = db
            .insert_row(NewRow::new("Work").try_limit(3).ended(backend, "FAILED", 1, 50).sql(
                "cancel_requested_at",
                "strftime('%Y-%m-%d %H:%M:%S', 'now', '-40 seconds', '-5 hours') || '-05:00'",
            ))
            .await;
        let t_form = db
            .insert_row(NewRow::new("Work").ended(backend, "CANCELLED", 1, 50).sql(
                "cancel_requested_at",
                "strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '-60 seconds')",
            ))
            .await;
        db.execute(&format!(
            "UPDATE task_runner_requests SET result = NULL, tries = 0 WHERE id = {t_form}"
        ))
        .await;
        (Some(offset), Some(t_form))
    } else {
        (None, None)
    };
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 1\ntasks:\n  Work:\n    command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {}; echo done']\n",
            marker.display()
        ),
    );
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("cancelled before it ran"));
    // The slot was not kept: the next rows run.
    db.wait_for_state(after, "FINISHED", WAIT).await;
    db.wait_for_state(retried, "FINISHED", WAIT).await;
    if let Some(offset) = offset {
        let row = db.wait_for_state(offset, "CANCELLED", WAIT).await;
        assert_eq!(row.result_text.as_deref(), Some("cancelled before it ran"));
    }
    if let Some(t_form) = t_form {
        db.wait_for_state(t_form, "FINISHED", WAIT).await;
    }
    let started = std::fs::read_to_string(&marker).unwrap_or_default();
    let mut started: Vec<&str> = started.lines().collect();
    started.sort();
    let mut expected = vec![after.to_string(), retried.to_string()];
    expected.extend(t_form.map(|id| id.to_string()));
    expected.sort();
    assert_eq!(started, expected, "only the other rows started");
    assert!(daemon.stop().success());
}

/// `cancel` of a running row is two statements: the one for a row that
/// has not run yet (or waits for its next try), then the one for a running
/// row. A try that ended between them (FAILED with tries left) matched
/// neither: `cancel` said "already FAILED: nothing to cancel", exited 1,
/// and the row ran again after its backoff. Here the try's end is held
/// (uncommitted, its row locked) until `cancel` has passed the first
/// statement and waits on the second; `cancel` now runs both again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_cancel_whose_try_ends_between_its_statements_is_kept() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    let id = db
        .insert_row(NewRow::new("NoOp").try_limit(5).running(
            Backend::Postgres,
            "other-host",
            "other-host:1:x",
            "t",
            1,
            0,
        ))
        .await;
    // The try's outcome (FAILED, tries left), written but not committed.
    let mut outcome = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; UPDATE task_runner_requests \
            SET result = 'FAILED', result_text = 'failed', completed_at = now(), \
                claimed_by = NULL, claim_token = NULL \
          WHERE id = {id}"
    )))
    .execute(&mut outcome)
    .await
    .unwrap();
    let mut cancel = crate::util::spawn_cli(&db, &["cancel", &id.to_string()]);
    db.wait_for_a_statement_waiting_on_a_lock("UPDATE task_runner_requests")
        .await;
    sqlx::raw_sql("COMMIT").execute(&mut outcome).await.unwrap();
    let status = cancel.wait().unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut cancel.stderr.take().unwrap(), &mut said).unwrap();
    assert!(status.success(), "{said}");
    assert_eq!(db.row(id).await.result.as_deref(), Some("CANCELLED"));
}

/// An exhausted row (FAILED after all its tries) is final: `cancel` says so
/// and changes nothing, as for FINISHED. Before, it was made CANCELLED, and
/// a batch it belonged to counted it a second time (once failed, then
/// cancelled).
async fn cancel_of_an_exhausted_row_is_refused_and_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Fails:\n    command: [/bin/sh, -c, 'echo broke >&2; exit 1']\n",
    );
    let id = db.insert_row(NewRow::new("Fails").try_limit(1)).await;
    let before = db.wait_for_state(id, "FAILED", WAIT).await;
    assert!(daemon.stop().success());
    let (status, stdout, stderr) = cli(&db, &["cancel", &id.to_string()]);
    assert_ne!(status, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "request {id} is already FAILED: nothing to cancel"
        )),
        "{stderr}"
    );
    let after = db.row(id).await;
    assert_eq!(
        (after.result, after.result_text, after.tries),
        (before.result, before.result_text, before.tries)
    );
}
