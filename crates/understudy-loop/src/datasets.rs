//! Building a dataset version: from a task's recorded calls or from a JSONL
//! file, through `understudy_datasets::build`, into files under the config's
//! `datasets_dir` and a row of the store's `datasets` registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use understudy_config::Config;
use understudy_datasets::build::{
    build_dataset as build, eligible_calls, eligible_examples, examples_from_calls, BuildConfig, BuildInput,
    BuiltDataset, DatasetSource, Manifest,
};
use understudy_datasets::dedup::NearDupConfig;
use understudy_datasets::files::{read_split, write_dataset};
use understudy_datasets::jsonl::{read_examples, ChatExample};
use understudy_datasets::split::SplitShares;
use understudy_store::{CallFilter, DatasetRecord, StatusFilter, Store};
use understudy_types::OffsetDateTime;

use crate::error::{io, LoopError, Result};

/// How a dataset version is made from its rows; the defaults are the CLI's.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    /// Rows created at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Rows created before this time.
    pub until: Option<OffsetDateTime>,
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Jaccard similarity from which prompts are near-duplicates (1: off).
    pub near_dup_threshold: f64,
    /// Replace e-mail addresses, phone numbers and secrets with placeholders.
    pub scrub: bool,
    pub shares: SplitShares,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            since: None,
            until: None,
            min_chars: None,
            max_chars: None,
            near_dup_threshold: NearDupConfig::default().threshold,
            scrub: false,
            shares: SplitShares::default(),
        }
    }
}

impl DatasetOptions {
    /// The checked build config for `task`: the task's kind from the config
    /// overrides detection.
    fn build_config(&self, config: &Config, task: &str, source: DatasetSource) -> Result<BuildConfig> {
        let build_config = BuildConfig {
            source,
            since: self.since,
            until: self.until,
            min_chars: self.min_chars,
            max_chars: self.max_chars,
            near_dup: NearDupConfig { threshold: self.near_dup_threshold, ..NearDupConfig::default() },
            scrub: self.scrub,
            shares: self.shares,
            kind_override: config.tasks.get(task).and_then(|task| task.kind),
        };
        // Checked before any rows are read, so bad options fail fast.
        build_config.check()?;
        Ok(build_config)
    }
}

/// A dataset version written and registered.
#[derive(Debug, Clone)]
pub struct SavedDataset {
    pub record: DatasetRecord,
    pub manifest: Manifest,
    /// False when the same rows and parameters were registered before.
    pub is_new: bool,
}

/// A dataset version from `task`'s successful chat calls in the store, with
/// feedback applied (`eligible_calls`).
pub async fn build_dataset(
    config: &Config,
    store: &Store,
    task: &str,
    options: &DatasetOptions,
) -> Result<SavedDataset> {
    let build_config = options.build_config(config, task, DatasetSource::Calls)?;
    let filter = CallFilter { task: Some(task.to_string()), status: Some(StatusFilter::Ok), ..Default::default() };
    let calls: Vec<_> =
        store.list_calls(&filter).await?.into_iter().filter(|call| call.endpoint.is_conversation()).collect();
    if calls.is_empty() {
        let hint = if config.tasks.contains_key(task) { "" } else { ", and it is not in the config" };
        return Err(LoopError::NotFound(format!("task `{task}` has no successful chat calls in the store{hint}")));
    }
    let verdicts = store.task_feedback(task).await?;
    let scores: HashMap<_, _> = verdicts.iter().map(|(call_id, feedback)| (*call_id, feedback.score)).collect();
    let (calls, feedback) = eligible_calls(calls, &scores);
    // Calls all rated negative leave nothing: the build says so, feedback counted.
    let (examples, n_unreadable) = examples_from_calls(&calls, &verdicts);
    let built_at = OffsetDateTime::now_utc();
    let built =
        build(BuildInput { task: task.to_string(), examples, n_unreadable, feedback, config: build_config, built_at })?;
    save(config, store, &built, built_at).await
}

