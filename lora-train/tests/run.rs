//! Whole runs on the committed tiny GPT-2: a run resumed from a checkpoint ends with a
//! bit-identical adapter to an uninterrupted one; metrics are written per step; a non-empty
//! output directory is refused; a NaN loss stops the run and keeps the last checkpoint.

use lora_core::models::Precision;
use lora_train::optim::Schedule;
use lora_train::run::{train, TrainConfig};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-train-run-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn config(out: PathBuf, data: PathBuf) -> TrainConfig {
    TrainConfig {
        model: root().join("gpt2/model"),
        data,
        out,
        rank: 4,
        alpha: 8.0,
        target: "c_attn,c_fc".into(),
        dropout: 0.1,
        rslora: false,
        lr: 5e-3,
        loraplus_ratio: 4.0,
        batch_size: 2,
        grad_accum: 2,
        seq_len: 16,
        steps: 6,
        epochs: None,
        warmup: 2,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        optimizer: lora_train::optim::OptimizerKind::AdamW,
        max_grad_norm: Some(1.0),
        pack: false,
        eos: true,
        assistant_only_loss: false,
        seed: 11,
        eval_data: None,
        eval_split: 0.25,
        eval_every: 3,
        save_every: 2,
        save_minutes: 0.0,
        keep_checkpoints: 0,
        gradient_checkpointing: false,
        device: lora_core::Device::Cpu,
        stop_after: None,
        precision: lora_core::models::Precision::F32,
    }
}

/// The shared training file, written once per test process: the tests run in parallel, and
/// rewriting it per test let one test read it while another had just truncated it ("no
/// examples", seen once in 9 runs).
fn data_file() -> PathBuf {
    static DATA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DATA.get_or_init(|| {
        let p = tmp("data.jsonl");
        let lines: Vec<String> = (0..12)
            .map(|i| {
                if i % 3 == 0 {
                    format!("{{\"prompt\": \"count {i}:\", \"completion\": \" one two three\"}}")
                } else {
                    format!("{{\"text\": \"the red cat number {i} sings\"}}")
                }
            })
            .collect();
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    })
    .clone()
}

