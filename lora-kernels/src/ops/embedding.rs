//! Embedding lookup: forward gathers rows of a table, backward scatter-adds into it.

use crate::error::{check_len, KernelError, Result};
use crate::operands::WeightData;
use crate::par::for_row_blocks;
use rayon::prelude::*;

pub(crate) fn check_ids(op: &'static str, ids: &[u32], v: usize) -> Result<()> {
    match ids.iter().position(|&t| t as usize >= v) {
        None => Ok(()),
        Some(i) => Err(KernelError::IndexOutOfRange {
            op,
            arg: "ids",
            index: i,
            value: ids[i] as i64,
            limit: v,
        }),
    }
}

/// `out[i, :] = table[ids[i], :]`. `out`: `(N, C)`, `table`: `(V, C)`, `ids`: `(N)`.
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], c: usize) -> Result<()> {
    embedding_forward_stored(out, WeightData::F32(table), ids, c)
}

/// [`embedding_forward`] from a table as stored (f32, or 16-bit rows widened as they are
/// gathered, so a bf16 / f16 table is never widened as a whole).
pub fn embedding_forward_stored(
    out: &mut [f32],
    table: WeightData,
    ids: &[u32],
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    check_len(OP, "out", out.len(), &[ids.len(), c])?;
    let v = table.len().checked_div(c).unwrap_or(0);
    check_len(OP, "table", table.len(), &[v, c])?;
    check_ids(OP, ids, v)?;
    for_row_blocks(out, c, |row0, blk| {
        for (bi, row) in blk.chunks_exact_mut(c).enumerate() {
            let t = ids[row0 + bi] as usize;
            table.widen(t * c, row);
        }
    });
    Ok(())
}

/// `dtable[ids[i], :] += dout[i, :]`. Parallel over column strips so repeated ids never race, and
/// each element's sum is taken in token order (deterministic).
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], c: usize) -> Result<()> {
    const OP: &str = "embedding_backward";
    check_len(OP, "dout", dout.len(), &[ids.len(), c])?;
    let v = dtable.len().checked_div(c).unwrap_or(0);
    check_len(OP, "dtable", dtable.len(), &[v, c])?;
    check_ids(OP, ids, v)?;
    if c == 0 {
        return Ok(());
    }
    let strip = 64.min(c);
    let strips = c.div_ceil(strip);
    let ptr = crate::par::SendPtr(dtable.as_mut_ptr());
    let run = |s: usize| {
        let c0 = s * strip;
        let c1 = (c0 + strip).min(c);
        for (i, &t) in ids.iter().enumerate() {
            let t = t as usize;
            // SAFETY: strip s writes only columns [c0, c1) of row t of `dtable` ((V, C), checked
            // above, t < V checked above); no other strip touches those columns and `dtable` is
            // mutably borrowed for the whole call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(t * c + c0), c1 - c0) };
            for (d, g) in dst.iter_mut().zip(&dout[i * c + c0..i * c + c1]) {
                *d += g;
            }
        }
    };
    if ids.len() * c < crate::par::PAR_THRESHOLD {
        (0..strips).for_each(run);
    } else {
        (0..strips).into_par_iter().for_each(run);
    }
    Ok(())
}

/// `f64` oracle.
pub mod reference {
    /// Gather.
    pub fn forward(table: &[f64], ids: &[u32], c: usize) -> Vec<f64> {
        ids.iter()
            .flat_map(|&t| table[t as usize * c..(t as usize + 1) * c].to_vec())
            .collect()
    }
    /// Scatter-add into a zero table of `v` rows.
    pub fn backward(dout: &[f64], ids: &[u32], v: usize, c: usize) -> Vec<f64> {
        let mut d = vec![0.0; v * c];
        for (i, &t) in ids.iter().enumerate() {
            for j in 0..c {
                d[t as usize * c + j] += dout[i * c + j];
            }
        }
        d
    }
}
