//! Reads an OpenAI chat request into what the engine needs, rejecting values
//! it cannot honour (with the message the client gets in a 400).

use std::sync::Arc;

use serde_json::{Map, Value};
use understudy_datasets::jsonl::{content_text, is_text_part};

use crate::schema::ObjectSchema;

/// The sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    /// `None`: until the end of the context or an end-of-turn token.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// `Some(n)`: report logprobs, with `n` alternatives per token.
    pub logprobs: Option<usize>,
}

/// A chat request the engine cannot honour; the message is the one the
/// client gets in a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidChat(pub String);

/// A chat request, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedChat {
    pub messages: Vec<(String, String)>,
    pub sampling: Sampling,
    /// The answer must be one of these strings (`response_format` with an enum schema).
    pub choices: Option<Vec<String>>,
    /// The answer must be one JSON object (`response_format` json_object).
    pub json_object: bool,
    /// The answer must be the compact JSON object of this schema
    /// (`response_format` json_schema with an object schema).
    pub schema: Option<Arc<ObjectSchema>>,
}

/// What `response_format` asks of the answer.
#[derive(Debug, Clone, PartialEq)]
enum AnswerFormat {
    Text,
    Choices(Vec<String>),
    JsonObject,
    Object(Arc<ObjectSchema>),
}

pub fn parse_chat(body: &Map<String, Value>) -> Result<ParsedChat, InvalidChat> {
    let messages = parse_messages(body.get("messages"))?;
    let temperature = number(body, "temperature", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(InvalidChat(format!("temperature must be between 0 and 2, got {temperature}")));
    }
    let top_p = number(body, "top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(InvalidChat(format!("top_p must be in (0, 1], got {top_p}")));
    }
    for penalty in ["frequency_penalty", "presence_penalty"] {
        let value = number(body, penalty, 0.0)?;
        if value != 0.0 {
            return Err(InvalidChat(format!(
                "{penalty} is not supported by local models (got {value}; only 0 is accepted)"
            )));
        }
    }
    if let Some(n) = body.get("n").filter(|n| !n.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(InvalidChat(format!("n must be 1 for local models, got {n}")));
        }
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(seed) => match (seed.as_u64(), seed.as_i64()) {
            (Some(seed), _) => Some(seed),
            (None, Some(seed)) => Some(seed as u64),
            _ => return Err(InvalidChat(format!("seed must be an integer, got {seed}"))),
        },
    };
    let mut max_tokens = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(value) => match value.as_u64() {
                Some(n) if n >= 1 => {
                    max_tokens = max_tokens.or(Some(n as usize));
                }
                _ => return Err(InvalidChat(format!("{key} must be a positive integer, got {value}"))),
            },
        }
    }
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => {
            let mut out = Vec::new();
            for stop in stops {
                match stop.as_str() {
                    Some(stop) => out.push(stop.to_string()),
                    None => return Err(InvalidChat(format!("stop must be a string or a list of strings, got {stop}"))),
                }
            }
            out
        }
        Some(other) => return Err(InvalidChat(format!("stop must be a string or a list of strings, got {other}"))),
    };
    if stop.iter().any(String::is_empty) {
        return Err(InvalidChat("stop sequences must not be empty".to_string()));
    }
    let want_logprobs = match body.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(other) => return Err(InvalidChat(format!("logprobs must be a boolean, got {other}"))),
    };
    let top_logprobs = match body.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(value) => match value.as_u64() {
            Some(n) if n <= 20 => n as usize,
            _ => return Err(InvalidChat(format!("top_logprobs must be an integer between 0 and 20, got {value}"))),
        },
    };
    if top_logprobs > 0 && !want_logprobs {
        return Err(InvalidChat("top_logprobs requires logprobs to be true".to_string()));
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        if !tools.is_empty() {
            return Err(InvalidChat("tools are not supported by local models".to_string()));
        }
    }
    let format = parse_response_format(body.get("response_format"))?;
    Ok(ParsedChat {
        messages,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
            max_tokens,
            stop,
            logprobs: want_logprobs.then_some(top_logprobs),
        },
        json_object: format == AnswerFormat::JsonObject,
        schema: match &format {
            AnswerFormat::Object(schema) => Some(schema.clone()),
            _ => None,
        },
        choices: match format {
            AnswerFormat::Choices(choices) => Some(choices),
            AnswerFormat::Text | AnswerFormat::JsonObject | AnswerFormat::Object(_) => None,
        },
    })
}

