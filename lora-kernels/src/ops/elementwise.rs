//! Elementwise ops: residual add, GELU (tanh approximation, as GPT-2's `gelu_new`; and exact,
//! with erf, as PyTorch's default `nn.GELU` that ViT uses), SiLU, ReLU and SwiGLU
//! (`silu(gate) * up`, Llama's MLP). The transcendental ones run on chunks with the
//! vectorizable `exp` / `sigmoid` of [`crate::fastmath`] (AVX2 where available).

use crate::error::{check_len, Result};
use crate::fastmath::{erfc, exp, exp_neg_square, sigmoid};
use crate::par::for_row_blocks;

/// Chunk length for parallel elementwise loops (treated as rows of one wide matrix).
const CHUNK: usize = 4096;

/// Runs `body(base, chunk)` over parallel chunks of `out` (`chunk` starts at element `base`),
/// compiled for AVX2+FMA where available so the chunk loops vectorize.
fn for_each_chunk(out: &mut [f32], body: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let n = out.len();
    let cols = CHUNK.min(n.max(1));
    let full = n / cols * cols;
    let (head, tail) = out.split_at_mut(full);
    for_row_blocks(head, cols, |row0, blk| {
        crate::fastmath::map(|| body(row0 * cols, blk))
    });
    if !tail.is_empty() {
        crate::fastmath::map(|| body(full, tail));
    }
}

/// An element function for [`map_unary`] / [`acc_unary`]: `y = f(x)`, or `dx += df(dout, x)`.
/// Associated functions marked `#[inline(always)]` are inlined into the AVX2+FMA-compiled loop;
/// closures and fn items are not reliably (a closure handed to [`for_each_chunk`] ran as
/// baseline 4-lane SSE code, a fn item's `Fn::call` shim as one call per element).
trait Elem {
    fn f(x: f32) -> f32;
}
trait DElem {
    fn df(g: f32, x: f32) -> f32;
}

macro_rules! elem {
    ($name:ident, |$x:ident| $e:expr) => {
        struct $name;
        impl Elem for $name {
            #[inline(always)]
            fn f($x: f32) -> f32 {
                $e
            }
        }
    };
    ($name:ident, |$g:ident, $x:ident| $e:expr) => {
        struct $name;
        impl DElem for $name {
            #[inline(always)]
            fn df($g: f32, $x: f32) -> f32 {
                $e
            }
        }
    };
}

elem!(Gelu, |x| gelu(x));
elem!(DGelu, |g, x| g * gelu_grad(x));
elem!(Sigmoid, |x| sigmoid(x));
elem!(DSigmoid, |g, x| g * sigmoid(x) * sigmoid(-x));
elem!(GeluErf, |x| gelu_erf(x));
elem!(DGeluErf, |g, x| g * gelu_erf_grad(x));
elem!(Silu, |x| x * sigmoid(x));
elem!(DSilu, |g, x| g * silu_grad(x));
elem!(QuickGelu, |x| x * sigmoid(QUICK * x));
elem!(DQuickGelu, |g, x| g * quick_gelu_grad(x));

