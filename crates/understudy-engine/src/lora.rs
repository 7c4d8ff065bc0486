//! PEFT LoRA adapters to GGUF LoRA adapters, for llama.cpp.
//!
//! A PEFT directory holds `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules`, ...) and `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (shape
//! `[r, in]`) and `...lora_B.weight` (`[out, r]`). llama.cpp wants a GGUF with
//! `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and
//! tensors `blk.{i}.attn_q.weight.lora_a` / `.lora_b`.
//!
//! Layout: GGUF dimensions are the reverse of the PyTorch shape, so A `[r, in]`
//! is written as is (`ne = [in, r]`) and so is B (`ne = [r, out]`): llama.cpp
//! computes `B·(A·x)` with exactly those. Scale: llama.cpp uses
//! `alpha / r` with `r = ne[0]` of B, as PEFT does (`lora_alpha / r`); for
//! rsLoRA (`lora_alpha / sqrt(r)`) the written alpha is `lora_alpha · sqrt(r)`.
//! Rotary layout: for the `llama` architecture, HF's q/k projections are
//! stored permuted in GGUF (rotate-half pairs to interleaved pairs, as the HF
//! converter does), so the rows of B for `q_proj` (with `n_head`) and `k_proj`
//! (with `n_head_kv`) get the same permutation; A is unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::gguf::{GgufValue, GgufWriter};

/// Why an adapter could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("LoRA adapter file `{path}` does not exist")]
    Missing { path: PathBuf },
    #[error("LoRA adapter `{path}`: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The base model's dimensions the adapter must fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
}

/// A converted adapter, written to a temporary file that lives as long as this value.
#[derive(Debug)]
pub struct ConvertedAdapter {
    pub path: PathBuf,
    _file: tempfile::TempPath,
}

/// A tensor read from safetensors, as f32 in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file (F32, F16 and BF16) as f32.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, AdapterError> {
    let invalid = |message: String| AdapterError::Invalid { path: path.to_path_buf(), message };
    if !path.exists() {
        return Err(AdapterError::Missing { path: path.to_path_buf() });
    }
    let bytes = std::fs::read(path).map_err(|error| invalid(error.to_string()))?;
    if bytes.len() < 8 {
        return Err(invalid("not a safetensors file: too short".into()));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes) as usize;
    let header_end = 8usize.checked_add(header_len).filter(|&end| end <= bytes.len());
    let Some(header_end) = header_end else {
        return Err(invalid("not a safetensors file: bad header length".into()));
    };
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|error| invalid(format!("not a safetensors file: {error}")))?;
    let data = &bytes[header_end..];
    let mut tensors = HashMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(Value::as_str).unwrap_or_default();
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .map(|dims| dims.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
            .unwrap_or_default();
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|o| o.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Err(invalid(format!("tensor `{name}` has no data_offsets")));
        };
        let Some(raw) = data.get(start..end) else {
            return Err(invalid(format!("tensor `{name}` lies outside the file (truncated?)")));
        };
        let values: Vec<f32> = match dtype {
            "F32" => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "BF16" => {
                raw.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            "F16" => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => {
                return Err(invalid(format!("tensor `{name}` has dtype {other}; F32, F16 and BF16 are supported")))
            }
        };
        if values.len() != shape.iter().product::<usize>() {
            return Err(invalid(format!("tensor `{name}` has {} values for shape {shape:?}", values.len())));
        }
        tensors.insert(name, Tensor { shape, data: values });
    }
    Ok(tensors)
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exponent = ((bits >> 10) & 0x1f) as u32;
    let mantissa = (bits & 0x3ff) as u32;
    let value = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalize.
            let mut e = 127 - 15 + 1;
            let mut m = mantissa;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mantissa << 13),
        _ => sign | ((exponent + 127 - 15) << 23) | (mantissa << 13),
    };
    f32::from_bits(value)
}

/// Rows of a `[rows, cols]` matrix reordered from HF's rotate-half layout to
/// GGUF's interleaved one, head by head (what the HF-to-GGUF converter does to
/// the q and k projections of Llama models).
pub fn permute_rows_for_rope(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for head in 0..n_head {
        for i in 0..half {
            for two in 0..2 {
                let new_row = head * head_dim + i * 2 + two;
                let old_row = head * head_dim + two * half + i;
                out[new_row * cols..(new_row + 1) * cols].copy_from_slice(&data[old_row * cols..(old_row + 1) * cols]);
            }
        }
    }
    out
}

/// Converts a PEFT LoRA directory to a GGUF LoRA adapter for a model of `shape`.
pub fn convert_peft_dir(dir: &Path, shape: &ModelShape) -> Result<ConvertedAdapter, AdapterError> {
    let writer = peft_to_gguf(dir, shape)?;
    let file = tempfile::Builder::new()
        .prefix("understudy-lora-")
        .suffix(".gguf")
        .tempfile()
        .map_err(|error| AdapterError::Invalid { path: dir.to_path_buf(), message: error.to_string() })?;
    let path = file.into_temp_path();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path)
            .map_err(|error| AdapterError::Invalid { path: dir.to_path_buf(), message: error.to_string() })?,
    );
    writer
        .write_to(&mut out)
        .and_then(|()| std::io::Write::flush(&mut out))
        .map_err(|error| AdapterError::Invalid { path: dir.to_path_buf(), message: error.to_string() })?;
    Ok(ConvertedAdapter { path: path.to_path_buf(), _file: path })
}

