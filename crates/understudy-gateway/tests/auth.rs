//! Gateway keys over real sockets: who may call, on what, how much, and
//! what the operators' endpoints show.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{chat_body, Harness};
use understudy_gateway::auth::{create_key, NewKey};
use understudy_types::{
    Budget, BudgetPeriod, CallRecord, Endpoint, GatewayKey, KeyRef, Money, OffsetDateTime, Usage, UsageSource,
};

async fn key(harness: &Harness, new: NewKey) -> (String, GatewayKey) {
    create_key(&harness.store, new).await.expect("key is created")
}

fn named(name: &str) -> NewKey {
    NewKey { name: name.to_string(), ..NewKey::default() }
}

/// Asserts an OpenAI error body's status, type and code.
fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["type"], want_type, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
}

#[tokio::test]
async fn requests_without_a_usable_key_get_401_and_are_not_recorded() {
    let harness = Harness::start_with_keys().await;
    let (good, good_key) = key(&harness, named("team-a")).await;
    let (revoked, revoked_key) = key(&harness, named("old")).await;
    harness.store.revoke_key(&revoked_key.id, OffsetDateTime::now_utc()).await.expect("revoke");
    let yesterday = OffsetDateTime::now_utc() - time::Duration::days(1);
    let (expired, _) = key(&harness, NewKey { expires_at: Some(yesterday), ..named("temp") }).await;
    let body = chat_body("task:triage", "Capital of France?");

    let (status, _, answer) = harness.post_as(None, "/chat/completions", &body).await;
    assert_error(status, &answer, 401, "invalid_request_error", "missing_api_key");
    let unknown = format!("{good}x");
    let (status, _, answer) = harness.post_as(Some(&unknown), "/chat/completions", &body).await;
    assert_error(status, &answer, 401, "invalid_request_error", "invalid_api_key");
    // A gateway that cached the key before its revocation refuses it by its
    // next refresh (50 ms here); wait for that on an endpoint that records
    // nothing, then check the chat answer.
    for _ in 0..200 {
        if harness.get_as(Some(&revoked), "/v1/models").await.0 == 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, _, answer) = harness.post_as(Some(&revoked), "/chat/completions", &body).await;
    assert_error(status, &answer, 401, "invalid_request_error", "invalid_api_key");
    assert!(answer["error"]["message"].as_str().unwrap().contains("revoked"), "{answer}");
    let (status, _, answer) = harness.post_as(Some(&expired), "/chat/completions", &body).await;
    assert_error(status, &answer, 401, "invalid_request_error", "invalid_api_key");
    assert!(answer["error"]["message"].as_str().unwrap().contains("expired"), "{answer}");
    // The other endpoints want a key too.
    let (status, _, _) = harness.post_as(None, "/embeddings", &json!({"model": "embedder", "input": "x"})).await;
    assert_eq!(status, 401);
    let (status, _) = harness.get_as(None, "/v1/models").await;
    assert_eq!(status, 401);
    let (status, _) = harness.get_as(Some(&good), "/v1/models").await;
    assert_eq!(status, 200);

    let (status, _, answer) = harness.post_as(Some(&good), "/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    // The upstream never sees the client's key.
    assert!(harness.stub.authorizations().iter().all(|sent| !sent.as_deref().unwrap_or("").contains(&good)));

    let (calls, harness) = harness.finish().await;
    assert_eq!(calls.len(), 1, "only the call with a usable key is recorded");
    assert_eq!(calls[0].key, Some(KeyRef { id: good_key.id.clone(), name: "team-a".into() }));
    // The store holds the key's hash and prefix, never the key.
    let db = std::fs::read(harness.dir.path().join("gateway.db")).expect("db");
    assert!(!db.windows(good.len()).any(|window| window == good.as_bytes()), "the key is in the store");
    assert!(good.starts_with(&good_key.prefix) && good_key.prefix.len() < good.len());
}

#[tokio::test]
async fn a_key_outside_its_scope_gets_403_and_the_call_is_recorded_with_it() {
    let harness = Harness::start_with_keys().await;
    let tasks = NewKey { tasks: Some(vec!["triage".into()]), ..named("triage-only") };
    let (triage_only, _) = key(&harness, tasks).await;
    let models = NewKey { models: Some(vec!["gpt-4o-mini".into()]), ..named("mini-only") };
    let (mini_only, _) = key(&harness, models).await;

    let (status, _, _) = harness.post_as(Some(&triage_only), "/chat/completions", &chat_body("task:triage", "a")).await;
    assert_eq!(status, 200);
    for model in ["task:trec", "gpt-4o-mini"] {
        let (status, _, answer) =
            harness.post_as(Some(&triage_only), "/chat/completions", &chat_body(model, "b")).await;
        assert_error(status, &answer, 403, "permission_error", "permission_denied");
    }
    let (status, _, _) = harness.post_as(Some(&mini_only), "/chat/completions", &chat_body("gpt-4o-mini", "c")).await;
    assert_eq!(status, 200);
    let (status, _, answer) =
        harness.post_as(Some(&mini_only), "/chat/completions", &chat_body("task:triage", "d")).await;
    assert_error(status, &answer, 403, "permission_error", "permission_denied");
    let embed = json!({"model": "embedder", "input": "x"});
    let (status, _, answer) = harness.post_as(Some(&mini_only), "/embeddings", &embed).await;
    assert_error(status, &answer, 403, "permission_error", "permission_denied");

    assert_eq!(harness.stub.requests().len(), 2, "refused calls never reach the upstream");
    let (calls, _harness) = harness.finish().await;
    let summary: Vec<(String, u16)> =
        calls.iter().map(|call| (call.key.as_ref().expect("key").name.clone(), call.status)).collect();
    assert_eq!(
        summary,
        [
            ("triage-only", 200),
            ("triage-only", 403),
            ("triage-only", 403),
            ("mini-only", 200),
            ("mini-only", 403),
            ("mini-only", 403)
        ]
        .map(|(name, status)| (name.to_string(), status))
    );
}

#[tokio::test]
async fn a_revoked_key_stops_working_in_a_running_gateway() {
    let harness = Harness::start_with_keys().await;
    let (secret, gateway_key) = key(&harness, named("soon-gone")).await;
    let body = chat_body("task:triage", "Capital of France?");
    let (status, _, _) = harness.post_as(Some(&secret), "/chat/completions", &body).await;
    assert_eq!(status, 200, "a key works as soon as it is made");
    harness.store.revoke_key(&gateway_key.id, OffsetDateTime::now_utc()).await.expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = harness.post_as(Some(&secret), "/chat/completions", &body).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "the revocation never reached the gateway");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn metrics_and_health_details_need_an_admin_key() {
    let harness = Harness::start_with_keys().await;
    let (user, _) = key(&harness, named("user")).await;
    let (admin, _) = key(&harness, NewKey { admin: true, ..named("ops") }).await;

    let (status, _) = harness.get_as(None, "/metrics").await;
    assert_eq!(status, 401);
    let (status, body) = harness.get_as(Some(&user), "/metrics").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = harness.get_as(Some(&admin), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("understudy_records_pending"), "{body}");

    for key in [None, Some(user.as_str()), Some("us-not-a-key")] {
        let (status, body) = harness.get_as(key, "/healthz").await;
        assert_eq!((status, serde_json::from_str::<Value>(&body).expect("json")), (200, json!({"status": "ok"})));
    }
    let (status, body) = harness.get_as(Some(&admin), "/healthz").await;
    let health: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status, 200);
    assert!(health.get("records_pending").is_some() && health.get("tasks").is_some(), "{health}");
}

