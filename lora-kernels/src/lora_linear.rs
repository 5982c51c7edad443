//! The fused LoRA linear layer: forward and backward side by side, plus the frozen-base case
//! (no adapter) which is the same function with `lora = None`.
//!
//! ```text
//! N = tokens, K = in features, M = out features, R = rank, s = scale
//! forward:  u  = drop(x) A^T                 (N, R)   saved for backward
//!           y  = x W^T + b + s * u B^T       (N, M)
//! backward: g  = s * dy B                    (N, R)
//!           dB += s * dy^T u                 (M, R)
//!           dA += g^T drop(x)                (R, K)
//!           dx += dy W + drop'(g A)          (N, K)
//!           db += sum over rows of dy        (M)
//!           dW += dy^T x   only when the base weight trains (full fine-tuning); LoRA never does
//! ```
//!
//! The base GEMMs go to the `gemm` crate; the rank-R work is done by three row-pass kernels
//! (`shrink_rows`, `expand_rows`, `outer_accumulate`) that keep a row of `x`/`dy` in L1
//! while they touch it, and fold the bias and dropout into passes that happen anyway:
//! - forward: `y` is initialised to `b + s * u B^T` in one write pass, then the base GEMM
//!   accumulates `x W^T` onto it (the GEMM reads `y` inside its own epilogue), so the expand
//!   costs no extra pass over `y` beyond the one a biased base layer makes anyway;
//! - dropout is never materialised: the mask bit of `x[i, c]` is a hash of `(seed, i*K + c)`
//!   ([`crate::rng::dropout_mult`]), recomputed wherever `drop(x)` is read;
//! - backward: `g` and `db` come from one pass over `dy`; `g A` is added into `dx` before the
//!   base GEMM accumulates `dy W` onto it.
//!
//! Versions: v1 (this file) as described; the naive oracle is [`reference`](mod@reference).

use crate::error::{check_len, invalid, Result};
use crate::gemm::{matmul, Par, Trans};
use crate::gemm_bf16::{matmul_packed, pack_lhs, Source, View};
use crate::par::{rows_per_task, SendPtr, PAR_THRESHOLD};
use crate::rng::dropout_mult;
use crate::simd::{axpy_many, dot_many, with_simd, Simd};
use rayon::prelude::*;

pub use crate::operands::{Dropout, LinearDims, WeightData, WeightLayout};

/// The base (pretrained) part of the layer.
#[derive(Clone, Copy, Debug)]
pub struct BaseLinear<'a> {
    /// `(M, K)` or `(K, M)` per `layout`, as stored.
    pub weight: WeightData<'a>,
    /// Storage order of `weight`.
    pub layout: WeightLayout,
    /// `(M)`, optional.
    pub bias: Option<&'a [f32]>,
}

/// f32 values widened per block of a 16-bit weight: at most this many (4 MiB of scratch).
const WIDEN_BLOCK: usize = 1 << 20;

/// `y (N, M) [+]= x (N, K) W^T` for a weight stored `(M, K)` (`OutIn`) or `(K, M)` (`InOut`).
/// A 16-bit weight is widened `block` values at a time (whole output features per block).
fn base_forward(
    y: &mut [f32],
    x: &[f32],
    w: WeightData,
    layout: WeightLayout,
    d: LinearDims,
    accumulate: bool,
    block: usize,
) -> Result<()> {
    let (n, k, m) = (d.tokens, d.inp, d.out);
    if let WeightData::PackedBf16(p) = w {
        check_packed("base_forward", p, layout, d)?;
        check_len("base_forward", "y", y.len(), &[n, m])?;
        let lhs = pack_lhs(View::row_major(Source::F32(x), n, k))?;
        return matmul_packed(y, &lhs, p.forward(), accumulate, Par::Auto);
    }
    if let WeightData::F32(w) = w {
        let w_t = match layout {
            WeightLayout::OutIn => Trans::Yes,
            WeightLayout::InOut => Trans::No,
        };
        return matmul(
            y,
            x,
            Trans::No,
            w,
            w_t,
            (n, m, k),
            1.0,
            accumulate,
            Par::Auto,
        );
    }
    check_len("base_forward", "y", y.len(), &[n, m])?;
    check_len("base_forward", "x", x.len(), &[n, k])?;
    for_each_widened_block(w, layout, (k, m), block, |m0, mb, s, strides| {
        // SAFETY: y is (N, M) (checked); the view of columns m0..m0+mb with row stride M is in
        // bounds; x is (N, K); s holds mb x K values, read as (K, mb) through `strides`.
        unsafe {
            crate::gemm::gemm_raw(
                y.as_mut_ptr().add(m0),
                (m as isize, 1),
                x.as_ptr(),
                (k as isize, 1),
                s.as_ptr(),
                strides,
                (n, mb, k),
                1.0,
                accumulate,
                Par::Auto,
            );
        }
    });
    Ok(())
}

