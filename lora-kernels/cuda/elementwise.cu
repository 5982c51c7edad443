// Element-wise ops: CUDA twins of lora-kernels/src/ops/elementwise.rs, same names and argument
// order (outputs first). Grid-stride loops; any launch size covers any length.

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

#define FOR_EACH(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// Exactly 0 below -87, as fastmath::sigmoid.
__device__ __forceinline__ float sigmoidf(float x) {
    return x < -87.0f ? 0.0f : 1.0f / (1.0f + expf(-x));
}

// out = a + b
extern "C" __global__ void add_forward(float* out, const float* a, const float* b, long long n) {
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}

// dst += src (gradient accumulation), the twin of elementwise.rs accumulate
extern "C" __global__ void accumulate(float* dst, const float* src, long long n) {
    FOR_EACH(i, n) dst[i] += src[i];
}

// x *= s (gradient averaging and clipping)
extern "C" __global__ void scale_in_place(float* x, float s, long long n) {
    FOR_EACH(i, n) x[i] *= s;
}

// y (n, m) += bias (m) broadcast over rows: a frozen linear's bias after the cuBLAS product
extern "C" __global__ void bias_add(float* y, const float* bias, long long n, int m) {
    FOR_EACH(i, n * m) y[i] += bias[i % m];
}

// out = gelu_tanh(x), as GPT-2's gelu_new: 0.5 x (1 + tanh z) evaluated as x sigmoid(2z), which
// keeps full precision where tanh z nears -1 (elementwise.rs has the derivation).
extern "C" __global__ void gelu_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) {
        float v = x[i];
        out[i] = v * sigmoidf(2.0f * GELU_K * (v + GELU_C * v * v * v));
    }
}

// dx += dout * gelu_tanh'(x) = s + x 2 s (1 - s) z', s = 1 / (1 + q), q = e^{-2z}, 1 - s = q s;
// exactly 1 / 0 past |z| = 43, as elementwise.rs.
extern "C" __global__ void gelu_backward(float* dx, const float* dout, const float* x,
                                         long long n) {
    FOR_EACH(i, n) {
        float v = x[i];
        float z = GELU_K * (v + GELU_C * v * v * v);
        float grad;
        if (z > 43.0f) {
            grad = 1.0f;
        } else if (z < -43.0f) {
            grad = 0.0f;
        } else {
            float q = expf(-2.0f * z);
            float s = 1.0f / (1.0f + q);
            grad = s + 2.0f * v * (q * s) * s * GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        }
        dx[i] += dout[i] * grad;
    }
}

// out = gelu_erf(x) = 0.5 x erfc(-x / sqrt 2) (exact GELU without the cancellation of 1 + erf)
extern "C" __global__ void gelu_erf_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) out[i] = 0.5f * x[i] * erfcf(-x[i] * 0.70710678118654752f);
}

// dx += dout * (Phi(x) + x phi(x))
extern "C" __global__ void gelu_erf_backward(float* dx, const float* dout, const float* x,
                                             long long n) {
    FOR_EACH(i, n) {
        float v = x[i];
        float grad = 0.5f * erfcf(-v * 0.70710678118654752f)
                   + v * 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] += dout[i] * grad;
    }
}

// out = x sigmoid(1.702 x) (CLIP's quick_gelu)
extern "C" __global__ void quick_gelu_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) out[i] = x[i] * sigmoidf(1.702f * x[i]);
}

// dx += dout * (s + z s sigmoid(-z)), z = 1.702 x, s = sigmoid(z)
extern "C" __global__ void quick_gelu_backward(float* dx, const float* dout, const float* x,
                                               long long n) {
    FOR_EACH(i, n) {
        float z = 1.702f * x[i];
        float s = sigmoidf(z);
        dx[i] += dout[i] * (s + z * s * sigmoidf(-z));
    }
}

// out = max(x, 0), NaN kept
extern "C" __global__ void relu_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) out[i] = x[i] <= 0.0f ? 0.0f : x[i];
}

// dx += dout * [x > 0]
extern "C" __global__ void relu_backward(float* dx, const float* dout, const float* x,
                                         long long n) {
    FOR_EACH(i, n) if (x[i] > 0.0f) dx[i] += dout[i];
}

// out = sigmoid(x)
extern "C" __global__ void sigmoid_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) out[i] = sigmoidf(x[i]);
}

// dx += dout * sigmoid(x) sigmoid(-x)
extern "C" __global__ void sigmoid_backward(float* dx, const float* dout, const float* x,
                                            long long n) {
    FOR_EACH(i, n) dx[i] += dout[i] * (sigmoidf(x[i]) * sigmoidf(-x[i]));
}

// out = x * sigmoid(x)
extern "C" __global__ void silu_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) out[i] = x[i] * sigmoidf(x[i]);
}

// dx += dout * silu'(x)
extern "C" __global__ void silu_backward(float* dx, const float* dout, const float* x,
                                         long long n) {
    FOR_EACH(i, n) {
        float sg = sigmoidf(x[i]);
        dx[i] += dout[i] * sg * (1.0f + x[i] * (1.0f - sg));
    }
}

// out = silu(gate) * up
extern "C" __global__ void swiglu_forward(float* out, const float* gate, const float* up,
                                          long long n) {
    FOR_EACH(i, n) out[i] = gate[i] * sigmoidf(gate[i]) * up[i];
}

