//! PEFT LoRA adapters on disk: `adapter_config.json` and
//! `adapter_model.safetensors`, with PEFT's tensor names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
//! `[r, in]`; `...lora_B.weight`, `[out, r]`), so that Python `peft` loads
//! what the trainer writes, and [`load`] reads what `peft` saves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::hf::LoadError;
use crate::llama::LoraConfig;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` this crate writes and reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
}

impl AdapterConfig {
    pub fn from_lora(lora: &LoraConfig, base_model: &str) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: lora.rank,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: lora.target_modules.clone(),
            base_model_name_or_path: Some(base_model.to_string()),
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
        }
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
        }
    }
}

/// Writes the adapter (config and f32 weights) into `dir`, each file through a
/// temporary name and a rename.
pub fn save(dir: &Path, config: &AdapterConfig, tensors: &HashMap<String, Tensor>) -> Result<(), LoadError> {
    let io = |path: PathBuf| move |source| LoadError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(tensors, &tmp).map_err(|source| LoadError::Weights { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &weights_path).map_err(io(weights_path.clone()))?;
    let config_path = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!("{CONFIG_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(config)
        .map_err(|error| LoadError::Config { path: config_path.clone(), message: error.to_string() })?;
    std::fs::write(&tmp, json).map_err(io(tmp.clone()))?;
    std::fs::rename(&tmp, &config_path).map_err(io(config_path.clone()))
}

/// Reads an adapter directory. PEFT versions differ on whether names carry
/// the adapter name (`lora_A.default.weight`); it is stripped.
pub fn load(dir: &Path) -> Result<(AdapterConfig, HashMap<String, Tensor>), LoadError> {
    let config_path = dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&config_path).map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
    let config: AdapterConfig = serde_json::from_str(&text)
        .map_err(|error| LoadError::Config { path: config_path.clone(), message: error.to_string() })?;
    if config.peft_type != "LORA" {
        return Err(LoadError::Unsupported {
            path: config_path,
            message: format!("peft_type {:?} is not supported: only LORA is", config.peft_type),
        });
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|source| LoadError::Weights { path: weights_path, source })?;
    let tensors = tensors
        .into_iter()
        .map(|(name, tensor)| {
            (name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."), tensor)
        })
        .collect();
    Ok((config, tensors))
}