/// `dx (N, K) += dy (N, M) W` for a weight stored as in [`base_forward`].
fn base_backward_dx(
    dx: &mut [f32],
    dy: &[f32],
    w: WeightData,
    layout: WeightLayout,
    d: LinearDims,
    block: usize,
) -> Result<()> {
    let (n, k, m) = (d.tokens, d.inp, d.out);
    if let WeightData::PackedBf16(p) = w {
        check_packed("base_backward_dx", p, layout, d)?;
        check_len("base_backward_dx", "dx", dx.len(), &[n, k])?;
        let lhs = pack_lhs(View::row_major(Source::F32(dy), n, m))?;
        return matmul_packed(dx, &lhs, p.backward()?, true, Par::Auto);
    }
    if let WeightData::F32(w) = w {
        let w_t = match layout {
            WeightLayout::OutIn => Trans::No,
            WeightLayout::InOut => Trans::Yes,
        };
        return matmul(dx, dy, Trans::No, w, w_t, (n, k, m), 1.0, true, Par::Auto);
    }
    check_len("base_backward_dx", "dx", dx.len(), &[n, k])?;
    check_len("base_backward_dx", "dy", dy.len(), &[n, m])?;
    for_each_widened_block(w, layout, (k, m), block, |m0, mb, s, (ks, cs)| {
        // SAFETY: dx is (N, K), dy is (N, M) (checked): columns m0..m0+mb of dy with row stride
        // M are in bounds; s holds mb x K values, read as (mb, K) through the swapped strides.
        unsafe {
            crate::gemm::gemm_raw(
                dx.as_mut_ptr(),
                (k as isize, 1),
                dy.as_ptr().add(m0),
                (m as isize, 1),
                s.as_ptr(),
                (cs, ks),
                (n, k, mb),
                1.0,
                true,
                Par::Auto,
            );
        }
    });
    Ok(())
}

/// A packed weight must have been packed for this layer's shape and layout.
fn check_packed(
    op: &'static str,
    p: &crate::gemm_bf16::PackedWeight,
    layout: WeightLayout,
    d: LinearDims,
) -> Result<()> {
    if p.dims() != (d.out, d.inp) || p.layout() != layout {
        return Err(invalid(
            op,
            "weight",
            format!(
                "packed as a {:?} {} x {} weight, used as a {layout:?} {} x {} one",
                p.layout(),
                p.dims().0,
                p.dims().1,
                d.out,
                d.inp
            ),
        ));
    }
    Ok(())
}

/// Walks a 16-bit weight one block of output features at a time (at most `block` values per
/// block): widens features `m0 .. m0 + mb` into one reused scratch `s`, in the stored order
/// (`(mb, K)` rows for `OutIn`, `(K, mb)` for `InOut`, so each copy is a contiguous run), and
/// calls `f(m0, mb, s, strides)`, `strides` reading `s` as the logical `(K, mb)` matrix
/// `W_block^T`.
fn for_each_widened_block(
    w: WeightData,
    layout: WeightLayout,
    (k, m): (usize, usize),
    block: usize,
    mut f: impl FnMut(usize, usize, &[f32], (isize, isize)),
) {
    let per = (block / k.max(1)).clamp(1, m.max(1));
    let mut scratch = vec![0.0f32; per * k];
    for m0 in (0..m).step_by(per) {
        let mb = per.min(m - m0);
        let s = &mut scratch[..mb * k];
        let strides = match layout {
            WeightLayout::OutIn => {
                s.par_chunks_mut(k.max(1))
                    .enumerate()
                    .for_each(|(i, row)| w.widen((m0 + i) * k, row));
                (1, k as isize) // element (kk, j) at j*K + kk
            }
            WeightLayout::InOut => {
                s.par_chunks_mut(mb.max(1))
                    .enumerate()
                    .for_each(|(kk, row)| w.widen(kk * m + m0, row));
                (mb as isize, 1) // element (kk, j) at kk*mb + j
            }
        };
        f(m0, mb, s, strides);
    }
}

/// The adapter part of the layer.
#[derive(Clone, Copy, Debug)]
pub struct LoraWeights<'a> {
    /// A: `(R, K)`.
    pub a: &'a [f32],
    /// B: `(M, R)`.
    pub b: &'a [f32],
    /// R.
    pub rank: usize,
    /// s: `alpha / R` or `alpha / sqrt(R)`.
    pub scale: f32,
    /// Optional dropout on the adapter input.
    pub dropout: Option<Dropout>,
}

/// Gradient outputs of [`lora_linear_backward`]; each present buffer is *accumulated* into.
#[derive(Debug, Default)]
pub struct LinearGrads<'a> {
    /// `(N, K)`.
    pub dx: Option<&'a mut [f32]>,
    /// Base weight gradient, same layout as the weight. `None` for a frozen weight: then no
    /// weight-gradient GEMM runs at all.
    pub dw: Option<&'a mut [f32]>,
    /// `(M)`.
    pub dbias: Option<&'a mut [f32]>,
    /// `(R, K)`.
    pub da: Option<&'a mut [f32]>,
    /// `(M, R)`.
    pub db: Option<&'a mut [f32]>,
}

