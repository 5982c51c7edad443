//! Where tensors live: the host (`Device::Cpu`) or an NVIDIA GPU (`Device::Cuda(ordinal)`).
//!
//! A CUDA device is opened on first use ([`accel`]): the driver library is looked for first (no
//! context is created without one, so a machine without a GPU gets an error, never a panic),
//! then every kernel is compiled by NVRTC for the device's compute capability, once per process.
//! The CPU's backend ([`lora_kernels::cpu::Cpu`]) needs no opening.

use crate::error::{CoreError, Result};
use lora_kernels::accel::Accel;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

/// A compute device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory, rayon threads.
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

fn registry() -> &'static Mutex<HashMap<usize, Arc<dyn Accel>>> {
    static R: OnceLock<Mutex<HashMap<usize, Arc<dyn Accel>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The backend of a device: the CPU's, or a CUDA device's, opened (kernels compiled) on first
/// use and shared after.
pub fn accel(device: Device) -> Result<Arc<dyn Accel>> {
    let Device::Cuda(ordinal) = device else {
        return Ok(crate::tensor::cpu());
    };
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = reg.get(&ordinal) {
        return Ok(a.clone());
    }
    let a = open_cuda(ordinal)?;
    reg.insert(ordinal, a.clone());
    Ok(a)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Arc<dyn Accel>> {
    lora_kernels::cuda::CudaDevice::open(ordinal)
        .map(|d| Arc::new(d) as Arc<dyn Accel>)
        .map_err(|e| {
            let why = match e {
                lora_kernels::KernelError::Device(why) => why,
                other => other.to_string(),
            };
            CoreError::CudaUnavailable(format!("cuda:{ordinal}"), why)
        })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Arc<dyn Accel>> {
    Err(CoreError::CudaUnavailable(
        format!("cuda:{ordinal}"),
        "this build has no CUDA support (feature `cuda` off)".into(),
    ))
}

/// The CUDA devices that answer: 0 without a driver library (probed first, so never a panic),
/// without a device, or in a build without CUDA.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    let answer = lora_kernels::cuda::device_count();
    #[cfg(not(feature = "cuda"))]
    let answer = 0;
    answer
}

/// Whether the CUDA driver library (`libcuda`) loads (false in a build without CUDA).
pub fn cuda_driver_available() -> bool {
    #[cfg(feature = "cuda")]
    let answer = lora_kernels::cuda::driver_available();
    #[cfg(not(feature = "cuda"))]
    let answer = false;
    answer
}

impl Device {
    /// The device `--device auto` means: the first CUDA device when the driver library loads,
    /// a device answers and it opens (its kernels compile), else the CPU. Returns it with one
    /// line for the log that names it and, for the CPU, why no GPU was taken. Never an error:
    /// whatever stands in the GPU's way is the reason.
    pub fn auto() -> (Device, String) {
        let gpus = cuda_device_count();
        if gpus == 0 {
            let why = if cfg!(not(feature = "cuda")) {
                "this build has no CUDA support"
            } else if cuda_driver_available() {
                "no CUDA device answers"
            } else {
                "no CUDA driver library"
            };
            return (Device::Cpu, format!("cpu (auto: {why})"));
        }
        match Device::Cuda(0).describe() {
            Ok(name) => (Device::Cuda(0), format!("{name} (auto)")),
            Err(e) => (
                Device::Cpu,
                format!("cpu (auto: {gpus} CUDA device(s) found but unusable: {e})"),
            ),
        }
    }

    /// `Ok` when tensors can be created and computed on this device (opens a CUDA device).
    pub fn ensure_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => accel(*self).map(|_| ()),
        }
    }

    /// Waits for the device's queued work (a no-op on the CPU); benchmarks time with it.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Ok(accel(*self)?.synchronize()?),
        }
    }

    /// TF32 tensor-core math for the GPU's dense base products (off by default; see
    /// [`lora_kernels::accel::Accel::set_tf32`]). The CPU has no such mode: asking for it there
    /// is an error rather than a silent no-op.
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        match self {
            Device::Cpu if on => Err(CoreError::Unsupported(
                "TF32 is a GPU math mode: use it with a CUDA device",
            )),
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Ok(accel(*self)?.set_tf32(on)?),
        }
    }

    /// One line naming the device (for logs): `cpu`, or the GPU's name and architecture.
    pub fn describe(&self) -> Result<String> {
        match self {
            Device::Cpu => Ok("cpu".into()),
            Device::Cuda(_) => Ok(accel(*self)?.describe()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| CoreError::BadDevice(s.to_string())),
        }
    }
}

/// The devices unit tests run their bodies on: the CPU, and `cuda:0` where one answers.
#[cfg(test)]
pub(crate) fn test_devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if cuda_device_count() > 0 {
        out.push(Device::Cuda(0));
    }
    out
}

/// `got` (computed on `device`) against the CPU's `want`: the same bits on the CPU, within 1e-4
/// of the largest magnitude on a GPU (other summation orders).
#[cfg(test)]
pub(crate) fn assert_close(what: &str, device: Device, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if device == Device::Cpu {
        assert_eq!(got, want, "{what}");
        return;
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let e = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        e <= 1e-4 * scale,
        "{what} on {device}: differs by {e} (scale {scale})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_availability() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("tpu"
            .parse::<Device>()
            .unwrap_err()
            .to_string()
            .contains("unknown device `tpu`"));
        assert!(Device::Cpu.ensure_available().is_ok());
        // An ordinal no machine has: a clear error naming it, never a panic.
        let e = Device::Cuda(977)
            .ensure_available()
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:977") && e.contains("--device cpu"), "{e}");
        // No GPU on the machines the tests run on without one: the CPU with a reason.
        let (d, line) = Device::auto();
        if cuda_device_count() == 0 {
            assert_eq!(d, Device::Cpu);
            assert!(line.starts_with("cpu (auto: no CUDA"), "{line}");
        }
        assert_eq!(accel(Device::Cpu).unwrap().describe(), "cpu");
    }
}
