//! The tape: ops append a `Node` as they run; [`Tape::backward`] walks the nodes in reverse and
//! hands each its output's gradient and its inputs' gradient buffers.
//!
//! What an op records and how its backward runs live with the op, one file per op in
//! `ops/` (its [`OpNode`]); this file keeps the tape, the gradients (buffers of the backend the
//! op ran on: the CPU or a CUDA device) and the one dispatch. Checkpointed segments are the one
//! node kind of its own.
//!
//! Frozen tensors (`requires_grad == false`) never get a gradient buffer, and the linear op is
//! told which of its inputs need one, so a frozen weight also costs no weight-gradient GEMM.

use crate::error::{CoreError, Result};
use crate::ops::{OpNode, Slots};
use crate::tensor::Tensor;
use lora_kernels::accel::{Accel, DBuf};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// A recorded op, or a checkpointed segment.
pub(crate) enum Op {
    /// An op and the backend it ran on.
    Node {
        op: Box<dyn OpNode>,
        accel: Arc<dyn Accel>,
    },
    /// inputs: [x]. A segment run without recording ([`crate::ops::checkpoint`]); backward runs
    /// `f` again on a recording tape that draws dropout seeds from `seed` starting at draw
    /// `draws` (the masks of the first run, which are also those of an uncheckpointed run) and
    /// backpropagates through that.
    Checkpoint { f: Segment, seed: u64, draws: u64 },
}

/// A checkpointed segment of the forward pass: `f(tape, x) -> y`.
pub type Segment = Rc<dyn Fn(&Tape, &Tensor) -> Result<Tensor>>;

impl Op {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Node { op, .. } => op.name(),
            Op::Checkpoint { .. } => "checkpoint",
        }
    }

    /// Whether backward reads the values of input `i` ([`OpNode::reads_input`]).
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool {
        match self {
            Op::Node { op, .. } => op.reads_input(i, inputs),
            Op::Checkpoint { .. } => true,
        }
    }

    /// Whether backward may read input `i` rounded to bf16 ([`OpNode::saves_bf16`]).
    fn saves_bf16(&self, i: usize) -> bool {
        match self {
            Op::Node { op, .. } => op.saves_bf16(i),
            Op::Checkpoint { .. } => false,
        }
    }

    /// Whether backward reads input `i` through its tensor ([`OpNode::reads_stored`]); a
    /// checkpointed segment reads its input as a tensor.
    fn reads_stored(&self, i: usize) -> bool {
        match self {
            Op::Node { op, .. } => op.reads_stored(i),
            Op::Checkpoint { .. } => true,
        }
    }

    /// Elements (f32 values or 4-byte ids) the op saved for its own backward.
    fn saved_elems(&self) -> usize {
        match self {
            Op::Node { op, .. } => op.saved_elems(),
            Op::Checkpoint { .. } => 0,
        }
    }
}

/// An input as the tape keeps it: always its identity, its values only if backward reads them:
/// the tensor itself, or (for a norm's output, see [`Remat`]) the recipe that recomputes it.
pub(crate) struct Input {
    pub(crate) id: u64,
    pub(crate) shape: Vec<usize>,
    pub(crate) requires_grad: bool,
    pub(crate) values: Option<Tensor>,
    remat: Option<Rc<Remat>>,
    /// `values` is a bf16-rounded copy ([`Tape::with_bf16_activations`]), widened for each
    /// read.
    low: bool,
}

/// Recomputes an op's output from what the tape keeps anyway (rematerialization): a norm's
/// output from its input, which the norm's own backward holds, and its parameters. A node whose
/// backward reads a norm's output (a LoRA linear's `x`, for `dA`) keeps this recipe instead of
/// the output, so the output is freed after the forward pass: one activation of the
/// hidden size per norm, at the price of one norm forward in backward. The recipe runs the
/// same deterministic kernel on the same values, so what backward reads is bit for bit what
/// the forward computed (tested). The value is recomputed once per backward and shared by
/// every node that reads it.
pub(crate) struct Remat {
    compute: RematFn,
    /// Recording nodes whose backward has not yet read the value.
    readers: Cell<usize>,
    cache: RefCell<Option<Rc<DBuf>>>,
}

/// How a [`Remat`] recomputes its value.
pub(crate) type RematFn = Box<dyn Fn() -> Result<DBuf>>;

impl Remat {
    /// The value, recomputed by the first reader, dropped by the recipe after the last.
    fn take(&self) -> Result<Rc<DBuf>> {
        let cached = self.cache.borrow().clone();
        let v = match cached {
            Some(v) => v,
            None => Rc::new((self.compute)()?),
        };
        let left = self.readers.get().saturating_sub(1);
        self.readers.set(left);
        *self.cache.borrow_mut() = (left > 0).then(|| v.clone());
        Ok(v)
    }
}

