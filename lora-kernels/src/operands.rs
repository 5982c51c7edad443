//! The operand types every backend shares: how a frozen weight is stored and laid out, a
//! linear layer's dimensions, and the adapter's dropout. The CPU kernels take them with slices
//! (`lora_linear`), the device backend with its buffers (`accel`, `cuda`).

/// How the frozen base weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(M, K)`: `torch.nn.Linear` (`y = x W^T`).
    OutIn,
    /// `(K, M)`: GPT-2's `Conv1D` (`y = x W`), used without transposing a copy.
    InOut,
}

/// Layer dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// N: rows of `x` (tokens).
    pub tokens: usize,
    /// K: input features.
    pub inp: usize,
    /// M: output features.
    pub out: usize,
}

/// A frozen base weight as stored: f32, or 16-bit floats (the raw bits of a bf16 / f16
/// checkpoint) that the base products widen to f32 one block of output features at a time, so
/// the weight stays at 2 bytes per value in memory. Widening is exact, and the products
/// accumulate in f32 either way.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
    /// bf16 values packed for the bf16 products ([`crate::gemm_bf16::PackedWeight`]): the
    /// base products then round their other operand to bf16 too (autocast's semantics).
    PackedBf16(&'a crate::gemm_bf16::PackedWeight),
}

impl WeightData<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(w) => w.len(),
            WeightData::Bf16(w) | WeightData::F16(w) => w.len(),
            WeightData::PackedBf16(p) => p.dims().0 * p.dims().1,
        }
    }
    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes values `start .. start + dst.len()` into `dst` as f32.
    pub fn widen(&self, start: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            WeightData::F32(w) => dst.copy_from_slice(&w[start..start + n]),
            WeightData::Bf16(w) => dst
                .iter_mut()
                .zip(&w[start..start + n])
                .for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16)),
            // `half`'s slice conversion uses F16C where the CPU has it (exact either way: every
            // f16 is an f32); the per-value `to_f32` is a software conversion here.
            WeightData::F16(w) => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                w[start..start + n]
                    .reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(dst)
            }
            WeightData::PackedBf16(p) => dst
                .iter_mut()
                .enumerate()
                .for_each(|(i, d)| *d = crate::gemm_bf16::widen_bf16(p.bits_at(start + i))),
        }
    }
}

/// Inverted dropout on the LoRA input (`x` as seen by A only; the base path is never dropped).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability, `0 <= p < 1`.
    pub p: f32,
    /// Mask stream; the same seed gives the same mask in forward and backward.
    pub seed: u64,
}
