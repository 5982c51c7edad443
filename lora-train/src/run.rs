//! A whole training run: load the model, inject adapters, tokenize the data, step with the
//! schedule, evaluate, log metrics, checkpoint, resume.
//!
//! Output directory layout:
//! ```text
//! out/adapter_config.json, out/adapter_model.safetensors   the final adapter (PEFT format)
//! out/metrics.jsonl                                         one JSON object per step / eval
//! out/loss.svg                                              train and eval loss over steps
//! out/checkpoint-000100/                                    adapter + optimizer.safetensors +
//!                                                           trainer_state.json
//! ```
//! A checkpoint is assembled in a temporary directory and renamed into place, so the newest
//! `checkpoint-*` directory is always complete. Resuming restores the adapter, the optimizer
//! moments, the step (which drives the schedule and dropout seeds) and the sampler position,
//! so a resumed run ends with the same adapter as an uninterrupted one.

use crate::batches::{
    chat_template_for, pack, read_examples, tokenize, training_eos, Batch, Sampler, TokenizeOptions,
};
use crate::eval::eval_sequences;
use crate::optim::{lr_factor, AdamW, Optimizer, OptimizerState, Schedule, Sgd};
use crate::trainer::{adapter_groups, train_step};
use crate::{Result, TrainError};
use lora_core::models::{param_counts, CausalLm};
use lora_core::Tensor;
use lora_io::hf::ModelDir;
use lora_io::peft::{inject, load_adapter, save_adapter, PeftConfig, Targets};
use lora_io::safetensors::SafetensorsFile;
use lora_io::tokenizer::TextTokenizer;
use lora_io::write::{write_atomic, write_safetensors, OutDtype, OutTensor};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs. Defaults are the CLI's (see `lora train --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// Training data (.txt, .jsonl with text, or .jsonl with prompt/completion).
    pub data: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// `all-linear`, a comma-separated list of module names, or a regex (anything with regex
    /// metacharacters).
    pub target: String,
    /// Adapter dropout.
    pub dropout: f32,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Peak learning rate.
    pub lr: f32,
    /// LoRA+ learning-rate ratio for B.
    pub loraplus_ratio: f32,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps (ignored when `epochs` is set).
    pub steps: usize,
    /// Passes over the training sequences; sets the step count from the data size.
    pub epochs: Option<f32>,
    /// Warmup steps.
    pub warmup: usize,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// AdamW weight decay (SGD: L2).
    pub weight_decay: f32,
    /// `adamw` or `sgd` (momentum 0.9).
    pub optimizer: String,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Pack examples into full `seq_len` blocks.
    pub pack: bool,
    /// End every text and completion with the tokenizer's EOS token, as a target (TRL's
    /// `SFTTrainer` default; see [`ModelDir::training_eos`]). Without it a model trained on
    /// prompt/completion pairs never learns to stop.
    pub eos: bool,
    /// In conversations, take the loss on the assistant's turns only (see
    /// [`crate::batches::tokenize`]).
    pub assistant_only_loss: bool,
    /// Seed for init, shuffling, dropout.
    pub seed: u64,
    /// Held-out data file.
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out when no eval file is given.
    pub eval_split: f32,
    /// Evaluate every this many steps (0: only before and after).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Keep only the newest this many checkpoints (0: keep all).
    pub keep_checkpoints: usize,
    /// Activation checkpointing: recompute each transformer block's forward during backward
    /// (less activation memory, about a third more compute; same results up to rounding).
    pub gradient_checkpointing: bool,
    /// Stop after this many steps of this invocation (a checkpoint is written): for tests and
    /// time-boxed runs; `None` runs to `steps`.
    pub stop_after: Option<usize>,
    /// Where the model trains (the whole step runs there). Not part of the run's identity: a
    /// run checkpointed on one device resumes on another.
    pub device: lora_core::Device,
}