#[test]
fn resumed_run_is_bit_identical_and_outputs_are_complete() {
    let data = data_file();
    let a = tmp("a");
    let sa = train(&config(a.clone(), data.clone()), false, false, &mut |_| {}).unwrap();
    assert_eq!(sa.steps, 6);
    assert!(sa.eval_before.is_some() && sa.eval_after.is_some());
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.iter().filter(|v| v["loss"].is_number()).count(), 6);
    // Every line has the same keys; the first holds the eval before training (step 0), the
    // last the final eval beside the last step's loss.
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert!(
        steps.iter().all(|v| keys(v) == keys(&steps[0])),
        "{metrics}"
    );
    assert_eq!(steps.len(), 7, "{metrics}");
    assert!(steps[0]["step"] == 0 && steps[0]["loss"].is_null());
    assert_eq!(steps[0]["eval_loss"].as_f64(), sa.eval_before);
    assert!(steps[6]["step"] == 6 && steps[6]["loss"].is_number());
    assert_eq!(steps[6]["eval_loss"].as_f64(), sa.eval_after);
    assert!(
        steps
            .iter()
            .any(|v| v["step"] == 3 && v["eval_loss"].is_number()),
        "eval every 3 steps"
    );
    let svg = std::fs::read_to_string(a.join("loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline") && svg.matches("<circle").count() >= 3,
        "train line and eval points"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-000002/trainer_state.json",
        "checkpoint-000006/optimizer.safetensors",
    ] {
        assert!(a.join(f).exists(), "{f}");
    }

    let b = tmp("b");
    let mut cfg = config(b.clone(), data.clone());
    cfg.stop_after = Some(3);
    train(&cfg, false, false, &mut |_| {}).unwrap();
    assert!(b.join("checkpoint-000003").exists() && !b.join("adapter_model.safetensors").exists());
    let e = train(&config(b.clone(), data.clone()), false, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--resume"), "{e}");
    let sb = train(&config(b.clone(), data.clone()), true, false, &mut |_| {}).unwrap();
    assert_eq!(sb.steps, 6);
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
        "resumed run must end with the same adapter bytes"
    );
    // --epochs sets the step count from the data: 9 training sequences, 2 x 2 per step.
    let c = tmp("epochs");
    let mut ecfg = config(c.clone(), data.clone());
    ecfg.epochs = Some(2.0);
    assert_eq!(train(&ecfg, false, false, &mut |_| {}).unwrap().steps, 5);
    // Keeping only the newest checkpoints.
    let k = tmp("keep");
    let mut kcfg = config(k.clone(), data.clone());
    kcfg.save_every = 1;
    kcfg.keep_checkpoints = 2;
    train(&kcfg, false, false, &mut |_| {}).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&k)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-000005", "checkpoint-000006"]);
    // A stop request checkpoints after the current step; resuming finishes the same run.
    let s = tmp("stop");
    let flag = std::sync::atomic::AtomicBool::new(false);
    let mut n = 0;
    let sum = lora_train::run::train_until(
        &config(s.clone(), data.clone()),
        false,
        false,
        &mut |_| {
            n += 1;
            if n == 4 {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
        &flag,
    )
    .unwrap();
    assert!(sum.interrupted && sum.steps == 4 && s.join("checkpoint-000004").exists());
    let resumed = train(&config(s.clone(), data.clone()), true, false, &mut |_| {}).unwrap();
    // The resumed run reports the original run's eval before training, and its loss curve
    // keeps that point (the step-0 line of metrics.jsonl).
    assert_eq!(resumed.eval_before, sa.eval_before);
    let (_, eval_pts) = lora_train::plot::read_metrics(&s.join("metrics.jsonl")).unwrap();
    assert_eq!(eval_pts.first().map(|p| p.0), Some(0.0));
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(s.join("adapter_model.safetensors")).unwrap()
    );
    // A different setting cannot resume this run.
    let mut other = config(b.clone(), data.clone());
    other.lr = 1e-3;
    let e = train(&other, true, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("settings differ") && e.contains("lr: checkpoint ") && !e.contains("seed"),
        "the message names what differs, and only that: {e}"
    );
    // A checkpoint from before `eos` existed (no such key) trained without EOS: it resumes
    // with --no-eos, and says so otherwise.
    let newest = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("trainer_state.json").exists())
        .max()
        .unwrap();
    let f = newest.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    st["config"].as_object_mut().unwrap().remove("eos");
    std::fs::write(&f, st.to_string()).unwrap();
    let e = train(&config(b.clone(), data.clone()), true, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos: checkpoint false, now true"), "{e}");
    let mut old = config(b.clone(), data.clone());
    old.eos = false;
    train(&old, true, false, &mut |_| {}).unwrap();
}

