//! Typed enqueue for Rust applications (cargo feature `enqueue`): insert a
//! request for a task type with its options struct, through the
//! application's own sqlx pool, connection or transaction, on SQLite,
//! PostgreSQL or MariaDB/MySQL.
//!
//! It is one `INSERT … RETURNING id` into `task_runner_requests`, naming only
//! the columns it sets (the table's defaults do the rest), so inside the
//! caller's transaction the request exists exactly when the transaction
//! commits (MySQL has no `RETURNING`: the insert, then its
//! `LAST_INSERT_ID()`). The daemon notices the new row by itself
//! (PostgreSQL: the table's NOTIFY trigger; SQLite: within about 100 ms;
//! MySQL: within 200 ms).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//! use task_sdk::{Context, Enqueue, Task};
//!
//! #[derive(Serialize, Deserialize)]
//! struct ResizeOptions {
//!     path: String,
//!     width: u32,
//! }
//!
//! struct Resize;
//!
//! impl Task for Resize {
//!     const NAME: &'static str = "Resize";
//!     type Options = ResizeOptions;
//!     fn run(&self, options: ResizeOptions, _: &Context) -> task_sdk::Result<String> {
//!         Ok(format!("resized {} to {}px", options.path, options.width))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
//! # sqlx::query("CREATE TABLE task_runner_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, \
//! #     task_class_name TEXT NOT NULL, options TEXT, tries INTEGER NOT NULL DEFAULT 0, \
//! #     try_limit INTEGER NOT NULL DEFAULT 5, priority INTEGER NOT NULL DEFAULT 0, delay_until DATETIME)")
//! #     .execute(&pool).await?;
//! // `pool` is the application's own `sqlx::SqlitePool` (or `PgPool`, `MySqlPool`).
//! let options = ResizeOptions { path: "photos/1.jpg".into(), width: 640 };
//! let id = Enqueue::new::<Resize>(&options).try_limit(3).insert(&pool).await?;
//!
//! // Inside the application's transaction: the request exists only if it commits.
//! let mut tx = pool.begin().await?;
//! let later = Enqueue::new::<Resize>(&options)
//!     .delay(Duration::from_secs(60))
//!     .insert(&mut *tx)
//!     .await?;
//! tx.rollback().await?;
//! # let count: i64 = sqlx::query_scalar("SELECT count(*) FROM task_runner_requests").fetch_one(&pool).await?;
//! # assert_eq!((id, count), (1, 1));
//! # let _ = later;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, Executor};

use crate::Task;

/// A request to insert: a task type name, its options as YAML, and when and
/// how often it may run. Build it with [`Enqueue::new`] (typed) or
/// [`Enqueue::named`], then [`insert`](Enqueue::insert) it.
#[derive(Debug, Clone)]
#[must_use = "an Enqueue does nothing until it is inserted"]
pub struct Enqueue {
    task: String,
    /// The options as YAML (`None`: no options, NULL), or why they could not
    /// be written; reported by `insert`, so that the builder reads as one
    /// expression.
    options: Result<Option<String>, String>,
    delay: Option<Duration>,
    try_limit: Option<u32>,
    priority: Option<i32>,
    batch: Option<i64>,
    on_success: Option<String>,
    on_failure: Option<String>,
}

impl Enqueue {
    /// A request for task type `T` with its typed options, which are written
    /// as YAML and read back by `T` in the task process.
    pub fn new<T: Task>(options: &T::Options) -> Enqueue
    where
        T::Options: Serialize,
    {
        Enqueue::named(T::NAME, options)
    }

    /// A request for a task type by name, for applications that do not link
    /// the type itself: `options` may be any serializable value (a struct, a
    /// map, `()` for none).
    pub fn named(task: impl Into<String>, options: &impl Serialize) -> Enqueue {
        let options = serde_yaml::to_value(options)
            .and_then(|value| match value {
                serde_yaml::Value::Null => Ok(None),
                value => serde_yaml::to_string(&value).map(Some),
            })
            .map_err(|error| error.to_string());
        Enqueue {
            task: task.into(),
            options,
            delay: None,
            try_limit: None,
            priority: None,
            batch: None,
            on_success: None,
            on_failure: None,
        }
    }

    /// Not run before `delay` from now (by the database's clock); at most
    /// [`LONGEST_DELAY`], else [`insert`](Enqueue::insert) refuses.
    pub fn delay(mut self, delay: Duration) -> Enqueue {
        self.delay = Some(delay);
        self
    }

