//! Training ops with a hand-written backward pass, where candle's composed
//! ones cost too much.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

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
    use candle_core::{Device, Var, D};

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
