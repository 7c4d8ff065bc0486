//! Llama and Qwen2 causal LMs (HF `LlamaForCausalLM`, `Qwen2ForCausalLM`)
//! with LoRA, for training on CPU.
//!
//! Every op on the path from a LoRA weight to the loss has a backward pass:
//! RMS norm (frozen weight) and the gated MLP's `silu(gate) * up` are fused
//! ops (`crate::ops`), attention (rope, grouped-query heads, causal softmax)
//! is one op (`crate::attention`), and a LoRA layer is one op, each with a
//! hand-written backward checked against its composed form. The frozen
//! projections are [`FrozenLinear`], a custom op whose backward returns only
//! the input's gradient: candle would otherwise compute (and throw away) a
//! gradient for every frozen weight. Cached decoding (inference) keeps the
//! composed attention with rotate-half rope written with `narrow`, `neg`
//! and `cat`.
//!
//! Weights load by their HF names (`model.layers.0.self_attn.q_proj.weight`,
//! ...). LoRA weights carry PEFT's names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::attention::{AttentionSpec, RopeTables};
use crate::dropout::Dropout;

/// Which HF architecture a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Qwen2,
}

/// The subset of HF `config.json` a Llama/Qwen2 decoder needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's `attention_bias`; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}

impl Config {
    /// The architecture named by `architectures` (or `model_type`), or an
    /// error that names what was found.
    pub fn architecture(&self) -> std::result::Result<Architecture, ConfigError> {
        let names: Vec<&str> = self.architectures.iter().flatten().map(String::as_str).collect();
        for name in &names {
            match *name {
                "LlamaForCausalLM" => return Ok(Architecture::Llama),
                "Qwen2ForCausalLM" => return Ok(Architecture::Qwen2),
                _ => {}
            }
        }
        match (names.first(), self.model_type.as_deref()) {
            (None, Some("llama")) => Ok(Architecture::Llama),
            (None, Some("qwen2")) => Ok(Architecture::Qwen2),
            (first, model_type) => Err(ConfigError::UnsupportedArchitecture {
                architecture: first.map_or_else(|| String::from("(none)"), |name| format!("{name:?}")),
                model_type: model_type.map(str::to_string),
            }),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || matches!(self.architecture(), Ok(Architecture::Qwen2))
    }

    /// Checks the shapes fit together.
    pub fn check_supported(&self) -> std::result::Result<Architecture, ConfigError> {
        let arch = self.architecture()?;
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) || !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::HeadSplit { hidden_size: self.hidden_size, heads });
        }
        if self.num_kv_heads() == 0 || !heads.is_multiple_of(self.num_kv_heads()) {
            return Err(ConfigError::KvHeads { heads });
        }
        Ok(arch)
    }
}

/// Why a [`Config`] describes a model this file cannot build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "architecture {architecture} (model_type {model_type:?}) is not supported: LoRA training supports \
         LlamaForCausalLM and Qwen2ForCausalLM"
    )]
    UnsupportedArchitecture { architecture: String, model_type: Option<String> },
    #[error("hidden_size {hidden_size} does not split into {heads} heads of even size")]
    HeadSplit { hidden_size: usize, heads: usize },
    #[error("num_attention_heads {heads} is not a multiple of num_key_value_heads")]
    KvHeads { heads: usize },
}

/// Why a [`LoraConfig`] is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraConfigError {
    #[error("the LoRA rank must be at least 1")]
    ZeroRank,
    #[error("LoRA dropout must be in [0, 1), got {0}")]
    Dropout(f64),
    #[error("LoRA needs at least one target module")]
    NoTargetModules,
    #[error("unknown LoRA target module {0:?}; known: {known}", known = TARGET_MODULES.join(", "))]
    UnknownTargetModule(String),
}

