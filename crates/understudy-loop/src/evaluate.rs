//! The evaluation run: the understudy against the lead on the newest traffic.
//!
//! The reference is the lead's recorded answer on the dataset's test split.
//! Each model version (and a base model zero-shot) answers every test prompt,
//! asked exactly as the gateway asks a promoted understudy
//! ([`Understudy::local`], [`Understudy::attempt`], with the task's labels
//! and timeout from the config) and with as many rows in flight as it
//! answers together, so they are batched as concurrent calls are: label tasks are scored with accuracy,
//! macro-F1, per-label precision/recall and a confusion matrix, generation
//! tasks with exact/normalized match, token F1, ROUGE-L and JSON
//! validity/field match, and agreement with the lead is
//! [`understudy_types::answers_agree`] for both. Every figure has a bootstrap
//! 95 % interval. A call the understudy cannot answer (an error, a prompt
//! longer than its context, a timeout, an answer outside the labels) is one
//! the cascade never serves, as [`understudy_router::judge`] falls back on it.
//! The validation split certifies the cascade threshold (Learn-then-Test,
//! [`certify_threshold`]), which is then judged on test, with what it saves,
//! and the certificate is written into the version's folder
//! ([`crate::calibration`]). Costs: the lead's from the calls it answered,
//! the understudy's from the process CPU time spent answering at a machine
//! price ([`understudy_types::cpu_time_cost`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_eval::bootstrap::DEFAULT_RESAMPLES;
use understudy_eval::calibrate::{cascade_report, coverage_curve, CascadeReport, ScoredAnswer};
use understudy_eval::generation::{generation_report, GenerationReport};
use understudy_eval::labels::{label_report, LabelReport};
use understudy_eval::{bootstrap_mean, bootstrap_quantile, certify_threshold, CascadeOutcome, Certification, Estimate};
use understudy_providers::{AttemptOutcome, ChatRequest, LocalLoader, LocalModelSpec, Understudy};
use understudy_router::{cascade_confidence, FallbackReason};
use understudy_store::{CallFilter, DatasetRecord, ModelVersionRecord, StatusFilter, Store};
use understudy_trainer::prompt_text;
use understudy_types::{answers_agree, cpu_time_cost, ServedBy, TaskKind};

use crate::datasets::{split_rows, task_dataset};
use crate::error::{io, LoopError, Result};

/// Bounds of the default `max_tokens` of an answer.
const MIN_MAX_TOKENS: u64 = 16;
const MAX_MAX_TOKENS: u64 = 1024;

/// The deadline of a task the config does not route: the gateway never asks
/// its understudy, so no timeout of its applies, and eval waits for answers.
pub(crate) const UNROUTED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What a label report shows as the prediction of a call the understudy did
/// not answer.
pub const NO_ANSWER: &str = "(no answer)";

/// What to evaluate, and against what promise.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub task: String,
    /// Model version ids or unique prefixes (default: the task's newest,
    /// unless only `zero_shot` is asked for).
    pub models: Vec<String>,
    /// A dataset id or unique prefix (default: the task's newest).
    pub dataset: Option<String>,
    /// The promise the threshold is certified for (default: the task's
    /// `target_agreement` in the config).
    pub target_agreement: Option<f64>,
    /// The chance that the certified threshold breaks the promise.
    pub delta: f64,
    /// The machine price compute is charged at (default: the config's).
    pub machine_price_per_hour: Option<f64>,
    /// The most tokens an answer may have (default: room for the longest
    /// reference answer).
    pub max_tokens: Option<u64>,
    /// Seed of the bootstrap resampling.
    pub seed: u64,
    /// Also an untuned base model, zero-shot: a path or a local model of the config.
    pub zero_shot: Option<String>,
}