#[tokio::test]
async fn a_key_rates_only_its_own_successful_calls() {
    let harness = Harness::start_with_keys().await;
    let (alice, alice_key) = key(&harness, named("alice")).await;
    let (bob, _) = key(&harness, named("bob")).await;
    let (admin, _) = key(&harness, NewKey { admin: true, ..named("ops") }).await;
    let call_of = |headers: &reqwest::header::HeaderMap| {
        headers.get(understudy_gateway::CALL_ID_HEADER).and_then(|value| value.to_str().ok()).unwrap().to_string()
    };
    let ask = |model: &str| {
        harness
            .client
            .post(format!("{}/chat/completions", harness.base_url))
            .bearer_auth(&alice)
            .json(&chat_body(model, "Capital of France?"))
            .send()
    };
    let answered = ask("task:triage").await.expect("call");
    assert_eq!(answered.status(), 200);
    let good_call = call_of(answered.headers());
    let failed = ask("down").await.expect("call");
    assert_eq!(failed.status(), 503, "the upstream's status");
    let failed_call = call_of(failed.headers());

    let rate = |key: String, call: String| {
        let harness = &harness;
        async move { harness.post_as(Some(&key), "/feedback", &json!({"call_id": call, "score": "positive"})).await }
    };
    let (status, _, answer) = rate(bob.clone(), good_call.clone()).await;
    assert_error(status, &answer, 403, "permission_error", "permission_denied");
    let (status, _, answer) = rate(alice.clone(), good_call.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, answer) = rate(admin.clone(), good_call.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, answer) = rate(alice.clone(), failed_call.clone()).await;
    assert_error(status, &answer, 400, "invalid_request_error", "call_failed");

    // A call this gateway never answered is found in the store, with its key.
    let stored =
        CallRecord { key: Some(alice_key.key_ref()), ..stored_call(OffsetDateTime::now_utc(), Money(0.0), 200) };
    harness.store.insert_calls(std::slice::from_ref(&stored)).await.expect("insert");
    let (status, _, _) = rate(bob.clone(), stored.id.to_string()).await;
    assert_eq!(status, 403);
    let (status, _, _) = rate(alice.clone(), stored.id.to_string()).await;
    assert_eq!(status, 200);
    let broken =
        CallRecord { key: Some(alice_key.key_ref()), ..stored_call(OffsetDateTime::now_utc(), Money(0.0), 500) };
    harness.store.insert_calls(std::slice::from_ref(&broken)).await.expect("insert");
    let (status, _, answer) = rate(alice.clone(), broken.id.to_string()).await;
    assert_error(status, &answer, 400, "invalid_request_error", "call_failed");
}

