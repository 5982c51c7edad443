//! The dense base products by cuBLAS (row-major over its column-major API).

use super::*;

impl CudaDevice {
    /// The frozen base layer alone, forward: `y (n, m) = x W^T` by cuBLAS (`w` `(m, k)` for
    /// `OutIn`, `(k, m)` for `InOut`). The baseline the LoRA layer is benchmarked against.
    pub fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        layout: WeightLayout,
        (n, k, m): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
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
    ) -> Result<CudaSlice<f32>> {
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
    ) -> Result<()> {
        if dy.len() != n * m || w.len() != m * k || dx.len() != n * k {
            return Err(KernelError::Device(format!(
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
    ) -> Result<CudaSlice<f32>> {
        if input.len() != rows * inner || w.len() != inner * cols {
            return Err(KernelError::Device(format!(
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
    ) -> Result<()> {
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
}