impl EvalRequest {
    /// The task's newest model version, with the defaults.
    pub fn new(task: &str) -> EvalRequest {
        EvalRequest {
            task: task.to_string(),
            models: Vec::new(),
            dataset: None,
            target_agreement: None,
            delta: 0.05,
            machine_price_per_hour: None,
            max_tokens: None,
            seed: 7,
            zero_shot: None,
        }
    }
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum EvalEvent {
    /// A candidate is about to answer the validation and test splits.
    Scoring { name: String, method: String, n_validation: usize, n_test: usize },
}

/// Everything an evaluation found.
pub struct Evaluation {
    pub dataset: DatasetRecord,
    pub lead: LeadFigures,
    pub results: Vec<VersionResult>,
    pub machine_price: f64,
    pub target_agreement: f64,
    pub delta: f64,
    /// The task's labels in the config, which the understudy was held to.
    pub labels: Option<Vec<String>>,
    /// Every test answer of every candidate, one JSON object each.
    pub answers: Vec<Value>,
}

/// Evaluates the candidates `request` names on the task's dataset, certifies
/// each model version's cascade threshold and writes its calibration.
pub async fn evaluate(
    config: &Config,
    store: &Store,
    loader: &dyn LocalLoader,
    request: &EvalRequest,
    on_event: &mut dyn FnMut(EvalEvent),
) -> Result<Evaluation> {
    let task_config = config.tasks.get(&request.task);
    let target_agreement = match (request.target_agreement, task_config) {
        (Some(target), _) => target,
        (None, Some(task)) => task.target_agreement,
        (None, None) => {
            return Err(LoopError::Refused(format!(
                "task `{}` is not in the config, so it has no target agreement to certify: pass --target-agreement",
                request.task
            )))
        }
    };
    let dataset = task_dataset(store, &request.task, request.dataset.as_deref()).await?;
    let machine_price = request.machine_price_per_hour.unwrap_or_else(|| config.machine_price().1);
    let mut candidates: Vec<Candidate> = if request.models.is_empty() && request.zero_shot.is_some() {
        Vec::new()
    } else {
        model_versions(store, request).await?.iter().map(Candidate::of_version).collect()
    };
    if let Some(base) = &request.zero_shot {
        candidates.push(Candidate::zero_shot(config, base)?);
    }
    let test = read_rows(&dataset, "test")?;
    let validation = read_rows(&dataset, "validation")?;
    if test.is_empty() {
        return Err(LoopError::NotFound(format!("dataset {} has an empty test split", dataset.id)));
    }
    let lead = lead_figures(store, &dataset.task, request.seed).await?;
    // The understudy is asked as the gateway asks it: the task's labels and timeout.
    let ask = Ask {
        labels: task_config.and_then(|task| task.labels.clone()),
        timeout: task_config.map_or(UNROUTED_TIMEOUT, |task| task.understudy_timeout),
        max_tokens: request
            .max_tokens
            .unwrap_or_else(|| max_tokens_for(test.iter().chain(&validation).map(|row| row.reference.as_str()))),
    };

    let mut results = Vec::new();
    let mut answers = Vec::new();
    for candidate in &candidates {
        on_event(EvalEvent::Scoring {
            name: candidate.name.clone(),
            method: candidate.method.clone(),
            n_validation: validation.len(),
            n_test: test.len(),
        });
        let understudy = candidate.load(&dataset, loader, machine_price, config)?;
        let scored = ask.score(&understudy, &test).await;
        let validation_scored = ask.score(&understudy, &validation).await;
        for (row, answer) in test.iter().zip(&scored) {
            answers.push(json!({
                "model": candidate.name, "prompt": row.text, "reference": row.reference, "answer": answer.text,
                "confidence": answer.confidence, "agrees": answer.agrees_with(row),
                "fallback": answer.cascade.err().map(FallbackReason::as_str), "error": answer.error,
            }));
        }
        let judged = JudgeSettings { target_agreement, delta: request.delta, seed: request.seed, machine_price };
        results.push(judged.judge(&dataset, &lead, candidate, (&test, &scored), (&validation, &validation_scored))?);
    }
    Ok(Evaluation {
        dataset,
        lead,
        results,
        machine_price,
        target_agreement,
        delta: request.delta,
        labels: ask.labels,
        answers,
    })
}

/// What a model version's judgement depends on besides its answers.
struct JudgeSettings {
    target_agreement: f64,
    delta: f64,
    seed: u64,
    machine_price: f64,
}

impl JudgeSettings {
    /// Scores one candidate's answers, certifies its threshold on
    /// validation, judges it on test, and writes a model version's calibration.
    fn judge(
        &self,
        dataset: &DatasetRecord,
        lead: &LeadFigures,
        candidate: &Candidate,
        (test, scored): (&[Row], &[Answer]),
        (validation, validation_scored): (&[Row], &[Answer]),
    ) -> Result<VersionResult> {
        let seed = self.seed;
        let reference: Vec<String> = test.iter().map(|row| row.reference.clone()).collect();
        let metrics = match dataset.kind {
            TaskKind::Label => {
                let predicted: Vec<String> =
                    scored.iter().map(|answer| answer.text.clone().unwrap_or_else(|| NO_ANSWER.into())).collect();
                Metrics::Label(label_report(&reference, &predicted, DEFAULT_RESAMPLES, seed))
            }
            TaskKind::Generation => {
                let predicted: Vec<String> =
                    scored.iter().map(|answer| answer.text.clone().unwrap_or_default()).collect();
                Metrics::Generation(generation_report(&reference, &predicted, DEFAULT_RESAMPLES, seed))
            }
        };
        let to_scored = |answers: &[Answer], rows: &[Row]| -> Vec<ScoredAnswer> {
            answers.iter().zip(rows).map(|(answer, row)| answer.scored(row)).collect()
        };
        let certification =
            certify_threshold(&to_scored(validation_scored, validation), self.target_agreement, self.delta)?;
        let test_scored = to_scored(scored, test);
        let costs: Vec<f64> =
            scored.iter().map(|answer| cpu_time_cost(answer.cpu_seconds, self.machine_price).dollars()).collect();
        let lead_cost_per_call = lead.speed.cost_per_1k.value / 1000.0;
        let cascade = certification.threshold.map(|threshold| {
            cascade_report(
                &test_scored,
                &costs,
                threshold,
                lead_cost_per_call,
                DEFAULT_RESAMPLES,
                seed.wrapping_add(13),
            )
        });
        let latencies: Vec<f64> = scored.iter().map(|answer| answer.latency_ms).collect();
        let speed = speed_figures(&latencies, &costs, seed.wrapping_add(10));
        let curve = coverage_curve(&test_scored);
        if let Some(path) = &candidate.path {
            let (labels, confusion): (&[String], &[Vec<usize>]) = match &metrics {
                Metrics::Label(report) => (&report.labels, &report.confusion),
                Metrics::Generation(_) => (&[], &[]),
            };
            let plots = crate::calibration::TestPlots { labels, confusion, curve: &curve };
            crate::calibration::write(path, &dataset.id, &certification, cascade.as_ref(), &plots)?;
        }
        let mut fallbacks = BTreeMap::new();
        for reason in scored.iter().filter_map(|answer| answer.cascade.err()) {
            *fallbacks.entry(reason.as_str()).or_insert(0) += 1;
        }
        Ok(VersionResult {
            name: candidate.name.clone(),
            method: candidate.method.clone(),
            n_test: test.len(),
            metrics,
            speed,
            cpu_seconds: scored.iter().map(|answer| answer.cpu_seconds).sum(),
            certification,
            cascade,
            fallbacks,
            curve,
            agrees: scored.iter().zip(test).map(|(answer, row)| answer.agrees_with(row)).collect(),
            scored: test_scored,
        })
    }
}

/// Room for the longest reference answer, with a margin for another
/// tokenizer than the counting one.
pub(crate) fn max_tokens_for<'a>(answers: impl Iterator<Item = &'a str>) -> u64 {
    let longest = answers.map(understudy_providers::tokens::count_text).max().unwrap_or(0);
    (longest * 3 / 2 + 8).clamp(MIN_MAX_TOKENS, MAX_MAX_TOKENS)
}

