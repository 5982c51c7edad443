//! Stable Diffusion's image autoencoder: diffusers' `AutoencoderKL`. The encoder maps pixels in
//! `[-1, 1]` to the mean and log-variance of a diagonal Gaussian over latents 8x smaller (for
//! SD's four levels); the decoder maps latents back to pixels. Pipelines scale latents by the
//! config's `scaling_factor` (0.18215 for SD 1.x/2.x) between the two and the UNet. Parameter
//! names are diffusers' (`encoder.down_blocks.0.resnets.0.conv1`, ...); the older attention
//! names of the mid block (`query`, `key`, `value`, `proj_attn`) are read by the loader in
//! `lora-io`.

use super::unet::{load_conv, load_linear, load_norm, norm_silu, Loader, Norm, Resnet};
use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::ops;
use crate::tensor::Tensor;

/// The fields of `vae/config.json` the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// `in_channels` (3).
    pub in_channels: usize,
    /// `out_channels` (3).
    pub out_channels: usize,
    /// `latent_channels` (4).
    pub latent_channels: usize,
    /// `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block` (the decoder's blocks have one more).
    pub layers_per_block: usize,
    /// `norm_num_groups`.
    pub norm_num_groups: usize,
    /// `scaling_factor`: latents are multiplied by it before the UNet, divided after.
    pub scaling_factor: f32,
    /// `shift_factor` (subtracted before scaling; 0 for SD 1.x/2.x).
    pub shift_factor: f32,
    /// `use_quant_conv`.
    pub use_quant_conv: bool,
    /// `use_post_quant_conv`.
    pub use_post_quant_conv: bool,
    /// `mid_block_add_attention`.
    pub mid_block_attention: bool,
}

/// The epsilon of every group norm in diffusers' `Encoder` and `Decoder` (fixed there).
const VAE_EPS: f32 = 1e-6;

impl VaeConfig {
    /// Checks sizes and that the groups divide every block's channels.
    pub fn check(&self) -> Result<()> {
        let inv = |field: &'static str, reason: String| CoreError::InvalidConfig { field, reason };
        if self.block_out_channels.is_empty() {
            return Err(inv("block_out_channels", "must not be empty".into()));
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
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if v == 0 {
                return Err(inv(field, "must be at least 1".into()));
            }
        }
        let scale_ok = self.scaling_factor.is_finite() && self.scaling_factor != 0.0;
        if !scale_ok || !self.shift_factor.is_finite() {
            return Err(inv(
                "scaling_factor",
                format!(
                    "{} (shift {}): a finite, non-zero scale is needed",
                    self.scaling_factor, self.shift_factor
                ),
            ));
        }
        Ok(())
    }

    /// Pixels per latent along each side (2 per downsampling).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The mid block's single-head attention over the pixels (`Attention` with a group norm and a
/// residual connection, diffusers' `_from_deprecated_attn_block`).
#[derive(Clone)]
struct SpatialAttention {
    norm: Norm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    groups: usize,
}

impl SpatialAttention {
    fn load<E>(
        load: &mut Loader<E>,
        name: &str,
        c: usize,
        groups: usize,
    ) -> std::result::Result<Self, E> {
        let l =
            |load: &mut Loader<E>, p: &str| load_linear(load, &format!("{name}.{p}"), (c, c), true);
        Ok(Self {
            norm: load_norm(load, &format!("{name}.group_norm"), c)?,
            to_q: l(load, "to_q")?,
            to_k: l(load, "to_k")?,
            to_v: l(load, "to_v")?,
            to_out: l(load, "to_out.0")?,
            groups,
        })
    }

    fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = <[usize; 4]>::try_from(x.shape())
            .map_err(|_| CoreError::Internal("VAE attention input is not (B, C, H, W)"))?;
        let hn = ops::group_norm(
            tape,
            x,
            &self.norm.0,
            Some(&self.norm.1),
            self.groups,
            VAE_EPS,
        )?;
        let s = ops::reshape(tape, &hn, &[b, c, h * w])?;
        let s = ops::transpose(tape, &s)?;
        let q = self.to_q.forward(tape, &s, false)?;
        let k = self.to_k.forward(tape, &s, false)?;
        let v = self.to_v.forward(tape, &s, false)?;
        let o = ops::attention_bidirectional(tape, &q, &k, &v, 1, 1)?;
        let o = self.to_out.forward(tape, &o, false)?;
        let o = ops::transpose(tape, &o)?;
        let o = ops::reshape(tape, &o, &[b, c, h, w])?;
        ops::add(tape, &o, x)
    }
}

