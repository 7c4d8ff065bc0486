//! `understudy dataset build|import|export|list|show`.
//!
//! The build itself is `understudy_datasets::build`; this module reads its
//! input (the store's calls, or a JSONL file), writes the version's files,
//! registers it in the store and prints what happened.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::build::{
    build_dataset, eligible_calls, eligible_examples, examples_from_calls, BuildConfig, BuildInput, BuiltDataset,
    DatasetSource, Manifest,
};
use understudy_datasets::dedup::NearDupConfig;
use understudy_datasets::files::{read_manifest, read_split, write_dataset};
use understudy_datasets::jsonl::{format_time as rfc3339, read_examples, ChatExample};
use understudy_datasets::split::SplitShares;
use understudy_store::{CallFilter, DatasetRecord, StatusFilter, Store};
use understudy_types::{Endpoint, OffsetDateTime, TaskKind};

use crate::cli::{DatasetBuildArgs, DatasetCommand};
use crate::output::{format_time, load_config, open_store, parse_time, table};

pub async fn run(config_path: &Path, command: DatasetCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = run_with_store(&config, &store, command).await;
    store.close().await;
    result
}

async fn run_with_store(config: &Config, store: &Store, command: DatasetCommand) -> anyhow::Result<()> {
    match command {
        DatasetCommand::Build { task, options } => {
            let build_config = build_config(config, &task, &options, DatasetSource::Calls)?;
            let filter = CallFilter { task: Some(task.clone()), status: Some(StatusFilter::Ok), ..Default::default() };
            let calls: Vec<_> = store
                .list_calls(&filter)
                .await?
                .into_iter()
                .filter(|call| call.endpoint == Endpoint::ChatCompletions)
                .collect();
            if calls.is_empty() {
                let hint = if config.tasks.contains_key(&task) { "" } else { ", and it is not in the config" };
                anyhow::bail!("task `{task}` has no successful chat calls in the store{hint}");
            }
            let verdicts = store.task_feedback(&task).await?;
            let scores: HashMap<_, _> = verdicts.iter().map(|(call_id, feedback)| (*call_id, feedback.score)).collect();
            let (calls, feedback) = eligible_calls(calls, &scores);
            // Calls all rated negative leave nothing: the build says so, feedback counted.
            let (examples, n_unreadable) = examples_from_calls(&calls, &verdicts);
            let built_at = OffsetDateTime::now_utc();
            let built =
                build_dataset(BuildInput { task, examples, n_unreadable, feedback, config: build_config, built_at })?;
            save_and_report(config, store, &built, built_at, options.json).await
        }
        DatasetCommand::Import { task, file, options } => {
            let build_config = build_config(config, &task, &options, DatasetSource::Import)?;
            let examples = read_jsonl(&file)?;
            if examples.is_empty() {
                anyhow::bail!("{} holds no examples", file.display());
            }
            // Lines carrying feedback (`metadata.feedback`) count as calls rated so.
            let (examples, feedback) = eligible_examples(examples);
            let built_at = OffsetDateTime::now_utc();
            let built = build_dataset(BuildInput {
                task,
                examples,
                n_unreadable: 0,
                feedback,
                config: build_config,
                built_at,
            })?;
            save_and_report(config, store, &built, built_at, options.json).await
        }
        DatasetCommand::Export { id, output, split } => {
            let dataset = find_dataset(store, &id).await?;
            let text = read_split(Path::new(&dataset.path), &split)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "exported {} rows ({split}) of {} to {}",
                        text.lines().count(),
                        dataset.id,
                        path.display()
                    );
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
            }
            Ok(())
        }
        DatasetCommand::List { task, json } => {
            let datasets = store.list_datasets(task.as_deref()).await?;
            let mut stdout = std::io::stdout().lock();
            if json {
                for dataset in &datasets {
                    writeln!(stdout, "{}", record_json(dataset))?;
                }
            } else {
                let rows: Vec<Vec<String>> = datasets
                    .iter()
                    .map(|dataset| {
                        vec![
                            dataset.id.clone(),
                            format_time(dataset.created_at),
                            dataset.task.clone(),
                            dataset.kind.as_str().to_string(),
                            dataset.labels.len().to_string(),
                            dataset.n_train.to_string(),
                            dataset.n_validation.to_string(),
                            dataset.n_test.to_string(),
                        ]
                    })
                    .collect();
                let header = ["id", "created (UTC)", "task", "kind", "labels", "train", "validation", "test"];
                write!(stdout, "{}", table(&header, &rows))?;
            }
            stdout.flush()?;
            Ok(())
        }
        DatasetCommand::Show { id, json } => {
            let dataset = find_dataset(store, &id).await?;
            let manifest = read_manifest(Path::new(&dataset.path))
                .with_context(|| format!("dataset {} is registered, but its files are unreadable", dataset.id))?;
            let mut stdout = std::io::stdout().lock();
            if json {
                let mut value = serde_json::to_value(&manifest)?;
                value["path"] = Value::String(dataset.path.clone());
                writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                write!(stdout, "{}", summary(&manifest))?;
                writeln!(stdout, "files: {}", dataset.path)?;
            }
            stdout.flush()?;
            Ok(())
        }
    }
}

