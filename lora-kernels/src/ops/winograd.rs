//! 3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015): each 4x4 block of output pixels (a
//! tile) is computed from the 6x6 input patch it reads with 36 multiplications per channel pair
//! instead of 144, so the products shrink fourfold and the work moves into three cheap linear
//! transforms:
//!
//! - filter: `U = G g G^T` (6x6) of every 3x3 kernel `g` (computed in f64, rounded once);
//! - input: `V = B^T d B` (6x6) of every tile's 6x6 patch `d` (zeros outside the image);
//! - products: for each of the 36 positions `xi`, `M_xi (O, T) = U_xi (O, C) V_xi (C, T)`, one
//!   GEMM each, which is where the time goes;
//! - output: `y = A^T m A` (4x4) of every tile's 6x6 `m`, plus the bias.
//!
//! Legend: N = batch, C = input channels, O = output channels, (H, W) input size, (OH, OW)
//! output size, T = tiles (4x4 output blocks, over all images of a chunk), xi = one of the 36
//! transform positions. Layouts (row-major): `U (O, 36, C)`, `V (C, 36, T)`, `M (O, 36, T)`:
//! the channel outermost so that each transform writes one contiguous block per channel; the
//! GEMMs read `U_xi` and `V_xi` and write `M_xi` with a row stride of 36 rows. The tiles run
//! in chunks (`V` and `M` of at most 16 MB each), and the three buffers are kept per thread
//! between calls.
//!
//! Numerics: the same sums as direct convolution regrouped, so in exact arithmetic the result
//! is identical; in f32 the transforms' coefficients (up to 8 in `A`, 5 in `B`) amplify rounding
//! by a small constant factor (the tests bound it against the f64 reference and state the bound
//! next to im2col's). PyTorch's cuDNN and oneDNN paths use the same algorithm for the same
//! reason. Results are deterministic: every GEMM runs on one thread with a fixed order, and
//! the transforms do the same operations in their AVX2 and portable builds.
//!
//! [`conv2d_forward`](super::conv::conv2d_forward) and the `dx` part of
//! [`conv2d_backward`](super::conv::conv2d_backward) route here when [`worth_it`] says the shape
//! gains; `dx` of a stride-1 3x3 convolution with padding `p` is itself a 3x3 convolution of
//! `dy` (padding `2 - p`) by the kernel flipped and with its channel axes swapped.

use super::conv::Conv2dDims;
use crate::error::Result;
use crate::gemm::{gemm_raw, Par};
use rayon::prelude::*;

/// Output tile edge.
const TILE: usize = 4;
/// Input patch edge (TILE + 3 - 1).
const PATCH: usize = 6;
/// Transform positions per tile.
const XI: usize = PATCH * PATCH;
/// Tiles transformed together (one vector lane each).
const LANES: usize = 8;
/// Bytes the `V` and `M` buffers of one chunk may take each, which sets how many tiles a chunk
/// holds (never fewer than [`MIN_CHUNK_TILES`]).
const CHUNK_BYTES: usize = 16 << 20;
const MIN_CHUNK_TILES: usize = 64;
/// Bytes the transformed kernels of one block of output channels may take.
const U_BYTES: usize = 48 << 20;

type Lanes = [f32; LANES];

/// `fn name(args) { body }`: `name` runs `body` compiled for AVX2+FMA where the CPU has them (the
/// lane loops then run 8 wide), else as portable code. Both compile the same operations (Rust
/// never contracts `a * b + c` into an FMA), so the values are the same either way.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            if crate::simd::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    body($($a),*)
                }
                // SAFETY: the CPU was just checked to support avx2 and fma.
                return unsafe { avx2($($a),*) };
            }
            body($($a),*)
        }
    };
}

/// Whether a convolution can run here: 3x3, stride 1, no dilation, one group, padding at most 2
/// (so that its `dx` is a convolution with non-negative padding too).
pub fn supported(d: &Conv2dDims) -> bool {
    d.kh == 3
        && d.kw == 3
        && d.stride == (1, 1)
        && d.dilation == (1, 1)
        && d.groups == 1
        && d.padding.0 <= 2
        && d.padding.1 <= 2
}

