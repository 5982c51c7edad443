//! The ops on device tensors: each public op in `ops.rs` checks its operands' shapes, then, when
//! they live on a device, calls its twin here, which runs the device backend
//! ([`lora_kernels::accel::Accel`]) and records a [`DevOp`] holding device buffers. The backward
//! of every `DevOp` is [`backward`], next to the forwards. Same graph, same dropout draws, same
//! saved state as the host ops: only where the values live differs.
//!
//! On a device only adapters (and norm gains) train: a trainable base weight, bias or embedding
//! table is a clear error, not a silent host fallback.

use crate::autograd::{Op, Tape};
use crate::error::{CoreError, Result};
use crate::ops::{LoraArgs, RopeTables};
use crate::tensor::{DevData, DevVals, Tensor};
use lora_kernels::accel::{Accel, DBuf, DevLinearGrads, DevLora, Unary};
use lora_kernels::lora_linear::{Dropout, LinearDims, WeightLayout};
use lora_kernels::ops::attention::AttnDims;
use std::sync::{Arc, RwLockReadGuard};

/// The device an op's operands share.
#[derive(Clone)]
pub(crate) struct On {
    pub accel: Arc<dyn Accel>,
    pub ordinal: usize,
}

impl On {
    fn device(&self) -> crate::Device {
        crate::Device::Cuda(self.ordinal)
    }
    fn tensor(&self, buf: DBuf, shape: &[usize], requires_grad: bool) -> Result<Tensor> {
        Tensor::from_dev(&self.accel, self.ordinal, buf, shape, requires_grad)
    }
    fn record(&self, tape: &Tape, op: DevOp, inputs: Vec<Tensor>, y: &Tensor) {
        let op = Op::Dev {
            op,
            accel: self.accel.clone(),
        };
        tape.record(op, inputs, y);
    }
}