// dgate += dout * up * silu'(gate); dup += dout * silu(gate)
extern "C" __global__ void swiglu_backward(float* dgate, float* dup, const float* dout,
                                           const float* gate, const float* up, long long n) {
    FOR_EACH(i, n) {
        float sg = sigmoidf(gate[i]);
        float si = gate[i] * sg;
        dgate[i] += dout[i] * up[i] * sg * (1.0f + gate[i] * (1.0f - sg));
        dup[i] += dout[i] * si;
    }
}

// GEGLU: out (rows, f) = hidden * gelu_erf(gate), each row of x (rows, 2f) = [hidden | gate];
// n = rows * f outputs.
extern "C" __global__ void geglu_forward(float* out, const float* x, long long n, int f) {
    FOR_EACH(i, n) {
        long long r = i / f, j = i - r * f;
        float h = x[r * 2 * f + j], g = x[r * 2 * f + f + j];
        out[i] = h * (0.5f * g * erfcf(-g * 0.70710678118654752f));
    }
}

// dx (rows, 2f) += [dout * gelu_erf(gate) | dout * hidden * gelu_erf'(gate)]; one thread per
// output element (it alone writes its hidden and gate positions).
extern "C" __global__ void geglu_backward(float* dx, const float* dout, const float* x,
                                          long long n, int f) {
    FOR_EACH(i, n) {
        long long r = i / f, j = i - r * f;
        long long hi = r * 2 * f + j, gi = hi + f;
        float h = x[hi], g = x[gi];
        float ge = 0.5f * g * erfcf(-g * 0.70710678118654752f);
        float grad = 0.5f * erfcf(-g * 0.70710678118654752f)
                   + g * 0.39894228040143268f * expf(-0.5f * g * g);
        dx[hi] += dout[i] * ge;
        dx[gi] += dout[i] * h * grad;
    }
}

// out = x + bias[i / inner]: a (B, C) bias over (B, C, H, W) planes of `inner` values.
extern "C" __global__ void add_planes_forward(float* out, const float* x, const float* bias,
                                              long long n, int inner) {
    FOR_EACH(i, n) out[i] = x[i] + bias[i / inner];
}

// dbias[p] += sum of dout's plane p: one warp per plane (lane partial sums in index order,
// then a fixed shuffle tree: deterministic). Launch planes * 32 threads.
extern "C" __global__ void add_planes_backward_bias(float* dbias, const float* dout,
                                                    long long planes, int inner) {
    long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (p >= planes) return;  // warp-uniform
    const float* src = dout + p * inner;
    float s = 0.0f;
    for (int k = lane; k < inner; k += 32) s += src[k];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) dbias[p] += s;
}

// out = f32(bits): bfloat16 (the top half of an f32) or IEEE half, the twin of
// lora_linear.rs `WeightData::widen`. Frozen weights can live on the device as 16-bit and be
// widened into an f32 scratch right before their GEMMs (exact).
extern "C" __global__ void widen_bf16(float* out, const unsigned short* bits, long long n) {
    FOR_EACH(i, n) out[i] = __uint_as_float(((unsigned int)bits[i]) << 16);
}

extern "C" __global__ void widen_f16(float* out, const unsigned short* bits, long long n) {
    FOR_EACH(i, n) {
        unsigned int h = bits[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
                     m = h & 0x3ffu, f;
        if (e == 0x1fu) {
            f = sign | 0x7f800000u | (m << 13);  // inf / NaN
        } else if (e != 0) {
            f = sign | ((e + 112u) << 23) | (m << 13);  // normal: rebias 15 -> 127
        } else if (m == 0) {
            f = sign;  // zero
        } else {
            // subnormal: m * 2^-24, renormalised
            int shift = 0;
            while (!(m & 0x400u)) {
                m <<= 1;
                shift++;
            }
            f = sign | ((unsigned int)(113 - shift) << 23) | ((m & 0x3ffu) << 13);
        }
        out[i] = __uint_as_float(f);
    }
}

// out (n, len) = x (n, cols)[:, start .. start + len], the twin of ops/slice.rs narrow_forward.
extern "C" __global__ void narrow_forward(float* out, const float* x, long long n, int cols,
                                          int start, int len) {
    FOR_EACH(i, n * len) {
        long long r = i / len, j = i - r * len;
        out[i] = x[r * cols + start + j];
    }
}

// dx[:, start .. start + len] += dout (n, len), the twin of narrow_backward.
extern "C" __global__ void narrow_backward(float* dx, const float* dout, long long n, int cols,
                                           int start, int len) {
    FOR_EACH(i, n * len) {
        long long r = i / len, j = i - r * len;
        dx[r * cols + start + j] += dout[i];
    }
}

// out (batch, n, m) = x (batch, m, n) with the last two dimensions swapped, written or (with
// acc != 0) added: the twin of ops/slice.rs transpose. One thread per output element, so the
// writes are coalesced.
extern "C" __global__ void transpose_last2(float* out, const float* x, long long batch, int m,
                                           int n, int acc) {
    FOR_EACH(o, batch * m * n) {
        long long i = o % m, bj = o / m;
        long long j = bj % n, b = bj / n;
        float v = x[(b * m + i) * n + j];
        out[o] = acc ? out[o] + v : v;
    }
}
