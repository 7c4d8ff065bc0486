//! Throughput of the engine on one GGUF: prefill, decode at batch 1, aggregate
//! decode at N concurrent, the memory-bandwidth limit, and resident memory.
//! Prints one JSON object. `bench/engine` drives it next to llama.cpp.
//!
//! With `--extraction`, instead: the cost of JSON-extraction calls (an SMS in
//! the prompt, its fields as a short JSON answer mostly copied from it), in
//! process CPU-seconds per call and machine cost per 1k calls, and over the
//! cost of a gpt-4o-mini lead, for the baseline (one token per step, every
//! prompt prefilled in full), kept prompt prefixes alone, and the defaults
//! (kept prefixes and speculative decoding): one configuration per process
//! (`--config NAME --first-run R`), which `bench/engine` runs in turns.
//! Each round asks messages no earlier round asked, so no answer is ever a
//! repeat. The workload knows each SMS's values, and counts the answers
//! that hold all four (`right` of `asked`).
//!
//!   cargo run --release -p understudy-engine --example engine_bench -- MODEL.gguf [--threads 2] [--runs 3]
//!   cargo run --release -p understudy-engine --example engine_bench -- MODEL.gguf --extraction [--runs 3]

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};
use understudy_engine::requant::WeightFormat;
use understudy_engine::testing::{extraction_messages, extraction_schema_format};
use understudy_engine::{EngineOptions, LlamaCppModel, DEFAULT_SPECULATIVE_DRAFT};
use understudy_providers::local::{LocalModel, LocalModelSpec};
use understudy_providers::ChatRequest;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn request(body: Value) -> ChatRequest {
    ChatRequest { body: body.as_object().cloned().unwrap_or_default() }
}

/// One streamed greedy answer, timed from `start`.
struct Timed {
    /// Completion tokens (from `usage`).
    n_tokens: usize,
    /// Seconds to the first token.
    first: f64,
    /// Seconds to the end of the stream.
    total: f64,
    /// Seconds at which each chunk of text arrived.
    chunks: Vec<f64>,
}

async fn timed_stream(model: &LlamaCppModel, prompt: &str, max_tokens: usize, start: Instant) -> Result<Timed> {
    let body = json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
        "stream": true});
    let mut stream = model.chat_stream(request(body)).await?;
    let mut chunks = Vec::new();
    let mut n_tokens = 0;
    while let Some(chunk) = stream.next().await {
        let chunk: Value = serde_json::from_str(&chunk?)?;
        if chunk.pointer("/choices/0/delta/content").and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
            chunks.push(start.elapsed().as_secs_f64());
        }
        if let Some(tokens) = chunk.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
            n_tokens = tokens as usize;
        }
    }
    let total = start.elapsed().as_secs_f64();
    Ok(Timed { n_tokens, first: chunks.first().copied().unwrap_or(total), total, chunks })
}

/// Decode throughput while every one of `streams` is decoding: the chunks
/// that arrived between the last stream's first token and the first
/// stream's end, over that window (prefill and the tail, when fewer are
/// left, fall outside it).
fn all_decoding_rate(streams: &[Timed]) -> f64 {
    let from = streams.iter().map(|t| t.first).fold(0.0, f64::max);
    let to = streams.iter().map(|t| t.chunks.last().copied().unwrap_or(t.total)).fold(f64::INFINITY, f64::min);
    if to <= from {
        return f64::NAN;
    }
    let n: usize = streams.iter().map(|t| t.chunks.iter().filter(|&&at| at > from && at <= to).count()).sum();
    n as f64 / (to - from)
}

