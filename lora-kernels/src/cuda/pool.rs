//! `pool.cu` (max and adaptive average pooling) and the batch-norm kernels of `rows.cu`.

use super::*;
use crate::ops::pool::PoolDims;

/// `PoolDims` of pool.cu (the same field order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PoolDimsC {
    h: i32,
    w: i32,
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    oh: i32,
    ow: i32,
}

// SAFETY: a plain `#[repr(C)]` struct of i32s, laid out as pool.cu's `PoolDims`.
unsafe impl cudarc::driver::DeviceRepr for PoolDimsC {}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| KernelError::Device(format!("{what}: {v} past the kernels' i32 range")))
}

fn len(what: &str, have: usize, want: usize) -> Result<()> {
    if have != want {
        return Err(KernelError::Device(format!(
            "{what} holds {have} values, expected {want}"
        )));
    }
    Ok(())
}

impl CudaDevice {
    fn launch_1d<'a>(
        &'a self,
        name: &'static str,
        n: usize,
        args: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
    ) -> Result<()> {
        if n == 0 {
            return Ok(()); // nothing to compute (a zero-block launch is an error)
        }
        let mut l = self.stream.launch_builder(self.func(name));
        args(&mut l);
        // SAFETY: every caller pushes the kernel's arguments in the order of its .cu signature,
        // with buffers whose lengths it checked against the sizes it passes.
        unsafe { l.launch(grid(blocks(n, THREADS as usize), 1)) }
            .map(|_| ())
            .map_err(cerr(name))
    }

    /// Max pooling (see `ops::pool`).
    pub fn max_pool2d_forward(&self, x: &CudaSlice<f32>, d: PoolDims) -> Result<CudaSlice<f32>> {
        let (oh, ow) = d.check()?;
        len("max_pool2d x", x.len(), d.planes * d.h * d.w)?;
        let c = pool_c(&d, oh, ow)?;
        let n = d.planes * oh * ow;
        let mut y = self.output(n)?;
        let planes = d.planes as i64;
        self.launch_1d("max_pool2d_forward", n, |l| {
            l.arg(&mut y).arg(x).arg(&planes).arg(&c);
        })?;
        Ok(y)
    }

    /// `dx[argmax] += dy`.
    pub fn max_pool2d_backward(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        d: PoolDims,
    ) -> Result<()> {
        let (oh, ow) = d.check()?;
        let p = d.planes * d.h * d.w;
        len("max_pool2d x", x.len(), p)?;
        len("max_pool2d dx", dx.len(), p)?;
        len("max_pool2d dy", dy.len(), d.planes * oh * ow)?;
        let c = pool_c(&d, oh, ow)?;
        let planes = d.planes as i64;
        self.launch_1d("max_pool2d_backward", p, |l| {
            l.arg(dx).arg(dy).arg(x).arg(&planes).arg(&c);
        })
    }

    /// Adaptive average pooling.
    pub fn adaptive_avg_pool2d(
        &self,
        backward: bool,
        out: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        planes: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let (inp, outp) = (planes * h * w, planes * oh * ow);
        let (name, n) = if backward {
            len("adaptive_avg_pool2d dx", out.len(), inp)?;
            len("adaptive_avg_pool2d dy", src.len(), outp)?;
            ("adaptive_avg_pool2d_backward", inp)
        } else {
            len("adaptive_avg_pool2d x", src.len(), inp)?;
            len("adaptive_avg_pool2d y", out.len(), outp)?;
            ("adaptive_avg_pool2d_forward", outp)
        };
        if oh == 0 || ow == 0 || h == 0 || w == 0 {
            return Err(KernelError::Device(format!(
                "adaptive_avg_pool2d: output ({oh}, {ow}) from ({h}, {w})"
            )));
        }
        let (pl, hi, wi, ohi, owi) = (
            planes as i64,
            int("h", h)?,
            int("w", w)?,
            int("oh", oh)?,
            int("ow", ow)?,
        );
        self.launch_1d(name, n, |l| {
            l.arg(out)
                .arg(src)
                .arg(&pl)
                .arg(&hi)
                .arg(&wi)
                .arg(&ohi)
                .arg(&owi);
        })
    }

    /// Nearest upsampling by `f` (`backward`: `out` is `dx`, `src` is `dy`, accumulated).
    pub fn upsample_nearest(
        &self,
        backward: bool,
        out: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        planes: usize,
        (h, w): (usize, usize),
        f: usize,
    ) -> Result<()> {
        let (inp, outp) = (planes * h * w, planes * h * w * f * f);
        let (name, n) = if backward {
            len("upsample_nearest dx", out.len(), inp)?;
            len("upsample_nearest dy", src.len(), outp)?;
            ("upsample_nearest_backward", inp)
        } else {
            len("upsample_nearest x", src.len(), inp)?;
            len("upsample_nearest y", out.len(), outp)?;
            ("upsample_nearest_forward", outp)
        };
        if f == 0 {
            return Err(KernelError::Device("upsample_nearest: factor 0".into()));
        }
        let (pl, hi, wi, fi) = (planes as i64, int("h", h)?, int("w", w)?, int("factor", f)?);
        int("h * factor * w * factor", h * f * w * f)?;
        self.launch_1d(name, n, |l| {
            l.arg(out).arg(src).arg(&pl).arg(&hi).arg(&wi).arg(&fi);
        })
    }

    /// Batch norm in eval mode: forward into a new buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        var: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        (n, c, p): (usize, usize, usize),
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        len("batchnorm x", x.len(), n * c * p)?;
        for (what, v) in [
            ("mean", mean),
            ("var", var),
            ("gamma", gamma),
            ("beta", beta),
        ] {
            len(what, v.len(), c)?;
        }
        let mut y = self.output(x.len())?;
        let (total, ci, pi) = (x.len() as i64, int("c", c)?, int("p", p)?);
        self.launch_1d("batchnorm_forward", x.len(), |l| {
            l.arg(&mut y)
                .arg(x)
                .arg(mean)
                .arg(var)
                .arg(gamma)
                .arg(beta)
                .arg(&total)
                .arg(&ci)
                .arg(&pi)
                .arg(&eps);
        })?;
        Ok(y)
    }

    /// Batch norm backward into the gradients given (statistics frozen).
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm_backward(
        &self,
        dx: Option<&mut CudaSlice<f32>>,
        dgamma: Option<&mut CudaSlice<f32>>,
        dbeta: Option<&mut CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        x: Option<&CudaSlice<f32>>,
        mean: &CudaSlice<f32>,
        var: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        (n, c, p): (usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        let total = n * c * p;
        len("batchnorm dy", dy.len(), total)?;
        for (what, v) in [("mean", mean), ("var", var), ("gamma", gamma)] {
            len(what, v.len(), c)?;
        }
        let (ti, ni, ci, pi) = (total as i64, int("n", n)?, int("c", c)?, int("p", p)?);
        if let Some(dx) = dx {
            len("batchnorm dx", dx.len(), total)?;
            self.launch_1d("batchnorm_backward_dx", total, |l| {
                l.arg(dx)
                    .arg(dy)
                    .arg(var)
                    .arg(gamma)
                    .arg(&ti)
                    .arg(&ci)
                    .arg(&pi)
                    .arg(&eps);
            })?;
        }
        if (dgamma.is_none() && dbeta.is_none()) || c == 0 {
            return Ok(());
        }
        let null = 0u64;
        let x = match (&dgamma, x) {
            (Some(_), None) => return Err(KernelError::Device("batchnorm: dgamma needs x".into())),
            (_, x) => x,
        };
        if let Some(x) = x {
            len("batchnorm x", x.len(), total)?;
        }
        let mut l = self
            .stream
            .launch_builder(self.func("batchnorm_backward_params"));
        match dgamma {
            Some(g) => l.arg(g),
            None => l.arg(&null),
        };
        match dbeta {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(dy);
        match x {
            Some(x) => l.arg(x),
            None => l.arg(&null),
        };
        l.arg(mean).arg(var).arg(&ni).arg(&ci).arg(&pi).arg(&eps);
        // SAFETY: argument order as rows.cu's batchnorm_backward_params; null pointers only for
        // outputs not asked for and for x when dgamma is not asked for (the kernel skips both).
        unsafe { l.launch(grid(c as u32, 1)) }
            .map(|_| ())
            .map_err(cerr("batchnorm_backward_params"))
    }
}

fn pool_c(d: &PoolDims, oh: usize, ow: usize) -> Result<PoolDimsC> {
    Ok(PoolDimsC {
        h: int("h", d.h)?,
        w: int("w", d.w)?,
        kh: int("kh", d.kernel.0)?,
        kw: int("kw", d.kernel.1)?,
        sh: int("sh", d.stride.0)?,
        sw: int("sw", d.stride.1)?,
        ph: int("ph", d.padding.0)?,
        pw: int("pw", d.padding.1)?,
        oh: int("oh", oh)?,
        ow: int("ow", ow)?,
    })
}
