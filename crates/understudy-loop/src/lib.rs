//! The loop that moves a task onto its understudy, as functions over the
//! store and the config: [`import_calls`] (past calls into the record),
//! [`build_dataset`] (recorded calls into a dataset
//! version), [`train`] (a dataset version into a registered model version),
//! [`evaluate`] (the understudy against the lead, as served, with its
//! cascade threshold certified), [`promote`] (a policy change the gateways
//! pick up) and [`ledger`] (what the understudy saved), and before any of it [`plan`]
//! (whether the task will pay). The CLI is flags, one
//! call here, and rendering; a daemon or a test calls the same functions.

pub mod autopilot;
pub mod calibration;
pub mod datasets;
pub mod drift;
mod error;
pub mod evaluate;
pub mod export;
pub mod history;
pub mod import;
pub mod ledger;
pub mod plan;
pub mod promote;
pub mod train;

pub use autopilot::{Autopilot, Stage};
pub use calibration::{calibrated_threshold, Calibration, CALIBRATION_FILE};
pub use datasets::{build_dataset, find_dataset, import_dataset, task_dataset, DatasetOptions, SavedDataset};
pub use drift::{drift_history, task_drift, DriftPoint, Encoder, TaskDrift};
pub use error::{LoopError, Result};
pub use evaluate::{evaluate, find_model_version, EvalEvent, EvalRequest, Evaluation};
pub use export::export_calls;
pub use history::{history, HistoryEntry};
pub use import::{import_calls, Imported};
pub use ledger::{ledger, Ledger, TaskSavings};
pub use plan::{plan, Plan, PlanRequest};
pub use promote::{promote, PromoteRequest, Promotion};
pub use train::{resolve_encoder, train, Method, TrainJob, TrainRequest, TrainSummary, TrainedVersion};
