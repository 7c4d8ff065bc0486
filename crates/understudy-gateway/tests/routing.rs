//! Routing between a task's lead and its understudy, over real sockets: the
//! lead and the understudy are models of the stub upstream, the store is a
//! real SQLite file, and promotions go through the store to the running
//! gateway's policy watcher.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{stub::ANSWER, Harness};
use understudy_store::{CallFilter, PolicyChange};
use understudy_types::{CallRecord, ServedBy};

const ROUTED: &str = r#"
[models.student]
provider = "cloud"
name = "student"
input_per_million = 0.01
output_per_million = 0.02

[models.student-down]
provider = "cloud"
name = "down"

[models.student-slow]
provider = "cloud"
name = "slow"

[tasks.shadowed]
lead = "gpt-4o-mini"
understudy = "student"
policy = "shadow"

[tasks.canaried]
lead = "gpt-4o-mini"
understudy = "student"
policy = "canary:30"
audit_rate = 0.0

[tasks.cascaded]
lead = "gpt-4o-mini"
understudy = "student"
policy = "cascade:0.8"
audit_rate = 0.0

[tasks.audited]
lead = "gpt-4o-mini"
understudy = "student"
policy = "cascade:0.8"
audit_rate = 1.0

[tasks.cascade-down]
lead = "gpt-4o-mini"
understudy = "student-down"
policy = "cascade:0.5"

[tasks.cascade-slow]
lead = "gpt-4o-mini"
understudy = "student-slow"
policy = "understudy"
understudy_timeout_ms = 300

[tasks.labelled]
lead = "gpt-4o-mini"
understudy = "student"
policy = "understudy"
labels = ["HUM", "NUM"]
audit_rate = 0.0

[tasks.promotable]
lead = "gpt-4o-mini"
understudy = "student"
audit_rate = 0.0
"#;

fn ask(task: &str, question: &str) -> Value {
    json!({"model": format!("task:{task}"), "messages": [{"role": "user", "content": question}]})
}

fn content(completion: &Value) -> &str {
    completion.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or_default()
}

fn routing(call: &CallRecord) -> &understudy_types::Routing {
    call.routing.as_ref().unwrap_or_else(|| panic!("call {} has no routing", call.id))
}

#[tokio::test]
async fn shadow_serves_the_lead_and_records_both_answers() {
    let harness = Harness::start_routed(ROUTED).await;
    for question in ["q1 || answer=DESC", "q2 || answer=HUM", "q3", "q4"] {
        let (status, body) = harness.post_json("/chat/completions", &ask("shadowed", question)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(content(&body), ANSWER, "the lead serves in shadow mode");
    }
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 4);
    let mut agreements = Vec::new();
    for call in &calls {
        let routing = routing(call);
        assert_eq!(routing.policy, "shadow");
        assert_eq!(routing.served_by, ServedBy::Lead);
        assert_eq!(call.model, "gpt-4o-mini");
        assert_eq!(routing.understudy_model.as_deref(), Some("student"));
        assert!(routing.understudy_answer.is_some(), "the understudy's answer is recorded");
        assert!(routing.understudy_latency_ms.is_some());
        assert!(routing.fallback_reason.is_none());
        // The lead's tokens at its price, plus the student's at its price.
        let lead_cost = 0.15 * 21.0 / 1e6 + 0.60 * 7.0 / 1e6;
        let student_cost = 0.01 * 5.0 / 1e6 + 0.02 * 2.0 / 1e6;
        assert!((routing.understudy_cost.dollars() - student_cost).abs() < 1e-15);
        assert!((call.cost.dollars() - (lead_cost + student_cost)).abs() < 1e-15, "{:?}", call.cost);
        agreements.push(routing.agreement);
    }
    agreements.sort();
    assert_eq!(agreements, vec![Some(false), Some(false), Some(true), Some(true)]);
}

#[tokio::test]
async fn canary_sends_its_share_within_binomial_bounds() {
    let harness = Harness::start_routed(ROUTED).await;
    let n = 400;
    for idx in 0..n {
        let (status, _) = harness.post_json("/chat/completions", &ask("canaried", &format!("q{idx}"))).await;
        assert_eq!(status, 200);
    }
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), n);
    let served = calls.iter().filter(|call| routing(call).served_by == ServedBy::Understudy).count();
    // 30 % of 400 is 120, with a standard deviation of 9.2; five of them either side.
    assert!((74..=166).contains(&served), "{served} of {n} served by the understudy");
    for call in &calls {
        let routing = routing(call);
        assert_eq!(routing.policy, "canary:30");
        if routing.served_by == ServedBy::Understudy {
            assert_eq!(call.model, "student");
            assert!(routing.lead_cost_avoided.dollars() > 0.0);
        } else {
            assert_eq!(call.model, "gpt-4o-mini");
            assert_eq!(routing.lead_cost_avoided.dollars(), 0.0);
        }
    }
}