fn check_base(op: &'static str, base: &BaseLinear, d: LinearDims) -> Result<()> {
    let shape = match base.layout {
        WeightLayout::OutIn => [d.out, d.inp],
        WeightLayout::InOut => [d.inp, d.out],
    };
    check_len(op, "weight", base.weight.len(), &shape)?;
    if let Some(b) = base.bias {
        check_len(op, "bias", b.len(), &[d.out])?;
    }
    Ok(())
}

fn check_lora(op: &'static str, l: &LoraWeights, d: LinearDims) -> Result<()> {
    if l.rank == 0 {
        return Err(invalid(op, "rank", "must be at least 1"));
    }
    check_len(op, "lora_a", l.a.len(), &[l.rank, d.inp])?;
    check_len(op, "lora_b", l.b.len(), &[d.out, l.rank])?;
    if !l.scale.is_finite() {
        return Err(invalid(
            op,
            "scale",
            format!("must be finite, got {}", l.scale),
        ));
    }
    if let Some(dr) = l.dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(invalid(
                op,
                "dropout.p",
                format!("must be in [0, 1), got {}", dr.p),
            ));
        }
    }
    Ok(())
}

/// From this rank up (and without dropout, whose mask the GEMMs cannot apply) the rank-R
/// products are real GEMMs that the `gemm` crate runs faster than the row passes.
const GEMM_MIN_RANK: usize = 16;

fn use_gemm_for_rank(l: &LoraWeights) -> bool {
    l.rank >= GEMM_MIN_RANK && l.dropout.is_none()
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; src.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = src[i * cols + j];
        }
    }
    t
}

/// Forward: `y = x W^T + b + s * drop(x) A^T B^T`, writing `u = drop(x) A^T` for backward.
///
/// ```
/// use lora_kernels::lora_linear::*;
/// let d = LinearDims { tokens: 2, inp: 3, out: 2 };
/// let (w, x) = ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let (a, b) = ([1.0, 1.0, 1.0], [0.5, -0.5]); // rank 1
/// let base = BaseLinear { weight: WeightData::F32(&w), layout: WeightLayout::OutIn, bias: None };
/// let lora = LoraWeights { a: &a, b: &b, rank: 1, scale: 2.0, dropout: None };
/// let (mut y, mut u) = ([0.0; 4], [0.0; 2]);
/// lora_linear_forward(&mut y, Some(&mut u), &x, &base, Some(&lora), d).unwrap();
/// assert_eq!(u, [6.0, 15.0]);                   // x A^T
/// assert_eq!(y, [1.0 + 6.0, 2.0 - 6.0, 4.0 + 15.0, 5.0 - 15.0]);
/// ```
///
/// `y`: `(N, M)`, overwritten. `u`: `(N, R)`, required iff `lora` is given. `x`: `(N, K)`.
pub fn lora_linear_forward(
    y: &mut [f32],
    u: Option<&mut [f32]>,
    x: &[f32],
    base: &BaseLinear,
    lora: Option<&LoraWeights>,
    d: LinearDims,
) -> Result<()> {
    const OP: &str = "lora_linear_forward";
    check_len(OP, "y", y.len(), &[d.tokens, d.out])?;
    check_len(OP, "x", x.len(), &[d.tokens, d.inp])?;
    check_base(OP, base, d)?;
    let initialised = match lora {
        Some(l) => {
            check_lora(OP, l, d)?;
            let u = u.ok_or_else(|| invalid(OP, "u", "required when an adapter is given"))?;
            check_len(OP, "u", u.len(), &[d.tokens, l.rank])?;
            if use_gemm_for_rank(l) {
                // u (N, R) = x (N, K) @ A^T
                matmul(
                    u,
                    x,
                    Trans::No,
                    l.a,
                    Trans::Yes,
                    (d.tokens, l.rank, d.inp),
                    1.0,
                    false,
                    Par::Auto,
                )?;
                if let Some(b) = base.bias {
                    for_rows(y, d.out, |_, blk| {
                        blk.chunks_exact_mut(d.out)
                            .for_each(|r| r.copy_from_slice(b))
                    });
                }
                // y (N, M) (+)= s * u (N, R) @ B^T
                let acc = base.bias.is_some();
                matmul(
                    y,
                    u,
                    Trans::No,
                    l.b,
                    Trans::Yes,
                    (d.tokens, d.out, l.rank),
                    l.scale,
                    acc,
                    Par::Auto,
                )?;
            } else {
                shrink_rows(u, x, l.a, d.inp, l.rank, 1.0, l.dropout, None, None);
                let bt = transpose(l.b, d.out, l.rank); // (R, M), tiny
                expand_rows(
                    y,
                    u,
                    &bt,
                    d.out,
                    l.rank,
                    l.scale,
                    ExpandInit::Set(base.bias),
                    None,
                );
            }
            true
        }
        None => match base.bias {
            Some(b) => {
                for_rows(y, d.out, |_, blk| {
                    blk.chunks_exact_mut(d.out)
                        .for_each(|r| r.copy_from_slice(b))
                });
                true
            }
            None => false,
        },
    };
    base_forward(y, x, base.weight, base.layout, d, initialised, WIDEN_BLOCK)
}

