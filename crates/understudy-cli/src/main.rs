//! `understudy`: the one binary. `main` parses flags, runs, and maps errors
//! to an exit code; the commands live in their own modules.

mod calls;
mod cli;
mod dataset;
mod fetch;
mod import;
mod init;
mod output;
mod quickstart;
mod report;
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
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n_threads = std::thread::available_parallelism().map_or(1, usize::from);
        std::env::set_var("RAYON_NUM_THREADS", n_threads.to_string());
    }
    // candle's element-wise thread pool spins while it waits; on two shared
    // cores that cost training steps 2-3x (measured). Matmuls still use rayon.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args = cli::Cli::parse();
    init_tracing(args.verbose);
    match run(args) {
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
    let config_path = args.config;
    match args.command {
        cli::Command::Init(command) => init::run(&config_path, command).map(|()| ExitCode::SUCCESS),
        cli::Command::Serve(command) => runtime.block_on(serve::run(&config_path, command)).map(|()| ExitCode::SUCCESS),
        cli::Command::Import(command) => runtime.block_on(import::run(&config_path, command)),
        cli::Command::Calls(command) => runtime.block_on(calls::run(&config_path, command)).map(|()| ExitCode::SUCCESS),
        cli::Command::Report(command) => {
            runtime.block_on(report::run(&config_path, command)).map(|()| ExitCode::SUCCESS)
        }
        cli::Command::Dataset(command) => {
            runtime.block_on(dataset::run(&config_path, command)).map(|()| ExitCode::SUCCESS)
        }
        cli::Command::Train(command) => runtime.block_on(train::run(&config_path, command)).map(|()| ExitCode::SUCCESS),
        cli::Command::Quickstart(command) => runtime.block_on(quickstart::run(command)).map(|()| ExitCode::SUCCESS),
    }
}

fn init_tracing(verbose: bool) {
    let default = if verbose { "info,understudy=debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