/// Raw flags, and the task's kind from the config, as a checked build config.
fn build_config(
    config: &Config,
    task: &str,
    options: &DatasetBuildArgs,
    source: DatasetSource,
) -> anyhow::Result<BuildConfig> {
    let build_config = BuildConfig {
        source,
        since: options.since.as_deref().map(|text| parse_time(text, "since")).transpose()?,
        until: options.until.as_deref().map(|text| parse_time(text, "until")).transpose()?,
        min_chars: options.min_chars,
        max_chars: options.max_chars,
        near_dup: NearDupConfig { threshold: options.near_dup_threshold, ..NearDupConfig::default() },
        scrub: options.scrub,
        shares: SplitShares { validation: options.validation_share, test: options.test_share },
        kind_override: config.tasks.get(task).and_then(|task| task.kind),
    };
    // Checked here too, before any rows are read, so bad flags fail fast.
    build_config.check()?;
    Ok(build_config)
}

/// Every example in a JSONL file; a malformed line fails the whole import,
/// since a dataset version with silently missing rows is worse than none.
fn read_jsonl(file: &Path) -> anyhow::Result<Vec<ChatExample>> {
    let opened = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let read =
        read_examples(std::io::BufReader::new(opened)).with_context(|| format!("cannot read {}", file.display()))?;
    if !read.bad_lines.is_empty() {
        for (line_no, error) in &read.bad_lines {
            eprintln!("{}:{line_no}: {error}", file.display());
        }
        anyhow::bail!("{} malformed lines in {}; no dataset was made", read.bad_lines.len(), file.display());
    }
    Ok(read.examples.into_iter().map(|(_, example)| example).collect())
}

/// Writes the version's files, registers it, and prints the summary (or the manifest).
async fn save_and_report(
    config: &Config,
    store: &Store,
    built: &BuiltDataset,
    built_at: OffsetDateTime,
    json: bool,
) -> anyhow::Result<()> {
    let datasets_dir = &config.store.datasets_dir;
    std::fs::create_dir_all(datasets_dir)
        .with_context(|| format!("cannot create the datasets folder {}", datasets_dir.display()))?;
    let (dataset_dir, _written) = write_dataset(datasets_dir, built)?;
    let manifest = &built.manifest;
    let record = DatasetRecord {
        id: manifest.id.clone(),
        task: manifest.task.clone(),
        created_at: built_at,
        kind: built.kind(),
        labels: manifest.labels.clone(),
        n_train: manifest.counts.train,
        n_validation: manifest.counts.validation,
        n_test: manifest.counts.test,
        parameters: manifest.parameters.to_string(),
        path: absolute(&dataset_dir).display().to_string(),
    };
    let is_new = store.register_dataset(&record).await?;
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(manifest)?)?;
    } else {
        let status = if is_new { "new" } else { "already registered: same rows, same parameters" };
        writeln!(stdout, "dataset {} ({status})", manifest.id)?;
        write!(stdout, "{}", summary(manifest))?;
        writeln!(stdout, "files: {}", record.path)?;
    }
    stdout.flush()?;
    Ok(())
}

