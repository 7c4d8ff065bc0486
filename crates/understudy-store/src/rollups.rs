//! Daily totals of the `calls` table (`call_rollups`): what the ledger, the
//! cost reports and the dashboard read.
//!
//! Why: summing the calls table for every page and report costs a scan of
//! every call, seconds at ten million rows, and pruning old calls
//! (`keep_calls_days`) would silently shrink the money saved. The rollups
//! have one row per UTC day, task, model, endpoint and key, so they stay
//! small, and they are written in the same transaction as the calls they
//! count, so they are never ahead of nor behind the log.
//!
//! One rule per total: each [`Measure`] holds the expression that counts one
//! call, used both to fill the rollups and to sum the calls table directly
//! (for filters the rollups cannot answer: a time that is not a midnight, a
//! status, who served, text).

use sqlx::{AnyConnection, AnyPool, Row};

use crate::calls::{placeholder, INSERT_SIZES};
use crate::{Backend, CallFilter, StoreError};

pub(crate) const MS_PER_DAY: i64 = 86_400_000;

/// The SQL type a total is summed into.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Count,
    Money,
}

/// One total: its column in `call_rollups`, and what one call adds to it.
#[derive(Debug)]
pub(crate) struct Measure {
    column: &'static str,
    per_call: &'static str,
    kind: Kind,
}

const fn measure(column: &'static str, per_call: &'static str, kind: Kind) -> Measure {
    Measure { column, per_call, kind }
}

/// The one rule for a failed call: not 2xx, or 2xx with an error (a
/// truncated answer). The `status = error` filter, the error totals and the
/// partial index `calls_failed` (whose WHERE must be this text, for the
/// backends to see it applies) all use it.
#[macro_export]
#[doc(hidden)]
macro_rules! failed_call {
    () => {
        "(status < 200 OR status >= 300 OR error IS NOT NULL)"
    };
}

pub(crate) const N_CALLS: Measure = measure("n_calls", "1", Kind::Count);
pub(crate) const N_ERRORS: Measure =
    measure("n_errors", concat!("CASE WHEN ", crate::failed_call!(), " THEN 1 ELSE 0 END"), Kind::Count);
pub(crate) const PROMPT_TOKENS: Measure = measure("prompt_tokens", "prompt_tokens", Kind::Count);
pub(crate) const COMPLETION_TOKENS: Measure = measure("completion_tokens", "completion_tokens", Kind::Count);
pub(crate) const COST: Measure = measure("cost", "cost", Kind::Money);
pub(crate) const N_UNDERSTUDY: Measure =
    measure("n_understudy", "CASE WHEN served_by = 'understudy' THEN 1 ELSE 0 END", Kind::Count);
pub(crate) const N_COMPARED: Measure =
    measure("n_compared", "CASE WHEN agreement IS NULL THEN 0 ELSE 1 END", Kind::Count);
pub(crate) const N_AGREED: Measure = measure("n_agreed", "CASE WHEN agreement = 1 THEN 1 ELSE 0 END", Kind::Count);
pub(crate) const UNDERSTUDY_COST: Measure = measure("understudy_cost", "COALESCE(understudy_cost, 0)", Kind::Money);
pub(crate) const LEAD_COST_AVOIDED: Measure =
    measure("lead_cost_avoided", "COALESCE(lead_cost_avoided, 0)", Kind::Money);
pub(crate) const N_AUDITED: Measure =
    measure("n_audited", "CASE WHEN audit_agreement IS NULL THEN 0 ELSE 1 END", Kind::Count);
pub(crate) const N_AUDIT_AGREED: Measure =
    measure("n_audit_agreed", "CASE WHEN audit_agreement = 1 THEN 1 ELSE 0 END", Kind::Count);
pub(crate) const AUDIT_COST: Measure = measure("audit_cost", "COALESCE(audit_cost, 0)", Kind::Money);

