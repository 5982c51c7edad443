//! `matmul` against the f64 triple loop, every transpose combination, overwrite and accumulate.
//! Bound: relative error (to the output's max magnitude) <= 1e-5 for K <= 300 in f32.

mod common;
use common::*;
use lora_kernels::gemm::{matmul, reference, Par, Trans};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn matmul_matches_reference(m in 1usize..70, n in 1usize..70, k in 1usize..300, lt in any::<bool>(), rt in any::<bool>(), acc in any::<bool>(), seed in any::<u64>()) {
        let lt = if lt { Trans::Yes } else { Trans::No };
        let rt = if rt { Trans::Yes } else { Trans::No };
        let a = rand_vec(m * k, seed, 1.0);
        let b = rand_vec(k * n, seed ^ 1, 1.0);
        let mut c = rand_vec(m * n, seed ^ 2, 1.0);
        let mut want = f64s(&c);
        reference::matmul(&mut want, &f64s(&a), lt, &f64s(&b), rt, (m, n, k), 0.5, acc);
        matmul(&mut c, &a, lt, &b, rt, (m, n, k), 0.5, acc, Par::Auto).unwrap();
        assert_close("matmul", &c, &want, 1e-5);
    }
}

#[test]
fn overwrite_never_reads_dst() {
    let a = rand_vec(6, 1, 1.0);
    let b = rand_vec(6, 2, 1.0);
    let mut c = vec![f32::NAN; 4];
    matmul(
        &mut c,
        &a,
        Trans::No,
        &b,
        Trans::No,
        (2, 2, 3),
        1.0,
        false,
        Par::Auto,
    )
    .unwrap();
    assert!(c.iter().all(|v| v.is_finite()));
}

#[test]
fn wrong_lengths_are_named() {
    let mut c = vec![0.0; 4];
    let err = matmul(
        &mut c,
        &[0.0; 5],
        Trans::No,
        &[0.0; 6],
        Trans::No,
        (2, 2, 3),
        1.0,
        false,
        Par::Auto,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("`lhs` has 5 elements, expected 6"),
        "{err}"
    );
}
