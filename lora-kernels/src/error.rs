//! Typed errors for the kernels: every check names the op and the argument that was wrong.

/// Errors raised by kernel argument validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length does not match the dimensions the op was given.
    #[error("{op}: `{arg}` has {got} elements, expected {expected} ({shape})")]
    BadLength {
        /// The kernel that rejected the call.
        op: &'static str,
        /// The argument name.
        arg: &'static str,
        /// Expected element count.
        expected: usize,
        /// Actual element count.
        got: usize,
        /// The expected shape, for the message.
        shape: String,
    },
    /// An index (token id, target class, position) is outside its table.
    #[error("{op}: `{arg}`[{index}] = {value} is out of range (must be < {limit})")]
    IndexOutOfRange {
        /// The kernel that rejected the call.
        op: &'static str,
        /// The argument name.
        arg: &'static str,
        /// Position in the index buffer.
        index: usize,
        /// The offending value.
        value: i64,
        /// Exclusive upper bound.
        limit: usize,
    },
    /// A scalar or dimension argument is invalid (zero heads, odd head dim for RoPE, p >= 1 ...).
    #[error("{op}: invalid argument `{arg}`: {reason}")]
    InvalidArg {
        /// The kernel that rejected the call.
        op: &'static str,
        /// The argument name.
        arg: &'static str,
        /// What was expected.
        reason: String,
    },
    /// The device (GPU driver, cuBLAS, a kernel launch, a copy) reported a failure.
    #[error("device: {0}")]
    Device(String),
}

/// Result alias for kernel calls.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks that `buf_len == expected`, naming `op`, `arg` and the shape otherwise.
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    got: usize,
    dims: &[usize],
) -> Result<()> {
    // Checked: a product that wraps around (dims of 2^32 each) would otherwise equal a short
    // buffer's length and let an unchecked kernel read past it.
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX);
    if got == expected && expected != usize::MAX {
        Ok(())
    } else {
        Err(KernelError::BadLength {
            op,
            arg,
            expected,
            got,
            shape: format!("{dims:?}"),
        })
    }
}

/// Builds an [`KernelError::InvalidArg`].
pub(crate) fn invalid(
    op: &'static str,
    arg: &'static str,
    reason: impl Into<String>,
) -> KernelError {
    KernelError::InvalidArg {
        op,
        arg,
        reason: reason.into(),
    }
}