/// One understudy attempt at one row, timed on the wall clock and on the
/// process's CPU clock.
pub(crate) struct Answer {
    /// The answer's text; `None` when the understudy gave none (an error or a timeout).
    text: Option<String>,
    confidence: Option<f64>,
    /// The confidence the cascade compares with its threshold, or why it
    /// falls back to the lead at every threshold.
    cascade: std::result::Result<f64, FallbackReason>,
    /// Why the understudy gave no answer, when it failed.
    error: Option<String>,
    latency_ms: f64,
    cpu_seconds: f64,
}

impl Answer {
    /// Whether the understudy gave no answer (an error or a timeout).
    pub(crate) fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Whether the understudy's answer agrees with the lead's.
    fn agrees_with(&self, row: &Row) -> bool {
        self.text.as_deref().is_some_and(|text| answers_agree(text, &row.reference))
    }

    /// The answer as the cascade sees it.
    fn scored(&self, row: &Row) -> ScoredAnswer {
        match self.cascade {
            Ok(confidence) => ScoredAnswer { confidence, agrees: self.agrees_with(row) },
            Err(_) => ScoredAnswer::never_served(),
        }
    }
}

/// Latency percentiles and cost per 1,000 calls, each with its interval.
#[derive(Debug, Clone, Copy)]
pub struct SpeedFigures {
    pub p50_ms: Option<Estimate>,
    pub p95_ms: Option<Estimate>,
    pub cost_per_1k: Estimate,
}

