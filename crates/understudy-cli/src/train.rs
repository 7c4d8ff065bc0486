//! `understudy train`: fine-tunes an understudy on a task's dataset and
//! registers the result as a model version.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use understudy_config::Config;
use understudy_datasets::files::read_split;
use understudy_datasets::jsonl::ChatExample;
use understudy_datasets::kind::normalize_label;
use understudy_store::{DatasetRecord, ModelVersionRecord};
use understudy_trainer::{
    prompt_text, train_classifier, train_lora, ChatRow, ClassifierTrainConfig, LabeledText, LoraTrainConfig, TaskMetric,
};
use understudy_types::{OffsetDateTime, TaskKind};

use crate::cli::{TrainCommand, TrainMethod};
use crate::dataset::task_dataset;
use crate::output::{load_config, open_store};

/// Where `scripts/fetch-models.sh` puts MiniLM, relative to the config's folder.
const DEFAULT_ENCODER: &str = "models/all-MiniLM-L6-v2";
/// Where `scripts/fetch-models.sh` puts SmolLM2 (a GGUF file), likewise.
const DEFAULT_CAUSAL_LM: &str = "models/SmolLM2-135M-Instruct";
/// The names `--base` knows without a config entry, and where they live.
const BUILT_IN_BASES: [(&str, &str); 2] = [("minilm", DEFAULT_ENCODER), ("smollm2", DEFAULT_CAUSAL_LM)];

/// What kind of base model a method needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BaseKind {
    /// An HF encoder folder.
    Encoder,
    /// A GGUF file or folder, or an HF causal LM folder.
    CausalLm,
}

pub async fn run(config_path: &Path, command: TrainCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let dataset = task_dataset(&store, &command.task, command.dataset.as_deref()).await?;
    let method = match (command.method, dataset.kind) {
        (TrainMethod::Auto | TrainMethod::Classifier, TaskKind::Label) => TrainMethod::Classifier,
        (TrainMethod::Classifier, TaskKind::Generation) => anyhow::bail!(
            "a classifier needs a label task, and dataset {} is a generation task (set `kind = \"label\"` \
             in [tasks.{}] if its answers are labels)",
            dataset.id,
            dataset.task
        ),
        (TrainMethod::Auto | TrainMethod::Lora, _) => TrainMethod::Lora,
    };
    if matches!(method, TrainMethod::Lora) {
        return run_lora(config_path, &config, store, dataset, command).await;
    }
    let base = resolve_base(config_path, &config, command.base.as_deref(), BaseKind::Encoder)?;
    let (train, validation) = read_labelled(&dataset)?;
    let output_dir = match &command.output {
        Some(dir) => dir.clone(),
        None => understudies_dir(&config).join(&dataset.task).join(format!("{}-classifier", dataset.id)),
    };

    let mut train_config = ClassifierTrainConfig::new(&base, &output_dir);
    train_config.resume = command.resume;
    train_config.checkpoint_every_steps = Some(checkpoint_every(&command));
    train_config.dataset_id = Some(dataset.id.clone());
    if let Some(epochs) = command.epochs {
        train_config.epochs = epochs;
    }
    if let Some(batch_size) = command.batch_size {
        train_config.batch_size = batch_size;
    }
    if let Some(learning_rate) = command.learning_rate {
        train_config.learning_rate = learning_rate;
    }
    train_config.train_top_layers = command.train_top_layers;
    if let Some(patience) = command.patience {
        train_config.patience = patience;
    }
    eprintln!(
        "training a classifier for task `{}` on dataset {} ({} train, {} validation rows) from {}",
        dataset.task,
        dataset.id,
        train.len(),
        validation.len(),
        base.display()
    );
    let report = tokio::task::spawn_blocking(move || train_classifier(&train_config, &train, &validation))
        .await
        .context("the training task failed")??;
    if report.interrupted {
        anyhow::bail!("training stopped before the end; resume it with --resume");
    }
    let metrics = json!({
        "best_epoch": report.best_epoch,
        "best_validation_accuracy": report.best_validation_accuracy,
        "epochs": report.epochs,
        "steps": report.steps,
        "stopped_early": report.stopped_early,
        "labels": report.labels,
    });
    let version =
        register(&store, &dataset, "classifier", &base, &report.output_dir, report.wall_seconds, &metrics).await?;
    store.close().await;
    if command.json {
        println!("{}", json!({"model_version": version.id, "path": version.path, "metrics": metrics}));
    } else {
        println!("model version {} for task `{}`", version.id, version.task);
        println!(
            "    best epoch {:?}, validation accuracy {:.4}",
            report.best_epoch,
            report.best_validation_accuracy.unwrap_or(0.0)
        );
        println!("    {} steps in {:.0}s; saved in {}", report.steps, report.wall_seconds, version.path);
    }
    Ok(())
}

