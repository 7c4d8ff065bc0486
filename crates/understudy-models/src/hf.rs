//! Loading a model from an HF directory: `config.json`, `tokenizer.json` and
//! one or more `*.safetensors` files, as `save_pretrained` writes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{dir} has no {file}: {hint}")]
    MissingFile { dir: PathBuf, file: String, hint: &'static str },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("cannot load the tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("cannot load weights from {path}: {source}")]
    Weights { path: PathBuf, source: candle_core::Error },
    #[error("building the model: {0}")]
    Model(#[from] candle_core::Error),
}

/// The files of an HF model directory, checked to exist.
#[derive(Debug, Clone)]
pub struct HfDir {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub tokenizer_path: PathBuf,
    pub weight_paths: Vec<PathBuf>,
}

impl HfDir {
    /// Finds `config.json`, `tokenizer.json` and the `*.safetensors` files in
    /// `dir`; the error names the first missing one.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfDir, LoadError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(LoadError::MissingFile {
                dir: dir.clone(),
                file: String::from("(the directory itself)"),
                hint: "expected an HF model directory (run scripts/fetch-models.sh)",
            });
        }
        let required = |file: &str, hint: &'static str| -> Result<PathBuf, LoadError> {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadError::MissingFile { dir: dir.clone(), file: file.to_string(), hint })
            }
        };
        let config_path = required("config.json", "the HF model config")?;
        let tokenizer_path = required("tokenizer.json", "a `tokenizers` tokenizer, as save_pretrained writes it")?;
        let entries = std::fs::read_dir(&dir).map_err(|source| LoadError::Io { path: dir.clone(), source })?;
        let mut weight_paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        weight_paths.sort();
        if weight_paths.is_empty() {
            return Err(LoadError::MissingFile {
                dir,
                file: String::from("*.safetensors"),
                hint: "the weights (PyTorch .bin files are not supported)",
            });
        }
        Ok(HfDir { dir, config_path, tokenizer_path, weight_paths })
    }

    /// Parses `config.json` as a BERT config and checks it is supported.
    pub fn bert_config(&self) -> Result<bert::Config, LoadError> {
        let text = std::fs::read_to_string(&self.config_path)
            .map_err(|source| LoadError::Io { path: self.config_path.clone(), source })?;
        let config: bert::Config = serde_json::from_str(&text)
            .map_err(|error| LoadError::Config { path: self.config_path.clone(), message: error.to_string() })?;
        config
            .check_supported()
            .map_err(|error| LoadError::Unsupported { path: self.config_path.clone(), message: error.to_string() })?;
        Ok(config)
    }

    /// The tokenizer with its padding switched off (batches are padded by the
    /// caller to their own longest row) and truncation at `max_len` tokens.
    pub fn tokenizer(&self, max_len: usize) -> Result<Tokenizer, LoadError> {
        load_tokenizer(&self.tokenizer_path, max_len)
    }

    /// Every tensor of every safetensors file, converted to `dtype`, by name.
    pub fn weights(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
        let mut all = HashMap::new();
        for path in &self.weight_paths {
            let tensors = candle_core::safetensors::load(path, device)
                .map_err(|source| LoadError::Weights { path: path.clone(), source })?;
            for (name, tensor) in tensors {
                let tensor =
                    tensor.to_dtype(dtype).map_err(|source| LoadError::Weights { path: path.clone(), source })?;
                all.insert(name, tensor);
            }
        }
        Ok(all)
    }
}

/// Loads `tokenizer.json`, switches its padding off and truncates at `max_len`.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer, LoadError> {
    let tokenizer_error = |message: String| LoadError::Tokenizer { path: path.to_path_buf(), message };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|error| tokenizer_error(error.to_string()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: max_len, ..TruncationParams::default() }))
        .map_err(|error| tokenizer_error(error.to_string()))?;
    Ok(tokenizer)
}

/// Strips the `bert.` prefix task checkpoints put on encoder weights, so that
/// names are the same whichever head the checkpoint was saved with.
pub fn strip_bert_prefix(weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .into_iter()
        .map(|(name, tensor)| match name.strip_prefix("bert.") {
            Some(rest) => (rest.to_string(), tensor),
            None => (name, tensor),
        })
        .collect()
}
