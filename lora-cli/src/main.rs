//! `lora`: the command-line front end of lora-rs.
//!
//! Flags are defined once here with their help text; each subcommand turns them into a plain
//! run configuration and hands it to its module. Errors print their whole chain and exit 1.
//! Commands: `demo`, `train`, `eval`, `generate`, `merge`, `inspect`, `convert`, `combine`,
//! `bench linear|gemm|train|mixed`.
//!
//! Standard output goes through `outln!`, which drops what a closed pipe cannot take
//! (`lora train ... | head`) instead of panicking: a run keeps training and checkpointing.

/// `println!` that never panics on a closed standard output (see the module docs).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod bench;
mod bench_cuda;
mod demo;
mod demo_data;
mod hub;
mod infer;
mod train_bench;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;

#[derive(Parser)]
#[command(
    name = "lora",
    version,
    about = "LoRA fine-tuning in Rust: train, run and benchmark low-rank adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The built-in default, no download: train a LoRA adapter that teaches the shipped tiny
    /// GPT-2 to translate English to French, with eval loss, exact-match scores and sample
    /// generations before and after.
    Demo(DemoArgs),
    /// Train a LoRA adapter on a Hugging Face model and a dataset; writes a PEFT adapter.
    Train(TrainArgs),
    /// Mean token cross-entropy of a model (and adapter) over a dataset, as transformers computes it.
    Eval(EvalArgs),
    /// Continue a prompt (greedy at temperature 0), with a KV cache.
    Generate(GenerateArgs),
    /// Fold an adapter into its base model and write a complete model directory.
    Merge(MergeArgs),
    /// Show what a model directory, an adapter directory or a safetensors file holds.
    Inspect(InspectArgs),
    /// Convert between a PEFT adapter directory and a kohya .safetensors file (either way).
    Convert(ConvertArgs),
    /// Combine adapters into a new one (PEFT's add_weighted_adapter: cat, linear, svd).
    Combine(CombineArgs),
    /// Measure kernel speed on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct DemoArgs {
    /// Output directory for the adapter, metrics.jsonl and loss.svg (an earlier demo output
    /// there is replaced).
    #[arg(long, default_value = "lora-demo-out")]
    out: std::path::PathBuf,
    /// Training steps (batch 16).
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Sample translations to print.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// The demo directory (base/, data/); default: the repository's demo/.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print one JSON object with the before/after figures.
    #[arg(long)]
    json: bool,
    /// Regenerate the demo files instead: the datasets, the tokenizer, and the base model
    /// pretrained from scratch (full-parameter training; about 10 minutes on 2 cores).
    #[arg(long)]
    build: bool,
    /// Pretraining steps for --build (batch 32 x 64 tokens).
    #[arg(long, default_value_t = 2000)]
    pretrain_steps: usize,
}

