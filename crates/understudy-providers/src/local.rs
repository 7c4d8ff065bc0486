//! The `local` provider: models that run in this process, on this machine.
//!
//! This crate carries no ML stack. The models themselves (the llama.cpp
//! engine, candle classifiers and encoders) implement [`LocalModel`] in their
//! own crates, and the binary hands the gateway a [`LocalLoader`] that builds
//! them from a path. The gateway and its tests therefore build without candle.
//!
//! A local model answers in the OpenAI shapes. A chat answer carries
//! `choices[0].logprobs.content` when it can, so that the router can read a
//! confidence from it the same way it would from a remote understudy.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use understudy_config::{LocalProviderConfig, ModelConfig};

use crate::{ChatRequest, ChunkStream, EmbeddingRequest, ProviderError, ProviderResponse, StreamResponse};

/// What to load: a configured local model, or a trained model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModelSpec {
    /// The name requests use for it (the `model` field the provider receives).
    pub name: String,
    /// A GGUF file, an HF directory, a classifier directory, or `hf:org/name`.
    pub path: String,
    /// A PEFT LoRA adapter directory to apply on top, for causal LMs.
    pub adapter: Option<PathBuf>,
    /// How a causal LM's GGUF weights are served (`auto`, `as-stored`,
    /// `q8_0`, `q4_0`, `iq4_nl`); `None` is `auto`.
    pub weights: Option<String>,
    /// The most concurrent requests a classifier or encoder answers in one
    /// forward pass; `None` is [`understudy_config::DEFAULT_LOCAL_MAX_BATCH`].
    pub max_batch: Option<usize>,
    /// The most draft tokens a causal LM verifies per decode step for a
    /// greedy request (0: none); `None` is
    /// [`understudy_config::DEFAULT_SPECULATIVE_DRAFT`].
    pub speculative_draft: Option<usize>,
}

impl LocalModelSpec {
    /// A spec with the defaults: no adapter, weights as `auto`, the default batch.
    pub fn new(name: impl Into<String>, path: impl Into<String>) -> LocalModelSpec {
        LocalModelSpec {
            name: name.into(),
            path: path.into(),
            adapter: None,
            weights: None,
            max_batch: None,
            speculative_draft: None,
        }
    }

    /// The batch size this spec asks for, with the default filled in.
    pub fn max_batch(&self) -> usize {
        self.max_batch.unwrap_or(understudy_config::DEFAULT_LOCAL_MAX_BATCH).max(1)
    }

    /// The draft length this spec asks for, with the default filled in.
    pub fn speculative_draft(&self) -> usize {
        self.speculative_draft.unwrap_or(understudy_config::DEFAULT_SPECULATIVE_DRAFT)
    }
}

/// A model running in this process.
pub trait LocalModel: Send + Sync + Debug {
    /// A complete chat completion (an OpenAI `chat.completion` body).
    /// Invalid requests (sampling values out of range, a prompt longer than
    /// the context) fail with [`ProviderError::invalid_request`].
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>>;

    /// A streamed chat completion, as `chat.completion.chunk` payloads. The
    /// default streams the complete answer as one chunk, then `usage`.
    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            let response = self.chat(request).await?;
            let chunks = chunks_of_completion(&response.body)?;
            let stream: ChunkStream = Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)));
            Ok(stream)
        })
    }

    /// Embeddings (an OpenAI `list` of `embedding` objects).
    fn embed(&self, request: EmbeddingRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        let _ = request;
        Box::pin(async move {
            Err(ProviderError::Unsupported {
                provider: self.kind().to_string(),
                provider_type: "local",
                what: "embeddings",
            })
        })
    }

    /// A short name for what this model is (`llama.cpp`, `classifier`, `encoder`), for errors and logs.
    fn kind(&self) -> &'static str;

    /// How many requests it answers together (in one batch, or one forward
    /// pass): what a caller with many requests to make, such as `eval`,
    /// should keep in flight. Requests beyond it wait.
    fn max_concurrency(&self) -> usize {
        1
    }

    /// Every answer it can give, for a model that answers with one of a
    /// fixed set of labels (a classifier); `None` for any other.
    fn labels(&self) -> Option<Vec<String>> {
        None
    }
}

