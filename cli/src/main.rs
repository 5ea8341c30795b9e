//! `dtrain`: parse the command line and dispatch to training or a subcommand.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage error (one line on stderr).

use std::process::ExitCode;

use dtrain::args::{resolve_train_args, UsageError};
use dtrain::command::{parse_cli, Command};

fn usage_exit(e: UsageError) -> ExitCode {
    if let UsageError::Help(text) = &e {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    fail(&format!("dtrain: error: {e}"), 2)
}

/// Prints `line` and, when torchrun started us, records it in `TORCHELASTIC_ERROR_FILE`
/// so torchrun's failure summary shows it; returns `code`.
fn fail(line: &str, code: u8) -> ExitCode {
    eprintln!("{line}");
    let env = |k: &str| std::env::var(k).ok();
    if let Some((path, Err(e))) = dtrain::error_file::record_error(&env, line) {
        eprintln!(
            "dtrain: warning: cannot write the error file {} for torchrun: {e}",
            path.display()
        );
    }
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match parse_cli(raw.clone()) {
        Ok(c) => c,
        Err(e) => return usage_exit(e),
    };
    match cli.command {
        None => {
            let env = |k: &str| std::env::var(k).ok();
            let cfg = match resolve_train_args(&cli.train, &env)
                .and_then(|c| dtrain::memory::check_training_fits(&c, 1).map(|_| c))
            {
                Ok(c) => c,
                Err(e) => return usage_exit(e),
            };
            run_training(&cfg)
        }
        Some(Command::Launch(args)) => {
            // Subcommands come first (flags and subcommands conflict), so raw[2..] are the
            // launch arguments.
            let launch_args = raw.get(2..).unwrap_or(&[]);
            match dtrain::launch::run(&args, launch_args) {
                Ok(code) => ExitCode::from(code),
                Err(dtrain::launch::LaunchError::Usage(e)) => usage_exit(e),
                Err(e) => {
                    eprintln!("dtrain launch: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "test-hooks")]
        Some(Command::LauncherTestChild(args)) => {
            ExitCode::from(dtrain::launch::test_child::run_test_child(&args))
        }
        Some(Command::Plot(args)) => match dtrain::plot::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dtrain plot: error: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Eval(args)) => match dtrain::eval_cmd::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(dtrain::eval_cmd::EvalError::Usage(e)) => usage_exit(e),
            Err(e @ dtrain::eval_cmd::EvalError::Checkpoint { .. }) => {
                fail(&format!("dtrain eval: error: {e}"), 2)
            }
            Err(e) => fail(&format!("dtrain eval: error: {e}"), 1),
        },
        Some(Command::Bench(args)) => match dtrain::bench_cmd::run(&args) {
            Ok(code) => ExitCode::from(code),
            Err(dtrain::bench_cmd::BenchError::Usage(msg)) => usage_exit(UsageError::Invalid(msg)),
            Err(e) => {
                eprintln!("dtrain bench: error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn run_training(cfg: &dtrain::args::TrainConfig) -> ExitCode {
    match dtrain::train::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("dtrain: error: {e}"), e.exit_code()),
    }
}
