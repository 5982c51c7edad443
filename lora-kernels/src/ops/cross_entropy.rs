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
    check_targets(OP, targets, v)?;
    let min_rows = (crate::par::PAR_THRESHOLD / v.max(1)).max(1);
    lse.par_iter_mut()
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(i, l)| {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let s = crate::fastmath::sum_exp(row, m);
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
            let l = lse[i];
            crate::fastmath::map(|| {
                for (d, &z) in drow.iter_mut().zip(row) {
                    *d += scale * crate::fastmath::exp(z - l);
                }
            });
            drow[t as usize] -= scale;
        }
    });
    Ok(())
}

pub(crate) fn check_targets(op: &'static str, targets: &[i32], v: usize) -> Result<()> {
    match targets.iter().position(|&t| t >= 0 && t as usize >= v) {
        None => Ok(()),
        Some(i) => Err(KernelError::IndexOutOfRange {
            op,
            arg: "targets",
            index: i,
            value: targets[i] as i64,
            limit: v,
        }),
    }
}

/// The fused head's argument checks: `x` `(N, C)`, `w` `(V, C)`, `dx` / `dw` shaped as `x` / `w`,
/// a block size of at least 1, targets below `V`. Returns the count of non-ignored targets.
fn check_head(
    (x, w, targets, c, v): (usize, usize, &[i32], usize, usize),
    (dx, dw): (Option<usize>, Option<usize>),
    (block_arg, block): (&'static str, usize),
) -> Result<usize> {
    const OP: &str = "linear_cross_entropy";
    let n = targets.len();
    check_len(OP, "x", x, &[n, c])?;
    check_len(OP, "w", w, &[v, c])?;
    if let Some(d) = dx {
        check_len(OP, "dx", d, &[n, c])?;
    }
    if let Some(d) = dw {
        check_len(OP, "dw", d, &[v, c])?;
    }
    if block == 0 {
        return Err(KernelError::InvalidArg {
            op: OP,
            arg: block_arg,
            reason: "must be at least 1".into(),
        });
    }
    check_targets(OP, targets, v)?;
    Ok(targets.iter().filter(|&&t| t >= 0).count())
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
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    chunk_rows: usize,
) -> Result<(f32, usize)> {
    let count = check_head(
        (x.len(), w.len(), targets, c, v),
        (
            dx.as_deref().map(<[f32]>::len),
            dw.as_deref().map(<[f32]>::len),
        ),
        ("chunk_rows", chunk_rows),
    )?;
    let mut prods = F32Head { w, c, v };
    head_in_chunks(&mut prods, x, (targets, count), dx, dw, chunk_rows)
}

/// [`linear_cross_entropy`] for a frozen head packed for the bf16 products
/// ([`crate::gemm_bf16::PackedWeight`], `(V, C)`): PyTorch autocast's `lm_head`. The chunk's
/// rows of `x` and, in backward, of `dlogits` are rounded to bf16; both products accumulate in
/// f32; the softmax, the loss and its sum stay f32. No `dw` (a packed weight is frozen).
///
/// `values`: the head's own f32 values `(V, C)` when it keeps them (a head tied to the token
/// embedding, whose lookup reads them): `dx` then multiplies `dlogits` by them in f32, so the
/// packing never needs its backward layout (`V x C` bf16 values less in memory, for one
/// product at f32 speed; `dx` only gets more exact). They must be the values `w` was packed
/// from.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy_packed(
    x: &[f32],
    w: &crate::gemm_bf16::PackedWeight,
    values: Option<&[f32]>,
    targets: &[i32],
    c: usize,
    v: usize,
    dx: Option<&mut [f32]>,
    chunk_rows: usize,
) -> Result<(f32, usize)> {
    let (wv, wc) = w.dims();
    let count = check_head(
        (x.len(), wv * wc, targets, c, v),
        (dx.as_deref().map(<[f32]>::len), None),
        ("chunk_rows", chunk_rows),
    )?;
    if (wv, wc) != (v, c) {
        return Err(KernelError::InvalidArg {
            op: "linear_cross_entropy",
            arg: "w",
            reason: format!("packed as {wv} x {wc}, expected {v} x {c}"),
        });
    }
    if let Some(vals) = values {
        if vals.len() != v * c {
            return Err(KernelError::InvalidArg {
                op: "linear_cross_entropy",
                arg: "values",
                reason: format!("{} values for a {v} x {c} head", vals.len()),
            });
        }
    }
    let mut prods = PackedHead {
        w,
        values,
        c,
        v,
        scratch: crate::gemm_bf16::PackedLhs::empty(),
    };
    head_in_chunks(&mut prods, x, (targets, count), dx, None, chunk_rows)
}

