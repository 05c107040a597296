//! The web page and `/metrics`: the router in-process on both backends
//! (every page renders, hostile rows are escaped, CSRF, Origin, read-only,
//! auth), the listener's refusal of a non-loopback address without auth,
//! and the metrics of a real daemon checked by `promtool`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use crate::util::{cli, poll, poll_blocking, sql_ago, Backend, Daemon, NewRow, TestDb, Text, CLI};
use taskrunner::config::Config;
use taskrunner::request::RequestId;
use taskrunner::store::{Purpose, Store};
use taskrunner::web::{router, Web};

const WAIT: Duration = Duration::from_secs(30);

/// The page's router on the test database, with `http:` settings `http`.
fn web_router(db: &TestDb, http: &str) -> axum::Router {
    let dir = db.scratch.join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("taskrunner.yml");
    std::fs::write(
        &file,
        format!("database_url: {}\nschedules:\n  nightly:\n    cron: '0 3 * * *'\n    time_zone: Asia/Kathmandu\n    task: NoOp\n{http}", db.url),
    )
    .unwrap();
    let config = Config::load_file(&file).unwrap();
    let store = Store::open(&db.url, Purpose::Cli).unwrap();
    router(Arc::new(Web::new(store, Arc::new(config), None).unwrap()))
}

struct Reply {
    status: StatusCode,
    body: String,
    csp: String,
}

async fn send(router: &axum::Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let csp = response
        .headers()
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        csp,
    }
}

async fn get(router: &axum::Router, path: &str) -> Reply {
    send(router, Request::get(path).body(Body::empty()).unwrap()).await
}

async fn post(router: &axum::Router, path: &str, form: &str, origin: Option<&str>) -> Reply {
    let mut request = Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "127.0.0.1:8080");
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    send(router, request.body(Body::from(form.to_string())).unwrap()).await
}

/// The CSRF token the page puts in its forms.
fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page.find(marker).expect("a form with a CSRF token") + marker.len();
    page[start..start + 32].to_string()
}

/// A bulk preview's confirmation, as its form posts it: `ids=…` (the
/// commas escaped).
fn confirmation_of(preview: &str) -> String {
    let marker = "name=\"ids\" value=\"";
    let start = preview.find(marker).expect("a bulk form") + marker.len();
    let end = start + preview[start..].find('"').unwrap();
    format!("ids={}", preview[start..end].replace(',', "%2C"))
}

async fn insert_failed(db: &TestDb, options: &str) -> RequestId {
    db.insert_row(
        NewRow::new("Thumbnail")
            .options(options)
            .exhausted(db.backend, 1, 0)
            .result_text("exit status 1"),
    )
    .await
}

async fn every_page_renders_with_a_strict_policy(backend: Backend) {
    let db = TestDb::new(backend).await;
    let failed = insert_failed(&db, "size: 10").await;
    db.enqueue("NoOp", None).await;
    // A pause written by plain SQL (its time is the column's default).
    db.execute(
        "INSERT INTO task_runner_pauses (kind, name, reason) VALUES ('queue', 'default', '<i>relay down</i>')",
    )
    .await;
    let web = web_router(&db, "");
    for path in [
        "/".to_string(),
        "/requests".into(),
        "/requests?state=FAILED".into(),
        "/requests?state=PENDING&task=NoOp&queue=default".into(),
        "/requests?host=nowhere&text=size".into(),
        "/requests?state=PENDING&host=nowhere".into(),
        format!("/requests?state=PENDING&text=x&before={failed}"),
        format!("/requests?before={failed}"),
        format!("/requests/{failed}"),
        "/daemons".into(),
        "/batches".into(),
        "/flows".into(),
        "/flows?before=5".into(),
        "/requests?flow=1".into(),
        "/schedules".into(),
        "/bulk?action=retry&state=FAILED".into(),
        "/metrics".into(),
        "/style.css".into(),
    ] {
        let reply = get(&web, &path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        assert!(
            reply.csp.contains("default-src 'none'"),
            "{path}: {}",
            reply.csp
        );
        assert!(!reply.csp.contains("unsafe-inline"), "{path}");
    }
    let listed = get(&web, "/requests?state=FAILED").await.body;
    assert!(listed.contains(&format!("/requests/{failed}")), "{listed}");
    assert!(
        !listed.contains("NoOp"),
        "the state filter lets other rows through: {listed}"
    );
    let bulk = get(&web, "/bulk?action=retry&state=FAILED").await.body;
    assert!(bulk.contains("1 requests match"), "{bulk}");
    let overview = get(&web, "/").await.body;
    assert!(
        overview.contains("<h2>Paused</h2>")
            && overview.contains("&lt;i&gt;relay down&lt;/i&gt;")
            && overview.contains(r#"<span class="badge">paused</span>"#),
        "{overview}"
    );
    // The next slot, in UTC and on the schedule's clock (UTC+05:45).
    let schedules = get(&web, "/schedules").await.body;
    assert!(
        schedules.contains("nightly") && schedules.contains("time_zone: Asia/Kathmandu"),
        "{schedules}"
    );
    assert!(
        schedules.contains(" 21:15:00 UTC (") && schedules.contains(" 03:00 +0545)"),
        "{schedules}"
    );
    assert_eq!(
        get(&web, "/requests/999999").await.status,
        StatusCode::NOT_FOUND
    );
}

async fn a_hostile_row_shows_as_text(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "<script>alert('options')</script>").await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result_text = '<img src=x onerror=alert(1)>', \
                queue = '<b>q</b>', task_class_name = '\"><script>t</script>' WHERE id = {id}"
    ))
    .await;
    let web = web_router(&db, "");
    for path in [format!("/requests/{id}"), "/requests".into(), "/".into()] {
        let body = get(&web, &path).await.body;
        assert!(!body.contains("<script>"), "{path}: {body}");
        assert!(!body.contains("<img src=x"), "{path}: {body}");
        assert!(!body.contains("<b>q</b>"), "{path}: {body}");
    }
    let page = get(&web, &format!("/requests/{id}")).await.body;
    assert!(
        page.contains("&lt;script&gt;alert('options')&lt;/script&gt;"),
        "{page}"
    );
}

