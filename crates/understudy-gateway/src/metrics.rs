//! `GET /metrics`: the gateway's figures in the Prometheus text format.
//!
//! Call figures are counted from the records themselves, at the one place
//! every record passes (`AppState::record`), so they match what the store
//! holds: requests by endpoint, task, model, status and who served,
//! latency and time to first token, tokens, cost, fallback reasons and
//! rate-limit refusals. Requests refused for their key (401) have no
//! record and are counted by reason. The recorder's queue and dead letters
//! and each budgeted key's spend are read when the page is scraped.
//!
//! Label values come from the config (tasks and models it names), so a
//! client cannot grow the label sets with made-up model names: anything
//! else is `other`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use understudy_config::Config;
use understudy_types::{CallRecord, ServedBy};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    task: String,
    model: String,
    status: String,
    served_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    endpoint: String,
    task: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    task: String,
    model: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    task: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    key: String,
    limit: String,
}

/// The label set of one call's series, as the cache keeps it.
#[derive(Hash, PartialEq, Eq)]
struct SeriesKey {
    endpoint: &'static str,
    task: String,
    model: String,
    status: u16,
    served_by: &'static str,
}

/// The same, borrowed from a record; hashes as [`SeriesKey`] does.
#[derive(Hash)]
struct SeriesRef<'a> {
    endpoint: &'static str,
    task: &'a str,
    model: &'a str,
    status: u16,
    served_by: &'static str,
}

impl indexmap::Equivalent<SeriesKey> for SeriesRef<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.endpoint == key.endpoint
            && self.task == key.task
            && self.model == key.model
            && self.status == key.status
            && self.served_by == key.served_by
    }
}

/// Handles into the families for one label set; a handle shares its
/// family's value, so counting through it is counting in the family.
struct Series {
    requests: Counter,
    latency: Histogram,
    ttft: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    cost: FloatCounter,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Seconds from 5 ms to about 80 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

pub(crate) struct Metrics {
    registry: Registry,
    /// Looked up once per call; its label values come from the config, so
    /// foldhash rather than SipHash.
    series: RwLock<indexmap::IndexMap<SeriesKey, Arc<Series>, foldhash::fast::RandomState>>,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<ModelLabels>,
    ttft: HistogramFamily<ModelLabels>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, FloatCounter>,
    fallbacks: Family<FallbackLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    limited: Family<LimitLabels, Counter>,
    records_pending: Gauge,
    records_written: Gauge,
    records_dead_lettered: Gauge,
    budget_spent: Family<KeyLabels, FloatGauge>,
    budget_reserved: Family<KeyLabels, FloatGauge>,
    budget_limit: Family<KeyLabels, FloatGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("understudy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Calls recorded, by endpoint, task, model, HTTP status and who served",
            requests.clone(),
        );
        let latency: HistogramFamily<ModelLabels> = Family::new_with_constructor(latency_histogram);
        registry.register("request_duration_seconds", "Wall time of recorded calls", latency.clone());
        let ttft: HistogramFamily<ModelLabels> = Family::new_with_constructor(latency_histogram);
        registry.register("time_to_first_token_seconds", "Time to the first token of successful calls", ttft.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens of recorded calls, by kind (prompt, completion)", tokens.clone());
        let cost = Family::<ModelLabels, FloatCounter>::default();
        registry.register("cost_usd", "What recorded calls cost, in US dollars", cost.clone());
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Calls the understudy was asked first and the lead served, by reason",
            fallbacks.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused for their key (missing, unknown, revoked, expired); never recorded",
            auth_failures.clone(),
        );
        let limited = Family::<LimitLabels, Counter>::default();
        registry.register("limited", "Calls refused by a key's limit (requests, tokens, budget)", limited.clone());
        let records_pending = Gauge::default();
        registry.register("records_pending", "Records queued and not yet written", records_pending.clone());
        let records_written = Gauge::default();
        registry.register("records_written", "Records written to the store since start", records_written.clone());
        let records_dead_lettered = Gauge::default();
        registry.register(
            "records_dead_lettered",
            "Records the store refused, kept in the dead-letter file",
            records_dead_lettered.clone(),
        );
        let budget_spent = Family::<KeyLabels, FloatGauge>::default();
        registry.register("key_budget_spent_usd", "A key's spend in its budget period", budget_spent.clone());
        let budget_reserved = Family::<KeyLabels, FloatGauge>::default();
        registry.register(
            "key_budget_reserved_usd",
            "What a key's calls in flight may still cost",
            budget_reserved.clone(),
        );
        let budget_limit = Family::<KeyLabels, FloatGauge>::default();
        registry.register("key_budget_limit_usd", "A key's budget per period", budget_limit.clone());
        Metrics {
            registry,
            series: RwLock::default(),
            requests,
            latency,
            ttft,
            tokens,
            cost,
            fallbacks,
            auth_failures,
            limited,
            records_pending,
            records_written,
            records_dead_lettered,
            budget_spent,
            budget_reserved,
            budget_limit,
        }
    }
}

