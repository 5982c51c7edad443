//! Fused forward of bidirectional attention for one (batch, head) on AVX2+FMA (flash-style):
//! the scores of a block of query rows against a block of keys are computed, exponentiated and
//! multiplied into the output while they sit in L1, instead of a `rows x S` score matrix
//! written by one GEMM, swept three times by the softmax and packed again by the next GEMM.
//!
//! ```text
//! K_g packed once per head in panels of NR keys:  kp[panel][c][j]  (zero-padded tail panel)
//! for each block of BR query rows (copied to a contiguous, zero-padded buffer):
//!     m = -inf, l = 0, O = 0                               (per row)
//!     for each block of BC keys:
//!         S = scale * Q K^T        MR x NR register tiles, summed over D in order
//!         m' = max(m, max_j S);  O *= e^{m - m'};  l *= e^{m - m'}   (not on the first block)
//!         P = e^{S - m'};  l += sum_j P                    (fastmath's exp, 8 partial sums)
//!         O += P V                 rows x 8*NV register tiles, summed over the block's keys
//!     out = O / l;  lse = m + ln l
//! ```
//!
//! The same quantities as [`super::attention_forward`]'s two-pass route, rounded differently
//! (the running maximum rescales earlier partial sums; `1 / l` is applied to `O`, not `P`);
//! both are tested against the f64 definition. Used only where it applies ([`applies`]): no
//! causal mask (decoders keep the blocked route, whose results their adapters were built
//! with), a head dimension that is a multiple of 8, and a CPU with AVX2 and FMA.

use super::AttnDims;
use std::arch::x86_64::*;

/// Query rows per score tile.
pub(super) const MR: usize = 6;
/// Keys per score tile (two 8-lane vectors) and per packed panel.
pub(super) const NR: usize = 16;
/// Query rows per block: the output accumulators (`BR x D`) stay in L1.
const BR: usize = 48;
/// Keys per block: the `BR x BC` scores (12 KiB) and the block's packed keys and values (10
/// KiB each at D = 40) about fill L1. (On Zen 3 at SD's 4096 x 4096, D = 40: 64 keys ran
/// ahead of 32, 128 and 256 and 48 rows ahead of 24 and 96, by 5-15%, inside the machine's
/// noise for the closer pairs.)
const BC: usize = 64;

/// Whether the fused kernels handle this shape on this CPU.
pub(super) fn applies(d: &AttnDims) -> bool {
    !d.causal && d.head_dim % 8 == 0 && d.head_dim > 0 && crate::simd::has_avx2_fma()
}

/// Per-task buffers, kept between heads.
#[derive(Default)]
pub(super) struct Scratch {
    kp: Vec<f32>,
    vp: Vec<f32>,
    qb: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
}

/// Packs a key head view (`sk` rows of `hd` at stride `ks`) into `NR`-key panels,
/// `kp[(p * hd + c) * NR + j] = k[p * NR + j][c]`, the tail panel zero-padded.
///
/// # Safety
/// `k` addresses `sk` rows of `hd` readable values at stride `ks`.
pub(super) unsafe fn pack_keys(kp: &mut Vec<f32>, k: *const f32, ks: usize, sk: usize, hd: usize) {
    let panels = sk.div_ceil(NR);
    kp.clear();
    kp.resize(panels * NR * hd, 0.0);
    for p in 0..panels {
        let panel = &mut kp[p * hd * NR..(p + 1) * hd * NR];
        for j in 0..NR.min(sk - p * NR) {
            let row = k.add((p * NR + j) * ks);
            for c in 0..hd {
                panel[c * NR + j] = *row.add(c);
            }
        }
    }
}

/// Copies query rows `i0..i0 + rows` (stride `qs`) into `qb` as `rows` rounded up to [`MR`]
/// contiguous rows, the extra ones zero.
///
/// # Safety
/// `q` addresses rows `i0..i0 + rows` of `hd` readable values at stride `qs`.
unsafe fn copy_queries(
    qb: &mut Vec<f32>,
    q: *const f32,
    qs: usize,
    (i0, rows, hd): (usize, usize, usize),
) {
    let rpad = rows.div_ceil(MR) * MR;
    qb.clear();
    qb.resize(rpad * hd, 0.0);
    for r in 0..rows {
        qb[r * hd..(r + 1) * hd]
            .copy_from_slice(std::slice::from_raw_parts(q.add((i0 + r) * qs), hd));
    }
}

