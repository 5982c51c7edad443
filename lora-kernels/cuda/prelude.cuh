// Prepended to every kernel source before NVRTC compiles it (lora-kernels/src/cuda.rs).
// Mirrors lora-kernels/src/rng.rs bit for bit, so a CUDA dropout mask equals the CPU one.

typedef unsigned long long u64;

__device__ __forceinline__ u64 lora_splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Inverted-dropout multiplier of element `index` of stream `seed` (rng.rs::dropout_mult).
__device__ __forceinline__ float lora_dropout_mult(float p, u64 seed, u64 index) {
    if (p <= 0.0f) return 1.0f;
    u64 h = lora_splitmix64(seed ^ lora_splitmix64(index));
    float uni = (float)(h >> 40) * (1.0f / 16777216.0f);
    return uni < p ? 0.0f : 1.0f / (1.0f - p);
}
