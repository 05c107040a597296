//! Which program runs a task type: the built-in types (in the small
//! `taskrunner-builtin-tasks` binary, written with task-sdk), command types
//! declared under `tasks:`, and the types that `programs:` (task-sdk
//! executables) list when asked `--list-tasks`.
//!
//! Architecture invariant: nothing in a row can name a program or an
//! argument vector; a row only names a type, and this registry maps it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{Config, TaskSettings};
use crate::usage::UsageError;

pub(crate) use crate::config::BUILTIN_TYPES;

/// The binary that runs built-in types, installed beside the daemon.
pub(crate) const BUILTIN_BINARY: &str = "taskrunner-builtin-tasks";

/// How to start a task type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) settings: TaskSettings,
    /// Forked from a preloaded parent (`preload: true` on the type or its program).
    pub(crate) preload: bool,
}

/// The config and the task types it names, as one value: a reload
/// replaces both in one send (see [`Setup::channel`]).
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) config: std::sync::Arc<Config>,
    pub(crate) registry: std::sync::Arc<Registry>,
}

impl Setup {
    pub(crate) fn new(config: Config, registry: Registry) -> Setup {
        Setup {
            config: std::sync::Arc::new(config),
            registry: std::sync::Arc::new(registry),
        }
    }

    /// The one channel through which the daemon's parts see the current
    /// setup (and the CLI's one try, its own).
    pub(crate) fn channel(self) -> tokio::sync::watch::Sender<Setup> {
        tokio::sync::watch::Sender::new(self)
    }

    /// The config the channel holds now (as the last reload sent it). The
    /// daemon's services read it afresh at each turn of their loops.
    pub(crate) fn current_config(
        channel: &tokio::sync::watch::Sender<Setup>,
    ) -> std::sync::Arc<Config> {
        channel.borrow().config.clone()
    }
}

/// Task type name → how to run it.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    builtin_binary: PathBuf,
    /// Types served by a task-sdk program, and which program.
    from_programs: BTreeMap<String, PathBuf>,
    /// Flows declared by task-sdk programs (`--list-flows`), by name.
    program_flows: BTreeMap<String, crate::flow::Definition>,
}

impl Registry {
    /// Asks every configured program for its task types. A type registered
    /// twice (by two programs, or by a program and the config) is an error
    /// naming both.
    pub(crate) fn load(config: &Config) -> Result<Registry> {
        Registry::load_asking(config, &Asking::Here)
    }

    /// [`load`](Registry::load), asking the programs as `asking` says.
    pub(crate) fn load_asking(config: &Config, asking: &Asking) -> Result<Registry> {
        let mut from_programs: BTreeMap<String, PathBuf> = BTreeMap::new();
        let is_command = |name: &str| config.tasks.get(name).is_some_and(|t| t.command.is_some());
        for program in &config.programs {
            for name in list_tasks(config, program, asking)? {
                if BUILTIN_TYPES.contains(&name.as_str()) || is_command(&name) {
                    return Err(UsageError(format!(
                        "task type `{name}` is registered twice: by {} and by {}",
                        program.display(),
                        if config.tasks.contains_key(&name) {
                            "the config's `tasks:`"
                        } else {
                            "taskrunner (built in)"
                        }
                    ))
                    .into());
                }
                if let Some(other) = from_programs.get(&name) {
                    return Err(UsageError(format!(
                        "task type `{name}` is registered twice: by {} and by {}",
                        other.display(),
                        program.display()
                    ))
                    .into());
                }
                from_programs.insert(name, program.clone());
            }
        }
        // An entry without a command only sets a known type's settings.
        for (name, task) in &config.tasks {
            if task.command.is_none()
                && !BUILTIN_TYPES.contains(&name.as_str())
                && !from_programs.contains_key(name)
            {
                return Err(UsageError(format!(
                    "tasks.{name}: has no command, and no program in `programs:` registers `{name}`"
                ))
                .into());
            }
        }
        let mut program_flows = BTreeMap::new();
        for program in &config.programs {
            for (name, definition) in list_flows(config, program, asking)? {
                if config.flows.contains_key(&name) || program_flows.contains_key(&name) {
                    return Err(UsageError(format!(
                        "flow `{name}` is declared twice: by {} and by {}",
                        program.display(),
                        if config.flows.contains_key(&name) {
                            "the config's `flows:`"
                        } else {
                            "another program"
                        }
                    ))
                    .into());
                }
                program_flows.insert(name, definition);
            }
        }
        let registry = Registry {
            builtin_binary: builtin_binary_path(),
            from_programs,
            program_flows,
        };
        // A flow may name a type that only a program registers.
        let known = registry.names(config);
        let checked = config.check_flow_types(&known).and_then(|()| {
            registry
                .program_flows
                .iter()
                .try_for_each(|(name, flow)| flow.check_types(name, &known))
        });
        if let Err(message) = checked {
            let origin = config
                .file
                .as_ref()
                .map_or("config".into(), |f| f.display().to_string());
            return Err(UsageError(format!("{origin}: {message}")).into());
        }
        Ok(registry)
    }

