//! A stub OpenAI-compatible upstream on loopback, for tests and benchmarks.
//!
//! Its behaviour is chosen by the request's model name:
//! - `ok` (or anything else): a completion with `usage`;
//! - `no-usage`: a completion without `usage`;
//! - `flaky`: HTTP 500 for the first request of each prompt text, then `ok`;
//! - `down`: HTTP 503 always;
//! - `slow`: waits 2 s before answering;
//! - `reject`: HTTP 400 with an OpenAI error body.
//! - `student`: a stand-in understudy. The last message's content reads
//!   `... || answer=TEXT || confidence=P`; it answers TEXT with logprobs whose
//!   sum is ln P (default: the lead's answer at confidence 1).
//!
//! Faults (issue 12), for streamed and plain requests alike unless noted:
//! - `garbage`: HTTP 200 with an HTML body;
//! - `truncated-json`: HTTP 200 with JSON cut off mid-way;
//! - `cut-stream`: a stream that stops after two chunks, with neither a
//!   finish reason nor `[DONE]` (plain requests get `ok`);
//! - `malformed-chunk`: a stream with a chunk that is not JSON;
//! - `non-sse`: a stream request answered with one JSON completion;
//! - `huge`: a 1 MB answer;
//! - `reset`: the connection breaks after the status line;
//! - `rate-limited`: HTTP 429 with `Retry-After`;
//! - `rate-limited-once`: HTTP 429 with `Retry-After: 2` for the first
//!   request of each prompt text, then `ok`.
//!
//! `/v1/responses` answers the Responses API's way (a `response` object
//! with `input_tokens`/`output_tokens`, or its named events, without
//! `[DONE]`); `reject`, `down` and `cut-stream` behave as in chat.
//!
//! With `"stream": true` it answers in SSE chunks, with a usage chunk when
//! `stream_options.include_usage` is set.
//!
//! Every answer carries the headers OpenAI sends and clients act on
//! ([`CLIENT_HEADERS`]; error statuses add `retry-after` and
//! `retry-after-ms`), and one that must not reach the client
//! (`x-stub-private`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

#[derive(Default)]
pub struct StubLog {
    /// Every request body received, in order.
    pub requests: Vec<Value>,
    /// Every Authorization header received, in order.
    pub authorizations: Vec<Option<String>>,
    flaky_seen: HashMap<String, u32>,
}

#[derive(Clone, Default)]
pub struct Stub {
    pub log: Arc<Mutex<StubLog>>,
    /// When false, the stub skips logging (for benchmarks).
    pub keep_log: bool,
}

pub const ANSWER: &str = "Paris is the capital of France.";

/// Headers on every answer of the stub, as OpenAI names them.
pub const CLIENT_HEADERS: [(&str, &str); 5] = [
    ("x-request-id", "req-stub-1"),
    ("openai-processing-ms", "7"),
    ("x-ratelimit-limit-requests", "100"),
    ("x-ratelimit-remaining-requests", "99"),
    ("x-ratelimit-reset-tokens", "6ms"),
];

/// Added to answers with an error status.
pub const RETRY_HEADERS: [(&str, &str); 2] = [("retry-after", "2"), ("retry-after-ms", "1500")];

async fn add_client_headers(mut response: Response) -> Response {
    let is_error = !response.status().is_success();
    let headers = response.headers_mut();
    for (name, value) in CLIENT_HEADERS {
        headers.insert(name, value.parse().expect("header value"));
    }
    if is_error && !headers.contains_key("retry-after") {
        for (name, value) in RETRY_HEADERS {
            headers.insert(name, value.parse().expect("header value"));
        }
    }
    headers.insert("x-stub-private", "not for clients".parse().expect("header value"));
    response
}

impl Stub {
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/completions", post(completions))
            .route("/v1/responses", post(responses))
            .layer(axum::middleware::map_response(add_client_headers))
            .with_state(self)
    }

    /// Serves on an ephemeral loopback port; returns the base URL (with /v1).
    pub async fn start(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let addr: SocketAddr = listener.local_addr().expect("stub addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, self.router()).await;
        });
        format!("http://{addr}/v1")
    }

    pub fn requests(&self) -> Vec<Value> {
        self.log.lock().expect("stub log").requests.clone()
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.log.lock().expect("stub log").authorizations.clone()
    }
}

