//! Datasets, parsed in one place: a `.txt` file is split into paragraphs (separated by blank
//! lines); a `.jsonl` file has one JSON object per line with a string `text`, or strings
//! `prompt` and `completion`. Bad input is an error naming the file and line: non-UTF-8 bytes,
//! invalid JSON, missing fields, an unknown extension, no examples.

use crate::{Result, TrainError};
use std::path::Path;

/// One example as read from a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Plain text: every token is a target.
    Text(String),
    /// Only the completion's tokens are targets.
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// What the model should learn to produce after it.
        completion: String,
    },
}

/// Reads the examples of `path` (by extension).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let err = |reason: String| TrainError::Data {
        path: path.into(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        err(format!("not valid UTF-8 (first bad byte at offset {at})"))
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let out: Vec<Example> = match ext {
        "txt" => text
            .replace("\r\n", "\n")
            .split("\n\n")
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| Example::Text(p.to_string()))
            .collect(),
        "jsonl" => {
            let mut v = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let obj: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| err(format!("line {}: invalid JSON: {e}", i + 1)))?;
                let s = |k: &str| obj.get(k).and_then(|x| x.as_str()).map(String::from);
                v.push(match (s("text"), s("prompt"), s("completion")) {
                    (_, Some(prompt), Some(completion)) => {
                        Example::PromptCompletion { prompt, completion }
                    }
                    (Some(t), None, None) => Example::Text(t),
                    _ => {
                        return Err(err(format!(
                        "line {}: no string field `text` (or strings `prompt` and `completion`)",
                        i + 1
                    )))
                    }
                });
            }
            v
        }
        other => {
            return Err(err(format!(
                "unknown data format `.{other}` (expected .txt or .jsonl)"
            )))
        }
    };
    if out.is_empty() {
        return Err(err("no examples".into()));
    }
    Ok(out)
}

/// The texts of a plain-text dataset: prompt/completion lines are refused (`lora eval` and
/// training read both kinds through [`read_examples`]).
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    read_examples(path)?
        .into_iter()
        .enumerate()
        .map(|(i, e)| match e {
            Example::Text(t) => Ok(t),
            Example::PromptCompletion { .. } => Err(TrainError::Data {
                path: path.into(),
                reason: format!(
                    "example {}: a prompt/completion pair where plain text is expected",
                    i + 1
                ),
            }),
        })
        .collect()
}
