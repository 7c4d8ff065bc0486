//! `POST /v1/completions`, OpenAI's legacy text completions: passed through
//! to the model's OpenAI-compatible provider, streamed or not, and recorded
//! like a chat call (a stream's chunks assembled into one `text_completion`).
//! Tasks and routing are for chat; a `task:NAME` model reaches its lead.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use understudy_providers::{tokens, ChatRequest, ChunkStream, CostModel, Provider, ProviderResponse, StreamResponse};
use understudy_types::{Endpoint, Usage, UsageSource};

use crate::auth::Caller;
use crate::draft::{CallDraft, Outcome};
use crate::limits::Estimate;
use crate::relay::Assemble;
use crate::request::{parse_body, resolve_model, RequestBody};
use crate::{AppState, GatewayError};

/// Answer tokens assumed for the budget when the client sets no
/// `max_tokens` (the legacy endpoint's own default is 16).
const DEFAULT_ANSWER_TOKENS: u64 = 16;

pub(crate) async fn completions(State(state): State<AppState>, caller: Caller, body: RequestBody) -> Response {
    let draft = CallDraft::start(Endpoint::Completions, caller.key_ref());
    let call_id = draft.id;
    state.inner.recent_calls.remember(call_id, caller.key_id().map(str::to_string));
    let (client, span) = (draft.client.clone(), draft.span.clone());
    let mut response = state.clone().serve_detached(client, span, move || serve(state, draft, caller, body)).await;
    crate::feedback::tag_call_id(&mut response, call_id);
    response
}

struct Prepared {
    provider: std::sync::Arc<understudy_providers::AnyProvider>,
    cost: CostModel,
    body: Map<String, Value>,
    provider_name: String,
    prompt: Value,
    include_usage: bool,
}

async fn serve(state: AppState, mut draft: CallDraft, caller: Caller, body: RequestBody) -> Response {
    let prepared = match prepare(&state, &caller, body, &mut draft).await {
        Ok(prepared) => prepared,
        Err(error) => {
            state.record(draft.fail(&error)).await;
            return error.into_response();
        }
    };
    if draft.stream {
        stream(state, draft, prepared).await
    } else {
        complete(state, draft, prepared).await
    }
}

async fn prepare(
    state: &AppState,
    caller: &Caller,
    body: RequestBody,
    draft: &mut CallDraft,
) -> Result<Prepared, GatewayError> {
    let mut body = parse_body(body, draft)?;
    draft.stream = matches!(body.get("stream"), Some(Value::Bool(true)));
    let model = resolve_model(state, &mut body, draft)?.clone();
    caller.check_scope(draft.task.as_deref(), &draft.model)?;
    let provider = state.provider(&model.provider)?.clone();
    if provider.provider_type() != understudy_providers::OpenAiProvider::PROVIDER_TYPE {
        return Err(GatewayError::Provider(understudy_providers::ProviderError::Unsupported {
            provider: model.provider.clone(),
            provider_type: provider.provider_type(),
            what: "legacy text completions (/v1/completions)",
        }));
    }
    let prompt = match body.get("prompt") {
        Some(prompt @ (Value::String(_) | Value::Array(_))) => prompt.clone(),
        Some(_) => return Err(GatewayError::invalid("`prompt` must be a string or an array.", "prompt")),
        None => return Err(GatewayError::invalid("Missing required parameter: `prompt`.", "prompt")),
    };
    let include_usage =
        body.get("stream_options").and_then(|options| options.get("include_usage")) == Some(&Value::Bool(true));
    let answer_tokens = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(DEFAULT_ANSWER_TOKENS);
    let n_choices = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    state
        .admit(caller, draft.id, || {
            let usage = Usage {
                prompt_tokens: tokens::count_embedding_input(&prompt),
                completion_tokens: answer_tokens.saturating_mul(n_choices),
            };
            Estimate { cost: model.price.cost(usage), tokens: usage.total_tokens() }
        })
        .await?;
    let cost = CostModel::of(&provider, model.price);
    Ok(Prepared { provider, cost, body, provider_name: model.provider.clone(), prompt, include_usage })
}

/// Usage as the provider reported it, or counted from the prompt and the texts.
fn usage_or_counted(reported: Option<Usage>, prompt: &Value, answer: impl FnOnce() -> String) -> (Usage, UsageSource) {
    match reported {
        Some(usage) => (usage, UsageSource::Provider),
        None => (
            Usage {
                prompt_tokens: tokens::count_embedding_input(prompt),
                completion_tokens: tokens::count_text(&answer()),
            },
            UsageSource::Counted,
        ),
    }
}

