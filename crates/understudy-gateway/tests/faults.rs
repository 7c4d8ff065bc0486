//! The fault suite of issue 12, on a real SQLite file and a real Postgres:
//! the gateway in front of a fault-injecting upstream on loopback, driven by
//! concurrent seeded load with a share of bad requests, and clients that give
//! up early. For every scenario: one record per request, the client's status
//! is the record's, and no truncated answer is ever marked successful (nor
//! becomes a training example).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::Harness;
use understudy_datasets::jsonl::ChatExample;
use understudy_store::testing::TestDatabase;
use understudy_types::CallRecord;

/// What the client must see.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// HTTP 200, a whole answer (a stream ends with `[DONE]`).
    Answer,
    /// An HTTP error with an OpenAI-shaped body.
    Error(u16),
    /// A stream whose headers were sent: an error event, no `[DONE]`, and a
    /// record of 502.
    StreamError,
}

struct Scenario {
    body: Vec<u8>,
    stream: bool,
    expect: Expect,
    /// A fault the upstream injected: the record must not be a success.
    faulty_upstream: bool,
}

fn chat(model: &str, stream: bool) -> Vec<u8> {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Capital of France?"}]})
        .to_string()
        .into_bytes()
}

fn scenario(rng: &mut StdRng) -> Scenario {
    let stream = rng.gen_bool(0.5);
    let upstream = |model: &str, expect: Expect| Scenario {
        body: chat(model, stream),
        stream,
        expect,
        faulty_upstream: expect != Expect::Answer,
    };
    let bad = |body: Vec<u8>, status: u16| Scenario {
        body,
        stream: false,
        expect: Expect::Error(status),
        faulty_upstream: false,
    };
    match rng.gen_range(0..18) {
        0..=3 => upstream("gpt-4o-mini", Expect::Answer),
        4 => bad(chat("nope-unknown", stream), 404),
        5 => bad(chat("m\u{0}x", stream), 404),
        6 => bad(chat(&"x".repeat(3000), stream), 404),
        7 => bad(
            json!({"model": "gpt-4o-mini", "messages": [{"role": "\u{0}", "content": "x"}]}).to_string().into_bytes(),
            400,
        ),
        8 => {
            // Random bytes, NUL among them, where JSON should be.
            let n_bytes = rng.gen_range(1..64);
            let mut body: Vec<u8> = (0..n_bytes).map(|_| rng.gen()).collect();
            body[0] = b'{';
            body.push(0);
            bad(body, 400)
        }
        9 => upstream("garbage", Expect::Error(502)),
        10 => upstream("truncated-json", Expect::Error(502)),
        11 => Scenario {
            body: chat("cut-stream", true),
            stream: true,
            expect: Expect::StreamError,
            faulty_upstream: true,
        },
        12 => Scenario {
            body: chat("malformed-chunk", true),
            stream: true,
            expect: Expect::StreamError,
            faulty_upstream: true,
        },
        13 => Scenario { body: chat("non-sse", true), stream: true, expect: Expect::Error(502), faulty_upstream: true },
        14 => Scenario { body: chat("huge", false), stream: false, expect: Expect::Answer, faulty_upstream: false },
        15 => upstream("reset", Expect::Error(502)),
        16 => upstream("rate-limited", Expect::Error(429)),
        _ => upstream("down", Expect::Error(503)),
    }
}

struct Seen {
    call_id: String,
    status: u16,
    body: String,
}

