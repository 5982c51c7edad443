//! `lora eval` and `lora generate`: load a model directory (and adapter), then evaluate a
//! dataset or continue a prompt.

use anyhow::{Context, Result};
use lora_core::models::generate::{generate, GenerateConfig};
use lora_core::models::CausalLm;
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

/// What `lora eval` runs.
pub struct EvalRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub seq_len: Option<usize>,
    /// Append the training EOS to each text and completion.
    pub eos: bool,
    /// Score the assistant's turns only.
    pub assistant_only_loss: bool,
    pub json: bool,
    /// Where the forward passes run.
    pub device: lora_core::Device,
}

/// What `lora generate` runs.
pub struct GenerateRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    /// `prompt` is a user message for the chat template; print the reply only.
    pub chat: bool,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

fn load(
    model: &Path,
    adapter: Option<&Path>,
) -> Result<(ModelDir, Box<dyn CausalLm>, TextTokenizer)> {
    let md = ModelDir::open(model).with_context(|| format!("loading model {}", model.display()))?;
    // The tokenizer first: a missing tokenizer.json should not cost a weight load.
    let tok = TextTokenizer::from_model_dir(model)?;
    let mut m = md
        .load_model()
        .with_context(|| format!("loading weights of {}", model.display()))?;
    if let Some(a) = adapter {
        load_adapter(m.as_mut(), a).with_context(|| format!("loading adapter {}", a.display()))?;
    }
    Ok((md, m, tok))
}

