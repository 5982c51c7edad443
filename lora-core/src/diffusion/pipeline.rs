//! Text-to-image sampling as diffusers' `StableDiffusionPipeline` runs it: the initial latents
//! scaled by the sampler's `init_noise_sigma`, then per timestep the UNet on the unconditional
//! and the prompt's conditioning (classifier-free guidance), the guided prediction
//! `uncond + g (text - uncond)`, and one sampler step; finally the VAE decodes
//! `latents / scaling_factor` and pixels map from `[-1, 1]` to `[0, 1]`.

use super::Sampler;
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::models::unet::UNet2DCondition;
use crate::models::vae::AutoencoderKl;
use crate::ops;
use crate::tensor::Tensor;

/// What conditions the denoising.
pub struct Conditioning<'a> {
    /// The prompts' text states `(B, S, D)`.
    pub cond: &'a Tensor,
    /// The negative (or empty) prompts' states `(B, S, D)`, used when `guidance > 1`.
    pub uncond: &'a Tensor,
    /// Classifier-free guidance scale (diffusers' `guidance_scale`; at most 1 runs the
    /// prompt's conditioning alone, as diffusers does).
    pub guidance: f32,
}

/// Runs the sampler from `noise` (`B x C x H x W` standard-normal latents, diffusers'
/// `latents=` argument: scaled by `init_noise_sigma` here) to the final latents (still scaled by
/// the VAE's `scaling_factor`). `on_step(i, n)` is called after each of the `n` steps.
pub fn denoise(
    unet: &UNet2DCondition,
    sampler: &mut dyn Sampler,
    noise: &[f32],
    shape: [usize; 4],
    c: &Conditioning,
    adapters: bool,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let [b, ch, h, w] = shape;
    if noise.len() != b * ch * h * w {
        return Err(CoreError::InvalidConfig {
            field: "latents",
            reason: format!("{} values for latents of shape {shape:?}", noise.len()),
        });
    }
    if !c.guidance.is_finite() {
        return Err(CoreError::InvalidConfig {
            field: "guidance",
            reason: format!("{} is not a number", c.guidance),
        });
    }
    let cfg = c.guidance > 1.0;
    let context = if cfg {
        if c.uncond.shape() != c.cond.shape() {
            return Err(CoreError::Shape {
                op: "denoise",
                what: "negative conditioning",
                got: c.uncond.shape().to_vec(),
                expected: format!("{:?} (the prompt's)", c.cond.shape()),
            });
        }
        ops::concat(&Tape::inference(), c.uncond, c.cond, 0)?
    } else {
        c.cond.clone()
    };
    let dev = c.cond.device();
    let sigma0 = sampler.init_noise_sigma() as f32;
    let mut x: Vec<f32> = noise.iter().map(|v| v * sigma0).collect();
    let timesteps: Vec<f64> = sampler.timesteps().to_vec();
    let n = timesteps.len();
    let per = x.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let scaled = sampler.scale_model_input(&x, i);
        let (input, rows) = if cfg {
            let mut v = scaled.clone();
            v.extend_from_slice(&scaled);
            (v, 2 * b)
        } else {
            (scaled, b)
        };
        let input = Tensor::new_on(input, &[rows, ch, h, w], false, dev)?;
        let out = unet
            .forward(&Tape::inference(), &input, &[t as f32], &context, adapters)?
            .try_to_vec()?;
        let pred: Vec<f32> = if cfg {
            let (u, tx) = out.split_at(per);
            u.iter()
                .zip(tx)
                .map(|(&u, &tx)| u + c.guidance * (tx - u))
                .collect()
        } else {
            out
        };
        x = sampler.step(&pred, i, &x)?;
        on_step(i + 1, n);
    }
    Ok(x)
}

/// Pixels in `[0, 1]`, `(B, 3, H, W)`, from the sampler's final latents: the VAE decodes
/// `latents / scaling_factor + shift_factor`, then `x / 2 + 0.5` is clamped to `[0, 1]`
/// (diffusers' `VaeImageProcessor.postprocess`).
pub fn decode_latents(vae: &AutoencoderKl, latents: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
    let cfg = vae.config();
    let z: Vec<f32> = latents
        .iter()
        .map(|v| v / cfg.scaling_factor + cfg.shift_factor)
        .collect();
    let z = Tensor::new_on(z, &shape, false, vae.device())?;
    let img = vae.decode(&Tape::inference(), &z)?.try_to_vec()?;
    Ok(img
        .into_iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect())
}

/// 8-bit pixels as diffusers' `numpy_to_pil` makes them: `round(x * 255)` (half to even, as
/// NumPy rounds).
pub fn to_u8(x: f32) -> u8 {
    (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8
}
