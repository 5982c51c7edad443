//! `lora.cu`: the fused LoRA linear layer, forward and backward, with split reductions.

use super::*;

/// How many blocks per SM the split reductions of the LoRA kernels aim for.
const BLOCKS_PER_SM: usize = 2;
/// At most this many splits of one reduction (each split adds `n x r` partial values).
const MAX_SPLITS: usize = 32;

/// Splits a reduction over `extent` values (in whole `unit`s) into `(splits, chunk)` so that a
/// grid of `base` blocks per split reaches about [`BLOCKS_PER_SM`] blocks per SM: without it a
/// 512-token layer runs its rank-r kernels on 16 blocks of a 132-SM H200. `chunk` is a multiple
/// of `unit` and `splits = ceil(extent / chunk)`. The split (and so the rounding of the sums)
/// depends only on the shapes and the SM count: the same device gives the same bits every run.
pub fn lora_split(sms: usize, base: usize, extent: usize, unit: usize) -> (usize, usize) {
    let unit = unit.max(1);
    let units = extent.div_ceil(unit).max(1);
    let want = (BLOCKS_PER_SM * sms.max(1))
        .div_ceil(base.max(1))
        .clamp(1, MAX_SPLITS)
        .min(units);
    let chunk = units.div_ceil(want) * unit;
    (extent.div_ceil(chunk).max(1), chunk)
}

/// Gradients [`CudaDevice::lora_backward_into`] adds into; absent ones are not computed.
#[derive(Debug, Default)]
pub struct LoraGrads<'a> {
    /// `(n, k)`.
    pub dx: Option<&'a mut CudaSlice<f32>>,
    /// `(r, k)`.
    pub da: Option<&'a mut CudaSlice<f32>>,
    /// `(m, r)`.
    pub db: Option<&'a mut CudaSlice<f32>>,
    /// `(m)`.
    pub dbias: Option<&'a mut CudaSlice<f32>>,
}

/// LoRA linear dimensions and settings for the CUDA path (`n` tokens, `k` in, `m` out, `r` rank).
#[derive(Clone, Copy, Debug)]
pub struct LoraDims {
    /// Tokens.
    pub n: usize,
    /// In features.
    pub k: usize,
    /// Out features.
    pub m: usize,
    /// Rank (at most 64 on this path).
    pub r: usize,
    /// Scale `s`.
    pub scale: f32,
    /// Dropout probability on the adapter input (0 = none).
    pub p: f32,
    /// Dropout seed (the CPU kernel's `Dropout::seed`).
    pub seed: u64,
}

// lora.cu's tiles: rows, output columns, reduction chunk, rank chunk.
const TN: usize = 32;
const TC: usize = 64;
const TK: usize = 32;
const RC: usize = 64;

fn check(d: LoraDims, x: usize, w: usize, a: usize, b: usize) -> Result<()> {
    let ok = x == d.n * d.k && w == d.k * d.m && a == d.r * d.k && b == d.m * d.r;
    if !ok || d.r == 0 {
        return Err(KernelError::Device(format!(
            "shape mismatch for {d:?}: x {x}, w {w}, a {a}, b {b}"
        )));
    }
    Ok(())
}