async fn actions_need_the_csrf_token_and_this_origin(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "");
    let path = format!("/requests/{id}/retry");
    // No token, a wrong token: refused, the row unchanged.
    assert_eq!(
        post(&web, &path, "", None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(&web, &path, "csrf=0123456789abcdef0123456789abcdef", None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));
    let token = csrf_of(&get(&web, &format!("/requests/{id}")).await.body);
    // The right token from another site: refused.
    let reply = post(
        &web,
        &path,
        &format!("csrf={token}"),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));
    // A GET cannot act.
    assert_eq!(
        get(&web, &path).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // The right token from this page: done.
    let reply = post(
        &web,
        &path,
        &format!("csrf={token}"),
        Some("http://127.0.0.1:8080"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    let row = db.row(id).await;
    assert_eq!((row.result, row.tries), (None, 0));
    // Cancel it, then bulk-retry what the filter shows.
    let reply = post(
        &web,
        &format!("/requests/{id}/cancel"),
        &format!("csrf={token}"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(db.row(id).await.result.as_deref(), Some("CANCELLED"));
    let preview = get(&web, "/bulk?action=retry&state=CANCELLED").await.body;
    assert!(preview.contains("1 requests match"), "{preview}");
    let reply = post(
        &web,
        "/bulk",
        &format!(
            "csrf={token}&action=retry&state=CANCELLED&{}",
            confirmation_of(&preview)
        ),
        None,
    )
    .await;
    assert!(
        reply.body.contains("applied to 1 requests"),
        "{}",
        reply.body
    );
    assert_eq!(db.row(id).await.result, None);
}

/// The overview pauses and resumes a queue or a type, as the CLI does:
/// with the CSRF token only; a bad kind or name gets one clear error and
/// writes nothing; pausing what is paused keeps its reason.
async fn the_overview_pauses_and_resumes_queues_and_types(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.insert_row(NewRow::new("Thumbnail").queue("mail")).await;
    let web = web_router(&db, "");
    let store = Store::open(&db.url, Purpose::Cli).unwrap();
    let paused = || async {
        store
            .pauses()
            .await
            .unwrap()
            .into_iter()
            .map(|pause| {
                format!(
                    "{} {} {}",
                    pause.kind.word(),
                    pause.name,
                    pause.reason.unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
    };
    let page = get(&web, "/").await.body;
    let button = |kind: &str, name: &str, label: &str| {
        format!("<input type=\"hidden\" name=\"kind\" value=\"{kind}\"><input type=\"hidden\" name=\"name\" value=\"{name}\"><button type=\"submit\">{label}</button>")
    };
    assert!(
        page.contains(&button("queue", "mail", "pause queue")),
        "{page}"
    );
    assert!(
        page.contains(&button("task", "Thumbnail", "pause type")),
        "{page}"
    );
    assert!(page.contains("action=\"/pause\""), "{page}");
    let token = csrf_of(&page);
    // Without the token: refused, nothing paused.
    let reply = post(&web, "/pause", "kind=queue&name=mail", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(paused().await.is_empty());
    // A bad kind, an empty name, a name too long: one line each, nothing written.
    let long = "q".repeat(256);
    for (form, error) in [
        ("kind=host&name=mail", "kind must be queue or task"),
        (
            "kind=queue&name=",
            "a queue name must be 1 to 255 bytes long, not 0",
        ),
        (
            &*format!("kind=task&name={long}"),
            "a task name must be 1 to 255 bytes long, not 256",
        ),
    ] {
        let reply = post(&web, "/pause", &format!("csrf={token}&{form}"), None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{form}");
        assert!(reply.body.contains(error), "{form}: {}", reply.body);
    }
    assert!(paused().await.is_empty());
    // The queue with a reason (as the form sends it), then the type by its button.
    let reply = post(
        &web,
        "/pause",
        &format!("csrf={token}&kind=queue&name=mail&reason=+relay+%3Cb%3Edown%3C%2Fb%3E+"),
        Some("http://127.0.0.1:8080"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    let reply = post(
        &web,
        "/pause",
        &format!("csrf={token}&kind=task&name=Thumbnail"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(
        paused().await,
        ["queue mail relay <b>down</b>", "task Thumbnail "]
    );
    // Pausing it again keeps the first reason.
    let reply = post(
        &web,
        "/pause",
        &format!("csrf={token}&kind=queue&name=mail&reason=other"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(paused().await[0], "queue mail relay <b>down</b>");
    // The page shows each with its Resume button and badges instead of buttons.
    let page = get(&web, "/").await.body;
    assert!(page.contains("relay &lt;b&gt;down&lt;/b&gt;"), "{page}");
    assert!(page.contains(&button("queue", "mail", "Resume")), "{page}");
    assert!(
        page.contains(&button("task", "Thumbnail", "Resume")),
        "{page}"
    );
    assert!(
        !page.contains("pause queue") && !page.contains("pause type"),
        "{page}"
    );
    assert_eq!(
        page.matches("<span class=\"badge\">paused</span>").count(),
        2
    );
    // Resume each; resuming what is not paused changes nothing.
    for form in [
        "kind=queue&name=mail",
        "kind=task&name=Thumbnail",
        "kind=queue&name=mail",
    ] {
        let reply = post(&web, "/resume", &format!("csrf={token}&{form}"), None).await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{form}");
    }
    assert!(paused().await.is_empty());
    let page = get(&web, "/").await.body;
    assert!(
        !page.contains("Paused") && page.contains("pause queue"),
        "{page}"
    );
}

async fn read_only_refuses_actions_and_hides_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "http:\n  read_only: true\n");
    let page = get(&web, &format!("/requests/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("Retry"), "{}", page.body);
    assert!(page.body.contains("read-only"));
    let reply = post(&web, &format!("/requests/{id}/retry"), "csrf=x", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));
    // Nor pause or resume: the overview shows the pause, without buttons.
    db.execute("INSERT INTO task_runner_pauses (kind, name) VALUES ('task', 'Thumbnail')")
        .await;
    let page = get(&web, "/").await.body;
    assert!(page.contains("Paused") && page.contains("badge"), "{page}");
    assert!(
        !page.contains("<form") && !page.contains("<button"),
        "{page}"
    );
    for path in ["/pause", "/resume"] {
        let reply = post(&web, path, "csrf=x&kind=task&name=Thumbnail", None).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM task_runner_pauses").await,
        1
    );
}

async fn auth_asks_for_the_token(backend: Backend) {
    let db = TestDb::new(backend).await;
    let token_file = db.scratch.join("token");
    std::fs::write(&token_file, "s3cret-token-of-32-characters-xx\n").unwrap();
    let web = web_router(
        &db,
        &format!("http:\n  auth:\n    token_file: {}\n", token_file.display()),
    );
    let refused = get(&web, "/").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let wrong = Request::get("/")
        .header("authorization", "Bearer not-the-token-at-all-xxxxxxxxxxx")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&web, wrong).await.status, StatusCode::UNAUTHORIZED);
    let right = Request::get("/")
        .header("authorization", "Bearer s3cret-token-of-32-characters-xx")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&web, right).await.status, StatusCode::OK);
}

async fn auth_asks_for_the_user_and_password(backend: Backend) {
    let db = TestDb::new(backend).await;
    let hash = bcrypt::hash("correct horse", 4).unwrap();
    let web = web_router(
        &db,
        &format!("http:\n  auth:\n    user: ops\n    password_hash: '{hash}'\n"),
    );
    let basic = |credentials: &str| {
        Request::get("/")
            .header("authorization", format!("Basic {credentials}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(get(&web, "/").await.status, StatusCode::UNAUTHORIZED);
    // ops:wrong horse, root:correct horse, then ops:correct horse.
    for (credentials, expected) in [
        ("b3BzOndyb25nIGhvcnNl", StatusCode::UNAUTHORIZED),
        ("cm9vdDpjb3JyZWN0IGhvcnNl", StatusCode::UNAUTHORIZED),
        ("b3BzOmNvcnJlY3QgaG9yc2U=", StatusCode::OK),
        // Verified once, remembered: the same answer again.
        ("b3BzOmNvcnJlY3QgaG9yc2U=", StatusCode::OK),
        ("b3BzOndyb25nIGhvcnNl", StatusCode::UNAUTHORIZED),
    ] {
        assert_eq!(
            send(&web, basic(credentials)).await.status,
            expected,
            "{credentials}"
        );
    }
}

async fn purge_deletes_only_final_rows_older_than_asked(backend: Backend) {
    let db = TestDb::new(backend).await;
    let day = 86_400;
    let row = |result: &str, tries: i64, seconds_ago: i64| {
        NewRow::new("Thumbnail")
            .try_limit(3)
            .ended(db.backend, result, tries, seconds_ago)
    };
    let old_finished = db.insert_row(row("FINISHED", 1, 40 * day)).await;
    let old_exhausted = db.insert_row(row("FAILED", 3, 40 * day)).await;
    let old_retrying = db.insert_row(row("FAILED", 1, 40 * day)).await;
    let recent_finished = db.insert_row(row("FINISHED", 1, day)).await;
    let pending = db.enqueue("NoOp", None).await;
    let failed = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "");
    let token = csrf_of(&get(&web, &format!("/requests/{failed}")).await.body);
    // A malformed age: refused, nothing deleted.
    let reply = post(
        &web,
        "/purge",
        &format!("csrf={token}&older_than=soon"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let count = "SELECT count(*) FROM task_runner_requests";
    assert_eq!(db.scalar(count).await, 6);
    // Without the token: refused.
    let reply = post(&web, "/purge", "older_than=30d", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(db.scalar(count).await, 6);
    let reply = post(
        &web,
        "/purge",
        &format!("csrf={token}&older_than=30d"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply.body.contains("purged 2 final requests"),
        "{}",
        reply.body
    );
    let left: Vec<i64> = {
        let mut ids = Vec::new();
        for id in [
            old_finished,
            old_exhausted,
            old_retrying,
            recent_finished,
            pending,
        ] {
            if db
                .scalar(&format!(
                    "SELECT count(*) FROM task_runner_requests WHERE id = {}",
                    id.0
                ))
                .await
                == 1
            {
                ids.push(id.0);
            }
        }
        ids
    };
    assert_eq!(left, vec![old_retrying.0, recent_finished.0, pending.0]);
}

async fn batches_show_their_progress_and_members(backend: Backend) {
    let db = TestDb::new(backend).await;
    let web = web_router(&db, "");
    let batch = db
        // The member inserted below counts itself (total and pending + 1,
        // migration 0005's trigger): 4 in all, 3 final. (By hand: a batch
        // with counts as its members' ends would have left them.)
        .insert("INSERT INTO task_runner_batches (name, total, pending, finished, failed) VALUES ('<i>nightly</i>', 3, 0, 2, 1) RETURNING id")
        .await
        .0;
    let member = db.insert_row(NewRow::new("Member").batch(batch)).await;
    db.enqueue("NotAMember", None).await;
    let list = get(&web, "/batches").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert!(
        list.body.contains("<progress value=\"3\" max=\"4\""),
        "{}",
        list.body
    );
    assert!(list.body.contains("&lt;i&gt;nightly"), "{}", list.body);
    let one = get(&web, &format!("/batches/{batch}")).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert!(
        one.body.contains(&format!("/requests/{member}")),
        "{}",
        one.body
    );
    assert!(!one.body.contains("NotAMember"), "{}", one.body);
    let filtered = get(&web, &format!("/requests?batch={batch}")).await.body;
    assert!(
        filtered.contains("Member") && !filtered.contains("NotAMember"),
        "{filtered}"
    );
    // The batch's callback, and a member's own: listed on the pages of
    // what caused them, which each link back to.
    let batch_callback = db
        .insert_row(
            NewRow::new("Report")
                .callback_of_batch(batch)
                .unique_key(&format!("batch {batch} complete")),
        )
        .await;
    let own_callback = db
        .insert_row(
            NewRow::new("Notify")
                .callback_of(member)
                .unique_key(&format!("success of {member}")),
        )
        .await;
    let batch_link = format!("<a href=\"/batches/{batch}\">{batch}</a>");
    // (page, what it shows)
    let pages = [
        (
            format!("/batches/{batch}"),
            vec![
                format!("<a href=\"/requests/{batch_callback}\">"),
                format!("batch {batch} complete"),
            ],
        ),
        (
            format!("/requests/{member}"),
            vec![
                batch_link.clone(),
                format!("<a href=\"/requests/{own_callback}\">"),
                format!("success of {member}"),
            ],
        ),
        (
            format!("/requests/{own_callback}"),
            vec![format!("<a href=\"/requests/{member}\">{member}</a>")],
        ),
        (format!("/requests/{batch_callback}"), vec![batch_link]),
    ];
    for (path, shown) in pages {
        let page = get(&web, &path).await.body;
        for text in shown {
            assert!(page.contains(&text), "{path} shows {text}: {page}");
        }
    }
    // The largest id too (the page of batches below it + 1 overflowed: a
    // panic in a debug build).
    for id in ["99999", "9223372036854775807"] {
        assert_eq!(
            get(&web, &format!("/batches/{id}")).await.status,
            StatusCode::NOT_FOUND,
            "{id}"
        );
    }
    // Counters an application wrote at their column's limit (64 bits on
    // SQLite): the progress summed them past i64 (a panic in a debug build,
    // the connection dropped).
    let limit = match backend {
        Backend::Sqlite => i64::MAX,
        Backend::Postgres | Backend::MySql => i64::from(i32::MAX),
    };
    let absurd = db
        .insert(&format!(
            "INSERT INTO task_runner_batches (name, finished, failed, cancelled) \
             VALUES ('absurd', {limit}, {limit}, {limit}) RETURNING id"
        ))
        .await;
    for path in ["/batches".to_string(), format!("/batches/{absurd}")] {
        let page = get(&web, &path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        assert!(page.body.contains("absurd"), "{path}: {}", page.body);
    }
}

/// The ids a requests page lists, and its `Older →` link.
fn listed(page: &str) -> (Vec<i64>, Option<String>) {
    let ids = page
        .split("<td class=\"num\"><a href=\"/requests/")
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].parse().unwrap())
        .collect();
    let next = page
        .split("class=\"next\" href=\"")
        .nth(1)
        .map(|rest| rest[..rest.find('"').unwrap()].replace("&amp;", "&"));
    (ids, next)
}

/// Each count of the overview links to the rows it counts. Its "failed"
/// (to be retried: FAILED, CRASHED or TIMEOUT with tries left) linked to
/// `state=FAILED`, every FAILED row, exhausted ones too, and none CRASHED or
/// TIMEOUT; its "waiting" (never run, or given back) to the rows never run;
/// its "exhausted" to nothing.
async fn the_overviews_counts_link_to_the_rows_they_count(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ended = |result: &str, tries: i64| {
        NewRow::new("Mixed")
            .result(result)
            .tries(tries)
            .try_limit(5)
    };
    let mut retrying = Vec::new();
    for result in ["FAILED", "CRASHED", "TIMEOUT"] {
        retrying.push(db.insert_row(ended(result, 1)).await.0);
    }
    let exhausted = db.insert_row(ended("FAILED", 5)).await.0;
    let pending = db.insert_row(NewRow::new("Mixed")).await.0;
    let interrupted = db.insert_row(ended("INTERRUPTED", 1)).await.0;
    // Given back with no try left by the count (a try_limit lowered since):
    // the overview counts it waiting too.
    let interrupted_at_limit = db.insert_row(ended("INTERRUPTED", 5)).await.0;
    db.insert_row(ended("FINISHED", 1)).await;
    let web = web_router(&db, "");
    let overview = get(&web, "/").await.body;
    let sorted = |mut ids: Vec<i64>| {
        ids.sort_unstable();
        ids
    };
    for (state, expected) in [
        ("WAITING", vec![pending, interrupted, interrupted_at_limit]),
        ("RETRYING", retrying.clone()),
        ("EXHAUSTED", vec![exhausted]),
    ] {
        let link = format!("/requests?state={state}&amp;queue=default");
        assert!(overview.contains(&link), "{link}: {overview}");
        let page = get(&web, &link.replace("&amp;", "&")).await.body;
        assert_eq!(sorted(listed(&page).0), sorted(expected), "{state}");
    }
}

/// The list of requests shows each row's first line of `result_text`; it
/// read every row's whole `options` and `result_text`, on the daemon's one
/// thread when the daemon serves the page: a page of rows an application
/// gave megabytes each took as many megabytes of the daemon's memory. It
/// reads their first 1,000 characters.
async fn a_list_of_rows_with_huge_texts_reads_only_their_start(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let mut daemon = Daemon::start(&db, "d", &format!("http:\n  listen: 127.0.0.1:{port}\n"));
    daemon.wait_for_log("web page on http://", WAIT);
    // Twenty rows of 6 MiB of options and of result_text each (MariaDB's
    // MEDIUMTEXT holds 16 MiB, its packets as much).
    let huge = "x".repeat(6 << 20);
    for _ in 0..20 {
        db.insert_row(
            NewRow::new("Listed")
                .result("FAILED")
                .tries(5)
                .try_limit(5)
                .options(&huge)
                .result_text(&format!("the first line\n{huge}")),
        )
        .await;
    }
    drop(huge);
    let (peak_before, _) = crate::util::memory_kib(daemon.pid());
    let page = http_request(port, "GET", "/requests", &[], "").1;
    assert_eq!(
        page.matches("the first line").count(),
        20,
        "{}",
        &page[..page.len().min(2000)]
    );
    crate::util::peak_grew_under(daemon.pid(), peak_before, 40);
    assert!(daemon.stop().success());
}

async fn pages_of_requests_follow_the_key(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for n in 0..120 {
        let host = if n % 2 == 0 { "even" } else { "odd" };
        ids.push(db.insert_row(NewRow::new("NoOp").host(host)).await.0);
    }
    ids.reverse();
    let web = web_router(&db, "");
    // Indexed (none): 50, 50, 20, newest first, each id once.
    let mut seen = Vec::new();
    let mut next = Some("/requests?state=PENDING".to_string());
    while let Some(link) = next {
        let (page, older) = listed(&get(&web, &link).await.body);
        seen.extend(page);
        next = older;
    }
    assert_eq!(seen, ids);
    // A filter no index serves (host): the same, for the even rows.
    let mut seen = Vec::new();
    let mut next = Some("/requests?host=even".to_string());
    while let Some(link) = next {
        let (page, older) = listed(&get(&web, &link).await.body);
        seen.extend(page);
        next = older;
    }
    let even: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| ids.iter().position(|x| x == id).unwrap() % 2 == 1)
        .collect();
    assert_eq!(seen, even);
}

both_backends!(
    old_exhausted_rows_hide_no_running_row_on_the_overview,
    a_retry_from_a_request_page_applies_only_to_the_row_it_showed,
    pages_of_requests_follow_the_key,
    the_overviews_counts_link_to_the_rows_they_count,
    a_list_of_rows_with_huge_texts_reads_only_their_start,
    bulk_actions_treat_each_row_as_its_own_retry_or_cancel_does,
    a_bulk_action_changes_only_the_rows_its_preview_counted,
    a_batch_or_flow_filter_that_is_no_number_is_refused,
    without_auth_the_page_answers_only_to_a_loopback_host_name,
    batches_show_their_progress_and_members,
    every_page_renders_with_a_strict_policy,
    a_hostile_row_shows_as_text,
    actions_need_the_csrf_token_and_this_origin,
    read_only_refuses_actions_and_hides_them,
    the_overview_pauses_and_resumes_queues_and_types,
    auth_asks_for_the_token,
    auth_asks_for_the_user_and_password,
    purge_deletes_only_final_rows_older_than_asked,
    daemons_show_idle_silent_stopped_and_unregistered_ones,
    an_action_is_logged_with_the_remote_address_and_the_user,
    a_reload_applies_the_pages_new_password_and_read_only,
    a_cancel_from_the_page_stops_a_running_task_at_once,
    a_bulk_action_longer_than_its_connection_is_carried_out_and_logged,
    a_flow_board_shows_each_step_its_revert_and_what_it_provided,
    a_task_process_cannot_act_through_the_page,
);

#[test]
fn the_web_page_refuses_a_public_address_without_auth() {
    let output = std::process::Command::new(CLI)
        .args([
            "--database-url",
            "sqlite:///nonexistent/x.db",
            "web",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("without http.auth"), "{stderr}");
    assert!(taskrunner::web::check_listen("127.0.0.1:1".parse().unwrap(), false).is_ok());
    assert!(taskrunner::web::check_listen("[::1]:1".parse().unwrap(), false).is_ok());
    assert!(taskrunner::web::check_listen("10.0.0.1:1".parse().unwrap(), true).is_ok());
}

/// A page whose settings are wrong (a token file that cannot be read, a
/// public address without auth) stops the daemon's start at once, exit
/// status 2, as `config check` says, while the database is out. It was read
/// only once the database answered and the schema was checked: a daemon
/// started during an outage retried the database for as long as it lasted,
/// then exited 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_settings_are_wrong_stops_the_start_while_the_database_is_out() {
    let db = TestDb::new(Backend::Sqlite).await;
    let nowhere = format!(
        "postgres://taskrunner@127.0.0.1:{}/nowhere",
        crate::util::free_port()
    );
    let missing = db.scratch.join("no-such-token");
    for http in [
        format!(
            "  listen: 127.0.0.1:{}\n  auth:\n    token_file: {}\n",
            crate::util::free_port(),
            missing.display()
        ),
        format!("  listen: 0.0.0.0:{}\n", crate::util::free_port()),
    ] {
        let (code, log) = db
            .daemon("d")
            .yaml(&format!("database_url: {nowhere}\nhttp:\n{http}"))
            .refused();
        assert_eq!(code, Some(2), "{log}");
        assert!(
            log.contains("http.auth.token_file") || log.contains("without http.auth"),
            "{log}"
        );
    }
}

/// A task process reaches the page on loopback as any local process does:
/// one read the page's CSRF token from its form and purged every ended row
/// (or could cancel or pause every one), where the daemon keeps its
/// database out of its tasks' reach and refuses their `stop` on its socket.
/// An action from a task process of the daemon is refused now; the same
/// action from another process is carried out.
async fn a_task_process_cannot_act_through_the_page(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let ended = |backend| {
        NewRow::new("NoOp")
            .result("FINISHED")
            .tries(1)
            .sql("completed_at", crate::util::sql_ago(backend, 3600))
    };
    db.insert_row(ended(backend)).await;
    let script = db.scratch.join("purge.py");
    std::fs::write(
        &script,
        r#"import re, sys, urllib.error, urllib.request
page = "http://127.0.0.1:" + sys.argv[1]
form = urllib.request.urlopen(page + "/").read().decode()
token = re.search(r'name="csrf" value="([0-9a-f]+)"', form).group(1)
purge = urllib.request.Request(page + "/purge", data=("csrf=" + token + "&older_than=0s").encode())
try:
    print(urllib.request.urlopen(purge).status)
except urllib.error.HTTPError as error:
    print(error.code)
"#,
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "http:\n  listen: 127.0.0.1:{port}\ntasks:\n  Purger:\n    command: [python3, {}, '{port}']\n",
            script.display()
        ),
    );
    daemon.wait_for_log("web page on http://", WAIT);
    let id = db.enqueue("Purger", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.as_deref().map(str::trim),
        Some("403"),
        "{row:#?}"
    );
    let count_ended = "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'";
    assert_eq!(db.scalar(count_ended).await, 2, "{}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("web: refused an action from a task process of this daemon"),
        "{}",
        daemon.log_text()
    );
    // The test itself is no task of the daemon's.
    let page = http_request(port, "GET", "/", &[], "").1;
    let token = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let (status, body) = http_request(
        port,
        "POST",
        "/purge",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("csrf={token}&older_than=0s"),
    );
    assert!(status < 400, "{status}: {body}");
    assert_eq!(db.scalar(count_ended).await, 0);
    assert!(daemon.stop().success());
}

/// One HTTP request on loopback with `headers`; the status code and body.
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    // The daemon binds its listener a moment after it logs its start.
    let mut stream = poll_blocking(WAIT, &format!("a listener on port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
    });
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A form posted as the page's own (this origin) with `auth`; the status
/// code and body.
fn http_form(port: u16, path: &str, auth: (&str, &str), form: &str) -> (u16, String) {
    let origin = format!("http://127.0.0.1:{port}");
    http_request(
        port,
        "POST",
        path,
        &[
            auth,
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form,
    )
}

async fn an_action_is_logged_with_the_remote_address_and_the_user(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let port = crate::util::free_port();
    let hash = bcrypt::hash("correct horse", 4).unwrap();
    let daemon = Daemon::start(
        &db,
        "logged",
        &format!("http:\n  listen: 127.0.0.1:{port}\n  auth:\n    user: ops\n    password_hash: '{hash}'\n"),
    );
    // ops:correct horse
    let auth = ("Authorization", "Basic b3BzOmNvcnJlY3QgaG9yc2U=");
    let (status, page) = http_request(port, "GET", &format!("/requests/{id}"), &[auth], "");
    assert_eq!(status, 200, "{page}");
    let (status, reply) = http_form(
        port,
        &format!("/requests/{id}/retry"),
        auth,
        &format!("csrf={}", csrf_of(&page)),
    );
    assert!(status == 200 || status == 303, "{status} {reply}");
    let line = poll(WAIT, "a web action in the log", async || {
        let log = daemon.log_text();
        match log.lines().find(|l| l.contains("web action")) {
            Some(line) => Ok(line.to_string()),
            None => Err(Text(log)),
        }
    })
    .await;
    assert!(
        line.contains("user=ops") && line.contains("remote=127.0.0.1:"),
        "{line}"
    );
    assert!(
        line.contains(&format!("request={id}")) && line.contains("retry"),
        "{line}"
    );
}

/// A reload took the new `http:` settings into the config but not into the
/// page, which kept those of its start: a rotated password still logged
/// in, the new one did not, and `read_only: true` refused nothing, while
/// the log said "config reloaded". The page now takes them at its next
/// request; a reload that would leave a page on another address than
/// loopback without `auth` is refused, and a changed `listen` is named as
/// waiting for a restart.
async fn a_reload_applies_the_pages_new_password_and_read_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let (port, other) = (crate::util::free_port(), crate::util::free_port());
    let http = |port: u16, hash: &str, read_only: bool| {
        format!("http:\n  listen: 0.0.0.0:{port}\n  read_only: {read_only}\n  auth:\n    user: ops\n    password_hash: '{hash}'\n")
    };
    let first = bcrypt::hash("first password", 4).unwrap();
    let mut daemon = Daemon::start(&db, "reloaded", &http(port, &first, false));
    let first_auth = ("Authorization", "Basic b3BzOmZpcnN0IHBhc3N3b3Jk");
    let second_auth = ("Authorization", "Basic b3BzOnNlY29uZCBwYXNzd29yZA==");
    let (status, page) = http_request(port, "GET", "/", &[first_auth], "");
    assert_eq!(status, 200, "{page}");
    let csrf = csrf_of(&page);
    assert_eq!(http_request(port, "GET", "/", &[second_auth], "").0, 401);

    // A new password, read-only, and another address, on loopback (for a
    // restart).
    let base = crate::util::base_config(&db, &daemon.dir);
    let second = bcrypt::hash("second password", 4).unwrap();
    std::fs::write(
        &daemon.config,
        crate::util::merge_yaml(
            &base,
            &http(other, &second, true).replace("0.0.0.0", "127.0.0.1"),
        ),
    )
    .unwrap();
    daemon.reload();
    daemon.wait_for_log("config reloaded", WAIT);
    daemon.wait_for_log(
        "config reload: http.listen changed in the file; the daemon keeps its own until a restart",
        WAIT,
    );
    assert_eq!(http_request(port, "GET", "/", &[first_auth], "").0, 401);
    let (status, page) = http_request(port, "GET", &format!("/requests/{id}"), &[second_auth], "");
    assert_eq!(status, 200, "{page}");
    let (status, reply) = http_form(
        port,
        &format!("/requests/{id}/retry"),
        second_auth,
        &format!("csrf={csrf}"),
    );
    assert_eq!(status, 403, "{reply}");
    assert!(reply.contains("read-only"), "{reply}");
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));

    // No auth on a loopback address in the file, while the page listens
    // on every address: refused, and the password still asked (before,
    // the reload above had put the file's loopback address in the config,
    // and this one was taken).
    std::fs::write(
        &daemon.config,
        crate::util::merge_yaml(&base, &format!("http:\n  listen: 127.0.0.1:{port}\n")),
    )
    .unwrap();
    daemon.reload();
    daemon.wait_for_log("config reload refused", WAIT);
    let log = daemon.log_text();
    let refusal = log
        .lines()
        .find(|line| line.contains("config reload refused"))
        .unwrap();
    assert!(refusal.contains("without http.auth"), "{refusal}");
    assert_eq!(http_request(port, "GET", "/", &[], "").0, 401);
    assert_eq!(http_request(port, "GET", "/", &[second_auth], "").0, 200);
    assert!(daemon.stop().success());
}

/// Cancel pressed on a running row's page, served by its own daemon:
/// the daemon stops the task at once, as `taskrunner-cli cancel` through
/// the control socket does. Before, the page woke only the scheduler, and
/// the cancel waited for the next heartbeat (60 s here).
async fn a_cancel_from_the_page_stops_a_running_task_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "{}http:\n  listen: 127.0.0.1:{port}\ntasks:\n  Long:\n    command: [/bin/sleep, '60']\n",
            crate::cancel::SLOW_HEARTBEAT
        ),
    );
    let id = db.enqueue("Long", None).await;
    db.wait_for_pid(id, WAIT).await;
    let (status, page) = http_request(port, "GET", &format!("/requests/{id}"), &[], "");
    assert_eq!(status, 200, "{page}");
    let asked = std::time::Instant::now();
    let (status, reply) = http_form(
        port,
        &format!("/requests/{id}/cancel"),
        ("X-Nothing", "x"),
        &format!("csrf={}", csrf_of(&page)),
    );
    assert_eq!(status, 303, "{reply}");
    crate::cancel::cancelled_at_once(&db, id, asked).await;
    assert!(daemon.stop().success());
}

/// A bulk action ran in the request's handler: one that took longer than
/// the connection lasted (the page's idle bound, 30 s, here 1 s; a tab
/// closed) was cut off part-way, and its log line never came. It now runs
/// in a task of its own, to its end, and logs when it begins and ends.
/// A row that moves on while the action works through the others (its
/// daemon retried it, and it FINISHED) is not retried: before, it was
/// reset and ran again.
async fn a_bulk_action_longer_than_its_connection_is_carried_out_and_logged(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(insert_failed(&db, &format!("n: {n}")).await);
    }
    let port = crate::util::free_port();
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "queues: {{ elsewhere: 1 }}\nhttp:\n  listen: 127.0.0.1:{port}\n"
        ))
        .env("TASKRUNNER_TEST_WEB_IDLE_TIMEOUT_MS", "1000")
        .env("TASKRUNNER_TEST_BULK_ROW_DELAY_MS", "500")
        .start();
    daemon.wait_for_log("web page on http://", WAIT);
    let (status, page) = http_request(port, "GET", "/bulk?action=retry&state=FAILED", &[], "");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("5 requests match"), "{page}");
    let form = format!(
        "csrf={}&action=retry&state=FAILED&{}",
        csrf_of(&page),
        confirmation_of(&page)
    );
    // Sent, and read for as long as the connection lasts.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /bulk HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    // Newest first, a row each 500 ms: the oldest comes last, 2.5 s in.
    db.wait_for(ids[4], WAIT, "retried first", |row| row.result.is_none())
        .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FINISHED', tries = 2 WHERE id = {}",
        ids[0]
    ))
    .await;
    let line = poll(WAIT, "the bulk action's line in the log", async || {
        let log = daemon.log_text();
        match log
            .lines()
            .find(|line| line.contains("web bulk action") && line.contains("changed="))
        {
            Some(line) => Ok(line.to_string()),
            None => Err(Text(log)),
        }
    })
    .await;
    assert!(
        line.contains("changed=4") && line.contains("refused=1"),
        "{line}"
    );
    assert!(daemon.log_text().contains("web bulk action begins"));
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result IS NULL")
            .await,
        4
    );
    assert_eq!(db.row(ids[0]).await.result.as_deref(), Some("FINISHED"));
    assert!(daemon.stop().success());
}

async fn daemons_show_idle_silent_stopped_and_unregistered_ones(backend: Backend) {
    let db = TestDb::new(backend).await;
    let web = web_router(&db, "");
    let mut daemon = Daemon::start(
        &db,
        "idle",
        "host_id: idle-host\nnode_name: gpu-1\nheartbeat_interval: 1s\n",
    );
    // It runs nothing, and is shown all the same.
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_daemons WHERE host = 'idle-host' AND stopped_at IS NULL",
        1,
        WAIT,
    )
    .await;
    // A daemon not heard from for longer than the lease, and an instance
    // seen only through a row it runs.
    // By hand: the row a daemon of the past left in the daemons' own table.
    db.execute("INSERT INTO task_runner_daemons (instance, host, started_at, heartbeat_at) VALUES ('old:1', 'quiet-host', '2000-01-01 00:00:00', '2000-01-01 00:00:00')")
        .await;
    db.execute(&format!(
        "UPDATE task_runner_daemons SET heartbeat_at = {} WHERE instance = 'old:1'",
        sql_ago(db.backend, 3600)
    ))
    .await;
    // Its lease renewed just now: the idle daemon's reaper (its start-up
    // pass may come after this insert) leaves it alone; with no heartbeat at
    // all it was reaped, and run, before the page was read (failed once).
    db.insert_row(NewRow::new("NoOp").running(
        db.backend,
        "legacy-host",
        "legacy:7",
        "t-legacy",
        424242,
        0,
    ))
    .await;
    let page = get(&web, "/daemons").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let line_of = |body: &str, host: &str| -> String {
        body.split("<tr>")
            .find(|row| row.contains(&format!(">{host}</a>")))
            .unwrap_or_else(|| panic!("no row for {host}: {body}"))
            .to_string()
    };
    let idle = line_of(&page.body, "idle-host");
    assert!(idle.contains(">up<") && idle.contains("gpu-1"), "{idle}");
    assert!(
        line_of(&page.body, "quiet-host").contains(">silent<"),
        "{}",
        page.body
    );
    let legacy = line_of(&page.body, "legacy-host");
    assert!(
        legacy.contains(">unregistered<") && legacy.contains("legacy:7"),
        "{legacy}"
    );
    // The overview shows them too.
    assert!(get(&web, "/").await.body.contains("idle-host"));
    // Stopped cleanly: it says so.
    assert!(daemon.stop().success());
    let page = get(&web, "/daemons").await.body;
    assert!(line_of(&page, "idle-host").contains(">stopped<"), "{page}");
}

