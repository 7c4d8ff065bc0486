//! `understudy report costs` and `understudy report savings`.

use std::io::Write;
use std::path::Path;

use serde_json::json;
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
        ReportCommand::Drift { task, window, alpha, encoder, json } => {
            match crate::output::drift_encoder(&config, encoder.as_deref()) {
                Ok(encoder) => {
                    let encoder = encoder.as_deref().map(|model| Encoder { model, name: "drift-encoder" });
                    print_drift(&store, &task, window, alpha, encoder, json).await
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
async fn print_drift(
    store: &Store,
    task: &str,
    window: u64,
    alpha: f64,
    encoder: Option<Encoder<'_>>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(alpha > 0.0 && alpha < 1.0, "--alpha {alpha} must be in (0, 1)");
    let drift = understudy_loop::task_drift(store, task, window, alpha, encoder).await?;
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
    match report.reasons().as_slice() {
        [] => writeln!(stdout, "no drift signal fired")?,
        reasons => writeln!(stdout, "retrain due: {}", reasons.join("; "))?,
    }
    Ok(())
}
