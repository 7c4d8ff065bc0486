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
//! One rule per total: each [`Measure`] (and each [`Dim`] it is grouped by)
//! holds what one call adds, twice over in one place: as SQL, to sum the
//! calls table directly (for filters the rollups cannot answer: a time that
//! is not a midnight, a status, who served, text) and to count the calls
//! stored before the rollups existed; and in Rust, to add up each batch the
//! store writes before it is written. The store suite checks on both
//! backends that the two agree, over seeded random calls.

use std::collections::btree_map::{BTreeMap, Entry};

use sqlx::{AnyConnection, AnyPool, Row};
use understudy_types::{CallRecord, Routing, ServedBy};

use crate::calls::{placeholder, saturating_i64, storable_key, storable_text, unix_ms};
use crate::{Backend, CallFilter, StoreError};

pub(crate) const MS_PER_DAY: i64 = 86_400_000;

/// What one call adds to a total, computed in Rust from the record as the
/// store keeps it: the recorder's batches are added up this way before they
/// are written (summing them back out of the table in SQL cost SQLite about
/// 14k instructions per call, `bench/gateway-instructions`). Each measure
/// holds this next to its SQL (`per_call`), and the store suite checks that
/// the two give the same totals on both backends.
#[derive(Clone, Copy)]
enum Amount {
    /// Summed as BIGINT.
    Count(fn(&CallRecord) -> i64),
    /// Summed as DOUBLE PRECISION.
    Money(fn(&CallRecord) -> f64),
}

/// One total: its column in `call_rollups`, and what one call adds to it,
/// in SQL over the calls table and in Rust over a record.
pub(crate) struct Measure {
    column: &'static str,
    per_call: &'static str,
    of_call: Amount,
}

impl std::fmt::Debug for Measure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Measure").field("column", &self.column).field("per_call", &self.per_call).finish()
    }
}

const fn measure(column: &'static str, per_call: &'static str, of_call: Amount) -> Measure {
    Measure { column, per_call, of_call }
}

fn routing(call: &CallRecord) -> Option<&Routing> {
    call.routing.as_ref()
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

pub(crate) const N_CALLS: Measure = measure("n_calls", "1", Amount::Count(|_| 1));
pub(crate) const N_ERRORS: Measure = measure(
    "n_errors",
    concat!("CASE WHEN ", crate::failed_call!(), " THEN 1 ELSE 0 END"),
    Amount::Count(|call| i64::from(!call.is_success())),
);
pub(crate) const PROMPT_TOKENS: Measure =
    measure("prompt_tokens", "prompt_tokens", Amount::Count(|call| saturating_i64(call.usage.prompt_tokens)));
pub(crate) const COMPLETION_TOKENS: Measure = measure(
    "completion_tokens",
    "completion_tokens",
    Amount::Count(|call| saturating_i64(call.usage.completion_tokens)),
);
pub(crate) const COST: Measure = measure("cost", "cost", Amount::Money(|call| call.cost.dollars()));
pub(crate) const N_UNDERSTUDY: Measure = measure(
    "n_understudy",
    "CASE WHEN served_by = 'understudy' THEN 1 ELSE 0 END",
    Amount::Count(|call| i64::from(routing(call).is_some_and(|routing| routing.served_by == ServedBy::Understudy))),
);
pub(crate) const N_COMPARED: Measure = measure(
    "n_compared",
    "CASE WHEN agreement IS NULL THEN 0 ELSE 1 END",
    Amount::Count(|call| i64::from(routing(call).is_some_and(|routing| routing.agreement.is_some()))),
);
pub(crate) const N_AGREED: Measure = measure(
    "n_agreed",
    "CASE WHEN agreement = 1 THEN 1 ELSE 0 END",
    Amount::Count(|call| i64::from(routing(call).is_some_and(|routing| routing.agreement == Some(true)))),
);
pub(crate) const UNDERSTUDY_COST: Measure = measure(
    "understudy_cost",
    "COALESCE(understudy_cost, 0)",
    Amount::Money(|call| routing(call).map_or(0.0, |routing| routing.understudy_cost.dollars())),
);
pub(crate) const LEAD_COST_AVOIDED: Measure = measure(
    "lead_cost_avoided",
    "COALESCE(lead_cost_avoided, 0)",
    Amount::Money(|call| routing(call).map_or(0.0, |routing| routing.lead_cost_avoided.dollars())),
);
pub(crate) const N_AUDITED: Measure = measure(
    "n_audited",
    "CASE WHEN audit_agreement IS NULL THEN 0 ELSE 1 END",
    Amount::Count(|call| i64::from(routing(call).is_some_and(|routing| routing.audit_agreement.is_some()))),
);
pub(crate) const N_AUDIT_AGREED: Measure = measure(
    "n_audit_agreed",
    "CASE WHEN audit_agreement = 1 THEN 1 ELSE 0 END",
    Amount::Count(|call| i64::from(routing(call).is_some_and(|routing| routing.audit_agreement == Some(true)))),
);
pub(crate) const AUDIT_COST: Measure = measure(
    "audit_cost",
    "COALESCE(audit_cost, 0)",
    Amount::Money(|call| routing(call).map_or(0.0, |routing| routing.audit_cost.dollars())),
);

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
/// same value computed from a call, in SQL over the calls table and in Rust
/// over a record (as the store keeps it: names cut and cleaned the way the
/// INSERT binds them). A missing task or key is `''` in all three, so every
/// source groups and sorts alike.
pub(crate) struct Dim {
    column: &'static str,
    per_call: &'static str,
    of_call: fn(&CallRecord) -> DimValue,
}

impl std::fmt::Debug for Dim {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Dim").field("column", &self.column).field("per_call", &self.per_call).finish()
    }
}