async fn a_flow_board_shows_each_step_its_revert_and_what_it_provided(backend: Backend) {
    use crate::flows::{insert_flow, sh_task, wait_for_flow};
    let db = TestDb::new(backend).await;
    let config = format!(
        "retry_delay: 0s\ntasks:\n{}{}{}flows:\n  deploy:\n    steps:\n      - {{ name: fetch, task: Fetch, revert: Unfetch, provides: artifact }}\n      - {{ name: install, task: Install, try_limit: 1 }}\n",
        sh_task("Fetch", "echo artifact-7"),
        sh_task("Unfetch", "true"),
        sh_task("Install", "echo disk full >&2; exit 1"),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = insert_flow(&db, "deploy", None).await;
    wait_for_flow(&db, id, "REVERTED", WAIT).await;
    assert!(daemon.stop().success());
    let web = web_router(&db, "");
    let list = get(&web, "/flows").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert!(
        list.body
            .contains(&format!("<a href=\"/flows/{id}\">{id}</a>")),
        "{}",
        list.body
    );
    assert!(list.body.contains("REVERTED"), "{}", list.body);
    let board = get(&web, &format!("/flows/{id}")).await;
    assert_eq!(board.status, StatusCode::OK, "{}", board.body);
    let rows: Vec<&str> = board.body.split("<tr").collect();
    let row_of = |needle: &str| -> &str {
        rows.iter()
            .find(|row| row.contains(needle))
            .unwrap_or_else(|| panic!("no board row with {needle}: {}", board.body))
    };
    let fetch = row_of("<td>Fetch</td>");
    assert!(
        fetch.contains("FINISHED") && fetch.contains("artifact: artifact-7"),
        "{fetch}"
    );
    assert!(row_of("<td>Unfetch</td>").contains("FINISHED"));
    assert!(row_of("<td>Install</td>").contains("FAILED (exhausted)"));
    // Its rows, from the board's link and from the CLI.
    let requests = get(&web, &format!("/requests?flow={id}")).await.body;
    assert_eq!(
        requests.matches("<a href=\"/requests/").count(),
        3,
        "{requests}"
    );
    let (status, listed, stderr) = cli(&db, &["list", "--flow", &id.to_string(), "--json"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(listed.lines().count(), 3, "{listed}");
    let (_, table, _) = cli(&db, &["list", "--flow", &id.to_string()]);
    assert!(
        table.contains(&format!("[flow {id} step 1 revert]")),
        "{table}"
    );
    // A step's own page links back to its flow.
    let step_id = serde_json::from_str::<serde_json::Value>(listed.lines().last().unwrap())
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let page = get(&web, &format!("/requests/{step_id}")).await.body;
    assert!(
        page.contains(&format!("<a href=\"/flows/{id}\">{id}</a>")),
        "{page}"
    );
    assert_eq!(
        get(&web, "/flows/999999").await.status,
        StatusCode::NOT_FOUND
    );
    // Positions and a retry count an application wrote at their limits
    // (a step of i64's on SQLite, 32 bits elsewhere; `retry.times` of
    // u32's): each shown one further overflowed (a panic in a debug build).
    let limit = match backend {
        Backend::Sqlite => i64::MAX,
        Backend::Postgres | Backend::MySql => i64::from(i32::MAX),
    };
    db.execute(&format!(
        "UPDATE task_runner_flows SET current_step = {limit}, definition = {} WHERE id = {id}",
        crate::util::quote("steps:\n- {name: fetch, task: Fetch}\nretry: {times: 4294967295}\n")
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET flow_step = {limit} WHERE id = {step_id}"
    ))
    .await;
    let board = get(&web, &format!("/flows/{id}")).await;
    assert_eq!(board.status, StatusCode::OK, "{}", board.body);
    assert!(board.body.contains("of 4294967296"), "{}", board.body);
    for args in [
        vec!["flow", "list"],
        vec!["flow", "show", &id.to_string()],
        vec!["list", "--flow", &id.to_string()],
    ] {
        let (status, stdout, stderr) = cli(&db, &args);
        assert_eq!(status, 0, "{args:?}: {stdout}{stderr}");
    }
}

// ---- /metrics ----

/// A plain HTTP GET (no client library in the tests).
fn http_get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// `promtool check metrics` accepts `text`.
fn assert_promtool_accepts(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool refused the metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn metrics_count_finished_and_exhausted_tries(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let mut daemon = Daemon::start(
        &db,
        "metrics",
        &format!("max_concurrent: 4\nhttp:\n  listen: 127.0.0.1:{port}\ntasks:\n  Fail:\n    command: [/bin/false]\n"),
    );
    for _ in 0..10 {
        db.enqueue("NoOp", None).await;
    }
    for _ in 0..3 {
        db.insert_row(NewRow::new("Fail").try_limit(1)).await;
    }
    // A try whose process never starts: counted, but no duration.
    db.insert_row(NewRow::new("Unknown").try_limit(1)).await;
    let (status, _, _) = cli(
        &db,
        &[
            "--socket",
            daemon.dir.join("run/daemon.sock").to_str().unwrap(),
            "status",
        ],
    );
    assert_eq!(status, 0);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IN ('FINISHED', 'FAILED')",
        14,
        WAIT,
    )
    .await;
    // The counters move when the scheduler sees the try end: wait for them.
    let text = poll(WAIT, "the tries' counters", async || {
        let text = http_get(port, "/metrics");
        if sample(
            &text,
            "taskrunner_tries_total",
            &["outcome=\"FAILED\"", "type=\"Fail\""],
        ) == Some(3.0)
            && sample(
                &text,
                "taskrunner_tries_total",
                &["outcome=\"FAILED\"", "type=\"Unknown\""],
            ) == Some(1.0)
            && sample(&text, "taskrunner_tries_total", &["outcome=\"FINISHED\""]) == Some(10.0)
        {
            Ok(text)
        } else {
            Err(Text(text))
        }
    })
    .await;
    assert_promtool_accepts(&text);
    assert_eq!(
        sample(
            &text,
            "taskrunner_tries_total",
            &["outcome=\"FINISHED\"", "type=\"NoOp\"", "queue=\"default\""]
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "taskrunner_tries_total",
            &["outcome=\"FAILED\"", "type=\"Fail\""]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "taskrunner_exhausted_total", &["type=\"Fail\""]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "taskrunner_claimed_total", &[]),
        Some(14.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "taskrunner_try_duration_seconds_count",
            &["type=\"NoOp\""]
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "taskrunner_spawn_seconds_count", &[]),
        Some(13.0),
        "{text}"
    );
    assert_eq!(sample(&text, "taskrunner_slots", &[]), Some(4.0), "{text}");
    // How long a process ran: none ran for the unknown type (it counted
    // one of 0 s before).
    assert_eq!(
        sample(
            &text,
            "taskrunner_try_duration_seconds_count",
            &["type=\"Fail\""]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "taskrunner_try_duration_seconds_count",
            &["type=\"Unknown\""]
        ),
        None,
        "{text}"
    );
    assert_eq!(
        sample(&text, "taskrunner_queue_exhausted", &["queue=\"default\""]),
        Some(4.0),
        "{text}"
    );
    assert!(
        !text.contains("request_id") && !text.contains("id=\""),
        "{text}"
    );
    // The CLI prints the daemon's metrics too (through its socket).
    let config = daemon.config.to_str().unwrap().to_string();
    let (status, printed, stderr) = cli(&db, &["--config", &config, "metrics"]);
    assert_eq!(status, 0, "{stderr}");
    assert_promtool_accepts(&printed);
    assert_eq!(
        sample(&printed, "taskrunner_exhausted_total", &["type=\"Fail\""]),
        Some(3.0),
        "{printed}"
    );
    // And the page is served on the same listener.
    assert!(http_get(port, "/requests?state=FAILED").contains("Fail"));
    daemon.stop();
}

/// A queue whose rows a daemon's metrics showed, drained since: its gauges
/// read 0. They vanished (the gauges came from the queues with open rows
/// alone): a dashboard showed no data, and an alert written as `== 0` or
/// with `absent()` misfired.
async fn a_drained_queues_gauges_read_zero(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Gated:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']\n",
            gate.display()
        ),
    );
    let config = daemon.config.display().to_string();
    let metrics = || cli(&db, &["--config", &config, "metrics"]).1;
    let mail = ["queue=\"mail\""];
    let id = db.insert_row(NewRow::new("Gated").queue("mail")).await;
    db.wait_for_pid(id, WAIT).await;
    crate::util::wait_until(WAIT, "the queue's running gauge at 1", || {
        sample(&metrics(), "taskrunner_queue_running", &mail) == Some(1.0)
    });
    std::fs::write(&gate, "").unwrap();
    db.wait_for_state(id, "FINISHED", WAIT).await;
    crate::util::wait_until(WAIT, "the drained queue's gauges at 0", || {
        let text = metrics();
        sample(&text, "taskrunner_queue_running", &mail) == Some(0.0)
            && sample(&text, "taskrunner_queue_waiting", &mail) == Some(0.0)
            && sample(&text, "taskrunner_queue_lag_seconds", &mail) == Some(0.0)
    });
    assert_promtool_accepts(&metrics());
    assert!(daemon.stop().success());
}

/// The gauges read the first 100 queues with open rows. A queue shown
/// before, and pushed past that bound by new queues whose names sort
/// before it, is not taken for drained: it read 0 while its rows waited
/// (the misfire the zeros were to end).
async fn a_queue_past_the_gauges_bound_is_not_taken_for_drained(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let config = daemon.config.display().to_string();
    let metrics = || cli(&db, &["--config", &config, "metrics"]).1;
    let zeta = ["queue=\"zeta\""];
    // Not runnable for an hour: the rows wait, and count.
    db.insert_row(NewRow::new("Later").queue("zeta").delayed(backend, 3600))
        .await;
    crate::util::wait_until(WAIT, "the queue's gauge", || {
        sample(&metrics(), "taskrunner_queue_waiting", &zeta) == Some(1.0)
    });
    for n in 0..100 {
        db.insert_row(
            NewRow::new("Later")
                .queue(&format!("a{n:03}"))
                .delayed(backend, 3600),
        )
        .await;
    }
    crate::util::wait_until(WAIT, "the new queues' gauges", || {
        sample(&metrics(), "taskrunner_queue_waiting", &["queue=\"a099\""]) == Some(1.0)
    });
    let text = metrics();
    assert_ne!(
        sample(&text, "taskrunner_queue_waiting", &zeta),
        Some(0.0),
        "{text}"
    );
    assert!(daemon.stop().success());
}

async fn lag_of_a_backlog_enqueued_a_minute_ago(backend: Backend) {
    let db = TestDb::new(backend).await;
    // First, a row that failed an hour ago and whose retry came due 2 s
    // ago: the lowest id, but not the row that waited longest. The lag was
    // that row's (2 s) while the backlog behind it waited a minute, and a
    // lag alert stayed quiet while tries failed; it is the longest wait
    // now, among the first 1,000 rows by id.
    db.insert_row(
        NewRow::new("Backlog")
            .queue("mail")
            .text("result", "FAILED")
            .number("tries", 1)
            .created_ago(backend, 3600)
            .delayed(backend, -2),
    )
    .await;
    for _ in 0..100 {
        db.insert_row(
            NewRow::new("Backlog")
                .queue("mail")
                .created_ago(backend, 60),
        )
        .await;
    }
    let (status, text, stderr) = cli(&db, &["metrics"]);
    assert_eq!(status, 0, "{stderr}");
    assert_promtool_accepts(&text);
    assert_eq!(
        sample(&text, "taskrunner_queue_waiting", &["queue=\"mail\""]),
        Some(100.0),
        "{text}"
    );
    let lag = sample(&text, "taskrunner_queue_lag_seconds", &["queue=\"mail\""]).expect("a lag");
    assert!((60.0..120.0).contains(&lag), "lag {lag}: {text}");
}

/// Connections to the web page's port that send nothing (a client gone
/// quiet, a keep-alive pool, a slowloris) were each held for ever, one of
/// the daemon's descriptors apiece: 200 of them under a limit of 128 took
/// every descriptor a task start needs, and rows were given back for as
/// long as they stayed. Now the page answers at most an eighth of the limit
/// at once (at most 64); the rest wait in the listen backlog (1,024 long,
/// not 128), and a connection silent for 30 s is closed (here 5 s: a
/// debug-build hook shortens the bound, well past the 12 tries' run).
async fn idle_web_connections_cannot_take_the_daemons_descriptors(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "max_concurrent: 4\nhttp:\n  listen: 127.0.0.1:{port}\n\
             tasks:\n  Nap:\n    command: [sleep, '0.1']\n"
        ))
        .open_files((128, 128))
        .env("TASKRUNNER_TEST_WEB_IDLE_TIMEOUT_MS", "5000")
        .start();
    // Bound after the "started" line.
    daemon.wait_for_log("web page on http://", WAIT);
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect_timeout(&address, WAIT).unwrap())
        .collect();
    for _ in 0..12 {
        db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    }
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND tries = 1",
        12,
        WAIT,
    )
    .await;
    let log = daemon.log_text();
    assert!(!log.contains("short of resources"), "{log}");
    // The first connection was answered and says nothing: it is closed.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(first.read(&mut byte).unwrap(), 0, "closed by the server");
    drop(idle);
    // Those that waited in the backlog go once their clients close them.
    let page = poll_blocking(WAIT, "the page to be served again", || {
        let text = http_get(port, "/metrics");
        if text.contains("taskrunner_tries_total") {
            Ok(text)
        } else {
            Err(Text(text))
        }
    });
    assert!(page.contains("outcome=\"FINISHED\""), "{page}");
    assert!(daemon.stop().success());
}

