//! The linear sum assignment problem: given a `rows x cols` cost matrix, pick one column for each
//! row (or one row for each column, whichever is fewer), no column twice, at the least total cost.
//! DETR-style detectors (YOLOS) match predictions to ground-truth objects with it.
//!
//! The algorithm is the shortest augmenting path method with dual potentials (Jonker-Volgenant,
//! in Crouse's rectangular form), the one scipy's `linear_sum_assignment` runs, with its
//! tie-breaking: the same matrix gives the same assignment as transformers' matcher. It runs on
//! the host: the matrices are small (queries x objects per image) and the algorithm is a
//! sequential graph search.

/// Why an assignment could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignError {
    /// `cost.len() != rows * cols`.
    Shape {
        /// Values given.
        len: usize,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A cost is NaN or -inf, or no assignment has a finite total cost.
    Infeasible,
}

impl std::fmt::Display for AssignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AssignError::Shape { len, rows, cols } => {
                write!(f, "linear_sum_assignment: {len} costs for a {rows}x{cols} matrix")
            }
            AssignError::Infeasible => write!(
                f,
                "linear_sum_assignment: the cost matrix is infeasible (NaN, -inf, or no finite assignment)"
            ),
        }
    }
}

impl std::error::Error for AssignError {}

/// The least-cost assignment for the row-major `rows x cols` matrix `cost`: `min(rows, cols)`
/// pairs `(row, col)`, sorted by row, as scipy's `linear_sum_assignment` returns them. `+inf`
/// marks a forbidden pair.
pub fn linear_sum_assignment(
    cost: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Vec<(usize, usize)>, AssignError> {
    if rows.checked_mul(cols) != Some(cost.len()) {
        return Err(AssignError::Shape {
            len: cost.len(),
            rows,
            cols,
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    if cost.iter().any(|c| c.is_nan() || *c == f64::NEG_INFINITY) {
        return Err(AssignError::Infeasible);
    }
    // The method needs at least as many columns as rows: solve the transpose otherwise.
    let transpose = rows > cols;
    let (nr, nc) = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let at = |i: usize, j: usize| {
        if transpose {
            cost[j * cols + i]
        } else {
            cost[i * cols + j]
        }
    };
    let mut u = vec![0.0f64; nr];
    let mut v = vec![0.0f64; nc];
    let mut shortest = vec![f64::INFINITY; nc];
    let mut path = vec![usize::MAX; nc];
    let mut col4row = vec![usize::MAX; nr];
    let mut row4col = vec![usize::MAX; nc];
    let mut sr = vec![false; nr];
    let mut sc = vec![false; nc];
    let mut remaining = vec![0usize; nc];
    for cur in 0..nr {
        // Dijkstra over the reduced costs from row `cur` until an unassigned column is reached.
        let mut min_val = 0.0f64;
        let mut n_rem = nc;
        for (k, r) in remaining.iter_mut().enumerate() {
            *r = nc - k - 1;
        }
        sr.fill(false);
        sc.fill(false);
        shortest.fill(f64::INFINITY);
        let mut sink = usize::MAX;
        let mut i = cur;
        while sink == usize::MAX {
            let mut index = usize::MAX;
            let mut lowest = f64::INFINITY;
            sr[i] = true;
            for (k, &j) in remaining[..n_rem].iter().enumerate() {
                let r = min_val + at(i, j) - u[i] - v[j];
                if r < shortest[j] {
                    path[j] = i;
                    shortest[j] = r;
                }
                // Among equal lowest costs, prefer a column that ends the path (scipy's rule).
                if shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == usize::MAX) {
                    lowest = shortest[j];
                    index = k;
                }
            }
            min_val = lowest;
            if min_val == f64::INFINITY || index == usize::MAX {
                return Err(AssignError::Infeasible);
            }
            let j = remaining[index];
            if row4col[j] == usize::MAX {
                sink = j;
            } else {
                i = row4col[j];
            }
            sc[j] = true;
            n_rem -= 1;
            remaining[index] = remaining[n_rem];
        }
        // Update the potentials.
        u[cur] += min_val;
        for r in 0..nr {
            if sr[r] && r != cur {
                u[r] += min_val - shortest[col4row[r]];
            }
        }
        for c in 0..nc {
            if sc[c] {
                v[c] -= min_val - shortest[c];
            }
        }
        // Augment along the path back to `cur`.
        let mut j = sink;
        loop {
            let r = path[j];
            row4col[j] = r;
            std::mem::swap(&mut col4row[r], &mut j);
            if r == cur {
                break;
            }
        }
    }
    let mut pairs: Vec<(usize, usize)> = if transpose {
        // Rows of the transpose are the columns: pair (col4row[k], k), sorted by that row.
        (0..nr).map(|k| (col4row[k], k)).collect()
    } else {
        (0..nr).map(|k| (k, col4row[k])).collect()
    };
    pairs.sort_unstable();
    Ok(pairs)
}

/// `f64` oracle: the least total cost over every assignment, by enumeration (small sizes only).
pub mod reference {
    /// The minimum total cost of assigning `min(rows, cols)` pairs.
    pub fn min_cost(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(cost: &[f64], cols: usize, row: usize, rows: usize, used: &mut Vec<bool>) -> f64 {
            if row == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..cols {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[row * cols + j] + go(cost, cols, row + 1, rows, used));
                    used[j] = false;
                }
            }
            best
        }
        if rows <= cols {
            go(cost, cols, 0, rows, &mut vec![false; cols])
        } else {
            let t: Vec<f64> = (0..cols)
                .flat_map(|j| (0..rows).map(move |i| (i, j)))
                .map(|(i, j)| cost[i * cols + j])
                .collect();
            go(&t, rows, 0, cols, &mut vec![false; rows])
        }
    }
}
