//! Training understudy models on CPU with candle.
//!
//! Today: encoder classifiers. [`train_classifier`] fine-tunes a pre-trained
//! BERT encoder (all of it, or its top N layers) with a linear head over a
//! label set, keeps the best epoch, checkpoints so that a killed run resumes,
//! and writes a self-contained directory that [`ClassifierModel::load`] reads.
//! [`train_lora`] trains a LoRA adapter on a causal LM (SFT on chat examples,
//! loss on the assistant's tokens), measures the validation loss and a task
//! metric after every epoch, and exports the best epoch in PEFT format.
//! [`prompt_text`] turns a recorded chat prompt into the classifier's input.

mod checkpoint;
mod classifier;
mod data;
mod epochs;
mod lora;
mod optim;
mod text;
mod train;

/// Tiny random models for this crate's tests and its dependents' tests.
#[doc(hidden)]
pub mod testing;

use std::path::PathBuf;

pub use classifier::{ClassifierModel, Prediction};
pub use lora::{
    encode_rows, train_lora, train_lora_on, validation_loss, write_adapter, ChatRow, LoraEpochMetrics, LoraTrainConfig,
    LoraTrainReport, SftExample, TaskMetric, MIN_TRAIN_ROWS,
};
pub use text::prompt_text;
pub use train::{train_classifier, ClassifierTrainConfig, EpochMetrics, LabeledText, TrainReport};

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// For a process whose global allocator is mimalloc (the CLI's, and the
/// bench examples'): keep freed memory instead of returning it to the OS.
/// Training frees and re-allocates the same large tensors every step; by
/// default mimalloc returns freed memory after 10 ms, and every step then
/// faults it in again, zeroed (a fifth of a LoRA step, measured). Kept, it
/// is reused. Harmless under another allocator.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an option value; any index and value are accepted.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The training data cannot train a classifier; the message says why.
    #[error("bad training data: {0}")]
    Data(String),
    #[error("bad training config: {0}")]
    Config(String),
    #[error(transparent)]
    Load(#[from] understudy_models::LoadError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}
