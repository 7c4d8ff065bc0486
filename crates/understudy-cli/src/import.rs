//! `understudy import`: past calls from OpenAI fine-tuning JSONL into the store.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use understudy_datasets::jsonl::read_examples;
use understudy_loop::Imported;

use crate::cli::ImportCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: ImportCommand) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    let file = std::fs::File::open(&command.file).with_context(|| format!("cannot open {}", command.file.display()))?;
    let read = read_examples(std::io::BufReader::new(file))
        .with_context(|| format!("cannot read {}", command.file.display()))?;
    let file_label = command.file.display().to_string();
    for (line_no, error) in &read.bad_lines {
        eprintln!("{file_label}:{line_no}: {error}");
    }
    if command.strict && !read.bad_lines.is_empty() {
        anyhow::bail!("{} malformed lines in {file_label}; nothing was imported (--strict)", read.bad_lines.len());
    }
    let store = open_store(&config).await?;
    let imported = understudy_loop::import_calls(
        &config,
        &store,
        &command.task,
        command.model.as_deref(),
        &file_label,
        &read.examples,
    )
    .await;
    store.close().await;
    let Imported { n_calls, n_feedback } = imported.context("import failed; nothing was imported")?;
    let with_feedback = if n_feedback == 0 { String::new() } else { format!(" ({n_feedback} with feedback)") };
    println!("imported {n_calls} calls{with_feedback} into task `{}` from {file_label}", command.task);
    if read.bad_lines.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("skipped {} malformed lines (listed above); the good lines were imported", read.bad_lines.len());
        Ok(ExitCode::FAILURE)
    }
}
