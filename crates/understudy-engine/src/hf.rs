//! HF causal-LM checkpoints (Llama, Qwen2) converted to GGUF for llama.cpp.
//!
//! An HF directory holds `config.json`, `tokenizer.json` (with an optional
//! `tokenizer_config.json` carrying `chat_template`, `bos_token`,
//! `eos_token`) and the weights in `*.safetensors` (one file, or shards named
//! by `model.safetensors.index.json`), in F32, F16 or BF16.
//!
//! Weights: HF names map to llama.cpp's (`model.layers.{i}.self_attn.q_proj`
//! to `blk.{i}.attn_q`, ...). Matrices are written as F16 (GGML type 1),
//! norms and biases as F32. For the `llama` architecture the rows of the q
//! and k projections (weights and biases) are reordered head by head from
//! HF's rotate-half layout to the interleaved pairs llama.cpp's rope rotates
//! ([`crate::lora::permute_rows_for_rope`], the same function the LoRA
//! converter applies to `lora_B` of q/k, so a PEFT adapter stays consistent
//! with its converted base). `qwen2` keeps HF's order (llama.cpp's rope for
//! it is the "neox" one) and carries q/k/v biases. Tied embeddings mean no
//! `output.weight`: llama.cpp reuses `token_embd.weight`.
//!
//! Tokenizer: only byte-level BPE (`tokenizer.ggml.model = "gpt2"`), with
//! every token by id (the BPE vocabulary and `added_tokens`; ids up to the
//! model's `vocab_size` nobody uses are `[PAD{id}]`), token types (1 normal,
//! 3 control for special added tokens, 4 user-defined for the others, 5
//! unused for padding), the merges as `"a b"` strings, and
//! `tokenizer.ggml.pre` read off the pre-tokenizer so that llama.cpp splits
//! text with the same regex.
//!
//! [`gguf_for_dir`] caches the converted file under `$UNDERSTUDY_CACHE/gguf`
//! (else `$XDG_CACHE_HOME/understudy/gguf`, else
//! `~/.cache/understudy/gguf`), named by a hash of the directory's path and
//! its files' names, sizes and modification times, written to a temporary
//! file and renamed, so a restart reuses it and a changed checkpoint is
//! converted again.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::gguf::{GgufValue, GgufWriter, TensorData};
use crate::lora::permute_rows_for_rope;

/// Bumped whenever the converter's output changes, so old cache entries are not reused.
const CONVERTER_VERSION: u32 = 1;

/// Why an HF directory could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("`{path}` does not exist")]
    Missing { path: PathBuf },
    #[error("cannot convert `{path}` to GGUF: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the converted model `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn invalid(path: &Path, message: impl Into<String>) -> ConvertError {
    ConvertError::Invalid { path: path.to_path_buf(), message: message.into() }
}

/// The HF architectures the engine converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArchitecture {
    Llama,
    Qwen2,
}

impl HfArchitecture {
    /// llama.cpp's `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            HfArchitecture::Llama => "llama",
            HfArchitecture::Qwen2 => "qwen2",
        }
    }
}

/// The architecture a parsed `config.json` describes (`architectures`
/// first, then `model_type`), or a message naming what it holds instead.
pub fn architecture_of(config: &Value) -> Result<HfArchitecture, UnsupportedArchitecture> {
    let names: Vec<&str> =
        config.get("architectures").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    for name in &names {
        match *name {
            "LlamaForCausalLM" => return Ok(HfArchitecture::Llama),
            "Qwen2ForCausalLM" => return Ok(HfArchitecture::Qwen2),
            _ => {}
        }
    }
    let model_type = config.get("model_type").and_then(Value::as_str);
    match model_type {
        Some("llama") => Ok(HfArchitecture::Llama),
        Some("qwen2") => Ok(HfArchitecture::Qwen2),
        _ => Err(UnsupportedArchitecture {
            model_type: model_type.unwrap_or("(none)").to_string(),
            architectures: names.iter().map(|name| name.to_string()).collect(),
        }),
    }
}

/// A `config.json` whose architecture the llama.cpp engine does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "model_type `{model_type}` (architectures {architectures:?}) is not served by the llama.cpp engine: it converts \
     llama and qwen2 causal LMs (LlamaForCausalLM, Qwen2ForCausalLM)"
)]
pub struct UnsupportedArchitecture {
    pub model_type: String,
    pub architectures: Vec<String>,
}

