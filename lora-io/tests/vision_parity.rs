//! ViT and ResNet image classifiers against transformers + PEFT (fixtures written by
//! `fixtures/parity/make_vision.py`): the base model's logits, then with PEFT's adapter loaded
//! (LoRA on ViT's q/v projections or on every ResNet convolution, the head trained in full via
//! `modules_to_save`) the logits, transformers' loss and the gradient of every trainable tensor;
//! the adapter we write back holds PEFT's keys, shapes and values. ViT's checkpoint loads in both
//! namings (transformers 5's and the Hub's original one).

use lora_core::models::ImageClassifier;
use lora_core::{Tape, Tensor};
use lora_io::safetensors::SafetensorsFile;
use lora_io::vision::{adapter_tensors, load_adapter, save_adapter, HeadSource, VisionModelDir};
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity/vision")
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

fn load(case: &str, model: &str) -> Box<dyn ImageClassifier> {
    let md = VisionModelDir::open(dir(case).join(model)).unwrap();
    let (m, head) = md.load_model(0).unwrap();
    assert_eq!(head, HeadSource::Checkpoint, "{case}");
    m
}

fn check(case: &str) {
    let reference = SafetensorsFile::open(dir(case).join("reference.safetensors")).unwrap();
    let get = |k: &str| reference.read_f32(k).unwrap();
    let (px, ps) = get("pixel_values");
    let pixels = Tensor::new(px, &ps).unwrap();
    let labels: Vec<i64> = get("labels").0.iter().map(|&l| l as i64).collect();

    let mut model = load(case, "model");
    let base = model.forward(&Tape::inference(), &pixels, false).unwrap();
    let e = rel(&base.to_vec(), &get("logits_base").0);
    assert!(e < 2e-6, "{case}: base logits differ by {e:e}");
    if case == "vit" {
        let legacy = load(case, "model_legacy");
        let l = legacy.forward(&Tape::inference(), &pixels, false).unwrap();
        assert_eq!(
            l.to_vec(),
            base.to_vec(),
            "the Hub naming loads the same weights"
        );
    }

    load_adapter(model.as_mut(), &dir(case).join("adapter")).unwrap();
    let tape = Tape::new(0);
    let logits = model.forward(&tape, &pixels, true).unwrap();
    let e = rel(&logits.to_vec(), &get("logits").0);
    assert!(e < 2e-6, "{case}: adapted logits differ by {e:e}");
    let tape = Tape::new(0);
    let loss = model.loss(&tape, &pixels, &labels, true).unwrap();
    let e = rel(&[loss.scalar().unwrap()], &get("loss").0);
    assert!(e < 2e-6, "{case}: loss differs by {e:e}");
    let grads = tape.backward(&loss).unwrap();
    let trainable = adapter_tensors(model.as_ref());
    let expected = reference
        .names()
        .into_iter()
        .filter(|k| k.starts_with("grad."))
        .count();
    assert_eq!(trainable.len(), expected, "{case}: trainable tensors");
    for (key, t) in &trainable {
        let name = key.strip_prefix("base_model.model.").unwrap();
        let want = get(&format!("grad.{name}")).0;
        let e = rel(grads.get(t).unwrap(), &want);
        assert!(e < 2e-5, "{case}: gradient of {name} differs by {e:e}");
    }

    // Written back: PEFT's keys, shapes and values; the config's targets and saved head.
    let out =
        std::env::temp_dir().join(format!("lora-vision-parity-{case}-{}", std::process::id()));
    save_adapter(
        model.as_ref(),
        &lora_io::peft::PeftConfig::load(&dir(case).join("adapter")).unwrap(),
        &out,
    )
    .unwrap();
    let ours = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(dir(case).join("adapter/adapter_model.safetensors")).unwrap();
    let mut a = ours.names();
    let mut b = theirs.names();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "{case}: adapter keys");
    for k in a {
        assert_eq!(
            ours.read_f32(k).unwrap(),
            theirs.read_f32(k).unwrap(),
            "{case}: {k}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let peft: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir(case).join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for field in [
        "r",
        "lora_alpha",
        "modules_to_save",
        "peft_type",
        "use_rslora",
    ] {
        assert_eq!(cfg[field], peft[field], "{case}: {field}");
    }
    let sorted = |v: &serde_json::Value| {
        let mut t: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        sorted(&cfg["target_modules"]),
        sorted(&peft["target_modules"]),
        "{case}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn vit_matches_transformers_and_peft() {
    check("vit");
}

#[test]
fn resnet_basic_matches_transformers_and_peft() {
    check("resnet_basic");
}

#[test]
fn resnet_bottleneck_matches_transformers_and_peft() {
    check("resnet_bottleneck");
}

#[test]
fn keep_known_classes_maps_a_classifiers_rows_by_name() {
    let rows = |m: &dyn ImageClassifier| {
        let (w, _, b) = m.head().base.base();
        (w.try_to_vec().unwrap(), b.unwrap().try_to_vec().unwrap())
    };
    for case in ["vit", "resnet_basic"] {
        let path = dir(case).join("model");
        let md = VisionModelDir::open(&path).unwrap();
        let old = md.config.labels.clone();
        let c = md.config.head_in();
        let (base, _) = md.load_model(0).unwrap();
        let (bw, bb) = rows(base.as_ref());
        // The same number of classes, re-ordered, one new: without the flag the checkpoint's head
        // loads as it is (transformers' semantics: the shapes match); with it, rows move by name.
        let mut labels = old.clone();
        labels.swap(0, 1);
        labels[2] = "scratch".into();
        let mut plain = VisionModelDir::open(&path).unwrap();
        plain.set_labels(labels.clone());
        let (pm, head) = plain.load_model(0).unwrap();
        assert_eq!(head, HeadSource::Checkpoint, "{case}");
        assert_eq!(rows(pm.as_ref()).0, bw, "{case}");
        let mut keep = VisionModelDir::open(&path).unwrap();
        keep.set_labels(labels.clone());
        keep.keep_known_classes = true;
        let (km, head) = keep.load_model(0).unwrap();
        assert_eq!(
            head,
            HeadSource::Extended(old.len(), old.len() - 1),
            "{case}"
        );
        let (w, b) = rows(km.as_ref());
        for (new, ckpt) in [(0, 1), (1, 0), (3, 3)] {
            assert_eq!(
                w[new * c..(new + 1) * c],
                bw[ckpt * c..(ckpt + 1) * c],
                "{case} row {new}"
            );
            assert_eq!(b[new], bb[ckpt], "{case}");
        }
        assert_ne!(
            w[2 * c..3 * c],
            bw[2 * c..3 * c],
            "{case}: the new class starts anew"
        );
    }
}
