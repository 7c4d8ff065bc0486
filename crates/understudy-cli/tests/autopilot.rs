//! `understudy autopilot` beside a running gateway, over real sockets: the
//! task's calls go through `serve`, and with no command but `autopilot` the
//! task is trained, shadowed, and promoted to a cascade certified on its
//! shadow calls; `history` tells the story; a promotion by hand pins it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;
use std::time::Duration;

mod common;

use common::Workdir;
use serde_json::{json, Value};

const WORDS: &[&str] = &["who", "wrote", "where", "is", "how", "many", "city", "book", "people", "river"];

fn question(idx: usize) -> (String, &'static str) {
    let starts = [("who", "HUM"), ("where", "LOC"), ("how", "NUM")];
    let (first, label) = starts[idx % 3];
    (format!("{first} {} {} {idx}", WORDS[3 + idx % 7], WORDS[(idx / 3) % WORDS.len()]), label)
}

fn workdir() -> Workdir {
    let workdir = Workdir::with_config(
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
machine_price_per_hour = 0.10

[models.replayed]
provider = "recorded"
input_per_million = 1000.0
output_per_million = 2000.0

[tasks.questions]
lead = "replayed"
target_agreement = 0.5
understudy_timeout_ms = 600000

[tasks.questions.autopilot]
min_calls = 60
shadow_calls = 45
base = "tiny-bert"
epochs = 20
learning_rate = 0.003
"#,
    );
    understudy_trainer::testing::write_tiny_bert_dir(&workdir.path("tiny-bert"), WORDS, 5).expect("tiny bert");
    let lines: Vec<Value> = (0..300)
        .map(|idx| {
            let (question, label) = question(idx);
            json!({"messages": [
                {"role": "system", "content": "Label the question."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": label},
            ]})
        })
        .collect();
    workdir.write_lines("recorded.jsonl", &lines);
    workdir
}

/// Asks the gateway; returns the model that answered.
async fn ask(client: &reqwest::Client, base_url: &str, idx: usize) -> String {
    let (question, _) = question(idx);
    let body = json!({"model": "task:questions", "messages": [
        {"role": "system", "content": "Label the question."}, {"role": "user", "content": question},
    ]});
    let response = client.post(format!("{base_url}/chat/completions")).json(&body).send().await.expect("send");
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.expect("json")["model"].as_str().unwrap_or_default().to_string()
}

async fn health(client: &reqwest::Client, base_url: &str) -> Value {
    let url = format!("{}/healthz", base_url.trim_end_matches("/v1"));
    client.get(url).send().await.expect("healthz").json().await.expect("json")
}

/// Waits until the gateway has written `n` records.
async fn written(client: &reqwest::Client, base_url: &str, n: u64) {
    for _ in 0..2000 {
        if health(client, base_url).await["records_written"].as_u64().unwrap_or(0) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway did not write {n} records");
}

/// Waits until the gateway routes the task with a policy starting with `prefix`.
async fn routed(client: &reqwest::Client, base_url: &str, prefix: &str) {
    for _ in 0..2000 {
        let policy = health(client, base_url).await["tasks"]["questions"]["policy"].as_str().unwrap_or("").to_string();
        if policy.starts_with(prefix) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway never picked up policy {prefix}");
}

#[test]
fn the_autopilot_takes_a_task_to_a_certified_cascade_beside_a_running_gateway() {
    let workdir = workdir();
    let (mut child, base_url, _log) = workdir.serve();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();

    // Traffic the lead serves; the autopilot waits for 60 calls.
    runtime.block_on(async {
        for idx in 0..40 {
            ask(&client, &base_url, idx).await;
        }
        written(&client, &base_url, 40).await;
    });
    let waiting = workdir.run_ok(&["autopilot", "--once"]);
    assert!(waiting.contains("40 of the 60 successful calls needed to train"), "{waiting}");
    runtime.block_on(async {
        for idx in 40..90 {
            ask(&client, &base_url, idx).await;
        }
        written(&client, &base_url, 90).await;
    });

    // Trained, evaluated, and shadowed.
    let trained = workdir.run_ok(&["autopilot", "--once", "--json"]);
    let lines: Vec<Value> = trained.lines().map(|line| serde_json::from_str(line).expect("json line")).collect();
    let moves: Vec<(&str, &str)> =
        lines.iter().filter_map(|line| Some((line["from"].as_str()?, line["to"].as_str()?))).collect();
    assert_eq!(moves, vec![("collecting", "training"), ("training", "shadow")], "{trained}");
    let version = lines[1]["evidence"]["model_version"].as_str().expect("version").to_string();

    // Shadow calls: the lead serves, the understudy answers on the side.
    runtime.block_on(async {
        routed(&client, &base_url, "shadow").await;
        for idx in 90..150 {
            assert_ne!(ask(&client, &base_url, idx).await, version, "the lead serves under shadow");
        }
        written(&client, &base_url, 150).await;
    });
    let certified = workdir.run_ok(&["autopilot", "--once"]);
    assert!(certified.contains("shadow → cascade: cascade threshold"), "{certified}");

    // The cascade serves the understudy's confident answers.
    let n_served = runtime.block_on(async {
        routed(&client, &base_url, "cascade:").await;
        let mut n_served = 0;
        for idx in 150..210 {
            n_served += usize::from(ask(&client, &base_url, idx).await == version);
        }
        n_served
    });
    assert!(n_served > 0, "the understudy serves some calls under the cascade");

    // The history: the autopilot's transitions and its policy changes.
    let history = workdir.run_json(&["history", "--task", "questions", "--json"]);
    let entries = history.as_array().expect("entries");
    let whats: Vec<&str> = entries.iter().filter_map(|entry| entry["what"].as_str()).collect();
    assert!(whats.contains(&"collecting → training") && whats.contains(&"shadow → cascade"), "{history}");
    let by_autopilot = entries.iter().filter(|entry| entry["kind"] == "policy" && entry["by"] == "autopilot").count();
    assert_eq!(by_autopilot, 2, "shadow, then cascade: {history}");
    let text = workdir.run_ok(&["history", "--task", "questions"]);
    assert!(text.contains("shadow → cascade") && text.contains("autopilot"), "{text}");

    // Drift on the live record: the newest window, and the windows since the
    // cascade's promotion (60 calls: the reference window and two more).
    runtime.block_on(written(&client, &base_url, 210));
    let drift = workdir.run_json(&[
        "report",
        "drift",
        "--task",
        "questions",
        "--window",
        "20",
        "--encoder",
        "tiny-bert",
        "--json",
        "--html",
        "drift.html",
    ]);
    assert_eq!(drift["task"], "questions");
    assert_eq!(drift["understudy"], json!(version), "{drift}");
    assert!(drift["input"]["p_value"].is_number() && drift["confidence"]["p_value"].is_number(), "{drift}");
    assert_eq!(drift["over_time"].as_array().map(Vec::len), Some(2), "{drift}");
    let page = std::fs::read_to_string(workdir.path("drift.html")).expect("drift page");
    assert!(page.contains("<svg") && page.contains("polyline"), "{page}");
    let text = workdir.run_ok(&["report", "drift", "--task", "questions", "--window", "20", "--encoder", "tiny-bert"]);
    assert!(text.contains("over time, since the current promotion") && text.contains("confidence"), "{text}");

    // A promotion by hand pins the task until it is released.
    workdir.run_ok(&["promote", "--task", "questions", "--policy", "lead"]);
    let pinned = workdir.run_ok(&["autopilot", "--once"]);
    assert!(pinned.contains("pinned"), "{pinned}");
    let released = workdir.run_ok(&["autopilot", "--release", "questions"]);
    assert!(released.contains("released by hand") && released.contains("cascade → collecting"), "{released}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    assert!(child.wait().expect("wait").success());
}

#[test]
fn the_autopilot_refuses_a_config_without_one() {
    let workdir = Workdir::with_config("[store]\nurl = \"sqlite://calls.db\"\n[server]\nauth = \"none\"\n");
    let stderr = workdir.run_err(&["autopilot", "--once"]);
    assert!(stderr.contains("no task has [tasks.NAME.autopilot]"), "{stderr}");
    let stderr = workdir.run_err(&["autopilot", "--once", "--task", "ghost"]);
    assert!(stderr.contains("task `ghost` has no [tasks.ghost.autopilot]"), "{stderr}");
}
