// Element-wise ops: CUDA twins of lora-kernels/src/ops/elementwise.rs, same names and argument
// order (outputs first). Grid-stride loops; any launch size covers any length.

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

#define FOR_EACH(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// out = a + b
extern "C" __global__ void add_forward(float* out, const float* a, const float* b, long long n) {
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}

// out = gelu_tanh(x), as GPT-2's gelu_new
extern "C" __global__ void gelu_forward(float* out, const float* x, long long n) {
    FOR_EACH(i, n) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(GELU_K * (v + GELU_C * v * v * v)));
    }
}

// dx += dout * gelu_tanh'(x)
extern "C" __global__ void gelu_backward(float* dx, const float* dout, const float* x,
                                         long long n) {
    FOR_EACH(i, n) {
        float v = x[i];
        float t = tanhf(GELU_K * (v + GELU_C * v * v * v));
        float grad = 0.5f * (1.0f + t) +
                     0.5f * v * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] += dout[i] * grad;
    }
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
