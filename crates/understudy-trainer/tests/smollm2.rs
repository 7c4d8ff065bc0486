#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The real causal LM: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to f32).
//! Runs when `UNDERSTUDY_MODELS_DIR` names the models folder (scripts/test.sh
//! sets it), is skipped with a message when that and `CI` are unset, and fails
//! when `CI` is set without it.
//!
//!   UNDERSTUDY_MODELS_DIR=~/.cache/understudy/models RAYON_NUM_THREADS=2 \
//!     cargo test -p understudy-trainer --test smollm2 -- --nocapture

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use understudy_models::{causal_lm, llama};
use understudy_trainer::{train_lora, ChatRow, LoraTrainConfig};

fn smollm2() -> Option<PathBuf> {
    let dir = match std::env::var_os("UNDERSTUDY_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI is set but UNDERSTUDY_MODELS_DIR is not: the real-model tests must run in CI")
        }
        None => {
            eprintln!("skipped: set UNDERSTUDY_MODELS_DIR to the models folder to run the SmolLM2 tests");
            return None;
        }
    };
    let path = dir.join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh", path.display());
    Some(path)
}

#[test]
fn smollm2_gguf_tokenizer_round_trips_chatml() {
    let Some(path) = smollm2() else { return };
    let files = causal_lm::load(&path).unwrap();
    let tokenizer = &files.tokenizer;
    let im_start = tokenizer.encode("<|im_start|>", false).unwrap();
    assert_eq!(im_start.get_ids(), &[1]);
    assert_eq!(tokenizer.encode("<|im_end|>", false).unwrap().get_ids(), &[2]);
    let text =
        "<|im_start|>user\nWhat is 12 + 30? Say it in Français.<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 2);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    assert!(files.chat_template.default_system.as_deref().unwrap_or("").contains("SmolLM"));
}

#[test]
fn smollm2_gguf_weights_predict_the_obvious_next_token() {
    let Some(path) = smollm2() else { return };
    let files = causal_lm::load(&path).unwrap();
    let ids = files.tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let paris = files.tokenizer.encode(" Paris", false).unwrap().get_ids()[0];
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, None, 0).unwrap();
    let n = ids.len();
    let logits = model.forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap()).unwrap();
    let last = logits.narrow(1, n - 1, 1).unwrap().flatten_all().unwrap();
    let top = last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(top, paris, "the top next token is {:?}", files.tokenizer.id_to_token(top));
}

fn rows(n: usize, offset: usize) -> Vec<ChatRow> {
    let subjects = ["Paris", "Mount Everest", "the Nile", "Shakespeare", "Einstein", "Tokyo", "Mozart", "the Sahara"];
    let kinds = [("Where is {}?", "LOC"), ("Who was {}?", "HUM"), ("How tall is {}?", "NUM")];
    (0..n)
        .map(|i| {
            let k = i + offset;
            let (question, label) = kinds[k % kinds.len()];
            let subject = subjects[(k / kinds.len()) % subjects.len()];
            ChatRow {
                prompt: vec![
                    ("system".into(), "Classify the question as HUM, LOC or NUM. Answer with the label only.".into()),
                    ("user".into(), question.replace("{}", subject)),
                ],
                answer: label.into(),
            }
        })
        .collect()
}

#[test]
fn smollm2_short_lora_run_lowers_validation_loss() {
    let Some(path) = smollm2() else { return };
    let out = tempfile::tempdir().unwrap();
    let mut config = LoraTrainConfig::new(&path, out.path());
    config.max_steps = Some(12);
    config.epochs = 10;
    config.batch_size = 4;
    config.seq_len = 64;
    config.learning_rate = 2e-3;
    config.progress = false;
    let report = train_lora(&config, &rows(48, 0), &rows(8, 1)).unwrap();
    eprintln!(
        "SmolLM2 LoRA: validation loss {:.4} -> {:.4} in {} steps, {:.0} tok/s, {:.0}s",
        report.initial_validation_loss,
        report.best_validation_loss.unwrap(),
        report.steps,
        report.tokens_per_second,
        report.wall_seconds
    );
    assert!(report.best_validation_loss.unwrap() < report.initial_validation_loss);
    assert!(out.path().join("adapter_model.safetensors").is_file());
    assert!(out.path().join("adapter_config.json").is_file());
}
