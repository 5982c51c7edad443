//! Column slices of row-major matrices: `narrow` keeps columns `[start, start + len)` of every
//! row (GPT-2's fused `c_attn` output is split into q, k, v this way); its backward adds the
//! gradient back into those columns.

use crate::error::{check_len, invalid, Result};
use crate::par::for_row_blocks;

fn check(op: &'static str, x_len: usize, cols: usize, start: usize, len: usize) -> Result<usize> {
    if start + len > cols {
        return Err(invalid(
            op,
            "start",
            format!("columns {start}..{} exceed the {cols} columns", start + len),
        ));
    }
    let n = x_len.checked_div(cols).unwrap_or(0);
    check_len(op, "x", x_len, &[n, cols])?;
    Ok(n)
}

/// `out (N, len) = x (N, cols)[:, start..start + len]`.
pub fn narrow_forward(
    out: &mut [f32],
    x: &[f32],
    cols: usize,
    start: usize,
    len: usize,
) -> Result<()> {
    let n = check("narrow_forward", x.len(), cols, start, len)?;
    check_len("narrow_forward", "out", out.len(), &[n, len])?;
    for_row_blocks(out, len, |row0, blk| {
        for (bi, orow) in blk.chunks_exact_mut(len).enumerate() {
            let i = row0 + bi;
            orow.copy_from_slice(&x[i * cols + start..i * cols + start + len]);
        }
    });
    Ok(())
}

/// `dx[:, start..start + len] += dout`.
pub fn narrow_backward(
    dx: &mut [f32],
    dout: &[f32],
    cols: usize,
    start: usize,
    len: usize,
) -> Result<()> {
    let n = check("narrow_backward", dx.len(), cols, start, len)?;
    check_len("narrow_backward", "dout", dout.len(), &[n, len])?;
    for_row_blocks(dx, cols, |row0, blk| {
        for (bi, drow) in blk.chunks_exact_mut(cols).enumerate() {
            let i = row0 + bi;
            for (d, g) in drow[start..start + len]
                .iter_mut()
                .zip(&dout[i * len..(i + 1) * len])
            {
                *d += g;
            }
        }
    });
    Ok(())
}

/// The last two dimensions of `x (batch, m, n)` swapped: `out (batch, n, m)`, written
/// (`accumulate == false`) or added to `out` (`true`: the backward of a transpose is the
/// transpose of its gradient, added into the input's). ViT's patch embedding turns the
/// convolution's `(B, C, P)` planes into `(B, P, C)` tokens this way.
pub fn transpose(
    out: &mut [f32],
    x: &[f32],
    batch: usize,
    m: usize,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    check_len("transpose", "x", x.len(), &[batch, m, n])?;
    check_len("transpose", "out", out.len(), &[batch, n, m])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Tiles of `T x T` keep both the reads and the writes within a few cache lines.
    const T: usize = 32;
    for_row_blocks(out, m, |row0, blk| {
        // `blk` holds output rows `row0..`, each `m` long; output row `r` is (b, j) with
        // `r = b * n + j`, and reads column `j` of `x`'s plane `b`.
        let rows = blk.len() / m;
        let mut r = 0;
        while r < rows {
            let (b, j0) = ((row0 + r) / n, (row0 + r) % n);
            let jn = (n - j0).min(rows - r).min(T);
            let plane = &x[b * m * n..(b + 1) * m * n];
            for i0 in (0..m).step_by(T) {
                let im = (i0 + T).min(m);
                for dj in 0..jn {
                    let orow = &mut blk[(r + dj) * m..(r + dj + 1) * m];
                    let j = j0 + dj;
                    if accumulate {
                        for i in i0..im {
                            orow[i] += plane[i * n + j];
                        }
                    } else {
                        for i in i0..im {
                            orow[i] = plane[i * n + j];
                        }
                    }
                }
            }
            r += jn;
        }
    });
    Ok(())
}

/// `f64` oracle.
pub mod reference {
    /// `(batch, m, n)` to `(batch, n, m)`.
    pub fn transpose(x: &[f64], batch: usize, m: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; batch * m * n];
        for b in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    out[(b * n + j) * m + i] = x[(b * m + i) * n + j];
                }
            }
        }
        out
    }

    /// Column slice.
    pub fn forward(x: &[f64], cols: usize, start: usize, len: usize) -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|r| r[start..start + len].to_vec())
            .collect()
    }
}
