//! Promotion: a policy change for a task appended to the store. Gateways
//! poll the store, so it reaches every running instance without a restart.
//! A bare cascade takes the threshold `evaluate` certified and is refused
//! without one; a threshold the user chooses is allowed, with a warning.

use understudy_config::Config;
use understudy_router::Policy;
use understudy_store::{PolicyChange, Store};
use understudy_types::{OffsetDateTime, Uuid};

use crate::calibration::Calibration;
use crate::error::{LoopError, Result};

/// A promotion as asked for.
#[derive(Debug, Clone)]
pub struct PromoteRequest {
    pub task: String,
    /// `lead`, `shadow`, `canary:PCT`, `cascade`, `cascade:THRESHOLD` or `understudy`.
    pub policy: String,
    /// A model of the config or a model version id (default: the task's
    /// newest version, else the config's `understudy`).
    pub model: Option<String>,
    /// A cascade threshold of the user's own, not certified.
    pub threshold: Option<f64>,
    pub note: Option<String>,
}

/// What a promotion did.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub change: PolicyChange,
    /// Said when the promise is not backed: a threshold the user chose.
    pub warning: Option<String>,
}

/// The understudy a promotion names.
struct Chosen {
    /// A config model, or a model version id.
    name: String,
    /// For a model version: its folder.
    path: Option<String>,
}

pub async fn promote(config: &Config, store: &Store, request: &PromoteRequest) -> Result<Promotion> {
    let task = config.tasks.get(&request.task).ok_or_else(|| {
        let known: Vec<&str> = config.tasks.keys().map(String::as_str).collect();
        LoopError::NotFound(format!("no task `{}` in the config (known: {})", request.task, known.join(", ")))
    })?;
    let wants_lead = request.policy == "lead";
    let chosen = if wants_lead && request.model.is_none() {
        None
    } else {
        Some(
            choose_understudy(config, store, &request.task, task.understudy.as_deref(), request.model.as_deref())
                .await?,
        )
    };
    let calibration = match chosen.as_ref().and_then(|chosen| chosen.path.as_deref()) {
        Some(dir) => Calibration::read(dir),
        None => Calibration::Missing,
    };
    let parse = |text: &str| Policy::parse(text, None).map_err(|error| LoopError::Refused(error.to_string()));
    let policy = match (request.threshold, request.policy.split_once(':')) {
        (Some(threshold), None) if request.policy == "cascade" => parse(&format!("cascade:{threshold}"))?,
        (Some(_), _) => return Err(LoopError::Refused("--threshold goes with `--policy cascade`".to_string())),
        (None, _) if request.policy == "cascade" => {
            let threshold = calibration
                .certified_threshold()
                .ok_or_else(|| LoopError::Refused(uncertified(&request.task, chosen.as_ref(), &calibration)))?;
            Policy::Cascade { threshold }
        }
        (None, _) => parse(&request.policy)?,
    };
    let chosen_by_user = request.threshold.is_some() || request.policy.starts_with("cascade:");
    let warning = match (policy, chosen_by_user) {
        // A threshold the user chose: allowed, but nothing backs the promise.
        (Policy::Cascade { threshold }, true) => {
            let certified = match calibration {
                Calibration::Certified { threshold, target_agreement, delta } => format!(
                    "the certified one for this version is {threshold}, for target agreement {target_agreement} \
                     with delta {delta}"
                ),
                _ => "this version has no certified one".to_string(),
            };
            Some(format!(
                "cascade threshold {threshold} is your choice, not certified by `understudy eval` ({certified}): \
                 nothing bounds how often the answers it serves disagree with the lead"
            ))
        }
        _ => None,
    };
    let change = PolicyChange {
        id: Uuid::now_v7().to_string(),
        task: request.task.clone(),
        policy: policy.name(),
        understudy: chosen.as_ref().map(|chosen| chosen.name.clone()),
        understudy_path: chosen.and_then(|chosen| chosen.path),
        created_at: OffsetDateTime::now_utc(),
        note: request.note.clone(),
    };
    store.insert_policy_change(&change).await?;
    Ok(Promotion { change, warning })
}

async fn choose_understudy(
    config: &Config,
    store: &Store,
    task: &str,
    configured: Option<&str>,
    requested: Option<&str>,
) -> Result<Chosen> {
    if let Some(requested) = requested {
        if config.models.contains_key(requested) {
            return Ok(Chosen { name: requested.to_string(), path: None });
        }
        let found = store.get_model_version(requested).await?;
        return match found.as_slice() {
            [version] if version.task == task => {
                Ok(Chosen { name: version.id.clone(), path: Some(version.path.clone()) })
            }
            [version] => Err(LoopError::Refused(format!(
                "model version {} belongs to task {}, not {task}",
                version.id, version.task
            ))),
            [] => Err(LoopError::NotFound(format!(
                "`{requested}` is neither a model of the config nor a model version id"
            ))),
            _ => Err(LoopError::Refused(format!(
                "`{requested}` is the prefix of several model version ids; give more of it"
            ))),
        };
    }
    if let Some(newest) = store.list_model_versions(task).await?.into_iter().next() {
        return Ok(Chosen { name: newest.id, path: Some(newest.path) });
    }
    if let Some(configured) = configured {
        return Ok(Chosen { name: configured.to_string(), path: None });
    }
    Err(LoopError::NotFound(format!(
        "task {task} has no understudy to promote: train one (`understudy train --task {task}`), or set `understudy` \
         in [tasks.{task}], or pass --model"
    )))
}

/// Why a bare cascade is refused: `evaluate` certified no threshold for the
/// understudy, so a cascade would serve answers nothing vouches for.
fn uncertified(task: &str, chosen: Option<&Chosen>, calibration: &Calibration) -> String {
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
    format!(
        "refusing a cascade: {why}. `--policy shadow` remains available: the lead keeps serving while the understudy \
         is scored on live traffic. To serve anyway at a threshold of your own, pass --threshold (not certified)"
    )
}
