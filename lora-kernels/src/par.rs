//! Small helpers for rayon parallelism over rows, shared by the elementwise and norm kernels.

use rayon::prelude::*;

/// Work below this many scalar operations runs on the calling thread: spawning costs more.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

/// Rows per rayon task so that each task has at least `PAR_THRESHOLD / 4` elements of work.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    let per_row = cols.max(1);
    let min_rows = (PAR_THRESHOLD / 4).div_ceil(per_row).max(1);
    let threads = rayon::current_num_threads().max(1);
    // Aim for a few tasks per thread for balance, never fewer rows than min_rows.
    rows.div_ceil(threads * 4).max(min_rows)
}

/// Runs `f(row_block_index_start, out_block)` over row blocks of `out` (rows of `cols` each),
/// in parallel when the work is large enough.
pub(crate) fn for_row_blocks<F>(out: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if cols == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / cols;
    if rows * cols < PAR_THRESHOLD || rayon::current_num_threads() == 1 {
        f(0, out);
        return;
    }
    let rpt = rows_per_task(rows, cols);
    out.par_chunks_mut(rpt * cols)
        .enumerate()
        .for_each(|(i, chunk)| f(i * rpt, chunk));
}

/// A raw pointer that may cross threads. Users promise (with a `// SAFETY:` comment) that
/// concurrent tasks write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: SendPtr is only used to write disjoint element sets from different rayon tasks; the
// buffer outlives the parallel region (it is borrowed mutably for the whole call).
unsafe impl Send for SendPtr {}
// SAFETY: see above.
unsafe impl Sync for SendPtr {}
