//! Gateway keys: who may call, and on what.
//!
//! With `[server] auth = "keys"` (the default) every request carries
//! `Authorization: Bearer <key>`. A key is `us-` and 32 random base62
//! characters, shown once when `understudy keys create` makes it; the store
//! keeps its SHA-256 hash and a short prefix. Keys are looked up in memory:
//! the [`KeyCache`] is refreshed from the store by a watcher (like the
//! policy watcher) and on a miss, so a key made a moment ago works at once
//! and a request with a key never hits the store once the key is known.
//! An unknown hash is remembered until the next refresh, so a client
//! repeating a bad key does not query the store on every request.
//!
//! A request without a usable key (missing, unknown, revoked, expired) is
//! answered 401 and not recorded: there is no one to attribute it to, and
//! recording it would let anyone fill the store. A key used outside its
//! scope (`--tasks`, `--models`) gets 403, and that call is recorded with
//! the key, like any other call the key made.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use rand::Rng;
use sha2::{Digest, Sha256};
use understudy_config::Auth;
use understudy_store::{Store, StoreError};
use understudy_types::{Budget, GatewayKey, KeyRef, KeyUnusable, OffsetDateTime, Uuid};

use crate::{AppState, GatewayError};

/// Every key starts with this, so that a leaked one is recognizable (and
/// secret scanners can be taught its shape).
pub const KEY_PREFIX: &str = "us-";
/// Random base62 characters after the prefix: about 190 bits.
const KEY_RANDOM_CHARS: usize = 32;
/// How much of a key the store keeps in clear, to tell keys apart.
const SHOWN_PREFIX_CHARS: usize = KEY_PREFIX.len() + 6;
/// Unknown hashes remembered between refreshes; past this the set is
/// cleared rather than grown, so a flood of random keys cannot fill memory.
const MAX_REMEMBERED_MISSES: usize = 10_000;

/// A new key's secret: `us-` and 32 characters from the OS's random source.
pub fn new_secret() -> String {
    let random: String = rand::rngs::OsRng
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(KEY_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{random}")
}

/// What the store keeps of a key: lower-case hex SHA-256. Keys are long
/// random strings, so a plain hash (no salt, no slow KDF) cannot be
/// reversed, and it lets a request's key be found by an index lookup.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What `understudy keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub tasks: Option<Vec<String>>,
    pub models: Option<Vec<String>>,
    pub budget: Option<Budget>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub expires_at: Option<OffsetDateTime>,
    pub admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key needs a name")]
    EmptyName,
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes a key and stores its hash; the secret in the answer is the only
/// copy there will ever be.
pub async fn create_key(store: &Store, new: NewKey) -> Result<(String, GatewayKey), KeyError> {
    let name = new.name.trim().to_string();
    if name.is_empty() {
        return Err(KeyError::EmptyName);
    }
    if let Some(budget) = new.budget {
        if !(budget.usd.is_finite() && budget.usd >= 0.0) {
            return Err(KeyError::Invalid {
                field: "budget",
                message: "must be a number of dollars of at least 0".into(),
            });
        }
    }
    for (field, limit) in [("rpm", new.rpm), ("tpm", new.tpm)] {
        if limit == Some(0) {
            return Err(KeyError::Invalid { field, message: "must be at least 1 (leave it out for no limit)".into() });
        }
    }
    let clean = |list: Option<Vec<String>>| {
        list.map(|list| list.into_iter().map(|item| item.trim().to_string()).filter(|item| !item.is_empty()).collect())
    };
    let secret = new_secret();
    let key = GatewayKey {
        id: Uuid::now_v7().to_string(),
        name,
        prefix: secret.chars().take(SHOWN_PREFIX_CHARS).collect(),
        hash: hash_secret(&secret),
        tasks: clean(new.tasks),
        models: clean(new.models),
        budget: new.budget,
        rpm: new.rpm,
        tpm: new.tpm,
        expires_at: new.expires_at,
        admin: new.admin,
        created_at: OffsetDateTime::now_utc(),
        revoked_at: None,
    };
    store.insert_key(&key).await?;
    Ok((secret, key))
}

/// The keys this gateway knows, by hash.
pub(crate) struct KeyCache {
    by_hash: RwLock<HashMap<String, Arc<GatewayKey>>>,
    /// Hashes the store did not know at their last lookup.
    misses: Mutex<HashSet<String>>,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache { by_hash: RwLock::new(HashMap::new()), misses: Mutex::new(HashSet::new()) }
    }
}

impl KeyCache {
    fn cached(&self, hash: &str) -> Option<Arc<GatewayKey>> {
        self.by_hash.read().ok()?.get(hash).cloned()
    }

    /// The key with this hash: from memory, else from the store (once per
    /// refresh for a hash the store does not know).
    async fn lookup(&self, store: &Store, hash: &str) -> Result<Option<Arc<GatewayKey>>, StoreError> {
        if let Some(key) = self.cached(hash) {
            return Ok(Some(key));
        }
        if self.misses.lock().map(|misses| misses.contains(hash)).unwrap_or(false) {
            return Ok(None);
        }
        match store.key_by_hash(hash).await? {
            Some(key) => {
                let key = Arc::new(key);
                if let Ok(mut by_hash) = self.by_hash.write() {
                    by_hash.insert(hash.to_string(), key.clone());
                }
                Ok(Some(key))
            }
            None => {
                if let Ok(mut misses) = self.misses.lock() {
                    if misses.len() >= MAX_REMEMBERED_MISSES {
                        misses.clear();
                    }
                    misses.insert(hash.to_string());
                }
                Ok(None)
            }
        }
    }

