//! `lora`: the command-line front end of lora-rs.
//!
//! Flags are defined once here with their help text; each subcommand turns them into a plain
//! run configuration and hands it to its module. Errors print their whole chain and exit 1.
//! Commands: `demo`, `train`, `eval`, `generate`, `merge`, `inspect`, `convert`, `combine`,
//! `bench linear|gemm|train|mixed`.
//!
//! Standard output goes through `outln!`, which drops what a closed pipe cannot take
//! (`lora train ... | head`) instead of panicking: a run keeps training and checkpointing.

/// `println!` that never panics on a closed standard output (see the module docs).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod args;
mod bench;
mod bench_cuda;
mod combine;
mod config;
mod convert;
mod demo;
mod demo_data;
mod demo_detect;
mod demo_detect_data;
mod demo_diffusion;
mod demo_diffusion_data;
mod device;
mod eval;
mod generate;
mod hub;
mod inspect;
mod merge;
mod model;
mod sd;
mod sd_bench;
mod train;
mod train_bench;
mod vision;
mod vision_bench;

use anyhow::Result;
use args::{Cli, Command, SdCommand};
use clap::{CommandFactory, FromArgMatches};
use config::{expand_config, negatives_as_values};
use std::ffi::OsString;

/// Keeps large freed buffers in the process instead of returning them to the OS: every training
/// step allocates and frees activations of the same sizes, and glibc's default (mmap/munmap for
/// blocks over 128 KiB-32 MiB) turned that into page faults and TLB-shootdown IPIs, about 16% of
/// a GPT-2 training step in `perf` (kernel `native_write_msr`, `smp_call_function_many_cond`,
/// `clear_page_erms`).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc allocator thresholds; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn parse_cli() -> Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let from_file = argv.iter().any(|a| a == "--config");
    let matches = negatives_as_values(Cli::command())
        .args_override_self(true)
        .try_get_matches_from(expand_config(argv)?)
        .unwrap_or_else(|e| {
            if from_file && e.use_stderr() {
                // A bad value may come from the file: its keys reach clap as flags.
                eprintln!("note: the --config file's keys are read as the flags of the same name");
            }
            e.exit()
        });
    Ok(Cli::from_arg_matches(&matches)?)
}

fn main() {
    tune_allocator();
    let result = parse_cli().and_then(run);
    if result.is_ok() {
        if let Some(status) = train::signal_exit_status() {
            // A run stopped by Ctrl-C or SIGTERM wrote its checkpoint; the status says it did
            // not finish (so `lora train ... && lora merge ...` stops there).
            std::process::exit(status);
        }
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        // Our errors put their source's text in their own message ("path: os error"); print a
        // cause only when it adds something.
        let mut shown = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !shown.contains(&c) {
                eprintln!("  caused by: {c}");
            }
            shown = c;
        }
        std::process::exit(1);
    }
}

/// The files of a PEFT adapter directory (what `combine` and `convert` write there).
pub(crate) const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Each command's module turns its flags into a run.
fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::command(a),
        Command::Train(a) => train::command(a),
        Command::Eval(a) => eval::command(a),
        Command::Generate(a) => generate::command(a),
        Command::Predict(a) => vision::predict(a),
        Command::Merge(a) => merge::command(a),
        Command::Inspect(a) => inspect::command(a),
        Command::Convert(a) => convert::command(a),
        Command::Combine(a) => combine::command(a),
        Command::Bench(b) => bench::command(b),
        Command::Sd(SdCommand::Generate(a)) => sd::generate(a),
        Command::Extract(a) => sd::extract(a),
    }
}
