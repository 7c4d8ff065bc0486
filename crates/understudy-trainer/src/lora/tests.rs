#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};
use understudy_models::causal_lm::CausalLmFiles;
use understudy_models::chat::ChatTemplate;
use understudy_models::llama::{self, LoraConfig};
use understudy_models::peft;

use super::*;

const VOCAB: usize = 40;

fn word_tokenizer() -> Tokenizer {
    let words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "what", "is", "two", "four"];
    let vocab: tokenizers::models::bpe::Vocab =
        words.iter().enumerate().map(|(id, word)| (word.to_string(), id as u32)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer
        .add_special_tokens([AddedToken::from("<|im_start|>", true), AddedToken::from("<|im_end|>", true)])
        .unwrap();
    tokenizer
}

fn tiny_files(seed: u64) -> CausalLmFiles {
    let config = llama::tiny_config(VOCAB);
    CausalLmFiles {
        weights: llama::random_weights(&config, seed, &Device::Cpu).unwrap(),
        config,
        tokenizer: word_tokenizer(),
        chat_template: ChatTemplate { default_system: None },
        source: "tiny".into(),
        name: "tiny-llama".into(),
        eos_token_id: Some(2),
    }
}

/// `[1, a, b, 3, c, 2]` where `c = a - 10` (`b` is noise) and the loss covers `c`
/// and the closing token.
fn toy_examples(n: usize, offset: usize) -> Vec<SftExample> {
    (0..n)
        .map(|i| {
            let a = (i * 7 + offset) % 10 + 20;
            let b = (i * 3 + offset * 5) % 10 + 20;
            let c = a - 10;
            SftExample {
                ids: vec![1, a as u32, b as u32, 3, c as u32, 2],
                loss_mask: vec![false, false, false, false, true, true],
            }
        })
        .collect()
}

fn toy_config(dir: &std::path::Path) -> LoraTrainConfig {
    let mut config = LoraTrainConfig::new("tiny", dir);
    config.lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: llama::TARGET_MODULES.iter().map(|name| name.to_string()).collect(),
    };
    config.epochs = 4;
    config.batch_size = 8;
    config.learning_rate = 5e-3;
    config.progress = false;
    config.patience = 10;
    config
}

#[test]
fn loss_falls_on_a_learnable_toy_task() {
    let dir = tempfile::tempdir().unwrap();
    let config = toy_config(dir.path());
    let report = train_lora_on(&config, tiny_files(1), &toy_examples(64, 0), &toy_examples(16, 3), 2).unwrap();
    let best = report.best_validation_loss.unwrap();
    assert!(
        best < report.initial_validation_loss * 0.6,
        "validation loss {best} vs {} before training",
        report.initial_validation_loss
    );
    let first = report.epochs.first().unwrap().train_loss;
    let last = report.epochs.last().unwrap().train_loss;
    assert!(last < first, "train loss {first} -> {last}");
    assert!(dir.path().join(MANIFEST_FILE).is_file());
}

#[test]
fn adapter_has_peft_names_shapes_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(dir.path());
    config.epochs = 1;
    config.lora.target_modules = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    train_lora_on(&config, tiny_files(1), &toy_examples(24, 0), &toy_examples(4, 3), 2).unwrap();
    let (adapter, tensors) = peft::load(dir.path()).unwrap();
    assert_eq!(adapter.peft_type, "LORA");
    assert_eq!(adapter.task_type, "CAUSAL_LM");
    assert_eq!(adapter.r, 4);
    assert_eq!(adapter.bias, "none");
    assert!(!adapter.fan_in_fan_out);
    let cfg = llama::tiny_config(VOCAB);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("base_model.model.model.layers.{i}");
        expected.insert(format!("{p}.self_attn.q_proj.lora_A.weight"), vec![4, cfg.hidden_size]);
        expected.insert(format!("{p}.self_attn.q_proj.lora_B.weight"), vec![cfg.hidden_size, 4]);
        expected.insert(format!("{p}.self_attn.v_proj.lora_A.weight"), vec![4, cfg.hidden_size]);
        expected.insert(format!("{p}.self_attn.v_proj.lora_B.weight"), vec![kv, 4]);
        expected.insert(format!("{p}.mlp.down_proj.lora_A.weight"), vec![4, cfg.intermediate_size]);
        expected.insert(format!("{p}.mlp.down_proj.lora_B.weight"), vec![cfg.hidden_size, 4]);
    }
    let actual: HashMap<String, Vec<usize>> =
        tensors.iter().map(|(name, tensor)| (name.clone(), tensor.dims().to_vec())).collect();
    assert_eq!(actual, expected);
    assert!(tensors.values().all(|tensor| tensor.dtype() == DType::F32));
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(raw["lora_alpha"], 8.0);
    assert_eq!(raw["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));

    // The adapter loads back into a model and changes its output.
    let files = tiny_files(1);
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, Some(&adapter.lora()), 99).unwrap();
    model.load_lora(&tensors).unwrap();
    let vars = model.lora_vars();
    let (name, var) = vars.iter().find(|(name, _)| name.ends_with("lora_B.weight")).unwrap();
    let diff = (var.as_tensor() - &tensors[name]).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let train = toy_examples(48, 0);
    let validation = toy_examples(8, 3);
    let full_dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(full_dir.path());
    config.epochs = 2;
    config.lora.dropout = 0.1;
    config.checkpoint_every_steps = Some(2);
    let full = train_lora_on(&config, tiny_files(1), &train, &validation, 2).unwrap();

    let split_dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(split_dir.path());
    config.epochs = 2;
    config.lora.dropout = 0.1;
    config.checkpoint_every_steps = Some(2);
    config.stop_after_steps = Some(4);
    let first = train_lora_on(&config, tiny_files(1), &train, &validation, 2).unwrap();
    assert!(first.interrupted);
    assert!(!split_dir.path().join(MANIFEST_FILE).exists());
    config.stop_after_steps = None;
    config.resume = true;
    let resumed = train_lora_on(&config, tiny_files(1), &train, &validation, 2).unwrap();
    assert_eq!(resumed.steps, full.steps);
    for (a, b) in full.epochs.iter().zip(&resumed.epochs) {
        assert!((a.validation_loss - b.validation_loss).abs() < 1e-4, "{a:?} vs {b:?}");
    }
    let (_, full_tensors) = peft::load(full_dir.path()).unwrap();
    let (_, resumed_tensors) = peft::load(split_dir.path()).unwrap();
    for (name, tensor) in &full_tensors {
        let diff = (tensor - &resumed_tensors[name]).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "{name}");
    }
}

