//! One line of OpenAI's chat fine-tuning format, and its mapping to recorded calls.
//!
//! A line is `{"messages":[...]}` whose last message is the assistant's answer,
//! with optional `model`, `created_at` (RFC 3339 or unix seconds), `usage`,
//! `tools` and `metadata`. `metadata` holds string values only (as OpenAI's
//! does); the call's feedback verdict, if it has one, is `feedback`
//! (`positive`/`negative`) with `feedback_comment` and `feedback_at`, and
//! other keys are ignored. Export writes exactly the keys import reads, so a
//! round trip export → import → export gives the same lines.

use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use understudy_types::{CallRecord, Endpoint, Feedback, FeedbackScore, Money, Usage, UsageSource, Uuid};

/// Roles the OpenAI chat API accepts in `messages`.
pub const KNOWN_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];

/// The provider name recorded for imported calls.
pub const IMPORT_PROVIDER: &str = "import";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LineError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Schema(String),
}

/// One example: the prompt messages and the lead's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatExample {
    /// Every message before the answer.
    pub prompt: Vec<Value>,
    /// The last assistant message, as a whole object (it may carry tool calls).
    pub answer: Map<String, Value>,
    pub tools: Option<Value>,
    /// The call's `response_format` (chat's form; a Responses call's
    /// `text.format` converted): eval and plan ask the understudy with it,
    /// as the gateway serves the call. Not part of OpenAI's fine-tuning
    /// format; written only when set.
    pub response_format: Option<Value>,
    pub model: Option<String>,
    pub created_at: Option<OffsetDateTime>,
    pub usage: Option<Usage>,
    /// The verdict that counts on the call the example came from.
    pub feedback: Option<LineFeedback>,
}

/// A feedback verdict as a line carries it in `metadata`.
#[derive(Debug, Clone, PartialEq)]
pub struct LineFeedback {
    pub score: FeedbackScore,
    pub comment: Option<String>,
    pub created_at: Option<OffsetDateTime>,
}

impl LineFeedback {
    pub fn of(feedback: &Feedback) -> LineFeedback {
        LineFeedback { score: feedback.score, comment: feedback.comment.clone(), created_at: Some(feedback.created_at) }
    }

    /// The store's feedback row for the imported call `call_id`; a verdict
    /// without a time is dated `default_at`.
    pub fn to_feedback(&self, call_id: Uuid, default_at: OffsetDateTime) -> Feedback {
        Feedback {
            id: Uuid::now_v7(),
            call_id,
            score: self.score,
            comment: self.comment.clone(),
            created_at: self.created_at.unwrap_or(default_at),
        }
    }
}

/// What a recorded call needs beyond the example itself.
#[derive(Debug, Clone)]
pub struct ImportContext {
    pub task: Option<String>,
    pub model: String,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Money,
    pub created_at: OffsetDateTime,
}

