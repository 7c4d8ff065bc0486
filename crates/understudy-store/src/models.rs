//! The model registry: one row per trained understudy version.

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::calls::{from_unix_ms, placeholder, unix_ms};
use crate::{Store, StoreError};

const MODEL_COLUMNS: &str = "id, task, dataset_id, method, base_model, path, created_at, wall_seconds, metrics";

#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersionRecord {
    /// e.g. `mv-0193...`: unique per run.
    pub id: String,
    pub task: String,
    pub dataset_id: String,
    /// `classifier` or `lora`.
    pub method: String,
    pub base_model: String,
    /// The folder holding the trained model.
    pub path: String,
    pub created_at: OffsetDateTime,
    /// Training wall time: with a machine price, the one-off cost of training.
    pub wall_seconds: f64,
    /// The run's metrics as a JSON object, kept as text.
    pub metrics: String,
}

impl Store {
    pub async fn register_model_version(&self, model: &ModelVersionRecord) -> Result<(), StoreError> {
        let placeholders: Vec<String> = (1..=9).map(|idx| placeholder(self.backend, idx)).collect();
        let sql = format!("INSERT INTO model_versions ({MODEL_COLUMNS}) VALUES ({})", placeholders.join(","));
        sqlx::query(&sql)
            .bind(model.id.clone())
            .bind(model.task.clone())
            .bind(model.dataset_id.clone())
            .bind(model.method.clone())
            .bind(model.base_model.clone())
            .bind(model.path.clone())
            .bind(unix_ms(model.created_at))
            .bind(model.wall_seconds)
            .bind(model.metrics.clone())
            .execute(&self.pool())
            .await?;
        Ok(())
    }

    /// A model version by id or unique id prefix (at most two are returned).
    pub async fn get_model_version(&self, id_or_prefix: &str) -> Result<Vec<ModelVersionRecord>, StoreError> {
        let pattern = format!("{}%", id_or_prefix.replace(['%', '_'], ""));
        let sql = format!(
            "SELECT {MODEL_COLUMNS} FROM model_versions WHERE id LIKE {} ORDER BY id LIMIT 2",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(pattern).fetch_all(&self.pool()).await?;
        rows.iter().map(model_from_row).collect()
    }

    /// A task's model versions, newest first.
    pub async fn list_model_versions(&self, task: &str) -> Result<Vec<ModelVersionRecord>, StoreError> {
        let sql = format!(
            "SELECT {MODEL_COLUMNS} FROM model_versions WHERE task = {} ORDER BY created_at DESC, id DESC",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool()).await?;
        rows.iter().map(model_from_row).collect()
    }
}

fn model_from_row(row: &AnyRow) -> Result<ModelVersionRecord, StoreError> {
    Ok(ModelVersionRecord {
        id: row.try_get("id")?,
        task: row.try_get("task")?,
        dataset_id: row.try_get("dataset_id")?,
        method: row.try_get("method")?,
        base_model: row.try_get("base_model")?,
        path: row.try_get("path")?,
        created_at: from_unix_ms(row.try_get("created_at")?),
        wall_seconds: row.try_get("wall_seconds")?,
        metrics: row.try_get("metrics")?,
    })
}