/// Labelled rows of the train and validation splits: the classifier reads the
/// prompt's user text and learns the lead's normalized answer.
fn read_labelled(dataset: &DatasetRecord) -> anyhow::Result<(Vec<LabeledText>, Vec<LabeledText>)> {
    let dir = Path::new(&dataset.path);
    let read = |split: &str| -> anyhow::Result<Vec<LabeledText>> {
        let text = read_split(dir, split)?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(line_idx, line)| {
                let example = ChatExample::parse(line)
                    .map_err(|error| anyhow::anyhow!("{}/{split}.jsonl:{}: {error}", dir.display(), line_idx + 1))?;
                Ok(LabeledText { text: prompt_text(&example.prompt), label: normalize_label(&example.answer_text()) })
            })
            .collect()
    };
    Ok((read("train")?, read("validation")?))
}

/// `--checkpoint-every` as the trainers take it (clap refuses 0).
fn checkpoint_every(command: &TrainCommand) -> usize {
    usize::try_from(command.checkpoint_every).unwrap_or(usize::MAX).max(1)
}

/// The base model `--base` names: a model of the config with a `path`, a
/// path that holds a model, or a built-in name under `models/` next to the
/// config (or the working folder). Without `--base`, the method's built-in.
fn resolve_base(config_path: &Path, config: &Config, base: Option<&str>, kind: BaseKind) -> anyhow::Result<PathBuf> {
    let config_dir = config_path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let is_model = |candidate: &Path| {
        candidate.join("config.json").is_file() || (kind == BaseKind::CausalLm && understudy_models_gguf(candidate))
    };
    let what = match kind {
        BaseKind::Encoder => "an HF encoder folder",
        BaseKind::CausalLm => "a GGUF file, a folder holding one, or an HF Llama/Qwen2 folder",
    };
    let default = match kind {
        BaseKind::Encoder => "minilm",
        BaseKind::CausalLm => "smollm2",
    };
    let name = base.unwrap_or(default);
    if let Some(model) = config.models.get(name) {
        let path = model.path.as_deref().with_context(|| {
            format!("--base {name}: [models.{name}] has no `path`, so it is not a model on this machine")
        })?;
        anyhow::ensure!(
            !path.starts_with("hf:"),
            "--base {name}: [models.{name}] names `{path}`; training needs the model's files on this machine"
        );
        let path = PathBuf::from(path);
        anyhow::ensure!(is_model(&path), "--base {name}: [models.{name}] path {} is not {what}", path.display());
        return Ok(path);
    }
    let as_path = PathBuf::from(name);
    if is_model(&as_path) {
        return Ok(as_path);
    }
    let built_in = BUILT_IN_BASES.iter().find(|(alias, _)| *alias == name.to_ascii_lowercase());
    if let Some((alias, relative)) = built_in {
        let candidates = [config_dir.join(relative), PathBuf::from(relative)];
        return candidates.iter().find(|candidate| is_model(candidate)).cloned().with_context(|| {
            format!(
                "no base model at {} for `{alias}`: run scripts/fetch-models.sh",
                candidates.iter().map(|candidate| candidate.display().to_string()).collect::<Vec<_>>().join(" or ")
            )
        });
    }
    let mut aliases: Vec<&str> = config
        .models
        .iter()
        .filter(|(_, model)| model.path.as_deref().is_some_and(|path| !path.starts_with("hf:")))
        .map(|(alias, _)| alias.as_str())
        .collect();
    aliases.sort_unstable();
    let configured = if aliases.is_empty() { "none".to_string() } else { aliases.join(", ") };
    let built_ins: Vec<&str> = BUILT_IN_BASES.iter().map(|(alias, _)| *alias).collect();
    anyhow::bail!(
        "no base model at {name}: --base takes {what}, a model of the config with a path ({configured}), \
         or a built-in name ({})",
        built_ins.join(", ")
    )
}

