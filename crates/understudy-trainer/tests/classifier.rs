#![allow(clippy::unwrap_used)]

//! End-to-end training on a tiny random BERT: the loss falls on a learnable
//! task, a killed run resumes to the same result, frozen layers stay put, and
//! bad input stops with an error that says what is wrong.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use understudy_trainer::testing::write_tiny_bert_dir;
use understudy_trainer::{train_classifier, ClassifierModel, ClassifierTrainConfig, LabeledText, TrainError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ANIMALS: [&str; 6] = ["cat", "dog", "horse", "cow", "owl", "fox"];
const COLOURS: [&str; 6] = ["red", "blue", "green", "pink", "grey", "gold"];
const FILLER: [&str; 8] = ["the", "a", "is", "very", "and", "big", "small", "was"];

fn vocab() -> Vec<&'static str> {
    ANIMALS.iter().chain(&COLOURS).chain(&FILLER).copied().collect()
}

/// Label "animal" or "colour" by which kind of key word the text holds,
/// among random filler words: learnable, but not from length or position.
fn rows(count: usize, seed: u64) -> Vec<LabeledText> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    (0..count)
        .map(|i| {
            let (label, keys) = if i % 2 == 0 { ("animal", &ANIMALS) } else { ("colour", &COLOURS) };
            let mut words: Vec<&str> = (0..1 + next(4)).map(|_| FILLER[next(FILLER.len())]).collect();
            words.insert(next(words.len() + 1), keys[next(keys.len())]);
            LabeledText { text: words.join(" "), label: label.to_string() }
        })
        .collect()
}

fn config(base: &Path, out: &Path) -> ClassifierTrainConfig {
    let mut config = ClassifierTrainConfig::new(base, out);
    config.epochs = 6;
    config.batch_size = 8;
    config.learning_rate = 3e-3;
    config.head_lr_multiplier = 1.0;
    config.warmup_ratio = 0.1;
    config.progress = false;
    config.patience = 10;
    config.train_embeddings = true;
    config
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn loss_falls_and_the_saved_classifier_predicts() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_bert_dir(&base, &vocab(), 1)?;
    let out = tmp.path().join("out");
    let mut config = config(&base, &out);
    config.epochs = 15;
    config.grad_accum_steps = 2;
    let report = train_classifier(&config, &rows(96, 1), &rows(32, 2))?;
    let first = &report.epochs[0];
    let last = report.epochs.last().ok_or("no epochs")?;
    assert!(last.train_loss < 0.5 * first.train_loss, "loss did not fall: {:?}", report.epochs);
    let best = report.best_validation_accuracy.ok_or("no best epoch")?;
    assert!(best >= 0.9, "validation accuracy {best}: {:?}", report.epochs);
    assert_eq!(report.labels, ["animal", "colour"]);

    for file in ["head.safetensors", "encoder.safetensors", "labels.json", "config.json", "tokenizer.json"] {
        assert!(out.join(file).is_file(), "{file} is missing from the output");
    }
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert_eq!(manifest["best_epoch"], serde_json::json!(report.best_epoch));
    assert!(manifest["hyperparameters"]["learning_rate"].is_number());

    let model = ClassifierModel::load(&out)?;
    let validation = rows(32, 2);
    let texts: Vec<String> = validation.iter().map(|row| row.text.clone()).collect();
    let predictions = model.predict(&texts)?;
    let correct = predictions.iter().zip(&validation).filter(|(p, row)| p.label == row.label).count();
    assert!((correct as f64 / 32.0 - best).abs() < 1e-9, "reloaded model disagrees with training's validation");
    for prediction in &predictions {
        let total: f32 = prediction.probabilities.iter().sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert!(
            prediction.confidence >= 0.5
                && prediction.confidence == prediction.probabilities.iter().cloned().fold(0.0, f32::max)
        );
    }
    Ok(())
}

