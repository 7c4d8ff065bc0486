//! The gateway: an OpenAI-compatible HTTP front door that records every call.
//!
//! A request comes in on a socket with a gateway key (`auth`; 401 without a
//! usable one), is checked against the OpenAI schema, has its `model`
//! resolved (a model, or `task:NAME` for a task's lead) and checked against
//! the key's scope (403), is admitted by the key's limits and budget
//! (`limits`; 429), goes to the provider, and its answer goes back to the
//! client. The finished
//! [`CallRecord`](understudy_types::CallRecord) is handed to the recorder's
//! bounded queue; the store writes it later, off the response path.

mod assemble;
mod audit;
pub mod auth;
mod chat;
mod completions;
mod draft;
mod embeddings;
mod error;
mod feedback;
pub mod limits;
mod metrics;
mod relay;
mod request;
mod responses;
mod routing;
mod shared_limits;
pub mod telemetry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::json;
use understudy_config::Config;
use understudy_providers::{AnyProvider, LocalLoader, ProviderError};
use understudy_store::Recorder;

pub use auth::spawn_key_watch;
pub use error::GatewayError;
pub use feedback::CALL_ID_HEADER;
pub use routing::{spawn_policy_watch, spawn_retention};

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    providers: HashMap<String, Arc<AnyProvider>>,
    recorder: Recorder,
    models_body: Bytes,
    /// Each listed model's object, by id, for `GET /v1/models/{id}`.
    model_objects: HashMap<String, Bytes>,
    routes: routing::RouteTable,
    local_loader: Option<Arc<dyn LocalLoader>>,
    /// Work that outlives a response (stream relays, records waiting for a
    /// shadow answer); `serve` waits for it before returning.
    background: tokio_util::task::TaskTracker,
    /// Call ids handed to clients lately, whose records may still be queued.
    recent_calls: feedback::RecentCalls,
    /// The gateway keys, by hash.
    keys: auth::KeyCache,
    /// Each key's rate limits and budget.
    limiter: limits::Limiter,
    metrics: metrics::Metrics,
}

impl AppState {
    /// Builds every configured provider; a provider that cannot start (a
    /// missing replay file, say) fails here, naming the file.
    pub fn new(config: Config, recorder: Recorder) -> Result<AppState, ProviderError> {
        AppState::with_local_models(config, recorder, None)
    }

    /// Like [`AppState::new`], with a loader for the models of `local`
    /// providers (the binary supplies one; this crate links no ML stack).
    pub fn with_local_models(
        config: Config,
        recorder: Recorder,
        loader: Option<Arc<dyn LocalLoader>>,
    ) -> Result<AppState, ProviderError> {
        let mut providers = HashMap::new();
        for (name, provider_config) in &config.providers {
            let provider = AnyProvider::from_config(name, provider_config, &config.models, loader.as_deref())?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        let model_objects = model_objects(&config);
        let models_body = models_list(&model_objects);
        let limiter = limits::Limiter::new(config.server.limits_redis_url.as_deref()).map_err(|error| {
            ProviderError::Setup { provider: "limits_redis_url".into(), message: error.to_string() }
        })?;
        let routes = routing::RouteTable::default();
        let state = AppState {
            inner: Arc::new(Inner {
                config,
                providers,
                recorder,
                models_body,
                model_objects: model_objects
                    .into_iter()
                    .map(|(id, object)| (id, Bytes::from(object.to_string())))
                    .collect(),
                routes,
                local_loader: loader,
                background: tokio_util::task::TaskTracker::new(),
                recent_calls: feedback::RecentCalls::default(),
                keys: auth::KeyCache::default(),
                limiter,
                metrics: metrics::Metrics::default(),
            }),
        };
        state.install_config_routes()?;
        Ok(state)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn recorder(&self) -> &Recorder {
        &self.inner.recorder
    }

    pub(crate) fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// Runs work that outlives a response; `serve` waits for it on shutdown.
    pub(crate) fn spawn_background<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.background.spawn(task);
    }

    fn provider(&self, name: &str) -> Result<&Arc<AnyProvider>, GatewayError> {
        self.inner.providers.get(name).ok_or_else(|| {
            GatewayError::Provider(ProviderError::Setup {
                provider: name.to_string(),
                message: "provider is not configured".to_string(),
            })
        })
    }
}

/// The gateway's routes.
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// The gateway's routes and `extra` ones (the dashboard's), which share the
/// state, its keys and the body limit.
pub fn app_with(state: AppState, extra: Router<AppState>) -> Router {
    let max_body_bytes = state.config().server.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/feedback", post(feedback::feedback))
        .route("/v1/models", get(list_models))
        // A wildcard, because model names may hold slashes (`org/model`).
        .route("/v1/models/{*id}", get(retrieve_model))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        .merge(extra)
        .fallback(route_not_found)
        .method_not_allowed_fallback(route_not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish (idle connections close at once).
///
/// Each connection is hyper's HTTP/1 server with `header_read_timeout`:
/// a client must send a request's headers within it, and the clock also
/// runs while a kept-alive connection waits for its next request, so slow
/// or idle clients cannot hold connections open. The body's own deadline is
/// `body_read_timeout` (see `request::RequestBody`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, Router::new(), shutdown).await
}

/// [`serve`] with `extra` routes beside the gateway's ([`app_with`]).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    extra: Router<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_read_timeout = state.config().server.header_read_timeout;
    let background = state.inner.background.clone();
    let service = hyper_util::service::TowerToHyperService::new(app_with(state, extra));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are written in one go; Nagle's algorithm would only hold them back.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    // Relays and records of calls already answered still finish.
    background.close();
    background.wait().await;
    Ok(())
}

/// The object `/v1/models` lists for each id, in the config's order:
/// configured models, then `task:NAME` for each task.
fn model_objects(config: &Config) -> Vec<(String, serde_json::Value)> {
    let mut objects = Vec::new();
    for (name, model) in &config.models {
        objects.push((name.clone(), json!({"id": name, "object": "model", "created": 0, "owned_by": model.provider})));
    }
    for (name, task) in &config.tasks {
        let id = format!("task:{name}");
        let object = json!({
            "id": id, "object": "model", "created": 0,
            "owned_by": "understudy", "lead": task.lead, "understudy": task.understudy,
        });
        objects.push((id, object));
    }
    objects
}

fn models_list(objects: &[(String, serde_json::Value)]) -> Bytes {
    let data: Vec<&serde_json::Value> = objects.iter().map(|(_, object)| object).collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

async fn list_models(State(state): State<AppState>, _caller: auth::Caller) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], state.inner.models_body.clone()).into_response()
}

