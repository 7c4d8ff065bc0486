//! `understudy promote`: appends a policy change for a task to the store.
//! Gateways poll the store, so the change reaches every running instance
//! without a restart; `--policy lead` gives the stage back at once.

use std::path::Path;

use anyhow::Context;
use serde_json::json;
use understudy_config::Config;
use understudy_router::Policy;
use understudy_store::{PolicyChange, Store};
use understudy_types::{OffsetDateTime, Uuid};

use crate::cli::PromoteCommand;
use crate::eval::Calibration;
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
    let calibration = match chosen.as_ref().and_then(|chosen| chosen.path.as_deref()) {
        Some(dir) => Calibration::read(dir),
        None => Calibration::Missing,
    };
    let policy = match (command.threshold, command.policy.split_once(':')) {
        (Some(threshold), None) if command.policy == "cascade" => {
            Policy::parse(&format!("cascade:{threshold}"), None).map_err(|error| error.to_string())
        }
        (Some(_), _) => Err("--threshold goes with `--policy cascade`".to_string()),
        (None, _) if command.policy == "cascade" => {
            let threshold = calibration
                .certified_threshold()
                .ok_or_else(|| uncertified(&command.task, chosen.as_ref(), &calibration))?;
            Ok(Policy::Cascade { threshold })
        }
        (None, _) => Policy::parse(&command.policy, None).map_err(|error| error.to_string()),
    }
    .map_err(|message| anyhow::anyhow!(message))?;
    let chosen_by_user = command.threshold.is_some() || command.policy.starts_with("cascade:");
    if let (Policy::Cascade { threshold }, true) = (policy, chosen_by_user) {
        // A threshold the user chose: allowed, but nothing backs the promise.
        let certified = match calibration {
            Calibration::Certified { threshold, target_agreement, delta } => format!(
                "the certified one for this version is {threshold}, for target agreement {target_agreement} with \
                 delta {delta}"
            ),
            _ => "this version has no certified one".to_string(),
        };
        eprintln!(
            "warning: cascade threshold {threshold} is your choice, not certified by `understudy eval` \
             ({certified}): nothing bounds how often the answers it serves disagree with the lead"
        );
    }
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

/// Why a bare `--policy cascade` is refused: `eval` certified no threshold
/// for the understudy, so a cascade would serve answers nothing vouches for.
fn uncertified(task: &str, chosen: Option<&Chosen>, calibration: &Calibration) -> anyhow::Error {
    let name = chosen.map_or("the understudy", |chosen| chosen.name.as_str());
    let why = match (calibration, chosen.and_then(|chosen| chosen.path.as_ref())) {
        (Calibration::Uncertified { target_agreement, delta, n_validation, more_calls_needed }, _) => {
            let more = match more_calls_needed {
                Some(more) => format!("about {more} more labelled calls would be needed; collect them"),
                None => "at the disagreement rates seen, more calls alone would not do; train a better understudy"
                    .to_string(),
            };
            format!(
                "`understudy eval` could not certify a cascade threshold for {name} at target agreement \
                 {target_agreement} (delta {delta}) on {n_validation} validation calls: {more}, then rebuild the \
                 dataset and run `understudy eval --task {task}` again"
            )
        }
        (_, Some(_)) => format!(
            "{name} has no certified cascade threshold: run `understudy eval --task {task} --model {name}` to certify one"
        ),
        (_, None) => format!(
            "{name} is a model of the config, which `understudy eval` does not calibrate, so it has no certified \
             cascade threshold"
        ),
    };
    anyhow::anyhow!(
        "refusing a cascade: {why}. `--policy shadow` remains available: the lead keeps serving while the understudy \
         is scored on live traffic. To serve anyway at a threshold of your own, pass --threshold (not certified)"
    )
}

/// The cascade threshold `understudy eval` certified for the model in `dir`,
/// if it certified one.
pub(crate) fn calibrated_threshold(dir: &str) -> Option<f64> {
    Calibration::read(dir).certified_threshold()
}
