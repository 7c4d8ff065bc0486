//! The local inference engine: GGUF causal LMs served through llama.cpp
//! (the `llama-cpp-2` binding), behind the `LocalModel` interface of
//! `understudy-providers`.
//!
//! [`LlamaCppModel::load`] opens a GGUF file (memory-mapped: the weights stay
//! quantized) or an HF Llama/Qwen2 directory (converted to a cached F16 GGUF
//! by [`hf`]), either of them local or fetched from a hub by [`hub`],
//! applies an optional PEFT LoRA adapter (converted to a GGUF adapter by
//! [`lora`]), and starts one scheduler thread that owns the
//! llama.cpp context and batches all concurrent requests ([`scheduler`]).
//! Requests are read by [`request`], sampled by [`sampling`], and their text
//! cut at stop sequences by [`text`]. Greedy requests draft tokens copied
//! from their own prompt and output and verify them in the same step
//! ([`speculative`]).

pub mod gguf;
pub mod hf;
pub mod hub;
pub mod lora;
pub mod requant;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod schema;
pub mod speculative;
pub mod testing;
pub mod text;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde_json::{json, Value};
use understudy_providers::local::{LocalModel, LocalModelSpec};
use understudy_providers::{ChatRequest, ChunkStream, ProviderError, ProviderResponse};

use crate::request::{parse_chat, ParsedChat};
use crate::scheduler::{Event, Job, SchedulerConfig};

/// The provider name used in errors.
const PROVIDER: &str = "local";

/// How a model is served.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// CPU threads for llama.cpp; `None`: the machine's cores.
    pub n_threads: Option<usize>,
    /// KV-cache cells shared by all sequences; also the longest prompt plus
    /// answer one request may have. Capped at the model's training context.
    pub n_ctx: u32,
    /// Sequences decoded together (continuous batching).
    pub n_seq_max: u32,
    /// Most tokens in one decode step (prompt chunks plus one token per generating sequence).
    pub n_batch: u32,
    /// The format the weights are served in ([`requant`]).
    pub weights: requant::WeightFormat,
    /// Most draft tokens a greedy request verifies per decode step
    /// ([`speculative`]); 0 decodes one token at a time.
    pub speculative_draft: usize,
    /// Keep finished prompts in the KV cache, so that a request whose prompt
    /// starts the same way prefills only the rest ([`scheduler`]).
    pub prefix_cache: bool,
    /// Text a request's JSON schema fixes enters the KV cache in the step
    /// before it, without a decode step of its own ([`schema`]); false
    /// decodes it one token per step (the same answers, for comparison).
    pub jump_forward: bool,
}

/// The default of [`EngineOptions::speculative_draft`], the config's.
pub use understudy_config::DEFAULT_SPECULATIVE_DRAFT;

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            n_threads: None,
            n_ctx: 4096,
            n_seq_max: 8,
            n_batch: 512,
            weights: requant::WeightFormat::Auto,
            speculative_draft: DEFAULT_SPECULATIVE_DRAFT,
            prefix_cache: true,
            jump_forward: true,
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file `{path}` does not exist")]
    Missing { path: PathBuf },
    #[error("model file `{path}` is not a GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("llama.cpp could not load model file `{path}` (corrupt, truncated or an unsupported architecture)")]
    LoadFailed { path: PathBuf },
    #[error("model `{path}`: {message}")]
    Setup { path: PathBuf, message: String },
    #[error(transparent)]
    Adapter(#[from] lora::AdapterError),
    #[error(transparent)]
    Convert(#[from] hf::ConvertError),
    #[error(transparent)]
    Requant(#[from] requant::RequantError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
}

impl From<EngineError> for ProviderError {
    fn from(error: EngineError) -> ProviderError {
        ProviderError::Setup { provider: PROVIDER.to_string(), message: error.to_string() }
    }
}

/// Why a chat's messages could not become prompt tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("a message cannot be passed to the chat template: {0}")]
    Message(String),
    #[error("the model's chat template failed: {0}")]
    Template(String),
}

/// llama.cpp's backend failed to initialize (the message is llama.cpp's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(String);

/// The process-wide llama.cpp backend (it may be initialized only once).
pub fn backend() -> Result<&'static LlamaBackend, BackendError> {
    static BACKEND: OnceLock<Result<LlamaBackend, BackendError>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp's own logging goes to `tracing` (target `llama-cpp-2`), not stderr.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|error| BackendError(error.to_string()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A GGUF causal LM served by llama.cpp with continuous batching.
pub struct LlamaCppModel {
    name: String,
    path: PathBuf,
    model: Arc<LlamaModel>,
    template: LlamaChatTemplate,
    jobs: Mutex<mpsc::Sender<Job>>,
    n_ctx: usize,
    n_batch: usize,
    n_seq_max: usize,
    speculation: Arc<speculative::SpeculationCounters>,
}

impl std::fmt::Debug for LlamaCppModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCppModel").field("name", &self.name).field("path", &self.path).finish_non_exhaustive()
    }
}

