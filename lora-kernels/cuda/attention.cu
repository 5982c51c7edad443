// Softmax attention with grouped-query heads, causal (query i sees keys 0..=i; S = T) or not
// (every key; `causal` = 0; S keys per sequence, S != T for cross-attention): CUDA twins of
// ops/attention.rs (attention_forward, attention_backward), same layouts and the same saved state:
//   q, out, dout: (B, T, Hq, D)    k, v: (B, S, Hkv, D)    lse: (B, Hq, T)
// Query head h reads kv head h / (Hq / Hkv). The probabilities are never stored: forward saves
// the log-sum-exp of each row, backward recomputes P = exp(scale q.k - lse).
//
// Design (simple and deterministic, no tensor cores): one warp owns ATT_ROWS rows; a block of
// ATT_WARPS warps loads 32-row tiles of the other operand into shared memory (rows padded to
// ATT_MAX_D + 1 floats so lane j reading row j hits bank (j + c) % 32), lane j scores tile row j,
// and the warp folds the tile in with shuffles. Every output element is written by one warp that
// walks its inputs in a fixed order: no atomics, results independent of scheduling.
//   attention_forward        grid (ceil(T / 8), Hq, B): online softmax over key tiles -> out, lse
//   attention_backward_delta same walk, writes delta_i = dO_i . O_i (= sum_j P_ij dP_ij)
//   attention_backward_dq    grid (ceil(T / 8), Hq, B): dq_i += scale sum_j P_ij (dP_ij - delta_i) k_j
//   attention_backward_dkv   grid (ceil(S / 8), Hkv, B): per key row j, over the group's heads
//                            and query tiles i >= j (every i when not causal):
//                            dk_j += scale dS_ij q_i, dv_j += P_ij dO_i
// Head dims up to ATT_MAX_D; the host refuses larger ones.

#define ATT_MAX_D 128
#define ATT_WARPS 4
#define ATT_ROWS 2
#define ATT_BLOCK_ROWS (ATT_WARPS * ATT_ROWS)
#define ATT_TILE 32
#define ATT_CHUNKS (ATT_MAX_D / 32)
#define ATT_PAD (ATT_MAX_D + 1)
#define ATT_FULL 0xffffffffu
#define ATT_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float att_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ATT_FULL, v, o);
    return v;
}

__device__ __forceinline__ float att_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ATT_FULL, v, o));
    return v;
}

// rows[r][c] = src[(row0 + r) * stride + c] for r < nrows (zero past T), c < D.
__device__ __forceinline__ void att_load_rows(float* rows, int ld, const float* src,
                                              size_t stride, int row0, int nrows, int T,
                                              int D) {
    for (int idx = threadIdx.x; idx < nrows * D; idx += blockDim.x) {
        int r = idx / D, c = idx - r * D, i = row0 + r;
        rows[r * ld + c] = i < T ? src[(size_t)i * stride + c] : 0.0f;
    }
}

// The forward walk for this block's query rows of (b, h). DELTA = false: writes out and lse.
// DELTA = true: writes delta_i = dout_i . out_i instead (out recomputed, never stored).
template <bool DELTA>
__device__ void att_forward_rows(float* out, float* lse, float* delta, const float* dout,
                                 const float* q, const float* k, const float* v, int T, int S,
                                 int Hq, int Hkv, int D, float scale, int causal) {
    __shared__ float ks[ATT_TILE][ATT_PAD];
    __shared__ float vs[ATT_TILE][ATT_PAD];
    __shared__ float qs[ATT_BLOCK_ROWS][ATT_MAX_D];
    int b = blockIdx.z, h = blockIdx.y, g = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = blockIdx.x * ATT_BLOCK_ROWS;
    size_t qstride = (size_t)Hq * D, kstride = (size_t)Hkv * D;
    const float* qb = q + (size_t)b * T * qstride + (size_t)h * D;
    const float* kb = k + (size_t)b * S * kstride + (size_t)g * D;
    const float* vb = v + (size_t)b * S * kstride + (size_t)g * D;
    att_load_rows(&qs[0][0], ATT_MAX_D, qb, qstride, row0, ATT_BLOCK_ROWS, T, D);
    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_CHUNKS];
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        m[rr] = ATT_NEG_INF;
        l[rr] = 0.0f;
