//! A trained classifier answering chat completions with a label.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use understudy_providers::{ChatRequest, LocalModel, ProviderError, ProviderResponse};
use understudy_trainer::{prompt_text, ClassifierModel, Prediction};

use crate::batcher::Batcher;
use crate::{completion_body, internal, response_of};

/// A label task's understudy: the classifier's top label is the answer, and
/// with `logprobs` the answer carries that label's log-probability (and with
/// `top_logprobs`, the runners-up), which is the cascade's confidence.
/// Concurrent requests are answered together, up to `max_batch` in one
/// forward pass ([`Batcher`]); the padding mask makes a batched answer the
/// one the request would get alone.
pub struct ClassifierLocal {
    name: String,
    model: Arc<ClassifierModel>,
    batcher: Batcher<String, Prediction>,
}

impl std::fmt::Debug for ClassifierLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierLocal")
            .field("name", &self.name)
            .field("labels", &self.model.labels())
            .field("max_batch", &self.batcher.max_batch())
            .finish()
    }
}

impl ClassifierLocal {
    /// Loads the classifier in `dir`, answering up to `max_batch` concurrent requests in one pass.
    pub fn load(name: &str, dir: &Path, max_batch: usize) -> Result<ClassifierLocal, ProviderError> {
        let setup = |message: String| ProviderError::Setup { provider: format!("local model `{name}`"), message };
        let model = ClassifierModel::load(dir)
            .map_err(|error| setup(format!("cannot load the classifier in {}: {error}", dir.display())))?;
        let model = Arc::new(model);
        let forward_model = model.clone();
        let batcher = Batcher::start(name, max_batch, move |texts: Vec<String>| forward_model.predict(&texts))
            .map_err(|error| setup(format!("cannot start the batching thread: {error}")))?;
        Ok(ClassifierLocal { name: name.to_string(), model, batcher })
    }

    pub fn labels(&self) -> &[String] {
        self.model.labels()
    }

    async fn answer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let invalid = |message: String| ProviderError::invalid_request(&self.name, message);
        let messages = request.body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
        let text = prompt_text(&messages);
        if text.trim().is_empty() {
            return Err(invalid("a classifier reads the user messages, and this request has no user text".into()));
        }
        let want_logprobs = request.body.get("logprobs").and_then(Value::as_bool).unwrap_or(false);
        let top_logprobs = match request.body.get("top_logprobs") {
            None | Some(Value::Null) => 0,
            Some(value) => match value.as_u64() {
                Some(n) if n <= 20 => n as usize,
                _ => return Err(invalid("`top_logprobs` must be an integer from 0 to 20".into())),
            },
        };
        let answered = self.batcher.call(text.clone()).await.map_err(|error| internal(&self.name, error))?;
        let prediction = answered.output;
        let logprobs = want_logprobs.then(|| {
            let mut ranked: Vec<(usize, f32)> = prediction.probabilities.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<Value> = ranked
                .iter()
                .take(top_logprobs)
                .map(|(idx, p)| json!({"token": self.labels()[*idx], "logprob": f64::from(*p).ln(), "bytes": null}))
                .collect();
            json!({"content": [{
                "token": prediction.label, "logprob": f64::from(prediction.confidence).ln(),
                "bytes": prediction.label.as_bytes(), "top_logprobs": top,
            }]})
        });
        let prompt_tokens = text.split_whitespace().count();
        let body = completion_body(&self.name, &prediction.label, logprobs, prompt_tokens);
        Ok(ProviderResponse { compute: Some(answered.compute), ..response_of(&body) })
    }
}

impl LocalModel for ClassifierLocal {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        Box::pin(self.answer(request))
    }

    fn kind(&self) -> &'static str {
        "classifier"
    }

    fn max_concurrency(&self) -> usize {
        self.batcher.max_batch()
    }

    fn labels(&self) -> Option<Vec<String>> {
        Some(ClassifierLocal::labels(self).to_vec())
    }
}
