//! bf16 matrix products with f32 accumulation: PyTorch autocast's semantics on the CPU (both
//! operands rounded to bfloat16, round-to-nearest-even; every product and sum in f32).
//!
//! Legend for this file: `dst (M, N) [+]= lhs (M, K) @ rhs (K, N)`, `dst` row-major f32. A
//! *pair* is two consecutive `k` values of one row (of `lhs`) or one column (of `rhs`) packed in
//! one `u32`, the lower `k` in the low 16 bits: the layout of one 32-bit lane of the
//! dot-product instruction `VDPBF16PS` (AVX512-BF16), which adds `a[2q] b[2q] + a[2q+1] b[2q+1]`
//! into each f32 lane. `P = ceil(K / 2)` pairs (an odd `K` is padded with a zero).
//!
//! Packed layouts (both operands are packed before a product; a frozen weight once, at load):
//! - [`PackedLhs`]: panels of [`MR`] rows; panel `p` holds, for each pair `q`, the `MR` rows'
//!   pairs: `data[(p P + q) MR + r]`. Rows past `M` are zero. The *wide* form (for the
//!   AVX-512 widening kernel) holds each pair's two values as f32 bits, the `MR` low ones then
//!   the `MR` high ones: `data[((p P + q) 2 + h) MR + r]`, twice the memory.
//! - [`PackedRhs`]: panels of [`NR`] columns; panel `p` holds, for each pair `q`, the `NR`
//!   columns' pairs: `data[(p P + q) NR + c]` (two 512-bit registers per pair). Columns past `N`
//!   are zero.
//!
//! The micro-kernel computes one `MR x NR` tile over a run of pairs ([`Bf16Kernel`]; the one a
//! process uses is [`chosen`]):
//! - `VDPBF16PS` (AVX512-BF16): 24 accumulator registers, one broadcast of an `lhs` pair and two
//!   `VDPBF16PS` per row and pair. Chosen where the instruction runs at least 0.6 times as
//!   many instructions per second as an f32 FMA (AMD Zen 4 and Zen 5: as many; it does twice
//!   an FMA's work).
//! - Widened on AVX-512: the `rhs` pairs are split into their two bf16 as f32 (exact: a bf16 is
//!   the top half of an f32) and multiplied with f32 FMAs; the `lhs` is packed *wide*, its
//!   bf16-rounded values stored as f32 ([`PackedLhs`] legend), so each row's value is one
//!   broadcast load with no splitting. Chosen on AVX-512 CPUs whose `VDPBF16PS` is slow: on an
//!   Intel Xeon (family 6, model 207, no AMX exposed) it ran at a quarter of the FMA's
//!   instruction rate (0.23-0.26), so its bf16 products ran at about half the f32 ones' speed.
//! - Widened on AVX2+FMA (and a portable version): both operands' pairs split in the kernel.
//! All give PyTorch autocast's semantics (bf16 operands, f32 accumulation); they differ in the
//! order of the f32 sums, and `VDPBF16PS` flushes denormal inputs and outputs to zero (it
//! ignores MXCSR) where the FMA kernels keep them. AMX tiles are not used (no development
//! machine has them to test on).
//!
//! Blocking (GotoBLAS order): the output is cut in tasks of [`MC`] rows x [`NC`] columns (run in
//! parallel); a task walks the pairs in runs of [`KC_PAIRS`] (one `rhs` micro-panel of such a
//! run is 32 KiB, kept in L1 while the task's `MC` rows of `lhs` stream from L2), half as long
//! over a wide `lhs` (its micro-panel per run then stays 12 KiB, the `rhs` one 16 KiB).

use crate::error::{KernelError, Result};
use crate::gemm::Par;
use crate::operands::WeightLayout;
use crate::par::SendPtr;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows of a micro-tile (and of an `lhs` panel).
pub const MR: usize = 12;
/// Columns of a micro-tile (and of an `rhs` panel): two 16-lane registers.
pub const NR: usize = 32;
/// Pairs per run of the reduction (512 values of `K`; half that over a wide `lhs`).
pub const KC_PAIRS: usize = 256;
/// Rows of `dst` per parallel task.
pub const MC: usize = 8 * MR;
/// Columns of `dst` per parallel task.
pub const NC: usize = 8 * NR;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// Rounds an f32 to the nearest bfloat16 (ties to even), as `torch.Tensor.to(torch.bfloat16)`
/// does; a NaN stays a (quiet) NaN. Returns the bit pattern.
#[inline(always)]
pub fn round_bf16(x: f32) -> u16 {
    // Branch-free (a select), so loops over slices vectorize ([`round_slice_bf16`]).
    let b = x.to_bits();
    let nan = b & 0x7fff_ffff > 0x7f80_0000;
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// Rounds `src` into `dst` with [`round_bf16`], in parallel blocks (activations kept in bf16
/// for backward are rounded once per step, millions of values). `dst` must be as long as
/// `src`.
pub fn round_slice_bf16(src: &[f32], dst: &mut [u16]) -> Result<()> {
    if src.len() != dst.len() {
        return Err(KernelError::InvalidArg {
            op: "round_slice_bf16",
            arg: "dst",
            reason: format!("{} slots for {} values", dst.len(), src.len()),
        });
    }
    const BLOCK: usize = 1 << 15;
    dst.par_chunks_mut(BLOCK)
        .zip(src.par_chunks(BLOCK))
        .for_each(|(d, s)| {
            for (o, &x) in d.iter_mut().zip(s) {
                *o = round_bf16(x);
            }
        });
    Ok(())
}

/// The f32 value of a bfloat16 bit pattern (exact).
#[inline(always)]
pub fn widen_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Where an operand's values come from: f32 (rounded to bf16 when packed) or bf16 bits.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bfloat16 bit patterns, used as they are.
    Bf16(&'a [u16]),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::F32(s) => s.len(),
            Source::Bf16(s) => s.len(),
        }
    }
}

