//! `Tensor`: a shared handle to contiguous row-major f32 data with a shape.
//!
//! Cloning a tensor clones the handle, not the data. Data sit behind a lock so an optimizer (or
//! `merge`) can update a parameter in place while other handles see the change. Each tensor has
//! a process-unique id, which is how gradients are keyed.
//!
//! A tensor's values are one storage enum of its backend ([`lora_kernels::accel`]): on the CPU
//! owned (`Vec<f32>`), borrowed from outside without a copy ([`ExternalF32`], e.g. a
//! memory-mapped safetensors file: frozen pretrained weights then cost no heap memory; writing
//! copies them first) or 16-bit bits ([`ExternalHalf`], a bf16/f16 checkpoint, widened only when
//! something asks for f32 values); on a CUDA device the same as device buffers. Every op calls
//! the tensor's backend, so the CPU and a GPU run one code path ([`Tensor::to_device`] moves a
//! tensor between them).

use crate::device::Device;
use crate::error::{CoreError, Result};
use lora_kernels::accel::{Accel, DBits, DBuf, DWeight};
pub use lora_kernels::buffers::{ExternalF32, ExternalHalf, HalfFormat};
use lora_kernels::gemm_bf16::PackedWeight;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A tensor's values and where they live.
pub(crate) struct Store {
    /// The backend computing on them.
    pub on: Arc<dyn Accel>,
    /// Its device.
    pub device: Device,
    /// The values.
    pub vals: Vals,
    /// A bf16 packing kept beside f32 values ([`Tensor::pack_bf16_beside`]): a tied output
    /// head's, for the head's products, while the embedding lookup reads the f32 values.
    /// Dropped whenever the values change or move.
    pub beside: Option<Arc<PackedWeight>>,
}

/// f32 values, or a frozen weight's 16-bit bits as stored, or a frozen linear weight packed
/// for the CPU's bf16 products (`--precision bf16`, [`Tensor::pack_bf16`]).
pub(crate) enum Vals {
    F32(DBuf),
    Half(DBits, HalfFormat),
    Packed(Arc<PackedWeight>),
}

/// A packed weight's values as f32 (its bf16 values, exactly), in the stored layout.
fn unpack(p: &PackedWeight) -> Vec<f32> {
    let (m, k) = p.dims();
    let mut out = vec![0.0f32; m * k];
    lora_kernels::operands::WeightData::PackedBf16(p).widen(0, &mut out);
    out
}

impl Store {
    /// The f32 buffer (a 16-bit tensor is widened first by [`Tensor::read`]).
    pub(crate) fn f32(&self) -> Result<&DBuf> {
        match &self.vals {
            Vals::F32(b) => Ok(b),
            Vals::Half(..) | Vals::Packed(_) => Err(CoreError::Internal(
                "a 16-bit tensor was read as f32 without widening",
            )),
        }
    }
    /// The values as a linear layer's base weight: 16-bit as stored, or f32.
    pub(crate) fn weight(&self) -> DWeight<'_> {
        match &self.vals {
            Vals::F32(b) => DWeight::F32(b),
            Vals::Half(b, f) => DWeight::Half(b, *f),
            Vals::Packed(p) => DWeight::PackedBf16(p),
        }
    }
    /// The values as the matrix products read them (the linear op, the fused output head):
    /// the bf16 packing kept beside them when there is one, else as [`Store::weight`] (which
    /// the embedding lookup reads).
    pub(crate) fn product_weight(&self) -> DWeight<'_> {
        match (&self.beside, &self.vals) {
            (Some(p), Vals::F32(b)) if b.host().is_some() => DWeight::PackedBeside(p, b),
            (Some(p), _) => DWeight::PackedBf16(p),
            (None, _) => self.weight(),
        }
    }
    /// Host f32 values, when that is what it holds.
    fn host(&self) -> Option<&[f32]> {
        match &self.vals {
            Vals::F32(b) => b.host(),
            Vals::Half(..) | Vals::Packed(_) => None,
        }
    }
    /// Widens 16-bit values to f32 where they are (once; the bits are dropped).
    fn widen(&mut self) -> Result<()> {
        match &self.vals {
            Vals::Half(bits, fmt) => {
                let wide = self.on.widen(bits, *fmt == HalfFormat::F16)?;
                self.vals = Vals::F32(wide);
            }
            Vals::Packed(p) => self.vals = Vals::F32(DBuf::Host(unpack(p))),
            Vals::F32(_) => {}
        }
        Ok(())
    }
    /// 16-bit values widened to f32 into a new buffer where they live, leaving the store as it
    /// is (`None` when it holds f32 values).
    fn widened_copy(&self) -> Result<Option<DBuf>> {
        match &self.vals {
            Vals::F32(_) => Ok(None),
            Vals::Half(bits, fmt) => Ok(Some(self.on.widen(bits, *fmt == HalfFormat::F16)?)),
            Vals::Packed(p) => Ok(Some(DBuf::Host(unpack(p)))),
        }
    }
    /// The values as f32 on the host: downloaded from a device, widened from 16 bits.
    fn to_host_vec(&self) -> Result<Vec<f32>> {
        match &self.vals {
            Vals::F32(b) => Ok(self.on.download(b)?),
            Vals::Half(bits, fmt) => Ok(self
                .on
                .download(&self.on.widen(bits, *fmt == HalfFormat::F16)?)?),
            Vals::Packed(p) => Ok(unpack(p)),
        }
    }
}

