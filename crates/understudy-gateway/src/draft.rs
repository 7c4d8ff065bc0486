//! A call being served, and the record it becomes when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::response::{IntoResponse, Response};
use understudy_providers::HeaderMap;

use understudy_types::{CallRecord, Endpoint, KeyRef, Money, OffsetDateTime, Routing, Usage, UsageSource, Uuid};

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
    /// Whether the client still waits for the answer.
    pub client: ClientWatch,
    /// The gateway key the call was made with.
    pub key: Option<KeyRef>,
    /// The upstream's id for the call ([`UPSTREAM_REQUEST_ID`] of its answer).
    pub upstream_request_id: Option<String>,
    /// The call's trace span (`telemetry`): filled in by `finish`, and the
    /// parent of the upstream attempts' spans. Disabled, and free, unless
    /// traces are exported.
    pub span: tracing::Span,
}

/// Set when the client went away before its answer was handed over.
#[derive(Clone, Default)]
pub(crate) struct ClientWatch(Arc<AtomicBool>);

impl ClientWatch {
    pub fn is_gone(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A call being served on the handler's own task. If the handler is dropped
/// before the call ends (the client hung up), the call is not cancelled: the
/// rest of it moves to a task of its own, with the client marked gone. The
/// call's future is boxed, so it can move without being moved in memory.
/// Spawning only abandoned calls keeps a task spawn (and its hop between
/// worker threads) off every other call: `bench/gateway-overhead` measured a
/// spawn per call at 7 % of the saturated throughput.
pub(crate) struct Detachable {
    call: Option<Pin<Box<dyn Future<Output = Response> + Send>>>,
    watch: ClientWatch,
    background: tokio_util::task::TaskTracker,
}

impl Future for Detachable {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Response> {
        let Some(call) = self.call.as_mut() else {
            return Poll::Ready(GatewayError::Internal.into_response());
        };
        let response = std::task::ready!(call.as_mut().poll(context));
        self.call = None;
        Poll::Ready(response)
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            self.watch.0.store(true, Ordering::Relaxed);
            // The new task polls the call at once, so its wakers move there.
            self.background.spawn(async move {
                let _response = call.await;
            });
        }
    }
}

/// The answer header holding the upstream's id for a call, as OpenAI names
/// it (Anthropic's `request-id` reaches the gateway under this name too,
/// `anthropic::passed_headers`).
pub(crate) const UPSTREAM_REQUEST_ID: &str = "x-request-id";

/// The status a call is recorded with when its client left before the
/// answer (nginx's "client closed request").
pub(crate) const CLIENT_GONE_STATUS: u16 = 499;

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
    pub fn start(endpoint: Endpoint, key: Option<KeyRef>) -> CallDraft {
        let id = CallRecord::new_id();
        let empty = tracing::field::Empty;
        let span = tracing::info_span!(
            target: crate::telemetry::CALL_TARGET,
            "call",
            otel.name = endpoint.as_str(),
            otel.kind = "server",
            otel.status_code = empty,
            call_id = %id,
            endpoint = endpoint.as_str(),
            key = key.as_ref().map(|key| key.name.as_str()),
            task = empty,
            model = empty,
            provider = empty,
            stream = empty,
            policy = empty,
            served_by = empty,
            fallback_reason = empty,
            understudy_confidence = empty,
            status = empty,
            prompt_tokens = empty,
            completion_tokens = empty,
            cost_usd = empty,
            error = empty,
        );
        CallDraft {
            id,
            started: Instant::now(),
            created_at: now_ms(),
            endpoint,
            task: None,
            model: String::new(),
            provider: String::new(),
            stream: false,
            request: String::new(),
            routing: None,
            client: ClientWatch::default(),
            key,
            upstream_request_id: None,
            span,
        }
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub fn finish(self, outcome: Outcome) -> CallRecord {
        // The upstream call is finished and paid for even when nobody waits
        // for it; the record says so, and keeps what the upstream answered.
        let (status, error) = if self.client.is_gone() {
            let reason = "client disconnected before the answer";
            let error = match outcome.error {
                Some(error) => format!("{reason}; {error}"),
                None => reason.to_string(),
            };
            (CLIENT_GONE_STATUS, Some(error))
        } else {
            (outcome.status, outcome.error)
        };
        let record = CallRecord {
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
            status,
            error,
            cost: outcome.cost,
            routing: self.routing,
            key: self.key,
            upstream_request_id: self.upstream_request_id,
        };
        trace_outcome(&self.span, &record);
        record
    }

    /// Keeps the upstream's id for the call from its answer's passed headers.
    pub fn note_upstream(&mut self, headers: &HeaderMap) {
        if let Some(id) = headers.get(UPSTREAM_REQUEST_ID).and_then(|value| value.to_str().ok()) {
            self.upstream_request_id = Some(id.to_string());
        }
    }

    /// The record of a call that ended in `error`.
    pub fn fail(mut self, error: &GatewayError) -> CallRecord {
        // An upstream's error answer has its request id too.
        if let GatewayError::Provider(understudy_providers::ProviderError::Rejected { headers, .. }) = error {
            self.note_upstream(headers);
        }
        let response = Some(understudy_types::text_of_body(&error.body()));
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

/// Fills a call's span with how the call went.
fn trace_outcome(span: &tracing::Span, record: &CallRecord) {
    if span.is_disabled() {
        return;
    }
    span.record("task", record.task.as_deref());
    span.record("model", record.model.as_str());
    span.record("provider", record.provider.as_str());
    span.record("stream", record.stream);
    span.record("status", record.status);
    span.record("prompt_tokens", record.usage.prompt_tokens);
    span.record("completion_tokens", record.usage.completion_tokens);
    span.record("cost_usd", record.cost.0);
    if let Some(routing) = &record.routing {
        span.record("policy", routing.policy.as_str());
        span.record("served_by", routing.served_by.as_str());
        span.record("fallback_reason", routing.fallback_reason.as_deref());
        span.record("understudy_confidence", routing.understudy_confidence);
    } else {
        span.record("served_by", "lead");
    }
    if let Some(error) = &record.error {
        span.record("error", error.as_str());
    }
    span.record("otel.status_code", if record.is_success() { "ok" } else { "error" });
}

/// A box holding what `make` makes, allocated before `make` runs so that the
/// value can be written straight into it.
#[inline(always)]
fn built_in_box<T>(make: impl FnOnce() -> T) -> Box<T> {
    Box::write(Box::new_uninit(), make())
}

/// The current time, truncated to the millisecond the store keeps.
fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now)
}

impl AppState {
    /// Serves a call so that a client that hangs up cannot cancel it
    /// half-way: the upstream call goes on (moved to a task of its own, see
    /// [`Detachable`]), is paid for, and is recorded (as a 499) whether or not
    /// anyone waits for the answer.
    /// The call runs inside `span` (the draft's), so upstream attempts are
    /// its children.
    ///
    /// Not an `async fn`: the call's future is boxed here, before anything
    /// awaits, so the handler's own future (which axum, tower and hyper move
    /// several times per request) stays a few words long instead of carrying
    /// the whole call's state machine. `bench/gateway-instructions` measured
    /// those moves at a fifth of the gateway's instructions per call.
    ///
    /// `serve` makes the call's future, and is called only once its box is
    /// allocated, so that the future (8 KB for a chat call: the state of every
    /// step it may await) is built in the box rather than built on the stack
    /// and copied in. That copy touched a quarter of the L1 data cache per
    /// call (callgrind's cache simulation: a fifth of the gateway's D1 write
    /// misses).
    #[inline(always)]
    pub(crate) fn serve_detached<F, S>(&self, client: ClientWatch, span: tracing::Span, serve: S) -> Detachable
    where
        S: FnOnce() -> F,
        F: Future<Output = Response> + Send + 'static,
    {
        let call: Pin<Box<dyn Future<Output = Response> + Send>> = if span.is_disabled() {
            Box::into_pin(built_in_box(serve))
        } else {
            Box::into_pin(built_in_box(|| tracing::Instrument::instrument(serve(), span)))
        };
        Detachable { call: Some(call), watch: client, background: self.inner.background.clone() }
    }

    /// Queues a record, waiting if the queue is full. A recorder that has
    /// stopped is the only way to lose one, and that is logged loudly.
    ///
    /// Every record passes here, so this is where a call's reservation
    /// against its key's limits becomes its real cost, where the metrics
    /// count it, and where feedback learns how it ended.
    pub(crate) async fn record(&self, record: CallRecord) {
        self.inner.limiter.settle(record.id, record.cost, record.usage.total_tokens()).await;
        self.inner.metrics.observe(self.config(), &record);
        self.inner.recent_calls.finished(record.id, record.is_success());
        if let Err(record) = self.recorder().record(record).await {
            tracing::error!(call_id = %record.id, "recorder has stopped; a call record could not be queued");
        }
    }
}
