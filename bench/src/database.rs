//! Scratch request tables: a SQLite file, a PostgreSQL database or a
//! MariaDB database per case, migrated by taskrunner's own library, and the
//! raw SQL the bench runs on them (bulk inserts, counts, timings read back
//! from the rows).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use anyhow::{Context, Result};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::AssertSqlSafe;
use taskrunner::store::{Purpose, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MariaDB (or MySQL), through `mysql://` URLs.
    #[value(alias = "mariadb")]
    Mysql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MariaDB",
        }
    }
}

/// What every measurement shares: the binaries, a scratch directory, and the
/// PostgreSQL and MariaDB servers to create databases on.
pub struct Bench {
    pub bin_dir: PathBuf,
    pub scratch: PathBuf,
    postgres_admin_url: Option<String>,
    mysql_admin_url: Option<String>,
    counter: Mutex<u32>,
    /// Server databases created so far, dropped by [`Bench::cleanup`].
    created: Mutex<Vec<(Backend, String)>>,
}

impl Bench {
    pub fn new(
        bin_dir: PathBuf,
        postgres_admin_url: Option<String>,
        mysql_admin_url: Option<String>,
    ) -> Result<Bench> {
        let scratch = std::env::temp_dir().join(format!("taskrunner-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Bench {
            bin_dir,
            scratch,
            postgres_admin_url,
            mysql_admin_url,
            counter: Mutex::new(0),
            created: Mutex::new(Vec::new()),
        })
    }

    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A new empty directory under the scratch directory.
    pub fn case_dir(&self, name: &str) -> Result<PathBuf> {
        let number = {
            let mut counter = self.counter.lock().unwrap_or_else(|e| e.into_inner());
            *counter += 1;
            *counter
        };
        let dir = self.scratch.join(format!("{number:02}-{name}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// A fresh request table, migrated by taskrunner's library.
    pub async fn database(&self, backend: Backend, dir: &Path) -> Result<Database> {
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.join("requests.db").display()),
            Backend::Postgres | Backend::Mysql => {
                let name = format!(
                    "taskrunner_bench_{}_{}",
                    std::process::id(),
                    dir.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .replace('-', "_")
                );
                let admin_url = self.admin_url(backend)?;
                let create = format!("CREATE DATABASE {name}");
                self.run_as_admin(backend, &create)
                    .await
                    .with_context(|| format!("creating database {name} on {admin_url}"))?;
                self.created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((backend, name.clone()));
                with_database(admin_url, &name)
            }
        };
        let store = Store::open(&url, Purpose::Migrate)?;
        store.migrate().await?;
        store.close().await;
        let raw = match backend {
            Backend::Sqlite => Raw::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        SqliteConnectOptions::from_str(&url)?
                            .busy_timeout(std::time::Duration::from_secs(30)),
                    )
                    .await?,
            ),
            Backend::Postgres => Raw::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(PgConnectOptions::from_str(&url)?)
                    .await?,
            ),
            // sqlx's sessions are in UTC, with `||` as concatenation.
            Backend::Mysql => Raw::Mysql(
                MySqlPoolOptions::new()
                    .max_connections(1)
                    .connect_with(MySqlConnectOptions::from_str(&url)?)
                    .await?,
            ),
        };
        Ok(Database { backend, url, raw })
    }

    /// The server URL the bench creates `backend`'s databases on.
    fn admin_url(&self, backend: Backend) -> Result<&str> {
        match backend {
            Backend::Sqlite => anyhow::bail!("SQLite has no server"),
            Backend::Postgres => self
                .postgres_admin_url
                .as_deref()
                .context("no PostgreSQL server configured"),
            Backend::Mysql => self
                .mysql_admin_url
                .as_deref()
                .context("no MariaDB server configured"),
        }
    }

    /// Runs one statement on `backend`'s server, on a connection of its own.
    async fn run_as_admin(&self, backend: Backend, sql: &str) -> Result<()> {
        let admin_url = self.admin_url(backend)?;
        let sql = AssertSqlSafe(sql.to_string());
        match backend {
            Backend::Sqlite => unreachable!("admin_url refuses SQLite"),
            Backend::Postgres => {
                let admin = PgPool::connect(admin_url)
                    .await
                    .with_context(|| format!("connecting to {admin_url}"))?;
                let result = sqlx::query(sql).execute(&admin).await;
                admin.close().await;
                result?;
            }
            Backend::Mysql => {
                let admin = MySqlPool::connect(admin_url)
                    .await
                    .with_context(|| format!("connecting to {admin_url}"))?;
                let result = sqlx::query(sql).execute(&admin).await;
                admin.close().await;
                result?;
            }
        }
        Ok(())
    }

    /// Drops the server databases and removes the scratch directory.
    pub async fn cleanup(&self) {
        let names = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        for (backend, name) in names {
            let drop = match backend {
                Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                _ => format!("DROP DATABASE IF EXISTS {name}"),
            };
            if let Err(error) = self.run_as_admin(backend, &drop).await {
                eprintln!("taskrunner-bench: could not drop database {name}: {error:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }

    /// The MariaDB server's version and durability, for the report.
    pub async fn mysql_version(&self) -> Option<String> {
        let admin = MySqlPool::connect(self.mysql_admin_url.as_deref()?)
            .await
            .ok()?;
        let row: (String, i64) =
            sqlx::query_as("SELECT VERSION(), CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)")
                .fetch_one(&admin)
                .await
                .ok()?;
        admin.close().await;
        Some(format!(
            "{} (innodb_flush_log_at_trx_commit {})",
            row.0, row.1
        ))
    }

    /// The PostgreSQL server's version, for the report.
    pub async fn postgres_version(&self) -> Option<String> {
        let admin = PgPool::connect(self.postgres_admin_url.as_deref()?)
            .await
            .ok()?;
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&admin)
            .await
            .ok()?;
        let fsync: String = sqlx::query_scalar("SHOW fsync")
            .fetch_one(&admin)
            .await
            .ok()?;
        admin.close().await;
        Some(format!("{version} (fsync {fsync})"))
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let host_start = url.find("://").map_or(0, |index| index + 3);
    let (head, tail) = url.split_at(host_start);
    let query = tail.find('?').map_or("", |index| &tail[index..]);
    let authority = tail.split(['/', '?']).next().unwrap_or_default();
    format!("{head}{authority}/{name}{query}")
}

enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    Mysql(MySqlPool),
}

/// One scratch request table.
pub struct Database {
    pub backend: Backend,
    pub url: String,
    raw: Raw,
}

impl Database {
    pub async fn execute(&self, sql: &str) -> Result<u64> {
        let text = || AssertSqlSafe(sql.to_string());
        let result = match &self.raw {
            Raw::Sqlite(pool) => sqlx::query(text())
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
            Raw::Postgres(pool) => sqlx::query(text())
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
            Raw::Mysql(pool) => sqlx::query(text())
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
        };
        result.with_context(|| format!("running {sql}"))
    }

    /// The one integer `sql` selects.
    pub async fn integer(&self, sql: &str) -> Result<i64> {
        let result = match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_one(pool)
                    .await
            }
            Raw::Postgres(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_one(pool)
                    .await
            }
            Raw::Mysql(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_one(pool)
                    .await
            }
        };
        result.with_context(|| format!("running {sql}"))
    }

    /// The one float column of every row `sql` selects.
    pub async fn floats(&self, sql: &str) -> Result<Vec<f64>> {
        let result = match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_all(pool)
                    .await
            }
            Raw::Postgres(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_all(pool)
                    .await
            }
            Raw::Mysql(pool) => {
                sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
                    .fetch_all(pool)
                    .await
            }
        };
        result.with_context(|| format!("running {sql}"))
    }

    /// `end - start` of two timestamp expressions, in seconds, in this dialect.
    pub fn seconds_between(&self, start: &str, end: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("((julianday({end}) - julianday({start})) * 86400.0)"),
            Backend::Postgres => format!("extract(epoch from ({end}) - ({start}))::float8"),
            Backend::Mysql => {
                format!("CAST(TIMESTAMPDIFF(MICROSECOND, {start}, {end}) / 1e6 AS DOUBLE)")
            }
        }
    }

    /// A timestamp expression as seconds since the Unix epoch (UTC, as
    /// every backend stores it), in this dialect.
    pub fn epoch_seconds(&self, timestamp: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("((julianday({timestamp}) - 2440587.5) * 86400.0)"),
            Backend::Postgres => format!("extract(epoch from {timestamp})::float8"),
            Backend::Mysql => format!(
                "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {timestamp}) / 1e6 AS DOUBLE)"
            ),
        }
    }

    /// Inserts `count` rows with the given column values (SQL expressions,
    /// which may use the row's number `n`, from 1) in one statement.
    pub async fn bulk_insert(&self, count: usize, columns: &[(&str, &str)]) -> Result<u64> {
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let values: Vec<&str> = columns.iter().map(|(_, value)| *value).collect();
        let (names, values) = (names.join(", "), values.join(", "));
        let sql = match self.backend {
            Backend::Sqlite => format!(
                "WITH RECURSIVE series(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM series WHERE n < {count}) \
                 INSERT INTO task_runner_requests ({names}) SELECT {values} FROM series"
            ),
            Backend::Postgres => format!(
                "INSERT INTO task_runner_requests ({names}) SELECT {values} FROM generate_series(1, {count}) AS series(n)"
            ),
            // MariaDB's Sequence engine.
            Backend::Mysql => format!(
                "INSERT INTO task_runner_requests ({names}) SELECT {values} FROM (SELECT seq AS n FROM seq_1_to_{count}) AS series"
            ),
        };
        self.execute(&sql).await
    }

    /// Waits until `count` rows are FINISHED; fails on a deadline or when a
    /// row ends any other way (which would mean the bench is broken).
    pub async fn wait_finished(&self, count: usize, timeout: std::time::Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let finished = self
                .integer("SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'")
                .await?;
            if finished as usize >= count {
                return Ok(());
            }
            let failed = self
                .integer(
                    "SELECT count(*) FROM task_runner_requests \
                      WHERE result IS NOT NULL AND result NOT IN ('FINISHED', 'RUNNING')",
                )
                .await?;
            if failed > 0 {
                anyhow::bail!(
                    "{failed} requests did not finish (see `result_text` in {})",
                    self.url
                );
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("only {finished} of {count} requests finished within {timeout:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    pub async fn close(self) {
        match self.raw {
            Raw::Sqlite(pool) => pool.close().await,
            Raw::Postgres(pool) => pool.close().await,
            Raw::Mysql(pool) => pool.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_name() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
