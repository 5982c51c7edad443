// 2-D convolution: CUDA twins of the im2col / col2im steps of ops/conv.rs (the products are
// cuBLAS's). Layouts as there: x (N, C, H, W), cols (g, K, P) with K = C/g * KH * KW and
// P = OH * OW, one image per launch (`img`). Both kernels write every element they own once:
// im2col one thread per cols element, col2im one thread per input element gathering its taps
// in (kernel row, kernel column) order, so the result is deterministic (no atomics).

struct ConvDims {
    int c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow;
};

// cols[(grp * K + (c * KH + i) * KW + j) * P + oy * OW + ox] = x[img, grp * C/g + c, y, x] or 0
// in the padding. grid over g * K * P.
extern "C" __global__ void conv_im2col(float* cols, const float* x, int img, ConvDims d) {
    long long p = (long long)d.oh * d.ow;
    int cg = d.c / d.groups;
    long long k = (long long)cg * d.kh * d.kw;
    long long total = d.groups * k * p;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    long long r = t / p, q = t % p;
    int grp = (int)(r / k), rem = (int)(r % k);
    int c = rem / (d.kh * d.kw), i = (rem / d.kw) % d.kh, j = rem % d.kw;
    int oy = (int)(q / d.ow), ox = (int)(q % d.ow);
    int y = oy * d.sh - d.ph + i * d.dh, xx = ox * d.sw - d.pw + j * d.dw;
    float v = 0.0f;
    if (y >= 0 && y < d.h && xx >= 0 && xx < d.w) {
        long long plane = (long long)img * d.c + grp * cg + c;
        v = x[(plane * d.h + y) * d.w + xx];
    }
    cols[t] = v;
}

// dx[img, ci, y, x] += the sum of dcols over the taps that read it. grid over C * H * W.
extern "C" __global__ void conv_col2im(float* dx, const float* dcols, int img, ConvDims d) {
    long long hw = (long long)d.h * d.w;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)d.c * hw) return;
    int ci = (int)(t / hw), y = (int)((t % hw) / d.w), xx = (int)(t % d.w);
    int cg = d.c / d.groups, grp = ci / cg, c = ci % cg;
    long long p = (long long)d.oh * d.ow;
    long long k = (long long)cg * d.kh * d.kw;
    float acc = 0.0f;
    for (int i = 0; i < d.kh; ++i) {
        int ty = y + d.ph - i * d.dh;
        if (ty < 0 || ty % d.sh != 0) continue;
        int oy = ty / d.sh;
        if (oy >= d.oh) continue;
        for (int j = 0; j < d.kw; ++j) {
            int tx = xx + d.pw - j * d.dw;
            if (tx < 0 || tx % d.sw != 0) continue;
            int ox = tx / d.sw;
            if (ox >= d.ow) continue;
            long long row = grp * k + (c * d.kh + i) * d.kw + j;
            acc += dcols[row * p + (long long)oy * d.ow + ox];
        }
    }
    dx[(long long)img * d.c * hw + t] += acc;
}
