//! LoRA SFT of a causal LM on chat examples, with PEFT export.
//!
//! Each example is rendered with the model's chat template; the loss covers
//! only the assistant's answer (and its closing `<|im_end|>`). The loop shares
//! AdamW, the warmup+cosine schedule, clipping and the atomic checkpoints with
//! the classifier trainer. After every epoch the validation loss and, when
//! the config names one, the task metric ([`TaskMetric`]: label accuracy by
//! constrained decoding, or token F1 of a greedy decode) are measured. The
//! best epoch (highest task metric, ties broken by the lower loss; the lowest
//! loss without a metric) is written as a PEFT adapter in the output
//! directory, next to `manifest.json`, and `patience` epochs without a better
//! one stop the run. The loop itself is `crate::epochs`, shared with the
//! classifier.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use understudy_models::causal_lm::{self, CausalLmFiles};
use understudy_models::chat::ChatTemplate;
use understudy_models::dropout::Dropout;
use understudy_models::llama::{self, LoraConfig};
use understudy_models::peft::{self, AdapterConfig};

use crate::checkpoint;
use crate::data;
use crate::epochs::{self, EpochEnd, EpochScore, LoopConfig, Step, Trainee};
use crate::optim::AdamW;
use crate::TrainError;

mod metric;
use metric::MetricSetup;
pub use metric::TaskMetric;

/// Fewer training rows than this stop training with a message.
pub const MIN_TRAIN_ROWS: usize = 20;

/// One chat example: the messages before the answer (role, text) and the
/// assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRow {
    pub prompt: Vec<(String, String)>,
    pub answer: String,
}

impl ChatRow {
    /// From OpenAI-format messages, each content rendered as the serving
    /// engine renders it ([`understudy_datasets::jsonl::content_text`]).
    pub fn from_messages(prompt: &[Value], answer: &str) -> ChatRow {
        let prompt = prompt
            .iter()
            .map(|message| {
                let role = message.get("role").and_then(Value::as_str).unwrap_or("user").to_string();
                (role, understudy_datasets::jsonl::content_text(message.get("content")))
            })
            .collect();
        ChatRow { prompt, answer: answer.to_string() }
    }
}

/// A tokenized example: ids and which of them the loss covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

/// How to train. [`LoraTrainConfig::new`] gives defaults for SmolLM2-sized models.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraTrainConfig {
    /// A GGUF file (or folder with one), or an HF Llama/Qwen2 directory.
    pub base_model: PathBuf,
    /// Receives the adapter, `manifest.json` and `checkpoint/`.
    pub output_dir: PathBuf,
    pub lora: LoraConfig,
    pub epochs: usize,
    /// Stop after this many optimizer steps in total (the last epoch is then
    /// partial); the schedule is laid out over this many steps.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    /// Examples are cut to their last `seq_len` tokens.
    pub seq_len: usize,
    pub seed: u64,
    /// What validation measures besides the loss; it picks the best epoch.
    pub task_metric: TaskMetric,
    /// The task metric is measured on the first this many validation rows.
    pub metric_rows: usize,
    /// Stop after this many epochs without a better validation score.
    pub patience: usize,
    pub checkpoint_every_steps: Option<usize>,
    pub resume: bool,
    pub progress: bool,
    /// Stop (as if killed) after this many optimizer steps: for tests.
    pub stop_after_steps: Option<usize>,
    /// The dataset version trained on, recorded in `manifest.json`.
    #[serde(skip)]
    pub dataset_id: Option<String>,
}

