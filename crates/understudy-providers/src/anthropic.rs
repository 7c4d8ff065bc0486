//! Anthropic's Messages API as a lead.
//!
//! Clients speak OpenAI's chat format; this provider translates the request
//! into a Messages request (`POST {base_url}/v1/messages`) and the answer
//! (a message, or its SSE events) back into a `chat.completion` or
//! `chat.completion.chunk`s, so the gateway and the records only ever see
//! OpenAI's shape. Anthropic's error answers (4xx and 5xx, 529 overloaded
//! too) become OpenAI error bodies with the upstream's status, after one
//! request: retries and timeouts are the OpenAI provider's (`Upstream`),
//! which retries only failures before an answer. The headers clients act on
//! reach them under OpenAI's names ([`passed_headers`]).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use understudy_config::AnthropicProviderConfig;
use understudy_types::Usage;

use crate::openai::{api_key_from_env, encode, parse_url, secret_header, Upstream};
use crate::{ChatRequest, EmbeddingRequest, HeaderMap, Provider, ProviderError, ProviderResponse, StreamResponse};

/// Anthropic requires `max_tokens`; this is sent when the client gave none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

#[derive(Debug)]
pub struct AnthropicProvider {
    upstream: Upstream,
    messages_url: reqwest::Url,
}

impl AnthropicProvider {
    pub fn new(name: &str, config: &AnthropicProviderConfig) -> Result<AnthropicProvider, ProviderError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key_from_env(name, &config.api_key_env) {
            headers.insert("x-api-key", secret_header(name, &key)?);
        }
        let version =
            reqwest::header::HeaderValue::from_str(&config.anthropic_version).map_err(|_| ProviderError::Setup {
                provider: name.to_string(),
                message: "anthropic_version is not a header value".into(),
            })?;
        headers.insert("anthropic-version", version);
        let upstream =
            Upstream::new(name, headers, passed_headers, config.timeout, config.max_retries, config.retry_backoff)?;
        Ok(AnthropicProvider { upstream, messages_url: parse_url(name, &format!("{}/v1/messages", config.base_url))? })
    }

    fn name(&self) -> &str {
        &self.upstream.name
    }

    /// Anthropic's own error body as an OpenAI one, with the same status.
    fn openai_error(&self, error: ProviderError) -> ProviderError {
        match error {
            ProviderError::Rejected { provider, status, body, headers } => {
                ProviderError::Rejected { provider, status, body: openai_error_body(&body), headers }
            }
            other => other,
        }
    }
}

impl Provider for AnthropicProvider {
    const PROVIDER_TYPE: &'static str = "anthropic";

    async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&to_messages_request(self.name(), &request.body, false)?)?;
        let (answer, headers) =
            self.upstream.complete(&self.messages_url, body).await.map_err(|error| self.openai_error(error))?;
        let message: Value = serde_json::from_slice(&answer).map_err(|error| ProviderError::BadResponse {
            provider: self.name().to_string(),
            message: format!("the answer is not JSON: {error}"),
        })?;
        let (completion, usage) = to_completion(&message, unix_now());
        let body = Bytes::from(completion.to_string());
        Ok(ProviderResponse { body, usage, headers, compute: None })
    }

    async fn infer_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        let body = encode(&to_messages_request(self.name(), &request.body, true)?)?;
        let (events, headers) =
            self.upstream.open_stream(&self.messages_url, body).await.map_err(|error| self.openai_error(error))?;
        let provider = self.name().to_string();
        let state = (Box::pin(events), StreamTranslator::new(unix_now()), VecDeque::<String>::new(), false);
        let chunks = futures::stream::unfold(state, move |(mut events, mut translator, mut queue, mut done)| {
            let provider = provider.clone();
            async move {
                loop {
                    if let Some(chunk) = queue.pop_front() {
                        return Some((Ok(chunk), (events, translator, queue, done)));
                    }
                    if done {
                        return None;
                    }
                    match events.next().await {
                        None => return None,
                        Some(Err(error)) => {
                            done = true;
                            return Some((Err(error), (events, translator, queue, done)));
                        }
                        Some(Ok(event)) if event.data.trim().is_empty() => {}
                        Some(Ok(event)) => match translator.push(&provider, &event.data) {
                            Ok((chunks, finished)) => {
                                queue.extend(chunks);
                                done = finished;
                            }
                            Err(error) => {
                                done = true;
                                return Some((Err(error), (events, translator, queue, done)));
                            }
                        },
                    }
                }
            }
        });
        Ok(StreamResponse { chunks: Box::pin(chunks), headers })
    }

    async fn embed(&self, _request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        Err(ProviderError::Unsupported {
            provider: self.name().to_string(),
            provider_type: Self::PROVIDER_TYPE,
            what: "embeddings",
        })
    }
}