/// A logical `(rows, cols)` matrix over a [`Source`]: element `(i, j)` at `i * rs + j * cs`
/// (a transpose is a swap of the strides, nothing is copied).
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The values.
    pub src: Source<'a>,
    /// Logical rows.
    pub rows: usize,
    /// Logical columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `(rows, cols)` matrix.
    pub fn row_major(src: Source<'a>, rows: usize, cols: usize) -> Self {
        View {
            src,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same values read as the `(cols, rows)` transpose.
    pub fn t(self) -> Self {
        View {
            src: self.src,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Checks that every element the view addresses is inside its source.
    fn check(&self, op: &'static str, arg: &'static str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1).checked_mul(self.rs).and_then(|a| {
            (self.cols - 1)
                .checked_mul(self.cs)
                .and_then(|b| a.checked_add(b))
        });
        match last {
            Some(l) if l < self.src.len() => Ok(()),
            _ => Err(KernelError::InvalidArg {
                op,
                arg,
                reason: format!(
                    "a ({}, {}) view with strides ({}, {}) reaches past its {} values",
                    self.rows,
                    self.cols,
                    self.rs,
                    self.cs,
                    self.src.len()
                ),
            }),
        }
    }

    /// The pair `(i, 2q), (i, 2q + 1)` (the second zero past the last column).
    #[inline(always)]
    fn row_pair(&self, i: usize, q: usize) -> u32 {
        let j = 2 * q;
        let at = i * self.rs + j * self.cs;
        let two = j + 1 < self.cols;
        match self.src {
            Source::F32(s) => {
                let lo = round_bf16(s[at]) as u32;
                let hi = if two {
                    round_bf16(s[at + self.cs]) as u32
                } else {
                    0
                };
                lo | hi << 16
            }
            Source::Bf16(s) => {
                let lo = s[at] as u32;
                let hi = if two { s[at + self.cs] as u32 } else { 0 };
                lo | hi << 16
            }
        }
    }
}

/// The pair count of a reduction of length `k`.
fn pairs_of(k: usize) -> usize {
    k.div_ceil(2)
}

/// A left operand packed in [`MR`]-row panels of pairs, or of values in the wide form (see the
/// module legend).
#[derive(Clone, Debug)]
pub struct PackedLhs {
    rows: usize,
    depth: usize,
    /// The wide form (see the module legend): values as f32 bits, for [`Bf16Kernel::Wide512`].
    wide: bool,
    data: Vec<u32>,
}

/// A right operand packed in [`NR`]-column panels of pairs (see the module legend).
#[derive(Clone, Debug)]
pub struct PackedRhs {
    depth: usize,
    cols: usize,
    data: Vec<u32>,
}

impl PackedLhs {
    /// An empty packing, to be filled by [`pack_lhs_into`].
    pub fn empty() -> Self {
        PackedLhs {
            rows: 0,
            depth: 0,
            wide: false,
            data: Vec::new(),
        }
    }
    /// `(M, K)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.depth)
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
    /// Whether it is in the wide form (the AVX-512 widening kernel's).
    pub fn is_wide(&self) -> bool {
        self.wide
    }
}

impl PackedRhs {
    /// `(K, N)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.depth, self.cols)
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// The length of a packed buffer of `panels * pairs * width` pairs, refusing one that overflows.
fn packed_len(op: &'static str, panels: usize, pairs: usize, width: usize) -> Result<usize> {
    panels
        .checked_mul(pairs)
        .and_then(|v| v.checked_mul(width))
        .filter(|&v| v <= isize::MAX as usize / 4)
        .ok_or_else(|| KernelError::InvalidArg {
            op,
            arg: "dims",
            reason: format!("{panels} panels x {pairs} pairs x {width} is too large"),
        })
}

/// Packs `lines` lines of `units` 32-bit slots (pairs, or values in the wide form) into `data`,
/// resized to panels of `width` lines laid out `[unit][line]`: `line(l, u0, buf)` writes line
/// `l`'s slots `u0 .. u0 + buf.len()` into `buf` (`u0` is a multiple of [`PACK_BLOCK`], so
/// even); the last panel's lines past `lines` are zeroed. Every element is written, so a
/// buffer reused from an earlier packing needs no clearing.
fn pack_with_into(
    op: &'static str,
    data: &mut Vec<u32>,
    lines: usize,
    units: usize,
    width: usize,
    line: impl Fn(usize, usize, &mut [u32]) + Sync,
) -> Result<()> {
    let n = packed_len(op, lines.div_ceil(width), units, width)?;
    data.resize(n, 0);
    // SAFETY: the same memory seen as possibly-uninitialised u32s; only u32 values are
    // written through it, so it stays initialised.
    let slots = unsafe { &mut *(data.as_mut_slice() as *mut [u32] as *mut [MaybeUninit<u32>]) };
    fill_panels(slots, lines, units, width, line);
    Ok(())
}

/// Slots of a line made at a time when packing: a block of `width` lines' slots (6 KiB for an
/// lhs panel) is made in L1, then written out in the panel's order. (Writing each whole line
/// into its strided places instead touched every cache line of the panel once per line: 2 to 5
/// ns per value for a 2048 x 2048 operand on an Intel Xeon.)
const PACK_BLOCK: usize = 128;

/// Writes every element of `slots` (whole panels of `units * width`): line `l` of panel `p`
/// (`line(p * width + r, ..)`, zeros past `lines`) into `[unit][line]` order, a block of
/// [`PACK_BLOCK`] units of the panel's lines at a time.
fn fill_panels(
    slots: &mut [MaybeUninit<u32>],
    lines: usize,
    units: usize,
    width: usize,
    line: impl Fn(usize, usize, &mut [u32]) + Sync,
) {
    if units == 0 {
        return;
    }
    slots
        .par_chunks_mut(units * width)
        .enumerate()
        .for_each_init(
            || vec![0u32; width * PACK_BLOCK],
            |block, (p, panel)| {
                let valid = width.min(lines - p * width);
                for u0 in (0..units).step_by(PACK_BLOCK) {
                    let n = PACK_BLOCK.min(units - u0);
                    for r in 0..width {
                        let buf = &mut block[r * PACK_BLOCK..r * PACK_BLOCK + n];
                        if r < valid {
                            line(p * width + r, u0, buf);
                        } else {
                            buf.fill(0);
                        }
                    }
                    let out = &mut panel[u0 * width..(u0 + n) * width];
                    for (q, col) in out.chunks_exact_mut(width).enumerate() {
                        for (r, o) in col.iter_mut().enumerate() {
                            o.write(block[r * PACK_BLOCK + q]);
                        }
                    }
                }
            },
        );
}

/// [`pack_with_into`] a new buffer, written once without being zeroed first (a fresh buffer
/// from the heap would be cleared by a `memset` the packing then overwrites; in a bf16 GPT-2
/// step's profile on a Zen 5, `memset` went from 2.9% to 2.6% of the samples).
fn pack_with(
    op: &'static str,
    lines: usize,
    units: usize,
    width: usize,
    line: impl Fn(usize, usize, &mut [u32]) + Sync,
) -> Result<Vec<u32>> {
    let n = packed_len(op, lines.div_ceil(width), units, width)?;
    let mut data: Vec<u32> = Vec::with_capacity(n);
    fill_panels(
        &mut data.spare_capacity_mut()[..n],
        lines,
        units,
        width,
        line,
    );
    // SAFETY: n = panels * units * width (`packed_len`), so `fill_panels` wrote every element
    // of the whole panels it was given; with no units, n is 0.
    unsafe { data.set_len(n) };
    Ok(data)
}

impl View<'_> {
    /// Row `i`'s pairs `q0 .. q0 + out.len()` (the last one's second half zero when `cols` is
    /// odd) into `out`, which must not reach past the row's last pair. Contiguous rows take a
    /// loop the compiler vectorises.
    fn row_pairs(&self, i: usize, q0: usize, out: &mut [u32]) {
        if self.cs != 1 {
            for (q, o) in out.iter_mut().enumerate() {
                *o = self.row_pair(i, q0 + q);
            }
            return;
        }
        let j0 = 2 * q0;
        let j1 = (j0 + 2 * out.len()).min(self.cols);
        let at = i * self.rs;
        let last = out.len().wrapping_sub(1);
        match self.src {
            Source::F32(s) => {
                let row = &s[at + j0..at + j1];
                let mut it = row.chunks_exact(2);
                for (o, c) in out.iter_mut().zip(&mut it) {
                    *o = round_bf16(c[0]) as u32 | (round_bf16(c[1]) as u32) << 16;
                }
                if let [odd] = it.remainder() {
                    out[last] = round_bf16(*odd) as u32;
                }
            }
            Source::Bf16(s) => {
                let row = &s[at + j0..at + j1];
                let mut it = row.chunks_exact(2);
                for (o, c) in out.iter_mut().zip(&mut it) {
                    *o = c[0] as u32 | (c[1] as u32) << 16;
                }
                if let [odd] = it.remainder() {
                    out[last] = *odd as u32;
                }
            }
        }
    }
}

/// Packs `(M, K)` `lhs` (rounding f32 values to bf16) for the [`chosen`] kernel (the wide form
/// for [`Bf16Kernel::Wide512`]).
pub fn pack_lhs(v: View) -> Result<PackedLhs> {
    pack_lhs_for(chosen(), v)
}

/// [`pack_lhs`] in the form `kernel` reads.
pub fn pack_lhs_for(kernel: Bf16Kernel, v: View) -> Result<PackedLhs> {
    let mut dst = PackedLhs::empty();
    pack_lhs_into_for(kernel, &mut dst, v)?;
    Ok(dst)
}

/// [`pack_lhs`] into `dst`, reusing its buffer (a loop packing one chunk after another
/// allocates once).
pub fn pack_lhs_into(dst: &mut PackedLhs, v: View) -> Result<()> {
    pack_lhs_into_for(chosen(), dst, v)
}

/// [`pack_lhs_into`] in the form `kernel` reads.
pub fn pack_lhs_into_for(kernel: Bf16Kernel, dst: &mut PackedLhs, v: View) -> Result<()> {
    const OP: &str = "pack_lhs";
    v.check(OP, "lhs")?;
    let pairs = pairs_of(v.cols);
    let wide = kernel.wide_lhs();
    if wide {
        let units = pairs
            .checked_mul(2)
            .ok_or_else(|| KernelError::InvalidArg {
                op: OP,
                arg: "lhs",
                reason: format!("{} columns is too many", v.cols),
            })?;
        pack_with_into(OP, &mut dst.data, v.rows, units, MR, |i, u0, buf| {
            // Units u0.. are the values of pairs u0 / 2.. (blocks start at even units).
            let n = buf.len() / 2;
            v.row_pairs(i, u0 / 2, &mut buf[..n]);
            // Each pair q becomes slots 2q (low value) and 2q + 1 (high), in place: from the
            // last pair down, when pair q is read only slots 2q + 2 and above (all > q) have
            // been written.
            for q in (0..n).rev() {
                let p = buf[q];
                buf[2 * q + 1] = p & 0xffff_0000;
                buf[2 * q] = p << 16;
            }
        })?;
    } else {
        pack_with_into(OP, &mut dst.data, v.rows, pairs, MR, |i, q0, buf| {
            v.row_pairs(i, q0, buf)
        })?;
    }
    (dst.rows, dst.depth, dst.wide) = (v.rows, v.cols, wide);
    Ok(())
}

/// Packs `(K, N)` `rhs` (rounding f32 values to bf16).
pub fn pack_rhs(v: View) -> Result<PackedRhs> {
    const OP: &str = "pack_rhs";
    v.check(OP, "rhs")?;
    // Column c of rhs is row c of its transpose, whose pairs run along k.
    let t = v.t();
    let data = pack_with(OP, v.cols, pairs_of(v.rows), NR, |j, q0, buf| {
        t.row_pairs(j, q0, buf)
    })?;
    Ok(PackedRhs {
        depth: v.rows,
        cols: v.cols,
        data,
    })
}

/// A frozen linear weight packed for the two bf16 products of a step: the forward's
/// `x (N, K) W^T` reads `W^T (K, M)` as its right operand, the input gradient's `dy (N, M) W`
/// reads `W (M, K)`. Pairs run along each product's reduction, so the two need different
/// packings: the forward one is made at construction (the original values may then go), the
/// backward one from it on first use (inference never makes it). Values are bf16 (rounded
/// from f32 once, or bf16 as stored).
#[derive(Debug)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    layout: WeightLayout,
    fwd: PackedRhs,
    bwd: std::sync::OnceLock<PackedRhs>,
}

impl PackedWeight {
    /// Packs `w`, stored `(out, inp)` (`OutIn`) or `(inp, out)` (`InOut`), for the forward.
    pub fn new(w: Source, layout: WeightLayout, out: usize, inp: usize) -> Result<Self> {
        let expected = out.checked_mul(inp);
        if expected != Some(w.len()) {
            return Err(KernelError::InvalidArg {
                op: "PackedWeight::new",
                arg: "w",
                reason: format!("{} values for a {out} x {inp} weight", w.len()),
            });
        }
        let wt = match layout {
            WeightLayout::OutIn => View::row_major(w, out, inp).t(),
            WeightLayout::InOut => View::row_major(w, inp, out),
        };
        Ok(PackedWeight {
            out,
            inp,
            layout,
            fwd: pack_rhs(wt)?,
            bwd: std::sync::OnceLock::new(),
        })
    }

    /// `(out, inp)`: M and K.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The layout the values were stored in (and are read back in by [`Self::bits_at`]).
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// `W^T (K, M)` packed: the forward's right operand.
    pub fn forward(&self) -> &PackedRhs {
        &self.fwd
    }

    /// `W (M, K)` packed: the input gradient's right operand (made on the first call, from the
    /// forward packing, with no copy of the weight in between).
    pub fn backward(&self) -> Result<&PackedRhs> {
        if let Some(b) = self.bwd.get() {
            return Ok(b);
        }
        let (m, k) = (self.out, self.inp);
        // Column i of W (input feature i): its pairs run along the outputs.
        let data = pack_with(
            "PackedWeight::backward",
            k,
            pairs_of(m),
            NR,
            |i, q0, buf| {
                for (q, o) in (q0..).zip(buf.iter_mut()) {
                    let lo = self.fwd_bits(i, 2 * q) as u32;
                    let hi = if 2 * q + 1 < m {
                        self.fwd_bits(i, 2 * q + 1) as u32
                    } else {
                        0
                    };
                    *o = lo | hi << 16;
                }
            },
        )?;
        let b = PackedRhs {
            depth: m,
            cols: k,
            data,
        };
        // A concurrent first call may have packed it too: either copy is the same.
        let _ = self.bwd.set(b);
        Ok(self.bwd.get().expect("set above"))
    }

    /// Element `(kk, j)` of `W^T` from the forward packing.
    fn fwd_bits(&self, kk: usize, j: usize) -> u16 {
        let pairs = pairs_of(self.inp);
        let pair = self.fwd.data[(j / NR * pairs + kk / 2) * NR + j % NR];
        (pair >> (16 * (kk % 2))) as u16
    }

    /// The bf16 bits of the value at `idx` of the weight as it was stored.
    pub fn bits_at(&self, idx: usize) -> u16 {
        let (o, i) = match self.layout {
            WeightLayout::OutIn => (idx / self.inp, idx % self.inp),
            WeightLayout::InOut => (idx % self.out, idx / self.out),
        };
        self.fwd_bits(i, o)
    }

    /// Bytes held (the backward packing included once made).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.get().map_or(0, PackedRhs::bytes)
    }
}

