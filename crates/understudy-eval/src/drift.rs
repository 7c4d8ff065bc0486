//! The drift watch's statistics: has the traffic moved away from what the
//! understudy was trained and certified on?
//!
//! Three signals, each a two-sample test with a p-value and a decision at a
//! level `alpha` fixed in advance, so that on traffic that has not moved each
//! fires with probability at most `alpha`:
//!
//! - **Input drift** ([`input_drift`]): the training prompts' embeddings
//!   against recent prompts' embeddings, by the energy distance (Székely and
//!   Rizzo, "Energy statistics: a class of statistics based on distances",
//!   2013) with a permutation test. The energy distance is the maximum mean
//!   discrepancy of a distance-induced kernel (Sejdinovic, Sriperumbudur,
//!   Gretton, Fukumizu, 2013; Gretton et al., "A kernel two-sample test",
//!   JMLR 2012), so it needs no bandwidth, and a multivariate two-sample test
//!   on a representation's outputs is what detects dataset shift best in
//!   Rabanser, Günnemann, Lipton, "Failing Loudly" (NeurIPS 2019).
//! - **Answer drift** ([`answer_drift`]): the lead's answers on recent calls
//!   against the training set's labels: labels the training set never had,
//!   and Pearson's chi-square test of homogeneity on the 2 × K table of label
//!   counts, with rare labels pooled.
//! - **Confidence drift** ([`confidence_drift`]): the understudy's confidence
//!   on recent calls against its confidence on the evaluation set: the
//!   coverage at the serving threshold by Fisher's exact test (one-sided,
//!   coverage fell), and the whole distribution by the one-sided two-sample
//!   Kolmogorov–Smirnov test (recent confidences stochastically smaller).
//!
//! [`DriftReport`] gathers whichever of the three were run and says which
//! fired and why, in words an autopilot can put in a note. Every test here
//! is fixed-sample: run it once per window. Run repeatedly on overlapping
//! windows, its false alarms add up like any repeated test's.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use understudy_types::normalize_answer;

use crate::binomial::ln_binomial_pmf;
use crate::{check_alpha, ParameterError};

/// The name of the pooled category of rare labels in [`AnswerDriftTest`].
pub const POOLED_LABEL: &str = "(other)";

// ---------------------------------------------------------------------------
// Input drift: energy distance with a permutation test.
// ---------------------------------------------------------------------------

/// How [`input_drift`] runs its permutation test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputDriftConfig {
    /// The false-alarm rate: drift is declared when the p-value is at most this.
    pub alpha: f64,
    /// Random relabellings drawn. The p-value is a multiple of
    /// `1 / (n_permutations + 1)`, so it can never fall below that: with 199
    /// permutations the smallest is 0.005, and `alpha * (n_permutations + 1)`
    /// a whole number makes the test's level exactly `alpha`.
    pub n_permutations: usize,
    /// Each side is subsampled to at most this many embeddings (seeded), so the
    /// cost is bounded: the distance matrix has `(2 max_per_side)²` entries and
    /// each permutation reads half of them.
    pub max_per_side: usize,
    /// Seeds the subsampling and the permutations, so a report is reproducible.
    pub seed: u64,
}

impl Default for InputDriftConfig {
    fn default() -> Self {
        Self { alpha: 0.05, n_permutations: 199, max_per_side: 256, seed: 0 }
    }
}

/// The outcome of [`input_drift`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputDriftTest {
    /// The energy distance between the two (subsampled) samples,
    /// `2 E|X - Y| - E|X - X'| - E|Y - Y'|` with empirical means over all
    /// pairs (the V-statistic): zero when the samples coincide, and its
    /// population value is zero only when the distributions are equal.
    pub statistic: f64,
    /// `(1 + #{permutations with a statistic at least the observed}) / (1 + B)`.
    pub p_value: f64,
    pub alpha: f64,
    pub n_permutations: usize,
    /// Reference (training) embeddings tested, after subsampling.
    pub n_reference: usize,
    /// Recent embeddings tested, after subsampling.
    pub n_recent: usize,
    /// Reference embeddings given, before subsampling.
    pub n_reference_total: usize,
    /// Recent embeddings given, before subsampling.
    pub n_recent_total: usize,
    /// `p_value <= alpha`.
    pub drifted: bool,
}

impl InputDriftTest {
    /// Why this signal fired, in one sentence; `None` when it did not.
    pub fn reason(&self) -> Option<String> {
        self.drifted.then(|| {
            format!(
                "input drift: recent prompts' embeddings differ from the training prompts' \
                 (energy distance {:.4}, permutation p = {:.4} <= alpha {}; {} training vs {} recent prompts)",
                self.statistic, self.p_value, self.alpha, self.n_reference, self.n_recent
            )
        })
    }
}

/// The energy distance between two samples of vectors (the V-statistic
/// `2 E|X - Y| - E|X - X'| - E|Y - Y'|` with Euclidean distances, computed in
/// `f64`). NaN when either sample is empty. Vectors of different lengths are
/// compared over their common prefix; [`input_drift`] checks them.
pub fn energy_distance<V: AsRef<[f32]>>(left: &[V], right: &[V]) -> f64 {
    if left.is_empty() || right.is_empty() {
        return f64::NAN;
    }
    let rows: Vec<&[f32]> = left.iter().chain(right).map(AsRef::as_ref).collect();
    let pooled = PooledDistances::new(&rows);
    let mut in_left = vec![0.0; rows.len()];
    in_left[..left.len()].fill(1.0);
    pooled.energy(&in_left, left.len())
}

/// Tests whether `recent` embeddings come from the same distribution as
/// `reference` ones: the energy distance with a seeded permutation test.
///
/// Each side is first subsampled to `config.max_per_side` (seeded, without
/// replacement). The pooled pairwise distance matrix is computed once; under
/// the null hypothesis the pooled embeddings are exchangeable, so the
/// observed statistic is compared with the statistics of `n_permutations`
/// random relabellings of the pool into groups of the same sizes, each
/// computed from the matrix and its row sums in `O(n_reference × n)`. The
/// p-value `(1 + #{permuted >= observed}) / (1 + B)` is valid for any `B`:
/// `P(p <= alpha) <= alpha` exactly, with no large-sample approximation.
///
/// Embeddings must be finite and of one length; they need not be normalized
/// for validity, but the encoder's L2-normalized outputs are what the defaults
/// were tuned on. Errors on an empty side, mismatched lengths, a non-finite
/// value, `alpha` outside (0, 1), or no permutations.
pub fn input_drift<V: AsRef<[f32]>>(
    reference: &[V],
    recent: &[V],
    config: &InputDriftConfig,
) -> Result<InputDriftTest, ParameterError> {
    check_alpha(config.alpha)?;
    if config.n_permutations == 0 || config.max_per_side == 0 {
        return Err(ParameterError::Permutations {
            n_permutations: config.n_permutations,
            max_per_side: config.max_per_side,
        });
    }
    check_embeddings(reference, "reference")?;
    check_embeddings(recent, "recent")?;
    let dim = reference[0].as_ref().len();
    if let Some(other) = recent.first().map(|row| row.as_ref().len()).filter(|&len| len != dim) {
        return Err(ParameterError::DimensionMismatch { expected: dim, found: other });
    }

    let mut rng = StdRng::seed_from_u64(config.seed);
    let reference_kept = subsample(reference.len(), config.max_per_side, &mut rng);
    let recent_kept = subsample(recent.len(), config.max_per_side, &mut rng);
    let rows: Vec<&[f32]> = reference_kept
        .iter()
        .map(|&idx| reference[idx].as_ref())
        .chain(recent_kept.iter().map(|&idx| recent[idx].as_ref()))
        .collect();
    let (n_reference, n_recent) = (reference_kept.len(), recent_kept.len());
    let pooled = PooledDistances::new(&rows);

    let mut in_reference = vec![0.0; rows.len()];
    in_reference[..n_reference].fill(1.0);
    let statistic = pooled.energy(&in_reference, n_reference);

    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut at_least = 0_usize;
    for _ in 0..config.n_permutations {
        let (chosen, _) = order.partial_shuffle(&mut rng, n_reference);
        in_reference.fill(0.0);
        for &idx in chosen.iter() {
            in_reference[idx] = 1.0;
        }
        // The statistic of a relabelling is computed in index order whatever
        // the shuffle's order, so the observed labelling, drawn again, gives
        // the very same number and counts as a tie.
        at_least += usize::from(pooled.energy(&in_reference, n_reference) >= statistic);
    }
    let p_value = (1 + at_least) as f64 / (1 + config.n_permutations) as f64;
    Ok(InputDriftTest {
        statistic,
        p_value,
        alpha: config.alpha,
        n_permutations: config.n_permutations,
        n_reference,
        n_recent,
        n_reference_total: reference.len(),
        n_recent_total: recent.len(),
        drifted: p_value <= config.alpha,
    })
}

