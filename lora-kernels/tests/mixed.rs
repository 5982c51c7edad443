//! Mixed-adapter batches: every row equals that row run alone with its own adapter (or none),
//! for random shapes, ranks and assignments; bad adapter indices are named errors.

mod common;
use common::*;
use lora_kernels::lora_linear::{
    lora_linear_forward, BaseLinear, LinearDims, LoraWeights, WeightData, WeightLayout,
};
use lora_kernels::mixed::{lora_linear_looped_forward, lora_linear_mixed_forward};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn each_row_equals_its_adapter_alone(n in 1usize..40, k in 1usize..70, m in 1usize..70, n_ad in 1usize..5, seed in any::<u64>(), bias in any::<bool>()) {
        let d = LinearDims { tokens: n, inp: k, out: m };
        let x = rand_vec(n * k, seed, 1.0);
        let w = rand_vec(m * k, seed ^ 1, 0.5);
        let b = rand_vec(m, seed ^ 2, 0.5);
        let base = BaseLinear { weight: WeightData::F32(&w), layout: WeightLayout::OutIn, bias: bias.then_some(&b[..]) };
        let ranks: Vec<usize> = (0..n_ad).map(|i| 1 + (seed as usize / (i + 1)) % 20).collect();
        let mats: Vec<(Vec<f32>, Vec<f32>)> = ranks.iter().enumerate().map(|(i, &r)| (rand_vec(r * k, seed ^ (10 + i as u64), 0.5), rand_vec(m * r, seed ^ (20 + i as u64), 0.5))).collect();
        let adapters: Vec<LoraWeights> = mats.iter().zip(&ranks).enumerate().map(|(i, ((a, bm), &r))| LoraWeights { a, b: bm, rank: r, scale: 0.5 + i as f32, dropout: None }).collect();
        let assign: Vec<i32> = (0..n).map(|i| ((seed >> (i % 50)) % (n_ad as u64 + 1)) as i32 - 1).collect();
        let mut y = vec![f32::NAN; n * m];
        lora_linear_mixed_forward(&mut y, &x, &base, &adapters, &assign, d).unwrap();
        let mut looped = vec![f32::NAN; n * m];
        lora_linear_looped_forward(&mut looped, &x, &base, &adapters, &assign, d).unwrap();
        for i in 0..n {
            // f64 oracle of row i with its own adapter (or none), and the same sums over
            // absolute values: the scale f32 rounding is proportional to (a single output of a
            // 14-term dot product can cancel to near zero, where a plain relative error
            // measures only the cancellation: 1.2e-5 in a 600-case run).
            let xi = &x[i * k..(i + 1) * k];
            let (mut want, mut bound) = (vec![0.0f64; m], vec![0.0f64; m]);
            for o in 0..m {
                let bo = if bias { b[o] as f64 } else { 0.0 };
                want[o] = bo;
                bound[o] = bo.abs();
                for (c, &xc) in xi.iter().enumerate() {
                    let t = xc as f64 * w[o * k + c] as f64;
                    want[o] += t;
                    bound[o] += t.abs();
                }
            }
            if let Ok(a) = usize::try_from(assign[i]) {
                let (am, bm, r, sc) = (adapters[a].a, adapters[a].b, adapters[a].rank, adapters[a].scale as f64);
                for j in 0..r {
                    let (mut u, mut ua) = (0.0f64, 0.0f64);
                    for (c, &xc) in xi.iter().enumerate() {
                        u += xc as f64 * am[j * k + c] as f64;
                        ua += (xc as f64 * am[j * k + c] as f64).abs();
                    }
                    for o in 0..m {
                        want[o] += sc * u * bm[o * r + j] as f64;
                        bound[o] += (sc * ua * bm[o * r + j] as f64).abs();
                    }
                }
            }
            assert_close_bound("mixed row", &y[i * m..(i + 1) * m], &want, &bound, 1e-5);
            assert_close_bound("looped row", &looped[i * m..(i + 1) * m], &want, &bound, 1e-5);
            // And the single-row layer itself, which the rows must equal.
            let one = LinearDims { tokens: 1, ..d };
            let mut yi = vec![0.0; m];
            match usize::try_from(assign[i]) {
                Err(_) => lora_linear_forward(&mut yi, None, xi, &base, None, one).unwrap(),
                Ok(a) => {
                    let mut u = vec![0.0; adapters[a].rank];
                    lora_linear_forward(&mut yi, Some(&mut u), xi, &base, Some(&adapters[a]), one).unwrap();
                }
            }
            assert_close_bound("single row", &yi, &want, &bound, 1e-5);
        }
    }
}

#[test]
fn adapter_index_out_of_range_is_named() {
    let d = LinearDims {
        tokens: 2,
        inp: 3,
        out: 2,
    };
    let base = BaseLinear {
        weight: WeightData::F32(&[0.0; 6]),
        layout: WeightLayout::OutIn,
        bias: None,
    };
    let a = [0.0; 3];
    let b = [0.0; 2];
    let ad = [LoraWeights {
        a: &a,
        b: &b,
        rank: 1,
        scale: 1.0,
        dropout: None,
    }];
    let e = lora_linear_mixed_forward(&mut [0.0; 4], &[0.0; 6], &base, &ad, &[0, 1], d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`row_adapter`[1] = 1"), "{e}");
}
