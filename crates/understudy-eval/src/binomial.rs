//! Exact binomial probabilities and Clopper–Pearson intervals.
//!
//! The certified threshold and the audit guardrail both rest on exact
//! binomial tails, often far out in the tail (a p-value of 1e-12 on a million
//! calls), so the probabilities are computed the way R's `dbinom` does it
//! (Loader, "Fast and Accurate Computation of Binomial Probabilities", 2000):
//! the log-probability of one count comes from Stirling-series corrections and
//! a deviance term that never subtracts two large numbers, and a tail is a sum
//! of term ratios started from that one accurate term. The error is a few ulps
//! in the log for any `n` a `u64` holds, and a tail keeps its relative
//! accuracy however small it is, down to the smallest normal `f64`.
//!
//! These are plain numeric helpers: an argument outside its domain (a
//! probability outside [0, 1], a count above `n`, a confidence outside (0, 1))
//! gives NaN rather than an error, as in the usual statistical libraries; the
//! decisions built on them validate their inputs and return typed errors.

/// `ln(2π)`.
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// `stirlerr(n) = ln(n!) - ln(√(2πn) (n/e)^n)` for n = 0..=15, where the
/// asymptotic series is not yet accurate (R's `sferr_halves` at whole n).
const STIRLERR_SMALL: [f64; 16] = [
    0.0,
    0.081_061_466_795_327_26,
    0.041_340_695_955_409_3,
    0.027_677_925_684_998_34,
    0.020_790_672_103_765_093,
    0.016_644_691_189_821_193,
    0.013_876_128_823_070_748,
    0.011_896_709_945_891_77,
    0.010_411_265_261_972_096,
    0.009_255_462_182_712_733,
    0.008_330_563_433_362_87,
    0.007_573_675_487_951_841,
    0.006_942_840_107_209_53,
    0.006_408_994_188_004_207,
    0.005_951_370_112_758_847_5,
    0.005_554_733_551_962_801,
];

/// The error of Stirling's formula for `n!`, for whole `n`, to near machine
/// precision: a table below 16 and the asymptotic series above.
fn stirlerr(n: f64) -> f64 {
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    if n <= 15.0 {
        // Whole numbers only reach here; the cast truncates nothing.
        return STIRLERR_SMALL[n.max(0.0) as usize];
    }
    let nn = n * n;
    if n > 500.0 {
        (S0 - S1 / nn) / n
    } else if n > 80.0 {
        (S0 - (S1 - S2 / nn) / nn) / n
    } else if n > 35.0 {
        (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n
    }
}

/// The deviance term `x ln(x/m) + m - x`, computed without cancellation when
/// `x` is close to `m` (where the two large terms nearly cancel).
fn bd0(x: f64, m: f64) -> f64 {
    if (x - m).abs() < 0.1 * (x + m) {
        let mut v = (x - m) / (x + m);
        let mut sum = (x - m) * v;
        let mut ej = 2.0 * x * v;
        v *= v;
        for j in 1..1000 {
            ej *= v;
            let next = sum + ej / f64::from(2 * j + 1);
            if next == sum {
                return next;
            }
            sum = next;
        }
        return sum;
    }
    x * (x / m).ln() + m - x
}

/// `ln P(X = x)` for X ~ Binomial(n, p), with `q = 1 - p` passed separately so
/// that callers that know it exactly keep its precision.
fn ln_pmf_raw(x: u64, n: u64, p: f64, q: f64) -> f64 {
    if p == 0.0 {
        return if x == 0 { 0.0 } else { f64::NEG_INFINITY };
    }
    if q == 0.0 {
        return if x == n { 0.0 } else { f64::NEG_INFINITY };
    }
    let nf = n as f64;
    if x == 0 {
        if n == 0 {
            return 0.0;
        }
        return if p < 0.1 { -bd0(nf, nf * q) - nf * p } else { nf * q.ln() };
    }
    if x == n {
        return if q < 0.1 { -bd0(nf, nf * p) - nf * q } else { nf * p.ln() };
    }
    let xf = x as f64;
    let yf = (n - x) as f64;
    let lc = stirlerr(nf) - stirlerr(xf) - stirlerr(yf) - bd0(xf, nf * p) - bd0(yf, nf * q);
    let lf = LN_2PI + xf.ln() + (-xf / nf).ln_1p();
    lc - 0.5 * lf
}

fn valid_probability(p: f64) -> bool {
    (0.0..=1.0).contains(&p)
}

/// `ln P(X = k)` for X ~ Binomial(n, p); `-inf` when the count is impossible,
/// NaN when `p` is not a probability.
pub fn ln_binomial_pmf(k: u64, n: u64, p: f64) -> f64 {
    if !valid_probability(p) {
        return f64::NAN;
    }
    if k > n {
        return f64::NEG_INFINITY;
    }
    ln_pmf_raw(k, n, p, 1.0 - p)
}

/// `P(X <= k)` for X ~ Binomial(n, p), accurate to a few ulps relative in the
/// lower tail (however small) and absolute near 1. NaN when `p` is not a
/// probability.
///
/// The smaller side is summed: below the mean the lower tail from `k` down,
/// otherwise the upper tail from `k + 1` up, subtracted from one. Either way the
/// terms fall geometrically away from the mode, so the sum stops after a few
/// standard deviations' worth of terms (about `6 √(np(1-p))` at most).
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if !valid_probability(p) {
        return f64::NAN;
    }
    if k >= n || p == 0.0 {
        return 1.0;
    }
    if p == 1.0 {
        return 0.0;
    }
    let q = 1.0 - p;
    if (k as f64) < n as f64 * p {
        lower_tail(k, n, p, q)
    } else {
        1.0 - upper_tail(k + 1, n, p, q)
    }
}