fn number(body: &Map<String, Value>, key: &str, default: f64) -> Result<f64, InvalidChat> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value.as_f64().ok_or_else(|| InvalidChat(format!("{key} must be a number, got {value}"))),
    }
}

fn parse_messages(messages: Option<&Value>) -> Result<Vec<(String, String)>, InvalidChat> {
    let Some(messages) = messages.and_then(Value::as_array) else {
        return Err(InvalidChat("messages must be a list".to_string()));
    };
    if messages.is_empty() {
        return Err(InvalidChat("messages must not be empty".to_string()));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (idx, message) in messages.iter().enumerate() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| InvalidChat(format!("messages[{idx}] has no role")))?;
        let role = if role == "developer" { "system" } else { role };
        match message.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                // A part the shared rendering would leave out (an image) is
                // refused, not silently dropped.
                if let Some(part) = parts.iter().find(|part| !is_text_part(part)) {
                    return Err(InvalidChat(format!(
                        "messages[{idx}] has a content part local models cannot read: {part}"
                    )));
                }
            }
            Some(other) => {
                return Err(InvalidChat(format!(
                    "messages[{idx}].content must be a string or a list of parts, got {other}"
                )))
            }
        }
        // The text the model was trained on: the rendering training uses.
        out.push((role.to_string(), content_text(message.get("content"))));
    }
    Ok(out)
}

