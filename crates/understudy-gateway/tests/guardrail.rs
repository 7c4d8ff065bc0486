//! Issue 13: live audits and the guardrail, over real sockets. The lead and
//! the understudy are models of the stub upstream (the understudy answers
//! what the prompt tells it to, so the test decides when it goes wrong), the
//! store is a real SQLite file, and the demotion goes through the store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{json, Value};
use support::{stub::ANSWER, Harness};
use understudy_types::ServedBy;

const WATCHED: &str = r#"
[models.student]
provider = "cloud"
name = "student"
input_per_million = 0.01
output_per_million = 0.02

[tasks.watched]
lead = "gpt-4o-mini"
understudy = "student"
policy = "cascade:0.5"
audit_rate = 1.0
target_agreement = 0.95
guardrail_delta = 0.05

[tasks.sampled]
lead = "gpt-4o-mini"
understudy = "student"
policy = "understudy"
audit_rate = 0.2
"#;

/// A call the student answers with the lead's answer, or with a wrong one.
fn ask(task: &str, idx: usize, wrong: bool) -> Value {
    let answer = if wrong { "answer=Lyon is the capital of France." } else { "answer=" };
    let content = if wrong { format!("Question {idx}? || {answer}") } else { format!("Question {idx}?") };
    json!({"model": format!("task:{task}"), "messages": [{"role": "user", "content": content}]})
}

async fn send_all(harness: &Harness, bodies: &[Value]) -> Vec<(u16, Value)> {
    let mut answers = Vec::new();
    for wave in bodies.chunks(8) {
        answers.extend(
            futures::future::join_all(wave.iter().map(|body| harness.post_json("/chat/completions", body))).await,
        );
    }
    answers
}

async fn health(harness: &Harness) -> Value {
    let url = format!("{}/healthz", harness.base_url.trim_end_matches("/v1"));
    harness.client.get(url).send().await.expect("healthz").json().await.expect("json")
}

