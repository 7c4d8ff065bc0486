//! `understudy eval`, `promote` and `report savings`, driven as a user would
//! drive them: calls imported (or served by a running gateway), a dataset
//! built, a tiny classifier trained, and the commands' output checked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::Command;

mod common;

use common::Workdir;
use serde_json::{json, Value};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

/// The lead's price: 1000 and 2000 dollars per million tokens, so that with
/// 20 prompt and 2 completion tokens a call costs $0.024, $24 per 1k calls.
const LEAD_COST_PER_1K: f64 = 24.0;

/// A target agreement the tiny classifier's validation calls can certify.
const CERTIFIABLE: &str = "0.5";

impl Workdir {
    /// A config with a replay lead for a label task (`questions`) and a
    /// generation task (`summaries`), and a local provider priced at
    /// `machine_price` an hour.
    fn new(machine_price: f64) -> Workdir {
        let config = format!(
            r#"
[store]
url = "sqlite://calls.db"

[server]
auth = "none"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[providers.local]
type = "local"
machine_price_per_hour = {machine_price}

[models.replayed]
provider = "recorded"
input_per_million = 1000.0
output_per_million = 2000.0

[tasks.questions]
lead = "replayed"

[tasks.summaries]
lead = "replayed"
kind = "generation"
# Eval asks the understudy within the task's timeout, as the gateway does;
# a loaded test machine must not turn a slow answer into a fallback.
understudy_timeout_ms = 600000
"#
        );
        Workdir::with_config(&config)
    }

    /// 90 label-task calls whose first word decides the label, imported with
    /// their usage, a dataset built and a tiny classifier trained on it long
    /// enough to learn the rule (so that its validation calls certify a
    /// modest target); also the replay lead's recordings. Returns the model
    /// version's id.
    fn trained_classifier(&self) -> String {
        understudy_trainer::testing::write_tiny_bert_dir(&self.path("tiny-bert"), WORDS, 5).expect("tiny bert");
        let starts = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
        let lines: Vec<Value> = (0..90)
            .map(|idx| {
                let (first, label) = starts[idx % 3];
                let question = format!("{first} {} {} {idx}", WORDS[3 + idx % 7], WORDS[(idx / 3) % WORDS.len()]);
                chat_line("Label the question.", &question, label, 1_700_000_000 + idx)
            })
            .collect();
        self.write_lines("calls.jsonl", &lines);
        self.write_lines("recorded.jsonl", &lines);
        self.run_ok(&["import", "--task", "questions", "calls.jsonl"]);
        self.run_ok(&["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
        let trained = self.run_json(&[
            "train",
            "--task",
            "questions",
            "--base",
            "tiny-bert",
            "--epochs",
            "20",
            "--learning-rate",
            "0.003",
            "--json",
        ]);
        trained["model_version"].as_str().expect("version id").to_string()
    }

    /// The store, opened the way the CLI opens it.
    fn with_store<T>(&self, work: impl AsyncFnOnce(&understudy_store::Store) -> T) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let url = format!("sqlite://{}", self.path("calls.db").display());
            let store = understudy_store::Store::connect(&url).await.expect("store opens");
            let result = work(&store).await;
            store.close().await;
            result
        })
    }
}

fn chat_line(system: &str, user: &str, answer: &str, created_at: usize) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "created_at": created_at,
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
    })
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Checks that `estimate` is `{"value", "ci95": [low, high]}` with low <= value <= high; returns the value.
fn bracketed(estimate: &Value, what: &str) -> f64 {
    let value = number(&estimate["value"]);
    let ci = estimate["ci95"].as_array().unwrap_or_else(|| panic!("{what}: no ci95 in {estimate}"));
    let (low, high) = (number(&ci[0]), number(&ci[1]));
    assert!(low <= value + 1e-12 && value <= high + 1e-12, "{what}: {low} <= {value} <= {high} fails");
    value
}

fn close(left: f64, right: f64) -> bool {
    (left - right).abs() <= 1e-9 * left.abs().max(right.abs()).max(1.0)
}

