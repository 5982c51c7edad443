//! The tape: ops append a `Node` as they run; [`Tape::backward`] walks the nodes in reverse.
//!
//! This file is the one place that maps each primitive op to its local gradient
//! (`backward_node`); composites (a transformer block, a model) are written in these
//! primitives and need no rule of their own. What each op's backward needs is saved in its
//! `Op` variant, next to the forward in `ops.rs` that fills it.
//!
//! Frozen tensors (`requires_grad == false`) never get a gradient buffer, and the linear op is
//! told which of its inputs need one, so a frozen weight also costs no weight-gradient GEMM.

use crate::dev_ops::{self, DevInput, DevOp};
use crate::error::{CoreError, Result};
use crate::tensor::Tensor;
use lora_kernels::accel::{Accel, DBuf};
use lora_kernels::lora_linear::{
    lora_linear_backward, BaseLinear, Dropout, LinearDims, LinearGrads, LoraWeights, WeightData,
    WeightLayout,
};
use lora_kernels::ops::{attention, cross_entropy, elementwise, embedding, norm, rope, slice};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Saved state of the adapter part of a linear op.
pub(crate) struct LoraSaved {
    pub rank: usize,
    pub scale: f32,
    pub dropout: Option<Dropout>,
    pub u: Vec<f32>, // (N, R)
}

/// A recorded op and what its backward reads. Input order is given per variant.
pub(crate) enum Op {
    /// inputs: [a, b]
    Add,
    /// inputs: [x, w, (bias), (lora_a, lora_b)]
    Linear {
        layout: WeightLayout,
        has_bias: bool,
        dims: LinearDims,
        lora: Option<LoraSaved>,
    },
    /// inputs: [x]
    Gelu,
    /// inputs: [x]
    Silu,
    /// inputs: [gate, up]
    SwiGlu,
    /// inputs: [x, gamma, (beta)]
    LayerNorm { mean: Vec<f32>, rstd: Vec<f32> },
    /// inputs: [x, gamma]
    RmsNorm { rstd: Vec<f32> },
    /// inputs: [table]
    Embedding { ids: Vec<u32> },
    /// inputs: [x]
    Rope {
        cos: Arc<Vec<f32>>,
        sin: Arc<Vec<f32>>,
        positions: Vec<u32>,
        heads: usize,
        head_dim: usize,
    },
    /// inputs: [q, k, v]
    Attention {
        lse: Vec<f32>,
        dims: attention::AttnDims,
        scale: f32,
    },
    /// inputs: [x]
    Narrow { start: usize, len: usize },
    /// inputs: [logits]
    CrossEntropy {
        lse: Vec<f32>,
        targets: Vec<i32>,
        count: usize,
    },
    /// inputs: [x, w]. The fused head computed the gradients of the mean loss during forward
    /// (while each chunk's logits existed); backward scales them by `dloss`.
    LinearCrossEntropy {
        dx: Option<Vec<f32>>,
        dw: Option<Vec<f32>>,
    },
    /// inputs: [x]. A segment run without recording ([`crate::ops::checkpoint`]); backward runs
    /// `f` again on a recording tape that draws dropout seeds from `seed` starting at draw
    /// `draws` (the masks of the first run, which are also those of an uncheckpointed run) and
    /// backpropagates through that.
    Checkpoint { f: Segment, seed: u64, draws: u64 },
    /// An op on device tensors (see `dev_ops.rs`); its inputs are in the same order as the host
    /// op's.
    Dev { op: DevOp, accel: Arc<dyn Accel> },
}

/// A checkpointed segment of the forward pass: `f(tape, x) -> y`.
pub type Segment = Rc<dyn Fn(&Tape, &Tensor) -> Result<Tensor>>;

impl Op {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Dev { op, .. } => op.name(),
            Op::Add => "add",
            Op::Linear { .. } => "lora_linear",
            Op::Gelu => "gelu",
            Op::Silu => "silu",
            Op::SwiGlu => "swiglu",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Embedding { .. } => "embedding",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Narrow { .. } => "narrow",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::LinearCrossEntropy { .. } => "linear_cross_entropy",
            Op::Checkpoint { .. } => "checkpoint",
        }
    }
}

