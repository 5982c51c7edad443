//! The detection demo's generated images (deterministic in their seed and index).
//!
//! - **Generic shapes** (what the base detector is pretrained on): circles, squares and
//!   triangles of any bright colour and size, one to four per image, sometimes overlapping or a
//!   small one on a larger one (in any colour unlike it), over a dark random gradient with
//!   noise.
//! - **Factory parts**: a grey metal disc or plate on a striped conveyor belt, and on some parts
//!   a defect: a `scratch` (a thin dark line), a `hole` (a small dark round pit) or `rust` (a
//!   small orange-brown blot). Defects are rare: most images have none.
//!
//! Boxes are `(cx, cy, w, h)` normalised to the image, the exact extent of each drawn shape.
//! Shapes are drawn with 4x4 supersampled coverage, so edges are anti-aliased.

use lora_core::models::yolos::Objects;
use lora_io::images::Rgb8;
use lora_kernels::rng::{splitmix64, Rng};

/// The generic shape classes (the base model's classes).
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// The factory dataset's classes: the base model's, then the defects.
pub const FACTORY: [&str; 6] = ["circle", "square", "triangle", "scratch", "hole", "rust"];

/// A shape: an inside test in pixel coordinates and its bounding box `(x0, y0, x1, y1)`.
enum Shape {
    Disc {
        cx: f64,
        cy: f64,
        r: f64,
    },
    Rect {
        x0: f64,
        y0: f64,
        x1: f64,
        y1: f64,
    },
    Tri {
        p: [(f64, f64); 3],
    },
    Line {
        a: (f64, f64),
        b: (f64, f64),
        half: f64,
    },
}

