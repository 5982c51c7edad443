//! `lora demo --task diffusion`: the artist's story. A tiny Stable Diffusion pipeline (shipped
//! in `demo/diffusion/base` as a diffusers directory, pretrained by `lora demo --task diffusion
//! --build` with this project's own full-parameter training on generated captioned images of
//! filled shapes on a light background) learns, through a LoRA file, a new style: the shape's
//! outline. The same prompts and seeds are generated before and after (colour/shape pairs the
//! LoRA never saw among them) into one PNG grid, and each image is scored: is its shape hollow
//! (the style's outline), and in the prompt's colour?

use crate::demo_diffusion_data::{self as data, COLOURS, HELD_OUT, SHAPES};
use anyhow::{bail, Context, Result};
use lora_core::lora::LoraConfig;
use lora_io::diffusion::SamplerKind;
use lora_io::images::Rgb8;
use lora_io::sd::SdPipeline;
use lora_train::diffusion::{Crop, SdTrainConfig};
use lora_train::optim::Schedule;
use lora_train::sd_pretrain::{self as pre, RunConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Image side in pixels (the VAE halves it: 16 x 16 x 4 latents).
pub const SIDE: usize = 32;
/// Prompt length in tokens (`model_max_length`).
const MAX_LEN: usize = 16;
/// Seeds of the committed base; `--build` with the defaults reproduces it (for the same thread
/// count and CPU: the kernels' summation order follows both).
const DATA_SEED: u64 = 20261201;
const VAE_SEED: u64 = 1;
const DENOISER_SEED: u64 = 2;
/// Autoencoder steps (batch 16) and denoiser steps (batch 32) of the committed base.
const VAE_STEPS: usize = 1200;
const DENOISER_STEPS: usize = 3000;
/// Distinct images the denoiser is trained on.
const DENOISER_EXAMPLES: usize = 4096;
/// The style set's seed and size.
const STYLE_SEED: u64 = 17;
const STYLE_IMAGES: usize = 90;
/// Default LoRA training steps.
const STEPS: usize = 600;

/// The text encoder's `config.json`.
fn text_config(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": MAX_LEN,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 64,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    })
}

/// The UNet's `config.json`: two levels (32 and 64 channels), attention on the lower one and
/// in the middle block.
fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dropout": 0.0,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "only_cross_attention": false,
        "out_channels": 4,
        "sample_size": SIDE / 2,
        "transformer_layers_per_block": 1,
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": false,
        "use_linear_projection": false,
    })
}

/// The VAE's `config.json` (factor 2, four latent channels).
fn vae_config(scaling_factor: f32) -> Value {
    let sf: f64 = scaling_factor
        .to_string()
        .parse()
        .unwrap_or(scaling_factor as f64);
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": SIDE,
        "scaling_factor": sf,
        "force_upcast": false,
        "mid_block_add_attention": true,
        "use_quant_conv": true,
        "use_post_quant_conv": true,
    })
}

/// `scheduler/scheduler_config.json`: Stable Diffusion's (scaled-linear betas, epsilon).
fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
    })
}

fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// The base pipeline's directory inside the demo directory.
pub fn base_dir(demo: &Path) -> PathBuf {
    demo.join("diffusion/base")
}

/// The base directory's entries (all `--build` writes).
const BASE_ENTRIES: [&str; 6] = [
    "model_index.json",
    "scheduler",
    "tokenizer",
    "text_encoder",
    "unet",
    "vae",
];

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("serialises")
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    lora_io::write::write_atomic(path, bytes)?;
    Ok(())
}

