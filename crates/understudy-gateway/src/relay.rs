//! The one loop that forwards an upstream's SSE stream to the client (chat,
//! legacy completions and responses alike): each chunk parsed, assembled for
//! the record, and sent on as the endpoint renders it (chat's without
//! `usage` the client did not ask for, a Responses event under its `event:`
//! name); a broken or cut-off stream becomes an in-band error event, since
//! the status line is gone; chat's `[DONE]` ends a whole one.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use understudy_providers::{ChunkStream, ProviderError};
use understudy_types::{Money, Usage, UsageSource};

use crate::draft::{CallDraft, Outcome};
use crate::GatewayError;

/// What an endpoint's assembler does with the chunks, and how its stream's
/// events are written for the client (by default, chat's).
pub(crate) trait Assemble {
    /// Takes one chunk; true when it carried the first answer content.
    fn push(&mut self, chunk: &Value) -> bool;
    /// Why the stream so far is not a whole answer, if it is not.
    fn incomplete(&self) -> Option<String>;
    /// The event the client is sent for a chunk (`data` is its text), or
    /// `None` for one it is not sent.
    fn client_event(&self, data: String, chunk: &Value, include_usage: bool) -> Option<Bytes> {
        crate::chat::chunk_for_client(data, chunk, include_usage).map(|data| sse_event(&data))
    }
    /// The event that ends a whole stream, if the endpoint has one.
    fn end_event(&self) -> Option<Bytes> {
        Some(sse_event("[DONE]"))
    }
    /// The in-band event for an error once the stream has started.
    fn error_event(&self, error: &GatewayError) -> Bytes {
        sse_event(&String::from_utf8_lossy(&error.body()))
    }
}

/// How a forwarded stream ended.
pub(crate) struct Relayed {
    pub ttft_ms: Option<f64>,
    /// The record's error: the upstream's, or why the stream was broken.
    pub error: Option<String>,
    /// The client went away before the end.
    pub client_gone: bool,
}

impl Relayed {
    /// How a relayed call ends in its record: 499 when the client left, 502
    /// when the stream broke, else 200. The tokens the upstream produced are
    /// paid for either way (`cost`).
    pub(crate) fn outcome(self, response: String, usage: Usage, usage_source: UsageSource, cost: Money) -> Outcome {
        let status = if self.client_gone {
            crate::draft::CLIENT_GONE_STATUS
        } else if self.error.is_some() {
            502
        } else {
            200
        };
        Outcome {
            status,
            response: Some(response),
            usage,
            usage_source,
            cost,
            ttft_ms: self.ttft_ms,
            error: self.error,
        }
    }
}

pub(crate) fn sse_event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Forwards `chunks` to `sender` through `assembler`; `provider` names the
/// upstream in errors about its stream.
pub(crate) async fn forward(
    draft: &CallDraft,
    provider: &str,
    include_usage: bool,
    mut chunks: ChunkStream,
    sender: &mpsc::Sender<Bytes>,
    assembler: &mut impl Assemble,
) -> Relayed {
    let mut relayed = Relayed { ttft_ms: None, error: None, client_gone: false };
    let send_error = |error: GatewayError, event: Bytes| async move {
        let _ = sender.send(event).await;
        error.to_string()
    };
    let bad_stream = |message: String| {
        GatewayError::Provider(ProviderError::BadResponse { provider: provider.to_string(), message })
    };
    while let Some(item) = chunks.next().await {
        let data = match item {
            Ok(data) => data,
            Err(provider_error) => {
                let error = GatewayError::from(provider_error);
                let event = assembler.error_event(&error);
                relayed.error = Some(send_error(error, event).await);
                break;
            }
        };
        let chunk: Value = match serde_json::from_str(&data) {
            Ok(chunk) => chunk,
            Err(parse_error) => {
                let error = bad_stream(format!("a chunk that is not JSON: {parse_error}"));
                let event = assembler.error_event(&error);
                relayed.error = Some(send_error(error, event).await);
                break;
            }
        };
        if assembler.push(&chunk) && relayed.ttft_ms.is_none() {
            relayed.ttft_ms = Some(draft.elapsed_ms());
        }
        let Some(event) = assembler.client_event(data, &chunk, include_usage) else {
            continue;
        };
        if sender.send(event).await.is_err() {
            relayed.client_gone = true;
            break;
        }
    }
    if relayed.error.is_none() && !relayed.client_gone {
        // A stream cut off early (or a body that was no stream) is an error
        // for the client and the record alike, never a short success.
        if let Some(problem) = assembler.incomplete() {
            let error = bad_stream(problem);
            let event = assembler.error_event(&error);
            relayed.error = Some(send_error(error, event).await);
        } else if let Some(end) = assembler.end_event() {
            if sender.send(end).await.is_err() {
                relayed.client_gone = true;
            }
        }
    }
    if relayed.client_gone {
        relayed.error = Some("client disconnected before the stream ended".to_string());
    }
    relayed
}
