//! A gateway on a real socket, in front of the stub upstream, over a real store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
#![allow(dead_code)]

pub mod stub;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;
use understudy_config::Config;
use understudy_gateway::AppState;
use understudy_store::{CallFilter, Recorder, RecorderConfig, RecorderHandle, Store};
use understudy_types::CallRecord;

pub const TEST_KEY_VAR: &str = "UNDERSTUDY_TEST_UPSTREAM_KEY";
pub const TEST_KEY: &str = "sk-test-never-log-me-4f1d";

pub const REPLAY_LINES: &str = r#"{"messages":[{"role":"system","content":"Label the question."},{"role":"user","content":"Who wrote   Hamlet?"},{"role":"assistant","content":"HUM"}],"usage":{"prompt_tokens":9,"completion_tokens":1}}
{"messages":[{"role":"system","content":"Label the question."},{"role":"user","content":"How far is the Moon?"},{"role":"assistant","content":"NUM"}]}
"#;

pub struct Harness {
    pub base_url: String,
    pub stub: stub::Stub,
    pub store: Store,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    recorder_handle: Option<RecorderHandle>,
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

pub fn config_text(store_url: &str, stub_url: &str, dead_port: u16) -> String {
    format!(
        r#"
[store]
url = "{store_url}"
queue_capacity = 64
batch_size = 16

[server]
max_body_bytes = 65536
# Tests of other things than keys; `Harness::start_with_keys` turns them on.
auth = "none"

[providers.cloud]
type = "openai"
base_url = "{stub_url}"
api_key_env = "{TEST_KEY_VAR}"
timeout_secs = 0.5
max_retries = 2
retry_backoff_ms = 10

[providers.dead]
type = "openai"
base_url = "http://127.0.0.1:{dead_port}/v1"
max_retries = 1
retry_backoff_ms = 10

# Waits long enough for a slow answer that the client gave up on.
[providers.patient]
type = "openai"
base_url = "{stub_url}"
timeout_secs = 10
max_retries = 0

[providers.recorded]
type = "replay"
file = "calls.jsonl"

[models.gpt-4o-mini]
provider = "cloud"
name = "ok"
input_per_million = 0.15
output_per_million = 0.60

[models.no-usage]
provider = "cloud"
input_per_million = 1.0
output_per_million = 2.0

[models.flaky]
provider = "cloud"

[models.down]
provider = "cloud"

[models.slow]
provider = "cloud"

[models.reject]
provider = "cloud"

[models.ghost]
provider = "dead"

[models.abandoned]
provider = "patient"
name = "slow"
input_per_million = 1.0
output_per_million = 1.0

[models.garbage]
provider = "cloud"

[models.truncated-json]
provider = "cloud"

[models.cut-stream]
provider = "cloud"

[models.malformed-chunk]
provider = "cloud"

[models.non-sse]
provider = "cloud"

[models.huge]
provider = "cloud"

[models.reset]
provider = "cloud"

[models.rate-limited]
provider = "cloud"

[models.replayed]
provider = "recorded"
input_per_million = 1.0
output_per_million = 1.0

[models.embedder]
provider = "cloud"
name = "text-embedding-3-small"
input_per_million = 0.02

[tasks.triage]
lead = "gpt-4o-mini"

[tasks.trec]
lead = "replayed"
"#
    )
}

impl Harness {
    /// A gateway over a fresh SQLite file.
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Harness::start_with(dir, &url).await
    }

    /// A gateway over the given store URL.
    pub async fn start_with(dir: tempfile::TempDir, store_url: &str) -> Harness {
        Harness::start_configured(dir, store_url, "").await
    }

