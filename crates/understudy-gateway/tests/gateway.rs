//! The gateway over real sockets: a stub upstream on loopback, a real store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::{json, Value};
use support::{chat_body, stub::ANSWER, Harness, TEST_KEY};
use understudy_types::{Endpoint, UsageSource};

#[tokio::test]
async fn a_task_call_reaches_the_lead_and_is_recorded_with_its_cost() {
    let harness = Harness::start().await;
    let request = json!({
        "model": "task:triage",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "temperature": 0.2, "seed": 7,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "some_future_field": {"nested": [1, 2]},
    });
    let (status, body) = harness.post_json("/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);

    // Fields the gateway does not use reach the upstream untouched; only the
    // model name is rewritten to the provider's own.
    let upstream = harness.stub.requests();
    let mut expected = request.clone();
    expected["model"] = json!("ok");
    assert_eq!(upstream, vec![expected]);
    // The upstream gets the configured key, never the client's.
    assert_eq!(harness.stub.authorizations(), vec![Some(format!("Bearer {TEST_KEY}"))]);

    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.task.as_deref(), Some("triage"));
    assert_eq!((call.model.as_str(), call.provider.as_str()), ("gpt-4o-mini", "cloud"));
    assert_eq!(call.endpoint, Endpoint::ChatCompletions);
    assert_eq!((call.status, call.error.as_deref()), (200, None));
    assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (21, 7));
    assert_eq!(call.usage_source, UsageSource::Provider);
    let expected_cost = (21.0 * 0.15 + 7.0 * 0.60) / 1e6;
    assert!((call.cost.dollars() - expected_cost).abs() < 1e-15, "{:?}", call.cost);
    assert_eq!(serde_json::from_str::<Value>(&call.request).expect("request json"), request);
    let response: Value = serde_json::from_str(call.response.as_deref().expect("response")).expect("json");
    assert_eq!(response, body);
    assert!(call.latency_ms > 0.0 && call.ttft_ms.is_some());
    assert_eq!(call.id.get_version_num(), 7);
}

#[tokio::test]
async fn a_streamed_call_is_relayed_and_recorded_assembled() {
    let harness = Harness::start().await;
    let mut request = chat_body("gpt-4o-mini", "Capital of France?");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, sse) = harness.post_stream(&request).await;
    assert_eq!(status, 200);
    let events: Vec<&str> = sse.split("\n\n").filter(|event| !event.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event.trim_start_matches("data: ")).expect("chunk json"))
        .collect();
    let text: String = chunks.iter().filter_map(|chunk| chunk.pointer("/choices/0/delta/content")?.as_str()).collect();
    assert_eq!(text, ANSWER);
    assert_eq!(chunks.last().map(|chunk| chunk["usage"]["total_tokens"].clone()), Some(json!(28)));

    let (calls, _harness) = harness.finish().await;
    let call = &calls[0];
    assert!(call.stream);
    assert_eq!(call.status, 200);
    assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (21, 7));
    let response: Value = serde_json::from_str(call.response.as_deref().expect("response")).expect("json");
    assert_eq!(response["object"], "chat.completion");
    assert_eq!(response["choices"][0]["message"]["content"], ANSWER);
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    assert!(call.ttft_ms.expect("ttft") <= call.latency_ms);
}

#[tokio::test]
async fn usage_the_client_did_not_ask_for_is_recorded_but_not_sent() {
    let harness = Harness::start().await;
    let mut request = chat_body("gpt-4o-mini", "Capital of France?");
    request["stream"] = json!(true);
    let (_status, sse) = harness.post_stream(&request).await;
    assert!(sse.contains(ANSWER.split(' ').next().unwrap_or_default()), "{sse}");
    assert!(!sse.contains("\"usage\""), "no usage chunk nor `usage: null` unless asked for: {sse}");
    // A replayed (non-HTTP) lead's stream too.
    let replayed = json!({"model": "task:trec", "stream": true, "messages": [
        {"role": "system", "content": "Label the question."}, {"role": "user", "content": "How far is the Moon?"}]});
    let (_status, sse) = harness.post_stream(&replayed).await;
    assert!(sse.contains("NUM") && !sse.contains("\"usage\""), "{sse}");
    // Asked for: `usage: null` on chunks, then the usage chunk, as OpenAI sends them.
    request["stream_options"] = json!({"include_usage": true});
    let (_status, sse) = harness.post_stream(&request).await;
    assert!(sse.contains("\"usage\":null") && sse.contains("\"usage\":{"), "{sse}");
    // The gateway asked the upstream for usage on the client's behalf.
    assert_eq!(harness.stub.requests()[0]["stream_options"]["include_usage"], json!(true));
    let (calls, _harness) = harness.finish().await;
    assert_eq!((calls[0].usage.prompt_tokens, calls[0].usage_source), (21, UsageSource::Provider));
    assert_eq!(calls.len(), 3);
}