fn student_answer(request: &Value) -> Value {
    let content = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.last())
        .and_then(|message| message.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut answer = ANSWER.to_string();
    let mut confidence = 1.0f64;
    for part in content.split("||").map(str::trim) {
        if let Some(text) = part.strip_prefix("answer=") {
            answer = text.to_string();
        } else if let Some(value) = part.strip_prefix("confidence=") {
            confidence = value.parse().unwrap_or(1.0);
        }
    }
    // Two "tokens" whose probabilities multiply to the confidence.
    let half = confidence.ln() / 2.0;
    json!({
        "id": "chatcmpl-student", "object": "chat.completion", "created": 1_700_000_000, "model": "student",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "a", "logprob": half}, {"token": "b", "logprob": half}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    })
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

async fn chat(State(stub): State<Stub>, headers: HeaderMap, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request.get("model").and_then(Value::as_str).unwrap_or("ok").to_string();
    let prompt = request.pointer("/messages/0/content").and_then(Value::as_str).unwrap_or("").to_string();
    let mut first_flaky_attempt = false;
    if stub.keep_log {
        let mut log = stub.log.lock().expect("stub log");
        log.requests.push(request.clone());
        log.authorizations.push(headers.get("authorization").and_then(|value| value.to_str().ok()).map(str::to_string));
        if model == "flaky" || model == "rate-limited-once" {
            let seen = log.flaky_seen.entry(prompt.clone()).or_insert(0);
            *seen += 1;
            first_flaky_attempt = *seen == 1;
        }
    }
    match model.as_str() {
        "down" => return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"error": {"message": "overloaded"}})),
        "flaky" if first_flaky_attempt => {
            return json_response(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": {"message": "try again"}}))
        }
        "rate-limited-once" if first_flaky_attempt => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("content-type", "application/json"), ("retry-after", "2")],
                json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})
                    .to_string(),
            )
                .into_response()
        }
        "slow" => tokio::time::sleep(Duration::from_secs(2)).await,
        "garbage" => return (StatusCode::OK, [("content-type", "text/html")], "<html>oops</html>").into_response(),
        "truncated-json" => {
            return (StatusCode::OK, [("content-type", "application/json")], r#"{"id":"x","choices":[{"ind"#)
                .into_response()
        }
        "rate-limited" => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("content-type", "application/json"), ("retry-after", "1")],
                json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})
                    .to_string(),
            )
                .into_response()
        }
        "reset" => {
            let broken = futures::stream::iter([Err::<Bytes, std::io::Error>(std::io::Error::other("reset"))]);
            return (StatusCode::OK, [("content-type", "application/json")], axum::body::Body::from_stream(broken))
                .into_response();
        }
        _ => {}
    }
    let is_stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let fault_chunk = |content: &str| {
        json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    };
    match model.as_str() {
        "cut-stream" if is_stream => {
            let body = format!("data: {}\n\ndata: {}\n\n", fault_chunk("Paris "), fault_chunk("is"));
            return (StatusCode::OK, [("content-type", "text/event-stream")], body).into_response();
        }
        "malformed-chunk" if is_stream => {
            let body = format!("data: {}\n\ndata: {{not json\n\ndata: [DONE]\n\n", fault_chunk("Paris "));
            return (StatusCode::OK, [("content-type", "text/event-stream")], body).into_response();
        }
        "non-sse" if is_stream => {
            let completion = json!({
                "id": "chatcmpl-stub", "object": "chat.completion", "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            });
            return json_response(StatusCode::OK, completion);
        }
        "student" => return json_response(StatusCode::OK, student_answer(&request)),
        "reject" => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": "Invalid value for temperature", "type": "invalid_request_error", "param": "temperature", "code": null}}),
            )
        }
        _ => {}
    }
    let usage = json!({"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28});
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        // As OpenAI does: with usage asked for, every chunk has `"usage": null`.
        let chunk = |delta: Value, finish: Value| {
            let mut chunk = json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1_700_000_000,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            chunk
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
        for word in ANSWER.split_inclusive(' ') {
            events.push(chunk(json!({"content": word}), Value::Null));
        }
        events.push(chunk(json!({}), json!("stop")));
        if include_usage && model != "no-usage" {
            events.push(json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1_700_000_000,
                               "model": model, "choices": [], "usage": usage}));
        }
        let mut body = String::new();
        for event in events {
            body.push_str(&format!("data: {event}\n\n"));
        }
        body.push_str("data: [DONE]\n\n");
        return (StatusCode::OK, [("content-type", "text/event-stream")], body).into_response();
    }
    let answer = if model == "huge" { "lorem ".repeat(170_000) } else { ANSWER.to_string() };
    let mut completion = json!({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
    });
    if model != "no-usage" {
        completion["usage"] = usage;
    }
    json_response(StatusCode::OK, completion)
}

