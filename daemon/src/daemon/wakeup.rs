//! Wakes the scheduler when rows are added by others, without polling the
//! table: on PostgreSQL a trigger NOTIFYs `task_runner_requests` and every
//! daemon LISTENs. On SQLite, `PRAGMA data_version` on a connection of its
//! own changes whenever another connection commits (a check that reads no
//! table); it is checked when inotify reports a write to the database's
//! write-ahead log, and then every few milliseconds until the commit shows
//! (the log is written before the commit is published in the shared-memory
//! index, which no inotify event reports), and once every [`SAFETY_NET`]
//! besides.
//!
//! The same loop checks, once a second, that the file is still the one
//! the daemon opened ([`OpenedFile`]).
//!
//! MariaDB/MySQL have no NOTIFY: every [`MYSQL_CHECK`] the daemon reads the
//! newest id, the first claimable row's id and the first delayed row's due
//! time, look-ups at the ends of the primary key and of two indexes (no
//! table scan), and the newest flow's id, and wakes when one changed: a new
//! row, an old one made runnable again or its delay changed, a new flow.
//!
//! Measured (scripts/bench, a plain INSERT by another process into an idle
//! daemon): the 100 ms `data_version` poll this replaces started rows 26 ms
//! after their insert at p50 and 84 ms at p99; see docs/performance.md for
//! the watch's numbers. An idle daemon checks once a second instead of ten
//! times.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio::sync::Notify;

use crate::health::Backoff;
use crate::store::{SideConnection, Store};
use crate::units::format_duration;

/// The NOTIFY channel written by the trigger in the PostgreSQL migration.
pub(crate) const CHANNEL: &str = "task_runner_requests";

/// How often SQLite's data version is checked while the log is watched, in
/// case a write escapes the watch.
const SAFETY_NET: Duration = Duration::from_secs(1);

/// How often it is checked where the log cannot be watched.
const POLL_WITHOUT_WATCH: Duration = Duration::from_millis(100);

/// After a write to the log, how long the checks go on while its commit
/// does not show (then only the [`SAFETY_NET`] is left), and the delay
/// between them ([`recheck_after`]): every millisecond for a few (an
/// inserter with SQLite's default `synchronous=FULL` syncs the log before
/// it publishes the commit), then 2, 4 and 8 ms, then every
/// [`RECHECK_AT_MOST_EVERY`]. When the checks ended after 130 ms, a commit
/// published later (its inserter descheduled, or its sync slow, on a loaded
/// machine) waited for the next safety check: 943 ms once in CI
/// (`core::a_row_inserted_by_another_process_starts_at_once`). When they
/// ended after 518 ms, their delay doubled up to 256 ms, a commit whose
/// sync took 600 ms started 936 ms after its commit, and one published
/// 263 ms after its write waited 255 ms
/// (`core::a_commit_published_long_after_its_write_to_the_log_starts_at_once`).
/// The daemon's own commits show at the first check and end the checks.
const RECHECK_FOR: Duration = Duration::from_secs(2);

/// The longest delay between two checks while a commit is awaited.
const RECHECK_AT_MOST_EVERY: Duration = Duration::from_millis(16);

/// The delay before the next check when `done` checks since the write did
/// not show its commit (see [`RECHECK_FOR`]).
fn recheck_after(done: u32) -> Duration {
    const EVERY_MILLISECOND: u32 = 8;
    match done.checked_sub(EVERY_MILLISECOND) {
        None => Duration::from_millis(1),
        Some(doubled) => Duration::from_millis(2u64 << doubled.min(8)).min(RECHECK_AT_MOST_EVERY),
    }
}

/// How often MariaDB/MySQL are checked for new rows: new rows are noticed
/// within 200 ms at worst, 50 ms on average.
pub(crate) const MYSQL_CHECK: Duration = Duration::from_millis(100);

/// PostgreSQL: how often the LISTEN connection is pinged. A connection
/// whose server went away without a word (a failover without a reset, a
/// network that drops packets) delivers no notification and reports no
/// error; one that does not answer the ping in 5 s is replaced.
const LISTEN_CHECK: Duration = Duration::from_secs(10);

/// Wakes the scheduler when others add rows (see the module's doc).
pub(super) struct Wakeup {
    pub(super) store: Store,
    /// The database's URL, for SQLite's connection and watch of its own.
    pub(super) database_url: String,
    /// Poll now (the scheduler's).
    pub(super) wake: Arc<Notify>,
}

