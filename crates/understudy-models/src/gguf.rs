//! Loading a Llama-family GGUF file for training: tensors dequantized to f32
//! under their HF names, the config from `llama.*` metadata, and a
//! `tokenizers::Tokenizer` rebuilt from the `tokenizer.ggml.*` metadata.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` so that
//! its rope rotates adjacent pairs; [`unpermute`] undoes that, so the weights
//! fit HF's rotate-half rope that [`crate::llama`] uses.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::hf::LoadError;
use crate::llama;

/// What a GGUF file holds, ready for [`llama::Model::new`].
pub struct GgufModel {
    pub config: llama::Config,
    /// f32 tensors by HF name (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `general.organization/general.basename` style name, for manifests.
    pub name: Option<String>,
}

struct Meta<'a> {
    path: &'a Path,
    metadata: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn error(&self, message: String) -> LoadError {
        LoadError::Config { path: self.path.to_path_buf(), message }
    }

    fn get(&self, key: &str) -> Result<&Value, LoadError> {
        self.metadata.get(key).ok_or_else(|| self.error(format!("the GGUF metadata has no {key}")))
    }

    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        let value = self.get(key)?;
        value
            .to_u64()
            .map(|v| v as usize)
            .or_else(|_| value.to_u32().map(|v| v as usize))
            .or_else(|_| value.to_i32().map(|v| v as usize))
            .map_err(|error| self.error(format!("{key}: {error}")))
    }

    fn f64(&self, key: &str) -> Result<f64, LoadError> {
        let value = self.get(key)?;
        value.to_f32().map(f64::from).or_else(|_| value.to_f64()).map_err(|error| self.error(format!("{key}: {error}")))
    }

    fn string(&self, key: &str) -> Option<String> {
        self.metadata.get(key).and_then(|value| value.to_string().ok()).cloned()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, LoadError> {
        let items = self.get(key)?.to_vec().map_err(|error| self.error(format!("{key}: {error}")))?;
        items
            .iter()
            .map(|item| item.to_string().cloned().map_err(|error| self.error(format!("{key}: {error}"))))
            .collect()
    }
}

/// Reads `path`, dequantizes every tensor to f32 and builds the tokenizer.
pub fn load(path: &Path) -> Result<GgufModel, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let weights_error = |source| LoadError::Weights { path: path.to_path_buf(), source };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let content = Content::read(&mut reader).map_err(weights_error)?;
    let meta = Meta { path, metadata: &content.metadata };
    let arch = meta.string("general.architecture").unwrap_or_default();
    if arch != "llama" && arch != "qwen2" {
        return Err(LoadError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "GGUF architecture {arch:?} is not supported: LoRA training supports \"llama\" and \"qwen2\""
            ),
        });
    }
    let num_heads = meta.usize(&format!("{arch}.attention.head_count"))?;
    let num_kv_heads = meta.usize(&format!("{arch}.attention.head_count_kv")).unwrap_or(num_heads);
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = llama::Config {
        vocab_size: meta.usize(&format!("{arch}.vocab_size")).unwrap_or(tokens.len()),
        hidden_size: meta.usize(&format!("{arch}.embedding_length"))?,
        intermediate_size: meta.usize(&format!("{arch}.feed_forward_length"))?,
        num_hidden_layers: meta.usize(&format!("{arch}.block_count"))?,
        num_attention_heads: num_heads,
        num_key_value_heads: Some(num_kv_heads),
        rms_norm_eps: meta.f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta.f64(&format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
        tie_word_embeddings: !has_output,
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        architectures: Some(vec![if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }.to_string()]),
        model_type: Some(arch.clone()),
    };
    config
        .check_supported()
        .map_err(|error| LoadError::Unsupported { path: path.to_path_buf(), message: error.to_string() })?;

    let device = Device::Cpu;
    let mut weights = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf_name) = hf_name(name) else { continue };
        let tensor = content.tensor(&mut reader, name, &device).map_err(weights_error)?;
        let mut tensor = tensor.dequantize(&device).map_err(weights_error)?;
        // llama.cpp permutes q and k (weights and biases) for its pairwise rope,
        // but only for llama; qwen2's converter leaves them in HF order.
        if arch == "llama" {
            if name.contains(".attn_q.") {
                tensor = unpermute(&tensor, num_heads).map_err(weights_error)?;
            } else if name.contains(".attn_k.") {
                tensor = unpermute(&tensor, num_kv_heads).map_err(weights_error)?;
            }
        }
        weights.insert(hf_name, tensor);
    }

    let tokenizer = build_tokenizer(&meta, tokens)?;
    let bos_token_id = meta.usize("tokenizer.ggml.bos_token_id").ok().map(|id| id as u32);
    let eos_token_id = meta.usize("tokenizer.ggml.eos_token_id").ok().map(|id| id as u32);
    let name = match (meta.string("general.organization"), meta.string("general.basename")) {
        (Some(org), Some(base)) => Some(format!("{org}/{base}")),
        _ => meta.string("general.name"),
    };
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
        chat_template: meta.string("tokenizer.chat_template"),
        bos_token_id,
        eos_token_id,
        name,
    })
}

/// The HF name of a llama.cpp tensor, or `None` for tensors training ignores
/// (`rope_freqs`, ...).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    understudy_types::tensor_names::hf_tensor_name(gguf_name)
}

/// Undoes llama.cpp's q/k row permutation. Within each head, llama.cpp's rows
/// are pairs `(x_0, x_{d/2}), (x_1, x_{d/2+1}), ...`; HF's are the first half
/// then the second half. Works on weights `[heads*d, in]` and biases `[heads*d]`.
pub fn unpermute(tensor: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let head_dim = rows / heads;
    tensor.reshape((heads, head_dim / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// llama.cpp token types: 3 is a control token, 4 a user-defined one; both
/// must encode as single ids.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

fn build_tokenizer(meta: &Meta, tokens: Vec<String>) -> Result<Tokenizer, LoadError> {
    let model = meta.string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(LoadError::Unsupported {
            path: meta.path.to_path_buf(),
            message: format!("tokenizer.ggml.model {model:?} is not supported: only \"gpt2\" (byte-level BPE) is"),
        });
    }
    let tokenizer_error = |message: String| LoadError::Tokenizer { path: meta.path.to_path_buf(), message };
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|merge| merge.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let token_types: Vec<i32> = match meta.metadata.get("tokenizer.ggml.token_type") {
        Some(value) => value
            .to_vec()
            .map_err(|error| meta.error(format!("tokenizer.ggml.token_type: {error}")))?
            .iter()
            .map(|item| item.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|error| tokenizer_error(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = meta.string("tokenizer.ggml.pre").unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    // SmolLM's and Qwen2's pre-tokenizers split digits one by one first.
    let pre_tokenizer: PreTokenizerWrapper = if pre == "smollm" || pre == "qwen2" {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types.iter())
        .filter(|(_, &kind)| kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer.add_special_tokens(special).map_err(|error| tokenizer_error(error.to_string()))?;
    Ok(tokenizer)
}

/// A GGUF file named directly, or the single `*.gguf` in a directory.
pub fn find_gguf(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return path.extension().is_some_and(|ext| ext == "gguf").then(|| path.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_down.weight").unwrap(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(w.shape)
        let (heads, head_dim, inputs) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * head_dim * inputs) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * head_dim, inputs))
            .unwrap();
        let permuted = hf
            .reshape((heads, 2, head_dim / 2, inputs))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * head_dim, inputs))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
