//! `taskrunner-cli`: see `taskrunner::cli`.

use taskrunner::supervisor::watchdog;

fn main() -> std::process::ExitCode {
    taskrunner::supervisor::restore_child_signal();
    // The fencing watchdog of a `run --record`: this executable, started by
    // the run (supervisor/watchdog.rs).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|flag| flag == watchdog::FLAG) {
        return watchdog::main(&args[1..]);
    }
    taskrunner::cli::main()
}
