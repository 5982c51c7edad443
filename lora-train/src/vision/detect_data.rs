//! Object detection data: the YOLO layout that labelling and training tools write (a
//! `data.yaml` naming the `train` / `val` image folders and the class `names`; for
//! `.../images/<split>/x.jpg` the labels in `.../labels/<split>/x.txt`, one `class cx cy w h`
//! line per object, normalised to the image; corners past the border are clipped) and COCO
//! JSON (`images`, `annotations` with pixel `[x, y, w, h]` boxes, `categories`).
//!
//! Every problem is an error naming the file (and line): a label line without exactly five
//! fields, a class id past `names`, a value outside `[0, 1]` or no area, a label file without
//! its image, an image that is not one. An image without a label file has no objects (a
//! background image), as in YOLO tools.

use super::data::IMAGE_EXTENSIONS;
use crate::{Result, TrainError};
use lora_io::images::Rgb8;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// One image and its objects (class index, `(cx, cy, w, h)` normalised to the image; crowd
/// regions, from COCO, are kept for evaluation and left out of training).
#[derive(Clone, Debug, PartialEq)]
pub struct DetItem {
    /// The image file.
    pub image: PathBuf,
    /// `(height, width)` in pixels.
    pub size: (usize, usize),
    /// Class of each object.
    pub classes: Vec<usize>,
    /// Its box.
    pub boxes: Vec<[f32; 4]>,
    /// Whether it is a crowd region.
    pub crowd: Vec<bool>,
}

/// A detection split.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectionSet {
    /// The images' folder.
    pub root: PathBuf,
    /// Class names, by index.
    pub classes: Vec<String>,
    /// The images.
    pub items: Vec<DetItem>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The class names of `names:` (a list, or a map from ids `0..n`).
fn names(y: &Yaml, path: &Path) -> Result<Vec<String>> {
    match y {
        Yaml::Array(a) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(path, format!("names: {v:?} is not a class name")))
            })
            .collect(),
        Yaml::Hash(h) => {
            let mut v: Vec<(i64, String)> = Vec::new();
            for (k, n) in h {
                let id = k
                    .as_i64()
                    .ok_or_else(|| err(path, format!("names: key {k:?} is not a class id")))?;
                let n = n
                    .as_str()
                    .ok_or_else(|| err(path, format!("names: class {id} has no name")))?;
                v.push((id, n.to_string()));
            }
            v.sort();
            for (i, (id, _)) in v.iter().enumerate() {
                if *id != i as i64 {
                    return Err(err(
                        path,
                        format!("names: class ids must be 0 to {}, found {id}", v.len() - 1),
                    ));
                }
            }
            Ok(v.into_iter().map(|(_, n)| n).collect())
        }
        Yaml::BadValue => Err(err(path, "names: missing (the class names)")),
        other => Err(err(
            path,
            format!("names: expected a list or a map, got {other:?}"),
        )),
    }
}

/// Reads a YOLO `data.yaml`: the training split and, when `val` is given, the validation split.
pub fn read_yolo(yaml: &Path) -> Result<(DetectionSet, Option<DetectionSet>)> {
    let text = std::fs::read_to_string(yaml).map_err(|e| err(yaml, e.to_string()))?;
    let docs =
        YamlLoader::load_from_str(&text).map_err(|e| err(yaml, format!("invalid YAML: {e}")))?;
    let doc = docs.first().ok_or_else(|| err(yaml, "empty YAML file"))?;
    let base = yaml.parent().unwrap_or(Path::new("."));
    let root = match doc["path"].as_str() {
        Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
        Some(p) => base.join(p),
        None => base.to_path_buf(),
    };
    let classes = names(&doc["names"], yaml)?;
    if classes.is_empty() {
        return Err(err(yaml, "names: no classes"));
    }
    if let Some(nc) = doc["nc"].as_i64() {
        if nc != classes.len() as i64 {
            return Err(err(
                yaml,
                format!("nc is {nc} but names lists {} classes", classes.len()),
            ));
        }
    }
    let split = |key: &str| -> Result<Option<DetectionSet>> {
        match &doc[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::String(s) => Ok(Some(read_yolo_split(&root.join(s), &classes)?)),
            other => Err(err(
                yaml,
                format!("{key}: expected a folder of images, got {other:?}"),
            )),
        }
    };
    let train =
        split("train")?.ok_or_else(|| err(yaml, "train: missing (the training images' folder)"))?;
    Ok((train, split("val")?))
}

/// The label file of an image: the last `images` component of its path becomes `labels`, the
/// extension `.txt` (YOLO's convention); beside the image when the path has no `images` part.
pub fn label_path(image: &Path) -> PathBuf {
    let comps: Vec<_> = image.components().collect();
    let pos = comps.iter().rposition(|c| c.as_os_str() == "images");
    let mut p = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        if Some(i) == pos {
            p.push("labels");
        } else {
            p.push(c.as_os_str());
        }
    }
    p.set_extension("txt");
    p
}

