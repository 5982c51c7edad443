// Fused LoRA linear kernels (the CUDA twin of lora-kernels/src/lora_linear.rs).
// Shapes, row-major: x (n, k), A (r, k), B (m, r), u (n, r), y and dy (n, m), dx (n, k).
// The dense base products (x W^T, dy W) go to cuBLAS; these kernels do the rank-r work and
// touch each large tensor at most once. docs/kernels.md has the design and the napkin math.
//
// Tiles: TN rows x TC columns per block, 256 threads; the rank is processed in chunks of RC
// so any r works, with one chunk (no re-reading) up to r = 64.

#define TN 32
#define TC 64
#define TK 32
#define RC 64
#define THREADS 256

// u = drop(x) A^T, split over k for occupancy: block z sums k in [z kc, (z + 1) kc) into
// u_part + z n r (u itself when gridDim.z = 1; otherwise lora_reduce_partials adds the splits
// in order). grid (ceil(n/TN), ceil(r/RC), ceil(k/kc)); kc a multiple of TK. One pass over x per
// rank chunk.
extern "C" __global__ void lora_shrink(float* __restrict__ u_part, const float* __restrict__ x,
                                       const float* __restrict__ a, int n, int k, int r, int kc,
                                       float p, u64 seed) {
    __shared__ float xs[TN][TK + 1];
    __shared__ float as[RC][TK + 1];
    const int row0 = blockIdx.x * TN, r0 = blockIdx.y * RC, t = threadIdx.x;
    const int kb = blockIdx.z * kc, ke = min(k, kb + kc);
    // Ranks of this chunk; accumulators past them are skipped (a uniform branch), so a rank-8
    // adapter does 8 FMAs per x value, not 64.
    const int rr = min(RC, r - r0);
    // Each thread owns 8 outputs: row (t / 8), ranks (t % 8) + 8 j.
    const int tr = t / 8, tc = t % 8;
    float acc[RC / 8];
#pragma unroll
    for (int j = 0; j < RC / 8; ++j) acc[j] = 0.0f;
    for (int k0 = kb; k0 < ke; k0 += TK) {
        for (int e = t; e < TN * TK; e += THREADS) {
            int i = e / TK, c = e % TK, gi = row0 + i, gc = k0 + c;
            float v = 0.0f;
            if (gi < n && gc < ke) {
                v = x[(size_t)gi * k + gc] * lora_dropout_mult(p, seed, (u64)gi * k + gc);
            }
            xs[i][c] = v;
        }
        for (int e = t; e < RC * TK; e += THREADS) {
            int j = e / TK, c = e % TK, gj = r0 + j, gc = k0 + c;
            as[j][c] = (gj < r && gc < ke) ? a[(size_t)gj * k + gc] : 0.0f;
        }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < TK; ++c) {
            float xv = xs[tr][c];
#pragma unroll
            for (int j = 0; j < RC / 8; ++j) {
                if (8 * j < rr) acc[j] += xv * as[tc + 8 * j][c];
            }
        }
        __syncthreads();
    }
    const int gi = row0 + tr;
    if (gi < n) {
        float* u = u_part + (size_t)blockIdx.z * n * r;
#pragma unroll
        for (int j = 0; j < RC / 8; ++j) {
            int gj = r0 + tc + 8 * j;
            if (gj < r) u[(size_t)gi * r + gj] = acc[j];
        }
    }
}

// The shared tile of lora_expand and lora_backward_dx: for this thread's row (row0 + t / 8) and
// columns col0 + (t % 8) + 8 j, acc[j] = sum over q < r of left[row, q] * right(col, q), with
// left (rows, r) row-major and right(col, q) = right[col * rs_col + q * rs_q] (B (m, r): r, 1;
// A (r, k): 1, k). Both operands go through shared memory, RC ranks at a time.
__device__ __forceinline__ void rank_product_tile(float acc[TC / 8], const float* __restrict__ left,
                                                  const float* __restrict__ right, int rows,
                                                  int cols, int r, size_t rs_col, size_t rs_q,
                                                  int row0, int col0) {
    __shared__ float ls[TN][RC + 1];
    __shared__ float rsm[TC][RC + 1];
    const int t = threadIdx.x, tr = t / 8, tc = t % 8;
#pragma unroll
    for (int j = 0; j < TC / 8; ++j) acc[j] = 0.0f;
    for (int q0 = 0; q0 < r; q0 += RC) {
        for (int e = t; e < TN * RC; e += THREADS) {
            int i = e / RC, q = e % RC, gi = row0 + i, gq = q0 + q;
            ls[i][q] = (gi < rows && gq < r) ? left[(size_t)gi * r + gq] : 0.0f;
        }
        for (int e = t; e < TC * RC; e += THREADS) {
            int j = e / RC, q = e % RC, gj = col0 + j, gq = q0 + q;
            rsm[j][q] = (gj < cols && gq < r) ? right[(size_t)gj * rs_col + (size_t)gq * rs_q] : 0.0f;
        }
        __syncthreads();
        const int qn = min(RC, r - q0);
        for (int q = 0; q < qn; ++q) {
            float lv = ls[tr][q];
#pragma unroll
            for (int j = 0; j < TC / 8; ++j) acc[j] += lv * rsm[tc + 8 * j][q];
        }
        __syncthreads();
    }
}