impl Wakeup {
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        if self.store.postgres_pool().is_some() {
            self.listen_postgres(cancel).await
        } else if self.store.mysql_pool().is_some() {
            self.check_mysql(cancel).await
        } else {
            self.watch_sqlite(cancel).await?;
        }
        Ok(())
    }
}

impl Wakeup {
    async fn check_mysql(&self, stop: CancellationToken) {
        let pool = self
            .store
            .mysql_pool()
            .expect("checked by the caller")
            .clone();
        // The newest row, the first claimable one, the newest flow, and when
        // the first row waiting for its delay is due (which the scheduler
        // learns by claiming, to release the row then).
        type Seen = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);
        let mut last: Option<Seen> = None;
        let mut interval = tokio::time::interval(MYSQL_CHECK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.store.count_statements(1);
            let check = sqlx::query_as::<_, Seen>(
                "SELECT (SELECT max(id) FROM task_runner_requests), \
                    (SELECT id FROM task_runner_requests WHERE ready_rank IS NOT NULL \
                      ORDER BY ready_rank, id LIMIT 1), \
                    (SELECT max(id) FROM task_runner_flows), \
                    (SELECT CAST(UNIX_TIMESTAMP(min(waiting_until)) * 1000000 AS SIGNED) \
                       FROM task_runner_requests)",
            );
            let check = async { Ok(check.fetch_one(&pool).await?) };
            match self.store.answered(check).await {
                Ok(seen) => {
                    // The first check wakes too: rows may have arrived between
                    // the scheduler's first claim and this check.
                    let new_flow = last.is_none_or(|last| last.2 != seen.2);
                    let new_row = last.is_none_or(|last| last != seen)
                        && (seen.1.is_some() || seen.3.is_some());
                    if new_flow || new_row {
                        self.wake.notify_one();
                    }
                    last = Some(seen);
                }
                // The poll covers an outage; the store's users report it.
                Err(error) => tracing::debug!("checking for new rows: {error}"),
            }
        }
    }

    async fn listen_postgres(&self, stop: CancellationToken) {
        let pool = self
            .store
            .postgres_pool()
            .expect("checked by the caller")
            .clone();
        let mut backoff = Backoff::default();
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::debug!("LISTEN connection failed: {error}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let listen = async { Ok(listener.listen(CHANNEL).await?) };
            if let Err(error) = self.store.answered(listen).await {
                tracing::debug!("LISTEN failed: {}", crate::error_line(&error));
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    _ = stop.cancelled() => return,
                }
            }
            backoff.reset();
            // Rows may have arrived while we were not listening.
            self.wake.notify_one();
            let mut check = tokio::time::interval_at(Instant::now() + LISTEN_CHECK, LISTEN_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    notification = listener.try_recv() => match notification {
                        Ok(Some(_)) => self.wake.notify_one(),
                        // The connection dropped: the poll covers the gap, and we reconnect.
                        Ok(None) | Err(_) => break,
                    },
                    _ = check.tick() => {
                        self.store.count_statements(1);
                        let ping = sqlx::query("SELECT 1").execute(&mut listener);
                        if let Err(error) = crate::store::within_ping_bound(ping).await {
                            tracing::info!("the LISTEN connection failed its check ({error}): listening on a new one");
                            self.store.giving_up_on_a_connection();
                            break;
                        }
                    }
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Ends with an error when the database file is deleted or replaced
    /// (see [`OpenedFile`]): the daemon then stops, exit status 1.
    async fn watch_sqlite(&self, stop: CancellationToken) -> anyhow::Result<()> {
        let url = self.database_url.clone();
        let mut opened = OpenedFile::of(&url);
        let mut next_file_check = Instant::now() + FILE_CHECK;
        let mut side = SideConnection::new(&url);
        // The check on this thread where it can be (see `DataVersion`),
        // else through sqlx's connection and its worker thread.
        let mut direct = DataVersion::open(&url);
        let mut log_watch = match LogWatch::open(&url) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::info!(
                "not watching the SQLite write-ahead log ({error}): other processes' rows are noticed within {}",
                format_duration(POLL_WITHOUT_WATCH)
            );
                None
            }
        };
        let safety_net = if log_watch.is_some() {
            SAFETY_NET
        } else {
            POLL_WITHOUT_WATCH
        };
        let mut last_version: Option<i64> = None;
        // After the log was written to: when, how many checks did not see
        // its commit since, and when the next one is due.
        let mut rechecks: Option<(Instant, u32, Instant)> = None;
        let mut next_safety_check = Instant::now();
        loop {
            let recheck_at = rechecks.map(|(_, _, at)| at);
            tokio::select! {
                _ = tokio::time::sleep_until(next_safety_check) => {}
                written = wait_written(log_watch.as_mut()) => match written {
                    // Checked now; again soon if the commit is not visible yet.
                    Ok(()) => rechecks = Some((Instant::now(), 0, Instant::now())),
                    Err(error) => {
                        tracing::warn!(
                            "stopped watching the SQLite write-ahead log ({error}): other processes' rows are noticed within {}",
                            format_duration(POLL_WITHOUT_WATCH)
                        );
                        log_watch = None;
                    }
                },
                _ = crate::units::sleep_until_opt(recheck_at) => {}
                _ = stop.cancelled() => break,
            }
            let safety_net = if log_watch.is_some() {
                safety_net
            } else {
                POLL_WITHOUT_WATCH
            };
            next_safety_check = Instant::now() + safety_net;
            let version = match direct.as_mut() {
                Some(direct) => {
                    self.store.count_statements(1);
                    direct.read().map_err(|code| {
                        sqlx::Error::Protocol(format!("PRAGMA data_version: SQLite error {code}"))
                    })
                }
                None => match side.get().await {
                    Some(connection) => {
                        self.store.count_statements(1);
                        let check = sqlx::query_scalar::<_, i64>("PRAGMA data_version");
                        check.fetch_one(connection).await
                    }
                    None => Err(sqlx::Error::Protocol(
                        "the side connection cannot be opened".to_string(),
                    )),
                },
            };
            match version {
                Ok(version) => {
                    // The first read of a connection wakes the scheduler too:
                    // a row committed between its last claim and this read
                    // changes nothing later (before, it waited for the next
                    // commit of anyone's, or the poll). Each connection counts
                    // on its own, so a new one starts afresh (`None`).
                    let changed = last_version.is_none_or(|last| last != version);
                    if changed {
                        self.wake.notify_one();
                    }
                    last_version = Some(version);
                    rechecks = match rechecks {
                        Some((written, done, _)) if !changed && written.elapsed() < RECHECK_FOR => {
                            Some((written, done + 1, Instant::now() + recheck_after(done)))
                        }
                        _ => None,
                    };
                }
                // From then on through sqlx, which reconnects after errors.
                Err(error) if direct.is_some() => {
                    tracing::debug!("SQLite change check on its own connection: {error}");
                    direct = None;
                    last_version = None;
                }
                Err(error) => {
                    last_version = None;
                    // Tried again at the safety net's next check, not at
                    // once: a recheck already due fired the loop again at
                    // once, for as long as the check failed (a whole CPU,
                    // a connection attempt each time), and the file's check
                    // below was skipped meanwhile.
                    rechecks = None;
                    side.failed(&error);
                }
            }
            if Instant::now() >= next_file_check {
                next_file_check = Instant::now() + FILE_CHECK;
                // The side connection, once the watcher's own is gone (an
                // error of its check), holds them as well; one closed by an
                // error does not, and they are noted afresh.
                let held_open = direct.is_some() || side.is_open();
                if let Some(Err(error)) = opened.as_mut().map(|file| file.check(held_open)) {
                    side.close().await;
                    return Err(error);
                }
            }
        }
        side.close().await;
        Ok(())
    }
}

