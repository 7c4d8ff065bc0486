//! `understudy plan`, as a user runs it before training: calls imported with
//! their usage (so the lead's cost is known from the records), a base model
//! timed on them, and the break-even and payback read back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod common;

use common::Workdir;
use serde_json::{json, Value};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

/// The lead's price: 1000 and 2000 dollars per million tokens, so that with
/// 20 prompt and 2 completion tokens a call costs $0.024, $24 per 1k calls.
const LEAD_COST_PER_1K: f64 = 24.0;
const N_CALLS: usize = 60;

/// A label task whose 60 calls, one second apart, were answered by a priced lead.
fn workdir() -> Workdir {
    let work = Workdir::with_config(
        r#"
[store]
url = "sqlite://calls.db"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[providers.local]
type = "local"
machine_price_per_hour = 0.10

[models.replayed]
provider = "recorded"
input_per_million = 1000.0
output_per_million = 2000.0

[tasks.questions]
lead = "replayed"
"#,
    );
    understudy_trainer::testing::write_tiny_bert_dir(&work.path("tiny-bert"), WORDS, 5).expect("tiny bert");
    let starts = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
    let lines: Vec<Value> = (0..N_CALLS)
        .map(|idx| {
            let (first, label) = starts[idx % 3];
            json!({
                "messages": [
                    {"role": "system", "content": "Label the question."},
                    {"role": "user", "content": format!("{first} {} {} {idx}", WORDS[3 + idx % 7], WORDS[idx % 10])},
                    {"role": "assistant", "content": label},
                ],
                "created_at": 1_700_000_000 + idx,
                "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
            })
        })
        .collect();
    work.write_lines("calls.jsonl", &lines);
    work.run_ok(&["import", "--task", "questions", "calls.jsonl"]);
    work
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn a_plan_prices_both_sides_and_the_break_even_from_a_timed_run() {
    let work = workdir();
    let plan = work.run_json(&["plan", "--task", "questions", "--base", "tiny-bert", "--sample", "40", "--json"]);
    assert_eq!(plan["kind"], "label", "{plan}");
    assert_eq!(plan["method"], "classifier");
    assert_eq!(plan["n_calls"], N_CALLS);
    // The lead's cost is the records' (prices × usage), per 1k calls.
    let lead = number(&plan["lead"]["cost_per_1k"]["value"]);
    assert!((lead - LEAD_COST_PER_1K).abs() < 1e-9, "{plan}");
    assert_eq!(plan["lead"]["n_calls"], N_CALLS);
    // The understudy's is its measured CPU time at the machine price, shared by the machine's cores.
    let understudy = &plan["understudy"];
    assert_eq!(understudy["n_sampled"], 40);
    let cpu = number(&understudy["cpu_seconds_per_call"]);
    assert!(cpu > 0.0, "{plan}");
    let cost = number(&understudy["cost_per_1k"]);
    let cores = number(&plan["machine_cores"]);
    assert!(cores >= 1.0, "{plan}");
    assert!((cost - cpu * 0.10 / 3600.0 / cores * 1000.0).abs() < 1e-12, "{plan}");
    let break_even = number(&plan["break_even_coverage"]);
    assert!((break_even - cost / lead).abs() < 1e-12, "{plan}");
    assert!(break_even < 0.01, "a tiny model against a $24-per-1k lead: {plan}");
    // Calls one second apart: 86,400 a day.
    assert!((number(&plan["calls_per_day"]) - 86_400.0).abs() < 1e-6, "{plan}");
    // Payback: the training's cost over what a call saves at each coverage.
    let training_cost = number(&plan["training"]["cost"]);
    assert!(training_cost > 0.0, "{plan}");
    let payback = plan["payback"].as_array().unwrap();
    assert_eq!(payback.len(), 3);
    for row in payback {
        let coverage = number(&row["coverage"]);
        let saved_per_call = coverage * lead / 1000.0 - cost / 1000.0;
        assert!((number(&row["saving_per_1k"]) - saved_per_call * 1000.0).abs() < 1e-9, "{row}");
        let calls = number(&row["calls"]);
        assert!((calls - training_cost / saved_per_call).abs() <= 1e-6 * calls.max(1.0), "{row}");
        assert!((number(&row["days"]) - calls / 86_400.0).abs() < 1e-9, "{row}");
    }
    assert_eq!(plan["warnings"], json!([]), "{plan}");

    // The table says the same.
    let text = work.run_ok(&["plan", "--task", "questions", "--base", "tiny-bert", "--sample", "8"]);
    assert!(text.contains("break-even: the cascade saves once the understudy serves more than"), "{text}");
    assert!(text.contains("$24.000000"), "the lead's cost per 1k calls: {text}");
}

#[test]
fn a_plan_warns_when_the_lead_is_too_cheap_for_the_understudy_to_pay() {
    let work = workdir();
    // A machine so dear that the understudy costs more per call than the lead.
    let args =
        ["plan", "--task", "questions", "--base", "tiny-bert", "--sample", "8", "--machine-price-per-hour", "1e9"];
    let output = work.run(&[&args[..], &["--json"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let plan: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(number(&plan["break_even_coverage"]) > 1.0, "{plan}");
    for row in plan["payback"].as_array().unwrap() {
        assert_eq!(row["calls"], Value::Null, "{row}");
        assert!(number(&row["saving_per_1k"]) < 0.0, "{row}");
    }
    let warnings = plan["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{plan}");
    assert!(warnings[0].as_str().unwrap().contains("the understudy cannot pay"), "{plan}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: the lead is so cheap that the understudy cannot pay"), "{stderr}");
    let text = work.run_ok(&args);
    assert!(text.contains("break-even: none"), "{text}");
    assert!(text.contains("never"), "{text}");
}

#[test]
fn a_plan_needs_recorded_calls_and_sane_flags() {
    let work = workdir();
    let error = work.run_err(&["plan", "--task", "unknown", "--base", "tiny-bert"]);
    assert!(error.contains("task `unknown` has no successful calls"), "{error}");
    let error = work.run_err(&["plan", "--task", "questions", "--sample", "0"]);
    assert!(error.contains("--sample"), "{error}");
    let error = work.run_err(&["plan", "--task", "questions", "--machine-price-per-hour=-1"]);
    assert!(error.contains("machine-price-per-hour"), "{error}");
    let error = work.run_err(&["plan", "--task", "questions", "--base", "no-such-model"]);
    assert!(error.contains("no base model at no-such-model"), "{error}");
}
