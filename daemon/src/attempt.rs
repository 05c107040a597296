//! One try of one request, from type name and options to a verdict: checks
//! the options, finds the program, runs it under the supervisor, and reads
//! its end as a state and a result text. Used by the daemon (for claimed
//! rows) and by `taskrunner-cli run` (without a database).

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::request::{RequestId, State};
use crate::supervisor::{self, Ended, Gate, Launch, Spawned, Spawner, StopReason, Stopped};
use crate::task_types::{Registry, Setup};

/// The outcome to record for a claimed row's try: the backoff for a failed,
/// crashed or timed-out try, the try given back for an interrupted one.
pub(crate) fn outcome(
    row: &crate::request::Claimed,
    verdict: &Verdict,
    config: &Config,
) -> crate::store::Outcome {
    let retry_after = matches!(
        verdict.state,
        State::Failed | State::Crashed | State::Timeout
    )
    .then(|| {
        if verdict.at_once {
            return 0.0;
        }
        asked_retry_after(verdict).unwrap_or_else(|| {
            let settings = config.settings_for(&row.task_class_name);
            crate::request::Backoff {
                delay: settings.retry_delay,
                multiplier: settings.retry_multiplier,
                jitter: settings.retry_jitter,
            }
            .seconds(row.id, row.tries)
        })
    });
    // What the request's end causes is written with the outcome that ends
    // it, on the finalization path. A member's or a hooked row's every
    // outcome takes that path: the outcome write may turn it final even
    // when the verdict does not (a cancel written while it ran makes a
    // failure with tries left, or a give-back, CANCELLED), and its flow's
    // next step or its next occurrence must come with it. A plain row's
    // end causes nothing.
    let hooked = row.periodic
        || row.has_callbacks
        || config.on_exhausted_for(&row.task_class_name).is_some();
    crate::store::Outcome {
        id: row.id,
        claim_token: row.claim_token.clone(),
        state: verdict.state,
        result_text: verdict.result_text.clone(),
        retry_after,
        give_back_try: verdict.state == State::Interrupted,
        composed: row.batch_id.is_some() || hooked,
    }
}

/// One claimed row's try, the one sequence the daemon's executor and
/// `taskrunner-cli run --record` both follow: the row's options, try
/// number, batch and claim token go to the process; its pid goes to
/// `write` as soon as it runs (fenced by the claim token, like every write
/// about a try); its end becomes the verdict and the outcome to record
/// (backoff, the try given back, what a final outcome causes). The caller
/// hands the outcome to the same writer ([`Write::Outcome`]) once it has
/// done what must come first (the daemon forgets the live try before its
/// row stops being RUNNING).
///
/// `write` is where this try's writes go: the daemon's recorder (batched,
/// retried through outages) or a task of the CLI's that applies each with
/// [`crate::store::Store::record`], as the recorder does.
///
/// [`Write::Outcome`]: crate::store::Write::Outcome
///
/// `gate` is the supervisor's (see [`supervisor::run`]): what the try
/// waits for once it is ready to start; one that never starts gets
/// [`not_started`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_claimed(
    context: &Context,
    row: &crate::request::Claimed,
    echo_stderr: bool,
    gate: Gate<impl std::future::Future<Output = ()>>,
    stop: watch::Receiver<Option<StopReason>>,
    progress: Option<watch::Sender<Option<String>>>,
    write: impl Fn(crate::store::Write),
    on_running: impl FnOnce(&Spawned),
) -> (Verdict, crate::store::Outcome) {
    let input = TryInput {
        id: Some(row.id),
        task: &row.task_class_name,
        options: &row.options,
        try_number: row.tries,
        echo_stderr,
        batch_id: row.batch_for_env(),
        claim_token: Some(row.claim_token.as_str()),
        options_left_out: (row.options.is_empty() && row.options_length > 0)
            .then_some(row.options_length),
    };
    let on_running = |spawned: &Spawned| {
        on_running(spawned);
        write(crate::store::Write::Pid {
            id: row.id,
            claim_token: row.claim_token.clone(),
            pid: i64::from(spawned.pid),
            boot_id: crate::procinfo::boot_id(),
            start_ticks: spawned.start_ticks,
        });
    };
    let left_out = (row.options.is_empty() && row.options_length > 0)
        .then_some(row.options_length)
        .filter(|length| *length <= context.config.max_options);
    let verdict = if row.cancel_requested {
        // Cancelled while it waited (plain SQL sets `cancel_requested_at`
        // without knowing whether the row runs yet): not started, as a
        // rejected try is not, and its slot is never taken.
        Verdict::new(State::Cancelled, "cancelled before it ran")
    } else if let Some(length) = left_out {
        // Left out of a claim ahead of a free slot (see the scheduler's
        // AHEAD_OPTIONS), not for max_options: given back without a try,
        // and claimed again into a free slot with its options.
        Verdict::new(
            State::Interrupted,
            format!(
                "given back before it started: its options ({}) are claimed only into a free slot",
                crate::units::format_size(length)
            ),
        )
    } else {
        run(context, input, gate, stop, progress, on_running).await
    };
    // What the outcome causes, and its backoff, by the config of its end:
    // a reload while the try ran may have added an `on_exhausted` rule,
    // which the store already applies. Read from the try's own config, the
    // outcome took the plain path, and the alert was never made.
    let config = Setup::current_config(&context.setup);
    let outcome = outcome(row, &verdict, &config);
    (verdict, outcome)
}

