//! The dataset registry: one row per immutable dataset version.
//!
//! The rows of a dataset are files written by the datasets stage; the store
//! only records that a version exists, what it holds and where its files are.

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;
use understudy_types::TaskKind;

use crate::calls::{from_unix_ms, placeholder, unix_ms};
use crate::{Store, StoreError};

const DATASET_COLUMNS: &str = "id, task, created_at, kind, labels, n_train, n_validation, n_test, parameters, path";

/// One registered dataset version.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRecord {
    /// The content hash, e.g. `ds-1a2b3c4d5e6f`.
    pub id: String,
    pub task: String,
    pub created_at: OffsetDateTime,
    pub kind: TaskKind,
    /// The label set of a label task, empty for a generation task.
    pub labels: Vec<String>,
    pub n_train: u64,
    pub n_validation: u64,
    pub n_test: u64,
    /// The build parameters as a JSON object, kept as text.
    pub parameters: String,
    /// The folder holding the version's files.
    pub path: String,
}

impl Store {
    /// Registers a dataset version. Returns false, and changes nothing, when
    /// a version with the same id is registered already: ids are content
    /// hashes, so it holds the same rows.
    pub async fn register_dataset(&self, dataset: &DatasetRecord) -> Result<bool, StoreError> {
        let placeholders: Vec<String> = (1..=10).map(|idx| placeholder(self.backend, idx)).collect();
        // `ON CONFLICT DO NOTHING` is understood by SQLite (3.24+) and Postgres alike.
        let sql = format!(
            "INSERT INTO datasets ({DATASET_COLUMNS}) VALUES ({}) ON CONFLICT (id) DO NOTHING",
            placeholders.join(",")
        );
        let labels = serde_json::to_string(&dataset.labels).unwrap_or_else(|_| "[]".to_string());
        let result = sqlx::query(&sql)
            .bind(dataset.id.clone())
            .bind(dataset.task.clone())
            .bind(unix_ms(dataset.created_at))
            .bind(dataset.kind.as_str())
            .bind(labels)
            .bind(saturating_i64(dataset.n_train))
            .bind(saturating_i64(dataset.n_validation))
            .bind(saturating_i64(dataset.n_test))
            .bind(dataset.parameters.clone())
            .bind(dataset.path.clone())
            .execute(&self.pool())
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// A dataset by id, or by a unique prefix of its id (at most two are
    /// returned, enough to tell "ambiguous" from "found").
    pub async fn get_dataset(&self, id_or_prefix: &str) -> Result<Vec<DatasetRecord>, StoreError> {
        let pattern = format!("{}%", id_or_prefix.replace(['%', '_'], ""));
        let sql = format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE id LIKE {} ORDER BY id LIMIT 2",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(pattern).fetch_all(&self.pool()).await?;
        rows.iter().map(dataset_from_row).collect()
    }

    /// Registered datasets, newest first, optionally of one task.
    pub async fn list_datasets(&self, task: Option<&str>) -> Result<Vec<DatasetRecord>, StoreError> {
        let rows = match task {
            Some(task) => {
                let sql = format!(
                    "SELECT {DATASET_COLUMNS} FROM datasets WHERE task = {} ORDER BY created_at DESC, id DESC",
                    placeholder(self.backend, 1)
                );
                sqlx::query(&sql).bind(task.to_string()).fetch_all(&self.pool()).await?
            }
            None => {
                let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets ORDER BY created_at DESC, id DESC");
                sqlx::query(&sql).fetch_all(&self.pool()).await?
            }
        };
        rows.iter().map(dataset_from_row).collect()
    }
}

fn dataset_from_row(row: &AnyRow) -> Result<DatasetRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |message: String| StoreError::CorruptRow { id: id.clone(), message };
    let kind_text: String = row.try_get("kind")?;
    let kind = TaskKind::parse(&kind_text).ok_or_else(|| corrupt(format!("unknown dataset kind `{kind_text}`")))?;
    let labels_text: String = row.try_get("labels")?;
    let labels: Vec<String> =
        serde_json::from_str(&labels_text).map_err(|error| corrupt(format!("bad label set: {error}")))?;
    Ok(DatasetRecord {
        id: id.clone(),
        task: row.try_get("task")?,
        created_at: from_unix_ms(row.try_get("created_at")?),
        kind,
        labels,
        n_train: nonnegative(row.try_get("n_train")?),
        n_validation: nonnegative(row.try_get("n_validation")?),
        n_test: nonnegative(row.try_get("n_test")?),
        parameters: row.try_get("parameters")?,
        path: row.try_get("path")?,
    })
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn nonnegative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