/// The two products of the fused head that read its weight, for one chunk of `rows` rows.
trait HeadProducts {
    /// `(C, V)`.
    fn dims(&self) -> (usize, usize);
    /// `lg (rows, V) = xs (rows, C) W^T`.
    fn logits(&mut self, lg: &mut [f32], xs: &[f32], rows: usize) -> Result<()>;
    /// `dx (rows, C) += dl (rows, V) W`.
    fn dx(&mut self, dx: &mut [f32], dl: &[f32], rows: usize) -> Result<()>;
}

/// The f32 head.
struct F32Head<'a> {
    w: &'a [f32],
    c: usize,
    v: usize,
}

impl HeadProducts for F32Head<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.c, self.v)
    }
    fn logits(&mut self, lg: &mut [f32], xs: &[f32], rows: usize) -> Result<()> {
        use crate::gemm::{matmul, Par, Trans};
        let (c, v) = (self.c, self.v);
        matmul(
            lg,
            xs,
            Trans::No,
            self.w,
            Trans::Yes,
            (rows, v, c),
            1.0,
            false,
            Par::Auto,
        )
    }
    fn dx(&mut self, dx: &mut [f32], dl: &[f32], rows: usize) -> Result<()> {
        use crate::gemm::{matmul, Par, Trans};
        let (c, v) = (self.c, self.v);
        matmul(
            dx,
            dl,
            Trans::No,
            self.w,
            Trans::No,
            (rows, c, v),
            1.0,
            true,
            Par::Auto,
        )
    }
}

/// The packed bf16 head: each chunk's left operand is rounded and packed (into one buffer
/// reused by every chunk and both products), then multiplied by the weight's forward (`W^T`)
/// or backward (`W`) packing.
struct PackedHead<'a> {
    w: &'a crate::gemm_bf16::PackedWeight,
    /// The f32 values the head keeps beside its packing, for `dx` in f32.
    values: Option<&'a [f32]>,
    c: usize,
    v: usize,
    scratch: crate::gemm_bf16::PackedLhs,
}

impl HeadProducts for PackedHead<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.c, self.v)
    }
    fn logits(&mut self, lg: &mut [f32], xs: &[f32], rows: usize) -> Result<()> {
        use crate::gemm_bf16::{matmul_packed, pack_lhs_into, Source, View};
        pack_lhs_into(
            &mut self.scratch,
            View::row_major(Source::F32(xs), rows, self.c),
        )?;
        matmul_packed(
            lg,
            &self.scratch,
            self.w.forward(),
            false,
            crate::gemm::Par::Auto,
        )
    }
    fn dx(&mut self, dx: &mut [f32], dl: &[f32], rows: usize) -> Result<()> {
        use crate::gemm_bf16::{matmul_packed, pack_lhs_into, Source, View};
        if let Some(w) = self.values {
            let (c, v) = (self.c, self.v);
            return F32Head { w, c, v }.dx(dx, dl, rows);
        }
        pack_lhs_into(
            &mut self.scratch,
            View::row_major(Source::F32(dl), rows, self.v),
        )?;
        matmul_packed(
            dx,
            &self.scratch,
            self.w.backward()?,
            true,
            crate::gemm::Par::Auto,
        )
    }
}

