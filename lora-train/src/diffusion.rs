//! Stable Diffusion LoRA training, as diffusers' `train_text_to_image_lora.py` does it: images
//! resized (shorter side to the resolution, bilinear with antialiasing), cropped (center or
//! random) and optionally flipped, mapped to `[-1, 1]`, encoded by the frozen VAE
//! (`latent_dist.sample() * scaling_factor`); per step, noise (plus an optional per-channel
//! offset), uniform timesteps, the DDPM forward process, the UNet with LoRA adapters on the
//! prompt's frozen text states, and the MSE against the noise (or `v`), optionally min-SNR
//! weighted; AdamW on the adapters with gradient clipping.
//!
//! The VAE and the text encoder are frozen, so each image's latent distribution (both
//! orientations when flipping) and each caption's text states are computed once and reused;
//! latents are still *sampled* from the cached distribution at every step, as diffusers samples
//! them. Random crops change the pixels every step: then each step encodes its crops.

use crate::batches::Sampler;
use crate::optim::{
    clip_grad_norm, lr_factor, AdamW, Optimizer, OptimizerState, ParamGroup, Schedule,
};
use lora_core::diffusion::{NoiseSchedule, Prediction};
use lora_core::lora::LoraConfig;
use lora_core::{ops, CoreError, Tape, Tensor};
use lora_io::error::IoError;
use lora_io::images::{resize, Filter, Rgb8};
use lora_io::sd::SdPipeline;
use lora_kernels::rng::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors of a training run.
pub type Result<T> = std::result::Result<T, IoError>;

/// One training image and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct SdExample {
    /// The image file.
    pub image: PathBuf,
    /// The caption.
    pub caption: String,
}

fn cfg_err(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// The images of `dir` with their captions: `metadata.jsonl` (one `{"file_name": ..., "text":
/// ...}` per line, diffusers' imagefolder) when present, else every `.png` / `.jpg` / `.jpeg`
/// with the caption in the `.txt` of the same name (kohya's layout). Sorted by file name.
pub fn read_image_folder(dir: &Path) -> Result<Vec<SdExample>> {
    if !dir.is_dir() {
        return Err(IoError::Missing {
            path: dir.into(),
            what: "image folder (images with .txt captions, or a metadata.jsonl)",
        });
    }
    let meta = dir.join("metadata.jsonl");
    let mut out = Vec::new();
    if meta.exists() {
        let Some(bytes) = lora_io::files::read_small(&meta, "metadata.jsonl")? else {
            return Err(IoError::Missing {
                path: meta,
                what: "metadata.jsonl",
            });
        };
        let text = String::from_utf8_lossy(&bytes);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let field = format!("line {}", i + 1);
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| cfg_err(&meta, &field, format!("not JSON: {e}")))?;
            let name = v["file_name"]
                .as_str()
                .ok_or_else(|| cfg_err(&meta, &field, "no `file_name` string"))?;
            let caption = v["text"]
                .as_str()
                .ok_or_else(|| cfg_err(&meta, &field, "no `text` string"))?;
            let rel = Path::new(name);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(cfg_err(
                    &meta,
                    &field,
                    format!("`{name}` must be a path inside the folder"),
                ));
            }
            out.push(SdExample {
                image: dir.join(rel),
                caption: caption.to_string(),
            });
        }
        out.sort_by(|a, b| a.image.cmp(&b.image));
    } else {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| IoError::Io {
                path: dir.into(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        names.sort();
        for image in names {
            let txt = image.with_extension("txt");
            let Some(bytes) = lora_io::files::read_small(&txt, "caption")? else {
                return Err(IoError::Missing {
                    path: txt,
                    what: "caption (.txt beside the image; or give a metadata.jsonl)",
                });
            };
            let caption = String::from_utf8_lossy(&bytes).trim().to_string();
            out.push(SdExample { image, caption });
        }
    }
    if out.is_empty() {
        return Err(IoError::Missing {
            path: dir.into(),
            what: "training images (.png/.jpg with .txt captions, or a metadata.jsonl)",
        });
    }
    Ok(out)
}

/// How images are cropped to the square resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crop {
    /// The center (the default; latents are cached).
    Center,
    /// A random square each step (each step encodes its crops).
    Random,
}

/// The run's settings.
#[derive(Clone, Debug)]
pub struct SdTrainConfig {
    /// Square training resolution in pixels.
    pub resolution: usize,
    /// Cropping.
    pub crop: Crop,
    /// Random horizontal flips.
    pub flip: bool,
    /// Adapter hyper-parameters.
    pub lora: LoraConfig,
    /// PEFT-style target modules (`to_q`, `conv1`, ...).
    pub targets: Vec<String>,
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// The learning-rate schedule after warmup (transformers' `get_*_schedule_with_warmup`;
    /// diffusers' LoRA script defaults to constant).
    pub schedule: Schedule,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Gradient clipping norm (0: none).
    pub max_grad_norm: f32,
    /// Seed of everything random.
    pub seed: u64,
    /// Per-channel noise offset (diffusers' `--noise_offset`; 0: none).
    pub noise_offset: f32,
    /// Min-SNR weighting gamma (diffusers' `--snr_gamma`).
    pub snr_gamma: Option<f32>,
    /// Also train LoRA on the text encoder's attention projections ([`TEXT_ENCODER_TARGETS`],
    /// as diffusers' DreamBooth LoRA script), at this learning rate; `None`: the text encoder
    /// stays frozen (and its states are computed once per caption).
    pub text_encoder_lr: Option<f32>,
}

