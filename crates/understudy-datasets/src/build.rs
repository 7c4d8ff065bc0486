//! Building a dataset version: a task's examples through the filters,
//! scrubbing, de-duplication, kind detection and the time split, into rows
//! and a manifest whose id is a hash of its content.
//!
//! Everything here is a plain function over values. Reading calls from the
//! store and writing files are the callers' business (see `files`).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use understudy_types::{CallRecord, Feedback, FeedbackScore, TaskKind, Uuid};

use crate::dedup::{keep_distinct, NearDupConfig};
use crate::jsonl::{format_time, message_text, prompt_key, ChatExample};
use crate::kind::{decide_kind, normalize_label};
use crate::scrub::{PatternError, ScrubCounts, Scrubber};
use crate::split::{time_split, SplitCounts, SplitError, SplitShares};

/// Bumped whenever the build changes what rows it makes from the same input,
/// so that a changed build never reuses an old version's id.
pub const BUILD_FORMAT: &str = "understudy-dataset-v1";

/// The split names, in the order their rows are hashed and exported.
pub const SPLIT_NAMES: [&str; 3] = ["train", "validation", "test"];

/// Where a dataset's rows came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetSource {
    /// The task's recorded calls in the store.
    Calls,
    /// A JSONL file brought in with `dataset import`.
    Import,
}

impl DatasetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetSource::Calls => "calls",
            DatasetSource::Import => "import",
        }
    }
}

/// How to build. Every field is part of the dataset's id.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    pub source: DatasetSource,
    /// Keep rows created at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Keep rows created before this time.
    pub until: Option<OffsetDateTime>,
    /// Keep rows whose prompt text has at least this many characters.
    pub min_chars: Option<usize>,
    /// Keep rows whose prompt text has at most this many characters.
    pub max_chars: Option<usize>,
    pub near_dup: NearDupConfig,
    /// Replace e-mail addresses, phone numbers and secrets with placeholders.
    pub scrub: bool,
    pub shares: SplitShares,
    /// The kind the config names for the task, overriding detection.
    pub kind_override: Option<TaskKind>,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            source: DatasetSource::Calls,
            since: None,
            until: None,
            min_chars: None,
            max_chars: None,
            near_dup: NearDupConfig::default(),
            scrub: false,
            shares: SplitShares::default(),
            kind_override: None,
        }
    }
}

impl BuildConfig {
    /// The parameters as the JSON object kept in the manifest and the registry.
    pub fn parameters(&self) -> Value {
        json!({
            "source": self.source.as_str(),
            "since": self.since.map(format_time),
            "until": self.until.map(format_time),
            "min_chars": self.min_chars,
            "max_chars": self.max_chars,
            "near_dup_threshold": self.near_dup.threshold,
            "shingle_words": self.near_dup.shingle_words,
            "scrub": self.scrub,
            "validation_share": self.shares.validation,
            "test_share": self.shares.test,
            "kind_override": self.kind_override.map(TaskKind::as_str),
        })
    }

    pub fn check(&self) -> Result<(), BuildError> {
        self.shares.check()?;
        let threshold = self.near_dup.threshold;
        if !(threshold.is_finite() && threshold > 0.0 && threshold <= 1.0) {
            return Err(BuildError::NearDupThreshold(threshold));
        }
        if let (Some(min_chars), Some(max_chars)) = (self.min_chars, self.max_chars) {
            if min_chars > max_chars {
                return Err(BuildError::CharRange { min_chars, max_chars });
            }
        }
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(BuildError::TimeRange { since: format_time(since), until: format_time(until) });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Shares(#[from] SplitError),
    #[error("--near-dup-threshold {0} must be above 0 and at most 1 (1 turns near-duplicate removal off)")]
    NearDupThreshold(f64),
    #[error("--min-chars {min_chars} is more than --max-chars {max_chars}")]
    CharRange { min_chars: usize, max_chars: usize },
    #[error("--since {since} is not before --until {until}")]
    TimeRange { since: String, until: String },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("no rows are left for task `{task}` after the filters ({report})")]
    Empty { task: String, report: String },
}

/// What went in: the task's examples, in time order as far as the source
/// knows it (the store's oldest first, or a file's line order).
#[derive(Debug, Clone)]
pub struct BuildInput {
    pub task: String,
    pub examples: Vec<ChatExample>,
    /// Source rows that held no usable example (counted in the report).
    pub n_unreadable: u64,
    /// What feedback on the calls removed before they became examples.
    pub feedback: FeedbackFilter,
    pub config: BuildConfig,
    /// When the build ran; recorded in the manifest, not part of the id.
    pub built_at: OffsetDateTime,
}

/// How many rows each step removed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FilterReport {
    /// Rows the source offered.
    pub n_source: u64,
    pub unreadable: u64,
    /// Calls left out by feedback: rated negative, or unrated while the
    /// task has positively rated calls.
    #[serde(default)]
    pub feedback: u64,
    /// Whether only positively rated calls were used.
    #[serde(default)]
    pub feedback_positive_only: bool,
    pub time_range: u64,
    pub prompt_length: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    /// Rows of a label task whose answer is outside the label set.
    pub off_label: u64,
    pub n_kept: u64,
    /// Rows that scrubbing changed, and what it replaced.
    pub scrubbed_rows: u64,
    pub scrubbed: ScrubCounts,
}