impl ChatExample {
    /// Parses one JSONL line.
    pub fn parse(line: &str) -> Result<ChatExample, LineError> {
        let value: Value = serde_json::from_str(line).map_err(|error| LineError::Json(error.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(schema("a line must be a JSON object"));
        };
        let Some(Value::Array(mut messages)) = object.remove("messages") else {
            return Err(schema("`messages` must be an array"));
        };
        for (message_idx, message) in messages.iter().enumerate() {
            check_message(message)
                .map_err(|message_error| schema(&format!("messages[{message_idx}]: {message_error}")))?;
        }
        let answer = match messages.pop() {
            Some(Value::Object(answer)) if answer.get("role").and_then(Value::as_str) == Some("assistant") => answer,
            _ => return Err(schema("the last message must be the assistant's answer")),
        };
        if messages.is_empty() {
            return Err(schema("`messages` needs at least one message before the answer"));
        }
        let model = match object.remove("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(model)) => Some(model),
            Some(_) => return Err(schema("`model` must be a string")),
        };
        let created_at = match object.remove("created_at") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_time(&value)?),
        };
        let usage = match object.remove("usage") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_usage(&value)?),
        };
        let tools = object.remove("tools");
        let response_format = object.remove("response_format").filter(|format| !format.is_null());
        let feedback = match object.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(metadata)) => parse_feedback(&metadata)?,
            Some(_) => return Err(schema("`metadata` must be an object")),
        };
        // Keys OpenAI's format allows that we have no use for yet.
        object.remove("parallel_tool_calls");
        if let Some(key) = object.keys().next() {
            return Err(schema(&format!("unknown key `{key}`")));
        }
        Ok(ChatExample { prompt: messages, answer, tools, response_format, model, created_at, usage, feedback })
    }

    /// Renders the example as one JSONL line (no trailing newline).
    pub fn to_line(&self) -> String {
        let mut messages = self.prompt.clone();
        messages.push(Value::Object(self.answer.clone()));
        let mut object = Map::new();
        object.insert("messages".into(), Value::Array(messages));
        if let Some(tools) = &self.tools {
            object.insert("tools".into(), tools.clone());
        }
        if let Some(format) = &self.response_format {
            object.insert("response_format".into(), format.clone());
        }
        if let Some(model) = &self.model {
            object.insert("model".into(), Value::String(model.clone()));
        }
        if let Some(created_at) = self.created_at {
            object.insert("created_at".into(), Value::String(format_time(created_at)));
        }
        if let Some(usage) = self.usage {
            object.insert("usage".into(), usage_json(usage));
        }
        if let Some(feedback) = &self.feedback {
            let mut metadata = Map::new();
            metadata.insert("feedback".into(), Value::String(feedback.score.as_str().to_string()));
            if let Some(comment) = &feedback.comment {
                metadata.insert("feedback_comment".into(), Value::String(comment.clone()));
            }
            if let Some(at) = feedback.created_at {
                metadata.insert("feedback_at".into(), Value::String(format_time(at)));
            }
            object.insert("metadata".into(), Value::Object(metadata));
        }
        Value::Object(object).to_string()
    }

    /// The answer's text content ("" when it has none, as with pure tool calls).
    pub fn answer_text(&self) -> String {
        message_text(&Value::Object(self.answer.clone()))
    }

    /// The call record this example becomes when imported.
    pub fn to_call(&self, context: ImportContext) -> CallRecord {
        let mut request = Map::new();
        request.insert("model".into(), Value::String(context.model.clone()));
        request.insert("messages".into(), Value::Array(self.prompt.clone()));
        if let Some(tools) = &self.tools {
            request.insert("tools".into(), tools.clone());
        }
        if let Some(format) = &self.response_format {
            request.insert("response_format".into(), format.clone());
        }
        let id = CallRecord::new_id();
        let finish_reason = if self.answer.contains_key("tool_calls") { "tool_calls" } else { "stop" };
        let response = json!({
            "id": format!("import-{}", id.simple()),
            "object": "chat.completion",
            "created": context.created_at.unix_timestamp(),
            "model": context.model,
            "choices": [{"index": 0, "message": self.answer, "finish_reason": finish_reason}],
            "usage": usage_json(context.usage),
        });
        CallRecord {
            id,
            created_at: context.created_at,
            task: context.task,
            model: context.model,
            provider: IMPORT_PROVIDER.to_string(),
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            request: Value::Object(request).to_string(),
            response: Some(response.to_string()),
            usage: context.usage,
            usage_source: context.usage_source,
            latency_ms: 0.0,
            ttft_ms: None,
            status: 200,
            error: None,
            cost: context.cost,
            routing: None,
            key: None,
            upstream_request_id: None,
        }
    }

    /// The example a recorded chat call holds, if it succeeded and has an answer.
    pub fn from_call(call: &CallRecord) -> Option<ChatExample> {
        if !call.endpoint.is_conversation() || !call.is_success() {
            return None;
        }
        let request: Value = serde_json::from_str(&call.request).ok()?;
        let response: Value = serde_json::from_str(call.response.as_deref()?).ok()?;
        let (prompt, mut answer, tools, response_format) = if call.endpoint == Endpoint::Responses {
            // The one conversion of a Responses call into chat messages.
            let request = request.as_object()?;
            let prompt = crate::responses::chat_messages(request).ok()?;
            let answer = crate::responses::assistant_message(&response).ok()?;
            let format = crate::responses::chat_response_format(request).ok()?;
            (prompt, answer, crate::responses::chat_tools(request).ok()?, format)
        } else {
            let prompt = request.get("messages")?.as_array()?.clone();
            let answer = response.pointer("/choices/0/message")?.as_object()?.clone();
            let format = request.get("response_format").filter(|format| !format.is_null()).cloned();
            (prompt, answer, request.get("tools").cloned(), format)
        };
        // Streamed answers are assembled with nulls for absent fields; drop them
        // so that the line is the same as for the non-streamed answer.
        answer.retain(|_, value| !value.is_null());
        if !answer.contains_key("content") {
            answer.insert("content".into(), Value::Null);
        }
        Some(ChatExample {
            prompt,
            answer,
            tools,
            response_format,
            model: Some(call.model.clone()),
            created_at: Some(call.created_at),
            usage: Some(call.usage),
            feedback: None,
        })
    }

    /// The example with the verdict that counts on its call, if any.
    pub fn with_feedback(mut self, feedback: Option<&Feedback>) -> ChatExample {
        self.feedback = feedback.map(LineFeedback::of);
        self
    }
}