    /// Tries allowed (the table's default is 5).
    pub fn try_limit(mut self, try_limit: u32) -> Enqueue {
        self.try_limit = Some(try_limit);
        self
    }

    /// Runs before lower priorities (the table's default is 0).
    pub fn priority(mut self, priority: i32) -> Enqueue {
        self.priority = Some(priority);
        self
    }

    /// A member of batch `batch_id` (refused by the database once the batch
    /// has ended). A running member adds members to its own batch with
    /// `context.batch_id`, inserting in the application's own transaction.
    pub fn batch(mut self, batch_id: i64) -> Enqueue {
        self.batch = Some(batch_id);
        self
    }

    /// Task type `T` runs once when this request FINISHED; it gets the
    /// request's options and a `parent:` summary ([`crate::RequestCallback`]).
    pub fn on_success<T: Task>(self) -> Enqueue {
        self.on_success_named(T::NAME)
    }

    /// [`on_success`](Enqueue::on_success) by type name.
    pub fn on_success_named(mut self, task: impl Into<String>) -> Enqueue {
        self.on_success = Some(task.into());
        self
    }

    /// Task type `T` runs once when this request is exhausted or REJECTED
    /// (never after a cancel).
    pub fn on_failure<T: Task>(self) -> Enqueue {
        self.on_failure_named(T::NAME)
    }

    /// [`on_failure`](Enqueue::on_failure) by type name.
    pub fn on_failure_named(mut self, task: impl Into<String>) -> Enqueue {
        self.on_failure = Some(task.into());
        self
    }

    /// The task type name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The options as they will be stored (YAML), or `None` for none.
    pub fn options_yaml(&self) -> Option<&str> {
        self.options.as_ref().ok().and_then(|yaml| yaml.as_deref())
    }

    /// Inserts the request and returns its id. `executor` is anything sqlx
    /// runs queries on, for SQLite, PostgreSQL or MySQL: a pool (`&pool`), a
    /// connection (`&mut conn`), or the caller's transaction (`&mut *tx`),
    /// in which case the request exists only once the transaction commits.
    pub async fn insert<'e, E>(&self, executor: E) -> Result<i64, Error>
    where
        E: Executor<'e> + 'e,
        E::Database: Backend,
    {
        let options = self.options.clone().map_err(Error::Options)?;
        name_fits("task type", Some(&self.task))?;
        name_fits("on_success", self.on_success.as_ref())?;
        name_fits("on_failure", self.on_failure.as_ref())?;
        if self.delay.is_some_and(|delay| delay > LONGEST_DELAY) {
            return Err(Error::Options(format!(
                "a delay of {} s is more than 50 years",
                self.delay.unwrap_or_default().as_secs()
            )));
        }
        let try_limit = match self.try_limit {
            Some(limit) => Some(
                i32::try_from(limit)
                    .map_err(|_| Error::Options(format!("try limit {limit} is too large")))?,
            ),
            None => None,
        };
        let values = Values {
            task: self.task.clone(),
            options,
            try_limit,
            priority: self.priority,
            delay_seconds: self.delay.map(|delay| delay.as_secs_f64()),
            batch: self.batch,
            on_success: self.on_success.clone(),
            on_failure: self.on_failure.clone(),
        };
        <E::Database as Backend>::insert(executor, values)
            .await
            .map_err(Error::Database)
    }

