//! The drift watch on a real store (SQLite and Postgres), with a real (tiny)
//! encoder: traffic like the training data fires nothing; traffic with a
//! label the understudy never saw, lower confidence and other prompts fires
//! the answer, confidence and input signals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde_json::json;
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_loop::{build_dataset, import_calls, task_drift, DatasetOptions, Encoder};
use understudy_providers::{LocalLoader, LocalModelSpec};
use understudy_store::testing::TestDatabase;
use understudy_store::{ModelVersionRecord, PolicyChange, Store};
use understudy_types::{CallRecord, Endpoint, Money, OffsetDateTime, Routing, ServedBy, Usage, UsageSource, Uuid};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

fn config(dir: &Path, store_url: &str) -> Config {
    std::fs::write(dir.join("recorded.jsonl"), "").unwrap();
    let text = format!(
        "[store]\nurl = \"{store_url}\"\n[server]\nauth = \"none\"\n[providers.recorded]\ntype = \"replay\"\n\
         file = \"recorded.jsonl\"\n[models.replayed]\nprovider = \"recorded\"\n\
         [tasks.steady]\nlead = \"replayed\"\n[tasks.moved]\nlead = \"replayed\"\n"
    );
    Config::parse(&text, "understudy.toml", dir).unwrap()
}

/// A question of the training distribution: "who"/"where" questions.
fn old_question(idx: usize) -> (String, &'static str) {
    let (first, label) = [("who", "HUM"), ("where", "LOC")][idx % 2];
    (format!("{first} {} {} {idx}", WORDS[3 + idx % 3], WORDS[6 + (idx / 2) % 2]), label)
}

/// A question of another kind: "how many" over other words.
fn new_question(idx: usize) -> String {
    format!("how many {} {} {idx}", WORDS[7 + idx % 3], WORDS[1 + idx % 2])
}

fn call(
    task: &str,
    at: OffsetDateTime,
    question: &str,
    confidence: f64,
    threshold: f64,
    lead_answer: &str,
) -> CallRecord {
    let served = confidence >= threshold;
    CallRecord {
        id: CallRecord::new_id(),
        created_at: at,
        task: Some(task.into()),
        model: "replayed".into(),
        provider: "recorded".into(),
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        request: json!({"messages": [{"role": "user", "content": question}]}).to_string(),
        response: Some(
            json!({"choices": [{"message": {"role": "assistant", "content": if served { "HUM" } else { lead_answer }}}]})
                .to_string(),
        ),
        usage: Usage { prompt_tokens: 10, completion_tokens: 1 },
        usage_source: UsageSource::Provider,
        latency_ms: 3.0,
        ttft_ms: None,
        status: 200,
        error: None,
        cost: Money(0.001),
        routing: Some(Routing {
            policy: format!("cascade:{threshold}"),
            served_by: if served { ServedBy::Understudy } else { ServedBy::Lead },
            fallback_reason: (!served).then(|| "low_confidence".to_string()),
            understudy_confidence: Some(confidence),
            ..Routing::default()
        }),
        key: None,
        upstream_request_id: None,
    }
}

/// A task trained on old questions and promoted to a cascade at 0.8, then
/// 150 calls like the training data and 150 `recent` ones.
async fn task_with_traffic(config: &Config, store: &Store, task: &str, moved: bool) {
    let examples: Vec<(usize, ChatExample)> = (0..120)
        .map(|idx| {
            let (question, label) = old_question(idx);
            let line = json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": label}],
                              "created_at": 1_700_000_000 + idx});
            (idx + 1, ChatExample::parse(&line.to_string()).unwrap())
        })
        .collect();
    import_calls(config, store, task, None, "memory", &examples).await.unwrap();
    let dataset = build_dataset(config, store, task, &DatasetOptions::default()).await.unwrap();
    let version = format!("mv-{task}");
    store
        .register_model_version(&ModelVersionRecord {
            id: version.clone(),
            task: task.into(),
            dataset_id: dataset.record.id.clone(),
            method: "classifier".into(),
            base_model: "tiny".into(),
            path: "/nowhere".into(),
            created_at: OffsetDateTime::now_utc(),
            wall_seconds: 1.0,
            metrics: "{}".into(),
        })
        .await
        .unwrap();
    let promoted_at = OffsetDateTime::now_utc() - time::Duration::hours(1);
    store
        .insert_policy_change(&PolicyChange {
            id: Uuid::now_v7().to_string(),
            task: task.into(),
            policy: "cascade:0.8".into(),
            understudy: Some(version),
            understudy_path: None,
            created_at: promoted_at,
            note: None,
        })
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut calls = Vec::new();
    for idx in 0..300 {
        let at = promoted_at + time::Duration::seconds(idx as i64 + 1);
        let recent = idx >= 150;
        let (question, label) = old_question(1000 + idx);
        if moved && recent && idx % 3 == 0 {
            // A new kind of question: the lead says NUM, the understudy is unsure.
            calls.push(call(task, at, &new_question(idx), rng.gen_range(0.2..0.85), 0.8, "NUM"));
        } else {
            calls.push(call(task, at, &question, rng.gen_range(0.6..1.0), 0.8, label));
        }
    }
    store.insert_calls(&calls).await.unwrap();
}

async fn scenario(dir: &Path, config: &Config) {
    let store = Store::connect(&config.store.url).await.unwrap();
    understudy_trainer::testing::write_tiny_bert_dir(&dir.join("tiny-bert"), WORDS, 3).unwrap();
    let spec = LocalModelSpec {
        name: "encoder".into(),
        path: dir.join("tiny-bert").display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    let model = understudy_local::Loader.load(&spec).unwrap();
    let encoder = Some(Encoder { model: model.as_ref(), name: "encoder" });

    task_with_traffic(config, &store, "steady", false).await;
    let steady = task_drift(&store, "steady", 150, 0.01, encoder).await.unwrap();
    assert!(steady.report.confidence.is_some() && steady.report.input.is_some(), "{:?}", steady.skipped);
    assert!(!steady.report.drifted(), "no drift planted, yet: {:?}", steady.report.reasons());

    task_with_traffic(config, &store, "moved", true).await;
    let moved = task_drift(&store, "moved", 150, 0.01, encoder).await.unwrap();
    let answers = moved.report.answers.as_ref().expect("the fallbacks' lead answers are compared");
    assert!(answers.new_label_fired && answers.new_labels[0].label == "num", "{answers:?}");
    assert!(moved.report.confidence.as_ref().unwrap().drifted, "{:?}", moved.report.confidence);
    assert!(moved.report.input.as_ref().unwrap().drifted, "{:?}", moved.report.input);
    assert_eq!(moved.report.fired().len(), 3, "{:?}", moved.report.reasons());

    // Without an encoder the input signal is skipped, and says so.
    let without = task_drift(&store, "moved", 150, 0.01, None).await.unwrap();
    assert!(without.report.input.is_none());
    assert!(without.skipped.iter().any(|why| why.starts_with("input: no local encoder")), "{:?}", without.skipped);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("calls.db").display());
    scenario(dir.path(), &config(dir.path(), &url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    scenario(dir.path(), &config(dir.path(), &database.url)).await;
    database.drop_database().await.unwrap();
}