/// The lines of a JSONL file that parsed, and the ones that did not, each
/// with its 1-based line number. Blank lines are skipped.
#[derive(Debug, Default)]
pub struct ReadExamples {
    pub examples: Vec<(usize, ChatExample)>,
    pub bad_lines: Vec<(usize, LineError)>,
}

pub fn read_examples(reader: impl std::io::BufRead) -> std::io::Result<ReadExamples> {
    let mut read = ReadExamples::default();
    for (line_idx, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match ChatExample::parse(&line) {
            Ok(example) => read.examples.push((line_idx + 1, example)),
            Err(error) => read.bad_lines.push((line_idx + 1, error)),
        }
    }
    Ok(read)
}

/// The classifier's input for a chat prompt (the messages before the answer,
/// as in [`ChatExample::prompt`]), and the prompt the dashboard shows: the
/// text of the user messages, joined by newlines. The system prompt is
/// skipped: it is the same for every call of a task, so it carries no signal
/// and costs tokens. Each message's text is [`content_text`], the rendering
/// every model shares.
pub fn prompt_text(messages: &[Value]) -> String {
    messages
        .iter()
        .filter(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of a message's `content`; see [`content_text`].
pub fn message_text(message: &Value) -> String {
    content_text(message.get("content"))
}

/// The one rendering of a message's content as text, shared by training, the
/// classifier, the serving engine and `eval`, so that a model reads at serving
/// time exactly the text it was trained on: a string as it is, or the text
/// parts of an array ([`is_text_part`]) joined by newlines; anything else is
/// empty. Parts of other kinds (images, audio) are left out here; a model
/// that must not ignore them rejects the request instead.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|part| is_text_part(part))
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Whether a content part is text: `{"type": "text", "text": ...}`, or a
/// `text` without a `type`, as older clients send it.
pub fn is_text_part(part: &Value) -> bool {
    part.get("type").and_then(Value::as_str).is_none_or(|kind| kind == "text")
        && part.get("text").is_some_and(Value::is_string)
}

/// Whitespace-normalized text: trimmed, with every run of whitespace one space.
pub fn normalize_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A key that identifies a conversation up to whitespace: roles and contents.
pub fn prompt_key(messages: &[Value]) -> String {
    let mut key = String::new();
    for message in messages {
        key.push_str(message.get("role").and_then(Value::as_str).unwrap_or(""));
        key.push('\u{1f}');
        key.push_str(&normalize_whitespace(&message_text(message)));
        key.push('\u{1e}');
    }
    key
}

/// Checks one message against the OpenAI chat schema; the error names the field.
pub fn check_message(message: &Value) -> Result<(), MessageError> {
    let Some(object) = message.as_object() else {
        return Err(MessageError::NotAnObject);
    };
    let role = match object.get("role") {
        Some(Value::String(role)) => role.as_str(),
        Some(_) => return Err(MessageError::RoleNotAString),
        None => return Err(MessageError::MissingRole),
    };
    if !KNOWN_ROLES.contains(&role) {
        return Err(MessageError::UnknownRole(role.to_string()));
    }
    match object.get("content") {
        Some(Value::String(_)) | Some(Value::Array(_)) => Ok(()),
        None | Some(Value::Null) if role == "assistant" => Ok(()),
        None => Err(MessageError::MissingContent),
        Some(_) => Err(MessageError::BadContent),
    }
}

/// How a message breaks the OpenAI chat schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("a message must be an object")]
    NotAnObject,
    #[error("`role` must be a string")]
    RoleNotAString,
    #[error("`role` is missing")]
    MissingRole,
    #[error("unknown role `{0}` (known: {known})", known = KNOWN_ROLES.join(", "))]
    UnknownRole(String),
    #[error("`content` is missing")]
    MissingContent,
    #[error("`content` must be a string or an array of parts")]
    BadContent,
}

/// RFC 3339 in UTC, with milliseconds when there are any (the store keeps
/// milliseconds), so that a time survives export and import unchanged.
pub fn format_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let format = if at.millisecond() == 0 {
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z")
    } else {
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z")
    };
    at.format(&format).unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn parse_time(value: &Value) -> Result<OffsetDateTime, LineError> {
    match value {
        Value::String(text) => OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|error| schema(&format!("`created_at` `{text}` is not RFC 3339: {error}"))),
        Value::Number(number) => {
            let seconds = number.as_f64().ok_or_else(|| schema("`created_at` is not a number"))?;
            OffsetDateTime::from_unix_timestamp_nanos((seconds * 1e9) as i128)
                .map_err(|error| schema(&format!("`created_at` {seconds} is out of range: {error}")))
        }
        _ => Err(schema("`created_at` must be an RFC 3339 string or unix seconds")),
    }
}

