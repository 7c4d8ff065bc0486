//! Retention: `[store] keep_bodies_days` and `keep_calls_days`.
//!
//! Bodies (the request, the answers) are most of a call's bytes and are
//! needed only for datasets of recent traffic; the metadata (time, task,
//! tokens, cost, route) is small and is what the dashboard lists. So bodies
//! go first, and the rows later, or never. The daily rollups are not
//! touched: the ledger still counts pruned calls, so the money saved does
//! not shrink when the log does.
//!
//! Work is done in bounded batches, each its own transaction, so the
//! recorder's writes are never held behind one long statement.

use sqlx::Row;
use time::OffsetDateTime;

use crate::calls::{placeholder, unix_ms};
use crate::{Store, StoreError};

/// Calls handled per statement.
const BATCH: i64 = 5_000;

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Calls whose bodies were cleared (the row stays).
    pub bodies_cleared: u64,
    /// Calls deleted, with their feedback.
    pub calls_deleted: u64,
}

impl Store {
    /// Applies retention as of `now`: clears the bodies of calls older than
    /// `keep_bodies` and deletes the calls older than `keep_calls`. A
    /// cleared call keeps an empty `request` and no answers, so no dataset
    /// takes it.
    pub async fn prune(
        &self,
        now: OffsetDateTime,
        keep_bodies: Option<std::time::Duration>,
        keep_calls: Option<std::time::Duration>,
    ) -> Result<Pruned, StoreError> {
        let cutoff =
            |keep: std::time::Duration| unix_ms(now).saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64);
        let mut pruned = Pruned::default();
        if let Some(keep) = keep_calls {
            pruned.calls_deleted = self.delete_calls_before(cutoff(keep)).await?;
        }
        if let Some(keep) = keep_bodies {
            pruned.bodies_cleared = self.clear_bodies_before(cutoff(keep)).await?;
        }
        Ok(pruned)
    }

    async fn delete_calls_before(&self, before: i64) -> Result<u64, StoreError> {
        let p = |idx| placeholder(self.backend, idx);
        let calls = format!(
            "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE created_at < {} ORDER BY created_at LIMIT {BATCH})",
            p(1)
        );
        // Feedback comes after its call: any older than the cutoff is on a
        // deleted call.
        let feedback = format!("DELETE FROM feedback WHERE created_at < {}", p(1));
        let mut deleted = 0;
        loop {
            let done = sqlx::query(&calls).bind(before).execute(&self.pool()).await?.rows_affected();
            deleted += done;
            if done < BATCH as u64 {
                break;
            }
        }
        sqlx::query(&feedback).bind(before).execute(&self.pool()).await?;
        Ok(deleted)
    }

    async fn clear_bodies_before(&self, before: i64) -> Result<u64, StoreError> {
        let p = |idx| placeholder(self.backend, idx);
        let mark = format!("SELECT up_to FROM retention_marks WHERE what = {}", p(1));
        let from: i64 = match sqlx::query(&mark).bind("bodies").fetch_optional(&self.pool()).await? {
            Some(row) => row.try_get(0)?,
            None => i64::MIN,
        };
        if from >= before {
            return Ok(0);
        }
        // Walk the window [from, before) in steps of BATCH calls: each step
        // clears one batch and moves the mark to its last call's time.
        let next = format!(
            "SELECT created_at FROM calls WHERE created_at >= {} AND created_at < {} \
             ORDER BY created_at LIMIT 1 OFFSET {}",
            p(1),
            p(2),
            BATCH - 1
        );
        let clear = format!(
            "UPDATE calls SET request = '', response = NULL, understudy_answer = NULL, audit_answer = NULL \
             WHERE created_at >= {} AND created_at < {} AND request <> ''",
            p(1),
            p(2)
        );
        let save = format!(
            "INSERT INTO retention_marks (what, up_to) VALUES ('bodies', {}) \
             ON CONFLICT (what) DO UPDATE SET up_to = excluded.up_to",
            p(1)
        );
        let mut cleared = 0;
        let mut start = from;
        while start < before {
            // The batch's end: just past its BATCH-th call, or the cutoff.
            let end = match sqlx::query(&next).bind(start).bind(before).fetch_optional(&self.pool()).await? {
                Some(row) => (row.try_get::<i64, _>(0)? + 1).min(before),
                None => before,
            };
            let mut transaction = self.pool().begin().await?;
            cleared += sqlx::query(&clear).bind(start).bind(end).execute(&mut *transaction).await?.rows_affected();
            sqlx::query(&save).bind(end).execute(&mut *transaction).await?;
            transaction.commit().await?;
            start = end;
        }
        Ok(cleared)
    }
}
