//! Which policy and which understudy each task has right now.
//!
//! A task starts with the policy and understudy of the config. The store's
//! `policy_changes` (written by `understudy promote`) override them: a watcher
//! polls the store and swaps a task's [`TaskRoute`] in place, so a running
//! gateway follows a promotion, or its undoing, without a restart. Loading a
//! new understudy happens on the watcher, never on a request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use understudy_config::Policy;
use understudy_providers::{tokens, LocalLoader, LocalModelSpec, ProviderError};
use understudy_providers::{CostModel, Understudy};
use understudy_store::{PolicyChange, Store};
use understudy_types::{Money, Price, Usage};

use crate::AppState;

/// A task's policy and the understudy it routes to.
#[derive(Debug, Clone)]
pub(crate) struct TaskRoute {
    pub policy: Policy,
    pub understudy: Option<Arc<Understudy>>,
    /// For a model version: its folder (a demotion keeps it).
    pub understudy_path: Option<String>,
    /// The store row this route came from, if any (to notice changes).
    pub change_id: Option<String>,
    /// The live audits of this route and their sequential test.
    pub guardrail: Arc<crate::audit::Guardrail>,
    /// Why the guardrail demoted the task to this route, if it did.
    pub demotion: Option<String>,
    /// The understudy's labels, when it answers with labels only.
    pub labels: Option<Arc<[String]>>,
}

impl TaskRoute {
    fn new(policy: Policy, understudy: Option<Arc<Understudy>>, understudy_path: Option<String>) -> TaskRoute {
        let labels = understudy.as_ref().and_then(|understudy| understudy.labels()).map(Arc::from);
        TaskRoute {
            policy,
            understudy,
            understudy_path,
            change_id: None,
            guardrail: Arc::default(),
            demotion: None,
            labels,
        }
    }
}

/// What the lead would have charged for a call the understudy answered.
pub(crate) fn lead_cost_of(price: Price, messages: &[Value], answer: &str) -> Money {
    let usage = Usage {
        prompt_tokens: tokens::count_messages(messages),
        completion_tokens: tokens::count_answer(&serde_json::json!({"role": "assistant", "content": answer})),
    };
    price.cost(usage)
}

/// Every task's current route, swapped whole when a policy changes.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: RwLock<HashMap<String, Arc<TaskRoute>>>,
    /// Understudies loaded from model version folders, by path.
    loaded: RwLock<HashMap<String, Arc<Understudy>>>,
}

impl RouteTable {
    pub fn get(&self, task: &str) -> Option<Arc<TaskRoute>> {
        self.routes.read().ok()?.get(task).cloned()
    }

    fn set(&self, task: &str, route: TaskRoute) {
        if let Ok(mut routes) = self.routes.write() {
            routes.insert(task.to_string(), Arc::new(route));
        }
    }
}

impl AppState {
    /// The routes the config gives, before the store says otherwise.
    pub(crate) fn install_config_routes(&self) -> Result<(), ProviderError> {
        for (task_name, task) in &self.config().tasks {
            let understudy = match &task.understudy {
                Some(model) => Some(self.config_understudy(model)?),
                None => None,
            };
            self.inner.routes.set(task_name, TaskRoute::new(task.policy, understudy, None));
        }
        Ok(())
    }

    fn config_understudy(&self, model_name: &str) -> Result<Arc<Understudy>, ProviderError> {
        let setup = |message: String| ProviderError::Setup { provider: model_name.to_string(), message };
        let model = self
            .config()
            .models
            .get(model_name)
            .ok_or_else(|| setup(format!("no model `{model_name}` in the config")))?;
        let provider = self.provider(&model.provider).map_err(|error| setup(error.to_string()))?.clone();
        let cost = CostModel::of(&provider, model.price);
        Ok(Arc::new(Understudy {
            name: model_name.to_string(),
            provider_name: model.provider.clone(),
            provider,
            request_model: model.name.clone(),
            cost,
        }))
    }

