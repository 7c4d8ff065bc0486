//! Token counting for providers that report no `usage`.
//!
//! Counts use OpenAI's o200k_base encoding (the GPT-4o family) plus the chat
//! format's per-message overhead. For other model families the count is an
//! estimate, and records say so through `UsageSource::Counted`.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use understudy_datasets::jsonl::message_text;

/// Tokens the chat format adds per message, and to prime the reply.
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_REPLY_PRIMER: u64 = 3;

fn encoder() -> Option<&'static CoreBPE> {
    static ENCODER: OnceLock<Option<CoreBPE>> = OnceLock::new();
    ENCODER
        .get_or_init(|| match tiktoken_rs::o200k_base() {
            Ok(encoder) => Some(encoder),
            Err(error) => {
                tracing::warn!(%error, "cannot load the o200k_base encoding; counting ~4 bytes a token");
                None
            }
        })
        .as_ref()
}

/// Tokens in a piece of text.
pub fn count_text(text: &str) -> u64 {
    match encoder() {
        Some(encoder) => encoder.encode_ordinary(text).len() as u64,
        None => (text.len() as u64).div_ceil(4),
    }
}

/// Prompt tokens of a chat request's `messages`.
pub fn count_messages(messages: &[Value]) -> u64 {
    let mut n_tokens = TOKENS_REPLY_PRIMER;
    for message in messages {
        n_tokens += TOKENS_PER_MESSAGE;
        n_tokens += count_text(message.get("role").and_then(Value::as_str).unwrap_or(""));
        n_tokens += count_text(&message_text(message));
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            n_tokens += count_text(name) + 1;
        }
    }
    n_tokens
}

/// Completion tokens of an assistant message: its text and any tool calls.
pub fn count_answer(message: &Value) -> u64 {
    let mut n_tokens = count_text(&message_text(message));
    if let Some(tool_calls) = message.get("tool_calls") {
        n_tokens += count_text(&tool_calls.to_string());
    }
    n_tokens
}

/// Prompt tokens of an embeddings request's `input`.
pub fn count_embedding_input(input: &Value) -> u64 {
    match input {
        Value::String(text) => count_text(text),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => count_text(text),
                // Pre-tokenized input: an array of token ids.
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_o200k() {
        // "Hello, world!" is 4 tokens in o200k_base: Hello , world !
        assert_eq!(count_text("Hello, world!"), 4);
        let messages = serde_json::json!([{"role":"user","content":"Hello, world!"}]);
        let messages = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        // 3 (primer) + 3 (message) + 1 ("user") + 4.
        assert_eq!(count_messages(messages), 11);
    }
}
