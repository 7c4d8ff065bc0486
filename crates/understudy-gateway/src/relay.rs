//! The one loop that forwards an upstream's SSE stream to the client (chat
//! and legacy completions alike): each chunk parsed, assembled for the
//! record, and sent on (without `usage` the client did not ask for); a
//! broken or cut-off stream becomes an in-band error event, since the
//! status line is gone; `[DONE]` ends a whole one.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use understudy_providers::{ChunkStream, ProviderError};

use crate::draft::CallDraft;
use crate::GatewayError;

/// What an endpoint's assembler does with the chunks.
pub(crate) trait Assemble {
    /// Takes one chunk; true when it carried the first answer content.
    fn push(&mut self, chunk: &Value) -> bool;
    /// Why the stream so far is not a whole answer, if it is not.
    fn incomplete(&self) -> Option<String>;
}

/// How a forwarded stream ended.
pub(crate) struct Relayed {
    pub ttft_ms: Option<f64>,
    /// The record's error: the upstream's, or why the stream was broken.
    pub error: Option<String>,
    /// The client went away before the end.
    pub client_gone: bool,
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
    let send_error = |error: GatewayError| async move {
        let _ = sender.send(sse_event(&String::from_utf8_lossy(&error.body()))).await;
        error.to_string()
    };
    let bad_stream = |message: String| {
        GatewayError::Provider(ProviderError::BadResponse { provider: provider.to_string(), message })
    };
    while let Some(item) = chunks.next().await {
        let data = match item {
            Ok(data) => data,
            Err(provider_error) => {
                relayed.error = Some(send_error(GatewayError::from(provider_error)).await);
                break;
            }
        };
        let chunk: Value = match serde_json::from_str(&data) {
            Ok(chunk) => chunk,
            Err(parse_error) => {
                let message = format!("a chunk that is not JSON: {parse_error}");
                relayed.error = Some(send_error(bad_stream(message)).await);
                break;
            }
        };
        if assembler.push(&chunk) && relayed.ttft_ms.is_none() {
            relayed.ttft_ms = Some(draft.elapsed_ms());
        }
        let Some(data) = crate::chat::chunk_for_client(data, &chunk, include_usage) else {
            continue;
        };
        if sender.send(sse_event(&data)).await.is_err() {
            relayed.client_gone = true;
            break;
        }
    }
    if relayed.error.is_none() && !relayed.client_gone {
        // A stream cut off early (or a body that was no stream) is an error
        // for the client and the record alike, never a short success.
        if let Some(problem) = assembler.incomplete() {
            relayed.error = Some(send_error(bad_stream(problem)).await);
        } else if sender.send(sse_event("[DONE]")).await.is_err() {
            relayed.client_gone = true;
        }
    }
    if relayed.client_gone {
        relayed.error = Some("client disconnected before the stream ended".to_string());
    }
    relayed
}
