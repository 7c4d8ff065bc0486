//! `POST /v1/chat/completions`, streamed and not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;
use understudy_config::{ModelConfig, Policy};
use understudy_providers::{tokens, AnyProvider, ChatRequest, ChunkStream, ProviderResponse, StreamResponse};
use understudy_router::{first_step, judge, FallbackReason, FirstStep, Verdict};
use understudy_types::{CallRecord, Endpoint, Routing, ServedBy, Usage, UsageSource};

use crate::assemble::StreamAssembler;
use crate::auth::Caller;
use crate::draft::{CallDraft, Outcome};
use crate::limits::{Estimate, DEFAULT_ANSWER_TOKENS};
use crate::relay::sse_event;
use crate::request::{check_chat, parse_body, resolve_model, RequestBody};
use crate::routing::lead_cost_of;
use crate::{AppState, GatewayError};
use understudy_providers::{AttemptOutcome, CostModel, Understudy, UnderstudyAttempt};

/// The understudy's answer to a call the lead serves, still coming (shadow)
/// or already in (a fallback); recorded beside the lead's.
pub(crate) type PendingAttempt = BoxFuture<'static, Option<UnderstudyAttempt>>;

pub(crate) async fn chat_completions(State(state): State<AppState>, caller: Caller, body: RequestBody) -> Response {
    let draft = CallDraft::start(Endpoint::ChatCompletions, caller.key_ref());
    // The client learns the call's id, to send feedback on its answer.
    let call_id = draft.id;
    state.inner.recent_calls.remember(call_id, caller.key_id().map(str::to_string));
    let (client, span) = (draft.client.clone(), draft.span.clone());
    let mut response =
        state.clone().serve_detached(client, span, || serve_call(state.clone(), draft, caller, body)).await;
    if !response.status().is_success() {
        // A shadow call's record comes later; its client knows already.
        state.inner.recent_calls.finished(call_id, false);
    }
    crate::feedback::tag_call_id(&mut response, call_id);
    response
}

async fn serve_call(state: AppState, mut draft: CallDraft, caller: Caller, body: RequestBody) -> Response {
    let prepared = match prepare(&state, &caller, body, &mut draft) {
        Err(error) => return fail(&state, draft, error).await,
        Ok(prepared) => prepared,
    };
    // The key's limits and budget, before anything is asked upstream.
    if let Err(error) = state.admit(&caller, draft.id, || estimate(&prepared)).await {
        return fail(&state, draft, error).await;
    }
    match route_call(&state, &mut draft, &prepared.request, None).await {
        Routed::Lead(pending) => serve_lead(state, draft, prepared, pending).await,
        Routed::Understudy(served) => Box::pin(serve_understudy(state, draft, prepared, served)).await,
    }
}

/// Who serves a call of a task (chat's and the Responses API's alike).
pub(crate) enum Routed {
    /// The lead serves. The understudy's answer, if one is pending (shadow)
    /// or in (a fallback), is recorded beside the lead's. `draft.routing`
    /// says how it went.
    Lead(Option<PendingAttempt>),
    /// The understudy's answer is served.
    Understudy(ServedAttempt),
}

/// An understudy's answer that is served, with what its record needs.
pub(crate) struct ServedAttempt {
    pub routing: Routing,
    pub understudy: Arc<Understudy>,
    pub attempt: UnderstudyAttempt,
    pub route: Arc<crate::routing::TaskRoute>,
}