/// How often the SQLite database file is checked for having been deleted
/// or replaced.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// The SQLite database file the daemon opened, by device and inode. Deleted
/// or replaced under a running daemon (an operator's `rm` to start afresh
/// and a `migrate` that made a new one, a restore from a backup moved into
/// place), it left the daemon on the old file, which its connections keep
/// open, while applications wrote their rows into the new one: none ran,
/// and nothing said so. The daemon now stops (exit status 1), and its
/// service manager's restart opens the new file.
///
/// The same for its write-ahead log and shared-memory index (`-wal`,
/// `-shm`, beside the file a symbolic link names), from when each is first
/// seen, while the watcher's own connection keeps them open (SQLite
/// removes them only as the last connection closes): deleted under a
/// running daemon (the folk remedy for "database is locked", a clean-up
/// script), applications made new ones and the daemon kept the old, saw
/// none of their commits, and its next write overwrote them in the log,
/// rows lost without a word.
struct OpenedFile {
    path: std::path::PathBuf,
    identity: (u64, u64),
    /// `-wal` and `-shm`, each with its identity once seen.
    companions: Vec<(std::path::PathBuf, Option<(u64, u64)>)>,
}

impl OpenedFile {
    /// The file as it is now; `None` for an in-memory database, or one that
    /// cannot be read (then there is nothing to compare).
    fn of(url: &str) -> Option<OpenedFile> {
        use std::os::unix::fs::MetadataExt;
        let options = SqliteConnectOptions::from_str(url).ok()?;
        let path = options.get_filename().to_path_buf();
        let metadata = std::fs::metadata(&path).ok()?;
        let resolved = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let companions = ["-wal", "-shm"]
            .iter()
            .map(|suffix| {
                let mut name = resolved.clone().into_os_string();
                name.push(suffix);
                let seen = std::fs::metadata(&name)
                    .ok()
                    .map(|metadata| (metadata.dev(), metadata.ino()));
                (std::path::PathBuf::from(name), seen)
            })
            .collect();
        Some(OpenedFile {
            identity: (metadata.dev(), metadata.ino()),
            path,
            companions,
        })
    }

