//! Task kind detection: is a task a *label task* (the lead's answers take a
//! small set of values) or a *generation task* (anything else)?

use std::collections::HashMap;

use understudy_types::TaskKind;

use crate::jsonl::normalize_whitespace;

/// A label task has at most this many distinct answers...
pub const MAX_LABELS: usize = 100;
/// ...that together cover at least this share of its calls.
pub const MIN_LABEL_COVERAGE: f64 = 0.99;

/// What detection (or the config's override) decided.
#[derive(Debug, Clone, PartialEq)]
pub struct KindDecision {
    pub kind: TaskKind,
    /// For a label task: the labels, most frequent first (ties alphabetical).
    /// Empty for a generation task.
    pub labels: Vec<String>,
    /// Whether the config named the kind instead of the answers deciding it.
    pub overridden: bool,
}

/// An answer as a label: trimmed, every run of whitespace one space.
pub fn normalize_label(answer: &str) -> String {
    normalize_whitespace(answer)
}

/// Decides the kind from the answers (already normalized with
/// [`normalize_label`]), unless `kind_override` names it.
///
/// The label set is the smallest set of most frequent answers that covers
/// [`MIN_LABEL_COVERAGE`] of the answers; the task is a label task when that
/// set has at most [`MAX_LABELS`] values. Only answers seen at least twice
/// count as labels: in a small sample every free-text answer is distinct, so
/// the distinct answers "cover" it while nothing shows a fixed set of values.
pub fn decide_kind(answers: &[String], kind_override: Option<TaskKind>) -> KindDecision {
    let labels = label_set(answers);
    let detected_labels = labels.filter(|labels| labels.len() <= MAX_LABELS);
    match (kind_override, detected_labels) {
        (None, Some(labels)) => KindDecision { kind: TaskKind::Label, labels, overridden: false },
        (None, None) => KindDecision { kind: TaskKind::Generation, labels: Vec::new(), overridden: false },
        (Some(TaskKind::Generation), _) => {
            KindDecision { kind: TaskKind::Generation, labels: Vec::new(), overridden: true }
        }
        (Some(TaskKind::Label), detected) => {
            // Told it is a label task: every distinct answer is a label, unless
            // the answers themselves show a label set with a rare tail.
            let labels =
                detected.unwrap_or_else(|| by_frequency(answers).into_iter().map(|(label, _)| label).collect());
            KindDecision { kind: TaskKind::Label, labels, overridden: true }
        }
    }
}

/// The most frequent repeated answers that together cover
/// [`MIN_LABEL_COVERAGE`] of them, or `None` if the repeated ones cannot.
fn label_set(answers: &[String]) -> Option<Vec<String>> {
    let needed = (answers.len() as f64 * MIN_LABEL_COVERAGE).ceil() as usize;
    let mut labels = Vec::new();
    let mut n_covered = 0;
    for (label, count) in by_frequency(answers) {
        if n_covered >= needed || count < 2 {
            break;
        }
        labels.push(label);
        n_covered += count;
    }
    (n_covered >= needed && !answers.is_empty()).then_some(labels)
}

/// Distinct answers with their counts, most frequent first, ties alphabetical
/// (so that the label order, and with it the dataset's hash, is stable).
fn by_frequency(answers: &[String]) -> Vec<(String, usize)> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for answer in answers {
        *counts.entry(answer.as_str()).or_default() += 1;
    }
    let mut counted: Vec<(String, usize)> = counts.into_iter().map(|(label, n)| (label.to_string(), n)).collect();
    counted.sort_by(|(left_label, left_n), (right_label, right_n)| {
        right_n.cmp(left_n).then_with(|| left_label.cmp(right_label))
    });
    counted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(texts: &[&str], times: usize) -> Vec<String> {
        let mut all = Vec::new();
        for _ in 0..times {
            all.extend(texts.iter().map(|text| normalize_label(text)));
        }
        all
    }

    #[test]
    fn label_like_answers_make_a_label_task() {
        let mut all = answers(&["NUM", " HUM\n", "DESC", "NUM"], 50);
        // One odd answer in 201 is under the 1 % the rule tolerates.
        all.push("I am not sure, but probably a number.".to_string());
        let decision = decide_kind(&all, None);
        assert_eq!(decision.kind, TaskKind::Label);
        assert_eq!(decision.labels, vec!["NUM", "DESC", "HUM"]);
        assert!(!decision.overridden);
    }

    #[test]
    fn free_text_answers_make_a_generation_task() {
        let all: Vec<String> = (0..300).map(|idx| format!("Here is a summary of ticket {idx}.")).collect();
        assert_eq!(decide_kind(&all, None).kind, TaskKind::Generation);
        // Too many distinct values, even though each repeats.
        let many: Vec<String> = (0..1000).map(|idx| format!("label-{}", idx % 150)).collect();
        assert_eq!(decide_kind(&many, None).kind, TaskKind::Generation);
        // A few answers that never repeat are no label set.
        assert_eq!(decide_kind(&answers(&["yes", "no", "maybe"], 1), None).kind, TaskKind::Generation);
        // Too many off-set answers: 2 % free text.
        let mut mostly = answers(&["spam", "ham"], 49);
        mostly.extend(["why?", "see above"].map(String::from));
        assert_eq!(decide_kind(&mostly, None).kind, TaskKind::Generation);
    }

    #[test]
    fn the_config_overrides_detection() {
        let labels = answers(&["yes", "no"], 10);
        let forced = decide_kind(&labels, Some(TaskKind::Generation));
        assert_eq!((forced.kind, forced.overridden), (TaskKind::Generation, true));
        assert!(forced.labels.is_empty());
        let free = answers(&["a long answer", "another long answer"], 1);
        let forced = decide_kind(&free, Some(TaskKind::Label));
        assert_eq!(forced.kind, TaskKind::Label);
        assert_eq!(forced.labels, vec!["a long answer", "another long answer"]);
    }
}
