// Pooling: CUDA twins of ops/pool.rs. Planes of (h, w) values, one per (image, channel). Max
// pooling takes the first maximum in row-major window order, NaN winning, padding never; its
// backward gathers, for each input element, the gradients of the outputs whose window picked it
// (no atomics: deterministic). Adaptive average pooling uses PyTorch's windows
// [floor(i size / o), ceil((i + 1) size / o)). Nearest upsampling by an integer factor f
// repeats each input f x f times; its backward sums each block in row-major order.

struct PoolDims {
    int h, w, kh, kw, sh, sw, ph, pw, oh, ow;
};

__device__ int pool_argmax(const float* plane, PoolDims d, int oy, int ox) {
    int y0 = oy * d.sh - d.ph, x0 = ox * d.sw - d.pw;
    float best = 0.0f;
    int at = -1;
    for (int i = 0; i < d.kh; ++i) {
        int y = y0 + i;
        if (y < 0 || y >= d.h) continue;
        for (int j = 0; j < d.kw; ++j) {
            int x = x0 + j;
            if (x < 0 || x >= d.w) continue;
            int idx = y * d.w + x;
            float v = plane[idx];
            if (at < 0 || v > best || v != v) {  // v != v: NaN
                best = v;
                at = idx;
                if (v != v) return at;
            }
        }
    }
    return at;
}

// y = the max of each window. One thread per output (planes * oh * ow).
extern "C" __global__ void max_pool2d_forward(float* y, const float* x, long long planes,
                                              PoolDims d) {
    long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long op = (long long)d.oh * d.ow;
    if (o >= planes * op) return;
    long long q = o / op;
    int i = (int)(o % op);
    const float* plane = x + q * d.h * d.w;
    y[o] = plane[pool_argmax(plane, d, i / d.ow, i % d.ow)];
}

// dx[e] += the dy of every output whose window picked e. One thread per input element.
extern "C" __global__ void max_pool2d_backward(float* dx, const float* dy, const float* x,
                                               long long planes, PoolDims d) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long p = (long long)d.h * d.w;
    if (e >= planes * p) return;
    long long q = e / p;
    int idx = (int)(e % p), y = idx / d.w, xx = idx % d.w;
    const float* plane = x + q * p;
    const float* g = dy + q * (long long)d.oh * d.ow;
    float acc = 0.0f;
    for (int oy = 0; oy < d.oh; ++oy) {
        int y0 = oy * d.sh - d.ph;
        if (y < y0 || y >= y0 + d.kh) continue;
        for (int ox = 0; ox < d.ow; ++ox) {
            int x0 = ox * d.sw - d.pw;
            if (xx < x0 || xx >= x0 + d.kw) continue;
            if (pool_argmax(plane, d, oy, ox) == idx) acc += g[oy * d.ow + ox];
        }
    }
    dx[e] += acc;
}

// y = the mean of each adaptive window. One thread per output.
extern "C" __global__ void adaptive_avg_pool2d_forward(float* y, const float* x, long long planes,
                                                       int h, int w, int oh, int ow) {
    long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long op = (long long)oh * ow;
    if (o >= planes * op) return;
    long long q = o / op;
    int oy = (int)(o % op) / ow, ox = (int)(o % op) % ow;
    int y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
    int x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
    const float* plane = x + q * (long long)h * w;
    float s = 0.0f;
    for (int yy = y0; yy < y1; ++yy)
        for (int xx = x0; xx < x1; ++xx) s += plane[yy * w + xx];
    y[o] = s / (float)((y1 - y0) * (x1 - x0));
}

// dx[e] += sum over the outputs whose window holds e of dy / window size. One thread per input.
extern "C" __global__ void adaptive_avg_pool2d_backward(float* dx, const float* dy,
                                                        long long planes, int h, int w, int oh,
                                                        int ow) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long p = (long long)h * w;
    if (e >= planes * p) return;
    long long q = e / p;
    int yy = (int)(e % p) / w, xx = (int)(e % p) % w;
    const float* g = dy + q * (long long)oh * ow;
    float acc = 0.0f;
    for (int oy = 0; oy < oh; ++oy) {
        int y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
        if (yy < y0 || yy >= y1) continue;
        for (int ox = 0; ox < ow; ++ox) {
            int x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
            if (xx < x0 || xx >= x1) continue;
            acc += g[oy * ow + ox] / (float)((y1 - y0) * (x1 - x0));
        }
    }
    dx[e] += acc;
}

// y (planes, h f, w f) = x[.., oy / f, ox / f]. One thread per output.
extern "C" __global__ void upsample_nearest_forward(float* y, const float* x, long long planes,
                                                    int h, int w, int f) {
    long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int ow = w * f;
    long long op = (long long)h * f * ow;
    if (o >= planes * op) return;
    long long q = o / op;
    int i = (int)(o % op), oy = i / ow, ox = i % ow;
    y[o] = x[q * h * w + (long long)(oy / f) * w + ox / f];
}

// dx (planes, h, w) += the sum of dy over each input's f x f block. One thread per input.
extern "C" __global__ void upsample_nearest_backward(float* dx, const float* dy,
                                                     long long planes, int h, int w, int f) {
    long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long ip = (long long)h * w;
    if (o >= planes * ip) return;
    long long q = o / ip;
    int i = (int)(o % ip), iy = i / w, ix = i % w, ow = w * f;
    const float* yp = dy + q * ip * f * f;
    float s = 0.0f;
    for (int a = 0; a < f; ++a) {
        const float* r = yp + (long long)(iy * f + a) * ow + ix * f;
        float rs = 0.0f;
        for (int b = 0; b < f; ++b) rs += r[b];
        s += rs;
    }
    dx[o] += s;
}
