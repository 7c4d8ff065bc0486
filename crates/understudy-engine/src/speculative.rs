//! Copy-aware speculative decoding by prompt lookup (Saxena 2023, "Prompt
//! Lookup Decoding"; Yang et al. 2023, "Inference with Reference").
//!
//! Extraction answers are mostly copied from their prompt: a phone number,
//! a name, a date, the field names the instruction listed. Instead of a
//! draft model, the draft is what followed the latest earlier occurrence of
//! the sequence's own last tokens in its prompt and output. The scheduler
//! decodes the sequence's next token and the draft in one step with logits
//! at every position, keeps the longest prefix of the draft that greedy
//! decoding would have chosen (plus the model's own token after it), and
//! removes the rest from the KV cache. Only greedy requests speculate: the
//! accepted tokens are exactly those one-at-a-time greedy decoding gives.
//!
//! On a CPU a decode step of a few tokens costs more than a step of one
//! (the weights are read once, but each token adds compute: on 2 cores a
//! step of 2 tokens took 1.5 times one of 1, a step of 9 tokens 3.2 times),
//! so a draft that is rejected is not free. A draft is never longer than
//! the match that found it, and [`DraftLength`] shrinks a sequence's drafts
//! while they fail and grows them again while they are accepted.

use std::sync::atomic::{AtomicU64, Ordering};

use llama_cpp_2::token::LlamaToken;

/// How many trailing tokens a match is scored on at most: enough to tell
/// `"phone": "` after one field from the same text after another.
const MAX_MATCH: usize = 8;

/// The draft for the sequence `history` (its prompt and the tokens
/// generated so far, the last one not yet decoded): the tokens that followed
/// the earlier occurrence of `history`'s last tokens that matches the most
/// of them (at least the last token; the latest such occurrence on ties),
/// no more than `max_len` and no more than the match is long. A copy is
/// trusted as far as the evidence for it goes: a one-token match drafts one
/// token, which costs little when it is wrong. Empty when the last token
/// never occurred before.
pub fn prompt_lookup(history: &[LlamaToken], max_len: usize) -> &[LlamaToken] {
    let len = history.len();
    if len < 2 || max_len == 0 {
        return &[];
    }
    let last = history[len - 1];
    let mut best: Option<(usize, usize)> = None;
    // `end` is where an earlier occurrence ends (the index of its last token).
    for end in (0..len - 1).rev() {
        if history[end] != last {
            continue;
        }
        let mut matched = 1;
        while matched < MAX_MATCH && matched <= end && history[end - matched] == history[len - 1 - matched] {
            matched += 1;
        }
        if best.is_none_or(|(_, best_matched)| matched > best_matched) {
            best = Some((end, matched));
            if matched == MAX_MATCH {
                break;
            }
        }
    }
    match best {
        Some((end, matched)) => &history[end + 1..(end + 1 + max_len.min(matched)).min(len)],
        None => &[],
    }
}

/// A sequence's current draft length, between 1 and the configured maximum:
/// doubled after a draft is accepted whole, cut to one more than what was
/// accepted after a draft is rejected part-way.
#[derive(Debug, Clone, Copy)]
pub struct DraftLength {
    max: usize,
    current: usize,
}

impl DraftLength {
    /// Starts at the maximum: the first tokens of an extraction answer are
    /// the likeliest to be copied whole.
    pub fn new(max: usize) -> DraftLength {
        DraftLength { max, current: max }
    }

    pub fn get(&self) -> usize {
        self.current
    }

    /// Records a verification of `drafted` tokens of which `accepted` were kept.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 || self.max == 0 {
            return;
        }
        self.current = if accepted == drafted { (drafted * 2).min(self.max) } else { accepted + 1 }.clamp(1, self.max);
    }
}

/// Counts of the engine's speculation since it was loaded, shared between
/// the scheduler thread and whoever reads them.
#[derive(Debug, Default)]
pub struct SpeculationCounters {
    steps: AtomicU64,
    drafted: AtomicU64,
    accepted: AtomicU64,
}

/// A reading of [`SpeculationCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Decode steps in which a sequence verified a draft.
    pub steps: u64,
    /// Draft tokens decoded.
    pub drafted: u64,
    /// Draft tokens kept (greedy decoding would have chosen them).
    pub accepted: u64,
}

impl SpeculationCounters {
    pub fn record(&self, drafted: usize, accepted: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.drafted.fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
    }

    pub fn read(&self) -> SpeculationStats {
        SpeculationStats {
            steps: self.steps.load(Ordering::Relaxed),
            drafted: self.drafted.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().map(|&id| LlamaToken(id)).collect()
    }

    fn ids(tokens: &[LlamaToken]) -> Vec<i32> {
        tokens.iter().map(|token| token.0).collect()
    }

    #[test]
    fn the_longest_earlier_match_gives_the_draft() {
        // `7 8 9` occurs twice; `5 7 8 9` only once, followed by 1 2 3.
        let history = tokens(&[5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 9, 4, 4, 0, 5, 7, 8, 9]);
        assert_eq!(ids(prompt_lookup(&history, 3)), vec![1, 2, 3]);
        // No longer than the match (4 tokens) however long a draft may be.
        assert_eq!(ids(prompt_lookup(&history, 8)), vec![1, 2, 3, 6]);
        // The draft stops at the end of what is known.
        let history = tokens(&[1, 2, 3, 1, 2, 3, 1, 2]);
        assert_eq!(ids(prompt_lookup(&history, 8)), vec![3, 1, 2]);
    }

    #[test]
    fn ties_go_to_the_latest_occurrence_and_unknown_tokens_draft_nothing() {
        let history = tokens(&[9, 1, 9, 2, 9]);
        assert_eq!(ids(prompt_lookup(&history, 1)), vec![2]);
        assert!(prompt_lookup(&tokens(&[1, 2, 3]), 4).is_empty());
        assert!(prompt_lookup(&tokens(&[1, 1]), 0).is_empty());
        assert!(prompt_lookup(&tokens(&[1]), 4).is_empty());
    }

    #[test]
    fn draft_length_shrinks_on_rejection_and_grows_on_acceptance() {
        let mut length = DraftLength::new(8);
        assert_eq!(length.get(), 8);
        length.update(8, 0);
        assert_eq!(length.get(), 1);
        length.update(1, 1);
        assert_eq!(length.get(), 2);
        length.update(2, 2);
        length.update(4, 4);
        length.update(8, 8);
        assert_eq!(length.get(), 8);
        length.update(8, 3);
        assert_eq!(length.get(), 4);
        // A step without a draft leaves it alone.
        length.update(0, 0);
        assert_eq!(length.get(), 4);
    }
}
