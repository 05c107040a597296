//! `taskrunner-cli`: the binary only calls [`main`].
//!
//! - `cli/flags.rs`: the flags (clap structs, raw) and the dispatch, one
//!   arm per command.
//! - `cli/run.rs`: `run`, one task by hand (`--record`: as a try of a row).
//! - `cli/render.rs`: tables and text (`list`, `show`, `status`, `tasks`).
//! - `cli/batch.rs`, `cli/flow.rs`: the `batch` and `flow` commands.
//! - `cli/stdout.rs`: the commands' output (`out!`, `outln!`), which a
//!   reader gone away (`| head`) does not stop halfway.

/// `print!` for the commands' output, through [`stdout::write`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!($($arg)*))
    };
}

/// `println!` for the commands' output, through [`stdout::write`].
macro_rules! outln {
    () => {
        $crate::cli::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod batch;
mod flags;
mod flow;
mod render;
mod run;
mod stdout;

pub use flags::main;