impl LoraTrainConfig {
    pub fn new(base_model: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> LoraTrainConfig {
        LoraTrainConfig {
            base_model: base_model.into(),
            output_dir: output_dir.into(),
            lora: LoraConfig::new(),
            epochs: 2,
            max_steps: None,
            batch_size: 8,
            grad_accum_steps: 1,
            learning_rate: 2e-4,
            weight_decay: 0.0,
            warmup_ratio: 0.06,
            max_grad_norm: 1.0,
            seq_len: 256,
            seed: 17,
            task_metric: TaskMetric::None,
            metric_rows: 64,
            patience: 2,
            checkpoint_every_steps: None,
            resume: false,
            progress: true,
            stop_after_steps: None,
            dataset_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraEpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    /// Mean loss per assistant token on the validation set.
    pub validation_loss: f64,
    /// The config's task metric on the validation rows, if it names one.
    #[serde(default)]
    pub task_metric: Option<f64>,
}

impl EpochScore for LoraEpochMetrics {
    fn epoch(&self) -> usize {
        self.epoch
    }

    /// A higher task metric, or the same (or none) and a lower validation loss.
    fn beats(&self, best: &LoraEpochMetrics) -> bool {
        match (self.task_metric, best.task_metric) {
            (Some(metric), Some(best_metric)) if metric != best_metric => metric > best_metric,
            _ => self.validation_loss < best.validation_loss,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoraTrainReport {
    pub output_dir: PathBuf,
    pub base_model: String,
    /// Validation loss of the untrained adapter (the base model).
    pub initial_validation_loss: f64,
    /// `label_accuracy` or `token_f1`; `None` when only the loss is measured.
    pub task_metric_name: Option<&'static str>,
    /// The task metric of the base model.
    pub initial_task_metric: Option<f64>,
    pub epochs: Vec<LoraEpochMetrics>,
    pub best_epoch: Option<usize>,
    pub best_validation_loss: Option<f64>,
    pub best_task_metric: Option<f64>,
    pub steps: usize,
    pub trained_parameters: usize,
    pub train_tokens: usize,
    pub tokens_per_second: f64,
    pub stopped_early: bool,
    pub interrupted: bool,
    pub wall_seconds: f64,
}

/// LoRA's part of a checkpoint (next to the loop's position).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoraSaved {
    lora: LoraConfig,
    initial_validation_loss: f64,
    #[serde(default)]
    initial_task_metric: Option<f64>,
    train_tokens: usize,
}

/// Renders and tokenizes `rows`, keeping the last `seq_len` tokens of each;
/// rows left with no answer token are dropped.
pub fn encode_rows(
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    rows: &[ChatRow],
    seq_len: usize,
) -> Result<Vec<SftExample>, TrainError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (mut ids, mut loss_mask) = template
            .encode_for_training(tokenizer, &row.prompt, &row.answer)
            .map_err(|error| TrainError::Tokenizer(error.to_string()))?;
        if ids.len() > seq_len {
            let cut = ids.len() - seq_len;
            ids.drain(..cut);
            loss_mask.drain(..cut);
        }
        // The first token is never a target.
        if loss_mask.iter().skip(1).any(|&covered| covered) {
            out.push(SftExample { ids, loss_mask });
        }
    }
    Ok(out)
}

/// Loads `config.base_model`, tokenizes the rows and trains.
pub fn train_lora(
    config: &LoraTrainConfig,
    train: &[ChatRow],
    validation: &[ChatRow],
) -> Result<LoraTrainReport, TrainError> {
    check_config(config)?;
    check_rows(train.len(), validation.len())?;
    let files = causal_lm::load(&config.base_model)?;
    let train_examples = encode_rows(&files.chat_template, &files.tokenizer, train, config.seq_len)?;
    let validation_examples = encode_rows(&files.chat_template, &files.tokenizer, validation, config.seq_len)?;
    check_rows(train_examples.len(), validation_examples.len())?;
    let pad_id = files.eos_token_id.unwrap_or(0);
    train_lora_on(config, files, &train_examples, &validation_examples, pad_id)
}

fn check_rows(train: usize, validation: usize) -> Result<(), TrainError> {
    if train < MIN_TRAIN_ROWS {
        return Err(TrainError::Data(format!(
            "{train} usable training rows; LoRA fine-tuning needs at least {MIN_TRAIN_ROWS} (rows whose answer \
             is cut off by seq_len do not count)"
        )));
    }
    if validation == 0 {
        return Err(TrainError::Data(String::from(
            "the validation set is empty; it picks the best epoch and stops training early",
        )));
    }
    Ok(())
}

fn check_config(config: &LoraTrainConfig) -> Result<(), TrainError> {
    for (name, value) in [
        ("epochs", config.epochs),
        ("batch_size", config.batch_size),
        ("grad_accum_steps", config.grad_accum_steps),
        ("seq_len", config.seq_len),
    ] {
        if value == 0 {
            return Err(TrainError::Config(format!("{name} must be at least 1")));
        }
    }
    if config.seq_len < 2 {
        return Err(TrainError::Config(String::from("seq_len must be at least 2")));
    }
    if config.max_steps == Some(0) || config.checkpoint_every_steps == Some(0) {
        return Err(TrainError::Config(String::from("max_steps and checkpoint_every_steps must be at least 1")));
    }
    config.task_metric.check()?;
    config.lora.check().map_err(|error| TrainError::Config(error.to_string()))
}

/// Trains LoRA on already tokenized examples over the model in `files`.
pub fn train_lora_on(
    config: &LoraTrainConfig,
    files: CausalLmFiles,
    train: &[SftExample],
    validation: &[SftExample],
    pad_id: u32,
) -> Result<LoraTrainReport, TrainError> {
    let started = Instant::now();
    check_config(config)?;
    check_rows(train.len(), validation.len())?;
    let device = Device::Cpu;
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &device);
    let model = llama::Model::new(&files.config, vb, Some(&config.lora), config.seed)?;
    let vars = model.lora_vars();
    let trained_parameters: usize = vars.iter().map(|(_, var)| var.elem_count()).sum();
    let mut optimizer = AdamW::new(vars, config.weight_decay);
    let metric =
        MetricSetup::new(&config.task_metric, &files.tokenizer, files.eos_token_id, validation, config.metric_rows)?;
    let mut trainee = LoraTrainee {
        model: &model,
        config,
        train,
        validation,
        pad_id,
        metric,
        base_name: &files.name,
        initial_validation_loss: 0.0,
        initial_task_metric: None,
        train_tokens: 0,
    };
    let lengths: Vec<usize> = train.iter().map(|row| row.ids.len()).collect();
    let loop_config = LoopConfig {
        output_dir: &config.output_dir,
        epochs: config.epochs,
        max_steps: config.max_steps,
        batch_size: config.batch_size,
        grad_accum_steps: config.grad_accum_steps,
        learning_rate: config.learning_rate,
        warmup_ratio: config.warmup_ratio,
        max_grad_norm: config.max_grad_norm,
        seed: config.seed,
        patience: config.patience,
        checkpoint_every_steps: config.checkpoint_every_steps,
        resume: config.resume,
        progress: config.progress,
        stop_after_steps: config.stop_after_steps,
        stop_at_last_step_interrupts: false,
    };
    let outcome = epochs::run(&mut trainee, &mut optimizer, &lengths, &loop_config, started)?;
    let state = outcome.state;

    let best = state.best();
    let report = LoraTrainReport {
        output_dir: config.output_dir.clone(),
        base_model: files.name.clone(),
        initial_validation_loss: trainee.initial_validation_loss,
        task_metric_name: config.task_metric.name(),
        initial_task_metric: trainee.initial_task_metric,
        epochs: state.history.clone(),
        best_epoch: state.best_epoch,
        best_validation_loss: best.map(|metrics| metrics.validation_loss),
        best_task_metric: best.and_then(|metrics| metrics.task_metric),
        steps: state.global_step,
        trained_parameters,
        train_tokens: trainee.train_tokens,
        tokens_per_second: outcome.work_this_run as f64 / outcome.loop_seconds.max(1e-9),
        stopped_early: state.stopped_early,
        interrupted: outcome.interrupted,
        wall_seconds: outcome.wall_seconds,
    };
    if !outcome.interrupted {
        write_manifest(config, &files.config, &report, train.len(), validation.len())?;
    }
    Ok(report)
}

/// The LoRA adapter as [`epochs::run`] trains it.
struct LoraTrainee<'a> {
    model: &'a llama::Model,
    config: &'a LoraTrainConfig,
    train: &'a [SftExample],
    validation: &'a [SftExample],
    pad_id: u32,
    metric: Option<MetricSetup>,
    /// The base model's name, for the adapter's config.
    base_name: &'a str,
    /// The base model's validation loss and task metric.
    initial_validation_loss: f64,
    initial_task_metric: Option<f64>,
    /// Tokens trained on, resumed runs included.
    train_tokens: usize,
}

impl LoraTrainee<'_> {
    fn score(&self) -> Result<Option<f64>, TrainError> {
        self.metric.as_ref().map(|metric| metric.score(self.model)).transpose()
    }