#[tokio::test]
async fn tokens_are_counted_when_the_upstream_reports_no_usage() {
    let harness = Harness::start().await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("no-usage", "Hello, world!")).await;
    assert_eq!(status, 200, "{body}");
    let (calls, _harness) = harness.finish().await;
    let call = &calls[0];
    assert_eq!(call.usage_source, UsageSource::Counted);
    // o200k_base: 3 + 3 + "user" (1) + "Hello, world!" (4) prompt tokens.
    assert_eq!(call.usage.prompt_tokens, 11);
    assert_eq!(call.usage.completion_tokens, 7, "'{ANSWER}' is 7 tokens in o200k_base");
    assert!((call.cost.dollars() - (11.0 + 14.0) / 1e6).abs() < 1e-15);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_are_recorded() {
    let harness = Harness::start().await;
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, Some("invalid_json")),
        ("[1, 2]".into(), 400, None, Some("invalid_json")),
        (json!({"messages": []}).to_string(), 400, Some("model"), None),
        (json!({"model": "task:triage"}).to_string(), 400, Some("messages"), None),
        (json!({"model": "task:triage", "messages": "hi"}).to_string(), 400, Some("messages"), None),
        (
            json!({"model": "task:triage", "messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}).to_string(),
            400,
            Some("messages[1]"),
            None,
        ),
        (json!({"model": "task:triage", "messages": [{"role": "user", "content": "a"}], "stream": "yes"}).to_string(), 400, Some("stream"), None),
        (chat_body("gpt-5-imaginary", "a").to_string(), 404, Some("model"), Some("model_not_found")),
        (chat_body("task:nope", "a").to_string(), 404, Some("model"), Some("model_not_found")),
        (chat_body("task:triage", &"x".repeat(70_000)).to_string(), 413, None, Some("request_too_large")),
    ];
    for (body, expected_status, expected_param, expected_code) in &cases {
        let (status, error) = harness.post("/chat/completions", body).await;
        assert_eq!(status, *expected_status, "{body:.80}: {error}");
        let error = &error["error"];
        assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()), "{error}");
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"].as_str(), *expected_param, "{error}");
        if let Some(code) = expected_code {
            assert_eq!(error["code"].as_str(), Some(*code), "{error}");
        }
    }
    assert!(harness.stub.requests().is_empty(), "nothing bad reaches the upstream");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), cases.len(), "every failed call is recorded too");
    let statuses: Vec<u16> = calls.iter().map(|call| call.status).collect();
    assert_eq!(statuses, cases.iter().map(|case| case.1).collect::<Vec<_>>());
    assert!(calls.iter().all(|call| call.error.is_some() && call.cost.dollars() == 0.0));
}