    /// Replaces the cache with the store's keys (revocations included).
    fn replace(&self, keys: Vec<GatewayKey>) -> usize {
        let n_keys = keys.len();
        let fresh: HashMap<String, Arc<GatewayKey>> =
            keys.into_iter().map(|key| (key.hash.clone(), Arc::new(key))).collect();
        if let Ok(mut by_hash) = self.by_hash.write() {
            *by_hash = fresh;
        }
        if let Ok(mut misses) = self.misses.lock() {
            misses.clear();
        }
        n_keys
    }

    /// Every known key (for metrics).
    pub fn all(&self) -> Vec<Arc<GatewayKey>> {
        self.by_hash.read().map(|by_hash| by_hash.values().cloned().collect()).unwrap_or_default()
    }
}

impl AppState {
    /// Reloads every key from the store: new keys, and revocations, reach
    /// this gateway here.
    pub async fn refresh_keys(&self) -> Result<usize, StoreError> {
        let keys = self.recorder().store().list_keys().await?;
        Ok(self.inner.keys.replace(keys))
    }
}

/// Reloads the keys from the store every `interval`, until the task is aborted.
pub fn spawn_key_watch(state: AppState, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = state.refresh_keys().await {
                tracing::warn!(%error, "cannot read gateway keys");
            }
        }
    })
}

/// Who is calling: the key, or nobody when auth is off.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Option<Arc<GatewayKey>>,
    auth: Auth,
}

impl Caller {
    /// The id and name a record carries.
    pub fn key_ref(&self) -> Option<KeyRef> {
        self.key.as_ref().map(|key| key.key_ref())
    }

    pub fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(|key| key.id.as_str())
    }

    /// Whether the caller may do what only operators do (rate other keys'
    /// calls, read metrics and health details). Without auth, everyone is:
    /// the gateway is then reachable from this machine only.
    pub fn is_admin(&self) -> bool {
        match (&self.key, self.auth) {
            (_, Auth::None) => true,
            (Some(key), Auth::Keys) => key.admin,
            (None, Auth::Keys) => false,
        }
    }

    /// Refuses a call outside the key's scope.
    pub fn check_scope(&self, task: Option<&str>, model: &str) -> Result<(), GatewayError> {
        let Some(key) = &self.key else { return Ok(()) };
        if key.may_call(task, model) {
            return Ok(());
        }
        let what = match task {
            Some(task) => format!("the task `{task}`"),
            None => format!("the model `{model}`"),
        };
        Err(GatewayError::Forbidden(format!("The key `{}` may not call {what}.", key.name)))
    }
}

/// The bearer token of an `Authorization` header.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|token| !token.is_empty())
}

/// What a client sent as its key, cut short for an error message.
fn masked(secret: &str) -> String {
    let shown: String = secret.chars().take(SHOWN_PREFIX_CHARS).collect();
    if shown.len() < secret.len() {
        format!("{shown}…")
    } else {
        shown
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, GatewayError> {
        state.caller(bearer(parts)).await
    }
}

impl AppState {
    /// Who holds `secret` (a request's bearer token, or the key the
    /// dashboard keeps in its cookie): the one rule for every way in.
    pub async fn caller(&self, secret: Option<&str>) -> Result<Caller, GatewayError> {
        let auth = self.config().server.auth;
        if auth == Auth::None {
            return Ok(Caller { key: None, auth });
        }
        let refused = |error: GatewayError, reason: &str| {
            self.metrics().auth_failure(reason);
            error
        };
        let Some(secret) = secret.map(str::trim).filter(|secret| !secret.is_empty()) else {
            return Err(refused(GatewayError::MissingKey, "missing"));
        };
        let key = self.inner.keys.lookup(self.recorder().store(), &hash_secret(secret)).await.map_err(|error| {
            tracing::error!(%error, "cannot look a gateway key up");
            GatewayError::Store(error.to_string())
        })?;
        let Some(key) = key else {
            return Err(refused(GatewayError::InvalidKey(masked(secret)), "unknown"));
        };
        match key.unusable_at(OffsetDateTime::now_utc()) {
            None => Ok(Caller { key: Some(key), auth }),
            Some(KeyUnusable::Revoked) => Err(refused(GatewayError::RevokedKey(key.name.clone()), "revoked")),
            Some(KeyUnusable::Expired(at)) => {
                Err(refused(GatewayError::ExpiredKey { name: key.name.clone(), at }, "expired"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hashed_to_hex() {
        let (first, second) = (new_secret(), new_secret());
        assert_ne!(first, second);
        assert!(first.starts_with(KEY_PREFIX) && first.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert!(first[KEY_PREFIX.len()..].chars().all(|c| c.is_ascii_alphanumeric()));
        // SHA-256 of "abc", from FIPS 180-2.
        assert_eq!(hash_secret("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(masked("us-abcdefghijkl"), "us-abcdef…");
    }
}
