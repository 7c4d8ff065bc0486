//! Turning a recorded chat prompt into the text a classifier reads.

use serde_json::Value;

/// The classifier's input for a chat prompt (the messages before the answer,
/// as in `understudy_datasets::jsonl::ChatExample::prompt`): the text of the
/// user messages, joined by newlines. The system prompt is skipped: it is the
/// same for every call of a task, so it carries no signal and costs tokens.
/// Content may be a string or an array of parts; only `text` parts count.
pub fn prompt_text(messages: &[Value]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for message in messages {
        if message.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        match message.get("content") {
            Some(Value::String(text)) => parts.push(text.clone()),
            Some(Value::Array(items)) => {
                for item in items {
                    let is_text = item.get("type").and_then(Value::as_str).is_none_or(|kind| kind == "text");
                    if let (true, Some(text)) = (is_text, item.get("text").and_then(Value::as_str)) {
                        parts.push(text.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_user_text_and_skips_the_system_prompt() {
        let messages = vec![
            json!({"role": "system", "content": "Label the question."}),
            json!({"role": "user", "content": "Who wrote Hamlet?"}),
            json!({"role": "assistant", "content": "HUM"}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "And Faust?"},
                {"type": "image_url", "image_url": {"url": "http://x"}}
            ]}),
        ];
        assert_eq!(prompt_text(&messages), "Who wrote Hamlet?\nAnd Faust?");
    }

    #[test]
    fn no_user_message_gives_empty_text() {
        assert_eq!(prompt_text(&[json!({"role": "system", "content": "x"})]), "");
    }
}
