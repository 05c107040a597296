//! The daemon's and the CLI's log: text or JSON lines on stderr, filtered
//! by `TASKRUNNER_LOG`.
//!
//! The daemon's lines go through a bounded queue that a thread of its own
//! writes out ([`LogWriter::Queued`]): its stderr is a pipe wherever an init
//! system, a container runtime or a shell pipeline reads it, and a reader
//! that stops reading would otherwise block, at its next line, the thread
//! that claims, records outcomes and renews heartbeats. When the queue is
//! full a line is dropped and counted; the count is logged once lines are
//! written again. A line is never cut.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Where log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogWriter {
    /// Straight to stderr, by the thread that logs (the CLI: one short run,
    /// its error lines must be out before it exits).
    Stderr,
    /// Queued, and written to stderr by a thread of its own (the daemon).
    Queued,
}

/// Lines the queue holds at most: at a few hundred bytes a line, some
/// hundreds of KiB, beside the 64 KiB a pipe holds.
const QUEUE_LINES: usize = 1024;

struct Queue {
    sender: SyncSender<Vec<u8>>,
    /// Lines dropped while the queue was full, not yet reported.
    dropped: AtomicU64,
    /// Lines queued and lines written so far (see [`flush_log`]).
    progress: Mutex<(u64, u64)>,
    written: Condvar,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

impl Queue {
    fn push(&self, line: Vec<u8>) {
        // Counted under the lock before the line can be written, so that
        // `written` never passes `queued`.
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match self.sender.try_send(line) {
            Ok(()) => progress.0 += 1,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The writer thread: blocks on stderr for as long as its reader
    /// makes it; nothing else does.
    fn write_out(&self, lines: Receiver<Vec<u8>>) {
        for line in lines {
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                // Queued behind the lines waiting now (this thread is not
                // the one that writes the tracing event's line).
                tracing::warn!(
                    "{dropped} log lines were dropped: stderr was not read fast enough (is the log's reader stuck?)"
                );
            }
            // Locked for one line only: a panic's message, or the fatal
            // line of `taskrunnerd`, goes to stderr directly.
            let _ = std::io::stderr().write_all(&line);
            let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            progress.1 += 1;
            self.written.notify_all();
        }
    }
}

/// Makes one [`Line`] per event.
#[derive(Clone, Copy)]
struct Queued;

/// One event's text, queued whole when the event is formatted.
struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let (Some(queue), false) = (QUEUE.get(), self.0.is_empty()) {
            queue.push(std::mem::take(&mut self.0));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queued {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(256))
    }
}

/// Waits until every line queued so far is written, at most `within` (a
/// reader that stopped reading must not hold the daemon's exit up).
pub fn flush_log(within: Duration) {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let progress = queue.progress.lock().unwrap_or_else(|e| e.into_inner());
    let queued = progress.0;
    let _ = queue
        .written
        .wait_timeout_while(progress, within, |progress| progress.1 < queued);
}

/// Starts the queue's writer thread; `false` if it could not be started.
fn start_queue() -> bool {
    let (sender, lines) = sync_channel(QUEUE_LINES);
    let queue = QUEUE.get_or_init(|| Queue {
        sender,
        dropped: AtomicU64::new(0),
        progress: Mutex::new((0, 0)),
        written: Condvar::new(),
    });
    std::thread::Builder::new()
        .name("taskrunner-log".into())
        .spawn(move || queue.write_out(lines))
        .is_ok()
}

/// Sets up logging to stderr, as text or JSON lines.
pub fn init_logging(format: crate::config::LogFormat, writer: LogWriter) {
    if writer == LogWriter::Queued && start_queue() {
        init_with(format, Queued);
    } else {
        init_with(format, std::io::stderr);
    }
}

fn init_with<W>(format: crate::config::LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    // sqlx warns of each statement slower than a second, its whole SQL in
    // the line: in an outage, of every statement that waited for another
    // process's lock, where the daemon's outage lines already say it once,
    // and beside the CLI's one error line. `TASKRUNNER_LOG=debug` shows them.
    let filter = EnvFilter::try_from_env("TASKRUNNER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sqlx::query=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        // Field values (type names, stderr tails) with control characters
        // escaped: one event, one line, no escape sequences.
        crate::config::LogFormat::Text => builder
            .fmt_fields(tracing_subscriber::field::MakeExt::delimited(
                tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
                    let text = crate::escape::one_line(&format!("{value:?}"));
                    if field.name() == "message" {
                        write!(writer, "{text}")
                    } else {
                        write!(writer, "{}={text}", field.name())
                    }
                }),
                " ",
            ))
            .try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
