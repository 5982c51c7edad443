//! Text datasets: a `.txt` file is split into paragraphs (separated by blank lines), a `.jsonl`
//! file has one JSON object per line with a string field `text`. Bad input is an error naming the
//! file and line: non-UTF-8 bytes, invalid JSON, a missing or non-string `text`, no examples.

use crate::{Result, TrainError};
use std::path::Path;

/// Reads the examples of `path` (by extension: `.txt` or `.jsonl`).
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
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
    let texts: Vec<String> = match ext {
        "txt" => text
            .replace("\r\n", "\n")
            .split("\n\n")
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect(),
        "jsonl" => {
            let mut v = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let obj: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| err(format!("line {}: invalid JSON: {e}", i + 1)))?;
                let t = obj
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| err(format!("line {}: no string field `text`", i + 1)))?;
                v.push(t.to_string());
            }
            v
        }
        other => {
            return Err(err(format!(
                "unknown data format `.{other}` (expected .txt or .jsonl)"
            )))
        }
    };
    if texts.is_empty() {
        return Err(err("no examples".into()));
    }
    Ok(texts)
}
