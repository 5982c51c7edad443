//! Differentiable ops, one file per op. Each file holds the op's public function (shape checks
//! with typed errors naming the operand, then the operands' backend: the CPU or a CUDA device,
//! one code path), the node it records on the tape (what its backward reads, and only that), and
//! its backward.
//!
//! Adding an op: its kernels in `lora-kernels` (the CPU kernel and the CUDA kernel, each behind
//! its backend's `Accel` method), and one file here implementing [`OpNode`] for its node;
//! `autograd.rs` needs nothing.
//!
//! Row-wise ops treat a tensor of shape `(..., C)` as `(rows, C)`. Whatever trains on the host
//! trains on a device: adapters, norm gains, embedding tables, biases and base weights (full
//! fine-tuning), with the same selective saving.

mod add;
mod attention;
mod box_losses;
mod concat;
mod conv2d;
mod cross_entropy;
mod embedding;
mod expand;
mod group_norm;
mod layer_norm;
mod linear;
mod linear_cross_entropy;
mod mse;
mod narrow;
mod pool;
mod reshape;
mod rms_norm;
mod rope;
mod scale;
#[cfg(test)]
mod shape_tests;
mod swiglu;
mod transpose;
mod unary;
mod unet_ops;

pub use add::add;
pub use attention::{attention, attention_bidirectional, cross_attention};
pub use box_losses::box_losses;
pub use concat::concat;
pub use conv2d::{conv2d, conv2d_pair, Conv2dParams};
pub use cross_entropy::cross_entropy;
pub use embedding::embedding;
pub use expand::expand;
pub use group_norm::group_norm;
pub use layer_norm::layer_norm;
pub use linear::{linear, LoraArgs};
pub use linear_cross_entropy::linear_cross_entropy;
pub use mse::mse_loss;
pub use narrow::{narrow, narrow_dim};
pub use pool::{adaptive_avg_pool2d, batch_norm2d, max_pool2d, PoolDims};
pub use reshape::reshape;
pub use rms_norm::rms_norm;
pub use rope::{rope, RopeTables};
pub use scale::scale;
pub use swiglu::swiglu;
pub use transpose::transpose;
pub use unary::{gelu, gelu_erf, quick_gelu, relu, sigmoid, silu};
pub use unet_ops::{add_planes, geglu, upsample_nearest2d};

pub(crate) use crate::autograd::Input;
use crate::autograd::{Op, Tape};
use crate::device::Device;
use crate::error::{CoreError, Result};
use crate::tensor::{Store, Tensor};
use lora_kernels::accel::{Accel, DBuf, LinearGradBufs, LoraBufs, Unary};
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

/// A recorded op: what its backward reads, and the backward.
pub(crate) trait OpNode {
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
    /// Whether, on a tape that keeps activations in bf16 ([`Tape::with_bf16_activations`]),
    /// backward may read input `i` rounded to bf16: an input autocast would hold in bf16
    /// because a product made it (an activation function's or attention's inputs). Ops whose
    /// backward needs the f32 values (norms, the linear layers' `x`, losses) keep the default.
    fn saves_bf16(&self, _i: usize) -> bool {
        false
    }
    /// Whether backward reads input `i` widened for that use only when it is a frozen 16-bit
    /// tensor (a convolution's weight, which then stays 16-bit in memory) instead of widening
    /// it in place for good.
    fn reads_transient(&self, _i: usize) -> bool {
        false
    }
    /// Accumulates the local gradient into the inputs' buffers (`g`) on the backend `a`;
    /// `data[i]` holds input `i`'s values when backward reads them (else it is empty).
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
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

/// The backend an op's operands share.
#[derive(Clone)]
pub(crate) struct On {
    pub accel: Arc<dyn Accel>,
    pub device: Device,
}

impl On {
    fn tensor(&self, buf: DBuf, shape: &[usize], requires_grad: bool) -> Result<Tensor> {
        Tensor::from_buf(&self.accel, self.device, buf, shape, requires_grad)
    }
    fn record(&self, tape: &Tape, op: impl OpNode + 'static, inputs: Vec<Tensor>, y: &Tensor) {
        let op = Op::Node {
            op: Box::new(op),
            accel: self.accel.clone(),
        };
        tape.record(op, inputs, y);
    }
}

/// The backend of the operands when all are on the same device; an error naming the first
/// operand elsewhere otherwise.
pub(crate) fn placement(op: &'static str, operands: &[(&'static str, &Tensor)]) -> Result<On> {
    let mut first: Option<(&str, On)> = None;
    for &(name, t) in operands {
        let s = t.store();
        match &first {
            None => {
                first = Some((
                    name,
                    On {
                        accel: s.on.clone(),
                        device: s.device,
                    },
                ))
            }
            Some((fname, f)) if f.device != s.device => {
                return Err(CoreError::MixedDevices {
                    op,
                    first: fname,
                    first_on: f.device,
                    other: name,
                    other_on: s.device,
                });
            }
            Some(_) => {}
        }
    }
    match first {
        Some((_, on)) => Ok(on),
        None => Err(CoreError::Internal("an op without operands")),
    }
}

pub(crate) enum Guard<'a> {
    /// The tensor's own storage, locked for reading.
    Store(RwLockReadGuard<'a, Store>),
    /// A frozen 16-bit tensor's values widened for one use ([`Tensor::read_transient`]).
    Widened(DBuf),
}

/// The f32 buffer behind a guard (16-bit tensors are widened first by [`read`]).
pub(crate) fn f32_of<'a>(g: &'a Guard<'_>) -> Result<&'a DBuf> {
    match g {
        Guard::Store(s) => s.f32(),
        Guard::Widened(b) => Ok(b),
    }
}

/// Reads a (non-weight) operand as f32, widening a 16-bit one where it lives, once.
pub(crate) fn read(t: &Tensor) -> Result<Guard<'_>> {
    Ok(Guard::Store(t.read()?))
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
