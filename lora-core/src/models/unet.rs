//! Stable Diffusion's denoiser: diffusers' `UNet2DConditionModel` as SD 1.x and 2.x configure it
//! (ResNet blocks with group norm and a time embedding, transformer blocks with self- and
//! cross-attention and a GEGLU feed-forward, strided-convolution downsampling, nearest
//! upsampling, skip connections from each down-block layer to the up path). Parameter names are
//! diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`, ...), so a LoRA
//! file's module paths mean the same here.
//!
//! Legend: B = batch, C = channels, (H, W) latent size, S = text tokens, D = text width.

use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;

/// A down or up block: with transformer blocks after each ResNet (`CrossAttnDownBlock2D`,
/// `CrossAttnUpBlock2D`) or without (`DownBlock2D`, `UpBlock2D`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttn{Down,Up}Block2D`.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`.
    Plain,
}

/// The fields of `unet/config.json` the math depends on (per-block lists already expanded from
/// diffusers' int-or-list forms).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// `in_channels` (4 for SD's latents).
    pub in_channels: usize,
    /// `out_channels`.
    pub out_channels: usize,
    /// `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// `down_block_types`.
    pub down_blocks: Vec<BlockKind>,
    /// `up_block_types`.
    pub up_blocks: Vec<BlockKind>,
    /// `layers_per_block` per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// `transformer_layers_per_block` per down block (the up path reverses it).
    pub transformer_layers: Vec<usize>,
    /// Attention heads per down block: `num_attention_heads`, or diffusers' legacy reading of
    /// `attention_head_dim` as the head count when that is absent (SD 1.x: 8; SD 2.x:
    /// `[5, 10, 20, 20]`). Head width = the block's channels / heads.
    pub heads: Vec<usize>,
    /// `cross_attention_dim` (D).
    pub cross_attention_dim: usize,
    /// `norm_num_groups`.
    pub norm_num_groups: usize,
    /// `norm_eps` (the ResNet blocks' and the output's group norms).
    pub norm_eps: f32,
    /// `use_linear_projection`: the transformers' `proj_in`/`proj_out` are linear layers (SD 2.x)
    /// instead of 1x1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
    /// `flip_sin_to_cos` of the sinusoidal timestep embedding.
    pub flip_sin_to_cos: bool,
    /// `freq_shift`.
    pub freq_shift: f32,
    /// `downsample_padding`.
    pub downsample_padding: usize,
    /// `mid_block_scale_factor` (the mid block's ResNet output scale).
    pub mid_block_scale_factor: f32,
    /// Whether there is a mid block (`mid_block_type` `UNetMidBlock2DCrossAttn`, or null).
    pub mid_block: bool,
    /// `center_input_sample`: the sample is mapped `x -> 2x - 1` first.
    pub center_input_sample: bool,
    /// `conv_in_kernel`.
    pub conv_in_kernel: usize,
    /// `conv_out_kernel`.
    pub conv_out_kernel: usize,
    /// `time_embedding_dim` (default `4 * block_out_channels[0]`).
    pub time_embed_dim: usize,
}

