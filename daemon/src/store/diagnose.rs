//! Database errors as one line that names the database and the remedy.
//!
//! sqlx's own messages repeat themselves through their error chains ("unable
//! to open database file: (code: 14) unable to open database file") and say
//! neither which file nor what to do; a refused PostgreSQL connection even
//! surfaces as "pool timed out". So before opening a SQLite file we check
//! the file system ourselves ([`check_sqlite_access`]), and an error from
//! PostgreSQL is replaced by a line built from its cause ([`explain`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::anyhow;
use nix::unistd::AccessFlags;
use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use super::Purpose;

/// The SQLite database file a URL names (None for `:memory:` and other URLs).
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    (!path.as_os_str().is_empty() && path != Path::new(":memory:")).then(|| path.to_path_buf())
}

/// Checks, before SQLite is asked, that this user can use the database file
/// at `path` and create its `-wal` and `-shm` files beside it. Only the
/// daemon and `migrate` create a missing file; the other commands say how to
/// create it. Root passes every permission check, as it does in SQLite.
pub(crate) fn check_sqlite_access(path: &Path, purpose: Purpose) -> anyhow::Result<()> {
    let shown = path.display();
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !directory.is_dir() {
        return Err(anyhow!(
            "the directory {} of the SQLite database {shown} does not exist: create it (mkdir -p), or fix database_url",
            directory.display()
        ));
    }
    if !path.exists() {
        if purpose == Purpose::Cli {
            return Err(anyhow!(
                "the SQLite database {shown} does not exist yet: run `taskrunner-cli migrate` or start taskrunnerd, which create it (or fix database_url)"
            ));
        }
        return require(
            &directory,
            AccessFlags::W_OK | AccessFlags::X_OK,
            "create the database in",
        );
    }
    require(path, AccessFlags::R_OK | AccessFlags::W_OK, "write")?;
    let mut side_files_missing = false;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            require(&side, AccessFlags::R_OK | AccessFlags::W_OK, "write")?;
        } else {
            side_files_missing = true;
        }
    }
    if side_files_missing {
        require(
            &directory,
            AccessFlags::W_OK | AccessFlags::X_OK,
            "create the SQLite -wal and -shm files in",
        )?;
    }
    Ok(())
}