/// The projections LoRA can adapt, by their HF names.
pub const TARGET_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// LoRA hyper-parameters (PEFT's names in `adapter_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// A subset of [`TARGET_MODULES`].
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Rank 8, alpha 16, dropout 0.05 on q_proj and v_proj (PEFT's usual choice).
    pub fn new() -> LoraConfig {
        LoraConfig { rank: 8, alpha: 16.0, dropout: 0.05, target_modules: vec!["q_proj".into(), "v_proj".into()] }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    pub fn check(&self) -> std::result::Result<(), LoraConfigError> {
        if self.rank == 0 {
            return Err(LoraConfigError::ZeroRank);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraConfigError::Dropout(self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err(LoraConfigError::NoTargetModules);
        }
        if let Some(bad) = self.target_modules.iter().find(|name| !TARGET_MODULES.contains(&name.as_str())) {
            return Err(LoraConfigError::UnknownTargetModule(bad.clone()));
        }
        Ok(())
    }
}

impl Default for LoraConfig {
    fn default() -> LoraConfig {
        LoraConfig::new()
    }
}

/// `x @ weight^T` for a weight that never trains. Its backward returns the
/// input's gradient only, so backprop skips the `[out, in]` weight gradient
/// that a plain matmul would compute for nothing.
struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if !layout.is_contiguous() {
            candle_core::bail!("frozen-matmul needs a contiguous input");
        }
        let dims = layout.shape().dims();
        let k = dims.last().copied().unwrap_or(1);
        let m = layout.shape().elem_count() / k.max(1);
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else { candle_core::bail!("frozen-matmul runs on the CPU only") };
        let (n, weight_k) = weight_layout.shape().dims2()?;
        if weight_k != k {
            candle_core::bail!("frozen-matmul: input rows of {k} for a weight of shape {:?}", weight_layout.shape());
        }
        // The input's storage and the transposed weight go to the backend's
        // gemm directly: no copy of either.
        let lhs = Layout::contiguous_with_offset((m, k), layout.start_offset());
        let output = storage.matmul(weight, (1, m, n, k), &lhs, &weight_layout.transpose(0, 1)?)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((output, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(matmul_2d(grad_res, &self.weight)?))
    }
}

/// `xs @ rhs` for `xs` of shape `[..., k]` and `rhs` of shape `[k, n]`, as one
/// 2-D matmul over the flattened leading dimensions (a broadcast batched
/// matmul runs one small gemm per leading index).
fn matmul_2d(xs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let dims = xs.dims();
    let k = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(rhs.dim(1)?);
    xs.reshape((rows, k))?.matmul(rhs)?.reshape(out_dims)
}

/// A linear layer whose weight (and bias) never train.
#[derive(Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl std::fmt::Debug for FrozenLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenLinear").field("weight", self.weight.shape()).finish()
    }
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> FrozenLinear {
        FrozenLinear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `xs @ weight^T + bias` for `xs` of shape `[..., in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let out = xs.apply_op1(FrozenMatmul { weight: self.weight.clone() })?;
        match &self.bias {
            Some(bias) => out.broadcast_add(bias),
            None => Ok(out),
        }
    }

    /// The same product with a plain matmul (backprop then also computes the
    /// weight's gradient); kept to test [`FrozenLinear::forward`] against.
    pub fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let out = xs.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(bias) => out.broadcast_add(bias),
            None => Ok(out),
        }
    }
}

/// A LoRA layer as one op: `x W^T + b + scale * (m x) A^T B^T` over `x`,
/// `A` and `B`, with `m` the dropout multiplier of the LoRA branch (if
/// any). The backward returns the gradients of `x`, `A` and `B` and skips
/// the frozen `W`'s; the rank-sized product `(m x) A^T` is recomputed
/// rather than kept.
struct LoraMatmul {
    base: FrozenLinear,
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
}

impl LoraMatmul {
    /// `m x` as `[rows, in]`.
    fn dropped(&self, xs: &Tensor) -> Result<Tensor> {
        let in_dim = xs.dims().last().copied().unwrap_or(1);
        let rows = xs.elem_count() / in_dim.max(1);
        let xs = xs.reshape((rows, in_dim))?;
        match &self.mask {
            Some(mask) => xs.mul(&Tensor::from_slice(mask.as_slice(), (rows, in_dim), xs.device())?),
            None => Ok(xs),
        }
    }
}

impl candle_core::CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
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
        let (base, shape) = FrozenMatmul { weight: self.base.weight.clone() }.cpu_fwd(s1, l1)?;
        let CpuStorage::F32(mut out) = base else { candle_core::bail!("lora-matmul supports f32 only") };
        let tensor = |storage: &CpuStorage, layout: &Layout| -> Result<Tensor> {
            let CpuStorage::F32(values) = storage else { candle_core::bail!("lora-matmul supports f32 only") };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("lora-matmul needs contiguous inputs")
            };
            Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)
        };
        let (xs, a, b) = (tensor(s1, l1)?, tensor(s2, l2)?, tensor(s3, l3)?);
        let low = self.dropped(&xs)?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let out_dim = shape.dims().last().copied().unwrap_or(1);
        let bias = match &self.base.bias {
            Some(bias) => Some(bias.to_vec1::<f32>()?),
            None => None,
        };
        crate::ops::with_f32(&low, "LoRA update", |low| {
            out.par_chunks_mut(out_dim).zip(low.par_chunks(out_dim)).for_each(|(out, low)| {
                for (i, (o, l)) in out.iter_mut().zip(low).enumerate() {
                    *o += self.scale * l + bias.as_ref().map_or(0.0, |bias| bias[i]);
                }
            });
        })?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, a, b) = (xs.detach(), a.detach(), b.detach());
        let out_dim = grad_res.dims().last().copied().unwrap_or(1);
        let rows = grad_res.elem_count() / out_dim.max(1);
        let dy = grad_res.contiguous()?.reshape((rows, out_dim))?;
        let dropped = self.dropped(&xs)?;
        let h = dropped.matmul(&a.t()?)?;
        let dh = (dy.matmul(&b)? * self.scale as f64)?;
        let db = (dy.t()?.matmul(&h)? * self.scale as f64)?;
        let da = dh.t()?.matmul(&dropped)?;
        let mut d_low = dh.matmul(&a)?;
        if let Some(mask) = &self.mask {
            d_low = d_low.mul(&Tensor::from_slice(mask.as_slice(), d_low.shape(), d_low.device())?)?;
        }
        let dx = (dy.matmul(&self.base.weight)? + d_low)?.reshape(xs.shape())?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// A frozen linear layer with an optional trainable low-rank update:
/// `y = x W^T + b + scale * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: FrozenLinear,
    lora: Option<LoraWeights>,
}