/// Clients that send a request a byte at a time (a slowloris: one header
/// byte every second, or a form's body a byte a second) held the page's
/// places for ever: each byte restarted the idle bound, and 64 of them
/// held every place, so the page and `/metrics` stopped answering. A
/// request's head, and an action's body, must now arrive whole within a
/// bound (30 s; 3 s here): the places are freed, and a scrape is served.
async fn clients_sending_a_byte_at_a_time_cannot_hold_the_page(backend: Backend) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let port = crate::util::free_port();
    let mut daemon = db
        .daemon("d")
        .yaml(&format!("http:\n  listen: 127.0.0.1:{port}\n"))
        .env("TASKRUNNER_TEST_WEB_IDLE_TIMEOUT_MS", "5000")
        .env("TASKRUNNER_TEST_WEB_REQUEST_WITHIN_MS", "3000")
        .start();
    daemon.wait_for_log("web page on http://", WAIT);
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let mut slow: Vec<std::net::TcpStream> = Vec::new();
    for n in 0..64 {
        let mut stream = std::net::TcpStream::connect_timeout(&address, WAIT).unwrap();
        let start = if n < 62 {
            format!("GET / HTTP/1.1\r\n{host}")
        } else {
            format!(
                "POST /requests/{id}/cancel HTTP/1.1\r\n{host}Origin: http://127.0.0.1:{port}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n\r\n"
            )
        };
        stream.write_all(start.as_bytes()).unwrap();
        slow.push(stream);
    }
    // The two slow bodies' answers, read while the trickle goes on.
    let posts: Vec<std::net::TcpStream> = slow[62..]
        .iter()
        .map(|stream| stream.try_clone().unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let trickle = {
        let (stop, closed) = (stop.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut open: Vec<Option<std::net::TcpStream>> = slow.into_iter().map(Some).collect();
            while !stop.load(Ordering::Relaxed) {
                for stream in &mut open {
                    if let Some(writer) = stream {
                        if writer.write_all(b"X").is_err() {
                            *stream = None;
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        })
    };
    // Asked while the 64 trickle: served once their bound frees the places.
    let mut scrape = std::net::TcpStream::connect_timeout(&address, WAIT).unwrap();
    scrape
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        scrape,
        "GET /metrics HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    let read = scrape.read_to_string(&mut reply);
    let trickled = closed.load(Ordering::Relaxed);
    // A body that does not arrive within the bound is refused: 408.
    let answers: Vec<String> = posts
        .into_iter()
        .map(|mut post| {
            post.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut answer = String::new();
            let _ = post.read_to_string(&mut answer);
            answer
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    for answer in &answers {
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "a slow body's answer: {answer:?}"
        );
    }
    assert!(
        read.is_ok(),
        "no answer within 20 s: {read:?} ({trickled} slow clients cut off)"
    );
    assert!(
        reply.contains("taskrunner_database_errors_total"),
        "{reply}"
    );
    // The slow body was refused, not applied.
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));
    assert!(daemon.stop().success());
}

/// Task types and queues are the rows' own text: an application that puts
/// an id into either (`Report-4711`, a queue per customer) made a new
/// label value, a new series of every per-type metric, for each row, held
/// in the daemon's memory for as long as it ran, and in every scrape. Now
/// at most 1,000 types and 100 queues get labels of their own; the rest
/// are counted under `(other)`, and one line says so.
async fn rows_naming_new_types_and_queues_do_not_grow_the_metrics_without_end(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = crate::util::free_port();
    let rows = 1200;
    db.insert_rows((0..rows).map(|i| {
        NewRow::new(&format!("Report-{i}"))
            .queue(&format!("customer-{i}"))
            .try_limit(1)
    }))
    .await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("max_concurrent: 8\nhttp:\n  listen: 127.0.0.1:{port}\n"),
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FAILED'",
        rows,
        Duration::from_secs(120),
    )
    .await;
    daemon.wait_for_log("web page on http://", WAIT);
    let text = poll(WAIT, "every try counted", async || {
        let text = http_get(port, "/metrics");
        let counted: f64 = text
            .lines()
            .filter(|line| line.starts_with("taskrunner_tries_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted == rows as f64 {
            Ok(text)
        } else {
            Err(Text(text))
        }
    })
    .await;
    let series = |name: &str| {
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .count()
    };
    assert!(series("taskrunner_tries_total") <= 1001, "{text}");
    assert!(
        series("taskrunner_wait_before_start_seconds_count") <= 101,
        "{text}"
    );
    assert!(
        sample(&text, "taskrunner_tries_total", &["type=\"(other)\""]).is_some(),
        "{text}"
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("are counted as (other) in the metrics").count(),
        2,
        "{log}"
    );
    assert!(daemon.stop().success());
}

both_backends!(
    metrics_count_finished_and_exhausted_tries,
    lag_of_a_backlog_enqueued_a_minute_ago,
    a_drained_queues_gauges_read_zero,
    a_queue_past_the_gauges_bound_is_not_taken_for_drained,
    idle_web_connections_cannot_take_the_daemons_descriptors,
    clients_sending_a_byte_at_a_time_cannot_hold_the_page,
    rows_naming_new_types_and_queues_do_not_grow_the_metrics_without_end,
);

// ---- a real browser ----

/// Headless Chromium (through chromedriver) against a running daemon and
/// `taskrunner-cli web`: filter, open, retry (RUNNING then FINISHED),
/// cancel, with JavaScript on and off, and no CSP violation in the console.
/// The clicks are in tests/browser/web_page.py; scripts/test installs
/// Debian's chromium and chromium-driver when they are missing.
async fn a_real_browser_retries_and_cancels(backend: Backend) {
    let db = TestDb::new(backend).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser/web_page.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .args([
            "--daemon",
            crate::util::DAEMON,
            "--cli",
            CLI,
            "--database-url",
            &db.url,
        ])
        .arg("--dir")
        .arg(db.scratch.join("browser"))
        .env_remove("DATABASE_URL")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.matches("ok: ").count(), 2, "{stdout}");
}

both_backends!(a_real_browser_retries_and_cancels);

/// A bulk retry was one statement over every row the filter selected: a
/// flow's rows ran again outside their flow (where `retry` refuses them),
/// and two rows sharing a unique key failed the whole action (500, nothing
/// retried). Each row is now retried as `retry` of that row alone does it,
/// and the page says how many were refused.
async fn bulk_actions_treat_each_row_as_its_own_retry_or_cancel_does(backend: Backend) {
    let db = TestDb::new(backend).await;
    let flow = db
        .insert("INSERT INTO task_runner_flows (flow_name, state) VALUES ('two', 'FINISHED') RETURNING id")
        .await
        .0;
    let step = db
        .insert_row(
            NewRow::new("E1")
                .number("flow_id", flow)
                .number("flow_step", 0)
                .text("flow_action", "execute")
                .ended(backend, "FINISHED", 1, 60),
        )
        .await;
    for _ in 0..2 {
        db.insert_row(
            NewRow::new("Keyed")
                .unique_key("k")
                .ended(backend, "FAILED", 5, 60),
        )
        .await;
    }
    let web = web_router(&db, "");
    let token = csrf_of(&get(&web, "/").await.body);
    let preview = get(&web, "/bulk?action=retry").await.body;
    assert!(preview.contains("2 requests match"), "{preview}");
    let reply = post(
        &web,
        "/bulk",
        &format!("csrf={token}&action=retry&{}", confirmation_of(&preview)),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply.body.contains("applied to 1 requests; 1 refused"),
        "{}",
        reply.body
    );
    assert_eq!(db.row(step).await.result.as_deref(), Some("FINISHED"));
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM task_runner_requests WHERE unique_key = 'k' AND result IS NULL"
        )
        .await,
        1
    );
}