#[derive(Args)]
struct ConvertArgs {
    /// A PEFT adapter directory or a kohya .safetensors file.
    #[arg(long)]
    from: std::path::PathBuf,
    /// The output: a .safetensors file (PEFT -> kohya) or a directory (kohya -> PEFT).
    #[arg(long)]
    to: std::path::PathBuf,
    /// Model directory whose module paths resolve kohya's flattened names (kohya -> PEFT).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// kohya name prefix for PEFT -> kohya: lora_te, lora_te1, lora_te2 or lora_unet.
    #[arg(long, default_value = "lora_te")]
    prefix: String,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CombineArgs {
    /// A PEFT adapter directory; repeat for each adapter.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<std::path::PathBuf>,
    /// Weight of each adapter, in the same order (default 1 for all).
    #[arg(long = "weight", allow_negative_numbers = true)]
    weights: Vec<f32>,
    /// cat (exact, rank = sum of ranks), linear (equal ranks, PEFT's factor-wise sum) or svd
    /// (truncated SVD of the weighted sum of updates).
    #[arg(long, default_value = "cat")]
    how: String,
    /// Output rank for svd (default: the largest input rank).
    #[arg(long)]
    rank: Option<usize>,
    /// Output adapter directory.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// A model directory, an adapter directory or a .safetensors file.
    path: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// Hugging Face model directory, or a Hub id (org/name) in the local Hugging Face cache.
    #[arg(long)]
    model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: std::path::PathBuf,
    /// Output directory (config, tokenizer and model.safetensors with W + s*B@A).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Storage dtype of the output: f32, bf16 or f16 (default: the checkpoint's).
    #[arg(long)]
    dtype: Option<String>,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// A TOML file with any of these settings as keys (`lr = 1e-4`, `target = "q_proj,v_proj"`,
    /// `rslora = true`); flags given on the command line override it.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Hugging Face model directory, or a Hub id (org/name) already in the local Hugging Face
    /// cache (HF_HUB_CACHE, HF_HOME or ~/.cache/huggingface).
    #[arg(long)]
    model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// Training data: .txt (paragraphs), .jsonl with `text`, .jsonl with `prompt` and
    /// `completion` (loss on the completion only), or conversations rendered with the model's
    /// chat template: .jsonl with `messages` (loss on every token), or with `prompt` and
    /// `completion` as message lists (loss on the completion only), as TRL reads them.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Output directory (final adapter, metrics.jsonl, checkpoint-* folders).
    #[arg(long)]
    out: std::path::PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank, or alpha / sqrt(rank) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Modules to adapt: comma-separated names (exact or dotted suffix), a regex, or all-linear.
    #[arg(long, default_value = "all-linear")]
    target: String,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    rslora: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// LoRA+: learning-rate ratio of B to A.
    #[arg(long, default_value_t = 1.0)]
    loraplus_ratio: f32,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Tokens per sequence (longer examples are truncated; with --pack, the block length).
    /// Default: 256, or the model's maximum when it has fewer positions.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Optimizer steps (with --resume, a larger number extends a run).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Train for this many passes over the data instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f32>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Decay after warmup: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Weight decay (AdamW: decoupled).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// adamw or sgd (momentum 0.9).
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Pack examples into full --seq-len blocks.
    #[arg(long)]
    pack: bool,
    /// Do not end each text and completion with the tokenizer's EOS token. By default it is
    /// appended and trained on, as TRL's SFTTrainer does, so the model learns where an answer
    /// stops (tokenizer_config.json's eos_token, else config.json's eos_token_id).
    #[arg(long)]
    no_eos: bool,
    /// In conversations (`messages` data), take the loss on the assistant's turns only: their
    /// content and end-of-turn marker as the chat template writes them, not the system or user
    /// turns or the role headers.
    #[arg(long)]
    assistant_only_loss: bool,
    /// Activation checkpointing: keep only each transformer block's input and recompute the
    /// block during backward. Much less activation memory (long sequences, big models) for about
    /// a third more compute; the same training up to f32 rounding.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Seed for initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out data file (otherwise --eval-split of the data is held out).
    #[arg(long)]
    eval_data: Option<std::path::PathBuf>,
    /// Fraction of the data held out for evaluation when no --eval-data is given.
    #[arg(long, default_value_t = 0.0, conflicts_with = "eval_data")]
    eval_split: f32,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Write a checkpoint every N steps (0: by time and at the end only).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Also write a checkpoint whenever this many minutes of training have passed since the
    /// last one (0: never by time), so a killed run loses at most that much work.
    #[arg(long, default_value_t = 5.0)]
    save_minutes: f32,
    /// Outside a terminal, print a progress line every N steps (default: about 20 lines per
    /// run; eval steps and the last step always print). A terminal gets a live bar instead.
    #[arg(long)]
    log_every: Option<usize>,
    /// Keep only the newest N checkpoints (0: keep all).
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// auto, cpu, cuda or cuda:N. `auto` picks CUDA when a device answers and its kernels
    /// compile, else the CPU, and says which; asking for cuda where it cannot run is an error
    /// rather than a silent fallback.
    #[arg(long, default_value = "auto")]
    device: String,
    /// On a GPU, let the frozen base products and the output head use TF32 tensor cores
    /// (inputs rounded to a 10-bit mantissa, f32 accumulation; PyTorch's `allow_tf32`): much
    /// faster, about 1e-3 relative difference in activations. Adapters, optimizer state and
    /// everything else stay f32. Off by default.
    #[arg(long)]
    tf32: bool,
    /// Continue from the newest checkpoint in --out (same flags as the original run).
    #[arg(long)]
    resume: bool,
    /// Delete a non-empty --out and start over.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json), or a Hub id (org/name) already in the local Hugging Face cache.
    #[arg(long)]
    model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Dataset: .txt (paragraphs separated by blank lines), .jsonl with `text`, .jsonl with
    /// `prompt` and `completion` (the loss covers the completion only, as in training), or
    /// conversations (`messages`, or message-list prompt/completion) rendered with the model's
    /// chat template. Each example is one sequence.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Truncate each example to this many tokens (default: the model's maximum).
    #[arg(long)]
    seq_len: Option<usize>,
    /// End each text and completion with the tokenizer's EOS token, as `lora train` does: with
    /// the run's --seq-len this gives the held-out loss training reported. Off by default: the
    /// loss transformers computes on the text as tokenized.
    #[arg(long)]
    eos: bool,
    /// In conversations, score the assistant's turns only (as `lora train
    /// --assistant-only-loss`).
    #[arg(long)]
    assistant_only_loss: bool,
    /// cpu, cuda, cuda:N or auto (as for train): where the forward passes run.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object: {"loss", "perplexity", "tokens", "examples"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue (with --chat: the user's message).
    #[arg(long)]
    prompt: String,
    /// Send --prompt as a user message through the model's chat template (with the assistant's
    /// opening, as apply_chat_template(add_generation_prompt=True)) and print only the reply.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to add.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// LoRA linear forward+backward vs the frozen base layer alone (forward + input gradient).
    Linear(LinearArgs),
    /// Square f32 GEMM: this machine's dense matrix-product ceiling.
    Gemm(GemmArgs),
    /// Inference batch whose rows use different adapters: the mixed kernel vs one layer call
    /// per adapter.
    Mixed(MixedArgs),
    /// One LoRA training step of a GPT-2-shaped (or, with --arch llama, Llama-shaped) model with
    /// random weights (default: GPT-2 small, r=8 on c_attn, batch 4 x 256): median step time,
    /// tokens/s, peak memory.
    Train(TrainBenchArgs),
}

#[derive(Args)]
struct TrainBenchArgs {
    /// gpt2 (LayerNorm, GELU, LoRA on c_attn) or llama (RMSNorm, RoPE, SwiGLU, grouped-query
    /// attention, LoRA on q_proj and v_proj).
    #[arg(long, default_value = "gpt2")]
    arch: String,
    /// Key/value heads for --arch llama (grouped-query attention).
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Vocabulary.
    #[arg(long, default_value_t = 50257)]
    vocab: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// LoRA rank on c_attn.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Recompute each block's forward during backward (activation checkpointing).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Frozen weights as a bf16 checkpoint holds them (16-bit in memory, widened inside the
    /// products) instead of f32.
    #[arg(long)]
    bf16: bool,
    /// cpu, cuda or cuda:N: where the step runs.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// TF32 tensor cores for the base products (GPU only; see `lora train --help`).
    #[arg(long)]
    tf32: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MixedArgs {
    /// Rows in the batch.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Input features.
    #[arg(long = "in", default_value_t = 2048)]
    inp: usize,
    /// Output features.
    #[arg(long, default_value_t = 2048)]
    out: usize,
    /// Rank of every adapter.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Distinct adapters (rows assigned round-robin).
    #[arg(long, default_value_t = 8)]
    adapters: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed iterations of each.
    #[arg(long, default_value_t = 9)]
    iters: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LinearArgs {
    /// Tokens N (rows of x).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Input features K.
    #[arg(long = "in", default_value_t = 768)]
    inp: usize,
    /// Output features M.
    #[arg(long, default_value_t = 768)]
    out: usize,
    /// LoRA rank R.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Give the layer a bias (both the LoRA and the base-only layer).
    #[arg(long)]
    bias: bool,
    /// Run the four reference shapes (2048x768x768 r8, 2048x768x3072 r16, 4096x2048x2048 r16,
    /// 512x4096x4096 r64) instead of one.
    #[arg(long, conflicts_with_all = ["tokens", "inp", "out", "rank"])]
    suite: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed iterations of each layer (default: enough for about 2 s per layer, at least 9).
    #[arg(long)]
    iters: Option<usize>,
    /// Print one JSON object per shape instead of the table.
    #[arg(long)]
    json: bool,
    /// Where to run: cpu, or cuda / cuda:N (the CUDA kernels against cuBLAS doing the base layer
    /// alone; `--suite` then adds two Llama-7B-like shapes, 4096 tokens, 4096 -> 4096 and
    /// 4096 -> 11008, r16).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct GemmArgs {
    /// Matrix size n (an n x n by n x n product).
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 7)]
    iters: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Keeps large freed buffers in the process instead of returning them to the OS: every training
/// step allocates and frees activations of the same sizes, and glibc's default (mmap/munmap for
/// blocks over 128 KiB-32 MiB) turned that into page faults and TLB-shootdown IPIs, about 16% of
/// a GPT-2 training step in `perf` (kernel `native_write_msr`, `smp_call_function_many_cond`,
/// `clear_page_erms`).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc allocator thresholds; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// `lora train --config FILE.toml`: the file's keys become flags placed before the command
/// line's own, and clap lets a later occurrence override an earlier one, so flags win. Keys are
/// checked against the flags of `lora train` and named with the file in errors.
fn expand_config(mut argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).map(|a| a != "train").unwrap_or(true) {
        return Ok(argv);
    }
    let Some(i) = argv.iter().position(|a| a == "--config") else {
        return Ok(argv);
    };
    let path = argv.get(i + 1).cloned().context("--config needs a file")?;
    argv.drain(i..i + 2);
    let bytes = lora_io::files::read_small(std::path::Path::new(&path), "--config file")?
        .with_context(|| format!("{}: not found", path.to_string_lossy()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{}: not valid UTF-8", path.to_string_lossy()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: invalid TOML", path.to_string_lossy()))?;
    let cmd = Cli::command();
    let train = cmd
        .find_subcommand("train")
        .expect("train subcommand exists");
    let mut extra: Vec<OsString> = Vec::new();
    let at = |k: &str| format!("{}: key `{k}`", path.to_string_lossy());
    for (k, v) in table {
        let flag = k.replace('_', "-");
        let Some(arg) = train
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
        else {
            anyhow::bail!(
                "{}: unknown key `{k}` (keys are the flags of `lora train`, e.g. lr, rank, target)",
                path.to_string_lossy()
            );
        };
        if matches!(flag.as_str(), "force" | "resume") {
            anyhow::bail!(
                "{}: `{k}` says what to do with an existing output: pass --{flag} on the command \
                 line, not in the file",
                path.to_string_lossy()
            );
        }
        // A flag on the command line overrides the file, also one that excludes this key
        // (`--steps` on the command line and `epochs` in the file).
        let on_line = |name: &str| {
            argv.iter().any(|a| {
                let a = a.to_string_lossy();
                a == format!("--{name}") || a.starts_with(&format!("--{name}="))
            })
        };
        if train
            .get_arg_conflicts_with(arg)
            .iter()
            .any(|c| c.get_long().is_some_and(on_line))
        {
            continue;
        }
        let switch = !arg.get_action().takes_values();
        match v {
            toml::Value::Boolean(true) if switch => extra.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) if switch => {}
            _ if switch => anyhow::bail!("{} must be true or false, got {v:?}", at(&k)),
            toml::Value::String(s) => extra.extend([format!("--{flag}").into(), s.into()]),
            toml::Value::Integer(n) => {
                extra.extend([format!("--{flag}").into(), n.to_string().into()])
            }
            toml::Value::Float(f) => {
                extra.extend([format!("--{flag}").into(), f.to_string().into()])
            }
            other => anyhow::bail!(
                "{} must be a string or a number, got {}",
                at(&k),
                other.type_str()
            ),
        }
    }
    argv.splice(2..2, extra);
    Ok(argv)
}

