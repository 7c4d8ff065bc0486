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
        "dataset {} is a generation task; this build evaluates label tasks (classifiers) only",
        dataset.id
    );
    let versions = model_versions(&store, &command).await?;
    let test = read_rows(&dataset, "test")?;
    let validation = read_rows(&dataset, "validation")?;
    anyhow::ensure!(!test.is_empty(), "dataset {} has an empty test split", dataset.id);
    let lead = lead_figures(&store, &dataset.task).await?;
    let reference: Vec<String> = test.iter().map(|(_, label)| label.clone()).collect();

    let mut results = Vec::new();
    for version in &versions {
        let model = ClassifierModel::load(&version.path)
            .with_context(|| format!("cannot load model version {} from {}", version.id, version.path))?;
        let scored = score(&model, &test)?;
        let predicted: Vec<String> = scored.iter().map(|answer| answer.label.clone()).collect();
        let report = label_report(&reference, &predicted, DEFAULT_RESAMPLES, command.seed);
        let validation_scored = score(&model, &validation)?;
        let to_scored = |answers: &[Answer], rows: &[(String, String)]| -> Vec<ScoredAnswer> {
            answers
                .iter()
                .zip(rows)
                .map(|(answer, (_, label))| ScoredAnswer {
                    confidence: answer.confidence,
                    agrees: &answer.label == label,
                })
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
        std::fs::write(Path::new(&version.path).join(CALIBRATION_FILE), calibration.to_string())
            .with_context(|| format!("cannot write the calibration into {}", version.path))?;
        results.push(VersionResult {
            version: version.clone(),
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
    version: ModelVersionRecord,
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

/// (classifier input text, the lead's normalized label) per row of a split.
fn read_rows(dataset: &DatasetRecord, split: &str) -> anyhow::Result<Vec<(String, String)>> {
    let dir = Path::new(&dataset.path);
    read_split(dir, split)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let example = ChatExample::parse(line).map_err(|error| anyhow::anyhow!("{}: {error}", dir.display()))?;
            Ok((prompt_text(&example.prompt), normalize_label(&example.answer_text())))
        })
        .collect()
}

/// Each row answered on its own, as a served call would be, and timed.
fn score(model: &ClassifierModel, rows: &[(String, String)]) -> anyhow::Result<Vec<Answer>> {
    rows.iter()
        .map(|(text, _)| {
            let started = Instant::now();
            let mut predictions = model.predict(std::slice::from_ref(text))?;
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            let prediction = predictions.pop().context("the classifier returned no prediction")?;
            Ok(Answer { label: prediction.label, confidence: f64::from(prediction.confidence), latency_ms })
        })
        .collect()
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
            name: &result.version.id,
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
            "model_version": result.version.id,
            "method": result.version.method,
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
            format!("{} ({})", result.version.id, result.version.method),
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
        text.push_str(&format!("\n{}: per label\n", result.version.id));
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
