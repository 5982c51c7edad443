//! The linear sum assignment against scipy's `linear_sum_assignment` (fixture written by
//! `fixtures/parity/make_assign.py`: the same pairs, ties included) and against enumeration of
//! every assignment on random matrices (proptest): least total cost, one column per row, no
//! column twice.

use lora_kernels::assign::{linear_sum_assignment, reference, AssignError};
use proptest::prelude::*;

fn valid(pairs: &[(usize, usize)], rows: usize, cols: usize) {
    assert_eq!(pairs.len(), rows.min(cols));
    let mut r: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    let mut c: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    assert!(
        r.windows(2).all(|w| w[0] < w[1]),
        "sorted by row, each row once: {pairs:?}"
    );
    c.sort_unstable();
    c.dedup();
    r.dedup();
    assert_eq!(c.len(), pairs.len(), "each column once: {pairs:?}");
    assert!(pairs.iter().all(|&(i, j)| i < rows && j < cols));
}

#[test]
fn matches_scipy_including_ties() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/parity/assign/cases.json"
    );
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut n = 0;
    for c in cases.as_array().unwrap() {
        let rows = c["rows"].as_u64().unwrap() as usize;
        let cols = c["cols"].as_u64().unwrap() as usize;
        let cost: Vec<f64> = c["cost"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<(usize, usize)> = c["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let got = linear_sum_assignment(&cost, rows, cols).unwrap();
        assert_eq!(got, want, "{rows}x{cols} {cost:?}");
        n += 1;
    }
    assert_eq!(n, 120);
}

#[test]
fn refuses_bad_matrices() {
    assert!(matches!(
        linear_sum_assignment(&[1.0; 5], 2, 3),
        Err(AssignError::Shape { .. })
    ));
    assert_eq!(
        linear_sum_assignment(&[f64::NAN, 1.0], 1, 2),
        Err(AssignError::Infeasible)
    );
    assert_eq!(
        linear_sum_assignment(&[f64::NEG_INFINITY, 1.0], 1, 2),
        Err(AssignError::Infeasible)
    );
    // Every column of row 1 forbidden: no assignment.
    let inf = f64::INFINITY;
    assert_eq!(
        linear_sum_assignment(&[1.0, 2.0, inf, inf], 2, 2),
        Err(AssignError::Infeasible)
    );
    // Forbidden pairs avoided when possible.
    assert_eq!(
        linear_sum_assignment(&[inf, 1.0, 5.0, inf], 2, 2).unwrap(),
        vec![(0, 1), (1, 0)]
    );
    assert!(linear_sum_assignment(&[], 0, 3).unwrap().is_empty());
}

proptest! {
    #[test]
    fn least_cost_by_enumeration(rows in 1usize..7, cols in 1usize..7, ints in any::<bool>(), seed in any::<u64>()) {
        let mut r = lora_kernels::rng::Rng::new(seed);
        let cost: Vec<f64> = (0..rows * cols)
            .map(|_| if ints { (r.next_u64() % 4) as f64 } else { r.normal() * 10.0 })
            .collect();
        let pairs = linear_sum_assignment(&cost, rows, cols).unwrap();
        valid(&pairs, rows, cols);
        let total: f64 = pairs.iter().map(|&(i, j)| cost[i * cols + j]).sum();
        let best = reference::min_cost(&cost, rows, cols);
        prop_assert!((total - best).abs() <= 1e-9 * (1.0 + best.abs()), "{total} vs {best}");
    }
}
