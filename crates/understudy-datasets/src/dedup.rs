//! Near-duplicate detection: MinHash signatures over word shingles, with LSH
//! banding to find candidate pairs and an exact Jaccard check to confirm them.
//!
//! Everything here is deterministic (fixed hash functions and seeds): which
//! rows survive de-duplication decides a dataset's content hash, so the same
//! input must give the same survivors on every machine and every run.

use std::collections::{HashMap, HashSet};

/// Hash functions in a signature. 128 keeps the estimate within a few
/// hundredths of the true Jaccard, and is divisible into many band shapes.
pub const N_HASHES: usize = 128;

/// Words per shingle. Pairs of words keep some word order, and one changed
/// word in a 40-word prompt still leaves a Jaccard above 0.9.
pub const SHINGLE_WORDS: usize = 2;

/// How near-duplicates are found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NearDupConfig {
    /// Rows at least this similar (Jaccard of their shingle sets) are
    /// near-duplicates. 1.0 or more turns near-duplicate removal off.
    pub threshold: f64,
    pub shingle_words: usize,
}

impl Default for NearDupConfig {
    fn default() -> Self {
        NearDupConfig { threshold: 0.9, shingle_words: SHINGLE_WORDS }
    }
}

/// The set of hashed word shingles of a text, lowercased.
pub fn shingles(text: &str, shingle_words: usize) -> HashSet<u64> {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    let shingle_words = shingle_words.max(1);
    let mut set = HashSet::new();
    if words.is_empty() {
        return set;
    }
    if words.len() <= shingle_words {
        set.insert(fnv1a(&words.join(" ")));
        return set;
    }
    for window in words.windows(shingle_words) {
        set.insert(fnv1a(&window.join(" ")));
    }
    set
}

/// The MinHash signature of a shingle set: for each of [`N_HASHES`] hash
/// functions, the smallest hash any shingle takes.
pub fn signature(shingles: &HashSet<u64>) -> [u64; N_HASHES] {
    let mut signature = [u64::MAX; N_HASHES];
    for &shingle in shingles {
        for (hash_idx, slot) in signature.iter_mut().enumerate() {
            let hash = splitmix64(shingle ^ seed(hash_idx));
            if hash < *slot {
                *slot = hash;
            }
        }
    }
    signature
}

/// The exact Jaccard similarity of two shingle sets (1.0 for two empty sets).
pub fn jaccard(left: &HashSet<u64>, right: &HashSet<u64>) -> f64 {
    if left.is_empty() && right.is_empty() {
        return 1.0;
    }
    let n_shared = left.intersection(right).count();
    let n_union = left.len() + right.len() - n_shared;
    n_shared as f64 / n_union as f64
}

/// The band shape (number of bands, rows per band) for a threshold.
///
/// Two rows become candidates when all rows of some band agree, which for
/// Jaccard `s` happens with probability `1 - (1 - s^r)^b`. We take the most
/// selective shape (largest `r`, fewest false candidates to check) that still
/// makes a pair right at the threshold a candidate with probability 0.999;
/// pairs above it are found even more surely.
pub fn band_shape(threshold: f64) -> (usize, usize) {
    let threshold = threshold.clamp(0.0, 1.0);
    let mut best = (N_HASHES, 1);
    for rows_per_band in [1, 2, 4, 8, 16, 32] {
        let n_bands = N_HASHES / rows_per_band;
        let candidate_probability = 1.0 - (1.0 - threshold.powi(rows_per_band as i32)).powi(n_bands as i32);
        if candidate_probability >= 0.999 {
            best = (n_bands, rows_per_band);
        }
    }
    best
}

