//! Local models: a trained classifier and an encoder loaded by path, asked
//! directly and through a gateway whose cascade routes to the classifier.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{models_dir, Gateway};
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
    Loader
        .load(&LocalModelSpec {
            name: name.into(),
            path: path.display().to_string(),
            adapter: None,
            weights: None,
            max_batch: None,
            speculative_draft: None,
        })
        .unwrap()
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
        Loader
            .load(&LocalModelSpec {
                name: "m".into(),
                path: path.into(),
                adapter: None,
                weights: None,
                max_batch: None,
                speculative_draft: None,
            })
            .unwrap_err()
            .to_string()
    };
    let missing = dir.path().join("nope");
    assert!(error(&missing.display().to_string()).contains("does not exist"));
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    assert!(error(&dir.path().join("empty").display().to_string()).contains("neither"));
    assert!(error("hf:just-a-name").contains("org/name"), "a bad hub name fails before any download");
    std::fs::write(dir.path().join("broken.gguf"), b"not a gguf, just bytes that llama.cpp must refuse").unwrap();
    let gguf = error(&dir.path().join("broken.gguf").display().to_string());
    assert!(gguf.contains("broken.gguf"), "{gguf}");
}

/// The real MiniLM: a paraphrase ranks above an unrelated sentence.
#[tokio::test]
async fn minilm_ranks_a_paraphrase_above_an_unrelated_sentence() {
    let Some(models) = models_dir() else { return };
    let model = load("minilm", &models.join("all-MiniLM-L6-v2"));
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
audit_rate = 0.0

[tasks.later]
lead = "lead"
"#,
        classifier = classifier.display()
    );
    let gateway = Gateway::start(dir.path(), &config_text).await;
    let store = gateway.store.clone();
    let ask = |task: &'static str, question: &'static str| {
        let gateway = &gateway;
        async move {
            let body = json!({"model": format!("task:{task}"), "messages": [{"role": "user", "content": question}]});
            let (status, answer) = gateway.post("/v1/chat/completions", &body).await;
            assert_eq!(status, 200, "{answer}");
            answer
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
    // Asked by its own name, the local model is priced by machine time too.
    let direct = json!({"model": "tiny", "messages": [{"role": "user", "content": "the cat is"}]});
    let (status, answer) = gateway.post("/v1/chat/completions", &direct).await;
    assert_eq!(status, 200, "{answer}");

    let calls = gateway.finish().await;
    let by_understudy: Vec<_> = calls
        .iter()
        .filter(|call| call.routing.as_ref().is_some_and(|routing| routing.served_by.as_str() == "understudy"))
        .collect();
    let direct: Vec<_> = calls.iter().filter(|call| call.model == "tiny" && call.routing.is_none()).collect();
    assert_eq!(direct.len(), 1, "{calls:?}");
    // $3.60 an hour is $0.001 a second: the cost is the call's time at that price.
    let (cost, seconds) = (direct[0].cost.dollars(), direct[0].latency_ms / 1000.0);
    assert!(cost > 0.0 && cost <= 0.001 * seconds * 1.001, "cost {cost} for {seconds} s");
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
    let Some(models) = models_dir() else { return };
    let model = load("smollm2", &models.join("SmolLM2-135M-Instruct"));
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

// ---------------------------------------------------------------------------
// HF Llama/Qwen2 directories served by the llama.cpp engine (converted to a
// cached GGUF), checked against candle and the tokenizers crate.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use understudy_models::llama;

/// Removes a converted model from the cache when the test ends.
struct CacheEntry(PathBuf);

impl Drop for CacheEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes an HF checkpoint: config.json (the candle config plus `extra`),
/// tokenizer.json, tokenizer_config.json and the weights in `dtype`, split
/// into `shards` files with an index when there is more than one.
#[allow(clippy::too_many_arguments)]
fn write_hf_dir(
    dir: &Path,
    config: &llama::Config,
    extra: Value,
    tokenizer_json: &Path,
    tokenizer_config: Value,
    weights: &HashMap<String, Tensor>,
    dtype: DType,
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config_json = serde_json::to_value(config).unwrap();
    for (key, value) in extra.as_object().unwrap() {
        config_json[key] = value.clone();
    }
    std::fs::write(dir.join("config.json"), config_json.to_string()).unwrap();
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut weight_map = Map::new();
    for shard in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", shard + 1)
        };
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(index, _)| index % shards == shard)
            .map(|(_, name)| ((*name).clone(), weights[*name].to_dtype(dtype).unwrap()))
            .collect();
        for name in part.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

async fn ask(model: &dyn LocalModel, body: Value) -> Value {
    let response = model.chat(ChatRequest { body: object(body) }).await.unwrap();
    serde_json::from_slice(&response.body).unwrap()
}

fn engine_options() -> understudy_engine::EngineOptions {
    understudy_engine::EngineOptions { n_ctx: 512, n_seq_max: 1, n_threads: Some(2), ..Default::default() }
}

/// SmolLM2's GGUF, written out as an HF Llama directory (f32, two shards,
/// tokenizer.json from the tokenizers crate), loaded by path: the converted
/// model answers like the GGUF, llama.cpp tokenizes like the tokenizers crate,
/// and a second load reuses the cached conversion.
#[tokio::test]
async fn an_hf_llama_directory_serves_like_its_gguf() {
    let Some(models) = models_dir() else { return };
    let gguf_dir = models.join("SmolLM2-135M-Instruct");
    let source = understudy_models::gguf::load(&gguf_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_path = dir.path().join("source-tokenizer.json");
    source.tokenizer.save(&tokenizer_path, false).unwrap();
    let hf = dir.path().join("SmolLM2-hf");
    let mut config = source.config.clone();
    config.architectures = Some(vec!["LlamaForCausalLM".into()]);
    write_hf_dir(
        &hf,
        &config,
        json!({"max_position_embeddings": 8192, "bos_token_id": source.bos_token_id, "eos_token_id": source.eos_token_id}),
        &tokenizer_path,
        json!({"chat_template": source.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}),
        &source.weights,
        DType::F32,
        2,
    );
    let cache = CacheEntry(understudy_engine::hf::cache_path(&hf).unwrap());
    assert!(!cache.0.exists());

    let question = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 24});
    let converted = load("smollm2-hf", &hf);
    let answer = ask(converted.as_ref(), question.clone()).await;
    let answer = answer.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{answer:?}");
    let original = load("smollm2", &gguf_dir);
    let reference = ask(original.as_ref(), question).await;
    let reference = reference.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string();
    let start = |text: &str| text.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    assert_eq!(start(&answer), start(&reference), "converted {answer:?}, GGUF {reference:?}");
    drop(converted);
    drop(original);

    // The conversion is cached (F16: about half the f32 checkpoint) and reused.
    let weights_bytes: u64 = std::fs::read_dir(&hf)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    let cached = std::fs::metadata(&cache.0).unwrap();
    let ratio = cached.len() as f64 / weights_bytes as f64;
    assert!(ratio > 0.45 && ratio < 0.6, "converted file is {ratio} of the checkpoint");
    let spec = LocalModelSpec {
        name: "smollm2-hf".into(),
        path: hf.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    let engine = understudy_engine::LlamaCppModel::load(&spec, &engine_options()).unwrap();
    assert_eq!(engine.gguf_path(), cache.0.as_path());
    assert_eq!(std::fs::metadata(&cache.0).unwrap().modified().unwrap(), cached.modified().unwrap(), "reconverted");
    assert_eq!(engine.llama_model().meta_val_str("tokenizer.ggml.pre").unwrap(), "smollm");

    let written = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    for text in [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Prices rose 12.5% in 2024: from $1,299 to $1,461!",
        "  indented\tcode() {\n    return x ** 2;\n}\n\n",
        "Ünïcödé naïve café, 東京, emoji 🚀 and don't/won't/I'm",
        "<|endoftext|>special tokens <|im_end|>mid-text",
    ] {
        let expected = written.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(engine.tokenize(text, true), expected, "{text:?}");
    }
}

/// GPT-2's byte-to-character table (printable bytes map to themselves).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tiny Qwen2-style byte-level BPE tokenizer.json: the 256 byte
/// characters, a few merges (stored as pairs), ChatML special tokens and one
/// non-special added token. Returns the path and the number of ids it uses.
fn write_tiny_tokenizer(path: &Path) -> usize {
    let chars = byte_chars();
    let mut vocab = Map::new();
    for (id, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    let merges = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("he", "ll"), ("Ġw", "or"), ("a", "n"), ("Ġ", "t")];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(id));
    }
    let mut added = Vec::new();
    for (content, special) in [("<|endoftext|>", true), ("<|im_start|>", true), ("<|im_end|>", true), ("<tool>", false)]
    {
        let id = vocab.len() + added.len();
        added.push(json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special}));
    }
    let n_ids = vocab.len() + added.len();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    });
    std::fs::write(path, tokenizer.to_string()).unwrap();
    n_ids
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The sorted top-`k` log-probabilities of the last position's logits, and its best id.
fn top_logprobs(logits: &Tensor, k: usize) -> (Vec<f64>, u32, f64) {
    let last = logits.squeeze(0).unwrap();
    let last = last.get(last.dim(0).unwrap() - 1).unwrap();
    let logprobs: Vec<f32> = candle_nn::ops::log_softmax(&last, 0).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]));
    let top: Vec<f64> = order.iter().take(k).map(|&id| logprobs[id] as f64).collect();
    let gap = top[0] - top[1];
    (top, order[0] as u32, gap)
}

