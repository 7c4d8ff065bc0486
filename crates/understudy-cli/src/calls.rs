//! `understudy calls list|show|export|prune`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_datasets::jsonl::format_time as rfc3339;
use understudy_store::CallOrder;
use understudy_types::CallRecord;

use crate::cli::CallsCommand;
use crate::output::{call_filter, format_time, load_config, open_store, table};

pub async fn run(config_path: &Path, command: CallsCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let mut stdout = std::io::stdout().lock();
    match command {
        CallsCommand::List { filter, limit, json } => {
            let mut filter = call_filter(&filter)?;
            filter.limit = Some(limit);
            filter.order = CallOrder::NewestFirst;
            let calls = store.list_calls(&filter).await?;
            if json {
                for call in &calls {
                    writeln!(stdout, "{}", call_json(call, false))?;
                }
            } else {
                let rows: Vec<Vec<String>> = calls
                    .iter()
                    .map(|call| {
                        vec![
                            call.id.to_string(),
                            format_time(call.created_at),
                            call.task.clone().unwrap_or_else(|| "-".into()),
                            call.model.clone(),
                            call.status.to_string(),
                            call.usage.prompt_tokens.to_string(),
                            call.usage.completion_tokens.to_string(),
                            format!("{:.0}", call.latency_ms),
                            format!("${:.6}", call.cost.dollars()),
                        ]
                    })
                    .collect();
                let header = ["id", "created (UTC)", "task", "model", "status", "in", "out", "ms", "cost"];
                write!(stdout, "{}", table(&header, &rows))?;
            }
        }
        CallsCommand::Show { id, json } => {
            let found = store.get_call(&id).await?;
            let call = match found.as_slice() {
                [call] => call,
                [] => anyhow::bail!("no call with id `{id}`"),
                _ => {
                    anyhow::bail!("`{id}` is the prefix of more than one call id; give more of it")
                }
            };
            let value = call_json(call, true);
            if json {
                writeln!(stdout, "{value}")?;
            } else {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
            }
        }
        CallsCommand::Export { filter, output } => {
            let (lines, n_exported) = understudy_loop::export_calls(&store, &call_filter(&filter)?).await?;
            match output {
                Some(path) => {
                    std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("exported {n_exported} calls to {}", path.display());
                }
                None => stdout.write_all(lines.as_bytes())?,
            }
        }
        CallsCommand::Prune => {
            let (keep_bodies, keep_calls) = (config.store.keep_bodies, config.store.keep_calls);
            anyhow::ensure!(
                keep_bodies.is_some() || keep_calls.is_some(),
                "no retention is set: add keep_bodies_days or keep_calls_days to [store] in {}",
                config_path.display()
            );
            let pruned = store.prune(understudy_types::OffsetDateTime::now_utc(), keep_bodies, keep_calls).await?;
            writeln!(
                stdout,
                "cleared the bodies of {} calls; deleted {} calls",
                pruned.bodies_cleared, pruned.calls_deleted
            )?;
        }
    }
    stdout.flush()?;
    Ok(())
}

fn call_json(call: &CallRecord, with_bodies: bool) -> Value {
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_string()));
    let mut value = json!({
        "id": call.id.to_string(),
        "created_at": rfc3339(call.created_at),
        "task": call.task,
        "model": call.model,
        "provider": call.provider,
        "endpoint": call.endpoint.as_str(),
        "stream": call.stream,
        "status": call.status,
        "error": call.error,
        "prompt_tokens": call.usage.prompt_tokens,
        "completion_tokens": call.usage.completion_tokens,
        "usage_source": call.usage_source.as_str(),
        "latency_ms": call.latency_ms,
        "ttft_ms": call.ttft_ms,
        "cost": call.cost.dollars(),
        "upstream_request_id": call.upstream_request_id,
    });
    if with_bodies {
        value["request"] = parse(&call.request);
        value["response"] = call.response.as_deref().map(parse).unwrap_or(Value::Null);
    }
    value
}