/// Reads `dir/config.json` as JSON.
fn read_json(path: &Path) -> Result<Value, ConvertError> {
    if !path.is_file() {
        return Err(ConvertError::Missing { path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path).map_err(|error| invalid(path, error.to_string()))?;
    serde_json::from_str(&text).map_err(|error| invalid(path, format!("not JSON: {error}")))
}

/// The folder converted models are cached in.
pub fn cache_dir() -> Option<PathBuf> {
    cache_root().map(|root| root.join("gguf"))
}

/// Understudy's cache folder: `$UNDERSTUDY_CACHE`, else
/// `$XDG_CACHE_HOME/understudy`, else `~/.cache/understudy`.
pub fn cache_root() -> Option<PathBuf> {
    let from_env = |key: &str| std::env::var_os(key).filter(|value| !value.is_empty()).map(PathBuf::from);
    if let Some(dir) = from_env("UNDERSTUDY_CACHE") {
        return Some(dir);
    }
    if let Some(dir) = from_env("XDG_CACHE_HOME") {
        return Some(dir.join("understudy"));
    }
    from_env("HOME").map(|home| home.join(".cache").join("understudy"))
}

/// The files of `dir` that decide its conversion.
fn source_files(dir: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let entries = std::fs::read_dir(dir).map_err(|error| invalid(dir, error.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            name.ends_with(".safetensors")
                || matches!(
                    name,
                    "config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "model.safetensors.index.json"
                        | "chat_template.jinja"
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// FNV-1a over bytes, 64 bits, from a given basis (two bases give 128 bits).
fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(basis, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Where the converted GGUF of `dir` is (or would be) cached: a name that
/// changes with the directory's path and its files' sizes and modification times.
pub fn cache_path(dir: &Path) -> Result<PathBuf, ConvertError> {
    let cache = cache_dir().ok_or_else(|| {
        invalid(dir, "no cache folder for the converted model: set UNDERSTUDY_CACHE (or HOME)".to_string())
    })?;
    let canonical = std::fs::canonicalize(dir).map_err(|_| ConvertError::Missing { path: dir.to_path_buf() })?;
    let mut key = format!("understudy-hf-gguf v{CONVERTER_VERSION}\n{}\n", canonical.display());
    for file in source_files(&canonical)? {
        let meta = std::fs::metadata(&file).map_err(|error| invalid(&file, error.to_string()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |elapsed| elapsed.as_nanos());
        let name = file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        key.push_str(&format!("{name} {} {mtime}\n", meta.len()));
    }
    Ok(cache.join(cached_name(&canonical, &key, "gguf")))
}

/// A cache file name for `source`: its sanitized file name, a hash of `key`
/// (what the cached file depends on) and `extension`.
pub(crate) fn cached_name(source: &Path, key: &str, extension: &str) -> String {
    let hash = format!(
        "{:016x}{:016x}",
        fnv1a(0xcbf2_9ce4_8422_2325, key.as_bytes()),
        fnv1a(0x6c62_272e_07bb_0142, key.as_bytes())
    );
    let stem = source
        .file_name()
        .map(|name| {
            name.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect()
        })
        .unwrap_or_else(|| String::from("model"));
    format!("{stem}-{hash}.{extension}")
}

/// The GGUF file serving the HF directory `dir`: the cached conversion if
/// there is one, else a fresh conversion written to the cache.
pub fn gguf_for_dir(dir: &Path) -> Result<PathBuf, ConvertError> {
    let target = cache_path(dir)?;
    if target.is_file() {
        tracing::debug!(dir = %dir.display(), gguf = %target.display(), "reusing the converted model");
        return Ok(target);
    }
    let started = std::time::Instant::now();
    let writer = convert_dir(dir)?;
    let folder = target.parent().unwrap_or(Path::new("."));
    let io = |source| ConvertError::Io { path: target.clone(), source };
    std::fs::create_dir_all(folder).map_err(io)?;
    let mut file = tempfile::Builder::new().prefix(".converting-").suffix(".gguf").tempfile_in(folder).map_err(io)?;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file.as_file_mut());
        writer.write_to(&mut out).and_then(|()| out.flush()).map_err(io)?;
    }
    file.persist(&target).map_err(|error| io(error.error))?;
    tracing::info!(dir = %dir.display(), gguf = %target.display(), seconds = started.elapsed().as_secs_f64(),
        "converted an HF checkpoint to GGUF");
    Ok(target)
}

/// The model's hyper-parameters read from `config.json`.
#[derive(Debug, Clone)]
struct ModelConfig {
    arch: HfArchitecture,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    explicit_head_dim: bool,
    rms_norm_eps: f64,
    rope_theta: f64,
    context_length: usize,
    tie_word_embeddings: bool,
    rope_scaling: Option<(String, f64)>,
}

fn read_config(path: &Path) -> Result<(ModelConfig, Value), ConvertError> {
    let config = read_json(path)?;
    let arch = architecture_of(&config).map_err(|error| invalid(path, error.to_string()))?;
    let usize_of = |key: &str| config.get(key).and_then(Value::as_u64).map(|value| value as usize);
    let required = |key: &str| usize_of(key).ok_or_else(|| invalid(path, format!("`{key}` is missing")));
    let hidden_size = required("hidden_size")?;
    let n_head = required("num_attention_heads")?;
    if n_head == 0 {
        return Err(invalid(path, "`num_attention_heads` is 0"));
    }
    let n_head_kv = usize_of("num_key_value_heads").unwrap_or(n_head);
    let head_dim = usize_of("head_dim").unwrap_or(hidden_size / n_head);
    if head_dim == 0 || head_dim % 2 != 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
        return Err(invalid(
            path,
            format!("{n_head} heads of size {head_dim} over {n_head_kv} KV heads do not fit a rotary model"),
        ));
    }
    let rope_scaling = match config.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(scaling) => {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("");
            match kind {
                "default" => None,
                "linear" => {
                    let factor = scaling.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
                    Some((kind.to_string(), factor))
                }
                other => {
                    return Err(invalid(
                        path,
                        format!("rope_scaling of type `{other}` is not supported (only linear scaling is)"),
                    ))
                }
            }
        }
    };
    let model = ModelConfig {
        arch,
        vocab_size: required("vocab_size")?,
        hidden_size,
        intermediate_size: required("intermediate_size")?,
        n_layer: required("num_hidden_layers")?,
        n_head,
        n_head_kv,
        head_dim,
        explicit_head_dim: usize_of("head_dim").is_some_and(|dim| dim * n_head != hidden_size),
        rms_norm_eps: config.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
        rope_theta: config.get("rope_theta").and_then(Value::as_f64).unwrap_or(10_000.0),
        context_length: usize_of("max_position_embeddings").unwrap_or(2048),
        tie_word_embeddings: config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        rope_scaling,
    };
    Ok((model, config))
}

/// Converts the HF directory `dir` to a GGUF model, in memory.
pub fn convert_dir(dir: &Path) -> Result<GgufWriter, ConvertError> {
    if !dir.is_dir() {
        return Err(ConvertError::Missing { path: dir.to_path_buf() });
    }
    let (config, config_json) = read_config(&dir.join("config.json"))?;
    let arch = config.arch.gguf_name();
    let mut writer = GgufWriter::new();
    let name = dir.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| arch.to_string());
    writer.add("general.architecture", GgufValue::String(arch.into()));
    writer.add("general.name", GgufValue::String(name));
    writer.add("general.file_type", GgufValue::U32(1)); // mostly F16
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let u32_of = |value: usize| GgufValue::U32(value as u32);
    writer.add(&key("context_length"), u32_of(config.context_length));
    writer.add(&key("embedding_length"), u32_of(config.hidden_size));
    writer.add(&key("block_count"), u32_of(config.n_layer));
    writer.add(&key("feed_forward_length"), u32_of(config.intermediate_size));
    writer.add(&key("attention.head_count"), u32_of(config.n_head));
    writer.add(&key("attention.head_count_kv"), u32_of(config.n_head_kv));
    writer.add(&key("attention.layer_norm_rms_epsilon"), GgufValue::F32(config.rms_norm_eps as f32));
    writer.add(&key("rope.freq_base"), GgufValue::F32(config.rope_theta as f32));
    writer.add(&key("rope.dimension_count"), u32_of(config.head_dim));
    writer.add(&key("vocab_size"), u32_of(config.vocab_size));
    if config.explicit_head_dim {
        writer.add(&key("attention.key_length"), u32_of(config.head_dim));
        writer.add(&key("attention.value_length"), u32_of(config.head_dim));
    }
    if let Some((kind, factor)) = &config.rope_scaling {
        writer.add(&key("rope.scaling.type"), GgufValue::String(kind.clone()));
        writer.add(&key("rope.scaling.factor"), GgufValue::F32(*factor as f32));
    }
    add_tokenizer(&mut writer, dir, &config, &config_json)?;
    add_weights(&mut writer, dir, &config)?;
    Ok(writer)
}

/// A token named in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(text) => Some(text),
        other => other.get("content").and_then(Value::as_str),
    }
}

/// A token id in `config.json`: a number or a list of numbers (the first).
fn token_id(value: Option<&Value>) -> Option<u32> {
    match value? {
        Value::Array(items) => items.first().and_then(Value::as_u64).map(|id| id as u32),
        other => other.as_u64().map(|id| id as u32),
    }
}

// The pre-tokenizer regexes of Qwen2's and Llama 3's tokenizer.json.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn is_type(value: &Value, kind: &str) -> bool {
    value.get("type").and_then(Value::as_str) == Some(kind)
}

