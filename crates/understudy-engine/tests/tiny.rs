#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The engine on tiny random Llama GGUFs written by `understudy_engine::testing`.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use serde_json::{json, Value};
use understudy_engine::testing::{write_tiny_llama, write_tiny_peft_adapter, TinyLlama};
use understudy_engine::{backend, EngineOptions, LlamaCppModel};
use understudy_providers::local::{confidence_of, LocalModel, LocalModelSpec};
use understudy_providers::{ChatRequest, ProviderError};

fn tiny_shape() -> TinyLlama {
    TinyLlama { output_scale: 1.5, ..TinyLlama::default() }
}

fn tiny_model_file(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_llama(&path, &tiny_shape()).unwrap();
    path
}

/// A tiny model whose next-token distributions are flat, so that sampling visits several answers.
fn flat_model_file(dir: &Path) -> PathBuf {
    let path = dir.join("flat.gguf");
    write_tiny_llama(&path, &TinyLlama { output_scale: 0.02, ..TinyLlama::default() }).unwrap();
    path
}

fn spec(path: &Path, adapter: Option<PathBuf>) -> LocalModelSpec {
    LocalModelSpec {
        name: "tiny".into(),
        path: path.display().to_string(),
        adapter,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    }
}

fn options() -> EngineOptions {
    EngineOptions { n_threads: Some(2), n_ctx: 512, n_seq_max: 4, n_batch: 128, ..EngineOptions::default() }
}

fn load(path: &Path) -> LlamaCppModel {
    LlamaCppModel::load(&spec(path, None), &options()).unwrap()
}

fn request(body: Value) -> ChatRequest {
    ChatRequest { body: body.as_object().unwrap().clone() }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

async fn chat(model: &LlamaCppModel, body: Value) -> Value {
    let response = model.chat(request(body)).await.unwrap();
    serde_json::from_slice(&response.body).unwrap()
}

fn content(completion: &Value) -> String {
    completion.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string()
}

fn error_message(error: ProviderError) -> String {
    match error {
        ProviderError::Rejected { status, body, .. } => {
            assert_eq!(status, 400);
            let body: Value = serde_json::from_slice(&body).unwrap();
            body.pointer("/error/message").unwrap().as_str().unwrap().to_string()
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tiny_model_answers_with_usage_and_finish_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let completion = chat(&model, json!({"messages": user("hello"), "temperature": 0, "max_tokens": 5})).await;
    assert_eq!(completion["object"], "chat.completion");
    let reason = completion.pointer("/choices/0/finish_reason").unwrap().as_str().unwrap();
    assert!(reason == "length" || reason == "stop", "{reason}");
    let usage = &completion["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 5);
    if reason == "length" {
        assert_eq!(usage["completion_tokens"], 5);
    }
    assert_eq!(model.kind(), "llama.cpp");
}

#[test]
fn missing_and_corrupt_files_fail_at_load_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let error = LlamaCppModel::load(&spec(&missing, None), &options()).unwrap_err().to_string();
    assert!(error.contains("nope.gguf") && error.contains("does not exist"), "{error}");

    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "hello world").unwrap();
    let error = LlamaCppModel::load(&spec(&not_gguf, None), &options()).unwrap_err().to_string();
    assert!(error.contains("text.gguf"), "{error}");

    // A malformed hub name fails before any download (tests/hub.rs in
    // understudy-local downloads from a local hub).
    let error = LlamaCppModel::load(&spec(Path::new("hf:SmolLM2-135M"), None), &options()).unwrap_err().to_string();
    assert!(error.contains("hf:SmolLM2-135M") && error.contains("org/name"), "{error}");

    // A real GGUF cut in half: the header is fine, the tensor data is not there.
    let good = tiny_model_file(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = LlamaCppModel::load(&spec(&truncated, None), &options()).unwrap_err().to_string();
    assert!(error.contains("truncated.gguf"), "{error}");
}

#[test]
fn incremental_decoding_matches_full_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let backend = backend().unwrap();
    let model = LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()).unwrap();
    let tokens = model.vocab().tokenize(b"The quick brown fox jumps over", false, false);
    assert!(tokens.len() > 10);
    let params = || LlamaContextParams::default().with_n_ctx(NonZeroU32::new(256)).with_n_batch(256).with_n_threads(2);

    // Full recompute: every position in one batch.
    let mut full = model.new_context(backend, params()).unwrap();
    let mut batch = LlamaBatch::new(256, 1);
    for (pos, token) in tokens.iter().enumerate() {
        batch.add(*token, pos as i32, &[0], true).unwrap();
    }
    full.decode(&mut batch).unwrap();
    let full_logits: Vec<Vec<f32>> = (0..tokens.len()).map(|i| full.get_logits_ith(i as i32).to_vec()).collect();

    // Incremental: a short prompt, then one token at a time against the KV cache.
    let mut incremental = model.new_context(backend, params()).unwrap();
    let n_prompt = 3;
    batch.clear();
    for (pos, token) in tokens[..n_prompt].iter().enumerate() {
        batch.add(*token, pos as i32, &[0], pos + 1 == n_prompt).unwrap();
    }
    incremental.decode(&mut batch).unwrap();
    let mut max_diff = 0f32;
    let mut compare = |logits: &[f32], pos: usize| {
        for (a, b) in logits.iter().zip(&full_logits[pos]) {
            max_diff = max_diff.max((a - b).abs());
        }
    };
    compare(incremental.get_logits_ith(n_prompt as i32 - 1), n_prompt - 1);
    for pos in n_prompt..tokens.len() {
        batch.clear();
        batch.add(tokens[pos], pos as i32, &[0], true).unwrap();
        incremental.decode(&mut batch).unwrap();
        compare(incremental.get_logits_ith(0), pos);
    }
    assert!(max_diff < 1e-3, "incremental logits differ from the full recompute by {max_diff}");
}

#[tokio::test]
async fn the_same_seed_gives_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let body = json!({"messages": user("tell me a story"), "temperature": 1.0, "seed": 42, "max_tokens": 24});
    let first = content(&chat(&model, body.clone()).await);
    let second = content(&chat(&model, body).await);
    assert_eq!(first, second);
    let mut others = Vec::new();
    for seed in 0..4 {
        let body = json!({"messages": user("tell me a story"), "temperature": 1.0, "seed": seed, "max_tokens": 24});
        others.push(content(&chat(&model, body).await));
    }
    assert!(others.iter().any(|other| *other != first), "different seeds should not all give {first:?}");
}

