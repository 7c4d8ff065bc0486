//! Importing past calls (OpenAI fine-tuning JSONL lines) into the store as
//! recorded calls of a task, with their verdicts.

use understudy_config::Config;
use understudy_datasets::jsonl::{ChatExample, ImportContext};
use understudy_providers::tokens;
use understudy_store::Store;
use understudy_types::{Money, OffsetDateTime, Usage, UsageSource};

use crate::error::{LoopError, Result};

/// What an import wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub n_calls: usize,
    pub n_feedback: usize,
}

/// Writes `examples` (with the line number each came from) as calls of
/// `task`, in one transaction: a failure part-way leaves nothing imported.
/// A line without a `model` is answered by `model`, else the task's lead; a
/// line without usage has its tokens counted; its cost is the model's price
/// in the config (0 for a model the config does not price). Lines without a
/// time keep their order, one millisecond apart.
pub async fn import_calls(
    config: &Config,
    store: &Store,
    task: &str,
    model: Option<&str>,
    source: &str,
    examples: &[(usize, ChatExample)],
) -> Result<Imported> {
    let default_model = model.map(str::to_string).or_else(|| config.tasks.get(task).map(|task| task.lead.clone()));
    let import_started = OffsetDateTime::now_utc();
    let mut calls = Vec::with_capacity(examples.len());
    let mut feedback = Vec::new();
    for (example_idx, (line_no, example)) in examples.iter().enumerate() {
        let model = example.model.clone().or_else(|| default_model.clone()).ok_or_else(|| {
            LoopError::Refused(format!(
                "{source}:{line_no}: the line names no model, and task `{task}` is not in the config (pass --model)"
            ))
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
        let created_at = example
            .created_at
            .unwrap_or_else(|| import_started + understudy_types::Duration::milliseconds(example_idx as i64));
        let cost = config.models.get(&model).map_or(Money(0.0), |model| model.price.cost(usage));
        let call = example.to_call(ImportContext {
            task: Some(task.to_string()),
            cost,
            model,
            usage,
            usage_source,
            created_at,
        });
        // A verdict without a time is taken as given when the call was made.
        feedback.extend(example.feedback.as_ref().map(|verdict| verdict.to_feedback(call.id, created_at)));
        calls.push(call);
    }
    store.insert_calls_with_feedback(&calls, &feedback).await?;
    Ok(Imported { n_calls: calls.len(), n_feedback: feedback.len() })
}
