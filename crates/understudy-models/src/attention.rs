//! Multi-head self-attention as one op with a hand-written backward pass,
//! for training on CPU.
//!
//! Composed from candle ops, attention is about twenty graph nodes a layer
//! (head split copies, rope's `narrow`/`neg`/`cat`/`mul`/`add`, the
//! grouped-query expansion copies, scale, mask, softmax, head merge), each
//! keeping its output alive for backprop and each paying candle's
//! zero-then-add gradient accumulation. [`attention`] is one node: it keeps
//! nothing but its inputs (the backward recomputes the probabilities, as
//! flash attention does) and runs the two batched matmuls each way through
//! candle.
//!
//! Layouts: `q` is `[batch, seq, heads * head_dim]`, `k` and `v` are
//! `[batch, seq, kv_heads * head_dim]` (what the projections produce), and
//! the output is `[batch, seq, heads * head_dim]` (what the output
//! projection takes). Query head `h` uses key/value head `h / (heads /
//! kv_heads)`, as HF's `repeat_kv` does; the `heads / kv_heads` query heads
//! of one group are stacked as one `[group * seq, head_dim]` matrix, so the
//! keys and values are never copied per query head.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::with_f32;

/// Rotary-embedding tables in HF's "rotate half" form: `cos` and `sin`
/// `[max_len, head_dim / 2]` (HF repeats them over both halves).
#[derive(Debug)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_len: usize,
}

impl RopeTables {
    pub fn new(head_dim: usize, theta: f64, max_len: usize) -> RopeTables {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for i in 0..half {
                let freq = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                let angle = pos as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTables { cos, sin, half, max_len }
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `cos` and `sin` `[max_len, head_dim]` as tensors (both halves), for
    /// the composed form.
    pub fn full_tables(&self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let full = |table: &[f32]| -> Vec<f32> {
            table.chunks_exact(self.half.max(1)).flat_map(|row| row.iter().chain(row.iter()).copied()).collect()
        };
        let dims = (self.max_len, 2 * self.half);
        Ok((Tensor::from_vec(full(&self.cos), dims, device)?, Tensor::from_vec(full(&self.sin), dims, device)?))
    }

    /// Rotates one head vector at `pos` in place; `inverse` applies the
    /// transpose (rotation by minus the angle), which is rope's backward.
    fn rotate(&self, x: &mut [f32], pos: usize, inverse: bool) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let (first, second) = x.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (first[i], second[i]);
            let s = if inverse { -sin[i] } else { sin[i] };
            first[i] = x1 * cos[i] - x2 * s;
            second[i] = x2 * cos[i] + x1 * s;
        }
    }
}

/// What an attention call does besides the plain scaled dot product.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Rotary embeddings on queries and keys (positions from 0).
    pub rope: Option<Arc<RopeTables>>,
    /// Position `i` sees positions `<= i` only.
    pub causal: bool,
    /// Added to every score of key `j` in batch row `b`: `[batch * seq]`
    /// (0 for tokens, a large negative number for padding).
    pub key_bias: Option<Arc<Vec<f32>>>,
}

struct Attention {
    spec: AttentionSpec,
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else { candle_core::bail!("attention: {what} must be f32") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("attention: {what} must be contiguous")
    };
    Ok(&values[start..end])
}

