//! Differentiable ops, one file per op. Each file holds the op's public function (shape checks
//! with typed errors naming the operand, then the host kernel, or its device twin when the
//! operands live on a device), the node it records on the tape for the host and for a device
//! (what its backward reads, and only that), and the backward of each.
//!
//! Adding an op: its kernels in `lora-kernels` (CPU, and CUDA with its `Accel` method), and one
//! file here implementing [`HostOp`] and [`DevOp`] for its nodes; `autograd.rs` needs nothing.
//!
//! Row-wise ops treat a tensor of shape `(..., C)` as `(rows, C)`. Whatever trains on the host
//! trains on a device: adapters, norm gains, embedding tables, biases and base weights (full
//! fine-tuning), with the same selective saving.

mod add;
mod attention;
mod cross_entropy;
mod embedding;
mod layer_norm;
mod linear;
mod linear_cross_entropy;
mod narrow;
mod rms_norm;
mod rope;
mod swiglu;
mod unary;

pub use add::add;
pub use attention::attention;
pub use cross_entropy::cross_entropy;
pub use embedding::embedding;
pub use layer_norm::layer_norm;
pub use linear::{linear, LoraArgs};
pub use linear_cross_entropy::linear_cross_entropy;
pub use narrow::narrow;
pub use rms_norm::rms_norm;
pub use rope::{rope, RopeTables};
pub use swiglu::swiglu;
pub use unary::{gelu, silu};

pub(crate) use crate::autograd::Input;
use crate::autograd::{Op, Tape};
use crate::device::Device;
use crate::error::{CoreError, Result};
use crate::tensor::{DevData, DevVals, Tensor};
use lora_kernels::accel::{Accel, DBuf, DevLinearGrads, DevLora, Unary};
use lora_kernels::lora_linear::{Dropout, LinearDims, WeightLayout};
use lora_kernels::ops::attention::AttnDims;
use std::sync::{Arc, Mutex, RwLockReadGuard};

/// The gradient buffers of a node's inputs (`None` where an input needs none); the op's
/// backward takes each at most once.
pub(crate) struct Slots<'a, B: ?Sized>(pub(crate) Vec<Option<&'a mut B>>);

impl<'a, B: ?Sized> Slots<'a, B> {
    /// Input `i`'s gradient buffer, if it needs one and was not taken yet.
    pub(crate) fn take(&mut self, i: usize) -> Option<&'a mut B> {
        self.0.get_mut(i).and_then(|s| s.take())
    }
}

/// A recorded op on host tensors: what its backward reads, and the backward.
pub(crate) trait HostOp {
    /// The op's name (`Tape::op_names`).
    fn name(&self) -> &'static str;
    /// Whether backward reads the values of input `i` (else the tape keeps only its id and
    /// shape, so an activation nobody's backward reads is freed as soon as the forward is
    /// done with it). `inputs` are the op's inputs in the node's order.
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool;
    /// Elements (f32 values or 4-byte ids) the op saved for its own backward.
    fn saved_elems(&self) -> usize {
        0
    }
    /// Whether backward reads input `i` through its tensor (a linear weight, kept 16-bit when
    /// stored so) instead of as f32 values in `data`.
    fn reads_stored(&self, _i: usize) -> bool {
        false
    }
    /// Accumulates the local gradient into the input's buffers (`g`); `data[i]` holds input
    /// `i`'s values when backward reads them (else it is empty).
    fn backward(
        &self,
        inputs: &[Input],
        data: &[&[f32]],
        dout: &[f32],
        g: &mut Slots<[f32]>,
    ) -> Result<()>;
}

/// A recorded op on device tensors, as [`HostOp`] with device buffers. Same graph, same dropout
/// draws and same saved state as on the host: only where the values live differs.
pub(crate) trait DevOp {
    /// The op's name.
    fn name(&self) -> &'static str;
    /// As [`HostOp::reads_input`].
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool;
    /// Device values the op saved for itself.
    fn saved_elems(&self) -> usize {
        0
    }
    /// As [`HostOp::reads_stored`].
    fn reads_stored(&self, _i: usize) -> bool {
        false
    }
    /// As [`HostOp::backward`], on the device `a`.
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[DevInput],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()>;
}

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

fn check_vec(op: &'static str, what: &'static str, t: &Tensor, c: usize) -> Result<()> {
    if t.shape() != [c] {
        return Err(shape_err(op, what, t, format!("[{c}]")));
    }
    Ok(())
}

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
    fn record(&self, tape: &Tape, op: impl DevOp + 'static, inputs: Vec<Tensor>, y: &Tensor) {
        let op = Op::Dev {
            op: Box::new(op),
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
                return Err(CoreError::MixedDevices {
                    op,
                    first: fname,
                    first_on: fdev,
                    other: name,
                    other_on: dev,
                });
            }
            Some(_) => {}
        }
    }
    Ok(first.and_then(|(_, on)| on))
}

pub(crate) type Guard<'a> = RwLockReadGuard<'a, Option<DevData>>;

/// The f32 device buffer behind a guard (16-bit tensors are widened first by the callers).
pub(crate) fn f32_of<'a>(g: &'a Guard<'_>) -> Result<&'a DBuf> {
    g.as_ref()
        .ok_or(CoreError::Internal("a host tensor in a device op"))?
        .f32()
}

/// Reads a (non-weight) operand as f32, widening a 16-bit one on the device once.
pub(crate) fn read(t: &Tensor) -> Result<Guard<'_>> {
    t.ensure_dev_f32()?;
    Ok(t.dev())
}

/// A linear weight as f32: a 16-bit one is widened into a temporary for this product only (it
/// stays 16-bit in device memory).
fn with_weight<R>(accel: &dyn Accel, w: &Tensor, f: impl FnOnce(&DBuf) -> Result<R>) -> Result<R> {
    let g = w.dev();
    let d = g
        .as_ref()
        .ok_or(CoreError::Internal("a host weight in a device op"))?;
    match &d.vals {
        DevVals::F32(b) => f(b),
        DevVals::Half(bits, fmt) => {
            let wide = accel.widen(bits, *fmt == crate::HalfFormat::F16)?;
            drop(g);
            f(&wide)
        }
    }
}

/// An input of a recorded device op as backward sees it.
pub(crate) struct DevInput<'a> {
    pub values: Option<&'a Tensor>,
    pub numel: usize,
    pub last_dim: usize,
}

/// The gradient buffer a kernel that writes several gradients at once should write: the
/// input's, or a zeroed scratch buffer when that input needs no gradient.
pub(crate) fn or_scratch<'a>(
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
