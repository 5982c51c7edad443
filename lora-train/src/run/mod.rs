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
//! so a resumed run ends with the same adapter as an uninterrupted one. A checkpoint that does
//! not read back whole (a damaged file, missing moments or sampler position) is skipped for the
//! newest one that does, and the run says which.
//!
//! The output directory carries lora-rs's marker (see [`lora_io::outdir`]) and, while a run
//! writes there, its lock: a second run into the same directory is refused with the first one's
//! pid. Temporaries a killed run left (`.checkpoint-N.tmp`, half-written files) are removed by
//! the next run and reported. `force` replaces only a previous training output holding nothing
//! else, and never an input.

use crate::batches::{
    chat_template_for, pack, read_examples, tokenize, training_eos, Batch, Sampler, Sequence,
    TokenizeOptions,
};
use crate::data::Example;
use crate::eval::eval_sequences;
use crate::optim::{lr_factor, Optimizer, OptimizerKind, OptimizerState, Schedule};
use crate::trainer::{adapter_groups, train_step, StepStats};
use crate::{Result, TrainError};
use lora_core::models::{param_counts, set_precision, CausalLm};
use lora_core::Tensor;
use lora_io::hf::ModelDir;
use lora_io::outdir::{self, Existing, Owned};
use lora_io::peft::{inject, load_adapter, save_adapter, PeftConfig, Targets};
use lora_io::safetensors::SafetensorsFile;
use lora_io::tokenizer::TextTokenizer;
use lora_io::write::{write_atomic, write_safetensors, OutDtype, OutTensor};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod checkpoint;
mod config;
mod data;
mod output;

use checkpoint::*;
pub use checkpoint::{
    checkpoint_step, checkpoints, is_checkpoint_tmp, is_train_output, newest_whole, put_in_place,
    read_trainer_state, rotate, SavedState,
};
pub use config::TrainConfig;
use config::*;
pub use data::check_vocab;
use data::*;
use output::*;

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

/// What a run reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A step finished.
    Step(&'a StepLog),
    /// A one-line notice for the user: a stale temporary removed, a damaged checkpoint skipped,
    /// examples dropped, a run extended.
    Note(&'a str),
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Steps completed (in total, including before a resume).
    pub steps: usize,
    /// Last training loss.
    pub final_loss: f32,
    /// Eval loss before training (a resumed run reports its original run's).
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
    /// `--resume` found the run already finished: nothing was trained (`final_loss` is the
    /// run's last).
    pub already_complete: bool,
}

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// A setting of the run (`--rank`, ...) that does not fit the model or the data.
fn setting_err(setting: &'static str, reason: impl Into<String>) -> TrainError {
    TrainError::Setting {
        setting,
        reason: reason.into(),
    }
}

/// Runs (or, with `resume`, continues) training; `on_event` sees every step and notice.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    train_until(
        cfg,
        resume,
        force,
        on_event,
        &std::sync::atomic::AtomicBool::new(false),
    )
}

