//! Each running daemon's own row in `task_runner_daemons` (migration 0009):
//! written at start, at each heartbeat and at a clean stop, so that the web
//! page shows daemons that run nothing. One decision reads it: the reaper
//! waits for the longer of its own `lease_timeout` and the one the row's
//! holder wrote here (`lease_ms`, migration 0015) before it takes a row
//! whose heartbeat aged for crashed. A row not written (the write failed)
//! leaves the reaper's own lease, as before; the heartbeat writes it again.
//! And a schema repair waits while rows say daemons run.

use std::time::Duration;

use anyhow::Result;
use sqlx::query;

use super::{Pool, Store};

/// Who a daemon is, as its row shows it.
#[derive(Debug, Clone)]
pub(crate) struct DaemonPresence<'a> {
    /// The instance id the daemon writes into `claimed_by`.
    pub(crate) instance: &'a str,
    pub(crate) host: &'a str,
    pub(crate) node_name: Option<&'a str>,
    pub(crate) pid: u32,
    pub(crate) max_concurrent: usize,
    /// Its `lease_timeout`: other daemons' reapers wait at least this long.
    pub(crate) lease: Duration,
}

/// Rows of daemons not heard from for this long are deleted when a daemon
/// starts.
const FORGET_AFTER: Duration = Duration::from_secs(7 * 86_400);

impl Store {
    /// The daemons whose rows say they run (not stopped, heard from within
    /// `within`), each as `pid N on HOST`; less those of this host and boot
    /// whose process is gone (killed -9: its row was never marked stopped).
    pub(super) async fn daemons_heard_from_within(&self, within: Duration) -> Result<Vec<String>> {
        if !self.table_exists("task_runner_daemons").await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT instance, host, {} FROM task_runner_daemons \
             WHERE stopped_at IS NULL AND heartbeat_at > {}",
            self.dialect().int64("pid"),
            self.dialect().now_plus(&format!("-{}", within.as_secs()))
        );
        let rows: Vec<(String, String, Option<i64>)> = on_pool!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?
        });
        let gone = |instance: &str| {
            crate::instance::InstanceId::holder_identity(instance).is_some_and(|daemon| {
                matches!(
                    crate::procinfo::probe(&daemon),
                    crate::procinfo::Probe::Dead(_)
                )
            })
        };
        Ok(rows
            .into_iter()
            .filter(|(instance, _, _)| !gone(instance))
            .map(|(_, host, pid)| match pid {
                Some(pid) => format!("pid {pid} on {host}"),
                None => host,
            })
            .collect())
    }

    /// Writes this daemon's row (and forgets daemons silent for a week).
    pub(crate) async fn register_daemon(&self, me: &DaemonPresence<'_>) -> Result<()> {
        let now = self.dialect().now();
        let forget = format!(
            "DELETE FROM task_runner_daemons WHERE heartbeat_at < {}",
            self.dialect()
                .now_plus(&format!("-{}", FORGET_AFTER.as_secs()))
        );
        let insert = format!(
            "INSERT INTO task_runner_daemons \
               (instance, host, node_name, pid, version, max_concurrent, lease_ms, running, started_at, \
                heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, {now}, {now})"
        );
        on_pool!(self, pool => {
            query(sqlx::AssertSqlSafe(forget)).execute(pool).await?;
            query(sqlx::AssertSqlSafe(insert))
                .bind(me.instance)
                .bind(me.host)
                .bind(me.node_name)
                .bind(i64::from(me.pid))
                .bind(env!("CARGO_PKG_VERSION"))
                .bind(me.max_concurrent as i64)
                .bind(lease_ms(me.lease))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// This daemon is alive, runs `running` tries, and holds its rows for
    /// `me.lease` (a reload may have changed it). A row that is missing
    /// (its first write failed, or someone deleted it) is written again.
    pub(crate) async fn daemon_heartbeat(
        &self,
        me: &DaemonPresence<'_>,
        running: usize,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE task_runner_daemons SET heartbeat_at = {}, running = $2, lease_ms = $3 \
              WHERE instance = $1",
            self.dialect().now()
        );
        let updated = on_pool!(self, pool => {
            query(sqlx::AssertSqlSafe(sql))
                .bind(me.instance)
                .bind(running as i64)
                .bind(lease_ms(me.lease))
                .execute(pool)
                .await?
                .rows_affected()
        });
        if updated == 0 {
            self.register_daemon(me).await?;
        }
        Ok(())
    }

    /// This daemon stopped cleanly.
    pub(crate) async fn daemon_stopped(&self, instance: &str) -> Result<()> {
        let now = self.dialect().now();
        let sql = format!(
            "UPDATE task_runner_daemons SET stopped_at = {now}, heartbeat_at = {now}, running = 0 \
              WHERE instance = $1"
        );
        on_pool!(self, pool => {
            query(sqlx::AssertSqlSafe(sql)).bind(instance).execute(pool).await?;
        });
        Ok(())
    }
}

/// A lease as the column holds it (saturated: a lease of centuries waits).
fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}
