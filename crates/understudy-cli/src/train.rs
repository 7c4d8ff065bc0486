//! `understudy train`: flags into a [`TrainRequest`], the run
//! ([`understudy_loop::train`]), and what it registered.

use std::path::Path;

use serde_json::json;
use understudy_loop::{TrainRequest, TrainSummary};

use crate::cli::TrainCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: TrainCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let request = TrainRequest {
        task: command.task.clone(),
        dataset: command.dataset.clone(),
        method: command.method.into(),
        base: command.base.clone(),
        output: command.output.clone(),
        resume: command.resume,
        checkpoint_every: usize::try_from(command.checkpoint_every).unwrap_or(usize::MAX),
        epochs: command.epochs,
        batch_size: command.batch_size,
        learning_rate: command.learning_rate,
        train_top_layers: command.train_top_layers,
        patience: command.patience,
        rank: command.rank,
        alpha: command.alpha,
        lora_dropout: command.lora_dropout,
        targets: command.targets.clone(),
        max_steps: command.max_steps,
        seq_len: command.seq_len,
        grad_accum: command.grad_accum,
        metric_rows: command.metric_rows,
        metric_max_tokens: usize::try_from(command.metric_max_tokens).unwrap_or(usize::MAX),
        progress: true,
    };
    let trained = async {
        let job = understudy_loop::train::prepare(&config, &store, &request).await?;
        eprintln!("{}", job.describe());
        job.run(&store).await
    }
    .await;
    store.close().await;
    let trained = trained?;
    let version = &trained.version;
    if command.json {
        println!("{}", json!({"model_version": version.id, "path": version.path, "metrics": trained.metrics}));
        return Ok(());
    }
    match trained.summary {
        TrainSummary::Classifier { best_epoch, best_validation_accuracy, steps, wall_seconds } => {
            println!("model version {} for task `{}`", version.id, version.task);
            println!(
                "    best epoch {best_epoch:?}, validation accuracy {:.4}",
                best_validation_accuracy.unwrap_or(0.0)
            );
            println!("    {steps} steps in {wall_seconds:.0}s; saved in {}", version.path);
        }
        TrainSummary::Lora {
            initial_validation_loss,
            best_validation_loss,
            best_epoch,
            task_metric,
            steps,
            wall_seconds,
            tokens_per_second,
        } => {
            println!("model version {} for task `{}` (LoRA adapter, PEFT format)", version.id, version.task);
            println!(
                "    validation loss {initial_validation_loss:.4} before training, {:.4} at best epoch {best_epoch:?}",
                best_validation_loss.unwrap_or(f64::NAN),
            );
            if let Some((name, initial, best)) = task_metric {
                println!("    {name} {initial:.4} before training, {best:.4} at the best epoch");
            }
            println!(
                "    {steps} steps in {wall_seconds:.0}s ({tokens_per_second:.0} tokens/s); saved in {}",
                version.path
            );
        }
    }
    Ok(())
}