/// `out[i] = E::f(x[i])` over parallel chunks, the loop compiled for AVX2+FMA where available.
fn map_unary<E: Elem>(out: &mut [f32], x: &[f32]) {
    #[inline(always)]
    fn body<E: Elem>(o: &mut [f32], x: &[f32]) {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = E::f(x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wide<E: Elem>(o: &mut [f32], x: &[f32]) {
        body::<E>(o, x)
    }
    for_each_chunk(out, |b, o| {
        let x = &x[b..b + o.len()];
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2_fma() {
            // SAFETY: the CPU was just checked to support avx2 and fma.
            return unsafe { wide::<E>(o, x) };
        }
        body::<E>(o, x)
    });
}

/// `dx[i] += E::df(dout[i], x[i])` over parallel chunks, compiled as [`map_unary`].
fn acc_unary<E: DElem>(dx: &mut [f32], dout: &[f32], x: &[f32]) {
    #[inline(always)]
    fn body<E: DElem>(d: &mut [f32], g: &[f32], x: &[f32]) {
        for ((d, &g), &x) in d.iter_mut().zip(g).zip(x) {
            *d += E::df(g, x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wide<E: DElem>(d: &mut [f32], g: &[f32], x: &[f32]) {
        body::<E>(d, g, x)
    }
    for_each_chunk(dx, |b, d| {
        let n = d.len();
        let (g, x) = (&dout[b..b + n], &x[b..b + n]);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2_fma() {
            // SAFETY: the CPU was just checked to support avx2 and fma.
            return unsafe { wide::<E>(d, g, x) };
        }
        body::<E>(d, g, x)
    });
}

/// `out = a + b`.
pub fn add_forward(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    check_len("add_forward", "a", a.len(), &[out.len()])?;
    check_len("add_forward", "b", b.len(), &[out.len()])?;
    for_each_chunk(out, |i0, o| {
        let n = o.len();
        for ((o, &a), &b) in o.iter_mut().zip(&a[i0..i0 + n]).zip(&b[i0..i0 + n]) {
            *o = a + b;
        }
    });
    Ok(())
}

/// `dst += src` (the backward of `add` for each operand, and gradient fan-in in general).
pub fn accumulate(dst: &mut [f32], src: &[f32]) -> Result<()> {
    check_len("accumulate", "src", src.len(), &[dst.len()])?;
    for_each_chunk(dst, |i0, d| {
        let n = d.len();
        for (d, &s) in d.iter_mut().zip(&src[i0..i0 + n]) {
            *d += s;
        }
    });
    Ok(())
}

const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_C: f32 = 0.044_715;

/// GELU's tanh approximation `0.5 x (1 + tanh z)`, `z = k (x + c x^3)`, evaluated as
/// `x * sigmoid(2z)` (the same function: `(1 + tanh z) / 2 = sigmoid(2z)`). The tanh form loses
/// `1 + tanh z` to cancellation once `tanh z` nears -1: at `x = -4` (GELU ~ -7e-5) it carried a
/// 0.2% error in f32; the sigmoid form keeps full relative precision on the whole range.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    // sigmoid is exactly 0 past its underflow, so gelu(-1e30) is -0, not -1e30 * 4e-39.
    x * sigmoid(2.0 * GELU_K * (x + GELU_C * x * x * x))
}

/// `d/dx [x s(2z)] = s + x 2 s (1 - s) z'` with `s = 1 / (1 + q)`, `q = e^{-2z}`; `1 - s = q s`
/// is taken from `q` (no `1 - s` cancellation), and `q s <= 1` so nothing overflows. Past
/// |z| = 43 (|x| > ~10) the derivative is 1 or 0 to f32 precision and is returned as such
/// (the formula's `x^2` factor would meet the clamped exponential there as inf * tiny).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let z = GELU_K * (x + GELU_C * x * x * x);
    let q = exp(-2.0 * z);
    let s = 1.0 / (1.0 + q);
    let g = s + 2.0 * x * (q * s) * s * GELU_K * (1.0 + 3.0 * GELU_C * x * x);
    if z > 43.0 {
        1.0
    } else if z < -43.0 {
        0.0
    } else {
        g
    }
}

/// `out = gelu_tanh(x)`.
pub fn gelu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("gelu_forward", "x", x.len(), &[out.len()])?;
    map_unary::<Gelu>(out, x);
    Ok(())
}

/// `dx += dout * gelu_tanh'(x)`.
pub fn gelu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("gelu_backward", "x", x.len(), &[dx.len()])?;
    check_len("gelu_backward", "dout", dout.len(), &[dx.len()])?;
    acc_unary::<DGelu>(dx, dout, x);
    Ok(())
}

/// `out = sigmoid(x) = 1 / (1 + e^-x)` (DETR's and YOLOS's box head).
pub fn sigmoid_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("sigmoid_forward", "x", x.len(), &[out.len()])?;
    map_unary::<Sigmoid>(out, x);
    Ok(())
}