impl std::fmt::Display for FilterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} source rows; removed: {} by feedback{}, {} unreadable, {} outside the time range, \
             {} by prompt length, {} exact duplicates, {} near-duplicates, {} off-label",
            self.n_source,
            self.feedback,
            if self.feedback_positive_only { " (only positively rated calls are used)" } else { "" },
            self.unreadable,
            self.time_range,
            self.prompt_length,
            self.exact_duplicates,
            self.near_duplicates,
            self.off_label
        )
    }
}

/// Prompts that appear in two splits (by [`prompt_key`]); all zero after de-duplication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlapReport {
    pub train_test: u64,
    pub train_validation: u64,
    pub validation_test: u64,
}

/// How often one label occurs in each split.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabelCount {
    pub label: String,
    pub train: u64,
    pub validation: u64,
    pub test: u64,
}

/// `manifest.json`: everything about a dataset version except its rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub id: String,
    /// The full content hash the id is the start of.
    pub sha256: String,
    pub task: String,
    pub created_at: String,
    /// `label` or `generation`.
    pub kind: String,
    pub kind_overridden: bool,
    pub labels: Vec<String>,
    pub counts: SplitCounts,
    pub label_distribution: Vec<LabelCount>,
    pub filters: FilterReport,
    pub overlap: OverlapReport,
    /// `created_at`, or `input order` when some rows had no time.
    pub time_order: String,
    pub parameters: Value,
}

/// A built dataset version: its manifest and its rows, each split oldest first.
#[derive(Debug, Clone)]
pub struct BuiltDataset {
    pub manifest: Manifest,
    pub train: Vec<ChatExample>,
    pub validation: Vec<ChatExample>,
    pub test: Vec<ChatExample>,
}

impl BuiltDataset {
    /// The kind as a value (the manifest keeps its name).
    pub fn kind(&self) -> TaskKind {
        TaskKind::parse(&self.manifest.kind).unwrap_or(TaskKind::Generation)
    }

    pub fn split(&self, name: &str) -> &[ChatExample] {
        match name {
            "train" => &self.train,
            "validation" => &self.validation,
            _ => &self.test,
        }
    }
}

/// What feedback did to a task's calls before the build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedbackFilter {
    /// Calls left out.
    pub removed: u64,
    /// Whether only positively rated calls were kept.
    pub positive_only: bool,
}

/// The calls a dataset may learn from, given the latest feedback on each
/// rated call. A call rated negative is never a training row. When any call
/// is rated positive, only positively rated calls are used: a user who rates
/// answers vouches for those, and an unrated answer is unknown. With only
/// negative ratings (or none), every call not rated negative is used.
pub fn eligible_calls(
    calls: Vec<CallRecord>,
    feedback: &HashMap<Uuid, FeedbackScore>,
) -> (Vec<CallRecord>, FeedbackFilter) {
    keep_by_feedback(calls, |call| feedback.get(&call.id).copied())
}

/// [`eligible_calls`] for examples read from a file, by the verdicts their
/// lines carry.
pub fn eligible_examples(examples: Vec<ChatExample>) -> (Vec<ChatExample>, FeedbackFilter) {
    keep_by_feedback(examples, |example| example.feedback.as_ref().map(|feedback| feedback.score))
}