impl TrainConfig {
    fn to_json(&self) -> Value {
        json!({
            "model": self.model, "data": self.data, "rank": self.rank, "alpha": self.alpha, "target": self.target,
            "dropout": self.dropout, "rslora": self.rslora, "lr": self.lr, "loraplus_ratio": self.loraplus_ratio,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "seq_len": self.seq_len, "steps": self.steps, "epochs": self.epochs,
            "warmup": self.warmup, "schedule": format!("{:?}", self.schedule).to_lowercase(), "weight_decay": self.weight_decay,
            "optimizer": self.optimizer, "max_grad_norm": self.max_grad_norm, "pack": self.pack, "eos": self.eos, "assistant_only_loss": self.assistant_only_loss, "seed": self.seed,
            "eval_data": self.eval_data, "eval_split": self.eval_split,
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |f: &str, r: String| {
            Err(TrainError::Data {
                path: PathBuf::from(format!("--{f}")),
                reason: r,
            })
        };
        if self.steps == 0 && self.epochs.is_none() {
            return bad("steps", "must be at least 1".into());
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return bad("epochs", format!("must be positive, got {e}"));
            }
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "batch-size",
                "batch size and grad-accum must be at least 1".into(),
            );
        }
        if self.seq_len < 2 {
            return bad("seq-len", "must be at least 2".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight-decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            );
        }
        if !(self.loraplus_ratio.is_finite() && self.loraplus_ratio > 0.0) {
            return bad(
                "loraplus-ratio",
                format!(
                    "must be finite and > 0 (1 = plain LoRA), got {}",
                    self.loraplus_ratio
                ),
            );
        }
        if let Some(c) = self.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(
                    "max-grad-norm",
                    format!("must be finite and > 0 (0 on the command line disables), got {c}"),
                );
            }
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad(
                "eval-split",
                format!("must be in [0, 1), got {}", self.eval_split),
            );
        }
        if self.optimizer == "sgd" && self.device != lora_core::Device::Cpu {
            return bad(
                "optimizer",
                format!("sgd runs on the CPU only; use adamw on {}", self.device),
            );
        }
        if let Err(e) = self.peft().target_modules.check() {
            return bad("target", e);
        }
        if !matches!(self.optimizer.as_str(), "adamw" | "sgd") {
            return bad(
                "optimizer",
                format!("must be adamw or sgd, got `{}`", self.optimizer),
            );
        }
        Ok(())
    }

    fn peft(&self) -> PeftConfig {
        let t = self.target.trim();
        let targets = if t == "all-linear" {
            Targets::AllLinear
        } else if t.chars().any(|c| "\\^$*+?()[]{}|".contains(c)) {
            Targets::Regex(t.to_string())
        } else {
            Targets::List(
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            )
        };
        PeftConfig {
            r: self.rank,
            lora_alpha: self.alpha,
            target_modules: targets,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_rslora: self.rslora,
            lora_dropout: self.dropout,
            fan_in_fan_out: false,
            base_model_name_or_path: Some(self.model.to_string_lossy().to_string()),
            task_type: Some("CAUSAL_LM".into()),
        }
    }
}