impl Input {
    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(crate) fn last_dim(&self) -> usize {
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
    /// Recipes for recorded outputs that are cheaper to recompute than to keep ([`Remat`]),
    /// by output id.
    remats: RefCell<HashMap<u64, Rc<Remat>>>,
    /// Keep the activations autocast holds in bf16 rounded to bf16 ([`Tape::with_bf16_activations`]).
    bf16: bool,
    /// Ids of the recorded nodes' outputs (the activations).
    outputs: RefCell<std::collections::HashSet<u64>>,
    /// The bf16 copies made so far, by the original's id, shared by every node that reads it.
    rounded: RefCell<HashMap<u64, Tensor>>,
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
            remats: RefCell::new(HashMap::new()),
            bf16: false,
            outputs: RefCell::new(std::collections::HashSet::new()),
            rounded: RefCell::new(HashMap::new()),
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
            remats: RefCell::new(HashMap::new()),
            bf16: false,
            outputs: RefCell::new(std::collections::HashSet::new()),
            rounded: RefCell::new(HashMap::new()),
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

    /// Activations kept in bf16 for backward (`--precision bf16`): an op's input that autocast
    /// would hold in bf16, being the output of a product (what GELU, SiLU, SwiGLU and attention
    /// read: [`OpNode::saves_bf16`]), is kept for backward as a copy rounded to bf16
    /// (nearest-even), half the memory, and widened when backward reads it; the f32 values
    /// are freed once the forward pass is done with them. The forward pass is f32 as before,
    /// except attention, which reads its q, k, v rounded (autocast's attention on bf16
    /// inputs; its backward needs the forward's softmax of the values it keeps); elsewhere
    /// backward reads values within one bf16 rounding (2^-9 relative) of what the forward
    /// read. Only host f32 activations are rounded; parameters, frozen
    /// weights and what norms and linear layers keep stay as they are.
    pub fn with_bf16_activations(mut self, on: bool) -> Self {
        self.bf16 = on && self.training;
        self
    }

    /// Whether this tape keeps activations in bf16 ([`Tape::with_bf16_activations`]).
    pub fn bf16_activations(&self) -> bool {
        self.bf16
    }

    /// Whether models should checkpoint their blocks on this tape.
    pub fn checkpointing(&self) -> bool {
        self.checkpoint
    }

    /// A training tape for a checkpointed segment: draws continue from `draws` of `seed`;
    /// activations are kept as this tape keeps them.
    fn segment(&self, seed: u64, draws: u64, record: bool) -> Self {
        Self {
            record,
            draws: Cell::new(draws),
            bf16: self.bf16,
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
    /// frozen weights are not counted; outputs no backward reads are not held at all, nor
    /// those a node recomputes ([`Remat`]: a norm's output).
    pub fn saved_elems(&self) -> usize {
        let nodes = self.nodes.borrow();
        let outputs: std::collections::HashSet<u64> = nodes.iter().map(|n| n.output_id).collect();
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for n in nodes.iter() {
            total += n.op.saved_elems();
            for i in &n.inputs {
                if i.values.is_some() && outputs.contains(&i.id) && seen.insert(i.id) {
                    // A bf16 copy holds two values per 4 bytes.
                    total += if i.low {
                        i.numel().div_ceil(2)
                    } else {
                        i.numel()
                    };
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

    /// Whether this tape records nodes (training, outside a checkpointed segment's first run).
    pub(crate) fn records(&self) -> bool {
        self.record
    }

    /// Lets later nodes that read `output` keep `compute`, which recomputes it from `sources`,
    /// instead of its values ([`Remat`]). Only for an output whose own node was recorded and
    /// keeps `sources`, so that the recipe holds no memory of its own; not when a source is
    /// itself recomputed (a norm of a norm: the recipe would keep that source alive anyway).
    pub(crate) fn rematerializable(&self, output: &Tensor, sources: &[&Tensor], compute: RematFn) {
        let nested = {
            let remats = self.remats.borrow();
            sources.iter().any(|s| remats.contains_key(&s.id()))
        };
        if self.record && output.requires_grad() && !nested {
            let r = Remat {
                compute,
                readers: Cell::new(0),
                cache: RefCell::new(None),
            };
            self.remats.borrow_mut().insert(output.id(), Rc::new(r));
        }
    }

    /// Appends a node when training and the output needs a gradient.
    pub(crate) fn record(&self, op: Op, inputs: Vec<Tensor>, output: &Tensor) {
        if self.record && output.requires_grad() {
            let remats = self.remats.borrow();
            let kept = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let reads = op.reads_input(i, &inputs);
                    let remat = reads
                        .then(|| remats.get(&t.id()))
                        .flatten()
                        .filter(|_| !op.reads_stored(i))
                        .cloned();
                    if let Some(r) = &remat {
                        r.readers.set(r.readers.get() + 1);
                    }
                    let keep = reads && remat.is_none();
                    let rounded = (keep && op.saves_bf16(i))
                        .then(|| self.rounded_copy(t))
                        .flatten();
                    Input {
                        id: t.id(),
                        shape: t.shape().to_vec(),
                        requires_grad: t.requires_grad(),
                        low: rounded.is_some(),
                        values: rounded.or_else(|| keep.then(|| t.clone())),
                        remat,
                    }
                })
                .collect();
            drop(remats);
            self.outputs.borrow_mut().insert(output.id());
            self.nodes.borrow_mut().push(Node {
                op,
                inputs: kept,
                output_id: output.id(),
            });
        }
    }

    /// The bf16 copy of an activation `t` to keep instead of its values, when this tape keeps
    /// activations in bf16 and `t` is the output of a recorded node (never a parameter or an
    /// input the caller holds, nor one a [`Remat`] recomputes); made once per activation. On a
    /// checkpointed segment's first, unrecorded run, every operand that needs a gradient is
    /// taken for an activation.
    pub(crate) fn rounded_copy(&self, t: &Tensor) -> Option<Tensor> {
        if !self.bf16 {
            return None;
        }
        if !self.record {
            // A checkpointed segment's first run (nothing recorded): round what its recording
            // rerun will, the operands that need a gradient (those the rerun records as
            // outputs), so the forward and the rerun compute the same values; nothing is kept.
            return t.requires_grad().then(|| t.rounded_bf16_copy()).flatten();
        }
        // Not an activation, or one a node recomputes ([`Remat`]) rather than keeps.
        if !self.outputs.borrow().contains(&t.id()) || self.remats.borrow().contains_key(&t.id()) {
            return None;
        }
        if let Some(r) = self.rounded.borrow().get(&t.id()) {
            return Some(r.clone());
        }
        let r = t.rounded_bf16_copy()?;
        self.rounded.borrow_mut().insert(t.id(), r.clone());
        Some(r)
    }

    /// Reverse pass from a scalar `loss`. Returns the gradients of the leaf tensors that require
    /// them (parameters); intermediate gradients are freed as soon as they are consumed. The tape
    /// is emptied (its saved activations are released).
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(CoreError::NotScalar(loss.shape().to_vec()));
        }
        let on = loss.store().on.clone();
        let seed = Grad {
            buf: on.upload(&[1.0])?,
            on,
        };
        self.backward_from(loss, seed)
    }

    /// Reverse pass from any `output` with the upstream gradient `dout` (one value per element
    /// of `output`): the vector-Jacobian product, for losses computed outside the tape (and
    /// tests that compare with `torch.autograd.backward(y, r)`). Same results and tape
    /// handling as [`Tape::backward`].
    pub fn backward_with(&self, output: &Tensor, dout: &[f32]) -> Result<Gradients> {
        if dout.len() != output.numel() {
            return Err(CoreError::DataLength {
                len: dout.len(),
                shape: output.shape().to_vec(),
                needed: output.numel(),
            });
        }
        let on = output.store().on.clone();
        let seed = Grad {
            buf: on.upload(dout)?,
            on,
        };
        self.backward_from(output, seed)
    }

    /// Reverse pass from `output` with upstream gradient `dout` (same length and device).
    fn backward_from(&self, output: &Tensor, dout: Grad) -> Result<Gradients> {
        let nodes = std::mem::take(&mut *self.nodes.borrow_mut());
        self.remats.borrow_mut().clear(); // the nodes hold the recipes they read
        self.rounded.borrow_mut().clear(); // and the bf16 copies they read
        self.outputs.borrow_mut().clear();
        let mut grads: HashMap<u64, Grad> = HashMap::new();
        if output.requires_grad() {
            grads.insert(output.id(), dout);
        }
        for node in nodes.into_iter().rev() {
            let Some(dout) = grads.remove(&node.output_id) else {
                continue;
            };
            match &node.op {
                Op::Checkpoint { f, seed, draws } => {
                    let x = &node.inputs[0];
                    let xv = x.values.as_ref().expect("checkpoint keeps its input");
                    // The segment again, recorded this time, from a copy of x that is a leaf.
                    let sub = self.segment(*seed, *draws, true);
                    let x2 = {
                        let g = xv.read()?;
                        let copy = g.on.copy(g.f32()?)?;
                        Tensor::from_buf(&g.on, g.device, copy, &x.shape, x.requires_grad)?
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
                Op::Node { op, accel } => {
                    if !Arc::ptr_eq(&dout.on, accel) {
                        return Err(mixed(op.name()));
                    }
                    let mut bufs = input_grads(&node, &mut grads, accel)?;
                    // Guards on the inputs backward reads (a 16-bit one widened once); a missing
                    // one, or one read through its tensor (`reads_stored`), reads as empty.
                    let guards: Vec<_> = node
                        .inputs
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            let stored = op.reads_stored(i);
                            // A bf16 copy is widened for this read only.
                            let transient = op.reads_transient(i) || t.low;
                            t.values
                                .as_ref()
                                .filter(|_| !stored)
                                .map(|v| {
                                    if transient {
                                        v.read_transient()
                                    } else {
                                        crate::ops::read(v)
                                    }
                                })
                                .transpose()
                        })
                        .collect::<Result<_>>()?;
                    let recomputed: Vec<Option<Rc<DBuf>>> = node
                        .inputs
                        .iter()
                        .map(|t| t.remat.as_ref().map(|r| r.take()).transpose())
                        .collect::<Result<_>>()?;
                    let empty = DBuf::Host(Vec::new());
                    let data: Vec<&DBuf> = guards
                        .iter()
                        .zip(&recomputed)
                        .map(|(g, r)| match (g, r) {
                            (_, Some(r)) => Ok(&**r),
                            (Some(g), None) => crate::ops::f32_of(g),
                            (None, None) => Ok(&empty),
                        })
                        .collect::<Result<_>>()?;
                    let mut slots = Slots(bufs.iter_mut().map(|b| b.as_mut()).collect());
                    op.backward(&**accel, &node.inputs, &data, &dout.buf, &mut slots)?;
                    drop(data);
                    drop(guards);
                    drop(recomputed);
                    for (t, buf) in node.inputs.iter().zip(bufs) {
                        if let Some(buf) = buf {
                            let on = accel.clone();
                            accumulate_into(&mut grads, t.id, Grad { on, buf })?;
                        }
                    }
                }
            }
        }
        Ok(Gradients { map: grads })
    }
}

/// One gradient buffer per input of `node` that needs one: the gradient accumulated so far at
/// an input's first occurrence (it must be on `on`), else zeros; `None` for inputs that need
/// none.
fn input_grads(
    node: &Node,
    grads: &mut HashMap<u64, Grad>,
    on: &Arc<dyn Accel>,
) -> Result<Vec<Option<DBuf>>> {
    let mut bufs = Vec::with_capacity(node.inputs.len());
    for (i, t) in node.inputs.iter().enumerate() {
        if !t.requires_grad {
            bufs.push(None);
            continue;
        }
        let dup = node.inputs[..i].iter().any(|p| p.id == t.id);
        let buf = match (!dup).then(|| grads.remove(&t.id)).flatten() {
            Some(g) if Arc::ptr_eq(&g.on, on) => g.buf,
            Some(_) => return Err(mixed(node.op.name())),
            None => on.zeros(t.numel())?,
        };
        bufs.push(Some(buf));
    }
    Ok(bufs)
}

fn mixed(op: &str) -> CoreError {
    CoreError::MixedGradients(format!("backward of `{op}`"))
}

/// A gradient buffer and the backend it lives on.
pub(crate) struct Grad {
    pub(crate) on: Arc<dyn Accel>,
    pub(crate) buf: DBuf,
}

impl std::fmt::Debug for Grad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grad({}, {} values)", self.on.describe(), self.buf.len())
    }
}

fn accumulate_into(grads: &mut HashMap<u64, Grad>, id: u64, g: Grad) -> Result<()> {
    match grads.get_mut(&id) {
        None => {
            grads.insert(id, g);
        }
        Some(acc) if Arc::ptr_eq(&acc.on, &g.on) => acc.on.accumulate(&mut acc.buf, &g.buf)?,
        Some(_) => return Err(mixed("accumulate")),
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
    let sub = tape.segment(tape.seed, draws, false);
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
    /// The gradient of `t`, if it required one, the loss depends on it and it is in host memory
    /// (a device gradient: [`Gradients::to_vec`], [`Gradients::scale`],
    /// [`Gradients::sum_squares`]).
    pub fn get(&self, t: &Tensor) -> Option<&[f32]> {
        self.map.get(&t.id()).and_then(|g| g.buf.host())
    }
    /// A host copy of the gradient of `t`, wherever it is.
    pub fn to_vec(&self, t: &Tensor) -> Result<Option<Vec<f32>>> {
        match self.map.get(&t.id()) {
            Some(g) => Ok(Some(g.on.download(&g.buf)?)),
            None => Ok(None),
        }
    }
    /// Whether the gradient of `t` lives on a device (not in host memory).
    pub fn is_on_device(&self, t: &Tensor) -> bool {
        matches!(self.map.get(&t.id()), Some(g) if g.buf.host().is_none())
    }
    /// Multiplies the gradient of `t` (if any) by `s`, where it lives.
    pub fn scale(&mut self, t: &Tensor, s: f32) -> Result<()> {
        if let Some(g) = self.map.get_mut(&t.id()) {
            g.on.scale(&mut g.buf, s)?;
        }
        Ok(())
    }
    /// The sum of squares of the gradient of `t` in f64, if it has one.
    pub fn sum_squares(&self, t: &Tensor) -> Result<Option<f64>> {
        match self.map.get(&t.id()) {
            Some(g) => Ok(Some(g.on.sum_squares(&g.buf)?)),
            None => Ok(None),
        }
    }
    /// [`Gradients::sum_squares`] of each tensor, in order. Gradients on one device are summed
    /// together, so a GPU is waited on once (not once per tensor).
    pub fn sum_squares_many(&self, ts: &[Tensor]) -> Result<Vec<Option<f64>>> {
        let mut out = vec![None; ts.len()];
        // Per distinct backend, in first-seen order: (backend, [(position, buffer)]).
        type Group<'a> = (&'a Arc<dyn Accel>, Vec<(usize, &'a DBuf)>);
        let mut groups: Vec<Group> = Vec::new();
        for (i, t) in ts.iter().enumerate() {
            if let Some(g) = self.map.get(&t.id()) {
                match groups.iter_mut().find(|x| Arc::ptr_eq(x.0, &g.on)) {
                    Some(x) => x.1.push((i, &g.buf)),
                    None => groups.push((&g.on, vec![(i, &g.buf)])),
                }
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
    /// The gradient of `t` as a buffer of its backend.
    pub(crate) fn buf(&self, t: &Tensor) -> Option<&Grad> {
        self.map.get(&t.id())
    }
    /// Sets the gradient of `t` (e.g. after an all-reduce, or in tests), where `t` lives; the
    /// length must match.
    pub fn set(&mut self, t: &Tensor, g: Vec<f32>) -> Result<()> {
        if g.len() != t.numel() {
            return Err(CoreError::DataLength {
                len: g.len(),
                shape: t.shape().to_vec(),
                needed: t.numel(),
            });
        }
        let on = t.store().on.clone();
        let buf = match t.device() {
            crate::Device::Cpu => DBuf::Host(g),
            _ => on.upload(&g)?,
        };
        self.map.insert(t.id(), Grad { on, buf });
        Ok(())
    }
    /// Mutable access to the gradient of `t` in host memory (clipping, scaling).
    pub fn get_mut(&mut self, t: &Tensor) -> Option<&mut [f32]> {
        self.map.get_mut(&t.id()).and_then(|g| g.buf.host_mut())
    }
    /// Removes and returns the gradient of `t` (downloaded if it is on a device).
    pub fn take(&mut self, t: &Tensor) -> Result<Option<Vec<f32>>> {
        match self.map.remove(&t.id()) {
            None => Ok(None),
            Some(Grad {
                buf: DBuf::Host(v), ..
            }) => Ok(Some(v)),
            Some(g) => Ok(Some(g.on.download(&g.buf)?)),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipe runs once however many nodes read it, and lets its value go after the last.
    #[test]
    fn a_remat_computes_once_and_drops_after_its_last_reader() {
        let calls = Rc::new(Cell::new(0));
        let c = calls.clone();
        let r = Remat {
            compute: Box::new(move || {
                c.set(c.get() + 1);
                Ok(DBuf::Host(vec![1.0, 2.0]))
            }),
            readers: Cell::new(3),
            cache: RefCell::new(None),
        };
        let first = r.take().unwrap();
        assert!(r.cache.borrow().is_some());
        let second = r.take().unwrap();
        let third = r.take().unwrap();
        assert_eq!(calls.get(), 1);
        assert!(Rc::ptr_eq(&first, &third) && Rc::ptr_eq(&second, &third));
        assert!(r.cache.borrow().is_none(), "kept after the last reader");
        drop((first, second));
        assert_eq!(Rc::strong_count(&third), 1);
    }
}