    /// Connects to `database_url` (`sqlite://…`, `postgres://…` or
    /// `mysql://…`, the URL the daemon uses), inserts the request in a
    /// transaction it commits, and disconnects. For a single
    /// request from a script; an application with a pool should use
    /// [`insert`](Enqueue::insert). A missing SQLite file is an error, not
    /// created.
    pub async fn insert_url(&self, database_url: &str) -> Result<i64, Error> {
        if database_url.starts_with("sqlite:") {
            let mut connection = sqlx::SqliteConnection::connect(database_url)
                .await
                .map_err(Error::Database)?;
            // Committed here, whatever the server's autocommit default (a
            // MariaDB server set to `autocommit = 0` dropped a single
            // INSERT at the disconnect).
            let mut transaction = connection.begin().await.map_err(Error::Database)?;
            let id = self.insert(&mut *transaction).await?;
            transaction.commit().await.map_err(Error::Database)?;
            connection.close().await.map_err(Error::Database)?;
            Ok(id)
        } else if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
            let mut connection = sqlx::PgConnection::connect(database_url)
                .await
                .map_err(Error::Database)?;
            // Committed here, whatever the server's autocommit default (a
            // MariaDB server set to `autocommit = 0` dropped a single
            // INSERT at the disconnect).
            let mut transaction = connection.begin().await.map_err(Error::Database)?;
            let id = self.insert(&mut *transaction).await?;
            transaction.commit().await.map_err(Error::Database)?;
            connection.close().await.map_err(Error::Database)?;
            Ok(id)
        } else if database_url.starts_with("mysql:") || database_url.starts_with("mariadb:") {
            let url = database_url.replacen("mariadb:", "mysql:", 1);
            let mut connection = sqlx::MySqlConnection::connect(&url)
                .await
                .map_err(Error::Database)?;
            // Committed here, whatever the server's autocommit default (a
            // MariaDB server set to `autocommit = 0` dropped a single
            // INSERT at the disconnect).
            let mut transaction = connection.begin().await.map_err(Error::Database)?;
            let id = self.insert(&mut *transaction).await?;
            transaction.commit().await.map_err(Error::Database)?;
            connection.close().await.map_err(Error::Database)?;
            Ok(id)
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = database_url.split(':').next().unwrap_or_default();
            Err(Error::Url(format!(
                "unsupported database URL scheme `{scheme}`: use sqlite://, postgres:// or mysql://"
            )))
        }
    }
}

/// The longest task type name (`task_class_name`, `on_success`, …): the
/// columns hold 255 characters.
pub const LONGEST_NAME: usize = 255;

/// Refuses a type name (`what`) that is empty or longer than
/// [`LONGEST_NAME`]: MariaDB refuses the row, and on SQLite and PostgreSQL
/// a callback of such a name could not be made when its parent ends.
fn name_fits(what: &str, name: Option<&String>) -> Result<(), Error> {
    let Some(name) = name else {
        return Ok(());
    };
    let length = name.chars().count();
    if name.trim().is_empty() {
        return Err(Error::Options(format!("the {what} name is empty")));
    }
    if length > LONGEST_NAME {
        return Err(Error::Options(format!(
            "the {what} name is {length} characters long, more than {LONGEST_NAME}"
        )));
    }
    Ok(())
}

/// The longest [`Enqueue::delay`]: fifty years, as `taskrunner-cli enqueue
/// --delay` allows. Further ahead is a mistake, and past the year 9999
/// SQLite's time arithmetic gives no time at all, which would run the
/// request at once.
pub const LONGEST_DELAY: Duration = Duration::from_secs(50 * 31_557_600);

/// Why a request was not inserted.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A value refused before the insert: options that cannot be written
    /// as YAML, an empty or too long name, a value out of range.
    Options(String),
    /// The database refused or could not be reached.
    Database(sqlx::Error),
    /// The URL names no supported database.
    Url(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Options(message) => write!(f, "the request was not inserted: {message}"),
            Error::Database(_) => f.write_str("inserting into task_runner_requests"),
            Error::Url(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database(error) => Some(error),
            _ => None,
        }
    }
}

/// The column values of one insert.
#[doc(hidden)]
pub struct Values {
    task: String,
    options: Option<String>,
    try_limit: Option<i32>,
    priority: Option<i32>,
    delay_seconds: Option<f64>,
    batch: Option<i64>,
    on_success: Option<String>,
    on_failure: Option<String>,
}

impl Values {
    /// `INSERT … RETURNING id` naming only the columns that are set, so that
    /// the table's defaults apply to the rest. `delay_until` is written with
    /// the database's clock, as the daemon compares it.
    fn sql(&self, now_plus_seconds: &str) -> String {
        let mut columns = vec!["task_class_name", "options"];
        let mut values = vec!["$1".to_string(), "$2".to_string()];
        let mut next = 3;
        let mut add = |column: &'static str, value: &dyn Fn(&str) -> String| {
            columns.push(column);
            values.push(value(&format!("${next}")));
            next += 1;
        };
        if self.try_limit.is_some() {
            add("try_limit", &|param| param.to_string());
        }
        if self.priority.is_some() {
            add("priority", &|param| param.to_string());
        }
        if self.delay_seconds.is_some() {
            add("delay_until", &|param| {
                now_plus_seconds.replace("{}", param)
            });
        }
        if self.batch.is_some() {
            add("batch_id", &|param| param.to_string());
        }
        if self.on_success.is_some() {
            add("on_success", &|param| param.to_string());
        }
        if self.on_failure.is_some() {
            add("on_failure", &|param| param.to_string());
        }
        format!(
            "INSERT INTO task_runner_requests ({}) VALUES ({}) RETURNING id",
            columns.join(", "),
            values.join(", ")
        )
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::MySql {}
}

