//! Training ops with a hand-written backward pass, where candle's composed
//! ones cost too much.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D};
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

/// A contiguous f32 CPU tensor's values, handed to `f` (no copy), or an
/// error naming `what`.
pub(crate) fn with_f32<R>(tensor: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        candle_core::bail!("{what} must be an f32 CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{what} must be contiguous") };
    Ok(f(&values[start..end]))
}

/// Rows per parallel chunk: enough work per task for rows of `width` values.
fn chunk_rows(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// `f(out_row, row)` over the rows of `width` values of `xs`, in parallel
/// chunks of rows; returns the output values.
fn rows1(xs: &[f32], width: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let width = width.max(1);
    let chunk = width * chunk_rows(width);
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).for_each(|(out, xs)| {
        for (out, row) in out.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
            f(out, row);
        }
    });
    out
}

/// `f(out_row, a_row, b_row)` over the rows of two slices of one length.
fn rows2(a: &[f32], b: &[f32], width: usize, f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let width = width.max(1);
    let chunk = width * chunk_rows(width);
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(chunk).zip(a.par_chunks(chunk).zip(b.par_chunks(chunk))).for_each(|(out, (a, b))| {
        for ((out, a), b) in out.chunks_exact_mut(width).zip(a.chunks_exact(width)).zip(b.chunks_exact(width)) {
            f(out, a, b);
        }
    });
    out
}

/// Maps whole rows of two same-shaped f32 tensors to a new tensor of their
/// shape, in parallel chunks of rows: `f(out_row, a_row, b_row)`.
pub(crate) fn map_rows2(
    a: &Tensor,
    b: &Tensor,
    width: usize,
    what: &str,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Result<Tensor> {
    let (a_c, b_c) = (a.contiguous()?, b.contiguous()?);
    if a_c.shape() != b_c.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?} differ", a_c.shape(), b_c.shape());
    }
    let out = with_f32(&a_c, what, |a| with_f32(&b_c, what, |b| rows2(a, b, width, f)))??;
    Tensor::from_vec(out, a_c.shape(), a_c.device())
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
        let out = rows1(values, width, |out, row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &x) in out.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            let scale = 1.0 / sum;
            out.iter_mut().for_each(|o| *o *= scale);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let width = res.dims().last().copied().unwrap_or(1);
        let dx = map_rows2(res, grad_res, width, "softmax backward", |out, y, dy| {
            let dot: f32 = y.iter().zip(dy).map(|(y, dy)| y * dy).sum();
            for ((o, &y), &dy) in out.iter_mut().zip(y).zip(dy) {
                *o = y * (dy - dot);
            }
        })?;
        Ok(Some(dx))
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
        let out = rows2(gate, up, width, |out, gate, up| {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu(g) * u;
            }
        });
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
        let grad = grad_res.contiguous()?;
        let (gate_c, up_c) = (gate.contiguous()?, up.contiguous()?);
        let (d_gate, d_up) = with_f32(&gate_c, "swiglu gate", |gs| {
            with_f32(&up_c, "swiglu up", |us| {
                with_f32(&grad, "swiglu gradient", |dys| {
                    let mut d_gate = vec![0f32; gs.len()];
                    let mut d_up = vec![0f32; gs.len()];
                    let chunk = 16_384;
                    d_gate.par_chunks_mut(chunk).zip(d_up.par_chunks_mut(chunk)).enumerate().for_each(
                        |(index, (d_gate, d_up))| {
                            let start = index * chunk;
                            let end = start + d_gate.len();
                            for (i, (dg, du)) in (start..end).zip(d_gate.iter_mut().zip(d_up.iter_mut())) {
                                let (g, u, dy) = (gs[i], us[i], dys[i]);
                                let s = 1.0 / (1.0 + (-g).exp());
                                *dg = dy * u * s * (1.0 + g * (1.0 - s));
                                *du = dy * g * s;
                            }
                        },
                    );
                    (d_gate, d_up)
                })
            })
        })???;
        let d_gate = Tensor::from_vec(d_gate, gate.shape(), gate.device())?;
        let d_up = Tensor::from_vec(d_up, up.shape(), up.device())?;
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
        let out = rows1(xs, width, |out, row| {
            let mean_sq = row.iter().map(|x| x * x).sum::<f32>() / width as f32;
            let inv = 1.0 / (mean_sq + self.eps).sqrt();
            for ((o, &x), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = x * inv * w;
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
        let weight = weight.contiguous()?;
        let width = weight.elem_count().max(1);
        let eps = self.eps;
        let dx = with_f32(&weight, "rms-norm weight", |w| {
            map_rows2(xs, grad_res, width, "rms-norm backward", |out, x, dy| {
                let n = width as f32;
                let inv = 1.0 / (x.iter().map(|x| x * x).sum::<f32>() / n + eps).sqrt();
                let mean_gx = x.iter().zip(dy).zip(w).map(|((x, dy), w)| dy * w * x).sum::<f32>() / n;
                let k = inv * inv * inv * mean_gx;
                for (((o, &x), &dy), &w) in out.iter_mut().zip(x).zip(dy).zip(w) {
                    *o = dy * w * inv - x * k;
                }
            })
        })??;
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

/// GELU (erf form), `x Φ(x)`, with a one-pass backward
/// `dx = dy (Φ(x) + x φ(x))`; candle's own backward for `gelu_erf` is a
/// dozen tensor ops.
struct GeluErf;

/// `erf` to within 1.5e-7 (Abramowitz and Stegun 7.1.26; 4.1e-7 from libm
/// in f32 arithmetic): branch-free
/// apart from the sign, several times faster than libm's `erff`.
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * (-a * a).exp()).copysign(x)
}

fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // Element-wise: any row width works; the last dimension divides the length.
        let (xs, width) = f32_rows("gelu", storage, layout)?;
        let out = rows1(xs, width, |out, xs| {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = x * normal_cdf(x);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let density = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        // Element-wise: any row width works; the last dimension divides the length.
        let width = arg.dims().last().copied().unwrap_or(1);
        let dx = map_rows2(arg, grad_res, width, "gelu backward", |out, x, dy| {
            for ((o, &x), &dy) in out.iter_mut().zip(x).zip(dy) {
                *o = dy * (normal_cdf(x) + x * density * (-0.5 * x * x).exp());
            }
        })?;
        Ok(Some(dx))
    }
}

/// GELU in its exact (erf) form, differentiable: fused for f32, candle's
/// `gelu_erf` otherwise.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F32 {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1(GeluErf)
}

