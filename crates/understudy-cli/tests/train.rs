//! `understudy train`, driven as a user would drive it: calls imported,
//! a dataset built, a classifier trained from a tiny random encoder and
//! registered as a model version.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::{Command, Output};

use serde_json::{json, Value};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .current_dir(dir)
        .env_remove("UNDERSTUDY_CONFIG")
        .args(args)
        .output()
        .expect("run understudy")
}

fn run_ok(dir: &std::path::Path, args: &[&str]) -> String {
    let output = run(dir, args);
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = r#"
[store]
url = "sqlite://calls.db"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[models.replayed]
provider = "recorded"

[tasks.questions]
lead = "replayed"

[tasks.summaries]
lead = "replayed"
kind = "generation"
"#;
    std::fs::write(dir.path().join("understudy.toml"), config).expect("config");
    std::fs::write(dir.path().join("recorded.jsonl"), "").expect("replay file");
    understudy_trainer::testing::write_tiny_bert_dir(&dir.path().join("tiny-bert"), WORDS, 5).expect("tiny bert");
    // A learnable label task: the first word decides the label.
    let mut lines = String::new();
    let starts = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
    for idx in 0..90 {
        let (first, label) = starts[idx % 3];
        let rest = WORDS[3 + idx % 7];
        let question = format!("{first} {rest} {} {idx}", WORDS[(idx / 3) % WORDS.len()]);
        let line = json!({"messages": [
            {"role": "system", "content": "Label the question."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": label},
        ], "created_at": 1_700_000_000 + idx});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.path().join("calls.jsonl"), lines).expect("calls");
    dir
}

#[test]
fn a_label_task_trains_into_a_registered_model_version() {
    let dir = setup();
    let path = dir.path();
    let missing = run(path, &["train", "--task", "questions", "--base", "tiny-bert"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no dataset yet"));
    let no_model = run(path, &["eval", "--task", "questions"]);
    assert!(!no_model.status.success());

    run_ok(path, &["import", "--task", "questions", "calls.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
    let trained = run_ok(path, &["train", "--task", "questions", "--base", "tiny-bert", "--epochs", "2", "--json"]);
    let trained: Value = serde_json::from_str(trained.trim()).expect("json");
    let version = trained["model_version"].as_str().expect("version id");
    assert!(version.starts_with("mv-"), "{trained}");
    let model_dir = std::path::PathBuf::from(trained["path"].as_str().expect("path"));
    assert!(model_dir.join("labels.json").exists() && model_dir.join("manifest.json").exists());
    assert_eq!(trained["metrics"]["labels"], json!(["HUM", "LOC", "NUM"]));
    assert!(trained["metrics"]["best_validation_accuracy"].as_f64().is_some());

    // Eval scores it against the lead on the test split and calibrates a cascade.
    let evaluated = run_ok(path, &["eval", "--task", "questions", "--json", "--target-agreement", "0.5"]);
    let evaluated: Value = serde_json::from_str(&evaluated).expect("json");
    let scored = &evaluated["models"][0];
    assert_eq!(scored["model_version"], version);
    let accuracy = scored["accuracy"]["value"].as_f64().expect("accuracy");
    let ci = scored["accuracy"]["ci95"].as_array().expect("ci");
    assert!(ci[0].as_f64().unwrap() <= accuracy && accuracy <= ci[1].as_f64().unwrap(), "{scored}");
    assert!(evaluated["n_test"].as_u64().unwrap() > 0);
    let n_test: u64 = scored["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(n_test, evaluated["n_test"].as_u64().unwrap(), "the confusion matrix covers every test call");
    assert!(model_dir.join("calibration.json").exists());
    let table = run_ok(path, &["eval", "--task", "questions"]);
    assert!(table.contains("accuracy [95% CI]") && table.contains("confusion"), "{table}");

    // The trained folder loads and predicts one of the task's labels.
    let model = understudy_trainer::ClassifierModel::load(&model_dir).expect("load");
    let predictions = model.predict(&["who wrote book".to_string()]).expect("predict");
    assert!(["HUM", "LOC", "NUM"].contains(&predictions[0].label.as_str()));
}

#[test]
fn unsupported_requests_say_what_is_missing() {
    let dir = setup();
    let path = dir.path();
    run_ok(path, &["import", "--task", "summaries", "calls.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "summaries", "--near-dup-threshold", "1.0"]);
    let lora = run(path, &["train", "--task", "summaries", "--base", "tiny-bert"]);
    assert!(!lora.status.success());
    let stderr = String::from_utf8_lossy(&lora.stderr);
    assert!(stderr.contains("\"BertModel\"") && stderr.contains("not supported"), "{stderr}");
    let classifier = run(path, &["train", "--task", "summaries", "--base", "tiny-bert", "--method", "classifier"]);
    assert!(String::from_utf8_lossy(&classifier.stderr).contains("a classifier needs a label task"));

    run_ok(path, &["import", "--task", "questions", "calls.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
    let no_base = run(path, &["train", "--task", "questions", "--base", "nowhere"]);
    assert!(String::from_utf8_lossy(&no_base.stderr).contains("no base model at nowhere"));
}
