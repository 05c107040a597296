//! Test harness: real databases (a SQLite file per test, a PostgreSQL
//! database and a MariaDB database per test on the servers `scripts/test`
//! starts), the real daemon binary, and waiting on conditions with deadlines.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use taskrunner::request::{Request, RequestId};
use taskrunner::store::{Purpose, Store};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_taskrunnerd");
pub const CLI: &str = env!("CARGO_BIN_EXE_taskrunner-cli");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MariaDB (or MySQL), through `mysql://` URLs.
    MySql,
}

/// Instantiates an async test case `fn(Backend)` for every backend (SQLite,
/// PostgreSQL, MariaDB), as ripgrep runs each test under both regex engines.
/// (Named when there were two; it covers all three.)
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$case($crate::util::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$case($crate::util::Backend::Postgres).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn mysql() {
                    super::$case($crate::util::Backend::MySql).await
                }
            }
        )*
    };
}

/// Instantiates an async test case for SQLite and PostgreSQL only: the few
/// that do not run on MariaDB yet (the SDK's typed enqueue and wait, the
/// Rails schema.rb round trip), each named in the README's list of what
/// MariaDB lacks.
#[macro_export]
macro_rules! sqlite_and_postgres {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$case($crate::util::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$case($crate::util::Backend::Postgres).await
                }
            }
        )*
    };
}

/// Instantiates an async test case for the backends that serve several
/// daemons on several hosts: PostgreSQL and MariaDB.
#[macro_export]
macro_rules! multi_host_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$case($crate::util::Backend::Postgres).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn mysql() {
                    super::$case($crate::util::Backend::MySql).await
                }
            }
        )*
    };
}

/// A table of `n` rows (1..=n) to insert from: `INSERT … SELECT … FROM {series}`.
pub fn series(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!("generate_series(1, {n})"),
        // MariaDB's Sequence engine.
        Backend::MySql => format!("seq_1_to_{n}"),
        Backend::Sqlite => format!(
            "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) SELECT i FROM n)"
        ),
    }
}

/// A scratch directory, removed when the test passes.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "taskrunner-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh, migrated request table for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub store: Store,
    pub scratch: Scratch,
    raw: Raw,
}

enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

/// The MariaDB server the suite runs against (`scripts/test` starts one):
/// a URL naming an existing database, e.g. `mysql://root@127.0.0.1:3306/mysql`.
pub fn mysql_admin_url() -> String {
    std::env::var("TASKRUNNER_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!("TASKRUNNER_TEST_MYSQL_URL is not set: run the suite with scripts/test, which starts a MariaDB server")
    })
}

/// A pool on a MariaDB database as an application would open it: UTC
/// session, `||` as concatenation (as taskrunner's own sessions).
pub async fn mysql_app_pool(url: &str) -> sqlx::MySqlPool {
    use std::str::FromStr;
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .connect_with(sqlx::mysql::MySqlConnectOptions::from_str(url).unwrap())
        .await
        .unwrap()
}

