//! Object detection with LoRA: a YOLOS directory, a YOLO `data.yaml` tree, LoRA on the
//! encoder's query/value projections, both heads (class and box MLPs) trained in full through
//! `modules_to_save`, DETR's loss; evaluation reports the loss and pycocotools' mAP.
//!
//! Images go through YOLOS's image processor as transformers runs it: shortest/longest edge
//! (multiples of 16), rescale, normalise, and each batch padded to its largest image with the
//! boxes rescaled to the padded size ([`pad_batch`]); the model resizes its position tables to
//! each batch's patch grid.

use super::data::Augment;
use super::detect_data::{read_detection_data, DetItem, DetectionSet};
use super::map::{coco_map, Detection, GroundTruth, MapReport};
use super::{VisionEvent, VisionSummary, VisionTrainConfig};
use crate::optim::{clip_grad_norm, lr_factor, Optimizer, OptimizerKind, ParamGroup};
use crate::{Result, TrainError};
use lora_core::models::yolos::{Objects, Yolos};
use lora_core::models::VisionModel;
use lora_core::{Device, Tape, Tensor};
use lora_io::images::{ImageProcessor, Resize, Rgb8, IMAGENET_DEFAULT};
use lora_io::outdir::{self, Existing, Owned};
use lora_io::peft::{PeftConfig, Targets};
use lora_io::vision::{adapter_tensors, inject, HeadSource, VisionArch, VisionModelDir};
use lora_io::write::write_atomic;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn data_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Evaluation of a detector on a split.
#[derive(Clone, Debug, PartialEq)]
pub struct DetEval {
    /// DETR's loss, the mean over the images of each image's loss.
    pub loss: f64,
    /// pycocotools' AP@[.5:.95].
    pub map: f64,
    /// AP at IoU 0.5.
    pub map50: f64,
    /// Images evaluated.
    pub images: usize,
    /// Each class's `[AP@[.5:.95], AP@.5]`; `None` for a class with no object in the split.
    pub per_class: Vec<Option<[f64; 2]>>,
}

/// YOLOS's image processor's class defaults (`YolosImageProcessor`): the shortest edge to 800,
/// the longest at most 1333, bilinear, rescale, ImageNet's statistics, batches padded.
pub fn yolos_processor_defaults() -> ImageProcessor {
    ImageProcessor {
        resize: Some(Resize::ShortestLongest {
            shortest: 800,
            longest: 1333,
        }),
        filter: lora_io::images::Filter::Bilinear,
        rescale: Some(1.0 / 255.0),
        normalize: Some(IMAGENET_DEFAULT),
    }
}

/// The processor a detector's images go through: `preprocessor_config.json` read as YOLOS's
/// processor reads it (its class defaults for what it leaves out, or all of them without the
/// file). `size` (`--image-size`) sets the shortest edge, and the longest edge in proportion
/// (a fixed-size processor becomes `size x size`).
pub fn detection_processor(md: &VisionModelDir, size: Option<usize>) -> Result<ImageProcessor> {
    let VisionArch::Yolos(c) = &md.config.arch else {
        return Err(data_err(&md.dir, "not an object detector"));
    };
    let defaults = yolos_processor_defaults();
    let path = md.dir.join("preprocessor_config.json");
    let mut p = if path.exists() {
        ImageProcessor::from_file(&path, &defaults)?
    } else {
        defaults
    };
    if let Some(n) = size {
        if n < c.patch_size.max(16) {
            return Err(TrainError::Setting {
                setting: "image-size",
                reason: format!(
                    "{n} is smaller than a patch ({}) or 16 pixels",
                    c.patch_size
                ),
            });
        }
        p.resize = Some(match p.resize {
            Some(Resize::ShortestLongest { shortest, longest }) => Resize::ShortestLongest {
                shortest: n,
                longest: ((longest as f64 * n as f64 / shortest as f64).round() as usize).max(n),
            },
            _ => Resize::Exact(n, n),
        });
    }
    Ok(p)
}

