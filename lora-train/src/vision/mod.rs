//! Image classification with LoRA: PEFT's image-classification recipe (a ViT or ResNet from a
//! Hugging Face directory, LoRA on the chosen layers, the head trained in full through
//! `modules_to_save`, a new head when the dataset's classes differ from the checkpoint's), on
//! ImageFolder data, with evaluation (loss, accuracy) and prediction.
//!
//! Output directory:
//! ```text
//! out/adapter_config.json, out/adapter_model.safetensors   the adapter (PEFT format)
//! out/config.json            the base config with the dataset's id2label / label2id
//! out/preprocessor_config.json  the image processor settings the run used
//! out/metrics.jsonl, out/loss.svg
//! ```

pub mod data;
pub mod detect;
pub mod detect_data;
pub mod map;
pub mod pretrain;

use crate::optim::{clip_grad_norm, lr_factor, Optimizer, OptimizerKind, ParamGroup, Schedule};
use crate::{Result, TrainError};
use data::{find_splits, load_batch, Augment, ImageFolder};
use lora_core::models::{ImageClassifier, VisionModel};
use lora_core::{Device, Tape, Tensor};
use lora_io::images::ImageProcessor;
use lora_io::outdir::{self, Existing, Owned};
use lora_io::peft::{PeftConfig, Targets};
use lora_io::vision::{adapter_tensors, inject, HeadSource, VisionArch, VisionModelDir};
use lora_io::write::write_atomic;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of an image-classification run.
#[derive(Clone, Debug)]
pub struct VisionTrainConfig {
    /// The model directory.
    pub model: PathBuf,
    /// An ImageFolder tree (`train/`, `val/`) or a split folder.
    pub data: PathBuf,
    /// The output directory.
    pub out: PathBuf,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// Target modules (PEFT's `target_modules`).
    pub targets: Targets,
    /// Modules trained in full (`None`: the classification head, PEFT's recipe).
    pub modules_to_save: Option<Vec<String>>,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Peak learning rate.
    pub lr: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Passes over the training split.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Global-norm clipping (`None`: off).
    pub max_grad_norm: Option<f32>,
    /// Seed of the adapter init, the shuffling and the augmentation.
    pub seed: u64,
    /// Training augmentation.
    pub augment: Augment,
    /// The processor's target size (ViT: must equal the config's `image_size`; ResNet: the
    /// shortest edge), instead of `preprocessor_config.json`'s.
    pub image_size: Option<usize>,
    /// When the dataset's classes differ from the checkpoint's, start the new head from the
    /// checkpoint's rows for the classes it already names (see
    /// [`VisionModelDir::keep_known_classes`]) instead of all anew.
    pub keep_classes: bool,
    /// Detection: the validation split's COCO JSON when `data` is a COCO JSON.
    pub eval_data: Option<PathBuf>,
    /// Where to compute.
    pub device: Device,
}

impl VisionTrainConfig {
    /// PEFT's image-classification recipe around the given paths: rank 16, alpha 16,
    /// `query`/`value` (transformers 5: `q_proj`/`v_proj`), the head trained in full, lr 5e-3,
    /// linear decay; batch 16 and 3 epochs (the recipe's 128 and 5 are for a GPU).
    pub fn new(model: &Path, data: &Path, out: &Path) -> Self {
        Self {
            model: model.into(),
            data: data.into(),
            out: out.into(),
            rank: 16,
            alpha: 16.0,
            targets: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            modules_to_save: None,
            rslora: false,
            lr: 5e-3,
            weight_decay: 0.0,
            warmup: 0,
            schedule: Schedule::Linear,
            epochs: 3,
            batch_size: 16,
            max_grad_norm: Some(1.0),
            seed: 0,
            augment: Augment {
                flip: true,
                min_scale: 0.8,
            },
            image_size: None,
            keep_classes: false,
            eval_data: None,
            device: Device::Cpu,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad =
            |setting: &'static str, reason: String| Err(TrainError::Setting { setting, reason });
        if self.rank == 0 {
            return bad("rank", "must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", format!("{} must be a positive number", self.alpha));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch-size", "must be at least 1".into());
        }
        if !(self.augment.min_scale > 0.0 && self.augment.min_scale <= 1.0) {
            return bad(
                "scale-jitter",
                format!("{} must be in (0, 1]", self.augment.min_scale),
            );
        }
        Ok(())
    }

    fn peft(&self, head: &str) -> PeftConfig {
        let mut p = PeftConfig::new(self.rank, self.alpha, &[]);
        p.target_modules = self.targets.clone();
        p.use_rslora = self.rslora;
        p.modules_to_save = self
            .modules_to_save
            .clone()
            .unwrap_or_else(|| vec![head.split('.').next().unwrap_or(head).to_string()]);
        p.base_model_name_or_path = Some(self.model.to_string_lossy().to_string());
        p
    }
}

/// What an image-classification run did.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Last training loss.
    pub final_loss: f32,
    /// Evaluation before training (with the new head, if any).
    pub eval_before: Option<EvalReport>,
    /// Evaluation after training.
    pub eval_after: Option<EvalReport>,
    /// Training images per second over the run.
    pub images_per_s: f64,
    /// Trainable and all parameters.
    pub params: (usize, usize),
    /// Stopped early by the stop flag (the adapter so far is written).
    pub interrupted: bool,
}