#[derive(Debug, Clone)]
struct LoraWeights {
    /// `[rank, in]`
    a: Var,
    /// `[out, rank]`
    b: Var,
    scale: f64,
    dropout: f64,
}

impl LoraLinear {
    pub fn frozen(base: FrozenLinear) -> LoraLinear {
        LoraLinear { base, lora: None }
    }

    /// Adds LoRA weights: A uniform in ±1/sqrt(in) (PEFT's Kaiming-uniform
    /// bound), B zero, so the adapted layer starts equal to the base one.
    pub fn with_lora(base: FrozenLinear, config: &LoraConfig, rng: &mut StdRng) -> Result<LoraLinear> {
        let (out_dim, in_dim) = base.weight().dims2()?;
        let device = base.weight().device().clone();
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..config.rank * in_dim).map(|_| rng.gen_range(-bound..bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, in_dim), &device)?)?;
        let b = Var::zeros((out_dim, config.rank), DType::F32, &device)?;
        Ok(LoraLinear { base, lora: Some(LoraWeights { a, b, scale: config.scale(), dropout: config.dropout }) })
    }

    /// The LoRA A and B variables, if this layer has them.
    pub fn lora_vars(&self) -> Option<(&Var, &Var)> {
        self.lora.as_ref().map(|lora| (&lora.a, &lora.b))
    }

    pub fn forward(&self, xs: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let Some(lora) = &self.lora else { return self.base.forward(xs) };
        if xs.dtype() == DType::F32 {
            let mask = dropout.and_then(|dropout| dropout.mask(xs.elem_count(), lora.dropout)).map(Arc::new);
            let op = LoraMatmul { base: self.base.clone(), scale: lora.scale as f32, mask };
            return xs.contiguous()?.apply_op3(lora.a.as_tensor(), lora.b.as_tensor(), op);
        }
        self.forward_composed(xs, dropout)
    }

    /// The same layer composed from candle ops (for other dtypes, and to
    /// test [`LoraLinear::forward`] against).
    pub fn forward_composed(&self, xs: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let out = self.base.forward(xs)?;
        let Some(lora) = &self.lora else { return Ok(out) };
        let xs = match dropout {
            Some(dropout) => dropout.apply(xs, lora.dropout)?,
            None => xs.clone(),
        };
        let low = matmul_2d(&matmul_2d(&xs.contiguous()?, &lora.a.as_tensor().t()?)?, &lora.b.as_tensor().t()?)?;
        out + (low * lora.scale)?
    }
}

