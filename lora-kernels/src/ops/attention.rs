//! Softmax attention with grouped-query heads (GQA): query head `h` reads key/value
//! head `h / (Hq / Hkv)`, as Llama/Mistral/Qwen2 do (Hkv = Hq is ordinary multi-head attention).
//! Causal self-attention (decoders), bidirectional self-attention (encoders), or cross-attention
//! (Stable Diffusion's UNet: `T` latent pixels attend to `S` text tokens; `S = T` otherwise).
//!
//! ```text
//! q, out: (B, T, Hq, D)    k, v: (B, S, Hkv, D)    lse: (B, Hq, T) saved log-sum-exp per row
//! S = scale * Q_h K_g^T, masked to j <= i;  P = softmax(S) per row;  O_h = P V_g
//! lse_i = log sum_j<=i exp(S_ij)  (so P_ij = exp(S_ij - lse_i))
//! backward: recompute S and P from Q, K and lse; dP = dO_h V_g^T; dS = P * (dP - rowsum(P * dP));
//!           dQ_h += scale * dS K_g;  dK_g += scale * dS^T Q_h;  dV_g += P^T dO_h
//! ```
//!
//! The probabilities are never stored: forward keeps one float per query row (`lse`), and the
//! backward recomputes `S` (one more `T x T x D` product per head, about a fifth more attention
//! FLOPs) instead of holding `B * Hq * T * T` floats from forward to backward. Both passes work
//! on blocks of query rows ([`AttnDims::block_rows`]: [`ATTN_BLOCK`] with a causal mask, which
//! then skips the key columns after the block's last row; without one, as many rows as a
//! 4 MiB scratch holds), so the scratch is `rows x T` per task. (The fused route of [`flash`]
//! packs K and V once per head and uses its own, smaller blocks.)
//!
//! One rayon task per (batch, head) in forward and per (batch, kv head) in backward, so the key
//! and value gradients of a group are summed by one task in a fixed order (deterministic), and
//! no two tasks write the same elements. The products are `gemm` calls on strided head views,
//! except bidirectional attention with a head dim divisible by 8 on AVX2+FMA CPUs, which runs
//! the fused kernels of [`flash`] (same tasks, same saved `lse`).

use crate::error::{check_len, invalid, Result};
use crate::gemm::{gemm_raw, Par};
use crate::par::SendPtr;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod flash;

/// Query rows per block in [`attention_forward`] and [`attention_backward`] with a causal mask
/// (and the least without one).
pub const ATTN_BLOCK: usize = 64;

/// Scratch floats per task a bidirectional block may use: `rows x T` scores (and as many
/// gradients in backward), 4 MiB each: every block packs K (and V) again for its products,
/// so SD's 4096-pixel self-attention runs 256-row blocks (10% faster than 64-row ones,
/// `lora bench sd`'s attention at 64x64 latents).
const ATTN_SCRATCH: usize = 1 << 20;

impl AttnDims {
    /// Query rows per block: [`ATTN_BLOCK`] with a causal mask (the mask skips the key columns
    /// after a block's last row, so small blocks skip more); without one, as many rows as fit
    /// [`ATTN_SCRATCH`] (ViT's 197 tokens: the whole sequence, one product per head instead of
    /// four, each packing K once).
    pub fn block_rows(&self) -> usize {
        let rows = if self.causal {
            ATTN_BLOCK
        } else {
            ATTN_BLOCK.max(ATTN_SCRATCH / self.kv_seq.max(1))
        };
        rows.min(self.seq).max(1)
    }
}

/// Attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// B
    pub batch: usize,
    /// T: query rows per sequence.
    pub seq: usize,
    /// S: key/value rows per sequence (`T` for self-attention; a causal mask needs `S = T`).
    pub kv_seq: usize,
    /// Hq
    pub q_heads: usize,
    /// Hkv (divides Hq)
    pub kv_heads: usize,
    /// D
    pub head_dim: usize,
    /// Causal mask: query `i` sees keys `0..=i` (decoders). `false`: every query sees every key
    /// of its sequence (encoders: ViT, YOLOS).
    pub causal: bool,
}