/// The feedback keys of `metadata` (string values); `None` without `feedback`.
fn parse_feedback(metadata: &Map<String, Value>) -> Result<Option<LineFeedback>, LineError> {
    let text = |key: &str| -> Result<Option<&str>, LineError> {
        match metadata.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(schema(&format!("`metadata.{key}` must be a string"))),
        }
    };
    let Some(verdict) = text("feedback")? else {
        if text("feedback_comment")?.is_some() || text("feedback_at")?.is_some() {
            return Err(schema("`metadata.feedback` is missing, but the line has a feedback comment or time"));
        }
        return Ok(None);
    };
    let score = FeedbackScore::parse(verdict)
        .ok_or_else(|| schema(&format!("`metadata.feedback` `{verdict}` is not `positive` or `negative`")))?;
    let created_at = match text("feedback_at")? {
        None => None,
        Some(at) => Some(
            OffsetDateTime::parse(at, &Rfc3339)
                .map_err(|error| schema(&format!("`metadata.feedback_at` `{at}` is not RFC 3339: {error}")))?,
        ),
    };
    Ok(Some(LineFeedback { score, comment: text("feedback_comment")?.map(str::to_string), created_at }))
}

fn parse_usage(value: &Value) -> Result<Usage, LineError> {
    let field = |name: &str| -> Result<u64, LineError> {
        value
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| schema(&format!("`usage.{name}` must be a non-negative integer")))
    };
    Ok(Usage { prompt_tokens: field("prompt_tokens")?, completion_tokens: field("completion_tokens")? })
}

pub fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens(),
    })
}

