//! lora-core's `LoraConv2d` against PEFT's LoRA on a `torch.nn.Conv2d`
//! (fixtures written by `fixtures/parity/make_conv_lora.py`): the adapter file PEFT saves maps
//! onto the layer's A and B as stored (key names and shapes), and the output, the adapter
//! gradients of `sum(y * r)` and the merged weight equal PEFT's. Cases: a 3x3 convolution with
//! stride and padding, a 1x1 convolution, and a grouped one (which PEFT, and we, cannot merge).

use lora_core::ops::Conv2dParams;
use lora_core::{LoraConfig, LoraConv2d, Tape, Tensor};
use lora_io::safetensors::SafetensorsFile;
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity/conv_lora")
        .join(case)
}

/// `max |got - want| / max |want|`.
fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

fn check(case: &str) {
    let d = dir(case);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
    let reference = SafetensorsFile::open(d.join("reference.safetensors")).unwrap();
    let get = |k: &str| reference.read_f32(k).unwrap();
    let (w, ws) = get("weight");
    let (b, bs) = get("bias");
    let params = Conv2dParams {
        stride: pair(&c["stride"]),
        padding: pair(&c["padding"]),
        dilation: (1, 1),
        groups: c["groups"].as_u64().unwrap() as usize,
    };
    let cfg = LoraConfig {
        rank: c["rank"].as_u64().unwrap() as usize,
        alpha: c["alpha"].as_f64().unwrap() as f32,
        ..LoraConfig::default()
    };
    let weight = Tensor::new(w, &ws).unwrap();
    let bias = Tensor::new(b, &bs).unwrap();
    let mut layer = LoraConv2d::new(weight, Some(bias), params, &cfg, 0).unwrap();
    // The adapter as PEFT saved it: our A and B hold its tensors as stored.
    let adapter = SafetensorsFile::open(d.join("adapter/adapter_model.safetensors")).unwrap();
    let (a, a_shape) = adapter
        .read_f32("base_model.model.conv.lora_A.weight")
        .unwrap();
    let (bb, b_shape) = adapter
        .read_f32("base_model.model.conv.lora_B.weight")
        .unwrap();
    assert_eq!(a_shape, layer.lora_a.shape(), "{case}: lora_A shape");
    assert_eq!(b_shape, layer.lora_b.shape(), "{case}: lora_B shape");
    assert_eq!(a, get("lora_A").0, "{case}: the file holds the layer's A");
    layer.lora_a.set_data(a).unwrap();
    layer.lora_b.set_data(bb).unwrap();

    let (x, xs) = get("x");
    let x = Tensor::new(x, &xs).unwrap();
    let tape = Tape::new(0);
    let y = layer.forward(&tape, &x).unwrap();
    let (yw, ys) = get("y");
    assert_eq!(y.shape(), &ys[..], "{case}: output shape");
    let e = rel(&y.to_vec(), &yw);
    println!("{case}: output vs PEFT {e:.1e}");
    assert!(e <= 1e-5, "{case}: output differs from PEFT's by {e:.2e}");
    let g = tape.backward_with(&y, &get("r").0).unwrap();
    for (name, t) in [("lora_A", &layer.lora_a), ("lora_B", &layer.lora_b)] {
        let e = rel(g.get(t).unwrap(), &get(&format!("grad.{name}")).0);
        println!("{case}: d/d{name} vs PEFT {e:.1e}");
        assert!(
            e <= 1e-5,
            "{case}: d/d{name} differs from PEFT's by {e:.2e}"
        );
    }
    assert!(g.get(&layer.weight).is_none());
    if params.groups == 1 {
        layer.merge().unwrap();
        let e = rel(&layer.weight.to_vec(), &get("merged_weight").0);
        println!("{case}: merged weight vs PEFT {e:.1e}");
        assert!(
            e <= 1e-6,
            "{case}: merged weight differs from PEFT's by {e:.2e}"
        );
    } else {
        assert!(
            layer.merge().is_err(),
            "{case}: PEFT cannot merge grouped convolutions"
        );
        assert!(reference.names().iter().all(|n| *n != "merged_weight"));
    }
}

#[test]
fn a_3x3_strided_padded_convolution_matches_peft() {
    check("k3_s2_p1");
}

#[test]
fn a_1x1_convolution_matches_peft() {
    check("k1");
}

#[test]
fn a_grouped_convolution_matches_peft() {
    check("k3x2_groups2");
}
