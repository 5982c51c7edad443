//! Rotary position embedding in the Hugging Face `rotate_half` convention (Llama, Mistral,
//! Qwen2): the head dim D is split in halves, and pair `(i, i + D/2)` is rotated by the angle
//! `pos * inv_freq[i]`:
//!
//! ```text
//! out[i]       = x[i] * cos - x[i + D/2] * sin
//! out[i + D/2] = x[i + D/2] * cos + x[i] * sin          (i < D/2)
//! ```
//!
//! `x`, `out`: `(N, H, D)` (token rows of H heads); `cos`, `sin`: `(P, D/2)` tables for positions
//! `0..P`, built by [`rope_tables`]; `positions`: `(N)`.

use crate::error::{check_len, invalid, KernelError, Result};
use crate::par::for_row_blocks;

/// `cos`/`sin` tables `(max_pos, D/2)` for the angles `pos * inv_freq[i]`. The product is taken
/// in f32 as transformers does (`position_ids.float() @ inv_freq`), then cos/sin in f64.
pub fn rope_tables(inv_freq: &[f32], max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0.0f32; max_pos * half];
    let mut sin = vec![0.0f32; max_pos * half];
    for p in 0..max_pos {
        for (i, f) in inv_freq.iter().enumerate() {
            let ang = (p as f32 * f) as f64;
            cos[p * half + i] = ang.cos() as f32;
            sin[p * half + i] = ang.sin() as f32;
        }
    }
    (cos, sin)
}

/// Default `inv_freq[i] = 1 / theta^(2i / D)` (computed in f32 like transformers).
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// The arguments of a rotation: `head_dim` even, `cos`/`sin` `(P, D/2)`, `x` `(N, H, D)` with one
/// position below `P` per row, the output (named `out.0`) as long as `x`. Returns `D/2`. Shared
/// with the CUDA twins, which check the same on the host before launching.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    op: &'static str,
    x_len: usize,
    out: (&'static str, usize),
    cos_len: usize,
    sin_len: usize,
    positions: &[u32],
    h: usize,
    d: usize,
) -> Result<usize> {
    if d % 2 != 0 || d == 0 {
        return Err(invalid(
            op,
            "head_dim",
            format!("must be even and positive, got {d}"),
        ));
    }
    let half = d / 2;
    let p = cos_len / half;
    check_len(op, "cos", cos_len, &[p, half])?;
    check_len(op, "sin", sin_len, &[p, half])?;
    check_len(op, "x", x_len, &[positions.len(), h, d])?;
    check_len(op, out.0, out.1, &[x_len])?;
    if let Some(i) = positions.iter().position(|&q| q as usize >= p) {
        return Err(KernelError::IndexOutOfRange {
            op,
            arg: "positions",
            index: i,
            value: positions[i] as i64,
            limit: p,
        });
    }
    Ok(half)
}

/// Applies the rotation (`inverse = false`) or its transpose (`inverse = true`, the backward).
#[allow(clippy::too_many_arguments)]
fn rotate(
    out: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    h: usize,
    d: usize,
    inverse: bool,
    accumulate: bool,
) {
    let half = d / 2;
    let sgn = if inverse { -1.0 } else { 1.0 };
    for_row_blocks(out, h * d, |row0, blk| {
        for (bi, orow) in blk.chunks_exact_mut(h * d).enumerate() {
            let i = row0 + bi;
            let p = positions[i] as usize;
            let (cs, sn) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for hh in 0..h {
                let xr = &x[(i * h + hh) * d..(i * h + hh + 1) * d];
                let or = &mut orow[hh * d..(hh + 1) * d];
                for k in 0..half {
                    let (a, b) = (xr[k], xr[k + half]);
                    let s = sgn * sn[k];
                    let lo = a * cs[k] - b * s;
                    let hi = b * cs[k] + a * s;
                    if accumulate {
                        or[k] += lo;
                        or[k + half] += hi;
                    } else {
                        or[k] = lo;
                        or[k + half] = hi;
                    }
                }
            }
        }
    });
}

/// `out = rope(x)`.
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    out: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let (xl, ol) = (x.len(), ("out", out.len()));
    check(
        "rope_forward",
        xl,
        ol,
        cos.len(),
        sin.len(),
        positions,
        n_heads,
        head_dim,
    )?;
    rotate(out, x, cos, sin, positions, n_heads, head_dim, false, false);
    Ok(())
}

/// `dx += R^T dout` (the rotation is orthogonal: backward rotates by the negative angle).
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    dx: &mut [f32],
    dout: &[f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let (xl, ol) = (dout.len(), ("dx", dx.len()));
    check(
        "rope_backward",
        xl,
        ol,
        cos.len(),
        sin.len(),
        positions,
        n_heads,
        head_dim,
    )?;
    rotate(dx, dout, cos, sin, positions, n_heads, head_dim, true, true);
    Ok(())
}

/// `f64` oracle with angles computed directly from `theta`-style inverse frequencies.
pub mod reference {
    /// `rotate_half` RoPE on `(N, H, D)`.
    pub fn forward(x: &[f64], inv_freq: &[f32], positions: &[u32], h: usize, d: usize) -> Vec<f64> {
        let half = d / 2;
        let mut out = vec![0.0; x.len()];
        for (i, &p) in positions.iter().enumerate() {
            for hh in 0..h {
                let base = (i * h + hh) * d;
                for k in 0..half {
                    let ang = (p as f32 * inv_freq[k]) as f64;
                    let (c, s) = (ang.cos(), ang.sin());
                    // rotate_half(x) = cat(-x2, x1); out = x*cos + rotate_half(x)*sin
                    out[base + k] = x[base + k] * c - x[base + k + half] * s;
                    out[base + k + half] = x[base + k + half] * c + x[base + k] * s;
                }
            }
        }
        out
    }
}
