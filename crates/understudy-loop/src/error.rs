//! The loop's one error type: what went wrong in a step, typed by where.

use std::path::PathBuf;

use understudy_datasets::build::BuildError;
use understudy_datasets::files::FilesError;
use understudy_eval::ParameterError;
use understudy_providers::ProviderError;
use understudy_store::StoreError;
use understudy_trainer::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    /// Something the step needs is not there: no dataset, no model version,
    /// no calls; the message says what to run to make it.
    #[error("{0}")]
    NotFound(String),
    /// A request the step refuses as asked (a classifier for a generation
    /// task, an ambiguous id prefix, a cascade without a certificate); the
    /// message says why and what to do instead.
    #[error("{0}")]
    Refused(String),
    /// A dataset file whose line is not a chat example.
    #[error("{path}:{line}: {message}")]
    Row { path: PathBuf, line: usize, message: String },
    /// A model that could not be loaded to be evaluated.
    #[error("cannot load {name}: {source}")]
    Load { name: String, source: ProviderError },
    /// The encoder the drift watch embeds prompts with failed.
    #[error("the drift watch's encoder: {0}")]
    Encoder(ProviderError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// Training ended at its step limit or interrupt, leaving a checkpoint.
    #[error("training stopped before the end; resume it from its checkpoint (`understudy train --resume`)")]
    Interrupted,
    /// The blocking task that trained panicked or was cancelled.
    #[error("the training task failed: {0}")]
    TrainingTask(#[from] tokio::task::JoinError),
}

pub type Result<T, E = LoopError> = std::result::Result<T, E>;

/// An IO error on `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LoopError {
    let path = path.into();
    move |source| LoopError::Io { path, source }
}
