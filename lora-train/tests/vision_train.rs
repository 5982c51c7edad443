//! Image classification runs end to end on generated ImageFolder trees with the tiny ViT and
//! ResNet of the parity fixtures: the run learns (held-out loss falls, accuracy does not drop),
//! writes a PEFT adapter with the trained head and a config with the dataset's classes, reloads
//! to the same evaluation, repeats bit for bit with the same seed; bad trees are refused with
//! the file or folder named.

use lora_core::Device;
use lora_io::images::Rgb8;
use lora_io::peft::Targets;
use lora_train::vision::data::{find_splits, Augment};
use lora_train::vision::{evaluate, load_for_inference, train_vision, VisionTrainConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity/vision")
        .join(case)
        .join("model")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-vision-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Class `c` of 3: one colour channel raised, the third class with its top half inverted.
fn image(c: usize, i: usize, seed: u64) -> Rgb8 {
    let mut r = lora_kernels::rng::Rng::new(seed ^ (c as u64) << 20 ^ i as u64);
    let (h, w) = (14 + (i % 5) * 3, 16 + (i % 4) * 4);
    let mut data = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for _ in 0..w {
            for ch in 0..3 {
                let mut v = (r.uniform() * 80.0) as i32 + if ch == c % 3 { 150 } else { 0 };
                if c == 2 && y < h / 2 {
                    v = 255 - v;
                }
                data.push(v.clamp(0, 255) as u8);
            }
        }
    }
    Rgb8::new(h, w, data).unwrap()
}

fn tree(root: &Path, per_class: (usize, usize)) {
    for (split, n) in [("train", per_class.0), ("val", per_class.1)] {
        for (c, name) in ["cat", "dog", "fox"].iter().enumerate() {
            let d = root.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                image(c, i, if split == "train" { 1 } else { 2 })
                    .save_png(&d.join(format!("{i:03}.png")))
                    .unwrap();
            }
        }
    }
}

fn run(
    model: &Path,
    data: &Path,
    out: &Path,
    targets: &[&str],
) -> lora_train::vision::VisionSummary {
    let cfg = VisionTrainConfig {
        rank: 4,
        alpha: 8.0,
        targets: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        epochs: 4,
        batch_size: 8,
        lr: 5e-3,
        ..VisionTrainConfig::new(model, data, out)
    };
    train_vision(&cfg, true, &mut |_| {}, &AtomicBool::new(false)).unwrap()
}

fn learns(case: &str, targets: &[&str]) {
    let data = tmp(&format!("data-{case}"));
    tree(&data, (12, 5));
    let out = tmp(&format!("out-{case}"));
    let s = run(&fixture(case), &data, &out, targets);
    let (b, a) = (s.eval_before.unwrap(), s.eval_after.unwrap());
    assert_eq!(a.examples, 15);
    assert!(
        a.loss < 0.8 * b.loss,
        "{case}: eval loss {} -> {}",
        b.loss,
        a.loss
    );
    assert!(
        a.accuracy >= b.accuracy,
        "{case}: accuracy {} -> {}",
        b.accuracy,
        a.accuracy
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "metrics.jsonl",
        "loss.svg",
    ] {
        assert!(out.join(f).exists(), "{case}: {f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "cat", "1": "dog", "2": "fox"})
    );
    assert_eq!(cfg["label2id"]["fox"], 2);
    // Reloaded from the files: the same evaluation.
    let (_, model, proc) = load_for_inference(&fixture(case), Some(&out)).unwrap();
    let (_, val) = find_splits(&data).unwrap();
    let r = evaluate(model.as_ref(), &val.unwrap(), &proc, 8, Device::Cpu).unwrap();
    assert_eq!(r, a, "{case}: reloaded adapter");
    // Same seed, same adapter, bit for bit.
    let out2 = tmp(&format!("out2-{case}"));
    run(&fixture(case), &data, &out2, targets);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out2.join("adapter_model.safetensors")).unwrap(),
        "{case}: a second run with the same seed"
    );
    for d in [data, out, out2] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn vit_learns_an_imagefolder_tree() {
    learns("vit", &["q_proj", "v_proj"]);
}

