//! The autopilot's state machine against a real store (SQLite and Postgres):
//! it trains once enough calls are recorded, resumes a training cut short
//! from the store, shadows, promotes a cascade certified on shadow calls,
//! holds while a human's promotion pins the task, and answers a guardrail
//! demotion with a challenger compared, paired, against the champion.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;

use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_loop::autopilot::{current_stage, AUTOPILOT_NOTE};
use understudy_loop::{import_calls, Autopilot, Stage};
use understudy_store::testing::TestDatabase;
use understudy_store::{AutopilotEvent, PolicyChange, Store};
use understudy_types::{CallRecord, Endpoint, Money, OffsetDateTime, Routing, ServedBy, Usage, UsageSource, Uuid};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

fn config(dir: &Path, store_url: &str) -> Config {
    std::fs::write(dir.join("recorded.jsonl"), "").unwrap();
    understudy_trainer::testing::write_tiny_bert_dir(&dir.join("tiny-bert"), WORDS, 5).unwrap();
    let text = format!(
        r#"
[store]
url = "{store_url}"

[server]
auth = "none"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[models.replayed]
provider = "recorded"
input_per_million = 1000.0
output_per_million = 2000.0

[tasks.questions]
lead = "replayed"
target_agreement = 0.5
audit_rate = 0.5

[tasks.questions.autopilot]
min_calls = 90
shadow_calls = 40
recertify_calls = 10
retrain_after_calls = 100000
base = "{}"
epochs = 20
learning_rate = 0.003
"#,
        dir.join("tiny-bert").display()
    );
    Config::parse(&text, "understudy.toml", dir).expect("config")
}

fn examples(n: usize) -> Vec<(usize, ChatExample)> {
    examples_of(0..n, &[("who", "HUM"), ("where", "LOC"), ("how", "NUM")])
}

