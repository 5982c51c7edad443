//! The bf16 product (`gemm_bf16`) against the f64 reference on the bf16-rounded operands, on
//! every micro-kernel the CPU runs (VDPBF16PS and the AVX-512 widening one where the CPU has
//! them, the AVX2 and portable widening ones everywhere).

mod common;

use common::rand_vec;
use lora_kernels::gemm::Par;
use lora_kernels::gemm_bf16::{
    matmul_packed, matmul_packed_with, pack_lhs, pack_lhs_for, pack_rhs, reference, round_bf16,
    round_slice_bf16, widen_bf16, Bf16Kernel, Source, View, KC_PAIRS, MC, NC,
};
use proptest::prelude::*;

/// Every element within `(K + 2) 2^-23` of `sum |a b|` (about twice the worst-case f32
/// accumulation error) of the f64 product of the rounded operands.
fn check(what: &str, got: &[f32], want: &[f64], mag: &[f64], start: &[f32], k: usize) {
    let tol = (k as f64 + 2.0) * (2f64).powi(-23);
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let w = w + start[i] as f64;
        let bound = tol * (m + (start[i] as f64).abs()) + 1e-30;
        assert!(
            (*g as f64 - w).abs() <= bound,
            "{what}: element {i}: {g} vs {w} (bound {bound:.3e})"
        );
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    lt: bool,
    rt: bool,
    bf16_src: bool,
    acc: bool,
    seed: u64,
}

fn run(c: &Case, par: Par) {
    let a = rand_vec(c.m * c.k, c.seed, 1.0);
    let b = rand_vec(c.k * c.n, c.seed ^ 1, 1.0);
    let ab: Vec<u16> = a.iter().map(|&v| round_bf16(v * 3.0)).collect();
    let bb: Vec<u16> = b.iter().map(|&v| round_bf16(v * 3.0)).collect();
    let (sa, sb) = if c.bf16_src {
        (Source::Bf16(&ab), Source::Bf16(&bb))
    } else {
        (Source::F32(&a), Source::F32(&b))
    };
    // Stored (k, m) when transposed, so the view reads it back as (m, k).
    let lhs = if c.lt {
        View::row_major(sa, c.k, c.m).t()
    } else {
        View::row_major(sa, c.m, c.k)
    };
    let rhs = if c.rt {
        View::row_major(sb, c.n, c.k).t()
    } else {
        View::row_major(sb, c.k, c.n)
    };
    let (want, mag) = reference::matmul(&lhs, &rhs);
    let start = if c.acc {
        rand_vec(c.m * c.n, c.seed ^ 2, 1.0)
    } else {
        vec![0.0; c.m * c.n]
    };
    let pa = pack_lhs(lhs).unwrap();
    let pb = pack_rhs(rhs).unwrap();
    assert_eq!(pa.dims(), (c.m, c.k));
    assert_eq!(pb.dims(), (c.k, c.n));
    // A garbage start when not accumulating: it must be overwritten, not added to.
    let fresh = || {
        if c.acc {
            start.clone()
        } else {
            vec![f32::NAN; c.m * c.n]
        }
    };
    let mut got = fresh();
    matmul_packed(&mut got, &pa, &pb, c.acc, par).unwrap();
    check("chosen", &got, &want, &mag, &start, c.k);
    for kernel in Bf16Kernel::ALL.into_iter().filter(|k| k.available()) {
        let pa = pack_lhs_for(kernel, lhs).unwrap();
        assert_eq!(pa.is_wide(), kernel.wide_lhs());
        let mut got = fresh();
        matmul_packed_with(kernel, &mut got, &pa, &pb, c.acc, par).unwrap();
        check(kernel.name(), &got, &want, &mag, &start, c.k);
        // The default entry takes either form (the chosen kernel, or one for the other form).
        let mut got = fresh();
        matmul_packed(&mut got, &pa, &pb, c.acc, par).unwrap();
        check("default entry", &got, &want, &mag, &start, c.k);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Random shapes (odd K, one row, one column included), transposed views, f32 or bf16
    /// sources, accumulate or overwrite.
    #[test]
    fn bf16_product_matches_the_rounded_f64_reference(
        m in 1usize..40, n in 1usize..80, k in 1usize..1100,
        lt in any::<bool>(), rt in any::<bool>(), bf16_src in any::<bool>(),
        acc in any::<bool>(), seed in any::<u64>(),
    ) {
        run(&Case { m, n, k, lt, rt, bf16_src, acc, seed }, Par::Auto);
    }
}

/// Shapes past one parallel task in both directions and past one run of pairs, on two threads
/// and on one.
#[test]
fn bf16_product_crosses_task_and_reduction_blocks() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (m, n, k) in [
        (MC + 5, NC + 7, 4 * KC_PAIRS + 3),
        (1, 2 * NC + 1, 2 * KC_PAIRS + 1),
        (2 * MC + 1, 3, 5),
    ] {
        for par in [Par::Auto, Par::Single] {
            let c = Case {
                m,
                n,
                k,
                lt: false,
                rt: true,
                bf16_src: false,
                acc: true,
                seed: (m * n + k) as u64,
            };
            pool.install(|| run(&c, par));
        }
    }
}

