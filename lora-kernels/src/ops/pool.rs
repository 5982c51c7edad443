//! The image ops around convolutions (NCHW, as PyTorch): batch norm in inference mode (frozen
//! running statistics), max pooling, adaptive average pooling and nearest upsampling. Each works plane by plane (one
//! `(n, c)` image channel of `H x W` values); planes run in parallel, and every reduction runs
//! in a fixed order, so results do not depend on the thread count.
//!
//! Legend: N = batch, C = channels, (H, W) input size, (OH, OW) output size, P = H * W.

use crate::error::{check_len, invalid, Result};
use rayon::prelude::*;

/// Planes per rayon task: at least this many values each.
const MIN_TASK: usize = 1 << 14;

fn planes_per_task(plane: usize) -> usize {
    MIN_TASK.div_ceil(plane.max(1)).max(1)
}

/// `y = (x - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c]` over `x (N, C, P)`: PyTorch's
/// `BatchNorm2d` in eval mode. `rstd` is computed in f32 as PyTorch does.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward(
    y: &mut [f32],
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (n, c, p): (usize, usize, usize),
    eps: f32,
) -> Result<()> {
    const OP: &str = "batchnorm_forward";
    check_len(OP, "x", x.len(), &[n, c, p])?;
    check_len(OP, "y", y.len(), &[n, c, p])?;
    for (what, v) in [
        ("mean", mean),
        ("var", var),
        ("gamma", gamma),
        ("beta", beta),
    ] {
        check_len(OP, what, v.len(), &[c])?;
    }
    let per = planes_per_task(p);
    y.par_chunks_mut(per * p.max(1))
        .enumerate()
        .for_each(|(t, blk)| {
            for (k, plane) in blk.chunks_mut(p.max(1)).enumerate() {
                let q = t * per + k;
                let ch = q % c;
                let rstd = 1.0 / (var[ch] + eps).sqrt();
                let (scale, m, b) = (gamma[ch] * rstd, mean[ch], beta[ch]);
                for (o, &v) in plane.iter_mut().zip(&x[q * p..(q + 1) * p]) {
                    *o = (v - m) * scale + b;
                }
            }
        });
    Ok(())
}

/// Backward of [`batchnorm_forward`] (the statistics frozen): `dx += dy gamma rstd`,
/// `dgamma += sum dy (x - mean) rstd`, `dbeta += sum dy` (the sums over images and pixels in
/// order). `x` is read for `dgamma` only.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    (n, c, p): (usize, usize, usize),
    eps: f32,
) -> Result<()> {
    const OP: &str = "batchnorm_backward";
    check_len(OP, "dy", dy.len(), &[n, c, p])?;
    for (what, v) in [("mean", mean), ("var", var), ("gamma", gamma)] {
        check_len(OP, what, v.len(), &[c])?;
    }
    let rstd: Vec<f32> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    if let Some(dx) = dx {
        check_len(OP, "dx", dx.len(), &[n, c, p])?;
        let per = planes_per_task(p);
        dx.par_chunks_mut(per * p.max(1))
            .enumerate()
            .for_each(|(t, blk)| {
                for (k, plane) in blk.chunks_mut(p.max(1)).enumerate() {
                    let q = t * per + k;
                    let s = gamma[q % c] * rstd[q % c];
                    for (d, &g) in plane.iter_mut().zip(&dy[q * p..(q + 1) * p]) {
                        *d += g * s;
                    }
                }
            });
    }
    if dgamma.is_some() {
        check_len(OP, "x", x.len(), &[n, c, p])?;
    }
    // Per channel, over images then pixels, in order (channels in parallel).
    let sums = |f: &(dyn Fn(usize, usize) -> f32 + Sync)| -> Vec<f32> {
        (0..c)
            .into_par_iter()
            .map(|ch| {
                let mut acc = 0.0f32;
                for img in 0..n {
                    let q = img * c + ch;
                    for i in q * p..(q + 1) * p {
                        acc += f(ch, i);
                    }
                }
                acc
            })
            .collect()
    };
    if let Some(dg) = dgamma {
        check_len(OP, "dgamma", dg.len(), &[c])?;
        let s = sums(&|ch, i| dy[i] * (x[i] - mean[ch]) * rstd[ch]);
        dg.iter_mut().zip(s).for_each(|(d, v)| *d += v);
    }
    if let Some(db) = dbeta {
        check_len(OP, "dbeta", db.len(), &[c])?;
        let s = sums(&|_, i| dy[i]);
        db.iter_mut().zip(s).for_each(|(d, v)| *d += v);
    }
    Ok(())
}

/// A max pooling window: kernel, stride and zero-free padding (padded positions never win),
/// as PyTorch's `MaxPool2d` (no dilation, floor mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolDims {
    /// N * C planes.
    pub planes: usize,
    /// H.
    pub h: usize,
    /// W.
    pub w: usize,
    /// (KH, KW).
    pub kernel: (usize, usize),
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) padding (at most half the kernel, as PyTorch requires).
    pub padding: (usize, usize),
}