/// RMS norm over the last dimension, composed from ops with a backward pass.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: vb.get(size, "weight")?, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm_frozen(xs, &self.weight, self.eps)
    }
}

/// `cos` and `sin` tables `[max_len, head_dim]` in HF's rotate-half layout
/// (the composed form, for cached decoding), and the same tables for the
/// fused attention op.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    tables: Arc<RopeTables>,
}

impl Rope {
    fn new(head_dim: usize, theta: f64, max_len: usize, device: &Device) -> Result<Rope> {
        let tables = Arc::new(RopeTables::new(head_dim, theta, max_len));
        let (cos, sin) = tables.full_tables(device)?;
        Ok(Rope { cos, sin, tables })
    }

    /// Rotates `xs` (`[batch, heads, seq, head_dim]`) by position, the first
    /// row being at position `offset`.
    fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq_len, head_dim) = xs.dims4()?;
        let cos = self.cos.narrow(0, offset, seq_len)?;
        let sin = self.sin.narrow(0, offset, seq_len)?;
        let half = head_dim / 2;
        let first = xs.narrow(D::Minus1, 0, half)?;
        let second = xs.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    attention: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Builds one projection, with LoRA when `name` is a target.
struct Projector<'a> {
    lora: Option<&'a LoraConfig>,
    rng: StdRng,
}

impl Projector<'_> {
    fn build(&mut self, in_dim: usize, out_dim: usize, bias: bool, name: &str, vb: &VarBuilder) -> Result<LoraLinear> {
        let vb = vb.pp(name);
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        let base = FrozenLinear::new(weight, bias);
        match self.lora {
            Some(config) if config.target_modules.iter().any(|target| target == name) => {
                LoraLinear::with_lora(base, config, &mut self.rng)
            }
            _ => Ok(LoraLinear::frozen(base)),
        }
    }
}

impl Attention {
    /// With `cache` (inference), the keys and values of earlier positions are
    /// read from it and this call's are appended; `xs` starts at position
    /// `cache`'s length.
    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        mut dropout: Option<&mut Dropout>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let q = self.q_proj.forward(xs, dropout.as_deref_mut())?;
        let k = self.k_proj.forward(xs, dropout.as_deref_mut())?;
        let v = self.v_proj.forward(xs, dropout.as_deref_mut())?;
        if cache.is_none() && xs.dtype() == DType::F32 {
            let spec = AttentionSpec {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                rope: Some(rope.tables.clone()),
                causal: true,
                key_bias: None,
            };
            return self.o_proj.forward(&crate::attention::attention(&q, &k, &v, &spec)?, dropout);
        }
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((batch, seq_len, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(q, self.num_heads)?;
        let k = split(k, self.num_kv_heads)?;
        let v = split(v, self.num_kv_heads)?;
        let offset = match &cache {
            Some(Some((past_k, _))) => past_k.dim(2)?,
            _ => 0,
        };
        let q = rope.apply(&q, offset)?;
        let mut k = rope.apply(&k, offset)?;
        let mut v = v;
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let kv_len = k.dim(2)?;
        let repeat = self.num_heads / self.num_kv_heads;
        let expand = |t: Tensor| -> Result<Tensor> {
            if repeat == 1 {
                return Ok(t);
            }
            t.unsqueeze(2)?.broadcast_as((batch, self.num_kv_heads, repeat, kv_len, self.head_dim))?.reshape((
                batch,
                self.num_heads,
                kv_len,
                self.head_dim,
            ))
        };
        let k = expand(k)?;
        let v = expand(v)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = crate::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq_len, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&context, dropout)
    }
}

