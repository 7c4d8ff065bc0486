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

/// The task's model versions, read from the store the way the CLI keeps them.
fn model_versions(dir: &std::path::Path, task: &str) -> Vec<understudy_store::ModelVersionRecord> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = understudy_store::Store::connect(&format!("sqlite://{}", dir.join("calls.db").display()))
            .await
            .expect("store opens");
        let versions = store.list_model_versions(task).await.expect("list");
        store.close().await;
        versions
    })
}

/// The folder of the one run under `understudies/TASK/` that has a checkpoint.
fn checkpointed_run(dir: &std::path::Path, task: &str) -> Option<std::path::PathBuf> {
    let runs = std::fs::read_dir(dir.join("understudies").join(task)).ok()?;
    runs.filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|run| run.join("checkpoint").join("state.json").is_file())
}

#[test]
fn a_run_killed_in_its_first_epoch_resumes_from_its_checkpoint() {
    let dir = setup();
    let path = dir.path();
    run_ok(path, &["import", "--task", "questions", "calls.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
    let listed = run_ok(path, &["dataset", "list", "--json"]);
    let dataset: Value = serde_json::from_str(listed.lines().next().expect("a dataset")).expect("json");
    let dataset_id = dataset["id"].as_str().expect("id").to_string();

    // One row per step and a checkpoint every 3: dozens of steps an epoch.
    let args = [
        "train",
        "--task",
        "questions",
        "--base",
        "tiny-bert",
        "--epochs",
        "3",
        "--batch-size",
        "1",
        "--checkpoint-every",
        "3",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .current_dir(path)
        .env_remove("UNDERSTUDY_CONFIG")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start understudy train");
    let started = std::time::Instant::now();
    let run_dir = loop {
        if let Some(run_dir) = checkpointed_run(path, "questions") {
            break run_dir;
        }
        assert!(child.try_wait().expect("poll").is_none(), "training ended before its first checkpoint");
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "no checkpoint after 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(child.try_wait().expect("poll").is_none(), "training must still run when it is killed");
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(!status.success());

    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("checkpoint").join("state.json")).expect("checkpoint state"),
    )
    .expect("json");
    assert_eq!(state["epoch"], 0, "killed inside the first epoch: {state}");
    assert!(state["global_step"].as_u64().expect("step") >= 3, "{state}");
    // Nothing half-made is registered or looks finished.
    assert!(model_versions(path, "questions").is_empty());
    assert!(!run_dir.join("manifest.json").exists());

    let mut resumed_args = args.to_vec();
    resumed_args.extend(["--resume", "--json"]);
    let resumed: Value = serde_json::from_str(run_ok(path, &resumed_args).trim()).expect("json");
    let versions = model_versions(path, "questions");
    assert_eq!(versions.len(), 1, "the resumed run registers one version");
    assert_eq!(versions[0].id, resumed["model_version"].as_str().expect("id"));
    assert_eq!(versions[0].dataset_id, dataset_id);
    assert_eq!(std::fs::canonicalize(&versions[0].path).unwrap(), std::fs::canonicalize(&run_dir).unwrap());
    let steps = resumed["metrics"]["steps"].as_u64().expect("steps");
    assert!(steps > state["global_step"].as_u64().unwrap(), "{resumed}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).expect("manifest")).expect("json");
    assert_eq!(manifest["dataset_id"], json!(dataset_id), "the manifest names its dataset");
    let model = understudy_trainer::ClassifierModel::load(&run_dir).expect("the resumed model loads");
    assert_eq!(model.predict(&["where is river".to_string()]).expect("predict").len(), 1);
}

#[test]
fn base_names_a_config_model_a_built_in_or_a_path() {
    let dir = setup();
    let path = dir.path();
    let mut config = std::fs::read_to_string(path.join("understudy.toml")).expect("config");
    config.push_str(
        r#"
[providers.local]
type = "local"

[models.tiny-encoder]
provider = "local"
path = "tiny-bert"
"#,
    );
    std::fs::write(path.join("understudy.toml"), config).expect("config");
    run_ok(path, &["import", "--task", "questions", "calls.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
    let train = |base: &str, output: &str| {
        run(path, &["train", "--task", "questions", "--base", base, "--epochs", "1", "--output", output, "--json"])
    };
    let base_of = |output: &Output| -> String {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let trained: Value = serde_json::from_slice(&output.stdout).expect("json");
        let version = trained["model_version"].as_str().expect("id").to_string();
        let versions = model_versions(path, "questions");
        versions.into_iter().find(|record| record.id == version).expect("registered").base_model
    };

    // A model of the config: its path (resolved next to the config).
    let by_alias = base_of(&train("tiny-encoder", "by-alias"));
    assert_eq!(std::fs::canonicalize(by_alias).unwrap(), std::fs::canonicalize(path.join("tiny-bert")).unwrap());

    // A built-in name: under models/ next to the config.
    let missing = train("minilm", "by-built-in");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("all-MiniLM-L6-v2") && stderr.contains("fetch-models"), "{stderr}");
    understudy_trainer::testing::write_tiny_bert_dir(&path.join("models/all-MiniLM-L6-v2"), WORDS, 6).expect("bert");
    let by_built_in = base_of(&train("minilm", "by-built-in"));
    assert!(by_built_in.ends_with("models/all-MiniLM-L6-v2"), "{by_built_in}");

    // A path.
    let by_path = base_of(&train("./tiny-bert", "by-path"));
    assert!(by_path.ends_with("tiny-bert"), "{by_path}");

    // Anything else: an error listing the choices, and a non-zero exit.
    let unknown = train("gpt-5-nano", "unknown");
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("no base model at gpt-5-nano")
            && stderr.contains("(tiny-encoder)")
            && stderr.contains("minilm, smollm2"),
        "{stderr}"
    );
    let no_path = train("replayed", "no-path");
    assert!(String::from_utf8_lossy(&no_path.stderr).contains("[models.replayed] has no `path`"));
    assert_eq!(model_versions(path, "questions").len(), 3);
}

/// The words of `setup`'s calls, for a tiny Llama's tokenizer.
fn llama_words() -> Vec<&'static str> {
    let mut words = vec!["system", "user", "assistant", "Label", "the", "question", ".", "HUM", "LOC", "NUM"];
    words.extend(WORDS);
    words
}

#[test]
fn a_lora_run_names_its_dataset_in_its_manifest_and_model_version() {
    let dir = setup();
    let path = dir.path();
    understudy_trainer::testing::write_tiny_llama_dir(&path.join("tiny-llama"), &llama_words(), 7).expect("llama");
    let dataset_of = |task: &str| -> String {
        run_ok(path, &["import", "--task", task, "calls.jsonl"]);
        let built = run_ok(path, &["dataset", "build", "--task", task, "--near-dup-threshold", "1.0", "--json"]);
        let manifest: Value = serde_json::from_str(&built).expect("json");
        manifest["id"].as_str().expect("id").to_string()
    };

    // A label task: accuracy of the most likely label after every epoch.
    let dataset_id = dataset_of("questions");
    let args = ["train", "--task", "questions", "--method", "lora", "--base", "tiny-llama", "--epochs", "2"];
    let trained: Value = serde_json::from_str(run_ok(path, &[&args[..], &["--json"]].concat()).trim()).expect("json");
    let version = trained["model_version"].as_str().expect("version id");
    let run_dir = std::path::PathBuf::from(trained["path"].as_str().expect("path"));
    assert!(run_dir.join("adapter_config.json").is_file() && run_dir.join("adapter_model.safetensors").is_file());
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).expect("manifest")).expect("json");
    assert_eq!(manifest["dataset_id"], json!(dataset_id), "the manifest names its dataset");
    assert_eq!(manifest["method"], "lora");
    assert!(manifest["report"]["wall_seconds"].as_f64().is_some() && manifest["hyperparameters"]["epochs"] == 2);
    let report = &manifest["report"];
    assert_eq!(report["task_metric_name"], "label_accuracy");
    let epochs = report["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 2, "{report}");
    for epoch in epochs {
        let accuracy = epoch["task_metric"].as_f64().expect("accuracy every epoch");
        assert!((0.0..=1.0).contains(&accuracy), "{epoch}");
        assert!(epoch["validation_loss"].as_f64().is_some(), "{epoch}");
    }
    let labels = &manifest["hyperparameters"]["task_metric"]["labels"];
    assert_eq!(labels, &json!(["HUM", "LOC", "NUM"]), "the candidates are the train split's answers");

    let versions = model_versions(path, "questions");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].id, version);
    assert_eq!(versions[0].dataset_id, dataset_id, "the model version names its dataset");
    assert_eq!(versions[0].method, "lora");
    assert_eq!(std::fs::canonicalize(&versions[0].path).unwrap(), std::fs::canonicalize(&run_dir).unwrap());
    let stored: Value = serde_json::from_str(&versions[0].metrics).expect("metrics json");
    assert_eq!(stored["task_metric"], "label_accuracy");
    assert_eq!(stored["best_task_metric"], report["best_task_metric"]);
    assert_eq!(stored["best_epoch"], report["best_epoch"]);

    // The progress output names the metric too.
    let output = run(path, &[&args[..], &["--output", "again"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("epoch 1: train loss") && stderr.contains("label_accuracy"), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("label_accuracy"));

    // A generation task: token F1 of a greedy decode.
    let dataset_id = dataset_of("summaries");
    let trained = run_ok(
        path,
        &[
            "train",
            "--task",
            "summaries",
            "--base",
            "tiny-llama",
            "--epochs",
            "1",
            "--metric-rows",
            "5",
            "--metric-max-tokens",
            "3",
            "--json",
        ],
    );
    let trained: Value = serde_json::from_str(trained.trim()).expect("json");
    assert_eq!(trained["metrics"]["task_metric"], "token_f1");
    let f1 = trained["metrics"]["best_task_metric"].as_f64().expect("token F1");
    assert!((0.0..=1.0).contains(&f1), "{trained}");
    let versions = model_versions(path, "summaries");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].dataset_id, dataset_id);
}

