//! The loop's steps called as a library, without the CLI, on a real SQLite
//! file and a real Postgres: calls imported, a dataset built (and rebuilt,
//! idempotently), a tiny classifier trained and registered, evaluated with
//! its threshold certified and written, promoted on that certificate, and
//! the ledger charging its training.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;

use serde_json::json;
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_loop::{
    build_dataset, evaluate, import_calls, ledger, promote, train, Calibration, DatasetOptions, EvalRequest, LoopError,
    Method, PromoteRequest, TrainRequest,
};
use understudy_store::testing::TestDatabase;
use understudy_store::{CallFilter, Store};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];
const MACHINE_PRICE: f64 = 0.5;

fn config(dir: &Path, store_url: &str) -> Config {
    std::fs::write(dir.join("recorded.jsonl"), "").unwrap();
    let text = format!(
        r#"
[store]
url = "{store_url}"

[server]
auth = "none"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[providers.local]
type = "local"
machine_price_per_hour = {MACHINE_PRICE}

[models.replayed]
provider = "recorded"
input_per_million = 1000.0
output_per_million = 2000.0

[tasks.questions]
lead = "replayed"
target_agreement = 0.5
"#
    );
    Config::parse(&text, "understudy.toml", dir).expect("config")
}

/// 90 calls whose first word decides the label.
fn examples() -> Vec<(usize, ChatExample)> {
    let starts = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
    (0..90)
        .map(|idx| {
            let (first, label) = starts[idx % 3];
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

async fn the_loop(dir: &Path, config: &Config) {
    let store = Store::connect(&config.store.url).await.expect("store");

    let imported = import_calls(config, &store, "questions", None, "memory", &examples()).await.unwrap();
    assert_eq!(imported.n_calls, 90);

    let options = DatasetOptions { near_dup_threshold: 1.0, ..DatasetOptions::default() };
    let saved = build_dataset(config, &store, "questions", &options).await.unwrap();
    assert!(saved.is_new);
    let counts = saved.manifest.counts;
    assert_eq!(counts.train + counts.validation + counts.test, 90);
    let again = build_dataset(config, &store, "questions", &options).await.unwrap();
    assert_eq!((again.record.id.as_str(), again.is_new), (saved.record.id.as_str(), false));
    let unknown = build_dataset(config, &store, "nobody", &options).await.unwrap_err();
    assert!(matches!(unknown, LoopError::NotFound(_)), "{unknown}");

    understudy_trainer::testing::write_tiny_bert_dir(&dir.join("tiny-bert"), WORDS, 5).unwrap();
    let mut request = TrainRequest::new("questions");
    request.base = Some(dir.join("tiny-bert").display().to_string());
    request.epochs = Some(20);
    request.learning_rate = Some(0.003);
    request.progress = false;
    let nowhere = TrainRequest { base: Some("nowhere".into()), ..request.clone() };
    let refused = train(config, &store, &nowhere).await.unwrap_err();
    assert!(matches!(&refused, LoopError::NotFound(m) if m.contains("no base model at nowhere")), "{refused}");
    assert_eq!(request.method, Method::Auto, "a label task gets a classifier");
    let trained = train(config, &store, &request).await.unwrap();
    let version = &trained.version;
    assert_eq!((version.method.as_str(), version.dataset_id.as_str()), ("classifier", saved.record.id.as_str()));
    assert!(version.id.starts_with("mv-") && version.id.len() == 19, "{}", version.id);
    let expected_dir = dir.join("understudies").join("questions").join(format!("{}-classifier", saved.record.id));
    assert_eq!(Path::new(&version.path), expected_dir);
    assert_eq!(store.list_model_versions("questions").await.unwrap()[0].id, version.id);

    let mut events = Vec::new();
    let evaluation =
        evaluate(config, &store, &understudy_local::Loader, &EvalRequest::new("questions"), &mut |event| {
            events.push(event)
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(evaluation.target_agreement, 0.5, "the task's target from the config");
    assert_eq!(evaluation.machine_price, MACHINE_PRICE, "the config's local provider's price");
    let result = &evaluation.results[0];
    assert_eq!((result.name.as_str(), result.n_test), (version.id.as_str(), counts.test as usize));
    assert_eq!(evaluation.answers.len() as u64, counts.test);
    let threshold = result.certification.threshold.expect("the tiny classifier certifies target 0.5");
    assert_eq!(Calibration::read(&version.path).certified_threshold(), Some(threshold));

    let request = |policy: &str, threshold: Option<f64>| PromoteRequest {
        task: "questions".into(),
        policy: policy.into(),
        model: None,
        threshold,
        note: None,
    };
    let promoted = promote(config, &store, &request("cascade", None)).await.unwrap();
    assert_eq!(promoted.change.policy, format!("cascade:{threshold}"));
    assert_eq!(promoted.change.understudy.as_deref(), Some(version.id.as_str()));
    assert!(promoted.warning.is_none());
    let chosen = promote(config, &store, &request("cascade", Some(0.1))).await.unwrap();
    assert!(chosen.warning.unwrap().contains("not certified"));
    let bad = promote(config, &store, &request("sometimes", None)).await.unwrap_err();
    assert!(matches!(bad, LoopError::Refused(_)), "{bad}");
    assert_eq!(store.policy_history("questions").await.unwrap().len(), 2);

    let filter = CallFilter { task: Some("questions".into()), ..CallFilter::default() };
    let ledger = ledger(&store, &filter, MACHINE_PRICE).await.unwrap();
    let total = &ledger.tasks[0];
    assert_eq!(total.counts.n_calls, 90);
    assert!((total.counts.cost - 90.0 * 0.024).abs() < 1e-9, "{}", total.counts.cost);
    let training = version.wall_seconds * MACHINE_PRICE / 3600.0;
    assert!((total.training_cost - training).abs() < 1e-12);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_runs_as_a_library_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("calls.db").display());
    the_loop(dir.path(), &config(dir.path(), &url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_runs_as_a_library_on_postgres() {
    let database = TestDatabase::create().await.expect("postgres must be reachable (see .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    the_loop(dir.path(), &config(dir.path(), &database.url)).await;
    database.drop_database().await.unwrap();
}
