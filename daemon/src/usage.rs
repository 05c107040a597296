//! A mistake of the user's, told apart from every other error by its exit
//! status. A leaf: it imports nothing of the crate, so that `config`, the
//! task registry and the CLI can all raise it without importing upwards.

/// A mistake of the user's (bad flag, bad config): exit status 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit status for an error: 2 for usage and config mistakes, 1 otherwise.
pub fn exit_code_for(error: &anyhow::Error) -> u8 {
    if error.chain().any(|cause| cause.is::<UsageError>()) {
        2
    } else {
        1
    }
}

/// Parses the command line as `T`, or exits: with the help or version
/// asked for, or with status 2 and one line, `PROGRAM: what was wrong (see
/// --help)`. Clap's own report of a bad flag is three to six lines (the
/// error, a usage block, a hint), where every other mistake is one.
pub fn parse_or_exit<T: clap::Parser>(program: &str) -> T {
    use clap::error::ErrorKind;
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            error.exit()
        }
        Err(error) => {
            eprintln!("{program}: {} (see --help)", one_line(&error.to_string()));
            std::process::exit(2)
        }
    }
}

/// Clap's report as one line: its first paragraph (the usage block and the
/// hint after it left out), without the `error: ` prefix, lines joined.
fn one_line(report: &str) -> String {
    let first = report.split("\n\n").next().unwrap_or(report);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    first
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_clap_report_becomes_one_line() {
        assert_eq!(
            super::one_line(
                "error: the following required arguments were not provided:\n  <ID>\n\nUsage: taskrunner-cli show <ID>\n\nFor more information, try '--help'.\n"
            ),
            "the following required arguments were not provided: <ID>"
        );
        assert_eq!(
            super::one_line("error: invalid value 'abc' for '<ID>': request id must be a number, not `abc`\n\nFor more information, try '--help'.\n"),
            "invalid value 'abc' for '<ID>': request id must be a number, not `abc`"
        );
    }
}