/// The routing path of a task's call: the task's current route and a
/// uniform draw give the first step; the understudy is asked `request` (a
/// chat request) and `judge` serves its answer or falls back. `blocked` is
/// why the understudy may not be asked this call at all: a policy other
/// than lead then serves the lead, and the record says why.
pub(crate) async fn route_call(
    state: &AppState,
    draft: &mut CallDraft,
    request: &ChatRequest,
    blocked: Option<FallbackReason>,
) -> Routed {
    let Some(task_name) = draft.task.clone() else {
        return Routed::Lead(None);
    };
    let (Some(route), Some(task)) = (state.route(&task_name), state.config().tasks.get(&task_name)) else {
        return Routed::Lead(None);
    };
    let mut routing = Routing { policy: route.policy.name(), ..Routing::default() };
    let understudy = match (&route.understudy, route.policy) {
        (Some(understudy), policy) if policy != Policy::Lead => understudy.clone(),
        _ => {
            draft.routing = Some(routing);
            return Routed::Lead(None);
        }
    };
    routing.understudy_model = Some(understudy.name.clone());
    if let Some(reason) = blocked {
        routing.fallback_reason = Some(reason.as_str().to_string());
        draft.routing = Some(routing);
        return Routed::Lead(None);
    }
    let timeout = task.understudy_timeout;
    let labels = task.labels.clone();
    match first_step(route.policy, rand::random::<f64>()) {
        FirstStep::Lead => {
            draft.routing = Some(routing);
            Routed::Lead(None)
        }
        FirstStep::LeadWithShadow => {
            let request = request.clone();
            let shadow = tokio::spawn(async move { understudy.attempt(request, timeout, labels.as_deref()).await });
            draft.routing = Some(routing);
            Routed::Lead(Some(Box::pin(async move { shadow.await.ok() })))
        }
        FirstStep::Understudy => {
            // Boxed, as the understudy's own path: a lead-only call's
            // future need not carry their state (it is moved once per call).
            let attempt = Box::pin(understudy.attempt(request.clone(), timeout, labels.as_deref())).await;
            match judge(route.policy, attempt.router_attempt()) {
                Verdict::ServeUnderstudy => Routed::Understudy(ServedAttempt { routing, understudy, attempt, route }),
                Verdict::FallBack(reason) => {
                    if let AttemptOutcome::Failed(error) = &attempt.outcome {
                        tracing::warn!(task = %task_name, understudy = %understudy.name, %error, "understudy failed; the lead serves");
                    }
                    routing.fallback_reason = Some(reason.as_str().to_string());
                    draft.routing = Some(routing);
                    Routed::Lead(Some(Box::pin(futures::future::ready(Some(attempt)))))
                }
            }
        }
    }
}

async fn serve_lead(
    state: AppState,
    draft: CallDraft,
    prepared: Prepared,
    pending: Option<PendingAttempt>,
) -> Response {
    if prepared.stream {
        stream(state, draft, prepared, pending).await
    } else {
        complete(state, draft, prepared, pending).await
    }
}

/// Serves the understudy's answer, in the shape the client asked for.
async fn serve_understudy(state: AppState, draft: CallDraft, prepared: Prepared, served: ServedAttempt) -> Response {
    let AttemptOutcome::Answered { body, .. } = &served.attempt.outcome else {
        // `judge` serves only answers; anything else is the lead's.
        return serve_lead(state, draft, prepared, None).await;
    };
    let body = body.clone();
    let lead = LeadSide {
        provider: &prepared.provider,
        cost: prepared.cost,
        request: &prepared.request,
        price: prepared.model.price,
        messages: &prepared.messages,
    };
    let response = understudy_types::text_of_body(&body);
    record_served(&state, draft, served, &lead, response).await;
    if !prepared.stream {
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let chunks = match understudy_providers::local::chunks_of_completion(&body) {
        Ok(chunks) => chunks,
        Err(error) => return GatewayError::from(error).into_response(),
    };
    let mut events = Vec::with_capacity(chunks.len() + 1);
    for data in chunks {
        let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        if let Some(data) = chunk_for_client(data, &chunk, prepared.include_usage) {
            events.push(Ok::<_, Infallible>(sse_event(&data)));
        }
    }
    events.push(Ok(sse_event("[DONE]")));
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(futures::stream::iter(events)),
    )
        .into_response()
}

/// The lead of a call the understudy served: what its audit asks, and
/// what the lead would have cost.
pub(crate) struct LeadSide<'a> {
    pub provider: &'a Arc<AnyProvider>,
    pub cost: CostModel,
    /// The call as a chat request (what the understudy was asked).
    pub request: &'a ChatRequest,
    pub price: understudy_types::Price,
    pub messages: &'a [Value],
}