#[test]
fn a_label_eval_has_intervals_on_every_figure_and_a_self_contained_page() {
    let workdir = Workdir::new(0.5);
    let version = workdir.trained_classifier();
    let report = workdir.run_json(&[
        "eval",
        "--task",
        "questions",
        "--json",
        "--target-agreement",
        CERTIFIABLE,
        "--html",
        "report.html",
        "--answers",
        "answers.jsonl",
    ]);
    assert_eq!(report["kind"], "label");
    assert_eq!(number(&report["machine_price_per_hour"]), 0.5, "the config's local provider prices the machine");
    let n_test = report["n_test"].as_u64().expect("n_test");
    assert!(n_test > 0);

    // The lead answered every imported call, each at $0.024.
    let lead = &report["lead"];
    assert_eq!(lead["answered_calls"], 90);
    let lead_per_1k = bracketed(&lead["cost_per_1k"], "lead cost");
    assert!(close(lead_per_1k, LEAD_COST_PER_1K), "{lead}");
    assert!(lead["latency_p50_ms"].is_null(), "imported calls carry no latency: {lead}");

    let model = &report["models"][0];
    assert_eq!(model["model_version"], version.as_str());
    bracketed(&model["accuracy"], "accuracy");
    bracketed(&model["macro_f1"], "macro-F1");
    let per_label = model["per_label"].as_array().expect("per label");
    assert_eq!(per_label.len(), model["labels"].as_array().expect("labels").len());
    let mut support = 0;
    for metrics in per_label {
        for figure in ["precision", "recall", "f1"] {
            let value = bracketed(&metrics[figure], figure);
            assert!((0.0..=1.0).contains(&value));
        }
        support += metrics["support"].as_u64().expect("support");
    }
    assert_eq!(support, n_test);

    // Speed and cost: measured, with intervals.
    let p50 = bracketed(&model["latency_p50_ms"], "p50");
    let p95 = bracketed(&model["latency_p95_ms"], "p95");
    assert!(0.0 < p50 && p50 <= p95, "{model}");
    let cost_per_1k = bracketed(&model["cost_per_1k"], "understudy cost");
    let cpu_seconds = number(&model["cpu_seconds"]);
    assert!(cpu_seconds > 0.0, "the classifier's CPU time is measured");
    // The test split's CPU time at $0.5 an hour of the machine, shared by its cores, per 1k calls.
    let cores = number(&report["machine_cores"]);
    assert!(cores >= 1.0, "{report}");
    assert!(close(cost_per_1k, cpu_seconds * 0.5 / 3600.0 / cores / n_test as f64 * 1000.0), "{model}");

    // The answers file: one line per test row, its agreement consistent with accuracy.
    let answers: Vec<Value> = std::fs::read_to_string(workdir.path("answers.jsonl"))
        .expect("answers file")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(answers.len() as u64, n_test);
    let n_agree = answers.iter().filter(|answer| answer["agrees"] == true).count();
    assert!(close(number(&model["accuracy"]["value"]), n_agree as f64 / n_test as f64));

    // A modest target is certified; every cascade figure on test has its interval.
    let cascade = &model["cascade"];
    assert_eq!(cascade["certified"], true, "{cascade}");
    let threshold = number(&cascade["threshold"]);
    assert_eq!(number(&cascade["target_agreement"]), 0.5);
    assert_eq!(number(&cascade["delta"]), 0.05);
    // The certificate: enough validation calls served at the threshold, few
    // enough disagreeing that the exact bound on disagreement is under 1 - target.
    let (served, errors) =
        (cascade["validation_served"].as_u64().unwrap(), cascade["validation_errors"].as_u64().unwrap());
    assert!(served >= cascade["min_served"].as_u64().unwrap() && errors <= served, "{cascade}");
    assert!(number(&cascade["p_value"]) <= 0.05 && number(&cascade["risk_upper_bound"]) <= 0.5, "{cascade}");
    assert!(cascade["more_calls_needed"].is_null(), "{cascade}");
    let n_test_served =
        answers.iter().filter(|answer| answer["confidence"].as_f64().is_some_and(|c| c >= threshold)).count();
    let coverage = bracketed(&cascade["coverage"], "coverage");
    assert!(close(coverage, n_test_served as f64 / n_test as f64), "{cascade}");
    bracketed(&cascade["served_agreement"], "served agreement");
    bracketed(&cascade["overall_agreement"], "overall agreement");
    let avoided = bracketed(&cascade["lead_cost_avoided_per_1k"], "avoided");
    let compute = bracketed(&cascade["understudy_cost_per_1k"], "compute");
    let net = bracketed(&cascade["net_saved_per_1k"], "net saved");
    let share = bracketed(&cascade["net_saved_share"], "net saved share");
    assert!(close(avoided, coverage * LEAD_COST_PER_1K), "{cascade}");
    assert!(close(compute, cost_per_1k), "the understudy runs on every call: {cascade}");
    assert!(close(net, avoided - compute) && close(share, net / LEAD_COST_PER_1K), "{cascade}");

    // The page stands alone: inline SVG, no scripts, nothing fetched.
    let html = std::fs::read_to_string(workdir.path("report.html")).expect("html report");
    assert!(html.contains("<svg") && html.contains("Confusion"), "{html}");
    assert!(!html.contains("<script") && !html.contains("src=\"http") && !html.contains("<link"), "{html}");

    // The table shows the intervals too, and an explicit price overrides the config's.
    let text = workdir.run_ok(&[
        "eval",
        "--task",
        "questions",
        "--machine-price-per-hour",
        "2",
        "--target-agreement",
        CERTIFIABLE,
    ]);
    assert!(
        text.contains("$2 per machine hour") && text.contains("per label [95% CI]") && text.contains("net saved"),
        "{text}"
    );
    assert!(text.contains("cascade certified at threshold") && text.contains("with delta 0.05"), "{text}");

    // A classifier cannot answer a generation task.
    workdir.run_ok(&["import", "--task", "summaries", "calls.jsonl"]);
    workdir.run_ok(&["dataset", "build", "--task", "summaries", "--near-dup-threshold", "1.0"]);
    let stderr = workdir.run_err(&["eval", "--task", "summaries", "--model", &version]);
    assert!(stderr.contains("is a classifier") && stderr.contains("generation task"), "{stderr}");
}

