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

/// A word tokenizer over the whole toy vocabulary: ten named words, then
/// `w10` ... `w39` for the ids the toy examples use.
fn word_tokenizer() -> Tokenizer {
    let named = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "what", "is", "two", "four"];
    let words: Vec<String> =
        named.iter().map(|word| word.to_string()).chain((named.len()..VOCAB).map(|id| format!("w{id}"))).collect();
    let vocab: tokenizers::models::bpe::Vocab =
        words.iter().enumerate().map(|(id, word)| (word.clone(), id as u32)).collect();
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

/// The answers of the toy task as labels: `w10` ... `w19`.
fn toy_labels() -> Vec<String> {
    (10..20).map(|id| format!("w{id}")).collect()
}

/// Like [`toy_examples`], but the answer is drawn at random from the seed:
/// nothing to learn, so validation stops improving.
fn random_answer_examples(n: usize, seed: u64) -> Vec<SftExample> {
    let mut examples = toy_examples(n, seed as usize);
    let mut state = seed;
    for example in &mut examples {
        state = crate::data::mix(state, 1);
        example.ids[4] = 10 + (state % 10) as u32;
    }
    examples
}

fn best_by_metric(report: &LoraTrainReport) -> &LoraEpochMetrics {
    let mut best = &report.epochs[0];
    for epoch in &report.epochs[1..] {
        if epoch.beats(best) {
            best = epoch;
        }
    }
    best
}

#[test]
fn label_accuracy_is_measured_every_epoch_and_picks_the_best_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(dir.path());
    config.epochs = 12;
    config.learning_rate = 1e-2;
    config.task_metric = TaskMetric::LabelAccuracy { labels: toy_labels() };
    let report = train_lora_on(&config, tiny_files(1), &toy_examples(64, 0), &toy_examples(16, 3), 2).unwrap();
    assert_eq!(report.task_metric_name, Some("label_accuracy"));
    let initial = report.initial_task_metric.unwrap();
    let accuracies: Vec<f64> = report.epochs.iter().map(|epoch| epoch.task_metric.unwrap()).collect();
    assert!(accuracies.iter().all(|accuracy| (0.0..=1.0).contains(accuracy)), "{accuracies:?}");
    // Sixteen rows: accuracies are multiples of 1/16.
    assert!(accuracies.iter().all(|accuracy| (accuracy * 16.0).fract() == 0.0), "{accuracies:?}");
    let best = report.best_task_metric.unwrap();
    assert!(best >= 0.5 && best > initial, "accuracy {initial} before training, {accuracies:?} after epochs");
    assert_eq!(report.best_epoch, Some(best_by_metric(&report).epoch));
    assert_eq!(best, best_by_metric(&report).task_metric.unwrap());

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["report"]["task_metric_name"], "label_accuracy");
    assert_eq!(manifest["report"]["best_task_metric"], best);
    assert_eq!(manifest["hyperparameters"]["task_metric"]["kind"], "label_accuracy");
    assert_eq!(manifest["report"]["epochs"][0]["task_metric"], accuracies[0]);
}

/// The label scores of the metric (the prompt run once, the labels on its
/// cache in one batch) against scoring every prompt + label sequence whole.
#[test]
fn constrained_label_choice_matches_scoring_each_full_sequence() {
    let files = tiny_files(7);
    let tokenizer = files.tokenizer.clone();
    let vb = VarBuilder::from_tensors(files.weights.clone(), DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, None, 1).unwrap();
    // Labels of different lengths: padding must not change the scores.
    let labels: Vec<String> = vec!["w10".into(), "w11 w12".into(), "w13 w14 w15".into(), "four".into()];
    let metric = TaskMetric::LabelAccuracy { labels: labels.clone() };
    let validation = toy_examples(12, 5);
    let setup = metric::MetricSetup::new(&metric, &tokenizer, Some(2), &validation, 64).unwrap().unwrap();
    let mut chosen = Vec::new();
    for example in &validation {
        let prompt = &example.ids[..4];
        let nll_of = |label: &str| -> f64 {
            let answer = tokenizer.encode(format!("{label}<|im_end|>"), false).unwrap().get_ids().to_vec();
            let ids: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
            let logits = model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap());
            let logits = logits.unwrap().squeeze(0).unwrap();
            let targets = ids[prompt.len()..].to_vec();
            let rows = logits.narrow(0, prompt.len() - 1, targets.len()).unwrap();
            let nll = understudy_models::ops::cross_entropy_rows(&rows, &targets).unwrap();
            nll.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let scores: Vec<f64> = labels.iter().map(|label| nll_of(label)).collect();
        let cached = setup.label_nll(&model, prompt).unwrap();
        for (full, cached) in scores.iter().zip(&cached) {
            assert!((full - cached).abs() < 1e-3, "{scores:?} vs {cached:?}");
        }
        let expected = (0..labels.len()).fold(0, |best, idx| if scores[idx] < scores[best] { idx } else { best });
        assert_eq!(setup.most_likely_label(&model, prompt).unwrap(), expected, "{scores:?}");
        chosen.push(scores);
    }
    // The scores differ from row to row and label to label: the comparison is not of constants.
    assert!(chosen.windows(2).any(|pair| pair[0] != pair[1]), "{chosen:?}");
    assert!(chosen[0].windows(2).any(|pair| (pair[0] - pair[1]).abs() > 1e-3), "{chosen:?}");
}