/// Writes the small files of the base (index, scheduler, tokenizer); returns the vocabulary
/// size.
fn write_small_files(base: &Path) -> Result<usize> {
    write(
        &base.join("model_index.json"),
        pretty(&model_index()).as_bytes(),
    )?;
    write(
        &base.join("scheduler/scheduler_config.json"),
        pretty(&scheduler_config()).as_bytes(),
    )?;
    let (vocab, merges) = data::tokenizer_files(&data::words());
    let size = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)?.len();
    write(&base.join("tokenizer/vocab.json"), vocab.as_bytes())?;
    write(&base.join("tokenizer/merges.txt"), merges.as_bytes())?;
    write(
        &base.join("tokenizer/tokenizer_config.json"),
        pretty(&data::tokenizer_config(MAX_LEN)).as_bytes(),
    )?;
    write(
        &base.join("tokenizer/special_tokens_map.json"),
        pretty(
            &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
        )
        .as_bytes(),
    )?;
    Ok(size)
}

/// What `lora demo --task diffusion --build` runs.
pub struct BuildRun {
    pub dir: PathBuf,
    /// Denoiser steps (the autoencoder's are two fifths of them, at most [`VAE_STEPS`]).
    pub pretrain_steps: usize,
    pub threads: Option<usize>,
}

