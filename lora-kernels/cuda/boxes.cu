// Box losses: CUDA twins of ops/boxes.rs. Boxes are (cx, cy, w, h); generalized IoU on their
// corners, in double precision as the host computes it. The forward sums over the M matched pairs
// in one block (a fixed tree order: deterministic); the backward is one thread per pair.

__device__ void box_giou_grad(const float* a, const float* b, double* giou, double g[4]) {
    double x0 = (double)a[0] - 0.5 * (double)a[2], y0 = (double)a[1] - 0.5 * (double)a[3];
    double x1 = (double)a[0] + 0.5 * (double)a[2], y1 = (double)a[1] + 0.5 * (double)a[3];
    double u0 = (double)b[0] - 0.5 * (double)b[2], v0 = (double)b[1] - 0.5 * (double)b[3];
    double u1 = (double)b[0] + 0.5 * (double)b[2], v1 = (double)b[1] + 0.5 * (double)b[3];
    double area_a = (x1 - x0) * (y1 - y0), area_b = (u1 - u0) * (v1 - v0);
    double ix0 = fmax(x0, u0), ix1 = fmin(x1, u1), iy0 = fmax(y0, v0), iy1 = fmin(y1, v1);
    double iw = fmax(ix1 - ix0, 0.0), ih = fmax(iy1 - iy0, 0.0);
    double inter = iw * ih, uni = area_a + area_b - inter, iou = inter / uni;
    double ex0 = fmin(x0, u0), ex1 = fmax(x1, u1), ey0 = fmin(y0, v0), ey1 = fmax(y1, v1);
    double ew = fmax(ex1 - ex0, 0.0), eh = fmax(ey1 - ey0, 0.0), enc = ew * eh;
    *giou = iou - (enc - uni) / enc;
    bool iw_on = (ix1 - ix0) > 0.0, ih_on = (iy1 - iy0) > 0.0;
    bool ew_on = (ex1 - ex0) > 0.0, eh_on = (ey1 - ey0) > 0.0;
    double d_iw[4] = {iw_on && x0 > u0 ? -1.0 : 0.0, 0.0, iw_on && x1 < u1 ? 1.0 : 0.0, 0.0};
    double d_ih[4] = {0.0, ih_on && y0 > v0 ? -1.0 : 0.0, 0.0, ih_on && y1 < v1 ? 1.0 : 0.0};
    double d_ew[4] = {ew_on && x0 < u0 ? -1.0 : 0.0, 0.0, ew_on && x1 > u1 ? 1.0 : 0.0, 0.0};
    double d_eh[4] = {0.0, eh_on && y0 < v0 ? -1.0 : 0.0, 0.0, eh_on && y1 > v1 ? 1.0 : 0.0};
    double w = x1 - x0, h = y1 - y0;
    double d_area[4] = {-h, -w, h, w};
    double c[4];
    for (int k = 0; k < 4; ++k) {
        double d_inter = d_iw[k] * ih + iw * d_ih[k];
        double d_union = d_area[k] - d_inter;
        double d_iou = (d_inter * uni - inter * d_union) / (uni * uni);
        double d_enc = d_ew[k] * eh + ew * d_eh[k];
        c[k] = d_iou + (d_union * enc - uni * d_enc) / (enc * enc);
    }
    g[0] = c[0] + c[2];
    g[1] = c[1] + c[3];
    g[2] = 0.5 * (c[2] - c[0]);
    g[3] = 0.5 * (c[3] - c[1]);
}

// out[0] = sum |p - t| / nb, out[1] = sum (1 - giou) / nb. Launch: one block of 256 threads.
extern "C" __global__ void box_losses_forward(float* out, const float* pred, const float* target,
                                              long long m, float nb) {
    __shared__ double s1[256], s2[256];
    double l1 = 0.0, gl = 0.0;
    for (long long i = threadIdx.x; i < m; i += blockDim.x) {
        const float* p = pred + 4 * i;
        const float* t = target + 4 * i;
        for (int k = 0; k < 4; ++k) l1 += fabs((double)(p[k] - t[k]));
        double giou, g[4];
        box_giou_grad(p, t, &giou, g);
        gl += 1.0 - giou;
    }
    s1[threadIdx.x] = l1;
    s2[threadIdx.x] = gl;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            s1[threadIdx.x] += s1[threadIdx.x + s];
            s2[threadIdx.x] += s2[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = (float)(s1[0] / (double)nb);
        out[1] = (float)(s2[0] / (double)nb);
    }
}

// dpred += (dout[0] sign(p - t) - dout[1] dgiou/dp) / nb. One thread per pair.
extern "C" __global__ void box_losses_backward(float* dpred, const float* dout, const float* pred,
                                               const float* target, long long m, float nb) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    const float* p = pred + 4 * i;
    const float* t = target + 4 * i;
    double s1 = (double)dout[0] / (double)nb, s2 = (double)dout[1] / (double)nb;
    double giou, g[4];
    box_giou_grad(p, t, &giou, g);
    for (int k = 0; k < 4; ++k) {
        float d = p[k] - t[k];
        double sign = d > 0.0f ? 1.0 : (d < 0.0f ? -1.0 : 0.0);
        dpred[4 * i + k] += (float)(s1 * sign - s2 * g[k]);
    }
}
