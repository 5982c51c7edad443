//! The `lora` binary end to end: JSON output shape, and bad input turned into a clear error
//! with a non-zero exit instead of a panic.

use std::process::Command;

fn lora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).output().expect("run lora")
}

#[test]
fn bench_linear_json_has_the_documented_fields() {
    let out = lora(&["bench", "linear", "--tokens", "33", "--in", "17", "--out", "29", "--rank", "3", "--iters", "3", "--threads", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for key in ["median_ms", "gflops", "base_only_median_ms", "base_only_gflops", "overhead_pct", "gemm_ceiling_gflops", "fraction_of_ceiling"] {
        assert!(v[key].as_f64().is_some_and(|x| x.is_finite() && x > -100.0), "{key}: {v}");
    }
    assert_eq!(v["threads"], 1);
    assert_eq!(v["rank"], 3);
}

#[test]
fn bad_arguments_fail_cleanly() {
    for (args, needle) in [
        (vec!["bench", "linear", "--rank", "0"], "must all be at least 1"),
        (vec!["bench", "linear", "--threads", "0"], "--threads must be at least 1"),
        (vec!["bench", "gemm", "--size", "0"], "--size and --iters"),
    ] {
        let out = lora(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
    }
}