async fn complete(state: AppState, mut draft: CallDraft, prepared: Prepared) -> Response {
    let request = ChatRequest { body: prepared.body };
    let ProviderResponse { body, usage, headers, .. } = match prepared.provider.text_completion(request).await {
        Ok(response) => response,
        Err(error) => {
            let error = GatewayError::from(error);
            state.record(draft.fail(&error)).await;
            return error.into_response();
        }
    };
    draft.note_upstream(&headers);
    let (usage, usage_source) = usage_or_counted(usage, &prepared.prompt, || {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|completion| completion.pointer("/choices/0/text").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    });
    let (cost, ttft_ms) = (prepared.cost.cost(Some(usage), draft.elapsed()), Some(draft.elapsed_ms()));
    let record = draft.finish(Outcome {
        status: 200,
        response: Some(understudy_types::text_of_body(&body)),
        usage,
        usage_source,
        cost,
        ttft_ms,
        error: None,
    });
    state.record(record).await;
    (headers, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn stream(state: AppState, mut draft: CallDraft, prepared: Prepared) -> Response {
    // The provider asks for usage, for the record; a client that did not
    // ask for it is not sent it (`chat::chunk_for_client`).
    let request = ChatRequest { body: prepared.body.clone() };
    let StreamResponse { chunks, headers } = match prepared.provider.text_completion_stream(request).await {
        Ok(response) => response,
        Err(error) => {
            let error = GatewayError::from(error);
            state.record(draft.fail(&error)).await;
            return error.into_response();
        }
    };
    draft.note_upstream(&headers);
    let (sender, mut receiver) = mpsc::channel::<Bytes>(32);
    state.clone().spawn_background(relay(state, draft, prepared, chunks, sender));
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

impl Assemble for TextAssembler {
    /// Every chunk counts for the time to first token (a legacy stream has no role-only chunk).
    fn push(&mut self, chunk: &Value) -> bool {
        self.push_chunk(chunk);
        true
    }

    fn incomplete(&self) -> Option<String> {
        self.missing()
    }
}

/// A legacy stream's chunks joined into one `text_completion`.
#[derive(Default)]
struct TextAssembler {
    first: Option<Value>,
    texts: BTreeMap<u64, (String, Value)>,
    usage: Option<Value>,
}

impl TextAssembler {
    fn push_chunk(&mut self, chunk: &Value) {
        if self.first.is_none() {
            self.first = Some(chunk.clone());
        }
        if let Some(usage) = chunk.get("usage").filter(|usage| !usage.is_null()) {
            self.usage = Some(usage.clone());
        }
        for choice in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let (text, finish_reason) = self.texts.entry(index).or_insert_with(|| (String::new(), Value::Null));
            if let Some(piece) = choice.get("text").and_then(Value::as_str) {
                text.push_str(piece);
            }
            if let Some(reason) = choice.get("finish_reason").filter(|reason| !reason.is_null()) {
                *finish_reason = reason.clone();
            }
        }
    }

    fn missing(&self) -> Option<String> {
        if self.texts.is_empty() {
            return Some("the upstream's stream ended without any answer chunk".to_string());
        }
        self.texts
            .values()
            .any(|(_, reason)| reason.is_null())
            .then(|| "the upstream's stream ended before a finish_reason".to_string())
    }

    fn finish(&self) -> Value {
        let first = self.first.clone().unwrap_or(Value::Null);
        let choices: Vec<Value> = self
            .texts
            .iter()
            .map(|(index, (text, reason))| json!({"index": index, "text": text, "finish_reason": reason}))
            .collect();
        let mut completion = json!({
            "id": first.get("id"), "object": "text_completion", "created": first.get("created"),
            "model": first.get("model"), "choices": choices,
        });
        if let Some(usage) = &self.usage {
            completion["usage"] = usage.clone();
        }
        completion
    }
}

async fn relay(
    state: AppState,
    draft: CallDraft,
    prepared: Prepared,
    chunks: ChunkStream,
    sender: mpsc::Sender<Bytes>,
) {
    let mut assembler = TextAssembler::default();
    let relayed =
        crate::relay::forward(&draft, &prepared.provider_name, prepared.include_usage, chunks, &sender, &mut assembler)
            .await;
    drop(sender);
    let completion = assembler.finish();
    let usage = assembler.usage.as_ref().and_then(|usage| understudy_providers::usage_of(&json!({"usage": usage})));
    let (usage, usage_source) = usage_or_counted(usage, &prepared.prompt, || {
        completion.pointer("/choices/0/text").and_then(Value::as_str).unwrap_or_default().to_string()
    });
    let cost = prepared.cost.cost(Some(usage), draft.elapsed());
    let record = draft.finish(relayed.outcome(completion.to_string(), usage, usage_source, cost));
    state.record(record).await;
}
