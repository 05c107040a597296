//! The web page and `/metrics`: served by `taskrunner-cli web` and by the
//! daemon when its config has `http: { listen: ADDR }`.
//!
//! Server-rendered HTML (maud, checked at compile time) that works without
//! JavaScript; every query is bounded (store::web), so a page stays fast at
//! a million rows. Safety, in the order a request meets it:
//! - It listens on loopback only, unless `http.auth` is set ([`check_listen`]),
//!   and then answers only to a loopback name in `Host` ([`names_loopback`]:
//!   DNS rebinding).
//! - With `http.auth`, every request needs HTTP Basic (user and bcrypt
//!   password, or any user and the token) or `Authorization: Bearer TOKEN`.
//! - Actions are POST only, carry the server's CSRF token (a random value
//!   per server, in each form; another site cannot read it), and a request
//!   whose `Origin` is not this host is refused. `http.read_only` refuses
//!   every action and hides the buttons.
//! - Every response has a strict Content-Security-Policy: no script at all,
//!   styles only from `/style.css`; maud escapes every value from a row.
//! - Each action is logged with the remote address and the user.

pub(crate) mod chart;
pub(crate) mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::http::{Auth, Http};
use crate::metrics::QueueGauges;
use crate::request::RequestId;
use crate::store::web::{BulkAction, RequestFilter, BULK_LIMIT};
use crate::store::{check_pause_name, in_flow_text, key_held_text, Change, PauseKind, Seen, Store};

