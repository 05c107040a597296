//! Database servers of a test's own, for tests that stop or restart the
//! server (the shared ones serve every other test at the same time).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use taskrunner::store::{Purpose, Store};

use super::db::{mysql_app_pool, Raw};
use super::{wait_until, Backend, Scratch, TestDb};

/// A PostgreSQL server of the test's own, for tests that stop or restart
/// the server (the shared one serves every other test at the same time).
pub struct PrivatePostgres {
    pub url: String,
    dir: PathBuf,
    bin: PathBuf,
    as_root: bool,
    port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test installs it)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let port = super::free_port();
        let dir = Scratch::new("private-pg").path.clone();
        // Keep the directory: Scratch would remove it at the end of this fn.
        std::fs::create_dir_all(&dir).unwrap();
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        }
        let server = PrivatePostgres {
            url: format!("postgres://taskrunner@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            as_root,
            port,
        };
        let data = server.dir.join("data");
        let status = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "taskrunner", "--auth=trust"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        server.pg_ctl("start");
        server
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// `pg_ctl start|stop|restart`, waiting for it to finish.
    pub fn pg_ctl(&self, action: &str) {
        let data = self.dir.join("data");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-m", "fast"]);
        if action != "stop" {
            command.args(["-o", &options]);
        }
        let status = command.arg(action).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "pg_ctl {action} failed");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut command = self.command("pg_ctl");
        let _ = command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A MariaDB server of the test's own, for tests that stop or restart the
/// server: a throwaway data directory, 127.0.0.1 and a free port, no grant
/// tables, durability off (as `scripts/test` starts the shared one).
pub struct PrivateMariaDb {
    pub url: String,
    dir: PathBuf,
    port: u16,
    server: Option<Child>,
}

impl PrivateMariaDb {
    pub fn start() -> PrivateMariaDb {
        let port = super::free_port();
        let dir = Scratch::new("private-mariadb").path.clone();
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--user={}", current_user()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            // A temporary directory of its own: a server starting removes
            // every `#sql…` file it finds in its temporary directory,
            // another server's included.
            .arg(format!("--tmpdir={}", dir.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadb-install-db runs (scripts/test installs mariadb-server)");
        assert!(status.success(), "mariadb-install-db failed");
        let mut server = PrivateMariaDb {
            url: format!("mysql://root@127.0.0.1:{port}/mysql"),
            dir,
            port,
            server: None,
        };
        server.start_again();
        server
    }

    /// Starts the server (again) and waits until it answers.
    pub fn start_again(&mut self) {
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--user={}", current_user()))
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("server.log").display()
            ))
            .arg(format!("--tmpdir={}", self.dir.display()))
            .args([
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd runs");
        self.server = Some(child);
        let port = self.port.to_string();
        wait_until(
            Duration::from_secs(60),
            "the private MariaDB to answer",
            || {
                Command::new("mariadb")
                    .args([
                        "--no-defaults",
                        "-h",
                        "127.0.0.1",
                        "-P",
                        &port,
                        "-u",
                        "root",
                    ])
                    .args(["-e", "SELECT 1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// Stops the server (SIGTERM: a clean shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_string(), |user| user.name)
}

/// A private server of either kind that serves several hosts.
pub enum PrivateServer {
    Postgres(PrivatePostgres),
    MySql(PrivateMariaDb),
}

impl PrivateServer {
    pub fn start(backend: Backend) -> PrivateServer {
        match backend {
            Backend::Postgres => PrivateServer::Postgres(PrivatePostgres::start()),
            Backend::MySql => PrivateServer::MySql(PrivateMariaDb::start()),
            Backend::Sqlite => panic!("SQLite has no server"),
        }
    }

    pub fn url(&self) -> &str {
        match self {
            PrivateServer::Postgres(server) => &server.url,
            PrivateServer::MySql(server) => &server.url,
        }
    }

    pub fn stop(&mut self) {
        match self {
            PrivateServer::Postgres(server) => server.pg_ctl("stop"),
            PrivateServer::MySql(server) => server.stop(),
        }
    }

    pub fn start_again(&mut self) {
        match self {
            PrivateServer::Postgres(server) => server.pg_ctl("start"),
            PrivateServer::MySql(server) => server.start_again(),
        }
    }

    /// Whether some client's bytes wait unread in one of the server's
    /// connections (read from `/proc/net/tcp`): a statement on its way
    /// that a frozen server will never answer.
    pub fn has_unread_requests(&self) -> bool {
        let port = match self {
            PrivateServer::Postgres(server) => server.port,
            PrivateServer::MySql(server) => server.port,
        };
        let local = format!(":{port:04X}");
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                Some((*fields.get(1)?, *fields.get(4)?))
            })
            .any(|(address, queues)| {
                let unread = queues.split_once(':').map_or("0", |(_, rx)| rx);
                address.ends_with(&local) && u64::from_str_radix(unread, 16).unwrap_or(0) > 0
            })
    }

    /// Stops the server's processes with SIGSTOP: it keeps its connections
    /// and answers nothing (a hung server, or one behind a network that
    /// drops every packet), until the returned guard is dropped.
    pub fn freeze(&self) -> Frozen {
        let pids = match self {
            PrivateServer::Postgres(server) => {
                let pid_file = server.dir.join("data").join("postmaster.pid");
                let text = std::fs::read_to_string(&pid_file).expect("postmaster.pid");
                let postmaster: i32 = text.lines().next().unwrap().trim().parse().unwrap();
                // The postmaster and every backend it started.
                let mut pids = vec![postmaster];
                for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                        continue;
                    };
                    let stat =
                        std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                    let parent = after_name.split_whitespace().nth(1);
                    if parent == Some(postmaster.to_string().as_str()) {
                        pids.push(pid);
                    }
                }
                pids
            }
            PrivateServer::MySql(server) => {
                vec![server.server.as_ref().expect("the server runs").id() as i32]
            }
        };
        for &pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        Frozen { pids }
    }

    /// A migrated test database on this server.
    pub async fn test_db(&self) -> TestDb {
        match self {
            PrivateServer::Postgres(server) => TestDb::on_server(&server.url).await,
            PrivateServer::MySql(server) => {
                let admin = mysql_app_pool(&server.url).await;
                sqlx::raw_sql("CREATE DATABASE taskrunner")
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
                let url = server.url.replace("/mysql", "/taskrunner");
                let store = Store::open(&url, Purpose::Migrate).unwrap();
                store.migrate().await.expect("migrating");
                TestDb {
                    backend: Backend::MySql,
                    url: url.clone(),
                    store,
                    scratch: Scratch::new("mariadb-private"),
                    raw: Raw::MySql(mysql_app_pool(&url).await),
                }
            }
        }
    }
}

/// A server stopped by [`PrivateServer::freeze`]; dropping this lets it go on.
pub struct Frozen {
    pids: Vec<i32>,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}
