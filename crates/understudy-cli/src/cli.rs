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
    /// Build, import, export and inspect dataset versions of a task's calls.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Rate a recorded call's answer; datasets learn only from calls not rated
    /// negative, and only from positively rated ones once a task has any.
    Feedback(FeedbackCommand),
    /// Before training: what the understudy would cost per call (timed on
    /// this machine), what the lead costs, the break-even coverage and the
    /// training run's payback; warns when the understudy cannot pay.
    Plan(PlanCommand),
    /// Fine-tune an understudy on a task's dataset.
    Train(TrainCommand),
    /// Compare model versions with the lead on the task's newest test split.
    Eval(EvalCommand),
    /// Change a task's routing policy; running gateways follow within a second.
    Promote(PromoteCommand),
    /// Gateway keys: create (shown once), list, show and revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The demo: real traffic from the TREC question set through a replay lead.
    Quickstart(QuickstartCommand),
    /// Run the loop by itself for every task with `[tasks.NAME.autopilot]`:
    /// train, shadow, certify, promote, and retrain on new calls, drift or a
    /// demotion. Runs beside `serve`, as its own process at a lower priority.
    Autopilot(AutopilotCommand),
    /// A task's history: policy changes (by hand, by the autopilot, by the
    /// guardrail) and the autopilot's transitions, with their reasons.
    History(HistoryCommand),
}

