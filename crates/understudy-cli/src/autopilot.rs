//! `understudy autopilot`: the loop by itself ([`understudy_loop::Autopilot`]),
//! one pass over the tasks every `--interval-secs`, in its own process at a
//! lower CPU priority and with a thread budget, so a gateway beside it keeps
//! serving; `--release TASK` hands a pinned task back.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use understudy_loop::Autopilot;

use crate::cli::AutopilotCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: AutopilotCommand) -> anyhow::Result<()> {
    // Lower priority than a gateway on the same machine; failing is harmless.
    if let Err(error) = rustix::process::nice(command.nice) {
        tracing::warn!(%error, "could not lower the autopilot's priority");
    }
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = drive(&config, &store, &command).await;
    store.close().await;
    result
}

async fn drive(
    config: &understudy_config::Config,
    store: &understudy_store::Store,
    command: &AutopilotCommand,
) -> anyhow::Result<()> {
    let encoder = crate::output::drift_encoder(config, command.encoder.as_deref())?;
    let mut autopilot = Autopilot::new(config, store, &understudy_local::Loader);
    autopilot.encoder = encoder.as_deref().map(|model| understudy_loop::Encoder { model, name: "drift-encoder" });
    if let Some(task) = &command.release {
        let event = autopilot.release(task).await?;
        println!("task {task}: {} ({} → {})", event.reason, event.stage_from, event.stage_to);
        return Ok(());
    }
    let tasks = match &command.task {
        Some(task) => vec![task.clone()],
        None => autopilot.tasks(),
    };
    anyhow::ensure!(
        !tasks.is_empty(),
        "no task has [tasks.NAME.autopilot] in the config, so there is nothing to drive"
    );
    loop {
        for task in &tasks {
            match autopilot.tick(task).await {
                Ok((events, waiting)) => {
                    for event in &events {
                        if command.json {
                            println!(
                                "{}",
                                json!({"task": task, "from": event.stage_from, "to": event.stage_to,
                                       "reason": event.reason, "evidence": serde_json::from_str::<serde_json::Value>(&event.evidence).ok()})
                            );
                        } else {
                            println!("task {task}: {} → {}: {}", event.stage_from, event.stage_to, event.reason);
                        }
                    }
                    if command.json {
                        println!("{}", json!({"task": task, "waiting": waiting}));
                    } else {
                        println!("task {task}: {waiting}");
                    }
                }
                // One task's failure (a store hiccup, a bad config) does not stop the others.
                Err(error) if !command.once => eprintln!("task {task}: {error}"),
                Err(error) => return Err(error.into()),
            }
        }
        if command.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(command.interval_secs)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