/// The headers of an Anthropic answer that reach the client, under the names
/// OpenAI's clients read: `retry-after` (and `retry-after-ms`) as they are,
/// `request-id` as `x-request-id`, and the requests and tokens limits and
/// what is left of them (`anthropic-ratelimit-{requests,tokens}-{limit,remaining}`)
/// as `x-ratelimit-{limit,remaining}-{requests,tokens}`. Anthropic's reset
/// times are instants where OpenAI sends durations, and its input and output
/// token limits have no OpenAI name: they, like all other headers, stay here.
pub fn passed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut passed = HeaderMap::new();
    for (name, value) in headers {
        let passed_name = match name.as_str() {
            "retry-after" => "retry-after",
            "retry-after-ms" => "retry-after-ms",
            "request-id" => "x-request-id",
            "anthropic-ratelimit-requests-limit" => "x-ratelimit-limit-requests",
            "anthropic-ratelimit-requests-remaining" => "x-ratelimit-remaining-requests",
            "anthropic-ratelimit-tokens-limit" => "x-ratelimit-limit-tokens",
            "anthropic-ratelimit-tokens-remaining" => "x-ratelimit-remaining-tokens",
            _ => continue,
        };
        passed.append(passed_name, value.clone());
    }
    passed
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// An OpenAI chat request as a Messages request.
pub fn to_messages_request(provider: &str, body: &Map<String, Value>, stream: bool) -> Result<Value, ProviderError> {
    let invalid = |message: String| ProviderError::invalid_request(provider, message);
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(invalid("Anthropic models answer one choice per request: `n` must be 1".into()));
    }
    let mut system = Vec::new();
    let mut messages: Vec<(String, Vec<Value>)> = Vec::new();
    let empty = Vec::new();
    for (message_idx, message) in body.get("messages").and_then(Value::as_array).unwrap_or(&empty).iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_of(content).map_err(|what| invalid(format!("messages[{message_idx}]: {what}")))?);
                continue;
            }
            "user" => {
                ("user", content_blocks(content).map_err(|what| invalid(format!("messages[{message_idx}]: {what}")))?)
            }
            "assistant" => {
                let mut blocks =
                    content_blocks(content).map_err(|what| invalid(format!("messages[{message_idx}]: {what}")))?;
                for call in message.get("tool_calls").and_then(Value::as_array).unwrap_or(&empty) {
                    let function = call.get("function").unwrap_or(&Value::Null);
                    let arguments = function.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    let input: Value = if arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(arguments).map_err(|error| {
                            invalid(format!("messages[{message_idx}]: tool call arguments are not JSON: {error}"))
                        })?
                    };
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": function.get("name").cloned().unwrap_or(Value::Null),
                        "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let text = text_of(content).map_err(|what| invalid(format!("messages[{message_idx}]: {what}")))?;
                let block = json!({
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": text.join("\n"),
                });
                ("user", vec![block])
            }
            other => return Err(invalid(format!("messages[{message_idx}]: role `{other}` has no Anthropic form"))),
        };
        // Anthropic alternates roles: consecutive messages of one role (tool
        // results, then the user's text) become one message.
        match messages.last_mut() {
            Some((last_role, last_blocks)) if last_role == role => last_blocks.extend(blocks),
            _ => messages.push((role.to_string(), blocks)),
        }
    }
    let max_tokens = body
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut request = Map::new();
    request.insert("model".into(), body.get("model").cloned().unwrap_or(Value::Null));
    request.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        request.insert("system".into(), Value::String(system.join("\n\n")));
    }
    let messages: Vec<Value> =
        messages.into_iter().map(|(role, blocks)| json!({"role": role, "content": simplify(blocks)})).collect();
    request.insert("messages".into(), Value::Array(messages));
    for key in ["temperature", "top_p"] {
        if let Some(value) = body.get(key).filter(|value| !value.is_null()) {
            request.insert(key.into(), value.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(stop)) => {
            request.insert("stop_sequences".into(), json!([stop]));
        }
        Some(Value::Array(stops)) if !stops.is_empty() => {
            request.insert("stop_sequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .map(|tool| {
                let function = tool
                    .get("function")
                    .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| invalid("only function tools have an Anthropic form".into()))?;
                let mut translated = Map::new();
                translated.insert("name".into(), function.get("name").cloned().unwrap_or(Value::Null));
                if let Some(description) = function.get("description") {
                    translated.insert("description".into(), description.clone());
                }
                let schema = function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
                translated.insert("input_schema".into(), schema);
                Ok(Value::Object(translated))
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        if !tools.is_empty() {
            request.insert("tools".into(), Value::Array(tools));
        }
    }
    let mut tool_choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => return Err(invalid(format!("tool_choice `{other}` has no Anthropic form"))),
        },
        Some(choice) => match choice.pointer("/function/name") {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => return Err(invalid("tool_choice names no function".into())),
        },
    };
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) && request.contains_key("tools") {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = Value::Bool(true);
        }
    }
    if let Some(choice) = tool_choice {
        request.insert("tool_choice".into(), choice);
    }
    if let Some(user) = body.get("user").and_then(Value::as_str) {
        request.insert("metadata".into(), json!({"user_id": user}));
    }
    if stream {
        request.insert("stream".into(), Value::Bool(true));
    }
    Ok(Value::Object(request))
}

