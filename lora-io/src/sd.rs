//! A Stable Diffusion pipeline directory as diffusers saves it (`model_index.json`,
//! `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`), loaded into the core's models,
//! with the prompt encoding and sampler construction `lora sd generate` needs.

use crate::clip_tokenizer::ClipTokenizer;
use crate::diffusion::{load_clip_text, load_unet, load_vae, read_scheduler_config, SamplerKind};
use crate::error::{IoError, Result};
use lora_core::diffusion::{Ddim, DpmSolverPP, Euler, Sampler, ScheduleConfig};
use lora_core::models::clip_text::ClipTextModel;
use lora_core::models::unet::UNet2DCondition;
use lora_core::models::vae::AutoencoderKl;
use lora_core::{Tape, Tensor};
use std::path::{Path, PathBuf};

/// A loaded Stable Diffusion 1.x / 2.x pipeline.
pub struct SdPipeline {
    /// The directory.
    pub dir: PathBuf,
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
    /// Opens a diffusers pipeline directory. `model_index.json` must name the SD components;
    /// SDXL's (a second text encoder) is refused by name.
    pub fn open(dir: &Path) -> Result<Self> {
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
            if !dir.join(part).is_dir() {
                return Err(IoError::Missing {
                    path: dir.join(part),
                    what: "pipeline component directory named in model_index.json",
                });
            }
        }
        let vae = load_vae(&dir.join("vae"))?;
        for (field, n) in [
            ("in_channels", vae.config().in_channels),
            ("out_channels", vae.config().out_channels),
        ] {
            if n != 3 {
                return Err(IoError::Config {
                    path: dir.join("vae/config.json"),
                    field: field.into(),
                    reason: format!("{n}: RGB images need 3"),
                });
            }
        }
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder: load_clip_text(&dir.join("text_encoder"))?,
            unet: load_unet(&dir.join("unet"))?,
            vae,
            dir: dir.to_path_buf(),
        })
    }

    /// The scheduler settings for `kind` from `scheduler/scheduler_config.json`.
    pub fn schedule(&self, kind: SamplerKind) -> Result<ScheduleConfig> {
        read_scheduler_config(&self.dir.join("scheduler/scheduler_config.json"), kind)
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
    /// length, as the pipelines encode them), with diffusers' `clip_skip`.
    pub fn encode_prompts(&self, prompts: &[&str], clip_skip: usize) -> Result<Tensor> {
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
            false,
        )?)
    }

    /// The latent shape `(batch, C, H / f, W / f)` for images of `height x width` pixels
    /// (`f` = the VAE's downscale); an error naming the size when it does not divide.
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let f = self.vae.config().downscale();
        let m = f * self.unet.config().size_multiple();
        if height == 0 || width == 0 || !height.is_multiple_of(m) || !width.is_multiple_of(m) {
            return Err(IoError::Core(lora_core::CoreError::InvalidConfig {
                field: "size",
                reason: format!(
                    "{width}x{height}: this model needs sides that are positive multiples of \
                     {m} (the VAE's factor {f} times the UNet's {})",
                    self.unet.config().size_multiple()
                ),
            }));
        }
        Ok([batch, self.unet.config().in_channels, height / f, width / f])
    }
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