/// Parses one YOLO label file's text (`path` names it in errors).
pub fn parse_labels(
    text: &str,
    path: &Path,
    num_classes: usize,
) -> Result<(Vec<usize>, Vec<[f32; 4]>)> {
    let (mut classes, mut boxes) = (Vec::new(), Vec::new());
    for (ln, line) in text.lines().enumerate() {
        let at = |reason: String| err(path, format!("line {}: {reason}", ln + 1));
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f.len() != 5 {
            return Err(at(format!(
                "{} fields; a box is `class cx cy w h` (5 fields){}",
                f.len(),
                if f.len() > 5 {
                    " (segmentation polygons are not supported)"
                } else {
                    ""
                }
            )));
        }
        let class: usize = f[0]
            .parse()
            .map_err(|_| at(format!("class `{}` is not a class id", f[0])))?;
        if class >= num_classes {
            return Err(at(format!("class {class} is past the {num_classes} names")));
        }
        let mut v = [0.0f32; 4];
        for k in 0..4 {
            v[k] = f[k + 1]
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| at(format!("`{}` is not a number", f[k + 1])))?;
        }
        let [cx, cy, w, h] = v;
        // As YOLO tools check: each value normalised to [0, 1], a positive size. A box whose
        // corners pass the border (rounding in exporters) is clipped to the image.
        if v.iter().any(|x| !(0.0..=1.0).contains(x)) || w <= 0.0 || h <= 0.0 {
            return Err(at(format!(
                "box {cx} {cy} {w} {h} is outside [0, 1] (normalised centre and size, positive size)"
            )));
        }
        let (x0, x1) = ((cx - w / 2.0).max(0.0), (cx + w / 2.0).min(1.0));
        let (y0, y1) = ((cy - h / 2.0).max(0.0), (cy + h / 2.0).min(1.0));
        let v = [(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0];
        classes.push(class);
        boxes.push(v);
    }
    Ok((classes, boxes))
}

/// One YOLO split: every image under `images` (recursively, sorted), its labels beside it in
/// the parallel `labels` folder. A label file without an image is an error (a mislabelled or
/// missing image), as is any unreadable image header.
pub fn read_yolo_split(images: &Path, classes: &[String]) -> Result<DetectionSet> {
    if !images.is_dir() {
        return Err(err(images, "not a folder of images"));
    }
    let mut files = Vec::new();
    let mut stack = vec![images.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| err(&d, e.to_string()))? {
            let p = e.map_err(|e| err(&d, e.to_string()))?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                files.push(p);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(err(
            images,
            format!("no images ({})", IMAGE_EXTENSIONS.join(", ")),
        ));
    }
    let mut items = Vec::with_capacity(files.len());
    for image in files {
        let size = Rgb8::probe(&image)?;
        let lp = label_path(&image);
        let (classes_i, boxes) = if lp.is_file() {
            let text = std::fs::read_to_string(&lp).map_err(|e| err(&lp, e.to_string()))?;
            parse_labels(&text, &lp, classes.len())?
        } else {
            (Vec::new(), Vec::new())
        };
        let n = boxes.len();
        items.push(DetItem {
            image,
            size,
            classes: classes_i,
            boxes,
            crowd: vec![false; n],
        });
    }
    // Label files whose image is missing.
    if let Some(labels) = label_path(&images.join("x.jpg")).parent() {
        if labels.is_dir() && labels != images {
            let have: std::collections::HashSet<PathBuf> =
                items.iter().map(|i| label_path(&i.image)).collect();
            let mut stack = vec![labels.to_path_buf()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).map_err(|e| err(&d, e.to_string()))? {
                    let p = e.map_err(|e| err(&d, e.to_string()))?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "txt") && !have.contains(&p) {
                        return Err(err(&p, "a label file without its image (same name, .jpg/.jpeg/.png, under images/)"));
                    }
                }
            }
        }
    }
    Ok(DetectionSet {
        root: images.to_path_buf(),
        classes: classes.to_vec(),
        items,
    })
}