impl Op {
    /// Whether backward reads the values of input `i` (else the tape keeps only its id and
    /// shape, so an activation nobody's backward reads is freed as soon as the forward is done
    /// with it). `inputs` are the op's inputs in the variant's order.
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool {
        match self {
            Op::Dev { op, .. } => op.reads_input(i),
            Op::Add | Op::Narrow { .. } | Op::Rope { .. } | Op::LinearCrossEntropy { .. } => false,
            // dW and dA read x; dx reads W (and A, B). The weights are kept (they are alive
            // anyway): only x, an activation, is worth dropping.
            Op::Linear { has_bias, lora, .. } => {
                let a_idx = if *has_bias { 3 } else { 2 };
                i != 0
                    || inputs[1].requires_grad()
                    || (lora.is_some() && inputs[a_idx].requires_grad())
            }
            // The gradient of the table is a scatter of dout: the values are not read.
            Op::Embedding { .. } => false,
            Op::Gelu
            | Op::Silu
            | Op::SwiGlu
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention { .. }
            | Op::CrossEntropy { .. }
            | Op::Checkpoint { .. } => true,
        }
    }
}

impl Op {
    /// Elements (f32 values or 4-byte ids) the op saved for its own backward.
    fn saved_elems(&self) -> usize {
        match self {
            Op::Dev { op, .. } => op.saved_elems(),
            Op::Linear { lora, .. } => lora.as_ref().map_or(0, |l| l.u.len()),
            Op::LayerNorm { mean, rstd } => mean.len() + rstd.len(),
            Op::RmsNorm { rstd } => rstd.len(),
            Op::Embedding { ids } => ids.len(),
            Op::Rope { positions, .. } => positions.len(),
            Op::Attention { lse, .. } => lse.len(),
            Op::CrossEntropy { lse, targets, .. } => lse.len() + targets.len(),
            Op::LinearCrossEntropy { dx, dw } => {
                dx.as_ref().map_or(0, Vec::len) + dw.as_ref().map_or(0, Vec::len)
            }
            Op::Add
            | Op::Gelu
            | Op::Silu
            | Op::SwiGlu
            | Op::Narrow { .. }
            | Op::Checkpoint { .. } => 0,
        }
    }
}

/// An input as the tape keeps it: always its identity, its values only if backward reads them.
struct Input {
    id: u64,
    shape: Vec<usize>,
    requires_grad: bool,
    values: Option<Tensor>,
}

impl Input {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

struct Node {
    op: Op,
    inputs: Vec<Input>,
    output_id: u64,
}

/// Records ops for one forward pass and runs their backward.
///
/// A tape made with [`Tape::new`] records and applies dropout (training); one made with
/// [`Tape::inference`] records nothing and disables dropout. Dropout masks are drawn from the
/// tape's seed in op order, so the same seed and the same graph give the same masks.
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    training: bool,
    record: bool,
    checkpoint: bool,
    seed: u64,
    draws: Cell<u64>,
}

