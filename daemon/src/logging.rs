//! The daemon's and the CLI's log: text or JSON lines on stderr, filtered
//! by `TASKRUNNER_LOG`.

/// Sets up logging to stderr, as text or JSON lines.
pub fn init_logging(format: crate::config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    // sqlx warns of each statement slower than a second, its whole SQL in
    // the line: in an outage, of every statement that waited for another
    // process's lock, where the daemon's outage lines already say it once,
    // and beside the CLI's one error line. `TASKRUNNER_LOG=debug` shows them.
    let filter = EnvFilter::try_from_env("TASKRUNNER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sqlx::query=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
