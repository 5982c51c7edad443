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
//!   pairs: `data[(p P + q) MR + r]`. Rows past `M` are zero.
//! - [`PackedRhs`]: panels of [`NR`] columns; panel `p` holds, for each pair `q`, the `NR`
//!   columns' pairs: `data[(p P + q) NR + c]` (two 512-bit registers per pair). Columns past `N`
//!   are zero.
//!
//! The micro-kernel computes one `MR x NR` tile over a run of pairs: with AVX512-BF16, 24
//! accumulator registers, one broadcast of an `lhs` pair and two `VDPBF16PS` per row and pair.
//! Without it (AVX2-only and older CPUs, and non-x86) the same packed operands are widened to
//! f32 (exact: a bf16 is the top half of an f32) and multiplied with f32 FMAs, so the result has
//! the same semantics at f32 speed; [`native`] tells which one runs. AMX tiles are not used (no
//! development machine has them to test on).
//!
//! Blocking (GotoBLAS order): the output is cut in tasks of [`MC`] rows x [`NC`] columns (run in
//! parallel); a task walks the pairs in runs of [`KC_PAIRS`] (one `rhs` micro-panel of such a
//! run is 32 KiB, kept in L1 while the task's `MC` rows of `lhs` stream from L2).

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
/// Pairs per run of the reduction (512 values of `K`).
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

/// A left operand packed in [`MR`]-row panels of pairs (see the module legend).
#[derive(Clone, Debug)]
pub struct PackedLhs {
    rows: usize,
    depth: usize,
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

/// Packs `lines` lines of `depth` values into `data`, resized to panels of `width` lines laid
/// out `[pair][line]`: `line(l, buf)` writes line `l`'s `depth.div_ceil(2)` pairs into `buf`;
/// the last panel's lines past `lines` are zeroed. Every element is written, so a buffer
/// reused from an earlier packing needs no clearing.
fn pack_with_into(
    op: &'static str,
    data: &mut Vec<u32>,
    lines: usize,
    depth: usize,
    width: usize,
    line: impl Fn(usize, &mut [u32]) + Sync,
) -> Result<()> {
    let pairs = pairs_of(depth);
    let n = packed_len(op, lines.div_ceil(width), pairs, width)?;
    data.resize(n, 0);
    // SAFETY: the same memory seen as possibly-uninitialised u32s; only u32 values are
    // written through it, so it stays initialised.
    let slots = unsafe { &mut *(data.as_mut_slice() as *mut [u32] as *mut [MaybeUninit<u32>]) };
    fill_panels(slots, lines, pairs, width, line);
    Ok(())
}

/// Writes every element of `slots` (whole panels of `pairs * width`): line `l` of panel `p`
/// (`line(p * width + r, buf)`, zeros past `lines`) into `[pair][line]` order.
fn fill_panels(
    slots: &mut [MaybeUninit<u32>],
    lines: usize,
    pairs: usize,
    width: usize,
    line: impl Fn(usize, &mut [u32]) + Sync,
) {
    if pairs == 0 {
        return;
    }
    slots
        .par_chunks_mut(pairs * width)
        .enumerate()
        .for_each(|(p, panel)| {
            let mut buf = vec![0u32; pairs];
            let valid = width.min(lines - p * width);
            for r in 0..width {
                if r < valid {
                    line(p * width + r, &mut buf);
                } else {
                    buf.fill(0);
                }
                for (q, &x) in buf.iter().enumerate() {
                    panel[q * width + r].write(x);
                }
            }
        });
}

/// [`pack_with_into`] a new buffer, written once without being zeroed first (a fresh buffer
/// from the heap would be cleared by a `memset` the packing then overwrites; in a bf16 GPT-2
/// step's profile on a Zen 5, `memset` went from 2.9% to 2.6% of the samples).
fn pack_with(
    op: &'static str,
    lines: usize,
    depth: usize,
    width: usize,
    line: impl Fn(usize, &mut [u32]) + Sync,
) -> Result<Vec<u32>> {
    let pairs = pairs_of(depth);
    let n = packed_len(op, lines.div_ceil(width), pairs, width)?;
    let mut data: Vec<u32> = Vec::with_capacity(n);
    fill_panels(
        &mut data.spare_capacity_mut()[..n],
        lines,
        pairs,
        width,
        line,
    );
    // SAFETY: n = panels * pairs * width (`packed_len`), so `fill_panels` wrote every element
    // of the whole panels it was given; with no pairs, n is 0.
    unsafe { data.set_len(n) };
    Ok(data)
}

impl View<'_> {
    /// Row `i`'s pairs (the last one's second half zero when `cols` is odd) into `out`
    /// (`cols.div_ceil(2)` long). Contiguous rows take a loop the compiler vectorises.
    fn row_pairs(&self, i: usize, out: &mut [u32]) {
        let k = self.cols;
        if self.cs != 1 {
            for (q, o) in out.iter_mut().enumerate() {
                *o = self.row_pair(i, q);
            }
            return;
        }
        let at = i * self.rs;
        match self.src {
            Source::F32(s) => {
                let row = &s[at..at + k];
                let mut it = row.chunks_exact(2);
                for (o, c) in out.iter_mut().zip(&mut it) {
                    *o = round_bf16(c[0]) as u32 | (round_bf16(c[1]) as u32) << 16;
                }
                if let [last] = it.remainder() {
                    out[k / 2] = round_bf16(*last) as u32;
                }
            }
            Source::Bf16(s) => {
                let row = &s[at..at + k];
                let mut it = row.chunks_exact(2);
                for (o, c) in out.iter_mut().zip(&mut it) {
                    *o = c[0] as u32 | (c[1] as u32) << 16;
                }
                if let [last] = it.remainder() {
                    out[k / 2] = *last as u32;
                }
            }
        }
    }
}

