//! Image classification from the command line: `lora train` on a ViT or ResNet directory and an
//! ImageFolder tree, `lora eval` on such a tree, `lora predict` on one image.

use crate::args::{EvalArgs, PredictArgs, TrainArgs};
use crate::hub;
use anyhow::{Context, Result};
use lora_core::models::VisionModel;
use lora_core::{Device, Tape, Tensor};
use lora_io::peft::Targets;
use lora_io::vision::VisionArch;
use lora_train::vision::{
    data::{eval_split, load_batch, Augment},
    evaluate, load_for_inference, train_vision, VisionEvent, VisionTrainConfig,
};
use std::path::Path;
use std::sync::atomic::Ordering;

/// Whether `model` (with `--task`) is an image task: `config.json`'s `model_type` is a vision
/// architecture, or an `architectures` entry ends in `ForImageClassification`.
pub fn is_image_task(model: &Path, task: &str) -> Result<bool> {
    match task {
        "causal-lm" => return Ok(false),
        "image-classification" => return Ok(true),
        "auto" => {}
        other => anyhow::bail!(
            "--task must be auto, causal-lm or image-classification, got `{other}` (object \
             detection is not supported yet)"
        ),
    }
    let path = model.join("config.json");
    if !path.exists() {
        return Ok(false); // the text path names the missing file
    }
    let v = lora_io::hf::read_json(&path)?;
    let mt = v["model_type"].as_str().unwrap_or("");
    let by_arch = v["architectures"].as_array().is_some_and(|a| {
        a.iter().any(|x| {
            x.as_str()
                .is_some_and(|s| s.ends_with("ForImageClassification"))
        })
    });
    Ok(lora_io::vision::is_vision_model_type(mt) || by_arch)
}

