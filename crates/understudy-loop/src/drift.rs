//! The drift watch of a task, from the store: the tests are
//! `understudy_eval::drift`'s; this module picks their samples.
//!
//! - **Answers** (label tasks): the lead's answers on recent calls against
//!   the labels of the serving version's training split. Only a random
//!   sample of the traffic is compared by the chi-square test: calls the
//!   lead served under `lead`/`shadow` (every call). Under a cascade, the
//!   fallbacks are the understudy's least confident calls and the audits a
//!   random share of its most confident (served) ones: neither is a random
//!   sample of the traffic (measured: audits alone fired the chi-square
//!   test on traffic that had not moved), so they count only for new labels,
//!   a rule without a p-value (`min_new` occurrences).
//! - **Confidence**: the understudy's confidence on the newest `window`
//!   calls against the first `window` calls after the current policy was
//!   promoted, and coverage at the cascade's threshold (Fisher, one-sided;
//!   a one-sided Kolmogorov–Smirnov test; Bonferroni-combined).
//! - **Input**: the newest `window` prompts against (at most 256 of) the
//!   training split's prompts, both as a local encoder embeds them (the text
//!   a classifier reads, `prompt_text`), by the energy distance with a
//!   seeded permutation test. Without an encoder this signal is skipped.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use understudy_eval::drift::{
    answer_drift, confidence_drift, input_drift, AnswerDriftConfig, ConfidenceDriftConfig, DriftReport,
    InputDriftConfig,
};
use understudy_providers::{EmbeddingRequest, LocalModel};
use understudy_router::Policy;
use understudy_store::{CallFilter, CallOrder, DatasetRecord, StatusFilter, Store};
use understudy_trainer::prompt_text;
use understudy_types::{CallRecord, OffsetDateTime, ServedBy, TaskKind};

use crate::datasets::split_rows;
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

/// What a window of calls is compared with: the serving version's training
/// labels and prompts, and the understudy's confidence on the first window
/// of calls after the current promotion.
struct Baseline {
    policy: Option<String>,
    understudy: Option<String>,
    /// The cascade's threshold, when the policy is a cascade.
    threshold: Option<f64>,
    /// Label counts of the training split (label tasks).
    labels: Option<BTreeMap<String, u64>>,
    /// Embeddings of (up to `max_per_side` of) the training prompts.
    prompts: Option<Vec<Vec<f32>>>,
    /// The first `window` calls after the promotion, and their confidences.
    reference: Vec<CallRecord>,
    confidences: Vec<f64>,
    /// Why a signal cannot be tested at all.
    skipped: Vec<String>,
}

