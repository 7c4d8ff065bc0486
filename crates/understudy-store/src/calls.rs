//! Queries over the `calls` table.

use std::collections::HashSet;

use sqlx::any::AnyRow;
use sqlx::{Any, Row};
use time::OffsetDateTime;
use understudy_types::{CallRecord, Endpoint, KeyRef, Money, Routing, ServedBy, Usage, UsageSource, Uuid};

use crate::rollups::{self, Dim, Measure, Source, MS_PER_DAY};
use crate::{Backend, Store, StoreError};

const CALL_COLUMNS: &str = "id, created_at, task, model, provider, endpoint, stream, request, response, \
     prompt_tokens, completion_tokens, usage_source, latency_ms, ttft_ms, status, error, cost, \
     policy, served_by, fallback_reason, understudy_model, understudy_answer, understudy_confidence, \
     understudy_latency_ms, understudy_cost, agreement, lead_cost_avoided, \
     audit_answer, audit_agreement, audit_cost, key_id, key_name, upstream_request_id";
const N_CALL_COLUMNS: usize = 33;
/// The row counts an INSERT of calls is made with: a batch of n calls is
/// written as the largest of these that fit, then the next, and so on (7
/// calls: 5 + 1 + 1). With a handful of statement texts, every INSERT is a
/// prepared statement from the connection's cache; one text per batch size
/// made SQLite parse and plan a 32-column INSERT for nearly every batch
/// (`bench/gateway-instructions`). 100 rows keep the bind parameters under
/// SQLite's limit.
pub(crate) const INSERT_SIZES: [usize; 4] = [100, 20, 5, 1];

/// Splits `calls` into INSERTs of the sizes above: each chunk with the
/// index of its size in [`INSERT_SIZES`].
fn insert_chunks<T>(calls: &[T]) -> impl Iterator<Item = (usize, &[T])> {
    let mut rest = calls;
    std::iter::from_fn(move || {
        let size_idx = INSERT_SIZES.iter().position(|size| *size <= rest.len())?;
        let (chunk, tail) = rest.split_at(INSERT_SIZES[size_idx]);
        rest = tail;
        Some((size_idx, chunk))
    })
}

/// Which calls a query covers. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct CallFilter {
    pub task: Option<String>,
    pub model: Option<String>,
    /// Inclusive lower bound on `created_at`.
    pub since: Option<OffsetDateTime>,
    /// Exclusive upper bound on `created_at`.
    pub until: Option<OffsetDateTime>,
    pub status: Option<StatusFilter>,
    /// Who answered the client (calls without routing: the lead).
    pub served_by: Option<ServedBy>,
    /// Text the request holds (case-insensitive for ASCII letters).
    pub text: Option<String>,
    pub limit: Option<u64>,
    /// Rows skipped before the first one listed (a page's start).
    pub offset: Option<u64>,
    pub order: CallOrder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// HTTP 2xx without an error.
    Ok,
    /// Anything else.
    Error,
    /// One HTTP status code.
    Code(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallOrder {
    #[default]
    OldestFirst,
    NewestFirst,
}

/// Calls, tokens and money for one task, model and UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct CostRow {
    pub task: Option<String>,
    pub model: String,
    /// Midnight UTC of the day.
    pub day: OffsetDateTime,
    pub n_calls: u64,
    pub n_errors: u64,
    pub usage: Usage,
    pub cost: Money,
}

/// Calls, tokens and money for one gateway key and UTC day. Calls made
/// without a key (`auth = "none"`, imports) have `key: None`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyCostRow {
    pub key: Option<KeyRef>,
    /// Midnight UTC of the day.
    pub day: OffsetDateTime,
    pub n_calls: u64,
    pub n_errors: u64,
    pub usage: Usage,
    pub cost: Money,
}

/// What routing did for one task on one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct SavingsRow {
    pub task: String,
    /// Midnight UTC of the day.
    pub day: OffsetDateTime,
    pub n_calls: u64,
    pub n_served_by_understudy: u64,
    /// Calls where both the lead and the understudy answered and the lead
    /// served: fallbacks and shadow calls.
    pub n_compared: u64,
    pub n_agreed: u64,
    /// Served understudy answers that were audited against the lead.
    pub n_audited: u64,
    pub n_audit_agreed: u64,
    /// What the audits' lead calls cost (also part of `cost`).
    pub audit_cost: Money,
    /// Everything the calls cost: lead tokens plus understudy compute.
    pub cost: Money,
    pub understudy_cost: Money,
    pub lead_cost_avoided: Money,
}

