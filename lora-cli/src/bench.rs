//! `lora bench`: medians of interleaved runs, so a noisy shared machine hits both layers alike.
//!
//! For `linear`, each iteration runs the LoRA layer then the base-only layer; the overhead is the
//! median of the per-iteration time ratios. The ceiling is a square GEMM timed between those
//! iterations, so all three see the same machine conditions.

use anyhow::{bail, Context, Result};
use lora_kernels::workload::{GemmWorkload, LinearWorkload, MixedWorkload};
use serde::Serialize;
use std::time::Instant;

/// The reference shapes (tokens, in, out, rank) of the foundation issue.
pub const SUITE: [(usize, usize, usize, usize); 4] = [
    (2048, 768, 768, 8),
    (2048, 768, 3072, 16),
    (4096, 2048, 2048, 16),
    (512, 4096, 4096, 64),
];

/// Size of the square GEMM that stands for the machine's ceiling.
const CEILING_SIZE: usize = 2048;

/// The square GEMM a layer's speed is compared with, in the layer's precision.
enum Ceiling {
    F32(GemmWorkload),
    Bf16(lora_kernels::workload::GemmBf16Workload),
}

impl Ceiling {
    fn new(bf16: bool) -> Result<Self> {
        Ok(if bf16 {
            Ceiling::Bf16(lora_kernels::workload::GemmBf16Workload::new(CEILING_SIZE)?)
        } else {
            Ceiling::F32(GemmWorkload::new(CEILING_SIZE))
        })
    }
    fn flops(&self) -> f64 {
        match self {
            Ceiling::F32(g) => g.flops(),
            Ceiling::Bf16(g) => g.flops(),
        }
    }
    fn step(&mut self) -> lora_kernels::Result<()> {
        match self {
            Ceiling::F32(g) => g.step(),
            Ceiling::Bf16(g) => g.step(false, lora_kernels::gemm_bf16::chosen()),
        }
    }
}

/// What `lora bench linear` runs.
pub struct LinearBench {
    pub shapes: Vec<(usize, usize, usize, usize)>,
    pub bias: bool,
    pub threads: Option<usize>,
    pub iters: Option<usize>,
    pub json: bool,
    /// The products' precision (the ceiling is the GEMM of the same precision).
    pub precision: lora_core::models::Precision,
}

#[derive(Serialize)]
struct LinearResult {
    precision: &'static str,
    tokens: usize,
    #[serde(rename = "in")]
    inp: usize,
    out: usize,
    rank: usize,
    bias: bool,
    threads: usize,
    iters: usize,
    median_ms: f64,
    gflops: f64,
    base_only_median_ms: f64,
    base_only_gflops: f64,
    overhead_pct: f64,
    gemm_ceiling_gflops: f64,
    fraction_of_ceiling: f64,
    /// bf16: the LoRA layer with its weight packed on every call (both layouts), and what
    /// packing once at load saves of that time.
    #[serde(skip_serializing_if = "Option::is_none")]
    repacked_median_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prepacking_saves_pct: Option<f64>,
}

/// Median of `v` (sorted in place).
/// One warm-up `step(0)`, then `steps` timed `step(1..=steps)`: the median seconds and each
/// step's, in run order.
pub fn time_steps(
    steps: usize,
    mut step: impl FnMut(u64) -> Result<()>,
) -> Result<(f64, Vec<f64>)> {
    step(0)?;
    let mut times = Vec::with_capacity(steps);
    for s in 1..=steps as u64 {
        let t = std::time::Instant::now();
        step(s)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(&mut times.clone()), times))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Refuses a benchmark whose buffers would not fit in memory: `floats` is the number of f32
/// values it allocates (`None` when counting them overflowed), `what` the flags that set it.
/// The bound is the memory this machine has available (`MemAvailable`; 64 GiB where it cannot
/// be read).
pub fn ensure_fits(floats: Option<u128>, what: &str) -> Result<()> {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
        })
        .map_or(64u128 << 30, |kb| kb * 1024);
    match floats.and_then(|f| f.checked_mul(4)) {
        Some(bytes) if bytes <= avail => Ok(()),
        Some(bytes) => bail!(
            "{what}: these sizes need {:.1} GiB of buffers, more than the {:.1} GiB available",
            bytes as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        ),
        None => bail!("{what}: these sizes are too large to count in memory"),
    }
}