/// The databases [`Enqueue::insert`] works with: [`sqlx::Sqlite`],
/// [`sqlx::Postgres`] and [`sqlx::MySql`] (sealed).
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    fn insert<'e, E>(
        executor: E,
        values: Values,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e;

    #[doc(hidden)]
    fn insert_batch<'e, E>(
        executor: E,
        batch: BatchValues,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e;

    #[doc(hidden)]
    fn seal_batch<'e, E>(
        executor: E,
        batch_id: i64,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<()>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e;

    #[doc(hidden)]
    fn insert_flow<'e, E>(
        executor: E,
        name: String,
        options: Option<String>,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e;
}

/// A flow to start: a row in `task_runner_flows` naming a flow that the
/// daemon's config or one of its programs declares ([`crate::Flow`]), with
/// its options (the store it starts with). A daemon takes it, snapshots
/// its definition and runs its steps; [`wait_for_flow`](crate::wait_for_flow)
/// waits for its end.
///
/// ```
/// # use serde::Serialize;
/// # use task_sdk::StartFlow;
/// #[derive(Serialize)]
/// struct Deploy { url: String, port: u16 }
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// // ... the application's own writes ...
/// let flow_id = StartFlow::new("deploy")
///     .options(&Deploy { url: "https://example.com/app.tar".into(), port: 8887 })
///     .insert(&mut *tx)
///     .await?;
/// tx.commit().await?; // the flow exists, and starts, only now
/// # let _ = flow_id; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a StartFlow does nothing until it is inserted"]
pub struct StartFlow {
    name: String,
    options: Result<Option<String>, String>,
}

impl StartFlow {
    /// The flow named `name`, with no options (the declared defaults apply).
    pub fn new(name: impl Into<String>) -> StartFlow {
        StartFlow {
            name: name.into(),
            options: Ok(None),
        }
    }

    /// Its options, typed: any serializable value that writes a YAML mapping.
    pub fn options(mut self, options: &impl Serialize) -> StartFlow {
        self.options = serde_yaml::to_value(options)
            .and_then(|value| match value {
                serde_yaml::Value::Null => Ok(None),
                value => serde_yaml::to_string(&value).map(Some),
            })
            .map_err(|error| error.to_string());
        self
    }

    /// Inserts the flow through `executor` (a pool, a connection, or the
    /// caller's transaction: then the flow exists once it commits) and
    /// returns its id.
    pub async fn insert<'e, E>(&self, executor: E) -> Result<i64, Error>
    where
        E: Executor<'e> + 'e,
        E::Database: Backend,
    {
        let options = self.options.clone().map_err(Error::Options)?;
        <E::Database as Backend>::insert_flow(executor, self.name.clone(), options)
            .await
            .map_err(Error::Database)
    }
}

/// The column values of a batch.
#[doc(hidden)]
pub struct BatchValues {
    name: Option<String>,
    options: Option<String>,
    on_complete: Option<String>,
    on_failure: Option<String>,
    fail_fast: bool,
    parent: Option<i64>,
}

