//! ViT (`ViTForImageClassification`): a patch convolution, a class token and learned positions,
//! pre-LayerNorm encoder blocks with bidirectional attention and a GELU MLP, a final LayerNorm
//! and a linear head on the class token.
//!
//! Module paths are transformers 5's (`vit.layers.N.attention.q_proj`, `...mlp.fc1`), which PEFT
//! 0.21 writes; checkpoints on the Hub carry the original names
//! (`vit.encoder.layer.N.attention.attention.query`), which [`legacy_name`] gives for each.

use super::vision::{ClassifierHead, ImageClassifier, VisionModel};
use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;

/// The activation of a vision MLP (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact (erf) GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`
    Relu,
    /// `silu`, `swish`
    Silu,
    /// `quick_gelu` (CLIP: `x sigmoid(1.702 x)`)
    QuickGelu,
}

impl Activation {
    /// The activation named `name` in a config, or an error naming it.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            other => {
                return Err(CoreError::InvalidConfig {
                    field: "hidden_act",
                    reason: format!(
                        "{other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu, quick_gelu are)"
                    ),
                })
            }
        })
    }

    /// Applies it.
    pub fn apply(self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluErf => ops::gelu_erf(tape, x),
            Activation::GeluTanh => ops::gelu(tape, x),
            Activation::Relu => ops::relu(tape, x),
            Activation::Silu => ops::silu(tape, x),
            Activation::QuickGelu => ops::quick_gelu(tape, x),
        }
    }
}

/// The fields of ViT's `config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    /// `hidden_size`
    pub hidden_size: usize,
    /// `num_hidden_layers`
    pub num_hidden_layers: usize,
    /// `num_attention_heads`
    pub num_attention_heads: usize,
    /// `intermediate_size`
    pub intermediate_size: usize,
    /// `hidden_act`
    pub hidden_act: Activation,
    /// `layer_norm_eps`
    pub layer_norm_eps: f32,
    /// `image_size` (height, width)
    pub image_size: (usize, usize),
    /// `patch_size` (height, width)
    pub patch_size: (usize, usize),
    /// `num_channels`
    pub num_channels: usize,
    /// `qkv_bias`
    pub qkv_bias: bool,
    /// Classes of the head (`id2label`'s length, or `num_labels`).
    pub num_labels: usize,
}

impl VitConfig {
    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size.0 / self.patch_size.0.max(1))
            * (self.image_size.1 / self.patch_size.1.max(1))
    }
}

/// The original (transformers 4, Hub checkpoint) name of a ViT parameter or module path given
/// in transformers 5's naming, or `None` where both name it the same.
pub fn legacy_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("vit.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let tail = [
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ]
    .iter()
    .find_map(|(new, old)| {
        tail.strip_prefix(new)
            .filter(|t| t.is_empty() || t.starts_with('.'))
            .map(|t| format!("{old}{t}"))
    })
    .unwrap_or_else(|| tail.to_string());
    Some(format!("vit.encoder.layer.{layer}.{tail}"))
}

/// A pre-LayerNorm encoder block (ViT's, YOLOS's).
#[derive(Clone)]
pub(crate) struct Block {
    pub(crate) ln_before: (Tensor, Tensor),
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) ln_after: (Tensor, Tensor),
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

