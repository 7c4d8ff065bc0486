//! The drift watch of a task, from the store: the tests are
//! `understudy_eval::drift`'s; this module picks their samples.
//!
//! - **Answers** (label tasks): the lead's answers on recent calls against
//!   the labels of the serving version's training split. Only a random
//!   sample of the traffic is compared by the chi-square test: calls the
//!   lead served under `lead`/`shadow` (every call) and audits (a random
//!   share of served calls). A cascade's fallbacks are the understudy's
//!   least confident calls, not a random sample, so they count only for new
//!   labels, a rule without a p-value (`min_new` occurrences).
//! - **Confidence**: the understudy's confidence on the newest `window`
//!   calls against the first `window` calls after the current policy was
//!   promoted, and coverage at the cascade's threshold (Fisher, one-sided;
//!   a one-sided Kolmogorov–Smirnov test; Bonferroni-combined).
//! - **Input**: the newest `window` prompts against (at most 256 of) the
//!   training split's prompts, both as a local encoder embeds them (the text
//!   a classifier reads, `prompt_text`), by the energy distance with a
//!   seeded permutation test. Without an encoder this signal is skipped.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use understudy_datasets::files::read_split;
use understudy_datasets::jsonl::ChatExample;
use understudy_eval::drift::{
    answer_drift, confidence_drift, input_drift, AnswerDriftConfig, ConfidenceDriftConfig, DriftReport,
    InputDriftConfig,
};
use understudy_providers::{EmbeddingRequest, LocalModel};
use understudy_router::Policy;
use understudy_store::{CallFilter, CallOrder, StatusFilter, Store};
use understudy_trainer::prompt_text;
use understudy_types::{CallRecord, OffsetDateTime, ServedBy, TaskKind};

use crate::error::{LoopError, Result};

/// Texts per embeddings request.
const EMBED_BATCH: usize = 32;

/// What the drift watch looked at, and what it found.
#[derive(Debug, Clone)]
pub struct TaskDrift {
    pub task: String,
    pub at: OffsetDateTime,
    /// The policy and version the watch compares against.
    pub policy: Option<String>,
    pub understudy: Option<String>,
    pub report: DriftReport,
    /// Recent lead answers from a random sample of the traffic, and from fallbacks.
    pub n_representative_answers: u64,
    pub n_fallback_answers: u64,
    /// Why a signal was not tested, when it was not.
    pub skipped: Vec<String>,
}

/// A local encoder that embeds prompts for the input-drift test, and the
/// model name its embeddings requests carry.
#[derive(Clone, Copy)]
pub struct Encoder<'a> {
    pub model: &'a dyn LocalModel,
    pub name: &'a str,
}

