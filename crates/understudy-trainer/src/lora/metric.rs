//! The task metric of a LoRA run, measured on validation rows after every
//! epoch: label accuracy by constrained decoding (the most likely allowed
//! label), or token F1 of a greedy decode.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use understudy_models::chat::IM_END;
use understudy_models::llama::{self, KvCache};
use understudy_models::ops::cross_entropy_rows;
use understudy_types::answers_agree;

use super::SftExample;
use crate::TrainError;

/// What LoRA validation measures besides the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskMetric {
    /// The validation loss alone.
    None,
    /// Accuracy of the most likely of `labels` (each scored as the whole
    /// answer plus the end-of-turn token, the way the engine constrains a
    /// label task's output) against the reference answer, both
    /// whitespace-normalized.
    LabelAccuracy { labels: Vec<String> },
    /// Mean token F1 of a greedy decode (up to `max_new_tokens`, ending at
    /// the end-of-turn token) against the reference answer.
    TokenF1 { max_new_tokens: usize },
}

impl TaskMetric {
    /// The name the manifest and the progress lines use.
    pub fn name(&self) -> Option<&'static str> {
        match self {
            TaskMetric::None => None,
            TaskMetric::LabelAccuracy { .. } => Some("label_accuracy"),
            TaskMetric::TokenF1 { .. } => Some("token_f1"),
        }
    }

    pub(crate) fn check(&self) -> Result<(), TrainError> {
        match self {
            TaskMetric::LabelAccuracy { labels } if labels.is_empty() => {
                Err(TrainError::Config(String::from("label accuracy needs at least one label")))
            }
            TaskMetric::TokenF1 { max_new_tokens: 0 } => {
                Err(TrainError::Config(String::from("token F1 needs max_new_tokens of at least 1")))
            }
            _ => Ok(()),
        }
    }
}

/// A validation row as the metric sees it: the prompt's ids (everything
/// before the answer) and the reference answer's text.
pub(crate) struct MetricRow {
    prompt: Vec<u32>,
    reference: String,
}

/// What scoring needs, prepared once per run.
pub(crate) struct MetricSetup {
    metric: TaskMetric,
    rows: Vec<MetricRow>,
    /// Each label's ids, its end-of-turn token included.
    candidates: Vec<Vec<u32>>,
    stop_ids: Vec<u32>,
    tokenizer: tokenizers::Tokenizer,
}

impl MetricSetup {
    /// The first `max_rows` validation examples that have a prompt; `None`
    /// for [`TaskMetric::None`].
    pub(crate) fn new(
        metric: &TaskMetric,
        tokenizer: &tokenizers::Tokenizer,
        eos_token_id: Option<u32>,
        validation: &[SftExample],
        max_rows: usize,
    ) -> Result<Option<MetricSetup>, TrainError> {
        if matches!(metric, TaskMetric::None) || max_rows == 0 {
            return Ok(None);
        }
        let im_end = tokenizer.token_to_id(IM_END);
        let stop_ids: Vec<u32> = im_end.into_iter().chain(eos_token_id).collect();
        let decode =
            |ids: &[u32]| tokenizer.decode(ids, true).map_err(|error| TrainError::Tokenizer(error.to_string()));
        let mut rows = Vec::new();
        for example in validation {
            let Some(start) = example.loss_mask.iter().position(|&covered| covered) else { continue };
            if start == 0 {
                continue;
            }
            let answer: Vec<u32> = example.ids[start..]
                .iter()
                .zip(&example.loss_mask[start..])
                .filter(|&(id, &covered)| covered && !stop_ids.contains(id))
                .map(|(&id, _)| id)
                .collect();
            rows.push(MetricRow { prompt: example.ids[..start].to_vec(), reference: decode(&answer)? });
            if rows.len() == max_rows {
                break;
            }
        }
        let candidates = match metric {
            TaskMetric::LabelAccuracy { labels } => labels
                .iter()
                .map(|label| {
                    tokenizer
                        .encode(format!("{label}{IM_END}"), false)
                        .map(|encoding| encoding.get_ids().to_vec())
                        .map_err(|error| TrainError::Tokenizer(error.to_string()))
                })
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        };
        if candidates.iter().any(Vec::is_empty) {
            return Err(TrainError::Tokenizer(String::from("a label encodes to no tokens")));
        }
        Ok(Some(MetricSetup { metric: metric.clone(), rows, candidates, stop_ids, tokenizer: tokenizer.clone() }))
    }

