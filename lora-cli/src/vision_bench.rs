//! `lora bench vision`: one LoRA training step of a ViT-base-shaped classifier (random weights,
//! no download; LoRA on q_proj and v_proj, the head trained in full as PEFT's
//! `modules_to_save`), or one conv LoRA layer: median step time, images/s, peak resident memory.
//! `benches/compare_vision_peft.py` times the same in PyTorch + PEFT.

use crate::args::VisionBenchArgs;
use anyhow::Result;
use lora_core::lora::{LoraConfig, LoraInit};
use lora_core::models::vit::{Activation, Vit, VitConfig};
use lora_core::models::{ImageClassifier, VisionModel};
use lora_core::ops::Conv2dParams;
use lora_core::{CoreError, Gradients, LoraConv2d, Tape, Tensor};
use lora_kernels::rng::Rng;
use lora_train::optim::{clip_grad_norm, AdamW, Optimizer, ParamGroup};

fn random(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

/// Runs the benchmark `a` at image (or feature-map) side `size`.
pub fn run(a: &VisionBenchArgs, size: usize) -> Result<()> {
    let mut rng = Rng::new(0);
    let lora = LoraConfig {
        rank: a.rank,
        alpha: a.rank as f32,
        use_rslora: false,
        dropout: 0.0,
        init: LoraInit::KaimingUniform,
    };
    let flops: Option<f64>;
    let (what, params, step): (String, Vec<Tensor>, Box<dyn Fn(u64) -> Result<Gradients>>) = match a
        .arch
        .as_str()
    {
        "vit" => {
            anyhow::ensure!(
                size % 16 == 0,
                "--size must be a multiple of the patch size 16"
            );
            let cfg = VitConfig {
                hidden_size: 768,
                num_hidden_layers: a.layers,
                num_attention_heads: 12,
                intermediate_size: 3072,
                hidden_act: Activation::GeluErf,
                layer_norm_eps: 1e-12,
                image_size: (size, size),
                patch_size: (16, 16),
                num_channels: 3,
                qkv_bias: true,
                num_labels: 10,
            };
            let mut load = |_: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
                let n: usize = shape.iter().product();
                Tensor::new(random(&mut rng, n, 0.02), shape)
            };
            flops = Some(vit_step_flops(&cfg, a.batch, a.rank));
            let mut m = Vit::load(&cfg, &mut load)?;
            for (i, (name, lin)) in m.linears_mut().into_iter().enumerate() {
                if name.ends_with("q_proj") || name.ends_with("v_proj") {
                    lin.inject(&lora, i as u64)?;
                    if let Some(l) = lin.lora() {
                        let n = l.lora_b.numel();
                        l.lora_b
                            .set_data((0..n).map(|k| ((k % 7) as f32 - 3.0) * 1e-3).collect())?;
                    }
                }
            }
            m.head_mut().train_in_full()?;
            let params = lora_io::vision::adapter_tensors(&m)
                .into_iter()
                .map(|(_, t)| t.clone())
                .collect();
            let pixels = Tensor::new(
                random(&mut rng, a.batch * 3 * size * size, 1.0),
                &[a.batch, 3, size, size],
            )?;
            let labels: Vec<i64> = (0..a.batch as i64).map(|i| i % 10).collect();
            let what = format!(
                "ViT-base shape ({} layers, 768 hidden, patch 16, {size}x{size}); LoRA r{} on q_proj, v_proj; head trained",
                a.layers, a.rank
            );
            (
                what,
                params,
                Box::new(move |seed| {
                    let tape = Tape::new(seed);
                    let loss = m.loss(&tape, &pixels, &labels, true)?;
                    Ok(tape.backward(&loss)?)
                }),
            )
        }
        "conv" => {
            let c = 256;
            let w = Tensor::new(random(&mut rng, c * c * 9, 0.02), &[c, c, 3, 3])?;
            let p = Conv2dParams {
                padding: (1, 1),
                ..Conv2dParams::default()
            };
            // Products: the base convolution and A's forward (each `2 P K` per output channel
            // and image, K = C * 9), B's forward; backward dB, dh and dA (x and W need none).
            let (pix, k) = ((a.batch * size * size) as f64, (c * 9) as f64);
            let (cf, r) = (c as f64, a.rank as f64);
            flops = Some(2.0 * pix * (cf * k + 2.0 * r * k + 3.0 * cf * r));
            let layer = LoraConv2d::new(w, None, p, &lora, 0)?;
            let n = layer.lora_b.numel();
            layer
                .lora_b
                .set_data((0..n).map(|k| ((k % 7) as f32 - 3.0) * 1e-3).collect())?;
            let params = vec![layer.lora_a.clone(), layer.lora_b.clone()];
            let x = Tensor::new(
                random(&mut rng, a.batch * c * size * size, 1.0),
                &[a.batch, c, size, size],
            )?;
            let dy = random(&mut rng, a.batch * c * size * size, 1.0);
            let what = format!(
                "conv LoRA 3x3, 256 -> 256 channels, {size}x{size}, r{}; forward + backward of A and B",
                a.rank
            );
            (
                what,
                params,
                Box::new(move |seed| {
                    let tape = Tape::new(seed);
                    let y = layer.forward(&tape, &x)?;
                    Ok(tape.backward_with(&y, &dy)?)
                }),
            )
        }
        other => anyhow::bail!("--arch must be vit or conv, got `{other}`"),
    };
    let groups = vec![ParamGroup {
        params: params.clone(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut full_step = |s: u64| -> Result<()> {
        let mut g = step(s)?;
        if a.arch == "vit" {
            clip_grad_norm(&mut g, &params, 1.0)?;
        }
        opt.step(&groups, &g, 1e-4)?;
        Ok(())
    };
    let (med, _) = crate::bench::time_steps(a.steps, &mut full_step)?;
    let ips = a.batch as f64 / med;
    let rss = crate::train_bench::peak_rss_bytes().map(|b| b as f64 / (1u64 << 30) as f64);
    // The step's products against this CPU's f32 FMA peak, measured now on the same threads.
    let gflops = flops.map(|f| f / med / 1e9);
    let peak = lora_kernels::peak::f32_fma(0.5).map(|p| p.gflops);
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"arch": a.arch, "batch": a.batch, "size": size, "rank": a.rank, "layers": a.layers,
                "threads": rayon::current_num_threads(), "steps": a.steps, "median_step_s": med,
                "images_per_s": ips, "peak_rss_gib": rss, "step_gflop": flops.map(|f| f / 1e9),
                "gflops": gflops, "f32_peak_gflops": peak})
        );
    } else {
        outln!(
            "{what}; batch {}; {} threads",
            a.batch,
            rayon::current_num_threads()
        );
        outln!(
            "median step {med:.3} s ({} steps) | {ips:.2} images/s | peak RSS {}",
            a.steps,
            rss.map_or("n/a".into(), |g| format!("{g:.2} GiB"))
        );
        if let (Some(f), Some(g)) = (flops, gflops) {
            let share = peak.map_or(String::new(), |p| {
                format!(
                    " = {:.0}% of this CPU's f32 FMA peak ({p:.1} GFLOP/s)",
                    100.0 * g / p
                )
            });
            outln!(
                "products: {:.1} GFLOP per step (forward and backward) | {g:.1} GFLOP/s{share}",
                f / 1e9
            );
        }
    }
    Ok(())
}

