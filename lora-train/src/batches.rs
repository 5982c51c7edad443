//! From examples to training batches: tokenization (prompt/completion examples get labels only
//! on the completion), optional packing into fixed-length blocks, padding that the loss ignores,
//! and a seeded, resumable shuffle.

use crate::Result;
use lora_io::chat::ChatTemplate;
use lora_io::hf::ModelDir;
use lora_io::tokenizer::TextTokenizer;
use lora_kernels::rng::Rng;
use std::path::Path;

/// Label value the loss ignores (transformers' convention).
pub const IGNORE: i64 = -100;

pub use crate::data::{read_examples, Example};

/// Token ids and per-position labels (`IGNORE` where no loss is taken).
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels: the id itself, or `IGNORE`.
    pub labels: Vec<i64>,
}

/// How [`tokenize`] turns examples into sequences.
#[derive(Clone, Copy, Debug)]
pub struct TokenizeOptions<'a> {
    /// Truncate each sequence to this many tokens (unless `pack`: packing cuts blocks later).
    pub seq_len: usize,
    /// Leave sequences whole for [`pack`].
    pub pack: bool,
    /// End every text and completion with this token, as a target (see [`tokenize`]).
    pub eos: Option<u32>,
    /// The model's chat template, for conversations.
    pub chat: Option<&'a ChatTemplate>,
    /// In conversations, take the loss on the assistant's turns only.
    pub assistant_only: bool,
}

impl TokenizeOptions<'_> {
    /// Truncation at `seq_len`, nothing else.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            pack: false,
            eos: None,
            chat: None,
            assistant_only: false,
        }
    }
}

/// The EOS [`tokenize`] appends (`ModelDir::training_eos`), resolved for `examples`: a model
/// that names none is an error (`hint` says how to go on without one) unless every example is a
/// conversation, whose turns the chat template ends.
pub fn training_eos<'a>(
    md: &ModelDir,
    tok: &TextTokenizer,
    examples: impl IntoIterator<Item = &'a Example>,
    hint: &str,
) -> Result<Option<u32>> {
    match md.training_eos(tok)? {
        Some(id) => Ok(Some(id)),
        None if examples.into_iter().all(Example::is_chat) => Ok(None),
        None => Err(crate::TrainError::Data {
            path: md.dir.clone(),
            reason: format!(
                "no end-of-sequence token to end each text and completion with (no `eos_token` \
                 in tokenizer_config.json, no `eos_token_id` in generation_config.json or \
                 config.json); {hint}"
            ),
        }),
    }
}

/// The chat template of the model in `model_dir` when `examples` hold conversations (`None`
/// when none does); a model without one is an error naming `data` and the model.
pub fn chat_template_for<'a>(
    model_dir: &Path,
    data: &Path,
    examples: impl IntoIterator<Item = &'a Example>,
) -> Result<Option<ChatTemplate>> {
    if !examples.into_iter().any(Example::is_chat) {
        return Ok(None);
    }
    ChatTemplate::from_model_dir(model_dir)?
        .map(Some)
        .ok_or_else(|| crate::TrainError::Data {
            path: data.to_path_buf(),
            reason: format!(
                "the data has conversations (`messages`, or prompt/completion message lists) but \
                 {} has no chat template (chat_template.jinja or tokenizer_config.json \
                 `chat_template`)",
                model_dir.display()
            ),
        })
}

