//! `lora convert`: a PEFT adapter directory to a kohya `.safetensors` file, or back.

use crate::args::ConvertArgs;
use anyhow::Result;
use lora_io::hf::ModelDir;
use std::path::Path;

/// `lora convert`.
pub fn command(a: ConvertArgs) -> Result<()> {
    run_convert(
        &a.from,
        &a.to,
        a.model.as_deref(),
        &a.prefix,
        a.force,
        &crate::PEFT_FILES,
    )
}

pub fn run_convert(
    from: &Path,
    to: &Path,
    model: Option<&Path>,
    prefix: &str,
    force: bool,
    peft_files: &[&str],
) -> Result<()> {
    use lora_io::kohya::KohyaLora;
    use lora_io::outdir;
    let _lock = outdir::OutputLock::beside(to)?;
    if from.is_dir() {
        if to.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            anyhow::bail!("PEFT -> kohya writes one file: --to must end in .safetensors");
        }
        outdir::check_not_input("--to", to, &[("--from adapter", from)])?;
        outdir::check_output_file("--to", to, force)?;
        let mut k = KohyaLora::from_peft(from, prefix)?;
        k.metadata
            .insert(outdir::FILE_MARK.into(), "lora convert".into());
        k.write(to)?;
        outln!(
            "wrote {} modules to {} (kohya, prefix {prefix})",
            k.modules.len(),
            to.display()
        );
    } else {
        let model = model.ok_or_else(|| anyhow::anyhow!(
            "kohya -> PEFT needs --model DIR: kohya flattens module paths with `_`, and only the model's module list can restore the dots"
        ))?;
        if to.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            anyhow::bail!(
                "kohya -> PEFT writes an adapter directory: --to must not end in .safetensors"
            );
        }
        outdir::check_not_input(
            "--to",
            to,
            &[("--from file", from), ("--model directory", model)],
        )?;
        let k = KohyaLora::read(from)?;
        let m = ModelDir::open(model)?.load_model()?;
        outdir::prepare_dir_output(
            "--to",
            to,
            "lora convert",
            peft_files,
            force,
            &[("--from file", from), ("--model directory", model)],
        )?;
        k.to_peft(m.as_ref(), to)?;
        outln!(
            "wrote {} modules to {} (PEFT)",
            k.modules.len(),
            to.display()
        );
    }
    Ok(())
}
