//! What the integration tests of local models share: the real models'
//! folder and a gateway with the local loader on a real socket.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use understudy_local::Loader;
use understudy_store::{CallFilter, Recorder, RecorderConfig, RecorderHandle, Store};
use understudy_types::CallRecord;

/// The folder `scripts/fetch-models.sh` fills (`UNDERSTUDY_MODELS_DIR`);
/// `None`, with a message, when it is not set, except under CI.
pub fn models_dir() -> Option<PathBuf> {
    match std::env::var_os("UNDERSTUDY_MODELS_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_MODELS_DIR (scripts/test.sh does)");
            eprintln!("skipped: set UNDERSTUDY_MODELS_DIR to the folder scripts/fetch-models.sh fills");
            None
        }
    }
}

/// A gateway serving `understudy.toml` from `dir` (a SQLite store there,
/// then `config`), with the local loader and a policy watcher.
pub struct Gateway {
    pub addr: SocketAddr,
    pub store: Store,
    pub client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    watch: tokio::task::JoinHandle<()>,
    recorder: RecorderHandle,
}

impl Gateway {
    pub async fn start(dir: &Path, config: &str) -> Gateway {
        // A loopback gateway for tests of models, not of keys.
        let text = format!(
            "[store]\nurl = \"sqlite://{}\"\n\n[server]\nauth = \"none\"\n\n{config}",
            dir.join("gw.db").display()
        );
        let config_path = dir.join("understudy.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = understudy_config::Config::load(&config_path).unwrap();
        let store = Store::connect(&config.store.url).await.unwrap();
        let (recorder, handle) = Recorder::start(
            store.clone(),
            RecorderConfig { queue_capacity: 64, batch_size: 16, ..RecorderConfig::default() },
        );
        let state = understudy_gateway::AppState::with_local_models(config, recorder, Some(Arc::new(Loader))).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watch =
            understudy_gateway::spawn_policy_watch(state.clone(), store.clone(), std::time::Duration::from_millis(50));
        let server = tokio::spawn(understudy_gateway::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Gateway { addr, store, client: reqwest::Client::new(), stop, server, watch, recorder: handle }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` and returns the status and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.client.post(self.url(path)).json(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Stops the server, lets the recorder drain, and returns every record.
    pub async fn finish(self) -> Vec<CallRecord> {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
        self.watch.abort();
        let _ = self.watch.await;
        self.recorder.shutdown().await;
        self.store.list_calls(&CallFilter::default()).await.unwrap()
    }
}
