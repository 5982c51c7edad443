//! Fused bidirectional attention on AVX2+FMA (flash-style). Forward, per (batch, head):
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
//! The backward ([`backward_head`], blocks of [`BACK_ROWS`] query rows against all keys)
//! recomputes the scores with the same kernel, so they are the forward's bits; `dP`, `dK^T` and
//! `dV^T` come from the same register tile ([`tile`]) with other strides, `dQ` from the
//! forward's output tiles ([`pv`]).
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

thread_local! {
    /// The forward's buffers, kept per thread between calls.
    pub(super) static FORWARD: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    /// The backward's buffers, kept per thread between calls.
    pub(super) static BACKWARD: std::cell::RefCell<BackScratch> = std::cell::RefCell::default();
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

/// The scores of the `rows` queries in `qb` (copied by [`copy_queries`]) against keys
/// `j0..j0 + cols` of packed `kp`: `s[r * lds + j] = scale * sum_c qb[r][c] k[j0 + j][c]`,
/// summed over `c` in order. Writes `rows` and `cols` rounded up to [`MR`] and [`NR`] (the
/// padding holds zeros' scores); the same bits for an element whatever the block it is
/// computed in, so the backward's recomputed scores are the forward's.
///
/// # Safety
/// AVX2+FMA; `j0` a multiple of [`NR`]; `kp` packed by [`pack_keys`] for at least `j0 + cols`
/// keys; `s` holds `rows` rounded up to [`MR`] rows of `lds >= cols` rounded up to [`NR`] values.
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
                (s.as_ptr(), BC),
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
    tile::<MR>((q, hd, 1), (kp, NR), hd, (s, lds), scale, false);
}

/// The register tile every product here is made of: for `i < R`, `j < NR`,
/// `c[i * ldc + j] = alpha * sum_{k < n} a[i * ars + k * aks] * b[k * bks + j]` (`+=` with
/// `add`), the sum over `k` in order, fused multiply-adds from zero, `alpha` applied once.
///
/// # Safety
/// AVX2+FMA; the addressed elements of `a`, `b` (read) and `c` (written) exist.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(
    (a, ars, aks): (*const f32, usize, usize),
    (b, bks): (*const f32, usize),
    n: usize,
    (c, ldc): (*mut f32, usize),
    alpha: f32,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in 0..n {
        let b0 = _mm256_loadu_ps(b.add(k * bks));
        let b1 = _mm256_loadu_ps(b.add(k * bks + 8));
        for (i, t) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * ars + k * aks));
            t[0] = _mm256_fmadd_ps(av, b0, t[0]);
            t[1] = _mm256_fmadd_ps(av, b1, t[1]);
        }
    }
    let al = _mm256_set1_ps(alpha);
    for (i, t) in acc.iter().enumerate() {
        for (h, &th) in t.iter().enumerate() {
            let dst = c.add(i * ldc + 8 * h);
            let x = _mm256_mul_ps(th, al);
            let x = if add {
                _mm256_add_ps(_mm256_loadu_ps(dst), x)
            } else {
                x
            };
            _mm256_storeu_ps(dst, x);
        }
    }
}

/// `ct[c * ldc + j] += sum_{r < n} a[r * hd + c] * b[r * ldb + j]` for `c < hd`, `j < cols`
/// rounded up to [`NR`]: a transposed product `A^T B` (the backward's `dS^T Q` and `P^T dO`,
/// written transposed), in tiles of 6 rows of `c` and a tail tile.
///
/// # Safety
/// AVX2+FMA; `a` holds `n` rows of `hd`, `b` `n` rows of `ldb >= cols` rounded up to [`NR`],
/// `ct` `hd` rows of `ldc` (same bound).
#[target_feature(enable = "avx2,fma")]
unsafe fn add_at_b(
    ct: *mut f32,
    ldc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    (n, cols, hd): (usize, usize, usize),
) {
    for j0 in (0..cols).step_by(NR) {
        let mut c0 = 0;
        while c0 < hd {
            let (ap, bp, cp) = (a.add(c0), b.add(j0), (ct.add(c0 * ldc + j0), ldc));
            match (hd - c0).min(MR) {
                6 => tile::<6>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
                5 => tile::<5>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
                4 => tile::<4>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
                3 => tile::<3>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
                2 => tile::<2>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
                _ => tile::<1>((ap, 1, hd), (bp, ldb), n, cp, 1.0, true),
            }
            c0 += MR;
        }
    }
}

