//! The history of routing policies: `understudy promote` appends a row, and
//! the newest row of a task is its current policy. Gateways poll it, so a
//! change reaches every instance sharing the store without a restart.

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::calls::{from_unix_ms, placeholder, unix_ms};
use crate::{Store, StoreError};

const POLICY_COLUMNS: &str = "id, task, policy, understudy, understudy_path, created_at, note";

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyChange {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    pub task: String,
    /// As `understudy_router::Policy::name` prints it (`cascade:0.93`).
    pub policy: String,
    /// The understudy: a model of the config, or a model version id.
    pub understudy: Option<String>,
    /// For a model version, the folder holding it (what a local loader loads).
    pub understudy_path: Option<String>,
    pub created_at: OffsetDateTime,
    pub note: Option<String>,
}

impl Store {
    pub async fn insert_policy_change(&self, change: &PolicyChange) -> Result<(), StoreError> {
        let placeholders: Vec<String> = (1..=7).map(|idx| placeholder(self.backend, idx)).collect();
        let sql = format!("INSERT INTO policy_changes ({POLICY_COLUMNS}) VALUES ({})", placeholders.join(","));
        sqlx::query(&sql)
            .bind(change.id.clone())
            .bind(change.task.clone())
            .bind(change.policy.clone())
            .bind(change.understudy.clone())
            .bind(change.understudy_path.clone())
            .bind(unix_ms(change.created_at))
            .bind(change.note.clone())
            .execute(&self.pool())
            .await?;
        Ok(())
    }

    /// The current policy of every task that has one: its newest change.
    pub async fn current_policies(&self) -> Result<Vec<PolicyChange>, StoreError> {
        let sql = format!(
            "SELECT {POLICY_COLUMNS} FROM policy_changes WHERE id IN \
             (SELECT MAX(id) FROM policy_changes GROUP BY task) ORDER BY task"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool()).await?;
        rows.iter().map(policy_from_row).collect()
    }

    /// A task's policy changes, newest first.
    pub async fn policy_history(&self, task: &str) -> Result<Vec<PolicyChange>, StoreError> {
        let sql = format!(
            "SELECT {POLICY_COLUMNS} FROM policy_changes WHERE task = {} ORDER BY id DESC",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool()).await?;
        rows.iter().map(policy_from_row).collect()
    }
}

fn policy_from_row(row: &AnyRow) -> Result<PolicyChange, StoreError> {
    Ok(PolicyChange {
        id: row.try_get("id")?,
        task: row.try_get("task")?,
        policy: row.try_get("policy")?,
        understudy: row.try_get("understudy")?,
        understudy_path: row.try_get("understudy_path")?,
        created_at: from_unix_ms(row.try_get("created_at")?),
        note: row.try_get("note")?,
    })
}
