//! `taskrunner-cli` as a newcomer meets it: what `migrate` says it did, one
//! line naming the database and the remedy for each database error, and the
//! options and filters a job-runner user expects.

use std::process::Command;

use crate::util::{cli, Backend, Scratch, TestDb, CLI};

both_backends!(migrate_says_what_it_did);

/// `taskrunner-cli` with only the given arguments (no test database).
fn bare_cli(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(CLI)
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("running taskrunner-cli");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The error line: exactly one line on stderr.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    lines[0]
}

async fn migrate_says_what_it_did(backend: Backend) {
    let db = TestDb::unmigrated(backend).await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains(": created (version "), "{stdout}");
    let (_, stdout, _) = cli(&db, &["migrate"]);
    assert!(stdout.contains(": up to date (version "), "{stdout}");
    let latest = db
        .scalar("SELECT max(version) FROM task_runner_schema_migrations")
        .await;
    // Forget the last migration (it can run again: it replaces an index).
    db.execute("DELETE FROM task_runner_schema_migrations WHERE version = 3")
        .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stderr}");
    if latest == 3 {
        assert!(
            stdout.contains(": upgraded from version 2 to 3"),
            "{stdout}"
        );
    } else {
        assert!(stdout.contains(": up to date"), "{stdout}");
    }
}

#[test]
fn missing_sqlite_file_says_to_migrate() {
    let scratch = Scratch::new("missing-db");
    let url = format!("sqlite://{}", scratch.join("requests.db").display());
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", &url, "list"]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(line.contains("requests.db does not exist yet"), "{line}");
    assert!(line.contains("taskrunner-cli migrate"), "{line}");
    assert!(
        !scratch.join("requests.db").exists(),
        "list creates nothing"
    );
}

#[test]
fn missing_sqlite_directory_is_named() {
    let scratch = Scratch::new("missing-dir");
    let url = format!("sqlite://{}", scratch.join("nowhere/requests.db").display());
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", &url, "migrate"]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(line.contains("the directory "), "{line}");
    assert!(line.contains("nowhere of the SQLite database"), "{line}");
    assert!(line.contains("does not exist"), "{line}");
}

/// Runs the CLI as user `nobody` (the tests run as root, which passes every
/// permission check); skipped when not root.
fn cli_as_nobody(dir: &std::path::Path, args: &[&str]) -> Option<(i32, String)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run as another user");
        return None;
    }
    let output = Command::new("runuser")
        .args(["-u", "nobody", "--", CLI])
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("runuser");
    Some((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn permission_denied_names_the_directory_or_file_and_the_user() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("perm");
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Every directory above must be enterable by nobody.
    let db = scratch.join("requests.db");
    let url = format!("sqlite://{}", db.display());
    // A directory nobody cannot write: no database can be created there.
    let Some((status, stderr)) = cli_as_nobody(&scratch.path, &["--database-url", &url, "migrate"])
    else {
        return;
    };
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.starts_with("taskrunner-cli: permission denied: user nobody (uid "),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "directory {} (owner root:root, mode 0755)",
            scratch.path.display()
        )),
        "{line}"
    );
    // A file nobody cannot write.
    assert_eq!(
        bare_cli(&scratch.path, &["--database-url", &url, "migrate"]).0,
        0
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, stderr) =
        cli_as_nobody(&scratch.path, &["--database-url", &url, "enqueue", "NoOp"]).unwrap();
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.contains(&format!(
            "cannot write the file {} (owner root:root, mode 0644)",
            db.display()
        )),
        "{line}"
    );
}

#[test]
fn refused_postgres_connection_names_host_and_port() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let scratch = Scratch::new("refused");
    let url = format!("postgres://taskrunner@127.0.0.1:{port}/tasks");
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", &url, "list"]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.contains(&format!(
            "PostgreSQL at 127.0.0.1:{port}: connection refused"
        )),
        "{line}"
    );
}

#[test]
fn unknown_postgres_host_is_named() {
    let scratch = Scratch::new("unknown-host");
    let url = "postgres://taskrunner@no-such-host.invalid/tasks";
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", url, "list"]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.contains("unknown host `no-such-host.invalid`"),
        "{line}"
    );
}

#[test]
fn missing_postgres_database_says_createdb() {
    let admin = crate::util::postgres_admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let url = format!("{base}/taskrunner_never_created");
    let scratch = Scratch::new("no-pg-db");
    let (status, _, stderr) = bare_cli(&scratch.path, &["--database-url", &url, "list"]);
    assert_eq!(status, 1);
    let line = one_line(&stderr);
    assert!(
        line.contains("\"taskrunner_never_created\" does not exist: create it (createdb"),
        "{line}"
    );
}