/// FLOPs of the matrix products one LoRA training step of `cfg` (batch `batch`, rank `rank` on
/// q_proj and v_proj, the head trained) must do, a multiply-add counted as two: the forward
/// (patch embedding, the blocks' linears, attention's two products, the adapters, the head)
/// and the backward (input gradients of every linear whose input needs one: not block 0's
/// q/k/v or their adapters, whose input derives only from frozen tensors; attention's four
/// products, three in block 0, whose keys need no gradient; the adapters' four; the head's
/// weight and input gradients). Recomputation (attention's scores in backward) is not
/// counted: this is the work any implementation needs.
pub fn vit_step_flops(cfg: &VitConfig, batch: usize, rank: usize) -> f64 {
    let (b, c, i) = (
        batch as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
    );
    let p = cfg.num_patches() as f64;
    let t = p + 1.0;
    let (pw, ph) = cfg.patch_size;
    let patch_in = (cfg.num_channels * pw * ph) as f64;
    let (r, labels, layers) = (
        rank as f64,
        cfg.num_labels as f64,
        cfg.num_hidden_layers as f64,
    );
    let linears = 2.0 * b * t * (4.0 * c * c + 2.0 * c * i); // per block, one direction
    let attention = 4.0 * b * t * t * c; // QK^T and PV, per block
    let lora = 2.0 * 4.0 * b * t * r * c; // q and v: x A^T and u B^T, per block
    let forward = 2.0 * b * p * patch_in * c + layers * (linears + attention + lora);
    // Block 0's q/k/v input gradients and its adapters' dX, and its dK (k derives only from
    // frozen tensors there).
    let qkv_dx = 3.0 * 2.0 * b * t * c * c + 2.0 * 2.0 * b * t * r * c + 2.0 * b * t * t * c;
    let backward = layers * (linears + 2.0 * attention + 2.0 * lora) - qkv_dx;
    let head = 2.0 * b * c * labels;
    forward + head + backward + 2.0 * head
}
