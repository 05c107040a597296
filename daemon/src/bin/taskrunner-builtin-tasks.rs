//! The built-in task types, in a small binary of their own (so that
//! `pidof taskrunnerd` never finds a task), written with task-sdk.

use std::process::ExitCode;

use serde::Deserialize;
use task_sdk::{Context, Task, Tasks};

/// Does nothing, successfully: `NOOP <id>: OK!`, plus where it came from.
struct NoOp;

#[derive(Deserialize)]
struct NoOpOptions {
    #[serde(default)]
    created_from: Option<serde_yaml::Value>,
}

impl Task for NoOp {
    const NAME: &'static str = "NoOp";
    type Options = Option<NoOpOptions>;

    fn run(&self, options: Self::Options, context: &Context) -> task_sdk::Result<String> {
        let mut text = format!("NOOP {}: OK!", context.request_id);
        if let Some(created_from) = options.and_then(|o| o.created_from) {
            let shown = match created_from {
                serde_yaml::Value::String(s) => s,
                other => serde_yaml::to_string(&other)?.trim_end().to_string(),
            };
            text.push_str(&format!(" created from: {shown}"));
        }
        Ok(text)
    }
}

fn main() -> ExitCode {
    Tasks::new().register(NoOp).serve()
}
