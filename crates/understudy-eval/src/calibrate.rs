//! The cascade threshold: chosen on validation data, judged on test data.
//!
//! The understudy answers a call when its confidence is at least the
//! threshold; otherwise the lead answers. On the calls the lead answers, the
//! served answer *is* the lead's, so it agrees by definition.

use crate::bootstrap::{bootstrap_many, Estimate};

/// One understudy answer: how sure it was, and whether it matched the lead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredAnswer {
    /// NaN for a call the cascade serves at no threshold.
    pub confidence: f64,
    pub agrees: bool,
}

impl ScoredAnswer {
    /// A call the cascade serves at no threshold (the understudy failed or
    /// timed out, or its answer is invalid or came without a confidence): the
    /// lead answers it, so it lowers coverage and never counts in served
    /// agreement.
    pub fn never_served() -> ScoredAnswer {
        ScoredAnswer { confidence: f64::NAN, agrees: false }
    }
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
///
/// This is a point estimate, not a certificate: picking the lowest of many
/// thresholds that look good on validation favours the lucky ones, so on new
/// calls the served agreement falls short of `target` about as often as not
/// (in this crate's simulation, in over half the validation draws).
/// [`crate::certify::certify_threshold`] gives a threshold that meets the
/// target with a stated probability.
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
    outcome_of(answers.iter(), threshold)
}

fn outcome_of<'a>(answers: impl Iterator<Item = &'a ScoredAnswer>, threshold: f64) -> CascadeOutcome {
    let (mut n_answers, mut n_served, mut n_served_agree) = (0usize, 0usize, 0usize);
    for answer in answers {
        n_answers += 1;
        if answer.confidence >= threshold {
            n_served += 1;
            n_served_agree += usize::from(answer.agrees);
        }
    }
    let n_fallback = n_answers - n_served;
    let n_answers = n_answers.max(1) as f64;
    CascadeOutcome {
        threshold,
        coverage: n_served as f64 / n_answers,
        served_agreement: if n_served == 0 { 1.0 } else { n_served_agree as f64 / n_served as f64 },
        overall_agreement: (n_served_agree + n_fallback) as f64 / n_answers,
    }
}

/// A threshold judged on test answers, every figure with its interval, and
/// what the cascade saves per 1,000 calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CascadeReport {
    pub threshold: f64,
    pub coverage: Estimate,
    pub served_agreement: Estimate,
    pub overall_agreement: Estimate,
    /// The lead's cost of the calls the understudy serves: coverage times
    /// the lead's cost per 1,000 calls.
    pub lead_cost_avoided_per_1k: Estimate,
    /// The understudy's compute: it answers every call first.
    pub understudy_cost_per_1k: Estimate,
    /// Avoided minus the understudy's compute.
    pub net_saved_per_1k: Estimate,
    /// Net saved as a share of the lead's cost (0 when the lead costs nothing).
    pub net_saved_share: Estimate,
}

impl CascadeReport {
    /// The point values, as a curve point.
    pub fn outcome(&self) -> CascadeOutcome {
        CascadeOutcome {
            threshold: self.threshold,
            coverage: self.coverage.value,
            served_agreement: self.served_agreement.value,
            overall_agreement: self.overall_agreement.value,
        }
    }
}

/// `threshold` on test `answers`, with `understudy_costs[i]` the measured
/// cost of answer `i` and `lead_cost_per_call` what the lead charges for a
/// call. The calls are resampled once for every figure.
pub fn cascade_report(
    answers: &[ScoredAnswer],
    understudy_costs: &[f64],
    threshold: f64,
    lead_cost_per_call: f64,
    n_resamples: usize,
    seed: u64,
) -> CascadeReport {
    let n_items = answers.len().min(understudy_costs.len());
    let lead_per_1k = lead_cost_per_call * 1000.0;
    let figures = bootstrap_many(n_items, n_resamples, 0.95, seed, |indices| {
        let outcome = outcome_of(indices.iter().map(|&idx| &answers[idx]), threshold);
        let understudy =
            indices.iter().map(|&idx| understudy_costs[idx]).sum::<f64>() * 1000.0 / indices.len().max(1) as f64;
        let avoided = outcome.coverage * lead_per_1k;
        let net = avoided - understudy;
        let share = if lead_per_1k > 0.0 { net / lead_per_1k } else { 0.0 };
        vec![outcome.coverage, outcome.served_agreement, outcome.overall_agreement, avoided, understudy, net, share]
    });
    CascadeReport {
        threshold,
        coverage: figures[0],
        served_agreement: figures[1],
        overall_agreement: figures[2],
        lead_cost_avoided_per_1k: figures[3],
        understudy_cost_per_1k: figures[4],
        net_saved_per_1k: figures[5],
        net_saved_share: figures[6],
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

    #[test]
    fn a_call_never_served_falls_back_at_every_threshold() {
        let mut test = answers(&[(0.95, true), (0.5, false)]);
        test.push(ScoredAnswer::never_served());
        for threshold in [0.0, 0.5, 0.95] {
            let outcome = evaluate_cascade(&test, threshold);
            let n_served = if threshold <= 0.5 { 2.0 } else { 1.0 };
            assert_eq!(outcome.coverage, n_served / 3.0, "{outcome:?}");
        }
        // Served at 0.95: one agreeing answer; the two others fall back to the lead.
        assert_eq!(evaluate_cascade(&test, 0.95).overall_agreement, 1.0);
        assert_eq!(coverage_curve(&test).len(), 2);
        assert_eq!(choose_threshold(&test, 1.0), Some(0.95));
    }

    #[test]
    fn a_cascade_report_prices_what_it_serves() {
        let test = answers(&[(0.95, true), (0.92, false), (0.5, false), (0.3, true)]);
        // The understudy costs $0.0001 a call; the lead $0.002.
        let costs = [0.0001; 4];
        let report = cascade_report(&test, &costs, 0.9, 0.002, 400, 5);
        assert_eq!(report.outcome(), evaluate_cascade(&test, 0.9));
        // Half the calls served: $1 of the lead's $2 per 1k avoided, $0.10 of compute.
        assert!((report.lead_cost_avoided_per_1k.value - 1.0).abs() < 1e-12);
        assert!((report.understudy_cost_per_1k.value - 0.1).abs() < 1e-12);
        assert!((report.net_saved_per_1k.value - 0.9).abs() < 1e-12);
        assert!((report.net_saved_share.value - 0.45).abs() < 1e-12);
        // The compute is the same on every call: no spread.
        let compute = report.understudy_cost_per_1k.interval;
        assert!((compute.low - 0.1).abs() < 1e-12 && (compute.high - 0.1).abs() < 1e-12);
        for figure in [report.coverage, report.served_agreement, report.overall_agreement, report.net_saved_per_1k] {
            assert!(figure.interval.low <= figure.value && figure.value <= figure.interval.high, "{figure:?}");
        }
        assert!(report.coverage.interval.low < 0.5 && report.coverage.interval.high > 0.5);
        // A free lead: nothing to save, the compute is a loss.
        let free = cascade_report(&test, &costs, 0.9, 0.0, 50, 5);
        assert!((free.net_saved_per_1k.value + 0.1).abs() < 1e-12);
        assert_eq!(free.net_saved_share.value, 0.0);
    }
}
