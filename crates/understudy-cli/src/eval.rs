//! `understudy eval`: the understudy against the lead on the newest traffic.
//!
//! The reference is the lead's recorded answer on the dataset's test split.
//! Each trained model version is scored on it with bootstrap confidence
//! intervals; its confidence on the validation split chooses the cascade
//! threshold, which is then judged on test. Costs: the lead's from its
//! recorded calls, the understudy's from measured compute time and a
//! machine price.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_datasets::files::read_split;
use understudy_datasets::jsonl::ChatExample;
use understudy_datasets::kind::normalize_label;
use understudy_eval::bootstrap::DEFAULT_RESAMPLES;
use understudy_eval::calibrate::{choose_threshold, coverage_curve, evaluate_cascade, ScoredAnswer};
use understudy_eval::labels::{label_report, LabelReport};
use understudy_eval::{quantile, Estimate};
use understudy_providers::{confidence_of, ChatRequest, LocalLoader, LocalModel, LocalModelSpec};
use understudy_store::{CallFilter, DatasetRecord, ModelVersionRecord, StatusFilter, Store};
use understudy_trainer::{prompt_text, ClassifierModel};
use understudy_types::TaskKind;

use crate::cli::EvalCommand;
use crate::dataset::task_dataset;
use crate::output::{load_config, open_store, table};

/// The file in a model version's folder that keeps its calibrated threshold.
pub const CALIBRATION_FILE: &str = "calibration.json";

pub async fn run(config_path: &Path, command: EvalCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let dataset = task_dataset(&store, &command.task, command.dataset.as_deref()).await?;
    anyhow::ensure!(
        dataset.kind == TaskKind::Label,
        "dataset {} is a generation task; this build evaluates label tasks only",
        dataset.id
    );
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
        let spec = LocalModelSpec { name: name.clone(), path, adapter: None };
        candidates.push(Candidate { name, method: "zero-shot".into(), path: None, spec: Some(spec) });
    }
    let test = read_rows(&dataset, "test")?;
    let validation = read_rows(&dataset, "validation")?;
    anyhow::ensure!(!test.is_empty(), "dataset {} has an empty test split", dataset.id);
    let lead = lead_figures(&store, &dataset.task).await?;
    let reference: Vec<String> = test.iter().map(|row| row.label.clone()).collect();
    // The label set a causal LM is constrained to: every answer of the train split.
    let labels: Vec<String> = read_rows(&dataset, "train")?
        .into_iter()
        .map(|row| row.label)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut results = Vec::new();
    for candidate in &candidates {
        eprintln!(
            "scoring {} ({}) on {} validation and {} test rows",
            candidate.name,
            candidate.method,
            validation.len(),
            test.len()
        );
        let scorer = candidate.load(&labels)?;
        let scored = scorer.score(&test).await?;
        let predicted: Vec<String> = scored.iter().map(|answer| answer.label.clone()).collect();
        let report = label_report(&reference, &predicted, DEFAULT_RESAMPLES, command.seed);
        let validation_scored = scorer.score(&validation).await?;
        let to_scored = |answers: &[Answer], rows: &[Row]| -> Vec<ScoredAnswer> {
            answers
                .iter()
                .zip(rows)
                .map(|(answer, row)| ScoredAnswer { confidence: answer.confidence, agrees: answer.label == row.label })
                .collect()
        };
        let threshold = choose_threshold(&to_scored(&validation_scored, &validation), command.target_agreement);
        let test_scored = to_scored(&scored, &test);
        let cascade = threshold.map(|threshold| evaluate_cascade(&test_scored, threshold));
        let curve = coverage_curve(&test_scored);
        let latencies: Vec<f64> = scored.iter().map(|answer| answer.latency_ms).collect();
        let mean_seconds = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64 / 1000.0;
        let cost_per_1k = mean_seconds * command.machine_price_per_hour / 3600.0 * 1000.0;
        let calibration = json!({
            "dataset": dataset.id, "target_agreement": command.target_agreement, "threshold": threshold,
            "test_coverage": cascade.map(|outcome| outcome.coverage),
            "test_overall_agreement": cascade.map(|outcome| outcome.overall_agreement),
        });
        if let Some(path) = &candidate.path {
            std::fs::write(Path::new(path).join(CALIBRATION_FILE), calibration.to_string())
                .with_context(|| format!("cannot write the calibration into {path}"))?;
        }
        results.push(VersionResult {
            name: candidate.name.clone(),
            method: candidate.method.clone(),
            report,
            p50_ms: quantile(&latencies, 0.5).unwrap_or(0.0),
            p95_ms: quantile(&latencies, 0.95).unwrap_or(0.0),
            cost_per_1k,
            threshold,
            cascade,
            curve,
        });
    }
    store.close().await;

    if let Some(path) = &command.html {
        let text = as_text(&dataset, &lead, &results, &command);
        std::fs::write(path, crate::html::eval_page(&dataset.task, &text, &results_for_html(&results)))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if command.json {
        println!("{}", serde_json::to_string_pretty(&as_json(&dataset, &lead, &results, &command))?);
    } else {
        print!("{}", as_text(&dataset, &lead, &results, &command));
    }
    Ok(())
}

