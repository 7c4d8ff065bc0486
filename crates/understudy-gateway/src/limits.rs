//! A key's budget and rate limits, enforced before the upstream is asked.
//!
//! A call is admitted only if, at once, the key has a request left in its
//! minute (`rpm`), room for the call's estimated tokens (`tpm`), and room
//! in its budget for the call's estimated cost on top of what is spent and
//! what calls in flight have reserved. The estimate is the prompt's tokens
//! (counted with o200k_base) and the answer's `max_tokens` (or
//! [`DEFAULT_ANSWER_TOKENS`]) at the model's prices, so as long as the
//! upstream's count of the prompt is not above ours, concurrent calls never
//! spend more than the budget: each holds its estimate until its record is
//! made, and then the real cost replaces it (`settle`). Audits and a shadow
//! understudy's compute are part of a call's cost, so they are charged when
//! the call's record is made, above the estimate.
//!
//! Rate limits are token buckets that refill continuously (a full minute's
//! allowance at most). A refused call gets 429 with `Retry-After`: the
//! time until the bucket holds enough, or for a spent budget the start of
//! the next period.
//!
//! The state is this gateway's memory, or with `[server] limits_redis_url`
//! a Redis that every gateway shares (`shared_limits`, the same rules in Lua
//! scripts). The budget's spend is seeded from the store (the key's recorded
//! costs in the current period) the first time a period is used, so it
//! survives restarts; without Redis, gateways sharing a store do not see
//! each other's spend in between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use understudy_store::Store;
use understudy_types::{GatewayKey, Money, OffsetDateTime, Uuid};

use crate::shared_limits::{Admission, SharedLimits, SharedLimitsError};
use crate::GatewayError;

/// The answer's tokens an estimate assumes when the request sets no
/// `max_tokens` (or `max_completion_tokens`).
pub const DEFAULT_ANSWER_TOKENS: u64 = 1024;

/// What a call is expected to cost at most, before it is made.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Estimate {
    pub cost: Money,
    pub tokens: u64,
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Budget,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Budget => "budget",
        }
    }
}

/// A token bucket of `capacity` a minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: u64) -> Bucket {
        Bucket { level: capacity as f64, updated: Instant::now() }
    }

    fn refill(&mut self, capacity: u64, now: Instant) {
        let per_second = capacity as f64 / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_second).min(capacity as f64);
        self.updated = now;
    }

    /// Whole seconds until the bucket holds `wanted`.
    fn wait_for(&self, capacity: u64, wanted: f64) -> u64 {
        let per_second = capacity as f64 / 60.0;
        ((wanted - self.level) / per_second).ceil().max(1.0) as u64
    }
}

#[derive(Debug, Default)]
struct KeyState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// The budget period the figures below are of.
    period_start: Option<OffsetDateTime>,
    spent: f64,
    reserved: f64,
}

#[derive(Debug, Default)]
struct KeyLimits {
    state: Mutex<KeyState>,
    /// The period whose spend was read from the store; one reader at a time,
    /// so a burst on a fresh key reads it once.
    seeded: tokio::sync::Mutex<Option<OffsetDateTime>>,
}

/// What an admitted call holds until its record is made.
#[derive(Debug, Clone)]
struct Reservation {
    key_id: String,
    period_start: Option<OffsetDateTime>,
    estimate: Estimate,
    tpm: Option<u64>,
    /// Held in the shared Redis rather than in this gateway's memory.
    shared: bool,
}

/// A key's budget as it stands, for metrics.
#[derive(Debug, Clone)]
pub(crate) struct BudgetUse {
    pub key_id: String,
    pub spent: f64,
    pub reserved: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Limiter {
    keys: Mutex<HashMap<String, Arc<KeyLimits>>>,
    /// Looked up once per call (ids are the gateway's own, hence foldhash).
    reservations: Mutex<HashMap<Uuid, Reservation, foldhash::fast::RandomState>>,
    shared: Option<SharedLimits>,
}

/// A call the limits refused, and when to try again.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: LimitKind,
    pub retry_after_secs: u64,
    pub message: String,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Why a call was refused, in words a client can act on.
fn refusal(
    key: &GatewayKey,
    kind: LimitKind,
    retry_after_secs: u64,
    estimate: Estimate,
    spent: f64,
    reserved: f64,
) -> Refusal {
    let message = match kind {
        LimitKind::Requests => {
            format!("Rate limit reached for key `{}`: {} requests per minute.", key.name, key.rpm.unwrap_or(0))
        }
        LimitKind::Tokens if estimate.tokens > key.tpm.unwrap_or(u64::MAX) => format!(
            "This request may use {} tokens (its prompt and max_tokens), more than the {} tokens per minute key \
             `{}` allows; lower max_tokens.",
            estimate.tokens,
            key.tpm.unwrap_or(0),
            key.name
        ),
        LimitKind::Tokens => format!(
            "Rate limit reached for key `{}`: {} tokens per minute; this request may use {}.",
            key.name,
            key.tpm.unwrap_or(0),
            estimate.tokens
        ),
        LimitKind::Budget => {
            let (usd, period) = key.budget.map_or((0.0, "period"), |budget| (budget.usd, budget.period.as_str()));
            format!(
                "Key `{}` has spent ${spent:.6} of its ${usd} budget this {period} (${reserved:.6} more reserved by \
                 calls in flight); this call may cost up to ${:.6}.",
                key.name,
                estimate.cost.dollars()
            )
        }
    };
    Refusal { kind, retry_after_secs, message }
}

/// Seconds from `now` to the start of the key's next budget period.
fn until_next_period(key: &GatewayKey, now: OffsetDateTime) -> u64 {
    key.budget.map_or(1, |budget| u64::try_from((budget.period.end_of(now) - now).whole_seconds()).unwrap_or(1).max(1))
}

impl Limiter {
    /// Limits in this gateway's memory, or shared through Redis at `redis_url`.
    pub fn new(redis_url: Option<&str>) -> Result<Limiter, redis::RedisError> {
        let shared = redis_url.map(SharedLimits::new).transpose()?;
        Ok(Limiter { shared, ..Limiter::default() })
    }

