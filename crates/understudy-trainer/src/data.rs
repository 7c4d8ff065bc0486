//! Tokenized examples, length-bucketed shuffling and per-batch padding.

use candle_core::{Device, Result as CandleResult, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokenizers::Tokenizer;

use crate::TrainError;

/// One tokenized text (with its special tokens); its attention mask is all ones.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

pub(crate) fn encode(tokenizer: &Tokenizer, texts: &[&str]) -> Result<Vec<Encoded>, TrainError> {
    let encodings =
        tokenizer.encode_batch(texts.to_vec(), true).map_err(|error| TrainError::Tokenizer(error.to_string()))?;
    Ok(encodings
        .into_iter()
        .map(|encoding| Encoded { ids: encoding.get_ids().to_vec(), type_ids: encoding.get_type_ids().to_vec() })
        .collect())
}

/// A padded batch: `[batch, longest]` ids, type ids and attention mask.
pub(crate) struct Batch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub mask: Tensor,
}

/// Pads the rows to the batch's own longest row (pad id 0, mask 0).
pub(crate) fn make_batch(rows: &[&Encoded], pad_id: u32, device: &Device) -> CandleResult<Batch> {
    let longest = rows.iter().map(|row| row.ids.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * longest);
    let mut type_ids = Vec::with_capacity(rows.len() * longest);
    let mut mask = Vec::with_capacity(rows.len() * longest);
    for row in rows {
        let pad = longest - row.ids.len();
        ids.extend_from_slice(&row.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        type_ids.extend_from_slice(&row.type_ids);
        type_ids.extend(std::iter::repeat_n(0u32, pad));
        mask.extend(std::iter::repeat_n(1f32, row.ids.len()));
        mask.extend(std::iter::repeat_n(0f32, pad));
    }
    let shape = (rows.len(), longest);
    Ok(Batch {
        ids: Tensor::from_vec(ids, shape, device)?,
        type_ids: Tensor::from_vec(type_ids, shape, device)?,
        mask: Tensor::from_vec(mask, shape, device)?,
    })
}

/// The batches of one epoch, as indices into the training rows: a shuffle
/// seeded by `seed` and `epoch` alone (so a resumed run sees the same order),
/// then rows of similar length grouped into batches within pools of 50
/// batches (less padding), then the batches shuffled.
pub(crate) fn epoch_batches(lengths: &[usize], batch_size: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(mix(seed, epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let batch_size = batch_size.max(1);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&index| lengths[index]);
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Indices in order of length, chunked: for evaluation, where order is free.
pub(crate) fn sorted_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&index| lengths[index]);
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

/// Mixes two numbers into a seed (splitmix64).
pub(crate) fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_depends_on_seed_and_epoch_only() {
        let lengths: Vec<usize> = (0..200).map(|i| i % 17).collect();
        let a = epoch_batches(&lengths, 8, 7, 1);
        assert_eq!(a, epoch_batches(&lengths, 8, 7, 1));
        assert_ne!(a, epoch_batches(&lengths, 8, 7, 2));
        let mut all: Vec<usize> = a.concat();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
    }
}