#[test]
fn promote_refuses_an_uncertified_cascade_and_lead_undoes_it() {
    let workdir = Workdir::new(0.5);
    let version = workdir.trained_classifier();
    // Never evaluated: nothing certifies a threshold, so a bare cascade is refused.
    let stderr = workdir.run_err(&["promote", "--task", "questions", "--policy", "cascade"]);
    for needle in ["refusing a cascade", "understudy eval --task questions", "--policy shadow", "--threshold"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }

    // A threshold of the user's own is allowed, with a warning that nothing certifies it.
    let output =
        workdir.run(&["promote", "--task", "questions", "--policy", "cascade", "--threshold", "0.9", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let promoted: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(promoted["policy"], "cascade:0.9");
    assert_eq!(promoted["understudy"], version.as_str(), "the newest model version by default");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning") && stderr.contains("not certified"), "{stderr}");

    let stderr = workdir.run_err(&["promote", "--task", "questions", "--policy", "canary:150"]);
    assert!(stderr.contains("between 0 and 100"), "{stderr}");
    let stderr = workdir.run_err(&["promote", "--task", "nowhere", "--policy", "lead"]);
    assert!(stderr.contains("no task `nowhere`"), "{stderr}");

    let undone = workdir.run_json(&["promote", "--task", "questions", "--policy", "lead", "--json"]);
    assert_eq!(undone["policy"], "lead");
    let history = workdir
        .with_store(async |store: &understudy_store::Store| store.policy_history("questions").await.expect("history"));
    let policies: Vec<&str> = history.iter().map(|change| change.policy.as_str()).collect();
    assert_eq!(policies, ["lead", "cascade:0.9"], "failed promotions leave no trace; newest first");

    // Parameters a certificate cannot honour are refused up front.
    let stderr = workdir.run_err(&["eval", "--task", "questions", "--target-agreement", "0"]);
    assert!(stderr.contains("target agreement 0") && stderr.contains("(0, 1]"), "{stderr}");
    let stderr = workdir.run_err(&["eval", "--task", "questions", "--delta", "1"]);
    assert!(stderr.contains("delta 1 is outside (0, 1)"), "{stderr}");

    // Evaluated, but a handful of validation calls cannot certify 99.9 %
    // agreement: eval says so, writes an uncertified calibration, and a bare
    // cascade is still refused, saying what would help.
    let uncertified = ["eval", "--task", "questions", "--target-agreement", "0.999"];
    let evaluated = workdir.run_json(&[uncertified.as_slice(), &["--json"]].concat());
    let cascade = &evaluated["models"][0]["cascade"];
    assert_eq!(cascade["certified"], false, "{cascade}");
    assert!(cascade["threshold"].is_null() && cascade["coverage"].is_null(), "{cascade}");
    assert_eq!(number(&cascade["delta"]), 0.05, "the default delta");
    let path = workdir.with_store(async |store: &understudy_store::Store| {
        store.list_model_versions("questions").await.expect("versions")[0].path.clone()
    });
    let calibration: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&path).join("calibration.json")).expect("calibration"))
            .expect("json");
    assert_eq!(calibration["certified"], false, "{calibration}");
    assert!(calibration["threshold"].is_null(), "{calibration}");
    assert_eq!(number(&calibration["target_agreement"]), 0.999);
    assert!(calibration["n_validation"].as_u64().expect("n_validation") > 0, "{calibration}");
    assert_eq!(calibration["more_calls_needed"], cascade["more_calls_needed"]);
    let more = match cascade["more_calls_needed"].as_u64() {
        Some(more) => format!("about {more} more labelled calls"),
        None => "no amount of labelled calls".to_string(),
    };
    let text = workdir.run_ok(&uncertified);
    assert!(text.contains("cascade NOT certified") && text.contains(&more), "{more}: {text}");
    assert!(text.contains("the shadow policy remains available"), "{text}");
    let stderr = workdir.run_err(&["promote", "--task", "questions", "--policy", "cascade"]);
    assert!(stderr.contains("could not certify") && stderr.contains("--policy shadow"), "{stderr}");
    let more = more.replace("no amount of labelled calls", "more calls alone would not do");
    assert!(stderr.contains(&more), "{more}: {stderr}");

    // Once eval certifies a threshold, a bare cascade takes it, with no warning.
    let evaluated = workdir.run_json(&["eval", "--task", "questions", "--json", "--target-agreement", CERTIFIABLE]);
    let cascade = &evaluated["models"][0]["cascade"];
    assert_eq!(cascade["certified"], true, "{cascade}");
    let threshold = number(&cascade["threshold"]);
    let output = workdir.run(&["promote", "--task", "questions", "--policy", "cascade", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let promoted: Value = serde_json::from_slice(&output.stdout).expect("json");
    let policy = promoted["policy"].as_str().expect("policy");
    let promoted_threshold: f64 = policy.strip_prefix("cascade:").expect("a cascade").parse().expect("threshold");
    assert!((promoted_threshold - threshold).abs() < 1e-6, "{policy} vs {threshold}");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("warning"), "{output:?}");
}

