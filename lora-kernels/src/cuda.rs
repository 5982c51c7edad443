//! The CUDA kernels' sources and their compilation.
//!
//! The `.cu` files in `lora-kernels/cuda/` are embedded in the binary and compiled by NVRTC for
//! the device's compute capability at first use (through cudarc, which loads `libnvrtc` and
//! `libcuda` at run time, so nothing CUDA is needed to build). Every kernel is the twin of a CPU
//! kernel in this crate: same name, outputs first, same argument order.
//!
//! Status: the sources, their NVRTC compilation (tested for sm_80 and sm_90 wherever libnvrtc
//! is found, GPU or not), driver detection, [`CudaDevice`] (the fused LoRA linear, attention,
//! launch helpers, and the device backend [`crate::accel::Accel`] in `cuda_accel.rs`, which the
//! training step runs on) and GPU parity tests exist; none has run on a GPU yet.

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
            "accumulate",
            "scale_in_place",
            "bias_add",
            "gelu_forward",
            "gelu_backward",
            "silu_forward",
            "silu_backward",
            "swiglu_forward",
            "swiglu_backward",
            "widen_bf16",
            "widen_f16",
            "narrow_forward",
            "narrow_backward",
        ],
    },
    Source {
        file: "rows.cu",
        code: include_str!("../cuda/rows.cu"),
        kernels: &[
            "layernorm_forward",
            "layernorm_backward",
            "layernorm_backward_params",
            "rmsnorm_forward",
            "rmsnorm_backward",
            "rmsnorm_backward_params",
            "embedding_forward",
            "embedding_backward",
            "rope_forward",
            "rope_backward",
            "cross_entropy_forward",
            "cross_entropy_backward",
            "sum_squares_many",
        ],
    },
    Source {
        file: "attention.cu",
        code: include_str!("../cuda/attention.cu"),
        kernels: &[
            "attention_forward",
            "attention_backward_delta",
            "attention_backward_dq",
            "attention_backward_dkv",
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

/// Whether `libnvrtc` can be loaded: by name as cudarc looks for it (`LD_LIBRARY_PATH`,
/// system paths), or from a toolkit or pip wheel folder ([`crate::cuda_libs::ensure`]).
pub fn nvrtc_available() -> bool {
    crate::cuda_libs::ensure(crate::cuda_libs::NVRTC).is_ok()
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
) -> Result<(String, bool), CompileFailure> {
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

use crate::lora_linear::WeightLayout;
use crate::ops::attention::AttnDims;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Any failure of the CUDA path, as text naming the step.
#[derive(Debug, Clone)]
pub struct CudaError(pub String);

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CUDA: {}", self.0)
    }
}

impl std::error::Error for CudaError {}

fn cerr<E: fmt::Debug>(what: &'static str) -> impl Fn(E) -> CudaError {
    move |e| CudaError(format!("{what}: {e:?}"))
}

/// A device with every kernel compiled for its compute capability, a stream and cuBLAS.
pub struct CudaDevice {
    /// The context.
    pub ctx: Arc<CudaContext>,
    /// The stream all work is queued on.
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// `sm_XY` the kernels were compiled for.
    pub arch: &'static str,
    /// Fill every output buffer with NaN before the kernels write it, so an element a kernel
    /// fails to write shows up (parity tests turn this on; off by default).
    pub poison: bool,
    /// Streaming multiprocessors: the rank-r kernels split their reductions so a small layer
    /// still gives every SM work ([`lora_split`]).
    pub sms: usize,
    tf32: std::sync::atomic::AtomicBool,
}

/// How many blocks per SM the split reductions of the LoRA kernels aim for.
const BLOCKS_PER_SM: usize = 2;
/// At most this many splits of one reduction (each split adds `n x r` partial values).
const MAX_SPLITS: usize = 32;

/// Splits a reduction over `extent` values (in whole `unit`s) into `(splits, chunk)` so that a
/// grid of `base` blocks per split reaches about [`BLOCKS_PER_SM`] blocks per SM: without it a
/// 512-token layer runs its rank-r kernels on 16 blocks of a 132-SM H200. `chunk` is a multiple
/// of `unit` and `splits = ceil(extent / chunk)`. The split (and so the rounding of the sums)
/// depends only on the shapes and the SM count: the same device gives the same bits every run.
pub fn lora_split(sms: usize, base: usize, extent: usize, unit: usize) -> (usize, usize) {
    let unit = unit.max(1);
    let units = extent.div_ceil(unit).max(1);
    let want = (BLOCKS_PER_SM * sms.max(1))
        .div_ceil(base.max(1))
        .clamp(1, MAX_SPLITS)
        .min(units);
    let chunk = units.div_ceil(want) * unit;
    (extent.div_ceil(chunk).max(1), chunk)
}

/// Gradients [`CudaDevice::lora_backward_into`] adds into; absent ones are not computed.
#[derive(Debug, Default)]
pub struct LoraGrads<'a> {
    /// `(n, k)`.
    pub dx: Option<&'a mut CudaSlice<f32>>,
    /// `(r, k)`.
    pub da: Option<&'a mut CudaSlice<f32>>,
    /// `(m, r)`.
    pub db: Option<&'a mut CudaSlice<f32>>,
    /// `(m)`.
    pub dbias: Option<&'a mut CudaSlice<f32>>,
}