/// The fused head's loop over row chunks (shapes already checked, `count` the targets not
/// ignored): logits, log-sum-exp and loss; then, with gradients asked for, the chunk's logits
/// become `dlogits` in place and feed `dx += dlogits W` and `dw += dlogits^T x`.
fn head_in_chunks(
    prods: &mut dyn HeadProducts,
    x: &[f32],
    (targets, count): (&[i32], usize),
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    chunk_rows: usize,
) -> Result<(f32, usize)> {
    let (c, v) = prods.dims();
    let n = targets.len();
    let grads = dx.is_some() || dw.is_some();
    let mut total = 0.0f64;
    let mut logits = vec![0.0f32; chunk_rows.min(n.max(1)) * v];
    let mut lse = vec![0.0f32; chunk_rows.min(n.max(1))];
    for r0 in (0..n).step_by(chunk_rows) {
        let rows = chunk_rows.min(n - r0);
        let (lg, ls) = (&mut logits[..rows * v], &mut lse[..rows]);
        let xs = &x[r0 * c..(r0 + rows) * c];
        let ts = &targets[r0..r0 + rows];
        prods.logits(lg, xs, rows)?;
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
                crate::fastmath::exp_scaled_in_place(drow, l, scale);
                drow[t as usize] -= scale;
            }
        });
        if let Some(dx) = dx.as_deref_mut() {
            prods.dx(&mut dx[r0 * c..(r0 + rows) * c], lg, rows)?;
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

/// What [`linear_cross_entropy_stored`] hands each (vocabulary block, row chunk): the block's
/// first vocabulary row and size, the chunk's first row, its logits and the widened block.
type BlockFn<'a> = dyn FnMut(usize, usize, usize, &mut [f32], &[f32]) -> Result<()> + 'a;

/// [`linear_cross_entropy`] for a frozen head stored as 16-bit floats (bf16 / f16 checkpoint),
/// which is never widened as a whole: the vocabulary is walked in blocks of `vocab_block` rows of
/// `W`, each widened into a small f32 scratch. Pass 1 folds every block's logits into a running
/// max / sum per row (online log-sum-exp) and picks out the target logits; pass 2, when `dx` is
/// given, widens and recomputes each block's logits and accumulates
/// `dx += (softmax - onehot) / count @ W_block`. One more logits GEMM than the f32 path (about
/// 1.5x its head FLOPs) for 2 instead of 4 bytes per head weight. At most `HEAD_CHUNK_ELEMS`
/// logits exist at a time. Returns `(mean loss, count)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy_stored(
    x: &[f32],
    w: crate::operands::WeightData,
    targets: &[i32],
    c: usize,
    v: usize,
    dx: Option<&mut [f32]>,
    vocab_block: usize,
) -> Result<(f32, usize)> {
    let n = targets.len();
    let count = check_head(
        (x.len(), w.len(), targets, c, v),
        (dx.as_deref().map(<[f32]>::len), None),
        ("vocab_block", vocab_block),
    )?;
    let vb = vocab_block.min(v.max(1));
    let rows_per = (HEAD_CHUNK_ELEMS / vb).clamp(1, n.max(1));
    let mut wblk = vec![0.0f32; vb * c];
    let mut logits = vec![0.0f32; rows_per * vb];
    // Walks every (vocab block, row chunk) pair, handing over the chunk's logits.
    let mut walk = |f: &mut BlockFn| {
        for v0 in (0..v).step_by(vb) {
            let nv = vb.min(v - v0);
            let wb = &mut wblk[..nv * c];
            wb.par_chunks_mut(c.max(1))
                .enumerate()
                .for_each(|(i, row)| w.widen((v0 + i) * c, row));
            for r0 in (0..n).step_by(rows_per) {
                let rows = rows_per.min(n - r0);
                let lg = &mut logits[..rows * nv];
                crate::gemm::matmul(
                    lg,
                    &x[r0 * c..(r0 + rows) * c],
                    crate::gemm::Trans::No,
                    wb,
                    crate::gemm::Trans::Yes,
                    (rows, nv, c),
                    1.0,
                    false,
                    crate::gemm::Par::Auto,
                )?;
                f(v0, nv, r0, lg, wb)?;
            }
        }
        Ok::<(), KernelError>(())
    };
    // Pass 1: online log-sum-exp per row, and the target logits.
    let (mut m, mut l, mut tl) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n], vec![0.0f32; n]);
    walk(&mut |v0, nv, r0, lg, _| {
        let rows = lg.len() / nv;
        m[r0..r0 + rows]
            .par_iter_mut()
            .zip(&mut l[r0..r0 + rows])
            .zip(&mut tl[r0..r0 + rows])
            .zip(lg.par_chunks(nv))
            .enumerate()
            .for_each(|(i, (((m, l), tl), z))| {
                let bm = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mn = m.max(bm);
                let s = crate::fastmath::sum_exp(z, mn);
                *l = *l * crate::fastmath::exp(*m - mn) + s;
                *m = mn;
                let t = targets[r0 + i];
                if t >= 0 && (t as usize) >= v0 && (t as usize) < v0 + nv {
                    *tl = z[t as usize - v0];
                }
            });
        Ok(())
    })?;
    let lse: Vec<f32> = m.iter().zip(&l).map(|(m, l)| m + l.ln()).collect();
    let total: f64 = targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= 0)
        .map(|(i, _)| (lse[i] - tl[i]) as f64)
        .sum();
    let loss = if count == 0 {
        0.0
    } else {
        (total / count as f64) as f32
    };
    // Pass 2: dx += dlogits @ W_block, block by block.
    if let (Some(dx), true) = (dx, count > 0) {
        let scale = 1.0 / count as f32;
        walk(&mut |v0, nv, r0, lg, wb| {
            let rows = lg.len() / nv;
            for_row_blocks(lg, nv, |row0, blk| {
                for (bi, drow) in blk.chunks_exact_mut(nv).enumerate() {
                    let r = r0 + row0 + bi;
                    let t = targets[r];
                    if t < 0 {
                        drow.fill(0.0);
                        continue;
                    }
                    let l = lse[r];
                    crate::fastmath::exp_scaled_in_place(drow, l, scale);
                    if (t as usize) >= v0 && (t as usize) < v0 + nv {
                        drow[t as usize - v0] -= scale;
                    }
                }
            });
            crate::gemm::matmul(
                &mut dx[r0 * c..(r0 + rows) * c],
                lg,
                crate::gemm::Trans::No,
                wb,
                crate::gemm::Trans::No,
                (rows, c, nv),
                1.0,
                true,
                crate::gemm::Par::Auto,
            )
        })?;
    }
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