/// [`train`] with a stop flag: when it becomes true (Ctrl-C, SIGTERM), the run checkpoints after
/// the current step and returns early (`TrainSummary::interrupted`).
///
/// In order: the settings and the output directory are checked, the checkpoint to resume from
/// found, the model loaded and adapted ([`prepare_model`]), the data read and tokenized
/// ([`prepare_data`]), the resume position restored ([`resume_position`]); only then is the
/// output directory taken and the steps run ([`run_steps`]).
pub fn train_until(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_event: &mut dyn FnMut(Event),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    check_output(cfg, resume, force)?;
    let mut note = |s: &str| on_event(Event::Note(s));
    let mut opt = cfg.optimizer.build(cfg.weight_decay);
    let checkpoint = if resume {
        Some(newest_resumable(&cfg.out, opt.as_ref(), &mut note)?)
    } else {
        None
    };
    let md = ModelDir::open(&cfg.model)?;
    let tok = TextTokenizer::from_model_dir(&cfg.model)?;
    let (examples, eval_examples) = read_split(cfg)?;
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
    let (model, peft, saved_chat_now) = prepare_model(cfg, &md, checkpoint.as_ref(), &mut note)?;
    let data = prepare_data(
        cfg,
        &tok,
        model.as_ref(),
        (&examples, &eval_examples),
        eos,
        saved_chat_now,
        &mut note,
    )?;
    let total_steps = data.total_steps(cfg);
    if cfg.warmup >= total_steps && checkpoint.is_none() {
        note(&format!(
            "--warmup {} is not shorter than the run's {total_steps} steps: the learning rate \
             never reaches --lr {}",
            cfg.warmup, cfg.lr
        ));
    }
    let mut sampler = Sampler::new(data.train.len(), cfg.seed);
    let start = match &checkpoint {
        Some(c) => {
            let at = resume_position(
                cfg,
                c,
                total_steps,
                data.train.len(),
                (&mut sampler, opt.as_mut(), model.as_ref()),
                &mut note,
            )?;
            match at {
                Ok(step) => step,
                Err(complete) => return Ok(complete),
            }
        }
        None => 0,
    };

    let groups = adapter_groups(model.as_ref(), cfg.loraplus_ratio);
    // Everything the step touches moves to the device now (weights, adapters; the optimizer
    // state follows its tensors on the first step).
    model.to_device(cfg.device)?;
    // bf16 products: the frozen weights are packed once, here, after the adapters are in
    // place (validate() kept this to the CPU).
    set_precision(model.as_ref(), cfg.precision)?;
    let (trainable, all_params) = param_counts(model.as_ref());
    let eval_before = match &checkpoint {
        None => eval_sequences(model.as_ref(), &data.eval, true)?.map(|r| r.loss),
        Some(c) => c.state["eval_before"].as_f64(),
    };
    // Only now, with the model, data and settings checked, is the output directory touched.
    let _lock = take_output(cfg, checkpoint.as_ref().map(|c| c.step), force, &mut note)?;
    let last_loss = checkpoint
        .as_ref()
        .and_then(|c| c.state["loss"].as_f64())
        .map_or(f32::NAN, |x| x as f32);
    run_steps(
        Ready {
            cfg,
            model: model.as_ref(),
            peft: &peft,
            opt: opt.as_mut(),
            groups: &groups,
            data: &data,
            sampler,
            start,
            total_steps,
            resumed: checkpoint.is_some(),
            last_loss,
            eval_before,
            params: (trainable, all_params),
        },
        on_event,
        stop,
    )
}

/// The training examples and the held-out ones: `--eval-data`'s, or a seeded `--eval-split`
/// of the training file's.
fn read_split(cfg: &TrainConfig) -> Result<(Vec<Example>, Vec<Example>)> {
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
    Ok((examples, eval_examples))
}

/// The model with its adapters in place: the checkpoint's (its settings compared with this
/// run's first), or new ones injected as `cfg` says. Returns the chat templates' clock the
/// checkpoint recorded, if any.
fn prepare_model(
    cfg: &TrainConfig,
    md: &ModelDir,
    checkpoint: Option<&Resumable>,
    note: &mut dyn FnMut(&str),
) -> Result<(Box<dyn CausalLm>, PeftConfig, Option<i64>)> {
    let mut model = md.load_model()?;
    if cfg.seq_len > model.max_positions() {
        return Err(setting_err(
            "seq-len",
            format!(
                "{} exceeds the model's maximum of {} positions ({})",
                cfg.seq_len,
                model.max_positions(),
                cfg.model.join("config.json").display()
            ),
        ));
    }
    let peft = cfg.peft();
    let saved_chat_now = match checkpoint {
        Some(c) => {
            let sp = c.dir.join("trainer_state.json");
            let diff = config_diff(&c.state["config"], &cfg.to_json());
            if !diff.is_empty() {
                return Err(err(
                    &sp,
                    format!(
                        "the run's settings differ from this checkpoint's ({}); resume with the \
                         same flags",
                        diff.join("; ")
                    ),
                ));
            }
            load_adapter(model.as_mut(), &c.dir)?;
            c.state["chat_now"].as_i64()
        }
        None => {
            check_rank(model.as_ref(), &peft)?;
            let chosen = inject(model.as_mut(), &peft, cfg.seed)?;
            if let Targets::List(names) = &peft.target_modules {
                for t in names {
                    if !chosen
                        .iter()
                        .any(|c| c == t || c.ends_with(&format!(".{t}")))
                    {
                        note(&format!("--target `{t}` matched no module of this model"));
                    }
                }
            }
            None
        }
    };
    Ok((model, peft, saved_chat_now))
}

