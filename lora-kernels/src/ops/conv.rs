//! 2-D convolution as PyTorch's `conv2d` computes it (NCHW, cross-correlation): stride, zero
//! padding, dilation and groups. Forward and backward run im2col + GEMM per image and group:
//! `cols (K, P)` holds, for every output pixel `p`, the `K = C/g * KH * KW` input values its
//! kernel window covers (zeros outside the image), so `y_g (O/g, P) = W_g (O/g, K) cols` and
//! backward is two more products, `dcols = W_g^T dy_g` (scattered back into `dx`, col2im) and
//! `dW_g += dy_g cols^T`. Large 3x3 stride-1 convolutions (the forward and `dx`) take the
//! Winograd route instead ([`super::winograd`]), four times fewer multiplications.
//!
//! Legend: N = batch, C = input channels, O = output channels, g = groups, (H, W) input size,
//! (KH, KW) kernel, (OH, OW) output size, P = OH * OW, K = C/g * KH * KW. Layouts: `x (N, C, H,
//! W)`, `w (O, C/g, KH, KW)`, `bias (O)`, `y (N, O, OH, OW)`, all row-major. Backward
//! accumulates (`+=`) into the gradients it is given and computes only those.

use super::winograd;
use crate::error::{check_len, invalid, Result};
use crate::gemm::{matmul, Par, Trans};
use rayon::prelude::*;

/// The shape and hyper-parameters of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    /// N.
    pub batch: usize,
    /// C.
    pub in_ch: usize,
    /// H.
    pub h: usize,
    /// W.
    pub w: usize,
    /// O.
    pub out_ch: usize,
    /// KH.
    pub kh: usize,
    /// KW.
    pub kw: usize,
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) zero padding on each side.
    pub padding: (usize, usize),
    /// (vertical, horizontal) dilation.
    pub dilation: (usize, usize),
    /// g: input and output channels split into `g` independent groups.
    pub groups: usize,
}

/// The hyper-parameters of a convolution layer (PyTorch's `nn.Conv2d` arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) zero padding on each side.
    pub padding: (usize, usize),
    /// (vertical, horizontal) dilation.
    pub dilation: (usize, usize),
    /// Groups.
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dDims {
    /// The dims of a convolution of `x (N, C, H, W)` by `w (O, C/g, KH, KW)` with `p`, checked
    /// (see [`Conv2dDims::check`]); the shapes must have four dimensions.
    pub fn new(x: [usize; 4], w: [usize; 4], p: Conv2dParams) -> Result<Self> {
        let d = Self {
            batch: x[0],
            in_ch: x[1],
            h: x[2],
            w: x[3],
            out_ch: w[0],
            kh: w[2],
            kw: w[3],
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            groups: p.groups,
        };
        d.check()?;
        if w[1] * p.groups != x[1] {
            return Err(bad(
                "w",
                format!(
                    "{} input channels per group ({} groups) do not match the input's {}",
                    w[1], p.groups, x[1]
                ),
            ));
        }
        Ok(d)
    }
    /// `[N, O, OH, OW]`.
    pub fn out_shape(&self) -> [usize; 4] {
        let (oh, ow) = self.out();
        [self.batch, self.out_ch, oh, ow]
    }
}

fn bad(what: &'static str, why: String) -> crate::KernelError {
    invalid("conv2d", what, why)
}

/// One output extent: `(size + 2 pad - dil (k - 1) - 1) / stride + 1`, or an error when the
/// dilated kernel does not fit the padded input.
fn out_extent(
    what: &'static str,
    size: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
) -> Result<usize> {
    let span = d
        .checked_mul(k - 1)
        .and_then(|v| v.checked_add(1))
        .ok_or_else(|| bad(what, "kernel extent overflows".into()))?;
    let padded = p
        .checked_mul(2)
        .and_then(|pp| size.checked_add(pp))
        .ok_or_else(|| bad(what, "padded size overflows".into()))?;
    if padded < span {
        return Err(bad(
            what,
            format!("the dilated kernel ({span}) is larger than the padded input ({padded})"),
        ));
    }
    Ok((padded - span) / s + 1)
}

