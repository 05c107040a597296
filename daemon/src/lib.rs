//! taskrunner: a database-backed task runner. Applications insert rows into
//! `task_runner_requests`; `taskrunnerd` runs each in its own OS process.
//!
//! # Code map
//!
//! - `bin/`: `taskrunnerd` and `taskrunner-cli` (flags → config → one call
//!   here → exit code) and `taskrunner-builtin-tasks` (the built-in types).
//! - [`config`]: file + flags + environment → one validated [`config::Config`];
//!   `config/http.rs` is its `http:` key (the web page's address and access);
//!   `config/task_settings.rs` declares each task setting once (key, unit,
//!   rule, default), and everything else about it is made from that list.
//! - [`request`]: ids, states, the backoff rule.
//! - [`flow`]: flows as declared (`flows:`): steps, retry, typed options,
//!   `flow post` help; pure.
//! - [`store`]: every query, one file per job (its module comment is the
//!   map): `plumbing.rs` (pools, migrations, schema check), `claims.rs`,
//!   `tries.rs` (the fenced writes, heartbeats), `reaping.rs`, `admin.rs`
//!   (enqueue, show, list, retry, cancel, purge), `housekeeping.rs`
//!   (pruning, cron slots); [`store::sql`] holds the statements, the claim
//!   and the fenced writes among them, and `Dialect`, each backend's
//!   spelling of SQL (every file of the store takes it from there);
//!   [`store::diagnose`] turns database errors into one line with the remedy;
//!   [`store::url`] shows database URLs without their password;
//!   [`store::mysql`] is what MariaDB/MySQL need beyond the shared statements
//!   (positional parameters, the claim without `RETURNING`, lock retries);
//!   `store/repair.rs` rebuilds tables loaded from a Rails `schema.rb`;
//!   [`store::compose`] is the one finalization path (batches, callbacks);
//!   [`store::flow`] is the flow step machine it calls (next step, reverts,
//!   restart, end) and `Store::flow_board`, the board's data.
//! - [`daemon`]: `taskrunnerd` while it runs: starts the parts in
//!   `daemon/` and shuts them down in order. Nothing else in the crate
//!   exists only while the daemon runs.
//!   - `daemon/scheduler.rs`: claims rows up to the free slots (and a few
//!     ahead while tasks are short), starts a try for each as a slot frees up.
//!   - `daemon/executor.rs`: one claimed try: readies its start, waits for
//!     its slot (`supervisor::Slots`), runs it ([`attempt`]), logs how it
//!     ended, hands the outcome to the recorder.
//!   - `daemon/tries.rs`: the tries this daemon runs (for the heartbeat,
//!     `status`, cancels and the drain).
//!   - `daemon/recorder.rs`: the one writer of try results, batched and retried.
//!   - `daemon/heartbeat.rs`: lease renewal, cancel delivery, self-fencing.
//!   - `daemon/wakeup.rs`: the database watcher: LISTEN/NOTIFY (PostgreSQL);
//!     SQLite: inotify on the write-ahead log, then data_version;
//!     MariaDB/MySQL: two index look-ups every 100 ms.
//!   - `daemon/checkpoint.rs`: SQLite WAL checkpoints on a connection of
//!     their own, off the writer's path.
//!   - `daemon/reaper.rs`, `daemon/pruner.rs`, `daemon/cron.rs`: the loops
//!     around one [`reaper`] pass, one [`prune`] pass and the due
//!     slots of [`cron`]'s schedules.
//!   - `daemon/control.rs`: the control socket's server side.
//!   - `daemon/view.rs`: what `status` and `/metrics` read of the running
//!     daemon (the control socket's and the web page's view).
//! - [`attempt`]: one try, from type name and options to a verdict.
//! - [`supervisor`]: one OS process per try: spawn (clone + exec from
//!   spawner threads that live as long as the daemon, off the runtime's
//!   thread, or forked by a preloaded
//!   program as the daemon's child), limits, bounded output, timeout, kill
//!   escalation; `supervisor::isolation` (non-dumpable daemon, environment
//!   allowlist, OOM preference), `supervisor::resources` (the daemon's
//!   own file descriptors) and `supervisor::cgroup` (a cgroup per try:
//!   limits for all it starts, killed whole at its end);
//!   `supervisor/slots.rs`: at most `max_concurrent` tries at once, a freed
//!   slot going to the try that waited longest, started by the spawner
//!   thread that saw the exit.
//! - [`reaper`]: one pass that marks rows whose process or daemon is gone
//!   as CRASHED (the daemon's loop and `taskrunner-cli reap`).
//! - [`cron`]: `schedules:` (5-field cron on a time zone's clock, or
//!   `every:`) and when their slots fall due; one request per slot across
//!   all daemons.
//! - [`retention`]: `retention:` rules.
//! - [`prune`]: one pass that deletes the final rows the rules allow, in
//!   small batches (the daemon's loop and `taskrunner-cli purge`).
//! - [`control`]: the control socket's protocol (`status`, `metrics`,
//!   `wake`, `stop`) and its client.
//! - [`web`]: the web page and `/metrics` over HTTP (`http:`, `taskrunner-cli web`);
//!   its queries are in [`store::web`], bounded at any table size.
//! - [`metrics`]: the Prometheus metrics: the daemon's counters and the
//!   per-queue gauges read at scrape time.
//! - [`task_types`]: which program runs a type name.
//! - [`usage`]: the user's mistakes (exit status 2), a leaf every layer may raise.
//! - [`instance`]: the daemon instance id (`claimed_by`) and the claim token.
//! - [`procinfo`]: process identity (boot id, start ticks) and the pid probe.
//! - [`service`]: pidfile, `--daemonize`, systemd notification.
//! - [`cli`]: `taskrunner-cli`: `cli/flags.rs` (clap structs and the
//!   dispatch), `cli/run.rs` (`run`, one task by hand), `cli/render.rs`
//!   (tables and text), `cli/batch.rs` and `cli/flow.rs`.
//! - [`health`], [`units`]: outage logging and backoff; durations and sizes.
//! - [`escape`]: control characters escaped in the text log and the CLI's tables.
//! - [`logging`]: the log on stderr, text or JSON lines; the daemon's
//!   through a bounded queue, so that a stuck log reader never blocks it.
//!
//! # Invariants
//!
//! Dependency rules (each command, run at the repository's root, must
//! print nothing):
//!
//! - Architecture Invariant: only `daemon.rs` and `bin/taskrunnerd.rs` name
//!   the daemon module; what exists only while `taskrunnerd` runs is under
//!   `daemon/`, and nothing outside uses it
//!   (`grep -rlE "(crate|taskrunner)::daemon\b" daemon/src tests | grep -vE "^daemon/src/(lib\.rs|daemon\.rs|daemon/|bin/taskrunnerd\.rs)"`).
//! - Architecture Invariant: `store` imports none of the services, nor
//!   `config`, nor anything that runs tries
//!   (`grep -rnE "crate::(daemon|config|cli|web|attempt|supervisor|reaper|prune|task_types|metrics|control)\b" daemon/src/store`).
//! - Architecture Invariant: the parts with no runtime (`config`, `cron`'s
//!   expressions and schedules, `retention`'s rules, `request`, `units`)
//!   touch no database and no runtime
//!   (`grep -rnE "^[^/]*(sqlx|tokio|crate::store::Store\b)" daemon/src/config.rs daemon/src/config/ daemon/src/cron.rs daemon/src/retention.rs daemon/src/request.rs daemon/src/units.rs`).
//! - Architecture Invariant: no state lives in a `static` of the daemon's
//!   binary: shutdown, a second stop and reload are `daemon::Triggers`
//!   (`grep -nE "^\s*(pub )?static " daemon/src/bin/taskrunnerd.rs`).
//! - Architecture Invariant: the live tries hand out no lock guard; every
//!   part asks `daemon/tries.rs` through its methods
//!   (`grep -n "pub fn.*MutexGuard" daemon/src/daemon/tries.rs`).
//! - Architecture Invariant: each service of the daemon (scheduler,
//!   recorder, heartbeat, reaper, pruner, cron, wakeup, checkpoint, control
//!   socket, reload) is a struct of the handles it uses, run as
//!   `async fn run(self, cancel: CancellationToken) -> anyhow::Result<()>`
//!   in the one `JoinSet` of `daemon.rs`; no part takes a shared bag of
//!   the daemon's state, and no part under `daemon/` reaches up into
//!   `daemon.rs`
//!   (`grep -LE "async fn run\((mut )?self, " daemon/src/daemon/{scheduler,recorder,heartbeat,reaper,pruner,cron,wakeup,checkpoint,control}.rs; grep -rnE "crate::daemon::|super::[a-z_]+\(" daemon/src/daemon`).
//! - Architecture Invariant: only what the binaries (`bin/`), the tests
//!   (`tests/`) and the benchmark (`bench/`) use is `pub`; everything else
//!   is `pub(crate)` or narrower, and the modules nothing outside names are
//!   private. `#![warn(unreachable_pub)]` below makes
//!   `cargo clippy --all-targets -- -D warnings` refuse a `pub` that no
//!   path from outside the crate reaches; a `pub` that is reachable but
//!   unused outside shows up as dead code when narrowed to `pub(crate)`.
//! - Architecture Invariant: the supervisor's modules import each other in
//!   one direction: `mod.rs` holds the `Spawner` that dispatches to exec
//!   (`spawner.rs`) or to a preloaded parent (`preload.rs`, which uses
//!   exec); `spawner.rs` names neither
//!   (`grep -nE "(super|supervisor)::(preload|Spawner)" daemon/src/supervisor/spawner.rs`).
//!   `slots.rs` and `spawner.rs` name each other, as two halves of one
//!   hand-over: the spawner threads hand on the slots of the exits they
//!   see, and the slots hand armed starts to those threads.
//! - A slot is released exactly once, whoever sees its process's exit first
//!   (a spawner thread, through the pidfd it watches, or the runtime once it
//!   has reaped the process): every hand-over goes through
//!   `supervisor::Slots` under its one lock, where each try's place says
//!   whether it waits, is being started, or holds a slot, and only a held
//!   slot is released. A try that stops waiting leaves the line unstarted,
//!   or, if its start was handed over already, runs and is stopped like any
//!   running try; a start nobody takes is killed and reaped
//!   (`supervisor::slots::tests`,
//!   `spawning::short_tries_started_at_each_exit_never_run_beyond_max_concurrent`).
//!
//! - A claim writes RUNNING, tries + 1, started_at, host, heartbeat_at and a
//!   fresh claim token in one atomic statement before the process starts.
//! - Architecture Invariant: only the holder of a row's claim token writes
//!   about its try (pid, progress, outcome); see [`store`].
//! - Architecture Invariant: whatever a final outcome causes (a callback
//!   row, a batch's counts and end, cancelled siblings, a periodic row's
//!   next occurrence) is written by `Store::finalize` in the transaction
//!   that records that outcome, under the lock of the parent batch row
//!   (`grep -n "fn finalize\|fn settle" daemon/src/store/compose.rs`); a
//!   flow step's next row or its flow's end likewise, under the flow row's
//!   lock (`grep -n "fn advance_flow" daemon/src/store/flow.rs`).
//! - Nothing a row contains can name a program or crash the daemon: rows
//!   name a type, the config maps types to programs, and columns are read
//!   leniently.
//! - Task processes never open the database; they speak the process
//!   protocol (options on stdin, result on stdout, exit status).
//! - Deliberately absent: no bare `fork()` of the daemon (except
//!   `--daemonize`, before the runtime starts; tasks start with
//!   `clone(CLONE_VM | CLONE_VFORK)` + `execve`, or are forked by a
//!   preloaded program with `clone(CLONE_PARENT)`, never by the daemon),
//!   no in-process task execution, no cgroup made by the task (its
//!   process joins the cgroup the daemon made for its try before it execs,
//!   see `supervisor::cgroup`; rlimits only where no cgroup can be made).

// The `pub` surface is what the binaries, tests and bench use (see the
// invariants above).
#![warn(unreachable_pub)]
// These docs are for those who work on the crate, and their links name
// private modules and items: read them with
// `cargo doc --no-deps --document-private-items -p taskrunner`.
#![allow(rustdoc::private_intra_doc_links)]

mod attempt;
pub mod cli;
pub mod config;
mod connections;
mod control;
mod cron;
pub mod daemon;
mod escape;
mod flow;
mod health;
pub mod instance;
mod logging;
mod metrics;
pub mod procinfo;
mod prune;
mod reaper;
pub mod request;
mod retention;
pub mod service;
pub mod store;
pub mod supervisor;
mod task_types;
mod test_hooks;
pub mod units;
mod usage;
pub mod web;

pub use logging::{flush_log, init_logging, LogWriter};

pub use escape::error_line;
pub use usage::{exit_code_for, parse_or_exit};
