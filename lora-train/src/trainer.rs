//! One optimizer step of LoRA training on a causal LM: forward and backward over the
//! micro-batches of a gradient-accumulation step (the gradient is the mean of the micro-batch
//! gradients, as transformers' Trainer computes it), global-norm clipping, then the optimizer.
//! A non-finite loss or gradient stops the step before any weight changes.

use crate::batches::Batch;
use crate::optim::{clip_grad_norm, Optimizer, ParamGroup};
use crate::{Result, TrainError};
use lora_core::models::CausalLm;
use lora_core::{Gradients, Tape, Tensor};

/// The adapter tensors of `model` as optimizer groups: all A at `lr`, all B at
/// `lr * loraplus_ratio` (LoRA+; 1 = plain LoRA).
pub fn adapter_groups(model: &dyn CausalLm, loraplus_ratio: f32) -> Vec<ParamGroup> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (_, lin) in model.linears() {
        if let Some(l) = lin.lora() {
            a.push(l.lora_a.clone());
            b.push(l.lora_b.clone());
        }
    }
    vec![
        ParamGroup {
            params: a,
            lr_scale: 1.0,
        },
        ParamGroup {
            params: b,
            lr_scale: loraplus_ratio,
        },
    ]
}

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean of the micro-batch losses.
    pub loss: f32,
    /// Target tokens seen.
    pub tokens: usize,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
}

/// Runs one optimizer step over `micro` batches (`step` counts from 0; messages print it from 1,
/// as the progress lines do). `seed` drives dropout masks. With `checkpoint`,
/// the model's blocks are recomputed during backward (activation checkpointing, see
/// [`Tape::with_checkpointing`]): less memory, about a third more time, the same step.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &dyn CausalLm,
    opt: &mut dyn Optimizer,
    groups: &[ParamGroup],
    micro: &[Batch],
    lr: f32,
    max_grad_norm: Option<f32>,
    seed: u64,
    step: u64,
    checkpoint: bool,
) -> Result<StepStats> {
    let mut total: Option<Gradients> = None;
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    let params: Vec<Tensor> = groups
        .iter()
        .flat_map(|g| g.params.iter().cloned())
        .collect();
    // Each micro-batch's loss is the mean over its target tokens; the step's is the mean over
    // all of them, so micro-batch k weighs n_k / N (as transformers does with
    // `num_items_in_batch`): batch 4 and batch 2 x --grad-accum 2 take the same step.
    let all_tokens: usize = micro.iter().map(Batch::target_tokens).sum();
    // A model in bf16 keeps its products' outputs for backward in bf16 too, as autocast does.
    let bf16 = lora_core::models::precision(model) == lora_core::models::Precision::Bf16;
    for (k, b) in micro.iter().enumerate() {
        let tape = Tape::new(lora_kernels::rng::splitmix64(
            seed ^ (step << 16) ^ k as u64,
        ))
        .with_checkpointing(checkpoint)
        .with_bf16_activations(bf16);
        // The output head fused with the loss: no (B, T, V) logits.
        let loss = model.loss(&tape, &b.ids, &b.labels, b.batch, b.seq, true)?;
        let l = loss.scalar()?;
        if !l.is_finite() {
            return Err(TrainError::Data {
                path: "<training>".into(),
                reason: format!(
                    "loss is {l} at step {} (micro-batch {}); stopping before the update",
                    step + 1,
                    k + 1
                ),
            });
        }
        let n = b.target_tokens();
        loss_sum += l as f64 * n as f64;
        tokens += n;
        let mut g = tape.backward(&loss)?;
        if micro.len() > 1 {
            let w = n as f32 / all_tokens.max(1) as f32;
            for p in &params {
                g.scale(p, w)?;
            }
        }
        match total.as_mut() {
            None => total = Some(g),
            Some(t) => t.accumulate(g)?,
        }
    }
    let mut grads = total.ok_or_else(|| TrainError::Data {
        path: "<training>".into(),
        reason: "a step needs at least one batch".into(),
    })?;
    let norm = clip_grad_norm(&mut grads, &params, max_grad_norm.unwrap_or(f32::INFINITY))?;
    if !norm.is_finite() {
        return Err(TrainError::Data {
            path: "<training>".into(),
            reason: format!(
                "gradient norm is {norm} at step {}; stopping before the update",
                step + 1
            ),
        });
    }
    opt.step(groups, &grads, lr)?;
    Ok(StepStats {
        loss: (loss_sum / tokens.max(1) as f64) as f32,
        tokens,
        grad_norm: norm,
    })
}
