//! OpenAI's Responses API as chat: the one conversion of a Responses call
//! (`instructions` and `input` in, `output` out) into chat messages, so that
//! a call made through `/v1/responses` becomes a dataset row in the same
//! fine-tuning format as a chat call, and the gateway can ask a task's
//! understudy (a chat model) a text-only Responses call.
//!
//! `instructions` becomes a leading `system` message; `input` as a string is
//! one `user` message; input items become messages: a message item keeps its
//! role and its text (`input_text`/`output_text` parts joined by newlines, a
//! `refusal` part an assistant's `refusal`), consecutive `function_call`
//! items one assistant message with `tool_calls`, a `function_call_output`
//! a `tool` message; `reasoning` items are left out (they are the model's
//! own, not the conversation's). Function tools become chat tools. Anything
//! else (images, files, audio, built-in tools, references to stored items)
//! is [`ConversionError::NotText`]: the call is valid, but has no chat form.

use serde_json::{json, Map, Value};

/// Why a Responses call has no chat form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// The request or response breaks the Responses schema (a 400 for a request).
    #[error("{message}")]
    Invalid { message: String, param: String },
    /// Valid, but holds something other than text and function calls.
    #[error("the call holds {0}, which has no chat form")]
    NotText(String),
}

fn invalid(message: impl Into<String>, param: impl Into<String>) -> ConversionError {
    ConversionError::Invalid { message: message.into(), param: param.into() }
}

/// The chat `response_format` of a Responses request's `text.format`:
/// `json_schema` (its `name`, `schema` and `strict` moved under
/// `json_schema`, as chat writes them) and `json_object`; `None` for text or
/// no format.
pub fn chat_response_format(request: &Map<String, Value>) -> Result<Option<Value>, ConversionError> {
    let Some(format) = request.get("text").and_then(|text| text.get("format")).filter(|format| !format.is_null())
    else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.as_object().cloned().unwrap_or_default();
            schema.remove("type");
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(invalid(format!("`text.format.type` `{other}` is not supported."), "text.format.type")),
        None => Err(invalid("`text.format` needs a `type`.", "text.format.type")),
    }
}

/// The chat messages of a Responses request: `instructions`, then `input`.
pub fn chat_messages(request: &Map<String, Value>) -> Result<Vec<Value>, ConversionError> {
    let mut messages = Vec::new();
    match request.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(instructions)) => messages.push(json!({"role": "system", "content": instructions})),
        Some(_) => return Err(invalid("`instructions` must be a string.", "instructions")),
    }
    match request.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (item_idx, item) in items.iter().enumerate() {
                push_item(&mut messages, item, &format!("input[{item_idx}]"))?;
            }
        }
        Some(Value::Array(_)) => return Err(invalid("`input` must contain at least one item.", "input")),
        Some(_) => return Err(invalid("`input` must be a string or an array of items.", "input")),
        None => return Err(invalid("Missing required parameter: `input`.", "input")),
    }
    Ok(messages)
}

/// The assistant message of a Responses API response (`output`).
pub fn assistant_message(response: &Value) -> Result<Map<String, Value>, ConversionError> {
    let Some(output) = response.get("output").and_then(Value::as_array) else {
        return Err(invalid("a response must have an `output` array", "output"));
    };
    let mut messages = Vec::new();
    for (item_idx, item) in output.iter().enumerate() {
        push_item(&mut messages, item, &format!("output[{item_idx}]"))?;
    }
    // One answer: the output's messages and calls, joined.
    let mut answer = Map::new();
    answer.insert("role".into(), "assistant".into());
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    for message in messages {
        if message.get("role").and_then(Value::as_str) != Some("assistant") {
            return Err(invalid("a response's output holds only the assistant's items", "output"));
        }
        if let Some(text) = message.get("content").and_then(Value::as_str) {
            texts.push(text.to_string());
        }
        if let Some(refusal) = message.get("refusal") {
            answer.insert("refusal".into(), refusal.clone());
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            tool_calls.extend(calls.iter().cloned());
        }
    }
    let content = if texts.is_empty() { Value::Null } else { Value::String(texts.join("\n")) };
    if content.is_null() && tool_calls.is_empty() && !answer.contains_key("refusal") {
        return Err(invalid("the response has no output text, refusal or function call", "output"));
    }
    answer.insert("content".into(), content);
    if !tool_calls.is_empty() {
        answer.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    Ok(answer)
}

/// The request's function tools as chat tools (`None` without tools).
pub fn chat_tools(request: &Map<String, Value>) -> Result<Option<Value>, ConversionError> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(invalid("`tools` must be an array.", "tools")),
    };
    let mut chat_tools = Vec::with_capacity(tools.len());
    for (tool_idx, tool) in tools.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != "function" {
            return Err(ConversionError::NotText(format!("a `{kind}` tool")));
        }
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return Err(invalid("A function tool must have a `name`.", format!("tools[{tool_idx}].name")));
        };
        let mut function = Map::new();
        function.insert("name".into(), name.into());
        for field in ["description", "parameters", "strict"] {
            if let Some(value) = tool.get(field).filter(|value| !value.is_null()) {
                function.insert(field.into(), value.clone());
            }
        }
        chat_tools.push(json!({"type": "function", "function": function}));
    }
    Ok(Some(Value::Array(chat_tools)))
}

