//! Flows as declared (`flows:` in the config): the steps with their execute
//! and revert task types, `retry.times`, the declared options. Pure: the
//! step machine that runs them is in `store/flow.rs`, under the flow row's
//! lock, and a running flow reads only the copy of its definition taken
//! when it started (a config change never alters a running flow).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// One flow's declaration; also the snapshot stored in
/// `task_runner_flows.definition` when a daemon takes the flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Definition {
    pub(crate) steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Retry::is_none")]
    pub(crate) retry: Retry,
    /// Declared options: their help, default and type (`flow post NAME --help`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) options: BTreeMap<String, OptionDecl>,
    /// Task type run once when a revert is exhausted and the flow FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) on_exhausted: Option<String>,
    /// One line for `flow post --help`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) help: Option<String>,
}

/// A step: its execute (`task`), its optional `revert`, and the store key
/// its standard output is kept under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) provides: Option<String>,
    /// Tries for this step's execute and revert rows (default: the table's, 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) try_limit: Option<i64>,
}

/// After a full revert, run the whole flow again, at most `times` more times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Retry {
    #[serde(default)]
    pub(crate) times: u32,
}

impl Retry {
    fn is_none(&self) -> bool {
        self.times == 0
    }
}

/// A declared option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OptionDecl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) help: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) default: Option<Value>,
    /// `string`, `integer`, `number` or `boolean`; default: the default's type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<OptionType>,
    /// The flow cannot start without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OptionType {
    String,
    Integer,
    Number,
    Boolean,
}

impl OptionType {
    fn name(self) -> &'static str {
        match self {
            OptionType::String => "string",
            OptionType::Integer => "integer",
            OptionType::Number => "number",
            OptionType::Boolean => "boolean",
        }
    }

    fn fits(self, value: &Value) -> bool {
        match self {
            OptionType::String => value.is_string(),
            OptionType::Integer => value.is_i64() || value.is_u64(),
            OptionType::Number => value.is_number(),
            OptionType::Boolean => value.is_bool(),
        }
    }

    /// Reads a command-line value (`--port 8887`) as this type.
    fn parse(self, text: &str) -> Option<Value> {
        match self {
            OptionType::String => Some(Value::String(text.to_string())),
            OptionType::Integer => text.parse::<i64>().ok().map(Value::from),
            OptionType::Number => text.parse::<f64>().ok().map(Value::from),
            OptionType::Boolean => match text {
                "true" | "yes" | "1" => Some(Value::Bool(true)),
                "false" | "no" | "0" => Some(Value::Bool(false)),
                _ => None,
            },
        }
    }
}

impl OptionDecl {
    /// The declared type, else the default's.
    pub(crate) fn kind(&self) -> Option<OptionType> {
        self.kind.or_else(|| match &self.default {
            Some(Value::Bool(_)) => Some(OptionType::Boolean),
            Some(v) if v.is_i64() || v.is_u64() => Some(OptionType::Integer),
            Some(Value::Number(_)) => Some(OptionType::Number),
            Some(Value::String(_)) => Some(OptionType::String),
            _ => None,
        })
    }
}

/// What a step's row does: run the step, or undo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Execute,
    Revert,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Execute => "execute",
            Action::Revert => "revert",
        }
    }
}

/// The `unique_key` of a step's row: its cause, the flow's position. A
/// position's row is created once, whoever advances the flow.
pub(crate) fn unique_key(flow: i64, attempt: i64, step: usize, action: Action) -> String {
    format!("flow:{flow}:{attempt}:{step}:{}", action.as_str())
}

/// The attempt a step row's `unique_key` names (rows made by taskrunner).
pub(crate) fn attempt_of_key(key: &str) -> Option<i64> {
    let mut parts = key.split(':');
    (parts.next()? == "flow").then_some(())?;
    parts.next()?;
    parts.next()?.parse().ok()
}

