//! Memory-mapped safetensors files. The header is validated when the file is opened (a header
//! length larger than the file, offsets past the end, overlapping or truncated data are all
//! errors naming the file). F32 tensors become frozen [`Tensor`]s that read the mapped bytes in
//! place (no copy; the map stays alive as long as any tensor uses it). F16/BF16 tensors are
//! read in place too, as 16-bit values: a linear layer's base products widen them block by block
//! (2 bytes per frozen weight in memory); anything else that reads them gets a widened f32 copy.

use crate::error::{io_err, IoError, Result};
use lora_core::{ExternalF32, ExternalHalf, HalfFormat, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Metadata of one stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
    tensors: HashMap<String, TensorMeta>,
    /// The free-form `__metadata__` map.
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        // Before opening: opening a FIFO blocks until someone writes to it.
        if !std::fs::metadata(&path).map_err(io_err(&path))?.is_file() {
            return Err(IoError::Safetensors {
                path,
                reason: "not a regular file (a device, pipe or directory)".into(),
            });
        }
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the map is read-only; a file changed underneath by another process could
        // change the bytes we read but not memory safety of the slice accesses, which are all
        // bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let bad = |reason: String| IoError::Safetensors {
            path: path.clone(),
            reason,
        };
        if mmap.len() < 8 {
            return Err(bad(format!(
                "file is {} bytes, shorter than the 8-byte header length",
                mmap.len()
            )));
        }
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if n > mmap.len() - 8 {
            return Err(bad(format!(
                "header length {n} is larger than the rest of the file ({} bytes)",
                mmap.len() - 8
            )));
        }
        // The safetensors crate refuses headers over 100 MB, but only after parsing them.
        if n > 100_000_000 {
            return Err(bad(format!(
                "header length {n} is over the 100 MB safetensors allows"
            )));
        }
        // JSON objects may repeat a key and parsers keep one silently: refuse such headers.
        let header = &mmap[8..8 + n];
        if let Err(e) = serde_json::from_slice::<UniqueKeys>(header) {
            return Err(bad(format!("header: {e}")));
        }
        // Full validation (JSON, offsets contiguous and inside the file, sizes match dtypes).
        let have = mmap.len() - 8 - n;
        let why = |e: safetensors::SafeTensorError| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => match data_end(header) {
                Some(need) if need > have => format!(
                    "the tensors need {need} bytes of data but the file holds {have} after \
                         its header: truncated (an interrupted download or copy?)"
                ),
                Some(need) => format!(
                    "{} bytes after the last tensor's data (the tensors need {need} of the \
                         {have} after the header)",
                    have - need
                ),
                None => e.to_string(),
            },
            other => other.to_string(),
        };
        if let Some(reason) = bad_tensor_entry(header) {
            return Err(bad(reason));
        }
        SafeTensors::deserialize(&mmap).map_err(|e| bad(why(e)))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(why(e)))?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| {
                (
                    k,
                    TensorMeta {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: info.data_offsets.0,
                        end: info.data_offsets.1,
                    },
                )
            })
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Self {
            path,
            mmap: Arc::new(mmap),
            data_start: 8 + n,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Metadata of `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&TensorMeta> {
        self.tensors.get(key)
    }

    /// The stored bytes of `key`, as they are in the file (little-endian, its dtype).
    pub fn raw_bytes(&self, key: &str) -> Result<&[u8]> {
        let m = self.meta(key).ok_or_else(|| IoError::MissingTensor {
            path: self.path.clone(),
            key: key.into(),
        })?;
        Ok(&self.mmap[self.data_start + m.start..self.data_start + m.end])
    }

    /// Reads `key` as f32 values.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let m = self.meta(key).ok_or_else(|| IoError::MissingTensor {
            path: self.path.clone(),
            key: key.into(),
        })?;
        // A shape the file declares (its data may be a sparse hole) is only allocated when the
        // machine can hold it as f32.
        let numel: u64 = m.shape.iter().map(|&d| d as u64).product();
        if let Some(avail) = crate::files::available_memory() {
            if numel.saturating_mul(4) > avail {
                return Err(IoError::Safetensors {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor `{key}` {:?} needs {} MiB as f32, more than the {} MiB available",
                        m.shape,
                        numel.saturating_mul(4) >> 20,
                        avail >> 20
                    ),
                });
            }
        }
        let bytes = &self.mmap[self.data_start + m.start..self.data_start + m.end];
        let values = match m.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(IoError::Dtype {
                    path: self.path.clone(),
                    key: key.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok((values, m.shape.clone()))
    }

    /// [`read_f32`](Self::read_f32) for values that must be finite (adapter weights): a NaN or
    /// infinity is an error naming the tensor and the index.
    pub fn read_f32_finite(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (v, shape) = self.read_f32(key)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(IoError::Config {
                path: self.path.clone(),
                field: key.into(),
                reason: format!("holds {} at index {i}: the file is damaged", v[i]),
            });
        }
        Ok((v, shape))
    }

    /// Reads `key` as a frozen tensor and checks its shape. F32, F16 and BF16 data are used in
    /// place (memory mapped) when aligned; otherwise they are converted into owned f32.
    pub fn tensor(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let m = self.meta(key).ok_or_else(|| IoError::MissingTensor {
            path: self.path.clone(),
            key: key.into(),
        })?;
        if m.shape != expected {
            return Err(IoError::TensorShape {
                path: self.path.clone(),
                key: key.into(),
                got: m.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        self.tensor_slice(key, 0, expected)
    }

    /// Elements `start .. start + expected.iter().product()` of `key` (row-major) as a frozen
    /// tensor of shape `expected`, in place like [`tensor`](Self::tensor): rows of a fused
    /// tensor (OpenCLIP's `in_proj_weight`), or a tensor stored with unit dimensions the model
    /// does not have (a 1x1 convolution read as a linear weight). The caller checks that the
    /// stored shape means what it asks for; a range past the stored elements is an error.
    pub fn tensor_slice(&self, key: &str, start: usize, expected: &[usize]) -> Result<Tensor> {
        let m = self.meta(key).ok_or_else(|| IoError::MissingTensor {
            path: self.path.clone(),
            key: key.into(),
        })?;
        let stored: usize = m.shape.iter().product();
        let count: usize = expected.iter().product();
        if start.checked_add(count).is_none_or(|end| end > stored) {
            return Err(IoError::TensorShape {
                path: self.path.clone(),
                key: key.into(),
                got: m.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let size = match m.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(IoError::Dtype {
                    path: self.path.clone(),
                    key: key.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let offset = self.data_start + m.start + start * size;
        let base = self.mmap.as_ptr() as usize + offset;
        if cfg!(target_endian = "little") && base % size == 0 {
            if m.dtype == Dtype::F32 {
                let mapped = MappedF32 {
                    map: self.mmap.clone(),
                    offset,
                    len: count,
                };
                return Ok(Tensor::from_external(Arc::new(mapped), expected)?);
            }
            let format = if m.dtype == Dtype::BF16 {
                HalfFormat::Bf16
            } else {
                HalfFormat::F16
            };
            let mapped = MappedHalf {
                map: self.mmap.clone(),
                offset,
                len: count,
                format,
            };
            return Ok(Tensor::from_external_half(Arc::new(mapped), expected)?);
        }
        let (v, _) = self.read_f32(key)?;
        Ok(Tensor::new(v[start..start + count].to_vec(), expected)?)
    }

    /// Reads an integer tensor (I64/I32) as i64 values (used for token-id fixtures).
    pub fn read_i64(&self, key: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let m = self.meta(key).ok_or_else(|| IoError::MissingTensor {
            path: self.path.clone(),
            key: key.into(),
        })?;
        let bytes = &self.mmap[self.data_start + m.start..self.data_start + m.end];
        let v = match m.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => {
                return Err(IoError::Dtype {
                    path: self.path.clone(),
                    key: key.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok((v, m.shape.clone()))
    }
}

/// A run of little-endian f32 values inside a memory map, checked aligned at construction.
struct MappedF32 {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl ExternalF32 for MappedF32 {
    fn as_f32(&self) -> &[f32] {
        // SAFETY: `offset..offset + 4 * len` lies inside the map (validated against the file's
        // length when it was opened), the start is 4-byte aligned (checked in `tensor`), every
        // bit pattern is a valid f32, the target is little-endian, and the map is read-only and
        // kept alive by the Arc for as long as this slice can be borrowed.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset) as *const f32, self.len)
        }
    }
}

/// A run of little-endian 16-bit floats inside a memory map, checked aligned at construction.
struct MappedHalf {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    format: HalfFormat,
}

impl ExternalHalf for MappedHalf {
    fn bits(&self) -> &[u16] {
        // SAFETY: as for `MappedF32`, with 2-byte alignment checked in `tensor`; every bit
        // pattern is a valid u16.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset) as *const u16, self.len)
        }
    }
    fn format(&self) -> HalfFormat {
        self.format
    }
}

/// Deserialises a JSON object only to check that no key repeats.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate tensor name `{k}`"
                        )));
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(V)
    }
}

/// The end of the last tensor's data per a safetensors header (`None` if it does not parse).
/// The first header entry whose dtype, shape and offsets do not fit together, named (the safetensors crate's own check says which fault, not which tensor).
fn bad_tensor_entry(header: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    for (name, t) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let size = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            // Other dtypes (sub-byte ones) are left to the safetensors crate.
            Some(_) => continue,
            None => return Some(format!("tensor `{name}`: no string `dtype`")),
        };
        let shape: Option<Vec<u64>> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let Some(shape) = shape else {
            return Some(format!("tensor `{name}`: `shape` is not a list of sizes"));
        };
        let offsets: Option<Vec<u64>> = t
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let (start, end) = match offsets.as_deref() {
            Some(&[a, b]) => (a, b),
            _ => {
                return Some(format!(
                    "tensor `{name}`: `data_offsets` is not two offsets"
                ))
            }
        };
        let bytes = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d));
        // (An end past the data is a truncated file: the caller's message says so.)
        if end < start {
            return Some(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] end before they start"
            ));
        }
        if bytes != Some(end - start) {
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {} bytes per value needs {} bytes, its \
                 data_offsets give {}",
                size,
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                end - start
            ));
        }
    }
    None
}

fn data_end(header: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    v.as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64().map(|x| x as usize))
        .try_fold(0usize, |m, e| e.map(|e| m.max(e)))
}