/// The rounding is round-to-nearest-even, as `half` (and torch) round, on random bit patterns
/// and the edge values; bf16 widening is exact.
#[test]
fn rounding_to_bf16_is_nearest_even() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut bits = vec![
        0u32,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7f7f_ffff,
        0x0000_8000,
        0x0001_8000,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x7fc0_0001,
        0x7f80_0001,
    ];
    for _ in 0..200_000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        bits.push(s as u32);
    }
    // The slice rounding (parallel blocks, branch-free loop) gives round_bf16's bits, NaNs
    // included, at lengths across its block boundary and of one value.
    let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    for len in [0, 1, 7, (1 << 15) - 1, 1 << 15, (1 << 15) + 3, xs.len()] {
        let mut out = vec![0u16; len];
        round_slice_bf16(&xs[..len], &mut out).unwrap();
        for (i, (&o, &x)) in out.iter().zip(&xs).enumerate() {
            assert_eq!(
                o,
                round_bf16(x),
                "slice of {len}: value {i} ({:#x})",
                x.to_bits()
            );
        }
    }
    let mut short = vec![0u16; 3];
    let e = round_slice_bf16(&xs[..4], &mut short).unwrap_err();
    assert!(e.to_string().contains("3 slots for 4 values"), "{e}");
    for b in bits {
        let x = f32::from_bits(b);
        let got = round_bf16(x);
        let want = half::bf16::from_f32(x);
        if x.is_nan() {
            assert!(widen_bf16(got).is_nan(), "{b:#x}");
        } else {
            assert_eq!(got, want.to_bits(), "{b:#x}");
            assert_eq!(widen_bf16(got), want.to_f32());
        }
    }
}

/// Mismatched operands and views that reach outside their buffers are errors, not panics.
#[test]
fn bad_operands_are_errors() {
    let v = vec![1.0f32; 12];
    let lhs = pack_lhs(View::row_major(Source::F32(&v), 3, 4)).unwrap();
    let rhs = pack_rhs(View::row_major(Source::F32(&v), 3, 4)).unwrap();
    let mut out = vec![0.0; 12];
    let e = matmul_packed(&mut out, &lhs, &rhs, false, Par::Auto).unwrap_err();
    assert!(e.to_string().contains("rhs"), "{e}");
    let rhs = pack_rhs(View::row_major(Source::F32(&v), 4, 3)).unwrap();
    let mut short = vec![0.0; 8];
    let e = matmul_packed(&mut short, &lhs, &rhs, false, Par::Auto).unwrap_err();
    assert!(e.to_string().contains("dst"), "{e}");
    // A kernel given an lhs packed in the other form (or, on a CPU without AVX-512, one it
    // cannot run).
    let pairs = pack_lhs_for(Bf16Kernel::Portable, View::row_major(Source::F32(&v), 3, 4)).unwrap();
    let mut out = vec![0.0; 9];
    let e = matmul_packed_with(
        Bf16Kernel::Wide512,
        &mut out,
        &pairs,
        &rhs,
        false,
        Par::Auto,
    )
    .unwrap_err();
    assert!(e.to_string().contains("kernel"), "{e}");
    let e = pack_lhs(View::row_major(Source::F32(&v), 4, 4)).unwrap_err();
    assert!(e.to_string().contains("reaches past"), "{e}");
    let e = pack_rhs(View {
        src: Source::F32(&v),
        rows: 2,
        cols: usize::MAX / 2,
        rs: 3,
        cs: 4,
    })
    .unwrap_err();
    assert!(e.to_string().contains("rhs"), "{e}");
}