#pragma unroll
        for (int cc = 0; cc < ATT_CHUNKS; cc++) acc[rr][cc] = 0.0f;
    }
    // The block's rows see keys 0 .. last - 1; row i sees 0 .. kend - 1 (i + 1, or S).
    int last = causal ? min(row0 + ATT_BLOCK_ROWS, T) : S;
    for (int j0 = 0; j0 < last; j0 += ATT_TILE) {
        __syncthreads();
        att_load_rows(&ks[0][0], ATT_PAD, kb, kstride, j0, ATT_TILE, S, D);
        att_load_rows(&vs[0][0], ATT_PAD, vb, kstride, j0, ATT_TILE, S, D);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ATT_ROWS; rr++) {
            int r = warp * ATT_ROWS + rr, i = row0 + r;
            int kend = causal ? i + 1 : S;
            if (i >= T || j0 >= kend) continue;  // warp-uniform
            int j = j0 + lane;
            float s = ATT_NEG_INF;
            if (j < kend) {
                float d = 0.0f;
                for (int c = 0; c < D; c++) d += qs[r][c] * ks[lane][c];
                s = scale * d;
            }
            float mnew = fmaxf(m[rr], att_warp_max(s));  // finite: key j0 < kend is in the tile
            float p = j < kend ? expf(s - mnew) : 0.0f;
            float corr = expf(m[rr] - mnew);
            l[rr] = l[rr] * corr + att_warp_sum(p);
            m[rr] = mnew;
#pragma unroll
            for (int cc = 0; cc < ATT_CHUNKS; cc++) acc[rr][cc] *= corr;
            int nj = min(ATT_TILE, kend - j0);
            for (int jj = 0; jj < nj; jj++) {
                float pj = __shfl_sync(ATT_FULL, p, jj);
#pragma unroll
                for (int cc = 0; cc < ATT_CHUNKS; cc++) {
                    int c = lane + 32 * cc;
                    if (c < D) acc[rr][cc] += pj * vs[jj][c];
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        int i = row0 + warp * ATT_ROWS + rr;
        if (i >= T) continue;
        float inv = 1.0f / l[rr];
        size_t o = ((size_t)b * T + i) * qstride + (size_t)h * D;
        size_t li = ((size_t)b * Hq + h) * T + i;
        if (DELTA) {
            float d = 0.0f;
#pragma unroll
            for (int cc = 0; cc < ATT_CHUNKS; cc++) {
                int c = lane + 32 * cc;
                if (c < D) d += dout[o + c] * (acc[rr][cc] * inv);
            }
            d = att_warp_sum(d);
            if (lane == 0) delta[li] = d;
        } else {
#pragma unroll
            for (int cc = 0; cc < ATT_CHUNKS; cc++) {
                int c = lane + 32 * cc;
                if (c < D) out[o + c] = acc[rr][cc] * inv;
            }
            if (lane == 0) lse[li] = m[rr] + logf(l[rr]);
        }
    }
}

// out = softmax(scale q k^T (+ causal mask)) v per head; lse (B, Hq, T). grid (ceil(T/8), Hq,
// B), 128 threads.
extern "C" __global__ void attention_forward(float* out, float* lse, const float* q,
                                             const float* k, const float* v, int T, int S,
                                             int Hq, int Hkv, int D, float scale, int causal) {
    att_forward_rows<false>(out, lse, nullptr, nullptr, q, k, v, T, S, Hq, Hkv, D, scale,
                            causal);
}

// delta (B, Hq, T) = rowsum(dout * out), out recomputed. Launch as attention_forward.
extern "C" __global__ void attention_backward_delta(float* delta, const float* dout,
                                                    const float* q, const float* k,
                                                    const float* v, int T, int S, int Hq,
                                                    int Hkv, int D, float scale, int causal) {
    att_forward_rows<true>(nullptr, nullptr, delta, dout, q, k, v, T, S, Hq, Hkv, D, scale,
                           causal);
}

// dq += scale * dS k, dS_ij = P_ij (dout_i . v_j - delta_i). grid (ceil(T/8), Hq, B).
extern "C" __global__ void attention_backward_dq(float* dq, const float* dout, const float* lse,
                                                 const float* delta, const float* q,
                                                 const float* k, const float* v, int T, int S,
                                                 int Hq, int Hkv, int D, float scale,
                                                 int causal) {
    __shared__ float ks[ATT_TILE][ATT_PAD];
    __shared__ float vs[ATT_TILE][ATT_PAD];
    __shared__ float qs[ATT_BLOCK_ROWS][ATT_MAX_D];
    __shared__ float dos[ATT_BLOCK_ROWS][ATT_MAX_D];
    int b = blockIdx.z, h = blockIdx.y, g = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = blockIdx.x * ATT_BLOCK_ROWS;
    size_t qstride = (size_t)Hq * D, kstride = (size_t)Hkv * D;
    size_t qoff = (size_t)b * T * qstride + (size_t)h * D;
    const float* kb = k + (size_t)b * S * kstride + (size_t)g * D;
    const float* vb = v + (size_t)b * S * kstride + (size_t)g * D;
    att_load_rows(&qs[0][0], ATT_MAX_D, q + qoff, qstride, row0, ATT_BLOCK_ROWS, T, D);
    att_load_rows(&dos[0][0], ATT_MAX_D, dout + qoff, qstride, row0, ATT_BLOCK_ROWS, T, D);
    float acc[ATT_ROWS][ATT_CHUNKS], lrow[ATT_ROWS], drow[ATT_ROWS];
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        int i = row0 + warp * ATT_ROWS + rr;
        size_t li = ((size_t)b * Hq + h) * T + i;
        lrow[rr] = i < T ? lse[li] : 0.0f;
        drow[rr] = i < T ? delta[li] : 0.0f;
#pragma unroll
        for (int cc = 0; cc < ATT_CHUNKS; cc++) acc[rr][cc] = 0.0f;
    }
    int last = causal ? min(row0 + ATT_BLOCK_ROWS, T) : S;
    for (int j0 = 0; j0 < last; j0 += ATT_TILE) {
        __syncthreads();
        att_load_rows(&ks[0][0], ATT_PAD, kb, kstride, j0, ATT_TILE, S, D);
        att_load_rows(&vs[0][0], ATT_PAD, vb, kstride, j0, ATT_TILE, S, D);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ATT_ROWS; rr++) {
            int r = warp * ATT_ROWS + rr, i = row0 + r;
            int kend = causal ? i + 1 : S;
            if (i >= T || j0 >= kend) continue;  // warp-uniform
            int j = j0 + lane;
            float ds = 0.0f;
            if (j < kend) {
                float sd = 0.0f, dp = 0.0f;
                for (int c = 0; c < D; c++) {
                    sd += qs[r][c] * ks[lane][c];
                    dp += dos[r][c] * vs[lane][c];
                }
                float p = expf(scale * sd - lrow[rr]);
                ds = p * (dp - drow[rr]);
            }
            int nj = min(ATT_TILE, kend - j0);
            for (int jj = 0; jj < nj; jj++) {
                float dsj = __shfl_sync(ATT_FULL, ds, jj);
#pragma unroll
                for (int cc = 0; cc < ATT_CHUNKS; cc++) {
                    int c = lane + 32 * cc;
                    if (c < D) acc[rr][cc] += dsj * ks[jj][c];
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        int i = row0 + warp * ATT_ROWS + rr;
        if (i >= T) continue;
        float* dqr = dq + ((size_t)b * T + i) * qstride + (size_t)h * D;
#pragma unroll
        for (int cc = 0; cc < ATT_CHUNKS; cc++) {
            int c = lane + 32 * cc;
            if (c < D) dqr[c] += scale * acc[rr][cc];
        }
    }
}

// dk_j += scale sum_{h in group, i >= j} dS_ij q_i;  dv_j += sum P_ij dout_i. grid (ceil(S/8), Hkv, B).
extern "C" __global__ void attention_backward_dkv(float* dk, float* dv, const float* dout,
                                                  const float* lse, const float* delta,
                                                  const float* q, const float* k,
                                                  const float* v, int T, int S, int Hq, int Hkv,
                                                  int D, float scale, int causal) {
    __shared__ float qt[ATT_TILE][ATT_PAD];
    __shared__ float dot[ATT_TILE][ATT_PAD];
    __shared__ float kr[ATT_BLOCK_ROWS][ATT_MAX_D];
    __shared__ float vr[ATT_BLOCK_ROWS][ATT_MAX_D];
    int b = blockIdx.z, g = blockIdx.y, rep = Hq / Hkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = blockIdx.x * ATT_BLOCK_ROWS;  // key rows of this block
    size_t qstride = (size_t)Hq * D, kstride = (size_t)Hkv * D;
    size_t koff = (size_t)b * S * kstride + (size_t)g * D;
    att_load_rows(&kr[0][0], ATT_MAX_D, k + koff, kstride, row0, ATT_BLOCK_ROWS, S, D);
    att_load_rows(&vr[0][0], ATT_MAX_D, v + koff, kstride, row0, ATT_BLOCK_ROWS, S, D);
    float ak[ATT_ROWS][ATT_CHUNKS], av[ATT_ROWS][ATT_CHUNKS];
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
#pragma unroll
        for (int cc = 0; cc < ATT_CHUNKS; cc++) {
            ak[rr][cc] = 0.0f;
            av[rr][cc] = 0.0f;
        }
    }
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        size_t qoff = (size_t)b * T * qstride + (size_t)h * D;
        const float* lh = lse + ((size_t)b * Hq + h) * T;
        const float* dh = delta + ((size_t)b * Hq + h) * T;
        // Causal: only query rows i >= j read key row j (the tiles from row0's on).
        for (int i0 = causal ? (row0 / ATT_TILE) * ATT_TILE : 0; i0 < T; i0 += ATT_TILE) {
            __syncthreads();
            att_load_rows(&qt[0][0], ATT_PAD, q + qoff, qstride, i0, ATT_TILE, T, D);
            att_load_rows(&dot[0][0], ATT_PAD, dout + qoff, qstride, i0, ATT_TILE, T, D);
            __syncthreads();
            int i = i0 + lane;
            float li = i < T ? lh[i] : 0.0f, di = i < T ? dh[i] : 0.0f;
            int ihi = min(ATT_TILE, T - i0);
#pragma unroll
            for (int rr = 0; rr < ATT_ROWS; rr++) {
                int r = warp * ATT_ROWS + rr, j = row0 + r;
                if (j >= S || (causal && i0 + ihi - 1 < j)) continue;  // warp-uniform: no i >= j
                float p = 0.0f, ds = 0.0f;
                if (i < T && (!causal || i >= j)) {
                    float sd = 0.0f, dp = 0.0f;
                    for (int c = 0; c < D; c++) {
                        sd += qt[lane][c] * kr[r][c];
                        dp += dot[lane][c] * vr[r][c];
                    }
                    p = expf(scale * sd - li);
                    ds = p * (dp - di);
                }
                for (int ii = causal ? max(0, j - i0) : 0; ii < ihi; ii++) {
                    float pi = __shfl_sync(ATT_FULL, p, ii);
                    float dsi = __shfl_sync(ATT_FULL, ds, ii);
#pragma unroll
                    for (int cc = 0; cc < ATT_CHUNKS; cc++) {
                        int c = lane + 32 * cc;
                        if (c < D) {
                            av[rr][cc] += pi * dot[ii][c];
                            ak[rr][cc] += dsi * qt[ii][c];
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        int j = row0 + warp * ATT_ROWS + rr;
        if (j >= S) continue;
        size_t o = ((size_t)b * S + j) * kstride + (size_t)g * D;
#pragma unroll
        for (int cc = 0; cc < ATT_CHUNKS; cc++) {
            int c = lane + 32 * cc;
            if (c < D) {
                dk[o + c] += scale * ak[rr][cc];
                dv[o + c] += av[rr][cc];
            }
        }
    }
}
