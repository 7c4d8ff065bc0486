//! Evaluation: metrics, bootstrap confidence intervals, the choice of a
//! cascade threshold (certified by Learn-then-Test in [`certify`]), and the
//! anytime-valid guardrail on audited agreement in [`sequential`], and the
//! drift watch's two-sample tests in [`drift`]. Plain functions over values:
//! no IO, no models.

pub mod binomial;
pub mod bootstrap;
pub mod calibrate;
pub mod certify;
pub mod drift;
pub mod generation;
pub mod labels;
pub mod ledger;
pub mod sequential;

pub use binomial::{binomial_cdf, clopper_pearson, clopper_pearson_lower, clopper_pearson_upper, ln_binomial_pmf};
pub use bootstrap::{bootstrap, bootstrap_many, bootstrap_mean, bootstrap_quantile, ConfidenceInterval, Estimate};
pub use calibrate::{cascade_report, choose_threshold, CascadeOutcome, CascadeReport, ScoredAnswer};
pub use certify::{certify_threshold, check_target_agreement, Certification, ThresholdTest};
pub use drift::{
    answer_drift, chi_square_sf, confidence_drift, energy_distance, hypergeometric_cdf, input_drift, ks_smaller,
    label_counts, AnswerDriftConfig, AnswerDriftTest, ConfidenceDriftConfig, ConfidenceDriftTest, CoverageTest,
    DriftReport, DriftSignal, InputDriftConfig, InputDriftTest, KsTest, NewLabel, POOLED_LABEL,
};
pub use labels::{LabelMetrics, LabelReport};
pub use sequential::{confidence_sequence, guardrail, AuditTally, GuardrailVerdict};

/// A statistical decision asked for with parameters it cannot honour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParameterError {
    /// A target agreement outside the range the decision accepts.
    Target(f64),
    /// An error probability (`delta`) outside (0, 1).
    Delta(f64),
    /// More agreeing audits than audits.
    AgreedExceedsAudited { agreed: u64, audited: u64 },
    /// A significance level (`alpha`) outside (0, 1).
    Alpha(f64),
    /// A two-sample test given a sample with nothing in it.
    EmptySample { sample: &'static str },
    /// Embeddings of different lengths within one test.
    DimensionMismatch { expected: usize, found: usize },
    /// A NaN or infinite value where the test needs finite numbers.
    NonFinite { sample: &'static str },
    /// A permutation test asked to draw no permutations, or to keep no
    /// items on a side.
    Permutations { n_permutations: usize, max_per_side: usize },
    /// A coverage threshold that is NaN.
    Threshold(f64),
}

impl std::fmt::Display for ParameterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Target(target) => write!(f, "target agreement {target} is outside the accepted range"),
            Self::Delta(delta) => write!(f, "error probability delta {delta} is outside (0, 1)"),
            Self::AgreedExceedsAudited { agreed, audited } => {
                write!(f, "{agreed} agreeing audits out of only {audited} audits")
            }
            Self::Alpha(alpha) => write!(f, "significance level alpha {alpha} is outside (0, 1)"),
            Self::EmptySample { sample } => write!(f, "the {sample} sample is empty"),
            Self::DimensionMismatch { expected, found } => {
                write!(f, "an embedding of dimension {found} among embeddings of dimension {expected}")
            }
            Self::NonFinite { sample } => write!(f, "the {sample} sample holds a NaN or infinite value"),
            Self::Permutations { n_permutations, max_per_side } => write!(
                f,
                "a permutation test needs at least one permutation and one item a side \
                 (asked for {n_permutations} permutations, at most {max_per_side} a side)"
            ),
            Self::Threshold(threshold) => write!(f, "coverage threshold {threshold} is not a number"),
        }
    }
}

impl std::error::Error for ParameterError {}

/// `delta` must be a probability strictly between 0 and 1: 0 would demand
/// certainty from finite data and 1 promises nothing.
pub fn check_delta(delta: f64) -> Result<(), ParameterError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(ParameterError::Delta(delta))
    }
}

/// `alpha`, the false-alarm rate a drift test is run at, must lie strictly
/// between 0 and 1.
pub fn check_alpha(alpha: f64) -> Result<(), ParameterError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(ParameterError::Alpha(alpha))
    }
}

/// The `q`-quantile (0..=1) of `values` by linear interpolation; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = values.iter().copied().filter(|value| !value.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lower = position.floor() as usize;
    let upper = position.ceil() as usize;
    let weight = position - lower as f64;
    Some(sorted[lower] * (1.0 - weight) + sorted[upper] * weight)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_interpolate() {
        let values = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(super::quantile(&values, 0.5), Some(2.5));
        assert_eq!(super::quantile(&values, 0.0), Some(1.0));
        assert_eq!(super::quantile(&values, 1.0), Some(4.0));
        assert_eq!(super::quantile(&[], 0.5), None);
    }
}
