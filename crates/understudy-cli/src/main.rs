//! `understudy`: the one binary. `main` parses flags, runs, and maps errors
//! to an exit code; the commands live in their own modules.

mod autopilot;
mod calls;
mod cli;
mod dataset;
mod eval;
mod feedback;
mod fetch;
mod history;
mod html;
mod import;
mod init;
mod keys;
mod output;
mod plan;
mod promote;
mod quickstart;
mod report;
mod savings;
mod serve;
mod train;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the gateway allocates a few small buffers per request, and
/// glibc's allocator showed up at several percent of its profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Candle sizes its matmul pool from this; unset, it re-reads /proc/cpuinfo
    // on every matmul (docs: ML-STACK-NOTES). Set it before any thread starts.
    let args = cli::Cli::parse();
    if let cli::Command::Autopilot(autopilot) = &args.command {
        // The autopilot's thread budget: training and evaluation leave the
        // rest of the machine to the gateway.
        std::env::set_var("RAYON_NUM_THREADS", autopilot.threads.to_string());
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n_threads = std::thread::available_parallelism().map_or(1, usize::from);
        std::env::set_var("RAYON_NUM_THREADS", n_threads.to_string());
    }
    // candle's element-wise thread pool spins while it waits; on two shared
    // cores that cost training steps 2-3x (measured). Matmuls still use rayon.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if matches!(args.command, cli::Command::Train(_) | cli::Command::Quickstart(_) | cli::Command::Autopilot(_)) {
        // Training re-allocates the same large tensors every step.
        understudy_trainer::keep_freed_memory();
    }
    // `serve` exports traces when its config says so; the subscriber is built
    // once, so its config is read here (a config error is `serve`'s to report).
    let telemetry = match &args.command {
        cli::Command::Serve(_) => output::load_config(&args.config).ok().map(|config| config.telemetry),
        _ => None,
    };
    let traces = match init_tracing(args.verbose, telemetry.as_ref()) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(traces) = &traces {
        eprintln!("traces: one span per call, sent over OTLP/HTTP to {}", traces.endpoint());
    }
    let outcome = run(args);
    // Sends the spans still buffered, after the gateway has stopped.
    drop(traces);
    match outcome {
        Ok(code) => code,
        Err(error) => {
            if output::is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: cli::Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(dispatch(args.config, args.command))
}

/// Runs one command. `quickstart` drives the other commands through here,
/// exactly as a user's command line would.
async fn dispatch(config_path: std::path::PathBuf, command: cli::Command) -> anyhow::Result<ExitCode> {
    let done = |()| ExitCode::SUCCESS;
    match command {
        cli::Command::Init(command) => init::run(&config_path, command).map(done),
        cli::Command::Serve(command) => serve::run(&config_path, command).await.map(done),
        cli::Command::Import(command) => import::run(&config_path, command).await,
        cli::Command::Calls(command) => calls::run(&config_path, command).await.map(done),
        cli::Command::Report(command) => report::run(&config_path, command).await.map(done),
        cli::Command::Dataset(command) => dataset::run(&config_path, command).await.map(done),
        cli::Command::Feedback(command) => feedback::run(&config_path, command).await.map(done),
        cli::Command::Plan(command) => plan::run(&config_path, command).await.map(done),
        cli::Command::Train(command) => train::run(&config_path, command).await.map(done),
        cli::Command::Eval(command) => eval::run(&config_path, command).await.map(done),
        cli::Command::Promote(command) => promote::run(&config_path, command).await.map(done),
        cli::Command::Keys(command) => keys::run(&config_path, command).await.map(done),
        cli::Command::Quickstart(command) => Box::pin(quickstart::run(command)).await.map(done),
        cli::Command::Autopilot(command) => autopilot::run(&config_path, command).await.map(done),
        cli::Command::History(command) => history::run(&config_path, command).await.map(done),
    }
}

/// Parses `args` (without the program name) as a command line and runs it.
pub(crate) async fn run_command_line(args: &[String]) -> anyhow::Result<()> {
    let cli = cli::Cli::try_parse_from(std::iter::once("understudy".to_string()).chain(args.iter().cloned()))?;
    let code = Box::pin(dispatch(cli.config, cli.command)).await?;
    anyhow::ensure!(code == ExitCode::SUCCESS, "`understudy {}` failed", args.join(" "));
    Ok(())
}

fn init_tracing(
    verbose: bool,
    telemetry: Option<&understudy_config::TelemetryConfig>,
) -> Result<Option<understudy_gateway::telemetry::TraceExport>, understudy_gateway::telemetry::TelemetryError> {
    let default = if verbose { "info,understudy=debug" } else { "warn" };
    let directives = std::env::var("UNDERSTUDY_LOG").unwrap_or_else(|_| default.to_string());
    understudy_gateway::telemetry::init(&directives, telemetry)
}
