//! Local models: a trained classifier and an encoder loaded by path, asked
//! directly and through a gateway whose cascade routes to the classifier.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use understudy_local::Loader;
use understudy_providers::{ChatRequest, EmbeddingRequest, LocalLoader, LocalModel, LocalModelSpec};
use understudy_trainer::testing::write_tiny_bert_dir;
use understudy_trainer::{train_classifier, ClassifierTrainConfig, LabeledText};

const ANIMALS: [&str; 4] = ["cat", "dog", "horse", "cow"];
const COLOURS: [&str; 4] = ["red", "blue", "green", "pink"];
const FILLER: [&str; 4] = ["the", "a", "is", "very"];

fn vocab() -> Vec<&'static str> {
    ANIMALS.iter().chain(&COLOURS).chain(&FILLER).copied().collect()
}

fn rows(count: usize) -> Vec<LabeledText> {
    (0..count)
        .map(|i| {
            let (label, keys) = if i % 2 == 0 { ("animal", &ANIMALS) } else { ("colour", &COLOURS) };
            let text = format!("{} {} {}", FILLER[i % 4], keys[(i / 2) % 4], FILLER[(i / 3) % 4]);
            LabeledText { text, label: label.to_string() }
        })
        .collect()
}

/// Trains a tiny classifier into `dir/classifier` and returns its path.
fn tiny_classifier(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    write_tiny_bert_dir(&base, &vocab(), 3).unwrap();
    let out = dir.join("classifier");
    let mut config = ClassifierTrainConfig::new(&base, &out);
    config.epochs = 8;
    config.batch_size = 8;
    config.learning_rate = 3e-3;
    config.head_lr_multiplier = 1.0;
    config.progress = false;
    config.patience = 10;
    config.train_embeddings = true;
    train_classifier(&config, &rows(64), &rows(16)).unwrap();
    out
}

fn load(name: &str, path: &Path) -> Arc<dyn LocalModel> {
    Loader.load(&LocalModelSpec { name: name.into(), path: path.display().to_string(), adapter: None }).unwrap()
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

#[tokio::test]
async fn a_classifier_answers_with_a_label_and_its_probability() {
    let dir = tempfile::tempdir().unwrap();
    let model = load("tiny", &tiny_classifier(dir.path()));
    let request = |logprobs: bool| ChatRequest {
        body: object(json!({"model": "tiny", "logprobs": logprobs, "top_logprobs": 2, "messages": [
            {"role": "system", "content": "Label it."}, {"role": "user", "content": "the cat is"}]})),
    };
    let response = model.chat(request(true)).await.unwrap();
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body.pointer("/choices/0/message/content").unwrap(), "animal", "{body}");
    let confidence = understudy_providers::confidence_of(&body).unwrap();
    assert!(confidence > 0.5 && confidence <= 1.0, "{confidence}");
    let top = body.pointer("/choices/0/logprobs/content/0/top_logprobs").unwrap().as_array().unwrap();
    assert_eq!(top.len(), 2);
    let total: f64 = top.iter().map(|entry| entry["logprob"].as_f64().unwrap().exp()).sum();
    assert!((total - 1.0).abs() < 1e-4, "two labels' probabilities sum to one: {total}");
    assert!(response.usage.is_some());

    let plain: Value = serde_json::from_slice(&model.chat(request(false)).await.unwrap().body).unwrap();
    assert!(plain.pointer("/choices/0/logprobs").is_none(), "logprobs only when asked for");
    let colour = ChatRequest {
        body: object(json!({"model": "tiny", "messages": [{"role": "user", "content": "a blue very"}]})),
    };
    let colour: Value = serde_json::from_slice(&model.chat(colour).await.unwrap().body).unwrap();
    assert_eq!(colour.pointer("/choices/0/message/content").unwrap(), "colour");

    let empty =
        ChatRequest { body: object(json!({"model": "tiny", "messages": [{"role": "system", "content": "x"}]})) };
    let error = model.chat(empty).await.unwrap_err().to_string();
    assert!(error.contains("400"), "{error}");
}