/// `lora train` on an image classifier.
pub fn train(a: TrainArgs, device: Device, note: &str) -> Result<()> {
    if a.resume {
        anyhow::bail!(
            "--resume: image-classification runs do not checkpoint yet; start over with --force"
        );
    }
    let md = lora_io::vision::VisionModelDir::open(&a.model)?;
    let detector = matches!(md.config.arch, VisionArch::Yolos(_));
    for (set, flag) in [
        (a.steps.is_some(), "--steps (image runs count --epochs)"),
        (a.pack, "--pack"),
        (a.assistant_only_loss, "--assistant-only-loss"),
        (
            a.eval_data.is_some() && !detector,
            "--eval-data (put the held-out images in val/)",
        ),
        (a.grad_accum != 1, "--grad-accum"),
        (a.loraplus_ratio != 1.0, "--loraplus-ratio"),
        (a.dropout != 0.0, "--dropout"),
        (a.gradient_checkpointing, "--gradient-checkpointing"),
    ] {
        if set {
            anyhow::bail!("{flag} does not apply to image runs");
        }
    }
    if !a.json {
        outln!("{note}");
    }
    let targets = match &a.target {
        Some(t) => Targets::from_flag(t),
        None => match md.config.arch {
            VisionArch::Vit(_) => Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            VisionArch::ResNet(_) => Targets::List(vec!["convolution".into()]),
            VisionArch::Yolos(_) => Targets::List(vec!["query".into(), "value".into()]),
        },
    };
    let epochs = match a.epochs {
        None => 3,
        Some(e) if e >= 1.0 && e.fract() == 0.0 => e as usize,
        Some(e) => anyhow::bail!(
            "--epochs must be a whole number of passes for image classification, got {e}"
        ),
    };
    let schedule = match a.schedule.as_str() {
        "cosine" => lora_train::optim::Schedule::Cosine,
        "linear" => lora_train::optim::Schedule::Linear,
        "constant" => lora_train::optim::Schedule::Constant,
        other => anyhow::bail!("--schedule must be cosine, linear or constant, got `{other}`"),
    };
    if a.optimizer != "adamw" {
        anyhow::bail!("--optimizer: image classification trains with adamw");
    }
    let cfg = VisionTrainConfig {
        targets,
        modules_to_save: a.modules_to_save.as_ref().map(|m| {
            m.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        }),
        rank: a.rank.unwrap_or(8),
        alpha: a.alpha.unwrap_or(16.0),
        rslora: a.rslora,
        lr: a.lr.unwrap_or(5e-3),
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        schedule,
        epochs,
        batch_size: a.batch_size,
        max_grad_norm: (a.max_grad_norm != 0.0).then_some(a.max_grad_norm),
        seed: a.seed,
        augment: Augment {
            flip: !a.no_flip,
            min_scale: a.scale_jitter,
        },
        image_size: a.image_size,
        keep_classes: a.keep_classes,
        eval_data: a.eval_data.clone(),
        device,
        ..VisionTrainConfig::new(&a.model, &a.data, &a.out)
    };
    crate::train::install_signal_handlers();
    let pool = crate::bench::pool(a.threads)?;
    let json = a.json;
    let every = a.log_every;
    if every == Some(0) {
        anyhow::bail!("--log-every must be at least 1");
    }
    if detector {
        return train_detector(&cfg, &a, pool, device);
    }
    let sum = pool.install(|| {
        train_vision(
            &cfg,
            a.force,
            &mut |ev| match ev {
                VisionEvent::Note(n) => eprintln!("note: {n}"),
                VisionEvent::Step(step, total, loss, lr) => {
                    crate::train::STARTED.store(true, Ordering::SeqCst);
                    let every = every.unwrap_or(total.div_ceil(20).max(1));
                    if !json && (step % every == 0 || step == total || step == 1) {
                        outln!("step {step:>5}/{total} | loss {loss:.4} | lr {lr:.2e}");
                    }
                }
                VisionEvent::Eval(epoch, r) => {
                    if !json {
                        outln!(
                            "epoch {epoch}: eval loss {:.4} | accuracy {:.2}% ({} images)",
                            r.loss,
                            100.0 * r.accuracy,
                            r.examples
                        );
                    }
                }
            },
            &crate::train::STOP,
        )
    })?;
    if !sum.interrupted {
        crate::train::clear_signal();
    }
    let report = |r: &Option<lora_train::vision::EvalReport>| {
        r.map(
            |r| serde_json::json!({"loss": r.loss, "accuracy": r.accuracy, "examples": r.examples}),
        )
    };
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "steps": sum.steps, "final_loss": sum.final_loss, "eval_before": report(&sum.eval_before),
                "eval_after": report(&sum.eval_after), "images_per_s": sum.images_per_s,
                "trainable_params": sum.params.0, "all_params": sum.params.1, "out": cfg.out,
                "peak_rss_bytes": crate::train_bench::peak_rss_bytes(), "interrupted": sum.interrupted,
                "device": device.to_string(),
            })
        );
    } else {
        let (t, all) = sum.params;
        outln!(
            "trainable params: {t} || all params: {all} || trainable%: {:.4}",
            100.0 * t as f64 / all.max(1) as f64
        );
        outln!(
            "{} steps, {:.1} images/s; final train loss {:.4}",
            sum.steps,
            sum.images_per_s,
            sum.final_loss
        );
        if let (Some(b), Some(e)) = (&sum.eval_before, &sum.eval_after) {
            outln!(
                "eval accuracy {:.2}% -> {:.2}% (loss {:.4} -> {:.4})",
                100.0 * b.accuracy,
                100.0 * e.accuracy,
                b.loss,
                e.loss
            );
        }
        if sum.interrupted {
            outln!("interrupted at step {}: the adapter so far is written (image runs cannot resume yet)", sum.steps);
        }
        outln!(
            "adapter: {0}/adapter_model.safetensors (+ config.json with the classes) | metrics: {0}/metrics.jsonl",
            cfg.out.display()
        );
    }
    Ok(())
}

