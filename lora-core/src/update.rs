//! Parameter updates where the parameter lives: optimizer state ([`Moment`]) in a buffer of the
//! tensor's backend (host memory or a GPU's), and the AdamW update ([`adamw_update`]) through
//! that backend's `adamw_step`.

use crate::autograd::Gradients;
use crate::device::Device;
use crate::error::{CoreError, Result};
use crate::tensor::{Store, Tensor, Vals};
use lora_kernels::accel::{Accel, DBuf};
pub use lora_kernels::ops::adamw::AdamStep;
use std::sync::Arc;

/// One optimizer state buffer (a moment) for one tensor, kept where the tensor lives.
pub struct Moment {
    on: Arc<dyn Accel>,
    device: Device,
    buf: DBuf,
}

impl std::fmt::Debug for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Moment({}, {} values)", self.device, self.buf.len())
    }
}

impl Moment {
    /// Zeros shaped and placed like `t`.
    pub fn zeros_like(t: &Tensor) -> Result<Self> {
        Self::from_vec(t, vec![0.0; t.numel()])
    }

    /// `values` (one per element of `t`), placed like `t`.
    pub fn from_vec(t: &Tensor, values: Vec<f32>) -> Result<Self> {
        if values.len() != t.numel() {
            return Err(CoreError::DataLength {
                len: values.len(),
                shape: t.shape().to_vec(),
                needed: t.numel(),
            });
        }
        let (on, device) = {
            let s = t.store();
            (s.on.clone(), s.device)
        };
        let buf = match device {
            Device::Cpu => DBuf::Host(values),
            Device::Cuda(_) => on.upload(&values)?,
        };
        Ok(Moment { on, device, buf })
    }

    /// A host copy of the values.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.on.download(&self.buf)?)
    }

    /// Moves the values to where `t` lives, if they are elsewhere (state restored from a
    /// checkpoint before the model moved to a device).
    fn follow(&mut self, t: &Tensor) -> Result<()> {
        if t.device() != self.device {
            *self = Self::from_vec(t, self.to_vec()?)?;
        }
        Ok(())
    }
}

/// One AdamW update of `p` from its gradient in `grads` (no gradient: nothing happens, returns
/// `false`), with moments `m`, `v`, where `p` lives.
pub fn adamw_update(
    p: &Tensor,
    grads: &Gradients,
    m: &mut Moment,
    v: &mut Moment,
    h: AdamStep,
) -> Result<bool> {
    m.follow(p)?;
    v.follow(p)?;
    let Some(g) = grads.buf(p) else {
        return Ok(false);
    };
    let mut guard = p.store_mut();
    let Store {
        on, vals, device, ..
    } = &mut *guard;
    if !Arc::ptr_eq(on, &g.on) {
        return Err(CoreError::MixedGradients(format!(
            "adamw: tensor {} (on {device})",
            p.id()
        )));
    }
    match vals {
        Vals::F32(pb) => on.adamw(pb, &g.buf, &mut m.buf, &mut v.buf, h)?,
        Vals::Half(..) | Vals::Packed(_) => {
            return Err(CoreError::Unsupported(
                "adamw: a 16-bit frozen weight cannot be trained",
            ))
        }
    }
    Ok(true)
}