/// Every flag that takes a value accepts a negative number as one (`--lr -1`), so the value's
/// own check says what is wrong with it instead of clap taking it for an unknown flag.
fn negatives_as_values(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    });
    for n in names {
        cmd = cmd.mut_subcommand(n, negatives_as_values);
    }
    cmd
}

fn parse_cli() -> Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let from_file = argv.iter().any(|a| a == "--config");
    let matches = negatives_as_values(Cli::command())
        .args_override_self(true)
        .try_get_matches_from(expand_config(argv)?)
        .unwrap_or_else(|e| {
            if from_file && e.use_stderr() {
                // A bad value may come from the file: its keys reach clap as flags.
                eprintln!("note: the --config file's keys are read as the flags of the same name");
            }
            e.exit()
        });
    Ok(Cli::from_arg_matches(&matches)?)
}

fn main() {
    tune_allocator();
    let result = parse_cli().and_then(run);
    if result.is_ok() {
        if let Some(status) = infer::signal_exit_status() {
            // A run stopped by Ctrl-C or SIGTERM wrote its checkpoint; the status says it did
            // not finish (so `lora train ... && lora merge ...` stops there).
            std::process::exit(status);
        }
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        // Our errors put their source's text in their own message ("path: os error"); print a
        // cause only when it adds something.
        let mut shown = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !shown.contains(&c) {
                eprintln!("  caused by: {c}");
            }
            shown = c;
        }
        std::process::exit(1);
    }
}

