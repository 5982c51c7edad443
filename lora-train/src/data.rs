//! Datasets, parsed in one place: a `.txt` file is split into paragraphs (separated by blank
//! lines); a `.jsonl` file has one JSON object per line with a string `text`, strings `prompt`
//! and `completion`, a conversation `messages`, or `prompt` and `completion` as lists of
//! messages (TRL's dataset formats). Bad input is an error naming the file and line: non-UTF-8
//! bytes, invalid JSON, missing fields, an unknown extension, no examples.

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
    /// A conversation (`{"messages": [{"role": .., "content": ..}, ..]}`), rendered with the
    /// model's chat template; every token is a target (TRL's default for conversational
    /// language modelling).
    Messages {
        /// The conversation.
        messages: Vec<serde_json::Value>,
        /// Tool definitions for the template (`tools`, a list or a JSON string of one).
        tools: Option<serde_json::Value>,
    },
    /// Conversational prompt/completion (`prompt` and `completion` are lists of messages): the
    /// prompt rendered with the generation prompt, the whole conversation rendered after it;
    /// only the completion's tokens are targets.
    ChatPromptCompletion {
        /// The messages before the answer.
        prompt: Vec<serde_json::Value>,
        /// The answer's messages.
        completion: Vec<serde_json::Value>,
        /// Tool definitions for the template.
        tools: Option<serde_json::Value>,
    },
}

impl Example {
    /// Whether rendering needs the model's chat template.
    pub fn is_chat(&self) -> bool {
        matches!(
            self,
            Example::Messages { .. } | Example::ChatPromptCompletion { .. }
        )
    }
}

/// The messages of a conversational field, checked: objects with a string `role` and a string
/// (or absent / null) `content`.
fn messages(
    v: &serde_json::Value,
    field: &str,
) -> std::result::Result<Vec<serde_json::Value>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("`{field}` must be a list of messages"))?;
    for (j, m) in list.iter().enumerate() {
        let at = format!("`{field}` message {}", j + 1);
        if m.get("role").and_then(|r| r.as_str()).is_none() {
            return Err(format!("{at}: no string `role`"));
        }
        match m.get("content") {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => {}
            Some(_) => {
                return Err(format!(
                "{at}: `content` must be a string (content lists, e.g. images, are not supported)"
            ))
            }
        }
    }
    Ok(list.clone())
}

/// Reads the examples of `path` (by extension).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let err = |reason: String| TrainError::Data {
        path: path.into(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(err(
                "not a regular file (a device, pipe or directory)".into()
            ))
        }
        Err(e) => return Err(err(e.to_string())),
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        err(format!("not valid UTF-8 (first bad byte at offset {at})"))
    })?;
    // A byte-order mark (editors on Windows write one) is not part of the first example.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
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
                let at = |e: String| err(format!("line {}: {e}", i + 1));
                // TRL: `tools` is a list of schemas, or a JSON string of one.
                let tools = match obj.get("tools") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(
                        serde_json::from_str::<serde_json::Value>(s)
                            .map_err(|e| at(format!("`tools` is a string but not JSON: {e}")))?,
                    ),
                    Some(t) => Some(t.clone()),
                };
                if let Some(t) = &tools {
                    if !t.is_array() {
                        return Err(at("`tools` must be a list of tool definitions".into()));
                    }
                }
                // One format per line: `text` beside a conversation or a prompt/completion
                // pair leaves it open which one is meant.
                if obj.get("text").is_some()
                    && (obj.get("messages").is_some()
                        || obj.get("prompt").is_some()
                        || obj.get("completion").is_some())
                {
                    return Err(at(
                        "has `text` and also `messages` or `prompt`/`completion`: keep one \
                         format per line"
                            .into(),
                    ));
                }
                if let Some(m) = obj.get("messages") {
                    v.push(Example::Messages {
                        messages: messages(m, "messages").map_err(at)?,
                        tools,
                    });
                    continue;
                }
                if let (Some(p @ serde_json::Value::Array(_)), Some(c)) =
                    (obj.get("prompt"), obj.get("completion"))
                {
                    v.push(Example::ChatPromptCompletion {
                        prompt: messages(p, "prompt").map_err(at)?,
                        completion: messages(c, "completion").map_err(at)?,
                        tools,
                    });
                    continue;
                }
                if tools.is_some() {
                    return Err(at(
                        "`tools` goes with conversations (`messages`, or message-list prompt and \
                         completion)"
                            .into(),
                    ));
                }
                let s = |k: &str| obj.get(k).and_then(|x| x.as_str()).map(String::from);
                v.push(match (s("text"), s("prompt"), s("completion")) {
                    (_, Some(prompt), Some(completion)) => {
                        Example::PromptCompletion { prompt, completion }
                    }
                    (Some(t), None, None) => Example::Text(t),
                    _ => {
                        return Err(err(format!(
                        "line {}: no string field `text` (or strings `prompt` and `completion`, or \
                         a `messages` list)",
                        i + 1
                    )))
                    }
                });
            }
            v
        }
        "" => {
            return Err(err(
                "the file name has no extension: name it .txt (paragraphs) or .jsonl (one JSON \
                 object per line)"
                    .into(),
            ))
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
            _ => Err(TrainError::Data {
                path: path.into(),
                reason: format!(
                    "example {}: a prompt/completion pair or conversation where plain text is expected",
                    i + 1
                ),
            }),
        })
        .collect()
}
