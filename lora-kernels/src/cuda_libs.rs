//! Finding the CUDA libraries before cudarc touches them. cudarc loads `libnvrtc` and
//! `libcublas` by name on first use and panics when the name does not resolve; and people have
//! them in places the loader does not search: a toolkit under `CUDA_HOME`/`/usr/local/cuda`
//! without `LD_LIBRARY_PATH`, or only inside the pip wheels PyTorch installs (`nvidia-*-cu12`,
//! one folder per library; CUDA 13's `nvidia-*` wheels share `nvidia/cu13/lib`).
//!
//! [`ensure`] looks for a library as cudarc would (by name), then in those folders; one found
//! there is loaded by its full path with `RTLD_GLOBAL`, so that cudarc's later load by name
//! returns that same library (the dynamic loader matches an already-loaded library by its
//! soname). A library that is nowhere is an error naming it, where it looked and how to get it;
//! a library of another CUDA major version than this build's bindings is named as such.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The CUDA major version this build's bindings are for: cudarc's `cuda-12080` (the `cuda-12`
/// feature, the default) or `cuda-13000` (`cuda-13`).
#[cfg(not(feature = "cuda-13"))]
pub const CUDA_MAJOR: u32 = 12;
/// The CUDA major version this build's bindings are for: cudarc's `cuda-12080` (the `cuda-12`
/// feature, the default) or `cuda-13000` (`cuda-13`).
#[cfg(feature = "cuda-13")]
pub const CUDA_MAJOR: u32 = 13;
#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!("the features cuda-12 and cuda-13 exclude each other: build with --no-default-features --features cuda-13");

/// A CUDA library lora-rs loads at run time.
#[derive(Clone, Copy, Debug)]
pub struct CudaLib {
    /// The name after `lib` (`nvrtc`, `cublas`).
    pub name: &'static str,
    /// The CUDA 12 pip wheel's folder under `site-packages/nvidia/` (`cuda_nvrtc`, `cublas`);
    /// every CUDA 13 wheel uses `cu13` ([`CudaLib::wheel`]).
    pub wheel_12: &'static str,
    /// The CUDA 12 pip package that ships it (`nvidia-cublas-cu12`); CUDA 13's drops `-cu12`
    /// ([`CudaLib::package`]).
    pub package_12: &'static str,
    /// Libraries it loads by name itself, from the same folder (`nvrtc-builtins`, opened by
    /// NVRTC when it compiles; `cublasLt`, a dependency of cuBLAS): preloaded first when the
    /// library comes from a folder the loader does not search.
    pub companions: &'static [&'static str],
    /// cudarc's own check: whether one of the names it loads resolves.
    present: unsafe fn() -> bool,
}

/// NVRTC, which compiles the kernels.
pub const NVRTC: CudaLib = CudaLib {
    name: "nvrtc",
    wheel_12: "cuda_nvrtc",
    package_12: "nvidia-cuda-nvrtc-cu12",
    companions: &["nvrtc-builtins"],
    present: cudarc::nvrtc::sys::is_culib_present,
};

/// cuBLAS, which runs the dense products.
pub const CUBLAS: CudaLib = CudaLib {
    name: "cublas",
    wheel_12: "cublas",
    package_12: "nvidia-cublas-cu12",
    companions: &["cublasLt"],
    present: cudarc::cublas::sys::is_culib_present,
};

/// Why a library cannot be used.
#[derive(Clone, Debug)]
pub struct LibMissing {
    /// The library.
    pub lib: CudaLib,
    /// The folders searched besides the loader's own paths.
    pub searched: Vec<PathBuf>,
    /// Files of the library that exist but did not load (path, the loader's message).
    pub failed: Vec<(PathBuf, String)>,
    /// Files of another CUDA major version that were found (usable only by a build for it).
    pub other_major: Vec<PathBuf>,
}

impl std::fmt::Display for LibMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = format!("lib{}.so.{CUDA_MAJOR}", self.lib.name);
        write!(
            f,
            "{file} not found (searched LD_LIBRARY_PATH and the system paths"
        )?;
        if !self.searched.is_empty() {
            let s: Vec<String> = self
                .searched
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(f, ", then {}", s.join(", "))?;
        }
        write!(f, ")")?;
        for (p, why) in &self.failed {
            write!(f, "; {} is there but does not load: {why}", p.display())?;
        }
        if !self.other_major.is_empty() {
            let s: Vec<String> = self
                .other_major
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let other = if CUDA_MAJOR == 13 { 12 } else { 13 };
            let build = if other == 13 {
                "--no-default-features --features cuda-13"
            } else {
                "the default features (cuda-12)"
            };
            write!(
                f,
                "; found {} of another CUDA version, but this build's bindings are CUDA \
                 {CUDA_MAJOR}'s: a lora built with {build} uses CUDA {other}'s",
                s.join(", ")
            )?;
        }
        write!(
            f,
            ". Install the CUDA {CUDA_MAJOR} toolkit and set CUDA_HOME, or `pip install {}` \
             (found in the Python environment's site-packages/nvidia/{}/lib), or put the folder \
             holding {file} on LD_LIBRARY_PATH",
            self.lib.package(),
            self.lib.wheel()
        )
    }
}

