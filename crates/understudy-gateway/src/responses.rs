//! `POST /v1/responses`, OpenAI's Responses API, streamed and not.
//!
//! A call goes to the model's OpenAI-compatible provider as it came (its
//! `model` rewritten), and is recorded like a chat call: the client's
//! request, the response object (a stream's events assembled into the
//! `response.completed` one), usage (`input_tokens`/`output_tokens`) and cost,
//! as `Endpoint::Responses`. A `task:NAME` model takes chat's routing path
//! (`chat::route_call`): the call's chat form (the one conversion,
//! `understudy_datasets::responses`) is what the understudy is asked, and a
//! served answer is rendered as a response object or its event stream.
//! The understudy is never asked a call that has no chat form, or tools, or
//! a `text.format` (`unsupported_input`), nor one that uses the lead's
//! stored state (`stateful`): `previous_response_id`, `conversation`,
//! `background`, or `store` set to true. `store` left out is not stateful,
//! although OpenAI stores responses by default: an application that chains
//! calls with `previous_response_id` gets stateful routing on the calls
//! that chain, and a response the understudy served is stored nowhere, so a
//! client that chains from one must send `store: true` on it.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use understudy_datasets::responses::{
    assistant_message, chat_messages, chat_response_format, chat_tools, ConversionError,
};
use understudy_providers::Provider;
use understudy_providers::{
    tokens, AnyProvider, ChatRequest, ChunkStream, CostModel, ProviderResponse, StreamResponse,
};
use understudy_router::FallbackReason;
use understudy_types::{Endpoint, Usage};

use crate::auth::Caller;
use crate::chat::{
    answered, event_stream, record_served, record_with_understudy, route_call, Answered, LeadSide, PendingAttempt,
    Routed, ServedAttempt,
};
use crate::draft::CallDraft;
use crate::limits::{Estimate, DEFAULT_ANSWER_TOKENS};
use crate::relay::Assemble;
use crate::request::{parse_body, resolve_model, RequestBody};
use crate::{AppState, GatewayError};

pub(crate) async fn responses(State(state): State<AppState>, caller: Caller, body: RequestBody) -> Response {
    let draft = CallDraft::start(Endpoint::Responses, caller.key_ref());
    let call_id = draft.id;
    state.inner.recent_calls.remember(call_id, caller.key_id().map(str::to_string));
    let (client, span) = (draft.client.clone(), draft.span.clone());
    let mut response = state.clone().serve_detached(client, span, || serve(state.clone(), draft, caller, body)).await;
    if !response.status().is_success() {
        state.inner.recent_calls.finished(call_id, false);
    }
    crate::feedback::tag_call_id(&mut response, call_id);
    response
}

struct Prepared {
    /// The Responses request, for the lead.
    request: ChatRequest,
    /// The call as a chat request, for the understudy (empty messages when
    /// it has no chat form; `blocked` then says why).
    chat: ChatRequest,
    messages: Vec<Value>,
    /// Why the understudy may not answer this call.
    blocked: Option<FallbackReason>,
    provider: Arc<AnyProvider>,
    model: understudy_config::ModelConfig,
    cost: CostModel,
}

async fn serve(state: AppState, mut draft: CallDraft, caller: Caller, body: RequestBody) -> Response {
    let prepared = match prepare(&state, &caller, body, &mut draft).await {
        Ok(prepared) => prepared,
        Err(error) => return fail(&state, draft, error).await,
    };
    match route_call(&state, &mut draft, &prepared.chat, prepared.blocked).await {
        Routed::Lead(pending) if draft.stream => stream(state, draft, prepared, pending).await,
        Routed::Lead(pending) => complete(state, draft, prepared, pending).await,
        Routed::Understudy(served) => Box::pin(serve_understudy(state, draft, prepared, served)).await,
    }
}

async fn fail(state: &AppState, draft: CallDraft, error: GatewayError) -> Response {
    state.record(draft.fail(&error)).await;
    error.into_response()
}

