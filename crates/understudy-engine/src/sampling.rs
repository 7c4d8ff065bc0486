//! Token choice from a row of logits: greedy, temperature and nucleus (top-p)
//! sampling with a seeded generator, and the log-probabilities reported to
//! clients (always of the model's raw distribution: softmax of the logits at
//! temperature 1, before top-p).

/// A small deterministic generator (SplitMix64): the same seed gives the same
/// draws on every machine, whatever else runs in the same batch.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (idx, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = idx;
        }
    }
    best
}

/// Picks a token: greedy at temperature 0, otherwise a draw from
/// softmax(logits / temperature) restricted to the smallest set of tokens
/// whose probability reaches `top_p`.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut Rng) -> usize {
    if temperature <= 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let max = logits[argmax(logits)] as f64;
    let weights: Vec<f64> = logits.iter().map(|&logit| ((logit as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let draw = rng.next_f64();
    if top_p >= 1.0 {
        let mut target = draw * total;
        for (idx, weight) in weights.iter().enumerate() {
            target -= weight;
            if target < 0.0 {
                return idx;
            }
        }
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..weights.len()).filter(|&idx| weights[idx] > 0.0).collect();
    order.sort_unstable_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut kept = 0.0;
    let mut n_kept = 0;
    for &idx in &order {
        kept += weights[idx];
        n_kept += 1;
        if kept >= top_p * total {
            break;
        }
    }
    let mut target = draw * kept;
    for &idx in &order[..n_kept] {
        target -= weights[idx];
        if target < 0.0 {
            return idx;
        }
    }
    order.first().copied().unwrap_or(0)
}

/// log Σ exp(logits): the normalizer of the raw softmax.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    if logits.is_empty() {
        return f64::NEG_INFINITY;
    }
    let max = logits[argmax(logits)] as f64;
    let sum: f64 = logits.iter().map(|&logit| (logit as f64 - max).exp()).sum();
    max + sum.ln()
}

/// log Σ exp over f64 values.
pub fn log_sum_exp_f64(values: impl IntoIterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.into_iter().collect();
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|value| (value - max).exp()).sum::<f64>().ln()
}

/// The `n` most likely tokens with their log-probabilities, most likely first.
pub fn top_tokens(logits: &[f32], log_norm: f64, n: usize) -> Vec<(usize, f64)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(n);
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter().map(|token| (token, logits[token] as f64 - log_norm)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(sample(&logits, 0.0, 1.0, &mut Rng::new(1)), 1);
        let draws = |seed| (0..50).map(|_| sample(&logits, 1.0, 1.0, &mut Rng::new(seed))).collect::<Vec<_>>();
        assert_eq!(draws(7), draws(7));
        let mut rng = Rng::new(3);
        let many: Vec<usize> = (0..200).map(|_| sample(&logits, 1.0, 1.0, &mut rng)).collect();
        assert!(many.contains(&3) && many.contains(&1));
        // top_p small keeps only the most likely token.
        let mut rng = Rng::new(3);
        assert!((0..100).all(|_| sample(&logits, 1.0, 0.01, &mut rng) == 1));
    }

    #[test]
    fn logprobs_are_normalized() {
        let logits = [0.0f32, 1.0, 2.0];
        let norm = log_sum_exp(&logits);
        let total: f64 = logits.iter().map(|&l| (l as f64 - norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let top = top_tokens(&logits, norm, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