/// The verdict of a try that stopped waiting at its gate, or for its
/// preloaded start (then `stopped` says why): the caller knows why, and its
/// verdict replaces this one.
pub(crate) fn not_started(stopped: Option<StopReason>) -> Verdict {
    Verdict {
        never_started: true,
        stopped_before_start: stopped,
        ..Verdict::new(State::Interrupted, "given back before it started")
    }
}

/// The delay a failed task asked for before its next try, in place of the
/// backoff: its last `retry_after: DURATION` line on standard error (in the
/// kept tail; a line that is not a duration is passed over), at most a day.
/// A rate-limited API's `Retry-After`, or a file not there yet: the task
/// knows better than the backoff. The try counts as any failed one.
fn asked_retry_after(verdict: &Verdict) -> Option<f64> {
    if verdict.state != State::Failed {
        return None;
    }
    verdict
        .stderr_tail
        .as_deref()?
        .lines()
        .rev()
        .find_map(|line| {
            let asked = line.trim_end_matches('\r').strip_prefix(RETRY_AFTER)?;
            // Not `parse_duration`, which refuses more than a hundred
            // years: more than a day is a day (before, such a line was
            // passed over, and the short backoff ran the next try soon).
            crate::units::seconds_of(asked).ok().filter(|s| !s.is_nan())
        })
        .map(|delay| delay.min(crate::request::LONGEST_BACKOFF))
}

/// How a task's standard error line asking for its next try's delay begins.
const RETRY_AFTER: &str = "retry_after: ";

/// Exit status meaning "these options do not fit this type" (EX_DATAERR).
pub(crate) const EXIT_REJECTED: i32 = 65;

/// What a try came to: the row's next `result` and `result_text`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) state: State,
    pub(crate) result_text: String,
    /// The stderr tail of a failed try, for the daemon's log.
    pub(crate) stderr_tail: Option<String>,
    /// How long starting the process took (clone and exec), if it started.
    pub(crate) spawn_took: Option<std::time::Duration>,
    /// When each step of its start happened, if it started.
    pub(crate) start_times: Option<supervisor::StartTimes>,
    /// The process could not be started for the daemon's own lack of
    /// resources: the try is given back, and the scheduler backs off.
    pub(crate) daemon_short: bool,
    /// It stopped waiting at its gate ([`not_started`]).
    pub(crate) never_started: bool,
    /// Runs again at once, its try counted all the same: a try its daemon
    /// stopped for the daemon's own trouble (its claim lost, or not
    /// renewed in time), as one whose daemon died is (SPEC.md).
    pub(crate) at_once: bool,
    /// The stop that ended its wait for a preloaded start, if one did.
    pub(crate) stopped_before_start: Option<StopReason>,
}

impl Verdict {
    pub(crate) fn new(state: State, result_text: impl Into<String>) -> Verdict {
        Verdict {
            state,
            result_text: result_text.into(),
            stderr_tail: None,
            spawn_took: None,
            start_times: None,
            daemon_short: false,
            never_started: false,
            at_once: false,
            stopped_before_start: None,
        }
    }
}

/// What the try runs.
pub(crate) struct TryInput<'a> {
    /// `None` for `taskrunner-cli run TASK` (no row).
    pub(crate) id: Option<RequestId>,
    pub(crate) task: &'a str,
    pub(crate) options: &'a [u8],
    pub(crate) try_number: i64,
    /// Copy the task's standard error to ours live (`taskrunner-cli run`).
    pub(crate) echo_stderr: bool,
    /// `TASKRUNNER_BATCH_ID`: the member's batch, or the batch a callback answers.
    pub(crate) batch_id: Option<i64>,
    /// The row's claim token, which names the try's cgroup.
    pub(crate) claim_token: Option<&'a str>,
    /// The length of the row's options when the claim left them out
    /// (longer than `max_options`: the try is rejected; a row left out by
    /// a claim ahead is given back before it gets here, see
    /// [`run_claimed`]); `None`: `options` is the whole value.
    pub(crate) options_left_out: Option<u64>,
}

