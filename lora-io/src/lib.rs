//! lora-io: file formats (safetensors, Hugging Face model directories, PEFT and kohya adapters,
//! training checkpoints).
//!
//! Not implemented yet: this crate holds its place in the workspace's dependency chain
//! (`lora-kernels <- lora-core <- lora-io <- lora-train <- lora-cli`). Loading models arrives
//! with issue 3, adapter formats and merging with issue 4.
