//! A test's own database on each backend, and SQL run on it as an
//! application would run it.

use std::process::Command;

use taskrunner::request::{Request, RequestId};
use taskrunner::store::{Purpose, Store};

use super::{Backend, Scratch};

/// A fresh, migrated request table for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub store: Store,
    pub scratch: Scratch,
    pub(super) raw: Raw,
}

pub(super) enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

impl Raw {
    /// A pool on `url` as an application opens one (SQLite: the file made
    /// when missing).
    async fn connect(backend: Backend, url: &str) -> Raw {
        match backend {
            Backend::Sqlite => Raw::Sqlite(
                sqlx::SqlitePool::connect_with(
                    std::str::FromStr::from_str(url)
                        .map(|o: sqlx::sqlite::SqliteConnectOptions| o.create_if_missing(true))
                        .unwrap(),
                )
                .await
                .unwrap(),
            ),
            Backend::Postgres => Raw::Postgres(
                sqlx::PgPool::connect(url)
                    .await
                    .expect("connecting to the test server"),
            ),
            Backend::MySql => Raw::MySql(mysql_app_pool(url).await),
        }
    }

    async fn execute(&self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            Raw::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
    }

    async fn close(&self) {
        match self {
            Raw::Sqlite(pool) => pool.close().await,
            Raw::Postgres(pool) => pool.close().await,
            Raw::MySql(pool) => pool.close().await,
        }
    }
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

