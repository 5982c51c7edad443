//! A Stable Diffusion pipeline, from a directory as diffusers saves it (`model_index.json`,
//! `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`) or from a single-file
//! checkpoint (see [`crate::sd_single`]), loaded into the core's models, with the prompt
//! encoding and sampler construction `lora sd generate` needs.

use crate::clip_tokenizer::ClipTokenizer;
use crate::diffusion::{load_clip_text, load_unet, load_vae, scheduler_config, SamplerKind};
use crate::error::{IoError, Result};
use crate::sd_single::{cached_tokenizer, SingleFile};
use lora_core::diffusion::{
    decode_latents, denoise, Conditioning, Ddim, DpmSolverPP, Euler, Sampler, ScheduleConfig,
};
use lora_core::models::clip_text::ClipTextModel;
use lora_core::models::unet::UNet2DCondition;
use lora_core::models::vae::AutoencoderKl;
use lora_core::{Tape, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How a pipeline is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers directory.
    Diffusers,
    /// A single `.safetensors` file with the original keys; `config`: the diffusers directory
    /// its configurations, tokenizer and scheduler came from (`None`: inferred from the shapes,
    /// the tokenizer from the Hugging Face cache).
    SingleFile {
        /// The configuration directory given.
        config: Option<PathBuf>,
    },
}

/// A loaded Stable Diffusion 1.x / 2.x pipeline.
pub struct SdPipeline {
    /// The directory, or the single file.
    pub path: PathBuf,
    /// How it is stored.
    pub layout: Layout,
    /// `scheduler/scheduler_config.json` (or what stands for it), and its content.
    scheduler: (PathBuf, Value),
    /// `tokenizer/`.
    pub tokenizer: ClipTokenizer,
    /// `text_encoder/`.
    pub text_encoder: ClipTextModel,
    /// `unet/`.
    pub unet: UNet2DCondition,
    /// `vae/`.
    pub vae: AutoencoderKl,
}

