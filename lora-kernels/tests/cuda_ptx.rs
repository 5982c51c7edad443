//! Every CUDA source compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200), on any machine
//! where libnvrtc loads: no GPU needed. `.ci/run` installs the PyPI wheel
//! `nvidia-cuda-nvrtc-cu12` into `.ci/cache/cuda` and puts it on `LD_LIBRARY_PATH`; without it
//! the test says it was skipped (unless `LORA_REQUIRE_NVRTC` is set, as `.ci/run` does once
//! the wheel is installed: then failing to load it fails the test). With `LORA_PTXAS` pointing at `ptxas` (wheel
//! `nvidia-cuda-nvcc-cu12`), it also assembles the sm_90 PTX and fails on any register spill in
//! the LoRA kernels, printing the register counts (recorded in docs/kernels.md).
#![cfg(feature = "cuda")]

use lora_kernels::cuda::{compile_ptx, nvrtc_available, SOURCES};

#[test]
fn every_source_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        // .ci/run sets this when it installed the wheel: then a skip would hide a problem.
        assert!(
            std::env::var_os("LORA_REQUIRE_NVRTC").is_none(),
            "LORA_REQUIRE_NVRTC is set but libnvrtc does not load (LD_LIBRARY_PATH?)"
        );
        println!("SKIPPED: libnvrtc not found (LD_LIBRARY_PATH); .ci/run installs it");
        return;
    }
    for src in SOURCES {
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile_ptx(src, arch).unwrap_or_else(|e| panic!("{e}"));
            for k in src.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{}: kernel {k} missing from the {arch} PTX",
                    src.file
                );
            }
            assert!(ptx.contains(&format!(".target {arch}")), "{}", src.file);
            if arch == "sm_90" {
                if let Ok(ptxas) = std::env::var("LORA_PTXAS") {
                    check_ptxas(&ptxas, src.file, &ptx);
                }
            }
        }
    }
}

fn check_ptxas(ptxas: &str, file: &str, ptx: &str) {
    let dir = std::env::temp_dir().join(format!("lora-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{file}.ptx"));
    std::fs::write(&path, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .args(["-v", "-arch=sm_90", "-o"])
        .arg(dir.join("out.cubin"))
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {ptxas}: {e}"));
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ptxas failed on {file}: {log}");
    let mut current = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().unwrap_or("").to_string();
        }
        if line.contains("registers") {
            println!("{file} {current}: {}", line.trim());
        }
        if line.contains("spill") {
            println!("{file} {current}: {}", line.trim());
            if current.starts_with("lora_") {
                assert!(
                    line.contains("0 bytes spill stores, 0 bytes spill loads"),
                    "{current} spills: {line}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The on-disk PTX cache: a first call compiles and stores, a second reads the same text back,
/// a different architecture is a different entry, and a damaged entry is recompiled.
#[test]
fn compiled_ptx_is_cached_on_disk() {
    use lora_kernels::cuda::{compile_ptx_cached, ptx_cache_dir};
    if !nvrtc_available() {
        println!("SKIPPED: libnvrtc not found (LD_LIBRARY_PATH); .ci/run installs it");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lora-ptx-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The only test in this binary that sets it (tests run in threads of one process).
    std::env::set_var("LORA_CACHE_DIR", &dir);
    assert_eq!(ptx_cache_dir().as_deref(), Some(dir.as_path()));
    let src = SOURCES.iter().find(|s| s.file == "adamw.cu").unwrap();
    let (first, hit) = compile_ptx_cached(src, "sm_80").unwrap();
    assert!(!hit, "empty cache");
    let (second, hit) = compile_ptx_cached(src, "sm_80").unwrap();
    assert!(hit && second == first, "served from the cache, unchanged");
    assert_eq!(first, compile_ptx(src, "sm_80").unwrap());
    let (_, hit) = compile_ptx_cached(src, "sm_90").unwrap();
    assert!(!hit, "another architecture is another entry");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(entries.len(), 2, "two entries, no temporary files left");
    for e in &entries {
        std::fs::write(e.path(), "garbage").unwrap();
    }
    let (again, hit) = compile_ptx_cached(src, "sm_80").unwrap();
    assert!(!hit && again == first, "a damaged entry is recompiled");
    std::env::remove_var("LORA_CACHE_DIR");
    let _ = std::fs::remove_dir_all(&dir);
}