/// A trainable linear layer `x W^T + b` as one op: the backward returns
/// `dx = dy W`, `dW = dy^T x` and `db` as a row sum computed in one pass
/// (candle's `broadcast_add` backward reduces over the broadcast rows with
/// a slow strided sum).
///
/// The weight is `[out, in]` (`transposed: false`, how checkpoints store
/// it and what training updates) or `[in, out]` (`true`, inference only:
/// see [`InferenceLinear`]).
struct LinearOp {
    transposed: bool,
}

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        use candle_core::backend::BackendStorage;
        if !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!("linear needs a contiguous input and weight");
        }
        let dims = l1.shape().dims();
        let k = dims.last().copied().unwrap_or(1);
        let m = l1.shape().elem_count() / k.max(1);
        let (n, weight_k) = if self.transposed {
            let (weight_k, n) = l2.shape().dims2()?;
            (n, weight_k)
        } else {
            l2.shape().dims2()?
        };
        if weight_k != k {
            candle_core::bail!("linear: input rows of {k} for a weight of shape {:?}", l2.shape());
        }
        let (bias, _) = f32_rows("linear", s3, l3)?;
        if bias.len() != n {
            candle_core::bail!("linear: a bias of {} for {n} outputs", bias.len());
        }
        let lhs = Layout::contiguous_with_offset((m, k), l1.start_offset());
        let rhs = if self.transposed { l2.clone() } else { l2.transpose(0, 1)? };
        let CpuStorage::F32(mut out) = s1.matmul(s2, (1, m, n, k), &lhs, &rhs)? else {
            candle_core::bail!("linear supports f32 only")
        };
        out.par_chunks_mut(n * chunk_rows(n)).for_each(|rows| {
            for row in rows.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        });
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.transposed {
            candle_core::bail!("linear: a weight laid out for inference has no backward pass");
        }
        let (n, k) = weight.dims2()?;
        let m = xs.elem_count() / k.max(1);
        let dy = grad_res.contiguous()?.reshape((m, n))?;
        let x = xs.detach().reshape((m, k))?;
        let dx = dy.matmul(&weight.detach())?.reshape(xs.shape())?;
        let dw = dy.t()?.matmul(&x)?;
        let db = with_f32(&dy, "linear gradient", |dy| {
            let partial: Vec<Vec<f32>> = dy
                .par_chunks(n * chunk_rows(n))
                .map(|rows| {
                    let mut sum = vec![0f32; n];
                    for row in rows.chunks_exact(n) {
                        sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                    }
                    sum
                })
                .collect();
            let mut db = vec![0f32; n];
            for part in partial {
                db.iter_mut().zip(part).for_each(|(s, v)| *s += v);
            }
            db
        })?;
        Ok((Some(dx), Some(dw), Some(Tensor::from_vec(db, bias.shape(), bias.device())?)))
    }
}