/// Backward of [`lora_linear_forward`]. `dy`: `(N, M)`; `u`: what forward wrote (required iff
/// `lora`). Every gradient in `grads` is accumulated into; absent ones are not computed. `x` is
/// read only for `dw` and `da`; without them it may be empty.
pub fn lora_linear_backward(
    grads: LinearGrads,
    dy: &[f32],
    x: &[f32],
    base: &BaseLinear,
    lora: Option<&LoraWeights>,
    u: Option<&[f32]>,
    d: LinearDims,
) -> Result<()> {
    const OP: &str = "lora_linear_backward";
    check_len(OP, "dy", dy.len(), &[d.tokens, d.out])?;
    check_base(OP, base, d)?;
    let LinearGrads {
        dx,
        dw,
        dbias,
        da,
        db,
    } = grads;
    // x is read only by dW and dA: a caller that wants neither may pass an empty slice (an
    // autograd tape then need not keep the layer's input alive).
    if da.is_some() || dw.is_some() || !x.is_empty() {
        check_len(OP, "x", x.len(), &[d.tokens, d.inp])?;
    }
    if let Some(dx) = dx.as_deref() {
        check_len(OP, "dx", dx.len(), &[d.tokens, d.inp])?;
    }
    if let Some(dbias) = dbias.as_deref() {
        check_len(OP, "dbias", dbias.len(), &[d.out])?;
    }
    let mut dx = dx;
    let mut dbias = dbias;
    if let Some(l) = lora {
        check_lora(OP, l, d)?;
        let u = u.ok_or_else(|| invalid(OP, "u", "required when an adapter is given"))?;
        check_len(OP, "u", u.len(), &[d.tokens, l.rank])?;
        let r = l.rank;
        let need_g = da.is_some() || dx.is_some();
        if let Some(db) = db.as_deref() {
            check_len(OP, "db", db.len(), &[d.out, r])?;
        }
        let big = use_gemm_for_rank(l);
        // The row pass computes g whenever it runs for dB, even if only dB is wanted.
        let g_len = if need_g || (!big && db.is_some()) {
            d.tokens * r
        } else {
            0
        };
        let mut g = vec![0.0f32; g_len];
        if big {
            if need_g {
                // g (N, R) = s * dy (N, M) @ B (M, R)
                matmul(
                    &mut g,
                    dy,
                    Trans::No,
                    l.b,
                    Trans::No,
                    (d.tokens, r, d.out),
                    l.scale,
                    false,
                    Par::Auto,
                )?;
            }
            if let Some(db) = db {
                // dB (M, R) += s * dy^T (M, N) @ u (N, R)
                matmul(
                    db,
                    dy,
                    Trans::Yes,
                    u,
                    Trans::No,
                    (d.out, r, d.tokens),
                    l.scale,
                    true,
                    Par::Auto,
                )?;
            }
            if let Some(dbias) = dbias.take() {
                shrink_rows(&mut [], dy, &[], d.out, 0, 1.0, None, Some(dbias), None);
            }
        } else if need_g || db.is_some() || dbias.is_some() {
            // One pass over dy: g = s * dy B (dots with the rows of B^T), dB^T += s * u^T dy and
            // db += colsum(dy).
            let bt = transpose(l.b, d.out, r); // (R, M)
            let mut dbt = if db.is_some() {
                vec![0.0f32; r * d.out]
            } else {
                Vec::new()
            };
            let outer = db.is_some().then_some((u, &mut dbt[..]));
            let rr = if g.is_empty() { 0 } else { r };
            shrink_rows(
                &mut g,
                dy,
                &bt,
                d.out,
                rr,
                l.scale,
                None,
                dbias.take(),
                outer,
            );
            if let Some(db) = db {
                for o in 0..d.out {
                    for j in 0..r {
                        db[o * r + j] += dbt[j * d.out + o];
                    }
                }
            }
        }
        if let Some(da) = da {
            check_len(OP, "da", da.len(), &[r, d.inp])?;
            if big {
                // dA (R, K) += g^T (R, N) @ x (N, K)
                matmul(
                    da,
                    &g,
                    Trans::Yes,
                    x,
                    Trans::No,
                    (r, d.inp, d.tokens),
                    1.0,
                    true,
                    Par::Auto,
                )?;
            } else {
                outer_accumulate(da, &g, x, d.inp, r, 1.0, l.dropout);
            }
        }
        if let Some(dx) = dx.as_deref_mut() {
            if big {
                // dx (N, K) += g (N, R) @ A (R, K)
                matmul(
                    dx,
                    &g,
                    Trans::No,
                    l.a,
                    Trans::No,
                    (d.tokens, d.inp, r),
                    1.0,
                    true,
                    Par::Auto,
                )?;
            } else {
                expand_rows(
                    dx,
                    &g,
                    l.a,
                    d.inp,
                    r,
                    1.0,
                    ExpandInit::Accumulate,
                    l.dropout,
                );
            }
        }
    } else if let Some(dbias) = dbias.take() {
        shrink_rows(&mut [], dy, &[], d.out, 0, 1.0, None, Some(dbias), None);
    }
    if let Some(dx) = dx {
        // dx (N, K) += dy (N, M) @ W (M, K)
        base_backward_dx(dx, dy, base.weight, base.layout, d, WIDEN_BLOCK)?;
    }
    if let Some(dw) = dw {
        match base.layout {
            // dW (M, K) += dy^T (M, N) @ x (N, K)
            WeightLayout::OutIn => {
                check_len(OP, "dw", dw.len(), &[d.out, d.inp])?;
                matmul(
                    dw,
                    dy,
                    Trans::Yes,
                    x,
                    Trans::No,
                    (d.out, d.inp, d.tokens),
                    1.0,
                    true,
                    Par::Auto,
                )?;
            }
            // dW (K, M) += x^T (K, N) @ dy (N, M)
            WeightLayout::InOut => {
                check_len(OP, "dw", dw.len(), &[d.inp, d.out])?;
                matmul(
                    dw,
                    x,
                    Trans::Yes,
                    dy,
                    Trans::No,
                    (d.inp, d.out, d.tokens),
                    1.0,
                    true,
                    Par::Auto,
                )?;
            }
        }
    }
    Ok(())
}

