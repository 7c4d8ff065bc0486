//! An Anthropic lead: OpenAI-shaped calls through the gateway reach a stub
//! Messages API on loopback translated, and come back (and are recorded) in
//! OpenAI's shape.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use support::Harness;

const KEY_VAR: &str = "UNDERSTUDY_TEST_ANTHROPIC_KEY";
const KEY: &str = "sk-ant-test-never-log-me";

/// What the stub received: each request's body, x-api-key and anthropic-version.
type Seen = Arc<Mutex<Vec<(Value, Option<String>, Option<String>)>>>;

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_string)
}

/// The answer's content blocks and stop reason, by model name.
fn answer_of(model: &str) -> (Value, &'static str) {
    match model {
        "claude-tool" => (
            json!([
                {"type": "text", "text": "Looking it up."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"city": "Paris"}},
            ]),
            "tool_use",
        ),
        _ => (json!([{"type": "text", "text": "Paris is the capital of France."}]), "end_turn"),
    }
}

async fn messages(State(seen): State<Seen>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    seen.lock().unwrap().push((body.clone(), header(&headers, "x-api-key"), header(&headers, "anthropic-version")));
    let model = body["model"].as_str().unwrap_or("").to_string();
    if model == "claude-reject" {
        let error =
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}});
        return (StatusCode::BAD_REQUEST, [("request-id", "req_400")], Json(error)).into_response();
    }
    if model == "claude-overloaded" {
        let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let status = StatusCode::from_u16(529).unwrap();
        return (status, [("retry-after", "3"), ("request-id", "req_529"), ("x-should-retry", "true")], Json(error))
            .into_response();
    }
    // What Anthropic sends beside an answer: a request id, rate limits and
    // headers of its own (this one must not reach the client).
    let answer_headers = [
        ("request-id", "req_ok"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-tokens-reset", "2025-06-01T00:00:00Z"),
        ("anthropic-organization-id", "org_private"),
    ];
    let (content, stop_reason) = answer_of(&model);
    if body["stream"] != json!(true) {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": 30, "output_tokens": 12},
        });
        return (answer_headers, Json(message)).into_response();
    }
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "usage": {"input_tokens": 30, "output_tokens": 1}}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for (idx, block) in content.as_array().unwrap().iter().enumerate() {
        if block["type"] == "text" {
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": idx, "content_block": {"type": "text", "text": ""}}),
            ));
            let text = block["text"].as_str().unwrap();
            let (head, tail) = text.split_at(text.len() / 2);
            for piece in [head, tail] {
                events.push(("content_block_delta", json!({"type": "content_block_delta", "index": idx, "delta": {"type": "text_delta", "text": piece}})));
            }
        } else {
            events.push(("content_block_start", json!({"type": "content_block_start", "index": idx, "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})));
            for piece in ["{\"city\": ", "\"Paris\"}"] {
                events.push(("content_block_delta", json!({"type": "content_block_delta", "index": idx, "delta": {"type": "input_json_delta", "partial_json": piece}})));
            }
        }
        events.push(("content_block_stop", json!({"type": "content_block_stop", "index": idx})));
    }
    events.push(("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": 12}})));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let text: String = events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
    ([("content-type", "text/event-stream")], answer_headers, text).into_response()
}

async fn start_stub() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new().route("/v1/messages", post(messages)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
    let addr = listener.local_addr().expect("stub addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("stub serves") });
    (format!("http://{addr}"), seen)
}

async fn start() -> (Harness, Seen) {
    std::env::set_var(KEY_VAR, KEY);
    let (stub_url, seen) = start_stub().await;
    let extra = format!(
        r#"
[providers.claude]
type = "anthropic"
base_url = "{stub_url}"
api_key_env = "{KEY_VAR}"
# Retries cover failures before an answer only: an error status is one request.
max_retries = 2
retry_backoff_ms = 10

[models.claude-sonnet-4]
provider = "claude"
name = "claude-text"
input_per_million = 3.0
output_per_million = 15.0

[models.claude-tools]
provider = "claude"
name = "claude-tool"
input_per_million = 3.0
output_per_million = 15.0

[models.claude-reject]
provider = "claude"

[models.claude-overloaded]
provider = "claude"

[tasks.support]
lead = "claude-sonnet-4"
"#
    );
    (Harness::start_routed(&extra).await, seen)
}

fn tool_request(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "lookup", "arguments": "{\"city\":\"Rome\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }}],
        "tool_choice": "required",
        "max_completion_tokens": 200,
        "temperature": 0.3,
        "stop": "END",
    })
}

