//! What a training run may do to its output directory and how it resumes: `--out` never is or
//! contains an input, `force` replaces only a previous training output holding nothing else,
//! one run at a time holds the directory, temporaries of killed runs are cleaned and reported,
//! a damaged checkpoint is skipped for the newest whole one, and examples with no target are
//! counted rather than trained on as loss 0.

use lora_train::optim::Schedule;
use lora_train::run::{train, Event, TrainConfig};
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/gpt2/model")
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-train-out-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn data(dir: &Path, lines: &[String]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{{\"text\": \"the red cat number {i} sings\"}}"))
        .collect()
}

fn config(out: PathBuf, data: PathBuf) -> TrainConfig {
    TrainConfig {
        model: model(),
        data,
        out,
        rank: 2,
        alpha: 4.0,
        target: "c_attn".into(),
        dropout: 0.0,
        rslora: false,
        lr: 2e-4,
        loraplus_ratio: 1.0,
        batch_size: 2,
        grad_accum: 1,
        seq_len: 16,
        steps: 4,
        epochs: None,
        warmup: 0,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        optimizer: lora_train::optim::OptimizerKind::AdamW,
        max_grad_norm: Some(1.0),
        pack: false,
        eos: true,
        assistant_only_loss: false,
        seed: 3,
        eval_data: None,
        eval_split: 0.0,
        eval_every: 0,
        save_every: 1,
        save_minutes: 0.0,
        keep_checkpoints: 0,
        gradient_checkpointing: false,
        device: lora_core::Device::Cpu,
        stop_after: None,
        precision: lora_core::models::Precision::F32,
    }
}