#[tokio::test]
async fn an_encoder_embeds_normalized_and_ignores_padding() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert_dir(dir.path(), &vocab(), 5).unwrap();
    let model = load("enc", dir.path());
    let embed = |input: Value| {
        let model = model.clone();
        async move {
            let request = EmbeddingRequest { body: object(json!({"model": "enc", "input": input})) };
            let body: Value = serde_json::from_slice(&model.embed(request).await.unwrap().body).unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                .collect::<Vec<Vec<f64>>>()
        }
    };
    let alone = embed(json!("cat")).await;
    let batched = embed(json!(["cat", "the very big red dog is a cow"])).await;
    assert_eq!(batched.len(), 2);
    let norm: f64 = alone[0].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    let diff = alone[0].iter().zip(&batched[0]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-4, "padding changed the embedding by {diff}");
    let chat = ChatRequest { body: object(json!({"model": "enc", "messages": [{"role": "user", "content": "x"}]})) };
    assert!(model.chat(chat).await.unwrap_err().to_string().contains("400"));
}

#[test]
fn bad_paths_fail_at_load_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let error = |path: &str| {
        Loader.load(&LocalModelSpec { name: "m".into(), path: path.into(), adapter: None }).unwrap_err().to_string()
    };
    let missing = dir.path().join("nope");
    assert!(error(&missing.display().to_string()).contains("does not exist"));
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    assert!(error(&dir.path().join("empty").display().to_string()).contains("neither"));
    assert!(error("hf:org/name").contains("hub"));
    std::fs::write(dir.path().join("broken.gguf"), b"not a gguf, just bytes that llama.cpp must refuse").unwrap();
    let gguf = error(&dir.path().join("broken.gguf").display().to_string());
    assert!(gguf.contains("broken.gguf"), "{gguf}");
}

/// The real MiniLM: a paraphrase ranks above an unrelated sentence.
#[tokio::test]
async fn minilm_ranks_a_paraphrase_above_an_unrelated_sentence() {
    let Some(models) = std::env::var_os("UNDERSTUDY_MODELS_DIR") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_MODELS_DIR (scripts/test.sh does)");
        eprintln!("skipped: set UNDERSTUDY_MODELS_DIR to the folder scripts/fetch-models.sh fills");
        return;
    };
    let model = load("minilm", &PathBuf::from(models).join("all-MiniLM-L6-v2"));
    let request = EmbeddingRequest {
        body: object(json!({"model": "minilm", "input": [
            "How do I reset my password?",
            "I forgot my password and need to change it.",
            "The weather in Lisbon is sunny today.",
        ]})),
    };
    let body: Value = serde_json::from_slice(&model.embed(request).await.unwrap().body).unwrap();
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect();
    assert_eq!(vectors[0].len(), 384);
    let cosine = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let paraphrase = cosine(&vectors[0], &vectors[1]);
    let unrelated = cosine(&vectors[0], &vectors[2]);
    assert!(paraphrase > unrelated + 0.2, "paraphrase {paraphrase}, unrelated {unrelated}");
}

