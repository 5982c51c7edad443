//! The command line: every command's flags with their help text (clap derive). The commands'
//! modules turn them into run configurations.

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lora",
    version,
    about = "LoRA fine-tuning in Rust: train, run and benchmark low-rank adapters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// An image through an image classifier (the top classes) or a detector (the boxes), with
    /// an adapter.
    Predict(PredictArgs),
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
    /// Stable Diffusion (1.x, 2.x): generate images with a diffusers pipeline directory.
    #[command(subcommand)]
    Sd(SdCommand),
    /// A LoRA from the difference of a fine-tuned model and its base (truncated SVD per layer):
    /// a kohya file for Stable Diffusion, a PEFT adapter directory for language models.
    Extract(ExtractArgs),
}

#[derive(Args)]
pub struct ExtractArgs {
    /// The base model: a language-model directory, or a Stable Diffusion pipeline (a diffusers
    /// directory or a single-file checkpoint).
    #[arg(long)]
    pub base: std::path::PathBuf,
    /// The fine-tuned pipeline (same architecture; either layout).
    #[arg(long)]
    pub tuned: std::path::PathBuf,
    /// With a single-file checkpoint: a diffusers pipeline directory of the same family whose
    /// configurations, tokenizer and scheduler to use (its weights are not read); without it
    /// they are inferred for SD 1.x/2.x and the tokenizer is taken from the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    pub sd_config: Option<std::path::PathBuf>,
    /// Rank of each linear layer's (and 1x1 convolution's) update.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Rank of the larger convolutions' updates (LoCon); without it they are left out.
    #[arg(long)]
    pub conv_rank: Option<usize>,
    /// Layers whose largest change is at most this fraction of their largest weight are left
    /// out.
    #[arg(long, default_value_t = 1e-6)]
    pub min_diff: f32,
    /// Stable Diffusion: the .safetensors file to write (kohya keys, alpha = rank); language
    /// models: the PEFT adapter directory to write (lora_alpha = r).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace an existing --out that lora-rs wrote.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Subcommand)]
pub enum SdCommand {
    /// Text to image: classifier-free guided sampling (DDIM, Euler or DPM++ 2M), decoded by the
    /// VAE, written as one PNG (a grid for --batch > 1).
    Generate(SdGenerateArgs),
}

#[derive(Args)]
pub struct SdGenerateArgs {
    /// A diffusers pipeline directory (model_index.json, unet/, vae/, text_encoder/,
    /// tokenizer/, scheduler/) or a single-file checkpoint (.safetensors with the original
    /// model.diffusion_model.* / first_stage_model.* / cond_stage_model.* keys).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// With a single-file checkpoint: a diffusers pipeline directory of the same family whose
    /// configurations, tokenizer and scheduler to use (its weights are not read); without it
    /// they are inferred for SD 1.x/2.x and the tokenizer is taken from the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    pub sd_config: Option<std::path::PathBuf>,
    /// A LoRA file to merge first (diffusers/PEFT or kohya, LoCon included), optionally with a
    /// weight: `FILE:0.8`. Repeat for several; their updates add up.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Merge the modules of a --lora file that match this pipeline and count the rest, instead
    /// of refusing a file with modules that match no layer.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (default: the empty prompt, as diffusers).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampling steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale (at most 1: the prompt alone, no negative pass).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// Sampler: euler, ddim or dpm++ (DPM++ 2M), configured from scheduler/scheduler_config.json.
    #[arg(long, default_value = "euler")]
    pub scheduler: String,
    /// Image size WIDTHxHEIGHT (multiples of the VAE's factor: 8 for SD, e.g. 600x800).
    #[arg(long, default_value = "512x512")]
    pub size: String,
    /// Seed of the initial latents (lora-rs's generator; use --init-noise to reproduce a
    /// diffusers run).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images to generate (each from its own latents), written as one grid.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// The initial latents as a safetensors file (one tensor, or one named `latents`) of shape
    /// (batch, 4, height / 8, width / 8): what diffusers' `latents=` argument means, before the
    /// sampler's initial-sigma scaling.
    #[arg(long)]
    pub init_noise: Option<std::path::PathBuf>,
    /// Condition on the text encoder's output this many layers before the last (diffusers'
    /// clip_skip).
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// The PNG to write.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace an existing --out that lora-rs wrote.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Which demo: `translate` (a tiny GPT-2 learns English to French), `detect` (a tiny
    /// YOLOS learns to find rare defects on images of parts) or `diffusion` (a tiny Stable
    /// Diffusion pipeline learns a new drawing style through a LoRA file).
    #[arg(long, default_value = "translate")]
    pub task: String,
    /// Output directory (an earlier demo output there is replaced). translate: the adapter,
    /// metrics.jsonl and loss.svg (default lora-demo-out); detect: data/, adapter/ and
    /// predictions/ (default lora-demo-detect); diffusion: data/, the LoRA file and grid.png
    /// (default lora-demo-diffusion).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Training steps (translate: batch 16, default 1200; diffusion: batch 8, default 600) or
    /// epochs (detect: 1,000 images in batches of 8; default 24).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sample translations to print (detect: annotated validation images to write).
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// The demo directory (base/, data/); default: the repository's demo/.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Print one JSON object with the before/after figures.
    #[arg(long)]
    pub json: bool,
    /// translate: the products' precision, in training and in the before/after translations
    /// (f32, or bf16 as `lora train --precision bf16`).
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
    /// Regenerate the demo files instead: the datasets, the tokenizer, and the base model
    /// pretrained from scratch (full-parameter training; about 10 minutes on 2 cores).
    #[arg(long)]
    pub build: bool,
    /// Pretraining steps for --build (translate: batch 32 x 64 tokens, default 2000; detect:
    /// batch 32 images, default 10000; diffusion: the UNet's, batch 32, the VAE's two fifths of
    /// them up to 1200 at batch 16; default 3000).
    #[arg(long)]
    pub pretrain_steps: Option<usize>,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A PEFT adapter directory or a kohya .safetensors file.
    #[arg(long)]
    pub from: std::path::PathBuf,
    /// The output: a .safetensors file (PEFT -> kohya) or a directory (kohya -> PEFT).
    #[arg(long)]
    pub to: std::path::PathBuf,
    /// Model directory whose module paths resolve kohya's flattened names (kohya -> PEFT).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// kohya name prefix for PEFT -> kohya: lora_te, lora_te1, lora_te2 or lora_unet.
    #[arg(long, default_value = "lora_te")]
    pub prefix: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct CombineArgs {
    /// A PEFT adapter directory; repeat for each adapter.
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<std::path::PathBuf>,
    /// Weight of each adapter, in the same order (default 1 for all).
    #[arg(long = "weight", allow_negative_numbers = true)]
    pub weights: Vec<f32>,
    /// cat (exact, rank = sum of ranks), linear (equal ranks, PEFT's factor-wise sum) or svd
    /// (truncated SVD of the weighted sum of updates).
    #[arg(long, default_value = "cat")]
    pub how: String,
    /// Output rank for svd (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Output adapter directory.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A model directory, an adapter directory or a .safetensors file.
    pub path: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Hugging Face model directory, or a Hub id (org/name) in the local Hugging Face cache.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT adapter directory (language models).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Stable Diffusion: a LoRA file to merge (diffusers/PEFT, kohya/LoCon, LyCORIS), with an
    /// optional weight `FILE:0.8`; repeat for several.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Stable Diffusion: merge the modules that match and count the rest, instead of refusing
    /// a LoRA file with modules that match no layer.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// Stable Diffusion, with a single-file checkpoint: a diffusers pipeline directory of the
    /// same family whose configurations to use (as for `lora sd generate`).
    #[arg(long, value_name = "DIR")]
    pub sd_config: Option<std::path::PathBuf>,
    /// Output: a directory for a model directory (config, tokenizer and weights with
    /// W + s*B@A); for a single-file SD checkpoint, a .safetensors file in the same layout.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Storage dtype of the output: f32, bf16 or f16 (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// A TOML file with any of these settings as keys (`lr = 1e-4`, `target = "q_proj,v_proj"`,
    /// `rslora = true`); flags given on the command line override it.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Hugging Face model directory, or a Hub id (org/name) already in the local Hugging Face
    /// cache (HF_HUB_CACHE, HF_HOME or ~/.cache/huggingface).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Training data: .txt (paragraphs), .jsonl with `text`, .jsonl with `prompt` and
    /// `completion` (loss on the completion only), or conversations rendered with the model's
    /// chat template: .jsonl with `messages` (loss on every token), or with `prompt` and
    /// `completion` as message lists (loss on the completion only), as TRL reads them.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Output directory (final adapter, metrics.jsonl, checkpoint-* folders).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// LoRA rank (default 8; 4 for Stable Diffusion, as diffusers' LoRA script).
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank, or alpha / sqrt(rank) with --rslora; default 16; the
    /// rank for Stable Diffusion, as diffusers' LoRA script).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Modules to adapt: comma-separated names (exact or dotted suffix), a regex, or all-linear.
    /// Default: all-linear for language models; q_proj,v_proj for ViT (PEFT's
    /// image-classification recipe; the original names query,value also work); every
    /// convolution for ResNet.
    #[arg(long)]
    pub target: Option<String>,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    pub rslora: bool,
    /// Peak learning rate (default 2e-4 for language models, 5e-3 for image classification).
    #[arg(long)]
    pub lr: Option<f32>,
    /// LoRA+: learning-rate ratio of B to A.
    #[arg(long, default_value_t = 1.0)]
    pub loraplus_ratio: f32,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per sequence (longer examples are truncated; with --pack, the block length).
    /// Default: 256, or the model's maximum when it has fewer positions.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Optimizer steps (with --resume, a larger number extends a run). Default 100; image
    /// classification trains for --epochs instead.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Train for this many passes over the data instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f32>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Decay after warmup: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Weight decay (AdamW: decoupled).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// adamw or sgd (momentum 0.9).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Pack examples into full --seq-len blocks.
    #[arg(long)]
    pub pack: bool,
    /// Do not end each text and completion with the tokenizer's EOS token. By default it is
    /// appended and trained on, as TRL's SFTTrainer does, so the model learns where an answer
    /// stops (tokenizer_config.json's eos_token, else config.json's eos_token_id).
    #[arg(long)]
    pub no_eos: bool,
    /// In conversations (`messages` data), take the loss on the assistant's turns only: their
    /// content and end-of-turn marker as the chat template writes them, not the system or user
    /// turns or the role headers.
    #[arg(long)]
    pub assistant_only_loss: bool,
    /// Activation checkpointing: keep only each transformer block's input and recompute the
    /// block during backward. Much less activation memory (long sequences, big models) for about
    /// a third more compute; the same training up to f32 rounding.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Seed for initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out data file (otherwise --eval-split of the data is held out). Detection with a
    /// COCO JSON --data: the validation split's COCO JSON.
    #[arg(long)]
    pub eval_data: Option<std::path::PathBuf>,
    /// Fraction of the data held out for evaluation when no --eval-data is given.
    #[arg(long, default_value_t = 0.0, conflicts_with = "eval_data")]
    pub eval_split: f32,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Write a checkpoint every N steps (0: by time and at the end only).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Also write a checkpoint whenever this many minutes of training have passed since the
    /// last one (0: never by time), so a killed run loses at most that much work.
    #[arg(long, default_value_t = 5.0)]
    pub save_minutes: f32,
    /// Outside a terminal, print a progress line every N steps (default: about 20 lines per
    /// run; eval steps and the last step always print). A terminal gets a live bar instead.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Keep only the newest N checkpoints (0: keep all).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// auto, cpu, cuda or cuda:N. `auto` picks CUDA when a device answers and its kernels
    /// compile, else the CPU, and says which; asking for cuda where it cannot run is an error
    /// rather than a silent fallback.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// On a GPU, let the frozen base products and the output head use TF32 tensor cores
    /// (inputs rounded to a 10-bit mantissa, f32 accumulation; PyTorch's `allow_tf32`): much
    /// faster, about 1e-3 relative difference in activations. The adapter kernels, optimizer
    /// state, norms, attention and loss stay f32 (the gradients of trained base weights and
    /// biases, computed by cuBLAS, follow the mode). Off by default.
    #[arg(long)]
    pub tf32: bool,
    /// Precision of the matrix products: f32, or bf16 with PyTorch autocast's meaning (the
    /// inputs and frozen weights of the linear layers and the output head rounded to bf16, the
    /// weights packed once at load, f32 accumulation; the adapters, optimizer state, norms,
    /// softmax, attention and the loss stay f32). Faster on CPUs with AVX512-BF16; elsewhere
    /// the bf16 operands are widened to f32 (same numbers, no speed-up). CPU only; language
    /// models only. Recorded in checkpoints: --resume refuses a change.
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
    /// Continue from the newest checkpoint in --out (same flags as the original run).
    #[arg(long)]
    pub resume: bool,
    /// Delete a non-empty --out and start over.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// What to train: auto (from config.json's model type and architectures), causal-lm or
    /// image-classification.
    #[arg(long, default_value = "auto")]
    pub task: String,
    /// Stable Diffusion, with a single-file checkpoint: a diffusers pipeline directory of the same family whose
    /// configurations, tokenizer and scheduler to use (its weights are not read); without it
    /// they are inferred for SD 1.x/2.x and the tokenizer is taken from the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    pub sd_config: Option<std::path::PathBuf>,
    /// Stable Diffusion: also train LoRA on the text encoder's q_proj, k_proj, v_proj and
    /// out_proj (as diffusers' DreamBooth LoRA script; kohya-style tools do by default).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Stable Diffusion: the text encoder's learning rate with --train-text-encoder (default:
    /// --lr).
    #[arg(long)]
    pub text_encoder_lr: Option<f32>,
    /// Stable Diffusion: the square training resolution in pixels (default 512).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Stable Diffusion: crop each image at random each step instead of the center (then the
    /// latents cannot be cached: every step encodes its crops).
    #[arg(long)]
    pub random_crop: bool,
    /// Stable Diffusion: flip images horizontally at random.
    #[arg(long)]
    pub random_flip: bool,
    /// Stable Diffusion: per-channel noise offset (diffusers' --noise_offset).
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f32,
    /// Stable Diffusion: min-SNR loss weighting gamma (5.0 is the paper's choice).
    #[arg(long)]
    pub snr_gamma: Option<f32>,
    /// Stable Diffusion: the LoRA file's format: diffusers (PEFT keys, what
    /// load_lora_weights reads) or kohya (lora_unet_* keys with alphas).
    #[arg(long, default_value = "diffusers")]
    pub format: String,
    /// Stable Diffusion: generate --sample-prompt every N steps into --out as
    /// sample-step-N.png (0: never).
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// Stable Diffusion: the prompt of the sample images.
    #[arg(long)]
    pub sample_prompt: Option<String>,
    /// Image tasks: the image processor's target size (ViT: must be the config's image_size;
    /// ResNet: the shortest edge, center-cropped; YOLOS: the shortest edge, the longest in
    /// proportion), instead of preprocessor_config.json's.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Image tasks: no random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// Image tasks: when the dataset's classes differ from the checkpoint's, start the new
    /// head's rows for classes the checkpoint already names (matched by name; a detector's
    /// "no object" too) from the checkpoint's rows, instead of all anew as transformers'
    /// ignore_mismatched_sizes does: the model keeps recognising what it knew.
    #[arg(long)]
    pub keep_classes: bool,
    /// Image tasks: scale jitter, the smallest side fraction of the random crop taken before
    /// resizing (1 = off).
    #[arg(long, default_value_t = 0.8)]
    pub scale_jitter: f32,
    /// Image tasks: modules trained in full and saved with the adapter (PEFT's
    /// modules_to_save), comma-separated. Default: the classification head.
    #[arg(long)]
    pub modules_to_save: Option<String>,
}

#[derive(Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json), or a Hub id (org/name) already in the local Hugging Face cache.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// With a Hub id: the branch, tag or commit in the cache (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset: .txt (paragraphs separated by blank lines), .jsonl with `text`, .jsonl with
    /// `prompt` and `completion` (the loss covers the completion only, as in training), or
    /// conversations (`messages`, or message-list prompt/completion) rendered with the model's
    /// chat template. Each example is one sequence.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Truncate each example to this many tokens (default: the model's maximum).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// End each text and completion with the tokenizer's EOS token, as `lora train` does: with
    /// the run's --seq-len this gives the held-out loss training reported. Off by default: the
    /// loss transformers computes on the text as tokenized.
    #[arg(long)]
    pub eos: bool,
    /// In conversations, score the assistant's turns only (as `lora train
    /// --assistant-only-loss`).
    #[arg(long)]
    pub assistant_only_loss: bool,
    /// cpu, cuda, cuda:N or auto (as for train): where the forward passes run.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the matrix products: f32, or bf16 as `lora train --precision bf16` trains
    /// (PyTorch autocast's meaning; CPU only, language models only).
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
    /// Print one JSON object: {"loss", "perplexity", "tokens", "examples", "precision"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image (JPEG or PNG).
    #[arg(long)]
    pub image: std::path::PathBuf,
    /// How many classes to print, most likely first.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Detectors: print the boxes whose score is at least this.
    #[arg(long, default_value_t = 0.5)]
    pub conf: f32,
    /// Detectors: also write the image with the boxes drawn (one colour per class) as a PNG.
    #[arg(long)]
    pub save: Option<std::path::PathBuf>,
    /// Print one JSON object: {"predictions": [{"label", "id", "score"}]} (detectors: also
    /// "box": [x0, y0, x1, y1] in pixels).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue (with --chat: the user's message).
    #[arg(long)]
    pub prompt: String,
    /// Send --prompt as a user message through the model's chat template (with the assistant's
    /// opening, as apply_chat_template(add_generation_prompt=True)) and print only the reply.
    #[arg(long)]
    pub chat: bool,
    /// Maximum tokens to add.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the matrix products: f32, or bf16 as `lora train --precision bf16` trains
    /// (PyTorch autocast's meaning: the frozen linear layers and the output head multiply
    /// bf16 operands with f32 accumulation, the weights packed once at load).
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// LoRA linear forward+backward vs the frozen base layer alone (forward + input gradient).
    Linear(LinearArgs),
    /// Square f32 GEMM: this machine's dense matrix-product ceiling.
    Gemm(GemmArgs),
    /// The CPU's arithmetic peak: f32 FMAs on its widest vectors and, where it has
    /// AVX512-BF16, the bf16 dot-product instruction (register-only loops on every thread).
    Peak(PeakArgs),
    /// Inference batch whose rows use different adapters: the mixed kernel vs one layer call
    /// per adapter.
    Mixed(MixedArgs),
    /// One LoRA training step of a GPT-2-shaped (or, with --arch llama, Llama-shaped) model with
    /// random weights (default: GPT-2 small, r=8 on c_attn, batch 4 x 256): median step time,
    /// tokens/s, peak memory.
    Train(TrainBenchArgs),
    /// One LoRA training step of an image model with random weights: ViT-base (default: batch
    /// 16 at 224x224, r16 on q_proj/v_proj, the head trained in full) or, with --arch conv, one
    /// conv LoRA layer (forward + backward): median time, images/s, peak memory.
    Vision(VisionBenchArgs),
    /// One step of a Stable Diffusion 1.5-shaped UNet with random weights: a LoRA training step
    /// (r4 on to_q/to_k/to_v/to_out.0, as diffusers' script) or a guided sampling step: median
    /// time and peak memory.
    Sd(SdBenchArgs),
}

#[derive(Args)]
pub struct SdBenchArgs {
    /// train (a LoRA training step) or generate (a classifier-free-guided sampling step).
    #[arg(long, default_value = "train")]
    pub mode: String,
    /// Image side in pixels (the latents are an eighth of it: 512 -> 64x64).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// LoRA rank (train).
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// How the frozen weights are held: f32, or f16 (as an fp16 checkpoint such as the Hub's
    /// SD 1.5 is loaded: 16-bit in memory, computed in f32).
    #[arg(long, default_value = "f32")]
    pub weights: String,
    /// The first block's channels (SD 1.5: 320; the others are 2x, 4x, 4x).
    #[arg(long, default_value_t = 320)]
    pub base_channels: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VisionBenchArgs {
    /// vit (a ViT-base-shaped classifier) or conv (a 3x3 convolution 256 -> 256 with LoRA, a
    /// ResNet-50 stage-1 shape).
    #[arg(long, default_value = "vit")]
    pub arch: String,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Image side (vit) or feature-map side (conv).
    #[arg(long)]
    pub size: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Transformer blocks (vit).
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TrainBenchArgs {
    /// gpt2 (LayerNorm, GELU, LoRA on c_attn) or llama (RMSNorm, RoPE, SwiGLU, grouped-query
    /// attention, LoRA on q_proj and v_proj).
    #[arg(long, default_value = "gpt2")]
    pub arch: String,
    /// Key/value heads for --arch llama (grouped-query attention).
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    /// Vocabulary.
    #[arg(long, default_value_t = 50257)]
    pub vocab: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// LoRA rank on c_attn.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// AdamW learning rate of the adapters.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// Also report every step's loss (the warm-up step's first), for comparing the loss curves
    /// of two precisions: the batch is the same every step, so the adapters learn it.
    #[arg(long)]
    pub losses: bool,
    /// LoRA on every linear layer but the output head (PEFT's all-linear) instead of c_attn
    /// (gpt2) or q_proj, v_proj (llama).
    #[arg(long)]
    pub all_linear: bool,
    /// Recompute each block's forward during backward (activation checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Frozen weights as a bf16 checkpoint holds them (16-bit in memory, widened inside the
    /// products) instead of f32.
    #[arg(long)]
    pub bf16: bool,
    /// Precision of the products: f32, or bf16 (autocast's: the frozen linear layers' and the
    /// output head's products take bf16 operands, the weights packed once, and accumulate in
    /// f32; CPU only).
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
    /// cpu, cuda or cuda:N: where the step runs.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// TF32 tensor cores for the base products (GPU only; see `lora train --help`).
    #[arg(long)]
    pub tf32: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MixedArgs {
    /// Rows in the batch.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Input features.
    #[arg(long = "in", default_value_t = 2048)]
    pub inp: usize,
    /// Output features.
    #[arg(long, default_value_t = 2048)]
    pub out: usize,
    /// Rank of every adapter.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Distinct adapters (rows assigned round-robin).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed iterations of each.
    #[arg(long, default_value_t = 9)]
    pub iters: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LinearArgs {
    /// Tokens N (rows of x).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Input features K.
    #[arg(long = "in", default_value_t = 768)]
    pub inp: usize,
    /// Output features M.
    #[arg(long, default_value_t = 768)]
    pub out: usize,
    /// LoRA rank R.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Give the layer a bias (both the LoRA and the base-only layer).
    #[arg(long)]
    pub bias: bool,
    /// Run the four reference shapes (2048x768x768 r8, 2048x768x3072 r16, 4096x2048x2048 r16,
    /// 512x4096x4096 r64) instead of one.
    #[arg(long, conflicts_with_all = ["tokens", "inp", "out", "rank"])]
    pub suite: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed iterations of each layer (default: enough for about 2 s per layer, at least 9).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Print one JSON object per shape instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Precision of the base products: f32, or bf16 (PyTorch autocast's: the weight packed
    /// once, the input rounded per call, f32 accumulation; the adapter stays f32). CPU only.
    #[arg(long, default_value = "f32")]
    pub precision: lora_core::models::Precision,
    /// Where to run: cpu, or cuda / cuda:N (the CUDA kernels against cuBLAS doing the base layer
    /// alone; `--suite` then adds two Llama-7B-like shapes, 4096 tokens, 4096 -> 4096 and
    /// 4096 -> 11008, r16).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct PeakArgs {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds to time each instruction.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GemmArgs {
    /// Matrix size n (an n x n by n x n product).
    #[arg(long, default_value_t = 2048)]
    pub size: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 7)]
    pub iters: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