async fn embeddings(State(stub): State<Stub>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if stub.keep_log {
        stub.log.lock().expect("stub log").requests.push(request.clone());
    }
    let n_inputs = match request.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n_inputs)
        .map(|idx| json!({"object": "embedding", "index": idx, "embedding": [0.1, 0.2, 0.3, 0.4]}))
        .collect();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data, "model": request.get("model"),
               "usage": {"prompt_tokens": 4 * n_inputs, "total_tokens": 4 * n_inputs}}),
    )
}

/// Legacy text completions: the answer's words, streamed or not.
async fn completions(State(stub): State<Stub>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if stub.keep_log {
        stub.log.lock().expect("stub log").requests.push(request.clone());
    }
    let model = request.get("model").cloned().unwrap_or(Value::Null);
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12});
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(
            StatusCode::OK,
            json!({"id": "cmpl-stub", "object": "text_completion", "created": 1_700_000_000, "model": model,
                   "choices": [{"text": ANSWER, "index": 0, "logprobs": null, "finish_reason": "stop"}], "usage": usage}),
        );
    }
    let include_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let chunk = |text: &str, finish: Value| {
        let mut chunk = json!({"id": "cmpl-stub", "object": "text_completion", "created": 1_700_000_000, "model": model,
               "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    };
    let mut events: Vec<Value> = ANSWER.split_inclusive(' ').map(|word| chunk(word, Value::Null)).collect();
    events.push(chunk("", json!("stop")));
    if include_usage {
        events.push(json!({"id": "cmpl-stub", "object": "text_completion", "created": 1_700_000_000, "model": model,
                           "choices": [], "usage": usage}));
    }
    let mut body: String = events.iter().map(|event| format!("data: {event}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    (StatusCode::OK, [("content-type", "text/event-stream")], body).into_response()
}

/// The Responses API: [`ANSWER`] as one output message, streamed word by word or not.
async fn responses(State(stub): State<Stub>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if stub.keep_log {
        stub.log.lock().expect("stub log").requests.push(request.clone());
    }
    let model = request.get("model").and_then(Value::as_str).unwrap_or("ok").to_string();
    match model.as_str() {
        "down" => return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"error": {"message": "overloaded"}})),
        "reject" => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": "Invalid value for temperature", "type": "invalid_request_error", "param": "temperature", "code": null}}),
            )
        }
        _ => {}
    }
    let item = |text: &str, status: &str| {
        json!({"id": "msg_stub", "type": "message", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_stub", "object": "response", "created_at": 1_700_000_000, "status": status,
               "error": null, "incomplete_details": null, "instructions": request.get("instructions"),
               "model": model, "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
               "temperature": 1.0, "top_p": 1.0, "usage": usage, "metadata": {}})
    };
    let usage = json!({"input_tokens": 12, "output_tokens": 7, "total_tokens": 19,
                       "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(StatusCode::OK, response("completed", json!([item(ANSWER, "completed")]), usage));
    }
    let at = |kind: &str, extra: Value| {
        let mut event = json!({"type": kind, "item_id": "msg_stub", "output_index": 0, "content_index": 0});
        if let (Some(event), Value::Object(extra)) = (event.as_object_mut(), extra) {
            event.extend(extra);
        }
        event
    };
    let started = response("in_progress", json!([]), Value::Null);
    let mut events = vec![
        json!({"type": "response.created", "response": started}),
        json!({"type": "response.in_progress", "response": started}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": item("", "in_progress")}),
        at("response.content_part.added", json!({"part": {"type": "output_text", "text": "", "annotations": []}})),
    ];
    for word in ANSWER.split_inclusive(' ') {
        events.push(at("response.output_text.delta", json!({"delta": word, "logprobs": []})));
    }
    if model != "cut-stream" {
        events.push(at("response.output_text.done", json!({"text": ANSWER, "logprobs": []})));
        events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item(ANSWER, "completed")}));
        events.push(json!({"type": "response.completed",
                           "response": response("completed", json!([item(ANSWER, "completed")]), usage)}));
    }
    let mut body = String::new();
    for (sequence_number, mut event) in events.into_iter().enumerate() {
        event["sequence_number"] = json!(sequence_number);
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        body.push_str(&format!("event: {kind}\ndata: {event}\n\n"));
    }
    (StatusCode::OK, [("content-type", "text/event-stream")], body).into_response()
}
