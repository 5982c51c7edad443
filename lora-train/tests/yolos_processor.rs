//! YOLOS's image processor against transformers' (`fixtures/parity/make_yolos_processor.py`,
//! PIL backend): the output size of 408 image sizes, and a batch of three differently sized
//! images with COCO boxes through the shortest/longest-edge resize (and the legacy `size` +
//! `max_size` form, and a fixed size), rescale, normalisation and padding: the padded pixel
//! values and the normalised boxes rescaled to the padded size.

use lora_io::images::{yolos_size, ImageProcessor, Rgb8};
use lora_io::safetensors::SafetensorsFile;
use lora_train::vision::data::Augment;
use lora_train::vision::detect::{load_batch, yolos_processor_defaults};
use lora_train::vision::detect_data::DetItem;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn cases() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir().join("yolos_processor/cases.json")).unwrap())
        .unwrap()
}

#[test]
fn output_sizes_match_transformers() {
    let c = cases();
    let sizes = c["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 408);
    let mut zero = 0;
    for s in sizes {
        let v: Vec<usize> = s
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        // A side of 0 (an extreme aspect ratio): transformers fails on it later; refused here.
        let want = (v[4] > 0 && v[5] > 0).then_some((v[4], v[5]));
        zero += want.is_none() as usize;
        assert_eq!(
            yolos_size((v[0], v[1]), v[2], v[3]),
            want,
            "image {}x{}, shortest {} longest {}",
            v[0],
            v[1],
            v[2],
            v[3]
        );
    }
    assert!(zero > 0, "the fixture has sizes with a zero side");
    // Under 16 pixels a side there is no size (transformers fails on it).
    assert_eq!(yolos_size((10, 40), 8, 1333), None);
}

#[test]
fn batches_match_transformers() {
    let c = cases();
    let reference =
        SafetensorsFile::open(dir().join("yolos_processor/reference.safetensors")).unwrap();
    let names: Vec<&str> = c["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // The processor's input is PIL's RGB (fixtures/parity/images/reference.safetensors), saved
    // as PNG: a JPEG decoder's rounding is not what this test measures (lora-io's images tests
    // do).
    let rgb = SafetensorsFile::open(dir().join("images/reference.safetensors")).unwrap();
    let tmp = std::env::temp_dir().join(format!("lora-yolos-processor-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let items: Vec<DetItem> = names
        .iter()
        .zip(c["annotations"].as_array().unwrap())
        .map(|(n, a)| {
            let (v, shape) = rgb.read_f32(&format!("rgb.{n}")).unwrap();
            let img = Rgb8::new(shape[0], shape[1], v.iter().map(|&x| x as u8).collect()).unwrap();
            let image = tmp.join(format!("{n}.png"));
            img.save_png(&image).unwrap();
            let (hh, ww) = (img.height as f64, img.width as f64);
            let anns = a["annotations"].as_array().unwrap();
            let mut item = DetItem {
                image,
                size: (img.height, img.width),
                classes: vec![],
                boxes: vec![],
                crowd: vec![],
            };
            for an in anns {
                let b: Vec<f64> = an["bbox"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                item.classes
                    .push(an["category_id"].as_u64().unwrap() as usize);
                item.boxes.push([
                    ((b[0] + b[2] / 2.0) / ww) as f32,
                    ((b[1] + b[3] / 2.0) / hh) as f32,
                    (b[2] / ww) as f32,
                    (b[3] / hh) as f32,
                ]);
                item.crowd.push(false);
            }
            item
        })
        .collect();
    let refs: Vec<&DetItem> = items.iter().collect();
    let path = dir().join("yolos_processor/cases.json");
    for p in c["processors"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let proc =
            ImageProcessor::from_json(&path, &p["config"], &yolos_processor_defaults()).unwrap();
        // The processor's own saved form reads back the same.
        let saved =
            ImageProcessor::from_json(&path, &p["processor_dict"], &yolos_processor_defaults())
                .unwrap();
        assert_eq!(proc, saved, "{name}");
        let (px, shape, objects) = load_batch(&refs, &proc, &Augment::NONE, &|_| 0).unwrap();
        let (want, want_shape) = reference.read_f32(&format!("pixel_values.{name}")).unwrap();
        assert_eq!(shape.to_vec(), want_shape, "{name}");
        let worst = px
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 2e-6,
            "{name}: pixel values differ by up to {worst}"
        );
        for (i, o) in objects.iter().enumerate() {
            let (want, _) = reference.read_f32(&format!("boxes.{name}.{i}")).unwrap();
            let got: Vec<f32> = o.boxes.iter().flatten().copied().collect();
            assert_eq!(got.len(), want.len(), "{name} image {i}");
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{name} image {i}: box {got:?} vs {want:?}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