/// Whether the Winograd route is faster than im2col + GEMM for this convolution (it is
/// [`supported`] and large enough). The transforms cost `O(C + O)` per tile against the
/// products' `O(C O)`, and the transformed kernels (4x the weight's size) must be built and
/// read on every call whatever the tile count: with few tiles they cost more than the products
/// save (SD's 16x16-pixel level, 1280 channels and 16 tiles: 4.5x slower than im2col), with
/// 64 tiles or more it wins (SD's 64x64 level with 320 channels: 3.7x faster; 32x32 with 640:
/// 1.65x). Measured by `cargo bench -p lora-benches --bench conv` (docs/performance.md).
pub fn worth_it(d: &Conv2dDims) -> bool {
    let [_, _, oh, ow] = d.out_shape();
    let tiles = d.batch * oh.div_ceil(TILE) * ow.div_ceil(TILE);
    supported(d) && d.in_ch >= 64 && d.out_ch >= 64 && tiles >= 64
}

/// The 3x3 kernels a Winograd convolution applies.
#[derive(Clone, Copy)]
pub enum Kernels<'a> {
    /// `w (O, C, 3, 3)` as stored: the forward convolution.
    Forward(&'a [f32]),
    /// `w (C', O', 3, 3)` of a forward convolution from O' to C' channels, applied flipped and
    /// with its channel axes swapped: the convolution that computes that forward's `dx` from
    /// its `dy`.
    Transposed(&'a [f32]),
}

/// `y (N, O, OH, OW) [+]= conv3x3(x (N, C, H, W), kernels) [+ bias]`, stride 1, padding `pad`
/// (rows, columns), both at most 2. With `accumulate` the result is added to `y`; otherwise `y` is
/// overwritten. `OH = H + 2 pad.0 - 2`, `OW = W + 2 pad.1 - 2`. Lengths are the caller's to check.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    y: &mut [f32],
    accumulate: bool,
    x: &[f32],
    kernels: Kernels,
    bias: Option<&[f32]>,
    (n, c, h, w): (usize, usize, usize, usize),
    o: usize,
    pad: (usize, usize),
) -> Result<()> {
    debug_assert!(pad.0 <= 2 && pad.1 <= 2);
    let (oh, ow) = (h + 2 * pad.0 - 2, w + 2 * pad.1 - 2);
    debug_assert_eq!(y.len(), n * o * oh * ow);
    debug_assert_eq!(x.len(), n * c * h * w);
    let geo = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        pad,
        th: oh.div_ceil(TILE),
        tw: ow.div_ceil(TILE),
    };
    let total = n * geo.th * geo.tw;
    let per_chunk = (CHUNK_BYTES / (XI * 4 * c.max(o)))
        .max(MIN_CHUNK_TILES)
        .div_ceil(LANES)
        * LANES;
    // The planes of y, grouped by output channel, so that the output transform of each
    // channel owns its planes in every image.
    let mut planes: Vec<Vec<&mut [f32]>> = (0..o).map(|_| Vec::with_capacity(n)).collect();
    for (i, p) in y.chunks_mut(oh * ow).enumerate() {
        planes[i % o].push(p);
    }
    // Output channels in equal blocks whose transformed kernels take at most U_BYTES (in SD
    // 1.5 at 512x512: one block for the 320-input convolutions, two to five for the others): the
    // whole U of a 1920 -> 640 convolution would be 177 MB, more than the step's other scratch
    // together, and each further block costs only one more packing of V per product.
    let blocks = o.div_ceil((U_BYTES / (XI * 4 * c)).max(16));
    let ob_max = o.div_ceil(blocks);
    let (mut u, mut v, mut m) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut start = 0;
    while start < total {
        let tc = per_chunk.min(total - start);
        v.resize(c * XI * tc, 0.0);
        v.par_chunks_mut(XI * tc)
            .enumerate()
            .for_each(|(ci, vc)| transform_inputs(vc, x, ci, start, tc, &geo));
        for (bi, pl) in planes.chunks_mut(ob_max).enumerate() {
            let (o0, ob) = (bi * ob_max, pl.len());
            // One block's kernels serve every chunk; several blocks are rebuilt per chunk.
            if blocks > 1 || start == 0 {
                u.resize(ob * XI * c, 0.0);
                u.par_chunks_mut(XI * c)
                    .enumerate()
                    .for_each(|(k, uo)| kernel_lanes(uo, kernels, o0 + k, o, c));
            }
            m.resize(ob * XI * tc, 0.0);
            products(&mut m, &u, &v, (ob, c, tc));
            let mc = &m;
            pl.par_iter_mut().enumerate().for_each(|(k, pk)| {
                let b = bias.map_or(0.0, |b| b[o0 + k]);
                let mo = &mc[k * XI * tc..][..XI * tc];
                transform_outputs(pk, mo, b, accumulate, start, &geo)
            });
        }
        start += tc;
    }
    SCRATCH.with(|s| *s.borrow_mut() = (u, v, m));
    Ok(())
}

