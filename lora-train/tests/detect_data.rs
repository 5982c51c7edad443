//! Detection data: a YOLO tree (data.yaml, images/, labels/) and COCO JSON read into normalised
//! boxes; every kind of bad label is refused with the file and line named.

use lora_io::images::Rgb8;
use lora_train::vision::detect_data::{label_path, parse_labels, read_coco, read_yolo};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-detect-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png(path: &Path, h: usize, w: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    Rgb8::new(h, w, vec![128; h * w * 3])
        .unwrap()
        .save_png(path)
        .unwrap();
}

fn tree(root: &Path, yaml: &str) -> PathBuf {
    png(&root.join("images/train/a.png"), 20, 40);
    png(&root.join("images/train/b.png"), 10, 10);
    png(&root.join("images/val/c.png"), 16, 16);
    std::fs::create_dir_all(root.join("labels/train")).unwrap();
    std::fs::create_dir_all(root.join("labels/val")).unwrap();
    std::fs::write(
        root.join("labels/train/a.txt"),
        "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.5 0.5\n",
    )
    .unwrap();
    // b has no label file: a background image.
    std::fs::write(root.join("labels/val/c.txt"), "1 0.5 0.5 1 1\n").unwrap();
    let y = root.join("data.yaml");
    std::fs::write(&y, yaml).unwrap();
    y
}

