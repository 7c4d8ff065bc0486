//! Local models behind the gateway's `local` provider.
//!
//! The gateway knows only [`understudy_providers::LocalModel`]; this crate
//! implements it for what the trainer produces and what small models come
//! as, and [`Loader`] picks the implementation from what a path holds:
//! - a trained classifier folder (`manifest.json` + `labels.json`): a label
//!   task's understudy, answering with its top label and that label's
//!   probability as logprobs, so the cascade can read its confidence;
//! - an HF BERT directory (MiniLM): embeddings, mean-pooled over the
//!   attention mask and L2-normalized;
//! - a GGUF file (with an optional PEFT adapter): the llama.cpp engine
//!   (`understudy-engine`);
//! - an HF Llama/Qwen2 directory (`config.json` with model_type llama/qwen2
//!   or architectures `LlamaForCausalLM`/`Qwen2ForCausalLM`): the engine,
//!   which converts it to a cached GGUF first;
//! - a PEFT LoRA adapter folder (`adapter_config.json`), as `understudy train
//!   --method lora` writes it: the engine, on the adapter's base model;
//! - `hf:org/name[@revision]` or `hf:org/name/file.gguf`: fetched from the
//!   hub into a cache first (`understudy_engine::hub`), then any of the above.

mod batcher;
mod classifier;
mod encoder;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use understudy_engine::hub::HubOptions;
use understudy_providers::{LocalLoader, LocalModel, LocalModelSpec, ProviderError};

pub use batcher::BatchError;
pub use classifier::ClassifierLocal;
pub use encoder::EncoderLocal;

/// Builds local models from paths; the gateway's [`LocalLoader`].
#[derive(Debug, Default, Clone)]
pub struct Loader;

impl LocalLoader for Loader {
    fn load(&self, spec: &LocalModelSpec) -> Result<Arc<dyn LocalModel>, ProviderError> {
        self.load_from(spec, &HubOptions::from_env())
    }
}

/// The engine options a spec asks for (its `weights` format and draft length).
fn engine_options(spec: &LocalModelSpec) -> Result<understudy_engine::EngineOptions, ProviderError> {
    let weights = match &spec.weights {
        Some(text) => understudy_engine::requant::WeightFormat::parse(text).map_err(|error| ProviderError::Setup {
            provider: format!("local model `{}`", spec.name),
            message: error.to_string(),
        })?,
        None => understudy_engine::requant::WeightFormat::Auto,
    };
    Ok(understudy_engine::EngineOptions { weights, speculative_draft: spec.speculative_draft(), ..Default::default() })
}

/// A PEFT adapter's `base_model_name_or_path`: a path when one exists there,
/// and a hub name (`org/name`, as PEFT writes it for hub models) otherwise.
fn base_model_path(base: &str) -> String {
    let is_hub_name = |text: &str| {
        let mut parts = text.split('/');
        let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else { return false };
        let ok = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        ok(org) && ok(name)
    };
    if !Path::new(base).exists() && is_hub_name(base) {
        format!("hf:{base}")
    } else {
        base.to_string()
    }
}

impl Loader {
    /// Loads `spec`, fetching an `hf:` path from the hub `hub` describes.
    pub fn load_from(&self, spec: &LocalModelSpec, hub: &HubOptions) -> Result<Arc<dyn LocalModel>, ProviderError> {
        let setup =
            |message: String| ProviderError::Setup { provider: format!("local model `{}`", spec.name), message };
        if let Some(name) = spec.path.strip_prefix("hf:") {
            let local = understudy_engine::hub::fetch(name, hub).map_err(|error| setup(error.to_string()))?;
            return self.load_from(&LocalModelSpec { path: local.display().to_string(), ..spec.clone() }, hub);
        }
        let path = Path::new(&spec.path);
        if !path.exists() {
            return Err(setup(format!("{} does not exist", path.display())));
        }
        if path.is_file() {
            return if path.extension().is_some_and(|ext| ext == "gguf") {
                let model = understudy_engine::LlamaCppModel::load(spec, &engine_options(spec)?)?;
                Ok(Arc::new(model))
            } else {
                Err(setup(format!(
                    "{} is not a model this build can load (expected a GGUF file or a folder)",
                    path.display()
                )))
            };
        }
        if let Some(gguf) = single_gguf(path) {
            let file_spec = LocalModelSpec { path: gguf.display().to_string(), ..spec.clone() };
            return self.load_from(&file_spec, hub);
        }
        let adapter_config = path.join("adapter_config.json");
        if adapter_config.is_file() {
            let config: Value = std::fs::read_to_string(&adapter_config)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .ok_or_else(|| setup(format!("{} is not readable JSON", adapter_config.display())))?;
            let base = config.get("base_model_name_or_path").and_then(Value::as_str).ok_or_else(|| {
                setup(format!("{} names no base_model_name_or_path to apply the adapter to", adapter_config.display()))
            })?;
            let base_spec = LocalModelSpec {
                name: spec.name.clone(),
                path: base_model_path(base),
                adapter: Some(path.to_path_buf()),
                weights: spec.weights.clone(),
                max_batch: spec.max_batch,
                speculative_draft: spec.speculative_draft,
            };
            return self.load_from(&base_spec, hub);
        }
        if path.join("labels.json").is_file() && path.join("manifest.json").is_file() {
            if spec.adapter.is_some() {
                return Err(setup("an adapter applies to causal LMs, not to a classifier".into()));
            }
            return Ok(Arc::new(ClassifierLocal::load(&spec.name, path, spec.max_batch())?));
        }
        if path.join("config.json").is_file() {
            let config_path = path.join("config.json");
            let config: Value = std::fs::read_to_string(&config_path)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .ok_or_else(|| setup(format!("{} is not readable JSON", config_path.display())))?;
            if config.get("model_type").and_then(Value::as_str) == Some("bert") {
                if spec.adapter.is_some() {
                    return Err(setup("an adapter applies to causal LMs, not to a bert encoder".into()));
                }
                return Ok(Arc::new(EncoderLocal::load(&spec.name, path)?));
            }
            return match understudy_engine::hf::architecture_of(&config) {
                Ok(_) => {
                    let model = understudy_engine::LlamaCppModel::load(spec, &engine_options(spec)?)?;
                    Ok(Arc::new(model))
                }
                Err(message) => Err(setup(format!(
                    "{}: {message}; this build also serves bert encoders and trained classifiers",
                    config_path.display()
                ))),
            };
        }
        Err(setup(format!(
            "{} holds neither a trained classifier (manifest.json, labels.json) nor an HF model (config.json)",
            path.display()
        )))
    }
}

