//! Image decoding and preprocessing against PIL and transformers' image processors (fixtures
//! written by `fixtures/parity/make_images.py`): PNG decodes to PIL's `convert("RGB")` bytes
//! exactly (gray + alpha included), JPEG within PIL's (libjpeg) decoder's rounding, and the
//! processors' `pixel_values` (ViT's exact resize, bilinear and bicubic, down and up;
//! ConvNeXT/ResNet's shortest-edge resize and center crop) from the same bytes equal to f32
//! rounding: the resampling reproduces Pillow 13's 8-bit arithmetic and pass order exactly.

use lora_io::images::{ImageProcessor, Rgb8};
use lora_io::safetensors::SafetensorsFile;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/images")
}

fn reference() -> SafetensorsFile {
    SafetensorsFile::open(dir().join("reference.safetensors")).unwrap()
}

#[test]
fn decoding_matches_pil() {
    let r = reference();
    for name in ["wide.png", "tall.png", "gray_alpha.png", "photo.jpg"] {
        let img = Rgb8::open(&dir().join(name)).unwrap();
        let (want, shape) = r.read_f32(&format!("rgb.{name}")).unwrap();
        assert_eq!(shape, [img.height, img.width, 3], "{name}");
        let worst = img
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f32 - b).abs())
            .fold(0.0f32, f32::max);
        // PNG is lossless; two JPEG decoders may round the IDCT and chroma upsampling
        // differently (5 levels at most on this file with image 0.25's decoder).
        let bound = if name.ends_with(".png") { 0.0 } else { 8.0 };
        assert!(worst <= bound, "{name}: differs by {worst} levels");
    }
}

#[test]
fn processors_match_transformers() {
    let r = reference();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let image = case["image"].as_str().unwrap();
        let defaults = if case["processor"].as_str().unwrap().starts_with("ConvNext") {
            ImageProcessor::convnext_class()
        } else {
            ImageProcessor::vit(224, 224)
        };
        let p = ImageProcessor::from_json(std::path::Path::new(key), &case["config"], &defaults)
            .unwrap();
        // The processor's input: PIL's RGB bytes (so a JPEG decoder's rounding is not counted).
        let (rgb, s) = r.read_f32(&format!("rgb.{image}")).unwrap();
        let img = Rgb8::new(s[0], s[1], rgb.iter().map(|&v| v as u8).collect()).unwrap();
        let (got, h, w) = p.pixels(&img);
        let (want, ws) = r.read_f32(key).unwrap();
        assert_eq!(ws, [3, h, w], "{key}: shape");
        // The same 8-bit pixels, normalised the same way: only f32 rounding may differ.
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5,
                "{key}: value {i} is {a}, transformers {b}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn convnext_reads_a_bare_size_as_the_shortest_edge() {
    use lora_io::images::Resize;
    let p = std::path::Path::new("preprocessor_config.json");
    let v = serde_json::json!({"image_processor_type": "ConvNextImageProcessor", "size": 224, "crop_pct": 0.8});
    let proc = ImageProcessor::from_json(p, &v, &ImageProcessor::convnext_class()).unwrap();
    assert_eq!(
        proc.resize,
        Some(Resize::ShortestEdgeCrop {
            edge: 224,
            crop_pct: 0.8
        })
    );
    // What it leaves out is the class's: bicubic, mean and std 0.5.
    assert_eq!(proc.filter, lora_io::images::Filter::Bicubic);
    assert_eq!(proc.normalize, Some(([0.5; 3], [0.5; 3])));
    // int(224 / 0.8) = 280 as Python computes it (an f32 crop_pct gave 279): a 100 x 50 image's
    // short side goes to 280 before the 224 crop.
    let img = Rgb8::new(50, 100, vec![7; 50 * 100 * 3]).unwrap();
    let r = proc.resized(&img);
    assert_eq!((r.height, r.width), (224, 224));
    let v = serde_json::json!({"image_processor_type": "ViTImageProcessor", "size": 32});
    let vit = ImageProcessor::from_json(p, &v, &ImageProcessor::vit(224, 224)).unwrap();
    assert_eq!(
        vit.resize,
        Some(Resize::Exact(32, 32)),
        "ViT's bare size is a square"
    );
}

#[test]
fn yolos_processor_settings_are_read_or_refused_by_name() {
    use lora_io::images::{ImageProcessor, Resize};
    let defaults = ImageProcessor {
        resize: Some(Resize::ShortestLongest {
            shortest: 800,
            longest: 1333,
        }),
        ..ImageProcessor::vit(1, 1)
    };
    let p = std::path::Path::new("preprocessor_config.json");
    let read = |v: serde_json::Value| ImageProcessor::from_json(p, &v, &defaults);
    let y = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"image_processor_type": "YolosImageProcessor"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    // hustvl/yolos-tiny's form: a bare size and max_size.
    assert_eq!(
        read(y(serde_json::json!({"size": 512, "max_size": 1333})))
            .unwrap()
            .resize,
        Some(Resize::ShortestLongest {
            shortest: 512,
            longest: 1333
        })
    );
    assert_eq!(
        read(y(serde_json::json!({"size": 512}))).unwrap().resize,
        Some(Resize::ShortestLongest {
            shortest: 512,
            longest: 1333
        })
    );
    assert_eq!(
        read(y(serde_json::json!({}))).unwrap().resize,
        defaults.resize,
        "the class defaults"
    );
    for (bad, field) in [
        (serde_json::json!({"do_pad": false}), "do_pad"),
        (
            serde_json::json!({"pad_size": {"height": 64, "width": 64}}),
            "do_pad",
        ),
        (serde_json::json!({"format": "coco_panoptic"}), "format"),
        (serde_json::json!({"size": {"shortest_edge": 512}}), "size"),
        (serde_json::json!({"size": 0}), "size"),
    ] {
        let e = read(y(bad.clone())).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("preprocessor_config.json"),
            "{bad}: {e}"
        );
    }
}
