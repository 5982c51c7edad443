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

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The safetensors dtype name (`F32`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// `v` as this dtype's little-endian bytes.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
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
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `fill` writes, for files too large to hold in memory at once.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
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
        let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w).map_err(io_err(&tmp))?;
        let f = w.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
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

impl From<OutDtype> for Dtype {
    fn from(d: OutDtype) -> Dtype {
        d.dtype()
    }
}

/// A tensor of a streamed safetensors file: its name, storage dtype (any safetensors dtype: a
/// file's integer buffers pass through as they are) and shape.
pub struct StreamedTensor {
    /// Key.
    pub name: String,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Writes a safetensors file tensor by tensor (atomically): the header from `tensors`' names,
/// dtypes and shapes (sorted by name, padded to 8 bytes as safetensors pads it), then
/// `bytes_of(i)` for each tensor in that order, so only one tensor's bytes are in memory at a
/// time. A tensor whose bytes do not have the length its shape and dtype give is an error.
pub fn write_safetensors_streamed(
    path: &Path,
    tensors: &[StreamedTensor],
    metadata: HashMap<String, String>,
    mut bytes_of: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    if let Some(w) = order
        .windows(2)
        .find(|w| tensors[w[0]].name == tensors[w[1]].name)
    {
        return Err(IoError::Safetensors {
            path: path.into(),
            reason: format!("tensor `{}` would be written twice", tensors[w[0]].name),
        });
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let mut m: Vec<_> = metadata.into_iter().collect();
        m.sort();
        header.insert(
            "__metadata__".into(),
            serde_json::Value::Object(m.into_iter().map(|(k, v)| (k, v.into())).collect()),
        );
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(order.len());
    for &i in &order {
        let t = &tensors[i];
        let bits = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize(), |a, &d| a.checked_mul(d))
            .filter(|b| b % 8 == 0)
            .ok_or_else(|| IoError::Safetensors {
                path: path.into(),
                reason: format!(
                    "tensor `{}`: shape {:?} overflows or is not whole bytes",
                    t.name, t.shape
                ),
            })?;
        let n = bits / 8;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.to_string(), "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        sizes.push(n);
        offset += n;
    }
    let mut h = serde_json::to_string(&serde_json::Value::Object(header)).expect("serialises");
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut failure: Option<IoError> = None;
    let r = write_atomic_with(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(h.as_bytes())?;
        for (&i, &n) in order.iter().zip(&sizes) {
            match bytes_of(i) {
                Ok(b) if b.len() == n => w.write_all(&b)?,
                Ok(b) => {
                    failure = Some(IoError::Safetensors {
                        path: path.into(),
                        reason: format!(
                            "tensor `{}`: {} bytes for a shape that needs {n}",
                            tensors[i].name,
                            b.len()
                        ),
                    });
                    return Err(std::io::Error::other("tensor of the wrong size"));
                }
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("reading a tensor failed"));
                }
            }
        }
        Ok(())
    });
    match (r, failure) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
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

/// Puts the `__metadata__` entries of a serialised file in key order. The safetensors crate
/// writes them in its hash map's order, which changes from run to run, so the same tensors
/// and metadata gave different bytes; the sorted object has the same length, so it replaces
/// the written one in place (the header's length and the offsets stay). Left as is unless the
/// header begins with exactly that object holding exactly `sorted`.
fn sort_metadata(bytes: &mut [u8], sorted: &std::collections::BTreeMap<String, String>) {
    if sorted.len() < 2 {
        return;
    }
    const LEAD: &[u8] = br#"{"__metadata__":"#;
    let want = serde_json::to_string(sorted).expect("a string map serialises");
    let (start, end) = (8 + LEAD.len(), 8 + LEAD.len() + want.len());
    if bytes.len() < end || &bytes[8..start] != LEAD {
        return;
    }
    let same =
        serde_json::from_slice::<std::collections::BTreeMap<String, String>>(&bytes[start..end])
            .is_ok_and(|got| got == *sorted);
    if same {
        bytes[start..end].copy_from_slice(want.as_bytes());
    }
}

/// Serialises tensors (sorted by name, as safetensors does) with `metadata` (in key order),
/// atomically: the same tensors and metadata always give the same bytes.
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
    let sorted: std::collections::BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    let mut bytes = safetensors::serialize(views, meta).map_err(|e| IoError::Safetensors {
        path: path.into(),
        reason: format!("{e:?}"),
    })?;
    sort_metadata(&mut bytes, &sorted);
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("lora-write-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values = [1.0f32, -2.0, 3.5];
        let tensors = [OutTensor {
            name: "w".into(),
            shape: vec![3],
            values: &values,
            dtype: OutDtype::F32,
        }];
        let mut files = Vec::new();
        for i in 0..6 {
            // A fresh map each time: its iteration order is drawn anew.
            let meta: HashMap<String, String> = (0..9)
                .map(|k| (format!("key{k}"), format!("value \"{k}\"")))
                .collect();
            let p = dir.join(format!("{i}.safetensors"));
            write_safetensors(&p, &tensors, meta).unwrap();
            files.push(std::fs::read(&p).unwrap());
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        // Still a valid file with every entry.
        let f = crate::safetensors::SafetensorsFile::open(dir.join("0.safetensors")).unwrap();
        assert_eq!(f.read_f32("w").unwrap().0, values);
        let text = String::from_utf8_lossy(&files[0]);
        let keys: Vec<usize> = (0..9)
            .map(|k| text.find(&format!("key{k}")).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