impl Conv2dDims {
    /// Checks the hyper-parameters (no zero sizes, groups dividing both channel counts, the
    /// kernel fitting the padded input, element counts that fit in memory) and returns
    /// `(OH, OW)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        let d = self;
        for (what, v) in [
            ("batch", d.batch),
            ("in_ch", d.in_ch),
            ("h", d.h),
            ("w", d.w),
            ("out_ch", d.out_ch),
            ("kh", d.kh),
            ("kw", d.kw),
            ("stride", d.stride.0.min(d.stride.1)),
            ("dilation", d.dilation.0.min(d.dilation.1)),
            ("groups", d.groups),
        ] {
            if v == 0 {
                return Err(bad(what, "must be at least 1".into()));
            }
        }
        if !d.in_ch.is_multiple_of(d.groups) || !d.out_ch.is_multiple_of(d.groups) {
            return Err(bad(
                "groups",
                format!(
                    "{} groups do not divide {} input and {} output channels",
                    d.groups, d.in_ch, d.out_ch
                ),
            ));
        }
        let oh = out_extent("kh", d.h, d.kh, d.stride.0, d.padding.0, d.dilation.0)?;
        let ow = out_extent("kw", d.w, d.kw, d.stride.1, d.padding.1, d.dilation.1)?;
        let counts = [
            [d.batch, d.in_ch, d.h, d.w],
            [d.batch, d.out_ch, oh, ow],
            [d.out_ch, d.in_ch / d.groups, d.kh, d.kw],
            [d.in_ch / d.groups, d.kh * d.kw, oh, ow],
        ];
        for c in counts {
            let n = c.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
            if !matches!(n, Some(n) if n <= isize::MAX as usize / 4) {
                return Err(bad("dims", format!("{c:?} elements do not fit in memory")));
            }
        }
        Ok((oh, ow))
    }

    /// `(OH, OW)` of checked dims.
    fn out(&self) -> (usize, usize) {
        self.check().unwrap_or((0, 0))
    }
    /// K = C/g * KH * KW.
    fn k(&self) -> usize {
        self.in_ch / self.groups * self.kh * self.kw
    }
    /// Elements of `x`.
    pub fn x_len(&self) -> usize {
        self.batch * self.in_ch * self.h * self.w
    }
    /// Elements of `w`.
    pub fn w_len(&self) -> usize {
        self.out_ch * self.k()
    }
    /// Elements of `y`.
    pub fn y_len(&self) -> usize {
        let (oh, ow) = self.out();
        self.batch * self.out_ch * oh * ow
    }
}

/// The input row and column a kernel tap reads for an output pixel, `None` in the padding.
#[inline]
fn tap(o: usize, k: usize, s: usize, p: usize, d: usize, size: usize) -> Option<usize> {
    let pos = (o * s + k * d).checked_sub(p)?;
    (pos < size).then_some(pos)
}

/// The output columns `lo..hi` whose kernel column `k` reads inside the input row (the others
/// read the padding), and the input column `x0` that output column `lo` reads (output `lo + i`
/// reads `x0 + i * s`): [`tap`] over a whole row, without a branch per pixel. `lo == hi` when
/// no column reads inside.
#[inline]
fn tap_range(
    out: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    size: usize,
) -> (usize, usize, usize) {
    let off = k * d; // output o reads o * s + off - p
                     // First o with o * s + off >= p, and first o with o * s + off >= p + size.
    let lo = p.saturating_sub(off).div_ceil(s).min(out);
    let hi = (p + size).saturating_sub(off).div_ceil(s).min(out).max(lo);
    (lo, hi, (lo * s + off).saturating_sub(p))
}