/// Legacy `/v1/completions` passes through to the lead, streamed or not,
/// and is recorded (a stream assembled into one `text_completion`).
#[tokio::test]
async fn legacy_completions_pass_through_and_are_recorded() {
    let harness = Harness::start().await;
    let (status, headers, text) =
        harness.post_full("/completions", &json!({"model": "gpt-4o-mini", "prompt": "Capital of France?"})).await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("json");
    assert_eq!((body["object"].as_str(), body["choices"][0]["text"].as_str()), (Some("text_completion"), Some(ANSWER)));
    assert!(headers.get(understudy_gateway::CALL_ID_HEADER).is_some());
    assert_eq!(headers.get("x-request-id").and_then(|value| value.to_str().ok()), Some("req-stub-1"));

    let streamed = json!({"model": "task:triage", "prompt": ["Capital of France?"], "stream": true, "max_tokens": 9});
    let (status, _, sse) = harness.post_full("/completions", &streamed).await;
    assert_eq!(status, 200, "{sse}");
    assert!(sse.contains("\"text\":\"Paris \"") && sse.ends_with("data: [DONE]\n\n"), "{sse}");
    assert!(!sse.contains("\"usage\""), "usage only when asked for: {sse}");
    let requests = harness.stub.requests();
    assert_eq!(requests[0], json!({"model": "ok", "prompt": "Capital of France?"}), "passed through as sent");
    assert_eq!(requests[1]["stream_options"]["include_usage"], true, "usage asked for the record");

    // A model whose provider is no OpenAI-compatible upstream: a 400.
    let (status, body) = harness.post_json("/completions", &json!({"model": "replayed", "prompt": "hi"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("unsupported_endpoint")), "{body}");
    let (status, body) = harness.post_json("/completions", &json!({"model": "gpt-4o-mini"})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("prompt")), "{body}");

    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().all(|call| call.endpoint == Endpoint::Completions), "{calls:?}");
    assert_eq!((calls[0].status, calls[0].usage.prompt_tokens, calls[0].usage_source), (200, 5, UsageSource::Provider));
    assert!(calls[0].cost.dollars() > 0.0);
    let recorded: Value = serde_json::from_str(calls[1].response.as_deref().expect("response")).expect("json");
    assert_eq!(recorded["object"], "text_completion");
    assert_eq!(recorded["choices"][0]["text"], ANSWER, "the stream assembled");
    assert_eq!(recorded["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        (calls[1].stream, calls[1].task.as_deref(), calls[1].usage.completion_tokens),
        (true, Some("triage"), 7)
    );
    assert_eq!((calls[2].status, calls[3].status), (400, 400));
}

#[tokio::test]
async fn unknown_routes_get_openai_404s() {
    let harness = Harness::start().await;
    let (status, body) = harness.post("/edits", "{}").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_url");
    let response = harness.client.get(format!("{}/chat/completions", harness.base_url)).send().await.expect("get");
    assert_eq!(response.status().as_u16(), 404);
}

/// Issue "Every client, every endpoint": the client's SDK retries statuses
/// itself, so the gateway passes a 5xx on after one upstream request; a
/// retry the client makes then succeeds.
#[tokio::test]
async fn an_upstream_500_is_passed_on_and_not_retried() {
    let harness = Harness::start().await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("flaky", "retry me")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["message"], "try again", "the upstream's own error body");
    assert_eq!(harness.stub.requests().len(), 1, "a status is the client's to retry");
    let (status, body) = harness.post_json("/chat/completions", &chat_body("flaky", "retry me")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(harness.stub.requests().len(), 2);
    let (calls, _harness) = harness.finish().await;
    assert_eq!((calls[0].status, calls[1].status), (500, 200));
}

#[tokio::test]
async fn an_upstream_503_makes_one_request_and_reaches_the_client_with_its_headers() {
    let harness = Harness::start().await;
    let (status, headers, text) = harness.post_full("/chat/completions", &chat_body("down", "hello")).await;
    assert_eq!(status, 503, "{text}");
    let body: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(body["error"]["message"], "overloaded");
    assert_eq!(harness.stub.requests().len(), 1, "max_retries = 2, and still one request");
    assert_eq!(headers.get("retry-after").map(|value| value.as_bytes()), Some(&b"2"[..]));
    assert_eq!(headers.get("retry-after-ms").map(|value| value.as_bytes()), Some(&b"1500"[..]));
    assert_eq!(headers.get("x-request-id").map(|value| value.as_bytes()), Some(&b"req-stub-1"[..]));
    // Streamed requests get the same status and headers.
    let mut streamed = chat_body("down", "hello");
    streamed["stream"] = json!(true);
    let (status, headers, _) = harness.post_full("/chat/completions", &streamed).await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("retry-after").map(|value| value.as_bytes()), Some(&b"2"[..]));
    assert_eq!(harness.stub.requests().len(), 2);
    let (calls, _harness) = harness.finish().await;
    assert_eq!((calls[0].status, calls[1].status), (503, 503));
    assert!(calls[0].error.as_deref().unwrap_or("").contains("HTTP 503"), "{:?}", calls[0].error);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_gets_a_502() {
    let harness = Harness::start().await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("ghost", "hello")).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("connection") && message.contains("after 2 attempts"), "max_retries = 1: {body}");
    let (calls, _harness) = harness.finish().await;
    assert_eq!((calls[0].status, calls[0].provider.as_str()), (502, "dead"));
}