impl Block {
    /// Loads a block whose part `p` (transformers 5's ViT name within a block:
    /// `layernorm_before`, `attention.q_proj`, ..., `mlp.fc2`) is named `name(p)` in the
    /// checkpoint: width `c`, MLP width `f`, with or without q/k/v biases.
    pub(crate) fn load<E>(
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
        name: &dyn Fn(&str) -> String,
        (c, f, qkv_bias): (usize, usize, bool),
    ) -> std::result::Result<Self, E> {
        let mut ln = |p: &str| -> std::result::Result<(Tensor, Tensor), E> {
            Ok((
                load(&format!("{}.weight", name(p)), &[c])?,
                load(&format!("{}.bias", name(p)), &[c])?,
            ))
        };
        let (ln_before, ln_after) = (ln("layernorm_before")?, ln("layernorm_after")?);
        let mut lin = |p: &str, inp: usize, out: usize, bias: bool| {
            let w = load(&format!("{}.weight", name(p)), &[out, inp])?;
            let b = if bias {
                Some(load(&format!("{}.bias", name(p)), &[out])?)
            } else {
                None
            };
            Ok::<_, E>(Linear::frozen(w, WeightLayout::OutIn, b))
        };
        Ok(Self {
            ln_before,
            q: lin("attention.q_proj", c, c, qkv_bias)?,
            k: lin("attention.k_proj", c, c, qkv_bias)?,
            v: lin("attention.v_proj", c, c, qkv_bias)?,
            o: lin("attention.o_proj", c, c, true)?,
            ln_after,
            fc1: lin("mlp.fc1", c, f, true)?,
            fc2: lin("mlp.fc2", f, c, true)?,
        })
    }