/// A bf16 micro-kernel (see the module docs for what each does and when it is chosen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `VDPBF16PS` (AVX512-BF16).
    Dpbf16,
    /// Widened to f32, AVX-512 FMAs, over a wide `lhs`.
    Wide512,
    /// Widened to f32, AVX2 FMAs.
    WidenAvx2,
    /// Widened to f32, no target features.
    Portable,
}

impl Bf16Kernel {
    /// Every kernel, fastest first where each runs well.
    pub const ALL: [Bf16Kernel; 4] = [
        Bf16Kernel::Dpbf16,
        Bf16Kernel::Wide512,
        Bf16Kernel::WidenAvx2,
        Bf16Kernel::Portable,
    ];

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            match self {
                Bf16Kernel::Dpbf16 => avx512 && std::arch::is_x86_feature_detected!("avx512bf16"),
                Bf16Kernel::Wide512 => avx512,
                Bf16Kernel::WidenAvx2 => crate::simd::has_avx2_fma(),
                Bf16Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Bf16Kernel::Portable
        }
    }

    /// For reports.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Dpbf16 => "AVX512-BF16 VDPBF16PS",
            Bf16Kernel::Wide512 => "bf16 widened to f32 (AVX-512 FMA)",
            Bf16Kernel::WidenAvx2 => "bf16 widened to f32 (AVX2 FMA)",
            Bf16Kernel::Portable => "bf16 widened to f32 (portable)",
        }
    }

    /// The kernel named by `LORA_BF16_KERNEL`'s values: `dpbf16`, `avx512`, `avx2`, `portable`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "dpbf16" => Some(Bf16Kernel::Dpbf16),
            "avx512" => Some(Bf16Kernel::Wide512),
            "avx2" => Some(Bf16Kernel::WidenAvx2),
            "portable" => Some(Bf16Kernel::Portable),
            _ => None,
        }
    }

    /// Whether it reads the wide `lhs` form.
    pub fn wide_lhs(self) -> bool {
        self == Bf16Kernel::Wide512
    }

    fn tile(self) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        match self {
            Bf16Kernel::Dpbf16 => return x86::tile_dpbf16,
            Bf16Kernel::Wide512 => return x86::tile_wide512,
            Bf16Kernel::WidenAvx2 => return x86::tile_widen_avx2,
            Bf16Kernel::Portable => {}
        }
        tile_widen_portable
    }
}

