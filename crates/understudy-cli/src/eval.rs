//! `understudy eval`: the understudy against the lead on the newest traffic.
//!
//! The reference is the lead's recorded answer on the dataset's test split.
//! Each model version (and a base model zero-shot) answers every test prompt
//! on its own, as a served call would be answered: label tasks are scored
//! with accuracy, macro-F1, per-label precision/recall and a confusion matrix,
//! generation tasks with exact/normalized match, token F1, ROUGE-L and JSON
//! validity/field match. Every figure has a bootstrap 95 % interval. The
//! model's confidence on the validation split chooses the cascade threshold,
//! which is then judged on test, with what it saves. Costs: the lead's from
//! the calls it answered, the understudy's from the process CPU time spent
//! answering at a machine price.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_datasets::files::read_split;
use understudy_datasets::jsonl::ChatExample;
use understudy_datasets::kind::normalize_label;
use understudy_eval::bootstrap::DEFAULT_RESAMPLES;
use understudy_eval::calibrate::{cascade_report, choose_threshold, coverage_curve, CascadeReport, ScoredAnswer};
use understudy_eval::generation::{generation_report, normalize, GenerationReport};
use understudy_eval::labels::{label_report, LabelReport};
use understudy_eval::{bootstrap_mean, bootstrap_quantile, CascadeOutcome, Estimate};
use understudy_providers::{confidence_of, ChatRequest, LocalLoader, LocalModel, LocalModelSpec};
use understudy_store::{CallFilter, DatasetRecord, ModelVersionRecord, StatusFilter, Store};
use understudy_trainer::{prompt_text, ClassifierModel};
use understudy_types::{ServedBy, TaskKind};

use crate::cli::EvalCommand;
use crate::dataset::task_dataset;
use crate::output::{load_config, open_store, table};

/// The file in a model version's folder that keeps its calibrated threshold.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// Bounds of the default `max_tokens` of a generation task's answers.
const MIN_MAX_TOKENS: u64 = 16;
const MAX_MAX_TOKENS: u64 = 1024;

pub async fn run(config_path: &Path, command: EvalCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
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
        candidates.push(Candidate { name, method: "zero-shot".into(), path: None, spec: Some(spec) });
    }
    let test = read_rows(&dataset, "test")?;
    let validation = read_rows(&dataset, "validation")?;
    anyhow::ensure!(!test.is_empty(), "dataset {} has an empty test split", dataset.id);
    let lead = lead_figures(&store, &dataset.task, command.seed).await?;
    let format = match dataset.kind {
        // The label set a causal LM is constrained to: every answer of the train split.
        TaskKind::Label => AnswerFormat::Labels(
            read_rows(&dataset, "train")?
                .into_iter()
                .map(|row| row.label)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        ),
        TaskKind::Generation => AnswerFormat::Free {
            max_tokens: command.max_tokens.unwrap_or_else(|| default_max_tokens(test.iter().chain(&validation))),
        },
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
        let scorer = candidate.load(&format, &dataset)?;
        let scored = scorer.score(&test).await?;
        let validation_scored = scorer.score(&validation).await?;
        for (row, answer) in test.iter().zip(&scored) {
            let line = json!({
                "model": candidate.name, "prompt": row.text, "reference": row.reference, "answer": answer.text,
                "confidence": answer.confidence, "agrees": agrees(dataset.kind, row, &answer.text),
            });
            answer_lines.push_str(&format!("{line}\n"));
        }
        results.push(judge(
            &command,
            &dataset,
            &lead,
            machine_price,
            candidate,
            (&test, &scored),
            (&validation, &validation_scored),
        )?);
    }
    store.close().await;

    if let Some(path) = &command.answers {
        std::fs::write(path, answer_lines).with_context(|| format!("cannot write {}", path.display()))?;
    }

    let report = Report { dataset: &dataset, lead: &lead, results: &results, command: &command, machine_price };
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

