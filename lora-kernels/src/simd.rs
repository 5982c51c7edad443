//! Vector building blocks for the row-pass kernels, with a runtime switch between an AVX2+FMA
//! implementation (explicit intrinsics) and a portable scalar one.
//!
//! Kernel bodies are generic over [`Simd`]; [`with_simd!`] instantiates a body with [`Avx2`]
//! inside a `#[target_feature(enable = "avx2,fma")]` trampoline when the CPU has those features,
//! and with [`Scalar`] otherwise. The 4-way primitives ([`Simd::dot4`], [`Simd::axpy4`]) load
//! each shared operand once for four FMAs, which is what keeps the rank-R passes L1-bound rather
//! than load-port bound.

use std::sync::OnceLock;

/// Whether this CPU can run the AVX2+FMA instantiation.
pub(crate) fn has_avx2_fma() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Calls `$body::<S>($args..)` with `S = Avx2` (in an AVX2+FMA-compiled trampoline) when the CPU
/// supports it, else `S = Scalar`.
macro_rules! with_simd {
    ($body:ident ( $($arg:expr),* $(,)? )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::simd::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn trampoline<F: FnOnce() -> R, R>(f: F) -> R { f() }
                // SAFETY: the CPU was just checked to support avx2 and fma, which is all the
                // Avx2 instantiation uses.
                unsafe { trampoline(|| $body::<$crate::simd::Avx2>($($arg),*)) }
            } else {
                $body::<$crate::simd::Scalar>($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body::<$crate::simd::Scalar>($($arg),*)
        }
    }};
}
pub(crate) use with_simd;

/// The primitives the row-pass kernels are written in.
pub(crate) trait Simd {
    /// `sum_i a[i] * b[i]`.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `[x·m0, x·m1, x·m2, x·m3]`, reading `x` once.
    fn dot4(x: &[f32], m: [&[f32]; 4]) -> [f32; 4];
    /// `y += alpha * x`.
    fn axpy(y: &mut [f32], alpha: f32, x: &[f32]);
    /// `y += c0*v0 + c1*v1 + c2*v2 + c3*v3`, reading and writing `y` once.
    fn axpy4(y: &mut [f32], c: [f32; 4], v: [&[f32]; 4]);
}

/// Portable fallback.
pub(crate) struct Scalar;

impl Simd for Scalar {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let n8 = a.len() / 8 * 8;
        for (x, y) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in a[n8..].iter().zip(&b[n8..]) {
            s += x * y;
        }
        s
    }
    #[inline(always)]
    fn dot4(x: &[f32], m: [&[f32]; 4]) -> [f32; 4] {
        [
            Self::dot(x, m[0]),
            Self::dot(x, m[1]),
            Self::dot(x, m[2]),
            Self::dot(x, m[3]),
        ]
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }
    #[inline(always)]
    fn axpy4(y: &mut [f32], c: [f32; 4], v: [&[f32]; 4]) {
        for (i, yi) in y.iter_mut().enumerate() {
            *yi += c[0] * v[0][i] + c[1] * v[1][i] + c[2] * v[2][i] + c[3] * v[3][i];
        }
    }
}

