//! The error type of lora-core: structured fields (op, tensor, shapes, field names) so callers
//! can print a message that says what was wrong and where.

use lora_kernels::KernelError;

/// Errors from tensor ops, autograd and LoRA layers.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A kernel rejected its arguments.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Tensor shapes do not fit an op.
    #[error("{op}: {what} has shape {got:?}, expected {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// Which operand.
        what: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// A data buffer does not hold `product(shape)` values.
    #[error("tensor data has {len} values but shape {shape:?} needs {needed}")]
    DataLength {
        /// Values given.
        len: usize,
        /// Shape asked for.
        shape: Vec<usize>,
        /// Values needed.
        needed: usize,
    },
    /// A CUDA device was asked for and cannot be used.
    #[error("device {0}: {1} (use --device cpu)")]
    CudaUnavailable(String, String),
    /// The operands of an op are on different devices.
    #[error(
        "device: {op}: `{first}` is on {first_on} but `{other}` is on {other_on}; move the model \
         and its inputs to one device (Tensor::to_device)"
    )]
    MixedDevices {
        /// The op.
        op: &'static str,
        /// The first operand and its device.
        first: &'static str,
        /// Where it is.
        first_on: crate::Device,
        /// The operand on another device.
        other: &'static str,
        /// Where that one is.
        other_on: crate::Device,
    },
    /// A tensor and its gradient (or an op's gradients) are on different devices.
    #[error("device: {0}: a tensor and its gradient are on different devices")]
    MixedGradients(String),
    /// What was asked is not available where the tensors are (TF32 on the CPU, SGD on a GPU,
    /// training a 16-bit frozen weight).
    #[error("device: {0}")]
    Unsupported(&'static str),
    /// A broken internal invariant (a bug in lora-core, never bad input).
    #[error("internal: {0}")]
    Internal(&'static str),
    /// A device name could not be parsed.
    #[error("unknown device `{0}` (expected cpu, cuda or cuda:N)")]
    BadDevice(String),
    /// `backward` reached an op that has no backward rule.
    #[error("op `{0}` has no backward rule")]
    NoBackward(&'static str),
    /// `backward` was called on something that is not a scalar.
    #[error("backward needs a scalar loss, got shape {0:?}")]
    NotScalar(Vec<usize>),
    /// A NaN or infinity where finite values are required.
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite {
        /// What was being computed or checked.
        what: String,
        /// First offending index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A configuration field is out of range.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The field name as the user writes it.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// An operation that needs an unmerged (or merged) layer.
    #[error("{0}")]
    MergeState(&'static str),
    /// A weight cannot be packed for the bf16 products (why, naming the tensor).
    #[error("{0}")]
    Packing(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, CoreError>;

/// Checks a buffer for NaN/inf, naming `what` and the first bad index.
pub fn check_finite(what: impl Into<String>, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(CoreError::NonFinite {
            what: what.into(),
            index: i,
            value: data[i],
        }),
    }
}
