//! `POST /v1/responses` over real sockets: the stub upstream answers the
//! Responses API, the store is a real SQLite file, and a task's understudy
//! (the stub's `student`, asked through chat) answers text-only calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{json, Value};
use support::{stub::ANSWER, Harness};
use understudy_datasets::jsonl::ChatExample;
use understudy_types::{CallRecord, Endpoint, ServedBy, UsageSource};

const ROUTED: &str = r#"
[models.student]
provider = "cloud"
name = "student"
input_per_million = 0.01
output_per_million = 0.02

[tasks.cascaded]
lead = "gpt-4o-mini"
understudy = "student"
policy = "cascade:0.8"
audit_rate = 0.0

[tasks.shadowed]
lead = "gpt-4o-mini"
understudy = "student"
policy = "shadow"
"#;

fn output_text(response: &Value) -> String {
    let mut text = String::new();
    for item in response.get("output").and_then(Value::as_array).into_iter().flatten() {
        for part in item.get("content").and_then(Value::as_array).into_iter().flatten() {
            text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
        }
    }
    text
}

/// The events of an SSE body: (event name, data as JSON).
fn events(sse: &str) -> Vec<(String, Value)> {
    sse.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_string();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).unwrap_or(Value::String(value.to_string()));
                }
            }
            (name, data)
        })
        .collect()
}

fn only_call(calls: &[CallRecord]) -> &CallRecord {
    assert_eq!(calls.len(), 1, "{calls:?}");
    &calls[0]
}

#[tokio::test]
async fn a_plain_call_reaches_the_lead_and_is_recorded_with_its_usage_and_cost() {
    let harness = Harness::start().await;
    let request = json!({"model": "gpt-4o-mini", "instructions": "Be brief.", "input": "Capital of France?"});
    let (status, headers, body) = harness.post_full("/responses", &request).await;
    assert_eq!(status, 200, "{body}");
    let response: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(output_text(&response), ANSWER);
    assert_eq!(headers.get("x-request-id").and_then(|value| value.to_str().ok()), Some("req-stub-1"));
    assert!(headers.contains_key(understudy_gateway::CALL_ID_HEADER));
    let upstream = harness.stub.requests();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0]["model"], "ok", "the model is the provider's own name");
    assert_eq!(upstream[0]["instructions"], "Be brief.", "the rest goes upstream unchanged");
    assert!(upstream[0].get("stream_options").is_none());
    let (calls, _harness) = harness.finish().await;
    let call = only_call(&calls);
    assert_eq!(call.endpoint, Endpoint::Responses);
    assert_eq!((call.status, call.stream), (200, false));
    assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (12, 7));
    assert_eq!(call.usage_source, UsageSource::Provider);
    assert_eq!(call.upstream_request_id.as_deref(), Some("req-stub-1"));
    let expected_cost = 0.15 * 12.0 / 1e6 + 0.60 * 7.0 / 1e6;
    assert!((call.cost.dollars() - expected_cost).abs() < 1e-15, "{:?}", call.cost);
    assert_eq!(serde_json::from_str::<Value>(&call.request).unwrap(), request);
    // The call is a dataset row in the chat fine-tuning format.
    let example = ChatExample::from_call(call).expect("a Responses call is an example");
    assert_eq!(
        example.prompt,
        vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Capital of France?"})
        ]
    );
    assert_eq!(example.answer.get("content"), Some(&json!(ANSWER)));
}

#[tokio::test]
async fn a_stream_is_relayed_as_named_events_and_recorded_as_its_completed_response() {
    let harness = Harness::start().await;
    let request = json!({"model": "gpt-4o-mini", "input": "Capital of France?", "stream": true});
    let (status, headers, body) = harness.post_full("/responses", &request).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let events = events(&body);
    assert!(!body.contains("[DONE]"), "a Responses stream has no [DONE]: {body}");
    for (name, data) in &events {
        assert_eq!(Some(name.as_str()), data.get("type").and_then(Value::as_str), "{body}");
    }
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "response.completed");
    assert_eq!(output_text(&last["response"]), ANSWER);
    let deltas: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(deltas, ANSWER);
    let (calls, _harness) = harness.finish().await;
    let call = only_call(&calls);
    assert_eq!((call.endpoint, call.status, call.stream), (Endpoint::Responses, 200, true));
    assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (12, 7));
    assert!(call.ttft_ms.is_some());
    assert_eq!(call.upstream_request_id.as_deref(), Some("req-stub-1"));
    let recorded: Value = serde_json::from_str(call.response.as_deref().unwrap()).unwrap();
    assert_eq!(recorded["status"], "completed");
    assert_eq!(output_text(&recorded), ANSWER);
    assert!(ChatExample::from_call(call).is_some());
}

