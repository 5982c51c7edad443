//! `lora merge`: fold an adapter into its base model and write a complete model in the layout
//! the model was read from (a model directory; for Stable Diffusion a pipeline directory or a
//! single-file checkpoint).

use crate::args::MergeArgs;
use crate::hub;
use anyhow::{bail, Result};

/// `lora merge`.
pub fn command(mut a: MergeArgs) -> Result<()> {
    a.model = hub::model_dir(&a.model, a.revision.as_deref())?;
    if crate::sd::is_sd_model(&a.model) {
        return sd(a);
    }
    if !a.loras.is_empty() || a.sd_config.is_some() || a.allow_unmatched {
        bail!("--lora, --sd-config and --allow-unmatched apply to Stable Diffusion pipelines; a language model's adapter is merged with --adapter DIR");
    }
    let Some(adapter) = a.adapter else {
        bail!("--adapter: the PEFT adapter directory to merge is required");
    };
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some(d) => Some(
            lora_io::write::OutDtype::parse(d)
                .ok_or_else(|| anyhow::anyhow!("--dtype must be f32, bf16 or f16, got `{d}`"))?,
        ),
    };
    let rep = lora_io::merge::merge_to_dir(
        &a.model,
        &adapter,
        &a.out,
        lora_io::merge::MergeOptions {
            dtype,
            force: a.force,
        },
    )?;
    report_stale(&rep.removed_stale);
    outln!(
        "merged {} layers; wrote {} tensors to {}",
        rep.merged.len(),
        rep.tensors,
        rep.out.display()
    );
    Ok(())
}

fn report_stale(removed: &[std::path::PathBuf]) {
    for p in removed {
        eprintln!(
            "note: removed {}, left by a merge that was stopped",
            p.display()
        );
    }
}

/// `lora merge` on a Stable Diffusion pipeline: every --lora merged with its weight, written in
/// the layout read.
fn sd(a: MergeArgs) -> Result<()> {
    if a.adapter.is_some() {
        bail!("--adapter is for language models' PEFT directories; pass a Stable Diffusion LoRA file with --lora FILE[:WEIGHT]");
    }
    if a.loras.is_empty() {
        bail!("--lora FILE[:WEIGHT]: at least one LoRA file to merge is required");
    }
    if a.dtype.is_some() {
        bail!("--dtype: a Stable Diffusion merge keeps each tensor's stored dtype");
    }
    let loras: Vec<(std::path::PathBuf, f32)> = a
        .loras
        .iter()
        .map(|s| lora_io::sd_lora::parse_lora_arg(s))
        .collect();
    // Refuse a bad --out before the (long) load; write_merged checks again when writing.
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--model", a.model.as_path())];
    for (p, _) in &loras {
        inputs.push(("--lora", p.as_path()));
    }
    lora_io::outdir::check_not_input("--out", &a.out, &inputs)?;
    if a.model.is_file() {
        lora_io::sd_merge::check_single_output(&a.out, a.force)?;
    } else if let lora_io::outdir::Existing::Ours(_) = lora_io::outdir::inspect_output(
        "--out",
        &a.out,
        "lora merge",
        lora_io::outdir::Owned::Listed,
    )? {
        if !a.force {
            bail!(
                "--out {} exists (pass --force to replace an earlier merge)",
                a.out.display()
            );
        }
    }
    let mut pipe = crate::sd::open_pipeline(&a.model, a.sd_config.as_deref())?;
    let mut changed = Vec::new();
    for (path, weight) in &loras {
        let f = lora_io::sd_lora::read_sd_lora(path)?;
        let rep = lora_io::sd_lora::merge_sd_lora(&mut pipe, &f, *weight, a.allow_unmatched)?;
        crate::sd::report_merge(path, f.format, *weight, &rep);
        changed.extend(rep.layers);
    }
    let rep = lora_io::sd_merge::write_merged(&pipe, &changed, &a.out, a.force, &inputs)?;
    report_stale(&rep.removed_stale);
    outln!(
        "replaced {} of {} tensors; wrote {}",
        rep.replaced,
        rep.tensors,
        rep.out.display()
    );
    Ok(())
}