/// Calls `range` (their numbers make them distinct), the question's first
/// word and its label cycling through `starts`.
fn examples_of(range: std::ops::Range<usize>, starts: &[(&str, &str)]) -> Vec<(usize, ChatExample)> {
    range
        .map(|idx| {
            let (first, label) = starts[idx % starts.len()];
            let question = format!("{first} {} {} {idx}", WORDS[3 + idx % 7], WORDS[(idx / 3) % WORDS.len()]);
            let line = json!({
                "messages": [
                    {"role": "system", "content": "Label the question."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": label},
                ],
                "created_at": 1_700_000_000 + idx,
                "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
            });
            (idx + 1, ChatExample::parse(&line.to_string()).unwrap())
        })
        .collect()
}

/// A call served by the lead under shadow, the understudy agreeing at `confidence`.
fn shadow_call(confidence: f64, agrees: bool) -> CallRecord {
    CallRecord {
        id: CallRecord::new_id(),
        created_at: OffsetDateTime::now_utc(),
        task: Some("questions".into()),
        model: "replayed".into(),
        provider: "recorded".into(),
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        request: r#"{"messages":[{"role":"user","content":"who is"}]}"#.into(),
        response: Some(r#"{"choices":[{"message":{"role":"assistant","content":"HUM"}}]}"#.into()),
        usage: Usage { prompt_tokens: 20, completion_tokens: 2 },
        usage_source: UsageSource::Provider,
        latency_ms: 5.0,
        ttft_ms: None,
        status: 200,
        error: None,
        cost: Money(0.024),
        routing: Some(Routing {
            policy: "shadow".into(),
            served_by: ServedBy::Lead,
            understudy_confidence: Some(confidence),
            agreement: Some(agrees),
            ..Routing::default()
        }),
        key: None,
        upstream_request_id: None,
    }
}

/// A call under `policy` (a cascade): served by the understudy and audited
/// when its confidence reaches `threshold`, else a fallback.
fn cascade_call(policy: &str, threshold: f64, confidence: f64, agrees: bool) -> CallRecord {
    let served = confidence >= threshold;
    let mut call = shadow_call(confidence, agrees);
    call.routing = Some(Routing {
        policy: policy.into(),
        served_by: if served { ServedBy::Understudy } else { ServedBy::Lead },
        fallback_reason: (!served).then(|| "low_confidence".into()),
        understudy_confidence: Some(confidence),
        agreement: (!served).then_some(agrees),
        audit_answer: served.then(|| "HUM".into()),
        audit_agreement: served.then_some(agrees),
        ..Routing::default()
    });
    call
}

fn evidence(event: &AutopilotEvent) -> Value {
    serde_json::from_str(&event.evidence).unwrap()
}

async fn scenario(config: &Config) {
    let store = Store::connect(&config.store.url).await.unwrap();
    let loader = understudy_local::Loader;

    // Collecting: 60 calls are too few.
    import_calls(config, &store, "questions", None, "memory", &examples(60)).await.unwrap();
    let mut autopilot = Autopilot::new(config, &store, &loader);
    assert_eq!(autopilot.tasks(), vec!["questions".to_string()]);
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && waiting.contains("60 of the 90"), "{waiting}");

    // A process that died in training: it had entered training on the 60
    // calls' dataset (the transition names it). A new process, with 30 more
    // calls recorded since, trains on those very rows.
    let options = understudy_loop::DatasetOptions::default();
    let entered = understudy_loop::build_dataset(config, &store, "questions", &options).await.unwrap();
    let died = AutopilotEvent {
        id: Uuid::now_v7().to_string(),
        task: "questions".into(),
        created_at: OffsetDateTime::now_utc(),
        stage_from: "collecting".into(),
        stage_to: "training".into(),
        reason: "60 successful calls".into(),
        evidence: json!({"dataset": entered.record.id}).to_string(),
    };
    store.insert_autopilot_event(&died).await.unwrap();
    import_calls(config, &store, "questions", None, "memory", &examples(90)[60..]).await.unwrap();
    let (events, _) = autopilot.tick("questions").await.unwrap();
    let stages: Vec<(&str, &str)> = events.iter().map(|e| (e.stage_from.as_str(), e.stage_to.as_str())).collect();
    assert_eq!(stages, vec![("training", "shadow")], "{events:?}");
    let trained = evidence(&events[0]);
    assert_eq!(trained["dataset"], json!(entered.record.id), "trained on the rows named on entering training");
    let version = trained["model_version"].as_str().unwrap().to_string();
    let policy = store.policy_history("questions").await.unwrap().remove(0);
    assert_eq!((policy.policy.as_str(), policy.understudy.as_deref()), ("shadow", Some(version.as_str())));
    assert!(policy.note.unwrap().starts_with(AUTOPILOT_NOTE));

    // Restarted: the stage comes back from the store.
    drop(autopilot);
    let mut autopilot = Autopilot::new(config, &store, &loader);
    assert_eq!(current_stage(&store, "questions").await.unwrap().0, Stage::Shadow);
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && waiting.contains("0 of 40 shadow calls"), "{waiting}");

    // Shadow calls that agree at high confidence certify a cascade.
    let calls: Vec<CallRecord> = (0..50).map(|idx| shadow_call(0.95, idx % 25 != 0)).collect();
    store.insert_calls(&calls).await.unwrap();
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert_eq!(events.len(), 1, "{waiting}");
    assert_eq!((events[0].stage_from.as_str(), events[0].stage_to.as_str()), ("shadow", "cascade"));
    assert!(events[0].reason.contains("certified on 50 shadow calls"), "{}", events[0].reason);
    let cascade = store.policy_history("questions").await.unwrap().remove(0);
    assert!(cascade.policy.starts_with("cascade:"), "{}", cascade.policy);
    assert_eq!(cascade.understudy.as_deref(), Some(version.as_str()));

    // Its live calls (audits, and fallbacks sampled at the audit rate)
    // certify a lower threshold: it serves more. (Few of them, so that the
    // calls since training stay below `min_calls` for what follows.)
    let serving: f64 = cascade.policy.trim_start_matches("cascade:").parse().unwrap();
    assert!(serving > 0.6, "{serving}");
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && waiting.contains("0 of the 10 sampled live calls"), "{waiting}");
    let live: Vec<CallRecord> = (0..30)
        .map(|idx| match idx % 3 {
            0 => cascade_call(&cascade.policy, serving, 0.99, true),
            _ => cascade_call(&cascade.policy, serving, 0.6, true),
        })
        .collect();
    store.insert_calls(&live).await.unwrap();
    let (events, _) = autopilot.tick("questions").await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].stage_from.as_str(), events[0].stage_to.as_str()), ("cascade", "cascade"));
    assert!(
        events[0].reason.contains("certified on") && events[0].reason.contains("sampled of 30 live calls"),
        "{}",
        events[0].reason
    );
    let recertified = store.policy_history("questions").await.unwrap().remove(0);
    assert_eq!(recertified.policy, "cascade:0.6", "{}", events[0].reason);
    assert_eq!(recertified.understudy.as_deref(), Some(version.as_str()));
    let sampled = evidence(&events[0])["live"]["n_sampled"].as_u64().unwrap();
    // 10 audits and about half of the 20 fallbacks.
    assert!((10..=30).contains(&sampled), "{sampled}");
    // The next check looks at later calls only.
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && waiting.contains("0 of the 10 sampled"), "{waiting}");

    // A human's promotion pins the task until it is released.
    let by_hand = PolicyChange {
        id: Uuid::now_v7().to_string(),
        task: "questions".into(),
        policy: "lead".into(),
        understudy: None,
        understudy_path: None,
        created_at: OffsetDateTime::now_utc(),
        note: Some("incident 42".into()),
    };
    store.insert_policy_change(&by_hand).await.unwrap();
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && waiting.contains("pinned"), "{waiting}");
    let released = autopilot.release("questions").await.unwrap();
    assert_eq!((released.stage_from.as_str(), released.stage_to.as_str()), ("cascade", "collecting"));
    let (events, waiting) = autopilot.tick("questions").await.unwrap();
    assert!(events.is_empty() && !waiting.contains("pinned"), "{waiting}");

    // Back on the cascade, a guardrail demotion makes a retrain due: a
    // challenger is trained and compared with the champion, paired.
    let cascade_again = PolicyChange {
        id: Uuid::now_v7().to_string(),
        created_at: OffsetDateTime::now_utc(),
        note: Some("incident over".into()),
        ..cascade.clone()
    };
    store.insert_policy_change(&cascade_again).await.unwrap();
    autopilot.release("questions").await.unwrap();
    assert_eq!(current_stage(&store, "questions").await.unwrap().0, Stage::Cascade);
    let demotion = PolicyChange {
        id: Uuid::now_v7().to_string(),
        policy: "shadow".into(),
        created_at: OffsetDateTime::now_utc(),
        note: Some("guardrail: audited agreement 40 of 60 is confidently below the target".into()),
        ..cascade.clone()
    };
    store.insert_policy_change(&demotion).await.unwrap();
    let (events, _) = autopilot.tick("questions").await.unwrap();
    assert!(events.len() >= 2, "{events:?}");
    assert_eq!((events[0].stage_from.as_str(), events[0].stage_to.as_str()), ("cascade", "challenger"));
    assert!(events[0].reason.contains("guardrail demoted"), "{}", events[0].reason);
    assert_eq!(evidence(&events[0])["champion"], json!(version));
    let judged = evidence(&events[1]);
    assert_eq!(judged["champion"], json!(version));
    assert!(judged["difference"]["ci95"].is_array(), "{judged}");
    assert_ne!(judged["challenger"], json!(version));
    // Promoted (cascade) or not (the champion stays, in the demotion's shadow).
    let outcome = events[1].stage_to.as_str();
    let current = store.policy_history("questions").await.unwrap().remove(0);
    match outcome {
        "cascade" => {
            assert_eq!(current.understudy.as_ref(), judged["challenger"].as_str().map(str::to_string).as_ref())
        }
        "shadow" => assert_eq!(current.id, demotion.id),
        other => panic!("challenger ended in {other}: {}", events[1].reason),
    }
    assert!(store.autopilot_history("questions").await.unwrap().len() >= 7);
    assert_eq!(judged["labels_learned"], json!([]), "the champion knew every label: {judged}");
    store.close().await;
}