struct Inner {
    id: u64,
    shape: Vec<usize>,
    requires_grad: bool,
    store: RwLock<Store>,
    /// `store.device`, readable without the lock (0: the CPU, n + 1: `cuda:n`), so asking a
    /// tensor where it lives never waits on (or deadlocks with) a holder of its values.
    device: AtomicUsize,
}

fn device_code(d: Device) -> usize {
    match d {
        Device::Cpu => 0,
        Device::Cuda(n) => n + 1,
    }
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

/// Read access to a tensor's values as host f32 ([`Tensor::data`]): the tensor's own storage
/// behind its read lock, or a downloaded copy of a device tensor's.
pub struct HostData<'a>(Read<'a>);

enum Read<'a> {
    /// Host values, read in place.
    Borrowed(RwLockReadGuard<'a, Store>),
    /// A host copy of a device tensor's values.
    Copied(Vec<f32>),
}

impl std::ops::Deref for HostData<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            Read::Borrowed(g) => g.host().unwrap_or(&[]),
            Read::Copied(v) => v,
        }
    }
}

/// Write access to a host tensor's values ([`Tensor::data_mut`]).
pub struct HostDataMut<'a>(RwLockWriteGuard<'a, Store>);

impl std::ops::Deref for HostDataMut<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.0.host().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for HostDataMut<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.0.vals {
            Vals::F32(b) => b.host_mut().unwrap_or(&mut []),
            Vals::Half(..) | Vals::Packed(_) => &mut [],
        }
    }
}

/// The CPU backend every host tensor shares.
pub(crate) fn cpu() -> Arc<dyn Accel> {
    static CPU: std::sync::OnceLock<Arc<dyn Accel>> = std::sync::OnceLock::new();
    CPU.get_or_init(|| Arc::new(lora_kernels::cpu::Cpu)).clone()
}

