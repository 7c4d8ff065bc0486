//! `understudy eval`: flags into an [`EvalRequest`], one call to
//! [`understudy_loop::evaluate`], and the report rendered as text, JSON or
//! HTML. What is measured and how is the loop's (`understudy_loop::evaluate`).

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_eval::calibrate::CascadeReport;
use understudy_eval::generation::GenerationReport;
use understudy_eval::labels::LabelReport;
use understudy_eval::Estimate;
use understudy_loop::evaluate::{Metrics, SpeedFigures, VersionResult};
use understudy_loop::{EvalEvent, EvalRequest, Evaluation};
use understudy_types::TaskKind;

use crate::cli::EvalCommand;
use crate::output::{load_config, open_store, table};

pub async fn run(config_path: &Path, command: EvalCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let request = EvalRequest {
        task: command.task.clone(),
        models: command.model.clone(),
        dataset: command.dataset.clone(),
        target_agreement: command.target_agreement,
        delta: command.delta,
        machine_price_per_hour: command.machine_price_per_hour,
        max_tokens: command.max_tokens,
        seed: command.seed,
        zero_shot: command.zero_shot.clone(),
    };
    let mut on_event = |event: EvalEvent| match event {
        EvalEvent::Scoring { name, method, n_validation, n_test } => {
            eprintln!("scoring {name} ({method}) on {n_validation} validation and {n_test} test rows")
        }
    };
    let evaluation =
        understudy_loop::evaluate(&config, &store, &understudy_local::Loader, &request, &mut on_event).await;
    store.close().await;
    let evaluation = evaluation?;

    if let Some(path) = &command.answers {
        let lines: String = evaluation.answers.iter().map(|answer| format!("{answer}\n")).collect();
        std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let report = Report(&evaluation);
    if let Some(path) = &command.html {
        let results = results_for_html(&evaluation.results);
        std::fs::write(path, crate::html::eval_page(&evaluation.dataset.task, &report.text(), &results))
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
struct Report<'a>(&'a Evaluation);

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
        let lead = json!({"model": self.0.lead.model, "answered_calls": self.0.lead.n_calls});
        let mut lead = lead.as_object().cloned().unwrap_or_default();
        lead.extend(speed_json(&self.0.lead.speed).as_object().cloned().unwrap_or_default());
        json!({
            "task": self.0.dataset.task,
            "dataset": self.0.dataset.id,
            "kind": self.0.dataset.kind.as_str(),
            "n_test": self.0.results.first().map_or(0, |result| result.n_test),
            "machine_price_per_hour": self.0.machine_price,
            "machine_cores": understudy_types::machine_cores(),
            "target_agreement": self.0.target_agreement,
            "delta": self.0.delta,
            "labels": self.0.labels,
            "lead": lead,
            "models": self.0.results.iter().map(|result| self.model_json(result)).collect::<Vec<_>>(),
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
        let n_test = self.0.results.first().map_or(0, |result| result.n_test);
        let mut text = format!(
            "task `{}`, dataset {} ({}): {n_test} test calls (the newest), lead answers as reference; \
             understudy compute at ${} per machine hour, its CPU time shared by the machine's {} cores\n\n",
            self.0.dataset.task,
            self.0.dataset.id,
            self.0.dataset.kind.as_str(),
            self.0.machine_price,
            understudy_types::machine_cores()
        );
        text.push_str(&self.summary_table());
        if self.0.dataset.kind == TaskKind::Label && self.0.labels.is_none() {
            text.push_str(&format!(
                "note: task `{}` lists no `labels` in the config, so the gateway (and this eval) lets a causal LM \
                 answer freely; list them to have it decode only a label\n",
                self.0.dataset.task
            ));
        }
        for result in &self.0.results {
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
        let quality_names: Vec<&str> = match self.0.results.first().map(|result| &result.metrics) {
            Some(Metrics::Generation(report)) => generation_figures(report).iter().map(|(name, _)| *name).collect(),
            _ => vec!["accuracy", "macro_f1"],
        };
        let mut header: Vec<String> = quality_names.iter().map(|name| format!("{name} [95% CI]")).collect();
        header.insert(0, "model".into());
        header.extend(["p50 ms".into(), "p95 ms".into(), "per 1k calls".into()]);
        let mut lead_row = vec![format!("lead ({}, {} calls)", self.0.lead.model, self.0.lead.n_calls)];
        lead_row.extend(quality_names.iter().map(|_| "1 (reference)".to_string()));
        lead_row.extend(speed_cells(&self.0.lead.speed));
        let mut rows = vec![lead_row];
        for result in &self.0.results {
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
                result.name, certification.n_validation, self.0.dataset.task
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
            money_text(&self.0.lead.speed.cost_per_1k),
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
