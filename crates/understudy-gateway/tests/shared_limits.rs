//! Two gateways over one store count a key's limits together through a
//! real Redis (`[server] limits_redis_url`; `UNDERSTUDY_TEST_REDIS_URL`,
//! default redis://127.0.0.1:6379, which scripts/ensure-redis.sh starts).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::{json, Value};
use support::{chat_body, Harness};
use understudy_gateway::auth::{create_key, NewKey};
use understudy_types::{Budget, BudgetPeriod};

fn redis_url() -> String {
    std::env::var("UNDERSTUDY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Two gateways on one SQLite store and one Redis.
async fn two_gateways() -> (Harness, Harness) {
    let first_dir = tempfile::tempdir().expect("tempdir");
    let store_url = format!("sqlite://{}", first_dir.path().join("shared.db").display());
    let first = Harness::start_with_shared_limits(first_dir, &store_url, &redis_url()).await;
    let second =
        Harness::start_with_shared_limits(tempfile::tempdir().expect("tempdir"), &store_url, &redis_url()).await;
    (first, second)
}

/// What one call to `task:triage` costs at the stub's usage.
const CALL_COST: f64 = (21.0 * 0.15 + 7.0 * 0.60) / 1e6;

#[tokio::test]
async fn two_gateways_share_a_keys_request_limit() {
    let (first, second) = two_gateways().await;
    let (secret, _) = create_key(&first.store, NewKey { name: "shared-rpm".into(), rpm: Some(4), ..NewKey::default() })
        .await
        .expect("key");
    let body = chat_body("task:triage", "Capital of France?");
    let mut statuses = Vec::new();
    for gateway in [&first, &second, &first, &second, &first, &second] {
        let (status, retry_after, answer) = gateway.post_as(Some(&secret), "/chat/completions", &body).await;
        if status == 429 {
            assert_eq!(answer["error"]["type"], "requests", "{answer}");
            let seconds: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
            assert!((1..=15).contains(&seconds), "{seconds}");
        }
        statuses.push(status);
    }
    // Alone, each gateway would have let all three of its calls through.
    assert_eq!(statuses, vec![200, 200, 200, 200, 429, 429]);
}

#[tokio::test]
async fn a_burst_on_two_gateways_spends_at_most_the_budget() {
    let (first, second) = two_gateways().await;
    let budget = 10.0 * CALL_COST;
    let new = NewKey {
        name: "shared-budget".into(),
        budget: Some(Budget { usd: budget, period: BudgetPeriod::Day }),
        ..NewKey::default()
    };
    let (secret, key) = create_key(&first.store, new).await.expect("key");
    let mut body = chat_body("task:triage", "Capital of France?");
    body["max_tokens"] = json!(16);
    let mut burst = Vec::new();
    for idx in 0..50 {
        let base_url = if idx % 2 == 0 { first.base_url.clone() } else { second.base_url.clone() };
        let (client, secret, body) = (first.client.clone(), secret.clone(), body.clone());
        burst.push(tokio::spawn(async move {
            let response =
                client.post(format!("{base_url}/chat/completions")).bearer_auth(secret).json(&body).send().await;
            let response = response.expect("answer");
            let status = response.status().as_u16();
            let has_retry_after = response.headers().contains_key("retry-after");
            (status, has_retry_after, response.json::<Value>().await.expect("json"))
        }));
    }
    let mut n_served = 0;
    for call in burst {
        let (status, has_retry_after, answer) = call.await.expect("task");
        match status {
            200 => n_served += 1,
            429 => assert!(has_retry_after && answer["error"]["code"] == "insufficient_quota", "{answer}"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!((1..=10).contains(&n_served), "{n_served} calls served");
    let (_, _first) = first.finish().await;
    // Both gateways write to the one store: once both are done, every
    // record of the key is there.
    let (calls, _second) = second.finish().await;
    let spent: f64 = calls
        .iter()
        .filter(|call| call.key.as_ref().is_some_and(|call_key| call_key.id == key.id))
        .map(|call| call.cost.dollars())
        .sum();
    assert_eq!(calls.iter().filter(|call| call.status == 200).count(), n_served);
    assert!(spent <= budget + 1e-12, "spent {spent} of a budget of {budget}");
}
