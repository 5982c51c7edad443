//! `lora demo --task detect`: the factory story. A tiny YOLOS (shipped in `demo/detect/base`,
//! pretrained by `lora demo --task detect --build` with this project's own full-parameter
//! training on generated images of generic shapes) learns, through a LoRA adapter and its
//! heads, to find rare defects (scratches, holes, rust) on generated images of metal parts,
//! while it keeps finding the parts (circles and squares, classes it already knew). Reports
//! mAP before and after, per class, and writes annotated validation images.

use crate::demo_detect_data::{self as data, FACTORY, SHAPES};
use anyhow::{bail, Context, Result};
use lora_core::models::vit::Activation;
use lora_core::models::yolos::YolosConfig;
use lora_io::images::{ImageProcessor, Resize, IMAGENET_DEFAULT};
use lora_io::peft::Targets;
use lora_train::optim::Schedule;
use lora_train::vision::data::Augment;
use lora_train::vision::detect::DetEval;
use lora_train::vision::{VisionEvent, VisionTrainConfig};
use std::path::{Path, PathBuf};

/// Seeds of the committed base model; `--build` with the defaults reproduces it (for the same
/// thread count and CPU: the kernels' summation order follows both).
const SHAPES_SEED: u64 = 20261130;
const MODEL_SEED: u64 = 3;
/// The factory dataset's seed.
const FACTORY_SEED: u64 = 11;
/// Image side (pixels) of every demo image.
pub const SIDE: usize = 64;
/// Pretraining steps of the committed base (batch 32).
const PRETRAIN_STEPS: usize = 10_000;
/// The base model's `initializer_range`.
const INIT_STD: f64 = 0.02;

/// The base model's architecture.
pub fn base_config() -> YolosConfig {
    YolosConfig {
        hidden_size: 96,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 384,
        hidden_act: Activation::GeluErf,
        layer_norm_eps: 1e-12,
        image_size: (SIDE, SIDE),
        patch_size: 8,
        num_channels: 3,
        qkv_bias: true,
        num_detection_tokens: 10,
        use_mid_position_embeddings: true,
        num_labels: SHAPES.len(),
        costs: (1.0, 5.0, 2.0),
        bbox_loss_coefficient: 5.0,
        giou_loss_coefficient: 2.0,
        eos_coefficient: 0.1,
    }
}

/// The processor of the demo's images: already at the model's size, rescaled and normalised
/// as YOLOS's processor does (ImageNet statistics).
fn processor() -> ImageProcessor {
    ImageProcessor {
        resize: Some(Resize::Exact(SIDE, SIDE)),
        filter: lora_io::images::Filter::Bilinear,
        rescale: Some(1.0 / 255.0),
        normalize: Some(IMAGENET_DEFAULT),
    }
}

/// The base model's directory inside the demo directory.
pub fn base_dir(demo: &Path) -> PathBuf {
    demo.join("detect/base")
}

/// What `lora demo --task detect --build` runs.
pub struct BuildRun {
    pub dir: PathBuf,
    pub pretrain_steps: usize,
    pub threads: Option<usize>,
}

