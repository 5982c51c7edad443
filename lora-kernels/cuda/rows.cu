// Row-wise ops: CUDA twins of ops/norm.rs, ops/embedding.rs, ops/rope.rs and
// ops/cross_entropy.rs, same names, outputs first, same argument order plus explicit sizes.
// One block of 256 threads per row where a row reduction is needed; parameter gradients
// (dgamma, dbeta, the embedding table) are computed with one thread per column walking the rows
// in order, so they are deterministic (no atomics).

#define NEG_INF __int_as_float(0xff800000)

// Block-wide sum; every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    float t = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

__device__ float block_max(float v) {
    __shared__ float warp_max[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    float t = lane < (blockDim.x >> 5) ? warp_max[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// out = (x - mean) * rstd * gamma + beta; writes mean, rstd (n). beta may be null. grid (n).
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* x,
                                             const float* gamma, const float* beta, int n, int c,
                                             float eps) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* xr = x + (size_t)i * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    float m = block_sum(s) / c;
    float q = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) q += (xr[j] - m) * (xr[j] - m);
    float rs = 1.0f / sqrtf(block_sum(q) / c + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        out[(size_t)i * c + j] = (xr[j] - m) * rs * gamma[j] + (beta ? beta[j] : 0.0f);
    if (threadIdx.x == 0) {
        mean[i] = m;
        rstd[i] = rs;
    }
}

// dx += rs * (dn - mean(dn) - norm * mean(dn * norm)), dn = dout * gamma. grid (n).
extern "C" __global__ void layernorm_backward(float* dx, const float* dout, const float* x,
                                              const float* gamma, const float* mean,
                                              const float* rstd, int n, int c) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float *xr = x + (size_t)i * c, *dr = dout + (size_t)i * c;
    float m = mean[i], rs = rstd[i], s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float dn = dr[j] * gamma[j];
        s1 += dn;
        s2 += dn * (xr[j] - m) * rs;
    }
    s1 = block_sum(s1) / c;
    s2 = block_sum(s2) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float dn = dr[j] * gamma[j], nv = (xr[j] - m) * rs;
        dx[(size_t)i * c + j] += rs * (dn - s1 - nv * s2);
    }
}

// dgamma += sum_i dout * norm, dbeta += sum_i dout (either may be null). One thread per column.
extern "C" __global__ void layernorm_backward_params(float* dgamma, float* dbeta,
                                                     const float* dout, const float* x,
                                                     const float* mean, const float* rstd,
                                                     int n, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float g = 0.0f, b = 0.0f;
    for (int i = 0; i < n; ++i) {
        float d = dout[(size_t)i * c + j];
        g += d * (x[(size_t)i * c + j] - mean[i]) * rstd[i];
        b += d;
    }
    if (dgamma) dgamma[j] += g;
    if (dbeta) dbeta[j] += b;
}

// out = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps). grid (n).
extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* x,
                                           const float* gamma, int n, int c, float eps) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* xr = x + (size_t)i * c;
    float q = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) q += xr[j] * xr[j];
    float rs = 1.0f / sqrtf(block_sum(q) / c + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(size_t)i * c + j] = xr[j] * rs * gamma[j];
    if (threadIdx.x == 0) rstd[i] = rs;
}

// dx += rs * (dn - x * rs^2 * mean(dn * x)), dn = dout * gamma. grid (n).
extern "C" __global__ void rmsnorm_backward(float* dx, const float* dout, const float* x,
                                            const float* gamma, const float* rstd, int n, int c) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float *xr = x + (size_t)i * c, *dr = dout + (size_t)i * c;
    float rs = rstd[i], s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += dr[j] * gamma[j] * xr[j];
    s = block_sum(s) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        dx[(size_t)i * c + j] += rs * (dr[j] * gamma[j] - xr[j] * rs * rs * s);
}

// dgamma += sum_i dout * x * rstd. One thread per column.
extern "C" __global__ void rmsnorm_backward_params(float* dgamma, const float* dout,
                                                   const float* x, const float* rstd, int n,
                                                   int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float g = 0.0f;
    for (int i = 0; i < n; ++i) g += dout[(size_t)i * c + j] * x[(size_t)i * c + j] * rstd[i];
    dgamma[j] += g;
}

// out[i, :] = table[ids[i], :]. Ids are checked on the host. grid (n).
extern "C" __global__ void embedding_forward(float* out, const float* table,
                                             const unsigned int* ids, int n, int c) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* row = table + (size_t)ids[i] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(size_t)i * c + j] = row[j];
}

// dtable[ids[i], :] += dout[i, :], tokens in order: one thread per column (deterministic).
extern "C" __global__ void embedding_backward(float* dtable, const float* dout,
                                              const unsigned int* ids, int n, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    for (int i = 0; i < n; ++i) dtable[(size_t)ids[i] * c + j] += dout[(size_t)i * c + j];
}