/// im2col of one image's group `grp`: `cols (K, P)` from `x_img (C, H, W)`.
fn im2col(cols: &mut [f32], x_img: &[f32], grp: usize, d: &Conv2dDims) {
    let (oh, ow) = d.out();
    let cg = d.in_ch / d.groups;
    let p = oh * ow;
    for c in 0..cg {
        let plane = &x_img[(grp * cg + c) * d.h * d.w..][..d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &mut cols[((c * d.kh + i) * d.kw + j) * p..][..p];
                for oy in 0..oh {
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    let Some(y) = tap(oy, i, d.stride.0, d.padding.0, d.dilation.0, d.h) else {
                        out.fill(0.0);
                        continue;
                    };
                    let src = &plane[y * d.w..(y + 1) * d.w];
                    let (lo, hi, x0) = tap_range(ow, j, d.stride.1, d.padding.1, d.dilation.1, d.w);
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if hi == lo {
                    } else if d.stride.1 == 1 {
                        out[lo..hi].copy_from_slice(&src[x0..x0 + (hi - lo)]);
                    } else {
                        for (k, v) in out[lo..hi].iter_mut().enumerate() {
                            *v = src[x0 + k * d.stride.1];
                        }
                    }
                }
            }
        }
    }
}

/// col2im of one image's group: `dx_img (C, H, W) += dcols (K, P)` scattered back, each input
/// element receiving its taps in (channel, kernel row, kernel column, output pixel) order.
fn col2im(dx_img: &mut [f32], dcols: &[f32], grp: usize, d: &Conv2dDims) {
    let (oh, ow) = d.out();
    let cg = d.in_ch / d.groups;
    let p = oh * ow;
    for c in 0..cg {
        let plane = &mut dx_img[(grp * cg + c) * d.h * d.w..][..d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &dcols[((c * d.kh + i) * d.kw + j) * p..][..p];
                for oy in 0..oh {
                    let Some(y) = tap(oy, i, d.stride.0, d.padding.0, d.dilation.0, d.h) else {
                        continue;
                    };
                    let dst = &mut plane[y * d.w..(y + 1) * d.w];
                    let (lo, hi, x0) = tap_range(ow, j, d.stride.1, d.padding.1, d.dilation.1, d.w);
                    let src = &row[oy * ow + lo..oy * ow + hi];
                    if hi == lo {
                    } else if d.stride.1 == 1 {
                        for (v, g) in dst[x0..x0 + (hi - lo)].iter_mut().zip(src) {
                            *v += g;
                        }
                    } else {
                        for (k, g) in src.iter().enumerate() {
                            dst[x0 + k * d.stride.1] += g;
                        }
                    }
                }
            }
        }
    }
}

/// At most this many partial sums of dW, each over a fixed range of images (see
/// [`conv2d_backward`]): two patch matrices built at once, as the forward's two workers do on
/// two cores; their products may still use every thread.
const DW_PARTS: usize = 2;

/// A 1x1 convolution with stride 1 and no padding: its im2col matrix of a group is the
/// group's input planes as they lie, so it is read in place instead of copied.
fn pointwise(d: &Conv2dDims) -> bool {
    d.kh == 1 && d.kw == 1 && d.stride == (1, 1) && d.padding == (0, 0)
}

/// Group `grp`'s `(K, P)` im2col matrix of one image: in place for a [`pointwise`]
/// convolution, else built in `cols`.
fn group_cols<'a>(
    cols: &'a mut Vec<f32>,
    x_img: &'a [f32],
    grp: usize,
    d: &Conv2dDims,
) -> &'a [f32] {
    let (oh, ow) = d.out();
    let kp = d.k() * oh * ow;
    if pointwise(d) {
        return &x_img[grp * kp..(grp + 1) * kp];
    }
    cols.resize(kp, 0.0);
    im2col(cols, x_img, grp, d);
    cols
}

/// Images run in parallel (each with single-threaded products) when there are enough of them
/// to occupy the pool; otherwise one at a time with threaded products.
fn per_image_par(d: &Conv2dDims) -> bool {
    d.batch > 1 && d.batch >= rayon::current_num_threads()
}

/// How a convolution's forward and `dx` are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Winograd where [`winograd::worth_it`] says it gains, im2col + GEMM otherwise: what
    /// [`conv2d_forward`] and [`conv2d_backward`] use.
    Auto,
    /// im2col + GEMM always.
    Im2col,
    /// Winograd F(4x4, 3x3); an error for a convolution it does not handle
    /// ([`winograd::supported`]).
    Winograd,
}