impl Mlp {
    fn forward(&self, xs: &Tensor, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs, dropout.as_deref_mut())?;
        let up = self.up_proj.forward(xs, dropout.as_deref_mut())?;
        self.down_proj.forward(&crate::ops::swiglu(&gate, &up)?, dropout)
    }
}

/// A Llama/Qwen2 decoder with its LM head, optionally with LoRA.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    rope: Rope,
    config: Config,
    lora: Option<LoraConfig>,
}

impl Model {
    /// Builds the model from HF-named weights in `vb`. With `lora`, the target
    /// projections get LoRA weights initialised from `seed`.
    pub fn new(cfg: &Config, vb: VarBuilder, lora: Option<&LoraConfig>, seed: u64) -> Result<Model> {
        cfg.check_supported().map_err(candle_core::Error::msg)?;
        if let Some(lora) = lora {
            lora.check().map_err(candle_core::Error::msg)?;
        }
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let kv_dim = cfg.num_kv_heads() * head_dim;
        let qkv_bias = cfg.qkv_bias();
        let mut projector = Projector { lora, rng: StdRng::seed_from_u64(seed) };
        let model_vb = vb.pp("model");
        let embed_tokens = model_vb.get((cfg.vocab_size, hidden), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for layer_idx in 0..cfg.num_hidden_layers {
            let vb = model_vb.pp(format!("layers.{layer_idx}"));
            let attn_vb = vb.pp("self_attn");
            let mlp_vb = vb.pp("mlp");
            let attention = Attention {
                q_proj: projector.build(hidden, cfg.num_attention_heads * head_dim, qkv_bias, "q_proj", &attn_vb)?,
                k_proj: projector.build(hidden, kv_dim, qkv_bias, "k_proj", &attn_vb)?,
                v_proj: projector.build(hidden, kv_dim, qkv_bias, "v_proj", &attn_vb)?,
                o_proj: projector.build(cfg.num_attention_heads * head_dim, hidden, false, "o_proj", &attn_vb)?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_kv_heads(),
                head_dim,
            };
            let mlp = Mlp {
                gate_proj: projector.build(hidden, cfg.intermediate_size, false, "gate_proj", &mlp_vb)?,
                up_proj: projector.build(hidden, cfg.intermediate_size, false, "up_proj", &mlp_vb)?,
                down_proj: projector.build(cfg.intermediate_size, hidden, false, "down_proj", &mlp_vb)?,
            };
            layers.push(Layer {
                input_layernorm: RmsNorm::new(hidden, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
                attention,
                post_attention_layernorm: RmsNorm::new(hidden, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
                mlp,
            });
        }
        let norm = RmsNorm::new(hidden, cfg.rms_norm_eps, model_vb.pp("norm"))?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            FrozenLinear::new(vb.get((cfg.vocab_size, hidden), "lm_head.weight")?, None)
        } else {
            FrozenLinear::new(embed_tokens.clone(), None)
        };
        // Positions beyond this are never trained on; the table is cheap.
        let rope = Rope::new(head_dim, cfg.rope_theta, 4096, embed_tokens.device())?;
        Ok(Model { embed_tokens, layers, norm, lm_head, rope, config: cfg.clone(), lora: lora.cloned() })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The LoRA weights by their PEFT names, in a stable order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let attn = &layer.attention;
            let mlp = &layer.mlp;
            let named = [
                ("self_attn.q_proj", &attn.q_proj),
                ("self_attn.k_proj", &attn.k_proj),
                ("self_attn.v_proj", &attn.v_proj),
                ("self_attn.o_proj", &attn.o_proj),
                ("mlp.gate_proj", &mlp.gate_proj),
                ("mlp.up_proj", &mlp.up_proj),
                ("mlp.down_proj", &mlp.down_proj),
            ];
            for (name, linear) in named {
                if let Some((a, b)) = linear.lora_vars() {
                    let prefix = format!("{PEFT_PREFIX}layers.{layer_idx}.{name}");
                    out.push((format!("{prefix}.lora_A.weight"), a.clone()));
                    out.push((format!("{prefix}.lora_B.weight"), b.clone()));
                }
            }
        }
        out
    }

    /// Sets the LoRA weights from tensors with PEFT names (an adapter or a
    /// checkpoint); every LoRA weight of the model must be present.
    pub fn load_lora(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.lora_vars() {
            let tensor = tensors.get(&name).ok_or_else(|| candle_core::Error::msg(format!("no tensor {name}")))?;
            if tensor.dims() != var.dims() {
                candle_core::bail!("{name} has shape {:?}, expected {:?}", tensor.dims(), var.dims());
            }
            var.set(&tensor.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Final hidden states `[batch, seq, hidden]` under a causal mask. Rows
    /// padded on the right need no padding mask: no real token attends to a
    /// later position.
    pub fn forward_hidden(&self, input_ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        self.run(input_ids, dropout, None)
    }

    /// Final hidden states `[batch, seq, hidden]` of `input_ids`, which follow
    /// the positions `cache` holds (inference: no dropout, no gradient
    /// needed). Their keys and values are appended to `cache`.
    pub fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        self.run(input_ids, None, Some(cache))
    }

    fn run(
        &self,
        input_ids: &Tensor,
        mut dropout: Option<&mut Dropout>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |cache| cache.len());
        if offset + seq_len > self.rope.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} tokens is longer than the supported {}",
                offset + seq_len,
                self.rope.cos.dim(0)?
            );
        }
        let mut xs = self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?.reshape((
            batch,
            seq_len,
            self.config.hidden_size,
        ))?;
        let mask = causal_mask(seq_len, offset, xs.device())?;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let residual = xs.clone();
            let normed = layer.input_layernorm.forward(&xs)?;
            let layer_cache = cache.as_deref_mut().map(|cache| &mut cache.layers[layer_idx]);
            let attended = layer.attention.forward(&normed, &self.rope, &mask, dropout.as_deref_mut(), layer_cache)?;
            xs = (attended + residual)?;
            let residual = xs.clone();
            let normed = layer.post_attention_layernorm.forward(&xs)?;
            xs = (layer.mlp.forward(&normed, dropout.as_deref_mut())? + residual)?;
        }
        self.norm.forward(&xs)
    }

    /// LM-head logits for hidden states of any leading shape.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits `[batch, seq, vocab]` for every position.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.forward_hidden(input_ids, None)?)
    }
}