/// A batch to insert: a job of many requests whose callback runs once
/// (`on_complete` when every member FINISHED, `on_failure` when the batch
/// failed). [`insert`](Batch::insert) writes the batch, its members and the
/// seal through the caller's connection or transaction: inside a
/// transaction, the whole batch exists only once it commits.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use task_sdk::{Batch, BatchCallback, Context, Enqueue, NoOptions, Task};
/// # #[derive(Serialize, Deserialize)] struct Frame { n: u32 }
/// # struct RenderFrame;
/// # impl Task for RenderFrame { const NAME: &'static str = "RenderFrame"; type Options = Frame;
/// #   fn run(&self, _: Frame, _: &Context) -> task_sdk::Result<String> { Ok(String::new()) } }
/// # struct Compose;
/// # impl Task for Compose { const NAME: &'static str = "Compose"; type Options = BatchCallback<NoOptions>;
/// #   fn run(&self, _: Self::Options, _: &Context) -> task_sdk::Result<String> { Ok(String::new()) } }
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// // ... the application's own writes ...
/// let batch_id = Batch::new()
///     .name("film 42")
///     .on_complete::<Compose>()
///     .members((1..=100).map(|n| Enqueue::new::<RenderFrame>(&Frame { n })))
///     .insert(&mut *tx)
///     .await?;
/// tx.commit().await?;
/// # let _ = batch_id; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a Batch does nothing until it is inserted"]
pub struct Batch {
    name: Option<String>,
    options: Result<Option<String>, String>,
    on_complete: Option<String>,
    on_failure: Option<String>,
    fail_fast: bool,
    parent: Option<i64>,
    members: Vec<Enqueue>,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

impl Batch {
    /// An empty, fail-fast batch.
    pub fn new() -> Batch {
        Batch {
            name: None,
            options: Ok(None),
            on_complete: None,
            on_failure: None,
            fail_fast: true,
            parent: None,
            members: Vec::new(),
        }
    }

    /// A name for people (`taskrunner-cli batch list`).
    pub fn name(mut self, name: impl Into<String>) -> Batch {
        self.name = Some(name.into());
        self
    }

    /// The batch's options, handed to its callbacks (read them with
    /// [`crate::BatchCallback`]).
    pub fn options(mut self, options: &impl Serialize) -> Batch {
        self.options = yaml(options);
        self
    }

    /// Task type `T` runs once when every member FINISHED.
    pub fn on_complete<T: Task>(self) -> Batch {
        self.on_complete_named(T::NAME)
    }

    /// [`on_complete`](Batch::on_complete) by type name.
    pub fn on_complete_named(mut self, task: impl Into<String>) -> Batch {
        self.on_complete = Some(task.into());
        self
    }

    /// Task type `T` runs once when the batch failed.
    pub fn on_failure<T: Task>(self) -> Batch {
        self.on_failure_named(T::NAME)
    }

    /// [`on_failure`](Batch::on_failure) by type name.
    pub fn on_failure_named(mut self, task: impl Into<String>) -> Batch {
        self.on_failure = Some(task.into());
        self
    }

    /// With `false`, every member ends before the batch is judged (default
    /// true: the first member that ends without FINISHED cancels the
    /// unstarted ones and fails the batch at once).
    pub fn fail_fast(mut self, fail_fast: bool) -> Batch {
        self.fail_fast = fail_fast;
        self
    }

    /// The batch whose callback creates this one (a chain): in a callback,
    /// `context.batch_id`.
    pub fn parent(mut self, batch_id: i64) -> Batch {
        self.parent = Some(batch_id);
        self
    }

    /// Adds a member.
    pub fn member(mut self, member: Enqueue) -> Batch {
        self.members.push(member);
        self
    }

    /// Adds members.
    pub fn members(mut self, members: impl IntoIterator<Item = Enqueue>) -> Batch {
        self.members.extend(members);
        self
    }

    /// Inserts the batch, its members, and seals it; returns its id.
    /// `connection` is a connection or the caller's transaction
    /// (`&mut *tx`), on SQLite, PostgreSQL or MySQL. All or nothing: in a
    /// transaction of its own (a savepoint within the caller's), so that a
    /// member refused (a bad name, options that cannot be written, the
    /// database's refusal) leaves no batch behind. (Before, on a plain
    /// connection, the batch and the members before it stayed: the members
    /// ran, and the batch, never sealed, never ended.)
    pub async fn insert<C>(&self, connection: &mut C) -> Result<i64, Error>
    where
        C: sqlx::Connection,
        C::Database: Backend,
        for<'c> &'c mut <C::Database as sqlx::Database>::Connection:
            Executor<'c, Database = C::Database>,
    {
        let mut transaction = connection.begin().await.map_err(Error::Database)?;
        let batch_id = self.insert_open(&mut *transaction).await?;
        for member in &self.members {
            member
                .clone()
                .batch(batch_id)
                .insert(&mut *transaction)
                .await?;
        }
        Batch::seal(&mut *transaction, batch_id).await?;
        transaction.commit().await.map_err(Error::Database)?;
        Ok(batch_id)
    }

