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
        let model = bert::Model::new(&cfg, vb).map_err(|error| setup(format!("{}: {error}", dir.display())))?;
        Ok(EncoderLocal {
            name: name.to_string(),
            inner: Arc::new(Inner { model, tokenizer, pad_id: cfg.pad_token_id as u32 }),
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
        if request.body.get("encoding_format").and_then(Value::as_str).is_some_and(|format| format != "float") {
            return Err(invalid("a local encoder answers with `encoding_format` float only"));
        }
        let inner = self.inner.clone();
        let name = self.name.clone();
        let (vectors, tokens) = tokio::task::spawn_blocking(move || inner.embed(&texts))
            .await
            .map_err(|error| internal(&name, error))?
            .map_err(|error| internal(&name, error))?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| json!({"object": "embedding", "index": index, "embedding": embedding}))
            .collect();
        let body = json!({
            "object": "list", "data": data, "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        });
        Ok(response_of(&body))
    }
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
