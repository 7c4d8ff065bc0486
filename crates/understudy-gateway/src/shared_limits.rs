//! Keys' limits shared by gateways through Redis (`[server] limits_redis_url`).
//!
//! The same rules as the in-memory [`Limiter`](crate::limits::Limiter), kept
//! in Redis hashes and changed by Lua scripts, which Redis runs atomically:
//! the check of every limit and the reservation happen as one step however
//! many gateways ask at once. Per key there is a request bucket and a token
//! bucket (`level`, `updated` in ms; they expire after two idle minutes,
//! when they would be full anyway) and one hash per budget period (`spent`,
//! `reserved`; it expires a day after its period ends). A period's hash is
//! created from the store's recorded spend the first time any gateway needs
//! it (the script asks for it, the gateway reads it and asks again).
//!
//! When Redis cannot be reached the gateway falls back to its own memory
//! (logged), so a Redis outage weakens the limits instead of stopping
//! traffic.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use understudy_types::{GatewayKey, Money, OffsetDateTime};

use crate::limits::{Estimate, LimitKind};

/// Checks every limit of a key and, if all allow the call, takes its
/// request, its tokens and its budget reservation.
///
/// KEYS: request bucket, token bucket, budget hash of the period.
/// ARGV: now (ms), rpm, tpm (0: none), estimated tokens, budget (negative:
/// none), estimated cost, the period's recorded spend (negative: not read
/// yet), seconds the budget hash lives.
/// Returns {"ok"}, {"seed"} (read the spend and ask again), or
/// {"refused", kind, retry-after ms (-1: the period's end), spent, reserved}.
const ADMIT: &str = r#"
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local seed = tonumber(ARGV[7])
local budget_ttl = tonumber(ARGV[8])

local function level(key, capacity)
  local stored = redis.call('HMGET', key, 'level', 'updated')
  if not stored[1] then
    return capacity
  end
  local elapsed = math.max(0, now - tonumber(stored[2]))
  return math.min(capacity, tonumber(stored[1]) + elapsed / 60000 * capacity)
end

local requests, tokens_left
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then
    return {'refused', 'requests', tostring(math.ceil((1 - requests) * 60000 / rpm)), '0', '0'}
  end
end
if tpm > 0 then
  if tokens > tpm then
    return {'refused', 'tokens', '60000', '0', '0'}
  end
  tokens_left = level(KEYS[2], tpm)
  if tokens_left < tokens then
    return {'refused', 'tokens', tostring(math.ceil((tokens - tokens_left) * 60000 / tpm)), '0', '0'}
  end
end
if budget >= 0 then
  local spent = redis.call('HGET', KEYS[3], 'spent')
  if not spent then
    if seed < 0 then
      return {'seed'}
    end
    redis.call('HSET', KEYS[3], 'spent', tostring(seed), 'reserved', '0')
    redis.call('EXPIRE', KEYS[3], budget_ttl)
    spent = seed
  end
  spent = tonumber(spent)
  local reserved = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
  if spent + reserved + cost > budget then
    local retry = '1000'
    if spent + cost > budget then
      retry = '-1'
    end
    return {'refused', 'budget', retry, tostring(spent), tostring(reserved)}
  end
  redis.call('HINCRBYFLOAT', KEYS[3], 'reserved', tostring(cost))
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(requests - 1), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(tokens_left - tokens), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[2], 120000)
end
return {'ok'}
"#;

/// Replaces a call's reservation by what it cost and used.
///
/// KEYS: token bucket, budget hash of the call's period.
/// ARGV: now (ms), tpm (0: none), estimated tokens, tokens used, estimated
/// cost, cost.
const SETTLE: &str = r#"
local now = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
if tpm > 0 then
  local stored = redis.call('HMGET', KEYS[1], 'level', 'updated')
  if stored[1] then
    local elapsed = math.max(0, now - tonumber(stored[2]))
    local level = math.min(tpm, tonumber(stored[1]) + elapsed / 60000 * tpm)
    level = math.min(tpm, level + tonumber(ARGV[3]) - tonumber(ARGV[4]))
    redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[2], 'reserved', tostring(-tonumber(ARGV[5])))
  redis.call('HINCRBYFLOAT', KEYS[2], 'spent', ARGV[6])
