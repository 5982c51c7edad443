//! Image classification data: ImageFolder trees (`<split>/<class>/<image>`), seeded
//! augmentation (horizontal flip, scale jitter), and batches of preprocessed pixels.

use crate::{Result, TrainError};
use lora_io::images::{ImageProcessor, Rgb8};
use lora_kernels::rng::{splitmix64, Rng};
use std::path::{Path, PathBuf};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| err(dir, e.to_string()))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| err(dir, e.to_string()))?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // hidden files (.DS_Store, .ipynb_checkpoints)
        }
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

/// One split of an ImageFolder tree: the class names (sorted folder names, as torchvision's
/// `ImageFolder` and the `datasets` library's `imagefolder` order them) and the images, each
/// with its class index.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageFolder {
    /// The split's folder.
    pub root: PathBuf,
    /// Class names, by index.
    pub classes: Vec<String>,
    /// `(image file, class index)`, sorted by class then file name.
    pub items: Vec<(PathBuf, usize)>,
    /// Files skipped because their extension is not an image's.
    pub skipped: usize,
}

impl ImageFolder {
    /// Reads a split folder: each sub-folder is a class; files directly inside the split, or
    /// with other extensions, are skipped (and counted). A split without class folders, or a
    /// class folder without images, is an error naming the folder.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(err(
                root,
                "not a folder (an ImageFolder split holds one folder per class)",
            ));
        }
        let mut classes = Vec::new();
        let mut items = Vec::new();
        let mut skipped = 0;
        for p in sorted_entries(root)? {
            if !p.is_dir() {
                skipped += 1;
                continue;
            }
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| err(&p, "a class folder's name is not UTF-8"))?
                .to_string();
            let ci = classes.len();
            let before = items.len();
            for f in sorted_entries(&p)? {
                if f.is_file() && is_image(&f) {
                    items.push((f, ci));
                } else {
                    skipped += 1;
                }
            }
            if items.len() == before {
                return Err(err(
                    &p,
                    format!(
                        "class folder `{name}` holds no images ({})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            classes.push(name);
        }
        if classes.is_empty() {
            return Err(err(
                root,
                "no class folders: an ImageFolder split holds one folder per class \
                 (train/<class>/*.jpg), or pass the folder that holds train/ and val/",
            ));
        }
        Ok(Self {
            root: root.into(),
            classes,
            items,
            skipped,
        })
    }

    /// Reads every image's header (in parallel), so that a file that is not an image is found
    /// before a run writes anything.
    pub fn check_headers(&self) -> Result<()> {
        use rayon::prelude::*;
        self.items
            .par_iter()
            .try_for_each(|(p, _)| Rgb8::probe(p).map(|_| ()))
            .map_err(Into::into)
    }

    /// This split with its class indices renumbered to `classes` (the training split's): a
    /// class the training split does not have is an error naming it.
    pub fn relabel(mut self, classes: &[String]) -> Result<Self> {
        let map: Vec<usize> = self
            .classes
            .iter()
            .map(|c| {
                classes.iter().position(|t| t == c).ok_or_else(|| {
                    err(
                        &self.root.join(c),
                        format!(
                            "class `{c}` is not among the training classes ({})",
                            classes.join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<_>>()?;
        for (_, ci) in &mut self.items {
            *ci = map[*ci];
        }
        self.classes = classes.to_vec();
        Ok(self)
    }
}

/// The training and evaluation splits `--data` names: a folder with `train/` (and `val/`,
/// `validation/` or `test/`), or a split folder itself (no evaluation split).
pub fn find_splits(data: &Path) -> Result<(ImageFolder, Option<ImageFolder>)> {
    let train_dir = data.join("train");
    if train_dir.is_dir() {
        let train = ImageFolder::open(&train_dir)?;
        let val = ["val", "validation", "valid", "test"]
            .iter()
            .map(|n| data.join(n))
            .find(|p| p.is_dir())
            .map(|p| ImageFolder::open(&p).and_then(|v| v.relabel(&train.classes)))
            .transpose()?;
        Ok((train, val))
    } else {
        Ok((ImageFolder::open(data)?, None))
    }
}

/// The split to evaluate in a tree or split folder: `val/` (or `validation/`, `valid/`, `test/`)
/// when present, else the folder itself.
pub fn eval_split(data: &Path) -> Result<ImageFolder> {
    match ["val", "validation", "valid", "test"]
        .iter()
        .map(|n| data.join(n))
        .find(|p| p.is_dir())
    {
        Some(p) => ImageFolder::open(&p),
        None => ImageFolder::open(data),
    }
}

/// Seeded augmentation of training images (off for evaluation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Mirror left to right with probability 1/2.
    pub flip: bool,
    /// Scale jitter: a random window of `[min, 1]` of each side (same fraction for both, at a
    /// random position) is cropped before the processor's resize; `1` disables it.
    pub min_scale: f32,
}

impl Augment {
    /// No augmentation.
    pub const NONE: Augment = Augment {
        flip: false,
        min_scale: 1.0,
    };

    /// The augmented image for draw `key` (a function of the run's seed, the epoch and the
    /// example): the same key gives the same image, so a resumed run sees what an
    /// uninterrupted one would.
    pub fn apply(&self, img: &Rgb8, key: u64) -> Rgb8 {
        let mut rng = Rng::new(splitmix64(key));
        let mut out = img.clone();
        if self.min_scale < 1.0 {
            let s = rng.uniform_range(self.min_scale as f64, 1.0);
            let h = ((img.height as f64 * s).round() as usize).clamp(1, img.height);
            let w = ((img.width as f64 * s).round() as usize).clamp(1, img.width);
            let top = (rng.uniform() * (img.height - h + 1) as f64) as usize;
            let left = (rng.uniform() * (img.width - w + 1) as f64) as usize;
            out = out.crop(top as isize, left as isize, h, w);
        }
        if self.flip && rng.uniform() < 0.5 {
            out = out.flip_horizontal();
        }
        out
    }
}

/// `(pixels (B, C, H, W), labels)` for `items`, each decoded, augmented with key
/// `key_of(index in items)` and preprocessed; images decode on all threads. Every image must
/// come out at the same size (a processor without resize on images of other sizes is an
/// error naming the odd one).
pub fn load_batch(
    items: &[&(PathBuf, usize)],
    proc: &ImageProcessor,
    aug: &Augment,
    key_of: &(dyn Fn(usize) -> u64 + Sync),
) -> Result<(Vec<f32>, [usize; 4], Vec<i64>)> {
    use rayon::prelude::*;
    let done: Vec<Result<(Vec<f32>, usize, usize)>> = items
        .par_iter()
        .enumerate()
        .map(|(i, (path, _))| {
            let img = Rgb8::open(path)?;
            let img = aug.apply(&img, key_of(i));
            Ok(proc.pixels(&img))
        })
        .collect();
    let mut pixels = Vec::new();
    let mut size = None;
    for (r, (path, _)) in done.into_iter().zip(items) {
        let (v, h, w) = r?;
        match size {
            None => size = Some((h, w)),
            Some(s) if s != (h, w) => {
                return Err(err(
                    path,
                    format!(
                        "preprocessed to {h}x{w}, but the batch's first image to {}x{}: \
                         the processor must resize to one size",
                        s.0, s.1
                    ),
                ))
            }
            Some(_) => {}
        }
        pixels.extend(v);
    }
    let (h, w) = size.unwrap_or((0, 0));
    let labels = items.iter().map(|(_, c)| *c as i64).collect();
    Ok((pixels, [items.len(), 3, h, w], labels))
}
