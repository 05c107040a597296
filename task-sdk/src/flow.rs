//! Flows declared in Rust: steps that are task types (an execute and an
//! optional revert each), `retry.times`, typed options. A program registers
//! them with [`Tasks::flow`](crate::Tasks::flow) and answers
//! `PROGRAM --list-flows` with their definitions (YAML, the config's
//! `flows:` format), which the daemon reads at start beside `--list-tasks`.
//!
//! The store is typed by each step's own options struct: a step's request
//! gets the flow's store (the flow's options, with defaults, plus what each
//! earlier step provided under its `provides` name) as its options, so a
//! step's `Options` declares the fields it reads (serde ignores the rest
//! unless the struct denies unknown fields).
//!
//! ```
//! use serde::Deserialize;
//! use task_sdk::{Context, Flow, OptionType, Task, Tasks};
//!
//! #[derive(Deserialize)]
//! struct FetchOptions { url: String }
//! struct Fetch;
//! impl Task for Fetch {
//!     const NAME: &'static str = "Fetch";
//!     type Options = FetchOptions;
//!     fn run(&self, o: FetchOptions, _: &Context) -> task_sdk::Result<String> {
//!         Ok(format!("/tmp/{}", o.url.len())) // stored as `artifact`
//!     }
//! }
//! #[derive(Deserialize)]
//! struct InstallOptions { artifact: String, port: u16 }
//! struct Install;
//! impl Task for Install {
//!     const NAME: &'static str = "Install";
//!     type Options = InstallOptions;
//!     fn run(&self, o: InstallOptions, _: &Context) -> task_sdk::Result<String> {
//!         Ok(format!("installed {} on {}", o.artifact, o.port))
//!     }
//! }
//!
//! let tasks = Tasks::new().register(Fetch).register(Install).flow(
//!     Flow::new("deploy")
//!         .help("fetch and install")
//!         .option("url", OptionType::String, "what to fetch", None::<String>)
//!         .option("port", OptionType::Integer, "port to serve on", Some(8887))
//!         .step::<Fetch>("fetch")
//!         .provides("artifact")
//!         .step::<Install>("install")
//!         .retry_times(1),
//! );
//! assert!(tasks.flows_yaml().contains("deploy:"));
//! ```

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use crate::Task;

/// The type of a declared flow option: `flow post NAME --KEY VALUE` reads
/// the value as this type, and a flow whose option does not fit ends FAILED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
}

impl OptionType {
    fn as_str(self) -> &'static str {
        match self {
            OptionType::String => "string",
            OptionType::Integer => "integer",
            OptionType::Number => "number",
            OptionType::Boolean => "boolean",
        }
    }
}

/// A flow: named steps, each an execute task type and an optional revert,
/// run in order by the daemon, one request per execute and per revert.
#[derive(Debug, Clone)]
#[must_use = "a Flow does nothing until it is registered with Tasks::flow"]
pub struct Flow {
    name: String,
    help: Option<String>,
    steps: Vec<Mapping>,
    retry_times: u32,
    options: Vec<(String, Mapping)>,
    on_exhausted: Option<String>,
}

