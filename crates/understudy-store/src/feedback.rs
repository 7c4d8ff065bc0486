//! Feedback on calls: every verdict kept, the newest per call counting.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::Row;
use understudy_types::{Feedback, FeedbackScore, Uuid};

use crate::calls::{from_unix_ms, placeholder, unix_ms};
use crate::{Store, StoreError};

const FEEDBACK_COLUMNS: &str = "id, call_id, created_at, score, comment";

impl Store {
    /// Keeps one verdict on a call. The call need not be written yet (its
    /// record may still be queued); callers check that it exists.
    pub async fn add_feedback(&self, feedback: &Feedback) -> Result<(), StoreError> {
        let placeholders: Vec<String> = (1..=5).map(|idx| placeholder(self.backend, idx)).collect();
        let sql = format!("INSERT INTO feedback ({FEEDBACK_COLUMNS}) VALUES ({})", placeholders.join(","));
        sqlx::query(&sql)
            .bind(feedback.id.to_string())
            .bind(feedback.call_id.to_string())
            .bind(unix_ms(feedback.created_at))
            .bind(feedback.score.as_i64())
            .bind(feedback.comment.clone())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether a call with exactly this id is in the store.
    pub async fn call_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM calls WHERE id = {}", placeholder(self.backend, 1));
        let row = sqlx::query(&sql).bind(id.to_string()).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Every verdict on one call, oldest first (the last one counts).
    pub async fn call_feedback(&self, call_id: Uuid) -> Result<Vec<Feedback>, StoreError> {
        let sql = format!(
            "SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE call_id = {} ORDER BY created_at, id",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(call_id.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(feedback_from_row).collect()
    }

    /// The latest verdict on each of a task's calls that has any.
    pub async fn task_feedback(&self, task: &str) -> Result<HashMap<Uuid, Feedback>, StoreError> {
        let sql = format!(
            "SELECT f.id, f.call_id, f.created_at, f.score, f.comment FROM feedback f \
             JOIN calls c ON c.id = f.call_id WHERE c.task = {} ORDER BY f.created_at, f.id",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool).await?;
        let mut latest = HashMap::new();
        for row in &rows {
            let feedback = feedback_from_row(row)?;
            // Oldest first, so a later verdict replaces an earlier one.
            latest.insert(feedback.call_id, feedback);
        }
        Ok(latest)
    }
}

fn feedback_from_row(row: &AnyRow) -> Result<Feedback, StoreError> {
    let id_text: String = row.try_get("id")?;
    let corrupt = |message: String| StoreError::CorruptRow { id: id_text.clone(), message };
    let id = Uuid::parse_str(&id_text).map_err(|error| corrupt(format!("bad feedback id: {error}")))?;
    let call_text: String = row.try_get("call_id")?;
    let call_id = Uuid::parse_str(&call_text).map_err(|error| corrupt(format!("bad call id: {error}")))?;
    let score_value: i64 = row.try_get("score")?;
    let score = FeedbackScore::from_i64(score_value).ok_or_else(|| corrupt(format!("bad score {score_value}")))?;
    Ok(Feedback {
        id,
        call_id,
        score,
        comment: row.try_get("comment")?,
        created_at: from_unix_ms(row.try_get("created_at")?),
    })
}
