//! Causal softmax self-attention with grouped-query heads (GQA): query head `h` reads key/value
//! head `h / (Hq / Hkv)`, as Llama/Mistral/Qwen2 do (Hkv = Hq is ordinary multi-head attention).
//!
//! ```text
//! q, out: (B, T, Hq, D)    k, v: (B, T, Hkv, D)    att: (B, Hq, T, T) saved probabilities
//! S = scale * Q_h K_g^T, masked to j <= i;  P = softmax(S) per row;  O_h = P V_g
//! backward: dP = dO_h V_g^T; dS = P * (dP - rowsum(P * dP));
//!           dQ_h += scale * dS K_g;  dK_g += scale * dS^T Q_h;  dV_g += P^T dO_h
//! ```
//!
//! One rayon task per (batch, head) in forward and per (batch, kv head) in backward, so the key
//! and value gradients of a group are summed by one task in a fixed order (deterministic), and
//! no two tasks write the same elements. The products are `gemm` calls on strided head views.

use crate::error::{check_len, invalid, Result};
use crate::gemm::{gemm_raw, Par};
use crate::par::SendPtr;
use rayon::prelude::*;

/// Attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// B
    pub batch: usize,
    /// T
    pub seq: usize,
    /// Hq
    pub q_heads: usize,
    /// Hkv (divides Hq)
    pub kv_heads: usize,
    /// D
    pub head_dim: usize,
}

impl AttnDims {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.kv_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return Err(invalid(
                op,
                "kv_heads",
                format!("{} must divide q_heads {}", self.kv_heads, self.q_heads),
            ));
        }
        Ok(())
    }
    fn q_len(&self) -> usize {
        self.batch * self.seq * self.q_heads * self.head_dim
    }
    fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }
}

/// Forward. `scale` is usually `1 / sqrt(D)`.
pub fn attention_forward(
    out: &mut [f32],
    att: &mut [f32],
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
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
    } = d;
    check_len(OP, "q", q.len(), &[b, t, hq, hd])?;
    check_len(OP, "k", k.len(), &[b, t, hkv, hd])?;
    check_len(OP, "v", v.len(), &[b, t, hkv, hd])?;
    check_len(OP, "out", out.len(), &[d.q_len()])?;
    check_len(OP, "att", att.len(), &[b, hq, t, t])?;
    let rep = hq / hkv;
    let (qs, ks) = ((hq * hd) as isize, (hkv * hd) as isize);
    let out_p = SendPtr(out.as_mut_ptr());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, a)| {
        let (bi, h) = (bh / hq, bh % hq);
        let g = h / rep;
        let qo = bi * t * hq * hd + h * hd;
        let ko = bi * t * hkv * hd + g * hd;
        // SAFETY: q/k/v were length-checked for (B, T, H, D); the views address rows < T and
        // columns < D of head h (g) of batch bi, all in bounds. `a` is this task's own (T, T).
        unsafe {
            gemm_raw(
                a.as_mut_ptr(),
                (t as isize, 1),
                q.as_ptr().add(qo),
                (qs, 1),
                k.as_ptr().add(ko),
                (1, ks),
                (t, t, hd),
                scale,
                false,
                Par::Single,
            );
        }
        for i in 0..t {
            let row = &mut a[i * t..(i + 1) * t];
            let m = row[..=i].iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
            let mut s = 0.0f32;
            for z in row[..=i].iter_mut() {
                *z = (*z - m).exp();
                s += *z;
            }
            let inv = 1.0 / s;
            row[..=i].iter_mut().for_each(|z| *z *= inv);
            row[i + 1..].fill(0.0);
        }
        // SAFETY: out is (B, T, Hq, D) (checked); this task writes only head h of batch bi,
        // which no other task writes. `a` is (T, T) and v's head-g view is in bounds.
        unsafe {
            gemm_raw(
                out_p.get().add(qo),
                (qs, 1),
                a.as_ptr(),
                (t as isize, 1),
                v.as_ptr().add(ko),
                (ks, 1),
                (t, hd, t),
                1.0,
                false,
                Par::Single,
            );
        }
    });
    Ok(())
}

