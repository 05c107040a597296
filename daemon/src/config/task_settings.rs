//! The task settings: the keys that may be written for one task type under
//! `tasks:` or, at the top level of the file, as defaults for every type.
//!
//! Each setting is declared once, in the list inside [`with_task_settings`]:
//! its key, the type and unit it is written in, the [`Rule`] that inherits,
//! checks, resolves and writes it back, its built-in default, and two
//! example values for the tests. Everything else is made from that list:
//! the settings' fields in the file's structs ([`Partial`] and, in
//! config.rs, the top level and the `tasks:` entries), the resolved
//! [`TaskSettings`] the supervisor uses, their resolution (a type's own
//! value, else the top-level one, else the built-in default) and how
//! `config check` writes them back. Adding a setting is a line in the list
//! (and a row in the README's table of task settings, which a test checks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Partial;

/// The task settings, declared once. Each entry: its doc comment, the key
/// and what the daemon uses ([`TaskSettings`]'s field); the [`Rule`] that
/// inherits, checks, resolves and writes it back; the type it is written
/// in, with its unit (a `serde_units` module); its built-in default, if it
/// has one; two example values a config may write (YAML, neither the
/// default), for the tests.
///
/// `with_task_settings! { struct … }` adds the settings to a file struct
/// (serde's `flatten` cannot be combined with `deny_unknown_fields`, which
/// names an unknown key with its line), with `settings` and `set_settings`
/// to move them as one [`Partial`]; `with_task_settings! { resolved }`
/// makes [`TaskSettings`] and the resolution. Every key is optional, read
/// with its unit (`10s`, `64KiB`, `50%`) and written back the same way.
macro_rules! with_task_settings {
    ($($input:tt)+) => {
        expand_task_settings! {
            @list { $($input)+ }
            settings {
                /// The try's wall-clock limit; `0s` turns off an inherited one.
                timeout: Option<Duration>, OffAtZero, written Duration => "serde_units::duration",
                    example "1h" "5m";
                /// Bytes of resident memory of the whole try (its cgroup's
                /// memory limit), or of address space (RLIMIT_AS) where no
                /// cgroup can be made; `0` turns off an inherited one.
                memory_limit: Option<u64>, OffAtZero, written u64 => "serde_units::size",
                    example "64MiB" "1GiB";
                /// CPU time; RLIMIT_CPU; `0s` turns off an inherited one.
                cpu_limit: Option<Duration>, OffAtZero, written Duration => "serde_units::duration",
                    example "30s" "90s";
                /// Processes of the whole try (its cgroup's pids limit), or
                /// RLIMIT_NPROC (processes of the task's user, not enforced
                /// for root) without one.
                max_processes: Option<u64>, ProcessCount, written u64, example "50" "20";
                /// CPU bandwidth of the whole try, in CPUs (`50%` is 0.5): its
                /// cgroup's CPU quota; not enforced without a cgroup.
                cpu_quota: Option<f64>, Optional, written f64 => "serde_units::percent",
                    example "50%" "150%";
                /// Scheduling priority, -20..19.
                nice: Option<i32>, Niceness, written i32, example "5" "-3";
                /// The user the task runs as.
                user: Option<User>, UserName, written String, example "root" "daemon";
                /// The group the task runs as when not its user's primary
                /// group (see [`TaskSettings::gid`]).
                group: Option<Group>, GroupName, written String, example "root" "daemon";
                /// Environment variables added to the task's.
                env: BTreeMap<String, String>, Variables, written BTreeMap<String, String>,
                    example "{K: a}" "{K: b}";
                /// The task's working directory.
                workdir: PathBuf, Directory, written PathBuf, default PathBuf::from("/"),
                    example "/tmp" "/var";
                /// How often SIGTERM is repeated while a stopped task lingers.
                kill_retry: Duration, Given, written Duration => "serde_units::duration",
                    default Duration::from_secs(5), example "2s" "1s";
                /// How long after the first SIGTERM SIGKILL comes.
                kill_grace: Duration, Given, written Duration => "serde_units::duration",
                    default Duration::from_secs(10), example "3s" "4s";
                /// Bytes of stdout and stderr result_text keeps (the tail).
                output_tail: usize, TailSize, written u64 => "serde_units::size", default 64 * 1024,
                    example "16KiB" "1MiB";
                /// The delay before a failed try's second try.
                retry_delay: Duration, Given, written Duration => "serde_units::duration",
                    default Duration::from_secs(10), example "1s" "2m";
                /// Each later delay is this many times the one before.
                retry_multiplier: f64, Multiplier, written f64, default 2.0,
                    example "1.5" "3.5";
                /// Each delay spread by up to this fraction either way (`20%`
                /// of 10 s: 8 to 12 s), so that tries that failed together do
                /// not all come back together.
                retry_jitter: f64, Given, written f64 => "serde_units::fraction", default 0.0,
                    example "20%" "50%";
            }
        }
    };
}

