//! Flags, and nothing else: every struct here is parsed by clap.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "understudy",
    version,
    about = "Record your LLM calls, train a small understudy, and hand it the stage."
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "UNDERSTUDY_CONFIG", default_value = understudy_config::DEFAULT_CONFIG_FILE)]
    pub config: PathBuf,
    /// Log more (or set UNDERSTUDY_LOG, e.g. UNDERSTUDY_LOG=debug).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write a commented understudy.toml.
    Init(InitCommand),
    /// Serve the OpenAI-compatible gateway.
    Serve(ServeCommand),
    /// Import past calls from OpenAI fine-tuning JSONL.
    Import(ImportCommand),
    /// List, show and export recorded calls.
    #[command(subcommand)]
    Calls(CallsCommand),
    /// Reports over recorded calls.
    #[command(subcommand)]
    Report(ReportCommand),
    /// The demo: real traffic from the TREC question set through a replay lead.
    Quickstart(QuickstartCommand),
}

#[derive(Args)]
pub struct QuickstartCommand {
    /// Where the demo keeps its config, store and data.
    #[arg(long, default_value = "understudy-quickstart")]
    pub dir: PathBuf,
    /// Where the TREC file is kept (default: DIR/data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The replay lead's price per 1M input tokens, standing in for a cloud model.
    #[arg(long, default_value_t = 2.50)]
    pub lead_input_price: f64,
    /// The replay lead's price per 1M output tokens.
    #[arg(long, default_value_t = 10.00)]
    pub lead_output_price: f64,
    /// The share of questions, oldest first, sent as traffic.
    #[arg(long, default_value_t = 0.8)]
    pub traffic_share: f64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

#[derive(Args)]
pub struct InitCommand {
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ServeCommand {
    /// Address to listen on (overrides [server] listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

#[derive(Args)]
pub struct ImportCommand {
    /// The task the calls belong to.
    #[arg(long)]
    pub task: String,
    /// The model that answered, for lines without a `model` key (default: the task's lead).
    #[arg(long)]
    pub model: Option<String>,
    /// Import nothing if any line is malformed.
    #[arg(long)]
    pub strict: bool,
    /// The JSONL file.
    pub file: PathBuf,
}

#[derive(Args, Clone, Default)]
pub struct FilterArgs {
    #[arg(long)]
    pub task: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Calls at or after this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Calls before this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub until: Option<String>,
    /// ok, error, or an HTTP status code.
    #[arg(long)]
    pub status: Option<String>,
}

#[derive(Subcommand)]
pub enum CallsCommand {
    /// A table of calls, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One call in full, by id or a unique id prefix.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Successful chat calls as OpenAI fine-tuning JSONL (the import format), oldest first.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Calls, tokens and money per task, model and day.
    Costs {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
}