#[test]
fn token_f1_of_a_greedy_decode_rises_on_a_learnable_toy_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(dir.path());
    config.epochs = 12;
    config.learning_rate = 1e-2;
    config.task_metric = TaskMetric::TokenF1 { max_new_tokens: 3 };
    config.metric_rows = 8;
    let validation = toy_examples(16, 3);
    let report = train_lora_on(&config, tiny_files(1), &toy_examples(64, 0), &validation, 2).unwrap();
    assert_eq!(report.task_metric_name, Some("token_f1"));
    let initial = report.initial_task_metric.unwrap();
    let best = report.best_task_metric.unwrap();
    assert!(best >= 0.5 && best > initial, "token F1 {initial} before training, {:?}", report.epochs);
    assert_eq!(report.best_epoch, Some(best_by_metric(&report).epoch));

    // The kept adapter's greedy answers are what the metric scored.
    let files = tiny_files(1);
    let tokenizer = files.tokenizer.clone();
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, Some(&config.lora), 1).unwrap();
    let (_, tensors) = peft::load(dir.path()).unwrap();
    model.load_lora(&tensors).unwrap();
    let setup = metric::MetricSetup::new(&config.task_metric, &tokenizer, Some(2), &validation, 8).unwrap().unwrap();
    let mut total = 0.0;
    for example in &validation[..8] {
        let decoded = setup.greedy(&model, &example.ids[..4], 3).unwrap();
        let text = tokenizer.decode(&decoded, true).unwrap();
        let reference = tokenizer.id_to_token(example.ids[4]).unwrap();
        total += understudy_eval::generation::token_f1(&reference, &text);
    }
    assert!((total / 8.0 - best).abs() < 1e-9, "{} vs {best}", total / 8.0);
}

#[test]
fn early_stopping_ends_the_run_and_keeps_the_best_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = toy_config(dir.path());
    config.epochs = 10;
    config.patience = 1;
    config.learning_rate = 2e-2;
    config.task_metric = TaskMetric::LabelAccuracy { labels: toy_labels() };
    let train = random_answer_examples(64, 11);
    let validation = random_answer_examples(16, 12);
    let report = train_lora_on(&config, tiny_files(1), &train, &validation, 2).unwrap();
    assert!(report.stopped_early, "{:?}", report.epochs);
    assert!(report.epochs.len() < config.epochs, "{:?}", report.epochs);
    // Patience 1: the run ends at the first epoch that is not the best so far.
    let last = report.epochs.last().unwrap();
    assert_ne!(report.best_epoch, Some(last.epoch));
    for (idx, epoch) in report.epochs[..report.epochs.len() - 1].iter().enumerate() {
        assert!(idx == 0 || epoch.beats(&report.epochs[idx - 1]), "{:?}", report.epochs);
    }
    let best = best_by_metric(&report);
    assert_eq!(report.best_epoch, Some(best.epoch));

    // The adapter on disk is the best epoch's: its validation loss is that epoch's.
    let files = tiny_files(1);
    let vb = VarBuilder::from_tensors(files.weights, DType::F32, &Device::Cpu);
    let model = llama::Model::new(&files.config, vb, Some(&config.lora), 1).unwrap();
    let (_, tensors) = peft::load(dir.path()).unwrap();
    model.load_lora(&tensors).unwrap();
    let loss = validation_loss(&model, &validation, 2, config.batch_size).unwrap();
    assert!((loss - best.validation_loss).abs() < 1e-4, "{loss} vs {best:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["report"]["stopped_early"], true);
    assert_eq!(manifest["report"]["epochs"].as_array().unwrap().len(), report.epochs.len());
    assert_eq!(manifest["report"]["best_epoch"], best.epoch);
}