    /// A gateway over a fresh SQLite file, with `extra` appended to the config.
    pub async fn start_routed(extra: &str) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Harness::start_configured(dir, &url, extra).await
    }

    /// A gateway over a fresh SQLite file that wants keys (`auth = "keys"`).
    pub async fn start_with_keys() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Harness::start_text(dir, &url, "", |text| text.replace("auth = \"none\"", "auth = \"keys\""), None).await
    }

    /// A gateway that wants keys over `store_url`, counting their limits
    /// in the Redis at `redis_url` (which other gateways may share).
    pub async fn start_with_shared_limits(dir: tempfile::TempDir, store_url: &str, redis_url: &str) -> Harness {
        let server = format!("auth = \"keys\"\nlimits_redis_url = \"{redis_url}\"");
        Harness::start_text(dir, store_url, "", |text| text.replace("auth = \"none\"", &server), None).await
    }

    /// A gateway with `extra` appended to the test config; it polls the store
    /// for policy changes and keys every 50 ms.
    pub async fn start_configured(dir: tempfile::TempDir, store_url: &str, extra: &str) -> Harness {
        Harness::start_text(dir, store_url, extra, |text| text, None).await
    }

    /// A gateway over a fresh SQLite file, with `extra` appended to the
    /// config, whose `type = "local"` models `loader` loads.
    #[allow(dead_code)]
    pub async fn start_with_local_models(
        extra: &str,
        loader: std::sync::Arc<dyn understudy_providers::LocalLoader>,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Harness::start_text(dir, &url, extra, |text| text, Some(loader)).await
    }

    async fn start_text(
        dir: tempfile::TempDir,
        store_url: &str,
        extra: &str,
        edit: impl FnOnce(String) -> String,
        loader: Option<std::sync::Arc<dyn understudy_providers::LocalLoader>>,
    ) -> Harness {
        std::env::set_var(TEST_KEY_VAR, TEST_KEY);
        let stub = stub::Stub { keep_log: true, ..Default::default() };
        let stub_url = stub.clone().start().await;
        std::fs::write(dir.path().join("calls.jsonl"), REPLAY_LINES).expect("write replay file");
        let text = edit(config_text(store_url, &stub_url, closed_port().await) + extra);
        let config_path: PathBuf = dir.path().join("understudy.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::load(&config_path).expect("config loads");
        let store = Store::connect(&config.store.url).await.expect("store opens");
        let (recorder, recorder_handle) = Recorder::start(
            store.clone(),
            RecorderConfig {
                queue_capacity: config.store.queue_capacity,
                batch_size: config.store.batch_size,
                dead_letter_file: Some(config.store.dead_letter_file.clone()),
                spill_file: Some(config.store.spill_file.clone()),
                ..RecorderConfig::default()
            },
        );
        let state = AppState::with_local_models(config, recorder, loader).expect("state");
        state.apply_policies(&store).await.expect("policies apply");
        let watch = understudy_gateway::spawn_policy_watch(state.clone(), store.clone(), Duration::from_millis(50));
        let key_watch = understudy_gateway::spawn_key_watch(state.clone(), Duration::from_millis(50));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gateway");
        let addr = listener.local_addr().expect("gateway addr");
        let (shutdown, shutdown_rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            let signal = async move {
                let _ = shutdown_rx.await;
            };
            understudy_gateway::serve(listener, state, signal).await.expect("serve");
            watch.abort();
            key_watch.abort();
        });
        Harness {
            base_url: format!("http://{addr}/v1"),
            stub,
            store,
            dir,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
            server: Some(server),
            recorder_handle: Some(recorder_handle),
        }
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .header("authorization", "Bearer client-key-not-upstream")
            .body(body.to_string())
            .send()
            .await
            .expect("request reaches the gateway");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POSTs `body` with `key` as the bearer token (none when `None`);
    /// returns the status, the `Retry-After` header and the JSON answer.
    pub async fn post_as(&self, key: Option<&str>, path: &str, body: &Value) -> (u16, Option<String>, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base_url)).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request reaches the gateway");
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|value| value.to_str().ok()).map(str::to_string);
        let text = response.text().await.expect("body");
        (status, retry_after, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// GETs `path` (from the server's root, not `/v1`) with `key`.
    pub async fn get_as(&self, key: Option<&str>, path: &str) -> (u16, String) {
        let root = self.base_url.trim_end_matches("/v1");
        let mut request = self.client.get(format!("{root}{path}"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request reaches the gateway");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// POSTs `body` to `path`; returns the status, every header and the body's text.
    pub async fn post_full(&self, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
        let response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .json(body)
            .send()
            .await
            .expect("request reaches the gateway");
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, headers, response.text().await.expect("body"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post(path, &body.to_string()).await
    }

    /// Raw SSE text of a streamed call.
    pub async fn post_stream(&self, body: &Value) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}/chat/completions", self.base_url))
            .json(body)
            .send()
            .await
            .expect("request reaches the gateway");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Stops the gateway and waits until every record is written, then
    /// returns all calls, oldest first.
    pub async fn finish(mut self) -> (Vec<CallRecord>, Harness) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server).await.expect("server stops").expect("server task");
        }
        if let Some(handle) = self.recorder_handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle.shutdown()).await.expect("recorder drains");
        }
        let calls = self.store.list_calls(&CallFilter::default()).await.expect("list calls");
        (calls, self)
    }
}

pub fn chat_body(model: &str, content: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]})
}
