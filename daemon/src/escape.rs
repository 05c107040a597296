//! Text from rows and from tasks, shown on a terminal or written to the text
//! log: control characters are escaped (`\n`, `\u{1b}`), so that a type name
//! or a task's stderr cannot forge log lines or send escape sequences to the
//! terminal of whoever reads them. JSON logs escape on their own. Errors
//! are shown the same way, in one line ([`error_line`]).

/// `text` with every control character escaped; one line.
pub(crate) fn one_line(text: &str) -> String {
    escape(text, false)
}

/// `text` with every control character but newlines (and tabs) escaped.
pub(crate) fn lines(text: &str) -> String {
    escape(text, true)
}

/// An error and its causes in one line, `error: cause: cause` as anyhow's
/// `{:#}` writes them, but without a cause that the line already ends with
/// (sqlx's database errors repeat theirs: "error returned from database:
/// (code: 13) database or disk is full", then the cause "(code: 13)
/// database or disk is full"), control characters escaped.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    one_line(&line)
}

fn escape(text: &str, keep_newlines: bool) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' if keep_newlines => out.push(c),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(one_line("plain ünïcode"), "plain ünïcode");
        assert_eq!(one_line("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(lines("a\nb\r\u{7}"), "a\nb\\r\\u{7}");
    }

    /// An error that names its cause in its own text, as sqlx's do.
    #[derive(Debug)]
    struct Repeats(std::io::Error);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error returned from database: {}", self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let error = anyhow::Error::new(Repeats(std::io::Error::other("disk\nfull")))
            .context("recording a result");
        assert_eq!(
            format!("{error:#}"),
            "recording a result: error returned from database: disk\nfull: disk\nfull"
        );
        assert_eq!(
            error_line(&error),
            "recording a result: error returned from database: disk\\nfull"
        );
        let plain = anyhow::anyhow!("no cause").context("outer");
        assert_eq!(error_line(&plain), "outer: no cause");
    }
}
