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
