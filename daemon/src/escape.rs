//! Text from rows and from tasks, shown on a terminal or written to the text
//! log: control characters are escaped (`\n`, `\u{1b}`), so that a type name
//! or a task's stderr cannot forge log lines or send escape sequences to the
//! terminal of whoever reads them. JSON logs escape on their own.

/// `text` with every control character escaped; one line.
pub(crate) fn one_line(text: &str) -> String {
    escape(text, false)
}

/// `text` with every control character but newlines (and tabs) escaped.
pub(crate) fn lines(text: &str) -> String {
    escape(text, true)
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
}
