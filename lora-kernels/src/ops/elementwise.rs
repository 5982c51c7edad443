//! Elementwise ops: residual add, GELU (tanh approximation, as GPT-2's `gelu_new`), SiLU and
//! SwiGLU (`silu(gate) * up`, Llama's MLP).

use crate::error::{check_len, Result};
use crate::par::for_row_blocks;

/// Chunk length for parallel elementwise loops (treated as rows of one wide matrix).
const CHUNK: usize = 4096;

/// Runs `f(i, &mut out[i])` for every element, in parallel chunks when large.
fn for_each_elem(out: &mut [f32], f: impl Fn(usize, &mut f32) + Sync + Send) {
    let n = out.len();
    let cols = CHUNK.min(n.max(1));
    // Treat `out` as rows of `cols`; the last partial chunk is handled on this thread.
    let full = n / cols * cols;
    let (head, tail) = out.split_at_mut(full);
    for_row_blocks(head, cols, |row0, blk| {
        let base = row0 * cols;
        blk.iter_mut().enumerate().for_each(|(i, o)| f(base + i, o));
    });
    tail.iter_mut()
        .enumerate()
        .for_each(|(i, o)| f(full + i, o));
}

fn zip_map(
    op: &'static str,
    out: &mut [f32],
    ins: &[(&'static str, &[f32])],
    f: impl Fn(usize) -> f32 + Sync + Send,
) -> Result<()> {
    for (name, x) in ins {
        check_len(op, name, x.len(), &[out.len()])?;
    }
    for_each_elem(out, |i, o| *o = f(i));
    Ok(())
}

/// `out = a + b`.
pub fn add_forward(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    zip_map("add_forward", out, &[("a", a), ("b", b)], |i| a[i] + b[i])
}

/// `dst += src` (the backward of `add` for each operand, and gradient fan-in in general).
pub fn accumulate(dst: &mut [f32], src: &[f32]) -> Result<()> {
    check_len("accumulate", "src", src.len(), &[dst.len()])?;
    for_each_elem(dst, |i, d| *d += src[i]);
    Ok(())
}

const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_C: f32 = 0.044_715;

#[inline]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_K * (x + GELU_C * x * x * x)).tanh())
}

#[inline]
fn gelu_grad(x: f32) -> f32 {
    let inner = GELU_K * (x + GELU_C * x * x * x);
    let t = inner.tanh();
    let sech2 = 1.0 - t * t;
    0.5 * (1.0 + t) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = gelu_tanh(x)`.
pub fn gelu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    zip_map("gelu_forward", out, &[("x", x)], |i| gelu(x[i]))
}

/// `dx += dout * gelu_tanh'(x)`.
pub fn gelu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("gelu_backward", "x", x.len(), &[dx.len()])?;
    check_len("gelu_backward", "dout", dout.len(), &[dx.len()])?;
    for_each_elem(dx, |i, d| *d += dout[i] * gelu_grad(x[i]));
    Ok(())
}

/// `out = x * sigmoid(x)`.
pub fn silu_forward(out: &mut [f32], x: &[f32]) -> Result<()> {
    zip_map("silu_forward", out, &[("x", x)], |i| x[i] * sigmoid(x[i]))
}

#[inline]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `dx += dout * silu'(x)`.
pub fn silu_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len("silu_backward", "x", x.len(), &[dx.len()])?;
    check_len("silu_backward", "dout", dout.len(), &[dx.len()])?;
    for_each_elem(dx, |i, d| *d += dout[i] * silu_grad(x[i]));
    Ok(())
}

/// `out = silu(gate) * up` (all the same length).
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    zip_map("swiglu_forward", out, &[("gate", gate), ("up", up)], |i| {
        gate[i] * sigmoid(gate[i]) * up[i]
    })
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
        for_each_elem(dg, |i, d| *d += dout[i] * up[i] * silu_grad(gate[i]));
    }
    if let Some(du) = dup {
        check_len(OP, "dup", du.len(), &[dout.len()])?;
        for_each_elem(du, |i, d| *d += dout[i] * gate[i] * sigmoid(gate[i]));
    }
    Ok(())
}

/// `f64` oracles.
pub mod reference {
    /// GELU, tanh approximation.
    pub fn gelu(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
    }
    /// Its derivative.
    pub fn gelu_grad(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let t = (k * (x + 0.044715 * x.powi(3))).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
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