/// `UNetMidBlock2D` without a time embedding: ResNet, attention, ResNet.
#[derive(Clone)]
struct MidBlock {
    r0: Resnet,
    attn: Option<SpatialAttention>,
    r1: Resnet,
}

impl MidBlock {
    fn load<E>(
        load: &mut Loader<E>,
        prefix: &str,
        c: usize,
        (groups, attention): (usize, bool),
    ) -> std::result::Result<Self, E> {
        let r = |load: &mut Loader<E>, j: usize| {
            let name = format!("{prefix}.mid_block.resnets.{j}");
            Resnet::load(load, name, (c, c, None), (groups, VAE_EPS, 1.0))
        };
        let r0 = r(load, 0)?;
        let attn = if attention {
            let name = format!("{prefix}.mid_block.attentions.0");
            Some(SpatialAttention::load(load, &name, c, groups)?)
        } else {
            None
        };
        Ok(Self {
            r0,
            attn,
            r1: r(load, 1)?,
        })
    }

    fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let mut x = self.r0.forward(tape, x, None, false)?;
        if let Some(a) = &self.attn {
            x = a.forward(tape, &x)?;
        }
        self.r1.forward(tape, &x, None, false)
    }
}

/// A level of the encoder or decoder: ResNets and a resampling convolution.
#[derive(Clone)]
struct Level {
    resnets: Vec<Resnet>,
    resample: Option<Conv>,
}

/// The autoencoder (frozen: Stable Diffusion training encodes images once and never trains it).
pub struct AutoencoderKl {
    cfg: VaeConfig,
    enc_conv_in: Conv,
    enc_down: Vec<Level>,
    enc_mid: MidBlock,
    enc_norm_out: Norm,
    enc_conv_out: Conv,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    dec_conv_in: Conv,
    dec_mid: MidBlock,
    dec_up: Vec<Level>,
    dec_norm_out: Norm,
    dec_conv_out: Conv,
}

