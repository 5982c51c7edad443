//! Parameter updates where the parameter lives: optimizer state ([`Moment`]) on the host for a
//! host tensor and on the device for a device tensor, and the AdamW update
//! ([`adamw_update`]) through the host kernel or the device's (`adamw_step` in both).

use crate::autograd::Gradients;
use crate::error::{CoreError, Result};
use crate::tensor::{DevVals, Tensor};
use lora_kernels::accel::{Accel, DBuf};
pub use lora_kernels::ops::adamw::AdamStep;
use std::sync::Arc;

/// One optimizer state buffer (a moment) for one tensor, kept on the tensor's device.
pub struct Moment(Place);

enum Place {
    Host(Vec<f32>),
    Dev(Arc<dyn Accel>, DBuf),
}

impl std::fmt::Debug for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Place::Host(v) => write!(f, "Moment(host, {} values)", v.len()),
            Place::Dev(_, b) => write!(f, "Moment(device, {} values)", b.len()),
        }
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
        Ok(match t.dev().as_ref() {
            Some(d) => Moment(Place::Dev(d.accel.clone(), d.accel.upload(&values)?)),
            None => Moment(Place::Host(values)),
        })
    }

    /// A host copy of the values.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.0 {
            Place::Host(v) => Ok(v.clone()),
            Place::Dev(a, b) => Ok(a.download(b)?),
        }
    }

    /// Moves the values to where `t` lives, if they are elsewhere (state restored from a
    /// checkpoint before the model moved to a device).
    fn follow(&mut self, t: &Tensor) -> Result<()> {
        let on_dev = t.dev().is_some();
        if on_dev != matches!(self.0, Place::Dev(..)) {
            *self = Self::from_vec(t, self.to_vec()?)?;
        }
        Ok(())
    }
}

/// One AdamW update of `p` from its gradient in `grads` (no gradient: nothing happens, returns
/// `false`), with moments `m`, `v`, on the host or on `p`'s device.
pub fn adamw_update(
    p: &Tensor,
    grads: &Gradients,
    m: &mut Moment,
    v: &mut Moment,
    h: AdamStep,
) -> Result<bool> {
    m.follow(p)?;
    v.follow(p)?;
    if p.device() == crate::Device::Cpu {
        let Some(g) = grads.get(p) else {
            if grads.is_on_device(p) {
                return Err(CoreError::MixedGradients(format!(
                    "adamw: tensor {} (on the host)",
                    p.id()
                )));
            }
            return Ok(false);
        };
        let (Place::Host(mv), Place::Host(vv)) = (&mut m.0, &mut v.0) else {
            unreachable!("moments follow the tensor")
        };
        lora_kernels::ops::adamw::adamw_step(&mut p.data_mut(), g, mv, vv, h)?;
        return Ok(true);
    }
    let Some(g) = grads.dev_buf(p) else {
        if grads.get(p).is_some() {
            return Err(CoreError::MixedGradients(format!(
                "adamw: tensor {} (on a device)",
                p.id()
            )));
        }
        return Ok(false);
    };
    let mut guard = p.dev_mut();
    let d = guard
        .as_mut()
        .ok_or(CoreError::Internal("adamw: the tensor left its device"))?;
    let (Place::Dev(_, mb), Place::Dev(_, vb)) = (&mut m.0, &mut v.0) else {
        unreachable!("moments follow the tensor")
    };
    match &mut d.vals {
        DevVals::F32(pb) => d.accel.adamw(pb, g, mb, vb, h)?,
        DevVals::Half(..) => {
            return Err(CoreError::Unsupported(
                "adamw: a 16-bit frozen weight cannot be trained",
            ))
        }
    }
    Ok(true)
}
