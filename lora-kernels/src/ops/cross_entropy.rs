//! Softmax cross-entropy over a vocabulary, mean over the positions whose target is not ignored
//! (a negative target, e.g. transformers' `-100`, is ignored). Saves each row's log-sum-exp so
//! backward recomputes the softmax instead of storing an `(N, V)` probability matrix.

use crate::error::{check_len, KernelError, Result};
use crate::par::for_row_blocks;
use rayon::prelude::*;

/// Writes `lse` `(N)` and returns `(mean loss, count of non-ignored targets)`. `logits`: `(N, V)`,
/// `targets`: `(N)`. With no valid target the loss is 0 and the count 0.
pub fn cross_entropy_forward(
    lse: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    v: usize,
) -> Result<(f32, usize)> {
    const OP: &str = "cross_entropy_forward";
    let n = targets.len();
    check_len(OP, "logits", logits.len(), &[n, v])?;
    check_len(OP, "lse", lse.len(), &[n])?;
    if let Some(i) = targets.iter().position(|&t| t >= 0 && t as usize >= v) {
        return Err(KernelError::IndexOutOfRange {
            op: OP,
            arg: "targets",
            index: i,
            value: targets[i] as i64,
            limit: v,
        });
    }
    let min_rows = (crate::par::PAR_THRESHOLD / v.max(1)).max(1);
    lse.par_iter_mut()
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(i, l)| {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let s: f32 = row.iter().map(|&z| (z - m).exp()).sum();
            *l = m + s.ln();
        });
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (i, &t) in targets.iter().enumerate() {
        if t >= 0 {
            total += (lse[i] - logits[i * v + t as usize]) as f64;
            count += 1;
        }
    }
    let loss = if count == 0 {
        0.0
    } else {
        (total / count as f64) as f32
    };
    Ok((loss, count))
}

/// `dlogits[i, :] += dloss / count * (softmax(logits[i]) - onehot(targets[i]))` for non-ignored
/// rows. `count` is what forward returned.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    dloss: f32,
    logits: &[f32],
    lse: &[f32],
    targets: &[i32],
    v: usize,
    count: usize,
) -> Result<()> {
    const OP: &str = "cross_entropy_backward";
    let n = targets.len();
    check_len(OP, "dlogits", dlogits.len(), &[n, v])?;
    check_len(OP, "logits", logits.len(), &[n, v])?;
    check_len(OP, "lse", lse.len(), &[n])?;
    if count == 0 {
        return Ok(());
    }
    let scale = dloss / count as f32;
    for_row_blocks(dlogits, v, |row0, blk| {
        for (bi, drow) in blk.chunks_exact_mut(v).enumerate() {
            let i = row0 + bi;
            let t = targets[i];
            if t < 0 {
                continue;
            }
            let row = &logits[i * v..(i + 1) * v];
            for (d, &z) in drow.iter_mut().zip(row) {
                *d += scale * (z - lse[i]).exp();
            }
            drow[t as usize] -= scale;
        }
    });
    Ok(())
}

/// Logit elements per chunk of [`linear_cross_entropy`] (32 MiB of f32).
pub const HEAD_CHUNK_ELEMS: usize = 8 << 20;

