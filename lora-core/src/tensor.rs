//! `Tensor`: a shared handle to contiguous row-major f32 data with a shape.
//!
//! Cloning a tensor clones the handle, not the data. Data sit behind a lock so an optimizer (or
//! `merge`) can update a parameter in place while other handles see the change; ops read it
//! through [`Tensor::data`]. Each tensor has a process-unique id, which is how gradients are keyed.

use crate::device::Device;
use crate::error::{CoreError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    shape: Vec<usize>,
    data: RwLock<Vec<f32>>,
    requires_grad: bool,
    device: Device,
}

/// A contiguous row-major f32 tensor.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor(id={}, shape={:?}, requires_grad={})", self.0.id, self.0.shape, self.0.requires_grad)
    }
}

impl Tensor {
    fn build(data: Vec<f32>, shape: &[usize], requires_grad: bool, device: Device) -> Result<Self> {
        device.ensure_available()?;
        let needed: usize = shape.iter().product();
        if data.len() != needed {
            return Err(CoreError::DataLength { len: data.len(), shape: shape.to_vec(), needed });
        }
        Ok(Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shape: shape.to_vec(),
            data: RwLock::new(data),
            requires_grad,
            device,
        })))
    }

    /// A constant (frozen) CPU tensor: it never receives a gradient.
    pub fn new(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(data, shape, false, Device::Cpu)
    }

    /// A trainable CPU tensor: backward computes its gradient.
    pub fn param(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(data, shape, true, Device::Cpu)
    }

    /// A tensor on `device` (errors for CUDA until that backend exists).
    pub fn new_on(data: Vec<f32>, shape: &[usize], requires_grad: bool, device: Device) -> Result<Self> {
        Self::build(data, shape, requires_grad, device)
    }

    /// Zeros, frozen.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::new(vec![0.0; shape.iter().product()], shape)
    }

    /// An op result: requires grad iff one of its inputs does.
    pub(crate) fn from_op(data: Vec<f32>, shape: &[usize], requires_grad: bool) -> Result<Self> {
        Self::build(data, shape, requires_grad, Device::Cpu)
    }

    /// Process-unique id.
    pub fn id(&self) -> u64 {
        self.0.id
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.shape.iter().product()
    }
    /// Last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.0.shape.last().copied().unwrap_or(1)
    }
    /// Product of all but the last dimension: the number of rows seen by row-wise ops.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }
    /// Whether backward computes a gradient for this tensor.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    /// Its device.
    pub fn device(&self) -> Device {
        self.0.device
    }
    /// Read access to the data.
    pub fn data(&self) -> RwLockReadGuard<'_, Vec<f32>> {
        self.0.data.read().unwrap_or_else(|e| e.into_inner())
    }
    /// Write access to the data (optimizer steps, merge). The shape cannot change.
    pub fn data_mut(&self) -> RwLockWriteGuard<'_, Vec<f32>> {
        self.0.data.write().unwrap_or_else(|e| e.into_inner())
    }
    /// A copy of the data.
    pub fn to_vec(&self) -> Vec<f32> {
        self.data().clone()
    }
    /// The single value of a one-element tensor.
    pub fn scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(CoreError::NotScalar(self.shape().to_vec()));
        }
        Ok(self.data()[0])
    }
    /// Same handle identity?
    pub fn same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_checks_length_and_device() {
        let e = Tensor::new(vec![0.0; 5], &[2, 3]).unwrap_err().to_string();
        assert!(e.contains("5 values but shape [2, 3] needs 6"), "{e}");
        let e = Tensor::new_on(vec![0.0; 6], &[2, 3], false, Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("CUDA backend not available yet"), "{e}");
        let t = Tensor::param(vec![1.0; 6], &[2, 3]).unwrap();
        assert_eq!((t.rows(), t.last_dim(), t.requires_grad()), (2, 3, true));
        let u = t.clone();
        u.data_mut()[0] = 5.0;
        assert_eq!(t.data()[0], 5.0);
        assert!(t.same(&u) && t.id() == u.id());
    }
}
