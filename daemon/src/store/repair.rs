//! Repairs taskrunner's tables when they were created by something other
//! than its migrations, before the migrations run.
//!
//! The case that happens: Rails' default `schema.rb` keeps tables, columns
//! and most indexes, but drops triggers (SQLite's timestamp normalising,
//! PostgreSQL's NOTIFY), SQL defaults it cannot express, and the rows of our
//! bookkeeping table. A test database loaded from it (`db:schema:load`,
//! `db:test:prepare`) then has the current columns and no migration
//! recorded: the migrations would run again and fail (`ADD COLUMN queue`
//! exists, `installed_on` has no default), and without its triggers
//! timestamps would not be normalised.
//!
//! Detection: taskrunner's tables exist and either the bookkeeping records
//! no migration while the request table has columns migration 1 does not
//! create, or an index or trigger that a migration recorded as applied
//! creates is missing (a later migration's are not: it adds them). Repair:
//! each of our tables is copied aside and dropped, the migrations run on the
//! empty database, and the rows are copied back (the columns both have), so
//! whatever the migrations create, now or in later versions, is restored.
//! A table created by the Rails migration of `examples/rails` (the columns
//! of migration 1, no bookkeeping) is not a repair case: the migrations
//! complete it in place.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use sqlx::migrate::Migrator;

use super::{Pool, Store, MIGRATIONS_TABLE};

/// Suffix of the copies a repair makes (left behind if it fails midway).
const ASIDE: &str = "_before_repair";

/// What the migrations create: tables, and indexes and triggers by name.
#[derive(Debug, Default)]
struct Expected {
    tables: Vec<String>,
    objects: BTreeSet<String>,
}

/// Reads the names the migrations of the versions `applied` selects create,
/// in order (a later `DROP` of a name removes it, a later `CREATE` brings it
/// back).
fn expected(migrator: &Migrator, applied: impl Fn(i64) -> bool) -> Expected {
    let mut expected = Expected::default();
    for migration in migrator.iter().filter(|m| applied(m.version)) {
        let words: Vec<String> = migration
            .sql
            .as_str()
            .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        for (i, word) in words.iter().enumerate() {
            let rest = &words[i + 1..];
            let word_at = |at: usize| rest.get(at).map(String::as_str).unwrap_or_default();
            match word.as_str() {
                "create" => {
                    let mut at = usize::from(word_at(0) == "unique");
                    let kind = word_at(at);
                    if !["table", "index", "trigger"].contains(&kind) {
                        continue;
                    }
                    at += 1;
                    if word_at(at) == "if" {
                        at += 3; // IF NOT EXISTS
                    }
                    let name = word_at(at).to_string();
                    if name.is_empty() {
                        continue;
                    }
                    if kind == "table" {
                        if !expected.tables.contains(&name) {
                            expected.tables.push(name);
                        }
                    } else {
                        expected.objects.insert(name);
                    }
                }
                "drop" if ["index", "trigger"].contains(&word_at(0)) => {
                    let at = if word_at(1) == "if" { 3 } else { 1 }; // IF EXISTS
                    expected.objects.remove(word_at(at));
                }
                _ => {}
            }
        }
    }
    expected
}

