//! A call being served, and the record it becomes when it ends.

use std::time::Instant;

use understudy_types::{CallRecord, Endpoint, Money, OffsetDateTime, Routing, Usage, UsageSource, Uuid};

use crate::{AppState, GatewayError};

/// What is known of a call while it is served.
pub(crate) struct CallDraft {
    /// The record's id, known from the start so the response can carry it.
    pub id: Uuid,
    pub started: Instant,
    pub created_at: OffsetDateTime,
    pub endpoint: Endpoint,
    pub task: Option<String>,
    pub model: String,
    pub provider: String,
    pub stream: bool,
    pub request: String,
    /// For a task's call: how it went between the lead and the understudy.
    pub routing: Option<Routing>,
}

/// How a call ended.
pub(crate) struct Outcome {
    pub status: u16,
    pub response: Option<String>,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Money,
    pub ttft_ms: Option<f64>,
    pub error: Option<String>,
}

impl CallDraft {
    pub fn start(endpoint: Endpoint) -> CallDraft {
        CallDraft {
            id: CallRecord::new_id(),
            started: Instant::now(),
            created_at: now_ms(),
            endpoint,
            task: None,
            model: String::new(),
            provider: String::new(),
            stream: false,
            request: String::new(),
            routing: None,
        }
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub fn finish(self, outcome: Outcome) -> CallRecord {
        CallRecord {
            id: self.id,
            latency_ms: self.elapsed_ms(),
            created_at: self.created_at,
            task: self.task,
            model: self.model,
            provider: self.provider,
            endpoint: self.endpoint,
            stream: self.stream,
            request: self.request,
            response: outcome.response,
            usage: outcome.usage,
            usage_source: outcome.usage_source,
            ttft_ms: outcome.ttft_ms,
            status: outcome.status,
            error: outcome.error,
            cost: outcome.cost,
            routing: self.routing,
        }
    }

    /// The record of a call that ended in `error`.
    pub fn fail(self, error: &GatewayError) -> CallRecord {
        let response = Some(String::from_utf8_lossy(&error.body()).into_owned());
        self.finish(Outcome {
            status: error.status().as_u16(),
            response,
            usage: Usage::default(),
            usage_source: UsageSource::Counted,
            cost: Money(0.0),
            ttft_ms: None,
            error: Some(error.to_string()),
        })
    }
}

/// The current time, truncated to the millisecond the store keeps.
fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now)
}

impl AppState {
    /// Queues a record, waiting if the queue is full. A recorder that has
    /// stopped is the only way to lose one, and that is logged loudly.
    pub(crate) async fn record(&self, record: CallRecord) {
        if let Err(record) = self.recorder().record(record).await {
            tracing::error!(call_id = %record.id, "recorder has stopped; a call record could not be queued");
        }
    }
}