/// Who made a stored call, and how it ended (for feedback on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOwner {
    pub key_id: Option<String>,
    pub succeeded: bool,
}

/// How a cost report groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CostGroup {
    #[default]
    TaskModelDay,
}

/// Bind values collected while a WHERE clause is built.
enum Bind {
    Text(String),
    Int(i64),
}

struct WhereClause {
    sql: String,
    binds: Vec<Bind>,
    backend: Backend,
}

impl WhereClause {
    /// The conditions of `filter` over `source`: over the rollups only the
    /// ones [`Source::for_filter`] lets through (task, model, whole days).
    fn over(filter: &CallFilter, backend: Backend, source: Source) -> WhereClause {
        let mut clause = WhereClause { sql: String::new(), binds: Vec::new(), backend };
        if let Some(task) = &filter.task {
            clause.push("task = ", Bind::Text(task.clone()));
        }
        if let Some(model) = &filter.model {
            clause.push("model = ", Bind::Text(model.clone()));
        }
        let (since, until) = (filter.since.map(unix_ms), filter.until.map(unix_ms));
        if source == Source::Rollups {
            if let Some(since) = since {
                clause.push("day >= ", Bind::Int(since.div_euclid(MS_PER_DAY)));
            }
            if let Some(until) = until {
                clause.push("day < ", Bind::Int(until.div_euclid(MS_PER_DAY)));
            }
            return clause;
        }
        if let Some(since) = since {
            clause.push("created_at >= ", Bind::Int(since));
        }
        if let Some(until) = until {
            clause.push("created_at < ", Bind::Int(until));
        }
        match filter.status {
            None => {}
            Some(StatusFilter::Ok) => clause.push_raw(concat!("NOT ", crate::failed_call!())),
            Some(StatusFilter::Error) => clause.push_raw(crate::failed_call!()),
            Some(StatusFilter::Code(code)) => clause.push("status = ", Bind::Int(i64::from(code))),
        }
        match filter.served_by {
            None => {}
            Some(ServedBy::Understudy) => clause.push("served_by = ", Bind::Text(ServedBy::Understudy.as_str().into())),
            Some(ServedBy::Lead) => clause.push_raw("(served_by IS NULL OR served_by <> 'understudy')"),
        }
        if let Some(text) = filter.text.as_deref().filter(|text| !text.is_empty()) {
            // LIKE's wildcards in the text match themselves.
            let escaped = text.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            clause.binds.push(Bind::Text(format!("%{escaped}%")));
            let placeholder = placeholder(clause.backend, clause.binds.len());
            clause.push_raw(&format!("LOWER(request) LIKE {placeholder} ESCAPE '\\'"));
        }
        clause
    }

    fn push_raw(&mut self, condition: &str) {
        self.sql.push_str(if self.sql.is_empty() { " WHERE " } else { " AND " });
        self.sql.push_str(condition);
    }

    fn push(&mut self, condition: &str, bind: Bind) {
        self.binds.push(bind);
        let placeholder = format!("{condition}{}", placeholder(self.backend, self.binds.len()));
        self.push_raw(&placeholder);
    }

    fn bind_all<'q>(
        self,
        mut query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
        for bind in self.binds {
            query = match bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        query
    }
}