/// `GET /v1/models/{id}`: the object `/v1/models` lists for `id`, or 404.
async fn retrieve_model(
    State(state): State<AppState>,
    _caller: auth::Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.inner.model_objects.get(&id) {
        Some(object) => ([(header::CONTENT_TYPE, "application/json")], object.clone()).into_response(),
        None => GatewayError::ModelNotFound(id).into_response(),
    }
}

/// Prometheus' page; an admin key is needed when keys are on.
async fn metrics_page(State(state): State<AppState>, caller: auth::Caller) -> Response {
    if !caller.is_admin() {
        return GatewayError::Forbidden("/metrics needs an admin key (`understudy keys create --admin`).".into())
            .into_response();
    }
    match state.metrics().render(&state) {
        Ok(page) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render the metrics page");
            GatewayError::Internal.into_response()
        }
    }
}

/// `{"status":"ok"}` for anyone (load balancers probe without a key); the
/// queue, the tasks' routes and their audits for an admin key, or for
/// anyone when keys are off.
async fn healthz(State(state): State<AppState>, caller: Result<auth::Caller, GatewayError>) -> Response {
    if !caller.as_ref().is_ok_and(auth::Caller::is_admin) {
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response();
    }
    let policies: serde_json::Map<String, serde_json::Value> =
        state.config().tasks.keys().filter_map(|task| Some((task.clone(), state.task_status(task)?))).collect();
    let stats = state.recorder().stats();
    let body = json!({
        "status": "ok",
        "records_pending": stats.pending(),
        "records_written": stats.written.load(std::sync::atomic::Ordering::Relaxed),
        "records_dead_lettered": stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
        "records_lost_with_deleted_store_file": stats.lost_with_deleted_file.load(std::sync::atomic::Ordering::Relaxed),
        "tasks": policies,
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

impl AppState {
    /// A task's route as this gateway serves it now: policy, understudy, the
    /// audits' figures against its target, and a standing demotion. What
    /// `/healthz` and the dashboard show.
    pub fn task_status(&self, task: &str) -> Option<serde_json::Value> {
        let route = self.route(task)?;
        let understudy = route.understudy.as_ref().map(|understudy| understudy.name.clone());
        let config = self.config().tasks.get(task)?;
        let audits = route.guardrail.summary(config.target_agreement, config.guardrail_delta);
        Some(json!({"policy": route.policy.name(), "understudy": understudy, "audits": audits,
                    "demoted": route.demotion}))
    }
}

async fn route_not_found(request: Request) -> GatewayError {
    GatewayError::RouteNotFound { method: request.method().to_string(), path: request.uri().path().to_string() }
}