fn check_embeddings<V: AsRef<[f32]>>(sample: &[V], name: &'static str) -> Result<(), ParameterError> {
    let first = sample.first().ok_or(ParameterError::EmptySample { sample: name })?;
    let dim = first.as_ref().len();
    for row in sample {
        let row = row.as_ref();
        if row.len() != dim {
            return Err(ParameterError::DimensionMismatch { expected: dim, found: row.len() });
        }
        if row.iter().any(|value| !value.is_finite()) {
            return Err(ParameterError::NonFinite { sample: name });
        }
    }
    Ok(())
}

/// Indices of a seeded random subset of `0..n` of size `min(n, cap)`, in
/// increasing order.
fn subsample(n: usize, cap: usize, rng: &mut StdRng) -> Vec<usize> {
    if n <= cap {
        return (0..n).collect();
    }
    let mut kept = rand::seq::index::sample(rng, n, cap).into_vec();
    kept.sort_unstable();
    kept
}

/// The pooled sample's pairwise Euclidean distances with their row sums, from
/// which any split of the pool into two groups gives its energy distance.
struct PooledDistances {
    n: usize,
    distances: Vec<f64>,
    row_sums: Vec<f64>,
    total: f64,
}

impl PooledDistances {
    fn new(rows: &[&[f32]]) -> Self {
        let n = rows.len();
        let mut distances = vec![0.0; n * n];
        for i in 0..n {
            for j in (i + 1)..n {
                let squared: f64 = rows[i]
                    .iter()
                    .zip(rows[j])
                    .map(|(&left, &right)| {
                        let gap = f64::from(left) - f64::from(right);
                        gap * gap
                    })
                    .sum();
                let distance = squared.sqrt();
                distances[i * n + j] = distance;
                distances[j * n + i] = distance;
            }
        }
        let row_sums: Vec<f64> = distances.chunks_exact(n.max(1)).map(|row| row.iter().sum()).collect();
        let total = row_sums.iter().sum();
        Self { n, distances, row_sums, total }
    }

    /// The energy distance between group A (`in_a[i] == 1.0`, `n_a` of them)
    /// and the rest. With `S_AA` the sum over ordered pairs within A and
    /// `R_A` the sum of A's row sums, the cross sum is `S_AB = R_A - S_AA` and
    /// `S_BB = T - S_AA - 2 S_AB`, so only `S_AA` costs a pass over the matrix.
    fn energy(&self, in_a: &[f64], n_a: usize) -> f64 {
        let n_b = self.n - n_a;
        if n_a == 0 || n_b == 0 {
            return f64::NAN;
        }
        let (mut within_a, mut rows_a) = (0.0, 0.0);
        for (idx, row) in self.distances.chunks_exact(self.n).enumerate() {
            if in_a[idx] == 1.0 {
                within_a += row.iter().zip(in_a).map(|(distance, weight)| distance * weight).sum::<f64>();
                rows_a += self.row_sums[idx];
            }
        }
        let cross = rows_a - within_a;
        let within_b = self.total - within_a - 2.0 * cross;
        let (a, b) = (n_a as f64, n_b as f64);
        2.0 * cross / (a * b) - within_a / (a * a) - within_b / (b * b)
    }
}

// ---------------------------------------------------------------------------
// Answer drift: new labels and a chi-square test of homogeneity.
// ---------------------------------------------------------------------------

/// How [`answer_drift`] decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerDriftConfig {
    /// The chi-square test's false-alarm rate.
    pub alpha: f64,
    /// A label the training set never had, given by the lead at least this
    /// many times in the window, is drift on its own.
    pub min_new: u64,
    /// Labels whose expected count in the smaller sample is below this are
    /// pooled into one category before the chi-square test (Cochran's rule:
    /// below 5 the chi-square approximation cannot be trusted).
    pub min_expected: f64,
}

impl Default for AnswerDriftConfig {
    fn default() -> Self {
        Self { alpha: 0.05, min_new: 5, min_expected: 5.0 }
    }
}

/// A label the lead gave on recent calls that the training set never had.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLabel {
    pub label: String,
    pub count: u64,
    /// `count` as a share of the recent answers.
    pub share: f64,
}

/// The outcome of [`answer_drift`].
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerDriftTest {
    pub n_training: u64,
    pub n_recent: u64,
    /// Labels absent from the training set, most frequent first.
    pub new_labels: Vec<NewLabel>,
    /// The share of recent answers with a label the training set never had.
    pub new_share: f64,
    /// Pearson's chi-square statistic of the (pooled) 2 × K table.
    pub chi_square: f64,
    /// `K - 1` after pooling; 0 when fewer than two categories remain, and
    /// then the test is not run (`p_value` 1).
    pub degrees_of_freedom: u64,
    /// The chi-square survival function at `chi_square`.
    pub p_value: f64,
    /// Labels merged into the category [`POOLED_LABEL`] because they were too
    /// rare for the chi-square approximation.
    pub pooled_labels: Vec<String>,
    pub alpha: f64,
    pub min_new: u64,
    /// Some new label was given at least `min_new` times.
    pub new_label_fired: bool,
    /// `p_value <= alpha`: the shares of the labels moved.
    pub shares_shifted: bool,
    /// `new_label_fired || shares_shifted`.
    pub drifted: bool,
}

impl AnswerDriftTest {
    /// Why this signal fired, in one sentence; `None` when it did not.
    pub fn reason(&self) -> Option<String> {
        if !self.drifted {
            return None;
        }
        let mut parts = Vec::new();
        if self.new_label_fired {
            let labels: Vec<String> = self
                .new_labels
                .iter()
                .filter(|label| label.count >= self.min_new)
                .map(|label| format!("{:?} {} times ({:.1} %)", label.label, label.count, 100.0 * label.share))
                .collect();
            parts.push(format!("labels the training set never had: {}", labels.join(", ")));
        }
        if self.shares_shifted {
            parts.push(format!(
                "label shares shifted (chi-square {:.2} on {} dof, p = {:.2e} <= alpha {})",
                self.chi_square, self.degrees_of_freedom, self.p_value, self.alpha
            ));
        }
        Some(format!("answer drift over {} recent answers: {}", self.n_recent, parts.join("; ")))
    }
}

/// Counts of answers by label, each normalized by the one rule of agreement
/// ([`understudy_types::normalize_answer`]).
pub fn label_counts<I, S>(answers: I) -> BTreeMap<String, u64>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(normalize_answer(answer.as_ref())).or_insert(0) += 1;
    }
    counts
}