/// `dx += dout * sigmoid(x) sigmoid(-x)` (the derivative without the `1 - s` cancellation).
pub fn sigmoid_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("sigmoid_backward", "x", x.len(), &[dx.len()])?;
    check_len("sigmoid_backward", "dout", dout.len(), &[dx.len()])?;
    acc_unary::<DSigmoid>(dx, dout, x);
    Ok(())
}

/// `out = max(x, 0)` (NaN stays NaN, as PyTorch's).
pub fn relu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("relu_forward", "x", x.len(), &[out.len()])?;
    for_each_chunk(out, |b, o| {
        let n = o.len();
        for (o, &x) in o.iter_mut().zip(&x[b..b + n]) {
            *o = if x <= 0.0 { 0.0 } else { x };
        }
    });
    Ok(())
}

/// `dx += dout * [x > 0]` (0 at `x = 0`, as PyTorch's).
pub fn relu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("relu_backward", "x", x.len(), &[dx.len()])?;
    check_len("relu_backward", "dout", dout.len(), &[dx.len()])?;
    for_each_chunk(dx, |b, d| {
        let n = d.len();
        for ((d, &g), &x) in d.iter_mut().zip(&dout[b..b + n]).zip(&x[b..b + n]) {
            if x > 0.0 {
                *d += g;
            }
        }
    });
    Ok(())
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU, `x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, evaluated as `0.5 x erfc(-x / sqrt 2)`:
/// the same function without the cancellation in `1 + erf` for negative `x`, with the
/// vectorizable [`erfc`] (relative error below 5e-7; libm's scalar `erfcf` took 5% of a
/// ViT-base step).
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * erfc(-x * FRAC_1_SQRT_2)
}

/// Its derivative `Phi(x) + x phi(x)`, `phi(x) = e^{-(x / sqrt 2)^2} / sqrt(2 pi)`.
#[inline(always)]
fn gelu_erf_grad(x: f32) -> f32 {
    let z = x * FRAC_1_SQRT_2;
    0.5 * erfc(-z) + x * INV_SQRT_2PI * exp_neg_square(z.abs())
}

/// `out = gelu_erf(x)` (PyTorch's `gelu(x, approximate="none")`).
pub fn gelu_erf_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("gelu_erf_forward", "x", x.len(), &[out.len()])?;
    map_unary::<GeluErf>(out, x);
    Ok(())
}

/// `dx += dout * gelu_erf'(x)`.
pub fn gelu_erf_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("gelu_erf_backward", "x", x.len(), &[dx.len()])?;
    check_len("gelu_erf_backward", "dout", dout.len(), &[dx.len()])?;
    acc_unary::<DGeluErf>(dx, dout, x);
    Ok(())
}

/// CLIP's `quick_gelu` slope.
const QUICK: f32 = 1.702;

/// `d/dx [x s(kx)] = s(kx) + k x s(kx) s(-kx)` (no `1 - s` cancellation).
#[inline(always)]
fn quick_gelu_grad(x: f32) -> f32 {
    let z = QUICK * x;
    let s = sigmoid(z);
    s + z * s * sigmoid(-z)
}

/// `out = x * sigmoid(1.702 x)` (CLIP's `quick_gelu`, the text encoder of Stable Diffusion).
pub fn quick_gelu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("quick_gelu_forward", "x", x.len(), &[out.len()])?;
    map_unary::<QuickGelu>(out, x);
    Ok(())
}

/// `dx += dout * quick_gelu'(x)`.
pub fn quick_gelu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("quick_gelu_backward", "x", x.len(), &[dx.len()])?;
    check_len("quick_gelu_backward", "dout", dout.len(), &[dx.len()])?;
    acc_unary::<DQuickGelu>(dx, dout, x);
    Ok(())
}

/// `out = x * sigmoid(x)`.
pub fn silu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("silu_forward", "x", x.len(), &[out.len()])?;
    map_unary::<Silu>(out, x);
    Ok(())
}

#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `dx += dout * silu'(x)`.
pub fn silu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("silu_backward", "x", x.len(), &[dx.len()])?;
    check_len("silu_backward", "dout", dout.len(), &[dx.len()])?;
    acc_unary::<DSilu>(dx, dout, x);
    Ok(())
}

