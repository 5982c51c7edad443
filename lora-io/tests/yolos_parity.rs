//! YOLOS against transformers + PEFT (fixture written by `fixtures/parity/make_vision.py`): an
//! input whose patch grid differs from the config's (position tables resized, bicubic), mid-layer
//! position embeddings, the base model's class logits and boxes; then with PEFT's LoRA on
//! query/value and the heads' trained copies, the logits, boxes, transformers' loss from labels
//! (Hungarian matching, class loss with eos_coef, L1, GIoU) and every trainable tensor's gradient.

use lora_core::lora::LoraConfig;
use lora_core::models::vit::Activation;
use lora_core::models::yolos::{Objects, Yolos, YolosConfig};
use lora_core::models::Linear;
use lora_core::{CoreError, Tape, Tensor};
use lora_io::hf::{read_json, Weights};
use lora_io::safetensors::SafetensorsFile;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/vision/yolos")
}

fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

fn config() -> YolosConfig {
    let v = read_json(&dir().join("model/config.json")).unwrap();
    let u = |k: &str| v[k].as_u64().unwrap() as usize;
    let f = |k: &str| v[k].as_f64().unwrap() as f32;
    YolosConfig {
        hidden_size: u("hidden_size"),
        num_hidden_layers: u("num_hidden_layers"),
        num_attention_heads: u("num_attention_heads"),
        intermediate_size: u("intermediate_size"),
        hidden_act: Activation::parse(v["hidden_act"].as_str().unwrap()).unwrap(),
        layer_norm_eps: f("layer_norm_eps"),
        image_size: (
            v["image_size"][0].as_u64().unwrap() as usize,
            v["image_size"][1].as_u64().unwrap() as usize,
        ),
        patch_size: u("patch_size"),
        num_channels: u("num_channels"),
        qkv_bias: v["qkv_bias"].as_bool().unwrap(),
        num_detection_tokens: u("num_detection_tokens"),
        use_mid_position_embeddings: v["use_mid_position_embeddings"].as_bool().unwrap(),
        num_labels: v["id2label"].as_object().unwrap().len(),
        costs: (f("class_cost"), f("bbox_cost"), f("giou_cost")),
        bbox_loss_coefficient: f("bbox_loss_coefficient"),
        giou_loss_coefficient: f("giou_loss_coefficient"),
        eos_coefficient: f("eos_coefficient"),
    }
}

#[test]
fn yolos_matches_transformers_and_peft() {
    let cfg = config();
    let w = Weights::open(&dir().join("model")).unwrap();
    let mut load =
        |k: &str, s: &[usize]| -> Result<Tensor, CoreError> { Ok(w.tensor(k, s).unwrap()) };
    let mut model = Yolos::load(&cfg, &mut load).unwrap();
    let reference = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let get = |k: &str| reference.read_f32(k).unwrap();
    let (px, ps) = get("pixel_values");
    let pixels = Tensor::new(px, &ps).unwrap();
    let base = model.forward(&Tape::inference(), &pixels, false).unwrap();
    let e = rel(&base.logits.to_vec(), &get("logits_base").0);
    assert!(e < 5e-6, "base logits differ by {e:e}");
    let e = rel(&base.boxes.to_vec(), &get("boxes_base").0);
    assert!(e < 5e-6, "base boxes differ by {e:e}");

    // PEFT's adapter: LoRA on query/value, the heads' trained copies.
    let adapter = SafetensorsFile::open(dir().join("adapter/adapter_model.safetensors")).unwrap();
    let lc = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let mut trainable: Vec<(String, Tensor)> = Vec::new();
    for (name, lin) in model.linears_mut() {
        if name.ends_with(".query") || name.ends_with(".value") {
            lin.inject(&lc, 0).unwrap();
            let l = lin.lora().unwrap();
            for (part, t) in [("lora_A", &l.lora_a), ("lora_B", &l.lora_b)] {
                let key = format!("{name}.{part}.weight");
                t.set_data(
                    adapter
                        .read_f32(&format!("base_model.model.{key}"))
                        .unwrap()
                        .0,
                )
                .unwrap();
                trainable.push((key, t.clone()));
            }
        }
    }
    for (name, lin) in model.head_layers_mut() {
        let (wk, bk) = (format!("{name}.weight"), format!("{name}.bias"));
        let (wv, ws) = adapter.read_f32(&format!("base_model.model.{wk}")).unwrap();
        let (bv, bs) = adapter.read_f32(&format!("base_model.model.{bk}")).unwrap();
        let (wt, bt) = (
            Tensor::param(wv, &ws).unwrap(),
            Tensor::param(bv, &bs).unwrap(),
        );
        trainable.push((wk, wt.clone()));
        trainable.push((bk, bt.clone()));
        *lin = Linear::frozen(wt, lora_core::lora::WeightLayout::OutIn, Some(bt));
    }
    let det = model.forward(&Tape::inference(), &pixels, true).unwrap();
    let e = rel(&det.logits.to_vec(), &get("logits").0);
    assert!(e < 5e-6, "adapted logits differ by {e:e}");
    let e = rel(&det.boxes.to_vec(), &get("boxes").0);
    assert!(e < 5e-6, "adapted boxes differ by {e:e}");

    let objects: Vec<Objects> = (0..2)
        .map(|i| Objects {
            classes: get(&format!("labels.{i}.class_labels"))
                .0
                .iter()
                .map(|&c| c as usize)
                .collect(),
            boxes: get(&format!("labels.{i}.boxes"))
                .0
                .chunks(4)
                .map(|b| [b[0], b[1], b[2], b[3]])
                .collect(),
        })
        .collect();
    let tape = Tape::new(0);
    let loss = model.loss(&tape, &pixels, &objects, true).unwrap();
    for (part, got) in [
        ("loss_ce", loss.loss_ce),
        ("loss_bbox", loss.loss_bbox),
        ("loss_giou", loss.loss_giou),
    ] {
        let e = rel(&[got], &get(part).0);
        assert!(e < 5e-6, "{part} differs by {e:e}");
    }
    let e = rel(&[loss.total.scalar().unwrap()], &get("loss").0);
    assert!(e < 5e-6, "loss differs by {e:e}");
    let grads = tape.backward(&loss.total).unwrap();
    let expected = reference
        .names()
        .into_iter()
        .filter(|k| k.starts_with("grad."))
        .count();
    assert_eq!(trainable.len(), expected);
    for (name, t) in &trainable {
        let e = rel(grads.get(t).unwrap(), &get(&format!("grad.{name}")).0);
        assert!(e < 5e-5, "gradient of {name} differs by {e:e}");
    }
}
