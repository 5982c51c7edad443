//! lora-io: files in and out of lora-rs.
//!
//! - [`safetensors`]: memory-mapped safetensors files (f32, f16, bf16), validated on open;
//! - [`hf`]: Hugging Face model directories (`config.json`, single or sharded safetensors) into
//!   a [`lora_core::models::CausalLm`];
//! - [`peft`]: PEFT adapter configs, injection with PEFT's module-matching rules, adapter weights;
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate (pure Rust, no network);
//! - [`vision`]: image classifiers (ViT, ResNet) and their adapters (conv LoRA, trained heads).
//!
//! Every error names the file, and where it applies the tensor key or config field.
#![warn(missing_docs)]

pub mod adapters;
pub mod chat;
pub mod clip_tokenizer;
pub mod combine;
pub mod diffusion;
pub mod error;
pub mod files;
pub mod hf;
pub mod images;
pub mod inspect;
pub mod kohya;
pub mod llm_extract;
pub mod merge;
pub mod outdir;
pub mod peft;
pub mod safetensors;
pub mod sd;
pub mod sd_extract;
pub mod sd_lora;
pub mod sd_merge;
pub mod sd_single;
pub mod tokenizer;
pub mod vision;
pub mod write;

pub use error::{IoError, Result};