#[tokio::test]
async fn stop_sequences_cut_the_answer_in_full_and_streamed_responses() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let base = json!({"messages": user("abc"), "temperature": 0, "max_tokens": 40});
    let full = content(&chat(&model, base.clone()).await);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "the tiny model should write some text: {full:?}");
    // A stop of two printable ASCII characters that is not at the very start (the random model
    // also writes raw bytes, which are not valid UTF-8 on their own).
    let start = (1..chars.len() - 1)
        .find(|&i| chars[i].is_ascii_graphic() && chars[i + 1].is_ascii_graphic() && !full.starts_with(chars[i]))
        .expect("two printable characters in a row");
    let stop: String = chars[start..start + 2].iter().collect();
    let cut = full.find(&stop).unwrap();
    assert!(cut > 0);
    let expected = &full[..cut];

    let mut body = base.clone();
    body["stop"] = json!([stop.clone(), "\u{1F600}never"]);
    let stopped = chat(&model, body.clone()).await;
    assert_eq!(content(&stopped), expected);
    assert_eq!(stopped.pointer("/choices/0/finish_reason").unwrap(), "stop");

    body["stream"] = json!(true);
    let mut stream = model.chat_stream(request(body)).await.unwrap();
    let mut streamed = String::new();
    let mut finish = Value::Null;
    let mut usage = Value::Null;
    let mut n_chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk: Value = serde_json::from_str(&chunk.unwrap()).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        n_chunks += 1;
        if let Some(text) = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str) {
            streamed.push_str(text);
            assert!(!streamed.contains(&stop), "stop text leaked into the stream: {streamed:?}");
        }
        if let Some(reason) = chunk.pointer("/choices/0/finish_reason").filter(|r| !r.is_null()) {
            finish = reason.clone();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    assert_eq!(streamed, expected);
    assert_eq!(finish, "stop");
    assert!(n_chunks > 3, "tokens should arrive one by one, got {n_chunks} chunks");
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn logprobs_come_in_the_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let completion = chat(
        &model,
        json!({"messages": user("hi"), "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    let entries = completion.pointer("/choices/0/logprobs/content").unwrap().as_array().unwrap();
    assert!(!entries.is_empty());
    for entry in entries {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0);
        assert!(entry["bytes"].is_array() && entry["token"].is_string());
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert!((top[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-9);
    }
    let confidence = confidence_of(&completion).unwrap();
    assert!(confidence > 0.0 && confidence <= 1.0);
}

#[tokio::test]
async fn constrained_answers_are_always_one_of_the_allowed_strings() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&flat_model_file(dir.path()));
    // Equal lengths: with a flat random model a shorter answer would be far more likely.
    let labels = ["POSITIVE", "NEGATIVE", "NEUTRALS", "MIXED..."];
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "label", "schema": {"type": "string", "enum": labels}}});
    let mut probability_sum = 0.0;
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let completion = chat(
            &model,
            json!({"messages": user("rate this"), "temperature": 2.0, "seed": seed, "response_format": format,
                "logprobs": true, "top_logprobs": 4}),
        )
        .await;
        let answer = content(&completion);
        assert!(labels.contains(&answer.as_str()), "{answer:?} is not an allowed label");
        assert_eq!(completion.pointer("/choices/0/finish_reason").unwrap(), "stop");
        seen.insert(answer);
        let confidence = confidence_of(&completion).unwrap();
        assert!(confidence > 0.0 && confidence <= 1.0);
    }
    assert!(seen.len() > 1, "sampling at temperature 2 should visit more than one label: {seen:?}");
    // Greedy picks the most probable label; the confidences of all labels add up to 1.
    let greedy = chat(
        &model,
        json!({"messages": user("rate this"), "temperature": 0, "response_format": format,
        "logprobs": true}),
    )
    .await;
    let best = confidence_of(&greedy).unwrap();
    for label in labels {
        let only = json!({"type": "json_schema", "json_schema": {"schema": {"enum": [label]}}});
        let forced = chat(
            &model,
            json!({"messages": user("rate this"), "temperature": 0, "response_format": only,
            "logprobs": true}),
        )
        .await;
        assert_eq!(content(&forced), label);
        assert!((confidence_of(&forced).unwrap() - 1.0).abs() < 1e-9);
    }
    for seed in 0..1 {
        let _ = seed;
        let all = chat(
            &model,
            json!({"messages": user("rate this"), "temperature": 0, "response_format": format,
            "logprobs": true, "top_logprobs": 4}),
        )
        .await;
        let first = all.pointer("/choices/0/logprobs/content/0/top_logprobs").unwrap().as_array().unwrap();
        let total: f64 = first.iter().map(|entry| entry["logprob"].as_f64().unwrap().exp()).sum();
        probability_sum += total;
    }
    assert!(
        (probability_sum - 1.0).abs() < 1e-6,
        "first-token alternatives should cover all labels: {probability_sum}"
    );
    assert!(best >= 1.0 / labels.len() as f64 - 1e-9);
}