/// `out = silu(gate) * up` (all the same length).
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    check_len("swiglu_forward", "gate", gate.len(), &[out.len()])?;
    check_len("swiglu_forward", "up", up.len(), &[out.len()])?;
    for_each_chunk(out, |b, o| {
        let n = o.len();
        for ((o, &g), &u) in o.iter_mut().zip(&gate[b..b + n]).zip(&up[b..b + n]) {
            *o = g * sigmoid(g) * u;
        }
    });
    Ok(())
}

/// `dgate += dout * up * silu'(gate)`, `dup += dout * silu(gate)`; either may be skipped.
pub fn swiglu_backward(
    dgate: Option<&mut [f32]>,
    dup: Option<&mut [f32]>,
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) -> Result<()> {
    const OP: &str = "swiglu_backward";
    check_len(OP, "gate", gate.len(), &[dout.len()])?;
    check_len(OP, "up", up.len(), &[dout.len()])?;
    if let Some(dg) = dgate {
        check_len(OP, "dgate", dg.len(), &[dout.len()])?;
        for_each_chunk(dg, |b, d| {
            let n = d.len();
            let it = d.iter_mut().zip(&dout[b..b + n]);
            for ((d, &o), (&g, &u)) in it.zip(gate[b..b + n].iter().zip(&up[b..b + n])) {
                *d += o * u * silu_grad(g);
            }
        });
    }
    if let Some(du) = dup {
        check_len(OP, "dup", du.len(), &[dout.len()])?;
        for_each_chunk(du, |b, d| {
            let n = d.len();
            for ((d, &o), &g) in d.iter_mut().zip(&dout[b..b + n]).zip(&gate[b..b + n]) {
                *d += o * g * sigmoid(g);
            }
        });
    }
    Ok(())
}

/// GEGLU (Stable Diffusion's feed-forward, diffusers' `GEGLU`): each row of `x` `(n, 2f)` is
/// `[hidden | gate]`; `out` `(n, f)` = `hidden * gelu_erf(gate)`.
pub fn geglu_forward(out: &mut [f32], x: &[f32], f: usize) -> Result<()> {
    check_len("geglu_forward", "x", x.len(), &[out.len() * 2])?;
    if f == 0 {
        return Ok(());
    }
    check_len("geglu_forward", "out", out.len() % f, &[0])?;
    for_row_blocks(out, f, |row0, blk| {
        crate::fastmath::map(|| {
            for (r, o) in blk.chunks_exact_mut(f).enumerate() {
                let xr = &x[(row0 + r) * 2 * f..(row0 + r + 1) * 2 * f];
                let (hid, gate) = xr.split_at(f);
                for ((o, &h), &g) in o.iter_mut().zip(hid).zip(gate) {
                    *o = h * gelu_erf(g);
                }
            }
        })
    });
    Ok(())
}

/// `dx` `(n, 2f)` += the gradient of [`geglu_forward`]: `dhidden = dout * gelu_erf(gate)`,
/// `dgate = dout * hidden * gelu_erf'(gate)`.
pub fn geglu_backward(dx: &mut [f32], dout: &[f32], x: &[f32], f: usize) -> Result<()> {
    check_len("geglu_backward", "x", x.len(), &[dx.len()])?;
    check_len("geglu_backward", "dout", dout.len() * 2, &[dx.len()])?;
    if f == 0 {
        return Ok(());
    }
    check_len("geglu_backward", "dout", dout.len() % f, &[0])?;
    for_row_blocks(dx, 2 * f, |row0, blk| {
        crate::fastmath::map(|| {
            for (r, d) in blk.chunks_exact_mut(2 * f).enumerate() {
                let i = row0 + r;
                let (hid, gate) = x[i * 2 * f..(i + 1) * 2 * f].split_at(f);
                let g = &dout[i * f..(i + 1) * f];
                let (dh, dg) = d.split_at_mut(f);
                for j in 0..f {
                    dh[j] += g[j] * gelu_erf(gate[j]);
                    dg[j] += g[j] * hid[j] * gelu_erf_grad(gate[j]);
                }
            }
        })
    });
    Ok(())
}

