//! `understudy eval`: the understudy against the lead on the newest traffic.
//!
//! The reference is the lead's recorded answer on the dataset's test split.
//! Each model version (and a base model zero-shot) answers every test prompt
//! on its own, asked exactly as the gateway asks a promoted understudy
//! ([`Understudy::local`], [`Understudy::attempt`], with the task's labels
//! and timeout from the config): label tasks are scored with accuracy,
//! macro-F1, per-label precision/recall and a confusion matrix, generation
//! tasks with exact/normalized match, token F1, ROUGE-L and JSON
//! validity/field match, and agreement with the lead is
//! [`understudy_types::answers_agree`] for both. Every figure has a bootstrap
//! 95 % interval. A call the understudy cannot answer (an error, a prompt
//! longer than its context, a timeout, an answer outside the labels) is one
//! the cascade never serves, as [`understudy_router::judge`] falls back on it.
//! The validation split certifies the cascade threshold (Learn-then-Test,
//! [`certify_threshold`]), which is then judged on test, with what it saves.
//! Costs: the lead's from the calls it answered, the understudy's from the
//! process CPU time spent answering at a machine price.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_datasets::files::read_split;
use understudy_datasets::jsonl::ChatExample;
use understudy_eval::bootstrap::DEFAULT_RESAMPLES;
use understudy_eval::calibrate::{cascade_report, coverage_curve, CascadeReport, ScoredAnswer};
use understudy_eval::generation::{generation_report, GenerationReport};
use understudy_eval::labels::{label_report, LabelReport};
use understudy_eval::{bootstrap_mean, bootstrap_quantile, certify_threshold, CascadeOutcome, Certification, Estimate};
use understudy_providers::{AttemptOutcome, ChatRequest, LocalModelSpec, Understudy};
use understudy_router::{cascade_confidence, FallbackReason};
use understudy_store::{CallFilter, DatasetRecord, ModelVersionRecord, StatusFilter, Store};
use understudy_trainer::prompt_text;
use understudy_types::{answers_agree, ServedBy, TaskKind};

use crate::cli::EvalCommand;
use crate::dataset::task_dataset;
use crate::output::{load_config, open_store, table};

/// The file in a model version's folder that keeps its certified threshold.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// Bounds of the default `max_tokens` of an answer.
const MIN_MAX_TOKENS: u64 = 16;
const MAX_MAX_TOKENS: u64 = 1024;

/// The deadline of a task the config does not route: the gateway never asks
/// its understudy, so no timeout of its applies, and eval waits for answers.
const UNROUTED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What a label report shows as the prediction of a call the understudy did
/// not answer.
const NO_ANSWER: &str = "(no answer)";

