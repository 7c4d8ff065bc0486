//! `hf:` model paths against a hub served from 127.0.0.1: an HF model
//! directory (sharded weights) and a GGUF file are downloaded into the cache
//! and loaded; a missing repository or an unreachable hub fails naming the URL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use understudy_engine::hub::HubOptions;
use understudy_engine::testing::{write_tiny_llama, TinyLlama};
use understudy_local::Loader;
use understudy_providers::{ChatRequest, EmbeddingRequest, LocalModel, LocalModelSpec};
use understudy_trainer::testing::write_tiny_bert_dir;

/// A hub: repositories (`org/name@revision`) served from folders, the
/// requests it received, and the repositories that need a token.
#[derive(Default)]
struct Hub {
    repos: HashMap<String, PathBuf>,
    private: HashMap<String, String>,
    requests: Mutex<Vec<(String, Option<String>)>>,
}

async fn serve_file(State(hub): State<Arc<Hub>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let auth = request.headers().get("authorization").map(|value| value.to_str().unwrap().to_string());
    hub.requests.lock().unwrap().push((path.clone(), auth.clone()));
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [org, name, "resolve", revision, file] = parts.as_slice() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let repo = format!("{org}/{name}");
    if let Some(token) = hub.private.get(&repo) {
        if auth.as_deref() != Some(format!("Bearer {token}").as_str()) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    let Some(dir) = hub.repos.get(&format!("{repo}@{revision}")) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match std::fs::read(dir.join(file)) {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves `hub` on 127.0.0.1 and returns its endpoint.
async fn start_hub(hub: Arc<Hub>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(serve_file).with_state(hub);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn options(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions { endpoint: endpoint.to_string(), token: None, cache_dir: Some(cache.to_path_buf()), offline: false }
}

fn spec(path: &str) -> LocalModelSpec {
    LocalModelSpec {
        name: "m".into(),
        path: path.into(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    }
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

/// Loading is blocking (downloads run on their own thread and runtime).
async fn load(path: &str, hub: HubOptions) -> Result<Arc<dyn LocalModel>, String> {
    let spec = spec(path);
    tokio::task::spawn_blocking(move || Loader.load_from(&spec, &hub).map_err(|error| error.to_string())).await.unwrap()
}

async fn embed(model: &dyn LocalModel, input: &str) -> Vec<f64> {
    let request = EmbeddingRequest { body: object(json!({"model": "m", "input": input})) };
    let body: Value = serde_json::from_slice(&model.embed(request).await.unwrap().body).unwrap();
    body.pointer("/data/0/embedding").unwrap().as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Splits `dir/model.safetensors` into two shards and an index, as large
/// checkpoints come.
fn shard(dir: &Path) {
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut weight_map = Map::new();
    for part in 0..2 {
        let file = format!("model-{:05}-of-00002.safetensors", part + 1);
        let tensors: HashMap<String, candle_core::Tensor> = names
            .iter()
            .enumerate()
            .filter(|(index, _)| index % 2 == part)
            .map(|(_, name)| ((*name).clone(), weights[*name].clone()))
            .collect();
        for name in tensors.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), json!({"weight_map": weight_map}).to_string()).unwrap();
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn hub_models_download_into_the_cache_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    write_tiny_bert_dir(&bert, &["cat", "dog", "red", "blue"], 7).unwrap();
    let local = load(&bert.display().to_string(), options("http://unused", dir.path())).await.unwrap();
    let expected = embed(local.as_ref(), "red cat").await;
    shard(&bert);
    let gguf_repo = dir.path().join("gguf");
    std::fs::create_dir_all(gguf_repo.join("q")).unwrap();
    write_tiny_llama(&gguf_repo.join("q/tiny.gguf"), &TinyLlama::default()).unwrap();
    let hub = Arc::new(Hub {
        repos: HashMap::from([("acme/tiny-bert@main".into(), bert.clone()), ("acme/tiny-llama@v1".into(), gguf_repo)]),
        private: HashMap::from([("acme/tiny-llama".into(), "hf_secret".into())]),
        ..Hub::default()
    });
    let endpoint = start_hub(hub.clone()).await;
    let cache = dir.path().join("cache");

    // An HF directory with sharded weights.
    let model = load("hf:acme/tiny-bert", options(&endpoint, &cache)).await.unwrap();
    assert_eq!(embed(model.as_ref(), "red cat").await, expected);
    let repo_cache = cache.join("models--acme--tiny-bert/main");
    assert_eq!(
        files_under(&repo_cache),
        [
            ".complete",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ],
        "no partial downloads are left behind"
    );
    let requested: Vec<String> = hub.requests.lock().unwrap().iter().map(|(path, _)| path.clone()).collect();
    assert!(requested.contains(&"/acme/tiny-bert/resolve/main/tokenizer_config.json".to_string()));
    assert!(requested.contains(&"/acme/tiny-bert/resolve/main/model.safetensors".to_string()));

    // Loaded again, from the cache: the hub is not asked (not even for the
    // tokenizer_config.json it does not have).
    let before = hub.requests.lock().unwrap().len();
    let again = load("hf:acme/tiny-bert", options(&endpoint, &cache)).await.unwrap();
    assert_eq!(embed(again.as_ref(), "red cat").await, expected);
    assert_eq!(hub.requests.lock().unwrap().len(), before);

    // A GGUF file at a revision, in a private repository: refused without a
    // token, fetched with it.
    let error = load("hf:acme/tiny-llama/q/tiny.gguf@v1", options(&endpoint, &cache)).await.unwrap_err();
    assert!(error.contains(&format!("{endpoint}/acme/tiny-llama/resolve/v1/q/tiny.gguf")), "{error}");
    assert!(error.contains("HF_TOKEN"), "{error}");
    let with_token = HubOptions { token: Some("hf_secret".into()), ..options(&endpoint, &cache) };
    let model = load("hf:acme/tiny-llama/q/tiny.gguf@v1", with_token).await.unwrap();
    let request = ChatRequest {
        body: object(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})),
    };
    let body: Value = serde_json::from_slice(&model.chat(request).await.unwrap().body).unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert!(body.pointer("/usage/completion_tokens").unwrap().as_u64().unwrap() <= 4, "{body}");
    assert!(cache.join("models--acme--tiny-llama/v1/q/tiny.gguf").is_file());
    let last = hub.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.1.as_deref(), Some("Bearer hf_secret"));
}

#[tokio::test]
async fn a_missing_model_or_an_unreachable_hub_names_the_url_and_suggests_a_local_path() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = start_hub(Arc::new(Hub::default())).await;
    let error = load("hf:acme/nothing-here", options(&endpoint, dir.path())).await.unwrap_err();
    assert!(error.contains(&format!("{endpoint}/acme/nothing-here/resolve/main/config.json")), "{error}");
    assert!(error.contains("404"), "{error}");
    assert!(error.contains("set `path` to its local folder"), "{error}");

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{closed}");
    let error = load("hf:acme/anything@v2", options(&endpoint, dir.path())).await.unwrap_err();
    assert!(error.contains(&format!("{endpoint}/acme/anything/resolve/v2/config.json")), "{error}");
    assert!(error.contains("set `path` to its local folder"), "{error}");

    let offline = HubOptions { offline: true, ..options(&endpoint, dir.path()) };
    let error = load("hf:acme/anything", offline).await.unwrap_err();
    assert!(error.contains("HF_HUB_OFFLINE"), "{error}");
    assert!(files_under(dir.path()).is_empty(), "nothing was written: {:?}", files_under(dir.path()));
}
