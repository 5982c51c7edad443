//! Full-parameter training of a small Stable Diffusion pipeline from scratch: every weight of
//! the VAE, the CLIP text encoder and the UNet is a trainable tensor, so the same tape and
//! kernels that train LoRA adapters train the whole models. This is how the diffusion demo's
//! base pipeline is made (`lora demo --task diffusion --build`).
//!
//! Two stages, as latent diffusion is trained: first the autoencoder on images alone
//! ([`pretrain_vae`]), then the text encoder and the UNet together on the frozen autoencoder's
//! latents ([`pretrain_denoiser`]): the DDPM forward process, the MSE against the noise, and
//! an empty caption in a fraction of the examples so that classifier-free guidance has an
//! unconditional prediction to push away from.
//!
//! The autoencoder is trained as a deterministic one: its posterior log-variance is held at
//! -30 (the `quant_conv` rows that produce it are zero with bias -30 and get no gradient), so
//! `latent_dist.sample()` is the mean to within `e^-15`; a small penalty on the latents'
//! magnitude (the mean term of the KL divergence) keeps their scale bounded. Stable
//! Diffusion's own VAE, trained with a KL weight of 1e-6, is nearly deterministic too. The
//! `scaling_factor` written to its config is `1 / std` of the latents ([`latent_scale`]), as
//! Stable Diffusion chose 0.18215.

use crate::optim::{clip_grad_norm, lr_factor, AdamW, Optimizer, ParamGroup, Schedule};
use crate::{Result, TrainError};
use lora_core::diffusion::{NoiseSchedule, ScheduleConfig};
use lora_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use lora_core::models::unet::{UNet2DCondition, UNetConfig};
use lora_core::models::vae::{AutoencoderKl, VaeConfig};
use lora_core::{ops, CoreError, Tape, Tensor};
use lora_io::clip_tokenizer::ClipTokenizer;
use lora_io::images::Rgb8;
use lora_kernels::rng::Rng;
use rayon::prelude::*;
use std::time::Instant;

/// The posterior log-variance the autoencoder is built with (see the module's text).
pub const FIXED_LOGVAR: f32 = -30.0;

/// `(name, tensor)` of a model's parameters in load order (the model's own handles).
pub type Params = Vec<(String, Tensor)>;

/// The initial value of parameter `name` of `shape`, deterministic in `rng`: PyTorch's default
/// for linear and convolution weights (uniform in `±1/sqrt(fan_in)`), zero biases, normalisation
/// weights one, and the embedding tables normal(0, 0.02) as transformers draws CLIP's.
fn initial(name: &str, shape: &[usize], rng: &mut Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        let norm = name.contains("norm") && name.ends_with(".weight");
        return vec![if norm { 1.0 } else { 0.0 }; n];
    }
    if name.contains("embedding.weight") && shape.len() == 2 && !name.contains("time_embedding") {
        return (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
    }
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// Builds a model whose every weight is a fresh trainable tensor ([`initial`]'s rule, in load
/// order from `seed`), returning it with its parameters by name.
pub fn init_model<T>(
    seed: u64,
    build: impl FnOnce(
        &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, CoreError>,
    ) -> std::result::Result<T, CoreError>,
) -> Result<(T, Params)> {
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let mut load = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let t = Tensor::param(initial(name, shape, &mut rng), shape)?;
        params.push((name.to_string(), t.clone()));
        Ok(t)
    };
    let model = build(&mut load)?;
    Ok((model, params))
}

/// A fresh autoencoder: [`init_model`], then the posterior's log-variance held at
/// [`FIXED_LOGVAR`] (`quant_conv`'s rows for it zero, their bias -30; the config must use the
/// quant conv).
pub fn init_vae(cfg: &VaeConfig, seed: u64) -> Result<(AutoencoderKl, Params)> {
    if !cfg.use_quant_conv {
        return Err(TrainError::Setting {
            setting: "use_quant_conv",
            reason: "the from-scratch autoencoder fixes its variance in quant_conv".into(),
        });
    }
    let lc = cfg.latent_channels;
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let mut load = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let mut v = initial(name, shape, &mut rng);
        if name == "quant_conv.weight" {
            // (2 lc, 2 lc, 1, 1): rows lc.. make the log-variance.
            v[lc * 2 * lc..].iter_mut().for_each(|x| *x = 0.0);
        } else if name == "quant_conv.bias" {
            v[lc..].iter_mut().for_each(|x| *x = FIXED_LOGVAR);
        }
        let t = Tensor::param(v, shape)?;
        params.push((name.to_string(), t.clone()));
        Ok(t)
    };
    let model = AutoencoderKl::load(cfg, &mut load)?;
    Ok((model, params))
}