// y = y + bias + s u B^T, in place: the one pass over y that adding the bias needs anyway
// (cuBLAS wrote x W^T into y with beta = 0). bias may be null. grid (ceil(n/TN), ceil(m/TC)).
extern "C" __global__ void lora_expand(float* __restrict__ y, const float* __restrict__ u,
                                       const float* __restrict__ b,
                                       const float* __restrict__ bias, int n, int m, int r,
                                       float s) {
    const int row0 = blockIdx.x * TN, col0 = blockIdx.y * TC;
    float acc[TC / 8];
    rank_product_tile(acc, u, b, n, m, r, (size_t)r, 1, row0, col0);
    const int gi = row0 + threadIdx.x / 8, tc = threadIdx.x % 8;
    if (gi < n) {
#pragma unroll
        for (int j = 0; j < TC / 8; ++j) {
            int gj = col0 + tc + 8 * j;
            if (gj < m) {
                size_t o = (size_t)gi * m + gj;
                y[o] = y[o] + (bias ? bias[gj] : 0.0f) + s * acc[j];
            }
        }
    }
}

// One pass over dy for three results: g = s dy B (n, r), and this block's partial sums of
// dB = s dy^T u (m, r) and db = colsum(dy) (m) over its TN rows, written to
// dB_part[blockIdx.x] / db_part[blockIdx.x] (either may be null: not computed). Split over the m columns for
// occupancy: block y covers columns [y mc, (y + 1) mc) and writes its share of g to
// g_part + y n r (g itself when gridDim.y = 1). lora_reduce_partials adds every set of partials
// in a fixed order, so results do not depend on scheduling.
// grid (ceil(n/TN), ceil(m/mc)); mc a multiple of TC; requires r <= RC.
extern "C" __global__ void lora_backward_g_db(float* __restrict__ g_part,
                                              float* __restrict__ db_part_b,
                                              float* __restrict__ db_part,
                                              const float* __restrict__ dy,
                                              const float* __restrict__ b,
                                              const float* __restrict__ u, int n, int m, int r,
                                              int mc, float s) {
    __shared__ float dys[TN][TC + 1];
    __shared__ float us[TN][RC + 1];
    __shared__ float bs[TC][RC + 1];
    const int row0 = blockIdx.x * TN, t = threadIdx.x;
    const int cb = blockIdx.y * mc, ce = min(m, cb + mc);
    const int tr = t / 8, tc = t % 8;
    for (int e = t; e < TN * RC; e += THREADS) {
        int i = e / RC, q = e % RC, gi = row0 + i;
        us[i][q] = (gi < n && q < r) ? u[(size_t)gi * r + q] : 0.0f;
    }
    float gacc[RC / 8];
#pragma unroll
    for (int j = 0; j < RC / 8; ++j) gacc[j] = 0.0f;
    float* dbp = db_part_b ? db_part_b + (size_t)blockIdx.x * m * r : nullptr;
    for (int col0 = cb; col0 < ce; col0 += TC) {
        __syncthreads();
        for (int e = t; e < TN * TC; e += THREADS) {
            int i = e / TC, c = e % TC, gi = row0 + i, gc = col0 + c;
            dys[i][c] = (gi < n && gc < ce) ? dy[(size_t)gi * m + gc] : 0.0f;
        }
        for (int e = t; e < TC * RC; e += THREADS) {
            int j = e / RC, q = e % RC, gj = col0 + j;
            bs[j][q] = (gj < ce && q < r) ? b[(size_t)gj * r + q] : 0.0f;
        }
        __syncthreads();
        // g: row tr, ranks tc + 8 j (those below r: a uniform branch), over this column chunk.
        for (int c = 0; c < TC; ++c) {
            float d = dys[tr][c];
#pragma unroll
            for (int j = 0; j < RC / 8; ++j) {
                if (8 * j < r) gacc[j] += d * bs[c][tc + 8 * j];
            }
        }
        // dB partial: columns c = t / 4 (64 of them), ranks (t % 4) + 4 j, over the TN rows.
        {
            const int c = t / 4, q0 = t % 4, gc = col0 + c;
            for (int q = q0; db_part_b && q < r; q += 4) {
                float acc = 0.0f;
                for (int i = 0; i < TN; ++i) acc += dys[i][c] * us[i][q];
                if (gc < ce) dbp[(size_t)gc * r + q] = s * acc;
            }
            if (db_part && q0 == 0 && gc < ce) {
                float acc = 0.0f;
                for (int i = 0; i < TN; ++i) acc += dys[i][c];
                db_part[(size_t)blockIdx.x * m + gc] = acc;
            }
        }
    }
    const int gi = row0 + tr;
    if (gi < n) {
        float* g = g_part + (size_t)blockIdx.y * n * r;
#pragma unroll
        for (int j = 0; j < RC / 8; ++j) {
            int q = tc + 8 * j;
            if (q < r) g[(size_t)gi * r + q] = s * gacc[j];
        }
    }
}

