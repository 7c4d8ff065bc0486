//! Whether moving a task onto an understudy will pay, decided before
//! training: what the understudy would cost per call (timed on this machine,
//! on a sample of the task's recorded prompts), what the lead costs per call
//! (from the records), the coverage at which the cascade breaks even, and how
//! many calls repay the training run.
//!
//! The cascade asks the understudy first on every call and the lead only on
//! the calls it does not serve, so at coverage `c` a call saves
//! `c × lead − understudy`; it breaks even at `c = understudy / lead`, and
//! when the understudy costs as much as the lead it cannot pay at any
//! coverage. Audits (a share of served calls re-asked of the lead) cost more
//! on top; the break-even here leaves them out.
//!
//! The understudy's speed is measured with the base model the training would
//! start from, asked as it would be served, with as many calls in flight as it
//! answers together:
//! - a classifier (label tasks): the base encoder's forward pass over the
//!   prompts' text, in batches of the config's `max_batch`, which is what the
//!   classifier computes (its head is one small matrix);
//! - LoRA (generation tasks, or asked for): the base causal LM answering each
//!   sampled prompt as eval asks it, with room for the recorded answers'
//!   length and the call's own `response_format` (a JSON schema's fixed text
//!   is not decoded), a label task's answers constrained to its labels.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};
use understudy_config::Config;
use understudy_datasets::jsonl::ChatExample;
use understudy_datasets::kind::{decide_kind, normalize_label};
use understudy_eval::Estimate;
use understudy_providers::{EmbeddingRequest, LocalLoader, LocalModelSpec, Understudy};
use understudy_store::{CallFilter, StatusFilter, Store};
use understudy_trainer::{prompt_text, ClassifierTrainConfig, LoraTrainConfig};
use understudy_types::{cpu_time_cost, machine_cores, machine_time_cost, ServedBy, TaskKind};

use crate::error::{LoopError, Result};
use crate::evaluate::{lead_figures, Ask, LeadFigures, Prompt, UNROUTED_TIMEOUT};
use crate::train::{resolve_base, BaseKind, Method};

/// Coverages the payback is shown at.
pub const PAYBACK_COVERAGES: [f64; 3] = [0.5, 0.8, 0.95];

/// Above this break-even coverage, a plan warns that the understudy pays only
/// if it serves nearly every call.
const TIGHT_BREAK_EVEN: f64 = 0.8;

/// A rule of thumb for training time when the task has no earlier run: one
/// optimizer pass over a row costs about three forward passes (the backward
/// pass about two).
const TRAIN_PASSES_PER_ROW: f64 = 3.0;

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub task: String,
    pub method: Method,
    /// The base model (as `train --base` names it; default by method).
    pub base: Option<String>,
    /// Recorded prompts to time the understudy on (the newest).
    pub sample: usize,
    /// Epochs the training would run (default: the trainer's).
    pub epochs: Option<usize>,
    /// The machine price compute is charged at (default: the config's).
    pub machine_price_per_hour: Option<f64>,
    pub seed: u64,
}

impl PlanRequest {
    pub fn new(task: &str) -> PlanRequest {
        PlanRequest {
            task: task.to_string(),
            method: Method::Auto,
            base: None,
            sample: 64,
            epochs: None,
            machine_price_per_hour: None,
            seed: 7,
        }
    }
}

/// The understudy's measured speed on the sampled prompts.
#[derive(Debug, Clone)]
pub struct UnderstudySpeed {
    /// Prompts timed.
    pub n_sampled: usize,
    /// Calls in flight together while timing.
    pub in_flight: usize,
    /// Process CPU time per call.
    pub cpu_seconds_per_call: f64,
    /// Wall time per call (the sample's wall time over its calls).
    pub wall_seconds_per_call: f64,
    /// CPU time per call at the machine price, per 1,000 calls.
    pub cost_per_1k: f64,
    /// Timed calls that failed (a prompt longer than the context, say).
    pub n_failed: usize,
}

/// How long the training run would take and what it would cost.
#[derive(Debug, Clone)]
pub struct TrainingEstimate {
    pub seconds: f64,
    pub cost: f64,
    /// Where the figure comes from.
    pub basis: String,
}

/// Calls (and days, at the task's recorded rate) until the understudy repays its training.
#[derive(Debug, Clone)]
pub struct Payback {
    pub coverage: f64,
    /// Dollars saved per 1,000 calls at this coverage (negative: it loses).
    pub saving_per_1k: f64,
    /// `None` when it never pays back at this coverage.
    pub calls: Option<f64>,
    pub days: Option<f64>,
}

