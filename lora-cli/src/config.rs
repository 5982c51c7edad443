//! `lora train --config FILE.toml` and the command line's own parsing rules: a file's keys
//! become flags, and every flag that takes a value accepts a negative number.

use crate::args::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::ffi::OsString;

/// `lora train --config FILE.toml`: the file's keys become flags placed before the command
/// line's own, and clap lets a later occurrence override an earlier one, so flags win. Keys are
/// checked against the flags of `lora train` and named with the file in errors.
pub fn expand_config(mut argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).map(|a| a != "train").unwrap_or(true) {
        return Ok(argv);
    }
    let Some(i) = argv.iter().position(|a| a == "--config") else {
        return Ok(argv);
    };
    let path = argv.get(i + 1).cloned().context("--config needs a file")?;
    argv.drain(i..i + 2);
    let bytes = lora_io::files::read_small(std::path::Path::new(&path), "--config file")?
        .with_context(|| format!("{}: not found", path.to_string_lossy()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{}: not valid UTF-8", path.to_string_lossy()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: invalid TOML", path.to_string_lossy()))?;
    let cmd = Cli::command();
    let train = cmd
        .find_subcommand("train")
        .expect("train subcommand exists");
    let mut extra: Vec<OsString> = Vec::new();
    let at = |k: &str| format!("{}: key `{k}`", path.to_string_lossy());
    for (k, v) in table {
        let flag = k.replace('_', "-");
        let Some(arg) = train
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
        else {
            anyhow::bail!(
                "{}: unknown key `{k}` (keys are the flags of `lora train`, e.g. lr, rank, target)",
                path.to_string_lossy()
            );
        };
        if matches!(flag.as_str(), "force" | "resume") {
            anyhow::bail!(
                "{}: `{k}` says what to do with an existing output: pass --{flag} on the command \
                 line, not in the file",
                path.to_string_lossy()
            );
        }
        // A flag on the command line overrides the file, also one that excludes this key
        // (`--steps` on the command line and `epochs` in the file).
        let on_line = |name: &str| {
            argv.iter().any(|a| {
                let a = a.to_string_lossy();
                a == format!("--{name}") || a.starts_with(&format!("--{name}="))
            })
        };
        if train
            .get_arg_conflicts_with(arg)
            .iter()
            .any(|c| c.get_long().is_some_and(on_line))
        {
            continue;
        }
        let switch = !arg.get_action().takes_values();
        match v {
            toml::Value::Boolean(true) if switch => extra.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) if switch => {}
            _ if switch => anyhow::bail!("{} must be true or false, got {v:?}", at(&k)),
            toml::Value::String(s) => extra.extend([format!("--{flag}").into(), s.into()]),
            toml::Value::Integer(n) => {
                extra.extend([format!("--{flag}").into(), n.to_string().into()])
            }
            toml::Value::Float(f) => {
                extra.extend([format!("--{flag}").into(), f.to_string().into()])
            }
            other => anyhow::bail!(
                "{} must be a string or a number, got {}",
                at(&k),
                other.type_str()
            ),
        }
    }
    argv.splice(2..2, extra);
    Ok(argv)
}

/// Every flag that takes a value accepts a negative number as one (`--lr -1`), so the value's
/// own check says what is wrong with it instead of clap taking it for an unknown flag.
pub fn negatives_as_values(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    });
    for n in names {
        cmd = cmd.mut_subcommand(n, negatives_as_values);
    }
    cmd
}
