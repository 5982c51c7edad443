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

    /// `dW += dy^T x` (`OutIn`, `(m, k)`) or `x^T dy` (`InOut`, `(k, m)`): a trainable base
    /// weight's gradient, accumulated in the cuBLAS product itself (beta 1).
    pub fn linear_backward_dw_accumulate(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        layout: WeightLayout,
        (n, k, m): (usize, usize, usize),
    ) -> Result<()> {
        if dy.len() != n * m || x.len() != n * k || dw.len() != m * k {
            return Err(KernelError::Device(format!(
                "linear_backward_dw_accumulate: dy {}, x {}, dw {} do not match n {n}, k {k}, m {m}",
                dy.len(),
                x.len(),
                dw.len()
            )));
        }
        match layout {
            // (m, k) = dy^T (m, n) x (n, k)
            WeightLayout::OutIn => self.gemm_rm(dw, (dy, true), (x, false), (m, n, k), true),
            // (k, m) = x^T (k, n) dy (n, m)
            WeightLayout::InOut => self.gemm_rm(dw, (x, true), (dy, false), (k, n, m), true),
        }
    }

    /// `dbias (m) += the column sums of dy (n, m)`, as the product `ones (1, n) dy` (cuBLAS:
    /// the same order every run).
    pub fn column_sums_accumulate(
        &self,
        dbias: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        (n, m): (usize, usize),
    ) -> Result<()> {
        if dy.len() != n * m || dbias.len() != m {
            return Err(KernelError::Device(format!(
                "column_sums_accumulate: dy {}, dbias {} do not match n {n}, m {m}",
                dy.len(),
                dbias.len()
            )));
        }
        let ones = self.upload(&vec![1.0f32; n])?;
        self.gemm_rm(dbias, (&ones, false), (dy, false), (1, n, m), true)
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
        let dims = (rows, inner, cols);
        self.gemm_rm(c, (x, false), (w, w_is_cols_by_inner), dims, accumulate)
    }

    /// Row-major `c (rows, cols) (+)= op(x) (rows, inner) op(w) (inner, cols)`, each operand
    /// with whether it is stored transposed (`x` as `(inner, rows)`, `w` as `(cols, inner)`).
    fn gemm_rm(
        &self,
        c: &mut CudaSlice<f32>,
        (x, x_t): (&CudaSlice<f32>, bool),
        (w, w_t): (&CudaSlice<f32>, bool),
        dims: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let cfg = rowmajor_config(x_t, w_t, dims, accumulate);
        // SAFETY: the buffer sizes are checked by the callers against the dimensions.
        unsafe { self.blas.gemm(cfg, w, x, c) }.map_err(cerr("cuBLAS sgemm"))
    }
}

impl CudaDevice {
    /// [`CudaDevice::gemm_rm`] over `batch` products whose operands and outputs lie `strides`
    /// `(x, w, c)` elements apart (a stride of 0 reuses one operand), on buffers or views. The
    /// callers check that every product's elements lie inside its buffer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_rm_batched<X, W, C>(
        &self,
        c: &mut C,
        (x, x_t): (&X, bool),
        (w, w_t): (&W, bool),
        dims: (usize, usize, usize),
        accumulate: bool,
        batch: usize,
        (sx, sw, sc): (usize, usize, usize),
    ) -> Result<()>
    where
        X: cudarc::driver::DevicePtr<f32>,
        W: cudarc::driver::DevicePtr<f32>,
        C: cudarc::driver::DevicePtrMut<f32>,
    {
        let cfg = cudarc::cublas::StridedBatchedConfig {
            gemm: rowmajor_config(x_t, w_t, dims, accumulate),
            batch_size: batch as i32,
            stride_a: sw as i64,
            stride_b: sx as i64,
            stride_c: sc as i64,
        };
        // SAFETY: the callers check the buffer sizes against the dimensions and strides.
        unsafe { self.blas.gemm_strided_batched(cfg, w, x, c) }
            .map_err(cerr("cuBLAS sgemm (strided batched)"))
    }
}

