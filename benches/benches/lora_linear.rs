//! Criterion benchmarks: LoRA linear forward+backward against the frozen-base layer alone
//! (forward + input gradient), at the reference shapes, named by scenario. Throughput is
//! reported in FLOP (criterion prints it as "elem/s": read Gelem/s as GFLOP/s).
//!
//! Run: `cargo bench -p lora-benches` (about 2 minutes on 2 cores). For the ratio and the GEMM
//! ceiling in one table, use `lora bench linear --suite`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_kernels::workload::{GemmBf16Workload, GemmWorkload, LinearWorkload, MixedWorkload};
use std::time::Duration;

const SCENARIOS: [(&str, usize, usize, usize, usize); 4] = [
    ("gpt2_attn_768x768_r8", 2048, 768, 768, 8),
    ("gpt2_mlp_768x3072_r16", 2048, 768, 3072, 16),
    ("llama1b_proj_2048x2048_r16", 4096, 2048, 2048, 16),
    ("llama7b_qproj_4096x4096_r64", 512, 4096, 4096, 64),
];

fn linear(c: &mut Criterion) {
    for (name, t, k, m, r) in SCENARIOS {
        let mut g = c.benchmark_group(name);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let mut lora = LinearWorkload::new(t, k, m, r, false, 1);
        g.throughput(Throughput::Elements(lora.flops() as u64));
        g.bench_function("lora_fwd_bwd", |b| b.iter(|| lora.step().unwrap()));
        let mut base = LinearWorkload::new(t, k, m, 0, false, 1);
        g.throughput(Throughput::Elements(base.flops() as u64));
        g.bench_function("base_fwd_dx", |b| b.iter(|| base.step().unwrap()));
        // bf16 products on the prepacked frozen weight (the adapter stays f32).
        let mut lora = LinearWorkload::new(t, k, m, r, false, 1).bf16().unwrap();
        g.throughput(Throughput::Elements(lora.flops() as u64));
        g.bench_function("lora_fwd_bwd_bf16", |b| b.iter(|| lora.step().unwrap()));
        // The same with the weight packed on every call: what prepacking at load saves.
        let mut lora = LinearWorkload::new(t, k, m, r, false, 1)
            .bf16_repacked()
            .unwrap();
        g.bench_function("lora_fwd_bwd_bf16_repacked", |b| {
            b.iter(|| lora.step().unwrap())
        });
        g.finish();
    }
}

fn ceiling(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_ceiling");
    g.sample_size(10);
    let mut w = GemmWorkload::new(2048);
    g.throughput(Throughput::Elements(w.flops() as u64));
    g.bench_function("square_2048", |b| b.iter(|| w.step().unwrap()));
    // bf16 operands, f32 accumulation on the kernel this CPU chose, the right operand prepacked
    // as a frozen weight is; with and without the left operand's rounding and packing; then
    // every other vector kernel the CPU runs, prepacked (not the portable one: about 1 GFLOP/s
    // on x86, 14 s a product).
    use lora_kernels::gemm_bf16::Bf16Kernel;
    let chosen = lora_kernels::gemm_bf16::chosen();
    let mut w = GemmBf16Workload::new(2048).unwrap();
    g.throughput(Throughput::Elements(w.flops() as u64));
    g.bench_function("square_2048_bf16_prepacked", |b| {
        b.iter(|| w.step(true, chosen).unwrap())
    });
    g.bench_function("square_2048_bf16_pack_lhs", |b| {
        b.iter(|| w.step(false, chosen).unwrap())
    });
    for k in Bf16Kernel::ALL {
        if k != chosen && k != Bf16Kernel::Portable && k.available() {
            let name = format!("square_2048_bf16_prepacked_{k:?}");
            w.step(false, k).unwrap();
            g.bench_function(name, |b| b.iter(|| w.step(true, k).unwrap()));
        }
    }
    g.finish();
}

/// Inference batch of 512 rows over 8 adapters (r16, 2048 -> 2048): one base GEMM + per-row
/// rank-R passes, against one full layer call per adapter.
fn mixed(c: &mut Criterion) {
    let mut g = c.benchmark_group("mixed_8_adapters_512x2048x2048_r16");
    g.sample_size(10);
    let mut w = MixedWorkload::new(512, 2048, 2048, 16, 8);
    g.throughput(Throughput::Elements(w.flops() as u64));
    g.bench_function("mixed_kernel", |b| b.iter(|| w.step(false).unwrap()));
    g.bench_function("looped_per_adapter", |b| b.iter(|| w.step(true).unwrap()));
    g.finish();
}

criterion_group!(benches, ceiling, linear, mixed);
criterion_main!(benches);
