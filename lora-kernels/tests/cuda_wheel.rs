//! A CUDA library that lives only in a pip wheel's folder of the active Python environment
//! (`$VIRTUAL_ENV/lib/python3.*/site-packages/nvidia/<wheel>/lib`, `nvidia/cu13/lib` for CUDA
//! 13), not on the loader's path, is found, loaded and used: every kernel source compiles
//! through it. The library is the NVRTC that `.ci/run` puts on `LD_LIBRARY_PATH`; the test
//! re-runs itself in a child process without `LD_LIBRARY_PATH` and with a virtual environment
//! whose wheel folder links to it. Without NVRTC it says it was skipped (unless
//! `LORA_REQUIRE_NVRTC` is set, as `.ci/run` does).
#![cfg(feature = "cuda")]

use lora_kernels::cuda::{compile_ptx, SOURCES};
use lora_kernels::cuda_libs::{ensure, CUDA_MAJOR, NVRTC};
use std::path::PathBuf;

const TEST: &str = "nvrtc_in_a_pip_wheel_folder_is_found_and_used";

#[test]
fn nvrtc_in_a_pip_wheel_folder_is_found_and_used() {
    if std::env::var_os("LORA_WHEEL_CHILD").is_some() {
        // SAFETY: only tries to dlopen the library by its candidate names.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!(
                "SKIPPED: libnvrtc loads by name here (system paths); the wheel search is untested"
            );
            return;
        }
        ensure(NVRTC).unwrap_or_else(|e| panic!("{e}"));
        for src in SOURCES {
            let ptx = compile_ptx(src, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(".target sm_90"), "{}", src.file);
        }
        println!(
            "compiled {} sources through the wheel folder's NVRTC",
            SOURCES.len()
        );
        return;
    }
    let file = format!("libnvrtc.so.{CUDA_MAJOR}");
    let found = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join(&file).exists());
    let Some(dir) = found else {
        assert!(
            std::env::var_os("LORA_REQUIRE_NVRTC").is_none(),
            "LORA_REQUIRE_NVRTC is set but no {file} is on LD_LIBRARY_PATH"
        );
        println!("SKIPPED: no {file} on LD_LIBRARY_PATH; .ci/run installs it");
        return;
    };
    let venv = std::env::temp_dir().join(format!("lora-wheel-venv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&venv);
    let wheel: PathBuf = venv
        .join("lib/python3.12/site-packages/nvidia")
        .join(NVRTC.wheel());
    std::fs::create_dir_all(&wheel).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(&dir).unwrap(), wheel.join("lib")).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture"])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .env_remove("CONDA_PREFIX")
        .env("VIRTUAL_ENV", &venv)
        .env("LORA_WHEEL_CHILD", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&venv);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("compiled") || text.contains("SKIPPED"),
        "{text}"
    );
    println!("{text}");
}
