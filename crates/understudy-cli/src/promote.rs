//! `understudy promote`: appends a policy change for a task to the store.
//! Gateways poll the store, so the change reaches every running instance
//! without a restart; `--policy lead` gives the stage back at once.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_config::Config;
use understudy_router::Policy;
use understudy_store::{PolicyChange, Store};
use understudy_types::{OffsetDateTime, Uuid};

use crate::cli::PromoteCommand;
use crate::eval::CALIBRATION_FILE;
use crate::output::{format_time, load_config, open_store};

/// The understudy a promotion names.
struct Chosen {
    /// A config model, or a model version id.
    name: String,
    /// For a model version: its folder.
    path: Option<String>,
}

pub async fn run(config_path: &Path, command: PromoteCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = promote(&config, &store, &command).await;
    store.close().await;
    let change = result?;
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

async fn promote(config: &Config, store: &Store, command: &PromoteCommand) -> anyhow::Result<PolicyChange> {
    let task = config.tasks.get(&command.task).with_context(|| {
        let known: Vec<&str> = config.tasks.keys().map(String::as_str).collect();
        format!("no task `{}` in the config (known: {})", command.task, known.join(", "))
    })?;
    let wants_lead = command.policy == "lead";
    let chosen = if wants_lead && command.model.is_none() {
        None
    } else {
        Some(
            choose_understudy(config, store, &command.task, task.understudy.as_deref(), command.model.as_deref())
                .await?,
        )
    };
    let calibrated = chosen.as_ref().and_then(|chosen| chosen.path.as_deref()).and_then(calibrated_threshold);
    let policy = match (command.threshold, command.policy.split_once(':')) {
        (Some(threshold), None) if command.policy == "cascade" => Policy::parse(&format!("cascade:{threshold}"), None),
        (Some(_), _) => Err("--threshold goes with `--policy cascade`".to_string()),
        (None, _) => Policy::parse(&command.policy, calibrated),
    }
    .map_err(|message| {
        if command.policy == "cascade" && calibrated.is_none() {
            anyhow::anyhow!(
                "{message}: no calibrated threshold was found for this understudy (run `understudy eval --task {}` \
                 on it), or pass --threshold",
                command.task
            )
        } else {
            anyhow::anyhow!(message)
        }
    })?;
    let change = PolicyChange {
        id: Uuid::now_v7().to_string(),
        task: command.task.clone(),
        policy: policy.name(),
        understudy: chosen.as_ref().map(|chosen| chosen.name.clone()),
        understudy_path: chosen.and_then(|chosen| chosen.path),
        created_at: OffsetDateTime::now_utc(),
        note: command.note.clone(),
    };
    store.insert_policy_change(&change).await?;
    Ok(change)
}

async fn choose_understudy(
    config: &Config,
    store: &Store,
    task: &str,
    configured: Option<&str>,
    requested: Option<&str>,
) -> anyhow::Result<Chosen> {
    if let Some(requested) = requested {
        if config.models.contains_key(requested) {
            return Ok(Chosen { name: requested.to_string(), path: None });
        }
        let found = store.get_model_version(requested).await?;
        return match found.as_slice() {
            [version] if version.task == task => {
                Ok(Chosen { name: version.id.clone(), path: Some(version.path.clone()) })
            }
            [version] => anyhow::bail!("model version {} belongs to task {}, not {task}", version.id, version.task),
            [] => anyhow::bail!("`{requested}` is neither a model of the config nor a model version id"),
            _ => anyhow::bail!("`{requested}` is the prefix of several model version ids; give more of it"),
        };
    }
    if let Some(newest) = store.list_model_versions(task).await?.into_iter().next() {
        return Ok(Chosen { name: newest.id, path: Some(newest.path) });
    }
    if let Some(configured) = configured {
        return Ok(Chosen { name: configured.to_string(), path: None });
    }
    anyhow::bail!(
        "task {task} has no understudy to promote: train one (`understudy train --task {task}`), or set `understudy` \
         in [tasks.{task}], or pass --model"
    )
}

/// The threshold `understudy eval` calibrated for the model in `dir`.
pub(crate) fn calibrated_threshold(dir: &str) -> Option<f64> {
    let text = std::fs::read_to_string(Path::new(dir).join(CALIBRATION_FILE)).ok()?;
    serde_json::from_str::<Value>(&text).ok()?.get("threshold")?.as_f64()
}