/// Pretrains the demo detector from scratch on generated shapes and writes `dir/detect/base`.
pub fn build(r: &BuildRun) -> Result<()> {
    let base = base_dir(&r.dir);
    if r.pretrain_steps == 0 {
        bail!("--pretrain-steps must be at least 1");
    }
    const FILES: [&str; 3] = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ];
    lora_io::outdir::inspect_output(
        "--dir",
        &base,
        "lora demo --build",
        lora_io::outdir::Owned::Listed,
    )?;
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let files: Vec<String> = FILES.iter().map(|s| s.to_string()).collect();
    lora_io::outdir::write_marker(&base, "lora demo --build", Some(&files))?;
    let cfg = lora_train::vision::pretrain::DetPretrainConfig {
        model: base_config(),
        labels: SHAPES.iter().map(|s| s.to_string()).collect(),
        out: base.clone(),
        steps: r.pretrain_steps,
        batch_size: 32,
        lr: 1e-3,
        warmup: 200,
        weight_decay: 1e-4,
        init_std: INIT_STD,
        seed: MODEL_SEED,
    };
    outln!(
        "pretraining the demo detector (YOLOS, {} layers, width {}, {} detection tokens, {}x{} images) for {} steps on generated shapes ({})",
        cfg.model.num_hidden_layers,
        cfg.model.hidden_size,
        cfg.model.num_detection_tokens,
        SIDE,
        SIDE,
        cfg.steps,
        SHAPES.join(", ")
    );
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    let proc = processor();
    let mut ema = f32::NAN;
    let sum = crate::bench::pool(r.threads)?.install(|| {
        lora_train::vision::pretrain::pretrain_detector(
            &cfg,
            &proc,
            &|i| data::shapes_image(SHAPES_SEED, i, SIDE),
            &mut |step, _, loss| {
                ema = if ema.is_nan() {
                    loss
                } else {
                    0.98 * ema + 0.02 * loss
                };
                bar.set_position(step as u64);
                bar.set_message(format!("loss {ema:.3}"));
                if step % 500 == 0 {
                    bar.suspend(|| outln!("step {step}: loss {ema:.3} (moving average)"));
                }
            },
        )
    });
    bar.finish();
    let sum = sum?;
    outln!(
        "{} parameters; loss {:.3} (first 10% of steps) -> {:.3} (last 10%) in {:.0} s; wrote {}",
        sum.params,
        sum.first_loss,
        sum.last_loss,
        sum.seconds,
        base.display()
    );
    // The result on shapes it has not seen.
    // A scratch folder of our own (a new name; never one that was there before).
    let scratch = std::env::temp_dir().join(format!(
        "lora-demo-detect-build-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let held_out = data::write_yolo(&scratch, &SHAPES, "held-out shapes", (0, 200), &|i| {
        data::shapes_image(SHAPES_SEED, (1 << 40) + i, SIDE)
    });
    let e = held_out.and_then(|_| {
        let names: Vec<String> = SHAPES.map(String::from).to_vec();
        let val =
            lora_train::vision::detect_data::read_yolo_split(&scratch.join("images/val"), &names)?;
        let md = lora_io::vision::VisionModelDir::open(&base)?;
        let (model, _) = md.load_detector(0)?;
        Ok(crate::bench::pool(r.threads)?.install(|| {
            lora_train::vision::detect::evaluate_detection(
                &model,
                &val,
                &proc,
                lora_core::Device::Cpu,
            )
        })?)
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let e = e?;
    outln!(
        "on {} held-out shape images: mAP@0.5 {:.3}, mAP@[.5:.95] {:.3} (AP@0.5: {})",
        e.images,
        e.map50,
        e.map,
        per_class_line(&SHAPES.map(String::from), &e)
    );
    Ok(())
}

/// Factory images in the training and validation splits.
const TRAIN_IMAGES: usize = 1000;
const VAL_IMAGES: usize = 200;
/// The share of parts with a defect.
const DEFECT_RATE: f64 = 0.4;
/// Default training epochs.
const EPOCHS: usize = 24;
/// The score a box needs to be drawn.
const DRAW_CONF: f64 = 0.5;

/// What `lora demo --task detect` runs.
pub struct DemoRun {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    pub threads: Option<usize>,
    pub samples: usize,
    pub json: bool,
}

/// The output directory's entries (all of them the demo's).
const OUT_ENTRIES: [&str; 3] = ["data", "adapter", "predictions"];

fn per_class_line(labels: &[String], e: &DetEval) -> String {
    labels
        .iter()
        .zip(&e.per_class)
        .filter_map(|(l, ap)| ap.map(|ap| format!("{l} {:.2}", ap[1])))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `rel` (a path inside a demo output, `/`-separated) is one the demo writes: its data
/// tree (`data.yaml`, `images|labels/train|val/NNNN.png|txt`), the adapter folder's files and
/// the drawn `predictions/NNNN.png`.
fn demo_writes(rel: &[String], is_dir: bool) -> bool {
    let numbered = |n: &str, ext: &str| {
        n.strip_suffix(ext)
            .is_some_and(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_digit()))
    };
    let split = |s: &str| s == "train" || s == "val";
    let marker = |n: &str| n == lora_io::outdir::MARKER || n == lora_io::outdir::LOCK;
    match rel
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [top] => OUT_ENTRIES.contains(top) && is_dir || marker(top),
        ["data", "data.yaml"] => !is_dir,
        ["data", kind] => is_dir && (*kind == "images" || *kind == "labels"),
        ["data", _, sp] => is_dir && split(sp),
        ["data", "images", sp, f] => !is_dir && split(sp) && numbered(f, ".png"),
        ["data", "labels", sp, f] => !is_dir && split(sp) && numbered(f, ".txt"),
        ["predictions", f] => !is_dir && numbered(f, ".png"),
        ["adapter", f] => !is_dir && (lora_train::vision::is_vision_output(f) || marker(f)),
        _ => false,
    }
}

