//! Criterion benchmarks: a frozen 3x3 convolution's forward + input gradient (what a LoRA step
//! spends on a convolution it does not train) by im2col + GEMM and by Winograd F(4x4, 3x3), at
//! Stable Diffusion 1.5's UNet shapes (512x512 images: 64x64 latents and the 32, 16 and 8 pixel
//! levels) and at the small shapes where [`worth_it`](lora_kernels::ops::winograd::worth_it)
//! switches. Throughput is direct convolution's FLOPs (criterion's "elem/s": read Gelem/s as
//! effective GFLOP/s).
//!
//! Run: `cargo bench -p lora-benches --bench conv` (about 3 minutes on 2 cores).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_kernels::ops::conv::ConvAlgo;
use lora_kernels::workload::ConvWorkload;
use std::time::Duration;

/// (name, images, in channels, out channels, side).
const SCENARIOS: [(&str, usize, usize, usize, usize); 8] = [
    ("sd15_64px_320ch", 1, 320, 320, 64),
    ("sd15_32px_640ch", 1, 640, 640, 32),
    ("sd15_16px_1280ch", 1, 1280, 1280, 16),
    ("sd15_8px_1280ch_batch2", 2, 1280, 1280, 8),
    ("small_32px_64ch", 1, 64, 64, 32),
    ("small_16px_64ch_batch4", 4, 64, 64, 16),
    ("small_32px_32ch", 1, 32, 32, 32),
    ("small_16px_128ch", 1, 128, 128, 16),
];

fn conv(c: &mut Criterion) {
    for (name, n, ci, co, side) in SCENARIOS {
        let mut g = c.benchmark_group(name);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let mut w = ConvWorkload::new(n, ci, co, side);
        g.throughput(Throughput::Elements(w.flops() as u64));
        for (algo, label) in [
            (ConvAlgo::Im2col, "im2col"),
            (ConvAlgo::Winograd, "winograd"),
        ] {
            g.bench_function(label, |b| b.iter(|| w.step(algo).unwrap()));
        }
        g.finish();
    }
}

criterion_group!(benches, conv);
criterion_main!(benches);