/// Whether the lead's answers on recent calls (`recent` label counts) are
/// distributed like the training set's (`training` label counts). Labels are
/// compared under [`understudy_types::normalize_answer`], so counts keyed by
/// raw answers are merged first.
///
/// Two checks, either of which is drift:
/// - a label absent from the training set given at least `min_new` times;
/// - Pearson's chi-square test of homogeneity on the 2 × K table (training
///   and recent rows, one column per label, new labels included), at level
///   `alpha`. Labels whose expected count in the smaller row falls below
///   `min_expected` are pooled into one category, and while that category is
///   itself too small the rarest remaining label joins it. The pooling reads
///   only the column totals, which the test conditions on, so it does not
///   bias the test. The p-value is the chi-square survival function with
///   `K - 1` degrees of freedom (Pearson 1900; Cochran 1954 for the pooling).
///
/// Errors on an empty training set or window, or `alpha` outside (0, 1).
pub fn answer_drift<S: AsRef<str>>(
    training: &BTreeMap<S, u64>,
    recent: &BTreeMap<S, u64>,
    config: &AnswerDriftConfig,
) -> Result<AnswerDriftTest, ParameterError> {
    check_alpha(config.alpha)?;
    let training = renormalize(training);
    let recent = renormalize(recent);
    let n_training: u64 = training.values().sum();
    let n_recent: u64 = recent.values().sum();
    if n_training == 0 {
        return Err(ParameterError::EmptySample { sample: "training" });
    }
    if n_recent == 0 {
        return Err(ParameterError::EmptySample { sample: "recent" });
    }

    let mut new_labels: Vec<NewLabel> = recent
        .iter()
        .filter(|(label, &count)| count > 0 && training.get(*label).copied().unwrap_or(0) == 0)
        .map(|(label, &count)| NewLabel { label: label.clone(), count, share: count as f64 / n_recent as f64 })
        .collect();
    new_labels.sort_by(|left, right| right.count.cmp(&left.count).then_with(|| left.label.cmp(&right.label)));
    let new_share = new_labels.iter().map(|label| label.count).sum::<u64>() as f64 / n_recent as f64;
    let new_label_fired = new_labels.iter().any(|label| label.count >= config.min_new);

    // One column per label seen on either side: (label, training, recent).
    let columns: Vec<(String, u64, u64)> = training
        .keys()
        .chain(recent.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|label| {
            (label.clone(), training.get(label).copied().unwrap_or(0), recent.get(label).copied().unwrap_or(0))
        })
        .filter(|(_, left, right)| left + right > 0)
        .collect();
    let n_total = (n_training + n_recent) as f64;
    let smaller_row = n_training.min(n_recent) as f64;
    let expected_in_smaller = |column_total: u64| smaller_row * column_total as f64 / n_total;

    // Pool the rare columns, then grow the pool from the rarest column up
    // until it is large enough itself.
    let (mut kept, rare): (Vec<_>, Vec<_>) =
        columns.into_iter().partition(|(_, left, right)| expected_in_smaller(left + right) >= config.min_expected);
    let mut pooled_labels: Vec<String> = rare.iter().map(|(label, _, _)| label.clone()).collect();
    let mut pool = rare.iter().fold((0_u64, 0_u64), |(left, right), column| (left + column.1, right + column.2));
    if !pooled_labels.is_empty() {
        kept.sort_by(|left, right| (left.1 + left.2).cmp(&(right.1 + right.2)).then_with(|| left.0.cmp(&right.0)));
        let mut rarest = 0;
        while expected_in_smaller(pool.0 + pool.1) < config.min_expected && rarest < kept.len() {
            let (label, left, right) = &kept[rarest];
            pooled_labels.push(label.clone());
            pool = (pool.0 + left, pool.1 + right);
            rarest += 1;
        }
        kept.drain(..rarest);
    }
    pooled_labels.sort();
    let mut table: Vec<(u64, u64)> = kept.iter().map(|(_, left, right)| (*left, *right)).collect();
    if pool.0 + pool.1 > 0 {
        table.push(pool);
    }

    let (chi_square, degrees_of_freedom) = if table.len() < 2 {
        (0.0, 0)
    } else {
        let statistic = table
            .iter()
            .map(|&(left, right)| {
                let column_total = (left + right) as f64;
                [(left, n_training), (right, n_recent)]
                    .into_iter()
                    .map(|(observed, row_total)| {
                        let expected = row_total as f64 * column_total / n_total;
                        let gap = observed as f64 - expected;
                        gap * gap / expected
                    })
                    .sum::<f64>()
            })
            .sum();
        (statistic, table.len() as u64 - 1)
    };
    let p_value = if degrees_of_freedom == 0 { 1.0 } else { chi_square_sf(chi_square, degrees_of_freedom as f64) };
    let shares_shifted = p_value <= config.alpha;
    Ok(AnswerDriftTest {
        n_training,
        n_recent,
        new_labels,
        new_share,
        chi_square,
        degrees_of_freedom,
        p_value,
        pooled_labels,
        alpha: config.alpha,
        min_new: config.min_new,
        new_label_fired,
        shares_shifted,
        drifted: new_label_fired || shares_shifted,
    })
}

fn renormalize<S: AsRef<str>>(counts: &BTreeMap<S, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (label, &count) in counts {
        *out.entry(normalize_answer(label.as_ref())).or_insert(0) += count;
    }
    out
}

// ---------------------------------------------------------------------------
// Confidence drift: coverage by Fisher's exact test, and a one-sided KS test.
// ---------------------------------------------------------------------------

/// How [`confidence_drift`] decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceDriftConfig {
    /// The false-alarm rate of the signal as a whole; with both tests run,
    /// each is held to `alpha / 2` (Bonferroni).
    pub alpha: f64,
}

impl Default for ConfidenceDriftConfig {
    fn default() -> Self {
        Self { alpha: 0.05 }
    }
}

/// Coverage at the serving threshold, before and now, with Fisher's exact
/// one-sided p-value for a drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoverageTest {
    pub threshold: f64,
    pub n_reference: u64,
    pub n_reference_served: u64,
    pub n_recent: u64,
    pub n_recent_served: u64,
    /// `P(X <= n_recent_served)` for X hypergeometric: the recent window's
    /// share of all served calls, given how many were served in total.
    pub p_value: f64,
}

impl CoverageTest {
    pub fn reference_coverage(&self) -> f64 {
        self.n_reference_served as f64 / self.n_reference.max(1) as f64
    }

    pub fn recent_coverage(&self) -> f64 {
        self.n_recent_served as f64 / self.n_recent.max(1) as f64
    }
}

/// The one-sided two-sample Kolmogorov–Smirnov test that recent values are
/// stochastically smaller than the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsTest {
    /// `D+ = sup_t (F_recent(t) - F_reference(t))`, over the empirical
    /// distribution functions.
    pub statistic: f64,
    /// Smirnov's limit `exp(-2 m n / (m + n) D+²)`, capped at 1.
    pub p_value: f64,
    pub n_reference: usize,
    pub n_recent: usize,
}

/// The outcome of [`confidence_drift`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceDriftTest {
    /// `None` when no serving threshold was given.
    pub coverage: Option<CoverageTest>,
    pub ks: KsTest,
    pub alpha: f64,
    /// The Bonferroni-combined p-value: the smallest of the tests' p-values
    /// times the number of tests, capped at 1.
    pub p_value: f64,
    /// The coverage test rejected at its share of `alpha`.
    pub coverage_fell: bool,
    /// The KS test rejected at its share of `alpha`.
    pub confidence_fell: bool,
    /// `coverage_fell || confidence_fell`, equivalently `p_value <= alpha`.
    pub drifted: bool,
}

impl ConfidenceDriftTest {
    /// Why this signal fired, in one sentence; `None` when it did not.
    pub fn reason(&self) -> Option<String> {
        if !self.drifted {
            return None;
        }
        let mut parts = Vec::new();
        if let (true, Some(coverage)) = (self.coverage_fell, self.coverage) {
            parts.push(format!(
                "coverage at threshold {} fell from {:.1} % to {:.1} % (Fisher exact p = {:.2e})",
                coverage.threshold,
                100.0 * coverage.reference_coverage(),
                100.0 * coverage.recent_coverage(),
                coverage.p_value
            ));
        }
        if self.confidence_fell {
            parts.push(format!(
                "confidences fell (one-sided KS D = {:.3}, p = {:.2e}; {} evaluation vs {} recent calls)",
                self.ks.statistic, self.ks.p_value, self.ks.n_reference, self.ks.n_recent
            ));
        }
        Some(format!("confidence drift at alpha {}: {}", self.alpha, parts.join("; ")))
    }
}