/// Waits until every queued record is written (audits finish off the
/// response path).
async fn settle(harness: &Harness) {
    for _ in 0..3000 {
        if health(harness).await["records_pending"] == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("records never settled");
}

#[tokio::test]
async fn issue_13_an_understudy_that_goes_wrong_is_demoted_by_the_guardrail() {
    let harness = Harness::start_routed(WATCHED).await;
    // A healthy stretch: every served answer agrees with the lead.
    let healthy: Vec<Value> = (0..200).map(|idx| ask("watched", idx, false)).collect();
    for (status, completion) in send_all(&harness, &healthy).await {
        assert_eq!(status, 200);
        assert_eq!(completion.pointer("/choices/0/message/content").and_then(Value::as_str), Some(ANSWER));
    }
    settle(&harness).await;
    let before = health(&harness).await;
    assert_eq!(before["tasks"]["watched"]["policy"], "cascade:0.5", "{before}");
    assert_eq!(before["tasks"]["watched"]["audits"]["n_audited"], 200, "{before}");

    // Then the understudy starts answering wrong, one call at a time so that
    // the number of calls it takes is exact.
    let mut n_wrong_served = 0;
    for idx in 0..400 {
        let (status, completion) = harness.post_json("/chat/completions", &ask("watched", idx, true)).await;
        assert_eq!(status, 200);
        let served_wrong = completion.pointer("/choices/0/message/content").and_then(Value::as_str) != Some(ANSWER);
        if !served_wrong {
            break;
        }
        n_wrong_served += 1;
        settle(&harness).await;
    }
    assert!(n_wrong_served > 0, "the understudy served wrong answers at first");
    eprintln!("demoted after {n_wrong_served} wrong served calls (200 good ones before)");
    assert!(n_wrong_served <= 60, "demoted within a bounded number of audited calls: took {n_wrong_served}");
    let after = health(&harness).await;
    assert_eq!(after["tasks"]["watched"]["policy"], "shadow", "{after}");
    let reason = after["tasks"]["watched"]["demoted"].as_str().expect("the demotion says why");
    assert!(reason.contains("guardrail") && reason.contains("below the target"), "{reason}");

    // The record shows why: a policy change with its evidence.
    let changes = harness.store.policy_history("watched").await.expect("history");
    let newest = changes.first().expect("a policy change");
    assert_eq!(newest.policy, "shadow");
    assert!(newest.note.as_deref().is_some_and(|note| note.contains("guardrail")), "{newest:?}");

    let (calls, _harness) = harness.finish().await;
    let watched: Vec<_> = calls.iter().filter(|call| call.task.as_deref() == Some("watched")).collect();
    let audited: Vec<_> = watched
        .iter()
        .filter(|call| call.routing.as_ref().is_some_and(|routing| routing.audit_agreement.is_some()))
        .collect();
    assert_eq!(audited.len(), 200 + n_wrong_served, "every served call was audited");
    for call in &audited {
        let routing = call.routing.as_ref().unwrap();
        assert_eq!(routing.served_by, ServedBy::Understudy);
        assert_eq!(routing.audit_answer.as_deref(), Some(ANSWER), "the lead's answer is kept beside the served one");
        assert!(routing.audit_cost.dollars() > 0.0);
        assert!(call.cost.dollars() >= routing.audit_cost.dollars(), "the audit's cost is the call's cost");
    }
    assert_eq!(
        audited.iter().filter(|call| call.routing.as_ref().unwrap().audit_agreement == Some(false)).count(),
        n_wrong_served
    );
    // After the demotion the lead serves, and the understudy is shadowed.
    let last = watched.last().unwrap().routing.as_ref().unwrap();
    assert_eq!((last.policy.as_str(), last.served_by), ("shadow", ServedBy::Lead));
}

#[tokio::test]
async fn issue_13_a_healthy_understudy_is_not_demoted_in_a_long_run() {
    let harness = Harness::start_routed(WATCHED).await;
    // 98 % agreement against a 95 % target, over 1,000 audited calls.
    let bodies: Vec<Value> = (0..1000).map(|idx| ask("watched", idx, idx % 50 == 7)).collect();
    for (status, _) in send_all(&harness, &bodies).await {
        assert_eq!(status, 200);
    }
    settle(&harness).await;
    let after = health(&harness).await;
    assert_eq!(after["tasks"]["watched"]["policy"], "cascade:0.5", "{after}");
    assert_eq!(after["tasks"]["watched"]["audits"]["n_audited"], 1000);
    assert_eq!(after["tasks"]["watched"]["audits"]["n_agreed"], 980);
    assert!(after["tasks"]["watched"]["demoted"].is_null());
    harness.finish().await;
}

/// Audits are a sample: about `audit_rate` of the served calls.
#[tokio::test]
async fn issue_13_audits_sample_the_served_calls_at_the_configured_rate() {
    let harness = Harness::start_routed(WATCHED).await;
    let bodies: Vec<Value> = (0..500).map(|idx| ask("sampled", idx, false)).collect();
    send_all(&harness, &bodies).await;
    let (calls, _harness) = harness.finish().await;
    let n_audited =
        calls.iter().filter(|call| call.routing.as_ref().is_some_and(|routing| routing.audit_answer.is_some())).count();
    // Binomial(500, 0.2): mean 100, sd 8.9; the bounds are 5.6 sd away.
    assert!((50..=150).contains(&n_audited), "{n_audited} of 500 audited at a rate of 0.2");
}

/// A local understudy that knows two labels and answers every question with
/// the first, sure of it: it cannot learn a label the lead starts giving.
#[derive(Debug)]
struct TwoLabels;

impl understudy_providers::LocalModel for TwoLabels {
    fn chat(
        &self,
        _request: understudy_providers::ChatRequest,
    ) -> futures::future::BoxFuture<
        '_,
        Result<understudy_providers::ProviderResponse, understudy_providers::ProviderError>,
    > {
        let body = json!({"object": "chat.completion", "model": "labeller",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "HUM"}, "finish_reason": "stop",
                "logprobs": {"content": [{"token": "HUM", "logprob": 0.99f64.ln(), "bytes": [72, 85, 77], "top_logprobs": []}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}});
        Box::pin(async move {
            Ok(understudy_providers::ProviderResponse {
                body: body.to_string().into(),
                usage: None,
                headers: Default::default(),
                compute: Some(std::time::Duration::from_millis(1)),
            })
        })
    }

    fn kind(&self) -> &'static str {
        "classifier"
    }

    fn labels(&self) -> Option<Vec<String>> {
        Some(vec!["HUM".into(), "LOC".into()])
    }
}