/// `a * b + c * d + ...` in u128, `None` on overflow.
pub fn sum_of_products(terms: &[&[usize]]) -> Option<u128> {
    terms.iter().try_fold(0u128, |acc, t| {
        let p = t.iter().try_fold(1u128, |p, &x| p.checked_mul(x as u128))?;
        acc.checked_add(p)
    })
}

/// A worker pool of `threads` (default: all cores), the one every command runs its work in.
pub fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        // More workers than CPUs only adds switching (5000 turned a 0.1 s run into a minute).
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if t == 0 || t > cpus {
            bail!("--threads must be from 1 to {cpus} (the CPUs this process may use), got {t}");
        }
        b = b.num_threads(t);
    }
    b.build().context("could not start the worker threads")
}

fn time<F: FnMut() -> lora_kernels::Result<()>>(mut f: F) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn gemm_ceiling(size: usize, iters: usize) -> Result<f64> {
    let mut g = GemmWorkload::new(size);
    g.step()?; // warm-up
    let mut ts = (0..iters)
        .map(|_| time(|| g.step()))
        .collect::<Result<Vec<_>>>()?;
    Ok(g.flops() / median(&mut ts) / 1e9)
}

pub fn run_gemm(size: usize, threads: Option<usize>, iters: usize, json: bool) -> Result<()> {
    if size == 0 || iters == 0 {
        bail!("--size and --iters must be at least 1");
    }
    ensure_fits(sum_of_products(&[&[3, size, size]]), "--size")?;
    let pool = pool(threads)?;
    let n = pool.current_num_threads();
    let gf = pool.install(|| gemm_ceiling(size, iters))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"size": size, "threads": n, "iters": iters, "gflops": gf})
        );
    } else {
        outln!("f32 GEMM {size}x{size}x{size}, {n} threads: {gf:.1} GFLOP/s (median of {iters})");
    }
    Ok(())
}

/// `lora bench peak`: the f32 FMA and bf16 dot-product peaks of this CPU.
pub fn run_peak(a: &crate::args::PeakArgs) -> Result<()> {
    if !(a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!(
            "--seconds must be above 0 and at most 600, got {}",
            a.seconds
        );
    }
    let pool = pool(a.threads)?;
    let (f32p, bf16p) = pool.install(|| {
        (
            lora_kernels::peak::f32_fma(a.seconds),
            lora_kernels::peak::bf16_dot(a.seconds),
        )
    });
    let threads = pool.current_num_threads();
    if a.json {
        let one = |p: &Option<lora_kernels::peak::Peak>| {
            p.as_ref()
                .map(|p| serde_json::json!({"instruction": p.what, "gflops": p.gflops}))
        };
        outln!(
            "{}",
            serde_json::json!({"threads": threads, "f32": one(&f32p), "bf16": one(&bf16p),
                "bf16_kernel": lora_kernels::gemm_bf16::kernel_name()})
        );
        return Ok(());
    }
    outln!(
        "{threads} threads, register-only loops, best of {} s each:",
        a.seconds
    );
    match &f32p {
        Some(p) => outln!("  f32  peak: {:>8.1} GFLOP/s  ({})", p.gflops, p.what),
        None => outln!("  f32  peak: not measured (no AVX2+FMA on this CPU)"),
    }
    match &bf16p {
        Some(p) => outln!("  bf16 peak: {:>8.1} GFLOP/s  ({})", p.gflops, p.what),
        None => outln!("  bf16 peak: none (this CPU has no AVX512-BF16)"),
    }
    // On some CPUs VDPBF16PS runs at half the FMA's FLOP rate, and the bf16 products are faster
    // widened to f32 (`lora_kernels::gemm_bf16::chosen`).
    outln!(
        "  bf16 products run on: {}",
        lora_kernels::gemm_bf16::kernel_name()
    );
    Ok(())
}

