//! Stable Diffusion's CLIP tokenizer (`tokenizer/` of a diffusers directory), as transformers'
//! `CLIPTokenizer` builds it: often shipped as `vocab.json` + `merges.txt` without a
//! `tokenizer.json`, so the pipeline is assembled here from those files and
//! `tokenizer_config.json` (special tokens, `model_max_length`): NFC, whitespace runs to one
//! space and lowercasing; CLIP's word regex, then byte-level symbols; BPE with the `</w>`
//! end-of-word suffix; `<|startoftext|>` ... `<|endoftext|>` around the tokens. Prompts are
//! encoded as the pipelines call it (`padding="max_length"`, `truncation=True`): cut to
//! `model_max_length - 2` tokens, then padded with the pad token to `model_max_length`.

use crate::error::{IoError, Result};
use crate::tokenizer::TextTokenizer;
use serde_json::{json, Value};
use std::path::Path;

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer with its prompt length and pad token.
pub struct ClipTokenizer {
    inner: TextTokenizer,
    max_len: usize,
    pad: u32,
}

impl ClipTokenizer {
    /// Loads `dir` (a diffusers `tokenizer/`): its `tokenizer.json` when there is one, else
    /// `vocab.json` + `merges.txt`; special tokens and `model_max_length` (default 77) from
    /// `tokenizer_config.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = match crate::files::read_small(&cfg_path, "tokenizer_config.json")? {
            Some(b) => serde_json::from_slice::<Value>(&b).map_err(|source| IoError::Json {
                path: cfg_path.clone(),
                source,
            })?,
            None => json!({}),
        };
        let field = |k: &str, default: &str| -> Result<String> {
            match cfg.get(k).filter(|v| !v.is_null()) {
                None => Ok(default.into()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => v
                    .get("content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| IoError::Config {
                        path: cfg_path.clone(),
                        field: k.into(),
                        reason: format!("expected a token string, got {v}"),
                    }),
            }
        };
        let (bos, eos) = (
            field("bos_token", "<|startoftext|>")?,
            field("eos_token", "<|endoftext|>")?,
        );
        let (unk, pad) = (
            field("unk_token", "<|endoftext|>")?,
            field("pad_token", "<|endoftext|>")?,
        );
        let max_len = match cfg.get("model_max_length") {
            None => 77,
            Some(v) => v
                .as_u64()
                .filter(|n| (3..=4096).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| IoError::Config {
                    path: cfg_path.clone(),
                    field: "model_max_length".into(),
                    reason: format!("expected 3 to 4096, got {v}"),
                })?,
        };
        let inner = if dir.join("tokenizer.json").exists() {
            TextTokenizer::from_model_dir(dir)?
        } else {
            let (vocab, merges) = read_vocab_merges(dir)?;
            let id = |t: &str| -> Result<u64> {
                vocab
                    .get(t)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| IoError::Tokenizer {
                        path: dir.join("vocab.json"),
                        reason: format!("the special token `{t}` is not in the vocabulary"),
                    })
            };
            let added: Vec<Value> = {
                let mut names = vec![bos.clone(), eos.clone(), unk.clone(), pad.clone()];
                names.sort();
                names.dedup();
                names
                    .iter()
                    .map(|t| {
                        Ok(json!({"id": id(t)?, "content": t, "single_word": false,
                            "lstrip": false, "rstrip": false, "normalized": false,
                            "special": true}))
                    })
                    .collect::<Result<_>>()?
            };
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_PATTERN},
                     "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": true}]},
                "post_processor": {"type": "RobertaProcessing", "sep": [eos, id(&eos)?],
                    "cls": [bos, id(&bos)?], "trim_offsets": false, "add_prefix_space": false},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                    "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges},
            });
            TextTokenizer::from_json_str(&spec.to_string(), dir.join("vocab.json"))?
        };
        let pad = inner.token_id(&pad).ok_or_else(|| IoError::Tokenizer {
            path: dir.into(),
            reason: format!("the pad token `{pad}` is not in the vocabulary"),
        })?;
        Ok(Self {
            inner,
            max_len,
            pad,
        })
    }

    /// The prompt length (`model_max_length`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `prompt`'s ids as a diffusers pipeline encodes it: start and end tokens around at most
    /// `max_len - 2` tokens, padded to `max_len`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let ids = self.inner.encode(prompt)?;
        let mut out: Vec<u32> = if ids.len() > self.max_len {
            // Keep the start token, the first max_len - 2 tokens, and the end token.
            let mut v = ids[..self.max_len - 1].to_vec();
            v.push(*ids.last().expect("non-empty"));
            v
        } else {
            ids
        };
        out.resize(self.max_len, self.pad);
        Ok(out)
    }
}

/// `vocab.json` (token -> id) and `merges.txt` (`#version` line, then "a b" per merge).
fn read_vocab_merges(dir: &Path) -> Result<(serde_json::Map<String, Value>, Vec<Value>)> {
    let vp = dir.join("vocab.json");
    let Some(vb) = crate::files::read_small(&vp, "vocab.json")? else {
        return Err(IoError::Missing {
            path: vp,
            what: "vocab.json (or tokenizer.json) of the CLIP tokenizer",
        });
    };
    let vocab = match serde_json::from_slice::<Value>(&vb) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(IoError::Tokenizer {
                path: vp,
                reason: "expected an object of token -> id".into(),
            })
        }
        Err(source) => return Err(IoError::Json { path: vp, source }),
    };
    if let Some((t, v)) = vocab
        .iter()
        .find(|(_, v)| v.as_u64().is_none_or(|n| n > u32::MAX as u64))
    {
        return Err(IoError::Tokenizer {
            path: vp,
            reason: format!("token `{t}` has id {v}, not a 32-bit number"),
        });
    }
    let mp = dir.join("merges.txt");
    let Some(mb) = crate::files::read_small(&mp, "merges.txt")? else {
        return Err(IoError::Missing {
            path: mp,
            what: "merges.txt of the CLIP tokenizer",
        });
    };
    let text = String::from_utf8(mb).map_err(|_| IoError::Tokenizer {
        path: mp.clone(),
        reason: "not UTF-8".into(),
    })?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if (n == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push(json!([a, b]))
            }
            _ => {
                return Err(IoError::Tokenizer {
                    path: mp,
                    reason: format!(
                        "line {}: expected two symbols separated by one space",
                        n + 1
                    ),
                })
            }
        }
    }
    Ok((vocab, merges))
}