/// Finds near-duplicates among texts given newest first.
///
/// Returns, for each text, whether it is kept. A text is dropped when it is
/// at least `threshold` similar to a text kept before it, so of each group of
/// near-duplicates the newest survives.
pub fn keep_distinct(texts_newest_first: &[String], config: NearDupConfig) -> Vec<bool> {
    if config.threshold >= 1.0 {
        return vec![true; texts_newest_first.len()];
    }
    let (n_bands, rows_per_band) = band_shape(config.threshold);
    let mut kept_shingles: Vec<HashSet<u64>> = Vec::new();
    // Band key (band index, hash of that band's rows) → indexes into `kept_shingles`.
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    let mut keep = Vec::with_capacity(texts_newest_first.len());
    for text in texts_newest_first {
        let shingle_set = shingles(text, config.shingle_words);
        let signature = signature(&shingle_set);
        let band_keys: Vec<(usize, u64)> = (0..n_bands)
            .map(|band_idx| {
                let band = &signature[band_idx * rows_per_band..(band_idx + 1) * rows_per_band];
                (band_idx, band.iter().fold(0xcbf2_9ce4_8422_2325, |acc, &value| splitmix64(acc ^ value)))
            })
            .collect();
        let mut checked = HashSet::new();
        let is_near_duplicate = band_keys.iter().filter_map(|key| buckets.get(key)).flatten().any(|&kept_idx| {
            checked.insert(kept_idx) && jaccard(&shingle_set, &kept_shingles[kept_idx]) >= config.threshold
        });
        if is_near_duplicate {
            keep.push(false);
            continue;
        }
        let kept_idx = kept_shingles.len();
        kept_shingles.push(shingle_set);
        for key in band_keys {
            buckets.entry(key).or_default().push(kept_idx);
        }
        keep.push(true);
    }
    keep
}

/// 64-bit FNV-1a: a small, fixed hash (std's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finalizer: mixes every input bit into every output bit, which
/// makes `splitmix64(x ^ seed)` a fine family of independent-looking hashes.
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed(hash_idx: usize) -> u64 {
    splitmix64(0x5eed_0000 + hash_idx as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICKET: &str = "Hello team, since this morning the export button on the billing page does nothing when I \
        click it, no file is downloaded and no error is shown. I tried two browsers and cleared the cache. Our \
        accountant needs the invoices for last quarter by Friday, can you please look into this soon?";

    #[test]
    fn the_signature_estimates_jaccard() {
        let left = shingles(TICKET, SHINGLE_WORDS);
        let right = shingles(&TICKET.replace("two browsers", "three browsers"), SHINGLE_WORDS);
        let exact = jaccard(&left, &right);
        let (left_signature, right_signature) = (signature(&left), signature(&right));
        let n_agreeing = left_signature.iter().zip(right_signature.iter()).filter(|(l, r)| l == r).count();
        let estimate = n_agreeing as f64 / N_HASHES as f64;
        assert!(exact > 0.9 && exact < 1.0, "{exact}");
        assert!((estimate - exact).abs() < 0.1, "estimate {estimate} vs exact {exact}");
    }

    #[test]
    fn band_shapes_get_more_selective_as_the_threshold_rises() {
        assert_eq!(band_shape(0.9), (16, 8));
        assert_eq!(band_shape(0.5), (64, 2));
        assert_eq!(band_shape(0.1), (128, 1));
    }

    #[test]
    fn one_changed_word_is_a_near_duplicate_and_different_texts_are_not() {
        let texts = vec![
            TICKET.replace("Friday", "Monday"),
            TICKET.to_string(),
            "Who wrote Hamlet?".to_string(),
            "Who wrote Macbeth?".to_string(),
            "What is the boiling point of water at sea level in degrees Celsius?".to_string(),
        ];
        let keep = keep_distinct(&texts, NearDupConfig::default());
        assert_eq!(keep, vec![true, false, true, true, true]);
        let off = keep_distinct(&texts, NearDupConfig { threshold: 1.0, ..NearDupConfig::default() });
        assert!(off.iter().all(|kept| *kept));
    }

    #[test]
    fn a_lower_threshold_removes_more() {
        let texts = vec!["who wrote the play hamlet".to_string(), "who wrote the play macbeth".to_string()];
        assert_eq!(keep_distinct(&texts, NearDupConfig::default()), vec![true, true]);
        let loose = NearDupConfig { threshold: 0.5, ..NearDupConfig::default() };
        assert_eq!(keep_distinct(&texts, loose), vec![true, false]);
    }
}
