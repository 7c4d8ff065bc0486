//! The classifier network (BERT encoder, mean pooling, dropout, linear head)
//! and [`ClassifierModel`], a trained classifier loaded for prediction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use understudy_models::bert;
use understudy_models::dropout::Dropout;
use understudy_models::hf;

use crate::data::{self, Batch, Encoded};
use crate::TrainError;

pub(crate) const HEAD_WEIGHT: &str = "classifier.weight";
pub(crate) const HEAD_BIAS: &str = "classifier.bias";
pub(crate) const HEAD_FILE: &str = "head.safetensors";
pub(crate) const ENCODER_FILE: &str = "encoder.safetensors";
pub(crate) const LABELS_FILE: &str = "labels.json";
pub(crate) const MANIFEST_FILE: &str = "manifest.json";

/// Which parts of the encoder are trained.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trainable {
    /// Layers `[0, first_trained_layer)` are frozen.
    pub first_trained_layer: usize,
    pub embeddings: bool,
}

impl Trainable {
    pub fn new(num_layers: usize, train_top_layers: Option<usize>, embeddings: bool) -> Trainable {
        match train_top_layers {
            None => Trainable { first_trained_layer: 0, embeddings },
            Some(top) => Trainable { first_trained_layer: num_layers.saturating_sub(top), embeddings: false },
        }
    }

    pub fn nothing(num_layers: usize) -> Trainable {
        Trainable { first_trained_layer: num_layers, embeddings: false }
    }

    /// Whether the encoder weight `name` (HF naming, no `bert.` prefix) trains.
    pub fn trains(&self, name: &str) -> bool {
        if name.starts_with("embeddings.") {
            return self.embeddings;
        }
        layer_index(name).is_some_and(|layer| layer >= self.first_trained_layer)
    }
}

fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?.split('.').next()?.parse().ok()
}

/// Whether `name` is an encoder weight this model uses (not the pooler).
pub(crate) fn is_encoder_weight(name: &str) -> bool {
    name.starts_with("embeddings.") || name.starts_with("encoder.layer.")
}

pub(crate) struct Net {
    pub encoder: bert::Model,
    pub head_weight: Tensor,
    pub head_bias: Tensor,
    pub trainable: Trainable,
    pub head_dropout: f64,
}

impl Net {
    /// Builds the network over `weights` (encoder, HF names without prefix,
    /// plus the head). The tensors that train become `Var`s, returned sorted
    /// by name; the others stay constants, so no gradient is computed for them.
    pub fn build(
        cfg: &bert::Config,
        mut weights: HashMap<String, Tensor>,
        trainable: Trainable,
        head_dropout: f64,
    ) -> Result<(Net, Vec<(String, Var)>), TrainError> {
        let mut names: Vec<String> =
            weights.keys().filter(|name| trainable.trains(name) || name.starts_with("classifier.")).cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for name in names {
            if let Some(tensor) = weights.get(&name) {
                let var = Var::from_tensor(tensor)?;
                weights.insert(name.clone(), var.as_tensor().clone());
                vars.push((name, var));
            }
        }
        let missing_head = |name: &str| TrainError::Model(format!("the weights have no {name}"));
        let head_weight = weights.get(HEAD_WEIGHT).cloned().ok_or_else(|| missing_head(HEAD_WEIGHT))?;
        let head_bias = weights.get(HEAD_BIAS).cloned().ok_or_else(|| missing_head(HEAD_BIAS))?;
        let dtype = head_weight.dtype();
        let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
        let encoder = bert::Model::new(cfg, vb)?;
        Ok((Net { encoder, head_weight, head_bias, trainable, head_dropout }, vars))
    }