/// Runs `f(first_row, block)` over blocks of whole rows of `buf`, in parallel when large.
fn for_rows<F: Fn(usize, &mut [f32]) + Sync + Send>(buf: &mut [f32], cols: usize, f: F) {
    crate::par::for_row_blocks(buf, cols, f)
}

/// How [`expand_rows`] treats the existing output.
#[derive(Clone, Copy)]
enum ExpandInit<'a> {
    /// Overwrite with the bias (or zero), then add.
    Set(Option<&'a [f32]>),
    /// Add to what is there.
    Accumulate,
}

/// `out[i, :] (=|+=) mask_i ⊙ (scale * sum_j coeffs[i, j] * mat[j, :])` (plus the bias in `Set`).
/// `out`: `(N, C)`, `coeffs`: `(N, R)`, `mat`: `(R, C)`. The mask, when given, is the dropout
/// multiplier of element `(i, c)` of an `(N, C)` tensor.
#[allow(clippy::too_many_arguments)]
fn expand_rows(
    out: &mut [f32],
    coeffs: &[f32],
    mat: &[f32],
    c: usize,
    r: usize,
    scale: f32,
    init: ExpandInit,
    mask: Option<Dropout>,
) {
    for_rows(out, c, |row0, blk| {
        with_simd!(expand_block(
            blk, row0, coeffs, mat, c, r, scale, init, mask
        ))
    });
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn expand_block<S: Simd>(
    blk: &mut [f32],
    row0: usize,
    coeffs: &[f32],
    mat: &[f32],
    c: usize,
    r: usize,
    scale: f32,
    init: ExpandInit,
    mask: Option<Dropout>,
) {
    let mat_rows: Vec<&[f32]> = mat.chunks_exact(c).collect();
    let mut tmp = if mask.is_some() {
        vec![0.0f32; c]
    } else {
        Vec::new()
    };
    let mut co = vec![0.0f32; r];
    for (bi, orow) in blk.chunks_exact_mut(c).enumerate() {
        let i = row0 + bi;
        if let ExpandInit::Set(bias) = init {
            match bias {
                Some(b) => orow.copy_from_slice(b),
                None => orow.fill(0.0),
            }
        }
        for (d, s) in co.iter_mut().zip(&coeffs[i * r..(i + 1) * r]) {
            *d = scale * s;
        }
        match mask {
            None => axpy_many::<S>(orow, &co, &mat_rows),
            Some(dr) => {
                tmp.fill(0.0);
                axpy_many::<S>(&mut tmp, &co, &mat_rows);
                let base = (i * c) as u64;
                for (cc, (o, t)) in orow.iter_mut().zip(&tmp).enumerate() {
                    *o += dropout_mult(dr.p, dr.seed, base + cc as u64) * t;
                }
            }
        }
    }
}

/// `out[i, j] = scale * sum_c mask(i, c) * x[i, c] * mat[j, c]` (`out`: `(N, R)`, `x`: `(N, C)`,
/// `mat`: `(R, C)`), and from the same pass over `x`:
/// - `colsum[c] += sum_i x[i, c]` when given (the bias gradient when `x` is `dy`);
/// - `outer.1[j, c] += scale * sum_i outer.0[i, j] * x[i, c]` when given (`outer.0`: `(N, R)`,
///   `outer.1`: `(R, C)`; with `x = dy`, `outer.0 = u` this is `dB^T`).
///
/// Partial sums are reduced over a fixed partition of rows in a fixed order, so the result does
/// not depend on scheduling.
#[allow(clippy::too_many_arguments)]
fn shrink_rows(
    out: &mut [f32],
    x: &[f32],
    mat: &[f32],
    c: usize,
    r: usize,
    scale: f32,
    mask: Option<Dropout>,
    colsum: Option<&mut [f32]>,
    outer: Option<(&[f32], &mut [f32])>,
) {
    let n = x.len().checked_div(c).unwrap_or(0);
    if n == 0 {
        return;
    }
    let rpt = if n * c < PAR_THRESHOLD {
        n
    } else {
        rows_per_task(n, c)
    };
    let tasks = n.div_ceil(rpt);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let want_sums = colsum.is_some();
    let (outer_coeffs, outer_dst) = match outer {
        Some((co, dst)) => (Some(co), Some(dst)),
        None => (None, None),
    };
    let run = |t: usize| -> (Vec<f32>, Vec<f32>) {
        let rows = t * rpt..((t + 1) * rpt).min(n);
        let mut sums = if want_sums {
            vec![0.0f32; c]
        } else {
            Vec::new()
        };
        let mut outer_part = if outer_coeffs.is_some() {
            vec![0.0f32; r * c]
        } else {
            Vec::new()
        };
        let out_len = rows.len() * r;
        // SAFETY: task t writes only rows [t*rpt, (t+1)*rpt) of `out` (length n*r when r > 0),
        // disjoint from every other task; `out` is mutably borrowed for the whole call.
        let out_blk =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(rows.start * r), out_len) };
        let co = outer_coeffs.map(|co| &co[rows.start * r..rows.end * r]);
        with_simd!(shrink_block(
            out_blk,
            rows.start,
            &x[rows.start * c..rows.end * c],
            mat,
            c,
            r,
            scale,
            mask,
            &mut sums,
            co,
            &mut outer_part
        ));
        (sums, outer_part)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if tasks == 1 {
        vec![run(0)]
    } else {
        (0..tasks).into_par_iter().map(run).collect()
    };
    if let Some(cs) = colsum {
        for (p, _) in &partials {
            cs.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
    if let Some(dst) = outer_dst {
        for (_, p) in &partials {
            dst.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn shrink_block<S: Simd>(
    out: &mut [f32],
    row0: usize,
    x: &[f32],
    mat: &[f32],
    c: usize,
    r: usize,
    scale: f32,
    mask: Option<Dropout>,
    sums: &mut [f32],
    outer_coeffs: Option<&[f32]>,
    outer: &mut [f32],
) {
    let mat_rows: Vec<&[f32]> = if r == 0 {
        Vec::new()
    } else {
        mat.chunks_exact(c).collect()
    };
    let mut tmp = if mask.is_some() {
        vec![0.0f32; c]
    } else {
        Vec::new()
    };
    let rows: Vec<&[f32]> = x.chunks_exact(c).collect();
    for (bi, xrow) in rows.iter().enumerate() {
        if !sums.is_empty() {
            S::axpy(sums, 1.0, xrow);
        }
        if r == 0 {
            continue;
        }
        let row: &[f32] = match mask {
            None => xrow,
            Some(dr) => {
                let base = ((row0 + bi) * c) as u64;
                for (cc, (t, xv)) in tmp.iter_mut().zip(xrow.iter()).enumerate() {
                    *t = dropout_mult(dr.p, dr.seed, base + cc as u64) * xv;
                }
                &tmp
            }
        };
        dot_many::<S>(&mut out[bi * r..(bi + 1) * r], scale, row, &mat_rows);
    }
    // outer[j, :] += scale * sum_i coeffs[i, j] * x[i, :], four rows of x per update of outer.
    if let Some(co) = outer_coeffs {
        let mut i = 0;
        while i < rows.len() {
            let take = (rows.len() - i).min(4);
            for j in 0..r {
                let dst = &mut outer[j * c..(j + 1) * c];
                if take == 4 {
                    let cf = [
                        co[i * r + j] * scale,
                        co[(i + 1) * r + j] * scale,
                        co[(i + 2) * r + j] * scale,
                        co[(i + 3) * r + j] * scale,
                    ];
                    S::axpy4(dst, cf, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]]);
                } else {
                    for t in 0..take {
                        S::axpy(dst, co[(i + t) * r + j] * scale, rows[i + t]);
                    }
                }
            }
            i += take;
        }
    }
}

/// `dst[j, c] += scale * sum_i coeffs[i, j] * mask(i, c) * rows[i, c]` (`dst`: `(R, C)`,
/// `coeffs`: `(N, R)`, `rows`: `(N, C)`). Parallel over column strips, so no reduction is needed
/// and each strip of `dst` stays in L1.
#[allow(clippy::too_many_arguments)]
fn outer_accumulate(
    dst: &mut [f32],
    coeffs: &[f32],
    rows: &[f32],
    c: usize,
    r: usize,
    scale: f32,
    mask: Option<Dropout>,
) {
    let n = rows.len().checked_div(c).unwrap_or(0);
    // Strip width: keep the (R, strip) accumulator within ~16 KiB, multiple of 16 lanes.
    let strip = ((4096 / r.max(1)) / 16 * 16).clamp(16, 512).min(c.max(1));
    let strips = c.div_ceil(strip);
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let run = |s: usize| {
        let c0 = s * strip;
        let c1 = (c0 + strip).min(c);
        let acc = with_simd!(outer_strip(coeffs, rows, n, c, r, c0, c1, mask));
        let w = c1 - c0;
        for j in 0..r {
            // SAFETY: strip s writes only columns [c0, c1) of row j of `dst` ((R, C), checked by
            // the callers), a range no other strip touches; `dst` is mutably borrowed for the
            // whole call, so only these disjoint sub-slices exist at once.
            let drow = unsafe { std::slice::from_raw_parts_mut(dst_ptr.get().add(j * c + c0), w) };
            for (d, a) in drow.iter_mut().zip(&acc[j * w..(j + 1) * w]) {
                *d += scale * a;
            }
        }
    };
    if n * c * r < PAR_THRESHOLD * 4 || strips == 1 {
        (0..strips).for_each(run);
    } else {
        (0..strips).into_par_iter().for_each(run);
    }
}

/// The `(R, c1 - c0)` block `sum_i coeffs[i, :]^T mask ⊙ rows[i, c0..c1]`, four rows of
/// `rows` per update of the accumulator.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn outer_strip<S: Simd>(
    coeffs: &[f32],
    rows: &[f32],
    n: usize,
    c: usize,
    r: usize,
    c0: usize,
    c1: usize,
    mask: Option<Dropout>,
) -> Vec<f32> {
    let w = c1 - c0;
    let mut acc = vec![0.0f32; r * w];
    let mut tmp = vec![0.0f32; 4 * w];
    let mut i = 0;
    while i < n {
        let take = (n - i).min(4);
        let mut src: [&[f32]; 4] = [&[]; 4];
        if let Some(dr) = mask {
            for t in 0..take {
                let row = &rows[(i + t) * c + c0..(i + t) * c + c1];
                let base = ((i + t) * c + c0) as u64;
                for (cc, (d, xv)) in tmp[t * w..(t + 1) * w].iter_mut().zip(row).enumerate() {
                    *d = dropout_mult(dr.p, dr.seed, base + cc as u64) * xv;
                }
            }
            for (t, chunk) in tmp.chunks_exact(w).take(take).enumerate() {
                src[t] = chunk;
            }
        } else {
            for (t, s) in src.iter_mut().take(take).enumerate() {
                *s = &rows[(i + t) * c + c0..(i + t) * c + c1];
            }
        }
        for j in 0..r {
            let a = &mut acc[j * w..(j + 1) * w];
            if take == 4 {
                let cf = [
                    coeffs[i * r + j],
                    coeffs[(i + 1) * r + j],
                    coeffs[(i + 2) * r + j],
                    coeffs[(i + 3) * r + j],
                ];
                S::axpy4(a, cf, src);
            } else {
                for t in 0..take {
                    S::axpy(a, coeffs[(i + t) * r + j], src[t]);
                }
            }
        }
        i += take;
    }
    acc
}

/// Naive `f64` oracle for the layer, straight from the formulas in the module docs.
pub mod reference {
    use super::{Dropout, WeightLayout};
    use crate::rng::dropout_mult;

    /// Weight element `W[o, k]` in the logical `(M, K)` orientation.
    fn w_at(w: &[f64], layout: WeightLayout, o: usize, k: usize, inp: usize, out: usize) -> f64 {
        match layout {
            WeightLayout::OutIn => w[o * inp + k],
            WeightLayout::InOut => w[k * out + o],
        }
    }

    fn drop_x(x: &[f64], dropout: Option<Dropout>) -> Vec<f64> {
        match dropout {
            None => x.to_vec(),
            Some(d) => x
                .iter()
                .enumerate()
                .map(|(i, v)| v * dropout_mult(d.p, d.seed, i as u64) as f64)
                .collect(),
        }
    }

    /// Adapter tensors in `f64`.
    pub struct Lora<'a> {
        /// `(R, K)`
        pub a: &'a [f64],
        /// `(M, R)`
        pub b: &'a [f64],
        /// R
        pub rank: usize,
        /// s
        pub scale: f64,
        /// dropout on the adapter input
        pub dropout: Option<Dropout>,
    }

    /// Returns `(y (N, M), u (N, R))`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        x: &[f64],
        w: &[f64],
        layout: WeightLayout,
        bias: Option<&[f64]>,
        lora: Option<&Lora>,
        (n, inp, out): (usize, usize, usize),
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; n * out];
        let r = lora.map_or(0, |l| l.rank);
        let mut u = vec![0.0; n * r];
        if let Some(l) = lora {
            let xd = drop_x(x, l.dropout);
            for i in 0..n {
                for j in 0..r {
                    u[i * r + j] = (0..inp).map(|k| xd[i * inp + k] * l.a[j * inp + k]).sum();
                }
            }
        }
        for i in 0..n {
            for o in 0..out {
                let mut acc: f64 = (0..inp)
                    .map(|k| x[i * inp + k] * w_at(w, layout, o, k, inp, out))
                    .sum();
                if let Some(b) = bias {
                    acc += b[o];
                }
                if let Some(l) = lora {
                    acc += l.scale * (0..r).map(|j| u[i * r + j] * l.b[o * r + j]).sum::<f64>();
                }
                y[i * out + o] = acc;
            }
        }
        (y, u)
    }

    /// Gradients `(dx, dw, dbias, da, db)` of `sum(y * dy)`; `dw` in the weight's own layout.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn backward(
        dy: &[f64],
        x: &[f64],
        w: &[f64],
        layout: WeightLayout,
        lora: Option<&Lora>,
        (n, inp, out): (usize, usize, usize),
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut dx = vec![0.0; n * inp];
        let mut dw = vec![0.0; inp * out];
        let mut dbias = vec![0.0; out];
        for i in 0..n {
            for o in 0..out {
                let g = dy[i * out + o];
                dbias[o] += g;
                for k in 0..inp {
                    dx[i * inp + k] += g * w_at(w, layout, o, k, inp, out);
                    let idx = match layout {
                        WeightLayout::OutIn => o * inp + k,
                        WeightLayout::InOut => k * out + o,
                    };
                    dw[idx] += g * x[i * inp + k];
                }
            }
        }
        let (mut da, mut db) = (Vec::new(), Vec::new());
        if let Some(l) = lora {
            let r = l.rank;
            let xd = drop_x(x, l.dropout);
            let mut u = vec![0.0; n * r];
            for i in 0..n {
                for j in 0..r {
                    u[i * r + j] = (0..inp).map(|k| xd[i * inp + k] * l.a[j * inp + k]).sum();
                }
            }
            // g (N, R) = s * dy B
            let mut g = vec![0.0; n * r];
            for i in 0..n {
                for j in 0..r {
                    g[i * r + j] = l.scale
                        * (0..out)
                            .map(|o| dy[i * out + o] * l.b[o * r + j])
                            .sum::<f64>();
                }
            }
            db = vec![0.0; out * r];
            for o in 0..out {
                for j in 0..r {
                    db[o * r + j] =
                        l.scale * (0..n).map(|i| dy[i * out + o] * u[i * r + j]).sum::<f64>();
                }
            }
            da = vec![0.0; r * inp];
            for j in 0..r {
                for k in 0..inp {
                    da[j * inp + k] = (0..n).map(|i| g[i * r + j] * xd[i * inp + k]).sum();
                }
            }
            for i in 0..n {
                for k in 0..inp {
                    let ga: f64 = (0..r).map(|j| g[i * r + j] * l.a[j * inp + k]).sum();
                    let m = match l.dropout {
                        None => 1.0,
                        Some(d) => dropout_mult(d.p, d.seed, (i * inp + k) as u64) as f64,
                    };
                    dx[i * inp + k] += m * ga;
                }
            }
        }
        (dx, dw, dbias, da, db)
    }
}