#[tokio::test]
async fn cascade_serves_confident_answers_and_falls_back_below_the_threshold() {
    let harness = Harness::start_routed(ROUTED).await;
    let (status, body) =
        harness.post_json("/chat/completions", &ask("cascaded", "sure || answer=LOC || confidence=0.9")).await;
    assert_eq!(status, 200);
    assert_eq!(content(&body), "LOC", "a confident understudy serves");
    let (status, body) =
        harness.post_json("/chat/completions", &ask("cascaded", "unsure || answer=LOC || confidence=0.5")).await;
    assert_eq!(status, 200);
    assert_eq!(content(&body), ANSWER, "below the threshold the lead serves");
    let lead_requests = harness.stub.requests().iter().filter(|request| request["model"] == "ok").count();
    assert_eq!(lead_requests, 1, "the lead was asked only for the unsure call");

    let (calls, _harness) = harness.finish().await;
    let sure = calls.iter().find(|call| call.request.contains("sure ||") && !call.request.contains("unsure")).unwrap();
    let unsure = calls.iter().find(|call| call.request.contains("unsure")).unwrap();
    assert_eq!(routing(sure).served_by, ServedBy::Understudy);
    assert_eq!(sure.model, "student");
    assert!((routing(sure).understudy_confidence.unwrap() - 0.9).abs() < 1e-9);
    assert!(routing(sure).lead_cost_avoided.dollars() > 0.0);
    assert_eq!(routing(sure).agreement, None, "nothing to compare when the lead was not asked");
    assert_eq!(routing(unsure).served_by, ServedBy::Lead);
    assert_eq!(routing(unsure).fallback_reason.as_deref(), Some("low_confidence"));
    assert_eq!(routing(unsure).understudy_answer.as_deref(), Some("LOC"));
    assert_eq!(routing(unsure).agreement, Some(false));
}

#[tokio::test]
async fn an_understudy_that_errs_times_out_or_answers_off_label_falls_back() {
    let harness = Harness::start_routed(ROUTED).await;
    for (task, question) in [
        ("cascade-down", "a"),
        ("cascade-slow", "b"),
        ("labelled", "c || answer=FOOD"),
        ("labelled", "d || answer=hum"),
    ] {
        let (status, body) = harness.post_json("/chat/completions", &ask(task, question)).await;
        assert_eq!(status, 200, "{task}: {body}");
    }
    let (calls, _harness) = harness.finish().await;
    let find = |task: &str, marker: &str| {
        calls.iter().find(|call| call.task.as_deref() == Some(task) && call.request.contains(marker)).unwrap()
    };
    let reason = |call: &CallRecord| routing(call).fallback_reason.clone();
    assert_eq!(reason(find("cascade-down", "\"a\"")).as_deref(), Some("understudy_error"));
    assert_eq!(reason(find("cascade-slow", "\"b\"")).as_deref(), Some("understudy_timeout"));
    assert_eq!(reason(find("labelled", "answer=FOOD")).as_deref(), Some("invalid_answer"));
    let on_label = find("labelled", "answer=hum");
    assert_eq!(routing(on_label).served_by, ServedBy::Understudy, "labels compare without case");
    for call in &calls {
        if routing(call).served_by == ServedBy::Lead {
            assert_eq!(call.model, "gpt-4o-mini");
            assert!(call.response.as_deref().unwrap_or_default().contains(ANSWER));
        }
    }
}

#[tokio::test]
async fn a_streamed_call_the_understudy_serves_is_streamed() {
    let harness = Harness::start_routed(ROUTED).await;
    let mut body = ask("cascaded", "s || answer=ENTY || confidence=0.95");
    body["stream"] = json!(true);
    let (status, text) = harness.post_stream(&body).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"ENTY\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"usage\""), "usage (even `null`) only when asked for: {text}");
    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), 1);
    assert!(calls[0].stream);
    assert_eq!(routing(&calls[0]).served_by, ServedBy::Understudy);
}

async fn promote(harness: &Harness, task: &str, policy: &str) {
    let change = PolicyChange {
        id: understudy_types::Uuid::now_v7().to_string(),
        task: task.to_string(),
        policy: policy.to_string(),
        understudy: None,
        understudy_path: None,
        created_at: understudy_types::OffsetDateTime::now_utc(),
        note: None,
    };
    harness.store.insert_policy_change(&change).await.unwrap();
}

