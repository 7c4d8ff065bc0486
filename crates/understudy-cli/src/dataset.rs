//! `understudy dataset build|import|export|list|show`.
//!
//! Building and importing are the loop's (`understudy_loop::build_dataset`,
//! `import_dataset`); this module turns flags into options and prints what
//! happened, and lists, shows and exports registered versions.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::build::Manifest;
use understudy_datasets::files::{read_manifest, read_split};
use understudy_datasets::jsonl::format_time as rfc3339;
use understudy_datasets::split::SplitShares;
use understudy_loop::{find_dataset, DatasetOptions, SavedDataset};
use understudy_store::{DatasetRecord, Store};
use understudy_types::TaskKind;

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
            let saved = understudy_loop::build_dataset(config, store, &task, &dataset_options(&options)?).await?;
            report(&saved, options.json)
        }
        DatasetCommand::Import { task, file, options } => {
            let saved =
                understudy_loop::import_dataset(config, store, &task, &file, &dataset_options(&options)?).await?;
            report(&saved, options.json)
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

/// The build flags as the loop takes them.
fn dataset_options(options: &DatasetBuildArgs) -> anyhow::Result<DatasetOptions> {
    Ok(DatasetOptions {
        since: options.since.as_deref().map(|text| parse_time(text, "since")).transpose()?,
        until: options.until.as_deref().map(|text| parse_time(text, "until")).transpose()?,
        min_chars: options.min_chars,
        max_chars: options.max_chars,
        near_dup_threshold: options.near_dup_threshold,
        scrub: options.scrub,
        shares: SplitShares { validation: options.validation_share, test: options.test_share },
    })
}

/// Prints the summary of a saved version (or its manifest).
fn report(saved: &SavedDataset, json: bool) -> anyhow::Result<()> {
    let manifest = &saved.manifest;
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(manifest)?)?;
    } else {
        let status = if saved.is_new { "new" } else { "already registered: same rows, same parameters" };
        writeln!(stdout, "dataset {} ({status})", manifest.id)?;
        write!(stdout, "{}", summary(manifest))?;
        writeln!(stdout, "files: {}", saved.record.path)?;
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