/// Tokenizes examples (the tokenizer's special tokens on the text or prompt; none added inside a
/// completion), truncating each to `seq_len` unless `pack` (packing cuts blocks later).
///
/// With `eos = Some(id)` every text and every completion ends with that token, as a target,
/// unless it already does, so the model learns where an answer stops (and packed examples keep a
/// boundary between them); this is what TRL's `SFTTrainer` does with the tokenizer's
/// `eos_token`. A sequence cut by `seq_len` loses its end, EOS included, as in TRL.
///
/// Conversations are rendered with `chat` (the model's chat template) and tokenized without
/// added special tokens, as transformers' `apply_chat_template` does; the template writes its own
/// end-of-turn tokens, so no EOS is appended (as in TRL). A conversational prompt/completion
/// takes its labels from where the tokenized prompt (with the generation prompt) and the
/// tokenized whole conversation stop agreeing, as TRL does.
///
/// With `assistant_only`, a conversation's targets are further limited to its assistant turns:
/// turn `i` is the text the template adds between rendering messages `..i` with the generation
/// prompt and rendering messages `..=i` (its content and end-of-turn marker, not the role
/// header), mapped to the tokens that overlap it. A template whose renderings are not prefixes of
/// each other cannot be split this way and is an error.
pub fn tokenize(
    tok: &TextTokenizer,
    examples: &[Example],
    opts: &TokenizeOptions,
) -> Result<Vec<Sequence>> {
    let mut out = Vec::with_capacity(examples.len());
    let keep = (!opts.pack).then_some(opts.seq_len.saturating_add(1));
    for (i, e) in examples.iter().enumerate() {
        let data_err = |reason: String| crate::TrainError::Data {
            path: "chat_template".into(),
            reason: format!("example {}: {reason}", i + 1),
        };
        let template = || {
            opts.chat.ok_or_else(|| {
                data_err(
                    "a conversation, but the model has no chat template (chat_template.jinja or \
                     tokenizer_config.json `chat_template`)"
                        .into(),
                )
            })
        };
        let (mut ids, prompt_len, end, mask) = match e {
            // Truncated sequences need no more than `seq_len + 1` tokens of a text: a long text
            // is encoded from a prefix (packing needs them all: see `encode_long`).
            Example::Text(t) => (tok.encode_long(t, true, keep)?, 0, opts.eos, None),
            Example::PromptCompletion { prompt, completion } => {
                let p = tok.encode_long(prompt, true, keep)?;
                let n = p.len();
                (
                    [p, tok.encode_long(completion, false, keep)?].concat(),
                    n,
                    opts.eos,
                    None,
                )
            }
            Example::Messages { messages, tools } => {
                let (ids, mask) = render_chat(
                    tok,
                    template()?,
                    messages,
                    tools.as_ref(),
                    opts.assistant_only,
                )
                .map_err(data_err)?;
                (ids, 0, None, mask)
            }
            Example::ChatPromptCompletion {
                prompt,
                completion,
                tools,
            } => {
                let t = template()?;
                let p = tok.encode_plain(&t.render_with_tools(prompt, tools.as_ref(), true)?)?;
                let all: Vec<_> = prompt.iter().chain(completion).cloned().collect();
                let (ids, mask) = render_chat(tok, t, &all, tools.as_ref(), opts.assistant_only)
                    .map_err(data_err)?;
                let n = p.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                (ids, n, None, mask)
            }
        };
        if let Some(id) = end {
            if ids.len() == prompt_len || ids.last() != Some(&id) {
                ids.push(id);
            }
        }
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let in_turn = match &mask {
                    Some(m) => m[i],
                    None => true,
                };
                if i >= prompt_len && in_turn {
                    x as i64
                } else {
                    IGNORE
                }
            })
            .collect();
        let mut s = Sequence { ids, labels };
        if !opts.pack {
            s.ids.truncate(opts.seq_len);
            s.labels.truncate(opts.seq_len);
        }
        out.push(s);
    }
    Ok(out)
}