impl Store {
    /// Writes calls in one transaction: all of them, or none.
    pub async fn insert_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        self.insert_calls_with_feedback(calls, &[]).await
    }

    /// Writes calls and verdicts on them in one transaction: all, or none.
    pub async fn insert_calls_with_feedback(
        &self,
        calls: &[CallRecord],
        feedback: &[understudy_types::Feedback],
    ) -> Result<(), StoreError> {
        self.write_calls(calls, feedback, OnConflict::Fail).await
    }

    /// The recorder's write: like [`Store::insert_calls`], except that a call
    /// whose id is already stored is skipped, so that replaying a spill file
    /// after a crash never writes a call twice nor fails on one.
    pub async fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        self.write_calls(calls, &[], OnConflict::Skip).await
    }

    async fn write_calls(
        &self,
        calls: &[CallRecord],
        feedback: &[understudy_types::Feedback],
        on_conflict: OnConflict,
    ) -> Result<(), StoreError> {
        if calls.is_empty() && feedback.is_empty() {
            return Ok(());
        }
        // The rollups must count only the calls the INSERT inserted. A fresh
        // batch inserts all of them, which `rows_affected` shows without the
        // cost of `RETURNING` (a row sent back per call). Only when a call
        // was already stored (a batch replayed, or retried after a commit
        // whose answer was lost) is the batch written again, asking which.
        if self.try_write_calls(calls, feedback, on_conflict, Inserted::AllOrNothing).await? {
            return Ok(());
        }
        let complete = self.try_write_calls(calls, feedback, on_conflict, Inserted::Returned).await?;
        debug_assert!(complete, "a batch that returns its ids is always complete");
        Ok(())
    }

    /// One attempt at [`Store::write_calls`]; `false` when, in
    /// [`Inserted::AllOrNothing`], some call was already stored (and the
    /// transaction was rolled back).
    async fn try_write_calls(
        &self,
        calls: &[CallRecord],
        feedback: &[understudy_types::Feedback],
        on_conflict: OnConflict,
        mode: Inserted,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.pool().begin().await?;
        // The ids `RETURNING` gave back, in `Inserted::Returned`.
        let mut inserted = HashSet::new();
        for (size_idx, chunk) in insert_chunks(calls) {
            let mut query = sqlx::query(insert_sql(size_idx, self.backend, on_conflict, mode));
            for call in chunk {
                let text = |value: &str| storable_text(value);
                let optional_text = |value: &Option<String>| value.as_deref().map(storable_text);
                query = query
                    .bind(call.id.to_string())
                    .bind(unix_ms(call.created_at))
                    .bind(call.task.as_deref().map(storable_key))
                    .bind(storable_key(&call.model))
                    .bind(text(&call.provider))
                    .bind(call.endpoint.as_str())
                    .bind(i64::from(call.stream))
                    .bind(text(&call.request))
                    .bind(optional_text(&call.response))
                    .bind(saturating_i64(call.usage.prompt_tokens))
                    .bind(saturating_i64(call.usage.completion_tokens))
                    .bind(call.usage_source.as_str())
                    .bind(call.latency_ms);
                query = bind_optional_f64(query, call.ttft_ms)
                    .bind(i64::from(call.status))
                    .bind(optional_text(&call.error))
                    .bind(call.cost.dollars());
                let routing = call.routing.as_ref();
                query = query
                    .bind(routing.map(|routing| text(&routing.policy)))
                    .bind(routing.map(|routing| routing.served_by.as_str()))
                    .bind(routing.and_then(|routing| optional_text(&routing.fallback_reason)))
                    .bind(routing.and_then(|routing| optional_text(&routing.understudy_model)))
                    .bind(routing.and_then(|routing| optional_text(&routing.understudy_answer)));
                query = bind_optional_f64(query, routing.and_then(|routing| routing.understudy_confidence));
                query = bind_optional_f64(query, routing.and_then(|routing| routing.understudy_latency_ms));
                query = bind_optional_f64(query, routing.map(|routing| routing.understudy_cost.dollars()))
                    .bind(routing.and_then(|routing| routing.agreement).map(i64::from));
                query = bind_optional_f64(query, routing.map(|routing| routing.lead_cost_avoided.dollars()))
                    .bind(routing.and_then(|routing| optional_text(&routing.audit_answer)))
                    .bind(routing.and_then(|routing| routing.audit_agreement).map(i64::from));
                query = bind_optional_f64(query, routing.map(|routing| routing.audit_cost.dollars()))
                    .bind(call.key.as_ref().map(|key| storable_text(&key.id)))
                    .bind(call.key.as_ref().map(|key| storable_text(&key.name)))
                    .bind(optional_text(&call.upstream_request_id));
            }
            match mode {
                Inserted::Returned => {
                    for row in query.fetch_all(&mut *transaction).await? {
                        inserted.insert(row.try_get::<String, _>(0)?);
                    }
                }
                Inserted::AllOrNothing => {
                    let n_inserted = query.execute(&mut *transaction).await?.rows_affected();
                    if n_inserted != chunk.len() as u64 {
                        transaction.rollback().await?;
                        return Ok(false);
                    }
                }
            }
        }
        // Only the calls this batch inserted: a replayed call already
        // stored is skipped by the INSERT, and must not count twice; nor
        // must a call repeated within the batch (the INSERT keeps its first).
        match mode {
            Inserted::AllOrNothing => rollups::add(&mut transaction, self.backend, calls.iter()).await?,
            Inserted::Returned => {
                let counted = calls.iter().filter(|call| inserted.remove(&call.id.to_string()));
                rollups::add(&mut transaction, self.backend, counted).await?;
            }
        }
        for verdict in feedback {
            crate::feedback::insert_feedback(self.backend, &mut *transaction, verdict).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    /// Calls matching `filter`, in the filter's order.
    pub async fn list_calls(&self, filter: &CallFilter) -> Result<Vec<CallRecord>, StoreError> {
        let clause = WhereClause::over(filter, self.backend, Source::Calls);
        let order = match filter.order {
            CallOrder::OldestFirst => "ASC",
            CallOrder::NewestFirst => "DESC",
        };
        let mut sql = format!("SELECT {CALL_COLUMNS} FROM calls{} ORDER BY created_at {order}, id {order}", clause.sql);
        match (filter.limit, filter.offset) {
            (Some(limit), _) => sql.push_str(&format!(" LIMIT {limit}")),
            // SQLite takes no OFFSET without a LIMIT; -1 is its "no limit".
            (None, Some(_)) if self.backend == Backend::Sqlite => sql.push_str(" LIMIT -1"),
            (None, _) => {}
        }
        if let Some(offset) = filter.offset {
            sql.push_str(&format!(" OFFSET {offset}"));
        }
        let rows = clause.bind_all(sqlx::query(&sql)).fetch_all(&self.pool()).await?;
        rows.iter().map(call_from_row).collect()
    }

    /// One call by id, or by a unique prefix of its id.
    pub async fn get_call(&self, id_or_prefix: &str) -> Result<Vec<CallRecord>, StoreError> {
        // A whole id is found through the primary key; LIKE cannot use it
        // (a scan of every call: 2 s at 10M calls).
        let exact = format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = {}", placeholder(self.backend, 1));
        let rows = sqlx::query(&exact).bind(id_or_prefix.to_string()).fetch_all(&self.pool()).await?;
        if !rows.is_empty() {
            return rows.iter().map(call_from_row).collect();
        }
        let pattern = format!("{}%", id_or_prefix.replace(['%', '_'], ""));
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM calls WHERE id LIKE {} ORDER BY id LIMIT 2",
            placeholder(self.backend, 1)
        );
        let rows = sqlx::query(&sql).bind(pattern).fetch_all(&self.pool()).await?;
        rows.iter().map(call_from_row).collect()
    }

    /// When the `n`th newest call matching `filter` was made (`None` when
    /// fewer match): where a bounded scan of the newest calls starts.
    pub async fn nth_newest_call_time(
        &self,
        filter: &CallFilter,
        n: u64,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let clause = WhereClause::over(filter, self.backend, Source::Calls);
        let sql = format!(
            "SELECT created_at FROM calls{} ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET {}",
            clause.sql,
            n.saturating_sub(1)
        );
        let row = clause.bind_all(sqlx::query(&sql)).fetch_optional(&self.pool()).await?;
        row.map(|row| Ok(from_unix_ms(row.try_get(0)?))).transpose()
    }

    /// How many calls match `filter`, counted no further than `cap`: a page
    /// needs "over 1,000", not a count of ten million rows.
    pub async fn count_calls_up_to(&self, filter: &CallFilter, cap: u64) -> Result<u64, StoreError> {
        let clause = WhereClause::over(filter, self.backend, Source::Calls);
        let sql = format!("SELECT COUNT(*) FROM (SELECT 1 FROM calls{} LIMIT {cap}) AS capped", clause.sql);
        let row = clause.bind_all(sqlx::query(&sql)).fetch_one(&self.pool()).await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    pub async fn count_calls(&self, filter: &CallFilter) -> Result<u64, StoreError> {
        let clause = WhereClause::over(filter, self.backend, Source::Calls);
        let sql = format!("SELECT COUNT(*) FROM calls{}", clause.sql);
        let row = clause.bind_all(sqlx::query(&sql)).fetch_one(&self.pool()).await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    /// Calls, tokens and money per task, model and UTC day.
    pub async fn cost_report(&self, filter: &CallFilter) -> Result<Vec<CostRow>, StoreError> {
        use rollups::{DAY, MODEL, TASK};
        let source = Source::for_filter(filter);
        let clause = WhereClause::over(filter, self.backend, source);
        let sql = report_sql(source, &clause.sql, &[&TASK, &MODEL, &DAY], &DayTotals::MEASURES, &[&DAY, &TASK, &MODEL]);
        let rows = clause.bind_all(sqlx::query(&sql)).fetch_all(&self.pool()).await?;
        rows.iter()
            .map(|row| {
                let totals = DayTotals::read(row)?;
                Ok(CostRow {
                    task: some_name(row.try_get(0)?),
                    model: row.try_get(1)?,
                    day: totals.day,
                    n_calls: totals.n_calls,
                    n_errors: totals.n_errors,
                    usage: totals.usage,
                    cost: totals.cost,
                })
            })
            .collect()
    }
}

/// What every cost report ends with, after its two grouping columns: the
/// UTC day, then the calls, errors, tokens and money of the group.
struct DayTotals {
    day: OffsetDateTime,
    n_calls: u64,
    n_errors: u64,
    usage: Usage,
    cost: Money,
}

impl DayTotals {
    const MEASURES: [&'static Measure; 5] =
        [&rollups::N_CALLS, &rollups::N_ERRORS, &rollups::PROMPT_TOKENS, &rollups::COMPLETION_TOKENS, &rollups::COST];

    /// Reads columns 2 (the day) to 7 of a row of `report_sql` grouped by
    /// two dimensions and the day, with [`DayTotals::MEASURES`].
    fn read(row: &AnyRow) -> Result<DayTotals, StoreError> {
        let day: i64 = row.try_get(2)?;
        Ok(DayTotals {
            day: from_unix_ms(day * MS_PER_DAY),
            n_calls: nonnegative(row.try_get(3)?),
            n_errors: nonnegative(row.try_get(4)?),
            usage: Usage {
                prompt_tokens: nonnegative(row.try_get(5)?),
                completion_tokens: nonnegative(row.try_get(6)?),
            },
            cost: Money(row.try_get(7)?),
        })
    }
}

/// `SELECT dims, sums FROM source WHERE … GROUP BY dims ORDER BY order`.
fn report_sql(source: Source, conditions: &str, dims: &[&Dim], measures: &[&Measure], order: &[&Dim]) -> String {
    let dims: Vec<&str> = dims.iter().map(|dim| source.dim(dim)).collect();
    let sums: Vec<String> = measures.iter().map(|measure| source.sum(measure)).collect();
    let order: Vec<&str> = order.iter().map(|dim| source.dim(dim)).collect();
    format!(
        "SELECT {}, {} FROM {}{conditions} GROUP BY {} ORDER BY {}",
        dims.join(", "),
        sums.join(", "),
        source.table(),
        dims.join(", "),
        order.join(", ")
    )
}

/// A name a call may lack (task, key), which reports group as `''`.
fn some_name(name: String) -> Option<String> {
    Some(name).filter(|name| !name.is_empty())
}

impl Store {
    /// Calls, tokens and money per gateway key and UTC day.
    pub async fn key_cost_report(&self, filter: &CallFilter) -> Result<Vec<KeyCostRow>, StoreError> {
        use rollups::{DAY, KEY_ID, KEY_NAME};
        // A key's name is fixed at creation, so grouping by it too adds no rows.
        let source = Source::for_filter(filter);
        let clause = WhereClause::over(filter, self.backend, source);
        let sql = report_sql(
            source,
            &clause.sql,
            &[&KEY_ID, &KEY_NAME, &DAY],
            &DayTotals::MEASURES,
            &[&DAY, &KEY_NAME, &KEY_ID],
        );
        let rows = clause.bind_all(sqlx::query(&sql)).fetch_all(&self.pool()).await?;
        rows.iter()
            .map(|row| {
                let totals = DayTotals::read(row)?;
                let name: String = row.try_get(1)?;
                Ok(KeyCostRow {
                    key: some_name(row.try_get(0)?).map(|id| KeyRef { id, name }),
                    day: totals.day,
                    n_calls: totals.n_calls,
                    n_errors: totals.n_errors,
                    usage: totals.usage,
                    cost: totals.cost,
                })
            })
            .collect()
    }

    /// What the calls of a key cost since `since`: the spend a budget
    /// starts from after a restart.
    pub async fn key_spend_since(&self, key_id: &str, since: OffsetDateTime) -> Result<Money, StoreError> {
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) FROM calls \
             WHERE key_id = {} AND created_at >= {}",
            placeholder(self.backend, 1),
            placeholder(self.backend, 2)
        );
        let row = sqlx::query(&sql).bind(key_id.to_string()).bind(unix_ms(since)).fetch_one(&self.pool()).await?;
        Ok(Money(row.try_get(0)?))
    }

    /// The key a stored call was made with and whether it succeeded, or
    /// `None` when no call has this id.
    pub async fn call_owner(&self, id: Uuid) -> Result<Option<CallOwner>, StoreError> {
        let sql = format!("SELECT key_id, status, error FROM calls WHERE id = {}", placeholder(self.backend, 1));
        let row = sqlx::query(&sql).bind(id.to_string()).fetch_optional(&self.pool()).await?;
        let Some(row) = row else { return Ok(None) };
        let status: i64 = row.try_get(1)?;
        let error: Option<String> = row.try_get(2)?;
        Ok(Some(CallOwner { key_id: row.try_get(0)?, succeeded: (200..300).contains(&status) && error.is_none() }))
    }

    /// Per task and UTC day: how many conversation calls (chat, responses) the understudy served, how
    /// often it agreed with the lead, and the money on each side.
    pub async fn savings_report(&self, filter: &CallFilter) -> Result<Vec<SavingsRow>, StoreError> {
        use rollups::{
            AUDIT_COST, COST, DAY, ENDPOINT, LEAD_COST_AVOIDED, N_AGREED, N_AUDITED, N_AUDIT_AGREED, N_CALLS,
            N_COMPARED, N_UNDERSTUDY, TASK, UNDERSTUDY_COST,
        };
        let source = Source::for_filter(filter);
        let mut clause = WhereClause::over(filter, self.backend, source);
        clause.push_raw(&format!("{} <> '' AND {} IN ('chat', 'responses')", source.dim(&TASK), source.dim(&ENDPOINT)));
        let sql = report_sql(
            source,
            &clause.sql,
            &[&TASK, &DAY],
            &[
                &N_CALLS,
                &N_UNDERSTUDY,
                &N_COMPARED,
                &N_AGREED,
                &COST,
                &UNDERSTUDY_COST,
                &LEAD_COST_AVOIDED,
                &N_AUDITED,
                &N_AUDIT_AGREED,
                &AUDIT_COST,
            ],
            &[&TASK, &DAY],
        );
        let rows = clause.bind_all(sqlx::query(&sql)).fetch_all(&self.pool()).await?;
        rows.iter()
            .map(|row| {
                let day: i64 = row.try_get(1)?;
                Ok(SavingsRow {
                    task: row.try_get(0)?,
                    day: from_unix_ms(day * MS_PER_DAY),
                    n_calls: nonnegative(row.try_get(2)?),
                    n_served_by_understudy: nonnegative(row.try_get(3)?),
                    n_compared: nonnegative(row.try_get(4)?),
                    n_agreed: nonnegative(row.try_get(5)?),
                    cost: Money(row.try_get(6)?),
                    understudy_cost: Money(row.try_get(7)?),
                    lead_cost_avoided: Money(row.try_get(8)?),
                    n_audited: nonnegative(row.try_get(9)?),
                    n_audit_agreed: nonnegative(row.try_get(10)?),
                    audit_cost: Money(row.try_get(11)?),
                })
            })
            .collect()
    }
}

impl Store {
    /// A task's audits since `since`: how many served answers were audited
    /// and how many agreed with the lead. The gateway's guardrail starts
    /// from these after a restart.
    pub async fn audit_counts(&self, task: &str, since: OffsetDateTime) -> Result<(u64, u64), StoreError> {
        let sql = format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(audit_agreement), 0) AS BIGINT) FROM calls \
             WHERE task = {} AND created_at >= {} AND audit_agreement IS NOT NULL",
            placeholder(self.backend, 1),
            placeholder(self.backend, 2)
        );
        let row = sqlx::query(&sql).bind(task.to_string()).bind(unix_ms(since)).fetch_one(&self.pool()).await?;
        Ok((nonnegative(row.try_get(0)?), nonnegative(row.try_get(1)?)))
    }
}