/// Appends the chat form of one input or output item.
fn push_item(messages: &mut Vec<Value>, item: &Value, param: &str) -> Result<(), ConversionError> {
    let Some(object) = item.as_object() else {
        return Err(invalid("An input item must be an object.", param));
    };
    match object.get("type").and_then(Value::as_str).unwrap_or("message") {
        "message" => messages.push(message_of(object, param)?),
        "function_call" => {
            let field = |name: &str| {
                object
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("A function call must have `{name}`."), format!("{param}.{name}")))
            };
            let call = json!({
                "id": field("call_id")?, "type": "function",
                "function": {"name": field("name")?, "arguments": field("arguments")?},
            });
            // Parallel calls are one assistant message in chat.
            let previous_calls = messages
                .last_mut()
                .filter(|last| last.get("content").is_some_and(Value::is_null))
                .and_then(|last| last.get_mut("tool_calls"))
                .and_then(Value::as_array_mut);
            match previous_calls {
                Some(calls) => calls.push(call),
                None => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let Some(call_id) = object.get("call_id").and_then(Value::as_str) else {
                return Err(invalid("A function call output must have `call_id`.", format!("{param}.call_id")));
            };
            let output = match object.get("output") {
                Some(Value::String(output)) => output.clone(),
                Some(Value::Array(parts)) => text_of_parts(parts, &format!("{param}.output"))?.0,
                _ => return Err(invalid("A function call output must have `output`.", format!("{param}.output"))),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        "reasoning" => {}
        "item_reference" => return Err(ConversionError::NotText("a reference to a stored item".into())),
        other => return Err(ConversionError::NotText(format!("an item of type `{other}`"))),
    }
    Ok(())
}

/// A message item (`{"role", "content"}`, `type` "message" or absent) as a chat message.
fn message_of(object: &Map<String, Value>, param: &str) -> Result<Value, ConversionError> {
    let role = match object.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant" | "system" | "developer")) => role,
        Some(role) => return Err(invalid(format!("Unknown role `{role}`."), format!("{param}.role"))),
        None => return Err(invalid("A message item must have a `role`.", format!("{param}.role"))),
    };
    let mut message = Map::new();
    message.insert("role".into(), role.into());
    match object.get("content") {
        Some(Value::String(text)) => {
            message.insert("content".into(), text.clone().into());
        }
        Some(Value::Array(parts)) => {
            let (text, refusal) = text_of_parts(parts, &format!("{param}.content"))?;
            let has_text = parts.iter().any(|part| part.get("type").and_then(Value::as_str) != Some("refusal"));
            message.insert("content".into(), if has_text { text.into() } else { Value::Null });
            if let Some(refusal) = refusal {
                message.insert("refusal".into(), refusal.into());
            }
        }
        _ => {
            return Err(invalid(
                "A message's `content` must be a string or an array of parts.",
                format!("{param}.content"),
            ))
        }
    }
    Ok(Value::Object(message))
}