impl Tensor {
    /// The one constructor: `vals` (of `len` values) must fill `shape`.
    fn make(len: usize, shape: &[usize], requires_grad: bool, store: Store) -> Result<Self> {
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
            requires_grad,
            device: AtomicUsize::new(device_code(store.device)),
            store: RwLock::new(store),
        })))
    }

    /// Host values, then moved to `device`.
    fn build(vals: Vals, shape: &[usize], requires_grad: bool, device: Device) -> Result<Self> {
        let len = match &vals {
            Vals::F32(b) => b.len(),
            Vals::Half(b, _) => b.len(),
            Vals::Packed(p) => p.dims().0 * p.dims().1,
        };
        let store = Store {
            on: cpu(),
            device: Device::Cpu,
            vals,
            beside: None,
        };
        let t = Self::make(len, shape, requires_grad, store)?;
        t.to_device(device)?;
        Ok(t)
    }

    /// An op result in `on`'s memory.
    pub(crate) fn from_buf(
        on: &Arc<dyn Accel>,
        device: Device,
        buf: DBuf,
        shape: &[usize],
        requires_grad: bool,
    ) -> Result<Self> {
        let store = Store {
            on: on.clone(),
            device,
            vals: Vals::F32(buf),
            beside: None,
        };
        Self::make(store_len(&store), shape, requires_grad, store)
    }

    /// Moves the values to `device` in place (every handle sees the move; the id is kept): a
    /// 16-bit frozen weight moves as its 16-bit bits.
    pub fn to_device(&self, device: Device) -> Result<()> {
        if self.device() == device {
            return Ok(());
        }
        let to = crate::device::accel(device)?;
        let mut g = self.write();
        let vals = match &g.vals {
            Vals::F32(b) => match b.host() {
                Some(v) => Vals::F32(to.upload(v)?),
                None => Vals::F32(to.upload(&g.on.download(b)?)?),
            },
            Vals::Half(b, fmt) => match b.host() {
                Some(v) => Vals::Half(to.upload_bits(v)?, *fmt),
                None => Vals::Half(to.upload_bits(&g.on.download_bits(b)?)?, *fmt),
            },
            // The packing is the CPU products' layout: a device gets the (bf16) values.
            Vals::Packed(p) => Vals::F32(to.upload(&unpack(p))?),
        };
        *g = Store {
            on: to,
            device,
            vals,
            beside: None,
        };
        self.0.device.store(device_code(device), Ordering::SeqCst);
        Ok(())
    }

    /// The storage, for reading.
    pub(crate) fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.0.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Store> {
        self.0.store.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The storage with f32 values for an op to read: a 16-bit tensor is widened where it
    /// lives, once (linear weights are read through [`Store::weight`] instead and stay 16-bit).
    pub(crate) fn read(&self) -> Result<RwLockReadGuard<'_, Store>> {
        if matches!(self.store().vals, Vals::Half(..) | Vals::Packed(_)) {
            self.write().widen()?;
        }
        Ok(self.store())
    }

    /// The storage with f32 values for an op to read once: a frozen 16-bit tensor is widened
    /// into a buffer of its own that the caller drops after use (the tensor stays 16-bit: a
    /// convolution's weight from an fp16 checkpoint); anything else as [`Tensor::read`].
    pub(crate) fn read_transient(&self) -> Result<crate::ops::Guard<'_>> {
        if !self.requires_grad() {
            let s = self.store();
            if let Some(b) = s.widened_copy()? {
                return Ok(crate::ops::Guard::Widened(b));
            }
        }
        Ok(crate::ops::Guard::Store(self.read()?))
    }

    /// Write access to the storage (the optimizer); drops a packing kept beside the values.
    pub(crate) fn store_mut(&self) -> RwLockWriteGuard<'_, Store> {
        let mut g = self.write();
        // The values may change: a packing kept beside them would go stale.
        g.beside = None;
        g
    }

    /// A copy of the values, downloading a device tensor's: like [`Tensor::to_vec`] but a
    /// device failure is an error instead of a panic.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        if let Some(v) = self.store().host() {
            return Ok(v.to_vec());
        }
        self.store().to_host_vec()
    }

    /// A constant (frozen) CPU tensor: it never receives a gradient.
    pub fn new(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(Vals::F32(DBuf::Host(data)), shape, false, Device::Cpu)
    }

    /// A trainable CPU tensor: backward computes its gradient.
    pub fn param(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::build(Vals::F32(DBuf::Host(data)), shape, true, Device::Cpu)
    }

    /// A tensor on `device`: built on the host, then moved ([`Tensor::to_device`]); a CUDA
    /// device that cannot be opened is an error naming why.
    pub fn new_on(
        data: Vec<f32>,
        shape: &[usize],
        requires_grad: bool,
        device: Device,
    ) -> Result<Self> {
        Self::build(Vals::F32(DBuf::Host(data)), shape, requires_grad, device)
    }

    /// A frozen tensor over external data, without copying it.
    pub fn from_external(data: Arc<dyn ExternalF32>, shape: &[usize]) -> Result<Self> {
        Self::build(Vals::F32(DBuf::Mapped(data)), shape, false, Device::Cpu)
    }

    /// A frozen tensor over external 16-bit data (bf16 or f16), without copying or widening
    /// it: the linear op's base products read it as stored (2 bytes per value). Anything that
    /// asks for f32 values ([`Tensor::data`], an op other than the linear products) widens it
    /// once, and the tensor holds f32 values from then on.
    pub fn from_external_half(data: Arc<dyn ExternalHalf>, shape: &[usize]) -> Result<Self> {
        let fmt = data.format();
        Self::build(
            Vals::Half(DBits::Mapped(data), fmt),
            shape,
            false,
            Device::Cpu,
        )
    }

    /// A frozen copy of the values rounded to bf16 (nearest-even) and held as 16-bit bits: what
    /// a tape keeping activations in bf16 holds for backward instead of the f32 values
    /// ([`crate::Tape::with_bf16_activations`]). `None` unless the values are f32 in host
    /// memory.
    pub(crate) fn rounded_bf16_copy(&self) -> Option<Tensor> {
        let bits = {
            let g = self.store();
            let v = match &g.vals {
                Vals::F32(b) => b.host()?,
                _ => return None,
            };
            let mut bits = vec![0u16; v.len()];
            lora_kernels::gemm_bf16::round_slice_bf16(v, &mut bits).ok()?;
            bits
        };
        Self::build(
            Vals::Half(DBits::Host(bits), HalfFormat::Bf16),
            self.shape(),
            false,
            Device::Cpu,
        )
        .ok()
    }

    /// Whether the values are still held as 16-bit floats only (never widened to f32).
    pub fn is_half_stored(&self) -> bool {
        matches!(self.store().vals, Vals::Half(..))
    }

    /// Re-stores a frozen 2-D linear weight (`(out, in)` for `OutIn`, `(in, out)` for `InOut`)
    /// packed for the CPU's bf16 products, in place (every handle sees it): the linear op then
    /// rounds its input to bf16 too and accumulates in f32 (PyTorch autocast's semantics for
    /// the layer's products). f32 values are rounded to bf16 (nearest-even), bf16 ones kept,
    /// f16 ones rounded from their f32 values. The original storage is released; anything that
    /// later asks for f32 values gets the bf16 values widened. Packing twice is a no-op.
    pub fn pack_bf16(&self, layout: lora_kernels::operands::WeightLayout) -> Result<()> {
        if let Some(packed) = self.bf16_packing(layout, "pack_bf16")? {
            self.write().vals = Vals::Packed(Arc::new(packed));
        }
        Ok(())
    }

    /// Keeps a bf16 packing of a frozen 2-D weight beside its values (which stay as they are,
    /// f32 or 16-bit): the products that read it as a weight (the fused output head
    /// [`crate::ops::linear_cross_entropy`], [`crate::ops::linear`]) then multiply in bf16, as
    /// autocast does a tied `lm_head`, while the embedding lookup reads the values. Costs the
    /// packing's memory on top. Dropped when the values are replaced or moved; a no-op on a
    /// weight packed in place.
    pub fn pack_bf16_beside(&self, layout: lora_kernels::operands::WeightLayout) -> Result<()> {
        if self.store().beside.is_some() {
            return Ok(());
        }
        if let Some(packed) = self.bf16_packing(layout, "pack_bf16_beside")? {
            self.write().beside = Some(Arc::new(packed));
        }
        Ok(())
    }

    /// Whether a bf16 packing is kept beside the values ([`Tensor::pack_bf16_beside`]).
    pub fn has_bf16_beside(&self) -> bool {
        self.store().beside.is_some()
    }

    /// The bf16 packing of a frozen 2-D weight's values (`None`: already packed so in place).
    fn bf16_packing(
        &self,
        layout: lora_kernels::operands::WeightLayout,
        op: &str,
    ) -> Result<Option<PackedWeight>> {
        use lora_kernels::gemm_bf16::Source;
        use lora_kernels::operands::WeightLayout;
        let why = |r: &str| CoreError::Packing(format!("{op}: tensor {}: {r}", self.id()));
        if self.requires_grad() {
            return Err(why(
                "a trained tensor cannot be packed (only frozen weights are)",
            ));
        }
        if self.device() != Device::Cpu {
            return Err(why(
                "bf16 packing is for CPU products; the tensor is on a device",
            ));
        }
        let &[rows, cols] = self.shape() else {
            return Err(why(&format!(
                "expected a 2-D weight, got shape {:?}",
                self.shape()
            )));
        };
        let (out, inp) = match layout {
            WeightLayout::OutIn => (rows, cols),
            WeightLayout::InOut => (cols, rows),
        };
        let g = self.store();
        let packed = match &g.vals {
            Vals::Packed(p) if p.layout() == layout => return Ok(None),
            Vals::Packed(_) => return Err(why("already packed in the other layout")),
            Vals::F32(b) => {
                let v = b.host().ok_or_else(|| why("values are not on the host"))?;
                PackedWeight::new(Source::F32(v), layout, out, inp)?
            }
            Vals::Half(b, HalfFormat::Bf16) => {
                let v = b.host().ok_or_else(|| why("values are not on the host"))?;
                PackedWeight::new(Source::Bf16(v), layout, out, inp)?
            }
            Vals::Half(..) => {
                let wide = g.widened_copy()?.ok_or_else(|| why("nothing to widen"))?;
                let v = wide
                    .host()
                    .ok_or_else(|| why("values are not on the host"))?;
                PackedWeight::new(Source::F32(v), layout, out, inp)?
            }
        };
        Ok(Some(packed))
    }

    /// Whether the values are held packed for the bf16 products ([`Tensor::pack_bf16`]).
    pub fn is_packed_bf16(&self) -> bool {
        matches!(self.store().vals, Vals::Packed(_))
    }

    /// Zeros, frozen.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::new(vec![0.0; shape.iter().product()], shape)
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
        match self.0.device.load(Ordering::SeqCst) {
            0 => Device::Cpu,
            n => Device::Cuda(n - 1),
        }
    }
    /// Read access to the values as host f32: a 16-bit tensor is widened first (once), a
    /// device tensor's values are downloaded (a copy; the tensor stays on its device).
    ///
    /// # Panics
    /// If downloading a device tensor fails (use [`Tensor::try_to_vec`] to get an error).
    pub fn data(&self) -> HostData<'_> {
        let widen = {
            let g = self.store();
            g.device == Device::Cpu && matches!(g.vals, Vals::Half(..) | Vals::Packed(_))
        };
        if widen {
            if let Err(e) = self.write().widen() {
                panic!("widening tensor {}: {e}", self.id());
            }
        }
        let g = self.store();
        if g.host().is_some() {
            return HostData(Read::Borrowed(g));
        }
        match g.to_host_vec() {
            Ok(v) => HostData(Read::Copied(v)),
            Err(e) => panic!("reading tensor {} from its device: {e}", self.id()),
        }
    }
    /// Write access to the values (optimizer steps, merge); external data are copied first. A
    /// device tensor moves back to the host first (see [`Tensor::to_device`]).
    ///
    /// # Panics
    /// If moving a device tensor back fails.
    pub fn data_mut(&self) -> HostDataMut<'_> {
        if let Err(e) = self.to_device(Device::Cpu) {
            panic!("moving tensor {} to the host: {e}", self.id());
        }
        let mut g = self.write();
        if let Err(e) = g.widen() {
            panic!("widening tensor {}: {e}", self.id());
        }
        if let Vals::F32(b) = &mut g.vals {
            b.host_mut(); // copy on write, now rather than on every write access
        }
        g.beside = None; // the values may change
        HostDataMut(g)
    }
    /// Replaces all values (same length) where the tensor lives.
    pub fn set_data(&self, values: Vec<f32>) -> Result<()> {
        if values.len() != self.numel() {
            return Err(CoreError::DataLength {
                len: values.len(),
                shape: self.shape().to_vec(),
                needed: self.numel(),
            });
        }
        let mut g = self.write();
        let buf = match g.device {
            Device::Cpu => DBuf::Host(values),
            _ => g.on.upload(&values)?,
        };
        g.vals = Vals::F32(buf);
        g.beside = None;
        Ok(())
    }
    /// Whether the values are borrowed (e.g. memory-mapped) rather than owned.
    pub fn is_external(&self) -> bool {
        matches!(
            self.store().vals,
            Vals::F32(DBuf::Mapped(_)) | Vals::Half(DBits::Mapped(_), _)
        )
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
        Ok(self.try_to_vec()?[0])
    }
    /// Same handle identity?
    pub fn same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