const COST: f64 = (30.0 * 3.0 + 12.0 * 15.0) / 1e6;

#[tokio::test]
async fn a_task_on_an_anthropic_lead_is_translated_both_ways_and_recorded_in_openai_shape() {
    let (harness, seen) = start().await;
    let request = json!({
        "model": "task:support",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    });
    let (status, body) = harness.post_json("/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "Paris is the capital of France."})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 30);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    assert_eq!(body["usage"]["total_tokens"], 42);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (upstream, key, version) = &seen[0];
    assert_eq!(
        upstream,
        &json!({
            "model": "claude-text", "max_tokens": 4096, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Capital of France?"}],
        })
    );
    assert_eq!((key.as_deref(), version.as_deref()), (Some(KEY), Some("2023-06-01")));
    // The OpenAI stub never saw the call.
    assert!(harness.stub.requests().is_empty());

    let (calls, _harness) = harness.finish().await;
    let call = &calls[0];
    assert_eq!(
        (call.task.as_deref(), call.model.as_str(), call.provider.as_str()),
        (Some("support"), "claude-sonnet-4", "claude")
    );
    assert_eq!(serde_json::from_str::<Value>(&call.request).unwrap(), request);
    let response: Value = serde_json::from_str(call.response.as_deref().unwrap()).unwrap();
    assert_eq!(response, body);
    assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (30, 12));
    assert!((call.cost.dollars() - COST).abs() < 1e-15, "{:?}", call.cost);
}

