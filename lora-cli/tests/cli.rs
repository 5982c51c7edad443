//! The `lora` binary end to end: JSON output shape, and bad input turned into a clear error
//! with a non-zero exit instead of a panic.

use std::process::Command;

fn lora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .output()
        .expect("run lora")
}

#[test]
fn bench_linear_json_has_the_documented_fields() {
    // Both precisions report the same fields; bf16's ceiling is the bf16 GEMM.
    for precision in ["f32", "bf16"] {
        let out = lora(&[
            "bench",
            "linear",
            "--tokens",
            "33",
            "--in",
            "17",
            "--out",
            "29",
            "--rank",
            "3",
            "--iters",
            "3",
            "--threads",
            "1",
            "--precision",
            precision,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        for key in [
            "median_ms",
            "gflops",
            "base_only_median_ms",
            "base_only_gflops",
            "overhead_pct",
            "gemm_ceiling_gflops",
            "fraction_of_ceiling",
        ] {
            assert!(
                v[key].as_f64().is_some_and(|x| x.is_finite() && x > -100.0),
                "{key}: {v}"
            );
        }
        assert_eq!(v["threads"], 1);
        assert_eq!(v["rank"], 3);
        assert_eq!(v["precision"], precision);
    }
    let out = lora(&["bench", "linear", "--precision", "fp8"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("precision must be f32 or bf16"));
}

/// `bench peak` and `bench vision` report the figures the performance notes quote: the f32
/// FMA peak (and the bf16 one exactly where the CPU has AVX512-BF16), and a ViT step's product
/// FLOPs with their rate and share of the peak.
#[test]
fn bench_peak_and_vision_json_have_the_documented_fields() {
    let ok = |args: &[&str]| -> serde_json::Value {
        let out = lora(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
    };
    let v = ok(&[
        "bench",
        "peak",
        "--threads",
        "1",
        "--seconds",
        "0.05",
        "--json",
    ]);
    assert_eq!(v["threads"], 1);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(v["f32"]["gflops"].as_f64().is_some_and(|g| g > 0.1), "{v}");
        let bf16 = std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f");
        assert_eq!(v["bf16"].is_null(), !bf16, "{v}");
        // The product kernel is one of the four, VDPBF16PS only where the CPU has it.
        let kernel = v["bf16_kernel"].as_str().unwrap();
        assert!(
            kernel.contains("VDPBF16PS") && bf16 || kernel.starts_with("bf16 widened"),
            "{v}"
        );
    }
    let v = ok(&[
        "bench",
        "vision",
        "--layers",
        "1",
        "--batch",
        "1",
        "--size",
        "32",
        "--steps",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    // 1 block, 4 patches + [CLS] = 5 tokens, hidden 768, MLP 3072, r16, 10 labels:
    // forward 2*4*768*768 (patches) + 2*5*(4*768^2 + 2*768*3072) + 4*25*768 + 8*5*16*768
    // + 2*768*10; backward without block 0's q/k/v input gradients, their adapters' dX and
    // its attention's dK (k derives only from frozen tensors there).
    let fwd = 2.0 * 4.0 * 768.0 * 768.0
        + 2.0 * 5.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0)
        + 4.0 * 25.0 * 768.0
        + 8.0 * 5.0 * 16.0 * 768.0
        + 2.0 * 768.0 * 10.0;
    let bwd = 2.0 * 5.0 * (768.0 * 768.0 + 2.0 * 768.0 * 3072.0)
        + 6.0 * 25.0 * 768.0
        + 12.0 * 5.0 * 16.0 * 768.0
        + 4.0 * 768.0 * 10.0;
    let got = v["step_gflop"].as_f64().unwrap() * 1e9;
    assert!((got - (fwd + bwd)).abs() < 1.0, "{got} vs {}", fwd + bwd);
    for key in ["median_step_s", "images_per_s", "gflops"] {
        assert!(
            v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
            "{key}: {v}"
        );
    }
}

#[test]
fn bad_arguments_fail_cleanly() {
    for (args, needle) in [
        (
            vec!["bench", "linear", "--rank", "0"],
            "must all be at least 1",
        ),
        (
            vec!["bench", "linear", "--threads", "0"],
            "--threads must be from 1 to",
        ),
        (
            vec!["bench", "linear", "--threads", "5000"],
            "--threads must be from 1 to",
        ),
        (vec!["bench", "gemm", "--size", "0"], "--size and --iters"),
        (
            vec!["bench", "peak", "--seconds", "0"],
            "--seconds must be above 0",
        ),
        (
            vec!["bench", "peak", "--seconds", "NaN"],
            "--seconds must be above 0",
        ),
        (
            vec!["inspect", "/nonexistent/file.safetensors"],
            "/nonexistent/file.safetensors: No such file",
        ),
    ] {
        let out = lora(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("caused by"),
            "a cause repeating the message is not printed again: {err}"
        );
    }
}

fn fixture(p: &str) -> String {
    format!("{}/../fixtures/parity/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn eval_json_matches_the_transformers_reference() {
    let (model, adapter, data) = (
        fixture("qwen2_bias/model"),
        fixture("qwen2_bias/adapter"),
        fixture("eval.txt"),
    );
    let args = [
        "eval",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--data",
        &data,
        "--seq-len",
        "16",
        "--json",
    ];
    let out = lora(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2_bias/reference.json")).unwrap(),
    )
    .unwrap();
    let (got, want) = (
        v["loss"].as_f64().unwrap(),
        reference["eval.txt.loss"].as_f64().unwrap(),
    );
    assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
    assert_eq!(v["tokens"], reference["eval.txt.tokens"]);
    assert!((v["perplexity"].as_f64().unwrap() - got.exp()).abs() < 1e-6);
    assert_eq!(v["precision"], "f32");
    // bf16 products: near transformers' f32 loss (the tolerance of the parity tests' bf16
    // check), not equal to ours in f32 (the setting took effect); CPU only.
    let mut args = args.to_vec();
    args.extend(["--precision", "bf16"]);
    let out = lora(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bf = v["loss"].as_f64().unwrap();
    assert_eq!(v["precision"], "bf16");
    assert!(
        (bf - want).abs() < 1e-3 && bf != got,
        "bf16 {bf}, f32 {got}, reference {want}"
    );
    // On a GPU it is the precision that is refused; without one, the device itself is
    // (resolved first): either way the run does not start.
    let mut on_gpu = args.to_vec();
    on_gpu.extend(["--device", "cuda"]);
    let out = lora(&on_gpu);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    let gpu = lora_core::Device::Cuda(0).ensure_available().is_ok();
    assert!(
        if gpu {
            e.contains("--precision bf16 runs on the CPU only")
        } else {
            e.contains("cuda")
        },
        "{e}"
    );
}

#[test]
fn generate_prints_the_greedy_continuation() {
    let (model, adapter) = (fixture("gpt2/model"), fixture("gpt2/adapter"));
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--prompt",
            "the red cat",
            "--max-new-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        lora(&args)
    };
    // f32, then bf16 (the weights packed at load, as `lora train --precision bf16` trains):
    // both continue the prompt; bf16 says which products ran.
    for extra in [&[][..], &["--precision", "bf16"][..]] {
        let out = generate(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("the red cat"));
        assert_eq!(err.contains("bf16 products ("), !extra.is_empty(), "{err}");
    }
    let out = lora(&["generate", "--model", &fixture("gpt2"), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("is this a Hugging Face model directory"),
        "{err}"
    );
}

#[test]
fn merge_writes_a_model_that_eval_reads() {
    let out = std::env::temp_dir().join(format!("lora-cli-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_string_lossy().to_string();
    let r = lora(&[
        "merge",
        "--model",
        &fixture("gpt2/model"),
        "--adapter",
        &fixture("gpt2/adapter"),
        "--out",
        &o,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("merged 4 layers"));
    // The merged model alone evaluates like base + adapter.
    let merged = lora(&[
        "eval",
        "--model",
        &o,
        "--data",
        &fixture("eval.jsonl"),
        "--seq-len",
        "16",
        "--json",
    ]);
    let with_adapter = lora(&[
        "eval",
        "--model",
        &fixture("gpt2/model"),
        "--adapter",
        &fixture("gpt2/adapter"),
        "--data",
        &fixture("eval.jsonl"),
        "--seq-len",
        "16",
        "--json",
    ]);
    let a: serde_json::Value = serde_json::from_slice(&merged.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&with_adapter.stdout).unwrap();
    assert!((a["loss"].as_f64().unwrap() - b["loss"].as_f64().unwrap()).abs() < 1e-5);
    // A second merge into the same place is refused without --force.
    let r = lora(&[
        "merge",
        "--model",
        &fixture("gpt2/model"),
        "--adapter",
        &fixture("gpt2/adapter"),
        "--out",
        &o,
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--force"));
    let r = lora(&[
        "merge",
        "--model",
        &fixture("gpt2/model"),
        "--adapter",
        &fixture("gpt2/adapter"),
        "--out",
        &o,
        "--dtype",
        "f8",
    ]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("--dtype must be f32, bf16 or f16"));
}

#[test]
fn convert_round_trip_and_inspect() {
    let t = std::env::temp_dir().join(format!("lora-cli-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).unwrap();
    let k = t.join("lora.safetensors").to_string_lossy().to_string();
    let p = t.join("peft").to_string_lossy().to_string();
    let r = lora(&[
        "convert",
        "--from",
        &fixture("llama_gqa/adapter"),
        "--to",
        &k,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = lora(&["convert", "--from", &k, "--to", &p]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("needs --model"));
    let r = lora(&[
        "convert",
        "--from",
        &k,
        "--to",
        &p,
        "--model",
        &fixture("llama_gqa/model"),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let a = lora(&[
        "eval",
        "--model",
        &fixture("llama_gqa/model"),
        "--adapter",
        &p,
        "--data",
        &fixture("eval.jsonl"),
        "--seq-len",
        "16",
        "--json",
    ]);
    let b = lora(&[
        "eval",
        "--model",
        &fixture("llama_gqa/model"),
        "--adapter",
        &fixture("llama_gqa/adapter"),
        "--data",
        &fixture("eval.jsonl"),
        "--seq-len",
        "16",
        "--json",
    ]);
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&a.stdout).unwrap(),
        serde_json::from_slice(&b.stdout).unwrap(),
    );
    assert!((a["loss"].as_f64().unwrap() - b["loss"].as_f64().unwrap()).abs() < 1e-6);
    let r = lora(&["inspect", &p, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["kind"], "adapter");
    assert_eq!(v["modules"].as_array().unwrap().len(), 6);
}

#[test]
fn combine_cat_then_eval() {
    let t = std::env::temp_dir().join(format!("lora-cli-combine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let o = t.to_string_lossy().to_string();
    let r = lora(&[
        "combine",
        "--adapter",
        &fixture("llama_gqa/adapter"),
        "--weight",
        "0.7",
        "--adapter",
        &fixture("llama_gqa/adapter2"),
        "--weight",
        "-1.3",
        "--how",
        "cat",
        "--out",
        &o,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("rank 8"));
    let r = lora(&[
        "eval",
        "--model",
        &fixture("llama_gqa/model"),
        "--adapter",
        &o,
        "--data",
        &fixture("eval.jsonl"),
        "--seq-len",
        "16",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = lora(&[
        "combine",
        "--adapter",
        &fixture("llama_gqa/adapter"),
        "--how",
        "mean",
        "--out",
        &format!("{o}-2"),
    ]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("--how must be cat, linear or svd"));
}

#[test]
fn train_writes_an_adapter_that_eval_loads() {
    let t = std::env::temp_dir().join(format!("lora-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).unwrap();
    let data = t.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"the red cat sings one two three\"}\n{\"prompt\": \"count:\", \"completion\": \" one two three\"}\n{\"text\": \"blue dog runs\"}\n").unwrap();
    let out = t.join("out").to_string_lossy().to_string();
    let d = data.to_string_lossy().to_string();
    let r = lora(&[
        "train",
        "--model",
        &fixture("llama_gqa/model"),
        "--data",
        &d,
        "--out",
        &out,
        "--steps",
        "3",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--target",
        "q_proj,v_proj",
        "--eval-data",
        &d,
        "--json",
        "--threads",
        "1",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["steps"], 3);
    // `lora eval --eos` with the run's --seq-len reads the prompt/completion data as training
    // does and gives the held-out loss the run reported; without --eos the EOS targets are
    // not counted.
    let model = fixture("llama_gqa/model");
    let ev = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            &model,
            "--adapter",
            &out,
            "--data",
            &d,
            "--seq-len",
            "16",
            "--json",
        ];
        args.extend_from_slice(extra);
        let e = lora(&args);
        assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
        serde_json::from_slice::<serde_json::Value>(&e.stdout).unwrap()
    };
    let (with, without) = (ev(&["--eos"]), ev(&[]));
    let after = v["eval_loss_after"].as_f64().unwrap();
    assert!(
        (with["loss"].as_f64().unwrap() - after).abs() <= 1e-9 * after,
        "lora eval --eos {with} vs the run's {after}"
    );
    assert_eq!(
        with["tokens"].as_u64().unwrap(),
        without["tokens"].as_u64().unwrap() + 3,
        "one EOS target per example"
    );
    if lora_kernels::cuda::device_count() == 0 {
        assert_eq!(v["device"], "cpu", "--device auto without a GPU");
    }
    assert_eq!(
        v["trainable_params"],
        2 * 2 * (2 * (32 + 32) + 2 * (32 + 16)) / 2
    );
    let e = lora(&[
        "eval",
        "--model",
        &fixture("llama_gqa/model"),
        "--adapter",
        &out,
        "--data",
        &fixture("eval.jsonl"),
        "--json",
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let r = lora(&[
        "train",
        "--model",
        &fixture("llama_gqa/model"),
        "--data",
        &d,
        "--out",
        &out,
        "--steps",
        "3",
        "--schedule",
        "step",
    ]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("--schedule must be"));
}

/// Kills a real training run with SIGKILL while it checkpoints every step: the newest complete
/// checkpoint loads, `--resume` finishes the run, and the final adapter is byte-identical to an
/// uninterrupted run's. Also SIGINT: a clean exit with a checkpoint.
#[test]
#[cfg(unix)]
fn killed_runs_resume_to_the_same_adapter() {
    use std::process::{Command, Stdio};
    let t = std::env::temp_dir().join(format!("lora-cli-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).unwrap();
    let data = t.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"the red cat sings one two three\"}\n{\"text\": \"blue dog runs one two\"}\n{\"prompt\": \"count:\", \"completion\": \" one two three\"}\n").unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "train",
            "--model",
            &fixture("gpt2/model"),
            "--data",
            &data.to_string_lossy(),
            "--out",
            out,
            "--steps",
            "1500",
            "--save-every",
            "1",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--rank",
            "4",
            "--dropout",
            "0.1",
            "--threads",
            "1",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = t.join("full").to_string_lossy().to_string();
    let r = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args(&full))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let killed = t.join("killed").to_string_lossy().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a few checkpoints exist, then kill without warning.
    let start = std::time::Instant::now();
    loop {
        let n = std::fs::read_dir(&killed)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
                    .count()
            })
            .unwrap_or(0);
        if n >= 2 || start.elapsed().as_secs() > 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !std::path::Path::new(&killed)
            .join("adapter_model.safetensors")
            .exists(),
        "killed before the end"
    );
    // The newest checkpoint is complete: it loads as an adapter.
    let newest = std::fs::read_dir(&killed)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .max()
        .unwrap();
    let ev = lora(&[
        "eval",
        "--model",
        &fixture("gpt2/model"),
        "--adapter",
        &newest.to_string_lossy(),
        "--data",
        &fixture("eval.jsonl"),
        "--json",
    ]);
    assert!(
        ev.status.success(),
        "newest checkpoint {}: {}",
        newest.display(),
        String::from_utf8_lossy(&ev.stderr)
    );
    let mut resume = args(&killed);
    resume.push("--resume".into());
    let r = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(&resume)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read(format!("{full}/adapter_model.safetensors")).unwrap(),
        std::fs::read(format!("{killed}/adapter_model.safetensors")).unwrap(),
        "resumed after SIGKILL: same adapter bytes as the uninterrupted run"
    );

    // SIGINT or SIGTERM once the run is checkpointing: a checkpoint, `interrupted`, and the
    // exit status a shell gives a signal (130, 143), so `lora train ... && lora merge ...` stops.
    for (sig, status) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let int = t.join(format!("sig{sig}")).to_string_lossy().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_lora"))
            .args(args(&int))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !std::fs::read_dir(&int)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
            })
            .unwrap_or(false)
        {
            assert!(start.elapsed().as_secs() < 60, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(status),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["interrupted"], true, "a signal mid-run stops early: {v}");
        let step = v["steps"].as_u64().unwrap();
        assert!(
            step < 1500
                && std::path::Path::new(&int)
                    .join(format!("checkpoint-{step:06}/trainer_state.json"))
                    .exists()
        );
    }
}

#[test]
fn train_config_file_with_flag_overrides() {
    let t = std::env::temp_dir().join(format!("lora-cli-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).unwrap();
    let data = t.join("d.txt");
    std::fs::write(&data, "the red cat sings\n\nblue dog runs one two three\n").unwrap();
    let cfg = t.join("run.toml");
    std::fs::write(&cfg, "lr = 5e-3\nsteps = 7\nrank = 4\ntarget = \"c_attn\"\nseq_len = 16\nbatch_size = 2\nrslora = true\n").unwrap();
    let (d, c) = (
        data.to_string_lossy().to_string(),
        cfg.to_string_lossy().to_string(),
    );
    let out = t.join("a").to_string_lossy().to_string();
    let r = lora(&[
        "train",
        "--model",
        &fixture("gpt2/model"),
        "--data",
        &d,
        "--out",
        &out,
        "--config",
        &c,
        "--steps",
        "3",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["steps"], 3, "the flag overrides the file");
    assert_eq!(
        v["trainable_params"],
        2 * 4 * (32 + 96),
        "rank and target from the file"
    );
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{out}/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["use_rslora"], true);
    assert_eq!(v["precision"], "f32");
    // `precision` from the file reaches the run (and its JSON summary).
    let with_file = |file: &str, out: &str| {
        std::fs::write(&cfg, file).unwrap();
        let out = t.join(out).to_string_lossy().to_string();
        let (model, cfg) = (fixture("gpt2/model"), cfg.to_string_lossy().to_string());
        lora(&[
            "train", "--model", &model, "--data", &d, "--out", &out, "--config", &cfg, "--json",
        ])
    };
    let r = with_file(
        "steps = 2\nrank = 4\ntarget = \"c_attn\"\nseq_len = 16\nbatch_size = 2\nprecision = \"bf16\"\n",
        "p",
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["precision"], "bf16");
    let r = with_file("lr = 5e-3\nlearning_rate = 1\n", "b");
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown key `learning_rate`"));
}

/// The README's first command, shortened to 600 steps: the adapter must learn the task the base
/// model cannot do (measured on the dev machine: 0% -> 76% exact, eval loss 3.13 -> 0.087).
#[test]
fn demo_adapter_learns_translation_and_refuses_foreign_output() {
    let out = std::env::temp_dir().join(format!("lora-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = out.to_str().unwrap();
    let refused = lora(&["demo", "--out", o, "--steps", "2"]);
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        e.contains("not written by lora-rs") && e.contains("notes.txt"),
        "{e}"
    );
    assert!(out.join("notes.txt").exists());
    std::fs::remove_dir_all(&out).unwrap();

    let run = lora(&[
        "demo",
        "--out",
        o,
        "--steps",
        "600",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(f("exact_match_before") <= 0.05, "{v}");
    assert!(f("exact_match_after") >= 0.6, "{v}");
    assert!(
        f("eval_loss_before") > 2.0 && f("eval_loss_after") < 0.2,
        "{v}"
    );
    assert!(out.join("adapter_model.safetensors").exists() && out.join("loss.svg").exists());
    // Training ends each completion with EOS, so generation stops after one translation
    // instead of running to --max-new-tokens (it wrote on before).
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/base");
    let prompt = "english : a mouse eats a lazy dog . french :";
    let g = lora(&[
        "generate",
        "--model",
        base,
        "--adapter",
        o,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "30",
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let text = String::from_utf8(g.stdout).unwrap();
    let french = text
        .trim()
        .strip_prefix(prompt)
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        french.ends_with(" .") && french.matches('.').count() == 1,
        "one sentence, then EOS: {french}"
    );
    // A second run replaces the first one's output.
    let again = lora(&["demo", "--out", o, "--steps", "2", "--json"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn device_flag_refuses_cuda_clearly_and_rejects_unknown_names() {
    let base = |dev: &str| {
        lora(&[
            "train",
            "--model",
            "../demo/base",
            "--data",
            "../demo/data/eval.jsonl",
            "--out",
            "/nonexistent/never-written",
            "--device",
            dev,
        ])
    };
    if lora_kernels::cuda::device_count() == 0 {
        let out = base("cuda");
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("--device cuda: device cuda:0: "), "{e}");
        assert!(e.contains("use --device cpu"), "{e}");
        assert!(!e.contains("panicked"), "{e}");
    }
    // No machine has this one, GPU or not.
    let out = base("cuda:97");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("cuda:97"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let out = base("tpu");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--device must be auto, cpu, cuda or cuda:N"),
        "{e}"
    );
}

#[test]
fn cuda_linear_bench_says_why_it_cannot_run_here() {
    // On a machine where a GPU answers, `scripts/gpu-check.sh` runs this benchmark for real.
    if lora_kernels::cuda::device_count() > 0 {
        println!("SKIPPED: a CUDA device answers; the benchmark would run");
        return;
    }
    let out = lora(&["bench", "linear", "--device", "cuda:0", "--iters", "1"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("--device cuda:0: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let out = lora(&["bench", "linear", "--device", "cuda", "--rank", "65"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !e.contains("panicked"), "{e}");
}

#[test]
fn train_bench_runs_both_architectures_and_names_a_bad_one() {
    for arch in ["gpt2", "llama"] {
        let out = lora(&[
            "bench",
            "train",
            "--arch",
            arch,
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "50",
            "--batch",
            "2",
            "--seq",
            "8",
            "--rank",
            "2",
            "--steps",
            "2",
            "--gradient-checkpointing",
            "--bf16",
            "--precision",
            "bf16",
            "--all-linear",
            "--losses",
            "--lr",
            "1e-2",
            "--json",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["arch"], arch);
        assert!(v["median_step_s"].as_f64().unwrap() > 0.0);
        assert_eq!(v["weights"], "bf16");
        assert_eq!(
            (v["precision"].as_str(), v["all_linear"].as_bool()),
            (Some("bf16"), Some(true))
        );
        // The warm-up step's loss and the two timed ones; the adapters learn the fixed batch.
        let l: Vec<f64> = v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(l.len() == 3 && l[2] < l[0], "{l:?}");
    }
    let out = lora(&["bench", "train", "--arch", "t5", "--steps", "1"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--arch must be gpt2 or llama"),
        "{e}"
    );
}

/// `lora train ... | head -1`: the reader goes away after the first line; the run must neither
/// panic on the closed pipe nor stop, and must still write its adapter.
#[test]
#[cfg(unix)]
fn a_closed_stdout_does_not_stop_a_run() {
    use std::io::Read;
    use std::process::Stdio;
    let t = std::env::temp_dir().join(format!("lora-cli-pipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args([
            "train",
            "--model",
            &fixture("gpt2/model"),
            "--data",
            &fixture("eval.txt"),
            "--out",
            &t.to_string_lossy(),
            "--steps",
            "40",
            "--seq-len",
            "16",
            "--threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first byte, then close our end of the pipe, as `head -c 1` would.
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(t.join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn tf32_is_refused_on_an_explicit_cpu_and_noted_under_auto() {
    let run = |dev: &str, out: &str| {
        lora(&[
            "train",
            "--model",
            &fixture("gpt2/model"),
            "--data",
            &fixture("eval.txt"),
            "--out",
            out,
            "--steps",
            "1",
            "--seq-len",
            "16",
            "--device",
            dev,
            "--tf32",
        ])
    };
    let r = run("cpu", "/nonexistent/never-written");
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && e.contains("--tf32") && e.contains("GPU"),
        "{e}"
    );
    if lora_kernels::cuda::device_count() == 0 {
        let t = std::env::temp_dir().join(format!("lora-cli-tf32-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let r = run("auto", &t.to_string_lossy());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let o = String::from_utf8_lossy(&r.stdout);
        assert!(o.contains("--tf32 has no effect on the CPU"), "{o}");
        let _ = std::fs::remove_dir_all(&t);
    }
}

/// Conversations train and evaluate through the model's chat template (`chat_template.jinja`
/// in the model directory); without a template they are refused with the reason.
#[test]
fn conversations_train_through_the_chat_template() {
    let t = std::env::temp_dir().join(format!("lora-cli-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let model = t.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture("llama_gqa/model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let data = t.join("chat.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "red?"}, {"role": "assistant", "content": "cat"}]}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "blue?"}], "completion": [{"role": "assistant", "content": "dog"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let (m, d) = (
        model.to_string_lossy().to_string(),
        data.to_string_lossy().to_string(),
    );
    let out = t.join("out").to_string_lossy().to_string();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            &m,
            "--data",
            &d,
            "--out",
            &out,
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--rank",
            "2",
            "--batch-size",
            "2",
            "--json",
            "--threads",
            "1",
            "--force",
        ];
        args.extend_from_slice(extra);
        lora(&args)
    };
    let r = train(&[]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        e.contains("conversations") && e.contains("no chat template"),
        "{e}"
    );
    let chat = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "red?",
            "--chat",
            "--max-new-tokens",
            "3",
        ];
        args.extend_from_slice(extra);
        lora(&args)
    };
    let g = chat(&[]);
    assert!(!g.status.success());
    let e = String::from_utf8_lossy(&g.stderr);
    assert!(
        e.contains("--chat") && e.contains("no chat template"),
        "{e}"
    );
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            &m,
            "--adapter",
            &out,
            "--data",
            &d,
            "--seq-len",
            "32",
            "--json",
        ];
        args.extend_from_slice(extra);
        let e = lora(&args);
        assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
        serde_json::from_slice::<serde_json::Value>(&e.stdout).unwrap()
    };
    // Without and with --assistant-only-loss: `lora eval` with the same flag reproduces the
    // run's held-out loss, and scores fewer tokens with it (no user turns, no role headers).
    let mut counted = Vec::new();
    for flag in [&[][..], &["--assistant-only-loss"][..]] {
        let r = train(&[&["--eval-data", &d][..], flag].concat());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["steps"], 2);
        let ev = eval(flag);
        let after = v["eval_loss_after"].as_f64().unwrap();
        assert!(
            (ev["loss"].as_f64().unwrap() - after).abs() <= 1e-9 * after,
            "lora eval {ev} vs the run's {after} ({flag:?})"
        );
        counted.push(ev["tokens"].as_u64().unwrap());
    }
    assert!(counted[1] < counted[0], "{counted:?}");
    // --chat renders the message with the generation prompt and prints only the reply (the
    // tiny random model's reply is noise, but not the prompt echoed).
    let g = chat(&["--adapter", &out]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let reply = String::from_utf8_lossy(&g.stdout);
    assert!(
        !reply.contains("<user>") && !reply.contains("red?"),
        "{reply}"
    );
    let _ = std::fs::remove_dir_all(&t);
}

/// `lora sd generate` on the committed tiny pipeline (fixtures/parity/make_sd_pipeline.py) from
/// diffusers' initial latents: the first image of the grid equals diffusers' within 2/255 per
/// pixel (Euler, guidance 7.5, the fixture's negative prompt); the output is never written over
/// a file lora-rs did not write, and bad flags are named.
#[test]
fn sd_generate_matches_diffusers_and_guards_its_output() {
    use lora_io::images::Rgb8;
    use lora_io::safetensors::SafetensorsFile;
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    let fx =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/sd_pipeline");
    let r = SafetensorsFile::open(fx.join("reference.safetensors")).unwrap();
    let (latents, shape) = r.read_f32("latents").unwrap();
    let tmp = std::env::temp_dir().join(format!("lora-sd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let noise = tmp.join("noise.safetensors");
    let t = OutTensor {
        name: "latents".into(),
        shape: shape.clone(),
        values: &latents,
        dtype: OutDtype::F32,
    };
    write_safetensors(&noise, &[t], Default::default()).unwrap();
    let out = tmp.join("grid.png");
    let model = fx.join("model");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "sd",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red fox in the snow",
            "--negative-prompt",
            "blurry",
            "--steps",
            "5",
            "--scheduler",
            "euler",
            "--size",
            "16x24",
            "--batch",
            "2",
            "--init-noise",
            noise.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--threads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        lora(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = Rgb8::open(&out).unwrap();
    assert_eq!(
        (img.height, img.width),
        (24, 32),
        "two 16x24 images side by side"
    );
    let (want, _) = r.read_f32("euler.images").unwrap(); // (2, 24, 16, 3) in [0, 1]
    let mut worst = 0u8;
    for y in 0..24 {
        for x in 0..16 {
            for c in 0..3 {
                let got = img.data[(y * 32 + x) * 3 + c];
                let w = (want[(y * 16 + x) * 3 + c] * 255.0).round_ties_even() as u8;
                worst = worst.max(got.abs_diff(w));
            }
        }
    }
    assert!(
        worst <= 2,
        "first image differs from diffusers' by {worst}/255"
    );
    // With two LoRA files (kohya LoCon at 0.8, diffusers/PEFT at 1.0) the first image is
    // diffusers' after load_lora_weights + set_adapters (fixtures/parity/make_sd_lora.py).
    let lora_out = tmp.join("lora.png");
    let sdl = fx.join("../sd_lora");
    let kohya = format!("{}:0.8", sdl.join("kohya.safetensors").display());
    let peft = sdl.join("peft.safetensors").display().to_string();
    let mut a = args(&["--lora", &kohya, "--lora", &peft]);
    let i = a.iter().position(|s| s == "--steps").unwrap();
    a[i + 1] = "4".into();
    let i = a.iter().position(|s| s == "--out").unwrap();
    a[i + 1] = lora_out.display().to_string();
    let o = lora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("45 unet modules"));
    let img = Rgb8::open(&lora_out).unwrap();
    let rl = SafetensorsFile::open(sdl.join("reference.safetensors")).unwrap();
    let (want, _) = rl.read_f32("both.images").unwrap();
    let mut worst = 0u8;
    for y in 0..24 {
        for x in 0..16 {
            for c in 0..3 {
                let got = img.data[(y * 32 + x) * 3 + c];
                let w = (want[(y * 16 + x) * 3 + c] * 255.0).round_ties_even() as u8;
                worst = worst.max(got.abs_diff(w));
            }
        }
    }
    assert!(worst <= 2, "with LoRAs: {worst}/255 from diffusers");
    // The same pipeline as a single-file checkpoint (original keys; fixtures/parity/
    // make_sd_single_file.py) with its configurations from the directory: the same image.
    let single = fx.join("../sd_single/sd1.safetensors");
    let single_out = tmp.join("single.png");
    let mut b = a.clone();
    let i = b.iter().position(|s| s == "--model").unwrap();
    b[i + 1] = single.display().to_string();
    let i = b.iter().position(|s| s == "--out").unwrap();
    b[i + 1] = single_out.display().to_string();
    b.extend(["--sd-config".to_string(), model.display().to_string()]);
    let o = lora(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(Rgb8::open(&single_out).unwrap().data, img.data);
    // --sd-config is for single files only.
    let mut c = a.clone();
    let never = tmp.join("never.png");
    let i = c.iter().position(|s| s == "--out").unwrap();
    c[i + 1] = never.display().to_string();
    c.extend(["--sd-config".to_string(), model.display().to_string()]);
    let o = lora(&c.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("applies to a single-file"));
    assert!(!never.exists());
    // Again: refused without --force, replaced with it (the file is ours).
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    let o = run(&["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A PNG lora-rs did not write is never replaced.
    Rgb8::new(2, 2, vec![7; 12])
        .unwrap()
        .save_png(&out)
        .unwrap();
    let o = run(&["--force"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a PNG lora-rs wrote"));
    assert_eq!(Rgb8::open(&out).unwrap().data, vec![7; 12]);
    // Bad flags are named.
    std::fs::remove_file(&out).unwrap();
    for (extra, what) in [
        (&["--size", "15x24"][..], "multiples of"),
        (&["--scheduler", "pndm"][..], "unknown scheduler"),
        (&["--batch", "3"][..], "--init-noise"),
    ] {
        let mut a = args(&[]);
        // Later flags override earlier ones in clap only for repeated single-value options:
        // replace the value instead.
        let i = a.iter().position(|s| s == extra[0]).unwrap();
        a[i + 1] = extra[1].to_string();
        let o = lora(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success() && err.contains(what),
            "{extra:?}: {err}"
        );
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// Two captioned images (a red and a blue square on grey, 20 x `width` pixels) in `dir`.
fn squares_folder(dir: &std::path::Path, width: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, (rgb, cap)) in [
        ([220u8, 40, 40], "a red square"),
        ([40, 60, 220], "a blue square"),
    ]
    .iter()
    .enumerate()
    {
        let mut px = vec![240u8; 20 * width * 3];
        for y in 5..15 {
            for x in 5..15 {
                px[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(rgb);
            }
        }
        lora_io::images::Rgb8::new(20, width, px)
            .unwrap()
            .save_png(&dir.join(format!("{i}.png")))
            .unwrap();
        std::fs::write(dir.join(format!("{i}.txt")), cap).unwrap();
    }
}

/// `lora train` on a Stable Diffusion single file (its configs from --sd-config) with the text
/// encoder trained and --epochs: the steps a pass takes, a file with both models' modules; LM-only
/// and contradictory flags are named.
#[test]
fn sd_train_runs_on_a_single_file_with_the_text_encoder() {
    let fx = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity");
    let tmp = std::env::temp_dir().join(format!("lora-sd-train-cli-{}", std::process::id()));
    let data = tmp.join("data");
    squares_folder(&data, 20);
    let out = tmp.join("run");
    let (m, c, d, o) = (
        fx.join("sd_single/sd1.safetensors"),
        fx.join("sd_pipeline/model"),
        data.clone(),
        out.clone(),
    );
    let base: Vec<String> = [
        "train",
        "--model",
        m.to_str().unwrap(),
        "--sd-config",
        c.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
        "--resolution",
        "16",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        lora(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for (extra, what) in [
        (&["--epochs", "0"][..], "--epochs must be"),
        (
            &["--text-encoder-lr", "1e-4"][..],
            "with --train-text-encoder",
        ),
        (&["--pack"][..], "--pack"),
        // Flags an SD run would otherwise ignore in silence.
        (&["--save-minutes", "1"][..], "--save-minutes"),
        (&["--eval-every", "5"][..], "--eval-every"),
        (&["--no-flip"][..], "--no-flip"),
        (&["--modules-to-save", "conv_out"][..], "--modules-to-save"),
    ] {
        let r = run(extra);
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && e.contains(what), "{extra:?}: {e}");
    }
    let r = run(&[
        "--epochs",
        "2",
        "--batch-size",
        "1",
        "--train-text-encoder",
        "--lr",
        "1e-3",
    ]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{e}");
    assert!(e.contains("the text encoder's q/k/v/out_proj"), "{e}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "2 epochs of 2 images, batch 1");
    let f =
        lora_io::safetensors::SafetensorsFile::open(out.join("pytorch_lora_weights.safetensors"))
            .unwrap();
    let te = f
        .names()
        .iter()
        .filter(|k| k.starts_with("text_encoder.text_model."))
        .count();
    assert_eq!(te, 2 * 4 * 2, "q/k/v/out of two layers, A and B");
    std::fs::remove_dir_all(&tmp).ok();
}

/// `lora merge` on a Stable Diffusion single file writes a single file that `lora sd generate`
/// reads; language-model flags are named, not ignored.
#[test]
fn sd_merge_writes_the_layout_it_read() {
    let fx = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity");
    let model = fx.join("sd_single/sd1.safetensors");
    let cfg = fx.join("sd_pipeline/model");
    let kohya = format!("{}:0.8", fx.join("sd_lora/kohya.safetensors").display());
    let tmp = std::env::temp_dir().join(format!("lora-sd-merge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("merged.safetensors");
    let (m, c, o) = (
        model.to_str().unwrap(),
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let base = ["merge", "--model", m, "--sd-config", c, "--out", o];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(extra);
        lora(&a)
    };
    for (extra, what) in [
        (&["--adapter", c][..], "--lora FILE"),
        (&[][..], "at least one LoRA"),
        (&["--lora", &kohya, "--dtype", "f32"][..], "stored dtype"),
    ] {
        let r = run(extra);
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && e.contains(what), "{extra:?}: {e}");
        assert!(!out.exists());
    }
    let r = run(&["--lora", &kohya]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("replaced 45 of"));
    let png = tmp.join("x.png");
    let r = lora(&[
        "sd",
        "generate",
        "--model",
        o,
        "--sd-config",
        c,
        "--prompt",
        "a fox",
        "--steps",
        "2",
        "--size",
        "16x24",
        "--out",
        png.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(png.exists());
    std::fs::remove_dir_all(&tmp).ok();
}

/// `lora extract`: identical pipelines have nothing to extract (an error, nothing written);
/// a language-model directory is named as unsupported.
#[test]
fn extract_names_what_it_cannot_do() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let sd = root.join("fixtures/parity/sd_pipeline/model");
    let out = std::env::temp_dir().join(format!(
        "lora-extract-cli-{}.safetensors",
        std::process::id()
    ));
    let run = |base: &std::path::Path| {
        lora(&[
            "extract",
            "--base",
            base.to_str().unwrap(),
            "--tuned",
            sd.to_str().unwrap(),
            "--rank",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--threads",
            "1",
        ])
    };
    let o = run(&sd);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no layer differs"));
    assert!(!out.exists());
    // A directory against the same pipeline as a single file (--sd-config configures the file
    // side only): the same weights.
    let single = root.join("fixtures/parity/sd_single/sd1.safetensors");
    let o = lora(&[
        "extract",
        "--base",
        single.to_str().unwrap(),
        "--tuned",
        sd.to_str().unwrap(),
        "--sd-config",
        sd.to_str().unwrap(),
        "--rank",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no layer differs"), "{e}");
    assert!(!out.exists());
    let o = run(&root.join("demo/base"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a Stable Diffusion pipeline"));
    // Two language models: a PEFT adapter directory, which `lora eval`-style loading reads.
    let tuned = std::env::temp_dir().join(format!("lora-extract-llm-{}", std::process::id()));
    let adapter = tuned.with_extension("adapter");
    let (b, t, ad) = (
        root.join("demo/base"),
        tuned.clone(),
        root.join("demo/adapter"),
    );
    let o = lora(&[
        "merge",
        "--model",
        b.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--out",
        t.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ex = |extra: &[&str]| {
        let mut v = vec![
            "extract",
            "--base",
            b.to_str().unwrap(),
            "--tuned",
            t.to_str().unwrap(),
            "--rank",
            "8",
            "--out",
            adapter.to_str().unwrap(),
            "--threads",
            "1",
        ];
        v.extend(extra);
        lora(&v)
    };
    let o = ex(&["--conv-rank", "2"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--conv-rank"));
    let o = ex(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("PEFT, r=8") && !err.contains("warning"),
        "{err}"
    );
    assert!(adapter.join("adapter_model.safetensors").exists());
    let o = ex(&[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(ex(&["--force"]).status.success());
    std::fs::remove_dir_all(&tuned).ok();
    std::fs::remove_dir_all(&adapter).ok();
}

/// An SD run's checkpoints: `--save-every` writes them (rotated by `--keep-checkpoints`),
/// `--resume` continues from the newest and ends with the LoRA file of the uninterrupted run,
/// byte for byte; other settings are refused by name.
#[test]
fn sd_train_resumes_from_its_checkpoint_exactly() {
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity/sd_pipeline/model");
    let tmp = std::env::temp_dir().join(format!("lora-sd-resume-cli-{}", std::process::id()));
    let data = tmp.join("data");
    squares_folder(&data, 24);
    let args = |out: &std::path::Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--resolution",
            "16",
            "--threads",
            "1",
            "--steps",
            "5",
            "--batch-size",
            "1",
            "--lr",
            "1e-3",
            // Values whose doubles a JSON reader may not read back bit for bit.
            "--noise-offset",
            "0.03",
            "--weight-decay",
            "0.12",
            "--random-crop",
            "--random-flip",
            "--target",
            "to_q,to_v,conv1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |out: &std::path::Path, extra: &[&str]| {
        let a = args(out, extra);
        lora(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let ok = |r: std::process::Output| {
        let e = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(r.status.success(), "{e}");
        e
    };
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    ok(run(&a, &[]));
    ok(run(&b, &["--save-every", "2"]));
    let lora_file = "pytorch_lora_weights.safetensors";
    for c in ["checkpoint-000002", "checkpoint-000004"] {
        for f in [lora_file, "trainer_state.json", "trainer_state.safetensors"] {
            assert!(b.join(c).join(f).is_file(), "{c}/{f}");
        }
    }
    // Checkpoints do not change the run.
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert_eq!(read(a.join(lora_file)), read(b.join(lora_file)));
    // As if killed after step 4: the final file and the newest checkpoint's successors gone.
    std::fs::remove_file(b.join(lora_file)).unwrap();
    let e = ok(run(&b, &["--save-every", "2", "--resume"]));
    assert!(
        e.contains("resuming from") && e.contains("step 4 of 5"),
        "{e}"
    );
    assert_eq!(read(a.join(lora_file)), read(b.join(lora_file)));
    let metrics = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    // From the older checkpoint (the newer one damaged): the same end, and said why.
    std::fs::write(b.join("checkpoint-000004/trainer_state.json"), "{").unwrap();
    let e = ok(run(&b, &["--save-every", "2", "--resume"]));
    assert!(e.contains("damaged") && e.contains("step 2 of 5"), "{e}");
    assert_eq!(read(a.join(lora_file)), read(b.join(lora_file)));
    // Other settings or no earlier run: refused, named.
    let r = run(&b, &["--resume", "--lr", "2e-3"]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("`lr`"), "{e}");
    let r = run(&tmp.join("none"), &["--resume"]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && e.contains("holds no earlier run"),
        "{e}"
    );
    // --force replaces the run, but not a checkpoint holding someone else's file.
    let mine = b.join("checkpoint-000002/notes.txt");
    std::fs::write(&mine, "mine").unwrap();
    let r = run(&b, &["--force"]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("notes.txt"), "{e}");
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "mine");
    std::fs::remove_file(&mine).unwrap();
    ok(run(&b, &["--force"]));
    assert!(!b.join("checkpoint-000002").exists());
    // SIGINT mid-run: a checkpoint at the step it was in, exit status 130, and --resume ends
    // where the uninterrupted run does.
    // (Long enough that the signal lands mid-run: a step here takes milliseconds, the signal
    // follows the first step's metrics line within a few.)
    let long = ["--steps", "800"];
    let (full, int) = (tmp.join("full"), tmp.join("int"));
    ok(run(&full, &long));

    let child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args(&int, &long))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::metadata(int.join("metrics.jsonl")).map_or(true, |m| m.len() == 0) {
        assert!(start.elapsed().as_secs() < 60, "no step finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{e}");
    assert!(e.contains("interrupted: checkpoint written at step"), "{e}");
    assert!(!int.join(lora_file).exists());
    let e = ok(run(&int, &["--steps", "800", "--resume"]));
    assert!(e.contains("resuming from"), "{e}");
    assert_eq!(read(full.join(lora_file)), read(int.join(lora_file)));
    // Rotation keeps the newest --keep-checkpoints.
    let c = tmp.join("c");
    ok(run(&c, &["--save-every", "1", "--keep-checkpoints", "2"]));
    let mut left: Vec<String> = std::fs::read_dir(&c)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-000003", "checkpoint-000004"]);
    std::fs::remove_dir_all(&tmp).ok();
}