/// The top logprobs the engine reports for its first answer token, sorted, and that token's bytes.
fn served_top(body: &Value) -> (Vec<f64>, Vec<u8>) {
    let first = body.pointer("/choices/0/logprobs/content/0").unwrap_or_else(|| panic!("{body}"));
    let mut top: Vec<f64> =
        first["top_logprobs"].as_array().unwrap().iter().map(|entry| entry["logprob"].as_f64().unwrap()).collect();
    top.sort_by(|a, b| b.total_cmp(a));
    let bytes = first["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    (top, bytes)
}

/// The bytes of a token of the tiny tokenizer.
fn token_bytes(tokenizer: &tokenizers::Tokenizer, id: u32) -> Vec<u8> {
    let chars = byte_chars();
    let token = tokenizer.id_to_token(id).unwrap_or_default();
    if token.starts_with('<') && token.len() > 1 {
        return token.into_bytes();
    }
    token.chars().map(|c| chars.iter().position(|&b| b == c).unwrap() as u8).collect()
}

fn assert_close(served: &[f64], expected: &[f64], tolerance: f64) {
    assert_eq!(served.len(), expected.len());
    for (a, b) in served.iter().zip(expected) {
        assert!((a - b).abs() < tolerance, "served {served:?}, candle {expected:?}");
    }
}

/// Prompt ids as the tokenizers crate encodes the ChatML prompt, checked
/// against the ids llama.cpp's template and tokenizer produce.
fn prompt_ids(engine: &understudy_engine::LlamaCppModel, tokenizer: &tokenizers::Tokenizer, user: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    let ids = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let served: Vec<u32> = engine
        .prompt_tokens(&[("user".to_string(), user.to_string())])
        .unwrap()
        .iter()
        .map(|token| token.0 as u32)
        .collect();
    assert_eq!(served, ids, "llama.cpp's prompt tokens differ from the tokenizers crate's");
    ids
}

/// A tiny random Qwen2 (q/k/v biases, tied embeddings, F16 safetensors, a
/// vocab_size larger than the tokenizer) served from its HF directory gives
/// the first answer token the log-probabilities candle computes.
#[tokio::test]
async fn a_tiny_hf_qwen2_directory_matches_candle() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_path = dir.path().join("tokenizer.json");
    let n_ids = write_tiny_tokenizer(&tokenizer_path);
    let mut config = llama::tiny_config(n_ids + 6);
    config.architectures = Some(vec!["Qwen2ForCausalLM".into()]);
    config.model_type = Some("qwen2".into());
    config.rope_theta = 1_000_000.0;
    assert!(config.qkv_bias());
    let weights = llama::random_weights(&config, 11, &Device::Cpu).unwrap();
    let hf = dir.path().join("tiny-qwen2");
    write_hf_dir(
        &hf,
        &config,
        json!({"max_position_embeddings": 256, "eos_token_id": n_ids - 2}),
        &tokenizer_path,
        json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
        &weights,
        DType::F16,
        1,
    );
    let _cache = CacheEntry(understudy_engine::hf::cache_path(&hf).unwrap());
    // candle on the same (f16-rounded) weights.
    let files = understudy_models::causal_lm::load(&hf).unwrap();
    let reference = llama::Model::new(
        &config,
        candle_nn::VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu),
        None,
        0,
    )
    .unwrap();

    let model = load("tiny-qwen2", &hf);
    let spec = LocalModelSpec {
        name: "tiny-qwen2".into(),
        path: hf.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    let engine = understudy_engine::LlamaCppModel::load(&spec, &engine_options()).unwrap();
    assert_eq!(engine.llama_model().meta_val_str("tokenizer.ggml.pre").unwrap(), "qwen2");
    assert_eq!(engine.llama_model().meta_val_str("general.architecture").unwrap(), "qwen2");
    for text in ["hello world<tool>, the 123 thing's<|im_end|>\n\n  x", "<|im_start|>user\nhello<|im_end|>"] {
        let expected = files.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(engine.tokenize(text, true), expected, "{text:?}");
    }
    for user in ["hello world", "the hell in 42 worlds"] {
        let ids = prompt_ids(&engine, &files.tokenizer, user);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let (expected, best, gap) = top_logprobs(&reference.forward(&input).unwrap(), 5);
        let body = ask(
            model.as_ref(),
            json!({"messages": [{"role": "user", "content": user}], "temperature": 0, "max_tokens": 1,
                "logprobs": true, "top_logprobs": 5}),
        )
        .await;
        let (served, bytes) = served_top(&body);
        assert_close(&served, &expected, 2e-2);
        if gap > 0.05 && (best as usize) < n_ids {
            assert_eq!(bytes, token_bytes(&files.tokenizer, best), "{body}");
        }
    }
}