/// What [`with_task_settings`] makes of the list.
macro_rules! expand_task_settings {
    // A file struct: its own fields, then the settings'.
    (@list { $(#[$meta:meta])* $vis:vis struct $name:ident {
        $($field:ident : $type:ty $(=> $with:literal)?,)*
    } }
        settings { $($(#[doc = $doc:literal])* $setting:ident : $resolved:ty, $rule:ident,
            written $written:ty $(=> $unit:literal)? $(, default $default:expr)?,
            example $a:literal $b:literal;)* }) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                #[serde(default $(, with = $with)?, skip_serializing_if = "Option::is_none")]
                $field: $type,
            )*
            $(
                #[serde(default $(, with = $unit)?, skip_serializing_if = "Option::is_none")]
                $setting: Option<$written>,
            )*
        }

        #[allow(dead_code)]
        impl $name {
            /// The task settings written here.
            fn settings(&self) -> $crate::config::Partial {
                $crate::config::Partial { $($setting: self.$setting.clone(),)* }
            }

            /// Writes these task settings here.
            fn set_settings(&mut self, settings: $crate::config::Partial) {
                $(self.$setting = settings.$setting;)*
            }
        }
    };

    // The resolved settings and how a `Partial` becomes them and back.
    (@list { resolved }
        settings { $($(#[doc = $doc:literal])* $setting:ident : $resolved:ty, $rule:ident,
            written $written:ty $(=> $unit:literal)? $(, default $default:expr)?,
            example $a:literal $b:literal;)* }) => {
        /// How one task type's processes are run and limited.
        #[derive(Debug, Clone, PartialEq)]
        pub struct TaskSettings {
            $(
                $(#[doc = $doc])*
                pub $setting: $resolved,
            )*
        }

        impl Partial {
            /// The built-in defaults.
            pub(super) fn built_in() -> Partial {
                Partial { $($setting: expand_task_settings!(@default $($default)?),)* }
            }

            /// These settings over `inherited`: each key's [`Rule::inherit`].
            fn over(self, inherited: Partial) -> Partial {
                Partial {
                    $($setting: <$rule as Rule<$written, $resolved>>::inherit(self.$setting, inherited.$setting),)*
                }
            }

            /// Applies `fallback` (the top-level defaults) and the built-in
            /// defaults. Errors name the key, without the file (the caller
            /// adds it).
            pub(super) fn resolve(
                &self,
                fallback: Option<&Partial>,
                dir: &Path,
            ) -> Result<TaskSettings, String> {
                let all = self
                    .clone()
                    .over(fallback.cloned().unwrap_or_default())
                    .over(Partial::built_in());
                Ok(TaskSettings {
                    $($setting: <$rule as Rule<$written, $resolved>>::resolve(all.$setting.clone(), &all, dir)
                        .map_err(|message| format!("{}: {message}", stringify!($setting)))?,)*
                })
            }
        }

        impl TaskSettings {
            /// These settings as a config file writes them, every key
            /// spelled out. `inherited`: the top-level defaults a task
            /// type's settings fall back to, which a key written here must
            /// not let through (a timeout of `0s` is none).
            pub(super) fn as_written(&self, inherited: Option<&TaskSettings>) -> Partial {
                Partial {
                    $($setting: <$rule as Rule<$written, $resolved>>::write(
                        &self.$setting,
                        inherited.map(|settings| &settings.$setting),
                    ),)*
                }
            }
        }

        /// Each setting's key and its two example values (YAML).
        #[cfg(test)]
        pub(super) const EXAMPLES: &[(&str, &str, &str)] = &[$((stringify!($setting), $a, $b),)*];
    };

    (@default) => { None };
    (@default $default:expr) => { Some($default) };
}

with_task_settings! { resolved }

/// How one task setting, written as a `W`, is inherited, checked and
/// resolved into the `R` the daemon uses, and written back.
pub(super) trait Rule<W, R> {
    /// A type's own value over the one it inherits (the top-level one,
    /// and that over the built-in default).
    fn inherit(own: Option<W>, inherited: Option<W>) -> Option<W> {
        own.or(inherited)
    }

    /// What the daemon uses, from the value in effect; `all`: every
    /// setting in effect, for one that depends on another. An error does
    /// not name the key (the caller does).
    fn resolve(value: Option<W>, all: &Partial, dir: &Path) -> Result<R, String>;

    /// Back to what a config file writes; `inherited`: what a type's
    /// entry would inherit, which the key written must not let through.
    fn write(resolved: &R, inherited: Option<&R>) -> Option<W>;
}

/// None unless written or inherited (a limit).
pub(super) struct Optional;

impl<W: Clone> Rule<W, Option<W>> for Optional {
    fn resolve(value: Option<W>, _: &Partial, _: &Path) -> Result<Option<W>, String> {
        Ok(value)
    }

    fn write(resolved: &Option<W>, _: Option<&Option<W>>) -> Option<W> {
        resolved.clone()
    }
}

/// A limit that `0` (`0s`) turns off, also where it is inherited.
/// (Before, `memory_limit: 0` set a limit of nothing, which failed every
/// try of the type, and `cpu_limit: 0s` one second of CPU.)
pub(super) struct OffAtZero;

/// A limit's value, of which zero means "no limit".
pub(super) trait Zero: Copy + PartialEq {
    const ZERO: Self;
}

impl Zero for Duration {
    const ZERO: Duration = Duration::ZERO;
}

impl Zero for u64 {
    const ZERO: u64 = 0;
}

impl<W: Zero> Rule<W, Option<W>> for OffAtZero {
    fn resolve(value: Option<W>, _: &Partial, _: &Path) -> Result<Option<W>, String> {
        Ok(value.filter(|limit| *limit != W::ZERO))
    }

    fn write(resolved: &Option<W>, inherited: Option<&Option<W>>) -> Option<W> {
        match (resolved, inherited.copied().flatten()) {
            (None, Some(_)) => Some(W::ZERO),
            (resolved, _) => *resolved,
        }
    }
}

/// The most processes Linux allows (`PID_MAX_LIMIT` on 64-bit kernels):
/// a cgroup's `pids.max` refuses more.
const MOST_PROCESSES: u64 = 4 * 1024 * 1024;

/// A process count limit, from 1 to [`MOST_PROCESSES`]. Above it, the
/// kernel refused the try's cgroup limit at every start: every try of the
/// type failed on hosts with cgroups, and passed `config check`.
pub(super) struct ProcessCount;

impl Rule<u64, Option<u64>> for ProcessCount {
    fn resolve(value: Option<u64>, _: &Partial, _: &Path) -> Result<Option<u64>, String> {
        match value {
            Some(0) => Err("must be at least 1".into()),
            Some(count) if count > MOST_PROCESSES => Err(format!(
                "must be at most {MOST_PROCESSES} (the most processes Linux allows; leave it out for no limit)"
            )),
            value => Ok(value),
        }
    }

    fn write(resolved: &Option<u64>, _: Option<&Option<u64>>) -> Option<u64> {
        *resolved
    }
}

/// A nice level, -20..19.
pub(super) struct Niceness;

impl Rule<i32, Option<i32>> for Niceness {
    fn resolve(value: Option<i32>, _: &Partial, _: &Path) -> Result<Option<i32>, String> {
        match value {
            Some(nice) if !(-20..=19).contains(&nice) => Err(format!("{nice} is outside -20..19")),
            value => Ok(value),
        }
    }

    fn write(resolved: &Option<i32>, _: Option<&Option<i32>>) -> Option<i32> {
        *resolved
    }
}

/// A setting that always has a value: its own, inherited, or the built-in
/// default.
pub(super) struct Given;

impl<W: Clone> Rule<W, W> for Given {
    fn resolve(value: Option<W>, _: &Partial, _: &Path) -> Result<W, String> {
        value.ok_or_else(no_default)
    }

    fn write(resolved: &W, _: Option<&W>) -> Option<W> {
        Some(resolved.clone())
    }
}

/// A factor of at least 1 (`retry_multiplier`), always with a value.
pub(super) struct Multiplier;

impl Rule<f64, f64> for Multiplier {
    fn resolve(value: Option<f64>, _: &Partial, _: &Path) -> Result<f64, String> {
        match value {
            None => Err(no_default()),
            Some(factor) if factor.is_finite() && factor >= 1.0 => Ok(factor),
            Some(_) => Err("must be a number of at least 1".into()),
        }
    }

    fn write(resolved: &f64, _: Option<&f64>) -> Option<f64> {
        Some(*resolved)
    }
}

/// How much output `result_text` keeps: 1 byte to [`MAX_OUTPUT_TAIL`],
/// always with a value.
pub(super) struct TailSize;

/// The largest `output_tail`: the kept text is stored in the row, where
/// MariaDB's `MEDIUMTEXT` holds 16 MiB and each byte that is not UTF-8 is
/// stored as three (U+FFFD). A larger tail could make a try's outcome a
/// write the database refuses.
pub(crate) const MAX_OUTPUT_TAIL: u64 = 4 << 20;

impl Rule<u64, usize> for TailSize {
    fn resolve(value: Option<u64>, _: &Partial, _: &Path) -> Result<usize, String> {
        match value {
            None => Err(no_default()),
            Some(0) => Err("must be at least 1 byte".into()),
            Some(bytes) if bytes > MAX_OUTPUT_TAIL => Err(format!(
                "{} is more than 4MiB: result_text is stored in the row (MariaDB's MEDIUMTEXT holds 16 MiB, and output that is not UTF-8 takes three bytes a byte); keep large output in a file and print its path",
                crate::units::format_size(bytes)
            )),
            Some(bytes) => Ok(bytes as usize),
        }
    }

    fn write(resolved: &usize, _: Option<&usize>) -> Option<u64> {
        Some(*resolved as u64)
    }
}

/// A directory, relative to the config's, that always has a value. Not the
/// config's directory by default: the config (and often the SQLite file)
/// must not be a task's working directory.
pub(super) struct Directory;

impl Rule<PathBuf, PathBuf> for Directory {
    fn resolve(value: Option<PathBuf>, _: &Partial, dir: &Path) -> Result<PathBuf, String> {
        value.map(|path| dir.join(path)).ok_or_else(no_default)
    }

    fn write(resolved: &PathBuf, _: Option<&PathBuf>) -> Option<PathBuf> {
        Some(resolved.clone())
    }
}

type Env = BTreeMap<String, String>;

/// Environment variables: a type's own are added to those it inherits.
pub(super) struct Variables;

impl Rule<Env, Env> for Variables {
    fn inherit(own: Option<Env>, inherited: Option<Env>) -> Option<Env> {
        match (own, inherited) {
            (Some(own), Some(mut inherited)) => {
                inherited.extend(own);
                Some(inherited)
            }
            (own, inherited) => own.or(inherited),
        }
    }

    fn resolve(value: Option<Env>, _: &Partial, _: &Path) -> Result<Env, String> {
        Ok(value.unwrap_or_default())
    }

    fn write(resolved: &Env, _: Option<&Env>) -> Option<Env> {
        (!resolved.is_empty()).then(|| resolved.clone())
    }
}

/// A user named in the config, looked up when it loads (never in a forked
/// child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub(crate) name: String,
    pub(crate) uid: u32,
    /// Its primary group.
    pub(crate) gid: u32,
    /// Every group it is a member of (its primary one too), as a login
    /// (`initgroups`, systemd's `User=`) gives them: before, its tasks got
    /// none but the primary one, and a file of a group it is in (`deploy`
    /// owning `/srv/shared`) was out of their reach.
    pub(crate) groups: Vec<u32>,
    /// Its home directory and login shell, from the user database.
    pub(crate) home: String,
    pub(crate) shell: String,
}