/// `None` when every operand is on the host, the device when all are on the same one; an error
/// naming the first operand elsewhere otherwise.
pub(crate) fn placement(
    op: &'static str,
    operands: &[(&'static str, &Tensor)],
) -> Result<Option<On>> {
    let device = |on: &Option<On>| on.as_ref().map_or(crate::Device::Cpu, |o| o.device());
    let mut first: Option<(&str, Option<On>)> = None;
    for &(name, t) in operands {
        let here = t.dev().as_ref().map(|d| On {
            accel: d.accel.clone(),
            ordinal: d.ordinal,
        });
        match &first {
            None => first = Some((name, here)),
            Some((fname, f)) if device(f) != device(&here) => {
                let (fdev, dev) = (device(f), device(&here));
                return Err(CoreError::Device(format!(
                    "{op}: `{fname}` is on {fdev} but `{name}` is on {dev}; move the model and \
                     its inputs to one device (Tensor::to_device)"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(first.and_then(|(_, on)| on))
}

/// Saved state of the adapter part of a device linear op.
pub(crate) struct DevLoraSaved {
    rank: usize,
    scale: f32,
    dropout: Option<Dropout>,
    u: DBuf,
}

/// A recorded device op and what its backward reads. Input order as in the host `Op`.
pub(crate) enum DevOp {
    /// [a, b]
    Add,
    /// [x, w, (bias), (lora_a, lora_b)]
    Linear {
        layout: WeightLayout,
        has_bias: bool,
        dims: LinearDims,
        lora: Option<DevLoraSaved>,
    },
    /// [x]
    Unary(Unary),
    /// [gate, up]
    SwiGlu,
    /// [x, gamma, (beta)]
    LayerNorm { mean: DBuf, rstd: DBuf },
    /// [x, gamma]
    RmsNorm { rstd: DBuf },
    /// [x]
    Rope {
        cos: Tensor,
        sin: Tensor,
        positions: Vec<u32>,
        heads: usize,
        head_dim: usize,
    },
    /// [q, k, v]
    Attention {
        lse: DBuf,
        dims: AttnDims,
        scale: f32,
    },
    /// [x]
    Narrow { start: usize, len: usize },
    /// [logits]
    CrossEntropy {
        lse: DBuf,
        targets: Vec<i32>,
        count: usize,
    },
    /// [x, w]: the gradient of the mean loss for x, computed in forward.
    LinearCrossEntropy { dx: Option<DBuf> },
}

impl DevOp {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            DevOp::Add => "add",
            DevOp::Linear { .. } => "lora_linear",
            DevOp::Unary(Unary::Gelu) => "gelu",
            DevOp::Unary(Unary::Silu) => "silu",
            DevOp::SwiGlu => "swiglu",
            DevOp::LayerNorm { .. } => "layer_norm",
            DevOp::RmsNorm { .. } => "rms_norm",
            DevOp::Rope { .. } => "rope",
            DevOp::Attention { .. } => "attention",
            DevOp::Narrow { .. } => "narrow",
            DevOp::CrossEntropy { .. } => "cross_entropy",
            DevOp::LinearCrossEntropy { .. } => "linear_cross_entropy",
        }
    }

    /// As `Op::reads_input`; a linear op with an adapter keeps `x` (the device backward reads
    /// it for `dA` in the same pass).
    pub(crate) fn reads_input(&self, i: usize) -> bool {
        match self {
            DevOp::Add
            | DevOp::Narrow { .. }
            | DevOp::Rope { .. }
            | DevOp::LinearCrossEntropy { .. } => false,
            DevOp::Linear { lora, .. } => i != 0 || lora.is_some(),
            DevOp::Unary(_)
            | DevOp::SwiGlu
            | DevOp::LayerNorm { .. }
            | DevOp::RmsNorm { .. }
            | DevOp::Attention { .. }
            | DevOp::CrossEntropy { .. } => true,
        }
    }

    /// Device values the op saved for itself.
    pub(crate) fn saved_elems(&self) -> usize {
        match self {
            DevOp::Linear { lora, .. } => lora.as_ref().map_or(0, |l| l.u.len()),
            DevOp::LayerNorm { mean, rstd } => mean.len() + rstd.len(),
            DevOp::RmsNorm { rstd } => rstd.len(),
            DevOp::Rope { positions, .. } => positions.len(),
            DevOp::Attention { lse, .. } => lse.len(),
            DevOp::CrossEntropy { lse, targets, .. } => lse.len() + targets.len(),
            DevOp::LinearCrossEntropy { dx } => dx.as_ref().map_or(0, DBuf::len),
            DevOp::Add | DevOp::Unary(_) | DevOp::SwiGlu | DevOp::Narrow { .. } => 0,
        }
    }
}

type Guard<'a> = RwLockReadGuard<'a, Option<DevData>>;

/// The f32 device buffer behind a guard (16-bit tensors are widened first by the callers).
fn f32_of<'a>(g: &'a Guard<'_>) -> Result<&'a DBuf> {
    g.as_ref()
        .ok_or_else(|| CoreError::Device("internal: a host tensor in a device op".into()))?
        .f32()
}

/// Reads a (non-weight) operand as f32, widening a 16-bit one on the device once.
fn read(t: &Tensor) -> Result<Guard<'_>> {
    t.ensure_dev_f32()?;
    Ok(t.dev())
}

fn frozen(op: &'static str, what: &'static str, t: &Tensor) -> Result<()> {
    if t.requires_grad() {
        return Err(CoreError::Device(format!(
            "{op}: `{what}` is trainable; on a device only adapters (and norm gains) train"
        )));
    }
    Ok(())
}

/// A linear weight as f32: a 16-bit one is widened into a temporary for this product only (it
/// stays 16-bit in device memory).
fn with_weight<R>(accel: &dyn Accel, w: &Tensor, f: impl FnOnce(&DBuf) -> Result<R>) -> Result<R> {
    let g = w.dev();
    let d = g
        .as_ref()
        .ok_or_else(|| CoreError::Device("internal: a host weight in a device op".into()))?;
    match &d.vals {
        DevVals::F32(b) => f(b),
        DevVals::Half(bits, fmt) => {
            let wide = accel.widen(bits, *fmt == crate::HalfFormat::F16)?;
            drop(g);
            f(&wide)
        }
    }
}

pub(crate) fn add(tape: &Tape, on: On, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ga, gb) = (read(a)?, read(b)?);
    let out = on.accel.add(f32_of(&ga)?, f32_of(&gb)?)?;
    drop((ga, gb));
    let y = on.tensor(out, a.shape(), a.requires_grad() || b.requires_grad())?;
    on.record(tape, DevOp::Add, vec![a.clone(), b.clone()], &y);
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    tape: &Tape,
    on: On,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    lora: Option<LoraArgs>,
    dims: LinearDims,
    out_shape: &[usize],
) -> Result<Tensor> {
    const OP: &str = "linear";
    frozen(OP, "weight", w)?;
    if let Some(b) = bias {
        frozen(OP, "bias", b)?;
    }
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(bias.cloned());
    let gx = read(x)?;
    let gb = bias.map(read).transpose()?;
    let bias_buf = gb.as_ref().map(f32_of).transpose()?;
    let (y, saved) = match lora {
        None => {
            let (y, _) = with_weight(&*on.accel, w, |wb| {
                Ok(on
                    .accel
                    .linear_forward(f32_of(&gx)?, wb, layout, bias_buf, None, dims)?)
            })?;
            (y, None)
        }
        Some(l) => {
            let rank = l.a.shape()[0];
            let dropout = (tape.is_training() && l.dropout > 0.0).then(|| Dropout {
                p: l.dropout,
                seed: tape.next_seed(),
            });
            let (ga, gbb) = (read(l.a)?, read(l.b)?);
            let dl = DevLora {
                a: f32_of(&ga)?,
                b: f32_of(&gbb)?,
                rank,
                scale: l.scale,
                dropout,
            };
            let (y, u) = with_weight(&*on.accel, w, |wb| {
                Ok(on
                    .accel
                    .linear_forward(f32_of(&gx)?, wb, layout, bias_buf, Some(dl), dims)?)
            })?;
            inputs.push(l.a.clone());
            inputs.push(l.b.clone());
            let u =
                u.ok_or_else(|| CoreError::Device("linear: the adapter's u is missing".into()))?;
            (
                y,
                Some(DevLoraSaved {
                    rank,
                    scale: l.scale,
                    dropout,
                    u,
                }),
            )
        }
    };
    drop((gx, gb));
    let requires = inputs.iter().any(|t| t.requires_grad());
    let out = on.tensor(y, out_shape, requires)?;
    let op = DevOp::Linear {
        layout,
        has_bias: bias.is_some(),
        dims,
        lora: saved,
    };
    on.record(tape, op, inputs, &out);
    Ok(out)
}

pub(crate) fn unary(tape: &Tape, on: On, x: &Tensor, f: Unary) -> Result<Tensor> {
    let g = read(x)?;
    let out = on.accel.unary_forward(f, f32_of(&g)?)?;
    drop(g);
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    on.record(tape, DevOp::Unary(f), vec![x.clone()], &y);
    Ok(y)
}

pub(crate) fn swiglu(tape: &Tape, on: On, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gg, gu) = (read(gate)?, read(up)?);
    let out = on.accel.swiglu_forward(f32_of(&gg)?, f32_of(&gu)?)?;
    drop((gg, gu));
    let y = on.tensor(
        out,
        gate.shape(),
        gate.requires_grad() || up.requires_grad(),
    )?;
    on.record(tape, DevOp::SwiGlu, vec![gate.clone(), up.clone()], &y);
    Ok(y)
}

pub(crate) fn layer_norm(
    tape: &Tape,
    on: On,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let (gx, gg) = (read(x)?, read(gamma)?);
    let gb = beta.map(read).transpose()?;
    let bb = gb.as_ref().map(f32_of).transpose()?;
    let [out, mean, rstd] =
        on.accel
            .layernorm_forward(f32_of(&gx)?, f32_of(&gg)?, bb, x.last_dim(), eps)?;
    drop((gx, gg, gb));
    let mut inputs = vec![x.clone(), gamma.clone()];
    inputs.extend(beta.cloned());
    let y = on.tensor(out, x.shape(), inputs.iter().any(|t| t.requires_grad()))?;
    on.record(tape, DevOp::LayerNorm { mean, rstd }, inputs, &y);
    Ok(y)
}

pub(crate) fn rms_norm(
    tape: &Tape,
    on: On,
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (gx, gg) = (read(x)?, read(gamma)?);
    let [out, rstd] = on
        .accel
        .rmsnorm_forward(f32_of(&gx)?, f32_of(&gg)?, x.last_dim(), eps)?;
    drop((gx, gg));
    let y = on.tensor(out, x.shape(), x.requires_grad() || gamma.requires_grad())?;
    on.record(
        tape,
        DevOp::RmsNorm { rstd },
        vec![x.clone(), gamma.clone()],
        &y,
    );
    Ok(y)
}

pub(crate) fn embedding(on: On, table: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    frozen("embedding", "table", table)?;
    let c = table.shape()[1];
    let g = read(table)?;
    let out = on.accel.embedding_forward(f32_of(&g)?, ids, c)?;
    drop(g);
    let mut s = shape.to_vec();
    s.push(c);
    on.tensor(out, &s, false)
}

pub(crate) fn rope(
    tape: &Tape,
    on: On,
    x: &Tensor,
    tables: &RopeTables,
    positions: &[u32],
    heads: usize,
) -> Result<Tensor> {
    let (cos, sin) = tables.on_device(x.device())?;
    let mut out = on.accel.zeros(x.numel())?;
    {
        let (gx, gc, gs) = (read(x)?, read(&cos)?, read(&sin)?);
        let hd = tables.head_dim;
        on.accel.rope(
            false,
            &mut out,
            f32_of(&gx)?,
            f32_of(&gc)?,
            f32_of(&gs)?,
            positions,
            heads,
            hd,
        )?;
    }
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    let op = DevOp::Rope {
        cos,
        sin,
        positions: positions.to_vec(),
        heads,
        head_dim: tables.head_dim,
    };
    on.record(tape, op, vec![x.clone()], &y);
    Ok(y)
}

pub(crate) fn attention(
    tape: &Tape,
    on: On,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dims: AttnDims,
    scale: f32,
) -> Result<Tensor> {
    let (gq, gk, gv) = (read(q)?, read(k)?, read(v)?);
    let [out, lse] =
        on.accel
            .attention_forward(f32_of(&gq)?, f32_of(&gk)?, f32_of(&gv)?, dims, scale)?;
    drop((gq, gk, gv));
    let requires = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let y = on.tensor(out, q.shape(), requires)?;
    let op = DevOp::Attention { lse, dims, scale };
    on.record(tape, op, vec![q.clone(), k.clone(), v.clone()], &y);
    Ok(y)
}

pub(crate) fn narrow(
    tape: &Tape,
    on: On,
    x: &Tensor,
    start: usize,
    len: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let mut out = on.accel.zeros(x.rows() * len)?;
    {
        let g = read(x)?;
        let (n, cols) = (x.rows(), x.last_dim());
        on.accel
            .narrow(true, &mut out, f32_of(&g)?, n, cols, start, len)?;
    }
    let y = on.tensor(out, out_shape, x.requires_grad())?;
    on.record(tape, DevOp::Narrow { start, len }, vec![x.clone()], &y);
    Ok(y)
}

pub(crate) fn cross_entropy(
    tape: &Tape,
    on: On,
    logits: &Tensor,
    targets: &[i32],
) -> Result<Tensor> {
    let g = read(logits)?;
    let (loss, count, lse) =
        on.accel
            .cross_entropy_forward(f32_of(&g)?, targets, logits.last_dim())?;
    drop(g);
    let y = on.tensor(on.accel.upload(&[loss])?, &[1], logits.requires_grad())?;
    let op = DevOp::CrossEntropy {
        lse,
        targets: targets.to_vec(),
        count,
    };
    on.record(tape, op, vec![logits.clone()], &y);
    Ok(y)
}

/// Logits (and their gradient) a device holds at once in the fused head: 64 Mi values, 256 MB
/// each, whatever the vocabulary and token count.
const DEV_HEAD_CHUNK_ELEMS: usize = 1 << 26;

pub(crate) fn linear_cross_entropy(
    tape: &Tape,
    on: On,
    x: &Tensor,
    w: &Tensor,
    targets: &[i32],
) -> Result<Tensor> {
    frozen("linear_cross_entropy", "w", w)?;
    let v = w.shape()[0];
    let rows = (DEV_HEAD_CHUNK_ELEMS / v.max(1)).max(1);
    let want_dx = tape.is_training() && x.requires_grad();
    let (loss, dx) = head_chunked(&*on.accel, x, w, targets, want_dx, rows)?;
    let y = on.tensor(on.accel.upload(&[loss])?, &[1], x.requires_grad())?;
    on.record(
        tape,
        DevOp::LinearCrossEntropy { dx },
        vec![x.clone(), w.clone()],
        &y,
    );
    Ok(y)
}

/// The fused head over row chunks of at most `rows` rows: the mean loss over all counted rows
/// and, with `want_dx`, its gradient for `x` (each chunk's gradient of its own mean rescaled by
/// its share of the count).
fn head_chunked(
    a: &dyn Accel,
    x: &Tensor,
    w: &Tensor,
    targets: &[i32],
    want_dx: bool,
    rows: usize,
) -> Result<(f32, Option<DBuf>)> {
    let (c, v, n) = (x.last_dim(), w.shape()[0], targets.len());
    let (gx, gw) = (read(x)?, read(w)?);
    let (xb, wb) = (f32_of(&gx)?, f32_of(&gw)?);
    if n <= rows {
        let (loss, _, dx) = a.linear_cross_entropy(xb, wb, targets, c, v, want_dx)?;
        return Ok((loss, dx));
    }
    let total = targets.iter().filter(|&&t| t >= 0).count();
    let mut dx = want_dx.then(|| a.zeros(n * c)).transpose()?;
    let mut sum = 0.0f64;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let xs = a.copy_range(xb, start * c, len * c)?;
        let (l, count, dxc) =
            a.linear_cross_entropy(&xs, wb, &targets[start..start + len], c, v, want_dx)?;
        sum += l as f64 * count as f64;
        if let (Some(dx), Some(mut dxc)) = (dx.as_mut(), dxc) {
            if count > 0 {
                a.scale(&mut dxc, count as f32 / total as f32)?;
                a.write_range(dx, start * c, &dxc)?;
            }
        }
    }
    let loss = if total == 0 {
        0.0
    } else {
        (sum / total as f64) as f32
    };
    Ok((loss, dx))
}

/// An input of a recorded device op as backward sees it.
pub(crate) struct DevInput<'a> {
    pub values: Option<&'a Tensor>,
    pub numel: usize,
    pub last_dim: usize,
}

/// The gradient buffer a kernel that writes several gradients at once should write: the
/// input's, or a zeroed scratch buffer when that input needs no gradient.
fn or_scratch<'a>(
    g: Option<&'a mut DBuf>,
    scratch: &'a mut Option<DBuf>,
    a: &dyn Accel,
    n: usize,
) -> Result<&'a mut DBuf> {
    match g {
        Some(g) => Ok(g),
        None => Ok(scratch.insert(a.zeros(n)?)),
    }
}