thread_local! {
    /// The `U`, `V` and `M` buffers of the last call on this thread (at most [`U_BYTES`] and
    /// twice [`CHUNK_BYTES`], or one block of 16 output channels and one chunk of
    /// [`MIN_CHUNK_TILES`]): a UNet step makes dozens of calls, and fresh buffers cost their
    /// zeroing and page faults every time (a fifth of a 640-channel call's time). All three
    /// are overwritten before being read.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new()))
    };
}

/// What the input and output transforms need to know about the images.
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pad: (usize, usize),
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
}

impl Geometry {
    /// Image, tile row and tile column of global tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per = self.th * self.tw;
        (t / per, t % per / self.tw, t % self.tw)
    }
}

wide_fn! {
    /// `U`'s rows for output channel `oc` (`(36, C)`): `G g G^T` of its kernels, in f64 and
    /// rounded once; eight input channels at a time (one lane each).
    fn kernel_lanes(uo: &mut [f32], k: Kernels, oc: usize, o: usize, c: usize) {
        for c0 in (0..c).step_by(LANES) {
            let lanes = LANES.min(c - c0);
            // g[i][j][lane]: tap (i, j) of the kernel from input channel c0 + lane to output
            // channel oc.
            // Each kernel's 9 taps lie together: in order, or reversed (flipped) for
            // the transposed kernels.
            let mut g = [[[0.0f64; LANES]; 3]; 3];
            for lane in 0..lanes {
                let ci = c0 + lane;
                let (taps, flip): (&[f32; 9], bool) = match k {
                    Kernels::Forward(w) => (tap9(w, oc * c + ci), false),
                    Kernels::Transposed(w) => (tap9(w, ci * o + oc), true),
                };
                for (t, &v) in taps.iter().enumerate() {
                    let t = if flip { 8 - t } else { t };
                    g[t / 3][t % 3][lane] = f64::from(v);
                }
            }
            // Columns first (G g), then rows ((G g) G^T).
            let mut gg = [[[0.0f64; LANES]; 3]; PATCH];
            for j in 0..3 {
                let col = g_col([g[0][j], g[1][j], g[2][j]]);
                for (r, v) in col.into_iter().enumerate() {
                    gg[r][j] = v;
                }
            }
            for (r, row) in gg.iter().enumerate() {
                for (s, v) in g_col(*row).iter().enumerate() {
                    let dst = &mut uo[(r * PATCH + s) * c + c0..][..lanes];
                    for (d, x) in dst.iter_mut().zip(v) {
                        *d = *x as f32;
                    }
                }
            }
        }
    }
}

/// The 9 taps of kernel `index` of a `(.., .., 3, 3)` weight.
#[inline(always)]
fn tap9(w: &[f32], index: usize) -> &[f32; 9] {
    w[index * 9..index * 9 + 9]
        .try_into()
        .expect("a 9-element slice")
}