    fn validation_loss(&self) -> Result<f64, TrainError> {
        validation_loss(self.model, self.validation, self.pad_id, self.config.batch_size)
    }
}

impl Trainee for LoraTrainee<'_> {
    type Metrics = LoraEpochMetrics;
    type Saved = LoraSaved;

    fn start(&mut self) -> Result<(), TrainError> {
        self.initial_validation_loss = self.validation_loss()?;
        self.initial_task_metric = self.score()?;
        Ok(())
    }

    fn resume(
        &mut self,
        seed: u64,
        saved: LoraSaved,
        weights: &HashMap<String, Tensor>,
        _optimizer: &AdamW,
    ) -> Result<(), TrainError> {
        if seed != self.config.seed || saved.lora != self.config.lora {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint in {} is for another seed or LoRA config; remove it or do not resume",
                self.config.output_dir.display()
            )));
        }
        self.model.load_lora(weights).map_err(|error| TrainError::Checkpoint(error.to_string()))?;
        self.initial_validation_loss = saved.initial_validation_loss;
        self.initial_task_metric = saved.initial_task_metric;
        self.train_tokens = saved.train_tokens;
        Ok(())
    }

    fn checkpoint_state(&self) -> LoraSaved {
        LoraSaved {
            lora: self.config.lora.clone(),
            initial_validation_loss: self.initial_validation_loss,
            initial_task_metric: self.initial_task_metric,
            train_tokens: self.train_tokens,
        }
    }

    fn train_step(&mut self, micro_batches: &[Vec<usize>], step: &mut Step<'_>) -> Result<usize, TrainError> {
        let device = Device::Cpu;
        let batches: Vec<SftBatch> = micro_batches
            .iter()
            .map(|indices| {
                let rows: Vec<&SftExample> = indices.iter().map(|&index| &self.train[index]).collect();
                make_batch(&rows, self.pad_id, &device)
            })
            .collect::<candle_core::Result<_>>()?;
        let total_targets: usize = batches.iter().map(|batch| batch.n_targets).sum();
        let mut tokens = 0usize;
        for (k, batch) in batches.iter().enumerate() {
            tokens += batch.n_tokens;
            if batch.n_targets == 0 {
                continue;
            }
            let mut dropout = step.dropout(k);
            let loss = (batch_nll(self.model, batch, Some(&mut dropout))? / total_targets as f64)?;
            step.backward(&loss)?;
        }
        self.train_tokens += tokens;
        Ok(tokens)
    }

    fn rate_text(rate: f64) -> String {
        format!("{rate:.0} tok/s")
    }

    fn evaluate(&mut self, end: EpochEnd) -> Result<LoraEpochMetrics, TrainError> {
        Ok(LoraEpochMetrics {
            epoch: end.epoch,
            steps: end.steps,
            train_loss: end.train_loss,
            validation_loss: self.validation_loss()?,
            task_metric: self.score()?,
        })
    }

    fn epoch_line(&self, metrics: &LoraEpochMetrics, elapsed_seconds: f64) -> String {
        let metric_text = match (self.config.task_metric.name(), metrics.task_metric, self.initial_task_metric) {
            (Some(name), Some(value), Some(initial)) => format!(", {name} {value:.4} (before training {initial:.4})"),
            _ => String::new(),
        };
        format!(
            "epoch {}: train loss {:.4}, validation loss {:.4} (before training {:.4}){metric_text} ({elapsed_seconds:.0}s)",
            metrics.epoch, metrics.train_loss, metrics.validation_loss, self.initial_validation_loss,
        )
    }

    fn export_best(&mut self) -> Result<(), TrainError> {
        write_adapter(&self.config.output_dir, self.model, self.base_name, &self.config.lora)
    }
}