/// The local gradient of a device op: accumulates into `bufs[i]` for each input `i` that needs
/// one (`None` for the others).
pub(crate) fn backward(
    op: &DevOp,
    accel: &Arc<dyn Accel>,
    inputs: &[DevInput],
    dout: &DBuf,
    bufs: &mut [Option<DBuf>],
) -> Result<()> {
    // Guards on the inputs backward reads; a missing one reads as an empty buffer.
    let guards: Vec<Option<Guard>> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let is_weight = matches!(op, DevOp::Linear { .. }) && i == 1;
            t.values.filter(|_| !is_weight).map(read).transpose()
        })
        .collect::<Result<_>>()?;
    let empty = DBuf::Host(Vec::new());
    let data: Vec<&DBuf> = guards
        .iter()
        .map(|g| g.as_ref().map_or(Ok(&empty), f32_of))
        .collect::<Result<_>>()?;
    let mut slots: Vec<Option<&mut DBuf>> = bufs.iter_mut().map(|b| b.as_mut()).collect();
    let mut take = |i: usize| slots.get_mut(i).and_then(|s| s.take());
    let a = &**accel;
    match op {
        DevOp::Add => {
            for i in 0..2 {
                if let Some(g) = take(i) {
                    a.accumulate(g, dout)?;
                }
            }
        }
        DevOp::Linear {
            layout,
            has_bias,
            dims,
            lora,
        } => {
            let a_idx = if *has_bias { 3 } else { 2 };
            let dl = lora.as_ref().map(|l| DevLora {
                a: data[a_idx],
                b: data[a_idx + 1],
                rank: l.rank,
                scale: l.scale,
                dropout: l.dropout,
            });
            let grads = DevLinearGrads {
                dx: take(0),
                dbias: None,
                da: if lora.is_some() { take(a_idx) } else { None },
                db: if lora.is_some() {
                    take(a_idx + 1)
                } else {
                    None
                },
            };
            let w = inputs[1]
                .values
                .ok_or_else(|| CoreError::Device("internal: linear weight not kept".into()))?;
            let u = lora.as_ref().map(|l| &l.u);
            with_weight(a, w, |wb| {
                Ok(a.linear_backward(grads, dout, data[0], wb, *layout, dl, u, *dims)?)
            })?;
        }
        DevOp::Unary(f) => {
            if let Some(g) = take(0) {
                a.unary_backward(*f, g, dout, data[0])?;
            }
        }
        DevOp::SwiGlu => {
            let (mut s0, mut s1) = (None, None);
            let dg = or_scratch(take(0), &mut s0, a, dout.len())?;
            let du = or_scratch(take(1), &mut s1, a, dout.len())?;
            a.swiglu_backward(dg, du, dout, data[0], data[1])?;
        }
        DevOp::LayerNorm { mean, rstd } => {
            let c = inputs[0].last_dim;
            let (dx, dg, db) = (take(0), take(1), take(2));
            a.layernorm_backward(dx, dg, db, dout, data[0], data[1], mean, rstd, c)?;
        }
        DevOp::RmsNorm { rstd } => {
            let c = inputs[0].last_dim;
            let (dx, dg) = (take(0), take(1));
            a.rmsnorm_backward(dx, dg, dout, data[0], data[1], rstd, c)?;
        }
        DevOp::Rope {
            cos,
            sin,
            positions,
            heads,
            head_dim,
        } => {
            if let Some(g) = take(0) {
                let (gc, gs) = (read(cos)?, read(sin)?);
                a.rope(
                    true,
                    g,
                    dout,
                    f32_of(&gc)?,
                    f32_of(&gs)?,
                    positions,
                    *heads,
                    *head_dim,
                )?;
            }
        }
        DevOp::Attention { lse, dims, scale } => {
            let (mut s0, mut s1, mut s2) = (None, None, None);
            let dq = or_scratch(take(0), &mut s0, a, inputs[0].numel)?;
            let dk = or_scratch(take(1), &mut s1, a, inputs[1].numel)?;
            let dv = or_scratch(take(2), &mut s2, a, inputs[2].numel)?;
            a.attention_backward(
                dq, dk, dv, dout, lse, data[0], data[1], data[2], *dims, *scale,
            )?;
        }
        DevOp::Narrow { start, len } => {
            if let Some(g) = take(0) {
                let cols = inputs[0].last_dim;
                let n = inputs[0].numel / cols.max(1);
                a.narrow(false, g, dout, n, cols, *start, *len)?;
            }
        }
        DevOp::CrossEntropy {
            lse,
            targets,
            count,
        } => {
            if let Some(g) = take(0) {
                let dloss = a.download(dout)?[0];
                let v = inputs[0].last_dim;
                a.cross_entropy_backward(g, dloss, data[0], lse, targets, v, *count)?;
            }
        }
        DevOp::LinearCrossEntropy { dx } => {
            if let (Some(g), Some(s)) = (take(0), dx.as_ref()) {
                let dloss = a.download(dout)?[0];
                if dloss == 1.0 {
                    // The loss is the output (the usual case): `g += 1 * s` is `g += s`
                    // exactly, without the scaled copy.
                    a.accumulate(g, s)?;
                } else {
                    let mut t = a.copy(s)?;
                    a.scale(&mut t, dloss)?;
                    a.accumulate(g, &t)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// A loss used twice (`loss + loss`) reaches the head's backward with `dloss = 2`: the
    /// device scales its stored dx (the path the usual `dloss = 1` skips) as the host does.
    #[test]
    fn device_head_scales_its_gradient_by_dloss() {
        use crate::{ops, Tape};
        crate::device::emulate_cuda(974);
        let dev = Device::Cuda(974);
        let (n, c, v) = (5usize, 4usize, 9usize);
        let mut r = lora_kernels::rng::Rng::new(8);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (xv, wv) = (rand(n * c), rand(v * c));
        let targets = [3, -100, 8, 0, 5];
        let grad = |device: Device, twice: bool| -> Vec<f32> {
            let x = Tensor::new_on(xv.clone(), &[n, c], true, device).unwrap();
            let w = Tensor::new_on(wv.clone(), &[v, c], false, device).unwrap();
            let tape = Tape::new(0);
            let loss = ops::linear_cross_entropy(&tape, &x, &w, &targets).unwrap();
            let out = if twice {
                ops::add(&tape, &loss, &loss).unwrap()
            } else {
                loss
            };
            tape.backward(&out).unwrap().to_vec(&x).unwrap().unwrap()
        };
        let (host1, host2) = (grad(Device::Cpu, false), grad(Device::Cpu, true));
        let (dev1, dev2) = (grad(dev, false), grad(dev, true));
        assert_eq!(host1, dev1, "dloss = 1");
        assert_eq!(host2, dev2, "dloss = 2");
        assert!(host1.iter().any(|&g| g != 0.0));
        for (a, b) in host1.iter().zip(&host2) {
            assert_eq!(2.0 * a, *b, "doubling is exact in binary floating point");
        }
    }

    /// The fused head over row chunks (as a large vocabulary or batch runs it) equals one pass.
    #[test]
    fn chunked_device_head_equals_one_pass() {
        crate::device::emulate_cuda(973);
        let dev = Device::Cuda(973);
        let a = crate::device::accel(dev).unwrap();
        let (n, c, v) = (11usize, 6usize, 17usize);
        let mut r = lora_kernels::rng::Rng::new(3);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let x = Tensor::new_on(rand(n * c), &[n, c], false, dev).unwrap();
        let w = Tensor::new_on(rand(v * c), &[v, c], false, dev).unwrap();
        let targets = [3, -100, 16, 0, 5, -100, 9, 9, 1, 2, 15];
        let (l1, dx1) = head_chunked(&*a, &x, &w, &targets, true, n).unwrap();
        let dx1 = a.download(&dx1.unwrap()).unwrap();
        for rows in [1, 2, 4, 10] {
            let (l, dx) = head_chunked(&*a, &x, &w, &targets, true, rows).unwrap();
            let dx = a.download(&dx.unwrap()).unwrap();
            assert!(
                (l - l1).abs() <= 1e-6 * l1.abs(),
                "rows {rows}: {l} vs {l1}"
            );
            let e = dx
                .iter()
                .zip(&dx1)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(e <= 1e-6, "rows {rows}: dx differs by {e}");
        }
        let none = [-100i32; 11];
        let (l, dx) = head_chunked(&*a, &x, &w, &none, true, 3).unwrap();
        assert_eq!(l, 0.0);
        assert!(a.download(&dx.unwrap()).unwrap().iter().all(|&g| g == 0.0));
    }
}
