//! `lora sd generate`: text-to-image with a Stable Diffusion 1.x/2.x pipeline directory and
//! the LoRA files merged into it.

use crate::args::SdGenerateArgs;
use anyhow::{bail, Context, Result};
use lora_core::diffusion::to_u8;
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
fn read_init_noise(path: &Path, shape: [usize; 4], factor: usize) -> Result<Vec<f32>> {
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
             (batch, channels, height / {factor}, width / {factor})",
            path.display()
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
    let mut pipe = open_pipeline(&a.model, a.sd_config.as_deref())?;
    for (path, weight) in loras {
        let f = lora_io::sd_lora::read_sd_lora(path)?;
        let rep = lora_io::sd_lora::merge_sd_lora(&mut pipe, &f, *weight, a.allow_unmatched)?;
        report_merge(path, f.format, *weight, &rep);
    }
    let pipe = pipe;
    let shape1 = pipe.latent_shape(1, height, width)?;
    let all = [a.batch, shape1[1], shape1[2], shape1[3]];
    let per = shape1[1] * shape1[2] * shape1[3];
    let noise = match &a.init_noise {
        Some(p) => read_init_noise(p, all, pipe.vae.config().downscale())?,
        None => {
            // Standard normal latents from the seed (not torch's generator: a run equals
            // diffusers' only through --init-noise).
            let mut rng = lora_kernels::rng::Rng::new(a.seed);
            (0..a.batch * per).map(|_| rng.normal() as f32).collect()
        }
    };
    let neg = a.negative_prompt.as_deref().unwrap_or("");
    let sampling = lora_io::sd::Sampling {
        kind,
        steps: a.steps,
        guidance: a.guidance,
        clip_skip: a.clip_skip,
        adapters: false,
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
        images.push(pipe.generate(
            (&[a.prompt.as_str()], &[neg]),
            &noise[i * per..(i + 1) * per],
            (height, width),
            &sampling,
            &mut |s, _| bar.set_position(s as u64),
        )?);
        bar.finish_and_clear();
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

/// `lora extract` on two language-model directories: a PEFT adapter directory.
fn extract_llm(a: crate::args::ExtractArgs) -> Result<()> {
    if a.conv_rank.is_some() || a.sd_config.is_some() {
        bail!("--conv-rank and --sd-config apply to Stable Diffusion pipelines");
    }
    if !(a.min_diff.is_finite() && a.min_diff >= 0.0) {
        bail!(
            "--min-diff must be a non-negative number, got {}",
            a.min_diff
        );
    }
    const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
    let inputs = [("--base", a.base.as_path()), ("--tuned", a.tuned.as_path())];
    // Refuse a bad --out before the extraction; write it only after one succeeded.
    lora_io::outdir::check_not_input("--out", &a.out, &inputs)?;
    if let lora_io::outdir::Existing::Ours(_) = lora_io::outdir::inspect_output(
        "--out",
        &a.out,
        "lora extract",
        lora_io::outdir::Owned::Listed,
    )? {
        if !a.force {
            bail!(
                "--out {} exists (pass --force to replace an earlier `lora extract`)",
                a.out.display()
            );
        }
    }
    let pool = crate::bench::pool(a.threads)?;
    pool.install(|| -> Result<()> {
        let ex = lora_io::llm_extract::extract_llm(&a.base, &a.tuned, a.rank, a.min_diff)?;
        if ex.modules.is_empty() {
            bail!(
                "no linear layer differs between --base and --tuned (beyond --min-diff {})",
                a.min_diff
            );
        }
        lora_io::outdir::prepare_dir_output(
            "--out",
            &a.out,
            "lora extract",
            &FILES,
            a.force,
            &inputs,
        )?;
        lora_io::combine::write(&a.out, &ex.config, &ex.modules)?;
        let (worst_name, worst) =
            ex.kept.iter().fold(
                ("", 1.0f64),
                |m, (n, k)| if *k < m.1 { (n.as_str(), *k) } else { m },
            );
        eprintln!(
            "wrote {} (PEFT, r={}, {} layers; the least-kept layer, {worst_name}, keeps {:.1}% \
             of its difference's norm)",
            a.out.display(),
            a.rank,
            ex.modules.len(),
            worst * 100.0
        );
        if !ex.not_carried.is_empty() {
            eprintln!(
                "warning: {} other tensors differ and a LoRA adapter cannot carry them: {}{}",
                ex.not_carried.len(),
                ex.not_carried
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if ex.not_carried.len() > 5 {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        Ok(())
    })
}

/// Says what merging one LoRA file did.
pub fn report_merge(
    path: &std::path::Path,
    format: &str,
    weight: f32,
    rep: &lora_io::sd_lora::MergeReport,
) {
    let merged: Vec<String> = rep.merged.iter().map(|(k, n)| format!("{n} {k}")).collect();
    eprintln!(
        "merged {} ({format}, weight {weight}): {} modules{}",
        path.display(),
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

/// Whether `model` is a Stable Diffusion pipeline: a diffusers directory (model_index.json) or
/// a single file (what it holds is checked when it is opened).
pub fn is_sd_model(model: &std::path::Path) -> bool {
    model.join("model_index.json").is_file() || model.is_file()
}

/// Opens `--model`: a diffusers directory, or a single file with `--sd-config` (which only a
/// single file takes).
pub fn open_pipeline(
    model: &std::path::Path,
    sd_config: Option<&std::path::Path>,
) -> Result<SdPipeline> {
    let pipe = if model.is_file() {
        SdPipeline::open_single(model, sd_config)
    } else {
        if let Some(c) = sd_config {
            bail!(
                "--sd-config {}: applies to a single-file checkpoint; {} is a directory with its \
                 own configurations",
                c.display(),
                model.display()
            );
        }
        SdPipeline::open_dir(model)
    };
    pipe.with_context(|| format!("loading the pipeline {}", model.display()))
}

/// The entries `lora train` writes into an SD run's --out.
fn sd_train_owns(name: &str) -> bool {
    matches!(
        name,
        "pytorch_lora_weights.safetensors" | "lora_kohya.safetensors" | "metrics.jsonl"
    ) || (name.starts_with("sample-step-") && name.ends_with(".png"))
        || lora_train::sd_checkpoint::is_checkpoint_entry(name)
        || lora_io::outdir::is_dead_temp(name)
}

/// A digest of the training examples (file names and captions, in order): a resumed run must
/// see the same data.
fn data_digest(data: &[lora_train::diffusion::SdExample]) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in data {
        let name = e.image.file_name().map(|n| n.to_string_lossy().to_string());
        for b in name
            .unwrap_or_default()
            .bytes()
            .chain([0])
            .chain(e.caption.bytes())
            .chain([0])
        {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The settings a checkpoint records and a resume must repeat. Numbers are written as the
/// strings Rust prints (shortest round-trip), so that reading them back compares equal (a JSON
/// reader may be one unit off in a double's last digit).
fn sd_settings(
    (model, sd_config): (&std::path::Path, Option<&std::path::Path>),
    cfg: &lora_train::diffusion::SdTrainConfig,
    kohya: bool,
    data: &[lora_train::diffusion::SdExample],
) -> serde_json::Value {
    let path = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let f = |x: f32| x.to_string();
    let opt = |x: Option<f32>| x.map(|x| x.to_string());
    serde_json::json!({
        "model": path(model), "sd_config": sd_config.map(path),
        "resolution": cfg.resolution, "crop": format!("{:?}", cfg.crop), "flip": cfg.flip,
        "rank": cfg.lora.rank, "alpha": f(cfg.lora.alpha), "rslora": cfg.lora.use_rslora,
        "dropout": f(cfg.lora.dropout), "targets": cfg.targets, "steps": cfg.steps,
        "batch": cfg.batch, "lr": f(cfg.lr), "warmup": cfg.warmup,
        "schedule": format!("{:?}", cfg.schedule), "weight_decay": f(cfg.weight_decay),
        "max_grad_norm": f(cfg.max_grad_norm), "seed": cfg.seed.to_string(),
        "noise_offset": f(cfg.noise_offset), "snr_gamma": opt(cfg.snr_gamma),
        "text_encoder_lr": opt(cfg.text_encoder_lr),
        "format": if kohya { "kohya" } else { "diffusers" },
        "images": data.len(), "data": data_digest(data),
    })
}

/// The lora-rs files of an SD run's checkpoint directory.
fn checkpoint_file(name: &str) -> bool {
    // Either format: the earlier run's may differ from this one's.
    ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
        .iter()
        .any(|lora| lora_train::sd_checkpoint::checkpoint_file(name, lora))
}

/// `lora train` on a Stable Diffusion pipeline directory: LoRA on the UNet.
pub fn train(a: crate::args::TrainArgs) -> Result<()> {
    use lora_core::lora::{LoraConfig, LoraInit};
    use lora_train::diffusion::{
        read_image_folder, save_sd_lora, train_sd_lora_from, Crop, SdTrainConfig,
    };
    use std::io::Write;
    // Flags of the language-model runs that an SD run would otherwise ignore in silence.
    if a.device != "auto" && a.device != "cpu" {
        bail!(
            "--device {}: Stable Diffusion runs on the CPU only for now",
            a.device
        );
    }
    for (set, flag) in [
        (a.grad_accum != 1, "--grad-accum"),
        (a.loraplus_ratio != 1.0, "--loraplus-ratio"),
        (a.optimizer != "adamw", "--optimizer"),
        (a.gradient_checkpointing, "--gradient-checkpointing"),
        (
            a.eval_data.is_some() || a.eval_split > 0.0,
            "--eval-data / --eval-split",
        ),
        (a.pack, "--pack"),
        (a.seq_len.is_some(), "--seq-len"),
        (a.tf32, "--tf32"),
        // Checkpoints are taken every --save-every steps only.
        (a.save_minutes != 5.0, "--save-minutes (use --save-every)"),
        (a.eval_every > 0, "--eval-every"),
        (a.log_every.is_some(), "--log-every"),
        (a.no_eos || a.assistant_only_loss, "--no-eos / --assistant-only-loss"),
        (
            a.image_size.is_some() || a.no_flip || a.keep_classes || a.scale_jitter != 0.8,
            "--image-size / --no-flip / --keep-classes / --scale-jitter (image tasks; SD runs use --resolution, --random-flip)",
        ),
        (a.modules_to_save.is_some(), "--modules-to-save"),
    ] {
        if set {
            bail!("{flag} does not apply to Stable Diffusion runs (yet)");
        }
    }
    let schedule = match a.schedule.as_str() {
        "cosine" => lora_train::optim::Schedule::Cosine,
        "linear" => lora_train::optim::Schedule::Linear,
        "constant" => lora_train::optim::Schedule::Constant,
        other => bail!("--schedule must be cosine, linear or constant, got `{other}`"),
    };
    let kohya = match a.format.as_str() {
        "diffusers" | "peft" => false,
        "kohya" => true,
        other => bail!("--format must be diffusers or kohya, got `{other}`"),
    };
    let rank = a.rank.unwrap_or(4);
    let targets: Vec<String> = match &a.target {
        Some(t) => t
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => ["to_k", "to_q", "to_v", "to_out.0"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut cfg = SdTrainConfig {
        resolution: a.resolution.unwrap_or(512),
        crop: if a.random_crop {
            Crop::Random
        } else {
            Crop::Center
        },
        flip: a.random_flip,
        lora: LoraConfig {
            rank,
            alpha: a.alpha.unwrap_or(rank as f32),
            use_rslora: a.rslora,
            dropout: a.dropout,
            init: LoraInit::Gaussian,
        },
        targets,
        steps: a.steps.unwrap_or(100),
        batch: a.batch_size,
        lr: a.lr.unwrap_or(1e-4),
        warmup: a.warmup,
        schedule,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        noise_offset: a.noise_offset,
        snr_gamma: a.snr_gamma,
        text_encoder_lr: if a.train_text_encoder {
            Some(a.text_encoder_lr.or(a.lr).unwrap_or(1e-4))
        } else {
            None
        },
    };
    if a.text_encoder_lr.is_some() && !a.train_text_encoder {
        bail!("--text-encoder-lr applies with --train-text-encoder");
    }
    cfg.lora.validate()?;
    if let Some(e) = a.epochs {
        if !(e.is_finite() && e > 0.0) {
            bail!("--epochs must be a positive number, got {e}");
        }
    }
    if a.sample_every > 0 && a.sample_prompt.is_none() {
        bail!("--sample-every needs --sample-prompt");
    }
    lora_io::outdir::check_not_input(
        "--out",
        &a.out,
        &[("--model", &a.model), ("--data", &a.data)],
    )?;
    let command = "lora train (stable diffusion)";
    let existing = lora_io::outdir::inspect_output(
        "--out",
        &a.out,
        command,
        lora_io::outdir::Owned::Matching(&sd_train_owns),
    )?;
    let data = read_image_folder(&a.data)?;
    if let Some(e) = a.epochs {
        // A pass is ceil(images / batch) steps, as diffusers' scripts count them.
        let per_epoch = data.len().div_ceil(cfg.batch.max(1));
        cfg.steps = ((e as f64 * per_epoch as f64).ceil() as usize).max(1);
    }
    let name = if kohya {
        "lora_kohya.safetensors"
    } else {
        "pytorch_lora_weights.safetensors"
    };
    let settings = sd_settings((&a.model, a.sd_config.as_deref()), &cfg, kohya, &data);
    let resume = match (existing, a.resume) {
        (lora_io::outdir::Existing::Empty, true) => bail!(
            "--resume: {} holds no earlier run of `lora train` on a Stable Diffusion model",
            a.out.display()
        ),
        (lora_io::outdir::Existing::Ours(_), true) => {
            let (st, saved, dir) =
                lora_train::sd_checkpoint::newest(&a.out, &mut |n| eprintln!("{n}"))?;
            if let Some(m) = lora_train::sd_checkpoint::settings_mismatch(&saved, &settings) {
                bail!(
                    "--resume from {}: {m}; resume with the run's settings and data, or start \
                     anew with --force",
                    dir.display()
                );
            }
            eprintln!(
                "resuming from {} (step {} of {})",
                dir.display(),
                st.step,
                cfg.steps
            );
            Some(st)
        }
        (lora_io::outdir::Existing::Empty, false) => None,
        (lora_io::outdir::Existing::Ours(entries), false) => {
            if !a.force {
                bail!(
                    "--out {} holds an earlier run (pass --force to replace it, or --resume to \
                     continue it from its newest checkpoint)",
                    a.out.display()
                );
            }
            // A checkpoint directory holding someone else's file is not ours to remove.
            for e in &entries {
                let foreign = lora_io::outdir::foreign_entries(e, checkpoint_file);
                let named = e.file_name().map(|n| n.to_string_lossy().to_string());
                if e.is_dir()
                    && named.is_some_and(|n| lora_train::sd_checkpoint::is_checkpoint_entry(&n))
                    && !foreign.is_empty()
                {
                    bail!(
                        "--out {}: {} holds files lora-rs did not write ({}); --force replaces \
                         only what a run wrote (move them, or choose another --out)",
                        a.out.display(),
                        e.display(),
                        foreign.join(", ")
                    );
                }
            }
            lora_io::outdir::remove_owned(&entries)?;
            None
        }
    };
    let pool = crate::bench::pool(a.threads)?;
    pool.install(|| -> Result<()> {
        let mut pipe = open_pipeline(&a.model, a.sd_config.as_deref())?;
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("creating {}", a.out.display()))?;
        lora_io::outdir::write_marker(&a.out, command, None)?;
        let metrics_path = a.out.join("metrics.jsonl");
        if let Some(st) = &resume {
            // The steps up to the checkpoint's; the rest were lost with the interrupted run.
            let old = std::fs::read_to_string(&metrics_path).unwrap_or_default();
            let kept: String = old
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= st.step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            lora_io::write::write_atomic(&metrics_path, kept.as_bytes())?;
        }
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        if resume.is_none() {
            metrics
                .set_len(0)
                .with_context(|| format!("truncating {}", metrics_path.display()))?;
        }
        eprintln!(
            "training LoRA r{} alpha {} on {} UNet target(s){} over {} images at {}px, {} steps of {}",
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.targets.join(","),
            match cfg.text_encoder_lr {
                Some(lr) => format!(" and the text encoder's q/k/v/out_proj (lr {lr})"),
                None => String::new(),
            },
            data.len(),
            cfg.resolution,
            cfg.steps,
            cfg.batch
        );
        let bar = indicatif::ProgressBar::new(cfg.steps as u64);
        if let Some(st) = &resume {
            bar.set_position(st.step as u64);
        }
        let sample_noise: Vec<f32> = {
            let mut rng = lora_kernels::rng::Rng::new(a.seed ^ 0x5a3_91e);
            let f = pipe.vae.config().downscale();
            let n = pipe.unet.config().in_channels * (cfg.resolution / f).pow(2);
            (0..n).map(|_| rng.normal() as f32).collect()
        };
        // A signal after the first step: checkpoint at the end of the current step, then stop
        // (the exit status says which signal); before it, the process ends at once.
        crate::train::install_signal_handlers();
        let mut stopped: Option<usize> = None;
        let result = train_sd_lora_from(&mut pipe, &data, &cfg, resume.as_ref(), |pipe, s, state| {
            crate::train::STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
            bar.set_position(s.step as u64);
            bar.set_message(format!("loss {:.4}", s.loss));
            let line = serde_json::json!({"step": s.step, "loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr});
            writeln!(metrics, "{line}").map_err(|e| lora_io::error::IoError::Io {
                path: metrics_path.clone(),
                source: e,
            })?;
            if a.sample_every > 0 && (s.step % a.sample_every == 0 || s.step == cfg.steps) {
                let prompt = a.sample_prompt.as_deref().unwrap_or("");
                let sampling = lora_io::sd::Sampling {
                    kind: SamplerKind::Euler,
                    steps: 20,
                    guidance: 7.5,
                    clip_skip: 0,
                    adapters: true,
                };
                let res = (cfg.resolution, cfg.resolution);
                let img = pipe.generate((&[prompt], &[""]), &sample_noise, res, &sampling, &mut |_, _| {})?;
                grid(&[img], cfg.resolution, cfg.resolution)
                    .save_png_marked(&a.out.join(format!("sample-step-{:06}.png", s.step)))?;
            }
            let stop = crate::train::STOP.load(std::sync::atomic::Ordering::SeqCst);
            let due = a.save_every > 0 && s.step % a.save_every == 0;
            if (due || stop) && s.step < cfg.steps {
                let st = state()?;
                let notes = lora_train::sd_checkpoint::save(
                    &a.out,
                    &st,
                    &settings,
                    name,
                    &|p| save_sd_lora(pipe, &cfg, kohya, p),
                    a.keep_checkpoints,
                )?;
                for n in notes {
                    bar.suspend(|| eprintln!("{n}"));
                }
                if stop {
                    stopped = Some(s.step);
                    // Ends the loop; told apart from a real error below.
                    return Err(lora_io::error::IoError::Core(
                        lora_core::CoreError::InvalidConfig {
                            field: "interrupted",
                            reason: "stopped by a signal".into(),
                        },
                    ));
                }
            }
            Ok(())
        });
        bar.finish_and_clear();
        if let Some(step) = stopped {
            eprintln!(
                "interrupted: checkpoint written at step {step} ({}); continue with the same flags and --resume",
                a.out.join(format!("checkpoint-{step:06}")).display()
            );
            return Ok(());
        }
        let hist = result?;
        save_sd_lora(&pipe, &cfg, kohya, &a.out.join(name))?;
        let (first_step, first) = hist.first().map_or((0, f32::NAN), |s| (s.step, s.loss));
        let k = hist.len().min(10);
        let last: f32 = hist[hist.len() - k..].iter().map(|s| s.loss).sum::<f32>() / k as f32;
        eprintln!(
            "wrote {} ({} format); loss {first:.4} at step {first_step}, {last:.4} over the last {k} steps",
            a.out.join(name).display(),
            if kohya { "kohya" } else { "diffusers" }
        );
        // Finished: a signal that came after the last step (or while the file was written)
        // does not make the run report itself interrupted.
        crate::train::clear_signal();
        Ok(())
    })
}

/// `lora extract`.
pub fn extract(a: crate::args::ExtractArgs) -> Result<()> {
    let sd = [&a.base, &a.tuned].map(|d| is_sd_model(d));
    if sd == [false, false] {
        return extract_llm(a);
    }
    for ((flag, dir), is_sd) in [("--base", &a.base), ("--tuned", &a.tuned)]
        .into_iter()
        .zip(sd)
    {
        if !is_sd {
            bail!(
                "{flag} {}: not a Stable Diffusion pipeline (a diffusers directory with \
                 model_index.json, or a single .safetensors checkpoint) while the other is",
                dir.display()
            );
        }
    }
    if !(a.min_diff.is_finite() && a.min_diff >= 0.0) {
        bail!(
            "--min-diff must be a non-negative number, got {}",
            a.min_diff
        );
    }
    lora_io::outdir::check_not_input(
        "--out",
        &a.out,
        &[("--base", &a.base), ("--tuned", &a.tuned)],
    )?;
    lora_io::outdir::check_output_file("--out", &a.out, a.force)?;
    let pool = crate::bench::pool(a.threads)?;
    pool.install(|| -> Result<()> {
        // --sd-config configures whichever side is a single file.
        let config_for = |p: &std::path::Path| a.sd_config.as_deref().filter(|_| p.is_file());
        if a.sd_config.is_some() && !a.base.is_file() && !a.tuned.is_file() {
            bail!("--sd-config applies to a single-file checkpoint; --base and --tuned are directories");
        }
        let mut base = open_pipeline(&a.base, config_for(&a.base))?;
        let mut tuned = open_pipeline(&a.tuned, config_for(&a.tuned))?;
        let ex = lora_io::sd_extract::extract_sd_lora(
            &mut base,
            &mut tuned,
            a.rank,
            a.conv_rank,
            a.min_diff,
        )?;
        if ex.is_empty() {
            bail!(
                "no layer differs between --base and --tuned (beyond --min-diff {})",
                a.min_diff
            );
        }
        lora_io::sd_extract::write_kohya(&a.out, &ex)?;
        let worst = ex.iter().map(|e| e.kept).fold(1.0f64, f64::min);
        eprintln!(
            "wrote {} ({} modules; the least-kept layer keeps {:.1}% of its difference's norm)",
            a.out.display(),
            ex.len(),
            worst * 100.0
        );
        Ok(())
    })
}