/// A padded batch of inputs (`ids[..-1]`) and the positions whose next token
/// is a target: flat row indices into `[batch * (longest - 1)]` and the ids.
struct SftBatch {
    inputs: Tensor,
    positions: Tensor,
    targets: Vec<u32>,
    n_targets: usize,
    n_tokens: usize,
}

fn make_batch(rows: &[&SftExample], pad_id: u32, device: &Device) -> candle_core::Result<SftBatch> {
    let longest = rows.iter().map(|row| row.ids.len()).max().unwrap_or(2).max(2);
    let width = longest - 1;
    let mut inputs = Vec::with_capacity(rows.len() * width);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut n_tokens = 0;
    for (row_idx, row) in rows.iter().enumerate() {
        let n = row.ids.len();
        n_tokens += n;
        inputs.extend_from_slice(&row.ids[..n - 1]);
        inputs.extend(std::iter::repeat_n(pad_id, width - (n - 1)));
        for t in 1..n {
            if row.loss_mask[t] {
                positions.push((row_idx * width + t - 1) as u32);
                targets.push(row.ids[t]);
            }
        }
    }
    let n_targets = targets.len();
    Ok(SftBatch {
        inputs: Tensor::from_vec(inputs, (rows.len(), width), device)?,
        positions: Tensor::from_vec(positions, n_targets, device)?,
        targets,
        n_targets,
        n_tokens,
    })
}