/// Whether the understudy has grown less confident: its confidences on recent
/// calls (`recent`) against those at evaluation time (`reference`).
///
/// - With a serving `threshold`, the coverage (the share of calls with
///   confidence at least the threshold, as the cascade serves them) is
///   compared by Fisher's exact test, one-sided for a drop: given the total
///   served over both samples, the recent count is hypergeometric under the
///   null, and the p-value is its lower tail. It is exact at any size.
/// - The whole distribution is compared by the one-sided two-sample
///   Kolmogorov–Smirnov test ([`ks_smaller`]).
///
/// With both run, each is held to `alpha / 2`, so the signal's false-alarm
/// rate stays at most `alpha`. A NaN confidence is never served and counts as
/// the lowest possible confidence, as in the cascade. Errors on an empty
/// sample, a NaN threshold, or `alpha` outside (0, 1).
pub fn confidence_drift(
    reference: &[f64],
    recent: &[f64],
    threshold: Option<f64>,
    config: &ConfidenceDriftConfig,
) -> Result<ConfidenceDriftTest, ParameterError> {
    check_alpha(config.alpha)?;
    if reference.is_empty() {
        return Err(ParameterError::EmptySample { sample: "reference" });
    }
    if recent.is_empty() {
        return Err(ParameterError::EmptySample { sample: "recent" });
    }
    if let Some(threshold) = threshold.filter(|threshold| threshold.is_nan()) {
        return Err(ParameterError::Threshold(threshold));
    }
    let coverage = threshold.map(|threshold| {
        let served = |values: &[f64]| values.iter().filter(|&&value| value >= threshold).count() as u64;
        let (n_reference, n_recent) = (reference.len() as u64, recent.len() as u64);
        let (n_reference_served, n_recent_served) = (served(reference), served(recent));
        let p_value =
            hypergeometric_cdf(n_recent_served, n_reference + n_recent, n_reference_served + n_recent_served, n_recent);
        CoverageTest { threshold, n_reference, n_reference_served, n_recent, n_recent_served, p_value }
    });
    let ks = ks_smaller(reference, recent);
    let n_tests = if coverage.is_some() { 2.0 } else { 1.0 };
    let each = config.alpha / n_tests;
    let coverage_fell = coverage.is_some_and(|coverage| coverage.p_value <= each);
    let confidence_fell = ks.p_value <= each;
    let smallest = coverage.map_or(ks.p_value, |coverage| coverage.p_value.min(ks.p_value));
    Ok(ConfidenceDriftTest {
        coverage,
        ks,
        alpha: config.alpha,
        p_value: (n_tests * smallest).min(1.0),
        coverage_fell,
        confidence_fell,
        drifted: coverage_fell || confidence_fell,
    })
}

/// The one-sided two-sample Kolmogorov–Smirnov test of "`recent` is
/// stochastically smaller than `reference`": `D+ = sup_t (F_recent(t) -
/// F_reference(t))` and Smirnov's asymptotic p-value `exp(-2 m n / (m + n)
/// D+²)` (Smirnov 1939; Hodges 1957 shows it close to exact already at a few
/// dozen a side). Ties are handled by evaluating the distribution functions
/// only after every copy of a value, which makes the test conservative when
/// values repeat. NaN counts as the lowest value. An empty side gives `D+ = 0`
/// and p-value 1.
pub fn ks_smaller(reference: &[f64], recent: &[f64]) -> KsTest {
    let sorted = |values: &[f64]| {
        let mut out: Vec<f64> =
            values.iter().map(|&value| if value.is_nan() { f64::NEG_INFINITY } else { value }).collect();
        out.sort_by(f64::total_cmp);
        out
    };
    let (reference_sorted, recent_sorted) = (sorted(reference), sorted(recent));
    let (m, n) = (reference_sorted.len(), recent_sorted.len());
    let empty = KsTest { statistic: 0.0, p_value: 1.0, n_reference: m, n_recent: n };
    if m == 0 || n == 0 {
        return empty;
    }
    let (mut i, mut j, mut statistic) = (0, 0, 0.0_f64);
    while i < m || j < n {
        let next = match (reference_sorted.get(i), recent_sorted.get(j)) {
            (Some(&left), Some(&right)) => left.min(right),
            (Some(&left), None) => left,
            (None, Some(&right)) => right,
            (None, None) => break,
        };
        while i < m && reference_sorted[i] <= next {
            i += 1;
        }
        while j < n && recent_sorted[j] <= next {
            j += 1;
        }
        statistic = statistic.max(j as f64 / n as f64 - i as f64 / m as f64);
    }
    let effective = (m as f64 * n as f64) / (m + n) as f64;
    KsTest { statistic, p_value: (-2.0 * effective * statistic * statistic).exp().min(1.0), ..empty }
}

// ---------------------------------------------------------------------------
// The report.
// ---------------------------------------------------------------------------

/// One of the drift watch's three signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DriftSignal {
    Input,
    Answers,
    Confidence,
}

impl DriftSignal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Answers => "answers",
            Self::Confidence => "confidence",
        }
    }
}

/// Whichever of the three signals were run on one window, and what they say.
/// A signal not run (no embeddings yet, no recent lead answers, no
/// understudy) is `None` and never fires.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DriftReport {
    pub input: Option<InputDriftTest>,
    pub answers: Option<AnswerDriftTest>,
    pub confidence: Option<ConfidenceDriftTest>,
}

impl DriftReport {
    /// The signals that fired, in the order input, answers, confidence.
    pub fn fired(&self) -> Vec<DriftSignal> {
        let mut out = Vec::new();
        if self.input.as_ref().is_some_and(|test| test.drifted) {
            out.push(DriftSignal::Input);
        }
        if self.answers.as_ref().is_some_and(|test| test.drifted) {
            out.push(DriftSignal::Answers);
        }
        if self.confidence.as_ref().is_some_and(|test| test.drifted) {
            out.push(DriftSignal::Confidence);
        }
        out
    }

    /// Any signal fired: a retrain is due.
    pub fn drifted(&self) -> bool {
        !self.fired().is_empty()
    }