/// Records a call the understudy served (`response` is the record's answer,
/// in the endpoint's shape): who served, its confidence, cost and the lead
/// cost it avoided; when an audit is due the lead is asked too, off the
/// response path, and the record waits for it.
pub(crate) async fn record_served(
    state: &AppState,
    mut draft: CallDraft,
    served: ServedAttempt,
    lead: &LeadSide<'_>,
    response: String,
) {
    let ServedAttempt { mut routing, understudy, attempt, route } = served;
    let (content, confidence) = match &attempt.outcome {
        AttemptOutcome::Answered { content, confidence, .. } => (content.clone(), *confidence),
        _ => (String::new(), None),
    };
    routing.served_by = ServedBy::Understudy;
    routing.understudy_confidence = confidence;
    routing.understudy_latency_ms = Some(attempt.latency_ms);
    routing.understudy_cost = attempt.cost;
    routing.lead_cost_avoided = lead_cost_of(lead.price, lead.messages, &content);
    routing.understudy_answer = Some(content.clone());
    draft.model = understudy.name.clone();
    draft.provider = understudy.provider_name.clone();
    draft.routing = Some(routing);
    let usage = Usage {
        prompt_tokens: tokens::count_messages(lead.messages),
        completion_tokens: tokens::count_answer(&serde_json::json!({"role": "assistant", "content": content})),
    };
    let ttft_ms = Some(draft.elapsed_ms());
    let record = draft.finish(Outcome {
        status: StatusCode::OK.as_u16(),
        response: Some(response),
        usage,
        usage_source: UsageSource::Counted,
        cost: attempt.cost,
        ttft_ms,
        error: None,
    });
    let task = record.task.clone().unwrap_or_default();
    if !state.should_audit(&task) {
        state.record(record).await;
        return;
    }
    // The lead is asked too, off the response path; the record waits for
    // its answer, and the guardrail counts it.
    let audit_state = state.clone();
    let (provider, cost, request) = (lead.provider.clone(), lead.cost, lead.request.clone());
    state.spawn_background(async move {
        let mut record = record;
        let mut lead_answer = None;
        match crate::audit::ask_lead(&provider, cost, request).await {
            Ok(audit) => {
                if let Some(routing) = record.routing.as_mut() {
                    crate::audit::apply_audit(routing, &audit);
                }
                record.cost = record.cost + audit.cost;
                lead_answer = audit.answer;
            }
            Err(error) => tracing::warn!(%error, task, "the lead failed to answer an audit"),
        }
        let agreement = record.routing.as_ref().and_then(|routing| routing.audit_agreement);
        audit_state.record(record).await;
        if let Some(agreed) = agreement {
            audit_state.count_audit(&task, &route, agreed).await;
        }
        if let Some(answer) = lead_answer {
            audit_state.count_lead_answer(&task, &route, &answer).await;
        }
    });
}

/// Records a lead-served call once the understudy's answer (if one is
/// pending) is in, with the agreement of the two.
pub(crate) async fn record_with_understudy(
    state: &AppState,
    mut record: CallRecord,
    pending: Option<PendingAttempt>,
    lead_answer: Option<String>,
) {
    if let Some(pending) = pending {
        let attempt = pending.await;
        if let (Some(routing), Some(attempt)) = (record.routing.as_mut(), attempt) {
            routing.understudy_answer = attempt.content().map(str::to_string);
            routing.understudy_confidence = attempt.confidence();
            routing.understudy_latency_ms = Some(attempt.latency_ms);
            routing.understudy_cost = attempt.cost;
            routing.agreement = match (attempt.content(), lead_answer.as_deref()) {
                (Some(understudy), Some(lead)) if record.status == 200 && record.error.is_none() => {
                    Some(understudy_types::answers_agree(understudy, lead))
                }
                _ => None,
            };
            if routing.fallback_reason.is_none() {
                if let AttemptOutcome::Failed(error) = &attempt.outcome {
                    tracing::warn!(understudy = %attempt.model, %error, "shadow understudy failed");
                }
            }
            record.cost = record.cost + attempt.cost;
        }
    }
    // A fallback shows the lead's answer on a call the serving understudy
    // was asked: the guardrail looks for labels it cannot give.
    let fallback = record.routing.as_ref().filter(|routing| routing.fallback_reason.is_some());
    let watched = match (fallback, record.task.as_deref(), lead_answer.as_deref()) {
        (Some(routing), Some(task), Some(answer)) if record.is_success() => state
            .route(task)
            .filter(|route| {
                route.understudy.as_ref().map(|understudy| &understudy.name) == routing.understudy_model.as_ref()
            })
            .map(|route| (task.to_string(), route, answer.to_string())),
        _ => None,
    };
    state.record(record).await;
    if let Some((task, route, answer)) = watched {
        state.count_lead_answer(&task, &route, &answer).await;
    }
}

