//! Transformer and vision ops, each with forward and backward side by side and a naive `f64` reference.
//!
//! Legend: N = rows (tokens), C = channels, V = vocabulary, B = batch, T = sequence length,
//! Hq / Hkv = query / key-value heads, D = head dim. Backward functions accumulate (`+=`).

pub mod adamw;
pub mod attention;
pub mod boxes;
pub mod conv;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod interp;
pub mod norm;
pub mod pool;
pub mod rope;
pub mod slice;
pub mod winograd;