end
return 'ok'
"#;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SharedLimitsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered the limits script with {0:?}")]
    Unexpected(Vec<String>),
}

/// What the script said about a call.
pub(crate) enum Admission {
    Admitted,
    /// The budget period has no hash yet: read the store's spend.
    NeedsSeed,
    Refused {
        kind: LimitKind,
        retry_after_ms: i64,
        spent: f64,
        reserved: f64,
    },
}

pub(crate) struct SharedLimits {
    client: redis::Client,
    connection: tokio::sync::OnceCell<ConnectionManager>,
    admit: Script,
    settle: Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("SharedLimits").finish_non_exhaustive()
    }
}

fn key_of(key_id: &str, part: &str) -> String {
    format!("understudy:limits:{key_id}:{part}")
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The hash of a budget period (named by its start, so a new period starts
/// from nothing).
fn budget_key(key_id: &str, period_start: OffsetDateTime) -> String {
    key_of(key_id, &format!("budget:{}", unix_ms(period_start)))
}

impl SharedLimits {
    /// Parses the URL; the connection is made on first use.
    pub fn new(url: &str) -> Result<SharedLimits, redis::RedisError> {
        Ok(SharedLimits {
            client: redis::Client::open(url)?,
            connection: tokio::sync::OnceCell::new(),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        // A Redis that does not answer must not hold requests for long.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_millis(500))
            .set_response_timeout(Duration::from_millis(500))
            .set_number_of_retries(1);
        self.connection.get_or_try_init(|| self.client.get_connection_manager_with_config(config)).await.cloned()
    }

    pub async fn admit(
        &self,
        key: &GatewayKey,
        now: OffsetDateTime,
        estimate: Estimate,
        seed: Option<Money>,
    ) -> Result<Admission, SharedLimitsError> {
        let mut connection = self.connection().await?;
        let period_start = key.budget.map(|budget| budget.period.start_of(now));
        let budget_hash =
            period_start.map_or_else(|| key_of(&key.id, "budget:none"), |start| budget_key(&key.id, start));
        let budget_ttl = key
            .budget
            .map(|budget| (budget.period.end_of(now) - now).whole_seconds() + 86_400)
            .unwrap_or(86_400)
            .max(1);
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(key_of(&key.id, "requests"))
            .key(key_of(&key.id, "tokens"))
            .key(budget_hash)
            .arg(unix_ms(now))
            .arg(key.rpm.unwrap_or(0))
            .arg(key.tpm.unwrap_or(0))
            .arg(estimate.tokens)
            .arg(key.budget.map_or(-1.0, |budget| budget.usd).to_string())
            .arg(estimate.cost.dollars().to_string())
            .arg(seed.map_or(-1.0, Money::dollars).to_string())
            .arg(budget_ttl);
        let answer: Vec<String> = invocation.invoke_async(&mut connection).await?;
        match answer.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["ok"] => Ok(Admission::Admitted),
            ["seed"] => Ok(Admission::NeedsSeed),
            ["refused", kind, retry, spent, reserved] => {
                let kind = match *kind {
                    "requests" => LimitKind::Requests,
                    "tokens" => LimitKind::Tokens,
                    _ => LimitKind::Budget,
                };
                Ok(Admission::Refused {
                    kind,
                    retry_after_ms: retry.parse().unwrap_or(1000),
                    spent: spent.parse().unwrap_or(0.0),
                    reserved: reserved.parse().unwrap_or(0.0),
                })
            }
            _ => Err(SharedLimitsError::Unexpected(answer)),
        }
    }

    pub async fn settle(
        &self,
        key_id: &str,
        tpm: Option<u64>,
        period_start: Option<OffsetDateTime>,
        estimate: Estimate,
        cost: Money,
        tokens: u64,
    ) -> Result<(), SharedLimitsError> {
        let mut connection = self.connection().await?;
        let budget_hash = period_start.map_or_else(|| key_of(key_id, "budget:none"), |start| budget_key(key_id, start));
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(key_of(key_id, "tokens"))
            .key(budget_hash)
            .arg(unix_ms(OffsetDateTime::now_utc()))
            .arg(tpm.unwrap_or(0))
            .arg(estimate.tokens)
            .arg(tokens)
            .arg(estimate.cost.dollars().to_string())
            .arg(cost.dollars().to_string());
        let _: String = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }
}