/// Evaluation of a classifier on a split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy over the images.
    pub loss: f64,
    /// Fraction of images whose top class is the label.
    pub accuracy: f64,
    /// Images evaluated.
    pub examples: usize,
}

/// What a run reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum VisionEvent<'a> {
    /// A step finished: `(step, total, loss, lr)`.
    Step(usize, usize, f32, f32),
    /// An evaluation finished: `(epoch, report)` (epoch 0: before training).
    Eval(usize, &'a EvalReport),
    /// A notice for the user.
    Note(&'a str),
}

/// Whether a file of this name in an output directory is one an image-classification run
/// writes (what `--force` may replace).
pub fn is_vision_output(name: &str) -> bool {
    matches!(
        name,
        "adapter_config.json"
            | "adapter_model.safetensors"
            | "config.json"
            | "preprocessor_config.json"
            | "metrics.jsonl"
            | "loss.svg"
    ) || outdir::is_dead_temp(name)
}

/// The image processor of a model directory: its `preprocessor_config.json`, else the
/// architecture's processor defaults; `size` overrides the target size.
pub fn processor_for(md: &VisionModelDir, size: Option<usize>) -> Result<ImageProcessor> {
    // With a preprocessor_config.json, what it leaves out takes the processor class's defaults;
    // without one, the settings such checkpoints ship (ViT's class defaults at the config's
    // size; microsoft/resnet-50's for ResNet).
    let (class_defaults, without_file) = match &md.config.arch {
        VisionArch::Vit(c) => {
            let d = ImageProcessor::vit(c.image_size.0, c.image_size.1);
            (d.clone(), d)
        }
        VisionArch::ResNet(_) => (
            ImageProcessor::convnext_class(),
            ImageProcessor::convnext(224),
        ),
        VisionArch::Yolos(_) => {
            return Err(TrainError::Setting {
                setting: "task",
                reason: "YOLOS is an object detector: it takes the detection processor".into(),
            })
        }
    };
    let path = md.dir.join("preprocessor_config.json");
    let mut p = if path.exists() {
        ImageProcessor::from_file(&path, &class_defaults)?
    } else {
        without_file
    };
    if let Some(n) = size {
        p.resize = Some(match (&md.config.arch, &p.resize) {
            (
                VisionArch::ResNet(_),
                Some(lora_io::images::Resize::ShortestEdgeCrop { crop_pct, .. }),
            ) => lora_io::images::Resize::ShortestEdgeCrop {
                edge: n,
                crop_pct: *crop_pct,
            },
            (VisionArch::ResNet(_), _) => lora_io::images::Resize::ShortestEdgeCrop {
                edge: n,
                crop_pct: 224.0 / 256.0,
            },
            _ => lora_io::images::Resize::Exact(n, n),
        });
    }
    if let VisionArch::Vit(c) = &md.config.arch {
        let (h, w) = c.image_size;
        if p.resize != Some(lora_io::images::Resize::Exact(h, w)) {
            return Err(TrainError::Setting {
                setting: "image-size",
                reason: format!(
                    "ViT takes {h}x{w} images (config.json's image_size; position embeddings are \
                     not interpolated yet), but the processor would give {:?}",
                    p.resize
                ),
            });
        }
    }
    Ok(p)
}

/// The processor settings as `preprocessor_config.json` holds them.
pub fn processor_json(p: &ImageProcessor, arch: &VisionArch) -> Value {
    let mut v = json!({
        "image_processor_type": match arch {
            VisionArch::Vit(_) => "ViTImageProcessor",
            VisionArch::ResNet(_) => "ConvNextImageProcessor",
            VisionArch::Yolos(_) => "YolosImageProcessor",
        },
        "do_resize": p.resize.is_some(),
        "resample": match p.filter { lora_io::images::Filter::Bilinear => 2, lora_io::images::Filter::Bicubic => 3 },
        "do_rescale": p.rescale.is_some(),
        "rescale_factor": p.rescale.unwrap_or(1.0 / 255.0) as f64,
        "do_normalize": p.normalize.is_some(),
    });
    if let Some((m, s)) = p.normalize {
        v["image_mean"] = json!(m.map(|x| x as f64));
        v["image_std"] = json!(s.map(|x| x as f64));
    }
    match &p.resize {
        Some(lora_io::images::Resize::Exact(h, w)) => v["size"] = json!({"height": h, "width": w}),
        Some(lora_io::images::Resize::ShortestEdgeCrop { edge, crop_pct }) => {
            v["size"] = json!({ "shortest_edge": edge });
            v["crop_pct"] = json!(*crop_pct);
        }
        Some(lora_io::images::Resize::ShortestLongest { shortest, longest }) => {
            v["size"] = json!({ "shortest_edge": shortest, "longest_edge": longest });
        }
        None => {}
    }
    if let VisionArch::Yolos(_) = arch {
        v["format"] = json!("coco_detection");
        v["do_pad"] = json!(true);
        v["do_convert_annotations"] = json!(true);
    }
    v
}

/// Mean loss and accuracy of `model` (adapters on) over `split`, in batches of `batch`.
pub fn evaluate(
    model: &dyn ImageClassifier,
    split: &ImageFolder,
    proc: &ImageProcessor,
    batch: usize,
    device: Device,
) -> Result<EvalReport> {
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let l = model.num_labels();
    for chunk in split.items.chunks(batch.max(1)) {
        let refs: Vec<&(PathBuf, usize)> = chunk.iter().collect();
        let (px, shape, labels) = load_batch(&refs, proc, &Augment::NONE, &|_| 0)?;
        let pixels = Tensor::new_on(px, &shape, false, device)?;
        let logits = model
            .forward(&Tape::inference(), &pixels, true)?
            .try_to_vec()?;
        for (row, &y) in logits.chunks(l).zip(&labels) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            loss_sum += lse - row[y as usize] as f64;
            let top = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0;
            correct += (top == y as usize) as usize;
        }
    }
    let n = split.items.len();
    Ok(EvalReport {
        loss: loss_sum / n.max(1) as f64,
        accuracy: correct as f64 / n.max(1) as f64,
        examples: n,
    })
}