fn answer_text(completion: &Value) -> Option<String> {
    completion.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string)
}

struct Prepared {
    request: ChatRequest,
    messages: Vec<Value>,
    provider: Arc<AnyProvider>,
    model: ModelConfig,
    /// How the call is priced: a local model by its machine time.
    cost: CostModel,
    stream: bool,
    include_usage: bool,
}

/// The most a call may cost and use: its prompt, counted, and its answer
/// at `max_tokens` for each of its `n` choices, at the model's prices.
fn estimate(prepared: &Prepared) -> Estimate {
    let body = &prepared.request.body;
    let answer_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|field| body.get(*field).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_ANSWER_TOKENS);
    let n_choices = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    let usage = Usage {
        prompt_tokens: tokens::count_messages(&prepared.messages),
        completion_tokens: answer_tokens.saturating_mul(n_choices),
    };
    Estimate { cost: prepared.model.price.cost(usage), tokens: usage.total_tokens() }
}

fn prepare(
    state: &AppState,
    caller: &Caller,
    body: RequestBody,
    draft: &mut CallDraft,
) -> Result<Prepared, GatewayError> {
    let mut body = parse_body(body, draft)?;
    draft.stream = matches!(body.get("stream"), Some(Value::Bool(true)));
    let model = resolve_model(state, &mut body, draft)?.clone();
    caller.check_scope(draft.task.as_deref(), &draft.model)?;
    let flags = check_chat(&body)?;
    let provider = state.provider(&model.provider)?.clone();
    let messages = body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    let cost = CostModel::of(&provider, model.price);
    Ok(Prepared {
        request: ChatRequest { body },
        messages,
        provider,
        model,
        cost,
        stream: flags.stream,
        include_usage: flags.include_usage,
    })
}

async fn fail(state: &AppState, draft: CallDraft, error: GatewayError) -> Response {
    tracing::debug!(%error, model = %draft.model, "chat completion failed");
    state.record(draft.fail(&error)).await;
    error.into_response()
}

/// Usage as the provider reported it, or counted from the texts.
fn usage_or_counted(
    reported: Option<Usage>,
    messages: &[Value],
    answer: impl FnOnce() -> Value,
) -> (Usage, UsageSource) {
    match reported {
        Some(usage) => (usage, UsageSource::Provider),
        None => (
            Usage {
                prompt_tokens: tokens::count_messages(messages),
                completion_tokens: tokens::count_answer(&answer()),
            },
            UsageSource::Counted,
        ),
    }
}

async fn complete(
    state: AppState,
    mut draft: CallDraft,
    prepared: Prepared,
    pending: Option<PendingAttempt>,
) -> Response {
    let ProviderResponse { body, usage, headers, .. } = match prepared.provider.infer(prepared.request).await {
        Ok(response) => response,
        Err(error) => return fail(&state, draft, error.into()).await,
    };
    draft.note_upstream(&headers);
    let (usage, usage_source) = usage_or_counted(usage, &prepared.messages, || {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|completion| completion.pointer("/choices/0/message").cloned())
            .unwrap_or(Value::Null)
    });
    let lead_answer =
        pending.is_some().then(|| serde_json::from_slice::<Value>(&body).ok().as_ref().and_then(answer_text));
    answered(state, draft, &prepared.cost, Answered { body, headers, usage, usage_source, lead_answer }, pending).await
}

/// A lead's whole (non-streamed) answer, as any endpoint hands it on.
pub(crate) struct Answered {
    pub body: Bytes,
    pub headers: HeaderMap,
    pub usage: Usage,
    pub usage_source: UsageSource,
    /// The answer's text, for comparing with a pending understudy's.
    pub lead_answer: Option<Option<String>>,
}