/// Whether a ByteLevel pre-tokenizer applies GPT-2's own regex (the default).
fn byte_level_regex(value: &Value) -> bool {
    value.get("use_regex").and_then(Value::as_bool).unwrap_or(true)
}

/// llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json `pre_tokenizer`:
/// the one whose built-in regexes split text the same way, or `None`.
pub fn pre_tokenizer_name(pre: &Value) -> Option<&'static str> {
    let steps: Vec<&Value> = if is_type(pre, "Sequence") {
        pre.get("pretokenizers").and_then(Value::as_array)?.iter().collect()
    } else {
        vec![pre]
    };
    match steps[..] {
        [byte_level] if is_type(byte_level, "ByteLevel") && byte_level_regex(byte_level) => Some("gpt-2"),
        [digits, byte_level]
            if is_type(digits, "Digits")
                && digits.get("individual_digits").and_then(Value::as_bool) == Some(true)
                && is_type(byte_level, "ByteLevel")
                && byte_level_regex(byte_level) =>
        {
            Some("smollm")
        }
        [split, byte_level]
            if is_type(split, "Split") && is_type(byte_level, "ByteLevel") && !byte_level_regex(byte_level) =>
        {
            let regex = split.pointer("/pattern/Regex").and_then(Value::as_str)?;
            if regex == QWEN2_REGEX {
                Some("qwen2")
            } else if regex == LLAMA3_REGEX {
                Some("llama-bpe")
            } else {
                None
            }
        }
        _ => None,
    }
}