/// Prompts of different lengths, sent together.
const CONCURRENT_PROMPTS: [&str; 6] = ["one", "two words", "a longer prompt here", "four", "5", "six six six"];

fn greedy_body(prompt: &str) -> Value {
    json!({"messages": user(prompt), "temperature": 0, "max_tokens": 16})
}

#[tokio::test]
async fn concurrent_requests_give_the_same_greedy_answers_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let (prompts, body) = (CONCURRENT_PROMPTS, greedy_body);
    let mut alone = Vec::new();
    for prompt in prompts {
        alone.push(content(&chat(&model, body(prompt)).await));
    }
    let together = futures::future::join_all(prompts.iter().map(|prompt| chat(&model, body(prompt)))).await;
    let together: Vec<String> = together.iter().map(content).collect();
    assert_eq!(alone, together);
}

#[tokio::test]
async fn concurrent_calls_are_charged_their_share_of_the_steps_not_their_wall_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let (prompts, body) = (CONCURRENT_PROMPTS, greedy_body);
    let (model, body) = (&model, &body);
    let started = std::time::Instant::now();
    let answers = futures::future::join_all(prompts.iter().map(|prompt| async move {
        let called = std::time::Instant::now();
        let response = model.chat(request(body(prompt))).await.unwrap();
        (response.compute.expect("the engine says what each call cost"), called.elapsed())
    }))
    .await;
    let run = started.elapsed();
    let shares: std::time::Duration = answers.iter().map(|(compute, _)| *compute).sum();
    for (compute, wall) in &answers {
        assert!(!compute.is_zero() && compute <= wall, "a share of {compute:?} for a call of {wall:?}");
    }
    // Charged each call's wall time, the six calls would add up to about six runs.
    assert!(shares <= run, "shares {shares:?} add up to more than the run's {run:?}");
    let walls: std::time::Duration = answers.iter().map(|(_, wall)| *wall).sum();
    assert!(shares * 2 < walls, "shares {shares:?} against the calls' wall times {walls:?}");
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let options = EngineOptions { n_seq_max: 1, ..options() };
    let model = LlamaCppModel::load(&spec(&path, None), &options).unwrap();
    for _ in 0..3 {
        // Each stream takes the only sequence and leaves after its first token.
        let mut stream = model
            .chat_stream(request(
                json!({"messages": user("go on"), "temperature": 0, "max_tokens": 400, "stream": true}),
            ))
            .await
            .unwrap();
        let _ = stream.next().await.unwrap().unwrap();
        drop(stream);
    }
    let completion = chat(&model, json!({"messages": user("hi"), "temperature": 0, "max_tokens": 3})).await;
    assert!(completion.pointer("/choices/0/message/content").is_some());
}