fn stored_call(at: OffsetDateTime, cost: Money, status: u16) -> CallRecord {
    CallRecord {
        id: CallRecord::new_id(),
        created_at: at,
        task: Some("triage".into()),
        model: "gpt-4o-mini".into(),
        provider: "cloud".into(),
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        request: "{}".into(),
        response: Some("{}".into()),
        usage: Usage { prompt_tokens: 1, completion_tokens: 1 },
        usage_source: UsageSource::Provider,
        latency_ms: 1.0,
        ttft_ms: None,
        status,
        error: (status != 200).then(|| "failed".to_string()),
        cost,
        routing: None,
        key: None,
        upstream_request_id: None,
    }
}

/// What one call to `task:triage` costs at the stub's usage (21 prompt and
/// 7 completion tokens at gpt-4o-mini's 0.15/0.60 per million).
const CALL_COST: f64 = (21.0 * 0.15 + 7.0 * 0.60) / 1e6;

#[tokio::test]
async fn a_burst_against_a_budget_spends_at_most_the_budget() {
    let harness = Harness::start_with_keys().await;
    let budget = 10.0 * CALL_COST;
    let new = NewKey { budget: Some(Budget { usd: budget, period: BudgetPeriod::Day }), ..named("capped") };
    let (secret, capped) = key(&harness, new).await;
    // max_tokens 16 keeps each call's estimate above its real cost.
    let mut body = chat_body("task:triage", "Capital of France?");
    body["max_tokens"] = json!(16);
    let mut burst = Vec::new();
    for _ in 0..50 {
        let (client, url, secret, body) =
            (harness.client.clone(), format!("{}/chat/completions", harness.base_url), secret.clone(), body.clone());
        burst.push(tokio::spawn(async move {
            let response = client.post(url).bearer_auth(secret).json(&body).send().await.expect("answer");
            let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_string());
            let status = response.status().as_u16();
            (status, retry_after, response.json::<Value>().await.expect("json"))
        }));
    }
    let mut n_served = 0;
    for call in burst {
        let (status, retry_after, answer) = call.await.expect("task");
        match status {
            200 => n_served += 1,
            429 => {
                assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
                let seconds: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
                assert!((1..=86_400).contains(&seconds), "{seconds}");
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!((1..=10).contains(&n_served), "{n_served} calls served");

    // Once the calls in flight are settled, what is left of the budget
    // serves calls one by one, until a spent budget waits for the next day.
    let mut last_retry_after = None;
    for _ in 0..10 {
        let (status, retry_after, answer) = harness.post_as(Some(&secret), "/chat/completions", &body).await;
        if status == 429 {
            assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
            last_retry_after = retry_after;
            break;
        }
        assert_eq!(status, 200, "{answer}");
        n_served += 1;
    }
    let seconds: u64 = last_retry_after.expect("the budget ran out").parse().expect("seconds");
    assert!(seconds > 1, "a spent budget waits for the next period, not {seconds} s");
    assert!((5..=10).contains(&n_served), "{n_served} calls served in all");
    let (calls, _harness) = harness.finish().await;
    let recorded: f64 = calls
        .iter()
        .filter(|call| call.key.as_ref().map(|key| key.id.as_str()) == Some(capped.id.as_str()))
        .map(|call| call.cost.dollars())
        .sum();
    assert!(recorded <= budget + 1e-12, "spent {recorded} of a budget of {budget}");
    assert_eq!(
        calls.iter().filter(|call| call.status == 429).count() + calls.iter().filter(|call| call.status == 200).count(),
        calls.len()
    );
}

#[tokio::test]
async fn a_budget_spent_before_a_restart_stays_spent() {
    let harness = Harness::start_with_keys().await;
    let new = NewKey { budget: Some(Budget { usd: 0.01, period: BudgetPeriod::Month }), ..named("monthly") };
    let (secret, monthly) = key(&harness, new).await;
    // An earlier run of the gateway recorded this month's spend; last
    // month's does not count.
    let now = OffsetDateTime::now_utc();
    let last_month = BudgetPeriod::Month.start_of(now) - time::Duration::days(1);
    let calls = [
        CallRecord { key: Some(monthly.key_ref()), ..stored_call(now, Money(0.00999), 200) },
        CallRecord { key: Some(monthly.key_ref()), ..stored_call(last_month, Money(5.0), 200) },
    ];
    harness.store.insert_calls(&calls).await.expect("insert");
    let mut body = chat_body("task:triage", "Capital of France?");
    body["max_tokens"] = json!(100);
    let (status, retry_after, answer) = harness.post_as(Some(&secret), "/chat/completions", &body).await;
    assert_error(status, &answer, 429, "insufficient_quota", "insufficient_quota");
    let seconds: i64 = retry_after.expect("Retry-After").parse().expect("seconds");
    let until_next_month = (BudgetPeriod::Month.end_of(now) - now).whole_seconds();
    assert!((seconds - until_next_month).abs() <= 5, "{seconds} vs {until_next_month}");

    // Operators see each key's budget in use.
    let (admin, _) = key(&harness, NewKey { admin: true, ..named("ops") }).await;
    let (status, page) = harness.get_as(Some(&admin), "/metrics").await;
    assert_eq!(status, 200);
    assert!(page.contains("understudy_key_budget_spent_usd{key=\"monthly\"} 0.00999\n"), "{page}");
    assert!(page.contains("understudy_key_budget_limit_usd{key=\"monthly\"} 0.01\n"), "{page}");
    assert!(page.contains("understudy_limited_total{key=\"monthly\",limit=\"budget\"} 1\n"), "{page}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let harness = Harness::start_with_keys().await;
    let (three_a_minute, _) = key(&harness, NewKey { rpm: Some(3), ..named("slow-lane") }).await;
    let body = chat_body("task:triage", "Capital of France?");
    for _ in 0..3 {
        let (status, _, answer) = harness.post_as(Some(&three_a_minute), "/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, retry_after, answer) = harness.post_as(Some(&three_a_minute), "/chat/completions", &body).await;
    assert_error(status, &answer, 429, "requests", "rate_limit_exceeded");
    // One request comes back every 20 s at 3 a minute.
    let seconds: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
    assert!((15..=20).contains(&seconds), "{seconds}");

    let (tokens, _) = key(&harness, NewKey { tpm: Some(150), ..named("few-tokens") }).await;
    let mut body = chat_body("task:triage", "Capital of France?");
    body["max_tokens"] = json!(1000);
    let (status, _, answer) = harness.post_as(Some(&tokens), "/chat/completions", &body).await;
    assert_error(status, &answer, 429, "tokens", "rate_limit_exceeded");
    assert!(answer["error"]["message"].as_str().unwrap().contains("lower max_tokens"), "{answer}");
    // At 100 tokens an answer, the first two fit (what a call did not use
    // comes back), the third waits.
    body["max_tokens"] = json!(100);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, retry_after, answer) = harness.post_as(Some(&tokens), "/chat/completions", &body).await;
        if status == 429 {
            assert_eq!(answer["error"]["type"], "tokens", "{answer}");
            assert!(retry_after.expect("Retry-After").parse::<u64>().expect("seconds") >= 1);
        }
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let (calls, _harness) = harness.finish().await;
    let limited: HashMap<String, usize> =
        calls.iter().filter(|call| call.status == 429).fold(HashMap::new(), |mut counts, call| {
            *counts.entry(call.key.as_ref().expect("key").name.clone()).or_default() += 1;
            counts
        });
    assert_eq!(limited, HashMap::from([("slow-lane".to_string(), 1), ("few-tokens".to_string(), 2)]));
}
