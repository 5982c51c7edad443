//! Transformer architectures built from the differentiable ops: GPT-2 and the Llama family
//! (Llama, Mistral, Qwen2). Module paths are the transformers ones, so a PEFT
//! `target_modules` list means the same thing here.
//!
//! Models are built from a weight loader (`FnMut(name, shape) -> Tensor`), which keeps this crate
//! free of file formats: `lora-io` supplies the loader for a Hugging Face directory.

pub mod gpt2;
pub mod linear;
pub mod llama;

use crate::autograd::Tape;
use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;
pub use linear::Linear;

/// A causal language model with named linear layers that adapters can be injected into.
pub trait CausalLm {
    /// Logits `(B, T, V)` for token ids `(B, T)` (row-major). With `adapters == false` every
    /// LoRA adapter is bypassed (the base model's output).
    fn forward(&self, tape: &Tape, ids: &[u32], batch: usize, seq: usize, adapters: bool) -> Result<Tensor>;
    /// Every linear layer with its module path, in model order.
    fn linears(&self) -> Vec<(String, &Linear)>;
    /// The same, mutable (for injection and loading adapter weights).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Module path of the output head, which `all-linear` never targets (PEFT's rule).
    fn output_head(&self) -> &str;
    /// Number of base (pretrained) parameters, counting tied tensors once.
    fn base_params(&self) -> usize;
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position embedding / RoPE tables cover.
    fn max_positions(&self) -> usize;
}

/// Trainable (adapter) and total parameter counts.
pub fn param_counts(model: &dyn CausalLm) -> (usize, usize) {
    let trainable: usize = model.linears().iter().filter_map(|(_, l)| l.lora()).map(|l| l.trainable_params()).sum();
    (trainable, model.base_params() + trainable)
}

/// The line PEFT's `print_trainable_parameters` prints.
pub fn trainable_summary(model: &dyn CausalLm) -> String {
    let (t, all) = param_counts(model);
    let pct = if all == 0 { 0.0 } else { 100.0 * t as f64 / all as f64 };
    format!("trainable params: {t} || all params: {all} || trainable%: {pct:.4}")
}

/// transformers' causal-LM loss: position `t` predicts token `t + 1`; the last position of each
/// sequence has no target. Mean over the `B * (T - 1)` predicted tokens. `labels` may mark
/// positions to ignore with a negative value (it defaults to `ids`).
pub fn causal_lm_loss(tape: &Tape, logits: &Tensor, labels: &[i64], batch: usize, seq: usize) -> Result<Tensor> {
    let mut targets = vec![-100i32; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let l = labels[b * seq + t + 1];
            targets[b * seq + t] = if l < 0 { -100 } else { l as i32 };
        }
    }
    ops::cross_entropy(tape, logits, &targets)
}
