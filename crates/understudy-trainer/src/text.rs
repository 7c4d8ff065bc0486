//! Turning a recorded chat prompt into the text a classifier reads.

use serde_json::Value;
use understudy_datasets::jsonl::message_text;

/// The classifier's input for a chat prompt (the messages before the answer,
/// as in `understudy_datasets::jsonl::ChatExample::prompt`): the text of the
/// user messages, joined by newlines. The system prompt is skipped: it is the
/// same for every call of a task, so it carries no signal and costs tokens.
/// Each message's text is [`understudy_datasets::jsonl::content_text`], the
/// rendering every model shares.
pub fn prompt_text(messages: &[Value]) -> String {
    messages
        .iter()
        .filter(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .collect::<Vec<_>>()
        .join("\n")
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