/// `xs @ weight^T + bias` over the last dimension of `xs`, differentiable
/// in all three: fused for f32, composed otherwise.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F32 {
        return xs.broadcast_matmul(&weight.t()?)?.broadcast_add(bias);
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp { transposed: false })
}

/// A linear layer's weight laid out for inference: `[in, out]`, contiguous.
///
/// Why: gemm packs a transposed right-hand side into its own layout on every
/// call, so `x W^T` with the checkpoint's `[out, in]` weight copies the whole
/// weight per product. For the few rows of a short prompt that copy is most
/// of the work: a `[30, 1536] x [1536, 384]` product took 2.4 ms that way and
/// 0.7 ms from `[in, out]` (2 threads). Training keeps `[out, in]`, which
/// its backward pass reads; a layer converted here has no backward pass.
#[derive(Debug, Clone)]
pub struct InferenceLinear {
    weight_t: Tensor,
    bias: Tensor,
}

impl InferenceLinear {
    /// From the checkpoint's `[out, in]` weight and its bias.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<InferenceLinear> {
        Ok(InferenceLinear { weight_t: weight.detach().t()?.contiguous()?, bias: bias.detach().contiguous()? })
    }

    /// `xs W^T + b` over the last dimension of `xs`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.dtype() != DType::F32 {
            return xs.broadcast_matmul(&self.weight_t)?.broadcast_add(&self.bias);
        }
        xs.contiguous()?.apply_op3(&self.weight_t, &self.bias, LinearOp { transposed: true })
    }
}

/// Layer norm over the last dimension with a trainable weight and bias:
/// `y = (x - mean) / sqrt(var + eps) * w + b`, one node instead of nine
/// (the composed form keeps the centred input, the variance and three more
/// temporaries a call). Backward, with `xh` the normalized input and `r`
/// the inverse deviation: `dx = r (g - mean(g) - xh mean(g xh))` for
/// `g = dy w`, `dw = sum(dy xh)`, `db = sum(dy)` over rows.
struct LayerNormOp {
    eps: f32,
}