impl Baseline {
    async fn of(store: &Store, task: &str, window: u64, encoder: Option<Encoder<'_>>) -> Result<Baseline> {
        let current = store.policy_history(task).await?.into_iter().next();
        let mut skipped = Vec::new();
        let dataset = match current.as_ref().and_then(|change| change.understudy.as_deref()) {
            Some(id) => version_dataset(store, id).await?,
            None => None,
        };
        let labels = match &dataset {
            Some(dataset) if dataset.kind == TaskKind::Label => Some(training_labels(&dataset.path)?),
            Some(_) => {
                skipped.push("answers: a generation task has no labels to compare".to_string());
                None
            }
            None => {
                skipped.push("answers: no model version serves the task, so there is no training set".to_string());
                None
            }
        };
        let prompts = match (&dataset, encoder) {
            (Some(dataset), Some(encoder)) => {
                let training = training_prompts(&dataset.path)?;
                let sample: Vec<String> = training.into_iter().take(InputDriftConfig::default().max_per_side).collect();
                if sample.is_empty() {
                    skipped.push("input: the training split has no prompts".to_string());
                    None
                } else {
                    Some(embed(encoder, &sample).await?)
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
        let (threshold, reference) = match &current {
            Some(change) => {
                let threshold = match Policy::parse(&change.policy, None) {
                    Ok(Policy::Cascade { threshold }) => Some(threshold),
                    _ => None,
                };
                (threshold, newest_calls(store, task, Some(change.created_at), window).await?)
            }
            None => {
                skipped.push("confidence: the task has never been promoted".to_string());
                (None, Vec::new())
            }
        };
        let confidences = confidences(&reference);
        Ok(Baseline {
            policy: current.as_ref().map(|change| change.policy.clone()),
            understudy: current.and_then(|change| change.understudy),
            threshold,
            labels,
            prompts,
            reference,
            confidences,
            skipped,
        })
    }

    /// The three signals on `calls`; what could not be tested is said in `skipped`.
    async fn test(
        &self,
        calls: &[CallRecord],
        window: u64,
        alpha: f64,
        encoder: Option<Encoder<'_>>,
        skipped: &mut Vec<String>,
    ) -> Result<(DriftReport, u64, u64)> {
        let mut n_representative = 0;
        let mut n_fallbacks = 0;
        let answers = match &self.labels {
            Some(training) => {
                let (representative, fallbacks) = lead_answers(calls);
                n_representative = representative.len() as u64;
                n_fallbacks = fallbacks.len() as u64;
                let config = AnswerDriftConfig { alpha, ..AnswerDriftConfig::default() };
                let representative = understudy_eval::drift::label_counts(&representative);
                let fallbacks = understudy_eval::drift::label_counts(&fallbacks);
                let mut test = if representative.is_empty() {
                    None
                } else {
                    Some(answer_drift(training, &representative, &config)?)
                };
                if !fallbacks.is_empty() {
                    let on_fallbacks = answer_drift(training, &fallbacks, &config)?;
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
            None => None,
        };
        let reference_ids: std::collections::HashSet<_> = self.reference.iter().map(|call| call.id).collect();
        let overlap = calls.iter().any(|call| reference_ids.contains(&call.id));
        let recent = confidences(calls);
        let confidence = match &self.policy {
            Some(policy) if overlap || self.confidences.len() < window as usize || recent.len() < window as usize => {
                skipped.push(format!(
                    "confidence: needs {} calls with an understudy confidence since the policy `{policy}` began, and \
                     has {}",
                    2 * window,
                    if overlap { self.confidences.len() } else { self.confidences.len() + recent.len() }
                ));
                None
            }
            Some(_) => {
                Some(confidence_drift(&self.confidences, &recent, self.threshold, &ConfidenceDriftConfig { alpha })?)
            }
            None => None,
        };
        let input = match (&self.prompts, encoder) {
            (Some(reference), Some(encoder)) => {
                let prompts: Vec<String> = calls.iter().filter_map(request_prompt).collect();
                if prompts.len() < 10 {
                    skipped.push(format!("input: {} recent prompts", prompts.len()));
                    None
                } else {
                    let config = InputDriftConfig { alpha, ..InputDriftConfig::default() };
                    Some(input_drift(reference, &embed(encoder, &prompts).await?, &config)?)
                }
            }
            _ => None,
        };
        Ok((DriftReport { input, answers, confidence }, n_representative, n_fallbacks))
    }
}

/// The drift signals of `task` over its newest `window` calls, at level `alpha`.
pub async fn task_drift(
    store: &Store,
    task: &str,
    window: u64,
    alpha: f64,
    encoder: Option<Encoder<'_>>,
) -> Result<TaskDrift> {
    let baseline = Baseline::of(store, task, window, encoder).await?;
    let recent = newest_calls(store, task, None, window).await?;
    let mut skipped = baseline.skipped.clone();
    let (report, n_representative_answers, n_fallback_answers) =
        baseline.test(&recent, window, alpha, encoder, &mut skipped).await?;
    Ok(TaskDrift {
        task: task.to_string(),
        at: OffsetDateTime::now_utc(),
        policy: baseline.policy,
        understudy: baseline.understudy,
        report,
        n_representative_answers,
        n_fallback_answers,
        skipped,
    })
}

/// One window of the drift watch over time.
#[derive(Debug, Clone)]
pub struct DriftPoint {
    /// The window's first and last call.
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub n_calls: usize,
    pub report: DriftReport,
}

/// The drift signals over time: the calls since the current promotion in
/// consecutive windows of `window`, each tested as [`task_drift`] tests the
/// newest (the first window is the confidence test's reference). At most
/// `max_windows`, the newest ones. Each window is one test per signal, so
/// over many windows some will fire by chance at rate `alpha`: the plot is
/// for seeing *when* a shift began, the autopilot acts on one test per
/// window of new calls.
pub async fn drift_history(
    store: &Store,
    task: &str,
    window: u64,
    alpha: f64,
    max_windows: usize,
    encoder: Option<Encoder<'_>>,
) -> Result<Vec<DriftPoint>> {
    let baseline = Baseline::of(store, task, window, encoder).await?;
    let Some(first) = baseline.reference.first() else { return Ok(Vec::new()) };
    let filter = CallFilter {
        task: Some(task.to_string()),
        status: Some(StatusFilter::Ok),
        since: Some(first.created_at),
        ..CallFilter::default()
    };
    let calls = store.list_calls(&filter).await?;
    let windows: Vec<&[CallRecord]> =
        calls.chunks(window as usize).skip(1).filter(|chunk| chunk.len() == window as usize).collect();
    let mut points = Vec::new();
    for chunk in windows.iter().rev().take(max_windows).rev() {
        let mut skipped = Vec::new();
        let (report, _, _) = baseline.test(chunk, window, alpha, encoder, &mut skipped).await?;
        points.push(DriftPoint {
            from: chunk[0].created_at,
            to: chunk[chunk.len() - 1].created_at,
            n_calls: chunk.len(),
            report,
        });
    }
    Ok(points)
}

fn confidences(calls: &[CallRecord]) -> Vec<f64> {
    calls
        .iter()
        .filter_map(|call| call.routing.as_ref().and_then(|routing| routing.understudy_confidence))
        .filter(|confidence| confidence.is_finite())
        .collect()
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

/// The dataset a model version was trained on, if both are registered.
async fn version_dataset(store: &Store, version_id: &str) -> Result<Option<DatasetRecord>> {
    let version = store.get_model_version(version_id).await?.into_iter().find(|version| version.id == version_id);
    Ok(match version {
        Some(version) => store.get_dataset(&version.dataset_id).await?.into_iter().next(),
        None => None,
    })
}

/// The labels of the challenger's training split that the champion's never
/// held (empty for a generation task, or when either version is unknown):
/// the labels drift would call new, learned by the challenger.
pub(crate) async fn labels_learned_since(store: &Store, champion: &str, challenger: &str) -> Result<Vec<String>> {
    let (Some(old), Some(new)) = (version_dataset(store, champion).await?, version_dataset(store, challenger).await?)
    else {
        return Ok(Vec::new());
    };
    if old.kind != TaskKind::Label || new.kind != TaskKind::Label {
        return Ok(Vec::new());
    }
    let known = training_labels(&old.path)?;
    Ok(training_labels(&new.path)?.into_keys().filter(|label| !known.contains_key(label)).collect())
}

/// Label counts of a dataset's train split.
fn training_labels(dir: &str) -> Result<BTreeMap<String, u64>> {
    Ok(understudy_eval::drift::label_counts(split_rows(dir, "train", |example| example.answer_text())?))
}

/// The lead's answers on `calls`: from a random sample of the traffic
/// (every call under lead or shadow), and from the cascade's fallbacks and
/// audits (not a random sample: for new labels only).
fn lead_answers(calls: &[CallRecord]) -> (Vec<String>, Vec<String>) {
    let mut representative = Vec::new();
    let mut fallbacks = Vec::new();
    for call in calls {
        let Some(routing) = &call.routing else {
            representative.extend(response_text(call));
            continue;
        };
        if let Some(audit) = &routing.audit_answer {
            fallbacks.push(audit.clone());
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
    split_rows(dir, "train", |example| prompt_text(&example.prompt))
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