impl AttnDims {
    /// Self-attention shape (`S = T`).
    pub fn self_attn(
        batch: usize,
        seq: usize,
        (q_heads, kv_heads, head_dim): (usize, usize, usize),
        causal: bool,
    ) -> Self {
        Self {
            batch,
            seq,
            kv_seq: seq,
            q_heads,
            kv_heads,
            head_dim,
            causal,
        }
    }
    /// Checks the heads, and that a causal mask has as many keys as queries and a query row
    /// has at least one key.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.kv_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return Err(invalid(
                op,
                "kv_heads",
                format!("{} must divide q_heads {}", self.kv_heads, self.q_heads),
            ));
        }
        if self.causal && self.kv_seq != self.seq {
            return Err(invalid(
                op,
                "kv_seq",
                format!(
                    "a causal mask needs as many keys as queries ({} keys, {} queries)",
                    self.kv_seq, self.seq
                ),
            ));
        }
        if self.kv_seq == 0 && self.seq > 0 {
            return Err(invalid(op, "kv_seq", "queries but no keys"));
        }
        Ok(())
    }
    fn q_len(&self) -> usize {
        self.batch * self.seq * self.q_heads * self.head_dim
    }
    fn kv_len(&self) -> usize {
        self.batch * self.kv_seq * self.kv_heads * self.head_dim
    }
    /// The keys query row `i` attends to: `0..keys(i)`.
    pub fn keys(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.kv_seq
        }
    }
    /// Length of the saved log-sum-exp, `B * Hq * T`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }
}

/// `s[r * cols + j] = scale * Q[i0 + r] . K[j]` for the rows `i0..i0 + rows` of one query head
/// and the key columns `0..cols` of one kv head.
///
/// # Safety
/// `q` and `k` point at head views with row strides `qs` and `ks` holding at least
/// `i0 + rows` and `cols` rows of `hd` values; `s` holds `rows * cols` values.
#[allow(clippy::too_many_arguments)]
unsafe fn scores(
    s: &mut [f32],
    q: *const f32,
    qs: isize,
    k: *const f32,
    ks: isize,
    (i0, rows, cols, hd): (usize, usize, usize, usize),
    scale: f32,
) {
    gemm_raw(
        s.as_mut_ptr(),
        (cols as isize, 1),
        q.offset(i0 as isize * qs),
        (qs, 1),
        k,
        (1, ks),
        (rows, cols, hd),
        scale,
        false,
        Par::Single,
    );
}

/// Forward. `scale` is usually `1 / sqrt(D)`. Writes `out` and the per-row log-sum-exp `lse`
/// `(B, Hq, T)` that [`attention_backward`] needs.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    scale: f32,
) -> Result<()> {
    const OP: &str = "attention_forward";
    d.check(OP)?;
    let AttnDims {
        batch: b,
        seq: t,
        kv_seq: sk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
        ..
    } = d;
    check_len(OP, "q", q.len(), &[b, t, hq, hd])?;
    check_len(OP, "k", k.len(), &[b, sk, hkv, hd])?;
    check_len(OP, "v", v.len(), &[b, sk, hkv, hd])?;
    check_len(OP, "out", out.len(), &[d.q_len()])?;
    check_len(OP, "lse", lse.len(), &[b, hq, t])?;
    if t == 0 {
        return Ok(());
    }
    let rep = hq / hkv;
    let (qs, ks) = ((hq * hd) as isize, (hkv * hd) as isize);
    let out_p = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if flash::applies(&d) {
        // Buffers kept per pool thread between calls (no allocation churn between a training
        // forward's saved activations).
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, l)| {
            flash::FORWARD.with_borrow_mut(|scratch| {
                let (bi, h) = (bh / hq, bh % hq);
                let qo = bi * t * hq * hd + h * hd;
                let ko = bi * sk * hkv * hd + (h / rep) * hd;
                // SAFETY: `applies` checked AVX2+FMA and D % 8 == 0; q/k/v/out were
                // length-checked for their shapes, and the head views address rows < T (< S)
                // and columns < D of head h (h / rep) of batch bi; this task alone writes
                // out's rows of head h of batch bi.
                unsafe {
                    flash::forward_head(
                        scratch,
                        out_p.get().add(qo),
                        l,
                        (q.as_ptr().add(qo), qs as usize),
                        (k.as_ptr().add(ko), v.as_ptr().add(ko), ks as usize),
                        (t, sk, hd),
                        scale,
                    )
                }
            })
        });
        return Ok(());
    }
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, l)| {
        let (bi, h) = (bh / hq, bh % hq);
        let g = h / rep;
        let qo = bi * t * hq * hd + h * hd;
        let ko = bi * sk * hkv * hd + g * hd;
        let blk = d.block_rows();
        let mut s = vec![0.0f32; blk * sk];
        for i0 in (0..t).step_by(blk) {
            let rows = blk.min(t - i0);
            // Causal: no row of the block sees a key after the block's last row.
            let cols = if d.causal { i0 + rows } else { sk };
            let s = &mut s[..rows * cols];
            // SAFETY: q/k were length-checked for (B, T, Hq, D) / (B, S, Hkv, D); the views
            // address rows < T (< S) and columns < D of head h (g) of batch bi.
            unsafe {
                scores(
                    s,
                    q.as_ptr().add(qo),
                    qs,
                    k.as_ptr().add(ko),
                    ks,
                    (i0, rows, cols, hd),
                    scale,
                )
            };
            for r in 0..rows {
                let i = i0 + r;
                let n = d.keys(i);
                let row = &mut s[r * cols..(r + 1) * cols];
                let m = row[..n].iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
                // One exp per score: e^{s - m} in place, summed, then scaled (the same values
                // as exponentiating twice, summed in the same order).
                let z = crate::fastmath::exp_in_place_sum(&mut row[..n], m);
                let inv = 1.0 / z;
                crate::fastmath::map(|| row[..n].iter_mut().for_each(|e| *e *= inv));
                row[n..].fill(0.0);
                l[i] = m + z.ln();
            }
            // SAFETY: out is (B, T, Hq, D) (checked); this task writes only rows i0..i0+rows
            // of head h of batch bi, which no other task writes; v's head-g view has >= cols
            // rows.
            unsafe {
                gemm_raw(
                    out_p.get().add(qo + i0 * hq * hd),
                    (qs, 1),
                    s.as_ptr(),
                    (cols as isize, 1),
                    v.as_ptr().add(ko),
                    (ks, 1),
                    (rows, hd, cols),
                    1.0,
                    false,
                    Par::Single,
                );
            }
        }
    });
    Ok(())
}