fn store_len(s: &Store) -> usize {
    match &s.vals {
        Vals::F32(b) => b.len(),
        Vals::Half(b, _) => b.len(),
        Vals::Packed(p) => p.dims().0 * p.dims().1,
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

    /// On a GPU machine (else the CPU to itself).
    #[test]
    fn moving_to_a_device_and_back_keeps_identity_and_values() {
        let dev = *crate::device::test_devices().last().unwrap();
        let t = Tensor::param(vec![1.0, 2.0, 3.0], &[3]).unwrap();
        let handle = t.clone();
        t.to_device(dev).unwrap();
        assert_eq!((handle.device(), handle.id()), (dev, t.id()));
        assert_eq!(t.to_vec(), vec![1.0, 2.0, 3.0]); // downloaded on demand
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

    /// A packing kept beside f32 values: the values read as before, the products read the
    /// packing (its bf16 values), and any write, replacement or move drops it.
    #[test]
    fn a_packing_beside_the_values_goes_stale_never() {
        use lora_kernels::operands::WeightLayout;
        let vals = vec![1.0f32 + 1.0 / 1024.0, -3.0, 0.1, 7.0, 2.0, 0.5];
        let t = Tensor::new(vals.clone(), &[2, 3]).unwrap();
        t.pack_bf16_beside(WeightLayout::OutIn).unwrap();
        assert!(t.has_bf16_beside() && !t.is_packed_bf16());
        assert_eq!(t.to_vec(), vals, "the values stay f32");
        assert!(matches!(t.store().weight(), DWeight::F32(_)));
        match t.store().product_weight() {
            DWeight::PackedBeside(p, b) => {
                assert_eq!(b.host().unwrap(), &vals[..], "beside the f32 values");
                assert_eq!(p.dims(), (2, 3));
                // 1 + 2^-10 rounds to 1 in bf16.
                assert_eq!(p.bits_at(0), half::bf16::from_f32(1.0).to_bits());
            }
            _ => panic!("the products read the packing"),
        }
        t.set_data(vals.clone()).unwrap();
        assert!(!t.has_bf16_beside(), "set_data drops it");
        t.pack_bf16_beside(WeightLayout::OutIn).unwrap();
        t.data_mut()[0] = 4.0;
        assert!(!t.has_bf16_beside(), "a write drops it");
        t.pack_bf16_beside(WeightLayout::OutIn).unwrap();
        let dev = *crate::device::test_devices().last().unwrap();
        if dev != Device::Cpu {
            t.to_device(dev).unwrap();
            assert!(!t.has_bf16_beside(), "a move drops it");
        }
        let p = Tensor::param(vals, &[2, 3]).unwrap();
        let e = p
            .pack_bf16_beside(WeightLayout::OutIn)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pack_bf16_beside") && e.contains("trained"),
            "{e}"
        );
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
        assert!(matches!(t.store().weight(),
            DWeight::Half(b, HalfFormat::Bf16) if b.host() == Some(&bf[..])));
        assert!(t.is_half_stored(), "weight() must not widen");
        assert_eq!(t.to_vec(), vals.to_vec()); // exact: these values are representable
        assert!(!t.is_half_stored());
        assert!(matches!(t.store().weight(), DWeight::F32(_)));
        t.data_mut()[0] = 7.0; // writes go to the widened copy, which the products then read
        assert_eq!(t.store().f32().unwrap().len(), 4);
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
