// AdamW update, the CUDA twin of lora-kernels/src/ops/adamw.rs `adamw_step` (torch.optim.AdamW's
// order of operations in f32): decay, moments, bias-corrected step. The host computes the
// per-step scalars in f64 and rounds them once (`AdamStep`): decay = 1 - lr * weight_decay,
// step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
extern "C" __global__ void adamw_step(float* param, const float* grad, float* m, float* v,
                                      long long n, float decay, float beta1, float beta2,
                                      float eps, float step_size, float bc2_sqrt) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grad[i];
        float p = param[i] * decay;
        float mi = m[i] + (g - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = p - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