/// A connection closed before any answer is retried: 1 + `max_retries`
/// connections reach the upstream for one client call.
#[tokio::test]
async fn a_connection_closed_before_headers_is_retried_max_retries_times() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    let extra = format!(
        "\n[providers.hangup]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmax_retries = 3\nretry_backoff_ms = 1\n\n[models.hangup]\nprovider = \"hangup\"\n"
    );
    let harness = Harness::start_routed(&extra).await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("hangup", "hello")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4, "1 + max_retries");
    let _ = harness.finish().await;
}

/// Headers clients act on reach them from the upstream, on answers and
/// errors, streamed or not; others do not.
#[tokio::test]
async fn upstream_rate_limit_and_request_id_headers_reach_the_client() {
    let harness = Harness::start().await;
    let mut streamed = chat_body("gpt-4o-mini", "hello");
    streamed["stream"] = json!(true);
    let calls = [
        ("/chat/completions", chat_body("gpt-4o-mini", "hello"), 200),
        ("/chat/completions", streamed, 200),
        ("/chat/completions", chat_body("rate-limited", "hello"), 429),
        ("/embeddings", json!({"model": "embedder", "input": "hello"}), 200),
    ];
    for (path, body, expected) in calls {
        let (status, headers, text) = harness.post_full(path, &body).await;
        assert_eq!(status, expected, "{text}");
        for (name, value) in support::stub::CLIENT_HEADERS {
            assert_eq!(headers.get(name).and_then(|value| value.to_str().ok()), Some(value), "{name} on {body}");
        }
        assert!(headers.get("x-stub-private").is_none(), "only the headers clients act on pass");
        assert!(headers.get(understudy_gateway::CALL_ID_HEADER).is_some());
        if status == 429 {
            assert_eq!(headers.get("retry-after").and_then(|value| value.to_str().ok()), Some("1"));
            let body: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(body["error"]["code"], "rate_limit_exceeded", "the upstream's body");
        } else {
            assert!(headers.get("retry-after").is_none());
        }
    }
    assert_eq!(harness.stub.requests().len(), 4, "a 429 is not retried either");
    let _ = harness.finish().await;
}

#[tokio::test]
async fn an_upstream_timeout_gets_a_504() {
    let harness = Harness::start().await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("slow", "hello")).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls[0].status, 504);
}

#[tokio::test]
async fn an_upstream_4xx_is_passed_on_unchanged() {
    let harness = Harness::start().await;
    let (status, body) = harness.post_json("/chat/completions", &chat_body("reject", "hello")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["message"], "Invalid value for temperature");
    assert_eq!(body["error"]["param"], "temperature");
    assert_eq!(harness.stub.requests().len(), 1, "a 4xx is not retried");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls[0].status, 400);
}

#[tokio::test]
async fn replay_answers_recorded_calls_up_to_whitespace() {
    let harness = Harness::start().await;
    let request = json!({"model": "task:trec", "messages": [
        {"role": "system", "content": "Label the question."},
        {"role": "user", "content": "  Who wrote\nHamlet? "},
    ]});
    let (status, body) = harness.post_json("/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "HUM");
    assert_eq!(body["usage"]["prompt_tokens"], 9);

    let mut streamed = json!({"model": "task:trec", "stream": true, "messages": [
        {"role": "system", "content": "Label the question."},
        {"role": "user", "content": "How far is the Moon?"},
    ]});
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, sse) = harness.post_stream(&streamed).await;
    assert_eq!(status, 200);
    assert!(sse.contains("\"content\":\"NUM\"") && sse.ends_with("data: [DONE]\n\n"), "{sse}");

    let missing = json!({"model": "task:trec", "messages": [{"role": "user", "content": "Never recorded"}]});
    let (status, body) = harness.post_json("/chat/completions", &missing).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "replay_no_match");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("no recording matching"), "{body}");

    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 3);
    assert_eq!((calls[0].provider.as_str(), calls[0].model.as_str()), ("recorded", "replayed"));
    assert_eq!(calls[1].response.as_deref().map(|text| text.contains("NUM")), Some(true));
    assert_eq!(calls[1].usage_source, UsageSource::Provider, "replay reports usage itself");
    assert_eq!(calls[2].status, 400);
}