async fn prepare(
    state: &AppState,
    caller: &Caller,
    body: RequestBody,
    draft: &mut CallDraft,
) -> Result<Prepared, GatewayError> {
    let mut body = parse_body(body, draft)?;
    draft.stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(GatewayError::invalid("`stream` must be a boolean.", "stream")),
    };
    let model = resolve_model(state, &mut body, draft)?.clone();
    caller.check_scope(draft.task.as_deref(), &draft.model)?;
    let provider = state.provider(&model.provider)?.clone();
    if provider.provider_type() != understudy_providers::OpenAiProvider::PROVIDER_TYPE {
        return Err(GatewayError::Provider(understudy_providers::ProviderError::Unsupported {
            provider: model.provider.clone(),
            provider_type: provider.provider_type(),
            what: "the Responses API (/v1/responses)",
        }));
    }
    let invalid = |error: ConversionError| match error {
        ConversionError::Invalid { message, param } => Err(GatewayError::invalid(message, param)),
        ConversionError::NotText(_) => Ok(()),
    };
    let (messages, mut blocked) = match chat_messages(&body) {
        Ok(messages) => (messages, None),
        Err(error) => {
            invalid(error)?;
            (Vec::new(), Some(FallbackReason::UnsupportedInput))
        }
    };
    match chat_tools(&body) {
        Ok(None) => {}
        Ok(Some(_)) => blocked = Some(FallbackReason::UnsupportedInput),
        Err(error) => {
            invalid(error)?;
            blocked = Some(FallbackReason::UnsupportedInput);
        }
    }
    // A structured answer is asked of the understudy as chat asks it.
    let response_format = match chat_response_format(&body) {
        Ok(format) => format,
        Err(error) => {
            invalid(error)?;
            None
        }
    };
    if is_stateful(&body) {
        blocked = Some(FallbackReason::Stateful);
    }
    let answer_tokens = body.get("max_output_tokens").and_then(Value::as_u64);
    let prompt_tokens = if messages.is_empty() {
        tokens::count_text(&body.get("input").map(Value::to_string).unwrap_or_default())
    } else {
        tokens::count_messages(&messages)
    };
    state
        .admit(caller, draft.id, || {
            let usage = Usage { prompt_tokens, completion_tokens: answer_tokens.unwrap_or(DEFAULT_ANSWER_TOKENS) };
            Estimate { cost: model.price.cost(usage), tokens: usage.total_tokens() }
        })
        .await?;
    let mut chat = Map::new();
    chat.insert("model".into(), body.get("model").cloned().unwrap_or(Value::Null));
    chat.insert("messages".into(), Value::Array(messages.clone()));
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "max_tokens")] {
        if let Some(value) = body.get(from).filter(|value| !value.is_null()) {
            chat.insert(to.into(), value.clone());
        }
    }
    if let Some(format) = response_format {
        chat.insert("response_format".into(), format);
    }
    let cost = CostModel::of(&provider, model.price);
    Ok(Prepared {
        request: ChatRequest { body },
        chat: ChatRequest { body: chat },
        messages,
        blocked,
        provider,
        model,
        cost,
    })
}

/// Whether the call relies on state the lead keeps between calls.
fn is_stateful(body: &Map<String, Value>) -> bool {
    let set = |field: &str| body.get(field).is_some_and(|value| !value.is_null());
    set("previous_response_id")
        || set("conversation")
        || body.get("store") == Some(&Value::Bool(true))
        || body.get("background") == Some(&Value::Bool(true))
}

/// The answer's text, for agreement with the understudy's.
fn answer_text(response: &Value) -> Option<String> {
    assistant_message(response).ok()?.get("content").and_then(Value::as_str).map(str::to_string)
}

/// Usage as the upstream reported it, or counted from the chat form.
fn usage_or_counted(
    reported: Option<Usage>,
    prepared: &Prepared,
    response: &Value,
) -> (Usage, understudy_types::UsageSource) {
    match reported {
        Some(usage) => (usage, understudy_types::UsageSource::Provider),
        None => {
            let answer = assistant_message(response).map(Value::Object).unwrap_or(Value::Null);
            let usage = Usage {
                prompt_tokens: tokens::count_messages(&prepared.messages),
                completion_tokens: tokens::count_answer(&answer),
            };
            (usage, understudy_types::UsageSource::Counted)
        }
    }
}

async fn complete(
    state: AppState,
    mut draft: CallDraft,
    prepared: Prepared,
    pending: Option<PendingAttempt>,
) -> Response {
    let ProviderResponse { body, usage, headers, .. } =
        match prepared.provider.responses(prepared.request.clone()).await {
            Ok(response) => response,
            Err(error) => return fail(&state, draft, error.into()).await,
        };
    draft.note_upstream(&headers);
    let response = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let (usage, usage_source) = usage_or_counted(usage, &prepared, &response);
    let lead_answer = pending.is_some().then(|| answer_text(&response));
    answered(state, draft, &prepared.cost, Answered { body, headers, usage, usage_source, lead_answer }, pending).await
}

async fn stream(
    state: AppState,
    mut draft: CallDraft,
    prepared: Prepared,
    pending: Option<PendingAttempt>,
) -> Response {
    let StreamResponse { chunks, headers } = match prepared.provider.responses_stream(prepared.request.clone()).await {
        Ok(response) => response,
        Err(error) => return fail(&state, draft, error.into()).await,
    };
    draft.note_upstream(&headers);
    let (sender, receiver) = mpsc::channel::<Bytes>(32);
    state.clone().spawn_background(relay(state, draft, prepared, chunks, sender, pending));
    event_stream(headers, receiver)
}

