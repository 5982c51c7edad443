//! Architectures built from the differentiable ops: GPT-2 and the Llama family (Llama,
//! Mistral, Qwen2) for text; ViT and ResNet classifiers and the YOLOS detector for images. Module paths are the transformers ones, so a PEFT
//! `target_modules` list means the same thing here.
//!
//! Models are built from a weight loader (`FnMut(name, shape) -> Tensor`), which keeps this crate
//! free of file formats: `lora-io` supplies the loader for a Hugging Face directory.

pub mod clip_text;
pub mod conv;
pub mod generate;
pub mod gpt2;
pub mod linear;
pub mod llama;
pub mod resnet;
pub mod unet;
pub mod vae;
pub mod vision;
pub mod vit;
pub mod yolos;

use crate::autograd::Tape;
use crate::error::Result;
use crate::lora::WeightLayout;
use crate::ops;
use crate::tensor::Tensor;
pub use conv::Conv;
pub use linear::Linear;
pub use vision::{ClassifierHead, ImageClassifier, VisionModel};

/// A causal language model with named linear layers that adapters can be injected into.
pub trait CausalLm {
    /// Logits `(B, T, V)` for token ids `(B, T)` (row-major). With `adapters == false` every
    /// LoRA adapter is bypassed (the base model's output).
    fn forward(
        &self,
        tape: &Tape,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapters: bool,
    ) -> Result<Tensor>;
    /// transformers' causal-LM loss (see [`causal_lm_loss`]) of `ids` against `labels`. GPT-2
    /// and Llama fuse the output head with the loss ([`ops::linear_cross_entropy`]), so the
    /// `(B, T, V)` logits are never materialised; other models fall back to `forward` +
    /// [`causal_lm_loss`], which computes the same value.
    fn loss(
        &self,
        tape: &Tape,
        ids: &[u32],
        labels: &[i64],
        batch: usize,
        seq: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let logits = self.forward(tape, ids, batch, seq, adapters)?;
        causal_lm_loss(tape, &logits, labels, batch, seq)
    }
    /// Logits `(1, n, V)` for `n` new tokens of one sequence, attending to (and extending) the
    /// keys and values in `cache`: each new token costs one position, not the whole prefix.
    /// Inference only (no tape).
    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache, adapters: bool) -> Result<Tensor>;
    /// Number of transformer blocks (the size of a [`KvCache`]).
    fn num_layers(&self) -> usize;
    /// Every linear layer with its module path, in model order.
    fn linears(&self) -> Vec<(String, &Linear)>;
    /// The same, mutable (for injection and loading adapter weights).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Module path of the output head, which `all-linear` never targets (PEFT's rule).
    fn output_head(&self) -> &str;
    /// The token embedding the output head is tied to (`None`: the head is its own layer,
    /// listed in [`CausalLm::linears`] under [`CausalLm::output_head`]).
    fn tied_embedding(&self) -> Option<&Tensor>;
    /// Number of base (pretrained) parameters, counting tied tensors once.
    fn base_params(&self) -> usize;
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position embedding / RoPE tables cover.
    fn max_positions(&self) -> usize;
    /// The tensors outside [`CausalLm::linears`] (embeddings, norm gains): with the linears'
    /// tensors, every tensor of the model.
    fn other_tensors(&self) -> Vec<&Tensor>;
    /// Moves every tensor of the model (frozen weights, adapters) to `device` in place (see
    /// [`Tensor::to_device`]); training and evaluation then run there. Incremental decoding
    /// ([`CausalLm::forward_cached`]) runs on the host only.
    fn to_device(&self, device: crate::Device) -> Result<()> {
        for (_, l) in self.linears() {
            for t in l.tensors() {
                t.to_device(device)?;
            }
        }
        for t in self.other_tensors() {
            t.to_device(device)?;
        }
        Ok(())
    }
}

