//! The shape ops (`reshape`, `transpose`, `concat`, `expand`, `narrow_dim`) composed as ViT's
//! embedding and class-token readout use them, against an f64 reference of the composition:
//! values exactly (they only move values), gradients against central finite differences of the
//! reference, on every backend.

use super::*;
use crate::device::{assert_close, test_devices};

/// ViT's embedding on conv-like planes `x (b, c, p)`: tokens `(b, p, c)`, the class token
/// `cls (1, 1, c)` before them, positions `pos (1, p + 1, c)` added, then tokens `[t0, t0 + len)`
/// taken and flattened to `(b, len * c)`.
fn reference(
    x: &[f64],
    cls: &[f64],
    pos: &[f64],
    (b, c, p): (usize, usize, usize),
    (t0, len): (usize, usize),
) -> Vec<f64> {
    let mut out = Vec::with_capacity(b * len * c);
    for bi in 0..b {
        for tok in t0..t0 + len {
            for ci in 0..c {
                let v = if tok == 0 {
                    cls[ci]
                } else {
                    x[(bi * c + ci) * p + tok - 1]
                };
                out.push(v + pos[tok * c + ci]);
            }
        }
    }
    out
}

fn run(
    dev: Device,
    vals: &[Vec<f32>; 3],
    dims: (usize, usize, usize),
    sel: (usize, usize),
    dout: &[f32],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (b, c, p) = dims;
    let tape = Tape::new(0);
    let shapes: [&[usize]; 3] = [&[b, c * p], &[1, 1, c], &[1, p + 1, c]];
    let ts: Vec<Tensor> = vals
        .iter()
        .zip(shapes)
        .map(|(v, s)| Tensor::new_on(v.clone(), s, true, dev).unwrap())
        .collect();
    let planes = reshape(&tape, &ts[0], &[b, c, p]).unwrap();
    let tokens = transpose(&tape, &planes).unwrap();
    let cls = expand(&tape, &ts[1], b).unwrap();
    let seq = concat(&tape, &cls, &tokens, 1).unwrap();
    let pos = expand(&tape, &ts[2], b).unwrap();
    let x = add(&tape, &seq, &pos).unwrap();
    let picked = narrow_dim(&tape, &x, 1, sel.0, sel.1).unwrap();
    let y = reshape(&tape, &picked, &[b, sel.1 * c]).unwrap();
    let grads = tape.backward_with(&y, dout).unwrap();
    let g = ts
        .iter()
        .map(|t| grads.to_vec(t).unwrap().unwrap())
        .collect();
    (y.try_to_vec().unwrap(), g)
}

#[test]
fn vit_embedding_shapes_match_the_reference() {
    let mut rng = lora_kernels::rng::Rng::new(5);
    for (dims, sel) in [
        ((2, 3, 4), (0, 1)),
        ((1, 1, 1), (0, 2)),
        ((3, 5, 7), (2, 5)),
        ((2, 4, 3), (3, 1)),
    ] {
        let (b, c, p) = dims;
        let mut r = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let vals = [r(b * c * p), r(c), r((p + 1) * c)];
        let dout = r(b * sel.1 * c);
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let want = reference(&f64s(&vals[0]), &f64s(&vals[1]), &f64s(&vals[2]), dims, sel);
        let (y, g) = run(Device::Cpu, &vals, dims, sel, &dout);
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(y, want32, "values, dims {dims:?} sel {sel:?}");
        // Finite differences of the reference, input by input.
        for (which, gw) in g.iter().enumerate() {
            for i in 0..vals[which].len() {
                let h = 1e-3;
                let mut args = [f64s(&vals[0]), f64s(&vals[1]), f64s(&vals[2])];
                let mut at = |d: f64| {
                    args[which][i] = vals[which][i] as f64 + d;
                    reference(&args[0], &args[1], &args[2], dims, sel)
                        .iter()
                        .zip(&dout)
                        .map(|(y, g)| y * *g as f64)
                        .sum::<f64>()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - gw[i] as f64).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "input {which}[{i}], dims {dims:?} sel {sel:?}: backward {} vs {fd}",
                    gw[i]
                );
            }
        }
        for dev in test_devices() {
            let (yd, gd) = run(dev, &vals, dims, sel, &dout);
            assert_close("values", dev, &yd, &y);
            for (i, (d, h)) in gd.iter().zip(&g).enumerate() {
                assert_close(&format!("gradient {i}"), dev, d, h);
            }
        }
    }
}

#[test]
fn shape_ops_refuse_mismatched_shapes_by_name() {
    let tape = Tape::new(0);
    let a = Tensor::new(vec![0.0; 6], &[1, 2, 3]).unwrap();
    let b = Tensor::new(vec![0.0; 8], &[1, 2, 4]).unwrap();
    let e = concat(&tape, &a, &b, 1).unwrap_err().to_string();
    assert!(e.contains("concat: b has shape [1, 2, 4]"), "{e}");
    assert!(concat(&tape, &a, &b, 2).is_ok());
    let e = reshape(&tape, &a, &[4]).unwrap_err().to_string();
    assert!(e.contains("reshape") && e.contains("4 elements"), "{e}");
    let two = Tensor::new(vec![0.0; 4], &[2, 2]).unwrap();
    let e = expand(&tape, &two, 3).unwrap_err().to_string();
    assert!(
        e.contains("expand: x has shape [2, 2], expected [1, ...]"),
        "{e}"
    );
    assert_eq!(expand(&tape, &a, 3).unwrap().shape(), [3, 2, 3]);
    let e = narrow_dim(&tape, &a, 1, 1, 2).unwrap_err().to_string();
    assert!(e.contains("at least 3 along dimension 1"), "{e}");
    let e = narrow_dim(&tape, &a, 3, 0, 1).unwrap_err().to_string();
    assert!(e.contains("more than 3 dimensions"), "{e}");
    let v = Tensor::new(vec![0.0; 3], &[3]).unwrap();
    let e = transpose(&tape, &v).unwrap_err().to_string();
    assert!(e.contains("at least 2 dimensions"), "{e}");
}