/// The PostgreSQL server the suite runs against (`scripts/test` starts one).
pub fn postgres_admin_url() -> String {
    std::env::var("TASKRUNNER_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("TASKRUNNER_TEST_DATABASE_URL is not set: run the suite with scripts/test, which starts a PostgreSQL server")
    })
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let db = TestDb::unmigrated(backend).await;
        db.store
            .migrate()
            .await
            .expect("migrating the test database");
        db
    }

    /// An empty database (a SQLite file not yet created, a PostgreSQL
    /// database without tables).
    pub async fn unmigrated(backend: Backend) -> TestDb {
        let scratch = Scratch::new(match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "pg",
            Backend::MySql => "my",
        });
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", scratch.join("requests.db").display()),
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let name = format!(
                    "taskrunner_test_{}",
                    scratch
                        .path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .replace('-', "_")
                );
                let admin = sqlx::PgPool::connect(&admin_url)
                    .await
                    .expect("connecting to the test server");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name}"
                )))
                .execute(&admin)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
                let base = admin_url.rsplit_once('/').unwrap().0;
                format!("{base}/{name}")
            }
            Backend::MySql => {
                let admin_url = mysql_admin_url();
                let name = format!(
                    "taskrunner_test_{}",
                    scratch
                        .path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .replace('-', "_")
                );
                let admin = mysql_app_pool(&admin_url).await;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"
                )))
                .execute(&admin)
                .await
                .unwrap();
                admin.close().await;
                let base = admin_url.rsplit_once('/').unwrap().0;
                format!("{base}/{name}")
            }
        };
        let store = Store::open(&url, Purpose::Migrate).unwrap();
        let raw = match backend {
            Backend::Sqlite => Raw::Sqlite(
                sqlx::SqlitePool::connect_with(
                    std::str::FromStr::from_str(&url)
                        .map(|o: sqlx::sqlite::SqliteConnectOptions| o.create_if_missing(true))
                        .unwrap(),
                )
                .await
                .unwrap(),
            ),
            Backend::Postgres => Raw::Postgres(sqlx::PgPool::connect(&url).await.unwrap()),
            Backend::MySql => Raw::MySql(mysql_app_pool(&url).await),
        };
        TestDb {
            backend,
            url,
            store,
            scratch,
            raw,
        }
    }

    /// Runs SQL as an application would (no parameters).
    pub async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs SQL as an application would and returns the error's message,
    /// if any.
    pub async fn try_execute(&self, sql: &str) -> Result<(), String> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    /// Runs an `INSERT … RETURNING id` and returns the id (MariaDB, which
    /// has no `RETURNING` on every statement: the insert, then its
    /// `LAST_INSERT_ID()`).
    pub async fn insert(&self, sql: &str) -> RequestId {
        let id: i64 = match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_one(pool)
                    .await
            }
            Raw::Postgres(pool) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_one(pool)
                    .await
            }
            Raw::MySql(pool) => {
                let insert = match sql.rfind(" RETURNING ") {
                    Some(at) => &sql[..at],
                    None => sql,
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(insert.to_string()))
                    .execute(pool)
                    .await
                    .map(|done| done.last_insert_id() as i64)
            }
        }
        .unwrap_or_else(|e| panic!("{e}"));
        RequestId(id)
    }

    /// Inserts a request of `task` with `options` (YAML) and returns its id.
    pub async fn enqueue(&self, task: &str, options: Option<&str>) -> RequestId {
        let options = options.map_or("NULL".to_string(), quote);
        self.insert(&format!(
            "INSERT INTO task_runner_requests (task_class_name, options) VALUES ({}, {options}) RETURNING id",
            quote(task)
        ))
        .await
    }

    /// One integer from a query (`SELECT count(*) …`).
    pub async fn scalar(&self, sql: &str) -> i64 {
        // MySQL spells the tests' `CAST(… AS BIGINT)` `AS SIGNED`.
        let sql = match self.backend {
            Backend::MySql => sql.replace(" AS BIGINT)", " AS SIGNED)"),
            Backend::Sqlite | Backend::Postgres => sql.to_string(),
        };
        let sql = sqlx::AssertSqlSafe(sql);
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Raw::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
            // count(*) is a BIGINT there, sum() a DECIMAL: read leniently.
            Raw::MySql(pool) => sqlx::raw_sql(sql).fetch_one(pool).await.map(|row| {
                use sqlx::Row;
                row.try_get::<Option<i64>, _>(0)
                    .ok()
                    .flatten()
                    .or_else(|| {
                        row.try_get_unchecked::<Option<String>, _>(0)
                            .ok()
                            .flatten()
                            .and_then(|text| text.parse::<f64>().ok())
                            .map(|v| v as i64)
                    })
                    .unwrap_or(0)
            }),
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn row(&self, id: RequestId) -> Request {
        self.store
            .show(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row {id}"))
    }

    /// Waits until row `id` satisfies `done`, and returns it.
    pub async fn wait_for(
        &self,
        id: RequestId,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Request) -> bool,
    ) -> Request {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.row(id).await;
            if done(&row) {
                return row;
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for request {id} to be {what}; row: {row:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until row `id` has `result` = `state`.
    pub async fn wait_for_state(&self, id: RequestId, state: &str, timeout: Duration) -> Request {
        self.wait_for(id, timeout, state, |row| {
            row.result.as_deref() == Some(state)
        })
        .await
    }

    /// Waits until `sql` (a count) returns `expected`.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.scalar(sql).await;
            if count == expected {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?}: `{sql}` is {count}, not {expected}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// SQL string literal.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The base config every test daemon gets; tests append their own keys.
pub fn base_config(db: &TestDb, dir: &Path) -> String {
    format!(
        "database_url: {}\npoll_interval: 1s\nheartbeat_interval: 1s\nlease_timeout: 5s\nkill_grace: 2s\nkill_retry: 1s\nshutdown_timeout: 5s\nretry_delay: 1s\nsocket: {}\n",
        db.url,
        dir.join("run/daemon.sock").display()
    )
}

/// `extra`'s top-level keys replace `base`'s.
pub fn merge_yaml(base: &str, extra: &str) -> String {
    let mut merged: serde_yaml::Mapping = serde_yaml::from_str(base).unwrap();
    if !extra.trim().is_empty() {
        let extra: serde_yaml::Mapping = serde_yaml::from_str(extra).expect("test config YAML");
        for (key, value) in extra {
            merged.insert(key, value);
        }
    }
    serde_yaml::to_string(&merged).unwrap()
}

/// A `taskrunnerd` process, killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the base config plus `extra` YAML, in its own
    /// directory under the test's scratch dir.
    pub fn start(db: &TestDb, name: &str, extra: &str) -> Daemon {
        let dir = db.scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(&config, merge_yaml(&base_config(db, &dir), extra)).unwrap();
        let mut daemon = Daemon::start_with_config(&config, &[]);
        daemon.wait_ready();
        daemon
    }

    /// Waits until the daemon logs that it started; fails with its log if it exits first.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains("taskrunnerd started") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "taskrunnerd exited with {status} at start; log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "taskrunnerd did not start within 30s; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn start_with_config(config: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(config, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_in_env(db: &TestDb, name: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = db.scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(&config, merge_yaml(&base_config(db, &dir), extra)).unwrap();
        let mut daemon = Daemon::start_with_env(&config, &[], env);
        daemon.wait_ready();
        daemon
    }

    pub fn start_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(config, args, env, None, None)
    }

    /// Like [`Daemon::start_in_env`], as user `uid` (the test must be root).
    pub fn start_as(
        db: &TestDb,
        name: &str,
        extra: &str,
        env: &[(&str, &str)],
        uid: u32,
    ) -> Daemon {
        let dir = db.scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(&config, merge_yaml(&base_config(db, &dir), extra)).unwrap();
        let mut daemon = Daemon::spawn(&config, &[], env, None, Some(uid));
        daemon.wait_ready();
        daemon
    }

    /// Like [`Daemon::start`], under an `RLIMIT_NOFILE` of (soft, hard).
    pub fn start_with_open_files(
        db: &TestDb,
        name: &str,
        extra: &str,
        nofile: (u64, u64),
    ) -> Daemon {
        let dir = db.scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(&config, merge_yaml(&base_config(db, &dir), extra)).unwrap();
        let mut daemon = Daemon::spawn(&config, &[], &[], Some(nofile), None);
        daemon.wait_ready();
        daemon
    }

    fn spawn(
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
        uid: Option<u32>,
    ) -> Daemon {
        let dir = config.parent().unwrap().to_path_buf();
        let log = dir.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = Command::new(DAEMON);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("--config")
            .arg(config)
            .args(args)
            .current_dir(&dir)
            .env("TASKRUNNER_LOG", "debug,sqlx=warn")
            .env_remove("DATABASE_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting taskrunnerd");
        Daemon {
            child,
            config: config.to_path_buf(),
            log,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Waits for the daemon to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "taskrunnerd did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(timeout, &format!("the daemon to log `{needle}`"), || {
            self.log_text().contains(needle)
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `condition` until it holds, failing the test after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `taskrunner-cli` with the test's database and returns (status, stdout, stderr).
pub fn cli(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(CLI)
        .arg("--database-url")
        .arg(&db.url)
        .args(args)
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .output()
        .expect("running taskrunner-cli");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Whether a process exists (for grandchild checks).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
}

/// A PostgreSQL server of the test's own, for tests that stop or restart
/// the server (the shared one serves every other test at the same time).
pub struct PrivatePostgres {
    pub url: String,
    dir: PathBuf,
    bin: PathBuf,
    as_root: bool,
    port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test installs it)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let dir = Scratch::new("private-pg").path.clone();
        // Keep the directory: Scratch would remove it at the end of this fn.
        std::fs::create_dir_all(&dir).unwrap();
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        }
        let server = PrivatePostgres {
            url: format!("postgres://taskrunner@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            as_root,
            port,
        };
        let data = server.dir.join("data");
        let status = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "taskrunner", "--auth=trust"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        server.pg_ctl("start");
        server
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// `pg_ctl start|stop|restart`, waiting for it to finish.
    pub fn pg_ctl(&self, action: &str) {
        let data = self.dir.join("data");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-m", "fast"]);
        if action != "stop" {
            command.args(["-o", &options]);
        }
        let status = command.arg(action).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "pg_ctl {action} failed");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut command = self.command("pg_ctl");
        let _ = command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A MariaDB server of the test's own, for tests that stop or restart the
/// server: a throwaway data directory, 127.0.0.1 and a free port, no grant
/// tables, durability off (as `scripts/test` starts the shared one).
pub struct PrivateMariaDb {
    pub url: String,
    dir: PathBuf,
    port: u16,
    server: Option<Child>,
}

impl PrivateMariaDb {
    pub fn start() -> PrivateMariaDb {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let dir = Scratch::new("private-mariadb").path.clone();
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--user={}", current_user()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadb-install-db runs (scripts/test installs mariadb-server)");
        assert!(status.success(), "mariadb-install-db failed");
        let mut server = PrivateMariaDb {
            url: format!("mysql://root@127.0.0.1:{port}/mysql"),
            dir,
            port,
            server: None,
        };
        server.start_again();
        server
    }

    /// Starts the server (again) and waits until it answers.
    pub fn start_again(&mut self) {
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--user={}", current_user()))
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("server.log").display()
            ))
            .args([
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd runs");
        self.server = Some(child);
        let port = self.port.to_string();
        wait_until(
            Duration::from_secs(60),
            "the private MariaDB to answer",
            || {
                Command::new("mariadb")
                    .args([
                        "--no-defaults",
                        "-h",
                        "127.0.0.1",
                        "-P",
                        &port,
                        "-u",
                        "root",
                    ])
                    .args(["-e", "SELECT 1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// Stops the server (SIGTERM: a clean shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_string(), |user| user.name)
}

/// A private server of either kind that serves several hosts.
pub enum PrivateServer {
    Postgres(PrivatePostgres),
    MySql(PrivateMariaDb),
}

impl PrivateServer {
    pub fn start(backend: Backend) -> PrivateServer {
        match backend {
            Backend::Postgres => PrivateServer::Postgres(PrivatePostgres::start()),
            Backend::MySql => PrivateServer::MySql(PrivateMariaDb::start()),
            Backend::Sqlite => panic!("SQLite has no server"),
        }
    }

    pub fn url(&self) -> &str {
        match self {
            PrivateServer::Postgres(server) => &server.url,
            PrivateServer::MySql(server) => &server.url,
        }
    }

    pub fn stop(&mut self) {
        match self {
            PrivateServer::Postgres(server) => server.pg_ctl("stop"),
            PrivateServer::MySql(server) => server.stop(),
        }
    }

    pub fn start_again(&mut self) {
        match self {
            PrivateServer::Postgres(server) => server.pg_ctl("start"),
            PrivateServer::MySql(server) => server.start_again(),
        }
    }

    /// A migrated test database on this server.
    pub async fn test_db(&self) -> TestDb {
        match self {
            PrivateServer::Postgres(server) => TestDb::on_server(&server.url).await,
            PrivateServer::MySql(server) => {
                let admin = mysql_app_pool(&server.url).await;
                sqlx::raw_sql("CREATE DATABASE taskrunner")
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
                let url = server.url.replace("/mysql", "/taskrunner");
                let store = Store::open(&url, Purpose::Migrate).unwrap();
                store.migrate().await.expect("migrating");
                TestDb {
                    backend: Backend::MySql,
                    url: url.clone(),
                    store,
                    scratch: Scratch::new("mariadb-private"),
                    raw: Raw::MySql(mysql_app_pool(&url).await),
                }
            }
        }
    }
}

impl TestDb {
    /// A migrated database on a given PostgreSQL server (a `PrivatePostgres`).
    pub async fn on_server(url: &str) -> TestDb {
        let scratch = Scratch::new("pg-private");
        let store = Store::open(url, Purpose::Migrate).unwrap();
        store.migrate().await.expect("migrating");
        let raw = Raw::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .unwrap(),
        );
        TestDb {
            backend: Backend::Postgres,
            url: url.to_string(),
            store,
            scratch,
            raw,
        }
    }
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Zombie children of `pid`.
pub fn zombie_children(pid: i32) -> Vec<i32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z")
            && fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid)
        {
            zombies.push(child);
        }
    }
    zombies
}

/// Nanoseconds since the epoch (to compare with `date +%s%N` in task scripts).
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs `sql` with the `mysql` command line client (MariaDB's) on the
/// database of `url` (`mysql://user@host:port/db`), printing results
/// without headers, as an application's script would.
pub fn mysql_client(url: &str, sql: &str) -> std::io::Result<std::process::Output> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .to_string();
    let (authority, database) = rest.split_once('/').unwrap_or((&rest, ""));
    let (user, host_port) = authority.split_once('@').unwrap_or(("root", authority));
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "3306"));
    Command::new("mariadb")
        .args([
            "--no-defaults",
            "-N",
            "-B",
            "-h",
            host,
            "-P",
            port,
            "-u",
            user,
            database,
            "-e",
            sql,
        ])
        .output()
}

/// The backend's 64-bit integer type in a CAST.
pub fn bigint(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite | Backend::Postgres => "BIGINT",
        Backend::MySql => "SIGNED",
    }
}

/// The `lock retries` a running daemon reports in `status` (0 when none).
pub fn lock_retries(daemon: &Daemon) -> u64 {
    let output = Command::new(CLI)
        .arg("--config")
        .arg(&daemon.config)
        .arg("status")
        .output()
        .expect("running taskrunner-cli status");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("lock retries: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