fn keep_by_feedback<T>(items: Vec<T>, score_of: impl Fn(&T) -> Option<FeedbackScore>) -> (Vec<T>, FeedbackFilter) {
    let n_before = items.len();
    let positive_only = items.iter().any(|item| score_of(item) == Some(FeedbackScore::Positive));
    let kept: Vec<T> = items
        .into_iter()
        .filter(|item| match score_of(item) {
            Some(FeedbackScore::Positive) => true,
            Some(FeedbackScore::Negative) => false,
            None => !positive_only,
        })
        .collect();
    let removed = (n_before - kept.len()) as u64;
    (kept, FeedbackFilter { removed, positive_only })
}

/// The chat examples among calls (in their order), each with the verdict
/// that counts on its call (from `feedback`, by call id), and how many calls
/// held none.
pub fn examples_from_calls(calls: &[CallRecord], feedback: &HashMap<Uuid, Feedback>) -> (Vec<ChatExample>, u64) {
    let examples: Vec<ChatExample> = calls
        .iter()
        .filter_map(|call| Some(ChatExample::from_call(call)?.with_feedback(feedback.get(&call.id))))
        .collect();
    let n_unreadable = (calls.len() - examples.len()) as u64;
    (examples, n_unreadable)
}

/// Characters of prompt text (every message's text content).
pub fn prompt_chars(example: &ChatExample) -> usize {
    example.prompt.iter().map(|message| message_text(message).chars().count()).sum()
}

/// Runs the whole build: filter, scrub, de-duplicate, detect the kind, split.
pub fn build_dataset(input: BuildInput) -> Result<BuiltDataset, BuildError> {
    let BuildInput { task, examples, n_unreadable, feedback, config, built_at } = input;
    config.check()?;
    let mut report = FilterReport {
        n_source: examples.len() as u64 + n_unreadable + feedback.removed,
        unreadable: n_unreadable,
        feedback: feedback.removed,
        feedback_positive_only: feedback.positive_only,
        ..Default::default()
    };

    // Time order: by `created_at` when every row has one (stable, so ties keep
    // the source's order), else the source's order as given.
    let mut rows = examples;
    let every_row_has_a_time = rows.iter().all(|example| example.created_at.is_some());
    if every_row_has_a_time {
        rows.sort_by_key(|example| example.created_at);
    }
    let time_order = if every_row_has_a_time { "created_at" } else { "input order" };

    // A row without a time cannot be shown to be inside a time range.
    if config.since.is_some() || config.until.is_some() {
        let n_before = rows.len();
        rows.retain(|example| {
            example.created_at.is_some_and(|at| {
                config.since.is_none_or(|since| at >= since) && config.until.is_none_or(|until| at < until)
            })
        });
        report.time_range = (n_before - rows.len()) as u64;
    }

    let n_before = rows.len();
    rows.retain(|example| {
        let n_chars = prompt_chars(example);
        config.min_chars.is_none_or(|min_chars| n_chars >= min_chars)
            && config.max_chars.is_none_or(|max_chars| n_chars <= max_chars)
    });
    report.prompt_length = (n_before - rows.len()) as u64;

    // Scrub before de-duplicating, so that prompts differing only in a
    // scrubbed e-mail address count as the duplicates they now are.
    if config.scrub {
        let scrubber = Scrubber::new()?;
        for example in &mut rows {
            let counts = scrub_example(&scrubber, example);
            if counts.total() > 0 {
                report.scrubbed_rows += 1;
                report.scrubbed.add(counts);
            }
        }
    }

    // Exact duplicates: walk newest first, so the newest of each prompt stays.
    let mut seen_prompts = HashSet::new();
    let keep_exact: Vec<bool> =
        rows.iter().rev().map(|example| seen_prompts.insert(prompt_key(&example.prompt))).collect();
    rows = retain_newest_first(rows, &keep_exact);
    report.exact_duplicates = keep_exact.iter().filter(|kept| !**kept).count() as u64;

    let near_dup_texts: Vec<String> = rows.iter().rev().map(near_dup_text).collect();
    let keep_near = keep_distinct(&near_dup_texts, config.near_dup);
    rows = retain_newest_first(rows, &keep_near);
    report.near_duplicates = keep_near.iter().filter(|kept| !**kept).count() as u64;

    let answers: Vec<String> = rows.iter().map(|example| normalize_label(&example.answer_text())).collect();
    let decision = decide_kind(&answers, config.kind_override);
    if decision.kind == TaskKind::Label {
        let label_set: HashSet<&str> = decision.labels.iter().map(String::as_str).collect();
        let n_before = rows.len();
        rows = rows
            .into_iter()
            .zip(&answers)
            .filter(|(_, answer)| label_set.contains(answer.as_str()))
            .map(|(example, _)| example)
            .collect();
        report.off_label = (n_before - rows.len()) as u64;
    }
    report.n_kept = rows.len() as u64;
    if rows.is_empty() {
        return Err(BuildError::Empty { task, report: report.to_string() });
    }

    let (train, validation, test) = time_split(rows, config.shares);
    let counts =
        SplitCounts { train: train.len() as u64, validation: validation.len() as u64, test: test.len() as u64 };
    let overlap = OverlapReport {
        train_test: prompt_overlap(&train, &test),
        train_validation: prompt_overlap(&train, &validation),
        validation_test: prompt_overlap(&validation, &test),
    };
    let label_distribution = match decision.kind {
        TaskKind::Label => label_distribution(&decision.labels, [&train, &validation, &test]),
        TaskKind::Generation => Vec::new(),
    };

    let parameters = config.parameters();
    let sha256 = content_hash(&task, decision.kind, &decision.labels, &parameters, [&train, &validation, &test]);
    let manifest = Manifest {
        id: dataset_id(&sha256),
        sha256,
        task,
        created_at: format_time(built_at),
        kind: decision.kind.as_str().to_string(),
        kind_overridden: decision.overridden,
        labels: decision.labels,
        counts,
        label_distribution,
        filters: report,
        overlap,
        time_order: time_order.to_string(),
        parameters,
    };
    Ok(BuiltDataset { manifest, train, validation, test })
}