/// The one GGUF file of a folder that holds no HF model (as
/// `scripts/fetch-models.sh` lays SmolLM2 out).
fn single_gguf(dir: &Path) -> Option<std::path::PathBuf> {
    if dir.join("config.json").exists() || dir.join("adapter_config.json").exists() {
        return None;
    }
    let mut ggufs = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "gguf"));
    let first = ggufs.next()?;
    ggufs.next().is_none().then_some(first)
}

/// Unix seconds, for `created`.
fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// A `chat.completion` body with one assistant message.
fn completion_body(model: &str, content: &str, logprobs: Option<Value>, prompt_tokens: usize) -> Value {
    let mut choice = json!({
        "index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
    });
    if let Some(logprobs) = logprobs {
        choice["logprobs"] = logprobs;
    }
    json!({
        "id": format!("chatcmpl-local-{:x}", rand_id()), "object": "chat.completion", "created": now_unix(),
        "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    })
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_unix());
    hasher.finish()
}

/// A response from a JSON body, with its usage read back out.
fn response_of(body: &Value) -> understudy_providers::ProviderResponse {
    understudy_providers::ProviderResponse {
        body: body.to_string().into_bytes().into(),
        usage: understudy_providers::usage_of(body),
        headers: Default::default(),
        compute: None,
    }
}

fn internal(model: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::BadResponse { provider: format!("local model `{model}`"), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peft_base_is_a_path_when_one_exists_and_a_hub_name_otherwise() {
        assert_eq!(base_model_path("HuggingFaceTB/SmolLM2-135M-Instruct"), "hf:HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(base_model_path("/models/smollm2"), "/models/smollm2");
        assert_eq!(base_model_path("models/a/b"), "models/a/b");
        assert_eq!(base_model_path("../up/one"), "../up/one");
        assert_eq!(base_model_path("hf:org/name"), "hf:org/name");
    }

    #[test]
    fn an_unknown_weight_format_fails_at_load_naming_it() {
        let spec = LocalModelSpec { weights: Some("q3".into()), ..LocalModelSpec::new("m", "m.gguf") };
        let error = engine_options(&spec).unwrap_err().to_string();
        assert!(error.contains("`q3`") && error.contains("iq4_nl"), "{error}");
        let spec = LocalModelSpec { weights: Some("iq4_nl".into()), ..spec };
        assert_eq!(engine_options(&spec).unwrap().weights, understudy_engine::requant::WeightFormat::Iq4Nl);
    }

    #[test]
    fn the_draft_length_reaches_the_engine() {
        let spec = LocalModelSpec::new("m", "m.gguf");
        assert_eq!(engine_options(&spec).unwrap().speculative_draft, understudy_engine::DEFAULT_SPECULATIVE_DRAFT);
        let off = LocalModelSpec { speculative_draft: Some(0), ..spec.clone() };
        assert_eq!(engine_options(&off).unwrap().speculative_draft, 0);
        let long = LocalModelSpec { speculative_draft: Some(7), ..spec };
        assert_eq!(engine_options(&long).unwrap().speculative_draft, 7);
    }
}