/// One text block stays a plain string, as most clients send it.
fn simplify(blocks: Vec<Value>) -> Value {
    match blocks.as_slice() {
        [block] if block["type"] == "text" => block["text"].clone(),
        _ => Value::Array(blocks),
    }
}

/// The texts of a content (a string, or parts of type text).
fn text_of(content: &Value) -> Result<Vec<String>, String> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(text)) => Ok(text.to_string()),
                _ => Err("only text parts have an Anthropic form here".to_string()),
            })
            .collect(),
        _ => Err("content must be a string or an array of parts".to_string()),
    }
}

/// A user's or assistant's content as Anthropic blocks: text, and images
/// (data URLs as base64 sources, others as URL sources).
fn content_blocks(content: &Value) -> Result<Vec<Value>, String> {
    let Value::Array(parts) = content else {
        return Ok(text_of(content)?
            .into_iter()
            .filter(|text| !text.is_empty())
            .map(|text| json!({"type": "text", "text": text}))
            .collect());
    };
    parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => Ok(json!({"type": "text", "text": part.get("text").cloned().unwrap_or(Value::Null)})),
            Some("image_url") => {
                let url = part.pointer("/image_url/url").and_then(Value::as_str).ok_or("an image part has no url")?;
                let source = match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
                    Some((media_type, data)) => json!({"type": "base64", "media_type": media_type, "data": data}),
                    None => json!({"type": "url", "url": url}),
                };
                Ok(json!({"type": "image", "source": source}))
            }
            other => Err(format!("content parts of type {other:?} have no Anthropic form")),
        })
        .collect()
}

/// Anthropic's stop reason as OpenAI's finish reason.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's usage as OpenAI's: prompt tokens include cache reads and writes.
fn usage_json(usage: &Value) -> (Value, Usage) {
    let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let cached = count("cache_read_input_tokens");
    let prompt_tokens = count("input_tokens") + count("cache_creation_input_tokens") + cached;
    let completion_tokens = count("output_tokens");
    let json = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    (json, Usage { prompt_tokens, completion_tokens })
}

