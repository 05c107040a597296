//! Every query taskrunner runs, for SQLite, PostgreSQL and MariaDB/MySQL.
//! Callers see one [`Store`]; its methods are spread over files by job,
//! each an `impl Store` of its own:
//!
//! - `plumbing.rs`: opening the pools, migrations and the schema check at
//!   start, statement counters, the SQLite side connection, write
//!   transactions.
//! - `claims.rs`: the claim (plain, by type under a concurrency limit, one
//!   given row; who claims is one [`Claimant`]) and when the next delayed
//!   row falls due.
//! - `tries.rs`: the fenced writes about a try (pid, progress, outcome) and
//!   the heartbeat's lease renewal.
//! - `reaping.rs`: what the reaper reads (this host's running rows, lapsed
//!   leases) and `mark_crashed`.
//! - `admin.rs`: enqueue, show, list, retry, cancel, purge: the commands.
//! - `housekeeping.rs`: retention's pruning and cron's slots.
//! - `pauses.rs`: queues and task types paused (`taskrunner-cli pause`),
//!   which claims leave out.
//! - [`compose`]: the one finalization path (callbacks, batches); [`flow`]:
//!   the flow step machine it calls; [`daemons`]: the daemons' own rows;
//!   [`web`]: the web page's bounded queries.
//! - `rows.rs`: reading columns leniently, and a whole [`Request`](crate::request::Request) row.
//! - [`sql`]: the statements themselves, rendered per backend (the claim
//!   among them; compose.rs and flow.rs keep theirs the same way, each a
//!   [`sql::Statements`] set), and [`sql::Dialect`], the one place that spells each
//!   backend's SQL (clock, time arithmetic, casts, locks, upserts,
//!   `RETURNING`); [`mysql`]: what MySQL's dialect needs besides;
//!   `repair.rs`: tables loaded from a Rails `schema.rb`; [`diagnose`]:
//!   database errors as one line with the remedy; [`url`]: URLs without
//!   their password.
//!
//! Architecture invariant: every write about a try (pid, heartbeat, progress,
//! outcome) is fenced by the claim token written when the row was claimed, and
//! applies only while the row is still `RUNNING` under that token. A daemon
//! that lost its claim (reaped after a partition, say) cannot overwrite a
//! later try: its write matches no row, and the caller is told so.

pub(crate) mod diagnose;
pub(crate) mod mysql;
pub mod sql;
pub(crate) mod url;

use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use sql::Sql;

pub use admin::ListFilter;
pub(crate) use admin::{
    in_flow_text, key_held_text, Change, ListQuery, NewRequest, Seen, DEFAULT_TRY_LIMIT,
};
use claims::claimed_from_row;
pub(crate) use claims::ClaimFilter;
pub use claims::{ApartBy, Claimant};
pub(crate) use housekeeping::Prunable;
use plumbing::{begin_write, MIGRATIONS_TABLE};
pub(crate) use plumbing::{
    refused_by_the_database, within_ping_bound, SchemaMismatch, SideConnection,
};
pub use plumbing::{Migration, Purpose, MIGRATING_EVERY};
use rows::{request_from_row, RowExt};
pub(crate) use sql::{NOT_COUNTED, RELEASE_AT_ONCE};
pub(crate) use tries::Held;
pub use tries::{Outcome, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MariaDB ≥ 10.6 or MySQL ≥ 8.0.1 (`mysql://`, `mariadb://`).
    MySql,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// A connection pool to the request table, and the statements for its dialect.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    sql: &'static Sql,
    /// The database URL with any password hidden, for messages.
    pub(crate) display_url: String,
    /// Statements sent by the daemon's own work (claims, writes about tries,
    /// heartbeats, reaping, delay look-ups; BEGIN and COMMIT count), for
    /// `status` and the benchmark: each is one database round trip.
    statements: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The config's `on_exhausted:` hooks, applied by every finalization
    /// (set by the daemon at start and on reload, and by the CLI).
    hooks: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Hooks>>>,
    /// Claims leave out options longer than this (`max_options`).
    max_options: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// MariaDB/MySQL: transactions run again after a deadlock or a
    /// lock-wait timeout (see [`mysql::retry_locks`]), for `status`.
    lock_retries: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The untaken flows of names this daemon does not know, and when it
    /// first saw each (see `Store::take_flows`).
    unknown_flows:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, std::time::Instant>>>,
    /// MariaDB/MySQL: until when a claim while a queue is paused walks
    /// without looking for the queues first, having found more than are
    /// claimed apart (see `Store::queues_with_rows_mysql`).
    many_queues_until: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// When the task types a claim leaves out were last seen to hold a
    /// backlog worth claiming the others apart for, or not (see
    /// `Store::left_out_backlog`).
    left_out_backlog: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// PostgreSQL, the daemon: a connection for claims of one queue or task
    /// type, planned for their values (see `Store::claim_pool`).
    queue_claims: Option<sqlx::PgPool>,
    /// How long a server may take to answer one of the daemon's calls
    /// before the call is given up (see [`Store::answered`]), in
    /// milliseconds; 0 until the daemon sets it.
    answer_bound: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When a call was last given up (see [`plumbing::GaveUp`]).
    gave_up: plumbing::GaveUp,
}

/// Runs `$body` with `$pool` bound to the backend's own pool type. The body is
/// compiled once per backend, so sqlx sees concrete types in each arm. In
/// the MySQL arm `query` is [`mysql::query`], which binds `$N` parameters
/// by number as the other two do.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
            Pool::MySql($pool) => {
                #[allow(unused_imports)]
                use $crate::store::mysql::query;
                $body
            }
        }
    };
    // A statement that takes another shape on MySQL (see `mysql.rs`).
    ($store:expr, $pool:ident => $body:expr, mysql $mysql:ident => $mysql_body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
            Pool::MySql($mysql) => $mysql_body,
        }
    };
}

mod admin;
mod claims;
pub(crate) mod compose;
pub(crate) mod daemons;
pub(crate) mod flow;
mod housekeeping;
mod pauses;
mod plumbing;
mod reaping;
mod repair;
mod rows;
mod tries;
pub(crate) mod web;

pub(crate) use compose::{
    Batch, BatchChange, Counts, Ending, HeldRow, Hooks, Locks, NewBatch, RowLocked,
};
pub(crate) use flow::FlowChange;
pub use flow::{Flow, FlowBoard, StepBoard, StepRow};
pub use pauses::{check_pause_name, Pause, PauseKind};

impl Store {
    /// How this store's backend spells what its statements need.
    pub(crate) fn dialect(&self) -> sql::Dialect {
        sql::Dialect(self.backend())
    }

    pub(crate) fn backend(&self) -> Backend {
        self.pool.backend()
    }
}

impl Pool {
    fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
            Pool::MySql(_) => Backend::MySql,
        }
    }
}