/// The parts of the daemon (or CLI) a try needs.
pub(crate) struct Context {
    /// The config this try runs under.
    pub(crate) config: Arc<Config>,
    /// The current setup: its task types resolve the try's type, and a
    /// re-read of the programs' task lists is sent back through it.
    pub(crate) setup: watch::Sender<Setup>,
    pub(crate) spawner: Spawner,
}

/// Runs one try and returns its verdict. Never fails: every problem is a
/// verdict. `on_running` is the supervisor's (see [`supervisor::run`]); it
/// is not called for a try whose process never started. So is `gate`: a
/// try that stops waiting there gets the verdict [`not_started`]; one
/// rejected before it (its type or options) never waits, and dropping the
/// gate gives back a slot it holds.
pub(crate) async fn run(
    context: &Context,
    input: TryInput<'_>,
    gate: Gate<impl std::future::Future<Output = ()>>,
    stop: watch::Receiver<Option<StopReason>>,
    progress: Option<watch::Sender<Option<String>>>,
    on_running: impl FnOnce(&Spawned),
) -> Verdict {
    // A row from before migration 0004 may name a type no config can
    // declare: rejected at its first try rather than failed five times.
    let name_length = input.task.chars().count();
    if name_length > crate::request::MAX_TASK_NAME {
        return Verdict::new(
            State::Rejected,
            format!(
                "task_class_name is {name_length} characters long (at most {}): no task type has such a name",
                crate::request::MAX_TASK_NAME
            ),
        );
    }
    let max_options = context.config.max_options;
    let options_length = input.options_left_out.unwrap_or(input.options.len() as u64);
    if options_length > max_options {
        return Verdict::new(
            State::Rejected,
            format!(
                "options are {}, more than max_options {}",
                crate::units::format_size(options_length),
                crate::units::format_size(max_options)
            ),
        );
    }
    // Parsing large options takes a while: never on the runtime's thread.
    let checked = if input.options.len() > 16 * 1024 {
        let options = input.options.to_vec();
        tokio::task::spawn_blocking(move || crate::request::check_options(&options))
            .await
            .unwrap_or_else(|_| Err("the YAML check panicked".to_string()))
    } else {
        crate::request::check_options(input.options)
    };
    if let Err(error) = checked {
        return Verdict::new(
            State::Rejected,
            format!("options are not valid YAML: {error}"),
        );
    }
    let resolved = match resolve(context, input.task).await {
        Ok(Some(resolved)) => resolved,
        Ok(None) => {
            let known = context.setup.borrow().registry.names(&context.config);
            return Verdict::new(
                State::Failed,
                format!(
                    "unknown task type `{}`; known types: {}",
                    input.task,
                    known.join(", ")
                ),
            );
        }
        Err(short) => return given_back_short(&short),
    };
    let mut env = vec![
        ("TASKRUNNER_TASK".to_string(), input.task.to_string()),
        ("TASKRUNNER_TRY".to_string(), input.try_number.to_string()),
    ];
    env.push((
        "TASKRUNNER_REQUEST_ID".to_string(),
        input.id.map_or("0".to_string(), |id| id.to_string()),
    ));
    if let Some(batch_id) = input.batch_id {
        env.push(("TASKRUNNER_BATCH_ID".to_string(), batch_id.to_string()));
    }
    let launch = Launch {
        program: resolved.program,
        args: resolved.args,
        settings: resolved.settings,
        env,
        stdin: input.options.to_vec(),
        echo_stderr: input.echo_stderr,
        preload: resolved.preload,
        cgroup_key: input
            .claim_token
            .zip(input.id)
            .map(|(token, id)| supervisor::cgroup::try_key(token, id.0)),
    };
    match supervisor::run(&context.spawner, launch, gate, stop, progress, on_running).await {
        Ok(ended) => Verdict {
            spawn_took: Some(ended.spawn_took),
            start_times: Some(ended.start_times),
            ..judge(&ended)
        },
        Err(error) => match supervisor::not_started(&error) {
            Some(stopped) => not_started(stopped),
            None if supervisor::is_daemon_short(&error) => given_back_short(&error),
            None => Verdict::new(State::Failed, error.to_string()),
        },
    }
}

