//! Tiny random models and adapters for tests and examples: a Llama GGUF with
//! a SentencePiece-style vocabulary (byte fallback, so any text tokenizes),
//! ChatML special tokens and a ChatML chat template, and PEFT adapter
//! directories in safetensors.

use std::io;
use std::path::Path;

use serde_json::json;

use crate::gguf::{GgufValue, GgufWriter};
use crate::sampling::Rng;

/// The shape of a tiny Llama.
#[derive(Debug, Clone, Copy)]
pub struct TinyLlama {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub seed: u64,
    /// Standard deviation of the output projection: larger gives peakier next-token distributions.
    pub output_scale: f32,
}

impl Default for TinyLlama {
    fn default() -> TinyLlama {
        TinyLlama { n_embd: 64, n_layer: 2, n_head: 4, n_head_kv: 2, n_ff: 128, n_ctx: 512, seed: 1, output_scale: 0.5 }
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny vocabulary: `<unk>`, `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`,
/// the 256 byte tokens, `▁` and the printable ASCII characters.
pub fn tiny_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![2, 3, 3, 3, 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    tokens.push("\u{2581}".into());
    types.push(1);
    for c in '!'..='~' {
        tokens.push(c.to_string());
        types.push(1);
    }
    let scores = (0..tokens.len()).map(|idx| if types[idx] == 1 { -1.0 } else { 0.0 }).collect();
    (tokens, scores, types)
}

/// Writes a random tiny Llama GGUF (f32 weights) to `path`.
pub fn write_tiny_llama(path: &Path, shape: &TinyLlama) -> io::Result<()> {
    let (tokens, scores, types) = tiny_vocab();
    let n_vocab = tokens.len();
    let head_dim = shape.n_embd / shape.n_head;
    let n_embd_kv = head_dim * shape.n_head_kv;
    let mut writer = GgufWriter::new();
    writer.add("general.architecture", GgufValue::String("llama".into()));
    writer.add("general.name", GgufValue::String("tiny-llama".into()));
    writer.add("llama.context_length", GgufValue::U32(shape.n_ctx as u32));
    writer.add("llama.embedding_length", GgufValue::U32(shape.n_embd as u32));
    writer.add("llama.block_count", GgufValue::U32(shape.n_layer as u32));
    writer.add("llama.feed_forward_length", GgufValue::U32(shape.n_ff as u32));
    writer.add("llama.attention.head_count", GgufValue::U32(shape.n_head as u32));
    writer.add("llama.attention.head_count_kv", GgufValue::U32(shape.n_head_kv as u32));
    writer.add("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5));
    writer.add("llama.rope.dimension_count", GgufValue::U32(head_dim as u32));
    writer.add("llama.rope.freq_base", GgufValue::F32(10000.0));
    writer.add("llama.vocab_size", GgufValue::U32(n_vocab as u32));
    writer.add("tokenizer.ggml.model", GgufValue::String("llama".into()));
    writer.add("tokenizer.ggml.tokens", GgufValue::StringArray(tokens));
    writer.add("tokenizer.ggml.scores", GgufValue::F32Array(scores));
    writer.add("tokenizer.ggml.token_type", GgufValue::I32Array(types));
    writer.add("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
    writer.add("tokenizer.ggml.eos_token_id", GgufValue::U32(4));
    writer.add("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    writer.add("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
    writer.add("tokenizer.chat_template", GgufValue::String(CHATML.into()));

    let mut rng = Rng::new(shape.seed);
    let mut random = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // The sum of 4 uniforms, scaled to the requested standard deviation.
                let sum: f64 = (0..4).map(|_| rng.next_f64() - 0.5).sum();
                (sum * (3.0f64).sqrt()) as f32 * std
            })
            .collect()
    };
    let e = shape.n_embd as u64;
    let attn_std = 1.0 / (shape.n_embd as f32).sqrt();
    writer.add_tensor("token_embd.weight", &[e, n_vocab as u64], random(shape.n_embd * n_vocab, 1.0))?;
    for layer in 0..shape.n_layer {
        let name = |part: &str| format!("blk.{layer}.{part}.weight");
        writer.add_tensor(&name("attn_norm"), &[e], vec![1.0; shape.n_embd])?;
        writer.add_tensor(&name("attn_q"), &[e, e], random(shape.n_embd * shape.n_embd, attn_std))?;
        writer.add_tensor(&name("attn_k"), &[e, n_embd_kv as u64], random(shape.n_embd * n_embd_kv, attn_std))?;
        writer.add_tensor(&name("attn_v"), &[e, n_embd_kv as u64], random(shape.n_embd * n_embd_kv, attn_std))?;
        writer.add_tensor(&name("attn_output"), &[e, e], random(shape.n_embd * shape.n_embd, attn_std))?;
        writer.add_tensor(&name("ffn_norm"), &[e], vec![1.0; shape.n_embd])?;
        writer.add_tensor(&name("ffn_gate"), &[e, shape.n_ff as u64], random(shape.n_embd * shape.n_ff, attn_std))?;
        writer.add_tensor(&name("ffn_up"), &[e, shape.n_ff as u64], random(shape.n_embd * shape.n_ff, attn_std))?;
        let down_std = 1.0 / (shape.n_ff as f32).sqrt();
        writer.add_tensor(&name("ffn_down"), &[shape.n_ff as u64, e], random(shape.n_ff * shape.n_embd, down_std))?;
    }
    writer.add_tensor("output_norm.weight", &[e], vec![1.0; shape.n_embd])?;
    writer.add_tensor("output.weight", &[e, n_vocab as u64], random(shape.n_embd * n_vocab, shape.output_scale))?;
    writer.write_file(path)
}

/// Writes a safetensors file of f32 tensors (name, row-major shape, values).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let end = offset + data.len() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for (_, _, data) in tensors {
        for value in data {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
    }
    std::fs::write(path, bytes)
}

/// Writes a PEFT LoRA directory for a tiny Llama: q and v projections of
/// every layer, rank `r`, A random and B random times `b_scale` (0: an
/// adapter that changes nothing).
pub fn write_tiny_peft_adapter(dir: &Path, shape: &TinyLlama, r: usize, b_scale: f32, seed: u64) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": false});
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    let head_dim = shape.n_embd / shape.n_head;
    let mut rng = Rng::new(seed);
    let mut random =
        |n: usize, scale: f32| (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * 2.0 * scale).collect::<Vec<f32>>();
    let mut tensors = Vec::new();
    for layer in 0..shape.n_layer {
        for (module, out) in [("q_proj", shape.n_embd), ("v_proj", head_dim * shape.n_head_kv)] {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            tensors.push((format!("{base}.lora_A.weight"), vec![r, shape.n_embd], random(r * shape.n_embd, 0.3)));
            tensors.push((format!("{base}.lora_B.weight"), vec![out, r], random(out * r, b_scale)));
        }
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
}

/// The JSON-extraction workload's messages (for the SmolLM2 tests and
/// `examples/engine_bench.rs`): the instruction, one worked example in
/// compact JSON (as a lead answering under a JSON schema writes it, so that
/// even an untuned model answers in that shape) and the SMS.
pub fn extraction_messages(sms: &str) -> serde_json::Value {
    json!([
        {"role": "system", "content": "Extract the sender's name, phone number, date and place from the SMS. \
            Answer with JSON only, with the keys name, phone, date and place."},
        {"role": "user", "content": "SMS: Hi, it's Tom Baker. Meet me on June 3 at Central Station, call 555-0199."},
        {"role": "assistant", "content": "{\"name\":\"Tom Baker\",\"phone\":\"555-0199\",\"date\":\"June 3\",\"place\":\"Central Station\"}"},
        {"role": "user", "content": format!("SMS: {sms}")},
    ])
}

/// The extraction workload's `response_format`: json_schema with its four
/// string keys, all required.
pub fn extraction_schema_format() -> serde_json::Value {
    let string = json!({"type": "string"});
    json!({"type": "json_schema", "json_schema": {"name": "sms", "strict": true,
        "schema": {"type": "object", "additionalProperties": false, "required": ["name", "phone", "date", "place"],
            "properties": {"name": string, "phone": string, "date": string, "place": string}}}})
}
