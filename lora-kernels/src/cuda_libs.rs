//! Finding the CUDA libraries before cudarc touches them. cudarc loads `libnvrtc` and
//! `libcublas` by name on first use and panics when the name does not resolve; and people have
//! them in places the loader does not search: a toolkit under `CUDA_HOME`/`/usr/local/cuda`
//! without `LD_LIBRARY_PATH`, or only inside the `nvidia-*-cu12` pip wheels PyTorch installs.
//!
//! [`ensure`] looks for a library as cudarc would (by name), then in those folders; one found
//! there is loaded by its full path with `RTLD_GLOBAL`, so that cudarc's later load by name
//! returns that same library (the dynamic loader matches an already-loaded library by its
//! soname). A library that is nowhere is an error naming it, where it looked and how to get it;
//! a library of another CUDA major version than this build's bindings is named as such.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The CUDA major version this build's bindings are for (cudarc's `cuda-12080` feature).
pub const CUDA_MAJOR: u32 = 12;

/// A CUDA library lora-rs loads at run time.
#[derive(Clone, Copy, Debug)]
pub struct CudaLib {
    /// The name after `lib` (`nvrtc`, `cublas`).
    pub name: &'static str,
    /// The pip wheel's folder under `site-packages/nvidia/` (`cuda_nvrtc`, `cublas`).
    pub wheel: &'static str,
    /// The pip package that ships it.
    pub package: &'static str,
    /// cudarc's own check: whether one of the names it loads resolves.
    present: unsafe fn() -> bool,
}

/// NVRTC, which compiles the kernels.
pub const NVRTC: CudaLib = CudaLib {
    name: "nvrtc",
    wheel: "cuda_nvrtc",
    package: "nvidia-cuda-nvrtc-cu12",
    present: cudarc::nvrtc::sys::is_culib_present,
};

/// cuBLAS, which runs the dense products.
pub const CUBLAS: CudaLib = CudaLib {
    name: "cublas",
    wheel: "cublas",
    package: "nvidia-cublas-cu12",
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
            write!(
                f,
                "; found {} of another CUDA version, but this build uses CUDA {CUDA_MAJOR}'s \
                 (a newer driver runs CUDA {CUDA_MAJOR} libraries)",
                s.join(", ")
            )?;
        }
        write!(
            f,
            ". Install the CUDA {CUDA_MAJOR} toolkit and set CUDA_HOME, or `pip install {}` \
             (found in the Python environment's site-packages/nvidia/{}/lib), or put the folder \
             holding {file} on LD_LIBRARY_PATH",
            self.lib.package, self.lib.wheel
        )
    }
}

impl std::error::Error for LibMissing {}

impl CudaLib {
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
                dirs.push(py.join(sp).join("nvidia").join(lib.wheel).join("lib"));
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Libraries loaded by full path, kept loaded for the life of the process.
static PRELOADED: Mutex<Vec<libloading::os::unix::Library>> = Mutex::new(Vec::new());

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
            // SAFETY: as for `CudaLib::loads`; RTLD_GLOBAL makes the library the one a later
            // load by its soname returns.
            let loaded = unsafe {
                libloading::os::unix::Library::open(
                    Some(&f),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            match loaded {
                Ok(l) => {
                    PRELOADED.lock().unwrap_or_else(|e| e.into_inner()).push(l);
                    if lib.loads() {
                        return Ok(());
                    }
                    failed.push((f, format!("loaded, but its soname is not {wanted}")));
                }
                Err(e) => failed.push((f, e.to_string())),
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