/// A gateway whose lead is a replay of recorded answers and whose cascade
/// routes to the trained classifier, first from the config, then from a
/// promotion that names the classifier's folder.
#[tokio::test]
async fn a_gateway_cascade_serves_from_a_local_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let classifier = tiny_classifier(dir.path());
    let replay: String = ["the cat is", "a blue very"]
        .iter()
        .zip(["animal", "colour"])
        .map(|(question, label)| {
            json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": label}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("lead.jsonl"), replay).unwrap();
    let config_text = format!(
        r#"
[store]
url = "sqlite://{db}"

[providers.recorded]
type = "replay"
file = "lead.jsonl"

[providers.local]
type = "local"
machine_price_per_hour = 3.6

[models.lead]
provider = "recorded"
input_per_million = 100.0
output_per_million = 100.0

[models.tiny]
provider = "local"
path = "{classifier}"

[tasks.kinds]
lead = "lead"
understudy = "tiny"
policy = "cascade:0.0"
labels = ["animal", "colour"]

[tasks.later]
lead = "lead"
"#,
        db = dir.path().join("gw.db").display(),
        classifier = classifier.display()
    );
    let config_path = dir.path().join("understudy.toml");
    std::fs::write(&config_path, config_text).unwrap();
    let config = understudy_config::Config::load(&config_path).unwrap();
    let store = understudy_store::Store::connect(&config.store.url).await.unwrap();
    let (recorder, recorder_handle) = understudy_store::Recorder::start(
        store.clone(),
        understudy_store::RecorderConfig { queue_capacity: 64, batch_size: 16 },
    );
    let state = understudy_gateway::AppState::with_local_models(config, recorder, Some(Arc::new(Loader))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watch =
        understudy_gateway::spawn_policy_watch(state.clone(), store.clone(), std::time::Duration::from_millis(50));
    let server = tokio::spawn(understudy_gateway::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let ask = |task: &'static str, question: &'static str| {
        let client = client.clone();
        async move {
            let body = json!({"model": format!("task:{task}"), "messages": [{"role": "user", "content": question}]});
            let response = client.post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let answer = ask("kinds", "the cat is").await;
    assert_eq!(answer.pointer("/choices/0/message/content").unwrap(), "animal");
    assert_eq!(answer["model"], "tiny", "the local classifier served: {answer}");

    // Promote the classifier's folder, as `understudy promote --model mv-...` does.
    let before = ask("later", "a blue very").await;
    assert_eq!(before["model"], "lead");
    store
        .insert_policy_change(&understudy_store::PolicyChange {
            id: understudy_types::Uuid::now_v7().to_string(),
            task: "later".into(),
            policy: "understudy".into(),
            understudy: Some("mv-tiny".into()),
            understudy_path: Some(classifier.display().to_string()),
            created_at: time_now(),
            note: None,
        })
        .await
        .unwrap();
    let mut served = None;
    for _ in 0..100 {
        let answer = ask("later", "a blue very").await;
        if answer["model"] == "mv-tiny" {
            served = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let served = served.expect("the promotion reached the gateway");
    assert_eq!(served.pointer("/choices/0/message/content").unwrap(), "colour");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    watch.abort();
    recorder_handle.shutdown().await;
    let calls = store.list_calls(&understudy_store::CallFilter::default()).await.unwrap();
    let by_understudy: Vec<_> = calls
        .iter()
        .filter(|call| call.routing.as_ref().is_some_and(|routing| routing.served_by.as_str() == "understudy"))
        .collect();
    assert!(by_understudy.len() >= 2);
    for call in by_understudy {
        let routing = call.routing.as_ref().unwrap();
        assert!(routing.understudy_cost.dollars() > 0.0, "machine time is priced");
        assert!(routing.lead_cost_avoided.dollars() > 0.0);
        assert!(routing.understudy_confidence.is_some(), "the gateway asked for logprobs");
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The real SmolLM2, loaded from the folder `scripts/fetch-models.sh` fills,
/// answers a constrained label question with one of the labels and a
/// confidence the cascade can read.
#[tokio::test]
async fn smollm2_answers_within_the_labels_with_a_confidence() {
    let Some(models) = std::env::var_os("UNDERSTUDY_MODELS_DIR") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_MODELS_DIR (scripts/test.sh does)");
        eprintln!("skipped: set UNDERSTUDY_MODELS_DIR to the folder scripts/fetch-models.sh fills");
        return;
    };
    let model = load("smollm2", &PathBuf::from(models).join("SmolLM2-135M-Instruct"));
    let labels = ["LOC", "HUM", "NUM"];
    let request = ChatRequest {
        body: object(json!({"model": "smollm2", "temperature": 0, "logprobs": true, "messages": [
            {"role": "system", "content": "Label the question: LOC (a place), HUM (a person) or NUM (a number)."},
            {"role": "user", "content": "Where is the Eiffel Tower?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "label",
                "schema": {"type": "string", "enum": labels}}}})),
    };
    let body: Value = serde_json::from_slice(&model.chat(request).await.unwrap().body).unwrap();
    let answer = body.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap();
    assert!(labels.contains(&answer), "{body}");
    let confidence = understudy_providers::confidence_of(&body).unwrap();
    assert!(confidence > 0.0 && confidence <= 1.0, "{confidence}");
}