fn speed_figures(latencies_ms: &[f64], costs_per_call: &[f64], seed: u64) -> SpeedFigures {
    let per_1k: Vec<f64> = costs_per_call.iter().map(|cost| cost * 1000.0).collect();
    SpeedFigures {
        p50_ms: bootstrap_quantile(latencies_ms, 0.5, DEFAULT_RESAMPLES, 0.95, seed),
        p95_ms: bootstrap_quantile(latencies_ms, 0.95, DEFAULT_RESAMPLES, 0.95, seed.wrapping_add(1)),
        cost_per_1k: bootstrap_mean(&per_1k, DEFAULT_RESAMPLES, 0.95, seed.wrapping_add(2)),
    }
}

/// The lead's speed and cost on the task.
#[derive(Debug, Clone)]
pub struct LeadFigures {
    pub model: String,
    /// Successful calls of the task the lead answered.
    pub n_calls: u64,
    pub speed: SpeedFigures,
}

#[derive(Debug, Clone)]
pub enum Metrics {
    Label(LabelReport),
    Generation(GenerationReport),
}

/// One candidate's figures.
#[derive(Debug, Clone)]
pub struct VersionResult {
    pub name: String,
    pub method: String,
    pub n_test: usize,
    pub metrics: Metrics,
    pub speed: SpeedFigures,
    /// Process CPU time spent answering the test split.
    pub cpu_seconds: f64,
    /// The threshold certified on validation, or why none is.
    pub certification: Certification,
    /// The certified threshold judged on test.
    pub cascade: Option<CascadeReport>,
    /// Test calls the cascade serves at no threshold, by reason.
    pub fallbacks: BTreeMap<&'static str, usize>,
    /// Coverage against agreement at every threshold, on test.
    pub curve: Vec<CascadeOutcome>,
    /// Whether each test row's answer agrees with the lead's, in row order
    /// (the same rows for every candidate of a run, so they pair).
    pub agrees: Vec<bool>,
    /// Each test row as the cascade sees it (confidence, agreement), in row
    /// order: what a cascade at any threshold serves of the test split.
    pub scored: Vec<ScoredAnswer>,
}

impl VersionResult {
    pub fn n_fallback_rows(&self) -> usize {
        self.fallbacks.values().sum()
    }
}

async fn model_versions(store: &Store, request: &EvalRequest) -> Result<Vec<ModelVersionRecord>> {
    if request.models.is_empty() {
        let newest = store.list_model_versions(&request.task).await?.into_iter().next().ok_or_else(|| {
            LoopError::NotFound(format!(
                "task `{}` has no trained model yet; run `understudy train --task {}`",
                request.task, request.task
            ))
        })?;
        return Ok(vec![newest]);
    }
    let mut versions = Vec::new();
    for id in &request.models {
        versions.push(find_model_version(store, id).await?);
    }
    Ok(versions)
}

/// The model version whose id is `id` or starts with it.
pub async fn find_model_version(store: &Store, id: &str) -> Result<ModelVersionRecord> {
    let mut found = store.get_model_version(id).await?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(LoopError::NotFound(format!("no model version `{id}`"))),
        _ => Err(LoopError::Refused(format!("`{id}` is the prefix of more than one model version; give more of it"))),
    }
}

/// One row of a split: the prompt as messages and as the text a classifier
/// reads (for the answers file), and the lead's answer.
struct Row {
    messages: Vec<Value>,
    /// The recorded call's `response_format`, asked again as served.
    response_format: Option<Value>,
    text: String,
    reference: String,
}

fn read_rows(dataset: &DatasetRecord, split: &str) -> Result<Vec<Row>> {
    split_rows(&dataset.path, split, |example| Row {
        text: prompt_text(&example.prompt),
        reference: example.answer_text(),
        messages: example.prompt,
        response_format: example.response_format,
    })
}

