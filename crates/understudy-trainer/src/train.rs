//! The classifier fine-tuning loop.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use understudy_models::hf::{self, HfDir};

use crate::checkpoint;
use crate::classifier::{
    self, is_encoder_weight, ManifestCore, Net, Trainable, ENCODER_FILE, HEAD_BIAS, HEAD_FILE, HEAD_WEIGHT,
    LABELS_FILE, MANIFEST_FILE,
};
use crate::data::{self, Encoded};
use crate::epochs::{self, EpochEnd, EpochScore, LoopConfig, Step, Trainee};
use crate::optim::AdamW;
use crate::TrainError;

/// One training or validation row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledText {
    pub text: String,
    pub label: String,
}

/// How to fine-tune. [`ClassifierTrainConfig::new`] gives defaults that suit
/// MiniLM-sized encoders on short texts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierTrainConfig {
    /// An HF directory with `config.json`, `tokenizer.json`, `*.safetensors`.
    pub base_model: PathBuf,
    /// Receives the trained classifier, its manifest and `checkpoint/`.
    pub output_dir: PathBuf,
    pub epochs: usize,
    /// Rows per forward pass.
    pub batch_size: usize,
    /// Forward passes per optimizer step.
    pub grad_accum_steps: usize,
    /// Peak learning rate of the encoder.
    pub learning_rate: f64,
    /// The head's learning rate is `learning_rate` times this (it starts from
    /// random weights).
    pub head_lr_multiplier: f64,
    pub weight_decay: f64,
    /// Fraction of all steps spent warming up linearly; cosine decay after.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Dropout before the head.
    pub dropout: f64,
    /// Keep the encoder's own dropout (config.json's rates) in trained layers.
    pub encoder_dropout: bool,
    /// Texts are truncated to this many tokens.
    pub max_len: usize,
    /// `None`: train every encoder layer. `Some(n)`: only the top `n` layers
    /// (`Some(0)` trains the head alone).
    pub train_top_layers: Option<usize>,
    /// Also train the embedding tables (with `train_top_layers: None` only).
    /// Off by default: the word table is half of MiniLM's weights and its
    /// dense gradient and AdamW update cost more than they bring on CPU.
    pub train_embeddings: bool,
    pub seed: u64,
    /// Stop after this many epochs without a better validation score.
    pub patience: usize,
    /// Also checkpoint every this many optimizer steps (epochs always are).
    pub checkpoint_every_steps: Option<usize>,
    /// Continue from `output_dir/checkpoint/` if there is one.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Stop (as if killed) after this many optimizer steps in total, right
    /// after any checkpoint due at that step: for tests and time-boxed runs.
    pub stop_after_steps: Option<usize>,
    /// The dataset version trained on, recorded in `manifest.json`.
    #[serde(skip)]
    pub dataset_id: Option<String>,
}

impl ClassifierTrainConfig {
    pub fn new(base_model: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> ClassifierTrainConfig {
        ClassifierTrainConfig {
            base_model: base_model.into(),
            output_dir: output_dir.into(),
            epochs: 4,
            batch_size: 32,
            grad_accum_steps: 1,
            learning_rate: 1e-4,
            head_lr_multiplier: 10.0,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            max_grad_norm: 1.0,
            dropout: 0.1,
            encoder_dropout: true,
            max_len: 128,
            train_top_layers: None,
            train_embeddings: false,
            seed: 17,
            patience: 2,
            checkpoint_every_steps: None,
            resume: false,
            progress: true,
            stop_after_steps: None,
            dataset_id: None,
        }
    }
}

/// Metrics of one epoch (1-based `epoch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub validation_loss: f64,
    pub validation_accuracy: f64,
}

impl EpochScore for EpochMetrics {
    fn epoch(&self) -> usize {
        self.epoch
    }

