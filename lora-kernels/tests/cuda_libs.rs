//! Finding the CUDA libraries before cudarc loads them (cudarc panics on a library it cannot
//! find): a library missing everywhere is an error naming it, the folders searched and how to
//! get it; a file that is there but does not load, or belongs to another CUDA major version,
//! is named as such. Runs on any machine: a fake toolkit under `CUDA_HOME` supplies the files.
#![cfg(feature = "cuda")]

use lora_kernels::cuda_libs::{ensure, search_dirs, CUBLAS, CUDA_MAJOR};

#[test]
fn a_missing_library_is_an_error_naming_it_and_where_to_get_it() {
    let home = std::env::temp_dir().join(format!("lora-cuda-home-{}", std::process::id()));
    let lib = home.join("lib64");
    std::fs::create_dir_all(&lib).unwrap();
    // Not a shared object, and one of another major version.
    std::fs::write(
        lib.join(format!("libcublas.so.{CUDA_MAJOR}")),
        b"not an ELF file",
    )
    .unwrap();
    let other = if CUDA_MAJOR == 13 { 12 } else { 13 };
    let other_file = format!("libcublas.so.{other}.0.1");
    std::fs::write(lib.join(&other_file), b"also not").unwrap();
    // A virtual environment holding both wheel layouts: CUDA 12's one folder per library and
    // CUDA 13's shared `nvidia/cu13/lib`.
    let venv = home.join("venv");
    let site = venv.join("lib/python3.12/site-packages/nvidia");
    for w in ["cublas", "cu13"] {
        std::fs::create_dir_all(site.join(w).join("lib")).unwrap();
    }
    // SAFETY: this test binary has this one test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("CUDA_HOME", &home);
        std::env::set_var("VIRTUAL_ENV", &venv);
    }
    let dirs = search_dirs(CUBLAS);
    assert!(dirs.contains(&lib), "{dirs:?}");
    assert!(dirs.contains(&site.join("cublas/lib")), "{dirs:?}");
    assert!(dirs.contains(&site.join("cu13/lib")), "{dirs:?}");
    let own = if CUDA_MAJOR == 13 { "cu13" } else { "cublas" };
    assert_eq!(CUBLAS.wheel(), own);
    match ensure(CUBLAS) {
        // A machine with a real cuBLAS on the loader's path finds it before any folder.
        Ok(()) => eprintln!("cuBLAS loads by name here; the missing-library message is untested"),
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains(&format!("libcublas.so.{CUDA_MAJOR} not found")),
                "{m}"
            );
            assert!(m.contains(&lib.display().to_string()), "{m}");
            assert!(m.contains("is there but does not load"), "{m}");
            assert!(
                m.contains(&other_file) && m.contains("another CUDA version"),
                "{m}"
            );
            let (package, build) = if CUDA_MAJOR == 13 {
                ("nvidia-cublas`", "the default features (cuda-12)")
            } else {
                ("nvidia-cublas-cu12`", "--features cuda-13")
            };
            assert!(m.contains(&format!("pip install {package}")), "{m}");
            assert!(m.contains(build), "{m}");
        }
    }
    let _ = std::fs::remove_dir_all(&home);
}
