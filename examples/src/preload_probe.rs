//! For tests and the benchmark of preload: a task program whose `Probe`
//! reports how its try was started (pid, process group, parent, open
//! descriptors, environment, memory left by earlier tries), can sleep,
//! fail or be told to take `PROBE_SETUP_MS` milliseconds to boot (to leave
//! `PROBE_SETUP_GARBAGE_MB` megabytes freed in small pieces, or to
//! leave a thread running after its setup, `PROBE_SETUP_THREAD`, or to
//! register an exit handler that appends `exit handler ran in PID` to the
//! file `PROBE_ATEXIT_FILE`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use task_sdk::{Context, Task, Tasks};

/// The pid of the process that ran the setup.
static BOOTED_IN: OnceLock<u32> = OnceLock::new();

/// What a setup with garbage keeps (`PROBE_SETUP_GARBAGE_MB`).
static KEPT: OnceLock<Vec<Vec<u8>>> = OnceLock::new();

/// Tries seen by this process's memory: 1 in every try when each is forked
/// from a parent that never runs one.
static TRIES_SEEN: AtomicU32 = AtomicU32::new(0);

fn main() -> ExitCode {
    Tasks::new()
        .register(Probe)
        .setup(|| {
            let setup_ms = std::env::var("PROBE_SETUP_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(setup_ms));
            // A setup that leaves garbage: PROBE_SETUP_GARBAGE_MB megabytes
            // in small pieces, of which one in 64 is kept.
            let garbage_mb: usize = std::env::var("PROBE_SETUP_GARBAGE_MB")
                .ok()
                .and_then(|mb| mb.parse().ok())
                .unwrap_or(0);
            let mut pieces: Vec<Vec<u8>> = (0..garbage_mb * 1024)
                .map(|index| vec![index as u8; 1000])
                .collect();
            let mut index = 0;
            pieces.retain(|_| {
                index += 1;
                index % 64 == 0
            });
            KEPT.set(pieces).ok();
            let _ = BOOTED_IN.set(std::process::id());
            if std::env::var_os("PROBE_ATEXIT_FILE").is_some() {
                // SAFETY: registering a plain function with the C library.
                unsafe { libc::atexit(note_exit) };
            }
            // A setup that leaves a thread running cannot be preloaded.
            if std::env::var_os("PROBE_SETUP_THREAD").is_some() {
                std::thread::spawn(|| loop {
                    std::thread::park();
                });
            }
        })
        .serve()
}

/// The exit handler of `PROBE_ATEXIT_FILE`.
extern "C" fn note_exit() {
    use std::io::Write;
    if let Some(path) = std::env::var_os("PROBE_ATEXIT_FILE") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "exit handler ran in {}", std::process::id());
        }
    }
}

struct Probe;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ProbeOptions {
    sleep_ms: u64,
    /// Sleep this long on the first try only.
    first_try_sleep_ms: u64,
    fail: Option<String>,
    /// Print only `ok` (for the benchmark).
    quiet: bool,
    /// Print only the wall clock at the start of `run`, in nanoseconds
    /// since the epoch (the benchmark's claim-to-start).
    clock: bool,
}

impl Task for Probe {
    const NAME: &'static str = "Probe";
    type Options = ProbeOptions;

    fn run(&self, options: ProbeOptions, context: &Context) -> task_sdk::Result<String> {
        if options.clock {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            return Ok(now.as_nanos().to_string());
        }
        let seen = TRIES_SEEN.fetch_add(1, Ordering::SeqCst) + 1;
        if options.quiet {
            return Ok("ok".into());
        }
        eprintln!(
            "probe try {} of request {}",
            context.try_number, context.request_id
        );
        std::thread::sleep(Duration::from_millis(options.sleep_ms));
        if context.try_number == 1 {
            std::thread::sleep(Duration::from_millis(options.first_try_sleep_ms));
        }
        if let Some(message) = options.fail {
            return Err(task_sdk::Error::msg(message));
        }
        // SAFETY: plain queries about this process.
        let (pgid, ppid) = unsafe { (libc::getpgid(0), libc::getppid()) };
        // SAFETY: F_GETFD on numbers that may not be open.
        let fds: Vec<i32> = (0..1024)
            .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
            .collect();
        let mut env: Vec<String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("TASKRUNNER_") || name.starts_with("PROBE_"))
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        env.sort();
        Ok(format!(
            "pid: {}\npgid: {pgid}\nppid: {ppid}\nbooted_in: {}\nfds: {fds:?}\ntries_seen: {seen}\nenv: {env:?}\ncwd: {}\ncgroup: {}\n",
            std::process::id(),
            BOOTED_IN.get().copied().unwrap_or(0),
            std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            std::fs::read_to_string("/proc/self/cgroup")
                .unwrap_or_default()
                .trim()
                .replace('\n', " "),
        ))
    }
}
