//! `lora demo`: the built-in default. Trains a LoRA adapter that teaches a tiny GPT-2 (shipped in
//! `demo/base`, pretrained by `lora demo --build` with this project's own full-parameter
//! training) to translate English to French, then shows what changed: eval loss, exact-match
//! translations on held-out sentences, and sample generations before and after.

use crate::demo_data;
use anyhow::{bail, Context, Result};
use lora_core::models::generate::{generate, GenerateConfig};
use lora_core::models::gpt2::Gpt2Config;
use lora_core::models::CausalLm;
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::tokenizer::TextTokenizer;
use lora_train::data::Example;
use lora_train::optim::Schedule;
use std::path::{Path, PathBuf};

/// Seeds of the committed files; `--build` with the defaults reproduces them.
const CORPUS_SEED: u64 = 20261129;
const TASK_SEED: u64 = 7;
const MODEL_SEED: u64 = 1;
/// Translation pairs in the shipped train / eval files.
const TRAIN_PAIRS: usize = 4000;
const EVAL_PAIRS: usize = 200;

/// The base model's architecture (0.8M parameters, 3.3 MB as f32).
pub fn base_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: demo_data::vocabulary().len(),
        n_positions: 64,
        n_embd: 128,
        n_layer: 4,
        n_head: 4,
        n_inner: 512,
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
    }
}

/// The demo directory: `--dir`, else the repository's `demo/` (next to this crate), else
/// `./demo`.
pub fn locate(dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.to_path_buf();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo");
    if let Ok(repo) = repo.canonicalize() {
        return repo;
    }
    PathBuf::from("demo")
}

/// What `lora demo --build` runs.
pub struct BuildRun {
    pub dir: PathBuf,
    pub pretrain_steps: usize,
    pub threads: Option<usize>,
}