const MEASURES: [&Measure; 13] = [
    &N_CALLS,
    &N_ERRORS,
    &PROMPT_TOKENS,
    &COMPLETION_TOKENS,
    &COST,
    &N_UNDERSTUDY,
    &N_COMPARED,
    &N_AGREED,
    &UNDERSTUDY_COST,
    &LEAD_COST_AVOIDED,
    &N_AUDITED,
    &N_AUDIT_AGREED,
    &AUDIT_COST,
];

/// What the totals are grouped by: its column in `call_rollups`, and the
/// same value computed from a call. A missing task or key is `''` in both,
/// so both sources group and sort alike.
#[derive(Debug)]
pub(crate) struct Dim {
    column: &'static str,
    per_call: &'static str,
}

pub(crate) const DAY: Dim = Dim { column: "day", per_call: "created_at / 86400000" };
pub(crate) const TASK: Dim = Dim { column: "task", per_call: "COALESCE(task, '')" };
pub(crate) const MODEL: Dim = Dim { column: "model", per_call: "model" };
pub(crate) const ENDPOINT: Dim = Dim { column: "endpoint", per_call: "endpoint" };
pub(crate) const KEY_ID: Dim = Dim { column: "key_id", per_call: "COALESCE(key_id, '')" };
pub(crate) const KEY_NAME: Dim = Dim { column: "key_name", per_call: "COALESCE(key_name, '')" };

const DIMS: [&Dim; 6] = [&DAY, &TASK, &MODEL, &ENDPOINT, &KEY_ID, &KEY_NAME];

/// Where a report's totals come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Calls,
    Rollups,
}

impl Source {
    /// The rollups when they can answer `filter` exactly: no condition on a
    /// call's content, and bounds at UTC midnights.
    pub(crate) fn for_filter(filter: &CallFilter) -> Source {
        let midnight = |at: Option<time::OffsetDateTime>| {
            at.is_none_or(|at| crate::calls::unix_ms(at).rem_euclid(MS_PER_DAY) == 0)
        };
        let by_day_only = filter.status.is_none()
            && filter.served_by.is_none()
            && filter.text.as_deref().is_none_or(str::is_empty)
            && filter.limit.is_none()
            && filter.offset.is_none()
            && midnight(filter.since)
            && midnight(filter.until);
        if by_day_only {
            Source::Rollups
        } else {
            Source::Calls
        }
    }

    pub(crate) fn table(self) -> &'static str {
        match self {
            Source::Calls => "calls",
            Source::Rollups => "call_rollups",
        }
    }

    pub(crate) fn dim(self, dim: &Dim) -> &'static str {
        match self {
            Source::Calls => dim.per_call,
            Source::Rollups => dim.column,
        }
    }

    /// The sum of `measure` over the selected rows, typed the same on both
    /// backends (Postgres sums BIGINT into NUMERIC).
    pub(crate) fn sum(self, measure: &Measure) -> String {
        let summed = match self {
            Source::Calls => measure.per_call,
            Source::Rollups => measure.column,
        };
        let sql_type = match measure.kind {
            Kind::Count => "BIGINT",
            Kind::Money => "DOUBLE PRECISION",
        };
        format!("CAST(COALESCE(SUM({summed}), 0) AS {sql_type})")
    }
}

/// `INSERT INTO call_rollups … SELECT` the totals of the calls `condition`
/// selects, added to the rows already there.
fn upsert_sql(condition: &str) -> String {
    let dims: Vec<&str> = DIMS.iter().map(|dim| dim.column).collect();
    let measures: Vec<&str> = MEASURES.iter().map(|measure| measure.column).collect();
    let grouped: Vec<&str> = DIMS.iter().map(|dim| dim.per_call).collect();
    let sums: Vec<String> = MEASURES.iter().map(|measure| Source::Calls.sum(measure)).collect();
    let updates: Vec<String> =
        measures.iter().map(|column| format!("{column} = call_rollups.{column} + excluded.{column}")).collect();
    // SQLite needs the SELECT of an upsert to have a WHERE clause, or it
    // reads ON CONFLICT as a join's ON.
    format!(
        "INSERT INTO call_rollups ({}, {}) SELECT {}, {} FROM calls WHERE {condition} GROUP BY {} \
         ON CONFLICT ({}) DO UPDATE SET {}",
        dims.join(", "),
        measures.join(", "),
        grouped.join(", "),
        sums.join(", "),
        grouped.join(", "),
        dims.join(", "),
        updates.join(", ")
    )
}