/// The `idx`th (1-based) bind placeholder. Postgres needs `$N`. SQLite takes
/// `$N` too, but sqlx then looks each name up in a list, which makes binding a
/// many-row INSERT quadratic; positional `?` binds in constant time.
pub(crate) fn placeholder(backend: Backend, idx: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_string(),
        Backend::Postgres => format!("${idx}"),
    }
}

/// What an INSERT does with a call whose id is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnConflict {
    Fail,
    Skip,
}

/// How a batch's INSERT tells which calls it inserted (for the rollups).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inserted {
    /// It inserted all of them, or the batch is rolled back (the count of
    /// rows it wrote says which).
    AllOrNothing,
    /// `RETURNING id`: each inserted call's id.
    Returned,
}

/// The longest `task` or `model` stored whole. Both are indexed, and a
/// Postgres B-tree entry must fit in about 2.7 KB: a longer value would make
/// the whole batch fail. Real names are far shorter.
const MAX_KEY_BYTES: usize = 512;
/// Appended to a key that was cut to [`MAX_KEY_BYTES`].
const CUT_MARK: &str = "…[cut]";

/// Text as the store keeps it. Postgres rejects U+0000 in TEXT (SQLite takes
/// it), so it becomes U+FFFD on both backends: one rule, and a record never
/// fails for its content. JSON bodies escape it as `\u0000` and are untouched.
pub(crate) fn storable_text(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_string()
    }
}