impl Attention {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let spec = &self.spec;
        let (batch, seq, q_width) = q.dims3()?;
        if spec.num_kv_heads == 0 || spec.num_heads % spec.num_kv_heads != 0 {
            candle_core::bail!("attention: {} heads over {} key/value heads", spec.num_heads, spec.num_kv_heads);
        }
        if q_width != spec.num_heads * spec.head_dim {
            candle_core::bail!("attention: q is {q:?}, expected {} x {}", spec.num_heads, spec.head_dim);
        }
        let kv_shape = Shape::from((batch, seq, spec.num_kv_heads * spec.head_dim));
        if k != &kv_shape || v != &kv_shape {
            candle_core::bail!("attention: k {k:?} and v {v:?} must both be {kv_shape:?}");
        }
        if let Some(rope) = &spec.rope {
            if seq > rope.max_len || 2 * rope.half != spec.head_dim {
                candle_core::bail!("attention: rope tables do not cover {seq} positions of {}", spec.head_dim);
            }
        }
        if let Some(bias) = &spec.key_bias {
            if bias.len() != batch * seq {
                candle_core::bail!("attention: a key bias of {} for {batch} x {seq} keys", bias.len());
            }
        }
        Ok(Dims { batch, seq, heads: spec.num_heads, kv_heads: spec.num_kv_heads, head_dim: spec.head_dim })
    }

    /// `[batch, seq, heads * d]` to `[batch, heads, seq, d]`, rotated.
    fn split_heads(&self, src: &[f32], d: Dims, heads: usize, rotate: bool) -> Vec<f32> {
        let hd = d.head_dim;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(d.seq * hd).enumerate().for_each(|(block, out)| {
            let (b, h) = (block / heads, block % heads);
            for (t, row) in out.chunks_exact_mut(hd).enumerate() {
                let from = ((b * d.seq + t) * heads + h) * hd;
                row.copy_from_slice(&src[from..from + hd]);
                if rotate {
                    if let Some(rope) = &self.spec.rope {
                        rope.rotate(row, t, false);
                    }
                }
            }
        });
        out
    }

    /// `[batch, heads, seq, d]` back to `[batch, seq, heads * d]`, with the
    /// inverse rotation (the backward of [`Attention::split_heads`]).
    fn merge_heads(&self, src: &[f32], d: Dims, heads: usize, unrotate: bool) -> Vec<f32> {
        let hd = d.head_dim;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(d.seq * heads * hd).enumerate().for_each(|(b, out)| {
            for (t, position) in out.chunks_exact_mut(heads * hd).enumerate() {
                for (h, row) in position.chunks_exact_mut(hd).enumerate() {
                    let from = ((b * heads + h) * d.seq + t) * hd;
                    row.copy_from_slice(&src[from..from + hd]);
                    if unrotate {
                        if let Some(rope) = &self.spec.rope {
                            rope.rotate(row, t, true);
                        }
                    }
                }
            }
        });
        out
    }

    /// Scaled, masked softmax of `scores` `[batch, kv_heads, group * seq,
    /// seq]`, row by row.
    fn probabilities(&self, scores: &[f32], d: Dims) -> Vec<f32> {
        let seq = d.seq;
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let rows_per_batch = d.kv_heads * d.group() * seq;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(seq * seq).zip(scores.par_chunks(seq * seq)).enumerate().for_each(|(block, (out, s))| {
            let b = block * seq / rows_per_batch;
            let bias = self.spec.key_bias.as_ref().map(|bias| &bias[b * seq..(b + 1) * seq]);
            for (t, (out, s)) in out.chunks_exact_mut(seq).zip(s.chunks_exact(seq)).enumerate() {
                let visible = if self.spec.causal { t + 1 } else { seq };
                let mut max = f32::NEG_INFINITY;
                for j in 0..visible {
                    let x = s[j] * scale + bias.map_or(0.0, |bias| bias[j]);
                    out[j] = x;
                    max = max.max(x);
                }
                let mut sum = 0f32;
                for o in &mut out[..visible] {
                    *o = (*o - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                out[..visible].iter_mut().for_each(|o| *o *= inv);
            }
        });
        out
    }

    /// The rotated heads and the probabilities of one call (forward, and
    /// recomputed by the backward).
    fn heads_and_probs(&self, q: &[f32], k: &[f32], v: &[f32], d: Dims) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let device = candle_core::Device::Cpu;
        let rows = d.group() * d.seq;
        let qh =
            Tensor::from_vec(self.split_heads(q, d, d.heads, true), (d.batch, d.kv_heads, rows, d.head_dim), &device)?;
        let kh = Tensor::from_vec(
            self.split_heads(k, d, d.kv_heads, true),
            (d.batch, d.kv_heads, d.seq, d.head_dim),
            &device,
        )?;
        let vh = Tensor::from_vec(
            self.split_heads(v, d, d.kv_heads, false),
            (d.batch, d.kv_heads, d.seq, d.head_dim),
            &device,
        )?;
        let scores = qh.matmul(&kh.t()?)?;
        let probs = with_f32(&scores, "scores", |scores| self.probabilities(scores, d))?;
        let probs = Tensor::from_vec(probs, scores.shape(), &device)?;
        Ok((qh, kh, vh, probs))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let (q, k, v) = (cpu_f32(s1, l1, "q")?, cpu_f32(s2, l2, "k")?, cpu_f32(s3, l3, "v")?);
        let (_, _, vh, probs) = self.heads_and_probs(q, k, v, d)?;
        let context = probs.matmul(&vh)?;
        let out = with_f32(&context, "context", |context| self.merge_heads(context, d, d.heads, false))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape(), v.shape())?;
        let device = candle_core::Device::Cpu;
        let (qh, kh, vh, probs) =
            with_f32(q, "q", |q| with_f32(k, "k", |k| with_f32(v, "v", |v| self.heads_and_probs(q, k, v, d))))????;
        let grad = grad_res.contiguous()?;
        let rows = d.group() * d.seq;
        let d_context = with_f32(&grad, "gradient", |g| self.split_heads(g, d, d.heads, false))?;
        let d_context = Tensor::from_vec(d_context, (d.batch, d.kv_heads, rows, d.head_dim), &device)?;
        // context = P V: dV = P^T dC (summing the group's query heads), dP = dC V^T.
        let dv = probs.t()?.matmul(&d_context)?;
        let d_probs = d_context.matmul(&vh.t()?)?;
        // Softmax: dS = P (dP - sum(dP P)), times the score scale.
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let d_scores = crate::ops::map_rows2(&probs, &d_probs, d.seq, "attention backward", |out, p, dp| {
            let dot: f32 = p.iter().zip(dp).map(|(p, dp)| p * dp).sum();
            for ((o, &p), &dp) in out.iter_mut().zip(p).zip(dp) {
                *o = p * (dp - dot) * scale;
            }
        })?;
        let dq = d_scores.matmul(&kh)?;
        let dk = d_scores.t()?.matmul(&qh)?;
        let merge = |t: &Tensor, heads: usize, unrotate: bool| -> Result<Tensor> {
            let shape = (d.batch, d.seq, heads * d.head_dim);
            Tensor::from_vec(with_f32(t, "gradient", |t| self.merge_heads(t, d, heads, unrotate))?, shape, &device)
        };
        Ok((
            Some(merge(&dq, d.heads, true)?),
            Some(merge(&dk, d.kv_heads, true)?),
            Some(merge(&dv, d.kv_heads, false)?),
        ))
    }
}