    /// Its linear layers with their part names, in order (for `linears`).
    pub(crate) fn parts(&self) -> [(&'static str, &Linear); 6] {
        [
            ("attention.q_proj", &self.q),
            ("attention.k_proj", &self.k),
            ("attention.v_proj", &self.v),
            ("attention.o_proj", &self.o),
            ("mlp.fc1", &self.fc1),
            ("mlp.fc2", &self.fc2),
        ]
    }

    /// The same, mutable.
    pub(crate) fn parts_mut(&mut self) -> [(&'static str, &mut Linear); 6] {
        [
            ("attention.q_proj", &mut self.q),
            ("attention.k_proj", &mut self.k),
            ("attention.v_proj", &mut self.v),
            ("attention.o_proj", &mut self.o),
            ("mlp.fc1", &mut self.fc1),
            ("mlp.fc2", &mut self.fc2),
        ]
    }
}

/// ViT for image classification.
pub struct Vit {
    cfg: VitConfig,
    patch: Conv,
    cls_token: Tensor, // (1, 1, C)
    positions: Tensor, // (1, P + 1, C)
    blocks: Vec<Block>,
    layernorm: (Tensor, Tensor),
    head: ClassifierHead,
}

pub(crate) fn invalid(field: &'static str, reason: String) -> CoreError {
    CoreError::InvalidConfig { field, reason }
}

/// `num_attention_heads` must divide `hidden_size`.
pub(crate) fn check_heads(heads: usize, hidden: usize) -> Result<()> {
    if heads == 0 || hidden % heads != 0 {
        return Err(invalid(
            "num_attention_heads",
            format!("{heads} must divide hidden_size {hidden}"),
        ));
    }
    Ok(())
}

/// The patch convolution's output `(B, C, gh, gw)` as `(B, gh * gw, C)` tokens, and the count.
pub(crate) fn patch_tokens(
    tape: &Tape,
    patch: &Conv,
    pixels: &Tensor,
    adapters: bool,
) -> Result<(Tensor, usize)> {
    let planes = patch.forward(tape, pixels, adapters)?;
    let (b, c) = (planes.shape()[0], planes.shape()[1]);
    let p = planes.numel() / (b * c).max(1);
    let planes = ops::reshape(tape, &planes, &[b, c, p])?;
    Ok((ops::transpose(tape, &planes)?, p))
}

impl Vit {
    /// Builds the model from `load(name, shape)` (transformers 5's parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &VitConfig,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let c = cfg.hidden_size;
        check_heads(cfg.num_attention_heads, c)?;
        let (ph, pw) = cfg.patch_size;
        if ph == 0 || pw == 0 || cfg.image_size.0 < ph || cfg.image_size.1 < pw {
            return Err(invalid(
                "patch_size",
                format!(
                    "{:?} does not fit image_size {:?}",
                    cfg.patch_size, cfg.image_size
                ),
            )
            .into());
        }
        if cfg.num_labels == 0 {
            return Err(invalid("num_labels", "the head needs at least one class".into()).into());
        }
        let f = cfg.intermediate_size;
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let name = |p: &str| format!("vit.layers.{i}.{p}");
            blocks.push(Block::load(load, &name, (c, f, cfg.qkv_bias))?);
        }
        let layernorm = (
            load("vit.layernorm.weight", &[c])?,
            load("vit.layernorm.bias", &[c])?,
        );
        let pe = "vit.embeddings.patch_embeddings.projection";
        let patch = Conv::frozen(
            load(&format!("{pe}.weight"), &[c, cfg.num_channels, ph, pw])?,
            Some(load(&format!("{pe}.bias"), &[c])?),
            Conv2dParams {
                stride: (ph, pw),
                ..Conv2dParams::default()
            },
        );
        let l = cfg.num_labels;
        let head = ClassifierHead::new(
            "classifier",
            load("classifier.weight", &[l, c])?,
            Some(load("classifier.bias", &[l])?),
        );
        Ok(Self {
            patch,
            cls_token: load("vit.embeddings.cls_token", &[1, 1, c])?,
            positions: load(
                "vit.embeddings.position_embeddings",
                &[1, cfg.num_patches() + 1, c],
            )?,
            blocks,
            layernorm,
            head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The final hidden states `(B, P + 1, C)`.
    pub fn hidden_states(&self, tape: &Tape, pixels: &Tensor, adapters: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let s = pixels.shape();
        let want = [cfg.num_channels, cfg.image_size.0, cfg.image_size.1];
        if s.len() != 4 || s[1..] != want {
            return Err(CoreError::Shape {
                op: "ViT",
                what: "pixels",
                got: s.to_vec(),
                expected: format!(
                    "[batch, {}, {}, {}] (the config's image_size)",
                    want[0], want[1], want[2]
                ),
            });
        }
        let b = s[0];
        let (tokens, _) = patch_tokens(tape, &self.patch, pixels, adapters)?; // (B, P, C)
        let cls = ops::expand(tape, &self.cls_token, b)?;
        let x = ops::concat(tape, &cls, &tokens, 1)?;
        let pos = ops::expand(tape, &self.positions, b)?;
        let mut x = ops::add(tape, &x, &pos)?;
        let (h, eps, act) = (cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_act);
        for blk in &self.blocks {
            x = if tape.checkpointing() {
                let blk = blk.clone();
                ops::checkpoint(tape, &x, move |t, x| {
                    blk.forward(t, x, (h, eps, act), adapters)
                })?
            } else {
                blk.forward(tape, &x, (h, eps, act), adapters)?
            };
        }
        ops::layer_norm(tape, &x, &self.layernorm.0, Some(&self.layernorm.1), eps)
    }
}

impl Block {
    pub(crate) fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        hp: (usize, f32, Activation),
        adapters: bool,
    ) -> Result<Tensor> {
        self.forward_masked(tape, x, hp, false, adapters)
    }

    /// The block with causal self-attention when `causal` (CLIP's text encoder), else
    /// bidirectional.
    pub(crate) fn forward_masked(
        &self,
        tape: &Tape,
        x: &Tensor,
        (h, eps, act): (usize, f32, Activation),
        causal: bool,
        adapters: bool,
    ) -> Result<Tensor> {
        let a = ops::layer_norm(tape, x, &self.ln_before.0, Some(&self.ln_before.1), eps)?;
        let q = self.q.forward(tape, &a, adapters)?;
        let k = self.k.forward(tape, &a, adapters)?;
        let v = self.v.forward(tape, &a, adapters)?;
        let att = if causal {
            ops::attention(tape, &q, &k, &v, h, h)?
        } else {
            ops::attention_bidirectional(tape, &q, &k, &v, h, h)?
        };
        let o = self.o.forward(tape, &att, adapters)?;
        let x = ops::add(tape, x, &o)?;
        let m = ops::layer_norm(tape, &x, &self.ln_after.0, Some(&self.ln_after.1), eps)?;
        let m = self.fc1.forward(tape, &m, adapters)?;
        let m = act.apply(tape, &m)?;
        let m = self.fc2.forward(tape, &m, adapters)?;
        ops::add(tape, &x, &m)
    }
}

const PATCH: &str = "vit.embeddings.patch_embeddings.projection";

impl VisionModel for Vit {
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            v.extend(b.parts().map(|(p, l)| (format!("vit.layers.{i}.{p}"), l)));
        }
        v
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            v.extend(
                b.parts_mut()
                    .map(|(p, l)| (format!("vit.layers.{i}.{p}"), l)),
            );
        }
        v
    }
    fn convs(&self) -> Vec<(String, &Conv)> {
        vec![(PATCH.into(), &self.patch)]
    }
    fn convs_mut(&mut self) -> Vec<(String, &mut Conv)> {
        vec![(PATCH.into(), &mut self.patch)]
    }
    fn other_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![
            &self.cls_token,
            &self.positions,
            &self.layernorm.0,
            &self.layernorm.1,
        ];
        for b in &self.blocks {
            v.extend([&b.ln_before.0, &b.ln_before.1, &b.ln_after.0, &b.ln_after.1]);
        }
        v
    }
    fn heads(&self) -> Vec<&ClassifierHead> {
        vec![&self.head]
    }
    fn heads_mut(&mut self) -> Vec<&mut ClassifierHead> {
        vec![&mut self.head]
    }
}

