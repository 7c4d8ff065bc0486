//! `understudy history --task T`: the task's policy changes and the
//! autopilot's transitions, oldest first, each with its reason.

use std::path::Path;

use serde_json::{json, Value};

use crate::cli::HistoryCommand;
use crate::output::{format_time, load_config, open_store, table};

pub async fn run(config_path: &Path, command: HistoryCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let entries = understudy_loop::history(&store, &command.task).await;
    store.close().await;
    let rows: Vec<Value> = entries?
        .into_iter()
        .map(|entry| {
            let mut value = json!({"at": format_time(entry.at), "kind": entry.kind.as_str(), "by": entry.by,
                                   "what": entry.what, "why": entry.why});
            if entry.evidence != Value::Null {
                value["evidence"] = entry.evidence;
            }
            value
        })
        .collect();
    if command.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("task {}: no policy changes and no autopilot transitions yet", command.task);
        return Ok(());
    }
    let text = |value: &Value, key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|value| vec![text(value, "at"), text(value, "by"), text(value, "what"), text(value, "why")])
        .collect();
    print!("{}", table(&["at (UTC)", "by", "what", "why"], &table_rows));
    Ok(())
}