/// Everything a plan found.
#[derive(Debug, Clone)]
pub struct Plan {
    pub task: String,
    pub kind: TaskKind,
    pub method: Method,
    pub base: PathBuf,
    pub machine_price: f64,
    /// Successful calls the lead answered (what a dataset would be built from).
    pub n_calls: u64,
    /// The task's recorded rate, when its calls span some time.
    pub calls_per_day: Option<f64>,
    pub lead: LeadFigures,
    pub understudy: UnderstudySpeed,
    /// The understudy's cost over the lead's; `None` when the lead's calls cost nothing.
    pub break_even_coverage: Option<f64>,
    pub training: TrainingEstimate,
    pub payback: Vec<Payback>,
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn lead_cost_per_1k(&self) -> Estimate {
        self.lead.speed.cost_per_1k
    }

    /// The plan as JSON (what `plan --json` prints).
    pub fn to_json(&self) -> Value {
        let estimate = |e: Estimate| json!({"value": e.value, "low": e.interval.low, "high": e.interval.high});
        json!({
            "task": self.task,
            "kind": self.kind.as_str(),
            "method": self.method.as_str(),
            "base": self.base.display().to_string(),
            "machine_price_per_hour": self.machine_price,
            "machine_cores": machine_cores(),
            "n_calls": self.n_calls,
            "calls_per_day": self.calls_per_day,
            "lead": {
                "model": self.lead.model,
                "n_calls": self.lead.n_calls,
                "cost_per_1k": estimate(self.lead.speed.cost_per_1k),
            },
            "understudy": {
                "n_sampled": self.understudy.n_sampled,
                "in_flight": self.understudy.in_flight,
                "cpu_seconds_per_call": self.understudy.cpu_seconds_per_call,
                "wall_seconds_per_call": self.understudy.wall_seconds_per_call,
                "cost_per_1k": self.understudy.cost_per_1k,
                "n_failed": self.understudy.n_failed,
            },
            "break_even_coverage": self.break_even_coverage,
            "training": {"seconds": self.training.seconds, "cost": self.training.cost, "basis": self.training.basis},
            "payback": self.payback.iter().map(|payback| json!({
                "coverage": payback.coverage, "saving_per_1k": payback.saving_per_1k,
                "calls": payback.calls, "days": payback.days,
            })).collect::<Vec<_>>(),
            "warnings": self.warnings,
        })
    }
}