impl Store {
    /// Repairs tables loaded from a Rails `schema.rb` (see the module), then
    /// runs `migrator`. Returns a sentence on what was repaired, if anything.
    ///
    /// Only what the migrations recorded as applied create is looked for: an
    /// older schema lacks the later ones' indexes, and the migrations add them
    /// in place (an upgrade is not a repair).
    pub(super) async fn repair_if_needed(
        &self,
        migrator: &Migrator,
        applied: &BTreeSet<i64>,
    ) -> Result<Option<String>> {
        let Some(reason) = self
            .needs_repair(applied, &expected(migrator, |v| applied.contains(&v)))
            .await?
        else {
            return Ok(None);
        };
        let expected = expected(migrator, |_| true);
        tracing::warn!(
            "{}: {reason}; rebuilding taskrunner's tables by its migrations, keeping their rows",
            self.display_url
        );
        let mut present = Vec::new();
        for table in &expected.tables {
            if self.table_exists(table).await? {
                present.push(table.clone());
            }
        }
        // 1. Copy each table aside, drop it (and its indexes and triggers).
        let mut statements = Vec::new();
        for table in &present {
            statements.push(format!("DROP TABLE IF EXISTS {table}{ASIDE}"));
            statements.push(format!(
                "CREATE TABLE {table}{ASIDE} AS SELECT * FROM {table}"
            ));
        }
        for table in present.iter().rev() {
            statements.push(self.drop_table(table));
        }
        statements.push(self.drop_table(MIGRATIONS_TABLE));
        self.execute_in_transaction(&statements)
            .await
            .context("copying taskrunner's tables aside")?;
        // 2. The migrations, on an empty database.
        self.run_migrations(migrator).await?;
        // 3. The rows back, in the columns both have.
        let mut statements = Vec::new();
        let mut rows = 0;
        for table in &present {
            let aside = format!("{table}{ASIDE}");
            rows += self.count_rows(&aside).await?;
            let new_columns: BTreeSet<String> = self.columns(table).await?.into_iter().collect();
            let common: Vec<String> = self
                .columns(&aside)
                .await?
                .into_iter()
                .filter(|c| new_columns.contains(c))
                .collect();
            if !common.is_empty() {
                let list = common.join(", ");
                statements.push(format!(
                    "INSERT INTO {table} ({list}) SELECT {list} FROM {aside}"
                ));
                if matches!(self.pool, Pool::Postgres(_)) && common.iter().any(|c| c == "id") {
                    statements.push(format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false) FROM {table} \
                          WHERE pg_get_serial_sequence('{table}', 'id') IS NOT NULL"
                    ));
                }
            }
            statements.push(format!("DROP TABLE {aside}"));
        }
        self.execute_in_transaction(&statements)
            .await
            .with_context(|| {
                format!("copying the rows back (they are kept in the tables ending in {ASIDE})")
            })?;
        Ok(Some(format!(
            "repaired {reason}: rebuilt by the migrations, {rows} rows kept"
        )))
    }

    /// Why the tables need a repair, if they do.
    async fn needs_repair(
        &self,
        applied: &BTreeSet<i64>,
        expected: &Expected,
    ) -> Result<Option<String>> {
        let requests = "task_runner_requests";
        if !self.table_exists(requests).await? {
            return Ok(None);
        }
        if applied.is_empty() {
            let columns = self.columns(requests).await?;
            // Migration 1 does not create `queue` (migration 2 adds it).
            if columns.iter().any(|c| c == "queue") {
                return Ok(Some(
                    "tables with later columns but no migration recorded (loaded from a Rails schema.rb?)"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let existing = self.object_names().await?;
        let missing: Vec<&String> = expected
            .objects
            .iter()
            .filter(|name| !existing.contains(*name))
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        Ok(Some(format!(
            "tables missing indexes or triggers ({})",
            missing.join(", ")
        )))
    }

    /// The versions the bookkeeping table records as applied (none without
    /// the table). An error reading it is an error: taken for "none
    /// recorded", it would start a repair.
    pub(super) async fn applied_versions(&self) -> Result<BTreeSet<i64>> {
        if !self.table_exists(MIGRATIONS_TABLE).await? {
            return Ok(BTreeSet::new());
        }
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {MIGRATIONS_TABLE} WHERE success"
        ));
        Ok(on_pool!(self, pool => {
            sqlx::query_scalar::<_, i64>(sql).fetch_all(pool).await?
        })
        .into_iter()
        .collect())
    }

    fn drop_table(&self, table: &str) -> String {
        match self.pool {
            Pool::Sqlite(_) | Pool::MySql(_) => format!("DROP TABLE IF EXISTS {table}"),
            Pool::Postgres(_) => format!("DROP TABLE IF EXISTS {table} CASCADE"),
        }
    }

    async fn execute_in_transaction(&self, statements: &[String]) -> Result<()> {
        on_pool!(self, pool => {
            let mut transaction = pool.begin().await?;
            for statement in statements {
                sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                    .execute(&mut *transaction)
                    .await
                    .with_context(|| statement.clone())?;
            }
            transaction.commit().await?;
        }, mysql pool => {
            // DDL commits on its own there: one statement after the other.
            for statement in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
                    .execute(pool)
                    .await
                    .with_context(|| statement.clone())?;
            }
        });
        Ok(())
    }

    async fn strings(&self, sql: &str, bind: &str) -> Result<Vec<String>> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        Ok(match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).bind(bind).fetch_all(pool).await?,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).bind(bind).fetch_all(pool).await?,
            Pool::MySql(pool) => super::mysql::query(sql)
                .bind(bind)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| super::RowExt::text(row, 0))
                .collect::<sqlx::Result<_>>()?,
        })
    }

    async fn columns(&self, table: &str) -> Result<Vec<String>> {
        let sql = match self.pool {
            Pool::Sqlite(_) => "SELECT name FROM pragma_table_info($1) ORDER BY cid",
            Pool::Postgres(_) => {
                "SELECT column_name::text FROM information_schema.columns \
                  WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
            }
            Pool::MySql(_) => {
                // Not the generated columns: they cannot be written.
                "SELECT column_name FROM information_schema.columns \
                  WHERE table_schema = DATABASE() AND table_name = $1 \
                    AND extra NOT LIKE '%GENERATED%' ORDER BY ordinal_position"
            }
        };
        self.strings(sql, table).await
    }

    /// Names of every index and trigger.
    async fn object_names(&self) -> Result<BTreeSet<String>> {
        let sql = match self.pool {
            Pool::Sqlite(_) => {
                "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') AND name <> $1"
            }
            Pool::Postgres(_) => {
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() AND indexname <> $1 \
                 UNION SELECT tgname::text FROM pg_trigger WHERE NOT tgisinternal"
            }
            Pool::MySql(_) => {
                "SELECT index_name FROM information_schema.statistics \
                  WHERE table_schema = DATABASE() AND index_name <> $1 \
                 UNION SELECT trigger_name FROM information_schema.triggers \
                  WHERE trigger_schema = DATABASE()"
            }
        };
        Ok(self
            .strings(sql, "")
            .await?
            .into_iter()
            .map(|name| name.to_ascii_lowercase())
            .collect())
    }

    async fn count_rows(&self, table: &str) -> Result<i64> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        Ok(match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Pool::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?,
            Pool::MySql(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_name_their_tables_indexes_and_triggers() {
        let sqlite = expected(&sqlx::migrate!("../migrations/sqlite"), |_| true);
        assert_eq!(
            &sqlite.tables[..2],
            ["task_runner_requests", "task_runner_schedule_slots"]
        );
        for name in [
            "task_runner_requests_runnable",
            "task_runner_requests_unique_key",
            "task_runner_requests_normalise_insert",
            "task_runner_requests_normalise_update",
        ] {
            assert!(sqlite.objects.contains(name), "{name}: {sqlite:?}");
        }
        let postgres = expected(&sqlx::migrate!("../migrations/postgres"), |_| true);
        for name in [
            "task_runner_requests_runnable",
            "task_runner_requests_notify",
            "task_runner_requests_notify_result",
        ] {
            assert!(postgres.objects.contains(name), "{name}: {postgres:?}");
        }
    }
}