impl LlamaCppModel {
    /// Loads `spec.path` (a GGUF file, an HF Llama/Qwen2 directory, which
    /// is converted to GGUF once and cached, or an `hf:` hub model, fetched
    /// first by [`hub`]) and `spec.adapter` (a PEFT directory, if any), and
    /// starts the scheduler thread. A missing, corrupt or unconvertible file
    /// fails here, naming it; an unreachable hub, naming the URL.
    pub fn load(spec: &LocalModelSpec, options: &EngineOptions) -> Result<LlamaCppModel, ProviderError> {
        Ok(Self::load_engine(spec, options)?)
    }

    pub fn load_engine(spec: &LocalModelSpec, options: &EngineOptions) -> Result<LlamaCppModel, EngineError> {
        if let Some(name) = spec.path.strip_prefix("hf:") {
            let local = hub::fetch(name, &hub::HubOptions::from_env())?;
            let local_spec = LocalModelSpec { path: local.display().to_string(), ..spec.clone() };
            return Self::load_engine(&local_spec, options);
        }
        let path = PathBuf::from(&spec.path);
        let path = if path.is_dir() {
            let config_path = path.join("config.json");
            if !config_path.is_file() {
                return Err(EngineError::Setup {
                    path,
                    message: "is a directory without config.json: the llama.cpp engine serves GGUF files and HF \
                              Llama/Qwen2 directories"
                        .to_string(),
                });
            }
            let text = std::fs::read_to_string(&config_path)
                .map_err(|error| EngineError::Setup { path: config_path.clone(), message: error.to_string() })?;
            let config: Value = serde_json::from_str(&text).map_err(|error| EngineError::Setup {
                path: config_path.clone(),
                message: format!("not JSON: {error}"),
            })?;
            hf::architecture_of(&config)
                .map_err(|error| EngineError::Setup { path: config_path.clone(), message: error.to_string() })?;
            hf::gguf_for_dir(&path)?
        } else {
            path
        };
        check_gguf_file(&path)?;
        let backend =
            backend().map_err(|error| EngineError::Setup { path: path.clone(), message: error.to_string() })?;
        let params = LlamaModelParams::default().with_use_mmap(true);
        let mut model = LlamaModel::load_from_file(backend, &path, &params)
            .map_err(|_| EngineError::LoadFailed { path: path.clone() })?;
        let n_threads = options
            .n_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(1))
            .max(1);
        let file_type = model.meta_val_str("general.file_type").ok().and_then(|value| value.trim().parse().ok());
        let path = if requant::wants_copy(options.weights, file_type) {
            let copy = requant::serving_copy(&path, options.weights, n_threads)?;
            drop(model);
            model = LlamaModel::load_from_file(backend, &copy, &params)
                .map_err(|_| EngineError::LoadFailed { path: copy.clone() })?;
            copy
        } else {
            path
        };
        let adapter = match &spec.adapter {
            Some(dir) => {
                let gguf = lora::convert_peft_dir(dir, &model_shape(&model))?;
                let adapter = model.lora_adapter_init(&gguf.path).map_err(|error| lora::AdapterError::Invalid {
                    path: dir.clone(),
                    message: format!("llama.cpp rejected the converted adapter: {error}"),
                })?;
                Some(adapter)
            }
            None => None,
        };
        let template = model
            .chat_template(None)
            .or_else(|_| LlamaChatTemplate::new("chatml"))
            .map_err(|error| EngineError::Setup { path: path.clone(), message: format!("chat template: {error}") })?;
        let n_ctx = options.n_ctx.min(model.n_ctx_train()).max(16);
        let n_threads = n_threads as i32;
        let n_seq_max = options.n_seq_max.clamp(1, 64);
        let n_batch = options.n_batch.max(n_seq_max).max(32);
        let model = Arc::new(model);
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread_model = Arc::clone(&model);
        let config = SchedulerConfig {
            n_ctx,
            n_batch,
            n_seq_max,
            speculative_draft: options.speculative_draft,
            prefix_cache: options.prefix_cache,
            jump_forward: options.jump_forward,
        };
        let context_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(config.n_seq_ids())
            .with_kv_unified(true)
            .with_n_threads(n_threads)
            .with_n_threads_batch(n_threads);