    /// `held_open`: whether a connection of the watcher's was open since
    /// the companions' identities were noted (else SQLite may have removed
    /// and made them again, rightly).
    fn check(&mut self, held_open: bool) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == self.identity => {}
            // Unreadable for a moment (permissions changed, say): not proof.
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {}
            _ => anyhow::bail!(
                "the SQLite database file {} is no longer the one this daemon opened (deleted, or replaced by another file): it would go on with the old one, which no one else reads or writes any more; stopping, so that a restart opens the file now there",
                self.path.display()
            ),
        }
        for (path, seen) in &mut self.companions {
            let now = match std::fs::metadata(&*path) {
                Ok(metadata) => Some((metadata.dev(), metadata.ino())),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(_) => continue,
            };
            match (*seen, now) {
                (Some(seen), now) if held_open && now != Some(seen) => anyhow::bail!(
                    "{} was deleted or replaced while this daemon had it open (a `rm` of SQLite's write-ahead log or shared-memory index under a running daemon): the daemon and the processes that opened it since no longer see each other's commits, and their rows would be lost; stopping, so that a restart opens the files now there (remove them only while no process has the database open)",
                    path.display()
                ),
                _ => *seen = now,
            }
        }
        Ok(())
    }
}

/// `PRAGMA data_version` on a read-only SQLite connection of the watcher's
/// own, prepared once and stepped on the caller's thread. Through sqlx each
/// check was a round trip to the connection's worker thread (a wake-up
/// there and one back), and the daemon's own commits make most checks: a
/// write to the log is an inotify event whoever wrote it. The check itself
/// reads SQLite's shared-memory index (no table, no file read, no wait:
/// without a busy handler a locked index is an error, and the next check
/// comes soon).
struct DataVersion {
    db: *mut libsqlite3_sys::sqlite3,
    statement: *mut libsqlite3_sys::sqlite3_stmt,
}

// SAFETY: the connection is opened with SQLITE_OPEN_NOMUTEX and used by one
// thread at a time (the owner's, through `&mut self`), which SQLite allows
// for a connection of its own moved between threads.
unsafe impl Send for DataVersion {}

impl DataVersion {
    /// None for an in-memory database, or when SQLite cannot open the file.
    fn open(url: &str) -> Option<DataVersion> {
        use libsqlite3_sys as ffi;
        use std::os::unix::ffi::OsStrExt;
        let options = SqliteConnectOptions::from_str(url).ok()?;
        let path = options.get_filename();
        if path.as_os_str().is_empty() || path.as_os_str().as_bytes() == b":memory:" {
            return None;
        }
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut version = DataVersion {
            db: std::ptr::null_mut(),
            statement: std::ptr::null_mut(),
        };
        // SAFETY: a NUL-terminated path and out-pointers to our fields; a
        // handle returned with an error is closed by the drop.
        let opened = unsafe {
            ffi::sqlite3_open_v2(
                path.as_ptr(),
                &mut version.db,
                ffi::SQLITE_OPEN_READONLY | ffi::SQLITE_OPEN_NOMUTEX,
                std::ptr::null(),
            )
        };
        if opened != ffi::SQLITE_OK {
            return None;
        }
        let sql = c"PRAGMA data_version";
        // SAFETY: an open connection, a NUL-terminated statement (-1: up to
        // the NUL), an out-pointer to our field.
        let prepared = unsafe {
            ffi::sqlite3_prepare_v2(
                version.db,
                sql.as_ptr(),
                -1,
                &mut version.statement,
                std::ptr::null_mut(),
            )
        };
        (prepared == ffi::SQLITE_OK && !version.statement.is_null()).then_some(version)
    }

