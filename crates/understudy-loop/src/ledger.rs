//! The savings ledger over the store: per task and day, what routing to the
//! understudy saved, with the training runs' cost and their payback. The
//! arithmetic is `understudy_eval::ledger`'s; this is where its counts come
//! from.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use understudy_eval::ledger::{ledger as figures_of, LedgerCounts, LedgerFigures, Share};
use understudy_store::{CallFilter, SavingsRow, Store};
use understudy_types::{machine_time_cost, OffsetDateTime};

use crate::error::Result;

/// The confidence of the ledger's intervals.
pub const CONFIDENCE: f64 = 0.95;

/// One task's totals over the ledger's days.
#[derive(Debug, Clone, Default)]
pub struct TaskSavings {
    pub task: String,
    pub counts: LedgerCounts,
    /// Training runs of the task: wall time at the machine price.
    pub training_cost: f64,
    /// Net savings on the newest day, the "current volume".
    pub net_last_day: f64,
}

impl TaskSavings {
    pub fn figures(&self) -> LedgerFigures {
        figures_of(&self.counts, CONFIDENCE)
    }

    /// Days until net savings at the newest day's volume repay training.
    pub fn payback_days(&self) -> Option<f64> {
        (self.net_last_day > 0.0).then(|| self.training_cost / self.net_last_day)
    }
}

/// The ledger: its rows per task and day, and every task's totals.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub machine_price_per_hour: f64,
    pub days: Vec<SavingsRow>,
    pub tasks: Vec<TaskSavings>,
}

/// A day's row as the ledger counts it.
pub fn counts_of(row: &SavingsRow) -> LedgerCounts {
    LedgerCounts {
        n_calls: row.n_calls,
        n_served: row.n_served_by_understudy,
        n_compared: row.n_compared,
        n_compared_agreed: row.n_agreed,
        n_audited: row.n_audited,
        n_audit_agreed: row.n_audit_agreed,
        cost: row.cost.dollars(),
        understudy_cost: row.understudy_cost.dollars(),
        lead_cost_avoided: row.lead_cost_avoided.dollars(),
        audit_cost: row.audit_cost.dollars(),
    }
}

/// A day's figures, with their intervals.
pub fn day_figures(row: &SavingsRow) -> LedgerFigures {
    figures_of(&counts_of(row), CONFIDENCE)
}

/// The ledger of the calls `filter` selects, training charged at
/// `machine_price_per_hour`.
pub async fn ledger(store: &Store, filter: &CallFilter, machine_price_per_hour: f64) -> Result<Ledger> {
    let days = store.savings_report(filter).await?;
    let mut totals: BTreeMap<String, TaskSavings> = BTreeMap::new();
    for row in &days {
        let total = totals
            .entry(row.task.clone())
            .or_insert_with(|| TaskSavings { task: row.task.clone(), ..Default::default() });
        let day = counts_of(row);
        total.counts.add(&day);
        // Rows come in day order per task: the last one seen is the newest.
        total.net_last_day = day.net_savings();
    }
    for total in totals.values_mut() {
        let versions = store.list_model_versions(&total.task).await?;
        total.training_cost =
            machine_time_cost(versions.iter().map(|version| version.wall_seconds).sum::<f64>(), machine_price_per_hour)
                .dollars();
    }
    Ok(Ledger { machine_price_per_hour, days, tasks: totals.into_values().collect() })
}

impl Ledger {
    /// The ledger as `report savings --json` prints it and the dashboard
    /// shows it: one rendering, so the two always agree.
    pub fn to_json(&self) -> Value {
        json!({
            "machine_price_per_hour": self.machine_price_per_hour,
            "days": self.days.iter().map(day_json).collect::<Vec<_>>(),
            "tasks": self.tasks.iter().map(task_json).collect::<Vec<_>>(),
        })
    }
}

/// A day as `YYYY-MM-DD` (UTC), as the ledger's rows name it.
pub fn format_day(at: OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02}", at.year(), u8::from(at.month()), at.day())
}

fn share_json(share: Option<Share>) -> Value {
    share.map_or(Value::Null, |share| {
        json!({"value": share.value, "interval": [share.lower, share.upper], "n": share.n, "confidence": CONFIDENCE})
    })
}

fn figures_json(counts: &LedgerCounts) -> serde_json::Map<String, Value> {
    let figures = figures_of(counts, CONFIDENCE);
    let value = json!({
        "calls": counts.n_calls, "served_by_understudy": counts.n_served,
        "served_share": share_json(Some(figures.coverage)),
        "served_agreement": share_json(figures.served_agreement),
        "audited": counts.n_audited,
        "fallback_agreement": share_json(figures.fallback_agreement),
        "lead_cost": counts.lead_cost(), "lead_cost_avoided": counts.lead_cost_avoided,
        "lead_cost_cut": counts.lead_cost_cut(), "understudy_cost": counts.understudy_cost,
        "audit_cost": counts.audit_cost, "net_savings": figures.net_savings,
        "net_savings_interval": [figures.net_savings_interval.0, figures.net_savings_interval.1],
    });
    match value {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

fn day_json(row: &SavingsRow) -> Value {
    let mut value = figures_json(&counts_of(row));
    value.insert("day".into(), json!(format_day(row.day)));
    value.insert("task".into(), json!(row.task));
    Value::Object(value)
}

fn task_json(total: &TaskSavings) -> Value {
    let mut value = figures_json(&total.counts);
    value.insert("task".into(), json!(total.task));
    value.insert("training_cost".into(), json!(total.training_cost));
    value.insert("payback_days".into(), json!(total.payback_days()));
    Value::Object(value)
}