/// `{"type": "json_schema", "json_schema": {"schema": {"enum": [...]}}}` (or a
/// schema `{"type": "string", "enum": [...]}`) restricts the answer to those
/// strings. The answer is the bare string, not its JSON encoding.
/// `{"type": "json_object"}` asks for one JSON object: decoding stops at its
/// closing brace, and an answer that is not one fails (so the gateway falls
/// back to the lead) instead of reaching the client. An object schema of
/// scalar properties gives the answer its fixed text ([`ObjectSchema`]:
/// jump-forward decoding). Other JSON schemas are refused: nothing here
/// would hold the answer to them.
fn parse_response_format(format: Option<&Value>) -> Result<AnswerFormat, InvalidChat> {
    let Some(format) = format.filter(|format| !format.is_null()) else {
        return Ok(AnswerFormat::Text);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(AnswerFormat::Text),
        Some("json_object") => Ok(AnswerFormat::JsonObject),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .ok_or_else(|| InvalidChat(String::from("response_format json_schema needs json_schema.schema")))?;
            let Some(values) = schema.get("enum").and_then(Value::as_array) else {
                let schema = ObjectSchema::from_json(schema).map_err(|error| InvalidChat(error.0))?;
                return Ok(AnswerFormat::Object(Arc::new(schema)));
            };
            if let Some(kind) = schema.get("type") {
                if kind != "string" {
                    return Err(InvalidChat(format!("an enum schema must have type string, got {kind}")));
                }
            }
            let mut choices: Vec<String> = Vec::new();
            for value in values {
                match value.as_str() {
                    Some("") => return Err(InvalidChat("enum values must not be empty strings".to_string())),
                    Some(text) if !choices.iter().any(|choice| choice == text) => choices.push(text.to_string()),
                    Some(_) => {}
                    None => return Err(InvalidChat(format!("enum values must be strings, got {value}"))),
                }
            }
            if choices.is_empty() {
                return Err(InvalidChat("the enum of allowed answers is empty".to_string()));
            }
            Ok(AnswerFormat::Choices(choices))
        }
        Some(other) => Err(InvalidChat(format!("response_format type `{other}` is not supported by local models"))),
        None => Err(InvalidChat("response_format needs a type".to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<ParsedChat, InvalidChat> {
        parse_chat(body.as_object().unwrap())
    }

    #[test]
    fn reads_sampling_values() {
        let parsed = parse(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "top_p": 0.5, "seed": 3, "max_tokens": 7, "stop": "x", "logprobs": true, "top_logprobs": 2}))
        .unwrap();
        assert_eq!(parsed.sampling.max_tokens, Some(7));
        assert_eq!(parsed.sampling.stop, vec!["x"]);
        assert_eq!(parsed.sampling.logprobs, Some(2));
        assert_eq!(parsed.sampling.seed, Some(3));
    }

    #[test]
    fn rejects_bad_values() {
        let msg = json!([{"role": "user", "content": "hi"}]);
        for (body, needle) in [
            (json!({"messages": msg, "temperature": 3}), "temperature"),
            (json!({"messages": msg, "temperature": -0.1}), "temperature"),
            (json!({"messages": msg, "top_p": 0}), "top_p"),
            (json!({"messages": msg, "n": 2}), "n must be 1"),
            (json!({"messages": msg, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": msg, "stop": 3}), "stop"),
            (json!({"messages": msg, "top_logprobs": 3}), "requires logprobs"),
            (json!({"messages": msg, "temperature": "hot"}), "temperature must be a number"),
            (json!({"messages": msg, "response_format": {"type": "xml"}}), "`xml` is not supported"),
            (
                json!({"messages": msg, "response_format": {"type": "json_schema",
                    "json_schema": {"schema": {"type": "object"}}}}),
                "needs properties",
            ),
            (json!({"messages": []}), "empty"),
        ] {
            let error = parse(body).unwrap_err();
            assert!(error.0.contains(needle), "{error}");
        }
    }

    #[test]
    fn text_parts_are_joined_by_newlines_as_in_training() {
        let parsed = parse(json!({"messages": [
            {"role": "system", "content": "Label it."},
            {"role": "user", "content": [{"type": "text", "text": "Who wrote"}, {"type": "text", "text": "Hamlet?"}]},
        ]}))
        .unwrap();
        assert_eq!(parsed.messages[1], ("user".to_string(), "Who wrote\nHamlet?".to_string()));
        let image = json!({"type": "image_url", "image_url": {"url": "http://x"}});
        let error = parse(json!({"messages": [{"role": "user", "content": [image]}]})).unwrap_err();
        assert!(error.0.contains("cannot read"), "{error}");
    }

    #[test]
    fn reads_enum_schemas() {
        let msg = json!([{"role": "user", "content": "hi"}]);
        for schema in [json!({"enum": ["a", "b", "a"]}), json!({"type": "string", "enum": ["a", "b"]})] {
            let parsed = parse(json!({"messages": msg,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
            .unwrap();
            assert_eq!(parsed.choices, Some(vec!["a".to_string(), "b".to_string()]));
            assert!(!parsed.json_object);
        }
        let parsed = parse(json!({"messages": msg, "response_format": {"type": "json_object"}})).unwrap();
        assert!(parsed.json_object && parsed.choices.is_none());
        assert!(!parse(json!({"messages": msg})).unwrap().json_object);
    }

    #[test]
    fn reads_object_schemas_in_their_keys_order() {
        let msg = json!([{"role": "user", "content": "hi"}]);
        let schema = json!({"type": "object", "required": ["spam", "number"], "additionalProperties": false,
            "properties": {"spam": {"type": "boolean"}, "number": {"type": ["string", "null"]}}});
        let parsed = parse(json!({"messages": msg,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
        .unwrap();
        let schema = parsed.schema.unwrap();
        let names: Vec<&str> = schema.properties.iter().map(|property| property.name.as_str()).collect();
        assert_eq!(names, ["spam", "number"]);
        assert!(parsed.choices.is_none() && !parsed.json_object);
        let nested = json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "object"}}});
        let error = parse(json!({"messages": msg,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested}}}))
        .unwrap_err();
        assert!(error.0.contains("not object"), "{error}");
    }
}