/// Attention over `q`, `k`, `v` (f32, layouts in the module header) as one
/// differentiable op; returns `[batch, seq, heads * head_dim]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec) -> Result<Tensor> {
    if q.dtype() != DType::F32 {
        candle_core::bail!("fused attention supports f32 only, not {:?}", q.dtype());
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { spec: spec.clone() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::{Device, Var, D};

    use super::*;

    /// The composed form, as the models wrote it before this op.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec) -> Tensor {
        let (batch, seq, _) = q.dims3().unwrap();
        let hd = spec.head_dim;
        let split = |t: &Tensor, heads: usize| {
            t.reshape((batch, seq, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let rope = |t: Tensor| -> Tensor {
            let Some(tables) = &spec.rope else { return t };
            let (cos, sin) = tables.full_tables(&Device::Cpu).unwrap();
            let (cos, sin) = (cos.narrow(0, 0, seq).unwrap(), sin.narrow(0, 0, seq).unwrap());
            let first = t.narrow(D::Minus1, 0, hd / 2).unwrap();
            let second = t.narrow(D::Minus1, hd / 2, hd / 2).unwrap();
            let rotated = Tensor::cat(&[&second.neg().unwrap(), &first], D::Minus1).unwrap();
            (t.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
        };
        let q = rope(split(q, spec.num_heads));
        let repeat = spec.num_heads / spec.num_kv_heads;
        let expand = |t: Tensor| {
            t.unsqueeze(2)
                .unwrap()
                .broadcast_as((batch, spec.num_kv_heads, repeat, seq, hd))
                .unwrap()
                .reshape((batch, spec.num_heads, seq, hd))
                .unwrap()
        };
        let k = expand(rope(split(k, spec.num_kv_heads)));
        let v = expand(split(v, spec.num_kv_heads));
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        if spec.causal {
            let mask: Vec<f32> =
                (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (seq, seq), &Device::Cpu).unwrap()).unwrap();
        }
        if let Some(bias) = &spec.key_bias {
            let bias = Tensor::from_vec(bias.to_vec(), (batch, 1, 1, seq), &Device::Cpu).unwrap();
            scores = scores.broadcast_add(&bias).unwrap();
        }
        let probs = crate::ops::softmax_last_dim(&scores).unwrap();
        probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((batch, seq, spec.num_heads * hd)).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn check(spec: AttentionSpec, batch: usize, seq: usize) {
        let device = Device::Cpu;
        let q = Var::randn(0f32, 1.0, (batch, seq, spec.num_heads * spec.head_dim), &device).unwrap();
        let k = Var::randn(0f32, 1.0, (batch, seq, spec.num_kv_heads * spec.head_dim), &device).unwrap();
        let v = Var::randn(0f32, 1.0, (batch, seq, spec.num_kv_heads * spec.head_dim), &device).unwrap();
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &spec).unwrap();
        let plain = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &spec);
        assert!(max_diff(&fused, &plain) < 1e-4, "values differ by {}", max_diff(&fused, &plain));
        let weights = Tensor::randn(0f32, 1.0, fused.shape(), &device).unwrap();
        let grads_fused = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let grads_plain = (plain * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = grads_fused.get(var.as_tensor()).unwrap();
            let b = grads_plain.get(var.as_tensor()).unwrap();
            assert!(max_diff(a, b) < 1e-4, "{name} gradients differ by {}", max_diff(a, b));
            let norm = b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 1e-3, "{name} has a vanishing gradient");
        }
    }

    #[test]
    fn causal_grouped_query_attention_with_rope_matches_the_composed_form() {
        let spec = AttentionSpec {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 8,
            rope: Some(Arc::new(RopeTables::new(8, 10_000.0, 64))),
            causal: true,
            key_bias: None,
        };
        check(spec, 3, 7);
    }

    #[test]
    fn bidirectional_attention_with_a_padding_bias_matches_the_composed_form() {
        let bias: Vec<f32> = (0..2 * 5).map(|i| if i == 4 || i >= 8 { -10_000.0 } else { 0.0 }).collect();
        let spec = AttentionSpec {
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 6,
            rope: None,
            causal: false,
            key_bias: Some(Arc::new(bias)),
        };
        check(spec, 2, 5);
    }

    #[test]
    fn mismatched_shapes_are_an_error_naming_them() {
        let spec =
            AttentionSpec { num_heads: 4, num_kv_heads: 2, head_dim: 4, rope: None, causal: true, key_bias: None };
        let q = Tensor::zeros((1, 3, 16), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 3, 16), DType::F32, &Device::Cpu).unwrap();
        let error = attention(&q, &k, &k, &spec).unwrap_err().to_string();
        assert!(error.contains("must both be"), "{error}");
    }
}