    /// One sentence per signal that fired, for a report or an autopilot's
    /// note ("retrain due because ...").
    pub fn reasons(&self) -> Vec<String> {
        [
            self.input.as_ref().and_then(InputDriftTest::reason),
            self.answers.as_ref().and_then(AnswerDriftTest::reason),
            self.confidence.as_ref().and_then(ConfidenceDriftTest::reason),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// A bound on the probability that some signal fires on a window that has
    /// not drifted: the sum of the levels of the tests run (the union bound).
    /// The new-label rule of answer drift is a threshold, not a test, and is
    /// not counted.
    pub fn false_alarm_bound(&self) -> f64 {
        self.input.as_ref().map_or(0.0, |test| test.alpha)
            + self.answers.as_ref().map_or(0.0, |test| test.alpha)
            + self.confidence.as_ref().map_or(0.0, |test| test.alpha)
    }
}

// ---------------------------------------------------------------------------
// Distribution functions.
// ---------------------------------------------------------------------------

/// `P(X <= x)` for X hypergeometric: `draws` taken without replacement from
/// `total` items of which `successes` are successes. NaN when `successes` or
/// `draws` exceeds `total`.
///
/// Each point mass is a ratio of binomial ones, `b(x; K, p) b(n - x; N - K,
/// p) / b(n; N, p)` at `p = n / N` (as R's `dhyper` computes it, Loader 2000),
/// from [`ln_binomial_pmf`]; the tail is summed from one accurate term by
/// term ratios, on the side of the mode where the terms fall, so that a small
/// tail keeps its relative accuracy.
pub fn hypergeometric_cdf(x: u64, total: u64, successes: u64, draws: u64) -> f64 {
    if successes > total || draws > total {
        return f64::NAN;
    }
    let failures = total - successes;
    let lowest = draws.saturating_sub(failures);
    let highest = draws.min(successes);
    if x < lowest {
        return 0.0;
    }
    if x >= highest {
        return 1.0;
    }
    let p = draws as f64 / total as f64;
    let ln_pmf = |k: u64| {
        ln_binomial_pmf(k, successes, p) + ln_binomial_pmf(draws - k, failures, p) - ln_binomial_pmf(draws, total, p)
    };
    let (n_f, k_f, d_f) = (total as f64, successes as f64, draws as f64);
    let mean = d_f * k_f / n_f;
    if (x as f64) < mean {
        // Downward from x: P(j - 1) / P(j) = j (N - K - n + j) / ((K - j + 1)(n - j + 1)).
        let (mut term, mut sum) = (1.0_f64, 1.0_f64);
        let mut j = x;
        while j > lowest {
            let jf = j as f64;
            term *= jf * (n_f - k_f - d_f + jf) / ((k_f - jf + 1.0) * (d_f - jf + 1.0));
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
            j -= 1;
        }
        (ln_pmf(x) + sum.ln()).exp().min(1.0)
    } else {
        // 1 - P(X >= x + 1), upward: P(j + 1) / P(j) = (K - j)(n - j) / ((j + 1)(N - K - n + j + 1)).
        let start = x + 1;
        let (mut term, mut sum) = (1.0_f64, 1.0_f64);
        let mut j = start;
        while j < highest {
            let jf = j as f64;
            term *= (k_f - jf) * (d_f - jf) / ((jf + 1.0) * (n_f - k_f - d_f + jf + 1.0));
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
            j += 1;
        }
        (1.0 - (ln_pmf(start) + sum.ln()).exp()).max(0.0)
    }
}

/// `P(X > x)` for X chi-square with `degrees_of_freedom` (positive, not
/// necessarily whole): the regularized upper incomplete gamma function
/// `Q(dof / 2, x / 2)`. 1 for `x <= 0`; NaN for a non-positive or NaN
/// `degrees_of_freedom` or a NaN `x`.
pub fn chi_square_sf(x: f64, degrees_of_freedom: f64) -> f64 {
    if x.is_nan() || degrees_of_freedom.is_nan() || degrees_of_freedom <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    regularized_gamma_q(0.5 * degrees_of_freedom, 0.5 * x)
}

/// The regularized upper incomplete gamma function `Q(a, x) = Γ(a, x) / Γ(a)`
/// for `a > 0`, `x >= 0`: by its power series for `P = 1 - Q` when
/// `x < a + 1` (where `Q` is not small, so the subtraction loses nothing),
/// and otherwise by its continued fraction evaluated with the modified Lentz
/// method (Press et al., Numerical Recipes, 3rd ed., §6.2), which keeps a
/// small `Q` to full relative accuracy.
fn regularized_gamma_q(a: f64, x: f64) -> f64 {
    const EPSILON: f64 = 1e-16;
    const TINY: f64 = 1e-300;
    const MAX_TERMS: usize = 100_000;
    if x == 0.0 {
        return 1.0;
    }
    if x.is_infinite() {
        return 0.0;
    }
    // ln(x^a e^-x / Γ(a)), the prefactor both expansions share.
    let ln_prefactor = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut denominator) = (1.0 / a, 1.0 / a, a);
        for _ in 0..MAX_TERMS {
            denominator += 1.0;
            term *= x / denominator;
            sum += term;
            if term.abs() < sum.abs() * EPSILON {
                break;
            }
        }
        (1.0 - sum * ln_prefactor.exp()).max(0.0)
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut fraction = d;
        for step in 1..MAX_TERMS {
            let stepf = step as f64;
            let an = -stepf * (stepf - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let change = d * c;
            fraction *= change;
            if (change - 1.0).abs() < EPSILON {
                break;
            }
        }
        (ln_prefactor.exp() * fraction).min(1.0)
    }
}

/// `ln Γ(x)` for `x > 0` by the Lanczos approximation (g = 7, nine
/// coefficients), relative error near `1e-15`; the reflection formula
/// carries it below 1/2.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let shifted = x - 1.0;
    let mut series = COEFFICIENTS[0];
    for (idx, &coefficient) in COEFFICIENTS.iter().enumerate().skip(1) {
        series += coefficient / (shifted + idx as f64);
    }
    let t = shifted + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (shifted + 0.5) * t.ln() - t + series.ln()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rand::Rng;

    const ALPHA: f64 = 0.05;

    fn close(actual: f64, expected: f64, relative: f64) -> bool {
        (actual - expected).abs() <= relative * expected.abs()
    }

