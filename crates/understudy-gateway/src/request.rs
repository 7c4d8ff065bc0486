//! From request bytes to a checked JSON object and a resolved model.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Map, Value};
use understudy_config::ModelConfig;
use understudy_datasets::jsonl::check_message;

use crate::draft::CallDraft;
use crate::{AppState, GatewayError};

/// Reads the body into the draft's `request` and parses it as a JSON object.
pub(crate) fn parse_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    draft: &mut CallDraft,
) -> Result<Map<String, Value>, GatewayError> {
    let body = body_bytes(state, body)?;
    draft.request = String::from_utf8_lossy(&body).into_owned();
    json_object(&body)
}

/// The request's bytes, or the error a body the server could not read becomes
/// (413 past `max_body_bytes`).
pub(crate) fn body_bytes(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, GatewayError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::PayloadTooLarge { limit: state.config().server.max_body_bytes }
        } else {
            GatewayError::InvalidJson(rejection.body_text())
        }
    })
}

/// Parses a request body that must be a JSON object.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(GatewayError::InvalidJson("the body must be a JSON object".into())),
        Err(error) => Err(GatewayError::InvalidJson(error.to_string())),
    }
}

/// Resolves the body's `model` field, fills the draft's task, model and
/// provider, and rewrites `model` to the provider's own name for the model.
pub(crate) fn resolve_model<'a>(
    state: &'a AppState,
    body: &mut Map<String, Value>,
    draft: &mut CallDraft,
) -> Result<&'a ModelConfig, GatewayError> {
    let requested = match body.get("model") {
        Some(Value::String(model)) => model.as_str(),
        Some(_) => return Err(GatewayError::invalid("`model` must be a string.", "model")),
        None => return Err(GatewayError::invalid("You must provide a model parameter.", "model")),
    };
    draft.model = requested.to_string();
    let resolved =
        state.config().resolve_model(requested).ok_or_else(|| GatewayError::ModelNotFound(requested.to_string()))?;
    draft.task = resolved.task.map(str::to_string);
    draft.model = resolved.model_name.to_string();
    draft.provider = resolved.model.provider.clone();
    body.insert("model".into(), Value::String(resolved.model.name.clone()));
    Ok(resolved.model)
}

/// Checks the fields of a chat request the gateway relies on.
pub(crate) fn check_chat(body: &Map<String, Value>) -> Result<ChatFlags, GatewayError> {
    let messages = match body.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => {
            return Err(GatewayError::invalid("`messages` must contain at least one message.", "messages"))
        }
        Some(_) => return Err(GatewayError::invalid("`messages` must be an array.", "messages")),
        None => return Err(GatewayError::invalid("Missing required parameter: `messages`.", "messages")),
    };
    for (message_idx, message) in messages.iter().enumerate() {
        check_message(message).map_err(|message_error| {
            GatewayError::invalid(format!("Invalid message: {message_error}."), format!("messages[{message_idx}]"))
        })?;
    }
    let stream = optional_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => optional_bool(options, "include_usage")
            .map_err(|_| GatewayError::invalid("`include_usage` must be a boolean.", "stream_options.include_usage"))?
            .unwrap_or(false),
        Some(_) => return Err(GatewayError::invalid("`stream_options` must be an object.", "stream_options")),
    };
    if include_usage && !stream {
        return Err(GatewayError::invalid("`stream_options` is only allowed when `stream` is true.", "stream_options"));
    }
    Ok(ChatFlags { stream, include_usage })
}

pub(crate) struct ChatFlags {
    pub stream: bool,
    pub include_usage: bool,
}

fn optional_bool(object: &Map<String, Value>, key: &str) -> Result<Option<bool>, GatewayError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(GatewayError::invalid(format!("`{key}` must be a boolean."), key)),
    }
}
