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
