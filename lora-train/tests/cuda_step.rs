//! A whole training step on a real GPU against the same step on the CPU: the fixture models
//! (GPT-2; Llama with GQA; Llama 3 RoPE scaling; Mistral; Qwen2 with q/k/v bias; Llama in bf16)
//! with an adapter on every linear layer, dropout 0.2 and non-zero B, moved to `cuda:0`; loss
//! and every adapter gradient, then
//! three optimizer steps with clipping, AdamW and LoRA+ groups. Needs a GPU: where no CUDA
//! device answers it says it was skipped (`scripts/gpu-check.sh` runs it on a GPU machine and
//! sets `LORA_REQUIRE_GPU=1`, which turns a skip into a failure).
//!
//! Tolerances: f32 on both sides, but different summation orders (cuBLAS, the kernels'
//! reductions), so relative to each tensor's largest value: loss 1e-5, gradients 1e-4, adapters
//! after three steps 1e-4.

mod common;

use common::{adapters, max_rel, micro_batches, model, step, three_steps, worst_rel};
use lora_core::Device;

const DEV: Device = Device::Cuda(0);

fn gpu() -> bool {
    if lora_kernels::cuda::device_count() > 0 {
        match DEV.describe() {
            Ok(name) => {
                println!("on {name}");
                return true;
            }
            Err(e) if std::env::var_os("LORA_REQUIRE_GPU").is_some() => {
                panic!("LORA_REQUIRE_GPU is set but cuda:0 cannot be used: {e}")
            }
            Err(e) => println!("SKIPPED: cuda:0 cannot be used: {e}"),
        }
    } else if std::env::var_os("LORA_REQUIRE_GPU").is_some() {
        panic!("LORA_REQUIRE_GPU is set but no CUDA device answers");
    } else {
        println!("SKIPPED: no CUDA device answers on this machine");
    }
    false
}

fn check(name: &str) {
    if !gpu() {
        return;
    }
    let host = model(name);
    let dev = model(name);
    dev.to_device(DEV).unwrap();
    let (loss_h, g_h, _) = step(host.as_ref(), name, false);
    let (loss_d, g_d, _) = step(dev.as_ref(), name, false);
    let e = ((loss_h - loss_d) / loss_h).abs();
    println!("{name}: loss cpu {loss_h} cuda {loss_d} (rel {e:.2e})");
    assert!(e <= 1e-5, "{name}: loss {loss_h} vs {loss_d}");
    let worst = worst_rel(&g_h, &g_d);
    println!("{name}: worst adapter gradient relative difference {worst:.2e}");
    assert!(
        worst <= 1e-4,
        "{name}: adapter gradients differ by {worst:.2e}"
    );
    let (_, g_c, _) = step(dev.as_ref(), name, true);
    let worst_c = worst_rel(&g_d, &g_c);
    assert!(
        worst_c <= 1e-4,
        "{name}: checkpointed gradients differ by {worst_c:.2e}"
    );

    let micro = micro_batches(name);
    let host = model(name);
    let dev = model(name);
    dev.to_device(DEV).unwrap();
    let (st_h, _) = three_steps(host.as_ref(), &micro);
    let (st_d, _) = three_steps(dev.as_ref(), &micro);
    for (h, d) in st_h.iter().zip(&st_d) {
        assert!(
            ((h.loss - d.loss) / h.loss).abs() <= 1e-4,
            "{name}: {h:?} vs {d:?}"
        );
    }
    let worst = adapters(host.as_ref())
        .iter()
        .zip(adapters(dev.as_ref()))
        .map(|(a, d)| max_rel(&a.to_vec(), &d.try_to_vec().unwrap()))
        .fold(0.0f32, f32::max);
    println!("{name}: adapters after 3 steps, worst relative difference {worst:.2e}");
    assert!(
        worst <= 1e-4,
        "{name}: adapters after 3 steps differ by {worst:.2e}"
    );
}

#[test]
fn cuda_gpt2_step_matches_the_cpu() {
    check("gpt2");
}

#[test]
fn cuda_llama_gqa_step_matches_the_cpu() {
    check("llama_gqa");
}

#[test]
fn cuda_qwen2_step_matches_the_cpu() {
    check("qwen2_bias");
}

#[test]
fn cuda_llama3_rope_and_mistral_steps_match_the_cpu() {
    check("llama3_rope");
    check("mistral");
}

#[test]
fn cuda_bf16_llama_step_matches_the_cpu() {
    check("llama_bf16");
}
