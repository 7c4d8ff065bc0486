//! Loading a causal LM for LoRA training from either source the trainer
//! accepts: a Llama-family GGUF file (or a folder holding one), or an HF
//! directory of a `LlamaForCausalLM` / `Qwen2ForCausalLM`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::hf::{HfDir, LoadError};
use crate::{gguf, llama};

/// Weights (f32, HF names), config, tokenizer and chat template of a causal LM.
pub struct CausalLmFiles {
    pub config: llama::Config,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    /// The file or directory the model was read from.
    pub source: PathBuf,
    /// A name for `adapter_config.json`'s `base_model_name_or_path`.
    pub name: String,
    pub eos_token_id: Option<u32>,
}

/// Reads `path`: a `.gguf` file, a folder with `config.json` (HF), or a folder
/// with a single `.gguf`.
pub fn load(path: &Path) -> Result<CausalLmFiles, LoadError> {
    if path.is_dir() && path.join("config.json").is_file() {
        return load_hf(path);
    }
    let Some(file) = gguf::find_gguf(path) else {
        return Err(LoadError::MissingFile {
            dir: path.to_path_buf(),
            file: String::from("config.json or *.gguf"),
            hint: "expected an HF Llama/Qwen2 directory or a GGUF file (run scripts/fetch-models.sh)",
        });
    };
    let model = gguf::load(&file)?;
    let chat_template = ChatTemplate::from_jinja(model.chat_template.as_deref())
        .map_err(|error| LoadError::Unsupported { path: file.clone(), message: error.to_string() })?;
    Ok(CausalLmFiles {
        config: model.config,
        weights: model.weights,
        tokenizer: model.tokenizer,
        chat_template,
        // The file itself: GGUF metadata names the family, not the checkpoint.
        name: std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone()).display().to_string(),
        source: file,
        eos_token_id: model.eos_token_id,
    })
}

fn load_hf(dir: &Path) -> Result<CausalLmFiles, LoadError> {
    let files = HfDir::open(dir)?;
    let text = std::fs::read_to_string(&files.config_path)
        .map_err(|source| LoadError::Io { path: files.config_path.clone(), source })?;
    let config: llama::Config = serde_json::from_str(&text)
        .map_err(|error| LoadError::Config { path: files.config_path.clone(), message: error.to_string() })?;
    config
        .check_supported()
        .map_err(|error| LoadError::Unsupported { path: files.config_path.clone(), message: error.to_string() })?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_path)
        .map_err(|error| LoadError::Tokenizer { path: files.tokenizer_path.clone(), message: error.to_string() })?;
    let tokenizer_config_path = dir.join("tokenizer_config.json");
    let template = std::fs::read_to_string(&tokenizer_config_path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|value| value.get("chat_template").and_then(|t| t.as_str()).map(str::to_string));
    let chat_template = ChatTemplate::from_jinja(template.as_deref())
        .map_err(|error| LoadError::Unsupported { path: tokenizer_config_path, message: error.to_string() })?;
    let weights = files.weights(DType::F32, &Device::Cpu)?;
    let eos_token_id = tokenizer.token_to_id(crate::chat::IM_END);
    Ok(CausalLmFiles {
        config,
        weights,
        tokenizer,
        chat_template,
        name: dir.display().to_string(),
        source: dir.to_path_buf(),
        eos_token_id,
    })
}