/// An indexed name as the store keeps it: [`storable_text`], cut to
/// [`MAX_KEY_BYTES`] at a character boundary and marked when longer.
pub(crate) fn storable_key(text: &str) -> String {
    let text = storable_text(text);
    if text.len() <= MAX_KEY_BYTES {
        return text;
    }
    let mut end = MAX_KEY_BYTES - CUT_MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &text[..end])
}

/// Binds an optional float so that Postgres always sees DOUBLE PRECISION.
///
/// sqlx 0.8's `Any` driver sends a NULL `f64` as a NULL `f32` (REAL), and a
/// prepared statement keeps the parameter types of its first execution: a
/// batch whose first row had no `ttft_ms` made every later batch with one
/// fail with "incorrect binary data format". A NULL `f32` is sent as a NULL
/// `f64`, so it is the one to bind. SQLite does not care either way.
fn bind_optional_f64<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    value: Option<f64>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    match value {
        Some(value) => query.bind(value),
        None => query.bind(None::<f32>),
    }
}

/// The INSERT of `INSERT_SIZES[size_idx]` calls, built once.
fn insert_sql(size_idx: usize, backend: Backend, on_conflict: OnConflict, mode: Inserted) -> &'static str {
    const N_SIZES: usize = INSERT_SIZES.len();
    static TEXTS: [[[[std::sync::OnceLock<String>; N_SIZES]; 2]; 2]; 2] =
        [const { [const { [const { [const { std::sync::OnceLock::new() }; N_SIZES] }; 2] }; 2] }; 2];
    let backend_idx = usize::from(backend == Backend::Postgres);
    let conflict_idx = usize::from(on_conflict == OnConflict::Skip);
    let mode_idx = usize::from(mode == Inserted::Returned);
    TEXTS[backend_idx][conflict_idx][mode_idx][size_idx]
        .get_or_init(|| build_insert_sql(INSERT_SIZES[size_idx], backend, on_conflict, mode))
        .as_str()
}