/// Times the understudy's base model on the task's recorded prompts and
/// weighs its cost against the lead's.
pub async fn plan(config: &Config, store: &Store, loader: &dyn LocalLoader, request: &PlanRequest) -> Result<Plan> {
    let machine_price = request.machine_price_per_hour.unwrap_or_else(|| config.machine_price().1);
    let filter =
        CallFilter { task: Some(request.task.clone()), status: Some(StatusFilter::Ok), ..CallFilter::default() };
    let calls: Vec<_> = store
        .list_calls(&filter)
        .await?
        .into_iter()
        .filter(|call| call.routing.as_ref().is_none_or(|routing| routing.served_by == ServedBy::Lead))
        .collect();
    let examples: Vec<ChatExample> = calls.iter().filter_map(ChatExample::from_call).collect();
    if examples.is_empty() {
        return Err(LoopError::NotFound(format!(
            "task `{}` has no successful calls answered by its lead to plan from; record or import some first",
            request.task
        )));
    }
    let task_config = config.tasks.get(&request.task);
    let answers: Vec<String> = examples.iter().map(|example| normalize_label(&example.answer_text())).collect();
    let kind_override = task_config.and_then(|task| task.kind);
    let kind = if task_config.is_some_and(|task| task.labels.is_some()) {
        TaskKind::Label
    } else {
        decide_kind(&answers, kind_override).kind
    };
    let method = match (request.method, kind) {
        (Method::Auto | Method::Classifier, TaskKind::Label) => Method::Classifier,
        (Method::Classifier, TaskKind::Generation) => {
            return Err(LoopError::Refused(format!(
                "a classifier needs a label task, and task `{}` is a generation task",
                request.task
            )))
        }
        (Method::Auto | Method::Lora, _) => Method::Lora,
    };
    let base_kind = if method == Method::Classifier { BaseKind::Encoder } else { BaseKind::CausalLm };
    let base = resolve_base(config, request.base.as_deref(), base_kind)?;

    // The newest prompts, as the understudy would see them next.
    let n_sample = request.sample.clamp(1, examples.len());
    let sample = &examples[examples.len() - n_sample..];
    let understudy = match method {
        Method::Classifier => time_encoder(config, loader, &base, sample, machine_price).await?,
        _ => {
            let labels = match kind {
                TaskKind::Label => Some(
                    task_config
                        .and_then(|task| task.labels.clone())
                        .unwrap_or_else(|| decide_kind(&answers, Some(TaskKind::Label)).labels),
                ),
                TaskKind::Generation => None,
            };
            time_causal_lm(config, loader, &base, sample, labels, machine_price).await?
        }
    };

    let lead = lead_figures(store, &request.task, request.seed).await?;
    let lead_per_call = lead.speed.cost_per_1k.value / 1000.0;
    let understudy_per_call = understudy.cost_per_1k / 1000.0;
    let break_even_coverage = (lead_per_call > 0.0).then(|| understudy_per_call / lead_per_call);

    let calls_per_day = {
        let first = calls.iter().map(|call| call.created_at).min();
        let last = calls.iter().map(|call| call.created_at).max();
        match (first, last) {
            (Some(first), Some(last)) if last > first && calls.len() > 1 => {
                let days = (last - first).as_seconds_f64() / 86_400.0;
                Some((calls.len() - 1) as f64 / days)
            }
            _ => None,
        }
    };
    let training = training_estimate(store, request, method, &understudy, examples.len(), machine_price).await?;
    let payback = PAYBACK_COVERAGES
        .iter()
        .map(|&coverage| {
            let saving_per_call = coverage * lead_per_call - understudy_per_call;
            let calls = (saving_per_call > 0.0).then(|| training.cost / saving_per_call);
            Payback {
                coverage,
                saving_per_1k: saving_per_call * 1000.0,
                calls,
                days: calls.zip(calls_per_day).map(|(calls, rate)| calls / rate),
            }
        })
        .collect();

    let mut warnings = Vec::new();
    match break_even_coverage {
        None => warnings.push(format!(
            "the lead's recorded calls cost nothing (no prices for `{}` in the config?): there is nothing to save",
            lead.model
        )),
        Some(coverage) if coverage >= 1.0 => warnings.push(format!(
            "the lead is so cheap that the understudy cannot pay: it costs ${:.6} per 1k calls on this machine, the \
             lead ${:.6}; the cascade asks it on every call, so it loses money at any coverage",
            understudy.cost_per_1k, lead.speed.cost_per_1k.value
        )),
        Some(coverage) if coverage > TIGHT_BREAK_EVEN => warnings.push(format!(
            "the understudy pays only if it serves more than {:.0} % of calls (it costs ${:.6} per 1k calls, the \
             lead ${:.6})",
            coverage * 100.0,
            understudy.cost_per_1k,
            lead.speed.cost_per_1k.value
        )),
        Some(_) => {}
    }
    if understudy.n_failed > 0 {
        warnings.push(format!(
            "{} of {} timed prompts failed (too long for the base model's context?)",
            understudy.n_failed, understudy.n_sampled
        ));
    }
    Ok(Plan {
        task: request.task.clone(),
        kind,
        method,
        base,
        machine_price,
        n_calls: examples.len() as u64,
        calls_per_day,
        lead,
        understudy,
        break_even_coverage,
        training,
        payback,
        warnings,
    })
}

/// CPU time of this process so far, all threads, in seconds.
fn process_cpu_seconds() -> f64 {
    crate::evaluate::process_cpu_seconds()
}

