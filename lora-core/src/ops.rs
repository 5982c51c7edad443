//! Differentiable ops. Each checks shapes (typed errors naming the operand), runs the kernel,
//! and records on the tape what its backward (in `autograd.rs`) reads — and only that.
//!
//! Row-wise ops treat a tensor of shape `(..., C)` as `(rows, C)`.

use crate::autograd::{LoraSaved, Op, Tape};
use crate::dev_ops::{self, placement};
use crate::device::Device;
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use lora_kernels::lora_linear::{
    lora_linear_forward, BaseLinear, Dropout, LinearDims, LoraWeights, WeightLayout,
};
use lora_kernels::ops::{attention, cross_entropy, elementwise, embedding, norm, rope, slice};
use std::sync::{Arc, Mutex};

fn shape_err(
    op: &'static str,
    what: &'static str,
    t: &Tensor,
    expected: impl Into<String>,
) -> CoreError {
    CoreError::Shape {
        op,
        what,
        got: t.shape().to_vec(),
        expected: expected.into(),
    }
}

fn any_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.requires_grad())
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    match s.last_mut() {
        Some(l) => *l = last,
        None => s.push(last),
    }
    s
}

/// `a + b` (same shapes).
pub fn add(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            "add",
            "b",
            b,
            format!("{:?} (the shape of a)", a.shape()),
        ));
    }
    if let Some(on) = placement("add", &[("a", a), ("b", b)])? {
        return dev_ops::add(tape, on, a, b);
    }
    let mut out = vec![0.0; a.numel()];
    elementwise::add_forward(&mut out, &a.data(), &b.data())?;
    let y = Tensor::from_op(out, a.shape(), any_grad(&[a, b]))?;
    tape.record(Op::Add, vec![a.clone(), b.clone()], &y);
    Ok(y)
}

/// The adapter operands of [`linear`].
#[derive(Clone, Copy, Debug)]
pub struct LoraArgs<'a> {
    /// A: `(R, K)`.
    pub a: &'a Tensor,
    /// B: `(M, R)`.
    pub b: &'a Tensor,
    /// s.
    pub scale: f32,
    /// Dropout probability on the adapter input (applied only on a training tape).
    pub dropout: f32,
}

