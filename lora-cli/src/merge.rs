//! `lora merge`: fold an adapter into its base model and write a complete model directory.

use crate::args::MergeArgs;
use crate::hub;
use anyhow::Result;

/// `lora merge`.
pub fn command(mut a: MergeArgs) -> Result<()> {
    a.model = hub::model_dir(&a.model, a.revision.as_deref())?;
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some(d) => Some(
            lora_io::write::OutDtype::parse(d)
                .ok_or_else(|| anyhow::anyhow!("--dtype must be f32, bf16 or f16, got `{d}`"))?,
        ),
    };
    let rep = lora_io::merge::merge_to_dir(
        &a.model,
        &a.adapter,
        &a.out,
        lora_io::merge::MergeOptions {
            dtype,
            force: a.force,
        },
    )?;
    for p in &rep.removed_stale {
        eprintln!(
            "note: removed {}, left by a merge that was stopped",
            p.display()
        );
    }
    outln!(
        "merged {} layers; wrote {} tensors to {}",
        rep.merged.len(),
        rep.tensors,
        rep.out.display()
    );
    Ok(())
}