fn mentions_byte_level(value: Option<&Value>) -> bool {
    match value {
        Some(value) if is_type(value, "ByteLevel") => true,
        Some(value) => value
            .get("pretokenizers")
            .or_else(|| value.get("decoders"))
            .and_then(Value::as_array)
            .is_some_and(|steps| steps.iter().any(|step| is_type(step, "ByteLevel"))),
        None => false,
    }
}

const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

fn add_tokenizer(
    writer: &mut GgufWriter,
    dir: &Path,
    config: &ModelConfig,
    config_json: &Value,
) -> Result<(), ConvertError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        let sentencepiece = dir.join("tokenizer.model");
        if sentencepiece.is_file() {
            return Err(invalid(
                &sentencepiece,
                "SentencePiece tokenizers (tokenizer.model without tokenizer.json) are not supported: the engine \
                 converts byte-level BPE tokenizers from tokenizer.json",
            ));
        }
        return Err(ConvertError::Missing { path });
    }
    let tokenizer = read_json(&path)?;
    let model = tokenizer.get("model").ok_or_else(|| invalid(&path, "no `model`"))?;
    let kind = model.get("type").and_then(Value::as_str).unwrap_or(if model.get("merges").is_some() {
        "BPE"
    } else {
        "(none)"
    });
    if kind != "BPE" {
        return Err(invalid(
            &path,
            format!("tokenizer model `{kind}` is not supported: only byte-level BPE (GPT-2 style) tokenizers are"),
        ));
    }
    if !mentions_byte_level(tokenizer.get("pre_tokenizer")) && !mentions_byte_level(tokenizer.get("decoder")) {
        return Err(invalid(
            &path,
            "a BPE tokenizer without a ByteLevel pre-tokenizer (SentencePiece-style, Metaspace/byte fallback) is not \
             supported: only byte-level BPE (GPT-2 style) tokenizers are",
        ));
    }
    let vocab = model.get("vocab").and_then(Value::as_object).ok_or_else(|| invalid(&path, "no `model.vocab`"))?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| invalid(&path, format!("token {token:?} has no numeric id")))? as usize;
        by_id.insert(id, (token.clone(), TOKEN_NORMAL));
    }
    for added in tokenizer.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        let (Some(id), Some(content)) = (added.get("id").and_then(Value::as_u64), added.get("content")) else {
            return Err(invalid(&path, "an added token has no id or content"));
        };
        let content = content.as_str().unwrap_or_default().to_string();
        let special = added.get("special").and_then(Value::as_bool).unwrap_or(false);
        by_id.insert(id as usize, (content, if special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED }));
    }
    let highest = by_id.keys().next_back().copied().unwrap_or(0);
    if highest >= config.vocab_size {
        return Err(invalid(
            &path,
            format!("token id {highest} is outside the model's vocab_size {} (config.json)", config.vocab_size),
        ));
    }
    let mut tokens = Vec::with_capacity(config.vocab_size);
    let mut types = Vec::with_capacity(config.vocab_size);
    for id in 0..config.vocab_size {
        match by_id.remove(&id) {
            Some((token, kind)) => {
                tokens.push(token);
                types.push(kind);
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(TOKEN_UNUSED);
            }
        }
    }
    let merges: Vec<String> = match model.get("merges").and_then(Value::as_array) {
        Some(merges) => merges
            .iter()
            .map(|merge| match merge {
                Value::String(text) => Ok(text.clone()),
                Value::Array(pair) => match &pair[..] {
                    [Value::String(a), Value::String(b)] => Ok(format!("{a} {b}")),
                    _ => Err(invalid(&path, format!("merge {merge} is not a pair of strings"))),
                },
                other => Err(invalid(&path, format!("merge {other} is neither \"a b\" nor [\"a\", \"b\"]"))),
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let pre = match tokenizer.get("pre_tokenizer") {
        Some(pre) => pre_tokenizer_name(pre).unwrap_or_else(|| {
            tracing::warn!(path = %path.display(), pre_tokenizer = %pre,
                "no llama.cpp pre-tokenizer matches this one; using \"default\" (tokenization may differ)");
            "default"
        }),
        None => "default",
    };

    let tokenizer_config_path = dir.join("tokenizer_config.json");
    let tokenizer_config =
        if tokenizer_config_path.is_file() { read_json(&tokenizer_config_path)? } else { Value::Null };
    let id_of = |text: &str| tokens.iter().position(|token| token == text).map(|id| id as u32);
    let bos_text = token_text(tokenizer_config.get("bos_token"));
    let bos = bos_text.and_then(id_of).or_else(|| token_id(config_json.get("bos_token_id")));
    let eos = token_text(tokenizer_config.get("eos_token"))
        .and_then(id_of)
        .or_else(|| token_id(config_json.get("eos_token_id")));
    let pad = token_text(tokenizer_config.get("pad_token")).and_then(id_of);
    let add_bos = match tokenizer_config.get("add_bos_token").and_then(Value::as_bool) {
        Some(add) => add,
        None => post_processor_adds(tokenizer.get("post_processor"), bos_text),
    };
    let chat_template = match tokenizer_config.get("chat_template") {
        Some(Value::String(template)) => Some(template.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|entry| entry.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };

    writer.add("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    writer.add("tokenizer.ggml.pre", GgufValue::String(pre.into()));
    writer.add("tokenizer.ggml.tokens", GgufValue::StringArray(tokens));
    writer.add("tokenizer.ggml.token_type", GgufValue::I32Array(types));
    writer.add("tokenizer.ggml.merges", GgufValue::StringArray(merges));
    if let Some(bos) = bos {
        writer.add("tokenizer.ggml.bos_token_id", GgufValue::U32(bos));
    }
    if let Some(eos) = eos {
        writer.add("tokenizer.ggml.eos_token_id", GgufValue::U32(eos));
    }
    if let Some(pad) = pad {
        writer.add("tokenizer.ggml.padding_token_id", GgufValue::U32(pad));
    }
    writer.add("tokenizer.ggml.add_bos_token", GgufValue::Bool(add_bos && bos.is_some()));
    writer.add("tokenizer.ggml.add_eos_token", GgufValue::Bool(false));
    if let Some(template) = chat_template {
        writer.add("tokenizer.chat_template", GgufValue::String(template));
    }
    Ok(())
}

/// Whether a `TemplateProcessing` post-processor puts the BOS token first.
fn post_processor_adds(post: Option<&Value>, bos: Option<&str>) -> bool {
    let (Some(post), Some(bos)) = (post, bos) else { return false };
    let steps: Vec<&Value> = match post.get("processors").and_then(Value::as_array) {
        Some(steps) => steps.iter().collect(),
        None => vec![post],
    };
    steps
        .iter()
        .filter(|step| is_type(step, "TemplateProcessing"))
        .any(|step| step.pointer("/single/0/SpecialToken/id").and_then(Value::as_str) == Some(bos))
}

/// The llama.cpp name of an HF tensor, `Ok(None)` for tensors llama.cpp
/// does not use, and an error for names this converter does not know.
fn gguf_tensor_name(name: &str) -> Result<Option<String>, UnknownTensor> {
    if name.starts_with("model.layers.") && name.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    understudy_types::tensor_names::gguf_tensor_name(name).map(Some).ok_or_else(|| UnknownTensor(name.to_string()))
}

/// An HF tensor name this converter does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor `{0}` is not part of a Llama/Qwen2 decoder")]
struct UnknownTensor(String);

/// The safetensors files holding the weights: those the index names, else all of them.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let value = read_json(&index)?;
        let map =
            value.get("weight_map").and_then(Value::as_object).ok_or_else(|| invalid(&index, "no `weight_map`"))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(Value::as_str).map(|file| dir.join(file)).collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|file| !file.is_file()) {
            return Err(ConvertError::Missing { path: missing.clone() });
        }
        return Ok(files);
    }
    let files: Vec<PathBuf> = source_files(dir)?
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(invalid(dir, "no *.safetensors weights (PyTorch .bin checkpoints are not supported)"));
    }
    Ok(files)
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, raw: &[u8]) -> Result<Vec<f32>, ConvertError> {
    Ok(match dtype {
        Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(invalid(path, format!("tensor `{name}` has dtype {other:?}; F32, F16 and BF16 are supported")))
        }
    })
}

