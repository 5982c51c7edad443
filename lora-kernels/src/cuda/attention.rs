//! `attention.cu`: grouped-query attention (causal, bidirectional or cross), forward and backward.

use super::*;

/// Largest head dimension the CUDA attention kernels take (`ATT_MAX_D` in attention.cu).
pub const ATTN_MAX_HEAD_DIM: usize = 128;
/// Query (or key) rows per block of the attention kernels (`ATT_BLOCK_ROWS`), 4 warps each.
const ATTN_BLOCK_ROWS: usize = 8;

fn attn_check(d: AttnDims, q_like: &[usize], kv_like: &[usize], lse: usize) -> Result<()> {
    let q_len = d.batch * d.seq * d.q_heads * d.head_dim;
    let kv_len = d.batch * d.kv_seq * d.kv_heads * d.head_dim;
    d.check("attention (CUDA)")?;
    let ok = q_like.iter().all(|&n| n == q_len)
        && kv_like.iter().all(|&n| n == kv_len)
        && lse == d.lse_len();
    if !ok {
        return Err(KernelError::Device(format!(
            "attention shape mismatch for {d:?}: q-shaped {q_like:?} (want {q_len}), \
             kv-shaped {kv_like:?} (want {kv_len}), lse {lse} (want {})",
            d.lse_len()
        )));
    }
    if d.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(KernelError::Device(format!(
            "head_dim {} > {ATTN_MAX_HEAD_DIM} is not supported by the CUDA attention kernels",
            d.head_dim
        )));
    }
    Ok(())
}

fn attn_ints(d: AttnDims) -> [i32; 5] {
    [d.seq, d.kv_seq, d.q_heads, d.kv_heads, d.head_dim].map(|v| v as i32)
}

/// `(ceil(rows / 8), heads, B)` blocks of 128 threads (`rows`: T query rows, or S key rows).
fn attn_grid(d: AttnDims, rows: usize, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(ATTN_BLOCK_ROWS) as u32,
            heads as u32,
            d.batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaDevice {
    /// GQA attention (causal, bidirectional or cross), the twin of [`crate::ops::attention::attention_forward`]: writes
    /// `out` `(B, T, Hq, D)` and the per-row log-sum-exp `lse` `(B, Hq, T)`. Head dims up to
    /// [`ATTN_MAX_HEAD_DIM`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        d: AttnDims,
        scale: f32,
    ) -> Result<()> {
        attn_check(d, &[out.len(), q.len()], &[k.len(), v.len()], lse.len())?;
        if d.seq == 0 {
            return Ok(());
        }
        let [t, sk, hq, hkv, hd] = attn_ints(d);
        let causal = d.causal as i32;
        let mut l = self.stream.launch_builder(self.func("attention_forward"));
        l.arg(out).arg(lse).arg(q).arg(k).arg(v);
        l.arg(&t)
            .arg(&sk)
            .arg(&hq)
            .arg(&hkv)
            .arg(&hd)
            .arg(&scale)
            .arg(&causal);
        // SAFETY: argument types and order match attention.cu; lengths checked above.
        unsafe { l.launch(attn_grid(d, d.seq, d.q_heads)) }.map_err(cerr("attention_forward"))?;
        Ok(())
    }

    /// Backward, the twin of [`crate::ops::attention::attention_backward`]: accumulates into
    /// `dq`, `dk`, `dv`. Three kernels: the row terms `delta_i = dO_i . O_i` (recomputing `O`),
    /// then `dq` per query row and `dk`, `dv` per key row (each written by one warp, in a fixed
    /// order: deterministic).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        d: AttnDims,
        scale: f32,
    ) -> Result<()> {
        attn_check(
            d,
            &[dq.len(), dout.len(), q.len()],
            &[dk.len(), dv.len(), k.len(), v.len()],
            lse.len(),
        )?;
        if d.seq == 0 {
            return Ok(());
        }
        let [t, sk, hq, hkv, hd] = attn_ints(d);
        let causal = d.causal as i32;
        let mut delta = self.output(d.lse_len())?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_delta"));
        l.arg(&mut delta).arg(dout).arg(q).arg(k).arg(v);
        l.arg(&t)
            .arg(&sk)
            .arg(&hq)
            .arg(&hkv)
            .arg(&hd)
            .arg(&scale)
            .arg(&causal);
        // SAFETY: as in attention_forward; delta holds B * Hq * T values.
        unsafe { l.launch(attn_grid(d, d.seq, d.q_heads)) }
            .map_err(cerr("attention_backward_delta"))?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_dq"));
        l.arg(dq)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(q)
            .arg(k)
            .arg(v);
        l.arg(&t)
            .arg(&sk)
            .arg(&hq)
            .arg(&hkv)
            .arg(&hd)
            .arg(&scale)
            .arg(&causal);
        // SAFETY: as above.
        unsafe { l.launch(attn_grid(d, d.seq, d.q_heads)) }
            .map_err(cerr("attention_backward_dq"))?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_dkv"));
        l.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(q)
            .arg(k)
            .arg(v);
        l.arg(&t)
            .arg(&sk)
            .arg(&hq)
            .arg(&hkv)
            .arg(&hd)
            .arg(&scale)
            .arg(&causal);
        // SAFETY: as above; this grid runs over kv heads.
        unsafe { l.launch(attn_grid(d, d.kv_seq, d.kv_heads)) }
            .map_err(cerr("attention_backward_dkv"))?;
        Ok(())
    }
}