/// An image's objects after augmentation: a crop window (fractions of the image) keeps the part
/// of each box inside it (a box keeping less than a quarter of its area is dropped), a flip
/// mirrors `cx`. Crowd regions are left out (DETR trains without them).
fn augmented(item: &DetItem, img: &Rgb8, aug: &Augment, key: u64) -> (Rgb8, Objects) {
    let mut rng = lora_kernels::rng::Rng::new(lora_kernels::rng::splitmix64(key));
    let (h, w) = (img.height as f64, img.width as f64);
    let (mut top, mut left, mut ch, mut cw) = (0.0, 0.0, h, w);
    let mut out = img.clone();
    if aug.min_scale < 1.0 {
        let s = rng.uniform_range(aug.min_scale as f64, 1.0);
        ch = (h * s).round().clamp(1.0, h);
        cw = (w * s).round().clamp(1.0, w);
        top = (rng.uniform() * (h - ch + 1.0)).floor();
        left = (rng.uniform() * (w - cw + 1.0)).floor();
        out = out.crop(top as isize, left as isize, ch as usize, cw as usize);
    }
    let flip = aug.flip && rng.uniform() < 0.5;
    if flip {
        out = out.flip_horizontal();
    }
    let mut objects = Objects::default();
    for ((&c, b), &crowd) in item.classes.iter().zip(&item.boxes).zip(&item.crowd) {
        if crowd {
            continue;
        }
        let (x0, y0) = (
            (b[0] - b[2] / 2.0) as f64 * w,
            (b[1] - b[3] / 2.0) as f64 * h,
        );
        let (x1, y1) = (
            (b[0] + b[2] / 2.0) as f64 * w,
            (b[1] + b[3] / 2.0) as f64 * h,
        );
        let (cx0, cy0) = ((x0 - left).max(0.0), (y0 - top).max(0.0));
        let (cx1, cy1) = ((x1 - left).min(cw), (y1 - top).min(ch));
        if cx1 <= cx0 || cy1 <= cy0 || (cx1 - cx0) * (cy1 - cy0) < 0.25 * (x1 - x0) * (y1 - y0) {
            continue;
        }
        let mut cx = (cx0 + cx1) / 2.0 / cw;
        if flip {
            cx = 1.0 - cx;
        }
        objects.classes.push(c);
        objects.boxes.push([
            cx as f32,
            ((cy0 + cy1) / 2.0 / ch) as f32,
            ((cx1 - cx0) / cw) as f32,
            ((cy1 - cy0) / ch) as f32,
        ]);
    }
    (out, objects)
}

/// Pixels `(B, 3, H, W)` and objects for `items` (augmented with `aug`, keyed per item by
/// `key_of(i)`), each image processed by `proc` and the batch padded by [`pad_batch`].
pub fn load_batch(
    items: &[&DetItem],
    proc: &ImageProcessor,
    aug: &Augment,
    key_of: &(dyn Fn(usize) -> u64 + Sync),
) -> Result<(Vec<f32>, [usize; 4], Vec<Objects>)> {
    use rayon::prelude::*;
    let done: Vec<Result<(Vec<f32>, usize, usize, Objects)>> = items
        .par_iter()
        .enumerate()
        .map(|(i, it)| {
            let img = Rgb8::open(&it.image)?;
            let (img, obj) = augmented(it, &img, aug, key_of(i));
            if let Some(why) = proc.refuses(&img) {
                return Err(data_err(&it.image, why));
            }
            let (v, h, w) = proc.pixels(&img);
            Ok((v, h, w, obj))
        })
        .collect();
    let done: Vec<(Vec<f32>, usize, usize, Objects)> = done.into_iter().collect::<Result<_>>()?;
    Ok(pad_batch(done))
}

