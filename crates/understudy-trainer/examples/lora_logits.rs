//! Prints the logits of a causal LM with a PEFT LoRA adapter applied, for
//! `bench/train`'s check against Python `peft`. Reads token ids
//! (comma-separated) and prints `{"logits": [[...], ...]}` for every position.
//!
//!   cargo run -p understudy-trainer --example lora_logits -- MODEL.gguf ADAPTER_DIR 1,2,3

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use understudy_models::{causal_lm, llama, peft};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let files = causal_lm::load(std::path::Path::new(&args[1])).unwrap();
    let (adapter, tensors) = peft::load(std::path::Path::new(&args[2])).unwrap();
    let ids: Vec<u32> = args[3].split(',').map(|id| id.trim().parse().unwrap()).collect();
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, Some(&adapter.lora()), 0).unwrap();
    model.load_lora(&tensors).unwrap();
    let n = ids.len();
    let logits = model.forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap()).unwrap();
    let logits = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    println!("{}", serde_json::json!({ "logits": logits }));
}