/// `out = x + bias` broadcast over planes: `x` is `bias.len()` planes of `inner` values
/// (`(B, C, H, W)` with a `(B, C)` bias: the UNet's time embedding added to each channel).
pub fn add_planes_forward(out: &mut [f32], x: &[f32], bias: &[f32], inner: usize) -> Result<()> {
    check_len("add_planes_forward", "x", x.len(), &[out.len()])?;
    check_len("add_planes_forward", "x", x.len(), &[bias.len(), inner])?;
    for_row_blocks(out, inner, |row0, blk| {
        for (r, o) in blk.chunks_exact_mut(inner).enumerate() {
            let p = row0 + r;
            let b = bias[p];
            for (o, &x) in o.iter_mut().zip(&x[p * inner..(p + 1) * inner]) {
                *o = x + b;
            }
        }
    });
    Ok(())
}

/// `dbias[p] += sum(dout[p * inner..(p + 1) * inner])` (the bias's gradient of
/// [`add_planes_forward`], summed in index order in f64).
pub fn add_planes_backward_bias(dbias: &mut [f32], dout: &[f32], inner: usize) -> Result<()> {
    check_len(
        "add_planes_backward_bias",
        "dout",
        dout.len(),
        &[dbias.len(), inner],
    )?;
    for (p, d) in dbias.iter_mut().enumerate() {
        let s: f64 = dout[p * inner..(p + 1) * inner]
            .iter()
            .map(|&v| v as f64)
            .sum();
        *d += s as f32;
    }
    Ok(())
}

/// `f64` oracles.
pub mod reference {
    /// GELU, tanh approximation, by its definition `0.5 x (1 + tanh z)`,
    /// `z = sqrt(2/pi) (x + 0.044715 x^3)`. Accurate in f64 until `tanh z` rounds to -1 (about
    /// x < -6); [`gelu_tail`] holds there.
    pub fn gelu(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
    }
    /// Its derivative, from the definition.
    pub fn gelu_grad(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let t = (k * (x + 0.044715 * x.powi(3))).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
    }
    /// The same function and derivative as [`gelu`] / [`gelu_grad`], as `x sigmoid(2z)`
    /// (`(1 + tanh z) / 2 = sigmoid(2z)`): no cancellation, so an oracle for the far negative
    /// tail too. Returns `(gelu, gelu')`.
    pub fn gelu_tail(x: f64) -> (f64, f64) {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let z = k * (x + 0.044715 * x.powi(3));
        let q = (-2.0 * z).exp();
        let s = 1.0 / (1.0 + q);
        (
            x * s,
            s + 2.0 * x * (q * s) * s * k * (1.0 + 3.0 * 0.044715 * x * x),
        )
    }
    /// `1 / (1 + e^-x)`.
    pub fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
    /// `x sigmoid(1.702 x)`.
    pub fn quick_gelu(x: f64) -> f64 {
        x * sigmoid(1.702 * x)
    }
    /// Its derivative `s + 1.702 x s (1 - s)`, `s = sigmoid(1.702 x)`.
    pub fn quick_gelu_grad(x: f64) -> f64 {
        let s = sigmoid(1.702 * x);
        s + 1.702 * x * s * (1.0 - s)
    }

    /// Exact GELU `0.5 x erfc(-x / sqrt 2)` (musl's f64 `erfc`).
    pub fn gelu_erf(x: f64) -> f64 {
        0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }
    /// Its derivative `Phi(x) + x phi(x)`.
    pub fn gelu_erf_grad(x: f64) -> f64 {
        let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2) + x * phi
    }
    /// SiLU.
    pub fn silu(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }
    /// Its derivative.
    pub fn silu_grad(x: f64) -> f64 {
        let s = 1.0 / (1.0 + (-x).exp());
        s * (1.0 + x * (1.0 - s))
    }
}
