//! lora-train: data, evaluation and (with the training issue) optimizers, schedules and the
//! training loop.
//!
//! Today: [`data`] reads text datasets (`.txt` paragraphs, `.jsonl` with `text`), [`optim`] has
//! AdamW / SGD / LoRA+ groups / clipping / schedules, and [`eval`]
//! computes the token-weighted mean cross-entropy that transformers reports.
#![warn(missing_docs)]

pub mod batches;
pub mod data;
pub mod diffusion;
pub mod eval;
pub mod optim;
pub mod plot;
pub mod pretrain;
pub mod run;
pub mod sd_checkpoint;
pub mod sd_pretrain;
pub mod trainer;
pub mod vision;

use std::path::PathBuf;

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data file is unreadable or malformed.
    #[error("{path}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where it applies.
        reason: String,
    },
    /// A setting (a flag of `lora train`, a field of its config file) is out of range or does
    /// not fit the model or the data.
    #[error("--{setting}: {reason}")]
    Setting {
        /// The setting's flag name, without the dashes (`rank`, `batch-size`).
        setting: &'static str,
        /// What is wrong, and what would do.
        reason: String,
    },
    /// From lora-io.
    #[error(transparent)]
    Io(#[from] lora_io::IoError),
    /// From lora-core.
    #[error(transparent)]
    Core(#[from] lora_core::CoreError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, TrainError>;