pub async fn run(config_path: &Path, command: EvalCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let task_config = config.tasks.get(&command.task);
    let target_agreement = match (command.target_agreement, task_config) {
        (Some(target), _) => target,
        (None, Some(task)) => task.target_agreement,
        (None, None) => anyhow::bail!(
            "task `{}` is not in the config, so it has no target agreement to certify: pass --target-agreement",
            command.task
        ),
    };
    let store = open_store(&config).await?;
    let dataset = task_dataset(&store, &command.task, command.dataset.as_deref()).await?;
    let machine_price = command.machine_price_per_hour.unwrap_or_else(|| crate::report::machine_price(&config));
    let mut candidates: Vec<Candidate> = if command.model.is_empty() && command.zero_shot.is_some() {
        Vec::new()
    } else {
        model_versions(&store, &command).await?.iter().map(Candidate::of_version).collect()
    };
    if let Some(base) = &command.zero_shot {
        let path = match config.models.get(base).and_then(|model| model.path.clone()) {
            Some(path) => path,
            None => std::path::absolute(base)?.display().to_string(),
        };
        let name =
            format!("zero-shot:{}", Path::new(&path).file_name().map_or(path.clone(), |n| n.to_string_lossy().into()));
        let spec = LocalModelSpec { name: name.clone(), path, adapter: None, weights: None };
        candidates.push(Candidate { name, method: "zero-shot".into(), path: None, spec });
    }
    let test = read_rows(&dataset, "test")?;
    let validation = read_rows(&dataset, "validation")?;
    anyhow::ensure!(!test.is_empty(), "dataset {} has an empty test split", dataset.id);
    let lead = lead_figures(&store, &dataset.task, command.seed).await?;
    // The understudy is asked as the gateway asks it: the task's labels and timeout.
    let ask = Ask {
        labels: task_config.and_then(|task| task.labels.clone()),
        timeout: task_config.map_or(UNROUTED_TIMEOUT, |task| task.understudy_timeout),
        max_tokens: command.max_tokens.unwrap_or_else(|| default_max_tokens(test.iter().chain(&validation))),
    };

    let mut results = Vec::new();
    let mut answer_lines = String::new();
    for candidate in &candidates {
        eprintln!(
            "scoring {} ({}) on {} validation and {} test rows",
            candidate.name,
            candidate.method,
            validation.len(),
            test.len()
        );
        let understudy = candidate.load(&dataset, machine_price)?;
        let scored = ask.score(&understudy, &test).await;
        let validation_scored = ask.score(&understudy, &validation).await;
        for (row, answer) in test.iter().zip(&scored) {
            let line = json!({
                "model": candidate.name, "prompt": row.text, "reference": row.reference, "answer": answer.text,
                "confidence": answer.confidence, "agrees": answer.agrees_with(row),
                "fallback": answer.cascade.err().map(FallbackReason::as_str), "error": answer.error,
            });
            answer_lines.push_str(&format!("{line}\n"));
        }
        let judged = JudgeSettings { target_agreement, delta: command.delta, seed: command.seed, machine_price };
        results.push(judged.judge(&dataset, &lead, candidate, (&test, &scored), (&validation, &validation_scored))?);
    }
    store.close().await;

    if let Some(path) = &command.answers {
        std::fs::write(path, answer_lines).with_context(|| format!("cannot write {}", path.display()))?;
    }

    let report = Report {
        dataset: &dataset,
        lead: &lead,
        results: &results,
        machine_price,
        target_agreement,
        delta: command.delta,
        labels: ask.labels.as_deref(),
    };
    if let Some(path) = &command.html {
        std::fs::write(path, crate::html::eval_page(&dataset.task, &report.text(), &results_for_html(&results)))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if command.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
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
    ) -> anyhow::Result<VersionResult> {
        let seed = self.seed;
        let metrics = match dataset.kind {
            TaskKind::Label => {
                let reference: Vec<String> = test.iter().map(|row| row.reference.clone()).collect();
                let predicted: Vec<String> =
                    scored.iter().map(|answer| answer.text.clone().unwrap_or_else(|| NO_ANSWER.into())).collect();
                Metrics::Label(label_report(&reference, &predicted, DEFAULT_RESAMPLES, seed))
            }
            TaskKind::Generation => {
                let reference: Vec<String> = test.iter().map(|row| row.reference.clone()).collect();
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
        let costs: Vec<f64> = scored.iter().map(|answer| answer.cpu_seconds * self.machine_price / 3600.0).collect();
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
        if let Some(path) = &candidate.path {
            let calibration = calibration_json(&dataset.id, &certification, cascade.as_ref());
            std::fs::write(Path::new(path).join(CALIBRATION_FILE), calibration.to_string())
                .with_context(|| format!("cannot write the calibration into {path}"))?;
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
            curve: coverage_curve(&test_scored),
        })
    }
}

/// What `calibration.json` holds: the certificate, and how its threshold did on test.
fn calibration_json(dataset: &str, certification: &Certification, cascade: Option<&CascadeReport>) -> Value {
    json!({
        "dataset": dataset,
        "certified": certification.threshold.is_some(),
        "threshold": certification.threshold,
        "target_agreement": certification.target_agreement,
        "delta": certification.delta,
        "n_validation": certification.n_validation,
        "n_served": certification.n_served,
        "n_errors": certification.n_errors,
        "risk_upper_bound": certification.risk_upper_bound,
        "more_calls_needed": certification.more_calls_needed,
        "test_coverage": cascade.map(|report| report.coverage.value),
        "test_served_agreement": cascade.map(|report| report.served_agreement.value),
        "test_overall_agreement": cascade.map(|report| report.overall_agreement.value),
    })
}

/// What `understudy eval` certified for a model version, read back from its folder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Calibration {
    /// No calibration file (the version was never evaluated), or one that is
    /// unreadable or predates certification.
    Missing,
    /// Evaluated, and no threshold could be certified.
    Uncertified {
        target_agreement: f64,
        delta: f64,
        n_validation: u64,
        more_calls_needed: Option<u64>,
    },
    Certified {
        threshold: f64,
        target_agreement: f64,
        delta: f64,
    },
}

