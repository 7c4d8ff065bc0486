//! The real SmolLM2 (GGUF, llama.cpp engine) and MiniLM behind a gateway on
//! a real socket: as plain `local` models, and SmolLM2 as the understudy of a
//! label task, whose labels constrain its decoding.
//!
//!   UNDERSTUDY_MODELS_DIR=~/.cache/understudy/models cargo test -p understudy-local --test gateway

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{models_dir, Gateway};
use futures::StreamExt;
use serde_json::{json, Value};

fn local_models(models: &std::path::Path) -> String {
    format!(
        r#"
[providers.local]
type = "local"
machine_price_per_hour = 0.10

[models.smollm2]
provider = "local"
path = "{smollm2}"

[models.minilm]
provider = "local"
path = "{minilm}"
"#,
        smollm2 = models.join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf").display(),
        minilm = models.join("all-MiniLM-L6-v2").display(),
    )
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// The `data:` payloads of an SSE body, in order.
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|event| event.trim().strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test]
async fn local_gguf_and_encoder_models_serve_openai_requests() {
    let Some(models) = models_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &local_models(&models)).await;

    // /v1/models lists both.
    let listed: Value = gateway.client.get(gateway.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|model| model["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"smollm2") && ids.contains(&"minilm"), "{listed}");

    // A complete answer.
    let (status, answer) = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "messages": user("What is the capital of France?"),
                "temperature": 0, "max_tokens": 40}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert!(answer.pointer("/choices/0/message/content").unwrap().as_str().unwrap().contains("Paris"), "{answer}");
    assert!(answer.pointer("/usage/completion_tokens").unwrap().as_u64().unwrap() > 0);

    // A streamed one: chunks, the usage chunk (asked for), then [DONE].
    let response = gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .json(&json!({"model": "smollm2", "messages": user("What is the capital of France?"), "temperature": 0,
            "max_tokens": 40, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let payloads = sse_payloads(&response.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "{payloads:?}");
    let chunks: Vec<Value> =
        payloads[..payloads.len() - 1].iter().map(|payload| serde_json::from_str(payload).unwrap()).collect();
    assert!(chunks.iter().all(|chunk| chunk["object"] == "chat.completion.chunk"));
    let text: String =
        chunks.iter().filter_map(|chunk| chunk.pointer("/choices/0/delta/content").and_then(Value::as_str)).collect();
    assert!(text.contains("Paris"), "{text:?}");
    assert!(chunks.len() > 3, "the answer came in several chunks: {}", chunks.len());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "the last chunk carries usage: {usage}");
    assert!(usage.pointer("/usage/completion_tokens").unwrap().as_u64().unwrap() > 0);

    // A prompt longer than the context, streamed or not: a 400 that says so.
    let long = "word ".repeat(5000);
    for stream in [false, true] {
        let (status, error) = gateway
            .post("/v1/chat/completions", &json!({"model": "smollm2", "messages": user(&long), "stream": stream}))
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error.pointer("/error/type").unwrap(), "invalid_request_error", "{error}");
        let message = error.pointer("/error/message").unwrap().as_str().unwrap();
        assert!(message.contains("prompt has") && message.contains("context is"), "{message}");
    }

    // Sampling values out of range: a 400 naming the value.
    for (field, value) in [("temperature", json!(-1)), ("top_p", json!(2)), ("temperature", json!("hot"))] {
        let mut body = json!({"model": "smollm2", "messages": user("hi")});
        body[field] = value;
        let (status, error) = gateway.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{error}");
        assert!(error.pointer("/error/message").unwrap().as_str().unwrap().contains(field), "{error}");
    }

    // Embeddings: one L2-normalized vector per input.
    let (status, embedded) = gateway
        .post("/v1/embeddings", &json!({"model": "minilm", "input": ["How do I reset my password?", "Hello"]}))
        .await;
    assert_eq!(status, 200, "{embedded}");
    let data = embedded["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for item in data {
        let vector: Vec<f64> = item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(vector.len(), 384);
        let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }

    // Clients that leave mid-stream free their sequences: more of them than
    // the engine has sequences (8), each asking for far more tokens than it
    // reads, and a request after them still completes.
    let long_answer = json!({"model": "smollm2", "messages": user("Write a very long story about a dragon."),
        "temperature": 0, "max_tokens": 3000, "stream": true});
    for _ in 0..9 {
        let response =
            gateway.client.post(gateway.url("/v1/chat/completions")).json(&long_answer).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "), "{first:?}");
        drop(body);
    }
    let (status, answer) = gateway
        .post("/v1/chat/completions", &json!({"model": "smollm2", "messages": user("Say hi."), "max_tokens": 8}))
        .await;
    assert_eq!(status, 200, "{answer}");

    let calls = gateway.finish().await;
    let abandoned: Vec<_> = calls.iter().filter(|call| call.status == 499).collect();
    assert_eq!(abandoned.len(), 9, "every stream the client left is recorded as such");
    for call in abandoned {
        let completion: Value = serde_json::from_str(call.response.as_deref().unwrap()).unwrap();
        assert!(
            completion.pointer("/choices/0/finish_reason").is_none_or(Value::is_null),
            "the gateway stopped reading when the client left, not at the end of the answer: {completion}"
        );
        assert!(call.usage.completion_tokens < 3000, "{:?}", call.usage);
    }
    assert!(calls.iter().any(|call| call.endpoint.as_str() == "embeddings" && call.status == 200));
}

/// What the official Python client sends by default (`encoding_format:
/// "base64"`) decodes to the vector a float request gets; `dimensions`
/// shortens and re-normalizes; the call's id comes back in a header.
#[tokio::test]
async fn local_embeddings_answer_base64_and_dimensions_like_openai() {
    use base64::Engine;
    let Some(models) = models_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[providers.local]\ntype = \"local\"\n\n[models.minilm]\nprovider = \"local\"\npath = \"{}\"\n",
        models.join("all-MiniLM-L6-v2").display()
    );
    let gateway = Gateway::start(dir.path(), &config).await;
    let input = json!(["How do I reset my password?", "Hello"]);
    let floats_of = |item: &Value| -> Vec<f32> {
        item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };

    let response = gateway
        .client
        .post(gateway.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": input, "encoding_format": "float"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let call_id = response.headers().get("x-understudy-call-id").expect("the call's id").to_str().unwrap().to_string();
    let floats: Value = response.json().await.unwrap();

    let (status, encoded) =
        gateway.post("/v1/embeddings", &json!({"model": "minilm", "input": input, "encoding_format": "base64"})).await;
    assert_eq!(status, 200, "{encoded}");
    for (float_item, encoded_item) in floats["data"].as_array().unwrap().iter().zip(encoded["data"].as_array().unwrap())
    {
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(encoded_item["embedding"].as_str().unwrap()).unwrap();
        let decoded: Vec<f32> =
            bytes.chunks_exact(4).map(|four| f32::from_le_bytes([four[0], four[1], four[2], four[3]])).collect();
        assert_eq!(decoded, floats_of(float_item));
        assert_eq!(decoded.len(), 384);
    }

    // `dimensions`: the first N values of the full vector, normalized again.
    let (status, short) =
        gateway.post("/v1/embeddings", &json!({"model": "minilm", "input": input, "dimensions": 64})).await;
    assert_eq!(status, 200, "{short}");
    for (full_item, short_item) in floats["data"].as_array().unwrap().iter().zip(short["data"].as_array().unwrap()) {
        let (full, short) = (floats_of(full_item), floats_of(short_item));
        assert_eq!(short.len(), 64);
        let norm = full[..64].iter().map(|x| x * x).sum::<f32>().sqrt();
        for (short_value, full_value) in short.iter().zip(&full[..64]) {
            assert!((short_value - full_value / norm).abs() < 1e-6, "{short_value} vs {}", full_value / norm);
        }
    }

    // Bad values are 400s naming the field, and recorded.
    for (field, value) in [
        ("dimensions", json!(0)),
        ("dimensions", json!(385)),
        ("dimensions", json!(1.5)),
        ("encoding_format", json!("int8")),
    ] {
        let mut body = json!({"model": "minilm", "input": "hi"});
        body[field] = value;
        let (status, error) = gateway.post("/v1/embeddings", &body).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], field, "{error}");
    }

    let calls = gateway.finish().await;
    assert_eq!(calls.len(), 7);
    assert!(calls.iter().any(|call| call.id.to_string() == call_id && call.status == 200));
    assert_eq!(calls.iter().filter(|call| call.status == 400).count(), 4);
}

