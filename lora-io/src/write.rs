//! Writing files safely: every file is written to a temporary name in the same directory,
//! fsynced, then renamed over the target (and the directory fsynced), so a crash leaves either
//! the old file or the new one, never half of one. Safetensors are written from f32 data in
//! the dtype asked for.

use crate::error::{io_err, IoError, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Storage dtype of a written tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl OutDtype {
    /// From a safetensors dtype (others are not float weights).
    pub fn from_dtype(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// Parses `f32`, `f16`, `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    /// transformers' name (`torch_dtype` / `dtype` in config.json).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Self::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| IoError::Missing {
        path: path.into(),
        what: "file name",
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all(); // not supported on every filesystem; the rename is what matters
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One tensor to write: name, shape, values, storage dtype.
pub struct OutTensor<'a> {
    /// Key.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values (f32; converted to `dtype`).
    pub values: &'a [f32],
    /// Storage dtype.
    pub dtype: OutDtype,
}

/// Serialises tensors (sorted by name, as safetensors does) with `metadata`, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    // The safetensors crate panics on a repeated name: refuse it here.
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(IoError::Safetensors {
            path: path.into(),
            reason: format!("tensor `{}` would be written twice", w[0]),
        });
    }
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype.dtype(),
                t.shape.clone(),
                t.dtype.encode(t.values),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, d, s, b)| {
            let v = TensorView::new(*d, s.clone(), b).map_err(|e| IoError::Safetensors {
                path: path.into(),
                reason: format!("{n}: {e:?}"),
            })?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    let bytes = safetensors::serialize(views, meta).map_err(|e| IoError::Safetensors {
        path: path.into(),
        reason: format!("{e:?}"),
    })?;
    write_atomic(path, &bytes)
}