/// A conversation's token ids and, with `assistant_only`, which tokens belong to an assistant
/// turn. The error is the reason, for the caller to put beside the example's number.
fn render_chat(
    tok: &TextTokenizer,
    t: &ChatTemplate,
    messages: &[serde_json::Value],
    tools: Option<&serde_json::Value>,
    assistant_only: bool,
) -> std::result::Result<(Vec<u32>, Option<Vec<bool>>), String> {
    let text = |m: &[serde_json::Value], gen: bool| {
        t.render_with_tools(m, tools, gen)
            .map_err(|e| e.to_string())
    };
    let full = text(messages, false)?;
    if !assistant_only {
        let ids = tok.encode_plain(&full).map_err(|e| e.to_string())?;
        return Ok((ids, None));
    }
    let (ids, offsets) = tok
        .encode_plain_with_offsets(&full)
        .map_err(|e| e.to_string())?;
    let mut mask = vec![false; ids.len()];
    for (j, m) in messages.iter().enumerate() {
        if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
            continue;
        }
        let before = text(&messages[..j], true)?;
        let upto = text(&messages[..=j], false)?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            return Err(format!(
                "--assistant-only-loss: the chat template does not render message {} as an \
                 extension of the messages before it, so its assistant turn cannot be located",
                j + 1
            ));
        }
        let (a, b) = (before.len(), upto.len());
        for (k, &(s, e)) in offsets.iter().enumerate() {
            if s < b && e > a {
                mask[k] = true;
            }
        }
    }
    Ok((ids, Some(mask)))
}

/// Concatenates sequences and cuts them into blocks of exactly `seq_len` (the remainder is
/// dropped).
pub fn pack(seqs: &[Sequence], seq_len: usize) -> Vec<Sequence> {
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
    let labels: Vec<i64> = seqs.iter().flat_map(|s| s.labels.iter().copied()).collect();
    ids.chunks_exact(seq_len)
        .zip(labels.chunks_exact(seq_len))
        .map(|(i, l)| Sequence {
            ids: i.to_vec(),
            labels: l.to_vec(),
        })
        .collect()
}

/// A padded batch `(B, T)`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Ids (padding: 0).
    pub ids: Vec<u32>,
    /// Labels (padding: `IGNORE`).
    pub labels: Vec<i64>,
    /// B
    pub batch: usize,
    /// T (the longest sequence of the batch)
    pub seq: usize,
}

impl Batch {
    /// Pads `seqs` to their longest length.
    pub fn pad(seqs: &[&Sequence]) -> Self {
        let seq = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * seq);
        let mut labels = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            ids.extend_from_slice(&s.ids);
            ids.resize(ids.len() + seq - s.ids.len(), 0);
            labels.extend_from_slice(&s.labels);
            labels.resize(labels.len() + seq - s.labels.len(), IGNORE);
        }
        Self {
            ids,
            labels,
            batch: seqs.len(),
            seq,
        }
    }

    /// Positions whose label is a target after the causal shift.
    pub fn target_tokens(&self) -> usize {
        (0..self.batch)
            .map(|b| {
                (1..self.seq)
                    .filter(|&t| self.labels[b * self.seq + t] >= 0)
                    .count()
            })
            .sum()
    }
}

/// Walks the sequences in a seeded random order, epoch after epoch. Its position is two
/// integers, so a checkpoint can resume it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sampler {
    n: usize,
    seed: u64,
    /// Completed epochs.
    pub epoch: u64,
    /// Next index into this epoch's order.
    pub pos: usize,
    order: Vec<usize>,
}

impl Sampler {
    /// Starts at epoch 0, position 0.
    pub fn new(n: usize, seed: u64) -> Self {
        Self::resume(n, seed, 0, 0)
    }

    /// Restores a saved position.
    pub fn resume(n: usize, seed: u64, epoch: u64, pos: usize) -> Self {
        let mut s = Self {
            n,
            seed,
            epoch,
            pos,
            order: Vec::new(),
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng = Rng::new(lora_kernels::rng::splitmix64(
            self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9),
        ));
        self.order = (0..self.n).collect();
        for i in (1..self.n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
    }

    /// The next `k` indices, moving to a new shuffled epoch when one runs out.
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k && self.n > 0 {
            if self.pos == self.n {
                self.epoch += 1;
                self.pos = 0;
                self.shuffle();
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}