fn build_insert_sql(n_rows: usize, backend: Backend, on_conflict: OnConflict, mode: Inserted) -> String {
    let mut sql = format!("INSERT INTO calls ({CALL_COLUMNS}) VALUES ");
    for row_idx in 0..n_rows {
        if row_idx > 0 {
            sql.push(',');
        }
        sql.push('(');
        for column_idx in 0..N_CALL_COLUMNS {
            if column_idx > 0 {
                sql.push(',');
            }
            sql.push_str(&placeholder(backend, row_idx * N_CALL_COLUMNS + column_idx + 1));
        }
        sql.push(')');
    }
    if on_conflict == OnConflict::Skip {
        // Both backends take this form (SQLite since 3.24).
        sql.push_str(" ON CONFLICT (id) DO NOTHING");
    }
    if mode == Inserted::Returned {
        // The ids actually inserted, for the rollups (both backends; SQLite
        // since 3.35).
        sql.push_str(" RETURNING id");
    }
    sql
}

fn call_from_row(row: &AnyRow) -> Result<CallRecord, StoreError> {
    let id_text: String = row.try_get("id")?;
    let corrupt = |message: String| StoreError::CorruptRow { id: id_text.clone(), message };
    let id = Uuid::parse_str(&id_text).map_err(|error| corrupt(format!("bad id: {error}")))?;
    let endpoint_text: String = row.try_get("endpoint")?;
    let endpoint =
        Endpoint::parse(&endpoint_text).ok_or_else(|| corrupt(format!("unknown endpoint `{endpoint_text}`")))?;
    let usage_source_text: String = row.try_get("usage_source")?;
    let usage_source = UsageSource::parse(&usage_source_text)
        .ok_or_else(|| corrupt(format!("unknown usage source `{usage_source_text}`")))?;
    let status: i64 = row.try_get("status")?;
    Ok(CallRecord {
        id,
        created_at: from_unix_ms(row.try_get("created_at")?),
        task: row.try_get("task")?,
        model: row.try_get("model")?,
        provider: row.try_get("provider")?,
        endpoint,
        stream: row.try_get::<i64, _>("stream")? != 0,
        request: row.try_get("request")?,
        response: row.try_get("response")?,
        usage: Usage {
            prompt_tokens: nonnegative(row.try_get("prompt_tokens")?),
            completion_tokens: nonnegative(row.try_get("completion_tokens")?),
        },
        usage_source,
        latency_ms: row.try_get("latency_ms")?,
        ttft_ms: row.try_get("ttft_ms")?,
        status: u16::try_from(status).map_err(|_| corrupt(format!("bad status {status}")))?,
        error: row.try_get("error")?,
        cost: Money(row.try_get("cost")?),
        routing: routing_from_row(row, &corrupt)?,
        key: key_from_row(row)?,
        upstream_request_id: row.try_get("upstream_request_id")?,
    })
}

