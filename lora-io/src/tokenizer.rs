//! `tokenizer.json` through the `tokenizers` crate (built without network or C dependencies).
//! Encoding adds special tokens as the file's post-processor defines, which is what
//! transformers' `tokenizer(text)` does by default.

use crate::error::{IoError, Result};
use std::path::{Path, PathBuf};

/// Each token's byte range `(start, end)` in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

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
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| IoError::Tokenizer {
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

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| IoError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