/// `--precision bf16`: the frozen layers' products in bf16. The run follows the f32 run
/// closely but not bit for bit (so the setting took effect), is bit-identical to itself when
/// stopped and resumed (the weights are packed again on resume, deterministically), and a
/// resume in another precision is refused, naming the setting; a checkpoint written before the
/// setting existed resumes as f32.
#[test]
fn bf16_precision_trains_close_to_f32_and_resumes_exactly() {
    let data = data_file();
    let (f, a, b) = (tmp("prec-f32"), tmp("prec-bf16"), tmp("prec-bf16-split"));
    let sf = train(&config(f.clone(), data.clone()), false, false, &mut |_| {}).unwrap();
    let bf16 = |out: &PathBuf| {
        let mut c = config(out.clone(), data.clone());
        c.precision = Precision::Bf16;
        c
    };
    let sa = train(&bf16(&a), false, false, &mut |_| {}).unwrap();
    let read = |d: &PathBuf| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_ne!(read(&f), read(&a), "bf16 products changed nothing");
    // bf16 operands carry 8 significant bits (relative rounding 2^-9 per operand): after six
    // steps the losses agree within 1e-3, the eval-loss bound of the parity tests (measured
    // 3.3e-6 to 1.8e-5 on Zen 5, 2026-12-02; printed below).
    for (x, y, what) in [
        (
            sf.final_loss as f64,
            sa.final_loss as f64,
            "final train loss",
        ),
        (
            sf.eval_after.unwrap(),
            sa.eval_after.unwrap(),
            "eval loss after",
        ),
        (
            sf.eval_before.unwrap(),
            sa.eval_before.unwrap(),
            "eval loss before",
        ),
    ] {
        let rel = (x - y).abs() / x.abs();
        println!("{what}: f32 {x}, bf16 {y} ({rel:.2e} relative)");
        assert!(rel < 1e-3, "{what}: f32 {x}, bf16 {y} ({rel:.2e} relative)");
    }
    let mut cfg = bf16(&b);
    cfg.stop_after = Some(3);
    train(&cfg, false, false, &mut |_| {}).unwrap();
    let e = train(&config(b.clone(), data.clone()), true, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("settings differ") && e.contains("precision: checkpoint \"bf16\", now \"f32\""),
        "{e}"
    );
    let sb = train(&bf16(&b), true, false, &mut |_| {}).unwrap();
    assert_eq!(sb.final_loss.to_bits(), sa.final_loss.to_bits());
    assert_eq!(
        read(&a),
        read(&b),
        "a resumed bf16 run ends where an uninterrupted one does"
    );
    // A checkpoint without the key (written before --precision existed) trained in f32.
    let ck = f.join("checkpoint-000006/trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ck).unwrap()).unwrap();
    assert_eq!(st["config"]["precision"], "f32");
    st["config"].as_object_mut().unwrap().remove("precision");
    std::fs::write(&ck, st.to_string()).unwrap();
    let e = train(&bf16(&f), true, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("precision: checkpoint \"f32\", now \"bf16\""),
        "{e}"
    );
    let done = train(&config(f.clone(), data.clone()), true, false, &mut |_| {}).unwrap();
    assert!(done.already_complete);
    for d in [&f, &a, &b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let data = data_file();
    let out = tmp("nan");
    let mut cfg = config(out.clone(), data);
    cfg.lr = 1e30;
    cfg.max_grad_norm = None;
    cfg.warmup = 0;
    cfg.save_every = 1;
    cfg.optimizer = lora_train::optim::OptimizerKind::Sgd;
    let e = train(&cfg, false, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("loss is") || e.contains("gradient norm is"),
        "{e}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert!(
        !ckpts.is_empty(),
        "a checkpoint from before the failure is kept"
    );
    // The message counts steps from 1, as the progress lines and checkpoint names do: the step
    // that failed is the one after the newest checkpoint.
    let failed: usize = e
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let newest = ckpts
        .iter()
        .filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<usize>().ok())
        .max()
        .unwrap();
    assert_eq!(newest + 1, failed, "{e} / {ckpts:?}");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter from a failed run"
    );
}