pub fn run_eval(r: &EvalRun) -> Result<()> {
    let (md, model, tok) = load(&r.model, r.adapter.as_deref())?;
    model.to_device(r.device)?;
    let examples = lora_train::data::read_examples(&r.data)?;
    let eos = if r.eos {
        lora_train::batches::training_eos(&md, &tok, &examples, "drop --eos")?
    } else {
        None
    };
    let chat = lora_train::batches::chat_template_for(&r.model, &r.data, &examples)?;
    let seq_len = match r.seq_len {
        None => model.max_positions(),
        Some(0 | 1) => anyhow::bail!("--seq-len must be at least 2"),
        Some(n) if n > model.max_positions() => anyhow::bail!(
            "--seq-len {n} exceeds the model's maximum of {} positions ({})",
            model.max_positions(),
            r.model.join("config.json").display()
        ),
        Some(n) => n,
    };
    let res = lora_train::eval::evaluate_examples(
        model.as_ref(),
        &tok,
        &examples,
        &lora_train::batches::TokenizeOptions {
            eos,
            chat: chat.as_ref(),
            assistant_only: r.assistant_only_loss,
            ..lora_train::batches::TokenizeOptions::new(seq_len)
        },
        true,
    )
    .with_context(|| format!("evaluating {}", r.data.display()))?;
    if !res.loss.is_finite() {
        anyhow::bail!(
            "the loss on {} is {}: the model{} computes non-finite values (a damaged weight or \
             config value)",
            r.data.display(),
            res.loss,
            if r.adapter.is_some() {
                " or the adapter"
            } else {
                ""
            }
        );
    }
    if r.json {
        outln!(
            "{}",
            serde_json::json!({"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens, "examples": res.examples})
        );
    } else {
        outln!(
            "loss {:.6} | perplexity {:.4} | {} tokens in {} examples (seq-len {seq_len})",
            res.loss,
            res.perplexity,
            res.tokens,
            res.examples
        );
    }
    Ok(())
}

pub fn run_generate(r: &GenerateRun) -> Result<()> {
    let (md, model, tok) = load(&r.model, r.adapter.as_deref())?;
    let prompt = if r.chat {
        let t = lora_io::chat::ChatTemplate::from_model_dir(&r.model)?.with_context(|| {
            format!(
                "--chat: {} has no chat template (chat_template.jinja or tokenizer_config.json \
                 `chat_template`)",
                r.model.display()
            )
        })?;
        // The EOS the template's special tokens name must be a real token (as training checks).
        md.training_eos(&tok)?;
        let msg = serde_json::json!({"role": "user", "content": r.prompt});
        tok.encode_plain(&t.render(&[msg], true)?)?
    } else {
        tok.encode(&r.prompt)?
    };
    if !(r.temperature.is_finite() && r.temperature >= 0.0) {
        anyhow::bail!(
            "--temperature must be 0 (greedy) or positive, got {}",
            r.temperature
        );
    }
    if !(r.top_p > 0.0 && r.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", r.top_p);
    }
    if prompt.len() > model.max_positions() {
        anyhow::bail!(
            "--prompt: {} tokens, more than the model's {} positions",
            prompt.len(),
            model.max_positions()
        );
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= model.vocab_size()) {
        anyhow::bail!(
            "{}: token id {id} of the prompt is past the model's vocabulary of {} (the tokenizer \
             belongs to another model)",
            tok.path().display(),
            model.vocab_size()
        );
    }
    let cfg = GenerateConfig {
        max_new_tokens: r.max_new_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        seed: r.seed,
        eos: md.eos_token_ids()?,
        adapters: true,
    };
    let ids = generate(model.as_ref(), &prompt, &cfg)?;
    let added = ids.len() - prompt.len();
    if added < r.max_new_tokens
        && ids.len() >= model.max_positions()
        && !ids.last().is_some_and(|t| cfg.eos.contains(t))
    {
        eprintln!(
            "note: stopped after {added} new tokens at the model's maximum of {} positions",
            model.max_positions()
        );
    }
    let shown = if r.chat {
        &ids[prompt.len()..]
    } else {
        &ids[..]
    };
    outln!("{}", tok.decode(shown)?);
    Ok(())
}

pub fn run_inspect(path: &Path, json: bool) -> Result<()> {
    use lora_io::inspect::{inspect, Report};
    let rep = inspect(path)?;
    if json {
        outln!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    let tensors = |ts: &[lora_io::inspect::TensorEntry]| {
        for t in ts {
            outln!("  {:<60} {:<5} {:?}", t.name, t.dtype, t.shape);
        }
    };
    match rep {
        Report::Model {
            architecture,
            params,
            linear_modules,
            tensors: ts,
        } => {
            outln!("model: {architecture}");
            outln!("parameters: {params}");
            outln!(
                "linear modules ({}): {}",
                linear_modules.len(),
                linear_modules.join(", ")
            );
            outln!("tensors ({}):", ts.len());
            tensors(&ts);
        }
        Report::Adapter {
            target_modules,
            use_rslora,
            params,
            modules,
        } => {
            outln!("PEFT LoRA adapter: target_modules {target_modules}, rsLoRA {use_rslora}, {params} parameters, {} modules", modules.len());
            outln!(
                "  {:<50} {:>4} {:>7} {:>8} {:>10} {:>10} {:>12}",
                "module",
                "r",
                "alpha",
                "scale",
                "|A|",
                "|B|",
                "|s*B@A|"
            );
            let damaged: usize = modules.iter().map(|m| m.non_finite).sum();
            for m in modules {
                outln!(
                    "  {:<50} {:>4} {:>7} {:>8.4} {:>10.4} {:>10.4} {:>12.4}",
                    m.module,
                    m.r,
                    m.alpha,
                    m.scale,
                    m.norm_a,
                    m.norm_b,
                    m.norm_delta
                );
            }
            if damaged > 0 {
                outln!("warning: {damaged} values of A and B are NaN or infinite: this adapter is damaged, and eval, generate and merge refuse it");
            }
        }
        Report::File {
            params,
            metadata,
            tensors: ts,
        } => {
            outln!(
                "safetensors file: {} tensors, {params} parameters",
                ts.len()
            );
            for (k, v) in metadata {
                outln!("  metadata {k} = {v}");
            }
            tensors(&ts);
        }
    }
    Ok(())
}

pub fn run_convert(
    from: &Path,
    to: &Path,
    model: Option<&Path>,
    prefix: &str,
    force: bool,
    peft_files: &[&str],
) -> Result<()> {
    use lora_io::kohya::KohyaLora;
    use lora_io::outdir;
    let _lock = outdir::OutputLock::beside(to)?;
    if from.is_dir() {
        if to.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            anyhow::bail!("PEFT -> kohya writes one file: --to must end in .safetensors");
        }
        outdir::check_not_input("--to", to, &[("--from adapter", from)])?;
        outdir::check_output_file("--to", to, force)?;
        let mut k = KohyaLora::from_peft(from, prefix)?;
        k.metadata
            .insert(outdir::FILE_MARK.into(), "lora convert".into());
        k.write(to)?;
        outln!(
            "wrote {} modules to {} (kohya, prefix {prefix})",
            k.modules.len(),
            to.display()
        );
    } else {
        let model = model.ok_or_else(|| anyhow::anyhow!(
            "kohya -> PEFT needs --model DIR: kohya flattens module paths with `_`, and only the model's module list can restore the dots"
        ))?;
        if to.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            anyhow::bail!(
                "kohya -> PEFT writes an adapter directory: --to must not end in .safetensors"
            );
        }
        outdir::check_not_input(
            "--to",
            to,
            &[("--from file", from), ("--model directory", model)],
        )?;
        let k = KohyaLora::read(from)?;
        let m = ModelDir::open(model)?.load_model()?;
        outdir::prepare_dir_output(
            "--to",
            to,
            "lora convert",
            peft_files,
            force,
            &[("--from file", from), ("--model directory", model)],
        )?;
        k.to_peft(m.as_ref(), to)?;
        outln!(
            "wrote {} modules to {} (PEFT)",
            k.modules.len(),
            to.display()
        );
    }
    Ok(())
}

/// Set by SIGINT, SIGTERM or SIGHUP; the training loop checkpoints and stops after the current step.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The signal that set [`STOP`] (the exit status is 128 + it, as a shell reports a signal).
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Set once the first step has finished: before that there is nothing to checkpoint, and a
/// signal ends the process at once (loading can take minutes).
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if !STARTED.load(std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    // Only atomics and _exit: async-signal-safe. A second signal ends the process at once
    // (checkpoints are written atomically, so nothing half-written is left to read).
    if STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and takes any status.
        unsafe { libc::_exit(128 + sig) };
    }
    SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
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
    // SAFETY: installs handlers that only touch atomics (and _exit on a second signal).
    #[cfg(unix)]
    unsafe {
        // SIGHUP too: a closed terminal or dropped SSH session keeps the work done so far.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
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
        // A signal that came after the last step: the run finished, and exits as finished.
        SIGNAL.store(0, std::sync::atomic::Ordering::SeqCst);
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
        "already_complete": sum.already_complete, "device": cfg.device.to_string(),
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