    /// The shared path; `Err` when Redis cannot be asked (the caller then
    /// counts in memory).
    async fn admit_shared(
        &self,
        shared: &SharedLimits,
        store: &Store,
        key: &GatewayKey,
        call_id: Uuid,
        estimate: Estimate,
        now: OffsetDateTime,
    ) -> Result<Result<(), GatewayError>, SharedLimitsError> {
        let mut seed = None;
        for _ in 0..2 {
            match shared.admit(key, now, estimate, seed).await? {
                Admission::Admitted => {
                    let period_start = key.budget.map(|budget| budget.period.start_of(now));
                    let reservation =
                        Reservation { key_id: key.id.clone(), period_start, estimate, tpm: key.tpm, shared: true };
                    lock(&self.reservations).insert(call_id, reservation);
                    return Ok(Ok(()));
                }
                Admission::NeedsSeed => {
                    let Some(budget) = key.budget else { break };
                    match store.key_spend_since(&key.id, budget.period.start_of(now)).await {
                        Ok(spent) => seed = Some(spent),
                        Err(error) => {
                            tracing::error!(%error, key = %key.name, "cannot read a key's spend");
                            return Ok(Err(GatewayError::Store(error.to_string())));
                        }
                    }
                }
                Admission::Refused { kind, retry_after_ms, spent, reserved } => {
                    let retry_after_secs = if retry_after_ms < 0 {
                        until_next_period(key, now)
                    } else {
                        u64::try_from(retry_after_ms).unwrap_or(1000).div_ceil(1000).max(1)
                    };
                    return Ok(Err(refused(refusal(key, kind, retry_after_secs, estimate, spent, reserved))));
                }
            }
        }
        Err(SharedLimitsError::Unexpected(vec!["seed asked twice".into()]))
    }

    fn limits_of(&self, key_id: &str) -> Arc<KeyLimits> {
        lock(&self.keys).entry(key_id.to_string()).or_default().clone()
    }

    /// Admits call `call_id` of `key`, or says which limit refuses it.
    /// `estimate` is only computed for keys with a token limit or budget.
    pub async fn admit(
        &self,
        store: &Store,
        key: &GatewayKey,
        call_id: Uuid,
        estimate: impl FnOnce() -> Estimate,
    ) -> Result<(), GatewayError> {
        if key.rpm.is_none() && key.tpm.is_none() && key.budget.is_none() {
            return Ok(());
        }
        let estimate = if key.tpm.is_some() || key.budget.is_some() { estimate() } else { Estimate::default() };
        let now = OffsetDateTime::now_utc();
        if let Some(shared) = &self.shared {
            // Boxed: Redis' futures are large, and every call's future would carry them.
            match Box::pin(self.admit_shared(shared, store, key, call_id, estimate, now)).await {
                Ok(admitted) => return admitted,
                Err(error) => {
                    tracing::warn!(%error, "shared limits are out of reach; this gateway counts the key's limits alone")
                }
            }
        }
        let limits = self.limits_of(&key.id);
        let period_start = key.budget.map(|budget| budget.period.start_of(now));
        if let Some(period_start) = period_start {
            let mut seeded = limits.seeded.lock().await;
            if *seeded != Some(period_start) {
                let spent = Box::pin(store.key_spend_since(&key.id, period_start)).await.map_err(|error| {
                    tracing::error!(%error, key = %key.name, "cannot read a key's spend");
                    GatewayError::Store(error.to_string())
                })?;
                let mut state = lock(&limits.state);
                // Reservations of an earlier period settle into nothing.
                state.period_start = Some(period_start);
                state.spent = spent.dollars();
                state.reserved = 0.0;
                *seeded = Some(period_start);
            }
        }
        let instant = Instant::now();
        let mut state = lock(&limits.state);
        if let Some(rpm) = key.rpm {
            let bucket = state.requests.get_or_insert_with(|| Bucket::full(rpm));
            bucket.refill(rpm, instant);
            if bucket.level < 1.0 {
                let wait = bucket.wait_for(rpm, 1.0);
                return Err(refused(refusal(key, LimitKind::Requests, wait, estimate, 0.0, 0.0)));
            }
        }
        if let Some(tpm) = key.tpm {
            if estimate.tokens > tpm {
                return Err(refused(refusal(key, LimitKind::Tokens, 60, estimate, 0.0, 0.0)));
            }
            let bucket = state.tokens.get_or_insert_with(|| Bucket::full(tpm));
            bucket.refill(tpm, instant);
            if bucket.level < estimate.tokens as f64 {
                let wait = bucket.wait_for(tpm, estimate.tokens as f64);
                return Err(refused(refusal(key, LimitKind::Tokens, wait, estimate, 0.0, 0.0)));
            }
        }
        if let Some(budget) = key.budget {
            let wanted = estimate.cost.dollars();
            if state.spent + state.reserved + wanted > budget.usd {
                // Spent alone leaves no room: only the next period will. Else
                // calls in flight hold the room, and may give some back.
                let wait = if state.spent + wanted > budget.usd { until_next_period(key, now) } else { 1 };
                return Err(refused(refusal(key, LimitKind::Budget, wait, estimate, state.spent, state.reserved)));
            }
        }
        if let Some(bucket) = state.requests.as_mut() {
            bucket.level -= 1.0;
        }
        if let Some(bucket) = state.tokens.as_mut() {
            bucket.level -= estimate.tokens as f64;
        }
        if key.budget.is_some() {
            state.reserved += estimate.cost.dollars();
        }
        drop(state);
        lock(&self.reservations).insert(
            call_id,
            Reservation { key_id: key.id.clone(), period_start, estimate, tpm: key.tpm, shared: false },
        );
        Ok(())
    }