/// A try given back, uncounted, because the daemon ran short of
/// descriptors, processes or memory before its task began.
fn given_back_short(error: &std::io::Error) -> Verdict {
    Verdict {
        daemon_short: true,
        ..Verdict::new(
            State::Interrupted,
            format!("given back before it started: the daemon is short of resources ({error})"),
        )
    }
}

/// When the last re-read of the programs' task lists ended, and how (see
/// [`resolve`]).
static REREAD: tokio::sync::Mutex<Option<(tokio::time::Instant, Reread)>> =
    tokio::sync::Mutex::const_new(None);

/// How a re-read of the programs' task lists ended.
#[derive(Debug, Clone)]
enum Reread {
    /// The registry was replaced with what the programs said.
    Found,
    /// It failed: a type not known before stays unknown.
    Failed,
    /// It failed for the daemon's own shortage (why): the try is given back.
    Short(String),
}

/// Resolves a type; an unknown one makes us re-read the programs' task lists
/// first (a deploy may have added it). A re-read that failed for the
/// daemon's own shortage (no descriptor or process to ask a program with)
/// is that error, [`DaemonShort`](supervisor::DaemonShort): the try
/// is given back, where an unknown type would fail it (before, it did).
async fn resolve(
    context: &Context,
    task: &str,
) -> Result<Option<crate::task_types::Resolved>, std::io::Error> {
    let current = context.setup.borrow().registry.clone();
    if let Some(resolved) = current.resolve(&context.config, task) {
        return Ok(Some(resolved));
    }
    if context.config.programs.is_empty() {
        return Ok(None);
    }
    // One re-read at a time, for every try that met an unknown type while
    // it ran: a re-read that ended after this try asked has answered for
    // it, whatever it found or failed with (before, each try re-read every
    // program, at once: a thousand rows of a mistyped type booted each
    // program a thousand times, holding slots and the blocking pool's
    // threads; and one answer failing, each waiting try would fail its own
    // in turn, a program that hangs 30 s apiece). A type added by a deploy
    // during that re-read may be missed: the try fails as an unknown type,
    // counted, and its retry finds it.
    let asked = tokio::time::Instant::now();
    let mut last = REREAD.lock().await;
    if let Some((ended, reread)) = &*last {
        if *ended >= asked {
            let reread = reread.clone();
            drop(last);
            return match reread {
                Reread::Found => {
                    let current = context.setup.borrow().registry.clone();
                    Ok(current.resolve(&context.config, task))
                }
                Reread::Failed => Ok(None),
                Reread::Short(why) => Err(supervisor::DaemonShort::error(
                    std::io::ErrorKind::Other,
                    why,
                )),
            };
        }
    }
    let config = context.config.clone();
    let asking = crate::task_types::Asking::Through(
        context.spawner.clone(),
        tokio::runtime::Handle::current(),
    );
    let reloaded =
        tokio::task::spawn_blocking(move || Registry::load_asking(&config, &asking)).await;
    let (reread, answer) = match reloaded {
        Ok(Ok(registry)) => {
            let resolved = registry.resolve(&context.config, task);
            // Unless a reload brought a newer setup meanwhile.
            context.setup.send_if_modified(|setup| {
                let same = Arc::ptr_eq(&setup.config, &context.config);
                if same {
                    setup.registry = Arc::new(registry);
                }
                same
            });
            (Reread::Found, Ok(resolved))
        }
        Ok(Err(error)) => {
            tracing::warn!(
                "re-reading task types failed: {}",
                crate::error_line(&error)
            );
            let short = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|cause| {
                    supervisor::is_daemon_short(cause)
                        || matches!(
                            cause.raw_os_error(),
                            Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM)
                        )
                });
            if short {
                let why = format!("re-reading task types: {}", crate::error_line(&error));
                let answer = Err(supervisor::DaemonShort::error(
                    std::io::ErrorKind::Other,
                    why.clone(),
                ));
                (Reread::Short(why), answer)
            } else {
                (Reread::Failed, Ok(None))
            }
        }
        Err(_) => (Reread::Failed, Ok(None)),
    };
    *last = Some((tokio::time::Instant::now(), reread));
    answer
}

/// The task's standard error without its `progress: ` lines.
fn without_progress_lines(stderr: &str) -> String {
    if !stderr.contains("progress: ") {
        return stderr.to_string();
    }
    let mut kept = String::with_capacity(stderr.len());
    for line in stderr.split_inclusive('\n') {
        if !line.starts_with("progress: ") {
            kept.push_str(line);
        }
    }
    kept
}