impl AutoencoderKl {
    /// Builds the autoencoder from `load(name, shape)` (diffusers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &VaeConfig,
        load: &mut Loader<E>,
    ) -> std::result::Result<Self, E> {
        cfg.check()?;
        let ch = &cfg.block_out_channels;
        let (n, g, lc) = (ch.len(), cfg.norm_num_groups, cfg.latent_channels);
        let top = ch[n - 1];
        let res = |load: &mut Loader<E>, name: String, inp: usize, out: usize| {
            Resnet::load(load, name, (inp, out, None), (g, VAE_EPS, 1.0))
        };
        let enc_conv_in = load_conv(load, "encoder.conv_in", (cfg.in_channels, ch[0], 3), (1, 1))?;
        let mut enc_down = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let name = format!("encoder.down_blocks.{i}.resnets.{j}");
                resnets.push(res(load, name, if j == 0 { in_c } else { out_c }, out_c)?);
            }
            // Downsample2D with padding 0: the input is padded by one zero row and column at
            // the bottom and right, then a stride-2 3x3 convolution without padding.
            let resample = if i + 1 < n {
                let name = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                Some(load_conv(load, &name, (out_c, out_c, 3), (2, 0))?)
            } else {
                None
            };
            enc_down.push(Level { resnets, resample });
        }
        let attn = cfg.mid_block_attention;
        let enc_mid = MidBlock::load(load, "encoder", top, (g, attn))?;
        let enc_norm_out = load_norm(load, "encoder.conv_norm_out", top)?;
        let enc_conv_out = load_conv(load, "encoder.conv_out", (top, 2 * lc, 3), (1, 1))?;
        let quant_conv = if cfg.use_quant_conv {
            Some(load_conv(load, "quant_conv", (2 * lc, 2 * lc, 1), (1, 0))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(load_conv(load, "post_quant_conv", (lc, lc, 1), (1, 0))?)
        } else {
            None
        };
        let dec_conv_in = load_conv(load, "decoder.conv_in", (lc, top, 3), (1, 1))?;
        let dec_mid = MidBlock::load(load, "decoder", top, (g, attn))?;
        let mut dec_up = Vec::new();
        let mut out_c = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            let prev = out_c;
            out_c = c;
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                let name = format!("decoder.up_blocks.{i}.resnets.{j}");
                resnets.push(res(load, name, if j == 0 { prev } else { out_c }, out_c)?);
            }
            let resample = if i + 1 < n {
                let name = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
                Some(load_conv(load, &name, (out_c, out_c, 3), (1, 1))?)
            } else {
                None
            };
            dec_up.push(Level { resnets, resample });
        }
        let dec_norm_out = load_norm(load, "decoder.conv_norm_out", ch[0])?;
        let dec_conv_out = load_conv(
            load,
            "decoder.conv_out",
            (ch[0], cfg.out_channels, 3),
            (1, 1),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            enc_conv_in,
            enc_down,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_up,
            dec_norm_out,
            dec_conv_out,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The device its weights are on.
    pub fn device(&self) -> crate::Device {
        self.enc_conv_in.base().0.device()
    }

    fn check_input(&self, what: &'static str, x: &Tensor, c: usize, m: usize) -> Result<()> {
        let s = x.shape();
        let ok = s.len() == 4
            && s[0] > 0
            && s[1] == c
            && s[2] > 0
            && s[3] > 0
            && s[2].is_multiple_of(m)
            && s[3].is_multiple_of(m);
        if !ok {
            return Err(CoreError::Shape {
                op: "vae",
                what,
                got: s.to_vec(),
                expected: format!("[batch, {c}, H, W] with H and W positive multiples of {m}"),
            });
        }
        Ok(())
    }

    /// The latent distribution of `pixels` `(B, in_channels, H, W)` in `[-1, 1]` (H and W
    /// multiples of [`VaeConfig::downscale`]): `(mean, logvar)`, each
    /// `(B, latent_channels, H / f, W / f)`, the log-variance clamped to `[-30, 20]` as
    /// diffusers' `DiagonalGaussianDistribution` does. Unscaled (multiply by
    /// `scaling_factor` for the UNet).
    pub fn encode(&self, tape: &Tape, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_input("pixels", pixels, self.cfg.in_channels, self.cfg.downscale())?;
        let mut x = self.enc_conv_in.forward(tape, pixels, false)?;
        for lv in &self.enc_down {
            for r in &lv.resnets {
                x = r.forward(tape, &x, None, false)?;
            }
            if let Some(c) = &lv.resample {
                x = pad_bottom_right(tape, &x)?;
                x = c.forward(tape, &x, false)?;
            }
        }
        x = self.enc_mid.forward(tape, &x)?;
        let top = *self.cfg.block_out_channels.last().unwrap_or(&0);
        x = norm_silu(
            tape,
            &x,
            &self.enc_norm_out,
            self.cfg.norm_num_groups,
            VAE_EPS,
        )?;
        debug_assert_eq!(x.shape()[1], top);
        x = self.enc_conv_out.forward(tape, &x, false)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(tape, &x, false)?;
        }
        let lc = self.cfg.latent_channels;
        let mean = ops::narrow_dim(tape, &x, 1, 0, lc)?;
        let logvar = ops::narrow_dim(tape, &x, 1, lc, lc)?;
        let clamped: Vec<f32> = logvar
            .try_to_vec()?
            .into_iter()
            .map(|v| v.clamp(-30.0, 20.0))
            .collect();
        let logvar = Tensor::new_on(clamped, logvar.shape(), false, logvar.device())?;
        Ok((mean, logvar))
    }

    /// Pixels `(B, out_channels, H f, W f)` (about `[-1, 1]`) decoded from unscaled latents `z`
    /// `(B, latent_channels, H, W)` (divide the UNet's latents by `scaling_factor` first).
    pub fn decode(&self, tape: &Tape, z: &Tensor) -> Result<Tensor> {
        self.check_input("latents", z, self.cfg.latent_channels, 1)?;
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(tape, z, false)?,
            None => z.clone(),
        };
        x = self.dec_conv_in.forward(tape, &x, false)?;
        x = self.dec_mid.forward(tape, &x)?;
        for lv in &self.dec_up {
            for r in &lv.resnets {
                x = r.forward(tape, &x, None, false)?;
            }
            if let Some(c) = &lv.resample {
                x = ops::upsample_nearest2d(tape, &x, 2)?;
                x = c.forward(tape, &x, false)?;
            }
        }
        x = norm_silu(
            tape,
            &x,
            &self.dec_norm_out,
            self.cfg.norm_num_groups,
            VAE_EPS,
        )?;
        self.dec_conv_out.forward(tape, &x, false)
    }
}

/// `x` `(B, C, H, W)` with one zero row below and one zero column to the right
/// (`F.pad(x, (0, 1, 0, 1))`).
fn pad_bottom_right(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = <[usize; 4]>::try_from(x.shape())
        .map_err(|_| CoreError::Internal("padding input is not (B, C, H, W)"))?;
    let dev = x.device();
    let col = Tensor::new_on(vec![0.0; b * c * h], &[b, c, h, 1], false, dev)?;
    let x = ops::concat(tape, x, &col, 3)?;
    let row = Tensor::new_on(vec![0.0; b * c * (w + 1)], &[b, c, 1, w + 1], false, dev)?;
    ops::concat(tape, &x, &row, 2)
}
