//! Bicubic resampling against PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`
//! (fixture written by `fixtures/parity/make_bicubic.py`): upsampling, downsampling, the identity
//! (exact) and single-pixel inputs (borders repeated).

use lora_kernels::ops::interp::bicubic_resize;

#[test]
fn matches_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/parity/bicubic.json"
    );
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let f = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for case in cases.as_array().unwrap() {
        let (c, h, w, oh, ow) = (
            u(&case["c"]),
            u(&case["h"]),
            u(&case["w"]),
            u(&case["oh"]),
            u(&case["ow"]),
        );
        let x = f(&case["x"]);
        let want = f(&case["y"]);
        let got = bicubic_resize(&x, c, (h, w), (oh, ow)).unwrap();
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * scale,
                "{c}x{h}x{w} -> {oh}x{ow}: value {i} is {a}, PyTorch {b}"
            );
        }
        if (h, w) == (oh, ow) {
            assert_eq!(got, x, "the identity resize is exact");
        }
    }
    assert!(bicubic_resize(&[1.0; 4], 1, (2, 2), (0, 3)).is_err());
    assert!(bicubic_resize(&[1.0; 3], 1, (2, 2), (2, 2)).is_err());
}
