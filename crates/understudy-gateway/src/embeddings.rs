//! `POST /v1/embeddings`, passed through to the model's provider.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;
use understudy_providers::{tokens, EmbeddingRequest};
use understudy_types::{Endpoint, Usage, UsageSource};

use crate::auth::Caller;
use crate::draft::{CallDraft, Outcome};
use crate::limits::Estimate;
use crate::request::{parse_body, resolve_model, RequestBody};
use crate::{AppState, GatewayError};
use understudy_providers::CostModel;

pub(crate) async fn embeddings(State(state): State<AppState>, caller: Caller, body: RequestBody) -> Response {
    let draft = CallDraft::start(Endpoint::Embeddings, caller.key_ref());
    // As for chat: the client learns the call's id, to send feedback on it.
    let call_id = draft.id;
    state.inner.recent_calls.remember(call_id, caller.key_id().map(str::to_string));
    let (client, span) = (draft.client.clone(), draft.span.clone());
    let mut response =
        state.clone().serve_detached(client, span, move || serve_embeddings(state, draft, caller, body)).await;
    crate::feedback::tag_call_id(&mut response, call_id);
    response
}

async fn serve_embeddings(state: AppState, mut draft: CallDraft, caller: Caller, body: RequestBody) -> Response {
    match embed(&state, &caller, body, &mut draft).await {
        Ok((body, headers, outcome)) => {
            state.record(draft.finish(outcome)).await;
            (headers, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(error) => {
            state.record(draft.fail(&error)).await;
            error.into_response()
        }
    }
}

async fn embed(
    state: &AppState,
    caller: &Caller,
    body: RequestBody,
    draft: &mut CallDraft,
) -> Result<(Bytes, HeaderMap, Outcome), GatewayError> {
    let mut body = parse_body(body, draft)?;
    let model = resolve_model(state, &mut body, draft)?.clone();
    caller.check_scope(draft.task.as_deref(), &draft.model)?;
    let input = match body.get("input") {
        Some(input @ (Value::String(_) | Value::Array(_))) => input.clone(),
        Some(_) => return Err(GatewayError::invalid("`input` must be a string or an array.", "input")),
        None => return Err(GatewayError::invalid("Missing required parameter: `input`.", "input")),
    };
    state
        .admit(caller, draft.id, || {
            let tokens = tokens::count_embedding_input(&input);
            Estimate { cost: model.price.cost(Usage { prompt_tokens: tokens, completion_tokens: 0 }), tokens }
        })
        .await?;
    let provider = state.provider(&model.provider)?.clone();
    let response = provider.embed(EmbeddingRequest { body }).await?;
    draft.note_upstream(&response.headers);
    let (usage, usage_source) = match response.usage {
        Some(usage) => (usage, UsageSource::Provider),
        None => {
            (Usage { prompt_tokens: tokens::count_embedding_input(&input), completion_tokens: 0 }, UsageSource::Counted)
        }
    };
    let outcome = Outcome {
        status: 200,
        response: Some(summarize_embeddings(&response.body)),
        usage,
        usage_source,
        cost: CostModel::of(&provider, model.price).cost(Some(usage), draft.elapsed()),
        ttft_ms: Some(draft.elapsed_ms()),
        error: None,
    };
    Ok((response.body, response.headers, outcome))
}

/// The response as recorded: vectors are replaced by their length, because a
/// record keeps what the call was and cost, not a copy of every vector.
fn summarize_embeddings(body: &[u8]) -> String {
    let Ok(mut response) = serde_json::from_slice::<Value>(body) else {
        return understudy_types::text_of_body(body);
    };
    if let Some(items) = response.get_mut("data").and_then(Value::as_array_mut) {
        for item in items {
            if let Some(object) = item.as_object_mut() {
                let n_dims = match object.remove("embedding") {
                    Some(Value::Array(vector)) => vector.len(),
                    // Base64-encoded float32 vectors: four bytes a dimension.
                    Some(Value::String(encoded)) => encoded.len() * 3 / 4 / 4,
                    _ => 0,
                };
                object.insert("embedding_dims".into(), Value::from(n_dims));
            }
        }
    }
    response.to_string()
}
