#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The real SmolLM2-135M-Instruct (Q4_1 GGUF). The model is found under
//! `UNDERSTUDY_MODELS_DIR` (scripts/test.sh sets it and fetches the model);
//! without it the tests are skipped with a message, unless `CI` is set, where
//! they fail.
//!
//!   UNDERSTUDY_MODELS_DIR=~/.cache/understudy/models cargo test -p understudy-engine --test smollm2

use std::path::PathBuf;

use serde_json::{json, Value};
use understudy_engine::requant::WeightFormat;
use understudy_engine::schema::{ObjectSchema, SchemaAnswer};
use understudy_engine::testing::{extraction_messages, extraction_schema_format};
use understudy_engine::{EngineOptions, LlamaCppModel};
use understudy_providers::local::{confidence_of, LocalModel, LocalModelSpec};
use understudy_providers::ChatRequest;

fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("UNDERSTUDY_MODELS_DIR") {
        Some(dir) => {
            let path = PathBuf::from(dir).join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
            assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh", path.display());
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("CI is set but UNDERSTUDY_MODELS_DIR is not: the real-model tests must run in CI")
        }
        None => {
            eprintln!("skipped: set UNDERSTUDY_MODELS_DIR (scripts/test.sh does) to run the SmolLM2 tests");
            None
        }
    }
}

fn load(path: &std::path::Path) -> LlamaCppModel {
    load_as(path, WeightFormat::default())
}

fn load_as(path: &std::path::Path, weights: WeightFormat) -> LlamaCppModel {
    let spec = LocalModelSpec {
        name: "smollm2".into(),
        path: path.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    LlamaCppModel::load(&spec, &EngineOptions { n_ctx: 2048, weights, ..EngineOptions::default() }).unwrap()
}

async fn chat(model: &LlamaCppModel, body: Value) -> Value {
    let request = ChatRequest { body: body.as_object().unwrap().clone() };
    serde_json::from_slice(&model.chat(request).await.unwrap().body).unwrap()
}

#[tokio::test]
async fn smollm2_knows_the_capital_of_france() {
    let Some(path) = smollm2() else { return };
    // By default the Q4_1 file is served from its Q8_0 copy (batched products
    // are fast on Q8_0); as stored, from the file itself. Both know Paris.
    let served = load(&path);
    let stored = load_as(&path, WeightFormat::AsStored);
    assert_eq!(stored.gguf_path(), path.as_path());
    assert!(served.gguf_path().to_string_lossy().ends_with(".q8_0.gguf"), "{}", served.gguf_path().display());
    let (q8_bytes, q4_bytes) = (served.llama_model().size(), stored.llama_model().size());
    assert!(q8_bytes > q4_bytes * 13 / 10 && q8_bytes < q4_bytes * 2, "Q8_0 {q8_bytes} B against Q4_1 {q4_bytes} B");
    for model in [&served, &stored] {
        let completion = chat(
            model,
            json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0, "max_tokens": 40}),
        )
        .await;
        let answer = completion.pointer("/choices/0/message/content").unwrap().as_str().unwrap();
        assert!(answer.contains("Paris"), "{}: {answer:?}", model.gguf_path().display());
    }
}

#[tokio::test]
async fn smollm2_served_as_iq4_nl_is_smaller_and_still_knows_paris() {
    let Some(path) = smollm2() else { return };
    // IQ4_NL: a lossy re-quantization (4.5 bits per weight) that llama.cpp
    // repacks for AVX2/AVX-512 kernels; smaller than the Q4_1 file.
    let small = load_as(&path, WeightFormat::Iq4Nl);
    let stored = load_as(&path, WeightFormat::AsStored);
    assert!(small.gguf_path().to_string_lossy().ends_with(".iq4_nl.gguf"), "{}", small.gguf_path().display());
    assert!(small.llama_model().size() < stored.llama_model().size());
    let completion = chat(
        &small,
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 40}),
    )
    .await;
    let answer = completion.pointer("/choices/0/message/content").unwrap().as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
}