#[tokio::test]
async fn models_and_health_are_served() {
    let harness = Harness::start().await;
    let models: Value = harness
        .client
        .get(format!("{}/models", harness.base_url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> =
        models["data"].as_array().expect("data").iter().filter_map(|model| model["id"].as_str()).collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"task:triage") && ids.contains(&"task:trec"), "{ids:?}");
    let health = harness.client.get(harness.base_url.replace("/v1", "/healthz")).send().await.expect("get");
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn a_model_is_retrieved_as_it_is_listed() {
    let harness = Harness::start().await;
    let get = |path: String| {
        let client = harness.client.clone();
        async move {
            let response = client.get(path).send().await.expect("get");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (_, models) = get(format!("{}/models", harness.base_url)).await;
    let listed = models["data"].as_array().expect("data").clone();
    assert!(listed.len() >= 3, "{models}");
    for object in &listed {
        let id = object["id"].as_str().expect("id");
        let (status, retrieved) = get(format!("{}/models/{id}", harness.base_url)).await;
        assert_eq!((status, &retrieved), (200, object), "{id}");
    }
    // Clients that percent-encode the id (`task%3Atriage`) get the same object.
    let (status, retrieved) = get(format!("{}/models/task%3Atriage", harness.base_url)).await;
    assert_eq!((status, retrieved["id"].as_str()), (200, Some("task:triage")));
    assert_eq!(retrieved["lead"], "gpt-4o-mini");

    let (status, body) = get(format!("{}/models/no-such-model", harness.base_url)).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "model");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("no-such-model"), "{body}");
    let (status, _) = get(format!("{}/models/task:nope", harness.base_url)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn embeddings_pass_through_and_are_recorded() {
    let harness = Harness::start().await;
    let (status, body) =
        harness.post_json("/embeddings", &json!({"model": "embedder", "input": ["one", "two"], "dimensions": 4})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][1]["embedding"], json!([0.1, 0.2, 0.3, 0.4]));
    assert_eq!(
        harness.stub.requests()[0],
        json!({"model": "text-embedding-3-small", "input": ["one", "two"], "dimensions": 4})
    );
    let (status, body) = harness.post_json("/embeddings", &json!({"model": "embedder"})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("input")));
    // Like chat completions, embeddings name their record in a header.
    let response = harness
        .client
        .post(format!("{}/embeddings", harness.base_url))
        .json(&json!({"model": "embedder", "input": "three"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status().as_u16(), 200);
    let call_id = response.headers().get(understudy_gateway::CALL_ID_HEADER).expect("call id").to_str().expect("text");
    let call_id = call_id.to_string();
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls[2].id.to_string(), call_id);
    let call = &calls[0];
    assert_eq!((call.endpoint, call.usage.prompt_tokens), (Endpoint::Embeddings, 8));
    assert!((call.cost.dollars() - 8.0 * 0.02 / 1e6).abs() < 1e-18);
    let recorded: Value = serde_json::from_str(call.response.as_deref().expect("response")).expect("json");
    assert_eq!(recorded["data"][0]["embedding_dims"], 4, "vectors are summarized, not stored");
    assert_eq!(calls[1].status, 400);
}

#[tokio::test]
async fn the_upstream_key_is_never_recorded() {
    let harness = Harness::start().await;
    for model in ["gpt-4o-mini", "down", "reject", "slow"] {
        harness.post_json("/chat/completions", &chat_body(model, "hello")).await;
    }
    let (calls, harness) = harness.finish().await;
    assert_eq!(calls.len(), 4);
    harness.store.close().await;
    for entry in std::fs::read_dir(harness.dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        // SQLite removes its -wal and -shm files as the last connection
        // closes, which may land between the listing and the read.
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => panic!("read {}: {error}", path.display()),
        };
        let leaked = bytes.windows(TEST_KEY.len()).any(|window| window == TEST_KEY.as_bytes());
        assert!(!leaked, "the API key leaked into {}", path.display());
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_still_recorded() {
    let harness = Harness::start().await;
    let mut request = chat_body("gpt-4o-mini", "Capital of France?");
    request["stream"] = json!(true);
    let response = harness
        .client
        .post(format!("{}/chat/completions", harness.base_url))
        .json(&request)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    drop(response);
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 1);
    assert!(calls[0].stream);
}

#[tokio::test]
async fn the_gateway_records_into_postgres_too() {
    let database =
        understudy_store::testing::TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let harness = Harness::start_with(tempfile::tempdir().expect("tempdir"), &database.url).await;
    let (status, _body) = harness.post_json("/chat/completions", &chat_body("task:triage", "hello")).await;
    assert_eq!(status, 200);
    let mut streamed = chat_body("task:triage", "hello again");
    streamed["stream"] = json!(true);
    harness.post_stream(&streamed).await;
    let (calls, harness) = harness.finish().await;
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|call| call.status == 200 && call.usage.prompt_tokens == 21));
    harness.store.close().await;
    database.drop_database().await.expect("drop");
}

