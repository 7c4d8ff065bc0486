//! The compatibility suite (issue 16): real clients from the registries
//! drive a gateway over a real socket, in front of the stub upstream on
//! 127.0.0.1; each case checks what the client saw (in the client's own
//! script, which fails on the first surprise) and then the records in the
//! store and the requests the stub received.
//!
//! Gated by environment variables that `scripts/test.sh` sets after
//! installing the pinned clients: `UNDERSTUDY_PYTHON` (a venv with
//! `openai`, `langchain-openai` and `litellm`) and `UNDERSTUDY_NODE_MODULES`
//! (a `node_modules` folder with the `openai` Node SDK). Without them a test
//! says it is skipped, unless `CI` is set, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{stub::ANSWER, Harness};
use understudy_types::{CallRecord, Endpoint, ServedBy};

const CLIENTS: &str = r#"
[models.rate-limited-once]
provider = "cloud"

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
"#;

/// The variable's value, or `None` (and a message) when the test is skipped.
fn gate(variable: &str, what: &str) -> Option<OsString> {
    match std::env::var_os(variable) {
        Some(value) => Some(value),
        None => {
            assert!(std::env::var_os("CI").is_none(), "CI must set {variable} (scripts/test.sh does)");
            eprintln!("skipped: set {variable} to {what}");
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// Runs a client script off the runtime (the gateway serves on it), and
/// returns its checks, one JSON line each; fails with its output if it did.
async fn run_client(mut command: Command) -> Vec<Value> {
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("the client runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "the client failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect()
}

fn check_names(checks: &[Value]) -> Vec<&str> {
    checks.iter().map(|check| check["check"].as_str().unwrap_or_default()).collect()
}

fn upstream_requests_for(harness: &Harness, model: &str) -> usize {
    harness.stub.requests().iter().filter(|request| request["model"] == model).count()
}

fn statuses(calls: &[CallRecord], model: &str) -> Vec<u16> {
    calls.iter().filter(|call| call.model == model).map(|call| call.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works() {
    let Some(python) = gate("UNDERSTUDY_PYTHON", "a Python with the openai package") else {
        return;
    };
    let harness = Harness::start_routed(CLIENTS).await;
    let mut command = Command::new(python);
    command.arg(script("openai_python.py")).arg(&harness.base_url).arg(ANSWER);
    let checks = run_client(command).await;
    assert_eq!(
        check_names(&checks),
        [
            "sync-chat",
            "async-chat-and-responses",
            "responses",
            "responses-stream",
            "responses-understudy",
            "retry-after",
            "persistent-5xx",
            "responses-bad-request"
        ]
    );
    // The 429 reached the SDK, which retried it once: two upstream requests,
    // one per SDK attempt. The persistent 503: one upstream request per SDK
    // attempt (1 + its max_retries of 2), none from the gateway's own retries.
    assert_eq!(upstream_requests_for(&harness, "rate-limited-once"), 2);
    assert_eq!(upstream_requests_for(&harness, "down"), 3);
    let (calls, _harness) = harness.finish().await;
    assert_eq!(statuses(&calls, "rate-limited-once"), [429, 200]);
    assert_eq!(statuses(&calls, "down"), [503, 503, 503]);
    let responses: Vec<&CallRecord> = calls.iter().filter(|call| call.endpoint == Endpoint::Responses).collect();
    // async, plain, streamed, two by the understudy, one refused.
    assert_eq!(responses.len(), 6, "{responses:?}");
    let lead_served: Vec<&&CallRecord> =
        responses.iter().filter(|call| call.status == 200 && call.routing.is_none()).collect();
    assert_eq!(lead_served.len(), 3);
    for call in lead_served {
        assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (12, 7), "{}", call.request);
        assert_eq!(call.upstream_request_id.as_deref(), Some("req-stub-1"));
        let recorded: Value = serde_json::from_str(call.response.as_deref().unwrap()).unwrap();
        assert_eq!(recorded["status"], "completed");
    }
    let by_understudy = responses
        .iter()
        .filter(|call| call.routing.as_ref().is_some_and(|routing| routing.served_by == ServedBy::Understudy))
        .count();
    assert_eq!(by_understudy, 2);
    assert_eq!(responses.iter().filter(|call| call.status == 400).count(), 1);
}

/// The calls of a client run, by endpoint: (endpoint, status) in order.
fn endpoints(calls: &[CallRecord]) -> Vec<(Endpoint, u16)> {
    calls.iter().map(|call| (call.endpoint, call.status)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_node_client_works() {
    let Some(node_modules) = gate("UNDERSTUDY_NODE_MODULES", "a node_modules folder with the openai package") else {
        return;
    };
    let harness = Harness::start_routed(CLIENTS).await;
    let mut command = Command::new("node");
    command.env("NODE_PATH", node_modules).arg(script("openai_node.js")).arg(&harness.base_url).arg(ANSWER);
    let checks = run_client(command).await;
    assert_eq!(
        check_names(&checks),
        ["chat", "responses", "responses-stream", "responses-understudy", "responses-bad-request"]
    );
    let (calls, _harness) = harness.finish().await;
    assert_eq!(
        endpoints(&calls),
        [
            (Endpoint::ChatCompletions, 200),
            (Endpoint::Responses, 200),
            (Endpoint::Responses, 200),
            (Endpoint::Responses, 200),
            (Endpoint::Responses, 400),
        ]
    );
    assert!(calls[2].stream, "the third call was streamed");
    assert_eq!(calls[2].usage.completion_tokens, 7);
    assert_eq!(calls[3].routing.as_ref().map(|routing| routing.served_by), Some(ServedBy::Understudy));
    assert!(calls[..3].iter().all(|call| call.upstream_request_id.as_deref() == Some("req-stub-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_and_litellm_work() {
    let Some(python) = gate("UNDERSTUDY_PYTHON", "a Python with langchain-openai and litellm") else {
        return;
    };
    let harness = Harness::start_routed(CLIENTS).await;
    let mut command = Command::new(python);
    command.arg(script("langchain_litellm.py")).arg(&harness.base_url).arg(ANSWER);
    let checks = run_client(command).await;
    assert_eq!(
        check_names(&checks),
        [
            "langchain-chat",
            "langchain-responses",
            "langchain-responses-stream",
            "litellm-completion",
            "litellm-responses"
        ]
    );
    let (calls, _harness) = harness.finish().await;
    assert_eq!(
        endpoints(&calls),
        [
            (Endpoint::ChatCompletions, 200),
            (Endpoint::Responses, 200),
            (Endpoint::Responses, 200),
            (Endpoint::ChatCompletions, 200),
            (Endpoint::Responses, 200),
        ]
    );
    assert!(calls[2].stream, "langchain's stream() streams");
    for call in calls.iter().filter(|call| call.endpoint == Endpoint::Responses) {
        assert_eq!((call.usage.prompt_tokens, call.usage.completion_tokens), (12, 7), "{}", call.request);
        assert!(understudy_datasets::jsonl::ChatExample::from_call(call).is_some(), "{}", call.request);
    }
}