    /// How to run `name`, or `None` for an unknown type.
    pub(crate) fn resolve(&self, config: &Config, name: &str) -> Option<Resolved> {
        let entry = config.tasks.get(name);
        let preload_type = entry.is_some_and(|task| task.preload);
        if let Some(command) = entry.and_then(|task| task.command.as_ref()) {
            return Some(Resolved {
                program: PathBuf::from(&command[0]),
                args: command[1..].to_vec(),
                settings: config.settings_for(name).clone(),
                preload: preload_type,
            });
        }
        let program = if BUILTIN_TYPES.contains(&name) {
            self.builtin_binary.clone()
        } else {
            self.from_programs.get(name)?.clone()
        };
        Some(Resolved {
            preload: preload_type || config.preloaded_programs.contains(&program),
            program,
            args: Vec::new(),
            settings: config.settings_for(name).clone(),
        })
    }

    /// Every flow: the config's and those the programs declare.
    pub(crate) fn flows(&self, config: &Config) -> BTreeMap<String, crate::flow::Definition> {
        let mut flows = config.flows.clone();
        flows.extend(self.program_flows.clone());
        flows
    }

    /// Every known type name, sorted.
    pub(crate) fn names(&self, config: &Config) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN_TYPES.iter().map(|s| s.to_string()).collect();
        names.extend(
            config
                .tasks
                .iter()
                .filter(|(_, t)| t.command.is_some())
                .map(|(name, _)| name.clone()),
        );
        names.extend(self.from_programs.keys().cloned());
        names.sort();
        names.dedup();
        names
    }
}

impl Registry {
    /// Where `name` comes from, in a few words (`taskrunner-cli tasks`).
    pub(crate) fn source(&self, config: &Config, name: &str) -> Option<String> {
        if let Some(command) = config.tasks.get(name).and_then(|t| t.command.as_ref()) {
            return Some(format!("command {}", command.join(" ")));
        }
        if BUILTIN_TYPES.contains(&name) {
            return Some("built in".to_string());
        }
        let program = self.from_programs.get(name)?;
        Some(format!("program {}", program.display()))
    }

