//! From examples to training batches: tokenization (prompt/completion examples get labels only
//! on the completion), optional packing into fixed-length blocks, padding that the loss ignores,
//! and a seeded, resumable shuffle.

use crate::Result;
use lora_io::chat::ChatTemplate;
use lora_io::tokenizer::TextTokenizer;
use lora_kernels::rng::Rng;

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
pub fn tokenize(
    tok: &TextTokenizer,
    examples: &[Example],
    seq_len: usize,
    pack: bool,
    eos: Option<u32>,
    chat: Option<&ChatTemplate>,
) -> Result<Vec<Sequence>> {
    let mut out = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let template = || {
            chat.ok_or_else(|| crate::TrainError::Data {
                path: "chat_template".into(),
                reason: format!(
                    "example {}: a conversation, but the model has no chat template \
                     (chat_template.jinja or tokenizer_config.json `chat_template`)",
                    i + 1
                ),
            })
        };
        let (mut ids, prompt_len, end) = match e {
            Example::Text(t) => (tok.encode(t)?, 0, eos),
            Example::PromptCompletion { prompt, completion } => {
                let p = tok.encode(prompt)?;
                let n = p.len();
                ([p, tok.encode_plain(completion)?].concat(), n, eos)
            }
            Example::Messages(m) => (tok.encode_plain(&template()?.render(m, false)?)?, 0, None),
            Example::ChatPromptCompletion { prompt, completion } => {
                let t = template()?;
                let p = tok.encode_plain(&t.render(prompt, true)?)?;
                let all: Vec<_> = prompt.iter().chain(completion).cloned().collect();
                let ids = tok.encode_plain(&t.render(&all, false)?)?;
                let n = p.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                (ids, n, None)
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
            .map(|(i, &x)| if i < prompt_len { IGNORE } else { x as i64 })
            .collect();
        let mut s = Sequence { ids, labels };
        if !pack {
            s.ids.truncate(seq_len);
            s.labels.truncate(seq_len);
        }
        out.push(s);
    }
    Ok(out)
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