#[test]
fn a_killed_run_resumes_to_the_same_result() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_bert_dir(&base, &vocab(), 2)?;
    let (train, validation) = (rows(60, 3), rows(20, 4));

    let whole_dir = tmp.path().join("whole");
    let mut whole = config(&base, &whole_dir);
    whole.epochs = 3;
    whole.checkpoint_every_steps = Some(3);
    let uninterrupted = train_classifier(&whole, &train, &validation)?;

    let split_dir = tmp.path().join("split");
    let mut split = config(&base, &split_dir);
    split.epochs = 3;
    split.checkpoint_every_steps = Some(3);
    // 60 rows in batches of 8: 8 steps an epoch. Stop mid-epoch 2, at a
    // checkpoint; a later stop leaves work after the checkpoint to redo.
    split.stop_after_steps = Some(12);
    let first = train_classifier(&split, &train, &validation)?;
    assert!(first.interrupted);
    split.stop_after_steps = Some(14);
    split.resume = true;
    let second = train_classifier(&split, &train, &validation)?;
    assert!(second.interrupted && second.steps == 14);
    split.stop_after_steps = None;
    let resumed = train_classifier(&split, &train, &validation)?;

    assert!(!resumed.interrupted);
    assert_eq!(resumed.steps, uninterrupted.steps);
    assert_eq!(resumed.best_epoch, uninterrupted.best_epoch);
    for (a, b) in resumed.epochs.iter().zip(&uninterrupted.epochs) {
        assert!((a.train_loss - b.train_loss).abs() < 1e-4, "{a:?} vs {b:?}");
        assert!((a.validation_loss - b.validation_loss).abs() < 1e-4, "{a:?} vs {b:?}");
    }
    for file in ["head.safetensors", "encoder.safetensors"] {
        let (a, b) = (load(&split_dir.join(file)), load(&whole_dir.join(file)));
        for (name, tensor) in &a {
            let diff = max_abs_diff(tensor, &b[name]);
            assert!(diff < 1e-4, "{file} {name} differs by {diff}");
        }
    }
    Ok(())
}

#[test]
fn frozen_layers_get_no_updates() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_bert_dir(&base, &vocab(), 3)?;
    let out = tmp.path().join("out");
    let mut config = config(&base, &out);
    config.epochs = 2;
    config.train_top_layers = Some(1);
    let report = train_classifier(&config, &rows(40, 5), &rows(10, 6))?;
    // Layer 1 (16 tensors) and the head (2).
    assert_eq!(report.trained_parameters, 4 * 32 * 32 + 2 * 32 * 64 + 64 + 9 * 32 + 2 * 32 + 2);

    let base_weights = load(&base.join("model.safetensors"));
    let tuned = load(&out.join("encoder.safetensors"));
    let (mut same, mut changed) = (0, 0);
    for (name, tensor) in &tuned {
        let diff = max_abs_diff(tensor, &base_weights[&format!("bert.{name}")]);
        if name.starts_with("encoder.layer.1.") {
            assert!(diff > 0.0, "trained {name} did not change");
            changed += 1;
        } else {
            assert_eq!(diff, 0.0, "frozen {name} changed");
            same += 1;
        }
    }
    assert_eq!((same, changed), (5 + 16, 16));
    Ok(())
}