fn data_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The base config with the dataset's classes (`id2label`, `label2id`), as transformers saves a
/// model built with them.
fn labelled_config(md: &VisionModelDir) -> Result<Value> {
    let mut v = lora_io::hf::read_json(&md.dir.join("config.json"))?;
    let labels = &md.config.labels;
    v["id2label"] = Value::Object(
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
            .collect(),
    );
    v["label2id"] = Value::Object(
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), Value::from(i)))
            .collect(),
    );
    if let Some(o) = v.as_object_mut() {
        o.remove("num_labels");
    }
    Ok(v)
}

/// Trainable (adapters, trained head copies) and all parameters of a vision model (PEFT's
/// `print_trainable_parameters` numbers).
pub fn param_counts(model: &dyn VisionModel) -> (usize, usize) {
    let trainable: usize = adapter_tensors(model).iter().map(|(_, t)| t.numel()).sum();
    let mut frozen: Vec<&Tensor> = model.other_tensors();
    for (_, l) in model.linears() {
        let (w, _, b) = l.base();
        frozen.push(w);
        frozen.extend(b);
    }
    for (_, c) in model.convs() {
        let (w, b, _) = c.base();
        frozen.push(w);
        frozen.extend(b);
    }
    for h in model.heads() {
        frozen.extend(h.base.tensors());
    }
    (
        trainable,
        trainable + frozen.iter().map(|t| t.numel()).sum::<usize>(),
    )
}