/// A test call the understudy cannot answer (here an image, which a text
/// classifier cannot read: it answers 400, as it would in the gateway) is a
/// fallback to the lead, reported as such; eval still scores every other call.
#[test]
fn a_call_the_understudy_cannot_answer_is_a_fallback_not_an_error() {
    let workdir = Workdir::new(0.5);
    let version = workdir.trained_classifier();
    // The newest call, so that it lands in the test split.
    let image = json!({
        "messages": [
            {"role": "system", "content": "Label the question."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/q.png"}}]},
            {"role": "assistant", "content": "HUM"},
        ],
        "created_at": 1_800_000_000,
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
    });
    workdir.write_lines("image.jsonl", &[image]);
    workdir.run_ok(&["import", "--task", "questions", "image.jsonl"]);
    workdir.run_ok(&["dataset", "build", "--task", "questions", "--near-dup-threshold", "1.0"]);
    let args = ["eval", "--task", "questions", "--model", &version, "--target-agreement", CERTIFIABLE];
    let report = workdir.run_json(&[args.as_slice(), &["--json", "--answers", "answers.jsonl"]].concat());
    let model = &report["models"][0];
    let n_test = report["n_test"].as_u64().expect("n_test");
    assert_eq!(model["n_fallback_rows"], 1, "{model}");
    assert_eq!(model["fallback_reasons"], json!({"understudy_error": 1}), "{model}");

    let answers: Vec<Value> = std::fs::read_to_string(workdir.path("answers.jsonl"))
        .expect("answers file")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(answers.len() as u64, n_test, "every test row is scored");
    let failed: Vec<&Value> = answers.iter().filter(|answer| !answer["fallback"].is_null()).collect();
    assert_eq!(failed.len(), 1, "{answers:?}");
    assert_eq!(failed[0]["fallback"], "understudy_error");
    assert!(failed[0]["answer"].is_null() && failed[0]["agrees"] == false, "{}", failed[0]);
    let error = failed[0]["error"].as_str().expect("error");
    assert!(error.contains("400") && error.contains("no user text"), "{error}");
    // The row counts as a wrong answer, and the cascade never serves it.
    let n_agree = answers.iter().filter(|answer| answer["agrees"] == true).count();
    assert!(close(number(&model["accuracy"]["value"]), n_agree as f64 / n_test as f64), "{model}");
    assert!(model["labels"].as_array().expect("labels").contains(&json!("(no answer)")), "{model}");
    if let Some(coverage) = model["cascade"]["coverage"]["value"].as_f64() {
        assert!(coverage <= (n_test - 1) as f64 / n_test as f64 + 1e-12, "{model}");
    }
    let text = workdir.run_ok(&args);
    let expected = format!("1 of {n_test} test calls fall back to the lead at every threshold (understudy_error 1)");
    assert!(text.contains(&expected), "{text}");
}

#[test]
fn savings_totals_are_the_sums_of_the_days_and_payback_repays_training() {
    // A cheap machine and an expensive lead: the understudy saves money.
    let workdir = Workdir::new(0.01);
    let version = workdir.trained_classifier();
    let (mut child, base_url, _log) = workdir.serve();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let ask = |idx: usize| {
        let client = client.clone();
        let url = format!("{base_url}/chat/completions");
        async move {
            let question = format!("who {} {} {idx}", WORDS[3 + idx % 7], WORDS[(idx / 3) % WORDS.len()]);
            let body = json!({"model": "task:questions", "messages": [
                {"role": "system", "content": "Label the question."}, {"role": "user", "content": question},
            ]});
            let response = client.post(url).json(&body).send().await.expect("send");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("json")["model"].as_str().unwrap_or_default().to_string()
        }
    };
    // The lead answers until the understudy is promoted...
    runtime.block_on(async {
        for idx in (0..12).step_by(3) {
            assert_ne!(ask(idx).await, version, "the lead serves before the promotion");
        }
    });
    workdir.run_ok(&["promote", "--task", "questions", "--policy", "understudy"]);
    // ...then, once the gateway has polled the change, the understudy serves.
    let n_served = runtime.block_on(async {
        let mut n_served = 0;
        for attempt in 0..400 {
            let idx = (attempt * 3) % 90;
            if ask(idx).await == version {
                n_served += 1;
                if n_served == 8 {
                    break;
                }
            } else {
                assert_eq!(n_served, 0, "once promoted, the understudy keeps serving");
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        }
        n_served
    });
    assert_eq!(n_served, 8, "the promotion reached the gateway");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    assert!(child.wait().expect("wait").success(), "serve exits cleanly and writes its records");

    let report = workdir.run_json(&["report", "savings", "--task", "questions", "--json"]);
    assert_eq!(number(&report["machine_price_per_hour"]), 0.01);
    let days = report["days"].as_array().expect("days");
    let totals = &report["tasks"][0];
    assert!(!days.is_empty());
    for (day_key, total_key) in [
        ("calls", "calls"),
        ("served_by_understudy", "served_by_understudy"),
        ("lead_cost", "lead_cost"),
        ("lead_cost_avoided", "lead_cost_avoided"),
        ("understudy_cost", "understudy_cost"),
        ("net_savings", "net_savings"),
    ] {
        let sum: f64 = days.iter().map(|day| number(&day[day_key])).sum();
        assert!(close(sum, number(&totals[total_key])), "{day_key}: {sum} vs {totals}");
    }
    // 90 imported calls plus the ones served, 8 of them by the understudy.
    assert_eq!(totals["served_by_understudy"], 8);
    assert!(totals["calls"].as_u64().expect("calls") >= 90 + 4 + 8);
    assert!(number(&totals["lead_cost_avoided"]) > 0.0 && number(&totals["understudy_cost"]) > 0.0);
    assert!(close(
        number(&totals["net_savings"]),
        number(&totals["lead_cost_avoided"]) - number(&totals["understudy_cost"]) - number(&totals["audit_cost"])
    ));

    // Training is the version's wall time at the machine price; payback divides
    // it by the newest day's net savings.
    let versions = workdir.with_store(async |store: &understudy_store::Store| {
        store.list_model_versions("questions").await.expect("versions")
    });
    let training_cost = versions.iter().map(|version| version.wall_seconds).sum::<f64>() * 0.01 / 3600.0;
    assert!(training_cost > 0.0);
    assert!(close(number(&totals["training_cost"]), training_cost), "{totals}");
    let last_day_net = number(&days.last().expect("a day")["net_savings"]);
    assert!(last_day_net > 0.0, "{report}");
    assert!(close(number(&totals["payback_days"]), training_cost / last_day_net), "{totals}");

    // Eval prices the lead on the calls it answered only: the understudy's
    // eight are left out of its count and of its cost per call.
    let evaluated = workdir.run_json(&["eval", "--task", "questions", "--json"]);
    let lead = &evaluated["lead"];
    let n_lead = totals["calls"].as_u64().expect("calls") - 8;
    assert_eq!(lead["answered_calls"].as_u64(), Some(n_lead), "{lead}");
    let lead_per_1k = bracketed(&lead["cost_per_1k"], "lead cost");
    // Audits (a random few percent of the served calls) are lead calls the
    // ledger counts in the lead's cost, but not calls the lead answered.
    let answered_cost = number(&totals["lead_cost"]) - number(&totals["audit_cost"]);
    assert!(close(lead_per_1k, answered_cost / n_lead as f64 * 1000.0), "{lead} vs {totals}");
    // The four calls the gateway sent to the lead carry a latency.
    bracketed(&lead["latency_p50_ms"], "lead p50");
}

/// The real SmolLM2, zero-shot on a generation task: the report's figures
/// follow from the answers it gives.
#[test]
fn a_generation_eval_scores_a_zero_shot_base_model() {
    let Some(models_dir) = std::env::var_os("UNDERSTUDY_MODELS_DIR") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_MODELS_DIR");
        eprintln!("skipped: set UNDERSTUDY_MODELS_DIR to the folder scripts/fetch-models.sh fills");
        return;
    };
    let gguf = Path::new(&models_dir).join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "{} is missing", gguf.display());
    let gguf = gguf.display().to_string();
    let workdir = Workdir::new(0.5);
    let questions = [
        "What is the capital of France?",
        "What colour is the sky on a clear day?",
        "How many legs does a spider have?",
        "What is 2 + 2?",
        "Name a large animal with a trunk.",
        "What is the opposite of hot?",
        "Which planet do we live on?",
        "What do bees make?",
        "What is frozen water called?",
        "What is the first letter of the alphabet?",
        "How many days are in a week?",
        "What language is spoken in Spain?",
    ];
    let system = "Answer in at most three words.";
    // JSON references first: the report then adds JSON validity and field match.
    let lines = |answer_of: &dyn Fn(usize, &str) -> String| -> Vec<Value> {
        questions
            .iter()
            .enumerate()
            .map(|(idx, question)| chat_line(system, question, &answer_of(idx, question), 1_700_000_000 + idx))
            .collect()
    };
    workdir.write_lines("first.jsonl", &lines(&|idx, _| json!({"answer": format!("reply {idx}")}).to_string()));
    workdir.run_ok(&["import", "--task", "summaries", "first.jsonl"]);
    let build_for = |task: &'static str| {
        let shares = ["--test-share", "0.4", "--validation-share", "0.2"];
        [["dataset", "build", "--task", task, "--near-dup-threshold", "1.0"].as_slice(), &shares].concat()
    };
    workdir.run_ok(&build_for("summaries"));
    let eval_args = |task: &'static str| {
        vec![
            "eval",
            "--task",
            task,
            "--zero-shot",
            gguf.as_str(),
            "--max-tokens",
            "8",
            "--target-agreement",
            "0.5",
            "--json",
            "--answers",
            "answers.jsonl",
            "--html",
            "report.html",
        ]
    };
    let report = workdir.run_json(&eval_args("summaries"));
    assert_eq!(report["kind"], "generation");
    let n_test = report["n_test"].as_u64().expect("n_test") as usize;
    assert!((1..=8).contains(&n_test), "{report}");
    let model = &report["models"][0];
    assert_eq!(model["method"], "zero-shot");
    assert_eq!(model["json_answers"], true);
    let read_answers = || -> Vec<Value> {
        std::fs::read_to_string(workdir.path("answers.jsonl"))
            .expect("answers")
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect()
    };
    let answers = read_answers();
    assert_eq!(answers.len(), n_test);
    let n_valid = answers
        .iter()
        .filter(|answer| serde_json::from_str::<Value>(answer["answer"].as_str().unwrap_or("").trim()).is_ok())
        .count();
    let validity = bracketed(&model["json_validity"], "json validity");
    assert!(validity >= n_valid as f64 / n_test as f64 - 1e-9, "{model}");
    bracketed(&model["json_field_match"], "json field match");
    for figure in ["exact_match", "normalized_match", "token_f1", "rouge_l", "latency_p50_ms", "cost_per_1k"] {
        bracketed(&model[figure], figure);
    }
    // No answer matches a JSON reference, so no threshold can be certified,
    // and no number of calls would change that at this rate.
    let cascade = &model["cascade"];
    assert_eq!(cascade["certified"], false, "{cascade}");
    assert!(cascade["threshold"].is_null() && cascade["coverage"].is_null(), "{cascade}");
    assert!(cascade["more_calls_needed"].is_null(), "{cascade}");
    let html = std::fs::read_to_string(workdir.path("report.html")).expect("html report");
    assert!(html.contains("cascade NOT certified") && html.contains("no amount of labelled calls"), "{html}");
    assert!(html.contains("the shadow policy remains available"), "{html}");

    // The same prompts again, as another task whose lead said what the model
    // says on every other test row: exactly those rows match.
    let said: std::collections::HashMap<String, String> = answers
        .iter()
        .map(|answer| {
            let prompt = answer["prompt"].as_str().expect("prompt");
            let question = questions.iter().find(|question| prompt.contains(*question)).expect("a question");
            (question.to_string(), answer["answer"].as_str().expect("answer").to_string())
        })
        .collect();
    let mut echoed: Vec<&str> = said.keys().map(String::as_str).collect();
    echoed.sort_unstable();
    echoed.retain(|question| {
        let answer = &said[*question];
        !answer.trim().is_empty() && answer.trim() == answer
    });
    let echoed: Vec<&str> = echoed.into_iter().step_by(2).collect();
    assert!(!echoed.is_empty(), "the model gave no usable answer: {answers:?}");
    let second = lines(&|_, question| {
        if echoed.contains(&question) {
            said[question].clone()
        } else {
            "zzz unlikely reply".to_string()
        }
    });
    workdir.write_lines("second.jsonl", &second);
    let mut config = std::fs::read_to_string(workdir.path("understudy.toml")).expect("config");
    config.push_str("\n[tasks.echo]\nlead = \"replayed\"\nkind = \"generation\"\nunderstudy_timeout_ms = 600000\n");
    std::fs::write(workdir.path("understudy.toml"), config).expect("config");
    workdir.run_ok(&["import", "--task", "echo", "second.jsonl"]);
    workdir.run_ok(&build_for("echo"));
    let report = workdir.run_json(&eval_args("echo"));
    let model = &report["models"][0];
    assert_eq!(model["json_answers"], false);
    assert!(model.get("json_validity").is_none());
    let again = read_answers();
    assert_eq!(again.len(), n_test, "the same rows are the test split");
    // Temperature 0 repeats itself, up to a near tie: the rows are asked
    // concurrently, and a row batched with others in another order can take
    // the other side of a tie (llama.cpp's batched and single-row kernels
    // round differently). So at most one row may answer otherwise, and the
    // exact match counts the echoed rows that repeated.
    let (mut repeated, mut matched) = (0, 0);
    for answer in &again {
        let prompt = answer["prompt"].as_str().expect("prompt");
        let question = questions.iter().find(|question| prompt.contains(*question)).expect("a question");
        if answer["answer"].as_str() == Some(said[*question].as_str()) {
            repeated += 1;
            matched += usize::from(echoed.contains(question));
        }
    }
    assert!(
        repeated + 1 >= n_test,
        "temperature 0 repeats itself: {repeated} of {n_test} rows: {again:?} against {said:?}"
    );
    assert!(matched + 1 >= echoed.len(), "{matched} of {} echoed rows matched", echoed.len());
    let expected = matched as f64 / n_test as f64;
    assert!(close(bracketed(&model["exact_match"], "exact match"), expected), "{model}");
    assert!(bracketed(&model["normalized_match"], "normalized match") >= expected - 1e-9);
    assert!(bracketed(&model["rouge_l"], "rouge-l") >= expected - 1e-9);
}
