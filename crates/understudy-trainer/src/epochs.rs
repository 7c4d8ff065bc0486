//! The epoch loop both trainers run, written once over [`Trainee`].
//!
//! The loop owns what the classifier and LoRA trainers share: the batches of
//! each epoch (shuffled by seed and epoch), gradient accumulation over
//! micro-batches, the warmup+cosine learning rate, clipping, the AdamW step,
//! checkpoints every N steps and at each epoch end, resuming from one, the
//! choice of the best epoch, early stopping after `patience` epochs without
//! a better one, and the `stop_after_steps` interruption. A [`Trainee`]
//! supplies the model-specific parts: a micro-batch's loss, the validation
//! score, what the best epoch exports, and the state its checkpoint carries.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use understudy_models::dropout::Dropout;

use crate::checkpoint;
use crate::data;
use crate::optim::{self, AdamW};
use crate::TrainError;

/// What one epoch scored on validation.
pub(crate) trait EpochScore {
    /// The epoch, 1-based.
    fn epoch(&self) -> usize;
    /// Whether this epoch is better than `best`.
    fn beats(&self, best: &Self) -> bool;
}

/// Where an epoch ended, for [`Trainee::evaluate`].
pub(crate) struct EpochEnd {
    /// 1-based.
    pub epoch: usize,
    /// Optimizer steps in the epoch (the last one may be cut by `max_steps`).
    pub steps: usize,
    /// Mean step loss over the epoch.
    pub train_loss: f64,
}

/// A model being trained by [`run`].
pub(crate) trait Trainee {
    /// One epoch's validation metrics; the checkpoint keeps their history.
    type Metrics: EpochScore + Clone + Serialize + DeserializeOwned;
    /// What the trainee keeps in a checkpoint besides the loop's position,
    /// the trainable weights and the optimizer (flattened into `state.json`).
    type Saved: Serialize + DeserializeOwned;

    /// Called once on a run that does not resume, before the first step.
    fn start(&mut self) -> Result<(), TrainError>;
    /// Checks a checkpoint (saved with `seed`) belongs to this run and loads
    /// its trainable weights.
    fn resume(
        &mut self,
        seed: u64,
        saved: Self::Saved,
        weights: &HashMap<String, Tensor>,
        optimizer: &AdamW,
    ) -> Result<(), TrainError>;
    fn checkpoint_state(&self) -> Self::Saved;
    /// Backpropagates the loss of each micro-batch (rows of the training set)
    /// through `step`; returns the work done (rows or tokens) for the rate.
    fn train_step(&mut self, micro_batches: &[Vec<usize>], step: &mut Step<'_>) -> Result<usize, TrainError>;
    /// The progress bar's rate, as text with its unit.
    fn rate_text(rate: f64) -> String;
    fn evaluate(&mut self, end: EpochEnd) -> Result<Self::Metrics, TrainError>;
    /// The line printed after each epoch.
    fn epoch_line(&self, metrics: &Self::Metrics, elapsed_seconds: f64) -> String;
    /// Writes the current weights as the best epoch's.
    fn export_best(&mut self) -> Result<(), TrainError>;
}

/// The loop's settings, common to both trainers' configs.
pub(crate) struct LoopConfig<'a> {
    pub output_dir: &'a Path,
    pub epochs: usize,
    /// The run (and the schedule) ends after this many steps.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum_steps: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub patience: usize,
    pub checkpoint_every_steps: Option<usize>,
    pub resume: bool,
    pub progress: bool,
    pub stop_after_steps: Option<usize>,
    /// Whether `stop_after_steps` falling on the run's last step still
    /// reports the run as interrupted (the classifier's behaviour; LoRA's
    /// run then finishes).
    pub stop_at_last_step_interrupts: bool,
}

/// Where the training loop stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LoopState<M> {
    /// The epoch to run next (0-based).
    pub epoch: usize,
    /// Optimizer steps already done within `epoch`.
    pub step_in_epoch: usize,
    pub global_step: usize,
    pub seed: u64,
    pub history: Vec<M>,
    /// 1-based epoch whose weights are in the output directory.
    pub best_epoch: Option<usize>,
    pub epochs_without_improvement: usize,
    pub stopped_early: bool,
    /// Wall time spent before this process (resumed runs add up).
    pub elapsed_seconds: f64,
    /// Sum of the step losses so far in `epoch`.
    pub epoch_loss_sum: f64,
}