/// How every candidate is asked: what a client's call to the gateway would
/// carry (the prompt, its recorded `response_format`, temperature 0, room
/// for the answer), with the task's labels and timeout as the gateway
/// applies them.
pub(crate) struct Ask {
    pub labels: Option<Vec<String>>,
    pub timeout: Duration,
    pub max_tokens: u64,
}

/// CPU time of this process so far, all threads (the engine's and candle's
/// pools included), in seconds.
pub(crate) fn process_cpu_seconds() -> f64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// One call as eval and plan ask it: the prompt's messages and the
/// recorded call's `response_format` (a JSON schema makes the engine jump
/// over the answer's fixed text, as when the call is served).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prompt<'a> {
    pub messages: &'a [Value],
    pub response_format: Option<&'a Value>,
}

impl<'a> Prompt<'a> {
    pub fn of(example: &'a ChatExample) -> Prompt<'a> {
        Prompt { messages: &example.prompt, response_format: example.response_format.as_ref() }
    }
}

impl Ask {
    fn request(&self, prompt: Prompt<'_>) -> ChatRequest {
        let mut body = json!({"messages": prompt.messages, "temperature": 0, "max_tokens": self.max_tokens});
        if let Some(format) = prompt.response_format {
            body["response_format"] = format.clone();
        }
        ChatRequest { body: body.as_object().cloned().unwrap_or_default() }
    }

    /// Every row asked as a served call would be, with as many in flight as
    /// the understudy answers together ([`Understudy::max_concurrency`]: a
    /// classifier's batch; the engine's `n_seq_max`), so rows are batched the
    /// way concurrent calls are; answers come back in row order. A row the
    /// understudy cannot answer is a fallback, never an error of eval. The
    /// process CPU time of the whole split is shared among its rows in
    /// proportion to their latency (rows answered together take about the
    /// same time and split their pass's cost).
    async fn score(&self, understudy: &Understudy, rows: &[Row]) -> Vec<Answer> {
        let prompts: Vec<Prompt<'_>> = rows
            .iter()
            .map(|row| Prompt { messages: &row.messages, response_format: row.response_format.as_ref() })
            .collect();
        self.score_prompts(understudy, &prompts).await
    }

    /// [`Ask::score`] over prompts.
    pub(crate) async fn score_prompts(&self, understudy: &Understudy, prompts: &[Prompt<'_>]) -> Vec<Answer> {
        use futures::StreamExt;

        let in_flight = understudy.max_concurrency().max(1);
        let cpu_started = process_cpu_seconds();
        let attempts: Vec<_> = futures::stream::iter(prompts)
            .map(|prompt| understudy.attempt(self.request(*prompt), self.timeout, self.labels.as_deref()))
            .buffered(in_flight)
            .collect()
            .await;
        let cpu_seconds = (process_cpu_seconds() - cpu_started).max(0.0);
        let total_ms: f64 = attempts.iter().map(|attempt| attempt.latency_ms).sum();
        attempts
            .into_iter()
            .map(|attempt| {
                let error = match &attempt.outcome {
                    AttemptOutcome::Failed(error) => Some(error.clone()),
                    AttemptOutcome::TimedOut => Some(format!("no answer within {:?}", self.timeout)),
                    AttemptOutcome::Answered { .. } => None,
                };
                let share = if total_ms > 0.0 { attempt.latency_ms / total_ms } else { 1.0 / prompts.len() as f64 };
                Answer {
                    text: attempt.content().map(str::to_string),
                    confidence: attempt.confidence(),
                    cascade: cascade_confidence(attempt.router_attempt()),
                    error,
                    latency_ms: attempt.latency_ms,
                    cpu_seconds: cpu_seconds * share,
                }
            })
            .collect()
    }
}

/// A model to evaluate and how to load it.
struct Candidate {
    name: String,
    method: String,
    /// A model version's folder, where its calibration is written.
    path: Option<String>,
    spec: LocalModelSpec,
}

impl Candidate {
    /// A model version, loaded as the gateway loads a promoted one: from its
    /// folder, which the loader recognizes (a classifier, or a LoRA adapter
    /// on its base model).
    fn of_version(version: &ModelVersionRecord) -> Candidate {
        let spec = LocalModelSpec {
            name: version.id.clone(),
            path: version.path.clone(),
            adapter: None,
            weights: None,
            max_batch: None,
            speculative_draft: None,
        };
        Candidate { name: version.id.clone(), method: version.method.clone(), path: Some(version.path.clone()), spec }
    }

