//! The dashboard (`/ui`) in a real headless Chromium: `understudy serve`
//! with keys on and recorded traffic, `report savings --json` for the
//! figures, then `crates/understudy-dashboard/tests/browser.mjs` (Node and
//! playwright-core) signs in as a non-admin and as an admin, compares every
//! figure, filters calls, exports, promotes and rolls back.
//!
//! Gated: it runs when `UNDERSTUDY_PLAYWRIGHT_DIR` (a folder whose
//! node_modules holds playwright-core) is set and /usr/bin/chromium exists;
//! scripts/test.sh installs both, and CI must run it.
//! `UNDERSTUDY_SCREENSHOT_DIR` saves a PNG of each page (docs/ holds them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::Command;

mod common;

use common::Workdir;
use serde_json::{json, Value};

const N_GOOD: usize = 60;
const N_FAILED: usize = 3;
const PROBE: &str = "Which river runs through Baikal-17?";

fn question(idx: usize) -> String {
    if idx == 17 {
        return PROBE.to_string();
    }
    format!("Question number {idx}: how many people live in city {idx}?")
}

/// The evaluated version's confusion matrix on test (rows: the lead).
const CONFUSION: [[u64; 3]; 3] = [[40, 2, 1], [3, 30, 0], [0, 1, 23]];

/// A model version of task `news` with the calibration file `understudy
/// eval` writes into a version's folder (certificate, test figures,
/// confusion matrix, coverage–agreement curve), for the task page's eval
/// section. No training here: the page reads the file, whoever wrote it.
fn register_evaluated_version(workdir: &Workdir) {
    let folder = workdir.path("mv-news");
    std::fs::create_dir_all(&folder).unwrap();
    let curve: Vec<Value> = (0..=10)
        .map(|step| {
            let threshold = 1.0 - f64::from(step) * 0.05;
            json!({"threshold": threshold, "coverage": f64::from(step) / 10.0,
                   "served_agreement": 1.0 - f64::from(step) * 0.006})
        })
        .collect();
    let calibration = json!({
        "dataset": "ds-news", "certified": true, "threshold": 0.75, "target_agreement": 0.95, "delta": 0.05,
        "n_validation": 400, "n_served": 250, "n_errors": 4, "risk_upper_bound": 0.041, "more_calls_needed": null,
        "test_coverage": 0.5, "test_served_agreement": 0.97, "test_overall_agreement": 0.985,
        "labels": ["business", "sport", "tech"], "confusion": CONFUSION, "curve": curve,
    });
    std::fs::write(folder.join("calibration.json"), calibration.to_string()).unwrap();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let url = format!("sqlite://{}", workdir.path("calls.db").display());
        let store = understudy_store::Store::connect(&url).await.expect("store");
        let version = understudy_store::ModelVersionRecord {
            id: "mv-news-1".into(),
            task: "news".into(),
            dataset_id: "ds-news".into(),
            method: "classifier".into(),
            base_model: "minilm".into(),
            path: folder.display().to_string(),
            created_at: understudy_types::OffsetDateTime::now_utc(),
            wall_seconds: 12.0,
            metrics: "{}".into(),
        };
        store.register_model_version(&version).await.expect("register");
        store.close().await;
    });
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let Some(playwright) = std::env::var_os("UNDERSTUDY_PLAYWRIGHT_DIR") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set UNDERSTUDY_PLAYWRIGHT_DIR (scripts/test.sh does)");
        eprintln!("skipped: set UNDERSTUDY_PLAYWRIGHT_DIR to a folder with playwright-core installed");
        return;
    };
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium package is needed (scripts/test.sh installs it)"
    );
    let workdir = Workdir::with_config(
        r#"
[store]
url = "sqlite://calls.db"

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[models.replayed]
provider = "recorded"
input_per_million = 2.5
output_per_million = 10.0

[models.cheap]
provider = "recorded"
input_per_million = 0.1
output_per_million = 0.4

[tasks.trec]
lead = "replayed"
understudy = "cheap"
target_agreement = 0.9

[tasks.news]
lead = "replayed"
target_agreement = 0.95
"#,
    );
    register_evaluated_version(&workdir);
    let lines: Vec<Value> = (0..N_GOOD)
        .map(|idx| {
            json!({"messages": [
                {"role": "system", "content": "Answer with one label."},
                {"role": "user", "content": question(idx)},
                {"role": "assistant", "content": if idx % 3 == 0 { "LOC" } else { "NUM" }},
            ]})
        })
        .collect();
    workdir.write_lines("recorded.jsonl", &lines);
    let admin = workdir.run_ok(&["keys", "create", "--name", "ops", "--admin"]).trim().to_string();
    let viewer = workdir.run_ok(&["keys", "create", "--name", "team-a", "--tasks", "trec"]).trim().to_string();

    let (child, base_url, log) = workdir.serve();
    // Killed if a check below panics, so no gateway outlives the test.
    let mut child = KillOnDrop(child);
    let base = base_url.trim_end_matches("/v1").to_string();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    runtime.block_on(async {
        for idx in 0..N_GOOD + N_FAILED {
            let model = if idx < N_GOOD { "task:trec" } else { "no-such-model" };
            let body = json!({"model": model, "messages": [
                {"role": "system", "content": "Answer with one label."}, {"role": "user", "content": question(idx)},
            ]});
            let response = client
                .post(format!("{base_url}/chat/completions"))
                .bearer_auth(if idx < N_GOOD { &viewer } else { &admin })
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status().is_success(), idx < N_GOOD, "call {idx}: {}", response.status());
        }
        for _ in 0..2000 {
            let health: Value = client
                .get(format!("{base}/healthz"))
                .bearer_auth(&admin)
                .send()
                .await
                .expect("healthz")
                .json()
                .await
                .expect("json");
            if health["records_written"].as_u64() == Some((N_GOOD + N_FAILED) as u64) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the calls were not all written");
    });
    std::fs::write(workdir.path("savings.json"), workdir.run_ok(&["report", "savings", "--json"])).expect("savings");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../understudy-dashboard/tests/browser.mjs");
    let mut node = Command::new("node");
    node.arg(&script)
        .env("UNDERSTUDY_PLAYWRIGHT_DIR", &playwright)
        .env("BASE", &base)
        .env("ADMIN_KEY", &admin)
        .env("VIEWER_KEY", &viewer)
        .env("TASK", "trec")
        .env("SAVINGS_JSON", workdir.path("savings.json"))
        .env("N_CALLS", (N_GOOD + N_FAILED).to_string())
        .env("N_FAILED", N_FAILED.to_string())
        .env("PROBE", PROBE)
        .env("EVAL_TASK", "news")
        .env("EVAL_CONFUSION", serde_json::to_string(&CONFUSION.concat()).unwrap());
    if let Some(dir) = std::env::var_os("UNDERSTUDY_SCREENSHOT_DIR") {
        node.env("SCREENSHOT_DIR", dir);
    }
    let output = node.output().expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("every check passed"), "{stdout}");

    // The buttons went through the store: two changes by hand, then the roll back.
    let history = workdir.run_json(&["history", "--task", "trec", "--json"]);
    let whats: Vec<&str> =
        history.as_array().expect("entries").iter().filter_map(|entry| entry["what"].as_str()).collect();
    assert_eq!(whats, vec!["policy shadow with cheap", "policy lead", "policy shadow with cheap"], "{history}");

    let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{}", log.join().unwrap_or_default());
}