#[tokio::test]
async fn bad_requests_are_rejected_with_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let long = "word ".repeat(400);
    let message = error_message(model.chat(request(json!({"messages": user(&long)}))).await.unwrap_err());
    assert!(message.contains("prompt has") && message.contains("context is 512"), "{message}");
    for (body, needle) in [
        (json!({"messages": user("x"), "temperature": 2.5}), "temperature"),
        (json!({"messages": user("x"), "top_p": 1.5}), "top_p"),
        (json!({"messages": user("x"), "n": 3}), "n must be 1"),
        (json!({"messages": user("x"), "max_tokens": -1}), "max_tokens"),
    ] {
        let message = error_message(model.chat(request(body.clone())).await.unwrap_err());
        assert!(message.contains(needle), "{message}");
        let message = error_message(model.chat_stream(request(body)).await.err().unwrap());
        assert!(message.contains(needle), "{message}");
    }
}

async fn first_token_logprobs(model: &LlamaCppModel) -> Vec<f64> {
    let completion = chat(
        model,
        json!({"messages": user("compare"), "temperature": 0, "max_tokens": 1, "logprobs": true, "top_logprobs": 20}),
    )
    .await;
    let top = completion.pointer("/choices/0/logprobs/content/0/top_logprobs").unwrap().as_array().unwrap();
    top.iter().map(|entry| entry["logprob"].as_f64().unwrap()).collect()
}

#[tokio::test]
async fn peft_lora_adapters_apply_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let shape = tiny_shape();
    let base = first_token_logprobs(&load(&path)).await;

    let zero = dir.path().join("zero");
    write_tiny_peft_adapter(&zero, &shape, 4, 0.0, 7).unwrap();
    let with_zero = LlamaCppModel::load(&spec(&path, Some(zero)), &options()).unwrap();
    let zero_logprobs = first_token_logprobs(&with_zero).await;
    let max_diff = base.iter().zip(&zero_logprobs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_diff < 1e-4, "a zero-B adapter changed the logprobs by {max_diff}");

    let nonzero = dir.path().join("nonzero");
    write_tiny_peft_adapter(&nonzero, &shape, 4, 0.5, 7).unwrap();
    let with_nonzero = LlamaCppModel::load(&spec(&path, Some(nonzero)), &options()).unwrap();
    let changed = first_token_logprobs(&with_nonzero).await;
    let max_diff = base.iter().zip(&changed).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_diff > 1e-3, "a non-zero adapter should change the logprobs (max diff {max_diff})");
}

#[test]
fn bad_adapter_directories_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let shape = tiny_shape();
    let load_with = |adapter: &Path| {
        LlamaCppModel::load(&spec(&path, Some(adapter.to_path_buf())), &options()).unwrap_err().to_string()
    };

    let error = load_with(&dir.path().join("no-such-adapter"));
    assert!(error.contains("no-such-adapter"), "{error}");

    let no_weights = dir.path().join("no-weights");
    write_tiny_peft_adapter(&no_weights, &shape, 4, 0.1, 1).unwrap();
    std::fs::remove_file(no_weights.join("adapter_model.safetensors")).unwrap();
    let error = load_with(&no_weights);
    assert!(error.contains("adapter_model.safetensors"), "{error}");

    let bad_config = dir.path().join("bad-config");
    write_tiny_peft_adapter(&bad_config, &shape, 4, 0.1, 1).unwrap();
    std::fs::write(bad_config.join("adapter_config.json"), "{\"r\": 0}").unwrap();
    let error = load_with(&bad_config);
    assert!(error.contains("adapter_config.json") && error.contains("`r`"), "{error}");

    let corrupt = dir.path().join("corrupt");
    write_tiny_peft_adapter(&corrupt, &shape, 4, 0.1, 1).unwrap();
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"garbage!garbage!").unwrap();
    let error = load_with(&corrupt);
    assert!(error.contains("adapter_model.safetensors"), "{error}");

    // An adapter for a wider model: llama.cpp's shape check fails, and the message names the adapter.
    let wrong = dir.path().join("wrong-shape");
    let wider = TinyLlama { n_embd: 128, ..shape };
    write_tiny_peft_adapter(&wrong, &wider, 4, 0.1, 1).unwrap();
    let error = load_with(&wrong);
    assert!(error.contains("wrong-shape"), "{error}");
}