impl ConvAlgo {
    /// Whether `d` takes the Winograd route under this choice.
    fn winograd(self, d: &Conv2dDims) -> Result<bool> {
        match self {
            ConvAlgo::Auto => Ok(winograd::worth_it(d)),
            ConvAlgo::Im2col => Ok(false),
            ConvAlgo::Winograd if winograd::supported(d) => Ok(true),
            ConvAlgo::Winograd => Err(bad(
                "dims",
                format!(
                    "Winograd handles 3x3 kernels with stride 1, no dilation, one group and \
                     padding up to 2, not {}x{} stride {:?} dilation {:?} groups {} padding {:?}",
                    d.kh, d.kw, d.stride, d.dilation, d.groups, d.padding
                ),
            )),
        }
    }
}

/// `y = conv2d(x, w) + bias`.
pub fn conv2d_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    d: Conv2dDims,
) -> Result<()> {
    conv2d_forward_by(ConvAlgo::Auto, y, x, w, bias, d)
}

/// [`conv2d_forward`] by the algorithm `algo` (for benchmarks and tests).
pub fn conv2d_forward_by(
    algo: ConvAlgo,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    d: Conv2dDims,
) -> Result<()> {
    const OP: &str = "conv2d_forward";
    let (oh, ow) = d.check()?;
    check_len(OP, "x", x.len(), &[d.batch, d.in_ch, d.h, d.w])?;
    check_len(OP, "w", w.len(), &[d.out_ch, d.k()])?;
    check_len(OP, "y", y.len(), &[d.batch, d.out_ch, oh, ow])?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), &[d.out_ch])?;
    }
    if algo.winograd(&d)? {
        return winograd::conv3x3(
            y,
            false,
            x,
            winograd::Kernels::Forward(w),
            bias,
            (d.batch, d.in_ch, d.h, d.w),
            d.out_ch,
            d.padding,
        );
    }
    forward_images(y, None, x, w, bias, d)
}

/// `y = conv2d(x, w) + bias` and `h = conv2d(x, a)` from one im2col per image: a conv LoRA's
/// base convolution and its `lora_A` (same kernel, stride and padding; `groups == 1`), whose
/// products read the same input patches. `a` is `(R, C, KH, KW)`, `h` `(N, R, OH, OW)`. The
/// values are those of two [`conv2d_forward`] calls (the same products on the same patches).
pub fn conv2d_pair_forward(
    y: &mut [f32],
    h: &mut [f32],
    x: &[f32],
    w: &[f32],
    a: &[f32],
    bias: Option<&[f32]>,
    d: Conv2dDims,
) -> Result<()> {
    const OP: &str = "conv2d_pair_forward";
    let (oh, ow) = d.check()?;
    if d.groups != 1 {
        return Err(bad(
            "groups",
            format!("{}: the pair shares im2col only for groups = 1", d.groups),
        ));
    }
    check_len(OP, "x", x.len(), &[d.batch, d.in_ch, d.h, d.w])?;
    check_len(OP, "w", w.len(), &[d.out_ch, d.k()])?;
    check_len(OP, "y", y.len(), &[d.batch, d.out_ch, oh, ow])?;
    let r = a.len() / d.k().max(1);
    if r == 0 {
        return Err(bad("a", "lora_A has no rows (rank 0)".into()));
    }
    check_len(OP, "a", a.len(), &[r, d.k()])?;
    check_len(OP, "h", h.len(), &[d.batch, r, oh, ow])?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), &[d.out_ch])?;
    }
    forward_images(y, Some((h, a)), x, w, bias, d)
}

