//! `POST /v1/chat/completions`, streamed and not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use understudy_config::ModelConfig;
use understudy_providers::{tokens, AnyProvider, ChatRequest, ChunkStream, ProviderResponse};
use understudy_types::{Endpoint, Usage, UsageSource};

use crate::assemble::StreamAssembler;
use crate::draft::{CallDraft, Outcome};
use crate::request::{check_chat, parse_body, resolve_model};
use crate::{AppState, GatewayError};

pub(crate) async fn chat_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let mut draft = CallDraft::start(Endpoint::ChatCompletions);
    match prepare(&state, body, &mut draft) {
        Err(error) => fail(&state, draft, error).await,
        Ok(prepared) if prepared.stream => stream(state, draft, prepared).await,
        Ok(prepared) => complete(state, draft, prepared).await,
    }
}

struct Prepared {
    request: ChatRequest,
    messages: Vec<Value>,
    provider: Arc<AnyProvider>,
    model: ModelConfig,
    stream: bool,
    include_usage: bool,
}

fn prepare(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    draft: &mut CallDraft,
) -> Result<Prepared, GatewayError> {
    let mut body = parse_body(state, body, draft)?;
    draft.stream = matches!(body.get("stream"), Some(Value::Bool(true)));
    let model = resolve_model(state, &mut body, draft)?.clone();
    let flags = check_chat(&body)?;
    let provider = state.provider(&model.provider)?.clone();
    let messages = body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(Prepared {
        request: ChatRequest { body },
        messages,
        provider,
        model,
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

async fn complete(state: AppState, draft: CallDraft, prepared: Prepared) -> Response {
    let ProviderResponse { body, usage } = match prepared.provider.infer(prepared.request).await {
        Ok(response) => response,
        Err(error) => return fail(&state, draft, error.into()).await,
    };
    let (usage, usage_source) = usage_or_counted(usage, &prepared.messages, || {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|completion| completion.pointer("/choices/0/message").cloned())
            .unwrap_or(Value::Null)
    });
    let ttft_ms = Some(draft.elapsed_ms());
    let record = draft.finish(Outcome {
        status: StatusCode::OK.as_u16(),
        response: Some(String::from_utf8_lossy(&body).into_owned()),
        usage,
        usage_source,
        cost: prepared.model.price.cost(usage),
        ttft_ms,
        error: None,
    });
    state.record(record).await;
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn stream(state: AppState, draft: CallDraft, prepared: Prepared) -> Response {
    let chunks = match prepared.provider.infer_stream(prepared.request.clone()).await {
        Ok(chunks) => chunks,
        Err(error) => return fail(&state, draft, error.into()).await,
    };
    // The relay runs in its own task so that the call is recorded even when
    // the client goes away mid-stream.
    let (sender, mut receiver) = mpsc::channel::<Bytes>(32);
    tokio::spawn(relay(state, draft, prepared, chunks, sender));
    let body = futures::stream::poll_fn(move |context| {
        receiver.poll_recv(context).map(|bytes| bytes.map(Ok::<_, Infallible>))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

fn sse_event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

async fn relay(
    state: AppState,
    draft: CallDraft,
    prepared: Prepared,
    mut chunks: ChunkStream,
    sender: mpsc::Sender<Bytes>,
) {
    let mut assembler = StreamAssembler::default();
    let mut ttft_ms = None;
    let mut error = None;
    let mut client_gone = false;
    while let Some(item) = chunks.next().await {
        let data = match item {
            Ok(data) => data,
            Err(provider_error) => {
                let gateway_error = GatewayError::from(provider_error);
                // The status line is gone already; the error goes in-band.
                let _ = sender.send(sse_event(&String::from_utf8_lossy(&gateway_error.body()))).await;
                error = Some(gateway_error.to_string());
                break;
            }
        };
        let chunk: Value = match serde_json::from_str(&data) {
            Ok(chunk) => chunk,
            Err(parse_error) => {
                error = Some(format!("upstream sent a chunk that is not JSON: {parse_error}"));
                break;
            }
        };
        if assembler.push(&chunk) && ttft_ms.is_none() {
            ttft_ms = Some(draft.elapsed_ms());
        }
        let usage_only = chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty)
            && chunk.get("usage").is_some_and(|usage| !usage.is_null());
        if usage_only && !prepared.include_usage {
            continue;
        }
        if sender.send(sse_event(&data)).await.is_err() {
            client_gone = true;
            break;
        }
    }
    if error.is_none() && !client_gone && sender.send(sse_event("[DONE]")).await.is_err() {
        client_gone = true;
    }
    drop(sender);
    if client_gone {
        error = Some("client disconnected before the stream ended".to_string());
    }
    let (usage, usage_source) = usage_or_counted(assembler.usage(), &prepared.messages, || assembler.first_message());
    let completion = assembler.finish();
    let status = if client_gone {
        499
    } else if error.is_some() {
        StatusCode::BAD_GATEWAY.as_u16()
    } else {
        200
    };
    let record = draft.finish(Outcome {
        status,
        response: Some(completion.to_string()),
        usage,
        usage_source,
        // Tokens the upstream produced are paid for even if the stream broke.
        cost: prepared.model.price.cost(usage),
        ttft_ms,
        error,
    });
    state.record(record).await;
}