/// The Content-Security-Policy of every response: nothing but this
/// server's stylesheet; no script, no inline style, no frames.
pub(crate) const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the page asks of the daemon that serves it (none under
/// `taskrunner-cli web`).
pub trait Daemon: Send + Sync {
    /// Claim now: the page retried, cancelled or resumed something.
    fn wake(&self);
    /// The Prometheus text of `/metrics`, with the daemon's own counters.
    fn metrics_text<'a>(
        &'a self,
        store: &'a Store,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>>;
    /// The daemon's config now (a reload replaces it): the page takes its
    /// `http` settings, lease and schedules from it at the next request.
    fn config(&self) -> Arc<crate::config::Config>;
    /// Read the pauses before the next claim, and say when done: the page
    /// paused or resumed something.
    fn read_pauses(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
    /// Whether process `pid` is one of the daemon's task processes: they
    /// may not act through the page (as they may not stop the daemon
    /// through its socket).
    fn is_task_process(&self, pid: i64) -> bool;
}

/// What the handlers share.
pub struct Web {
    store: Store,
    /// Set when the daemon serves the page: its own counters join `/metrics`.
    daemon: Option<Arc<dyn Daemon>>,
    gauges: QueueGauges,
    /// What the page takes from the config, made again from the daemon's
    /// config after a reload ([`Web::settings`]).
    settings: std::sync::RwLock<Arc<Settings>>,
    csrf: String,
    /// One bcrypt check at a time, off the runtime's thread: a check takes
    /// a quarter of a second at cost 12, and the daemon's runtime has one
    /// thread (its heartbeat, claims and outcome writes).
    checking: tokio::sync::Semaphore,
}

/// The page's settings from one config. `http.listen` is not among them:
/// the address is bound once, and a new one needs a restart.
struct Settings {
    /// The config they were made from (the daemon's, compared by pointer).
    from: Arc<crate::config::Config>,
    schedules: std::collections::BTreeMap<String, crate::cron::Schedule>,
    read_only: bool,
    /// A daemon whose latest heartbeat is older is shown as silent.
    silent_after: std::time::Duration,
    auth: Option<Arc<Credentials>>,
    /// `Authorization` values already verified against `auth` (bcrypt is
    /// slow on purpose); new settings start with none.
    verified: Mutex<Vec<String>>,
}

impl Settings {
    /// The settings of `config`; reads a token file.
    fn of(config: Arc<crate::config::Config>) -> Result<Settings> {
        let http = config.http.clone().unwrap_or(Http {
            listen: None,
            read_only: false,
            auth: None,
        });
        Ok(Settings {
            schedules: config.schedules.clone(),
            read_only: http.read_only,
            silent_after: config.lease_timeout,
            auth: credentials(http.auth.as_ref())?.map(Arc::new),
            verified: Mutex::new(Vec::new()),
            from: config,
        })
    }

    /// These settings, kept for `config` (whose own could not be made).
    fn kept_for(&self, config: Arc<crate::config::Config>) -> Settings {
        Settings {
            from: config,
            schedules: self.schedules.clone(),
            read_only: self.read_only,
            silent_after: self.silent_after,
            auth: self.auth.clone(),
            verified: Mutex::new(Vec::new()),
        }
    }
}

/// The credentials `auth` asks for; a token file is read now.
fn credentials(auth: Option<&Auth>) -> Result<Option<Credentials>> {
    Ok(match auth {
        None => None,
        Some(Auth::TokenFile(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading http.auth.token_file {}", path.display()))?;
            let token = text.lines().next().unwrap_or_default().trim().to_string();
            if token.len() < 16 {
                bail!(
                    "http.auth.token_file {}: the token must be at least 16 characters",
                    path.display()
                );
            }
            Some(Credentials::Token(token))
        }
        Some(Auth::Password { user, hash }) => Some(Credentials::Password {
            user: user.clone(),
            hash: hash.clone(),
        }),
    })
}

/// Checks the page's settings of `config` as a reload would take them for
/// a page that listens on `listening` (kept: an address needs a restart):
/// a token file that cannot be read, or no `auth` where the page listens
/// on an address other than loopback, refuses the reload.
pub(crate) fn check_settings(
    config: &crate::config::Config,
    listening: Option<SocketAddr>,
) -> Result<()> {
    let auth = config.http.as_ref().and_then(|http| http.auth.as_ref());
    // The file's fault, as `config check` reports it (exit status 2).
    credentials(auth)
        .map_err(|error| anyhow::Error::new(crate::usage::UsageError(crate::error_line(&error))))?;
    match listening {
        Some(address) => check_listen(address, auth.is_some()),
        None => Ok(()),
    }
}

enum Credentials {
    Token(String),
    Password { user: String, hash: String },
}

/// Who made a request, for the action log.
#[derive(Clone)]
struct Who {
    remote: String,
    user: String,
}

impl Web {
    /// The page's state. `http` gives `read_only` and `auth`; a token file is
    /// read now.
    pub fn new(
        store: Store,
        config: Arc<crate::config::Config>,
        daemon: Option<Arc<dyn Daemon>>,
    ) -> Result<Web> {
        Ok(Web {
            store,
            daemon,
            gauges: QueueGauges::default(),
            settings: std::sync::RwLock::new(Arc::new(Settings::of(config)?)),
            csrf: format!(
                "{:016x}{:016x}",
                crate::instance::random_u64(),
                crate::instance::random_u64()
            ),
            checking: tokio::sync::Semaphore::new(1),
        })
    }

    /// The settings of the daemon's config now: after a reload, made
    /// again at the first request, so that a new password, token,
    /// `read_only`, lease or schedule applies (before, the page kept those
    /// of its start while the log said "config reloaded"). Should the new
    /// ones fail (a token file gone since the reload's check), the old
    /// ones stay, with one line.
    fn settings(&self) -> Arc<Settings> {
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(daemon) = &self.daemon else {
            return settings;
        };
        let config = daemon.config();
        if Arc::ptr_eq(&config, &settings.from) {
            return settings;
        }
        let mut current = self.settings.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&config, &current.from) {
            *current = Arc::new(match Settings::of(config.clone()) {
                Ok(new) => {
                    tracing::info!(
                        read_only = new.read_only,
                        auth = new.auth.is_some(),
                        "web page: the reloaded config's settings apply"
                    );
                    new
                }
                Err(error) => {
                    tracing::error!(
                        "web page: keeping its settings from before the reload: {}",
                        crate::error_line(&error)
                    );
                    current.kept_for(config)
                }
            });
        }
        current.clone()
    }

    fn has_auth(&self) -> bool {
        self.settings().auth.is_some()
    }
}

/// Refuses an address other than loopback unless `auth` is set.
pub fn check_listen(address: SocketAddr, has_auth: bool) -> Result<()> {
    if !address.ip().is_loopback() && !has_auth {
        bail!(crate::usage::UsageError(format!(
            "refusing to serve the web page on {address} without http.auth: only loopback addresses (127.0.0.1, ::1) are allowed without it"
        )));
    }
    Ok(())
}

/// The web page and `/metrics` as a service: a bound listener and the page's
/// handles; the daemon supervises it beside its other services, and
/// `taskrunner-cli web` runs it alone.
pub(crate) struct Server {
    pub(crate) listener: tokio::net::TcpListener,
    pub(crate) web: Arc<Web>,
}

/// Connections the page serves at once (fewer under a low descriptor
/// limit, see [`crate::connections::Gate`]); more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;

/// The listen backlog: connections waiting for a place (the kernel's
/// `somaxconn` may lower it).
const BACKLOG: u32 = 1024;

/// A connection that sends and reads nothing for this long is closed: a
/// client gone quiet, a keep-alive pool, a slowloris. Every page is served
/// well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request's head (its line and headers) must arrive whole within this,
/// counted from the first wait for it (a keep-alive connection's idle time
/// between requests included), and an action's body within as long from
/// its head. Before, each byte restarted only the idle bound: a client
/// sending a byte every 25 s held its place for ever, and 64 such held
/// every place (the page and `/metrics` stopped answering).
const REQUEST_WITHIN: Duration = Duration::from_secs(30);

/// The largest action body read (a bulk action's ids at most, 10,000).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The page's listener: a connection is accepted once it has a place at
/// the gate, and holds it until it closes or goes idle.
struct Admitting {
    listener: tokio::net::TcpListener,
    gate: crate::connections::Gate,
    /// [`IDLE_TIMEOUT`] (shorter in the tests of it).
    idle_timeout: Duration,
}

/// The remote address of a connection, for the log of each action, and
/// the page's own end of it.
#[derive(Clone, Copy, Debug)]
struct Remote(SocketAddr, SocketAddr);

impl Admitting {
    async fn accept(&mut self) -> (crate::connections::Held<tokio::net::TcpStream>, Remote) {
        let listener = &self.listener;
        let ((stream, address), place) = self.gate.admit(|| listener.accept()).await;
        // This end, as the peer's socket names it (not the listener's
        // 0.0.0.0): how the peer's process is found (see `guard`).
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        (
            crate::connections::Held::new(stream, place, self.idle_timeout),
            Remote(address, local),
        )
    }
}

impl Server {
    /// Binds `address` (after [`check_listen`]).
    pub(crate) async fn bind(address: SocketAddr, web: Arc<Web>) -> Result<Server> {
        check_listen(address, web.has_auth())?;
        let listen = || -> std::io::Result<tokio::net::TcpListener> {
            let socket = match address {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(BACKLOG)
        };
        let listener =
            listen().with_context(|| format!("listening for the web page on {address}"))?;
        Ok(Server { listener, web })
    }

    /// Serves until `stop` is cancelled.
    pub(crate) async fn run(self, stop: CancellationToken) -> Result<()> {
        let address = self.listener.local_addr()?;
        tracing::info!(
            read_only = self.web.settings().read_only,
            auth = self.web.has_auth(),
            "web page on http://{address}/"
        );
        let mut listener = Admitting {
            listener: self.listener,
            gate: crate::connections::Gate::new("web page", MAX_CONNECTIONS),
            idle_timeout: crate::test_hooks::shortened(
                IDLE_TIMEOUT,
                "TASKRUNNER_TEST_WEB_IDLE_TIMEOUT_MS",
            ),
        };
        let head_within = request_within();
        let routes = router(self.web);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => break,
            };
            let service = hyper_util::service::TowerToHyperService::new(
                routes
                    .clone()
                    .layer(axum::Extension(axum::extract::ConnectInfo(remote))),
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head_within)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                // A client gone, or one past its bounds: nothing to report.
                let _ = connection.await;
            });
        }
        // The requests in flight end; idle connections close.
        graceful.shutdown().await;
        Ok(())
    }
}