/// Backward; accumulates into `dq`, `dk`, `dv` (shapes as `q`, `k`, `v`). `lse` is what
/// [`attention_forward`] wrote for these `q`, `k`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    scale: f32,
) -> Result<()> {
    const OP: &str = "attention_backward";
    d.check(OP)?;
    let AttnDims {
        batch: b,
        seq: t,
        kv_seq: sk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
        ..
    } = d;
    for (name, len, want) in [
        ("dq", dq.len(), d.q_len()),
        ("dout", dout.len(), d.q_len()),
        ("q", q.len(), d.q_len()),
        ("dk", dk.len(), d.kv_len()),
        ("dv", dv.len(), d.kv_len()),
        ("k", k.len(), d.kv_len()),
        ("v", v.len(), d.kv_len()),
    ] {
        check_len(OP, name, len, &[want])?;
    }
    check_len(OP, "lse", lse.len(), &[b, hq, t])?;
    if t == 0 {
        return Ok(());
    }
    let rep = hq / hkv;
    let (qs, ks) = ((hq * hd) as isize, (hkv * hd) as isize);
    let (dq_p, dk_p, dv_p) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    #[cfg(target_arch = "x86_64")]
    if flash::applies(&d) {
        let blk = flash::BACK_ROWS;
        (0..b * hkv).into_par_iter().for_each(|bg| {
            flash::BACKWARD.with_borrow_mut(|sc| {
                let (bi, g) = (bg / hkv, bg % hkv);
                let ko = bi * sk * hkv * hd + g * hd;
                // SAFETY: `applies` checked AVX2+FMA and D % 8 == 0; every buffer was
                // length-checked above; the views address rows < T (< S) and columns < D of
                // head h (g) of batch bi; dq's heads g*rep.. and dk/dv's head g of batch bi are
                // written by this task only.
                unsafe {
                    flash::backward_begin(
                        sc,
                        (k.as_ptr().add(ko), v.as_ptr().add(ko), ks as usize),
                        (sk, hd),
                    );
                    for h in g * rep..(g + 1) * rep {
                        let qo = bi * t * hq * hd + h * hd;
                        flash::backward_head(
                            sc,
                            (
                                q.as_ptr().add(qo),
                                dout.as_ptr().add(qo),
                                dq_p.get().add(qo),
                                qs as usize,
                            ),
                            &lse[(bi * hq + h) * t..(bi * hq + h + 1) * t],
                            (t, sk, hd, blk),
                            scale,
                        );
                    }
                    flash::backward_end(
                        sc,
                        (dk_p.get().add(ko), dv_p.get().add(ko), ks as usize),
                        (sk, hd),
                    );
                }
            })
        });
        return Ok(());
    }
    (0..b * hkv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / hkv, bg % hkv);
        let ko = bi * sk * hkv * hd + g * hd;
        let blk = d.block_rows();
        let mut p = vec![0.0f32; blk * sk];
        let mut ds = vec![0.0f32; blk * sk];
        for h in g * rep..(g + 1) * rep {
            let qo = bi * t * hq * hd + h * hd;
            let l = &lse[(bi * hq + h) * t..(bi * hq + h + 1) * t];
            for i0 in (0..t).step_by(blk) {
                let rows = blk.min(t - i0);
                let cols = if d.causal { i0 + rows } else { sk };
                let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
                let ro = i0 * hq * hd; // offset of the block's first row in a q-shaped buffer
                                       // SAFETY (all products): every view is a head slice of a buffer checked above
                                       // (rows < T, columns < D), or this task's (rows, cols) scratch; dq head h rows
                                       // i0.. and dk/dv head g of batch bi are written by this task only (h ranges
                                       // over g's group).
                unsafe {
                    scores(
                        p,
                        q.as_ptr().add(qo),
                        qs,
                        k.as_ptr().add(ko),
                        ks,
                        (i0, rows, cols, hd),
                        scale,
                    );
                    // dP (rows, cols) = dO_h (rows, D) @ V_g^T (D, cols)
                    gemm_raw(
                        ds.as_mut_ptr(),
                        (cols as isize, 1),
                        dout.as_ptr().add(qo + ro),
                        (qs, 1),
                        v.as_ptr().add(ko),
                        (1, ks),
                        (rows, cols, hd),
                        1.0,
                        false,
                        Par::Single,
                    );
                }
                for r in 0..rows {
                    let i = i0 + r;
                    let n = d.keys(i);
                    let pr = &mut p[r * cols..(r + 1) * cols];
                    let dr = &mut ds[r * cols..(r + 1) * cols];
                    let li = l[i];
                    crate::fastmath::exp_scaled_in_place(&mut pr[..n], li, 1.0);
                    pr[n..].fill(0.0);
                    let dotp: f32 = pr[..n].iter().zip(&dr[..n]).map(|(a, b)| a * b).sum();
                    crate::fastmath::map(|| {
                        for (d, &p) in dr[..n].iter_mut().zip(&pr[..n]) {
                            *d = p * (*d - dotp);
                        }
                    });
                    dr[n..].fill(0.0);
                }
                unsafe {
                    // dQ_h rows += scale * dS (rows, cols) @ K_g (cols, D)
                    gemm_raw(
                        dq_p.get().add(qo + ro),
                        (qs, 1),
                        ds.as_ptr(),
                        (cols as isize, 1),
                        k.as_ptr().add(ko),
                        (ks, 1),
                        (rows, hd, cols),
                        scale,
                        true,
                        Par::Single,
                    );
                    // dK_g[..cols] += scale * dS^T (cols, rows) @ Q_h rows (rows, D)
                    gemm_raw(
                        dk_p.get().add(ko),
                        (ks, 1),
                        ds.as_ptr(),
                        (1, cols as isize),
                        q.as_ptr().add(qo + ro),
                        (qs, 1),
                        (cols, hd, rows),
                        scale,
                        true,
                        Par::Single,
                    );
                    // dV_g[..cols] += P^T (cols, rows) @ dO_h rows (rows, D)
                    gemm_raw(
                        dv_p.get().add(ko),
                        (ks, 1),
                        p.as_ptr(),
                        (1, cols as isize),
                        dout.as_ptr().add(qo + ro),
                        (qs, 1),
                        (cols, hd, rows),
                        1.0,
                        true,
                        Par::Single,
                    );
                }
            }
        }
    });
    Ok(())
}

