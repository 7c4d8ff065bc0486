//! Feedback on calls: every verdict kept, the newest per call counting.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};
use understudy_types::{Feedback, FeedbackScore, Uuid};

use crate::calls::{from_unix_ms, placeholder, unix_ms};
use crate::{Backend, Store, StoreError};

const FEEDBACK_COLUMNS: &str = "id, call_id, created_at, score, comment";

impl Store {
    /// Keeps one verdict on a call. The call need not be written yet (its
    /// record may still be queued); callers check that it exists.
    pub async fn add_feedback(&self, feedback: &Feedback) -> Result<(), StoreError> {
        insert_feedback(self.backend, &self.pool(), feedback).await
    }

    /// Whether a call with exactly this id is in the store.
    pub async fn call_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM calls WHERE id = {}", placeholder(self.backend, 1));
        let row = sqlx::query(&sql).bind(id.to_string()).fetch_one(&self.pool()).await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Every verdict on one call, oldest first (the last one counts).
    pub async fn call_feedback(&self, call_id: Uuid) -> Result<Vec<Feedback>, StoreError> {
        let sql = format!(
            "SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE call_id = {} ORDER BY created_at, id",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(call_id.to_string()).fetch_all(&self.pool()).await?;
        rows.iter().map(feedback_from_row).collect()
    }

    /// The latest verdict on each of a task's calls that has any.
    pub async fn task_feedback(&self, task: &str) -> Result<HashMap<Uuid, Feedback>, StoreError> {
        let sql = format!(
            "SELECT f.id, f.call_id, f.created_at, f.score, f.comment FROM feedback f \
             JOIN calls c ON c.id = f.call_id WHERE c.task = {} ORDER BY f.created_at, f.id",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool()).await?;
        let mut latest = HashMap::new();
        keep_latest(&rows, &mut latest)?;
        Ok(latest)
    }

    /// The latest verdict on each of `call_ids` that has any.
    pub async fn latest_feedback(&self, call_ids: &[Uuid]) -> Result<HashMap<Uuid, Feedback>, StoreError> {
        const IDS_PER_QUERY: usize = 500;
        let mut latest = HashMap::new();
        for chunk in call_ids.chunks(IDS_PER_QUERY) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|idx| placeholder(self.backend, idx)).collect();
            let sql = format!(
                "SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE call_id IN ({}) ORDER BY created_at, id",
                placeholders.join(",")
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            keep_latest(&query.fetch_all(&self.pool()).await?, &mut latest)?;
        }
        Ok(latest)
    }
}

/// Rows ordered oldest first: a later verdict on a call replaces an earlier one.
fn keep_latest(rows: &[AnyRow], latest: &mut HashMap<Uuid, Feedback>) -> Result<(), StoreError> {
    for row in rows {
        let feedback = feedback_from_row(row)?;
        latest.insert(feedback.call_id, feedback);
    }
    Ok(())
}

/// Inserts one verdict through `executor` (the pool, or a transaction).
pub(crate) async fn insert_feedback<'e, E>(backend: Backend, executor: E, feedback: &Feedback) -> Result<(), StoreError>
where
    E: Executor<'e, Database = Any>,
{
    let placeholders: Vec<String> = (1..=5).map(|idx| placeholder(backend, idx)).collect();
    let sql = format!("INSERT INTO feedback ({FEEDBACK_COLUMNS}) VALUES ({})", placeholders.join(","));
    sqlx::query(&sql)
        .bind(feedback.id.to_string())
        .bind(feedback.call_id.to_string())
        .bind(unix_ms(feedback.created_at))
        .bind(feedback.score.as_i64())
        .bind(feedback.comment.as_deref().map(crate::calls::storable_text))
        .execute(executor)
        .await?;
    Ok(())
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
