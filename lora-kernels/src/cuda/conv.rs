//! `conv.cu`: 2-D convolution as im2col (kernel) + cuBLAS products + col2im (kernel), one image
//! at a time, the groups of an image in one strided-batched product (the CPU kernel's plan:
//! `ops/conv.rs`).

use super::*;
use crate::ops::conv::Conv2dDims;

/// `ConvDims` of conv.cu (the same field order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvDimsC {
    c: i32,
    h: i32,
    w: i32,
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    dh: i32,
    dw: i32,
    groups: i32,
    oh: i32,
    ow: i32,
}

// SAFETY: a plain `#[repr(C)]` struct of i32s, laid out as conv.cu's `ConvDims`.
unsafe impl cudarc::driver::DeviceRepr for ConvDimsC {}

/// The checked dims, their C twin, and `(P, K, O/g)`.
fn dims(d: &Conv2dDims) -> Result<(ConvDimsC, usize, usize, usize)> {
    let (oh, ow) = d.check()?;
    let fit = |v: usize| {
        i32::try_from(v).map_err(|_| {
            KernelError::Device(format!(
                "conv2d: {d:?} has a size past the kernels' i32 range"
            ))
        })
    };
    let c = ConvDimsC {
        c: fit(d.in_ch)?,
        h: fit(d.h)?,
        w: fit(d.w)?,
        kh: fit(d.kh)?,
        kw: fit(d.kw)?,
        sh: fit(d.stride.0)?,
        sw: fit(d.stride.1)?,
        ph: fit(d.padding.0)?,
        pw: fit(d.padding.1)?,
        dh: fit(d.dilation.0)?,
        dw: fit(d.dilation.1)?,
        groups: fit(d.groups)?,
        oh: fit(oh)?,
        ow: fit(ow)?,
    };
    let k = d.in_ch / d.groups * d.kh * d.kw;
    // The kernels index within a plane, a row of cols and a padded input row in i32; cuBLAS
    // takes its dimensions as i32.
    fit(k)?;
    fit(oh * ow)?;
    fit(d.h + 2 * d.padding.0)?;
    fit(d.w + 2 * d.padding.1)?;
    fit(d.out_ch)?;
    Ok((c, oh * ow, k, d.out_ch / d.groups))
}

fn check(what: &str, have: usize, want: usize) -> Result<()> {
    if have != want {
        return Err(KernelError::Device(format!(
            "conv2d: {what} holds {have} values, expected {want}"
        )));
    }
    Ok(())
}

impl CudaDevice {
    fn im2col(
        &self,
        cols: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        img: i32,
        c: ConvDimsC,
    ) -> Result<()> {
        let cfg = grid(blocks(cols.len(), THREADS as usize), 1);
        let mut l = self.stream.launch_builder(self.func("conv_im2col"));
        l.arg(cols).arg(x).arg(&img).arg(&c);
        // SAFETY: argument types and order match conv.cu; `cols` holds g * K * P values and `x`
        // the whole batch, both checked by the callers.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(cerr("conv_im2col"))
    }