/// Packs `(M, K)` `lhs` (rounding f32 values to bf16).
pub fn pack_lhs(v: View) -> Result<PackedLhs> {
    const OP: &str = "pack_lhs";
    v.check(OP, "lhs")?;
    let data = pack_with(OP, v.rows, v.cols, MR, |i, buf| v.row_pairs(i, buf))?;
    Ok(PackedLhs {
        rows: v.rows,
        depth: v.cols,
        data,
    })
}

/// [`pack_lhs`] into `dst`, reusing its buffer (a loop packing one chunk after another
/// allocates once).
pub fn pack_lhs_into(dst: &mut PackedLhs, v: View) -> Result<()> {
    const OP: &str = "pack_lhs";
    v.check(OP, "lhs")?;
    pack_with_into(OP, &mut dst.data, v.rows, v.cols, MR, |i, buf| {
        v.row_pairs(i, buf)
    })?;
    (dst.rows, dst.depth) = (v.rows, v.cols);
    Ok(())
}

/// Packs `(K, N)` `rhs` (rounding f32 values to bf16).
pub fn pack_rhs(v: View) -> Result<PackedRhs> {
    const OP: &str = "pack_rhs";
    v.check(OP, "rhs")?;
    // Column c of rhs is row c of its transpose, whose pairs run along k.
    let t = v.t();
    let data = pack_with(OP, v.cols, v.rows, NR, |j, buf| t.row_pairs(j, buf))?;
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
        let data = pack_with("PackedWeight::backward", k, m, NR, |i, buf| {
            for (q, o) in buf.iter_mut().enumerate() {
                let lo = self.fwd_bits(i, 2 * q) as u32;
                let hi = if 2 * q + 1 < m {
                    self.fwd_bits(i, 2 * q + 1) as u32
                } else {
                    0
                };
                *o = lo | hi << 16;
            }
        })?;
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

/// Whether the products run on `VDPBF16PS` (AVX512-BF16) on this CPU; otherwise the packed
/// operands are widened to f32 inside the micro-kernel.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What the micro-kernel runs on, for reports.
pub fn kernel_name() -> &'static str {
    if native() {
        "AVX512-BF16 VDPBF16PS"
    } else if crate::simd::has_avx2_fma() {
        "bf16 widened to f32 (AVX2 FMA)"
    } else {
        "bf16 widened to f32 (portable)"
    }
}

/// `dst (M, N) [+]= lhs @ rhs` for packed operands. `dst` is row-major with row stride `N`.
pub fn matmul_packed(
    dst: &mut [f32],
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    packed_product(dst, lhs, rhs, accumulate, par, select_kernel())
}

/// [`matmul_packed`] on the widening micro-kernel whatever the CPU has: the fallback, for tests
/// and benchmarks on machines with AVX512-BF16.
pub fn matmul_packed_widened(
    dst: &mut [f32],
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    packed_product(dst, lhs, rhs, accumulate, par, widening_kernel())
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
/// `pairs` pairs of the `a` panel run (stride MR) and `b` panel run (stride NR).
type Kernel = unsafe fn(*const u32, *const u32, usize, *mut f32, usize, usize, usize, bool);

fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if native() {
        return x86::tile_dpbf16;
    }
    widening_kernel()
}

fn widening_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        return x86::tile_widen_avx2;
    }
    tile_widen_portable
}

/// One task: rows `tm*MC ..`, columns `tn*NC ..` of `dst`, over all pairs in runs of KC_PAIRS.
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
    let (r0, r1) = (tm * MC, (tm * MC + MC).min(m));
    let (c0, c1) = (tn * NC, (tn * NC + NC).min(n));
    for q0 in (0..pairs).step_by(KC_PAIRS) {
        let qn = KC_PAIRS.min(pairs - q0);
        let load = accumulate || q0 > 0;
        for c in (c0..c1).step_by(NR) {
            let b = rhs.data.as_ptr().add((c / NR * pairs + q0) * NR);
            for r in (r0..r1).step_by(MR) {
                let a = lhs.data.as_ptr().add((r / MR * pairs + q0) * MR);
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
        // What dst holds is added after the reduction, not loaded before it: its rows are
        // asked for now (prefetch) and arrive while the loop runs, instead of stalling the
        // tile's start on a cache miss (7.7% of this kernel's time in a GPT-2 step's profile
        // went to those loads when they came first).
        // The second half of a row is touched only when its mask is not empty (a pointer past
        // the last row's end is not even formed).
        if load {
            for r in 0..rows {
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
                if m1 != 0 {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + 16) as *const i8);
                }
            }
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
