//! `Tensor`: a shared handle to contiguous row-major f32 data with a shape.
//!
//! Cloning a tensor clones the handle, not the data. Data sit behind a lock so an optimizer (or
//! `merge`) can update a parameter in place while other handles see the change; ops read it
//! through [`Tensor::data`]. Each tensor has a process-unique id, which is how gradients are keyed.
//!
//! Data are either owned (`Vec<f32>`) or borrowed from outside without a copy ([`ExternalF32`],
//! e.g. a memory-mapped safetensors file): frozen pretrained weights then cost no heap memory.
//! Writing to external data first copies it (copy on write).

use crate::device::Device;
use crate::error::{CoreError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Read-only f32 data owned elsewhere (a memory map, a buffer shared with another engine).
pub trait ExternalF32: Send + Sync {
    /// The values; must be the same slice on every call.
    fn as_f32(&self) -> &[f32];
}

/// 16-bit float bits owned elsewhere (a memory-mapped bf16 or f16 checkpoint tensor).
pub trait ExternalHalf: Send + Sync {
    /// The raw bit patterns; must be the same slice on every call.
    fn bits(&self) -> &[u16];
    /// How to read them.
    fn format(&self) -> HalfFormat;
}

/// A 16-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfFormat {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

/// A frozen weight as the base products read it: see [`Tensor::weight`].
pub enum WeightView<'a> {
    /// f32 values (behind the tensor's read lock).
    F32(RwLockReadGuard<'a, Storage>),
    /// 16-bit values, widened inside the products.
    Half(&'a [u16], HalfFormat),
}

impl WeightView<'_> {
    /// The kernel-level view.
    pub fn as_data(&self) -> lora_kernels::lora_linear::WeightData<'_> {
        use lora_kernels::lora_linear::WeightData;
        match self {
            WeightView::F32(g) => WeightData::F32(g),
            WeightView::Half(b, HalfFormat::Bf16) => WeightData::Bf16(b),
            WeightView::Half(b, HalfFormat::F16) => WeightData::F16(b),
        }
    }
}

/// Where a tensor's values live.
pub enum Storage {
    /// On the heap, owned.
    Owned(Vec<f32>),
    /// Borrowed, read-only; converted to `Owned` on first write.
    External(Arc<dyn ExternalF32>),
}

impl std::ops::Deref for Storage {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Storage::Owned(v) => v,
            Storage::External(e) => e.as_f32(),
        }
    }
}

impl std::ops::DerefMut for Storage {
    fn deref_mut(&mut self) -> &mut [f32] {
        if let Storage::External(e) = self {
            *self = Storage::Owned(e.as_f32().to_vec());
        }
        match self {
            Storage::Owned(v) => v,
            Storage::External(_) => unreachable!("converted above"),
        }
    }
}

struct Inner {
    id: u64,
    shape: Vec<usize>,
    data: RwLock<Storage>,
    requires_grad: bool,
    device: Device,
    /// 16-bit source of a half-stored frozen tensor; `data` stays empty until something asks
    /// for f32 values, then holds the widened copy (which takes precedence from then on).
    half: Option<Arc<dyn ExternalHalf>>,
}

/// A contiguous row-major f32 tensor.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor(id={}, shape={:?}, requires_grad={})",
            self.0.id, self.0.shape, self.0.requires_grad
        )
    }
}

impl Tensor {
    fn build(data: Vec<f32>, shape: &[usize], requires_grad: bool, device: Device) -> Result<Self> {
        Self::build_storage(Storage::Owned(data), shape, requires_grad, device)
    }