/// A `.gguf` file, or a folder holding one.
fn understudy_models_gguf(path: &Path) -> bool {
    let is_gguf = |path: &Path| path.extension().is_some_and(|ext| ext == "gguf");
    if path.is_file() {
        return is_gguf(path);
    }
    std::fs::read_dir(path)
        .map(|entries| entries.filter_map(Result::ok).any(|entry| is_gguf(&entry.path())))
        .unwrap_or(false)
}

/// LoRA SFT of a causal LM on the dataset's chat examples; the adapter is
/// registered as a model version with method `lora`.
async fn run_lora(
    config_path: &Path,
    config: &Config,
    store: understudy_store::Store,
    dataset: DatasetRecord,
    command: TrainCommand,
) -> anyhow::Result<()> {
    let base = resolve_base(config_path, config, command.base.as_deref(), BaseKind::CausalLm)?;
    let (train, validation) = read_chats(&dataset)?;
    let output_dir = match &command.output {
        Some(dir) => dir.clone(),
        None => understudies_dir(config).join(&dataset.task).join(format!("{}-lora", dataset.id)),
    };
    let mut train_config = LoraTrainConfig::new(&base, &output_dir);
    train_config.resume = command.resume;
    train_config.checkpoint_every_steps = Some(checkpoint_every(&command));
    train_config.dataset_id = Some(dataset.id.clone());
    if let Some(epochs) = command.epochs {
        train_config.epochs = epochs;
    }
    if let Some(batch_size) = command.batch_size {
        train_config.batch_size = batch_size;
    }
    if let Some(learning_rate) = command.learning_rate {
        train_config.learning_rate = learning_rate;
    }
    if let Some(rank) = command.rank {
        train_config.lora.rank = rank;
        train_config.lora.alpha = 2.0 * rank as f64;
    }
    if let Some(alpha) = command.alpha {
        train_config.lora.alpha = alpha;
    }
    if let Some(dropout) = command.lora_dropout {
        train_config.lora.dropout = dropout;
    }
    if let Some(targets) = &command.targets {
        train_config.lora.target_modules =
            targets.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    }
    train_config.max_steps = command.max_steps;
    if let Some(patience) = command.patience {
        train_config.patience = patience;
    }
    train_config.metric_rows = command.metric_rows;
    train_config.task_metric = match dataset.kind {
        // The labels eval constrains a causal LM to: every answer of the train split.
        TaskKind::Label => TaskMetric::LabelAccuracy {
            labels: train
                .iter()
                .map(|row| normalize_label(&row.answer))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        },
        TaskKind::Generation => {
            TaskMetric::TokenF1 { max_new_tokens: usize::try_from(command.metric_max_tokens).unwrap_or(usize::MAX) }
        }
    };
    if let Some(seq_len) = command.seq_len {
        train_config.seq_len = seq_len;
    }
    if let Some(grad_accum) = command.grad_accum {
        train_config.grad_accum_steps = grad_accum;
    }
    eprintln!(
        "training a LoRA adapter (rank {}, alpha {}, on {}) for task `{}` on dataset {} ({} train, {} validation rows) from {}",
        train_config.lora.rank,
        train_config.lora.alpha,
        train_config.lora.target_modules.join(","),
        dataset.task,
        dataset.id,
        train.len(),
        validation.len(),
        base.display()
    );
    let report = tokio::task::spawn_blocking(move || train_lora(&train_config, &train, &validation))
        .await
        .context("the training task failed")??;
    if report.interrupted {
        anyhow::bail!("training stopped before the end; resume it with --resume");
    }
    let metrics = json!({
        "initial_validation_loss": report.initial_validation_loss,
        "task_metric": report.task_metric_name,
        "initial_task_metric": report.initial_task_metric,
        "best_epoch": report.best_epoch,
        "best_validation_loss": report.best_validation_loss,
        "best_task_metric": report.best_task_metric,
        "epochs": report.epochs,
        "steps": report.steps,
        "stopped_early": report.stopped_early,
        "tokens_per_second": report.tokens_per_second,
        "trained_parameters": report.trained_parameters,
    });
    let version = register(&store, &dataset, "lora", &base, &report.output_dir, report.wall_seconds, &metrics).await?;
    store.close().await;
    if command.json {
        println!("{}", json!({"model_version": version.id, "path": version.path, "metrics": metrics}));
    } else {
        println!("model version {} for task `{}` (LoRA adapter, PEFT format)", version.id, version.task);
        println!(
            "    validation loss {:.4} before training, {:.4} at best epoch {:?}",
            report.initial_validation_loss,
            report.best_validation_loss.unwrap_or(f64::NAN),
            report.best_epoch
        );
        if let (Some(name), Some(initial), Some(best)) =
            (report.task_metric_name, report.initial_task_metric, report.best_task_metric)
        {
            println!("    {name} {initial:.4} before training, {best:.4} at the best epoch");
        }
        println!(
            "    {} steps in {:.0}s ({:.0} tokens/s); saved in {}",
            report.steps, report.wall_seconds, report.tokens_per_second, version.path
        );
    }
    Ok(())
}

