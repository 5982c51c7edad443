//! `lora bench linear --device cuda[:N]`: the fused CUDA LoRA layer (cuBLAS base GEMMs plus the
//! rank-r kernels of `lora.cu`) against cuBLAS doing the frozen base layer alone, forward and
//! input gradient, interleaved iteration by iteration; medians of the times and of the ratios.

use crate::bench::median;
use anyhow::{anyhow, Result};
use lora_core::Device;
use lora_kernels::accel::{DWeight, LinearGradBufs, LoraBufs};
use lora_kernels::lora_linear::{LinearDims, WeightLayout};
use lora_kernels::rng::Rng;
use std::time::Instant;

/// Llama-7B-like shapes (tokens, in, out, rank) the CUDA benchmark adds to the suite.
pub const LLAMA_SHAPES: [(usize, usize, usize, usize); 2] =
    [(4096, 4096, 4096, 16), (4096, 4096, 11008, 16)];

/// Runs the shapes on `device` through its backend (the one training uses); one line (or JSON
/// object) per shape.
pub fn run_linear(
    shapes: &[(usize, usize, usize, usize)],
    device: Device,
    iters: Option<usize>,
    json: bool,
) -> Result<()> {
    let dev = lora_core::device::accel(device).map_err(|e| anyhow!("--device {device}: {e}"))?;
    let name = dev.describe();
    let cerr = |e: lora_kernels::KernelError| anyhow!("{e}");
    if !json {
        let gemms = if device == Device::Cpu {
            ""
        } else {
            ", base GEMMs by cuBLAS"
        };
        outln!("{name}; fp32{gemms}");
        outln!(
            "{:>24} {:>11} {:>9} {:>13} {:>9} {:>9}",
            "shape N x K x M, rank",
            "lora ms",
            "TFLOP/s",
            "base-only ms",
            "TFLOP/s",
            "ratio"
        );
    }
    let mut rng = Rng::new(5);
    for &(n, k, m, r) in shapes {
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.uniform_range(-0.5, 0.5) as f32)
                .collect()
        };
        let up = |v: Vec<f32>| dev.upload(&v).map_err(cerr);
        let (x, w, a, b, dy) = (
            up(rand(n * k))?,
            up(rand(m * k))?,
            up(rand(r * k))?,
            up(rand(m * r))?,
            up(rand(n * m))?,
        );
        let d = LinearDims {
            tokens: n,
            inp: k,
            out: m,
        };
        let lora = LoraBufs {
            a: &a,
            b: &b,
            rank: r,
            scale: 2.0,
            dropout: None,
        };
        let layout = WeightLayout::OutIn;
        // Gradients accumulate into buffers that live across steps, as in training (a layer's
        // dx adds into its input's gradient; dA and dB into the adapter's).
        let grads = std::cell::RefCell::new((
            up(vec![0.0; n * k])?,
            up(vec![0.0; r * k])?,
            up(vec![0.0; m * r])?,
        ));
        let lora_step = || -> Result<()> {
            let (_y, u) = dev
                .linear_forward(&x, DWeight::F32(&w), layout, None, Some(lora), d)
                .map_err(cerr)?;
            let (dx, da, db) = &mut *grads.borrow_mut();
            let g = LinearGradBufs {
                dx: Some(dx),
                da: Some(da),
                db: Some(db),
                ..Default::default()
            };
            dev.linear_backward(
                g,
                &dy,
                &x,
                DWeight::F32(&w),
                layout,
                Some(lora),
                u.as_ref(),
                d,
            )
            .map_err(cerr)?;
            dev.synchronize().map_err(cerr)
        };
        let base_step = || -> Result<()> {
            let _y = dev
                .linear_forward(&x, DWeight::F32(&w), layout, None, None, d)
                .map_err(cerr)?;
            let g = LinearGradBufs {
                dx: Some(&mut grads.borrow_mut().0),
                ..Default::default()
            };
            dev.linear_backward(g, &dy, &x, DWeight::F32(&w), layout, None, None, d)
                .map_err(cerr)?;
            dev.synchronize().map_err(cerr)
        };
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        };
        // Warm-up (first cuBLAS call picks its algorithm), then size the run to ~1 s per layer.
        for _ in 0..3 {
            time(&lora_step)?;
        }
        let once = time(&base_step)?.max(1e-6);
        let iters = iters.unwrap_or(((1.0 / once) as usize).clamp(20, 500));
        let (mut tl, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..iters {
            let a = time(&lora_step)?;
            let b = time(&base_step)?;
            tl.push(a);
            tb.push(b);
            ratio.push(a / b);
        }
        let (ml, mb, mr) = (median(&mut tl), median(&mut tb), median(&mut ratio));
        // As the CPU bench (workload.rs): base forward + dx, plus the rank-r products
        // (u, expand; g, dB, dA, g A).
        let (nf, kf, mf, rf) = (n as f64, k as f64, m as f64, r as f64);
        let base_flops = 4.0 * nf * kf * mf;
        let lora_flops = base_flops + 2.0 * nf * rf * (3.0 * kf + 3.0 * mf);
        if json {
            outln!(
                "{}",
                serde_json::json!({
                    "device": device.to_string(), "name": name,
                    "tokens": n, "in": k, "out": m, "rank": r, "iters": iters,
                    "median_ms": ml * 1e3, "tflops": lora_flops / ml / 1e12,
                    "base_only_median_ms": mb * 1e3, "base_only_tflops": base_flops / mb / 1e12,
                    "ratio": mr,
                })
            );
        } else {
            outln!(
                "{:>24} {:>11.3} {:>9.1} {:>13.3} {:>9.1} {:>8.3}x",
                format!("{n} x {k} x {m}, r{r}"),
                ml * 1e3,
                lora_flops / ml / 1e12,
                mb * 1e3,
                base_flops / mb / 1e12,
                mr
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lora_core::Device;

    /// The benchmark drives a backend's linear forward and backward (the code it times on a
    /// GPU), so it runs on the CPU backend here: odd shapes, rank 1, one token.
    #[test]
    fn runs_through_the_backend() {
        super::run_linear(&[(3, 5, 7, 2), (1, 4, 3, 1)], Device::Cpu, Some(2), true).unwrap();
        super::run_linear(&[(2, 3, 4, 1)], Device::Cpu, Some(1), false).unwrap();
        let e = super::run_linear(&[(2, 3, 4, 1)], Device::Cuda(977), Some(1), true).unwrap_err();
        assert!(e.to_string().contains("--device cuda:977"), "{e}");
    }
}
