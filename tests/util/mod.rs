//! Test harness: real databases (a SQLite file per test, a PostgreSQL
//! database and a MariaDB database per test on the servers `scripts/test`
//! starts), the real daemon binary, and waiting on conditions with deadlines.
//!
//! By concern: [`db`] (a test's database and SQL as an application writes
//! it), [`rows`] (a request row in any state, on any backend), [`polling`]
//! (waiting for a condition with a deadline), [`daemon`] (a `taskrunnerd`
//! from config parts, the CLI), [`servers`] (private database servers a
//! test may stop), [`process`] (what `/proc` tells of processes),
//! [`proxy`] (a TCP proxy that loses an answer or goes silent). Every
//! helper is re-exported here, so `crate::util::X` names it.

#![allow(dead_code)]

pub mod daemon;
pub mod db;
pub mod polling;
pub mod process;
pub mod proxy;
pub mod rows;
pub mod servers;

pub use daemon::*;
pub use db::*;
pub use polling::*;
pub use process::*;
pub use proxy::*;
pub use rows::*;
pub use servers::*;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_taskrunnerd");
pub const CLI: &str = env!("CARGO_BIN_EXE_taskrunner-cli");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MariaDB (or MySQL), through `mysql://` URLs.
    MySql,
}

/// Instantiates each async test case `fn(Backend)` as a module of one test
/// a backend, from a list `[sqlite: Sqlite, postgres: Postgres]` of test
/// names and backends (the macros below name the lists).
#[macro_export]
macro_rules! backend_tests {
    ($backends:tt $($case:ident),* $(,)?) => {
        $( $crate::backend_tests!(@case $case $backends); )*
    };
    (@case $case:ident [$($test:ident: $backend:ident),*]) => {
        mod $case {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::util::report_panics_past_the_capture();
                    super::$case($crate::util::Backend::$backend).await
                }
            )*
        }
    };
}

/// Instantiates an async test case `fn(Backend)` for every backend (SQLite,
/// PostgreSQL, MariaDB), as ripgrep runs each test under both regex engines.
/// (Named when there were two; it covers all three.)
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        $crate::backend_tests!([sqlite: Sqlite, postgres: Postgres, mysql: MySql] $($case),*);
    };
}

/// Instantiates an async test case for SQLite and PostgreSQL only: the few
/// that do not run on MariaDB yet (the SDK's typed enqueue and wait, the
/// Rails schema.rb round trip), each named in the README's list of what
/// MariaDB lacks.
#[macro_export]
macro_rules! sqlite_and_postgres {
    ($($case:ident),* $(,)?) => {
        $crate::backend_tests!([sqlite: Sqlite, postgres: Postgres] $($case),*);
    };
}

/// Instantiates an async test case for the backends that serve several
/// daemons on several hosts: PostgreSQL and MariaDB.
#[macro_export]
macro_rules! multi_host_backends {
    ($($case:ident),* $(,)?) => {
        $crate::backend_tests!([postgres: Postgres, mysql: MySql] $($case),*);
    };
}

/// A program of the workspace built beside the daemon (`cargo build
/// --workspace --bins`, which scripts/test runs first).
pub fn built_beside_the_daemon(name: &str) -> PathBuf {
    let path = PathBuf::from(DAEMON).parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Makes every panic of a test also write its place and the first lines of
/// its message straight to the process's standard error, past the
/// harness's capture (which keeps them for its report of failures at the
/// end of the run): CI's log is cut, and showed which test failed, never
/// why. The line then stands beside the test's `FAILED` in the list.
pub fn report_panics_past_the_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let harness_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            let mut text = format!(
                "--- test {} panicked at {}:\n",
                std::thread::current().name().unwrap_or("(unnamed thread)"),
                info.location()
                    .map(|place| place.to_string())
                    .unwrap_or_default()
            );
            for line in message.lines().take(12) {
                let cut: String = line.chars().take(400).collect();
                text.push_str(&cut);
                text.push('\n');
            }
            // `std::io::stderr()` is the descriptor itself: the capture
            // only takes what the print macros and the panic hook write.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
            harness_hook(info);
        }));
    });
}

/// A scratch directory, removed when the test passes.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        report_panics_past_the_capture();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "taskrunner-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