#[tokio::test]
async fn tools_tool_calls_and_tool_results_are_translated() {
    let (harness, seen) = start().await;
    let (status, body) = harness.post_json("/chat/completions", &tool_request("claude-tools")).await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "Looking it up.");
    assert_eq!(
        message["tool_calls"],
        json!([{"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

    let (upstream, _, _) = seen.lock().unwrap()[0].clone();
    assert_eq!(upstream["system"], "Be brief.");
    assert_eq!((upstream["max_tokens"].clone(), upstream["temperature"].clone()), (json!(200), json!(0.3)));
    assert_eq!(upstream["stop_sequences"], json!(["END"]));
    assert_eq!(upstream["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        upstream["tools"],
        json!([{"name": "lookup", "description": "Weather of a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    );
    assert_eq!(
        upstream["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_0", "name": "lookup", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "sunny"}]},
        ])
    );
}

/// Parses an SSE body into its chunks; asserts it ends with `[DONE]`.
fn chunks_of(sse: &str) -> Vec<Value> {
    let events: Vec<&str> = sse.split("\n\n").filter(|event| !event.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{sse}");
    events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event.trim_start_matches("data: ")).expect("chunk json"))
        .collect()
}

#[tokio::test]
async fn a_streamed_answer_comes_back_as_openai_chunks_with_usage_when_asked() {
    let (harness, seen) = start().await;
    let mut request =
        json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "Capital of France?"}]});
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, sse) = harness.post_stream(&request).await;
    assert_eq!(status, 200, "{sse}");
    let chunks = chunks_of(&sse);
    assert!(chunks.iter().all(|chunk| chunk["object"] == "chat.completion.chunk"), "{sse}");
    let text: String = chunks.iter().filter_map(|chunk| chunk.pointer("/choices/0/delta/content")?.as_str()).collect();
    assert_eq!(text, "Paris is the capital of France.");
    let reasons: Vec<&Value> = chunks
        .iter()
        .filter_map(|chunk| chunk.pointer("/choices/0/finish_reason"))
        .filter(|reason| !reason.is_null())
        .collect();
    assert_eq!(reasons, vec![&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!((last["choices"].clone(), last["usage"]["total_tokens"].clone()), (json!([]), json!(42)));
    assert_eq!(seen.lock().unwrap()[0].0["stream"], json!(true));

    // Unasked, the usage chunk is withheld; the record has the counts all the same.
    let (status, sse) = harness
        .post_stream(
            &tool_request("claude-tools")
                .as_object()
                .map(|body| {
                    let mut body = body.clone();
                    body.insert("stream".into(), json!(true));
                    Value::Object(body)
                })
                .unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{sse}");
    let chunks = chunks_of(&sse);
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none_or(Value::is_null)), "{sse}");
    let arguments: String = chunks
        .iter()
        .filter_map(|chunk| chunk.pointer("/choices/0/delta/tool_calls/0/function/arguments")?.as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Paris\"}");

    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert!(call.stream && call.status == 200, "{call:?}");
        assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (30, 12));
        assert!((call.cost.dollars() - COST).abs() < 1e-15, "{:?}", call.cost);
    }
    let text: Value = serde_json::from_str(calls[0].response.as_deref().unwrap()).unwrap();
    assert_eq!(text["object"], "chat.completion");
    assert_eq!(text["choices"][0]["message"]["content"], "Paris is the capital of France.");
    let tool: Value = serde_json::from_str(calls[1].response.as_deref().unwrap()).unwrap();
    assert_eq!(tool["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(tool["choices"][0]["message"]["tool_calls"][0]["id"], "toolu_1");
    assert_eq!(tool["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(serde_json::from_str::<Value>(&calls[1].request).unwrap()["messages"][3]["role"], "tool");
}

#[tokio::test]
async fn an_anthropic_error_reaches_the_client_as_an_openai_error_with_its_status() {
    let (harness, _seen) = start().await;
    let request = json!({"model": "claude-reject", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = harness.post_json("/chat/completions", &request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["message"], "max_tokens: too large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body.get("type").is_none(), "{body}");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls[0].status, 400);
}

fn header_of(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_string)
}

/// 529 overloaded is an upstream status like any other: not retried by the
/// gateway (max_retries covers failures before an answer), passed on with
/// its status, an OpenAI error body, `retry-after` and the request id, so
/// the client's SDK retries it, streamed or not.
#[tokio::test]
async fn an_overloaded_anthropic_answer_is_passed_on_after_one_request_with_its_headers() {
    let (harness, seen) = start().await;
    let request = json!({"model": "claude-overloaded", "messages": [{"role": "user", "content": "hi"}]});
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    for (request_idx, request) in [request, streamed].iter().enumerate() {
        let (status, headers, text) = harness.post_full("/chat/completions", request).await;
        assert_eq!(status, 529, "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["type"], "overloaded_error");
        assert_eq!(body["error"]["message"], "Overloaded");
        assert_eq!(header_of(&headers, "retry-after").as_deref(), Some("3"));
        assert_eq!(header_of(&headers, "x-request-id").as_deref(), Some("req_529"));
        assert_eq!(header_of(&headers, "request-id"), None);
        assert_eq!(seen.lock().unwrap().len(), request_idx + 1, "one upstream request per call");
    }
    // A 400's request id reaches the client too.
    let reject = json!({"model": "claude-reject", "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, _) = harness.post_full("/chat/completions", &reject).await;
    assert_eq!((status, header_of(&headers, "x-request-id").as_deref()), (400, Some("req_400")));
    let (calls, _harness) = harness.finish().await;
    let statuses: Vec<u16> = calls.iter().map(|call| call.status).collect();
    assert_eq!(statuses, vec![529, 529, 400]);
}

/// An answer's request id and rate limits reach the client under OpenAI's
/// names, streamed or not; Anthropic's other headers do not.
#[tokio::test]
async fn an_anthropic_answer_carries_its_request_id_and_rate_limits_under_openai_names() {
    let (harness, _seen) = start().await;
    let request = json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "Capital of France?"}]});
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    for request in [request, streamed] {
        let (status, headers, text) = harness.post_full("/chat/completions", &request).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(header_of(&headers, "x-request-id").as_deref(), Some("req_ok"));
        assert_eq!(header_of(&headers, "x-ratelimit-remaining-requests").as_deref(), Some("49"));
        for private in ["request-id", "anthropic-organization-id", "anthropic-ratelimit-requests-remaining"] {
            assert_eq!(header_of(&headers, private), None, "{private}");
        }
        assert!(headers.keys().all(|name| !name.as_str().starts_with("anthropic-")), "{headers:?}");
    }
}