/// The human-readable account of a version: counts, labels, filters, overlap.
fn summary(manifest: &Manifest) -> String {
    let mut text = String::new();
    let how = if manifest.kind_overridden { "set in the config" } else { "detected" };
    text.push_str(&format!("task {}, {} task ({how}), built {}\n", manifest.task, manifest.kind, manifest.created_at));
    let counts = manifest.counts;
    text.push_str(&format!(
        "rows: {} train, {} validation, {} test (time order: {})\n",
        counts.train, counts.validation, counts.test, manifest.time_order
    ));
    if manifest.kind == TaskKind::Label.as_str() {
        text.push_str(&format!("labels ({}):\n", manifest.labels.len()));
        let rows: Vec<Vec<String>> = manifest
            .label_distribution
            .iter()
            .map(|count| {
                vec![count.label.clone(), count.train.to_string(), count.validation.to_string(), count.test.to_string()]
            })
            .collect();
        for line in table(&["label", "train", "validation", "test"], &rows).lines() {
            text.push_str(&format!("  {line}\n"));
        }
    }
    let filters = &manifest.filters;
    text.push_str(&format!("filters: {filters}; {} kept\n", filters.n_kept));
    if manifest.parameters.get("scrub").and_then(Value::as_bool) == Some(true) {
        let scrubbed = filters.scrubbed;
        text.push_str(&format!(
            "scrubbed: {} rows ({} e-mail addresses, {} phone numbers, {} secrets)\n",
            filters.scrubbed_rows, scrubbed.emails, scrubbed.phones, scrubbed.secrets
        ));
    }
    let overlap = manifest.overlap;
    text.push_str(&format!(
        "prompt overlap: train/test {}, train/validation {}, validation/test {}\n",
        overlap.train_test, overlap.train_validation, overlap.validation_test
    ));
    text
}

/// The dataset a command on `task` works on: the one named, or the task's newest.
pub(crate) async fn task_dataset(store: &Store, task: &str, id: Option<&str>) -> anyhow::Result<DatasetRecord> {
    let dataset = match id {
        Some(id) => find_dataset(store, id).await?,
        None => store.list_datasets(Some(task)).await?.into_iter().next().with_context(|| {
            format!("task `{task}` has no dataset yet; run `understudy dataset build --task {task}`")
        })?,
    };
    anyhow::ensure!(dataset.task == task, "dataset {} belongs to task `{}`, not `{task}`", dataset.id, dataset.task);
    Ok(dataset)
}

pub(crate) async fn find_dataset(store: &Store, id: &str) -> anyhow::Result<DatasetRecord> {
    let mut found = store.get_dataset(id).await?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => anyhow::bail!("no dataset with id `{id}` (see `understudy dataset list`)"),
        _ => anyhow::bail!("`{id}` is the prefix of more than one dataset id; give more of it"),
    }
}

fn record_json(dataset: &DatasetRecord) -> Value {
    json!({
        "id": dataset.id,
        "task": dataset.task,
        "created_at": rfc3339(dataset.created_at),
        "kind": dataset.kind.as_str(),
        "labels": dataset.labels,
        "counts": {"train": dataset.n_train, "validation": dataset.n_validation, "test": dataset.n_test},
        "parameters": serde_json::from_str::<Value>(&dataset.parameters).unwrap_or(Value::Null),
        "path": dataset.path,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