/// Summed negative log-likelihood of the batch's targets. Logits are computed
/// only at the target positions: the vocabulary projection is the costliest
/// matmul, and the other positions' logits would be thrown away.
fn batch_nll(model: &llama::Model, batch: &SftBatch, dropout: Option<&mut Dropout>) -> candle_core::Result<Tensor> {
    let hidden = model.forward_hidden(&batch.inputs, dropout)?;
    let (b, s, h) = hidden.dims3()?;
    let selected = hidden.reshape((b * s, h))?.index_select(&batch.positions, 0)?;
    let logits = model.logits(&selected)?;
    understudy_models::ops::cross_entropy_rows(&logits, &batch.targets)?.sum_all()
}

/// Mean loss per target token over `examples`, without dropout.
pub fn validation_loss(
    model: &llama::Model,
    examples: &[SftExample],
    pad_id: u32,
    batch_size: usize,
) -> Result<f64, TrainError> {
    let lengths: Vec<usize> = examples.iter().map(|row| row.ids.len()).collect();
    let mut nll = 0f64;
    let mut count = 0usize;
    for indices in data::sorted_batches(&lengths, batch_size) {
        let rows: Vec<&SftExample> = indices.iter().map(|&index| &examples[index]).collect();
        let batch = make_batch(&rows, pad_id, &Device::Cpu)?;
        if batch.n_targets == 0 {
            continue;
        }
        nll += batch_nll(model, &batch, None)?.to_scalar::<f32>()? as f64;
        count += batch.n_targets;
    }
    Ok(nll / count.max(1) as f64)
}

/// The model's current LoRA weights as a PEFT adapter in `dir`.
pub fn write_adapter(dir: &Path, model: &llama::Model, base_name: &str, lora: &LoraConfig) -> Result<(), TrainError> {
    let tensors: HashMap<String, Tensor> = model
        .lora_vars()
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().copy()?)))
        .collect::<candle_core::Result<_>>()?;
    peft::save(dir, &AdapterConfig::from_lora(lora, base_name), &tensors)?;
    Ok(())
}

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Serialize)]
struct Manifest<'a> {
    kind: &'static str,
    method: &'static str,
    base_model: &'a str,
    dataset_id: Option<&'a str>,
    architecture: &'a llama::Config,
    hyperparameters: &'a LoraTrainConfig,
    train_rows: usize,
    validation_rows: usize,
    report: &'a LoraTrainReport,
    created_at: String,
}

fn write_manifest(
    config: &LoraTrainConfig,
    model_config: &llama::Config,
    report: &LoraTrainReport,
    train_rows: usize,
    validation_rows: usize,
) -> Result<(), TrainError> {
    let manifest = Manifest {
        kind: "causal-lm-adapter",
        method: "lora",
        base_model: &report.base_model,
        dataset_id: config.dataset_id.as_deref(),
        architecture: model_config,
        hyperparameters: config,
        train_rows,
        validation_rows,
        report,
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    checkpoint::write_json_atomically(&config.output_dir.join(MANIFEST_FILE), &manifest)
}

#[cfg(test)]
mod tests;
