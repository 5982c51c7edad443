//! Image classification from the command line: `lora train` on a ViT or ResNet directory and an
//! ImageFolder tree, `lora eval` on such a tree, `lora predict` on one image.

use crate::args::{EvalArgs, PredictArgs, TrainArgs};
use crate::hub;
use anyhow::{Context, Result};
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
    for (set, flag) in [
        (a.steps.is_some(), "--steps (image runs count --epochs)"),
        (a.pack, "--pack"),
        (a.assistant_only_loss, "--assistant-only-loss"),
        (
            a.eval_data.is_some(),
            "--eval-data (put the held-out images in val/)",
        ),
        (a.grad_accum != 1, "--grad-accum"),
        (a.loraplus_ratio != 1.0, "--loraplus-ratio"),
        (a.dropout != 0.0, "--dropout"),
        (a.gradient_checkpointing, "--gradient-checkpointing"),
    ] {
        if set {
            anyhow::bail!("{flag} does not apply to image classification");
        }
    }
    if !a.json {
        outln!("{note}");
    }
    let md = lora_io::vision::VisionModelDir::open(&a.model)?;
    let targets = match &a.target {
        Some(t) => Targets::from_flag(t),
        None => match md.config.arch {
            VisionArch::Vit(_) => Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            VisionArch::ResNet(_) => Targets::List(vec!["convolution".into()]),
            VisionArch::Yolos(_) => anyhow::bail!(
                "{}: YOLOS is an object detector; training detectors from the command line is not implemented yet",
                a.model.display()
            ),
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
        rank: a.rank,
        alpha: a.alpha,
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

/// `lora eval` on an image classifier: `{"loss", "accuracy", "examples"}` over the tree's
/// `val/` split (or the folder itself).
pub fn eval(a: &EvalArgs, device: Device) -> Result<()> {
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