    /// A higher validation accuracy, or the same and a lower validation loss.
    fn beats(&self, best: &EpochMetrics) -> bool {
        self.validation_accuracy > best.validation_accuracy
            || (self.validation_accuracy == best.validation_accuracy && self.validation_loss < best.validation_loss)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub output_dir: PathBuf,
    pub labels: Vec<String>,
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: Option<usize>,
    pub best_validation_accuracy: Option<f64>,
    pub steps: usize,
    pub trained_parameters: usize,
    pub stopped_early: bool,
    /// True when `stop_after_steps` ended the run: the output directory then
    /// holds a checkpoint to resume from, not a finished classifier.
    pub interrupted: bool,
    pub wall_seconds: f64,
    /// Of `wall_seconds`, the time in training steps and validation passes
    /// (this run's; without loading the model or writing files).
    pub compute_seconds: f64,
}

/// Fine-tunes `config.base_model` with a classification head over the labels
/// of `train`, keeps the epoch with the best `validation` accuracy, and
/// writes a directory that [`crate::ClassifierModel::load`] reads.
pub fn train_classifier(
    config: &ClassifierTrainConfig,
    train: &[LabeledText],
    validation: &[LabeledText],
) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    check_config(config)?;
    let labels = check_data(train, validation)?;
    let label_index: HashMap<&str, u32> =
        labels.iter().enumerate().map(|(i, label)| (label.as_str(), i as u32)).collect();

    let model_dir = HfDir::open(&config.base_model)?;
    let mut cfg = model_dir.bert_config()?;
    if !config.encoder_dropout {
        cfg.hidden_dropout_prob = 0.0;
        cfg.attention_probs_dropout_prob = 0.0;
    }
    if let Some(top) = config.train_top_layers {
        if top > cfg.num_hidden_layers {
            return Err(TrainError::Config(format!(
                "train_top_layers is {top} but the model has {} layers",
                cfg.num_hidden_layers
            )));
        }
    }
    let tokenizer = model_dir.tokenizer(config.max_len)?;
    let device = Device::Cpu;

    let mut weights = hf::strip_bert_prefix(model_dir.weights(DType::F32, &device)?);
    weights.retain(|name, _| is_encoder_weight(name));
    let (head_weight, head_bias) = init_head(labels.len(), cfg.hidden_size, config.seed, &device)?;
    weights.insert(HEAD_WEIGHT.to_string(), head_weight);
    weights.insert(HEAD_BIAS.to_string(), head_bias);
    let trainable = Trainable::new(cfg.num_hidden_layers, config.train_top_layers, config.train_embeddings);
    let encoder_tuned = trainable.embeddings || trainable.first_trained_layer < cfg.num_hidden_layers;
    let mut encoder_weights: Vec<(String, Tensor)> =
        weights.iter().filter(|(name, _)| is_encoder_weight(name)).map(|(n, t)| (n.clone(), t.clone())).collect();
    encoder_weights.sort_by(|a, b| a.0.cmp(&b.0));
    let (net, vars) = Net::build(&cfg, weights, trainable, config.dropout)?;
    // What encoder.safetensors holds: the trained tensors live (their Vars).
    let live: HashMap<&str, &Var> = vars.iter().map(|(name, var)| (name.as_str(), var)).collect();
    for (name, tensor) in &mut encoder_weights {
        if let Some(var) = live.get(name.as_str()) {
            *tensor = var.as_tensor().clone();
        }
    }
    drop(live);
    let trained_parameters: usize = vars.iter().map(|(_, var)| var.elem_count()).sum();
    let mut optimizer = AdamW::new(vars, config.weight_decay);
    for param in &mut optimizer.params {
        if param.name.starts_with("classifier.") {
            param.lr_scale = config.head_lr_multiplier;
        }
    }

    let train_texts: Vec<&str> = train.iter().map(|row| row.text.as_str()).collect();
    let train_encoded = data::encode(&tokenizer, &train_texts)?;
    let train_labels: Vec<u32> = train.iter().map(|row| label_index[row.label.as_str()]).collect();
    let unseen = validation.iter().filter(|row| !label_index.contains_key(row.label.as_str())).count();
    if unseen > 0 {
        tracing::warn!(unseen, "validation rows with a label no training row has are left out of picking the epoch");
    }
    let validation: Vec<&LabeledText> =
        validation.iter().filter(|row| label_index.contains_key(row.label.as_str())).collect();
    let validation_texts: Vec<&str> = validation.iter().map(|row| row.text.as_str()).collect();
    let validation_encoded = data::encode(&tokenizer, &validation_texts)?;
    let validation_labels: Vec<u32> = validation.iter().map(|row| label_index[row.label.as_str()]).collect();
    let lengths: Vec<usize> = train_encoded.iter().map(|row| row.ids.len()).collect();