/// [`REQUEST_WITHIN`] (shorter in the tests of it).
fn request_within() -> Duration {
    crate::test_hooks::shortened(REQUEST_WITHIN, "TASKRUNNER_TEST_WEB_REQUEST_WITHIN_MS")
}

/// Every route, behind the security layers.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/requests", get(requests))
        .route("/requests/{id}", get(request))
        .route("/requests/{id}/retry", post(retry))
        .route("/requests/{id}/cancel", post(cancel))
        .route("/bulk", get(bulk_preview).post(bulk_apply))
        .route("/purge", post(purge))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/batches", get(batches))
        .route("/batches/{id}", get(batch))
        .route("/flows", get(flows))
        .route("/flows/{id}", get(flow))
        .route("/daemons", get(daemons))
        .route("/schedules", get(schedules))
        .route("/metrics", get(metrics))
        .route("/style.css", get(style))
        .layer(axum::middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

/// Authentication, read-only mode, CSRF and Origin checks, security headers.
async fn guard(State(web): State<Arc<Web>>, mut request: Request, next: Next) -> Response {
    let ends = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Remote>>()
        .map(|info| info.0);
    let remote = ends.map_or("-".to_string(), |Remote(remote, _)| remote.to_string());
    let user = match authenticate(&web, request.headers()).await {
        Ok(user) => user,
        Err(()) => {
            let mut response =
                (StatusCode::UNAUTHORIZED, "authentication required\n").into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"taskrunner\""),
            );
            return secure(response);
        }
    };
    let settings = web.settings();
    if settings.auth.is_none() && !names_loopback(request.headers()) {
        // Without auth the page listens on loopback only; a page of another
        // site whose name it made resolve to 127.0.0.1 (DNS rebinding)
        // reaches it under that name, as "same origin" for the browser.
        tracing::warn!(%remote, path = %request.uri().path(), "web: refused a request for another host name");
        return secure(
            (
                StatusCode::MISDIRECTED_REQUEST,
                "refused: without http.auth the page answers only to a loopback name (localhost, 127.0.0.1, [::1]) in Host\n",
            )
                .into_response(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if settings.read_only {
            return secure(
                (
                    StatusCode::FORBIDDEN,
                    "read-only: actions are disabled (http.read_only)\n",
                )
                    .into_response(),
            );
        }
        if let (Some(daemon), Some(Remote(peer, local))) = (&web.daemon, ends) {
            // A task process reaches loopback too: without this, one could
            // read the page's token from a form and purge, cancel or pause
            // every row, where the daemon keeps its database from tasks.
            // Only the daemon's task processes' descriptors are read.
            let tasks = daemon.clone();
            let peer_pid = tokio::task::spawn_blocking(move || {
                crate::procinfo::tcp_peer_pid(peer, local, |pid| tasks.is_task_process(pid))
            })
            .await
            .ok()
            .flatten();
            if let Some(pid) = peer_pid {
                tracing::warn!(%remote, %user, peer = pid, path = %request.uri().path(), "web: refused an action from a task process of this daemon");
                return secure(
                    (
                        StatusCode::FORBIDDEN,
                        format!(
                            "refused: an action from a task process of this daemon (pid {pid})\n"
                        ),
                    )
                        .into_response(),
                );
            }
        }
        if !same_origin(request.headers()) {
            tracing::warn!(%remote, %user, path = %request.uri().path(), "web: refused an action from another origin");
            return secure(
                (
                    StatusCode::FORBIDDEN,
                    "refused: the request came from another site\n",
                )
                    .into_response(),
            );
        }
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        // The body read whole, within its bound, before any handler waits
        // on it.
        let (parts, body) = request.into_parts();
        let bytes = match tokio::time::timeout(
            request_within(),
            axum::body::to_bytes(body, BODY_LIMIT),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => {
                return secure(
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "refused: the request's body is too large, or was cut off\n",
                    )
                        .into_response(),
                )
            }
            Err(_) => {
                tracing::warn!(%remote, path = %parts.uri.path(), "web: a request's body did not arrive in time");
                return secure(
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "refused: the request's body did not arrive in time\n",
                    )
                        .into_response(),
                );
            }
        };
        request = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    request.extensions_mut().insert(Who { remote, user });
    secure(next.run(request).await)
}