/// The settings that differ between a checkpoint's config and this run's, as
/// `key: checkpoint VALUE, now VALUE`. A checkpoint written before `eos` or
/// `assistant_only_loss` existed trained without them, so a missing key reads as `false`.
fn config_diff(saved: &Value, now: &Value) -> Vec<String> {
    let mut saved = saved.clone();
    if let Some(m) = saved.as_object_mut() {
        for k in ["eos", "assistant_only_loss"] {
            m.entry(k).or_insert(Value::Bool(false));
        }
    }
    let empty = serde_json::Map::new();
    let (a, b) = (
        saved.as_object().unwrap_or(&empty),
        now.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(none)".to_string(), |v| v.to_string());
            format!("{k}: checkpoint {}, now {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// A tokenization error about one example, re-addressed to the data file it came from (its
/// number counts the examples left after the held-out split when `split`).
fn in_file(e: TrainError, file: &Path, split: bool) -> TrainError {
    match e {
        TrainError::Data { reason, .. } => err(
            file,
            if split {
                format!("{reason} (examples numbered after the --eval-split hold-out)")
            } else {
                reason
            },
        ),
        e => e,
    }
}

/// One line of progress.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// 1-based step.
    pub step: usize,
    /// Of this many.
    pub total: usize,
    /// Training loss.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Target tokens per second over the run so far.
    pub tokens_per_s: f64,
    /// Eval loss, when this step evaluated.
    pub eval_loss: Option<f64>,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Steps completed (in total, including before a resume).
    pub steps: usize,
    /// Last training loss.
    pub final_loss: f32,
    /// Eval loss before training (None when resumed or no eval data).
    pub eval_before: Option<f64>,
    /// Eval loss at the end.
    pub eval_after: Option<f64>,
    /// Target tokens trained on in this invocation.
    pub tokens: usize,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// All parameters.
    pub all_params: usize,
    /// The output directory.
    pub out: PathBuf,
    /// Stopped early by the stop flag (a checkpoint was written; `--resume` continues).
    pub interrupted: bool,
}

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

fn named_params(model: &dyn CausalLm) -> Vec<(String, Tensor)> {
    model
        .linears()
        .into_iter()
        .filter_map(|(n, l)| {
            l.lora().map(|l| {
                vec![
                    (format!("{n}.lora_A"), l.lora_a.clone()),
                    (format!("{n}.lora_B"), l.lora_b.clone()),
                ]
            })
        })
        .flatten()
        .collect()
}

fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    out: &Path,
    step: usize,
    model: &dyn CausalLm,
    peft: &PeftConfig,
    opt: &dyn Optimizer,
    sampler: &Sampler,
    cfg: &TrainConfig,
    chat_now: Option<i64>,
) -> Result<()> {
    let final_dir = out.join(format!("checkpoint-{step:06}"));
    let tmp = out.join(format!(".checkpoint-{step:06}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e.to_string()))?;
    save_adapter(model, peft, &tmp)?;
    let st: OptimizerState = opt.export(&named_params(model))?;
    let tensors: Vec<OutTensor> = st
        .buffers
        .iter()
        .map(|(k, v)| OutTensor {
            name: k.clone(),
            shape: vec![v.len()],
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(
        &tmp.join("optimizer.safetensors"),
        &tensors,
        Default::default(),
    )?;
    let mut state = json!({
        "step": step, "sampler_epoch": sampler.epoch, "sampler_pos": sampler.pos,
        "optimizer_steps": st.steps.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "config": cfg.to_json(),
    });
    if let Some(t) = chat_now {
        // The time the chat template's strftime_now rendered with: a resumed run renders the
        // same text (a template that prints today's date would otherwise change the data).
        state["chat_now"] = json!(t);
    }
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&state)
            .expect("serialises")
            .as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| err(&final_dir, e.to_string()))?;
    if cfg.keep_checkpoints > 0 {
        // Only after the new one is complete: older ones go, newest first kept.
        let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
            .map_err(|e| err(out, e.to_string()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                Some((
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()?,
                    e.path(),
                ))
            })
            .collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, p) in all.into_iter().skip(cfg.keep_checkpoints) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(())
}

/// Runs (or, with `resume`, continues) training; `on_step` sees every step. When `stop` becomes
/// true (Ctrl-C), the run checkpoints after the current step and returns early
/// (`TrainSummary::interrupted`).
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<TrainSummary> {
    train_until(
        cfg,
        resume,
        force,
        on_step,
        &std::sync::atomic::AtomicBool::new(false),
    )
}

/// [`train`] with a stop flag.
pub fn train_until(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_step: &mut dyn FnMut(&StepLog),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let out = &cfg.out;
    let checkpoint = if resume { latest_checkpoint(out) } else { None };
    if resume && checkpoint.is_none() {
        return Err(err(
            out,
            "--resume: no complete checkpoint-* directory found",
        ));
    }
    let nonempty = std::fs::read_dir(out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if nonempty && !resume && !force {
        return Err(err(
            out,
            "output directory is not empty (pass --resume to continue or --force to start over)",
        ));
    }

    let md = ModelDir::open(&cfg.model)?;
    let tok = TextTokenizer::from_model_dir(&cfg.model)?;
    // Data: a seeded split of the examples when no eval file is given.
    let mut examples = read_examples(&cfg.data)?;
    let eval_examples = match &cfg.eval_data {
        Some(p) => read_examples(p)?,
        None if cfg.eval_split > 0.0 => {
            let mut order = Sampler::new(examples.len(), cfg.seed ^ 0xE7A1).take(examples.len());
            let k = ((examples.len() as f32 * cfg.eval_split).round() as usize)
                .clamp(1, examples.len().saturating_sub(1).max(1));
            order.truncate(k);
            order.sort_unstable();
            let held: Vec<_> = order.iter().rev().map(|&i| examples.remove(i)).collect();
            held.into_iter().rev().collect()
        }
        None => Vec::new(),
    };
    let eos = if cfg.eos {
        training_eos(
            &md,
            &tok,
            examples.iter().chain(&eval_examples),
            "pass --no-eos to train without one",
        )?
    } else {
        None
    };
    let mut model = md.load_model()?;
    if cfg.seq_len > model.max_positions() {
        return Err(err(
            Path::new("--seq-len"),
            format!(
                "{} exceeds the model's maximum of {} positions ({})",
                cfg.seq_len,
                model.max_positions(),
                cfg.model.join("config.json").display()
            ),
        ));
    }
    let peft = cfg.peft();
    let (start, mut sampler_state, saved_chat_now) = match &checkpoint {
        Some((step, dir)) => {
            let saved = lora_io::hf::read_json(&dir.join("trainer_state.json"))?;
            let diff = config_diff(&saved["config"], &cfg.to_json());
            if !diff.is_empty() {
                return Err(err(
                    &dir.join("trainer_state.json"),
                    format!(
                        "the run's settings differ from this checkpoint's ({}); resume with the \
                         same flags",
                        diff.join("; ")
                    ),
                ));
            }
            load_adapter(model.as_mut(), dir)?;
            (
                *step,
                Some((
                    saved["sampler_epoch"].as_u64().unwrap_or(0),
                    saved["sampler_pos"].as_u64().unwrap_or(0) as usize,
                )),
                saved["chat_now"].as_i64(),
            )
        }
        None => {
            inject(model.as_mut(), &peft, cfg.seed)?;
            (0, None, None)
        }
    };

    // Conversations need the model's chat template; read only when the data has some.
    let chat = chat_template_for(&cfg.model, &cfg.data, examples.iter().chain(&eval_examples))?;
    if let (Some(c), Some(t)) = (&chat, saved_chat_now) {
        c.set_now(t);
    }
    let chat_now = chat.as_ref().map(|c| c.now());
    let mut train_seqs = tokenize(
        &tok,
        &examples,
        &TokenizeOptions {
            pack: cfg.pack,
            eos,
            chat: chat.as_ref(),
            assistant_only: cfg.assistant_only_loss,
            ..TokenizeOptions::new(cfg.seq_len)
        },
    )
    .map_err(|e| {
        in_file(
            e,
            &cfg.data,
            cfg.eval_data.is_none() && cfg.eval_split > 0.0,
        )
    })?;
    if cfg.pack {
        train_seqs = pack(&train_seqs, cfg.seq_len);
    }
    train_seqs.retain(|s| s.ids.len() >= 2);
    if train_seqs.is_empty() {
        return Err(err(
            &cfg.data,
            format!(
                "no training sequence of two or more tokens (seq-len {})",
                cfg.seq_len
            ),
        ));
    }
    let eval_seqs = tokenize(
        &tok,
        &eval_examples,
        &TokenizeOptions {
            eos,
            chat: chat.as_ref(),
            assistant_only: cfg.assistant_only_loss,
            ..TokenizeOptions::new(cfg.seq_len)
        },
    )
    .map_err(|e| match &cfg.eval_data {
        Some(p) => in_file(e, p, false),
        None => in_file(e, &cfg.data, true),
    })?;
    let total_steps = match cfg.epochs {
        Some(e) => ((e as f64 * train_seqs.len() as f64 / (cfg.batch_size * cfg.grad_accum) as f64)
            .ceil() as usize)
            .max(1),
        None => cfg.steps,
    };
    let mut sampler = match sampler_state.take() {
        Some((e, p)) => Sampler::resume(train_seqs.len(), cfg.seed, e, p),
        None => Sampler::new(train_seqs.len(), cfg.seed),
    };

    let groups = adapter_groups(model.as_ref(), cfg.loraplus_ratio);
    let mut opt: Box<dyn Optimizer> = match cfg.optimizer.as_str() {
        "sgd" => Box::new(Sgd::new(0.9, cfg.weight_decay)),
        _ => Box::new(AdamW::new(0.9, 0.999, 1e-8, cfg.weight_decay)),
    };
    if let Some((_, dir)) = &checkpoint {
        let f = SafetensorsFile::open(dir.join("optimizer.safetensors"))?;
        let saved = lora_io::hf::read_json(&dir.join("trainer_state.json"))?;
        let mut st = OptimizerState::default();
        for k in f.names() {
            st.buffers.push((k.to_string(), f.read_f32(k)?.0));
        }
        if let Some(m) = saved["optimizer_steps"].as_object() {
            st.steps = m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect();
        }
        opt.import(&named_params(model.as_ref()), &st)?;
    }

    // Everything the step touches moves to the device now (weights, adapters; the optimizer
    // state follows its tensors on the first step).
    model.to_device(cfg.device)?;
    let (trainable, all_params) = param_counts(model.as_ref());
    let eval_before = if checkpoint.is_none() {
        eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss)
    } else {
        None
    };
    // Only now, with the model, data and settings checked, is the output directory touched.
    if nonempty && force && !resume {
        std::fs::remove_dir_all(out).map_err(|e| err(out, e.to_string()))?;
    }
    std::fs::create_dir_all(out).map_err(|e| err(out, e.to_string()))?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| err(out, e.to_string()))?;
    let t0 = Instant::now();
    let (mut tokens, mut last_loss) = (0usize, f32::NAN);
    let end = match cfg.stop_after {
        Some(k) => (start + k).min(total_steps),
        None => total_steps,
    };
    let save = |step: usize, opt: &dyn Optimizer, sampler: &Sampler| {
        save_checkpoint(
            out,
            step,
            model.as_ref(),
            &peft,
            opt,
            sampler,
            cfg,
            chat_now,
        )
    };
    for step in start..end {
        let micro: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| {
                let idx = sampler.take(cfg.batch_size);
                Batch::pad(&idx.iter().map(|&i| &train_seqs[i]).collect::<Vec<_>>())
            })
            .collect();
        let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total_steps);
        let st = train_step(
            model.as_ref(),
            opt.as_mut(),
            &groups,
            &micro,
            lr,
            cfg.max_grad_norm,
            cfg.seed,
            step as u64,
            cfg.gradient_checkpointing,
        )?;
        tokens += st.tokens;
        last_loss = st.loss;
        let done = step + 1;
        let eval_loss = if cfg.eval_every > 0 && done % cfg.eval_every == 0 && done != total_steps {
            eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss)
        } else {
            None
        };
        let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let line = json!({"step": done, "loss": st.loss, "lr": lr, "grad_norm": st.grad_norm, "tokens": st.tokens, "tokens_per_s": tps, "elapsed_s": t0.elapsed().as_secs_f64(), "eval_loss": eval_loss});
        writeln!(metrics, "{line}").map_err(|e| err(out, e.to_string()))?;
        on_step(&StepLog {
            step: done,
            total: total_steps,
            loss: st.loss,
            lr,
            tokens_per_s: tps,
            eval_loss,
        });
        if stop.load(std::sync::atomic::Ordering::SeqCst) && done != end {
            save(done, opt.as_ref(), &sampler)?;
            return Ok(TrainSummary {
                steps: done,
                final_loss: last_loss,
                eval_before,
                eval_after: None,
                tokens,
                seconds: t0.elapsed().as_secs_f64(),
                trainable,
                all_params,
                out: out.clone(),
                interrupted: true,
            });
        }
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done != end {
            save(done, opt.as_ref(), &sampler)?;
        }
    }
    save(end, opt.as_ref(), &sampler)?;
    let eval_after = eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss);
    if end == total_steps {
        save_adapter(model.as_ref(), &peft, out)?;
        if let Some(e) = eval_after {
            writeln!(metrics, "{}", json!({"step": end, "eval_loss": e}))
                .map_err(|e| err(out, e.to_string()))?;
        }
        let (train_pts, mut eval_pts) = crate::plot::read_metrics(&out.join("metrics.jsonl"))?;
        if let Some(e) = eval_before {
            // The eval loss before training is plotted at step 0 (a resumed run has no such point).
            eval_pts.insert(0, (0.0, e));
        }
        crate::plot::write_loss_svg(&out.join("loss.svg"), &train_pts, &eval_pts)?;
    }
    Ok(TrainSummary {
        steps: end,
        final_loss: last_loss,
        eval_before,
        eval_after,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        trainable,
        all_params,
        out: out.clone(),
        interrupted: false,
    })
}
