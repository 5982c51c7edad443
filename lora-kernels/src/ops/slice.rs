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

/// `f64` oracle.
pub mod reference {
    /// Column slice.
    pub fn forward(x: &[f64], cols: usize, start: usize, len: usize) -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|r| r[start..start + len].to_vec())
            .collect()
    }
}
