//! BERT encoder (HF `BertModel`), for training and inference on CPU.
//!
//! Every op in `forward` has a backward pass: layer norm is composed from
//! basic ops and softmax is our fused `crate::ops::softmax_last_dim`, which
//! has one. candle-nn's fused `layer_norm` and `softmax_last_dim` pass no
//! gradient, silently; do not use them here (see the gradient tests in
//! `understudy-trainer`).
//!
//! Weights load by their HF/PyTorch names (`embeddings.word_embeddings.weight`,
//! `encoder.layer.0.attention.self.query.weight`, ...), with or without the
//! `bert.` prefix that task models (`BertForSequenceClassification`) carry.
//! The pooler is not loaded: sentence embeddings are the mean of the last
//! hidden states over the attention mask ([`mean_pool`]).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::attention::AttentionSpec;
use crate::dropout::Dropout;

/// The subset of HF `config.json` a BERT encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    /// The exact (erf) GELU, HF's `gelu`.
    #[default]
    Gelu,
    /// The tanh approximation, HF's `gelu_new`.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

/// Why a [`Config`] describes an encoder this file does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "model_type {model_type:?} (architectures {architectures:?}) is not supported: only BERT encoders \
         (model_type \"bert\") are"
    )]
    NotBert { model_type: Option<String>, architectures: Option<Vec<String>> },
    #[error("position_embedding_type {0:?} is not supported: only \"absolute\" is")]
    PositionEmbedding(String),
    #[error("hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}")]
    HeadSplit { hidden_size: usize, heads: usize },
}

impl Config {
    /// Whether this config describes an encoder this file implements: a BERT
    /// with absolute position embeddings.
    pub fn check_supported(&self) -> std::result::Result<(), ConfigError> {
        let model_type = self.model_type.as_deref().unwrap_or("");
        let is_bert_arch = self.architectures.as_ref().is_some_and(|archs| archs.iter().any(|a| a.starts_with("Bert")));
        if model_type != "bert" && !is_bert_arch {
            return Err(ConfigError::NotBert {
                model_type: self.model_type.clone(),
                architectures: self.architectures.clone(),
            });
        }
        if let Some(kind) = self.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return Err(ConfigError::PositionEmbedding(kind.to_string()));
            }
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::HeadSplit { hidden_size: self.hidden_size, heads: self.num_attention_heads });
        }
        Ok(())
    }
}

fn maybe_dropout(xs: Tensor, p: f64, dropout: Option<&mut Dropout>) -> Result<Tensor> {
    match dropout {
        Some(dropout) => dropout.apply(&xs, p),
        None => Ok(xs),
    }
}

/// A linear layer `x W^T + b` ([`crate::ops::linear`]: one op with a
/// backward pass for all three).
/// After [`Model::into_inference`], the weight is laid out for inference
/// ([`crate::ops::InferenceLinear`]) and the layer cannot train.
#[derive(Debug, Clone)]
enum Linear {
    Trainable { weight: Tensor, bias: Tensor },
    Inference(crate::ops::InferenceLinear),
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::Trainable { weight: vb.get((out_dim, in_dim), "weight")?, bias: vb.get(out_dim, "bias")? })
}

impl Linear {
    fn into_inference(self) -> Result<Linear> {
        match self {
            Linear::Trainable { weight, bias } => {
                Ok(Linear::Inference(crate::ops::InferenceLinear::new(&weight, &bias)?))
            }
            inference => Ok(inference),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Trainable { weight, bias } => crate::ops::linear(xs, weight, bias),
            Linear::Inference(layer) => layer.forward(xs),
        }
    }
}

