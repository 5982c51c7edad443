//! The machine's arithmetic peak, measured rather than taken from a data sheet: every worker
//! thread runs a register-only loop of independent multiply-adds (no loads, so no memory
//! stall), f32 FMAs on the widest vectors the CPU has (AVX-512 or AVX2) and, where the CPU has
//! AVX512-BF16, the bf16 dot-product instruction `VDPBF16PS` (two bf16 products summed into
//! each f32 lane). A matrix product or a training step can reach at most this rate: its
//! GFLOP/s divided by the peak is its efficiency, and a target that needs more than the peak
//! at a given precision cannot be met at that precision.
//!
//! FLOPs count a multiply-add as two, as GEMM figures do. Frequencies differ between vector
//! widths and with load, so the figure is the rate under this loop, on this machine, now.

use std::time::Instant;

/// One measured peak.
#[derive(Clone, Debug, PartialEq)]
pub struct Peak {
    /// The instruction timed, e.g. `"AVX-512 FMA (f32)"`.
    pub what: &'static str,
    /// GFLOP/s over all threads.
    pub gflops: f64,
    /// Threads that ran it at once.
    pub threads: usize,
}

/// Independent accumulator chains per thread: enough to cover the FMA latency (4 cycles) at
/// two instructions per cycle twice over (AVX-512 has 32 vector registers)...
const CHAINS: usize = 16;
/// ... and one and a half times over with AVX2's 16 (the two constants need registers too).
const CHAINS_AVX2: usize = 12;

/// The f32 FMA peak over the current rayon pool's threads, timed for about `seconds`; `None`
/// on a CPU without AVX2+FMA (or not x86-64).
pub fn f32_fma(seconds: f64) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was just detected.
            return Some(measure(
                "AVX-512 FMA (f32)",
                CHAINS * 16 * 2,
                seconds,
                |n| unsafe { x86::fma512(n) },
            ));
        }
        if crate::simd::has_avx2_fma() {
            // SAFETY: avx2 and fma were just detected.
            return Some(measure(
                "AVX2 FMA (f32)",
                CHAINS_AVX2 * 8 * 2,
                seconds,
                |n| unsafe { x86::fma256(n) },
            ));
        }
    }
    let _ = seconds;
    None
}

/// The bf16 dot-product peak (`VDPBF16PS`: 16 lanes, each adding two bf16 products to an f32)
/// over the current rayon pool's threads; `None` on a CPU without AVX512-BF16.
pub fn bf16_dot(seconds: f64) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            // SAFETY: avx512f and avx512bf16 were just detected.
            return Some(measure(
                "AVX512-BF16 VDPBF16PS",
                CHAINS * 16 * 4,
                seconds,
                |n| unsafe { x86::dpbf16(n) },
            ));
        }
    }
    let _ = seconds;
    None
}

/// `VDPBF16PS` instructions per f32 FMA instruction that one thread runs per second (both on
/// 512-bit registers, register-only loops, best of three alternating rounds of tens of
/// microseconds each): about 1 on AMD Zen 4 and Zen 5 (inferred from their peaks: bf16 FLOP/s
/// twice f32's; not timed by this function there), 0.23-0.26 on the Intel Xeon measured
/// (family 6, model 207: half the FLOP rate). `None` without AVX512-BF16. It picks the bf16
/// product kernel ([`crate::gemm_bf16::chosen`]).
pub fn dpbf16_per_fma() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            const ITERS: u64 = 1 << 12;
            let time = |f: &dyn Fn() -> f32| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            };
            // SAFETY (both closures): the features were just detected.
            let fma = || unsafe { x86::fma512(ITERS) };
            let dp = || unsafe { x86::dpbf16(ITERS) };
            // A first round of each warms the vector units up.
            let (_, _) = (time(&fma), time(&dp));
            let (mut best_fma, mut best_dp) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                best_fma = best_fma.min(time(&fma));
                best_dp = best_dp.min(time(&dp));
            }
            return Some(best_fma / best_dp);
        }
    }
    None
}

/// Runs `kernel(iters)` (which does `flops_per_iter` FLOPs per iteration and returns a value
/// that depends on all of them) on every pool thread at once, doubling `iters`
/// until one round takes a tenth of `seconds`, then timing rounds for `seconds`; the best
/// round's rate (the machine's peak is its fastest sustained rate, not its mean under noise).
fn measure(
    what: &'static str,
    flops_per_iter: usize,
    seconds: f64,
    kernel: impl Fn(u64) -> f32 + Sync,
) -> Peak {
    let threads = rayon::current_num_threads();
    let round = |iters: u64| -> f64 {
        let t = Instant::now();
        let sums = rayon::broadcast(|_| kernel(iters));
        let dt = t.elapsed().as_secs_f64();
        assert!(sums.iter().all(|s| s.is_finite()), "peak loop diverged");
        dt
    };
    let mut iters = 1u64 << 12;
    while round(iters) < seconds / 10.0 && iters < 1 << 40 {
        iters *= 2;
    }
    let flops = (iters * flops_per_iter as u64 * threads as u64) as f64;
    let start = Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed().as_secs_f64() < seconds || best.is_infinite() {
        best = best.min(round(iters));
    }
    Peak {
        what,
        gflops: flops / best / 1e9,
        threads,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, CHAINS_AVX2};
    use std::arch::x86_64::*;

    /// `acc = acc * m + a` on CHAINS independent registers (the values converge to
    /// a / (1 - m), so nothing overflows); returns their sum.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) -> f32 {
        let m = _mm512_set1_ps(0.999_9);
        let a = _mm512_set1_ps(1e-4);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, a);
            }
        }
        acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    /// [`fma512`] on 8-lane registers, CHAINS_AVX2 of them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) -> f32 {
        let m = _mm256_set1_ps(0.999_9);
        let a = _mm256_set1_ps(1e-4);
        let mut acc = [_mm256_setzero_ps(); CHAINS_AVX2];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, a);
            }
        }
        let mut out = [0.0f32; 8];
        let mut sum = 0.0;
        for v in acc {
            _mm256_storeu_ps(out.as_mut_ptr(), v);
            sum += out.iter().sum::<f32>();
        }
        sum
    }

    /// `acc += a . b` (pairs of bf16 products) on CHAINS registers; the operands are small so
    /// the sums stay finite for any iteration count the caller reaches.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dpbf16(iters: u64) -> f32 {
        let x = _mm512_set1_ps(1e-6);
        let b = _mm512_cvtne2ps_pbh(x, x);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, b, b);
            }
        }
        acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }
}

#[cfg(test)]
mod tests {
    /// The loops run, report a positive finite rate on the pool's threads, and the bf16 figure
    /// exists exactly when the CPU has the instruction.
    #[test]
    fn peaks_are_measured_where_the_cpu_has_the_instructions() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let p = super::f32_fma(0.02).expect("x86-64 CI machines have AVX2+FMA");
                assert!(p.gflops.is_finite() && p.gflops > 0.1, "{p:?}");
                assert_eq!(p.threads, 2);
                let bf16 = std::arch::is_x86_feature_detected!("avx512bf16")
                    && std::arch::is_x86_feature_detected!("avx512f");
                assert_eq!(super::bf16_dot(0.02).is_some(), bf16);
            }
        });
    }
}
