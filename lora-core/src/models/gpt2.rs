//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, fused `c_attn`, GELU (tanh)
//! MLP, `Conv1D` weights stored `(in, out)` and used as stored, output head tied to `wte` (or,
//! with `tie_word_embeddings: false`, its own `lm_head.weight`).

use super::{shifted_targets, AttnMode, CausalLm, Head, KvCache, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops;
use crate::tensor::Tensor;

/// The fields of GPT-2's `config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// `vocab_size`
    pub vocab_size: usize,
    /// `n_positions`
    pub n_positions: usize,
    /// `n_embd`
    pub n_embd: usize,
    /// `n_layer`
    pub n_layer: usize,
    /// `n_head`
    pub n_head: usize,
    /// `n_inner` (default `4 * n_embd`)
    pub n_inner: usize,
    /// `layer_norm_epsilon`
    pub layer_norm_epsilon: f32,
    /// `tie_word_embeddings` (default true): the output head is `wte`; false reads its own
    /// `lm_head.weight` `(V, C)`.
    pub tie_word_embeddings: bool,
}

#[derive(Clone)]
struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: (Tensor, Tensor),
    c_fc: Linear,
    mlp_c_proj: Linear,
}

/// GPT-2 with optional LoRA adapters on any of its `Conv1D` layers.
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor, // (V, C)
    wpe: Tensor, // (P, C)
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    lm_head: Option<Linear>, // None when tied to `wte`
}

