//! Detection runs end to end with the tiny YOLOS of the parity fixtures on a generated YOLO tree
//! (coloured rectangles: the class is the colour): the training loss falls, the run writes a PEFT
//! adapter with both heads and a config with the data's classes, and the adapter reloads to the
//! same evaluation (loss and pycocotools' mAP).

use lora_io::images::Rgb8;
use lora_io::peft::Targets;
use lora_train::vision::data::Augment;
use lora_train::vision::detect::{
    evaluate_detection, load_detector_for_inference, train_detection,
};
use lora_train::vision::detect_data::read_yolo;
use lora_train::vision::{VisionEvent, VisionTrainConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-dettrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A 32x32 or 32x48 gray image (batches mix both: YOLOS's processor pads them) with one or two
/// rectangles; class 0 red, class 1 blue.
fn sample(root: &Path, split: &str, i: usize) {
    let mut r = lora_kernels::rng::Rng::new(i as u64 * 7 + split.len() as u64);
    let (h, w) = (32usize, if i % 3 == 0 { 48 } else { 32 });
    let mut data = vec![100u8; h * w * 3];
    let mut lines = String::new();
    for k in 0..1 + i % 2 {
        let c = (i + k) % 2;
        let (bw, bh) = (
            8 + (r.next_u64() % 10) as usize,
            8 + (r.next_u64() % 10) as usize,
        );
        let (x0, y0) = (
            (r.next_u64() as usize) % (w - bw),
            (r.next_u64() as usize) % (h - bh),
        );
        for y in y0..y0 + bh {
            for x in x0..x0 + bw {
                let p = (y * w + x) * 3;
                data[p..p + 3].copy_from_slice(if c == 0 {
                    &[230, 30, 30]
                } else {
                    &[30, 30, 230]
                });
            }
        }
        lines += &format!(
            "{c} {} {} {} {}\n",
            (x0 as f32 + bw as f32 / 2.0) / w as f32,
            (y0 as f32 + bh as f32 / 2.0) / h as f32,
            bw as f32 / w as f32,
            bh as f32 / h as f32
        );
    }
    let img = root.join(format!("images/{split}/{i:03}.png"));
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    Rgb8::new(h, w, data).unwrap().save_png(&img).unwrap();
    let lab = root.join(format!("labels/{split}/{i:03}.txt"));
    std::fs::create_dir_all(lab.parent().unwrap()).unwrap();
    std::fs::write(lab, lines).unwrap();
}

#[test]
fn yolos_learns_a_yolo_tree() {
    let data = tmp("data");
    for i in 0..12 {
        sample(&data, "train", i);
    }
    for i in 0..4 {
        sample(&data, "val", i);
    }
    std::fs::write(
        data.join("data.yaml"),
        "train: images/train\nval: images/val\nnames: [red, blue]\n",
    )
    .unwrap();
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/vision/yolos/model");
    let out = tmp("out");
    let cfg = VisionTrainConfig {
        rank: 4,
        alpha: 8.0,
        targets: Targets::List(vec!["query".into(), "value".into()]),
        epochs: 20,
        batch_size: 4,
        lr: 5e-3,
        image_size: Some(32),
        augment: Augment {
            flip: true,
            min_scale: 0.9,
        },
        ..VisionTrainConfig::new(&model, &data.join("data.yaml"), &out)
    };
    let mut losses = Vec::new();
    let (sum, before, after) = train_detection(
        &cfg,
        false,
        &mut |e| {
            if let VisionEvent::Step(_, _, l, _) = e {
                losses.push(l)
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(sum.steps, 60);
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.8 * first, "training loss {first} -> {last}");
    let (b, a) = (before.unwrap(), after.unwrap());
    assert!(a.loss < b.loss, "eval loss {} -> {}", b.loss, a.loss);
    assert!((0.0..=1.0).contains(&a.map) && (0.0..=1.0).contains(&a.map50));
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        c["modules_to_save"],
        serde_json::json!(["class_labels_classifier", "bbox_predictor"])
    );
    assert_eq!(c["target_modules"], serde_json::json!(["query", "value"]));
    // Reloaded: the same evaluation.
    // The run's processor (YOLOS's, from its preprocessor_config.json: --image-size 32 is the
    // shortest edge, the class default's longest edge 1333/800 in proportion) comes with it.
    let (labels, det, proc) = load_detector_for_inference(&model, Some(&out)).unwrap();
    assert_eq!(labels, ["red", "blue"]);
    assert_eq!(
        proc.resize,
        Some(lora_io::images::Resize::ShortestLongest {
            shortest: 32,
            longest: 53
        })
    );
    let (_, val) = read_yolo(&data.join("data.yaml")).unwrap();
    let r = evaluate_detection(&det, &val.unwrap(), &proc, lora_core::Device::Cpu).unwrap();
    assert!(
        (r.loss - a.loss).abs() < 1e-9 && r.map == a.map,
        "{r:?} vs {a:?}"
    );
    for d in [data, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_new_class_layer_that_would_not_train_is_refused() {
    let data = tmp("frozen-head");
    for i in 0..2 {
        sample(&data, "train", i);
    }
    std::fs::write(
        data.join("data.yaml"),
        "train: images/train\nnames: [red, blue]\n",
    )
    .unwrap();
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/vision/yolos/model");
    let out = tmp("frozen-head-out");
    for keep in [false, true] {
        let cfg = VisionTrainConfig {
            modules_to_save: Some(vec!["bbox_predictor".into()]),
            keep_classes: keep,
            image_size: Some(32),
            ..VisionTrainConfig::new(&model, &data.join("data.yaml"), &out)
        };
        let e = train_detection(&cfg, false, &mut |_| {}, &AtomicBool::new(false))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("modules-to-save") && e.contains("class_labels_classifier"),
            "{e}"
        );
        assert!(!out.exists(), "nothing written");
    }
    std::fs::remove_dir_all(data).unwrap();
}

#[test]
fn trains_from_coco_json_with_its_validation_file() {
    use lora_train::vision::detect_data::read_yolo;
    let data = tmp("coco-data");
    for i in 0..6 {
        sample(&data, "train", i);
    }
    for i in 0..2 {
        sample(&data, "val", i);
    }
    std::fs::write(
        data.join("data.yaml"),
        "train: images/train\nval: images/val\nnames: [red, blue]\n",
    )
    .unwrap();
    // The same tree as COCO files (Roboflow's layout: the JSON beside its images).
    let (train, val) = read_yolo(&data.join("data.yaml")).unwrap();
    let coco = |set: &lora_train::vision::detect_data::DetectionSet, dir: &Path| {
        let (mut images, mut anns) = (vec![], vec![]);
        for (i, it) in set.items.iter().enumerate() {
            let name = it.image.file_name().unwrap().to_string_lossy().to_string();
            std::fs::copy(&it.image, dir.join(&name)).unwrap();
            let (h, w) = (it.size.0 as f64, it.size.1 as f64);
            images.push(serde_json::json!({"id": i, "file_name": name, "width": w, "height": h}));
            for (c, b) in it.classes.iter().zip(&it.boxes) {
                let (bw, bh) = (b[2] as f64 * w, b[3] as f64 * h);
                anns.push(serde_json::json!({"id": anns.len(), "image_id": i, "category_id": c,
                    "bbox": [b[0] as f64 * w - bw / 2.0, b[1] as f64 * h - bh / 2.0, bw, bh], "iscrowd": 0}));
            }
        }
        let j = dir.join("_annotations.coco.json");
        let cats = serde_json::json!([{"id": 0, "name": "red"}, {"id": 1, "name": "blue"}]);
        std::fs::write(
            &j,
            serde_json::json!({"images": images, "annotations": anns, "categories": cats})
                .to_string(),
        )
        .unwrap();
        j
    };
    let (tdir, vdir) = (data.join("coco/train"), data.join("coco/valid"));
    std::fs::create_dir_all(&tdir).unwrap();
    std::fs::create_dir_all(&vdir).unwrap();
    let (tj, vj) = (coco(&train, &tdir), coco(&val.unwrap(), &vdir));
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/vision/yolos/model");
    let out = tmp("coco-out");
    let cfg = VisionTrainConfig {
        epochs: 2,
        batch_size: 3,
        image_size: Some(32),
        eval_data: Some(vj.clone()),
        ..VisionTrainConfig::new(&model, &tj, &out)
    };
    let (sum, before, after) =
        train_detection(&cfg, false, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(sum.steps, 4);
    assert_eq!(before.unwrap().images, 2);
    assert_eq!(after.unwrap().images, 2);
    assert!(out.join("adapter_model.safetensors").is_file());
    // --out among the images is refused before anything is written.
    let inside = VisionTrainConfig {
        out: tdir.join("run"),
        ..cfg.clone()
    };
    let e = train_detection(&inside, false, &mut |_| {}, &AtomicBool::new(false))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--out"), "{e}");
    assert!(!tdir.join("run").exists());
    for d in [data, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