    /// Inserts the batch alone, open (its members are not inserted): add
    /// members with [`Enqueue::batch`], then [`Batch::seal`] it.
    pub async fn insert_open<C>(&self, connection: &mut C) -> Result<i64, Error>
    where
        C: sqlx::Connection,
        C::Database: Backend,
        for<'c> &'c mut C: Executor<'c, Database = C::Database>,
    {
        name_fits("on_complete", self.on_complete.as_ref())?;
        name_fits("on_failure", self.on_failure.as_ref())?;
        let values = BatchValues {
            name: self.name.clone(),
            options: self.options.clone().map_err(Error::Options)?,
            on_complete: self.on_complete.clone(),
            on_failure: self.on_failure.clone(),
            fail_fast: self.fail_fast,
            parent: self.parent,
        };
        let batch_id = <C::Database as Backend>::insert_batch(&mut *connection, values)
            .await
            .map_err(Error::Database)?;
        Ok(batch_id)
    }

    /// Seals batch `batch_id`: no callback is made before; a batch whose
    /// members have all ended is ended by the daemon within a poll.
    pub async fn seal<C>(connection: &mut C, batch_id: i64) -> Result<(), Error>
    where
        C: sqlx::Connection,
        C::Database: Backend,
        for<'c> &'c mut C: Executor<'c, Database = C::Database>,
    {
        <C::Database as Backend>::seal_batch(&mut *connection, batch_id)
            .await
            .map_err(Error::Database)
    }
}

/// Options as YAML (`None` for none), or why they could not be written.
fn yaml(options: &impl Serialize) -> Result<Option<String>, String> {
    serde_yaml::to_value(options)
        .and_then(|value| match value {
            serde_yaml::Value::Null => Ok(None),
            value => serde_yaml::to_string(&value).map(Some),
        })
        .map_err(|error| format!("its options cannot be written as YAML: {error}"))
}

/// Binds the values in the order [`Values::sql`] numbers them; the same for
/// both backends, but sqlx needs the concrete database type to bind.
macro_rules! insert_for {
    ($database:ty, $now_plus_seconds:expr, $now:expr) => {
        impl Backend for $database {
            fn insert<'e, E>(
                executor: E,
                values: Values,
            ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
            where
                E: Executor<'e, Database = Self> + 'e,
            {
                let sql = values.sql($now_plus_seconds);
                let mut query = sqlx::query_scalar::<$database, i64>(AssertSqlSafe(sql))
                    .bind(values.task)
                    .bind(values.options);
                if let Some(try_limit) = values.try_limit {
                    query = query.bind(try_limit);
                }
                if let Some(priority) = values.priority {
                    query = query.bind(priority);
                }
                if let Some(seconds) = values.delay_seconds {
                    query = query.bind(seconds);
                }
                if let Some(batch) = values.batch {
                    query = query.bind(batch);
                }
                if let Some(task) = values.on_success {
                    query = query.bind(task);
                }
                if let Some(task) = values.on_failure {
                    query = query.bind(task);
                }
                Box::pin(query.fetch_one(executor))
            }

            fn insert_batch<'e, E>(
                executor: E,
                batch: BatchValues,
            ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
            where
                E: Executor<'e, Database = Self> + 'e,
            {
                let query = sqlx::query_scalar::<$database, i64>(
                    "INSERT INTO task_runner_batches \
                       (name, options, on_complete, on_failure, fail_fast, parent_batch_id) \
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                )
                .bind(batch.name)
                .bind(batch.options)
                .bind(batch.on_complete)
                .bind(batch.on_failure)
                .bind(batch.fail_fast)
                .bind(batch.parent);
                Box::pin(query.fetch_one(executor))
            }

            fn insert_flow<'e, E>(
                executor: E,
                name: String,
                options: Option<String>,
            ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
            where
                E: Executor<'e, Database = Self> + 'e,
            {
                let query = sqlx::query_scalar::<$database, i64>(
                    "INSERT INTO task_runner_flows (flow_name, options) VALUES ($1, $2) RETURNING id",
                )
                .bind(name)
                .bind(options);
                Box::pin(query.fetch_one(executor))
            }

            fn seal_batch<'e, E>(
                executor: E,
                batch_id: i64,
            ) -> Pin<Box<dyn Future<Output = sqlx::Result<()>> + Send + 'e>>
            where
                E: Executor<'e, Database = Self> + 'e,
            {
                let sql = format!(
                    "UPDATE task_runner_batches SET sealed_at = {} WHERE id = $1 AND sealed_at IS NULL",
                    $now
                );
                let query = sqlx::query::<$database>(AssertSqlSafe(sql)).bind(batch_id);
                Box::pin(async move { query.execute(executor).await.map(|_| ()) })
            }
        }
    };
}

// The same expressions as the daemon's store (daemon/src/store/sql.rs),
// to the millisecond. On PostgreSQL the clock is `clock_timestamp()`, the
// statement's time, not `now()`, the start of the application's
// transaction: a delay counted from a transaction that had run for longer
// than the delay let the row start as soon as it was committed.
insert_for!(
    sqlx::Sqlite,
    "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {}))",
    "strftime('%Y-%m-%d %H:%M:%f', 'now')"
);
insert_for!(
    sqlx::Postgres,
    "(clock_timestamp() + make_interval(secs => {}))",
    "clock_timestamp()"
);

/// `$N` (each used once, in order, as [`Values::sql`] writes them) as
/// MySQL's `?`, and no `RETURNING` (MySQL has none: the id is the insert's
/// `LAST_INSERT_ID()`).
fn mysql_statement(sql: &str) -> String {
    let sql = sql.strip_suffix(" RETURNING id").unwrap_or(sql);
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl Backend for sqlx::MySql {
    fn insert<'e, E>(
        executor: E,
        values: Values,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e,
    {
        // The session's clock (its local time, which the table's trigger
        // turns into UTC as it does for any time the session writes).
        let sql =
            mysql_statement(&values.sql("TIMESTAMPADD(MICROSECOND, ROUND({} * 1000000), NOW(6))"));
        let mut query = sqlx::query::<sqlx::MySql>(AssertSqlSafe(sql))
            .bind(values.task)
            .bind(values.options);
        if let Some(try_limit) = values.try_limit {
            query = query.bind(try_limit);
        }
        if let Some(priority) = values.priority {
            query = query.bind(priority);
        }
        if let Some(seconds) = values.delay_seconds {
            query = query.bind(seconds);
        }
        if let Some(batch) = values.batch {
            query = query.bind(batch);
        }
        if let Some(task) = values.on_success {
            query = query.bind(task);
        }
        if let Some(task) = values.on_failure {
            query = query.bind(task);
        }
        Box::pin(async move {
            let done = query.execute(executor).await?;
            Ok(done.last_insert_id() as i64)
        })
    }

    fn insert_batch<'e, E>(
        executor: E,
        batch: BatchValues,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e,
    {
        let query = sqlx::query::<sqlx::MySql>(
            "INSERT INTO task_runner_batches \
               (name, options, on_complete, on_failure, fail_fast, parent_batch_id) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(batch.name)
        .bind(batch.options)
        .bind(batch.on_complete)
        .bind(batch.on_failure)
        .bind(batch.fail_fast)
        .bind(batch.parent);
        Box::pin(async move {
            let done = query.execute(executor).await?;
            Ok(done.last_insert_id() as i64)
        })
    }

    fn insert_flow<'e, E>(
        executor: E,
        name: String,
        options: Option<String>,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<i64>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e,
    {
        let query = sqlx::query::<sqlx::MySql>(
            "INSERT INTO task_runner_flows (flow_name, options) VALUES (?, ?)",
        )
        .bind(name)
        .bind(options);
        Box::pin(async move {
            let done = query.execute(executor).await?;
            Ok(done.last_insert_id() as i64)
        })
    }

    fn seal_batch<'e, E>(
        executor: E,
        batch_id: i64,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<()>> + Send + 'e>>
    where
        E: Executor<'e, Database = Self> + 'e,
    {
        let query = sqlx::query::<sqlx::MySql>(
            "UPDATE task_runner_batches SET sealed_at = UTC_TIMESTAMP(6) \
              WHERE id = ? AND sealed_at IS NULL",
        )
        .bind(batch_id);
        Box::pin(async move { query.execute(executor).await.map(|_| ()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct CopyOptions {
        from: String,
        to: Vec<String>,
    }

    struct Copy;

    impl Task for Copy {
        const NAME: &'static str = "Copy";
        type Options = CopyOptions;
        fn run(&self, _: CopyOptions, _: &crate::Context) -> crate::Result<String> {
            Ok(String::new())
        }
    }

    async fn table() -> sqlx::SqlitePool {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        sqlx::query(
            "CREATE TABLE task_runner_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             task_class_name TEXT NOT NULL, options TEXT, try_limit INTEGER NOT NULL DEFAULT 5, \
             priority INTEGER NOT NULL DEFAULT 0, delay_until DATETIME)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool
    }

    #[test]
    fn mysql_statements_are_positional_without_returning() {
        assert_eq!(
            mysql_statement("INSERT INTO t (a, b, c) VALUES ($1, $2, now+$3) RETURNING id"),
            "INSERT INTO t (a, b, c) VALUES (?, ?, now+?)"
        );
    }

    #[test]
    fn only_the_columns_set_are_named() {
        let values = Values {
            task: "X".into(),
            options: None,
            try_limit: None,
            priority: Some(1),
            delay_seconds: Some(2.0),
            batch: None,
            on_success: None,
            on_failure: None,
        };
        assert_eq!(
            values.sql("now+{}"),
            "INSERT INTO task_runner_requests (task_class_name, options, priority, delay_until) VALUES ($1, $2, $3, now+$4) RETURNING id"
        );
    }

    #[tokio::test]
    async fn typed_options_round_trip_through_the_row() {
        let pool = table().await;
        let options = CopyOptions {
            from: "a".into(),
            to: vec!["b".into(), "c".into()],
        };
        let id = Enqueue::new::<Copy>(&options)
            .try_limit(2)
            .priority(7)
            .delay(Duration::from_secs(60))
            .insert(&pool)
            .await
            .unwrap();
        let (task, yaml, try_limit, priority, delayed): (String, String, i64, i64, bool) = sqlx::query_as(
            "SELECT task_class_name, options, try_limit, priority, delay_until > strftime('%Y-%m-%d %H:%M:%f', 'now', '+50 seconds') \
             FROM task_runner_requests WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (task.as_str(), try_limit, priority, delayed),
            ("Copy", 2, 7, true)
        );
        assert_eq!(
            crate::parse_options::<CopyOptions>(yaml.as_bytes()).unwrap(),
            options
        );
    }

    #[tokio::test]
    async fn no_options_are_stored_as_null_and_defaults_apply() {
        let pool = table().await;
        let id = Enqueue::named("NoOp", &()).insert(&pool).await.unwrap();
        let (options, try_limit): (Option<String>, i64) =
            sqlx::query_as("SELECT options, try_limit FROM task_runner_requests WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((options, try_limit), (None, 5));
    }

    #[tokio::test]
    async fn a_delay_past_fifty_years_is_refused_and_inserts_nothing() {
        let pool = table().await;
        let far = Enqueue::named("NoOp", &())
            .delay(LONGEST_DELAY + Duration::from_secs(1))
            .insert(&pool)
            .await;
        assert!(
            matches!(&far, Err(Error::Options(message)) if message.contains("more than 50 years")),
            "{far:?}"
        );
        let id = Enqueue::named("NoOp", &())
            .delay(LONGEST_DELAY)
            .insert(&pool)
            .await
            .unwrap();
        let rows: Vec<(i64, Option<String>)> =
            sqlx::query_as("SELECT id, delay_until FROM task_runner_requests")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].0, id);
        assert!(
            rows[0].1.as_deref().is_some_and(|t| t.starts_with("20")),
            "{rows:?}"
        );
    }

    #[tokio::test]
    async fn type_names_empty_or_past_255_characters_are_refused_and_insert_nothing() {
        let pool = table().await;
        let long = "x".repeat(256);
        for enqueue in [
            Enqueue::named(long.clone(), &()),
            Enqueue::named("", &()),
            Enqueue::named("NoOp", &()).on_success_named(long.clone()),
            Enqueue::named("NoOp", &()).on_failure_named(long.clone()),
        ] {
            let refused = enqueue.insert(&pool).await;
            assert!(
                matches!(&refused, Err(Error::Options(message)) if message.contains("name is")),
                "{refused:?}"
            );
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM task_runner_requests")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(count, 0);
        Enqueue::named("é".repeat(255), &())
            .insert(&pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_rolled_back_transaction_leaves_no_row() {
        let pool = table().await;
        let mut tx = pool.begin().await.unwrap();
        Enqueue::named("NoOp", &()).insert(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM task_runner_requests")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(count, 0);
    }

    #[tokio::test]
    async fn a_url_of_another_database_is_refused() {
        let error = Enqueue::named("NoOp", &())
            .insert_url("oracle://root:secret@db/app")
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Url(_)));
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