/// Keys and values of the tokens seen so far, per layer, for one sequence.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>, // per layer: k (T, Hkv * D), v (T, Hkv * D)
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![(Vec::new(), Vec::new()); layers],
            len: 0,
        }
    }
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a forward pass attends: over whole sequences (training, recorded on the tape) or
/// incrementally against a cache (generation).
pub(crate) enum AttnMode<'a> {
    Full,
    Cached(&'a mut KvCache),
}

impl AttnMode<'_> {
    /// Position of each row: `0..seq` per sequence, or continuing after the cache.
    pub(crate) fn positions(&self, batch: usize, seq: usize) -> Vec<u32> {
        let p0 = match self {
            AttnMode::Full => 0,
            AttnMode::Cached(c) => c.len as u32,
        };
        (0..batch).flat_map(|_| p0..p0 + seq as u32).collect()
    }

    /// Causal attention of `q` over `k`, `v` (and the cache), for block `layer`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &mut self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        hq: usize,
        hkv: usize,
        layer: usize,
    ) -> Result<Tensor> {
        match self {
            AttnMode::Full => ops::attention(tape, q, k, v, hq, hkv),
            AttnMode::Cached(cache) => {
                let (kc, vc) = &mut cache.layers[layer];
                kc.extend_from_slice(&k.data());
                vc.extend_from_slice(&v.data());
                let n = q.rows();
                let t = cache.len + n;
                let hd = q.last_dim() / hq;
                let mut out = vec![0.0; q.numel()];
                lora_kernels::ops::attention::attention_decode(
                    &mut out,
                    &q.data(),
                    kc,
                    vc,
                    n,
                    t,
                    hq,
                    hkv,
                    hd,
                    1.0 / (hd as f32).sqrt(),
                )?;
                Tensor::new(out, q.shape())
            }
        }
    }

    /// Marks `n` new tokens as cached (after the last layer).
    pub(crate) fn advance(&mut self, n: usize) {
        if let AttnMode::Cached(c) = self {
            c.len += n;
        }
    }
}

/// Base parameters of a model's linear layers (weights and biases).
pub(crate) fn linear_base_params(model: &dyn CausalLm) -> usize {
    model
        .linears()
        .iter()
        .map(|(_, l)| {
            let (w, _, b) = l.base();
            w.numel() + b.map_or(0, |b| b.numel())
        })
        .sum()
}

/// The precision of a model's matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// PyTorch autocast's bf16: the frozen linear layers' products take bf16 operands (the
    /// weight packed once, [`Tensor::pack_bf16`]; the input rounded per call) and accumulate in
    /// f32; adapters, their optimizer state, norms, softmax, the loss and every reduction stay
    /// f32. The output head is bf16 too (a tied one through a packing kept beside the
    /// embedding's f32 values). In training ([`crate::Tape::with_bf16_activations`]) the
    /// products' outputs kept for backward are bf16 and attention reads its q, k, v rounded
    /// to bf16 (its products then multiply bf16 values exactly and accumulate in f32, its
    /// probabilities stay f32: more exact than autocast there); inference tapes (eval,
    /// generation) read q, k, v in f32.
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("precision must be f32 or bf16, got `{other}`")),
        }
    }
}

/// Sets the precision of `model`'s products: for [`Precision::Bf16`], packs the base weight of
/// every linear layer, the output head included (frozen weights only; a trained base weight is
/// an error), and returns how many were packed. A head tied to the token embedding keeps its
/// f32 values for the embedding lookup and gets a bf16 packing beside them
/// ([`Tensor::pack_bf16_beside`]: the memory of a second copy at half size), as autocast runs
/// a tied `lm_head` in bf16 and the lookup in f32 (its input gradient multiplies the f32
/// values, so that packing needs no backward layout). [`Precision::F32`] changes nothing (a
/// model is f32 as loaded). Call it after the model is on its device (CPU only) and before
/// training: [`crate::Tape::with_bf16_activations`] is the activations' half of it, which
/// `lora_train::train_step` turns on for a model in bf16.
pub fn set_precision(model: &dyn CausalLm, precision: Precision) -> Result<usize> {
    if precision == Precision::F32 {
        return Ok(0);
    }
    let mut n = 0;
    for (_, lin) in model.linears() {
        let (w, layout, _) = lin.base();
        w.pack_bf16(layout)?;
        n += 1;
    }
    if let Some(e) = model.tied_embedding() {
        e.pack_bf16_beside(WeightLayout::OutIn)?;
        n += 1;
    }
    // The replaced f32 weights' pages go back to the system (glibc would keep them).
    lora_kernels::accel::release_free_memory();
    Ok(n)
}

