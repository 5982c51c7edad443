//! lora-train: optimizers, schedules, the data pipeline and the training loop.
//!
//! Not implemented yet: this crate holds its place in the workspace's dependency chain; it is
//! filled by the training issue (5).