/// A PEFT adapter (q/k/v/o, random B) whose base is a tiny HF Llama
/// directory (BF16 weights): loading the adapter folder serves the base with
/// the adapter applied, matching candle's LoRA forward, so the q/k row
/// permutation of base weights and of lora_B agree.
#[tokio::test]
async fn a_peft_adapter_on_an_hf_llama_directory_matches_candle() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_path = dir.path().join("tokenizer.json");
    let n_ids = write_tiny_tokenizer(&tokenizer_path);
    let mut config = llama::tiny_config(n_ids);
    config.hidden_size = 64;
    let weights = llama::random_weights(&config, 5, &Device::Cpu).unwrap();
    let hf = dir.path().join("tiny-llama");
    write_hf_dir(
        &hf,
        &config,
        json!({"max_position_embeddings": 256}),
        &tokenizer_path,
        json!({"chat_template": CHATML, "eos_token": "<|im_end|>"}),
        &weights,
        DType::BF16,
        1,
    );
    let _cache = CacheEntry(understudy_engine::hf::cache_path(&hf).unwrap());
    let files = understudy_models::causal_lm::load(&hf).unwrap();
    let lora = llama::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].iter().map(|m| m.to_string()).collect(),
    };
    let vb = candle_nn::VarBuilder::from_tensors(files.weights.clone(), DType::F32, &Device::Cpu);
    let adapted = llama::Model::new(&config, vb, Some(&lora), 3).unwrap();
    let base = llama::Model::new(
        &config,
        candle_nn::VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu),
        None,
        0,
    )
    .unwrap();
    let mut tensors = HashMap::new();
    for (name, var) in adapted.lora_vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        tensors.insert(name, var.as_tensor().clone());
    }
    let adapter_dir = dir.path().join("adapter");
    let adapter_config = understudy_models::peft::AdapterConfig::from_lora(&lora, &hf.display().to_string());
    understudy_models::peft::save(&adapter_dir, &adapter_config, &tensors).unwrap();

    let model = load("tiny-lora", &adapter_dir);
    let spec = LocalModelSpec {
        name: "tiny-llama".into(),
        path: hf.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    let engine = understudy_engine::LlamaCppModel::load(&spec, &engine_options()).unwrap();
    assert_eq!(engine.llama_model().meta_val_str("general.architecture").unwrap(), "llama");
    let user = "hello world";
    let ids = prompt_ids(&engine, &files.tokenizer, user);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let (expected, best, gap) = top_logprobs(&adapted.forward(&input).unwrap(), 5);
    let (without, _, _) = top_logprobs(&base.forward(&input).unwrap(), 5);
    let shift = expected.iter().zip(&without).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(shift > 0.1, "the adapter barely changes the distribution ({shift}); the test would not see it");
    let request = json!({"messages": [{"role": "user", "content": user}], "temperature": 0, "max_tokens": 1,
        "logprobs": true, "top_logprobs": 5});
    let (served, bytes) = served_top(&ask(model.as_ref(), request.clone()).await);
    assert_close(&served, &expected, 2e-2);
    if gap > 0.05 {
        assert_eq!(bytes, token_bytes(&files.tokenizer, best));
    }
    // The base directory alone serves the distribution without the adapter.
    let (plain, _) = served_top(&ask(&engine, request).await);
    assert_close(&plain, &without, 2e-2);
}

