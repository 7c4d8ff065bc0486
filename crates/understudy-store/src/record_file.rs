//! Call records as JSON lines outside the store: the spill file (records
//! still queued when a shutdown's deadline passed, replayed into the store by
//! the next start) and the dead-letter file (records the store refused even
//! in their safe form).
//!
//! The lines keep every field of a [`CallRecord`], so a replayed record is
//! the record that would have been written. The shape is this module's
//! own; the fine-tuning JSONL of `understudy-datasets` is a different,
//! lossy view of a call.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use understudy_types::{CallRecord, Endpoint, KeyRef, Money, Routing, ServedBy, Usage, UsageSource, Uuid};

use crate::calls::{from_unix_ms, unix_ms};

#[derive(Debug, thiserror::Error)]
pub enum RecordFileError {
    #[error("cannot read record file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write record file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("record file {path}, line {line}: {message}")]
    Corrupt { path: String, line: usize, message: String },
}

#[derive(Serialize, Deserialize)]
struct Line {
    /// Why the record is here (dead letters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    record: RecordLine,
}

#[derive(Serialize, Deserialize)]
struct RecordLine {
    id: String,
    created_at_ms: i64,
    task: Option<String>,
    model: String,
    provider: String,
    endpoint: String,
    stream: bool,
    request: String,
    response: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
    usage_source: String,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    status: u16,
    error: Option<String>,
    cost: f64,
    routing: Option<RoutingLine>,
    /// The gateway key that made the call (absent in lines written before
    /// keys existed).
    #[serde(default)]
    key: Option<KeyLine>,
    /// Absent from lines written before the field existed.
    #[serde(default)]
    upstream_request_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct KeyLine {
    id: String,
    name: String,
}

#[derive(Serialize, Deserialize)]
struct RoutingLine {
    policy: String,
    served_by: String,
    fallback_reason: Option<String>,
    understudy_model: Option<String>,
    understudy_answer: Option<String>,
    understudy_confidence: Option<f64>,
    understudy_latency_ms: Option<f64>,
    understudy_cost: f64,
    agreement: Option<bool>,
    lead_cost_avoided: f64,
    #[serde(default)]
    audit_answer: Option<String>,
    #[serde(default)]
    audit_agreement: Option<bool>,
    #[serde(default)]
    audit_cost: f64,
}

fn to_line(record: &CallRecord) -> RecordLine {
    RecordLine {
        id: record.id.to_string(),
        created_at_ms: unix_ms(record.created_at),
        task: record.task.clone(),
        model: record.model.clone(),
        provider: record.provider.clone(),
        endpoint: record.endpoint.as_str().to_string(),
        stream: record.stream,
        request: record.request.clone(),
        response: record.response.clone(),
        prompt_tokens: record.usage.prompt_tokens,
        completion_tokens: record.usage.completion_tokens,
        usage_source: record.usage_source.as_str().to_string(),
        latency_ms: record.latency_ms,
        ttft_ms: record.ttft_ms,
        status: record.status,
        error: record.error.clone(),
        cost: record.cost.dollars(),
        routing: record.routing.as_ref().map(|routing| RoutingLine {
            policy: routing.policy.clone(),
            served_by: routing.served_by.as_str().to_string(),
            fallback_reason: routing.fallback_reason.clone(),
            understudy_model: routing.understudy_model.clone(),
            understudy_answer: routing.understudy_answer.clone(),
            understudy_confidence: routing.understudy_confidence,
            understudy_latency_ms: routing.understudy_latency_ms,
            understudy_cost: routing.understudy_cost.dollars(),
            agreement: routing.agreement,
            lead_cost_avoided: routing.lead_cost_avoided.dollars(),
            audit_answer: routing.audit_answer.clone(),
            audit_agreement: routing.audit_agreement,
            audit_cost: routing.audit_cost.dollars(),
        }),
        key: record.key.as_ref().map(|key| KeyLine { id: key.id.clone(), name: key.name.clone() }),
        upstream_request_id: record.upstream_request_id.clone(),
    }
}

/// A record line that parses as JSON but holds a value no record can have.
#[derive(Debug, thiserror::Error)]
enum BadField {
    #[error("bad id: {0}")]
    Id(#[from] uuid::Error),
    #[error("unknown endpoint `{0}`")]
    Endpoint(String),
    #[error("unknown usage source `{0}`")]
    UsageSource(String),
    #[error("unknown served_by `{0}`")]
    ServedBy(String),
}

fn from_line(line: RecordLine) -> Result<CallRecord, BadField> {
    let id = Uuid::parse_str(&line.id)?;
    let endpoint = Endpoint::parse(&line.endpoint).ok_or_else(|| BadField::Endpoint(line.endpoint.clone()))?;
    let usage_source =
        UsageSource::parse(&line.usage_source).ok_or_else(|| BadField::UsageSource(line.usage_source.clone()))?;
    let routing = match line.routing {
        None => None,
        Some(routing) => Some(Routing {
            served_by: ServedBy::parse(&routing.served_by)
                .ok_or_else(|| BadField::ServedBy(routing.served_by.clone()))?,
            policy: routing.policy,
            fallback_reason: routing.fallback_reason,
            understudy_model: routing.understudy_model,
            understudy_answer: routing.understudy_answer,
            understudy_confidence: routing.understudy_confidence,
            understudy_latency_ms: routing.understudy_latency_ms,
            understudy_cost: Money(routing.understudy_cost),
            agreement: routing.agreement,
            lead_cost_avoided: Money(routing.lead_cost_avoided),
            audit_answer: routing.audit_answer,
            audit_agreement: routing.audit_agreement,
            audit_cost: Money(routing.audit_cost),
        }),
    };
    Ok(CallRecord {
        id,
        created_at: from_unix_ms(line.created_at_ms),
        task: line.task,
        model: line.model,
        provider: line.provider,
        endpoint,
        stream: line.stream,
        request: line.request,
        response: line.response,
        usage: Usage { prompt_tokens: line.prompt_tokens, completion_tokens: line.completion_tokens },
        usage_source,
        latency_ms: line.latency_ms,
        ttft_ms: line.ttft_ms,
        status: line.status,
        error: line.error,
        cost: Money(line.cost),
        routing,
        key: line.key.map(|key| KeyRef { id: key.id, name: key.name }),
        upstream_request_id: line.upstream_request_id,
    })
}

/// One record as a JSON line (with the reason it is here, for dead letters).
pub fn encode(record: &CallRecord, error: Option<&str>) -> String {
    let line = Line { error: error.map(str::to_string), record: to_line(record) };
    // Serializing plain strings and numbers cannot fail; NaN becomes null.
    serde_json::to_string(&line).unwrap_or_default()
}

/// Appends records to `path` and flushes them to disk before returning.
pub fn append(path: &Path, records: &[CallRecord], error: Option<&str>) -> Result<(), RecordFileError> {
    let write_error = |source| RecordFileError::Write { path: path.display().to_string(), source };
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(write_error)?;
    let mut writer = std::io::BufWriter::new(file);
    for record in records {
        writer.write_all(encode(record, error).as_bytes()).map_err(write_error)?;
        writer.write_all(b"\n").map_err(write_error)?;
    }
    let file = writer.into_inner().map_err(|error| write_error(error.into_error()))?;
    file.sync_all().map_err(write_error)
}

/// Every record in `path` with the reason it carries; an absent file holds
/// none. A line cut short by a crash mid-append (the last one) is skipped
/// with a warning; any other bad line is an error.
pub fn read(path: &Path) -> Result<Vec<(CallRecord, Option<String>)>, RecordFileError> {
    let path_text = || path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(RecordFileError::Read { path: path_text(), source }),
    };
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| RecordFileError::Read { path: path_text(), source })?;
    let n_lines = lines.len();
    let mut records = Vec::with_capacity(n_lines);
    for (line_idx, text) in lines.into_iter().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Line>(&text)
            .map_err(|error| error.to_string())
            .and_then(|line| Ok((from_line(line.record).map_err(|error| error.to_string())?, line.error)));
        match parsed {
            Ok(record) => records.push(record),
            Err(message) if line_idx + 1 == n_lines => {
                tracing::warn!(path = %path_text(), line = line_idx + 1, %message, "skipping a record line cut short");
            }
            Err(message) => return Err(RecordFileError::Corrupt { path: path_text(), line: line_idx + 1, message }),
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn records_survive_the_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let record = sample_record();
        append(&path, std::slice::from_ref(&record), None).unwrap();
        append(&path, std::slice::from_ref(&record), Some("refused")).unwrap();
        let read_back = read(&path).unwrap();
        assert_eq!(read_back, vec![(record.clone(), None), (record, Some("refused".to_string()))]);
        assert!(read(&dir.path().join("absent.jsonl")).unwrap().is_empty());
    }

