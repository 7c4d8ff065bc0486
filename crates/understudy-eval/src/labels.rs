//! Metrics for label tasks: accuracy, macro-F1, per-label precision and
//! recall, and the confusion matrix.

use std::collections::BTreeMap;

use understudy_types::normalize_answer;

use crate::bootstrap::{bootstrap, bootstrap_many, Estimate};

/// Precision, recall and F1 of one label, each with its interval. A label
/// never predicted has precision 0; a label absent from the reference has
/// recall 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMetrics {
    pub label: String,
    pub precision: Estimate,
    pub recall: Estimate,
    pub f1: Estimate,
    /// Reference examples with this label.
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LabelReport {
    pub n_examples: usize,
    pub accuracy: Estimate,
    pub macro_f1: Estimate,
    pub per_label: Vec<LabelMetrics>,
    /// Labels in the order of `confusion`'s rows and columns.
    pub labels: Vec<String>,
    /// `confusion[reference][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Scores `predicted` against `reference` (the lead's answers), pairwise.
/// Two answers are the same label when they agree by the one rule of
/// agreement ([`understudy_types::answers_agree`]), so that accuracy is the
/// share of answers that agree with the lead's; a label is shown as first
/// written, the reference's form first, without surrounding spaces.
pub fn label_report(reference: &[String], predicted: &[String], n_resamples: usize, seed: u64) -> LabelReport {
    let n_examples = reference.len().min(predicted.len());
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    for text in reference[..n_examples].iter().chain(&predicted[..n_examples]) {
        shown.entry(normalize_answer(text)).or_insert_with(|| text.trim().to_string());
    }
    let mut labels: Vec<(String, String)> = shown.into_iter().map(|(key, label)| (label, key)).collect();
    labels.sort();
    let index: BTreeMap<&str, usize> = labels.iter().enumerate().map(|(idx, (_, key))| (key.as_str(), idx)).collect();
    let label_idx = |text: &str| index.get(normalize_answer(text).as_str()).copied().unwrap_or(0);
    let pairs: Vec<(usize, usize)> =
        (0..n_examples).map(|idx| (label_idx(&reference[idx]), label_idx(&predicted[idx]))).collect();
    let labels: Vec<String> = labels.into_iter().map(|(label, _)| label).collect();

    let accuracy = bootstrap(n_examples, n_resamples, 0.95, seed, |indices| {
        let n_correct = indices.iter().filter(|&&idx| pairs[idx].0 == pairs[idx].1).count();
        n_correct as f64 / indices.len().max(1) as f64
    });
    let n_labels = labels.len();
    let macro_f1 = bootstrap(n_examples, n_resamples, 0.95, seed.wrapping_add(1), |indices| {
        let confusion = confusion_of(indices.iter().map(|&idx| pairs[idx]), n_labels);
        macro_f1_of(&confusion, &present_in_reference(indices.iter().map(|&idx| pairs[idx].0), n_labels))
    });
    // Precision, recall and F1 of every label, resampled together.
    let per_label_estimates = bootstrap_many(n_examples, n_resamples, 0.95, seed.wrapping_add(2), |indices| {
        let confusion = confusion_of(indices.iter().map(|&idx| pairs[idx]), n_labels);
        (0..n_labels)
            .flat_map(|idx| {
                let (precision, recall, f1) = precision_recall_f1(&confusion, idx);
                [precision, recall, f1]
            })
            .collect()
    });
    let confusion = confusion_of(pairs.iter().copied(), n_labels);
    let per_label = labels
        .iter()
        .zip(per_label_estimates.chunks_exact(3))
        .enumerate()
        .map(|(idx, (label, figures))| LabelMetrics {
            label: label.clone(),
            precision: figures[0],
            recall: figures[1],
            f1: figures[2],
            support: confusion[idx].iter().sum(),
        })
        .collect();
    LabelReport { n_examples, accuracy, macro_f1, per_label, labels, confusion }
}

fn confusion_of(pairs: impl Iterator<Item = (usize, usize)>, n_labels: usize) -> Vec<Vec<usize>> {
    let mut confusion = vec![vec![0; n_labels]; n_labels];
    for (reference, predicted) in pairs {
        confusion[reference][predicted] += 1;
    }
    confusion
}

fn present_in_reference(references: impl Iterator<Item = usize>, n_labels: usize) -> Vec<bool> {
    let mut present = vec![false; n_labels];
    for reference in references {
        present[reference] = true;
    }
    present
}

fn precision_recall_f1(confusion: &[Vec<usize>], label_idx: usize) -> (f64, f64, f64) {
    let true_positives = confusion[label_idx][label_idx] as f64;
    let predicted: usize = confusion.iter().map(|row| row[label_idx]).sum();
    let actual: usize = confusion[label_idx].iter().sum();
    let precision = if predicted == 0 { 0.0 } else { true_positives / predicted as f64 };
    let recall = if actual == 0 { 0.0 } else { true_positives / actual as f64 };
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    (precision, recall, f1)
}

/// Macro-F1 over the labels that occur in the reference (scikit-learn's
/// convention when `labels` is the reference's label set).
fn macro_f1_of(confusion: &[Vec<usize>], present: &[bool]) -> f64 {
    let f1s: Vec<f64> =
        (0..confusion.len()).filter(|&idx| present[idx]).map(|idx| precision_recall_f1(confusion, idx).2).collect();
    if f1s.is_empty() {
        0.0
    } else {
        f1s.iter().sum::<f64>() / f1s.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    #[test]
    fn a_hand_computed_case() {
        // reference: A A A B B C ; predicted: A A B B C C
        let reference = strings(&["A", "A", "A", "B", "B", "C"]);
        let predicted = strings(&["A", "A", "B", "B", "C", "C"]);
        let report = label_report(&reference, &predicted, 200, 3);
        assert!((report.accuracy.value - 4.0 / 6.0).abs() < 1e-12);
        // A: p = 2/2, r = 2/3, f1 = 0.8. B: p = 1/2, r = 1/2, f1 = 0.5. C: p = 1/2, r = 1, f1 = 2/3.
        let expected_f1 = [0.8, 0.5, 2.0 / 3.0];
        for (metrics, expected) in report.per_label.iter().zip(expected_f1) {
            assert!((metrics.f1.value - expected).abs() < 1e-12, "{metrics:?}");
            for figure in [metrics.precision, metrics.recall, metrics.f1] {
                assert!(figure.interval.low <= figure.value && figure.value <= figure.interval.high, "{metrics:?}");
            }
        }
        assert!((report.per_label[0].recall.value - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(report.per_label[0].precision.value, 1.0);
        // B's recall (1/2 on two examples) varies with the resample.
        let b_recall = report.per_label[1].recall.interval;
        assert!(b_recall.low < 0.5 && b_recall.high > 0.5, "{b_recall:?}");
        assert_eq!(report.per_label[1].support, 2);
        assert!((report.macro_f1.value - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(report.confusion, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        let interval = report.accuracy.interval;
        assert!(interval.low <= report.accuracy.value && report.accuracy.value <= interval.high);
    }

    #[test]
    fn a_label_only_predicted_does_not_count_in_macro_f1() {
        let reference = strings(&["A", "A"]);
        let predicted = strings(&["A", "Z"]);
        let report = label_report(&reference, &predicted, 10, 3);
        // A: p = 1, r = 1/2, f1 = 2/3; Z is absent from the reference.
        assert!((report.macro_f1.value - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(report.labels, strings(&["A", "Z"]));
    }

    #[test]
    fn labels_that_agree_are_one_label_shown_as_the_lead_wrote_it() {
        let reference = strings(&["DESC", "HUM", " HUM"]);
        let predicted = strings(&["desc ", "HUM", "LOC"]);
        let report = label_report(&reference, &predicted, 10, 3);
        assert_eq!(report.labels, strings(&["DESC", "HUM", "LOC"]));
        assert!((report.accuracy.value - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(report.confusion, vec![vec![1, 0, 0], vec![0, 1, 1], vec![0, 0, 0]]);
    }
}
