//! The CUDA kernels' sources and their compilation.
//!
//! The `.cu` files in `lora-kernels/cuda/` are embedded in the binary and compiled by NVRTC for
//! the device's compute capability at first use (through cudarc, which loads `libnvrtc` and
//! `libcuda` at run time, so nothing CUDA is needed to build). Every kernel is the twin of a CPU
//! kernel in this crate: same name, outputs first, same argument order.
//!
//! Status: the sources, their NVRTC compilation (tested for sm_80 and sm_90 wherever libnvrtc
//! is found, GPU or not) and driver detection exist. Launching them from the training path, and
//! the GPU parity tests, are not built yet; `--device cuda` is refused until they are.

use std::fmt;

/// One embedded `.cu` source and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name in `lora-kernels/cuda/`.
    pub file: &'static str,
    /// The source text (without the shared prelude).
    pub code: &'static str,
    /// The `extern "C" __global__` entry points it defines.
    pub kernels: &'static [&'static str],
}

/// Prepended to every source: the dropout hash shared with [`crate::rng`].
pub const PRELUDE: &str = include_str!("../cuda/prelude.cuh");

/// Every kernel source.
pub const SOURCES: &[Source] = &[
    Source {
        file: "lora.cu",
        code: include_str!("../cuda/lora.cu"),
        kernels: &[
            "lora_shrink",
            "lora_expand",
            "lora_backward_g_db",
            "lora_reduce_partials",
            "lora_backward_da",
            "lora_backward_dx",
        ],
    },
    Source {
        file: "elementwise.cu",
        code: include_str!("../cuda/elementwise.cu"),
        kernels: &[
            "add_forward",
            "gelu_forward",
            "gelu_backward",
            "silu_forward",
            "silu_backward",
            "swiglu_forward",
            "swiglu_backward",
        ],
    },
    Source {
        file: "adamw.cu",
        code: include_str!("../cuda/adamw.cu"),
        kernels: &["adamw_step"],
    },
];

impl Source {
    /// The text NVRTC compiles: prelude + source.
    pub fn full_text(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.file, self.code)
    }
}

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

/// Whether `libnvrtc` can be loaded (searched as cudarc does: `LD_LIBRARY_PATH`, system paths).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library (`libcuda`) can be loaded. Check this before creating a
/// context: with no driver, cudarc panics on first use.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices that answer, 0 when there is no driver or no device.
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// Compiles `src` to PTX for `arch` (e.g. `"sm_90"`). Callers check [`nvrtc_available`] first.
pub fn compile_ptx(src: &Source, arch: &'static str) -> Result<String, CompileFailure> {
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