/// The fused (LoRA) linear layer: `y = x W^T + b + s * drop(x) A^T B^T`, `x`: `(..., K)`.
/// `w` is `(M, K)` for [`WeightLayout::OutIn`] and `(K, M)` for [`WeightLayout::InOut`].
/// A frozen `w` gets no gradient and no weight-gradient GEMM.
pub fn linear(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    lora: Option<LoraArgs>,
) -> Result<Tensor> {
    const OP: &str = "linear";
    if w.shape().len() != 2 {
        return Err(shape_err(OP, "weight", w, "2 dimensions"));
    }
    let (k, m) = match layout {
        WeightLayout::OutIn => (w.shape()[1], w.shape()[0]),
        WeightLayout::InOut => (w.shape()[0], w.shape()[1]),
    };
    if x.last_dim() != k || x.shape().is_empty() {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!("(..., {k}) to match the weight {:?}", w.shape()),
        ));
    }
    if let Some(b) = bias {
        if b.shape() != [m] {
            return Err(shape_err(OP, "bias", b, format!("[{m}]")));
        }
    }
    let dims = LinearDims {
        tokens: x.rows(),
        inp: k,
        out: m,
    };
    if let Some(l) = lora {
        let r = l.a.shape().first().copied().unwrap_or(0);
        if l.a.shape() != [r, k] || r == 0 {
            return Err(shape_err(OP, "lora_a", l.a, format!("[rank, {k}]")));
        }
        if l.b.shape() != [m, r] {
            return Err(shape_err(OP, "lora_b", l.b, format!("[{m}, {r}]")));
        }
    }
    let mut operands = vec![("x", x), ("weight", w)];
    operands.extend(bias.map(|b| ("bias", b)));
    if let Some(l) = lora {
        operands.extend([("lora_a", l.a), ("lora_b", l.b)]);
    }
    if let Some(on) = placement(OP, &operands)? {
        let shape = with_last(x.shape(), m);
        return dev_ops::linear(tape, on, x, w, layout, bias, lora, dims, &shape);
    }
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(bias.cloned());
    let mut y = vec![0.0; dims.tokens * m];
    let xd = x.data();
    let wd = w.weight(); // 16-bit as stored when the weight is half-stored
    let bd = bias.map(|b| b.data());
    let base = BaseLinear {
        weight: wd.as_data(),
        layout,
        bias: bd.as_deref().map(|v| &v[..]),
    };
    let saved = match lora {
        None => {
            lora_linear_forward(&mut y, None, &xd, &base, None, dims)?;
            None
        }
        Some(l) => {
            let r = l.a.shape()[0];
            let dropout = (tape.is_training() && l.dropout > 0.0).then(|| Dropout {
                p: l.dropout,
                seed: tape.next_seed(),
            });
            let (ad, bd2) = (l.a.data(), l.b.data());
            let lw = LoraWeights {
                a: &ad,
                b: &bd2,
                rank: r,
                scale: l.scale,
                dropout,
            };
            let mut u = vec![0.0; dims.tokens * r];
            lora_linear_forward(&mut y, Some(&mut u), &xd, &base, Some(&lw), dims)?;
            inputs.push(l.a.clone());
            inputs.push(l.b.clone());
            Some(LoraSaved {
                rank: r,
                scale: l.scale,
                dropout,
                u,
            })
        }
    };
    drop((xd, wd, bd));
    let requires = inputs.iter().any(|t| t.requires_grad());
    let out = Tensor::from_op(y, &with_last(x.shape(), m), requires)?;
    let has_bias = bias.is_some();
    tape.record(
        Op::Linear {
            layout,
            has_bias,
            dims,
            lora: saved,
        },
        inputs,
        &out,
    );
    Ok(out)
}

fn unary(
    tape: &Tape,
    x: &Tensor,
    op: Op,
    f: fn(&mut [f32], &[f32]) -> lora_kernels::Result<()>,
    dev: lora_kernels::accel::Unary,
) -> Result<Tensor> {
    if let Some(on) = placement(op.name(), &[("x", x)])? {
        return dev_ops::unary(tape, on, x, dev);
    }
    let mut out = vec![0.0; x.numel()];
    f(&mut out, &x.data())?;
    let y = Tensor::from_op(out, x.shape(), x.requires_grad())?;
    tape.record(op, vec![x.clone()], &y);
    Ok(y)
}

/// GELU, tanh approximation (GPT-2's `gelu_new`).
pub fn gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let dev = lora_kernels::accel::Unary::Gelu;
    unary(tape, x, Op::Gelu, elementwise::gelu_forward, dev)
}

/// SiLU (`x * sigmoid(x)`).
pub fn silu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let dev = lora_kernels::accel::Unary::Silu;
    unary(tape, x, Op::Silu, elementwise::silu_forward, dev)
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(tape: &Tape, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(shape_err(
            "swiglu",
            "up",
            up,
            format!("{:?} (the shape of gate)", gate.shape()),
        ));
    }
    if let Some(on) = placement("swiglu", &[("gate", gate), ("up", up)])? {
        return dev_ops::swiglu(tape, on, gate, up);
    }
    let mut out = vec![0.0; gate.numel()];
    elementwise::swiglu_forward(&mut out, &gate.data(), &up.data())?;
    let y = Tensor::from_op(out, gate.shape(), any_grad(&[gate, up]))?;
    tape.record(Op::SwiGlu, vec![gate.clone(), up.clone()], &y);
    Ok(y)
}

fn check_vec(op: &'static str, what: &'static str, t: &Tensor, c: usize) -> Result<()> {
    if t.shape() != [c] {
        return Err(shape_err(op, what, t, format!("[{c}]")));
    }
    Ok(())
}

