//! `understudy plan`: flags into a [`PlanRequest`], one call to
//! [`understudy_loop::plan`], and the plan rendered as a table or JSON. What
//! is measured and how is the loop's (`understudy_loop::plan`).

use std::path::Path;

use understudy_loop::{Plan, PlanRequest};

use crate::cli::PlanCommand;
use crate::output::{load_config, open_store, table};

pub async fn run(config_path: &Path, command: PlanCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    if let Some(price) = command.machine_price_per_hour {
        anyhow::ensure!(price.is_finite() && price >= 0.0, "--machine-price-per-hour must be a number of at least 0");
    }
    let store = open_store(&config).await?;
    let request = PlanRequest {
        task: command.task.clone(),
        method: command.method.into(),
        base: command.base.clone(),
        sample: usize::try_from(command.sample).unwrap_or(usize::MAX),
        epochs: command.epochs,
        machine_price_per_hour: command.machine_price_per_hour,
        seed: 7,
    };
    let plan = understudy_loop::plan(&config, &store, &understudy_local::Loader, &request).await;
    store.close().await;
    let plan = plan?;
    if command.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print!("{}", text(&plan));
    }
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

fn dollars(value: f64) -> String {
    format!("${value:.6}")
}

fn text(plan: &Plan) -> String {
    let understudy = &plan.understudy;
    let lead = plan.lead_cost_per_1k();
    let mut out = format!(
        "task `{}` ({} task): a {} understudy on {}, at ${:.2} per machine hour ({} cores)\n\n",
        plan.task,
        plan.kind.as_str(),
        plan.method.as_str(),
        plan.base.display(),
        plan.machine_price,
        understudy_types::machine_cores()
    );
    let rows = vec![
        vec![
            format!("lead ({})", plan.lead.model),
            dollars(lead.value / 1000.0),
            format!("{} [{}, {}]", dollars(lead.value), dollars(lead.interval.low), dollars(lead.interval.high)),
            format!("{} recorded calls", plan.lead.n_calls),
        ],
        vec![
            "understudy".into(),
            dollars(understudy.cost_per_1k / 1000.0),
            dollars(understudy.cost_per_1k),
            format!(
                "{:.2} CPU-ms per call, {} prompts timed, {} in flight",
                understudy.cpu_seconds_per_call * 1000.0,
                understudy.n_sampled,
                understudy.in_flight
            ),
        ],
    ];
    out.push_str(&table(&["", "per call", "per 1k calls", "from"], &rows));
    out.push('\n');
    match plan.break_even_coverage {
        Some(coverage) if coverage < 1.0 => out.push_str(&format!(
            "break-even: the cascade saves once the understudy serves more than {:.2} % of calls\n",
            coverage * 100.0
        )),
        Some(_) => out.push_str("break-even: none (the understudy costs at least as much as the lead per call)\n"),
        None => out.push_str("break-even: none (the lead's calls cost nothing)\n"),
    }
    out.push_str(&format!(
        "training: about {:.0} s, {} ({})\n\n",
        plan.training.seconds,
        dollars(plan.training.cost),
        plan.training.basis
    ));
    let rows: Vec<Vec<String>> = plan
        .payback
        .iter()
        .map(|payback| {
            vec![
                format!("{:.0} %", payback.coverage * 100.0),
                dollars(payback.saving_per_1k),
                payback.calls.map_or_else(|| "never".into(), |calls| format!("{:.0}", calls.ceil())),
                match (payback.calls, payback.days) {
                    (None, _) => "never".into(),
                    (Some(_), Some(days)) => format!("{days:.1}"),
                    (Some(_), None) => "-".into(),
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["coverage", "saved per 1k calls", "calls to repay training", "days at the recorded rate"],
        &rows,
    ));
    out
}
