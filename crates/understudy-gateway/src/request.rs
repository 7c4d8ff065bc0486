//! From request bytes to a checked JSON object and a resolved model.

use std::convert::Infallible;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use serde_json::{Map, Value};
use understudy_config::ModelConfig;
use understudy_datasets::jsonl::check_message;

use crate::draft::CallDraft;
use crate::{AppState, GatewayError};

/// A request's body, read within the server's limits: at most
/// `max_body_bytes` (a larger `Content-Length` is refused before a byte is
/// read) and within `body_read_timeout` (a client trickling its body is cut
/// off). Never rejects: a body that could not be read is the handler's error
/// to answer and record.
pub(crate) struct RequestBody(pub Result<Bytes, GatewayError>);

impl FromRequest<AppState> for RequestBody {
    type Rejection = Infallible;

    async fn from_request(request: Request, state: &AppState) -> Result<RequestBody, Infallible> {
        let server = &state.config().server;
        let limit = server.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|n_bytes| n_bytes > limit as u64) {
            return Ok(RequestBody(Err(GatewayError::PayloadTooLarge { limit })));
        }
        let read = axum::body::to_bytes(request.into_body(), limit);
        let body = match tokio::time::timeout(server.body_read_timeout, read).await {
            Err(_elapsed) => Err(GatewayError::BodyTimeout { timeout: server.body_read_timeout }),
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(error)) => {
                let too_large = std::error::Error::source(&error)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                    || error.to_string().contains("length limit exceeded");
                if too_large {
                    Err(GatewayError::PayloadTooLarge { limit })
                } else {
                    Err(GatewayError::InvalidJson(format!("the body could not be read: {error}")))
                }
            }
        };
        Ok(RequestBody(body))
    }
}

/// Reads the body into the draft's `request` and parses it as a JSON object.
pub(crate) fn parse_body(body: RequestBody, draft: &mut CallDraft) -> Result<Map<String, Value>, GatewayError> {
    let body = body.0?;
    draft.request = understudy_types::text_of_body(&body);
    json_object(&body)
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