impl Tape {
    /// A recording (training) tape whose dropout masks derive from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            nodes: RefCell::new(Vec::new()),
            training: true,
            record: true,
            checkpoint: false,
            seed,
            draws: Cell::new(0),
        }
    }

    /// A non-recording tape: no graph is kept, dropout is off.
    pub fn inference() -> Self {
        Self {
            nodes: RefCell::new(Vec::new()),
            training: false,
            record: false,
            checkpoint: false,
            seed: 0,
            draws: Cell::new(0),
        }
    }

    /// Activation (gradient) checkpointing: models run each transformer block through
    /// [`crate::ops::checkpoint`], so the tape keeps only the blocks' inputs and recomputes a
    /// block's forward during backward (about one more forward pass of compute for a fraction
    /// of the activation memory). Gradients are the same up to f32 rounding.
    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint = on && self.training;
        self
    }

    /// Whether models should checkpoint their blocks on this tape.
    pub fn checkpointing(&self) -> bool {
        self.checkpoint
    }

    /// A training tape for a checkpointed segment: draws continue from `draws` of `seed`.
    fn segment(seed: u64, draws: u64, record: bool) -> Self {
        Self {
            record,
            draws: Cell::new(draws),
            ..Self::new(seed)
        }
    }

    /// Whether ops are recorded and dropout applied.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the recorded ops, in order (for inspection and tests).
    pub fn op_names(&self) -> Vec<&'static str> {
        self.nodes.borrow().iter().map(|n| n.op.name()).collect()
    }

    /// Activation memory the tape holds for backward, in 4-byte elements: the values of
    /// recorded ops' outputs that some backward reads (each counted once), plus what the ops
    /// saved for themselves (LoRA `u`, norm and attention statistics, ids). Parameters and
    /// frozen weights are not counted; outputs no backward reads are not held at all.
    pub fn saved_elems(&self) -> usize {
        let nodes = self.nodes.borrow();
        let outputs: std::collections::HashSet<u64> = nodes.iter().map(|n| n.output_id).collect();
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for n in nodes.iter() {
            total += n.op.saved_elems();
            for i in &n.inputs {
                if i.values.is_some() && outputs.contains(&i.id) && seen.insert(i.id) {
                    total += i.numel();
                }
            }
        }
        total
    }

    /// A fresh seed for the next random op (dropout), deterministic in op order.
    pub(crate) fn next_seed(&self) -> u64 {
        let k = self.draws.get();
        self.draws.set(k + 1);
        lora_kernels::rng::splitmix64(self.seed ^ lora_kernels::rng::splitmix64(k))
    }

    /// Appends a node when training and the output needs a gradient.
    pub(crate) fn record(&self, op: Op, inputs: Vec<Tensor>, output: &Tensor) {
        if self.record && output.requires_grad() {
            let kept = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| Input {
                    id: t.id(),
                    shape: t.shape().to_vec(),
                    requires_grad: t.requires_grad(),
                    values: op.reads_input(i, &inputs).then(|| t.clone()),
                })
                .collect();
            self.nodes.borrow_mut().push(Node {
                op,
                inputs: kept,
                output_id: output.id(),
            });
        }
    }

    /// Reverse pass from a scalar `loss`. Returns the gradients of the leaf tensors that require
    /// them (parameters); intermediate gradients are freed as soon as they are consumed. The tape
    /// is emptied (its saved activations are released).
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(CoreError::NotScalar(loss.shape().to_vec()));
        }
        let seed = match loss.dev().as_ref() {
            Some(d) => Grad::Dev(d.accel.clone(), d.accel.upload(&[1.0])?),
            None => Grad::Host(vec![1.0]),
        };
        self.backward_from(loss, seed)
    }

    /// Reverse pass from `output` with upstream gradient `dout` (same length and device).
    fn backward_from(&self, output: &Tensor, dout: Grad) -> Result<Gradients> {
        let nodes = std::mem::take(&mut *self.nodes.borrow_mut());
        let mut grads: HashMap<u64, Grad> = HashMap::new();
        if output.requires_grad() {
            grads.insert(output.id(), dout);
        }
        for node in nodes.into_iter().rev() {
            let Some(dout) = grads.remove(&node.output_id) else {
                continue;
            };
            match (&node.op, dout) {
                (Op::Checkpoint { f, seed, draws }, dout) => {
                    let x = &node.inputs[0];
                    let xv = x.values.as_ref().expect("checkpoint keeps its input");
                    // The segment again, recorded this time, from a copy of x that is a leaf.
                    let sub = Tape::segment(*seed, *draws, true);
                    let x2 = match xv.dev().as_ref() {
                        Some(d) => {
                            let copy = d.accel.copy(d.f32()?)?;
                            Tensor::from_dev(&d.accel, d.ordinal, copy, &x.shape, x.requires_grad)?
                        }
                        None => Tensor::from_op(xv.to_vec(), &x.shape, x.requires_grad)?,
                    };
                    let y2 = f(&sub, &x2)?;
                    let mut inner = sub.backward_from(&y2, dout)?;
                    if let Some(dx) = inner.map.remove(&x2.id()) {
                        accumulate_into(&mut grads, x.id, dx)?;
                    }
                    for (id, g) in inner.map {
                        accumulate_into(&mut grads, id, g)?;
                    }
                }
                (Op::Dev { op, accel }, Grad::Dev(_, dout)) => {
                    let unwrap = |g| match g {
                        Grad::Dev(_, b) => Ok(b),
                        other => Err(other),
                    };
                    let mut bufs = input_grads(&node, &mut grads, unwrap, |n| Ok(accel.zeros(n)?))?;
                    let ins: Vec<DevInput> = node
                        .inputs
                        .iter()
                        .map(|t| DevInput {
                            values: t.values.as_ref(),
                            numel: t.numel(),
                            last_dim: t.last_dim(),
                        })
                        .collect();
                    dev_ops::backward(op, accel, &ins, &dout, &mut bufs)?;
                    let wrap = |b| Grad::Dev(accel.clone(), b);
                    give_back(&node, &mut grads, bufs, wrap)?;
                }
                (op, Grad::Host(dout)) if !matches!(op, Op::Dev { .. }) => {
                    let unwrap = |g| match g {
                        Grad::Host(v) => Ok(v),
                        other => Err(other),
                    };
                    let mut bufs = input_grads(&node, &mut grads, unwrap, |n| Ok(vec![0.0; n]))?;
                    backward_node(op, &node.inputs, &dout, &mut bufs)?;
                    give_back(&node, &mut grads, bufs, Grad::Host)?;
                }
                (op, _) => return Err(mixed(op.name())),
            }
        }
        Ok(Gradients { map: grads })
    }
}

