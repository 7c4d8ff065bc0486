//! candle model files for Understudy, and loading them from HF directories
//! and GGUF files.
//!
//! Each model file has the same shape: a `//!` header, a `Config` mirroring
//! HF `config.json`, private blocks, and a public `Model` with `new(cfg, vb)`
//! and `forward`. Model code meant for training uses only ops that have a
//! backward pass: candle's basic ops, or the fused ones in [`ops`] and
//! [`attention`] (candle-nn's fused norms, softmax and rope have none).

pub mod attention;
pub mod bert;
pub mod causal_lm;
pub mod chat;
pub mod dropout;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod ops;
pub mod peft;

pub use hf::{HfDir, LoadError};
