//! Evaluation: the mean token cross-entropy of a causal LM over texts, as transformers computes
//! `model(input_ids, labels=input_ids).loss` per example and a token-weighted mean over examples.
//! Each text is tokenized with the tokenizer's defaults and truncated to `seq_len`; a text of
//! fewer than two tokens has nothing to predict and contributes nothing.

use crate::{Result, TrainError};
use lora_core::models::{causal_lm_loss, CausalLm};
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

/// Token-weighted mean loss of `model` over `texts`.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    texts: &[String],
    seq_len: usize,
    adapters: bool,
) -> Result<EvalResult> {
    if seq_len < 2 {
        return Err(lora_core::CoreError::InvalidConfig {
            field: "seq_len",
            reason: format!("must be at least 2, got {seq_len}"),
        }
        .into());
    }
    let (mut total, mut tokens, mut examples) = (0.0f64, 0usize, 0usize);
    for text in texts {
        let mut ids = tok.encode(text)?;
        ids.truncate(seq_len);
        if ids.len() < 2 {
            continue;
        }
        let t = ids.len();
        let tape = Tape::inference();
        let logits = model.forward(&tape, &ids, 1, t, adapters)?;
        let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let loss = causal_lm_loss(&tape, &logits, &labels, 1, t)?.scalar()? as f64;
        total += loss * (t - 1) as f64;
        tokens += t - 1;
        examples += 1;
    }
    if tokens == 0 {
        return Err(TrainError::Data {
            path: "<data>".into(),
            reason: "no example has two or more tokens".into(),
        });
    }
    let loss = total / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
        examples,
    })
}