/// LoRA linear dimensions and settings for the CUDA path (`n` tokens, `k` in, `m` out, `r` rank).
#[derive(Clone, Copy, Debug)]
pub struct LoraDims {
    /// Tokens.
    pub n: usize,
    /// In features.
    pub k: usize,
    /// Out features.
    pub m: usize,
    /// Rank (at most 64 on this path).
    pub r: usize,
    /// Scale `s`.
    pub scale: f32,
    /// Dropout probability on the adapter input (0 = none).
    pub p: f32,
    /// Dropout seed (the CPU kernel's `Dropout::seed`).
    pub seed: u64,
}

const THREADS: u32 = 256;
// lora.cu's tiles: rows, output columns, reduction chunk, rank chunk.
const TN: usize = 32;
const TC: usize = 64;
const TK: usize = 32;
const RC: usize = 64;

fn blocks(n: usize, t: usize) -> u32 {
    n.div_ceil(t) as u32
}

/// A launch of `(x, y)` blocks of [`THREADS`] threads, no dynamic shared memory (every kernel).
fn grid(x: u32, y: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Buffers come from the device's stream-ordered pool (`cuMemAllocAsync`); by default the pool
/// hands its free memory back to the driver at every synchronisation (each step reads its loss
/// back), so the next step's allocations map fresh memory again. A release threshold of
/// "never" keeps freed blocks for reuse, as PyTorch's caching allocator does. Best effort:
/// without pools (or if the driver refuses) allocation still works, only slower.
fn keep_pool_memory(ctx: &std::sync::Arc<CudaContext>) {
    use cudarc::driver::{result, sys};
    // SAFETY: the device handle comes from the live context; the attribute takes a u64.
    let _ = ctx.bind_to_thread();
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut keep = u64::MAX;
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            );
        }
    }
}