#[test]
fn bad_settings_are_refused_before_the_output_directory_is_touched() {
    let data = data_file();
    let out = tmp("never-created");
    let _ = std::fs::remove_dir_all(&out);
    let mut cfg = config(out.clone(), data);
    cfg.seq_len = 5000;
    let e = lora_train::run::train(&cfg, false, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--seq-len") && e.contains("5000"), "{e}");
    assert!(!out.exists(), "a refused run left {}", out.display());
    // Optimizer settings that would turn the adapter into NaN (or freeze B) after a step.
    type Set = fn(&mut TrainConfig);
    let cases: [(&str, Set); 8] = [
        ("--precision", |c| {
            c.precision = Precision::Bf16;
            c.device = lora_core::Device::Cuda(0);
        }),
        ("--weight-decay", |c| c.weight_decay = f32::NAN),
        ("--weight-decay", |c| c.weight_decay = -0.1),
        ("--loraplus-ratio", |c| c.loraplus_ratio = 0.0),
        ("--loraplus-ratio", |c| c.loraplus_ratio = f32::INFINITY),
        ("--max-grad-norm", |c| c.max_grad_norm = Some(-1.0)),
        ("--max-grad-norm", |c| c.max_grad_norm = Some(f32::NAN)),
        ("--target", |c| c.target = "(c_attn".into()),
    ];
    for (flag, set) in cases {
        let mut cfg = config(out.clone(), data_file());
        set(&mut cfg);
        let e = lora_train::run::train(&cfg, false, false, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag), "{flag}: {e}");
        assert!(!out.exists(), "a refused run left {}", out.display());
    }
    // A model that names no EOS token (the qwen2 fixture: `eos_token_id: null`, no
    // tokenizer_config.json) is refused unless asked to train without one.
    let mut cfg = config(out.clone(), data_file());
    cfg.model = root().join("qwen2_bias/model");
    cfg.target = "all-linear".into();
    cfg.steps = 1;
    let e = lora_train::run::train(&cfg, false, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--no-eos") && e.contains("qwen2_bias"), "{e}");
    assert!(!out.exists(), "a refused run left {}", out.display());
    cfg.eos = false;
    lora_train::run::train(&cfg, false, false, &mut |_| {}).unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-000001/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["config"]["eos"],
        serde_json::json!(false),
        "the setting is part of the run's identity"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    // Dropout on, grad accumulation, LoRA+ (the base config): checkpointed blocks draw the same
    // masks, so the run follows the same trajectory up to f32 rounding of the input gradients.
    let data = data_file();
    let (a, b) = (tmp("ck-off"), tmp("ck-on"));
    let sa = train(&config(a.clone(), data.clone()), false, false, &mut |_| {}).unwrap();
    let mut cfg = config(b.clone(), data);
    cfg.gradient_checkpointing = true;
    let sb = train(&cfg, false, false, &mut |_| {}).unwrap();
    let read = |d: &PathBuf| {
        let f = lora_io::safetensors::SafetensorsFile::open(d.join("adapter_model.safetensors"))
            .unwrap();
        f.names()
            .iter()
            .map(|n| f.read_f32(n).unwrap().0)
            .collect::<Vec<_>>()
    };
    let (wa, wb) = (read(&a), read(&b));
    assert_eq!(wa.len(), wb.len());
    for (x, y) in wa.iter().zip(&wb) {
        let scale = x.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()))
            / scale;
        assert!(d <= 1e-4, "adapter tensors differ by {d:.2e} (relative)");
    }
    assert!((sa.final_loss - sb.final_loss).abs() <= 1e-4 * sa.final_loss.abs());
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

/// A run on `cuda:0`, stopped after 3 steps and resumed on the CPU, ends where an uninterrupted
/// CPU run ends (f32 on both, other summation orders: 1e-4 relative): the model, eval,
/// checkpoints and optimizer state all move between the backends. Needs a CUDA device (says it
/// was skipped without one; `LORA_REQUIRE_GPU=1` makes that a failure).
#[test]
fn a_run_on_a_gpu_resumed_on_the_cpu_matches_a_cpu_run() {
    if lora_core::device::cuda_device_count() == 0 {
        assert!(
            std::env::var_os("LORA_REQUIRE_GPU").is_none(),
            "LORA_REQUIRE_GPU is set but no CUDA device answers"
        );
        println!("SKIPPED on a GPU: no CUDA device answers on this machine");
        return;
    }
    let data = data_file();
    let a = tmp("dev-host");
    let sa = train(&config(a.clone(), data.clone()), false, false, &mut |_| {}).unwrap();
    let d = tmp("dev-dev");
    let mut cfg = config(d.clone(), data.clone());
    cfg.device = lora_core::Device::Cuda(0);
    cfg.stop_after = Some(3);
    let sd = train(&cfg, false, false, &mut |_| {}).unwrap();
    let close = |x: Option<f64>, y: Option<f64>| matches!((x, y), (Some(x), Some(y)) if (x - y).abs() <= 1e-4 * y.abs());
    assert!(close(sd.eval_before, sa.eval_before), "eval on the device");
    let sd = train(&config(d.clone(), data.clone()), true, false, &mut |_| {}).unwrap();
    assert_eq!(sd.steps, 6);
    assert!(
        close(sd.eval_after, sa.eval_after),
        "{:?} vs {:?}",
        sd.eval_after,
        sa.eval_after
    );
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&d);
}
