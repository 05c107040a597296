//! `taskrunner-cli`: the binary only calls [`main`].
//!
//! - `cli/flags.rs`: the flags (clap structs, raw) and the dispatch, one
//!   arm per command.
//! - `cli/run.rs`: `run`, one task by hand (`--record`: as a try of a row).
//! - `cli/render.rs`: tables and text (`list`, `show`, `status`, `tasks`).
//! - `cli/batch.rs`, `cli/flow.rs`: the `batch` and `flow` commands.

mod batch;
mod flags;
mod flow;
mod render;
mod run;

pub use flags::main;
