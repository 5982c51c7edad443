//! Compute kernels for lora-rs.
//!
//! This crate knows nothing of tensors or models: every kernel works on plain `f32` slices (or,
//! for the CUDA twins in [`cuda`], device buffers) plus the dimensions that give them shape, so
//! the tensor layer (`lora-core`) drives both with one argument convention through the device
//! backend [`accel::Accel`]. Dimension legend used throughout:
//!
//! ```text
//! N = tokens (batch * sequence), K = in features, M = out features, R = LoRA rank,
//! C = channels, V = vocabulary, B = batch, T = sequence length, H = heads, D = head dim
//! ```
//!
//! Conventions (after llm.c): forward is `(outputs, inputs and weights, dims)`; backward is
//! `(gradients written, dout, what forward saved, ...)`, and backward *accumulates* (`+=`) into
//! every gradient it writes, so gradient accumulation and residual fan-in are free. Every op keeps
//! a naive `reference` implementation (in `f64`) beside the fast one; the tests use it as the
//! oracle.

#![warn(missing_docs)]

pub mod accel;
pub mod assign;
pub mod buffers;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_accel;
#[cfg(feature = "cuda")]
pub mod cuda_libs;
pub mod error;
pub mod fastmath;
pub mod gemm;
pub mod gemm_bf16;
pub mod linalg;
pub mod lora_linear;
pub mod mixed;
pub mod operands;
pub mod ops;
mod par;
pub mod peak;
pub mod rng;
mod simd;
pub mod workload;

pub use error::{KernelError, Result};