impl std::error::Error for LibMissing {}

impl CudaLib {
    /// The pip wheel folder of this build's CUDA version.
    pub fn wheel(&self) -> &'static str {
        if CUDA_MAJOR == 13 {
            "cu13"
        } else {
            self.wheel_12
        }
    }
    /// The pip package of this build's CUDA version.
    pub fn package(&self) -> &'static str {
        if CUDA_MAJOR == 13 {
            self.package_12.trim_end_matches("-cu12")
        } else {
            self.package_12
        }
    }
    /// Whether cudarc will find it by name.
    fn loads(&self) -> bool {
        // SAFETY: cudarc's check only tries to load the library by its candidate names; these
        // are NVIDIA's CUDA libraries, which cudarc would load the same way.
        unsafe { (self.present)() }
    }
}

/// The folders people keep CUDA libraries in, beyond the loader's paths: the toolkit
/// (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`) and pip wheels in the active Python
/// environments (`VIRTUAL_ENV`, `CONDA_PREFIX`, the user's and the system's site-packages).
pub fn search_dirs(lib: CudaLib) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let root = PathBuf::from(v);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
            dirs.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    for root in ["/usr/local/cuda", "/opt/cuda"] {
        dirs.push(Path::new(root).join("lib64"));
        dirs.push(Path::new(root).join("targets/x86_64-linux/lib"));
    }
    let mut envs: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            envs.push(PathBuf::from(v).join("lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        envs.push(PathBuf::from(home).join(".local/lib"));
    }
    envs.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for e in envs {
        let Ok(rd) = std::fs::read_dir(&e) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = rd
            .filter_map(|d| d.ok())
            .filter(|d| d.file_name().to_string_lossy().starts_with("python3"))
            .map(|d| d.path())
            .collect();
        pythons.sort();
        for py in pythons {
            for sp in ["site-packages", "dist-packages"] {
                // Both majors' layouts: the other one's files are named as such in errors.
                for w in [lib.wheel_12, "cu13"] {
                    dirs.push(py.join(sp).join("nvidia").join(w).join("lib"));
                }
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Libraries loaded by full path, kept loaded for the life of the process.
static PRELOADED: Mutex<Vec<libloading::os::unix::Library>> = Mutex::new(Vec::new());

/// Loads `path` with `RTLD_GLOBAL` and keeps it loaded: a later load by its soname returns it.
fn preload(path: &Path) -> Result<(), String> {
    // SAFETY: as for `CudaLib::loads`: NVIDIA's CUDA libraries, which cudarc would load too.
    let loaded = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    };
    let l = loaded.map_err(|e| e.to_string())?;
    PRELOADED.lock().unwrap_or_else(|e| e.into_inner()).push(l);
    Ok(())
}

/// The files in `dir` named `lib<name>.so.<CUDA_MAJOR>[.minor...]`, sorted.
fn versioned(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("lib{name}.so.{CUDA_MAJOR}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|f| {
        let n = f.file_name().map(|n| n.to_string_lossy().to_string());
        n.is_some_and(|n| n == prefix || n.starts_with(&format!("{prefix}.")))
    });
    files.sort();
    files
}

/// Makes `lib` loadable by the name cudarc uses, or says why it cannot be.
pub fn ensure(lib: CudaLib) -> Result<(), Box<LibMissing>> {
    if lib.loads() {
        return Ok(());
    }
    let searched = search_dirs(lib);
    let mut failed = Vec::new();
    let mut other_major = Vec::new();
    let wanted = format!("lib{}.so.{CUDA_MAJOR}", lib.name);
    for dir in &searched {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let Some(name) = f.file_name().map(|n| n.to_string_lossy().to_string()) else {
                continue;
            };
            let Some(version) = name.strip_prefix(&format!("lib{}.so.", lib.name)) else {
                continue;
            };
            if version.split('.').next() != Some(&CUDA_MAJOR.to_string()) {
                other_major.push(f);
                continue;
            }
            // Its companions from the same folder first: the library opens them by name, which
            // the loader would not find there. One that does not load is reported with it.
            let mut companion_failed = None;
            for c in lib.companions {
                let files = versioned(dir, c);
                if !files.is_empty() && !files.iter().any(|c| preload(c).is_ok()) {
                    companion_failed =
                        Some(format!("lib{c}.so.{CUDA_MAJOR} beside it does not load"));
                }
            }
            match preload(&f) {
                Ok(()) => {
                    if lib.loads() {
                        return Ok(());
                    }
                    failed.push((f, format!("loaded, but its soname is not {wanted}")));
                }
                Err(e) => {
                    let why = match &companion_failed {
                        Some(c) => format!("{e} ({c})"),
                        None => e,
                    };
                    failed.push((f, why))
                }
            }
        }
    }
    Err(Box::new(LibMissing {
        lib,
        searched,
        failed,
        other_major,
    }))
}