/// One gradient buffer per input of `node` that needs one: the gradient accumulated so far
/// (`unwrap` takes it if it is of this node's kind: host or device) at an input's first
/// occurrence, else `fresh(numel)` zeros; `None` for inputs that need none.
fn input_grads<B>(
    node: &Node,
    grads: &mut HashMap<u64, Grad>,
    unwrap: impl Fn(Grad) -> std::result::Result<B, Grad>,
    fresh: impl Fn(usize) -> Result<B>,
) -> Result<Vec<Option<B>>> {
    let mut bufs = Vec::with_capacity(node.inputs.len());
    for (i, t) in node.inputs.iter().enumerate() {
        if !t.requires_grad {
            bufs.push(None);
            continue;
        }
        let dup = node.inputs[..i].iter().any(|p| p.id == t.id);
        let held = if dup { None } else { grads.remove(&t.id) };
        let buf = match held.map(&unwrap) {
            Some(Ok(b)) => b,
            Some(Err(_)) => return Err(mixed(node.op.name())),
            None => fresh(t.numel())?,
        };
        bufs.push(Some(buf));
    }
    Ok(bufs)
}

/// Puts the buffers of [`input_grads`], now holding the node's contributions, back.
fn give_back<B>(
    node: &Node,
    grads: &mut HashMap<u64, Grad>,
    bufs: Vec<Option<B>>,
    wrap: impl Fn(B) -> Grad,
) -> Result<()> {
    for (t, buf) in node.inputs.iter().zip(bufs) {
        if let Some(b) = buf {
            accumulate_into(grads, t.id, wrap(b))?;
        }
    }
    Ok(())
}

fn mixed(op: &str) -> CoreError {
    CoreError::Device(format!(
        "backward of `{op}`: its gradient and its inputs' gradients are on different devices"
    ))
}

/// A gradient buffer: on the host or on a device.
pub(crate) enum Grad {
    Host(Vec<f32>),
    Dev(Arc<dyn Accel>, DBuf),
}

impl std::fmt::Debug for Grad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grad::Host(v) => write!(f, "Host({} values)", v.len()),
            Grad::Dev(a, b) => write!(f, "Dev({}, {} values)", a.describe(), b.len()),
        }
    }
}