impl CudaDevice {
    /// Opens device `ordinal`: checks for the driver first (no panic without one), compiles every
    /// source with NVRTC for the device's compute capability (or reads the PTX from the on-disk
    /// cache, [`compile_ptx_cached`]) and loads the kernels.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError("no CUDA driver library (libcuda)".into()));
        }
        let count = device_count();
        if ordinal >= count {
            return Err(CudaError(format!(
                "cuda:{ordinal} requested, {count} device(s) found"
            )));
        }
        // Every library is found before cudarc first touches it (cudarc panics on a name
        // that does not resolve).
        for lib in [crate::cuda_libs::NVRTC, crate::cuda_libs::CUBLAS] {
            crate::cuda_libs::ensure(lib).map_err(|e| CudaError(e.to_string()))?;
        }
        let ctx = CudaContext::new(ordinal).map_err(cerr("creating the context"))?;
        // One stream does all the work, so cudarc's per-buffer events (two created with every
        // allocation, recorded on every use, to order work across streams) are pure cost.
        // SAFETY: no buffer exists yet, and this device never creates a second stream.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cerr("compute capability"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(cerr("cuBLAS"))?;
        let mut funcs = HashMap::new();
        for src in SOURCES {
            let (ptx, _) = compile_ptx_cached(src, arch).map_err(|e| CudaError(e.to_string()))?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(cerr("loading a module"))?;
            for k in src.kernels {
                let f = module.load_function(k).map_err(cerr("loading a kernel"))?;
                funcs.insert(*k, f);
            }
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cerr("SM count"))?
            .max(1) as usize;
        Ok(Self {
            ctx,
            stream,
            blas,
            funcs,
            arch,
            poison: false,
            sms,
            tf32: false.into(),
        })
    }

    /// Copies host data to the device.
    pub fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        self.stream.clone_htod(v).map_err(cerr("upload"))
    }

    /// Copies device data to the host (waits for the stream).
    pub fn download(&self, v: &CudaSlice<f32>) -> Result<Vec<f32>, CudaError> {
        self.stream.clone_dtoh(v).map_err(cerr("download"))
    }

    /// The f64 sum of squares of each buffer: one launch and one read-back for all of them
    /// (gradient clipping would otherwise wait on the device once per adapter tensor).
    pub fn sum_squares_many(&self, xs: &[&CudaSlice<f32>]) -> Result<Vec<f64>, CudaError> {
        use cudarc::driver::DevicePtr;
        if xs.is_empty() {
            return Ok(Vec::new());
        }
        // The guards keep each buffer's read ordered (a no-op on this single stream) until the
        // launch below is queued.
        let guards: Vec<_> = xs.iter().map(|x| x.device_ptr(&self.stream)).collect();
        let ptrs: Vec<u64> = guards.iter().map(|(p, _)| *p).collect();
        let lens: Vec<i64> = xs.iter().map(|x| x.len() as i64).collect();
        let ptrs_d = self.stream.clone_htod(&ptrs).map_err(cerr("upload"))?;
        let lens_d = self.stream.clone_htod(&lens).map_err(cerr("upload"))?;
        // SAFETY: every element is written by the kernel before it is read back.
        let mut out = unsafe { self.stream.alloc::<f64>(xs.len()) }.map_err(cerr("alloc"))?;
        let count = xs.len() as i32;
        let mut l = self.stream.launch_builder(self.func("sum_squares_many"));
        l.arg(&mut out).arg(&ptrs_d).arg(&lens_d).arg(&count);
        // SAFETY: argument types and order match rows.cu; each pointer addresses `lens[b]` f32
        // values of a live buffer borrowed for this call.
        unsafe { l.launch(grid(xs.len() as u32, 1)) }.map_err(cerr("sum_squares_many"))?;
        drop(guards);
        self.stream.clone_dtoh(&out).map_err(cerr("download"))
    }

    /// A device buffer filled with `value` (tests poison outputs with NaN this way).
    pub fn filled(&self, len: usize, value: f32) -> Result<CudaSlice<f32>, CudaError> {
        self.upload(&vec![value; len])
    }

    /// A buffer every element of which a kernel must write: NaN-poisoned when `poison` is set,
    /// else left uninitialised (no extra pass over memory; the parity tests, which poison,
    /// prove that every element is written).
    pub(crate) fn output(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        if self.poison {
            self.filled(len, f32::NAN)
        } else {
            // SAFETY: only handed to kernels that write every element before anything reads it.
            unsafe { self.stream.alloc::<f32>(len) }.map_err(cerr("alloc"))
        }
    }

    /// Waits until all queued work is done (benchmarks time with it).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(cerr("synchronize"))
    }

    /// The frozen base layer alone, forward: `y (n, m) = x W^T` by cuBLAS (`w` `(m, k)` for
    /// `OutIn`, `(k, m)` for `InOut`). The baseline the LoRA layer is benchmarked against.
    pub fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        (n, k, m): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>, CudaError> {
        let w_t = layout == WeightLayout::OutIn;
        self.base_gemm("linear_forward", x, w, (n, k, m), w_t)
    }

    /// The frozen base layer alone, input gradient: `dx (n, k) = dy W`.
    pub fn linear_backward_dx(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        (n, k, m): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>, CudaError> {
        let w_t = layout == WeightLayout::InOut;
        self.base_gemm("linear_backward_dx", dy, w, (n, m, k), w_t)
    }

    /// `dx (n, k) += dy W` in the one cuBLAS product (beta 1): a frozen layer's input gradient
    /// accumulated without a temporary or a second pass over `dx`.
    pub fn linear_backward_dx_accumulate(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        (n, k, m): (usize, usize, usize),
    ) -> Result<(), CudaError> {
        if dy.len() != n * m || w.len() != m * k || dx.len() != n * k {
            return Err(CudaError(format!(
                "linear_backward_dx_accumulate: dy {}, w {}, dx {} do not match n {n}, k {k}, m {m}",
                dy.len(),
                w.len(),
                dx.len()
            )));
        }
        let w_t = layout == WeightLayout::InOut;
        self.gemm_rowmajor(dx, dy, w, (n, m, k), w_t, true)
    }

    /// A new `(rows, cols)` buffer holding `input (rows, inner) op(w)` (see `gemm_rowmajor`),
    /// after checking both lengths.
    fn base_gemm(
        &self,
        what: &str,
        input: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        (rows, inner, cols): (usize, usize, usize),
        w_is_cols_by_inner: bool,
    ) -> Result<CudaSlice<f32>, CudaError> {
        if input.len() != rows * inner || w.len() != inner * cols {
            return Err(CudaError(format!(
                "{what}: input {} and w {} do not match ({rows} x {inner}) @ ({inner} x {cols})",
                input.len(),
                w.len()
            )));
        }
        let mut out = self.output(rows * cols)?;
        let dims = (rows, inner, cols);
        self.gemm_rowmajor(&mut out, input, w, dims, w_is_cols_by_inner, false)?;
        Ok(out)
    }

    /// TF32 tensor-core math for the cuBLAS products (`cublasSetMathMode`): see
    /// [`crate::accel::Accel::set_tf32`]. Off after [`CudaDevice::open`].
    pub fn set_tf32(&self, on: bool) -> Result<(), CudaError> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        let mode = if on {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle belongs to this device's live cuBLAS instance.
        let status = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(CudaError(format!("cublasSetMathMode: {status:?}")));
        }
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`CudaDevice::set_tf32`] turned TF32 on.
    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A loaded kernel by name (see [`SOURCES`]); panics on an unknown name.
    pub fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    /// Row-major `c (rows, cols) = x (rows, inner) op(w)` (`accumulate`: `+=`) for a base weight
    /// in `layout`: forward `x W^T` (`w_is_cols_by_inner` for `OutIn`), or backward `dy W`.
    fn gemm_rowmajor(
        &self,
        c: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        (rows, inner, cols): (usize, usize, usize),
        w_is_cols_by_inner: bool,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        // Column-major view: C^T (cols, rows) = op(W) (cols, inner) X^T (inner, rows).
        // W stored row-major (cols, inner) is column-major (inner, cols): transpose it.
        let (transa, lda) = if w_is_cols_by_inner {
            (cublasOperation_t::CUBLAS_OP_T, inner)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, cols)
        };
        let cfg = GemmConfig {
            transa,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: cols as i32,
            n: rows as i32,
            k: inner as i32,
            alpha: 1.0f32,
            lda: lda as i32,
            ldb: inner as i32,
            beta: if accumulate { 1.0f32 } else { 0.0f32 },
            ldc: cols as i32,
        };
        // SAFETY: the buffer sizes are checked by the callers against the dimensions.
        unsafe { self.blas.gemm(cfg, w, x, c) }.map_err(cerr("cuBLAS sgemm"))
    }

    /// Forward: `y = x W^T + bias + s drop(x) A^T B^T`, returning `(y, u)`. `w` is `(m, k)` for
    /// `OutIn` or `(k, m)` for `InOut`; `a` `(r, k)`; `b` `(m, r)`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        bias: Option<&CudaSlice<f32>>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>), CudaError> {
        check(d, x.len(), w.len(), a.len(), b.len())?;
        let mut y = self.linear_forward(x, w, layout, (d.n, d.k, d.m))?;
        let mut u = self.output(d.n * d.r)?;
        let (n, k, m, r) = (d.n as i32, d.k as i32, d.m as i32, d.r as i32);
        // u = drop(x) A^T, split over k when the row blocks alone would leave SMs idle.
        let base = blocks(d.n, TN) as usize * d.r.div_ceil(RC);
        let (splits, kc) = lora_split(self.sms, base, d.k, TK);
        let mut u_part = if splits > 1 {
            Some(self.output(splits * d.n * d.r)?)
        } else {
            None
        };
        let mut cfg = grid(blocks(d.n, TN), blocks(d.r, RC));
        cfg.grid_dim.2 = splits as u32;
        let kc_i = kc as i32;
        let mut l = self.stream.launch_builder(self.func("lora_shrink"));
        l.arg(u_part.as_mut().unwrap_or(&mut u))
            .arg(x)
            .arg(a)
            .arg(&n)
            .arg(&k)
            .arg(&r)
            .arg(&kc_i)
            .arg(&d.p)
            .arg(&d.seed);
        // SAFETY: argument types and order match lora.cu's signature; sizes checked above; the
        // output holds `splits` (n, r) slices.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_shrink"))?;
        if let Some(part) = &u_part {
            self.reduce(&mut u, part, splits, d.n * d.r, false)?;
        }
        let null = 0u64;
        let cfg = grid(blocks(d.n, TN), blocks(d.m, TC));
        let mut l = self.stream.launch_builder(self.func("lora_expand"));
        l.arg(&mut y).arg(&u).arg(b);
        match bias {
            Some(bb) => l.arg(bb),
            None => l.arg(&null),
        };
        l.arg(&n).arg(&m).arg(&r).arg(&d.scale);
        // SAFETY: as above.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_expand"))?;
        Ok((y, u))
    }

    /// Backward into fresh buffers: returns `(dx, dA, dB, dbias)` for the frozen base (no dW).
    /// [`CudaDevice::lora_backward_into`] on zeroed buffers (tests and one-off use; training
    /// accumulates into its gradients directly).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<[CudaSlice<f32>; 4], CudaError> {
        let zeros = |len: usize| self.stream.alloc_zeros::<f32>(len).map_err(cerr("alloc"));
        let (mut dx, mut da, mut db, mut dbias) = (
            zeros(d.n * d.k)?,
            zeros(d.r * d.k)?,
            zeros(d.m * d.r)?,
            zeros(d.m)?,
        );
        let grads = LoraGrads {
            dx: Some(&mut dx),
            da: Some(&mut da),
            db: Some(&mut db),
            dbias: Some(&mut dbias),
        };
        self.lora_backward_into(grads, dy, x, w, layout, a, b, u, d)?;
        Ok([dx, da, db, dbias])
    }

    /// Backward accumulated into the caller's gradients, computing only those asked for:
    /// `dx += dy W + drop'(g A)` (cuBLAS with beta 1 straight into `dx`, then the rank-r kernel
    /// in place: no temporary, no extra pass), `dA +=`, `dB +=` and `dbias +=` (the fixed-order
    /// reductions add into them). No `dx` (a first layer): neither product runs. No `dbias` (a
    /// frozen bias, the LoRA case): no column sums.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_into(
        &self,
        grads: LoraGrads<'_>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        d: LoraDims,
    ) -> Result<(), CudaError> {
        check(d, x.len(), w.len(), a.len(), b.len())?;
        if d.r > 64 {
            return Err(CudaError(format!(
                "rank {} > 64 is not supported by the fused CUDA backward yet",
                d.r
            )));
        }
        let LoraGrads {
            mut dx,
            da,
            db,
            dbias,
        } = grads;
        for (name, have, want) in [
            ("dy", Some(dy.len()), d.n * d.m),
            ("u", Some(u.len()), d.n * d.r),
            ("dx", dx.as_ref().map(|v| v.len()), d.n * d.k),
            ("dA", da.as_ref().map(|v| v.len()), d.r * d.k),
            ("dB", db.as_ref().map(|v| v.len()), d.m * d.r),
            ("dbias", dbias.as_ref().map(|v| v.len()), d.m),
        ] {
            if let Some(have) = have.filter(|&h| h != want) {
                return Err(CudaError(format!(
                    "lora_backward: {name} holds {have} values, expected {want}"
                )));
            }
        }
        let (n, k, m, r) = (d.n as i32, d.k as i32, d.m as i32, d.r as i32);
        let alloc = |len: usize| self.output(len);
        if let Some(dx) = dx.as_deref_mut() {
            // dx += dy W, in the product itself.
            self.linear_backward_dx_accumulate(dx, dy, w, layout, (d.n, d.k, d.m))?;
        }
        let need_g = dx.is_some() || da.is_some();
        if !need_g && db.is_none() && dbias.is_none() {
            return Ok(());
        }
        // g, dB and db partials in one pass over dy, split over m when the row blocks alone
        // would leave SMs idle (g then comes in `splits` partial sums). Partials nobody asked
        // for are not written (null pointers).
        let row_blocks = d.n.div_ceil(TN);
        let (splits, mc) = lora_split(self.sms, row_blocks, d.m, TC);
        let mut g = alloc(d.n * d.r)?;
        let mut g_part = if splits > 1 {
            Some(alloc(splits * d.n * d.r)?)
        } else {
            None
        };
        let mut db_b_part = db
            .is_some()
            .then(|| alloc(row_blocks * d.m * d.r))
            .transpose()?;
        let mut dbias_part = dbias
            .is_some()
            .then(|| alloc(row_blocks * d.m))
            .transpose()?;
        let null = 0u64;
        let cfg = grid(row_blocks as u32, splits as u32);
        let mc_i = mc as i32;
        let mut l = self.stream.launch_builder(self.func("lora_backward_g_db"));
        l.arg(g_part.as_mut().unwrap_or(&mut g));
        match db_b_part.as_mut() {
            Some(p) => l.arg(p),
            None => l.arg(&null),
        };
        match dbias_part.as_mut() {
            Some(p) => l.arg(p),
            None => l.arg(&null),
        };
        l.arg(dy)
            .arg(b)
            .arg(u)
            .arg(&n)
            .arg(&m)
            .arg(&r)
            .arg(&mc_i)
            .arg(&d.scale);
        // SAFETY: argument types and order match lora.cu; buffers sized for the grid; a null
        // partial pointer is skipped by the kernel.
        unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_g_db"))?;
        if let Some(part) = &g_part {
            self.reduce(&mut g, part, splits, d.n * d.r, false)?;
        }
        if let (Some(db), Some(part)) = (db, &db_b_part) {
            self.reduce(db, part, row_blocks, d.m * d.r, true)?;
        }
        if let (Some(dbias), Some(part)) = (dbias, &dbias_part) {
            self.reduce(dbias, part, row_blocks, d.m, true)?;
        }
        if let Some(d_a) = da {
            // dA partials over row segments (enough to fill the device), then the fixed-order
            // reduction into dA.
            let (segs, rows) = lora_split(self.sms, d.k.div_ceil(TC), d.n, TN);
            let rows_per_seg = rows as i32;
            let mut da_part = alloc(segs * d.r * d.k)?;
            let cfg = grid(blocks(d.k, TC), segs as u32);
            let mut l = self.stream.launch_builder(self.func("lora_backward_da"));
            l.arg(&mut da_part)
                .arg(&g)
                .arg(x)
                .arg(&n)
                .arg(&k)
                .arg(&r)
                .arg(&rows_per_seg)
                .arg(&d.p)
                .arg(&d.seed);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_da"))?;
            self.reduce(d_a, &da_part, segs, d.r * d.k, true)?;
        }
        if let Some(dx) = dx {
            // dx += drop'(g A), in place.
            let cfg = grid(blocks(d.n, TN), blocks(d.k, TC));
            let mut l = self.stream.launch_builder(self.func("lora_backward_dx"));
            l.arg(dx)
                .arg(&g)
                .arg(a)
                .arg(&n)
                .arg(&k)
                .arg(&r)
                .arg(&d.p)
                .arg(&d.seed);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(cerr("lora_backward_dx"))?;
        }
        Ok(())
    }

    /// `out (+)= the sum of the `parts` partials`, in a fixed order (`accumulate`: add into `out`).
    fn reduce(
        &self,
        out: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        parts: usize,
        len: usize,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let (parts, len_i, acc) = (parts as i32, len as i32, accumulate as i32);
        let cfg = grid(blocks(len, THREADS as usize), 1);
        let mut l = self
            .stream
            .launch_builder(self.func("lora_reduce_partials"));
        l.arg(out).arg(part).arg(&parts).arg(&len_i).arg(&acc);
        // SAFETY: argument types and order match lora.cu; `part` holds parts * len values.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(cerr("lora_reduce_partials"))
    }

    /// A 16-bit frozen weight (bf16 or f16 bits, `half = true` for f16) widened to f32 on the
    /// device: the twin of [`crate::lora_linear::WeightData::widen`].
    pub fn widen(&self, bits: &CudaSlice<u16>, f16: bool) -> Result<CudaSlice<f32>, CudaError> {
        let n = bits.len();
        let mut out = self.output(n)?;
        let name = if f16 { "widen_f16" } else { "widen_bf16" };
        let n_i = n as i64;
        let cfg = grid(blocks(n, THREADS as usize).clamp(1, 65535), 1);
        let mut l = self.stream.launch_builder(self.func(name));
        l.arg(&mut out).arg(bits).arg(&n_i);
        // SAFETY: argument types and order match elementwise.cu; out holds n values.
        unsafe { l.launch(cfg) }.map_err(cerr("widen"))?;
        Ok(out)
    }

    /// Columns `[start, start + len)` of the `(n, cols)` matrix `x` into `out` (`forward`), or
    /// `dx[:, start..start + len] += dout` (`!forward`): the twins of
    /// [`crate::ops::slice::narrow_forward`] / `narrow_backward`, outputs first.
    #[allow(clippy::too_many_arguments)]
    pub fn narrow(
        &self,
        forward: bool,
        out: &mut CudaSlice<f32>,
        input: &CudaSlice<f32>,
        n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<(), CudaError> {
        let (o_len, i_len) = if forward {
            (n * len, n * cols)
        } else {
            (n * cols, n * len)
        };
        if start + len > cols || out.len() != o_len || input.len() != i_len {
            return Err(CudaError(format!(
                "narrow: columns {start}..{} of {cols}, n {n}: buffers {} and {}",
                start + len,
                out.len(),
                input.len()
            )));
        }
        let name = if forward {
            "narrow_forward"
        } else {
            "narrow_backward"
        };
        let (n_i, c, s, l) = (n as i64, cols as i32, start as i32, len as i32);
        let cfg = grid(blocks(n * len, THREADS as usize).clamp(1, 65535), 1);
        let mut lb = self.stream.launch_builder(self.func(name));
        lb.arg(out).arg(input).arg(&n_i).arg(&c).arg(&s).arg(&l);
        // SAFETY: argument types and order match elementwise.cu; lengths checked above.
        unsafe { lb.launch(cfg) }.map_err(cerr("narrow"))?;
        Ok(())
    }

    /// Copies 16-bit host data to the device.
    pub fn upload_bits(&self, v: &[u16]) -> Result<CudaSlice<u16>, CudaError> {
        self.stream.clone_htod(v).map_err(cerr("upload"))
    }

    /// Causal GQA attention, the twin of [`crate::ops::attention::attention_forward`]: writes
    /// `out` `(B, T, Hq, D)` and the per-row log-sum-exp `lse` `(B, Hq, T)`. Head dims up to
    /// [`ATTN_MAX_HEAD_DIM`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), CudaError> {
        attn_check(d, &[out.len(), q.len()], &[k.len(), v.len()], lse.len())?;
        if d.seq == 0 {
            return Ok(());
        }
        let [t, hq, hkv, hd] = attn_ints(d);
        let mut l = self.stream.launch_builder(self.func("attention_forward"));
        l.arg(out).arg(lse).arg(q).arg(k).arg(v);
        l.arg(&t).arg(&hq).arg(&hkv).arg(&hd).arg(&scale);
        // SAFETY: argument types and order match attention.cu; lengths checked above.
        unsafe { l.launch(attn_grid(d, d.q_heads)) }.map_err(cerr("attention_forward"))?;
        Ok(())
    }

    /// Backward, the twin of [`crate::ops::attention::attention_backward`]: accumulates into
    /// `dq`, `dk`, `dv`. Three kernels: the row terms `delta_i = dO_i . O_i` (recomputing `O`),
    /// then `dq` per query row and `dk`, `dv` per key row (each written by one warp, in a fixed
    /// order: deterministic).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), CudaError> {
        attn_check(
            d,
            &[dq.len(), dout.len(), q.len()],
            &[dk.len(), dv.len(), k.len(), v.len()],
            lse.len(),
        )?;
        if d.seq == 0 {
            return Ok(());
        }
        let [t, hq, hkv, hd] = attn_ints(d);
        let mut delta = self.output(d.lse_len())?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_delta"));
        l.arg(&mut delta).arg(dout).arg(q).arg(k).arg(v);
        l.arg(&t).arg(&hq).arg(&hkv).arg(&hd).arg(&scale);
        // SAFETY: as in attention_forward; delta holds B * Hq * T values.
        unsafe { l.launch(attn_grid(d, d.q_heads)) }.map_err(cerr("attention_backward_delta"))?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_dq"));
        l.arg(dq)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(q)
            .arg(k)
            .arg(v);
        l.arg(&t).arg(&hq).arg(&hkv).arg(&hd).arg(&scale);
        // SAFETY: as above.
        unsafe { l.launch(attn_grid(d, d.q_heads)) }.map_err(cerr("attention_backward_dq"))?;
        let mut l = self
            .stream
            .launch_builder(self.func("attention_backward_dkv"));
        l.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(q)
            .arg(k)
            .arg(v);
        l.arg(&t).arg(&hq).arg(&hkv).arg(&hd).arg(&scale);
        // SAFETY: as above; this grid runs over kv heads.
        unsafe { l.launch(attn_grid(d, d.kv_heads)) }.map_err(cerr("attention_backward_dkv"))?;
        Ok(())
    }

    /// Runs an element-wise kernel of `elementwise.cu` / `adamw.cu` by name over `n` elements
    /// with the given buffers (outputs first) — the launch shape every such kernel shares.
    pub fn launch_elementwise(
        &self,
        name: &str,
        outs: &mut [&mut CudaSlice<f32>],
        ins: &[&CudaSlice<f32>],
        n: usize,
    ) -> Result<(), CudaError> {
        let n_i = n as i64;
        let cfg = grid(blocks(n, THREADS as usize).clamp(1, 65535), 1);
        let mut l = self.stream.launch_builder(self.func(name));
        for o in outs.iter_mut() {
            l.arg(&mut **o);
        }
        for i in ins {
            l.arg(*i);
        }
        l.arg(&n_i);
        // SAFETY: callers pass buffers in the kernel's order, each with at least n elements.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(cerr("element-wise kernel"))
    }
}