// out[e] (+)= sum over p of part[p * len + e], in order p = 0, 1, ... (deterministic).
// accumulate = 1 adds into out (gradient accumulation), 0 overwrites.
extern "C" __global__ void lora_reduce_partials(float* __restrict__ out,
                                                const float* __restrict__ part, int parts,
                                                int len, int accumulate) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= len) return;
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += part[(size_t)p * len + e];
    out[e] = accumulate ? out[e] + acc : acc;
}

// Partial dA = g^T drop(x) (r, k): block (kc, seg) sums rows [seg * rows_per_seg, ...) for the
// TC columns kc * TC.., into da_part[seg]. One pass over x in total. Requires r <= RC. The
// number of row segments is chosen on the host to fill the device (lora_split in cuda.rs).
// grid (ceil(k/TC), segs).
extern "C" __global__ void lora_backward_da(float* __restrict__ da_part,
                                            const float* __restrict__ g,
                                            const float* __restrict__ x, int n, int k, int r,
                                            int rows_per_seg, float p, u64 seed) {
    __shared__ float gs[TN][RC + 1];
    __shared__ float xs[TN][TC + 1];
    const int col0 = blockIdx.x * TC, seg = blockIdx.y, t = threadIdx.x;
    const int r_begin = seg * rows_per_seg, r_end = min(n, r_begin + rows_per_seg);
    // Each thread owns column (t % 64) and ranks (t / 64) + 4 j.
    const int c = t % TC, q0 = t / TC;
    float acc[RC / 4];
#pragma unroll
    for (int j = 0; j < RC / 4; ++j) acc[j] = 0.0f;
    for (int row0 = r_begin; row0 < r_end; row0 += TN) {
        for (int e = t; e < TN * RC; e += THREADS) {
            int i = e / RC, q = e % RC, gi = row0 + i;
            gs[i][q] = (gi < r_end && q < r) ? g[(size_t)gi * r + q] : 0.0f;
        }
        for (int e = t; e < TN * TC; e += THREADS) {
            int i = e / TC, cc = e % TC, gi = row0 + i, gc = col0 + cc;
            float v = 0.0f;
            if (gi < r_end && gc < k) {
                v = x[(size_t)gi * k + gc] * lora_dropout_mult(p, seed, (u64)gi * k + gc);
            }
            xs[i][cc] = v;
        }
        __syncthreads();
        for (int i = 0; i < TN; ++i) {
            float xv = xs[i][c];
#pragma unroll
            for (int j = 0; j < RC / 4; ++j) {
                if (4 * j < r) acc[j] += gs[i][q0 + 4 * j] * xv;
            }
        }
        __syncthreads();
    }
    const int gc = col0 + c;
    if (gc < k) {
        float* out = da_part + (size_t)seg * r * k;
#pragma unroll
        for (int j = 0; j < RC / 4; ++j) {
            int q = q0 + 4 * j;
            if (q < r) out[(size_t)q * k + gc] = acc[j];
        }
    }
}

// dx += drop'(g A) in place (cuBLAS wrote dy W into dx). grid (ceil(n/TN), ceil(k/TC)).
extern "C" __global__ void lora_backward_dx(float* __restrict__ dx, const float* __restrict__ g,
                                            const float* __restrict__ a, int n, int k, int r,
                                            float p, u64 seed) {
    const int row0 = blockIdx.x * TN, col0 = blockIdx.y * TC;
    float acc[TC / 8];
    rank_product_tile(acc, g, a, n, k, r, 1, (size_t)k, row0, col0);
    const int gi = row0 + threadIdx.x / 8, tc = threadIdx.x % 8;
    if (gi < n) {
#pragma unroll
        for (int j = 0; j < TC / 8; ++j) {
            int gj = col0 + tc + 8 * j;
            if (gj < k) {
                size_t o = (size_t)gi * k + gj;
                dx[o] += lora_dropout_mult(p, seed, (u64)gi * k + gj) * acc[j];
            }
        }
    }
}