impl Flow {
    /// An empty flow named `name` (as `flow_name` in `task_runner_flows`).
    pub fn new(name: impl Into<String>) -> Flow {
        Flow {
            name: name.into(),
            help: None,
            steps: Vec::new(),
            retry_times: 0,
            options: Vec::new(),
            on_exhausted: None,
        }
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One line for `flow post --help`.
    pub fn help(mut self, text: impl Into<String>) -> Flow {
        self.help = Some(text.into());
        self
    }

    /// Adds a step `name` that runs task type `T`.
    pub fn step<T: Task>(self, name: impl Into<String>) -> Flow {
        self.step_named(name, T::NAME)
    }

    /// Adds a step `name` that runs the task type named `task` (one of
    /// another program, or of the config).
    pub fn step_named(mut self, name: impl Into<String>, task: impl Into<String>) -> Flow {
        let mut step = Mapping::new();
        step.insert("name".into(), Value::String(name.into()));
        step.insert("task".into(), Value::String(task.into()));
        self.steps.push(step);
        self
    }

    fn last_step(&mut self, key: &str, value: Value) {
        let step = self
            .steps
            .last_mut()
            .unwrap_or_else(|| panic!("Flow::{key} comes after a step"));
        step.insert(key.into(), value);
    }

    /// The last step's revert: task type `T`, run if this step or a later
    /// one ends for good without FINISHED.
    pub fn revert<T: Task>(self) -> Flow {
        self.revert_named(T::NAME)
    }

    /// The last step's revert, by type name.
    pub fn revert_named(mut self, task: impl Into<String>) -> Flow {
        self.last_step("revert", Value::String(task.into()));
        self
    }

    /// The store key the last step's output (its result text) is kept under.
    pub fn provides(mut self, key: impl Into<String>) -> Flow {
        self.last_step("provides", Value::String(key.into()));
        self
    }

    /// Tries of the last step's execute and revert rows (default 5).
    pub fn try_limit(mut self, tries: u32) -> Flow {
        self.last_step("try_limit", Value::from(tries));
        self
    }

    /// After a full revert, run the whole flow again, at most `times` more times.
    pub fn retry_times(mut self, times: u32) -> Flow {
        self.retry_times = times;
        self
    }

    /// Declares an option: its type, help text and default (`None`: no
    /// default). Shown by `flow post NAME --help`.
    pub fn option<D: Serialize>(
        mut self,
        name: impl Into<String>,
        kind: OptionType,
        help: impl Into<String>,
        default: Option<D>,
    ) -> Flow {
        let mut option = Mapping::new();
        option.insert("type".into(), kind.as_str().into());
        option.insert("help".into(), Value::String(help.into()));
        if let Some(default) = default {
            let value = serde_yaml::to_value(default)
                .unwrap_or_else(|error| panic!("the default of flow option: {error}"));
            option.insert("default".into(), value);
        }
        self.options.push((name.into(), option));
        self
    }

    /// Task type `T` runs once when a revert is exhausted and the flow ends FAILED.
    pub fn on_exhausted<T: Task>(mut self) -> Flow {
        self.on_exhausted = Some(T::NAME.to_string());
        self
    }

    /// The definition, in the config's `flows:` format.
    pub(crate) fn definition(&self) -> Value {
        assert!(!self.steps.is_empty(), "flow `{}` has no step", self.name);
        let mut flow = Mapping::new();
        if let Some(help) = &self.help {
            flow.insert("help".into(), Value::String(help.clone()));
        }
        flow.insert(
            "steps".into(),
            Value::Sequence(self.steps.iter().cloned().map(Value::Mapping).collect()),
        );
        if self.retry_times > 0 {
            let mut retry = Mapping::new();
            retry.insert("times".into(), self.retry_times.into());
            flow.insert("retry".into(), Value::Mapping(retry));
        }
        if !self.options.is_empty() {
            let mut options = Mapping::new();
            for (name, option) in &self.options {
                options.insert(Value::String(name.clone()), Value::Mapping(option.clone()));
            }
            flow.insert("options".into(), Value::Mapping(options));
        }
        if let Some(task) = &self.on_exhausted {
            flow.insert("on_exhausted".into(), Value::String(task.clone()));
        }
        Value::Mapping(flow)
    }
}

/// What `PROGRAM --list-flows` prints: a YAML mapping, flow name → definition.
pub(crate) fn flows_yaml(flows: &[Flow]) -> String {
    let mut all = Mapping::new();
    for flow in flows {
        all.insert(Value::String(flow.name.clone()), flow.definition());
    }
    if all.is_empty() {
        return String::new();
    }
    serde_yaml::to_string(&Value::Mapping(all)).unwrap_or_default()
}