impl UNetConfig {
    /// Checks the lists' lengths and that heads and groups divide the channels; errors name
    /// the field.
    pub fn check(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let inv = |field: &'static str, reason: String| CoreError::InvalidConfig { field, reason };
        if n == 0 {
            return Err(inv("block_out_channels", "must not be empty".into()));
        }
        for (field, len) in [
            ("down_block_types", self.down_blocks.len()),
            ("up_block_types", self.up_blocks.len()),
            ("layers_per_block", self.layers_per_block.len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers.len(),
            ),
            ("num_attention_heads", self.heads.len()),
        ] {
            if len != n {
                return Err(inv(
                    field,
                    format!("{len} entries for {n} block_out_channels"),
                ));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(inv(
                    "norm_num_groups",
                    format!(
                        "{} groups must divide block_out_channels[{i}] = {c}",
                        self.norm_num_groups
                    ),
                ));
            }
            let h = self.heads[i];
            if h == 0 || !c.is_multiple_of(h) {
                return Err(inv(
                    "attention_head_dim",
                    format!("{h} heads must divide block_out_channels[{i}] = {c}"),
                ));
            }
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) {
                return Err(inv(field, format!("{k}: an odd kernel size is needed")));
            }
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("cross_attention_dim", self.cross_attention_dim),
            ("time_embedding_dim", self.time_embed_dim),
        ] {
            if v == 0 {
                return Err(inv(field, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// 2 per downsampling: latent sides that are multiples of it need no resizing on the way
    /// up (any side works; others are cropped to their skip connection's size, as diffusers).
    pub fn size_multiple(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The sinusoidal timestep embedding (`B`, `dim`) as diffusers' `get_timestep_embedding`
/// computes it in f32: frequencies `exp(-ln(10000) i / (dim/2 - shift))`, `[sin | cos]` of
/// `t * freq` (`[cos | sin]` with `flip_sin_to_cos`), zero-padded when `dim` is odd.
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip: bool, shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = -(10000f64.ln() as f32) * i as f32;
            (e / (half as f32 - shift)).exp()
        })
        .collect();
    let mut out = vec![0.0f32; timesteps.len() * dim];
    for (b, &t) in timesteps.iter().enumerate() {
        let row = &mut out[b * dim..(b + 1) * dim];
        for (i, &f) in freqs.iter().enumerate() {
            let a = t * f;
            let (s, c) = (a.sin(), a.cos());
            if flip {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
    }
    out
}

pub(crate) type Norm = (Tensor, Tensor);

/// Named mutable linear layers and convolutions.
pub type LayersMut<'a> = (Vec<(String, &'a mut Linear)>, Vec<(String, &'a mut Conv)>);

/// A weight loader: `load(name, shape)`.
pub type Loader<'a, E> = dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E> + 'a;

pub(crate) fn load_norm<E>(
    load: &mut Loader<E>,
    name: &str,
    c: usize,
) -> std::result::Result<Norm, E> {
    Ok((
        load(&format!("{name}.weight"), &[c])?,
        load(&format!("{name}.bias"), &[c])?,
    ))
}

pub(crate) fn load_linear<E>(
    load: &mut Loader<E>,
    name: &str,
    (inp, out): (usize, usize),
    bias: bool,
) -> std::result::Result<Linear, E> {
    let w = load(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias {
        Some(load(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::frozen(w, WeightLayout::OutIn, b))
}

pub(crate) fn load_conv<E>(
    load: &mut Loader<E>,
    name: &str,
    (inp, out, k): (usize, usize, usize),
    (stride, pad): (usize, usize),
) -> std::result::Result<Conv, E> {
    let w = load(&format!("{name}.weight"), &[out, inp, k, k])?;
    let b = load(&format!("{name}.bias"), &[out])?;
    let p = Conv2dParams {
        stride: (stride, stride),
        padding: (pad, pad),
        ..Default::default()
    };
    Ok(Conv::frozen(w, Some(b), p))
}

pub(crate) fn norm_silu(
    tape: &Tape,
    x: &Tensor,
    n: &Norm,
    groups: usize,
    eps: f32,
) -> Result<Tensor> {
    let h = ops::group_norm(tape, x, &n.0, Some(&n.1), groups, eps)?;
    ops::silu(tape, &h)
}

/// `ResnetBlock2D`: `x + conv2(silu(gn2(conv1(silu(gn1(x))) + proj(silu(temb)))))`, the
/// skip through a 1x1 convolution when the channels change, divided by the output scale. The
/// VAE's have no time embedding (`temb_channels=None`).
#[derive(Clone)]
pub(crate) struct Resnet {
    name: String,
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
    groups: usize,
    eps: f32,
    out_scale: f32,
}

impl Resnet {
    pub(crate) fn load<E>(
        load: &mut Loader<E>,
        name: String,
        (inp, out, temb): (usize, usize, Option<usize>),
        (groups, eps, out_scale): (usize, f32, f32),
    ) -> std::result::Result<Self, E> {
        let n = |p: &str| format!("{name}.{p}");
        Ok(Self {
            norm1: load_norm(load, &n("norm1"), inp)?,
            conv1: load_conv(load, &n("conv1"), (inp, out, 3), (1, 1))?,
            time_emb_proj: match temb {
                Some(t) => Some(load_linear(load, &n("time_emb_proj"), (t, out), true)?),
                None => None,
            },
            norm2: load_norm(load, &n("norm2"), out)?,
            conv2: load_conv(load, &n("conv2"), (out, out, 3), (1, 1))?,
            shortcut: if inp != out {
                Some(load_conv(load, &n("conv_shortcut"), (inp, out, 1), (1, 0))?)
            } else {
                None
            },
            groups,
            eps,
            out_scale,
            name,
        })
    }

    /// `temb_act` is `silu(temb)` (every block applies the same activation to it first);
    /// `None` for the VAE's blocks, which have no time embedding.
    pub(crate) fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        temb_act: Option<&Tensor>,
        ad: bool,
    ) -> Result<Tensor> {
        let h = norm_silu(tape, x, &self.norm1, self.groups, self.eps)?;
        let mut h = self.conv1.forward(tape, &h, ad)?;
        match (&self.time_emb_proj, temb_act) {
            (Some(p), Some(t)) => {
                let t = p.forward(tape, t, ad)?;
                h = ops::add_planes(tape, &h, &t)?;
            }
            (None, None) => {}
            _ => {
                return Err(CoreError::Internal(
                    "a time embedding for a block without one",
                ))
            }
        }
        let h = norm_silu(tape, &h, &self.norm2, self.groups, self.eps)?;
        let h = self.conv2.forward(tape, &h, ad)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(tape, x, ad)?,
            None => x.clone(),
        };
        let y = ops::add(tape, &skip, &h)?;
        if self.out_scale == 1.0 {
            Ok(y)
        } else {
            ops::scale(tape, &y, 1.0 / self.out_scale)
        }
    }

    pub(crate) fn linears(&self) -> Vec<(String, &Linear)> {
        let name = format!("{}.time_emb_proj", self.name);
        self.time_emb_proj
            .iter()
            .map(|l| (name.clone(), l))
            .collect()
    }
    pub(crate) fn convs(&self) -> Vec<(String, &Conv)> {
        let mut v = vec![
            (format!("{}.conv1", self.name), &self.conv1),
            (format!("{}.conv2", self.name), &self.conv2),
        ];
        if let Some(c) = &self.shortcut {
            v.push((format!("{}.conv_shortcut", self.name), c));
        }
        v
    }
    fn layers_mut(&mut self) -> LayersMut<'_> {
        let n = &self.name;
        let lin = self
            .time_emb_proj
            .iter_mut()
            .map(|l| (format!("{n}.time_emb_proj"), l))
            .collect();
        let mut conv = vec![
            (format!("{n}.conv1"), &mut self.conv1),
            (format!("{n}.conv2"), &mut self.conv2),
        ];
        if let Some(c) = &mut self.shortcut {
            conv.push((format!("{n}.conv_shortcut"), c));
        }
        (lin, conv)
    }
    pub(crate) fn norms(&self) -> [&Norm; 2] {
        [&self.norm1, &self.norm2]
    }
}

/// diffusers' `Attention` as the UNet uses it: q/k/v without bias, `to_out.0` with one.
#[derive(Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load<E>(
        load: &mut Loader<E>,
        name: &str,
        (c, kv_dim, heads): (usize, usize, usize),
    ) -> std::result::Result<Self, E> {
        Ok(Self {
            to_q: load_linear(load, &format!("{name}.to_q"), (c, c), false)?,
            to_k: load_linear(load, &format!("{name}.to_k"), (kv_dim, c), false)?,
            to_v: load_linear(load, &format!("{name}.to_v"), (kv_dim, c), false)?,
            to_out: load_linear(load, &format!("{name}.to_out.0"), (c, c), true)?,
            heads,
        })
    }

    /// Self-attention of `x` `(B, T, C)` (`ctx` `None`), or cross-attention to `ctx` `(B, S, D)`.
    fn forward(&self, tape: &Tape, x: &Tensor, ctx: Option<&Tensor>, ad: bool) -> Result<Tensor> {
        let q = self.to_q.forward(tape, x, ad)?;
        let kv_in = ctx.unwrap_or(x);
        let k = self.to_k.forward(tape, kv_in, ad)?;
        let v = self.to_v.forward(tape, kv_in, ad)?;
        let o = match ctx {
            None => ops::attention_bidirectional(tape, &q, &k, &v, self.heads, self.heads)?,
            Some(_) => ops::cross_attention(tape, &q, &k, &v, self.heads)?,
        };
        self.to_out.forward(tape, &o, ad)
    }

    fn parts(&self) -> [(&'static str, &Linear); 4] {
        [
            ("to_q", &self.to_q),
            ("to_k", &self.to_k),
            ("to_v", &self.to_v),
            ("to_out.0", &self.to_out),
        ]
    }
    fn parts_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("to_q", &mut self.to_q),
            ("to_k", &mut self.to_k),
            ("to_v", &mut self.to_v),
            ("to_out.0", &mut self.to_out),
        ]
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each after
/// a LayerNorm and added to its input.
#[derive(Clone)]
struct TransformerBlock {
    norm1: Norm,
    attn1: Attention,
    norm2: Norm,
    attn2: Attention,
    norm3: Norm,
    ff_in: Linear,
    ff_out: Linear,
}

/// The LayerNorm epsilon of diffusers' `BasicTransformerBlock` (`norm_eps` default).
const BLOCK_LN_EPS: f32 = 1e-5;
/// The group-norm epsilon of `Transformer2DModel` (fixed in diffusers).
const TRANSFORMER_GN_EPS: f32 = 1e-6;

impl TransformerBlock {
    fn load<E>(
        load: &mut Loader<E>,
        name: &str,
        (c, d, heads): (usize, usize, usize),
    ) -> std::result::Result<Self, E> {
        let n = |p: &str| format!("{name}.{p}");
        Ok(Self {
            norm1: load_norm(load, &n("norm1"), c)?,
            attn1: Attention::load(load, &n("attn1"), (c, c, heads))?,
            norm2: load_norm(load, &n("norm2"), c)?,
            attn2: Attention::load(load, &n("attn2"), (c, d, heads))?,
            norm3: load_norm(load, &n("norm3"), c)?,
            ff_in: load_linear(load, &n("ff.net.0.proj"), (c, 8 * c), true)?,
            ff_out: load_linear(load, &n("ff.net.2"), (4 * c, c), true)?,
        })
    }

    fn forward(&self, tape: &Tape, x: &Tensor, ctx: &Tensor, ad: bool) -> Result<Tensor> {
        let ln = |x: &Tensor, n: &Norm| ops::layer_norm(tape, x, &n.0, Some(&n.1), BLOCK_LN_EPS);
        let h = self.attn1.forward(tape, &ln(x, &self.norm1)?, None, ad)?;
        let x = ops::add(tape, &h, x)?;
        let h = self
            .attn2
            .forward(tape, &ln(&x, &self.norm2)?, Some(ctx), ad)?;
        let x = ops::add(tape, &h, &x)?;
        let h = self.ff_in.forward(tape, &ln(&x, &self.norm3)?, ad)?;
        let h = ops::geglu(tape, &h)?;
        let h = self.ff_out.forward(tape, &h, ad)?;
        ops::add(tape, &h, &x)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v: Vec<(String, &Linear)> = Vec::new();
        for (a, attn) in [("attn1", &self.attn1), ("attn2", &self.attn2)] {
            v.extend(attn.parts().map(|(p, l)| (format!("{a}.{p}"), l)));
        }
        v.push(("ff.net.0.proj".into(), &self.ff_in));
        v.push(("ff.net.2".into(), &self.ff_out));
        v
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v: Vec<(String, &mut Linear)> = Vec::new();
        for (a, attn) in [("attn1", &mut self.attn1), ("attn2", &mut self.attn2)] {
            v.extend(attn.parts_mut().map(|(p, l)| (format!("{a}.{p}"), l)));
        }
        v.push(("ff.net.0.proj".into(), &mut self.ff_in));
        v.push(("ff.net.2".into(), &mut self.ff_out));
        v
    }
}

/// A projection into or out of the transformer: a 1x1 convolution (SD 1.x) or a linear layer
/// (SD 2.x's `use_linear_projection`).
#[derive(Clone)]
enum Proj {
    Conv(Conv),
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, `proj_in`, the pixels as a `(B, H W, C)` sequence through
/// the transformer blocks, `proj_out`, plus the input.
#[derive(Clone)]
struct Transformer2D {
    name: String,
    norm: Norm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
    groups: usize,
}

impl Transformer2D {
    fn load<E>(
        load: &mut Loader<E>,
        name: String,
        (c, d, heads, layers): (usize, usize, usize, usize),
        (groups, linear): (usize, bool),
    ) -> std::result::Result<Self, E> {
        let n = |p: &str| format!("{name}.{p}");
        let proj = |p: &str, load: &mut Loader<E>| -> std::result::Result<Proj, E> {
            Ok(if linear {
                Proj::Linear(load_linear(load, &n(p), (c, c), true)?)
            } else {
                Proj::Conv(load_conv(load, &n(p), (c, c, 1), (1, 0))?)
            })
        };
        let norm = load_norm(load, &n("norm"), c)?;
        let proj_in = proj("proj_in", load)?;
        let mut blocks = Vec::new();
        for i in 0..layers {
            let bn = n(&format!("transformer_blocks.{i}"));
            blocks.push(TransformerBlock::load(load, &bn, (c, d, heads))?);
        }
        let proj_out = proj("proj_out", load)?;
        Ok(Self {
            name,
            norm,
            proj_in,
            blocks,
            proj_out,
            groups,
        })
    }

    fn forward(&self, tape: &Tape, x: &Tensor, ctx: &Tensor, ad: bool) -> Result<Tensor> {
        let [b, c, h, w] = <[usize; 4]>::try_from(x.shape())
            .map_err(|_| CoreError::Internal("Transformer2D input is not (B, C, H, W)"))?;
        let hn = ops::group_norm(
            tape,
            x,
            &self.norm.0,
            Some(&self.norm.1),
            self.groups,
            TRANSFORMER_GN_EPS,
        )?;
        // (B, C, H, W) -> (B, H W, C), projecting before (conv) or after (linear).
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            let t = ops::reshape(tape, t, &[b, c, h * w])?;
            ops::transpose(tape, &t)
        };
        let mut s = match &self.proj_in {
            Proj::Conv(cv) => to_seq(&cv.forward(tape, &hn, ad)?)?,
            Proj::Linear(l) => l.forward(tape, &to_seq(&hn)?, ad)?,
        };
        for blk in &self.blocks {
            s = blk.forward(tape, &s, ctx, ad)?;
        }
        let to_img = |t: &Tensor| -> Result<Tensor> {
            let t = ops::transpose(tape, t)?;
            ops::reshape(tape, &t, &[b, c, h, w])
        };
        let y = match &self.proj_out {
            Proj::Conv(cv) => cv.forward(tape, &to_img(&s)?, ad)?,
            Proj::Linear(l) => to_img(&l.forward(tape, &s, ad)?)?,
        };
        ops::add(tape, &y, x)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        if let Proj::Linear(l) = &self.proj_in {
            v.push((format!("{}.proj_in", self.name), l));
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            for (p, l) in blk.linears() {
                v.push((format!("{}.transformer_blocks.{i}.{p}", self.name), l));
            }
        }
        if let Proj::Linear(l) = &self.proj_out {
            v.push((format!("{}.proj_out", self.name), l));
        }
        v
    }
    fn convs(&self) -> Vec<(String, &Conv)> {
        let mut v = Vec::new();
        for (p, proj) in [("proj_in", &self.proj_in), ("proj_out", &self.proj_out)] {
            if let Proj::Conv(c) = proj {
                v.push((format!("{}.{p}", self.name), c));
            }
        }
        v
    }
    fn layers_mut(&mut self) -> LayersMut<'_> {
        let name = &self.name;
        let (mut lin, mut conv) = (Vec::new(), Vec::new());
        for (p, proj) in [
            ("proj_in", &mut self.proj_in),
            ("proj_out", &mut self.proj_out),
        ] {
            match proj {
                Proj::Conv(c) => conv.push((format!("{name}.{p}"), c)),
                Proj::Linear(l) => lin.push((format!("{name}.{p}"), l)),
            }
        }
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            for (p, l) in blk.linears_mut() {
                lin.push((format!("{name}.transformer_blocks.{i}.{p}"), l));
            }
        }
        (lin, conv)
    }
    fn norms(&self) -> Vec<&Norm> {
        let mut v = vec![&self.norm];
        for b in &self.blocks {
            v.extend([&b.norm1, &b.norm2, &b.norm3]);
        }
        v
    }
}

/// A down, mid or up block: ResNets, each followed by a transformer in cross-attention
/// blocks, and a resampling convolution (`downsamplers.0.conv` / `upsamplers.0.conv`).
#[derive(Clone)]
struct Stage {
    name: String,
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer2D>,
    resample: Option<Conv>,
}

impl Stage {
    fn linears(&self) -> Vec<(String, &Linear)> {
        let r = self.resnets.iter().flat_map(|r| r.linears());
        r.chain(self.attentions.iter().flat_map(|a| a.linears()))
            .collect()
    }
    fn resample_name(&self) -> String {
        let kind = if self.name.starts_with("up") {
            "upsamplers"
        } else {
            "downsamplers"
        };
        format!("{}.{kind}.0.conv", self.name)
    }
    fn convs(&self) -> Vec<(String, &Conv)> {
        let mut v: Vec<(String, &Conv)> = self.resnets.iter().flat_map(|r| r.convs()).collect();
        v.extend(self.attentions.iter().flat_map(|a| a.convs()));
        if let Some(c) = &self.resample {
            v.push((self.resample_name(), c));
        }
        v
    }
    fn layers_mut(&mut self) -> LayersMut<'_> {
        let rn = self.resample_name();
        let (mut lin, mut conv) = (Vec::new(), Vec::new());
        for r in &mut self.resnets {
            let (l, c) = r.layers_mut();
            lin.extend(l);
            conv.extend(c);
        }
        for a in &mut self.attentions {
            let (l, c) = a.layers_mut();
            lin.extend(l);
            conv.extend(c);
        }
        if let Some(c) = &mut self.resample {
            conv.push((rn, c));
        }
        (lin, conv)
    }
    fn norms(&self) -> Vec<&Norm> {
        let mut v: Vec<&Norm> = self.resnets.iter().flat_map(|r| r.norms()).collect();
        v.extend(self.attentions.iter().flat_map(|a| a.norms()));
        v
    }
}

/// The UNet.
pub struct UNet2DCondition {
    cfg: UNetConfig,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv,
    down: Vec<Stage>,
    mid: Option<Stage>,
    up: Vec<Stage>,
    norm_out: Norm,
    conv_out: Conv,
}

impl UNet2DCondition {
    /// Builds the UNet from `load(name, shape)` (diffusers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &UNetConfig,
        load: &mut Loader<E>,
    ) -> std::result::Result<Self, E> {
        cfg.check()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (g, eps, temb) = (cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim);
        let d = cfg.cross_attention_dim;
        let lin = cfg.use_linear_projection;
        let time_linear_1 = load_linear(load, "time_embedding.linear_1", (ch[0], temb), true)?;
        let time_linear_2 = load_linear(load, "time_embedding.linear_2", (temb, temb), true)?;
        let k_in = cfg.conv_in_kernel;
        let conv_in = load_conv(
            load,
            "conv_in",
            (cfg.in_channels, ch[0], k_in),
            (1, k_in / 2),
        )?;
        let mut down = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let name = format!("down_blocks.{i}");
            let mut st = Stage {
                name: name.clone(),
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
            };
            for j in 0..cfg.layers_per_block[i] {
                let rin = if j == 0 { in_c } else { out_c };
                let rn = format!("{name}.resnets.{j}");
                st.resnets.push(Resnet::load(
                    load,
                    rn,
                    (rin, out_c, Some(temb)),
                    (g, eps, 1.0),
                )?);
                if cfg.down_blocks[i] == BlockKind::CrossAttn {
                    let an = format!("{name}.attentions.{j}");
                    let dims = (out_c, d, cfg.heads[i], cfg.transformer_layers[i]);
                    st.attentions
                        .push(Transformer2D::load(load, an, dims, (g, lin))?);
                }
            }
            if i + 1 < n {
                let cn = format!("{name}.downsamplers.0.conv");
                let pad = cfg.downsample_padding;
                st.resample = Some(load_conv(load, &cn, (out_c, out_c, 3), (2, pad))?);
            }
            down.push(st);
        }
        let top = ch[n - 1];
        let mid = if cfg.mid_block {
            let sc = cfg.mid_block_scale_factor;
            let r = |load: &mut Loader<E>, j: usize| {
                let rn = format!("mid_block.resnets.{j}");
                Resnet::load(load, rn, (top, top, Some(temb)), (g, eps, sc))
            };
            let r0 = r(load, 0)?;
            let dims = (top, d, cfg.heads[n - 1], cfg.transformer_layers[n - 1]);
            let a = Transformer2D::load(load, "mid_block.attentions.0".into(), dims, (g, lin))?;
            let r1 = r(load, 1)?;
            Some(Stage {
                name: "mid_block".into(),
                resnets: vec![r0, r1],
                attentions: vec![a],
                resample: None,
            })
        } else {
            None
        };
        // The up path mirrors the down path: up block i works at reversed channels[i] and
        // takes layers + 1 skips, the last from the previous (lower) resolution.
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for i in 0..n {
            let prev = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let name = format!("up_blocks.{i}");
            let bi = n - 1 - i; // the down block this one mirrors
            let layers = cfg.layers_per_block[bi] + 1;
            let mut st = Stage {
                name: name.clone(),
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev } else { out_c };
                let rn = format!("{name}.resnets.{j}");
                st.resnets.push(Resnet::load(
                    load,
                    rn,
                    (rin + skip, out_c, Some(temb)),
                    (g, eps, 1.0),
                )?);
                if cfg.up_blocks[i] == BlockKind::CrossAttn {
                    let an = format!("{name}.attentions.{j}");
                    let dims = (out_c, d, cfg.heads[bi], cfg.transformer_layers[bi]);
                    st.attentions
                        .push(Transformer2D::load(load, an, dims, (g, lin))?);
                }
            }
            if i + 1 < n {
                let cn = format!("{name}.upsamplers.0.conv");
                st.resample = Some(load_conv(load, &cn, (out_c, out_c, 3), (1, 1))?);
            }
            up.push(st);
        }
        let norm_out = load_norm(load, "conv_norm_out", ch[0])?;
        let k_out = cfg.conv_out_kernel;
        let conv_out = load_conv(
            load,
            "conv_out",
            (ch[0], cfg.out_channels, k_out),
            (1, k_out / 2),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            time_linear_1,
            time_linear_2,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The noise (or v) prediction `(B, out_channels, H, W)` for the noisy latents `sample`
    /// `(B, in_channels, H, W)` at `timesteps` (one per image, or one for all), conditioned on
    /// `context` `(B, S, cross_attention_dim)` (the text encoder's states). Any H and W (sides
    /// that are not multiples of [`UNetConfig::size_multiple`] are matched to their skip
    /// connections on the way up). `adapters == false` bypasses every adapter.
    pub fn forward(
        &self,
        tape: &Tape,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        adapters: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let sh = sample.shape();
        let ok = sh.len() == 4 && sh[1] == cfg.in_channels;
        if !ok || sh[2] == 0 || sh[3] == 0 {
            return Err(CoreError::Shape {
                op: "unet",
                what: "sample",
                got: sh.to_vec(),
                expected: format!("[batch, {}, H, W] with H, W >= 1", cfg.in_channels),
            });
        }
        let b = sh[0];
        if context.shape().len() != 3
            || context.shape()[0] != b
            || context.shape()[2] != cfg.cross_attention_dim
        {
            return Err(CoreError::Shape {
                op: "unet",
                what: "encoder_hidden_states",
                got: context.shape().to_vec(),
                expected: format!("[{b}, tokens, {}]", cfg.cross_attention_dim),
            });
        }
        let ts: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => {
                return Err(CoreError::InvalidConfig {
                    field: "timesteps",
                    reason: format!("{n} timesteps for a batch of {b}"),
                })
            }
        };
        let c0 = cfg.block_out_channels[0];
        let emb = timestep_embedding(&ts, c0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let emb = Tensor::new_on(emb, &[b, c0], false, sample.device())?;
        let t = self.time_linear_1.forward(tape, &emb, adapters)?;
        let t = ops::silu(tape, &t)?;
        let temb = self.time_linear_2.forward(tape, &t, adapters)?;
        let temb_act = ops::silu(tape, &temb)?;

        let x = if cfg.center_input_sample {
            let two_x = ops::scale(tape, sample, 2.0)?;
            let ones = Tensor::new_on(
                vec![-1.0; b * cfg.in_channels],
                &[b, cfg.in_channels],
                false,
                sample.device(),
            )?;
            ops::add_planes(tape, &two_x, &ones)?
        } else {
            sample.clone()
        };
        let mut x = self.conv_in.forward(tape, &x, adapters)?;
        let mut skips = vec![x.clone()];
        for st in &self.down {
            for (j, r) in st.resnets.iter().enumerate() {
                x = r.forward(tape, &x, Some(&temb_act), adapters)?;
                if let Some(a) = st.attentions.get(j) {
                    x = a.forward(tape, &x, context, adapters)?;
                }
                skips.push(x.clone());
            }
            if let Some(c) = &st.resample {
                x = c.forward(tape, &x, adapters)?;
                skips.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid {
            x = mid.resnets[0].forward(tape, &x, Some(&temb_act), adapters)?;
            for (a, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                x = a.forward(tape, &x, context, adapters)?;
                x = r.forward(tape, &x, Some(&temb_act), adapters)?;
            }
        }
        for st in &self.up {
            for (j, r) in st.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or(CoreError::Internal(
                    "the up path ran out of skip connections",
                ))?;
                x = ops::concat(tape, &x, &skip, 1)?;
                x = r.forward(tape, &x, Some(&temb_act), adapters)?;
                if let Some(a) = st.attentions.get(j) {
                    x = a.forward(tape, &x, context, adapters)?;
                }
            }
            if let Some(c) = &st.resample {
                x = ops::upsample_nearest2d(tape, &x, 2)?;
                // A side that was odd before its downsampling (stride 2, padding 1: ceil(n/2))
                // comes back one longer: nearest to the skip connection's size, as diffusers'
                // `upsample_size`, is the doubled map without its last row/column.
                if let Some(skip) = skips.last() {
                    let (th, tw) = (skip.shape()[2], skip.shape()[3]);
                    if x.shape()[2] == th + 1 {
                        x = ops::narrow_dim(tape, &x, 2, 0, th)?;
                    }
                    if x.shape()[3] == tw + 1 {
                        x = ops::narrow_dim(tape, &x, 3, 0, tw)?;
                    }
                }
                x = c.forward(tape, &x, adapters)?;
            }
        }
        let h = norm_silu(tape, &x, &self.norm_out, cfg.norm_num_groups, cfg.norm_eps)?;
        self.conv_out.forward(tape, &h, adapters)
    }

    fn stages(&self) -> impl Iterator<Item = &Stage> {
        self.down
            .iter()
            .chain(self.mid.iter())
            .chain(self.up.iter())
    }

    /// Every linear layer with its diffusers module path, in model order (LoRA targets:
    /// `...attn1.to_q`, `...ff.net.2`, `...time_emb_proj`, `time_embedding.linear_1`, ...).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = vec![
            ("time_embedding.linear_1".to_string(), &self.time_linear_1),
            ("time_embedding.linear_2".to_string(), &self.time_linear_2),
        ];
        v.extend(self.stages().flat_map(|s| s.linears()));
        v
    }

    /// Every convolution with its module path, in model order (LoCon targets).
    pub fn convs(&self) -> Vec<(String, &Conv)> {
        let mut v = vec![("conv_in".to_string(), &self.conv_in)];
        v.extend(self.stages().flat_map(|s| s.convs()));
        v.push(("conv_out".to_string(), &self.conv_out));
        v
    }

    /// Adds a LoRA adapter to every linear layer and convolution whose module path matches
    /// one of `targets` (PEFT's `target_modules` rule: the path is the target or ends with
    /// `.` + target; `to_q`, `to_out.0`, `attn2.to_k`, `conv1`, ...). Convolutions get PEFT's
    /// conv LoRA (LoCon). Layer `i` of the model order is initialised from `seed + i`. Returns
    /// how many layers were adapted; an error when a target matches nothing.
    pub fn inject_lora(
        &mut self,
        cfg: &crate::lora::LoraConfig,
        targets: &[String],
        seed: u64,
    ) -> Result<usize> {
        let hit = |name: &str| {
            targets
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}")))
        };
        let (lin, conv) = self.layers_mut();
        let mut used = vec![false; targets.len()];
        let mut n = 0;
        let mut mark = |name: &str| {
            for (u, t) in used.iter_mut().zip(targets) {
                *u |= name == t || name.ends_with(&format!(".{t}"));
            }
        };
        for (i, (name, l)) in lin.into_iter().enumerate() {
            if hit(&name) {
                l.inject(cfg, seed.wrapping_add(i as u64))?;
                mark(&name);
                n += 1;
            }
        }
        for (i, (name, c)) in conv.into_iter().enumerate() {
            if hit(&name) {
                c.inject(cfg, seed.wrapping_add((1 << 20) + i as u64))?;
                mark(&name);
                n += 1;
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(CoreError::InvalidConfig {
                field: "target_modules",
                reason: format!("`{}` matches no layer of the UNet", targets[i]),
            });
        }
        Ok(n)
    }

    /// The adapters' trainable tensors with PEFT's names (`<module>.lora_A.weight`,
    /// `<module>.lora_B.weight`), in model order.
    pub fn lora_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = Vec::new();
        for (name, l) in self.linears() {
            if let Some(a) = l.lora() {
                v.push((format!("{name}.lora_A.weight"), &a.lora_a));
                v.push((format!("{name}.lora_B.weight"), &a.lora_b));
            }
        }
        for (name, c) in self.convs() {
            if let Some(a) = c.lora() {
                v.push((format!("{name}.lora_A.weight"), &a.lora_a));
                v.push((format!("{name}.lora_B.weight"), &a.lora_b));
            }
        }
        v
    }

    /// Every linear layer and every convolution with their module paths, mutable at once (to
    /// merge a LoRA file that touches both).
    pub fn layers_mut(&mut self) -> LayersMut<'_> {
        let mut lin = vec![
            (
                "time_embedding.linear_1".to_string(),
                &mut self.time_linear_1,
            ),
            (
                "time_embedding.linear_2".to_string(),
                &mut self.time_linear_2,
            ),
        ];
        let mut conv = vec![("conv_in".to_string(), &mut self.conv_in)];
        let stages = self
            .down
            .iter_mut()
            .chain(self.mid.iter_mut())
            .chain(self.up.iter_mut());
        for st in stages {
            let (l, c) = st.layers_mut();
            lin.extend(l);
            conv.extend(c);
        }
        conv.push(("conv_out".to_string(), &mut self.conv_out));
        (lin, conv)
    }

    /// The norms' gains and biases (with the linears and convolutions: every tensor).
    pub fn other_tensors(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self
            .stages()
            .flat_map(|s| s.norms())
            .flat_map(|n| [&n.0, &n.1])
            .collect();
        v.extend([&self.norm_out.0, &self.norm_out.1]);
        v
    }

    /// Moves every tensor to `device` in place.
    pub fn to_device(&self, device: crate::Device) -> Result<()> {
        let mut all = self.other_tensors();
        for (_, l) in self.linears() {
            all.extend(l.tensors());
        }
        for (_, c) in self.convs() {
            all.extend(c.tensors());
        }
        for t in all {
            t.to_device(device)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' embedding for t = 0 is `[1 (cos), 0 (sin)]` flipped, and the frequencies
    /// fall from 1 to about 1/10000.
    #[test]
    fn timestep_embedding_layout_and_frequencies() {
        let e = timestep_embedding(&[0.0, 1.0], 6, true, 0.0);
        assert_eq!(&e[..6], &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        // t = 1: cos(freq), freq_i = exp(-ln(1e4) i / 3).
        for i in 0..3 {
            let f = (-(10000f64.ln()) * i as f64 / 3.0).exp();
            assert!((e[6 + i] as f64 - f.cos()).abs() < 1e-6);
            assert!((e[9 + i] as f64 - f.sin()).abs() < 1e-6);
        }
        let e = timestep_embedding(&[1.0], 5, false, 1.0);
        assert_eq!(e[4], 0.0, "odd dims are zero-padded");
        assert!((e[0] as f64 - 1f64.sin()).abs() < 1e-6);
    }
}
