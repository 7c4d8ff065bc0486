//! A BERT encoder (MiniLM) serving `/v1/embeddings`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use understudy_models::{bert, hf};
use understudy_providers::{EmbeddingRequest, LocalModel, ProviderError, ProviderResponse};

use crate::{internal, response_of};

/// Longest input, in tokens; longer inputs are truncated, as sentence-transformers does.
const MAX_TOKENS: usize = 256;
/// Inputs per forward pass.
const BATCH: usize = 32;

/// Sentence embeddings: the last hidden states mean-pooled over the attention
/// mask (so padding never counts) and L2-normalized.
pub struct EncoderLocal {
    name: String,
    inner: Arc<Inner>,
}

struct Inner {
    model: bert::Model,
    /// The length of the vectors the model makes.
    n_dims: usize,
    tokenizer: Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for EncoderLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderLocal").field("name", &self.name).finish()
    }
}

impl EncoderLocal {
    pub fn load(name: &str, dir: &Path) -> Result<EncoderLocal, ProviderError> {
        let setup = |message: String| ProviderError::Setup { provider: format!("local model `{name}`"), message };
        let hf_dir = hf::HfDir::open(dir).map_err(|error| setup(error.to_string()))?;
        let cfg = hf_dir.bert_config().map_err(|error| setup(error.to_string()))?;
        let tokenizer =
            hf_dir.tokenizer(MAX_TOKENS.min(cfg.max_position_embeddings)).map_err(|error| setup(error.to_string()))?;
        let weights = hf_dir.weights(DType::F32, &Device::Cpu).map_err(|error| setup(error.to_string()))?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let model = bert::Model::new(&cfg, vb)
            .and_then(bert::Model::into_inference)
            .map_err(|error| setup(format!("{}: {error}", dir.display())))?;
        Ok(EncoderLocal {
            name: name.to_string(),
            inner: Arc::new(Inner { model, n_dims: cfg.hidden_size, tokenizer, pad_id: cfg.pad_token_id as u32 }),
        })
    }

    /// Normalized embeddings of `texts`, in order, and the number of tokens read.
    pub fn embed_texts(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, usize), ProviderError> {
        self.inner.embed(texts).map_err(|error| internal(&self.name, error))
    }

    async fn answer(&self, request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        let invalid = |message: &str| ProviderError::invalid_request(&self.name, message.to_string());
        let texts: Vec<String> = match request.body.get("input") {
            Some(Value::String(text)) => vec![text.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("`input` must be a string or an array of strings (token arrays are not accepted by a local encoder)"))?,
            Some(Value::Array(_)) => return Err(invalid("`input` must not be empty")),
            _ => return Err(invalid("`input` must be a string or an array of strings")),
        };
        let encoding = match request.body.get("encoding_format") {
            None | Some(Value::Null) => Encoding::Float,
            Some(Value::String(format)) if format == "float" => Encoding::Float,
            Some(Value::String(format)) if format == "base64" => Encoding::Base64,
            Some(_) => {
                return Err(ProviderError::invalid_param(
                    &self.name,
                    "`encoding_format` must be \"float\" or \"base64\"",
                    "encoding_format",
                ))
            }
        };
        let n_dims = self.inner.n_dims;
        let dimensions = match request.body.get("dimensions") {
            None | Some(Value::Null) => n_dims,
            Some(value) => match value.as_u64().and_then(|dims| usize::try_from(dims).ok()) {
                Some(dims) if (1..=n_dims).contains(&dims) => dims,
                _ => {
                    return Err(ProviderError::invalid_param(
                        &self.name,
                        format!("`dimensions` must be an integer from 1 to {n_dims} for `{}`, not {value}", self.name),
                        "dimensions",
                    ))
                }
            },
        };
        let inner = self.inner.clone();
        let name = self.name.clone();
        let (vectors, tokens) = tokio::task::spawn_blocking(move || inner.embed(&texts))
            .await
            .map_err(|error| internal(&name, error))?
            .map_err(|error| internal(&name, error))?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| {
                let embedding = shorten(embedding, dimensions);
                let embedding = match encoding {
                    Encoding::Float => json!(embedding),
                    Encoding::Base64 => json!(base64_of(&embedding)),
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        let body = json!({
            "object": "list", "data": data, "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        });
        Ok(response_of(&body))
    }
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// A JSON array of numbers.
    Float,
    /// The vector's float32 values as little-endian bytes, base64-encoded:
    /// what OpenAI's clients ask for by default and decode.
    Base64,
}

/// The first `n_dims` values of a normalized vector, normalized again: how
/// OpenAI's `text-embedding-3` models answer `dimensions`. Those models were
/// trained for it (Matryoshka representation learning); MiniLM was not, so
/// a shortened vector keeps less of the meaning than theirs would. Still,
/// a client that needs a fixed width gets one, and a full-length request is
/// unchanged.
pub fn shorten(mut vector: Vec<f32>, n_dims: usize) -> Vec<f32> {
    if n_dims >= vector.len() {
        return vector;
    }
    vector.truncate(n_dims);
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt().max(1e-12);
    for value in &mut vector {
        *value /= norm;
    }
    vector
}

fn base64_of(vector: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = vector.iter().flat_map(|value| value.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Inner {
    fn embed(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, usize), String> {
        let mut out = Vec::with_capacity(texts.len());
        let mut n_tokens = 0;
        for chunk in texts.chunks(BATCH) {
            let encodings = self.tokenizer.encode_batch(chunk.to_vec(), true).map_err(|error| error.to_string())?;
            let longest = encodings.iter().map(|encoding| encoding.get_ids().len()).max().unwrap_or(1).max(1);
            let mut ids = Vec::with_capacity(chunk.len() * longest);
            let mut mask = Vec::with_capacity(chunk.len() * longest);
            for encoding in &encodings {
                let row = encoding.get_ids();
                n_tokens += row.len();
                ids.extend_from_slice(row);
                ids.extend(std::iter::repeat_n(self.pad_id, longest - row.len()));
                mask.extend(std::iter::repeat_n(1u32, row.len()));
                mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
            }
            let shape = (chunk.len(), longest);
            let run = || -> candle_core::Result<Vec<Vec<f32>>> {
                let ids = Tensor::from_vec(ids.clone(), shape, &Device::Cpu)?;
                let mask = Tensor::from_vec(mask.clone(), shape, &Device::Cpu)?;
                let types = ids.zeros_like()?;
                let hidden = self.model.forward(&ids, &types, &mask)?;
                let pooled = bert::mean_pool(&hidden, &mask)?;
                let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
                pooled.broadcast_div(&norms)?.to_vec2::<f32>()
            };
            out.extend(run().map_err(|error| error.to_string())?);
        }
        Ok((out, n_tokens))
    }
}

impl LocalModel for EncoderLocal {
    fn chat(
        &self,
        _request: understudy_providers::ChatRequest,
    ) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::invalid_request(
                &self.name,
                format!("`{}` is an encoder: it serves embeddings, not chat", self.name),
            ))
        })
    }

    fn embed(&self, request: EmbeddingRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        Box::pin(self.answer(request))
    }

    fn kind(&self) -> &'static str {
        "encoder"
    }
}
