//! The launch shape every element-wise and row kernel uses.

use cudarc::driver::LaunchConfig;

/// Threads per block of every element-wise and row kernel.
pub(super) const THREADS: u32 = 256;

pub(super) fn blocks(n: usize, t: usize) -> u32 {
    n.div_ceil(t) as u32
}

/// A launch of `(x, y)` blocks of [`THREADS`] threads, no dynamic shared memory (every kernel).
pub(super) fn grid(x: u32, y: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