/// Scores one candidate's answers, chooses its threshold on validation,
/// judges it on test, and writes a model version's calibration.
fn judge(
    command: &EvalCommand,
    dataset: &DatasetRecord,
    lead: &LeadFigures,
    machine_price: f64,
    candidate: &Candidate,
    (test, scored): (&[Row], &[Answer]),
    (validation, validation_scored): (&[Row], &[Answer]),
) -> anyhow::Result<VersionResult> {
    let seed = command.seed;
    let metrics = match dataset.kind {
        TaskKind::Label => {
            let reference: Vec<String> = test.iter().map(|row| row.label.clone()).collect();
            let predicted: Vec<String> = scored.iter().map(|answer| normalize_label(&answer.text)).collect();
            Metrics::Label(label_report(&reference, &predicted, DEFAULT_RESAMPLES, seed))
        }
        TaskKind::Generation => {
            let reference: Vec<String> = test.iter().map(|row| row.reference.clone()).collect();
            let predicted: Vec<String> = scored.iter().map(|answer| answer.text.clone()).collect();
            Metrics::Generation(generation_report(&reference, &predicted, DEFAULT_RESAMPLES, seed))
        }
    };
    let to_scored = |answers: &[Answer], rows: &[Row]| -> Vec<ScoredAnswer> {
        answers
            .iter()
            .zip(rows)
            .map(|(answer, row)| ScoredAnswer {
                confidence: answer.confidence,
                agrees: agrees(dataset.kind, row, &answer.text),
            })
            .collect()
    };
    let threshold = choose_threshold(&to_scored(validation_scored, validation), command.target_agreement);
    let test_scored = to_scored(scored, test);
    let costs: Vec<f64> = scored.iter().map(|answer| answer.cpu_seconds * machine_price / 3600.0).collect();
    let lead_cost_per_call = lead.speed.cost_per_1k.value / 1000.0;
    let cascade = threshold.map(|threshold| {
        cascade_report(&test_scored, &costs, threshold, lead_cost_per_call, DEFAULT_RESAMPLES, seed.wrapping_add(13))
    });
    let latencies: Vec<f64> = scored.iter().map(|answer| answer.latency_ms).collect();
    let speed = speed_figures(&latencies, &costs, seed.wrapping_add(10));
    let calibration = json!({
        "dataset": dataset.id, "target_agreement": command.target_agreement, "threshold": threshold,
        "test_coverage": cascade.map(|report| report.coverage.value),
        "test_overall_agreement": cascade.map(|report| report.overall_agreement.value),
    });
    if let Some(path) = &candidate.path {
        std::fs::write(Path::new(path).join(CALIBRATION_FILE), calibration.to_string())
            .with_context(|| format!("cannot write the calibration into {path}"))?;
    }
    Ok(VersionResult {
        name: candidate.name.clone(),
        method: candidate.method.clone(),
        n_test: test.len(),
        metrics,
        speed,
        cpu_seconds: scored.iter().map(|answer| answer.cpu_seconds).sum(),
        threshold,
        cascade,
        curve: coverage_curve(&test_scored),
    })
}

/// Whether an answer agrees with the lead's: the same label, or for
/// generation the same text after normalization.
fn agrees(kind: TaskKind, row: &Row, answer: &str) -> bool {
    match kind {
        TaskKind::Label => normalize_label(answer) == row.label,
        TaskKind::Generation => normalize(answer) == normalize(&row.reference),
    }
}

/// Room for the longest reference answer, with a margin for another
/// tokenizer than the counting one.
fn default_max_tokens<'a>(rows: impl Iterator<Item = &'a Row>) -> u64 {
    let longest = rows.map(|row| understudy_providers::tokens::count_text(&row.reference)).max().unwrap_or(0);
    (longest * 3 / 2 + 8).clamp(MIN_MAX_TOKENS, MAX_MAX_TOKENS)
}

/// One answer to one row, timed on the wall clock and on the process's CPU clock.
struct Answer {
    text: String,
    confidence: f64,
    latency_ms: f64,
    cpu_seconds: f64,
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
    threshold: Option<f64>,
    cascade: Option<CascadeReport>,
    /// Coverage against agreement at every threshold, on test.
    curve: Vec<CascadeOutcome>,
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

/// One row of a split: the prompt as messages and as classifier text, and
/// the lead's answer, as text and as a normalized label.
struct Row {
    messages: Vec<Value>,
    text: String,
    reference: String,
    label: String,
}

fn read_rows(dataset: &DatasetRecord, split: &str) -> anyhow::Result<Vec<Row>> {
    let dir = Path::new(&dataset.path);
    read_split(dir, split)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let example = ChatExample::parse(line).map_err(|error| anyhow::anyhow!("{}: {error}", dir.display()))?;
            let reference = example.answer_text();
            Ok(Row {
                text: prompt_text(&example.prompt),
                label: normalize_label(&reference),
                reference,
                messages: example.prompt,
            })
        })
        .collect()
}

/// How a causal LM is asked: constrained to a label task's labels, or free
/// (temperature 0) for a generation task.
enum AnswerFormat {
    Labels(Vec<String>),
    Free { max_tokens: u64 },
}

impl AnswerFormat {
    fn request(&self, name: &str, messages: &[Value]) -> ChatRequest {
        let mut body = json!({"model": name, "messages": messages, "temperature": 0, "logprobs": true});
        match self {
            AnswerFormat::Labels(labels) => {
                body["max_tokens"] = json!(32);
                body["response_format"] = json!({"type": "json_schema", "json_schema": {
                    "name": "label", "schema": {"type": "string", "enum": labels}}});
            }
            AnswerFormat::Free { max_tokens } => body["max_tokens"] = json!(max_tokens),
        }
        ChatRequest { body: body.as_object().cloned().unwrap_or_default() }
    }
}

