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
use understudy_types::{normalize_answer, Money, Price, Usage};

use crate::{confidence_of, AnyProvider, ChatRequest};

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
            CostModel::MachineTime { price_per_hour } => Money(price_per_hour * elapsed.as_secs_f64() / 3600.0),
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
}

impl Understudy {
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
        let outcome = match tokio::time::timeout(timeout, self.provider.infer(request)).await {
            Err(_) => AttemptOutcome::TimedOut,
            Ok(Err(error)) => AttemptOutcome::Failed(error.to_string()),
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
        UnderstudyAttempt {
            model: self.name.clone(),
            outcome,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            cost: self.cost.cost(usage, elapsed),
        }
    }
}

/// The `response_format` that restricts a local model's answer to `labels`
/// (a JSON schema whose root is an enum of strings; the answer is the bare label).
fn labels_format(labels: &[String]) -> Value {
    serde_json::json!({"type": "json_schema", "json_schema": {
        "name": "label", "strict": true, "schema": {"type": "string", "enum": labels},
    }})
}