/// The image loop of [`conv2d_forward`] (and, with `second = (h, a)`, of
/// [`conv2d_pair_forward`]: `h`'s image from the same patches, groups == 1).
fn forward_images(
    y: &mut [f32],
    second: Option<(&mut [f32], &[f32])>,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    d: Conv2dDims,
) -> Result<()> {
    let (oh, ow) = d.out();
    let (p, k, og) = (oh * ow, d.k(), d.out_ch / d.groups);
    let (h_all, a) = match second {
        Some((h, a)) => (Some(h), Some(a)),
        None => (None, None),
    };
    let r = a.map_or(0, |a| a.len() / k.max(1));
    // Scratch (the patch matrix) is reused across the images a worker runs: a fresh 29 MB
    // buffer per image cost its page faults every time.
    type Scratch = Vec<f32>;
    let image = |buf: &mut Scratch,
                 y_img: &mut [f32],
                 mut h_img: Option<&mut [f32]>,
                 x_img: &[f32],
                 par: Par| {
        for grp in 0..d.groups {
            let cols = group_cols(buf, x_img, grp, &d);
            let yg = &mut y_img[grp * og * p..(grp + 1) * og * p];
            let wg = &w[grp * og * k..(grp + 1) * og * k];
            matmul(
                yg,
                wg,
                Trans::No,
                cols,
                Trans::No,
                (og, p, k),
                1.0,
                false,
                par,
            )?;
            // The pair (groups == 1): A's product on the same patches. (Stacking A under W
            // in one product measured slower in the whole step: 0.52 vs 0.49 s.)
            if let (Some(h_img), Some(a)) = (h_img.as_deref_mut(), a) {
                matmul(
                    h_img,
                    a,
                    Trans::No,
                    cols,
                    Trans::No,
                    (r, p, k),
                    1.0,
                    false,
                    par,
                )?;
            }
        }
        if let Some(b) = bias {
            for (plane, &bo) in y_img.chunks_exact_mut(p).zip(b) {
                plane.iter_mut().for_each(|v| *v += bo);
            }
        }
        Ok::<(), crate::error::KernelError>(())
    };
    let x_img = d.in_ch * d.h * d.w;
    let h_imgs: Vec<Option<&mut [f32]>> = match h_all {
        Some(h) => h.chunks_mut((r * p).max(1)).map(Some).collect(),
        None => (0..d.batch).map(|_| None).collect(),
    };
    let work: Vec<_> = y
        .chunks_mut(d.out_ch * p)
        .zip(h_imgs)
        .zip(x.chunks(x_img))
        .collect();
    if per_image_par(&d) {
        // One run of images per worker (rayon calls `init` once per job it splits off).
        let per = d.batch.div_ceil(rayon::current_num_threads());
        work.into_par_iter()
            .with_min_len(per)
            .try_for_each_init(Scratch::default, |s, ((y, h), x)| {
                image(s, y, h, x, Par::Single)
            })
    } else {
        let mut s = Scratch::default();
        work.into_iter()
            .try_for_each(|((y, h), x)| image(&mut s, y, h, x, Par::Auto))
    }
}

/// The gradients a convolution's backward accumulates into (`None`: not computed).
#[derive(Default)]
pub struct Conv2dGrads<'a> {
    /// `(N, C, H, W)`.
    pub dx: Option<&'a mut [f32]>,
    /// `(O, C/g, KH, KW)`.
    pub dw: Option<&'a mut [f32]>,
    /// `(O)`.
    pub dbias: Option<&'a mut [f32]>,
}

/// Backward of [`conv2d_forward`]: `dx += col2im(W^T dy)`, `dW += sum_n dy cols^T` (over at
/// most [`DW_PARTS`] fixed ranges of images, each in order: deterministic), `dbias += sum over images and pixels of dy`. `x` is read for `dW` only
/// (pass it empty otherwise), `w` for `dx` only.
pub fn conv2d_backward(
    g: Conv2dGrads,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    d: Conv2dDims,
) -> Result<()> {
    conv2d_backward_by(ConvAlgo::Auto, g, dy, x, w, d)
}