#[derive(Args)]
pub struct AutopilotCommand {
    /// Only this task (default: every task with an autopilot).
    #[arg(long)]
    pub task: Option<String>,
    /// One pass over the tasks, then exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between passes.
    #[arg(long, default_value_t = 30)]
    pub interval_secs: u64,
    /// Threads training and evaluation may use, so that a gateway on the
    /// same machine keeps its share.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: u64,
    /// How much lower than the default the process's CPU priority is (0-19).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub nice: i32,
    /// Hand a task pinned by a promotion by hand back to the autopilot, and exit.
    #[arg(long, value_name = "TASK")]
    pub release: Option<String>,
    /// The encoder the input-drift test embeds prompts with (as `report
    /// drift --encoder`; default `minilm` when it is on this machine).
    #[arg(long)]
    pub encoder: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct HistoryCommand {
    #[arg(long)]
    pub task: String,
    #[arg(long)]
    pub json: bool,
}

/// `understudy promote --task T --policy P`: hands the understudy (some of)
/// the stage, or gives it back to the lead with `--policy lead`.
#[derive(Args)]
pub struct PromoteCommand {
    /// The task to change.
    #[arg(long)]
    pub task: String,
    /// lead | shadow | canary:PCT | cascade[:THRESHOLD] | understudy. A bare
    /// `cascade` takes the threshold `understudy eval` certified for the
    /// model, and is refused when it certified none.
    #[arg(long)]
    pub policy: String,
    /// The cascade's confidence threshold, overriding the certified one
    /// (allowed, with a warning: nothing then backs the target agreement).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// The understudy: a model version id (or prefix) from `understudy train`,
    /// or a model of the config. Default: the task's newest model version, else
    /// the config's `understudy`.
    #[arg(long)]
    pub model: Option<String>,
    /// A note kept with the change (why it was made).
    #[arg(long)]
    pub note: Option<String>,
    /// Print the change as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `understudy feedback --call ID --score positive|negative`.
#[derive(Args)]
pub struct FeedbackCommand {
    /// The call's id (the gateway's `x-understudy-call-id` header), or a unique prefix of it.
    #[arg(long)]
    pub call: String,
    /// positive | negative (also up/down, good/bad, 1/-1).
    #[arg(long, allow_hyphen_values = true)]
    pub score: String,
    /// Why: kept with the verdict.
    #[arg(long)]
    pub comment: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EvalCommand {
    #[arg(long)]
    pub task: String,
    /// A model version to evaluate; repeat for several (default: the task's newest).
    #[arg(long)]
    pub model: Vec<String>,
    /// The dataset version (default: the task's newest).
    #[arg(long)]
    pub dataset: Option<String>,
    /// The promise the cascade's threshold is certified for: the share of
    /// served answers that agree with the lead's, in (0, 1] (default: the
    /// task's `target_agreement` in the config, which the guardrail watches).
    #[arg(long, value_parser = target_agreement)]
    pub target_agreement: Option<f64>,
    /// The chance, in (0, 1), that the certified threshold breaks the
    /// promise: with probability at least 1 - delta over the draw of the
    /// validation calls, the served answers agree with the lead at least
    /// `--target-agreement` of the time.
    #[arg(long, default_value_t = 0.05, value_parser = delta)]
    pub delta: f64,
    /// What an hour of the machine serving the understudy costs, in dollars,
    /// charged on the CPU time spent answering, shared by the machine's cores
    /// (default: the config's local provider's `machine_price_per_hour`, else
    /// 0.10).
    #[arg(long)]
    pub machine_price_per_hour: Option<f64>,
    /// The most tokens an answer may have (default: room for the longest
    /// reference answer of the test and validation splits).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
    /// Also evaluate an untuned causal LM zero-shot (asked as the gateway
    /// would ask it: at temperature 0, and decoding only the task's `labels`
    /// when the config lists them): a GGUF file, an HF directory, or a local
    /// model of the config.
    #[arg(long)]
    pub zero_shot: Option<String>,
    /// Also write a self-contained HTML report (confusion matrices, the
    /// cascade's coverage-agreement curve) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Also write every test answer as JSONL to this file: the model, the
    /// prompt text, the lead's answer, the model's, its confidence, whether
    /// they agree, and for a call the cascade never serves, why (`fallback`)
    /// and the understudy's error.
    #[arg(long)]
    pub answers: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainMethod {
    /// A classifier for label tasks, LoRA for generation tasks.
    Auto,
    /// An encoder with a classification head (label tasks).
    Classifier,
    /// LoRA on a causal LM.
    Lora,
}

impl From<TrainMethod> for understudy_loop::Method {
    fn from(method: TrainMethod) -> understudy_loop::Method {
        match method {
            TrainMethod::Auto => understudy_loop::Method::Auto,
            TrainMethod::Classifier => understudy_loop::Method::Classifier,
            TrainMethod::Lora => understudy_loop::Method::Lora,
        }
    }
}

#[derive(Args)]
pub struct PlanCommand {
    #[arg(long)]
    pub task: String,
    /// The base model training would start from, named as `train --base`
    /// names it (default: minilm for a classifier, smollm2 for LoRA).
    #[arg(long)]
    pub base: Option<String>,
    #[arg(long, value_enum, default_value_t = TrainMethod::Auto)]
    pub method: TrainMethod,
    /// How many of the task's newest recorded prompts to time the understudy on.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub sample: u64,
    /// Epochs the training would run (default: the trainer's; with it, the
    /// training time is estimated even when the task has an earlier run).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// What an hour of the machine costs, in dollars (default: the config's
    /// local provider's `machine_price_per_hour`, else 0.10).
    #[arg(long)]
    pub machine_price_per_hour: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TrainCommand {
    #[arg(long)]
    pub task: String,
    /// The dataset version (default: the task's newest).
    #[arg(long)]
    pub dataset: Option<String>,
    /// The base model: a model of the config with a `path` ([models.NAME]),
    /// a built-in name (`minilm`, `smollm2`: under models/ next to the
    /// config), or a path to an HF folder or, for LoRA, a GGUF file (default:
    /// minilm for a classifier, smollm2 for LoRA).
    #[arg(long)]
    pub base: Option<String>,
    #[arg(long, value_enum, default_value_t = TrainMethod::Auto)]
    pub method: TrainMethod,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Fine-tune only the top N encoder layers (default: all of them).
    #[arg(long)]
    pub train_top_layers: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// LoRA target modules, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Stop LoRA training after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// LoRA examples are cut to their last N tokens.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Forward passes per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Stop after this many epochs without a better validation score (the
    /// task metric: accuracy for labels, token F1 of a greedy decode for
    /// generation; ties go to the lower validation loss).
    #[arg(long)]
    pub patience: Option<usize>,
    /// LoRA: measure the task metric on the first N validation rows after
    /// every epoch (0: validation loss only).
    #[arg(long, default_value_t = 64)]
    pub metric_rows: usize,
    /// LoRA on a generation task: the greedy decode the token F1 scores stops
    /// after N new tokens.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u64).range(1..))]
    pub metric_max_tokens: u64,
    /// Where the trained model goes (default: understudies/TASK/DATASET-METHOD next to the datasets).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Checkpoint every N optimizer steps (and at every epoch's end), so that
    /// a killed run can go on with --resume.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    #[arg(long)]
    pub json: bool,
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
    /// Where the base models are kept (default: DIR/models).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Training epochs of the understudy. Three: on one night's traffic two
    /// epochs left MiniLM at 92.8 % test accuracy and the cascade serving 64 %
    /// of calls at 0.98 agreement; three gave 93.6 % and 83 %.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// The cascade's target agreement with the lead.
    #[arg(long, default_value_t = 0.98)]
    pub target_agreement: f64,
    /// The price of an hour of this machine, for the understudy's compute.
    #[arg(long, default_value_t = 0.10)]
    pub machine_price_per_hour: f64,
    /// Share of the questions, the newest, sent after the cascade is promoted.
    #[arg(long, default_value_t = 0.2)]
    pub final_share: f64,
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
    /// Applies `[store]` retention now (`serve` also does, hourly): clears
    /// the bodies of calls older than `keep_bodies_days` and deletes calls
    /// older than `keep_calls_days`. The savings ledger keeps counting them.
    Prune,
}

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Calls, tokens and money per task, model and day (or per key and day).
    Costs {
        #[command(flatten)]
        filter: FilterArgs,
        /// `key`: group by the gateway key that made the calls instead.
        #[arg(long, value_parser = ["key"])]
        by: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Per task and day: calls, the understudy's share, agreement with the
    /// lead, the lead's cost avoided, the understudy's compute, net savings,
    /// the one-off training cost and the payback period.
    Savings {
        #[command(flatten)]
        filter: FilterArgs,
        /// The price of a machine hour, for the training cost (default: the
        /// config's local provider, else 0.10).
        #[arg(long)]
        machine_price_per_hour: Option<f64>,
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report with plots to this file.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Whether a task's traffic moved away from what its understudy learned:
    /// new labels and shifted label shares in the lead's answers, and the
    /// understudy's confidence and coverage falling, each a statistical test.
    Drift {
        #[arg(long)]
        task: String,
        /// Calls per window (the newest ones against the training set and
        /// the first ones after the current promotion).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..))]
        window: u64,
        /// The tests' level (false-alarm rate).
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        /// The encoder the input-drift test embeds prompts with: an HF
        /// encoder folder, a config model with a path, or `minilm` (the
        /// default; the test is skipped when it is not on this machine).
        #[arg(long)]
        encoder: Option<String>,
        /// Also the signals over time: the calls since the current promotion
        /// in consecutive windows, at most this many (the newest).
        #[arg(long, default_value_t = 20)]
        windows: usize,
        /// Also write a self-contained HTML page plotting the signals over time.
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// How a dataset version is made; shared by `dataset build` and `dataset import`.
#[derive(Args, Clone)]
pub struct DatasetBuildArgs {
    /// Rows created at or after this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Rows created before this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub until: Option<String>,
    /// Drop rows whose prompt text has fewer characters.
    #[arg(long)]
    pub min_chars: Option<usize>,
    /// Drop rows whose prompt text has more characters.
    #[arg(long)]
    pub max_chars: Option<usize>,
    /// Jaccard similarity (of word shingles) from which prompts are near-duplicates; 1 turns this off.
    #[arg(long, default_value_t = 0.9)]
    pub near_dup_threshold: f64,
    /// Replace e-mail addresses, phone numbers and secrets with <EMAIL>, <PHONE>, <SECRET>.
    #[arg(long)]
    pub scrub: bool,
    /// The share of rows, newest first, that becomes the test split.
    #[arg(long, default_value_t = 0.2)]
    pub test_share: f64,
    /// The share of rows just before the test split that becomes the validation split.
    #[arg(long, default_value_t = 0.1)]
    pub validation_share: f64,
    /// Print the manifest as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Make a dataset version from a task's successful calls.
    Build {
        #[arg(long)]
        task: String,
        #[command(flatten)]
        options: DatasetBuildArgs,
    },
    /// Make a dataset version from OpenAI fine-tuning JSONL (rows without `created_at` keep file order).
    Import {
        #[arg(long)]
        task: String,
        /// The JSONL file.
        file: PathBuf,
        #[command(flatten)]
        options: DatasetBuildArgs,
    },
    /// Write a version's rows as OpenAI fine-tuning JSONL.
    Export {
        /// The dataset id, or a unique prefix of it.
        id: String,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[arg(long, default_value = "all", value_parser = ["train", "validation", "test", "all"])]
        split: String,
    },
    /// Registered dataset versions, newest first.
    List {
        #[arg(long)]
        task: Option<String>,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One version's manifest: counts, labels, filters, parameters.
    Show {
        /// The dataset id, or a unique prefix of it.
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// `--target-agreement`: the range a certificate accepts.
fn target_agreement(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    understudy_eval::check_target_agreement(value)
        .map_err(|error| format!("{error}: the target is a share of agreeing answers in (0, 1], such as 0.98"))?;
    Ok(value)
}

/// `--delta`: a probability strictly between 0 and 1.
fn delta(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    understudy_eval::check_delta(value).map_err(|error| {
        format!("{error}: delta is the chance that the certified threshold breaks the promise, such as 0.05")
    })?;
    Ok(value)
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key. It is printed once; the store keeps only its hash.
    Create(KeysCreateArgs),
    /// Every key, revoked ones too.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One key, by id, id prefix or name, with its spend this period.
    Show {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key (by id, id prefix or name); running gateways refuse it
    /// within a second.
    Revoke { key: String },
}

#[derive(Args)]
pub struct KeysCreateArgs {
    /// A name for reports and records (one usable key per name).
    #[arg(long)]
    pub name: String,
    /// The only tasks the key may call, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// The only models the key may call by name, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// The most the key's calls may cost per --period, in US dollars.
    #[arg(long)]
    pub budget_usd: Option<f64>,
    /// day or month (UTC) for --budget-usd [default: month].
    #[arg(long, requires = "budget_usd", value_parser = ["day", "month"])]
    pub period: Option<String>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute (a request counts its prompt and its max_tokens).
    #[arg(long)]
    pub tpm: Option<u64>,
    /// When the key stops working (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub expires: Option<String>,
    /// May rate any call and read /metrics and /healthz details.
    #[arg(long)]
    pub admin: bool,
    #[arg(long)]
    pub json: bool,
}
