//! `lora bench train`: one LoRA training step on a GPT-2-shaped model built in memory (random
//! weights, no download): median step time, tokens/s and peak resident memory.

use anyhow::Result;
use lora_core::lora::{LoraConfig, LoraInit};
use lora_core::models::gpt2::{Gpt2, Gpt2Config};
use lora_core::models::llama::{Llama, LlamaConfig, RopeScaling};
use lora_core::models::{set_precision, CausalLm, Precision};
use lora_core::{CoreError, Tensor};
use lora_kernels::rng::Rng;
use lora_train::batches::Batch;
use lora_train::optim::AdamW;
use lora_train::trainer::{adapter_groups, train_step};
use std::time::Instant;

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// In-memory bf16 weights.
struct Bf16(Vec<u16>);

impl lora_core::ExternalHalf for Bf16 {
    fn bits(&self) -> &[u16] {
        &self.0
    }
    fn format(&self) -> lora_core::HalfFormat {
        lora_core::HalfFormat::Bf16
    }
}

/// What `lora bench train` runs.
pub struct TrainBench {
    /// `gpt2` (LoRA on c_attn) or `llama` (RMSNorm, RoPE, SwiGLU, GQA; LoRA on q_proj, v_proj).
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    /// Key/value heads (llama; gpt2 has as many as query heads).
    pub kv_heads: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    pub steps: usize,
    /// The adapters' learning rate.
    pub lr: f32,
    /// Report every step's loss.
    pub losses: bool,
    /// LoRA on every linear layer but the head, instead of the architecture's usual targets.
    pub all_linear: bool,
    pub checkpoint: bool,
    pub bf16: bool,
    /// Precision of the products.
    pub precision: lora_core::models::Precision,
    pub json: bool,
    /// Where the step runs (the model is moved there before the warm-up step).
    pub device: lora_core::Device,
}

