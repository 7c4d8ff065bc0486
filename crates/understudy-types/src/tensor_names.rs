//! Tensor names of a Llama-family decoder (Llama, Qwen2) in HF checkpoints
//! and in GGUF files, in one table: the engine's HF-to-GGUF and PEFT-to-GGUF
//! converters read it one way, the GGUF reader of `understudy-models` the other.

/// Whole-model tensors: `(HF name, GGUF name)`.
pub const MODEL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The norms of a decoder layer: `(HF module, GGUF module)`.
pub const LAYER_NORMS: [(&str, &str); 2] = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")];

/// The linear projections of a decoder layer (what LoRA adapts): `(HF module, GGUF module)`.
pub const LAYER_PROJECTIONS: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// The GGUF module of an HF projection (`self_attn.q_proj` → `attn_q`).
pub fn gguf_projection(hf_module: &str) -> Option<&'static str> {
    LAYER_PROJECTIONS.iter().find(|(hf, _)| *hf == hf_module).map(|(_, gguf)| *gguf)
}

/// The GGUF name of an HF tensor (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`), `None` when it is not part of the decoder.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    if let Some((_, gguf)) = MODEL_TENSORS.iter().find(|(hf, _)| *hf == hf_name) {
        return Some(gguf.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, gguf) = LAYER_NORMS.iter().chain(&LAYER_PROJECTIONS).find(|(hf, _)| *hf == module)?;
    Some(format!("blk.{layer}.{gguf}.{suffix}"))
}

/// The HF name of a GGUF tensor (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`), `None` for tensors with no HF
/// counterpart (`rope_freqs.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    if let Some((hf, _)) = MODEL_TENSORS.iter().find(|(_, gguf)| *gguf == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let (hf, _) = LAYER_NORMS.iter().chain(&LAYER_PROJECTIONS).find(|(_, gguf)| *gguf == module)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, gguf) in [
            ("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"),
            ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
            ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
            ("model.layers.2.post_attention_layernorm.weight", "blk.2.ffn_norm.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.embed_tokens.weight", "token_embd.weight"),
        ] {
            assert_eq!(gguf_tensor_name(hf).as_deref(), Some(gguf));
            assert_eq!(hf_tensor_name(gguf).as_deref(), Some(hf));
        }
        assert_eq!(gguf_projection("mlp.up_proj"), Some("ffn_up"));
        assert_eq!(gguf_projection("input_layernorm"), None);
        assert_eq!(gguf_tensor_name("model.vision_tower.weight"), None);
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.q_proj.scales"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }
}
