//! `understudy.toml`: raw structs that mirror the file, validated into [`Config`].
//!
//! Raw structs deny unknown keys so that a typo is an error, not a silent
//! default. Every error names the key and, where the file has one, the line.

mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use understudy_types::{Price, TaskKind};

pub use template::TEMPLATE;

/// The file name `understudy` looks for when no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "understudy.toml";

/// What an hour of the machine serving understudies costs, in dollars, when
/// the config has no local provider to say: a 2-core cloud VM, roughly, in 2026.
pub const DEFAULT_MACHINE_PRICE_PER_HOUR: f64 = 0.10;

/// How many concurrent requests a local classifier or encoder answers in one
/// forward pass at most, when the config does not say (`max_batch`).
pub const DEFAULT_LOCAL_MAX_BATCH: usize = 32;

/// The largest `max_batch` the config accepts.
pub const MAX_LOCAL_MAX_BATCH: usize = 1024;

/// How many draft tokens a local causal LM verifies per decode step for a
/// greedy request (copy-aware speculative decoding: tokens copied from the
/// request's own prompt and answer), when the config does not say
/// (`speculative_draft`). An extraction answer copies values of a few
/// tokens each; on 2 cores a step of 5 tokens costs about 2.2 steps of one,
/// and longer drafts were rejected more often than they paid (bench/README.md).
pub const DEFAULT_SPECULATIVE_DRAFT: usize = 4;

/// The largest `speculative_draft` the config accepts.
pub const MAX_SPECULATIVE_DRAFT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{location}: `{key}`: {message}")]
    Invalid { location: String, key: String, message: String },
}

/// A validated configuration. Paths in it are absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelConfig>,
    pub tasks: BTreeMap<String, TaskConfig>,
    pub telemetry: TelemetryConfig,
    /// The folder the file's relative paths resolve against (the config
    /// file's own); built-in model names (`models/...`) are looked up there.
    pub base_dir: PathBuf,
}

/// Where the gateway sends its traces, if anywhere.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector's base URL (`http://host:4318`); spans go to
    /// its `/v1/traces` as protobuf. `None`: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans carry.
    pub service_name: String,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// A `sqlite://` URL with an absolute path, or a `postgres://` URL.
    pub url: String,
    /// Records waiting to be written; a full queue makes handlers wait.
    pub queue_capacity: usize,
    /// Records written in one transaction.
    pub batch_size: usize,
    /// Where dataset versions keep their files (default: `datasets/` next to
    /// the config file).
    pub datasets_dir: PathBuf,
    /// Records still queued when a shutdown's deadline passed; the next
    /// start replays them (default: next to a SQLite file, else next to
    /// the config file).
    pub spill_file: PathBuf,
    /// Records the store refused even in their safe form.
    pub dead_letter_file: PathBuf,
    /// Calls older than this lose their bodies (request and answers); the
    /// row, with its tokens, cost and route, stays. `None`: kept forever.
    pub keep_bodies: Option<Duration>,
    /// Calls older than this are deleted; the ledger's daily totals keep
    /// counting them. `None`: kept forever.
    pub keep_calls: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// A client must send a request's headers within this time. The clock
    /// also runs while a kept-alive connection waits for its next request,
    /// so this is the idle keep-alive timeout too.
    pub header_read_timeout: Duration,
    /// A client must send a request's whole body within this time.
    pub body_read_timeout: Duration,
    /// How long SIGTERM waits for requests in flight and queued records
    /// before the rest of the queue goes to the spill file.
    pub shutdown_timeout: Duration,
    /// Whether clients must send a gateway key.
    pub auth: Auth,
    /// A Redis that gateways share their keys' rate limits and budgets
    /// through; `None`: each gateway counts in its own memory.
    pub limits_redis_url: Option<String>,
}

/// How the gateway knows who calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Every request carries `Authorization: Bearer <key>`, a key made with
    /// `understudy keys create`; the default.
    Keys,
    /// Anyone who can reach the socket may call; allowed only on a loopback
    /// address, where that is this machine's own processes.
    None,
}

impl Auth {
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::Keys => "keys",
            Auth::None => "none",
        }
    }
}

impl ServerConfig {
    /// Refuses to serve without keys on an address other machines can
    /// reach: anyone there could spend the lead's budget and read nothing
    /// less than every answer. `serve --listen` is checked here too.
    pub fn check_exposure(&self, listen: SocketAddr) -> Result<(), ExposedWithoutKeys> {
        if self.auth == Auth::None && !listen.ip().is_loopback() {
            return Err(ExposedWithoutKeys { listen });
        }
        Ok(())
    }
}

/// `auth = "none"` on an address other machines can reach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "auth = \"none\" lets anyone who can reach {listen} call the lead on your account; it is only allowed on a \
     loopback address (127.0.0.1 or ::1). Keep auth = \"keys\" (the default) and give clients keys made with \
     `understudy keys create`"
)]
pub struct ExposedWithoutKeys {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    OpenAi(OpenAiProviderConfig),
    Anthropic(AnthropicProviderConfig),
    Replay(ReplayProviderConfig),
    Local(LocalProviderConfig),
}