/// Runs `steps` timed steps (after one warm-up) and prints the medians.
pub fn run(cfg: &TrainBench) -> Result<()> {
    let &TrainBench {
        layers,
        hidden,
        heads,
        kv_heads,
        vocab,
        batch,
        seq,
        rank,
        steps,
        checkpoint,
        bf16,
        json,
        ..
    } = cfg;
    let mut rng = Rng::new(0);
    let mut load = |_: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
        if bf16 {
            // As a bf16 checkpoint loads: 16-bit values, widened inside the products.
            let bits = v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            Tensor::from_external_half(std::sync::Arc::new(Bf16(bits)), shape)
        } else {
            Tensor::new(v, shape)
        }
    };
    let (mut model, targets, shape, lora_on): (Box<dyn CausalLm>, &[&str], &str, &str) =
        match cfg.arch.as_str() {
            "gpt2" => {
                let c = Gpt2Config {
                    vocab_size: vocab,
                    n_positions: seq.max(1024),
                    n_embd: hidden,
                    n_layer: layers,
                    n_head: heads,
                    n_inner: 4 * hidden,
                    layer_norm_epsilon: 1e-5,
                    tie_word_embeddings: true,
                };
                let m = Gpt2::load(&c, &mut load)?;
                (Box::new(m), &["attn.c_attn"], "GPT-2 shape", "c_attn")
            }
            "llama" => {
                anyhow::ensure!(
                    heads > 0 && hidden % heads == 0 && kv_heads > 0 && heads % kv_heads == 0,
                    "--heads must divide --hidden and --kv-heads must divide --heads"
                );
                let c = LlamaConfig {
                    vocab_size: vocab,
                    hidden_size: hidden,
                    // SwiGLU's 8/3 width, rounded up to a multiple of 64 (Llama's convention).
                    intermediate_size: (8 * hidden / 3).div_ceil(64) * 64,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: kv_heads,
                    head_dim: hidden / heads,
                    rms_norm_eps: 1e-5,
                    rope_theta: 10000.0,
                    rope_scaling: RopeScaling::None,
                    max_position_embeddings: seq.max(1024),
                    tie_word_embeddings: false,
                    qkv_bias: false,
                    o_bias: false,
                    mlp_bias: false,
                    sliding_window: None,
                };
                let m = Llama::load(&c, &mut load)?;
                (
                    Box::new(m),
                    &["self_attn.q_proj", "self_attn.v_proj"],
                    "Llama shape (RMSNorm, RoPE, SwiGLU, GQA)",
                    "q_proj, v_proj",
                )
            }
            other => anyhow::bail!("--arch must be gpt2 or llama, got `{other}`"),
        };
    let lora = LoraConfig {
        rank,
        alpha: 2.0 * rank as f32,
        use_rslora: false,
        dropout: 0.0,
        init: LoraInit::KaimingUniform,
    };
    let head_name = model.output_head().to_string();
    for (i, (name, lin)) in model.linears_mut().into_iter().enumerate() {
        let head = name == head_name;
        if (cfg.all_linear && !head) || targets.iter().any(|t| name.ends_with(t)) {
            lin.inject(&lora, i as u64)?;
            // Non-zero B so the adapter path carries real values, as after a few steps.
            if let Some(l) = lin.lora() {
                let n = l.lora_b.numel();
                l.lora_b
                    .set_data((0..n).map(|k| ((k % 7) as f32 - 3.0) * 1e-3).collect())?;
            }
        }
    }
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let b = Batch {
        ids,
        labels,
        batch,
        seq,
    };
    let model: &dyn CausalLm = model.as_ref();
    let device = cfg.device;
    model.to_device(device)?;
    if cfg.precision != Precision::F32 {
        anyhow::ensure!(
            device == lora_core::Device::Cpu,
            "--precision {} runs on the CPU (the GPU products are f32 or TF32)",
            cfg.precision
        );
    }
    set_precision(model, cfg.precision)?;
    let groups = adapter_groups(model, 1.0);
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let first = train_step(
        model,
        &mut opt,
        &groups,
        std::slice::from_ref(&b),
        cfg.lr,
        Some(1.0),
        0,
        0,
        checkpoint,
    )?;
    let (mut times, mut losses) = (Vec::new(), vec![first.loss]);
    for s in 0..steps {
        let t = Instant::now();
        let st = train_step(
            model,
            &mut opt,
            &groups,
            std::slice::from_ref(&b),
            cfg.lr,
            Some(1.0),
            0,
            s as u64 + 1,
            checkpoint,
        )?;
        device.synchronize()?; // the last optimizer kernels are queued, not done
        times.push(t.elapsed().as_secs_f64());
        losses.push(st.loss);
    }
    let med = crate::bench::median(&mut times);
    let tps = (batch * seq) as f64 / med;
    let rss = peak_rss_bytes().map(|b| b as f64 / (1u64 << 30) as f64);
    let params: usize = model.base_params();
    if json {
        let mut obj = serde_json::json!({"arch": cfg.arch, "layers": layers, "hidden": hidden, "params": params, "batch": batch, "seq": seq, "rank": rank, "threads": rayon::current_num_threads(), "steps": steps, "gradient_checkpointing": checkpoint, "weights": if bf16 { "bf16" } else { "f32" }, "precision": cfg.precision.name(), "all_linear": cfg.all_linear, "device": device.describe()?, "median_step_s": med, "tokens_per_s": tps, "peak_rss_gib": rss, "lr": cfg.lr.to_string().parse::<f64>().ok()});
        if cfg.losses {
            obj["losses"] = serde_json::json!(losses);
        }
        outln!("{obj}");
    } else {
        let ck = match (checkpoint, bf16) {
            (true, true) => "; gradient checkpointing; bf16 frozen weights",
            (true, false) => "; gradient checkpointing",
            (false, true) => "; bf16 frozen weights",
            (false, false) => "",
        };
        let lora_on = if cfg.all_linear {
            "every linear layer"
        } else {
            lora_on
        };
        let what = format!("{shape}; LoRA on {lora_on}");
        outln!("{what}: {layers} layers, {hidden} hidden, {params} params; LoRA r{rank}; batch {batch} x {seq}; {} threads{ck}; {} products", rayon::current_num_threads(), cfg.precision);
        outln!(
            "median step {:.3} s ({steps} steps) | {tps:.0} tokens/s | peak RSS {}",
            med,
            rss.map_or("n/a".into(), |g| format!("{g:.2} GiB"))
        );
        if cfg.losses {
            let l: Vec<String> = losses.iter().map(|x| format!("{x:.4}")).collect();
            outln!("losses (warm-up step first): {}", l.join(" "));
        }
    }
    Ok(())
}