/// A retrain that learns a label the champion never saw (here due on a
/// demotion, before any drift test could fire) shadows the challenger: its
/// validation split holds few of the new label's calls, so live shadow calls
/// certify its cascade.
async fn a_challenger_that_learned_a_new_label_is_shadowed(config: &Config) {
    let store = Store::connect(&config.store.url).await.unwrap();
    let loader = understudy_local::Loader;
    let known = [("who", "HUM"), ("where", "LOC")];
    import_calls(config, &store, "questions", None, "memory", &examples_of(0..90, &known)).await.unwrap();
    let mut autopilot = Autopilot::new(config, &store, &loader);
    let (events, _) = autopilot.tick("questions").await.unwrap();
    let stages: Vec<(&str, &str)> = events.iter().map(|e| (e.stage_from.as_str(), e.stage_to.as_str())).collect();
    assert_eq!(stages, vec![("collecting", "training"), ("training", "shadow")], "{events:?}");
    let champion = evidence(&events[1])["model_version"].as_str().unwrap().to_string();
    let calls: Vec<CallRecord> = (0..50).map(|idx| shadow_call(0.95, idx % 25 != 0)).collect();
    store.insert_calls(&calls).await.unwrap();
    let (events, _) = autopilot.tick("questions").await.unwrap();
    assert_eq!(events.last().map(|e| e.stage_to.as_str()), Some("cascade"), "{events:?}");

    // NUM appears; the guardrail demotes the cascade.
    let with_num = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
    import_calls(config, &store, "questions", None, "memory", &examples_of(1000..1090, &with_num)).await.unwrap();
    let cascade = store.policy_history("questions").await.unwrap().remove(0);
    let demotion = PolicyChange {
        id: Uuid::now_v7().to_string(),
        policy: "shadow".into(),
        created_at: OffsetDateTime::now_utc(),
        note: Some("guardrail: audited agreement 20 of 60 is confidently below the target".into()),
        ..cascade
    };
    store.insert_policy_change(&demotion).await.unwrap();
    let (events, _) = autopilot.tick("questions").await.unwrap();
    assert!(events.len() >= 2, "{events:?}");
    assert_eq!(evidence(&events[0])["new_labels"], json!(false), "no drift test ran: {}", events[0].evidence);
    let judged = evidence(&events[1]);
    // Labels are compared as normalized answers (lowercase).
    assert_eq!(judged["labels_learned"], json!(["num"]), "{judged}");
    assert_eq!(judged["champion"], json!(champion));
    // Not worse: the champion cannot answer NUM, the challenger learned it.
    assert_eq!(events[1].stage_to, "shadow", "{}", events[1].reason);
    assert!(events[1].reason.contains("new labels num"), "{}", events[1].reason);
    let current = store.policy_history("questions").await.unwrap().remove(0);
    assert_eq!(current.policy, "shadow");
    assert_eq!(current.understudy.as_ref(), judged["challenger"].as_str().map(str::to_string).as_ref());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autopilot_drives_a_task_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("calls.db").display());
    scenario(&config(dir.path(), &url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autopilot_drives_a_task_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    scenario(&config(dir.path(), &database.url)).await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenger_that_learned_a_new_label_is_shadowed_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("calls.db").display());
    a_challenger_that_learned_a_new_label_is_shadowed(&config(dir.path(), &url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenger_that_learned_a_new_label_is_shadowed_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    a_challenger_that_learned_a_new_label_is_shadowed(&config(dir.path(), &database.url)).await;
    database.drop_database().await.unwrap();
}
