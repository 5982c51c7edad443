//! The CUDA backend: the `.cu` kernels' sources, their compilation, and [`CudaDevice`], one
//! module per `.cu` file.
//!
//! The `.cu` files in `lora-kernels/cuda/` are embedded in the binary and compiled by NVRTC for
//! the device's compute capability at first use (through cudarc, which loads `libnvrtc` and
//! `libcuda` at run time, so nothing CUDA is needed to build). Every kernel is the twin of a CPU
//! kernel in this crate: same name, outputs first, same argument order.
//!
//! Status: the sources, their NVRTC compilation (tested for sm_80 and sm_90 wherever libnvrtc
//! is found, GPU or not), driver detection, [`CudaDevice`] (the fused LoRA linear, attention,
//! launch helpers, and the device backend [`crate::accel::Accel`] in `cuda_accel.rs`, which the
//! training step runs on) and GPU parity tests exist; none has run on a GPU yet.
//!
//! - `sources`: the embedded sources and their kernels; `compile`: NVRTC and the PTX cache;
//! - `device`: opening a device, memory, the stream, TF32; `launch`: the one launch shape;
//! - `gemm`: the cuBLAS base products; `lora`, `attention`, `elementwise`, `rows`, `conv`: the
//!   methods that launch the kernels of `lora.cu`, `attention.cu`, `elementwise.cu`, `rows.cu`,
//!   `conv.cu`.
//!
//! Every failure is a [`KernelError::Device`] naming the step.

mod attention;
mod boxes;
mod compile;
mod conv;
mod device;
mod elementwise;
mod gemm;
mod launch;
mod lora;
mod pool;
mod rows;
mod sources;

pub use attention::ATTN_MAX_HEAD_DIM;
pub use compile::{
    compile_ptx, compile_ptx_cached, nvrtc_available, ptx_cache_dir, CompileFailure,
};
pub use device::{device_count, driver_available};
pub use lora::{lora_split, LoraDims, LoraGrads};
pub use sources::{Source, PRELUDE, SOURCES};

use crate::error::{KernelError, Result};
use crate::operands::WeightLayout;
use crate::ops::attention::AttnDims;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use launch::{blocks, grid, THREADS};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

fn cerr<E: fmt::Debug>(what: &'static str) -> impl Fn(E) -> KernelError {
    move |e| KernelError::Device(format!("{what}: {e:?}"))
}

/// A device with every kernel compiled for its compute capability, a stream and cuBLAS.
pub struct CudaDevice {
    /// The context.
    pub ctx: Arc<CudaContext>,
    /// The stream all work is queued on.
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// `sm_XY` the kernels were compiled for.
    pub arch: &'static str,
    /// Fill every output buffer with NaN before the kernels write it, so an element a kernel
    /// fails to write shows up (parity tests turn this on; off by default).
    pub poison: bool,
    /// Streaming multiprocessors: the rank-r kernels split their reductions so a small layer
    /// still gives every SM work ([`lora_split`]).
    pub sms: usize,
    tf32: std::sync::atomic::AtomicBool,
}
