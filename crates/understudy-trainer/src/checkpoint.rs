//! Training checkpoints: trainable weights, optimizer moments and the loop's
//! position, in `output_dir/checkpoint/`, written atomically (a temporary
//! directory renamed into place) so that a run killed at any moment leaves
//! either the previous checkpoint or the new one; and the other atomic writes
//! of the output directory (a temporary file renamed into place).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::TrainError;

const DIR: &str = "checkpoint";
const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

/// A checkpoint as [`load`] reads it: the loop state `S` (see
/// `crate::epochs`), the trainable weights and the optimizer's moments.
pub(crate) struct Checkpoint<S> {
    pub state: S,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn save<S: Serialize>(
    output_dir: &Path,
    state: &S,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let final_dir = output_dir.join(DIR);
    let tmp = output_dir.join(format!("{DIR}.tmp"));
    let old = output_dir.join(format!("{DIR}.old"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
    let state_json = serde_json::to_vec_pretty(state).map_err(|error| TrainError::Checkpoint(error.to_string()))?;
    std::fs::write(tmp.join(STATE), state_json).map_err(io_error(&tmp))?;
    candle_core::safetensors::save(weights, tmp.join(WEIGHTS))?;
    candle_core::safetensors::save(optimizer, tmp.join(OPTIMIZER))?;
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
        }
        std::fs::rename(&final_dir, &old).map_err(io_error(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_error(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
    }
    Ok(())
}

/// The latest complete checkpoint in `output_dir`, if any.
pub(crate) fn load<S: serde::de::DeserializeOwned>(output_dir: &Path) -> Result<Option<Checkpoint<S>>, TrainError> {
    let candidates: [PathBuf; 2] = [output_dir.join(DIR), output_dir.join(format!("{DIR}.old"))];
    let Some(dir) = candidates.iter().find(|dir| dir.join(STATE).is_file()) else {
        return Ok(None);
    };
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io_error(&state_path))?;
    let state: S = serde_json::from_str(&text)
        .map_err(|error| TrainError::Checkpoint(format!("{}: {error}", state_path.display())))?;
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS), &Device::Cpu)?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER), &Device::Cpu)?;
    Ok(Some(Checkpoint { state, weights, optimizer }))
}

/// Writes `tensors` to `path` through a temporary file and a rename.
pub(crate) fn save_tensors_atomically(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), TrainError> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a rename.
pub(crate) fn write_json_atomically<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), TrainError> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(value).map_err(|error| TrainError::Model(error.to_string()))?;
    std::fs::write(&tmp, json).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}