impl ProviderConfig {
    pub fn provider_type(&self) -> &'static str {
        match self {
            ProviderConfig::OpenAi(_) => "openai",
            ProviderConfig::Anthropic(_) => "anthropic",
            ProviderConfig::Replay(_) => "replay",
            ProviderConfig::Local(_) => "local",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenAiProviderConfig {
    /// Base URL up to and including `/v1`, without a trailing slash.
    pub base_url: String,
    /// The environment variable that holds the API key; never the key itself.
    pub api_key_env: Option<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

/// Anthropic's Messages API; the provider translates OpenAI-shaped chat
/// requests and answers both ways.
#[derive(Debug, Clone)]
pub struct AnthropicProviderConfig {
    /// Base URL without `/v1` and without a trailing slash
    /// (default `https://api.anthropic.com`).
    pub base_url: String,
    /// The environment variable that holds the API key (default `ANTHROPIC_API_KEY`).
    pub api_key_env: String,
    /// The `anthropic-version` header (default `2023-06-01`).
    pub anthropic_version: String,
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
pub const DEFAULT_ANTHROPIC_API_KEY_ENV: &str = "ANTHROPIC_API_KEY";
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct ReplayProviderConfig {
    pub file: PathBuf,
}

/// Models that run in this process, on this machine's CPU.
#[derive(Debug, Clone)]
pub struct LocalProviderConfig {
    /// What an hour of this whole machine costs (all its cores); a local
    /// call costs the machine time it takes (`understudy_types::machine_time_cost`
    /// and `cpu_time_cost`).
    pub machine_price_per_hour: f64,
    /// The most concurrent requests a classifier or encoder answers in one
    /// forward pass (1: each on its own).
    pub max_batch: usize,
    /// The most draft tokens a causal LM verifies per step for a greedy
    /// request (0: one token per step).
    pub speculative_draft: usize,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub provider: String,
    /// The model's name at its provider.
    pub name: String,
    pub price: Price,
    /// For a local model: a GGUF file, an HF or classifier directory (absolute),
    /// or `hf:org/name`.
    pub path: Option<String>,
    /// For a local causal LM: a PEFT LoRA adapter directory applied at load.
    pub adapter: Option<PathBuf>,
    /// For a local causal LM: how its GGUF weights are served, one of
    /// [`WEIGHT_FORMATS`] (`None`: `auto`).
    pub weights: Option<String>,
}

/// The serving formats a local causal LM's `weights` may name: `auto` (a
/// Q8_0 copy of a legacy 4/5-bit GGUF, the file otherwise), `as-stored`, or
/// a re-quantized copy in `q8_0`, `q4_0` or `iq4_nl`.
pub const WEIGHT_FORMATS: [&str; 5] = ["auto", "as-stored", "q8_0", "q4_0", "iq4_nl"];

pub use understudy_router::Policy;

#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub lead: String,
    pub understudy: Option<String>,
    /// The policy the task starts with; `understudy promote` overrides it
    /// through the store.
    pub policy: Policy,
    /// Overrides the kind that dataset building detects from the answers.
    pub kind: Option<TaskKind>,
    /// The answers a label task allows: a local understudy is asked to decode
    /// only these strings (a `json_schema` enum `response_format`, unless the
    /// client sent its own), and an understudy answer outside them is invalid,
    /// so the lead serves the call instead. Non-empty, without blank labels or
    /// duplicates (compared without case or surrounding spaces).
    pub labels: Option<Vec<String>>,
    /// How long the understudy may take before the lead serves instead.
    pub understudy_timeout: Duration,
    /// The promise: the share of served answers that must agree with the
    /// lead's (what `eval` certifies and the guardrail watches).
    pub target_agreement: f64,
    /// The share of the understudy's served answers that are also sent to
    /// the lead in the background, to audit them (never served).
    pub audit_rate: f64,
    /// The guardrail's error rate: the chance that it demotes an understudy
    /// that meets the target, over the whole life of a promotion.
    pub guardrail_delta: f64,
    /// `[tasks.NAME.autopilot]`: the loop runs itself for this task.
    pub autopilot: Option<AutopilotConfig>,
}

/// How `understudy autopilot` runs a task's loop.
#[derive(Debug, Clone, PartialEq)]
pub struct AutopilotConfig {
    /// Successful calls before the first training.
    pub min_calls: u64,
    /// Shadow calls (both models answered) the cascade threshold is
    /// certified on before the cascade is promoted.
    pub shadow_calls: u64,
    /// Labelled live calls a serving cascade's threshold is certified on
    /// again (its audits and a same-rate sample of its fallbacks:
    /// `understudy_loop::autopilot::live_sample`); a lower certified
    /// threshold replaces a cautious one. 0 turns this off.
    pub recertify_calls: u64,
    /// New successful calls since the last training that make a retrain due.
    pub retrain_after_calls: u64,
    /// The base model (as `train --base` takes it; default by task kind).
    pub base: Option<String>,
    pub epochs: Option<usize>,
    pub learning_rate: Option<f64>,
    /// A challenger whose agreement is shown to be within this of the
    /// champion's (the paired interval's lower bound) is not worse; so is one
    /// whose cascade serves more at the target (`understudy_loop::autopilot::judge`).
    pub challenger_margin: f64,
    /// Whether drift makes a retrain due.
    pub drift: bool,
    /// The drift tests' level.
    pub drift_alpha: f64,
    /// Recent calls a drift test compares with the training data.
    pub drift_window: u64,
    /// The newest successful calls a training's dataset is built from (all
    /// of them when unset): a retrain learns from recent traffic, and a label
    /// that appeared lately reaches the training split sooner.
    pub train_window: Option<u64>,
}

impl Config {
    /// The machine price that understudies' compute is charged at: the first
    /// local provider's `machine_price_per_hour` (with that provider's name),
    /// else [`DEFAULT_MACHINE_PRICE_PER_HOUR`] under the name `local`. The one
    /// rule the gateway, `eval` and the savings ledger price compute by.
    pub fn machine_price(&self) -> (&str, f64) {
        self.first_local()
            .map_or(("local", DEFAULT_MACHINE_PRICE_PER_HOUR), |(name, local)| (name, local.machine_price_per_hour))
    }

    /// The largest batch a trained model version (a classifier) is served
    /// with: the first local provider's `max_batch`, as [`Config::machine_price`]
    /// takes its price, else [`DEFAULT_LOCAL_MAX_BATCH`].
    pub fn local_max_batch(&self) -> usize {
        self.first_local().map_or(DEFAULT_LOCAL_MAX_BATCH, |(_, local)| local.max_batch)
    }

    /// The draft length a local causal LM (a configured model or a trained
    /// version) is served with: the first local provider's
    /// `speculative_draft`, else [`DEFAULT_SPECULATIVE_DRAFT`].
    pub fn local_speculative_draft(&self) -> usize {
        self.first_local().map_or(DEFAULT_SPECULATIVE_DRAFT, |(_, local)| local.speculative_draft)
    }

    fn first_local(&self) -> Option<(&str, &LocalProviderConfig)> {
        self.providers.iter().find_map(|(name, provider)| match provider {
            ProviderConfig::Local(local) => Some((name.as_str(), local)),
            _ => None,
        })
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        Config::parse(&text, &path.display().to_string(), &base_dir)
    }

    /// Parses config text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, path_label: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path_label.to_string(),
            message: describe_toml_error(text, &error),
        })?;
        Validator { text, path_label, base_dir }.validate(raw)
    }

