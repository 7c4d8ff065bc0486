//! The savings ledger over the store: per task and day, what routing to the
//! understudy saved, with the training runs' cost and their payback. The
//! arithmetic is `understudy_eval::ledger`'s; this is where its counts come
//! from.

use std::collections::BTreeMap;

use understudy_eval::ledger::{ledger as figures_of, LedgerCounts, LedgerFigures};
use understudy_store::{CallFilter, SavingsRow, Store};

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
            versions.iter().map(|version| version.wall_seconds).sum::<f64>() * machine_price_per_hour / 3600.0;
    }
    Ok(Ledger { machine_price_per_hour, days, tasks: totals.into_values().collect() })
}
