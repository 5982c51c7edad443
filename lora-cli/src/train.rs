//! `lora train`: the flags become a [`lora_train::run::TrainConfig`]; the run reports progress
//! (a live bar on a terminal, a few lines elsewhere), checkpoints on SIGINT/SIGTERM/SIGHUP and
//! exits with the status a shell gives the signal, then prints its summary.

use crate::args::TrainArgs;
use crate::device::resolve_device;
use crate::hub;
use anyhow::{Context, Result};

/// `lora train`.
pub fn command(mut a: TrainArgs) -> Result<()> {
    a.model = hub::model_dir(&a.model, a.revision.as_deref())?;
    if crate::sd::is_sd_model(&a.model) {
        if a.precision != lora_core::models::Precision::F32 {
            anyhow::bail!(
                "--precision {} applies to language models for now; Stable Diffusion trains in \
                 f32 (its 16-bit checkpoints are widened inside the products)",
                a.precision
            );
        }
        return crate::sd::train(a);
    }
    if a.sd_config.is_some() || a.train_text_encoder || a.text_encoder_lr.is_some() {
        anyhow::bail!(
            "--sd-config, --train-text-encoder and --text-encoder-lr apply to Stable Diffusion \
             pipelines only"
        );
    }
    let (device, note) = resolve_device(&a.device)?;
    let image = crate::vision::is_image_task(&a.model, &a.task)?;
    if a.precision != lora_core::models::Precision::F32 && image {
        anyhow::bail!(
            "--precision {} applies to language models for now; image models train in f32",
            a.precision
        );
    }
    if image {
        return crate::vision::train(a, device, &note);
    }
    // `--device auto --tf32` stays portable: on a machine without a GPU the flag has
    // nothing to act on and says so; `--device cpu --tf32` is a contradiction (error).
    let tf32 = a.tf32 && !(a.device == "auto" && device == lora_core::Device::Cpu);
    if tf32 {
        device.set_tf32(true).context("--tf32")?;
    }
    if !a.json {
        let mode = match (a.tf32, tf32) {
            (true, true) => " (TF32 GEMMs)",
            (true, false) => " (--tf32 has no effect on the CPU)",
            _ => "",
        };
        let products = match a.precision {
            lora_core::models::Precision::F32 => String::new(),
            p => format!(
                "; {p} products ({})",
                lora_kernels::gemm_bf16::kernel_name()
            ),
        };
        outln!("{note}{mode}{products}");
    }
    // The default sequence length yields to a model with fewer positions (say so); an
    // explicit --seq-len past the model's maximum stays an error.
    let seq_len = match a.seq_len {
        Some(n) => n,
        None => {
            let max = lora_io::hf::ModelDir::open(&a.model)?
                .config
                .max_positions();
            if max < 256 && !a.json {
                outln!(
                    "--seq-len: {} takes at most {max} positions; using {max} (the default is 256)",
                    a.model.display()
                );
            }
            max.min(256)
        }
    };
    let schedule = match a.schedule.as_str() {
        "cosine" => lora_train::optim::Schedule::Cosine,
        "linear" => lora_train::optim::Schedule::Linear,
        "constant" => lora_train::optim::Schedule::Constant,
        other => {
            anyhow::bail!("--schedule must be cosine, linear or constant, got `{other}`")
        }
    };
    let cfg = lora_train::run::TrainConfig {
        model: a.model,
        data: a.data,
        out: a.out,
        rank: a.rank.unwrap_or(8),
        alpha: a.alpha.unwrap_or(16.0),
        target: a.target.unwrap_or_else(|| "all-linear".into()),
        dropout: a.dropout,
        rslora: a.rslora,
        lr: a.lr.unwrap_or(2e-4),
        loraplus_ratio: a.loraplus_ratio,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        seq_len,
        steps: a.steps.unwrap_or(100),
        epochs: a.epochs,
        warmup: a.warmup,
        schedule,
        weight_decay: a.weight_decay,
        optimizer: a
            .optimizer
            .parse()
            .map_err(|e| anyhow::anyhow!("--optimizer {e}"))?,
        max_grad_norm: (a.max_grad_norm != 0.0).then_some(a.max_grad_norm),
        pack: a.pack,
        eos: !a.no_eos,
        assistant_only_loss: a.assistant_only_loss,
        seed: a.seed,
        eval_data: a.eval_data,
        eval_split: a.eval_split,
        eval_every: a.eval_every,
        save_every: a.save_every,
        save_minutes: a.save_minutes,
        keep_checkpoints: a.keep_checkpoints,
        gradient_checkpointing: a.gradient_checkpointing,
        device,
        stop_after: None,
        precision: a.precision,
    };
    run_train(
        &cfg,
        &TrainRun {
            resume: a.resume,
            force: a.force,
            threads: a.threads,
            log_every: a.log_every,
        },
        a.json,
    )
    .map(|_| ())
}

