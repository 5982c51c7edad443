//! Dense matrix products on the CPU through the `gemm` crate (SIMD, cache-blocked, rayon).
//!
//! Legend for this file: the product is `dst (M, N) = [dst +] beta * op(lhs) (M, K) @ op(rhs)
//! (K, N)`, all buffers row-major. `op` is the identity or a transpose ([`Trans`]), expressed as
//! strides so nothing is copied. The `gemm` crate's own convention is
//! `dst = alpha * dst + beta * lhs * rhs` with `read_dst` deciding whether `alpha * dst` is
//! used; [`matmul`] hides it behind an `accumulate` flag.
//!
//! Every call is counted when tracing is on ([`trace_start`] / [`trace_take`]), which is how the
//! tests prove that a frozen weight never costs a weight-gradient GEMM.

use crate::error::{check_len, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether a stored matrix is used as is or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Use the matrix as stored.
    No,
    /// Use the transpose of the stored matrix.
    Yes,
}

/// Below this many multiply-adds a product runs on one thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// One recorded GEMM call: output `(m, n)`, reduction `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmCall {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// Reduced dimension.
    pub k: usize,
}

static TRACE_ON: AtomicBool = AtomicBool::new(false);
static TRACE: Mutex<Vec<GemmCall>> = Mutex::new(Vec::new());

/// Starts recording every GEMM call (process-wide). Used by tests and benchmarks.
pub fn trace_start() {
    TRACE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    TRACE_ON.store(true, Ordering::SeqCst);
}

/// Stops recording and returns the calls made since [`trace_start`].
pub fn trace_take() -> Vec<GemmCall> {
    TRACE_ON.store(false, Ordering::SeqCst);
    std::mem::take(&mut *TRACE.lock().unwrap_or_else(|e| e.into_inner()))
}

fn record(m: usize, n: usize, k: usize) {
    if TRACE_ON.load(Ordering::Relaxed) {
        TRACE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(GemmCall { m, n, k });
    }
}

/// How a product may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Use the current rayon pool when the product is large enough.
    Auto,
    /// Stay on the calling thread (used inside an already-parallel loop).
    Single,
}

fn parallelism(par: Par, m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if par == Par::Single || threads <= 1 || m.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// Row and column strides of a stored row-major `(rows, cols)` matrix used through `t`.
/// Returns `(rs, cs)` of the *logical* (possibly transposed) matrix.
fn strides(t: Trans, stored_cols: usize) -> (isize, isize) {
    match t {
        Trans::No => (stored_cols as isize, 1),
        Trans::Yes => (1, stored_cols as isize),
    }
}

/// `dst (M, N) = [dst +] beta * op(lhs) (M, K) @ op(rhs) (K, N)`.
///
/// `lhs` is stored `(M, K)` when `lhs_t` is [`Trans::No`] and `(K, M)` otherwise; likewise `rhs`
/// is stored `(K, N)` or `(N, K)`. With `accumulate`, the product is added to `dst`; otherwise
/// `dst` is overwritten (its old contents, even NaN, are never read).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    lhs: &[f32],
    lhs_t: Trans,
    rhs: &[f32],
    rhs_t: Trans,
    (m, n, k): (usize, usize, usize),
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    check_len("matmul", "dst", dst.len(), &[m, n])?;
    check_len("matmul", "lhs", lhs.len(), &[m, k])?;
    check_len("matmul", "rhs", rhs.len(), &[k, n])?;
    let (lrs, lcs) = strides(lhs_t, if lhs_t == Trans::No { k } else { m });
    let (rrs, rcs) = strides(rhs_t, if rhs_t == Trans::No { n } else { k });
    // SAFETY: the three buffers were checked to hold exactly (m,n), (m,k) and (k,n) elements, and
    // the strides above address each stored matrix inside its own buffer; `dst` is borrowed
    // mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            (n as isize, 1),
            lhs.as_ptr(),
            (lrs, lcs),
            rhs.as_ptr(),
            (rrs, rcs),
            (m, n, k),
            beta,
            accumulate,
            par,
        );
    }
    Ok(())
}

/// The raw strided product behind [`matmul`]: `dst = [dst +] beta * lhs @ rhs` where each operand
/// is given as a pointer plus `(row stride, column stride)` of the *logical* matrix.
///
/// # Safety
/// For every `i < m, j < n, p < k`, `dst + i*rs + j*cs`, `lhs + i*rs + p*cs` and
/// `rhs + p*rs + j*cs` (with each operand's own strides) must be valid, `dst` must not overlap
/// `lhs` or `rhs`, and no other thread may touch the `dst` elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    dst: *mut f32,
    (drs, dcs): (isize, isize),
    lhs: *const f32,
    (lrs, lcs): (isize, isize),
    rhs: *const f32,
    (rrs, rcs): (isize, isize),
    (m, n, k): (usize, usize, usize),
    beta: f32,
    accumulate: bool,
    par: Par,
) {
    record(m, n, k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: in bounds by the caller's contract.
                    unsafe { *dst.offset(i as isize * drs + j as isize * dcs) = 0.0 };
                }
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller's contract; gemm's alpha (1.0) only applies when
    // read_dst is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dcs,
            drs,
            accumulate,
            lhs,
            lcs,
            lrs,
            rhs,
            rcs,
            rrs,
            1.0f32,
            beta,
            false,
            false,
            false,
            parallelism(par, m, n, k),
        );
    }
}

/// Naive references, in `f64`.
pub mod reference {
    use super::Trans;

    /// `dst = [dst +] beta * op(lhs) @ op(rhs)` with triple loops in `f64`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        dst: &mut [f64],
        lhs: &[f64],
        lhs_t: Trans,
        rhs: &[f64],
        rhs_t: Trans,
        (m, n, k): (usize, usize, usize),
        beta: f64,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    let l = match lhs_t {
                        Trans::No => lhs[i * k + p],
                        Trans::Yes => lhs[p * m + i],
                    };
                    let r = match rhs_t {
                        Trans::No => rhs[p * n + j],
                        Trans::Yes => rhs[j * k + p],
                    };
                    acc += l * r;
                }
                let v = beta * acc;
                dst[i * n + j] = if accumulate { dst[i * n + j] + v } else { v };
            }
        }
    }
}
