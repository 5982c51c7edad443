//! Finding and opening a device; memory, the stream and the math mode.

use super::*;

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
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(KernelError::Device(
                "no CUDA driver library (libcuda)".into(),
            ));
        }
        let count = device_count();
        if ordinal >= count {
            return Err(KernelError::Device(format!(
                "cuda:{ordinal} requested, {count} device(s) found"
            )));
        }
        // Every library is found before cudarc first touches it (cudarc panics on a name
        // that does not resolve).
        for lib in [crate::cuda_libs::NVRTC, crate::cuda_libs::CUBLAS] {
            crate::cuda_libs::ensure(lib).map_err(|e| KernelError::Device(e.to_string()))?;
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
            let (ptx, _) =
                compile_ptx_cached(src, arch).map_err(|e| KernelError::Device(e.to_string()))?;
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
    pub fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(v).map_err(cerr("upload"))
    }

    /// Copies device data to the host (waits for the stream).
    pub fn download(&self, v: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(v).map_err(cerr("download"))
    }

    /// Copies 16-bit device data to the host.
    pub fn download_bits(&self, v: &CudaSlice<u16>) -> Result<Vec<u16>> {
        self.stream.clone_dtoh(v).map_err(cerr("download"))
    }

    /// Copies 16-bit host data to the device.
    pub fn upload_bits(&self, v: &[u16]) -> Result<CudaSlice<u16>> {
        self.stream.clone_htod(v).map_err(cerr("upload"))
    }

    /// A device buffer filled with `value` (tests poison outputs with NaN this way).
    pub fn filled(&self, len: usize, value: f32) -> Result<CudaSlice<f32>> {
        self.upload(&vec![value; len])
    }

    /// A buffer every element of which a kernel must write: NaN-poisoned when `poison` is set,
    /// else left uninitialised (no extra pass over memory; the parity tests, which poison,
    /// prove that every element is written).
    pub(crate) fn output(&self, len: usize) -> Result<CudaSlice<f32>> {
        if self.poison {
            self.filled(len, f32::NAN)
        } else {
            // SAFETY: only handed to kernels that write every element before anything reads it.
            unsafe { self.stream.alloc::<f32>(len) }.map_err(cerr("alloc"))
        }
    }

    /// Waits until all queued work is done (benchmarks time with it).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cerr("synchronize"))
    }

    /// TF32 tensor-core math for the cuBLAS products (`cublasSetMathMode`): see
    /// [`crate::accel::Accel::set_tf32`]. Off after [`CudaDevice::open`].
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        let mode = if on {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle belongs to this device's live cuBLAS instance.
        let status = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KernelError::Device(format!(
                "cublasSetMathMode: {status:?}"
            )));
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
}