    /// The metric over the rows under the model's current weights.
    pub(crate) fn score(&self, model: &llama::Model) -> Result<f64, TrainError> {
        if self.rows.is_empty() {
            return Ok(0.0);
        }
        let mut total = 0.0;
        for row in &self.rows {
            total += match &self.metric {
                TaskMetric::None => 0.0,
                TaskMetric::LabelAccuracy { labels } => {
                    let best = self.most_likely_label(model, &row.prompt)?;
                    // Agreement with the lead, by the rule the gateway and `eval` use.
                    f64::from(answers_agree(&labels[best], &row.reference))
                }
                TaskMetric::TokenF1 { max_new_tokens } => {
                    let ids = self.greedy(model, &row.prompt, *max_new_tokens)?;
                    let text =
                        self.tokenizer.decode(&ids, true).map_err(|error| TrainError::Tokenizer(error.to_string()))?;
                    understudy_eval::generation::token_f1(&row.reference, &text)
                }
            };
        }
        Ok(total / self.rows.len() as f64)
    }

    /// The index of the label whose tokens are the most likely continuation
    /// of `prompt`: the prompt is run once, and every label continues its
    /// cache in one batch.
    pub(super) fn most_likely_label(&self, model: &llama::Model, prompt: &[u32]) -> Result<usize, TrainError> {
        let nll = self.label_nll(model, prompt)?;
        Ok(nll.iter().enumerate().fold(0, |best, (idx, &value)| if value < nll[best] { idx } else { best }))
    }

    /// Each label's negative log-likelihood (its tokens and the end of turn)
    /// as the continuation of `prompt`.
    pub(super) fn label_nll(&self, model: &llama::Model, prompt: &[u32]) -> Result<Vec<f64>, TrainError> {
        let device = Device::Cpu;
        let mut cache = KvCache::new();
        let hidden = model.forward_hidden_cached(&Tensor::new(prompt, &device)?.unsqueeze(0)?, &mut cache)?;
        let last = hidden.narrow(1, prompt.len() - 1, 1)?.squeeze(1)?;
        let n = self.candidates.len();
        // The first token of every label, predicted from the prompt's last position.
        let first_targets: Vec<u32> = self.candidates.iter().map(|ids| ids[0]).collect();
        let first_nll = cross_entropy_rows(&model.logits(&last)?.repeat((n, 1))?, &first_targets)?.to_vec1::<f32>()?;
        let mut nll: Vec<f64> = first_nll.into_iter().map(f64::from).collect();
        let width = self.candidates.iter().map(Vec::len).max().unwrap_or(1) - 1;
        if width > 0 {
            // Inputs are each label's tokens but its last, right-padded (the
            // padding comes after every real token, so no real one sees it).
            let mut inputs = Vec::with_capacity(n * width);
            let mut positions = Vec::new();
            let mut targets = Vec::new();
            let mut owners = Vec::new();
            for (idx, ids) in self.candidates.iter().enumerate() {
                inputs.extend_from_slice(&ids[..ids.len() - 1]);
                inputs.extend(std::iter::repeat_n(ids[0], width - (ids.len() - 1)));
                for (t, &target) in ids.iter().enumerate().skip(1) {
                    positions.push((idx * width + t - 1) as u32);
                    targets.push(target);
                    owners.push(idx);
                }
            }
            let mut batch_cache = cache.repeat(n)?;
            let hidden =
                model.forward_hidden_cached(&Tensor::from_vec(inputs, (n, width), &device)?, &mut batch_cache)?;
            let h = hidden.dim(2)?;
            let selected = hidden
                .reshape((n * width, h))?
                .index_select(&Tensor::from_vec(positions, targets.len(), &device)?, 0)?;
            let rest = cross_entropy_rows(&model.logits(&selected)?, &targets)?.to_vec1::<f32>()?;
            for (owner, value) in owners.into_iter().zip(rest) {
                nll[owner] += f64::from(value);
            }
        }
        Ok(nll)
    }

    /// Up to `max_new_tokens` greedy tokens after `prompt`, without the stop token.
    pub(super) fn greedy(
        &self,
        model: &llama::Model,
        prompt: &[u32],
        max_new_tokens: usize,
    ) -> Result<Vec<u32>, TrainError> {
        let device = Device::Cpu;
        let mut cache = KvCache::new();
        let mut input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
        let mut out = Vec::new();
        while out.len() < max_new_tokens {
            let hidden = model.forward_hidden_cached(&input, &mut cache)?;
            let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
            let next = model.logits(&last)?.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            if self.stop_ids.contains(&next) {
                break;
            }
            out.push(next);
            input = Tensor::new(&[[next]], &device)?;
        }
        Ok(out)
    }
}