async fn send(harness: &Harness, scenario: &Scenario) -> Seen {
    let response = harness
        .client
        .post(format!("{}/chat/completions", harness.base_url))
        .header("content-type", "application/json")
        .body(scenario.body.clone())
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status().as_u16();
    let call_id = response
        .headers()
        .get(understudy_gateway::CALL_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .expect("every answer names its call")
        .to_string();
    let body = response.text().await.expect("body");
    Seen { call_id, status, body }
}

fn check_client_view(scenario: &Scenario, seen: &Seen) {
    match scenario.expect {
        Expect::Answer => {
            assert_eq!(seen.status, 200, "{}", seen.body);
            if scenario.stream {
                assert!(seen.body.trim_end().ends_with("data: [DONE]"), "{}", seen.body);
            }
        }
        Expect::Error(status) => {
            assert_eq!(seen.status, status, "{}", &seen.body[..seen.body.len().min(400)]);
            let error: Value = serde_json::from_str(&seen.body).expect("an error body is JSON");
            assert!(error["error"]["message"].is_string(), "OpenAI's error shape: {error}");
            assert!(error["error"]["type"].is_string(), "OpenAI's error shape: {error}");
        }
        Expect::StreamError => {
            assert_eq!(seen.status, 200, "the stream had started");
            assert!(!seen.body.contains("[DONE]"), "a broken stream must not end as a success: {}", seen.body);
            let last = seen.body.trim_end().lines().last().unwrap_or_default();
            let event: Value =
                serde_json::from_str(last.strip_prefix("data: ").expect("an SSE event")).expect("JSON event");
            assert!(event["error"]["message"].is_string(), "the last event is an error: {event}");
        }
    }
}

fn recorded_status(expect: Expect) -> u16 {
    match expect {
        Expect::Answer => 200,
        Expect::Error(status) => status,
        Expect::StreamError => 502,
    }
}

/// A success's answer is whole: every choice has a finish reason.
fn is_whole_answer(record: &CallRecord) -> bool {
    let Some(response) = record.response.as_deref().and_then(|text| serde_json::from_str::<Value>(text).ok()) else {
        return false;
    };
    let Some(choices) = response["choices"].as_array().filter(|choices| !choices.is_empty()) else { return false };
    choices.iter().all(|choice| choice["finish_reason"].is_string())
}

async fn run_suite(harness: Harness, seed: u64, n_requests: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let scenarios: Vec<Scenario> = (0..n_requests).map(|_| scenario(&mut rng)).collect();
    // Eight clients at a time.
    let mut seen = Vec::with_capacity(n_requests);
    for wave in scenarios.chunks(8) {
        let answers = futures::future::join_all(wave.iter().map(|scenario| send(&harness, scenario))).await;
        for (scenario, answer) in wave.iter().zip(answers) {
            check_client_view(scenario, &answer);
            seen.push(answer);
        }
    }
    let (records, _harness) = harness.finish().await;
    assert_eq!(records.len(), n_requests, "one record per request");
    let by_id: HashMap<String, &CallRecord> = records.iter().map(|record| (record.id.to_string(), record)).collect();
    for (scenario, answer) in scenarios.iter().zip(&seen) {
        let record = by_id.get(&answer.call_id).expect("the call named in the header is recorded");
        assert_eq!(record.status, recorded_status(scenario.expect), "{:?}: {:?}", scenario.expect, record.error);
        if scenario.faulty_upstream {
            assert!(!record.is_success(), "a fault is never a success: {record:?}");
            assert!(record.error.is_some());
            assert!(ChatExample::from_call(record).is_none(), "a fault never becomes a training example");
        }
        if record.is_success() {
            assert!(is_whole_answer(record), "a success holds a whole answer: {:?}", record.response);
        }
    }
}

#[tokio::test]
async fn issue_12_fault_suite_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
    run_suite(Harness::start_with(dir, &url).await, 12, 240).await;
}

#[tokio::test]
async fn issue_12_fault_suite_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().expect("tempdir");
    run_suite(Harness::start_with(dir, &database.url).await, 1212, 240).await;
    database.drop_database().await.expect("drop");
}