#[test]
fn bad_input_says_what_is_missing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_bert_dir(&base, &vocab(), 4)?;
    let config = config(&base, &tmp.path().join("out"));
    let message = |result: Result<_, TrainError>| match result {
        Ok(_) => String::from("(trained)"),
        Err(error) => error.to_string(),
    };

    let few = message(train_classifier(&config, &rows(19, 1), &rows(4, 2)));
    assert!(few.contains("19 training rows") && few.contains("at least 20"), "{few}");

    let mut lonely = rows(30, 1);
    lonely[0].label = String::from("plant");
    let single = message(train_classifier(&config, &lonely, &rows(4, 2)));
    assert!(single.contains("\"plant\"") && single.contains("single training example"), "{single}");

    // A label only the newest rows have (validation comes after train in
    // time) is left out of picking the epoch; with nothing else, it stops.
    let mut newest = rows(4, 2);
    newest[0].label = String::from("brand-new");
    assert_eq!(message(train_classifier(&config, &rows(30, 1), &newest)), "(trained)");
    let all_new: Vec<_> = newest
        .iter()
        .cloned()
        .map(|mut row| {
            row.label = String::from("brand-new");
            row
        })
        .collect();
    let unseen = message(train_classifier(&config, &rows(30, 1), &all_new));
    assert!(unseen.contains("no validation row has a label the training rows have"), "{unseen}");

    let unsupported_dir = tmp.path().join("gpt");
    write_tiny_bert_dir(&unsupported_dir, &vocab(), 4)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unsupported_dir.join("config.json"))?)?;
    json["model_type"] = "gpt2".into();
    json["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(unsupported_dir.join("config.json"), json.to_string())?;
    let mut gpt = config.clone();
    gpt.base_model = unsupported_dir.clone();
    let unsupported = message(train_classifier(&gpt, &rows(30, 1), &rows(4, 2)));
    assert!(unsupported.contains("unsupported architecture") && unsupported.contains("gpt2"), "{unsupported}");

    std::fs::remove_file(unsupported_dir.join("tokenizer.json"))?;
    let missing = message(train_classifier(&gpt, &rows(30, 1), &rows(4, 2)));
    assert!(missing.contains("has no tokenizer.json"), "{missing}");
    Ok(())
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving_and_keeps_its_best_epoch() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_bert_dir(&base, &vocab(), 1)?;
    let out = tmp.path().join("out");
    let mut config = config(&base, &out);
    config.epochs = 12;
    config.patience = 1;
    // Labels drawn at random: nothing to learn, so validation stops improving.
    let shuffle = |rows: Vec<LabeledText>, seed: u64| -> Vec<LabeledText> {
        let mut state = seed;
        rows.into_iter()
            .map(|row| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let label = if (state >> 40).is_multiple_of(2) { "animal" } else { "colour" };
                LabeledText { text: row.text, label: label.to_string() }
            })
            .collect()
    };
    let report = train_classifier(&config, &shuffle(rows(48, 3), 5), &shuffle(rows(24, 4), 6))?;
    assert!(report.stopped_early, "{:?}", report.epochs);
    assert!(report.epochs.len() < config.epochs, "{:?}", report.epochs);
    // Patience 1: every epoch but the last improved on the one before.
    let better = |a: &understudy_trainer::EpochMetrics, b: &understudy_trainer::EpochMetrics| {
        a.validation_accuracy > b.validation_accuracy
            || (a.validation_accuracy == b.validation_accuracy && a.validation_loss < b.validation_loss)
    };
    let n = report.epochs.len();
    for pair in report.epochs[..n - 1].windows(2) {
        assert!(better(&pair[1], &pair[0]), "{:?}", report.epochs);
    }
    assert!(!better(&report.epochs[n - 1], &report.epochs[n - 2]), "{:?}", report.epochs);
    assert_eq!(report.best_epoch, Some(n - 1));

    // The saved classifier is the best epoch's: its validation accuracy is that epoch's.
    let model = ClassifierModel::load(&out)?;
    let validation = shuffle(rows(24, 4), 6);
    let texts: Vec<String> = validation.iter().map(|row| row.text.clone()).collect();
    let predictions = model.predict(&texts)?;
    let correct = predictions.iter().zip(&validation).filter(|(p, row)| p.label == row.label).count();
    let accuracy = correct as f64 / validation.len() as f64;
    assert!((accuracy - report.best_validation_accuracy.ok_or("no best")?).abs() < 1e-9, "{accuracy}");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert_eq!(manifest["stopped_early"], true, "{manifest}");
    assert_eq!(manifest["epochs"].as_array().map(Vec::len), Some(n), "{manifest}");
    Ok(())
}
