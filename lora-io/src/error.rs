//! The error type of lora-io: each variant carries the file and, where it applies, the key or
//! field, so a message says exactly what to fix.

use lora_core::CoreError;
use std::path::PathBuf;

/// Errors reading or writing model and adapter files.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The OS refused a file operation.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A required file is missing.
    #[error("{path}: not found ({what})")]
    Missing {
        /// The file looked for.
        path: PathBuf,
        /// What it is for.
        what: &'static str,
    },
    /// A safetensors file is malformed or truncated.
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is absent from the checkpoint.
    #[error("{path}: tensor `{key}` not found")]
    MissingTensor {
        /// The file or directory searched.
        path: PathBuf,
        /// The tensor name.
        key: String,
    },
    /// A tensor's shape disagrees with the configuration.
    #[error("{path}: tensor `{key}` has shape {got:?}, config.json implies {expected:?}")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// Shape in the file.
        got: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor dtype we do not read.
    #[error("{path}: tensor `{key}` has dtype {dtype}, expected F32, F16 or BF16")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A config field is missing, out of range or unsupported.
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// An output path that must not be written (it is an input, holds files we did not write,
    /// or another run holds it).
    #[error("{path}: {reason}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// An adapter target matched no module.
    #[error("target_modules {target} matched no module; available modules: {available}")]
    NoTarget {
        /// The target spec as given.
        target: String,
        /// The model's linear module names.
        available: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An image file could not be decoded (or is larger than allowed).
    #[error("{path}: image: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Error from the tensor layer.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, IoError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.into();
    move |source| IoError::Io { path, source }
}