impl Calibration {
    /// The calibration `eval` wrote into the model version folder `dir`.
    pub(crate) fn read(dir: &str) -> Calibration {
        let Some(value) = std::fs::read_to_string(Path::new(dir).join(CALIBRATION_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        else {
            return Calibration::Missing;
        };
        let number = |key: &str| value.get(key).and_then(Value::as_f64);
        let (Some(certified), Some(target_agreement), Some(delta)) =
            (value.get("certified").and_then(Value::as_bool), number("target_agreement"), number("delta"))
        else {
            return Calibration::Missing;
        };
        match (certified, number("threshold")) {
            (true, Some(threshold)) => Calibration::Certified { threshold, target_agreement, delta },
            _ => Calibration::Uncertified {
                target_agreement,
                delta,
                n_validation: value.get("n_validation").and_then(Value::as_u64).unwrap_or(0),
                more_calls_needed: value.get("more_calls_needed").and_then(Value::as_u64),
            },
        }
    }

    pub(crate) fn certified_threshold(&self) -> Option<f64> {
        match self {
            Calibration::Certified { threshold, .. } => Some(*threshold),
            _ => None,
        }
    }
}

/// Room for the longest reference answer, with a margin for another
/// tokenizer than the counting one.
fn default_max_tokens<'a>(rows: impl Iterator<Item = &'a Row>) -> u64 {
    let longest = rows.map(|row| understudy_providers::tokens::count_text(&row.reference)).max().unwrap_or(0);
    (longest * 3 / 2 + 8).clamp(MIN_MAX_TOKENS, MAX_MAX_TOKENS)
}

/// One understudy attempt at one row, timed on the wall clock and on the
/// process's CPU clock.
struct Answer {
    /// The answer's text; `None` when the understudy gave none (an error or a timeout).
    text: Option<String>,
    confidence: Option<f64>,
    /// The confidence the cascade compares with its threshold, or why it
    /// falls back to the lead at every threshold.
    cascade: Result<f64, FallbackReason>,
    /// Why the understudy gave no answer, when it failed.
    error: Option<String>,
    latency_ms: f64,
    cpu_seconds: f64,
}

impl Answer {
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
#[derive(Clone, Copy)]
struct SpeedFigures {
    p50_ms: Option<Estimate>,
    p95_ms: Option<Estimate>,
    cost_per_1k: Estimate,
}

fn speed_figures(latencies_ms: &[f64], costs_per_call: &[f64], seed: u64) -> SpeedFigures {
    let per_1k: Vec<f64> = costs_per_call.iter().map(|cost| cost * 1000.0).collect();
    SpeedFigures {
        p50_ms: bootstrap_quantile(latencies_ms, 0.5, DEFAULT_RESAMPLES, 0.95, seed),
        p95_ms: bootstrap_quantile(latencies_ms, 0.95, DEFAULT_RESAMPLES, 0.95, seed.wrapping_add(1)),
        cost_per_1k: bootstrap_mean(&per_1k, DEFAULT_RESAMPLES, 0.95, seed.wrapping_add(2)),
    }
}

struct LeadFigures {
    model: String,
    /// Successful calls of the task the lead answered.
    n_calls: u64,
    speed: SpeedFigures,
}

enum Metrics {
    Label(LabelReport),
    Generation(GenerationReport),
}

struct VersionResult {
    name: String,
    method: String,
    n_test: usize,
    metrics: Metrics,
    speed: SpeedFigures,
    /// Process CPU time spent answering the test split.
    cpu_seconds: f64,
    /// The threshold certified on validation, or why none is.
    certification: Certification,
    /// The certified threshold judged on test.
    cascade: Option<CascadeReport>,
    /// Test calls the cascade serves at no threshold, by reason.
    fallbacks: BTreeMap<&'static str, usize>,
    /// Coverage against agreement at every threshold, on test.
    curve: Vec<CascadeOutcome>,
}

impl VersionResult {
    fn n_fallback_rows(&self) -> usize {
        self.fallbacks.values().sum()
    }
}

async fn model_versions(store: &Store, command: &EvalCommand) -> anyhow::Result<Vec<ModelVersionRecord>> {
    if command.model.is_empty() {
        let newest = store.list_model_versions(&command.task).await?.into_iter().next().with_context(|| {
            format!("task `{}` has no trained model yet; run `understudy train --task {}`", command.task, command.task)
        })?;
        return Ok(vec![newest]);
    }
    let mut versions = Vec::new();
    for id in &command.model {
        let mut found = store.get_model_version(id).await?;
        match found.len() {
            1 => versions.push(found.remove(0)),
            0 => anyhow::bail!("no model version `{id}`"),
            _ => anyhow::bail!("`{id}` is the prefix of more than one model version; give more of it"),
        }
    }
    Ok(versions)
}

/// One row of a split: the prompt as messages and as the text a classifier
/// reads (for the answers file), and the lead's answer.
struct Row {
    messages: Vec<Value>,
    text: String,
    reference: String,
}

fn read_rows(dataset: &DatasetRecord, split: &str) -> anyhow::Result<Vec<Row>> {
    let dir = Path::new(&dataset.path);
    read_split(dir, split)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let example = ChatExample::parse(line).map_err(|error| anyhow::anyhow!("{}: {error}", dir.display()))?;
            Ok(Row { text: prompt_text(&example.prompt), reference: example.answer_text(), messages: example.prompt })
        })
        .collect()
}