    let pad_id = cfg.pad_token_id as u32;
    let mut trainee = ClassifierTrainee {
        net: &net,
        config,
        labels: &labels,
        train: &train_encoded,
        train_labels: &train_labels,
        validation: &validation_encoded,
        validation_labels: &validation_labels,
        pad_id,
        encoder_weights: &encoder_weights,
        encoder_tuned,
    };
    let loop_config = LoopConfig {
        output_dir: &config.output_dir,
        epochs: config.epochs,
        max_steps: None,
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
        stop_at_last_step_interrupts: true,
    };
    let outcome = epochs::run(&mut trainee, &mut optimizer, &lengths, &loop_config, started)?;
    let state = outcome.state;

    let report = TrainReport {
        output_dir: config.output_dir.clone(),
        labels: labels.clone(),
        best_validation_accuracy: state.best().map(|metrics| metrics.validation_accuracy),
        epochs: state.history,
        best_epoch: state.best_epoch,
        steps: state.global_step,
        trained_parameters,
        stopped_early: state.stopped_early,
        interrupted: outcome.interrupted,
        wall_seconds: outcome.wall_seconds,
        compute_seconds: outcome.compute_seconds,
    };
    if !outcome.interrupted {
        write_artifacts(config, &model_dir, &labels, encoder_tuned, &report, train.len(), validation.len())?;
    }
    Ok(report)
}

/// The classifier as [`epochs::run`] trains it.
struct ClassifierTrainee<'a> {
    net: &'a Net,
    config: &'a ClassifierTrainConfig,
    labels: &'a [String],
    train: &'a [Encoded],
    train_labels: &'a [u32],
    validation: &'a [Encoded],
    validation_labels: &'a [u32],
    pad_id: u32,
    /// What encoder.safetensors holds (the trained tensors are live).
    encoder_weights: &'a [(String, Tensor)],
    encoder_tuned: bool,
}

/// The classifier's part of a checkpoint.
#[derive(Serialize, Deserialize)]
struct ClassifierSaved {
    labels: Vec<String>,
}

impl Trainee for ClassifierTrainee<'_> {
    type Metrics = EpochMetrics;
    type Saved = ClassifierSaved;

    fn start(&mut self) -> Result<(), TrainError> {
        Ok(())
    }

    fn resume(
        &mut self,
        seed: u64,
        saved: ClassifierSaved,
        weights: &HashMap<String, Tensor>,
        optimizer: &AdamW,
    ) -> Result<(), TrainError> {
        if saved.labels != self.labels || seed != self.config.seed {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint in {} is for other labels or another seed; remove it or pass resume: false",
                self.config.output_dir.display()
            )));
        }
        for param in &optimizer.params {
            let saved_value = weights
                .get(&param.name)
                .ok_or_else(|| TrainError::Checkpoint(format!("the checkpoint has no weight {}", param.name)))?;
            param.var.set(saved_value)?;
        }
        Ok(())
    }

    fn checkpoint_state(&self) -> ClassifierSaved {
        ClassifierSaved { labels: self.labels.to_vec() }
    }

    fn train_step(&mut self, micro_batches: &[Vec<usize>], step: &mut Step<'_>) -> Result<usize, TrainError> {
        let total_rows: usize = micro_batches.iter().map(Vec::len).sum();
        for (k, indices) in micro_batches.iter().enumerate() {
            let rows: Vec<&Encoded> = indices.iter().map(|&index| &self.train[index]).collect();
            let batch = data::make_batch(&rows, self.pad_id, &Device::Cpu)?;
            let targets: Vec<u32> = indices.iter().map(|&index| self.train_labels[index]).collect();
            let targets = Tensor::from_vec(targets, indices.len(), &Device::Cpu)?;
            let mut dropout = step.dropout(k);
            let logits = self.net.logits(&batch, Some(&mut dropout))?;
            let weight = indices.len() as f64 / total_rows as f64;
            let loss = (candle_nn::loss::cross_entropy(&logits, &targets)? * weight)?;
            step.backward(&loss)?;
        }
        Ok(total_rows)
    }

    fn rate_text(rate: f64) -> String {
        format!("{rate:.1} ex/s")
    }

    fn evaluate(&mut self, end: EpochEnd) -> Result<EpochMetrics, TrainError> {
        let (validation_loss, validation_accuracy) =
            evaluate(self.net, self.validation, self.validation_labels, self.pad_id, self.config.batch_size)?;
        Ok(EpochMetrics { epoch: end.epoch, train_loss: end.train_loss, validation_loss, validation_accuracy })
    }

    fn epoch_line(&self, metrics: &EpochMetrics, elapsed_seconds: f64) -> String {
        format!(
            "epoch {}: train loss {:.4}, validation loss {:.4}, validation accuracy {:.4} ({elapsed_seconds:.0}s)",
            metrics.epoch, metrics.train_loss, metrics.validation_loss, metrics.validation_accuracy,
        )
    }

    fn export_best(&mut self) -> Result<(), TrainError> {
        write_weights(&self.config.output_dir, self.net, self.encoder_weights, self.encoder_tuned)
    }
}