fn load_with_draft(path: &Path, speculative_draft: usize) -> LlamaCppModel {
    LlamaCppModel::load(&spec(path, None), &EngineOptions { speculative_draft, ..options() }).unwrap()
}

/// The tokens of a greedy answer (from its logprobs, which carry each
/// token's bytes), its finish reason and its usage.
fn greedy_tokens(completion: &Value) -> (Vec<Value>, Value, Value) {
    let tokens = completion
        .pointer("/choices/0/logprobs/content")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["bytes"].clone())
        .collect();
    (tokens, completion.pointer("/choices/0/finish_reason").unwrap().clone(), token_counts(completion))
}

/// The usage's token counts, without how many prompt tokens a kept prefix
/// served (that depends on what the model was asked before).
fn token_counts(completion: &Value) -> Value {
    let usage = &completion["usage"];
    json!([usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]])
}

fn cached_tokens(completion: &Value) -> u64 {
    completion.pointer("/usage/prompt_tokens_details/cached_tokens").unwrap().as_u64().unwrap()
}

fn load_with_prefix_cache(path: &Path, prefix_cache: bool) -> LlamaCppModel {
    LlamaCppModel::load(&spec(path, None), &EngineOptions { prefix_cache, ..options() }).unwrap()
}

/// The tiny model loaded twice: without kept prompt prefixes, and with them.
fn without_and_with_kept_prefixes() -> (tempfile::TempDir, LlamaCppModel, LlamaCppModel) {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let (plain, cached) = (load_with_prefix_cache(&path, false), load_with_prefix_cache(&path, true));
    (dir, plain, cached)
}

/// The logprob of each token of a completion's answer.
fn token_logprobs(completion: &Value) -> Vec<f64> {
    let entries = completion.pointer("/choices/0/logprobs/content").unwrap().as_array().unwrap();
    entries.iter().map(|entry| entry["logprob"].as_f64().unwrap()).collect()
}

/// A task's calls: one long instruction, then the message.
fn task_body(instruction: &str, message: &str) -> Value {
    json!({"messages": [{"role": "system", "content": instruction}, {"role": "user", "content": message}],
        "temperature": 0, "max_tokens": 24, "logprobs": true})
}

const INSTRUCTIONS: [&str; 3] = [
    "Extract the sender's name and phone number from the SMS, as JSON with the keys name and phone.",
    "Classify the SMS as spam or ham; answer with one word.",
    "Extract the sender's name and phone number from the SMS, as JSON with the keys name and date.",
];

const MESSAGES: [&str; 4] = ["Hi, Tom here, call 555-0199", "WIN a prize now!!", "Lunch at 12? Ann", "555-0142 Maria"];

#[tokio::test]
async fn kept_prompt_prefixes_give_the_greedy_tokens_of_a_full_prefill() {
    let (_dir, plain, cached) = without_and_with_kept_prefixes();
    // Every instruction with every message, one at a time: after the first
    // call of an instruction, its prefix (or, for the third, most of the
    // first's) is kept; the instructions alternate, so more than one is kept.
    let mut alone = Vec::new();
    let mut served_from_cache = 0;
    for message in MESSAGES {
        for instruction in INSTRUCTIONS {
            let expected = chat(&plain, task_body(instruction, message)).await;
            let got = chat(&cached, task_body(instruction, message)).await;
            assert_eq!(greedy_tokens(&got), greedy_tokens(&expected), "{instruction:?} {message:?}");
            assert_eq!(cached_tokens(&expected), 0, "prefix_cache off reused a prefix");
            let prompt_tokens = got["usage"]["prompt_tokens"].as_u64().unwrap();
            assert!(cached_tokens(&got) < prompt_tokens, "the last prompt token is always decoded");
            if cached_tokens(&got) > 0 {
                served_from_cache += 1;
            }
            for (a, b) in token_logprobs(&got).iter().zip(token_logprobs(&expected)) {
                assert!((a - b).abs() < 1e-2, "logprob {a} against {b}");
            }
            alone.push(expected);
        }
    }
    // The first call of each instruction prefilled it all; after that, the
    // instruction came from the cache (the third shares most of the first's).
    assert!(served_from_cache >= 9, "only {served_from_cache} of 12 calls used a kept prefix");

    // All twelve at once on four sequences: requests share a kept prefix,
    // admitted ones free their sequences for the rest, and kept prefixes give
    // way whenever a request needs their room or their sequence.
    let bodies: Vec<Value> = MESSAGES
        .iter()
        .flat_map(|message| INSTRUCTIONS.iter().map(move |instruction| task_body(instruction, message)))
        .collect();
    let together = futures::future::join_all(bodies.iter().map(|body| chat(&cached, body.clone()))).await;
    for (got, expected) in together.iter().zip(&alone) {
        assert_eq!(greedy_tokens(got), greedy_tokens(expected));
    }
    assert!(together.iter().any(|completion| cached_tokens(completion) > 0));
}