impl PoolDims {
    /// Checks the window and returns `(OH, OW)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        let d = self;
        if d.h == 0 || d.w == 0 {
            return Err(invalid(
                "max_pool2d",
                "x",
                format!("a {}x{} input has nothing to pool", d.h, d.w),
            ));
        }
        if d.kernel.0 == 0 || d.kernel.1 == 0 || d.stride.0 == 0 || d.stride.1 == 0 {
            return Err(invalid(
                "max_pool2d",
                "kernel",
                "kernel and stride must be at least 1",
            ));
        }
        if d.padding.0 > d.kernel.0 / 2 || d.padding.1 > d.kernel.1 / 2 {
            return Err(invalid(
                "max_pool2d",
                "padding",
                format!(
                    "{:?} is more than half the kernel {:?}",
                    d.padding, d.kernel
                ),
            ));
        }
        let ext = |size: usize, k: usize, s: usize, p: usize| -> Result<usize> {
            // p <= k / 2 (checked above), so this cannot overflow unless k itself is absurd.
            let padded = p
                .checked_mul(2)
                .and_then(|pp| size.checked_add(pp))
                .ok_or_else(|| invalid("max_pool2d", "padding", format!("{p} overflows")))?;
            if padded < k {
                return Err(invalid(
                    "max_pool2d",
                    "kernel",
                    format!("{k} is larger than the padded input {padded}"),
                ));
            }
            Ok((padded - k) / s + 1)
        };
        Ok((
            ext(d.h, d.kernel.0, d.stride.0, d.padding.0)?,
            ext(d.w, d.kernel.1, d.stride.1, d.padding.1)?,
        ))
    }
}

/// The input index (within a plane) a max-pooling output takes: the first maximum in row-major
/// window order, NaN winning (PyTorch's rule). Every window holds at least one input element
/// (padding is at most half the kernel).
#[inline]
fn argmax(plane: &[f32], d: &PoolDims, oy: usize, ox: usize) -> usize {
    let (y0, x0) = (
        (oy * d.stride.0) as isize - d.padding.0 as isize,
        (ox * d.stride.1) as isize - d.padding.1 as isize,
    );
    let mut best = f32::NEG_INFINITY;
    let mut at = usize::MAX;
    for i in 0..d.kernel.0 as isize {
        let y = y0 + i;
        if y < 0 || y >= d.h as isize {
            continue;
        }
        for j in 0..d.kernel.1 as isize {
            let x = x0 + j;
            if x < 0 || x >= d.w as isize {
                continue;
            }
            let idx = y as usize * d.w + x as usize;
            let v = plane[idx];
            if at == usize::MAX || v > best || v.is_nan() {
                best = v;
                at = idx;
                if v.is_nan() {
                    return at;
                }
            }
        }
    }
    at
}

/// `y = max over each window`.
pub fn max_pool2d_forward(y: &mut [f32], x: &[f32], d: PoolDims) -> Result<()> {
    let (oh, ow) = d.check()?;
    let (p, op) = (d.h * d.w, oh * ow);
    check_len("max_pool2d_forward", "x", x.len(), &[d.planes, p])?;
    check_len("max_pool2d_forward", "y", y.len(), &[d.planes, op])?;
    let per = planes_per_task(op);
    y.par_chunks_mut(per * op.max(1))
        .enumerate()
        .for_each(|(t, blk)| {
            for (k, out) in blk.chunks_mut(op.max(1)).enumerate() {
                let q = t * per + k;
                let plane = &x[q * p..(q + 1) * p];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = plane[argmax(plane, &d, i / ow, i % ow)];
                }
            }
        });
    Ok(())
}

/// `dx[argmax] += dy` for every output (outputs in order within a plane).
pub fn max_pool2d_backward(dx: &mut [f32], dy: &[f32], x: &[f32], d: PoolDims) -> Result<()> {
    let (oh, ow) = d.check()?;
    let (p, op) = (d.h * d.w, oh * ow);
    check_len("max_pool2d_backward", "x", x.len(), &[d.planes, p])?;
    check_len("max_pool2d_backward", "dx", dx.len(), &[d.planes, p])?;
    check_len("max_pool2d_backward", "dy", dy.len(), &[d.planes, op])?;
    let per = planes_per_task(p);
    dx.par_chunks_mut(per * p.max(1))
        .enumerate()
        .for_each(|(t, blk)| {
            for (k, dplane) in blk.chunks_mut(p.max(1)).enumerate() {
                let q = t * per + k;
                let plane = &x[q * p..(q + 1) * p];
                for (i, &g) in dy[q * op..(q + 1) * op].iter().enumerate() {
                    dplane[argmax(plane, &d, i / ow, i % ow)] += g;
                }
            }
        });
    Ok(())
}