/// `VDPBF16PS` is chosen when it runs at least this share of the f32 FMA's instruction rate.
/// It does twice an FMA's multiply-adds; its kernel reached about 0.8 of its peak, the
/// widening one about 0.9 of the FMA's less its pair splitting (4 of every 52 vector
/// instructions), so the two break even near 0.5. About 1 on Zen 4 and Zen 5 (from their
/// peaks; the dot-product kernel about twice as fast), 0.25 on the Intel Xeon (about half as
/// fast).
const DPBF16_MIN_RATE: f64 = 0.6;

/// The kernel the products use in this process, fixed at first use: `LORA_BF16_KERNEL`
/// (`dpbf16`, `avx512`, `avx2` or `portable`) when set to one this CPU runs (otherwise a
/// warning and the automatic choice); automatically, `VDPBF16PS` where the CPU has it and it
/// runs at [`DPBF16_MIN_RATE`] of the FMA's rate or more (timed once, tens of microseconds),
/// else the widest widening kernel the CPU runs.
pub fn chosen() -> Bf16Kernel {
    static CHOSEN: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if let Ok(v) = std::env::var("LORA_BF16_KERNEL") {
            match Bf16Kernel::from_name(v.trim()) {
                Some(k) if k.available() => return k,
                Some(k) => eprintln!(
                    "warning: LORA_BF16_KERNEL={v}: this CPU cannot run {}; choosing automatically",
                    k.name()
                ),
                None => eprintln!(
                    "warning: LORA_BF16_KERNEL={v} is not one of dpbf16, avx512, avx2, portable; \
                     choosing automatically"
                ),
            }
        }
        automatic()
    })
}