struct Answer {
    label: String,
    confidence: f64,
    latency_ms: f64,
}

struct LeadFigures {
    model: String,
    n_calls: u64,
    cost_per_1k: f64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
}

struct VersionResult {
    name: String,
    method: String,
    report: LabelReport,
    p50_ms: f64,
    p95_ms: f64,
    cost_per_1k: f64,
    threshold: Option<f64>,
    cascade: Option<understudy_eval::CascadeOutcome>,
    /// Coverage against agreement at every threshold, on test.
    curve: Vec<understudy_eval::CascadeOutcome>,
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
/// the lead's normalized answer.
struct Row {
    messages: Vec<Value>,
    text: String,
    label: String,
}

fn read_rows(dataset: &DatasetRecord, split: &str) -> anyhow::Result<Vec<Row>> {
    let dir = Path::new(&dataset.path);
    read_split(dir, split)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let example = ChatExample::parse(line).map_err(|error| anyhow::anyhow!("{}: {error}", dir.display()))?;
            Ok(Row {
                text: prompt_text(&example.prompt),
                label: normalize_label(&example.answer_text()),
                messages: example.prompt,
            })
        })
        .collect()
}

/// What answers the rows: a trained classifier, or a causal LM (a LoRA model
/// version, or a base model zero-shot) constrained to the task's labels.
enum Scorer {
    Classifier(ClassifierModel),
    Chat { name: String, model: std::sync::Arc<dyn LocalModel>, labels: Vec<String> },
}

impl Scorer {
    /// Each row answered on its own, as a served call would be, and timed.
    async fn score(&self, rows: &[Row]) -> anyhow::Result<Vec<Answer>> {
        let mut answers = Vec::with_capacity(rows.len());
        for row in rows {
            let started = Instant::now();
            let (label, confidence) = match self {
                Scorer::Classifier(model) => {
                    let mut predictions = model.predict(std::slice::from_ref(&row.text))?;
                    let prediction = predictions.pop().context("the classifier returned no prediction")?;
                    (prediction.label, f64::from(prediction.confidence))
                }
                Scorer::Chat { name, model, labels } => {
                    let body = json!({
                        "model": name, "messages": row.messages, "temperature": 0, "max_tokens": 32,
                        "logprobs": true,
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "label", "schema": {"type": "string", "enum": labels}}},
                    });
                    let body = body.as_object().cloned().unwrap_or_default();
                    let response = model.chat(ChatRequest { body }).await?;
                    let completion: Value = serde_json::from_slice(&response.body)?;
                    let content =
                        completion.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or("");
                    (normalize_label(content), confidence_of(&completion).unwrap_or(0.0))
                }
            };
            answers.push(Answer { label, confidence, latency_ms: started.elapsed().as_secs_f64() * 1000.0 });
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
        });
        Candidate { name: version.id.clone(), method: version.method.clone(), path: Some(version.path.clone()), spec }
    }

    fn load(&self, labels: &[String]) -> anyhow::Result<Scorer> {
        match &self.spec {
            None => Ok(Scorer::Classifier(
                ClassifierModel::load(self.path.as_deref().unwrap_or_default())
                    .with_context(|| format!("cannot load model version {} from {:?}", self.name, self.path))?,
            )),
            Some(spec) => {
                let model =
                    understudy_local::Loader.load(spec).with_context(|| format!("cannot load {}", self.name))?;
                Ok(Scorer::Chat { name: spec.name.clone(), model, labels: labels.to_vec() })
            }
        }
    }
}

async fn lead_figures(store: &Store, task: &str) -> anyhow::Result<LeadFigures> {
    let filter = CallFilter { task: Some(task.to_string()), status: Some(StatusFilter::Ok), ..CallFilter::default() };
    let calls = store.list_calls(&filter).await?;
    let n_calls = calls.len() as u64;
    let total_cost: f64 = calls.iter().map(|call| call.cost.dollars()).sum();
    // Imported calls carry no latency; only served ones count for it.
    let latencies: Vec<f64> = calls.iter().filter(|call| call.latency_ms > 0.0).map(|call| call.latency_ms).collect();
    let model = calls.last().map(|call| call.model.clone()).unwrap_or_else(|| "lead".into());
    Ok(LeadFigures {
        model,
        n_calls,
        cost_per_1k: if n_calls == 0 { 0.0 } else { total_cost / n_calls as f64 * 1000.0 },
        p50_ms: quantile(&latencies, 0.5),
        p95_ms: quantile(&latencies, 0.95),
    })
}

fn results_for_html(results: &[VersionResult]) -> Vec<crate::html::ModelPlots<'_>> {
    results
        .iter()
        .map(|result| crate::html::ModelPlots {
            name: &result.name,
            labels: &result.report.labels,
            confusion: &result.report.confusion,
            curve: &result.curve,
            chosen: result.cascade,
        })
        .collect()
}