#[tokio::test]
async fn kept_prefixes_give_way_to_prompts_that_need_the_whole_context() {
    let (_dir, plain, cached) = without_and_with_kept_prefixes();
    // Prompts of about 400 of the 512 cells (one token per character), each
    // different from its first characters: a kept one must be dropped for
    // the next to fit.
    let long =
        |seed: usize| -> String { (0..400).map(|i| char::from(b'a' + ((i * 7 + seed * 13) % 26) as u8)).collect() };
    for seed in 0..3 {
        let body = json!({"messages": user(&long(seed)), "temperature": 0, "max_tokens": 8, "logprobs": true});
        let expected = chat(&plain, body.clone()).await;
        let got = chat(&cached, body).await;
        assert_eq!(greedy_tokens(&got), greedy_tokens(&expected), "prompt {seed}");
        assert_eq!(got.pointer("/choices/0/finish_reason"), expected.pointer("/choices/0/finish_reason"));
    }
}

/// Prompts that repeat themselves, so that drafts copied from them can be
/// right, and ones that do not. The tiny vocabulary has a token per
/// character: they are short so that four answers fit the 512-cell context
/// together.
const REPEATING_PROMPTS: [&str; 6] = [
    "abc abc abc abc abc abc",
    "The cat sat. The cat sat. The cat sat.",
    "one two one two one two one two",
    "{\"id\": \"a1\"} {\"id\": \"a1\"}",
    "hello",
    "no repeats here",
];

#[tokio::test]
async fn speculative_decoding_gives_exactly_the_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let plain = load_with_draft(&path, 0);
    let speculative = load_with_draft(&path, 8);
    let body = |prompt: &str, max_tokens: usize| {
        json!({"messages": user(prompt), "temperature": 0, "max_tokens": max_tokens, "logprobs": true,
            "top_logprobs": 2})
    };
    for prompt in REPEATING_PROMPTS {
        // Short limits check that a draft never runs past max_tokens.
        for max_tokens in [1, 2, 5, 64] {
            let expected = chat(&plain, body(prompt, max_tokens)).await;
            let got = chat(&speculative, body(prompt, max_tokens)).await;
            assert_eq!(greedy_tokens(&got), greedy_tokens(&expected), "{prompt:?}, max_tokens {max_tokens}");
            assert_eq!(content(&got), content(&expected));
            // The logprobs of accepted tokens are read from the verifying
            // step's rows (a row off by one would be far off; a step of
            // several tokens moves the last bits, as batching does).
            for (a, b) in token_logprobs(&got).iter().zip(token_logprobs(&expected)) {
                assert!((a - b).abs() < 1e-2, "{prompt:?}: logprob {a} against {b}");
            }
        }
    }
    assert_eq!(plain.speculation_stats(), Default::default(), "speculative_draft 0 must not draft");
    let stats = speculative.speculation_stats();
    assert!(stats.accepted > 0, "no draft token was ever accepted: {stats:?}");
    // Some were rejected too, so the rejected cells' removal was exercised.
    assert!(stats.drafted > stats.accepted, "every draft token was accepted: {stats:?}");
}

#[tokio::test]
async fn concurrent_speculative_sequences_give_the_greedy_tokens_of_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let plain = load_with_draft(&path, 0);
    let speculative = load_with_draft(&path, 8);
    let body = |prompt: &str| json!({"messages": user(prompt), "temperature": 0, "max_tokens": 48, "logprobs": true});
    let mut alone = Vec::new();
    for prompt in REPEATING_PROMPTS {
        alone.push(greedy_tokens(&chat(&plain, body(prompt)).await));
    }
    // Six requests on four sequences: several sequences, each with its own
    // drafts, in one batch, and requests admitted while others speculate.
    let together =
        futures::future::join_all(REPEATING_PROMPTS.iter().map(|prompt| chat(&speculative, body(prompt)))).await;
    let together: Vec<_> = together.iter().map(greedy_tokens).collect();
    for ((prompt, got), expected) in REPEATING_PROMPTS.iter().zip(&together).zip(&alone) {
        let first_difference = got.0.iter().zip(&expected.0).position(|(a, b)| a != b);
        assert_eq!(
            got, expected,
            "{prompt:?}: first different token at {first_difference:?}; {:?} {:?} against {:?} {:?}",
            got.1, got.2, expected.1, expected.2
        );
    }
    let stats = speculative.speculation_stats();
    assert!(stats.accepted > 0, "no draft token was ever accepted: {stats:?}");
}

