//! Web: the time of each page of `taskrunner-cli web`, and of a `/metrics`
//! scrape, on a table of a million rows (the target: every page
//! under 200 ms). Rows of every kind, spread over 5 queues, 10 types and 3
//! hosts: 90% FINISHED long ago (2% of them in the last hour, for the
//! chart), 4% exhausted, 1% failed and waiting for their retry, 4.8%
//! pending, 0.2% RUNNING.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::database::{Backend, Bench};
use crate::report::{ms, Table};

/// Timed requests per page (after one untimed).
const TIMES: usize = 5;

pub struct Case {
    pub backend: Backend,
    pub rows: usize,
    /// (page, each request's time in ms, sorted)
    pub pages: Vec<(String, Vec<f64>)>,
}

pub async fn run(bench: &Bench, backends: &[Backend], rows: usize) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &backend in backends {
        cases.push(measure(bench, backend, rows).await?);
    }
    Ok(cases)
}

fn part(rows: usize, per_mille: usize) -> usize {
    rows * per_mille / 1000
}

async fn measure(bench: &Bench, backend: Backend, rows: usize) -> Result<Case> {
    let dir = bench.case_dir(&format!("web-{backend:?}-{rows}").to_lowercase())?;
    let database = bench.database(backend, &dir).await?;
    eprintln!("web: loading {rows} rows into {}", backend.name());
    let loading = Instant::now();
    let now = match backend {
        Backend::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now')".to_string(),
        Backend::Postgres => "now()".to_string(),
        Backend::Mysql => "UTC_TIMESTAMP(6)".to_string(),
    };
    // A time `seconds` (an SQL expression) before now.
    let ago = |seconds: &str| match backend {
        Backend::Sqlite => {
            format!("strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ({seconds}) || ' seconds')")
        }
        Backend::Postgres => format!("(now() - make_interval(secs => ({seconds})))"),
        Backend::Mysql => format!("(UTC_TIMESTAMP(6) - INTERVAL ({seconds}) SECOND)"),
    };
    let in_an_hour = match backend {
        Backend::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now', '+3600 seconds')".to_string(),
        Backend::Postgres => "(now() + interval '1 hour')".to_string(),
        Backend::Mysql => "(UTC_TIMESTAMP(6) + INTERVAL 1 HOUR)".to_string(),
    };
    let long_ago = "'2026-01-01 00:00:00.000'";
    let queue = "'q' || (n % 5)";
    let task = "'Type' || (n % 10)";
    let host = "'host' || (n % 3)";
    let options = "'size: ' || n";
    let common = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut columns = vec![
            ("queue", queue.to_string()),
            ("task_class_name", task.to_string()),
            ("host", host.to_string()),
            ("options", options.to_string()),
        ];
        columns.extend(extra.iter().cloned());
        columns
    };
    let recent_completed = ago("n % 3600");
    let groups: Vec<(usize, Vec<(&'static str, String)>)> = vec![
        (
            part(rows, 880),
            common(&[
                ("created_at", long_ago.into()),
                ("started_at", long_ago.into()),
                ("completed_at", long_ago.into()),
                ("result", "'FINISHED'".into()),
                ("result_text", "'done'".into()),
                ("tries", "1".into()),
            ]),
        ),
        (
            part(rows, 20),
            common(&[
                ("created_at", ago("3700")),
                ("started_at", recent_completed.clone()),
                ("completed_at", recent_completed.clone()),
                (
                    "result",
                    "CASE WHEN n % 20 = 0 THEN 'FAILED' ELSE 'FINISHED' END".into(),
                ),
                ("result_text", "'recent'".into()),
                ("tries", "1".into()),
            ]),
        ),
        (
            part(rows, 40),
            common(&[
                ("created_at", long_ago.into()),
                ("completed_at", long_ago.into()),
                ("result", "'FAILED'".into()),
                ("result_text", "'exit status 1'".into()),
                ("tries", "5".into()),
            ]),
        ),
        (
            part(rows, 10),
            common(&[
                ("created_at", ago("600")),
                ("completed_at", ago("60")),
                ("delay_until", in_an_hour.clone()),
                ("result", "'FAILED'".into()),
                ("result_text", "'exit status 1'".into()),
                ("tries", "1".into()),
            ]),
        ),
        (part(rows, 48), common(&[("created_at", ago("300"))])),
        (
            part(rows, 2),
            common(&[
                ("created_at", ago("400")),
                ("started_at", now.clone()),
                ("heartbeat_at", now.clone()),
                ("result", "'RUNNING'".into()),
                ("claimed_by", "'bench:' || (n % 2)".into()),
                ("pid", "1".into()),
            ]),
        ),
    ];
    for (count, columns) in &groups {
        let columns: Vec<(&str, &str)> = columns.iter().map(|(n, v)| (*n, v.as_str())).collect();
        database.bulk_insert(*count, &columns).await?;
    }
    if backend == Backend::Postgres {
        database
            .execute("VACUUM ANALYZE task_runner_requests")
            .await?;
    } else {
        database.execute("ANALYZE").await?;
    }
    eprintln!("web: loaded in {:.1}s", loading.elapsed().as_secs_f64());
    let middle = database
        .integer("SELECT max(id) FROM task_runner_requests")
        .await?
        / 2;
    let failed = database
        .integer("SELECT max(id) FROM task_runner_requests WHERE result = 'FAILED'")
        .await?;
    let port = free_port()?;
    let mut server = start_web(bench, &database.url, port)?;
    let result = time_pages(port, middle, failed).await;
    let _ = server.kill();
    let _ = server.wait();
    database.close().await;
    Ok(Case {
        backend,
        rows,
        pages: result?,
    })
}

