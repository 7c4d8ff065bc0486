//! The savings ledger: what routing to the understudy saved, per task and day.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use understudy_store::{CallFilter, SavingsRow, Store};

use crate::html::{escape, page_start};
use crate::output::{format_day, table};

/// One task's totals over the report's days.
#[derive(Debug, Clone, Default)]
pub struct TaskSavings {
    pub task: String,
    pub n_calls: u64,
    pub n_served_by_understudy: u64,
    pub n_compared: u64,
    pub n_agreed: u64,
    /// What the lead was paid: recorded cost minus the understudy's compute.
    pub lead_cost: f64,
    pub lead_cost_avoided: f64,
    pub understudy_cost: f64,
    /// Training runs of the task: wall time at the machine price.
    pub training_cost: f64,
    /// Net savings on the newest day, the "current volume".
    pub net_last_day: f64,
}

impl TaskSavings {
    pub fn net(&self) -> f64 {
        self.lead_cost_avoided - self.understudy_cost
    }

    pub fn served_share(&self) -> f64 {
        ratio(self.n_served_by_understudy, self.n_calls)
    }

    pub fn agreement(&self) -> Option<f64> {
        (self.n_compared > 0).then(|| ratio(self.n_agreed, self.n_compared))
    }

    /// Share of what the lead would have cost without routing that it did not.
    pub fn lead_cost_cut(&self) -> f64 {
        let without = self.lead_cost + self.lead_cost_avoided;
        if without > 0.0 {
            self.lead_cost_avoided / without
        } else {
            0.0
        }
    }

