//! `understudy history --task T`: the task's policy changes and the
//! autopilot's transitions, oldest first, each with its reason.

use std::path::Path;

use serde_json::{json, Value};
use understudy_loop::autopilot::{AUTOPILOT_NOTE, GUARDRAIL_NOTE};

use crate::cli::HistoryCommand;
use crate::output::{format_time, load_config, open_store, table};

pub async fn run(config_path: &Path, command: HistoryCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let changes = store.policy_history(&command.task).await;
    let events = store.autopilot_history(&command.task).await;
    store.close().await;
    let (changes, events) = (changes?, events?);
    // (time, id, kind, by, what, why, evidence)
    let mut rows: Vec<(understudy_types::OffsetDateTime, String, Value)> = Vec::new();
    for change in changes {
        let note = change.note.clone().unwrap_or_default();
        let by = if note.starts_with(AUTOPILOT_NOTE) {
            "autopilot"
        } else if note.starts_with(GUARDRAIL_NOTE) {
            "guardrail"
        } else {
            "by hand"
        };
        let what = match &change.understudy {
            Some(understudy) => format!("policy {} with {understudy}", change.policy),
            None => format!("policy {}", change.policy),
        };
        rows.push((
            change.created_at,
            change.id.clone(),
            json!({"at": format_time(change.created_at), "kind": "policy", "by": by, "what": what, "why": note}),
        ));
    }
    for event in events {
        let evidence: Value = serde_json::from_str(&event.evidence).unwrap_or(Value::Null);
        rows.push((
            event.created_at,
            event.id.clone(),
            json!({"at": format_time(event.created_at), "kind": "autopilot", "by": "autopilot",
                   "what": format!("{} → {}", event.stage_from, event.stage_to), "why": event.reason, "evidence": evidence}),
        ));
    }
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    if command.json {
        let values: Vec<&Value> = rows.iter().map(|(_, _, value)| value).collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("task {}: no policy changes and no autopilot transitions yet", command.task);
        return Ok(());
    }
    let text = |value: &Value, key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, _, value)| vec![text(value, "at"), text(value, "by"), text(value, "what"), text(value, "why")])
        .collect();
    print!("{}", table(&["at (UTC)", "by", "what", "why"], &table_rows));
    Ok(())
}