/// The upsert for `INSERT_SIZES[size_idx]` call ids, built once per backend.
fn add_sql(size_idx: usize, backend: Backend) -> &'static str {
    const N_SIZES: usize = INSERT_SIZES.len();
    static TEXTS: [[std::sync::OnceLock<String>; N_SIZES]; 2] =
        [const { [const { std::sync::OnceLock::new() }; N_SIZES] }; 2];
    TEXTS[usize::from(backend == Backend::Postgres)][size_idx].get_or_init(|| {
        let placeholders: Vec<String> = (1..=INSERT_SIZES[size_idx]).map(|idx| placeholder(backend, idx)).collect();
        upsert_sql(&format!("id IN ({})", placeholders.join(", ")))
    })
}

/// The calls of a batch that its transaction inserted, for [`add`].
pub(crate) enum Counted<'a> {
    /// These ids.
    Ids(&'a [String]),
    /// SQLite only: every call of the batch, `n` of them, the last rows this
    /// connection inserted. SQLite gives a new row the largest rowid plus
    /// one, and the transaction holds the write lock from its first INSERT,
    /// so the batch's rows are the `n` highest rowids. Reading them by rowid
    /// range is a short scan where reading them by id was a lookup per call
    /// in the id index (`bench/gateway-instructions`).
    LastInserted(usize),
}

/// The upsert of the last `n` rows inserted on this connection (SQLite).
/// The bound is read once, before the scan, and the scan ends (GROUP BY
/// sorts every row) before a rollup row is written.
fn add_last_inserted_sql() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| upsert_sql("rowid > last_insert_rowid() - ?"))
}

/// Adds the calls `counted` (just inserted, in this transaction) to the
/// rollups. Ids go in statements of the INSERT sizes, the last id repeated
/// to fill one (IN ignores repeats), so every text is a cached prepared
/// statement.
pub(crate) async fn add(
    connection: &mut AnyConnection,
    backend: Backend,
    counted: Counted<'_>,
) -> Result<(), StoreError> {
    let ids = match counted {
        Counted::LastInserted(0) => return Ok(()),
        Counted::LastInserted(n_calls) => {
            debug_assert_eq!(backend, Backend::Sqlite, "rowids are SQLite's");
            let n_calls = i64::try_from(n_calls).unwrap_or(i64::MAX);
            sqlx::query(add_last_inserted_sql()).bind(n_calls).execute(&mut *connection).await?;
            return Ok(());
        }
        Counted::Ids(ids) => ids,
    };
    let largest = INSERT_SIZES[0];
    for chunk in ids.chunks(largest) {
        let size_idx = INSERT_SIZES.iter().rposition(|size| *size >= chunk.len()).unwrap_or(0);
        let mut query = sqlx::query(add_sql(size_idx, backend));
        for idx in 0..INSERT_SIZES[size_idx] {
            query = query.bind(chunk[idx.min(chunk.len() - 1)].clone());
        }
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

/// Counts the calls stored before the rollups existed, once: the marker row
/// is deleted in the same transaction, so two processes opening the store
/// together count them once (the second waits on the first's lock).
pub(crate) async fn backfill(pool: &AnyPool) -> Result<(), StoreError> {
    let mut transaction = pool.begin().await?;
    let marked = sqlx::query("DELETE FROM call_rollups_backfill").execute(&mut *transaction).await?;
    if marked.rows_affected() > 0 {
        sqlx::query(&upsert_sql("1 = 1")).execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// How many rollup rows there are (for tests and the bench: they stay few).
impl crate::Store {
    pub async fn count_rollup_rows(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM call_rollups").fetch_one(&self.pool()).await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }
}