/// Largest head dimension the CUDA attention kernels take (`ATT_MAX_D` in attention.cu).
pub const ATTN_MAX_HEAD_DIM: usize = 128;
/// Query (or key) rows per block of the attention kernels (`ATT_BLOCK_ROWS`), 4 warps each.
const ATTN_BLOCK_ROWS: usize = 8;

fn attn_check(
    d: AttnDims,
    q_like: &[usize],
    kv_like: &[usize],
    lse: usize,
) -> Result<(), CudaError> {
    let q_len = d.batch * d.seq * d.q_heads * d.head_dim;
    let kv_len = d.batch * d.seq * d.kv_heads * d.head_dim;
    let ok = d.kv_heads > 0
        && d.q_heads % d.kv_heads == 0
        && q_like.iter().all(|&n| n == q_len)
        && kv_like.iter().all(|&n| n == kv_len)
        && lse == d.lse_len();
    if !ok {
        return Err(CudaError(format!(
            "attention shape mismatch for {d:?}: q-shaped {q_like:?} (want {q_len}), \
             kv-shaped {kv_like:?} (want {kv_len}), lse {lse} (want {})",
            d.lse_len()
        )));
    }
    if d.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(CudaError(format!(
            "head_dim {} > {ATTN_MAX_HEAD_DIM} is not supported by the CUDA attention kernels",
            d.head_dim
        )));
    }
    Ok(())
}

