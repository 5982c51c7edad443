//! `rows.cu`: per-buffer reductions (the sums of squares gradient clipping reads).

use super::*;

impl CudaDevice {
    /// The f64 sum of squares of each buffer: one launch and one read-back for all of them
    /// (gradient clipping would otherwise wait on the device once per adapter tensor).
    pub fn sum_squares_many(&self, xs: &[&CudaSlice<f32>]) -> Result<Vec<f64>> {
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
}