/// The text of content parts (joined by newlines) and a refusal, if any.
fn text_of_parts(parts: &[Value], param: &str) -> Result<(String, Option<String>), ConversionError> {
    let mut texts = Vec::with_capacity(parts.len());
    let mut refusal = None;
    for (part_idx, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str);
        match kind {
            Some("input_text" | "output_text" | "text") => match part.get("text").and_then(Value::as_str) {
                Some(text) => texts.push(text),
                None => return Err(invalid("A text part must have `text`.", format!("{param}[{part_idx}].text"))),
            },
            Some("refusal") => refusal = part.get("refusal").and_then(Value::as_str).map(str::to_string),
            Some(other) => return Err(ConversionError::NotText(format!("an `{other}` part"))),
            None => return Err(invalid("A content part must have a `type`.", format!("{param}[{part_idx}].type"))),
        }
    }
    Ok((texts.join("\n"), refusal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn instructions_and_a_string_input_are_a_system_and_a_user_message() {
        let request = object(json!({"model": "m", "instructions": "Be brief.", "input": "Hi"}));
        let messages = chat_messages(&request);
        assert_eq!(
            messages,
            Ok(vec![json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "Hi"})])
        );
    }

    #[test]
    fn items_keep_roles_text_and_function_calls() {
        let request = object(json!({"input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]}));
        let messages = chat_messages(&request).unwrap_or_default();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert_eq!(messages[0], json!({"role": "developer", "content": "Use tools."}));
        assert_eq!(messages[1], json!({"role": "user", "content": "a\nb"}));
        assert_eq!(messages[2]["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(messages[2]["tool_calls"][1]["function"]["name"], "g");
        assert_eq!(messages[3], json!({"role": "tool", "tool_call_id": "c1", "content": "42"}));
    }

    #[test]
    fn images_files_and_references_have_no_chat_form() {
        for input in [
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]),
            json!([{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]),
            json!([{"type": "item_reference", "id": "msg_1"}]),
        ] {
            let result = chat_messages(&object(json!({"input": input})));
            assert!(matches!(result, Err(ConversionError::NotText(_))), "{result:?}");
        }
        let tools = chat_tools(&object(json!({"tools": [{"type": "web_search"}]})));
        assert!(matches!(tools, Err(ConversionError::NotText(_))), "{tools:?}");
    }

    #[test]
    fn a_malformed_input_is_invalid_with_its_param() {
        for (request, param) in [
            (json!({}), "input"),
            (json!({"input": 3}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": "x", "instructions": 1}), "instructions"),
            (json!({"input": [{"role": "robot", "content": "x"}]}), "input[0].role"),
            (json!({"input": ["x"]}), "input[0]"),
        ] {
            match chat_messages(&object(request.clone())) {
                Err(ConversionError::Invalid { param: got, .. }) => assert_eq!(got, param, "{request}"),
                other => panic!("{request}: {other:?}"),
            }
        }
    }

    #[test]
    fn output_text_and_function_calls_are_one_assistant_message() {
        let response = json!({"output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris", "annotations": []}]},
        ]});
        assert_eq!(
            assistant_message(&response).map(Value::Object),
            Ok(json!({"role": "assistant", "content": "Paris"}))
        );
        let response = json!({"output": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]});
        let answer = assistant_message(&response).unwrap_or_default();
        assert_eq!(answer.get("content"), Some(&Value::Null));
        assert_eq!(answer["tool_calls"][0]["id"], "c");
        assert!(assistant_message(&json!({"output": []})).is_err());
    }

    #[test]
    fn text_formats_become_chat_response_formats() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
        let request = object(json!({"text": {"format": {"type": "json_schema", "name": "x", "strict": true,
            "schema": schema}}}));
        assert_eq!(
            chat_response_format(&request).unwrap(),
            Some(json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}))
        );
        let request = object(json!({"text": {"format": {"type": "json_object"}}}));
        assert_eq!(chat_response_format(&request).unwrap(), Some(json!({"type": "json_object"})));
        for request in [json!({}), json!({"text": {"format": {"type": "text"}}}), json!({"text": {}})] {
            assert_eq!(chat_response_format(&object(request)).unwrap(), None);
        }
        let error = chat_response_format(&object(json!({"text": {"format": {"type": "xml"}}}))).unwrap_err();
        assert!(matches!(error, ConversionError::Invalid { .. }), "{error:?}");
    }

    #[test]
    fn function_tools_become_chat_tools() {
        let request = object(json!({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}));
        assert_eq!(
            chat_tools(&request),
            Ok(Some(json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])))
        );
    }
}