/// The drift signals of `task` over its newest `window` calls, at level `alpha`.
pub async fn task_drift(
    store: &Store,
    task: &str,
    window: u64,
    alpha: f64,
    encoder: Option<Encoder<'_>>,
) -> Result<TaskDrift> {
    let current = store.policy_history(task).await?.into_iter().next();
    let mut skipped = Vec::new();
    let recent = newest_calls(store, task, None, window).await?;

    // The serving version's training labels.
    let version = match current.as_ref().and_then(|change| change.understudy.as_deref()) {
        Some(id) => store.get_model_version(id).await?.into_iter().find(|version| version.id == id),
        None => None,
    };
    let dataset = match &version {
        Some(version) => store.get_dataset(&version.dataset_id).await?.into_iter().next(),
        None => None,
    };
    let mut n_representative_answers = 0;
    let mut n_fallback_answers = 0;
    let answers = match &dataset {
        Some(dataset) if dataset.kind == TaskKind::Label => {
            let training = training_labels(&dataset.path)?;
            let (representative, fallbacks) = lead_answers(&recent);
            n_representative_answers = representative.len() as u64;
            n_fallback_answers = fallbacks.len() as u64;
            let config = AnswerDriftConfig { alpha, ..AnswerDriftConfig::default() };
            let representative = understudy_eval::drift::label_counts(&representative);
            let fallbacks = understudy_eval::drift::label_counts(&fallbacks);
            let mut test =
                if representative.is_empty() { None } else { Some(answer_drift(&training, &representative, &config)?) };
            if !fallbacks.is_empty() {
                let on_fallbacks = answer_drift(&training, &fallbacks, &config)?;
                if on_fallbacks.new_label_fired {
                    // Only the new labels of fallbacks count (see the module's note).
                    let merged = test.get_or_insert_with(|| {
                        let mut only_new = on_fallbacks.clone();
                        only_new.shares_shifted = false;
                        only_new.p_value = 1.0;
                        only_new
                    });
                    merged.new_labels = on_fallbacks.new_labels.clone();
                    merged.new_share = on_fallbacks.new_share;
                    merged.new_label_fired = true;
                    merged.drifted = true;
                }
            }
            if test.is_none() {
                skipped.push("answers: no recent lead answers".to_string());
            }
            test
        }
        Some(_) => {
            skipped.push("answers: a generation task has no labels to compare".to_string());
            None
        }
        None => {
            skipped.push("answers: no model version serves the task, so there is no training set".to_string());
            None
        }
    };

    let confidence = match &current {
        Some(change) => {
            let threshold = match Policy::parse(&change.policy, None) {
                Ok(Policy::Cascade { threshold }) => Some(threshold),
                _ => None,
            };
            let reference = newest_calls(store, task, Some(change.created_at), window).await?;
            let confidences = |calls: &[CallRecord]| -> Vec<f64> {
                calls
                    .iter()
                    .filter_map(|call| call.routing.as_ref().and_then(|routing| routing.understudy_confidence))
                    .filter(|confidence| confidence.is_finite())
                    .collect()
            };
            let reference_ids: std::collections::HashSet<_> = reference.iter().map(|call| call.id).collect();
            let overlap = recent.iter().any(|call| reference_ids.contains(&call.id));
            let (reference, recent) = (confidences(&reference), confidences(&recent));
            if overlap || reference.len() < window as usize || recent.len() < window as usize {
                skipped.push(format!(
                    "confidence: needs {} calls with an understudy confidence since the policy `{}` began, and has {}",
                    2 * window,
                    change.policy,
                    if overlap { reference.len() } else { reference.len() + recent.len() }
                ));
                None
            } else {
                Some(confidence_drift(&reference, &recent, threshold, &ConfidenceDriftConfig { alpha })?)
            }
        }
        None => {
            skipped.push("confidence: the task has never been promoted".to_string());
            None
        }
    };

    let input = match (&dataset, encoder) {
        (Some(dataset), Some(encoder)) => {
            let training = training_prompts(&dataset.path)?;
            let recent_prompts: Vec<String> = recent.iter().filter_map(request_prompt).collect();
            if training.is_empty() || recent_prompts.len() < 10 {
                skipped.push(format!(
                    "input: {} recent prompts, {} training prompts",
                    recent_prompts.len(),
                    training.len()
                ));
                None
            } else {
                let config = InputDriftConfig { alpha, ..InputDriftConfig::default() };
                let sample: Vec<String> = training.into_iter().take(config.max_per_side).collect();
                let reference = embed(encoder, &sample).await?;
                let recent_embedded = embed(encoder, &recent_prompts).await?;
                Some(input_drift(&reference, &recent_embedded, &config)?)
            }
        }
        (None, _) => {
            skipped.push("input: no model version serves the task, so there is no training set".to_string());
            None
        }
        (_, None) => {
            skipped.push("input: no local encoder to embed prompts with".to_string());
            None
        }
    };

    Ok(TaskDrift {
        task: task.to_string(),
        at: OffsetDateTime::now_utc(),
        policy: current.as_ref().map(|change| change.policy.clone()),
        understudy: current.and_then(|change| change.understudy),
        report: DriftReport { input, answers, confidence },
        n_representative_answers,
        n_fallback_answers,
        skipped,
    })
}