    /// A trained model version, loaded through the local loader (once per path).
    fn version_understudy(&self, name: &str, path: &str) -> Result<Arc<Understudy>, ProviderError> {
        if let Some(loaded) = self.inner.routes.loaded.read().ok().and_then(|loaded| loaded.get(path).cloned()) {
            return Ok(loaded);
        }
        let loader: &dyn LocalLoader = self.inner.local_loader.as_deref().ok_or_else(|| ProviderError::Setup {
            provider: "local".to_string(),
            message: format!("cannot load model version {name}: this gateway has no local model support"),
        })?;
        let config = self.config();
        let spec = LocalModelSpec {
            max_batch: Some(config.local_max_batch()),
            speculative_draft: Some(config.local_speculative_draft()),
            ..LocalModelSpec::new(name, path)
        };
        let (provider_name, price_per_hour) = config.machine_price();
        let understudy = Arc::new(Understudy::local(&spec, loader, provider_name, price_per_hour)?);
        if let Ok(mut loaded) = self.inner.routes.loaded.write() {
            loaded.insert(path.to_string(), understudy.clone());
        }
        Ok(understudy)
    }

    pub(crate) fn route(&self, task: &str) -> Option<Arc<TaskRoute>> {
        self.inner.routes.get(task)
    }

    pub(crate) fn set_route(&self, task: &str, route: TaskRoute) {
        self.inner.routes.set(task, route);
    }

    /// Applies the store's current policies. A change that cannot be applied
    /// (an understudy that fails to load) is logged and the task keeps its
    /// route; the next poll tries again.
    pub async fn apply_policies(&self, store: &Store) -> Result<usize, understudy_store::StoreError> {
        let changes = store.current_policies().await?;
        let mut applied = 0;
        for change in changes {
            if !self.config().tasks.contains_key(&change.task) {
                continue;
            }
            let current = self.route(&change.task);
            if current.as_ref().and_then(|route| route.change_id.as_deref()) == Some(change.id.as_str()) {
                continue;
            }
            let state = self.clone();
            let outcome =
                tokio::task::spawn_blocking(move || state.route_of_change(&change).map(|route| (change, route)))
                    .await
                    .map_err(|error| ProviderError::Setup { provider: "local".into(), message: error.to_string() });
            match outcome.and_then(|result| result) {
                Ok((change, mut route)) => {
                    // The guardrail goes on from the audits recorded since
                    // this promotion (after a restart, say).
                    match store.audit_counts(&change.task, change.created_at).await {
                        Ok((n_audited, n_agreed)) => {
                            route.guardrail = Arc::new(crate::audit::Guardrail::with_counts(n_audited, n_agreed));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot read the task's audits; the guardrail starts at zero")
                        }
                    }
                    tracing::info!(task = %change.task, policy = %change.policy, understudy = ?change.understudy, "policy applied");
                    self.inner.routes.set(&change.task, route);
                    applied += 1;
                }
                Err(error) => tracing::error!(%error, "cannot apply a policy change"),
            }
        }
        Ok(applied)
    }

    fn route_of_change(&self, change: &PolicyChange) -> Result<TaskRoute, ProviderError> {
        let bad = |message: String| ProviderError::Setup { provider: format!("task {}", change.task), message };
        let policy = Policy::parse(&change.policy, None).map_err(|error| bad(error.to_string()))?;
        let understudy = match (&change.understudy, &change.understudy_path) {
            (Some(name), Some(path)) => Some(self.version_understudy(name, path)?),
            (Some(name), None) => Some(self.config_understudy(name)?),
            (None, _) => match self.config().tasks.get(&change.task).and_then(|task| task.understudy.as_deref()) {
                Some(model) => Some(self.config_understudy(model)?),
                None => None,
            },
        };
        if policy != Policy::Lead && understudy.is_none() {
            return Err(bad(format!("policy {} needs an understudy, and none is set", change.policy)));
        }
        let mut route = TaskRoute::new(policy, understudy, change.understudy_path.clone());
        route.change_id = Some(change.id.clone());
        Ok(route)
    }
}

