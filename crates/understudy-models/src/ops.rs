//! Training ops with a hand-written backward pass, where candle's composed
//! ones cost too much.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The rows of a contiguous f32 tensor, or an error naming `op`.
fn f32_rows<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    let CpuStorage::F32(values) = storage else { candle_core::bail!("{op} supports f32 only") };
    let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    Ok((&values[start..end], width))
}

/// Rows per parallel chunk: enough work per task for rows of `width` values.
fn chunk_rows(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// Softmax over the last dimension, with a backward pass (candle-nn's fused
/// `softmax_last_dim` has none, and the composed `softmax` keeps its
/// `exp`, `sum` and quotient alive for backprop). The backward needs only
/// the output: `dx = y * (dy - sum(dy * y))` per row.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (values, width) = f32_rows("softmax", storage, layout)?;
        let mut out = vec![0f32; values.len()];
        let rows = chunk_rows(width);
        out.par_chunks_mut(width * rows).zip(values.par_chunks(width * rows)).for_each(|(out, values)| {
            for (out, row) in out.chunks_exact_mut(width).zip(values.chunks_exact(width)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = (x - max).exp();
                    sum += *o;
                }
                let scale = 1.0 / sum;
                out.iter_mut().for_each(|o| *o *= scale);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad_res.broadcast_sub(&dot)? * res)?))
    }
}

/// Softmax over the last dimension, differentiable: fused for f32, composed
/// for other types (the gradient checks run in f64).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F32 {
        return candle_nn::ops::softmax(xs, D::Minus1);
    }
    xs.contiguous()?.apply_op1(Softmax)
}

