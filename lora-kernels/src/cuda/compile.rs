//! NVRTC compilation of the sources, and the on-disk PTX cache.

use super::*;

/// Why a source did not compile, with NVRTC's log.
#[derive(Debug, Clone)]
pub struct CompileFailure {
    /// The `.cu` file.
    pub file: &'static str,
    /// Target architecture.
    pub arch: &'static str,
    /// NVRTC's message and log.
    pub log: String,
}

impl fmt::Display for CompileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NVRTC could not compile {} for {}: {}",
            self.file, self.arch, self.log
        )
    }
}

impl std::error::Error for CompileFailure {}

/// Whether `libnvrtc` can be loaded: by name as cudarc looks for it (`LD_LIBRARY_PATH`,
/// system paths), or from a toolkit or pip wheel folder ([`crate::cuda_libs::ensure`]).
pub fn nvrtc_available() -> bool {
    crate::cuda_libs::ensure(crate::cuda_libs::NVRTC).is_ok()
}

/// Compiles `src` to PTX for `arch` (e.g. `"sm_90"`). Callers check [`nvrtc_available`] first.
pub fn compile_ptx(
    src: &Source,
    arch: &'static str,
) -> std::result::Result<String, CompileFailure> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(src.file.to_string()),
        // Bit-compatible with the CPU kernels: no flush-to-zero, IEEE division and sqrt.
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src.full_text(), opts)
        .map(|ptx| ptx.to_src().to_string())
        .map_err(|e| CompileFailure {
            file: src.file,
            arch,
            log: format!("{e:?}"),
        })
}

/// NVRTC's version, `(major, minor)`. Callers check [`nvrtc_available`] first.
fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers; the library is present (checked by callers).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// Where compiled PTX is kept between runs: `$LORA_CACHE_DIR`, else `$XDG_CACHE_HOME/lora-rs/ptx`,
/// else `~/.cache/lora-rs/ptx`; `None` when none can be named.
pub fn ptx_cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("LORA_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lora-rs").join("ptx"))
}

/// FNV-1a, 64 bits: a cache key stable across builds and Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3); // part separator
    }
    h
}

/// [`compile_ptx`] through an on-disk cache ([`ptx_cache_dir`]), keyed by the source text, the
/// architecture, the compile options and NVRTC's version: a second run (or a second process)
/// skips NVRTC. The cache is best effort: an unreadable or unwritable directory just means
/// compiling; entries are written to a temporary file and renamed, so a reader never sees half
/// a file. Returns the PTX and whether it came from the cache.
pub fn compile_ptx_cached(
    src: &Source,
    arch: &'static str,
) -> std::result::Result<(String, bool), CompileFailure> {
    let Some(dir) = ptx_cache_dir() else {
        return compile_ptx(src, arch).map(|p| (p, false));
    };
    let (major, minor) = nvrtc_version();
    let version = format!("nvrtc {major}.{minor}; {COMPILE_FLAGS}");
    let key = fnv1a(&[
        src.full_text().as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
    ]);
    let path = dir.join(format!("{}-{arch}-{key:016x}.ptx", src.file));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if ptx.contains(".entry") {
            return Ok((ptx, true));
        }
    }
    let ptx = compile_ptx(src, arch)?;
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{key:016x}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((ptx, false))
}

/// The NVRTC options of [`compile_ptx`], as text for the cache key.
const COMPILE_FLAGS: &str = "ftz=false prec_div=true prec_sqrt=true";