/// The prefix PEFT puts before HF names in a causal-LM adapter.
pub const PEFT_PREFIX: &str = "base_model.model.model.";

/// `[seq_len, offset + seq_len]`: row `i` (position `offset + i`) sees the
/// positions up to its own.
fn causal_mask(seq_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let width = offset + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..width).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, width), device)
}

/// The keys and values of the positions a sequence has seen, per layer, for
/// decoding one token at a time ([`Model::forward_hidden_cached`]).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// The number of positions held.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache of a batch of one repeated `n` times: `n` continuations of
    /// the same prefix decoded together.
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer.as_ref().map(|(k, v)| Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?))).transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }
}

/// Random weights for `cfg` by HF name (tests and benches).
pub fn random_weights(cfg: &Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensor = |shape: &[usize], std: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-std..std)).collect();
        Tensor::from_vec(values, shape, device)
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim());
    let q_dim = cfg.num_attention_heads * hd;
    let kv_dim = cfg.num_kv_heads() * hd;
    let mut out = HashMap::new();
    out.insert("model.embed_tokens.weight".to_string(), tensor(&[cfg.vocab_size, h], 0.5)?);
    out.insert("model.norm.weight".to_string(), Tensor::ones(h, DType::F32, device)?);
    if !cfg.tie_word_embeddings {
        out.insert("lm_head.weight".to_string(), tensor(&[cfg.vocab_size, h], 0.2)?);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let linears = [
            ("self_attn.q_proj", q_dim, h),
            ("self_attn.k_proj", kv_dim, h),
            ("self_attn.v_proj", kv_dim, h),
            ("self_attn.o_proj", h, q_dim),
            ("mlp.gate_proj", cfg.intermediate_size, h),
            ("mlp.up_proj", cfg.intermediate_size, h),
            ("mlp.down_proj", h, cfg.intermediate_size),
        ];
        for (name, out_dim, in_dim) in linears {
            let std = 1.0 / (in_dim as f32).sqrt();
            out.insert(format!("{p}.{name}.weight"), tensor(&[out_dim, in_dim], std)?);
        }
        if cfg.qkv_bias() {
            out.insert(format!("{p}.self_attn.q_proj.bias"), tensor(&[q_dim], 0.1)?);
            out.insert(format!("{p}.self_attn.k_proj.bias"), tensor(&[kv_dim], 0.1)?);
            out.insert(format!("{p}.self_attn.v_proj.bias"), tensor(&[kv_dim], 0.1)?);
        }
        out.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(h, DType::F32, device)?);
        out.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(h, DType::F32, device)?);
    }
    Ok(out)
}

