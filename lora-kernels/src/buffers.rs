//! Where a tensor's values live: the storage types every backend ([`crate::accel::Accel`])
//! computes on. One enum for f32 values ([`DBuf`]) and one for 16-bit frozen weights
//! ([`DBits`]), each with its CPU forms (owned, or borrowed from a memory map without a copy)
//! and its CUDA form.

use std::sync::Arc;

/// A 16-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfFormat {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

/// Read-only f32 data owned elsewhere (a memory map, a buffer shared with another engine).
pub trait ExternalF32: Send + Sync {
    /// The values; must be the same slice on every call.
    fn as_f32(&self) -> &[f32];
}

/// 16-bit float bits owned elsewhere (a memory-mapped bf16 or f16 checkpoint tensor).
pub trait ExternalHalf: Send + Sync {
    /// The raw bit patterns; must be the same slice on every call.
    fn bits(&self) -> &[u16];
    /// How to read them.
    fn format(&self) -> HalfFormat;
}

/// f32 values in a backend's memory.
pub enum DBuf {
    /// Host memory, owned.
    Host(Vec<f32>),
    /// Host memory owned elsewhere (memory-mapped), read-only: [`DBuf::host_mut`] copies it
    /// into an owned buffer first.
    Mapped(Arc<dyn ExternalF32>),
    /// CUDA device memory.
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

impl DBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            DBuf::Host(v) => v.len(),
            DBuf::Mapped(e) => e.as_f32().len(),
            #[cfg(feature = "cuda")]
            DBuf::Cuda(s) => s.len(),
        }
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values, when they are in host memory.
    pub fn host(&self) -> Option<&[f32]> {
        match self {
            DBuf::Host(v) => Some(v),
            DBuf::Mapped(e) => Some(e.as_f32()),
            #[cfg(feature = "cuda")]
            DBuf::Cuda(_) => None,
        }
    }
    /// The values for writing, when they are in host memory (mapped values are copied into
    /// an owned buffer first: copy on write).
    pub fn host_mut(&mut self) -> Option<&mut [f32]> {
        if let DBuf::Mapped(e) = self {
            *self = DBuf::Host(e.as_f32().to_vec());
        }
        match self {
            DBuf::Host(v) => Some(v),
            _ => None,
        }
    }
}

/// 16-bit float bits (bf16 or f16) in a backend's memory: a frozen weight kept as stored.
pub enum DBits {
    /// Host memory, owned.
    Host(Vec<u16>),
    /// Host memory owned elsewhere (memory-mapped).
    Mapped(Arc<dyn ExternalHalf>),
    /// CUDA device memory.
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<u16>),
}

impl DBits {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            DBits::Host(v) => v.len(),
            DBits::Mapped(e) => e.bits().len(),
            #[cfg(feature = "cuda")]
            DBits::Cuda(s) => s.len(),
        }
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bits, when they are in host memory.
    pub fn host(&self) -> Option<&[u16]> {
        match self {
            DBits::Host(v) => Some(v),
            DBits::Mapped(e) => Some(e.bits()),
            #[cfg(feature = "cuda")]
            DBits::Cuda(_) => None,
        }
    }
}

/// Hands the heap's free pages back to the operating system (glibc's `malloc_trim`; a no-op
/// elsewhere). glibc keeps the pages of large buffers freed amid long-lived ones: without it,
/// a model whose f32 weights were just replaced by their bf16 packings would keep the f32
/// weights' memory as well.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A linear layer's base weight as the products read it: f32, or 16-bit as stored (widened
/// inside the products, never as a whole on the CPU).
#[derive(Clone, Copy)]
pub enum DWeight<'a> {
    /// f32 values.
    F32(&'a DBuf),
    /// 16-bit bits and their format.
    Half(&'a DBits, HalfFormat),
    /// Packed once for the CPU's bf16 products (`--precision bf16`): a host form only.
    PackedBf16(&'a crate::gemm_bf16::PackedWeight),
    /// A packing for the bf16 products kept beside the weight's own f32 values (a head tied
    /// to the token embedding): the fused head's input gradient multiplies the f32 values, so
    /// the packing is never given its backward layout; other products read the packing.
    PackedBeside(&'a crate::gemm_bf16::PackedWeight, &'a DBuf),
}
