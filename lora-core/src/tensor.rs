//! `Tensor`: a shared handle to contiguous row-major f32 data with a shape.
//!
//! Cloning a tensor clones the handle, not the data. Data sit behind a lock so an optimizer (or
//! `merge`) can update a parameter in place while other handles see the change; ops read it
//! through [`Tensor::data`]. Each tensor has a process-unique id, which is how gradients are keyed.
//!
//! Data are either owned (`Vec<f32>`) or borrowed from outside without a copy ([`ExternalF32`],
//! e.g. a memory-mapped safetensors file): frozen pretrained weights then cost no heap memory.
//! Writing to external data first copies it (copy on write).
//!
//! A tensor can also live in a device's memory ([`Tensor::to_device`]): then its values are a
//! device buffer, the ops run the device's kernels, and the host storage is only a mirror made
//! when something on the host asks for the values ([`Tensor::data`]). Host writes
//! ([`Tensor::data_mut`]) move the tensor back to the host, so a stale mirror is never read.

use crate::device::Device;
use crate::error::{CoreError, Result};
use lora_kernels::accel::{Accel, DBits, DBuf};
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

/// A tensor's values in a device's memory.
pub(crate) struct DevData {
    pub accel: Arc<dyn Accel>,
    pub ordinal: usize,
    pub vals: DevVals,
}

/// f32 values, or a frozen weight's 16-bit bits as stored.
pub(crate) enum DevVals {
    F32(DBuf),
    Half(DBits, HalfFormat),
}

impl DevData {
    /// The f32 buffer ([`Tensor::ensure_dev_f32`] widens a 16-bit one first).
    pub(crate) fn f32(&self) -> Result<&DBuf> {
        match &self.vals {
            DevVals::F32(b) => Ok(b),
            DevVals::Half(..) => Err(CoreError::Internal(
                "a 16-bit device tensor was read as f32 without widening",
            )),
        }
    }
}

struct Inner {
    id: u64,
    shape: Vec<usize>,
    data: RwLock<Storage>,
    requires_grad: bool,
    /// Set while the values live on a device (then `data` is a host mirror, valid when it
    /// holds `numel` values).
    dev: RwLock<Option<DevData>>,
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