/// Per row: mean and inverse standard deviation.
fn row_moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let (xs, width) = f32_rows("layer-norm", s1, l1)?;
        let (weight, _) = f32_rows("layer-norm", s2, l2)?;
        let (bias, _) = f32_rows("layer-norm", s3, l3)?;
        if weight.len() != width || bias.len() != width {
            candle_core::bail!("layer-norm: weight {} and bias {} for rows of {width}", weight.len(), bias.len());
        }
        let out = rows1(xs, width, |out, row| {
            let (mean, inv) = row_moments(row, self.eps);
            for (((o, &x), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (x - mean) * inv * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs_c, weight_c) = (xs.contiguous()?, weight.contiguous()?);
        let width = weight_c.elem_count().max(1);
        let eps = self.eps;
        let (dx, dw, db) = with_f32(&xs_c, "layer-norm input", |xs| {
            with_f32(&weight_c, "layer-norm weight", |w| {
                with_f32(&grad, "layer-norm gradient", |dys| {
                    let mut dx = vec![0f32; xs.len()];
                    let chunk = width * chunk_rows(width);
                    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(chunk)
                        .zip(xs.par_chunks(chunk).zip(dys.par_chunks(chunk)))
                        .map(|(dx, (xs, dys))| {
                            let mut dw = vec![0f32; width];
                            let mut db = vec![0f32; width];
                            let n = width as f32;
                            for ((dx, x), dy) in
                                dx.chunks_exact_mut(width).zip(xs.chunks_exact(width)).zip(dys.chunks_exact(width))
                            {
                                let (mean, inv) = row_moments(x, eps);
                                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                                for i in 0..width {
                                    let xh = (x[i] - mean) * inv;
                                    let g = dy[i] * w[i];
                                    sum_g += g;
                                    sum_gx += g * xh;
                                    dw[i] += dy[i] * xh;
                                    db[i] += dy[i];
                                }
                                let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                                for i in 0..width {
                                    let xh = (x[i] - mean) * inv;
                                    dx[i] = inv * (dy[i] * w[i] - mean_g - xh * mean_gx);
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let mut dw = vec![0f32; width];
                    let mut db = vec![0f32; width];
                    for (pw, pb) in partial {
                        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
                        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
                    }
                    (dx, dw, db)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, xs.shape(), xs.device())?),
            Some(Tensor::from_vec(dw, weight.shape(), weight.device())?),
            Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
        ))
    }
}

/// Layer norm of `xs` over the last dimension with `weight` and `bias`,
/// differentiable in all three: fused for f32, composed otherwise.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if xs.dtype() != DType::F32 {
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
        return normed.broadcast_mul(weight)?.broadcast_add(bias);
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps: eps as f32 })
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
        if let Some(&target) = self.targets.iter().find(|&&target| target as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {target} is outside the vocabulary of {vocab}");
        }
        let out: Vec<f32> = values
            .par_chunks_exact(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &target)| log_sum_exp(row) - row[target as usize])
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    /// `(softmax(row) - one_hot(target)) * g` per row, in one pass; the
    /// row's log-sum-exp is the forward's loss plus the target's logit.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let (logits, losses, grad) = (arg.contiguous()?, res.contiguous()?, grad_res.contiguous()?);
        let dx = with_f32(&logits, "logits", |logits| {
            with_f32(&losses, "losses", |losses| {
                with_f32(&grad, "loss gradient", |grad| {
                    let mut out = vec![0f32; rows * vocab];
                    out.par_chunks_exact_mut(vocab).zip(logits.par_chunks_exact(vocab)).enumerate().for_each(
                        |(row, (out, x))| {
                            let target = self.targets[row] as usize;
                            let lse = losses[row] + x[target];
                            let g = grad[row];
                            for (o, &x) in out.iter_mut().zip(x) {
                                *o = (x - lse).exp() * g;
                            }
                            out[target] -= g;
                        },
                    );
                    out
                })
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, (rows, vocab), arg.device())?))
    }
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    sum.ln() + max
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
    fn gelu_matches_candles_gelu_erf_in_value_and_gradient() {
        let xs = Var::randn(0f32, 2.0, (4, 9, 37), &Device::Cpu).unwrap();
        let fused = gelu_erf(xs.as_tensor()).unwrap();
        let composed = xs.as_tensor().gelu_erf().unwrap();
        check(&[&xs], fused, composed, 1e-4);
    }

    #[test]
    fn linear_matches_matmul_plus_bias_in_value_and_gradient() {
        let xs = Var::randn(0f32, 1.0, (3, 5, 12), &Device::Cpu).unwrap();
        let weight = Var::randn(0f32, 0.5, (7, 12), &Device::Cpu).unwrap();
        let bias = Var::randn(0f32, 0.5, 7, &Device::Cpu).unwrap();
        let fused = linear(xs.as_tensor(), weight.as_tensor(), bias.as_tensor()).unwrap();
        let composed = xs
            .as_tensor()
            .broadcast_matmul(&weight.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(bias.as_tensor())
            .unwrap();
        check(&[&xs, &weight, &bias], fused, composed, 1e-4);
    }

    #[test]
    fn the_inference_layout_gives_the_trainable_layers_answer() {
        // A short prompt's rows and a batch's, with the MiniLM shapes' ratio.
        for (rows, k, n) in [(1, 24, 96), (30, 48, 12), (64, 96, 24)] {
            let xs = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let weight = Tensor::randn(0f32, 0.5, (n, k), &Device::Cpu).unwrap();
            let bias = Tensor::randn(0f32, 0.5, n, &Device::Cpu).unwrap();
            let trainable = linear(&xs, &weight, &bias).unwrap();
            let inference = InferenceLinear::new(&weight, &bias).unwrap().forward(&xs).unwrap();
            assert_eq!(inference.dims(), &[rows, n]);
            assert!(max_diff(&trainable, &inference) < 1e-4, "{rows}x{k}x{n}");
        }
        // It has no backward pass: a gradient through it fails loudly.
        let xs = Var::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
        let layer = InferenceLinear::new(
            &Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert!(layer.forward(xs.as_tensor()).unwrap().sum_all().unwrap().backward().is_err());
    }

    #[test]
    fn fast_erf_is_within_1e_6_of_libm() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let diff = (erf(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            assert!(diff < 1e-6, "erf({x}) differs by {diff}");
        }
    }

    #[test]
    fn layer_norm_matches_the_composed_one_in_value_and_gradient() {
        let xs = Var::randn(0.5f32, 2.0, (3, 5, 40), &Device::Cpu).unwrap();
        let weight = Var::randn(1f32, 0.3, 40, &Device::Cpu).unwrap();
        let bias = Var::randn(0f32, 0.3, 40, &Device::Cpu).unwrap();
        let eps = 1e-5;
        let fused = layer_norm(xs.as_tensor(), weight.as_tensor(), bias.as_tensor(), eps).unwrap();
        let x = xs.as_tensor();
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = centered
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(weight.as_tensor())
            .unwrap()
            .broadcast_add(bias.as_tensor())
            .unwrap();
        check(&[&xs, &weight, &bias], fused, composed, 1e-4);
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