#[tokio::test]
async fn feedback_names_a_call_by_the_id_its_response_carried() {
    use understudy_types::{CallRecord, FeedbackScore, Uuid};
    let harness = Harness::start().await;
    let response = harness
        .client
        .post(format!("{}/chat/completions", harness.base_url))
        .json(&chat_body("task:triage", "Capital of France?"))
        .send()
        .await
        .expect("request reaches the gateway");
    assert_eq!(response.status().as_u16(), 200);
    let header = response.headers().get(understudy_gateway::CALL_ID_HEADER).expect("the response names its call");
    let call_id = Uuid::parse_str(header.to_str().expect("ascii")).expect("a uuid");
    // Straight away, while the record may still be in the recorder's queue.
    let (status, body) =
        harness.post_json("/feedback", &json!({"call_id": call_id.to_string(), "score": "positive"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["object"].as_str(), body["score"].as_str()), (Some("feedback"), Some("positive")));
    assert_eq!(body["call_id"], json!(call_id.to_string()));

    // A streamed answer names its call too.
    let mut streamed = chat_body("task:triage", "Capital of Spain?");
    streamed["stream"] = json!(true);
    let response = harness
        .client
        .post(format!("{}/chat/completions", harness.base_url))
        .json(&streamed)
        .send()
        .await
        .expect("request reaches the gateway");
    let streamed_id = Uuid::parse_str(
        response.headers().get(understudy_gateway::CALL_ID_HEADER).expect("header").to_str().expect("ascii"),
    )
    .expect("a uuid");
    assert_ne!(streamed_id, call_id);
    response.text().await.expect("stream ends");

    // A call this gateway never answered, found in the store.
    let mut imported = CallRecord { id: CallRecord::new_id(), ..sample_call() };
    imported.task = Some("triage".into());
    harness.store.insert_calls(std::slice::from_ref(&imported)).await.expect("insert");
    let (status, body) = harness
        .post_json("/feedback", &json!({"call_id": imported.id.to_string(), "score": 1, "comment": "fine"}))
        .await;
    assert_eq!(status, 200, "{body}");

    // Bad bodies are 400s in OpenAI's shape; an unknown call is a 404.
    let id = call_id.to_string();
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, Some("invalid_json")),
        ("[1]".into(), 400, None, Some("invalid_json")),
        (json!({"score": "positive"}).to_string(), 400, Some("call_id"), None),
        (json!({"call_id": 7, "score": "positive"}).to_string(), 400, Some("call_id"), None),
        (json!({"call_id": "not-a-call", "score": "positive"}).to_string(), 400, Some("call_id"), None),
        (json!({"call_id": id}).to_string(), 400, Some("score"), None),
        (json!({"call_id": id, "score": "meh"}).to_string(), 400, Some("score"), None),
        (json!({"call_id": id, "score": 2}).to_string(), 400, Some("score"), None),
        (json!({"call_id": id, "score": "down", "comment": 5}).to_string(), 400, Some("comment"), None),
        (
            json!({"call_id": Uuid::now_v7().to_string(), "score": "negative"}).to_string(),
            404,
            Some("call_id"),
            Some("call_not_found"),
        ),
    ];
    for (body, status, param, code) in &cases {
        let (got_status, got) = harness.post("/feedback", body).await;
        assert_eq!(got_status, *status, "{body} -> {got}");
        assert_eq!(got["error"]["type"], "invalid_request_error", "{body} -> {got}");
        assert_eq!(got["error"]["param"].as_str(), *param, "{body} -> {got}");
        assert_eq!(got["error"]["code"].as_str(), *code, "{body} -> {got}");
        assert!(got["error"]["message"].as_str().is_some_and(|message| !message.is_empty()));
    }

    // The user changes their mind once the record is written: the latest counts.
    let (status, body) =
        harness.post_json("/feedback", &json!({"call_id": id, "score": "thumbs_down", "comment": "wrong city"})).await;
    assert_eq!(status, 200, "{body}");
    let (calls, harness) = harness.finish().await;
    assert!(calls.iter().any(|call| call.id == call_id) && calls.iter().any(|call| call.id == streamed_id));
    let history: Vec<FeedbackScore> =
        harness.store.call_feedback(call_id).await.expect("history").iter().map(|feedback| feedback.score).collect();
    assert_eq!(history, vec![FeedbackScore::Positive, FeedbackScore::Negative]);
    let latest = harness.store.task_feedback("triage").await.expect("task feedback");
    assert_eq!(latest.len(), 2, "{latest:?}");
    assert_eq!(latest[&call_id].comment.as_deref(), Some("wrong city"));
    assert_eq!(latest[&imported.id].score, FeedbackScore::Positive);
}