fn key_from_row(row: &AnyRow) -> Result<Option<KeyRef>, StoreError> {
    let id: Option<String> = row.try_get("key_id")?;
    let name: Option<String> = row.try_get("key_name")?;
    Ok(id.map(|id| KeyRef { id, name: name.unwrap_or_default() }))
}

fn routing_from_row(row: &AnyRow, corrupt: &dyn Fn(String) -> StoreError) -> Result<Option<Routing>, StoreError> {
    let Some(policy) = row.try_get::<Option<String>, _>("policy")? else {
        return Ok(None);
    };
    let served_by_text: Option<String> = row.try_get("served_by")?;
    let served_by_text = served_by_text.unwrap_or_default();
    let served_by =
        ServedBy::parse(&served_by_text).ok_or_else(|| corrupt(format!("unknown served_by `{served_by_text}`")))?;
    Ok(Some(Routing {
        policy,
        served_by,
        fallback_reason: row.try_get("fallback_reason")?,
        understudy_model: row.try_get("understudy_model")?,
        understudy_answer: row.try_get("understudy_answer")?,
        understudy_confidence: row.try_get("understudy_confidence")?,
        understudy_latency_ms: row.try_get("understudy_latency_ms")?,
        understudy_cost: Money(row.try_get::<Option<f64>, _>("understudy_cost")?.unwrap_or(0.0)),
        agreement: row.try_get::<Option<i64>, _>("agreement")?.map(|agreement| agreement != 0),
        lead_cost_avoided: Money(row.try_get::<Option<f64>, _>("lead_cost_avoided")?.unwrap_or(0.0)),
        audit_answer: row.try_get("audit_answer")?,
        audit_agreement: row.try_get::<Option<i64>, _>("audit_agreement")?.map(|agreement| agreement != 0),
        audit_cost: Money(row.try_get::<Option<f64>, _>("audit_cost")?.unwrap_or(0.0)),
    }))
}