/// `P(X <= k)` summed downward from `k`, which must lie below the mean so that
/// every term ratio is below one.
fn lower_tail(k: u64, n: u64, p: f64, q: f64) -> f64 {
    let ln_first = ln_pmf_raw(k, n, p, q);
    if ln_first == f64::NEG_INFINITY {
        return 0.0;
    }
    let odds = q / p;
    let (mut term, mut sum) = (1.0_f64, 1.0_f64);
    let mut j = k;
    while j > 0 {
        // P(X = j - 1) / P(X = j).
        term *= j as f64 / (n - j + 1) as f64 * odds;
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
        j -= 1;
    }
    (ln_first + sum.ln()).exp()
}

/// `P(X >= k)` summed upward from `k`, which must lie above the mean.
fn upper_tail(k: u64, n: u64, p: f64, q: f64) -> f64 {
    if k > n {
        return 0.0;
    }
    let ln_first = ln_pmf_raw(k, n, p, q);
    if ln_first == f64::NEG_INFINITY {
        return 0.0;
    }
    let odds = p / q;
    let (mut term, mut sum) = (1.0_f64, 1.0_f64);
    let mut j = k;
    while j < n {
        // P(X = j + 1) / P(X = j).
        term *= (n - j) as f64 / (j + 1) as f64 * odds;
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
        j += 1;
    }
    (ln_first + sum.ln()).exp()
}

/// The root of a monotone `f` on [low, high] where it crosses `level`, by
/// bisection to the resolution of `f64` (absolute, so tiny roots keep their
/// relative precision too). `increasing` says which way `f` goes.
pub(crate) fn bisect(mut low: f64, mut high: f64, level: f64, increasing: bool, f: impl Fn(f64) -> f64) -> f64 {
    for _ in 0..1100 {
        let mid = 0.5 * (low + high);
        if mid <= low || mid >= high {
            break;
        }
        let below = f(mid) < level;
        // For an increasing f the root lies above mid when f(mid) < level.
        if below == increasing {
            low = mid;
        } else {
            high = mid;
        }
    }
    0.5 * (low + high)
}

fn valid_confidence(confidence: f64) -> bool {
    confidence > 0.0 && confidence < 1.0
}

/// The exact one-sided upper confidence bound on a binomial proportion after
/// `k` successes in `n` trials: the `p` at which `P(X <= k) = 1 - confidence`.
/// One when `k == n` (or `n == 0`); NaN for `k > n` or a confidence outside (0, 1).
pub fn clopper_pearson_upper(k: u64, n: u64, confidence: f64) -> f64 {
    if k > n || !valid_confidence(confidence) {
        return f64::NAN;
    }
    if k == n {
        return 1.0;
    }
    let tail = 1.0 - confidence;
    if k == 0 {
        // (1 - U)^n = tail, in closed form.
        return -(tail.ln() / n as f64).exp_m1();
    }
    bisect(0.0, 1.0, tail, false, |p| binomial_cdf(k, n, p))
}

/// The exact one-sided lower confidence bound on a binomial proportion after
/// `k` successes in `n` trials: the `p` at which `P(X >= k) = 1 - confidence`.
/// Zero when `k == 0`; NaN for `k > n` or a confidence outside (0, 1).
pub fn clopper_pearson_lower(k: u64, n: u64, confidence: f64) -> f64 {
    if k > n || !valid_confidence(confidence) {
        return f64::NAN;
    }
    if k == 0 {
        return 0.0;
    }
    let tail = 1.0 - confidence;
    if k == n {
        // L^n = tail, in closed form.
        return (tail.ln() / n as f64).exp();
    }
    // P(X >= k) = 1 - P(X <= k - 1) grows with p; at the root it equals the
    // tail, so the subtraction loses nothing that matters.
    bisect(0.0, 1.0, tail, true, |p| 1.0 - binomial_cdf(k - 1, n, p))
}