/// SmolLM2 as the understudy of a task with labels: the gateway asks it to
/// decode only the labels, so with policy `understudy` every answer is one
/// of them and the understudy serves every call (an answer outside the
/// labels would fall back to the lead, a replay that knows none of these
/// questions).
#[tokio::test]
async fn a_task_s_labels_constrain_a_local_understudy() {
    let Some(models) = models_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lead.jsonl"), "").unwrap();
    let config = format!(
        r#"{local}
[providers.recorded]
type = "replay"
file = "lead.jsonl"

[models.lead]
provider = "recorded"
input_per_million = 1.0
output_per_million = 1.0

[tasks.qtype]
lead = "lead"
understudy = "smollm2"
policy = "understudy"
labels = ["LOCATION", "PERSON", "NUMBER"]
understudy_timeout_ms = 600000
audit_rate = 0.0
"#,
        local = local_models(&models)
    );
    let gateway = Gateway::start(dir.path(), &config).await;
    let system = "What does the question ask for? Answer with one word.";
    let questions = [
        "Where is the Eiffel Tower?",
        "Who wrote Hamlet?",
        "How many legs does a spider have?",
        "Which river flows through Cairo?",
        "Who painted the Mona Lisa?",
        "What year did the Berlin Wall fall?",
    ];
    for (index, question) in questions.iter().enumerate() {
        // Sampled at temperature 1, so the constraint, not luck, keeps it on the labels.
        let body = json!({"model": "task:qtype", "temperature": 1, "seed": index,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]});
        let (status, answer) = gateway.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model"], "smollm2", "the understudy served: {answer}");
        let content = answer.pointer("/choices/0/message/content").unwrap().as_str().unwrap();
        assert!(["LOCATION", "PERSON", "NUMBER"].contains(&content), "{content:?}");
    }
    // A client's own response_format wins over the task's labels: these
    // answers are not labels, so the lead is asked (and has no answer).
    let body = json!({"model": "task:qtype", "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": questions[0]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "yn",
            "schema": {"type": "string", "enum": ["yes", "no"]}}}});
    let (status, _) = gateway.post("/v1/chat/completions", &body).await;
    assert_ne!(status, 200);

    let calls = gateway.finish().await;
    let served: Vec<_> = calls
        .iter()
        .filter_map(|call| call.routing.as_ref())
        .filter(|routing| routing.served_by.as_str() == "understudy")
        .collect();
    assert_eq!(served.len(), questions.len());
    for routing in served {
        let confidence = routing.understudy_confidence.unwrap();
        assert!(confidence > 0.0 && confidence <= 1.0, "{confidence}");
    }
    let fallback = calls.iter().find_map(|call| call.routing.as_ref()?.fallback_reason.clone());
    assert_eq!(fallback.as_deref(), Some("invalid_answer"));
}

