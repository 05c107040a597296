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
//! empty database, columns the migrations do not make (an application's
//! own) are added back as they were, the rows are copied back, and the
//! application's own indexes and triggers are made again: whatever the
//! migrations create, now or in later versions, is restored, and nothing
//! else is lost. Foreign keys of other tables to ours (and on PostgreSQL
//! views on them) would not survive the drop: with any, the repair refuses
//! and changes nothing.
//! A table created by the Rails migration of `examples/rails` (the columns
//! of migration 1, no bookkeeping) is not a repair case: the migrations
//! complete it in place.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use sqlx::migrate::Migrator;

use super::{Pool, SchemaMismatch, Store, MIGRATIONS_TABLE};

/// Suffix of the copies a repair makes (left behind if it fails midway).
const ASIDE: &str = "_before_repair";

/// A daemon not stopped and heard from within this long is taken to run on
/// the tables, and a repair waits for its stop. (A daemon renews its row at
/// least every third of its lease; one killed is forgotten after this.)
const LIVING_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// What the migrations create: tables, and indexes and triggers by name.
#[derive(Debug, Default)]
struct Expected {
    tables: Vec<String>,
    objects: BTreeSet<String>,
    /// Every index and trigger name a migration creates or drops: what is
    /// not among them is an application's own.
    mentioned: BTreeSet<String>,
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
                        expected.mentioned.insert(name.clone());
                        expected.objects.insert(name);
                    }
                }
                "drop" if ["index", "trigger"].contains(&word_at(0)) => {
                    let at = if word_at(1) == "if" { 3 } else { 1 }; // IF EXISTS
                    expected.mentioned.insert(word_at(at).to_string());
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
        let expected_now = expected(migrator, |_| true);
        let mut left = Vec::new();
        for table in &expected_now.tables {
            let aside = format!("{table}{ASIDE}");
            if self.table_exists(&aside).await? {
                left.push(aside);
            }
        }
        // Without this check the migrations found the tables of a repair
        // that stopped after its drop complete, and the daemon ran on them,
        // empty: every request was out of its sight.
        if !left.is_empty() {
            return Err(SchemaMismatch(format!(
                "a repair of taskrunner's tables stopped midway and left their rows in {}: \
                 copy each back into the table of the same name without `{ASIDE}` (the columns both have) \
                 and drop it, then start again; nothing was changed",
                left.join(", ")
            ))
            .into());
        }
        // The tables are read after the migrations recorded. On SQLite no
        // turn keeps another process's migration out meanwhile (they take
        // turns by the write lock, tables and record committed at once), so
        // tables that look unrecorded may be ones just migrated: read the
        // record again, and judge again while it changes.
        let mut applied = applied.clone();
        let reason = loop {
            let Some(reason) = self
                .needs_repair(&applied, &expected(migrator, |v| applied.contains(&v)))
                .await?
            else {
                return Ok(None);
            };
            let now = self.applied_versions().await?;
            if now == applied {
                break reason;
            }
            applied = now;
        };
        let expected = expected_now;
        let mut present = Vec::new();
        for table in &expected.tables {
            if self.table_exists(table).await? {
                present.push(table.clone());
            }
        }
        // A daemon running on these tables would lose every write it made
        // between the copy and the copy back (an outcome, a claim), and
        // find its statements failing while the tables are gone.
        let living = self.daemons_heard_from_within(LIVING_WITHIN).await?;
        if !living.is_empty() {
            return Err(SchemaMismatch(format!(
                "{reason}, but the repair rebuilds taskrunner's tables, and daemons run on them (heard from within {} minutes: {}): \
                 stop them (one killed without a stop on another host counts until then), then run `taskrunner-cli migrate`; nothing was changed",
                LIVING_WITHIN.as_secs() / 60,
                living.join(", ")
            ))
            .into());
        }
        // Dropping a table that another table's foreign key references
        // would fail halfway (MariaDB/MySQL, whose DDL commits statement by
        // statement) or delete the rows that cascade from it (SQLite's
        // implicit DELETE); on PostgreSQL a foreign key or a view makes the
        // DROP fail (CASCADE would take them along).
        let dependents = self.dependents_of(&present).await?;
        if !dependents.is_empty() {
            return Err(SchemaMismatch(format!(
                "{reason}, but the repair rebuilds taskrunner's tables, and the application's foreign keys or views depend on them ({}): \
                 drop those, run `taskrunner-cli migrate`, then make them again; nothing was changed",
                dependents.join(", ")
            ))
            .into());
        }
        tracing::warn!(
            "{}: {reason}; rebuilding taskrunner's tables by its migrations, keeping their rows",
            self.display_url
        );
        // The columns, indexes and triggers as they are, to bring back
        // those the migrations do not make: an application's own (the README
        // allows them).
        let mut before = Vec::new();
        let mut own_objects = Vec::new();
        for table in &present {
            before.push(self.column_definitions(table).await?);
            for (name, create) in self.index_and_trigger_definitions(table).await? {
                if !expected.mentioned.contains(&name.to_ascii_lowercase()) {
                    own_objects.push((name, create));
                }
            }
        }
        // The next id of each table, to keep through the rebuild: the ids
        // of rows deleted at the top are never handed out again (SPEC;
        // before, a new row got one, and the follow-ups old rows still
        // named it for, `next_of` or a callback's key, counted as made).
        let mut next_ids = Vec::new();
        for table in &present {
            if let Some(next) = self.next_id(table).await? {
                next_ids.push((table.clone(), next));
            }
        }
        crate::test_hooks::wait_for_file_when_told("TASKRUNNER_TEST_REPAIR_BEFORE_ASIDE").await;
        // 1. Copy each table aside, drop it (and its indexes and triggers).
        // A table aside that exists now is another process's repair under
        // way (SQLite has no turn for them: both may have judged the tables
        // before either began), between its steps 1 and 3: creating it
        // fails, and this repair stops with nothing changed (before, it was
        // dropped first, that repair's only copy of the rows, and both
        // copied back the empty tables).
        let mut statements = Vec::new();
        for table in &present {
            statements.push(format!(
                "CREATE TABLE {table}{ASIDE} AS SELECT * FROM {table}"
            ));
        }
        for table in present.iter().rev() {
            statements.push(self.drop_table(table));
        }
        statements.push(self.drop_table(MIGRATIONS_TABLE));
        if let Err(error) = self.execute_in_transaction(&statements).await {
            for table in &present {
                if self.table_exists(&format!("{table}{ASIDE}")).await? {
                    return Err(SchemaMismatch(format!(
                        "another process is repairing taskrunner's tables ({table}{ASIDE} exists since this one judged them): \
                         run `taskrunner-cli migrate` again once it is done; nothing was changed"
                    ))
                    .into());
                }
            }
            return Err(error.context("copying taskrunner's tables aside"));
        }
        // 2. The migrations, on an empty database.
        self.run_migrations(migrator).await?;
        crate::test_hooks::wait_for_file_when_told("TASKRUNNER_TEST_REPAIR_BEFORE_COPY_BACK").await;
        // 3. The application's columns added back, with their type, NOT
        // NULL and default; then the rows, in the columns both have.
        let mut kept_columns = Vec::new();
        let mut statements = Vec::new();
        for (table, before) in present.iter().zip(before) {
            let made: BTreeSet<String> = self
                .column_definitions(table)
                .await?
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            for (name, definition) in before {
                if !made.contains(&name) {
                    statements.push(format!("ALTER TABLE {table} ADD COLUMN {definition}"));
                    kept_columns.push(format!("{table}.{name}"));
                }
            }
        }
        self.execute_in_transaction(&statements)
            .await
            .with_context(|| {
                format!("adding back the application's columns (the rows are kept in the tables ending in {ASIDE})")
            })?;
        // The migrations' triggers must not fire on the copy either: the
        // one that counts a batch's members refused every member copied
        // before its batch was back (and would count each twice after),
        // and the rules refuse values that rows written before a rule may
        // hold. They are dropped around the copy, in its transaction
        // (SQLite, PostgreSQL), and made again as they were.
        let mut triggers = Vec::new();
        for table in &present {
            for (name, create) in self.trigger_definitions(table).await? {
                triggers.push((table, name, create));
            }
        }
        let mut statements: Vec<String> = triggers
            .iter()
            .map(|(table, name, _)| self.drop_trigger(table, name))
            .collect();
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
                    let kept = next_ids
                        .iter()
                        .find(|(kept, _)| kept == table)
                        .map_or(1, |(_, next)| *next);
                    statements.push(format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), greatest(coalesce(max(id), 0) + 1, {kept}), false) FROM {table} \
                          WHERE pg_get_serial_sequence('{table}', 'id') IS NOT NULL"
                    ));
                }
            }
        }
        for (table, next) in &next_ids {
            match self.pool {
                // The copy wrote its row (the highest id copied), or none
                // (no row copied).
                Pool::Sqlite(_) => {
                    statements.push(format!(
                        "UPDATE sqlite_sequence SET seq = max(seq, {}) WHERE name = '{table}'",
                        next - 1
                    ));
                    statements.push(format!(
                        "INSERT INTO sqlite_sequence (name, seq) SELECT '{table}', {} \
                          WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = '{table}')",
                        next - 1
                    ));
                }
                // Never below the highest id there plus one.
                Pool::MySql(_) => {
                    statements.push(format!("ALTER TABLE {table} AUTO_INCREMENT = {next}"))
                }
                Pool::Postgres(_) => {}
            }
        }
        statements.extend(triggers.into_iter().map(|(_, _, create)| create));
        statements.extend(
            present
                .iter()
                .map(|table| format!("DROP TABLE {table}{ASIDE}")),
        );
        self.execute_in_transaction(&statements)
            .await
            .with_context(|| {
                format!("copying the rows back (they are kept in the tables ending in {ASIDE})")
            })?;
        // 4. The application's indexes and triggers, on the rows (its
        // triggers must not fire on the copy).
        let statements: Vec<String> = own_objects
            .iter()
            .map(|(_, create)| create.clone())
            .collect();
        self.execute_in_transaction(&statements).await.context(
            "making the application's own indexes and triggers again (the rows are back)",
        )?;
        let mut kept = String::new();
        if !kept_columns.is_empty() {
            kept.push_str(&format!(
                ", and the application's columns {}",
                kept_columns.join(", ")
            ));
        }
        if !own_objects.is_empty() {
            let names: Vec<&str> = own_objects.iter().map(|(name, _)| name.as_str()).collect();
            kept.push_str(&format!(", and indexes and triggers {}", names.join(", ")));
        }
        Ok(Some(format!(
            "repaired {reason}: rebuilt by the migrations, {rows} rows kept{kept}"
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
            // Not CASCADE: what depends on the table is refused before (see
            // `dependents_of`), and anything else makes the DROP fail and
            // roll back rather than vanish.
            Pool::Postgres(_) => format!("DROP TABLE IF EXISTS {table}"),
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

    /// Each column of `table` (generated ones included) with its definition
    /// as `ADD COLUMN` takes it: name, type, NOT NULL, default.
    async fn column_definitions(&self, table: &str) -> Result<Vec<(String, String)>> {
        let quoted = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
        let definition = |name: &str, kind: &str, not_null: bool, default: Option<String>| {
            // SQLite adds a NOT NULL column only with a default.
            let not_null = not_null && (default.is_some() || !matches!(self.pool, Pool::Sqlite(_)));
            let mut definition = format!("{} {kind}", quoted(name));
            if not_null {
                definition.push_str(" NOT NULL");
            }
            if let Some(default) = default {
                definition.push_str(&format!(" DEFAULT {default}"));
            }
            definition
        };
        // (name, type, NOT NULL, default)
        let columns: Vec<(String, String, bool, Option<String>)> = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT name, type, \"notnull\", dflt_value FROM pragma_table_info($1) ORDER BY cid",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                            pg_get_expr(d.adbin, d.adrelid) \
                       FROM pg_attribute a \
                       LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                      ORDER BY a.attnum",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::MySql(pool) => {
                // The server's own words for each column: the lines of
                // SHOW CREATE TABLE that start with a quoted name.
                let sql = sqlx::AssertSqlSafe(format!("SHOW CREATE TABLE {table}"));
                let row = super::mysql::query(sql).fetch_one(pool).await?;
                return Ok(super::RowExt::text(&row, 1)?
                    .lines()
                    .filter_map(|line| {
                        let line = line.trim().trim_end_matches(',');
                        let rest = line.strip_prefix('`')?;
                        let name = rest.split('`').next()?.to_string();
                        Some((name, line.to_string()))
                    })
                    .collect());
            }
        };
        Ok(columns
            .into_iter()
            .map(|(name, kind, not_null, default)| {
                let made = definition(&name, &kind, not_null, default);
                (name, made)
            })
            .collect())
    }

    /// Each index on `table` that no constraint makes (not the primary key),
    /// then each trigger on it, with the statement that makes it again.
    async fn index_and_trigger_definitions(&self, table: &str) -> Result<Vec<(String, String)>> {
        let mut made = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_as::<_, (String, String)>(
                    "SELECT name, sql FROM sqlite_master \
                      WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::Postgres(pool) => {
                sqlx::query_as::<_, (String, String)>(
                    "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) \
                       FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                      WHERE i.indrelid = to_regclass($1) \
                        AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::MySql(pool) => {
                // The lines of SHOW CREATE TABLE that make a named index.
                let sql = sqlx::AssertSqlSafe(format!("SHOW CREATE TABLE {table}"));
                let row = super::mysql::query(sql).fetch_one(pool).await?;
                super::RowExt::text(&row, 1)?
                    .lines()
                    .filter_map(|line| {
                        let line = line.trim().trim_end_matches(',');
                        let (_, rest) = line.split_once("KEY `")?;
                        let name = rest.split('`').next()?.to_string();
                        Some((name, format!("ALTER TABLE {table} ADD {line}")))
                    })
                    .collect()
            }
        };
        made.extend(self.trigger_definitions(table).await?);
        Ok(made)
    }

    /// The triggers on `table`, by name, each with the statement that makes
    /// it again.
    async fn trigger_definitions(&self, table: &str) -> Result<Vec<(String, String)>> {
        Ok(match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_as::<_, (String, String)>(
                    "SELECT name, sql FROM sqlite_master \
                      WHERE type = 'trigger' AND tbl_name = $1 AND sql IS NOT NULL",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::Postgres(pool) => {
                sqlx::query_as::<_, (String, String)>(
                    "SELECT tgname::text, pg_get_triggerdef(oid) FROM pg_trigger \
                      WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::MySql(pool) => {
                let names = self
                    .strings(
                        "SELECT trigger_name FROM information_schema.triggers \
                          WHERE trigger_schema = DATABASE() AND event_object_table = $1",
                        table,
                    )
                    .await?;
                let mut made = Vec::new();
                for name in names {
                    let sql = sqlx::AssertSqlSafe(format!("SHOW CREATE TRIGGER `{name}`"));
                    let row = super::mysql::query(sql).fetch_one(pool).await?;
                    // Made again by the user that repairs, not its definer.
                    let create = super::RowExt::text(&row, 2)?;
                    let create = match (create.find(" DEFINER="), create.find(" TRIGGER ")) {
                        (Some(from), Some(to)) if from < to => {
                            format!("{}{}", &create[..from], &create[to..])
                        }
                        _ => create,
                    };
                    made.push((name, create));
                }
                made
            }
        })
    }

    fn drop_trigger(&self, table: &str, trigger: &str) -> String {
        match self.pool {
            Pool::Sqlite(_) | Pool::MySql(_) => format!("DROP TRIGGER {trigger}"),
            Pool::Postgres(_) => format!("DROP TRIGGER {trigger} ON {table}"),
        }
    }

    /// What a DROP of `tables` cannot leave as it is: the foreign keys of
    /// other tables that reference one of them, and on PostgreSQL the views
    /// on them, as `dependent → table`.
    async fn dependents_of(&self, tables: &[String]) -> Result<Vec<String>> {
        let pairs: Vec<(String, String)> = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT m.name, f.\"table\" FROM sqlite_master m \
                       JOIN pragma_foreign_key_list(m.name) f WHERE m.type = 'table'",
                )
                .fetch_all(pool)
                .await?
            }
            Pool::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT conrelid::regclass::text, confrelid::regclass::text \
                       FROM pg_constraint WHERE contype = 'f' \
                     UNION \
                     SELECT v.oid::regclass::text, d.refobjid::regclass::text \
                       FROM pg_depend d \
                       JOIN pg_rewrite r ON r.oid = d.objid \
                       JOIN pg_class v ON v.oid = r.ev_class \
                      WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
                        AND v.oid <> d.refobjid",
                )
                .fetch_all(pool)
                .await?
            }
            Pool::MySql(pool) => super::mysql::query(
                "SELECT table_name, referenced_table_name \
                   FROM information_schema.referential_constraints \
                  WHERE constraint_schema = DATABASE()",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| Ok((super::RowExt::text(row, 0)?, super::RowExt::text(row, 1)?)))
            .collect::<sqlx::Result<_>>()?,
        };
        let ours = |name: &str| tables.iter().any(|t| t.eq_ignore_ascii_case(name));
        Ok(pairs
            .into_iter()
            .filter(|(from, to)| ours(to) && !ours(from))
            .map(|(from, to)| format!("{from} → {to}"))
            .collect())
    }

    /// Names of every index and trigger.
    async fn object_names(&self) -> Result<BTreeSet<String>> {
        let sql = match self.pool {
            Pool::Sqlite(_) => {
                "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') AND name <> $1"
            }
            Pool::Postgres(_) => {
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() AND indexname <> $1 \
                 UNION SELECT t.tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                  WHERE NOT t.tgisinternal AND c.relnamespace = to_regnamespace(current_schema())"
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

    /// The id the next row of `table` would get, where it has a counter
    /// of its own (an `id` that the database numbers).
    async fn next_id(&self, table: &str) -> Result<Option<i64>> {
        if !self.columns(table).await?.iter().any(|c| c == "id") {
            return Ok(None);
        }
        let next: Option<i64> = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT seq + 1 FROM sqlite_sequence WHERE name = $1")
                    .bind(table)
                    .fetch_optional(pool)
                    .await?
            }
            Pool::Postgres(pool) => {
                let sequence: Option<String> =
                    sqlx::query_scalar("SELECT pg_get_serial_sequence($1, 'id')")
                        .bind(table)
                        .fetch_one(pool)
                        .await?;
                match sequence {
                    None => None,
                    Some(sequence) => Some(
                        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                            "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM {sequence}"
                        )))
                        .fetch_one(pool)
                        .await?,
                    ),
                }
            }
            // MariaDB reads it live (MySQL 8 may show a cached value).
            Pool::MySql(pool) => super::mysql::query(sqlx::AssertSqlSafe(
                "SELECT CAST(auto_increment AS SIGNED) FROM information_schema.tables \
                  WHERE table_schema = DATABASE() AND table_name = $1"
                    .to_string(),
            ))
            .bind(table)
            .fetch_all(pool)
            .await?
            .first()
            .map(|row| super::RowExt::opt_int(row, 0))
            .transpose()?
            .flatten(),
        };
        Ok(next)
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