/// How every candidate is asked: what a client's call to the gateway would
/// carry (the prompt, temperature 0, room for the answer), with the task's
/// labels and timeout as the gateway applies them.
struct Ask {
    labels: Option<Vec<String>>,
    timeout: Duration,
    max_tokens: u64,
}

/// CPU time of this process so far, all threads (the engine's and candle's
/// pools included), in seconds.
fn process_cpu_seconds() -> f64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

impl Ask {
    fn request(&self, messages: &[Value]) -> ChatRequest {
        let body = json!({"messages": messages, "temperature": 0, "max_tokens": self.max_tokens});
        ChatRequest { body: body.as_object().cloned().unwrap_or_default() }
    }

    /// Each row answered on its own, as a served call would be, and timed. A
    /// row the understudy cannot answer is a fallback, never an error of eval.
    async fn score(&self, understudy: &Understudy, rows: &[Row]) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(rows.len());
        for row in rows {
            let cpu_started = process_cpu_seconds();
            let attempt = understudy.attempt(self.request(&row.messages), self.timeout, self.labels.as_deref()).await;
            let cpu_seconds = (process_cpu_seconds() - cpu_started).max(0.0);
            let error = match &attempt.outcome {
                AttemptOutcome::Failed(error) => Some(error.clone()),
                AttemptOutcome::TimedOut => Some(format!("no answer within {:?}", self.timeout)),
                AttemptOutcome::Answered { .. } => None,
            };
            answers.push(Answer {
                text: attempt.content().map(str::to_string),
                confidence: attempt.confidence(),
                cascade: cascade_confidence(attempt.router_attempt()),
                error,
                latency_ms: attempt.latency_ms,
                cpu_seconds,
            });
        }
        answers
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
        let spec =
            LocalModelSpec { name: version.id.clone(), path: version.path.clone(), adapter: None, weights: None };
        Candidate { name: version.id.clone(), method: version.method.clone(), path: Some(version.path.clone()), spec }
    }

    fn load(&self, dataset: &DatasetRecord, machine_price: f64) -> anyhow::Result<Understudy> {
        anyhow::ensure!(
            self.method != "classifier" || dataset.kind == TaskKind::Label,
            "model version {} is a classifier ({}), which only answers label tasks, but dataset {} of task `{}` is a \
             generation task: evaluate a LoRA version (`understudy train --task {} --method lora`) or a base model \
             with --zero-shot",
            self.name,
            self.method,
            dataset.id,
            dataset.task,
            dataset.task
        );
        Understudy::local(&self.spec, &understudy_local::Loader, "local", machine_price)
            .with_context(|| format!("cannot load {}", self.name))
    }
}