#[test]
fn reads_a_yolo_tree() {
    let root = tmp("yolo");
    let y = tree(
        &root,
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: scratch\n  1: dent\n",
    );
    let (train, val) = read_yolo(&y).unwrap();
    assert_eq!(train.classes, ["scratch", "dent"]);
    assert_eq!(train.items.len(), 2);
    assert_eq!(train.items[0].size, (20, 40));
    assert_eq!(train.items[0].classes, [0, 1]);
    assert_eq!(train.items[0].boxes[1], [0.25, 0.25, 0.5, 0.5]);
    assert!(
        train.items[1].boxes.is_empty(),
        "an image without labels is a background image"
    );
    assert_eq!(val.unwrap().items[0].classes, [1]);
    // The list form of names, and nc.
    std::fs::write(&y, "train: images/train\nnc: 2\nnames: [scratch, dent]\n").unwrap();
    let (t, v) = read_yolo(&y).unwrap();
    assert_eq!(t.classes, ["scratch", "dent"]);
    assert!(v.is_none());
    std::fs::write(&y, "train: images/train\nnc: 3\nnames: [scratch, dent]\n").unwrap();
    let e = read_yolo(&y).unwrap_err().to_string();
    assert!(e.contains("nc is 3"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn bad_labels_are_named_with_their_line() {
    let p = Path::new("labels/x.txt");
    let e = |text: &str| parse_labels(text, p, 2).unwrap_err().to_string();
    assert!(e("0 0.5 0.5 0.2\n").contains("line 1: 4 fields"));
    let s = e("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2 0.1\n");
    assert!(
        s.contains("line 2: 6 fields") && s.contains("segmentation"),
        "{s}"
    );
    assert!(e("2 0.5 0.5 0.2 0.2\n").contains("class 2 is past the 2 names"));
    assert!(e("x 0.5 0.5 0.2 0.2\n").contains("not a class id"));
    assert!(e("0 1.2 0.5 0.4 0.2\n").contains("outside [0, 1]"));
    assert!(e("0 0.5 0.5 0 0.2\n").contains("outside [0, 1]"));
    // Corners past the border are clipped: 0.9 +- 0.2 -> [0.7, 1.0].
    let (_, b) = parse_labels("0 0.9 0.5 0.4 0.2\n", p, 2).unwrap();
    assert!(
        (b[0][0] - 0.85).abs() < 1e-6 && (b[0][2] - 0.3).abs() < 1e-6,
        "{:?}",
        b[0]
    );
    assert!(e("0 0.5 nan 0.1 0.2\n").contains("not a number"));
    assert!(e("0 0.5 0.5 0.2 0.2\n1 1.2 0.5 0.2 0.2\n").contains("labels/x.txt: line 2"));
    // Blank lines are fine.
    assert_eq!(
        parse_labels("\n0 0.5 0.5 0.2 0.2\n\n", p, 2).unwrap().0,
        [0]
    );
    assert_eq!(
        label_path(Path::new("/d/images/train/a.jpg")),
        Path::new("/d/labels/train/a.txt")
    );
}

#[test]
fn bad_trees_are_refused() {
    let root = tmp("yolo-bad");
    let y = tree(&root, "train: images/train\nnames: [a, b]\n");
    std::fs::write(root.join("labels/train/ghost.txt"), "0 0.5 0.5 0.1 0.1\n").unwrap();
    let e = read_yolo(&y).unwrap_err().to_string();
    assert!(
        e.contains("ghost.txt") && e.contains("without its image"),
        "{e}"
    );
    std::fs::remove_file(root.join("labels/train/ghost.txt")).unwrap();
    std::fs::write(root.join("images/train/z.png"), b"nope").unwrap();
    let e = read_yolo(&y).unwrap_err().to_string();
    assert!(e.contains("z.png"), "{e}");
    std::fs::remove_file(root.join("images/train/z.png")).unwrap();
    std::fs::write(&y, "train: images/nowhere\nnames: [a]\n").unwrap();
    let e = read_yolo(&y).unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");
    std::fs::write(&y, "train: [unclosed\n").unwrap();
    let e = read_yolo(&y).unwrap_err().to_string();
    assert!(e.contains("invalid YAML"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn reads_coco_json() {
    let root = tmp("coco");
    png(&root.join("img/1.png"), 50, 100);
    let json = serde_json::json!({
        "images": [{"id": 7, "file_name": "1.png", "width": 100, "height": 50}],
        "categories": [{"id": 3, "name": "dent"}, {"id": 1, "name": "scratch"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 50], "iscrowd": 1}
        ]
    });
    let j = root.join("ann.json");
    std::fs::write(&j, json.to_string()).unwrap();
    let s = read_coco(&j, &root.join("img")).unwrap();
    assert_eq!(
        s.classes,
        ["scratch", "dent"],
        "classes in category-id order"
    );
    let it = &s.items[0];
    assert_eq!(it.classes, [1, 0]);
    assert_eq!(it.boxes[0], [0.2, 0.2, 0.2, 0.2]);
    assert_eq!(it.crowd, [false, true]);
    let mut bad = json.clone();
    bad["annotations"][0]["bbox"] = serde_json::json!([90, 5, 20, 10]);
    std::fs::write(&j, bad.to_string()).unwrap();
    let e = read_coco(&j, &root.join("img")).unwrap_err().to_string();
    assert!(
        e.contains("annotations[0]") && e.contains("not inside"),
        "{e}"
    );
    let mut bad = json.clone();
    bad["annotations"][1]["category_id"] = serde_json::json!(9);
    std::fs::write(&j, bad.to_string()).unwrap();
    let e = read_coco(&j, &root.join("img")).unwrap_err().to_string();
    assert!(
        e.contains("annotations[1]") && e.contains("category"),
        "{e}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn coco_files_find_their_images_in_either_common_layout() {
    use lora_train::vision::detect_data::{coco_image_dir, read_detection_data};
    let root = tmp("coco-layouts");
    let ann = |classes: &[(i64, &str)], file: &str| {
        serde_json::json!({
            "images": [{"id": 1, "file_name": file, "width": 20, "height": 10}],
            "categories": classes.iter().map(|(i, n)| serde_json::json!({"id": i, "name": n})).collect::<Vec<_>>(),
            "annotations": [{"id": 1, "image_id": 1, "category_id": classes[0].0, "bbox": [2, 2, 4, 4], "iscrowd": 0}]
        })
        .to_string()
    };
    // COCO's own: annotations/instances_<split>.json, images in <split>/.
    png(&root.join("coco/train2017/a.png"), 10, 20);
    png(&root.join("coco/val2017/b.png"), 10, 20);
    std::fs::create_dir_all(root.join("coco/annotations")).unwrap();
    let (tj, vj) = (
        root.join("coco/annotations/instances_train2017.json"),
        root.join("coco/annotations/instances_val2017.json"),
    );
    std::fs::write(&tj, ann(&[(1, "dent"), (2, "scratch")], "a.png")).unwrap();
    std::fs::write(&vj, ann(&[(1, "dent"), (2, "scratch")], "b.png")).unwrap();
    assert_eq!(coco_image_dir(&tj), root.join("coco/train2017"));
    let (train, val) = read_detection_data(&tj, Some(&vj)).unwrap();
    assert_eq!(train.items[0].image, root.join("coco/train2017/a.png"));
    assert_eq!(val.unwrap().items[0].image, root.join("coco/val2017/b.png"));
    // Roboflow's: <split>/_annotations.coco.json beside the images.
    png(&root.join("rf/train/c.png"), 10, 20);
    let rj = root.join("rf/train/_annotations.coco.json");
    std::fs::write(&rj, ann(&[(0, "dent"), (1, "scratch")], "c.png")).unwrap();
    let (train, val) = read_detection_data(&rj, None).unwrap();
    assert_eq!(train.items[0].image, root.join("rf/train/c.png"));
    assert!(val.is_none());
    // A validation file with other categories, or --eval-data beside a data.yaml: refused.
    let other = root.join("rf/other.json");
    std::fs::write(&other, ann(&[(0, "dent"), (1, "rust")], "train/c.png")).unwrap();
    let e = read_detection_data(&rj, Some(&other))
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.json") && e.contains("rust"), "{e}");
    let e = read_detection_data(&root.join("data.yaml"), Some(&other))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--eval-data"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}
