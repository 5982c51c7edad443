//! The run's data: examples split, tokenized, packed, checked against the model and the batch.

use super::*;

/// The number of examples `seqs` holds with no target token (e.g. a prompt that fills
/// `--seq-len`, an empty completion with `--no-eos`), and the sequences without them.
pub(super) fn drop_targetless(seqs: Vec<Sequence>) -> (Vec<Sequence>, usize) {
    let n = seqs.len();
    let kept: Vec<Sequence> = seqs
        .into_iter()
        .filter(|s| s.labels.iter().skip(1).any(|&l| l >= 0))
        .collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

/// Every token id must index the model's embedding: a tokenizer (or an EOS id) from another
/// model would otherwise fail deep inside the embedding with no file named.
pub fn check_vocab<'a>(
    model_dir: &Path,
    vocab: usize,
    seqs: impl IntoIterator<Item = &'a Sequence>,
) -> Result<()> {
    let max = seqs.into_iter().flat_map(|s| s.ids.iter()).max();
    match max {
        Some(&id) if id as usize >= vocab => Err(err(
            model_dir,
            format!(
                "token id {id} (from tokenizer.json, or the EOS id) is past the model's \
                 vocabulary of {vocab} (config.json `vocab_size`): the tokenizer or EOS belongs \
                 to another model"
            ),
        )),
        _ => Ok(()),
    }
}

/// The largest rank each targeted layer allows is min(in, out): more adds parameters that
/// cannot raise the update's rank.
pub(super) fn check_rank(model: &dyn CausalLm, peft: &PeftConfig) -> Result<()> {
    let head = model.output_head().to_string();
    for (name, lin) in model.linears() {
        if !peft.selects(&name, &head)? {
            continue;
        }
        let (i, o) = lin.dims();
        let r = peft.lora_config_for(&name)?.rank;
        if r > i.min(o) {
            return Err(setting_err(
                "rank",
                format!(
                    "{r} exceeds what `{name}` ({i} -> {o} features) can use: at most {}",
                    i.min(o)
                ),
            ));
        }
    }
    Ok(())
}

/// The run's tokenized data, checked: every sequence has a target token and fits the vocabulary,
/// and one step's batch fits the training set.
pub(super) struct Data {
    /// Training sequences (packed with `--pack`).
    pub(super) train: Vec<Sequence>,
    /// Held-out sequences for the eval loss.
    pub(super) eval: Vec<Sequence>,
    /// The chat templates' clock (`strftime_now`), recorded in checkpoints so that a resumed
    /// run renders its conversations as the original did.
    pub(super) chat_now: Option<i64>,
    /// Sequences one optimizer step takes (`--batch-size` x `--grad-accum`).
    pub(super) step_seqs: usize,
}

impl Data {
    /// The run's length in steps: `--steps`, or `--epochs` over the training sequences.
    pub(super) fn total_steps(&self, cfg: &TrainConfig) -> usize {
        match cfg.epochs {
            // The f32 setting as the decimal it was written as (0.1, not 0.10000000149), so that a
            // whole number of steps does not round up to one more.
            Some(e) => {
                let e = e.to_string().parse::<f64>().unwrap_or(e as f64);
                ((e * self.train.len() as f64 / self.step_seqs as f64).ceil() as usize).max(1)
            }
            None => cfg.steps,
        }
    }
}

/// Tokenizes the examples (with the model's chat template where they are conversations) and
/// checks the result, saying what it leaves out.
pub(super) fn prepare_data(
    cfg: &TrainConfig,
    tok: &TextTokenizer,
    model: &dyn CausalLm,
    (examples, eval_examples): (&[Example], &[Example]),
    eos: Option<u32>,
    saved_chat_now: Option<i64>,
    note: &mut dyn FnMut(&str),
) -> Result<Data> {
    // Conversations need the model's chat template; read only when the data has some.
    // The file named in an error is the one whose conversations need the template.
    let chat = match chat_template_for(&cfg.model, &cfg.data, examples)? {
        Some(c) => Some(c),
        None => chat_template_for(
            &cfg.model,
            cfg.eval_data.as_deref().unwrap_or(&cfg.data),
            eval_examples,
        )?,
    };
    if let (Some(c), Some(t)) = (&chat, saved_chat_now) {
        c.set_now(t);
    }
    let chat_now = chat.as_ref().map(|c| c.now());
    let train_seqs = tokenize(
        tok,
        examples,
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
    let (train_seqs, dropped) = if cfg.pack {
        let packed = pack(&train_seqs, cfg.seq_len);
        drop_targetless(packed)
    } else {
        drop_targetless(train_seqs)
    };
    if train_seqs.is_empty() {
        return Err(err(
            &cfg.data,
            format!(
                "no training example keeps a target token within --seq-len {} (a prompt that \
                 fills it leaves its completion nothing; an empty completion with --no-eos, an \
                 empty conversation, or one without an assistant turn under \
                 --assistant-only-loss has none){}",
                cfg.seq_len,
                if cfg.pack {
                    "; with --pack, the data is shorter than one block"
                } else {
                    ""
                }
            ),
        ));
    }
    if dropped > 0 {
        note(&format!(
            "{dropped} of {} {} no target token within --seq-len {} and {} left out of training",
            dropped + train_seqs.len(),
            if cfg.pack {
                "blocks have"
            } else {
                "training examples have"
            },
            cfg.seq_len,
            if dropped == 1 { "is" } else { "are" }
        ));
    }
    let step_seqs = cfg.batch_size.saturating_mul(cfg.grad_accum);
    if cfg.batch_size > train_seqs.len() || step_seqs > train_seqs.len() {
        return Err(setting_err(
            "batch-size",
            format!(
                "a step would take {} sequences ({} x --grad-accum {}) but the data has {} \
                 training sequences: lower --batch-size or --grad-accum",
                step_seqs,
                cfg.batch_size,
                cfg.grad_accum,
                train_seqs.len()
            ),
        ));
    }
    let eval_seqs = tokenize(
        tok,
        eval_examples,
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
    let (eval_seqs, eval_dropped) = drop_targetless(eval_seqs);
    check_vocab(
        &cfg.model,
        model.vocab_size(),
        train_seqs.iter().chain(&eval_seqs),
    )?;
    if eval_dropped > 0 {
        note(&format!(
            "{eval_dropped} of {} held-out examples have no target token within --seq-len {} and \
             are left out of the eval loss",
            eval_dropped + eval_seqs.len(),
            cfg.seq_len
        ));
    }
    Ok(Data {
        train: train_seqs,
        eval: eval_seqs,
        chat_now,
        step_seqs,
    })
}