#[tokio::test]
async fn a_stream_cut_off_before_completion_ends_in_an_error_event_and_a_502_record() {
    let harness = Harness::start().await;
    let request = json!({"model": "cut-stream", "input": "Capital of France?", "stream": true});
    let (status, _headers, body) = harness.post_full("/responses", &request).await;
    assert_eq!(status, 200, "the status line was sent before the cut");
    let (last_name, last) = events(&body).pop().unwrap();
    assert_eq!(last_name, "error", "{body}");
    assert_eq!(last["type"], "error");
    assert!(last["message"].as_str().unwrap_or_default().contains("completed"), "{last}");
    let (calls, _harness) = harness.finish().await;
    let call = only_call(&calls);
    assert_eq!(call.status, 502);
    assert!(call.error.as_deref().unwrap_or_default().contains("completed"), "{:?}", call.error);
    // Text that did arrive is kept, and the call is no example.
    assert_eq!(output_text(&serde_json::from_str(call.response.as_deref().unwrap()).unwrap()), ANSWER);
    assert!(ChatExample::from_call(call).is_none());
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field_and_is_recorded() {
    let harness = Harness::start().await;
    for (request, param) in [
        (json!({"model": "gpt-4o-mini"}), "input"),
        (json!({"model": "gpt-4o-mini", "input": 3}), "input"),
        (json!({"model": "gpt-4o-mini", "input": [{"role": "robot", "content": "x"}]}), "input[0].role"),
        (json!({"model": "gpt-4o-mini", "input": "x", "instructions": ["no"]}), "instructions"),
        (json!({"model": "gpt-4o-mini", "input": "x", "stream": "yes"}), "stream"),
    ] {
        let (status, body) = harness.post_json("/responses", &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let (status, body) = harness.post_json("/responses", &json!({"model": "reject", "input": "x"})).await;
    assert_eq!(status, 400, "the upstream's 400 is passed on: {body}");
    assert_eq!(body["error"]["param"], "temperature");
    assert!(harness.stub.requests().len() == 1, "only the valid call went upstream");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 6);
    assert!(calls.iter().all(|call| call.endpoint == Endpoint::Responses && call.status == 400));
    // Only the call the upstream answered has its request id.
    let ids: Vec<Option<&str>> = calls.iter().map(|call| call.upstream_request_id.as_deref()).collect();
    assert_eq!(ids, vec![None, None, None, None, None, Some("req-stub-1")]);
}

#[tokio::test]
async fn a_task_text_call_is_answered_by_its_understudy_as_a_response() {
    let harness = Harness::start_routed(ROUTED).await;
    let request = json!({"model": "task:cascaded", "input": "Kind of question? || answer=HUM"});
    let (status, body) = harness.post_json("/responses", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(output_text(&body), "HUM");
    assert!(body["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0, "{body}");
    let streamed = json!({"model": "task:cascaded", "input": "Kind of question? || answer=NUM", "stream": true});
    let (status, _headers, sse) = harness.post_full("/responses", &streamed).await;
    assert_eq!(status, 200, "{sse}");
    let events = events(&sse);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert!(names.contains(&"response.output_text.delta"));
    assert_eq!(output_text(&events.last().unwrap().1["response"]), "NUM");
    let sequence: Vec<u64> = events.iter().map(|(_, data)| data["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(sequence, (0..events.len() as u64).collect::<Vec<_>>());
    // The understudy was asked in chat's shape; the lead not at all.
    let upstream = harness.stub.requests();
    assert_eq!(upstream.len(), 2);
    assert!(upstream.iter().all(|request| request["model"] == "student" && request.get("messages").is_some()));
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.endpoint, Endpoint::Responses);
        let routing = call.routing.as_ref().unwrap();
        assert_eq!(routing.served_by, ServedBy::Understudy);
        assert_eq!(call.model, "student");
        assert_eq!(call.upstream_request_id, None, "no lead answered");
        assert!(routing.lead_cost_avoided.dollars() > 0.0);
        // Recorded as a response object, so it is a dataset row too.
        let example = ChatExample::from_call(call).unwrap();
        assert_eq!(example.answer.get("content").and_then(Value::as_str), routing.understudy_answer.as_deref());
    }
}

#[tokio::test]
async fn a_structured_response_is_asked_of_the_understudy_with_chats_response_format() {
    let harness = Harness::start_routed(ROUTED).await;
    let schema = json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}});
    let request = json!({"model": "task:cascaded", "input": "Kind of question? || answer=HUM",
        "text": {"format": {"type": "json_schema", "name": "kind", "strict": true, "schema": schema}}});
    let (status, body) = harness.post_json("/responses", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(output_text(&body), "HUM");
    let upstream = harness.stub.requests();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0]["model"], "student");
    assert_eq!(
        upstream[0]["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "kind", "strict": true, "schema": schema}})
    );
    // A format chat has no form for is the client's error.
    let bad = json!({"model": "task:cascaded", "input": "q", "text": {"format": {"type": "xml"}}});
    let (status, body) = harness.post_json("/responses", &bad).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "text.format.type");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 2);
    let example = ChatExample::from_call(&calls[0]).unwrap();
    assert_eq!(example.response_format, upstream[0].get("response_format").cloned());
}