fn write(path: &Path, text: &str) -> Result<()> {
    lora_io::write::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Regenerates `dir/data/{train,eval}.jsonl`, the tokenizer and the pretrained base model in
/// `dir/base`. Deterministic for a given thread count.
pub fn build(r: &BuildRun) -> Result<()> {
    let data = r.dir.join("data");
    let base = r.dir.join("base");
    if r.pretrain_steps == 0 {
        bail!("--pretrain-steps must be at least 1");
    }
    // Only a demo's own files are replaced (the shipped ones carry the marker): a model or data
    // of anyone else's under --dir is refused, untouched.
    const BASE_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
    const DATA_FILES: [&str; 2] = ["train.jsonl", "eval.jsonl"];
    let owned = || lora_io::outdir::Owned::Listed;
    for d in [&base, &data] {
        lora_io::outdir::inspect_output("--dir", d, "lora demo --build", owned())?;
    }
    let files = |f: &[&str]| f.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for (d, f) in [(&base, &BASE_FILES[..]), (&data, &DATA_FILES[..])] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        lora_io::outdir::write_marker(d, "lora demo --build", Some(&files(f)))?;
    }
    let (train, eval) = demo_data::translation_sets(TRAIN_PAIRS, EVAL_PAIRS, TASK_SEED);
    write(&data.join("train.jsonl"), &train)?;
    write(&data.join("eval.jsonl"), &eval)?;
    let scratch = std::env::temp_dir().join(format!("lora-demo-build-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let tok_path = scratch.join("tokenizer.json");
    write(&tok_path, &demo_data::tokenizer_json())?;
    let corpus = scratch.join("corpus.txt");
    write(&corpus, &demo_data::pretrain_corpus(20_000, CORPUS_SEED))?;
    let cfg = lora_train::pretrain::PretrainConfig {
        model: base_config(),
        tokenizer: tok_path,
        data: corpus,
        out: base.clone(),
        steps: r.pretrain_steps,
        batch_size: 32,
        seq_len: 64,
        lr: 3e-3,
        warmup: 100,
        seed: MODEL_SEED,
        special_id: 0,
    };
    outln!(
        "pretraining the demo base model (GPT-2, {} layers, width {}, {} tokens of vocabulary) for {} steps on generated English and French text",
        cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size, cfg.steps
    );
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    let sum = crate::bench::pool(r.threads)?.install(|| {
        lora_train::pretrain::pretrain(&cfg, &mut |step, _, loss| {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
        })
    });
    bar.finish();
    let _ = std::fs::remove_dir_all(&scratch);
    let sum = sum?;
    outln!(
        "{} parameters; loss {:.3} (first 10% of steps) -> {:.3} (last 10%) in {:.0} s; wrote {}",
        sum.params,
        sum.first_loss,
        sum.last_loss,
        sum.seconds,
        base.display()
    );
    Ok(())
}

/// What `lora demo` runs.
pub struct DemoRun {
    pub dir: Option<PathBuf>,
    pub out: PathBuf,
    pub steps: usize,
    pub threads: Option<usize>,
    pub samples: usize,
    pub json: bool,
    /// The products' precision, in training and in the translations.
    pub precision: lora_core::models::Precision,
}

/// Greedy translations of `pairs` with and without the adapter: (exact matches, outputs).
fn translate(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    pairs: &[(String, String)],
    adapters: bool,
    stop: u32,
) -> Result<(usize, Vec<String>)> {
    let mut hits = 0;
    let mut outs = Vec::with_capacity(pairs.len());
    for (prompt, reference) in pairs {
        let ids = tok.encode(prompt)?;
        let room = model.max_positions().saturating_sub(ids.len());
        let cfg = GenerateConfig {
            max_new_tokens: room.min(32),
            eos: vec![stop],
            adapters,
            ..Default::default()
        };
        let new = generate(model, &ids, &cfg)?;
        let text = tok.decode(&new[ids.len()..])?;
        if text.trim() == reference.trim() {
            hits += 1;
        }
        outs.push(text);
    }
    Ok((hits, outs))
}

/// Trains the demo adapter and reports before/after.
pub fn run(r: &DemoRun) -> Result<()> {
    let dir = locate(r.dir.as_deref());
    let base = dir.join("base");
    let train = dir.join("data/train.jsonl");
    let eval = dir.join("data/eval.jsonl");
    for p in [&base.join("model.safetensors"), &train, &eval] {
        if !p.exists() {
            bail!(
                "{}: missing; the demo needs the repository's demo/ directory (pass --dir) or a rebuild with `lora demo --build`",
                p.display()
            );
        }
    }
    if !r.json {
        outln!(
            "lora demo: a rank-8 LoRA adapter teaches a tiny GPT-2 ({}) to translate English to French.\n\
             The base model was pretrained by this project on generated English and French paragraphs,\n\
             never on a sentence next to its translation. Training data: {}; held out: {}.",
            base.display(),
            train.display(),
            eval.display()
        );
    }
    let cfg = lora_train::run::TrainConfig {
        model: base.clone(),
        data: train,
        out: r.out.clone(),
        rank: 8,
        alpha: 16.0,
        target: "c_attn,c_proj,c_fc".into(),
        dropout: 0.0,
        rslora: false,
        lr: 3e-3,
        loraplus_ratio: 1.0,
        batch_size: 16,
        grad_accum: 1,
        seq_len: 64,
        steps: r.steps,
        epochs: None,
        warmup: r.steps / 10,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        optimizer: lora_train::optim::OptimizerKind::AdamW,
        max_grad_norm: Some(1.0),
        pack: false,
        eos: true,
        assistant_only_loss: false,
        seed: 0,
        eval_data: Some(eval.clone()),
        eval_split: 0.0,
        eval_every: (r.steps / 5).max(1),
        save_every: 0,
        save_minutes: 5.0,
        keep_checkpoints: 1,
        gradient_checkpointing: false,
        device: lora_core::Device::Cpu,
        stop_after: None,
        precision: r.precision,
    };
    let report = if r.json {
        crate::train::Report::Silent
    } else {
        crate::train::Report::Human
    };
    // An earlier demo output is replaced; anything else there is refused (see outdir).
    let run = crate::train::TrainRun {
        resume: false,
        force: true,
        threads: r.threads,
        log_every: None,
    };
    let (sum, training) = crate::train::run_train_report(&cfg, &run, report)?;
    if sum.interrupted {
        return Ok(());
    }

    let md = ModelDir::open(&base)?;
    let tok = TextTokenizer::from_model_dir(&base)?;
    let mut model = md.load_model()?;
    load_adapter(model.as_mut(), &r.out)?;
    lora_core::models::set_precision(model.as_ref(), r.precision)?;
    let stop = tok
        .token_id(".")
        .context("the demo tokenizer has no `.` token")?;
    let pairs: Vec<(String, String)> = lora_train::data::read_examples(&eval)?
        .into_iter()
        .filter_map(|e| match e {
            Example::PromptCompletion { prompt, completion } => Some((prompt, completion)),
            _ => None,
        })
        .take(100)
        .collect();
    let (before, outs_before) = translate(model.as_ref(), &tok, &pairs, false, stop)?;
    let (after, outs_after) = translate(model.as_ref(), &tok, &pairs, true, stop)?;
    let n = pairs.len().max(1);
    if r.json {
        outln!(
            "{}",
            serde_json::json!({
                "eval_loss_before": sum.eval_before, "eval_loss_after": sum.eval_after,
                "exact_match_before": before as f64 / n as f64, "exact_match_after": after as f64 / n as f64,
                "held_out_sentences": pairs.len(), "precision": r.precision.name(), "training": training,
            })
        );
        return Ok(());
    }
    outln!(
        "exact-match translations of {} held-out sentences (greedy): base {} ({:.0}%) -> with adapter {} ({:.0}%)",
        pairs.len(),
        before,
        100.0 * before as f64 / n as f64,
        after,
        100.0 * after as f64 / n as f64
    );
    for i in 0..r.samples.min(pairs.len()) {
        outln!("\n{}", pairs[i].0);
        outln!("  base model:   {}", outs_before[i].trim());
        outln!("  with adapter: {}", outs_after[i].trim());
        outln!("  reference:    {}", pairs[i].1.trim());
    }
    outln!(
        "\nTry it: lora generate --model {} --adapter {} --prompt \"english : the old fox sees a green frog . french :\" --max-new-tokens 12",
        base.display(),
        r.out.display()
    );
    Ok(())
}

/// `lora demo` (`--build`: remake the shipped base model and data).
pub fn command(a: crate::args::DemoArgs) -> Result<()> {
    if a.precision != lora_core::models::Precision::F32 && (a.task != "translate" || a.build) {
        bail!(
            "--precision {} applies to the translate demo's training only",
            a.precision
        );
    }
    match a.task.as_str() {
        "translate" => {}
        "detect" => return crate::demo_detect::command(a),
        "diffusion" => return crate::demo_diffusion::command(a),
        other => bail!("--task {other:?}: the demos are `translate`, `detect` and `diffusion`"),
    }
    if a.build {
        build(&BuildRun {
            dir: locate(a.dir.as_deref()),
            pretrain_steps: a.pretrain_steps.unwrap_or(2000),
            threads: a.threads,
        })
    } else {
        run(&DemoRun {
            dir: a.dir,
            out: a.out.unwrap_or_else(|| "lora-demo-out".into()),
            steps: a.steps.unwrap_or(1200),
            threads: a.threads,
            samples: a.samples,
            json: a.json,
            precision: a.precision,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The repository's `demo/` folder (the committed bases), for the demos' tests.
    pub(crate) fn repo_demo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo")
    }

    #[test]
    fn committed_files_are_what_build_generates() {
        let dir = repo_demo();
        let (train, eval) = demo_data::translation_sets(TRAIN_PAIRS, EVAL_PAIRS, TASK_SEED);
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
        assert!(
            read("data/train.jsonl") == train,
            "demo/data/train.jsonl differs from `lora demo --build`'s"
        );
        assert!(
            read("data/eval.jsonl") == eval,
            "demo/data/eval.jsonl differs"
        );
        assert_eq!(read("base/tokenizer.json"), demo_data::tokenizer_json());
        let md = ModelDir::open(dir.join("base")).unwrap();
        assert_eq!(md.config, lora_io::hf::ArchConfig::Gpt2(base_config()));
    }

    #[test]
    fn tokenizer_covers_every_word_and_round_trips() {
        let tok = TextTokenizer::open(repo_demo().join("base/tokenizer.json")).unwrap();
        let unk = tok.token_id(demo_data::UNK).unwrap();
        let corpus = demo_data::pretrain_corpus(200, 1);
        let (train, _) = demo_data::translation_sets(200, 0, 1);
        let mut texts: Vec<String> = corpus.split("\n\n").map(str::to_string).collect();
        for line in train.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(v["prompt"].as_str().unwrap().to_string());
            texts.push(v["completion"].as_str().unwrap().trim().to_string());
        }
        for text in texts.iter().filter(|t| !t.is_empty()) {
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids[0], 0, "the special token starts every text");
            assert!(!ids.contains(&unk), "unknown word in {text}");
            let plain = tok.encode_plain(text).unwrap();
            assert_eq!(&ids[1..], &plain[..]);
            // Decoding joins tokens with single spaces: the generator's own spelling.
            assert_eq!(tok.decode(&ids).unwrap(), text.trim());
        }
    }
}