#[test]
fn an_unsupported_hf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "mistral", "architectures": ["MistralForCausalLM"]}"#,
    )
    .unwrap();
    let error = Loader
        .load(&LocalModelSpec {
            name: "m".into(),
            path: dir.path().display().to_string(),
            adapter: None,
            weights: None,
            max_batch: None,
            speculative_draft: None,
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("mistral") && error.contains("config.json"), "{error}");
}

/// Prompts of different lengths (so a batch of them is padded), each with
/// the tiny vocabulary's words.
fn varied_prompts() -> Vec<String> {
    (0..24)
        .map(|i| {
            let key = if i % 2 == 0 { ANIMALS[i % 4] } else { COLOURS[(i / 2) % 4] };
            let filler: Vec<&str> = (0..(i % 9)).map(|j| FILLER[(i + j) % 4]).collect();
            format!("{} {key} {}", FILLER[i % 4], filler.join(" "))
        })
        .collect()
}

/// The label and its log-probability a classifier answers `prompt` with.
async fn label_and_logprob(model: &dyn LocalModel, name: &str, prompt: &str) -> (String, f64) {
    let body = ask(
        model,
        json!({"model": name, "logprobs": true, "messages": [
        {"role": "system", "content": "Label it."}, {"role": "user", "content": prompt}]}),
    )
    .await;
    let content = body.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string();
    let logprob = body.pointer("/choices/0/logprobs/content/0/logprob").unwrap().as_f64().unwrap();
    (content, logprob)
}

