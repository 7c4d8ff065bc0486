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
    let estimates = bootstrap_many(n_items, n_resamples, level, seed, |indices| vec![statistic(indices)]);
    estimates
        .into_iter()
        .next()
        .unwrap_or(Estimate { value: f64::NAN, interval: ConfidenceInterval { low: f64::NAN, high: f64::NAN, level } })
}

/// Several statistics over the same examples, each with its interval, from
/// one set of resamples: `statistic` returns one value per figure (always as
/// many), so figures computed together (precision and recall of every label,
/// a cascade's coverage and agreement) are resampled together.
pub fn bootstrap_many<F>(n_items: usize, n_resamples: usize, level: f64, seed: u64, statistic: F) -> Vec<Estimate>
where
    F: Fn(&[usize]) -> Vec<f64>,
{
    let all: Vec<usize> = (0..n_items).collect();
    let values = statistic(&all);
    let point = |value: f64| Estimate { value, interval: ConfidenceInterval { low: value, high: value, level } };
    if n_items == 0 || n_resamples == 0 {
        return values.into_iter().map(point).collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut resampled: Vec<Vec<f64>> = vec![Vec::with_capacity(n_resamples); values.len()];
    let mut indices = vec![0; n_items];
    for _ in 0..n_resamples {
        for slot in indices.iter_mut() {
            *slot = rng.gen_range(0..n_items);
        }
        for (figure, value) in resampled.iter_mut().zip(statistic(&indices)) {
            figure.push(value);
        }
    }
    let tail = (1.0 - level) / 2.0;
    values
        .into_iter()
        .zip(resampled)
        .map(|(value, samples)| {
            let low = crate::quantile(&samples, tail).unwrap_or(value);
            let high = crate::quantile(&samples, 1.0 - tail).unwrap_or(value);
            Estimate { value, interval: ConfidenceInterval { low, high, level } }
        })
        .collect()
}

/// The `q`-quantile of `values` (a latency percentile, say) with its
/// interval; `None` when there are no values.
pub fn bootstrap_quantile(values: &[f64], q: f64, n_resamples: usize, level: f64, seed: u64) -> Option<Estimate> {
    crate::quantile(values, q)?;
    Some(bootstrap(values.len(), n_resamples, level, seed, |indices| {
        let sample: Vec<f64> = indices.iter().map(|&idx| values[idx]).collect();
        crate::quantile(&sample, q).unwrap_or(f64::NAN)
    }))
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

    #[test]
    fn figures_resampled_together_match_their_single_bootstraps() {
        let scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25];
        let mean = |indices: &[usize]| indices.iter().map(|&idx| scores[idx]).sum::<f64>() / indices.len() as f64;
        let max = |indices: &[usize]| indices.iter().map(|&idx| scores[idx]).fold(f64::MIN, f64::max);
        let many = bootstrap_many(scores.len(), 300, 0.95, 11, |indices| vec![mean(indices), max(indices)]);
        assert_eq!(many.len(), 2);
        assert_eq!(many[0], bootstrap(scores.len(), 300, 0.95, 11, mean));
        assert_eq!(many[1], bootstrap(scores.len(), 300, 0.95, 11, max));
        assert_eq!(many[0].value, 4.75 / 8.0);
        assert_eq!(many[1].value, 1.0);
    }

    #[test]
    fn a_quantile_has_an_interval_around_it() {
        let latencies: Vec<f64> = (1..=100).map(f64::from).collect();
        let median = bootstrap_quantile(&latencies, 0.5, 500, 0.95, 3).expect("values");
        // Linear interpolation between the 50th and 51st values.
        assert_eq!(median.value, 50.5);
        assert!(median.interval.low < 50.5 && 50.5 < median.interval.high, "{median:?}");
        assert!(median.interval.low >= 35.0 && median.interval.high <= 66.0, "{median:?}");
        let p95 = bootstrap_quantile(&latencies, 0.95, 500, 0.95, 3).expect("values");
        assert!((p95.value - 95.05).abs() < 1e-9);
        assert!(p95.interval.low <= p95.value && p95.value <= p95.interval.high);
        assert_eq!(bootstrap_quantile(&[], 0.5, 500, 0.95, 3), None);
    }
}
