//! GroupNorm against its f64 definition on random shapes (one group, depthwise groups, one
//! pixel, one sample, odd sizes), the backward (dx, dgamma, dbeta, accumulated onto non-zero
//! buffers) against central finite differences of the definition, thread-count independence,
//! and bad shapes as named errors.

mod common;

use common::{assert_close, f64s, fd_grad, rand_vec};
use lora_kernels::ops::norm::{group_reference, groupnorm_backward, groupnorm_forward, GroupDims};
use proptest::prelude::*;

fn check(d: GroupDims, seed: u64) {
    let len = d.batch * d.channels * d.spatial;
    // An offset and a scale per sample, so mean subtraction matters.
    let x: Vec<f32> = rand_vec(len, seed, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 3.0 + (i % 7) as f32)
        .collect();
    let gamma = rand_vec(d.channels, seed ^ 1, 1.5);
    let beta = rand_vec(d.channels, seed ^ 2, 1.0);
    let eps = 1e-5;
    let ng = d.batch * d.groups;
    let (mut out, mut mean, mut rstd) =
        (vec![f32::NAN; len], vec![f32::NAN; ng], vec![f32::NAN; ng]);
    groupnorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &x,
        &gamma,
        Some(&beta),
        d,
        eps,
    )
    .unwrap();
    let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
    let f = |x: &[f64], g: &[f64], b: &[f64]| group_reference::forward(x, g, b, d, eps as f64);
    assert_close("groupnorm", &out, &f(&x64, &g64, &b64), 1e-5);

    let dout = rand_vec(len, seed ^ 3, 1.0);
    let w = f64s(&dout);
    let (dx0, dg0, db0) = (
        rand_vec(len, seed ^ 4, 1.0),
        rand_vec(d.channels, seed ^ 5, 1.0),
        rand_vec(d.channels, seed ^ 6, 1.0),
    );
    let (mut dx, mut dg, mut db) = (dx0.clone(), dg0.clone(), db0.clone());
    groupnorm_backward(
        Some(&mut dx),
        Some(&mut dg),
        Some(&mut db),
        &dout,
        &x,
        &gamma,
        &mean,
        &rstd,
        d,
    )
    .unwrap();
    let plus = |base: &[f32], v: Vec<f64>| -> Vec<f64> {
        base.iter().zip(v).map(|(a, b)| *a as f64 + b).collect()
    };
    let fdx = fd_grad(&x64, &w, |v| f(v, &g64, &b64));
    let fdg = fd_grad(&g64, &w, |v| f(&x64, v, &b64));
    let fdb = fd_grad(&b64, &w, |v| f(&x64, &g64, v));
    assert_close("dx", &dx, &plus(&dx0, fdx), 1e-4);
    assert_close("dgamma", &dg, &plus(&dg0, fdg), 1e-4);
    assert_close("dbeta", &db, &plus(&db0, fdb), 1e-4);
}

fn dims(batch: usize, channels: usize, spatial: usize, groups: usize) -> GroupDims {
    GroupDims {
        batch,
        channels,
        spatial,
        groups,
    }
}

#[test]
fn edge_shapes() {
    check(dims(1, 4, 5, 1), 1); // one group: LayerNorm over (C, S)
    check(dims(2, 6, 3, 6), 2); // one channel per group (InstanceNorm)
    check(dims(3, 4, 1, 2), 3); // one pixel
    check(dims(2, 32, 9, 32 / 4), 4); // SD-like: 4 channels per group
}

/// Any thread count gives the same bits.
#[test]
fn threads_do_not_change_the_result() {
    let d = dims(3, 12, 50, 4);
    let len = 3 * 12 * 50;
    let (x, g, b, dy) = (
        rand_vec(len, 7, 2.0),
        rand_vec(12, 8, 1.0),
        rand_vec(12, 9, 1.0),
        rand_vec(len, 10, 1.0),
    );
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (mut o, mut m, mut r) = (vec![0.0; len], vec![0.0; 12], vec![0.0; 12]);
            groupnorm_forward(&mut o, &mut m, &mut r, &x, &g, Some(&b), d, 1e-6).unwrap();
            let (mut dx, mut dg, mut db) = (vec![0.0; len], vec![0.0; 12], vec![0.0; 12]);
            groupnorm_backward(
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db),
                &dy,
                &x,
                &g,
                &m,
                &r,
                d,
            )
            .unwrap();
            (o, m, r, dx, dg, db)
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn bad_shapes_are_named() {
    let d = dims(1, 6, 2, 4);
    let (mut o, mut m, mut r) = (vec![0.0; 12], vec![0.0; 4], vec![0.0; 4]);
    let e = groupnorm_forward(&mut o, &mut m, &mut r, &[0.0; 12], &[1.0; 6], None, d, 1e-5)
        .unwrap_err();
    assert!(
        e.to_string().contains("4 groups do not divide 6 channels"),
        "{e}"
    );
    let d = dims(1, 6, 2, 3);
    let e = groupnorm_forward(&mut o, &mut m, &mut r, &[0.0; 11], &[1.0; 6], None, d, 1e-5)
        .unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_shapes_match_the_definition(
        batch in 1usize..3, cg in 1usize..4, groups in 1usize..4, spatial in 1usize..7, seed in any::<u64>()
    ) {
        check(dims(batch, cg * groups, spatial, groups), seed);
    }
}