/// Inference with a KV cache: `n` new query rows `q` `(n, Hq * D)` at positions
/// `t - n .. t` attend causally to the first `t` rows of `k`, `v` `(t, Hkv * D)` (the cache, with
/// the new rows already appended). Batch 1; no probabilities are saved (no backward).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    t: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "attention_decode";
    let (hq, hkv, hd) = (q_heads, kv_heads, head_dim);
    if hkv == 0 || hq % hkv != 0 {
        return Err(invalid(
            OP,
            "kv_heads",
            format!("{hkv} must divide q_heads {hq}"),
        ));
    }
    if n > t {
        return Err(invalid(
            OP,
            "n",
            format!("{n} new rows but only {t} cached"),
        ));
    }
    check_len(OP, "q", q.len(), &[n, hq, hd])?;
    check_len(OP, "out", out.len(), &[n, hq, hd])?;
    check_len(OP, "k", k.len(), &[t, hkv, hd])?;
    check_len(OP, "v", v.len(), &[t, hkv, hd])?;
    let rep = hq / hkv;
    out.par_chunks_mut(hd).enumerate().for_each(|(ih, o)| {
        let (i, h) = (ih / hq, ih % hq);
        let g = h / rep;
        let last = t - n + i; // this row's position: attends to 0..=last
        let qi = &q[(i * hq + h) * hd..(i * hq + h + 1) * hd];
        let mut s: Vec<f32> = (0..=last)
            .map(|j| {
                scale
                    * qi.iter()
                        .zip(&k[(j * hkv + g) * hd..(j * hkv + g + 1) * hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
            })
            .collect();
        let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut z = 0.0f32;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        o.fill(0.0);
        for (j, p) in s.iter().enumerate() {
            let w = p / z;
            for (oc, vc) in o
                .iter_mut()
                .zip(&v[(j * hkv + g) * hd..(j * hkv + g + 1) * hd])
            {
                *oc += w * vc;
            }
        }
    });
    Ok(())
}

/// `f64` oracles: `forward` returns `out`; `backward` returns `(dq, dk, dv)` from the
/// textbook formulas with the full probability matrix (checked against finite differences of
/// `forward` in the tests).
pub mod reference {
    use super::AttnDims;

    fn probs(q: &[f64], k: &[f64], d: AttnDims, scale: f64, bi: usize, h: usize) -> Vec<f64> {
        let AttnDims {
            seq: t,
            kv_seq: sk,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            ..
        } = d;
        let g = h / (hq / hkv);
        let mut p = vec![0.0; t * sk];
        for i in 0..t {
            let qi = &q[((bi * t + i) * hq + h) * hd..][..hd];
            let n = d.keys(i);
            for j in 0..n {
                let kj = &k[((bi * sk + j) * hkv + g) * hd..][..hd];
                p[i * sk + j] = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
            }
            let m = p[i * sk..i * sk + n]
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = p[i * sk..i * sk + n].iter().map(|s| (s - m).exp()).sum();
            for j in 0..n {
                p[i * sk + j] = (p[i * sk + j] - m).exp() / z;
            }
        }
        p
    }

    /// Naive GQA attention backward (causal or not, as `d` says): `(dq, dk, dv)` for upstream `dout`.
    pub fn backward(
        dout: &[f64],
        q: &[f64],
        k: &[f64],
        v: &[f64],
        d: AttnDims,
        scale: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let AttnDims {
            batch: b,
            seq: t,
            kv_seq: sk,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            ..
        } = d;
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let qi = |bi: usize, i: usize, h: usize| ((bi * t + i) * hq + h) * hd;
        let ki = |bi: usize, j: usize, g: usize| ((bi * sk + j) * hkv + g) * hd;
        for bi in 0..b {
            for h in 0..hq {
                let g = h / (hq / hkv);
                let p = probs(q, k, d, scale, bi, h);
                for i in 0..t {
                    let n = d.keys(i);
                    let dp: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..hd)
                                .map(|c| dout[qi(bi, i, h) + c] * v[ki(bi, j, g) + c])
                                .sum()
                        })
                        .collect();
                    let dot: f64 = (0..n).map(|j| p[i * sk + j] * dp[j]).sum();
                    for j in 0..n {
                        let pij = p[i * sk + j];
                        let dsij = pij * (dp[j] - dot);
                        for c in 0..hd {
                            dq[qi(bi, i, h) + c] += scale * dsij * k[ki(bi, j, g) + c];
                            dk[ki(bi, j, g) + c] += scale * dsij * q[qi(bi, i, h) + c];
                            dv[ki(bi, j, g) + c] += pij * dout[qi(bi, i, h) + c];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    /// Naive GQA attention (causal or not, as `d` says).
    pub fn forward(q: &[f64], k: &[f64], v: &[f64], d: AttnDims, scale: f64) -> Vec<f64> {
        let AttnDims {
            batch: b,
            seq: t,
            kv_seq: sk,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            ..
        } = d;
        let rep = hq / hkv;
        let mut out = vec![0.0; b * t * hq * hd];
        for bi in 0..b {
            for h in 0..hq {
                let g = h / rep;
                for i in 0..t {
                    let qi = &q[((bi * t + i) * hq + h) * hd..][..hd];
                    let n = d.keys(i);
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            scale
                                * qi.iter()
                                    .zip(&k[((bi * sk + j) * hkv + g) * hd..][..hd])
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        out[((bi * t + i) * hq + h) * hd + c] = (0..n)
                            .map(|j| e[j] / z * v[((bi * sk + j) * hkv + g) * hd + c])
                            .sum();
                    }
                }
            }
        }
        out
    }
}