/// Builds local models from paths; supplied by the binary that links the ML crates.
pub trait LocalLoader: Send + Sync + Debug {
    /// Loads a model now, so that a missing or corrupt file fails at start-up
    /// with a message naming the file.
    fn load(&self, spec: &LocalModelSpec) -> Result<Arc<dyn LocalModel>, ProviderError>;
}

/// The configured local models of one `type = "local"` provider.
#[derive(Debug)]
pub struct LocalProvider {
    name: String,
    machine_price_per_hour: f64,
    models: HashMap<String, Arc<dyn LocalModel>>,
}

impl LocalProvider {
    pub const PROVIDER_TYPE: &'static str = "local";

    /// Loads every model of `models` whose provider is `name`.
    pub fn new<'a>(
        name: &str,
        config: &LocalProviderConfig,
        models: impl IntoIterator<Item = (&'a String, &'a ModelConfig)>,
        loader: Option<&dyn LocalLoader>,
    ) -> Result<LocalProvider, ProviderError> {
        let mut loaded = HashMap::new();
        for (_alias, model) in models.into_iter().filter(|(_, model)| model.provider == name) {
            let Some(loader) = loader else {
                return Err(ProviderError::Setup {
                    provider: name.to_string(),
                    message: "this build has no local model support".to_string(),
                });
            };
            let Some(path) = &model.path else {
                return Err(ProviderError::Setup {
                    provider: name.to_string(),
                    message: format!("model `{}` has no path", model.name),
                });
            };
            let spec = LocalModelSpec {
                name: model.name.clone(),
                path: path.clone(),
                adapter: model.adapter.clone(),
                weights: model.weights.clone(),
                max_batch: Some(config.max_batch),
                speculative_draft: Some(config.speculative_draft),
            };
            loaded.insert(model.name.clone(), loader.load(&spec)?);
        }
        Ok(LocalProvider {
            name: name.to_string(),
            machine_price_per_hour: config.machine_price_per_hour,
            models: loaded,
        })
    }

    /// A provider serving one model that is already loaded (a trained model
    /// version the gateway loads when a task is promoted).
    pub fn single(
        name: &str,
        machine_price_per_hour: f64,
        model_name: &str,
        model: Arc<dyn LocalModel>,
    ) -> LocalProvider {
        LocalProvider {
            name: name.to_string(),
            machine_price_per_hour,
            models: HashMap::from([(model_name.to_string(), model)]),
        }
    }

    pub fn machine_price_per_hour(&self) -> f64 {
        self.machine_price_per_hour
    }

    /// The labels of the model `model_name`, if it answers with labels only.
    pub fn labels(&self, model_name: &str) -> Option<Vec<String>> {
        self.models.get(model_name).and_then(|model| model.labels())
    }

    /// How many requests the model `model_name` answers together (1 for a model it has not loaded).
    pub fn max_concurrency(&self, model_name: &str) -> usize {
        self.models.get(model_name).map_or(1, |model| model.max_concurrency())
    }

    fn model(&self, body: &serde_json::Map<String, Value>) -> Result<&Arc<dyn LocalModel>, ProviderError> {
        let requested = body.get("model").and_then(Value::as_str).unwrap_or_default();
        self.models.get(requested).ok_or_else(|| {
            ProviderError::invalid_request(&self.name, format!("local provider has no model `{requested}` loaded"))
        })
    }

    pub async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        self.model(&request.body)?.chat(request).await
    }

    pub async fn infer_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        self.model(&request.body)?.chat_stream(request).await.map(StreamResponse::of_chunks)
    }

    pub async fn embed(&self, request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        self.model(&request.body)?.embed(request).await
    }
}