/// A LoRA linear layer over a packed bf16 weight: the base products are the bf16 products of
/// the rounded input (or output gradient) and weight, the adapter's are f32 as they are with an
/// f32 weight (its gradients bit for bit), in both storage layouts.
fn packed_layer_case(n: usize, k: usize, m: usize, r: usize, out_in: bool, bias: bool, seed: u64) {
    use lora_kernels::gemm_bf16::PackedWeight;
    use lora_kernels::lora_linear::*;
    let d = LinearDims {
        tokens: n,
        inp: k,
        out: m,
    };
    let layout = if out_in {
        WeightLayout::OutIn
    } else {
        WeightLayout::InOut
    };
    let w = rand_vec(m * k, seed, 0.5);
    let x = rand_vec(n * k, seed ^ 3, 1.0);
    let dy = rand_vec(n * m, seed ^ 4, 1.0);
    let a = rand_vec(r * k, seed ^ 5, 0.3);
    let b = rand_vec(m * r, seed ^ 6, 0.3);
    let bv = rand_vec(m, seed ^ 7, 0.1);
    let packed = PackedWeight::new(Source::F32(&w), layout, m, k).unwrap();
    // The stored values read back are the rounded ones.
    for (i, &v) in w.iter().enumerate() {
        assert_eq!(packed.bits_at(i), round_bf16(v));
    }
    let lora = LoraWeights {
        a: &a,
        b: &b,
        rank: r,
        scale: 1.5,
        dropout: None,
    };
    let run = |weight: WeightData| {
        let base = BaseLinear {
            weight,
            layout,
            bias: bias.then_some(&bv[..]),
        };
        let (mut y, mut u) = (vec![0.0; n * m], vec![0.0; n * r]);
        lora_linear_forward(&mut y, Some(&mut u), &x, &base, Some(&lora), d).unwrap();
        let (mut dx, mut da, mut db) = (vec![0.0; n * k], vec![0.0; r * k], vec![0.0; m * r]);
        let g = LinearGrads {
            dx: Some(&mut dx),
            dw: None,
            dbias: None,
            da: Some(&mut da),
            db: Some(&mut db),
        };
        lora_linear_backward(g, &dy, &x, &base, Some(&lora), Some(&u), d).unwrap();
        (y, dx, da, db)
    };
    let (y, dx, da, db) = run(WeightData::PackedBf16(&packed));
    // The adapter's share alone: the same layer over a zero weight.
    let zero = vec![0.0f32; m * k];
    let (y0, dx0, da0, db0) = run(WeightData::F32(&zero));
    assert_eq!(da, da0, "dA does not read W");
    assert_eq!(db, db0, "dB does not read W");
    let wv = if out_in {
        View::row_major(Source::F32(&w), m, k).t()
    } else {
        View::row_major(Source::F32(&w), k, m)
    };
    let (want, mag) =
        lora_kernels::gemm_bf16::reference::matmul(&View::row_major(Source::F32(&x), n, k), &wv);
    check("forward", &y, &want, &mag, &y0, k);
    let (want, mag) = lora_kernels::gemm_bf16::reference::matmul(
        &View::row_major(Source::F32(&dy), n, m),
        &wv.t(),
    );
    check("dx", &dx, &want, &mag, &dx0, m);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn lora_layer_over_a_packed_bf16_weight(
        n in 1usize..20, k in 1usize..90, m in 1usize..70, r in 1usize..20,
        out_in in any::<bool>(), bias in any::<bool>(), seed in any::<u64>(),
    ) {
        packed_layer_case(n, k, m, r, out_in, bias, seed);
    }
}

/// A packed weight used with another shape or layout is an error naming both.
#[test]
fn packed_weight_must_match_the_layer() {
    use lora_kernels::gemm_bf16::PackedWeight;
    use lora_kernels::lora_linear::*;
    let w = vec![0.5f32; 12];
    assert!(PackedWeight::new(Source::F32(&w), WeightLayout::OutIn, 5, 3).is_err());
    let p = PackedWeight::new(Source::F32(&w), WeightLayout::OutIn, 4, 3).unwrap();
    let d = LinearDims {
        tokens: 1,
        inp: 4,
        out: 3,
    };
    let base = BaseLinear {
        weight: WeightData::PackedBf16(&p),
        layout: WeightLayout::OutIn,
        bias: None,
    };
    let mut y = vec![0.0; 3];
    let e = lora_linear_forward(&mut y, None, &[1.0; 4], &base, None, d).unwrap_err();
    assert!(e.to_string().contains("packed as a OutIn 4 x 3"), "{e}");
}

