//! Times LoRA training steps (forward, backward, update) on a causal LM, for
//! `bench/train`. Prints one JSON object with per-step seconds.
//!
//!   RAYON_NUM_THREADS=2 cargo run -p understudy-trainer --example lora_step_bench -- \
//!     models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf 8 128 5 8 q_proj,v_proj [ADAPTER_OUT]
//!
//! With ADAPTER_OUT, the LoRA B matrices are then set to small random values
//! (so that the adapter changes the logits) and the adapter is written there
//! in PEFT format, for the bench's check that Python `peft` applies it alike.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The allocator of `understudy train`, set up as the CLI sets it (freed
/// memory kept: `mi_option_purge_delay` -1), so that the bench measures what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use understudy_models::causal_lm;
use understudy_models::llama::{self, LoraConfig};

fn main() {
    understudy_trainer::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let batch: usize = args.get(2).map_or(8, |v| v.parse().unwrap());
    let seq: usize = args.get(3).map_or(128, |v| v.parse().unwrap());
    let steps: usize = args.get(4).map_or(5, |v| v.parse().unwrap());
    let rank: usize = args.get(5).map_or(8, |v| v.parse().unwrap());
    let targets: Vec<String> =
        args.get(6).map_or("q_proj,v_proj", |v| v.as_str()).split(',').map(str::to_string).collect();
    let load_started = Instant::now();
    let files = causal_lm::load(&path).unwrap();
    let lora = LoraConfig { rank, alpha: 2.0 * rank as f64, dropout: 0.0, target_modules: targets };
    let vocab = files.config.vocab_size as u32;
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, Some(&lora), 0).unwrap();
    let load_seconds = load_started.elapsed().as_secs_f64();
    let vars = model.lora_vars();
    // Deterministic pseudo-text: the bench measures speed, not learning.
    let ids: Vec<u32> =
        (0..batch * (seq + 1)).map(|i| ((i as u64 * 2_654_435_761) % (vocab as u64 - 200)) as u32 + 100).collect();
    let ids = Tensor::from_vec(ids, (batch, seq + 1), &Device::Cpu).unwrap();
    let inputs = ids.narrow(1, 0, seq).unwrap();
    let targets = ids.narrow(1, 1, seq).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let mut step_seconds = Vec::new();
    let mut forward_seconds = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let started = Instant::now();
        let logits = model.forward(&inputs).unwrap().reshape((batch * seq, vocab as usize)).unwrap();
        let loss = understudy_models::ops::cross_entropy_rows(&logits, &targets).unwrap().mean_all().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        forward_seconds.push(started.elapsed().as_secs_f64());
        let grads = loss.backward().unwrap();
        for (_, var) in &vars {
            let grad = grads.get(var.as_tensor()).unwrap();
            var.set(&(var.as_tensor() - (grad * 1e-4).unwrap()).unwrap()).unwrap();
        }
        step_seconds.push(started.elapsed().as_secs_f64());
    }
    if let Some(dir) = args.get(7) {
        for (name, var) in &vars {
            if name.ends_with("lora_B.weight") {
                var.set(&Tensor::randn(0f32, 0.02, var.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        understudy_trainer::write_adapter(std::path::Path::new(dir), &model, &path.display().to_string(), &lora)
            .unwrap();
    }
    println!(
        "{}",
        serde_json::json!({
            "batch": batch, "seq": seq, "rank": rank, "load_seconds": load_seconds,
            "step_seconds": step_seconds, "forward_seconds": forward_seconds, "losses": losses,
        })
    );
}