    /// Days until net savings at the newest day's volume repay training.
    pub fn payback_days(&self) -> Option<f64> {
        (self.net_last_day > 0.0).then(|| self.training_cost / self.net_last_day)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Rows of the savings report, and every task's totals.
pub async fn savings(
    store: &Store,
    filter: &CallFilter,
    machine_price_per_hour: f64,
) -> anyhow::Result<(Vec<SavingsRow>, Vec<TaskSavings>)> {
    let rows = store.savings_report(filter).await?;
    let mut totals: BTreeMap<String, TaskSavings> = BTreeMap::new();
    for row in &rows {
        let total = totals
            .entry(row.task.clone())
            .or_insert_with(|| TaskSavings { task: row.task.clone(), ..Default::default() });
        total.n_calls += row.n_calls;
        total.n_served_by_understudy += row.n_served_by_understudy;
        total.n_compared += row.n_compared;
        total.n_agreed += row.n_agreed;
        total.lead_cost += row.cost.dollars() - row.understudy_cost.dollars();
        total.lead_cost_avoided += row.lead_cost_avoided.dollars();
        total.understudy_cost += row.understudy_cost.dollars();
        // Rows come in day order per task: the last one seen is the newest.
        total.net_last_day = row.lead_cost_avoided.dollars() - row.understudy_cost.dollars();
    }
    for total in totals.values_mut() {
        let versions = store.list_model_versions(&total.task).await?;
        total.training_cost =
            versions.iter().map(|version| version.wall_seconds).sum::<f64>() * machine_price_per_hour / 3600.0;
    }
    Ok((rows, totals.into_values().collect()))
}

pub async fn print_savings(
    store: &Store,
    filter: &CallFilter,
    machine_price_per_hour: f64,
    as_json: bool,
    html: Option<&Path>,
) -> anyhow::Result<()> {
    let (rows, totals) = savings(store, filter, machine_price_per_hour).await?;
    if let Some(path) = html {
        std::fs::write(path, savings_html(&rows, &totals))
            .with_context(|| format!("cannot write the HTML report to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let mut stdout = std::io::stdout().lock();
    if as_json {
        let value = json!({
            "machine_price_per_hour": machine_price_per_hour,
            "days": rows.iter().map(row_json).collect::<Vec<_>>(),
            "tasks": totals.iter().map(total_json).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    write!(stdout, "{}", savings_table(&rows, &totals))?;
    Ok(())
}

fn row_json(row: &SavingsRow) -> Value {
    json!({
        "day": format_day(row.day), "task": row.task, "calls": row.n_calls,
        "served_by_understudy": row.n_served_by_understudy,
        "served_share": ratio(row.n_served_by_understudy, row.n_calls),
        "compared": row.n_compared, "agreed": row.n_agreed,
        "agreement": (row.n_compared > 0).then(|| ratio(row.n_agreed, row.n_compared)),
        "lead_cost": row.cost.dollars() - row.understudy_cost.dollars(),
        "lead_cost_avoided": row.lead_cost_avoided.dollars(),
        "understudy_cost": row.understudy_cost.dollars(),
        "net_savings": row.lead_cost_avoided.dollars() - row.understudy_cost.dollars(),
    })
}

fn total_json(total: &TaskSavings) -> Value {
    json!({
        "task": total.task, "calls": total.n_calls, "served_by_understudy": total.n_served_by_understudy,
        "served_share": total.served_share(), "compared": total.n_compared, "agreement": total.agreement(),
        "lead_cost": total.lead_cost, "lead_cost_avoided": total.lead_cost_avoided,
        "lead_cost_cut": total.lead_cost_cut(), "understudy_cost": total.understudy_cost,
        "net_savings": total.net(), "training_cost": total.training_cost, "payback_days": total.payback_days(),
    })
}

fn money(value: f64) -> String {
    if value.abs() >= 0.01 {
        format!("${value:.2}")
    } else {
        format!("${value:.6}")
    }
}

fn percent(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

pub fn savings_table(rows: &[SavingsRow], totals: &[TaskSavings]) -> String {
    let mut out = String::new();
    let day_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let lead = row.cost.dollars() - row.understudy_cost.dollars();
            vec![
                format_day(row.day),
                row.task.clone(),
                row.n_calls.to_string(),
                percent(ratio(row.n_served_by_understudy, row.n_calls)),
                if row.n_compared > 0 {
                    format!("{} of {}", percent(ratio(row.n_agreed, row.n_compared)), row.n_compared)
                } else {
                    "-".into()
                },
                money(lead),
                money(row.lead_cost_avoided.dollars()),
                money(row.understudy_cost.dollars()),
                money(row.lead_cost_avoided.dollars() - row.understudy_cost.dollars()),
            ]
        })
        .collect();
    let header = [
        "day (UTC)",
        "task",
        "calls",
        "understudy served",
        "agreement",
        "lead cost",
        "lead avoided",
        "understudy compute",
        "net saved",
    ];
    out.push_str(&table(&header, &day_rows));
    let task_rows: Vec<Vec<String>> = totals
        .iter()
        .map(|total| {
            vec![
                total.task.clone(),
                total.n_calls.to_string(),
                percent(total.served_share()),
                total.agreement().map(percent).unwrap_or_else(|| "-".into()),
                percent(total.lead_cost_cut()),
                money(total.net()),
                money(total.training_cost),
                total.payback_days().map(|days| format!("{days:.2} days")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push('\n');
    let header =
        ["task", "calls", "understudy served", "agreement", "lead cost cut", "net saved", "training", "payback"];
    out.push_str(&table(&header, &task_rows));
    out
}

/// A self-contained page: the tables, and per task a bar chart of daily lead
/// spend against the lead cost avoided, with the understudy's share.
fn savings_html(rows: &[SavingsRow], totals: &[TaskSavings]) -> String {
    let mut html = page_start("Understudy savings");
    html.push_str("<style>.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}</style>");
    let _ = write!(html, "<pre>{}</pre>", escape(&savings_table(rows, totals)));
    for total in totals {
        let days: Vec<&SavingsRow> = rows.iter().filter(|row| row.task == total.task).collect();
        let _ = write!(
            html,
            "<h2>{}</h2><p>{} calls, {} served by the understudy, lead cost cut {}, net saved {}.</p>",
            escape(&total.task),
            total.n_calls,
            percent(total.served_share()),
            percent(total.lead_cost_cut()),
            money(total.net())
        );
        html.push_str(&bar_chart(&days));
        html.push_str(
            "<div class=\"legend\"><span style=\"background:#d9534f\"></span>lead cost\
             <span style=\"background:#5cb85c\"></span>lead cost avoided\
             <span style=\"background:#337ab7\"></span>understudy share of calls</div>",
        );
    }
    html.push_str("</body></html>\n");
    html
}

fn bar_chart(days: &[&SavingsRow]) -> String {
    let (width, height, pad) = (640.0, 240.0, 40.0);
    let max = days
        .iter()
        .map(|row| row.cost.dollars() - row.understudy_cost.dollars() + row.lead_cost_avoided.dollars())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let slot = (width - 2.0 * pad) / days.len().max(1) as f64;
    let scale = |value: f64| (height - 2.0 * pad) * value / max;
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">");
    let _ = write!(svg, "<text x=\"4\" y=\"14\" font-size=\"11\">max {}</text>", money(max));
    let mut share_points = Vec::new();
    for (idx, row) in days.iter().enumerate() {
        let lead = row.cost.dollars() - row.understudy_cost.dollars();
        let avoided = row.lead_cost_avoided.dollars();
        let x = pad + idx as f64 * slot + slot * 0.15;
        let bar = slot * 0.7;
        let base = height - pad;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#d9534f\"/>",
            base - scale(lead),
            scale(lead)
        );
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#5cb85c\"/>",
            base - scale(lead) - scale(avoided),
            scale(avoided)
        );
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            x + bar / 2.0,
            height - pad + 14.0,
            format_day(row.day)
        );
        let share = ratio(row.n_served_by_understudy, row.n_calls);
        share_points.push(format!("{:.1},{:.1}", x + bar / 2.0, base - (height - 2.0 * pad) * share));
    }
    let _ = write!(
        svg,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#337ab7\" stroke-width=\"2\"/></svg>",
        share_points.join(" ")
    );
    svg
}