async fn time_pages(port: u16, middle: i64, failed: i64) -> Result<Vec<(String, Vec<f64>)>> {
    wait_ready(port).await?;
    let pages = [
        "/".to_string(),
        "/requests".into(),
        format!("/requests?before={middle}"),
        "/requests?state=FAILED".into(),
        "/requests?state=PENDING&queue=q3".into(),
        "/requests?task=Type7&state=FINISHED".into(),
        "/requests?host=host2".into(),
        "/requests?text=size%3A+12345".into(),
        format!("/requests/{failed}"),
        "/daemons".into(),
        "/batches".into(),
        "/flows".into(),
        "/requests?flow=1".into(),
        "/schedules".into(),
        "/bulk?action=retry&state=FAILED&queue=q1".into(),
    ];
    let mut timings = Vec::new();
    for page in pages {
        let mut times = Vec::new();
        for round in 0..=TIMES {
            let started = Instant::now();
            let status = http_get(port, &page)?;
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            if status != 200 {
                bail!("GET {page} answered {status}");
            }
            if round > 0 {
                times.push(elapsed);
            }
        }
        times.sort_by(f64::total_cmp);
        timings.push((page, times));
    }
    // The scrape reads the database at most once a second: wait out the cache.
    let mut times = Vec::new();
    for _ in 0..TIMES {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let started = Instant::now();
        http_get(port, "/metrics")?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    timings.push(("/metrics (uncached)".into(), times));
    Ok(timings)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_web(bench: &Bench, url: &str, port: u16) -> Result<Child> {
    Command::new(bench.binary(crate::daemon::CLI))
        .args(["--database-url", url, "web", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting taskrunner-cli web")
}

async fn wait_ready(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("taskrunner-cli web did not listen on {port} within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One GET; returns the status code once the whole body is read.
fn http_get(port: u16, path: &str) -> Result<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let head = String::from_utf8_lossy(&reply[..reply.len().min(20)]).into_owned();
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: no HTTP status in {head:?}"))
}

pub fn table(cases: &[Case]) -> Table {
    let mut table = Table::new(
        "Web: page and /metrics times on a large table (taskrunner-cli web)",
        &["backend", "rows", "page", "median ms", "max ms", "target"],
    );
    for case in cases {
        for (page, times) in &case.pages {
            table.row(vec![
                case.backend.name().to_string(),
                case.rows.to_string(),
                format!("`{page}`"),
                ms(times[times.len() / 2]),
                ms(*times.last().unwrap_or(&f64::NAN)),
                "under 200".to_string(),
            ]);
        }
    }
    table.note(
        "Each time is one HTTP GET on loopback to `taskrunner-cli web`, from the request to the last byte \
         of the page, after one untimed request; 5 per page. Rows: 90% FINISHED (2% of them in the last hour), \
         4% exhausted, 1% failed waiting for a retry, 4.8% pending, 0.2% RUNNING, over 5 queues, 10 types and 3 hosts. \
         /metrics is timed with its one-second cache expired.",
    );
    table
}
