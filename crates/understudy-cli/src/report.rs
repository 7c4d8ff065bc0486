//! `understudy report costs`, `report savings` and `report drift`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_loop::Encoder;
use understudy_store::{CallFilter, Store};
use understudy_types::Money;

use crate::cli::ReportCommand;
use crate::output::{call_filter, format_day, format_time, load_config, open_store, table};
use crate::savings::print_savings;

pub async fn run(config_path: &Path, command: ReportCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = match command {
        ReportCommand::Costs { filter, by: Some(_key), json } => {
            print_costs_by_key(&store, &call_filter(&filter)?, json).await
        }
        ReportCommand::Costs { filter, by: None, json } => print_costs(&store, &call_filter(&filter)?, json).await,
        ReportCommand::Savings { filter, machine_price_per_hour, json, html } => {
            let price = machine_price_per_hour.unwrap_or_else(|| config.machine_price().1);
            print_savings(&store, &call_filter(&filter)?, price, json, html.as_deref()).await
        }
        ReportCommand::Drift { task, window, alpha, encoder, windows, html, json } => {
            match crate::output::drift_encoder(&config, encoder.as_deref()) {
                Ok(encoder) => {
                    let encoder = encoder.as_deref().map(|model| Encoder { model, name: "drift-encoder" });
                    let options = DriftOptions { window, alpha, windows, html: html.as_deref(), json };
                    print_drift(&store, &task, &options, encoder).await
                }
                Err(error) => Err(error),
            }
        }
    };
    store.close().await;
    result
}

/// Prints the cost report for `filter`, as a table or as JSON.
pub async fn print_costs(store: &Store, filter: &CallFilter, json: bool) -> anyhow::Result<()> {
    let rows = store.cost_report(filter).await?;
    let mut stdout = std::io::stdout().lock();
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                json!({
                    "day": format_day(row.day),
                    "task": row.task,
                    "model": row.model,
                    "calls": row.n_calls,
                    "errors": row.n_errors,
                    "prompt_tokens": row.usage.prompt_tokens,
                    "completion_tokens": row.usage.completion_tokens,
                    "cost": row.cost.dollars(),
                })
            })
            .collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let mut table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                format_day(row.day),
                row.task.clone().unwrap_or_else(|| "-".into()),
                row.model.clone(),
                row.n_calls.to_string(),
                row.n_errors.to_string(),
                row.usage.prompt_tokens.to_string(),
                row.usage.completion_tokens.to_string(),
                format!("${:.4}", row.cost.dollars()),
            ]
        })
        .collect();
    let total_cost: Money = rows.iter().map(|row| row.cost).sum();
    table_rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        rows.iter().map(|row| row.n_calls).sum::<u64>().to_string(),
        rows.iter().map(|row| row.n_errors).sum::<u64>().to_string(),
        rows.iter().map(|row| row.usage.prompt_tokens).sum::<u64>().to_string(),
        rows.iter().map(|row| row.usage.completion_tokens).sum::<u64>().to_string(),
        format!("${:.4}", total_cost.dollars()),
    ]);
    let header = ["day (UTC)", "task", "model", "calls", "errors", "prompt tok", "completion tok", "cost"];
    write!(stdout, "{}", table(&header, &table_rows))?;
    Ok(())
}