impl User {
    /// The groups a process of this user is in when its group is `gid`
    /// (`group:`, or the user's primary group): that one, and every other
    /// group the user is a member of. With `group:` the user's primary
    /// group is left out, as systemd's `User=` and `Group=` leave it out.
    pub(crate) fn groups_with(&self, gid: Option<u32>) -> Vec<u32> {
        let primary = gid.unwrap_or(self.gid);
        std::iter::once(primary)
            .chain(
                self.groups
                    .iter()
                    .copied()
                    .filter(|group| *group != self.gid && *group != primary),
            )
            .collect()
    }

    /// The variables that name the user a process runs as, as a login
    /// (`su -`, `runuser -l`, systemd's `User=`) sets them: a task run as
    /// this user gets these, not the daemon's (`HOME=/root` made a task's
    /// `~/.cache`, git's or pip's files, unwritable). The type's `env:`
    /// still overrides them.
    pub(crate) fn login_env(&self) -> [(&'static str, &str); 4] {
        [
            ("HOME", &self.home),
            ("USER", &self.name),
            ("LOGNAME", &self.name),
            ("SHELL", &self.shell),
        ]
    }
}

/// A group named in the config, looked up when it loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub(crate) name: String,
    pub(crate) gid: u32,
}

impl TaskSettings {
    /// The group a try runs as: `group:`, else the primary group of `user:`.
    pub(crate) fn gid(&self) -> Option<u32> {
        self.group
            .as_ref()
            .map(|group| group.gid)
            .or_else(|| self.user.as_ref().map(|user| user.gid))
    }
}