/// Runs an image-classification fine-tune; `stop` ends it after the current step (the adapter
/// so far is written).
pub fn train_vision(
    cfg: &VisionTrainConfig,
    force: bool,
    on_event: &mut dyn FnMut(VisionEvent),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<VisionSummary> {
    cfg.validate()?;
    let out = &cfg.out;
    outdir::check_not_input(
        "--out",
        out,
        &[
            ("model directory (--model)", &cfg.model),
            ("training data (--data)", &cfg.data),
        ],
    )?;
    if outdir::resolve(out).starts_with(outdir::resolve(&cfg.data)) {
        return Err(data_err(
            out,
            "--out is inside --data: its files would join the image tree (a class folder of \
             metrics); write the run elsewhere",
        ));
    }
    outdir::DirLock::check_free(out)?;
    let found = outdir::inspect_output(
        "--out",
        out,
        "lora train",
        Owned::Matching(&is_vision_output),
    )?;
    if matches!(found, Existing::Ours(_)) && !force {
        return Err(data_err(
            out,
            "output directory is not empty (pass --force to start over)",
        ));
    }
    let (train, val) = find_splits(&cfg.data)?;
    train.check_headers()?;
    if let Some(v) = &val {
        v.check_headers()?;
    }
    let mut note = |s: &str| on_event(VisionEvent::Note(s));
    if train.skipped > 0 {
        note(&format!(
            "skipped {} files in {} that are not images in class folders",
            train.skipped,
            train.root.display()
        ));
    }
    if val.is_none() {
        note("no val/ split beside train/: no evaluation");
    }
    let mut md = VisionModelDir::open(&cfg.model)?;
    let ckpt_labels = md.config.labels.clone();
    md.set_labels(train.classes.clone());
    md.keep_known_classes = cfg.keep_classes;
    let proc = processor_for(&md, cfg.image_size)?;
    let (mut model, head) = md.load_model(cfg.seed)?;
    match head {
        HeadSource::Checkpoint => {
            if ckpt_labels != train.classes {
                note(&format!(
                    "the dataset's class names ({}) replace the checkpoint's ({}); the head's \
                     rows are taken in order",
                    train.classes.join(", "),
                    ckpt_labels.join(", ")
                ));
            }
        }
        HeadSource::Missing => note(&format!(
            "the checkpoint has no classification head: a new one for the {} classes",
            train.classes.len()
        )),
        HeadSource::Mismatched(n) => note(&format!(
            "the checkpoint's head has {n} classes, the dataset {}: a new head \
             (ignore_mismatched_sizes)",
            train.classes.len()
        )),
        HeadSource::Extended(n, kept) => note(&format!(
            "the checkpoint's head has {n} classes, the dataset {}: a new head keeping the \
             checkpoint's rows for the {kept} classes it already names (--keep-classes)",
            train.classes.len()
        )),
    }
    let head_name = model.head().name.clone();
    let peft = cfg.peft(&head_name);
    inject(model.as_mut(), &peft, cfg.seed)?;
    // A new (or re-ordered) head must train and be saved with the adapter: a frozen one would
    // stay as drawn, and nothing could rebuild it when the adapter is loaded.
    if head != HeadSource::Checkpoint && model.head().trained.is_none() {
        return Err(TrainError::Setting {
            setting: "modules-to-save",
            reason: format!(
                "the head `{head_name}` is new for these classes, so it must train in full: \
                 keep it in --modules-to-save"
            ),
        });
    }
    model.to_device(cfg.device)?;
    let trainable: Vec<Tensor> = adapter_tensors(model.as_ref())
        .into_iter()
        .map(|(_, t)| t.clone())
        .collect();
    let (n_train, n_all) = param_counts(model.as_ref());
    let groups = vec![ParamGroup {
        params: trainable.clone(),
        lr_scale: 1.0,
    }];
    let mut opt: Box<dyn Optimizer> = OptimizerKind::AdamW.build(cfg.weight_decay);
    let eval_before = val
        .as_ref()
        .map(|v| evaluate(model.as_ref(), v, &proc, cfg.batch_size, cfg.device))
        .transpose()?;
    if let Some(r) = &eval_before {
        on_event(VisionEvent::Eval(0, r));
    }
    // Everything checked: the output directory is taken now. Should the run still fail (an
    // image that decodes badly past its header, a full disk), what it wrote there goes.
    let existed = out.exists();
    let _lock = outdir::DirLock::acquire(out)?;
    let r = run_epochs(
        cfg,
        force,
        found,
        (model.as_ref(), &md, &peft, &proc),
        (&train, val.as_ref()),
        (&groups, &trainable, opt.as_mut()),
        eval_before,
        on_event,
        stop,
    );
    if r.is_err() {
        for f in ["metrics.jsonl", outdir::MARKER] {
            let _ = std::fs::remove_file(out.join(f));
        }
        if !existed {
            drop(_lock);
            let _ = std::fs::remove_dir_all(out);
        }
    }
    let (steps, last_loss, eval_after, images_per_s, interrupted) = r?;
    Ok(VisionSummary {
        steps,
        final_loss: last_loss,
        eval_before,
        eval_after,
        images_per_s,
        params: (n_train, n_all),
        interrupted,
    })
}

type Run<'a> = (
    &'a dyn ImageClassifier,
    &'a VisionModelDir,
    &'a PeftConfig,
    &'a ImageProcessor,
);