/// A client that gives up before the answer: the upstream call goes on, is
/// paid for, and is recorded as a 499 with what the upstream answered. It
/// used to leave no record at all.
async fn abandoned_calls_are_recorded(harness: Harness) {
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().expect("client");
    let n_calls = 10;
    let mut attempts = Vec::new();
    for idx in 0..n_calls {
        let body = json!({"model": "abandoned", "stream": idx % 2 == 0,
                          "messages": [{"role": "user", "content": format!("Question {idx}?")}]});
        let request = impatient.post(format!("{}/chat/completions", harness.base_url)).json(&body).send();
        attempts.push(async move {
            match request.await {
                Ok(response) => response.text().await.is_err(),
                Err(error) => error.is_timeout(),
            }
        });
    }
    let gave_up = futures::future::join_all(attempts).await;
    assert!(gave_up.iter().all(|gave_up| *gave_up), "every client gave up: {gave_up:?}");
    // `finish` waits for calls still running in the background.
    let (records, harness) = harness.finish().await;
    assert_eq!(harness.stub.requests().len(), n_calls, "each call reached the upstream once");
    assert_eq!(records.len(), n_calls, "each abandoned call is recorded");
    for record in &records {
        assert_eq!(record.status, 499, "{record:?}");
        assert!(record.error.as_deref().is_some_and(|error| error.contains("client disconnected")));
        assert!(record.cost.dollars() > 0.0, "the upstream's tokens are paid for, and counted");
        assert!(ChatExample::from_call(record).is_none(), "an abandoned call is not a training example");
        if !record.stream {
            let response = record.response.as_deref().expect("the upstream's answer is kept");
            assert!(response.contains(support::stub::ANSWER), "{response}");
        }
    }
}

#[tokio::test]
async fn issue_12_abandoned_calls_are_recorded_on_sqlite() {
    abandoned_calls_are_recorded(Harness::start().await).await;
}

#[tokio::test]
async fn issue_12_abandoned_calls_are_recorded_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().expect("tempdir");
    abandoned_calls_are_recorded(Harness::start_with(dir, &database.url).await).await;
    database.drop_database().await.expect("drop");
}

/// Thousands of mutated bodies against every handler: never a 5xx, every
/// error in OpenAI's shape, one record per chat or embeddings request.
async fn fuzz_handlers(harness: Harness, seed: u64, n_requests: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let seeds = [
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        json!({"model": "task:triage", "stream": true, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}).to_string(),
        json!({"model": "embedder", "input": ["a", "b"]}).to_string(),
        json!({"call_id": "00000000-0000-0000-0000-000000000000", "score": "positive"}).to_string(),
    ];
    let paths = ["/chat/completions", "/chat/completions", "/embeddings", "/feedback"];
    let mut n_recorded_requests = 0;
    for _ in 0..n_requests {
        let which = rng.gen_range(0..seeds.len());
        let mut body = seeds[which].clone().into_bytes();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..4) {
                0 if !body.is_empty() => {
                    let idx = rng.gen_range(0..body.len());
                    body[idx] = rng.gen();
                }
                1 if !body.is_empty() => {
                    let idx = rng.gen_range(0..body.len());
                    body.remove(idx);
                }
                2 => {
                    let idx = rng.gen_range(0..=body.len());
                    let insert: &[u8] =
                        [&b"\\u0000"[..], b"\0", b"null", b"[]", b"{}", b"\"", b"9e999"][rng.gen_range(0..7)];
                    body.splice(idx..idx, insert.iter().copied());
                }
                _ => {
                    let cut = rng.gen_range(0..=body.len());
                    body.truncate(cut);
                }
            }
        }
        let response = harness
            .client
            .post(format!("{}{}", harness.base_url, paths[which]))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        let is_stream = response
            .headers()
            .get("content-type")
            .is_some_and(|value| value.to_str().unwrap_or_default().starts_with("text/event-stream"));
        let text = response.text().await.expect("body");
        assert!(
            status < 500 || status == 502,
            "no server error for {:?}: {status} {text}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let error: Value = serde_json::from_str(&text).expect("an error body is JSON");
            assert!(error["error"]["message"].is_string() && error["error"]["type"].is_string(), "{error}");
        } else if !is_stream {
            assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
        }
        n_recorded_requests += usize::from(which != 3);
    }
    let (records, _harness) = harness.finish().await;
    assert_eq!(records.len(), n_recorded_requests, "one record per chat or embeddings request");
}

#[tokio::test]
async fn issue_12_fuzzed_bodies_on_sqlite() {
    fuzz_handlers(Harness::start().await, 7, 2000).await;
}

#[tokio::test]
async fn issue_12_fuzzed_bodies_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().expect("tempdir");
    fuzz_handlers(Harness::start_with(dir, &database.url).await, 77, 2000).await;
    database.drop_database().await.expect("drop");
}
