//! `example-tasks`: a task program written with task-sdk, listed under
//! `programs:` in `examples/taskrunner.yml`. Three realistic task types
//! (`WordCount`, `FlakyStep`, `Countdown`) and two that exist for the tests
//! and for trying things out (`Inspect` echoes its parsed options, `Explode`
//! panics), and the flow `simple_http_webserver` (`web_flow.rs`: write a
//! page, serve it over HTTP; `--list-flows` declares it).
//!
//! Try one by hand, without a daemon or a database:
//! `echo 'from: 3' | TASKRUNNER_TASK=Countdown target/release/example-tasks`
//! or `taskrunner-cli --config examples/taskrunner.yml run Countdown --options 'from: 3'`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error, ResultExt, Task, Tasks};

fn main() -> ExitCode {
    Tasks::new()
        .register(WordCount)
        .register(FlakyStep)
        .register(Countdown)
        .register(Inspect)
        .register(Explode)
        .register(web_flow::WritePage)
        .register(web_flow::RemovePage)
        .register(web_flow::ServeHttp)
        .flow(web_flow::flow())
        .serve()
}

mod web_flow;

/// Counts the words of a text file and writes a report file: a file in,
/// a file out, the summary as result_text.
struct WordCount;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WordCountOptions {
    /// The text to count (relative paths resolve against the daemon's `workdir`).
    input: PathBuf,
    /// Where to write the report (`word count` lines, most frequent first);
    /// none: only the summary.
    #[serde(default)]
    output: Option<PathBuf>,
    /// How many of the most frequent words the summary names.
    #[serde(default = "default_top")]
    top: usize,
    /// Words not counted (compared in lower case).
    #[serde(default)]
    ignore: Vec<String>,
}

fn default_top() -> usize {
    3
}

impl Task for WordCount {
    const NAME: &'static str = "WordCount";
    const DESCRIPTION: &'static str =
        "counts the words of the file `input` (into `output`, if given) and names the `top` most frequent, less those in `ignore`";
    type Options = WordCountOptions;

    fn run(&self, options: WordCountOptions, context: &Context) -> task_sdk::Result<String> {
        let text = std::fs::read_to_string(&options.input)
            .context(format!("reading {}", options.input.display()))?;
        let ignore: Vec<String> = options
            .ignore
            .iter()
            .map(|word| word.to_lowercase())
            .collect();
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        let lines = text.lines().count().max(1);
        for (number, line) in text.lines().enumerate() {
            for word in line
                .split(|c: char| !c.is_alphanumeric() && c != '\'')
                .map(|word| word.trim_matches('\'').to_lowercase())
                .filter(|word| !word.is_empty() && !ignore.contains(word))
            {
                total += 1;
                *counts.entry(word).or_default() += 1;
            }
            if (number + 1) % 10_000 == 0 {
                context.progress(format!(
                    "{}% of the lines counted",
                    (number + 1) * 100 / lines
                ));
            }
        }
        let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if let Some(output) = &options.output {
            let report: String = ranked
                .iter()
                .map(|(word, count)| format!("{word} {count}\n"))
                .collect();
            // Write beside, then rename: a retried or crashed try never leaves half a report.
            let partial = output.with_extension("partial");
            std::fs::write(&partial, report).context(format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, output)
                .context(format!("renaming to {}", output.display()))?;
        }
        let top: Vec<String> = ranked
            .iter()
            .take(options.top)
            .map(|(word, count)| format!("{word} ({count})"))
            .collect();
        Ok(format!(
            "{total} words, {} distinct in {}; top: {}",
            ranked.len(),
            options.input.display(),
            top.join(", ")
        ))
    }
}

/// A step that calls an unreliable service: it fails until try
/// `succeed_on_try` (default 2), which shows retries with backoff and an
/// error chain in result_text.
struct FlakyStep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyStepOptions {
    /// What the step is called, for the messages.
    #[serde(default = "default_step")]
    step: String,
    /// The first try that succeeds.
    #[serde(default = "default_succeed_on_try")]
    succeed_on_try: u32,
}

fn default_step() -> String {
    "sync".to_string()
}

fn default_succeed_on_try() -> u32 {
    2
}

impl Task for FlakyStep {
    const NAME: &'static str = "FlakyStep";
    type Options = FlakyStepOptions;

    fn run(&self, options: FlakyStepOptions, context: &Context) -> task_sdk::Result<String> {
        if context.try_number < options.succeed_on_try {
            let refused =
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
            return Err(Error::from(refused)
                .context("calling the upstream service")
                .context(format!(
                    "step `{}` failed on try {}",
                    options.step, context.try_number
                )));
        }
        Ok(format!(
            "step `{}` succeeded on try {}",
            options.step, context.try_number
        ))
    }
}