/// The lead's speed and cost from the task's successful calls it answered:
/// calls the understudy served are left out, and the understudy's compute is
/// taken off the cost of calls it was asked first. Only calls where the lead
/// was asked directly count for latency (imported calls carry none, and a
/// fallback's includes the understudy's attempt).
async fn lead_figures(store: &Store, task: &str, seed: u64) -> anyhow::Result<LeadFigures> {
    let filter = CallFilter { task: Some(task.to_string()), status: Some(StatusFilter::Ok), ..CallFilter::default() };
    let calls: Vec<_> = store
        .list_calls(&filter)
        .await?
        .into_iter()
        .filter(|call| call.routing.as_ref().is_none_or(|routing| routing.served_by == ServedBy::Lead))
        .collect();
    let costs: Vec<f64> = calls
        .iter()
        .map(|call| {
            call.cost.dollars() - call.routing.as_ref().map_or(0.0, |routing| routing.understudy_cost.dollars())
        })
        .collect();
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

fn results_for_html(results: &[VersionResult]) -> Vec<crate::html::ModelPlots<'_>> {
    results
        .iter()
        .map(|result| {
            let (labels, confusion): (&[String], &[Vec<usize>]) = match &result.metrics {
                Metrics::Label(report) => (&report.labels, &report.confusion),
                Metrics::Generation(_) => (&[], &[]),
            };
            crate::html::ModelPlots {
                name: &result.name,
                labels,
                confusion,
                curve: &result.curve,
                chosen: result.cascade.map(|report| report.outcome()),
            }
        })
        .collect()
}

fn estimate_json(estimate: &Estimate) -> Value {
    json!({"value": estimate.value, "ci95": [estimate.interval.low, estimate.interval.high]})
}

fn optional_estimate_json(estimate: Option<&Estimate>) -> Value {
    estimate.map_or(Value::Null, estimate_json)
}

fn estimate_text(estimate: &Estimate) -> String {
    format!("{:.4} [{:.4}, {:.4}]", estimate.value, estimate.interval.low, estimate.interval.high)
}

/// A figure with its interval, scaled (100 for percent) and with `decimals`.
fn scaled_text(estimate: &Estimate, scale: f64, decimals: usize) -> String {
    format!(
        "{:.decimals$} [{:.decimals$}, {:.decimals$}]",
        estimate.value * scale,
        estimate.interval.low * scale,
        estimate.interval.high * scale
    )
}

fn money_text(estimate: &Estimate) -> String {
    format!("${}", scaled_text(estimate, 1.0, 4))
}

fn speed_json(speed: &SpeedFigures) -> Value {
    json!({
        "latency_p50_ms": optional_estimate_json(speed.p50_ms.as_ref()),
        "latency_p95_ms": optional_estimate_json(speed.p95_ms.as_ref()),
        "cost_per_1k": estimate_json(&speed.cost_per_1k),
    })
}

fn speed_cells(speed: &SpeedFigures) -> [String; 3] {
    let latency = |estimate: Option<Estimate>| estimate.map_or("-".into(), |estimate| scaled_text(&estimate, 1.0, 1));
    [latency(speed.p50_ms), latency(speed.p95_ms), money_text(&speed.cost_per_1k)]
}

/// Everything `eval` prints.
struct Report<'a> {
    dataset: &'a DatasetRecord,
    lead: &'a LeadFigures,
    results: &'a [VersionResult],
    machine_price: f64,
    target_agreement: f64,
    delta: f64,
    /// The task's labels in the config, which the understudy was held to.
    labels: Option<&'a [String]>,
}

/// The figures of a generation report, in table order, with their names.
fn generation_figures(report: &GenerationReport) -> Vec<(&'static str, Estimate)> {
    let mut figures = vec![
        ("exact_match", report.exact_match),
        ("normalized_match", report.normalized_match),
        ("token_f1", report.token_f1),
        ("rouge_l", report.rouge_l),
    ];
    if let Some(json) = &report.json {
        figures.push(("json_validity", json.validity));
        figures.push(("json_field_match", json.field_match));
    }
    figures
}