impl CudaDevice {
    /// Forward: `y = x W^T + bias + s drop(x) A^T B^T`, returning `(y, u)`. `w` is `(m, k)` for
    /// `OutIn` or `(k, m)` for `InOut`; `a` `(r, k)`; `b` `(m, r)`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        bias: Option<&CudaSlice<f32>>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        check(d, x.len(), w.len(), a.len(), b.len())?;
        let mut y = self.linear_forward(x, w, layout, (d.n, d.k, d.m))?;
        let mut u = self.output(d.n * d.r)?;
        let (n, k, m, r) = (d.n as i32, d.k as i32, d.m as i32, d.r as i32);
        // u = drop(x) A^T, split over k when the row blocks alone would leave SMs idle.
        let base = blocks(d.n, TN) as usize * d.r.div_ceil(RC);
        let (splits, kc) = lora_split(self.sms, base, d.k, TK);
        let mut u_part = if splits > 1 {
            Some(self.output(splits * d.n * d.r)?)
        } else {
            None
        };
        let mut cfg = grid(blocks(d.n, TN), blocks(d.r, RC));
        cfg.grid_dim.2 = splits as u32;
        let kc_i = kc as i32;
        let mut l = self.stream.launch_builder(self.func("lora_shrink"));
        l.arg(u_part.as_mut().unwrap_or(&mut u))
            .arg(x)
            .arg(a)
            .arg(&n)
            .arg(&k)
            .arg(&r)
            .arg(&kc_i)
            .arg(&d.p)
            .arg(&d.seed);
        // SAFETY: argument types and order match lora.cu's signature; sizes checked above; the
        // output holds `splits` (n, r) slices.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_shrink"))?;
        if let Some(part) = &u_part {
            self.reduce(&mut u, part, splits, d.n * d.r, false)?;
        }
        let null = 0u64;
        let cfg = grid(blocks(d.n, TN), blocks(d.m, TC));
        let mut l = self.stream.launch_builder(self.func("lora_expand"));
        l.arg(&mut y).arg(&u).arg(b);
        match bias {
            Some(bb) => l.arg(bb),
            None => l.arg(&null),
        };
        l.arg(&n).arg(&m).arg(&r).arg(&d.scale);
        // SAFETY: as above.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_expand"))?;
        Ok((y, u))
    }

    /// Backward into fresh buffers: returns `(dx, dA, dB, dbias)` for the frozen base (no dW).
    /// [`CudaDevice::lora_backward_into`] on zeroed buffers (tests and one-off use; training
    /// accumulates into its gradients directly).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<[CudaSlice<f32>; 4]> {
        let zeros = |len: usize| self.stream.alloc_zeros::<f32>(len).map_err(cerr("alloc"));
        let (mut dx, mut da, mut db, mut dbias) = (
            zeros(d.n * d.k)?,
            zeros(d.r * d.k)?,
            zeros(d.m * d.r)?,
            zeros(d.m)?,
        );
        let grads = LoraGrads {
            dx: Some(&mut dx),
            da: Some(&mut da),
            db: Some(&mut db),
            dbias: Some(&mut dbias),
        };
        self.lora_backward_into(grads, dy, Some(x), w, layout, a, b, u, d)?;
        Ok([dx, da, db, dbias])
    }

    /// Backward accumulated into the caller's gradients, computing only those asked for:
    /// `dx += dy W + drop'(g A)` (cuBLAS with beta 1 straight into `dx`, then the rank-r kernel
    /// in place: no temporary, no extra pass), `dA +=`, `dB +=` and `dbias +=` (the fixed-order
    /// reductions add into them). No `dx` (a first layer): neither product runs. No `dbias` (a
    /// frozen bias, the LoRA case): no column sums. `x` is read for dA only (`None` without dA:
    /// a tape that kept no input).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_into(
        &self,
        grads: LoraGrads<'_>,
        dy: &CudaSlice<f32>,
        x: Option<&CudaSlice<f32>>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<()> {
        // x is read for dA alone: a caller that wants no dA may pass none (not kept).
        let x_len = match x {
            Some(x) => x.len(),
            None if grads.da.is_none() => d.n * d.k,
            None => {
                return Err(KernelError::Device(
                    "lora_backward: dA was asked for without x".into(),
                ))
            }
        };
        check(d, x_len, w.len(), a.len(), b.len())?;
        if d.r > 64 {
            return Err(KernelError::Device(format!(
                "rank {} > 64 is not supported by the fused CUDA backward yet",
                d.r
            )));
        }
        let LoraGrads {
            mut dx,
            da,
            db,
            dbias,
        } = grads;
        for (name, have, want) in [
            ("dy", Some(dy.len()), d.n * d.m),
            ("u", Some(u.len()), d.n * d.r),
            ("dx", dx.as_ref().map(|v| v.len()), d.n * d.k),
            ("dA", da.as_ref().map(|v| v.len()), d.r * d.k),
            ("dB", db.as_ref().map(|v| v.len()), d.m * d.r),
            ("dbias", dbias.as_ref().map(|v| v.len()), d.m),
        ] {
            if let Some(have) = have.filter(|&h| h != want) {
                return Err(KernelError::Device(format!(
                    "lora_backward: {name} holds {have} values, expected {want}"
                )));
            }
        }
        let (n, k, m, r) = (d.n as i32, d.k as i32, d.m as i32, d.r as i32);
        let alloc = |len: usize| self.output(len);
        if let Some(dx) = dx.as_deref_mut() {
            // dx += dy W, in the product itself.
            self.linear_backward_dx_accumulate(dx, dy, w, layout, (d.n, d.k, d.m))?;
        }
        let need_g = dx.is_some() || da.is_some();
        if !need_g && db.is_none() && dbias.is_none() {
            return Ok(());
        }
        // g, dB and db partials in one pass over dy, split over m when the row blocks alone
        // would leave SMs idle (g then comes in `splits` partial sums). Partials nobody asked
        // for are not written (null pointers).
        let row_blocks = d.n.div_ceil(TN);
        let (splits, mc) = lora_split(self.sms, row_blocks, d.m, TC);
        let mut g = alloc(d.n * d.r)?;
        let mut g_part = if splits > 1 {
            Some(alloc(splits * d.n * d.r)?)
        } else {
            None
        };
        let mut db_b_part = db
            .is_some()
            .then(|| alloc(row_blocks * d.m * d.r))
            .transpose()?;
        let mut dbias_part = dbias
            .is_some()
            .then(|| alloc(row_blocks * d.m))
            .transpose()?;
        let null = 0u64;
        let cfg = grid(row_blocks as u32, splits as u32);
        let mc_i = mc as i32;
        let mut l = self.stream.launch_builder(self.func("lora_backward_g_db"));
        l.arg(g_part.as_mut().unwrap_or(&mut g));
        match db_b_part.as_mut() {
            Some(p) => l.arg(p),
            None => l.arg(&null),
        };
        match dbias_part.as_mut() {
            Some(p) => l.arg(p),
            None => l.arg(&null),
        };
        l.arg(dy)
            .arg(b)
            .arg(u)
            .arg(&n)
            .arg(&m)
            .arg(&r)
            .arg(&mc_i)
            .arg(&d.scale);
        // SAFETY: argument types and order match lora.cu; buffers sized for the grid; a null
        // partial pointer is skipped by the kernel.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_g_db"))?;
        if let Some(part) = &g_part {
            self.reduce(&mut g, part, splits, d.n * d.r, false)?;
        }
        if let (Some(db), Some(part)) = (db, &db_b_part) {
            self.reduce(db, part, row_blocks, d.m * d.r, true)?;
        }
        if let (Some(dbias), Some(part)) = (dbias, &dbias_part) {
            self.reduce(dbias, part, row_blocks, d.m, true)?;
        }
        if let Some(d_a) = da {
            // dA partials over row segments (enough to fill the device), then the fixed-order
            // reduction into dA.
            let (segs, rows) = lora_split(self.sms, d.k.div_ceil(TC), d.n, TN);
            let rows_per_seg = rows as i32;
            let mut da_part = alloc(segs * d.r * d.k)?;
            let cfg = grid(blocks(d.k, TC), segs as u32);
            let mut l = self.stream.launch_builder(self.func("lora_backward_da"));
            l.arg(&mut da_part)
                .arg(&g)
                .arg(x.ok_or_else(|| KernelError::Device("lora_backward: no x".into()))?)
                .arg(&n)
                .arg(&k)
                .arg(&r)
                .arg(&rows_per_seg)
                .arg(&d.p)
                .arg(&d.seed);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_da"))?;
            self.reduce(d_a, &da_part, segs, d.r * d.k, true)?;
        }
        if let Some(dx) = dx {
            // dx += drop'(g A), in place.
            let cfg = grid(blocks(d.n, TN), blocks(d.k, TC));
            let mut l = self.stream.launch_builder(self.func("lora_backward_dx"));
            l.arg(dx)
                .arg(&g)
                .arg(a)
                .arg(&n)
                .arg(&k)
                .arg(&r)
                .arg(&d.p)
                .arg(&d.seed);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_dx"))?;
        }
        Ok(())
    }

    /// `out (+)= the sum of the `parts` partials`, in a fixed order (`accumulate`: add into `out`).
    fn reduce(
        &self,
        out: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        parts: usize,
        len: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (parts, len_i, acc) = (parts as i32, len as i32, accumulate as i32);
        let cfg = grid(blocks(len, THREADS as usize), 1);
        let mut l = self
            .stream
            .launch_builder(self.func("lora_reduce_partials"));
        l.arg(out).arg(part).arg(&parts).arg(&len_i).arg(&acc);
        // SAFETY: argument types and order match lora.cu; `part` holds parts * len values.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(cerr("lora_reduce_partials"))
    }
}