/// The text-encoder layers `text_encoder_lr` adapts (diffusers' `train_dreambooth_lora.py`).
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// `img` as the training transform makes it: `(3, res, res)` in `[-1, 1]`. `crop_at` is the
/// crop's top-left corner for random crops (`None`: centered, torchvision's rounding).
fn preprocess(img: &Rgb8, res: usize, crop_at: Option<(usize, usize)>, flip: bool) -> Vec<f32> {
    let (nh, nw) = resized(img, res);
    let r = resize(img, nh, nw, Filter::Bilinear);
    // torchvision's CenterCrop: int(round((size - res) / 2.0)), Python's half-to-even.
    let (top, left) = crop_at.unwrap_or((
        ((nh - res) as f64 / 2.0).round_ties_even() as usize,
        ((nw - res) as f64 / 2.0).round_ties_even() as usize,
    ));
    let mut out = vec![0.0f32; 3 * res * res];
    for y in 0..res {
        for x in 0..res {
            let sx = if flip { res - 1 - x } else { x };
            let p = ((top + y) * nw + left + sx) * 3;
            for c in 0..3 {
                out[(c * res + y) * res + x] = r.data[p + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
    }
    out
}

/// torchvision's `Resize(res)` size for `img`: the shorter side to `res`, the longer scaled
/// (truncated).
fn resized(img: &Rgb8, res: usize) -> (usize, usize) {
    let (h, w) = (img.height, img.width);
    if h <= w {
        (res, (res * w / h).max(res))
    } else {
        ((res * h / w).max(res), res)
    }
}

/// A random crop corner for `img` resized for `res`.
fn random_corner(img: &Rgb8, res: usize, rng: &mut Rng) -> (usize, usize) {
    let (nh, nw) = resized(img, res);
    let pick = |n: usize, rng: &mut Rng| (rng.next_u64() % (n - res + 1) as u64) as usize;
    (pick(nh, rng), pick(nw, rng))
}

/// Per-step statistics.
#[derive(Clone, Debug)]
pub struct SdStep {
    /// Step (1-based).
    pub step: usize,
    /// The (weighted) MSE loss.
    pub loss: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
}

/// A run's position after a step: everything a checkpoint holds to resume it exactly (the
/// latents, captions and per-step seeds are derived again from the data and the settings).
#[derive(Clone, Debug, PartialEq)]
pub struct SdTrainState {
    /// Steps done.
    pub step: usize,
    /// The example sampler's completed epochs.
    pub epoch: u64,
    /// The example sampler's position in this epoch.
    pub pos: usize,
    /// The state of the generator of noise, timesteps, flips and crops.
    pub rng: u64,
    /// Every adapter tensor by name (`unet.<module>.lora_A.weight`,
    /// `text_encoder.<module>.lora_B.weight`, ...).
    pub adapters: Vec<(String, Vec<f32>)>,
    /// AdamW's moments and step counts, keyed by the same names.
    pub optimizer: OptimizerState,
}

/// Trains LoRA adapters on `pipe`'s UNet (injected here) over `data`; `on_step` sees every
/// step and may save or sample (the adapters are live in `pipe.unet`).
pub fn train_sd_lora(
    pipe: &mut SdPipeline,
    data: &[SdExample],
    cfg: &SdTrainConfig,
    mut on_step: impl FnMut(&SdPipeline, &SdStep) -> Result<()>,
) -> Result<Vec<SdStep>> {
    train_sd_lora_from(pipe, data, cfg, None, |p, s, _| on_step(p, s))
}

fn state_err(what: String) -> IoError {
    IoError::Core(CoreError::InvalidConfig {
        field: "resume",
        reason: what,
    })
}

/// [`train_sd_lora`], starting from `resume` (a checkpoint's state, for the same data and
/// settings) when given: the run then continues exactly as the uninterrupted one would have.
/// `on_step` also gets the state after the step, computed when it asks (a checkpoint).
pub fn train_sd_lora_from(
    pipe: &mut SdPipeline,
    data: &[SdExample],
    cfg: &SdTrainConfig,
    resume: Option<&SdTrainState>,
    mut on_step: impl FnMut(&SdPipeline, &SdStep, &dyn Fn() -> Result<SdTrainState>) -> Result<()>,
) -> Result<Vec<SdStep>> {
    let sched_cfg = pipe.schedule(lora_io::diffusion::SamplerKind::Ddim)?;
    let schedule = NoiseSchedule::new(&sched_cfg)?;
    let f = pipe.vae.config().downscale();
    if cfg.resolution == 0 || !cfg.resolution.is_multiple_of(f) {
        return Err(IoError::Core(CoreError::InvalidConfig {
            field: "resolution",
            reason: format!(
                "{}: this model needs a positive multiple of {f}",
                cfg.resolution
            ),
        }));
    }
    let te_lr = cfg.text_encoder_lr;
    if cfg.batch == 0
        || cfg.steps == 0
        || !(cfg.lr.is_finite() && cfg.lr > 0.0)
        || te_lr.is_some_and(|l| !(l.is_finite() && l > 0.0))
    {
        return Err(IoError::Core(CoreError::InvalidConfig {
            field: "steps",
            reason: "steps, batch size and learning rates must be positive".into(),
        }));
    }
    let images: Vec<Rgb8> = data
        .iter()
        .map(|e| Rgb8::open(&e.image))
        .collect::<std::result::Result<_, _>>()?;
    // Text states per distinct caption when the text encoder is frozen; its token ids when it
    // is trained.
    let mut text: HashMap<String, Vec<f32>> = HashMap::new();
    let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
    for e in data {
        if te_lr.is_some() {
            if !ids.contains_key(&e.caption) {
                ids.insert(e.caption.clone(), pipe.tokenizer.encode_prompt(&e.caption)?);
            }
        } else if !text.contains_key(&e.caption) {
            let s = pipe
                .encode_prompts(&[e.caption.as_str()], 0)?
                .try_to_vec()?;
            text.insert(e.caption.clone(), s);
        }
    }
    // The text states' (tokens, width), as `encode_prompts` makes them.
    let ctx_shape = [
        1,
        pipe.tokenizer.max_len(),
        pipe.text_encoder.config().hidden_size,
    ];
    let res = cfg.resolution;
    let lat = [
        pipe.vae.config().latent_channels,
        res / pipe.vae.config().downscale(),
        res / pipe.vae.config().downscale(),
    ];
    let per = lat.iter().product::<usize>();
    let encode = |pipe: &SdPipeline, pixels: Vec<f32>| -> Result<(Vec<f32>, Vec<f32>)> {
        let t = Tensor::new_on(pixels, &[1, 3, res, res], false, pipe.vae.device())?;
        let (m, lv) = pipe.vae.encode(&Tape::inference(), &t)?;
        Ok((m.try_to_vec()?, lv.try_to_vec()?))
    };
    // Cached latent distributions (mean, log-variance): [image][flipped].
    type Dist = (Vec<f32>, Vec<f32>);
    let mut cache: Vec<[Option<Dist>; 2]> = vec![[None, None]; images.len()];
    if cfg.crop == Crop::Center {
        for (i, img) in images.iter().enumerate() {
            cache[i][0] = Some(encode(pipe, preprocess(img, res, None, false))?);
            if cfg.flip {
                cache[i][1] = Some(encode(pipe, preprocess(img, res, None, true))?);
            }
        }
    }
    let n = pipe.unet.inject_lora(&cfg.lora, &cfg.targets, cfg.seed)?;
    if n == 0 {
        return Err(IoError::Core(CoreError::InvalidConfig {
            field: "target_modules",
            reason: "no layer to adapt".into(),
        }));
    }
    let unet_params: Vec<Tensor> = pipe
        .unet
        .lora_tensors()
        .into_iter()
        .map(|(_, t)| t.clone())
        .collect();
    let mut groups = vec![ParamGroup {
        params: unet_params,
        lr_scale: 1.0,
    }];
    if let Some(lr) = te_lr {
        let targets: Vec<String> = TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect();
        let n = pipe
            .text_encoder
            .inject_lora(&cfg.lora, &targets, cfg.seed)?;
        if n == 0 {
            return Err(IoError::Core(CoreError::InvalidConfig {
                field: "text_encoder_lr",
                reason: "the text encoder has no q_proj/k_proj/v_proj/out_proj layer".into(),
            }));
        }
        groups.push(ParamGroup {
            params: pipe
                .text_encoder
                .lora_tensors()
                .into_iter()
                .map(|(_, t)| t.clone())
                .collect(),
            lr_scale: lr / cfg.lr,
        });
    }
    // Clipped together, as diffusers clips `params_to_optimize`.
    let params: Vec<Tensor> = groups.iter().flat_map(|g| g.params.clone()).collect();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, cfg.weight_decay);
    let mut sampler = Sampler::new(images.len(), cfg.seed);
    let mut rng = Rng::new(cfg.seed ^ 0x5d11_5eed);
    // The adapters by the names a checkpoint keys them with.
    let named: Vec<(String, Tensor)> = pipe
        .unet
        .lora_tensors()
        .into_iter()
        .map(|(n, t)| (format!("unet.{n}"), t.clone()))
        .chain(
            pipe.text_encoder
                .lora_tensors()
                .into_iter()
                .map(|(n, t)| (format!("text_encoder.{n}"), t.clone())),
        )
        .collect();
    let mut first = 1;
    if let Some(st) = resume {
        if st.step >= cfg.steps {
            return Err(state_err(format!(
                "the checkpoint is at step {}, the run has {} steps",
                st.step, cfg.steps
            )));
        }
        let saved: HashMap<&str, &Vec<f32>> =
            st.adapters.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (n, t) in &named {
            match saved.get(n.as_str()) {
                Some(v) if v.len() == t.numel() => t.set_data((*v).clone())?,
                Some(v) => {
                    return Err(state_err(format!(
                        "the checkpoint's `{n}` has {} values, this run's {} (another rank?)",
                        v.len(),
                        t.numel()
                    )))
                }
                None => {
                    return Err(state_err(format!(
                        "the checkpoint has no `{n}` (its run adapted other layers)"
                    )))
                }
            }
            // A tensor AdamW never stepped (no gradient yet) has no state in either run; one it
            // stepped must have all of it.
            let moment = format!("exp_avg.{n}");
            let stepped = st.optimizer.steps.iter().any(|(k, _)| k == n)
                || st.optimizer.buffers.iter().any(|(k, _)| *k == moment);
            if let Some(missing) = opt
                .missing_state(n, t.numel(), &st.optimizer)
                .filter(|_| stepped)
            {
                return Err(state_err(format!(
                    "the checkpoint has no optimizer state {missing} for `{n}`"
                )));
            }
        }
        if let Some((extra, _)) = st
            .adapters
            .iter()
            .find(|(n, _)| !named.iter().any(|(m, _)| m == n))
        {
            return Err(state_err(format!(
                "the checkpoint has `{extra}`, which this run does not adapt"
            )));
        }
        if st.pos > images.len() {
            return Err(state_err(format!(
                "the checkpoint's sampler is at position {} of an epoch of {} images",
                st.pos,
                images.len()
            )));
        }
        opt.import(&named, &st.optimizer)?;
        sampler = Sampler::resume(images.len(), cfg.seed, st.epoch, st.pos);
        rng = Rng::new(st.rng);
        first = st.step + 1;
    }
    let sf = pipe.vae.config().scaling_factor;
    let shift = pipe.vae.config().shift_factor;
    let t_max = sched_cfg.num_train_timesteps;
    let mut history = Vec::new();
    for step in first..=cfg.steps {
        let idx = sampler.take(cfg.batch);
        let b = idx.len();
        let (mut noisy, mut target, mut ctx, mut ts, mut w) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut tokens: Vec<u32> = Vec::new();
        for &i in &idx {
            let flip = cfg.flip && rng.uniform() < 0.5;
            let dist = match &cache[i][flip as usize] {
                Some(d) => d.clone(),
                None => {
                    let corner = random_corner(&images[i], res, &mut rng);
                    encode(pipe, preprocess(&images[i], res, Some(corner), flip))?
                }
            };
            let x0: Vec<f32> = dist
                .0
                .iter()
                .zip(&dist.1)
                .map(|(&m, &lv)| {
                    let z = m + (0.5 * lv).exp() * rng.normal() as f32;
                    (z - shift) * sf
                })
                .collect();
            let mut noise: Vec<f32> = (0..per).map(|_| rng.normal() as f32).collect();
            if cfg.noise_offset != 0.0 {
                let plane = per / lat[0];
                for c in 0..lat[0] {
                    let o = cfg.noise_offset * rng.normal() as f32;
                    noise[c * plane..(c + 1) * plane]
                        .iter_mut()
                        .for_each(|v| *v += o);
                }
            }
            let t = (rng.next_u64() % t_max as u64) as usize;
            noisy.extend(schedule.add_noise(&x0, &noise, t)?);
            target.extend(schedule.target(&x0, &noise, t)?);
            match te_lr {
                Some(_) => tokens.extend_from_slice(&ids[&data[i].caption]),
                None => ctx.extend_from_slice(&text[&data[i].caption]),
            }
            ts.push(t as f32);
            w.push(match cfg.snr_gamma {
                None => 1.0,
                Some(g) => {
                    let snr = schedule.snr(t)?;
                    let m = snr.min(g as f64);
                    (match sched_cfg.prediction {
                        Prediction::Epsilon => m / snr,
                        Prediction::V => m / (snr + 1.0),
                        Prediction::Sample => m,
                    }) as f32
                }
            });
        }
        let dev = pipe.vae.device();
        let noisy = Tensor::new_on(noisy, &[b, lat[0], lat[1], lat[2]], false, dev)?;
        let target = Tensor::new_on(target, &[b, lat[0], lat[1], lat[2]], false, dev)?;
        let tape = Tape::new(cfg.seed.wrapping_add(step as u64));
        let ctx = match te_lr {
            // The text states on the tape, through the text encoder's adapters.
            Some(_) => pipe
                .text_encoder
                .forward(&tape, &tokens, (b, ctx_shape[1]), 0, true)?,
            None => Tensor::new_on(ctx, &[b, ctx_shape[1], ctx_shape[2]], false, dev)?,
        };
        let pred = pipe.unet.forward(&tape, &noisy, &ts, &ctx, true)?;
        let loss = ops::mse_loss(&tape, &pred, &target, cfg.snr_gamma.map(|_| w.as_slice()))?;
        let loss_v = loss.try_to_vec()?[0];
        let mut grads = tape.backward(&loss)?;
        let grad_norm = if cfg.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &params, cfg.max_grad_norm)?
        } else {
            f32::NAN
        };
        let lr = cfg.lr * lr_factor(cfg.schedule, step - 1, cfg.warmup, cfg.steps);
        opt.step(&groups, &grads, lr)?;
        if !loss_v.is_finite() {
            return Err(IoError::Core(CoreError::InvalidConfig {
                field: "lr",
                reason: format!("the loss became {loss_v} at step {step}; lower the learning rate"),
            }));
        }
        let s = SdStep {
            step,
            loss: loss_v,
            grad_norm,
            lr,
        };
        let state = || -> Result<SdTrainState> {
            Ok(SdTrainState {
                step,
                epoch: sampler.epoch,
                pos: sampler.pos,
                rng: rng.state(),
                adapters: named
                    .iter()
                    .map(|(n, t)| Ok((n.clone(), t.try_to_vec()?)))
                    .collect::<std::result::Result<_, CoreError>>()?,
                optimizer: opt.export(&named)?,
            })
        };
        on_step(pipe, &s, &state)?;
        history.push(s);
    }
    Ok(history)
}