impl ProviderError {
    /// A request the model cannot serve as asked: the gateway answers 400 with
    /// an OpenAI-style error naming the problem.
    pub fn invalid_request(provider: &str, message: impl Into<String>) -> ProviderError {
        ProviderError::bad_request(provider, message.into(), None)
    }

    /// Like [`ProviderError::invalid_request`], naming the field at fault.
    pub fn invalid_param(provider: &str, message: impl Into<String>, param: &str) -> ProviderError {
        ProviderError::bad_request(provider, message.into(), Some(param))
    }

    fn bad_request(provider: &str, message: String, param: Option<&str>) -> ProviderError {
        let body =
            json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
        ProviderError::Rejected {
            provider: provider.to_string(),
            status: 400,
            body: body.to_string().into(),
            headers: Default::default(),
        }
    }
}

/// Splits a complete `chat.completion` body into the chunks a stream of it
/// would have carried: the message (with its logprobs), then the finish
/// reason, then `usage`.
pub fn chunks_of_completion(body: &[u8]) -> Result<Vec<String>, ProviderError> {
    let bad =
        |message: &str| ProviderError::BadResponse { provider: "local".to_string(), message: message.to_string() };
    let completion: Value = serde_json::from_slice(body).map_err(|error| bad(&error.to_string()))?;
    let choice = completion.pointer("/choices/0").ok_or_else(|| bad("no choices"))?;
    let base = |choices: Value, usage: Value| {
        json!({
            "id": completion.get("id"), "object": "chat.completion.chunk", "created": completion.get("created"),
            "model": completion.get("model"), "choices": choices, "usage": usage,
        })
        .to_string()
    };
    let message = choice.get("message").cloned().unwrap_or(Value::Null);
    let mut delta = json!({"role": "assistant", "content": message.get("content")});
    if let Some(tool_calls) = message.get("tool_calls") {
        delta["tool_calls"] = tool_calls.clone();
    }
    let first = json!([{"index": 0, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": null}]);
    let last = json!([{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}]);
    let mut chunks = vec![base(first, Value::Null), base(last, Value::Null)];
    if let Some(usage) = completion.get("usage") {
        chunks.push(base(json!([]), usage.clone()));
    }
    Ok(chunks)
}

/// The confidence of a chat answer: the probability of its whole content,
/// `exp(Σ logprob)` over `choices[0].logprobs.content`, when the answer has logprobs.
pub fn confidence_of(completion: &Value) -> Option<f64> {
    let tokens = completion.pointer("/choices/0/logprobs/content")?.as_array()?;
    if tokens.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for token in tokens {
        total += token.get("logprob")?.as_f64()?;
    }
    Some(total.exp().clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_is_the_sequence_probability() {
        let completion = json!({"choices": [{"logprobs": {"content": [
            {"token": "DE", "logprob": (0.9f64).ln()}, {"token": "SC", "logprob": (0.5f64).ln()},
        ]}}]});
        let confidence = confidence_of(&completion).unwrap();
        assert!((confidence - 0.45).abs() < 1e-9, "{confidence}");
        assert_eq!(confidence_of(&json!({"choices": [{"message": {}}]})), None);
        assert_eq!(confidence_of(&json!({"choices": [{"logprobs": {"content": []}}]})), None);
    }

    #[test]
    fn a_completion_splits_into_stream_chunks() {
        let body = json!({"id": "x", "created": 1, "model": "m", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "HUM"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        .to_string();
        let chunks = chunks_of_completion(body.as_bytes()).unwrap();
        assert_eq!(chunks.len(), 3);
        let first: Value = serde_json::from_str(&chunks[0]).unwrap();
        assert_eq!(first.pointer("/choices/0/delta/content").unwrap(), "HUM");
        let last: Value = serde_json::from_str(&chunks[2]).unwrap();
        assert_eq!(last.pointer("/usage/prompt_tokens").unwrap(), 3);
    }
}
