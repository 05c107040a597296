//! `taskrunner-cli flow …`: post (start) a flow, list flows, draw a flow's
//! board, cancel a flow.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::config::Config;
use crate::flow::Definition;
use crate::store::{Flow, FlowBoard, FlowChange, StepRow, Store};
use crate::usage::UsageError;

#[derive(Debug, Subcommand)]
pub(crate) enum FlowCommand {
    /// Start a flow and print its id: `flow post NAME [--options YAML]
    /// [--KEY VALUE …]`; `flow post NAME --help` shows its options and
    /// steps, `flow post --help` lists the flows
    #[command(disable_help_flag = true)]
    Post {
        /// NAME, then --options YAML and --KEY VALUE pairs (the flow's declared options)
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Flows with their state and position, newest first
    List {
        /// At most this many flows
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// The board: a flow, its state and attempt, each step's execute and
    /// revert with state, host and tries, and what it provided (without ID:
    /// every flow not ended, or the newest)
    Show {
        #[arg(value_name = "ID")]
        id: Option<i64>,
    },
    /// Cancel a flow (its running step is stopped); with --revert, revert
    /// its finished steps first (in reverse order), never starting again
    Cancel {
        #[arg(value_name = "ID")]
        id: i64,
        /// Revert the steps already done before the flow ends CANCELLED
        #[arg(long)]
        revert: bool,
    },
}

/// `flow post`'s arguments, parsed.
#[derive(Debug, PartialEq)]
enum Post {
    /// `flow post --help` (or no name).
    ListFlows,
    /// `flow post NAME --help`.
    Help(String),
    Start {
        name: String,
        options: Option<String>,
        pairs: Vec<(String, String)>,
    },
}

fn parse_post(args: &[String]) -> Result<Post> {
    let usage = |m: String| -> anyhow::Error { UsageError(m).into() };
    let Some(first) = args.first() else {
        return Ok(Post::ListFlows);
    };
    if first == "--help" || first == "-h" {
        return Ok(Post::ListFlows);
    }
    if first.starts_with('-') {
        return Err(usage(format!(
            "flow post: the flow's NAME comes first (got `{first}`); `flow post --help` lists the flows"
        )));
    }
    let name = first.clone();
    let mut options = None;
    let mut pairs = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(Post::Help(name));
        }
        let Some(key) = arg.strip_prefix("--") else {
            return Err(usage(format!(
                "flow post {name}: unexpected `{arg}` (options are given as --KEY VALUE)"
            )));
        };
        let (key, value) = match key.split_once('=') {
            Some((key, value)) => (key.to_string(), value.to_string()),
            None => match rest.next() {
                Some(value) => (key.to_string(), value.clone()),
                None => {
                    return Err(usage(format!("flow post {name}: --{key} needs a value")));
                }
            },
        };
        if key == "options" {
            options = Some(value);
        } else {
            pairs.push((key, value));
        }
    }
    Ok(Post::Start {
        name,
        options,
        pairs,
    })
}