impl Report<'_> {
    fn json(&self) -> Value {
        let lead = json!({"model": self.lead.model, "answered_calls": self.lead.n_calls});
        let mut lead = lead.as_object().cloned().unwrap_or_default();
        lead.extend(speed_json(&self.lead.speed).as_object().cloned().unwrap_or_default());
        json!({
            "task": self.dataset.task,
            "dataset": self.dataset.id,
            "kind": self.dataset.kind.as_str(),
            "n_test": self.results.first().map_or(0, |result| result.n_test),
            "machine_price_per_hour": self.machine_price,
            "target_agreement": self.target_agreement,
            "delta": self.delta,
            "labels": self.labels,
            "lead": lead,
            "models": self.results.iter().map(|result| self.model_json(result)).collect::<Vec<_>>(),
        })
    }

    fn model_json(&self, result: &VersionResult) -> Value {
        let mut object = serde_json::Map::new();
        object.insert("model_version".into(), json!(result.name));
        object.insert("method".into(), json!(result.method));
        object.insert("cpu_seconds".into(), json!(result.cpu_seconds));
        match &result.metrics {
            Metrics::Label(report) => {
                object.insert("accuracy".into(), estimate_json(&report.accuracy));
                object.insert("macro_f1".into(), estimate_json(&report.macro_f1));
                let per_label = report.per_label.iter().map(|metrics| {
                    json!({
                        "label": metrics.label, "precision": estimate_json(&metrics.precision),
                        "recall": estimate_json(&metrics.recall), "f1": estimate_json(&metrics.f1),
                        "support": metrics.support,
                    })
                });
                object.insert("per_label".into(), Value::Array(per_label.collect()));
                object.insert("labels".into(), json!(report.labels));
                object.insert("confusion".into(), json!(report.confusion));
            }
            Metrics::Generation(report) => {
                for (name, estimate) in generation_figures(report) {
                    object.insert(name.into(), estimate_json(&estimate));
                }
                object.insert("json_answers".into(), json!(report.json.is_some()));
            }
        }
        object.extend(speed_json(&result.speed).as_object().cloned().unwrap_or_default());
        object.insert("n_fallback_rows".into(), json!(result.n_fallback_rows()));
        object.insert("fallback_reasons".into(), json!(result.fallbacks));
        let cascade = result.cascade.as_ref();
        let figure = |pick: fn(&CascadeReport) -> Estimate| optional_estimate_json(cascade.map(pick).as_ref());
        let certification = &result.certification;
        object.insert(
            "cascade".into(),
            json!({
                "target_agreement": certification.target_agreement,
                "delta": certification.delta,
                "certified": certification.threshold.is_some(),
                "threshold": certification.threshold,
                "n_validation": certification.n_validation,
                "validation_served": certification.n_served,
                "validation_errors": certification.n_errors,
                "p_value": certification.p_value,
                "risk_upper_bound": certification.risk_upper_bound,
                "validation_coverage": certification.coverage(),
                "min_served": certification.min_served,
                "more_calls_needed": certification.more_calls_needed,
                "coverage": figure(|report| report.coverage),
                "served_agreement": figure(|report| report.served_agreement),
                "overall_agreement": figure(|report| report.overall_agreement),
                "lead_cost_avoided_per_1k": figure(|report| report.lead_cost_avoided_per_1k),
                "understudy_cost_per_1k": figure(|report| report.understudy_cost_per_1k),
                "net_saved_per_1k": figure(|report| report.net_saved_per_1k),
                "net_saved_share": figure(|report| report.net_saved_share),
            }),
        );
        Value::Object(object)
    }

    fn text(&self) -> String {
        let n_test = self.results.first().map_or(0, |result| result.n_test);
        let mut text = format!(
            "task `{}`, dataset {} ({}): {n_test} test calls (the newest), lead answers as reference; \
             understudy compute at ${}/hour of CPU time\n\n",
            self.dataset.task,
            self.dataset.id,
            self.dataset.kind.as_str(),
            self.machine_price
        );
        text.push_str(&self.summary_table());
        if self.dataset.kind == TaskKind::Label && self.labels.is_none() {
            text.push_str(&format!(
                "note: task `{}` lists no `labels` in the config, so the gateway (and this eval) lets a causal LM \
                 answer freely; list them to have it decode only a label\n",
                self.dataset.task
            ));
        }
        for result in self.results {
            if let Metrics::Label(report) = &result.metrics {
                text.push_str(&per_label_text(&result.name, report));
            }
            text.push_str(&fallback_text(result));
            text.push_str(&self.cascade_text(result));
        }
        text
    }

    /// One row per model: quality figures, then latency and cost.
    fn summary_table(&self) -> String {
        let quality_names: Vec<&str> = match self.results.first().map(|result| &result.metrics) {
            Some(Metrics::Generation(report)) => generation_figures(report).iter().map(|(name, _)| *name).collect(),
            _ => vec!["accuracy", "macro_f1"],
        };
        let mut header: Vec<String> = quality_names.iter().map(|name| format!("{name} [95% CI]")).collect();
        header.insert(0, "model".into());
        header.extend(["p50 ms".into(), "p95 ms".into(), "per 1k calls".into()]);
        let mut lead_row = vec![format!("lead ({}, {} calls)", self.lead.model, self.lead.n_calls)];
        lead_row.extend(quality_names.iter().map(|_| "1 (reference)".to_string()));
        lead_row.extend(speed_cells(&self.lead.speed));
        let mut rows = vec![lead_row];
        for result in self.results {
            let mut row = vec![format!("{} ({})", result.name, result.method)];
            let quality: Vec<Estimate> = match &result.metrics {
                Metrics::Label(report) => vec![report.accuracy, report.macro_f1],
                Metrics::Generation(report) => generation_figures(report).into_iter().map(|(_, e)| e).collect(),
            };
            row.extend(quality.iter().map(estimate_text));
            row.resize(quality_names.len() + 1, "-".into());
            row.extend(speed_cells(&result.speed));
            rows.push(row);
        }
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(&header, &rows)
    }

    fn cascade_text(&self, result: &VersionResult) -> String {
        let certification = &result.certification;
        let (target, delta) = (certification.target_agreement, certification.delta);
        let Some(report) = &result.cascade else {
            let more = match certification.more_calls_needed {
                Some(more) => format!("about {more} more labelled calls would be needed to certify one"),
                None => "at the disagreement rates seen, no amount of labelled calls would certify one".to_string(),
            };
            return format!(
                "{}: cascade NOT certified: no threshold can be certified at target agreement {target} with delta \
                 {delta} on {} validation calls; {more}. A cascade would have the lead keep every call; the shadow \
                 policy remains available (`understudy promote --task {} --policy shadow`), scoring the understudy \
                 on live traffic while the lead serves\n",
                result.name, certification.n_validation, self.dataset.task
            );
        };
        let bound = certification
            .agreement_lower_bound()
            .map_or(String::new(), |bound| format!(", agreement at least {:.4} at confidence {}", bound, 1.0 - delta));
        format!(
            "{}: cascade certified at threshold {:.4} for target agreement {target} with delta {delta}: with \
             probability at least {} its served answers agree with the lead at least {target} of the time \
             (validation: {} of {} calls served, {} disagreeing{bound}). On test [95% CI]:\n  \
             the understudy serves {}% of calls, agreeing with the lead on {}% of them; overall agreement {}%\n  \
             per 1k calls: lead cost avoided {}, understudy compute {}, net saved {} ({}% of the lead's {})\n",
            result.name,
            report.threshold,
            1.0 - delta,
            certification.n_served,
            certification.n_validation,
            certification.n_errors,
            scaled_text(&report.coverage, 100.0, 1),
            scaled_text(&report.served_agreement, 100.0, 1),
            scaled_text(&report.overall_agreement, 100.0, 1),
            money_text(&report.lead_cost_avoided_per_1k),
            money_text(&report.understudy_cost_per_1k),
            money_text(&report.net_saved_per_1k),
            scaled_text(&report.net_saved_share, 100.0, 1),
            money_text(&self.lead.speed.cost_per_1k),
        )
    }
}