pub(crate) fn unix_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn nonnegative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_in_a_few_statement_shapes_covering_every_call_once() {
        let calls: Vec<usize> = (0..257).collect();
        for n_calls in [0, 1, 4, 7, 99, 100, 257] {
            let chunks: Vec<(usize, &[usize])> = insert_chunks(&calls[..n_calls]).collect();
            let sizes: Vec<usize> = chunks.iter().map(|(_, chunk)| chunk.len()).collect();
            assert!(chunks.iter().all(|(size_idx, chunk)| INSERT_SIZES[*size_idx] == chunk.len()));
            let covered: Vec<usize> = chunks.iter().flat_map(|(_, chunk)| chunk.iter().copied()).collect();
            assert_eq!(covered, calls[..n_calls], "{n_calls} calls");
            let expected: &[usize] = match n_calls {
                0 => &[],
                1 => &[1],
                4 => &[1, 1, 1, 1],
                7 => &[5, 1, 1],
                99 => &[20, 20, 20, 20, 5, 5, 5, 1, 1, 1, 1],
                100 => &[100],
                _ => &[100, 100, 20, 20, 5, 5, 5, 1, 1],
            };
            assert_eq!(sizes, expected);
        }
        let text = insert_sql(2, Backend::Postgres, OnConflict::Skip, Inserted::Returned);
        assert!(text.ends_with("($133,$134,$135,$136,$137,$138,$139,$140,$141,$142,$143,$144,$145,$146,$147,$148,$149,$150,$151,$152,$153,$154,$155,$156,$157,$158,$159,$160,$161,$162,$163,$164,$165) ON CONFLICT (id) DO NOTHING RETURNING id"), "{text}");
        assert!(
            std::ptr::eq(text, insert_sql(2, Backend::Postgres, OnConflict::Skip, Inserted::Returned)),
            "built once"
        );
        let counted = insert_sql(2, Backend::Postgres, OnConflict::Skip, Inserted::AllOrNothing);
        assert!(counted.ends_with("$165) ON CONFLICT (id) DO NOTHING"), "{counted}");
    }
}