/// One grouping value of a rollup row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum DimValue {
    Int(i64),
    Text(String),
}

pub(crate) const DAY: Dim = Dim {
    column: "day",
    per_call: "created_at / 86400000",
    // SQL's integer division truncates toward zero, as Rust's does.
    of_call: |call| DimValue::Int(unix_ms(call.created_at) / MS_PER_DAY),
};
pub(crate) const TASK: Dim = Dim {
    column: "task",
    per_call: "COALESCE(task, '')",
    of_call: |call| DimValue::Text(call.task.as_deref().map(storable_key).unwrap_or_default()),
};
pub(crate) const MODEL: Dim =
    Dim { column: "model", per_call: "model", of_call: |call| DimValue::Text(storable_key(&call.model)) };
pub(crate) const ENDPOINT: Dim = Dim {
    column: "endpoint",
    per_call: "endpoint",
    of_call: |call| DimValue::Text(call.endpoint.as_str().to_string()),
};
pub(crate) const KEY_ID: Dim = Dim {
    column: "key_id",
    per_call: "COALESCE(key_id, '')",
    of_call: |call| DimValue::Text(call.key.as_ref().map(|key| storable_text(&key.id)).unwrap_or_default()),
};
pub(crate) const KEY_NAME: Dim = Dim {
    column: "key_name",
    per_call: "COALESCE(key_name, '')",
    of_call: |call| DimValue::Text(call.key.as_ref().map(|key| storable_text(&key.name)).unwrap_or_default()),
};

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
        let sql_type = match measure.of_call {
            Amount::Count(_) => "BIGINT",
            Amount::Money(_) => "DOUBLE PRECISION",
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

/// `INSERT INTO call_rollups … VALUES` one row of totals, added to the row
/// already there; built once per backend.
fn add_values_sql(backend: Backend) -> &'static str {
    static TEXTS: [std::sync::OnceLock<String>; 2] = [const { std::sync::OnceLock::new() }; 2];
    TEXTS[usize::from(backend == Backend::Postgres)].get_or_init(|| {
        let dims: Vec<&str> = DIMS.iter().map(|dim| dim.column).collect();
        let measures: Vec<&str> = MEASURES.iter().map(|measure| measure.column).collect();
        let placeholders: Vec<String> =
            (1..=DIMS.len() + MEASURES.len()).map(|idx| placeholder(backend, idx)).collect();
        let updates: Vec<String> =
            measures.iter().map(|column| format!("{column} = call_rollups.{column} + excluded.{column}")).collect();
        format!(
            "INSERT INTO call_rollups ({}, {}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
            dims.join(", "),
            measures.join(", "),
            placeholders.join(", "),
            dims.join(", "),
            updates.join(", ")
        )
    })
}

/// One call's amount of a measure, or a running total of them.
#[derive(Clone, Copy)]
enum Total {
    Count(i64),
    Money(f64),
}

impl Amount {
    fn of(self, call: &CallRecord) -> Total {
        match self {
            Amount::Count(of_call) => Total::Count(of_call(call)),
            Amount::Money(of_call) => Total::Money(of_call(call)),
        }
    }
}

impl Total {
    /// Adds an amount of the same measure (so of the same kind).
    fn add(&mut self, amount: Total) {
        match (self, amount) {
            (Total::Count(sum), Total::Count(count)) => *sum = sum.saturating_add(count),
            (Total::Money(sum), Total::Money(money)) => *sum += money,
            (Total::Count(_) | Total::Money(_), _) => debug_assert!(false, "a measure's amounts have one kind"),
        }
    }
}

/// Adds `calls` (just inserted, in this transaction: each call once) to the
/// rollups: their totals per rollup row, summed here by each measure's Rust
/// rule, then one upsert per row. Rows go in their key's order, so that two
/// writers on Postgres take the rows' locks in the same order and cannot
/// deadlock on each other.
pub(crate) async fn add<'a>(
    connection: &mut AnyConnection,
    backend: Backend,
    calls: impl Iterator<Item = &'a CallRecord>,
) -> Result<(), StoreError> {
    let mut rows: BTreeMap<Vec<DimValue>, Vec<Total>> = BTreeMap::new();
    for call in calls {
        let key: Vec<DimValue> = DIMS.iter().map(|dim| (dim.of_call)(call)).collect();
        let amounts = MEASURES.iter().map(|measure| measure.of_call.of(call));
        match rows.entry(key) {
            Entry::Vacant(entry) => {
                entry.insert(amounts.collect());
            }
            Entry::Occupied(mut entry) => {
                for (total, amount) in entry.get_mut().iter_mut().zip(amounts) {
                    total.add(amount);
                }
            }
        }
    }
    for (key, totals) in rows {
        let mut query = sqlx::query(add_values_sql(backend));
        for value in key {
            query = match value {
                DimValue::Int(int) => query.bind(int),
                DimValue::Text(text) => query.bind(text),
            };
        }
        for total in totals {
            query = match total {
                Total::Count(count) => query.bind(count),
                Total::Money(money) => query.bind(money),
            };
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