/// The task's newest successful chat calls (or, from `since`, its oldest
/// ones after it), at most `limit`.
async fn newest_calls(store: &Store, task: &str, since: Option<OffsetDateTime>, limit: u64) -> Result<Vec<CallRecord>> {
    let filter = CallFilter {
        task: Some(task.to_string()),
        status: Some(StatusFilter::Ok),
        since,
        limit: Some(limit),
        order: if since.is_some() { CallOrder::OldestFirst } else { CallOrder::NewestFirst },
        ..CallFilter::default()
    };
    Ok(store.list_calls(&filter).await?)
}

/// Label counts of a dataset's train split.
fn training_labels(dir: &str) -> Result<BTreeMap<String, u64>> {
    let text = read_split(Path::new(dir), "train")?;
    let answers = text.lines().filter_map(|line| ChatExample::parse(line).ok()).map(|example| example.answer_text());
    Ok(understudy_eval::drift::label_counts(answers))
}

/// The lead's answers on `calls`: from a random sample of the traffic
/// (every call under lead or shadow, and audits), and from fallbacks.
fn lead_answers(calls: &[CallRecord]) -> (Vec<String>, Vec<String>) {
    let mut representative = Vec::new();
    let mut fallbacks = Vec::new();
    for call in calls {
        let Some(routing) = &call.routing else {
            representative.extend(response_text(call));
            continue;
        };
        if let Some(audit) = &routing.audit_answer {
            representative.push(audit.clone());
            continue;
        }
        if routing.served_by != ServedBy::Lead {
            continue;
        }
        let everyone = matches!(Policy::parse(&routing.policy, None), Ok(Policy::Lead | Policy::Shadow));
        match (everyone, response_text(call)) {
            (true, Some(answer)) => representative.push(answer),
            (false, Some(answer)) => fallbacks.push(answer),
            _ => {}
        }
    }
    (representative, fallbacks)
}

fn response_text(call: &CallRecord) -> Option<String> {
    let response: serde_json::Value = serde_json::from_str(call.response.as_deref()?).ok()?;
    response.pointer("/choices/0/message/content").and_then(serde_json::Value::as_str).map(str::to_string)
}

/// Prompts of a dataset's train split, as a classifier reads them.
fn training_prompts(dir: &str) -> Result<Vec<String>> {
    let text = read_split(Path::new(dir), "train")?;
    Ok(text
        .lines()
        .filter_map(|line| ChatExample::parse(line).ok())
        .map(|example| prompt_text(&example.prompt))
        .collect())
}

/// A recorded call's prompt, as a classifier reads it.
fn request_prompt(call: &CallRecord) -> Option<String> {
    let request: Value = serde_json::from_str(&call.request).ok()?;
    let text = prompt_text(request.get("messages")?.as_array()?);
    (!text.is_empty()).then_some(text)
}

/// Embeddings of `texts`, in order, from the encoder's OpenAI-style answers.
async fn embed(encoder: Encoder<'_>, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let mut vectors = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(EMBED_BATCH) {
        let body = json!({"model": encoder.name, "input": chunk});
        let request = EmbeddingRequest { body: body.as_object().cloned().unwrap_or_default() };
        let response = encoder.model.embed(request).await.map_err(LoopError::Encoder)?;
        let answer: Value = serde_json::from_slice(&response.body)
            .map_err(|error| LoopError::Refused(format!("the encoder's answer is not JSON: {error}")))?;
        let data = answer.get("data").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if data.len() != chunk.len() {
            return Err(LoopError::Refused(format!(
                "the encoder answered {} embeddings for {} texts",
                data.len(),
                chunk.len()
            )));
        }
        for item in data {
            let vector = item
                .get("embedding")
                .and_then(Value::as_array)
                .map(|values| values.iter().filter_map(Value::as_f64).map(|value| value as f32).collect::<Vec<f32>>())
                .unwrap_or_default();
            vectors.push(vector);
        }
    }
    Ok(vectors)
}