#[test]
fn too_little_data_stops_with_a_message_that_says_why() {
    let dir = setup();
    let path = dir.path();
    understudy_trainer::testing::write_tiny_llama_dir(&path.join("tiny-llama"), &llama_words(), 7).expect("llama");
    let mut config = std::fs::read_to_string(path.join("understudy.toml")).expect("config");
    config.push_str("\n[tasks.small]\nlead = \"replayed\"\nkind = \"label\"\n");
    config.push_str("\n[tasks.lonely]\nlead = \"replayed\"\nkind = \"label\"\n");
    std::fs::write(path.join("understudy.toml"), config).expect("config");
    let calls = std::fs::read_to_string(path.join("calls.jsonl")).expect("calls");
    let lines: Vec<&str> = calls.lines().collect();
    let fails_with = |args: &[&str], expected: &str| {
        let output = run(path, args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };

    // Twelve calls: fewer than 20 training rows for either method.
    std::fs::write(path.join("small.jsonl"), lines[..12].join("\n")).expect("write");
    run_ok(path, &["import", "--task", "small", "small.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "small", "--near-dup-threshold", "1.0"]);
    fails_with(&["train", "--task", "small", "--base", "tiny-bert"], "a classifier needs at least 20");
    fails_with(
        &["train", "--task", "small", "--method", "lora", "--base", "tiny-llama"],
        "LoRA fine-tuning needs at least 20",
    );

    // A label the lead gave once (the oldest call, so a training row).
    let mut lonely: Vec<String> = lines[..60].iter().map(|line| line.to_string()).collect();
    let mut first: Value = serde_json::from_str(&lonely[0]).expect("json");
    first["messages"][2]["content"] = json!("ABBR");
    lonely[0] = first.to_string();
    std::fs::write(path.join("lonely.jsonl"), lonely.join("\n")).expect("write");
    run_ok(path, &["import", "--task", "lonely", "lonely.jsonl"]);
    run_ok(path, &["dataset", "build", "--task", "lonely", "--near-dup-threshold", "1.0"]);
    fails_with(
        &["train", "--task", "lonely", "--base", "tiny-bert"],
        "label(s) [\"ABBR\"] have a single training example",
    );
    assert!(model_versions(path, "small").is_empty() && model_versions(path, "lonely").is_empty());
}
