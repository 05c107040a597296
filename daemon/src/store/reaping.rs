//! What the reaper reads: RUNNING rows of this host (to probe their
//! processes) and rows whose lease lapsed; and how it marks a row CRASHED.

use std::time::Duration;

use anyhow::Result;
use sqlx::query;

use super::{Ending, Locks, Pool, RowExt, RowLocked, Store};
use crate::instance::ClaimToken;
use crate::request::RequestId;

/// A RUNNING row of this host, as the reaper probes it.
#[derive(Debug, Clone)]
pub(crate) struct RunningRow {
    pub(crate) id: RequestId,
    pub(crate) pid: i64,
    pub(crate) boot_id: Option<String>,
    pub(crate) start_ticks: Option<i64>,
    /// `started_at` as seconds since the epoch.
    pub(crate) started_at: Option<f64>,
    pub(crate) claim_token: Option<ClaimToken>,
    /// The daemon instance holding the row ("" when none).
    pub(crate) claimed_by: String,
}

/// A RUNNING row of this host without a pid: its task never started, or
/// its daemon had not yet recorded the process.
#[derive(Debug, Clone)]
pub(crate) struct UnstartedRow {
    pub(crate) id: RequestId,
    pub(crate) claim_token: Option<ClaimToken>,
    /// The daemon instance holding the row ("" when none).
    pub(crate) claimed_by: String,
    /// Whether the reaper gave its try before back.
    pub(crate) given_back_before: bool,
}

/// A RUNNING row whose heartbeat is older than the lease.
#[derive(Debug, Clone)]
pub(crate) struct LapsedRow {
    pub(crate) id: RequestId,
    pub(crate) host: String,
    pub(crate) claim_token: Option<ClaimToken>,
    pub(crate) heartbeat_at: Option<String>,
    /// Whether its daemon recorded the try's process.
    pub(crate) pid_recorded: bool,
    /// Whether the reaper gave its try before back.
    pub(crate) given_back_before: bool,
    /// The lease it was judged by: the longer of the reaper's and the one
    /// its holder wrote into its daemon's row.
    pub(crate) lease: Duration,
    /// The daemon instance holding it ('' for none).
    pub(crate) claimed_by: String,
}

impl Store {
    /// RUNNING rows of `host` with a pid, except those held by `exclude_instance`.
    pub(crate) async fn running_on_host(
        &self,
        host: &str,
        exclude_instance: &str,
    ) -> Result<Vec<RunningRow>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.running_on_host.as_str())
                .bind(host)
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(RunningRow {
                    id: RequestId(row.int(0)?),
                    pid: row.int(1)?,
                    boot_id: row.opt_text(2)?,
                    start_ticks: row.opt_int(3)?,
                    started_at: row.opt_float(4)?,
                    claim_token: row.opt_text(5)?.map(ClaimToken::from_row),
                    claimed_by: row.text(6)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// RUNNING rows of `host` without a pid, except those held by
    /// `exclude_instance`.
    pub(crate) async fn unstarted_on_host(
        &self,
        host: &str,
        exclude_instance: &str,
    ) -> Result<Vec<UnstartedRow>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.unstarted_on_host.as_str())
                .bind(host)
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(UnstartedRow {
                    id: RequestId(row.int(0)?),
                    claim_token: row.opt_text(1)?.map(ClaimToken::from_row),
                    claimed_by: row.text(2)?,
                    given_back_before: row.int(3)? != 0,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// RUNNING rows (any host) whose heartbeat is older than `lease`, or
    /// than their holder's lease when that is longer (`lease_ms` of its
    /// daemon's row).
    pub(crate) async fn lapsed_leases(
        &self,
        lease: Duration,
        exclude_instance: &str,
    ) -> Result<Vec<LapsedRow>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.lapsed_leases.as_str())
                .bind(lease.as_secs_f64())
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(LapsedRow {
                    id: RequestId(row.int(0)?),
                    host: row.text(1)?,
                    claim_token: row.opt_text(2)?.map(ClaimToken::from_row),
                    heartbeat_at: row.opt_text(3)?,
                    pid_recorded: row.int(4)? != 0,
                    given_back_before: row.int(5)? != 0,
                    lease: row
                        .opt_int(6)?
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map(Duration::from_millis)
                        .map_or(lease, |holders| holders.max(lease)),
                    claimed_by: row.text(7)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Marks a row CRASHED if it still carries the claim token read before;
    /// it runs again at once (its try counts), or, with no tries left, is
    /// exhausted: written by [`finalize_with`](Store::finalize_with) with
    /// what that causes. With `give_back` the row is INTERRUPTED instead,
    /// its try not counted (see `crate::reaper`). A row another session
    /// holds locked, or whose batch or flow row it holds (an application
    /// adding members), is not waited for: `Err`, nothing written. A row
    /// taken for its `lapsed` lease is marked only if that lease has still
    /// lapsed under the row's lock (its holder may have renewed it since).
    pub(crate) async fn mark_crashed(
        &self,
        id: RequestId,
        claim_token: Option<&ClaimToken>,
        reason: &str,
        give_back: bool,
        lapsed: Option<Duration>,
    ) -> Result<Result<bool, RowLocked>> {
        self.finalize_with(
            Ending::Crashed {
                id,
                claim_token,
                reason,
                give_back,
                lapsed,
            },
            Locks::SetAside,
        )
        .await
    }
}