/// A tiny Llama config for tests: 2 layers, 4 heads over 2 KV heads.
pub fn tiny_config(vocab_size: usize) -> Config {
    Config {
        vocab_size,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        attention_bias: false,
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        model_type: Some("llama".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn build(cfg: &Config, lora: Option<&LoraConfig>) -> Model {
        let weights = random_weights(cfg, 3, &Device::Cpu).unwrap();
        Model::new(cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), lora, 5).unwrap()
    }

    fn all_targets() -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TARGET_MODULES.iter().map(|name| name.to_string()).collect(),
        }
    }

    #[test]
    fn frozen_linear_matches_a_plain_matmul_and_its_input_gradient() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &device).unwrap();
        let linear = FrozenLinear::new(weight, Some(bias));
        let x = Var::randn(0f32, 1.0, (2, 4, 3), &device).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let fast = linear.forward(x.as_tensor()).unwrap();
        let plain = linear.forward_plain(x.as_tensor()).unwrap();
        let diff = (&fast - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let grad = |out: &Tensor| {
            let loss = (out * &target).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let diff = (grad(&fast) - grad(&plain)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn logits_cover_every_position_and_lora_starts_as_the_base_model() {
        let cfg = tiny_config(50);
        let base = build(&cfg, None);
        let adapted = build(&cfg, Some(&all_targets()));
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
        let a = base.forward(&ids).unwrap();
        assert_eq!(a.dims(), &[1, 6, 50]);
        let b = adapted.forward(&ids).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn causal_positions_do_not_see_the_future() {
        let cfg = tiny_config(50);
        let model = build(&cfg, None);
        let short = model.forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()).unwrap();
        let long = model.forward(&Tensor::new(&[[1u32, 2, 3, 9, 9]], &Device::Cpu).unwrap()).unwrap();
        let diff = (short - long.narrow(1, 0, 3).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn cached_decoding_gives_the_logits_of_the_full_sequence() {
        let cfg = tiny_config(50);
        let model = build(&cfg, Some(&all_targets()));
        let ids = [1u32, 7, 3, 9, 4, 2];
        let full = model.forward(&Tensor::new(&[ids], &Device::Cpu).unwrap()).unwrap();
        let mut cache = KvCache::new();
        let prefix = Tensor::new(&ids[..3], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mut pieces = vec![model.logits(&model.forward_hidden_cached(&prefix, &mut cache).unwrap()).unwrap()];
        assert_eq!(cache.len(), 3);
        for &id in &ids[3..] {
            let step = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            pieces.push(model.logits(&model.forward_hidden_cached(&step, &mut cache).unwrap()).unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let diff = (full - cached).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");

        // A repeated cache continues several suffixes of one prefix at once.
        let mut cache = KvCache::new();
        model.forward_hidden_cached(&prefix, &mut cache).unwrap();
        let mut batch = cache.repeat(2).unwrap();
        let suffixes = Tensor::new(&[[9u32, 4], [5, 6]], &Device::Cpu).unwrap();
        let both = model.logits(&model.forward_hidden_cached(&suffixes, &mut batch).unwrap()).unwrap();
        let other = model.forward(&Tensor::new(&[[1u32, 7, 3, 5, 6]], &Device::Cpu).unwrap()).unwrap();
        let diff = (both.get(1).unwrap() - other.get(0).unwrap().narrow(0, 3, 2).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn every_lora_tensor_gets_a_nonzero_gradient() {
        let cfg = tiny_config(50);
        let model = build(&cfg, Some(&all_targets()));
        // B starts at zero, so A's gradient is zero on the first step; move B off zero first.
        for (name, var) in model.lora_vars() {
            if name.ends_with("lora_B.weight") {
                var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let ids = Tensor::new(&[[1u32, 7, 3, 4], [5, 6, 2, 8]], &Device::Cpu).unwrap();
        let logits = model.forward(&ids).unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits.reshape((8, 50)).unwrap(),
            &Tensor::new(&[2u32, 3, 4, 5, 6, 7, 8, 9], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.lora_vars();
        assert_eq!(vars.len(), 2 * 7 * cfg.num_hidden_layers);
        for (name, var) in vars {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }

    #[test]
    fn lora_layer_gradient_matches_finite_differences() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.5, (4, 3), &device).unwrap();
        let config = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into()] };
        let mut rng = StdRng::seed_from_u64(1);
        let layer = LoraLinear::with_lora(FrozenLinear::new(weight, None), &config, &mut rng).unwrap();
        let (a, b) = layer.lora_vars().unwrap();
        b.set(&Tensor::randn(0f32, 0.5, (4, 2), &device).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let target = Tensor::randn(0f32, 1.0, (5, 4), &device).unwrap();
        let loss_of = |layer: &LoraLinear| -> Tensor {
            let out = layer.forward(&x, None).unwrap();
            (out - &target).unwrap().sqr().unwrap().sum_all().unwrap()
        };
        let grads = loss_of(&layer).backward().unwrap();
        for var in [a, b] {
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let eps = 1e-2f32;
            for index in 0..original.len() {
                let probe = |delta: f32| -> f64 {
                    let mut values = original.clone();
                    values[index] += delta;
                    var.set(&Tensor::from_vec(values, var.shape(), &device).unwrap()).unwrap();
                    loss_of(&layer).to_scalar::<f32>().unwrap() as f64
                };
                let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps as f64);
                let exact = analytic[index] as f64;
                assert!((numeric - exact).abs() <= 1e-2 * (1.0 + exact.abs()), "index {index}: {numeric} vs {exact}");
            }
            var.set(&Tensor::from_vec(original, var.shape(), &device).unwrap()).unwrap();
        }
    }

    #[test]
    fn fused_lora_layer_matches_the_composed_one_with_dropout_and_bias() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.5, (6, 5), &device).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 6, &device).unwrap();
        let config = LoraConfig { rank: 3, alpha: 6.0, dropout: 0.3, target_modules: vec!["q_proj".into()] };
        let mut rng = StdRng::seed_from_u64(2);
        let layer = LoraLinear::with_lora(FrozenLinear::new(weight, Some(bias)), &config, &mut rng).unwrap();
        let (a, b) = layer.lora_vars().unwrap();
        b.set(&Tensor::randn(0f32, 0.5, (6, 3), &device).unwrap()).unwrap();
        let x = Var::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 4, 6), &device).unwrap();
        // The same dropout seed draws the same mask on both paths.
        let fused = layer.forward(x.as_tensor(), Some(&mut Dropout::new(9))).unwrap();
        let composed = layer.forward_composed(x.as_tensor(), Some(&mut Dropout::new(9))).unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            (p - q).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&fused, &composed) < 1e-5, "values differ by {}", diff(&fused, &composed));
        let grads = |out: Tensor| (out * &target).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_fused, g_composed) = (grads(fused), grads(composed));
        for (name, var) in [("x", x.as_tensor()), ("A", a.as_tensor()), ("B", b.as_tensor())] {
            let (p, q) = (g_fused.get(var).unwrap(), g_composed.get(var).unwrap());
            assert!(diff(p, q) < 1e-4, "{name} gradients differ by {}", diff(p, q));
        }
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut cfg = tiny_config(10);
        cfg.architectures = Some(vec!["MistralForCausalLM".into()]);
        let error = cfg.check_supported().unwrap_err().to_string();
        assert!(error.contains("MistralForCausalLM"), "{error}");
    }
}