/// Where a resumed run starts: `Ok(step)`, with the sampler and the optimizer restored; or, for
/// a run whose last step and adapter are already written, `Err` with its summary.
fn resume_position(
    cfg: &TrainConfig,
    c: &Resumable,
    total_steps: usize,
    train_len: usize,
    (sampler, opt, model): (&mut Sampler, &mut dyn Optimizer, &dyn CausalLm),
    note: &mut dyn FnMut(&str),
) -> Result<std::result::Result<usize, TrainSummary>> {
    let out = &cfg.out;
    if c.sampler_pos > train_len {
        return Err(err(
            &c.dir.join("trainer_state.json"),
            format!(
                "`sampler_pos` {} is past the {} training sequences (was the data \
                 changed since the run began?)",
                c.sampler_pos, train_len
            ),
        ));
    }
    *sampler = Sampler::resume(train_len, cfg.seed, c.sampler_epoch, c.sampler_pos);
    opt.import(&named_params(model), &c.optimizer)?;
    let saved_total = c.state["config"]["steps"].as_u64().unwrap_or(0) as usize;
    if c.step > total_steps {
        return Err(err(
            &c.dir,
            format!(
                "the checkpoint is at step {}, past this run's {total_steps} steps; \
                 pass --steps {} or more to go on",
                c.step, c.step
            ),
        ));
    }
    if c.step == total_steps && out.join("adapter_model.safetensors").exists() {
        let loss = c.state["loss"].as_f64().map_or(f32::NAN, |x| x as f32);
        return Ok(Err(TrainSummary {
            steps: c.step,
            final_loss: loss,
            eval_before: c.state["eval_before"].as_f64(),
            eval_after: None,
            tokens: 0,
            seconds: 0.0,
            trainable: 0,
            all_params: 0,
            out: out.clone(),
            interrupted: false,
            already_complete: true,
        }));
    }
    if cfg.epochs.is_none() && saved_total != 0 && saved_total != total_steps {
        note(&format!(
            "extending the run from {saved_total} to {total_steps} steps: the \
             learning-rate schedule spans {total_steps} steps from here on"
        ));
    }
    Ok(Ok(c.step))
}

/// What the step loop runs on, every check passed and the output directory taken.
struct Ready<'a> {
    cfg: &'a TrainConfig,
    model: &'a dyn CausalLm,
    peft: &'a PeftConfig,
    opt: &'a mut dyn Optimizer,
    groups: &'a [crate::optim::ParamGroup],
    data: &'a Data,
    sampler: Sampler,
    /// The first step to run (0, or the checkpoint's).
    start: usize,
    total_steps: usize,
    /// Resumed from a checkpoint (the eval before training is already in the metrics).
    resumed: bool,
    /// The last training loss so far (the checkpoint's on resume).
    last_loss: f32,
    eval_before: Option<f64>,
    /// Trainable and all parameters.
    params: (usize, usize),
}

