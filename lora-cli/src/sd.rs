//! `lora sd generate`: text-to-image with a Stable Diffusion 1.x/2.x pipeline directory and
//! the LoRA files merged into it.

use crate::args::SdGenerateArgs;
use anyhow::{bail, Context, Result};
use lora_core::diffusion::{decode_latents, denoise, to_u8, Conditioning};
use lora_io::diffusion::SamplerKind;
use lora_io::images::Rgb8;
use lora_io::sd::SdPipeline;
use std::path::Path;

/// Parses `WxH` (or a single number for a square).
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parse = |v: &str| -> Result<usize> {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0 && n <= 16_384)
            .with_context(|| format!("--size `{s}`: expected WIDTHxHEIGHT, sides 1 to 16384"))
    };
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((parse(w)?, parse(h)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

/// Initial latents from `path`: its only tensor, or the one named `latents`, of `shape`.
fn read_init_noise(path: &Path, shape: [usize; 4]) -> Result<Vec<f32>> {
    let f = lora_io::safetensors::SafetensorsFile::open(path)?;
    let names = f.names();
    let key = match names.as_slice() {
        [one] => one.to_string(),
        _ if names.contains(&"latents") => "latents".to_string(),
        _ => bail!(
            "--init-noise {}: expected one tensor or one named `latents`, found {}",
            path.display(),
            names.len()
        ),
    };
    let (v, got) = f.read_f32_finite(&key)?;
    if got != shape {
        bail!(
            "--init-noise {}: `{key}` has shape {got:?}; this run's latents are {shape:?} \
             (batch, channels, height / {}, width / {})",
            path.display(),
            shape[2].max(1),
            shape[3].max(1)
        );
    }
    Ok(v)
}

/// `lora sd generate`.
pub fn generate(a: SdGenerateArgs) -> Result<()> {
    let (width, height) = parse_size(&a.size)?;
    let kind: SamplerKind = a.scheduler.parse().map_err(anyhow::Error::msg)?;
    if a.batch == 0 || a.batch > 64 {
        bail!("--batch must be from 1 to 64, got {}", a.batch);
    }
    if !a.guidance.is_finite() || a.guidance < 0.0 {
        bail!(
            "--guidance must be a non-negative number, got {}",
            a.guidance
        );
    }
    let loras: Vec<(std::path::PathBuf, f32)> = a
        .loras
        .iter()
        .map(|s| lora_io::sd_lora::parse_lora_arg(s))
        .collect();
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", a.model.as_path())];
    inputs.extend(loras.iter().map(|(p, _)| ("--lora file", p.as_path())));
    lora_io::outdir::check_not_input("--out", &a.out, &inputs)?;
    check_png_output(&a.out, a.force)?;
    let pool = crate::bench::pool(a.threads)?;
    pool.install(|| run(&a, &loras, (width, height), kind))
}

fn check_png_output(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if out.is_dir() {
        bail!(
            "--out {} is a directory, expected a .png file",
            out.display()
        );
    }
    if !force {
        bail!(
            "--out {} exists (pass --force to replace an image lora-rs wrote)",
            out.display()
        );
    }
    if !lora_io::images::png_is_ours(out) {
        bail!(
            "--out {} exists and is not a PNG lora-rs wrote; --force replaces only those",
            out.display()
        );
    }
    Ok(())
}

fn run(
    a: &SdGenerateArgs,
    loras: &[(std::path::PathBuf, f32)],
    (width, height): (usize, usize),
    kind: SamplerKind,
) -> Result<()> {
    let mut pipe = SdPipeline::open(&a.model)
        .with_context(|| format!("loading the pipeline in {}", a.model.display()))?;
    for (path, weight) in loras {
        let f = lora_io::sd_lora::read_sd_lora(path)?;
        let rep = lora_io::sd_lora::merge_sd_lora(&mut pipe, &f, *weight, a.allow_unmatched)?;
        let merged: Vec<String> = rep.merged.iter().map(|(k, n)| format!("{n} {k}")).collect();
        eprintln!(
            "merged {} ({}, weight {weight}): {} modules{}",
            path.display(),
            f.format,
            merged.join(", "),
            if rep.unmatched.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} matched no layer (--allow-unmatched), e.g. {}",
                    rep.unmatched.len(),
                    rep.unmatched[0]
                )
            }
        );
    }
    let pipe = pipe;
    let shape1 = pipe.latent_shape(1, height, width)?;
    let all = [a.batch, shape1[1], shape1[2], shape1[3]];
    let per = shape1[1] * shape1[2] * shape1[3];
    let noise = match &a.init_noise {
        Some(p) => read_init_noise(p, all)?,
        None => {
            // Standard normal latents from the seed (not torch's generator: a run equals
            // diffusers' only through --init-noise).
            let mut rng = lora_kernels::rng::Rng::new(a.seed);
            (0..a.batch * per).map(|_| rng.normal() as f32).collect()
        }
    };
    let cond = pipe.encode_prompts(&[a.prompt.as_str()], a.clip_skip)?;
    let neg = a.negative_prompt.as_deref().unwrap_or("");
    let uncond = pipe.encode_prompts(&[neg], a.clip_skip)?;
    let c = Conditioning {
        cond: &cond,
        uncond: &uncond,
        guidance: a.guidance,
    };
    let mut images = Vec::new();
    for i in 0..a.batch {
        let bar = indicatif::ProgressBar::new(a.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "image {}/{} [{{bar:30}}] {{pos}}/{{len}} steps {{elapsed}} (eta {{eta}})",
                i + 1,
                a.batch
            ))
            .expect("valid template"),
        );
        let mut sampler = pipe.sampler(kind, a.steps)?;
        let latents = denoise(
            &pipe.unet,
            sampler.as_mut(),
            &noise[i * per..(i + 1) * per],
            shape1,
            &c,
            false,
            &mut |s, _| bar.set_position(s as u64),
        )?;
        bar.finish_and_clear();
        images.push(decode_latents(&pipe.vae, &latents, shape1)?);
    }
    let grid = grid(&images, height, width);
    grid.save_png_marked(&a.out)?;
    eprintln!(
        "wrote {} ({} image{} of {width}x{height}, {} {} steps, guidance {})",
        a.out.display(),
        a.batch,
        if a.batch == 1 { "" } else { "s" },
        a.steps,
        a.scheduler,
        a.guidance
    );
    Ok(())
}

/// The images `(3, H, W)` in `[0, 1]` side by side in a near-square grid (row-major).
fn grid(images: &[Vec<f32>], h: usize, w: usize) -> Rgb8 {
    let n = images.len();
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (gh, gw) = (rows * h, cols * w);
    let mut data = vec![0u8; gh * gw * 3];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let v = img[(ch * h + y) * w + x];
                    data[((r * h + y) * gw + c * w + x) * 3 + ch] = to_u8(v);
                }
            }
        }
    }
    Rgb8::new(gh, gw, data).expect("sized above")
}
