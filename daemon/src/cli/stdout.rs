//! The commands' standard output. A reader that goes away (`| head`) ends
//! the printing, not the command: a bulk `retry` or `cancel` still acts on
//! every row it selected, where `outln!` panicked at the first line
//! after the pipe closed and left the rest undone. Any other failure to
//! write (a full disk) is told once, at the end, and fails the command.

use std::io::{ErrorKind, Write};
use std::sync::Mutex;

/// Why standard output was given up, once it was.
static GIVEN_UP: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// Writes `text` to standard output unless it was given up.
pub(crate) fn write(text: std::fmt::Arguments<'_>) {
    let mut given_up = GIVEN_UP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if given_up.is_some() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        *given_up = Some(error);
    }
}

/// The failure to write standard output the command must report (not a
/// reader gone away), if any.
pub(crate) fn failure() -> Option<String> {
    let given_up = GIVEN_UP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match given_up.as_ref() {
        Some(error) if error.kind() != ErrorKind::BrokenPipe => {
            Some(format!("writing standard output failed: {error}"))
        }
        _ => None,
    }
}