#[tokio::test]
async fn sampled_requests_do_not_speculate_and_stop_sequences_still_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let speculative = load_with_draft(&path, 8);
    let plain = load_with_draft(&path, 0);
    let prompt = REPEATING_PROMPTS[0];
    let sampled = json!({"messages": user(prompt), "temperature": 0.8, "seed": 5, "max_tokens": 32});
    assert_eq!(content(&chat(&speculative, sampled.clone()).await), content(&chat(&plain, sampled).await));
    assert_eq!(speculative.speculation_stats(), Default::default(), "a sampled request drafted");

    // A stop sequence inside the greedy answer cuts it at the same place
    // even when the stop falls inside an accepted draft.
    let greedy = json!({"messages": user(prompt), "temperature": 0, "max_tokens": 64});
    let full = content(&chat(&plain, greedy.clone()).await);
    let chars: Vec<char> = full.chars().collect();
    let at = chars.len() * 2 / 3;
    let stop: String = chars[at..(at + 2).min(chars.len())].iter().collect();
    if !stop.is_empty() {
        let mut body = greedy.clone();
        body["stop"] = json!([stop]);
        let expected = chat(&plain, body.clone()).await;
        let got = chat(&speculative, body).await;
        assert_eq!(content(&got), content(&expected));
        assert_eq!(token_counts(&got), token_counts(&expected));
        assert_eq!(got.pointer("/choices/0/finish_reason"), expected.pointer("/choices/0/finish_reason"));
    }
    assert!(speculative.speculation_stats().drafted > 0);
}

#[tokio::test]
async fn a_json_object_answer_that_is_not_one_fails_instead_of_reaching_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    // The random model writes no JSON: the call fails (the gateway then
    // falls back to the lead), where a text answer succeeds.
    let body = json!({"messages": user("hello"), "temperature": 0, "max_tokens": 24});
    assert!(!content(&chat(&model, body.clone()).await).trim_start().starts_with('{'));
    let mut json_body = body;
    json_body["response_format"] = json!({"type": "json_object"});
    let error = model.chat(request(json_body)).await.unwrap_err().to_string();
    assert!(error.contains("JSON object"), "{error}");
}

#[tokio::test]
async fn earlier_answers_to_a_kept_prefix_are_drafted_and_still_give_the_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model_file(dir.path());
    let plain = LlamaCppModel::load(
        &spec(&path, None),
        &EngineOptions { speculative_draft: 0, prefix_cache: false, ..options() },
    )
    .unwrap();
    let drafting = LlamaCppModel::load(
        &spec(&path, None),
        &EngineOptions { speculative_draft: 8, prefix_cache: true, ..options() },
    )
    .unwrap();
    let mut accepted_per_call = Vec::new();
    let mut answer_tokens = Vec::new();
    // The same instruction with messages that do not repeat themselves: the
    // first call's drafts can come only from its prompt; later calls also
    // draft from the answers given after the same instruction.
    for message in MESSAGES.iter().chain(&MESSAGES) {
        let body = task_body(INSTRUCTIONS[1], message);
        let before = drafting.speculation_stats();
        let got = chat(&drafting, body.clone()).await;
        let after = drafting.speculation_stats();
        assert_eq!(greedy_tokens(&got), greedy_tokens(&chat(&plain, body).await), "{message:?}");
        accepted_per_call.push(after.accepted - before.accepted);
        answer_tokens.push(got["usage"]["completion_tokens"].as_u64().unwrap());
    }
    // The second round asks the first round's messages again: each answer
    // equals one given before, so most of it is drafted and accepted.
    let first: u64 = accepted_per_call[..MESSAGES.len()].iter().sum();
    let second: u64 = accepted_per_call[MESSAGES.len()..].iter().sum();
    let repeated: u64 = answer_tokens[MESSAGES.len()..].iter().sum();
    assert!(repeated > 2 * MESSAGES.len() as u64, "the answers are too short to draft: {answer_tokens:?}");
    assert!(second > first, "accepted draft tokens: {accepted_per_call:?}");
    assert!(
        2 * second >= repeated,
        "repeated answers of {answer_tokens:?} tokens had only {accepted_per_call:?} accepted draft tokens"
    );
}

