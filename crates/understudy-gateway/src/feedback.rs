//! `POST /v1/feedback`: a client's verdict on a call's answer.
//!
//! Chat completions carry their call's id in the `x-understudy-call-id`
//! header; the client sends it back with a score. A call's record reaches
//! the store through the recorder's queue, after the answer (a shadow call's
//! waits for the understudy too), so a call this gateway answered moments
//! ago may not be written yet: the gateway remembers the ids it handed out
//! recently and accepts feedback on those as well.
//!
//! With keys on, a key rates only the calls it made; an admin key rates any
//! call. A call that failed has no answer to rate and is refused, whether
//! the gateway still remembers it or the store says so.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use understudy_types::{Feedback, FeedbackScore, OffsetDateTime, Uuid};

use crate::auth::Caller;
use crate::request::{json_object, RequestBody};
use crate::{AppState, GatewayError};

/// The response header naming the call a chat completion was recorded as.
pub const CALL_ID_HEADER: &str = "x-understudy-call-id";

/// Tells the client which call its response was recorded as
/// ([`CALL_ID_HEADER`]), to send feedback on it: the one rule for every
/// endpoint. The header's name is checked once, at compile time, and the
/// id is written without `fmt`.
pub(crate) fn tag_call_id(response: &mut axum::response::Response, call_id: Uuid) {
    const NAME: axum::http::HeaderName = axum::http::HeaderName::from_static(CALL_ID_HEADER);
    let mut buffer = Uuid::encode_buffer();
    let text = call_id.hyphenated().encode_lower(&mut buffer);
    if let Ok(value) = axum::http::HeaderValue::from_str(text) {
        response.headers_mut().insert(NAME, value);
    }
}

/// How many handed-out call ids the gateway remembers.
const RECENT_CAPACITY: usize = 65_536;

/// What the gateway remembers of a call it answered lately: the key that
/// made it, and once its record is made, whether it succeeded.
#[derive(Debug, Clone)]
pub(crate) struct RecentCall {
    pub key_id: Option<String>,
    pub succeeded: Option<bool>,
}

/// The calls this gateway answered most recently, oldest evicted first.
#[derive(Default)]
pub(crate) struct RecentCalls {
    /// Touched twice per call: foldhash, not SipHash (call ids are not a
    /// client's to choose).
    inner: Mutex<(VecDeque<Uuid>, HashMap<Uuid, RecentCall, foldhash::fast::RandomState>)>,
}

impl RecentCalls {
    pub fn remember(&self, id: Uuid, key_id: Option<String>) {
        let Ok(mut guard) = self.inner.lock() else { return };
        let (order, calls) = &mut *guard;
        if order.len() >= RECENT_CAPACITY {
            if let Some(oldest) = order.pop_front() {
                calls.remove(&oldest);
            }
        }
        order.push_back(id);
        calls.insert(id, RecentCall { key_id, succeeded: None });
    }

    /// Notes how a remembered call ended (the first word counts: a
    /// streamed call's 200 can still become a 502 in its record, which
    /// comes later and says so).
    pub fn finished(&self, id: Uuid, succeeded: bool) {
        let Ok(mut guard) = self.inner.lock() else { return };
        if let Some(call) = guard.1.get_mut(&id) {
            call.succeeded = Some(call.succeeded.unwrap_or(true) && succeeded);
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<RecentCall> {
        self.inner.lock().ok().and_then(|guard| guard.1.get(id).cloned())
    }
}

pub(crate) async fn feedback(State(state): State<AppState>, caller: Caller, body: RequestBody) -> Response {
    match add_feedback(&state, &caller, body).await {
        Ok(feedback) => {
            let body = json!({
                "object": "feedback",
                "id": feedback.id.to_string(),
                "call_id": feedback.call_id.to_string(),
                "score": feedback.score.as_str(),
                "comment": feedback.comment,
                "created_at": feedback.created_at.unix_timestamp(),
            });
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(error) => error.into_response(),
    }
}

async fn add_feedback(state: &AppState, caller: &Caller, body: RequestBody) -> Result<Feedback, GatewayError> {
    let body = json_object(&body.0?)?;
    let call_id = match body.get("call_id") {
        Some(Value::String(text)) => Uuid::parse_str(text.trim()).map_err(|_| {
            GatewayError::invalid(
                format!("`call_id` `{text}` is not a call id (the `{CALL_ID_HEADER}` header of a chat completion)."),
                "call_id",
            )
        })?,
        Some(_) => return Err(GatewayError::invalid("`call_id` must be a string.", "call_id")),
        None => return Err(GatewayError::invalid("You must provide a call_id parameter.", "call_id")),
    };
    let score = match body.get("score") {
        Some(value) => parse_score(value).ok_or_else(|| {
            GatewayError::invalid(
                format!("`score` {value} is not a score: use \"positive\" or \"negative\" (or 1/-1, \"up\"/\"down\")."),
                "score",
            )
        })?,
        None => return Err(GatewayError::invalid("You must provide a score parameter.", "score")),
    };
    let comment = match body.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(comment)) => Some(comment.clone()),
        Some(_) => return Err(GatewayError::invalid("`comment` must be a string.", "comment")),
    };
    let store = state.recorder().store();
    // A call still queued is only known here; a written one is in the store.
    let (key_id, succeeded) = match state.inner.recent_calls.get(&call_id) {
        Some(recent) => (recent.key_id, recent.succeeded),
        None => match store.call_owner(call_id).await.map_err(store_failed)? {
            Some(owner) => (owner.key_id, Some(owner.succeeded)),
            None => return Err(GatewayError::CallNotFound(call_id.to_string())),
        },
    };
    // A key rates its own calls; an admin key any call.
    if !caller.is_admin() && key_id.as_deref() != caller.key_id() {
        return Err(GatewayError::Forbidden(format!(
            "The call `{call_id}` was made with another key; only that key or an admin key may rate it."
        )));
    }
    // A call in flight (a stream still relaying) has no verdict yet and is
    // taken; one that failed has no answer to learn from.
    if succeeded == Some(false) {
        return Err(GatewayError::FeedbackOnFailedCall(call_id.to_string()));
    }
    let feedback = Feedback { id: Uuid::now_v7(), call_id, score, comment, created_at: OffsetDateTime::now_utc() };
    store.add_feedback(&feedback).await.map_err(store_failed)?;
    Ok(feedback)
}

/// `"positive"`/`"negative"` (and thumbs spellings), `1`/`-1`, or a boolean.
fn parse_score(value: &Value) -> Option<FeedbackScore> {
    match value {
        Value::String(text) => FeedbackScore::parse(text),
        Value::Number(number) => number.as_f64().and_then(|number| {
            if number == 1.0 {
                Some(FeedbackScore::Positive)
            } else if number == -1.0 {
                Some(FeedbackScore::Negative)
            } else {
                None
            }
        }),
        Value::Bool(true) => Some(FeedbackScore::Positive),
        Value::Bool(false) => Some(FeedbackScore::Negative),
        _ => None,
    }
}

fn store_failed(error: understudy_store::StoreError) -> GatewayError {
    tracing::error!(%error, "feedback could not reach the store");
    GatewayError::Store(error.to_string())
}