/// Prints calls, tokens and money per gateway key and day.
pub async fn print_costs_by_key(store: &Store, filter: &CallFilter, json: bool) -> anyhow::Result<()> {
    let rows = store.key_cost_report(filter).await?;
    let mut stdout = std::io::stdout().lock();
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                json!({
                    "day": format_day(row.day),
                    "key_id": row.key.as_ref().map(|key| key.id.clone()),
                    "key_name": row.key.as_ref().map(|key| key.name.clone()),
                    "calls": row.n_calls,
                    "errors": row.n_errors,
                    "prompt_tokens": row.usage.prompt_tokens,
                    "completion_tokens": row.usage.completion_tokens,
                    "cost": row.cost.dollars(),
                })
            })
            .collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let mut table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                format_day(row.day),
                // Calls without a key: auth = "none", or imported.
                row.key.as_ref().map_or_else(|| "-".to_string(), |key| key.name.clone()),
                row.n_calls.to_string(),
                row.n_errors.to_string(),
                row.usage.prompt_tokens.to_string(),
                row.usage.completion_tokens.to_string(),
                format!("${:.4}", row.cost.dollars()),
            ]
        })
        .collect();
    let total_cost: Money = rows.iter().map(|row| row.cost).sum();
    table_rows.push(vec![
        "total".into(),
        String::new(),
        rows.iter().map(|row| row.n_calls).sum::<u64>().to_string(),
        rows.iter().map(|row| row.n_errors).sum::<u64>().to_string(),
        rows.iter().map(|row| row.usage.prompt_tokens).sum::<u64>().to_string(),
        rows.iter().map(|row| row.usage.completion_tokens).sum::<u64>().to_string(),
        format!("${:.4}", total_cost.dollars()),
    ]);
    let header = ["day (UTC)", "key", "calls", "errors", "prompt tok", "completion tok", "cost"];
    write!(stdout, "{}", table(&header, &table_rows))?;
    Ok(())
}

/// Prints the drift watch's signals for a task, as text or JSON.
struct DriftOptions<'a> {
    window: u64,
    alpha: f64,
    windows: usize,
    html: Option<&'a Path>,
    json: bool,
}