/// `response_format` json_schema with four string keys.
fn schema_body(message: &str) -> Value {
    let string = json!({"type": "string"});
    json!({"messages": [{"role": "system", "content": INSTRUCTIONS[0]}, {"role": "user", "content": message}],
        "temperature": 0, "max_tokens": 40, "logprobs": true,
        "response_format": {"type": "json_schema", "json_schema": {"name": "sms", "schema": {"type": "object",
            "required": ["a", "b", "c", "d"], "additionalProperties": false,
            "properties": {"a": string, "b": string, "c": string, "d": string}}}}})
}

/// A schema call's answer, token by token, or its error.
async fn schema_answer(model: &LlamaCppModel, message: &str) -> Result<(String, Vec<Value>, Value, Value), String> {
    let completion = model.chat(request(schema_body(message))).await.map_err(|error| error.to_string())?;
    let completion: Value = serde_json::from_slice(&completion.body).unwrap();
    let (tokens, finish, counts) = greedy_tokens(&completion);
    Ok((content(&completion), tokens, finish, counts))
}

/// Messages for the schema calls: the random model writes a quote (and
/// so closes a value) after some of them, and a control character (off the
/// schema: the call fails) after others.
fn schema_messages() -> Vec<String> {
    let words = ["Tom", "call 555-0199", "\"quoted\"", "WIN!!", "Lunch at 12?", "a, b", "ok", "Mill"];
    (0..48).map(|idx| format!("{} {idx} {}", words[idx % words.len()], words[(idx * 5 + 3) % words.len()])).collect()
}

#[tokio::test]
async fn jump_forward_gives_the_tokens_of_decoding_the_schema_token_by_token() {
    let dir = tempfile::tempdir().unwrap();
    // Of seeds 1 to 7, the one whose greedy answers close values most
    // (33 of 48 here; most others write a control character first).
    let path = dir.path().join("schema.gguf");
    write_tiny_llama(&path, &TinyLlama { seed: 5, ..tiny_shape() }).unwrap();
    let load_jumping = |jump_forward: bool, speculative_draft: usize| {
        LlamaCppModel::load(&spec(&path, None), &EngineOptions { jump_forward, speculative_draft, ..options() })
            .unwrap()
    };
    // The reference: the schema's fixed tokens decoded one per step, no drafts.
    let token_by_token = load_jumping(false, 0);
    let messages = schema_messages();
    let mut expected = Vec::new();
    for message in &messages {
        expected.push(schema_answer(&token_by_token, message).await);
    }
    // The random model writes quotes now and then: some answers close a
    // value mid-answer, so the separator after it is jumped over too.
    let closed_a_value = expected.iter().flatten().filter(|(text, ..)| text.contains("\",\"")).count();
    let failed = expected.iter().filter(|answer| answer.is_err()).count();
    eprintln!("{closed_a_value} of {} answers closed a value, {failed} failed", expected.len());
    assert!(closed_a_value > 0, "no answer closed a value: {expected:?}");
    for (answer, message) in expected.iter().zip(&messages) {
        if let Ok((text, tokens, finish, counts)) = answer {
            assert!(text.starts_with("{\"a\":\""), "{text:?}");
            assert_eq!(counts[1].as_u64().unwrap() as usize, tokens.len(), "{message:?}");
            if finish == "stop" {
                let object: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
                assert_eq!(object.keys().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
            }
        }
    }
    // Jump-forward, without and with drafts, one call at a time and all at once.
    for speculative_draft in [0, 8] {
        let jumping = load_jumping(true, speculative_draft);
        for (message, want) in messages.iter().zip(&expected) {
            assert_eq!(&schema_answer(&jumping, message).await, want, "{message:?}, draft {speculative_draft}");
        }
        let together = futures::future::join_all(messages.iter().map(|message| schema_answer(&jumping, message))).await;
        assert_eq!(together, expected, "all at once, draft {speculative_draft}");
    }
}

#[tokio::test]
async fn unsupported_schemas_and_answers_off_the_schema_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_model_file(dir.path()));
    let mut body = schema_body("hello");
    body["response_format"]["json_schema"]["schema"]["properties"]["a"] = json!({"type": "array"});
    let error = error_message(model.chat(request(body)).await.unwrap_err());
    assert!(error.contains("not array"), "{error}");
    // A boolean the random model does not start with `t` or `f`: the call
    // fails (the gateway falls back to the lead) instead of answering off the schema.
    let mut body = schema_body("hello");
    body["response_format"]["json_schema"]["schema"]["properties"]["a"] = json!({"type": "boolean"});
    let error = model.chat(request(body)).await.unwrap_err().to_string();
    assert!(error.contains("JSON schema"), "{error}");
}
