//! CLIP's text encoder (`CLIPTextModel`, Stable Diffusion's `text_encoder/`): token and
//! position embeddings, pre-LayerNorm blocks with causal self-attention and (usually)
//! `quick_gelu`, a final LayerNorm. Parameter names as transformers saves them
//! (`text_model.encoder.layers.N.self_attn.q_proj`, ...). The pipelines condition on the final
//! LayerNorm of the last layer's output, or with "clip skip" n of the output n layers earlier
//! (diffusers' `clip_skip`).

use super::vit::{Activation, Block};
use super::Linear;
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::ops;
use crate::tensor::Tensor;

/// The fields of `text_encoder/config.json` the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `max_position_embeddings` (77).
    pub max_position_embeddings: usize,
    /// `hidden_act` (`quick_gelu` for SD 1.x, `gelu` for SD 2.x's OpenCLIP).
    pub hidden_act: Activation,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f32,
}

/// The text encoder.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    blocks: Vec<Block>,
    final_ln: (Tensor, Tensor),
}

/// A block's part (transformers 5's ViT names, which [`Block::load`] takes) as CLIP names it.
fn part(p: &str) -> String {
    match p {
        "layernorm_before" => "layer_norm1",
        "layernorm_after" => "layer_norm2",
        "attention.q_proj" => "self_attn.q_proj",
        "attention.k_proj" => "self_attn.k_proj",
        "attention.v_proj" => "self_attn.v_proj",
        "attention.o_proj" => "self_attn.out_proj",
        other => other, // mlp.fc1, mlp.fc2
    }
    .to_string()
}

impl ClipTextModel {
    /// Builds the model from `load(name, shape)` (transformers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &ClipTextConfig,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let c = cfg.hidden_size;
        super::vit::check_heads(cfg.num_attention_heads, c)?;
        if cfg.vocab_size == 0 || cfg.max_position_embeddings == 0 {
            return Err(super::vit::invalid(
                "vocab_size",
                "vocab_size and max_position_embeddings must be at least 1".into(),
            )
            .into());
        }
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let name = |p: &str| format!("text_model.encoder.layers.{i}.{}", part(p));
            blocks.push(Block::load(load, &name, (c, cfg.intermediate_size, true))?);
        }
        Ok(Self {
            token_embedding: load(
                "text_model.embeddings.token_embedding.weight",
                &[cfg.vocab_size, c],
            )?,
            position_embedding: load(
                "text_model.embeddings.position_embedding.weight",
                &[cfg.max_position_embeddings, c],
            )?,
            blocks,
            final_ln: (
                load("text_model.final_layer_norm.weight", &[c])?,
                load("text_model.final_layer_norm.bias", &[c])?,
            ),
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The conditioning of `ids` (`batch x seq`, row-major): the final LayerNorm of the last
    /// block's output, or with `clip_skip` n of the output n blocks earlier (diffusers'
    /// `clip_skip`, 0 = none). `(batch, seq, hidden)`.
    pub fn forward(
        &self,
        tape: &Tape,
        ids: &[u32],
        (batch, seq): (usize, usize),
        clip_skip: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        if ids.len() != batch * seq || seq == 0 {
            return Err(CoreError::InvalidConfig {
                field: "input_ids",
                reason: format!("{} ids for batch {batch} x seq {seq}", ids.len()),
            });
        }
        if seq > cfg.max_position_embeddings {
            return Err(CoreError::InvalidConfig {
                field: "input_ids",
                reason: format!(
                    "{seq} tokens, more than max_position_embeddings ({})",
                    cfg.max_position_embeddings
                ),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(CoreError::InvalidConfig {
                field: "input_ids",
                reason: format!("token id {bad} is past vocab_size {}", cfg.vocab_size),
            });
        }
        if clip_skip >= cfg.num_hidden_layers.max(1) {
            return Err(CoreError::InvalidConfig {
                field: "clip_skip",
                reason: format!(
                    "{clip_skip}: the encoder has {} layers",
                    cfg.num_hidden_layers
                ),
            });
        }
        let tok = ops::embedding(tape, &self.token_embedding, ids, &[batch, seq])?;
        let positions: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
        let pos = ops::embedding(tape, &self.position_embedding, &positions, &[batch, seq])?;
        let mut x = ops::add(tape, &tok, &pos)?;
        let hp = (cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_act);
        for blk in &self.blocks[..self.blocks.len() - clip_skip] {
            x = blk.forward_masked(tape, &x, hp, true, adapters)?;
        }
        let (g, b) = &self.final_ln;
        ops::layer_norm(tape, &x, g, Some(b), cfg.layer_norm_eps)
    }

    /// The linear layers with their module paths (where LoRA goes:
    /// `text_model.encoder.layers.N.self_attn.q_proj`, ...).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (p, l) in b.parts() {
                out.push((format!("text_model.encoder.layers.{i}.{}", part(p)), l));
            }
        }
        out
    }

    /// The adapters' tensors in PEFT's naming (`<module>.lora_A.weight`, `.lora_B.weight`).
    pub fn lora_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = Vec::new();
        for (name, l) in self.linears() {
            if let Some(a) = l.lora() {
                v.push((format!("{name}.lora_A.weight"), &a.lora_a));
                v.push((format!("{name}.lora_B.weight"), &a.lora_b));
            }
        }
        v
    }

    /// Adds an adapter to every linear layer whose last name (`q_proj`, `fc1`, ...) is in
    /// `targets`; returns how many.
    pub fn inject_lora(
        &mut self,
        cfg: &crate::lora::LoraConfig,
        targets: &[String],
        seed: u64,
    ) -> Result<usize> {
        let mut n = 0;
        for (i, (name, l)) in self.linears_mut().into_iter().enumerate() {
            let leaf = name.rsplit('.').next().unwrap_or(&name);
            if targets.iter().any(|t| t == leaf || t == &name) {
                l.inject(cfg, seed.wrapping_add(0x7e_0000 + i as u64))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The same, mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (p, l) in b.parts_mut() {
                out.push((format!("text_model.encoder.layers.{i}.{}", part(p)), l));
            }
        }
        out
    }
}