// Rotary embedding, Hugging Face rotate_half convention; cos/sin (max_pos, d/2).
// inverse = 1 applies the transpose (backward) and accumulate = 1 adds into out.
// grid (n rows), threads over heads x d/2.
__device__ void rope_rotate(float* out, const float* x, const float* cosv, const float* sinv,
                            const unsigned int* positions, int n, int h, int d, int inverse,
                            int accumulate) {
    int i = blockIdx.x;
    if (i >= n) return;
    int half = d / 2;
    const float *cs = cosv + (size_t)positions[i] * half, *sn = sinv + (size_t)positions[i] * half;
    float sgn = inverse ? -1.0f : 1.0f;
    for (int e = threadIdx.x; e < h * half; e += blockDim.x) {
        int hh = e / half, k = e % half;
        size_t base = ((size_t)i * h + hh) * d;
        float a = x[base + k], b = x[base + k + half], s = sgn * sn[k];
        float lo = a * cs[k] - b * s, hi = b * cs[k] + a * s;
        if (accumulate) {
            out[base + k] += lo;
            out[base + k + half] += hi;
        } else {
            out[base + k] = lo;
            out[base + k + half] = hi;
        }
    }
}

extern "C" __global__ void rope_forward(float* out, const float* x, const float* cosv,
                                        const float* sinv, const unsigned int* positions, int n,
                                        int n_heads, int head_dim) {
    rope_rotate(out, x, cosv, sinv, positions, n, n_heads, head_dim, 0, 0);
}

extern "C" __global__ void rope_backward(float* dx, const float* dout, const float* cosv,
                                         const float* sinv, const unsigned int* positions, int n,
                                         int n_heads, int head_dim) {
    rope_rotate(dx, dout, cosv, sinv, positions, n, n_heads, head_dim, 1, 1);
}

// Per row: lse = log-sum-exp of the logits, row_loss = lse - logit[target] (0 when ignored).
// The host sums row_loss in order and divides by the count. grid (n).
extern "C" __global__ void cross_entropy_forward(float* lse, float* row_loss, const float* logits,
                                                 const int* targets, int n, int v) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* row = logits + (size_t)i * v;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(row[j] - m);
    float l = m + logf(block_sum(s));
    if (threadIdx.x == 0) {
        lse[i] = l;
        int t = targets[i];
        row_loss[i] = t >= 0 ? l - row[t] : 0.0f;
    }
}

// dlogits[i, :] += scale * (softmax(logits[i]) - onehot(target)), scale = dloss / count;
// ignored rows unchanged. grid (n).
extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* logits,
                                                  const float* lse, const int* targets, int n,
                                                  int v, float scale) {
    int i = blockIdx.x;
    if (i >= n) return;
    int t = targets[i];
    if (t < 0) return;
    const float* row = logits + (size_t)i * v;
    float* drow = dlogits + (size_t)i * v;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        drow[j] += scale * expf(row[j] - lse[i]) - (j == t ? scale : 0.0f);
    }
}

// out[b] = sum of squares of buffer b (ptrs[b], lens[b] floats) in f64: the gradient-norm sums
// of every adapter tensor in one launch and one read-back (the twin of the host's f64 sums).
// One block per buffer; each thread strides the buffer, then a fixed-order tree over the block
// (no atomics: deterministic). grid (count), 256 threads.
extern "C" __global__ void sum_squares_many(double* out, const unsigned long long* ptrs,
                                            const long long* lens, int count) {
    __shared__ double part[256];
    const int b = blockIdx.x, t = threadIdx.x;
    if (b >= count) return;
    const float* x = (const float*)ptrs[b];
    const long long n = lens[b];
    double acc = 0.0;
    for (long long i = t; i < n; i += blockDim.x) {
        double v = x[i];
        acc += v * v;
    }
    part[t] = acc;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    if (t == 0) out[b] = part[0];
}

// Batch norm in eval mode over x (n, c, p): y = (x - mean) rstd gamma + beta, rstd = 1 / sqrt(var
// + eps) per channel (ops/pool.rs). One thread per element.
extern "C" __global__ void batchnorm_forward(float* y, const float* x, const float* mean,
                                             const float* var, const float* gamma,
                                             const float* beta, long long total, int c, int p,
                                             float eps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int ch = (int)((i / p) % c);
    float rstd = 1.0f / sqrtf(var[ch] + eps);
    y[i] = (x[i] - mean[ch]) * (gamma[ch] * rstd) + beta[ch];
}

// dx += dy gamma rstd. One thread per element.
extern "C" __global__ void batchnorm_backward_dx(float* dx, const float* dy, const float* var,
                                                 const float* gamma, long long total, int c,
                                                 int p, float eps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int ch = (int)((i / p) % c);
    dx[i] += dy[i] * (gamma[ch] * (1.0f / sqrtf(var[ch] + eps)));
}