/// The user name, or `-` without auth; `Err` if credentials are missing or wrong.
async fn authenticate(web: &Web, headers: &HeaderMap) -> Result<String, ()> {
    let settings = web.settings();
    let Some(credentials) = settings.auth.as_deref() else {
        return Ok("-".into());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(())?;
    let (user, password) = if let Some(token) = given.strip_prefix("Bearer ") {
        ("token".to_string(), token.to_string())
    } else if let Some(encoded) = given.strip_prefix("Basic ") {
        let decoded = base64_decode(encoded.trim()).ok_or(())?;
        let text = String::from_utf8(decoded).map_err(|_| ())?;
        let (user, password) = text.split_once(':').ok_or(())?;
        (user.to_string(), password.to_string())
    } else {
        return Err(());
    };
    match credentials {
        Credentials::Token(token) => {
            if constant_time_eq(password.as_bytes(), token.as_bytes()) {
                Ok(if user.is_empty() {
                    "token".into()
                } else {
                    user
                })
            } else {
                Err(())
            }
        }
        Credentials::Password {
            user: expected,
            hash,
        } => {
            let known = |settings: &Settings| {
                let verified = settings.verified.lock().unwrap_or_else(|e| e.into_inner());
                verified
                    .iter()
                    .any(|v| constant_time_eq(v.as_bytes(), given.as_bytes()))
            };
            if &user == expected && known(&settings) {
                return Ok(user);
            }
            // Checked off the runtime's thread, one at a time (before, each
            // wrong password held the daemon's one thread for the whole
            // check: a few requests a second stopped its heartbeat). A wrong
            // user name is checked too, so that it takes as long.
            let _turn = web.checking.acquire().await.map_err(|_| ())?;
            if &user == expected && known(&settings) {
                return Ok(user);
            }
            let hash = hash.clone();
            let check = tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash));
            let right = check.await.map_err(|_| ())?.unwrap_or(false);
            if !(right && &user == expected) {
                return Err(());
            }
            // A reload during the check (a quarter of a second, and more in
            // the queue) may have replaced this password: it lets nobody in.
            if !Arc::ptr_eq(&settings, &web.settings()) {
                return Err(());
            }
            let mut verified = settings.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified.len() >= 64 {
                verified.clear();
            }
            verified.push(given.to_string());
            Ok(user)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 (HTTP Basic credentials).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

/// Whether the `Host` a request names is loopback (`localhost`, an IP
/// address of loopback, with a port or without), or absent (a client that
/// is no browser). A browser always sends the name it connected to.
fn names_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser sends `Origin` with every POST; it must name this host.
/// A client that sends none (curl, scripts) is not a browser that another
/// site could steer.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An error as a page (the message only; details go to the log).
struct PageError(anyhow::Error);

impl From<anyhow::Error> for PageError {
    fn from(error: anyhow::Error) -> Self {
        PageError(error)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        tracing::warn!("web: {}", crate::error_line(&self.0));
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::error_page(&crate::error_line(&self.0)),
        )
            .into_response()
    }
}

type PageResult = Result<Response, PageError>;

fn html(markup: maud::Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// What the pages need to know about the server.
pub(crate) struct Chrome<'a> {
    pub(crate) csrf: &'a str,
    pub(crate) read_only: bool,
}

fn chrome(web: &Web) -> Chrome<'_> {
    Chrome {
        csrf: &web.csrf,
        read_only: web.settings().read_only,
    }
}