/// `silu(gate) * up`, the gated MLP's product, in one pass and with one
/// output kept for backprop (the composed form keeps `silu(gate)` and the
/// sigmoid inside it as well).
struct SwiGlu;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", l1.shape(), l2.shape());
        }
        let (gate, width) = f32_rows("swiglu", s1, l1)?;
        let (up, _) = f32_rows("swiglu", s2, l2)?;
        let mut out = vec![0f32; gate.len()];
        let chunk = width * chunk_rows(width);
        out.par_chunks_mut(chunk).zip(gate.par_chunks(chunk).zip(up.par_chunks(chunk))).for_each(
            |(out, (gate, up))| {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dg silu(g) = s (1 + g (1 - s)) with s = sigmoid(g).
        let sigmoid = candle_nn::ops::sigmoid(gate)?;
        let silu = (gate * &sigmoid)?;
        let d_silu = (&sigmoid * ((gate * (1.0 - &sigmoid)?)? + 1.0)?)?;
        let d_gate = ((grad_res * up)? * d_silu)?;
        let d_up = (grad_res * silu)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `silu(gate) * up` for two tensors of one shape, differentiable in both
/// (fused for f32, composed otherwise).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// RMS norm over the last dimension with a frozen weight:
/// `y = x / sqrt(mean(x^2) + eps) * w`. Only `x` gets a gradient
/// (`dx = r g - x r^3 mean(g x)`, `g = dy w`, `r` the inverse RMS): LoRA
/// never trains norms, and the composed form keeps four temporaries a call.
struct RmsNormFrozen {
    eps: f32,
}

impl CustomOp2 for RmsNormFrozen {
    fn name(&self) -> &'static str {
        "rms-norm-frozen"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, width) = f32_rows("rms-norm", s1, l1)?;
        let (weight, _) = f32_rows("rms-norm", s2, l2)?;
        if weight.len() != width {
            candle_core::bail!("rms-norm: a weight of {} for rows of {width}", weight.len());
        }
        let mut out = vec![0f32; xs.len()];
        let chunk = width * chunk_rows(width);
        out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).for_each(|(out, xs)| {
            for (out, row) in out.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
                let mean_sq = row.iter().map(|x| x * x).sum::<f32>() / width as f32;
                let inv = 1.0 / (mean_sq + self.eps).sqrt();
                for ((o, &x), &w) in out.iter_mut().zip(row).zip(weight) {
                    *o = x * inv * w;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let inv = (xs.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
        let g = grad_res.broadcast_mul(weight)?;
        let mean_gx = (&g * xs)?.mean_keepdim(D::Minus1)?;
        let dx = (g.broadcast_mul(&inv)? - xs.broadcast_mul(&(inv.powf(3.0)? * mean_gx)?)?)?;
        Ok((Some(dx), None))
    }
}

/// RMS norm of `xs` (f32, normalized over the last dimension) times a
/// frozen `weight`; differentiable in `xs` only.
pub fn rms_norm_frozen(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if xs.dtype() != DType::F32 {
        let mean_sq = xs.sqr()?.mean_keepdim(D::Minus1)?;
        return xs.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(weight);
    }
    xs.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormFrozen { eps: eps as f32 })
}

/// Per-row negative log-likelihood of `targets` under `logits` (`[n, vocab]`):
/// `logsumexp(row) - row[target]`. The composed form (log-softmax, then
/// gather) keeps several `[n, vocab]` temporaries alive for backprop and
/// scatters the gradient back; this op's backward is `softmax - one_hot`,
/// computed once.
struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cross-entropy needs contiguous logits");
        };
        let CpuStorage::F32(values) = storage else { candle_core::bail!("cross-entropy supports f32 only") };
        if self.targets.len() != rows {
            candle_core::bail!("cross-entropy: {} targets for {rows} rows", self.targets.len());
        }
        let values = &values[start..end];
        let mut out = Vec::with_capacity(rows);
        for (row, &target) in values.chunks_exact(vocab).zip(&self.targets) {
            let target = target as usize;
            if target >= vocab {
                candle_core::bail!("cross-entropy: target {target} is outside the vocabulary of {vocab}");
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            out.push(sum.ln() + max - row[target]);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let probs = candle_nn::ops::softmax_last_dim(&arg.contiguous()?)?;
        let mut one_hot = vec![0f32; rows * vocab];
        for (row, &target) in self.targets.iter().enumerate() {
            one_hot[row * vocab + target as usize] = 1.0;
        }
        let one_hot = Tensor::from_vec(one_hot, (rows, vocab), arg.device())?;
        Ok(Some((probs - one_hot)?.broadcast_mul(&grad_res.unsqueeze(1)?)?))
    }
}

/// Per-row cross-entropy `[n]` of `logits` (`[n, vocab]`, f32) against `targets`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_log_softmax_and_gather_in_value_and_gradient() {
        let device = Device::Cpu;
        let logits = Var::randn(0f32, 3.0, (5, 7), &device).unwrap();
        let targets = [0u32, 6, 3, 3, 1];
        let weights = Tensor::new(&[1f32, 0.5, 2.0, 1.0, 0.25], &device).unwrap();
        let fused = cross_entropy_rows(logits.as_tensor(), &targets).unwrap();
        let composed = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&Tensor::new(&targets, &device).unwrap().unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let diff = (&fused - &composed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let grad = |loss: Tensor| loss.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
        let a = grad((fused * &weights).unwrap().sum_all().unwrap());
        let b = grad((composed * &weights).unwrap().sum_all().unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}

#[cfg(test)]
mod fused_tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Value and gradient of `fused` and `composed` agree, under a random
    /// weighting of the outputs (so that the incoming gradient is not uniform).
    fn check(vars: &[&Var], fused: Tensor, composed: Tensor, tolerance: f32) {
        assert!(max_diff(&fused, &composed) < tolerance, "values differ by {}", max_diff(&fused, &composed));
        let weights = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
        let grads_fused = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let grads_composed = (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for var in vars {
            let a = grads_fused.get(var.as_tensor()).unwrap();
            let b = grads_composed.get(var.as_tensor()).unwrap();
            assert!(max_diff(a, b) < tolerance, "gradients differ by {}", max_diff(a, b));
        }
    }

    #[test]
    fn softmax_matches_the_composed_one_in_value_and_gradient() {
        let xs = Var::randn(0f32, 3.0, (2, 3, 5, 70), &Device::Cpu).unwrap();
        let fused = softmax_last_dim(xs.as_tensor()).unwrap();
        let composed = candle_nn::ops::softmax(xs.as_tensor(), D::Minus1).unwrap();
        check(&[&xs], fused, composed, 1e-5);
    }

    #[test]
    fn swiglu_matches_silu_times_up_in_value_and_gradient() {
        let gate = Var::randn(0f32, 2.0, (3, 7, 33), &Device::Cpu).unwrap();
        let up = Var::randn(0f32, 1.0, (3, 7, 33), &Device::Cpu).unwrap();
        let fused = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let composed = (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap();
        check(&[&gate, &up], fused, composed, 1e-4);
        let error = swiglu(gate.as_tensor(), &Tensor::zeros((3, 7, 32), DType::F32, &Device::Cpu).unwrap());
        assert!(error.unwrap_err().to_string().contains("differ in shape"));
    }

    #[test]
    fn rms_norm_matches_the_composed_one_in_value_and_gradient() {
        let xs = Var::randn(0f32, 2.0, (4, 6, 48), &Device::Cpu).unwrap();
        let weight = Tensor::randn(1f32, 0.3, 48, &Device::Cpu).unwrap();
        let eps = 1e-5;
        let fused = rms_norm_frozen(xs.as_tensor(), &weight, eps).unwrap();
        let x = xs.as_tensor();
        let composed = x
            .broadcast_div(&(x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&weight)
            .unwrap();
        check(&[&xs], fused, composed, 1e-4);
    }
}
