//! The one place where errors become HTTP responses, in OpenAI's error shape:
//! `{"error":{"message","type","param","code"}}`.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use understudy_providers::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String> },
    #[error("The model `{0}` does not exist. Name a model from /v1/models, or a task as `task:NAME`.")]
    ModelNotFound(String),
    #[error("The request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("The request body did not arrive within {timeout:?}.")]
    BodyTimeout { timeout: std::time::Duration },
    #[error("No route for {method} {path}.")]
    RouteNotFound { method: String, path: String },
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("No call with id `{0}` was recorded.")]
    CallNotFound(String),
    #[error("The gateway failed while serving this call; its log has the details.")]
    Internal,
    /// The detail (which may name the database) goes to the log only.
    #[error("The store failed to answer; the gateway's log has the details.")]
    Store(String),
    #[error(
        "You didn't provide an API key. Send `Authorization: Bearer <key>` with a key made by `understudy keys create`."
    )]
    MissingKey,
    #[error("Incorrect API key provided: {0}. Keys are made with `understudy keys create`.")]
    InvalidKey(String),
    #[error("The key `{0}` was revoked.")]
    RevokedKey(String),
    #[error("The key `{name}` expired at {at}.")]
    ExpiredKey { name: String, at: understudy_types::OffsetDateTime },
    /// A key used outside its scope, or where an admin key is needed.
    #[error("{0}")]
    Forbidden(String),
    #[error("{}", .0.message)]
    LimitReached(crate::limits::Refusal),
    #[error("The call `{0}` failed, so there is no answer to rate.")]
    FeedbackOnFailedCall(String),
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: impl Into<String>) -> GatewayError {
        GatewayError::InvalidRequest { message: message.into(), param: Some(param.into()) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidJson(_)
            | GatewayError::InvalidRequest { .. }
            | GatewayError::FeedbackOnFailedCall(_) => StatusCode::BAD_REQUEST,
            GatewayError::MissingKey
            | GatewayError::InvalidKey(_)
            | GatewayError::RevokedKey(_)
            | GatewayError::ExpiredKey { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::LimitReached(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::ModelNotFound(_) | GatewayError::RouteNotFound { .. } | GatewayError::CallNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            GatewayError::Store(_) | GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Provider(error) => match error {
                ProviderError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                ProviderError::Unavailable { .. } | ProviderError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
                ProviderError::Rejected { status, .. } => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                ProviderError::ReplayNoMatch { .. } | ProviderError::Unsupported { .. } => StatusCode::BAD_REQUEST,
                ProviderError::Setup { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            GatewayError::InvalidJson(_)
            | GatewayError::InvalidRequest { .. }
            | GatewayError::ModelNotFound(_)
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::BodyTimeout { .. }
            | GatewayError::RouteNotFound { .. }
            | GatewayError::CallNotFound(_)
            | GatewayError::FeedbackOnFailedCall(_)
            | GatewayError::MissingKey
            | GatewayError::InvalidKey(_)
            | GatewayError::RevokedKey(_)
            | GatewayError::ExpiredKey { .. } => "invalid_request_error",
            GatewayError::Forbidden(_) => "permission_error",
            // As OpenAI types its 429s: by the limit that was reached.
            GatewayError::LimitReached(refusal) => match refusal.kind {
                crate::limits::LimitKind::Requests => "requests",
                crate::limits::LimitKind::Tokens => "tokens",
                crate::limits::LimitKind::Budget => "insufficient_quota",
            },
            GatewayError::Store(_) | GatewayError::Internal => "server_error",
            GatewayError::Provider(ProviderError::ReplayNoMatch { .. } | ProviderError::Unsupported { .. }) => {
                "invalid_request_error"
            }
            GatewayError::Provider(ProviderError::Setup { .. }) => "server_error",
            GatewayError::Provider(_) => "upstream_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        Some(match self {
            GatewayError::InvalidJson(_) => "invalid_json",
            GatewayError::InvalidRequest { .. } => return None,
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::BodyTimeout { .. } => "request_timeout",
            GatewayError::RouteNotFound { .. } => "unknown_url",
            GatewayError::CallNotFound(_) => "call_not_found",
            GatewayError::FeedbackOnFailedCall(_) => "call_failed",
            GatewayError::MissingKey => "missing_api_key",
            GatewayError::InvalidKey(_) | GatewayError::RevokedKey(_) | GatewayError::ExpiredKey { .. } => {
                "invalid_api_key"
            }
            GatewayError::Forbidden(_) => "permission_denied",
            GatewayError::LimitReached(refusal) => match refusal.kind {
                crate::limits::LimitKind::Budget => "insufficient_quota",
                _ => "rate_limit_exceeded",
            },
            GatewayError::Store(_) => "store_error",
            GatewayError::Internal => "internal_error",
            GatewayError::Provider(error) => match error {
                ProviderError::Timeout { .. } => "upstream_timeout",
                ProviderError::Unavailable { .. } => "upstream_unavailable",
                ProviderError::Rejected { .. } => "upstream_rejected",
                ProviderError::BadResponse { .. } => "upstream_bad_response",
                ProviderError::ReplayNoMatch { .. } => "replay_no_match",
                ProviderError::Unsupported { .. } => "unsupported_endpoint",
                ProviderError::Setup { .. } => "provider_setup",
            },
        })
    }

    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            GatewayError::ModelNotFound(_) => Some("model"),
            GatewayError::CallNotFound(_) | GatewayError::FeedbackOnFailedCall(_) => Some("call_id"),
            GatewayError::Provider(ProviderError::ReplayNoMatch { .. }) => Some("messages"),
            _ => None,
        }
    }

    /// The JSON error body a client receives.
    pub fn body(&self) -> Bytes {
        // An upstream's own error answer (4xx or 5xx) is passed on unchanged
        // when it is already an OpenAI-style error; one whose `error` object
        // lacks some of OpenAI's fields gets them, so clients can read it.
        if let GatewayError::Provider(ProviderError::Rejected { body, .. }) = self {
            if let Ok(serde_json::Value::Object(mut outer)) = serde_json::from_slice::<serde_json::Value>(body) {
                if let Some(serde_json::Value::Object(error)) = outer.get_mut("error") {
                    let is_complete = error.get("message").is_some_and(serde_json::Value::is_string)
                        && error.get("type").is_some_and(serde_json::Value::is_string)
                        && error.contains_key("param")
                        && error.contains_key("code");
                    if is_complete {
                        return body.clone();
                    }
                    if !error.get("message").is_some_and(serde_json::Value::is_string) {
                        error.insert("message".into(), self.to_string().into());
                    }
                    if !error.get("type").is_some_and(serde_json::Value::is_string) {
                        error.insert("type".into(), self.error_type().into());
                    }
                    error.entry("param").or_insert(serde_json::Value::Null);
                    error.entry("code").or_insert(serde_json::Value::Null);
                    return Bytes::from(serde_json::Value::Object(outer).to_string());
                }
            }
        }
        let body = json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(body.to_string())
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), [(header::CONTENT_TYPE, "application/json")], self.body()).into_response();
        if let GatewayError::LimitReached(refusal) = &self {
            response.headers_mut().insert(header::RETRY_AFTER, refusal.retry_after_secs.into());
        }
        // An upstream's `retry-after` and rate-limit headers, for the client's SDK to act on.
        if let GatewayError::Provider(ProviderError::Rejected { headers, .. }) = &self {
            response.headers_mut().extend(HeaderMap::clone(headers));
        }
        if matches!(self.status(), StatusCode::UNAUTHORIZED) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}