/// The input rows (or columns) `[start, end)` adaptive pooling averages for output `i` of `o`
/// over `size`: PyTorch's `floor(i size / o)` to `ceil((i + 1) size / o)`.
#[inline]
fn adaptive_range(i: usize, o: usize, size: usize) -> (usize, usize) {
    (i * size / o, ((i + 1) * size).div_ceil(o))
}

fn check_adaptive(op: &'static str, h: usize, w: usize, oh: usize, ow: usize) -> Result<()> {
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return Err(invalid(
            op,
            "output_size",
            format!("({oh}, {ow}) from ({h}, {w})"),
        ));
    }
    Ok(())
}

/// PyTorch's `AdaptiveAvgPool2d((oh, ow))` over planes of `(h, w)`: each output the mean of its
/// window (windows may overlap when the sizes do not divide).
pub fn adaptive_avg_pool2d_forward(
    y: &mut [f32],
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<()> {
    const OP: &str = "adaptive_avg_pool2d_forward";
    check_adaptive(OP, h, w, oh, ow)?;
    check_len(OP, "x", x.len(), &[planes, h, w])?;
    check_len(OP, "y", y.len(), &[planes, oh, ow])?;
    let (p, op) = (h * w, oh * ow);
    let per = planes_per_task(p);
    y.par_chunks_mut(per * op).enumerate().for_each(|(t, blk)| {
        for (k, out) in blk.chunks_mut(op).enumerate() {
            let q = t * per + k;
            let plane = &x[q * p..(q + 1) * p];
            for (i, o) in out.iter_mut().enumerate() {
                let ((y0, y1), (x0, x1)) =
                    (adaptive_range(i / ow, oh, h), adaptive_range(i % ow, ow, w));
                let mut s = 0.0f32;
                for yy in y0..y1 {
                    for v in &plane[yy * w + x0..yy * w + x1] {
                        s += v;
                    }
                }
                *o = s / ((y1 - y0) * (x1 - x0)) as f32;
            }
        }
    });
    Ok(())
}

/// `dx += dy / count` over each output's window (outputs in order within a plane).
pub fn adaptive_avg_pool2d_backward(
    dx: &mut [f32],
    dy: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<()> {
    const OP: &str = "adaptive_avg_pool2d_backward";
    check_adaptive(OP, h, w, oh, ow)?;
    check_len(OP, "dx", dx.len(), &[planes, h, w])?;
    check_len(OP, "dy", dy.len(), &[planes, oh, ow])?;
    let (p, op) = (h * w, oh * ow);
    let per = planes_per_task(p);
    dx.par_chunks_mut(per * p).enumerate().for_each(|(t, blk)| {
        for (k, dplane) in blk.chunks_mut(p).enumerate() {
            let q = t * per + k;
            for (i, &g) in dy[q * op..(q + 1) * op].iter().enumerate() {
                let ((y0, y1), (x0, x1)) =
                    (adaptive_range(i / ow, oh, h), adaptive_range(i % ow, ow, w));
                let share = g / ((y1 - y0) * (x1 - x0)) as f32;
                for yy in y0..y1 {
                    for d in &mut dplane[yy * w + x0..yy * w + x1] {
                        *d += share;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Nearest-neighbour upsampling by an integer factor `f` (PyTorch's
/// `F.interpolate(scale_factor=f, mode="nearest")`, the UNet's and the VAE's `Upsample2D`):
/// `y[.., oy, ox] = x[.., oy / f, ox / f]` for `planes` planes of `(h, w)`.
pub fn upsample_nearest_forward(
    y: &mut [f32],
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    f: usize,
) -> Result<()> {
    const OP: &str = "upsample_nearest_forward";
    if f == 0 {
        return Err(invalid(OP, "factor", "must be at least 1"));
    }
    check_len(OP, "x", x.len(), &[planes, h, w])?;
    check_len(OP, "y", y.len(), &[planes, h * f, w * f])?;
    let (oh, ow) = (h * f, w * f);
    if y.is_empty() {
        return Ok(());
    }
    y.par_chunks_mut(oh * ow * planes_per_task(oh * ow))
        .enumerate()
        .for_each(|(t, chunk)| {
            let p0 = t * planes_per_task(oh * ow);
            for (pi, yp) in chunk.chunks_exact_mut(oh * ow).enumerate() {
                let xp = &x[(p0 + pi) * h * w..(p0 + pi + 1) * h * w];
                for (oy, row) in yp.chunks_exact_mut(ow).enumerate() {
                    let xr = &xp[(oy / f) * w..(oy / f + 1) * w];
                    for (ox, v) in row.iter_mut().enumerate() {
                        *v = xr[ox / f];
                    }
                }
            }
        });
    Ok(())
}

/// `dx[.., iy, ix] += sum of dy over its `f x f` block` (in row-major order), the backward of
/// [`upsample_nearest_forward`].
pub fn upsample_nearest_backward(
    dx: &mut [f32],
    dy: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    f: usize,
) -> Result<()> {
    const OP: &str = "upsample_nearest_backward";
    if f == 0 {
        return Err(invalid(OP, "factor", "must be at least 1"));
    }
    check_len(OP, "dx", dx.len(), &[planes, h, w])?;
    check_len(OP, "dy", dy.len(), &[planes, h * f, w * f])?;
    let (oh, ow) = (h * f, w * f);
    if dx.is_empty() {
        return Ok(());
    }
    dx.par_chunks_mut(h * w * planes_per_task(h * w))
        .enumerate()
        .for_each(|(t, chunk)| {
            let p0 = t * planes_per_task(h * w);
            for (pi, dp) in chunk.chunks_exact_mut(h * w).enumerate() {
                let yp = &dy[(p0 + pi) * oh * ow..(p0 + pi + 1) * oh * ow];
                for (iy, row) in dp.chunks_exact_mut(w).enumerate() {
                    for (ix, d) in row.iter_mut().enumerate() {
                        let mut s = 0.0f32;
                        for dy_ in 0..f {
                            let r = &yp[(iy * f + dy_) * ow + ix * f..][..f];
                            s += r.iter().sum::<f32>();
                        }
                        *d += s;
                    }
                }
            }
        });
    Ok(())
}

/// `f64` oracles, by the definitions.
pub mod reference {
    use super::{adaptive_range, PoolDims};

    /// Batch norm in eval mode.
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm(
        x: &[f64],
        mean: &[f64],
        var: &[f64],
        gamma: &[f64],
        beta: &[f64],
        (_, c, p): (usize, usize, usize),
        eps: f64,
    ) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / p) % c;
                (v - mean[ch]) / (var[ch] + eps).sqrt() * gamma[ch] + beta[ch]
            })
            .collect()
    }

    /// Every output window of max pooling, in output order: the indices (into `x`) of the
    /// input elements it covers (padding covers none).
    fn windows(d: &PoolDims) -> impl Iterator<Item = Vec<usize>> + '_ {
        let (oh, ow) = d.check().expect("valid dims");
        (0..d.planes * oh * ow).map(move |o| {
            let (q, oy, ox) = (o / (oh * ow), o / ow % oh, o % ow);
            let mut idx = Vec::new();
            for i in 0..d.kernel.0 {
                for j in 0..d.kernel.1 {
                    let yy = (oy * d.stride.0 + i) as isize - d.padding.0 as isize;
                    let xx = (ox * d.stride.1 + j) as isize - d.padding.1 as isize;
                    if yy >= 0 && xx >= 0 && (yy as usize) < d.h && (xx as usize) < d.w {
                        idx.push(q * d.h * d.w + yy as usize * d.w + xx as usize);
                    }
                }
            }
            idx
        })
    }

    /// Max pooling (padding never wins).
    pub fn max_pool2d(x: &[f64], d: &PoolDims) -> Vec<f64> {
        windows(d)
            .map(|w| w.iter().fold(f64::NEG_INFINITY, |m, &i| m.max(x[i])))
            .collect()
    }

    /// Max pooling's backward by its definition: each output's gradient goes to the first
    /// maximum of its window (NaN-free inputs). Also returns the smallest gap between a window's
    /// maximum and its runner-up, below which finite differences straddle the kink.
    pub fn max_pool2d_backward(dy: &[f64], x: &[f64], d: &PoolDims) -> (Vec<f64>, f64) {
        let mut dx = vec![0.0; x.len()];
        let mut gap = f64::INFINITY;
        for (o, w) in windows(d).enumerate() {
            let (mut best, mut second, mut at) = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0);
            for &i in &w {
                if x[i] > best {
                    (second, best, at) = (best, x[i], i);
                } else if x[i] > second {
                    second = x[i];
                }
            }
            dx[at] += dy[o];
            gap = gap.min(best - second);
        }
        (dx, gap)
    }

    /// Adaptive average pooling.
    pub fn adaptive_avg_pool2d(
        x: &[f64],
        planes: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
    ) -> Vec<f64> {
        let mut y = Vec::with_capacity(planes * oh * ow);
        for q in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let ((y0, y1), (x0, x1)) =
                        (adaptive_range(oy, oh, h), adaptive_range(ox, ow, w));
                    let mut s = 0.0;
                    for yy in y0..y1 {
                        for xx in x0..x1 {
                            s += x[q * h * w + yy * w + xx];
                        }
                    }
                    y.push(s / ((y1 - y0) * (x1 - x0)) as f64);
                }
            }
        }
        y
    }
}