/// The steps: sample, step, evaluate when due, log a metrics line and an event, checkpoint on
/// schedule or on `stop`; at the end, the last checkpoint, the adapter and the loss plot.
fn run_steps(
    r: Ready,
    on_event: &mut dyn FnMut(Event),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<TrainSummary> {
    let Ready {
        cfg,
        model,
        peft,
        opt,
        groups,
        data,
        mut sampler,
        start,
        total_steps,
        resumed,
        mut last_loss,
        eval_before,
        params: (trainable, all_params),
    } = r;
    let out = &cfg.out;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| err(out, e.to_string()))?;
    let mut metric = |step: usize,
                      st: Option<&StepStats>,
                      lr: Option<f32>,
                      tps: Option<f64>,
                      elapsed: f64,
                      eval: Option<f64>| {
        // Every line has the same keys; the line before training has no step statistics.
        let line = json!({
            "step": step, "loss": st.map(|s| s.loss), "lr": lr, "grad_norm": st.map(|s| s.grad_norm),
            "tokens": st.map_or(0, |s| s.tokens), "tokens_per_s": tps, "elapsed_s": elapsed, "eval_loss": eval,
        });
        writeln!(metrics, "{line}").map_err(|e| err(out, e.to_string()))
    };
    if !resumed {
        if let Some(e) = eval_before {
            metric(0, None, None, None, 0.0, Some(e))?;
        }
    }
    let t0 = Instant::now();
    let mut last_save = Instant::now();
    let mut tokens = 0usize;
    let end = match cfg.stop_after {
        Some(k) => (start + k).min(total_steps),
        None => total_steps,
    };
    let save = |step: usize, opt: &dyn Optimizer, sampler: &Sampler, loss: f32| {
        let st = CheckpointState {
            model,
            peft,
            opt,
            sampler,
            cfg,
            extras: CheckpointExtras {
                chat_now: data.chat_now,
                loss,
                eval_before,
            },
        };
        save_checkpoint(out, step, &st)
    };
    let summary = |steps: usize, final_loss: f32, eval_after, tokens, interrupted| TrainSummary {
        steps,
        final_loss,
        eval_before,
        eval_after,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        trainable,
        all_params,
        out: out.clone(),
        interrupted,
        already_complete: false,
    };
    let mut eval_after = None;
    for step in start..end {
        let micro: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| {
                let idx = sampler.take(cfg.batch_size);
                Batch::pad(&idx.iter().map(|&i| &data.train[i]).collect::<Vec<_>>())
            })
            .collect();
        let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total_steps);
        let st = train_step(
            model,
            opt,
            groups,
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
        let eval_loss = if done == total_steps || (cfg.eval_every > 0 && done % cfg.eval_every == 0)
        {
            eval_sequences(model, &data.eval, true)?.map(|r| r.loss)
        } else {
            None
        };
        if done == total_steps {
            eval_after = eval_loss;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let tps = tokens as f64 / elapsed.max(1e-9);
        metric(done, Some(&st), Some(lr), Some(tps), elapsed, eval_loss)?;
        on_event(Event::Step(&StepLog {
            step: done,
            total: total_steps,
            loss: st.loss,
            lr,
            tokens_per_s: tps,
            eval_loss,
        }));
        if stop.load(std::sync::atomic::Ordering::SeqCst) && done != end {
            for n in save(done, opt, &sampler, last_loss)? {
                on_event(Event::Note(&n));
            }
            return Ok(summary(done, last_loss, None, tokens, true));
        }
        let by_steps = cfg.save_every > 0 && done % cfg.save_every == 0;
        let by_time = cfg.save_minutes > 0.0
            && last_save.elapsed().as_secs_f64() >= cfg.save_minutes as f64 * 60.0;
        if (by_steps || by_time) && done != end {
            for n in save(done, opt, &sampler, last_loss)? {
                on_event(Event::Note(&n));
            }
            last_save = Instant::now();
        }
    }
    if start == end && end == total_steps {
        // Resumed from the last step's checkpoint of a run stopped before its adapter was
        // written: nothing to train, the end's eval still to do.
        eval_after = eval_sequences(model, &data.eval, true)?.map(|r| r.loss);
    }
    for n in save(end, opt, &sampler, last_loss)? {
        on_event(Event::Note(&n));
    }
    if end == total_steps {
        save_adapter(model, peft, out)?;
        let (train_pts, eval_pts) = crate::plot::read_metrics(&out.join("metrics.jsonl"))?;
        crate::plot::write_loss_svg(&out.join("loss.svg"), &train_pts, &eval_pts)?;
    }
    Ok(summary(end, last_loss, eval_after, tokens, false))
}
