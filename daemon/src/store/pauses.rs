//! Pauses (migration 0014): queues and task types whose pending rows no
//! daemon claims until they are resumed. Written by `taskrunner-cli pause`
//! and `resume` (or plain SQL); read by each daemon before a claim, at
//! most once a second (see `daemon::scheduler`), which leaves their rows
//! out of its claims. A pause changes no request row: tries already
//! claimed run to their end, and rows are still enqueued, released from
//! their delays and listed.

use anyhow::Result;
use sqlx::query;

use super::{Backend, Pool, RowExt, Store};

/// What a pause holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PauseKind {
    /// Every row of a queue.
    Queue,
    /// Every row of a task type, in any queue.
    Task,
}

impl PauseKind {
    /// The word in the table's `kind` column, and in what people read.
    pub fn word(self) -> &'static str {
        match self {
            PauseKind::Queue => "queue",
            PauseKind::Task => "task",
        }
    }

    /// The kind a word names (`queue` or `task`).
    pub fn from_word(word: &str) -> Option<PauseKind> {
        match word {
            "queue" => Some(PauseKind::Queue),
            "task" => Some(PauseKind::Task),
            _ => None,
        }
    }
}

/// Refuses a name no pause can hold: empty, or longer than 255 bytes (the
/// longest a MariaDB key column holds). The CLI and the web page check
/// with it before they write.
pub fn check_pause_name(kind: PauseKind, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        anyhow::bail!(
            "a {} name must be 1 to 255 bytes long, not {}",
            kind.word(),
            name.len()
        );
    }
    Ok(())
}

/// One row of `task_runner_pauses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub kind: PauseKind,
    pub name: String,
    /// When it was paused, `YYYY-MM-DD HH:MM:SS.SSS` UTC.
    pub paused_at: String,
    pub reason: Option<String>,
}

impl Pause {
    /// `queue mail (since 2026-12-02 06:00:00 UTC: the mail relay is down)`.
    pub fn describe(&self) -> String {
        let since = self.paused_at.get(..19).unwrap_or(&self.paused_at);
        match &self.reason {
            Some(reason) => format!(
                "{} {} (since {since} UTC: {})",
                self.kind.word(),
                crate::escape::one_line(&self.name),
                crate::escape::one_line(reason)
            ),
            None => format!(
                "{} {} (since {since} UTC)",
                self.kind.word(),
                crate::escape::one_line(&self.name)
            ),
        }
    }
}

impl Store {
    /// Every pause, queues first, each kind by name. A row whose kind is
    /// neither word (the table's check forbids it; a copy without the
    /// check may not) is passed over.
    pub async fn pauses(&self) -> Result<Vec<Pause>> {
        self.count_statements(1);
        let sql = format!(
            "SELECT kind, name, {}, reason FROM task_runner_pauses",
            self.dialect().show_time("paused_at")
        );
        let rows = on_pool!(self, pool => {
            query(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.text(0)?, row.text(1)?, row.text(2)?, row.opt_text(3)?)))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        let mut pauses: Vec<Pause> = rows
            .into_iter()
            .filter_map(|(kind, name, paused_at, reason)| {
                Some(Pause {
                    kind: PauseKind::from_word(&kind)?,
                    name,
                    paused_at,
                    reason,
                })
            })
            .collect();
        // Sorted here, not by the database: byte order on every backend,
        // whatever the server's collation.
        pauses.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        Ok(pauses)
    }

    /// Pauses `name`; returns the pause that held it already, if one did
    /// (left as it was: its time and reason stay).
    pub async fn pause(
        &self,
        kind: PauseKind,
        name: &str,
        reason: Option<&str>,
    ) -> Result<Option<Pause>> {
        let held = self
            .pauses()
            .await?
            .into_iter()
            .find(|pause| pause.kind == kind && pause.name == name);
        if held.is_some() {
            return Ok(held);
        }
        let d = self.dialect();
        // A pause written meanwhile by another hand wins; either way the
        // name is paused.
        let on_conflict = match d.0 {
            Backend::MySql => "ON DUPLICATE KEY UPDATE kind = kind",
            _ => d.on_conflict_ignore(),
        };
        let sql = format!(
            "{} INTO task_runner_pauses (kind, name, paused_at, reason) VALUES ($1, $2, {}, $3) {on_conflict}",
            d.insert_or_ignore(),
            d.now()
        );
        self.count_statements(1);
        on_pool!(self, pool => {
            query(sqlx::AssertSqlSafe(sql))
                .bind(kind.word())
                .bind(name)
                .bind(reason)
                .execute(pool)
                .await?;
        });
        Ok(None)
    }

    /// Resumes `name`; false if it was not paused.
    pub async fn resume(&self, kind: PauseKind, name: &str) -> Result<bool> {
        self.count_statements(1);
        let sql = "DELETE FROM task_runner_pauses WHERE kind = $1 AND name = $2";
        let deleted = on_pool!(self, pool => {
            query(sql).bind(kind.word()).bind(name).execute(pool).await?.rows_affected()
        });
        Ok(deleted > 0)
    }
}
