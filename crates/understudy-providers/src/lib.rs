//! Providers: where a model's answers come from.
//!
//! Each provider lives in one file, names its `PROVIDER_TYPE` and implements
//! [`Provider`]. [`AnyProvider`] dispatches over them, built from the
//! serde-tagged `ProviderConfig` enum of the config crate. Providers make no
//! routing decisions: they answer the request they are given.

pub mod anthropic;
pub mod local;
pub mod openai;
pub mod replay;
pub mod tokens;
pub mod understudy;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
pub use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value};
use understudy_config::{ModelConfig, ProviderConfig};
use understudy_types::Usage;

pub use anthropic::AnthropicProvider;
pub use local::{confidence_of, LocalLoader, LocalModel, LocalModelSpec, LocalProvider};
pub use openai::OpenAiProvider;
pub use replay::ReplayProvider;
pub use understudy::{AttemptOutcome, CostModel, Understudy, UnderstudyAttempt};

/// A chat completion request, as an OpenAI JSON object whose `model` field
/// already holds the provider's own model name. Fields the gateway does not
/// read are kept as they are, so they reach the upstream untouched.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub body: Map<String, Value>,
}

/// An embeddings request, in the same shape as [`ChatRequest`].
#[derive(Debug, Clone)]
pub struct EmbeddingRequest {
    pub body: Map<String, Value>,
}

/// A complete (non-streamed) answer: the JSON body as the provider sent it.
#[derive(Debug, Clone)]
pub struct ProviderResponse {
    pub body: Bytes,
    /// The provider's own `usage`, when it reported one.
    pub usage: Option<Usage>,
    /// The upstream's headers that clients act on ([`openai::passed_headers`],
    /// [`anthropic::passed_headers`] under OpenAI's names); empty for
    /// providers that are no HTTP upstream.
    pub headers: HeaderMap,
    /// The machine time the answer took, for a local model that answers
    /// concurrent calls together (a batched classifier: its pass's time over
    /// the calls in it); `None` when the call's own wall time is its compute.
    pub compute: Option<std::time::Duration>,
}

/// The `data:` payloads of a streamed answer, each one chunk of JSON text.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<String, ProviderError>> + Send>>;

/// A streamed answer: its chunks, and the headers that came before them.
pub struct StreamResponse {
    pub chunks: ChunkStream,
    /// As [`ProviderResponse::headers`].
    pub headers: HeaderMap,
}