impl<M: EpochScore> LoopState<M> {
    /// The best epoch's metrics.
    pub fn best(&self) -> Option<&M> {
        self.best_epoch.and_then(|epoch| self.history.iter().find(|metrics| metrics.epoch() == epoch))
    }
}

/// A checkpoint's `state.json`: the loop's position and the trainee's state.
#[derive(Serialize, Deserialize)]
struct SavedState<M, S> {
    #[serde(flatten)]
    position: LoopState<M>,
    #[serde(flatten)]
    trainee: S,
}

/// One optimizer step in the making: the trainee backpropagates each
/// micro-batch's loss through it, and the loop then applies the summed
/// gradients.
pub(crate) struct Step<'a> {
    optimizer: &'a AdamW,
    grads: Vec<Option<Tensor>>,
    loss: f64,
    seed: u64,
    global_step: usize,
}

impl Step<'_> {
    /// The dropout of micro-batch `micro_batch_idx`, seeded by the run's
    /// seed and the step so that a resumed run repeats it.
    pub fn dropout(&self, micro_batch_idx: usize) -> Dropout {
        Dropout::new(data::mix(self.seed, (self.global_step as u64) << 16 | micro_batch_idx as u64))
    }

    /// Adds the gradients of `loss` (one micro-batch's, already weighted by
    /// its share of the step) to the step's.
    pub fn backward(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        self.loss += loss.to_scalar::<f32>()? as f64;
        self.optimizer.accumulate(&mut self.grads, &loss.backward()?)?;
        Ok(())
    }
}

/// How a run of the loop ended.
pub(crate) struct LoopOutcome<M> {
    pub state: LoopState<M>,
    /// `stop_after_steps` ended the run: the output directory holds a
    /// checkpoint to resume from, not a finished model.
    pub interrupted: bool,
    /// Work (as [`Trainee::train_step`] counts it) done by this process.
    pub work_this_run: usize,
    /// Seconds this process spent in the loop.
    pub loop_seconds: f64,
    /// Of those, the time in training steps and validation passes.
    pub compute_seconds: f64,
    /// Wall time of the whole run, including resumed runs' and the set-up
    /// since `started`.
    pub wall_seconds: f64,
}