#[test]
fn loss_mask_covers_only_the_assistant_tokens() {
    let tokenizer = word_tokenizer();
    let template = ChatTemplate { default_system: None };
    let rows = vec![ChatRow { prompt: vec![("user".into(), "what is two".into())], answer: "four".into() }; 1];
    let examples = encode_rows(&template, &tokenizer, &rows, 100).unwrap();
    let example = &examples[0];
    let words: Vec<String> = example.ids.iter().map(|&id| tokenizer.id_to_token(id).unwrap()).collect();
    let covered: Vec<&str> =
        words.iter().zip(&example.loss_mask).filter(|(_, &covered)| covered).map(|(word, _)| word.as_str()).collect();
    assert_eq!(covered, vec!["four", "<|im_end|>"]);
    assert_eq!(words.iter().filter(|word| *word == "<|im_start|>").count(), 2);
    // Truncation keeps the answer: the prompt's start goes.
    let cut = encode_rows(&template, &tokenizer, &rows, 3).unwrap();
    assert_eq!(cut[0].ids.len(), 3);
    assert_eq!(cut[0].loss_mask.iter().filter(|&&covered| covered).count(), 2);
}

#[test]
fn too_few_rows_stop_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = toy_config(dir.path());
    let error = train_lora_on(&config, tiny_files(1), &toy_examples(5, 0), &toy_examples(2, 0), 2).unwrap_err();
    assert!(error.to_string().contains("at least 20"), "{error}");
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

fn write_tiny_causal_dir(dir: &std::path::Path, architecture: &str, model_type: &str) -> llama::Config {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = llama::tiny_config(VOCAB);
    cfg.architectures = Some(vec![architecture.to_string()]);
    cfg.model_type = Some(model_type.to_string());
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let words: Vec<String> = (0..VOCAB - 4).map(|i| format!("w{i}")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    std::fs::write(dir.join("tokenizer.json"), crate::testing::tokenizer_json(&words).to_string()).unwrap();
    if cfg.check_supported().is_ok() {
        let weights = llama::random_weights(&cfg, 4, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    } else {
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    }
    cfg
}

#[test]
fn hf_qwen2_and_llama_dirs_load_and_other_architectures_are_named() {
    let root = tempfile::tempdir().unwrap();
    for (architecture, model_type) in [("Qwen2ForCausalLM", "qwen2"), ("LlamaForCausalLM", "llama")] {
        let dir = root.path().join(model_type);
        let cfg = write_tiny_causal_dir(&dir, architecture, model_type);
        let files = understudy_models::causal_lm::load(&dir).unwrap();
        assert_eq!(files.config.qkv_bias(), model_type == "qwen2");
        // Qwen2's q/k/v biases are loaded (missing ones would fail here).
        assert_eq!(files.weights.contains_key("model.layers.0.self_attn.q_proj.bias"), model_type == "qwen2");
        let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
        let model = llama::Model::new(&files.config, vb, Some(&LoraConfig::new()), 1).unwrap();
        let logits = model.forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);
    }
    let dir = root.path().join("mistral");
    write_tiny_causal_dir(&dir, "MistralForCausalLM", "mistral");
    let error = understudy_models::causal_lm::load(&dir).err().unwrap().to_string();
    assert!(error.contains("\"MistralForCausalLM\"") && error.contains("not supported"), "{error}");
}