/// [`chosen`]'s automatic choice.
fn automatic() -> Bf16Kernel {
    if Bf16Kernel::Dpbf16.available()
        && crate::peak::dpbf16_per_fma().is_some_and(|r| r >= DPBF16_MIN_RATE)
    {
        return Bf16Kernel::Dpbf16;
    }
    Bf16Kernel::ALL[1..]
        .iter()
        .copied()
        .find(|k| k.available())
        .unwrap_or(Bf16Kernel::Portable)
}

/// What the micro-kernel runs on, for reports.
pub fn kernel_name() -> &'static str {
    chosen().name()
}

/// `dst (M, N) [+]= lhs @ rhs` for packed operands. `dst` is row-major with row stride `N`.
/// Runs the [`chosen`] kernel, or for an `lhs` packed in the other form
/// ([`pack_lhs_for`]) the first kernel in [`Bf16Kernel::ALL`]'s order that reads that form and
/// runs here: for pairs on an AVX512-BF16 CPU `VDPBF16PS` even where it was passed over (on
/// the Intel Xeon it still beat the AVX2 widening kernel: 141 vs 90 GFLOP/s at 2048^3), and
/// for a wide packing the AVX-512 kernel, an error on a CPU without AVX-512.
pub fn matmul_packed(
    dst: &mut [f32],
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let mut kernel = chosen();
    if kernel.wide_lhs() != lhs.wide {
        kernel = Bf16Kernel::ALL
            .into_iter()
            .find(|k| k.wide_lhs() == lhs.wide && k.available())
            .unwrap_or(Bf16Kernel::Wide512);
    }
    matmul_packed_with(kernel, dst, lhs, rhs, accumulate, par)
}