/// Layer norm over the last dimension ([`crate::ops::layer_norm`]).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
        // Old TF-converted checkpoints call these gamma/beta.
        let (weight, bias) = if vb.contains_tensor("weight") || !vb.contains_tensor("gamma") {
            (vb.get(size, "weight")?, vb.get(size, "bias")?)
        } else {
            (vb.get(size, "gamma")?, vb.get(size, "beta")?)
        };
        Ok(LayerNorm { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    dropout_p: f64,
}

impl Embeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Embeddings> {
        Ok(Embeddings {
            word: candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: candle_nn::embedding(cfg.max_position_embeddings, cfg.hidden_size, vb.pp("position_embeddings"))?,
            token_type: candle_nn::embedding(cfg.type_vocab_size, cfg.hidden_size, vb.pp("token_type_embeddings"))?,
            layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout_p: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let (_batch, seq_len) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let xs = self
            .word
            .forward(input_ids)?
            .add(&self.token_type.forward(token_type_ids)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        maybe_dropout(self.layer_norm.forward(&xs)?, self.dropout_p, dropout)
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
    attention_dropout_p: f64,
    hidden_dropout_p: f64,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<SelfAttention> {
        let h = cfg.hidden_size;
        Ok(SelfAttention {
            query: linear(h, h, vb.pp("self.query"))?,
            key: linear(h, h, vb.pp("self.key"))?,
            value: linear(h, h, vb.pp("self.value"))?,
            output: linear(h, h, vb.pp("output.dense"))?,
            layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            attention_dropout_p: cfg.attention_probs_dropout_prob,
            hidden_dropout_p: cfg.hidden_dropout_prob,
        })
    }

    /// `mask_bias`: `[batch, 1, 1, seq]`, 0 for tokens and a large negative
    /// number for padding.
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let (batch, seq_len, hidden) = xs.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, seq_len, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (self.query.forward(xs)?, self.key.forward(xs)?, self.value.forward(xs)?);
        let no_probs_dropout = dropout.is_none() || self.attention_dropout_p == 0.0;
        if xs.dtype() == DType::F32 && no_probs_dropout {
            let spec = AttentionSpec {
                num_heads: self.num_heads,
                num_kv_heads: self.num_heads,
                head_dim: self.head_dim,
                rope: None,
                causal: false,
                key_bias: Some(Arc::new(mask_bias.flatten_all()?.to_vec1::<f32>()?)),
            };
            let context = crate::attention::attention(&q, &k, &v, &spec)?;
            let out = maybe_dropout(self.output.forward(&context)?, self.hidden_dropout_p, dropout)?;
            return self.layer_norm.forward(&(out + xs)?);
        }
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask_bias)?;
        let probs = crate::ops::softmax_last_dim(&scores)?;
        let probs = maybe_dropout(probs, self.attention_dropout_p, dropout.as_deref_mut())?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq_len, hidden))?;
        let out = maybe_dropout(self.output.forward(&context)?, self.hidden_dropout_p, dropout)?;
        self.layer_norm.forward(&(out + xs)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    act: HiddenAct,
    hidden_dropout_p: f64,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Layer> {
        Ok(Layer {
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            intermediate: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            output: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("output.dense"))?,
            layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            act: cfg.hidden_act,
            hidden_dropout_p: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let attended = self.attention.forward(xs, mask_bias, dropout.as_deref_mut())?;
        let inner = self.intermediate.forward(&attended)?;
        let inner = match self.act {
            HiddenAct::Gelu => crate::ops::gelu_erf(&inner)?,
            HiddenAct::GeluNew => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        let out = maybe_dropout(self.output.forward(&inner)?, self.hidden_dropout_p, dropout)?;
        self.layer_norm.forward(&(out + attended)?)
    }
}

/// A BERT encoder: embeddings and `num_hidden_layers` transformer layers.
#[derive(Debug, Clone)]
pub struct Model {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    dtype: DType,
}

impl Model {
    /// Builds the encoder from `vb`, which may or may not carry the `bert.` prefix.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Model> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model { embeddings, layers, dtype: vb.dtype() })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The same encoder with every linear layer's weight laid out for
    /// inference ([`crate::ops::InferenceLinear`]): the same outputs, about
    /// twice as fast for short inputs, and no backward pass. For serving and
    /// embedding, never for a model that trains.
    pub fn into_inference(self) -> Result<Model> {
        let layers = self
            .layers
            .into_iter()
            .map(|layer| {
                let attention = layer.attention;
                Ok(Layer {
                    attention: SelfAttention {
                        query: attention.query.into_inference()?,
                        key: attention.key.into_inference()?,
                        value: attention.value.into_inference()?,
                        output: attention.output.into_inference()?,
                        ..attention
                    },
                    intermediate: layer.intermediate.into_inference()?,
                    output: layer.output.into_inference()?,
                    ..layer
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model { layers, ..self })
    }

    /// Last hidden states `[batch, seq, hidden]`. `attention_mask` is
    /// `[batch, seq]` (1 for tokens, 0 for padding), any dtype.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_t(input_ids, token_type_ids, attention_mask, None)
    }

    /// [`Model::forward`] with dropout when `dropout` is given (training).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let hidden = self.embed(input_ids, token_type_ids, dropout.as_deref_mut())?;
        self.encode(&hidden, attention_mask, 0..self.layers.len(), dropout)
    }

    /// The embedding block alone: `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: &Tensor, token_type_ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        self.embeddings.forward(input_ids, token_type_ids, dropout)
    }

    /// Runs `hidden` through the transformer layers in `layers`; with
    /// [`Model::embed`] this lets a caller detach the output of frozen layers.
    pub fn encode(
        &self,
        hidden: &Tensor,
        attention_mask: &Tensor,
        layers: std::ops::Range<usize>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let mask_bias = mask_bias(attention_mask, self.dtype)?;
        let mut hidden = hidden.clone();
        for layer in &self.layers[layers] {
            hidden = layer.forward(&hidden, &mask_bias, dropout.as_deref_mut())?;
        }
        Ok(hidden)
    }
}

/// `[batch, seq]` mask to the additive `[batch, 1, 1, seq]` attention bias.
fn mask_bias(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (batch, seq_len) = attention_mask.dims2()?;
    let mask = attention_mask.to_dtype(dtype)?;
    ((1.0 - mask)? * -1e4)?.reshape((batch, 1, 1, seq_len))
}

/// Mean of `hidden` (`[batch, seq, hidden]`) over the tokens where
/// `attention_mask` (`[batch, seq]`) is 1: `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.maximum(1e-9)?;
    summed.broadcast_div(&counts)
}