/// The epochs, then the adapter and the run's files; `(steps, last loss, last eval, images/s,
/// interrupted)`.
#[allow(clippy::too_many_arguments)]
fn run_epochs(
    cfg: &VisionTrainConfig,
    force: bool,
    found: Existing,
    (model, md, peft, proc): Run,
    (train, val): (&ImageFolder, Option<&ImageFolder>),
    (groups, trainable, opt): (&[ParamGroup], &[Tensor], &mut dyn Optimizer),
    eval_before: Option<EvalReport>,
    on_event: &mut dyn FnMut(VisionEvent),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(usize, f32, Option<EvalReport>, f64, bool)> {
    let out = &cfg.out;
    let eval = |model: &dyn ImageClassifier| -> Result<Option<EvalReport>> {
        val.map(|v| evaluate(model, v, proc, cfg.batch_size, cfg.device))
            .transpose()
    };
    let steps_per_epoch = train.items.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    if force {
        if let Existing::Ours(entries) = found {
            outdir::remove_owned(&entries)?;
        }
    }
    outdir::write_marker(out, "lora train", None)?;
    let mpath = out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&mpath).map_err(|e| data_err(&mpath, e.to_string()))?;
    let mut line = |v: Value| writeln!(metrics, "{v}").map_err(|e| data_err(&mpath, e.to_string()));
    if let Some(r) = &eval_before {
        line(
            json!({"step": 0, "epoch": 0, "loss": null, "eval_loss": r.loss, "eval_accuracy": r.accuracy}),
        )?;
    }
    let t0 = Instant::now();
    let (mut step, mut last_loss, mut images) = (0usize, f32::NAN, 0usize);
    let mut eval_after = eval_before;
    let mut interrupted = false;
    'epochs: for epoch in 0..cfg.epochs {
        // This epoch's shuffled order (a function of the seed and the epoch), in batches; the
        // last one may be smaller.
        let n = train.items.len();
        let order = crate::batches::Sampler::resume(n, cfg.seed ^ 0x1A6E, epoch as u64, 0).take(n);
        for idx in order.chunks(cfg.batch_size) {
            let refs: Vec<&(PathBuf, usize)> = idx.iter().map(|&i| &train.items[i]).collect();
            let seed = cfg.seed;
            let key = |i: usize| {
                lora_kernels::rng::splitmix64(seed ^ ((epoch as u64) << 40) ^ idx[i] as u64)
            };
            let (px, shape, labels) = load_batch(&refs, proc, &cfg.augment, &key)?;
            let pixels = Tensor::new_on(px, &shape, false, cfg.device)?;
            let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total);
            let tape = Tape::new(lora_kernels::rng::splitmix64(
                cfg.seed ^ (step as u64) << 16,
            ));
            let loss = model.loss(&tape, &pixels, &labels, true)?;
            let l = loss.scalar()?;
            if !l.is_finite() {
                return Err(data_err(
                    &cfg.data,
                    format!(
                        "loss is {l} at step {}; stopping before the update",
                        step + 1
                    ),
                ));
            }
            let mut grads = tape.backward(&loss)?;
            let norm = clip_grad_norm(
                &mut grads,
                trainable,
                cfg.max_grad_norm.unwrap_or(f32::INFINITY),
            )?;
            if !norm.is_finite() {
                return Err(data_err(
                    &cfg.data,
                    format!(
                        "gradient norm is {norm} at step {}; stopping before the update",
                        step + 1
                    ),
                ));
            }
            opt.step(groups, &grads, lr)?;
            step += 1;
            images += refs.len();
            last_loss = l;
            let el = t0.elapsed().as_secs_f64();
            line(
                json!({"step": step, "epoch": epoch + 1, "loss": l, "lr": lr, "grad_norm": norm,
                        "images_per_s": images as f64 / el.max(1e-9), "elapsed_s": el}),
            )?;
            on_event(VisionEvent::Step(step, total, l, lr));
            if stop.load(std::sync::atomic::Ordering::SeqCst) && step < total {
                interrupted = true;
                break 'epochs;
            }
        }
        eval_after = eval(model)?;
        if let Some(r) = &eval_after {
            on_event(VisionEvent::Eval(epoch + 1, r));
            line(
                json!({"step": step, "epoch": epoch + 1, "loss": null, "eval_loss": r.loss, "eval_accuracy": r.accuracy}),
            )?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    lora_io::vision::save_adapter(model, peft, out)?;
    let text = serde_json::to_string_pretty(&labelled_config(md)?).expect("serialises");
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    let text =
        serde_json::to_string_pretty(&processor_json(proc, &md.config.arch)).expect("serialises");
    write_atomic(&out.join("preprocessor_config.json"), text.as_bytes())?;
    let (tp, ep) = crate::plot::read_metrics(&mpath)?;
    crate::plot::write_loss_svg(&out.join("loss.svg"), &tp, &ep)?;
    let eval_after = if interrupted { None } else { eval_after };
    Ok((
        step,
        last_loss,
        eval_after,
        images as f64 / seconds.max(1e-9),
        interrupted,
    ))
}