pub fn run_linear(cfg: &LinearBench) -> Result<()> {
    if cfg.iters == Some(0) {
        bail!("--iters must be at least 1");
    }
    for &(t, k, m, r) in &cfg.shapes {
        if t == 0 || k == 0 || m == 0 || r == 0 {
            bail!(
                "--tokens, --in, --out and --rank must all be at least 1 (got {t}, {k}, {m}, {r})"
            );
        }
        if r > k.min(m) {
            bail!("--rank {r} exceeds the layer's smaller dimension ({k} -> {m})");
        }
        // x, dx (T, K); W (M, K); y, dy (T, M) for the LoRA and the base layer; A, B, u, g; and
        // the ceiling GEMM.
        let floats = sum_of_products(&[
            &[4, t, k],
            &[m, k],
            &[4, t, m],
            &[2, r, k + m],
            &[4, t, r],
            &[3, CEILING_SIZE, CEILING_SIZE],
        ]);
        ensure_fits(floats, "--tokens, --in, --out, --rank")?;
    }
    let pool = pool(cfg.threads)?;
    let threads = pool.current_num_threads();
    pool.install(|| -> Result<()> {
        // The ceiling is measured interleaved with each shape's iterations (one square GEMM per
        // iteration), so a noisy neighbour slows it exactly as much as the layers.
        let bf16 = cfg.precision == lora_core::models::Precision::Bf16;
        let mut gemm = Ceiling::new(bf16)?;
        gemm.step()?;
        if !cfg.json {
            let what = if bf16 {
                format!(
                    "bf16 products ({}); ceiling = bf16 GEMM {CEILING_SIZE}^3 (f32 accumulation, \
                     the left operand rounded and packed per call, as a layer's input is)",
                    lora_kernels::gemm_bf16::kernel_name()
                )
            } else {
                format!("ceiling = f32 GEMM {CEILING_SIZE}^3")
            };
            outln!("{threads} threads; {what}, timed between the layer runs");
            outln!(
                "{:>24} {:>11} {:>9} {:>13} {:>9} {:>9} {:>9} {:>10}",
                "shape N x K x M, rank",
                "lora ms",
                "GFLOP/s",
                "base-only ms",
                "GFLOP/s",
                "overhead",
                "ceiling",
                "% ceiling"
            );
        }
        for &(t, k, m, r) in &cfg.shapes {
            let (mut lora, mut base) = (
                LinearWorkload::new(t, k, m, r, cfg.bias, 1),
                LinearWorkload::new(t, k, m, 0, cfg.bias, 1),
            );
            let mut repacked = None;
            if bf16 {
                (lora, base) = (lora.bf16()?, base.bf16()?);
                repacked = Some(LinearWorkload::new(t, k, m, r, cfg.bias, 1).bf16_repacked()?);
            }
            // The bf16 backward packs its weight on first use: the warm-up covers both.
            base.step()?;
            // Warm-up, and a first timing to size the run.
            lora.step()?;
            let once = time(|| base.step())?.max(1e-6);
            let iters = cfg.iters.unwrap_or(((2.0 / once) as usize).clamp(9, 200));
            let (mut tl, mut tb, mut ratio, mut tg, mut tp) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..iters {
                let a = time(|| lora.step())?;
                let b = time(|| base.step())?;
                if let Some(w) = repacked.as_mut() {
                    tp.push(time(|| w.step())?);
                }
                tl.push(a);
                tb.push(b);
                ratio.push(a / b);
                // At most ~15 ceiling samples per shape: enough for a median.
                if i % iters.div_ceil(15) == 0 {
                    tg.push(time(|| gemm.step())?);
                }
            }
            let (ml, mb, mr) = (median(&mut tl), median(&mut tb), median(&mut ratio));
            let ceiling = gemm.flops() / median(&mut tg) / 1e9;
            let repacked_ms = (!tp.is_empty()).then(|| median(&mut tp) * 1e3);
            let res = LinearResult {
                precision: cfg.precision.name(),
                tokens: t,
                inp: k,
                out: m,
                rank: r,
                bias: cfg.bias,
                threads,
                iters,
                median_ms: ml * 1e3,
                gflops: lora.flops() / ml / 1e9,
                base_only_median_ms: mb * 1e3,
                base_only_gflops: base.flops() / mb / 1e9,
                overhead_pct: (mr - 1.0) * 100.0,
                gemm_ceiling_gflops: ceiling,
                fraction_of_ceiling: lora.flops() / ml / 1e9 / ceiling,
                repacked_median_ms: repacked_ms,
                prepacking_saves_pct: repacked_ms.map(|p| (1.0 - ml * 1e3 / p) * 100.0),
            };
            if cfg.json {
                outln!("{}", serde_json::to_string(&res)?);
            } else {
                outln!(
                    "{:>24} {:>11.2} {:>9.1} {:>13.2} {:>9.1} {:>8.1}% {:>9.1} {:>9.0}%",
                    format!("{t} x {k} x {m}, r{r}"),
                    res.median_ms,
                    res.gflops,
                    res.base_only_median_ms,
                    res.base_only_gflops,
                    res.overhead_pct,
                    res.gemm_ceiling_gflops,
                    res.fraction_of_ceiling * 100.0
                );
                if let (Some(p), Some(s)) = (res.repacked_median_ms, res.prepacking_saves_pct) {
                    outln!("{:>24} packing the weight on every call instead: {p:.2} ms (prepacking saves {s:.1}%)", "");
                }
            }
        }
        Ok(())
    })
}

