// A CPU execution shim for the CUDA kernels in lora-kernels/cuda/*.cu, so their code (index
// math, shared-memory tiling, barriers, warp shuffles, reductions, masks) runs and is checked on
// a machine without a GPU (scripts/cuda_emu/check.py). Not a performance model and not a GPU
// test: one OS thread per CUDA thread, one block at a time.
//
// - `__shared__` becomes `static`: blocks run one after another, so a static is per block.
// - `__syncthreads()` is a std::barrier over the block's threads; a thread that returns early
//   drops out of it (as exited threads do on sm_70+).
// - Warp shuffles go through a per-warp exchange buffer between two per-warp barriers, so all
//   32 lanes must reach them together (true of these kernels: their shuffles are warp-uniform).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 tid, bid;
inline thread_local int lin = 0;
inline dim3 bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<float> xbuf;

template <class... P, class... A>
void launch(void (*k)(P...), dim3 g, dim3 b, A... args) {
    gdim = g;
    bdim = b;
    const int nt = (int)(b.x * b.y * b.z), nw = (nt + 31) / 32;
    for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
            for (unsigned x = 0; x < g.x; ++x) {
                std::barrier<> bar(nt);
                block_bar = &bar;
                warp_bars.clear();
                for (int w = 0; w < nw; ++w)
                    warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
                xbuf.assign((size_t)nw * 32, 0.0f);
                std::vector<std::thread> ts;
                ts.reserve(nt);
                for (unsigned tz = 0; tz < b.z; ++tz)
                    for (unsigned ty = 0; ty < b.y; ++ty)
                        for (unsigned tx = 0; tx < b.x; ++tx)
                            ts.emplace_back([=, &bar] {
                                tid = dim3{tx, ty, tz};
                                bid = dim3{x, y, z};
                                lin = (int)(tx + b.x * (ty + b.y * tz));
                                k(args...);
                                bar.arrive_and_drop();
                                warp_bars[lin / 32]->arrive_and_drop();
                            });
                for (auto& t : ts) t.join();
            }
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// CUDA's integer min / max device functions.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

inline float __shfl_sync(unsigned, float v, int src) {
    const int w = emu::lin / 32, l = emu::lin % 32;
    emu::xbuf[(size_t)w * 32 + l] = v;
    emu::warp_bars[w]->arrive_and_wait();
    const float r = emu::xbuf[(size_t)w * 32 + (src & 31)];
    emu::warp_bars[w]->arrive_and_wait();
    return r;
}

inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    return __shfl_sync(mask, v, (emu::lin % 32) ^ o);
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float __int_as_float(int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