fn flow_named<'a>(flows: &'a BTreeMap<String, Definition>, name: &str) -> Result<&'a Definition> {
    flows.get(name).ok_or_else(|| {
        let known: Vec<&str> = flows.keys().map(String::as_str).collect();
        UsageError(format!(
            "no flow `{name}` in the config or its programs (flows: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
        .into()
    })
}

/// Runs one `flow` command; `open` opens the database (not needed for help).
pub(crate) async fn run(
    config: &Config,
    open: impl Fn() -> Result<Store>,
    command: FlowCommand,
) -> Result<()> {
    // The config's flows, and those its programs declare (`--list-flows`).
    let flows = || -> Result<BTreeMap<String, Definition>> {
        if config.programs.is_empty() {
            Ok(config.flows.clone())
        } else {
            Ok(crate::task_types::Registry::load(config)?.flows(config))
        }
    };
    match command {
        FlowCommand::Post { args } => match parse_post(&args)? {
            Post::ListFlows => out!("{}", crate::flow::list_help(&flows()?)),
            Post::Help(name) => out!("{}", flow_named(&flows()?, &name)?.help(&name)),
            Post::Start {
                name,
                options,
                pairs,
            } => {
                let flows = flows()?;
                let definition = flow_named(&flows, &name)?;
                let options = definition
                    .options_from_args(options.as_deref(), &pairs)
                    .map_err(|m| UsageError(format!("flow post {name}: {m}")))?;
                let store = open()?;
                let id = store.post_flow(&name, Some(&options)).await?;
                outln!("{id}");
            }
        },
        FlowCommand::List { limit } => {
            let store = open()?;
            out!("{}", render_list(&store.list_flows(None, limit).await?));
        }
        FlowCommand::Show { id } => {
            let store = open()?;
            let ids: Vec<i64> = match id {
                Some(id) => vec![id],
                None => {
                    let flows = store.list_flows(None, 50).await?;
                    let active: Vec<i64> = flows
                        .iter()
                        .filter(|f| f.finished_at.is_none())
                        .map(|f| f.id)
                        .rev()
                        .collect();
                    if active.is_empty() {
                        flows.first().map(|f| f.id).into_iter().collect()
                    } else {
                        active
                    }
                }
            };
            if ids.is_empty() {
                outln!("(no flows)");
            }
            for (n, id) in ids.iter().enumerate() {
                let Some(board) = store.flow_board(*id).await? else {
                    bail!("no flow {id}")
                };
                if n > 0 {
                    outln!();
                }
                out!(
                    "{}",
                    render_board(&board, config.flows.get(&board.flow.name))
                );
            }
        }
        FlowCommand::Cancel { id, revert } => {
            let store = open()?;
            match store.cancel_flow(id, revert).await? {
                FlowChange::Done(state) if state == "CANCELLED" => {
                    outln!("flow {id} cancelled; a running step is stopped within a heartbeat")
                }
                FlowChange::Done(state) => outln!(
                    "flow {id} is cancelled: it is {state}, reverting its finished steps; then it ends CANCELLED"
                ),
                FlowChange::NotFound => bail!("no flow {id}"),
                FlowChange::AlreadyFinal(state) => bail!("flow {id} is already {state}"),
            }
        }
    }
    Ok(())
}

fn state_of(flow: &Flow) -> String {
    flow.state.clone().unwrap_or_else(|| "WAITING".into())
}

fn render_list(flows: &[Flow]) -> String {
    let mut lines = vec![[
        "ID".to_string(),
        "FLOW".into(),
        "STATE".into(),
        "ATTEMPT".into(),
        "STEP".into(),
        "CREATED".into(),
        "RESULT".into(),
    ]];
    for flow in flows {
        lines.push([
            flow.id.to_string(),
            crate::escape::one_line(&flow.name),
            state_of(flow),
            flow.attempt.to_string(),
            flow.current_step
                .map_or("-".into(), |step| step.saturating_add(1).to_string()),
            flow.created_at
                .as_deref()
                .map(|t| t.chars().take(19).collect())
                .unwrap_or_default(),
            crate::escape::one_line(flow.result_text.as_deref().unwrap_or("")),
        ]);
    }
    let mut out = super::render::render_columns(&lines);
    if flows.is_empty() {
        out += "(no flows)\n";
    }
    out
}

fn row_cells(row: Option<&StepRow>) -> [String; 4] {
    match row {
        None => [String::new(), "-".into(), String::new(), String::new()],
        Some(row) => {
            let mut state = row.result.clone().unwrap_or_else(|| "PENDING".into());
            if row.exhausted {
                state += " (exhausted)";
            }
            [
                format!("#{}", row.id),
                state,
                row.host
                    .clone()
                    .map(|h| crate::escape::one_line(&h))
                    .unwrap_or_default(),
                format!("tries {}/{}", row.tries, row.try_limit),
            ]
        }
    }
}

/// The board as a tree: the flow, then each step with its execute and, if
/// it has one, its revert.
pub(crate) fn render_board(board: &FlowBoard, declared: Option<&Definition>) -> String {
    let flow = &board.flow;
    let mut out = format!(
        "flow {} {}: {}, attempt {} of {}\n",
        flow.id,
        crate::escape::one_line(&flow.name),
        state_of(flow),
        flow.attempt.max(1),
        u64::from(board.retry_times) + 1
    );
    let steps: Vec<(String, String, Option<String>, Option<String>)> = if board.steps.is_empty() {
        // Not taken yet: the steps as the config declares them now.
        declared
            .map(|d| {
                d.steps
                    .iter()
                    .map(|s| {
                        (
                            s.name.clone(),
                            s.task.clone(),
                            s.revert.clone(),
                            s.provides.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        board
            .steps
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.task.clone(),
                    s.revert_task.clone(),
                    s.provides.clone(),
                )
            })
            .collect()
    };
    // One line per execute and revert: [tree, name, task, request, state, host, tries, note].
    let mut lines: Vec<Vec<String>> = Vec::new();
    for (index, (name, task, revert, provides)) in steps.iter().enumerate() {
        let last = index + 1 == steps.len();
        let on_board = board.steps.get(index);
        let [id, state, host, tries] = row_cells(on_board.and_then(|s| s.execute.as_ref()));
        let mut note = String::new();
        if let (Some(key), Some(value)) = (provides, on_board.and_then(|s| s.provided.as_ref())) {
            note = format!("{key}: {}", crate::escape::one_line(value));
        }
        let current = on_board.is_some_and(|s| s.current);
        let reverting = flow.state.as_deref() == Some("REVERTING");
        if current && !reverting {
            note = format!("<- now {note}").trim_end().to_string();
        }
        lines.push(vec![
            format!("{} {}.", if last { "└─" } else { "├─" }, index + 1),
            name.clone(),
            task.clone(),
            id,
            state,
            host,
            tries,
            note,
        ]);
        if let Some(revert) = revert {
            let [id, state, host, tries] = row_cells(on_board.and_then(|s| s.revert.as_ref()));
            lines.push(vec![
                format!("{}  └─", if last { " " } else { "│" }),
                "revert".into(),
                revert.clone(),
                id,
                state,
                host,
                tries,
                if current && reverting {
                    "<- now".into()
                } else {
                    String::new()
                },
            ]);
        }
    }
    let rendered = super::render::render_columns(&lines);
    for line in rendered.lines() {
        out += line.trim_end();
        out += "\n";
    }
    if let Some(text) = &flow.result_text {
        out += &format!("result: {}\n", crate::escape::one_line(text));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn post_arguments_give_the_name_options_and_pairs() {
        assert_eq!(parse_post(&strings(&["--help"])).unwrap(), Post::ListFlows);
        assert_eq!(
            parse_post(&strings(&["deploy", "--port", "1", "--help"])).unwrap(),
            Post::Help("deploy".into())
        );
        assert_eq!(
            parse_post(&strings(&["deploy", "--options", "a: 1", "--port=80"])).unwrap(),
            Post::Start {
                name: "deploy".into(),
                options: Some("a: 1".into()),
                pairs: vec![("port".into(), "80".into())]
            }
        );
        assert!(parse_post(&strings(&["deploy", "--port"])).is_err());
        assert!(parse_post(&strings(&["deploy", "stray"])).is_err());
    }
}