/// `o[r, :] += sum_{j < cols} p[r * lp + j] * v[j * vs, :]` for `r < rows` (a multiple of
/// [`MR`]), in chunks of at most 5 vectors of the head dimension, each over row groups sized
/// so the accumulators, one chunk of `v`'s row and the broadcast probability fit the 16
/// registers.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv(
    (p, lp): (*const f32, usize),
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
            1 => pv_tiles::<6, 1>((p, lp), cols, vc, vs, oc, (rows, hd)),
            2 => pv_tiles::<6, 2>((p, lp), cols, vc, vs, oc, (rows, hd)),
            3 => pv_tiles::<3, 3>((p, lp), cols, vc, vs, oc, (rows, hd)),
            4 => pv_tiles::<2, 4>((p, lp), cols, vc, vs, oc, (rows, hd)),
            _ => pv_tiles::<2, 5>((p, lp), cols, vc, vs, oc, (rows, hd)),
        }
        c0 += nv * 8;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_tiles<const RR: usize, const NV: usize>(
    (p, lp): (*const f32, usize),
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
                let pr = _mm256_broadcast_ss(&*p.add((r0 + r) * lp + j));
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

/// Query rows per block of the fused backward (a multiple of [`MR`]): its scores and their
/// gradients (`2 x rows x S` floats, 1.5 MiB at S = 4096) stay near the core.
pub(super) const BACK_ROWS: usize = 48;

/// Row stride of the backward's `rows x S` buffers and of the transposed accumulators: `S`
/// rounded up to [`NR`], plus one panel when that is a multiple of 256 floats (a 1 KiB power of
/// two would map a column walk's rows onto a few cache sets).
fn back_stride(sk: usize) -> usize {
    let ld = sk.div_ceil(NR) * NR;
    if ld % 256 == 0 {
        ld + NR
    } else {
        ld
    }
}

/// Per-task buffers of the fused backward.
#[derive(Default)]
pub(super) struct BackScratch {
    kp: Vec<f32>,
    vp: Vec<f32>,
    kc: Vec<f32>,
    qb: Vec<f32>,
    dob: Vec<f32>,
    p: Vec<f32>,
    ds: Vec<f32>,
    dqb: Vec<f32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
}

/// Starts the backward of one kv head: packs its keys and values into panels (for the scores
/// and `dP = dO V^T`), keeps the keys as contiguous rows (for `dQ = dS K`), and zeroes the
/// transposed `dK`, `dV` accumulators (`D x S` rounded up to [`NR`]).
///
/// # Safety
/// `k`, `v` address `sk` rows of `hd` readable values at stride `ks`.
pub(super) unsafe fn backward_begin(
    sc: &mut BackScratch,
    (k, v, ks): (*const f32, *const f32, usize),
    (sk, hd): (usize, usize),
) {
    pack_keys(&mut sc.kp, k, ks, sk, hd);
    pack_keys(&mut sc.vp, v, ks, sk, hd);
    sc.kc.clear();
    for j in 0..sk {
        sc.kc
            .extend_from_slice(std::slice::from_raw_parts(k.add(j * ks), hd));
    }
    let ld = back_stride(sk);
    for acc in [&mut sc.dkt, &mut sc.dvt] {
        acc.clear();
        acc.resize(hd * ld, 0.0);
    }
}

/// One query head's share: for each block of `blk` query rows against all `sk` keys,
/// `S` (the forward's kernel and bits), `P = e^{S - lse}`, `dP = dO V^T`,
/// `dS = scale * P (dP - rowsum(P dP))`; `dq` rows `+= dS K`; the accumulators
/// `dK^T += Q^T dS`, `dV^T += dO^T P`.
///
/// # Safety
/// AVX2+FMA; [`backward_begin`] ran for this kv head; `q`, `dout` and `dq` address `t` rows of
/// `hd` values at stride `qs` (`dq` writable, by this task only); `lse.len() >= t`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn backward_head(
    sc: &mut BackScratch,
    (q, dout, dq, qs): (*const f32, *const f32, *mut f32, usize),
    lse: &[f32],
    (t, sk, hd, blk): (usize, usize, usize, usize),
    scale: f32,
) {
    let BackScratch {
        kp,
        vp,
        kc,
        qb,
        dob,
        p,
        ds,
        dqb,
        dkt,
        dvt,
    } = sc;
    let ld = back_stride(sk);
    for i0 in (0..t).step_by(blk) {
        let rows = blk.min(t - i0);
        let rpad = rows.div_ceil(MR) * MR;
        p.resize(rpad * ld, 0.0);
        ds.resize(rpad * ld, 0.0);
        copy_queries(qb, q, qs, (i0, rows, hd));
        copy_queries(dob, dout, qs, (i0, rows, hd));
        score_tiles(p.as_mut_ptr(), ld, qb, kp, (rows, 0, sk, hd), scale);
        score_tiles(ds.as_mut_ptr(), ld, dob, vp, (rows, 0, sk, hd), 1.0);
        for r in 0..rows {
            let pr = &mut p[r * ld..r * ld + sk];
            let dr = &mut ds[r * ld..r * ld + sk];
            crate::fastmath::exp_scaled_in_place(pr, lse[i0 + r], 1.0);
            let delta = dot(pr, dr);
            for (d, &pj) in dr.iter_mut().zip(pr.iter()) {
                *d = scale * (pj * (*d - delta));
            }
        }
        dqb.clear();
        dqb.resize(rpad * hd, 0.0);
        pv(
            (ds.as_ptr(), ld),
            sk,
            kc.as_ptr(),
            hd,
            dqb.as_mut_ptr(),
            (rpad, hd),
        );
        for r in 0..rows {
            let dst = std::slice::from_raw_parts_mut(dq.add((i0 + r) * qs), hd);
            for (x, &y) in dst.iter_mut().zip(&dqb[r * hd..(r + 1) * hd]) {
                *x += y;
            }
        }
        add_at_b(
            dkt.as_mut_ptr(),
            ld,
            qb.as_ptr(),
            ds.as_ptr(),
            ld,
            (rows, sk, hd),
        );
        add_at_b(
            dvt.as_mut_ptr(),
            ld,
            dob.as_ptr(),
            p.as_ptr(),
            ld,
            (rows, sk, hd),
        );
    }
}

/// Adds the transposed accumulators into `dk`, `dv` (`sk` rows of `hd` at stride `ks`).
///
/// # Safety
/// `dk`, `dv` address `sk` writable rows of `hd` values at stride `ks`, written by this task
/// only; [`backward_begin`] ran with the same `sk`, `hd`.
pub(super) unsafe fn backward_end(
    sc: &BackScratch,
    (dk, dv, ks): (*mut f32, *mut f32, usize),
    (sk, hd): (usize, usize),
) {
    let ld = back_stride(sk);
    for (dst, acc) in [(dk, &sc.dkt), (dv, &sc.dvt)] {
        for j in 0..sk {
            let row = std::slice::from_raw_parts_mut(dst.add(j * ks), hd);
            for (c, x) in row.iter_mut().enumerate() {
                *x += acc[c * ld + j];
            }
        }
    }
}

/// `sum_j a[j] b[j]` in 8 lanes (a fixed order: deterministic).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for j in (0..n8).step_by(8) {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(j)),
            _mm256_loadu_ps(b.as_ptr().add(j)),
            acc,
        );
    }
    let mut l = [0.0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), acc);
    let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for j in n8..a.len() {
        s += a[j] * b[j];
    }
    s
}