/// LayerNorm over the last dimension.
pub fn layer_norm(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let c = x.last_dim();
    check_vec("layer_norm", "gamma", gamma, c)?;
    if let Some(b) = beta {
        check_vec("layer_norm", "beta", b, c)?;
    }
    let mut operands = vec![("x", x), ("gamma", gamma)];
    operands.extend(beta.map(|b| ("beta", b)));
    if let Some(on) = placement("layer_norm", &operands)? {
        return dev_ops::layer_norm(tape, on, x, gamma, beta, eps);
    }
    let n = x.rows();
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let bd = beta.map(|b| b.data());
    norm::layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &x.data(),
        &gamma.data(),
        bd.as_deref().map(|v| &v[..]),
        c,
        eps,
    )?;
    drop(bd);
    let mut inputs = vec![x.clone(), gamma.clone()];
    inputs.extend(beta.cloned());
    let y = Tensor::from_op(out, x.shape(), inputs.iter().any(|t| t.requires_grad()))?;
    tape.record(Op::LayerNorm { mean, rstd }, inputs, &y);
    Ok(y)
}

/// RMSNorm over the last dimension.
pub fn rms_norm(tape: &Tape, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    let c = x.last_dim();
    check_vec("rms_norm", "gamma", gamma, c)?;
    if let Some(on) = placement("rms_norm", &[("x", x), ("gamma", gamma)])? {
        return dev_ops::rms_norm(tape, on, x, gamma, eps);
    }
    let n = x.rows();
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    norm::rmsnorm_forward(&mut out, &mut rstd, &x.data(), &gamma.data(), c, eps)?;
    let y = Tensor::from_op(out, x.shape(), any_grad(&[x, gamma]))?;
    tape.record(Op::RmsNorm { rstd }, vec![x.clone(), gamma.clone()], &y);
    Ok(y)
}

/// Row lookup: `table` `(V, C)`, `ids` of shape `shape` → `(shape..., C)`.
pub fn embedding(tape: &Tape, table: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    if table.shape().len() != 2 {
        return Err(shape_err("embedding", "table", table, "[vocab, channels]"));
    }
    if shape.iter().product::<usize>() != ids.len() {
        return Err(CoreError::DataLength {
            len: ids.len(),
            shape: shape.to_vec(),
            needed: shape.iter().product(),
        });
    }
    if let Some(on) = placement("embedding", &[("table", table)])? {
        return dev_ops::embedding(on, table, ids, shape);
    }
    let c = table.shape()[1];
    let mut out = vec![0.0; ids.len() * c];
    // A half-stored table (bf16 / f16 checkpoint) is read as stored, row by row.
    embedding::embedding_forward_stored(&mut out, table.weight().as_data(), ids, c)?;
    let mut s = shape.to_vec();
    s.push(c);
    let y = Tensor::from_op(out, &s, table.requires_grad())?;
    tape.record(Op::Embedding { ids: ids.to_vec() }, vec![table.clone()], &y);
    Ok(y)
}

/// Precomputed RoPE tables shared by all layers of a model.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// `(P, D/2)`.
    pub cos: Arc<Vec<f32>>,
    /// `(P, D/2)`.
    pub sin: Arc<Vec<f32>>,
    /// D.
    pub head_dim: usize,
    /// Copies on a device, made on first use there.
    device_copy: Arc<Mutex<Option<(Device, Tensor, Tensor)>>>,
}

