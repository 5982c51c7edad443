//! lora-core: tensors, a tape-based reverse-mode autograd, and LoRA layers.
//!
//! Embeddable on its own: it depends only on `lora-kernels` and `thiserror` (no CLI, tokenizer
//! or plotting). The pieces:
//! - [`Tensor`]: contiguous row-major f32 data with a shape, on a [`Device`];
//! - [`Tape`]: records ops as they run; [`Tape::backward`] walks them in reverse and returns
//!   [`Gradients`] for the tensors that require them, and for no others;
//! - [`ops`]: the differentiable ops (one fused LoRA linear op, the transformer ops);
//! - [`lora`]: [`LoraConfig`] and [`LoraLinear`] (init, scale, dropout, merge/unmerge);
//! - [`device`]: the host or a CUDA GPU. [`Tensor::to_device`] moves values into device memory
//!   (in place); every op then runs the device's kernels and the tape's backward stays there;
//!   [`update`] runs the AdamW update where the parameter lives.
//!
//! ```
//! use lora_core::{LoraConfig, LoraLinear, Tape, Tensor, ops};
//! use lora_core::lora::WeightLayout;
//! # fn main() -> lora_core::Result<()> {
//! let w = Tensor::new(vec![0.1; 4 * 3], &[4, 3])?;              // frozen (out=4, in=3)
//! let layer = LoraLinear::new(w, WeightLayout::OutIn, None, &LoraConfig::default(), 0)?;
//! let x = Tensor::new(vec![1.0; 2 * 3], &[2, 3])?;
//! let tape = Tape::new(42);
//! let y = layer.forward(&tape, &x)?;                             // (2, 4)
//! let loss = ops::cross_entropy(&tape, &y, &[1, -100])?;
//! let grads = tape.backward(&loss)?;
//! assert!(grads.get(&layer.lora_a).is_some() && grads.get(&layer.weight).is_none());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod autograd;
pub mod device;
pub mod diffusion;
pub mod error;
/// Small dense `f64` linear algebra (QR, Jacobi SVD) from `lora-kernels`, for the adapter tools.
pub use lora_kernels::linalg;
pub use lora_kernels::rng;
pub mod lora;
pub mod lora_conv;
pub mod models;
pub mod ops;
pub mod tensor;
pub mod update;

pub use autograd::{Gradients, Tape};
pub use device::Device;
pub use error::{CoreError, Result};
pub use lora::{LoraConfig, LoraInit, LoraLinear};
pub use lora_conv::LoraConv2d;
pub use tensor::{ExternalF32, ExternalHalf, HalfFormat, HostData, HostDataMut, Tensor};