fn sample_call() -> understudy_types::CallRecord {
    understudy_types::CallRecord {
        id: understudy_types::CallRecord::new_id(),
        created_at: understudy_types::OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns"),
        task: None,
        model: "gpt-4o-mini".into(),
        provider: "cloud".into(),
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        request: chat_body("task:triage", "Old question").to_string(),
        response: Some(json!({"choices": [{"message": {"role": "assistant", "content": "Old answer"}}]}).to_string()),
        usage: understudy_types::Usage::default(),
        usage_source: UsageSource::Provider,
        latency_ms: 1.0,
        ttft_ms: None,
        status: 200,
        error: None,
        cost: understudy_types::Money(0.0),
        routing: None,
        key: None,
        upstream_request_id: None,
    }
}

/// The upstream's `x-request-id` is kept in the record, for answers,
/// streams and error answers alike (issue 16).
#[tokio::test]
async fn the_upstream_request_id_is_kept_in_the_record() {
    let harness = Harness::start().await;
    let (status, _) = harness.post_json("/chat/completions", &chat_body("gpt-4o-mini", "plain")).await;
    assert_eq!(status, 200);
    let mut streamed = chat_body("gpt-4o-mini", "streamed");
    streamed["stream"] = json!(true);
    let (status, _) = harness.post_stream(&streamed).await;
    assert_eq!(status, 200);
    let (status, _) = harness.post_json("/completions", &json!({"model": "gpt-4o-mini", "prompt": "legacy"})).await;
    assert_eq!(status, 200);
    let (status, _) = harness.post_json("/embeddings", &json!({"model": "gpt-4o-mini", "input": "vectors"})).await;
    assert_eq!(status, 200);
    let (status, _) = harness.post_json("/chat/completions", &chat_body("down", "failing")).await;
    assert_eq!(status, 503);
    let (status, _) = harness.post_json("/chat/completions", &chat_body("ghost", "unreachable")).await;
    assert_eq!(status, 502);
    let (calls, _harness) = harness.finish().await;
    let ids: Vec<Option<&str>> = calls.iter().map(|call| call.upstream_request_id.as_deref()).collect();
    let answered = Some("req-stub-1");
    assert_eq!(ids, vec![answered, answered, answered, answered, answered, None], "{calls:?}");
}
