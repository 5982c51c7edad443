//! Helpers shared by the examples (the examples themselves are `own_mlp.rs`, `hf_generate.rs`
//! and `merge_adapters.rs` beside this file).
#![warn(missing_docs)]

use std::path::PathBuf;

/// The repository root (where `demo/` and `fixtures/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/ sits in the repository")
        .to_path_buf()
}