impl Definition {
    /// Checks what serde cannot: steps present, names unique and non-empty,
    /// a `try_limit` of at least 1. Messages name the flow and step.
    pub(crate) fn check(&self, flow: &str) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err(format!(
                "flows.{flow}.steps: a flow needs at least one step"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, step) in self.steps.iter().enumerate() {
            let at = format!("flows.{flow}.steps[{index}]");
            if step.name.is_empty() {
                return Err(format!("{at}.name: must not be empty"));
            }
            if !seen.insert(step.name.as_str()) {
                return Err(format!(
                    "{at} ({}): a step of that name comes earlier",
                    step.name
                ));
            }
            if step.task.is_empty() {
                return Err(format!("{at} ({}).task: must name a task type", step.name));
            }
            if step.revert.as_deref() == Some("") {
                return Err(format!(
                    "{at} ({}).revert: must name a task type",
                    step.name
                ));
            }
            if step
                .try_limit
                .is_some_and(|limit| !(1..=crate::request::MAX_TRY_LIMIT).contains(&limit))
            {
                return Err(format!(
                    "{at} ({}).try_limit: must be at least 1 and at most {}",
                    step.name,
                    crate::request::MAX_TRY_LIMIT
                ));
            }
        }
        for (name, decl) in &self.options {
            if let (Some(kind), Some(default)) = (decl.kind, &decl.default) {
                if !kind.fits(default) {
                    return Err(format!(
                        "flows.{flow}.options.{name}.default: not a {}",
                        kind.name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that every task type a step names is known; the message names
    /// the flow and the step.
    pub(crate) fn check_types(&self, flow: &str, known: &[String]) -> Result<(), String> {
        for (index, step) in self.steps.iter().enumerate() {
            for (key, task) in [("task", Some(&step.task)), ("revert", step.revert.as_ref())] {
                let Some(task) = task else { continue };
                if !known.iter().any(|k| k == task) {
                    return Err(format!(
                        "flows.{flow}.steps[{index}] ({}).{key}: unknown task type `{task}` (known: {})",
                        step.name,
                        known.join(", ")
                    ));
                }
            }
        }
        if let Some(task) = &self.on_exhausted {
            if !known.iter().any(|k| k == task) {
                return Err(format!(
                    "flows.{flow}.on_exhausted: unknown task type `{task}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The store a flow starts with: `options` (YAML, NULL or empty for
    /// none) with the declared defaults filled in. Declared options are
    /// checked against their type; others pass through.
    pub(crate) fn initial_store(&self, options: Option<&str>) -> Result<Mapping, String> {
        let mut store = match options.map(str::trim).filter(|text| !text.is_empty()) {
            None => Mapping::new(),
            Some(text) => match serde_yaml::from_str::<Value>(text) {
                Ok(Value::Mapping(mapping)) => mapping,
                Ok(Value::Null) => Mapping::new(),
                Ok(_) => return Err("options: not a YAML mapping".into()),
                Err(error) => return Err(format!("options: not valid YAML: {error}")),
            },
        };
        for (name, decl) in &self.options {
            let key = Value::String(name.clone());
            match store.get(&key) {
                Some(value) => {
                    if let Some(kind) = decl.kind() {
                        if !kind.fits(value) {
                            return Err(format!("option {name}: not a {}", kind.name()));
                        }
                    }
                }
                None => match &decl.default {
                    Some(default) => {
                        store.insert(key, default.clone());
                    }
                    None if decl.required => return Err(format!("option {name}: required")),
                    None => {}
                },
            }
        }
        Ok(store)
    }

    /// `flow post NAME --KEY VALUE …` as YAML options: each value read as
    /// its declared type. An undeclared key is an error.
    pub(crate) fn options_from_args(
        &self,
        base: Option<&str>,
        pairs: &[(String, String)],
    ) -> Result<String, String> {
        let mut options = match base.map(str::trim).filter(|t| !t.is_empty()) {
            None => Mapping::new(),
            Some(text) => match serde_yaml::from_str::<Value>(text) {
                Ok(Value::Mapping(mapping)) => mapping,
                Ok(Value::Null) => Mapping::new(),
                Ok(_) => return Err("--options: not a YAML mapping".into()),
                Err(error) => return Err(format!("--options: not valid YAML: {error}")),
            },
        };
        for (key, text) in pairs {
            let Some(decl) = self.options.get(key) else {
                let declared: Vec<&str> = self.options.keys().map(String::as_str).collect();
                return Err(format!(
                    "--{key}: not an option of this flow (declared: {})",
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.join(", ")
                    }
                ));
            };
            let value = match decl.kind() {
                Some(kind) => kind
                    .parse(text)
                    .ok_or_else(|| format!("--{key}: `{text}` is not a {}", kind.name()))?,
                None => serde_yaml::from_str(text).unwrap_or(Value::String(text.clone())),
            };
            options.insert(Value::String(key.clone()), value);
        }
        let yaml = serde_yaml::to_string(&Value::Mapping(options)).unwrap_or_default();
        // Check the whole as the flow will (types of --options' values too).
        self.initial_store(Some(&yaml))?;
        Ok(yaml)
    }

    /// `flow post NAME --help`: usage, the options (type, default, help),
    /// the steps.
    pub(crate) fn help(&self, name: &str) -> String {
        let mut out = format!("Usage: taskrunner-cli flow post {name} [--options YAML]");
        for (option, decl) in &self.options {
            let kind = decl.kind().map_or("VALUE", |k| match k {
                OptionType::String => "TEXT",
                OptionType::Integer => "INTEGER",
                OptionType::Number => "NUMBER",
                OptionType::Boolean => "BOOLEAN",
            });
            if decl.required {
                out += &format!(" --{option} {kind}");
            } else {
                out += &format!(" [--{option} {kind}]");
            }
        }
        out += "\n\n";
        if let Some(help) = &self.help {
            out += &format!("{help}\n\n");
        }
        out += "Options:\n";
        if self.options.is_empty() {
            out += "  (none declared)\n";
        }
        let width = self.options.keys().map(|k| k.len()).max().unwrap_or(0) + 2;
        for (option, decl) in &self.options {
            let mut line = format!("  --{option:<width$}");
            line += &format!("{:<7}", decl.kind().map_or("", |k| k.name()));
            if let Some(help) = &decl.help {
                line += &format!("  {help}");
            }
            if let Some(default) = &decl.default {
                line += &format!(" [default: {}]", short_yaml(default));
            }
            if decl.required {
                line += " [required]";
            }
            out += line.trim_end();
            out += "\n";
        }
        out += "\nSteps (each a request; reverts run in reverse order after a step fails):\n";
        for (index, step) in self.steps.iter().enumerate() {
            let mut line = format!("  {}. {}: {}", index + 1, step.name, step.task);
            if let Some(revert) = &step.revert {
                line += &format!(", revert {revert}");
            }
            if let Some(provides) = &step.provides {
                line += &format!(", provides {provides}");
            }
            out += &line;
            out += "\n";
        }
        if self.retry.times > 0 {
            out += &format!(
                "\nAfter a full revert the flow runs again from its first step, at most {} more time{}.\n",
                self.retry.times,
                if self.retry.times == 1 { "" } else { "s" }
            );
        }
        out
    }
}

/// What a step printed, as kept under its `provides` name: YAML when it
/// parses, else the text.
pub(crate) fn provided_value(stdout: &str) -> Value {
    serde_yaml::from_str::<Value>(stdout).unwrap_or_else(|_| Value::String(stdout.to_string()))
}

/// A value on one line, at most 40 characters (the board).
pub(crate) fn short_yaml(value: &Value) -> String {
    let text = match value {
        Value::String(text) => text.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim_end()
            .to_string(),
    };
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() > 40 {
        format!("{}…", one_line.chars().take(39).collect::<String>())
    } else {
        one_line
    }
}

/// `flow post --help`: every flow with its steps on one line.
pub(crate) fn list_help(flows: &BTreeMap<String, Definition>) -> String {
    let mut out = String::from(
        "Usage: taskrunner-cli flow post NAME [--options YAML] [--KEY VALUE ...]\n\
         \x20      taskrunner-cli flow post NAME --help   (the flow's options and steps)\n\nFlows:\n",
    );
    if flows.is_empty() {
        out += "  (none: declare them under `flows:` in the config)\n";
    }
    let width = flows.keys().map(|k| k.len()).max().unwrap_or(0) + 2;
    for (name, definition) in flows {
        let steps: Vec<&str> = definition.steps.iter().map(|s| s.name.as_str()).collect();
        let mut line = format!("  {name:<width$}{}", steps.join(" -> "));
        if let Some(help) = &definition.help {
            line += &format!("  ({help})");
        }
        out += &line;
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> Definition {
        serde_yaml::from_str(
            "steps:\n  - { name: fetch, task: Fetch, revert: Unfetch, provides: artifact }\n  - { name: install, task: Install }\nretry: { times: 2 }\noptions:\n  port: { help: port to serve on, default: 8887 }\n",
        )
        .unwrap()
    }

    #[test]
    fn defaults_fill_the_store_and_types_are_checked() {
        let flow = deploy();
        let store = flow.initial_store(None).unwrap();
        assert_eq!(store.get("port"), Some(&Value::from(8887)));
        assert!(flow.initial_store(Some("port: eighty")).is_err());
        assert!(flow.initial_store(Some("[1]")).is_err());
        let yaml = flow
            .options_from_args(None, &[("port".into(), "9000".into())])
            .unwrap();
        assert_eq!(yaml.trim(), "port: 9000");
        assert!(flow
            .options_from_args(None, &[("prot".into(), "1".into())])
            .unwrap_err()
            .contains("declared: port"));
    }

    #[test]
    fn unknown_types_name_the_flow_and_step() {
        let error = deploy()
            .check_types("deploy", &["Fetch".into(), "Install".into()])
            .unwrap_err();
        assert!(
            error.starts_with("flows.deploy.steps[0] (fetch).revert: unknown task type `Unfetch`"),
            "{error}"
        );
    }

    #[test]
    fn keys_name_the_position_and_give_back_the_attempt() {
        let key = unique_key(7, 2, 1, Action::Revert);
        assert_eq!(key, "flow:7:2:1:revert");
        assert_eq!(attempt_of_key(&key), Some(2));
        assert_eq!(attempt_of_key("request:7:success"), None);
    }

    #[test]
    fn provided_values_are_yaml_when_they_parse() {
        assert_eq!(provided_value("42"), Value::from(42));
        assert_eq!(provided_value("a: [1"), Value::from("a: [1"));
    }
}
