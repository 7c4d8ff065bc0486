//! `understudy import`: past calls from OpenAI fine-tuning JSONL into the store.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use understudy_config::Config;
use understudy_datasets::jsonl::{read_examples, ImportContext};
use understudy_providers::tokens;
use understudy_types::{Money, OffsetDateTime, Usage, UsageSource};

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
    let default_model = match &command.model {
        Some(model) => Some(model.clone()),
        None => config.tasks.get(&command.task).map(|task| task.lead.clone()),
    };
    // Lines without a time keep their order: each is one millisecond after the last.
    let import_started = OffsetDateTime::now_utc();
    let mut calls = Vec::with_capacity(read.examples.len());
    let mut feedback = Vec::new();
    for (example_idx, (line_no, example)) in read.examples.iter().enumerate() {
        let model = example.model.clone().or_else(|| default_model.clone()).with_context(|| {
            format!(
                "{file_label}:{line_no}: the line names no model, and task `{}` is not in the config (pass --model)",
                command.task
            )
        })?;
        let (usage, usage_source) = match example.usage {
            Some(usage) => (usage, UsageSource::Provider),
            None => (
                Usage {
                    prompt_tokens: tokens::count_messages(&example.prompt),
                    completion_tokens: tokens::count_answer(&serde_json::Value::Object(example.answer.clone())),
                },
                UsageSource::Counted,
            ),
        };
        let created_at =
            example.created_at.unwrap_or_else(|| import_started + time::Duration::milliseconds(example_idx as i64));
        let call = example.to_call(ImportContext {
            task: Some(command.task.clone()),
            cost: cost_of(&config, &model, usage),
            model,
            usage,
            usage_source,
            created_at,
        });
        // A verdict without a time is taken as given when the call was made.
        feedback.extend(example.feedback.as_ref().map(|verdict| verdict.to_feedback(call.id, created_at)));
        calls.push(call);
    }
    let store = open_store(&config).await?;
    // One transaction: a failure part-way leaves nothing half-imported.
    store.insert_calls_with_feedback(&calls, &feedback).await.context("import failed; nothing was imported")?;
    store.close().await;
    let with_feedback =
        if feedback.is_empty() { String::new() } else { format!(" ({} with feedback)", feedback.len()) };
    println!("imported {} calls{with_feedback} into task `{}` from {file_label}", calls.len(), command.task);
    if read.bad_lines.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("skipped {} malformed lines (listed above); the good lines were imported", read.bad_lines.len());
        Ok(ExitCode::FAILURE)
    }
}

fn cost_of(config: &Config, model: &str, usage: Usage) -> Money {
    match config.models.get(model) {
        Some(model) => model.price.cost(usage),
        None => Money(0.0),
    }
}