    /// Logits `[batch, labels]`. With `dropout`, the trained layers and the
    /// head apply dropout (training); the frozen layers never do, and their
    /// output is detached.
    pub fn logits(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> candle_core::Result<Tensor> {
        let layers = self.encoder.num_layers();
        let first = self.trainable.first_trained_layer.min(layers);
        let embed_dropout = if self.trainable.embeddings { dropout.as_deref_mut() } else { None };
        let mut hidden = self.encoder.embed(&batch.ids, &batch.type_ids, embed_dropout)?;
        if !self.trainable.embeddings {
            hidden = hidden.detach();
        }
        if first > 0 {
            hidden = self.encoder.encode(&hidden, &batch.mask, 0..first, None)?.detach();
        }
        hidden = self.encoder.encode(&hidden, &batch.mask, first..layers, dropout.as_deref_mut())?;
        let pooled = bert::mean_pool(&hidden, &batch.mask)?;
        let pooled = match dropout {
            Some(dropout) => dropout.apply(&pooled, self.head_dropout)?,
            None => pooled,
        };
        pooled.matmul(&self.head_weight.t()?)?.broadcast_add(&self.head_bias)
    }
}

/// The manifest's fields that loading needs (the trainer writes more).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ManifestCore {
    pub base_model: PathBuf,
    pub encoder_tuned: bool,
    pub max_len: usize,
}

/// One prediction: the most probable label, its probability, and the
/// probability of every label (in [`ClassifierModel::labels`] order).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub confidence: f32,
    pub probabilities: Vec<f32>,
}

/// A trained classifier, loaded from the trainer's output directory.
pub struct ClassifierModel {
    net: Net,
    tokenizer: Tokenizer,
    labels: Vec<String>,
    pad_id: u32,
    batch_size: usize,
}

impl ClassifierModel {
    /// Loads what [`crate::train_classifier`] wrote to `dir`.
    pub fn load(dir: impl AsRef<Path>) -> Result<ClassifierModel, TrainError> {
        let dir = dir.as_ref();
        let manifest: ManifestCore = read_json(&dir.join(MANIFEST_FILE))?;
        let labels: Vec<String> = read_json(&dir.join(LABELS_FILE))?;
        let model_dir = hf::HfDir::open(if manifest.encoder_tuned { dir } else { &manifest.base_model })?;
        let cfg = model_dir.bert_config()?;
        let tokenizer = hf::load_tokenizer(&dir.join("tokenizer.json"), manifest.max_len)?;
        let mut weights = hf::strip_bert_prefix(model_dir.weights(DType::F32, &Device::Cpu)?);
        weights.retain(|name, _| is_encoder_weight(name) || name.starts_with("classifier."));
        if !manifest.encoder_tuned {
            let head = candle_core::safetensors::load(dir.join(HEAD_FILE), &Device::Cpu)?;
            weights.extend(head);
        }
        let (mut net, _) = Net::build(&cfg, weights, Trainable::nothing(cfg.num_hidden_layers), 0.0)?;
        // A loaded classifier only answers: its weights laid out for inference.
        net.encoder = net.encoder.into_inference()?;
        let classes = net.head_weight.dim(0)?;
        if classes != labels.len() {
            return Err(TrainError::Model(format!(
                "{} has {} labels but the head has {classes} outputs",
                dir.join(LABELS_FILE).display(),
                labels.len()
            )));
        }
        Ok(ClassifierModel { net, tokenizer, labels, pad_id: cfg.pad_token_id as u32, batch_size: 64 })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Predicts a label for each text, in order.
    pub fn predict(&self, texts: &[String]) -> Result<Vec<Prediction>, TrainError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encoded = data::encode(&self.tokenizer, &refs)?;
        let probabilities = probabilities(&self.net, &encoded, self.pad_id, self.batch_size)?;
        Ok(probabilities
            .into_iter()
            .map(|probs| {
                let (best, confidence) = argmax(&probs);
                Prediction { label: self.labels[best].clone(), confidence, probabilities: probs }
            })
            .collect())
    }
}

/// Softmax probabilities for every row, in input order (eval mode).
pub(crate) fn probabilities(
    net: &Net,
    encoded: &[Encoded],
    pad_id: u32,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let lengths: Vec<usize> = encoded.iter().map(|row| row.ids.len()).collect();
    let mut out = vec![Vec::new(); encoded.len()];
    for indices in data::sorted_batches(&lengths, batch_size) {
        let rows: Vec<&Encoded> = indices.iter().map(|&index| &encoded[index]).collect();
        let batch = data::make_batch(&rows, pad_id, &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&net.logits(&batch, None)?)?.to_vec2::<f32>()?;
        for (index, row) in indices.into_iter().zip(probs) {
            out[index] = row;
        }
    }
    Ok(out)
}

pub(crate) fn argmax(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, v)| if v > best.1 { (i, v) } else { best })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|error| TrainError::Model(format!("{}: {error}", path.display())))
}
