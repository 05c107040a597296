//! Typed options of callbacks: what taskrunner hands a batch's
//! `on_complete`/`on_failure` task ([`BatchCallback`]) and a request's
//! `on_success`/`on_failure` task ([`RequestCallback`]).
//!
//! ```
//! use serde::Deserialize;
//! use task_sdk::{BatchCallback, Context, Task};
//!
//! #[derive(Deserialize)]
//! struct Film {
//!     film: String,
//! }
//!
//! struct ComposeVideo;
//!
//! impl Task for ComposeVideo {
//!     const NAME: &'static str = "ComposeVideo";
//!     // The batch's own options, and its summary under `batch:`.
//!     type Options = BatchCallback<Film>;
//!     fn run(&self, options: Self::Options, _: &Context) -> task_sdk::Result<String> {
//!         Ok(format!("{}: {} frames", options.options.film, options.batch.finished))
//!     }
//! }
//!
//! let yaml = b"film: a.mp4\nbatch: {id: 7, name: frames, state: FINISHED, total: 3, pending: 0, finished: 3, failed: 0, cancelled: 0}\n";
//! let tasks = task_sdk::Tasks::new().register(ComposeVideo);
//! assert_eq!(tasks.run_one("ComposeVideo", yaml, &Context::for_test(9, 1)).unwrap(), "a.mp4: 3 frames");
//! ```

use serde::Deserialize;

/// The options of a batch's callback: the batch's own options (`O`, a
/// struct of yours, or `()`-like [`NoOptions`]) and the `batch:` summary.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchCallback<O> {
    /// The batch's options.
    #[serde(flatten)]
    pub options: O,
    /// How the batch ended.
    pub batch: BatchSummary,
}

/// How a batch ended, as its callback sees it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BatchSummary {
    /// The batch's id (also in `TASKRUNNER_BATCH_ID`).
    pub id: i64,
    /// Its name, if it has one.
    #[serde(default)]
    pub name: Option<String>,
    /// `FINISHED` or `FAILED`.
    pub state: String,
    /// Members in all.
    pub total: i64,
    /// Members not final (a fail-fast batch's running members).
    pub pending: i64,
    /// Members that FINISHED.
    pub finished: i64,
    /// Members exhausted or REJECTED.
    pub failed: i64,
    /// Members cancelled.
    pub cancelled: i64,
    /// The batch whose callback created this one, in a chain.
    #[serde(default)]
    pub parent_batch_id: Option<i64>,
    /// After a failure: the member that failed.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// What taskrunner left out or shortened so that the callback's options
    /// stay within `max_options` (and 8 MiB on MariaDB/MySQL):
    /// `result_text` (the failure's, its end kept, after `…`), `merged` (the
    /// batch's options not merged in). Empty when nothing was.
    #[serde(default)]
    pub cut: Vec<String>,
}

/// The member whose failure failed a batch.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// Its request id.
    pub id: i64,
    /// Its task type.
    pub task: String,
    /// Its final state (`FAILED`, `CRASHED`, `TIMEOUT`, `REJECTED`, `CANCELLED`).
    #[serde(default)]
    pub result: Option<String>,
    /// Its result text (the error).
    #[serde(default)]
    pub result_text: Option<String>,
}

/// The options of a request's callback: the parent's own options (`O`)
/// and the `parent:` summary.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestCallback<O> {
    /// The parent request's options.
    #[serde(flatten)]
    pub options: O,
    /// The request whose end created this callback.
    pub parent: Parent,
}

/// The request a callback answers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Parent {
    /// Its id.
    pub id: i64,
    /// Its task type.
    pub task: String,
    /// Its options, as stored (YAML text).
    #[serde(default)]
    pub options: Option<String>,
    /// Its final state.
    #[serde(default)]
    pub result: Option<String>,
    /// Its result text.
    #[serde(default)]
    pub result_text: Option<String>,
    /// What taskrunner left out or shortened so that the callback's options
    /// stay within `max_options` (and 8 MiB on MariaDB/MySQL): `options`
    /// (left out), `result_text` (its end kept, after `…`), `merged` (the
    /// parent's options not merged in). Empty when nothing was.
    #[serde(default)]
    pub cut: Vec<String>,
}

/// Options of a batch or request that has none (any keys are ignored).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct NoOptions {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_callback_summary_says_what_was_cut_and_an_uncut_one_nothing() {
        let yaml = "order: 7\nparent: {id: 1, task: Charge, options: null, result: FINISHED, result_text: '…the end', cut: [options, result_text]}\n";
        let callback: RequestCallback<NoOptions> = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(callback.parent.cut, ["options", "result_text"]);
        assert_eq!(callback.parent.options, None);
        let yaml = "parent: {id: 1, task: Charge, options: 'order: 7', result: FINISHED}\n";
        let callback: RequestCallback<NoOptions> = serde_yaml::from_str(yaml).unwrap();
        assert!(callback.parent.cut.is_empty());
    }
}
