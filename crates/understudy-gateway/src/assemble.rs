//! Assembles the chunks of a streamed chat completion into the one
//! `chat.completion` object a non-streamed call would have returned, so that
//! a streamed call's record looks like any other.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use understudy_types::Usage;

#[derive(Default)]
pub(crate) struct StreamAssembler {
    id: Option<Value>,
    model: Option<Value>,
    created: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: BTreeMap<u64, ChoiceParts>,
    usage: Option<Value>,
}

#[derive(Default)]
struct ChoiceParts {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCallParts>,
    logprobs: Vec<Value>,
    finish_reason: Option<Value>,
}

#[derive(Default)]
struct ToolCallParts {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

impl StreamAssembler {
    /// Adds one chunk. Returns true when the chunk carried answer text or a
    /// tool call, which is when the first token has arrived.
    pub fn push(&mut self, chunk: &Value) -> bool {
        for (field, slot) in [
            ("id", &mut self.id),
            ("model", &mut self.model),
            ("created", &mut self.created),
            ("system_fingerprint", &mut self.system_fingerprint),
        ] {
            if let Some(value) = chunk.get(field).filter(|value| !value.is_null()) {
                slot.get_or_insert_with(|| value.clone());
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|usage| !usage.is_null()) {
            self.usage = Some(usage.clone());
        }
        let mut has_token = false;
        for choice in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let parts = self.choices.entry(index).or_default();
            if let Some(reason) = choice.get("finish_reason").filter(|reason| !reason.is_null()) {
                parts.finish_reason = Some(reason.clone());
            }
            if let Some(content) = choice.pointer("/logprobs/content").and_then(Value::as_array) {
                parts.logprobs.extend(content.iter().cloned());
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                parts.role = Some(role.to_string());
            }
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                parts.content.get_or_insert_with(String::new).push_str(text);
                has_token |= !text.is_empty();
            }
            if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                parts.refusal.get_or_insert_with(String::new).push_str(text);
                has_token |= !text.is_empty();
            }
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                has_token = true;
                let call_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let call_parts = parts.tool_calls.entry(call_index).or_default();
                if let Some(id) = call.get("id").filter(|id| !id.is_null()) {
                    call_parts.id = Some(id.clone());
                }
                if let Some(kind) = call.get("type").filter(|kind| !kind.is_null()) {
                    call_parts.kind = Some(kind.clone());
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    call_parts.name.push_str(name);
                }
                if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    call_parts.arguments.push_str(arguments);
                }
            }
        }
        has_token
    }

    /// Why the stream is not a whole answer, if it is not: an answer is
    /// whole when it has choices and each of them came with a finish reason.
    /// A stream cut off early, or a body that was not a stream at all, is
    /// an error, never a success (it would become training data).
    pub fn incomplete(&self) -> Option<String> {
        if self.choices.is_empty() {
            return Some("the upstream's stream ended without any answer chunk".to_string());
        }
        let unfinished: Vec<String> = self
            .choices
            .iter()
            .filter(|(_, parts)| parts.finish_reason.is_none())
            .map(|(index, _)| index.to_string())
            .collect();
        (!unfinished.is_empty())
            .then(|| format!("the upstream's stream ended before a finish_reason for choice {}", unfinished.join(", ")))
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage.as_ref().and_then(|usage| understudy_providers::usage_of(&json!({"usage": usage})))
    }

    /// The first choice's message, for counting tokens when no usage came.
    pub fn first_message(&self) -> Value {
        self.choices.values().next().map(message_of).unwrap_or(Value::Null)
    }

    pub fn finish(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(index, parts)| {
                let mut choice = json!({
                    "index": index,
                    "message": message_of(parts),
                    "finish_reason": parts.finish_reason.clone().unwrap_or(Value::Null),
                });
                if !parts.logprobs.is_empty() {
                    choice["logprobs"] = json!({"content": parts.logprobs});
                }
                choice
            })
            .collect();
        let mut completion = Map::new();
        completion.insert("id".into(), self.id.clone().unwrap_or(Value::Null));
        completion.insert("object".into(), Value::String("chat.completion".into()));
        completion.insert("created".into(), self.created.clone().unwrap_or(Value::Null));
        completion.insert("model".into(), self.model.clone().unwrap_or(Value::Null));
        if let Some(fingerprint) = &self.system_fingerprint {
            completion.insert("system_fingerprint".into(), fingerprint.clone());
        }
        completion.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = &self.usage {
            completion.insert("usage".into(), usage.clone());
        }
        Value::Object(completion)
    }
}

fn message_of(parts: &ChoiceParts) -> Value {
    let mut message = Map::new();
    message.insert("role".into(), Value::String(parts.role.clone().unwrap_or_else(|| "assistant".into())));
    // A tool call or a refusal with no text is `"content": null`, as in a
    // non-streamed answer, even when the stream sent `"content": ""` first.
    let no_text = parts.content.as_deref().is_none_or(str::is_empty);
    let content = match &parts.content {
        Some(_) if no_text && (!parts.tool_calls.is_empty() || parts.refusal.is_some()) => Value::Null,
        Some(text) => Value::String(text.clone()),
        None => Value::Null,
    };
    message.insert("content".into(), content);
    if let Some(refusal) = &parts.refusal {
        message.insert("refusal".into(), Value::String(refusal.clone()));
    }
    if !parts.tool_calls.is_empty() {
        let calls: Vec<Value> = parts
            .tool_calls
            .values()
            .map(|call| {
                json!({
                    "id": call.id.clone().unwrap_or(Value::Null),
                    "type": call.kind.clone().unwrap_or_else(|| Value::String("function".into())),
                    "function": {"name": call.name, "arguments": call.arguments},
                })
            })
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_tool_call_deltas_are_joined() {
        let mut assembler = StreamAssembler::default();
        let chunks = [
            json!({"id":"c1","model":"m","created":7,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"get","arguments":"{\"a\""}}]}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}),
            json!({"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}),
        ];
        let first_tokens: Vec<bool> = chunks.iter().map(|chunk| assembler.push(chunk)).collect();
        assert_eq!(first_tokens, [false, true, true, true, true, false, false]);
        let completion = assembler.finish();
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(completion["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(completion["usage"]["total_tokens"], 8);
        assert_eq!(assembler.usage(), Some(Usage { prompt_tokens: 5, completion_tokens: 3 }));
    }

    /// A streamed tool call is recorded as a non-streamed one reads:
    /// `"content": null`, though the first delta carried `"content": ""`.
    #[test]
    fn a_streamed_tool_call_has_null_content() {
        let mut assembler = StreamAssembler::default();
        for chunk in [
            json!({"id":"c2","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}),
            json!({"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"get","arguments":"{}"}}]}}]}),
            json!({"id":"c2","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}),
        ] {
            assembler.push(&chunk);
        }
        let message = &assembler.finish()["choices"][0]["message"];
        assert!(message.get("content").is_some_and(Value::is_null), "{message}");
        assert_eq!(message["tool_calls"][0]["function"]["name"], "get");

        // An empty answer with no tool call stays an empty string.
        let mut assembler = StreamAssembler::default();
        assembler
            .push(&json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}));
        assert_eq!(assembler.finish()["choices"][0]["message"]["content"], "");
    }
}

impl crate::relay::Assemble for StreamAssembler {
    fn push(&mut self, chunk: &Value) -> bool {
        StreamAssembler::push(self, chunk)
    }

    fn incomplete(&self) -> Option<String> {
        StreamAssembler::incomplete(self)
    }
}