/// Asks until the answer is `expected` (the watcher polls every 50 ms).
async fn ask_until(harness: &Harness, task: &str, expected: &str) -> usize {
    for attempt in 1..=100 {
        let (status, body) = harness.post_json("/chat/completions", &ask(task, "p || answer=NUM")).await;
        assert_eq!(status, 200);
        if content(&body) == expected {
            return attempt;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway never answered {expected} for {task}");
}

#[tokio::test]
async fn promote_takes_effect_without_a_restart_and_lead_undoes_it() {
    let harness = Harness::start_routed(ROUTED).await;
    let (_, body) = harness.post_json("/chat/completions", &ask("promotable", "p || answer=NUM")).await;
    assert_eq!(content(&body), ANSWER, "policy lead from the config");
    promote(&harness, "promotable", "understudy").await;
    ask_until(&harness, "promotable", "NUM").await;
    let health: Value =
        harness.client.get(harness.base_url.replace("/v1", "/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["tasks"]["promotable"]["policy"], "understudy", "{health}");
    assert_eq!(health["tasks"]["promotable"]["understudy"], "student", "{health}");
    assert_eq!(health["tasks"]["shadowed"]["policy"], "shadow");
    promote(&harness, "promotable", "lead").await;
    ask_until(&harness, "promotable", ANSWER).await;
    let (calls, _harness) = harness.finish().await;
    let policies: Vec<&str> = calls.iter().map(|call| routing(call).policy.as_str()).collect();
    assert_eq!(policies.first(), Some(&"lead"));
    assert!(policies.contains(&"understudy"));
    assert_eq!(policies.last(), Some(&"lead"));
}

#[tokio::test]
async fn savings_add_up_to_the_recorded_costs() {
    let harness = Harness::start_routed(ROUTED).await;
    for idx in 0..40 {
        let question = format!("q{idx} || answer=NUM || confidence={}", if idx % 4 == 0 { "0.5" } else { "0.95" });
        harness.post_json("/chat/completions", &ask("cascaded", &question)).await;
        harness.post_json("/chat/completions", &ask("shadowed", &format!("s{idx}"))).await;
        harness.post_json("/chat/completions", &ask("audited", &format!("a{idx}"))).await;
    }
    let store = harness.store.clone();
    let (calls, _harness) = harness.finish().await;
    let rows = store.savings_report(&CallFilter::default()).await.unwrap();
    for task in ["cascaded", "shadowed", "audited"] {
        let task_calls: Vec<&CallRecord> = calls.iter().filter(|call| call.task.as_deref() == Some(task)).collect();
        let task_rows: Vec<_> = rows.iter().filter(|row| row.task == task).collect();
        let sum = |f: &dyn Fn(&understudy_store::SavingsRow) -> f64| task_rows.iter().map(|row| f(row)).sum::<f64>();
        let n_calls: u64 = task_rows.iter().map(|row| row.n_calls).sum();
        assert_eq!(n_calls as usize, task_calls.len());
        let served: u64 = task_rows.iter().map(|row| row.n_served_by_understudy).sum();
        let expected_served = task_calls.iter().filter(|call| routing(call).served_by == ServedBy::Understudy).count();
        assert_eq!(served as usize, expected_served);
        let cost: f64 = task_calls.iter().map(|call| call.cost.dollars()).sum();
        assert!((sum(&|row| row.cost.dollars()) - cost).abs() < 1e-12);
        let avoided: f64 = task_calls.iter().map(|call| routing(call).lead_cost_avoided.dollars()).sum();
        assert!((sum(&|row| row.lead_cost_avoided.dollars()) - avoided).abs() < 1e-12);
        let compute: f64 = task_calls.iter().map(|call| routing(call).understudy_cost.dollars()).sum();
        assert!((sum(&|row| row.understudy_cost.dollars()) - compute).abs() < 1e-12);
        let audit_cost: f64 = task_calls.iter().map(|call| routing(call).audit_cost.dollars()).sum();
        assert!((sum(&|row| row.audit_cost.dollars()) - audit_cost).abs() < 1e-12);
    }
    let audited: Vec<_> = rows.iter().filter(|row| row.task == "audited").collect();
    assert_eq!(audited.iter().map(|row| row.n_audited).sum::<u64>(), 40, "every served call is audited");
    assert_eq!(audited.iter().map(|row| row.n_audit_agreed).sum::<u64>(), 40, "the student repeats the lead");
    assert_eq!(audited.iter().map(|row| row.n_compared).sum::<u64>(), 0, "audits are not fallbacks");
    assert!(audited.iter().map(|row| row.audit_cost.dollars()).sum::<f64>() > 0.0, "audits cost the lead's price");
    let cascaded: Vec<_> = rows.iter().filter(|row| row.task == "cascaded").collect();
    assert_eq!(cascaded.iter().map(|row| row.n_served_by_understudy).sum::<u64>(), 30);
    let shadowed: Vec<_> = rows.iter().filter(|row| row.task == "shadowed").collect();
    assert_eq!(shadowed.iter().map(|row| row.n_compared).sum::<u64>(), 40);
    assert_eq!(shadowed.iter().map(|row| row.n_agreed).sum::<u64>(), 40, "the student repeats the lead by default");
}
