//! Evaluation: the mean token cross-entropy of a causal LM over texts, as transformers computes
//! `model(input_ids, labels=input_ids).loss` per example and a token-weighted mean over examples;
//! prompt/completion pairs count their completion tokens only, as training does.
//! Each text is tokenized with the tokenizer's defaults and truncated to `seq_len`; a text of
//! fewer than two tokens has nothing to predict and contributes nothing.

use crate::batches::{tokenize, Batch, Example, Sequence, TokenizeOptions};
use crate::{Result, TrainError};
use lora_core::models::CausalLm;
use lora_core::Tape;
use lora_io::tokenizer::TextTokenizer;

/// What [`evaluate`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: usize,
    /// Examples that contributed.
    pub examples: usize,
}

/// Token-weighted mean loss over the target tokens of `seqs`, one sequence at a time; `None`
/// when no sequence has a target.
pub fn eval_sequences(
    model: &dyn CausalLm,
    seqs: &[Sequence],
    adapters: bool,
) -> Result<Option<EvalResult>> {
    let (mut total, mut tokens, mut examples) = (0.0f64, 0usize, 0usize);
    for s in seqs {
        let b = Batch::pad(&[s]);
        let k = b.target_tokens();
        if k == 0 {
            continue;
        }
        let tape = Tape::inference();
        total += model
            .loss(&tape, &b.ids, &b.labels, 1, b.seq, adapters)?
            .scalar()? as f64
            * k as f64;
        tokens += k;
        examples += 1;
    }
    Ok((tokens > 0).then(|| {
        let loss = total / tokens as f64;
        EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens,
            examples,
        }
    }))
}

/// Token-weighted mean loss of `model` over `texts`, each tokenized with the tokenizer's
/// defaults and truncated to `seq_len` (no EOS appended: the loss transformers computes for
/// `model(ids, labels=ids)` on the text).
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    texts: &[String],
    seq_len: usize,
    adapters: bool,
) -> Result<EvalResult> {
    let examples: Vec<Example> = texts.iter().cloned().map(Example::Text).collect();
    evaluate_examples(
        model,
        tok,
        &examples,
        &TokenizeOptions::new(seq_len),
        adapters,
    )
}

/// [`evaluate`] over any examples, tokenized as training tokenizes them with `opts` (a
/// prompt/completion pair counts its completion tokens only, `opts.eos` ends each text and
/// completion, conversations are rendered with `opts.chat`): with the run's options this is the
/// held-out loss `lora train` reports.
pub fn evaluate_examples(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    examples: &[Example],
    opts: &TokenizeOptions,
    adapters: bool,
) -> Result<EvalResult> {
    if opts.seq_len < 2 {
        return Err(lora_core::CoreError::InvalidConfig {
            field: "seq_len",
            reason: format!("must be at least 2, got {}", opts.seq_len),
        }
        .into());
    }
    let seqs = tokenize(
        tok,
        examples,
        &TokenizeOptions {
            pack: false,
            ..*opts
        },
    )?;
    crate::run::check_vocab(tok.path(), model.vocab_size(), &seqs)?;
    eval_sequences(model, &seqs, adapters)?.ok_or_else(|| TrainError::Data {
        path: "<data>".into(),
        reason: "no example has a token to predict".into(),
    })
}