fn accumulate_into(grads: &mut HashMap<u64, Grad>, id: u64, g: Grad) -> Result<()> {
    match (grads.get_mut(&id), g) {
        (None, g) => {
            grads.insert(id, g);
        }
        (Some(Grad::Host(acc)), Grad::Host(g)) => {
            lora_kernels::ops::elementwise::accumulate(acc, &g)?
        }
        (Some(Grad::Dev(a, acc)), Grad::Dev(_, g)) => a.accumulate(acc, &g)?,
        _ => return Err(mixed("accumulate")),
    }
    Ok(())
}

/// Runs `f` as a checkpointed segment (see [`Tape::with_checkpointing`]): forward without
/// recording, one node that keeps only `x`, and `f` again during backward.
pub(crate) fn checkpoint(tape: &Tape, x: &Tensor, f: Segment) -> Result<Tensor> {
    if !tape.record {
        return f(tape, x);
    }
    let draws = tape.draws.get();
    let sub = Tape::segment(tape.seed, draws, false);
    let y = f(&sub, x)?;
    tape.draws.set(sub.draws.get()); // later ops draw as if the segment had run on this tape
    let seed = tape.seed;
    tape.record(Op::Checkpoint { f, seed, draws }, vec![x.clone()], &y);
    Ok(y)
}

/// Gradients of the parameters, keyed by tensor.
#[derive(Debug, Default)]
pub struct Gradients {
    map: HashMap<u64, Grad>,
}

