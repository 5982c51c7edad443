//! `lora bench sd`: one step of a Stable Diffusion 1.5-shaped UNet (random weights, no
//! download; 860M parameters at the default width): `--mode train`, a LoRA training step as
//! `lora train` runs it on an SD pipeline (rank 4 on `to_q,to_k,to_v,to_out.0` as diffusers'
//! script, noisy latents at `--size / 8`, random text states (77 x 768), MSE to a random
//! target, backward, gradient clipping, AdamW); `--mode generate`, one classifier-free-guided
//! sampling step (the UNet on the batch doubled, no gradients). Median step time and peak
//! resident memory; `benches/compare_sd_peft.py` times the same in diffusers + PEFT.

use crate::args::SdBenchArgs;
use anyhow::Result;
use lora_core::lora::{LoraConfig, LoraInit};
use lora_core::models::unet::UNet2DCondition;
use lora_core::{ops, CoreError, Tape, Tensor};
use lora_kernels::rng::Rng;
use lora_train::optim::{clip_grad_norm, AdamW, Optimizer, ParamGroup};
use std::time::Instant;

/// PyTorch's default initialisation, in the magnitudes that matter for speed (no denormals,
/// no overflow through the blocks): norms' weights 1, biases 0, other weights uniform in
/// +-1/sqrt(fan_in).
fn init(rng: &mut Rng, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        let one = name.ends_with(".weight") && name.contains("norm");
        return vec![if one { 1.0 } else { 0.0 }; n];
    }
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// 16-bit weights held as a checkpoint's fp16 tensors are (in memory, 2 bytes each).
struct OwnedHalf(Vec<u16>);

impl lora_core::ExternalHalf for OwnedHalf {
    fn bits(&self) -> &[u16] {
        &self.0
    }
    fn format(&self) -> lora_core::HalfFormat {
        lora_core::HalfFormat::F16
    }
}

/// Runs `a`.
pub fn run(a: &SdBenchArgs) -> Result<()> {
    let half = match a.weights.as_str() {
        "f32" => false,
        "f16" => true,
        other => anyhow::bail!("--weights must be f32 or f16, got `{other}`"),
    };
    let c = a.base_channels;
    let train = match a.mode.as_str() {
        "train" => true,
        "generate" => false,
        other => anyhow::bail!("--mode must be train or generate, got `{other}`"),
    };
    anyhow::ensure!(
        a.size.is_multiple_of(64) && a.size > 0,
        "--size must be a positive multiple of 64 (the VAE's 8 times the UNet's 8)"
    );
    anyhow::ensure!(
        c.is_multiple_of(32) && c > 0,
        "--base-channels must be a multiple of 32"
    );
    let cfg_json = serde_json::json!({
        "block_out_channels": [c, 2 * c, 4 * c, 4 * c],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    });
    let cfg = lora_io::diffusion::unet_config(std::path::Path::new("sd1.5"), &cfg_json)?;
    let mut rng = Rng::new(0);
    let mut load = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let v = init(&mut rng, name, shape);
        if half && shape.len() > 1 {
            // As an fp16 checkpoint's weights are held: 16-bit in memory.
            let bits = v
                .iter()
                .map(|x| half::f16::from_f32(*x).to_bits())
                .collect();
            return Tensor::from_external_half(std::sync::Arc::new(OwnedHalf(bits)), shape);
        }
        Tensor::new(v, shape)
    };
    let t0 = Instant::now();
    let mut unet = UNet2DCondition::load(&cfg, &mut load)?;
    let built = t0.elapsed().as_secs_f64();
    let params_n: usize = unet
        .linears()
        .iter()
        .map(|(_, l)| l.base().0.numel())
        .chain(unet.convs().iter().map(|(_, c)| c.base().0.numel()))
        .sum();
    let lora = LoraConfig {
        rank: a.rank,
        alpha: a.rank as f32,
        use_rslora: false,
        dropout: 0.0,
        init: LoraInit::KaimingUniform,
    };
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let adapted = if train {
        let n = unet.inject_lora(&lora, &targets, 0)?;
        // B away from zero, so every product of the step does real work.
        for (_, t) in unet.lora_tensors() {
            if t.shape()[1] == a.rank {
                let k = t.numel();
                t.set_data((0..k).map(|i| ((i % 7) as f32 - 3.0) * 1e-3).collect())?;
            }
        }
        n
    } else {
        0
    };
    let params: Vec<Tensor> = unet
        .lora_tensors()
        .into_iter()
        .map(|(_, t)| t.clone())
        .collect();
    let groups = [ParamGroup {
        params: params.clone(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 1e-2);
    let lat = a.size / 8;
    let b = if train { a.batch } else { 2 * a.batch };
    let per = 4 * lat * lat;
    let mut rng = Rng::new(1);
    let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let noisy = Tensor::new(normal(b * per), &[b, 4, lat, lat])?;
    let target = Tensor::new(normal(b * per), &[b, 4, lat, lat])?;
    let ctx = Tensor::new(normal(b * 77 * 768), &[b, 77, 768])?;
    let ts: Vec<f32> = (0..b).map(|i| 100.0 + 300.0 * i as f32).collect();
    let mut step = |s: u64| -> Result<()> {
        if train {
            let tape = Tape::new(s);
            let pred = unet.forward(&tape, &noisy, &ts, &ctx, true)?;
            let loss = ops::mse_loss(&tape, &pred, &target, None)?;
            let mut grads = tape.backward(&loss)?;
            clip_grad_norm(&mut grads, &params, 1.0)?;
            opt.step(&groups, &grads, 1e-4)?;
        } else {
            let pred = unet.forward(&Tape::inference(), &noisy, &ts, &ctx, false)?;
            std::hint::black_box(pred.try_to_vec()?);
        }
        Ok(())
    };
    let (med, times) = crate::bench::time_steps(a.steps, &mut step)?;
    let rss = crate::train_bench::peak_rss_bytes().map(|b| b as f64 / (1u64 << 30) as f64);
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"mode": a.mode, "weights": a.weights, "batch": a.batch, "size": a.size, "rank": a.rank,
                "base_channels": c, "unet_params": params_n, "adapted_layers": adapted,
                "threads": rayon::current_num_threads(), "steps": a.steps, "median_step_s": med,
                "step_times_s": times, "peak_rss_gib": rss, "build_s": built})
        );
    } else {
        outln!(
            "SD 1.5-shaped UNet ({:.0}M {} parameters, base width {c}), {}x{} images ({lat}x{lat} latents), {}; {} threads",
            params_n as f64 / 1e6,
            a.weights,
            a.size,
            a.size,
            if train {
                format!("LoRA r{} training step on {adapted} layers, batch {}", a.rank, a.batch)
            } else {
                format!("guided sampling step, {} image(s) (UNet batch {b})", a.batch)
            },
            rayon::current_num_threads()
        );
        outln!(
            "median step {med:.3} s ({} steps) | peak RSS {}",
            a.steps,
            rss.map_or("n/a".into(), |g| format!("{g:.2} GiB"))
        );
    }
    Ok(())
}