impl SdPipeline {
    /// Opens a diffusers pipeline directory, or a single-file checkpoint with its
    /// configurations inferred (see [`open_single`](Self::open_single)).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Self::open_single(path, None);
        }
        Self::open_dir(path)
    }

    /// Checks a directory's `model_index.json`: it must name the SD components; SDXL's (a
    /// second text encoder) is refused by name. `components`: their directories must exist.
    fn check_index(dir: &Path, components: bool) -> Result<()> {
        let index = dir.join("model_index.json");
        let v = crate::hf::read_json(&index)?;
        let f = crate::hf::Fields {
            path: &index,
            v: &v,
        };
        if f.get("text_encoder_2").is_some() {
            return Err(f.err(
                "text_encoder_2",
                "a second text encoder (SDXL) is not supported yet; SD 1.x and 2.x are",
            ));
        }
        for part in ["tokenizer", "text_encoder", "unet", "vae", "scheduler"] {
            if f.get(part).is_none() {
                return Err(f.err(part, "missing: a Stable Diffusion pipeline needs it"));
            }
            if components && !dir.join(part).is_dir() {
                return Err(IoError::Missing {
                    path: dir.join(part),
                    what: "pipeline component directory named in model_index.json",
                });
            }
        }
        Ok(())
    }

    /// Opens a diffusers pipeline directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::check_index(dir, true)?;
        let vae = load_vae(&dir.join("vae"))?;
        check_rgb(&vae, &dir.join("vae/config.json"))?;
        let scheduler = dir.join("scheduler/scheduler_config.json");
        let v = crate::hf::read_json(&scheduler)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder: load_clip_text(&dir.join("text_encoder"))?,
            unet: load_unet(&dir.join("unet"))?,
            vae,
            path: dir.to_path_buf(),
            layout: Layout::Diffusers,
            scheduler: (scheduler, v),
        })
    }

    /// Opens a single-file checkpoint. `config`: a diffusers pipeline directory of the same
    /// family whose configurations, tokenizer and scheduler to use (its weights are not read;
    /// diffusers' `from_single_file(config=...)`); without it they are inferred from the
    /// tensors for SD 1.x and 2.x, and the tokenizer is looked up in the Hugging Face cache.
    pub fn open_single(file: &Path, config: Option<&Path>) -> Result<Self> {
        let single = SingleFile::open(file)?;
        let (cfgs, tokenizer, scheduler_path) = match config {
            Some(dir) => {
                Self::check_index(dir, false)?;
                (
                    single.configs_from_dir(dir)?,
                    dir.join("tokenizer"),
                    dir.join("scheduler/scheduler_config.json"),
                )
            }
            None => {
                let cfgs = single.infer_configs()?;
                let family = cfgs.family.expect("inferred");
                (cfgs, cached_tokenizer(file, family)?, file.to_path_buf())
            }
        };
        let (text_encoder, unet, vae) = single.load(&cfgs)?;
        check_rgb(&vae, file)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(tokenizer)?,
            text_encoder,
            unet,
            vae,
            path: file.to_path_buf(),
            layout: Layout::SingleFile {
                config: config.map(Path::to_path_buf),
            },
            scheduler: (scheduler_path, cfgs.scheduler),
        })
    }

    /// The scheduler settings for `kind` from `scheduler/scheduler_config.json`.
    pub fn schedule(&self, kind: SamplerKind) -> Result<ScheduleConfig> {
        scheduler_config(&self.scheduler.0, &self.scheduler.1, kind)
    }

    /// A sampler of `kind` running `steps` steps.
    pub fn sampler(&self, kind: SamplerKind, steps: usize) -> Result<Box<dyn Sampler>> {
        let cfg = self.schedule(kind)?;
        Ok(match kind {
            SamplerKind::Ddim => Box::new(Ddim::new(&cfg, steps)?),
            SamplerKind::Euler => Box::new(Euler::new(&cfg, steps)?),
            SamplerKind::DpmPP => Box::new(DpmSolverPP::new(&cfg, steps)?),
        })
    }

    /// The text states `(prompts.len(), 77, D)` of `prompts` (each padded to the tokenizer's
    /// length, as the pipelines encode them), with diffusers' `clip_skip`, through the text
    /// encoder's live adapters if it has any (a run training them).
    pub fn encode_prompts(&self, prompts: &[&str], clip_skip: usize) -> Result<Tensor> {
        self.encode_prompts_with(prompts, clip_skip, true)
    }

    /// [`encode_prompts`](Self::encode_prompts), with (`adapters`) or without the text
    /// encoder's live adapters.
    pub fn encode_prompts_with(
        &self,
        prompts: &[&str],
        clip_skip: usize,
        adapters: bool,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode_prompt(p)?);
        }
        let len = self.tokenizer.max_len();
        Ok(self.text_encoder.forward(
            &Tape::inference(),
            &ids,
            (prompts.len(), len),
            clip_skip,
            adapters,
        )?)
    }

    /// Text to image as diffusers' `StableDiffusionPipeline` runs it: the prompts and their
    /// negatives (one each; `""` for none) encoded, `noise` (the starting latents of all the
    /// images, diffusers' `latents=`, `(B, C, height / f, width / f)`) denoised by `s.kind` over
    /// `s.steps` with classifier-free guidance, through the live adapters when `s.adapters`, and
    /// decoded: pixels `(B, 3, height, width)` in `[0, 1]`. `on_step(i, n)` after each step.
    pub fn generate(
        &self,
        (prompts, negatives): (&[&str], &[&str]),
        noise: &[f32],
        (height, width): (usize, usize),
        s: &Sampling,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if negatives.len() != prompts.len() {
            return Err(IoError::Core(lora_core::CoreError::InvalidConfig {
                field: "negative_prompt",
                reason: format!("{} for {} prompts", negatives.len(), prompts.len()),
            }));
        }
        let shape = self.latent_shape(prompts.len(), height, width)?;
        let cond = self.encode_prompts_with(prompts, s.clip_skip, s.adapters)?;
        let uncond = self.encode_prompts_with(negatives, s.clip_skip, s.adapters)?;
        let c = Conditioning {
            cond: &cond,
            uncond: &uncond,
            guidance: s.guidance,
        };
        let mut sampler = self.sampler(s.kind, s.steps)?;
        let lat = denoise(
            &self.unet,
            sampler.as_mut(),
            noise,
            shape,
            &c,
            s.adapters,
            on_step,
        )?;
        Ok(decode_latents(&self.vae, &lat, shape)?)
    }

    /// The latent shape `(batch, C, H / f, W / f)` for images of `height x width` pixels
    /// (`f` = the VAE's downscale: any multiple of it, as diffusers, e.g. 600x800 for SD); an
    /// error naming the size when it does not divide.
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let f = self.vae.config().downscale();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(IoError::Core(lora_core::CoreError::InvalidConfig {
                field: "size",
                reason: format!(
                    "{width}x{height}: this model needs sides that are positive multiples of \
                     {f} (the VAE's factor)"
                ),
            }));
        }
        Ok([batch, self.unet.config().in_channels, height / f, width / f])
    }
}

/// How [`SdPipeline::generate`] samples.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// The scheduler.
    pub kind: SamplerKind,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (at most 1: the prompt alone).
    pub guidance: f32,
    /// diffusers' `clip_skip` (0: none).
    pub clip_skip: usize,
    /// Through the UNet's and text encoder's live adapters.
    pub adapters: bool,
}

/// A VAE must map RGB images (3 channels in and out).
fn check_rgb(vae: &AutoencoderKl, path: &Path) -> Result<()> {
    for (field, n) in [
        ("in_channels", vae.config().in_channels),
        ("out_channels", vae.config().out_channels),
    ] {
        if n != 3 {
            return Err(IoError::Config {
                path: path.into(),
                field: field.into(),
                reason: format!("{n}: RGB images need 3"),
            });
        }
    }
    Ok(())
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler" => Ok(SamplerKind::Euler),
            "dpm++" | "dpmpp" | "dpm++2m" | "dpmpp-2m" | "dpm++-2m" | "dpm-solver++" => {
                Ok(SamplerKind::DpmPP)
            }
            other => Err(format!("unknown scheduler `{other}` (ddim, euler, dpm++)")),
        }
    }
}