#[cfg(test)]
mod half_weight_tests {
    use super::*;
    use crate::rng::Rng;

    /// A 16-bit weight, widened block by block (blocks of one feature up to more than all of
    /// them), gives the same products as the f32 path on the widened values: forward (onto
    /// existing values and not) and dx, both layouts, bf16 and f16.
    #[test]
    fn half_weights_widen_blockwise_to_the_f32_products() {
        let mut rng = Rng::new(3);
        for &(n, k, m) in &[(1, 1, 1), (3, 5, 7), (17, 33, 10), (8, 64, 65)] {
            let vals: Vec<f32> = (0..k * m)
                .map(|_| rng.uniform_range(-2.0, 2.0) as f32)
                .collect();
            let x: Vec<f32> = (0..n * k)
                .map(|_| rng.uniform_range(-1.0, 1.0) as f32)
                .collect();
            let dy: Vec<f32> = (0..n * m)
                .map(|_| rng.uniform_range(-1.0, 1.0) as f32)
                .collect();
            let bf: Vec<u16> = vals
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let hf: Vec<u16> = vals
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let wide = |w: WeightData| {
                let mut o = vec![0.0; k * m];
                w.widen(0, &mut o);
                o
            };
            let d = LinearDims {
                tokens: n,
                inp: k,
                out: m,
            };
            for half in [WeightData::Bf16(&bf), WeightData::F16(&hf)] {
                let w32 = wide(half);
                for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                    for block in [1, k, 3 * k + 1, k * m + 5] {
                        for acc in [false, true] {
                            let mut want = vec![0.25f32; n * m];
                            base_forward(
                                &mut want,
                                &x,
                                WeightData::F32(&w32),
                                layout,
                                d,
                                acc,
                                block,
                            )
                            .unwrap();
                            let mut got = vec![0.25f32; n * m];
                            base_forward(&mut got, &x, half, layout, d, acc, block).unwrap();
                            let err = got
                                .iter()
                                .zip(&want)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f32::max);
                            assert!(
                                err <= 1e-5,
                                "forward {half:?} {layout:?} block {block}: {err}"
                            );
                        }
                        let mut want = vec![0.5f32; n * k];
                        base_backward_dx(&mut want, &dy, WeightData::F32(&w32), layout, d, block)
                            .unwrap();
                        let mut got = vec![0.5f32; n * k];
                        base_backward_dx(&mut got, &dy, half, layout, d, block).unwrap();
                        let err = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f32::max);
                        assert!(err <= 1e-5, "dx {layout:?} block {block}: {err}");
                    }
                }
            }
        }
        // Widening is exact: bf16 is the top half of the f32 bits.
        let v = half::bf16::from_f32(-3.140625);
        let mut o = [0.0f32];
        WeightData::Bf16(&[v.to_bits()]).widen(0, &mut o);
        assert_eq!(o[0], -3.140625);
    }
}