pub fn run_mixed(
    (t, k, m, r, n_ad): (usize, usize, usize, usize, usize),
    threads: Option<usize>,
    iters: usize,
    json: bool,
) -> Result<()> {
    if [t, k, m, r, n_ad, iters].contains(&0) {
        bail!("--tokens, --in, --out, --rank, --adapters and --iters must all be at least 1");
    }
    if r > k.min(m) {
        bail!("--rank {r} exceeds the layer's smaller dimension ({k} -> {m})");
    }
    // x (T, K), W (M, K), outputs (T, M) twice, and every adapter's A and B.
    let floats = sum_of_products(&[&[t, k], &[m, k], &[3, t, m], &[n_ad, r, k + m], &[t, r]]);
    ensure_fits(floats, "--tokens, --in, --out, --rank, --adapters")?;
    let pool = pool(threads)?;
    let n = pool.current_num_threads();
    pool.install(|| -> Result<()> {
        let mut w = MixedWorkload::new(t, k, m, r, n_ad);
        w.step(false)?;
        w.step(true)?;
        let (mut tm, mut tl) = (Vec::new(), Vec::new());
        for _ in 0..iters {
            tm.push(time(|| w.step(false))?);
            tl.push(time(|| w.step(true))?);
        }
        let (mm, ml) = (median(&mut tm), median(&mut tl));
        if json {
            outln!("{}", serde_json::json!({"tokens": t, "in": k, "out": m, "rank": r, "adapters": n_ad, "threads": n, "mixed_median_ms": mm * 1e3, "looped_median_ms": ml * 1e3, "speedup": ml / mm}));
        } else {
            outln!("{t} rows x {k} -> {m}, {n_ad} adapters of rank {r}, {n} threads:");
            outln!("  mixed kernel        {:>9.2} ms  ({:.1} GFLOP/s)", mm * 1e3, w.flops() / mm / 1e9);
            let (ratio, how) = if ml >= mm {
                (ml / mm, "slower")
            } else {
                (mm / ml, "faster")
            };
            outln!("  loop over adapters  {:>9.2} ms  ({ratio:.2}x {how})", ml * 1e3);
        }
        Ok(())
    })
}