impl Shape {
    fn inside(&self, x: f64, y: f64) -> bool {
        match *self {
            Shape::Disc { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            Shape::Rect { x0, y0, x1, y1 } => x >= x0 && x <= x1 && y >= y0 && y <= y1,
            Shape::Tri { p } => {
                let s = |a: (f64, f64), b: (f64, f64)| {
                    (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0)
                };
                let (d0, d1, d2) = (s(p[0], p[1]), s(p[1], p[2]), s(p[2], p[0]));
                (d0 >= 0.0 && d1 >= 0.0 && d2 >= 0.0) || (d0 <= 0.0 && d1 <= 0.0 && d2 <= 0.0)
            }
            Shape::Line { a, b, half } => {
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let t = (((x - a.0) * dx + (y - a.1) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
                let (px, py) = (a.0 + t * dx, a.1 + t * dy);
                (x - px).powi(2) + (y - py).powi(2) <= half * half
            }
        }
    }

    fn bounds(&self) -> (f64, f64, f64, f64) {
        match *self {
            Shape::Disc { cx, cy, r } => (cx - r, cy - r, cx + r, cy + r),
            Shape::Rect { x0, y0, x1, y1 } => (x0, y0, x1, y1),
            Shape::Tri { p } => {
                let xs = p.map(|q| q.0);
                let ys = p.map(|q| q.1);
                let min = |v: [f64; 3]| v.iter().cloned().fold(f64::INFINITY, f64::min);
                let max = |v: [f64; 3]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                (min(xs), min(ys), max(xs), max(ys))
            }
            Shape::Line { a, b, half } => (
                a.0.min(b.0) - half,
                a.1.min(b.1) - half,
                a.0.max(b.0) + half,
                a.1.max(b.1) + half,
            ),
        }
    }
}

/// A floating-point canvas (RGB in [0, 255]).
struct Canvas {
    size: usize,
    px: Vec<[f64; 3]>,
}

impl Canvas {
    fn new(size: usize, fill: impl Fn(usize, usize) -> [f64; 3]) -> Self {
        let px = (0..size * size).map(|i| fill(i / size, i % size)).collect();
        Self { size, px }
    }

    /// Blends `colour(x, y)` over the pixels `shapes` cover (any of them), by 4x4 coverage.
    fn draw(&mut self, shapes: &[&Shape], colour: &dyn Fn(f64, f64) -> [f64; 3]) {
        let (mut x0, mut y0, mut x1, mut y1) = (f64::INFINITY, f64::INFINITY, 0.0f64, 0.0f64);
        for s in shapes {
            let b = s.bounds();
            x0 = x0.min(b.0);
            y0 = y0.min(b.1);
            x1 = x1.max(b.2);
            y1 = y1.max(b.3);
        }
        let n = self.size as f64;
        let (ys, ye) = (y0.floor().max(0.0) as usize, (y1.ceil().min(n)) as usize);
        let (xs, xe) = (x0.floor().max(0.0) as usize, (x1.ceil().min(n)) as usize);
        for y in ys..ye {
            for x in xs..xe {
                let a = coverage(x, y, |fx, fy| shapes.iter().any(|s| s.inside(fx, fy)));
                if a > 0.0 {
                    let c = colour(x as f64 + 0.5, y as f64 + 0.5);
                    let p = &mut self.px[y * self.size + x];
                    for k in 0..3 {
                        p[k] = p[k] * (1.0 - a) + c[k] * a;
                    }
                }
            }
        }
    }

    fn finish(self, rng: &mut Rng, noise: f64) -> Rgb8 {
        let data = self
            .px
            .iter()
            .flat_map(|p| *p)
            .map(|v| (v + noise * rng.normal()).round().clamp(0.0, 255.0) as u8)
            .collect();
        Rgb8::new(self.size, self.size, data).expect("size * size * 3 bytes")
    }
}

/// Adds `shape`'s box (clipped to the image) as class `class`.
/// The share of pixel `(x, y)` that `inside` covers, from a 4x4 grid of samples in it (the
/// demos' anti-aliasing).
pub(crate) fn coverage(x: usize, y: usize, inside: impl Fn(f64, f64) -> bool) -> f64 {
    let mut hit = 0u32;
    for sy in 0..4 {
        for sx in 0..4 {
            let (fx, fy) = (
                x as f64 + (sx as f64 + 0.5) / 4.0,
                y as f64 + (sy as f64 + 0.5) / 4.0,
            );
            hit += inside(fx, fy) as u32;
        }
    }
    f64::from(hit) / 16.0
}

fn push(obj: &mut Objects, class: usize, shape: &Shape, size: usize) {
    let n = size as f64;
    let (x0, y0, x1, y1) = shape.bounds();
    let (x0, y0, x1, y1) = (x0.max(0.0), y0.max(0.0), x1.min(n), y1.min(n));
    obj.classes.push(class);
    obj.boxes.push([
        ((x0 + x1) / 2.0 / n) as f32,
        ((y0 + y1) / 2.0 / n) as f32,
        ((x1 - x0) / n) as f32,
        ((y1 - y0) / n) as f32,
    ]);
}

fn shape_of(class: usize, cx: f64, cy: f64, r: f64, rng: &mut Rng) -> Shape {
    match class {
        0 => Shape::Disc { cx, cy, r },
        1 => {
            let a = rng.uniform_range(0.85, 1.15);
            Shape::Rect {
                x0: cx - r * a,
                y0: cy - r / a,
                x1: cx + r * a,
                y1: cy + r / a,
            }
        }
        _ => {
            let w = r * rng.uniform_range(0.9, 1.2);
            let up = rng.uniform() < 0.5;
            let (t, b) = if up {
                (cy - r, cy + r)
            } else {
                (cy + r, cy - r)
            };
            Shape::Tri {
                p: [(cx, t), (cx - w, b), (cx + w, b)],
            }
        }
    }
}

fn random_colour(rng: &mut Rng) -> [f64; 3] {
    [0, 1, 2].map(|_| rng.uniform_range(0.0, 255.0))
}

/// A colour clearly brighter than `from` (objects stand out from the dark background).
fn distinct(rng: &mut Rng, from: [f64; 3]) -> [f64; 3] {
    loop {
        let c = random_colour(rng);
        let d: f64 = c.iter().zip(&from).map(|(a, b)| a - b).sum();
        if d > 200.0 {
            return c;
        }
    }
}

/// Generic shape image `index` of the stream `seed`.
pub fn shapes_image(seed: u64, index: u64, size: usize) -> (Rgb8, Objects) {
    let mut rng = Rng::new(splitmix64(seed ^ splitmix64(index)));
    let n = size as f64;
    let dark = |rng: &mut Rng| [0, 1, 2].map(|_| rng.uniform_range(0.0, 90.0));
    let (c0, c1) = (dark(&mut rng), dark(&mut rng));
    let vertical = rng.uniform() < 0.5;
    let mut canvas = Canvas::new(size, |y, x| {
        let t = if vertical { y } else { x } as f64 / n;
        [0, 1, 2].map(|k| c0[k] * (1.0 - t) + c1[k] * t)
    });
    let bg = [0, 1, 2].map(|k| (c0[k] + c1[k]) / 2.0);
    let mut obj = Objects::default();
    let count = 1 + (rng.uniform() * 4.0) as usize;
    let mut last: Option<(f64, f64, f64, [f64; 3])> = None;
    for _ in 0..count {
        let class = (rng.uniform() * 3.0) as usize;
        // Sometimes a small shape on the previous one (as a defect sits on a part).
        let (cx, cy, r, on) = match last {
            Some((px, py, pr, pc)) if pr > 9.0 && rng.uniform() < 0.35 => {
                let r = rng.uniform_range(2.0, 5.0);
                let off = pr - r - 1.0;
                (
                    px + rng.uniform_range(-off, off) * 0.7,
                    py + rng.uniform_range(-off, off) * 0.7,
                    r,
                    Some(pc),
                )
            }
            _ => {
                let r = if rng.uniform() < 0.3 {
                    rng.uniform_range(2.0, 5.0)
                } else {
                    rng.uniform_range(5.0, n * 0.3)
                };
                (
                    rng.uniform_range(r, n - r),
                    rng.uniform_range(r, n - r),
                    r,
                    None,
                )
            }
        };
        let shape = shape_of(class, cx, cy, r, &mut rng);
        // On another shape: any colour unlike that shape's (darker ones too, as a pit or a
        // stain on a part); elsewhere a colour brighter than the background.
        let colour = match on {
            Some(pc) => loop {
                let c = random_colour(&mut rng);
                if c.iter().zip(&pc).map(|(a, b)| (a - b).abs()).sum::<f64>() > 150.0 {
                    break c;
                }
            },
            None => distinct(&mut rng, bg),
        };
        canvas.draw(&[&shape], &|_, _| colour);
        push(&mut obj, class, &shape, size);
        last = Some((cx, cy, r, colour));
    }
    let img = canvas.finish(&mut rng, 6.0);
    (img, obj)
}

/// Factory image `index` of the stream `seed`: one part, a defect on `defect_rate` of them.
pub fn factory_image(seed: u64, index: u64, size: usize, defect_rate: f64) -> (Rgb8, Objects) {
    let mut rng = Rng::new(splitmix64(seed ^ splitmix64(index ^ 0xFAC7)));
    let n = size as f64;
    let belt = rng.uniform_range(40.0, 70.0);
    let mut canvas = Canvas::new(size, |y, _| {
        let stripe = if (y / 4) % 2 == 0 { 6.0 } else { 0.0 };
        [belt + stripe, belt + stripe + 2.0, belt + stripe + 6.0]
    });
    let mut obj = Objects::default();
    let class = (rng.uniform() * 2.0) as usize; // a disc or a plate
    let r = rng.uniform_range(n * 0.2, n * 0.33);
    let (cx, cy) = (
        rng.uniform_range(r + 1.0, n - r - 1.0),
        rng.uniform_range(r + 1.0, n - r - 1.0),
    );
    let part = shape_of(class, cx, cy, r, &mut rng);
    let metal = rng.uniform_range(150.0, 200.0);
    let (gx, gy) = (rng.uniform_range(-1.2, 1.2), rng.uniform_range(-1.2, 1.2));
    canvas.draw(&[&part], &|x, y| {
        let v = metal + gx * (x - cx) + gy * (y - cy);
        [v, v + 3.0, v + 8.0]
    });
    push(&mut obj, class, &part, size);
    if rng.uniform() < defect_rate {
        let kind = 3 + (rng.uniform() * 3.0) as usize;
        // The defect's reach from its centre, then a centre that keeps all of it on the part
        // (within 0.8 r of the part's centre: inside a disc, and inside a plate, whose half
        // sides are at least r / 1.15).
        let extent = match kind {
            3 => rng.uniform_range(n * 0.075, n * 0.125), // half the scratch's length
            4 => rng.uniform_range(n * 0.06, n * 0.085),  // the hole's radius
            _ => 3.0 + n * 0.065,                         // the rust blobs' farthest reach
        };
        let room = (0.8 * r - extent - 1.25).max(0.0);
        let (ang, dist) = (
            rng.uniform_range(0.0, 2.0 * std::f64::consts::PI),
            room * rng.uniform().sqrt(),
        );
        let (dx, dy) = (cx + dist * ang.cos(), cy + dist * ang.sin());
        match kind {
            3 => {
                let a = rng.uniform_range(0.0, std::f64::consts::PI);
                let (ux, uy) = (a.cos() * extent, a.sin() * extent);
                let s = Shape::Line {
                    a: (dx - ux, dy - uy),
                    b: (dx + ux, dy + uy),
                    half: 1.25,
                };
                let dark = metal * 0.35;
                canvas.draw(&[&s], &|_, _| [dark, dark, dark + 4.0]);
                push(&mut obj, kind, &s, size);
            }
            4 => {
                let s = Shape::Disc {
                    cx: dx,
                    cy: dy,
                    r: extent,
                };
                canvas.draw(&[&s], &|_, _| [18.0, 18.0, 22.0]);
                push(&mut obj, kind, &s, size);
            }
            _ => {
                let blobs: Vec<Shape> = (0..3)
                    .map(|_| Shape::Disc {
                        cx: dx + rng.uniform_range(-3.0, 3.0),
                        cy: dy + rng.uniform_range(-3.0, 3.0),
                        r: rng.uniform_range(n * 0.04, n * 0.065),
                    })
                    .collect();
                let tone = rng.uniform_range(0.8, 1.0);
                canvas.draw(&blobs.iter().collect::<Vec<_>>(), &|_, _| {
                    [190.0 * tone, 90.0 * tone, 30.0 * tone]
                });
                let (mut x0, mut y0, mut x1, mut y1) =
                    (f64::INFINITY, f64::INFINITY, 0.0f64, 0.0f64);
                for b in &blobs {
                    let (a, b2, c, d) = b.bounds();
                    x0 = x0.min(a);
                    y0 = y0.min(b2);
                    x1 = x1.max(c);
                    y1 = y1.max(d);
                }
                push(&mut obj, kind, &Shape::Rect { x0, y0, x1, y1 }, size);
            }
        }
    }
    let img = canvas.finish(&mut rng, 4.0);
    (img, obj)
}

/// Writes a YOLO tree under `dir` (`data.yaml`, `images/{train,val}`, `labels/{train,val}`)
/// with `train` and `val` factory images; returns the `data.yaml` path. Every file is new in
/// `dir` (the caller owns it).
pub fn write_factory(
    dir: &std::path::Path,
    seed: u64,
    (train, val): (usize, usize),
    size: usize,
    defect_rate: f64,
) -> anyhow::Result<std::path::PathBuf> {
    write_yolo(
        dir,
        &FACTORY,
        "parts on a conveyor belt, a few with defects",
        (train, val),
        &|i| factory_image(seed, i, size, defect_rate),
    )
}

/// Writes a YOLO tree of `draw(i)` images (training images at `i` from 0, validation images
/// from `1 << 32`) with class `names`; returns the `data.yaml` path.
pub fn write_yolo(
    dir: &std::path::Path,
    names: &[&str],
    what: &str,
    (train, val): (usize, usize),
    draw: &dyn Fn(u64) -> (Rgb8, Objects),
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    for (split, count, offset) in [("train", train, 0u64), ("val", val, 1u64 << 32)] {
        let images = dir.join("images").join(split);
        let labels = dir.join("labels").join(split);
        for d in [&images, &labels] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        for i in 0..count {
            let (img, obj) = draw(offset + i as u64);
            img.save_png(&images.join(format!("{i:04}.png")))?;
            let mut text = String::new();
            for (c, b) in obj.classes.iter().zip(&obj.boxes) {
                text.push_str(&format!(
                    "{c} {:.6} {:.6} {:.6} {:.6}\n",
                    b[0], b[1], b[2], b[3]
                ));
            }
            let p = labels.join(format!("{i:04}.txt"));
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    let list: Vec<String> = names.iter().map(|s| format!("  - {s}")).collect();
    let yaml = format!(
        "# Generated by `lora demo --task detect`: {what}.\ntrain: images/train\nval: images/val\nnames:\n{}\n",
        list.join("\n")
    );
    let p = dir.join("data.yaml");
    std::fs::write(&p, yaml).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_boxes(o: &Objects, classes: usize) {
        assert_eq!(o.classes.len(), o.boxes.len());
        for (c, b) in o.classes.iter().zip(&o.boxes) {
            assert!(*c < classes);
            assert!(b[2] > 0.0 && b[3] > 0.0, "{b:?}");
            let (x0, y0, x1, y1) = (
                b[0] - b[2] / 2.0,
                b[1] - b[3] / 2.0,
                b[0] + b[2] / 2.0,
                b[1] + b[3] / 2.0,
            );
            for v in [x0, y0, x1, y1] {
                assert!((-1e-6..=1.0 + 1e-6).contains(&v), "{b:?}");
            }
        }
    }

    #[test]
    fn images_are_deterministic_and_boxes_fit() {
        for i in 0..200u64 {
            let (a, oa) = shapes_image(1, i, 64);
            assert_eq!((a.height, a.width), (64, 64));
            assert_eq!(shapes_image(1, i, 64), (a.clone(), oa.clone()));
            assert_ne!(shapes_image(2, i, 64).0, a);
            assert!((1..=4).contains(&oa.classes.len()));
            check_boxes(&oa, SHAPES.len());
            let (b, ob) = factory_image(1, i, 64, 0.4);
            assert_eq!(factory_image(1, i, 64, 0.4), (b, ob.clone()));
            check_boxes(&ob, FACTORY.len());
            // One part (a disc or a plate) first, at most one defect, inside the part's box.
            assert!(ob.classes[0] < 2 && ob.classes.len() <= 2);
            if let Some(&d) = ob.classes.get(1) {
                assert!(d >= SHAPES.len());
                let (p, q) = (ob.boxes[0], ob.boxes[1]);
                // The whole defect lies on the part.
                assert!(
                    q[0] - q[2] / 2.0 >= p[0] - p[2] / 2.0
                        && q[0] + q[2] / 2.0 <= p[0] + p[2] / 2.0,
                    "{ob:?}"
                );
                assert!(
                    q[1] - q[3] / 2.0 >= p[1] - p[3] / 2.0
                        && q[1] + q[3] / 2.0 <= p[1] + p[3] / 2.0,
                    "{ob:?}"
                );
            }
        }
    }

    #[test]
    fn defects_are_rare_and_every_kind_occurs() {
        let mut kinds = [0usize; 6];
        let n = 2000;
        for i in 0..n {
            for &c in &factory_image(5, i, 64, 0.4).1.classes {
                kinds[c] += 1;
            }
        }
        let defects: usize = kinds[3..].iter().sum();
        assert!(
            (0.35..0.45).contains(&(defects as f64 / n as f64)),
            "{kinds:?}"
        );
        assert!(kinds[3..].iter().all(|&k| k > n as usize / 10), "{kinds:?}");
        assert_eq!(kinds[0] + kinds[1], n as usize);
        assert_eq!(kinds[2], 0, "no triangles among the parts");
    }

    #[test]
    fn a_defect_changes_the_pixels_inside_its_box() {
        // The same part with and without its defect differs only around the defect.
        for i in 0..50u64 {
            let (with, o) = factory_image(9, i, 64, 1.0);
            let (without, o0) = factory_image(9, i, 64, 0.0);
            assert_eq!(o0.classes.len(), 1);
            let b = o.boxes[1];
            let (x0, y0) = (
                ((b[0] - b[2] / 2.0) * 64.0).floor() as i64,
                ((b[1] - b[3] / 2.0) * 64.0).floor() as i64,
            );
            let (x1, y1) = (
                ((b[0] + b[2] / 2.0) * 64.0).ceil() as i64,
                ((b[1] + b[3] / 2.0) * 64.0).ceil() as i64,
            );
            let mut inside = 0;
            for y in 0..64i64 {
                for x in 0..64i64 {
                    let p = ((y * 64 + x) * 3) as usize;
                    let d: i32 = (0..3)
                        .map(|k| (with.data[p + k] as i32 - without.data[p + k] as i32).abs())
                        .sum();
                    let near = x >= x0 - 1 && x <= x1 && y >= y0 - 1 && y <= y1;
                    if near {
                        inside += d;
                    } else {
                        // Outside the box only the noise differs (the random stream moved).
                        assert!(d < 3 * 40, "image {i}: pixel ({x}, {y}) changed by {d}");
                    }
                }
            }
            assert!(inside > 300, "image {i}: the defect is visible ({inside})");
        }
    }

    #[test]
    fn the_factory_tree_reads_back_as_yolo_data() {
        let dir =
            std::env::temp_dir().join(format!("lora-demo-detect-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let yaml = write_factory(&dir, 3, (6, 4), 64, 0.5).unwrap();
        let (train, val) = lora_train::vision::detect_data::read_yolo(&yaml).unwrap();
        let val = val.unwrap();
        assert_eq!(train.classes, FACTORY);
        assert_eq!((train.items.len(), val.items.len()), (6, 4));
        for (k, (set, offset)) in [(&train, 0u64), (&val, 1u64 << 32)].into_iter().enumerate() {
            for (i, it) in set.items.iter().enumerate() {
                let (img, o) = factory_image(3, offset + i as u64, 64, 0.5);
                assert_eq!(
                    lora_io::images::Rgb8::open(&it.image).unwrap(),
                    img,
                    "split {k} image {i}"
                );
                assert_eq!(it.classes, o.classes);
                for (a, b) in it.boxes.iter().zip(&o.boxes) {
                    for j in 0..4 {
                        assert!((a[j] - b[j]).abs() < 1e-6);
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