    /// The one constructor: `len` values (in whichever of `data`, `dev`, `half` holds them) must
    /// fill `shape`.
    fn make(
        len: usize,
        shape: &[usize],
        requires_grad: bool,
        data: Storage,
        dev: Option<DevData>,
        half: Option<Arc<dyn ExternalHalf>>,
    ) -> Result<Self> {
        let needed: usize = shape.iter().product();
        if len != needed {
            return Err(CoreError::DataLength {
                len,
                shape: shape.to_vec(),
                needed,
            });
        }
        Ok(Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shape: shape.to_vec(),
            data: RwLock::new(data),
            requires_grad,
            dev: RwLock::new(dev),
            half,
        })))
    }

    fn build_storage(
        data: Storage,
        shape: &[usize],
        requires_grad: bool,
        device: Device,
    ) -> Result<Self> {
        let t = Self::make(data.len(), shape, requires_grad, data, None, None)?;
        if device != Device::Cpu {
            t.to_device(device)?;
        }
        Ok(t)
    }

    /// An op result in device memory.
    pub(crate) fn from_dev(
        accel: &Arc<dyn Accel>,
        ordinal: usize,
        buf: DBuf,
        shape: &[usize],
        requires_grad: bool,
    ) -> Result<Self> {
        let dev = DevData {
            accel: accel.clone(),
            ordinal,
            vals: DevVals::F32(buf),
        };
        let len = dev.f32()?.len();
        let host = Storage::Owned(Vec::new());
        Self::make(len, shape, requires_grad, host, Some(dev), None)
    }

    /// Moves the values to `device` in place (every handle sees the move; the id is kept):
    /// to a GPU they are uploaded (a never-widened 16-bit frozen weight as its 16-bit bits) and
    /// the host copy is freed; back to the CPU they are downloaded.
    pub fn to_device(&self, device: Device) -> Result<()> {
        if self.device() == device {
            return Ok(());
        }
        if self.device() != Device::Cpu {
            self.sync_host()?;
            *self.dev_lock_mut() = None;
        }
        let Device::Cuda(ordinal) = device else {
            return Ok(());
        };
        let accel = crate::device::accel(device)?;
        let vals = match &self.0.half {
            Some(h) if self.is_half_stored() && !self.requires_grad() => {
                DevVals::Half(accel.upload_bits(h.bits())?, h.format())
            }
            _ => DevVals::F32(accel.upload(&self.data())?),
        };
        let mut host = self.0.data.write().unwrap_or_else(|e| e.into_inner());
        if matches!(*host, Storage::Owned(_)) && self.0.half.is_none() {
            *host = Storage::Owned(Vec::new()); // memory-mapped data stay as a free mirror
        }
        *self.dev_lock_mut() = Some(DevData {
            accel,
            ordinal,
            vals,
        });
        Ok(())
    }

    /// The device state (None on the host).
    pub(crate) fn dev(&self) -> RwLockReadGuard<'_, Option<DevData>> {
        self.0.dev.read().unwrap_or_else(|e| e.into_inner())
    }

    fn dev_lock_mut(&self) -> RwLockWriteGuard<'_, Option<DevData>> {
        self.0.dev.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the device buffer (the optimizer); drops the host mirror first.
    pub(crate) fn dev_mut(&self) -> RwLockWriteGuard<'_, Option<DevData>> {
        // Lock order as in `to_device`: host storage, then device state.
        let mut host = self.0.data.write().unwrap_or_else(|e| e.into_inner());
        let dev = self.dev_lock_mut();
        if dev.is_some() && self.0.half.is_none() {
            *host = Storage::Owned(Vec::new());
        }
        dev
    }

    /// Widens a 16-bit device tensor into an f32 device buffer, once (the twin of the host's
    /// widen-on-first-read); linear weights are instead widened per product and stay 16-bit.
    pub(crate) fn ensure_dev_f32(&self) -> Result<()> {
        let needs = matches!(
            self.dev().as_ref().map(|d| &d.vals),
            Some(DevVals::Half(..))
        );
        if needs {
            let mut g = self.dev_lock_mut();
            if let Some(d) = g.as_mut() {
                if let DevVals::Half(bits, fmt) = &d.vals {
                    let wide = d.accel.widen(bits, *fmt == HalfFormat::F16)?;
                    d.vals = DevVals::F32(wide);
                }
            }
        }
        Ok(())
    }

    /// Makes the host mirror of a device tensor current.
    fn sync_host(&self) -> Result<()> {
        if self.read_lock().len() == self.numel() {
            return Ok(());
        }
        let dev = self.dev();
        let Some(d) = dev.as_ref() else {
            return Ok(());
        };
        let v = match &d.vals {
            DevVals::F32(b) => d.accel.download(b)?,
            DevVals::Half(..) => return Ok(()), // the host 16-bit source is widened instead
        };
        drop(dev);
        *self.0.data.write().unwrap_or_else(|e| e.into_inner()) = Storage::Owned(v);
        Ok(())
    }

    /// A copy of the values, downloading a device tensor's: like [`Tensor::to_vec`] but a
    /// device failure is an error instead of a panic.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        self.sync_host()?;
        Ok(self.data().to_vec())
    }

    /// A constant (frozen) CPU tensor: it never receives a gradient.
    pub fn new(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(data, shape, false, Device::Cpu)
    }

    /// A trainable CPU tensor: backward computes its gradient.
    pub fn param(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(data, shape, true, Device::Cpu)
    }

    /// A tensor on `device`: built on the host, then moved ([`Tensor::to_device`]); a CUDA
    /// device that cannot be opened is an error naming why.
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
        let len = data.bits().len();
        Self::make(
            len,
            shape,
            false,
            Storage::Owned(Vec::new()),
            None,
            Some(data),
        )
    }

    /// Whether the values are still held as 16-bit floats only (never widened to f32).
    pub fn is_half_stored(&self) -> bool {
        if let Some(d) = self.dev().as_ref() {
            return matches!(d.vals, DevVals::Half(..));
        }
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
        match self.dev().as_ref() {
            Some(d) => Device::Cuda(d.ordinal),
            None => Device::Cpu,
        }
    }
    /// Read access to the data (a half-stored tensor is widened to f32 first, once; a device
    /// tensor's values are downloaded into a host mirror, kept until the device writes them).
    ///
    /// # Panics
    /// If downloading a device tensor fails (use [`Tensor::try_to_vec`] to get an error).
    pub fn data(&self) -> RwLockReadGuard<'_, Storage> {
        if let Err(e) = self.sync_host() {
            panic!("reading tensor {} from its device: {e}", self.id());
        }
        self.widen_half();
        self.read_lock()
    }
    /// Write access to the data (optimizer steps, merge); external data are copied first. A
    /// device tensor moves back to the host first (see [`Tensor::to_device`]).
    ///
    /// # Panics
    /// If moving a device tensor back fails.
    pub fn data_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        if let Err(e) = self.to_device(Device::Cpu) {
            panic!("moving tensor {} to the host: {e}", self.id());
        }
        self.widen_half();
        self.0.data.write().unwrap_or_else(|e| e.into_inner())
    }
    /// Replaces all values (same length); a device tensor's are uploaded to its device.
    pub fn set_data(&self, values: Vec<f32>) -> Result<()> {
        if values.len() != self.numel() {
            return Err(CoreError::DataLength {
                len: values.len(),
                shape: self.shape().to_vec(),
                needed: self.numel(),
            });
        }
        if self.0.half.is_none() {
            let mut dev = self.dev_mut();
            if let Some(d) = dev.as_mut() {
                // A device tensor stays on its device: the new values are uploaded there.
                d.vals = DevVals::F32(d.accel.upload(&values)?);
                return Ok(());
            }
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
        // No machine has this GPU: a clear error naming it, not a panic.
        let e = Tensor::new_on(vec![0.0; 6], &[2, 3], false, Device::Cuda(975))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:975"), "{e}");
        let t = Tensor::param(vec![1.0; 6], &[2, 3]).unwrap();
        assert_eq!((t.rows(), t.last_dim(), t.requires_grad()), (2, 3, true));
        let u = t.clone();
        u.data_mut()[0] = 5.0;
        assert_eq!(t.data()[0], 5.0);
        assert!(t.same(&u) && t.id() == u.id());
    }

    #[test]
    fn moving_to_a_device_and_back_keeps_identity_and_values() {
        crate::device::emulate_cuda(974);
        let dev = Device::Cuda(974);
        let t = Tensor::param(vec![1.0, 2.0, 3.0], &[3]).unwrap();
        let handle = t.clone();
        t.to_device(dev).unwrap();
        assert_eq!((handle.device(), handle.id()), (dev, t.id()));
        assert!(t.read_lock().is_empty(), "the host copy is freed");
        assert_eq!(t.to_vec(), vec![1.0, 2.0, 3.0]); // a mirror, downloaded on demand
        assert_eq!(t.device(), dev);
        t.set_data(vec![4.0, 5.0, 6.0]).unwrap(); // replaced on the device
        assert_eq!((t.device(), t.to_vec()), (dev, vec![4.0, 5.0, 6.0]));
        t.data_mut()[1] = 9.0; // a host write brings it home
        assert_eq!(handle.device(), Device::Cpu);
        t.to_device(dev).unwrap();
        t.to_device(Device::Cpu).unwrap();
        assert_eq!(t.to_vec(), vec![4.0, 9.0, 6.0]);
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