fn attn_ints(d: AttnDims) -> [i32; 4] {
    [d.seq, d.q_heads, d.kv_heads, d.head_dim].map(|v| v as i32)
}

/// `(ceil(T / 8), heads, B)` blocks of 128 threads.
fn attn_grid(d: AttnDims, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            d.seq.div_ceil(ATTN_BLOCK_ROWS) as u32,
            heads as u32,
            d.batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check(d: LoraDims, x: usize, w: usize, a: usize, b: usize) -> Result<(), CudaError> {
    let ok = x == d.n * d.k && w == d.k * d.m && a == d.r * d.k && b == d.m * d.r;
    if !ok || d.r == 0 {
        return Err(CudaError(format!(
            "shape mismatch for {d:?}: x {x}, w {w}, a {a}, b {b}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod split_tests {
    use super::lora_split;

    /// The splits cover the reduction exactly once in whole tiles, aim at two blocks per SM and
    /// stop at 32; a grid that already fills the device is not split. (scripts/cuda_emu/check.py
    /// mirrors this function; the first cases pin the values it must agree with.)
    #[test]
    fn splits_cover_the_reduction_and_fill_the_device() {
        assert_eq!(lora_split(132, 16, 4096, 64), (16, 256)); // 512 tokens, m = 4096
        assert_eq!(lora_split(132, 64, 768, 32), (5, 160)); // 2048 tokens, k = 768
        assert_eq!(lora_split(132, 300, 768, 32), (1, 768)); // already 300 blocks
        assert_eq!(lora_split(132, 1, 100_000, 64), (32, 3136)); // capped at 32
        assert_eq!(lora_split(132, 1, 5, 64), (1, 64)); // one tile: nothing to split
        for sms in [1, 7, 132] {
            for base in [1, 3, 16, 64, 1000] {
                for extent in [1, 31, 32, 33, 100, 768, 4096, 11008] {
                    for unit in [1, 32, 64] {
                        let (splits, chunk) = lora_split(sms, base, extent, unit);
                        assert!(chunk % unit == 0 && chunk > 0);
                        assert!(splits * chunk >= extent && (splits - 1) * chunk < extent);
                        assert!((1..=32).contains(&splits));
                        if base >= 2 * sms {
                            assert_eq!(splits, 1);
                        }
                    }
                }
            }
        }
    }
}