/// What answers the rows: a trained classifier, or a causal LM (a LoRA model
/// version, or a base model zero-shot).
enum Scorer<'a> {
    Classifier(Box<ClassifierModel>),
    Chat { name: String, model: std::sync::Arc<dyn LocalModel>, format: &'a AnswerFormat },
}

/// CPU time of this process so far, all threads (the engine's and candle's
/// pools included), in seconds.
fn process_cpu_seconds() -> f64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

impl Scorer<'_> {
    /// Each row answered on its own, as a served call would be, and timed.
    async fn score(&self, rows: &[Row]) -> anyhow::Result<Vec<Answer>> {
        let mut answers = Vec::with_capacity(rows.len());
        for row in rows {
            let started = Instant::now();
            let cpu_started = process_cpu_seconds();
            let (text, confidence) = match self {
                Scorer::Classifier(model) => {
                    let mut predictions = model.predict(std::slice::from_ref(&row.text))?;
                    let prediction = predictions.pop().context("the classifier returned no prediction")?;
                    (prediction.label, f64::from(prediction.confidence))
                }
                Scorer::Chat { name, model, format } => {
                    let response = model.chat(format.request(name, &row.messages)).await?;
                    let completion: Value = serde_json::from_slice(&response.body)?;
                    let content =
                        completion.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or("");
                    (content.to_string(), confidence_of(&completion).unwrap_or(0.0))
                }
            };
            answers.push(Answer {
                text,
                confidence,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                cpu_seconds: (process_cpu_seconds() - cpu_started).max(0.0),
            });
        }
        Ok(answers)
    }
}

/// A model to evaluate and how to load it.
struct Candidate {
    name: String,
    method: String,
    /// A model version's folder, where its calibration is written.
    path: Option<String>,
    spec: Option<LocalModelSpec>,
}

impl Candidate {
    fn of_version(version: &ModelVersionRecord) -> Candidate {
        let spec = (version.method == "lora").then(|| LocalModelSpec {
            name: version.id.clone(),
            path: version.base_model.clone(),
            adapter: Some(version.path.clone().into()),
            weights: None,
        });
        Candidate { name: version.id.clone(), method: version.method.clone(), path: Some(version.path.clone()), spec }
    }

    fn load<'a>(&self, format: &'a AnswerFormat, dataset: &DatasetRecord) -> anyhow::Result<Scorer<'a>> {
        match &self.spec {
            None => {
                anyhow::ensure!(
                    matches!(format, AnswerFormat::Labels(_)),
                    "model version {} is a classifier ({}), which only answers label tasks, but dataset {} of task \
                     `{}` is a generation task: evaluate a LoRA version (`understudy train --task {} --method lora`) \
                     or a base model with --zero-shot",
                    self.name,
                    self.method,
                    dataset.id,
                    dataset.task,
                    dataset.task
                );
                Ok(Scorer::Classifier(Box::new(
                    ClassifierModel::load(self.path.as_deref().unwrap_or_default())
                        .with_context(|| format!("cannot load model version {} from {:?}", self.name, self.path))?,
                )))
            }
            Some(spec) => {
                let model =
                    understudy_local::Loader.load(spec).with_context(|| format!("cannot load {}", self.name))?;
                Ok(Scorer::Chat { name: spec.name.clone(), model, format })
            }
        }
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
    command: &'a EvalCommand,
    machine_price: f64,
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
        let cascade = result.cascade.as_ref();
        let figure = |pick: fn(&CascadeReport) -> Estimate| optional_estimate_json(cascade.map(pick).as_ref());
        object.insert(
            "cascade".into(),
            json!({
                "target_agreement": self.command.target_agreement,
                "threshold": result.threshold,
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
        for result in self.results {
            if let Metrics::Label(report) = &result.metrics {
                text.push_str(&per_label_text(&result.name, report));
            }
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
        let target = self.command.target_agreement;
        let Some(report) = &result.cascade else {
            return format!(
                "{}: cascade: no threshold reaches agreement {target} on validation; the lead should keep every call\n",
                result.name
            );
        };
        format!(
            "{}: cascade at target agreement {target}: threshold {:.4} (chosen on validation). On test [95% CI]:\n  \
             the understudy serves {}% of calls, agreeing with the lead on {}% of them; overall agreement {}%\n  \
             per 1k calls: lead cost avoided {}, understudy compute {}, net saved {} ({}% of the lead's {})\n",
            result.name,
            report.threshold,
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