    /// The model a `model` field names: a model key, or `task:NAME` for a task's lead.
    pub fn resolve_model<'a>(&'a self, requested: &str) -> Option<ResolvedModel<'a>> {
        if let Some(task_name) = requested.strip_prefix("task:") {
            let (task_name, task) = self.tasks.get_key_value(task_name)?;
            let (model_name, model) = self.models.get_key_value(task.lead.as_str())?;
            return Some(ResolvedModel { task: Some(task_name), model_name, model });
        }
        let (model_name, model) = self.models.get_key_value(requested)?;
        Some(ResolvedModel { task: None, model_name, model })
    }
}

/// What a request's `model` field resolved to.
#[derive(Debug, Clone, Copy)]
pub struct ResolvedModel<'a> {
    pub task: Option<&'a str>,
    pub model_name: &'a str,
    pub model: &'a ModelConfig,
}

fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end_matches('\n').to_string();
    match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |idx| idx + 1) + 1;
    (line, column)
}

/// The line of `table.key` in TOML text, for keys whose value carries no span
/// (those inside tagged tables). A key that is absent has no line.
fn find_key_line(text: &str, dotted_key: &str) -> Option<usize> {
    let (table, key) = dotted_key.rsplit_once('.')?;
    let mut in_table = false;
    for (line_idx, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_table = trimmed.trim_start_matches('[').trim_end_matches(']').trim() == table;
            continue;
        }
        let key_part = trimmed.split('=').next().unwrap_or("").trim();
        if in_table && key_part == key {
            return Some(line_idx + 1);
        }
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    tasks: BTreeMap<String, RawTask>,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<Spanned<String>>,
    service_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_url")]
    url: Spanned<String>,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    datasets_dir: Option<String>,
    spill_file: Option<String>,
    dead_letter_file: Option<String>,
    keep_bodies_days: Option<Spanned<u32>>,
    keep_calls_days: Option<Spanned<u32>>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            url: default_store_url(),
            queue_capacity: default_queue_capacity(),
            batch_size: default_batch_size(),
            datasets_dir: None,
            spill_file: None,
            dead_letter_file: None,
            keep_bodies_days: None,
            keep_calls_days: None,
        }
    }
}