/// Read bandwidth in bytes/s over a buffer much larger than the caches, with `threads` readers.
fn read_bandwidth(threads: usize) -> f64 {
    let n: usize = 256 * 1024 * 1024 / 8;
    let buffer: Vec<u64> = (0..n as u64).collect();
    let mut best: f64 = 0.0;
    for _ in 0..5 {
        let start = Instant::now();
        let chunk = n.div_ceil(threads);
        let sum: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().fold(0u64, |acc, &x| acc.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((n * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: engine_bench MODEL.gguf [--threads N] [--runs N] [--concurrency N]")?;
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|idx| args.get(idx + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let threads = flag("--threads", 2);
    let runs = flag("--runs", 3);
    let concurrency = flag("--concurrency", 8);
    let decode_tokens = flag("--decode-tokens", 128);
    let weights = match args.iter().position(|arg| arg == "--weights").and_then(|idx| args.get(idx + 1)) {
        Some(text) => WeightFormat::parse(text)?,
        None => WeightFormat::Auto,
    };

    let rss_before_kb = status_kb("VmRSS:");
    let spec = LocalModelSpec::new("bench", path.clone());
    let n_ctx = flag("--n-ctx", EngineOptions::default().n_ctx as usize) as u32;
    let options = EngineOptions {
        n_threads: Some(threads),
        n_seq_max: concurrency as u32,
        n_ctx,
        weights,
        ..EngineOptions::default()
    };
    if args.iter().any(|arg| arg == "--two-models") {
        return two_models(&spec, &options, runs).await;
    }
    if args.iter().any(|arg| arg == "--extraction") {
        let draft = flag("--speculative-draft", DEFAULT_SPECULATIVE_DRAFT).max(1);
        let config = args.iter().position(|arg| arg == "--config").and_then(|idx| args.get(idx + 1));
        let config = config.map_or("on", String::as_str);
        return extraction(&spec, &options, draft, config, flag("--first-run", 0), runs, concurrency).await;
    }
    // The throughput figures are of one token per step (comparable with
    // llama.cpp's and earlier runs') unless asked otherwise, and every
    // prompt is prefilled in full (the same prompt is asked in every run).
    let options = EngineOptions { speculative_draft: flag("--speculative-draft", 0), prefix_cache: false, ..options };
    let model = LlamaCppModel::load(&spec, &options)?;
    let rss_loaded_kb = status_kb("VmRSS:");

    // A prompt of 256 tokens after the chat template.
    let mut words = Vec::new();
    let vocabulary =
        ["river", "mountain", "quiet", "engine", "paper", "window", "garden", "signal", "orange", "theory"];
    let mut idx = 0;
    let (long_prompt, n_prompt) = loop {
        words.push(vocabulary[idx % vocabulary.len()]);
        idx += 1;
        let text = words.join(" ");
        let n = model.prompt_tokens(&[("user".into(), text.clone())]).map_err(|e| e.to_string())?.len();
        if n >= 256 {
            break (text, n);
        }
    };
    eprintln!("loaded {}; prompt of {n_prompt} tokens ready", model.gguf_path().display());
    let story = "Write a long, detailed story about a dragon who learns to bake bread.";

    // Warm up.
    timed_stream(&model, story, 8, Instant::now()).await?;
    eprintln!("warmed up");

    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut aggregate = Vec::new();
    let mut aggregate_decoding = Vec::new();
    let mut shortest = Vec::new();
    for _ in 0..runs {
        // Prefill: time to the first token of a 256-token prompt.
        let timed = timed_stream(&model, &long_prompt, 1, Instant::now()).await?;
        prefill.push(n_prompt as f64 / timed.first);
        eprintln!("prefill {:.1} tok/s", n_prompt as f64 / timed.first);

        let timed = timed_stream(&model, story, decode_tokens, Instant::now()).await?;
        let rate = (timed.n_tokens.saturating_sub(1)) as f64 / (timed.total - timed.first);
        decode.push(rate);
        eprintln!("decode {} tokens, {rate:.1} tok/s", timed.n_tokens);

        // N requests at once: end to end (their prefill included), and while all N decode.
        let start = Instant::now();
        let prompts: Vec<String> = (0..concurrency).map(|i| format!("{story} Story number {i}.")).collect();
        let results =
            futures::future::join_all(prompts.iter().map(|p| timed_stream(&model, p, decode_tokens, start))).await;
        let elapsed = start.elapsed().as_secs_f64();
        let streams = results.into_iter().collect::<Result<Vec<_>>>()?;
        let n_total: usize = streams.iter().map(|t| t.n_tokens).sum();
        aggregate.push(n_total as f64 / elapsed);
        aggregate_decoding.push(all_decoding_rate(&streams));
        shortest.push(streams.iter().map(|t| t.n_tokens).min().unwrap_or(0) as f64);
        eprintln!(
            "aggregate {n_total} tokens, {:.1} tok/s end to end, {:.1} tok/s while all {concurrency} decode",
            n_total as f64 / elapsed,
            all_decoding_rate(&streams)
        );
    }
    let rss_peak_kb = status_kb("VmHWM:");
    let weights_bytes = model.llama_model().size() as f64;
    let bandwidth = read_bandwidth(threads);
    let limit = bandwidth / weights_bytes;
    let decode_median = median(decode.clone());
    let report = json!({
        "engine": "understudy (llama-cpp-2)",
        "weights": format!("{weights:?}"),
        "served_gguf": model.gguf_path().display().to_string(),
        "prompt_tokens": n_prompt,
        "threads": threads,
        "runs": runs,
        "prefill_tok_s": median(prefill.clone()),
        "decode_tok_s": decode_median,
        "aggregate_tok_s": median(aggregate.clone()),
        "concurrency": concurrency,
        "aggregate_over_decode": median(aggregate.clone()) / decode_median,
        "aggregate_decoding_tok_s": median(aggregate_decoding.clone()),
        "aggregate_decoding_over_decode": median(aggregate_decoding.clone()) / decode_median,
        "shortest_answer_tokens": median(shortest),
        "all": {"prefill": prefill, "decode": decode, "aggregate": aggregate, "aggregate_decoding": aggregate_decoding},
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weights_mb": weights_bytes / 1e6,
        "bandwidth_limit_tok_s": limit,
        "decode_over_limit": decode_median / limit,
        "rss_before_load_mb": rss_before_kb as f64 / 1024.0,
        "rss_loaded_mb": rss_loaded_kb as f64 / 1024.0,
        "rss_peak_serving_mb": rss_peak_kb as f64 / 1024.0,
    });
    println!("{report}");
    Ok(())
}

/// The price of a machine hour the extraction workload's costs are in (the
/// issue's figure, and `understudy.toml`'s default for a local provider).
const MACHINE_PRICE_PER_HOUR: f64 = 0.10;

/// gpt-4o-mini's list prices, $ per million input and output tokens: the
/// cheap lead the understudy must cost a fifth of (issue 17).
const LEAD_PRICE_PER_MILLION: (f64, f64) = (0.15, 0.60);

/// What the lead would charge for one extraction call, $: the prompt and
/// the answer counted in its own encoding (o200k_base).
fn lead_cost(sms: &str, answer: &str) -> f64 {
    let body = extraction_body(sms, Format::Text);
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let prompt = understudy_providers::tokens::count_messages(&messages) as f64;
    let completion = understudy_providers::tokens::count_text(answer) as f64;
    (prompt * LEAD_PRICE_PER_MILLION.0 + completion * LEAD_PRICE_PER_MILLION.1) / 1e6
}

/// CPU time of this process so far, all threads (llama.cpp's included), in
/// seconds: what a call costs on a machine priced by the hour, spinning
/// threads included.
fn process_cpu_seconds() -> f64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// Short messages with a name, a phone number, a date and a place each.
const TEMPLATES: [&str; 8] = [
    "Hello, this is {name} from Bright Smile Dental. Your visit is on {date} at {place}. Call {phone}.",
    "Hey it's {name}, the party moved to Friday {date} at {place}. Text me at {phone}.",
    "Reminder from {name}: appointment on {date} at {place}, questions to {phone}.",
    "This is {name}. Pick up your parcel on {date} at {place}, or ring {phone}.",
    "{name} here, the plumber. I can come on {date} to {place}. My number is {phone}.",
    "Hi from {name}! Book club is on {date} at {place}. Questions? {phone}.",
    "{name}: your car is ready, pick it up on {date} at {place}. Call {phone}.",
    "It's {name}. Dinner on {date} at {place}, confirm at {phone}.",
];
const NAMES: [&str; 12] = [
    "Maria Lopez",
    "Sam Ortiz",
    "Alan Chu",
    "Priya Nair",
    "Jonas Weber",
    "Lena Park",
    "Carlos Mendes",
    "Grace Kim",
    "Omar Haddad",
    "Ingrid Olsen",
    "Kenji Sato",
    "Fatima Bello",
];
const PLACES: [&str; 12] = [
    "221 Oak Street",
    "the Blue Door Cafe",
    "Riverside Clinic",
    "the Elm Road post office",
    "14 Harbour Lane",
    "the Greenfield Library",
    "Fast Lane Garage",
    "Luigi's on 5th Avenue",
    "North Park Gym",
    "the Old Mill Bakery",
    "Station Square",
    "Hillside School",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// One SMS of the workload and the values a right answer holds.
struct Sms {
    text: String,
    /// `name`, `phone`, `date` and `place`, in the keys the instruction asks for.
    fields: [(&'static str, String); 4],
}

impl Sms {
    /// Whether `answer` is a JSON object whose four keys hold the SMS's
    /// values, each compared by the gateway's agreement rule
    /// (`understudy_types::answers_agree`: case and spacing aside).
    fn is_right(&self, answer: &str) -> bool {
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(answer.trim()) else {
            return false;
        };
        self.fields.iter().all(|(key, value)| {
            object.get(*key).and_then(Value::as_str).is_some_and(|got| understudy_types::answers_agree(got, value))
        })
    }
}

/// The 8 messages of round `set`, one per template, each with a name,
/// date, place and phone number no other round has together: a round's
/// answers are new to every model (a kept prefix's earlier answers hold the
/// keys and punctuation, never the whole answer).
fn workload(set: usize) -> Vec<Sms> {
    (0..TEMPLATES.len())
        .map(|idx| {
            let k = set * TEMPLATES.len() + idx;
            let name = NAMES[(k * 5 + set) % NAMES.len()].to_string();
            let place = PLACES[(k * 7 + 3 + set) % PLACES.len()].to_string();
            let date = format!("{} {}", MONTHS[(k * 5) % 12], 1 + (k * 11) % 28);
            let phone = format!("555-{:04}", 100 + (k * 37) % 900);
            let text = TEMPLATES[idx]
                .replace("{name}", &name)
                .replace("{place}", &place)
                .replace("{date}", &date)
                .replace("{phone}", &phone);
            Sms { text, fields: [("name", name), ("phone", phone), ("date", date), ("place", place)] }
        })
        .collect()
}

/// The texts of round `set`'s messages.
fn messages(set: usize) -> Vec<String> {
    workload(set).into_iter().map(|sms| sms.text).collect()
}

/// What an extraction call asks of its answer's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    /// `response_format` json_object: decoding stops at the closing brace.
    JsonObject,
    /// `response_format` json_schema with the four string keys: the text
    /// the schema fixes is not decoded token by token (with the engine's
    /// `jump_forward`).
    Schema,
}

/// One extraction call's messages: the instruction, one worked example
/// (so that even a base instruct model answers in the JSON shape a trained
/// understudy would: compact, in the keys' order, as a lead answering
/// under a JSON schema writes it), and the SMS, with `format`'s
/// `response_format`.
fn extraction_body(sms: &str, format: Format) -> Value {
    let mut body = json!({"messages": extraction_messages(sms), "temperature": 0, "max_tokens": 64});
    match format {
        Format::Text => {}
        Format::JsonObject => body["response_format"] = json!({"type": "json_object"}),
        Format::Schema => body["response_format"] = extraction_schema_format(),
    }
    body
}

/// One extraction call: its answer, its completion tokens. With a JSON
/// format, an answer that does not follow it fails (the gateway would fall
/// back to the lead); it counts as a call, with no answer.
async fn extract(model: &LlamaCppModel, sms: &str, format: Format) -> Result<(String, u64)> {
    let response = match model.chat(request(extraction_body(sms, format))).await {
        Ok(response) => response,
        Err(error) if format != Format::Text => return Ok((format!("(failed: {error})"), 0)),
        Err(error) => return Err(error.into()),
    };
    let body: Value = serde_json::from_slice(&response.body)?;
    let answer = body.pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or("").to_string();
    let tokens = body.pointer("/usage/completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    Ok((answer, tokens))
}

/// CPU-seconds and wall seconds per call, one call at a time, over every message of `set`.
async fn extraction_round(
    model: &LlamaCppModel,
    format: Format,
    set: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<(String, u64)>)> {
    let (mut cpu, mut wall, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    for sms in &messages(set) {
        let (cpu_start, wall_start) = (process_cpu_seconds(), Instant::now());
        answers.push(extract(model, sms, format).await?);
        cpu.push(process_cpu_seconds() - cpu_start);
        wall.push(wall_start.elapsed().as_secs_f64());
    }
    Ok((cpu, wall, answers))
}

/// CPU-seconds per call of the prompt alone (`max_tokens` 1: prefill and one
/// sampled token), one call at a time: what speculation cannot change.
async fn prompt_round(model: &LlamaCppModel, set: usize) -> Result<Vec<f64>> {
    let mut cpu = Vec::new();
    for sms in &messages(set) {
        let mut body = extraction_body(sms, Format::Text);
        body["max_tokens"] = json!(1);
        let cpu_start = process_cpu_seconds();
        model.chat(request(body)).await?;
        cpu.push(process_cpu_seconds() - cpu_start);
    }
    Ok(cpu)
}

/// CPU-seconds per call of the message alone with `concurrency` asked at
/// once (`max_tokens` 1), after the task's instruction and worked example
/// are a kept prefix: what the understudy pays for a call's input, whatever
/// its answer (the floor under the figures with answers).
async fn message_concurrent(model: &LlamaCppModel, concurrency: usize, set: usize) -> Result<f64> {
    let workload = workload_at_once(set, concurrency);
    let cpu_start = process_cpu_seconds();
    let asked: Vec<_> = futures::stream::iter(&workload)
        .map(|sms| {
            let mut body = extraction_body(&sms.text, Format::Text);
            body["max_tokens"] = json!(1);
            model.chat(request(body))
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    for answer in asked {
        answer?;
    }
    Ok((process_cpu_seconds() - cpu_start) / workload.len() as f64)
}

/// `n` messages for one round asked at once: set `set`'s, then (beyond the
/// templates' number) those of sets no other round asks.
fn workload_at_once(set: usize, n: usize) -> Vec<Sms> {
    let more = (1..).flat_map(|extra| workload(10_000 + set * 64 + extra));
    workload(set).into_iter().chain(more).take(n.max(1)).collect()
}

/// CPU-seconds and wall seconds per call with `concurrency` messages of
/// round `set` asked at once, as `eval` asks its rows, and how many answers
/// held every field right.
async fn extraction_concurrent(
    model: &LlamaCppModel,
    concurrency: usize,
    format: Format,
    set: usize,
) -> Result<(f64, f64, usize)> {
    let workload = workload_at_once(set, concurrency);
    let n = workload.len() as f64;
    let (cpu_start, wall_start) = (process_cpu_seconds(), Instant::now());
    // All asked at once; `buffered` only keeps the answers in the messages' order.
    let answers: Vec<_> = futures::stream::iter(&workload)
        .map(|sms| extract(model, &sms.text, format))
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let (cpu, wall) = ((process_cpu_seconds() - cpu_start) / n, wall_start.elapsed().as_secs_f64() / n);
    let mut right = 0;
    for (sms, answer) in workload.iter().zip(answers) {
        right += usize::from(sms.is_right(&answer?.0));
    }
    Ok((cpu, wall, right))
}

/// Two models in one process (as a gateway serving two generation
/// understudies holds them): seconds and CPU-seconds per extraction call of
/// the first model alone, then of both used in turns, and the ratio (with
/// OpenMP the second context slowed every context down about 1.8x).
async fn two_models(spec: &LocalModelSpec, options: &EngineOptions, runs: usize) -> Result<()> {
    let options = EngineOptions { speculative_draft: 0, prefix_cache: false, ..options.clone() };
    let first = LlamaCppModel::load(spec, &options)?;
    extraction_round(&first, Format::Text, 0).await?;
    let (mut alone_cpu, mut alone_wall) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let (cpu, wall, _) = extraction_round(&first, Format::Text, 1 + run).await?;
        alone_cpu.extend(cpu);
        alone_wall.extend(wall);
    }
    let second = LlamaCppModel::load(spec, &options)?;
    let (mut turns_cpu, mut turns_wall) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for model in [&second, &first] {
            let (cpu, wall, _) = extraction_round(model, Format::Text, 1 + run).await?;
            turns_cpu.extend(cpu);
            turns_wall.extend(wall);
        }
    }
    let (alone_wall, turns_wall) = (median(alone_wall), median(turns_wall));
    let (alone_cpu, turns_cpu) = (median(alone_cpu), median(turns_cpu));
    let report = json!({
        "workload": "two models",
        "alone_wall_s_per_call": alone_wall,
        "alone_cpu_s_per_call": alone_cpu,
        "in_turns_wall_s_per_call": turns_wall,
        "in_turns_cpu_s_per_call": turns_cpu,
        "wall_ratio": turns_wall / alone_wall,
        "cpu_ratio": turns_cpu / alone_cpu,
    });
    println!("{report}");
    Ok(())
}

/// The extraction workload's configurations: name, speculative draft
/// (`None`: the default's), kept prefixes, the answer's format, and
/// whether a schema's fixed text is jumped over (the engine's default) or
/// decoded token by token.
const CONFIGURATIONS: [(&str, Option<usize>, bool, Format, bool); 7] = [
    ("off", Some(0), false, Format::Text, true),
    ("kept prefixes", Some(0), true, Format::Text, true),
    ("kept prefixes, json_schema", Some(0), true, Format::Schema, true),
    ("on", None, true, Format::Text, true),
    ("on, json_object", None, true, Format::JsonObject, true),
    ("on, json_schema", None, true, Format::Schema, true),
    ("on, json_schema, token by token", None, true, Format::Schema, false),
];

/// One configuration of the extraction workload, in a process of its own
/// (`bench/engine` runs the configurations in turns, one process each:
/// llama.cpp contexts of several models used in turns in one process
/// slow each other down, about 1.9x on 2 cores), warmed up on message set
/// 0, then runs `first_run..first_run + runs`: per run, the prompt alone
/// (`off` only), one call at a time on a new set and all at once on
/// another. Prints one JSON object; `bench/engine` takes medians and ratios.
async fn extraction(
    spec: &LocalModelSpec,
    options: &EngineOptions,
    draft: usize,
    config: &str,
    first_run: usize,
    runs: usize,
    concurrency: usize,
) -> Result<()> {
    let Some(&(name, config_draft, prefix_cache, format, jump_forward)) =
        CONFIGURATIONS.iter().find(|(name, ..)| *name == config)
    else {
        let names: Vec<&str> = CONFIGURATIONS.iter().map(|(name, ..)| *name).collect();
        return Err(format!("--config must be one of {names:?}, not {config:?}").into());
    };
    let speculative_draft = config_draft.unwrap_or(draft);
    let model =
        LlamaCppModel::load(spec, &EngineOptions { speculative_draft, prefix_cache, jump_forward, ..options.clone() })?;
    // Warm up; its answers are compared across configurations.
    let (_, _, warm_answers) = extraction_round(&model, format, 0).await?;
    let stats_before = model.speculation_stats();
    let (mut cpu, mut wall, mut concurrent_cpu, mut concurrent_wall, mut prompt_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut message_cpu = Vec::new();
    let (mut failed, mut right, mut asked) = (0, 0, 0);
    for run in first_run..first_run + runs {
        // Every configuration gets the same new messages in a run.
        let (sequential, at_once) = (1 + 2 * run, 2 + 2 * run);
        if name == "off" {
            prompt_cpu.extend(prompt_round(&model, sequential).await?);
        }
        let (run_cpu, run_wall, answers) = extraction_round(&model, format, sequential).await?;
        failed += answers.iter().filter(|(answer, _)| answer.starts_with("(failed")).count();
        right += workload(sequential).iter().zip(&answers).filter(|(sms, (answer, _))| sms.is_right(answer)).count();
        asked += answers.len();
        let (at_once_cpu, at_once_wall, at_once_right) =
            extraction_concurrent(&model, concurrency, format, at_once).await?;
        right += at_once_right;
        asked += concurrency.max(1);
        if name == "on" {
            // Messages no round asks, on the kept prefix the rounds left.
            message_cpu.push(message_concurrent(&model, concurrency, 5_000 + run).await?);
        }
        eprintln!(
            "{name}, run {run}: {:.3} CPU-s per call, {:.3} s wall (median), {at_once_cpu:.3} CPU-s per call at \
             {concurrency} concurrent",
            median(run_cpu.clone()),
            median(run_wall.clone())
        );
        cpu.extend(run_cpu);
        wall.extend(run_wall);
        concurrent_cpu.push(at_once_cpu);
        concurrent_wall.push(at_once_wall);
    }
    let stats = model.speculation_stats();
    let lead_costs: Vec<f64> =
        messages(0).iter().zip(&warm_answers).map(|(sms, (answer, _))| lead_cost(sms, answer)).collect();
    let report = json!({
        "workload": "json extraction",
        "config": name,
        "weights": format!("{:?}", options.weights),
        "served_gguf": model.gguf_path().display().to_string(),
        "threads": options.n_threads,
        "calls_per_run": TEMPLATES.len(),
        "concurrency": concurrency,
        "speculative_draft": speculative_draft,
        "warm_answers": warm_answers,
        "cpu": cpu,
        "wall": wall,
        "concurrent_cpu": concurrent_cpu,
        "concurrent_wall": concurrent_wall,
        "prompt_cpu": prompt_cpu,
        "message_concurrent_cpu": message_cpu,
        "failed": failed,
        "right": right,
        "asked": asked,
        "drafted_tokens": stats.drafted - stats_before.drafted,
        "accepted_tokens": stats.accepted - stats_before.accepted,
        "machine_price_per_hour": MACHINE_PRICE_PER_HOUR,
        "lead": "gpt-4o-mini",
        "lead_price_per_million": [LEAD_PRICE_PER_MILLION.0, LEAD_PRICE_PER_MILLION.1],
        "lead_cost_per_1k": median(lead_costs) * 1000.0,
    });
    println!("{report}");
    Ok(())
}