/// `G (g0, g1, g2)^T`, the filter transform of one column, on eight lanes at once.
#[inline(always)]
fn g_col(g: [[f64; LANES]; 3]) -> [[f64; LANES]; PATCH] {
    let mut r = [[0.0f64; LANES]; PATCH];
    for k in 0..LANES {
        let [g0, g1, g2] = [g[0][k], g[1][k], g[2][k]];
        // Products by the reciprocals (f64 divisions would dominate the transform); exact to
        // f64 rounding, far below the f32 result's.
        let (a, b) = (g0 * (1.0 / 24.0) + g2 * (1.0 / 6.0), g1 * (1.0 / 12.0));
        r[0][k] = g0 * 0.25;
        r[1][k] = (g0 + g1 + g2) * (-1.0 / 6.0);
        r[2][k] = (g0 - g1 + g2) * (-1.0 / 6.0);
        r[3][k] = a + b;
        r[4][k] = a - b;
        r[5][k] = g2;
    }
    r
}

/// `B^T d` on eight lanes at once.
#[inline(always)]
fn bt(d: &[Lanes; PATCH]) -> [Lanes; PATCH] {
    let mut r = [[0.0f32; LANES]; PATCH];
    for k in 0..LANES {
        let [d0, d1, d2, d3, d4, d5] = [d[0][k], d[1][k], d[2][k], d[3][k], d[4][k], d[5][k]];
        r[0][k] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][k] = (d3 + d4) - 4.0 * (d1 + d2);
        r[2][k] = (d4 - d3) + 4.0 * (d1 - d2);
        r[3][k] = (d4 - d2) + 2.0 * (d3 - d1);
        r[4][k] = (d4 - d2) + 2.0 * (d1 - d3);
        r[5][k] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `A^T m` on eight lanes at once.
#[inline(always)]
fn at(m: &[Lanes; PATCH]) -> [Lanes; TILE] {
    let mut r = [[0.0f32; LANES]; TILE];
    for k in 0..LANES {
        let (a, b) = (m[1][k] + m[2][k], m[1][k] - m[2][k]);
        let (c, e) = (m[3][k] + m[4][k], m[3][k] - m[4][k]);
        r[0][k] = m[0][k] + a + c;
        r[1][k] = b + 2.0 * e;
        r[2][k] = a + 4.0 * c;
        r[3][k] = b + 8.0 * e + m[5][k];
    }
    r
}

/// `dst[..lanes] = v[..lanes]`, a fixed-size copy (vector moves) for a full lane group.
#[inline(always)]
fn store(dst: &mut [f32], v: &Lanes, lanes: usize) {
    if lanes == LANES {
        dst[..LANES].copy_from_slice(v);
    } else {
        dst[..lanes].copy_from_slice(&v[..lanes]);
    }
}

/// `src[..lanes]`, zeros after them; a fixed-size copy for a full lane group.
#[inline(always)]
fn load(src: &[f32], lanes: usize) -> Lanes {
    let mut v = [0.0f32; LANES];
    if lanes == LANES {
        v.copy_from_slice(&src[..LANES]);
    } else {
        v[..lanes].copy_from_slice(&src[..lanes]);
    }
    v
}

wide_fn! {
    /// `V`'s block for input channel `ci` (`(36, tc)`): `B^T d B` of the patches of tiles
    /// `start..start + tc`.
    fn transform_inputs(vc: &mut [f32], x: &[f32], ci: usize, start: usize, tc: usize, g: &Geometry) {
        for l0 in (0..tc).step_by(LANES) {
            let lanes = LANES.min(tc - l0);
            // d[r][s][lane]: patch row r, column s.
            let mut d = [[[0.0f32; LANES]; PATCH]; PATCH];
            for lane in 0..lanes {
                let (img, ty, tx) = g.tile(start + l0 + lane);
                let plane = &x[(img * g.c + ci) * g.h * g.w..][..g.h * g.w];
                let (y0, x0) = (
                    (ty * TILE) as isize - g.pad.0 as isize,
                    (tx * TILE) as isize - g.pad.1 as isize,
                );
                for (r, drow) in d.iter_mut().enumerate() {
                    let yy = y0 + r as isize;
                    if yy < 0 || yy >= g.h as isize {
                        continue;
                    }
                    let src = &plane[yy as usize * g.w..][..g.w];
                    for (s, dv) in drow.iter_mut().enumerate() {
                        let xx = x0 + s as isize;
                        if xx >= 0 && xx < g.w as isize {
                            dv[lane] = src[xx as usize];
                        }
                    }
                }
            }
            // Columns (B^T d), then rows ((B^T d) B).
            let mut t = [[[0.0f32; LANES]; PATCH]; PATCH];
            for s in 0..PATCH {
                let col = bt(&std::array::from_fn(|r| d[r][s]));
                for r in 0..PATCH {
                    t[r][s] = col[r];
                }
            }
            for (r, row) in t.iter().enumerate() {
                for (s, v) in bt(row).iter().enumerate() {
                    store(&mut vc[(r * PATCH + s) * tc + l0..], v, lanes);
                }
            }
        }
    }
}

wide_fn! {
    /// `y [+]= A^T m A + bias` of output channel `oc`'s tiles `start..start + tc`; `mo` is `M`'s
    /// block for that channel (`(36, tc)`), `planes` the channel's plane in every image.
    fn transform_outputs(
        planes: &mut [&mut [f32]],
        mo: &[f32],
        bias: f32,
        accumulate: bool,
        start: usize,
        g: &Geometry,
    ) {
        let tc = mo.len() / XI;
        for l0 in (0..tc).step_by(LANES) {
            let lanes = LANES.min(tc - l0);
            // Columns (A^T m), then rows ((A^T m) A).
            let mut t = [[[0.0f32; LANES]; PATCH]; TILE];
            for s in 0..PATCH {
                let col = at(&std::array::from_fn(|r| {
                    load(&mo[(r * PATCH + s) * tc + l0..], lanes)
                }));
                for r in 0..TILE {
                    t[r][s] = col[r];
                }
            }
            let out: [[Lanes; TILE]; TILE] = std::array::from_fn(|r| at(&t[r]));
            for lane in 0..lanes {
                let (img, ty, tx) = g.tile(start + l0 + lane);
                let plane = &mut *planes[img];
                for (r, orow) in out.iter().enumerate() {
                    let yy = ty * TILE + r;
                    if yy >= g.oh {
                        break;
                    }
                    let dst = &mut plane[yy * g.ow..][..g.ow];
                    for (s, ov) in orow.iter().enumerate() {
                        let xx = tx * TILE + s;
                        if xx >= g.ow {
                            break;
                        }
                        let v = ov[lane] + bias;
                        if accumulate {
                            dst[xx] += v;
                        } else {
                            dst[xx] = v;
                        }
                    }
                }
            }
        }
    }
}

/// A pointer the 36 products share; each writes only its own rows of `M`.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: used only by `products`, whose tasks write disjoint elements (see there).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `M_xi (O, T) = U_xi (O, C) V_xi (C, T)` for the 36 positions, one single-threaded GEMM per
/// position spread over the pool.
fn products(m: &mut [f32], u: &[f32], v: &[f32], (o, c, tc): (usize, usize, usize)) {
    assert!(m.len() == o * XI * tc && u.len() == o * XI * c && v.len() == c * XI * tc);
    let dst = Shared(m.as_mut_ptr());
    (0..XI).into_par_iter().for_each(|xi| {
        let dst = dst;
        // SAFETY: with the lengths asserted above, element (i, j) of M_xi is at
        // (i * 36 + xi) * tc + j < o * 36 * tc, of U_xi at (i * 36 + xi) * c + p < o * 36 * c and
        // of V_xi at (p * 36 + xi) * tc + j < c * 36 * tc; tasks of different xi write
        // different elements of M, and nothing else touches M during the loop.
        unsafe {
            gemm_raw(
                dst.0.add(xi * tc),
                ((XI * tc) as isize, 1),
                u.as_ptr().add(xi * c),
                ((XI * c) as isize, 1),
                v.as_ptr().add(xi * tc),
                ((XI * tc) as isize, 1),
                (o, tc, c),
                1.0,
                false,
                Par::Single,
            )
        }
    });
}
