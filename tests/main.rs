//! The integration suite: one test binary (one link), a module per area.
//! Every behaviour test runs on SQLite, PostgreSQL and MariaDB (`both_backends!`).

#[macro_use]
mod util;

mod batches;
mod cancel;
mod cgroups;
mod claim_ahead;
mod cli;
mod core;
mod faults;
mod flows;
mod hardening;
mod mysql;
mod ops;
mod placement;
mod preload;
mod rails;
mod recording;
mod scheduling;
mod sdk;
mod spawning;
mod web;