/// `lora train` on a detector (YOLOS) and a YOLO `data.yaml`.
fn train_detector(
    cfg: &VisionTrainConfig,
    a: &TrainArgs,
    pool: rayon::ThreadPool,
    device: Device,
) -> Result<()> {
    let json = a.json;
    let every = a.log_every;
    let (sum, before, after) = pool.install(|| {
        lora_train::vision::detect::train_detection(
            cfg,
            a.force,
            &mut |ev| match ev {
                VisionEvent::Note(n) => {
                    if !json {
                        eprintln!("note: {n}")
                    }
                }
                VisionEvent::Step(step, total, loss, lr) => {
                    crate::train::STARTED.store(true, Ordering::SeqCst);
                    let every = every.unwrap_or(total.div_ceil(20).max(1));
                    if !json && (step % every == 0 || step == total || step == 1) {
                        outln!("step {step:>5}/{total} | loss {loss:.4} | lr {lr:.2e}");
                    }
                }
                VisionEvent::Eval(..) => {}
            },
            &crate::train::STOP,
        )
    })?;
    if !sum.interrupted {
        crate::train::clear_signal();
    }
    let rep = |e: &Option<lora_train::vision::detect::DetEval>| {
        e.as_ref().map(|e| serde_json::json!({"loss": e.loss, "map50": e.map50, "map": e.map, "images": e.images}))
    };
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "steps": sum.steps, "final_loss": sum.final_loss, "eval_before": rep(&before), "eval_after": rep(&after),
                "images_per_s": sum.images_per_s, "trainable_params": sum.params.0, "all_params": sum.params.1,
                "out": cfg.out, "interrupted": sum.interrupted, "device": device.to_string(),
            })
        );
    } else {
        outln!(
            "{} steps, {:.1} images/s; final train loss {:.4}",
            sum.steps,
            sum.images_per_s,
            sum.final_loss
        );
        if let (Some(b), Some(e)) = (before, after) {
            outln!(
                "eval mAP50 {:.4} -> {:.4}, mAP {:.4} -> {:.4} (loss {:.4} -> {:.4})",
                b.map50,
                e.map50,
                b.map,
                e.map,
                b.loss,
                e.loss
            );
        }
        outln!("adapter: {}/adapter_model.safetensors", cfg.out.display());
    }
    Ok(())
}

/// `lora eval` on an image classifier: `{"loss", "accuracy", "examples"}` over the tree's
/// `val/` split (or the folder itself); on a detector, `{"loss", "map50", "map", "images"}`
/// over a `data.yaml`'s `val` split.
pub fn eval(a: &EvalArgs, device: Device) -> Result<()> {
    let md = lora_io::vision::VisionModelDir::open(&a.model.model)?;
    if let VisionArch::Yolos(_) = md.config.arch {
        let (labels, det, proc) = lora_train::vision::detect::load_detector_for_inference(
            &a.model.model,
            a.model.adapter.as_deref(),
        )?;
        det.to_device(device)?;
        let coco = lora_train::vision::detect_data::is_coco(&a.data);
        let (train, val) = lora_train::vision::detect_data::read_detection_data(&a.data, None)?;
        if train.classes != labels {
            anyhow::bail!(
                "{}: the data's classes ({}) are not the model's ({})",
                a.data.display(),
                train.classes.join(", "),
                labels.join(", ")
            );
        }
        // A COCO JSON is itself the evaluation set; a data.yaml names its `val` split.
        let val = match (coco, val) {
            (true, _) => train,
            (false, v) => {
                v.with_context(|| format!("{}: no `val` split to evaluate", a.data.display()))?
            }
        };
        let r = lora_train::vision::detect::evaluate_detection(&det, &val, &proc, device)?;
        if a.json {
            outln!(
                "{}",
                serde_json::json!({"loss": r.loss, "map50": r.map50, "map": r.map, "images": r.images})
            );
        } else {
            outln!(
                "loss {:.4} | mAP50 {:.4} | mAP {:.4} | {} images",
                r.loss,
                r.map50,
                r.map,
                r.images
            );
        }
        return Ok(());
    }
    let (_, model, proc) = load_for_inference(&a.model.model, a.model.adapter.as_deref())?;
    model.to_device(device)?;
    let split = eval_split(&a.data)?;
    let labels: Vec<String> = lora_io::vision::VisionModelDir::open(
        a.model
            .adapter
            .as_deref()
            .filter(|p| p.join("config.json").exists())
            .unwrap_or(&a.model.model),
    )?
    .config
    .labels;
    let split = split
        .relabel(&labels)
        .context("the evaluation classes must be the model's (config.json's id2label)")?;
    let r = evaluate(model.as_ref(), &split, &proc, 16, device)?;
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"loss": r.loss, "accuracy": r.accuracy, "examples": r.examples})
        );
    } else {
        outln!(
            "loss {:.4} | accuracy {:.2}% | {} images",
            r.loss,
            100.0 * r.accuracy,
            r.examples
        );
    }
    Ok(())
}