/// The precision [`set_precision`] gave `model`: bf16 when its linear layers' weights are
/// packed for the bf16 products.
pub fn precision(model: &dyn CausalLm) -> Precision {
    let packed = model
        .linears()
        .iter()
        .any(|(_, l)| l.base().0.is_packed_bf16());
    if packed {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// Trainable (adapter) and total parameter counts.
pub fn param_counts(model: &dyn CausalLm) -> (usize, usize) {
    let trainable: usize = model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora())
        .map(|l| l.trainable_params())
        .sum();
    (trainable, model.base_params() + trainable)
}

/// The line PEFT's `print_trainable_parameters` prints.
pub fn trainable_summary(model: &dyn CausalLm) -> String {
    let (t, all) = param_counts(model);
    let pct = if all == 0 {
        0.0
    } else {
        100.0 * t as f64 / all as f64
    };
    format!("trainable params: {t} || all params: {all} || trainable%: {pct:.4}")
}

/// transformers' causal-LM loss: position `t` predicts token `t + 1`; the last position of each
/// sequence has no target. Mean over the `B * (T - 1)` predicted tokens. `labels` may mark
/// positions to ignore with a negative value (it defaults to `ids`).
pub fn causal_lm_loss(
    tape: &Tape,
    logits: &Tensor,
    labels: &[i64],
    batch: usize,
    seq: usize,
) -> Result<Tensor> {
    ops::cross_entropy(tape, logits, &shifted_targets(labels, batch, seq))
}

/// Per-position targets of the causal-LM loss: position `t` predicts label `t + 1`; the last
/// position of each sequence and negative labels are ignored (`-100`).
pub fn shifted_targets(labels: &[i64], batch: usize, seq: usize) -> Vec<i32> {
    let mut targets = vec![-100i32; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let l = labels[b * seq + t + 1];
            targets[b * seq + t] = if l < 0 { -100 } else { l as i32 };
        }
    }
    targets
}

/// What the last stage of a model computes.
#[derive(Clone, Copy)]
pub(crate) enum Head<'a> {
    /// The logits.
    Logits,
    /// The mean loss against these per-position targets, fused with the output head.
    Loss(&'a [i32]),
}

impl Head<'_> {
    /// The output head on the final hidden states `x`: tied to the embedding `embed` (`(V, C)`)
    /// when `lm_head` is `None`, else that layer. A plain frozen head fuses with the loss; an
    /// adapted (or biased, or transposed) one takes the unfused path.
    pub(crate) fn apply(
        self,
        tape: &Tape,
        x: &Tensor,
        embed: &Tensor,
        lm_head: Option<&Linear>,
        adapters: bool,
    ) -> Result<Tensor> {
        match (lm_head, self) {
            (None, Head::Logits) => ops::linear(tape, x, embed, WeightLayout::OutIn, None, None),
            (None, Head::Loss(t)) => ops::linear_cross_entropy(tape, x, embed, t),
            (
                Some(Linear::Frozen {
                    weight,
                    layout: WeightLayout::OutIn,
                    bias: None,
                }),
                Head::Loss(t),
            ) => ops::linear_cross_entropy(tape, x, weight, t),
            (Some(h), Head::Logits) => h.forward(tape, x, adapters),
            (Some(h), Head::Loss(t)) => ops::cross_entropy(tape, &h.forward(tape, x, adapters)?, t),
        }
    }
}
