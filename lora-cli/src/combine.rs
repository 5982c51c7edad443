//! `lora combine`: adapters into a new one (PEFT's `add_weighted_adapter`: cat, linear, svd).

use crate::args::CombineArgs;
use anyhow::Result;

/// `lora combine`.
pub fn command(a: CombineArgs) -> Result<()> {
    use lora_io::combine::Combination;
    let how = match (a.how.as_str(), a.rank) {
        ("cat", None) => Combination::Cat,
        ("linear", None) => Combination::Linear,
        ("svd", Some(0)) => anyhow::bail!("--rank must be at least 1"),
        ("svd", rank) => Combination::Svd { rank },
        ("cat" | "linear", Some(_)) => anyhow::bail!("--rank applies to --how svd only"),
        (other, _) => anyhow::bail!("--how must be cat, linear or svd, got `{other}`"),
    };
    let weights = if a.weights.is_empty() {
        vec![1.0; a.adapters.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != a.adapters.len() {
        anyhow::bail!(
            "{} --adapter but {} --weight",
            a.adapters.len(),
            weights.len()
        );
    }
    let inputs = a
        .adapters
        .iter()
        .map(|d| lora_io::combine::AdapterWeights::read(d))
        .collect::<Result<Vec<_>, _>>()?;
    let (cfg, modules) = lora_io::combine::combine(&inputs, &weights, how)?;
    let sources: Vec<(&str, &std::path::Path)> = a
        .adapters
        .iter()
        .map(|d| ("input adapter (--adapter)", d.as_path()))
        .collect();
    let _lock = lora_io::outdir::OutputLock::beside(&a.out)?;
    lora_io::outdir::prepare_dir_output(
        "--out",
        &a.out,
        "lora combine",
        &crate::PEFT_FILES,
        a.force,
        &sources,
    )?;
    lora_io::combine::write(&a.out, &cfg, &modules)?;
    outln!(
        "combined {} adapters ({}) into rank {} over {} modules: {}",
        inputs.len(),
        a.how,
        cfg.r,
        modules.len(),
        a.out.display()
    );
    Ok(())
}