    /// `y = conv2d(x, w) + bias` (see `ops::conv`).
    pub fn conv2d_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        d: Conv2dDims,
    ) -> Result<CudaSlice<f32>> {
        let (c, p, k, og) = dims(&d)?;
        check("x", x.len(), d.x_len())?;
        check("w", w.len(), d.w_len())?;
        if let Some(b) = bias {
            check("bias", b.len(), d.out_ch)?;
        }
        let mut y = self.output(d.y_len())?;
        let mut cols = self.output(d.groups * k * p)?;
        let ones = bias.map(|_| self.upload(&vec![1.0f32; p])).transpose()?;
        for img in 0..d.batch {
            self.im2col(&mut cols, x, img as i32, c)?;
            let mut yv = y.slice_mut(img * d.out_ch * p..(img + 1) * d.out_ch * p);
            // y_g (og, P) = W_g (og, K) cols_g (K, P), the groups in one batched product.
            let strides = (og * k, k * p, og * p);
            self.gemm_rm_batched(
                &mut yv,
                (w, false),
                (&cols, false),
                (og, k, p),
                false,
                d.groups,
                strides,
            )?;
            if let (Some(b), Some(ones)) = (bias, &ones) {
                // y (O, P) += bias (O, 1) ones (1, P).
                self.gemm_rm_batched(
                    &mut yv,
                    (b, false),
                    (ones, false),
                    (d.out_ch, 1, p),
                    true,
                    1,
                    (0, 0, 0),
                )?;
            }
        }
        Ok(y)
    }

    /// Backward of [`CudaDevice::conv2d_forward`] into the gradients given: `dx += col2im(W^T
    /// dy)`, `dW += dy cols^T` and `dbias += dy 1`, images in order (deterministic). `x` is read
    /// for `dW` only.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_backward(
        &self,
        dx: Option<&mut CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        x: Option<&CudaSlice<f32>>,
        w: &CudaSlice<f32>,
        d: Conv2dDims,
    ) -> Result<()> {
        let (c, p, k, og) = dims(&d)?;
        check("dy", dy.len(), d.y_len())?;
        let img_y = d.out_ch * p;
        if let Some(db) = dbias {
            check("dbias", db.len(), d.out_ch)?;
            let ones = self.upload(&vec![1.0f32; p])?;
            for img in 0..d.batch {
                let dyv = dy.slice(img * img_y..(img + 1) * img_y);
                // dbias (O, 1) += dy (O, P) ones (P, 1).
                self.gemm_rm_batched(
                    db,
                    (&dyv, false),
                    (&ones, false),
                    (d.out_ch, p, 1),
                    true,
                    1,
                    (0, 0, 0),
                )?;
            }
        }
        let mut cols = None;
        if let Some(dw) = dw {
            let x = x.ok_or_else(|| KernelError::Device("conv2d: dW needs x".into()))?;
            check("x", x.len(), d.x_len())?;
            check("dw", dw.len(), d.w_len())?;
            let cols = cols.insert(self.output(d.groups * k * p)?);
            for img in 0..d.batch {
                self.im2col(cols, x, img as i32, c)?;
                let dyv = dy.slice(img * img_y..(img + 1) * img_y);
                // dW_g (og, K) += dy_g (og, P) cols_g^T (P, K).
                let strides = (og * p, k * p, og * k);
                self.gemm_rm_batched(
                    dw,
                    (&dyv, false),
                    (&*cols, true),
                    (og, p, k),
                    true,
                    d.groups,
                    strides,
                )?;
            }
        }
        if let Some(dx) = dx {
            check("w", w.len(), d.w_len())?;
            check("dx", dx.len(), d.x_len())?;
            let dcols = match cols {
                Some(c) => c,
                None => self.output(d.groups * k * p)?,
            };
            let mut dcols = dcols;
            let cfg = grid(blocks(d.in_ch * d.h * d.w, THREADS as usize), 1);
            for img in 0..d.batch {
                let dyv = dy.slice(img * img_y..(img + 1) * img_y);
                // dcols_g (K, P) = W_g^T (K, og) dy_g (og, P).
                let strides = (og * k, og * p, k * p);
                self.gemm_rm_batched(
                    &mut dcols,
                    (w, true),
                    (&dyv, false),
                    (k, og, p),
                    false,
                    d.groups,
                    strides,
                )?;
                let img_i = img as i32;
                let mut l = self.stream.launch_builder(self.func("conv_col2im"));
                l.arg(&mut *dx).arg(&dcols).arg(&img_i).arg(&c);
                // SAFETY: argument types and order match conv.cu; dx holds the batch, dcols
                // g * K * P values, both checked above.
                unsafe { l.launch(cfg) }.map_err(cerr("conv_col2im"))?;
            }
        }
        Ok(())
    }
}