impl ImageClassifier for Vit {
    fn forward(&self, tape: &Tape, pixels: &Tensor, adapters: bool) -> Result<Tensor> {
        let x = self.hidden_states(tape, pixels, adapters)?;
        let b = x.shape()[0];
        let cls = ops::narrow_dim(tape, &x, 1, 0, 1)?;
        let cls = ops::reshape(tape, &cls, &[b, self.cfg.hidden_size])?;
        self.head.forward(tape, &cls, adapters)
    }
    fn fixed_size(&self) -> Option<(usize, usize)> {
        Some(self.cfg.image_size)
    }
    fn num_channels(&self) -> usize {
        self.cfg.num_channels
    }
    fn num_labels(&self) -> usize {
        self.head.dims().1
    }
    fn head(&self) -> &ClassifierHead {
        &self.head
    }
    fn head_mut(&mut self) -> &mut ClassifierHead {
        &mut self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_are_the_hub_checkpoints() {
        let cases = [
            (
                "vit.layers.3.attention.q_proj.weight",
                Some("vit.encoder.layer.3.attention.attention.query.weight"),
            ),
            (
                "vit.layers.0.attention.v_proj",
                Some("vit.encoder.layer.0.attention.attention.value"),
            ),
            (
                "vit.layers.11.attention.o_proj.bias",
                Some("vit.encoder.layer.11.attention.output.dense.bias"),
            ),
            (
                "vit.layers.2.mlp.fc1.weight",
                Some("vit.encoder.layer.2.intermediate.dense.weight"),
            ),
            (
                "vit.layers.2.mlp.fc2",
                Some("vit.encoder.layer.2.output.dense"),
            ),
            (
                "vit.layers.1.layernorm_before.weight",
                Some("vit.encoder.layer.1.layernorm_before.weight"),
            ),
            ("vit.embeddings.cls_token", None),
            ("classifier.weight", None),
        ];
        for (new, old) in cases {
            assert_eq!(legacy_name(new).as_deref(), old, "{new}");
        }
        // A prefix that only looks like a module is not renamed.
        assert_eq!(
            legacy_name("vit.layers.0.mlp.fc10.weight").as_deref(),
            Some("vit.encoder.layer.0.mlp.fc10.weight")
        );
    }
}
