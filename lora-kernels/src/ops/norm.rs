//! LayerNorm (GPT-2) and RMSNorm (Llama family) over the last dimension, with backward.
//! Statistics are computed in f32 per row and saved for backward (`mean`, `rstd`: `(N)`).

use crate::error::{check_len, Result};
use crate::par::{for_row_blocks, SendPtr};
use rayon::prelude::*;

fn check_rows(op: &'static str, x: &[f32], c: usize) -> Result<usize> {
    let n = x.len().checked_div(c).unwrap_or(0);
    check_len(op, "x", x.len(), &[n, c])?;
    Ok(n)
}

/// Splits `n` rows into a fixed number of contiguous parts (independent of scheduling) and
/// returns, per part, the partial parameter gradients computed by `f(rows, partial)`, summed in
/// part order: deterministic for a given thread count.
fn reduce_rows(
    n: usize,
    width: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let parts = if n * width < crate::par::PAR_THRESHOLD {
        1
    } else {
        rayon::current_num_threads().max(1) * 2
    };
    let per = n.div_ceil(parts.max(1)).max(1);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut acc = vec![0.0f32; width];
            let r0 = (p * per).min(n);
            let r1 = ((p + 1) * per).min(n);
            f(r0..r1, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0.0f32; width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `out = (x - mean) * rstd * gamma + beta`, writing `mean` and `rstd` `(N)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: Option<&[f32]>,
    c: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    let n = check_rows(OP, x, c)?;
    check_len(OP, "out", out.len(), &[n, c])?;
    check_len(OP, "mean", mean.len(), &[n])?;
    check_len(OP, "rstd", rstd.len(), &[n])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    if let Some(b) = beta {
        check_len(OP, "beta", b.len(), &[c])?;
    }
    let (mp, rp) = (SendPtr(mean.as_mut_ptr()), SendPtr(rstd.as_mut_ptr()));
    for_row_blocks(out, c, |row0, blk| {
        for (bi, orow) in blk.chunks_exact_mut(c).enumerate() {
            let i = row0 + bi;
            let xr = &x[i * c..(i + 1) * c];
            let m = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / c as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for j in 0..c {
                let nv = (xr[j] - m) * rs;
                orow[j] = nv * gamma[j] + beta.map_or(0.0, |b| b[j]);
            }
            // SAFETY: row i belongs to this block only; mean/rstd have N elements (checked).
            unsafe {
                *mp.get().add(i) = m;
                *rp.get().add(i) = rs;
            }
        }
    });
    Ok(())
}

/// Backward of [`layernorm_forward`]: `dx += ...`, `dgamma += ...`, `dbeta += ...`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    let n = check_rows(OP, x, c)?;
    check_len(OP, "dout", dout.len(), &[n, c])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    check_len(OP, "mean", mean.len(), &[n])?;
    check_len(OP, "rstd", rstd.len(), &[n])?;
    if let Some(dx) = dx {
        check_len(OP, "dx", dx.len(), &[n, c])?;
        for_row_blocks(dx, c, |row0, blk| {
            for (bi, dxr) in blk.chunks_exact_mut(c).enumerate() {
                let i = row0 + bi;
                let (m, rs) = (mean[i], rstd[i]);
                let xr = &x[i * c..(i + 1) * c];
                let dr = &dout[i * c..(i + 1) * c];
                // dnorm = dout * gamma; dx = rs * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
                let mut s1 = 0.0f32;
                let mut s2 = 0.0f32;
                for j in 0..c {
                    let dn = dr[j] * gamma[j];
                    s1 += dn;
                    s2 += dn * (xr[j] - m) * rs;
                }
                let (s1, s2) = (s1 / c as f32, s2 / c as f32);
                for j in 0..c {
                    let dn = dr[j] * gamma[j];
                    let nv = (xr[j] - m) * rs;
                    dxr[j] += rs * (dn - s1 - nv * s2);
                }
            }
        });
    }
    if dgamma.is_some() || dbeta.is_some() {
        let want_g = dgamma.is_some();
        let want_b = dbeta.is_some();
        let tot = reduce_rows(n, 2 * c, |rows, acc| {
            let (ag, ab) = acc.split_at_mut(c);
            for i in rows {
                let (m, rs) = (mean[i], rstd[i]);
                for j in 0..c {
                    let d = dout[i * c + j];
                    if want_g {
                        ag[j] += d * (x[i * c + j] - m) * rs;
                    }
                    if want_b {
                        ab[j] += d;
                    }
                }
            }
        });
        if let Some(dg) = dgamma {
            check_len(OP, "dgamma", dg.len(), &[c])?;
            dg.iter_mut().zip(&tot[..c]).for_each(|(a, b)| *a += b);
        }
        if let Some(db) = dbeta {
            check_len(OP, "dbeta", db.len(), &[c])?;
            db.iter_mut().zip(&tot[c..]).for_each(|(a, b)| *a += b);
        }
    }
    Ok(())
}

/// `out = x * rstd * gamma` with `rstd = 1 / sqrt(mean(x^2) + eps)`, writing `rstd` `(N)`.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    c: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    let n = check_rows(OP, x, c)?;
    check_len(OP, "out", out.len(), &[n, c])?;
    check_len(OP, "rstd", rstd.len(), &[n])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    let rp = SendPtr(rstd.as_mut_ptr());
    for_row_blocks(out, c, |row0, blk| {
        for (bi, orow) in blk.chunks_exact_mut(c).enumerate() {
            let i = row0 + bi;
            let xr = &x[i * c..(i + 1) * c];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let rs = 1.0 / (ms + eps).sqrt();
            for j in 0..c {
                orow[j] = xr[j] * rs * gamma[j];
            }
            // SAFETY: row i belongs to this block only; rstd has N elements (checked).
            unsafe { *rp.get().add(i) = rs };
        }
    });
    Ok(())
}

/// Backward of [`rmsnorm_forward`]: `dx += rs * (dn - x * rs^2 * mean(dn * x))`, `dn = dout*gamma`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    rstd: &[f32],
    c: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    let n = check_rows(OP, x, c)?;
    check_len(OP, "dout", dout.len(), &[n, c])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    check_len(OP, "rstd", rstd.len(), &[n])?;
    if let Some(dx) = dx {
        check_len(OP, "dx", dx.len(), &[n, c])?;
        for_row_blocks(dx, c, |row0, blk| {
            for (bi, dxr) in blk.chunks_exact_mut(c).enumerate() {
                let i = row0 + bi;
                let rs = rstd[i];
                let xr = &x[i * c..(i + 1) * c];
                let dr = &dout[i * c..(i + 1) * c];
                let s = (0..c).map(|j| dr[j] * gamma[j] * xr[j]).sum::<f32>() / c as f32;
                for j in 0..c {
                    dxr[j] += rs * (dr[j] * gamma[j] - xr[j] * rs * rs * s);
                }
            }
        });
    }
    if let Some(dg) = dgamma {
        check_len(OP, "dgamma", dg.len(), &[c])?;
        let tot = reduce_rows(n, c, |rows, acc| {
            for i in rows {
                for j in 0..c {
                    acc[j] += dout[i * c + j] * x[i * c + j] * rstd[i];
                }
            }
        });
        dg.iter_mut().zip(&tot).for_each(|(a, b)| *a += b);
    }
    Ok(())
}

/// `f64` oracles: forward only; their gradients are checked by finite differences in the tests.
pub mod reference {
    /// LayerNorm of each row.
    pub fn layernorm(
        x: &[f64],
        gamma: &[f64],
        beta: Option<&[f64]>,
        c: usize,
        eps: f64,
    ) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / c as f64;
                let v = r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / c as f64;
                let rs = 1.0 / (v + eps).sqrt();
                r.iter()
                    .enumerate()
                    .map(move |(j, x)| (x - m) * rs * gamma[j] + beta.map_or(0.0, |b| b[j]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
    /// RMSNorm of each row.
    pub fn rmsnorm(x: &[f64], gamma: &[f64], c: usize, eps: f64) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|r| {
                let ms = r.iter().map(|x| x * x).sum::<f64>() / c as f64;
                let rs = 1.0 / (ms + eps).sqrt();
                r.iter()
                    .enumerate()
                    .map(move |(j, x)| x * rs * gamma[j])
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// GroupNorm's shape: `x (N, C, S)` (S: the spatial size, H x W), `G` groups of `C / G`
/// consecutive channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupDims {
    /// N
    pub batch: usize,
    /// C
    pub channels: usize,
    /// S
    pub spatial: usize,
    /// G (divides C)
    pub groups: usize,
}

impl GroupDims {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.groups == 0 || !self.channels.is_multiple_of(self.groups) {
            return Err(crate::error::invalid(
                op,
                "groups",
                format!(
                    "{} groups do not divide {} channels",
                    self.groups, self.channels
                ),
            ));
        }
        Ok(())
    }
    /// Elements of one group of one sample: `(C / G) S`.
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// GroupNorm (`torch.nn.GroupNorm`, Stable Diffusion's UNet and VAE): per sample and group,
/// `out = (x - mean) rstd gamma[c] + beta[c]` over the group's `(C / G) S` values, writing
/// `mean` and `rstd` `(N, G)`. The statistics are summed in f64 (a group of SD's VAE holds
/// 16 x 512 x 512 values).
#[allow(clippy::too_many_arguments)]
pub fn groupnorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: Option<&[f32]>,
    d: GroupDims,
    eps: f32,
) -> Result<()> {
    const OP: &str = "groupnorm_forward";
    d.check(OP)?;
    let GroupDims {
        batch: n,
        channels: c,
        spatial: s,
        groups: g,
    } = d;
    check_len(OP, "x", x.len(), &[n, c, s])?;
    check_len(OP, "out", out.len(), &[n, c, s])?;
    check_len(OP, "mean", mean.len(), &[n, g])?;
    check_len(OP, "rstd", rstd.len(), &[n, g])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    if let Some(b) = beta {
        check_len(OP, "beta", b.len(), &[c])?;
    }
    let len = d.group_len();
    if len == 0 {
        return Ok(());
    }
    let cg = c / g;
    out.par_chunks_mut(len)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(row, (o, (m, r)))| {
            let xr = &x[row * len..(row + 1) * len];
            let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / len as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            let ch0 = (row % g) * cg;
            for (k, (ov, xv)) in o.chunks_exact_mut(s).zip(xr.chunks_exact(s)).enumerate() {
                let ch = ch0 + k;
                let (gm, bt) = (gamma[ch], beta.map_or(0.0, |b| b[ch]));
                for (o, &v) in ov.iter_mut().zip(xv) {
                    *o = (((v as f64 - mu) * rs) as f32) * gm + bt;
                }
            }
            *m = mu as f32;
            *r = rs as f32;
        });
    Ok(())
}

/// Backward of [`groupnorm_forward`] into whichever gradients are given: `dx +=`, `dgamma +=`,
/// `dbeta +=` (the parameter gradients summed over samples in order: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn groupnorm_backward(
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    d: GroupDims,
) -> Result<()> {
    const OP: &str = "groupnorm_backward";
    d.check(OP)?;
    let GroupDims {
        batch: n,
        channels: c,
        spatial: s,
        groups: g,
    } = d;
    check_len(OP, "x", x.len(), &[n, c, s])?;
    check_len(OP, "dout", dout.len(), &[n, c, s])?;
    check_len(OP, "gamma", gamma.len(), &[c])?;
    check_len(OP, "mean", mean.len(), &[n, g])?;
    check_len(OP, "rstd", rstd.len(), &[n, g])?;
    let len = d.group_len();
    if len == 0 {
        return Ok(());
    }
    let cg = c / g;
    if let Some(dx) = dx {
        check_len(OP, "dx", dx.len(), &[n, c, s])?;
        dx.par_chunks_mut(len).enumerate().for_each(|(row, dxr)| {
            let (mu, rs) = (mean[row] as f64, rstd[row] as f64);
            let (xr, dr) = (
                &x[row * len..(row + 1) * len],
                &dout[row * len..(row + 1) * len],
            );
            let ch0 = (row % g) * cg;
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for k in 0..cg {
                let gm = gamma[ch0 + k] as f64;
                for j in k * s..(k + 1) * s {
                    let dn = dr[j] as f64 * gm;
                    s1 += dn;
                    s2 += dn * (xr[j] as f64 - mu) * rs;
                }
            }
            let (s1, s2) = (s1 / len as f64, s2 / len as f64);
            for k in 0..cg {
                let gm = gamma[ch0 + k] as f64;
                for j in k * s..(k + 1) * s {
                    let dn = dr[j] as f64 * gm;
                    let nv = (xr[j] as f64 - mu) * rs;
                    dxr[j] += (rs * (dn - s1 - nv * s2)) as f32;
                }
            }
        });
    }
    if dgamma.is_none() && dbeta.is_none() {
        return Ok(());
    }
    // Per channel: sums over samples (in order) and pixels of dy x_hat and dy.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sg, mut sb) = (0.0f64, 0.0f64);
            for i in 0..n {
                let row = i * g + ch / cg;
                let (mu, rs) = (mean[row] as f64, rstd[row] as f64);
                let off = (i * c + ch) * s;
                for j in off..off + s {
                    let dy = dout[j] as f64;
                    sg += dy * (x[j] as f64 - mu) * rs;
                    sb += dy;
                }
            }
            (sg, sb)
        })
        .collect();
    if let Some(dg) = dgamma {
        check_len(OP, "dgamma", dg.len(), &[c])?;
        dg.iter_mut()
            .zip(&sums)
            .for_each(|(d, (sg, _))| *d += *sg as f32);
    }
    if let Some(db) = dbeta {
        check_len(OP, "dbeta", db.len(), &[c])?;
        db.iter_mut()
            .zip(&sums)
            .for_each(|(d, (_, sb))| *d += *sb as f32);
    }
    Ok(())
}

/// The f64 oracle of [`groupnorm_forward`], by its definition.
pub mod group_reference {
    use super::GroupDims;

    /// `(x - mean) / sqrt(var + eps) * gamma + beta` per sample and group.
    pub fn forward(x: &[f64], gamma: &[f64], beta: &[f64], d: GroupDims, eps: f64) -> Vec<f64> {
        let len = d.channels / d.groups * d.spatial;
        let cg = d.channels / d.groups;
        let mut out = vec![0.0; x.len()];
        for row in 0..d.batch * d.groups {
            let xr = &x[row * len..(row + 1) * len];
            let mu = xr.iter().sum::<f64>() / len as f64;
            let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / len as f64;
            for j in 0..len {
                let ch = (row % d.groups) * cg + j / d.spatial;
                out[row * len + j] = (xr[j] - mu) / (var + eps).sqrt() * gamma[ch] + beta[ch];
            }
        }
        out
    }
}