/// `lora predict`: the top classes of one image.
pub fn predict(mut a: PredictArgs) -> Result<()> {
    a.model.model = hub::model_dir(&a.model.model, a.model.revision.as_deref())?;
    if let VisionArch::Yolos(_) = lora_io::vision::VisionModelDir::open(&a.model.model)?
        .config
        .arch
    {
        return predict_boxes(&a);
    }
    if a.save.is_some() {
        anyhow::bail!("--save draws detections; this model is a classifier");
    }
    let (md, model, proc) = load_for_inference(&a.model.model, a.model.adapter.as_deref())?;
    let labels = match a
        .model
        .adapter
        .as_deref()
        .filter(|p| p.join("config.json").exists())
    {
        Some(p) => lora_io::vision::VisionModelDir::open(p)?.config.labels,
        None => md.config.labels.clone(),
    };
    let item = (a.image.clone(), 0usize);
    let (px, shape, _) = load_batch(&[&item], &proc, &Augment::NONE, &|_| 0)?;
    let logits = model
        .forward(&Tape::inference(), &Tensor::new(px, &shape)?, true)?
        .try_to_vec()?;
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    let mut ranked: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, (v as f64 - m).exp() / z))
        .collect();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
    ranked.truncate(a.top.max(1));
    let name = |i: usize| {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    };
    if a.json {
        let preds: Vec<_> = ranked
            .iter()
            .map(|&(i, p)| serde_json::json!({"label": name(i), "id": i, "score": p}))
            .collect();
        outln!("{}", serde_json::json!({ "predictions": preds }));
    } else {
        for (i, p) in ranked {
            outln!("{:>6.2}%  {}", 100.0 * p, name(i));
        }
    }
    Ok(())
}

/// Distinct colours for classes.
const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
];

/// A detected box: class id, score, `[x0, y0, x1, y1]` in the image's pixels.
pub(crate) type Found = (usize, f64, [f64; 4]);

/// The boxes `det` finds in `img` scoring at least `conf`, best first.
pub(crate) fn detect_boxes(
    det: &lora_core::models::yolos::Yolos,
    num_labels: usize,
    proc: &lora_io::images::ImageProcessor,
    img: &lora_io::images::Rgb8,
    conf: f64,
) -> Result<Vec<Found>> {
    if let Some(why) = proc.refuses(img) {
        anyhow::bail!("{why}");
    }
    let (px, h, w) = proc.pixels(img);
    let out = det.forward(&Tape::inference(), &Tensor::new(px, &[1, 3, h, w])?, true)?;
    let (logits, boxes) = (out.logits.try_to_vec()?, out.boxes.try_to_vec()?);
    let l = num_labels;
    let (ih, iw) = (img.height as f64, img.width as f64);
    let mut found = Vec::new();
    for (row, b) in logits.chunks(l + 1).zip(boxes.chunks(4)) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        let (id, p) = row[..l]
            .iter()
            .enumerate()
            .map(|(i, &v)| (i, (v as f64 - m).exp() / z))
            .fold((0, -1.0), |x, y| if y.1 > x.1 { y } else { x });
        if p >= conf {
            let (cx, cy, bw, bh) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
            found.push((
                id,
                p,
                [
                    (cx - bw / 2.0) * iw,
                    (cy - bh / 2.0) * ih,
                    (cx + bw / 2.0) * iw,
                    (cy + bh / 2.0) * ih,
                ],
            ));
        }
    }
    found.sort_by(|x, y| y.1.total_cmp(&x.1));
    Ok(found)
}