    /// A standard normal draw by Box–Muller (the crate has no `rand_distr`).
    fn normal(rng: &mut StdRng) -> f64 {
        let u: f64 = 1.0 - rng.gen::<f64>();
        let v: f64 = rng.gen();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// `n` L2-normalized Gaussian embeddings of dimension `dim`, the first
    /// `n_shifted` coordinates' means moved by `shift` before normalizing.
    fn embeddings(rng: &mut StdRng, n: usize, dim: usize, n_shifted: usize, shift: f64) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                let raw: Vec<f64> =
                    (0..dim).map(|idx| normal(rng) + if idx < n_shifted { shift } else { 0.0 }).collect();
                let norm = raw.iter().map(|value| value * value).sum::<f64>().sqrt();
                raw.iter().map(|value| (value / norm) as f32).collect()
            })
            .collect()
    }

    /// The share of `runs` seeded draws in which `fires` says drift.
    fn rate(runs: usize, seed: u64, mut fires: impl FnMut(&mut StdRng, u64) -> bool) -> f64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let fired = (0..runs as u64).filter(|&run| fires(&mut rng, run)).count();
        fired as f64 / runs as f64
    }

    // --- Distribution functions -------------------------------------------

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        let mut ln_factorial = 0.0_f64;
        for n in 1..=30_u32 {
            // Γ(n + 1) = n!
            ln_factorial += f64::from(n).ln();
            assert!(close(ln_gamma(f64::from(n) + 1.0), ln_factorial, 1e-13), "n = {n}");
        }
        // Γ(1/2) = √π, Γ(3/2) = √π / 2.
        let ln_sqrt_pi = 0.5 * std::f64::consts::PI.ln();
        assert!((ln_gamma(0.5) - ln_sqrt_pi).abs() < 1e-14);
        assert!((ln_gamma(1.5) - (ln_sqrt_pi - 2.0_f64.ln())).abs() < 1e-14);
        assert!(ln_gamma(1.0).abs() < 1e-14 && ln_gamma(2.0).abs() < 1e-14);
    }

    #[test]
    fn chi_square_sf_matches_closed_forms_and_tables() {
        // Even degrees of freedom have a closed form:
        // Q(k, y) = e^-y Σ_{i<k} y^i / i!, with y = x / 2.
        for dof in [2_u32, 4, 10, 40] {
            for x in [0.1, 1.0, 3.0, 10.0, 37.5, 80.0, 300.0] {
                let y: f64 = 0.5 * x;
                let (mut term, mut sum) = (1.0_f64, 1.0_f64);
                for i in 1..dof / 2 {
                    term *= y / f64::from(i);
                    sum += term;
                }
                let expected = (-y).exp() * sum;
                let actual = chi_square_sf(x, f64::from(dof));
                assert!(close(actual, expected, 1e-12), "dof {dof}, x {x}: {actual:e} vs {expected:e}");
            }
        }
        // The 95th percentiles of published tables.
        for (dof, quantile) in [
            (1.0, 3.841_458_820_694_124),
            (3.0, 7.814_727_903_251_178),
            (5.0, 11.070_497_693_516_35),
            (100.0, 124.342_113_404_063_8),
        ] {
            let tail = chi_square_sf(quantile, dof);
            assert!((tail - 0.05).abs() < 1e-9, "dof {dof}: {tail}");
        }
        // One degree of freedom at x = 4: 2 (1 - Φ(2)) = 0.0455002638963584.
        assert!(close(chi_square_sf(4.0, 1.0), 0.045_500_263_896_358_4, 1e-12));
        // Three at x = 9: erfc(√4.5) + √(18/π) e^-4.5 = 0.02929088653488811.
        assert!(close(chi_square_sf(9.0, 3.0), 0.029_290_886_534_888_1, 1e-12));
        // Far tails keep relative accuracy: dof 2 at x = 1000 is e^-500.
        assert!(close(chi_square_sf(1000.0, 2.0), (-500.0_f64).exp(), 1e-12));
        assert_eq!(chi_square_sf(0.0, 3.0), 1.0);
        assert_eq!(chi_square_sf(-1.0, 3.0), 1.0);
        assert_eq!(chi_square_sf(f64::INFINITY, 3.0), 0.0);
        assert!(chi_square_sf(1.0, 0.0).is_nan());
        assert!(chi_square_sf(f64::NAN, 2.0).is_nan());
    }

    #[test]
    fn hypergeometric_cdf_matches_fishers_tea_tasting_and_direct_sums() {
        // Fisher's lady tasting tea: 8 cups, 4 with milk first, 4 chosen.
        // P(X <= 0) = 1/70, P(X <= 1) = 17/70, P(X <= 3) = 69/70.
        assert!(close(hypergeometric_cdf(0, 8, 4, 4), 1.0 / 70.0, 1e-12));
        assert!(close(hypergeometric_cdf(1, 8, 4, 4), 17.0 / 70.0, 1e-12));
        assert!(close(hypergeometric_cdf(3, 8, 4, 4), 69.0 / 70.0, 1e-12));
        assert_eq!(hypergeometric_cdf(4, 8, 4, 4), 1.0);
        // Against direct products of binomial coefficients on a larger table.
        let ln_choose =
            |n: u64, k: u64| ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0);
        let (total, successes, draws) = (500_u64, 320_u64, 200_u64);
        let mut running = 0.0;
        for x in 20..=200_u64 {
            running +=
                (ln_choose(successes, x) + ln_choose(total - successes, draws - x) - ln_choose(total, draws)).exp();
            let cdf = hypergeometric_cdf(x, total, successes, draws);
            assert!((cdf - running).abs() < 1e-11 * running.max(1e-3), "x = {x}: {cdf:e} vs {running:e}");
        }
        assert_eq!(hypergeometric_cdf(10, 500, 320, 200), 0.0);
        assert!(hypergeometric_cdf(1, 5, 6, 2).is_nan());
    }

    // --- Input drift -------------------------------------------------------

    #[test]
    fn energy_distance_matches_hand_computed_values() {
        // One dimension: X = {0, 2}, Y = {1}: 2 E|X - Y| = 2, E|X - X'| = 1, E|Y - Y'| = 0.
        let left = vec![vec![0.0_f32], vec![2.0]];
        let right = vec![vec![1.0_f32]];
        assert!((energy_distance(&left, &right) - 1.0).abs() < 1e-12);
        // Two points apart in the plane: X = {(0, 0)}, Y = {(3, 4)} gives 2 · 5.
        assert!((energy_distance(&[vec![0.0_f32, 0.0]], &[vec![3.0, 4.0]]) - 10.0).abs() < 1e-12);
        // Identical samples are at distance zero.
        let same = vec![vec![0.5_f32, 0.1], vec![-0.3, 0.7], vec![0.2, 0.2]];
        assert!(energy_distance(&same, &same).abs() < 1e-12);
        assert!(energy_distance::<Vec<f32>>(&[], &same).is_nan());
    }

    #[test]
    fn input_drift_validates_and_is_reproducible() {
        let mut rng = StdRng::seed_from_u64(1);
        let reference = embeddings(&mut rng, 40, 8, 0, 0.0);
        let recent = embeddings(&mut rng, 30, 8, 0, 0.0);
        let config = InputDriftConfig { n_permutations: 99, ..InputDriftConfig::default() };
        let first = input_drift(&reference, &recent, &config).unwrap();
        assert_eq!(first, input_drift(&reference, &recent, &config).unwrap());
        assert!((first.statistic - energy_distance(&reference, &recent)).abs() < 1e-12);
        assert_eq!((first.n_reference, first.n_recent), (40, 30));
        // p = (1 + k) / 100 for a whole k.
        let scaled = first.p_value * 100.0;
        assert!((scaled - scaled.round()).abs() < 1e-9 && first.p_value >= 0.01);
        // Slices work as well as vectors.
        let as_slices: Vec<&[f32]> = reference.iter().map(Vec::as_slice).collect();
        let recent_slices: Vec<&[f32]> = recent.iter().map(Vec::as_slice).collect();
        assert_eq!(input_drift(&as_slices, &recent_slices, &config).unwrap(), first);
        // The cap subsamples each side, seeded.
        let capped = InputDriftConfig { max_per_side: 16, ..config };
        let test = input_drift(&reference, &recent, &capped).unwrap();
        assert_eq!((test.n_reference, test.n_recent, test.n_reference_total, test.n_recent_total), (16, 16, 40, 30));
        assert_eq!(test, input_drift(&reference, &recent, &capped).unwrap());

        let empty: Vec<Vec<f32>> = Vec::new();
        assert_eq!(input_drift(&empty, &recent, &config), Err(ParameterError::EmptySample { sample: "reference" }));
        assert_eq!(input_drift(&reference, &empty, &config), Err(ParameterError::EmptySample { sample: "recent" }));
        let short = vec![vec![0.0_f32; 7]];
        assert_eq!(
            input_drift(&reference, &short, &config),
            Err(ParameterError::DimensionMismatch { expected: 8, found: 7 })
        );
        let mut broken = recent.clone();
        broken[3][2] = f32::NAN;
        assert_eq!(input_drift(&reference, &broken, &config), Err(ParameterError::NonFinite { sample: "recent" }));
        let no_permutations = InputDriftConfig { n_permutations: 0, ..config };
        assert!(matches!(input_drift(&reference, &recent, &no_permutations), Err(ParameterError::Permutations { .. })));
        let bad_alpha = InputDriftConfig { alpha: 0.0, ..config };
        assert_eq!(input_drift(&reference, &recent, &bad_alpha), Err(ParameterError::Alpha(0.0)));
    }

    /// The input test's rejection rate over `runs` seeded windows of 60 vs 50
    /// embeddings in 16 dimensions, with the first 3 coordinates' means moved
    /// by `shift` in the recent window, at 99 permutations.
    fn input_rejection_rate(runs: usize, shift: f64, seed: u64) -> f64 {
        rate(runs, seed, |rng, run| {
            let reference = embeddings(rng, 60, 16, 0, 0.0);
            let recent = embeddings(rng, 50, 16, 3, shift);
            let config = InputDriftConfig { n_permutations: 99, seed: run, ..InputDriftConfig::default() };
            input_drift(&reference, &recent, &config).unwrap().drifted
        })
    }

    #[test]
    fn simulation_input_drift_false_alarms_stay_at_alpha() {
        let observed = input_rejection_rate(300, 0.0, 21);
        eprintln!("input drift, same distribution: false alarms in {observed:.3} of 300 windows at alpha {ALPHA}");
        // 300 windows: the binomial standard error at 0.05 is 0.0126.
        assert!(observed <= 0.09, "{observed}");
    }

    #[test]
    fn simulation_input_drift_detects_a_mean_shift_in_three_dimensions() {
        let observed = input_rejection_rate(100, 0.6, 22);
        eprintln!("input drift, mean shift 0.6 in 3 of 16 dimensions: power {observed:.3} over 100 windows");
        assert!(observed >= 0.8, "{observed}");
    }

    // --- Answer drift ------------------------------------------------------

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|&(label, count)| (label.to_string(), count)).collect()
    }

    #[test]
    fn answer_drift_hand_computed_table() {
        // 30/70 against 50/50: expected 40 and 60 a row, chi-square
        // 2 (100/40 + 100/60) = 8.333..., one degree of freedom.
        let test = answer_drift(
            &counts(&[("a", 30), ("b", 70)]),
            &counts(&[("A ", 50), ("b", 50)]),
            &AnswerDriftConfig::default(),
        )
        .unwrap();
        assert!((test.chi_square - 25.0 / 3.0).abs() < 1e-12, "{}", test.chi_square);
        assert_eq!(test.degrees_of_freedom, 1);
        // 2 (1 - Φ(√(25/3))) = 0.003892417...
        assert!(close(test.p_value, chi_square_sf(25.0 / 3.0, 1.0), 1e-15));
        assert!((test.p_value - 0.003_892_417).abs() < 1e-8, "{}", test.p_value);
        assert!(test.shares_shifted && test.drifted && !test.new_label_fired);
        assert!(test.new_labels.is_empty() && test.pooled_labels.is_empty());
        assert!(test.reason().unwrap().contains("label shares shifted"));
    }

    #[test]
    fn answer_drift_pools_rare_labels_and_names_new_ones() {
        let training = counts(&[("billing", 500), ("shipping", 300), ("returns", 196), ("legal", 4)]);
        // "legal" and the new "fraud" are too rare to test apart; the new
        // "refund" is given 12 times.
        let recent =
            counts(&[("billing", 100), ("shipping", 60), ("returns", 27), ("legal", 1), ("Refund", 12), ("fraud", 2)]);
        let config = AnswerDriftConfig::default();
        let test = answer_drift(&training, &recent, &config).unwrap();
        assert_eq!((test.n_training, test.n_recent), (1000, 202));
        assert_eq!(
            test.new_labels,
            vec![
                NewLabel { label: "refund".into(), count: 12, share: 12.0 / 202.0 },
                NewLabel { label: "fraud".into(), count: 2, share: 2.0 / 202.0 },
            ]
        );
        assert!((test.new_share - 14.0 / 202.0).abs() < 1e-15);
        assert!(test.new_label_fired && test.drifted);
        // Expected counts in the smaller row: legal 202·5/1202 = 0.84, fraud
        // 0.34, refund 2.0: all three pooled, and the pool (3.2) is still
        // short of 5, so the rarest kept label, returns, joins it.
        assert_eq!(test.pooled_labels, vec!["fraud", "legal", "refund", "returns"]);
        assert_eq!(test.degrees_of_freedom, 2);
        assert!(test.reason().unwrap().contains("\"refund\" 12 times"), "{:?}", test.reason());
        // Below min_new the new label alone is not drift.
        let lenient = AnswerDriftConfig { min_new: 13, ..config };
        assert!(!answer_drift(&training, &recent, &lenient).unwrap().new_label_fired);
        // One label on both sides leaves nothing to test.
        let single = answer_drift(&counts(&[("yes", 10)]), &counts(&[("yes", 3)]), &config).unwrap();
        assert_eq!((single.degrees_of_freedom, single.p_value, single.drifted), (0, 1.0, false));
        assert_eq!(single.reason(), None);
        // label_counts normalizes as agreement does.
        assert_eq!(label_counts(["Yes", " yes ", "no"]), counts(&[("no", 1), ("yes", 2)]));
        assert_eq!(
            answer_drift(&BTreeMap::<String, u64>::new(), &recent, &config),
            Err(ParameterError::EmptySample { sample: "training" })
        );
        assert_eq!(
            answer_drift(&training, &counts(&[("a", 0)]), &config),
            Err(ParameterError::EmptySample { sample: "recent" })
        );
    }

    /// Draws `n` labels from `shares` (label, probability) into counts.
    fn draw_labels(rng: &mut StdRng, n: usize, shares: &[(&str, f64)]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let mut u: f64 = rng.gen();
            let mut chosen = shares[shares.len() - 1].0;
            for &(label, share) in shares {
                if u < share {
                    chosen = label;
                    break;
                }
                u -= share;
            }
            *out.entry(chosen.to_string()).or_insert(0) += 1;
        }
        out
    }

    /// Five labels and a rare tail (which a training set of 1000 often misses
    /// and the pooling must absorb).
    const LABELS: [(&str, f64); 7] = [
        ("billing", 0.38),
        ("shipping", 0.25),
        ("returns", 0.15),
        ("account", 0.12),
        ("other", 0.093),
        ("legal", 0.005),
        ("press", 0.002),
    ];

    fn answer_rejection_rate(runs: usize, seed: u64, recent_shares: &[(&str, f64)]) -> f64 {
        let config = AnswerDriftConfig::default();
        rate(runs, seed, |rng, _| {
            let training = draw_labels(rng, 1000, &LABELS);
            let recent = draw_labels(rng, 200, recent_shares);
            answer_drift(&training, &recent, &config).unwrap().drifted
        })
    }

    #[test]
    fn simulation_answer_drift_false_alarms_stay_at_alpha() {
        let observed = answer_rejection_rate(400, 31, &LABELS);
        eprintln!("answer drift, same label shares: false alarms in {observed:.3} of 400 windows at alpha {ALPHA}");
        // 400 windows: the binomial standard error at 0.05 is 0.011.
        assert!(observed <= 0.09, "{observed}");
    }

    #[test]
    fn simulation_answer_drift_detects_a_new_label_and_a_share_shift() {
        // A new label takes 10 % of the traffic, evenly from the others.
        let with_new: Vec<(&str, f64)> =
            LABELS.iter().map(|&(label, share)| (label, 0.9 * share)).chain([("refund", 0.1)]).collect();
        let new_label = answer_rejection_rate(200, 32, &with_new);
        // Billing and shipping trade 13 points of share (38 % and 25 % become
        // 25 % and 38 %), no new label.
        let mut shifted = LABELS;
        shifted[0].1 -= 0.13;
        shifted[1].1 += 0.13;
        let share_shift = answer_rejection_rate(200, 33, &shifted);
        eprintln!(
            "answer drift: power {new_label:.3} on a new label at 10 %, {share_shift:.3} on a 13-point share shift"
        );
        assert!(new_label >= 0.8, "{new_label}");
        assert!(share_shift >= 0.8, "{share_shift}");
    }

    // --- Confidence drift --------------------------------------------------

    #[test]
    fn ks_smaller_hand_computed_and_against_the_exact_distribution() {
        // Recent {1, 2} below reference {3, 4}: D+ = 1, p = exp(-2 · 1 · 1) = e^-2.
        let test = ks_smaller(&[3.0, 4.0], &[1.0, 2.0]);
        assert_eq!(test.statistic, 1.0);
        assert!(close(test.p_value, (-2.0_f64).exp(), 1e-15));
        // Recent above the reference: no evidence of a fall.
        let test = ks_smaller(&[1.0, 2.0], &[3.0, 4.0]);
        assert_eq!((test.statistic, test.p_value), (0.0, 1.0));
        // Ties: the distribution functions are read after every copy.
        assert_eq!(ks_smaller(&[1.0, 1.0, 2.0], &[1.0, 1.0, 2.0]).statistic, 0.0);
        assert!((ks_smaller(&[1.0, 2.0, 2.0, 2.0], &[1.0, 1.0, 2.0, 2.0]).statistic - 0.25).abs() < 1e-15);
        // NaN is the lowest value.
        assert_eq!(ks_smaller(&[0.5], &[f64::NAN]).statistic, 1.0);
        assert_eq!(ks_smaller(&[], &[1.0]).p_value, 1.0);
        // With n a side and no ties, P(D+ >= k/n) = C(2n, n - k) / C(2n, n)
        // exactly; Smirnov's limit is within 2 % of it near the 5 % level.
        let n = 100_u64;
        let reference: Vec<f64> = (0..n).map(|idx| idx as f64 + 0.5).collect();
        for k in [15_u64, 17, 20] {
            // Recent shifted down by k places gives D+ = k / n.
            let recent: Vec<f64> = (0..n).map(|idx| idx as f64 - k as f64 + 0.75).collect();
            let test = ks_smaller(&reference, &recent);
            assert!((test.statistic - k as f64 / n as f64).abs() < 1e-12);
            let exact = (ln_gamma(201.0) - ln_gamma((n - k + 1) as f64) - ln_gamma((n + k + 1) as f64))
                - (ln_gamma(201.0) - 2.0 * ln_gamma(101.0));
            assert!(close(test.p_value, exact.exp(), 0.02), "k = {k}: {} vs {}", test.p_value, exact.exp());
        }
    }

    #[test]
    fn confidence_drift_combines_its_tests_by_bonferroni() {
        let reference: Vec<f64> = (0..100).map(|idx| f64::from(idx) / 100.0).collect();
        let recent: Vec<f64> = (0..80).map(|idx| f64::from(idx) / 200.0).collect();
        let config = ConfidenceDriftConfig::default();
        let test = confidence_drift(&reference, &recent, Some(0.5), &config).unwrap();
        let coverage = test.coverage.unwrap();
        assert_eq!((coverage.n_reference_served, coverage.n_recent_served), (50, 0));
        assert_eq!((coverage.reference_coverage(), coverage.recent_coverage()), (0.5, 0.0));
        assert!(close(coverage.p_value, hypergeometric_cdf(0, 180, 50, 80), 1e-15));
        assert!(test.coverage_fell && test.confidence_fell && test.drifted);
        assert!(close(test.p_value, 2.0 * coverage.p_value.min(test.ks.p_value), 1e-15));
        let reason = test.reason().unwrap();
        assert!(reason.contains("fell from 50.0 % to 0.0 %") && reason.contains("KS"), "{reason}");
        // Without a threshold only the KS test runs, at the full alpha.
        let ks_only = confidence_drift(&reference, &recent, None, &config).unwrap();
        assert_eq!(ks_only.coverage, None);
        assert_eq!(ks_only.p_value, ks_only.ks.p_value);
        // A NaN confidence is never served.
        let nan = confidence_drift(&[0.9, 0.9], &[f64::NAN, 0.9], Some(0.5), &config).unwrap();
        assert_eq!(nan.coverage.unwrap().n_recent_served, 1);
        assert_eq!(
            confidence_drift(&[], &recent, None, &config),
            Err(ParameterError::EmptySample { sample: "reference" })
        );
        assert_eq!(
            confidence_drift(&reference, &[], None, &config),
            Err(ParameterError::EmptySample { sample: "recent" })
        );
        assert!(matches!(
            confidence_drift(&reference, &recent, Some(f64::NAN), &config),
            Err(ParameterError::Threshold(_))
        ));
        assert_eq!(
            confidence_drift(&reference, &recent, None, &ConfidenceDriftConfig { alpha: 1.5 }),
            Err(ParameterError::Alpha(1.5))
        );
    }

    /// A confidence `sigmoid(N(mean, 1))`, rounded to `step` when positive
    /// (a model that reports two decimals has ties).
    fn confidence(rng: &mut StdRng, mean: f64, step: f64) -> f64 {
        let value = 1.0 / (1.0 + (-(mean + normal(rng))).exp());
        if step > 0.0 {
            (value / step).round() * step
        } else {
            value
        }
    }

    /// The confidence signal's rejection rate over seeded windows of 300
    /// evaluation and 200 recent confidences, at serving threshold 0.8.
    fn confidence_rejection_rate(runs: usize, seed: u64, recent_mean: f64, step: f64) -> f64 {
        let config = ConfidenceDriftConfig::default();
        rate(runs, seed, |rng, _| {
            let reference: Vec<f64> = (0..300).map(|_| confidence(rng, 2.0, step)).collect();
            let recent: Vec<f64> = (0..200).map(|_| confidence(rng, recent_mean, step)).collect();
            confidence_drift(&reference, &recent, Some(0.8), &config).unwrap().drifted
        })
    }

    #[test]
    fn simulation_confidence_drift_false_alarms_stay_at_alpha() {
        let continuous = confidence_rejection_rate(400, 41, 2.0, 0.0);
        let rounded = confidence_rejection_rate(400, 42, 2.0, 0.01);
        eprintln!(
            "confidence drift, same distribution: false alarms in {continuous:.3} of 400 windows \
             ({rounded:.3} with confidences rounded to 0.01) at alpha {ALPHA}"
        );
        assert!(continuous <= 0.09, "{continuous}");
        assert!(rounded <= 0.09, "{rounded}");
    }

    #[test]
    fn simulation_confidence_drift_detects_lower_confidence() {
        // Logit mean 2.0 to 1.6: coverage at 0.8 falls from about 73 % to 58 %.
        let observed = confidence_rejection_rate(200, 43, 1.6, 0.0);
        eprintln!("confidence drift, logit mean 2.0 -> 1.6: power {observed:.3} over 200 windows");
        assert!(observed >= 0.8, "{observed}");
    }

    #[test]
    fn simulation_each_confidence_test_alone_holds_its_level() {
        // The coverage test and the KS test at the full alpha each, as a
        // caller reading their p-values directly would use them.
        let mut rng = StdRng::seed_from_u64(44);
        let runs = 400;
        let (mut coverage_alarms, mut ks_alarms) = (0, 0);
        for _ in 0..runs {
            let reference: Vec<f64> = (0..300).map(|_| confidence(&mut rng, 2.0, 0.0)).collect();
            let recent: Vec<f64> = (0..200).map(|_| confidence(&mut rng, 2.0, 0.0)).collect();
            let test = confidence_drift(&reference, &recent, Some(0.8), &ConfidenceDriftConfig::default()).unwrap();
            coverage_alarms += usize::from(test.coverage.unwrap().p_value <= ALPHA);
            ks_alarms += usize::from(test.ks.p_value <= ALPHA);
        }
        let (coverage_rate, ks_rate) = (coverage_alarms as f64 / runs as f64, ks_alarms as f64 / runs as f64);
        eprintln!(
            "at alpha {ALPHA} alone: Fisher coverage test {coverage_rate:.3}, one-sided KS {ks_rate:.3} of {runs}"
        );
        assert!(coverage_rate <= 0.09, "{coverage_rate}");
        assert!(ks_rate <= 0.09, "{ks_rate}");
    }

    // --- The report --------------------------------------------------------

    #[test]
    fn the_report_names_what_fired() {
        let mut report = DriftReport::default();
        assert!(!report.drifted() && report.fired().is_empty() && report.reasons().is_empty());
        assert_eq!(report.false_alarm_bound(), 0.0);
        let reference: Vec<f64> = (0..100).map(|idx| f64::from(idx) / 100.0).collect();
        let lower: Vec<f64> = reference.iter().map(|value| value * 0.5).collect();
        report.confidence =
            Some(confidence_drift(&reference, &lower, Some(0.7), &ConfidenceDriftConfig::default()).unwrap());
        report.answers = Some(
            answer_drift(
                &counts(&[("a", 50), ("b", 50)]),
                &counts(&[("a", 52), ("b", 48)]),
                &AnswerDriftConfig::default(),
            )
            .unwrap(),
        );
        assert_eq!(report.fired(), vec![DriftSignal::Confidence]);
        assert!(report.drifted());
        let reasons = report.reasons();
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].starts_with("confidence drift"), "{reasons:?}");
        assert!((report.false_alarm_bound() - 0.10).abs() < 1e-15);
        assert_eq!(DriftSignal::Answers.name(), "answers");
    }
}
