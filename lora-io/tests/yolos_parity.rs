//! YOLOS against transformers + PEFT (fixture written by `fixtures/parity/make_vision.py`): an
//! input whose patch grid differs from the config's (position tables resized, bicubic), mid-layer
//! position embeddings, the base model's class logits and boxes; then with PEFT's LoRA on
//! query/value and the heads' trained copies, the logits, boxes, transformers' loss from labels
//! (Hungarian matching, class loss with eos_coef, L1, GIoU) and every trainable tensor's gradient.

use lora_core::models::yolos::Objects;
use lora_core::{Tape, Tensor};
use lora_io::safetensors::SafetensorsFile;
use lora_io::vision::{adapter_tensors, load_adapter, save_adapter, HeadSource, VisionModelDir};
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

#[test]
fn yolos_matches_transformers_and_peft() {
    let md = VisionModelDir::open(dir().join("model")).unwrap();
    let (mut model, head) = md.load_detector(0).unwrap();
    assert_eq!(head, HeadSource::Checkpoint);
    let e = md.load_model(0).err().unwrap().to_string();
    assert!(e.contains("object detector"), "{e}");
    let reference = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let get = |k: &str| reference.read_f32(k).unwrap();
    let (px, ps) = get("pixel_values");
    let pixels = Tensor::new(px, &ps).unwrap();
    let base = model.forward(&Tape::inference(), &pixels, false).unwrap();
    let e = rel(&base.logits.to_vec(), &get("logits_base").0);
    assert!(e < 5e-6, "base logits differ by {e:e}");
    let e = rel(&base.boxes.to_vec(), &get("boxes_base").0);
    assert!(e < 5e-6, "base boxes differ by {e:e}");

    // PEFT's adapter: LoRA on query/value, the heads' trained copies (modules_to_save).
    let cfg_peft = load_adapter(&mut model, &dir().join("adapter")).unwrap();
    let trainable: Vec<(String, Tensor)> = adapter_tensors(&model)
        .into_iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("base_model.model.").unwrap().to_string(),
                t.clone(),
            )
        })
        .collect();
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
    // Written back: PEFT's keys and values, and its modules_to_save.
    let out = std::env::temp_dir().join(format!("lora-yolos-parity-{}", std::process::id()));
    save_adapter(&model, &cfg_peft, &out).unwrap();
    let ours = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
    let theirs = SafetensorsFile::open(dir().join("adapter/adapter_model.safetensors")).unwrap();
    let (mut a, mut b) = (ours.names(), theirs.names());
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
    for k in a {
        assert_eq!(
            ours.read_f32(k).unwrap(),
            theirs.read_f32(k).unwrap(),
            "{k}"
        );
    }
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        c["modules_to_save"],
        serde_json::json!(["class_labels_classifier", "bbox_predictor"])
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_detector_for_other_classes_gets_a_new_class_layer() {
    use lora_core::models::VisionModel;
    let mut md = VisionModelDir::open(dir().join("model")).unwrap();
    md.set_labels(vec!["scratch".into(), "dent".into()]);
    let (model, head) = md.load_detector(3).unwrap();
    // The checkpoint's last class layer has 3 classes + "no object".
    assert_eq!(head, HeadSource::Mismatched(4));
    let heads = model.heads();
    assert_eq!(heads[2].name, "class_labels_classifier.layers.2");
    assert_eq!(heads[2].dims(), (24, 3));
    // The box head and the first class layers are the checkpoint's.
    assert_eq!(heads[5].dims(), (24, 4));
}

