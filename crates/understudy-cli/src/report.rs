//! `understudy report costs` and `understudy report savings`.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use understudy_store::{CallFilter, Store};
use understudy_types::Money;

use crate::cli::ReportCommand;
use crate::output::{call_filter, format_day, load_config, open_store, table};
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
            let price = machine_price_per_hour.unwrap_or_else(|| machine_price(&config));
            print_savings(&store, &call_filter(&filter)?, price, json, html.as_deref()).await
        }
    };
    store.close().await;
    result
}

/// The machine price of the config's first local provider, or the default.
pub fn machine_price(config: &understudy_config::Config) -> f64 {
    config
        .providers
        .values()
        .find_map(|provider| match provider {
            understudy_config::ProviderConfig::Local(local) => Some(local.machine_price_per_hour),
            _ => None,
        })
        .unwrap_or(0.10)
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