/// Set by SIGINT, SIGTERM or SIGHUP; the training loop checkpoints and stops after the current step.
pub(crate) static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The signal that set [`STOP`] (the exit status is 128 + it, as a shell reports a signal).
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Set once the first step has finished: before that there is nothing to checkpoint, and a
/// signal ends the process at once (loading can take minutes).
pub(crate) static STARTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if !STARTED.load(std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    // Only atomics and _exit: async-signal-safe. A second signal ends the process at once
    // (checkpoints are written atomically, so nothing half-written is left to read). The signal
    // is recorded before STOP is set, so a loop that sees STOP always finds it.
    SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
    if STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and takes any status.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// A signal that came after the last step: the run finished, and exits as finished.
pub(crate) fn clear_signal() {
    SIGNAL.store(0, std::sync::atomic::Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set [`STOP`] (before the first step they end the process).
pub(crate) fn install_signal_handlers() {
    // SAFETY: installs handlers that only touch atomics (and _exit on a second signal).
    #[cfg(unix)]
    unsafe {
        // SIGHUP too: a closed terminal or dropped SSH session keeps the work done so far.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The exit status a run stopped by a signal ends with (130 for SIGINT, 143 for SIGTERM, 129
/// for SIGHUP), once
/// its checkpoint is written; `None` when no signal stopped it.
pub fn signal_exit_status() -> Option<i32> {
    match SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(128 + s),
    }
}

/// How `lora train` runs beside its configuration.
pub struct TrainRun {
    /// Continue from the newest whole checkpoint.
    pub resume: bool,
    /// Replace a previous training output.
    pub force: bool,
    /// Worker threads.
    pub threads: Option<usize>,
    /// Progress lines outside a terminal: every N steps (`None`: about 20 per run).
    pub log_every: Option<usize>,
}

pub fn run_train(
    cfg: &lora_train::run::TrainConfig,
    run: &TrainRun,
    json: bool,
) -> Result<lora_train::run::TrainSummary> {
    run_train_report(cfg, run, if json { Report::Json } else { Report::Human }).map(|(s, _)| s)
}

/// How a training run reports its end.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Progress bar or lines, then the human summary.
    Human,
    /// No progress; the summary as one JSON object on stdout.
    Json,
    /// No progress, no summary (the caller reports).
    Silent,
}

/// [`run_train`] returning the summary object too.
pub fn run_train_report(
    cfg: &lora_train::run::TrainConfig,
    run: &TrainRun,
    report: Report,
) -> Result<(lora_train::run::TrainSummary, serde_json::Value)> {
    use lora_train::run::Event;
    let json = report != Report::Human;
    install_signal_handlers();
    let pool = crate::bench::pool(run.threads)?;
    // A live bar on a terminal; plain lines every `log_every` steps when stdout is a file or
    // a pipe.
    use std::io::IsTerminal;
    let bar = (!json && std::io::stdout().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps | {msg} | ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    if run.log_every == Some(0) {
        anyhow::bail!("--log-every must be at least 1");
    }
    let sum = pool.install(|| {
        lora_train::run::train_until(
            cfg,
            run.resume,
            run.force,
            &mut |ev| match ev {
                Event::Note(n) => match &bar {
                    Some(b) => b.println(format!("note: {n}")),
                    None => eprintln!("note: {n}"),
                },
                Event::Step(s) => {
                    STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
                    let eval = s
                        .eval_loss
                        .map(|e| format!(" | eval {e:.4}"))
                        .unwrap_or_default();
                    match &bar {
                        Some(b) => {
                            b.set_length(s.total as u64);
                            b.set_position(s.step as u64);
                            b.set_message(format!(
                                "loss {:.4} | lr {:.2e} | {:.0} tok/s{eval}",
                                s.loss, s.lr, s.tokens_per_s
                            ));
                            if let Some(e) = s.eval_loss {
                                b.println(format!("step {}: eval loss {e:.4}", s.step));
                            }
                        }
                        None if !json => {
                            let every = run.log_every.unwrap_or(s.total.div_ceil(20).max(1));
                            if s.step % every == 0
                                || s.step == s.total
                                || s.step == 1
                                || s.eval_loss.is_some()
                            {
                                outln!(
                                    "step {:>5}/{} | loss {:.4} | lr {:.2e} | {:.0} tok/s{eval}",
                                    s.step,
                                    s.total,
                                    s.loss,
                                    s.lr,
                                    s.tokens_per_s
                                )
                            }
                        }
                        None => {}
                    }
                }
            },
            &STOP,
        )
    })?;
    if let Some(b) = &bar {
        b.finish();
    }
    if !sum.interrupted {
        clear_signal();
    }
    if sum.interrupted {
        eprintln!(
            "interrupted: checkpoint written at step {}; continue with the same flags and --resume",
            sum.steps
        );
    }
    let obj = serde_json::json!({
        "steps": sum.steps, "final_loss": sum.final_loss, "eval_loss_before": sum.eval_before, "eval_loss_after": sum.eval_after,
        "tokens": sum.tokens, "seconds": sum.seconds, "tokens_per_s": sum.tokens as f64 / sum.seconds.max(1e-9),
        "trainable_params": sum.trainable, "all_params": sum.all_params, "out": sum.out,
        "peak_rss_bytes": crate::train_bench::peak_rss_bytes(), "interrupted": sum.interrupted,
        "already_complete": sum.already_complete, "device": cfg.device.to_string(), "precision": cfg.precision.name(),
    });
    if report == Report::Json {
        outln!("{obj}");
    } else if report == Report::Human && sum.already_complete {
        outln!(
            "{}: the run is already complete at step {} (last train loss {:.4}); pass a larger --steps with --resume to train on",
            sum.out.display(),
            sum.steps,
            sum.final_loss
        );
    } else if report == Report::Human {
        let pct = 100.0 * sum.trainable as f64 / sum.all_params.max(1) as f64;
        outln!(
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            sum.trainable,
            sum.all_params
        );
        let rss = crate::train_bench::peak_rss_bytes().map_or("n/a".into(), |b| {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        });
        outln!(
            "{} steps in {:.1} s ({:.0} tokens/s, peak memory {rss}); final train loss {:.4}",
            sum.steps,
            sum.seconds,
            sum.tokens as f64 / sum.seconds.max(1e-9),
            sum.final_loss
        );
        match (sum.eval_before, sum.eval_after) {
            (Some(a), Some(b)) => outln!("eval loss {a:.4} -> {b:.4}"),
            (None, Some(b)) => outln!("eval loss {b:.4}"),
            _ => {}
        }
        if sum.interrupted {
            outln!(
                "checkpoint: {}/checkpoint-{:06} | metrics: {}/metrics.jsonl",
                sum.out.display(),
                sum.steps,
                sum.out.display()
            );
        } else {
            outln!("adapter: {0}/adapter_model.safetensors | metrics: {0}/metrics.jsonl | loss curve: {0}/loss.svg", sum.out.display());
        }
    }
    Ok((sum, obj))
}
