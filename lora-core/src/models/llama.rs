//! The Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): RMSNorm,
//! rotary embeddings (`rotate_half`), grouped-query attention, SwiGLU MLP; optional q/k/v bias
//! (Qwen2) and tied or untied output head.

use super::{shifted_targets, AttnMode, CausalLm, Head, KvCache, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops::{self, RopeTables};
use crate::tensor::Tensor;
use lora_kernels::ops::rope::rope_inv_freq;

/// `rope_scaling` variants that change the inverse frequencies.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// `factor`
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// `factor`
        factor: f32,
        /// `low_freq_factor`
        low_freq_factor: f32,
        /// `high_freq_factor`
        high_freq_factor: f32,
        /// `original_max_position_embeddings`
        original_max_position_embeddings: f32,
    },
}

/// The fields of a Llama-family `config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`
    pub vocab_size: usize,
    /// `hidden_size`
    pub hidden_size: usize,
    /// `intermediate_size`
    pub intermediate_size: usize,
    /// `num_hidden_layers`
    pub num_hidden_layers: usize,
    /// `num_attention_heads`
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`)
    pub num_key_value_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`)
    pub head_dim: usize,
    /// `rms_norm_eps`
    pub rms_norm_eps: f32,
    /// `rope_theta`
    pub rope_theta: f32,
    /// `rope_scaling`
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings`
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral's `sliding_window`, if any: sequences longer than it are refused (not implemented).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// RoPE inverse frequencies after `rope_scaling`, computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = rope_inv_freq(self.head_dim, self.rope_theta);
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A Llama-family causal LM.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor, // (V, C)
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Linear>, // None when tied to `embed`
    /// RoPE tables for the positions used so far (grown on demand up to
    /// `max_position_embeddings`: a config may allow millions of positions a run never uses).
    rope: std::sync::Mutex<RopeTables>,
}

impl Llama {
    /// Builds the model from `load(name, shape)` (transformers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &LlamaConfig,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let (c, hq, hkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        if hkv == 0 || hq % hkv != 0 {
            return Err(CoreError::InvalidConfig {
                field: "num_key_value_heads",
                reason: format!("{hkv} must divide num_attention_heads {hq}"),
            }
            .into());
        }
        if d == 0 || d % 2 != 0 {
            return Err(CoreError::InvalidConfig {
                field: "head_dim",
                reason: format!("must be even and positive, got {d}"),
            }
            .into());
        }
        let mut lin =
            |name: String, inp: usize, out: usize, bias: bool| -> std::result::Result<Linear, E> {
                let w = load(&format!("{name}.weight"), &[out, inp])?;
                let b = if bias {
                    Some(load(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Linear::frozen(w, WeightLayout::OutIn, b))
            };
        let mut layers = Vec::new();
        let mut norms = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push((
                lin(format!("{a}.q_proj"), c, hq * d, cfg.qkv_bias)?,
                lin(format!("{a}.k_proj"), c, hkv * d, cfg.qkv_bias)?,
                lin(format!("{a}.v_proj"), c, hkv * d, cfg.qkv_bias)?,
                lin(format!("{a}.o_proj"), hq * d, c, cfg.o_bias)?,
                lin(
                    format!("{m}.gate_proj"),
                    c,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
                lin(
                    format!("{m}.up_proj"),
                    c,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
                lin(
                    format!("{m}.down_proj"),
                    cfg.intermediate_size,
                    c,
                    cfg.mlp_bias,
                )?,
            ));
            norms.push(p);
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(lin("lm_head".into(), c, cfg.vocab_size, false)?)
        };
        let mut built = Vec::with_capacity(layers.len());
        for ((q, k, v, o, gate, up, down), p) in layers.into_iter().zip(norms) {
            built.push(Layer {
                input_norm: load(&format!("{p}.input_layernorm.weight"), &[c])?,
                post_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[c])?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        Ok(Self {
            embed: load("model.embed_tokens.weight", &[cfg.vocab_size, c])?,
            norm: load("model.norm.weight", &[c])?,
            layers: built,
            lm_head,
            rope: std::sync::Mutex::new(RopeTables::new(
                &cfg.inv_freq(),
                cfg.max_position_embeddings.min(ROPE_INITIAL_POSITIONS),
            )),
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// RoPE tables covering positions `0..end` (`end` within `max_position_embeddings`),
    /// doubling the cached ones when they fall short.
    fn rope_upto(&self, end: usize) -> RopeTables {
        let mut t = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        if t.positions() < end {
            let n = end
                .max(t.positions().saturating_mul(2))
                .min(self.cfg.max_position_embeddings);
            *t = RopeTables::new(&self.cfg.inv_freq(), n);
        }
        t.clone()
    }
}

/// Positions the RoPE tables cover at load (more are computed when a sequence needs them).
const ROPE_INITIAL_POSITIONS: usize = 4096;

impl Layer {
    /// One decoder layer; `ctx` = RoPE tables, positions, query and kv heads, RMSNorm epsilon.
    fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        (rope, pos, hq, hkv, eps): (&RopeTables, &[u32], usize, usize, f32),
        mode: &mut AttnMode,
        li: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(tape, x, &self.input_norm, eps)?;
        let q = self.q.forward(tape, &h, adapters)?;
        let k = self.k.forward(tape, &h, adapters)?;
        let v = self.v.forward(tape, &h, adapters)?;
        let q = ops::rope(tape, &q, rope, pos, hq)?;
        let k = ops::rope(tape, &k, rope, pos, hkv)?;
        let a = mode.attend(tape, &q, &k, &v, hq, hkv, li)?;
        let o = self.o.forward(tape, &a, adapters)?;
        let x = ops::add(tape, x, &o)?;
        let h = ops::rms_norm(tape, &x, &self.post_norm, eps)?;
        let g = self.gate.forward(tape, &h, adapters)?;
        let u = self.up.forward(tape, &h, adapters)?;
        let m = ops::swiglu(tape, &g, &u)?;
        let m = self.down.forward(tape, &m, adapters)?;
        ops::add(tape, &x, &m)
    }
}

impl Llama {
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
        let cfg = &self.cfg;
        let pos = mode.positions(batch, seq);
        let end = pos.iter().max().map_or(0, |&p| p as usize + 1);
        if end > cfg.max_position_embeddings {
            return Err(CoreError::InvalidConfig {
                field: "seq_len",
                reason: format!(
                    "{end} positions exceed max_position_embeddings {}",
                    cfg.max_position_embeddings
                ),
            });
        }
        if let Some(w) = cfg.sliding_window {
            if end > w {
                return Err(CoreError::InvalidConfig {
                    field: "sliding_window",
                    reason: format!(
                        "sequences longer than the window ({w}) are not supported yet (got {end})"
                    ),
                });
            }
        }
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let rope = self.rope_upto(end);
        let mut x = ops::embedding(tape, &self.embed, ids, &[batch, seq])?;
        let eps = cfg.rms_norm_eps;
        for (li, l) in self.layers.iter().enumerate() {
            x = if tape.checkpointing() {
                let (l, rope, pos) = (l.clone(), rope.clone(), pos.clone());
                ops::checkpoint(tape, &x, move |t, x| {
                    let ctx = (&rope, &pos[..], hq, hkv, eps);
                    l.forward(t, x, ctx, &mut AttnMode::Full, li, adapters)
                })?
            } else {
                let ctx = (&rope, &pos[..], hq, hkv, eps);
                l.forward(tape, &x, ctx, &mut mode, li, adapters)?
            };
        }
        mode.advance(seq);
        let x = ops::rms_norm(tape, &x, &self.norm, cfg.rms_norm_eps)?;
        head.apply(tape, &x, &self.embed, self.lm_head.as_ref(), adapters)
    }
}

/// Module paths and layer slots, in model order; one list for `linears` and `linears_mut`.
macro_rules! layer_linears {
    ($layers:expr, $($borrow:tt)+) => {{
        let mut v = Vec::new();
        for (i, l) in $layers.enumerate() {
            let a = format!("model.layers.{i}.self_attn");
            let m = format!("model.layers.{i}.mlp");
            v.push((format!("{a}.q_proj"), $($borrow)+ l.q));
            v.push((format!("{a}.k_proj"), $($borrow)+ l.k));
            v.push((format!("{a}.v_proj"), $($borrow)+ l.v));
            v.push((format!("{a}.o_proj"), $($borrow)+ l.o));
            v.push((format!("{m}.gate_proj"), $($borrow)+ l.gate));
            v.push((format!("{m}.up_proj"), $($borrow)+ l.up));
            v.push((format!("{m}.down_proj"), $($borrow)+ l.down));
        }
        v
    }};
}

impl CausalLm for Llama {
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
        self.layers.len()
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = layer_linears!(self.layers.iter(), &);
        if let Some(h) = &self.lm_head {
            v.push(("lm_head".into(), h));
        }
        v
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = layer_linears!(self.layers.iter_mut(), &mut);
        if let Some(h) = &mut self.lm_head {
            v.push(("lm_head".into(), h));
        }
        v
    }

    fn output_head(&self) -> &str {
        "lm_head"
    }

    fn tied_embedding(&self) -> Option<&Tensor> {
        self.lm_head.is_none().then_some(&self.embed)
    }

    fn base_params(&self) -> usize {
        let lin = super::linear_base_params(self);
        self.embed.numel() + lin + (2 * self.layers.len() + 1) * self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn other_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed, &self.norm];
        for l in &self.layers {
            v.extend([&l.input_norm, &l.post_norm]);
        }
        v
    }
}