/// The official Python client asks for embeddings in its default encoding
/// (base64) and gets MiniLM's vectors, the same as a float request's; the
/// record keeps the client's request (issue 16's compatibility suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_gets_local_embeddings_in_its_default_encoding() {
    let Some(models) = models_dir() else { return };
    let Some(python) = std::env::var_os("UNDERSTUDY_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_PYTHON (scripts/test.sh does)");
        eprintln!("skipped: set UNDERSTUDY_PYTHON to a Python with the openai package");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[providers.local]\ntype = \"local\"\n\n[models.minilm]\nprovider = \"local\"\npath = \"{}\"\n",
        models.join("all-MiniLM-L6-v2").display()
    );
    let gateway = Gateway::start(dir.path(), &config).await;
    let input = json!(["How do I reset my password?", "Hello"]);
    let (status, floats) =
        gateway.post("/v1/embeddings", &json!({"model": "minilm", "input": input, "encoding_format": "float"})).await;
    assert_eq!(status, 200, "{floats}");
    let script = "import json, sys, openai\n\
        client = openai.OpenAI(base_url=sys.argv[1], api_key='client-side-key', max_retries=0)\n\
        answer = client.embeddings.create(model='minilm', input=json.loads(sys.argv[2]))\n\
        print(json.dumps([item.embedding for item in answer.data]))\n";
    let mut command = std::process::Command::new(python);
    command.arg("-c").arg(script).arg(gateway.url("/v1")).arg(input.to_string());
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("python runs");
    assert!(output.status.success(), "the client failed: {}", String::from_utf8_lossy(&output.stderr));
    let vectors: Vec<Vec<f64>> = serde_json::from_slice(&output.stdout).expect("the vectors as JSON");
    assert_eq!(vectors.len(), 2);
    for (vector, float_item) in vectors.iter().zip(floats["data"].as_array().unwrap()) {
        let expected: Vec<f32> =
            float_item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got: Vec<f32> = vector.iter().map(|x| *x as f32).collect();
        assert_eq!(got, expected, "the base64 vector decodes to the float one");
    }
    let calls = gateway.finish().await;
    assert_eq!(calls.len(), 2);
    let client_call = calls.iter().find(|call| call.request.contains("base64")).expect("the client's call, as sent");
    assert_eq!((client_call.status, client_call.model.as_str()), (200, "minilm"));
}