/// One batch of processed images, padded as YOLOS's processor pads: each image at the top left
/// of the largest height and width in the batch, zeros (the normalised mean) elsewhere, and its
/// boxes (normalised to the image) rescaled to the padded size.
pub fn pad_batch(
    images: Vec<(Vec<f32>, usize, usize, Objects)>,
) -> (Vec<f32>, [usize; 4], Vec<Objects>) {
    let bh = images.iter().map(|x| x.1).max().unwrap_or(0);
    let bw = images.iter().map(|x| x.2).max().unwrap_or(0);
    let mut pixels = vec![0.0f32; images.len() * 3 * bh * bw];
    let mut objects = Vec::with_capacity(images.len());
    for (i, (v, h, w, mut o)) in images.into_iter().enumerate() {
        if (h, w) == (bh, bw) {
            pixels[i * 3 * bh * bw..(i + 1) * 3 * bh * bw].copy_from_slice(&v);
        } else {
            for c in 0..3 {
                for y in 0..h {
                    let dst = ((i * 3 + c) * bh + y) * bw;
                    pixels[dst..dst + w].copy_from_slice(&v[(c * h + y) * w..(c * h + y + 1) * w]);
                }
            }
            // transformers multiplies the f32 normalised boxes by the f64 ratios input / output
            // size (NumPy computes in f64), then keeps f32.
            let (sx, sy) = (w as f64 / bw as f64, h as f64 / bh as f64);
            for b in &mut o.boxes {
                let f = |v: f32, s: f64| (v as f64 * s) as f32;
                *b = [f(b[0], sx), f(b[1], sy), f(b[2], sx), f(b[3], sy)];
            }
        }
        objects.push(o);
    }
    let n = objects.len();
    (pixels, [n, 3, bh, bw], objects)
}

/// DETR's loss and pycocotools' mAP of `model` over `split`. The loss is the mean over the
/// images of each image's own loss (DETR normalises by the batch's object count, so a batched
/// loss would depend on the batch size): one image at a time.
pub fn evaluate_detection(
    model: &Yolos,
    split: &DetectionSet,
    proc: &ImageProcessor,
    device: Device,
) -> Result<DetEval> {
    let batch = 1usize;
    let (mut gts, mut dets) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0f64;
    let l = model.config().num_labels;
    for (chunk_i, chunk) in split.items.chunks(batch.max(1)).enumerate() {
        let refs: Vec<&DetItem> = chunk.iter().collect();
        let (px, shape, objects) = load_batch(&refs, proc, &Augment::NONE, &|_| 0)?;
        let pixels = Tensor::new_on(px, &shape, false, device)?;
        let tape = Tape::inference();
        let r = model.loss(&tape, &pixels, &objects, true)?;
        loss_sum += r.total.scalar()? as f64 * chunk.len() as f64;
        let det = r.detections;
        let logits = det.logits.try_to_vec()?;
        let boxes = det.boxes.try_to_vec()?;
        let q = model.config().num_detection_tokens;
        for (bi, it) in chunk.iter().enumerate() {
            let image = chunk_i * batch.max(1) + bi;
            let (h, w) = (it.size.0 as f64, it.size.1 as f64);
            for ((&c, b), &crowd) in it.classes.iter().zip(&it.boxes).zip(&it.crowd) {
                gts.push(GroundTruth {
                    image,
                    class: c,
                    bbox: [
                        (b[0] - b[2] / 2.0) as f64 * w,
                        (b[1] - b[3] / 2.0) as f64 * h,
                        b[2] as f64 * w,
                        b[3] as f64 * h,
                    ],
                    crowd,
                });
            }
            for qi in 0..q {
                let row = &logits[(bi * q + qi) * (l + 1)..(bi * q + qi + 1) * (l + 1)];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                let (best, score) = row[..l]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i, (v as f64 - m).exp() / z))
                    .fold((0, -1.0), |a, b| if b.1 > a.1 { b } else { a });
                let pb = &boxes[(bi * q + qi) * 4..(bi * q + qi + 1) * 4];
                dets.push(Detection {
                    image,
                    class: best,
                    bbox: [
                        (pb[0] - pb[2] / 2.0) as f64 * w,
                        (pb[1] - pb[3] / 2.0) as f64 * h,
                        pb[2] as f64 * w,
                        pb[3] as f64 * h,
                    ],
                    score,
                });
            }
        }
    }
    let MapReport {
        map,
        map50,
        per_class,
        ..
    } = coco_map(&gts, &dets, l);
    let n = split.items.len();
    Ok(DetEval {
        loss: loss_sum / n.max(1) as f64,
        map,
        map50,
        images: n,
        per_class,
    })
}

