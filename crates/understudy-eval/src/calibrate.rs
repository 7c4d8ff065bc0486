//! The cascade threshold: chosen on validation data, judged on test data.
//!
//! The understudy answers a call when its confidence is at least the
//! threshold; otherwise the lead answers. On the calls the lead answers, the
//! served answer *is* the lead's, so it agrees by definition.

/// One understudy answer: how sure it was, and whether it matched the lead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredAnswer {
    pub confidence: f64,
    pub agrees: bool,
}

/// What a threshold gives on a set of answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CascadeOutcome {
    pub threshold: f64,
    /// The share of calls the understudy serves.
    pub coverage: f64,
    /// Agreement with the lead on the calls the understudy serves (1 when it serves none).
    pub served_agreement: f64,
    /// Agreement with the lead over all calls, with fallback.
    pub overall_agreement: f64,
}

/// The lowest threshold at which the served answers agree with the lead at
/// least `target` of the time, among the confidences seen. `None` when no
/// threshold reaches the target: the understudy should then serve nothing.
pub fn choose_threshold(validation: &[ScoredAnswer], target: f64) -> Option<f64> {
    let mut sorted: Vec<ScoredAnswer> =
        validation.iter().copied().filter(|answer| answer.confidence.is_finite()).collect();
    // Highest confidence first: the served set at threshold sorted[k].confidence
    // is the prefix ending at the last answer with that confidence.
    sorted.sort_by(|left, right| right.confidence.total_cmp(&left.confidence));
    let mut best = None;
    let mut n_agree = 0usize;
    for (idx, answer) in sorted.iter().enumerate() {
        n_agree += usize::from(answer.agrees);
        let ends_a_tie_group = sorted.get(idx + 1).is_none_or(|next| next.confidence < answer.confidence);
        if ends_a_tie_group && n_agree as f64 >= target * (idx + 1) as f64 {
            best = Some(answer.confidence);
        }
    }
    best
}

/// Coverage and agreement of `answers` at `threshold`.
pub fn evaluate_cascade(answers: &[ScoredAnswer], threshold: f64) -> CascadeOutcome {
    let n_answers = answers.len().max(1) as f64;
    let served: Vec<&ScoredAnswer> = answers.iter().filter(|answer| answer.confidence >= threshold).collect();
    let n_served_agree = served.iter().filter(|answer| answer.agrees).count();
    let n_fallback = answers.len() - served.len();
    CascadeOutcome {
        threshold,
        coverage: served.len() as f64 / n_answers,
        served_agreement: if served.is_empty() { 1.0 } else { n_served_agree as f64 / served.len() as f64 },
        overall_agreement: (n_served_agree + n_fallback) as f64 / n_answers,
    }
}

/// Coverage against served agreement at every distinct confidence, highest
/// threshold first: the points of a coverage–agreement curve.
pub fn coverage_curve(answers: &[ScoredAnswer]) -> Vec<CascadeOutcome> {
    let mut thresholds: Vec<f64> = answers.iter().map(|answer| answer.confidence).filter(|c| c.is_finite()).collect();
    thresholds.sort_by(|left, right| right.total_cmp(left));
    thresholds.dedup();
    thresholds.into_iter().map(|threshold| evaluate_cascade(answers, threshold)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(pairs: &[(f64, bool)]) -> Vec<ScoredAnswer> {
        pairs.iter().map(|&(confidence, agrees)| ScoredAnswer { confidence, agrees }).collect()
    }

    #[test]
    fn the_lowest_threshold_that_meets_the_target_is_chosen() {
        let validation = answers(&[(0.99, true), (0.95, true), (0.9, true), (0.8, false), (0.7, true), (0.6, false)]);
        // At 0.9: 3/3 agree. At 0.8: 3/4 = 0.75. At 0.7: 4/5 = 0.8. At 0.6: 4/6.
        assert_eq!(choose_threshold(&validation, 1.0), Some(0.9));
        assert_eq!(choose_threshold(&validation, 0.8), Some(0.7), "agreement is not monotone in the threshold");
        assert_eq!(choose_threshold(&validation, 0.6), Some(0.6));
        assert_eq!(choose_threshold(&answers(&[(0.9, false)]), 0.5), None);
    }

    #[test]
    fn ties_are_served_together() {
        let validation = answers(&[(0.9, true), (0.9, false), (0.5, true)]);
        // Serving at 0.9 serves both 0.9 answers: 1/2.
        assert_eq!(choose_threshold(&validation, 0.75), None);
        assert_eq!(choose_threshold(&validation, 0.5), Some(0.5));
    }

    #[test]
    fn cascade_outcomes_count_fallback_as_agreement() {
        let test = answers(&[(0.95, true), (0.92, false), (0.5, false), (0.3, true)]);
        let outcome = evaluate_cascade(&test, 0.9);
        assert_eq!(outcome.coverage, 0.5);
        assert_eq!(outcome.served_agreement, 0.5);
        assert_eq!(outcome.overall_agreement, 0.75);
        let curve = coverage_curve(&test);
        assert_eq!(curve.len(), 4);
        assert_eq!(curve[0].coverage, 0.25);
        assert_eq!(curve[3].coverage, 1.0);
    }
}
