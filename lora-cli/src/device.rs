//! `--device` as the commands take it.

use anyhow::{Context, Result};

/// `--device`: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when the driver library loads, a device
/// answers and its kernels compile, else the CPU). Returns the device and the one line that says
/// which and why. An explicit CUDA device that cannot be used is an error with the reason; the
/// driver library is probed before any CUDA call, so there is never a panic.
pub fn resolve_device(s: &str) -> Result<(lora_core::Device, String)> {
    use lora_core::Device;
    let d = match s {
        "auto" => None,
        other => Some(
            other
                .parse::<Device>()
                .with_context(|| "--device must be auto, cpu, cuda or cuda:N")?,
        ),
    };
    match d {
        Some(Device::Cpu) => Ok((Device::Cpu, "device: cpu".into())),
        Some(dev) => match dev.describe() {
            Ok(name) => Ok((dev, format!("device: {name}"))),
            Err(e) => anyhow::bail!("--device {s}: {e}"),
        },
        None => {
            let (device, line) = Device::auto();
            Ok((device, format!("device: {line}")))
        }
    }
}