impl StreamResponse {
    /// A stream with no upstream headers (a local model, a replay).
    pub fn of_chunks(chunks: ChunkStream) -> StreamResponse {
        StreamResponse { chunks, headers: HeaderMap::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{provider}` did not answer within {timeout:?}")]
    Timeout { provider: String, timeout: Duration },
    #[error("provider `{provider}` is unavailable after {attempts} attempts: {last_error}")]
    Unavailable { provider: String, attempts: u32, last_error: String },
    /// The upstream answered with an error status (4xx or 5xx); its status,
    /// body and the headers clients act on are passed on as they are (boxed:
    /// a header map would make every `Result` of this crate large).
    #[error("provider `{provider}` answered HTTP {status}")]
    Rejected { provider: String, status: u16, body: Bytes, headers: Box<HeaderMap> },
    #[error("provider `{provider}` sent a malformed answer: {message}")]
    BadResponse { provider: String, message: String },
    #[error("replay provider `{provider}` has no recording matching these messages ({n_recordings} recordings loaded from {file})")]
    ReplayNoMatch { provider: String, n_recordings: usize, file: String },
    #[error("provider `{provider}` ({provider_type}) does not serve {what}")]
    Unsupported { provider: String, provider_type: &'static str, what: &'static str },
    #[error("cannot start provider `{provider}`: {message}")]
    Setup { provider: String, message: String },
}

/// What every provider can be asked.
pub trait Provider {
    const PROVIDER_TYPE: &'static str;

    fn infer(&self, request: ChatRequest) -> impl Future<Output = Result<ProviderResponse, ProviderError>> + Send;

    fn infer_stream(&self, request: ChatRequest) -> impl Future<Output = Result<StreamResponse, ProviderError>> + Send;

    fn embed(&self, request: EmbeddingRequest) -> impl Future<Output = Result<ProviderResponse, ProviderError>> + Send;
}

const TEXT_COMPLETIONS: &str = "legacy text completions (/v1/completions)";
const RESPONSES: &str = "the Responses API (/v1/responses)";

/// A configured provider of any type.
#[derive(Debug)]
pub enum AnyProvider {
    /// Boxed, as `Anthropic`: its client and URLs are several times the
    /// size of the others.
    OpenAi(Box<OpenAiProvider>),
    Anthropic(Box<AnthropicProvider>),
    Replay(ReplayProvider),
    Local(LocalProvider),
}

impl AnyProvider {
    /// Builds a provider from its config. Files it needs are read now, so a
    /// missing or broken file fails start-up rather than the first request.
    /// A local provider loads its models from `models` through `loader`.
    pub fn from_config<'a>(
        name: &str,
        config: &ProviderConfig,
        models: impl IntoIterator<Item = (&'a String, &'a ModelConfig)>,
        loader: Option<&dyn LocalLoader>,
    ) -> Result<AnyProvider, ProviderError> {
        Ok(match config {
            ProviderConfig::OpenAi(config) => AnyProvider::OpenAi(Box::new(OpenAiProvider::new(name, config)?)),
            ProviderConfig::Anthropic(config) => {
                AnyProvider::Anthropic(Box::new(AnthropicProvider::new(name, config)?))
            }
            ProviderConfig::Replay(config) => AnyProvider::Replay(ReplayProvider::load(name, config)?),
            ProviderConfig::Local(config) => AnyProvider::Local(LocalProvider::new(name, config, models, loader)?),
        })
    }

    pub fn provider_type(&self) -> &'static str {
        match self {
            AnyProvider::OpenAi(_) => OpenAiProvider::PROVIDER_TYPE,
            AnyProvider::Anthropic(_) => AnthropicProvider::PROVIDER_TYPE,
            AnyProvider::Replay(_) => ReplayProvider::PROVIDER_TYPE,
            AnyProvider::Local(_) => LocalProvider::PROVIDER_TYPE,
        }
    }

    pub async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.infer(request).await,
            AnyProvider::Anthropic(provider) => provider.infer(request).await,
            AnyProvider::Replay(provider) => provider.infer(request).await,
            AnyProvider::Local(provider) => provider.infer(request).await,
        }
    }

    pub async fn infer_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.infer_stream(request).await,
            AnyProvider::Anthropic(provider) => provider.infer_stream(request).await,
            AnyProvider::Replay(provider) => provider.infer_stream(request).await,
            AnyProvider::Local(provider) => provider.infer_stream(request).await,
        }
    }

    /// A legacy text completion (`/v1/completions`): OpenAI-compatible
    /// upstreams only.
    pub async fn text_completion(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.text_completion(request).await,
            _ => Err(self.unsupported(&request, TEXT_COMPLETIONS)),
        }
    }

    /// A streamed legacy text completion, as [`AnyProvider::text_completion`].
    pub async fn text_completion_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.text_completion_stream(request).await,
            _ => Err(self.unsupported(&request, TEXT_COMPLETIONS)),
        }
    }

    /// A Responses API call (`/v1/responses`) passed through: OpenAI-compatible
    /// upstreams only (the gateway answers text-only calls from an
    /// understudy by converting them to chat instead).
    pub async fn responses(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.responses(request).await,
            _ => Err(self.unsupported(&request, RESPONSES)),
        }
    }

    /// A streamed Responses API call, as [`AnyProvider::responses`].
    pub async fn responses_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.responses_stream(request).await,
            _ => Err(self.unsupported(&request, RESPONSES)),
        }
    }

    fn unsupported(&self, request: &ChatRequest, what: &'static str) -> ProviderError {
        let model = request.body.get("model").and_then(Value::as_str).unwrap_or_default();
        ProviderError::Unsupported {
            provider: format!("for model `{model}`"),
            provider_type: self.provider_type(),
            what,
        }
    }

    pub async fn embed(&self, request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        match self {
            AnyProvider::OpenAi(provider) => provider.embed(request).await,
            AnyProvider::Anthropic(provider) => provider.embed(request).await,
            AnyProvider::Replay(provider) => provider.embed(request).await,
            AnyProvider::Local(provider) => provider.embed(request).await,
        }
    }
}

/// Reads `usage` out of a JSON response body without building the rest of it
/// (nor `usage` itself as a map: its counts are read as they are parsed).
/// Errors only if the body is not a JSON object.
pub fn usage_of_body(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        usage: Option<UsageCounts>,
    }
    let parsed: UsageOnly = serde_json::from_slice(body)?;
    Ok(parsed.usage.and_then(|counts| counts.0))
}

/// Reads `usage` out of an OpenAI response or chunk, if it has one: chat's
/// and legacy completions' `prompt_tokens`/`completion_tokens`, or the
/// Responses API's `input_tokens`/`output_tokens`.
pub fn usage_of(body: &Value) -> Option<Usage> {
    UsageCounts::deserialize(body.get("usage")?).ok()?.0
}

/// The one reading of a `usage` object, for whole bodies and for chunks:
/// the prompt's count is `prompt_tokens`, else `input_tokens` (without one
/// of them, no usage); the answer's is `completion_tokens`, else
/// `output_tokens`, else 0. A count that is not a whole non-negative number
/// counts as absent, and a `usage` that is not an object as no usage:
/// neither fails the body.
struct UsageCounts(Option<Usage>);

impl<'de> serde::Deserialize<'de> for UsageCounts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UsageCounts, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

        #[derive(serde::Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            PromptTokens,
            InputTokens,
            CompletionTokens,
            OutputTokens,
            #[serde(other)]
            Other,
        }

        struct Counts;

        impl<'de> Visitor<'de> for Counts {
            type Value = UsageCounts;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("any JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageCounts, A::Error> {
                // [prompt_tokens, input_tokens, completion_tokens, output_tokens]
                let mut counts = [None; 4];
                while let Some(field) = map.next_key::<Field>()? {
                    let slot = match field {
                        Field::PromptTokens => 0,
                        Field::InputTokens => 1,
                        Field::CompletionTokens => 2,
                        Field::OutputTokens => 3,
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    counts[slot] = map.next_value::<Value>()?.as_u64();
                }
                Ok(UsageCounts(counts[0].or(counts[1]).map(|prompt_tokens| Usage {
                    prompt_tokens,
                    completion_tokens: counts[2].or(counts[3]).unwrap_or(0),
                })))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UsageCounts, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(UsageCounts(None))
            }

            fn visit_bool<E>(self, _: bool) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }

            fn visit_str<E>(self, _: &str) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }

            fn visit_unit<E>(self) -> Result<UsageCounts, E> {
                Ok(UsageCounts(None))
            }
        }

        deserializer.deserialize_any(Counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
        Some(Usage { prompt_tokens, completion_tokens })
    }

    #[test]
    fn usage_is_read_the_same_from_a_whole_body_and_from_a_parsed_chunk() {
        let cases: &[(&str, Option<Usage>)] = &[
            (
                r#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
                usage(12, 3),
            ),
            (
                r#"{"usage":{"input_tokens":7,"output_tokens":2,"input_tokens_details":{"cached_tokens":0}}}"#,
                usage(7, 2),
            ),
            (r#"{"usage":{"prompt_tokens":5}}"#, usage(5, 0)),
            (
                r#"{"usage":{"prompt_tokens":"5","input_tokens":4,"completion_tokens":1.5,"output_tokens":2}}"#,
                usage(4, 2),
            ),
            (r#"{"usage":{"prompt_tokens":1,"prompt_tokens":9}}"#, usage(9, 0)),
            (r#"{"usage":{"prompt\u005ftokens":6,"completion_tokens":-1}}"#, usage(6, 0)),
            (r#"{"usage":{"completion_tokens":3}}"#, None),
            (r#"{"usage":null}"#, None),
            (r#"{"usage":[1,{"prompt_tokens":2}]}"#, None),
            (r#"{"usage":"12"}"#, None),
            (r#"{"usage":12}"#, None),
            (r#"{"usage":true}"#, None),
            (r#"{"id":"x"}"#, None),
        ];
        for (body, expected) in cases {
            assert_eq!(usage_of_body(body.as_bytes()).unwrap(), *expected, "{body}");
            assert_eq!(usage_of(&serde_json::from_str(body).unwrap()), *expected, "{body}");
        }
        assert!(usage_of_body(b"\"text\"").is_err());
        assert!(usage_of_body(b"{\"usage\":{\"prompt_tokens\":1}").is_err());
    }
}