/// Whether a file of this name is one a detection run writes.
fn is_output(name: &str) -> bool {
    super::is_vision_output(name)
}

/// Runs a detection fine-tune of the YOLOS at `cfg.model` on `cfg.data` (a YOLO `data.yaml`,
/// or a COCO JSON with `cfg.eval_data` as its validation split); the events report evaluations
/// through `VisionEvent::Note` lines and steps through `VisionEvent::Step`. Returns the summary and the evaluations before and after.
pub fn train_detection(
    cfg: &VisionTrainConfig,
    force: bool,
    on_event: &mut dyn FnMut(VisionEvent),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(VisionSummary, Option<DetEval>, Option<DetEval>)> {
    let out = &cfg.out;
    cfg.validate()?;
    let mut inputs = vec![
        ("model directory (--model)", cfg.model.as_path()),
        ("training data (--data)", cfg.data.as_path()),
    ];
    inputs.extend(
        cfg.eval_data
            .as_deref()
            .map(|e| ("evaluation data (--eval-data)", e)),
    );
    outdir::check_not_input("--out", out, &inputs)?;
    outdir::DirLock::check_free(out)?;
    let found = outdir::inspect_output("--out", out, "lora train", Owned::Matching(&is_output))?;
    if matches!(found, Existing::Ours(_)) && !force {
        return Err(data_err(
            out,
            "output directory is not empty (pass --force to start over)",
        ));
    }
    let (train, val) = read_detection_data(&cfg.data, cfg.eval_data.as_deref())?;
    // The output must not land among the images or labels (it would join the data).
    for root in std::iter::once(&train.root).chain(val.as_ref().map(|v| &v.root)) {
        let labels = super::detect_data::label_path(&root.join("x.png"));
        for dir in [root.as_path(), labels.parent().unwrap_or(root)] {
            if outdir::resolve(out).starts_with(outdir::resolve(dir)) {
                return Err(data_err(
                    out,
                    format!("--out is inside {}: write the run elsewhere", dir.display()),
                ));
            }
        }
    }
    let mut note = |s: &str| on_event(VisionEvent::Note(s));
    let mut md = VisionModelDir::open(&cfg.model)?;
    md.set_labels(train.classes.clone());
    md.keep_known_classes = cfg.keep_classes;
    let proc = detection_processor(&md, cfg.image_size)?;
    let (mut model, head) = md.load_detector(cfg.seed)?;
    match head {
        HeadSource::Checkpoint => {}
        HeadSource::Missing => note("the checkpoint has no class head: a new one"),
        HeadSource::Mismatched(n) => note(&format!(
            "the checkpoint's class head has {} classes, the data {}: a new last class layer",
            n.saturating_sub(1),
            train.classes.len()
        )),
        HeadSource::Extended(n, 0) => note(&format!(
            "the checkpoint's class head has {n} rows, which do not fit its {} class names: a \
             new last class layer, nothing kept",
            md.checkpoint_labels.len()
        )),
        HeadSource::Extended(n, kept) => note(&format!(
            "the checkpoint's class head has {} classes, the data {}: a new last class layer \
             keeping the checkpoint's rows for the {} classes it already names and \"no object\" \
             (--keep-classes)",
            n.saturating_sub(1),
            train.classes.len(),
            kept.saturating_sub(1)
        )),
    }
    let mut peft = PeftConfig::new(cfg.rank, cfg.alpha, &[]);
    peft.target_modules = match &cfg.targets {
        // The classification default means nothing for YOLOS: its attention's original names.
        Targets::List(l) if l == &["q_proj".to_string(), "v_proj".to_string()] => {
            Targets::List(vec!["query".into(), "value".into()])
        }
        t => t.clone(),
    };
    peft.use_rslora = cfg.rslora;
    peft.modules_to_save = cfg
        .modules_to_save
        .clone()
        .unwrap_or_else(|| vec!["class_labels_classifier".into(), "bbox_predictor".into()]);
    peft.base_model_name_or_path = Some(cfg.model.to_string_lossy().to_string());
    inject(&mut model, &peft, cfg.seed)?;
    // A new (or re-ordered) class layer must train and be saved with the adapter: a frozen one
    // would stay as drawn, and nothing could rebuild it when the adapter is loaded.
    let class_layer = model.class_head.layers.last().map(|l| l.trained.is_some());
    if head != HeadSource::Checkpoint && class_layer != Some(true) {
        return Err(TrainError::Setting {
            setting: "modules-to-save",
            reason: "the class head's last layer is new for these classes, so it must train in \
                     full: keep class_labels_classifier in --modules-to-save"
                .into(),
        });
    }
    model.to_device(cfg.device)?;
    let trainable: Vec<Tensor> = adapter_tensors(&model)
        .into_iter()
        .map(|(_, t)| t.clone())
        .collect();
    let groups = vec![ParamGroup {
        params: trainable.clone(),
        lr_scale: 1.0,
    }];
    let mut opt: Box<dyn Optimizer> = OptimizerKind::AdamW.build(cfg.weight_decay);
    let eval = |m: &Yolos| -> Result<Option<DetEval>> {
        val.as_ref()
            .map(|v| evaluate_detection(m, v, &proc, cfg.device))
            .transpose()
    };
    let eval_before = eval(&model)?;
    if let Some(e) = &eval_before {
        note(&format!(
            "before training: eval loss {:.4} | mAP50 {:.4} | mAP {:.4} ({} images)",
            e.loss, e.map50, e.map, e.images
        ));
    }
    let existed = out.exists();
    let lock = outdir::DirLock::acquire(out)?;
    let mut run = || -> Result<(usize, f32, Option<DetEval>, f64, bool)> {
        if force {
            if let Existing::Ours(entries) = &found {
                outdir::remove_owned(entries)?;
            }
        }
        outdir::write_marker(out, "lora train", None)?;
        let mpath = out.join("metrics.jsonl");
        let mut metrics =
            std::fs::File::create(&mpath).map_err(|e| data_err(&mpath, e.to_string()))?;
        let mut line =
            |v: Value| writeln!(metrics, "{v}").map_err(|e| data_err(&mpath, e.to_string()));
        if let Some(e) = &eval_before {
            line(
                json!({"step": 0, "epoch": 0, "loss": null, "eval_loss": e.loss, "eval_map50": e.map50, "eval_map": e.map}),
            )?;
        }
        let n = train.items.len();
        let total = n.div_ceil(cfg.batch_size) * cfg.epochs;
        let t0 = Instant::now();
        let (mut step, mut last, mut images, mut after, mut interrupted) =
            (0usize, f32::NAN, 0usize, eval_before.clone(), false);
        'epochs: for epoch in 0..cfg.epochs {
            let order =
                crate::batches::Sampler::resume(n, cfg.seed ^ 0xDE7, epoch as u64, 0).take(n);
            for idx in order.chunks(cfg.batch_size) {
                let refs: Vec<&DetItem> = idx.iter().map(|&i| &train.items[i]).collect();
                let seed = cfg.seed;
                let key = |i: usize| {
                    lora_kernels::rng::splitmix64(seed ^ ((epoch as u64) << 40) ^ idx[i] as u64)
                };
                let (px, shape, objects) = load_batch(&refs, &proc, &cfg.augment, &key)?;
                let pixels = Tensor::new_on(px, &shape, false, cfg.device)?;
                let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total);
                let tape = Tape::new(lora_kernels::rng::splitmix64(
                    cfg.seed ^ ((step as u64) << 16),
                ));
                let loss = model.loss(&tape, &pixels, &objects, true)?;
                let l = loss.total.scalar()?;
                if !l.is_finite() {
                    return Err(data_err(
                        &cfg.data,
                        format!(
                            "loss is {l} at step {}; stopping before the update",
                            step + 1
                        ),
                    ));
                }
                let mut grads = tape.backward(&loss.total)?;
                let norm = clip_grad_norm(
                    &mut grads,
                    &trainable,
                    cfg.max_grad_norm.unwrap_or(f32::INFINITY),
                )?;
                if !norm.is_finite() {
                    return Err(data_err(
                        &cfg.data,
                        format!("gradient norm is {norm} at step {}", step + 1),
                    ));
                }
                opt.step(&groups, &grads, lr)?;
                step += 1;
                images += refs.len();
                last = l;
                let el = t0.elapsed().as_secs_f64();
                line(
                    json!({"step": step, "epoch": epoch + 1, "loss": l, "loss_ce": loss.loss_ce, "loss_bbox": loss.loss_bbox,
                            "loss_giou": loss.loss_giou, "lr": lr, "grad_norm": norm, "images_per_s": images as f64 / el.max(1e-9), "elapsed_s": el}),
                )?;
                on_event(VisionEvent::Step(step, total, l, lr));
                if stop.load(std::sync::atomic::Ordering::SeqCst) && step < total {
                    interrupted = true;
                    break 'epochs;
                }
            }
            after = eval(&model)?;
            if let Some(e) = &after {
                on_event(VisionEvent::Note(&format!(
                    "epoch {}: eval loss {:.4} | mAP50 {:.4} | mAP {:.4}",
                    epoch + 1,
                    e.loss,
                    e.map50,
                    e.map
                )));
                line(
                    json!({"step": step, "epoch": epoch + 1, "loss": null, "eval_loss": e.loss, "eval_map50": e.map50, "eval_map": e.map}),
                )?;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        lora_io::vision::save_adapter(&model, &peft, out)?;
        let mut v = lora_io::hf::read_json(&md.dir.join("config.json"))?;
        v["id2label"] = Value::Object(
            md.config
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
                .collect(),
        );
        v["label2id"] = Value::Object(
            md.config
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), Value::from(i)))
                .collect(),
        );
        write_atomic(
            &out.join("config.json"),
            serde_json::to_string_pretty(&v)
                .expect("serialises")
                .as_bytes(),
        )?;
        let pj = super::processor_json(&proc, &md.config.arch);
        write_atomic(
            &out.join("preprocessor_config.json"),
            serde_json::to_string_pretty(&pj)
                .expect("serialises")
                .as_bytes(),
        )?;
        let (tp, ep) = crate::plot::read_metrics(&mpath)?;
        crate::plot::write_loss_svg(&out.join("loss.svg"), &tp, &ep)?;
        Ok((
            step,
            last,
            if interrupted { None } else { after },
            images as f64 / secs.max(1e-9),
            interrupted,
        ))
    };
    let r = run();
    if r.is_err() {
        for f in ["metrics.jsonl", outdir::MARKER] {
            let _ = std::fs::remove_file(out.join(f));
        }
        if !existed {
            drop(lock);
            let _ = std::fs::remove_dir_all(out);
        }
    }
    let (steps, final_loss, eval_after, images_per_s, interrupted) = r?;
    let params = super::param_counts(&model);
    Ok((
        VisionSummary {
            steps,
            final_loss,
            eval_before: None,
            eval_after: None,
            images_per_s,
            params,
            interrupted,
        },
        eval_before,
        eval_after,
    ))
}

/// A detector with an adapter from a detection run's output (its `config.json` gives the
/// classes) and its processor.
pub fn load_detector_for_inference(
    model: &Path,
    adapter: Option<&Path>,
) -> Result<(Vec<String>, Yolos, ImageProcessor)> {
    let mut md = VisionModelDir::open(model)?;
    if let Some(a) = adapter {
        if a.join("config.json").exists() {
            md.set_labels(VisionModelDir::open(a)?.config.labels);
        }
    }
    let mut proc = detection_processor(&md, None)?;
    if let Some(a) = adapter {
        // The run's own processor settings (its size, when it trained at --image-size).
        let pp = a.join("preprocessor_config.json");
        if pp.exists() {
            proc = ImageProcessor::from_file(&pp, &proc)?;
        }
    }
    let (mut m, _) = md.load_detector(0)?;
    if let Some(a) = adapter {
        lora_io::vision::load_adapter(&mut m, a)?;
    }
    Ok((md.config.labels.clone(), m, proc))
}