    /// Replaces a call's reservation by what it really cost and used.
    pub async fn settle(&self, call_id: Uuid, cost: Money, tokens: u64) {
        let Some(reservation) = lock(&self.reservations).remove(&call_id) else { return };
        if let (true, Some(shared)) = (reservation.shared, &self.shared) {
            let Reservation { key_id, tpm, period_start, estimate, .. } = &reservation;
            if let Err(error) = Box::pin(shared.settle(key_id, *tpm, *period_start, *estimate, cost, tokens)).await {
                tracing::warn!(%error, "cannot settle a call's reservation in the shared limits");
            }
            return;
        }
        let limits = self.limits_of(&reservation.key_id);
        let mut state = lock(&limits.state);
        if let (Some(bucket), Some(tpm)) = (state.tokens.as_mut(), reservation.tpm) {
            // Tokens not used go back; tokens above the estimate are owed.
            bucket.level = (bucket.level + reservation.estimate.tokens as f64 - tokens as f64).min(tpm as f64);
        }
        if reservation.period_start.is_some() && reservation.period_start == state.period_start {
            state.reserved = (state.reserved - reservation.estimate.cost.dollars()).max(0.0);
            state.spent += cost.dollars();
        }
    }

    /// Every budgeted key's spend and reservations in its current period.
    pub fn budget_use(&self) -> Vec<BudgetUse> {
        let keys: Vec<(String, Arc<KeyLimits>)> =
            lock(&self.keys).iter().map(|(id, limits)| (id.clone(), limits.clone())).collect();
        keys.into_iter()
            .filter_map(|(key_id, limits)| {
                let state = lock(&limits.state);
                state.period_start.map(|_| BudgetUse { key_id, spent: state.spent, reserved: state.reserved })
            })
            .collect()
    }
}

impl crate::AppState {
    /// Admits a call of `caller` against its key's limits (every call when
    /// keys are off, or the key has none); a refusal is counted.
    pub(crate) async fn admit(
        &self,
        caller: &crate::auth::Caller,
        call_id: Uuid,
        estimate: impl FnOnce() -> Estimate,
    ) -> Result<(), GatewayError> {
        let Some(key) = &caller.key else { return Ok(()) };
        let admitted = self.inner.limiter.admit(self.recorder().store(), key, call_id, estimate).await;
        if let Err(GatewayError::LimitReached(refusal)) = &admitted {
            self.metrics().limited(&key.name, refusal.kind.as_str());
        }
        admitted
    }
}

fn refused(refusal: Refusal) -> GatewayError {
    GatewayError::LimitReached(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_by_the_minute_and_says_how_long_to_wait() {
        let start = Instant::now();
        let mut bucket = Bucket { level: 0.0, updated: start };
        // 60 a minute is one a second.
        assert_eq!(bucket.wait_for(60, 1.0), 1);
        assert_eq!(bucket.wait_for(6, 1.0), 10);
        bucket.refill(60, start + std::time::Duration::from_millis(2500));
        assert!((bucket.level - 2.5).abs() < 1e-9);
        bucket.refill(60, start + std::time::Duration::from_secs(600));
        assert_eq!(bucket.level, 60.0, "never more than a minute's allowance");
    }
}