/// The short id a content hash is shown as: `ds-` and its first 12 hex digits.
pub fn dataset_id(sha256_hex: &str) -> String {
    format!("ds-{}", &sha256_hex[..12.min(sha256_hex.len())])
}

/// SHA-256 over everything that makes the version what it is: the build
/// format, the task, its kind and labels, the parameters, and every row of
/// every split in order. The build time is left out, so rebuilding the same
/// calls the same way gives the same id.
pub fn content_hash(
    task: &str,
    kind: TaskKind,
    labels: &[String],
    parameters: &Value,
    splits: [&[ChatExample]; 3],
) -> String {
    let mut hasher = Sha256::new();
    let header = json!({
        "format": BUILD_FORMAT,
        "task": task,
        "kind": kind.as_str(),
        "labels": labels,
        "parameters": parameters,
    });
    hasher.update(header.to_string().as_bytes());
    hasher.update(b"\n");
    for (name, rows) in SPLIT_NAMES.iter().zip(splits) {
        hasher.update(format!("[{name}] {}\n", rows.len()).as_bytes());
        for example in rows {
            hasher.update(example.to_line().as_bytes());
            hasher.update(b"\n");
        }
    }
    hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Keeps rows whose flag (given newest first, i.e. for the rows reversed) is set.
fn retain_newest_first(rows: Vec<ChatExample>, keep_newest_first: &[bool]) -> Vec<ChatExample> {
    rows.into_iter().zip(keep_newest_first.iter().rev()).filter(|(_, kept)| **kept).map(|(row, _)| row).collect()
}

/// The text near-duplicates are judged on: the conversation without its
/// system and developer messages. Those are the task's instructions, the same
/// for every call, and would make every pair of short questions look alike.
fn near_dup_text(example: &ChatExample) -> String {
    let is_instruction =
        |message: &&Value| matches!(message.get("role").and_then(Value::as_str), Some("system") | Some("developer"));
    let conversation: Vec<String> =
        example.prompt.iter().filter(|message| !is_instruction(message)).map(message_text).collect();
    if conversation.iter().all(|text| text.trim().is_empty()) {
        return example.prompt.iter().map(message_text).collect::<Vec<_>>().join("\n");
    }
    conversation.join("\n")
}

fn scrub_example(scrubber: &Scrubber, example: &mut ChatExample) -> ScrubCounts {
    let mut counts = ScrubCounts::default();
    for message in &mut example.prompt {
        if let Value::Object(object) = message {
            counts.add(scrub_content(scrubber, object));
        }
    }
    counts.add(scrub_content(scrubber, &mut example.answer));
    // A feedback comment is free text from a user, and may name one too.
    if let Some(comment) = example.feedback.as_mut().and_then(|feedback| feedback.comment.as_mut()) {
        counts.add(scrub_text(scrubber, comment));
    }
    counts
}

fn scrub_text(scrubber: &Scrubber, text: &mut String) -> ScrubCounts {
    let (scrubbed, found) = scrubber.scrub(text);
    if found.total() > 0 {
        *text = scrubbed;
    }
    found
}

/// Scrubs a message's `content`: a string, or the `text` of its parts.
fn scrub_content(scrubber: &Scrubber, message: &mut Map<String, Value>) -> ScrubCounts {
    let mut counts = ScrubCounts::default();
    match message.get_mut("content") {
        Some(Value::String(text)) => counts.add(scrub_text(scrubber, text)),
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(Value::String(text)) = part.get_mut("text") {
                    counts.add(scrub_text(scrubber, text));
                }
            }
        }
        _ => {}
    }
    counts
}