#[tokio::test]
async fn smollm2_picks_a_label_from_the_allowed_ones() {
    let Some(path) = smollm2() else { return };
    let model = load(&path);
    let labels = ["positive", "negative"];
    let format = json!({"type": "json_schema", "json_schema": {"name": "sentiment", "schema": {"enum": labels}}});
    let mut answers = Vec::new();
    for review in ["I loved this film, it was wonderful and moving.", "Terrible. A boring, awful waste of time."] {
        let completion = chat(
            &model,
            json!({"messages": [
                {"role": "system", "content": "Classify the sentiment of the review as positive or negative."},
                {"role": "user", "content": review}],
                "temperature": 0, "response_format": format, "logprobs": true}),
        )
        .await;
        let answer = completion.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string();
        assert!(labels.contains(&answer.as_str()), "{answer:?}");
        let confidence = confidence_of(&completion).unwrap();
        assert!(confidence >= 0.5 && confidence <= 1.0, "{confidence}");
        answers.push(answer);
    }
    assert_eq!(answers, vec!["positive", "negative"]);
}

/// Both with kept prompt prefixes: asked the same calls in the same order,
/// two models reuse the same prefixes, so only the drafts differ. (On the
/// Q8_0 weights, prefilling a prompt in full or after a kept prefix, like
/// batching calls together, moves logprobs by up to about 0.2 and can flip
/// a near tie; tests/tiny.rs compares kept prefixes with full prefills on
/// f32 weights, where the tokens must be the same.)
fn load_with_draft(path: &std::path::Path, speculative_draft: usize) -> LlamaCppModel {
    let spec = LocalModelSpec {
        name: "smollm2".into(),
        path: path.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    LlamaCppModel::load(
        &spec,
        &EngineOptions { n_ctx: 2048, n_seq_max: 4, speculative_draft, prefix_cache: true, ..EngineOptions::default() },
    )
    .unwrap()
}

/// JSON extraction prompts: the answer copies values from the message.
fn extraction_body(sms: &str) -> Value {
    json!({"messages": [
        {"role": "system", "content": "Extract the sender's name, phone number, date and place from the SMS. \
            Answer with JSON only, with the keys name, phone, date and place."},
        {"role": "user", "content": "SMS: Hi, it's Tom Baker. Meet me on June 3 at Central Station, call 555-0199."},
        {"role": "assistant", "content": "{\"name\": \"Tom Baker\", \"phone\": \"555-0199\", \"date\": \"June 3\", \"place\": \"Central Station\"}"},
        {"role": "user", "content": format!("SMS: {sms}")}],
        "temperature": 0, "max_tokens": 60, "logprobs": true})
}

const SMS: [&str; 4] = [
    "Hello, this is Maria Lopez from Bright Smile Dental. Your visit is on March 14 at 221 Oak Street. Call 555-0142.",
    "Hey it's Sam Ortiz, the party moved to Friday May 9 at the Blue Door Cafe. Text me at 555-0177.",
    "Reminder from Dr. Alan Chu: appointment on October 2 at Riverside Clinic, questions to 555-0123.",
    "This is Priya Nair. Pick up your parcel on July 21 at the Elm Road post office, or ring 555-0188.",
];

fn answer_tokens(completion: &Value) -> (String, Vec<Value>, Value) {
    let content = completion.pointer("/choices/0/message/content").unwrap().as_str().unwrap().to_string();
    let tokens = completion.pointer("/choices/0/logprobs/content").unwrap().as_array().unwrap();
    // The token counts; how many prompt tokens came from a kept prefix
    // depends on what the model was asked before.
    let usage = &completion["usage"];
    let counts = json!([usage["prompt_tokens"], usage["completion_tokens"]]);
    (content, tokens.iter().map(|entry| entry["bytes"].clone()).collect(), counts)
}

#[tokio::test]
async fn smollm2_speculative_decoding_and_kept_prefixes_give_exactly_the_greedy_tokens() {
    let Some(path) = smollm2() else { return };
    let plain = load_with_draft(&path, 0);
    let speculative = load_with_draft(&path, 8);
    let mut alone = Vec::new();
    let mut cached = Vec::new();
    for sms in SMS {
        let expected = answer_tokens(&chat(&plain, extraction_body(sms)).await);
        let completion = chat(&speculative, extraction_body(sms)).await;
        cached.push(completion.pointer("/usage/prompt_tokens_details/cached_tokens").unwrap().as_u64().unwrap());
        let got = answer_tokens(&completion);
        assert_eq!(got, expected, "{sms:?}");
        assert!(expected.0.contains("555-01"), "the answer should copy the phone number: {:?}", expected.0);
        alone.push(expected);
    }
    let stats = speculative.speculation_stats();
    eprintln!("{stats:?}; first answer {:?}", alone[0].0);
    assert!(stats.accepted > 0, "no draft token was ever accepted: {stats:?}");
    assert_eq!(plain.speculation_stats(), Default::default());
    // After the first call, the instruction and the worked example (about
    // 90 tokens) come from the kept prefix.
    assert_eq!(cached[0], 0);
    assert!(cached[1..].iter().all(|&n| n >= 60), "cached prompt tokens per call: {cached:?}");

    // All four at once: four sequences, each with its own drafts, in one batch.
    let together = futures::future::join_all(SMS.iter().map(|sms| chat(&speculative, extraction_body(sms)))).await;
    let together: Vec<_> = together.iter().map(answer_tokens).collect();
    assert_eq!(together, alone);
    assert!(speculative.speculation_stats().accepted > stats.accepted);
}

#[tokio::test]
async fn smollm2_json_object_answers_end_at_the_closing_brace() {
    let Some(path) = smollm2() else { return };
    let model = load_with_draft(&path, 8);
    for sms in SMS {
        let text = chat(&model, extraction_body(sms)).await;
        let mut body = extraction_body(sms);
        body["response_format"] = json!({"type": "json_object"});
        let object = chat(&model, body).await;
        let (text_answer, object_answer) = (answer_tokens(&text), answer_tokens(&object));
        // The same greedy tokens up to the object's end, which is the answer's end.
        let value: Value = serde_json::from_str(&object_answer.0).unwrap();
        assert!(value.is_object(), "{value}");
        assert!(text_answer.0.starts_with(&object_answer.0), "{:?} against {:?}", text_answer.0, object_answer.0);
        assert_eq!(object.pointer("/choices/0/finish_reason").unwrap(), "stop");
        assert_eq!(object_answer.1, text_answer.1[..object_answer.1.len()]);
    }
}

/// The extraction prompt with a compact worked example (as a lead answering
/// under a JSON schema writes it), plain or with the schema of its four keys.
fn compact_extraction_body(sms: &str, schema: bool) -> Value {
    let mut body = json!({"messages": extraction_messages(sms), "temperature": 0, "max_tokens": 60, "logprobs": true});
    if schema {
        body["response_format"] = extraction_schema_format();
    }
    body
}

/// The four keys' schema, as the engine reads it.
fn extraction_schema() -> std::sync::Arc<ObjectSchema> {
    let body = compact_extraction_body("", true);
    std::sync::Arc::new(ObjectSchema::from_json(&body["response_format"]["json_schema"]["schema"]).unwrap())
}

/// How many of an answer's tokens (their bytes) follow the schema.
fn tokens_on_schema(tokens: &[Value]) -> usize {
    let mut answer = SchemaAnswer::new(extraction_schema());
    for (idx, token) in tokens.iter().enumerate() {
        let bytes: Vec<u8> = token.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        if answer.feed(&bytes).is_err() {
            return idx;
        }
    }
    tokens.len()
}

#[tokio::test]
async fn smollm2_jump_forward_under_a_schema_gives_exactly_the_plain_greedy_tokens() {
    let Some(path) = smollm2() else { return };
    // Plain greedy: no drafts, no schema. Jump-forward: the defaults (drafts, kept prefixes) and the schema.
    let plain = load_with_draft(&path, 0);
    let jumping = load_with_draft(&path, 8);
    let mut expected = Vec::new();
    let mut followed = 0;
    for sms in SMS {
        let want = answer_tokens(&chat(&plain, compact_extraction_body(sms, false)).await);
        let got = answer_tokens(&chat(&jumping, compact_extraction_body(sms, true)).await);
        let on_schema = tokens_on_schema(&want.1);
        if on_schema == want.1.len() {
            // Where plain greedy writes the schema's answer, the same text,
            // the same tokens (the fixed text tokenizes as the model writes
            // it) and the same counts.
            assert_eq!(got, want, "{sms:?}");
            followed += 1;
        } else {
            // Where it leaves the schema (another key), the same tokens up
            // to there, then the schema's.
            assert_eq!(got.1[..on_schema], want.1[..on_schema], "{sms:?}");
            assert_eq!(tokens_on_schema(&got.1), got.1.len(), "{:?}", got.0);
            let object: serde_json::Map<String, Value> = serde_json::from_str(&got.0).unwrap();
            assert_eq!(object.keys().collect::<Vec<_>>(), ["name", "phone", "date", "place"]);
        }
        expected.push(got);
    }
    assert!(followed >= 3, "plain greedy followed the schema in only {followed} of {} answers", SMS.len());
    let together =
        futures::future::join_all(SMS.iter().map(|sms| chat(&jumping, compact_extraction_body(sms, true)))).await;
    let together: Vec<_> = together.iter().map(answer_tokens).collect();
    assert_eq!(together, expected);
}
