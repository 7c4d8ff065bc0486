//! Chat templates: turning messages into the token ids a causal LM was
//! instruction-tuned on, and marking which tokens are the assistant's.
//!
//! Only ChatML (`<|im_start|>role\n...<|im_end|>\n`, used by SmolLM2 and
//! Qwen2) is implemented; the Jinja template of a model is inspected, not run.

use tokenizers::Tokenizer;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// A model's chat template is not ChatML, the only one implemented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's chat template is not ChatML (<|im_start|>role ... <|im_end|>); only ChatML is supported")]
pub struct NotChatMl;

/// A ChatML template, with the system prompt the model's template inserts
/// when a conversation has none (SmolLM2 has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// Recognises a ChatML Jinja template; `None` (no template in the model
    /// files) is taken as plain ChatML.
    pub fn from_jinja(template: Option<&str>) -> Result<ChatTemplate, NotChatMl> {
        let Some(template) = template else { return Ok(ChatTemplate { default_system: None }) };
        if !template.contains(IM_START) {
            return Err(NotChatMl);
        }
        // The newline after `system` is a real one or a `\n` escape inside a Jinja string.
        let markers = [format!("{IM_START}system\n"), format!("{IM_START}system\\n")];
        let default_system = if template.contains("!= 'system'") || template.contains("!= \"system\"") {
            markers.iter().find_map(|marker| {
                template
                    .split_once(marker.as_str())
                    .and_then(|(_, rest)| rest.split_once(IM_END))
                    .map(|(text, _)| text.to_string())
            })
        } else {
            None
        };
        Ok(ChatTemplate { default_system })
    }

    /// The messages (role, content) as ChatML text; with
    /// `add_generation_prompt`, ends with the opening of an assistant turn.
    pub fn render(&self, messages: &[(String, String)], add_generation_prompt: bool) -> String {
        let mut text = String::new();
        if messages.first().is_none_or(|(role, _)| role != "system") {
            if let Some(system) = &self.default_system {
                text.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
            }
        }
        for (role, content) in messages {
            text.push_str(&format!("{IM_START}{role}\n{content}{IM_END}\n"));
        }
        if add_generation_prompt {
            text.push_str(&format!("{IM_START}assistant\n"));
        }
        text
    }

    /// Token ids of the conversation `prompt` + the assistant's `answer`, and
    /// for each id whether the loss covers it: the answer's tokens and its
    /// closing `<|im_end|>`, nothing else. Each piece is tokenized on its own;
    /// ChatML's special tokens keep BPE from merging across pieces.
    pub fn encode_for_training(
        &self,
        tokenizer: &Tokenizer,
        prompt: &[(String, String)],
        answer: &str,
    ) -> Result<(Vec<u32>, Vec<bool>), tokenizers::Error> {
        let encode = |text: &str| -> Result<Vec<u32>, tokenizers::Error> {
            tokenizer.encode(text, false).map(|encoding| encoding.get_ids().to_vec())
        };
        let context = self.render(prompt, true);
        let mut ids = encode(&context)?;
        let mut mask = vec![false; ids.len()];
        let answer_ids = encode(&format!("{answer}{IM_END}"))?;
        mask.extend(std::iter::repeat_n(true, answer_ids.len()));
        ids.extend(answer_ids);
        let newline = encode("\n")?;
        mask.extend(std::iter::repeat_n(false, newline.len()));
        ids.extend(newline);
        Ok((ids, mask))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_smollm2s_default_system_prompt() {
        let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
            {{ '<|im_start|>system\\nYou are SmolLM<|im_end|>\\n' }}{% endif %}";
        let chat = ChatTemplate::from_jinja(Some(template)).unwrap();
        assert_eq!(chat.default_system.as_deref(), Some("You are SmolLM"));
        let text = chat.render(&[("user".into(), "hi".into())], true);
        assert_eq!(
            text,
            "<|im_start|>system\nYou are SmolLM<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::from_jinja(Some("[INST] {{ x }}")).is_err());
    }
}