async fn relay(
    state: AppState,
    draft: CallDraft,
    prepared: Prepared,
    chunks: ChunkStream,
    sender: mpsc::Sender<Bytes>,
    pending: Option<PendingAttempt>,
) {
    let mut assembler = ResponsesAssembler::default();
    let relayed = crate::relay::forward(&draft, &prepared.model.provider, false, chunks, &sender, &mut assembler).await;
    drop(sender);
    let response = assembler.finish();
    let reported = assembler.response.as_ref().and_then(understudy_providers::usage_of);
    let (usage, usage_source) = usage_or_counted(reported, &prepared, &response);
    let cost = prepared.cost.cost(Some(usage), draft.elapsed());
    let record = draft.finish(relayed.outcome(response.to_string(), usage, usage_source, cost));
    let lead_answer = answer_text(&response);
    record_with_understudy(&state, record, pending, lead_answer).await;
}

/// A Responses event stream joined into its response: the last `response`
/// object an event carried (`response.completed` in a whole stream), and
/// the text deltas, for a stream cut off before it.
#[derive(Default)]
struct ResponsesAssembler {
    response: Option<Value>,
    /// The terminal event seen (`response.completed`, `.incomplete`, `.failed`).
    terminal: Option<String>,
    /// An `error` event's message.
    upstream_error: Option<String>,
    text: String,
    answered: bool,
    last_sequence_number: Option<u64>,
}

impl ResponsesAssembler {
    fn finish(&self) -> Value {
        let mut response = self.response.clone().unwrap_or_else(|| json!({"object": "response", "output": []}));
        let has_output = response.get("output").and_then(Value::as_array).is_some_and(|output| !output.is_empty());
        if !has_output && !self.text.is_empty() {
            response["output"] = json!([message_item("msg_partial", &self.text, "incomplete")]);
        }
        response
    }
}

impl Assemble for ResponsesAssembler {
    fn push(&mut self, event: &Value) -> bool {
        if let Some(sequence_number) = event.get("sequence_number").and_then(Value::as_u64) {
            self.last_sequence_number = Some(sequence_number);
        }
        let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
        if let Some(response) = event.get("response").filter(|response| response.is_object()) {
            self.response = Some(response.clone());
        }
        match kind {
            "response.completed" | "response.incomplete" | "response.failed" => self.terminal = Some(kind.to_string()),
            "error" => {
                let message = event.get("message").and_then(Value::as_str).unwrap_or("an error event");
                self.upstream_error = Some(message.to_string());
            }
            "response.output_text.delta" => {
                if let Some(delta) = event.get("delta").and_then(Value::as_str) {
                    self.text.push_str(delta);
                }
            }
            _ => {}
        }
        let answers = matches!(
            kind,
            "response.output_text.delta" | "response.refusal.delta" | "response.function_call_arguments.delta"
        );
        let first = answers && !self.answered;
        self.answered |= answers;
        first
    }

    fn incomplete(&self) -> Option<String> {
        if let Some(error) = &self.upstream_error {
            return Some(format!("the upstream's stream sent an error: {error}"));
        }
        match self.terminal.as_deref() {
            None => Some("the upstream's stream ended before its response was completed".to_string()),
            Some("response.failed") => {
                let error = self.response.as_ref().and_then(|response| response.pointer("/error/message"));
                Some(format!(
                    "the upstream's response failed: {}",
                    error.and_then(Value::as_str).unwrap_or("no reason")
                ))
            }
            Some(_) => None,
        }
    }

    /// A Responses event goes out under its `event:` name, as OpenAI sends it.
    fn client_event(&self, data: String, event: &Value, _include_usage: bool) -> Option<Bytes> {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("message");
        Some(named_event(kind, &data))
    }

    /// A Responses stream has no `[DONE]`: its terminal event ends it.
    fn end_event(&self) -> Option<Bytes> {
        None
    }

    /// An `error` event, as the Responses API sends one (with the error
    /// object too, which older clients raise on).
    fn error_event(&self, error: &GatewayError) -> Bytes {
        let body = serde_json::from_slice::<Value>(&error.body()).unwrap_or(Value::Null);
        let detail = body.get("error").cloned().unwrap_or(Value::Null);
        let event = json!({
            "type": "error",
            "code": detail.get("code"),
            "message": detail.get("message"),
            "param": detail.get("param"),
            "sequence_number": self.last_sequence_number.map_or(0, |number| number + 1),
            "error": detail,
        });
        named_event("error", &event.to_string())
    }
}

fn named_event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// An assistant message item holding `text`.
fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