/// The cuBLAS (column-major) call computing the row-major `c (rows, cols) (+)= op(x) op(w)` of
/// [`CudaDevice::gemm_rm`], with `w` as cuBLAS's A and `x` as its B. A row-major matrix is its
/// transpose column-major, so the call computes `C^T (cols, rows) = op(W)^T op(X)^T`: `w`
/// stored `(inner, cols)` is `op(W)^T` as it lies, stored `(cols, inner)` cuBLAS transposes it;
/// likewise `x`.
fn rowmajor_config(
    x_t: bool,
    w_t: bool,
    (rows, inner, cols): (usize, usize, usize),
    accumulate: bool,
) -> GemmConfig<f32> {
    use cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let (transa, lda) = if w_t {
        (CUBLAS_OP_T, inner)
    } else {
        (CUBLAS_OP_N, cols)
    };
    let (transb, ldb) = if x_t {
        (CUBLAS_OP_T, rows)
    } else {
        (CUBLAS_OP_N, inner)
    };
    GemmConfig {
        transa,
        transb,
        m: cols as i32,
        n: rows as i32,
        k: inner as i32,
        alpha: 1.0f32,
        lda: lda as i32,
        ldb: ldb as i32,
        beta: if accumulate { 1.0f32 } else { 0.0f32 },
        ldc: cols as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS `sgemm` as its reference defines it, column-major: `C (m, n) = alpha op(A) op(B) +
    /// beta C` with leading dimensions, in f64.
    fn sgemm_reference(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let t = |op| op == cublasOperation_t::CUBLAS_OP_T;
        let at = |i: usize, p: usize| {
            if t(cfg.transa) {
                a[p + i * lda]
            } else {
                a[i + p * lda]
            }
        };
        let bt = |p: usize, j: usize| {
            if t(cfg.transb) {
                b[j + p * ldb]
            } else {
                b[p + j * ldb]
            }
        };
        for j in 0..n {
            for i in 0..m {
                let dot: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                let old = cfg.beta as f64 * c[i + j * ldc] as f64;
                c[i + j * ldc] = (cfg.alpha as f64 * dot + old) as f32;
            }
        }
    }

    /// Every stored orientation of both operands (the forward `x W^T`, the input gradient
    /// `dy W`, the weight gradients `dy^T x` / `x^T dy` and the head's `dlogits^T x`) gives the
    /// row-major product, with and without accumulation, on odd shapes.
    #[test]
    fn rowmajor_configs_compute_the_rowmajor_product() {
        let mut rng = crate::rng::Rng::new(17);
        for (rows, inner, cols) in [(1, 1, 1), (3, 5, 2), (7, 1, 4), (2, 9, 11), (1, 6, 13)] {
            let mut rand = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| rng.uniform_range(-1.0, 1.0) as f32)
                    .collect()
            };
            // Logical op(x) (rows, inner) and op(w) (inner, cols), row-major.
            let (xl, wl, c0) = (rand(rows * inner), rand(inner * cols), rand(rows * cols));
            let transpose = |v: &[f32], r: usize, c: usize| -> Vec<f32> {
                (0..c * r).map(|i| v[(i % r) * c + i / r]).collect()
            };
            for (x_t, w_t, accumulate) in [
                (false, false, false),
                (false, true, true),
                (true, false, true),
                (true, true, false),
            ] {
                let xs = if x_t {
                    transpose(&xl, rows, inner)
                } else {
                    xl.clone()
                };
                let ws = if w_t {
                    transpose(&wl, inner, cols)
                } else {
                    wl.clone()
                };
                let cfg = rowmajor_config(x_t, w_t, (rows, inner, cols), accumulate);
                let mut c = c0.clone();
                sgemm_reference(&cfg, &ws, &xs, &mut c);
                for i in 0..rows {
                    for j in 0..cols {
                        let dot: f64 = (0..inner)
                            .map(|p| xl[i * inner + p] as f64 * wl[p * cols + j] as f64)
                            .sum();
                        let want = dot
                            + if accumulate {
                                c0[i * cols + j] as f64
                            } else {
                                0.0
                            };
                        let got = c[i * cols + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5,
                            "{rows}x{inner}x{cols} x_t {x_t} w_t {w_t}: [{i},{j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