/// Refuses an earlier output that holds anything the demo did not write (named), so that
/// replacing it loses nothing of anyone else's: each entry of `out`, at any depth, must be one
/// `writes(path components, is_dir)` says `command` writes (never a symlink).
pub fn check_own_tree(
    out: &Path,
    command: &str,
    writes: &dyn Fn(&[String], bool) -> bool,
) -> Result<()> {
    let mut stack = vec![(out.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let mut r = rel.clone();
            r.push(e.file_name().to_string_lossy().to_string());
            let ty = e
                .file_type()
                .with_context(|| format!("reading {}", e.path().display()))?;
            if ty.is_symlink() || !writes(&r, ty.is_dir()) {
                bail!(
                    "--out {}: holds {}, which `{command}` did not write; the demo replaces only its own output (choose another --out or remove it yourself)",
                    out.display(),
                    e.path().display()
                );
            }
            if ty.is_dir() {
                stack.push((e.path(), r));
            }
        }
    }
    Ok(())
}

/// Trains the factory adapter and reports before/after.
pub fn run(r: &DemoRun) -> Result<()> {
    let base = base_dir(&r.dir);
    if !base.join("model.safetensors").exists() {
        bail!(
            "{}: missing; the demo needs the repository's demo/ directory (pass --dir) or a rebuild with `lora demo --task detect --build`",
            base.join("model.safetensors").display()
        );
    }
    if r.epochs == 0 {
        bail!("--steps (epochs for the detection demo) must be at least 1");
    }
    // An earlier demo output is replaced; anything else there is refused (see outdir), down
    // to a file of someone else's inside one of the demo's folders.
    if r.out.join(lora_io::outdir::MARKER).exists() {
        check_own_tree(&r.out, "lora demo --task detect", &demo_writes)?;
    }
    lora_io::outdir::DirLock::check_free(&r.out)?;
    lora_io::outdir::prepare_dir_output(
        "--out",
        &r.out,
        "lora demo --task detect",
        &OUT_ENTRIES,
        true,
        &[("the demo directory (--dir)", &r.dir)],
    )?;
    let _lock = lora_io::outdir::DirLock::acquire(&r.out)?;
    let data_dir = r.out.join("data");
    let yaml = data::write_factory(
        &data_dir,
        FACTORY_SEED,
        (TRAIN_IMAGES, VAL_IMAGES),
        SIDE,
        DEFECT_RATE,
    )?;
    let labels: Vec<String> = FACTORY.iter().map(|s| s.to_string()).collect();
    if !r.json {
        outln!(
            "lora demo --task detect: a LoRA adapter teaches a tiny YOLOS detector ({})\n\
             to find rare defects on metal parts: {}. The base model was pretrained by this project\n\
             on generated images of generic shapes ({}); it has never seen a defect.\n\
             Data (YOLO layout): {} ({} training and {} validation images, a defect on {:.0}% of the parts).",
            base.display(),
            FACTORY[SHAPES.len()..].join(", "),
            SHAPES.join(", "),
            yaml.display(),
            TRAIN_IMAGES,
            VAL_IMAGES,
            100.0 * DEFECT_RATE
        );
    }
    let mut cfg = VisionTrainConfig::new(&base, &yaml, &r.out.join("adapter"));
    cfg.rank = 16;
    cfg.alpha = 32.0;
    // Every linear layer of the encoder (attention and MLP: `dense` names three of them), for
    // capacity on defects the base never saw (PEFT's recipe uses query/value only).
    cfg.targets = Targets::List(
        ["query", "key", "value", "dense"]
            .map(String::from)
            .to_vec(),
    );
    cfg.lr = 3e-3;
    cfg.schedule = Schedule::Cosine;
    cfg.warmup = 20;
    cfg.epochs = r.epochs;
    cfg.batch_size = 8;
    cfg.augment = Augment {
        flip: true,
        min_scale: 1.0,
    };
    cfg.keep_classes = true;
    crate::train::install_signal_handlers();
    let bar = indicatif::ProgressBar::new(0);
    if r.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    let json = r.json;
    let t0 = std::time::Instant::now();
    let (sum, before, after) = crate::bench::pool(r.threads)?.install(|| {
        lora_train::vision::detect::train_detection(
            &cfg,
            true,
            &mut |ev| match ev {
                VisionEvent::Note(n) => {
                    if !json {
                        bar.suspend(|| outln!("{n}"));
                    }
                }
                VisionEvent::Step(step, total, loss, _) => {
                    crate::train::STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
                    bar.set_length(total as u64);
                    bar.set_position(step as u64);
                    bar.set_message(format!("loss {loss:.3}"));
                }
                VisionEvent::Eval(..) => {}
            },
            &crate::train::STOP,
        )
    })?;
    bar.finish_and_clear();
    if sum.interrupted {
        if r.json {
            outln!(
                "{}",
                serde_json::json!({"interrupted": true, "steps": sum.steps, "adapter": cfg.out})
            );
        } else {
            outln!(
                "interrupted at step {}: the adapter so far is in {}",
                sum.steps,
                cfg.out.display()
            );
        }
        return Ok(());
    }
    crate::train::clear_signal();
    let train_s = t0.elapsed().as_secs_f64();
    let (Some(before), Some(after)) = (before, after) else {
        bail!("the demo's data has a validation split, so both evaluations exist");
    };

    // Annotated validation images: the first `samples` with a defect.
    let (names, det, proc) =
        lora_train::vision::detect::load_detector_for_inference(&base, Some(&cfg.out))?;
    let (_, val) = lora_train::vision::detect_data::read_yolo(&yaml)?;
    let val = val.context("the demo's data.yaml names a val split")?;
    let mut shown: Vec<&lora_train::vision::detect_data::DetItem> = val
        .items
        .iter()
        .filter(|it| it.classes.iter().any(|&c| c >= SHAPES.len()))
        .collect();
    shown.truncate(r.samples);
    let pred_dir = r.out.join("predictions");
    std::fs::create_dir_all(&pred_dir)
        .with_context(|| format!("creating {}", pred_dir.display()))?;
    let mut written = Vec::new();
    for it in &shown {
        let img = lora_io::images::Rgb8::open(&it.image)?;
        let found = crate::vision::detect_boxes(&det, names.len(), &proc, &img, DRAW_CONF)?;
        let name = it
            .image
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let path = pred_dir.join(name);
        crate::vision::annotate(&img, &found, &names, 4).save_png(&path)?;
        let truth: Vec<&str> = it.classes.iter().map(|&c| labels[c].as_str()).collect();
        let seen: Vec<String> = found
            .iter()
            .map(|(c, p, _)| format!("{} {:.0}%", names[*c], 100.0 * p))
            .collect();
        written.push((path, truth.join(", "), seen.join(", ")));
    }
    let class_ap = |e: &DetEval| -> serde_json::Value {
        labels
            .iter()
            .zip(&e.per_class)
            .filter_map(|(l, ap)| {
                ap.map(|ap| (l.clone(), serde_json::json!({"map": ap[0], "map50": ap[1]})))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    if r.json {
        outln!(
            "{}",
            serde_json::json!({
                "map50_before": before.map50, "map50_after": after.map50,
                "map_before": before.map, "map_after": after.map,
                "eval_loss_before": before.loss, "eval_loss_after": after.loss,
                "per_class_before": class_ap(&before), "per_class_after": class_ap(&after),
                "val_images": after.images, "steps": sum.steps, "images_per_s": sum.images_per_s,
                "seconds": train_s,
                "predictions": written.iter().map(|w| w.0.clone()).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    outln!(
        "\n{} steps ({} epochs of batch {}), {:.1} images/s, {:.0} s",
        sum.steps,
        r.epochs,
        cfg.batch_size,
        sum.images_per_s,
        train_s
    );
    outln!(
        "mAP@0.5 on {} validation images: base {:.3} -> with adapter {:.3} (mAP@[.5:.95] {:.3} -> {:.3})",
        after.images, before.map50, after.map50, before.map, after.map
    );
    outln!(
        "  AP@0.5 per class, base:         {}",
        per_class_line(&labels, &before)
    );
    outln!(
        "  AP@0.5 per class, with adapter: {}",
        per_class_line(&labels, &after)
    );
    for (path, truth, seen) in &written {
        outln!(
            "\n{}\n  objects:  {}\n  detected: {}",
            path.display(),
            truth,
            if seen.is_empty() { "nothing" } else { seen }
        );
    }
    outln!(
        "\nTry it: lora predict --model {} --adapter {} --image {} --save boxes.png",
        base.display(),
        cfg.out.display(),
        val.items
            .first()
            .map(|i| i.image.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// `lora demo --task detect` (`--build`: remake the shipped base model).
pub fn command(a: crate::args::DemoArgs) -> Result<()> {
    let dir = crate::demo::locate(a.dir.as_deref());
    if a.build {
        return build(&BuildRun {
            dir,
            pretrain_steps: a.pretrain_steps.unwrap_or(PRETRAIN_STEPS),
            threads: a.threads,
        });
    }
    run(&DemoRun {
        dir,
        out: a.out.unwrap_or_else(|| "lora-demo-detect".into()),
        epochs: a.steps.unwrap_or(EPOCHS),
        threads: a.threads,
        samples: a.samples,
        json: a.json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::tests::repo_demo;

    #[test]
    fn committed_base_is_what_build_writes() {
        let base = base_dir(&repo_demo());
        let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
        let labels: Vec<String> = SHAPES.map(String::from).to_vec();
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap();
        assert_eq!(
            read("config.json"),
            pretty(&lora_train::vision::pretrain::yolos_config_json(
                &base_config(),
                &labels,
                INIT_STD
            ))
        );
        let arch = lora_io::vision::VisionArch::Yolos(base_config());
        assert_eq!(
            read("preprocessor_config.json"),
            pretty(&lora_train::vision::processor_json(&processor(), &arch))
        );
        // And it loads: every tensor used, the processor read back as the one trained with.
        let md = lora_io::vision::VisionModelDir::open(&base).unwrap();
        assert_eq!(md.config.labels, labels);
        md.load_detector(0).unwrap();
        let p = lora_train::vision::detect::detection_processor(&md, None).unwrap();
        assert_eq!(p, processor());
    }

    #[test]
    fn the_demo_runs_end_to_end_and_keeps_what_is_not_its_own() {
        let out = std::env::temp_dir().join(format!("lora-demo-detect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let run = |out: &Path| {
            run(&DemoRun {
                dir: repo_demo(),
                out: out.to_path_buf(),
                epochs: 1,
                threads: Some(2),
                samples: 2,
                json: true,
            })
        };
        run(&out).unwrap();
        for f in [
            "data/data.yaml",
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "adapter/config.json",
            "adapter/metrics.jsonl",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let preds: Vec<_> = std::fs::read_dir(out.join("predictions"))
            .unwrap()
            .collect();
        assert_eq!(preds.len(), 2);
        // The adapter names the dataset's classes: the base's first, then the defects.
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["id2label"]["0"], "circle");
        assert_eq!(cfg["id2label"]["5"], "rust");
        // A second run replaces its own output.
        run(&out).unwrap();
        // A file of someone else's inside one of the demo's folders is kept: refused, named.
        for (inside, name) in [
            ("predictions", "keep.png"),
            ("data/images/train", "mine.png"),
            ("adapter", "notes.md"),
        ] {
            let f = out.join(inside).join(name);
            std::fs::write(&f, "mine").unwrap();
            let e = run(&out).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
            std::fs::remove_file(&f).unwrap();
        }
        // A directory holding anything else is refused, untouched.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = run(&out).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}
