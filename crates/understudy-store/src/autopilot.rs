//! The autopilot's transitions: appended, never changed; a task's newest row
//! is its current stage (`understudy history` shows them with the policy
//! changes).

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::calls::{from_unix_ms, placeholder, storable_key, storable_text, unix_ms};
use crate::{Store, StoreError};

const EVENT_COLUMNS: &str = "id, task, created_at, stage_from, stage_to, reason, evidence";

#[derive(Debug, Clone, PartialEq)]
pub struct AutopilotEvent {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    pub task: String,
    pub created_at: OffsetDateTime,
    pub stage_from: String,
    pub stage_to: String,
    /// Why, in a sentence.
    pub reason: String,
    /// The figures behind the reason, as JSON text.
    pub evidence: String,
}

impl Store {
    pub async fn insert_autopilot_event(&self, event: &AutopilotEvent) -> Result<(), StoreError> {
        let placeholders: Vec<String> = (1..=7).map(|idx| placeholder(self.backend, idx)).collect();
        let sql = format!("INSERT INTO autopilot_events ({EVENT_COLUMNS}) VALUES ({})", placeholders.join(","));
        sqlx::query(&sql)
            .bind(event.id.clone())
            .bind(storable_key(&event.task))
            .bind(unix_ms(event.created_at))
            .bind(event.stage_from.clone())
            .bind(event.stage_to.clone())
            .bind(storable_text(&event.reason))
            .bind(storable_text(&event.evidence))
            .execute(&self.pool())
            .await?;
        Ok(())
    }

    /// A task's transitions, newest first.
    pub async fn autopilot_history(&self, task: &str) -> Result<Vec<AutopilotEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM autopilot_events WHERE task = {} ORDER BY id DESC",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool()).await?;
        rows.iter().map(event_from_row).collect()
    }
}

fn event_from_row(row: &AnyRow) -> Result<AutopilotEvent, StoreError> {
    Ok(AutopilotEvent {
        id: row.try_get("id")?,
        task: row.try_get("task")?,
        created_at: from_unix_ms(row.try_get("created_at")?),
        stage_from: row.try_get("stage_from")?,
        stage_to: row.try_get("stage_to")?,
        reason: row.try_get("reason")?,
        evidence: row.try_get("evidence")?,
    })
}