fn add_weights(writer: &mut GgufWriter, dir: &Path, config: &ModelConfig) -> Result<(), ConvertError> {
    let hidden = config.hidden_size;
    let q_rows = config.n_head * config.head_dim;
    let kv_rows = config.n_head_kv * config.head_dim;
    let ff = config.intermediate_size;
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    expected.insert("token_embd.weight".into(), vec![config.vocab_size, hidden]);
    expected.insert("output_norm.weight".into(), vec![hidden]);
    for layer in 0..config.n_layer {
        let name = |module: &str| format!("blk.{layer}.{module}.weight");
        expected.insert(name("attn_norm"), vec![hidden]);
        expected.insert(name("ffn_norm"), vec![hidden]);
        expected.insert(name("attn_q"), vec![q_rows, hidden]);
        expected.insert(name("attn_k"), vec![kv_rows, hidden]);
        expected.insert(name("attn_v"), vec![kv_rows, hidden]);
        expected.insert(name("attn_output"), vec![hidden, q_rows]);
        expected.insert(name("ffn_gate"), vec![ff, hidden]);
        expected.insert(name("ffn_up"), vec![ff, hidden]);
        expected.insert(name("ffn_down"), vec![hidden, ff]);
        if config.arch == HfArchitecture::Qwen2 {
            expected.insert(format!("blk.{layer}.attn_q.bias"), vec![q_rows]);
            expected.insert(format!("blk.{layer}.attn_k.bias"), vec![kv_rows]);
            expected.insert(format!("blk.{layer}.attn_v.bias"), vec![kv_rows]);
        }
    }
    let mut seen = std::collections::HashSet::new();
    for file in weight_files(dir)? {
        let bytes = std::fs::read(&file).map_err(|error| invalid(&file, error.to_string()))?;
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|error| invalid(&file, format!("not safetensors: {error}")))?;
        let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
        names.sort();
        for hf_name in names {
            let Some(gguf_name) = gguf_tensor_name(&hf_name).map_err(|error| invalid(&file, error.to_string()))? else {
                continue;
            };
            if gguf_name == "output.weight" && config.tie_word_embeddings {
                continue;
            }
            let view = tensors.tensor(&hf_name).map_err(|error| invalid(&file, error.to_string()))?;
            let shape = view.shape().to_vec();
            let want = match expected.get(&gguf_name) {
                Some(want) => want.clone(),
                None if gguf_name == "output.weight" => vec![config.vocab_size, hidden],
                // A Llama with attention_bias.
                None if gguf_name.ends_with("attn_q.bias") => vec![q_rows],
                None if gguf_name.ends_with("attn_k.bias") || gguf_name.ends_with("attn_v.bias") => vec![kv_rows],
                None if gguf_name.ends_with("attn_output.bias") => vec![hidden],
                None => return Err(invalid(&file, format!("tensor `{hf_name}` is not expected for this config"))),
            };
            if shape != want {
                return Err(invalid(
                    &file,
                    format!("tensor `{hf_name}` has shape {shape:?}, config.json implies {want:?}"),
                ));
            }
            let mut data = to_f32(&file, &hf_name, view.dtype(), view.data())?;
            if config.arch == HfArchitecture::Llama {
                let cols = shape.get(1).copied().unwrap_or(1);
                if gguf_name.contains(".attn_q.") {
                    data = permute_rows_for_rope(&data, shape[0], cols, config.n_head);
                } else if gguf_name.contains(".attn_k.") {
                    data = permute_rows_for_rope(&data, shape[0], cols, config.n_head_kv);
                }
            }
            let dims: Vec<u64> = shape.iter().rev().map(|&dim| dim as u64).collect();
            let data = if shape.len() >= 2 {
                TensorData::F16(data.into_iter().map(|value| half::f16::from_f32(value).to_bits()).collect())
            } else {
                TensorData::F32(data)
            };
            if !seen.insert(gguf_name.clone()) {
                return Err(invalid(&file, format!("tensor `{hf_name}` appears twice")));
            }
            writer.add_tensor_data(&gguf_name, &dims, data).map_err(|error| invalid(&file, error.to_string()))?;
        }
    }
    let mut missing: Vec<&String> = expected.keys().filter(|name| !seen.contains(*name)).collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(invalid(
            dir,
            format!("the weights lack {} tensor(s) the config needs, e.g. `{first}` (llama.cpp name)", missing.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_tensor_name("model.layers.3.self_attn.q_proj.weight").unwrap().unwrap(), "blk.3.attn_q.weight");
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.k_proj.bias").unwrap().unwrap(), "blk.0.attn_k.bias");
        assert_eq!(gguf_tensor_name("model.layers.1.mlp.down_proj.weight").unwrap().unwrap(), "blk.1.ffn_down.weight");
        assert_eq!(gguf_tensor_name("lm_head.weight").unwrap().unwrap(), "output.weight");
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq").unwrap(), None);
        assert!(gguf_tensor_name("model.vision_tower.weight").unwrap_err().to_string().contains("vision_tower"));
    }

    #[test]
    fn pre_tokenizers_map_to_llama_cpp_names() {
        let byte_level =
            |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": use_regex});
        assert_eq!(pre_tokenizer_name(&byte_level(true)), Some("gpt-2"));
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]});
        assert_eq!(pre_tokenizer_name(&smollm), Some("smollm"));
        let split = |regex: &str| {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false}, byte_level(false)]})
        };
        assert_eq!(pre_tokenizer_name(&split(QWEN2_REGEX)), Some("qwen2"));
        assert_eq!(pre_tokenizer_name(&split(LLAMA3_REGEX)), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&split(r"\s+")), None);
        assert_eq!(pre_tokenizer_name(&json!({"type": "Metaspace"})), None);
    }

    #[test]
    fn architectures_are_read_from_the_config_and_others_named() {
        assert_eq!(architecture_of(&json!({"architectures": ["Qwen2ForCausalLM"]})), Ok(HfArchitecture::Qwen2));
        assert_eq!(architecture_of(&json!({"model_type": "llama"})), Ok(HfArchitecture::Llama));
        let error = architecture_of(&json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}));
        assert!(error.unwrap_err().to_string().contains("mistral"));
    }

    #[test]
    fn a_sentencepiece_only_directory_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2})
            .to_string(),
        )
        .unwrap();
        std::fs::write(dir.path().join("tokenizer.model"), b"sentencepiece").unwrap();
        let error = convert_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("tokenizer.model") && error.contains("SentencePiece"), "{error}");
    }
}
