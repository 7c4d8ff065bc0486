//! AdamW over candle `Var`s with its state in plain vectors (so that it can be
//! checkpointed), the learning-rate schedule and gradient clipping.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

/// One trainable tensor, its name (HF naming) and its moments.
pub(crate) struct Param {
    pub name: String,
    pub var: Var,
    /// Biases and layer-norm weights get no weight decay.
    pub decay: bool,
    /// This tensor's learning rate is the schedule's times this.
    pub lr_scale: f64,
    m: Vec<f32>,
    v: Vec<f32>,
}

pub(crate) struct AdamW {
    pub params: Vec<Param>,
    /// Updates done so far (bias correction uses it).
    pub step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> AdamW {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let size = var.elem_count();
                let decay = !(name.ends_with(".bias") || name.contains("LayerNorm"));
                Param { name, var, decay, lr_scale: 1.0, m: vec![0.0; size], v: vec![0.0; size] }
            })
            .collect();
        AdamW { params, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// Adds one backward pass's gradients to `sums` (one slot per parameter):
    /// the accumulation of several micro-batches into one step.
    pub fn accumulate(&self, sums: &mut [Option<Tensor>], store: &candle_core::backprop::GradStore) -> Result<()> {
        for (slot, param) in sums.iter_mut().zip(&self.params) {
            if let Some(grad) = store.get(param.var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + grad)?,
                    None => grad.clone(),
                });
            }
        }
        Ok(())
    }

    /// Clips the accumulated gradients to a global norm of `max_grad_norm`
    /// (0: no clipping) and takes one step; a parameter no pass reached gets
    /// a zero gradient.
    pub fn step_accumulated(&mut self, sums: Vec<Option<Tensor>>, max_grad_norm: f64, lr: f64) -> Result<()> {
        let mut grads: Vec<Tensor> = sums
            .into_iter()
            .zip(&self.params)
            .map(|(grad, param)| match grad {
                Some(grad) => Ok(grad),
                None => param.var.as_tensor().zeros_like(),
            })
            .collect::<Result<_>>()?;
        clip_global_norm(&mut grads, max_grad_norm)?;
        self.update(&grads, lr)
    }

    /// One update with `grads[i]` for `params[i]` at learning rate `lr`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let correction1 = 1.0 - self.beta1.powi(t);
        let correction2 = 1.0 - self.beta2.powi(t);
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let inv_sqrt_c2 = (1.0 / correction2.sqrt()) as f32;
        let eps = self.eps as f32;
        for (param, grad) in self.params.iter_mut().zip(grads) {
            let lr = lr * param.lr_scale;
            let step_size = (lr / correction1) as f32;
            let decay = if param.decay { (1.0 - lr * self.weight_decay) as f32 } else { 1.0 };
            let mut values = param.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let grad = grad.flatten_all()?.to_vec1::<f32>()?;
            for (((value, g), m), v) in values.iter_mut().zip(&grad).zip(&mut param.m).zip(&mut param.v) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *value = *value * decay - step_size * *m / ((*v).sqrt() * inv_sqrt_c2 + eps);
            }
            let shape = param.var.shape().clone();
            param.var.set(&Tensor::from_vec(values, shape, param.var.device())?)?;
        }
        Ok(())
    }

    /// The moments as tensors named `m.NAME` and `v.NAME`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for param in &self.params {
            let device = param.var.device();
            out.insert(format!("m.{}", param.name), Tensor::from_slice(&param.m, param.m.len(), device)?);
            out.insert(format!("v.{}", param.name), Tensor::from_slice(&param.v, param.v.len(), device)?);
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> std::result::Result<(), StateError> {
        for param in &mut self.params {
            for (prefix, slot) in [("m", &mut param.m), ("v", &mut param.v)] {
                let name = format!("{prefix}.{}", param.name);
                let Some(tensor) = state.get(&name) else { return Err(StateError::Missing(name)) };
                let values = match tensor.to_vec1::<f32>() {
                    Ok(values) => values,
                    Err(source) => return Err(StateError::Unreadable { name, source }),
                };
                if values.len() != slot.len() {
                    return Err(StateError::Length { name, found: values.len(), expected: slot.len() });
                }
                *slot = values;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Why a saved optimizer state does not fit the optimizer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("the optimizer state has no {0}")]
    Missing(String),
    #[error("{name}: {source}")]
    Unreadable { name: String, source: candle_core::Error },
    #[error("{name} has {found} values, expected {expected}")]
    Length { name: String, found: usize, expected: usize },
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0
/// at `total` steps. `step` counts from 0.
pub(crate) fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns
/// the norm before clipping.
pub(crate) fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for grad in grads.iter() {
        sum_sq += grad.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sum_sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for grad in grads.iter_mut() {
            *grad = (&*grad * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((learning_rate(1.0, 0, 10, 100) - 0.1).abs() < 1e-9);
        assert!((learning_rate(1.0, 9, 10, 100) - 1.0).abs() < 1e-9);
        assert!(learning_rate(1.0, 55, 10, 100) < 0.6);
        assert!(learning_rate(1.0, 100, 10, 100).abs() < 1e-9);
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let mut grads = vec![Tensor::new(&[3f32, 0.0], &device)?, Tensor::new(&[4f32], &device)?];
        let norm = clip_global_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-5);
        assert!((clip_global_norm(&mut grads, 10.0)? - 1.0).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let var = Var::new(&[1f32, -1.0], &device)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], 0.0);
        opt.update(&[Tensor::new(&[0.5f32, -2.0], &device)?], 0.1)?;
        let values = var.as_tensor().to_vec1::<f32>()?;
        assert!((values[0] - 0.9).abs() < 1e-4 && (values[1] + 0.9).abs() < 1e-4, "{values:?}");
        Ok(())
    }
}