fn default_store_url() -> Spanned<String> {
    Spanned::new(0..0, "sqlite://understudy.db".to_string())
}
fn default_queue_capacity() -> usize {
    16_384
}
fn default_batch_size() -> usize {
    512
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: usize,
    #[serde(default = "default_header_read_timeout_secs")]
    header_read_timeout_secs: f64,
    #[serde(default = "default_body_read_timeout_secs")]
    body_read_timeout_secs: f64,
    #[serde(default = "default_shutdown_timeout_secs")]
    shutdown_timeout_secs: f64,
    #[serde(default = "default_auth")]
    auth: Spanned<String>,
    limits_redis_url: Option<Spanned<String>>,
}

fn default_auth() -> Spanned<String> {
    Spanned::new(0..0, "keys".to_string())
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout_secs: default_header_read_timeout_secs(),
            body_read_timeout_secs: default_body_read_timeout_secs(),
            shutdown_timeout_secs: default_shutdown_timeout_secs(),
            auth: default_auth(),
            limits_redis_url: None,
        }
    }
}

fn default_header_read_timeout_secs() -> f64 {
    10.0
}
fn default_body_read_timeout_secs() -> f64 {
    30.0
}
fn default_shutdown_timeout_secs() -> f64 {
    30.0
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8080".to_string())
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum RawProvider {
    #[serde(rename = "openai")]
    OpenAi {
        base_url: String,
        api_key_env: Option<String>,
        #[serde(default = "default_timeout_secs")]
        timeout_secs: f64,
        #[serde(default = "default_max_retries")]
        max_retries: u32,
        #[serde(default = "default_retry_backoff_ms")]
        retry_backoff_ms: u64,
    },
    #[serde(rename = "anthropic")]
    Anthropic {
        #[serde(default = "default_anthropic_base_url")]
        base_url: String,
        #[serde(default = "default_anthropic_api_key_env")]
        api_key_env: String,
        #[serde(default = "default_anthropic_version")]
        anthropic_version: String,
        #[serde(default = "default_timeout_secs")]
        timeout_secs: f64,
        #[serde(default = "default_max_retries")]
        max_retries: u32,
        #[serde(default = "default_retry_backoff_ms")]
        retry_backoff_ms: u64,
    },
    #[serde(rename = "replay")]
    Replay { file: String },
    #[serde(rename = "local")]
    Local {
        #[serde(default = "default_machine_price_per_hour")]
        machine_price_per_hour: f64,
        #[serde(default = "default_local_max_batch")]
        max_batch: i64,
        #[serde(default = "default_speculative_draft")]
        speculative_draft: i64,
    },
}

fn default_speculative_draft() -> i64 {
    DEFAULT_SPECULATIVE_DRAFT as i64
}

fn default_local_max_batch() -> i64 {
    DEFAULT_LOCAL_MAX_BATCH as i64
}

fn default_machine_price_per_hour() -> f64 {
    DEFAULT_MACHINE_PRICE_PER_HOUR
}

fn default_anthropic_base_url() -> String {
    DEFAULT_ANTHROPIC_BASE_URL.to_string()
}
fn default_anthropic_api_key_env() -> String {
    DEFAULT_ANTHROPIC_API_KEY_ENV.to_string()
}
fn default_anthropic_version() -> String {
    DEFAULT_ANTHROPIC_VERSION.to_string()
}

fn default_timeout_secs() -> f64 {
    60.0
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    200
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: Spanned<String>,
    name: Option<String>,
    #[serde(default)]
    input_per_million: f64,
    #[serde(default)]
    output_per_million: f64,
    path: Option<String>,
    adapter: Option<String>,
    weights: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    lead: Spanned<String>,
    understudy: Option<Spanned<String>>,
    #[serde(default = "default_policy")]
    policy: Spanned<String>,
    kind: Option<Spanned<String>>,
    labels: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_understudy_timeout_ms")]
    understudy_timeout_ms: u64,
    #[serde(default = "default_target_agreement")]
    target_agreement: f64,
    #[serde(default = "default_audit_rate")]
    audit_rate: f64,
    #[serde(default = "default_guardrail_delta")]
    guardrail_delta: f64,
    autopilot: Option<Spanned<RawAutopilot>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutopilot {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_autopilot_min_calls")]
    min_calls: u64,
    #[serde(default = "default_autopilot_shadow_calls")]
    shadow_calls: u64,
    #[serde(default = "default_autopilot_recertify_calls")]
    recertify_calls: u64,
    #[serde(default = "default_autopilot_retrain_after_calls")]
    retrain_after_calls: u64,
    base: Option<String>,
    epochs: Option<usize>,
    learning_rate: Option<f64>,
    #[serde(default = "default_autopilot_challenger_margin")]
    challenger_margin: f64,
    #[serde(default = "default_true")]
    drift: bool,
    #[serde(default = "default_autopilot_drift_alpha")]
    drift_alpha: f64,
    #[serde(default = "default_autopilot_drift_window")]
    drift_window: u64,
    train_window: Option<u64>,
}

fn default_true() -> bool {
    true
}
fn default_autopilot_min_calls() -> u64 {
    200
}
fn default_autopilot_shadow_calls() -> u64 {
    100
}
fn default_autopilot_recertify_calls() -> u64 {
    100
}
fn default_autopilot_retrain_after_calls() -> u64 {
    2000
}
fn default_autopilot_challenger_margin() -> f64 {
    0.01
}
fn default_autopilot_drift_alpha() -> f64 {
    0.01
}
fn default_autopilot_drift_window() -> u64 {
    200
}

fn default_target_agreement() -> f64 {
    0.98
}
fn default_audit_rate() -> f64 {
    0.05
}
fn default_guardrail_delta() -> f64 {
    0.05
}

fn default_understudy_timeout_ms() -> u64 {
    5_000
}

fn default_policy() -> Spanned<String> {
    Spanned::new(0..0, "lead".to_string())
}

struct Validator<'a> {
    text: &'a str,
    path_label: &'a str,
    base_dir: &'a Path,
}

impl Validator<'_> {
    fn invalid<T>(&self, key: String, span_start: usize, message: String) -> Result<T, ConfigError> {
        let line = if span_start == 0 {
            find_key_line(self.text, &key)
        } else {
            Some(line_and_column(self.text, span_start).0)
        };
        let location = match line {
            Some(line) => format!("{}:{line}", self.path_label),
            None => self.path_label.to_string(),
        };
        Err(ConfigError::Invalid { location, key, message })
    }

    /// Checks what every HTTP upstream's table holds: its URL and timeout.
    fn check_upstream(&self, name: &str, base_url: &str, timeout_secs: f64) -> Result<(), ConfigError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return self.invalid(
                format!("providers.{name}.base_url"),
                0,
                format!("`{base_url}` must start with http:// or https://"),
            );
        }
        if !(timeout_secs.is_finite() && timeout_secs > 0.0) {
            return self.invalid(
                format!("providers.{name}.timeout_secs"),
                0,
                "must be a positive number of seconds".into(),
            );
        }
        Ok(())
    }

    fn resolve_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let store = self.validate_store(raw.store)?;
        let listen = raw.server.listen.get_ref().parse::<SocketAddr>().or_else(|error| {
            self.invalid(
                "server.listen".into(),
                raw.server.listen.span().start,
                format!("`{}` is not a socket address: {error}", raw.server.listen.get_ref()),
            )
        })?;
        let seconds = |key: &str, value: f64| -> Result<Duration, ConfigError> {
            if value.is_finite() && value > 0.0 && value < 1e9 {
                Ok(Duration::from_secs_f64(value))
            } else {
                self.invalid(format!("server.{key}"), 0, format!("{value} is not a positive number of seconds"))
            }
        };
        let auth = match raw.server.auth.get_ref().as_str() {
            "keys" => Auth::Keys,
            "none" => Auth::None,
            other => {
                return self.invalid(
                    "server.auth".into(),
                    raw.server.auth.span().start,
                    format!("unknown auth `{other}` (known: keys, none)"),
                )
            }
        };
        let limits_redis_url = match raw.server.limits_redis_url {
            None => None,
            Some(url) if url.get_ref().starts_with("redis://") => Some(url.into_inner()),
            Some(url) => {
                return self.invalid(
                    "server.limits_redis_url".into(),
                    url.span().start,
                    format!("`{}` is not a redis:// URL", url.get_ref()),
                )
            }
        };
        let server = ServerConfig {
            listen,
            max_body_bytes: raw.server.max_body_bytes,
            header_read_timeout: seconds("header_read_timeout_secs", raw.server.header_read_timeout_secs)?,
            body_read_timeout: seconds("body_read_timeout_secs", raw.server.body_read_timeout_secs)?,
            shutdown_timeout: seconds("shutdown_timeout_secs", raw.server.shutdown_timeout_secs)?,
            auth,
            limits_redis_url,
        };
        if let Err(error) = server.check_exposure(listen) {
            return self.invalid("server.auth".into(), raw.server.auth.span().start, error.to_string());
        }

        let mut providers = BTreeMap::new();
        for (name, raw_provider) in raw.providers {
            let provider = match raw_provider {
                RawProvider::OpenAi { base_url, api_key_env, timeout_secs, max_retries, retry_backoff_ms } => {
                    self.check_upstream(&name, &base_url, timeout_secs)?;
                    ProviderConfig::OpenAi(OpenAiProviderConfig {
                        base_url: base_url.trim_end_matches('/').to_string(),
                        api_key_env,
                        timeout: Duration::from_secs_f64(timeout_secs),
                        max_retries,
                        retry_backoff: Duration::from_millis(retry_backoff_ms),
                    })
                }
                RawProvider::Anthropic {
                    base_url,
                    api_key_env,
                    anthropic_version,
                    timeout_secs,
                    max_retries,
                    retry_backoff_ms,
                } => {
                    self.check_upstream(&name, &base_url, timeout_secs)?;
                    if api_key_env.trim().is_empty() {
                        return self.invalid(
                            format!("providers.{name}.api_key_env"),
                            0,
                            "must name an environment variable".into(),
                        );
                    }
                    if anthropic_version.trim().is_empty() {
                        return self.invalid(
                            format!("providers.{name}.anthropic_version"),
                            0,
                            format!("must be an API version such as \"{DEFAULT_ANTHROPIC_VERSION}\""),
                        );
                    }
                    ProviderConfig::Anthropic(AnthropicProviderConfig {
                        base_url: base_url.trim_end_matches('/').to_string(),
                        api_key_env,
                        anthropic_version,
                        timeout: Duration::from_secs_f64(timeout_secs),
                        max_retries,
                        retry_backoff: Duration::from_millis(retry_backoff_ms),
                    })
                }
                RawProvider::Replay { file } => {
                    ProviderConfig::Replay(ReplayProviderConfig { file: self.resolve_path(&file) })
                }
                RawProvider::Local { machine_price_per_hour, max_batch, speculative_draft } => {
                    if !(machine_price_per_hour.is_finite() && machine_price_per_hour >= 0.0) {
                        return self.invalid(
                            format!("providers.{name}.machine_price_per_hour"),
                            0,
                            "a price must be a number of at least 0".into(),
                        );
                    }
                    let max_batch = match usize::try_from(max_batch) {
                        Ok(max_batch) if (1..=MAX_LOCAL_MAX_BATCH).contains(&max_batch) => max_batch,
                        _ => {
                            return self.invalid(
                                format!("providers.{name}.max_batch"),
                                0,
                                format!("must be a whole number from 1 to {MAX_LOCAL_MAX_BATCH}, not {max_batch}"),
                            )
                        }
                    };
                    let speculative_draft = match usize::try_from(speculative_draft) {
                        Ok(draft) if draft <= MAX_SPECULATIVE_DRAFT => draft,
                        _ => {
                            return self.invalid(
                                format!("providers.{name}.speculative_draft"),
                                0,
                                format!(
                                    "must be a whole number from 0 (off) to {MAX_SPECULATIVE_DRAFT}, not {speculative_draft}"
                                ),
                            )
                        }
                    };
                    ProviderConfig::Local(LocalProviderConfig { machine_price_per_hour, max_batch, speculative_draft })
                }
            };
            providers.insert(name, provider);
        }

        let mut models = BTreeMap::new();
        for (name, raw_model) in raw.models {
            if !providers.contains_key(raw_model.provider.get_ref()) {
                return self.invalid(
                    format!("models.{name}.provider"),
                    raw_model.provider.span().start,
                    format!(
                        "no provider named `{}` (known: {})",
                        raw_model.provider.get_ref(),
                        known(providers.keys())
                    ),
                );
            }
            for (field, value) in [
                ("input_per_million", raw_model.input_per_million),
                ("output_per_million", raw_model.output_per_million),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return self.invalid(
                        format!("models.{name}.{field}"),
                        0,
                        "a price must be a number of at least 0".into(),
                    );
                }
            }
            let is_local = matches!(providers.get(raw_model.provider.get_ref()), Some(ProviderConfig::Local(_)));
            let path = match (&raw_model.path, is_local) {
                (Some(path), true) if path.starts_with("hf:") => Some(path.clone()),
                (Some(path), true) => Some(self.resolve_path(path).display().to_string()),
                (None, true) => {
                    return self.invalid(
                        format!("models.{name}.path"),
                        0,
                        "a model of a local provider needs `path` (a GGUF file, a model directory or hf:org/name)"
                            .into(),
                    )
                }
                (None, false) => None,
                (Some(_), false) => {
                    return self.invalid(
                        format!("models.{name}.path"),
                        0,
                        format!(
                            "`path` is only for models of a local provider; `{}` is not one",
                            raw_model.provider.get_ref()
                        ),
                    )
                }
            };
            if raw_model.adapter.is_some() && !is_local {
                return self.invalid(
                    format!("models.{name}.adapter"),
                    0,
                    "`adapter` is only for models of a local provider".into(),
                );
            }
            if let Some(weights) = &raw_model.weights {
                if !is_local {
                    return self.invalid(
                        format!("models.{name}.weights"),
                        0,
                        "`weights` is only for models of a local provider".into(),
                    );
                }
                if !WEIGHT_FORMATS.contains(&weights.as_str()) {
                    return self.invalid(
                        format!("models.{name}.weights"),
                        0,
                        format!("unknown weight format `{weights}`; expected one of {}", WEIGHT_FORMATS.join(", ")),
                    );
                }
            }
            let model = ModelConfig {
                provider: raw_model.provider.into_inner(),
                name: raw_model.name.unwrap_or_else(|| name.clone()),
                price: Price {
                    input_per_million: raw_model.input_per_million,
                    output_per_million: raw_model.output_per_million,
                },
                path,
                adapter: raw_model.adapter.as_deref().map(|adapter| self.resolve_path(adapter)),
                weights: raw_model.weights,
            };
            models.insert(name, model);
        }

        let mut tasks = BTreeMap::new();
        for (name, raw_task) in raw.tasks {
            self.check_model_ref(&models, &format!("tasks.{name}.lead"), &raw_task.lead)?;
            if let Some(understudy) = &raw_task.understudy {
                self.check_model_ref(&models, &format!("tasks.{name}.understudy"), understudy)?;
            }
            let policy = match Policy::parse(raw_task.policy.get_ref(), None) {
                Ok(policy) => policy,
                Err(error) => {
                    return self.invalid(
                        format!("tasks.{name}.policy"),
                        raw_task.policy.span().start,
                        error.to_string(),
                    )
                }
            };
            if policy != Policy::Lead && raw_task.understudy.is_none() {
                return self.invalid(
                    format!("tasks.{name}.policy"),
                    raw_task.policy.span().start,
                    format!("policy `{}` needs an `understudy` for the task", raw_task.policy.get_ref()),
                );
            }
            let kind = match &raw_task.kind {
                None => None,
                Some(kind) => match TaskKind::parse(kind.get_ref()) {
                    Some(kind) => Some(kind),
                    None => {
                        return self.invalid(
                            format!("tasks.{name}.kind"),
                            kind.span().start,
                            format!("unknown kind `{}` (known: label, generation)", kind.get_ref()),
                        )
                    }
                },
            };
            let labels = match raw_task.labels {
                None => None,
                Some(labels) => {
                    let start = labels.span().start;
                    let key = format!("tasks.{name}.labels");
                    if kind == Some(TaskKind::Generation) {
                        return self.invalid(
                            key,
                            start,
                            "labels are for label tasks, and the kind is generation".into(),
                        );
                    }
                    let labels = labels.into_inner();
                    if let Err(error) = check_labels(&labels) {
                        return self.invalid(key, start, error.to_string());
                    }
                    Some(labels)
                }
            };
            let share = |key: &str, value: f64, open_low: bool| -> Result<f64, ConfigError> {
                let fits = value.is_finite() && value <= 1.0 && if open_low { value > 0.0 } else { value >= 0.0 };
                if fits && !(key == "guardrail_delta" && value >= 1.0) {
                    Ok(value)
                } else {
                    self.invalid(
                        format!("tasks.{name}.{key}"),
                        0,
                        format!("{value} is not a share in the allowed range"),
                    )
                }
            };
            let target_agreement = share("target_agreement", raw_task.target_agreement, true)?;
            let audit_rate = share("audit_rate", raw_task.audit_rate, false)?;
            let guardrail_delta = share("guardrail_delta", raw_task.guardrail_delta, true)?;
            let autopilot = match raw_task.autopilot {
                None => None,
                Some(raw) => {
                    let start = raw.span().start;
                    let raw = raw.into_inner();
                    let key = |field: &str| format!("tasks.{name}.autopilot.{field}");
                    if raw.min_calls < 10 {
                        return self.invalid(key("min_calls"), start, "at least 10 calls are needed to train".into());
                    }
                    if raw.shadow_calls == 0 || raw.retrain_after_calls == 0 || raw.drift_window < 10 {
                        return self.invalid(
                            key("shadow_calls"),
                            start,
                            "shadow_calls and retrain_after_calls must be positive, drift_window at least 10".into(),
                        );
                    }
                    if !(raw.challenger_margin.is_finite() && (0.0..1.0).contains(&raw.challenger_margin)) {
                        return self.invalid(key("challenger_margin"), start, "must be in [0, 1)".into());
                    }
                    if !(raw.drift_alpha > 0.0 && raw.drift_alpha < 1.0) {
                        return self.invalid(key("drift_alpha"), start, "must be in (0, 1)".into());
                    }
                    if raw.train_window.is_some_and(|window| window < raw.min_calls) {
                        return self.invalid(
                            key("train_window"),
                            start,
                            format!("must be at least min_calls ({})", raw.min_calls),
                        );
                    }
                    raw.enabled.then_some(AutopilotConfig {
                        min_calls: raw.min_calls,
                        shadow_calls: raw.shadow_calls,
                        recertify_calls: raw.recertify_calls,
                        retrain_after_calls: raw.retrain_after_calls,
                        base: raw.base,
                        epochs: raw.epochs,
                        learning_rate: raw.learning_rate,
                        challenger_margin: raw.challenger_margin,
                        drift: raw.drift,
                        drift_alpha: raw.drift_alpha,
                        drift_window: raw.drift_window,
                        train_window: raw.train_window,
                    })
                }
            };
            tasks.insert(
                name,
                TaskConfig {
                    lead: raw_task.lead.into_inner(),
                    understudy: raw_task.understudy.map(Spanned::into_inner),
                    policy,
                    kind,
                    labels,
                    understudy_timeout: Duration::from_millis(raw_task.understudy_timeout_ms.max(1)),
                    target_agreement,
                    audit_rate,
                    guardrail_delta,
                    autopilot,
                },
            );
        }

        let telemetry = self.validate_telemetry(raw.telemetry)?;
        Ok(Config { store, server, providers, models, tasks, telemetry, base_dir: self.base_dir.to_path_buf() })
    }

    fn validate_telemetry(&self, raw: RawTelemetry) -> Result<TelemetryConfig, ConfigError> {
        let otlp_endpoint = match raw.otlp_endpoint {
            None => None,
            Some(url) => {
                let endpoint = url.get_ref().trim_end_matches('/');
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return self.invalid(
                        "telemetry.otlp_endpoint".into(),
                        url.span().start,
                        format!(
                            "`{}` is not an http:// or https:// URL (an OTLP/HTTP collector, port 4318)",
                            url.get_ref()
                        ),
                    );
                }
                Some(endpoint.to_string())
            }
        };
        let service_name = raw.service_name.unwrap_or_else(|| "understudy".to_string());
        Ok(TelemetryConfig { otlp_endpoint, service_name })
    }

    fn validate_store(&self, raw: RawStore) -> Result<StoreConfig, ConfigError> {
        let url = raw.url.get_ref();
        let url = if let Some(path) = url.strip_prefix("sqlite://").or(url.strip_prefix("sqlite:")) {
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            if path.is_empty() {
                return self.invalid("store.url".into(), raw.url.span().start, "the sqlite URL names no file".into());
            }
            let path = if path == ":memory:" { PathBuf::from(path) } else { self.resolve_path(path) };
            let query = if query.is_empty() { String::new() } else { format!("?{query}") };
            format!("sqlite://{}{query}", path.display())
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.clone()
        } else {
            return self.invalid(
                "store.url".into(),
                raw.url.span().start,
                format!("`{url}` is neither a sqlite:// nor a postgres:// URL"),
            );
        };
        if raw.queue_capacity == 0 || raw.batch_size == 0 {
            return self.invalid("store".into(), 0, "queue_capacity and batch_size must be at least 1".into());
        }
        let datasets_dir = self.resolve_path(raw.datasets_dir.as_deref().unwrap_or("datasets"));
        // Next to a SQLite file, named after it; else next to the config.
        let sqlite_file = url
            .strip_prefix("sqlite://")
            .map(|rest| rest.split('?').next().unwrap_or_default())
            .filter(|path| !path.contains(":memory:"));
        let default_file = |suffix: &str| match sqlite_file {
            Some(path) => format!("{path}.{suffix}.jsonl"),
            None => format!("understudy.{suffix}.jsonl"),
        };
        let spill_file = self.resolve_path(raw.spill_file.as_deref().unwrap_or(&default_file("spill")));
        let dead_letter_file =
            self.resolve_path(raw.dead_letter_file.as_deref().unwrap_or(&default_file("dead-letter")));
        let days = |key: &str, value: Option<Spanned<u32>>| -> Result<Option<Duration>, ConfigError> {
            let Some(value) = value else { return Ok(None) };
            let days = *value.get_ref();
            if days == 0 {
                return self.invalid(format!("store.{key}"), value.span().start, "must be at least 1 day".into());
            }
            Ok(Some(Duration::from_secs(u64::from(days) * 86_400)))
        };
        let keep_bodies = days("keep_bodies_days", raw.keep_bodies_days)?;
        let keep_calls = days("keep_calls_days", raw.keep_calls_days)?;
        Ok(StoreConfig {
            keep_bodies,
            keep_calls,
            url,
            queue_capacity: raw.queue_capacity,
            batch_size: raw.batch_size,
            datasets_dir,
            spill_file,
            dead_letter_file,
        })
    }

    fn check_model_ref(
        &self,
        models: &BTreeMap<String, ModelConfig>,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<(), ConfigError> {
        if models.contains_key(value.get_ref()) {
            return Ok(());
        }
        self.invalid(
            key.to_string(),
            value.span().start,
            format!("no model named `{}` (known: {})", value.get_ref(), known(models.keys())),
        )
    }
}

/// A task's allowed answers: at least one, none blank, no two the same
/// without case or surrounding spaces (the gateway could not tell them apart).
fn check_labels(labels: &[String]) -> Result<(), LabelsError> {
    if labels.is_empty() {
        return Err(LabelsError::Empty);
    }
    let mut seen = std::collections::HashSet::new();
    for label in labels {
        // The one rule for comparing answers: labels that agree under it are one label.
        let key = understudy_types::normalize_answer(label);
        if key.is_empty() {
            return Err(LabelsError::Blank);
        }
        if !seen.insert(key) {
            return Err(LabelsError::Duplicate(label.clone()));
        }
    }
    Ok(())
}

/// Why a task's `labels` are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum LabelsError {
    #[error("the list of labels is empty; leave `labels` out to allow any answer")]
    Empty,
    #[error("a label is blank")]
    Blank,
    #[error("the label `{0}` appears twice")]
    Duplicate(String),
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests;