    /// An untuned base model: a local model of the config, or a path.
    fn zero_shot(config: &Config, base: &str) -> Result<Candidate> {
        let path = match config.models.get(base).and_then(|model| model.path.clone()) {
            Some(path) => path,
            None => std::path::absolute(base).map_err(io(base))?.display().to_string(),
        };
        let name =
            format!("zero-shot:{}", Path::new(&path).file_name().map_or(path.clone(), |n| n.to_string_lossy().into()));
        let spec = LocalModelSpec {
            name: name.clone(),
            path,
            adapter: None,
            weights: None,
            max_batch: None,
            speculative_draft: None,
        };
        Ok(Candidate { name, method: "zero-shot".into(), path: None, spec })
    }

    /// Loads the model as the gateway would serve it: a classifier batches
    /// up to the config's `max_batch` concurrent calls, a causal LM drafts
    /// up to its `speculative_draft` tokens.
    fn load(
        &self,
        dataset: &DatasetRecord,
        loader: &dyn LocalLoader,
        machine_price: f64,
        config: &Config,
    ) -> Result<Understudy> {
        if self.method == "classifier" && dataset.kind != TaskKind::Label {
            return Err(LoopError::Refused(format!(
                "model version {} is a classifier ({}), which only answers label tasks, but dataset {} of task `{}` \
                 is a generation task: evaluate a LoRA version (`understudy train --task {} --method lora`) or a base \
                 model with --zero-shot",
                self.name, self.method, dataset.id, dataset.task, dataset.task
            )));
        }
        let spec = LocalModelSpec {
            max_batch: Some(config.local_max_batch()),
            speculative_draft: Some(config.local_speculative_draft()),
            ..self.spec.clone()
        };
        Understudy::local(&spec, loader, "local", machine_price)
            .map_err(|source| LoopError::Load { name: self.name.clone(), source })
    }
}

/// The lead's speed and cost from the task's successful calls it answered:
/// calls the understudy served are left out, and the understudy's compute is
/// taken off the cost of calls it was asked first. Only calls where the lead
/// was asked directly count for latency (imported calls carry none, and a
/// fallback's includes the understudy's attempt).
pub(crate) async fn lead_figures(store: &Store, task: &str, seed: u64) -> Result<LeadFigures> {
    let filter = CallFilter { task: Some(task.to_string()), status: Some(StatusFilter::Ok), ..CallFilter::default() };
    let calls: Vec<_> = store
        .list_calls(&filter)
        .await?
        .into_iter()
        .filter(|call| call.routing.as_ref().is_none_or(|routing| routing.served_by == ServedBy::Lead))
        .collect();
    let costs: Vec<f64> = calls.iter().map(|call| call.lead_cost().dollars()).collect();
    let latencies: Vec<f64> = calls
        .iter()
        .filter(|call| call.latency_ms > 0.0)
        .filter(|call| call.routing.as_ref().is_none_or(|routing| routing.fallback_reason.is_none()))
        .map(|call| call.latency_ms)
        .collect();
    let model = calls.last().map(|call| call.model.clone()).unwrap_or_else(|| "lead".into());
    Ok(LeadFigures {
        model,
        n_calls: calls.len() as u64,
        speed: speed_figures(&latencies, &costs, seed.wrapping_add(20)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_asked_with_its_recorded_response_format() {
        let ask = Ask { labels: None, timeout: Duration::from_secs(1), max_tokens: 7 };
        let messages = vec![json!({"role": "user", "content": "q"})];
        let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}});
        let asked = ask.request(Prompt { messages: &messages, response_format: Some(&format) });
        assert_eq!(asked.body.get("response_format"), Some(&format));
        assert_eq!(asked.body.get("max_tokens"), Some(&json!(7)));
        assert_eq!(asked.body.get("messages"), Some(&json!(messages)));
        let plain = ask.request(Prompt { messages: &messages, response_format: None });
        assert!(!plain.body.contains_key("response_format"));
    }
}