/// [`matmul_packed`] on a given kernel (tests and benchmarks compare them); an error when the
/// CPU cannot run it or `lhs` is not in the form it reads.
pub fn matmul_packed_with(
    kernel: Bf16Kernel,
    dst: &mut [f32],
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let reason = if !kernel.available() {
        Some(format!("this CPU cannot run {}", kernel.name()))
    } else if kernel.wide_lhs() != lhs.wide {
        Some(format!(
            "{} reads a{} lhs packing; this one is {}",
            kernel.name(),
            if kernel.wide_lhs() { " wide" } else { " pair" },
            if lhs.wide { "wide" } else { "in pairs" }
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(KernelError::InvalidArg {
            op: "matmul_bf16",
            arg: "kernel",
            reason,
        });
    }
    packed_product(dst, lhs, rhs, accumulate, par, kernel.tile())
}

fn packed_product(
    dst: &mut [f32],
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    accumulate: bool,
    par: Par,
    kernel: Kernel,
) -> Result<()> {
    const OP: &str = "matmul_bf16";
    if lhs.depth != rhs.depth {
        return Err(KernelError::InvalidArg {
            op: OP,
            arg: "rhs",
            reason: format!(
                "lhs is ({}, {}) but rhs has {} rows",
                lhs.rows, lhs.depth, rhs.depth
            ),
        });
    }
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.depth);
    crate::error::check_len(OP, "dst", dst.len(), &[m, n])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let tasks_m = m.div_ceil(MC);
    let tasks_n = n.div_ceil(NC);
    let out = SendPtr(dst.as_mut_ptr());
    let run = |t: usize| {
        let (tm, tn) = (t / tasks_n, t % tasks_n);
        // SAFETY: task (tm, tn) writes only rows tm*MC.. and columns tn*NC.. of dst, disjoint
        // from every other task's; the packed operands hold every pair the tiles read.
        unsafe { run_task(out, (m, n), lhs, rhs, (tm, tn), accumulate, kernel) }
    };
    let macs = m.saturating_mul(n).saturating_mul(k);
    if par == Par::Single || macs < PAR_MIN_MACS || rayon::current_num_threads() <= 1 {
        (0..tasks_m * tasks_n).for_each(run);
    } else {
        (0..tasks_m * tasks_n).into_par_iter().for_each(run);
    }
    Ok(())
}

/// `dst (M, N) [+]= lhs (M, K) @ rhs (K, N)` with both operands rounded to bf16: packs both,
/// then [`matmul_packed`]. Products against a frozen weight should pack it once instead.
pub fn matmul_bf16(
    dst: &mut [f32],
    lhs: View,
    rhs: View,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let a = pack_lhs(lhs)?;
    let b = pack_rhs(rhs)?;
    matmul_packed(dst, &a, &b, accumulate, par)
}

/// A micro-kernel: `c[r][j] (rows x cols valid, row stride ldc) [+]=` the tile's products over
/// `pairs` pairs of the `a` panel run (stride MR per pair, 2 MR in the wide form) and `b`
/// panel run (stride NR).
type Kernel = unsafe fn(*const u32, *const u32, usize, *mut f32, usize, usize, usize, bool);

/// One task: rows `tm*MC ..`, columns `tn*NC ..` of `dst`, over all pairs in runs of KC_PAIRS
/// (half as long over a wide `lhs`).
///
/// # Safety
/// `out` points to an `(m, n)` row-major buffer that no other thread writes in this task's
/// rows and columns; `lhs` is `(m, K)` and `rhs` `(K, n)` packed.
unsafe fn run_task(
    out: SendPtr,
    (m, n): (usize, usize),
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    (tm, tn): (usize, usize),
    accumulate: bool,
    kernel: Kernel,
) {
    let pairs = pairs_of(lhs.depth);
    // An lhs panel's stride per pair: MR pairs, or 2 MR values in the wide form. A wide
    // micro-panel is twice as large, so its runs are half as long: the lhs micro-panel of a
    // run stays 12 KiB as in pairs, the rhs one (kept in L1) is 16 KiB instead of 32.
    let (a_step, kc) = if lhs.wide {
        (2 * MR, KC_PAIRS / 2)
    } else {
        (MR, KC_PAIRS)
    };
    let (r0, r1) = (tm * MC, (tm * MC + MC).min(m));
    let (c0, c1) = (tn * NC, (tn * NC + NC).min(n));
    for q0 in (0..pairs).step_by(kc) {
        let qn = kc.min(pairs - q0);
        let load = accumulate || q0 > 0;
        for c in (c0..c1).step_by(NR) {
            let b = rhs.data.as_ptr().add((c / NR * pairs + q0) * NR);
            for r in (r0..r1).step_by(MR) {
                let a = lhs.data.as_ptr().add((r / MR * pairs + q0) * a_step);
                let dst = out.get().add(r * n + c);
                kernel(a, b, qn, dst, n, MR.min(m - r), NR.min(n - c), load);
            }
        }
    }
}

/// The low and high bf16 of a pair, as f32.
#[inline(always)]
fn split_pair(p: u32) -> (f32, f32) {
    (f32::from_bits(p << 16), f32::from_bits(p & 0xffff_0000))
}

/// The widening micro-kernel's body, in 4-row x 16-column sub-tiles (the accumulators of one
/// sub-tile fit in registers); inlined into a target-feature wrapper per CPU family.
///
/// # Safety
/// As [`Kernel`]: `a` holds `pairs * MR` pairs, `b` `pairs * NR`, `c` a `rows x cols` tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_widen_body(
    a: *const u32,
    b: *const u32,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    const SR: usize = 4;
    const SC: usize = 16;
    for r0 in (0..rows).step_by(SR) {
        for c0 in (0..cols).step_by(SC) {
            let mut acc = [[0.0f32; SC]; SR];
            if load {
                for (r, row) in acc.iter_mut().enumerate().take(rows - r0) {
                    for (j, v) in row.iter_mut().enumerate().take(cols - c0) {
                        *v = *c.add((r0 + r) * ldc + c0 + j);
                    }
                }
            }
            for q in 0..pairs {
                let bq = std::slice::from_raw_parts(b.add(q * NR + c0), SC);
                let mut lo = [0.0f32; SC];
                let mut hi = [0.0f32; SC];
                for j in 0..SC {
                    (lo[j], hi[j]) = split_pair(bq[j]);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let (al, ah) = split_pair(*a.add(q * MR + r0 + r));
                    for j in 0..SC {
                        row[j] = al.mul_add(lo[j], row[j]);
                        row[j] = ah.mul_add(hi[j], row[j]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(rows - r0) {
                for (j, v) in row.iter().enumerate().take(cols - c0) {
                    *c.add((r0 + r) * ldc + c0 + j) = *v;
                }
            }
        }
    }
}

/// The widening micro-kernel without target features (non-x86, or x86 without AVX2+FMA).
///
/// # Safety
/// As [`Kernel`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_widen_portable(
    a: *const u32,
    b: *const u32,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    tile_widen_body(a, b, pairs, c, ldc, rows, cols, load)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The widening micro-kernel on AVX2+FMA: the tile in 4-row x 16-column sub-tiles (eight
    /// accumulator registers); per pair, the `rhs` pairs are split into their low and high
    /// bf16 as f32 (a shift and a mask), each row's pair likewise, and four FMAs per row.
    /// Partial sub-tiles (edges) go through a scratch tile.
    ///
    /// # Safety
    /// As [`super::Kernel`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_widen_avx2(
        a: *const u32,
        b: *const u32,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
    ) {
        const SR: usize = 4;
        const SC: usize = 16;
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        for r0 in (0..rows).step_by(SR) {
            for c0 in (0..cols).step_by(SC) {
                let (nr, nc) = (SR.min(rows - r0), SC.min(cols - c0));
                let mut scratch = [0.0f32; SR * SC];
                // Full sub-tiles read and write dst directly; edges through the scratch.
                let (t, ldt) = if nr == SR && nc == SC {
                    (c.add(r0 * ldc + c0), ldc)
                } else {
                    if load {
                        for r in 0..nr {
                            for j in 0..nc {
                                scratch[r * SC + j] = *c.add((r0 + r) * ldc + c0 + j);
                            }
                        }
                    }
                    (scratch.as_mut_ptr(), SC)
                };
                let mut acc = [[_mm256_setzero_ps(); 2]; SR];
                if load {
                    for (r, row) in acc.iter_mut().enumerate() {
                        row[0] = _mm256_loadu_ps(t.add(r * ldt));
                        row[1] = _mm256_loadu_ps(t.add(r * ldt + 8));
                    }
                }
                for q in 0..pairs {
                    let bq = b.add(q * NR + c0) as *const __m256i;
                    let v0 = _mm256_loadu_si256(bq);
                    let v1 = _mm256_loadu_si256(bq.add(1));
                    let lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
                    let lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
                    let hi0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
                    let hi1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
                    let aq = a.add(q * MR + r0);
                    for (r, row) in acc.iter_mut().enumerate() {
                        let p = _mm256_set1_epi32(*aq.add(r) as i32);
                        let al = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
                        let ah = _mm256_castsi256_ps(_mm256_and_si256(p, high));
                        row[0] = _mm256_fmadd_ps(al, lo0, row[0]);
                        row[1] = _mm256_fmadd_ps(al, lo1, row[1]);
                        row[0] = _mm256_fmadd_ps(ah, hi0, row[0]);
                        row[1] = _mm256_fmadd_ps(ah, hi1, row[1]);
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    _mm256_storeu_ps(t.add(r * ldt), row[0]);
                    _mm256_storeu_ps(t.add(r * ldt + 8), row[1]);
                }
                if t == scratch.as_mut_ptr() {
                    for r in 0..nr {
                        for j in 0..nc {
                            *c.add((r0 + r) * ldc + c0 + j) = scratch[r * SC + j];
                        }
                    }
                }
            }
        }
    }

    /// The column masks of a tile `cols` wide: the first and the second 16 columns (the
    /// second empty when `cols <= 16`).
    #[inline(always)]
    fn col_masks(cols: usize) -> (__mmask16, __mmask16) {
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        let m1: __mmask16 = if cols >= NR {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        (m0, m1)
    }

    /// What dst holds is added after the reduction, not loaded before it: its rows are asked
    /// for now (prefetch) and arrive while the loop runs, instead of stalling the tile's start
    /// on a cache miss (7.7% of the `VDPBF16PS` kernel's time in a GPT-2 step's profile went to
    /// those loads when they came first). The second half of a row is touched only when its
    /// mask is not empty (a pointer past the last row's end is not even formed).
    #[inline(always)]
    unsafe fn prefetch_tile(c: *mut f32, ldc: usize, rows: usize, m1: __mmask16) {
        for r in 0..rows {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
            if m1 != 0 {
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + 16) as *const i8);
            }
        }
    }

    /// Writes the tile's `rows` rows (plus what dst held when `load`), masked to its columns.
    /// Inlined into the kernels, whose target features its intrinsics then compile with.
    #[inline(always)]
    unsafe fn store_tile(
        acc: &[[__m512; 2]; MR],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        (m0, m1): (__mmask16, __mmask16),
        load: bool,
    ) {
        for (r, row) in acc.iter().enumerate().take(rows) {
            let (mut lo, mut hi) = (row[0], row[1]);
            if load {
                lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, c.add(r * ldc)));
            }
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo);
            if m1 != 0 {
                if load {
                    hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16)));
                }
                _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi);
            }
        }
    }

    /// The `VDPBF16PS` micro-kernel: an `MR x NR` tile in 24 registers.
    ///
    /// # Safety
    /// As [`super::Kernel`]; the CPU has AVX512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_dpbf16(
        a: *const u32,
        b: *const u32,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
    ) {
        let masks = col_masks(cols);
        if load {
            prefetch_tile(c, ldc, rows, masks.1);
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for q in 0..pairs {
            let bq = b.add(q * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const _));
            let aq = a.add(q * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ar, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ar, b1);
            }
        }
        store_tile(&acc, c, ldc, rows, masks, load);
    }

    /// How far ahead [`tile_wide512`] prefetches its `rhs`, in pairs.
    const PF_PAIRS: usize = 8;

    /// The AVX-512 widening micro-kernel: an `MR x NR` tile in 24 registers over a wide `lhs`
    /// (f32 values). Per pair, the two `rhs` registers of pairs are split into four of f32
    /// (a shift and a mask each: the only work besides the FMAs), then each row's low and high
    /// value is broadcast from memory and multiplied into both halves: 48 FMAs per pair.
    ///
    /// # Safety
    /// As [`super::Kernel`], with `a` in the wide form (`pairs * 2 MR` values); the CPU has
    /// AVX512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_wide512(
        a: *const u32,
        b: *const u32,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
    ) {
        let masks = col_masks(cols);
        if load {
            prefetch_tile(c, ldc, rows, masks.1);
        }
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let a = a as *const f32;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for q in 0..pairs {
            let bq = b.add(q * NR);
            // The rhs micro-panel's first pass (its first row tile) reads it from L2 or
            // farther: ask for it PF_PAIRS pairs ahead (later passes find it in L1).
            _mm_prefetch::<_MM_HINT_T0>(bq.wrapping_add(PF_PAIRS * NR) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bq.wrapping_add(PF_PAIRS * NR + 16) as *const i8);
            let v0 = _mm512_loadu_si512(bq as *const _);
            let v1 = _mm512_loadu_si512(bq.add(16) as *const _);
            let lo0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0));
            let lo1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1));
            let hi0 = _mm512_castsi512_ps(_mm512_and_si512(v0, high));
            let hi1 = _mm512_castsi512_ps(_mm512_and_si512(v1, high));
            let aq = a.add(q * 2 * MR);
            // All rows' low halves, then all rows' high halves: an accumulator's two FMAs of a
            // pair are 24 FMAs apart, not adjacent.
            for (r, row) in acc.iter_mut().enumerate() {
                let al = _mm512_set1_ps(*aq.add(r));
                row[0] = _mm512_fmadd_ps(al, lo0, row[0]);
                row[1] = _mm512_fmadd_ps(al, lo1, row[1]);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let ah = _mm512_set1_ps(*aq.add(MR + r));
                row[0] = _mm512_fmadd_ps(ah, hi0, row[0]);
                row[1] = _mm512_fmadd_ps(ah, hi1, row[1]);
            }
        }
        store_tile(&acc, c, ldc, rows, masks, load);
    }
}

