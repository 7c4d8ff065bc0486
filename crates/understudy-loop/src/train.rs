//! Training a task's understudy: from a dataset version's rows to a trainer
//! config, the run, and the model version it registers. The method follows
//! the task's kind (a classifier for labels, LoRA for generation) unless one
//! is asked for; the version's id is `mv-` and 16 hex digits of a UUIDv7,
//! and its folder `understudies/TASK/DATASET-METHOD` next to the datasets.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_datasets::kind::normalize_label;
use understudy_store::{DatasetRecord, ModelVersionRecord, Store};
use understudy_trainer::{
    prompt_text, train_classifier, train_lora, ChatRow, ClassifierTrainConfig, LabeledText, LoraTrainConfig, TaskMetric,
};
use understudy_types::{OffsetDateTime, TaskKind, Uuid};

use crate::datasets::{split_rows, task_dataset};
use crate::error::{LoopError, Result};

/// Where `scripts/fetch-models.sh` puts MiniLM, relative to the config's folder.
const DEFAULT_ENCODER: &str = "models/all-MiniLM-L6-v2";
/// Where `scripts/fetch-models.sh` puts SmolLM2 (a GGUF file), likewise.
const DEFAULT_CAUSAL_LM: &str = "models/SmolLM2-135M-Instruct";
/// The names a base can be given without a config entry, and where they live.
pub const BUILT_IN_BASES: [(&str, &str); 2] = [("minilm", DEFAULT_ENCODER), ("smollm2", DEFAULT_CAUSAL_LM)];

/// How a task's understudy is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// A classifier for a label task, LoRA for a generation task.
    #[default]
    Auto,
    Classifier,
    Lora,
}

impl Method {
    /// The method a run on `dataset` uses.
    fn resolve(self, dataset: &DatasetRecord) -> Result<Method> {
        match (self, dataset.kind) {
            (Method::Auto | Method::Classifier, TaskKind::Label) => Ok(Method::Classifier),
            (Method::Classifier, TaskKind::Generation) => Err(LoopError::Refused(format!(
                "a classifier needs a label task, and dataset {} is a generation task (set `kind = \"label\"` in \
                 [tasks.{}] if its answers are labels)",
                dataset.id, dataset.task
            ))),
            (Method::Auto | Method::Lora, _) => Ok(Method::Lora),
        }
    }

    /// The name a model version records (`model_versions.method`).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Classifier => "classifier",
            Method::Lora => "lora",
        }
    }
}

/// What to train; `None` fields take the trainers' defaults.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub task: String,
    /// A dataset id or unique prefix (default: the task's newest).
    pub dataset: Option<String>,
    pub method: Method,
    /// A model of the config with a path, a built-in name, or a path
    /// (default: `minilm` for a classifier, `smollm2` for LoRA).
    pub base: Option<String>,
    /// Where the trained model goes (default: `understudies/TASK/DATASET-METHOD`).
    pub output: Option<PathBuf>,
    /// Continue from the output folder's checkpoint.
    pub resume: bool,
    /// Checkpoint every N optimizer steps (and at every epoch's end).
    pub checkpoint_every: usize,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    /// Classifier: fine-tune only the top N encoder layers.
    pub train_top_layers: Option<usize>,
    pub patience: Option<usize>,
    /// LoRA: rank (alpha follows as 2 × rank unless given).
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub targets: Option<Vec<String>>,
    pub max_steps: Option<usize>,
    pub seq_len: Option<usize>,
    pub grad_accum: Option<usize>,
    /// LoRA: the task metric is measured on this many validation rows (0: loss only).
    pub metric_rows: usize,
    /// LoRA on a generation task: tokens of the greedy decode the token F1 scores.
    pub metric_max_tokens: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl TrainRequest {
    /// A request for `task` with every default.
    pub fn new(task: &str) -> TrainRequest {
        TrainRequest {
            task: task.to_string(),
            dataset: None,
            method: Method::Auto,
            base: None,
            output: None,
            resume: false,
            checkpoint_every: 50,
            epochs: None,
            batch_size: None,
            learning_rate: None,
            train_top_layers: None,
            patience: None,
            rank: None,
            alpha: None,
            lora_dropout: None,
            targets: None,
            max_steps: None,
            seq_len: None,
            grad_accum: None,
            metric_rows: 64,
            metric_max_tokens: 48,
            progress: true,
        }
    }
}

/// A training run ready to start: the dataset's rows read and the trainer
/// configured. [`TrainJob::describe`] says what it will do.
pub struct TrainJob {
    dataset: DatasetRecord,
    base: PathBuf,
    run: Run,
}