/// Runs and collects the notes.
fn run(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
) -> (Result<lora_train::run::TrainSummary, String>, Vec<String>) {
    let mut notes = Vec::new();
    let r = train(cfg, resume, force, &mut |e| {
        if let Event::Note(n) = e {
            notes.push(n.to_string());
        }
    })
    .map_err(|e| e.to_string());
    (r, notes)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn force_never_removes_an_input_or_a_foreign_file() {
    let root = tmp("force");
    // A copy of the model inside the work dir, so deleting it would be visible.
    let m = root.join("m");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model().join(f), m.join(f)).unwrap();
    }
    let d = data(&root.join("d"), &texts(8));
    let before_m = names(&m);
    let cases = [
        (m.clone(), "is the model directory"),
        (root.clone(), "contains the model directory"),
        (root.join("d"), "contains the training data"),
        (root.join("m/../d"), "contains the training data"),
    ];
    for (out, want) in cases {
        let mut cfg = config(out.clone(), d.clone());
        cfg.model = m.clone();
        let (r, _) = run(&cfg, false, true);
        let e = r.unwrap_err();
        assert!(
            e.contains(want) && e.contains("--out"),
            "{}: {e}",
            out.display()
        );
        assert_eq!(names(&m), before_m, "the model survives");
        assert!(d.exists(), "the data survives");
    }
    // A directory we did not write is never replaced, even with --force.
    let other = root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let (r, _) = run(&config(other.clone(), d.clone()), false, true);
    let e = r.unwrap_err();
    assert!(
        e.contains("not written by lora-rs") && e.contains("notes.txt"),
        "{e}"
    );
    assert_eq!(names(&other), ["notes.txt"]);
    // A previous training output is replaced by --force: a fresh run, not an appended one...
    let out = root.join("out");
    run(&config(out.clone(), d.clone()), false, false)
        .0
        .unwrap();
    assert!(names(&out).contains(&".lora-rs.json".to_string()));
    let (r, _) = run(&config(out.clone(), d.clone()), false, false);
    assert!(r.unwrap_err().contains("--force to start over"));
    let mut longer = config(out.clone(), d.clone());
    longer.steps = 2;
    run(&longer, false, true).0.unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert!(
        !out.join("checkpoint-000004").exists(),
        "the old run's checkpoints went"
    );
    // ...but not once someone else's file sits among ours.
    std::fs::write(out.join("results.csv"), "1,2").unwrap();
    let (r, _) = run(&config(out.clone(), d.clone()), false, true);
    let e = r.unwrap_err();
    assert!(e.contains("did not write: results.csv"), "{e}");
    assert!(out.join("adapter_model.safetensors").exists() && out.join("results.csv").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn one_run_at_a_time_and_stale_temporaries_are_cleaned() {
    let root = tmp("lock");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    // Another run holds the directory.
    let held = lora_io::outdir::DirLock::acquire(&out).unwrap();
    let (r, _) = run(&config(out.clone(), d.clone()), false, false);
    let e = r.unwrap_err();
    assert!(
        e.contains(&format!("process {} is writing", std::process::id())),
        "{e}"
    );
    drop(held);
    let (r, _) = run(&config(out.clone(), d.clone()), false, false);
    r.unwrap();
    // A run killed while writing a checkpoint leaves its temporary; the next run removes it
    // and says so.
    let stale = out.join(".checkpoint-000007.tmp");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("adapter_model.safetensors"), [0u8; 100]).unwrap();
    let dead = out.join(".metrics.jsonl.tmp-999999999");
    std::fs::write(&dead, "x").unwrap();
    let mut more = config(out.clone(), d.clone());
    more.steps = 5;
    let (r, notes) = run(&more, true, false);
    assert_eq!(r.unwrap().steps, 5);
    assert!(!stale.exists() && !dead.exists());
    assert!(
        notes
            .iter()
            .any(|n| n.contains(".checkpoint-000007.tmp") && n.contains("stopped"))
            && notes
                .iter()
                .any(|n| n.contains(".metrics.jsonl.tmp-999999999")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("extending the run from 4 to 5 steps")),
        "{notes:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn resume_skips_damaged_checkpoints_and_refuses_incomplete_ones() {
    let root = tmp("resume");
    let d = data(&root, &texts(8));
    let whole = root.join("whole");
    let a = run(&config(whole.clone(), d.clone()), false, false)
        .0
        .unwrap();
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    // A stopped run whose newest checkpoint (step 3) was damaged: resuming goes back to step
    // 2, says so, and still ends with the uninterrupted run's adapter.
    let out = root.join("out");
    let mut cfg = config(out.clone(), d.clone());
    cfg.stop_after = Some(3);
    run(&cfg, false, false).0.unwrap();
    let f = out.join("checkpoint-000003/optimizer.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (r, notes) = run(&config(out.clone(), d.clone()), true, false);
    let s = r.unwrap();
    assert_eq!((s.steps, s.final_loss), (4, a.final_loss));
    assert_eq!(adapter(&whole), adapter(&out));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("checkpoint-000002") && n.contains("optimizer.safetensors")),
        "{notes:?}"
    );
    // A checkpoint without its optimizer moments or sampler position would resume with zeros:
    // when it is the only one, the resume is refused with what is missing.
    type Damage = fn(&Path);
    let damages: [(Damage, &str); 4] = [
        (
            |c| {
                let st =
                    lora_io::safetensors::SafetensorsFile::open(c.join("optimizer.safetensors"))
                        .unwrap();
                let keep: Vec<(String, Vec<f32>)> = st
                    .names()
                    .into_iter()
                    .filter(|k| !k.starts_with("exp_avg_sq."))
                    .map(|k| (k.to_string(), st.read_f32(k).unwrap().0))
                    .collect();
                drop(st);
                let t: Vec<lora_io::write::OutTensor> = keep
                    .iter()
                    .map(|(k, v)| lora_io::write::OutTensor {
                        name: k.clone(),
                        shape: vec![v.len()],
                        values: v,
                        dtype: lora_io::write::OutDtype::F32,
                    })
                    .collect();
                lora_io::write::write_safetensors(
                    &c.join("optimizer.safetensors"),
                    &t,
                    Default::default(),
                )
                .unwrap();
            },
            "no optimizer state `exp_avg_sq.",
        ),
        (
            |c| {
                edit_state(c, |s| {
                    s.as_object_mut().unwrap().remove("sampler_pos");
                })
            },
            "`sampler_pos` missing",
        ),
        (|c| edit_state(c, |s| s["step"] = 9.into()), "`step` is 9"),
        (
            |c| std::fs::write(c.join("adapter_model.safetensors"), b"garbage!").unwrap(),
            "adapter_model.safetensors",
        ),
    ];
    for (damage, want) in damages {
        let out = root.join("one");
        let _ = std::fs::remove_dir_all(&out);
        let mut cfg = config(out.clone(), d.clone());
        cfg.stop_after = Some(1);
        run(&cfg, false, false).0.unwrap();
        damage(&out.join("checkpoint-000001"));
        let (r, _) = run(&config(out.clone(), d.clone()), true, false);
        let e = r.unwrap_err();
        assert!(
            e.contains("no checkpoint reads back whole") && e.contains(want),
            "{want}: {e}"
        );
    }
    // A sampler position past the data is an error, not an index out of bounds.
    let out = root.join("pos");
    let mut cfg = config(out.clone(), d.clone());
    cfg.stop_after = Some(1);
    run(&cfg, false, false).0.unwrap();
    edit_state(&out.join("checkpoint-000001"), |s| {
        s["sampler_pos"] = 1_000_000_000u64.into()
    });
    let e = run(&config(out.clone(), d.clone()), true, false)
        .0
        .unwrap_err();
    assert!(
        e.contains("`sampler_pos` 1000000000 is past the 8 training sequences"),
        "{e}"
    );
    // A finished run resumed again trains nothing and says so with its last loss.
    let (r, _) = run(&config(whole.clone(), d.clone()), true, false);
    let s = r.unwrap();
    assert!(
        s.already_complete && s.steps == 4 && s.final_loss == a.final_loss,
        "{s:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn edit_state(ckpt: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = ckpt.join("trainer_state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn examples_without_targets_are_counted_and_a_run_without_any_is_refused() {
    let root = tmp("targets");
    // Prompts that fill --seq-len leave their completions no room.
    let long = "word ".repeat(40);
    let mut lines: Vec<String> = (0..3)
        .map(|i| format!("{{\"prompt\": \"{long}{i}\", \"completion\": \" yes\"}}"))
        .collect();
    let d = data(&root, &lines);
    let out = root.join("out");
    let e = run(&config(out.clone(), d.clone()), false, false)
        .0
        .unwrap_err();
    assert!(
        e.contains("no training example keeps a target token within --seq-len 16"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
    // An empty completion without EOS has no target either.
    let d2 = data(
        &root.join("empty"),
        &vec!["{\"prompt\": \"a cat\", \"completion\": \"\"}".to_string(); 2],
    );
    let mut cfg = config(out.clone(), d2);
    cfg.eos = false;
    assert!(run(&cfg, false, false)
        .0
        .unwrap_err()
        .contains("no training example"));
    // Some with, some without: the run goes on and says how many were left out.
    lines.extend(texts(4));
    let d = data(&root, &lines);
    let (r, notes) = run(&config(out.clone(), d), false, false);
    r.unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("3 of 7 training examples have no target token")),
        "{notes:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sizes_beyond_the_data_or_the_layers_are_refused_before_allocating() {
    let root = tmp("sizes");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    type Set = fn(&mut TrainConfig);
    let cases: [(Set, &str); 5] = [
        (|c| c.batch_size = 1_000_000_000, "a step would take 1000000000 sequences"),
        (|c| c.grad_accum = 1_000_000_000, "x --grad-accum 1000000000"),
        (|c| c.grad_accum = usize::MAX, "--grad-accum"),
        (|c| c.rank = 100, "--rank: 100 exceeds what `transformer.h.0.attn.c_attn` (32 -> 96 features) can use: at most 32"),
        (|c| c.rank = 1_000_000, "--rank: must be from 1 to 65536, got 1000000"),
    ];
    for (set, want) in cases {
        let mut cfg = config(out.clone(), d.clone());
        set(&mut cfg);
        let e = run(&cfg, false, false).0.unwrap_err();
        assert!(e.contains(want), "{want}: {e}");
        assert!(!out.exists());
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn resume_mismatch_names_settings_without_float_noise() {
    let root = tmp("noise");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    let mut cfg = config(out.clone(), d.clone());
    cfg.stop_after = Some(1);
    run(&cfg, false, false).0.unwrap();
    let mut other = config(out.clone(), d.clone());
    other.lr = 1e-3;
    let e = run(&other, true, false).0.unwrap_err();
    assert!(e.contains("lr: checkpoint 0.0002, now 0.001"), "{e}");
    // A checkpoint that wrote the f64 widening of an f32 setting (earlier versions) still
    // resumes with the same flag.
    edit_state(&out.join("checkpoint-000001"), |s| {
        s["config"]["lr"] = serde_json::json!(2e-4f32 as f64)
    });
    run(&config(out.clone(), d), true, false).0.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn grad_accumulation_takes_the_same_step_as_a_larger_batch() {
    // Sequences of different lengths: micro-batches hold different numbers of target tokens,
    // so weighing them equally (as before) gave a different step than one batch of all four.
    let root = tmp("accum");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "{{\"text\": \"{}\"}}",
                "the red cat sings ".repeat(1 + i % 4)
            )
        })
        .collect();
    let d = data(&root, &lines);
    let adapter = |b: usize, acc: usize| {
        let out = root.join(format!("b{b}a{acc}"));
        let mut cfg = config(out.clone(), d.clone());
        cfg.batch_size = b;
        cfg.grad_accum = acc;
        cfg.steps = 3;
        cfg.seq_len = 32;
        let sum = run(&cfg, false, false).0.unwrap();
        let f = lora_io::safetensors::SafetensorsFile::open(out.join("adapter_model.safetensors"))
            .unwrap();
        let w: Vec<f32> = f
            .names()
            .iter()
            .flat_map(|n| f.read_f32(n).unwrap().0)
            .collect();
        (sum.final_loss, w)
    };
    let (l4, w4) = adapter(4, 1);
    for (b, acc) in [(2, 2), (1, 4)] {
        let (l, w) = adapter(b, acc);
        assert!(
            (l - l4).abs() <= 1e-5 * l4.abs(),
            "batch {b} x {acc}: loss {l} vs {l4}"
        );
        let scale = w4.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = w
            .iter()
            .zip(&w4)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "batch {b} x {acc}: adapters differ by {diff:e} (scale {scale:e})"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn files_of_others_inside_checkpoints_are_never_removed() {
    let root = tmp("inside");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    run(&config(out.clone(), d.clone()), false, false)
        .0
        .unwrap();
    // A note inside a checkpoint: --force refuses the whole directory...
    let note = out.join("checkpoint-000002/user_notes.txt");
    std::fs::write(&note, "mine").unwrap();
    let e = run(&config(out.clone(), d.clone()), false, true)
        .0
        .unwrap_err();
    assert!(
        e.contains("checkpoint-000002") && e.contains("user_notes.txt"),
        "{e}"
    );
    assert!(note.exists() && out.join("adapter_model.safetensors").exists());
    // ...and rotation keeps that checkpoint, saying why.
    let mut more = config(out.clone(), d.clone());
    more.steps = 6;
    more.keep_checkpoints = 1;
    let (r, notes) = run(&more, true, false);
    r.unwrap();
    assert!(note.exists());
    assert!(!out.join("checkpoint-000003").exists() && out.join("checkpoint-000006").exists());
    assert!(
        notes
            .iter()
            .any(|n| n.contains("kept") && n.contains("user_notes.txt")),
        "{notes:?}"
    );
    // A half-written checkpoint holding someone's file is not cleaned away as stale either.
    let tmp_note = out.join(".checkpoint-000009.tmp/theirs.txt");
    std::fs::create_dir_all(tmp_note.parent().unwrap()).unwrap();
    std::fs::write(&tmp_note, "mine").unwrap();
    let mut again = config(out.clone(), d.clone());
    again.steps = 7;
    run(&again, true, false).0.unwrap();
    assert!(tmp_note.exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_fallback_resume_rewrites_the_metrics_it_repeats() {
    let root = tmp("metrics");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    let mut cfg = config(out.clone(), d.clone());
    cfg.stop_after = Some(3);
    run(&cfg, false, false).0.unwrap();
    // The newest checkpoint is damaged: the run resumes from step 2 and redoes step 3.
    std::fs::write(out.join("checkpoint-000003/trainer_state.json"), "{").unwrap();
    run(&config(out.clone(), d.clone()), true, false).0.unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "each step once, in order");
    // --epochs counts steps from the decimal given: 0.5 of 8 sequences at batch 2 is 2 steps.
    let mut e = config(root.join("epochs"), d.clone());
    e.epochs = Some(0.5);
    assert_eq!(run(&e, false, false).0.unwrap().steps, 2);
    e.out = root.join("epochs2");
    e.epochs = Some(0.1);
    assert_eq!(run(&e, false, false).0.unwrap().steps, 1);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ids_past_the_vocabulary_and_settings_that_do_nothing_are_named() {
    let root = tmp("vocab");
    let d = data(&root, &texts(8));
    // An EOS id from config.json past the model's vocabulary (300): named with the files,
    // not an index error deep in the embedding.
    let m = root.join("m");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model().join(f), m.join(f)).unwrap();
    }
    let p = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!(1_000_000_000);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let mut c = config(root.join("o1"), d.clone());
    c.model = m;
    let e = run(&c, false, false).0.unwrap_err();
    assert!(
        e.contains("token id 1000000000") && e.contains("vocabulary of 300"),
        "{e}"
    );
    // A target name that matches nothing and a warmup as long as the run: notes.
    let mut c = config(root.join("o2"), d);
    c.target = "c_attn,nonexistent".into();
    c.warmup = 10;
    let (r, notes) = run(&c, false, false);
    r.unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("`nonexistent` matched no module")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("--warmup 10") && n.contains("never reaches")),
        "{notes:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn checkpoints_come_by_time_as_well_as_by_steps() {
    let root = tmp("bytime");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    let mut cfg = config(out.clone(), d);
    cfg.save_every = 0;
    // A few microseconds: every step is past the interval.
    cfg.save_minutes = 1e-7;
    run(&cfg, false, false).0.unwrap();
    for s in 1..=4 {
        assert!(out.join(format!("checkpoint-{s:06}")).exists(), "step {s}");
    }
    // Off: only the end's checkpoint.
    let out2 = root.join("out2");
    let mut cfg = config(out2.clone(), data(&root.join("d2"), &texts(8)));
    cfg.save_every = 0;
    cfg.save_minutes = 0.0;
    run(&cfg, false, false).0.unwrap();
    assert!(!out2.join("checkpoint-000001").exists() && out2.join("checkpoint-000004").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn symlinks_in_the_output_and_paths_spelled_another_way() {
    let root = tmp("links");
    let d = data(&root, &texts(8));
    let out = root.join("out");
    let mut cfg = config(out.clone(), d.clone());
    cfg.stop_after = Some(2);
    run(&cfg, false, false).0.unwrap();
    // Someone's file linked in as metrics.jsonl: resuming would append to it.
    let theirs = root.join("theirs.jsonl");
    std::fs::write(&theirs, "mine\n").unwrap();
    std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
    std::os::unix::fs::symlink(&theirs, out.join("metrics.jsonl")).unwrap();
    let e = run(&config(out.clone(), d.clone()), true, false)
        .0
        .unwrap_err();
    assert!(e.contains("symlinks") && e.contains("metrics.jsonl"), "{e}");
    let e = run(&config(out.clone(), d.clone()), false, true)
        .0
        .unwrap_err();
    assert!(e.contains("metrics.jsonl"), "{e}");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "mine\n");
    std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
    // The same data file named another way resumes the run.
    let mut other = config(out.clone(), root.join("x/../data.jsonl"));
    other.data = root.join("x").join("..").join("data.jsonl");
    std::fs::create_dir_all(root.join("x")).unwrap();
    run(&other, true, false).0.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