    /// The options `name` takes: the config's `options:` for a command
    /// type, else what its program answers to `--help NAME` (task-sdk: the
    /// options struct's field names and the type's description).
    pub(crate) fn describe_options(&self, config: &Config, name: &str) -> Result<String> {
        let entry = config.tasks.get(name);
        if entry.is_some_and(|t| t.command.is_some()) {
            let options = &entry.expect("checked").options;
            if options.is_empty() {
                return Ok(
                    "  options: (none described: add `options:` to the type in the config)\n"
                        .into(),
                );
            }
            let width = options.keys().map(|k| k.len()).max().unwrap_or(0);
            let mut out = String::from("  options:\n");
            for (option, meaning) in options {
                out += &format!("    {option:<width$}  {meaning}\n");
            }
            return Ok(out);
        }
        let program = if BUILTIN_TYPES.contains(&name) {
            self.builtin_binary.clone()
        } else {
            match self.from_programs.get(name) {
                Some(program) => program.clone(),
                None => bail!(
                    "unknown task type `{name}`; known types: {}",
                    self.names(config).join(", ")
                ),
            }
        };
        let output = ask(config, &program, &["--help", name], &Asking::Here)?;
        if !output.status.success() {
            bail!(
                "{} --help {name} failed with {}: {}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // The program's first line repeats the name: keep what follows it.
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        let mut out = String::new();
        if let Some((_, description)) = first.split_once(": ") {
            out += &format!("  {description}\n");
        }
        for line in lines {
            out += line;
            out += "\n";
        }
        Ok(out)
    }
}

/// How the programs are asked for their task types and flows.
pub(crate) enum Asking {
    /// By this process, with its own credentials (the CLI).
    Here,
    /// Through the daemon's spawner, as the top-level `user:` when one is
    /// set and the daemon runs as root (as its tasks run), from a blocking
    /// thread of `runtime`.
    Through(crate::supervisor::Spawner, tokio::runtime::Handle),
}

/// How long a program may take to answer `--list-tasks`, `--list-flows` or
/// `--help TYPE` (one that boots an application to answer takes a while).
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `program args…` and returns its output. A program that has not
/// answered within [`ASK_TIMEOUT`] (it hangs, or a child of its holds its
/// stdout) is killed with its process group and the question fails naming
/// it: the daemon asks at start, at a reload, and for each try of a type it
/// does not know (a deploy may have added it), which must not wait for ever.
///
/// The program gets a task's environment: the daemon's allowlisted
/// variables and the config's `env:`, never the daemon's secrets
/// (`DATABASE_URL`, `PG*`: before, it got the daemon's whole environment).
fn ask(
    config: &Config,
    program: &Path,
    args: &[&str],
    asking: &Asking,
) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let question = format!("{} {}", program.display(), args.join(" "));
    let bound = crate::test_hooks::shortened(ASK_TIMEOUT, "TASKRUNNER_TEST_ASK_TIMEOUT_MS");
    // As root, programs are asked as the top-level `user:`, as the tasks
    // run: by the daemon and by the CLI alike (before, `config check` run
    // as root, as the init scripts ran it at every start and reload, ran
    // the programs as root).
    let me = nix::unistd::geteuid();
    let as_user = config
        .defaults
        .user
        .as_ref()
        .filter(|user| me.is_root() && user.uid != me.as_raw())
        .map(|user| {
            let gid = config.defaults.gid().unwrap_or(user.gid);
            (user, gid, user.groups_with(Some(gid)))
        });
    let env = crate::supervisor::later_wins(
        as_user
            .iter()
            .flat_map(|(user, ..)| user.login_env())
            .chain(
                config
                    .defaults
                    .env
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str())),
            ),
    );
    // The daemon asks through its spawner, whose reading of the answer is
    // bounded (4 MiB) and ends with the question's bound: before, a daemon
    // not run as root asked here, and a program printing without end (or
    // a child of its that kept its output open) took the daemon's memory,
    // or a thread for ever.
    if let Asking::Through(spawner, runtime) = asking {
        let creds = as_user
            .as_ref()
            .map(|(user, gid, groups)| (user.uid, *gid, groups.clone()));
        let answer = runtime
            .block_on(spawner.ask(program, args, env, creds, bound))
            .with_context(|| match &as_user {
                Some((user, ..)) => format!("asking {question} as {}", user.name),
                None => format!("asking {question}"),
            })?;
        return answer.ok_or_else(|| {
            anyhow::anyhow!(
                "{question} did not answer within {}s: killed",
                bound.as_secs()
            )
        });
    }
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(std::env::vars_os().filter(|(name, _)| crate::supervisor::is_inherited(name)))
        .envs(env)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some((user, gid, groups)) = as_user {
        use std::os::unix::process::CommandExt;
        let uid = user.uid;
        // The user's groups, its group, then the user, as the daemon's
        // spawner sets them (the standard library's `groups` is unstable).
        // SAFETY: setgroups, setresgid and setresuid are async-signal-safe,
        // and this forked child has one thread.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command
        .spawn()
        .with_context(|| format!("asking {question}"))?;
    let group = child.id() as libc::pid_t;
    let (answered, answer) = std::sync::mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("taskrunner-ask".into())
        .spawn(move || {
            let _ = answered.send(child.wait_with_output());
        });
    let killed = || {
        // SAFETY: a signal to the process group made for this question;
        // its leader is not reaped yet (its waiter has not returned), so
        // the group's id cannot name another.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    };
    if let Err(error) = waiter {
        killed();
        return Err(anyhow::Error::new(error).context(format!("asking {question}")));
    }
    match answer.recv_timeout(bound) {
        Ok(output) => output.with_context(|| format!("asking {question}")),
        Err(_) => {
            killed();
            // Its waiter reaps it.
            let _ = answer.recv_timeout(Duration::from_secs(5));
            bail!(
                "{question} did not answer within {}s: killed",
                bound.as_secs()
            )
        }
    }
}

/// Runs `program --list-tasks` and reads one type name a line.
fn list_tasks(config: &Config, program: &Path, asking: &Asking) -> Result<Vec<String>> {
    let output = ask(config, program, &["--list-tasks"], asking)?;
    if !output.status.success() {
        bail!(
            "{} --list-tasks failed with {}: {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // A line no type could be named (control characters, past the columns'
    // 255 characters: a program printing garbage) refuses the answer, in a
    // line of its own (before, it was taken as a type, and its every
    // mention, a log line or a row's text, carried it whole).
    let mut names = Vec::new();
    for (number, line) in String::from_utf8_lossy(&output.stdout).lines().enumerate() {
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        let at = format!("{} --list-tasks, line {}", program.display(), number + 1);
        if name.chars().any(char::is_control) {
            bail!("{at}: a task type's name has no control characters");
        }
        crate::request::name_fits(&at, name).map_err(anyhow::Error::msg)?;
        names.push(name.to_string());
    }
    Ok(names)
}

/// Runs `program --list-flows` and reads its flows (YAML, the config's
/// `flows:` format). A program that does not answer it (exit status not 0:
/// built with an SDK older than flows) declares none.
fn list_flows(
    config: &Config,
    program: &Path,
    asking: &Asking,
) -> Result<BTreeMap<String, crate::flow::Definition>> {
    let output = ask(config, program, &["--list-flows"], asking)?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let flows: BTreeMap<String, crate::flow::Definition> =
        serde_yaml::from_str(&text).map_err(|error| {
            UsageError(format!(
                "{} --list-flows: not a flow definition: {error}",
                program.display()
            ))
        })?;
    for (name, flow) in &flows {
        flow.check(name).map_err(|message| {
            UsageError(format!("{} --list-flows: {message}", program.display()))
        })?;
    }
    Ok(flows)
}

/// The built-in task binary sits beside the running executable
/// (`cargo build` and `cargo install` both put them together).
fn builtin_binary_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BUILTIN_BINARY)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(BUILTIN_BINARY))
}