/// The trained adapters of `pipe.unet` as a LoRA file: diffusers' format
/// (`unet.<module>.lora_A.weight`, with the `lora_adapter_metadata` diffusers writes so that
/// `load_lora_weights` gets rank and alpha) or kohya's (`lora_unet_<module>.lora_down.weight`,
/// `lora_up.weight`, `.alpha`). Written atomically, marked as lora-rs's.
pub fn save_sd_lora(
    pipe: &SdPipeline,
    cfg: &SdTrainConfig,
    kohya: bool,
    path: &Path,
) -> Result<()> {
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    // (diffusers prefix, kohya prefix, tensors)
    let parts = [
        ("unet", "lora_unet_", pipe.unet.lora_tensors()),
        ("text_encoder", "lora_te_", pipe.text_encoder.lora_tensors()),
    ];
    let mut vals: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    // kohya's scale is alpha / r: rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r).
    let kohya_alpha = if cfg.lora.use_rslora {
        cfg.lora.alpha * (cfg.lora.rank as f32).sqrt()
    } else {
        cfg.lora.alpha
    };
    let alpha_vals = [kohya_alpha];
    for (prefix, kohya_prefix, tensors) in &parts {
        for (name, t) in tensors {
            let v = t.try_to_vec()?;
            let shape = t.shape().to_vec();
            if kohya {
                let (module, part) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
                    (m, "lora_down.weight")
                } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                    (m, "lora_up.weight")
                } else {
                    continue;
                };
                let flat = format!("{kohya_prefix}{}", module.replace('.', "_"));
                if part == "lora_down.weight" {
                    vals.push((format!("{flat}.alpha"), alpha_vals.to_vec(), vec![]));
                }
                vals.push((format!("{flat}.{part}"), v, shape));
            } else {
                // The text encoder's module paths keep transformers' `text_model.` (diffusers
                // strips it for a text encoder without that level).
                vals.push((format!("{prefix}.{name}"), v, shape));
            }
        }
    }
    let with_te = !parts[1].2.is_empty();
    let out: Vec<OutTensor> = vals
        .iter()
        .map(|(n, v, s)| OutTensor {
            name: n.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert(
        lora_io::outdir::FILE_MARK.to_string(),
        "lora train (stable diffusion)".to_string(),
    );
    if kohya {
        meta.insert("ss_network_module".into(), "networks.lora".into());
        meta.insert("ss_network_dim".into(), cfg.lora.rank.to_string());
        meta.insert("ss_network_alpha".into(), kohya_alpha.to_string());
    } else {
        let mut m = serde_json::Map::new();
        let te_targets: Vec<String> = TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect();
        let mut components = vec![("unet", cfg.targets.clone())];
        if with_te {
            components.push(("text_encoder", te_targets));
        }
        for (c, targets) in components {
            for (k, v) in [
                ("r", serde_json::json!(cfg.lora.rank)),
                ("lora_alpha", serde_json::json!(cfg.lora.alpha)),
                ("target_modules", serde_json::json!(targets)),
                ("use_rslora", serde_json::json!(cfg.lora.use_rslora)),
                ("use_dora", serde_json::json!(false)),
                ("lora_bias", serde_json::json!(false)),
                ("rank_pattern", serde_json::json!({})),
                ("alpha_pattern", serde_json::json!({})),
                ("init_lora_weights", serde_json::json!("gaussian")),
                ("bias", serde_json::json!("none")),
                ("peft_type", serde_json::json!("LORA")),
            ] {
                m.insert(format!("{c}.{k}"), v);
            }
        }
        meta.insert(
            "lora_adapter_metadata".into(),
            serde_json::Value::Object(m).to_string(),
        );
        meta.insert("format".into(), "pt".into());
    }
    write_safetensors(path, &out, meta)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_core::diffusion::{decode_latents, denoise, Conditioning};
    use lora_io::diffusion::SamplerKind;

    fn model() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/sd_pipeline/model")
    }

    fn image_folder(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lora-sd-train-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (rgb, cap)) in [
            ([220u8, 40, 40], "a red disc"),
            ([40, 60, 220], "a blue disc"),
        ]
        .iter()
        .enumerate()
        {
            let (h, w) = (20, 26);
            let mut data = vec![245u8; h * w * 3];
            for y in 0..h {
                for x in 0..w {
                    let (dy, dx) = (y as f32 - 10.0, x as f32 - 13.0);
                    if dy * dy + dx * dx < 49.0 {
                        data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(rgb);
                    }
                }
            }
            Rgb8::new(h, w, data)
                .unwrap()
                .save_png(&dir.join(format!("{i}.png")))
                .unwrap();
            std::fs::write(dir.join(format!("{i}.txt")), cap).unwrap();
        }
        dir
    }

    fn config(targets: &[&str]) -> SdTrainConfig {
        SdTrainConfig {
            resolution: 16,
            crop: Crop::Center,
            flip: true,
            lora: LoraConfig {
                rank: 2,
                alpha: 4.0,
                init: lora_core::lora::LoraInit::Gaussian,
                ..Default::default()
            },
            targets: targets.iter().map(|s| s.to_string()).collect(),
            steps: 4,
            batch: 2,
            lr: 1e-2,
            warmup: 1,
            schedule: Schedule::Constant,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 3,
            noise_offset: 0.05,
            snr_gamma: Some(5.0),
            text_encoder_lr: None,
        }
    }

    fn adapter_values(pipe: &SdPipeline) -> Vec<Vec<f32>> {
        pipe.unet
            .lora_tensors()
            .into_iter()
            .chain(pipe.text_encoder.lora_tensors())
            .map(|(_, t)| t.try_to_vec().unwrap())
            .collect()
    }

    #[test]
    fn a_resumed_run_ends_exactly_where_the_uninterrupted_one_does() {
        let dir = image_folder("resume");
        let data = read_image_folder(&dir).unwrap();
        let mut cfg = config(&["to_q", "to_v", "conv1"]);
        cfg.steps = 6;
        cfg.schedule = Schedule::Cosine;
        // Random crops and flips draw from the generator the checkpoint carries.
        cfg.crop = Crop::Random;
        cfg.text_encoder_lr = Some(5e-3);
        let mut pipe = SdPipeline::open(&model()).unwrap();
        let mut at3 = None;
        let full = train_sd_lora_from(&mut pipe, &data, &cfg, None, |_, s, st| {
            if s.step == 3 {
                at3 = Some(st()?);
            }
            Ok(())
        })
        .unwrap();
        let at3 = at3.unwrap();
        assert_eq!(at3.step, 3);
        assert!(at3
            .adapters
            .iter()
            .any(|(n, _)| n.starts_with("text_encoder.")));
        let mut resumed = SdPipeline::open(&model()).unwrap();
        let rest =
            train_sd_lora_from(&mut resumed, &data, &cfg, Some(&at3), |_, _, _| Ok(())).unwrap();
        assert_eq!(rest.len(), 3);
        for (a, b) in full[3..].iter().zip(&rest) {
            assert_eq!((a.step, a.loss.to_bits()), (b.step, b.loss.to_bits()));
        }
        assert_eq!(adapter_values(&pipe), adapter_values(&resumed));
        // Resuming into a run that adapts other layers, or with another rank, is refused.
        let mut other = config(&["to_q", "to_k", "conv1"]);
        other.steps = 6;
        other.text_encoder_lr = Some(5e-3);
        let mut p = SdPipeline::open(&model()).unwrap();
        let e = train_sd_lora_from(&mut p, &data, &other, Some(&at3), |_, _, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("to_k"), "{e}");
        let mut other = cfg.clone();
        other.lora.rank = 3;
        let mut p = SdPipeline::open(&model()).unwrap();
        let e = train_sd_lora_from(&mut p, &data, &other, Some(&at3), |_, _, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("values"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    fn sample(pipe: &SdPipeline, adapters: bool) -> Vec<f32> {
        let shape = pipe.latent_shape(1, 16, 16).unwrap();
        let noise: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| ((i as f32) * 0.731).sin())
            .collect();
        let cond = pipe
            .encode_prompts_with(&["a red disc"], 0, adapters)
            .unwrap();
        let uncond = pipe.encode_prompts_with(&[""], 0, adapters).unwrap();
        let c = Conditioning {
            cond: &cond,
            uncond: &uncond,
            guidance: 5.0,
        };
        let mut s = pipe.sampler(SamplerKind::Euler, 3).unwrap();
        let lat = denoise(
            &pipe.unet,
            s.as_mut(),
            &noise,
            shape,
            &c,
            adapters,
            &mut |_, _| {},
        )
        .unwrap();
        decode_latents(&pipe.vae, &lat, shape).unwrap()
    }

    /// A short run in each file format: the loss is finite, the same seed gives the same
    /// adapters, and the saved file merged into a fresh pipeline generates what the live
    /// adapters generate (so what we write is what we trained); the adapters change the image.
    #[test]
    fn trained_adapters_save_and_reload_in_both_formats() {
        let dir = image_folder("fmt");
        let data = read_image_folder(&dir).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[1].caption, "a blue disc");
        for (kohya, targets) in [
            (false, vec!["to_q", "to_v"]),
            (true, vec!["to_k", "conv1", "proj_in"]),
        ] {
            let cfg = config(&targets);
            let mut runs = Vec::new();
            for _ in 0..2 {
                let mut pipe = SdPipeline::open(&model()).unwrap();
                let hist = train_sd_lora(&mut pipe, &data, &cfg, |_, _| Ok(())).unwrap();
                assert_eq!(hist.len(), 4);
                assert!(hist.iter().all(|s| s.loss.is_finite() && s.loss > 0.0));
                // transformers' warmup: the first step at 0, the rate from the second on.
                assert_eq!((hist[0].lr, hist[1].lr, hist[3].lr), (0.0, 1e-2, 1e-2));
                runs.push(pipe);
            }
            let a: Vec<Vec<f32>> = runs[0]
                .unet
                .lora_tensors()
                .iter()
                .map(|(_, t)| t.try_to_vec().unwrap())
                .collect();
            let b: Vec<Vec<f32>> = runs[1]
                .unet
                .lora_tensors()
                .iter()
                .map(|(_, t)| t.try_to_vec().unwrap())
                .collect();
            assert_eq!(a, b, "same seed, same adapters");
            let live = sample(&runs[0], true);
            let base = sample(&runs[0], false);
            let moved = live
                .iter()
                .zip(&base)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(moved > 1e-4, "the adapters change the image ({moved:.2e})");
            let file = dir.join(if kohya {
                "k.safetensors"
            } else {
                "d.safetensors"
            });
            save_sd_lora(&runs[0], &cfg, kohya, &file).unwrap();
            assert!(lora_io::outdir::file_is_ours(&file));
            let lora = lora_io::sd_lora::read_sd_lora(&file).unwrap();
            assert_eq!(lora.format, if kohya { "kohya" } else { "diffusers" });
            let mut fresh = SdPipeline::open(&model()).unwrap();
            lora_io::sd_lora::merge_sd_lora(&mut fresh, &lora, 1.0, false).unwrap();
            let merged = sample(&fresh, false);
            let e = merged
                .iter()
                .zip(&live)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                e < 1e-5,
                "kohya {kohya}: merged file vs live adapters {e:.2e}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// With `text_encoder_lr` the text encoder's q/k/v/out projections train too: their B
    /// factors leave zero, both file formats carry them (`text_encoder.` / `lora_te_` keys),
    /// and a fresh pipeline with the file merged generates what the live adapters do.
    #[test]
    fn text_encoder_adapters_train_save_and_reload() {
        let dir = image_folder("te");
        let data = read_image_folder(&dir).unwrap();
        let mut cfg = config(&["to_q", "to_v"]);
        cfg.text_encoder_lr = Some(5e-3);
        let mut pipe = SdPipeline::open(&model()).unwrap();
        let hist = train_sd_lora(&mut pipe, &data, &cfg, |_, _| Ok(())).unwrap();
        assert!(hist.iter().all(|s| s.loss.is_finite()));
        let te = pipe.text_encoder.lora_tensors();
        assert_eq!(te.len(), 2 * 4 * 2, "q, k, v, out of two layers, A and B");
        for (name, t) in &te {
            if name.ends_with("lora_B.weight") {
                let v = t.try_to_vec().unwrap();
                assert!(v.iter().any(|x| *x != 0.0), "{name} did not train");
            }
        }
        let live = sample(&pipe, true);
        for kohya in [false, true] {
            let file = dir.join(format!("te-{kohya}.safetensors"));
            save_sd_lora(&pipe, &cfg, kohya, &file).unwrap();
            let lora = lora_io::sd_lora::read_sd_lora(&file).unwrap();
            let mut fresh = SdPipeline::open(&model()).unwrap();
            let rep = lora_io::sd_lora::merge_sd_lora(&mut fresh, &lora, 1.0, false).unwrap();
            assert_eq!(rep.merged.get("text_encoder"), Some(&8), "kohya {kohya}");
            assert_eq!(rep.merged.get("unet").copied(), Some(rep.layers.len() - 8));
            let e = sample(&fresh, false)
                .iter()
                .zip(&live)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                e < 1e-5,
                "kohya {kohya}: merged file vs live adapters {e:.2e}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The gradient of the denoising loss reaches the text encoder's adapters through the
    /// UNet's cross-attention: autograd against central differences of the whole loss.
    #[test]
    fn text_encoder_adapter_gradients_match_finite_differences() {
        let mut pipe = SdPipeline::open(&model()).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 2.0,
            init: lora_core::lora::LoraInit::Gaussian,
            ..Default::default()
        };
        let targets: Vec<String> = TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            pipe.text_encoder.inject_lora(&lora, &targets, 1).unwrap(),
            8
        );
        // B away from zero, so every path carries gradient.
        for (_, t) in pipe.text_encoder.lora_tensors() {
            let n = t.numel();
            t.set_data((0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.05).collect())
                .unwrap();
        }
        let ids = pipe.tokenizer.encode_prompt("a red disc").unwrap();
        let len = ids.len();
        let shape = pipe.latent_shape(1, 16, 16).unwrap();
        let n: usize = shape.iter().product();
        let noisy =
            Tensor::new((0..n).map(|i| ((i as f32) * 0.37).sin()).collect(), &shape).unwrap();
        let target =
            Tensor::new((0..n).map(|i| ((i as f32) * 0.11).cos()).collect(), &shape).unwrap();
        let loss_of = |pipe: &SdPipeline, tape: &Tape| -> Tensor {
            let ctx = pipe
                .text_encoder
                .forward(tape, &ids, (1, len), 0, true)
                .unwrap();
            let pred = pipe
                .unet
                .forward(tape, &noisy, &[500.0], &ctx, true)
                .unwrap();
            ops::mse_loss(tape, &pred, &target, None).unwrap()
        };
        let tape = Tape::new(0);
        let loss = loss_of(&pipe, &tape);
        let grads = tape.backward(&loss).unwrap();
        let tensors: Vec<(String, Tensor)> = pipe
            .text_encoder
            .lora_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        // Per tensor, the derivative along a fixed direction (many elements at once, so the
        // loss moves well above f32's rounding): autograd's g.d against central differences
        // of the f32 loss (h = 2e-2: 6.7e-3 seen; 5e-3 and 1e-2 drown in rounding).
        let (mut checked, mut worst) = (0, 0.0f64);
        for (name, t) in &tensors {
            let g = grads.get(t).unwrap().to_vec();
            let base = t.try_to_vec().unwrap();
            let d: Vec<f32> = (0..base.len())
                .map(|i| ((i as f32) * 1.7 + 0.3).sin())
                .collect();
            let ad: f64 = g.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
            let h = 2e-2f32;
            let at = |e: f32| -> f64 {
                let v: Vec<f32> = base.iter().zip(&d).map(|(x, y)| x + e * y).collect();
                t.set_data(v).unwrap();
                let l = loss_of(&pipe, &Tape::inference()).try_to_vec().unwrap()[0] as f64;
                t.set_data(base.clone()).unwrap();
                l
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let scale = fd.abs().max(ad.abs());
            assert!(scale > 1e-5, "{name}: no gradient ({ad:.3e})");
            assert!(
                (fd - ad).abs() <= 2e-2 * scale,
                "{name}: autograd {ad:.6e}, differences {fd:.6e}"
            );
            worst = worst.max((fd - ad).abs() / scale);
            checked += 1;
        }
        eprintln!("text-encoder adapter gradients: worst relative difference {worst:.2e}");
        assert_eq!(checked, 2 * 4 * 2);
    }

    #[test]
    fn image_folder_and_config_errors_are_named() {
        let dir = image_folder("err");
        std::fs::remove_file(dir.join("1.txt")).unwrap();
        let e = read_image_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("1.txt"), "{e}");
        std::fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"../x.png\", \"text\": \"t\"}\n",
        )
        .unwrap();
        let e = read_image_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("inside the folder"), "{e}");
        std::fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"0.png\", \"text\": \"red\"}\n",
        )
        .unwrap();
        let data = read_image_folder(&dir).unwrap();
        assert_eq!(
            data,
            vec![SdExample {
                image: dir.join("0.png"),
                caption: "red".into()
            }]
        );
        let mut pipe = SdPipeline::open(&model()).unwrap();
        let mut cfg = config(&["to_q"]);
        cfg.resolution = 17;
        let e = train_sd_lora(&mut pipe, &data, &cfg, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resolution") && e.contains("multiple of 2"),
            "{e}"
        );
        let mut cfg = config(&["no_such_layer"]);
        cfg.resolution = 16;
        let e = train_sd_lora(&mut pipe, &data, &cfg, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_layer"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