/// A classifier with an adapter from a training output (or any PEFT adapter directory): the
/// base model built for the adapter's classes (`config.json` beside the adapter, when there is
/// one) and the adapter loaded; with the image processor the run used.
pub fn load_for_inference(
    model: &Path,
    adapter: Option<&Path>,
) -> Result<(VisionModelDir, Box<dyn ImageClassifier>, ImageProcessor)> {
    let mut md = VisionModelDir::open(model)?;
    let mut proc = processor_for(&md, None)?;
    if let Some(a) = adapter {
        let cfg_path = a.join("config.json");
        if cfg_path.exists() {
            let labelled = VisionModelDir::open(a)?;
            md.set_labels(labelled.config.labels);
        }
        let pp = a.join("preprocessor_config.json");
        if pp.exists() {
            proc = ImageProcessor::from_file(&pp, &proc)?;
        }
    }
    let (mut m, head) = md.load_model(0)?;
    if let Some(a) = adapter {
        lora_io::vision::load_adapter(m.as_mut(), a)?;
        if head != HeadSource::Checkpoint && m.head().trained.is_none() {
            return Err(data_err(
                a,
                "the base model's head does not fit these classes and the adapter does not \
                 carry a trained head (modules_to_save)",
            ));
        }
    }
    Ok((md, m, proc))
}