/// The fused output head over a packed bf16 weight (autocast's `lm_head`): the loss against the
/// f64 cross-entropy of the logits of the bf16-rounded `x` and `W`; `dx` against
/// `dlogits @ W` in f64 on the rounded `W`, within one bf16 rounding of each `dlogits` element
/// (`2^-8 sum_j |dl_j W_jk|`: the kernel rounds its f32 `dlogits` to bf16 before the product),
/// in any chunking, accumulating onto what `dx` held.
fn packed_head_case(n: usize, c: usize, v: usize, chunk: usize, seed: u64) {
    use lora_kernels::gemm_bf16::PackedWeight;
    use lora_kernels::lora_linear::WeightLayout;
    use lora_kernels::ops::cross_entropy;
    let x = rand_vec(n * c, seed, 2.0);
    let w = rand_vec(v * c, seed ^ 7, 2.0);
    let targets: Vec<i32> = rand_vec(n, seed ^ 1, 1.0)
        .iter()
        .map(|z| {
            let t = ((z.abs() * 1000.0) as i32) % (v as i32 + 1);
            if t == v as i32 {
                -100
            } else {
                t
            }
        })
        .collect();
    let p = PackedWeight::new(Source::F32(&w), WeightLayout::OutIn, v, c).unwrap();
    let mut dx = vec![0.5f32; n * c];
    let (loss, count) = cross_entropy::linear_cross_entropy_packed(
        &x,
        &p,
        None,
        &targets,
        c,
        v,
        Some(&mut dx),
        chunk,
    )
    .unwrap();
    assert_eq!(count, targets.iter().filter(|&&t| t >= 0).count());
    let r = |z: f32| widen_bf16(round_bf16(z)) as f64;
    let (xr, wr): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|&z| r(z)).collect(),
        w.iter().map(|&z| r(z)).collect(),
    );
    let mut logits = vec![0.0f64; n * v];
    let mut mag = 0.0f64;
    for i in 0..n {
        for j in 0..v {
            logits[i * v + j] = (0..c).map(|k| xr[i * c + k] * wr[j * c + k]).sum();
            mag = mag.max((0..c).map(|k| (xr[i * c + k] * wr[j * c + k]).abs()).sum());
        }
    }
    let want = cross_entropy::reference::forward(&logits, &targets, v);
    // Each logit within (C + 2) 2^-23 of its magnitude; the loss moves by at most twice that.
    let tol = 2.0 * (c as f64 + 2.0) * 2f64.powi(-23) * mag + 1e-6 * want.abs().max(1.0);
    assert!(
        ((loss as f64) - want).abs() <= tol,
        "loss {loss} vs {want} (tol {tol:.2e})"
    );
    for i in 0..n {
        let t = targets[i];
        let row = &logits[i * v..(i + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|z| (z - m).exp()).sum();
        for k in 0..c {
            let (mut want, mut bound) = (0.5f64, 1e-6);
            if t >= 0 {
                for j in 0..v {
                    let mut dl = (row[j] - m).exp() / s / count as f64;
                    if j as i32 == t {
                        dl -= 1.0 / count as f64;
                    }
                    want += dl * wr[j * c + k];
                    bound += 2f64.powi(-8) * (dl * wr[j * c + k]).abs();
                }
            }
            let got = dx[i * c + k] as f64;
            assert!(
                (got - want).abs() <= bound,
                "dx[{i}, {k}]: {got} vs {want} (bound {bound:.2e}; n {n} c {c} v {v} chunk {chunk})"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn fused_head_over_a_packed_bf16_weight(
        n in 1usize..24, c in 1usize..70, v in 1usize..90, chunk in 1usize..30, seed in any::<u64>(),
    ) {
        packed_head_case(n, c, v, chunk, seed);
    }
}

/// Edge sizes of the packed head: one row, one feature, a vocabulary of one, and a
/// vocabulary and width that cross the kernel's panel and block sizes.
#[test]
fn fused_head_over_a_packed_bf16_weight_edge_sizes() {
    for (n, c, v, chunk) in [
        (1, 1, 1, 1),
        (1, 5, 1, 4),
        (3, 1, 7, 1),
        (13, 37, 600, 5),
        (40, 600, 70, 16),
    ] {
        packed_head_case(n, c, v, chunk, 3);
    }
    // A packed weight of another shape is refused by name.
    let w = vec![0.5f32; 12];
    let p = lora_kernels::gemm_bf16::PackedWeight::new(
        Source::F32(&w),
        lora_kernels::lora_linear::WeightLayout::OutIn,
        4,
        3,
    )
    .unwrap();
    let e = lora_kernels::ops::cross_entropy::linear_cross_entropy_packed(
        &[0.0; 4],
        &p,
        None,
        &[0],
        4,
        3,
        None,
        8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`w`"), "{e}");
}

/// A head that keeps its f32 values beside its packing (a tied embedding) takes `dx` in f32
/// from them: the same loss, bit for bit, as without them (the forward reads the packing), and
/// `dx` within f32 accumulation of `dlogits @ W` on the *unrounded* `W`. The logits are kept
/// tiny (x ~ 1e-4) so `dlogits` is exact to ~1e-5 and the bound (2^-14 of the terms'
/// magnitudes) is well under what rounding `W` to bf16 would cost (~2^-9 per term). Values of
/// the wrong length are refused by name.
#[test]
fn packed_head_with_values_takes_dx_in_f32() {
    use lora_kernels::gemm_bf16::PackedWeight;
    use lora_kernels::lora_linear::WeightLayout;
    use lora_kernels::ops::cross_entropy;
    for (n, c, v, chunk, seed) in [(5, 37, 20, 2, 1), (3, 600, 70, 16, 2), (1, 1, 1, 1, 3)] {
        let x: Vec<f32> = rand_vec(n * c, seed, 1.0)
            .iter()
            .map(|z| z * 1e-4)
            .collect();
        let w = rand_vec(v * c, seed ^ 7, 2.0);
        let targets: Vec<i32> = (0..n).map(|i| ((i * 7) % v) as i32).collect();
        let p = PackedWeight::new(Source::F32(&w), WeightLayout::OutIn, v, c).unwrap();
        let (mut dx, mut dx_packed) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
        let (loss, count) = cross_entropy::linear_cross_entropy_packed(
            &x,
            &p,
            Some(&w),
            &targets,
            c,
            v,
            Some(&mut dx),
            chunk,
        )
        .unwrap();
        let (loss_packed, _) = cross_entropy::linear_cross_entropy_packed(
            &x,
            &p,
            None,
            &targets,
            c,
            v,
            Some(&mut dx_packed),
            chunk,
        )
        .unwrap();
        assert_eq!(
            loss.to_bits(),
            loss_packed.to_bits(),
            "the forward reads the packing"
        );
        let r = |z: f32| widen_bf16(round_bf16(z)) as f64;
        for i in 0..n {
            let row: Vec<f64> = (0..v)
                .map(|j| (0..c).map(|k| r(x[i * c + k]) * r(w[j * c + k])).sum())
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|z| (z - m).exp()).sum();
            for k in 0..c {
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for j in 0..v {
                    let mut dl = (row[j] - m).exp() / s / count as f64;
                    if j as i32 == targets[i] {
                        dl -= 1.0 / count as f64;
                    }
                    want += dl * w[j * c + k] as f64;
                    mag += (dl * w[j * c + k] as f64).abs();
                }
                let bound = 2f64.powi(-14) * mag + 1e-12;
                let got = dx[i * c + k] as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "dx[{i}, {k}]: {got} vs {want} (bound {bound:.2e}; n {n} c {c} v {v})"
                );
            }
        }
    }
    let w = vec![0.5f32; 12];
    let p = PackedWeight::new(Source::F32(&w), WeightLayout::OutIn, 4, 3).unwrap();
    let e = cross_entropy::linear_cross_entropy_packed(
        &[0.0; 3],
        &p,
        Some(&w[..11]),
        &[0],
        3,
        4,
        None,
        8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("11 values for a 4 x 3 head"), "{e}");
}

/// A left operand packed into a reused buffer (larger, then smaller, then odd-sized matrices)
/// gives the products a fresh packing gives, bit for bit: nothing of an earlier packing leaks.
#[test]
fn packing_into_a_reused_buffer_equals_a_fresh_packing() {
    use lora_kernels::gemm_bf16::{pack_lhs_into, PackedLhs};
    let (k, n) = (37, 45);
    let b = rand_vec(k * n, 9, 1.0);
    let rhs = pack_rhs(View::row_major(Source::F32(&b), k, n)).unwrap();
    let mut reused = PackedLhs::empty();
    for (m, seed) in [(40, 1), (5, 2), (13, 3), (1, 4)] {
        let a = rand_vec(m * k, seed, f64::from(seed as u32));
        let va = View::row_major(Source::F32(&a), m, k);
        pack_lhs_into(&mut reused, va).unwrap();
        assert_eq!(reused.dims(), (m, k));
        let (mut got, mut want) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        matmul_packed(&mut got, &reused, &rhs, false, Par::Single).unwrap();
        matmul_packed(&mut want, &pack_lhs(va).unwrap(), &rhs, false, Par::Single).unwrap();
        assert_eq!(got, want, "m = {m}");
    }
}