#[derive(Debug)]
struct TwoLabelsLoader;

impl understudy_providers::LocalLoader for TwoLabelsLoader {
    fn load(
        &self,
        _spec: &understudy_providers::LocalModelSpec,
    ) -> Result<std::sync::Arc<dyn understudy_providers::LocalModel>, understudy_providers::ProviderError> {
        Ok(std::sync::Arc::new(TwoLabels))
    }
}

const LABELLED: &str = r#"
[providers.local]
type = "local"

[models.labeller]
provider = "local"
path = "two-labels"

[tasks.labelled]
lead = "replayed"
understudy = "labeller"
policy = "cascade:0.5"
audit_rate = 1.0
target_agreement = 0.9
"#;

/// A question the replayed lead answers (`support::REPLAY_LINES`): HUM, or NUM.
fn labelled(question: &str) -> Value {
    json!({"model": "task:labelled", "messages": [
        {"role": "system", "content": "Label the question."}, {"role": "user", "content": question}]})
}

#[tokio::test]
async fn issue_14_lead_answers_the_understudy_cannot_give_demote_its_cascade() {
    let harness = Harness::start_with_local_models(LABELLED, std::sync::Arc::new(TwoLabelsLoader)).await;
    let served = |completion: &Value| {
        completion.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string)
    };
    // Questions whose answer the understudy knows: served and audited, agreeing.
    for _ in 0..5 {
        let (status, completion) = harness.post_json("/chat/completions", &labelled("Who wrote   Hamlet?")).await;
        assert_eq!((status, served(&completion).as_deref()), (200, Some("HUM")), "{completion}");
        settle(&harness).await;
    }
    // The lead answers NUM, a label the understudy cannot give: one such
    // answer is not enough to demote (a stray answer of the lead's)...
    let (status, _) = harness.post_json("/chat/completions", &labelled("How far is the Moon?")).await;
    assert_eq!(status, 200);
    settle(&harness).await;
    let health_now = health(&harness).await;
    assert_eq!(health_now["tasks"]["labelled"]["policy"], "cascade:0.5", "{health_now}");
    // ...two are: the certificate never covered NUM questions.
    let (status, _) = harness.post_json("/chat/completions", &labelled("How far is the Moon?")).await;
    assert_eq!(status, 200);
    settle(&harness).await;
    let after = health(&harness).await;
    assert_eq!(after["tasks"]["labelled"]["policy"], "shadow", "{after}");
    let changes = harness.store.policy_history("labelled").await.expect("history");
    let newest = changes.first().expect("the demotion is recorded");
    assert_eq!(newest.policy, "shadow");
    let note = newest.note.as_deref().unwrap_or_default();
    assert!(note.starts_with("guardrail:") && note.contains("cannot give") && note.contains("num"), "{note}");

    // From now on the lead serves, and it answers NUM.
    let (status, completion) = harness.post_json("/chat/completions", &labelled("How far is the Moon?")).await;
    assert_eq!((status, served(&completion).as_deref()), (200, Some("NUM")), "{completion}");
    harness.finish().await;
}