fn bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} steps | {{msg}} | ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// Pretrains the demo pipeline from scratch on generated images and writes
/// `dir/diffusion/base`.
pub fn build(r: &BuildRun) -> Result<()> {
    let base = base_dir(&r.dir);
    if r.pretrain_steps == 0 {
        bail!("--pretrain-steps must be at least 1");
    }
    lora_io::outdir::inspect_output(
        "--dir",
        &base,
        "lora demo --task diffusion --build",
        lora_io::outdir::Owned::Listed,
    )?;
    // Everything is written into a scratch directory beside the base and swapped in at the end,
    // so an interrupted build leaves the old base whole (never half old, half new).
    // `.base.tmp-<pid>`: one a killed build left (its process gone) is removed here.
    let parent = base.parent().unwrap_or(Path::new("."));
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(".base.tmp-") && lora_io::outdir::is_dead_temp(&n) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let scratch = base.with_file_name(format!(".base.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let pool = crate::bench::pool(r.threads)?;
    let built = pretrain_into(&scratch, r, &pool).and_then(|()| {
        lora_io::outdir::build_dir_atomically(&base, "lora demo --task diffusion --build", |t| {
            for e in BASE_ENTRIES {
                std::fs::rename(scratch.join(e), t.join(e)).map_err(|source| {
                    lora_io::error::IoError::Io {
                        path: t.join(e),
                        source,
                    }
                })?;
            }
            Ok(BASE_ENTRIES.iter().map(|s| s.to_string()).collect())
        })?;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&scratch);
    built?;
    outln!("wrote {}", base.display());
    // What the base draws.
    let pipe = SdPipeline::open_dir(&base)?;
    let (_, scores) = pool.install(|| sample_grid(&pipe, false))?;
    outln!(
        "the base model on the demo's prompts: {}",
        summarize(&scores)
    );
    Ok(())
}

/// Both pretraining stages, writing the pipeline's files into `base`.
fn pretrain_into(base: &Path, r: &BuildRun, pool: &rayon::ThreadPool) -> Result<()> {
    let vocab_size = write_small_files(base)?;

    // Stage 1: the autoencoder.
    let vae_steps = (r.pretrain_steps * 2 / 5).clamp(1, VAE_STEPS);
    let vcfg = lora_io::diffusion::vae_config(Path::new("vae/config.json"), &vae_config(1.0))?;
    outln!(
        "pretraining the demo pipeline on generated {SIDE}x{SIDE} images of {} shapes in {} colours\n\
         stage 1: the autoencoder (VAE, channels {:?}), {vae_steps} steps of 16 images",
        SHAPES.len(),
        COLOURS.len(),
        vcfg.block_out_channels
    );
    let b = bar(vae_steps, "VAE");
    let run = RunConfig {
        steps: vae_steps,
        batch: 16,
        lr: 1e-3,
        warmup: 50,
        weight_decay: 0.0,
        seed: DATA_SEED,
    };
    let sample = |i: u64| data::vae_example(DATA_SEED ^ 0xa5a5, i, SIDE);
    let (vae, vparams, vsum) = pool.install(|| {
        pre::pretrain_vae(&vcfg, VAE_SEED, &run, 1e-3, &sample, &mut |s, _, l| {
            b.set_position(s as u64);
            b.set_message(format!("loss {l:.4}"));
        })
    })?;
    b.finish();
    // The scaling factor from 512 images of the base's look it was not trained on.
    let probe: Vec<f32> = (0..512u64)
        .flat_map(|i| pre::to_unit(&data::base_example(DATA_SEED ^ 0x0b5e, i, SIDE).0))
        .collect();
    let means = pool.install(|| pre::encode_means(&vae, &probe, [512, 3, SIDE, SIDE], 64))?;
    let sf = pre::latent_scale(&means);
    let vae_json = vae_config(sf);
    write(&base.join("vae/config.json"), pretty(&vae_json).as_bytes())?;
    lora_train::pretrain::write_f32_weights(
        &base.join("vae/diffusion_pytorch_model.safetensors"),
        &vparams,
    )?;
    outln!(
        "{} parameters; reconstruction loss {:.4} -> {:.4} in {:.0} s; scaling_factor {sf}",
        vsum.params,
        vsum.first_loss,
        vsum.last_loss,
        vsum.seconds
    );

    // Stage 2: the text encoder and the UNet together.
    let tcfg = lora_io::diffusion::clip_text_config(
        Path::new("text_encoder/config.json"),
        &text_config(vocab_size),
    )?;
    let ucfg = lora_io::diffusion::unet_config(Path::new("unet/config.json"), &unet_config())?;
    let tokenizer = lora_io::clip_tokenizer::ClipTokenizer::from_dir(base.join("tokenizer"))?;
    let sched_path = base.join("scheduler/scheduler_config.json");
    let schedule =
        lora_io::diffusion::scheduler_config(&sched_path, &scheduler_config(), SamplerKind::Ddim)?;
    let steps = r.pretrain_steps;
    outln!(
        "stage 2: the text encoder (CLIP, {} layers, width {}) and the UNet (channels {:?}) together, \
         {steps} steps of 32 of {DENOISER_EXAMPLES} captioned images (10% with the empty prompt)",
        tcfg.num_hidden_layers,
        tcfg.hidden_size,
        ucfg.block_out_channels
    );
    let b = bar(steps, "UNet");
    let run = RunConfig {
        steps,
        batch: 32,
        lr: 1e-3,
        warmup: 200,
        weight_decay: 0.0,
        seed: DATA_SEED ^ 2,
    };
    let sample = |i: u64| data::base_example(DATA_SEED, i, SIDE);
    let input = pre::DenoiserData {
        vae: &vae,
        scaling_factor: sf,
        tokenizer: &tokenizer,
        schedule: &schedule,
        sample: &sample,
        examples: DENOISER_EXAMPLES,
        uncond_prob: 0.1,
    };
    let mut ema = f32::NAN;
    let (den, dsum) = pool.install(|| {
        pre::pretrain_denoiser(
            (&tcfg, &ucfg),
            DENOISER_SEED,
            &run,
            &input,
            &mut |s, _, l| {
                ema = if ema.is_nan() {
                    l
                } else {
                    0.98 * ema + 0.02 * l
                };
                b.set_position(s as u64);
                b.set_message(format!("loss {ema:.4}"));
                if s % 1000 == 0 {
                    b.suspend(|| outln!("step {s}: loss {ema:.4} (moving average)"));
                }
            },
        )
    })?;
    b.finish();
    write(
        &base.join("text_encoder/config.json"),
        pretty(&text_config(vocab_size)).as_bytes(),
    )?;
    lora_train::pretrain::write_f32_weights(
        &base.join("text_encoder/model.safetensors"),
        &den.text_params,
    )?;
    write(
        &base.join("unet/config.json"),
        pretty(&unet_config()).as_bytes(),
    )?;
    lora_train::pretrain::write_f32_weights(
        &base.join("unet/diffusion_pytorch_model.safetensors"),
        &den.unet_params,
    )?;
    outln!(
        "{} parameters; loss {:.4} (first 10% of steps) -> {:.4} (last 10%) in {:.0} s",
        dsum.params,
        dsum.first_loss,
        dsum.last_loss,
        dsum.seconds,
    );
    Ok(())
}

/// The demo's prompts (every third is a pair the style LoRA never saw) and seeds.
fn prompts() -> Vec<(usize, usize)> {
    vec![
        (0, 0),
        (2, 1),
        HELD_OUT[0],
        (3, 2),
        HELD_OUT[1],
        HELD_OUT[2],
    ]
}
const SEEDS: [u64; 2] = [1, 2];
/// Sampling settings of the grid.
const SAMPLE_STEPS: usize = 20;
const GUIDANCE: f32 = 4.0;

/// How one generated image scores.
#[derive(Clone, Copy, Debug)]
struct Score {
    /// Its shape is hollow (the style's outline): the pixel at the centroid of the coloured
    /// pixels is nearer the background than their colour.
    hollow: bool,
    /// The palette colour nearest to its non-background pixels is the prompt's.
    colour: bool,
    /// The prompt's pair is held out of the style set.
    held_out: bool,
}

/// Scores image `img` (`(3, S, S)` in `[0, 1]`) made for colour `c`.
fn score(img: &[f32], c: usize, held_out: bool) -> Score {
    let s = SIDE;
    let px = |y: usize, x: usize| {
        [
            img[y * s + x],
            img[(s + y) * s + x],
            img[(2 * s + y) * s + x],
        ]
    };
    let mut border = [0.0f64; 3];
    let mut n = 0.0;
    for y in 0..s {
        for x in 0..s {
            if y < 2 || x < 2 || y >= s - 2 || x >= s - 2 {
                let p = px(y, x);
                for k in 0..3 {
                    border[k] += p[k] as f64;
                }
                n += 1.0;
            }
        }
    }
    border.iter_mut().for_each(|v| *v /= n);
    // The mean of the pixels far from the background, matched to the palette.
    let (mut fg, mut m, mut cy, mut cx) = ([0.0f64; 3], 0.0, 0.0, 0.0);
    for y in 0..s {
        for x in 0..s {
            let p = px(y, x);
            let d: f64 = (0..3).map(|k| (p[k] as f64 - border[k]).powi(2)).sum();
            if d > 0.3 * 0.3 {
                for k in 0..3 {
                    fg[k] += p[k] as f64;
                }
                m += 1.0;
                cy += y as f64;
                cx += x as f64;
            }
        }
    }
    if m < 4.0 {
        return Score {
            hollow: false,
            colour: false,
            held_out,
        };
    }
    fg.iter_mut().for_each(|v| *v /= m);
    let hollow = {
        let c = px((cy / m).round() as usize, (cx / m).round() as usize);
        let d = |q: [f64; 3]| (0..3).map(|k| (c[k] as f64 - q[k]).powi(2)).sum::<f64>();
        d(border) < d(fg)
    };
    let colour = {
        let dist = |q: [f64; 3]| (0..3).map(|k| (fg[k] * 255.0 - q[k]).powi(2)).sum::<f64>();
        let best = (0..COLOURS.len())
            .min_by(|&a, &b| dist(COLOURS[a].1).total_cmp(&dist(COLOURS[b].1)))
            .expect("colours");
        best == c
    };
    Score {
        hollow,
        colour,
        held_out,
    }
}

/// `(hollow shapes, right colours)` of `scores`, with the held-out pairs' share.
fn summarize(scores: &[Score]) -> String {
    let n = scores.len();
    let count = |f: &dyn Fn(&Score) -> bool| scores.iter().filter(|s| f(s)).count();
    let held = count(&|s| s.held_out);
    format!(
        "hollow shape (the style's outline) in {}/{n} images ({}/{held} of the held-out pairs), the prompt's colour in {}/{n}",
        count(&|s| s.hollow),
        count(&|s| s.hollow && s.held_out),
        count(&|s| s.colour),
    )
}

/// Generates every prompt x seed (`adapters`: through the UNet's live LoRA) at once: the
/// images `(3, S, S)` in `[0, 1]` (seed-major) and their scores.
fn sample_grid(pipe: &SdPipeline, adapters: bool) -> Result<(Vec<Vec<f32>>, Vec<Score>)> {
    let ps = prompts();
    let texts: Vec<String> = ps.iter().map(|&(c, s)| data::caption(c, s)).collect();
    let mut all_prompts = Vec::new();
    let mut noise = Vec::new();
    let shape1 = pipe.latent_shape(1, SIDE, SIDE)?;
    let per: usize = shape1[1..].iter().product();
    for &seed in &SEEDS {
        for (k, t) in texts.iter().enumerate() {
            all_prompts.push(t.as_str());
            // The same latents for a prompt's seed before and after.
            let mut rng = lora_kernels::rng::Rng::new(seed * 1000 + k as u64);
            noise.extend((0..per).map(|_| rng.normal() as f32));
        }
    }
    let sampling = lora_io::sd::Sampling {
        kind: SamplerKind::DpmPP,
        steps: SAMPLE_STEPS,
        guidance: GUIDANCE,
        clip_skip: 0,
        adapters,
    };
    let empty = vec![""; all_prompts.len()];
    let px = pipe.generate(
        (&all_prompts, &empty),
        &noise,
        (SIDE, SIDE),
        &sampling,
        &mut |_, _| {},
    )?;
    let one = 3 * SIDE * SIDE;
    let images: Vec<Vec<f32>> = px.chunks(one).map(<[f32]>::to_vec).collect();
    let scores = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let p = ps[i % ps.len()];
            score(img, p.0, HELD_OUT.contains(&p))
        })
        .collect();
    Ok((images, scores))
}

/// The grid: one column per prompt; per seed a row before and a row after; each cell scaled
/// up `zoom` times (nearest).
fn grid_png(before: &[Vec<f32>], after: &[Vec<f32>], zoom: usize) -> Rgb8 {
    let cols = prompts().len();
    let rows = 2 * SEEDS.len();
    let cell = SIDE * zoom;
    let gap = 2;
    let (gh, gw) = (rows * (cell + gap) - gap, cols * (cell + gap) - gap);
    let mut data = vec![255u8; gh * gw * 3];
    for r in 0..rows {
        let (seed, after_row) = (r / 2, r % 2 == 1);
        for c in 0..cols {
            let img = if after_row { after } else { before }[seed * cols + c].as_slice();
            for y in 0..cell {
                for x in 0..cell {
                    for ch in 0..3 {
                        let v = img[(ch * SIDE + y / zoom) * SIDE + x / zoom];
                        let (gy, gx) = (r * (cell + gap) + y, c * (cell + gap) + x);
                        data[(gy * gw + gx) * 3 + ch] = lora_core::diffusion::to_u8(v);
                    }
                }
            }
        }
    }
    Rgb8::new(gh, gw, data).expect("sized above")
}

/// What `lora demo --task diffusion` runs.
pub struct DemoRun {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub threads: Option<usize>,
    pub json: bool,
}

/// The output directory's entries (all of them the demo's).
const OUT_ENTRIES: [&str; 3] = ["data", "pytorch_lora_weights.safetensors", "grid.png"];

/// Whether `rel` (a path inside a demo output) is one the demo writes.
fn demo_writes(rel: &[String], is_dir: bool) -> bool {
    let numbered = |n: &str| {
        let d = n.strip_suffix(".png").or_else(|| n.strip_suffix(".txt"));
        d.is_some_and(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_digit()))
    };
    let marker = |n: &str| n == lora_io::outdir::MARKER || n == lora_io::outdir::LOCK;
    match rel
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["data"] => is_dir,
        [top] => !is_dir && (OUT_ENTRIES.contains(top) || marker(top)),
        ["data", f] => !is_dir && numbered(f),
        _ => false,
    }
}