/// Reads COCO JSON annotations (`images[].file_name` under `image_dir`): classes in category-id
/// order, boxes converted from pixel `[x, y, w, h]` to normalised centre and size.
pub fn read_coco(json: &Path, image_dir: &Path) -> Result<DetectionSet> {
    let v = lora_io::hf::read_json(json)?;
    let arr = |k: &str| {
        v[k].as_array()
            .ok_or_else(|| err(json, format!("`{k}`: expected a list")))
    };
    let mut cats: Vec<(i64, String)> = arr("categories")?
        .iter()
        .map(|c| {
            Ok((
                c["id"]
                    .as_i64()
                    .ok_or_else(|| err(json, "categories: an entry without an integer id"))?,
                c["name"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    cats.sort();
    let cat_index = |id: i64| cats.iter().position(|c| c.0 == id);
    let mut items = Vec::new();
    let mut by_id = std::collections::HashMap::new();
    for im in arr("images")? {
        let id = im["id"]
            .as_i64()
            .ok_or_else(|| err(json, "images: an entry without an integer id"))?;
        let name = im["file_name"]
            .as_str()
            .ok_or_else(|| err(json, format!("images: image {id} has no file_name")))?;
        let path = image_dir.join(name);
        let size = Rgb8::probe(&path)?;
        if let (Some(w), Some(h)) = (im["width"].as_u64(), im["height"].as_u64()) {
            if (h as usize, w as usize) != size {
                return Err(err(
                    &path,
                    format!("the JSON says {w}x{h}, the file is {}x{}", size.1, size.0),
                ));
            }
        }
        by_id.insert(id, items.len());
        items.push(DetItem {
            image: path,
            size,
            classes: Vec::new(),
            boxes: Vec::new(),
            crowd: Vec::new(),
        });
    }
    for (k, a) in arr("annotations")?.iter().enumerate() {
        let at = |reason: String| err(json, format!("annotations[{k}]: {reason}"));
        let img = a["image_id"]
            .as_i64()
            .and_then(|i| by_id.get(&i).copied())
            .ok_or_else(|| at("image_id names no image".into()))?;
        let cat = a["category_id"]
            .as_i64()
            .and_then(cat_index)
            .ok_or_else(|| at("category_id names no category".into()))?;
        let b = a["bbox"]
            .as_array()
            .filter(|b| b.len() == 4)
            .ok_or_else(|| at("bbox: expected [x, y, w, h]".into()))?;
        let b: Vec<f64> = b.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
        let (h, w) = items[img].size;
        let (h, w) = (h as f64, w as f64);
        if b.iter().any(|x| !x.is_finite())
            || b[2] <= 0.0
            || b[3] <= 0.0
            || b[0] < -0.5
            || b[1] < -0.5
            || b[0] + b[2] > w + 0.5
            || b[1] + b[3] > h + 0.5
        {
            return Err(at(format!("bbox {b:?} is not inside the {w}x{h} image")));
        }
        let it = &mut items[img];
        it.classes.push(cat);
        it.boxes.push([
            ((b[0] + b[2] / 2.0) / w) as f32,
            ((b[1] + b[3] / 2.0) / h) as f32,
            (b[2] / w) as f32,
            (b[3] / h) as f32,
        ]);
        it.crowd.push(a["iscrowd"].as_u64() == Some(1));
    }
    Ok(DetectionSet {
        root: image_dir.to_path_buf(),
        classes: cats.into_iter().map(|c| c.1).collect(),
        items,
    })
}

/// Whether `data` is a COCO annotation file (`.json`) rather than a YOLO `data.yaml`.
pub fn is_coco(data: &Path) -> bool {
    data.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The image folder of a COCO annotation file: COCO's own layout
/// (`<root>/annotations/instances_<split>.json` with the images in `<root>/<split>/`), else the
/// JSON's own folder (Roboflow's `<split>/_annotations.coco.json` beside its images).
pub fn coco_image_dir(json: &Path) -> PathBuf {
    let dir = json.parent().unwrap_or(Path::new("."));
    let stem = json.file_stem().map(|s| s.to_string_lossy().to_string());
    if let (Some(split), Some(root)) = (
        stem.as_deref().and_then(|s| s.strip_prefix("instances_")),
        dir.file_name()
            .filter(|n| *n == "annotations")
            .and(dir.parent()),
    ) {
        let images = root.join(split);
        if images.is_dir() {
            return images;
        }
    }
    dir.to_path_buf()
}

/// Detection data from `--data`: a YOLO `data.yaml` (its training split and its `val`), or a
/// COCO annotation file (the training split; `eval`, another COCO file, the validation split,
/// whose classes must be the same). Images of a COCO file are found by [`coco_image_dir`].
pub fn read_detection_data(
    data: &Path,
    eval: Option<&Path>,
) -> Result<(DetectionSet, Option<DetectionSet>)> {
    if !is_coco(data) {
        if let Some(e) = eval {
            return Err(err(
                e,
                "--eval-data goes with a COCO JSON --data; a data.yaml names its own `val` split",
            ));
        }
        return read_yolo(data);
    }
    let train = read_coco(data, &coco_image_dir(data))?;
    let val = match eval {
        None => None,
        Some(e) => {
            let v = read_coco(e, &coco_image_dir(e))?;
            if v.classes != train.classes {
                return Err(err(
                    e,
                    format!(
                        "its categories ({}) are not the training file's ({})",
                        v.classes.join(", "),
                        train.classes.join(", ")
                    ),
                ));
            }
            Some(v)
        }
    };
    Ok((train, val))
}