// dgamma[ch] += sum dy (x - mean) rstd, dbeta[ch] += sum dy over the n images and p pixels of
// channel ch: one block per channel, a fixed partition and tree (deterministic). Either output
// may be null (x is read for dgamma only). grid (c).
extern "C" __global__ void batchnorm_backward_params(float* dgamma, float* dbeta, const float* dy,
                                                     const float* x, const float* mean,
                                                     const float* var, int n, int c, int p,
                                                     float eps) {
    int ch = blockIdx.x;
    if (ch >= c) return;
    float rstd = 1.0f / sqrtf(var[ch] + eps);
    float sg = 0.0f, sb = 0.0f;
    long long count = (long long)n * p;
    for (long long t = threadIdx.x; t < count; t += blockDim.x) {
        long long i = ((t / p) * c + ch) * (long long)p + t % p;
        sb += dy[i];
        if (dgamma) sg += dy[i] * (x[i] - mean[ch]) * rstd;
    }
    sg = block_sum(sg);
    sb = block_sum(sb);
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[ch] += sg;
        if (dbeta) dbeta[ch] += sb;
    }
}

// GroupNorm over x (N, C, S), G groups of cg = C / G channels: one block per (sample, group)
// row of cg * s values. out = (x - mean) rstd gamma[ch] + beta[ch]; mean, rstd (N * G).
extern "C" __global__ void groupnorm_forward(float* out, float* mean, float* rstd, const float* x,
                                             const float* gamma, const float* beta, int rows,
                                             int g, int cg, int s, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    long long len = (long long)cg * s;
    const float* xr = x + (size_t)row * len;
    float sum = 0.0f;
    for (long long j = threadIdx.x; j < len; j += blockDim.x) sum += xr[j];
    float m = block_sum(sum) / (float)len;
    float q = 0.0f;
    for (long long j = threadIdx.x; j < len; j += blockDim.x) q += (xr[j] - m) * (xr[j] - m);
    float rs = 1.0f / sqrtf(block_sum(q) / (float)len + eps);
    int ch0 = (row % g) * cg;
    for (long long j = threadIdx.x; j < len; j += blockDim.x) {
        int ch = ch0 + (int)(j / s);
        out[(size_t)row * len + j] = (xr[j] - m) * rs * gamma[ch] + (beta ? beta[ch] : 0.0f);
    }
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

// dx += rs * (dn - mean(dn) - xhat * mean(dn * xhat)), dn = dout * gamma[ch]. grid (N * G).
extern "C" __global__ void groupnorm_backward(float* dx, const float* dout, const float* x,
                                              const float* gamma, const float* mean,
                                              const float* rstd, int rows, int g, int cg, int s) {
    int row = blockIdx.x;
    if (row >= rows) return;
    long long len = (long long)cg * s;
    const float *xr = x + (size_t)row * len, *dr = dout + (size_t)row * len;
    float m = mean[row], rs = rstd[row], s1 = 0.0f, s2 = 0.0f;
    int ch0 = (row % g) * cg;
    for (long long j = threadIdx.x; j < len; j += blockDim.x) {
        float dn = dr[j] * gamma[ch0 + (int)(j / s)];
        s1 += dn;
        s2 += dn * (xr[j] - m) * rs;
    }
    s1 = block_sum(s1) / (float)len;
    s2 = block_sum(s2) / (float)len;
    for (long long j = threadIdx.x; j < len; j += blockDim.x) {
        float dn = dr[j] * gamma[ch0 + (int)(j / s)], nv = (xr[j] - m) * rs;
        dx[(size_t)row * len + j] += rs * (dn - s1 - nv * s2);
    }
}

// dgamma[ch] += sum over samples and pixels of dout * xhat, dbeta[ch] += of dout (either may be
// null). One block per channel.
extern "C" __global__ void groupnorm_backward_params(float* dgamma, float* dbeta,
                                                     const float* dout, const float* x,
                                                     const float* mean, const float* rstd, int n,
                                                     int c, int g, int s) {
    int ch = blockIdx.x;
    if (ch >= c) return;
    int cg = c / g;
    float sg = 0.0f, sb = 0.0f;
    for (int i = 0; i < n; i++) {
        int row = i * g + ch / cg;
        float m = mean[row], rs = rstd[row];
        size_t off = ((size_t)i * c + ch) * s;
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            float dy = dout[off + j];
            sg += dy * (x[off + j] - m) * rs;
            sb += dy;
        }
    }
    sg = block_sum(sg);
    sb = block_sum(sb);
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[ch] += sg;
        if (dbeta) dbeta[ch] += sb;
    }
}