async fn overview(State(web): State<Arc<Web>>) -> PageResult {
    let queues = web
        .store
        .all_queue_stats(crate::metrics::MAX_QUEUES, pages::OVERVIEW_COUNT_CAP)
        .await?;
    let pauses = web.store.pauses().await?;
    let daemons = web.store.daemons(web.settings().silent_after).await?;
    let minutes = web.store.tries_last_hour().await?;
    Ok(html(pages::overview(
        &chrome(&web),
        &queues,
        &pauses,
        &daemons,
        &minutes,
    )))
}

/// The query string of the requests page (and of a bulk action).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FilterQuery {
    #[serde(default)]
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) task: String,
    #[serde(default)]
    pub(crate) queue: String,
    #[serde(default)]
    pub(crate) host: String,
    #[serde(default)]
    pub(crate) text: String,
    /// A batch id (members of that batch), where batches exist.
    #[serde(default)]
    pub(crate) batch: String,
    /// A flow id (its step and revert rows).
    #[serde(default)]
    pub(crate) flow: String,
    pub(crate) before: Option<i64>,
    #[serde(default)]
    pub(crate) action: String,
    /// A bulk action's confirmation: the ids its preview counted, joined
    /// by commas.
    #[serde(default)]
    pub(crate) ids: String,
    #[serde(default)]
    pub(crate) csrf: String,
}

impl FilterQuery {
    /// The filter; a batch or flow that is not a number is an error (a
    /// `400` page). Before, it was dropped: the page listed every row while
    /// its field still showed the value, and a bulk action from there
    /// changed every row of the table.
    pub(crate) fn filter(&self) -> Result<RequestFilter, String> {
        let some = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        let id = |name: &str, text: &str| match some(text) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("the {name} filter is an id, a number: `{text}`")),
        };
        Ok(RequestFilter {
            batch: id("batch", &self.batch)?,
            flow: id("flow", &self.flow)?,
            state: some(&self.state).map(|s| s.to_uppercase()),
            task: some(&self.task),
            queue: some(&self.queue),
            host: some(&self.host),
            text: some(&self.text),
        })
    }
}

async fn requests(State(web): State<Arc<Web>>, Query(query): Query<FilterQuery>) -> PageResult {
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(message) => return Ok(bad_request(&message)),
    };
    let page = web.store.find_requests(&filter, query.before).await?;
    Ok(html(pages::requests(&chrome(&web), &query, &page)))
}

async fn request(State(web): State<Arc<Web>>, Path(id): Path<String>) -> PageResult {
    let Ok(id) = id.parse::<i64>() else {
        return Ok(bad_request("a request id is a number"));
    };
    match web.store.show(RequestId(id)).await? {
        Some(row) => {
            let callbacks = web.store.request_callbacks(id).await?;
            Ok(html(pages::request(&chrome(&web), &row, &callbacks)))
        }
        None => Ok((
            StatusCode::NOT_FOUND,
            pages::error_page(&format!("no request {id}")),
        )
            .into_response()),
    }
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    older_than: String,
    /// `retry`: the row's state and tries as the page showed them
    /// (`FAILED:1`); none: retried whatever it is now (not running).
    #[serde(default)]
    seen: String,
}

fn csrf_ok(web: &Web, given: &str) -> bool {
    constant_time_eq(given.as_bytes(), web.csrf.as_bytes())
}

/// A `400` page with one line.
fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, pages::error_page(message)).into_response()
}

fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        pages::error_page(
            "refused: the form's CSRF token is missing or stale; reload the page and try again",
        ),
    )
        .into_response()
}

async fn one_action(web: &Web, who: &Who, id: &str, form: &ActionForm, action: &str) -> PageResult {
    if !csrf_ok(web, &form.csrf) {
        tracing::warn!(remote = %who.remote, user = %who.user, action, request = id, "web: refused an action without a valid CSRF token");
        return Ok(csrf_refused());
    }
    let Ok(number) = id.parse::<i64>() else {
        return Ok(bad_request("a request id is a number"));
    };
    let seen = match form.seen.as_str() {
        "" => None,
        seen => match seen.split_once(':').and_then(|(state, tries)| {
            Some(Seen {
                state: state.to_string(),
                tries: tries.parse().ok()?,
            })
        }) {
            Some(seen) => Some(seen),
            None => return Ok(bad_request("seen is a state and tries, as FAILED:1")),
        },
    };
    let change = match action {
        "retry" => web.store.retry(RequestId(number), seen.as_ref()).await?,
        _ => web.store.cancel(RequestId(number)).await?,
    };
    tracing::info!(remote = %who.remote, user = %who.user, action, request = number, outcome = ?change, "web action");
    if let Some(daemon) = &web.daemon {
        daemon.wake();
    }
    match change {
        Change::Done | Change::Requested => {
            Ok(Redirect::to(&format!("/requests/{number}")).into_response())
        }
        Change::NotFound => Ok((
            StatusCode::NOT_FOUND,
            pages::error_page(&format!("no request {number}")),
        )
            .into_response()),
        Change::Refused(state) => Ok((
            StatusCode::CONFLICT,
            pages::error_page(&format!(
                "request {number} is {}: {action} does not apply",
                state.as_deref().unwrap_or("pending")
            )),
        )
            .into_response()),
        Change::KeyHeld { key, by } => Ok((
            StatusCode::CONFLICT,
            pages::error_page(&key_held_text(RequestId(number), &key, by)),
        )
            .into_response()),
        Change::InFlow(flow) => Ok((
            StatusCode::CONFLICT,
            pages::error_page(&in_flow_text(RequestId(number), flow)),
        )
            .into_response()),
        Change::Moved { state, tries } => Ok((
            StatusCode::CONFLICT,
            pages::error_page(&format!(
                "request {number} was not retried: it changed since the page showed it ({}), and is now {} after {tries} tries; open it again and retry it if you still mean to",
                form.seen,
                state.as_deref().unwrap_or("pending"),
            )),
        )
            .into_response()),
    }
}