/// `Ok` if this process may `flags` on `path`; else the one-line error
/// naming the path, its owner and mode, and the user.
fn require(path: &Path, flags: AccessFlags, doing: &str) -> anyhow::Result<()> {
    if nix::unistd::access(path, flags).is_ok() {
        return Ok(());
    }
    use std::os::unix::fs::MetadataExt;
    let kind = if path.is_dir() { "directory" } else { "file" };
    let owner = std::fs::metadata(path)
        .map(|m| {
            format!(
                "owner {}:{}, mode {:04o}",
                user_name(m.uid()),
                group_name(m.gid()),
                m.mode() & 0o7777
            )
        })
        .unwrap_or_else(|_| "not readable".into());
    let me = nix::unistd::geteuid().as_raw();
    Err(anyhow!(
        "permission denied: user {} (uid {me}) cannot {doing} the {kind} {} ({owner}): give the user write access, e.g. a group shared with the daemon's user and mode g+rw on the file (g+rwx on its directory; see README, \"Sharing the SQLite file\")",
        user_name(me),
        path.display()
    ))
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// Replaces a database error by one line naming the database and what to
/// do, when its cause is one we can name; other errors pass unchanged.
pub(crate) async fn explain(error: anyhow::Error, url: &str) -> anyhow::Error {
    let display_url = super::url::redact_url(url);
    let Some(sqlx_error) = error.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) else {
        return error;
    };
    if url.starts_with("sqlite:") {
        return match sqlx_error {
            sqlx::Error::Database(db) => {
                let path =
                    sqlite_path(url).map_or(display_url.clone(), |p| p.display().to_string());
                let message = db.message();
                match db.code().as_deref() {
                    // SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PERM.
                    Some("8" | "14" | "3") => anyhow!(
                        "the SQLite database {path}: {message}: check that this user ({}) may write it and its directory (the -wal and -shm files are created there)",
                        user_name(nix::unistd::geteuid().as_raw())
                    ),
                    _ => anyhow!("the SQLite database {path}: {message}"),
                }
            }
            _ => error,
        };
    }
    let mysql = url.starts_with("mysql:") || url.starts_with("mariadb:");
    let (host, port, database, server) = if mysql {
        let Ok(options) = MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
        else {
            return error;
        };
        let host = options.get_host().to_string();
        let port = options.get_port();
        let server = format!("MariaDB/MySQL at {host}:{port}");
        (
            host,
            port,
            options.get_database().map(str::to_string),
            server,
        )
    } else {
        let Ok(options) = PgConnectOptions::from_str(url) else {
            return error;
        };
        let host = options.get_host().to_string();
        let port = options.get_port();
        let server = if host.starts_with('/') {
            format!("PostgreSQL (socket directory {host}, port {port})")
        } else {
            format!("PostgreSQL at {host}:{port}")
        };
        (
            host,
            port,
            options.get_database().map(str::to_string),
            server,
        )
    };
    let database = database.as_deref().unwrap_or("NAME");
    match sqlx_error {
        // invalid_catalog_name: the database was never created.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => anyhow!(
            "{server}: {}: create it (createdb -h {host} -p {port} {database}), then run `taskrunner-cli migrate` (database URL {display_url})",
            db.message(),
        ),
        // ER_BAD_DB_ERROR (1049): the same on MariaDB/MySQL.
        sqlx::Error::Database(db) if mysql && db.code().as_deref() == Some("42000") && db.message().contains("Unknown database") => anyhow!(
            "{server}: {}: create it (mysql -h {host} -P {port} -e 'CREATE DATABASE {database}'), then run `taskrunner-cli migrate` (database URL {display_url})",
            db.message(),
        ),
        // duplicate_prepared_statement, invalid_sql_statement_name: the
        // driver's own prepared statements found on another connection, or
        // missing from this one.
        sqlx::Error::Database(db)
            if !mysql
                && matches!(db.code().as_deref(), Some("42P05" | "26000"))
                && db.message().contains("sqlx_s_") =>
        {
            anyhow!(
                "{server}, database URL {display_url}: {}: a connection pooler hands each transaction another server connection \
                 (PgBouncer's pool_mode = transaction or statement): taskrunner needs session mode (pool_mode = session)",
                db.message()
            )
        }
        sqlx::Error::Database(db) => anyhow!(
            "{server}, database URL {display_url}: {}",
            db.message()
        ),
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            refused(&server, &display_url)
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
            match probe(&host, port).await {
                Probe::Refused => refused(&server, &display_url),
                Probe::UnknownHost => unknown_host(&host, &display_url),
                Probe::NoAnswer => anyhow!(
                    "{server} does not answer (no connection within 5s): check the host, the port and any firewall (database URL {display_url})"
                ),
                Probe::Reached => error,
            }
        }
        other if other.to_string().contains("failed to lookup address") => {
            unknown_host(&host, &display_url)
        }
        _ => error,
    }
}

fn refused(server: &str, display_url: &str) -> anyhow::Error {
    let service = if server.starts_with("MariaDB") {
        "mariadb"
    } else {
        "postgresql"
    };
    anyhow!(
        "{server}: connection refused: start the server (systemctl start {service}), or fix the host and port of the database URL {display_url}"
    )
}

fn unknown_host(host: &str, display_url: &str) -> anyhow::Error {
    anyhow!("unknown host `{host}` (no such name in DNS or /etc/hosts): fix the host of the database URL {display_url}")
}

enum Probe {
    Reached,
    Refused,
    UnknownHost,
    NoAnswer,
}

/// Tries a plain connection to the server, to tell why the pool could not.
async fn probe(host: &str, port: u16) -> Probe {
    let attempt = async {
        if host.starts_with('/') {
            let socket = format!("{host}/.s.PGSQL.{port}");
            return match tokio::net::UnixStream::connect(&socket).await {
                Ok(_) => Probe::Reached,
                Err(_) => Probe::Refused,
            };
        }
        let addresses = match tokio::net::lookup_host((host, port)).await {
            Ok(addresses) => addresses.collect::<Vec<_>>(),
            Err(_) => return Probe::UnknownHost,
        };
        if addresses.is_empty() {
            return Probe::UnknownHost;
        }
        match tokio::net::TcpStream::connect(&addresses[..]).await {
            Ok(_) => Probe::Reached,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
            Err(_) => Probe::NoAnswer,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or(Probe::NoAnswer)
}