#[test]
fn resnet_learns_with_conv_lora() {
    learns("resnet_basic", &["convolution"]);
}

#[test]
fn original_vit_target_names_select_the_same_layers() {
    let data = tmp("data-legacy-targets");
    tree(&data, (2, 1));
    let out = tmp("out-legacy-targets");
    run(&fixture("vit"), &data, &out, &["query", "value"]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    // Written as current PEFT over transformers 5 names the modules.
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // An old-naming regex that picks one layer is written as the adapted modules' paths (their
    // leaf names would select every layer), and the adapter reloads.
    let out2 = tmp("out-legacy-regex");
    let cfg2 = VisionTrainConfig {
        rank: 4,
        targets: Targets::Regex(r".*layer\.1\..*(query|value)".into()),
        epochs: 1,
        ..VisionTrainConfig::new(&fixture("vit"), &data, &out2)
    };
    train_vision(&cfg2, true, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    let c2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        c2["target_modules"],
        serde_json::json!([
            "vit.layers.1.attention.q_proj",
            "vit.layers.1.attention.v_proj"
        ])
    );
    load_for_inference(&fixture("vit"), Some(&out2)).unwrap();
    std::fs::remove_dir_all(out2).unwrap();
    for d in [data, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

fn train_err(data: &Path, out: &Path) -> String {
    let cfg = VisionTrainConfig {
        epochs: 1,
        augment: Augment::NONE,
        ..VisionTrainConfig::new(&fixture("vit"), data, out)
    };
    train_vision(&cfg, false, &mut |_| {}, &AtomicBool::new(false))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_trees_are_refused_by_name() {
    let data = tmp("data-bad");
    tree(&data, (2, 1));
    let out = tmp("out-bad");
    // An empty class folder.
    std::fs::create_dir_all(data.join("train/zebra")).unwrap();
    let e = train_err(&data, &out);
    assert!(e.contains("zebra") && e.contains("holds no images"), "{e}");
    std::fs::remove_dir_all(data.join("train/zebra")).unwrap();
    // A validation class the training split lacks.
    std::fs::create_dir_all(data.join("val/owl")).unwrap();
    image(0, 0, 3)
        .save_png(&data.join("val/owl/0.png"))
        .unwrap();
    let e = train_err(&data, &out);
    assert!(
        e.contains("class `owl` is not among the training classes"),
        "{e}"
    );
    std::fs::remove_dir_all(data.join("val/owl")).unwrap();
    // A file that is not an image.
    std::fs::write(data.join("train/dog/broken.png"), b"not a png").unwrap();
    let e = train_err(&data, &out);
    assert!(e.contains("broken.png") && e.contains("image"), "{e}");
    std::fs::remove_file(data.join("train/dog/broken.png")).unwrap();
    // A truncated image: its header reads, its pixels do not; the run had taken --out and
    // removes what it wrote there.
    let good = std::fs::read(data.join("train/dog/000.png")).unwrap();
    std::fs::write(data.join("train/dog/cut.png"), &good[..good.len() / 2]).unwrap();
    let e = train_err(&data, &out);
    assert!(e.contains("cut.png") && e.contains("cannot decode"), "{e}");
    assert!(!out.exists(), "a failed run leaves no output behind");
    std::fs::remove_file(data.join("train/dog/cut.png")).unwrap();
    // A folder without class folders.
    let flat = tmp("data-flat");
    std::fs::create_dir_all(&flat).unwrap();
    image(0, 0, 3).save_png(&flat.join("0.png")).unwrap();
    let e = train_err(&flat, &out);
    assert!(e.contains("no class folders"), "{e}");
    // An output inside the data.
    let e = train_err(&data, &data.join("train/out"));
    assert!(e.contains("--out"), "{e}");
    // Nothing was written for any of them.
    assert!(!out.exists());
    // ViT's position table fixes the size.
    let cfg = VisionTrainConfig {
        image_size: Some(16),
        ..VisionTrainConfig::new(&fixture("vit"), &data, &out)
    };
    let e = train_vision(&cfg, false, &mut |_| {}, &AtomicBool::new(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--image-size") && e.contains("12x12"), "{e}");
    for d in [data, flat] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