fn estimate_json(estimate: &Estimate) -> Value {
    json!({"value": estimate.value, "ci95": [estimate.interval.low, estimate.interval.high]})
}

fn estimate_text(estimate: &Estimate) -> String {
    format!("{:.4} [{:.4}, {:.4}]", estimate.value, estimate.interval.low, estimate.interval.high)
}

fn as_json(dataset: &DatasetRecord, lead: &LeadFigures, results: &[VersionResult], command: &EvalCommand) -> Value {
    json!({
        "task": dataset.task,
        "dataset": dataset.id,
        "n_test": results.first().map_or(0, |result| result.report.n_examples),
        "lead": {"model": lead.model, "recorded_calls": lead.n_calls, "cost_per_1k": lead.cost_per_1k,
                 "latency_p50_ms": lead.p50_ms, "latency_p95_ms": lead.p95_ms},
        "models": results.iter().map(|result| json!({
            "model_version": result.name,
            "method": result.method,
            "accuracy": estimate_json(&result.report.accuracy),
            "macro_f1": estimate_json(&result.report.macro_f1),
            "per_label": result.report.per_label.iter().map(|metrics| json!({
                "label": metrics.label, "precision": metrics.precision, "recall": metrics.recall,
                "f1": metrics.f1, "support": metrics.support,
            })).collect::<Vec<_>>(),
            "labels": result.report.labels,
            "confusion": result.report.confusion,
            "latency_p50_ms": result.p50_ms,
            "latency_p95_ms": result.p95_ms,
            "cost_per_1k": result.cost_per_1k,
            "cascade": {
                "target_agreement": command.target_agreement,
                "threshold": result.threshold,
                "coverage": result.cascade.map(|outcome| outcome.coverage),
                "served_agreement": result.cascade.map(|outcome| outcome.served_agreement),
                "overall_agreement": result.cascade.map(|outcome| outcome.overall_agreement),
                "lead_cost_saved_share": result.cascade.map(|outcome| outcome.coverage),
            },
        })).collect::<Vec<_>>(),
    })
}

fn as_text(dataset: &DatasetRecord, lead: &LeadFigures, results: &[VersionResult], command: &EvalCommand) -> String {
    let n_test = results.first().map_or(0, |result| result.report.n_examples);
    let mut text = format!(
        "task `{}`, dataset {}: {n_test} test calls (the newest), lead answers as reference\n\n",
        dataset.task, dataset.id
    );
    let mut rows = vec![vec![
        format!("lead ({})", lead.model),
        "1 (reference)".into(),
        "1 (reference)".into(),
        lead.p50_ms.map_or("-".into(), |ms| format!("{ms:.1}")),
        lead.p95_ms.map_or("-".into(), |ms| format!("{ms:.1}")),
        format!("${:.4}", lead.cost_per_1k),
    ]];
    for result in results {
        rows.push(vec![
            format!("{} ({})", result.name, result.method),
            estimate_text(&result.report.accuracy),
            estimate_text(&result.report.macro_f1),
            format!("{:.1}", result.p50_ms),
            format!("{:.1}", result.p95_ms),
            format!("${:.4}", result.cost_per_1k),
        ]);
    }
    text.push_str(&table(
        &["model", "accuracy [95% CI]", "macro-F1 [95% CI]", "p50 ms", "p95 ms", "per 1k calls"],
        &rows,
    ));
    for result in results {
        text.push_str(&format!("\n{}: per label\n", result.name));
        let label_rows: Vec<Vec<String>> = result
            .report
            .per_label
            .iter()
            .map(|metrics| {
                vec![
                    metrics.label.clone(),
                    format!("{:.3}", metrics.precision),
                    format!("{:.3}", metrics.recall),
                    format!("{:.3}", metrics.f1),
                    metrics.support.to_string(),
                ]
            })
            .collect();
        text.push_str(&table(&["label", "precision", "recall", "f1", "support"], &label_rows));
        text.push_str("confusion (rows: lead, columns: understudy)\n");
        let mut confusion_rows = Vec::new();
        for (label, counts) in result.report.labels.iter().zip(&result.report.confusion) {
            let mut row = vec![label.clone()];
            row.extend(counts.iter().map(usize::to_string));
            confusion_rows.push(row);
        }
        let mut header = vec![""];
        header.extend(result.report.labels.iter().map(String::as_str));
        text.push_str(&table(&header, &confusion_rows));
        match (result.threshold, result.cascade) {
            (Some(threshold), Some(outcome)) => text.push_str(&format!(
                "cascade at target agreement {}: threshold {threshold:.4} (chosen on validation); on test the \
                 understudy serves {:.1}% of calls, agreeing with the lead on {:.1}% of them; overall agreement \
                 {:.1}%; lead cost saved {:.1}%\n",
                command.target_agreement,
                outcome.coverage * 100.0,
                outcome.served_agreement * 100.0,
                outcome.overall_agreement * 100.0,
                outcome.coverage * 100.0
            )),
            _ => text.push_str(&format!(
                "cascade: no threshold reaches agreement {} on validation; the lead should keep every call\n",
                command.target_agreement
            )),
        }
    }
    text
}