/// Asks every prompt alone (a model with `max_batch = 1`, one call at a
/// time), then all at once of a batching model, and checks the answers
/// agree; also the forward pass itself, one batch against one row at a time.
async fn batched_answers_equal_unbatched(classifier: &Path, prompts: &[String], tolerance: f64, labels_vary: bool) {
    let spec = |max_batch| LocalModelSpec {
        max_batch: Some(max_batch),
        ..LocalModelSpec::new("clf", classifier.display().to_string())
    };
    let alone_model = Loader.load(&spec(1)).unwrap();
    assert_eq!(alone_model.max_concurrency(), 1);
    let mut alone = Vec::new();
    for prompt in prompts {
        alone.push(label_and_logprob(alone_model.as_ref(), "clf", prompt).await);
    }
    let batching = Loader.load(&spec(32)).unwrap();
    assert_eq!(batching.max_concurrency(), 32);
    let together =
        futures::future::join_all(prompts.iter().map(|prompt| label_and_logprob(batching.as_ref(), "clf", prompt)))
            .await;
    for ((prompt, alone), together) in prompts.iter().zip(&alone).zip(&together) {
        assert_eq!(alone.0, together.0, "{prompt}");
        assert!((alone.1 - together.1).abs() <= tolerance, "{prompt}: {} alone, {} batched", alone.1, together.1);
    }

    // One forward pass over every prompt (padded to the longest) against each alone.
    let model = understudy_trainer::ClassifierModel::load(classifier).unwrap();
    let texts: Vec<String> = prompts.iter().map(|prompt| format!("Label it.\n{prompt}")).collect();
    let batched = model.predict(&texts).unwrap();
    let mut labels = std::collections::BTreeSet::new();
    for (text, batched) in texts.iter().zip(&batched) {
        let single = model.predict(std::slice::from_ref(text)).unwrap().remove(0);
        assert_eq!(single.label, batched.label, "{text}");
        for (a, b) in single.probabilities.iter().zip(&batched.probabilities) {
            assert!((f64::from(*a) - f64::from(*b)).abs() <= tolerance, "{text}: {a} alone, {b} batched");
        }
        labels.insert(batched.label.clone());
    }
    if labels_vary {
        assert!(labels.len() > 1, "the prompts should not all get one label: {labels:?}");
    }
}