/// `--device`: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when the driver library loads, a device
/// answers and its kernels compile, else the CPU). Returns the device and the one line that says
/// which and why. An explicit CUDA device that cannot be used is an error with the reason; the
/// driver library is probed before any CUDA call, so there is never a panic.
fn resolve_device(s: &str) -> Result<(lora_core::Device, String)> {
    use lora_core::Device;
    let d = match s {
        "auto" => None,
        other => Some(
            other
                .parse::<Device>()
                .with_context(|| "--device must be auto, cpu, cuda or cuda:N")?,
        ),
    };
    match d {
        Some(Device::Cpu) => Ok((Device::Cpu, "device: cpu".into())),
        Some(dev) => match dev.describe() {
            Ok(name) => Ok((dev, format!("device: {name}"))),
            Err(e) => anyhow::bail!("--device {s}: {e}"),
        },
        None => {
            let (device, line) = Device::auto();
            Ok((device, format!("device: {line}")))
        }
    }
}

/// The files of a PEFT adapter directory (what `combine` and `convert` write there).
const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) if a.build => demo::build(&demo::BuildRun {
            dir: demo::locate(a.dir.as_deref()),
            pretrain_steps: a.pretrain_steps,
            threads: a.threads,
        }),
        Command::Demo(a) => demo::run(&demo::DemoRun {
            dir: a.dir,
            out: a.out,
            steps: a.steps,
            threads: a.threads,
            samples: a.samples,
            json: a.json,
        }),
        Command::Train(mut a) => {
            a.model = hub::model_dir(&a.model, a.revision.as_deref())?;
            let (device, note) = resolve_device(&a.device)?;
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
                outln!("{note}{mode}");
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
                rank: a.rank,
                alpha: a.alpha,
                target: a.target,
                dropout: a.dropout,
                rslora: a.rslora,
                lr: a.lr,
                loraplus_ratio: a.loraplus_ratio,
                batch_size: a.batch_size,
                grad_accum: a.grad_accum,
                seq_len,
                steps: a.steps,
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
            };
            infer::run_train(
                &cfg,
                &infer::TrainRun {
                    resume: a.resume,
                    force: a.force,
                    threads: a.threads,
                    log_every: a.log_every,
                },
                a.json,
            )
            .map(|_| ())
        }
        Command::Eval(mut a) => {
            a.model.model = hub::model_dir(&a.model.model, a.model.revision.as_deref())?;
            let (device, note) = resolve_device(&a.device)?;
            if !a.json && device != lora_core::Device::Cpu {
                outln!("{note}");
            }
            infer::run_eval(&infer::EvalRun {
                model: a.model.model,
                adapter: a.model.adapter,
                data: a.data,
                seq_len: a.seq_len,
                eos: a.eos,
                assistant_only_loss: a.assistant_only_loss,
                json: a.json,
                device,
            })
        }
        Command::Inspect(a) => infer::run_inspect(&a.path, a.json),
        Command::Combine(a) => {
            use lora_io::combine::Combination;
            let how = match (a.how.as_str(), a.rank) {
                ("cat", None) => Combination::Cat,
                ("linear", None) => Combination::Linear,
                ("svd", Some(0)) => anyhow::bail!("--rank must be at least 1"),
                ("svd", rank) => Combination::Svd { rank },
                ("cat" | "linear", Some(_)) => anyhow::bail!("--rank applies to --how svd only"),
                (other, _) => anyhow::bail!("--how must be cat, linear or svd, got `{other}`"),
            };
            let weights = if a.weights.is_empty() {
                vec![1.0; a.adapters.len()]
            } else {
                a.weights.clone()
            };
            if weights.len() != a.adapters.len() {
                anyhow::bail!(
                    "{} --adapter but {} --weight",
                    a.adapters.len(),
                    weights.len()
                );
            }
            let inputs = a
                .adapters
                .iter()
                .map(|d| lora_io::combine::AdapterWeights::read(d))
                .collect::<Result<Vec<_>, _>>()?;
            let (cfg, modules) = lora_io::combine::combine(&inputs, &weights, how)?;
            let sources: Vec<(&str, &std::path::Path)> = a
                .adapters
                .iter()
                .map(|d| ("input adapter (--adapter)", d.as_path()))
                .collect();
            let _lock = lora_io::outdir::OutputLock::beside(&a.out)?;
            lora_io::outdir::prepare_dir_output(
                "--out",
                &a.out,
                "lora combine",
                &PEFT_FILES,
                a.force,
                &sources,
            )?;
            lora_io::combine::write(&a.out, &cfg, &modules)?;
            outln!(
                "combined {} adapters ({}) into rank {} over {} modules: {}",
                inputs.len(),
                a.how,
                cfg.r,
                modules.len(),
                a.out.display()
            );
            Ok(())
        }
        Command::Convert(a) => infer::run_convert(
            &a.from,
            &a.to,
            a.model.as_deref(),
            &a.prefix,
            a.force,
            &PEFT_FILES,
        ),
        Command::Merge(mut a) => {
            a.model = hub::model_dir(&a.model, a.revision.as_deref())?;
            let dtype = match a.dtype.as_deref() {
                None => None,
                Some(d) => Some(lora_io::write::OutDtype::parse(d).ok_or_else(|| {
                    anyhow::anyhow!("--dtype must be f32, bf16 or f16, got `{d}`")
                })?),
            };
            let rep = lora_io::merge::merge_to_dir(
                &a.model,
                &a.adapter,
                &a.out,
                lora_io::merge::MergeOptions {
                    dtype,
                    force: a.force,
                },
            )?;
            for p in &rep.removed_stale {
                eprintln!(
                    "note: removed {}, left by a merge that was stopped",
                    p.display()
                );
            }
            outln!(
                "merged {} layers; wrote {} tensors to {}",
                rep.merged.len(),
                rep.tensors,
                rep.out.display()
            );
            Ok(())
        }
        Command::Generate(a) => infer::run_generate(&infer::GenerateRun {
            model: hub::model_dir(&a.model.model, a.model.revision.as_deref())?,
            adapter: a.model.adapter,
            prompt: a.prompt,
            chat: a.chat,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }),
        Command::Bench(BenchCommand::Linear(a)) => {
            let device = a
                .device
                .parse::<lora_core::Device>()
                .with_context(|| "--device must be cpu, cuda or cuda:N")?;
            let mut shapes = if a.suite {
                bench::SUITE.to_vec()
            } else {
                vec![(a.tokens, a.inp, a.out, a.rank)]
            };
            if let lora_core::Device::Cuda(ordinal) = device {
                if a.suite {
                    shapes.extend(bench_cuda::LLAMA_SHAPES);
                }
                anyhow::ensure!(
                    a.threads.is_none() && !a.bias,
                    "--threads and --bias apply to the CPU benchmark only"
                );
                anyhow::ensure!(
                    shapes
                        .iter()
                        .all(|&(t, k, m, r)| t > 0 && k > 0 && m > 0 && (1..=64).contains(&r)),
                    "--tokens, --in, --out must be at least 1 and --rank 1..=64 on CUDA"
                );
                return bench_cuda::run_linear(&shapes, ordinal, a.iters, a.json);
            }
            let cfg = bench::LinearBench {
                shapes,
                bias: a.bias,
                threads: a.threads,
                iters: a.iters,
                json: a.json,
            };
            bench::run_linear(&cfg)
        }
        Command::Bench(BenchCommand::Gemm(a)) => {
            bench::run_gemm(a.size, a.threads, a.iters, a.json)
        }
        Command::Bench(BenchCommand::Train(a)) => {
            let device = match a.device.as_str() {
                "auto" => anyhow::bail!("--device: name cpu or the GPU (cuda, cuda:N) to time"),
                d => resolve_device(d)?.0,
            };
            if a.tf32 {
                device.set_tf32(true).context("--tf32")?;
            }
            anyhow::ensure!(
                a.steps > 0 && a.batch > 0 && a.seq > 1 && a.rank > 0,
                "--steps, --batch, --rank must be at least 1 and --seq at least 2"
            );
            anyhow::ensure!(
                a.layers > 0 && a.hidden > 0 && a.heads > 0 && a.kv_heads > 0 && a.vocab > 0,
                "--layers, --hidden, --heads, --kv-heads and --vocab must be at least 1"
            );
            anyhow::ensure!(a.hidden % a.heads == 0, "--heads must divide --hidden");
            anyhow::ensure!(
                a.arch != "llama" || a.heads % a.kv_heads == 0,
                "--kv-heads must divide --heads"
            );
            anyhow::ensure!(
                a.rank <= a.hidden,
                "--rank {} exceeds --hidden {}",
                a.rank,
                a.hidden
            );
            // Weights (12 hidden^2 per layer, the embedding) and activations (about 40 hidden
            // values per token per layer, and one row of logits per token), all f32.
            let tokens = [a.batch, a.seq];
            bench::ensure_fits(
                bench::sum_of_products(&[
                    &[12, a.layers, a.hidden, a.hidden],
                    &[2, a.vocab, a.hidden],
                    &[40, a.layers, a.hidden, tokens[0], tokens[1]],
                    &[2, a.vocab, tokens[0], tokens[1]],
                ]),
                "--layers, --hidden, --vocab, --batch, --seq",
            )?;
            bench::pool(a.threads)?.install(|| {
                train_bench::run(&train_bench::TrainBench {
                    arch: a.arch,
                    layers: a.layers,
                    hidden: a.hidden,
                    heads: a.heads,
                    kv_heads: a.kv_heads,
                    vocab: a.vocab,
                    batch: a.batch,
                    seq: a.seq,
                    rank: a.rank,
                    steps: a.steps,
                    checkpoint: a.gradient_checkpointing,
                    bf16: a.bf16,
                    json: a.json,
                    device,
                })
            })
        }
        Command::Bench(BenchCommand::Mixed(a)) => bench::run_mixed(
            (a.tokens, a.inp, a.out, a.rank, a.adapters),
            a.threads,
            a.iters,
            a.json,
        ),
    }
}