/// The exact (Clopper–Pearson) two-sided interval for a binomial proportion
/// after `k` successes in `n` trials, with `(1 - confidence) / 2` in each tail.
/// `(0, 1)` when `n == 0`; NaNs for `k > n` or a confidence outside (0, 1).
/// Its coverage holds for one `n` fixed in advance: checked again after every
/// new observation it is too optimistic, which is what
/// [`crate::sequential::confidence_sequence`] is for.
pub fn clopper_pearson(k: u64, n: u64, confidence: f64) -> (f64, f64) {
    if k > n || !valid_confidence(confidence) {
        return (f64::NAN, f64::NAN);
    }
    let one_sided = 1.0 - (1.0 - confidence) / 2.0;
    (clopper_pearson_lower(k, n, one_sided), clopper_pearson_upper(k, n, one_sided))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ln(√(2π))`.
    const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

    fn close(actual: f64, expected: f64, relative: f64) -> bool {
        (actual - expected).abs() <= relative * expected.abs()
    }

    #[test]
    fn the_small_stirling_table_matches_its_definition() {
        let mut ln_factorial = 0.0_f64;
        for n in 1..=15_u32 {
            ln_factorial += f64::from(n).ln();
            let nf = f64::from(n);
            let direct = ln_factorial - (nf + 0.5) * nf.ln() + nf - LN_SQRT_2PI;
            assert!((stirlerr(nf) - direct).abs() < 1e-13, "n = {n}: {} vs {direct}", stirlerr(nf));
        }
        // The series just above the table agrees with the direct formula too.
        ln_factorial += 16.0_f64.ln();
        let direct = ln_factorial - 16.5 * 16.0_f64.ln() + 16.0 - LN_SQRT_2PI;
        assert!((stirlerr(16.0) - direct).abs() < 1e-13);
    }

    #[test]
    fn cdf_hand_computed_values() {
        // Textbook: P(Bin(10, 0.3) <= 2) = 0.3827827864.
        assert!(close(binomial_cdf(2, 10, 0.3), 0.382_782_786_4, 1e-9), "{}", binomial_cdf(2, 10, 0.3));
        // P(Bin(10, 0.5) <= 5) = 638 / 1024.
        assert!(close(binomial_cdf(5, 10, 0.5), 638.0 / 1024.0, 1e-13));
        // Zero successes: (1 - p)^n, here far below the mean and above it.
        assert!(close(binomial_cdf(0, 50, 0.05), 0.95_f64.powi(50), 1e-13));
        assert!(close(binomial_cdf(0, 60, 0.05), 0.95_f64.powi(60), 1e-13));
        // One failure in a hundred at 5 %: 0.95^100 + 100 * 0.05 * 0.95^99.
        let expected = 0.95_f64.powi(100) + 5.0 * 0.95_f64.powi(99);
        assert!(close(binomial_cdf(1, 100, 0.05), expected, 1e-13));
        assert_eq!(binomial_cdf(10, 10, 0.3), 1.0);
        assert_eq!(binomial_cdf(3, 10, 0.0), 1.0);
        assert_eq!(binomial_cdf(3, 10, 1.0), 0.0);
        assert!(binomial_cdf(3, 10, 1.5).is_nan());
        assert!(binomial_cdf(3, 10, f64::NAN).is_nan());
    }

    #[test]
    fn cdf_is_accurate_in_tiny_tails_and_at_large_n() {
        // P(Bin(1000, 1/2) <= 10), summed directly from 2^-1000 (a normal f64).
        let mut term = 0.5_f64.powi(1000);
        let mut reference = term;
        for j in 0..10 {
            term *= f64::from(1000 - j) / f64::from(j + 1);
            reference += term;
        }
        let tail = binomial_cdf(10, 1000, 0.5);
        assert!(close(tail, reference, 1e-12), "{tail:e} vs {reference:e}");
        assert!(close(binomial_cdf(0, 1000, 0.5), 0.5_f64.powi(1000), 1e-12));
        // A million trials at one in a million: (1 - 1e-6)^1e6.
        let expected = (1e6 * (-1e-6_f64).ln_1p()).exp();
        assert!(close(binomial_cdf(0, 1_000_000, 1e-6), expected, 1e-12));
        // By symmetry P(X <= n/2) = (1 + P(X = n/2)) / 2 at p = 1/2; the point
        // mass is sqrt(2 / (πn)) (1 - 1/(4n) + ...).
        let n = 1_000_000_u64;
        let mass = ln_binomial_pmf(n / 2, n, 0.5).exp();
        let stirling = (2.0 / (std::f64::consts::PI * 1e6)).sqrt() * (1.0 - 1.0 / 4e6);
        assert!(close(mass, stirling, 1e-11), "{mass} vs {stirling}");
        assert!(close(binomial_cdf(n / 2, n, 0.5), 0.5 * (1.0 + mass), 1e-13));
        // A far tail at a million trials: 4.7 % observed where 5 % is expected,
        // 14 standard deviations out, matches the sum of its own point masses.
        let far = binomial_cdf(47_000, n, 0.05);
        assert!(far > 1e-60 && far < 1e-30, "{far:e}");
        let by_terms: f64 = (45_000..=47_000).map(|k| ln_binomial_pmf(k, n, 0.05).exp()).sum();
        assert!(close(far, by_terms, 1e-9), "{far:e} vs {by_terms:e}");
    }

    #[test]
    fn the_point_masses_sum_to_one() {
        for (n, p) in [(1_u64, 0.3), (7, 0.5), (200, 0.02), (3000, 0.97)] {
            let total: f64 = (0..=n).map(|k| ln_binomial_pmf(k, n, p).exp()).sum();
            assert!((total - 1.0).abs() < 1e-13, "n = {n}, p = {p}: {total}");
            // The cdf is the running sum of the masses.
            let mut running = 0.0;
            for k in 0..=n.min(300) {
                running += ln_binomial_pmf(k, n, p).exp();
                assert!((binomial_cdf(k, n, p) - running).abs() < 1e-13, "n = {n}, p = {p}, k = {k}");
            }
        }
    }

    #[test]
    fn clopper_pearson_matches_published_tables() {
        // Two-sided 95 %: 5 of 10 gives (0.1871, 0.8129); 1 of 10 (0.0025, 0.4450);
        // 0 of 10 (0, 0.3085); 10 of 10 (0.6915, 1).
        let (low, high) = clopper_pearson(5, 10, 0.95);
        assert!((low - 0.187_086).abs() < 1e-6 && (high - 0.812_914).abs() < 1e-6, "{low} {high}");
        let (low, high) = clopper_pearson(1, 10, 0.95);
        assert!((low - 0.002_529).abs() < 1e-6 && (high - 0.445_016).abs() < 1e-6, "{low} {high}");
        let (low, high) = clopper_pearson(0, 10, 0.95);
        assert_eq!(low, 0.0);
        assert!(close(high, 1.0 - 0.025_f64.powf(0.1), 1e-14));
        let (low, high) = clopper_pearson(10, 10, 0.95);
        assert!(close(low, 0.025_f64.powf(0.1), 1e-14));
        assert_eq!(high, 1.0);
        // One-sided 95 % upper after 0 of 10: 1 - 0.05^(1/10) = 0.2589.
        assert!(close(clopper_pearson_upper(0, 10, 0.95), 1.0 - 0.05_f64.powf(0.1), 1e-14));
        // The bisection agrees with the closed form where both apply, and the
        // bound it finds is where the tail equals the level.
        let upper = clopper_pearson_upper(3, 40, 0.95);
        assert!((binomial_cdf(3, 40, upper) - 0.05).abs() < 1e-12);
        let lower = clopper_pearson_lower(37, 40, 0.95);
        assert!((1.0 - binomial_cdf(36, 40, lower) - 0.05).abs() < 1e-12);
        // A million clean trials bound the rate near 3 in a million.
        let tiny = clopper_pearson_upper(0, 1_000_000, 0.95);
        assert!(close(tiny, -((0.05_f64).ln() / 1e6).exp_m1(), 1e-12), "{tiny:e}");
        let tiny_lower = clopper_pearson_lower(1, 1_000_000, 0.95);
        // Near zero, P(X >= 1) = 1 - (1 - L)^n = 0.05 gives L = 1 - 0.95^(1/n).
        assert!(close(tiny_lower, -((0.95_f64).ln() / 1e6).exp_m1(), 1e-9), "{tiny_lower:e}");
        assert_eq!(clopper_pearson(0, 0, 0.95), (0.0, 1.0));
        assert!(clopper_pearson(11, 10, 0.95).0.is_nan());
        assert!(clopper_pearson_upper(1, 10, 1.0).is_nan());
    }
}