/// `img` enlarged `zoom` times (nearest neighbour) with `found`'s boxes drawn and labelled in
/// their class colours.
pub(crate) fn annotate(
    img: &lora_io::images::Rgb8,
    found: &[Found],
    labels: &[String],
    zoom: usize,
) -> lora_io::images::Rgb8 {
    let z = zoom.max(1);
    let (h, w) = (img.height * z, img.width * z);
    let mut data = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            let s = ((y / z) * img.width + x / z) * 3;
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    let mut canvas = lora_io::images::Rgb8::new(h, w, data).expect("h * w * 3 bytes");
    for (id, p, bx) in found {
        let c = PALETTE[id % PALETTE.len()];
        let bx = bx.map(|v| v * z as f64);
        draw_box(&mut canvas, &bx, c);
        draw_label(
            &mut canvas,
            &format!("{} {:.0}%", labels[*id], 100.0 * p),
            &bx,
            c,
        );
    }
    canvas
}

/// `lora predict` on a detector: the boxes scoring at least `--conf`.
fn predict_boxes(a: &PredictArgs) -> Result<()> {
    let (labels, det, proc) = lora_train::vision::detect::load_detector_for_inference(
        &a.model.model,
        a.model.adapter.as_deref(),
    )?;
    let img = lora_io::images::Rgb8::open(&a.image)?;
    let found = detect_boxes(&det, labels.len(), &proc, &img, a.conf as f64)?;
    if let Some(path) = &a.save {
        if path.exists() {
            anyhow::bail!("--save {}: the file exists; lora predict never replaces a file (choose a new name)", path.display());
        }
        annotate(&img, &found, &labels, 1).save_png(path)?;
    }
    if a.json {
        let preds: Vec<_> = found
            .iter()
            .map(|(id, p, b)| serde_json::json!({"label": labels[*id], "id": id, "score": p, "box": b}))
            .collect();
        outln!("{}", serde_json::json!({ "predictions": preds }));
    } else {
        if found.is_empty() {
            outln!("no box scores {} or more", a.conf);
        }
        for (id, p, b) in &found {
            outln!(
                "{:>6.2}%  {}  [{:.1}, {:.1}, {:.1}, {:.1}]",
                100.0 * p,
                labels[*id],
                b[0],
                b[1],
                b[2],
                b[3]
            );
        }
        if let Some(p) = &a.save {
            let legend: Vec<String> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| format!("{l} = rgb{:?}", PALETTE[i % PALETTE.len()]))
                .collect();
            outln!(
                "wrote {} (boxes labelled; colours: {})",
                p.display(),
                legend.join(", ")
            );
        }
    }
    Ok(())
}

/// A 2-pixel rectangle outline, clipped to the image.
fn draw_box(img: &mut lora_io::images::Rgb8, b: &[f64; 4], c: [u8; 3]) {
    let (w, h) = (img.width as i64, img.height as i64);
    let clamp = |v: f64, hi: i64| (v.round() as i64).clamp(0, hi - 1);
    let (x0, y0, x1, y1) = (
        clamp(b[0], w),
        clamp(b[1], h),
        clamp(b[2], w),
        clamp(b[3], h),
    );
    let mut put = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            let p = ((y * w + x) * 3) as usize;
            img.data[p..p + 3].copy_from_slice(&c);
        }
    };
    for t in 0..2 {
        for x in x0..=x1 {
            put(x, y0 + t);
            put(x, y1 - t);
        }
        for y in y0..=y1 {
            put(x0 + t, y);
            put(x1 - t, y);
        }
    }
}