/// An Anthropic message as a `chat.completion`, with its usage.
pub fn to_completion(message: &Value, created: u64) -> (Value, Option<Usage>) {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in message.get("content").and_then(Value::as_array).into_iter().flatten() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => tool_calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            // Thinking and other blocks have no OpenAI form.
            _ => {}
        }
    }
    let mut answer = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !tool_calls.is_empty() {
        answer["tool_calls"] = Value::Array(tool_calls);
    }
    let usage = message.get("usage").map(usage_json);
    let mut completion = json!({
        "id": message.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": answer,
            "logprobs": null,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)),
        }],
    });
    if let Some((usage_json, _)) = &usage {
        completion["usage"] = usage_json.clone();
    }
    (completion, usage.map(|(_, usage)| usage))
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`)
/// as an OpenAI one; a body of another shape becomes its text as the message.
pub fn openai_error_body(body: &[u8]) -> Bytes {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|value| value.get("error"));
    let message = match error.and_then(|error| error.get("message")).and_then(Value::as_str) {
        Some(message) => message.to_string(),
        None => understudy_types::text_of_body(body),
    };
    let error_type = error.and_then(|error| error.get("type")).and_then(Value::as_str).unwrap_or("upstream_error");
    let openai = json!({"error": {"message": message, "type": error_type, "param": null, "code": error_type}});
    Bytes::from(openai.to_string())
}

/// Turns a Messages stream's events into `chat.completion.chunk`s, ending
/// with a usage chunk (`choices: []`), which the gateway withholds from a
/// client that did not ask for it.
#[derive(Debug)]
pub struct StreamTranslator {
    created: u64,
    id: Value,
    model: Value,
    usage: Value,
    /// Content block index → the tool call's index among the answer's calls.
    tool_indexes: BTreeMap<u64, usize>,
}

impl StreamTranslator {
    pub fn new(created: u64) -> StreamTranslator {
        StreamTranslator {
            created,
            id: Value::Null,
            model: Value::Null,
            usage: json!({}),
            tool_indexes: BTreeMap::new(),
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
        .to_string()
    }

    /// The chunks one event's `data` makes, and whether the message ended.
    pub fn push(&mut self, provider: &str, data: &str) -> Result<(Vec<String>, bool), ProviderError> {
        let bad = |message: String| ProviderError::BadResponse { provider: provider.to_string(), message };
        let event: Value =
            serde_json::from_str(data).map_err(|error| bad(format!("an event that is not JSON: {error}")))?;
        let mut chunks = Vec::new();
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let message = event.get("message").unwrap_or(&Value::Null);
                self.id = message.get("id").cloned().unwrap_or(Value::Null);
                self.model = message.get("model").cloned().unwrap_or(Value::Null);
                self.merge_usage(message.get("usage"));
                chunks.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            Some("content_block_start") => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                let block_idx = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let tool_idx = self.tool_indexes.len();
                        self.tool_indexes.insert(block_idx, tool_idx);
                        chunks.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": tool_idx, "id": block.get("id"), "type": "function",
                                "function": {"name": block.get("name"), "arguments": ""},
                            }]}),
                            None,
                        ));
                    }
                    Some("text") => {
                        if let Some(text) = block.get("text").and_then(Value::as_str).filter(|text| !text.is_empty()) {
                            chunks.push(self.chunk(json!({"content": text}), None));
                        }
                    }
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let block_idx = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        chunks.push(self.chunk(json!({"content": delta.get("text")}), None));
                    }
                    Some("input_json_delta") => {
                        let tool_idx = self
                            .tool_indexes
                            .get(&block_idx)
                            .ok_or_else(|| bad(format!("input for content block {block_idx}, which is no tool_use")))?;
                        chunks.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": tool_idx, "function": {"arguments": delta.get("partial_json")},
                            }]}),
                            None,
                        ));
                    }
                    // Thinking and signatures have no OpenAI form.
                    _ => {}
                }
            }
            Some("message_delta") => {
                self.merge_usage(event.get("usage"));
                if let Some(stop_reason) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    chunks.push(self.chunk(json!({}), Some(finish_reason(Some(stop_reason)))));
                }
            }
            Some("message_stop") => {
                let (usage, _) = usage_json(&self.usage);
                let chunk = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [], "usage": usage,
                });
                chunks.push(chunk.to_string());
                return Ok((chunks, true));
            }
            Some("error") => {
                let error = event.get("error").unwrap_or(&Value::Null);
                return Err(bad(format!(
                    "the stream ended with an error: {} ({})",
                    error.get("message").and_then(Value::as_str).unwrap_or("no message"),
                    error.get("type").and_then(Value::as_str).unwrap_or("no type"),
                )));
            }
            // ping, content_block_stop and events added later carry no chunk.
            _ => {}
        }
        Ok((chunks, false))
    }

    /// Later counts replace earlier ones (message_delta carries the totals).
    fn merge_usage(&mut self, usage: Option<&Value>) {
        if let (Some(Value::Object(usage)), Value::Object(merged)) = (usage, &mut self.usage) {
            for (key, value) in usage {
                if value.is_u64() {
                    merged.insert(key.clone(), value.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_tool_results_and_user_text_become_one_user_message() {
        let body = json!({
            "model": "claude", "max_tokens": 10, "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "b", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "a", "content": "1"},
                {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "2"}]},
                {"role": "user", "content": "and?"},
            ],
        });
        let Value::Object(body) = body else { unreachable!() };
        let request = to_messages_request("p", &body, false).unwrap_or_else(|error| panic!("{error}"));
        let messages = request["messages"].as_array().cloned().unwrap_or_default();
        assert_eq!(messages.len(), 3, "{request}");
        assert_eq!(messages[1]["content"][0]["input"], json!({"x": 1}));
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(messages[2]["content"][1], json!({"type": "tool_result", "tool_use_id": "b", "content": "2"}));
        assert_eq!(messages[2]["content"][2], json!({"type": "text", "text": "and?"}));
        assert_eq!(request["tool_choice"], json!({"type": "auto", "disable_parallel_tool_use": true}));
        assert_eq!(request["max_tokens"], 10);
    }

    #[test]
    fn a_request_anthropic_cannot_answer_is_a_400() {
        let Value::Object(body) = json!({"model": "c", "n": 2, "messages": []}) else { unreachable!() };
        let error = to_messages_request("p", &body, false).err();
        assert!(matches!(error, Some(ProviderError::Rejected { status: 400, .. })), "{error:?}");
    }

    #[test]
    fn anthropic_headers_reach_the_client_under_openai_names() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("retry-after", "7"),
            ("request-id", "req_1"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-tokens-remaining", "1000"),
            ("anthropic-ratelimit-tokens-reset", "2025-06-01T00:00:00Z"),
            ("set-cookie", "a=b"),
            ("anthropic-organization-id", "org"),
        ] {
            headers.insert(name, reqwest::header::HeaderValue::from_static(value));
        }
        let passed = passed_headers(&headers);
        let get = |name: &str| passed.get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
        assert_eq!(get("retry-after").as_deref(), Some("7"));
        assert_eq!(get("x-request-id").as_deref(), Some("req_1"));
        assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("50"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert_eq!(get("x-ratelimit-remaining-tokens").as_deref(), Some("1000"));
        assert_eq!(passed.len(), 5, "{passed:?}");
    }

    #[test]
    fn an_anthropic_error_body_becomes_an_openai_one() {
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#;
        let openai: Value = serde_json::from_slice(&openai_error_body(body)).unwrap_or(Value::Null);
        assert_eq!(openai["error"]["message"], "max_tokens: too big");
        assert_eq!(openai["error"]["type"], "invalid_request_error");
        assert!(openai.get("type").is_none());
    }
}
