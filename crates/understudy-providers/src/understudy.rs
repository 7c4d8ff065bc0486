//! Asking a task's understudy, the one way the gateway and `eval` both do:
//! the request is made non-streamed with logprobs (the cascade's confidence
//! is `exp(Σ logprob)`), a local model of a label task is constrained to the
//! labels, and the answer is valid when it has text and, for a label task,
//! is one of the labels under [`normalize_answer`]. Also how a call to a
//! model is priced ([`CostModel`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use understudy_types::{machine_time_cost, normalize_answer, Money, Price, Usage};

use crate::{confidence_of, AnyProvider, ChatRequest, LocalLoader, LocalModelSpec, LocalProvider, ProviderError};

/// A model that can stand in for a task's lead.
#[derive(Debug)]
pub struct Understudy {
    /// The name records carry: a config model, or a model version id.
    pub name: String,
    /// The name of its provider, for records.
    pub provider_name: String,
    pub provider: Arc<AnyProvider>,
    /// The `model` field its provider expects.
    pub request_model: String,
    pub cost: CostModel,
}

#[derive(Debug, Clone, Copy)]
pub enum CostModel {
    Tokens(Price),
    MachineTime { price_per_hour: f64 },
}

impl CostModel {
    /// How calls to `provider` are priced: a local model by the machine time
    /// it takes, any other by its price table.
    pub fn of(provider: &AnyProvider, price: Price) -> CostModel {
        match provider {
            AnyProvider::Local(local) => CostModel::MachineTime { price_per_hour: local.machine_price_per_hour() },
            _ => CostModel::Tokens(price),
        }
    }

    pub fn cost(self, usage: Option<Usage>, elapsed: Duration) -> Money {
        match self {
            CostModel::Tokens(price) => price.cost(usage.unwrap_or_default()),
            CostModel::MachineTime { price_per_hour } => machine_time_cost(elapsed.as_secs_f64(), price_per_hour),
        }
    }
}

/// How the understudy's attempt at a call went.
#[derive(Debug, Clone)]
pub struct UnderstudyAttempt {
    pub model: String,
    pub outcome: AttemptOutcome,
    pub latency_ms: f64,
    pub cost: Money,
}

#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Answered { body: Bytes, content: String, confidence: Option<f64>, valid: bool },
    Failed(String),
    TimedOut,
}

impl UnderstudyAttempt {
    pub fn content(&self) -> Option<&str> {
        match &self.outcome {
            AttemptOutcome::Answered { content, .. } => Some(content),
            _ => None,
        }
    }

    pub fn confidence(&self) -> Option<f64> {
        match &self.outcome {
            AttemptOutcome::Answered { confidence, .. } => *confidence,
            _ => None,
        }
    }

    /// The router's view of the attempt, for [`understudy_router::judge`].
    pub fn router_attempt(&self) -> understudy_router::Attempt {
        match &self.outcome {
            AttemptOutcome::Answered { confidence, valid, .. } => {
                understudy_router::Attempt::Answered { confidence: *confidence, valid: *valid }
            }
            AttemptOutcome::Failed(_) => understudy_router::Attempt::Failed,
            AttemptOutcome::TimedOut => understudy_router::Attempt::TimedOut,
        }
    }
}

impl Understudy {
    /// Every answer it can give, when it answers with labels only (a local
    /// classifier): an answer of the lead's outside them is one it can never
    /// agree with.
    pub fn labels(&self) -> Option<Vec<String>> {
        match &*self.provider {
            AnyProvider::Local(local) => local.labels(&self.request_model),
            _ => None,
        }
    }

    /// A model that runs in this process: `spec` loaded by `loader` (a trained
    /// model version's folder, or a base model), served by a local provider
    /// named `provider_name` and priced by the machine time it takes at
    /// `price_per_hour`. How the gateway serves a promoted model version and
    /// how `eval` asks every candidate, so both ask the same model the same way.
    pub fn local(
        spec: &LocalModelSpec,
        loader: &dyn LocalLoader,
        provider_name: &str,
        price_per_hour: f64,
    ) -> Result<Understudy, ProviderError> {
        let model = loader.load(spec)?;
        let provider = LocalProvider::single(provider_name, price_per_hour, &spec.name, model);
        Ok(Understudy {
            name: spec.name.clone(),
            provider_name: provider_name.to_string(),
            provider: Arc::new(AnyProvider::Local(provider)),
            request_model: spec.name.clone(),
            cost: CostModel::MachineTime { price_per_hour },
        })
    }

    /// How many calls to keep in flight to use it fully: a local model's
    /// [`crate::LocalModel::max_concurrency`] (a classifier's `max_batch`), else 1.
    pub fn max_concurrency(&self) -> usize {
        match &*self.provider {
            AnyProvider::Local(local) => local.max_concurrency(&self.request_model),
            _ => 1,
        }
    }