#[test]
fn modules_to_save_names_heads_by_suffix_as_peft_does() {
    use lora_core::models::VisionModel;
    use lora_io::peft::PeftConfig;
    let md = VisionModelDir::open(dir().join("model")).unwrap();
    let (mut model, _) = md.load_detector(0).unwrap();
    let mut cfg = PeftConfig::new(2, 4.0, &["query"]);
    // PEFT's `key.endswith("classifier")` wraps `class_labels_classifier`, not the box head.
    cfg.modules_to_save = vec!["classifier".into()];
    lora_io::vision::inject(&mut model, &cfg, 0).unwrap();
    let trained: Vec<&str> = model
        .heads()
        .into_iter()
        .filter(|h| h.trained.is_some())
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(
        trained,
        [
            "class_labels_classifier.layers.0",
            "class_labels_classifier.layers.1",
            "class_labels_classifier.layers.2"
        ]
    );
    let (mut model, _) = md.load_detector(0).unwrap();
    cfg.modules_to_save = vec!["layernorm".into()];
    let e = lora_io::vision::inject(&mut model, &cfg, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`layernorm` is not a head"), "{e}");
}

#[test]
fn keep_known_classes_starts_the_new_class_layer_from_the_checkpoint_rows() {
    use lora_core::models::VisionModel;
    let md0 = VisionModelDir::open(dir().join("model")).unwrap();
    let old = md0.config.labels.clone();
    assert_eq!(old.len(), 3);
    let (base, _) = md0.load_detector(0).unwrap();
    let rows = |m: &lora_core::models::yolos::Yolos| {
        let (w, _, b) = m.heads()[2].base.base();
        (w.try_to_vec().unwrap(), b.unwrap().try_to_vec().unwrap())
    };
    let (bw, bb) = rows(&base);
    let c = 24;
    // The checkpoint's second class, a new one, its first class; then "no object".
    let mut md = VisionModelDir::open(dir().join("model")).unwrap();
    md.set_labels(vec![old[1].clone(), "scratch".into(), old[0].clone()]);
    md.keep_known_classes = true;
    let (m, head) = md.load_detector(5).unwrap();
    assert_eq!(head, HeadSource::Extended(4, 3));
    let (w, b) = rows(&m);
    for (new, ckpt) in [(0, 1), (2, 0), (3, 3)] {
        assert_eq!(
            w[new * c..(new + 1) * c],
            bw[ckpt * c..(ckpt + 1) * c],
            "row {new}"
        );
        assert_eq!(b[new], bb[ckpt]);
    }
    // The new class: initialised anew (normal(0, initializer_range), bias 0).
    assert!(w[c..2 * c].iter().all(|v| v.abs() < 0.2) && w[c..2 * c].iter().any(|&v| v != 0.0));
    assert_eq!(b[1], 0.0);
    // Without the flag, the same classes get an all-new layer (transformers' semantics)...
    let mut plain = VisionModelDir::open(dir().join("model")).unwrap();
    plain.set_labels(vec![old[1].clone(), "scratch".into(), old[0].clone()]);
    let (pm, head) = plain.load_detector(5).unwrap();
    assert_eq!(
        head,
        HeadSource::Checkpoint,
        "3 classes: the checkpoint's shape"
    );
    assert_eq!(rows(&pm).0, bw);
    // ...and with it, the checkpoint's own classes in order are its head as it is.
    let mut same = VisionModelDir::open(dir().join("model")).unwrap();
    same.keep_known_classes = true;
    let (sm, head) = same.load_detector(5).unwrap();
    assert_eq!(head, HeadSource::Checkpoint);
    assert_eq!(rows(&sm).0, bw);
    // More classes: the kept rows and "no object" move to their new places.
    let mut more = VisionModelDir::open(dir().join("model")).unwrap();
    more.set_labels(
        old.iter()
            .cloned()
            .chain(["scratch".to_string(), "hole".to_string()])
            .collect(),
    );
    more.keep_known_classes = true;
    let (mm, head) = more.load_detector(5).unwrap();
    assert_eq!(head, HeadSource::Extended(4, 4));
    let (w, _) = rows(&mm);
    assert_eq!(w.len(), 6 * c);
    assert_eq!(w[..3 * c], bw[..3 * c]);
    assert_eq!(w[5 * c..], bw[3 * c..]);
}