/// A 3x5 pixel font for labels: lowercase letters (upper case drawn the same), digits and a few
/// signs; each glyph is 5 rows of 3 bits, the high bit leftmost. Anything else draws as `?`.
fn glyph(ch: char) -> [u8; 5] {
    match ch.to_ascii_lowercase() {
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [6, 1, 2, 4, 7],
        '3' => [6, 1, 2, 1, 6],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 6, 1, 6],
        '6' => [3, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 6],
        '.' => [0, 0, 0, 0, 2],
        '%' => [5, 1, 2, 4, 5],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ' ' => [0, 0, 0, 0, 0],
        _ => [6, 1, 2, 0, 2],
    }
}

/// `text` in black on a tag of colour `c` at the box's top-left corner (above the box when
/// there is room, else inside it), glyphs at twice the font's size, clipped to the image.
fn draw_label(img: &mut lora_io::images::Rgb8, text: &str, b: &[f64; 4], c: [u8; 3]) {
    const S: i64 = 2; // pixels per font pixel
    let (w, h) = (img.width as i64, img.height as i64);
    let n = text.chars().count() as i64;
    let (tw, th) = (n * 4 * S + S, 5 * S + 2 * S);
    let x0 = (b[0].round() as i64).clamp(0, (w - 1).max(0));
    let top = b[1].round() as i64;
    let y0 = if top - th >= 0 {
        top - th
    } else {
        top.clamp(0, (h - 1).max(0))
    };
    let mut put = |x: i64, y: i64, v: [u8; 3]| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            let p = ((y * w + x) * 3) as usize;
            img.data[p..p + 3].copy_from_slice(&v);
        }
    };
    for y in y0..y0 + th {
        for x in x0..x0 + tw {
            put(x, y, c);
        }
    }
    for (k, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        let gx = x0 + S + k as i64 * 4 * S;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..S {
                        for dx in 0..S {
                            put(gx + col * S + dx, y0 + S + row as i64 * S + dy, [0, 0, 0]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_drawn_on_a_tag_above_the_box() {
        let mut img = lora_io::images::Rgb8::new(40, 60, vec![255; 40 * 60 * 3]).unwrap();
        draw_label(&mut img, "t1", &[10.0, 30.0, 50.0, 39.0], [200, 0, 0]);
        fn px(img: &lora_io::images::Rgb8, x: usize, y: usize) -> [u8; 3] {
            let p = (y * img.width + x) * 3;
            [img.data[p], img.data[p + 1], img.data[p + 2]]
        }
        // The tag: 2 glyphs x 8 + 2 = 18 wide, 14 high, ending at the box's top (y 30).
        assert_eq!(px(&img, 10, 16), [200, 0, 0]);
        assert_eq!(px(&img, 27, 29), [200, 0, 0]);
        assert_eq!(px(&img, 28, 29), [255, 255, 255], "nothing past the tag");
        // 't': its top row is 3 pixels on (black), its second row only the middle one.
        let (gx, gy) = (12, 18);
        for col in 0..3 {
            assert_eq!(
                px(&img, gx + 2 * col, gy),
                [0, 0, 0],
                "top of t, column {col}"
            );
        }
        assert_eq!(px(&img, gx, gy + 2), [200, 0, 0]);
        assert_eq!(px(&img, gx + 2, gy + 2), [0, 0, 0]);
        // A box at the top edge: the tag goes inside it, and nothing is drawn out of bounds.
        draw_label(&mut img, "x%_?", &[55.0, 0.0, 70.0, 5.0], [0, 0, 200]);
        assert_eq!(px(&img, 55, 0), [0, 0, 200]);
    }
}