impl Metrics {
    /// Counts a finished call from its record.
    pub fn observe(&self, config: &Config, record: &CallRecord) {
        let task = match &record.task {
            Some(task) if config.tasks.contains_key(task) => task.as_str(),
            Some(_) => "other",
            None => "",
        };
        let served_by = record.routing.as_ref().map_or(ServedBy::Lead, |routing| routing.served_by);
        // A served understudy is a model of the config or a promoted model
        // version: a handful either way.
        let model = if config.models.contains_key(&record.model) || served_by == ServedBy::Understudy {
            record.model.as_str()
        } else {
            "other"
        };
        let key = SeriesRef {
            endpoint: record.endpoint.as_str(),
            task,
            model,
            status: record.status,
            served_by: served_by.as_str(),
        };
        let series = self.series(&key);
        series.requests.inc();
        series.latency.observe(record.latency_ms / 1000.0);
        if let (true, Some(ttft_ms)) = (record.is_success(), record.ttft_ms) {
            series.ttft.observe(ttft_ms / 1000.0);
        }
        if record.usage.prompt_tokens > 0 {
            series.prompt_tokens.inc_by(record.usage.prompt_tokens);
        }
        if record.usage.completion_tokens > 0 {
            series.completion_tokens.inc_by(record.usage.completion_tokens);
        }
        series.cost.inc_by(record.cost.dollars());
        if let Some(reason) = record.routing.as_ref().and_then(|routing| routing.fallback_reason.clone()) {
            self.fallbacks.get_or_create(&FallbackLabels { task: task.to_string(), reason }).inc();
        }
    }

    /// The handles of one call's series: found with one lookup and no
    /// allocation once the label set has been seen (the families behind
    /// them hash and allocate their label strings per lookup, six times a call).
    fn series(&self, key: &SeriesRef<'_>) -> Arc<Series> {
        if let Some(series) = read(&self.series).get(key) {
            return series.clone();
        }
        let (task, model) = (key.task.to_string(), key.model.to_string());
        let labels = ModelLabels { endpoint: key.endpoint.to_string(), task: task.clone(), model: model.clone() };
        let tokens = |kind: &str| {
            self.tokens
                .get_or_create(&TokenLabels { task: task.clone(), model: model.clone(), kind: kind.to_string() })
                .clone()
        };
        let series = Arc::new(Series {
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    endpoint: key.endpoint.to_string(),
                    task: task.clone(),
                    model: model.clone(),
                    status: key.status.to_string(),
                    served_by: key.served_by.to_string(),
                })
                .clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            ttft: self.ttft.get_or_create(&labels).clone(),
            prompt_tokens: tokens("prompt"),
            completion_tokens: tokens("completion"),
            cost: self.cost.get_or_create(&labels).clone(),
        });
        let owned = SeriesKey { endpoint: key.endpoint, task, model, status: key.status, served_by: key.served_by };
        write(&self.series).entry(owned).or_insert(series).clone()
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
    }

    pub fn limited(&self, key: &str, limit: &str) {
        self.limited.get_or_create(&LimitLabels { key: key.to_string(), limit: limit.to_string() }).inc();
    }

    /// The page, with the figures read at scrape time brought up to date.
    pub fn render(&self, state: &crate::AppState) -> Result<String, std::fmt::Error> {
        let stats = state.recorder().stats();
        let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.records_pending.set(as_i64(stats.pending()));
        self.records_written.set(as_i64(stats.written.load(Ordering::Relaxed)));
        self.records_dead_lettered.set(as_i64(stats.dead_lettered.load(Ordering::Relaxed)));
        let keys = state.inner.keys.all();
        for budget in state.inner.limiter.budget_use() {
            let Some(key) = keys.iter().find(|key| key.id == budget.key_id) else { continue };
            let labels = KeyLabels { key: key.name.clone() };
            self.budget_spent.get_or_create(&labels).set(budget.spent);
            self.budget_reserved.get_or_create(&labels).set(budget.reserved);
            if let Some(limit) = key.budget {
                self.budget_limit.get_or_create(&labels).set(limit.usd);
            }
        }
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &self.registry)?;
        Ok(page)
    }
}