/// 10,000 exhausted rows of a queue (kept for weeks by default) and three
/// running ones of another type: the overview counted the open rows up to
/// one cap of 10,000, in index order, the exhausted ones first. It read
/// running 0 and waiting 0, and the running type was missing. Each kind is
/// now counted up to a cap of its own.
async fn old_exhausted_rows_hide_no_running_row_on_the_overview(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ten = "(SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 \
               UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 \
               UNION ALL SELECT 8 UNION ALL SELECT 9)";
    db.execute(&format!(
        "INSERT INTO task_runner_requests (task_class_name, queue, result, tries, try_limit) \
         SELECT 'AOld', 'q', 'FAILED', 1, 1 FROM {ten} a, {ten} b, {ten} c, {ten} d"
    ))
    .await;
    for pid in 1..=3 {
        db.insert_row(
            NewRow::new("Busy")
                .queue("q")
                .running_unclaimed(backend, "h", pid, 1),
        )
        .await;
    }
    db.insert_row(NewRow::new("Waits").queue("q")).await;
    let page = get(&web_router(&db, ""), "/").await.body;
    let queue = &page[page.find(r#"<tr class="queue">"#).unwrap()..];
    let queue = &queue[..queue.find("</tr>").unwrap()];
    let cells: Vec<String> = queue
        .split(r#"<td class="num">"#)
        .skip(1)
        .map(|cell| {
            // The cell's text, its tags (a link) left out.
            let cell = &cell[..cell.find("</td>").unwrap()];
            cell.split('<')
                .map(|part| part.split_once('>').map_or(part, |(_, text)| text))
                .collect::<String>()
        })
        .collect();
    // waiting, running, failed, exhausted
    assert_eq!(cells[..4], ["1", "3", "0", "10000+"], "{queue}");
    assert!(
        page.contains(">Busy<") && page.contains(">Waits<"),
        "{page}"
    );
}

/// A request's page showed it FAILED; its daemon's own retry ran it
/// meanwhile, and it FINISHED. The page's Retry reset it, and it ran
/// again. The button now carries the state and tries it showed: a row that
/// moved on is refused (409, saying what it is now), and a page of the row
/// as it is now retries it.
async fn a_retry_from_a_request_page_applies_only_to_the_row_it_showed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "");
    let page = get(&web, &format!("/requests/{id}")).await.body;
    assert!(page.contains(r#"name="seen" value="FAILED:1""#), "{page}");
    let token = csrf_of(&page);
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FINISHED', tries = 2 WHERE id = {id}"
    ))
    .await;
    let path = format!("/requests/{id}/retry");
    let reply = post(&web, &path, &format!("csrf={token}&seen=FAILED:1"), None).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert!(
        reply.body.contains(
            "it changed since the page showed it (FAILED:1), and is now FINISHED after 2 tries"
        ),
        "{}",
        reply.body
    );
    assert_eq!(db.row(id).await.result.as_deref(), Some("FINISHED"));
    let reply = post(&web, &path, &format!("csrf={token}&seen=FAILED"), None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    let page = get(&web, &format!("/requests/{id}")).await.body;
    assert!(page.contains(r#"name="seen" value="FINISHED:2""#), "{page}");
    let reply = post(&web, &path, &format!("csrf={token}&seen=FINISHED:2"), None).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(db.row(id).await.result, None);
}

/// The bulk form carried only the filter: rows inserted after the preview
/// ("2 requests match", the button "retry 2 requests") were retried too,
/// and so were rows that came to match meanwhile. The form now carries the
/// ids the preview counted: the action changes those that still match, and
/// says how many no longer did.
async fn a_bulk_action_changes_only_the_rows_its_preview_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let counted = [
        insert_failed(&db, "a: 1").await,
        insert_failed(&db, "a: 2").await,
    ];
    let web = web_router(&db, "");
    let token = csrf_of(&get(&web, "/").await.body);
    let preview = get(&web, "/bulk?action=retry&state=FAILED").await.body;
    assert!(preview.contains("2 requests match"), "{preview}");
    let later = insert_failed(&db, "a: 3").await;
    let form = format!(
        "csrf={token}&action=retry&state=FAILED&{}",
        confirmation_of(&preview)
    );
    let reply = post(&web, "/bulk", &form, None).await;
    assert!(
        reply.body.contains("applied to 2 requests"),
        "{}",
        reply.body
    );
    for id in counted {
        assert_eq!(db.row(id).await.result, None, "request {id}");
    }
    assert_eq!(db.row(later).await.result.as_deref(), Some("FAILED"));

    // Counted: `later` alone. Then one of the first two fails again (it
    // comes to match, below `later`'s id), and `later` is taken by a
    // daemon (it no longer matches): neither changes.
    let preview = get(&web, "/bulk?action=retry&state=FAILED").await.body;
    assert!(preview.contains("1 requests match"), "{preview}");
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FAILED' WHERE id = {}",
        counted[0].0
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'CANCELLED' WHERE id = {}",
        later.0
    ))
    .await;
    let form = format!(
        "csrf={token}&action=retry&state=FAILED&{}",
        confirmation_of(&preview)
    );
    let reply = post(&web, "/bulk", &form, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply.body.contains(
            "applied to 0 requests; 1 no longer matched the filter (changed since the preview)"
        ),
        "{}",
        reply.body
    );
    assert_eq!(db.row(counted[0]).await.result.as_deref(), Some("FAILED"));
    assert_eq!(db.row(later).await.result.as_deref(), Some("CANCELLED"));

    // A form without the confirmation changes nothing.
    let reply = post(
        &web,
        "/bulk",
        &format!("csrf={token}&action=retry&state=FAILED"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(db.row(counted[0]).await.result.as_deref(), Some("FAILED"));
}

/// A batch or flow filter that is not a number was dropped: the page
/// listed every row while its field still showed the value, and a bulk
/// cancel from there cancelled every open row of the table. It is now one
/// clear error (400), and nothing changes.
/// An exhausted row (FAILED with no try left) is final: `cancel` refuses
/// it, so the bulk cancel's preview does not count it, nor does its page
/// offer Cancel (before, "cancel 2 requests" ended "1 applied; 1 refused").
async fn a_batch_or_flow_filter_that_is_no_number_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let waiting = db.insert_row(NewRow::new("Thumbnail")).await;
    let exhausted = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "");
    let page = get(&web, &format!("/requests/{exhausted}")).await.body;
    assert!(
        page.contains(">Retry<") && !page.contains(">Cancel<"),
        "{page}"
    );
    let token = csrf_of(&get(&web, "/").await.body);
    for path in [
        "/requests?batch=12x",
        "/requests?flow=%235",
        "/bulk?action=cancel&batch=12x",
        "/bulk?action=cancel&flow=abc",
    ] {
        let reply = get(&web, path).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.body
        );
        assert!(
            reply.body.contains("filter is an id, a number"),
            "{path}: {}",
            reply.body
        );
    }
    let preview = get(&web, "/bulk?action=cancel").await.body;
    assert!(preview.contains("1 requests match"), "{preview}");
    let reply = post(
        &web,
        "/bulk",
        &format!(
            "csrf={token}&action=cancel&batch=12x&{}",
            confirmation_of(&preview)
        ),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(db.row(waiting).await.result, None);
    // A number that names no batch lists nothing.
    let listed = get(&web, "/requests?batch=12").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(
        !listed.body.contains(&format!("/requests/{}", waiting.0)),
        "{}",
        listed.body
    );
}

/// Without `http.auth` the page listens on loopback only, and took that
/// for enough: a page of another site whose name it made resolve to
/// 127.0.0.1 (DNS rebinding) read it and acted on it as "same origin" (its
/// `Origin` and `Host` agree), CSRF token included. It now answers only to a
/// loopback name in `Host`.
async fn without_auth_the_page_answers_only_to_a_loopback_host_name(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = insert_failed(&db, "a: 1").await;
    let web = web_router(&db, "");
    let with_host = |host: &str| {
        Request::get("/")
            .header("host", host)
            .body(Body::empty())
            .unwrap()
    };
    for host in [
        "127.0.0.1:8080",
        "localhost:8080",
        "LOCALHOST",
        "[::1]:8080",
        "127.0.0.2",
    ] {
        assert_eq!(
            send(&web, with_host(host)).await.status,
            StatusCode::OK,
            "{host}"
        );
    }
    for host in [
        "evil.example:8080",
        "evil.example",
        "127.0.0.1.evil.example",
        "[::2]:80",
    ] {
        assert_eq!(
            send(&web, with_host(host)).await.status,
            StatusCode::MISDIRECTED_REQUEST,
            "{host}"
        );
    }
    let token = csrf_of(&get(&web, "/").await.body);
    let purge = Request::post("/purge")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "evil.example:8080")
        .header("origin", "http://evil.example:8080")
        .body(Body::from(format!("csrf={token}&older_than=0s")))
        .unwrap();
    assert_eq!(
        send(&web, purge).await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(db.row(id).await.result.as_deref(), Some("FAILED"));
}

/// Each password the page had not accepted before was checked with bcrypt
/// (a quarter of a second at the cost the README recommends) on the
/// daemon's one runtime thread: a dozen wrong passwords held its heartbeat,
/// claims, outcome writes and control socket for seconds. They are checked
/// off that thread now, one at a time; the daemon answers meanwhile. (On
/// SQLite alone: the check is the web page's, whatever the backend, and
/// three daemons checking at once on two CPUs would time the CPUs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_checked_off_the_daemons_thread() {
    let db = TestDb::new(Backend::Sqlite).await;
    let port = crate::util::free_port();
    let hash = bcrypt::hash("correct horse", 12).unwrap();
    let daemon = Daemon::start(
        &db,
        "d",
        &format!("http:\n  listen: 127.0.0.1:{port}\n  auth:\n    user: ops\n    password_hash: '{hash}'\n"),
    );
    // ops:wrong
    let wrong = ("Authorization", "Basic b3BzOndyb25n");
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let config = daemon.config.clone();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let (status, body) = http_request(port, "GET", "/", &[wrong], "");
                assert_eq!(status, 401, "{body}");
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // The control socket answers within two seconds, each time, while
        // the wrong passwords are still being checked (before, the first
        // answer came after all eight, several seconds later).
        let mut asked = 0;
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 8 {
            let sent = std::time::Instant::now();
            let output = std::process::Command::new(CLI)
                .arg("--config")
                .arg(&config)
                .arg("status")
                .output()
                .unwrap();
            let took = sent.elapsed();
            assert!(output.status.success(), "{output:?}");
            if answered.load(std::sync::atomic::Ordering::SeqCst) < 8 {
                assert!(
                    took < Duration::from_secs(2),
                    "status took {took:?} while wrong passwords were checked"
                );
                asked += 1;
            }
        }
        assert!(
            asked > 0,
            "the wrong passwords were checked before status was asked"
        );
    });
}

/// PostgreSQL: ended rows an application wrote with infinite times (a
/// `created_at` of `'-infinity'`, a `completed_at` of `'infinity'`): every
/// page answers, and the overview's chart of the last hour counts the one
/// and leaves the other out (a time an hour's chart cannot place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_with_infinite_times_show_on_every_page() {
    let db = TestDb::new(Backend::Postgres).await;
    let ended = |created: &str, completed: &str| {
        NewRow::new("NoOp")
            .result("FINISHED")
            .tries(1)
            .sql("created_at", created)
            .sql("started_at", "now()")
            .sql("completed_at", completed)
    };
    let long_ago = db.insert_row(ended("'-infinity'", "now()")).await;
    let never = db.insert_row(ended("now()", "'infinity'")).await;
    let web = web_router(&db, "");
    for path in [
        "/".to_string(),
        "/requests".into(),
        format!("/requests/{long_ago}"),
        format!("/requests/{never}"),
    ] {
        let reply = get(&web, &path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
    }
}
