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

/// A scratch directory, removed when the test passes.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
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