    /// Asks the understudy for a complete answer, within `timeout`. An answer
    /// is valid when it has text and, if the task lists its labels, is one. A
    /// local understudy of a task with labels is asked to decode only those
    /// ([`labels_format`]) unless the client sent a `response_format`.
    pub async fn attempt(
        &self,
        mut request: ChatRequest,
        timeout: Duration,
        labels: Option<&[String]>,
    ) -> UnderstudyAttempt {
        request.body.insert("model".into(), Value::String(self.request_model.clone()));
        request.body.remove("stream");
        request.body.remove("stream_options");
        // The cascade reads the understudy's confidence from its logprobs.
        request.body.entry("logprobs").or_insert(Value::Bool(true));
        // A local model decodes only the task's labels, unless the client constrained the answer itself.
        if let (Some(labels), AnyProvider::Local(_)) = (labels, &*self.provider) {
            if matches!(request.body.get("response_format"), None | Some(Value::Null)) {
                request.body.insert("response_format".into(), labels_format(labels));
            }
        }
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, self.provider.infer(request)).await;
        let compute = match &answer {
            Ok(Ok(response)) => response.compute,
            _ => None,
        };
        let outcome = match answer {
            Err(_) => AttemptOutcome::TimedOut,
            Ok(Err(error)) => AttemptOutcome::Failed(failure_text(&error)),
            Ok(Ok(response)) => match serde_json::from_slice::<Value>(&response.body) {
                Err(error) => AttemptOutcome::Failed(format!("the understudy's answer is not JSON: {error}")),
                Ok(completion) => {
                    let content = completion
                        .pointer("/choices/0/message/content")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let valid = !content.trim().is_empty()
                        && labels.is_none_or(|labels| {
                            labels.iter().any(|label| normalize_answer(label) == normalize_answer(&content))
                        });
                    let confidence = confidence_of(&completion);
                    AttemptOutcome::Answered { body: response.body, content, confidence, valid }
                }
            },
        };
        let elapsed = started.elapsed();
        let usage = match &outcome {
            AttemptOutcome::Answered { body, .. } => crate::usage_of_body(body).ok().flatten(),
            _ => None,
        };
        // A model that answers calls together says what this one cost it;
        // otherwise the call's wall time is its compute.
        let compute = compute.unwrap_or(elapsed);
        UnderstudyAttempt {
            model: self.name.clone(),
            outcome,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            cost: self.cost.cost(usage, compute),
        }
    }
}

/// What went wrong, for logs and `eval`'s answers: a rejection carries its
/// reason (a prompt longer than the context, say) in its body.
fn failure_text(error: &ProviderError) -> String {
    let ProviderError::Rejected { body, .. } = error else {
        return error.to_string();
    };
    let reason = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|body| body.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| understudy_types::text_of_body(body));
    format!("{error}: {reason}")
}

/// The `response_format` that restricts a local model's answer to `labels`
/// (a JSON schema whose root is an enum of strings; the answer is the bare label).
fn labels_format(labels: &[String]) -> Value {
    serde_json::json!({"type": "json_schema", "json_schema": {
        "name": "label", "strict": true, "schema": {"type": "string", "enum": labels},
    }})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::{LocalModel, ProviderResponse};

    /// A local model that answers "Bug" with probability 0.8, or fails when
    /// the prompt says "fail", and records the `response_format` it was sent.
    #[derive(Debug, Default)]
    struct Stub {
        formats: std::sync::Mutex<Vec<Value>>,
    }

    impl LocalModel for Stub {
        fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
            self.formats.lock().unwrap().push(request.body.get("response_format").cloned().unwrap_or(Value::Null));
            let fails = request.body.get("messages").is_some_and(|messages| messages.to_string().contains("fail"));
            Box::pin(async move {
                if fails {
                    return Err(ProviderError::invalid_request("stub", "prompt has 9000 tokens, the context is 4096"));
                }
                let body = json!({"choices": [{"message": {"content": "Bug"},
                    "logprobs": {"content": [{"token": "Bug", "logprob": 0.8f64.ln()}]}}]});
                Ok(ProviderResponse {
                    body: body.to_string().into(),
                    usage: None,
                    headers: Default::default(),
                    compute: None,
                })
            })
        }

        fn kind(&self) -> &'static str {
            "stub"
        }
    }

    #[derive(Debug, Default)]
    struct StubLoader(Arc<Stub>);

    impl LocalLoader for StubLoader {
        fn load(&self, spec: &LocalModelSpec) -> Result<Arc<dyn LocalModel>, ProviderError> {
            assert_eq!(spec.path, "/models/mv-1");
            Ok(self.0.clone())
        }
    }

    fn request(prompt: &str) -> ChatRequest {
        let body = json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0});
        ChatRequest { body: body.as_object().cloned().unwrap() }
    }

    #[tokio::test]
    async fn a_local_understudy_is_asked_and_judged_one_way() {
        let loader = StubLoader::default();
        let spec = LocalModelSpec::new("mv-1", "/models/mv-1");
        let understudy = Understudy::local(&spec, &loader, "local", 0.36).unwrap();
        assert_eq!((understudy.name.as_str(), understudy.request_model.as_str()), ("mv-1", "mv-1"));
        assert!(matches!(understudy.cost, CostModel::MachineTime { price_per_hour } if price_per_hour == 0.36));
        let timeout = Duration::from_secs(60);
        let labels = ["bug".to_string(), "billing".to_string()];

        let answered = understudy.attempt(request("it crashes"), timeout, Some(&labels)).await;
        let confidence = answered.confidence().unwrap();
        assert!((confidence - 0.8).abs() < 1e-12, "{confidence}");
        // "Bug" is the label "bug" under the one normalization.
        assert_eq!(
            answered.router_attempt(),
            understudy_router::Attempt::Answered { confidence: Some(confidence), valid: true }
        );
        let format = loader.0.formats.lock().unwrap()[0].clone();
        assert_eq!(format.pointer("/json_schema/schema/enum"), Some(&json!(labels)));

        let outside = understudy.attempt(request("it crashes"), timeout, Some(&labels[1..])).await;
        assert_eq!(
            outside.router_attempt(),
            understudy_router::Attempt::Answered { confidence: Some(confidence), valid: false }
        );
        let failed = understudy.attempt(request("fail"), timeout, None).await;
        assert!(matches!(&failed.outcome, AttemptOutcome::Failed(error) if error.contains("9000 tokens")));
        assert_eq!(failed.router_attempt(), understudy_router::Attempt::Failed);
        assert_eq!(failed.content(), None);
    }
}
