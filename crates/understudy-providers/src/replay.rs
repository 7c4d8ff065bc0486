//! The replay provider: answers from a JSONL file of recorded calls.
//!
//! It stands in for a cloud model in demos, tests and benchmarks, and lets a
//! team re-run its logged traffic without paying for it twice. A request is
//! matched to a recording by its messages, compared after whitespace
//! normalization; the last recording of the same messages wins.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use understudy_config::ReplayProviderConfig;
use understudy_datasets::jsonl::{prompt_key, usage_json, ChatExample};
use understudy_types::Usage;

use crate::{tokens, ChatRequest, EmbeddingRequest, Provider, ProviderError, ProviderResponse, StreamResponse};

#[derive(Debug)]
pub struct ReplayProvider {
    name: String,
    file: PathBuf,
    answers: HashMap<String, Recording>,
    n_recordings: usize,
}

#[derive(Debug)]
struct Recording {
    answer: Map<String, Value>,
    usage: Option<Usage>,
}

impl ReplayProvider {
    /// Loads every recording; a missing file or a malformed line is an error
    /// that names the file and the line.
    pub fn load(name: &str, config: &ReplayProviderConfig) -> Result<ReplayProvider, ProviderError> {
        let setup_error = |message: String| ProviderError::Setup { provider: name.to_string(), message };
        let file = std::fs::File::open(&config.file)
            .map_err(|error| setup_error(format!("cannot open {}: {error}", config.file.display())))?;
        let mut answers = HashMap::new();
        let mut n_recordings = 0;
        for (line_idx, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|error| setup_error(format!("cannot read {}: {error}", config.file.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            let example = ChatExample::parse(&line)
                .map_err(|error| setup_error(format!("{}:{}: {error}", config.file.display(), line_idx + 1)))?;
            n_recordings += 1;
            answers.insert(prompt_key(&example.prompt), Recording { answer: example.answer, usage: example.usage });
        }
        Ok(ReplayProvider { name: name.to_string(), file: config.file.clone(), answers, n_recordings })
    }

    pub fn n_recordings(&self) -> usize {
        self.n_recordings
    }

    fn find(&self, request: &ChatRequest) -> Result<(&Recording, Vec<Value>), ProviderError> {
        let messages = request.body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
        match self.answers.get(&prompt_key(&messages)) {
            Some(recording) => Ok((recording, messages)),
            None => Err(ProviderError::ReplayNoMatch {
                provider: self.name.clone(),
                n_recordings: self.n_recordings,
                file: self.file.display().to_string(),
            }),
        }
    }

    fn usage(recording: &Recording, messages: &[Value]) -> Usage {
        recording.usage.unwrap_or_else(|| Usage {
            prompt_tokens: tokens::count_messages(messages),
            completion_tokens: tokens::count_answer(&Value::Object(recording.answer.clone())),
        })
    }
}

fn model_of(request: &ChatRequest) -> Value {
    request.body.get("model").cloned().unwrap_or(Value::Null)
}

fn completion_id() -> String {
    format!("chatcmpl-replay-{}", uuid::Uuid::now_v7().simple())
}

fn finish_reason(answer: &Map<String, Value>) -> &'static str {
    if answer.contains_key("tool_calls") {
        "tool_calls"
    } else {
        "stop"
    }
}

impl Provider for ReplayProvider {
    const PROVIDER_TYPE: &'static str = "replay";

    async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let (recording, messages) = self.find(&request)?;
        let usage = Self::usage(recording, &messages);
        let body = json!({
            "id": completion_id(),
            "object": "chat.completion",
            "created": time::OffsetDateTime::now_utc().unix_timestamp(),
            "model": model_of(&request),
            "choices": [{
                "index": 0,
                "message": recording.answer,
                "logprobs": null,
                "finish_reason": finish_reason(&recording.answer),
            }],
            "usage": usage_json(usage),
        });
        Ok(ProviderResponse {
            body: Bytes::from(body.to_string()),
            usage: Some(usage),
            headers: Default::default(),
            compute: None,
        })
    }

    async fn infer_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        let (recording, messages) = self.find(&request)?;
        let usage = Self::usage(recording, &messages);
        let id = completion_id();
        let created = time::OffsetDateTime::now_utc().unix_timestamp();
        let model = model_of(&request);
        let chunk = |choices: Value, usage: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices, "usage": usage,
            })
            .to_string()
        };
        let mut delta = recording.answer.clone();
        delta.insert("role".into(), Value::String("assistant".into()));
        let chunks = vec![
            chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]), Value::Null),
            chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&recording.answer)}]),
                Value::Null,
            ),
            chunk(json!([]), usage_json(usage)),
        ];
        Ok(StreamResponse::of_chunks(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn embed(&self, _request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        Err(ProviderError::Unsupported {
            provider: self.name.clone(),
            provider_type: Self::PROVIDER_TYPE,
            what: "embeddings",
        })
    }
}