fn check_config(config: &ClassifierTrainConfig) -> Result<(), TrainError> {
    let positive = [
        ("epochs", config.epochs),
        ("batch_size", config.batch_size),
        ("grad_accum_steps", config.grad_accum_steps),
        ("max_len", config.max_len),
    ];
    for (name, value) in positive {
        if value == 0 {
            return Err(TrainError::Config(format!("{name} must be at least 1")));
        }
    }
    if !(0.0..1.0).contains(&config.dropout) {
        return Err(TrainError::Config(format!("dropout must be in [0, 1), got {}", config.dropout)));
    }
    if config.checkpoint_every_steps == Some(0) {
        return Err(TrainError::Config(String::from("checkpoint_every_steps must be at least 1")));
    }
    Ok(())
}

/// Checks the rows can train a classifier; returns the labels, sorted.
fn check_data(train: &[LabeledText], validation: &[LabeledText]) -> Result<Vec<String>, TrainError> {
    const MIN_ROWS: usize = 20;
    if train.len() < MIN_ROWS {
        return Err(TrainError::Data(format!("{} training rows; a classifier needs at least {MIN_ROWS}", train.len())));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for row in train {
        *counts.entry(row.label.as_str()).or_default() += 1;
    }
    if counts.len() < 2 {
        return Err(TrainError::Data(format!(
            "the training rows have {} label(s) ({:?}); a classifier needs at least 2",
            counts.len(),
            counts.keys().collect::<Vec<_>>()
        )));
    }
    let single: Vec<&str> = counts.iter().filter(|(_, &count)| count < 2).map(|(label, _)| *label).collect();
    if !single.is_empty() {
        return Err(TrainError::Data(format!(
            "label(s) {single:?} have a single training example; each label needs at least 2"
        )));
    }
    if validation.is_empty() {
        return Err(TrainError::Data(String::from(
            "the validation set is empty; it picks the best epoch and stops training early",
        )));
    }
    // A label new enough to be only in the newest rows (validation comes
    // after train in time) cannot be predicted, nor scored by the head's
    // loss: such rows are left out of picking the epoch (eval still scores
    // them, as disagreements). Training stops only if none is left.
    if !validation.iter().any(|row| counts.contains_key(row.label.as_str())) {
        return Err(TrainError::Data(String::from(
            "no validation row has a label the training rows have; the validation set picks the best epoch",
        )));
    }
    Ok(counts.keys().map(|label| label.to_string()).collect())
}

/// A head initialised from the seed: weights uniform with standard deviation
/// 0.02 (BERT's initializer range), zero bias.
fn init_head(labels: usize, hidden: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor), TrainError> {
    let mut rng = StdRng::seed_from_u64(data::mix(seed, 0x4845_4144));
    let bound = 0.02 * 3f32.sqrt();
    let values: Vec<f32> = (0..labels * hidden).map(|_| rng.gen_range(-bound..bound)).collect();
    Ok((Tensor::from_vec(values, (labels, hidden), device)?, Tensor::zeros(labels, DType::F32, device)?))
}

/// Mean cross-entropy and accuracy over `encoded` (eval mode, no dropout).
fn evaluate(
    net: &Net,
    encoded: &[Encoded],
    labels: &[u32],
    pad_id: u32,
    batch_size: usize,
) -> Result<(f64, f64), TrainError> {
    let probabilities = classifier::probabilities(net, encoded, pad_id, batch_size.max(64))?;
    let mut loss = 0f64;
    let mut correct = 0usize;
    for (probs, &label) in probabilities.iter().zip(labels) {
        loss -= (probs[label as usize].max(1e-12) as f64).ln();
        if classifier::argmax(probs).0 == label as usize {
            correct += 1;
        }
    }
    let n = labels.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// Writes the current weights as the kept ones: the head, and the whole
/// encoder when any of it trains.
fn write_weights(
    output_dir: &Path,
    net: &Net,
    encoder: &[(String, Tensor)],
    encoder_tuned: bool,
) -> Result<(), TrainError> {
    let head: HashMap<String, Tensor> =
        [(HEAD_WEIGHT.to_string(), net.head_weight.copy()?), (HEAD_BIAS.to_string(), net.head_bias.copy()?)]
            .into_iter()
            .collect();
    checkpoint::save_tensors_atomically(&head, &output_dir.join(HEAD_FILE))?;
    if encoder_tuned {
        let tensors: HashMap<String, Tensor> =
            encoder.iter().map(|(name, tensor)| (name.clone(), tensor.clone())).collect();
        checkpoint::save_tensors_atomically(&tensors, &output_dir.join(ENCODER_FILE))?;
    }
    Ok(())
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(flatten)]
    core: ManifestCore,
    kind: &'static str,
    architecture: &'static str,
    dataset_id: Option<&'a str>,
    labels: &'a [String],
    hyperparameters: &'a ClassifierTrainConfig,
    train_rows: usize,
    validation_rows: usize,
    trained_parameters: usize,
    epochs: &'a [EpochMetrics],
    best_epoch: Option<usize>,
    best_validation_accuracy: Option<f64>,
    stopped_early: bool,
    steps: usize,
    wall_seconds: f64,
    created_at: String,
}

fn write_artifacts(
    config: &ClassifierTrainConfig,
    model_dir: &HfDir,
    labels: &[String],
    encoder_tuned: bool,
    report: &TrainReport,
    train_rows: usize,
    validation_rows: usize,
) -> Result<(), TrainError> {
    let out = &config.output_dir;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    let copy = |from: &Path, name: &str| -> Result<(), TrainError> {
        std::fs::copy(from, out.join(name)).map(|_| ()).map_err(io(from))
    };
    copy(&model_dir.config_path, "config.json")?;
    copy(&model_dir.tokenizer_path, "tokenizer.json")?;
    checkpoint::write_json_atomically(&out.join(LABELS_FILE), labels)?;
    let base_model = std::fs::canonicalize(&config.base_model).unwrap_or_else(|_| config.base_model.clone());
    let manifest = Manifest {
        core: ManifestCore { base_model, encoder_tuned, max_len: config.max_len },
        kind: "encoder-classifier",
        architecture: "bert",
        dataset_id: config.dataset_id.as_deref(),
        labels,
        hyperparameters: config,
        train_rows,
        validation_rows,
        trained_parameters: report.trained_parameters,
        epochs: &report.epochs,
        best_epoch: report.best_epoch,
        best_validation_accuracy: report.best_validation_accuracy,
        stopped_early: report.stopped_early,
        steps: report.steps,
        wall_seconds: report.wall_seconds,
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    checkpoint::write_json_atomically(&out.join(MANIFEST_FILE), &manifest)
}

#[cfg(test)]
pub(crate) mod tests;