fn schema(message: &str) -> LineError {
    LineError::Schema(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"messages":[{"role":"system","content":"Label it."},{"role":"user","content":"Who  wrote\nHamlet?"},{"role":"assistant","content":"HUM"}],"model":"gpt-4o-mini","created_at":"2026-11-01T10:00:00.123Z","usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}"#;

    #[test]
    fn content_renders_as_its_text_parts_joined_by_newlines() {
        // The format every model reads its prompt in, at training and serving time alike.
        let parts = json!([
            {"type": "text", "text": "Who wrote"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"text": "Hamlet?"},
            {"type": "text", "text": ""},
        ]);
        assert_eq!(content_text(Some(&parts)), "Who wrote\nHamlet?\n");
        assert_eq!(content_text(Some(&json!("as is\n"))), "as is\n");
        assert_eq!(content_text(None), "");
        assert_eq!(content_text(Some(&Value::Null)), "");
        assert_eq!(message_text(&json!({"role": "user", "content": parts})), "Who wrote\nHamlet?\n");
        assert!(!is_text_part(&json!({"type": "input_audio", "text": "x"})));
        assert!(!is_text_part(&json!({"type": "text", "text": 3})));
    }

    #[test]
    fn a_line_round_trips() {
        let example = ChatExample::parse(LINE).expect("parses");
        assert_eq!(example.prompt.len(), 2);
        assert_eq!(example.answer_text(), "HUM");
        assert_eq!(example.usage, Some(Usage { prompt_tokens: 12, completion_tokens: 1 }));
        assert_eq!(example.to_line(), LINE);
    }

    #[test]
    fn a_call_round_trips_through_the_format() {
        let example = ChatExample::parse(LINE).expect("parses");
        let call = example.to_call(ImportContext {
            task: Some("trec".into()),
            model: "gpt-4o-mini".into(),
            usage: example.usage.unwrap_or_default(),
            usage_source: UsageSource::Provider,
            cost: Money(0.0),
            created_at: example.created_at.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        });
        let back = ChatExample::from_call(&call).expect("call has an example");
        assert_eq!(back.to_line(), LINE);
    }

    #[test]
    fn a_response_format_round_trips_through_lines_and_calls() {
        let line = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"{\"a\":\"x\"}"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}}"#;
        let example = ChatExample::parse(line).expect("parses");
        assert_eq!(example.response_format.as_ref().and_then(|format| format.get("type")), Some(&json!("json_schema")));
        assert_eq!(example.to_line(), line);
        let call = example.to_call(ImportContext {
            task: None,
            model: "gpt-4o-mini".into(),
            usage: Usage::default(),
            usage_source: UsageSource::Provider,
            cost: Money(0.0),
            created_at: OffsetDateTime::UNIX_EPOCH,
        });
        assert!(call.request.contains("\"response_format\""), "{}", call.request);
        let back = ChatExample::from_call(&call).expect("call has an example");
        assert_eq!(back.response_format, example.response_format);
        // A null format is no format.
        let null =
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"response_format":null}"#;
        assert_eq!(ChatExample::parse(null).expect("parses").response_format, None);
    }

    #[test]
    fn feedback_rides_in_metadata_and_round_trips() {
        let line = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"metadata":{"feedback":"negative","feedback_comment":"wrong label","feedback_at":"2026-11-02T08:00:00.500Z"}}"#;
        let example = ChatExample::parse(line).expect("parses");
        let feedback = example.feedback.clone().expect("feedback");
        assert_eq!(feedback.score, FeedbackScore::Negative);
        assert_eq!(feedback.comment.as_deref(), Some("wrong label"));
        assert_eq!(feedback.created_at.map(|at| at.unix_timestamp()), Some(1_793_606_400));
        assert_eq!(example.to_line(), line);
        // Other metadata is tolerated and not kept; a thumb is a verdict too.
        let other = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"metadata":{"source":"crm","feedback":"up"}}"#;
        let example = ChatExample::parse(other).expect("parses");
        assert_eq!(example.feedback.as_ref().map(|feedback| feedback.score), Some(FeedbackScore::Positive));
        assert!(example.to_line().ends_with(r#""metadata":{"feedback":"positive"}}"#), "{}", example.to_line());
        // Without feedback there is no metadata at all.
        let plain = ChatExample::parse(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"metadata":{"source":"crm"}}"#,
        );
        assert!(!plain.expect("parses").to_line().contains("metadata"));
        for (bad, expected) in [
            (r#""metadata":{"feedback":"meh"}"#, "`metadata.feedback` `meh`"),
            (r#""metadata":{"feedback":1}"#, "`metadata.feedback` must be a string"),
            (r#""metadata":{"feedback_comment":"x"}"#, "`metadata.feedback` is missing"),
            (r#""metadata":{"feedback":"up","feedback_at":"yesterday"}"#, "`metadata.feedback_at`"),
            (r#""metadata":[1]"#, "`metadata` must be an object"),
        ] {
            let line = format!(
                r#"{{"messages":[{{"role":"user","content":"q"}},{{"role":"assistant","content":"a"}}],{bad}}}"#
            );
            let error = ChatExample::parse(&line).expect_err(bad).to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn unix_seconds_are_accepted() {
        let line = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"created_at":1700000000}"#;
        let example = ChatExample::parse(line).expect("parses");
        assert_eq!(example.created_at.map(|at| at.unix_timestamp()), Some(1_700_000_000));
    }

    #[test]
    fn schema_errors_name_the_field() {
        let cases = [
            (r#"{"messages":[{"role":"user","content":"q"}]}"#, "the last message must be the assistant's answer"),
            (
                r#"{"messages":[{"role":"robot","content":"q"},{"role":"assistant","content":"a"}]}"#,
                "messages[0]: unknown role `robot`",
            ),
            (r#"{"messages":[{"role":"assistant","content":"a"}]}"#, "at least one message before the answer"),
            (
                r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"usage":{"prompt_tokens":-1}}"#,
                "usage.prompt_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"colour":1}"#,
                "unknown key `colour`",
            ),
            (r#"[1,2]"#, "a line must be a JSON object"),
        ];
        for (line, expected) in cases {
            let error = ChatExample::parse(line).expect_err(line).to_string();
            assert!(error.contains(expected), "{line}: {error}");
        }
        assert!(matches!(ChatExample::parse("{nope"), Err(LineError::Json(_))));
    }

    #[test]
    fn prompt_keys_ignore_whitespace_differences() {
        let first = serde_json::json!([{"role":"user","content":"Who  wrote\nHamlet? "}]);
        let second = serde_json::json!([{"role":"user","content":" Who wrote Hamlet?"}]);
        let third = serde_json::json!([{"role":"system","content":"Who wrote Hamlet?"}]);
        let key = |value: &Value| prompt_key(value.as_array().map(Vec::as_slice).unwrap_or_default());
        assert_eq!(key(&first), key(&second));
        assert_ne!(key(&first), key(&third));
    }
}