/// The GGUF adapter for a PEFT directory, in memory.
pub fn peft_to_gguf(dir: &Path, shape: &ModelShape) -> Result<GgufWriter, AdapterError> {
    if !dir.is_dir() {
        return Err(AdapterError::Missing { path: dir.to_path_buf() });
    }
    let config_path = dir.join("adapter_config.json");
    let weights_path = dir.join("adapter_model.safetensors");
    if !config_path.exists() {
        return Err(AdapterError::Missing { path: config_path });
    }
    let bad_config = |message: String| AdapterError::Invalid { path: config_path.clone(), message };
    let text = std::fs::read_to_string(&config_path).map_err(|error| bad_config(error.to_string()))?;
    let config: Value = serde_json::from_str(&text).map_err(|error| bad_config(format!("not JSON: {error}")))?;
    if let Some(kind) = config.get("peft_type").and_then(Value::as_str) {
        if kind != "LORA" {
            return Err(bad_config(format!("peft_type is {kind}; only LORA adapters are supported")));
        }
    }
    let r = config
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad_config("`r` must be a positive integer".into()))? as usize;
    let lora_alpha = config
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|&alpha| alpha > 0.0)
        .ok_or_else(|| bad_config("`lora_alpha` must be a positive number".into()))?;
    for flag in ["fan_in_fan_out", "use_dora"] {
        if config.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad_config(format!("`{flag}: true` is not supported")));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if config.get(pattern).and_then(Value::as_object).is_some_and(|p| !p.is_empty()) {
            return Err(bad_config(format!("a non-empty `{pattern}` is not supported")));
        }
    }
    let rslora = config.get("use_rslora").and_then(Value::as_bool) == Some(true);
    let alpha = if rslora { lora_alpha * (r as f64).sqrt() } else { lora_alpha };

    let tensors = read_safetensors(&weights_path)?;
    let bad_weights = |message: String| AdapterError::Invalid { path: weights_path.clone(), message };
    let mut pairs: HashMap<(usize, &'static str), (Option<&Tensor>, Option<&Tensor>)> = HashMap::new();
    for (name, tensor) in &tensors {
        let parsed = parse_peft_name(name).ok_or_else(|| bad_weights(format!("unexpected tensor `{name}`")))?;
        let (layer, module, is_a) = parsed;
        if layer >= shape.n_layer {
            return Err(bad_weights(format!("tensor `{name}` is for layer {layer}, the model has {}", shape.n_layer)));
        }
        let entry = pairs.entry((layer, module)).or_default();
        if is_a {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    if pairs.is_empty() {
        return Err(bad_weights("no LoRA tensors".into()));
    }
    let mut writer = GgufWriter::new();
    writer.add("general.architecture", GgufValue::String(shape.architecture.clone()));
    writer.add("general.type", GgufValue::String("adapter".into()));
    writer.add("adapter.type", GgufValue::String("lora".into()));
    writer.add("adapter.lora.alpha", GgufValue::F32(alpha as f32));
    let mut keys: Vec<_> = pairs.keys().copied().collect();
    keys.sort();
    for key in keys {
        let (layer, module) = key;
        let (Some(a), Some(b)) = pairs[&key] else {
            return Err(bad_weights(format!("layer {layer} {module}: lora_A or lora_B is missing")));
        };
        let (&[a_r, a_in], &[b_out, b_r]) = (&a.shape[..], &b.shape[..]) else {
            return Err(bad_weights(format!("layer {layer} {module}: lora_A and lora_B must be matrices")));
        };
        if a_r != r || b_r != r {
            return Err(bad_weights(format!(
                "layer {layer} {module}: lora_A is {:?} and lora_B {:?}, expected rank {r}",
                a.shape, b.shape
            )));
        }
        let head_dim = shape.n_embd / shape.n_head.max(1);
        let permute_heads = match module {
            "attn_q" if shape.architecture == "llama" => Some(shape.n_head),
            "attn_k" if shape.architecture == "llama" => Some(shape.n_head_kv),
            _ => None,
        };
        let b_data = match permute_heads {
            Some(n_head) => {
                if n_head * head_dim != b_out || head_dim % 2 != 0 {
                    return Err(bad_weights(format!(
                        "layer {layer} {module}: lora_B has {b_out} rows, the model expects {}",
                        n_head * head_dim
                    )));
                }
                permute_rows_for_rope(&b.data, b_out, r, n_head)
            }
            None => b.data.clone(),
        };
        let base = format!("blk.{layer}.{module}.weight");
        writer
            .add_tensor(&format!("{base}.lora_a"), &[a_in as u64, r as u64], a.data.clone())
            .and_then(|()| writer.add_tensor(&format!("{base}.lora_b"), &[r as u64, b_out as u64], b_data))
            .map_err(|error| bad_weights(error.to_string()))?;
    }
    Ok(writer)
}

/// `(layer, gguf module, is lora_A)` of a PEFT tensor name.
fn parse_peft_name(name: &str) -> Option<(usize, &'static str, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, is_a) = if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        (module, true)
    } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
        (module, false)
    } else {
        return None;
    };
    Some((layer, understudy_types::tensor_names::gguf_projection(module)?, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_gguf_names() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, "attn_q", true))
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
            Some((0, "ffn_down", false))
        );
        assert_eq!(parse_peft_name("base_model.model.lm_head.lora_A.weight"), None);
    }

    #[test]
    fn rope_permutation_interleaves_halves() {
        // One head of dimension 4, one column: rows [0, 1, 2, 3] are (x0, x1 | y0, y1) in HF's
        // rotate-half layout and become (x0, y0, x1, y1).
        let out = permute_rows_for_rope(&[0.0, 1.0, 2.0, 3.0], 4, 1, 1);
        assert_eq!(out, vec![0.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn f16_values_convert() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert!((f16_to_f32(0x0001) - 5.96e-8).abs() < 1e-9);
    }
}