    fn sample_record() -> CallRecord {
        CallRecord {
            id: CallRecord::new_id(),
            created_at: from_unix_ms(1_790_000_000_123),
            task: Some("t".into()),
            model: "m\u{0}x".into(),
            provider: "cloud".into(),
            endpoint: Endpoint::ChatCompletions,
            stream: true,
            request: "{}".into(),
            response: None,
            usage: Usage { prompt_tokens: 3, completion_tokens: 4 },
            usage_source: UsageSource::Provider,
            latency_ms: 1.5,
            ttft_ms: None,
            status: 499,
            error: Some("client went away".into()),
            cost: Money(0.25),
            routing: Some(Routing { policy: "cascade:0.9".into(), agreement: Some(true), ..Routing::default() }),
            key: Some(KeyRef { id: "0190-key".into(), name: "team-a".into() }),
            upstream_request_id: Some("req-abc".into()),
        }
    }

    #[test]
    fn lines_spilled_before_keys_existed_read_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old-spill.jsonl");
        let record = CallRecord { key: None, routing: None, ..sample_record() };
        let mut line: serde_json::Value = serde_json::from_str(&encode(&record, None)).unwrap();
        line["record"].as_object_mut().unwrap().remove("key");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        assert_eq!(read(&path).unwrap(), vec![(record, None)]);
    }
}