/// The one ending of a call the lead answered whole: priced, recorded (after
/// a pending understudy's answer, off the response path), and sent on with
/// the upstream's headers.
pub(crate) async fn answered(
    state: AppState,
    draft: CallDraft,
    cost_model: &CostModel,
    answer: Answered,
    pending: Option<PendingAttempt>,
) -> Response {
    let Answered { body, headers, usage, usage_source, lead_answer } = answer;
    let ttft_ms = Some(draft.elapsed_ms());
    let cost = cost_model.cost(Some(usage), draft.elapsed());
    let record = draft.finish(Outcome {
        status: StatusCode::OK.as_u16(),
        response: Some(understudy_types::text_of_body(&body)),
        usage,
        usage_source,
        cost,
        ttft_ms,
        error: None,
    });
    match pending {
        None => state.record(record).await,
        Some(pending) => {
            // The client has its answer now; the record waits for the understudy's.
            let lead_answer = lead_answer.flatten();
            let background = state.clone();
            background.spawn_background(async move {
                record_with_understudy(&state, record, Some(pending), lead_answer).await
            });
        }
    }
    // The upstream's passed headers become the response's own map (never
    // holding a content type), instead of being inserted one by one.
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = headers;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The client's side of a relayed stream: what the relay task sends, as an
/// SSE body with the upstream's headers.
pub(crate) fn event_stream(headers: HeaderMap, mut receiver: mpsc::Receiver<Bytes>) -> Response {
    let body = futures::stream::poll_fn(move |context| {
        receiver.poll_recv(context).map(|bytes| bytes.map(Ok::<_, Infallible>))
    });
    (
        headers,
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(body),
    )
        .into_response()
}

async fn stream(
    state: AppState,
    mut draft: CallDraft,
    prepared: Prepared,
    pending: Option<PendingAttempt>,
) -> Response {
    let StreamResponse { chunks, headers } = match prepared.provider.infer_stream(prepared.request.clone()).await {
        Ok(response) => response,
        Err(error) => return fail(&state, draft, error.into()).await,
    };
    draft.note_upstream(&headers);
    // The relay runs in its own task so that the call is recorded even when
    // the client goes away mid-stream.
    let (sender, receiver) = mpsc::channel::<Bytes>(32);
    state.clone().spawn_background(relay(state, draft, prepared, chunks, sender, pending));
    event_stream(headers, receiver)
}

/// A chunk as the client is sent it, or `None` for a chunk it is not sent.
/// A client that did not ask for usage (`stream_options.include_usage`)
/// gets chunks without a `usage` field, as OpenAI sends them: the gateway
/// asks upstreams for usage anyway, and they then put `"usage": null` in
/// every chunk and `usage` alone in a last one, which is held back.
pub(crate) fn chunk_for_client(data: String, chunk: &Value, include_usage: bool) -> Option<String> {
    let Some(object) = chunk.as_object().filter(|object| !include_usage && object.contains_key("usage")) else {
        return Some(data);
    };
    let usage_only = object.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
    if usage_only {
        return None;
    }
    let mut object = object.clone();
    object.remove("usage");
    Some(Value::Object(object).to_string())
}

async fn relay(
    state: AppState,
    draft: CallDraft,
    prepared: Prepared,
    chunks: ChunkStream,
    sender: mpsc::Sender<Bytes>,
    pending: Option<PendingAttempt>,
) {
    let mut assembler = StreamAssembler::default();
    let relayed = crate::relay::forward(
        &draft,
        &prepared.model.provider,
        prepared.include_usage,
        chunks,
        &sender,
        &mut assembler,
    )
    .await;
    drop(sender);
    let (usage, usage_source) = usage_or_counted(assembler.usage(), &prepared.messages, || assembler.first_message());
    let completion = assembler.finish();
    // Tokens the upstream produced are paid for even if the stream broke.
    let cost = prepared.cost.cost(Some(usage), draft.elapsed());
    let record = draft.finish(relayed.outcome(completion.to_string(), usage, usage_source, cost));
    let lead_answer = answer_text(&completion);
    record_with_understudy(&state, record, pending, lead_answer).await;
}