/// `img` as `(3, H, W)` values in `[-1, 1]` (the pipelines' image normalisation).
pub fn to_unit(img: &Rgb8) -> Vec<f32> {
    let (h, w) = (img.height, img.width);
    let mut out = vec![0.0f32; 3 * h * w];
    for (p, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * h * w + p] = px[c] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    out
}

/// A from-scratch optimisation run's settings (AdamW, warmup then cosine, clipping at 1).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Seed of the sampling (images, noise, timesteps).
    pub seed: u64,
}

impl RunConfig {
    fn check(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::Setting {
                setting: "pretrain-steps",
                reason: "steps, batch size and learning rate must be positive".into(),
            });
        }
        Ok(())
    }
}

/// What a pretraining stage did.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSummary {
    /// Parameters trained.
    pub params: usize,
    /// Mean training loss of the first and of the last 10% of steps.
    pub first_loss: f32,
    /// See `first_loss`.
    pub last_loss: f32,
    /// Wall time.
    pub seconds: f64,
}

fn summary(params: usize, losses: &[f32], t0: Instant) -> StageSummary {
    let k = (losses.len() / 10).max(1);
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    StageSummary {
        params,
        first_loss: mean(&losses[..k.min(losses.len())]),
        last_loss: mean(&losses[losses.len().saturating_sub(k)..]),
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// One optimizer step on `loss`, with the schedule's rate; errors on a non-finite loss.
fn descend(
    tape: &Tape,
    loss: &Tensor,
    (params, groups, opt): (&[Tensor], &[ParamGroup], &mut AdamW),
    run: &RunConfig,
    step: usize,
) -> Result<f32> {
    let l = loss.scalar()?;
    if !l.is_finite() {
        return Err(TrainError::Setting {
            setting: "lr",
            reason: format!("the loss became {l} at step {}", step + 1),
        });
    }
    let mut grads = tape.backward(loss)?;
    clip_grad_norm(&mut grads, params, 1.0)?;
    let lr = run.lr * lr_factor(Schedule::Cosine, step, run.warmup, run.steps);
    opt.step(groups, &grads, lr)?;
    Ok(l)
}

/// Pixels `(B, 3, H, W)` of images `base..base + batch` drawn by `sample` (in parallel; every
/// image must have the same size).
fn pixel_batch(
    sample: &(dyn Fn(u64) -> Rgb8 + Sync),
    base: u64,
    batch: usize,
) -> Result<(Vec<f32>, [usize; 4])> {
    let imgs: Vec<Rgb8> = (0..batch as u64)
        .into_par_iter()
        .map(|i| sample(base + i))
        .collect();
    let (h, w) = (imgs[0].height, imgs[0].width);
    if imgs.iter().any(|m| (m.height, m.width) != (h, w)) {
        return Err(TrainError::Setting {
            setting: "resolution",
            reason: "the generated images differ in size".into(),
        });
    }
    let px: Vec<f32> = imgs.iter().flat_map(to_unit).collect();
    Ok((px, [batch, 3, h, w]))
}

/// Trains a fresh autoencoder (`init_vae(cfg, seed)`) to reconstruct the images `sample(i)`
/// draws (`i` = step x batch + k: a new image every time): MSE of the decoded latent mean
/// against the image, plus `latent_penalty` x the mean square of the latents.
/// `on_step(step, total, loss)` sees every step.
pub fn pretrain_vae(
    cfg: &VaeConfig,
    seed: u64,
    run: &RunConfig,
    latent_penalty: f32,
    sample: &(dyn Fn(u64) -> Rgb8 + Sync),
    on_step: &mut dyn FnMut(usize, usize, f32),
) -> Result<(AutoencoderKl, Params, StageSummary)> {
    run.check()?;
    let (vae, params) = init_vae(cfg, seed)?;
    let trainable: Vec<Tensor> = params.iter().map(|(_, t)| t.clone()).collect();
    let groups = [ParamGroup {
        params: trainable.clone(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, run.weight_decay);
    let t0 = Instant::now();
    let mut losses = Vec::with_capacity(run.steps);
    for step in 0..run.steps {
        let (px, shape) = pixel_batch(sample, (step * run.batch) as u64, run.batch)?;
        let pixels = Tensor::new(px, &shape)?;
        let tape = Tape::new(lora_kernels::rng::splitmix64(run.seed ^ step as u64));
        let (mean, _) = vae.encode(&tape, &pixels)?;
        let rec = vae.decode(&tape, &mean)?;
        let mut loss = ops::mse_loss(&tape, &rec, &pixels, None)?;
        if latent_penalty > 0.0 {
            let zero = Tensor::new(vec![0.0; mean.numel()], mean.shape())?;
            let pen = ops::mse_loss(&tape, &mean, &zero, None)?;
            let pen = ops::scale(&tape, &pen, latent_penalty)?;
            loss = ops::add(&tape, &loss, &pen)?;
        }
        let l = descend(&tape, &loss, (&trainable, &groups, &mut opt), run, step)?;
        losses.push(l);
        on_step(step + 1, run.steps, l);
    }
    let n = trainable.iter().map(Tensor::numel).sum();
    Ok((vae, params, summary(n, &losses, t0)))
}

/// The latent means of `pixels` (`(n, 3, H, W)` values, encoded `batch` at a time).
pub fn encode_means(
    vae: &AutoencoderKl,
    pixels: &[f32],
    shape: [usize; 4],
    batch: usize,
) -> Result<Vec<f32>> {
    let per = shape[1] * shape[2] * shape[3];
    let mut out = Vec::new();
    for chunk in pixels.chunks(per * batch.max(1)) {
        let b = chunk.len() / per;
        let t = Tensor::new(chunk.to_vec(), &[b, shape[1], shape[2], shape[3]])?;
        let (m, _) = vae.encode(&Tape::inference(), &t)?;
        out.extend(m.try_to_vec()?);
    }
    Ok(out)
}

/// The `scaling_factor` that gives `latents` unit standard deviation (`1 / std`, rounded to 5
/// significant digits as configs write it: SD's 0.18215).
pub fn latent_scale(latents: &[f32]) -> f32 {
    let n = latents.len().max(1) as f64;
    let mean = latents.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = latents
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let s = 1.0 / var.sqrt().max(1e-12);
    let digits = 4 - s.log10().floor() as i32;
    let p = 10f64.powi(digits);
    ((s * p).round() / p) as f32
}

/// The denoiser stage's inputs besides the run settings.
pub struct DenoiserData<'a> {
    /// The trained (frozen) autoencoder.
    pub vae: &'a AutoencoderKl,
    /// Its `scaling_factor`.
    pub scaling_factor: f32,
    /// The prompt tokenizer.
    pub tokenizer: &'a ClipTokenizer,
    /// The training noise schedule (`scheduler_config.json`).
    pub schedule: &'a ScheduleConfig,
    /// `examples` images with their captions are drawn once by `sample(i)` and encoded once.
    pub sample: &'a (dyn Fn(u64) -> (Rgb8, String) + Sync),
    /// How many.
    pub examples: usize,
    /// The fraction of examples whose caption is replaced by the empty prompt.
    pub uncond_prob: f64,
}

/// The trained text encoder and UNet, with their parameters.
pub struct Denoiser {
    /// The text encoder.
    pub text_encoder: ClipTextModel,
    /// Its parameters.
    pub text_params: Params,
    /// The UNet.
    pub unet: UNet2DCondition,
    /// Its parameters.
    pub unet_params: Params,
}

/// Trains a fresh text encoder and UNet (seeds `seed` and `seed + 1`) together on `data`: per
/// step, `run.batch` examples (a shuffled pass over them, repeated), latents scaled by
/// `scaling_factor`, a uniform timestep, the DDPM forward process and the MSE against the
/// noise (or `v`), the text states computed on the tape so that the text encoder learns with
/// the UNet. `on_step(step, total, loss)` sees every step.
pub fn pretrain_denoiser(
    (text_cfg, unet_cfg): (&ClipTextConfig, &UNetConfig),
    seed: u64,
    run: &RunConfig,
    data: &DenoiserData,
    on_step: &mut dyn FnMut(usize, usize, f32),
) -> Result<(Denoiser, StageSummary)> {
    run.check()?;
    if data.examples == 0 {
        return Err(TrainError::Setting {
            setting: "examples",
            reason: "at least one training example is needed".into(),
        });
    }
    if unet_cfg.cross_attention_dim != text_cfg.hidden_size {
        return Err(TrainError::Setting {
            setting: "cross_attention_dim",
            reason: format!(
                "the UNet attends to {} features, the text encoder gives {}",
                unet_cfg.cross_attention_dim, text_cfg.hidden_size
            ),
        });
    }
    // The dataset, drawn and encoded once.
    let drawn: Vec<(Rgb8, String)> = (0..data.examples as u64)
        .into_par_iter()
        .map(|i| (data.sample)(i))
        .collect();
    let (h, w) = (drawn[0].0.height, drawn[0].0.width);
    if drawn.iter().any(|(m, _)| (m.height, m.width) != (h, w)) {
        return Err(TrainError::Setting {
            setting: "resolution",
            reason: "the generated images differ in size".into(),
        });
    }
    let pixels: Vec<f32> = drawn.iter().flat_map(|(m, _)| to_unit(m)).collect();
    let latents = encode_means(data.vae, &pixels, [data.examples, 3, h, w], 64)?;
    let per = latents.len() / data.examples;
    let f = data.vae.config().downscale();
    let lat = [data.vae.config().latent_channels, h / f, w / f];
    let seq = data.tokenizer.max_len();
    let empty = data.tokenizer.encode_prompt("")?;
    let ids: Vec<Vec<u32>> = drawn
        .iter()
        .map(|(_, c)| data.tokenizer.encode_prompt(c))
        .collect::<std::result::Result<_, _>>()?;
    drop(drawn);

    let (text_encoder, text_params) = init_model(seed, |l| ClipTextModel::load(text_cfg, l))?;
    let (unet, unet_params) =
        init_model(seed.wrapping_add(1), |l| UNet2DCondition::load(unet_cfg, l))?;
    let trainable: Vec<Tensor> = text_params
        .iter()
        .chain(&unet_params)
        .map(|(_, t)| t.clone())
        .collect();
    let groups = [ParamGroup {
        params: trainable.clone(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, run.weight_decay);
    let schedule = NoiseSchedule::new(data.schedule)?;
    let t_max = data.schedule.num_train_timesteps as u64;
    let mut sampler = crate::batches::Sampler::new(data.examples, run.seed);
    let mut rng = Rng::new(run.seed ^ 0xd1ff_5eed);
    let t0 = Instant::now();
    let mut losses = Vec::with_capacity(run.steps);
    for step in 0..run.steps {
        let idx = sampler.take(run.batch);
        let b = idx.len();
        let (mut noisy, mut target, mut tokens, mut ts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in &idx {
            let x0: Vec<f32> = latents[i * per..(i + 1) * per]
                .iter()
                .map(|&v| v * data.scaling_factor)
                .collect();
            let noise: Vec<f32> = (0..per).map(|_| rng.normal() as f32).collect();
            let t = (rng.next_u64() % t_max) as usize;
            noisy.extend(schedule.add_noise(&x0, &noise, t)?);
            target.extend(schedule.target(&x0, &noise, t)?);
            let uncond = rng.uniform() < data.uncond_prob;
            tokens.extend_from_slice(if uncond { &empty } else { &ids[i] });
            ts.push(t as f32);
        }
        let noisy = Tensor::new(noisy, &[b, lat[0], lat[1], lat[2]])?;
        let target = Tensor::new(target, &[b, lat[0], lat[1], lat[2]])?;
        let tape = Tape::new(lora_kernels::rng::splitmix64(run.seed ^ step as u64));
        let ctx = text_encoder.forward(&tape, &tokens, (b, seq), 0, false)?;
        let pred = unet.forward(&tape, &noisy, &ts, &ctx, false)?;
        let loss = ops::mse_loss(&tape, &pred, &target, None)?;
        let l = descend(&tape, &loss, (&trainable, &groups, &mut opt), run, step)?;
        losses.push(l);
        on_step(step + 1, run.steps, l);
    }
    let n = trainable.iter().map(Tensor::numel).sum();
    Ok((
        Denoiser {
            text_encoder,
            text_params,
            unet,
            unet_params,
        },
        summary(n, &losses, t0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_scale_is_one_over_the_standard_deviation_to_five_digits() {
        let mut rng = Rng::new(1);
        let v: Vec<f32> = (0..20000).map(|_| (rng.normal() * 5.4321) as f32).collect();
        let s = latent_scale(&v);
        assert!((s - 1.0 / 5.4321).abs() < 0.004, "{s}");
        // Five significant digits, as a config writes it.
        let txt = format!("{s}");
        assert!(
            txt.trim_start_matches("0.").trim_start_matches('0').len() <= 5,
            "{txt}"
        );
    }

    fn fixture(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/parity/sd_pipeline/model")
            .join(rel)
    }

    fn tiny_vae() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            scaling_factor: 1.0,
            shift_factor: 0.0,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_attention: true,
        }
    }

    fn random_image(i: u64, side: usize) -> Rgb8 {
        let mut rng = Rng::new(100 + i);
        let data = (0..side * side * 3)
            .map(|_| (rng.next_u64() % 256) as u8)
            .collect();
        Rgb8::new(side, side, data).unwrap()
    }

    /// Whether every parameter moved from its initial value `init` (some element of it).
    fn all_moved(init: &Params, now: &Params) -> Vec<String> {
        init.iter()
            .zip(now)
            .filter(|((_, a), (_, b))| a.try_to_vec().unwrap() == b.try_to_vec().unwrap())
            .map(|((n, _), _)| n.clone())
            .collect()
    }

    #[test]
    fn every_weight_of_the_autoencoder_learns_but_the_fixed_variance() {
        let cfg = tiny_vae();
        let run = RunConfig {
            steps: 3,
            batch: 2,
            lr: 1e-3,
            warmup: 0,
            weight_decay: 0.0,
            seed: 4,
        };
        let (_, trained, sum) = pretrain_vae(
            &cfg,
            9,
            &run,
            1e-3,
            &|i| random_image(i, 8),
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(sum.first_loss.is_finite() && sum.last_loss.is_finite());
        let (_, init) = init_vae(&cfg, 9).unwrap();
        assert_eq!(all_moved(&init, &trained), Vec::<String>::new());
        // The log-variance rows of quant_conv kept their values exactly.
        let get = |p: &Params, n: &str| {
            p.iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .try_to_vec()
                .unwrap()
        };
        assert_eq!(
            get(&init, "quant_conv.weight")[32..],
            get(&trained, "quant_conv.weight")[32..]
        );
        assert_eq!(get(&trained, "quant_conv.bias")[4..], [FIXED_LOGVAR; 4]);
        assert_ne!(
            get(&init, "quant_conv.weight")[..32],
            get(&trained, "quant_conv.weight")[..32]
        );
    }

    #[test]
    fn every_weight_of_the_text_encoder_and_the_unet_learns_and_the_loss_falls() {
        let read = |rel: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(fixture(rel)).unwrap()).unwrap()
        };
        let tcfg = lora_io::diffusion::clip_text_config(
            &fixture("text_encoder/config.json"),
            &read("text_encoder/config.json"),
        )
        .unwrap();
        let ucfg = lora_io::diffusion::unet_config(
            &fixture("unet/config.json"),
            &read("unet/config.json"),
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(fixture("tokenizer")).unwrap();
        let sched_path = fixture("scheduler/scheduler_config.json");
        let sched = lora_io::diffusion::scheduler_config(
            &sched_path,
            &read("scheduler/scheduler_config.json"),
            lora_io::diffusion::SamplerKind::Ddim,
        )
        .unwrap();
        let (vae, _) = init_vae(&tiny_vae(), 1).unwrap();
        let captions = ["a red cat", "a blue dog"];
        let sample = |i: u64| {
            (
                random_image(i % 2, 16),
                captions[(i % 2) as usize].to_string(),
            )
        };
        let data = DenoiserData {
            vae: &vae,
            scaling_factor: 1.0,
            tokenizer: &tok,
            schedule: &sched,
            sample: &sample,
            examples: 4,
            uncond_prob: 0.5,
        };
        let run = RunConfig {
            steps: 40,
            batch: 4,
            lr: 3e-3,
            warmup: 0,
            weight_decay: 0.0,
            seed: 5,
        };
        let (den, sum) =
            pretrain_denoiser((&tcfg, &ucfg), 11, &run, &data, &mut |_, _, _| {}).unwrap();
        assert!(sum.last_loss < 0.8 * sum.first_loss, "{sum:?}");
        let (_, t0) = init_model(11, |l| ClipTextModel::load(&tcfg, l)).unwrap();
        let (_, u0) = init_model(12, |l| UNet2DCondition::load(&ucfg, l)).unwrap();
        assert_eq!(all_moved(&t0, &den.text_params), Vec::<String>::new());
        assert_eq!(all_moved(&u0, &den.unet_params), Vec::<String>::new());
    }

    #[test]
    fn the_autoencoder_starts_with_its_variance_fixed() {
        let (vae, _) = init_vae(&tiny_vae(), 7).unwrap();
        let mut rng = Rng::new(2);
        let px: Vec<f32> = (0..2 * 3 * 8 * 8).map(|_| rng.uniform() as f32).collect();
        let t = Tensor::new(px, &[2, 3, 8, 8]).unwrap();
        let (m, lv) = vae.encode(&Tape::inference(), &t).unwrap();
        assert!(lv.try_to_vec().unwrap().iter().all(|&v| v == FIXED_LOGVAR));
        assert!(m.try_to_vec().unwrap().iter().any(|&v| v != 0.0));
    }
}