impl Gradients {
    /// The gradient of `t`, if it required one, the loss depends on it and it is on the host
    /// (a device gradient: [`Gradients::to_vec`], [`Gradients::scale`],
    /// [`Gradients::sum_squares`]).
    pub fn get(&self, t: &Tensor) -> Option<&[f32]> {
        match self.map.get(&t.id()) {
            Some(Grad::Host(v)) => Some(v.as_slice()),
            _ => None,
        }
    }
    /// A host copy of the gradient of `t`, wherever it is.
    pub fn to_vec(&self, t: &Tensor) -> Result<Option<Vec<f32>>> {
        match self.map.get(&t.id()) {
            Some(Grad::Host(v)) => Ok(Some(v.clone())),
            Some(Grad::Dev(a, b)) => Ok(Some(a.download(b)?)),
            None => Ok(None),
        }
    }
    /// Whether the gradient of `t` lives on a device.
    pub fn is_on_device(&self, t: &Tensor) -> bool {
        matches!(self.map.get(&t.id()), Some(Grad::Dev(..)))
    }
    /// Multiplies the gradient of `t` (if any) by `s`, where it lives.
    pub fn scale(&mut self, t: &Tensor, s: f32) -> Result<()> {
        match self.map.get_mut(&t.id()) {
            Some(Grad::Host(v)) => v.iter_mut().for_each(|x| *x *= s),
            Some(Grad::Dev(a, b)) => a.scale(b, s)?,
            None => {}
        }
        Ok(())
    }
    /// The sum of squares of the gradient of `t` in f64, if it has one.
    pub fn sum_squares(&self, t: &Tensor) -> Result<Option<f64>> {
        match self.map.get(&t.id()) {
            Some(Grad::Host(v)) => Ok(Some(v.iter().map(|&x| x as f64 * x as f64).sum())),
            Some(Grad::Dev(a, b)) => Ok(Some(a.sum_squares(b)?)),
            None => Ok(None),
        }
    }
    /// [`Gradients::sum_squares`] of each tensor, in order. Device gradients on one device are
    /// summed together, so the device is waited on once (not once per tensor).
    pub fn sum_squares_many(&self, ts: &[Tensor]) -> Result<Vec<Option<f64>>> {
        let mut out = vec![None; ts.len()];
        // Per distinct device, in first-seen order: (device, [(position, buffer)]).
        type Group<'a> = (&'a Arc<dyn Accel>, Vec<(usize, &'a DBuf)>);
        let mut groups: Vec<Group> = Vec::new();
        for (i, t) in ts.iter().enumerate() {
            match self.map.get(&t.id()) {
                Some(Grad::Host(_)) => out[i] = self.sum_squares(t)?,
                Some(Grad::Dev(a, b)) => match groups.iter_mut().find(|g| Arc::ptr_eq(g.0, a)) {
                    Some(g) => g.1.push((i, b)),
                    None => groups.push((a, vec![(i, b)])),
                },
                None => {}
            }
        }
        for (a, members) in groups {
            let bufs: Vec<&DBuf> = members.iter().map(|&(_, b)| b).collect();
            for (&(i, _), v) in members.iter().zip(a.sum_squares_many(&bufs)?) {
                out[i] = Some(v);
            }
        }
        Ok(out)
    }
    /// The gradient of a device tensor as a device buffer.
    pub(crate) fn dev_buf(&self, t: &Tensor) -> Option<&DBuf> {
        match self.map.get(&t.id()) {
            Some(Grad::Dev(_, b)) => Some(b),
            _ => None,
        }
    }
    /// Sets the gradient of `t` (e.g. after an all-reduce, or in tests); the length must match.
    pub fn set(&mut self, t: &Tensor, g: Vec<f32>) -> Result<()> {
        if g.len() != t.numel() {
            return Err(CoreError::DataLength {
                len: g.len(),
                shape: t.shape().to_vec(),
                needed: t.numel(),
            });
        }
        self.map.insert(t.id(), Grad::Host(g));
        Ok(())
    }
    /// Mutable access to the gradient of `t` on the host (clipping, scaling).
    pub fn get_mut(&mut self, t: &Tensor) -> Option<&mut [f32]> {
        match self.map.get_mut(&t.id()) {
            Some(Grad::Host(v)) => Some(v.as_mut_slice()),
            _ => None,
        }
    }
    /// Removes and returns the gradient of `t` (downloaded if it is on a device).
    pub fn take(&mut self, t: &Tensor) -> Result<Option<Vec<f32>>> {
        match self.map.remove(&t.id()) {
            None => Ok(None),
            Some(Grad::Host(v)) => Ok(Some(v)),
            Some(Grad::Dev(a, b)) => Ok(Some(a.download(&b)?)),
        }
    }
    /// Number of gradient buffers held (one per parameter reached by the loss).
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether no gradient was produced.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Adds `other` into `self` (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: Gradients) -> Result<()> {
        for (id, g) in other.map {
            accumulate_into(&mut self.map, id, g)?;
        }
        Ok(())
    }
}

/// The local gradient of every op: accumulates into `bufs[i]` for each input `i` that needs one.
fn backward_node(
    op: &Op,
    inputs: &[Input],
    dout: &[f32],
    bufs: &mut [Option<Vec<f32>>],
) -> Result<()> {
    // Values of the inputs backward reads (`Op::reads_input`); empty for the others. A linear
    // op's weight is read through `Tensor::weight` below (a half-stored one stays 16-bit).
    let is_linear = matches!(op, Op::Linear { .. });
    let guards: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if is_linear && i == 1 {
                return None;
            }
            t.values.as_ref().map(|v| v.data())
        })
        .collect();
    let data: Vec<&[f32]> = guards
        .iter()
        .map(|g| g.as_deref().map_or(&[][..], |s| &s[..]))
        .collect();
    // Split the buffers so several inputs' gradients can be borrowed mutably at once.
    let mut slots: Vec<Option<&mut [f32]>> = bufs.iter_mut().map(|b| b.as_deref_mut()).collect();
    let mut take = |i: usize| slots.get_mut(i).and_then(|s| s.take());
    match op {
        Op::Add => {
            for i in 0..2 {
                if let Some(g) = take(i) {
                    elementwise::accumulate(g, dout)?;
                }
            }
        }
        Op::Linear {
            layout,
            has_bias,
            dims,
            lora,
        } => {
            let bias_idx = has_bias.then_some(2);
            let a_idx = if *has_bias { 3 } else { 2 };
            let w = inputs[1].values.as_ref().map(|t| t.weight());
            let base = BaseLinear {
                weight: w.as_ref().map_or(WeightData::F32(&[]), |v| v.as_data()),
                layout: *layout,
                bias: bias_idx.map(|i| data[i]),
            };
            let lw = lora.as_ref().map(|l| LoraWeights {
                a: data[a_idx],
                b: data[a_idx + 1],
                rank: l.rank,
                scale: l.scale,
                dropout: l.dropout,
            });
            let grads = LinearGrads {
                dx: take(0),
                dw: take(1),
                dbias: bias_idx.and_then(&mut take),
                da: if lora.is_some() { take(a_idx) } else { None },
                db: if lora.is_some() {
                    take(a_idx + 1)
                } else {
                    None
                },
            };
            lora_linear_backward(
                grads,
                dout,
                data[0],
                &base,
                lw.as_ref(),
                lora.as_ref().map(|l| &l.u[..]),
                *dims,
            )?;
        }
        Op::Gelu => {
            if let Some(g) = take(0) {
                elementwise::gelu_backward(g, dout, data[0])?;
            }
        }
        Op::Silu => {
            if let Some(g) = take(0) {
                elementwise::silu_backward(g, dout, data[0])?;
            }
        }
        Op::SwiGlu => {
            let (dg, du) = (take(0), take(1));
            elementwise::swiglu_backward(dg, du, dout, data[0], data[1])?;
        }
        Op::LayerNorm { mean, rstd } => {
            let c = inputs[0].last_dim();
            let (dx, dg, db) = (take(0), take(1), take(2));
            norm::layernorm_backward(dx, dg, db, dout, data[0], data[1], mean, rstd, c)?;
        }
        Op::RmsNorm { rstd } => {
            let c = inputs[0].last_dim();
            let (dx, dg) = (take(0), take(1));
            norm::rmsnorm_backward(dx, dg, dout, data[0], data[1], rstd, c)?;
        }
        Op::Embedding { ids } => {
            if let Some(g) = take(0) {
                embedding::embedding_backward(g, dout, ids, inputs[0].last_dim())?;
            }
        }
        Op::Rope {
            cos,
            sin,
            positions,
            heads,
            head_dim,
        } => {
            if let Some(g) = take(0) {
                rope::rope_backward(g, dout, cos, sin, positions, *heads, *head_dim)?;
            }
        }
        Op::Attention { lse, dims, scale } => {
            // The kernel writes all three; an input that needs no gradient gets a scratch buffer.
            let mut scratch: [Vec<f32>; 3] = Default::default();
            let gs = [take(0), take(1), take(2)];
            for (i, g) in gs.iter().enumerate() {
                if g.is_none() {
                    scratch[i] = vec![0.0; inputs[i].numel()];
                }
            }
            let [s0, s1, s2] = &mut scratch;
            let [g0, g1, g2] = gs;
            let dq = g0.unwrap_or(&mut s0[..]);
            let dk = g1.unwrap_or(&mut s1[..]);
            let dv = g2.unwrap_or(&mut s2[..]);
            attention::attention_backward(
                dq, dk, dv, dout, lse, data[0], data[1], data[2], *dims, *scale,
            )?;
        }
        Op::Narrow { start, len } => {
            if let Some(g) = take(0) {
                slice::narrow_backward(g, dout, inputs[0].last_dim(), *start, *len)?;
            }
        }
        Op::CrossEntropy {
            lse,
            targets,
            count,
        } => {
            if let Some(g) = take(0) {
                let v = inputs[0].last_dim();
                cross_entropy::cross_entropy_backward(
                    g, dout[0], data[0], lse, targets, v, *count,
                )?;
            }
        }
        Op::Checkpoint { .. } | Op::Dev { .. } => {
            unreachable!("handled by Tape::backward_from")
        }
        Op::LinearCrossEntropy { dx, dw } => {
            for (i, saved) in [(0, dx), (1, dw)] {
                if let (Some(g), Some(s)) = (take(i), saved.as_ref()) {
                    let d = dout[0];
                    g.iter_mut().zip(s).for_each(|(g, s)| *g += d * s);
                }
            }
        }
    }
    Ok(())
}
