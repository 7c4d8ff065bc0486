//! Percentile bootstrap confidence intervals for per-example scores.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A 95 % interval by default; `level` says which.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceInterval {
    pub low: f64,
    pub high: f64,
    pub level: f64,
}

/// A figure with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub interval: ConfidenceInterval,
}

/// Resamples drawn when none is given: enough for stable 95 % bounds.
pub const DEFAULT_RESAMPLES: usize = 1000;

/// The mean of `scores` and its percentile-bootstrap interval: `n_resamples`
/// resamples with replacement, seeded so that a report is reproducible.
pub fn bootstrap_mean(scores: &[f64], n_resamples: usize, level: f64, seed: u64) -> Estimate {
    bootstrap(scores.len(), n_resamples, level, seed, |indices| {
        indices.iter().map(|&idx| scores[idx]).sum::<f64>() / indices.len().max(1) as f64
    })
}

/// The bootstrap interval of any statistic over `n_items` examples: the
/// statistic is computed on the full index set for the value, and on each
/// resample of indices for the interval. Macro-F1 uses this, for example.
pub fn bootstrap<F>(n_items: usize, n_resamples: usize, level: f64, seed: u64, statistic: F) -> Estimate
where
    F: Fn(&[usize]) -> f64,
{
    let all: Vec<usize> = (0..n_items).collect();
    let value = statistic(&all);
    if n_items == 0 || n_resamples == 0 {
        return Estimate { value, interval: ConfidenceInterval { low: value, high: value, level } };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut resampled = Vec::with_capacity(n_resamples);
    let mut indices = vec![0; n_items];
    for _ in 0..n_resamples {
        for slot in indices.iter_mut() {
            *slot = rng.gen_range(0..n_items);
        }
        resampled.push(statistic(&indices));
    }
    let tail = (1.0 - level) / 2.0;
    let low = crate::quantile(&resampled, tail).unwrap_or(value);
    let high = crate::quantile(&resampled, 1.0 - tail).unwrap_or(value);
    Estimate { value, interval: ConfidenceInterval { low, high, level } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_brackets_the_mean_and_narrows_with_more_data() {
        let small: Vec<f64> = (0..50).map(|idx| f64::from(idx % 2 == 0)).collect();
        let large: Vec<f64> = (0..5000).map(|idx| f64::from(idx % 2 == 0)).collect();
        let small_estimate = bootstrap_mean(&small, DEFAULT_RESAMPLES, 0.95, 7);
        let large_estimate = bootstrap_mean(&large, DEFAULT_RESAMPLES, 0.95, 7);
        for estimate in [small_estimate, large_estimate] {
            assert!((estimate.value - 0.5).abs() < 1e-12);
            assert!(estimate.interval.low < 0.5 && estimate.interval.high > 0.5, "{estimate:?}");
        }
        let small_width = small_estimate.interval.high - small_estimate.interval.low;
        let large_width = large_estimate.interval.high - large_estimate.interval.low;
        assert!(large_width < small_width / 5.0, "{small_width} vs {large_width}");
        // A binomial proportion at n = 50 has a 95 % half-width near 1.96 * sqrt(.25/50) = 0.139.
        assert!((small_width / 2.0 - 0.139).abs() < 0.03, "{small_width}");
    }

    #[test]
    fn the_same_seed_gives_the_same_interval() {
        let scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0];
        assert_eq!(bootstrap_mean(&scores, 200, 0.95, 1), bootstrap_mean(&scores, 200, 0.95, 1));
        let constant = bootstrap_mean(&[1.0; 10], 200, 0.95, 1);
        assert_eq!((constant.interval.low, constant.interval.high), (1.0, 1.0));
    }
}