#[tokio::test]
async fn a_tiny_classifier_answers_batched_calls_as_it_answers_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let classifier = tiny_classifier(dir.path());
    batched_answers_equal_unbatched(&classifier, &varied_prompts(), 1e-5, true).await;
}

/// The real MiniLM under a classifier head (one short epoch on the top layer),
/// so the weights are mostly MiniLM's, on questions of TREC's lengths.
#[tokio::test]
async fn a_minilm_classifier_answers_batched_calls_as_it_answers_each_alone() {
    let Some(models) = models_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let questions = [
        "How far is it from Denver to Aspen ?",
        "What county is Modesto , California in ?",
        "Who was Galileo ?",
        "What is an atom ?",
        "When did Hawaii become a state ?",
        "How tall is the Sears Building ?",
        "George Bush purchased a small interest in which baseball team ?",
        "What is Australia 's national flower ?",
        "Why does the moon turn orange ?",
        "What is autism ?",
        "What city had a world fair in 1900 ?",
        "What person 's head is on a dime ?",
        "What is the average weight of a Yellow Labrador ?",
        "Who was the first man to fly across the Pacific Ocean ?",
        "How many Great Lakes are there ?",
        "Name a food high in zinc .",
    ];
    let labels = ["NUM", "LOC", "HUM", "DESC"];
    let rows: Vec<LabeledText> = questions
        .iter()
        .enumerate()
        .map(|(i, question)| LabeledText { text: question.to_string(), label: labels[i % 4].to_string() })
        .collect();
    let out = dir.path().join("classifier");
    let mut config = ClassifierTrainConfig::new(models.join("all-MiniLM-L6-v2"), &out);
    config.epochs = 1;
    config.batch_size = 8;
    config.train_top_layers = Some(1);
    config.progress = false;
    // The trainer wants at least 20 rows; the questions twice over.
    let train: Vec<LabeledText> =
        rows.iter().chain(&rows).map(|row| LabeledText { text: row.text.clone(), label: row.label.clone() }).collect();
    train_classifier(&config, &train, &rows[..4]).unwrap();
    let prompts: Vec<String> = questions.iter().map(|question| question.to_string()).collect();
    batched_answers_equal_unbatched(&out, &prompts, 1e-4, false).await;
}
