//! `understudy report savings`: the ledger ([`understudy_loop::ledger`])
//! rendered as tables, JSON or an HTML page.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use understudy_eval::ledger::{ledger, Share};
use understudy_loop::ledger::{counts_of, CONFIDENCE};
use understudy_loop::TaskSavings;
use understudy_store::{CallFilter, SavingsRow, Store};

use crate::html::{escape, page_start};
use crate::output::{format_day, table};

pub async fn print_savings(
    store: &Store,
    filter: &CallFilter,
    machine_price_per_hour: f64,
    as_json: bool,
    html: Option<&Path>,
) -> anyhow::Result<()> {
    let found = understudy_loop::ledger(store, filter, machine_price_per_hour).await?;
    let (rows, totals) = (&found.days, &found.tasks);
    if let Some(path) = html {
        std::fs::write(path, savings_html(rows, totals))
            .with_context(|| format!("cannot write the HTML report to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let mut stdout = std::io::stdout().lock();
    if as_json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&found.to_json())?)?;
        return Ok(());
    }
    write!(stdout, "{}", savings_table(rows, totals))?;
    Ok(())
}

/// A share as text: "98.7% [97.1, 99.5] of 312".
fn share_text(share: Option<Share>) -> String {
    share.map_or_else(
        || "-".into(),
        |share| {
            format!("{} [{:.1}, {:.1}] of {}", percent(share.value), share.lower * 100.0, share.upper * 100.0, share.n)
        },
    )
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
            let counts = counts_of(row);
            let figures = ledger(&counts, CONFIDENCE);
            vec![
                format_day(row.day),
                row.task.clone(),
                row.n_calls.to_string(),
                percent(figures.coverage.value),
                share_text(figures.served_agreement),
                share_text(figures.fallback_agreement),
                money(counts.lead_cost()),
                money(counts.lead_cost_avoided),
                money(counts.understudy_cost),
                money(counts.audit_cost),
                money(figures.net_savings),
            ]
        })
        .collect();
    let header = [
        "day (UTC)",
        "task",
        "calls",
        "understudy served",
        "served agreement (audits)",
        "agreement on fallbacks",
        "lead cost",
        "lead avoided",
        "understudy compute",
        "audits",
        "net saved",
    ];
    out.push_str(&table(&header, &day_rows));
    let task_rows: Vec<Vec<String>> = totals
        .iter()
        .map(|total| {
            let figures = total.figures();
            vec![
                total.task.clone(),
                total.counts.n_calls.to_string(),
                format!(
                    "{} [{:.1}, {:.1}]",
                    percent(figures.coverage.value),
                    figures.coverage.lower * 100.0,
                    figures.coverage.upper * 100.0
                ),
                share_text(figures.served_agreement),
                share_text(figures.fallback_agreement),
                percent(total.counts.lead_cost_cut()),
                format!(
                    "{} [{}, {}]",
                    money(figures.net_savings),
                    money(figures.net_savings_interval.0),
                    money(figures.net_savings_interval.1)
                ),
                money(total.training_cost),
                total.payback_days().map(|days| format!("{days:.2} days")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push('\n');
    let header = [
        "task",
        "calls",
        "understudy served",
        "served agreement (audits)",
        "agreement on fallbacks",
        "lead cost cut",
        "net saved",
        "training",
        "payback",
    ];
    out.push_str(&table(&header, &task_rows));
    out.push_str(
        "\nServed agreement is measured by live audits: served answers that the lead, asked in the background, \
         answered the same. Agreement on fallbacks covers calls the lead served while the understudy also answered \
         (shadow, low-confidence cascade calls). Intervals are exact 95 % (Clopper-Pearson); net savings' interval \
         follows the coverage's. Audits are counted as a cost.\n",
    );
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
            "<h2>{}</h2><p>{} calls, {} served by the understudy, served agreement from audits {}, lead cost \
             cut {}, net saved {}.</p>",
            escape(&total.task),
            total.counts.n_calls,
            percent(total.figures().coverage.value),
            escape(&share_text(total.figures().served_agreement)),
            percent(total.counts.lead_cost_cut()),
            money(total.figures().net_savings)
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
        let share = ledger(&counts_of(row), CONFIDENCE).coverage.value;
        share_points.push(format!("{:.1},{:.1}", x + bar / 2.0, base - (height - 2.0 * pad) * share));
    }
    let _ = write!(
        svg,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#337ab7\" stroke-width=\"2\"/></svg>",
        share_points.join(" ")
    );
    svg
}