/// Polls the store for policy changes every `interval` until the state is dropped.
pub fn spawn_policy_watch(state: AppState, store: Store, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = state.apply_policies(&store).await {
                tracing::warn!(%error, "cannot read policy changes");
            }
        }
    })
}

/// Applies `[store]` retention now and every `interval` until aborted.
/// A failed pass is logged and tried again at the next tick.
pub fn spawn_retention(
    store: Store,
    config: &understudy_config::StoreConfig,
    interval: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    let (keep_bodies, keep_calls) = (config.keep_bodies, config.keep_calls);
    if keep_bodies.is_none() && keep_calls.is_none() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match store.prune(time::OffsetDateTime::now_utc(), keep_bodies, keep_calls).await {
                Ok(pruned) if pruned != understudy_store::Pruned::default() => tracing::info!(
                    bodies_cleared = pruned.bodies_cleared,
                    calls_deleted = pruned.calls_deleted,
                    "retention applied"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot apply retention"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_providers::{AnyProvider, ChatRequest, LocalProvider};

    /// A local model that answers with the `response_format` it was sent.
    #[derive(Debug)]
    struct EchoFormat;

    impl understudy_providers::LocalModel for EchoFormat {
        fn chat(
            &self,
            request: ChatRequest,
        ) -> futures::future::BoxFuture<'_, Result<understudy_providers::ProviderResponse, ProviderError>> {
            let format = request.body.get("response_format").cloned().unwrap_or(Value::Null);
            let body = serde_json::json!({"choices": [{"message": {"content": format.to_string()}}]});
            Box::pin(async move {
                Ok(understudy_providers::ProviderResponse {
                    body: body.to_string().into(),
                    usage: None,
                    headers: Default::default(),
                    compute: None,
                })
            })
        }

        fn kind(&self) -> &'static str {
            "echo"
        }
    }

    #[tokio::test]
    async fn a_local_understudy_is_asked_to_decode_only_the_labels() {
        let provider = LocalProvider::single("local", 0.1, "echo", Arc::new(EchoFormat));
        let understudy = Understudy {
            name: "echo".into(),
            provider_name: "local".into(),
            provider: Arc::new(AnyProvider::Local(provider)),
            request_model: "echo".into(),
            cost: CostModel::MachineTime { price_per_hour: 0.1 },
        };
        let labels = vec!["bug".to_string(), "billing".to_string()];
        let (understudy, labels) = (&understudy, &labels);
        let sent = |extra: Value| async move {
            let mut body = serde_json::json!({"messages": [{"role": "user", "content": "x"}]});
            if let Value::Object(extra) = extra {
                body.as_object_mut().into_iter().for_each(|body| body.extend(extra.clone()));
            }
            let request = ChatRequest { body: body.as_object().cloned().unwrap_or_default() };
            let attempt = understudy.attempt(request, Duration::from_secs(60), Some(labels)).await;
            serde_json::from_str::<Value>(attempt.content().unwrap_or_default()).unwrap_or(Value::Null)
        };
        let format = sent(Value::Null).await;
        assert_eq!(format.pointer("/json_schema/schema/enum"), Some(&serde_json::json!(["bug", "billing"])));
        assert_eq!(format["type"], "json_schema");
        let own = serde_json::json!({"type": "text"});
        assert_eq!(sent(serde_json::json!({"response_format": own.clone()})).await, own);
        let unlabelled = understudy
            .attempt(
                ChatRequest { body: serde_json::json!({"messages": []}).as_object().cloned().unwrap_or_default() },
                Duration::from_secs(60),
                None,
            )
            .await;
        assert_eq!(unlabelled.content(), Some("null"));
    }

    #[test]
    fn machine_time_costs_by_the_hour() {
        let cost = CostModel::MachineTime { price_per_hour: 3.6 }.cost(None, Duration::from_millis(500));
        assert!((cost.dollars() - 0.0005).abs() < 1e-12);
    }
}