/// Trains `trainee` over `lengths.len()` training rows (their token counts
/// group the batches), checkpointing in `config.output_dir`. `started` is
/// when this process began the run (wall time counts from there).
pub(crate) fn run<T: Trainee>(
    trainee: &mut T,
    optimizer: &mut AdamW,
    lengths: &[usize],
    config: &LoopConfig<'_>,
    started: Instant,
) -> Result<LoopOutcome<T::Metrics>, TrainError> {
    let output_dir = config.output_dir;
    std::fs::create_dir_all(output_dir).map_err(|source| TrainError::Io { path: output_dir.to_path_buf(), source })?;
    let mut resumed = None;
    if config.resume {
        if let Some(saved) = checkpoint::load::<SavedState<T::Metrics, T::Saved>>(output_dir)? {
            let SavedState { position, trainee: trainee_state } = saved.state;
            trainee.resume(position.seed, trainee_state, &saved.weights, optimizer)?;
            optimizer
                .load_state(&saved.optimizer, position.global_step as u64)
                .map_err(|error| TrainError::Checkpoint(error.to_string()))?;
            resumed = Some(position);
        }
    }
    let mut state = match resumed {
        Some(state) => state,
        None => {
            trainee.start()?;
            LoopState {
                epoch: 0,
                step_in_epoch: 0,
                global_step: 0,
                seed: config.seed,
                history: Vec::new(),
                best_epoch: None,
                epochs_without_improvement: 0,
                stopped_early: false,
                elapsed_seconds: 0.0,
                epoch_loss_sum: 0.0,
            }
        }
    };
    let previous_seconds = state.elapsed_seconds;
    let elapsed = || previous_seconds + started.elapsed().as_secs_f64();

    let batches_per_epoch = lengths.len().div_ceil(config.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(config.grad_accum_steps);
    let planned_steps = steps_per_epoch * config.epochs;
    let total_steps = config.max_steps.map_or(planned_steps, |max| max.min(planned_steps));
    let epochs = if steps_per_epoch == 0 { config.epochs } else { total_steps.div_ceil(steps_per_epoch) };
    let warmup = ((total_steps as f64) * config.warmup_ratio).round() as usize;

    let bar = progress_bar(config.progress, total_steps, state.global_step);
    let loop_started = Instant::now();
    let mut work_this_run = 0usize;
    let mut interrupted = false;
    let mut compute_seconds = 0f64;
    'epochs: while state.epoch < epochs && !state.stopped_early && state.global_step < total_steps {
        let batches = data::epoch_batches(lengths, config.batch_size, config.seed, state.epoch);
        while state.step_in_epoch < steps_per_epoch && state.global_step < total_steps {
            let first = state.step_in_epoch * config.grad_accum_steps;
            let micro = &batches[first..(first + config.grad_accum_steps).min(batches.len())];
            let lr = optim::learning_rate(config.learning_rate, state.global_step, warmup, total_steps);
            let step_started = Instant::now();
            let mut step = Step {
                optimizer,
                grads: vec![None; optimizer.params.len()],
                loss: 0.0,
                seed: config.seed,
                global_step: state.global_step,
            };
            let work = trainee.train_step(micro, &mut step)?;
            let Step { grads, loss, .. } = step;
            optimizer.step_accumulated(grads, config.max_grad_norm, lr)?;
            compute_seconds += step_started.elapsed().as_secs_f64();
            state.epoch_loss_sum += loss;
            state.step_in_epoch += 1;
            state.global_step += 1;
            work_this_run += work;
            let rate = work_this_run as f64 / loop_started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(state.global_step as u64);
            bar.set_message(format!("epoch {}/{epochs} loss {loss:.4} {}", state.epoch + 1, T::rate_text(rate)));
            let at_epoch_end = state.step_in_epoch == steps_per_epoch || state.global_step == total_steps;
            if !at_epoch_end
                && config.checkpoint_every_steps.is_some_and(|every| state.global_step.is_multiple_of(every))
            {
                state.elapsed_seconds = elapsed();
                save(output_dir, &state, trainee, optimizer)?;
            }
            if !at_epoch_end && config.stop_after_steps == Some(state.global_step) {
                interrupted = true;
                break 'epochs;
            }
        }

        let evaluate_started = Instant::now();
        let metrics = trainee.evaluate(EpochEnd {
            epoch: state.epoch + 1,
            steps: state.step_in_epoch,
            train_loss: state.epoch_loss_sum / state.step_in_epoch.max(1) as f64,
        })?;
        compute_seconds += evaluate_started.elapsed().as_secs_f64();
        let line = trainee.epoch_line(&metrics, elapsed());
        if bar.is_hidden() {
            if config.progress {
                eprintln!("{line}");
            }
        } else {
            bar.println(line);
        }
        if state.best().is_none_or(|best| metrics.beats(best)) {
            trainee.export_best()?;
            state.best_epoch = Some(metrics.epoch());
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
            if state.epochs_without_improvement >= config.patience.max(1) {
                state.stopped_early = true;
            }
        }
        state.history.push(metrics);
        state.epoch += 1;
        state.step_in_epoch = 0;
        state.epoch_loss_sum = 0.0;
        state.elapsed_seconds = elapsed();
        save(output_dir, &state, trainee, optimizer)?;
        if config.stop_after_steps == Some(state.global_step)
            && (config.stop_at_last_step_interrupts || state.global_step < total_steps)
        {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();

    Ok(LoopOutcome {
        state,
        interrupted,
        work_this_run,
        loop_seconds: loop_started.elapsed().as_secs_f64(),
        compute_seconds,
        wall_seconds: elapsed(),
    })
}

/// A checkpoint of the loop's position, the trainee's state, the trainable
/// weights (the optimizer's parameters) and the optimizer's moments.
fn save<T: Trainee>(
    output_dir: &Path,
    state: &LoopState<T::Metrics>,
    trainee: &T,
    optimizer: &AdamW,
) -> Result<(), TrainError> {
    let weights: HashMap<String, Tensor> =
        optimizer.params.iter().map(|param| (param.name.clone(), param.var.as_tensor().clone())).collect();
    let saved = SavedState { position: state.clone(), trainee: trainee.checkpoint_state() };
    checkpoint::save(output_dir, &saved, &weights, &optimizer.state_tensors()?)
}

fn progress_bar(enabled: bool, total_steps: usize, position: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total_steps as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(position as u64);
    bar
}
