#![allow(clippy::unwrap_used)]

//! Gradient tests on a tiny random BERT: every trainable tensor gets a
//! gradient, autograd agrees with finite differences, and frozen layers get
//! none. These fail if the model uses an op without a backward pass (candle-nn's
//! fused layer_norm or softmax_last_dim would cut the graph silently).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use understudy_models::bert;

use crate::classifier::{Net, Trainable};
use crate::data::{self, Batch, Encoded};
use crate::testing::{random_bert_weights, tiny_config_json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn tiny_config() -> bert::Config {
    let mut cfg: bert::Config = serde_json::from_value(tiny_config_json(40)).unwrap();
    // Dropout is off here so that the loss is a deterministic function.
    cfg.hidden_dropout_prob = 0.0;
    cfg.attention_probs_dropout_prob = 0.0;
    cfg
}

/// Rows of different lengths, so the padding mask matters.
fn batch() -> (Batch, Tensor) {
    let rows = [vec![2u32, 5, 9, 17, 3], vec![2, 30, 3], vec![2, 11, 12, 13, 14, 15, 3]];
    let encoded: Vec<Encoded> =
        rows.iter().map(|ids| Encoded { ids: ids.clone(), type_ids: vec![0; ids.len()] }).collect();
    let refs: Vec<&Encoded> = encoded.iter().collect();
    let batch = data::make_batch(&refs, 0, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    (batch, targets)
}

fn loss(net: &Net, batch: &Batch, targets: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(&net.logits(batch, None)?, targets)
}

/// The network, its trainable vars, and all the weights it was built from.
type Built = (Net, Vec<(String, Var)>, HashMap<String, Tensor>);

fn build(dtype: DType, trainable: Trainable) -> Result<Built, Box<dyn std::error::Error>> {
    let cfg = tiny_config();
    let weights = random_bert_weights(&cfg, 3, dtype, 5)?;
    let (net, vars) = Net::build(&cfg, weights.clone(), trainable, 0.0)?;
    Ok((net, vars, weights))
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() -> TestResult {
    let (net, vars, _) = build(DType::F32, Trainable::new(2, None, true))?;
    // 5 embedding tensors, 16 per layer, 2 head tensors.
    assert_eq!(vars.len(), 5 + 2 * 16 + 2);
    let (batch, targets) = batch();
    let grads = loss(&net, &batch, &targets)?.backward()?;
    for (name, var) in &vars {
        let grad = grads.get(var.as_tensor()).ok_or_else(|| format!("{name} got no gradient"))?;
        let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        // The key bias adds q·b to every score of a query alike, which softmax
        // cancels: its true gradient is zero, so only its presence is checked.
        if !name.ends_with("attention.self.key.bias") {
            assert!(norm > 1e-8, "{name} has a zero gradient");
        }
        assert!(norm.is_finite(), "{name} has a non-finite gradient");
    }
    Ok(())
}

#[test]
fn autograd_agrees_with_finite_differences() -> TestResult {
    let (net, vars, _) = build(DType::F64, Trainable::new(2, None, true))?;
    let (batch, targets) = batch();
    let grads = loss(&net, &batch, &targets)?.backward()?;
    let probes = [
        ("embeddings.word_embeddings.weight", 9 * 32 + 3),
        ("embeddings.LayerNorm.weight", 4),
        ("encoder.layer.0.attention.self.query.weight", 37),
        ("encoder.layer.0.attention.self.value.bias", 2),
        ("encoder.layer.0.intermediate.dense.weight", 101),
        ("encoder.layer.1.attention.output.LayerNorm.bias", 7),
        ("encoder.layer.1.output.dense.weight", 55),
        ("classifier.weight", 40),
    ];
    let eps = 1e-5;
    for (name, index) in probes {
        let (_, var) = vars.iter().find(|(n, _)| n == name).ok_or_else(|| format!("no var {name}"))?;
        let analytic = grads.get(var.as_tensor()).ok_or("no gradient")?.flatten_all()?.to_vec1::<f64>()?[index];
        let original = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let at = |delta: f64| -> candle_core::Result<f64> {
            let mut values = original.clone();
            values[index] += delta;
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
            loss(&net, &batch, &targets)?.to_scalar::<f64>()
        };
        let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
        var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu)?)?;
        assert!(analytic.abs() > 1e-7, "{name}[{index}]: gradient {analytic} is too small to compare");
        let tolerance = 1e-6 + 1e-4 * analytic.abs();
        assert!(
            (numeric - analytic).abs() < tolerance,
            "{name}[{index}]: autograd {analytic}, finite difference {numeric}"
        );
    }
    Ok(())
}

#[test]
fn frozen_layers_are_not_in_the_graph() -> TestResult {
    let (net, vars, weights) = build(DType::F32, Trainable::new(2, Some(1), false))?;
    let mut names: Vec<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
    names.retain(|name| !name.starts_with("encoder.layer.1.") && !name.starts_with("classifier."));
    assert!(names.is_empty(), "frozen tensors became trainable: {names:?}");
    let (batch, targets) = batch();
    let grads = loss(&net, &batch, &targets)?.backward()?;
    for (name, tensor) in &weights {
        if name.starts_with("embeddings.") || name.starts_with("encoder.layer.0.") {
            assert!(grads.get(tensor).is_none(), "a gradient was computed for frozen {name}");
        }
    }
    for (name, var) in &vars {
        assert!(grads.get(var.as_tensor()).is_some(), "{name} got no gradient");
    }
    Ok(())
}