impl Gpt2 {
    /// Builds the model from `load(name, shape)` (transformers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &Gpt2Config,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let c = cfg.n_embd;
        if cfg.n_head == 0 || c % cfg.n_head != 0 {
            return Err(CoreError::InvalidConfig {
                field: "n_head",
                reason: format!("{} must divide n_embd {c}", cfg.n_head),
            }
            .into());
        }
        let mut ln = |p: &str| -> std::result::Result<(Tensor, Tensor), E> {
            Ok((
                load(&format!("{p}.weight"), &[c])?,
                load(&format!("{p}.bias"), &[c])?,
            ))
        };
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            let ln_1 = ln(&format!("{p}.ln_1"))?;
            let ln_2 = ln(&format!("{p}.ln_2"))?;
            blocks.push((p, ln_1, ln_2));
        }
        let ln_f = ln("transformer.ln_f")?;
        let mut conv = |name: String, inp: usize, out: usize| -> std::result::Result<Linear, E> {
            let w = load(&format!("{name}.weight"), &[inp, out])?;
            let b = load(&format!("{name}.bias"), &[out])?;
            Ok(Linear::frozen(w, WeightLayout::InOut, Some(b)))
        };
        let mut built = Vec::new();
        for (p, ln_1, ln_2) in blocks {
            built.push(Block {
                ln_1,
                c_attn: conv(format!("{p}.attn.c_attn"), c, 3 * c)?,
                attn_c_proj: conv(format!("{p}.attn.c_proj"), c, c)?,
                ln_2,
                c_fc: conv(format!("{p}.mlp.c_fc"), c, cfg.n_inner)?,
                mlp_c_proj: conv(format!("{p}.mlp.c_proj"), cfg.n_inner, c)?,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = load("lm_head.weight", &[cfg.vocab_size, c])?;
            Some(Linear::frozen(w, WeightLayout::OutIn, None))
        };
        Ok(Self {
            lm_head,
            wte: load("transformer.wte.weight", &[cfg.vocab_size, c])?,
            wpe: load("transformer.wpe.weight", &[cfg.n_positions, c])?,
            blocks: built,
            ln_f,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }
}

impl Block {
    /// One pre-LayerNorm block; `(c, h, eps)` = width, heads, LayerNorm epsilon.
    fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        (c, h, eps): (usize, usize, f32),
        mode: &mut AttnMode,
        li: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let a = ops::layer_norm(tape, x, &self.ln_1.0, Some(&self.ln_1.1), eps)?;
        let qkv = self.c_attn.forward(tape, &a, adapters)?;
        let q = ops::narrow(tape, &qkv, 0, c)?;
        let k = ops::narrow(tape, &qkv, c, c)?;
        let v = ops::narrow(tape, &qkv, 2 * c, c)?;
        let att = mode.attend(tape, &q, &k, &v, h, h, li)?;
        let o = self.attn_c_proj.forward(tape, &att, adapters)?;
        let x = ops::add(tape, x, &o)?;
        let m = ops::layer_norm(tape, &x, &self.ln_2.0, Some(&self.ln_2.1), eps)?;
        let m = self.c_fc.forward(tape, &m, adapters)?;
        let m = ops::gelu(tape, &m)?;
        let m = self.mlp_c_proj.forward(tape, &m, adapters)?;
        ops::add(tape, &x, &m)
    }
}

impl Gpt2 {
    fn run(
        &self,
        tape: &Tape,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapters: bool,
        mut mode: AttnMode,
        head: Head,
    ) -> Result<Tensor> {
        let c = self.cfg.n_embd;
        let pos = mode.positions(batch, seq);
        if let Some(&p) = pos.iter().max() {
            if p as usize >= self.cfg.n_positions {
                return Err(CoreError::InvalidConfig {
                    field: "seq_len",
                    reason: format!("position {p} exceeds n_positions {}", self.cfg.n_positions),
                });
            }
        }
        let tok = ops::embedding(tape, &self.wte, ids, &[batch, seq])?;
        let pe = ops::embedding(tape, &self.wpe, &pos, &[batch, seq])?;
        let mut x = ops::add(tape, &tok, &pe)?;
        let eps = self.cfg.layer_norm_epsilon;
        let h = self.cfg.n_head;
        for (li, b) in self.blocks.iter().enumerate() {
            x = if tape.checkpointing() {
                let b = b.clone();
                ops::checkpoint(tape, &x, move |t, x| {
                    b.forward(t, x, (c, h, eps), &mut AttnMode::Full, li, adapters)
                })?
            } else {
                b.forward(tape, &x, (c, h, eps), &mut mode, li, adapters)?
            };
        }
        mode.advance(seq);
        let x = ops::layer_norm(tape, &x, &self.ln_f.0, Some(&self.ln_f.1), eps)?;
        head.apply(tape, &x, &self.wte, self.lm_head.as_ref(), adapters)
    }
}

/// Module paths and layer slots, in model order; one list for `linears` and `linears_mut`.
macro_rules! block_linears {
    ($blocks:expr, $($borrow:tt)+) => {{
        let mut v = Vec::new();
        for (i, b) in $blocks.enumerate() {
            let p = format!("transformer.h.{i}");
            v.push((format!("{p}.attn.c_attn"), $($borrow)+ b.c_attn));
            v.push((format!("{p}.attn.c_proj"), $($borrow)+ b.attn_c_proj));
            v.push((format!("{p}.mlp.c_fc"), $($borrow)+ b.c_fc));
            v.push((format!("{p}.mlp.c_proj"), $($borrow)+ b.mlp_c_proj));
        }
        v
    }};
}

impl CausalLm for Gpt2 {
    fn forward(
        &self,
        tape: &Tape,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        self.run(
            tape,
            ids,
            batch,
            seq,
            adapters,
            AttnMode::Full,
            Head::Logits,
        )
    }

    fn loss(
        &self,
        tape: &Tape,
        ids: &[u32],
        labels: &[i64],
        batch: usize,
        seq: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let targets = shifted_targets(labels, batch, seq);
        let head = Head::Loss(&targets);
        self.run(tape, ids, batch, seq, adapters, AttnMode::Full, head)
    }

    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache, adapters: bool) -> Result<Tensor> {
        self.run(
            &Tape::inference(),
            ids,
            1,
            ids.len(),
            adapters,
            AttnMode::Cached(cache),
            Head::Logits,
        )
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = block_linears!(self.blocks.iter(), &);
        if let Some(h) = &self.lm_head {
            v.push(("lm_head".into(), h));
        }
        v
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = block_linears!(self.blocks.iter_mut(), &mut);
        if let Some(h) = &mut self.lm_head {
            v.push(("lm_head".into(), h));
        }
        v
    }

    fn output_head(&self) -> &str {
        "lm_head"
    }

    fn tied_embedding(&self) -> Option<&Tensor> {
        self.lm_head.is_none().then_some(&self.wte)
    }

    fn base_params(&self) -> usize {
        let lin = super::linear_base_params(self);
        let ln = self.blocks.len() * 4 * self.cfg.n_embd + 2 * self.cfg.n_embd;
        self.wte.numel() + self.wpe.numel() + lin + ln
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.n_positions
    }

    fn other_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.wte, &self.wpe, &self.ln_f.0, &self.ln_f.1];
        for b in &self.blocks {
            v.extend([&b.ln_1.0, &b.ln_1.1, &b.ln_2.0, &b.ln_2.1]);
        }
        v
    }
}
