//! Faults a hostile review found (issue 13): each test is named after what
//! broke, and failed before its fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::{process_exists, Backend, Daemon, TestDb};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    a_dead_heartbeat_stops_the_daemon_with_exit_status_1,
    starts_failing_for_the_daemons_own_descriptors_give_the_try_back,
);

/// A TCP proxy in front of the test's PostgreSQL server that, once armed,
/// closes the first connection whose answer reports rows changed by an
/// UPDATE (the claim's `UPDATE … RETURNING`, committed by then) instead of
/// forwarding that answer. Returns the proxied URL.
async fn claim_answer_dropping_proxy(url: &str, armed: Arc<AtomicBool>) -> String {
    let (head, rest) = url.rsplit_once('@').expect("user@host in the URL");
    let (address, database) = rest.split_once('/').expect("a database in the URL");
    let server = address.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = server.clone();
            let armed = armed.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(&server).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let to_server = async {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let to_client = async {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        if reports_updated_rows(&buffer[..n]) && armed.swap(false, Ordering::SeqCst)
                        {
                            // Drop the answer and the connection.
                            break;
                        }
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                // The first direction to end closes both.
                tokio::select! {
                    _ = to_server => {}
                    _ = to_client => {}
                }
            });
        }
    });
    format!("{head}@127.0.0.1:{port}/{database}")
}

/// Whether server bytes hold a CommandComplete `UPDATE n` with n > 0.
fn reports_updated_rows(bytes: &[u8]) -> bool {
    bytes
        .windows(8)
        .any(|w| w.starts_with(b"UPDATE ") && (b'1'..=b'9').contains(&w[7]))
}

/// The daemon renewed the heartbeat of every row it held, but ran only the
/// rows whose claim answer it received: rows claimed by a statement whose
/// answer was lost with the connection stayed RUNNING for ever, renewed.
/// PostgreSQL only: SQLite has no connection to lose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_whose_claim_answer_was_lost_are_given_back() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    let armed = Arc::new(AtomicBool::new(true));
    let proxied = claim_answer_dropping_proxy(&db.url, armed.clone()).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("database_url: {proxied}\nmax_concurrent: 4\n"),
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        12,
        WAIT,
    )
    .await;
    assert!(
        !armed.load(Ordering::SeqCst),
        "the proxy dropped a claim's answer"
    );
    assert!(
        daemon
            .log_text()
            .contains("holds rows it never started: giving them back"),
        "{}",
        daemon.log_text()
    );
    // Given back, not counted: every row ran once.
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE tries <> 1")
            .await,
        0
    );
    assert!(daemon.stop().success());
}

/// The services' join handles were read only at shutdown: a heartbeat that
/// panicked left tasks running with no lease renewal and no self-fencing.
/// Now the first service to end stops the daemon in the SPEC's order (its
/// tasks INTERRUPTED) and it exits 1.
async fn a_dead_heartbeat_stops_the_daemon_with_exit_status_1(backend: Backend) {
    let db = TestDb::new(backend).await;
    let trigger = db.scratch.join("panic-now");
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        "shutdown_timeout: 1s\ntasks:\n  Sleep:\n    command: [sleep, '60']\n",
        &[(
            "TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE",
            trigger.to_str().unwrap(),
        )],
    );
    let id = db.enqueue("Sleep", None).await;
    let row = db
        .wait_for(id, WAIT, "running with a pid", |r| r.pid.is_some())
        .await;
    std::fs::write(&trigger, "").unwrap();
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("the heartbeat panics: told to by a test"),
        "{}",
        daemon.log_text()
    );
    assert!(
        !process_exists(row.pid.unwrap() as i32),
        "the task is stopped"
    );
    let row = db.row(id).await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:#?}");
}

/// Out of file descriptors on the daemon's side, every start that failed
/// became a FAILED try: with `ulimit -n 1024` and 500 tasks, 167 rows were
/// exhausted without ever running. Now such a start gives its try back, the
/// scheduler backs off, one line is logged, and a too small limit is
/// announced at start. Here 40 descriptors fit about five of twelve tasks.
async fn starts_failing_for_the_daemons_own_descriptors_give_the_try_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    for _ in 0..24 {
        db.insert(
            "INSERT INTO task_runner_requests (task_class_name, try_limit) VALUES ('Nap', 1) RETURNING id",
        )
        .await;
    }
    let mut daemon = Daemon::start_with_open_files(
        &db,
        "d",
        "max_concurrent: 12\ntasks:\n  Nap:\n    command: [sleep, '0.3']\n",
        (40, 40),
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IS NULL OR result <> 'FINISHED'",
        0,
        Duration::from_secs(60),
    )
    .await;
    let log = daemon.log_text();
    assert!(
        log.contains("may not fit in this daemon's file descriptor limit"),
        "{log}"
    );
    assert_eq!(
        log.matches("the daemon is short of resources to start tasks")
            .count(),
        1,
        "{log}"
    );
    assert!(daemon.stop().success());
}