/// The reference the fast products are tested against: f64 sums of the bf16-rounded operands.
pub mod reference {
    use super::{round_bf16, widen_bf16, Source, View};

    /// The value the product reads for element `(i, j)` of `v`: rounded to bf16.
    pub fn at(v: &View, i: usize, j: usize) -> f64 {
        let idx = i * v.rs + j * v.cs;
        let b = match v.src {
            Source::F32(s) => round_bf16(s[idx]),
            Source::Bf16(s) => s[idx],
        };
        widen_bf16(b) as f64
    }

    /// `(M, N)` row-major `lhs @ rhs` in f64, and the sum of `|lhs_ik rhs_kj|` per element
    /// (the scale of the f32 accumulation's rounding error).
    pub fn matmul(lhs: &View, rhs: &View) -> (Vec<f64>, Vec<f64>) {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        let mut out = vec![0.0; m * n];
        let mut mag = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let p = at(lhs, i, kk) * at(rhs, kk, j);
                    out[i * n + j] += p;
                    mag[i * n + j] += p.abs();
                }
            }
        }
        (out, mag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wide packing (made on any CPU, read only by the AVX-512 kernel) holds exactly the
    /// pair packing's values split per the legend, for odd K, K = 1, K over one packing block
    /// and fewer rows than a panel; zeros past the last row and in an odd K's padding.
    #[test]
    fn wide_packing_is_the_pair_packing_split() {
        for (m, k) in [
            (1, 1),
            (5, 3),
            (13, 2 * PACK_BLOCK * 2 + 5),
            (MR, 2),
            (25, 600),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let v = View::row_major(Source::F32(&a), m, k);
            let pairs = pack_lhs_for(Bf16Kernel::Portable, v).unwrap();
            let wide = pack_lhs_for(Bf16Kernel::Wide512, v).unwrap();
            assert!(!pairs.wide && wide.wide);
            assert_eq!(wide.data.len(), 2 * pairs.data.len(), "{m} x {k}");
            let p = pairs_of(k);
            for panel in 0..m.div_ceil(MR) {
                for q in 0..p {
                    for r in 0..MR {
                        let pair = pairs.data[(panel * p + q) * MR + r];
                        let base = (panel * p + q) * 2 * MR;
                        assert_eq!(wide.data[base + r], pair << 16, "{m} x {k} lo {q} {r}");
                        assert_eq!(wide.data[base + MR + r], pair & 0xffff_0000, "hi {q} {r}");
                        let row = panel * MR + r;
                        let want = |j: usize| {
                            if row < m && j < k {
                                widen_bf16(round_bf16(a[row * k + j])).to_bits()
                            } else {
                                0
                            }
                        };
                        assert_eq!(wide.data[base + r], want(2 * q), "{m} x {k}");
                        assert_eq!(wide.data[base + MR + r], want(2 * q + 1), "{m} x {k}");
                    }
                }
            }
        }
    }
}
