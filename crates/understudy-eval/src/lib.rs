//! Evaluation: metrics, bootstrap confidence intervals, and the choice of a
//! cascade threshold. Plain functions over values: no IO, no models.

pub mod bootstrap;
pub mod calibrate;
pub mod generation;
pub mod labels;

pub use bootstrap::{bootstrap, bootstrap_many, bootstrap_mean, bootstrap_quantile, ConfidenceInterval, Estimate};
pub use calibrate::{cascade_report, choose_threshold, CascadeOutcome, CascadeReport, ScoredAnswer};
pub use labels::{LabelMetrics, LabelReport};

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