/// The scores of query rows `i0..i0 + rows` against keys `j0..j0 + cols` of packed `kp`:
/// `s[r * lds + j] = scale * sum_c q[i0 + r][c] k[j0 + j][c]`, summed over `c` in order. Writes
/// `rows` and `cols` rounded up to [`MR`] and [`NR`] (the padding holds zeros' scores); the same
/// bits for an element whatever the block it is computed in, so the backward's recomputed
/// scores equal the forward's.
///
/// # Safety
/// AVX2+FMA; `q` as for [`copy_queries`]; `j0` a multiple of [`NR`]; `kp` packed by
/// [`pack_keys`] for at least `j0 + cols` keys; `s` holds `rows` rounded up to [`MR`] rows of
/// `lds >= cols` rounded up to [`NR`] values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scores(
    s: *mut f32,
    lds: usize,
    qb: &mut Vec<f32>,
    (q, qs): (*const f32, usize),
    kp: &[f32],
    (i0, rows, j0, cols, hd): (usize, usize, usize, usize, usize),
    scale: f32,
) {
    copy_queries(qb, q, qs, (i0, rows, hd));
    score_tiles(s, lds, qb, kp, (rows, j0, cols, hd), scale);
}

/// [`scores`] on queries already copied into `qb` by [`copy_queries`].
#[target_feature(enable = "avx2,fma")]
unsafe fn score_tiles(
    s: *mut f32,
    lds: usize,
    qb: &[f32],
    kp: &[f32],
    (rows, j0, cols, hd): (usize, usize, usize, usize),
    scale: f32,
) {
    for r0 in (0..rows).step_by(MR) {
        for pi in 0..cols.div_ceil(NR) {
            score_tile(
                qb.as_ptr().add(r0 * hd),
                hd,
                kp.as_ptr().add((j0 / NR + pi) * hd * NR),
                s.add(r0 * lds + pi * NR),
                lds,
                scale,
            );
        }
    }
}

