//! `tokenizer.json` through the `tokenizers` crate (built without network or C dependencies).
//! Encoding adds special tokens as the file's post-processor defines, which is what
//! transformers' `tokenizer(text)` does by default.

use crate::error::{IoError, Result};
use std::path::{Path, PathBuf};

/// Each token's byte range `(start, end)` in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// Texts longer than this many bytes are encoded from a prefix or in pieces
/// ([`TextTokenizer::encode_long`]).
pub const PIECE_BYTES: usize = 1 << 20;

/// The largest char boundary at or below `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `text` cut into pieces of about `size` bytes or more, each cut just before a single space
/// that sits between two non-whitespace characters (a piece without such a space runs on).
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = start + size.max(1);
    while i + 1 < b.len() {
        if b[i] == b' '
            && i > start
            && !b[i - 1].is_ascii_whitespace()
            && !b[i + 1].is_ascii_whitespace()
        {
            out.push(&text[start..i]);
            start = i;
            i = start + size.max(1);
        } else {
            i += 1;
        }
    }
    out.push(&text[start..]);
    out
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(IoError::Missing {
                path,
                what: "tokenizer.json (the model directory needs its tokenizer)",
            });
        }
        crate::files::check_regular(&path, crate::files::MAX_TEXT_FILE, "tokenizer.json")?;
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| IoError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { inner, path })
    }

    /// A tokenizer from the text of a `tokenizer.json` (`path` names it in errors).
    pub fn from_json_str(json: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let inner = json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| IoError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self { inner, path })
    }

    /// Loads `dir/tokenizer.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open(dir.as_ref().join("tokenizer.json"))
    }

    fn encoding(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, special)
            .map_err(|e| IoError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Token ids of `text`, with the special tokens the file's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encoding(text, true)?.get_ids().to_vec())
    }

    /// Token ids of `text` without any special tokens (for pieces appended to an encoded text).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encoding(text, false)?.get_ids().to_vec())
    }

    /// [`encode_plain`](Self::encode_plain) with each token's byte range in `text` (as the
    /// tokenizer reports it: a post-processor that trims offsets leaves whitespace-only tokens
    /// empty, as in transformers).
    pub fn encode_plain_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let enc = self.encoding(text, false)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of `text` as [`encode`](Self::encode) (`special`) or
    /// [`encode_plain`](Self::encode_plain) gives them, for a text that may be very long:
    /// with `keep = Some(n)` only the first `n` are wanted (the caller truncates), and a long
    /// text yields at least `n` of them (or all, when it has fewer) from a prefix of it; with
    /// `None` all of them, a long text encoded in pieces where that is exact. The tokenizers
    /// crate keeps about a hundred bytes of bookkeeping per input byte: a 50 MB line took 5 GB
    /// encoded whole.
    pub fn encode_long(&self, text: &str, special: bool, keep: Option<usize>) -> Result<Vec<u32>> {
        if text.len() <= PIECE_BYTES {
            return Ok(self.encoding(text, special)?.get_ids().to_vec());
        }
        match keep {
            Some(n) => self.encode_prefix(text, special, n),
            None => self.encode_pieces(text, special),
        }
    }

    /// The first `n` tokens of `text` from prefixes: a prefix's tokens are trusted up to `n`
    /// when the prefix twice as long gives the same first `n` (and more), so a token the cut
    /// changed is never kept; the prefix doubles until that holds or covers the text.
    fn encode_prefix(&self, text: &str, special: bool, n: usize) -> Result<Vec<u32>> {
        let mut len = n.saturating_mul(16).max(4096);
        let mut prev: Option<Vec<u32>> = None;
        loop {
            if len >= text.len() {
                return Ok(self.encoding(text, special)?.get_ids().to_vec());
            }
            let cut = floor_char_boundary(text, len);
            let ids = self.encoding(&text[..cut], special)?.get_ids().to_vec();
            if let Some(p) = &prev {
                // Two more than needed: a post-processor's trailing special token is never
                // among the first `n`.
                if p.len() >= n + 2 && ids.len() >= n + 2 && p[..n] == ids[..n] {
                    let mut v = ids;
                    v.truncate(n);
                    return Ok(v);
                }
            }
            prev = Some(ids);
            len = len.saturating_mul(2);
        }
    }

    /// All tokens of a long text, encoded piece by piece where the tokenizer allows it
    /// exactly: no normalizer (which may add to or strip every encoded string) and a
    /// pre-tokenizer that starts a new piece at a space between two non-spaces (GPT-2's and
    /// Llama 3's byte-level BPE: checked on a probe text). Pieces are cut before such a space,
    /// encoded without special tokens, and wrapped in the special tokens the post-processor adds.
    /// Other tokenizers encode the text whole.
    fn encode_pieces(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        if !self.pieces_exact()? {
            return Ok(self.encoding(text, special)?.get_ids().to_vec());
        }
        let (prefix, suffix) = if special {
            self.special_wrap()?
        } else {
            (Vec::new(), Vec::new())
        };
        let mut ids = prefix;
        for piece in pieces(text, PIECE_BYTES) {
            ids.extend_from_slice(self.encoding(piece, false)?.get_ids());
        }
        ids.extend(suffix);
        Ok(ids)
    }

    /// Whether [`pieces`] cuts leave the tokens unchanged for this tokenizer.
    fn pieces_exact(&self) -> Result<bool> {
        if self.inner.get_normalizer().is_some() {
            return Ok(false);
        }
        let probe =
            "Hello world, it's 12345 tokens.  Two  spaces\n\nand\tnew lines: \u{e9}t\u{e9} \
                     caf\u{e9} \u{4f60}\u{597d} !!! ... end";
        let whole = self.encoding(probe, false)?.get_ids().to_vec();
        let mut cut = Vec::new();
        for piece in pieces(probe, 1) {
            cut.extend_from_slice(self.encoding(piece, false)?.get_ids());
        }
        Ok(whole == cut)
    }

    /// The special tokens the post-processor puts before and after a text.
    fn special_wrap(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let probe = "hello";
        let plain = self.encoding(probe, false)?.get_ids().to_vec();
        let with = self.encoding(probe, true)?.get_ids().to_vec();
        match (0..=with.len().saturating_sub(plain.len())).find(|&i| with[i..].starts_with(&plain))
        {
            Some(i) => Ok((with[..i].to_vec(), with[i + plain.len()..].to_vec())),
            None => Err(IoError::Tokenizer {
                path: self.path.clone(),
                reason: "the post-processor changes the text's own tokens; long texts cannot be \
                         encoded in pieces"
                    .into(),
            }),
        }
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| IoError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