#[tokio::test]
async fn images_tools_and_stateful_calls_go_to_the_lead_with_the_reason_recorded() {
    let harness = Harness::start_routed(ROUTED).await;
    let image = json!([{"role": "user", "content": [
        {"type": "input_text", "text": "What is it? || answer=HUM"},
        {"type": "input_image", "image_url": "https://example.com/a.png"},
    ]}]);
    let tool = json!({"type": "function", "name": "lookup", "parameters": {"type": "object"}});
    let cases = [
        (json!({"model": "task:cascaded", "input": image}), "unsupported_input"),
        (json!({"model": "task:cascaded", "input": "q || answer=HUM", "tools": [tool]}), "unsupported_input"),
        (json!({"model": "task:cascaded", "input": "q || answer=HUM", "previous_response_id": "resp_1"}), "stateful"),
        (json!({"model": "task:cascaded", "input": "q || answer=HUM", "store": true}), "stateful"),
    ];
    for (request, _) in &cases {
        let (status, body) = harness.post_json("/responses", request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(output_text(&body), ANSWER, "the lead answers {request}");
    }
    let upstream = harness.stub.requests();
    assert_eq!(upstream.len(), cases.len(), "the understudy was never asked");
    assert!(upstream.iter().all(|request| request["model"] == "ok" && request.get("input").is_some()));
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), cases.len());
    for (call, (_, reason)) in calls.iter().zip(cases.iter()) {
        let routing = call.routing.as_ref().unwrap();
        assert_eq!(routing.served_by, ServedBy::Lead);
        assert_eq!(routing.fallback_reason.as_deref(), Some(*reason), "{}", call.request);
        assert!(routing.understudy_answer.is_none());
    }
}

#[tokio::test]
async fn shadow_serves_the_lead_and_records_the_understudys_agreement() {
    let harness = Harness::start_routed(ROUTED).await;
    for (question, stream) in [("q1", false), ("q2 || answer=HUM", false), ("q3", true)] {
        let request = json!({"model": "task:shadowed", "input": question, "stream": stream});
        let (status, _headers, body) = harness.post_full("/responses", &request).await;
        assert_eq!(status, 200, "{body}");
    }
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 3);
    let mut agreements: Vec<Option<bool>> = calls
        .iter()
        .map(|call| {
            let routing = call.routing.as_ref().unwrap();
            assert_eq!(routing.served_by, ServedBy::Lead);
            assert!(routing.understudy_answer.is_some());
            routing.agreement
        })
        .collect();
    agreements.sort();
    assert_eq!(agreements, vec![Some(false), Some(true), Some(true)]);
}