/// One head's forward: `out` rows `0..t` (row stride `qs`) and `lse[0..t]` from `q` (row
/// stride `qs`), `k` and `v` (row stride `ks`), all head views of `hd` values per row.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`applies`]); `q` and `out` address `t` rows, `k` and `v` `sk`
/// rows, of `hd` readable (writable for `out`) values at the given strides; `hd % 8 == 0`;
/// `lse.len() >= t`; nothing else writes `out`'s rows meanwhile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_head(
    scratch: &mut Scratch,
    out: *mut f32,
    lse: &mut [f32],
    (q, qs): (*const f32, usize),
    (k, v, ks): (*const f32, *const f32, usize),
    (t, sk, hd): (usize, usize, usize),
    scale: f32,
) {
    let Scratch { kp, vp, qb, s, o } = scratch;
    pack_keys(kp, k, ks, sk, hd);
    // The values as contiguous rows: the output tiles read one row per key.
    vp.clear();
    for j in 0..sk {
        vp.extend_from_slice(std::slice::from_raw_parts(v.add(j * ks), hd));
    }
    s.resize(BR * BC, 0.0);
    o.resize(BR * hd, 0.0);
    let (mut m, mut l) = ([f32::NEG_INFINITY; BR], [0.0f32; BR]);
    for i0 in (0..t).step_by(BR) {
        let rows = BR.min(t - i0);
        let rpad = rows.div_ceil(MR) * MR;
        o[..rpad * hd].fill(0.0);
        copy_queries(qb, q, qs, (i0, rows, hd));
        for j0 in (0..sk).step_by(BC) {
            let cols = BC.min(sk - j0);
            score_tiles(s.as_mut_ptr(), BC, qb, kp, (rows, j0, cols, hd), scale);
            for r in 0..rows {
                let row = &mut s[r * BC..r * BC + cols];
                let mb = row.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
                if j0 == 0 {
                    m[r] = mb;
                    l[r] = 0.0;
                } else if mb > m[r] {
                    let alpha = crate::fastmath::exp(m[r] - mb);
                    for x in &mut o[r * hd..(r + 1) * hd] {
                        *x *= alpha;
                    }
                    l[r] *= alpha;
                    m[r] = mb;
                }
                l[r] += crate::fastmath::exp_in_place_sum(row, m[r]);
            }
            pv(
                s.as_ptr(),
                cols,
                vp.as_ptr().add(j0 * hd),
                hd,
                o.as_mut_ptr(),
                (rpad, hd),
            );
        }
        for r in 0..rows {
            let inv = 1.0 / l[r];
            let dst = std::slice::from_raw_parts_mut(out.add((i0 + r) * qs), hd);
            for (x, &y) in dst.iter_mut().zip(&o[r * hd..(r + 1) * hd]) {
                *x = y * inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
    }
}

/// `s[r * lds + j] = scale * sum_c q[r * hd + c] * kp[c * NR + j]` for `r < MR`, `j < NR`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_tile(
    q: *const f32,
    hd: usize,
    kp: *const f32,
    s: *mut f32,
    lds: usize,
    scale: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for c in 0..hd {
        let k0 = _mm256_loadu_ps(kp.add(c * NR));
        let k1 = _mm256_loadu_ps(kp.add(c * NR + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let qv = _mm256_broadcast_ss(&*q.add(r * hd + c));
            a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
            a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
        }
    }
    let sc = _mm256_set1_ps(scale);
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(s.add(r * lds), _mm256_mul_ps(a[0], sc));
        _mm256_storeu_ps(s.add(r * lds + 8), _mm256_mul_ps(a[1], sc));
    }
}

/// `o[r, :] += sum_{j < cols} p[r * BC + j] * v[j * vs, :]` for `r < rows` (a multiple of
/// [`MR`]), in chunks of at most 5 vectors of the head dimension, each over row groups sized
/// so the accumulators, one chunk of `v`'s row and the broadcast probability fit the 16
/// registers.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv(
    p: *const f32,
    cols: usize,
    v: *const f32,
    vs: usize,
    o: *mut f32,
    (rows, hd): (usize, usize),
) {
    let mut c0 = 0;
    while c0 < hd {
        let nv = ((hd - c0) / 8).min(5);
        let (vc, oc) = (v.add(c0), o.add(c0));
        match nv {
            1 => pv_tiles::<6, 1>(p, cols, vc, vs, oc, (rows, hd)),
            2 => pv_tiles::<6, 2>(p, cols, vc, vs, oc, (rows, hd)),
            3 => pv_tiles::<3, 3>(p, cols, vc, vs, oc, (rows, hd)),
            4 => pv_tiles::<2, 4>(p, cols, vc, vs, oc, (rows, hd)),
            _ => pv_tiles::<2, 5>(p, cols, vc, vs, oc, (rows, hd)),
        }
        c0 += nv * 8;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_tiles<const RR: usize, const NV: usize>(
    p: *const f32,
    cols: usize,
    v: *const f32,
    vs: usize,
    o: *mut f32,
    (rows, hd): (usize, usize),
) {
    for r0 in (0..rows).step_by(RR) {
        let mut acc = [[_mm256_setzero_ps(); NV]; RR];
        for (r, a) in acc.iter_mut().enumerate() {
            for (x, ax) in a.iter_mut().enumerate() {
                *ax = _mm256_loadu_ps(o.add((r0 + r) * hd + x * 8));
            }
        }
        for j in 0..cols {
            let vr = v.add(j * vs);
            let mut vv = [_mm256_setzero_ps(); NV];
            for (x, vx) in vv.iter_mut().enumerate() {
                *vx = _mm256_loadu_ps(vr.add(x * 8));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let pr = _mm256_broadcast_ss(&*p.add((r0 + r) * BC + j));
                for (ax, &vx) in a.iter_mut().zip(&vv) {
                    *ax = _mm256_fmadd_ps(pr, vx, *ax);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (x, &ax) in a.iter().enumerate() {
                _mm256_storeu_ps(o.add((r0 + r) * hd + x * 8), ax);
            }
        }
    }
}