#[cfg(test)]
mod split_tests {
    use super::lora_split;

    /// The splits cover the reduction exactly once in whole tiles, aim at two blocks per SM and
    /// stop at 32; a grid that already fills the device is not split. (scripts/cuda_emu/check.py
    /// mirrors this function; the first cases pin the values it must agree with.)
    #[test]
    fn splits_cover_the_reduction_and_fill_the_device() {
        assert_eq!(lora_split(132, 16, 4096, 64), (16, 256)); // 512 tokens, m = 4096
        assert_eq!(lora_split(132, 64, 768, 32), (5, 160)); // 2048 tokens, k = 768
        assert_eq!(lora_split(132, 300, 768, 32), (1, 768)); // already 300 blocks
        assert_eq!(lora_split(132, 1, 100_000, 64), (32, 3136)); // capped at 32
        assert_eq!(lora_split(132, 1, 5, 64), (1, 64)); // one tile: nothing to split
        for sms in [1, 7, 132] {
            for base in [1, 3, 16, 64, 1000] {
                for extent in [1, 31, 32, 33, 100, 768, 4096, 11008] {
                    for unit in [1, 32, 64] {
                        let (splits, chunk) = lora_split(sms, base, extent, unit);
                        assert!(chunk % unit == 0 && chunk > 0);
                        assert!(splits * chunk >= extent && (splits - 1) * chunk < extent);
                        assert!((1..=32).contains(&splits));
                        if base >= 2 * sms {
                            assert_eq!(splits, 1);
                        }
                    }
                }
            }
        }
    }
}
