//! Reading the small files a model, adapter or run directory holds (JSON configs, tokenizers,
//! templates, TOML): only regular files (a FIFO would block the open for ever, a device never
//! ends), and only up to a size that no real file of the kind reaches, checked before a byte is
//! read. Also the memory a process may still allocate, for checks of sizes a file declares.

use crate::error::{io_err, IoError, Result};
use std::path::Path;

/// The most a config, tokenizer or template file may hold (the largest real `tokenizer.json`
/// files are tens of megabytes).
pub const MAX_TEXT_FILE: u64 = 512 << 20;

/// Checks that `path` is a regular file of at most `max` bytes, without opening it; `what` says
/// what it is for in errors. A missing file is `Ok(false)`.
pub fn check_regular(path: &Path, max: u64, what: &'static str) -> Result<bool> {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !m.is_file() {
        return Err(IoError::Config {
            path: path.into(),
            field: "(file)".into(),
            reason: format!("{what}: not a regular file (a directory, device or pipe)"),
        });
    }
    if m.len() > max {
        return Err(IoError::Config {
            path: path.into(),
            field: "(file)".into(),
            reason: format!(
                "{what}: {} bytes, more than any such file holds ({max})",
                m.len()
            ),
        });
    }
    Ok(true)
}

/// Reads a regular file of at most [`MAX_TEXT_FILE`] bytes ([`check_regular`] first);
/// `None` when it does not exist.
pub fn read_small(path: &Path, what: &'static str) -> Result<Option<Vec<u8>>> {
    if !check_regular(path, MAX_TEXT_FILE, what)? {
        return Ok(None);
    }
    std::fs::read(path).map(Some).map_err(io_err(path))
}

/// The memory this process may still allocate (`MemAvailable`), or `None` where it cannot be
/// read.
pub fn available_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}