/// [`conv2d_backward`] with `dx` by the algorithm `algo` (`dW` is always by im2col; for
/// benchmarks and tests).
pub fn conv2d_backward_by(
    algo: ConvAlgo,
    g: Conv2dGrads,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    d: Conv2dDims,
) -> Result<()> {
    const OP: &str = "conv2d_backward";
    let (oh, ow) = d.check()?;
    let use_winograd = algo.winograd(&d)?;
    let (p, k, og) = (oh * ow, d.k(), d.out_ch / d.groups);
    check_len(OP, "dy", dy.len(), &[d.batch, d.out_ch, oh, ow])?;
    let Conv2dGrads { dx, dw, dbias } = g;
    if let Some(db) = dbias {
        check_len(OP, "dbias", db.len(), &[d.out_ch])?;
        for img in dy.chunks_exact(d.out_ch * p) {
            for (acc, plane) in db.iter_mut().zip(img.chunks_exact(p)) {
                *acc += plane.iter().sum::<f32>();
            }
        }
    }
    let x_img = d.in_ch * d.h * d.w;
    if let Some(dw) = dw {
        check_len(OP, "x", x.len(), &[d.batch, d.in_ch, d.h, d.w])?;
        check_len(OP, "dw", dw.len(), &[d.out_ch, k])?;
        // Images in up to DW_PARTS fixed ranges (by batch size, not by thread count, so the
        // sums are the same on any pool), each summed in order into its own partial, the
        // partials then added to dW in range order: the patch matrices of different images are
        // built and read in parallel, and at most DW_PARTS of them exist at once (each is
        // K x P floats).
        let parts = d.batch.clamp(1, DW_PARTS);
        let range = |c: usize| c * d.batch / parts..(c + 1) * d.batch / parts;
        let accumulate_images = |acc: &mut [f32], images: std::ops::Range<usize>, par: Par| {
            let mut buf = Vec::new();
            for n in images {
                let dy_img = &dy[n * d.out_ch * p..(n + 1) * d.out_ch * p];
                let x_img = &x[n * x_img..(n + 1) * x_img];
                for grp in 0..d.groups {
                    let cols = group_cols(&mut buf, x_img, grp, &d);
                    let dyg = &dy_img[grp * og * p..(grp + 1) * og * p];
                    let dwg = &mut acc[grp * og * k..(grp + 1) * og * k];
                    matmul(
                        dwg,
                        dyg,
                        Trans::No,
                        cols,
                        Trans::Yes,
                        (og, k, p),
                        1.0,
                        true,
                        par,
                    )?;
                }
            }
            Ok::<(), crate::error::KernelError>(())
        };
        if parts == 1 {
            accumulate_images(dw, range(0), Par::Auto)?;
        } else {
            let partials: Vec<Vec<f32>> = (0..parts)
                .into_par_iter()
                .map(|c| {
                    let mut acc = vec![0.0f32; dw.len()];
                    accumulate_images(&mut acc, range(c), Par::Auto).map(|_| acc)
                })
                .collect::<Result<_>>()?;
            for part in &partials {
                dw.iter_mut().zip(part).for_each(|(d, v)| *d += v);
            }
        }
    }
    if let Some(dx) = dx {
        check_len(OP, "w", w.len(), &[d.out_ch, k])?;
        check_len(OP, "dx", dx.len(), &[d.batch, d.in_ch, d.h, d.w])?;
        if use_winograd {
            // dx is the 3x3 convolution of dy by the flipped, channel-swapped kernel.
            return winograd::conv3x3(
                dx,
                true,
                dy,
                winograd::Kernels::Transposed(w),
                None,
                (d.batch, d.out_ch, oh, ow),
                d.in_ch,
                (2 - d.padding.0, 2 - d.padding.1),
            );
        }
        let image = |(dx_img, dy_img): (&mut [f32], &[f32]), par: Par| -> Result<()> {
            let mut dcols = vec![0.0f32; k * p];
            for grp in 0..d.groups {
                let dyg = &dy_img[grp * og * p..(grp + 1) * og * p];
                let wg = &w[grp * og * k..(grp + 1) * og * k];
                matmul(
                    &mut dcols,
                    wg,
                    Trans::Yes,
                    dyg,
                    Trans::No,
                    (k, p, og),
                    1.0,
                    false,
                    par,
                )?;
                col2im(dx_img, &dcols, grp, &d);
            }
            Ok(())
        };
        let pairs = dx.chunks_mut(x_img).zip(dy.chunks(d.out_ch * p));
        if per_image_par(&d) {
            let pairs: Vec<_> = pairs.collect();
            pairs
                .into_par_iter()
                .try_for_each(|pr| image(pr, Par::Single))?;
        } else {
            pairs.into_iter().try_for_each(|pr| image(pr, Par::Auto))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `tap_range` is `tap` over a whole row: the same columns read inside, the same positions.
    #[test]
    fn tap_range_agrees_with_tap() {
        for size in 1..9 {
            for out in 0..12 {
                for (k, s, p, d) in tap_params(4, 4, 5, 3) {
                    let (lo, hi, x0) = super::tap_range(out, k, s, p, d, size);
                    for o in 0..out {
                        let want = super::tap(o, k, s, p, d, size);
                        let got = (lo..hi).contains(&o).then(|| x0 + (o - lo) * s);
                        assert_eq!(got, want, "o {o} k {k} s {s} p {p} d {d} size {size}");
                    }
                }
            }
        }
    }

    fn tap_params(
        k: usize,
        s: usize,
        p: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..k).flat_map(move |k| {
            (1..=s).flat_map(move |s| (0..p).flat_map(move |p| (1..=d).map(move |d| (k, s, p, d))))
        })
    }
}

/// `f64` oracle: the convolution by its definition, and its gradients.
pub mod reference {
    use super::Conv2dDims;

    /// Calls `f(yi, xi, wi)` for every output element `yi` and kernel tap `wi` that reads an
    /// input element `xi` (taps in the padding read nothing).
    fn each_tap(d: &Conv2dDims, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = d.check().expect("valid dims");
        let (cg, og) = (d.in_ch / d.groups, d.out_ch / d.groups);
        for n in 0..d.batch {
            for o in 0..d.out_ch {
                let grp = o / og;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((n * d.out_ch + o) * oh + oy) * ow + ox;
                        for c in 0..cg {
                            for i in 0..d.kh {
                                for j in 0..d.kw {
                                    let y = (oy * d.stride.0 + i * d.dilation.0) as isize
                                        - d.padding.0 as isize;
                                    let x = (ox * d.stride.1 + j * d.dilation.1) as isize
                                        - d.padding.1 as isize;
                                    if y < 0 || x < 0 || y >= d.h as isize || x >= d.w as isize {
                                        continue;
                                    }
                                    let ci = grp * cg + c;
                                    let xi =
                                        ((n * d.in_ch + ci) * d.h + y as usize) * d.w + x as usize;
                                    let wi = ((o * cg + c) * d.kh + i) * d.kw + j;
                                    f(yi, xi, wi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `y = conv2d(x, w) + bias`.
    pub fn forward(x: &[f64], w: &[f64], bias: Option<&[f64]>, d: &Conv2dDims) -> Vec<f64> {
        let (oh, ow) = d.check().expect("valid dims");
        let p = oh * ow;
        let mut y = vec![0.0; d.batch * d.out_ch * p];
        if let Some(b) = bias {
            for (i, v) in y.iter_mut().enumerate() {
                *v = b[(i / p) % d.out_ch];
            }
        }
        each_tap(d, |yi, xi, wi| y[yi] += x[xi] * w[wi]);
        y
    }

    /// `(dx, dw, dbias)` of `sum(dy * y)`.
    pub fn backward(
        dy: &[f64],
        x: &[f64],
        w: &[f64],
        d: &Conv2dDims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = d.check().expect("valid dims");
        let p = oh * ow;
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        let mut db = vec![0.0; d.out_ch];
        for (i, g) in dy.iter().enumerate() {
            db[(i / p) % d.out_ch] += g;
        }
        each_tap(d, |yi, xi, wi| {
            dx[xi] += dy[yi] * w[wi];
            dw[wi] += dy[yi] * x[xi];
        });
        (dx, dw, db)
    }
}