/// AVX2 + FMA. Only instantiated by [`with_simd!`] after the feature check.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY (whole fn): caller runs with avx2 enabled.
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// # Safety
    /// avx2+fma available; `b.len() >= a.len()`.
    #[inline(always)]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: every load reads indices < n, within both slices.
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            if i + 8 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                s = (*pa.add(i)).mul_add(*pb.add(i), s);
                i += 1;
            }
            s
        }
    }

    /// # Safety
    /// avx2+fma available; every `m[t].len() >= x.len()`.
    #[inline(always)]
    pub(super) unsafe fn dot4(x: &[f32], m: [&[f32]; 4]) -> [f32; 4] {
        let n = x.len();
        let px = x.as_ptr();
        let pm = [m[0].as_ptr(), m[1].as_ptr(), m[2].as_ptr(), m[3].as_ptr()];
        // SAFETY: every load reads indices < n, within all five slices.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 8 <= n {
                let xv = _mm256_loadu_ps(px.add(i));
                for t in 0..4 {
                    acc[t] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pm[t].add(i)), acc[t]);
                }
                i += 8;
            }
            let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
            while i < n {
                for t in 0..4 {
                    out[t] = (*px.add(i)).mul_add(*pm[t].add(i), out[t]);
                }
                i += 1;
            }
            out
        }
    }

    /// # Safety
    /// avx2+fma available; `x.len() >= y.len()`.
    #[inline(always)]
    pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        // SAFETY: indices < n, within both slices.
        unsafe {
            let a = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
            while i < n {
                *py.add(i) = alpha.mul_add(*px.add(i), *py.add(i));
                i += 1;
            }
        }
    }

    /// # Safety
    /// avx2+fma available; every `v[t].len() >= y.len()`.
    #[inline(always)]
    pub(super) unsafe fn axpy4(y: &mut [f32], c: [f32; 4], v: [&[f32]; 4]) {
        let n = y.len();
        let py = y.as_mut_ptr();
        let pv = [v[0].as_ptr(), v[1].as_ptr(), v[2].as_ptr(), v[3].as_ptr()];
        // SAFETY: indices < n, within all five slices.
        unsafe {
            let cv = [
                _mm256_set1_ps(c[0]),
                _mm256_set1_ps(c[1]),
                _mm256_set1_ps(c[2]),
                _mm256_set1_ps(c[3]),
            ];
            let mut i = 0;
            while i + 8 <= n {
                let mut acc = _mm256_loadu_ps(py.add(i));
                for t in 0..4 {
                    acc = _mm256_fmadd_ps(cv[t], _mm256_loadu_ps(pv[t].add(i)), acc);
                }
                _mm256_storeu_ps(py.add(i), acc);
                i += 8;
            }
            while i < n {
                let mut acc = *py.add(i);
                for t in 0..4 {
                    acc = c[t].mul_add(*pv[t].add(i), acc);
                }
                *py.add(i) = acc;
                i += 1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert!(b.len() >= a.len());
        // SAFETY: Avx2 is only instantiated behind the feature check in `with_simd!`; lengths
        // asserted above.
        unsafe { avx2::dot(a, b) }
    }
    #[inline(always)]
    fn dot4(x: &[f32], m: [&[f32]; 4]) -> [f32; 4] {
        assert!(m.iter().all(|r| r.len() >= x.len()));
        // SAFETY: as in `dot`.
        unsafe { avx2::dot4(x, m) }
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        assert!(x.len() >= y.len());
        // SAFETY: as in `dot`.
        unsafe { avx2::axpy(y, alpha, x) }
    }
    #[inline(always)]
    fn axpy4(y: &mut [f32], c: [f32; 4], v: [&[f32]; 4]) {
        assert!(v.iter().all(|r| r.len() >= y.len()));
        // SAFETY: as in `dot`.
        unsafe { avx2::axpy4(y, c, v) }
    }
}

/// `y += sum_j c[j] * rows[j]` for any count of rows, four at a time.
#[inline(always)]
pub(crate) fn axpy_many<S: Simd>(y: &mut [f32], c: &[f32], rows: &[&[f32]]) {
    let full = c.len() / 4 * 4;
    for j in (0..full).step_by(4) {
        S::axpy4(
            y,
            [c[j], c[j + 1], c[j + 2], c[j + 3]],
            [rows[j], rows[j + 1], rows[j + 2], rows[j + 3]],
        );
    }
    for j in full..c.len() {
        S::axpy(y, c[j], rows[j]);
    }
}

/// `out[j] = scale * x · rows[j]` for any count of rows, four at a time.
#[inline(always)]
pub(crate) fn dot_many<S: Simd>(out: &mut [f32], scale: f32, x: &[f32], rows: &[&[f32]]) {
    let full = out.len() / 4 * 4;
    for j in (0..full).step_by(4) {
        let d = S::dot4(x, [rows[j], rows[j + 1], rows[j + 2], rows[j + 3]]);
        for t in 0..4 {
            out[j + t] = scale * d[t];
        }
    }
    for j in full..out.len() {
        out[j] = scale * S::dot(x, rows[j]);
    }
}