/// `user:`, looked up by name.
pub(super) struct UserName;

impl Rule<String, Option<User>> for UserName {
    fn resolve(value: Option<String>, _: &Partial, _: &Path) -> Result<Option<User>, String> {
        let Some(name) = value else { return Ok(None) };
        let entry = nix::unistd::User::from_name(&name)
            .map_err(|e| format!("cannot look up `{name}`: {e}"))?
            .ok_or_else(|| format!("no such user `{name}`"))?;
        let c_name = std::ffi::CString::new(name.as_str())
            .map_err(|_| format!("cannot look up `{name}`: a NUL byte in the name"))?;
        let groups = nix::unistd::getgrouplist(&c_name, entry.gid)
            .map_err(|e| format!("cannot look up the groups of `{name}`: {e}"))?;
        Ok(Some(User {
            uid: entry.uid.as_raw(),
            gid: entry.gid.as_raw(),
            groups: groups.into_iter().map(|gid| gid.as_raw()).collect(),
            home: entry.dir.to_string_lossy().into_owned(),
            shell: entry.shell.to_string_lossy().into_owned(),
            name,
        }))
    }

    fn write(resolved: &Option<User>, _: Option<&Option<User>>) -> Option<String> {
        resolved.as_ref().map(|user| user.name.clone())
    }
}

/// `group:`, looked up by name; a root daemon refuses it without `user:`.
pub(super) struct GroupName;

impl Rule<String, Option<Group>> for GroupName {
    fn resolve(value: Option<String>, all: &Partial, _: &Path) -> Result<Option<Group>, String> {
        let Some(name) = value else { return Ok(None) };
        if all.user.is_none() && nix::unistd::geteuid().is_root() {
            return Err(
                "without user: would run tasks as root (uid 0 kept); set user: as well".into(),
            );
        }
        let entry = nix::unistd::Group::from_name(&name)
            .map_err(|e| format!("cannot look up `{name}`: {e}"))?
            .ok_or_else(|| format!("no such group `{name}`"))?;
        Ok(Some(Group {
            gid: entry.gid.as_raw(),
            name,
        }))
    }

    fn write(resolved: &Option<Group>, _: Option<&Option<Group>>) -> Option<String> {
        resolved.as_ref().map(|group| group.name.clone())
    }
}

/// What a `Given` setting declared without a default says (never a config's
/// fault: every such setting in the list has one).
fn no_default() -> String {
    "has no built-in default".into()
}
