//! `taskrunner-cli`: see `taskrunner::cli`.

fn main() -> std::process::ExitCode {
    taskrunner::cli::main()
}