/// Serves the understudy's chat answer as a response object, or its events.
async fn serve_understudy(state: AppState, draft: CallDraft, prepared: Prepared, served: ServedAttempt) -> Response {
    let completion = match &served.attempt.outcome {
        understudy_providers::AttemptOutcome::Answered { body, .. } => {
            serde_json::from_slice::<Value>(body).unwrap_or(Value::Null)
        }
        _ => Value::Null,
    };
    let response = response_of_chat(&completion, &prepared.request.body, &draft, &prepared.messages);
    let lead = LeadSide {
        provider: &prepared.provider,
        cost: prepared.cost,
        request: &prepared.chat,
        price: prepared.model.price,
        messages: &prepared.messages,
    };
    let stream = draft.stream;
    record_served(&state, draft, served, &lead, response.to_string()).await;
    if !stream {
        return ([(header::CONTENT_TYPE, "application/json")], response.to_string()).into_response();
    }
    let events: Vec<Result<Bytes, Infallible>> = events_of_response(&response)
        .into_iter()
        .map(|event| {
            let kind = event.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
            Ok(named_event(&kind, &event.to_string()))
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(futures::stream::iter(events)),
    )
        .into_response()
}

/// A chat completion (the understudy's) as a Responses API response object,
/// echoing the request's settings as OpenAI does. Its ids come from the
/// call's id, so a record and its answer name the same response.
fn response_of_chat(completion: &Value, request: &Map<String, Value>, draft: &CallDraft, messages: &[Value]) -> Value {
    let text = completion.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or_default();
    let truncated = completion.pointer("/choices/0/finish_reason").and_then(Value::as_str) == Some("length");
    let id = draft.id.simple();
    let usage = Usage {
        prompt_tokens: tokens::count_messages(messages),
        completion_tokens: tokens::count_answer(&json!({"role": "assistant", "content": text})),
    };
    let echo = |field: &str, default: Value| request.get(field).cloned().unwrap_or(default);
    json!({
        "id": format!("resp_{id}"),
        "object": "response",
        "created_at": draft.created_at.unix_timestamp(),
        "status": if truncated { "incomplete" } else { "completed" },
        "error": null,
        "incomplete_details": if truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": echo("instructions", Value::Null),
        "max_output_tokens": echo("max_output_tokens", Value::Null),
        "model": completion.get("model").cloned().unwrap_or(Value::Null),
        "output": [message_item(&format!("msg_{id}"), text, "completed")],
        "parallel_tool_calls": echo("parallel_tool_calls", Value::Bool(true)),
        "previous_response_id": null,
        "store": false,
        "temperature": echo("temperature", json!(1.0)),
        "text": echo("text", json!({"format": {"type": "text"}})),
        "tool_choice": echo("tool_choice", json!("auto")),
        "tools": [],
        "top_p": echo("top_p", json!(1.0)),
        "truncation": "disabled",
        "metadata": echo("metadata", json!({})),
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens(),
        },
    })
}

/// The events a stream of `response` (one text message) carries, in order.
fn events_of_response(response: &Value) -> Vec<Value> {
    let item = response.pointer("/output/0").cloned().unwrap_or(Value::Null);
    let item_id = item.get("id").cloned().unwrap_or(Value::Null);
    let part = item.pointer("/content/0").cloned().unwrap_or(Value::Null);
    let text = part.get("text").cloned().unwrap_or(Value::Null);
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    started["incomplete_details"] = Value::Null;
    let mut added_item = item.clone();
    added_item["status"] = json!("in_progress");
    added_item["content"] = json!([]);
    let empty_part = json!({"type": "output_text", "text": "", "annotations": []});
    let terminal =
        if response.get("status") == Some(&json!("incomplete")) { "response.incomplete" } else { "response.completed" };
    // An event: its type, then its fields (the text events' also name the part).
    let with = |kind: &str, fields: Value| {
        let mut event = json!({"type": kind});
        if let Value::Object(fields) = fields {
            event.as_object_mut().into_iter().for_each(|object| object.extend(fields.clone()));
        }
        event
    };
    let joined = |extra: Value| {
        let mut fields = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        if let (Some(fields), Value::Object(extra)) = (fields.as_object_mut(), extra) {
            fields.extend(extra);
        }
        fields
    };
    let mut events = vec![
        with("response.created", json!({"response": started.clone()})),
        with("response.in_progress", json!({"response": started})),
        with("response.output_item.added", json!({"output_index": 0, "item": added_item})),
        with("response.content_part.added", joined(json!({"part": empty_part}))),
        with("response.output_text.delta", joined(json!({"delta": text.clone(), "logprobs": []}))),
        with("response.output_text.done", joined(json!({"text": text, "logprobs": []}))),
        with("response.content_part.done", joined(json!({"part": part}))),
        with("response.output_item.done", json!({"output_index": 0, "item": item})),
        with(terminal, json!({"response": response})),
    ];
    for (sequence_number, event) in events.iter_mut().enumerate() {
        event["sequence_number"] = json!(sequence_number);
    }
    events
}