impl RopeTables {
    /// Tables for positions `0..max_pos` from inverse frequencies `(D/2)`.
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let (c, s) = rope::rope_tables(inv_freq, max_pos);
        Self {
            cos: Arc::new(c),
            sin: Arc::new(s),
            head_dim: inv_freq.len() * 2,
            device_copy: Arc::default(),
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    /// The tables as tensors on `device` (uploaded once per device and shared by the clones).
    pub(crate) fn on_device(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let mut g = self.device_copy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((d, c, s)) = g.as_ref() {
            if *d == device {
                return Ok((c.clone(), s.clone()));
            }
        }
        let shape = [self.positions(), self.head_dim / 2];
        let c = Tensor::new_on(self.cos.to_vec(), &shape, false, device)?;
        let s = Tensor::new_on(self.sin.to_vec(), &shape, false, device)?;
        *g = Some((device, c.clone(), s.clone()));
        Ok((c, s))
    }
}

/// Rotary embedding on `x` `(N, H * D)` (or `(B, T, H * D)`) with one position per row.
pub fn rope(
    tape: &Tape,
    x: &Tensor,
    tables: &RopeTables,
    positions: &[u32],
    heads: usize,
) -> Result<Tensor> {
    let hd = tables.head_dim;
    if x.last_dim() != heads * hd || x.rows() != positions.len() {
        return Err(shape_err(
            "rope",
            "x",
            x,
            format!("({} rows, {heads} * {hd})", positions.len()),
        ));
    }
    if let Some(on) = placement("rope", &[("x", x)])? {
        return dev_ops::rope(tape, on, x, tables, positions, heads);
    }
    let mut out = vec![0.0; x.numel()];
    rope::rope_forward(
        &mut out,
        &x.data(),
        &tables.cos,
        &tables.sin,
        positions,
        heads,
        hd,
    )?;
    let y = Tensor::from_op(out, x.shape(), x.requires_grad())?;
    let op = Op::Rope {
        cos: tables.cos.clone(),
        sin: tables.sin.clone(),
        positions: positions.to_vec(),
        heads,
        head_dim: hd,
    };
    tape.record(op, vec![x.clone()], &y);
    Ok(y)
}

/// Causal GQA attention. `q`: `(B, T, Hq * D)`, `k`, `v`: `(B, T, Hkv * D)`; returns
/// `(B, T, Hq * D)`. Scale `1 / sqrt(D)`.
pub fn attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    const OP: &str = "attention";
    if q.shape().len() != 3 || q_heads == 0 || q.shape()[2] % q_heads != 0 {
        return Err(shape_err(
            OP,
            "q",
            q,
            format!("[batch, seq, {q_heads} * head_dim]"),
        ));
    }
    let (b, t) = (q.shape()[0], q.shape()[1]);
    let hd = q.shape()[2] / q_heads;
    for (what, x) in [("k", k), ("v", v)] {
        if x.shape() != [b, t, kv_heads * hd] {
            return Err(shape_err(
                OP,
                what,
                x,
                format!("[{b}, {t}, {}]", kv_heads * hd),
            ));
        }
    }
    let dims = attention::AttnDims {
        batch: b,
        seq: t,
        q_heads,
        kv_heads,
        head_dim: hd,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    if let Some(on) = placement(OP, &[("q", q), ("k", k), ("v", v)])? {
        return dev_ops::attention(tape, on, (q, k, v), dims, scale);
    }
    let mut out = vec![0.0; q.numel()];
    let mut lse = vec![0.0; dims.lse_len()];
    attention::attention_forward(
        &mut out,
        &mut lse,
        &q.data(),
        &k.data(),
        &v.data(),
        dims,
        scale,
    )?;
    let y = Tensor::from_op(out, q.shape(), any_grad(&[q, k, v]))?;
    tape.record(
        Op::Attention { lse, dims, scale },
        vec![q.clone(), k.clone(), v.clone()],
        &y,
    );
    Ok(y)
}

/// Columns `[start, start + len)` of the last dimension.
pub fn narrow(tape: &Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let cols = x.last_dim();
    if let Some(on) = placement("narrow", &[("x", x)])? {
        let shape = with_last(x.shape(), len);
        return dev_ops::narrow(tape, on, x, start, len, &shape);
    }
    let mut out = vec![0.0; x.rows() * len];
    slice::narrow_forward(&mut out, &x.data(), cols, start, len)?;
    let y = Tensor::from_op(out, &with_last(x.shape(), len), x.requires_grad())?;
    tape.record(Op::Narrow { start, len }, vec![x.clone()], &y);
    Ok(y)
}

/// Mean cross-entropy of `logits` `(..., V)` against `targets` (one per row; negative =
/// ignored). Returns a scalar tensor.
pub fn cross_entropy(tape: &Tape, logits: &Tensor, targets: &[i32]) -> Result<Tensor> {
    let v = logits.last_dim();
    if logits.rows() != targets.len() {
        return Err(shape_err(
            "cross_entropy",
            "logits",
            logits,
            format!("{} rows (one per target)", targets.len()),
        ));
    }
    if let Some(on) = placement("cross_entropy", &[("logits", logits)])? {
        return dev_ops::cross_entropy(tape, on, logits, targets);
    }
    let mut lse = vec![0.0; targets.len()];
    let (loss, count) = cross_entropy::cross_entropy_forward(&mut lse, &logits.data(), targets, v)?;
    let y = Tensor::from_op(vec![loss], &[1], logits.requires_grad())?;
    tape.record(
        Op::CrossEntropy {
            lse,
            targets: targets.to_vec(),
            count,
        },
        vec![logits.clone()],
        &y,
    );
    Ok(y)
}

/// Head weights widened per vocabulary block of a 16-bit head (4 MiB of f32 scratch).
const HEAD_WIDEN_ELEMS: usize = 1 << 20;

/// The output head fused with the cross-entropy: the mean loss of `logits = x W^T` (`x`
/// `(..., C)`, `w` `(V, C)`) against `targets` (one per row; negative = ignored), computed in
/// chunks of rows so the full `(N, V)` logits never exist. On a training tape the gradients for
/// `x` and (when trainable) `w` are computed chunk by chunk in the same pass and scaled by
/// `dloss` in backward; equal to `cross_entropy(linear(x, w))` up to rounding.
pub fn linear_cross_entropy(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    targets: &[i32],
) -> Result<Tensor> {
    const OP: &str = "linear_cross_entropy";
    let c = x.last_dim();
    if w.shape().len() != 2 || w.shape()[1] != c {
        return Err(shape_err(OP, "w", w, format!("(V, {c}) to match x")));
    }
    if x.rows() != targets.len() {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!("{} rows (one per target)", targets.len()),
        ));
    }
    if let Some(on) = placement(OP, &[("x", x), ("w", w)])? {
        return dev_ops::linear_cross_entropy(tape, on, x, w, targets);
    }
    let v = w.shape()[0];
    let n = targets.len();
    let training = tape.is_training();
    let mut dx = (training && x.requires_grad()).then(|| vec![0.0f32; n * c]);
    let mut dw = (training && w.requires_grad()).then(|| vec![0.0f32; v * c]);
    let (loss, _) = if w.is_half_stored() && dw.is_none() {
        // A frozen 16-bit head (bf16 / f16 checkpoint) is read as stored, one vocabulary block
        // at a time, never widened as a whole.
        let block = (HEAD_WIDEN_ELEMS / c.max(1)).max(1);
        let wv = w.weight();
        cross_entropy::linear_cross_entropy_stored(
            &x.data(),
            wv.as_data(),
            targets,
            c,
            v,
            dx.as_deref_mut(),
            block,
        )?
    } else {
        let chunk = (cross_entropy::HEAD_CHUNK_ELEMS / v.max(1)).max(16);
        cross_entropy::linear_cross_entropy(
            &x.data(),
            &w.data(),
            targets,
            c,
            v,
            dx.as_deref_mut(),
            dw.as_deref_mut(),
            chunk,
        )?
    };
    let y = Tensor::from_op(vec![loss], &[1], x.requires_grad() || w.requires_grad())?;
    tape.record(
        Op::LinearCrossEntropy { dx, dw },
        vec![x.clone(), w.clone()],
        &y,
    );
    Ok(y)
}

/// Activation checkpointing of a segment: `f(tape, x)` runs without recording its ops; the tape
/// keeps only `x`, and backward runs `f` again (same dropout masks) on a recording tape and
/// backpropagates through it. On a non-recording tape this is just `f(tape, x)`. Models use it
/// per transformer block when [`Tape::with_checkpointing`] is on.
pub fn checkpoint(
    tape: &Tape,
    x: &Tensor,
    f: impl Fn(&Tape, &Tensor) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    crate::autograd::checkpoint(tape, x, std::rc::Rc::new(f))
}
