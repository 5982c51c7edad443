//! Mixed-adapter batches for inference (punica's BGMV idea, on the CPU): every row of a batch
//! may use a different adapter, or none. One base GEMM serves all rows; then one row pass does
//! each row's rank-R shrink (`u = x_i A_a^T`) and expand (`y_i += s_a u B_a^T`) with its own
//! adapter, so the cost does not grow with the number of distinct adapters.
//!
//! N = rows, K = in, M = out, R_a = rank of adapter a.

use crate::error::{check_len, KernelError, Result};
use crate::lora_linear::{lora_linear_forward, BaseLinear, LinearDims, LoraWeights};
use crate::par::for_row_blocks;
use crate::simd::{axpy_many, dot_many, with_simd, Simd};

/// `y (N, M) = x W^T + b`, plus, for each row `i` with `row_adapter[i] = a >= 0`,
/// `s_a * (x_i A_a^T) B_a^T`. Adapters' dropout is ignored (inference).
pub fn lora_linear_mixed_forward(
    y: &mut [f32],
    x: &[f32],
    base: &BaseLinear,
    adapters: &[LoraWeights],
    row_adapter: &[i32],
    d: LinearDims,
) -> Result<()> {
    const OP: &str = "lora_linear_mixed_forward";
    check_len(OP, "row_adapter", row_adapter.len(), &[d.tokens])?;
    for (i, &a) in row_adapter.iter().enumerate() {
        if a >= adapters.len() as i32 {
            return Err(KernelError::IndexOutOfRange {
                op: OP,
                arg: "row_adapter",
                index: i,
                value: a as i64,
                limit: adapters.len(),
            });
        }
    }
    for l in adapters {
        check_len(OP, "lora_a", l.a.len(), &[l.rank, d.inp])?;
        check_len(OP, "lora_b", l.b.len(), &[d.out, l.rank])?;
    }
    lora_linear_forward(y, None, x, base, None, d)?;
    // B^T (R_a, M) per adapter, so the expand reads contiguous rows.
    let bts: Vec<Vec<f32>> = adapters
        .iter()
        .map(|l| {
            let mut t = vec![0.0f32; l.b.len()];
            for o in 0..d.out {
                for j in 0..l.rank {
                    t[j * d.out + o] = l.b[o * l.rank + j];
                }
            }
            t
        })
        .collect();
    for_row_blocks(y, d.out, |row0, blk| {
        with_simd!(mixed_block(blk, row0, x, adapters, &bts, row_adapter, d))
    });
    Ok(())
}

#[inline(always)]
fn mixed_block<S: Simd>(
    blk: &mut [f32],
    row0: usize,
    x: &[f32],
    adapters: &[LoraWeights],
    bts: &[Vec<f32>],
    row_adapter: &[i32],
    d: LinearDims,
) {
    let a_rows: Vec<Vec<&[f32]>> = adapters
        .iter()
        .map(|l| l.a.chunks_exact(d.inp).collect())
        .collect();
    let bt_rows: Vec<Vec<&[f32]>> = bts
        .iter()
        .map(|t| t.chunks_exact(d.out).collect())
        .collect();
    let mut u = Vec::new();
    for (bi, yrow) in blk.chunks_exact_mut(d.out).enumerate() {
        let i = row0 + bi;
        let Ok(a) = usize::try_from(row_adapter[i]) else {
            continue;
        };
        let l = &adapters[a];
        u.resize(l.rank, 0.0);
        dot_many::<S>(&mut u, l.scale, &x[i * d.inp..(i + 1) * d.inp], &a_rows[a]);
        axpy_many::<S>(yrow, &u, &bt_rows[a]);
    }
}

/// The baseline a server without this kernel runs: for each adapter, gather its rows, run the
/// whole layer (its own base GEMM), scatter back; rows without an adapter get the base layer.
pub fn lora_linear_looped_forward(
    y: &mut [f32],
    x: &[f32],
    base: &BaseLinear,
    adapters: &[LoraWeights],
    row_adapter: &[i32],
    d: LinearDims,
) -> Result<()> {
    for a in -1..adapters.len() as i32 {
        let rows: Vec<usize> = (0..d.tokens)
            .filter(|&i| row_adapter[i].max(-1) == a)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut xs = Vec::with_capacity(rows.len() * d.inp);
        for &i in &rows {
            xs.extend_from_slice(&x[i * d.inp..(i + 1) * d.inp]);
        }
        let sub = LinearDims {
            tokens: rows.len(),
            ..d
        };
        let mut ys = vec![0.0f32; rows.len() * d.out];
        if a < 0 {
            lora_linear_forward(&mut ys, None, &xs, base, None, sub)?;
        } else {
            let l = &adapters[a as usize];
            let mut u = vec![0.0f32; rows.len() * l.rank];
            let l = LoraWeights {
                dropout: None,
                ..*l
            };
            lora_linear_forward(&mut ys, Some(&mut u), &xs, base, Some(&l), sub)?;
        }
        for (k, &i) in rows.iter().enumerate() {
            y[i * d.out..(i + 1) * d.out].copy_from_slice(&ys[k * d.out..(k + 1) * d.out]);
        }
    }
    Ok(())
}
