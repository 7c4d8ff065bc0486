//! Turning a recorded chat prompt into the text a classifier reads.

pub use understudy_datasets::jsonl::prompt_text;

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