    fn build_storage(
        data: Storage,
        shape: &[usize],
        requires_grad: bool,
        device: Device,
    ) -> Result<Self> {
        device.ensure_available()?;
        let needed: usize = shape.iter().product();
        if data.len() != needed {
            return Err(CoreError::DataLength {
                len: data.len(),
                shape: shape.to_vec(),
                needed,
            });
        }
        Ok(Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shape: shape.to_vec(),
            data: RwLock::new(data),
            requires_grad,
            device,
            half: None,
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
    pub fn new_on(
        data: Vec<f32>,
        shape: &[usize],
        requires_grad: bool,
        device: Device,
    ) -> Result<Self> {
        Self::build(data, shape, requires_grad, device)
    }

    /// A frozen tensor over external data, without copying it.
    pub fn from_external(data: Arc<dyn ExternalF32>, shape: &[usize]) -> Result<Self> {
        Self::build_storage(Storage::External(data), shape, false, Device::Cpu)
    }

    /// A frozen tensor over external 16-bit data (bf16 or f16), without copying or widening
    /// it: the linear op's base products read it as stored (2 bytes per value). Anything that
    /// asks for f32 values ([`Tensor::data`]) gets a widened copy, made once and kept.
    pub fn from_external_half(data: Arc<dyn ExternalHalf>, shape: &[usize]) -> Result<Self> {
        let needed: usize = shape.iter().product();
        if data.bits().len() != needed {
            return Err(CoreError::DataLength {
                len: data.bits().len(),
                shape: shape.to_vec(),
                needed,
            });
        }
        Ok(Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shape: shape.to_vec(),
            data: RwLock::new(Storage::Owned(Vec::new())),
            requires_grad: false,
            device: Device::Cpu,
            half: Some(data),
        })))
    }

    /// Whether the values are still held as 16-bit floats only (never widened to f32).
    pub fn is_half_stored(&self) -> bool {
        self.0.half.is_some() && self.read_lock().len() != self.numel()
    }

    /// The values as the base products read them: 16-bit as stored for a half-stored tensor
    /// that was never widened, else f32.
    pub fn weight(&self) -> WeightView<'_> {
        match &self.0.half {
            Some(h) if self.is_half_stored() => WeightView::Half(h.bits(), h.format()),
            _ => WeightView::F32(self.data()),
        }
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.data.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Widens a half-stored tensor's values into `data` (once).
    fn widen_half(&self) {
        if let Some(h) = &self.0.half {
            if self.read_lock().len() != self.numel() {
                let mut g = self.0.data.write().unwrap_or_else(|e| e.into_inner());
                if g.len() != self.numel() {
                    let mut v = vec![0.0f32; self.numel()];
                    let data = match h.format() {
                        HalfFormat::Bf16 => lora_kernels::lora_linear::WeightData::Bf16(h.bits()),
                        HalfFormat::F16 => lora_kernels::lora_linear::WeightData::F16(h.bits()),
                    };
                    data.widen(0, &mut v);
                    *g = Storage::Owned(v);
                }
            }
        }
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
    /// Read access to the data (a half-stored tensor is widened to f32 first, once).
    pub fn data(&self) -> RwLockReadGuard<'_, Storage> {
        self.widen_half();
        self.read_lock()
    }
    /// Write access to the data (optimizer steps, merge); external data are copied first.
    pub fn data_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.widen_half();
        self.0.data.write().unwrap_or_else(|e| e.into_inner())
    }
    /// Replaces all values (same length).
    pub fn set_data(&self, values: Vec<f32>) -> Result<()> {
        if values.len() != self.numel() {
            return Err(CoreError::DataLength {
                len: values.len(),
                shape: self.shape().to_vec(),
                needed: self.numel(),
            });
        }
        *self.data_mut() = Storage::Owned(values);
        Ok(())
    }
    /// Whether the values are borrowed (e.g. memory-mapped) rather than owned.
    pub fn is_external(&self) -> bool {
        self.is_half_stored() || matches!(*self.read_lock(), Storage::External(_))
    }
    /// A copy of the data.
    pub fn to_vec(&self) -> Vec<f32> {
        self.data().to_vec()
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
        let e = Tensor::new_on(vec![0.0; 6], &[2, 3], false, Device::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUDA backend not available yet"), "{e}");
        let t = Tensor::param(vec![1.0; 6], &[2, 3]).unwrap();
        assert_eq!((t.rows(), t.last_dim(), t.requires_grad()), (2, 3, true));
        let u = t.clone();
        u.data_mut()[0] = 5.0;
        assert_eq!(t.data()[0], 5.0);
        assert!(t.same(&u) && t.id() == u.id());
    }

    struct Ext(Vec<f32>);
    impl ExternalF32 for Ext {
        fn as_f32(&self) -> &[f32] {
            &self.0
        }
    }

    #[test]
    fn external_data_is_read_in_place_and_copied_on_write() {
        let t = Tensor::from_external(Arc::new(Ext(vec![1.0, 2.0, 3.0])), &[3]).unwrap();
        assert!(t.is_external());
        assert_eq!(t.to_vec(), vec![1.0, 2.0, 3.0]);
        t.data_mut()[1] = 5.0;
        assert!(!t.is_external());
        assert_eq!(t.to_vec(), vec![1.0, 5.0, 3.0]);
        assert!(Tensor::from_external(Arc::new(Ext(vec![1.0])), &[2]).is_err());
        assert!(t.set_data(vec![0.0; 2]).is_err());
    }

    struct Bits(Vec<u16>, HalfFormat);
    impl ExternalHalf for Bits {
        fn bits(&self) -> &[u16] {
            &self.0
        }
        fn format(&self) -> HalfFormat {
            self.1
        }
    }

    #[test]
    fn half_data_stay_16_bit_until_f32_values_are_asked_for() {
        let vals = [1.5f32, -2.25, 0.0, 96.0]; // exact in bf16 and f16
        let bf: Vec<u16> = vals
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let t = Tensor::from_external_half(Arc::new(Bits(bf.clone(), HalfFormat::Bf16)), &[2, 2])
            .unwrap();
        assert!(t.is_half_stored() && t.is_external() && !t.requires_grad());
        assert!(matches!(t.weight(), WeightView::Half(b, HalfFormat::Bf16) if b == &bf[..]));
        assert!(t.is_half_stored(), "weight() must not widen");
        assert_eq!(t.to_vec(), vals.to_vec()); // exact: these values are representable
        assert!(!t.is_half_stored());
        assert!(matches!(t.weight(), WeightView::F32(_)));
        t.data_mut()[0] = 7.0; // writes go to the widened copy, which the products then read
        assert_eq!(t.weight().as_data().len(), 4);
        assert_eq!(t.to_vec()[0], 7.0);
        let hf: Vec<u16> = vals
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let t = Tensor::from_external_half(Arc::new(Bits(hf, HalfFormat::F16)), &[4]).unwrap();
        assert_eq!(t.to_vec(), vals.to_vec());
        assert!(
            Tensor::from_external_half(Arc::new(Bits(vec![0; 3], HalfFormat::F16)), &[4]).is_err()
        );
    }
}