/// A dataset version from the chat examples of a JSONL file. A malformed
/// line fails the whole import: a version with silently missing rows is
/// worse than none.
pub async fn import_dataset(
    config: &Config,
    store: &Store,
    task: &str,
    file: &Path,
    options: &DatasetOptions,
) -> Result<SavedDataset> {
    let build_config = options.build_config(config, task, DatasetSource::Import)?;
    let examples = read_jsonl(file)?;
    if examples.is_empty() {
        return Err(LoopError::NotFound(format!("{} holds no examples", file.display())));
    }
    // Lines carrying feedback (`metadata.feedback`) count as calls rated so.
    let (examples, feedback) = eligible_examples(examples);
    let built_at = OffsetDateTime::now_utc();
    let built = build(BuildInput {
        task: task.to_string(),
        examples,
        n_unreadable: 0,
        feedback,
        config: build_config,
        built_at,
    })?;
    save(config, store, &built, built_at).await
}

fn read_jsonl(file: &Path) -> Result<Vec<ChatExample>> {
    let opened = std::fs::File::open(file).map_err(io(file))?;
    let read = read_examples(std::io::BufReader::new(opened)).map_err(io(file))?;
    if let Some((line, error)) = read.bad_lines.first() {
        let more = match read.bad_lines.len() {
            1 => String::new(),
            n => format!(" (and {} more malformed lines)", n - 1),
        };
        return Err(LoopError::Row {
            path: file.to_path_buf(),
            line: *line,
            message: format!("{error}{more}; no dataset was made"),
        });
    }
    Ok(read.examples.into_iter().map(|(_, example)| example).collect())
}

/// Writes the version's files and registers it.
async fn save(config: &Config, store: &Store, built: &BuiltDataset, built_at: OffsetDateTime) -> Result<SavedDataset> {
    let datasets_dir = &config.store.datasets_dir;
    std::fs::create_dir_all(datasets_dir).map_err(io(datasets_dir))?;
    let (dataset_dir, _written) = write_dataset(datasets_dir, built)?;
    let manifest = built.manifest.clone();
    let record = DatasetRecord {
        id: manifest.id.clone(),
        task: manifest.task.clone(),
        created_at: built_at,
        kind: built.kind(),
        labels: manifest.labels.clone(),
        n_train: manifest.counts.train,
        n_validation: manifest.counts.validation,
        n_test: manifest.counts.test,
        parameters: manifest.parameters.to_string(),
        path: absolute(&dataset_dir).display().to_string(),
    };
    let is_new = store.register_dataset(&record).await?;
    Ok(SavedDataset { record, manifest, is_new })
}

/// The dataset a step on `task` works on: the one named (an id or a unique
/// prefix), or the task's newest.
pub async fn task_dataset(store: &Store, task: &str, id: Option<&str>) -> Result<DatasetRecord> {
    let dataset = match id {
        Some(id) => find_dataset(store, id).await?,
        None => store.list_datasets(Some(task)).await?.into_iter().next().ok_or_else(|| {
            LoopError::NotFound(format!(
                "task `{task}` has no dataset yet; run `understudy dataset build --task {task}`"
            ))
        })?,
    };
    if dataset.task != task {
        return Err(LoopError::Refused(format!(
            "dataset {} belongs to task `{}`, not `{task}`",
            dataset.id, dataset.task
        )));
    }
    Ok(dataset)
}

/// The dataset whose id is `id` or starts with it.
pub async fn find_dataset(store: &Store, id: &str) -> Result<DatasetRecord> {
    let mut found = store.get_dataset(id).await?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(LoopError::NotFound(format!("no dataset with id `{id}` (see `understudy dataset list`)"))),
        _ => Err(LoopError::Refused(format!("`{id}` is the prefix of more than one dataset id; give more of it"))),
    }
}

/// The rows of a dataset version's split, each line's chat example made into
/// a row by `row`; a line that is not one is an error naming its file and line.
pub(crate) fn split_rows<T>(dataset_dir: &str, split: &str, row: impl Fn(ChatExample) -> T) -> Result<Vec<T>> {
    let dir = Path::new(dataset_dir);
    read_split(dir, split)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(line_idx, line)| {
            let example = ChatExample::parse(line).map_err(|error| LoopError::Row {
                path: dir.join(format!("{split}.jsonl")),
                line: line_idx + 1,
                message: error.to_string(),
            })?;
            Ok(row(example))
        })
        .collect()
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