/// `lora bench ...`.
pub fn command(cmd: crate::args::BenchCommand) -> Result<()> {
    match cmd {
        crate::args::BenchCommand::Linear(a) => {
            let device = a
                .device
                .parse::<lora_core::Device>()
                .with_context(|| "--device must be cpu, cuda or cuda:N")?;
            let mut shapes = if a.suite {
                SUITE.to_vec()
            } else {
                vec![(a.tokens, a.inp, a.out, a.rank)]
            };
            if let lora_core::Device::Cuda(_) = device {
                if a.suite {
                    shapes.extend(crate::bench_cuda::LLAMA_SHAPES);
                }
                anyhow::ensure!(
                    a.threads.is_none() && !a.bias,
                    "--threads and --bias apply to the CPU benchmark only"
                );
                anyhow::ensure!(
                    shapes
                        .iter()
                        .all(|&(t, k, m, r)| t > 0 && k > 0 && m > 0 && (1..=64).contains(&r)),
                    "--tokens, --in, --out must be at least 1 and --rank 1..=64 on CUDA"
                );
                anyhow::ensure!(
                    a.precision == lora_core::models::Precision::F32,
                    "--precision {} runs on the CPU only (the CUDA benchmark is f32)",
                    a.precision
                );
                return crate::bench_cuda::run_linear(&shapes, device, a.iters, a.json);
            }
            let cfg = LinearBench {
                shapes,
                bias: a.bias,
                threads: a.threads,
                iters: a.iters,
                json: a.json,
                precision: a.precision,
            };
            run_linear(&cfg)
        }
        crate::args::BenchCommand::Gemm(a) => run_gemm(a.size, a.threads, a.iters, a.json),
        crate::args::BenchCommand::Peak(a) => run_peak(&a),
        crate::args::BenchCommand::Train(a) => {
            let device = match a.device.as_str() {
                "auto" => anyhow::bail!("--device: name cpu or the GPU (cuda, cuda:N) to time"),
                d => crate::device::resolve_device(d)?.0,
            };
            if a.tf32 {
                device.set_tf32(true).context("--tf32")?;
            }
            anyhow::ensure!(
                a.steps > 0 && a.batch > 0 && a.seq > 1 && a.rank > 0,
                "--steps, --batch, --rank must be at least 1 and --seq at least 2"
            );
            anyhow::ensure!(
                a.lr.is_finite() && a.lr > 0.0,
                "--lr must be positive, got {}",
                a.lr
            );
            anyhow::ensure!(
                a.layers > 0 && a.hidden > 0 && a.heads > 0 && a.kv_heads > 0 && a.vocab > 0,
                "--layers, --hidden, --heads, --kv-heads and --vocab must be at least 1"
            );
            anyhow::ensure!(a.hidden % a.heads == 0, "--heads must divide --hidden");
            anyhow::ensure!(
                a.arch != "llama" || a.heads % a.kv_heads == 0,
                "--kv-heads must divide --heads"
            );
            anyhow::ensure!(
                a.rank <= a.hidden,
                "--rank {} exceeds --hidden {}",
                a.rank,
                a.hidden
            );
            // Weights (12 hidden^2 per layer, the embedding) and activations (about 40 hidden
            // values per token per layer, and one row of logits per token), all f32.
            let tokens = [a.batch, a.seq];
            ensure_fits(
                sum_of_products(&[
                    &[12, a.layers, a.hidden, a.hidden],
                    &[2, a.vocab, a.hidden],
                    &[40, a.layers, a.hidden, tokens[0], tokens[1]],
                    &[2, a.vocab, tokens[0], tokens[1]],
                ]),
                "--layers, --hidden, --vocab, --batch, --seq",
            )?;
            pool(a.threads)?.install(|| {
                crate::train_bench::run(&crate::train_bench::TrainBench {
                    arch: a.arch,
                    layers: a.layers,
                    hidden: a.hidden,
                    heads: a.heads,
                    kv_heads: a.kv_heads,
                    vocab: a.vocab,
                    batch: a.batch,
                    seq: a.seq,
                    rank: a.rank,
                    steps: a.steps,
                    lr: a.lr,
                    losses: a.losses,
                    all_linear: a.all_linear,
                    checkpoint: a.gradient_checkpointing,
                    bf16: a.bf16,
                    precision: a.precision,
                    json: a.json,
                    device,
                })
            })
        }
        crate::args::BenchCommand::Vision(a) => {
            anyhow::ensure!(
                a.steps > 0 && a.batch > 0 && a.rank > 0 && a.layers > 0,
                "--steps, --batch, --rank and --layers must be at least 1"
            );
            let size = a.size.unwrap_or(if a.arch == "conv" { 56 } else { 224 });
            anyhow::ensure!(
                (16..=1024).contains(&size),
                "--size must be from 16 to 1024"
            );
            ensure_fits(
                sum_of_products(&[
                    &[64, a.layers, 768, 768],
                    &[80, a.layers, a.batch, size, size],
                ]),
                "--layers, --batch, --size",
            )?;
            pool(a.threads)?.install(|| crate::vision_bench::run(&a, size))
        }
        crate::args::BenchCommand::Sd(a) => {
            anyhow::ensure!(
                a.steps > 0 && a.batch > 0 && a.rank > 0,
                "--steps, --batch and --rank must be at least 1"
            );
            anyhow::ensure!(
                (64..=2048).contains(&a.size),
                "--size must be from 64 to 2048"
            );
            ensure_fits(
                sum_of_products(&[
                    // The UNet (860M floats at width 320), and its activations.
                    &[8400, a.base_channels, a.base_channels],
                    &[1000, a.batch, a.base_channels, a.size / 8, a.size / 8],
                ]),
                "--base-channels, --batch, --size",
            )?;
            pool(a.threads)?.install(|| crate::sd_bench::run(&a))
        }
        crate::args::BenchCommand::Mixed(a) => run_mixed(
            (a.tokens, a.inp, a.out, a.rank, a.adapters),
            a.threads,
            a.iters,
            a.json,
        ),
    }
}