/// The base encoder's forward pass over the sample's prompt text, in batches
/// of the config's `max_batch`, as a classifier on it would be served.
async fn time_encoder(
    config: &Config,
    loader: &dyn LocalLoader,
    base: &Path,
    sample: &[ChatExample],
    machine_price: f64,
) -> Result<UnderstudySpeed> {
    let name = "plan-encoder";
    let spec = LocalModelSpec {
        max_batch: Some(config.local_max_batch()),
        ..LocalModelSpec::new(name, base.display().to_string())
    };
    let model = loader.load(&spec).map_err(|source| LoopError::Load { name: base.display().to_string(), source })?;
    let texts: Vec<String> = sample.iter().map(|example| prompt_text(&example.prompt)).collect();
    let batch = config.local_max_batch();
    // One pass first, so the timing leaves out first-touch costs (page faults, thread pools).
    embed(model.as_ref(), name, &texts[..1]).await?;
    let cpu_started = process_cpu_seconds();
    let started = Instant::now();
    for chunk in texts.chunks(batch) {
        embed(model.as_ref(), name, chunk).await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (process_cpu_seconds() - cpu_started).max(0.0);
    let n = texts.len() as f64;
    Ok(UnderstudySpeed {
        n_sampled: texts.len(),
        in_flight: batch.min(texts.len()),
        cpu_seconds_per_call: cpu / n,
        wall_seconds_per_call: wall / n,
        cost_per_1k: cpu_time_cost(cpu / n, machine_price).dollars() * 1000.0,
        n_failed: 0,
    })
}

async fn embed(model: &dyn understudy_providers::LocalModel, name: &str, texts: &[String]) -> Result<()> {
    let body = json!({"model": name, "input": texts});
    let request = EmbeddingRequest { body: body.as_object().cloned().unwrap_or_default() };
    model
        .embed(request)
        .await
        .map(|_| ())
        .map_err(|source| LoopError::Load { name: format!("{name} (timing the encoder)"), source })
}

/// The base causal LM answering the sample as eval asks an understudy.
async fn time_causal_lm(
    config: &Config,
    loader: &dyn LocalLoader,
    base: &Path,
    sample: &[ChatExample],
    labels: Option<Vec<String>>,
    machine_price: f64,
) -> Result<UnderstudySpeed> {
    let spec = LocalModelSpec {
        max_batch: Some(config.local_max_batch()),
        speculative_draft: Some(config.local_speculative_draft()),
        ..LocalModelSpec::new("plan-base", base.display().to_string())
    };
    let understudy = Understudy::local(&spec, loader, "local", machine_price)
        .map_err(|source| LoopError::Load { name: base.display().to_string(), source })?;
    let references: Vec<String> = sample.iter().map(ChatExample::answer_text).collect();
    let ask = Ask {
        labels,
        timeout: UNROUTED_TIMEOUT,
        max_tokens: crate::evaluate::max_tokens_for(references.iter().map(String::as_str)),
    };
    let prompts: Vec<Prompt<'_>> = sample.iter().map(Prompt::of).collect();
    let in_flight = understudy.max_concurrency().max(1);
    let cpu_started = process_cpu_seconds();
    let started = Instant::now();
    let answers = ask.score_prompts(&understudy, &prompts).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = (process_cpu_seconds() - cpu_started).max(0.0);
    let n = prompts.len() as f64;
    Ok(UnderstudySpeed {
        n_sampled: prompts.len(),
        in_flight: in_flight.min(prompts.len()),
        cpu_seconds_per_call: cpu / n,
        wall_seconds_per_call: wall / n,
        cost_per_1k: cpu_time_cost(cpu / n, machine_price).dollars() * 1000.0,
        n_failed: answers.iter().filter(|answer| answer.failed()).count(),
    })
}

/// The training run's time: the task's last run with the same method if it
/// has one, else [`TRAIN_PASSES_PER_ROW`] forward passes per row and epoch at
/// the measured speed.
async fn training_estimate(
    store: &Store,
    request: &PlanRequest,
    method: Method,
    understudy: &UnderstudySpeed,
    n_rows: usize,
    machine_price: f64,
) -> Result<TrainingEstimate> {
    let previous =
        store.list_model_versions(&request.task).await?.into_iter().find(|version| version.method == method.as_str());
    let (seconds, basis) = match previous {
        Some(version) if request.epochs.is_none() => {
            (version.wall_seconds, format!("the task's last {} training run, {}", method.as_str(), version.id))
        }
        _ => {
            let epochs = request.epochs.unwrap_or_else(|| match method {
                Method::Classifier => ClassifierTrainConfig::new("", "").epochs,
                _ => LoraTrainConfig::new("", "").epochs,
            });
            // CPU-seconds at the measured speed, run on all the machine's cores at once.
            let cpu = TRAIN_PASSES_PER_ROW * understudy.cpu_seconds_per_call * n_rows as f64 * epochs as f64;
            let seconds = cpu / machine_cores() as f64;
            let basis = format!(
                "{TRAIN_PASSES_PER_ROW} forward passes per row at the measured speed, {n_rows} rows, {epochs} epochs \
                 on {} cores (a rule of thumb: `understudy train` measures the real figure)",
                machine_cores()
            );
            (seconds, basis)
        }
    };
    Ok(TrainingEstimate { seconds, cost: machine_time_cost(seconds, machine_price).dollars(), basis })
}
