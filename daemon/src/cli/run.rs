//! `taskrunner-cli run`: one task in the foreground, by hand (type and
//! options, or a stored row's); with `--record`, claimed and recorded as a
//! try of that row.

use std::process::ExitCode;

use anyhow::{bail, Result};
use tokio::sync::watch;

use crate::attempt::{self, TryInput};
use crate::config::Config;
use crate::request::{RequestId, State};
use crate::store::{Purpose, Store, Write};
use crate::supervisor::StopReason;
use crate::task_types::Registry;

pub(super) async fn run_command(
    config: &Config,
    task: Option<String>,
    options: Option<String>,
    id: Option<RequestId>,
    record: bool,
) -> Result<ExitCode> {
    let registry = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Registry::load(&config)).await??
    };
    let setup = crate::task_types::Setup::new(config.clone(), registry);
    let context = attempt::Context {
        config: setup.config.clone(),
        setup: setup.channel(),
        spawner: crate::supervisor::start_spawner()?,
    };
    let (stop_sender, stop) = watch::channel(None);
    // Ctrl-C stops the task the way a daemon shutdown would.
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop_sender.send_replace(Some(StopReason::Shutdown));
            std::future::pending::<()>().await;
        }
    });
    let (verdict, claimed_for_record, store) = match id {
        None => {
            let task = task.expect("clap requires a task without --id");
            let options = options.unwrap_or_default();
            let input = TryInput {
                id: None,
                task: &task,
                options: options.as_bytes(),
                try_number: 1,
                echo_stderr: true,
                batch_id: None,
                claim_token: None,
                options_left_out: None,
            };
            (
                attempt::run(&context, input, stop, None, |_| {}, || {}).await,
                None,
                None,
            )
        }
        Some(id) => {
            let store = Store::open(&config.database_url, Purpose::Cli)?;
            let Some(request) = store.show(id).await? else {
                bail!("no request {id}")
            };
            let (try_number, claimed) = if record {
                let instance = crate::instance::InstanceId::new(&config.host_id);
                let token = instance.claim_token("cli");
                let Some(claimed) = store
                    .claim_one(id, &config.host_id, &instance, &token)
                    .await?
                else {
                    bail!(
                        "request {id} is not runnable ({}, {} of {} tries): it cannot be claimed",
                        request.result.as_deref().unwrap_or("pending"),
                        request.tries,
                        request.try_limit
                    );
                };
                (claimed.tries, Some(claimed))
            } else {
                (request.tries + 1, None)
            };
            let options = request.options.clone().unwrap_or_default();
            let input = TryInput {
                id: Some(id),
                task: &request.task_class_name,
                options: options.as_bytes(),
                try_number,
                echo_stderr: true,
                batch_id: request.batch_id.or(request.callback_of_batch),
                claim_token: None,
                options_left_out: None,
            };
            let store_for_pid = store.clone();
            let claimed_for_pid = claimed.clone();
            let on_running = move |spawned: &crate::supervisor::Spawned| {
                if let Some(claimed) = claimed_for_pid {
                    let write = Write::Pid {
                        id: claimed.id,
                        claim_token: claimed.claim_token,
                        pid: i64::from(spawned.pid),
                        boot_id: crate::procinfo::boot_id(),
                        start_ticks: spawned.start_ticks,
                    };
                    tokio::spawn(async move { store_for_pid.record(&[write]).await });
                }
            };
            let verdict = attempt::run(&context, input, stop, None, on_running, || {}).await;
            (verdict, claimed, Some(store))
        }
    };
    if let (Some(claimed), Some(store)) = (claimed_for_record, store) {
        let outcome = attempt::outcome(&claimed, &verdict, config);
        let applied = store.record(&[Write::Outcome(outcome)]).await?;
        if applied.first() == Some(&true) {
            eprintln!(
                "recorded try {} of request {} as {}",
                claimed.tries, claimed.id, verdict.state
            );
        } else {
            eprintln!(
                "request {}: the outcome was not recorded (the claim was lost)",
                claimed.id
            );
        }
    }
    if verdict.state == State::Finished {
        println!("{}", verdict.result_text);
        Ok(ExitCode::SUCCESS)
    } else {
        // The task's standard error was shown as it came: only the reason.
        let reason = verdict.result_text.lines().next().unwrap_or_default();
        eprintln!("{}: {reason}", verdict.state);
        Ok(ExitCode::FAILURE)
    }
}