/// Counts down, reporting progress at each step, and stops cleanly when
/// the daemon asks (cancel, timeout, shutdown).
struct Countdown;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountdownOptions {
    /// Where to start.
    #[serde(default = "default_from")]
    from: u32,
    /// Milliseconds between steps.
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
}

fn default_from() -> u32 {
    5
}

fn default_interval_ms() -> u64 {
    1000
}

impl Task for Countdown {
    const NAME: &'static str = "Countdown";
    type Options = CountdownOptions;

    fn run(&self, options: CountdownOptions, context: &Context) -> task_sdk::Result<String> {
        // Opt in to a clean stop before the first wait.
        context.stop_requested();
        for left in (1..=options.from).rev() {
            context.progress(format!("{left} left"));
            std::thread::sleep(Duration::from_millis(options.interval_ms));
            if context.stop_requested() {
                // A real task would remove temporary files, release locks, …
                context.log(format!("cleaning up: stopped with {} left", left - 1));
                return Err(Error::msg(format!("stopped with {} left", left - 1)));
            }
        }
        Ok(format!("liftoff after {} steps", options.from))
    }
}

/// For tests and demonstration: echoes its typed options back as YAML, to
/// show that nested maps, lists and Ruby-style `:key:` options arrive intact.
struct Inspect;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InspectOptions {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    limits: BTreeMap<String, u64>,
    #[serde(default)]
    owner: Option<Owner>,
    #[serde(default)]
    steps: Vec<Step>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Owner {
    name: String,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    run: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

impl Task for Inspect {
    const NAME: &'static str = "Inspect";
    type Options = InspectOptions;

    fn run(&self, options: InspectOptions, _: &Context) -> task_sdk::Result<String> {
        Ok(serde_yaml::to_string(&options)?)
    }
}

/// For tests and demonstration: panics with `message`, to show that a panic
/// is a failed try whose result_text carries the message.
struct Explode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplodeOptions {
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "boom".to_string()
}

impl Task for Explode {
    const NAME: &'static str = "Explode";
    type Options = ExplodeOptions;

    fn run(&self, options: ExplodeOptions, _: &Context) -> task_sdk::Result<String> {
        panic!("{}", options.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> Tasks {
        Tasks::new()
            .register(WordCount)
            .register(FlakyStep)
            .register(Countdown)
            .register(Inspect)
            .register(Explode)
    }

    #[test]
    fn word_count_writes_a_report_and_summarises() {
        let dir = std::env::temp_dir().join(format!("example-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.txt");
        let output = dir.join("out.txt");
        std::fs::write(&input, "The cat saw the dog.\nThe dog didn't care.\n").unwrap();
        let options = format!(
            "input: {}\noutput: {}\ntop: 2\nignore: [saw]\n",
            input.display(),
            output.display()
        );
        let text = tasks()
            .run_one("WordCount", options.as_bytes(), &Context::for_test(1, 1))
            .unwrap();
        assert!(text.starts_with("8 words, 5 distinct in "), "{text}");
        assert!(text.ends_with("top: the (3), dog (2)"), "{text}");
        assert!(std::fs::read_to_string(&output)
            .unwrap()
            .starts_with("the 3\ndog 2\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn word_count_names_the_missing_file() {
        let error = tasks()
            .run_one(
                "WordCount",
                b"input: /nonexistent/in.txt",
                &Context::for_test(1, 1),
            )
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("reading /nonexistent/in.txt: "),
            "{error}"
        );
    }

    #[test]
    fn flaky_step_fails_first_then_succeeds() {
        let error = tasks()
            .run_one("FlakyStep", b"", &Context::for_test(1, 1))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "step `sync` failed on try 1: calling the upstream service: connection refused"
        );
        let text = tasks()
            .run_one("FlakyStep", b"", &Context::for_test(1, 2))
            .unwrap();
        assert_eq!(text, "step `sync` succeeded on try 2");
    }

    #[test]
    fn countdown_counts_down() {
        let text = tasks()
            .run_one(
                "Countdown",
                b"from: 2\ninterval_ms: 1",
                &Context::for_test(1, 1),
            )
            .unwrap();
        assert_eq!(text, "liftoff after 2 steps");
    }

    #[test]
    fn misspelt_options_are_rejected() {
        let error = tasks()
            .run_one("Countdown", b"form: 2", &Context::for_test(1, 1))
            .unwrap_err();
        assert!(matches!(error, task_sdk::RunError::Rejected(_)), "{error}");
    }
}