        let speculation = Arc::new(speculative::SpeculationCounters::default());
        let thread_speculation = Arc::clone(&speculation);
        std::thread::Builder::new()
            .name(format!("llama-{}", spec.name))
            .spawn(move || {
                let mut adapter = adapter;
                let mut context = match thread_model.new_context(backend, context_params) {
                    Ok(context) => context,
                    Err(error) => {
                        let _ = ready_tx.send(Err(format!("could not create a llama.cpp context: {error}")));
                        return;
                    }
                };
                if let Some(adapter) = adapter.as_mut() {
                    if let Err(error) = context.lora_adapter_set(adapter, 1.0) {
                        let _ = ready_tx.send(Err(format!("could not apply the LoRA adapter: {error}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                scheduler::run(&thread_model, context, config, receiver, &thread_speculation);
                drop(adapter);
            })
            .map_err(|error| EngineError::Setup { path: path.clone(), message: error.to_string() })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(EngineError::Setup { path, message }),
            Err(_) => return Err(EngineError::Setup { path, message: "the scheduler thread died".into() }),
        }
        Ok(LlamaCppModel {
            name: spec.name.clone(),
            path,
            model,
            template,
            jobs: Mutex::new(jobs),
            n_ctx: n_ctx as usize,
            n_batch: n_batch as usize,
            n_seq_max: n_seq_max as usize,
            speculation,
        })
    }

    /// How much speculative decoding has drafted and kept since loading.
    pub fn speculation_stats(&self) -> speculative::SpeculationStats {
        self.speculation.read()
    }

    /// The llama.cpp model, for tests and benchmarks (tokenizing, metadata).
    pub fn llama_model(&self) -> &LlamaModel {
        &self.model
    }

    /// The GGUF file served (for an HF directory, its cached conversion).
    pub fn gguf_path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` as llama.cpp's tokenizer splits it, without a BOS;
    /// with `parse_special`, control and user-defined tokens written in the
    /// text (`<|im_start|>`) become their single ids.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.model.vocab().tokenize(text.as_bytes(), false, parse_special).iter().map(|token| token.0 as u32).collect()
    }

    /// The context size requests must fit in.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The prompt tokens of `messages` rendered with the model's chat template.
    pub fn prompt_tokens(&self, messages: &[(String, String)]) -> Result<Vec<LlamaToken>, PromptError> {
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| PromptError::Message(error.to_string()))?;
        let prompt = self
            .model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|error| PromptError::Template(error.to_string()))?;
        Ok(self.model.vocab().tokenize(prompt.as_bytes(), true, true))
    }

    fn invalid(&self, message: impl Into<String>) -> ProviderError {
        ProviderError::invalid_request(PROVIDER, message)
    }

    /// Checks and tokenizes a request, and hands it to the scheduler.
    fn submit(
        &self,
        request: &ChatRequest,
    ) -> Result<(ParsedChat, Job, tokio::sync::mpsc::UnboundedReceiver<Event>), ProviderError> {
        let parsed = parse_chat(&request.body).map_err(|error| self.invalid(error.0))?;
        let prompt = self.prompt_tokens(&parsed.messages).map_err(|error| self.invalid(error.to_string()))?;
        if prompt.len() >= self.n_ctx {
            return Err(self.invalid(format!(
                "prompt has {} tokens, the model's context is {}",
                prompt.len(),
                self.n_ctx
            )));
        }
        let choices = match &parsed.choices {
            Some(texts) => {
                let vocab = self.model.vocab();
                let mut choices = Vec::with_capacity(texts.len());
                for text in texts {
                    let tokens = vocab.tokenize(text.as_bytes(), false, false);
                    if tokens.is_empty() {
                        return Err(self.invalid(format!("the allowed answer {text:?} has no tokens")));
                    }
                    if tokens.len() >= self.n_batch || prompt.len() + tokens.len() >= self.n_ctx {
                        return Err(self.invalid(format!(
                            "the allowed answer {text:?} ({} tokens) does not fit after the prompt ({} tokens) in the model's context of {}",
                            tokens.len(),
                            prompt.len(),
                            self.n_ctx
                        )));
                    }
                    choices.push((tokens, text.clone()));
                }
                Some(choices)
            }
            None => None,
        };
        let seed = parsed.sampling.seed.unwrap_or_else(fresh_seed);
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            prompt,
            sampling: parsed.sampling.clone(),
            choices,
            json_object: parsed.json_object,
            schema: parsed.schema.clone(),
            seed,
            events,
        };
        Ok((parsed, job, receiver))
    }

    fn send(&self, job: Job) -> Result<(), ProviderError> {
        let jobs = self.jobs.lock().map_err(|_| self.unavailable("the scheduler lock is poisoned"))?;
        jobs.send(job).map_err(|_| self.unavailable("the scheduler thread has stopped"))
    }

    fn unavailable(&self, message: &str) -> ProviderError {
        ProviderError::Unavailable { provider: PROVIDER.to_string(), attempts: 1, last_error: message.to_string() }
    }

    fn failed(&self, message: String) -> ProviderError {
        ProviderError::Unavailable { provider: PROVIDER.to_string(), attempts: 1, last_error: message }
    }
}

fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::now_v7().simple())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI's `usage`, with the prompt tokens served from a kept prefix as
/// `prompt_tokens_details.cached_tokens`.
fn usage_json(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens}})
}

impl LocalModel for LlamaCppModel {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ProviderResponse, ProviderError>> {
        Box::pin(async move {
            let (parsed, job, mut events) = self.submit(&request)?;
            self.send(job)?;
            let mut content = String::new();
            let mut logprobs = Vec::new();
            loop {
                match events.recv().await {
                    Some(Event::Delta { text, logprobs: entries }) => {
                        content.push_str(&text);
                        logprobs.extend(entries);
                    }
                    Some(Event::Done { finish_reason, prompt_tokens, completion_tokens, compute, cached_tokens }) => {
                        let usage = usage_json(prompt_tokens, completion_tokens, cached_tokens);
                        let logprobs = parsed.sampling.logprobs.map(|_| json!({"content": logprobs}));
                        let body = json!({
                            "id": completion_id(),
                            "object": "chat.completion",
                            "created": unix_now(),
                            "model": self.name,
                            "choices": [{
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "logprobs": logprobs,
                                "finish_reason": finish_reason,
                            }],
                            "usage": usage,
                        });
                        let usage = understudy_types::Usage {
                            prompt_tokens: prompt_tokens as u64,
                            completion_tokens: completion_tokens as u64,
                        };
                        return Ok(ProviderResponse {
                            body: body.to_string().into(),
                            usage: Some(usage),
                            headers: Default::default(),
                            // Its share of the batched steps, not its wall
                            // time: concurrent calls overlap (the ledger's rule).
                            compute: Some(compute),
                        });
                    }
                    Some(Event::Failed(message)) => return Err(self.failed(message)),
                    None => return Err(self.failed("the scheduler dropped the request".to_string())),
                }
            }
        })
    }

    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            let (parsed, job, events) = self.submit(&request)?;
            self.send(job)?;
            let id = completion_id();
            let created = unix_now();
            let name = self.name.clone();
            let want_logprobs = parsed.sampling.logprobs.is_some();
            let chunk = move |choices: Value, usage: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": choices, "usage": usage})
                .to_string()
            };
            let first = chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                Value::Null,
            );
            let events = tokio_stream_of(events);
            let rest = events.flat_map(move |event| {
                let items: Vec<Result<String, ProviderError>> = match event {
                    Event::Delta { text, logprobs } => {
                        let logprobs = if want_logprobs { json!({"content": logprobs}) } else { Value::Null };
                        vec![Ok(chunk(
                            json!([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]),
                            Value::Null,
                        ))]
                    }
                    Event::Done { finish_reason, prompt_tokens, completion_tokens, cached_tokens, .. } => vec![
                        Ok(chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason}]), Value::Null)),
                        Ok(chunk(json!([]), usage_json(prompt_tokens, completion_tokens, cached_tokens))),
                    ],
                    Event::Failed(message) => vec![Err(ProviderError::Unavailable {
                        provider: PROVIDER.to_string(),
                        attempts: 1,
                        last_error: message,
                    })],
                };
                futures::stream::iter(items)
            });
            let stream: ChunkStream = Box::pin(futures::stream::iter([Ok(first)]).chain(rest));
            Ok(stream)
        })
    }

    fn kind(&self) -> &'static str {
        "llama.cpp"
    }

    /// The sequences it decodes together: `eval` asks that many rows at
    /// once, so it is batched (and priced) as served calls are. llama.cpp's
    /// logits for a sequence decoded in a batch, or after a kept prefix,
    /// can differ in the last bits from the sequence's alone, so a greedy
    /// answer on a near tie may depend on what else was in flight, in eval
    /// as in serving.
    fn max_concurrency(&self) -> usize {
        self.n_seq_max
    }
}

/// A stream over an unbounded receiver; dropping the stream drops the
/// receiver, which tells the scheduler the client has gone.
fn tokio_stream_of(
    receiver: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> impl futures::Stream<Item = Event> + Send + 'static {
    futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|event| (event, receiver)) },
    )
}

/// The shape the LoRA converter checks an adapter against.
fn model_shape(model: &LlamaModel) -> lora::ModelShape {
    lora::ModelShape {
        architecture: model.meta_val_str("general.architecture").unwrap_or_else(|_| "llama".to_string()),
        n_layer: model.n_layer() as usize,
        n_embd: model.n_embd() as usize,
        n_head: model.n_head() as usize,
        n_head_kv: model.n_head_kv() as usize,
    }
}

/// A clear error for a path that is missing or is not GGUF, before llama.cpp sees it.
fn check_gguf_file(path: &Path) -> Result<(), EngineError> {
    use std::io::Read;
    if !path.exists() {
        return Err(EngineError::Missing { path: path.to_path_buf() });
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)
        .map_err(|error| EngineError::NotGguf { path: path.to_path_buf(), reason: error.to_string() })?;
    file.read_exact(&mut magic)
        .map_err(|_| EngineError::NotGguf { path: path.to_path_buf(), reason: "the file is too short".into() })?;
    if &magic != b"GGUF" {
        return Err(EngineError::NotGguf { path: path.to_path_buf(), reason: "it does not start with `GGUF`".into() });
    }
    Ok(())
}