/// Writes the style set as an image folder (`NNNN.png` + `NNNN.txt`).
fn write_style_set(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for i in 0..STYLE_IMAGES {
        let (img, cap, _) = data::style_example(STYLE_SEED, i as u64, SIDE);
        img.save_png(&dir.join(format!("{i:04}.png")))?;
        write(&dir.join(format!("{i:04}.txt")), cap.as_bytes())?;
    }
    Ok(())
}

/// Trains the style LoRA and reports before/after.
pub fn run(r: &DemoRun) -> Result<()> {
    let base = base_dir(&r.dir);
    let probe = base.join("unet/diffusion_pytorch_model.safetensors");
    if !probe.exists() {
        bail!(
            "{}: missing; the demo needs the repository's demo/ directory (pass --dir) or a rebuild with `lora demo --task diffusion --build`",
            probe.display()
        );
    }
    if r.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if r.out.join(lora_io::outdir::MARKER).exists() {
        crate::demo_detect::check_own_tree(&r.out, "lora demo --task diffusion", &demo_writes)?;
    }
    lora_io::outdir::DirLock::check_free(&r.out)?;
    lora_io::outdir::prepare_dir_output(
        "--out",
        &r.out,
        "lora demo --task diffusion",
        &OUT_ENTRIES,
        true,
        &[("the demo directory (--dir)", &r.dir)],
    )?;
    let _lock = lora_io::outdir::DirLock::acquire(&r.out)?;
    let data_dir = r.out.join("data");
    write_style_set(&data_dir)?;
    let examples = lora_train::diffusion::read_image_folder(&data_dir)?;
    if !r.json {
        outln!(
            "lora demo --task diffusion: a LoRA file teaches a tiny Stable Diffusion pipeline ({})\n\
             a new style: the shape's outline. The base was pretrained by this project on generated\n\
             images of filled shapes.\n\
             Data: {} ({} captioned images; {} never appear in them)",
            base.display(),
            data_dir.display(),
            examples.len(),
            HELD_OUT
                .iter()
                .map(|&(c, s)| format!("\"{}\"", data::caption(c, s)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let pool = crate::bench::pool(r.threads)?;
    let mut pipe = SdPipeline::open_dir(&base)?;
    let cfg = SdTrainConfig {
        resolution: SIDE,
        crop: Crop::Center,
        flip: false,
        lora: LoraConfig {
            rank: 8,
            alpha: 8.0,
            ..LoraConfig::default()
        },
        targets: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
            .map(String::from)
            .to_vec(),
        steps: r.steps,
        batch: 8,
        lr: 2e-3,
        warmup: 20,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 0,
        noise_offset: 0.0,
        snr_gamma: None,
        text_encoder_lr: None,
    };
    let b = bar(r.steps, "LoRA");
    if r.json {
        b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let t0 = std::time::Instant::now();
    let hist = pool.install(|| {
        lora_train::diffusion::train_sd_lora(&mut pipe, &examples, &cfg, |_, s| {
            b.set_position(s.step as u64);
            b.set_message(format!("loss {:.4}", s.loss));
            Ok(())
        })
    })?;
    b.finish_and_clear();
    let train_s = t0.elapsed().as_secs_f64();
    let lora_path = r.out.join("pytorch_lora_weights.safetensors");
    lora_train::diffusion::save_sd_lora(&pipe, &cfg, false, &lora_path)?;
    let t1 = std::time::Instant::now();
    let (before, sb) = pool.install(|| sample_grid(&pipe, false))?;
    let (after, sa) = pool.install(|| sample_grid(&pipe, true))?;
    let sample_s = t1.elapsed().as_secs_f64();
    let grid_path = r.out.join("grid.png");
    grid_png(&before, &after, 4).save_png(&grid_path)?;
    let k = (hist.len() / 10).max(1);
    let mean = |s: &[lora_train::diffusion::SdStep]| {
        s.iter().map(|x| x.loss).sum::<f32>() / s.len().max(1) as f32
    };
    let (l0, l1) = (mean(&hist[..k]), mean(&hist[hist.len() - k..]));
    let count = |s: &[Score], f: &dyn Fn(&Score) -> bool| s.iter().filter(|x| f(x)).count();
    if r.json {
        outln!(
            "{}",
            json!({
                "steps": r.steps, "train_seconds": train_s, "sample_seconds": sample_s,
                "loss_first": l0, "loss_last": l1, "images": sa.len(),
                "hollow_before": count(&sb, &|s| s.hollow), "hollow_after": count(&sa, &|s| s.hollow),
                "colour_before": count(&sb, &|s| s.colour), "colour_after": count(&sa, &|s| s.colour),
                "held_out_hollow_after": count(&sa, &|s| s.hollow && s.held_out),
                "lora": lora_path, "grid": grid_path,
            })
        );
        return Ok(());
    }
    outln!(
        "\n{} steps of batch {} in {:.0} s; loss {:.4} (first 10% of steps) -> {:.4} (last 10%)",
        r.steps,
        cfg.batch,
        train_s,
        l0,
        l1
    );
    outln!(
        "{} prompts x {} seeds, {SAMPLE_STEPS} DPM++ steps, guidance {GUIDANCE}, before and after ({:.0} s):",
        prompts().len(),
        SEEDS.len(),
        sample_s
    );
    outln!("  base model:   {}", summarize(&sb));
    outln!("  with the LoRA: {}", summarize(&sa));
    outln!(
        "wrote {} (columns: {}; rows: seed {} base, with LoRA, seed {} base, with LoRA)\nand {}",
        grid_path.display(),
        prompts()
            .iter()
            .map(|&(c, s)| format!("\"{}\"", data::caption(c, s)))
            .collect::<Vec<_>>()
            .join(", "),
        SEEDS[0],
        SEEDS[1],
        lora_path.display()
    );
    outln!(
        "\nTry it: lora sd generate --model {} --lora {} --prompt \"{}\" --size {SIDE}x{SIDE} --steps {SAMPLE_STEPS} --guidance {GUIDANCE} --scheduler dpm++ --batch 4 --out outline.png",
        base.display(),
        lora_path.display(),
        data::caption(HELD_OUT[0].0, HELD_OUT[0].1)
    );
    Ok(())
}

/// `lora demo --task diffusion` (`--build`: remake the shipped base pipeline).
pub fn command(a: crate::args::DemoArgs) -> Result<()> {
    let dir = crate::demo::locate(a.dir.as_deref());
    if a.build {
        return build(&BuildRun {
            dir,
            pretrain_steps: a.pretrain_steps.unwrap_or(DENOISER_STEPS),
            threads: a.threads,
        });
    }
    run(&DemoRun {
        dir,
        out: a.out.unwrap_or_else(|| "lora-demo-diffusion".into()),
        steps: a.steps.unwrap_or(STEPS),
        threads: a.threads,
        json: a.json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::tests::repo_demo;
    use crate::demo_diffusion_data::Look;

    #[test]
    fn committed_base_is_what_build_writes() {
        let base = base_dir(&repo_demo());
        let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
        let (vocab, merges) = data::tokenizer_files(&data::words());
        assert_eq!(read("tokenizer/vocab.json"), vocab);
        assert_eq!(read("tokenizer/merges.txt"), merges);
        assert_eq!(
            read("tokenizer/tokenizer_config.json"),
            pretty(&data::tokenizer_config(MAX_LEN))
        );
        assert_eq!(read("model_index.json"), pretty(&model_index()));
        assert_eq!(
            read("scheduler/scheduler_config.json"),
            pretty(&scheduler_config())
        );
        let size = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)
            .unwrap()
            .len();
        assert_eq!(read("text_encoder/config.json"), pretty(&text_config(size)));
        assert_eq!(read("unet/config.json"), pretty(&unet_config()));
        // The VAE's config differs from the template only in the measured scaling factor.
        let v: Value = serde_json::from_str(&read("vae/config.json")).unwrap();
        let sf = v["scaling_factor"].as_f64().unwrap() as f32;
        assert!(sf.is_finite() && sf > 0.0);
        assert_eq!(read("vae/config.json"), pretty(&vae_config(sf)));
        // And it loads as a pipeline, every tensor used.
        let pipe = SdPipeline::open_dir(&base).unwrap();
        assert_eq!(pipe.latent_shape(1, SIDE, SIDE).unwrap(), [1, 4, 16, 16]);
    }

    #[test]
    fn the_scores_see_the_outline_and_the_colour() {
        for (i, (c, s)) in [(0, 0), (3, 2), (5, 1), (2, 2), (1, 0), (4, 2)]
            .into_iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            for (look, hollow) in [(Look::Base, false), (Look::Outline, true)] {
                let img = data::draw(9, i as u64, SIDE, (c, s), look);
                let px: Vec<f32> = pre::to_unit(&img).iter().map(|v| v / 2.0 + 0.5).collect();
                let sc = score(&px, c, false);
                assert_eq!(sc.hollow, hollow, "{i}: {c} {s} {look:?}");
                assert!(sc.colour, "{c} {s} {look:?}");
                // Another colour's prompt is not matched.
                assert!(!score(&px, (c + 1) % COLOURS.len(), false).colour);
            }
        }
        // A blank image has no colour.
        let blank = vec![0.9f32; 3 * SIDE * SIDE];
        assert!(!score(&blank, 0, false).colour);
    }

    #[test]
    fn the_demo_runs_end_to_end_and_keeps_what_is_not_its_own() {
        let out = std::env::temp_dir().join(format!("lora-demo-diffusion-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let run = |out: &Path| {
            run(&DemoRun {
                dir: repo_demo(),
                out: out.to_path_buf(),
                steps: 2,
                threads: Some(2),
                json: true,
            })
        };
        run(&out).unwrap();
        for f in ["data/0000.png", "data/0000.txt", "grid.png"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let grid = Rgb8::open(&out.join("grid.png")).unwrap();
        assert_eq!(
            (grid.height, grid.width),
            (4 * (4 * SIDE + 2) - 2, 6 * (4 * SIDE + 2) - 2)
        );
        // The LoRA file reads back as a diffusers LoRA for this pipeline's UNet.
        let f =
            lora_io::sd_lora::read_sd_lora(&out.join("pytorch_lora_weights.safetensors")).unwrap();
        let mut pipe = SdPipeline::open_dir(&base_dir(&repo_demo())).unwrap();
        let rep = lora_io::sd_lora::merge_sd_lora(&mut pipe, &f, 1.0, false).unwrap();
        assert!(rep.unmatched.is_empty());
        for part in [".conv1", ".conv2", ".to_q", ".to_out.0"] {
            assert!(
                rep.layers.iter().any(|(_, l)| l.ends_with(part)),
                "{part}: {rep:?}"
            );
        }
        // A second run replaces its own output; anything else is refused, named, kept.
        run(&out).unwrap();
        for (inside, name) in [("data", "mine.png"), (".", "notes.txt")] {
            let f = out.join(inside).join(name);
            std::fs::write(&f, "mine").unwrap();
            let e = run(&out).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
            std::fs::remove_file(&f).unwrap();
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}