enum Run {
    Classifier { config: Box<ClassifierTrainConfig>, train: Vec<LabeledText>, validation: Vec<LabeledText> },
    Lora { config: Box<LoraTrainConfig>, train: Vec<ChatRow>, validation: Vec<ChatRow> },
}

/// What one finished run gave, as the CLI shows it.
#[derive(Debug, Clone)]
pub enum TrainSummary {
    Classifier {
        best_epoch: Option<usize>,
        best_validation_accuracy: Option<f64>,
        steps: usize,
        wall_seconds: f64,
    },
    Lora {
        initial_validation_loss: f64,
        best_validation_loss: Option<f64>,
        best_epoch: Option<usize>,
        task_metric: Option<(&'static str, f64, f64)>,
        steps: usize,
        wall_seconds: f64,
        tokens_per_second: f64,
    },
}

/// A registered model version, with the metrics it was registered with.
#[derive(Debug, Clone)]
pub struct TrainedVersion {
    pub version: ModelVersionRecord,
    pub metrics: Value,
    pub summary: TrainSummary,
}

/// Reads the dataset and configures the trainer for `request`.
pub async fn prepare(config: &Config, store: &Store, request: &TrainRequest) -> Result<TrainJob> {
    let dataset = task_dataset(store, &request.task, request.dataset.as_deref()).await?;
    let method = request.method.resolve(&dataset)?;
    let output = |suffix: &str| {
        request
            .output
            .clone()
            .unwrap_or_else(|| understudies_dir(config).join(&dataset.task).join(format!("{}-{suffix}", dataset.id)))
    };
    let checkpoint_every = request.checkpoint_every.max(1);
    let run = match method {
        Method::Lora => {
            let base = resolve_base(config, request.base.as_deref(), BaseKind::CausalLm)?;
            let (train, validation) =
                read_rows(&dataset, |example| ChatRow::from_messages(&example.prompt, &example.answer_text()))?;
            let mut train_config = LoraTrainConfig::new(&base, output("lora"));
            train_config.resume = request.resume;
            train_config.progress = request.progress;
            train_config.checkpoint_every_steps = Some(checkpoint_every);
            train_config.dataset_id = Some(dataset.id.clone());
            set(&mut train_config.epochs, request.epochs);
            set(&mut train_config.batch_size, request.batch_size);
            set(&mut train_config.learning_rate, request.learning_rate);
            if let Some(rank) = request.rank {
                train_config.lora.rank = rank;
                train_config.lora.alpha = 2.0 * rank as f64;
            }
            set(&mut train_config.lora.alpha, request.alpha);
            set(&mut train_config.lora.dropout, request.lora_dropout);
            if let Some(targets) = &request.targets {
                train_config.lora.target_modules =
                    targets.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            }
            train_config.max_steps = request.max_steps;
            set(&mut train_config.patience, request.patience);
            train_config.metric_rows = request.metric_rows;
            train_config.task_metric = match dataset.kind {
                // The labels eval constrains a causal LM to: every answer of the train split.
                TaskKind::Label => TaskMetric::LabelAccuracy {
                    labels: train
                        .iter()
                        .map(|row| normalize_label(&row.answer))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                },
                TaskKind::Generation => TaskMetric::TokenF1 { max_new_tokens: request.metric_max_tokens },
            };
            set(&mut train_config.seq_len, request.seq_len);
            set(&mut train_config.grad_accum_steps, request.grad_accum);
            TrainJob { dataset, base, run: Run::Lora { config: Box::new(train_config), train, validation } }
        }
        Method::Classifier | Method::Auto => {
            let base = resolve_base(config, request.base.as_deref(), BaseKind::Encoder)?;
            // The classifier reads the prompt's text and learns the lead's normalized answer.
            let (train, validation) = read_rows(&dataset, |example| LabeledText {
                text: prompt_text(&example.prompt),
                label: normalize_label(&example.answer_text()),
            })?;
            let mut train_config = ClassifierTrainConfig::new(&base, output("classifier"));
            train_config.resume = request.resume;
            train_config.progress = request.progress;
            train_config.checkpoint_every_steps = Some(checkpoint_every);
            train_config.dataset_id = Some(dataset.id.clone());
            set(&mut train_config.epochs, request.epochs);
            set(&mut train_config.batch_size, request.batch_size);
            set(&mut train_config.learning_rate, request.learning_rate);
            train_config.train_top_layers = request.train_top_layers;
            set(&mut train_config.patience, request.patience);
            TrainJob { dataset, base, run: Run::Classifier { config: Box::new(train_config), train, validation } }
        }
    };
    Ok(run)
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

impl TrainJob {
    pub fn dataset(&self) -> &DatasetRecord {
        &self.dataset
    }

    /// One line on what the run trains, on what, from what.
    pub fn describe(&self) -> String {
        let dataset = &self.dataset;
        match &self.run {
            Run::Classifier { train, validation, .. } => format!(
                "training a classifier for task `{}` on dataset {} ({} train, {} validation rows) from {}",
                dataset.task,
                dataset.id,
                train.len(),
                validation.len(),
                self.base.display()
            ),
            Run::Lora { config, train, validation } => format!(
                "training a LoRA adapter (rank {}, alpha {}, on {}) for task `{}` on dataset {} ({} train, {} \
                 validation rows) from {}",
                config.lora.rank,
                config.lora.alpha,
                config.lora.target_modules.join(","),
                dataset.task,
                dataset.id,
                train.len(),
                validation.len(),
                self.base.display()
            ),
        }
    }

    /// Trains (on a blocking thread) and registers the model version.
    pub async fn run(self, store: &Store) -> Result<TrainedVersion> {
        let TrainJob { dataset, base, run } = self;
        let (method, output_dir, wall_seconds, metrics, summary) = match run {
            Run::Classifier { config, train, validation } => {
                let report =
                    tokio::task::spawn_blocking(move || train_classifier(&config, &train, &validation)).await??;
                if report.interrupted {
                    return Err(LoopError::Interrupted);
                }
                let metrics = json!({
                    "best_epoch": report.best_epoch,
                    "best_validation_accuracy": report.best_validation_accuracy,
                    "epochs": report.epochs,
                    "steps": report.steps,
                    "stopped_early": report.stopped_early,
                    "labels": report.labels,
                });
                let summary = TrainSummary::Classifier {
                    best_epoch: report.best_epoch,
                    best_validation_accuracy: report.best_validation_accuracy,
                    steps: report.steps,
                    wall_seconds: report.wall_seconds,
                };
                (Method::Classifier, report.output_dir, report.wall_seconds, metrics, summary)
            }
            Run::Lora { config, train, validation } => {
                let report = tokio::task::spawn_blocking(move || train_lora(&config, &train, &validation)).await??;
                if report.interrupted {
                    return Err(LoopError::Interrupted);
                }
                let metrics = json!({
                    "initial_validation_loss": report.initial_validation_loss,
                    "task_metric": report.task_metric_name,
                    "initial_task_metric": report.initial_task_metric,
                    "best_epoch": report.best_epoch,
                    "best_validation_loss": report.best_validation_loss,
                    "best_task_metric": report.best_task_metric,
                    "epochs": report.epochs,
                    "steps": report.steps,
                    "stopped_early": report.stopped_early,
                    "tokens_per_second": report.tokens_per_second,
                    "trained_parameters": report.trained_parameters,
                });
                let task_metric = match (report.task_metric_name, report.initial_task_metric, report.best_task_metric) {
                    (Some(name), Some(initial), Some(best)) => Some((name, initial, best)),
                    _ => None,
                };
                let summary = TrainSummary::Lora {
                    initial_validation_loss: report.initial_validation_loss,
                    best_validation_loss: report.best_validation_loss,
                    best_epoch: report.best_epoch,
                    task_metric,
                    steps: report.steps,
                    wall_seconds: report.wall_seconds,
                    tokens_per_second: report.tokens_per_second,
                };
                (Method::Lora, report.output_dir, report.wall_seconds, metrics, summary)
            }
        };
        let version = ModelVersionRecord {
            id: new_version_id(),
            task: dataset.task.clone(),
            dataset_id: dataset.id.clone(),
            method: method.as_str().into(),
            base_model: base.display().to_string(),
            path: std::path::absolute(&output_dir).map_err(crate::error::io(&output_dir))?.display().to_string(),
            created_at: OffsetDateTime::now_utc(),
            wall_seconds,
            metrics: metrics.to_string(),
        };
        store.register_model_version(&version).await?;
        Ok(TrainedVersion { version, metrics, summary })
    }
}

/// Prepares and runs a training in one call.
pub async fn train(config: &Config, store: &Store, request: &TrainRequest) -> Result<TrainedVersion> {
    prepare(config, store, request).await?.run(store).await
}

/// A model version's id: `mv-` and the first 16 hex digits of a UUIDv7, so
/// ids sort by creation time.
pub fn new_version_id() -> String {
    format!("mv-{}", &Uuid::now_v7().simple().to_string()[..16])
}

/// Trained understudies live next to the datasets.
pub fn understudies_dir(config: &Config) -> PathBuf {
    config.store.datasets_dir.parent().map_or_else(|| PathBuf::from("understudies"), |dir| dir.join("understudies"))
}

/// The train and validation splits' rows, each line made into a row by `row`.
fn read_rows<T>(dataset: &DatasetRecord, row: impl Fn(&ChatExample) -> T) -> Result<(Vec<T>, Vec<T>)> {
    let read = |split: &str| split_rows(&dataset.path, split, |example| row(&example));
    Ok((read("train")?, read("validation")?))
}

/// The encoder `name` names (as a classifier's base is named: a config
/// model with a path, a path, or `minilm`); `None` is the built-in MiniLM.
pub fn resolve_encoder(config: &Config, name: Option<&str>) -> Result<PathBuf> {
    resolve_base(config, name, BaseKind::Encoder)
}

/// What kind of base model a method needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseKind {
    /// An HF encoder folder.
    Encoder,
    /// A GGUF file or folder, or an HF causal LM folder.
    CausalLm,
}

/// The base model `base` names: a model of the config with a `path`, a path
/// that holds a model, or a built-in name under `models/` next to the config
/// (or the working folder). Without one, the method's built-in.
pub(crate) fn resolve_base(config: &Config, base: Option<&str>, kind: BaseKind) -> Result<PathBuf> {
    let is_model = |candidate: &Path| {
        candidate.join("config.json").is_file() || (kind == BaseKind::CausalLm && holds_gguf(candidate))
    };
    let what = match kind {
        BaseKind::Encoder => "an HF encoder folder",
        BaseKind::CausalLm => "a GGUF file, a folder holding one, or an HF Llama/Qwen2 folder",
    };
    let default = match kind {
        BaseKind::Encoder => "minilm",
        BaseKind::CausalLm => "smollm2",
    };
    let refuse = |message: String| Err(LoopError::NotFound(message));
    let name = base.unwrap_or(default);
    if let Some(model) = config.models.get(name) {
        let Some(path) = model.path.as_deref() else {
            return refuse(format!("base {name}: [models.{name}] has no `path`, so it is not a model on this machine"));
        };
        if path.starts_with("hf:") {
            return refuse(format!(
                "base {name}: [models.{name}] names `{path}`; training needs the model's files on this machine"
            ));
        }
        let path = PathBuf::from(path);
        if !is_model(&path) {
            return refuse(format!("base {name}: [models.{name}] path {} is not {what}", path.display()));
        }
        return Ok(path);
    }
    let as_path = PathBuf::from(name);
    if is_model(&as_path) {
        return Ok(as_path);
    }
    let built_in = BUILT_IN_BASES.iter().find(|(alias, _)| *alias == name.to_ascii_lowercase());
    if let Some((alias, relative)) = built_in {
        let candidates = [config.base_dir.join(relative), PathBuf::from(relative)];
        return match candidates.iter().find(|candidate| is_model(candidate)) {
            Some(found) => Ok(found.clone()),
            None => refuse(format!(
                "no base model at {} for `{alias}`: run scripts/fetch-models.sh",
                candidates.iter().map(|candidate| candidate.display().to_string()).collect::<Vec<_>>().join(" or ")
            )),
        };
    }
    let mut aliases: Vec<&str> = config
        .models
        .iter()
        .filter(|(_, model)| model.path.as_deref().is_some_and(|path| !path.starts_with("hf:")))
        .map(|(alias, _)| alias.as_str())
        .collect();
    aliases.sort_unstable();
    let configured = if aliases.is_empty() { "none".to_string() } else { aliases.join(", ") };
    let built_ins: Vec<&str> = BUILT_IN_BASES.iter().map(|(alias, _)| *alias).collect();
    refuse(format!(
        "no base model at {name}: the base is {what}, a model of the config with a path ({configured}), or a \
         built-in name ({})",
        built_ins.join(", ")
    ))
}

/// A `.gguf` file, or a folder holding one.
fn holds_gguf(path: &Path) -> bool {
    let is_gguf = |path: &Path| path.extension().is_some_and(|ext| ext == "gguf");
    if path.is_file() {
        return is_gguf(path);
    }
    std::fs::read_dir(path)
        .map(|entries| entries.filter_map(Result::ok).any(|entry| is_gguf(&entry.path())))
        .unwrap_or(false)
}