fn prompt_overlap(older: &[ChatExample], newer: &[ChatExample]) -> u64 {
    let older_prompts: HashSet<String> = older.iter().map(|example| prompt_key(&example.prompt)).collect();
    let newer_prompts: BTreeSet<String> = newer.iter().map(|example| prompt_key(&example.prompt)).collect();
    newer_prompts.iter().filter(|key| older_prompts.contains(*key)).count() as u64
}

fn label_distribution(labels: &[String], splits: [&[ChatExample]; 3]) -> Vec<LabelCount> {
    let count = |rows: &[ChatExample], label: &str| {
        rows.iter().filter(|example| normalize_label(&example.answer_text()) == label).count() as u64
    };
    labels
        .iter()
        .map(|label| LabelCount {
            label: label.clone(),
            train: count(splits[0], label),
            validation: count(splits[1], label),
            test: count(splits[2], label),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn example(question: &str, answer: &str, minute: i64) -> ChatExample {
        ChatExample {
            prompt: vec![
                json!({"role": "system", "content": "Answer with one label."}),
                json!({"role": "user", "content": question}),
            ],
            answer: json!({"role": "assistant", "content": answer}).as_object().cloned().unwrap_or_default(),
            tools: None,
            response_format: None,
            model: Some("gpt-4o-mini".into()),
            created_at: Some(datetime!(2026-10-01 00:00 UTC) + time::Duration::minutes(minute)),
            usage: None,
            feedback: None,
        }
    }

    fn input(examples: Vec<ChatExample>, config: BuildConfig) -> BuildInput {
        BuildInput {
            task: "trec".into(),
            examples,
            n_unreadable: 0,
            feedback: FeedbackFilter::default(),
            config,
            built_at: datetime!(2026-11-01 00:00 UTC),
        }
    }

    /// 40 distinct questions with labels, one a minute, given newest first
    /// so the build has to sort them.
    fn questions() -> Vec<ChatExample> {
        let subjects = [
            "Hamlet",
            "the Moon",
            "a quark",
            "Everest",
            "the Nile",
            "Mozart",
            "a lighthouse",
            "Saturn",
            "Lisbon",
            "penicillin",
        ];
        let forms = ["Who discovered", "How far away is", "What is", "Where is"];
        let labels = ["HUM", "NUM", "DESC", "LOC"];
        let mut rows = Vec::new();
        for (form_idx, form) in forms.iter().enumerate() {
            for (subject_idx, subject) in subjects.iter().enumerate() {
                let minute = (form_idx * subjects.len() + subject_idx) as i64;
                rows.push(example(&format!("{form} {subject}?"), labels[form_idx], minute));
            }
        }
        rows.reverse();
        rows
    }

    #[test]
    fn a_build_splits_by_time_and_detects_labels() {
        let built = build_dataset(input(questions(), BuildConfig::default())).expect("builds");
        let manifest = &built.manifest;
        assert_eq!(manifest.counts, SplitCounts { train: 28, validation: 4, test: 8 });
        assert_eq!(manifest.kind, "label");
        assert_eq!(manifest.labels, vec!["DESC", "HUM", "LOC", "NUM"]);
        assert_eq!(manifest.overlap, OverlapReport::default());
        assert_eq!(manifest.time_order, "created_at");
        let newest = |rows: &[ChatExample]| rows.iter().filter_map(|row| row.created_at).max();
        let oldest = |rows: &[ChatExample]| rows.iter().filter_map(|row| row.created_at).min();
        assert!(newest(&built.train) < oldest(&built.validation));
        assert!(newest(&built.validation) < oldest(&built.test));
        // The newest eight are the "Where is" questions.
        assert!(built.test.iter().all(|row| row.answer_text() == "LOC"));
        let loc = manifest.label_distribution.iter().find(|count| count.label == "LOC").expect("LOC");
        assert_eq!((loc.train, loc.validation, loc.test), (0, 2, 8));
        assert!(manifest.id.starts_with("ds-") && manifest.id.len() == 15, "{}", manifest.id);
    }

    #[test]
    fn planted_exact_and_near_duplicates_are_removed_keeping_the_newest() {
        let long_question = "My order arrived yesterday but the box was crushed and two of the six glasses inside \
            were broken, the others look fine. I would like a replacement for the broken ones rather than a refund, \
            and I can send photos of the damage if that helps. What should I do next?";
        let mut rows = questions();
        // An exact duplicate (up to whitespace) of the oldest question, newer than it.
        rows.push(example("Who   discovered\nHamlet?", "HUM", 100));
        // The long question, then the same with one word changed, newest last.
        rows.push(example(long_question, "DESC", 101));
        rows.push(example(&long_question.replace("yesterday", "today"), "DESC", 102));
        let built = build_dataset(input(rows, BuildConfig::default())).expect("builds");
        let filters = &built.manifest.filters;
        assert_eq!((filters.exact_duplicates, filters.near_duplicates), (1, 1));
        assert_eq!(filters.n_kept, 41);
        let all: Vec<&ChatExample> = built.train.iter().chain(&built.validation).chain(&built.test).collect();
        let texts: Vec<String> = all.iter().map(|row| message_text(&row.prompt[1])).collect();
        assert!(texts.contains(&"Who   discovered\nHamlet?".to_string()), "the newer duplicate stays");
        assert!(!texts.contains(&"Who discovered Hamlet?".to_string()));
        assert!(texts.iter().any(|text| text.contains("arrived today")), "the newer near-duplicate stays");
        assert!(!texts.iter().any(|text| text.contains("arrived yesterday")));
        // The 40 distinct short questions all stay, though they share words.
        assert_eq!(texts.iter().filter(|text| text.len() < 40).count(), 40);

        let off = BuildConfig {
            near_dup: NearDupConfig { threshold: 1.0, ..NearDupConfig::default() },
            ..Default::default()
        };
        let mut rows = questions();
        rows.push(example(long_question, "DESC", 101));
        rows.push(example(&long_question.replace("yesterday", "today"), "DESC", 102));
        let built = build_dataset(input(rows, off)).expect("builds");
        assert_eq!(built.manifest.filters.near_duplicates, 0);
    }

    #[test]
    fn the_id_is_stable_and_changes_with_parameters_or_rows() {
        let first = build_dataset(input(questions(), BuildConfig::default())).expect("builds");
        let mut later = input(questions(), BuildConfig::default());
        later.built_at = datetime!(2027-01-01 00:00 UTC);
        let again = build_dataset(later).expect("builds");
        assert_eq!(first.manifest.id, again.manifest.id, "the build time is not part of the id");
        assert_ne!(first.manifest.created_at, again.manifest.created_at);

        let other_share = BuildConfig { shares: SplitShares { validation: 0.1, test: 0.25 }, ..Default::default() };
        let changed = build_dataset(input(questions(), other_share)).expect("builds");
        assert_ne!(changed.manifest.id, first.manifest.id);
        let scrubbed = BuildConfig { scrub: true, ..Default::default() };
        assert_ne!(build_dataset(input(questions(), scrubbed)).expect("builds").manifest.id, first.manifest.id);

        let mut fewer = questions();
        fewer.pop();
        assert_ne!(build_dataset(input(fewer, BuildConfig::default())).expect("builds").manifest.id, first.manifest.id);
    }

    #[test]
    fn filters_by_time_and_prompt_length_and_reports_what_they_removed() {
        let config = BuildConfig {
            since: Some(datetime!(2026-10-01 00:05 UTC)),
            until: Some(datetime!(2026-10-01 00:35 UTC)),
            min_chars: Some(38),
            ..Default::default()
        };
        let built = build_dataset(input(questions(), config)).expect("builds");
        let filters = &built.manifest.filters;
        assert_eq!(filters.time_range, 10);
        // "Answer with one label." is 22 characters, so questions under 16 go:
        // "What is Hamlet?", "... Mozart?", "... Saturn?" and "... Lisbon?".
        assert_eq!(filters.prompt_length, 4);
        assert_eq!(filters.n_kept, 26);
        let mut all = built.train.iter().chain(&built.validation).chain(&built.test);
        assert!(all.all(|row| prompt_chars(row) >= 38));
    }

    #[test]
    fn scrubbing_reaches_prompts_and_answers() {
        let mut rows = questions();
        rows.push(example("Why was I billed twice? Reach me at ana@example.org or +44 20 7946 0958.", "DESC", 200));
        let mut leaked = example("Is this key valid: sk-live-0123456789abcdefXYZ?", "DESC", 201);
        leaked.answer.insert("content".into(), json!("DESC (also mail ops@example.com)"));
        rows.push(leaked);
        let config = BuildConfig { scrub: true, kind_override: Some(TaskKind::Generation), ..Default::default() };
        let built = build_dataset(input(rows, config)).expect("builds");
        let filters = &built.manifest.filters;
        assert_eq!(filters.scrubbed_rows, 2);
        assert_eq!(filters.scrubbed, ScrubCounts { emails: 2, phones: 1, secrets: 1 });
        let lines: String = built.test.iter().map(ChatExample::to_line).collect();
        assert!(lines.contains("Reach me at <EMAIL> or <PHONE>."), "{lines}");
        assert!(lines.contains("Is this key valid: <SECRET>?"), "{lines}");
        assert!(lines.contains("also mail <EMAIL>"), "{lines}");
        assert!(!lines.contains("example.org") && !lines.contains("sk-live"));
    }

    #[test]
    fn nothing_left_and_bad_parameters_are_errors() {
        let config = BuildConfig { min_chars: Some(100_000), ..Default::default() };
        let error = build_dataset(input(questions(), config)).expect_err("empty").to_string();
        assert!(error.contains("no rows are left for task `trec`") && error.contains("40 by prompt length"), "{error}");
        let config = BuildConfig { shares: SplitShares { validation: 0.5, test: 0.7 }, ..Default::default() };
        let error = build_dataset(input(questions(), config)).expect_err("shares").to_string();
        assert!(error.contains("add up to 1.2"), "{error}");
        let config =
            BuildConfig { near_dup: NearDupConfig { threshold: 0.0, ..Default::default() }, ..Default::default() };
        assert!(build_dataset(input(questions(), config)).is_err());
    }

    #[test]
    fn rows_without_times_keep_their_input_order() {
        let mut rows = questions();
        rows.reverse();
        for row in &mut rows {
            row.created_at = None;
        }
        rows.swap(0, 39);
        let built = build_dataset(input(rows.clone(), BuildConfig::default())).expect("builds");
        assert_eq!(built.manifest.time_order, "input order");
        assert_eq!(built.train.first().map(ChatExample::to_line), rows.first().map(ChatExample::to_line));
        assert_eq!(built.test.last().map(ChatExample::to_line), rows.last().map(ChatExample::to_line));
    }

    fn chat_call(question: &str, answer: &str, minute: i64) -> CallRecord {
        CallRecord {
            id: CallRecord::new_id(),
            created_at: datetime!(2026-10-01 00:00 UTC) + time::Duration::minutes(minute),
            task: Some("trec".into()),
            model: "gpt-4o-mini".into(),
            provider: "cloud".into(),
            endpoint: understudy_types::Endpoint::ChatCompletions,
            stream: false,
            request: json!({"model": "task:trec", "messages": [{"role": "user", "content": question}]}).to_string(),
            response: Some(json!({"choices": [{"message": {"role": "assistant", "content": answer}}]}).to_string()),
            usage: understudy_types::Usage::default(),
            usage_source: understudy_types::UsageSource::Provider,
            latency_ms: 1.0,
            ttft_ms: None,
            status: 200,
            error: None,
            cost: understudy_types::Money(0.0),
            routing: None,
            key: None,
            upstream_request_id: None,
        }
    }

    #[test]
    fn feedback_drops_rejected_calls_and_keeps_only_endorsed_ones_once_any_are() {
        let questions = [
            "Who wrote Hamlet?",
            "How far away is the Moon from the Earth?",
            "What is a quark made of?",
            "Where is Mount Everest?",
            "Which river flows through Cairo?",
            "When did Mozart compose his first symphony?",
        ];
        let calls: Vec<CallRecord> =
            questions.iter().zip(0..).map(|(question, minute)| chat_call(question, "DESC", minute)).collect();
        let ids: Vec<Uuid> = calls.iter().map(|call| call.id).collect();

        let (all, filter) = eligible_calls(calls.clone(), &HashMap::new());
        assert_eq!(all.len(), 6);
        assert_eq!(filter, FeedbackFilter { removed: 0, positive_only: false });

        // Only negative feedback: the rejected calls go, the unrated stay.
        let negative = HashMap::from([(ids[1], FeedbackScore::Negative), (ids[4], FeedbackScore::Negative)]);
        let (kept, filter) = eligible_calls(calls.clone(), &negative);
        let kept_ids: Vec<Uuid> = kept.iter().map(|call| call.id).collect();
        assert_eq!(kept_ids, vec![ids[0], ids[2], ids[3], ids[5]]);
        assert_eq!(filter, FeedbackFilter { removed: 2, positive_only: false });

        // Some positive feedback: only the endorsed calls.
        let mixed = HashMap::from([
            (ids[0], FeedbackScore::Positive),
            (ids[1], FeedbackScore::Negative),
            (ids[3], FeedbackScore::Positive),
        ]);
        let (kept, filter) = eligible_calls(calls.clone(), &mixed);
        let kept_ids: Vec<Uuid> = kept.iter().map(|call| call.id).collect();
        assert_eq!(kept_ids, vec![ids[0], ids[3]]);
        assert_eq!(filter, FeedbackFilter { removed: 4, positive_only: true });

        // Feedback on calls of other tasks does not make this task positive-only.
        let elsewhere = HashMap::from([(Uuid::now_v7(), FeedbackScore::Positive)]);
        assert_eq!(eligible_calls(calls.clone(), &elsewhere).0.len(), 6);

        // The build reports what feedback removed among the source rows, and
        // each row carries its call's verdict (its comment scrubbed too).
        let verdict = |call_id: Uuid, score: FeedbackScore, comment: Option<&str>| Feedback {
            id: Uuid::now_v7(),
            call_id,
            score,
            comment: comment.map(str::to_string),
            created_at: datetime!(2026-10-02 00:00 UTC),
        };
        let verdicts = HashMap::from([
            (ids[0], verdict(ids[0], FeedbackScore::Positive, Some("as jane@example.com said"))),
            (ids[3], verdict(ids[3], FeedbackScore::Positive, None)),
        ]);
        let (examples, n_unreadable) = examples_from_calls(&kept, &verdicts);
        let built = build_dataset(BuildInput {
            task: "trec".into(),
            examples: examples.clone(),
            n_unreadable,
            feedback: filter,
            config: BuildConfig {
                shares: SplitShares { validation: 0.0, test: 0.0 },
                scrub: true,
                ..Default::default()
            },
            built_at: datetime!(2026-11-01 00:00 UTC),
        })
        .expect("builds");
        assert_eq!(built.manifest.filters.feedback, 4);
        assert!(built.manifest.filters.feedback_positive_only);
        assert_eq!(built.manifest.filters.n_source, 6);
        assert_eq!(built.manifest.filters.n_kept, 2);
        assert!(built.manifest.filters.to_string().contains("4 by feedback"), "{}", built.manifest.filters);
        let comments: Vec<Option<String>> =
            built.train.iter().map(|row| row.feedback.as_ref().and_then(|feedback| feedback.comment.clone())).collect();
        assert_eq!(built.train.len(), 2);
        assert!(built.train.iter().all(|row| row.feedback.as_ref().map(|f| f.score) == Some(FeedbackScore::Positive)));
        assert!(comments.contains(&Some("as <EMAIL> said".to_string())), "{comments:?}");

        // Examples read from a file follow the same rule by their own verdicts.
        let mut from_file: Vec<ChatExample> =
            calls.iter().filter_map(ChatExample::from_call).map(|example| example.with_feedback(None)).collect();
        from_file[1].feedback = Some(crate::jsonl::LineFeedback::of(&verdict(ids[1], FeedbackScore::Negative, None)));
        let (kept, filter) = eligible_examples(from_file.clone());
        assert_eq!((kept.len(), filter), (5, FeedbackFilter { removed: 1, positive_only: false }));
        from_file[2].feedback = Some(crate::jsonl::LineFeedback::of(&verdict(ids[2], FeedbackScore::Positive, None)));
        let (kept, filter) = eligible_examples(from_file);
        assert_eq!(kept.len(), 1);
        assert_eq!(filter, FeedbackFilter { removed: 5, positive_only: true });
    }
}
