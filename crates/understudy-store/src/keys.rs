//! Gateway keys: who may call the gateway. A row holds the key's hash and
//! prefix, never the key.

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;
use understudy_types::{Budget, BudgetPeriod, GatewayKey};

use crate::calls::{from_unix_ms, placeholder, storable_text, unix_ms};
use crate::{Store, StoreError};

const KEY_COLUMNS: &str = "id, name, prefix, hash, tasks, models, budget_usd, budget_period, rpm, tpm, \
     expires_at, admin, created_at, revoked_at";
const N_KEY_COLUMNS: usize = 14;

impl Store {
    /// Stores a new key. A usable (unrevoked) key with the same name is an
    /// error: reports and records name keys, so two live ones must differ.
    pub async fn insert_key(&self, key: &GatewayKey) -> Result<(), StoreError> {
        let taken = format!(
            "SELECT COUNT(*) FROM gateway_keys WHERE name = {} AND revoked_at IS NULL",
            placeholder(self.backend, 1)
        );
        let row = sqlx::query(&taken).bind(key.name.clone()).fetch_one(&self.pool()).await?;
        if row.try_get::<i64, _>(0)? > 0 {
            return Err(StoreError::KeyNameTaken(key.name.clone()));
        }
        let placeholders: Vec<String> = (1..=N_KEY_COLUMNS).map(|idx| placeholder(self.backend, idx)).collect();
        let sql = format!("INSERT INTO gateway_keys ({KEY_COLUMNS}) VALUES ({})", placeholders.join(","));
        let list =
            |list: &Option<Vec<String>>| list.as_ref().map(|list| serde_json::Value::from(list.clone()).to_string());
        let mut query = sqlx::query(&sql)
            .bind(key.id.clone())
            .bind(storable_text(&key.name))
            .bind(key.prefix.clone())
            .bind(key.hash.clone())
            .bind(list(&key.tasks))
            .bind(list(&key.models));
        // A NULL f32 binds as DOUBLE PRECISION on Postgres (see calls.rs).
        query = match key.budget {
            Some(budget) => query.bind(budget.usd),
            None => query.bind(None::<f32>),
        };
        query
            .bind(key.budget.map(|budget| budget.period.as_str()))
            .bind(key.rpm.map(saturating_i64))
            .bind(key.tpm.map(saturating_i64))
            .bind(key.expires_at.map(unix_ms))
            .bind(i64::from(key.admin))
            .bind(unix_ms(key.created_at))
            .bind(key.revoked_at.map(unix_ms))
            .execute(&self.pool())
            .await?;
        Ok(())
    }

    /// Every key, revoked ones too, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<GatewayKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM gateway_keys ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool()).await?;
        rows.iter().map(key_from_row).collect()
    }

    /// The key with this hash, revoked or not.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<GatewayKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM gateway_keys WHERE hash = {}", placeholder(self.backend, 1));
        let row = sqlx::query(&sql).bind(hash.to_string()).fetch_optional(&self.pool()).await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Keys whose id is `text` or starts with it, or whose name is `text`.
    pub async fn find_keys(&self, text: &str) -> Result<Vec<GatewayKey>, StoreError> {
        let pattern = format!("{}%", text.replace(['%', '_'], ""));
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM gateway_keys WHERE id LIKE {} OR name = {} ORDER BY id",
            placeholder(self.backend, 1),
            placeholder(self.backend, 2)
        );
        let rows = sqlx::query(&sql).bind(pattern).bind(text.to_string()).fetch_all(&self.pool()).await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Revokes a key at `at`; a key revoked already keeps its first time.
    /// Returns whether the key exists.
    pub async fn revoke_key(&self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE gateway_keys SET revoked_at = COALESCE(revoked_at, {}) WHERE id = {}",
            placeholder(self.backend, 1),
            placeholder(self.backend, 2)
        );
        let done = sqlx::query(&sql).bind(unix_ms(at)).bind(id.to_string()).execute(&self.pool()).await?;
        Ok(done.rows_affected() > 0)
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn key_from_row(row: &AnyRow) -> Result<GatewayKey, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |message: String| StoreError::CorruptRow { id: id.clone(), message };
    let list = |column: &str| -> Result<Option<Vec<String>>, StoreError> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|text| {
            serde_json::from_str::<Vec<String>>(&text).map_err(|error| corrupt(format!("{column}: {error}")))
        })
        .transpose()
    };
    let budget_usd: Option<f64> = row.try_get("budget_usd")?;
    let budget_period: Option<String> = row.try_get("budget_period")?;
    let budget = match (budget_usd, budget_period) {
        (Some(usd), Some(period)) => Some(Budget {
            usd,
            period: BudgetPeriod::parse(&period).ok_or_else(|| corrupt(format!("unknown budget period `{period}`")))?,
        }),
        _ => None,
    };
    let limit = |column: &str| -> Result<Option<u64>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(column)?.map(|value| u64::try_from(value).unwrap_or(0)))
    };
    Ok(GatewayKey {
        id: id.clone(),
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        hash: row.try_get("hash")?,
        tasks: list("tasks")?,
        models: list("models")?,
        budget,
        rpm: limit("rpm")?,
        tpm: limit("tpm")?,
        expires_at: row.try_get::<Option<i64>, _>("expires_at")?.map(from_unix_ms),
        admin: row.try_get::<i64, _>("admin")? != 0,
        created_at: from_unix_ms(row.try_get("created_at")?),
        revoked_at: row.try_get::<Option<i64>, _>("revoked_at")?.map(from_unix_ms),
    })
}