/// The output head and the cross-entropy fused, in chunks of rows: `logits = x W^T`
/// (`x` `(N, C)`, `W` `(V, C)`), mean loss over the non-ignored targets. Only one chunk of
/// logits (`<= chunk_rows x V`) exists at a time, never the whole `(N, V)` matrix (206 MB for
/// GPT-2 at 1024 tokens, and as much again for its gradient).
///
/// With `dx` and/or `dw` given, also *accumulates* the gradients of the mean loss (for a
/// `dloss` of 1; scale afterwards): `dlogits = (softmax - onehot) / count` per chunk, then
/// `dx += dlogits W` and `dw += dlogits^T x`. Computing them here, while the chunk's logits are
/// at hand, costs the same GEMMs as the unfused backward and no recomputation.
/// Returns `(mean loss, count)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy(
    x: &[f32],
    w: &[f32],
    targets: &[i32],
    c: usize,
    v: usize,
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    chunk_rows: usize,
) -> Result<(f32, usize)> {
    const OP: &str = "linear_cross_entropy";
    let n = targets.len();
    check_len(OP, "x", x.len(), &[n, c])?;
    check_len(OP, "w", w.len(), &[v, c])?;
    if let Some(d) = dx.as_deref() {
        check_len(OP, "dx", d.len(), &[n, c])?;
    }
    if let Some(d) = dw.as_deref() {
        check_len(OP, "dw", d.len(), &[v, c])?;
    }
    if chunk_rows == 0 {
        return Err(KernelError::InvalidArg {
            op: OP,
            arg: "chunk_rows",
            reason: "must be at least 1".into(),
        });
    }
    if let Some(i) = targets.iter().position(|&t| t >= 0 && t as usize >= v) {
        return Err(KernelError::IndexOutOfRange {
            op: OP,
            arg: "targets",
            index: i,
            value: targets[i] as i64,
            limit: v,
        });
    }
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let grads = dx.is_some() || dw.is_some();
    let mut total = 0.0f64;
    let mut logits = vec![0.0f32; chunk_rows.min(n.max(1)) * v];
    let mut lse = vec![0.0f32; chunk_rows.min(n.max(1))];
    for r0 in (0..n).step_by(chunk_rows) {
        let rows = chunk_rows.min(n - r0);
        let (lg, ls) = (&mut logits[..rows * v], &mut lse[..rows]);
        let xs = &x[r0 * c..(r0 + rows) * c];
        let ts = &targets[r0..r0 + rows];
        crate::gemm::matmul(
            lg,
            xs,
            crate::gemm::Trans::No,
            w,
            crate::gemm::Trans::Yes,
            (rows, v, c),
            1.0,
            false,
            crate::gemm::Par::Auto,
        )?;
        let (_, _) = cross_entropy_forward(ls, lg, ts, v)?;
        for (i, &t) in ts.iter().enumerate() {
            if t >= 0 {
                total += (ls[i] - lg[i * v + t as usize]) as f64;
            }
        }
        if !grads || count == 0 {
            continue;
        }
        // The chunk's logits become dlogits in place.
        let scale = 1.0 / count as f32;
        for_row_blocks(lg, v, |row0, blk| {
            for (bi, drow) in blk.chunks_exact_mut(v).enumerate() {
                let t = ts[row0 + bi];
                if t < 0 {
                    drow.fill(0.0);
                    continue;
                }
                let l = ls[row0 + bi];
                drow.iter_mut().for_each(|z| *z = scale * (*z - l).exp());
                drow[t as usize] -= scale;
            }
        });
        if let Some(dx) = dx.as_deref_mut() {
            crate::gemm::matmul(
                &mut dx[r0 * c..(r0 + rows) * c],
                lg,
                crate::gemm::Trans::No,
                w,
                crate::gemm::Trans::No,
                (rows, c, v),
                1.0,
                true,
                crate::gemm::Par::Auto,
            )?;
        }
        if let Some(dw) = dw.as_deref_mut() {
            crate::gemm::matmul(
                dw,
                lg,
                crate::gemm::Trans::Yes,
                xs,
                crate::gemm::Trans::No,
                (v, c, rows),
                1.0,
                true,
                crate::gemm::Par::Auto,
            )?;
        }
    }
    let loss = if count == 0 {
        0.0
    } else {
        (total / count as f64) as f32
    };
    Ok((loss, count))
}

/// `f64` oracle.
pub mod reference {
    /// Mean cross-entropy over non-ignored rows.
    pub fn forward(logits: &[f64], targets: &[i32], v: usize) -> f64 {
        let mut total = 0.0;
        let mut count = 0;
        for (i, &t) in targets.iter().enumerate() {
            if t < 0 {
                continue;
            }
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
            total += lse - row[t as usize];
            count += 1;
        }
        if count == 0 {
            0.0
        } else {
            total / count as f64
        }
    }
}