    /// The data version now, or SQLite's error code.
    fn read(&mut self) -> Result<i64, i32> {
        use libsqlite3_sys as ffi;
        // SAFETY: our prepared statement on our open connection, reset
        // after each step so that the next starts afresh.
        unsafe {
            let stepped = ffi::sqlite3_step(self.statement);
            let result = if stepped == ffi::SQLITE_ROW {
                Ok(ffi::sqlite3_column_int64(self.statement, 0))
            } else {
                Err(stepped)
            };
            ffi::sqlite3_reset(self.statement);
            result
        }
    }
}

impl Drop for DataVersion {
    fn drop(&mut self) {
        // SAFETY: our statement and connection, each released once (both
        // accept null).
        unsafe {
            libsqlite3_sys::sqlite3_finalize(self.statement);
            libsqlite3_sys::sqlite3_close(self.db);
        }
    }
}

async fn wait_written(watch: Option<&mut LogWatch>) -> std::io::Result<()> {
    match watch {
        Some(watch) => watch.written().await,
        None => std::future::pending().await,
    }
}

/// An inotify watch on the database's directory, reporting writes to its
/// write-ahead log (`NAME-wal`). The directory, not the file: SQLite deletes
/// the log when its last connection closes and creates it anew.
struct LogWatch {
    inotify: AsyncFd<OwnedFd>,
    log_name: Vec<u8>,
}

impl LogWatch {
    fn open(url: &str) -> std::io::Result<LogWatch> {
        use std::os::unix::ffi::OsStrExt;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        // SQLite keeps the log beside the file a symbolic link names (its
        // own path resolved), not beside the link: before, a
        // `database_url` naming a link was watched for a log never written,
        // and rows waited for the safety check.
        let database = std::fs::canonicalize(options.get_filename())
            .unwrap_or_else(|_| options.get_filename().to_path_buf());
        let (Some(directory), Some(name)) = (database.parent(), database.file_name()) else {
            return Err(std::io::Error::other("an in-memory database"));
        };
        if name.is_empty() || name.as_bytes() == b":memory:" {
            return Err(std::io::Error::other("an in-memory database"));
        }
        let directory = if directory.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            directory
        };
        let mut log_name = name.as_bytes().to_vec();
        log_name.extend_from_slice(b"-wal");
        // SAFETY: inotify_init1 has no preconditions; it returns a new descriptor.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned only here.
        let inotify = unsafe { OwnedFd::from_raw_fd(raw) };
        let directory_c = std::ffi::CString::new(directory.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("a NUL byte in the database path"))?;
        // SAFETY: a NUL-terminated path and our inotify descriptor.
        let watch = unsafe {
            libc::inotify_add_watch(
                inotify.as_raw_fd(),
                directory_c.as_ptr(),
                libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO,
            )
        };
        if watch < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd stays open, on the same inotify instance, for
        // as long as the AsyncFd owns it.
        let inotify =
            unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)?;
        Ok(LogWatch { inotify, log_name })
    }

    /// Returns once the log has been written to since the last call.
    async fn written(&mut self) -> std::io::Result<()> {
        let mut buffer = [0u8; 4096];
        loop {
            let mut ready = self.inotify.readable().await?;
            let mut written = false;
            loop {
                // SAFETY: read into a local buffer from our descriptor.
                let count = unsafe {
                    libc::read(
                        self.inotify.get_ref().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                    )
                };
                if count < 0 {
                    let error = std::io::Error::last_os_error();
                    match error.kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => break,
                        _ => return Err(error),
                    }
                }
                written |= self.names_the_log(&buffer[..count as usize]);
            }
            ready.clear_ready();
            if written {
                return Ok(());
            }
        }
    }

    /// Whether any of the events read names the log (or lost some events).
    fn names_the_log(&self, mut events: &[u8]) -> bool {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut found = false;
        while events.len() >= HEADER {
            // SAFETY: the kernel wrote a whole event header here; read unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(events.as_ptr().cast()) };
            let end = (HEADER + event.len as usize).min(events.len());
            let name = &events[HEADER..end];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if event.mask & libc::IN_Q_OVERFLOW != 0 || name == self.log_name.as_slice() {
                found = true;
            }
            events = &events[end..];
        }
        found
    }
}
