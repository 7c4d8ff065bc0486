//! Inverted dropout with its own seeded generator, shared by the BERT
//! encoder and the LoRA layers of `llama`: candle's CPU device cannot be
//! seeded, and a training run must be reproducible (a resumed run repeats
//! the uninterrupted one).

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Inverted dropout drawing from a generator seeded by the caller.
#[derive(Debug, Clone)]
pub struct Dropout {
    rng: StdRng,
}

impl Dropout {
    pub fn new(seed: u64) -> Dropout {
        Dropout { rng: StdRng::seed_from_u64(seed) }
    }

    /// Zeroes each element with probability `p` and scales the rest by 1/(1-p).
    pub fn apply(&mut self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Some(mask) = self.mask(xs.elem_count(), p) else { return Ok(xs.clone()) };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }

    /// The multiplier [`Dropout::apply`] would use for `n` values: 0 or
    /// 1/(1-p) each; `None` when `p` is 0.
    pub fn mask(&mut self, n: usize, p: f64) -> Option<Vec<f32>> {
        if p <= 0.0 {
            return None;
        }
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        Some((0..n).map(|_| if self.rng.gen::<f64>() < keep { scale } else { 0.0 }).collect())
    }
}