/// Chat rows of the train and validation splits: the prompt's messages and
/// the lead's answer.
fn read_chats(dataset: &DatasetRecord) -> anyhow::Result<(Vec<ChatRow>, Vec<ChatRow>)> {
    let dir = Path::new(&dataset.path);
    let read = |split: &str| -> anyhow::Result<Vec<ChatRow>> {
        let text = read_split(dir, split)?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(line_idx, line)| {
                let example = ChatExample::parse(line)
                    .map_err(|error| anyhow::anyhow!("{}/{split}.jsonl:{}: {error}", dir.display(), line_idx + 1))?;
                Ok(ChatRow::from_messages(&example.prompt, &example.answer_text()))
            })
            .collect()
    };
    Ok((read("train")?, read("validation")?))
}

/// Trained understudies live next to the datasets.
fn understudies_dir(config: &Config) -> PathBuf {
    config.store.datasets_dir.parent().map_or_else(|| PathBuf::from("understudies"), |dir| dir.join("understudies"))
}

/// Registers a finished run as a model version of the dataset's task.
async fn register(
    store: &understudy_store::Store,
    dataset: &DatasetRecord,
    method: &str,
    base: &Path,
    output_dir: &Path,
    wall_seconds: f64,
    metrics: &serde_json::Value,
) -> anyhow::Result<ModelVersionRecord> {
    let version = ModelVersionRecord {
        id: format!("mv-{}", &understudy_types::Uuid::now_v7().simple().to_string()[..16]),
        task: dataset.task.clone(),
        dataset_id: dataset.id.clone(),
        method: method.into(),
        base_model: base.display().to_string(),
        path: std::path::absolute(output_dir)?.display().to_string(),
        created_at: OffsetDateTime::now_utc(),
        wall_seconds,
        metrics: metrics.to_string(),
    };
    store.register_model_version(&version).await?;
    Ok(version)
}