/// The test calls the understudy could not answer, which every policy hands
/// back to the lead (and a cascade, those answered without a confidence).
fn fallback_text(result: &VersionResult) -> String {
    if result.fallbacks.is_empty() {
        return String::new();
    }
    let reasons: Vec<String> = result.fallbacks.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    format!(
        "{}: {} of {} test calls fall back to the lead at every threshold ({}); see --answers for each error\n",
        result.name,
        result.n_fallback_rows(),
        result.n_test,
        reasons.join(", ")
    )
}

fn per_label_text(name: &str, report: &LabelReport) -> String {
    let mut text = format!("\n{name}: per label [95% CI]\n");
    let label_rows: Vec<Vec<String>> = report
        .per_label
        .iter()
        .map(|metrics| {
            vec![
                metrics.label.clone(),
                scaled_text(&metrics.precision, 1.0, 3),
                scaled_text(&metrics.recall, 1.0, 3),
                scaled_text(&metrics.f1, 1.0, 3),
                metrics.support.to_string(),
            ]
        })
        .collect();
    text.push_str(&table(&["label", "precision", "recall", "f1", "support"], &label_rows));
    text.push_str("confusion (rows: lead, columns: understudy)\n");
    let confusion_rows: Vec<Vec<String>> = report
        .labels
        .iter()
        .zip(&report.confusion)
        .map(|(label, counts)| std::iter::once(label.clone()).chain(counts.iter().map(usize::to_string)).collect())
        .collect();
    let mut header = vec![""];
    header.extend(report.labels.iter().map(String::as_str));
    text.push_str(&table(&header, &confusion_rows));
    text
}
