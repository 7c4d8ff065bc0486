//! A trained classifier answering chat completions with a label.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use understudy_providers::{ChatRequest, LocalModel, ProviderError, ProviderResponse};
use understudy_trainer::{prompt_text, ClassifierModel};

use crate::{completion_body, internal, response_of};

/// A label task's understudy: the classifier's top label is the answer, and
/// with `logprobs` the answer carries that label's log-probability (and with
/// `top_logprobs`, the runners-up), which is the cascade's confidence.
pub struct ClassifierLocal {
    name: String,
    model: Arc<ClassifierModel>,
}

impl std::fmt::Debug for ClassifierLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierLocal").field("name", &self.name).field("labels", &self.model.labels()).finish()
    }
}

impl ClassifierLocal {
    pub fn load(name: &str, dir: &Path) -> Result<ClassifierLocal, ProviderError> {
        let model = ClassifierModel::load(dir).map_err(|error| ProviderError::Setup {
            provider: format!("local model `{name}`"),
            message: format!("cannot load the classifier in {}: {error}", dir.display()),
        })?;
        Ok(ClassifierLocal { name: name.to_string(), model: Arc::new(model) })
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
        let model = self.model.clone();
        let name = self.name.clone();
        let input = text.clone();
        let prediction = tokio::task::spawn_blocking(move || model.predict(&[input]))
            .await
            .map_err(|error| internal(&name, error))?
            .map_err(|error| internal(&name, error))?
            .into_iter()
            .next()
            .ok_or_else(|| internal(&self.name, "the classifier returned no prediction"))?;
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
        Ok(response_of(&body))
    }
}

impl LocalModel for ClassifierLocal {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        Box::pin(self.answer(request))
    }

    fn kind(&self) -> &'static str {
        "classifier"
    }
}
