//! `understudy promote`: flags into a [`PromoteRequest`], one call to
//! [`understudy_loop::promote`], and the change it appended. Gateways poll
//! the store, so the change reaches every running instance without a
//! restart; `--policy lead` gives the stage back at once.

use std::path::Path;

use serde_json::json;
use understudy_loop::PromoteRequest;

use crate::cli::PromoteCommand;
use crate::output::{format_time, load_config, open_store};

pub async fn run(config_path: &Path, command: PromoteCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let request = PromoteRequest {
        task: command.task.clone(),
        policy: command.policy.clone(),
        model: command.model.clone(),
        threshold: command.threshold,
        note: command.note.clone(),
    };
    let result = understudy_loop::promote(&config, &store, &request).await;
    store.close().await;
    let promotion = result?;
    if let Some(warning) = &promotion.warning {
        eprintln!("warning: {warning}");
    }
    let change = promotion.change;
    if command.json {
        let value = json!({
            "task": change.task, "policy": change.policy, "understudy": change.understudy,
            "understudy_path": change.understudy_path, "at": format_time(change.created_at), "id": change.id,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let who = change.understudy.as_deref().map(|name| format!(" with understudy {name}")).unwrap_or_default();
        println!("task {}: policy {}{who}", change.task, change.policy);
        println!(
            "running gateways pick this up within a second; undo with `understudy promote --task {} --policy lead`",
            change.task
        );
    }
    Ok(())
}