    /// An empty database (a SQLite file not yet created, a PostgreSQL or
    /// MariaDB database without tables).
    pub async fn unmigrated(backend: Backend) -> TestDb {
        let scratch = Scratch::new(match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "pg",
            Backend::MySql => "my",
        });
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", scratch.join("requests.db").display()),
            Backend::Postgres | Backend::MySql => {
                let admin_url = match backend {
                    Backend::Postgres => postgres_admin_url(),
                    Backend::Sqlite | Backend::MySql => mysql_admin_url(),
                };
                let name = database_name(&scratch);
                let admin = Raw::connect(backend, &admin_url).await;
                // One statement each: PostgreSQL creates no database in a
                // transaction.
                for statement in [
                    format!("DROP DATABASE IF EXISTS {name}"),
                    format!("CREATE DATABASE {name}"),
                ] {
                    admin.execute(&statement).await.unwrap();
                }
                admin.close().await;
                let base = admin_url.rsplit_once('/').unwrap().0;
                format!("{base}/{name}")
            }
        };
        TestDb::at(backend, url, scratch).await
    }

    /// A migrated SQLite database in the file `path`, which `scratch` holds
    /// (for example on a small file system mounted in it).
    pub async fn sqlite_file(scratch: Scratch, path: &std::path::Path) -> TestDb {
        let url = format!("sqlite://{}", path.display());
        let db = TestDb::at(Backend::Sqlite, url, scratch).await;
        db.store.migrate().await.expect("migrating");
        db
    }

    async fn at(backend: Backend, url: String, scratch: Scratch) -> TestDb {
        let store = Store::open(&url, Purpose::Migrate).unwrap();
        let raw = Raw::connect(backend, &url).await;
        TestDb {
            backend,
            url,
            store,
            scratch,
            raw,
        }
    }

    /// Another connection holding what an update of row `id` needs until
    /// [`HeldRow::release`]: the row's lock on PostgreSQL and MariaDB
    /// (`SELECT … FOR UPDATE`), the database's write lock on SQLite
    /// (`BEGIN IMMEDIATE`). Reads of the row go on meanwhile.
    pub async fn hold_row(&self, id: RequestId) -> HeldRow {
        self.hold_after(&match self.backend {
            Backend::Sqlite => "SELECT 1".to_string(),
            Backend::Postgres | Backend::MySql => {
                format!("SELECT id FROM task_runner_requests WHERE id = {id} FOR UPDATE")
            }
        })
        .await
    }

    /// Another connection that runs `sql` in a transaction and holds it
    /// open until [`HeldRow::release`] commits it, with the locks `sql`
    /// took: an application's transaction that has not ended yet.
    pub async fn hold_after(&self, sql: &str) -> HeldRow {
        use sqlx::Connection;
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
                HeldRow::Sqlite(connection)
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql("BEGIN")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
                HeldRow::Postgres(connection)
            }
            Backend::MySql => {
                let mut connection = sqlx::MySqlConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql("BEGIN")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
                HeldRow::MySql(connection)
            }
        }
    }

    /// Another connection holding `table` from every reader (and writer)
    /// until [`HeldTable::release`]: `LOCK TABLE … IN ACCESS EXCLUSIVE
    /// MODE` on PostgreSQL, `LOCK TABLES … WRITE` on MariaDB. Not SQLite
    /// (its readers never wait).
    pub async fn hold_table(&self, table: &str) -> HeldTable {
        use sqlx::Connection;
        match self.backend {
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url).await.unwrap();
                let lock = format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
                sqlx::raw_sql(sqlx::AssertSqlSafe(lock))
                    .execute(&mut connection)
                    .await
                    .unwrap();
                HeldTable::Postgres(connection)
            }
            Backend::MySql => {
                let mut connection = sqlx::MySqlConnection::connect(&self.url).await.unwrap();
                let lock = format!("LOCK TABLES {table} WRITE");
                sqlx::raw_sql(sqlx::AssertSqlSafe(lock))
                    .execute(&mut connection)
                    .await
                    .unwrap();
                HeldTable::MySql(connection)
            }
            Backend::Sqlite => panic!("SQLite's readers do not wait for a lock"),
        }
    }

    /// Runs SQL as an application would (no parameters).
    pub async fn execute(&self, sql: &str) {
        self.raw
            .execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates an application's table `table` (an `id` key and `column`)
    /// whose `column` is a foreign key to `referenced (id)`, with
    /// `on_delete` (`""` for none, or e.g. `"ON DELETE CASCADE"`).
    pub async fn create_referencing_table(
        &self,
        table: &str,
        column: &str,
        referenced: &str,
        on_delete: &str,
    ) {
        let (id, engine) = match self.backend {
            Backend::Sqlite => ("id INTEGER PRIMARY KEY", ""),
            Backend::Postgres => ("id BIGSERIAL PRIMARY KEY", ""),
            Backend::MySql => ("id BIGINT AUTO_INCREMENT PRIMARY KEY", " ENGINE = InnoDB"),
        };
        self.execute(&format!(
            "CREATE TABLE {table} ({id}, {column} BIGINT, \
               FOREIGN KEY ({column}) REFERENCES {referenced} (id) {on_delete}){engine}"
        ))
        .await;
    }

    /// Runs SQL as an application would and returns the error's message,
    /// if any.
    pub async fn try_execute(&self, sql: &str) -> Result<(), String> {
        self.raw.execute(sql).await.map_err(|e| e.to_string())
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
        let row = super::NewRow::new(task);
        self.insert_row(match options {
            Some(options) => row.options(options),
            None => row,
        })
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
}

impl TestDb {
    /// A connection of the test's own that has run `sql` (a lock taken, a
    /// transaction begun), held until the value is dropped: what another
    /// process would hold.
    pub async fn holding(&self, sql: &str) -> Box<dyn std::any::Any> {
        use sqlx::Connection;
        async fn held<C: Connection + 'static>(url: &str, sql: &str) -> Box<dyn std::any::Any>
        where
            for<'c> &'c mut C: sqlx::Executor<'c>,
        {
            let mut connection = C::connect(url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&mut connection)
                .await
                .unwrap();
            Box::new(connection)
        }
        match self.backend {
            Backend::Sqlite => held::<sqlx::SqliteConnection>(&self.url, sql).await,
            Backend::Postgres => held::<sqlx::PgConnection>(&self.url, sql).await,
            Backend::MySql => held::<sqlx::MySqlConnection>(&self.url, sql).await,
        }
    }

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

/// The server database of a test: named after its scratch directory.
fn database_name(scratch: &Scratch) -> String {
    let dir = scratch.path.file_name().unwrap().to_string_lossy();
    format!("taskrunner_test_{}", dir.replace('-', "_"))
}

/// SQL string literal.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A table of `n` rows, its column `i` numbering them 1..=n, to insert
/// from: `INSERT … SELECT … FROM {series}`.
pub fn series(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!("generate_series(1, {n}) AS s(i)"),
        // MariaDB's Sequence engine.
        Backend::MySql => format!("(SELECT seq AS i FROM seq_1_to_{n}) AS s"),
        Backend::Sqlite => format!(
            "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) SELECT i FROM n) AS s"
        ),
    }
}

/// The backend's 64-bit integer type in a CAST.
pub fn bigint(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite | Backend::Postgres => "BIGINT",
        Backend::MySql => "SIGNED",
    }
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

/// A lock held by [`TestDb::hold_row`].
pub enum HeldRow {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
}

impl HeldRow {
    /// Ends the transaction, which lets the waiting writers on.
    pub async fn release(self) {
        match self {
            HeldRow::Sqlite(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(|_| ()),
            HeldRow::Postgres(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(|_| ()),
            HeldRow::MySql(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(|_| ()),
        }
        .unwrap();
    }
}

/// A lock held by [`TestDb::hold_table`].
pub enum HeldTable {
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
}

impl HeldTable {
    /// Lets the waiting readers and writers on.
    pub async fn release(self) {
        match self {
            HeldTable::Postgres(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(|_| ()),
            HeldTable::MySql(mut c) => sqlx::raw_sql("UNLOCK TABLES")
                .execute(&mut c)
                .await
                .map(|_| ()),
        }
        .unwrap();
    }
}

/// Migration 0004 (the triggers that refuse rows that can never run), as
/// each backend's file has it.
pub fn migration_0004(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => include_str!("../../migrations/sqlite/0004_rows_that_can_never_run.sql"),
        Backend::Postgres => {
            include_str!("../../migrations/postgres/0004_rows_that_can_never_run.sql")
        }
        Backend::MySql => include_str!("../../migrations/mysql/0004_rows_that_can_never_run.sql"),
    }
}

impl TestDb {
    /// The triggers as they were before migration 0013 (0004's rules
    /// alone), to write rows an application could write before it: a
    /// callback name longer than 255 characters, say.
    pub async fn with_the_rules_before_0013(&self) {
        let (requests, batches) = match self.backend {
            Backend::Postgres => (" ON task_runner_requests", " ON task_runner_batches"),
            Backend::Sqlite | Backend::MySql => ("", ""),
        };
        for trigger in ["check_insert", "check_update"] {
            self.execute(&format!(
                "DROP TRIGGER task_runner_requests_{trigger}{requests}"
            ))
            .await;
            if self.backend != Backend::MySql {
                self.execute(&format!(
                    "DROP TRIGGER task_runner_batches_{trigger}{batches}"
                ))
                .await;
            }
        }
        self.execute(migration_0004(self.backend)).await;
    }
}