/// Backward; accumulates into `dq`, `dk`, `dv` (shapes as `q`, `k`, `v`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    att: &[f32],
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
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
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
    check_len(OP, "att", att.len(), &[b, hq, t, t])?;
    let rep = hq / hkv;
    let (qs, ks) = ((hq * hd) as isize, (hkv * hd) as isize);
    let (dq_p, dk_p, dv_p) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..b * hkv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / hkv, bg % hkv);
        let ko = bi * t * hkv * hd + g * hd;
        let mut ds = vec![0.0f32; t * t];
        for h in g * rep..(g + 1) * rep {
            let qo = bi * t * hq * hd + h * hd;
            let p = &att[(bi * hq + h) * t * t..(bi * hq + h + 1) * t * t];
            // SAFETY (all four products): every view is a (T, D) head slice of a buffer checked
            // above, or a (T, T) buffer of this task; dq head h and dk/dv head g of batch bi are
            // written by this task only (h ranges over g's group).
            unsafe {
                // dP (T, T) = dO_h (T, D) @ V_g^T (D, T)
                gemm_raw(
                    ds.as_mut_ptr(),
                    (t as isize, 1),
                    dout.as_ptr().add(qo),
                    (qs, 1),
                    v.as_ptr().add(ko),
                    (1, ks),
                    (t, t, hd),
                    1.0,
                    false,
                    Par::Single,
                );
            }
            for i in 0..t {
                let pr = &p[i * t..(i + 1) * t];
                let dr = &mut ds[i * t..(i + 1) * t];
                let dotp: f32 = pr[..=i].iter().zip(&dr[..=i]).map(|(a, b)| a * b).sum();
                for j in 0..=i {
                    dr[j] = pr[j] * (dr[j] - dotp);
                }
                dr[i + 1..].fill(0.0);
            }
            unsafe {
                // dQ_h += scale * dS (T, T) @ K_g (T, D)
                gemm_raw(
                    dq_p.get().add(qo),
                    (qs, 1),
                    ds.as_ptr(),
                    (t as isize, 1),
                    k.as_ptr().add(ko),
                    (ks, 1),
                    (t, hd, t),
                    scale,
                    true,
                    Par::Single,
                );
                // dK_g += scale * dS^T (T, T) @ Q_h (T, D)
                gemm_raw(
                    dk_p.get().add(ko),
                    (ks, 1),
                    ds.as_ptr(),
                    (1, t as isize),
                    q.as_ptr().add(qo),
                    (qs, 1),
                    (t, hd, t),
                    scale,
                    true,
                    Par::Single,
                );
                // dV_g += P^T (T, T) @ dO_h (T, D)
                gemm_raw(
                    dv_p.get().add(ko),
                    (ks, 1),
                    p.as_ptr(),
                    (1, t as isize),
                    dout.as_ptr().add(qo),
                    (qs, 1),
                    (t, hd, t),
                    1.0,
                    true,
                    Par::Single,
                );
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

/// `f64` oracle: returns `out`.
pub mod reference {
    use super::AttnDims;

    /// Naive causal GQA attention.
    pub fn forward(q: &[f64], k: &[f64], v: &[f64], d: AttnDims, scale: f64) -> Vec<f64> {
        let AttnDims {
            batch: b,
            seq: t,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
        } = d;
        let rep = hq / hkv;
        let mut out = vec![0.0; b * t * hq * hd];
        for bi in 0..b {
            for h in 0..hq {
                let g = h / rep;
                for i in 0..t {
                    let qi = &q[((bi * t + i) * hq + h) * hd..][..hd];
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            scale
                                * qi.iter()
                                    .zip(&k[((bi * t + j) * hkv + g) * hd..][..hd])
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        out[((bi * t + i) * hq + h) * hd + c] = (0..=i)
                            .map(|j| e[j] / z * v[((bi * t + j) * hkv + g) * hd + c])
                            .sum();
                    }
                }
            }
        }
        out
    }
}