async fn print_drift(
    store: &Store,
    task: &str,
    options: &DriftOptions<'_>,
    encoder: Option<Encoder<'_>>,
) -> anyhow::Result<()> {
    let DriftOptions { window, alpha, windows, html, json } = *options;
    anyhow::ensure!(alpha > 0.0 && alpha < 1.0, "--alpha {alpha} must be in (0, 1)");
    let drift = understudy_loop::task_drift(store, task, window, alpha, encoder).await?;
    let over_time = understudy_loop::drift_history(store, task, window, alpha, windows, encoder).await?;
    if let Some(path) = html {
        std::fs::write(path, drift_html(task, alpha, &over_time))
            .with_context(|| format!("cannot write the HTML report to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let point_json = |point: &understudy_loop::DriftPoint| {
        let p = |value: Option<f64>| value.map_or(Value::Null, |p| json!(p));
        json!({
            "from": format_time(point.from), "to": format_time(point.to), "calls": point.n_calls,
            "input_p": p(point.report.input.as_ref().map(|test| test.p_value)),
            "answers_p": p(point.report.answers.as_ref().map(|test| test.p_value)),
            "new_labels": point.report.answers.as_ref().map(|test| test.new_labels.iter().map(|l| l.label.clone()).collect::<Vec<_>>()),
            "confidence_p": p(point.report.confidence.as_ref().map(|test| test.p_value)),
            "fired": point.report.fired().iter().map(|signal| signal.name()).collect::<Vec<_>>(),
        })
    };
    let report = &drift.report;
    let fired: Vec<&str> = report.fired().iter().map(|signal| signal.name()).collect();
    let mut stdout = std::io::stdout().lock();
    if json {
        let answers = report.answers.as_ref().map(|test| {
            json!({
                "drifted": test.drifted, "p_value": test.p_value, "chi_square": test.chi_square,
                "degrees_of_freedom": test.degrees_of_freedom, "n_training": test.n_training, "n_recent": test.n_recent,
                "new_labels": test.new_labels.iter().map(|label| json!({"label": label.label, "count": label.count, "share": label.share})).collect::<Vec<_>>(),
                "new_label_fired": test.new_label_fired, "shares_shifted": test.shares_shifted, "alpha": test.alpha,
            })
        });
        let confidence = report.confidence.as_ref().map(|test| {
            json!({
                "drifted": test.drifted, "p_value": test.p_value, "coverage_fell": test.coverage_fell,
                "confidence_fell": test.confidence_fell, "ks_statistic": test.ks.statistic, "ks_p_value": test.ks.p_value,
                "coverage": test.coverage.as_ref().map(|coverage| json!({
                    "threshold": coverage.threshold, "before": coverage.reference_coverage(),
                    "now": coverage.recent_coverage(), "p_value": coverage.p_value,
                })),
                "alpha": test.alpha,
            })
        });
        let input = report.input.as_ref().map(|test| {
            json!({
                "drifted": test.drifted, "p_value": test.p_value, "energy_distance": test.statistic,
                "n_training": test.n_reference, "n_recent": test.n_recent, "permutations": test.n_permutations,
                "alpha": test.alpha,
            })
        });
        let value = json!({
            "task": drift.task, "at": format_time(drift.at), "policy": drift.policy, "understudy": drift.understudy,
            "window": window, "alpha": alpha, "drifted": report.drifted(), "fired": fired, "reasons": report.reasons(),
            "answers": answers, "confidence": confidence, "input": input, "skipped": drift.skipped,
            "representative_answers": drift.n_representative_answers, "fallback_answers": drift.n_fallback_answers,
            "over_time": over_time.iter().map(point_json).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    let mut rows = Vec::new();
    if let Some(test) = &report.input {
        rows.push(vec![
            "input".to_string(),
            if test.drifted { "DRIFT".into() } else { "ok".into() },
            format!("{:.4}", test.p_value),
            format!(
                "energy distance {:.4} between {} recent and {} training prompts' embeddings ({} permutations)",
                test.statistic, test.n_recent, test.n_reference, test.n_permutations
            ),
        ]);
    }
    if let Some(test) = &report.answers {
        let new: Vec<String> =
            test.new_labels.iter().map(|label| format!("{} ×{}", label.label, label.count)).collect();
        rows.push(vec![
            "answers".to_string(),
            if test.drifted { "DRIFT".into() } else { "ok".into() },
            format!("{:.4}", test.p_value),
            format!(
                "chi-square {:.2} on {} dof, {} recent vs {} training answers; new labels: {}",
                test.chi_square,
                test.degrees_of_freedom,
                test.n_recent,
                test.n_training,
                if new.is_empty() { "none".to_string() } else { new.join(", ") }
            ),
        ]);
    }
    if let Some(test) = &report.confidence {
        let coverage = test.coverage.as_ref().map_or(String::new(), |coverage| {
            format!(
                "coverage at {:.3}: {:.1}% then, {:.1}% now; ",
                coverage.threshold,
                coverage.reference_coverage() * 100.0,
                coverage.recent_coverage() * 100.0
            )
        });
        rows.push(vec![
            "confidence".to_string(),
            if test.drifted { "DRIFT".into() } else { "ok".into() },
            format!("{:.4}", test.p_value),
            format!("{coverage}KS {:.3} (p {:.4})", test.ks.statistic, test.ks.p_value),
        ]);
    }
    writeln!(
        stdout,
        "task `{task}` (policy {}, understudy {}): newest {window} calls, tests at level {alpha}",
        drift.policy.as_deref().unwrap_or("-"),
        drift.understudy.as_deref().unwrap_or("-")
    )?;
    if !rows.is_empty() {
        write!(stdout, "{}", table(&["signal", "verdict", "p-value", "evidence"], &rows))?;
    }
    for skipped in &drift.skipped {
        writeln!(stdout, "not tested: {skipped}")?;
    }
    if !over_time.is_empty() {
        let p = |value: Option<f64>| value.map_or("-".to_string(), |p| format!("{p:.4}"));
        let rows: Vec<Vec<String>> = over_time
            .iter()
            .map(|point| {
                let fired: Vec<&str> = point.report.fired().iter().map(|signal| signal.name()).collect();
                vec![
                    format_time(point.from),
                    format_time(point.to),
                    point.n_calls.to_string(),
                    p(point.report.input.as_ref().map(|test| test.p_value)),
                    p(point.report.answers.as_ref().map(|test| test.p_value)),
                    p(point.report.confidence.as_ref().map(|test| test.p_value)),
                    if fired.is_empty() { "-".to_string() } else { fired.join(", ") },
                ]
            })
            .collect();
        writeln!(stdout, "\nover time, since the current promotion (p-values per window of {window} calls):")?;
        let header = ["from (UTC)", "to", "calls", "input p", "answers p", "confidence p", "fired"];
        write!(stdout, "{}", table(&header, &rows))?;
    }
    match report.reasons().as_slice() {
        [] => writeln!(stdout, "no drift signal fired")?,
        reasons => writeln!(stdout, "retrain due: {}", reasons.join("; "))?,
    }
    Ok(())
}

/// A self-contained page: each signal's -log10 p-value per window, with the
/// level alpha as a line; points above it fired.
fn drift_html(task: &str, alpha: f64, points: &[understudy_loop::DriftPoint]) -> String {
    use std::fmt::Write as _;
    let mut html = crate::html::page_start(&format!("Understudy drift: {task}"));
    let (width, height, pad) = (720.0, 260.0, 40.0);
    let score = |p: Option<f64>| p.map(|p| -(p.max(1e-12)).log10());
    let series: [(&str, &str, Vec<Option<f64>>); 3] = [
        (
            "input",
            "#337ab7",
            points.iter().map(|point| score(point.report.input.as_ref().map(|t| t.p_value))).collect(),
        ),
        (
            "answers",
            "#d9534f",
            points.iter().map(|point| score(point.report.answers.as_ref().map(|t| t.p_value))).collect(),
        ),
        (
            "confidence",
            "#5cb85c",
            points.iter().map(|point| score(point.report.confidence.as_ref().map(|t| t.p_value))).collect(),
        ),
    ];
    let level = -alpha.log10();
    let top = series.iter().flat_map(|(_, _, values)| values.iter().flatten().copied()).fold(level * 1.5, f64::max);
    let x = |idx: usize| pad + (width - 2.0 * pad) * idx as f64 / (points.len().max(2) - 1) as f64;
    let y = |value: f64| height - pad - (height - 2.0 * pad) * value / top;
    let _ = write!(
        html,
        "<p>Task {}: {} windows since the current promotion; each signal's -log10(p) per window; \
         above the dashed line (alpha {alpha}) it fired.</p>",
        crate::html::escape(task),
        points.len()
    );
    let _ = write!(html, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">");
    let _ = write!(
        html,
        "<line x1=\"{pad}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\" stroke-dasharray=\"4\"/>",
        width - pad,
        y(level),
        y(level)
    );
    for (name, color, values) in &series {
        let line: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(idx, value)| value.map(|value| format!("{:.1},{:.1}", x(idx), y(value))))
            .collect();
        if !line.is_empty() {
            let _ = write!(
                html,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"><title>{name}</title></polyline>",
                line.join(" ")
            );
        }
    }
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            html,
            "<text x=\"{pad}\" y=\"{}\" font-size=\"10\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" \
             text-anchor=\"end\">{}</text>",
            height - 8.0,
            format_time(first.from),
            width - pad,
            height - 8.0,
            format_time(last.to)
        );
    }
    html.push_str(
        "</svg><p><span style=\"color:#337ab7\">input</span> · <span style=\"color:#d9534f\">answers</span> · \
                   <span style=\"color:#5cb85c\">confidence</span></p><table>\
                   <tr><th>from</th><th>to</th><th>calls</th><th>fired</th><th>why</th></tr>",
    );
    for point in points {
        let fired: Vec<&str> = point.report.fired().iter().map(|signal| signal.name()).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            format_time(point.from),
            format_time(point.to),
            point.n_calls,
            fired.join(", "),
            crate::html::escape(&point.report.reasons().join("; "))
        );
    }
    html.push_str("</table></body></html>\n");
    html
}