async fn retry(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> PageResult {
    one_action(&web, &who, &id, &form, "retry").await
}

async fn cancel(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> PageResult {
    one_action(&web, &who, &id, &form, "cancel").await
}

fn bulk_action(name: &str) -> Option<BulkAction> {
    match name {
        "retry" => Some(BulkAction::Retry),
        "cancel" => Some(BulkAction::Cancel),
        _ => None,
    }
}

/// Shows how many rows a bulk action would change, and the button to do it.
async fn bulk_preview(State(web): State<Arc<Web>>, Query(query): Query<FilterQuery>) -> PageResult {
    let Some(action) = bulk_action(&query.action) else {
        return Ok(bad_request("action must be retry or cancel"));
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(message) => return Ok(bad_request(&message)),
    };
    let ids = web.store.bulk_preview(&filter, action).await?;
    Ok(html(pages::bulk_preview(
        &chrome(&web),
        &query,
        &filter,
        &ids,
    )))
}

async fn bulk_apply(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Form(query): Form<FilterQuery>,
) -> PageResult {
    if !csrf_ok(&web, &query.csrf) {
        tracing::warn!(remote = %who.remote, user = %who.user, "web: refused a bulk action without a valid CSRF token");
        return Ok(csrf_refused());
    }
    let Some(action) = bulk_action(&query.action) else {
        return Ok(bad_request("action must be retry or cancel"));
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(message) => return Ok(bad_request(&message)),
    };
    let previewed: Option<Vec<i64>> = query
        .ids
        .split(',')
        .filter(|id| !id.trim().is_empty())
        .map(|id| id.trim().parse().ok())
        .collect();
    let previewed = match previewed {
        Some(ids) if !ids.is_empty() && ids.len() as i64 <= BULK_LIMIT => ids,
        _ => {
            return Ok(bad_request(
                "a bulk action needs the ids its preview counted (ids): open its preview and confirm there",
            ))
        }
    };
    let count = previewed.len();
    // In a task of its own, which logs it: thousands of rows may take
    // longer than the connection lasts (its idle bound, a tab closed), and
    // the action was cut off part-way, with no line in the log.
    let applying = {
        let (store, daemon, name) = (web.store.clone(), web.daemon.clone(), query.action.clone());
        tokio::spawn(async move {
            tracing::info!(remote = %who.remote, user = %who.user, action = %name, filter = ?filter, confirmed = count, "web bulk action begins");
            let applied = store.bulk_apply(&filter, action, &previewed).await;
            match &applied {
                Ok(applied) => {
                    tracing::info!(remote = %who.remote, user = %who.user, action = %name, filter = ?filter, confirmed = count, changed = applied.changed, refused = applied.refused, gone = applied.gone, "web bulk action");
                    if let Some(daemon) = &daemon {
                        daemon.wake();
                    }
                }
                Err(error) => {
                    tracing::warn!(remote = %who.remote, user = %who.user, action = %name, "web bulk action stopped: {}", crate::error_line(error));
                }
            }
            applied
        })
    };
    let applied = applying.await.map_err(anyhow::Error::from)??;
    let refused = if applied.refused > 0 {
        format!(
            "; {} refused (they changed meanwhile, or a rule refused them: `taskrunner-cli {}` names why for each)",
            applied.refused, query.action
        )
    } else {
        String::new()
    };
    let gone = if applied.gone > 0 {
        format!(
            "; {} no longer matched the filter (changed since the preview) and were left alone",
            applied.gone
        )
    } else {
        String::new()
    };
    Ok(html(pages::message(
        &chrome(&web),
        &format!(
            "{} applied to {} requests{refused}{gone}",
            query.action, applied.changed
        ),
    )))
}

async fn purge(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Form(form): Form<ActionForm>,
) -> PageResult {
    if !csrf_ok(&web, &form.csrf) {
        return Ok(csrf_refused());
    }
    let older_than = match crate::units::parse_duration(form.older_than.trim()) {
        Ok(duration) => duration,
        Err(error) => return Ok(bad_request(&format!("older than: {error}"))),
    };
    // The same pass as `taskrunner-cli purge --older-than`: every kind of
    // final row, then the ended batches and flows left without rows.
    // In a task of its own, which logs it, as a bulk action.
    let retention = crate::retention::Retention::all(older_than);
    let purging = {
        let (store, older_than) = (web.store.clone(), form.older_than.clone());
        tokio::spawn(async move {
            let purged = crate::prune::prune(&store, &retention, Duration::ZERO, None).await;
            match &purged {
                Ok(purged) => {
                    tracing::info!(remote = %who.remote, user = %who.user, older_than = %older_than, deleted = purged.requests, "web purge")
                }
                Err(error) => {
                    tracing::warn!(remote = %who.remote, user = %who.user, older_than = %older_than, "web purge stopped: {}", crate::error_line(error))
                }
            }
            purged
        })
    };
    let deleted = purging.await.map_err(anyhow::Error::from)??.requests;
    Ok(html(pages::message(
        &chrome(&web),
        &format!(
            "purged {deleted} final requests completed more than {} ago",
            form.older_than.trim()
        ),
    )))
}

/// The form of `/pause` and `/resume`: the overview's buttons, and its
/// form that names a queue or type (which may have no row yet).
#[derive(Deserialize)]
struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    kind: String,
    /// Taken as sent (not trimmed): a button resumes the exact name paused.
    #[serde(default)]
    name: String,
    /// Empty for none.
    #[serde(default)]
    reason: String,
}

async fn pause(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Form(form): Form<PauseForm>,
) -> PageResult {
    pause_action(&web, &who, &form, true).await
}

async fn resume(
    State(web): State<Arc<Web>>,
    axum::Extension(who): axum::Extension<Who>,
    Form(form): Form<PauseForm>,
) -> PageResult {
    pause_action(&web, &who, &form, false).await
}

/// Pauses or resumes a queue or a task type, as `taskrunner-cli pause` and
/// `resume` do (the same rules: pausing what is paused keeps its time and
/// reason), then shows the overview again.
async fn pause_action(web: &Web, who: &Who, form: &PauseForm, pausing: bool) -> PageResult {
    let action = if pausing { "pause" } else { "resume" };
    if !csrf_ok(web, &form.csrf) {
        tracing::warn!(remote = %who.remote, user = %who.user, action, "web: refused an action without a valid CSRF token");
        return Ok(csrf_refused());
    }
    let checked = PauseKind::from_word(&form.kind)
        .ok_or_else(|| anyhow::anyhow!("kind must be queue or task"))
        .and_then(|kind| check_pause_name(kind, &form.name).map(|()| kind));
    let kind = match checked {
        Ok(kind) => kind,
        Err(error) => return Ok(bad_request(&format!("{action}: {error}"))),
    };
    let reason = Some(form.reason.trim()).filter(|reason| !reason.is_empty());
    let outcome = if pausing {
        match web.store.pause(kind, &form.name, reason).await? {
            Some(_) => "paused already",
            None => "paused",
        }
    } else if web.store.resume(kind, &form.name).await? {
        "resumed"
    } else {
        "not paused"
    };
    // The daemon serving the page goes by it before its next claim (a
    // resume is claimed at once); the others within a second.
    let unread = match &web.daemon {
        Some(daemon) if matches!(outcome, "paused" | "resumed") => daemon.read_pauses().await.err(),
        _ => None,
    };
    tracing::info!(remote = %who.remote, user = %who.user, action, kind = kind.word(), name = %form.name, reason, outcome, "web pause action");
    if let Some(why) = unread {
        tracing::warn!("web {action}: this daemon did not read the pauses at once: {why}");
    }
    Ok(Redirect::to("/").into_response())
}

#[derive(Deserialize)]
struct Before {
    before: Option<i64>,
}

/// Flows, newest first, where the table exists (migration 0007).
async fn flows(State(web): State<Arc<Web>>, Query(page): Query<Before>) -> PageResult {
    if !web.store.table_exists("task_runner_flows").await? {
        return Ok(pages::message(
            &chrome(&web),
            "This database has no flows table yet (taskrunner-cli migrate adds it).",
        )
        .into_response());
    }
    let flows = web
        .store
        .list_flows(page.before, crate::store::web::PAGE_SIZE + 1)
        .await?;
    Ok(html(pages::flows(&chrome(&web), &flows)))
}

/// One flow's board.
async fn flow(State(web): State<Arc<Web>>, Path(id): Path<String>) -> PageResult {
    let Ok(id) = id.parse::<i64>() else {
        return Ok(bad_request("a flow id is a number"));
    };
    let board = if web.store.table_exists("task_runner_flows").await? {
        web.store.flow_board(id).await?
    } else {
        None
    };
    match board {
        Some(board) => Ok(html(pages::flow(&chrome(&web), &board))),
        None => Ok((
            StatusCode::NOT_FOUND,
            pages::error_page(&format!("no flow {id}")),
        )
            .into_response()),
    }
}

/// Batches with their progress, where the table exists (migration 0005).
async fn batches(State(web): State<Arc<Web>>, Query(page): Query<Before>) -> PageResult {
    if !web.store.table_exists("task_runner_batches").await? {
        return Ok(pages::message(
            &chrome(&web),
            "This database has no batches table yet (taskrunner-cli migrate adds it).",
        )
        .into_response());
    }
    let batches = web.store.batches(page.before).await?;
    Ok(pages::batches(&chrome(&web), &batches).into_response())
}

async fn batch(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
    Query(query): Query<FilterQuery>,
) -> PageResult {
    let Ok(id) = id.parse::<i64>() else {
        return Ok(bad_request("a batch id is a number"));
    };
    if !web.store.table_exists("task_runner_batches").await? {
        return Ok((
            StatusCode::NOT_FOUND,
            pages::error_page("this database has no batches"),
        )
            .into_response());
    }
    // The page of batches below `id + 1`: with no bound past the largest id.
    let found = web
        .store
        .batches(id.checked_add(1))
        .await?
        .into_iter()
        .next()
        .filter(|b| b.id == id);
    let Some(found) = found else {
        return Ok((
            StatusCode::NOT_FOUND,
            pages::error_page(&format!("no batch {id}")),
        )
            .into_response());
    };
    let filter = match query.filter() {
        Ok(filter) => RequestFilter {
            batch: Some(id),
            ..filter
        },
        Err(message) => return Ok(bad_request(&message)),
    };
    let members = web.store.find_requests(&filter, query.before).await?;
    let callbacks = web.store.batch_callbacks(id).await?;
    Ok(pages::batch(&chrome(&web), &found, &members, &callbacks).into_response())
}

async fn daemons(State(web): State<Arc<Web>>) -> PageResult {
    let daemons = web.store.daemons(web.settings().silent_after).await?;
    Ok(html(pages::daemons(&chrome(&web), &daemons)))
}

async fn schedules(State(web): State<Arc<Web>>) -> PageResult {
    let lines = schedule_lines(&web.store, &web.settings().schedules).await?;
    Ok(html(pages::schedules(&chrome(&web), &lines)))
}

/// One schedule as the page and `taskrunner-cli schedules` show it.
pub(crate) struct ScheduleLine {
    pub(crate) name: String,
    /// `cron: '…'` or `every: …`; `None` for a schedule no longer in the
    /// config whose slots are still recorded.
    pub(crate) spec: Option<String>,
    pub(crate) task: Option<String>,
    /// The latest slot enqueued, and its request.
    pub(crate) latest: Option<String>,
    pub(crate) request: Option<i64>,
    /// The next slot after the database's now.
    pub(crate) next: Option<String>,
}

/// The config's schedules with their latest and next slots, then those
/// only the slots table still names.
pub(crate) async fn schedule_lines(
    store: &Store,
    schedules: &std::collections::BTreeMap<String, crate::cron::Schedule>,
) -> Result<Vec<ScheduleLine>> {
    let slots = store.schedule_slots().await?;
    let now = crate::cron::from_epoch_seconds(store.database_now().await?);
    let mut lines: Vec<ScheduleLine> = schedules
        .iter()
        .map(|(name, schedule)| {
            let latest = slots.iter().find(|slot| &slot.schedule == name);
            ScheduleLine {
                name: name.clone(),
                spec: Some(schedule.spec.clone()),
                task: Some(schedule.task.clone()),
                latest: latest
                    .and_then(|slot| slot.last_slot)
                    .map(|seconds| schedule.show_slot(crate::cron::from_epoch_seconds(seconds))),
                request: latest.and_then(|slot| slot.last_request),
                next: schedule
                    .when
                    .next_after(now)
                    .map(|next| schedule.show_slot(next)),
            }
        })
        .collect();
    lines.extend(
        slots
            .iter()
            .filter(|slot| !schedules.contains_key(&slot.schedule))
            .map(|slot| ScheduleLine {
                name: slot.schedule.clone(),
                spec: None,
                task: None,
                latest: slot
                    .last_slot
                    .map(|seconds| crate::cron::show_utc(crate::cron::from_epoch_seconds(seconds))),
                request: slot.last_request,
                next: None,
            }),
    );
    Ok(lines)
}

async fn metrics(State(web): State<Arc<Web>>) -> PageResult {
    let text = match &web.daemon {
        Some(daemon) => daemon.metrics_text(&web.store).await?,
        None => crate::metrics::render(&web.store, &web.gauges, None).await?,
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
        .into_response()
}

/// `taskrunner-cli web`: serves the page on `address` until Ctrl-C.
pub(crate) async fn run_standalone(
    config: &crate::config::Config,
    address: SocketAddr,
    store: Store,
    shutdown: CancellationToken,
) -> Result<()> {
    let web = Arc::new(Web::new(store, Arc::new(config.clone()), None)?);
    Server::bind(address, web).await?.run(shutdown).await
}