/// Reads a process's end as a verdict (SPEC.md, States).
pub(crate) fn judge(ended: &Ended) -> Verdict {
    let ran = ended.ran_for.as_secs_f64();
    // Progress lines are kept in the `progress` column, not in result_text.
    let stderr = without_progress_lines(&ended.stderr.text_marked());
    let with_stderr = |reason: String| {
        if stderr.trim().is_empty() {
            reason
        } else {
            format!("{reason}\n{stderr}")
        }
    };
    let failed = |state: State, reason: String| Verdict {
        state,
        result_text: with_stderr(reason),
        stderr_tail: Some(stderr.clone()),
        spawn_took: Some(ended.spawn_took),
        start_times: Some(ended.start_times),
        daemon_short: false,
        never_started: false,
        at_once: false,
        stopped_before_start: None,
    };
    match ended.stopped {
        Some(Stopped::Timeout(_)) => {
            return failed(State::Timeout, supervisor::describe_end(ended))
        }
        Some(Stopped::Requested(StopReason::Cancel)) => {
            return Verdict::new(
                State::Cancelled,
                format!("cancelled by a user after {ran:.1}s"),
            )
        }
        Some(Stopped::Requested(StopReason::Shutdown)) => {
            return Verdict::new(
                State::Interrupted,
                format!("interrupted after {ran:.1}s: the daemon was shut down"),
            )
        }
        Some(Stopped::Requested(StopReason::LostClaim)) => {
            // The task did nothing wrong: no backoff (before, it waited its
            // `retry_delay` once the database was back).
            return Verdict {
                at_once: true,
                ..failed(
                    State::Crashed,
                    format!("stopped after {ran:.1}s: this daemon lost its claim on the row"),
                )
            };
        }
        None => {}
    }
    if ended.status.success() {
        let mut text = ended.stdout.text_marked();
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        return Verdict::new(State::Finished, text);
    }
    let reason = supervisor::describe_end(ended);
    if ended.limit_broken.is_some() {
        return failed(State::Failed, reason);
    }
    match (ended.status.code(), ended.status.signal()) {
        (Some(EXIT_REJECTED), _) => failed(
            State::Rejected,
            format!("{reason}: the options do not fit this task type"),
        ),
        (Some(_), _) => failed(State::Failed, reason),
        (None, _) => failed(State::Crashed, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_left_out_of_the_error() {
        assert_eq!(
            without_progress_lines("progress: 1/3\nwarming up\nprogress: 2/3\nno disk left\n"),
            "warming up\nno disk left\n"
        );
        assert_eq!(without_progress_lines("plain"), "plain");
    }

    #[test]
    fn a_failed_task_names_its_next_tries_delay_by_its_last_valid_line() {
        let failed = |stderr: &str| Verdict {
            stderr_tail: Some(stderr.to_string()),
            ..Verdict::new(State::Failed, "exit status 1")
        };
        let sdk = task_sdk::retry_after_line(std::time::Duration::from_micros(2_500_001));
        assert_eq!(
            asked_retry_after(&failed(&format!("busy\n{sdk}\n"))),
            Some(2.501)
        );
        assert_eq!(
            asked_retry_after(&failed(
                "retry_after: 1h\nretry_after: 30s\nretry_after: soon\n"
            )),
            Some(30.0),
            "the last line that is a duration"
        );
        assert_eq!(
            asked_retry_after(&failed("retry_after: 9d\r\n")),
            Some(86_400.0)
        );
        assert_eq!(asked_retry_after(&failed("Retry-After: 30\n")), None);
        let timed_out = Verdict {
            state: State::Timeout,
            ..failed("retry_after: 30s\n")
        };
        assert_eq!(
            asked_retry_after(&timed_out),
            None,
            "only a try the task failed"
        );
    }

    #[test]
    fn yaml_checks_accept_ruby_and_reject_garbage() {
        assert!(crate::request::check_options(b"").is_ok());
        assert!(crate::request::check_options(b"created_from: psql").is_ok());
        assert!(crate::request::check_options(
            b"--- !ruby/hash:ActiveSupport::HashWithIndifferentAccess\n:a: 1\n:b: !ruby/sym c\n"
        )
        .is_ok());
        assert!(crate::request::check_options(b"key: [unclosed").is_err());
        assert!(crate::request::check_options(b"a: 1\n b: 2\n c:").is_err());
        assert!(crate::request::check_options(b"\xff\xfe").is_err());
    }
}
