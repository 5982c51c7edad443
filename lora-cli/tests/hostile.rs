//! The `lora` binary against careless and hostile input, one case per class of fault found by
//! trying about 400 bad inputs: outputs that would replace an input or someone else's files,
//! values that are not numbers, damaged adapters, Hub ids, log volume. Each gets a clear error
//! (exit 1, never a panic) or the right result.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lora(args: &[&str]) -> Output {
    lora_env(args, &[])
}

fn lora_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lora"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run lora")
}

/// `lora eval --model MODEL --data DATA --json` with `env` set.
fn eval_json(model: &str, data: &Path, env: &[(&str, &Path)]) -> Output {
    lora_env(
        &["eval", "--model", model, "--data", s(data), "--json"],
        env,
    )
}

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(p)
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-hostile-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Fails with exit 1 and a message holding every needle, without a panic.
fn refused(out: &Output, needles: &[&str]) {
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("data.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| format!("{{\"text\": \"the red cat number {i} sings\"}}"))
        .collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn outputs_never_replace_inputs_or_foreign_files() {
    let t = tmp("outputs");
    let m = t.join("m");
    copy_dir(&fixture("gpt2/model"), &m);
    let a = t.join("a");
    copy_dir(&fixture("gpt2/adapter"), &a);
    let d = data(&t);
    let model_files = std::fs::read_dir(&m).unwrap().count();
    // train --out over the model, over the directory holding the data, and `.`.
    for (out, want) in [
        (s(&m).to_string(), "--out is the model directory"),
        (s(&t).to_string(), "--out contains the model directory"),
    ] {
        refused(
            &lora(&[
                "train",
                "--model",
                s(&m),
                "--data",
                s(&d),
                "--out",
                &out,
                "--force",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--threads",
                "1",
            ]),
            &[want],
        );
    }
    let dot = Command::new(env!("CARGO_BIN_EXE_lora"))
        .current_dir(&t)
        .args([
            "train",
            "--model",
            "m",
            "--data",
            "data.jsonl",
            "--out",
            ".",
            "--force",
        ])
        .output()
        .unwrap();
    refused(&dot, &["--out contains the model directory"]);
    assert_eq!(std::fs::read_dir(&m).unwrap().count(), model_files);
    assert!(d.exists());
    // merge, convert and combine onto their own inputs.
    refused(
        &lora(&[
            "merge",
            "--model",
            s(&m),
            "--adapter",
            s(&a),
            "--out",
            s(&a),
            "--force",
        ]),
        &["--out is the adapter"],
    );
    let st = a.join("adapter_model.safetensors");
    refused(
        &lora(&["convert", "--from", s(&a), "--to", s(&st), "--force"]),
        &["not written by lora-rs"],
    );
    refused(
        &lora(&["combine", "--adapter", s(&a), "--out", s(&a), "--force"]),
        &["--out is the input adapter"],
    );
    // A kohya file we wrote is replaced with --force; a file we did not write is not.
    let k = t.join("k.safetensors");
    ok(&lora(&["convert", "--from", s(&a), "--to", s(&k)]));
    refused(
        &lora(&["convert", "--from", s(&a), "--to", s(&k)]),
        &["--force"],
    );
    ok(&lora(&[
        "convert",
        "--from",
        s(&a),
        "--to",
        s(&k),
        "--force",
    ]));
    let foreign = t.join("foreign.safetensors");
    std::fs::copy(&st, &foreign).unwrap();
    refused(
        &lora(&["convert", "--from", s(&a), "--to", s(&foreign), "--force"]),
        &["not written by lora-rs"],
    );
    // combine into a directory with someone's file: refused; into its own earlier output: fine.
    let c = t.join("c");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("notes.txt"), "mine").unwrap();
    refused(
        &lora(&["combine", "--adapter", s(&a), "--out", s(&c), "--force"]),
        &["not written by lora-rs", "notes.txt"],
    );
    std::fs::remove_file(c.join("notes.txt")).unwrap();
    ok(&lora(&["combine", "--adapter", s(&a), "--out", s(&c)]));
    ok(&lora(&[
        "combine",
        "--adapter",
        s(&a),
        "--out",
        s(&c),
        "--force",
    ]));
    // The inputs are as they were.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(fixture("gpt2/adapter").join(f)).unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn values_that_are_not_what_they_claim_are_named() {
    let t = tmp("values");
    let m = fixture("gpt2/model");
    let a = fixture("gpt2/adapter");
    let d = data(&t);
    // A negative number is a value, and its own check says what is wrong.
    refused(
        &lora(&[
            "train",
            "--model",
            s(&m),
            "--data",
            s(&d),
            "--out",
            s(&t.join("o")),
            "--lr",
            "-1",
        ]),
        &["--lr: must be positive, got -1"],
    );
    refused(
        &lora(&[
            "combine",
            "--adapter",
            s(&a),
            "--weight",
            "NaN",
            "--out",
            s(&t.join("nan")),
        ]),
        &["--weight", "must be finite, got NaN"],
    );
    refused(
        &lora(&[
            "combine",
            "--adapter",
            s(&a),
            "--weight",
            "inf",
            "--out",
            s(&t.join("inf")),
        ]),
        &["must be finite, got inf"],
    );
    assert!(!t.join("nan").exists() && !t.join("inf").exists());
    // A .jsonl with a byte-order mark reads like one without.
    let bom = t.join("bom.jsonl");
    let mut b = b"\xef\xbb\xbf".to_vec();
    b.extend_from_slice(&std::fs::read(&d).unwrap());
    std::fs::write(&bom, b).unwrap();
    let with = ok(&lora(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&bom),
        "--json",
    ]));
    let without = ok(&lora(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--json",
    ]));
    assert_eq!(with, without);
    // `eval` prints its result, not training's parameter counts.
    let human = ok(&lora(&[
        "eval",
        "--model",
        s(&m),
        "--adapter",
        s(&a),
        "--data",
        s(&d),
    ]));
    assert!(
        human.starts_with("loss ") && !human.contains("trainable"),
        "{human}"
    );
    // A damaged adapter: inspect shows NaN and warns; eval and generate refuse it by name.
    let bad = t.join("bad");
    copy_dir(&a, &bad);
    let f =
        lora_io::safetensors::SafetensorsFile::open(bad.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .names()
        .iter()
        .map(|k| {
            let (v, sh) = f.read_f32(k).unwrap();
            (k.to_string(), sh, v)
        })
        .collect();
    drop(f);
    let damaged = tensors
        .iter()
        .position(|t| t.0.ends_with("lora_B.weight"))
        .unwrap();
    tensors[damaged].2[3] = f32::NAN;
    let out: Vec<lora_io::write::OutTensor> = tensors
        .iter()
        .map(|(k, sh, v)| lora_io::write::OutTensor {
            name: k.clone(),
            shape: sh.clone(),
            values: v,
            dtype: lora_io::write::OutDtype::F32,
        })
        .collect();
    lora_io::write::write_safetensors(
        &bad.join("adapter_model.safetensors"),
        &out,
        Default::default(),
    )
    .unwrap();
    let shown = ok(&lora(&["inspect", s(&bad)]));
    assert!(
        shown.contains("NaN") && shown.contains("warning: 1 values"),
        "{shown}"
    );
    let key = &tensors[damaged].0;
    refused(
        &lora(&[
            "eval",
            "--model",
            s(&m),
            "--adapter",
            s(&bad),
            "--data",
            s(&d),
        ]),
        &[key, "holds NaN at index 3"],
    );
    refused(
        &lora(&[
            "generate",
            "--model",
            s(&m),
            "--adapter",
            s(&bad),
            "--prompt",
            "the",
        ]),
        &[key, "holds NaN"],
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let t = tmp("hub");
    let cache = t.join("hub");
    let repo = cache.join("models--tiny-org--tiny-gpt2");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(&fixture("gpt2/model"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let d = data(&t);
    let offline = PathBuf::from("1");
    let env = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_HUB_OFFLINE", offline.as_path()),
    ];
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            "tiny-org/tiny-gpt2",
            "--data",
            s(&d),
            "--json",
        ];
        args.extend_from_slice(extra);
        lora_env(&args, &env)
    };
    let by_id = ok(&eval(&[]));
    let by_dir = ok(&eval_json(s(&fixture("gpt2/model")), &d, &[]));
    assert_eq!(by_id, by_dir);
    assert_eq!(ok(&eval(&["--revision", commit])), by_dir);
    refused(
        &eval(&["--revision", "v2"]),
        &[
            "tiny-org/tiny-gpt2",
            "revision v2",
            "not in the local Hugging Face cache",
            "hf download",
        ],
    );
    // HF_HOME/hub is where the cache is when HF_HUB_CACHE is not set.
    let via_home = eval_json("tiny-org/tiny-gpt2", &d, &[("HF_HOME", t.as_path())]);
    assert_eq!(ok(&via_home), by_dir);
    let missing = lora_env(
        &[
            "train",
            "--model",
            "nobody/nothing",
            "--data",
            s(&d),
            "--out",
            s(&t.join("o")),
        ],
        &env,
    );
    refused(
        &missing,
        &[
            "nobody/nothing",
            &cache.join("models--nobody--nothing").display().to_string(),
        ],
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn progress_lines_outside_a_terminal_are_few() {
    let t = tmp("log");
    let m = fixture("gpt2/model");
    let d = data(&t);
    let o = t.join("o");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(&m),
            "--data",
            s(&d),
            "--out",
            s(&o),
            "--steps",
            "100",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "2",
            "--threads",
            "1",
            "--force",
        ];
        args.extend_from_slice(extra);
        ok(&lora(&args))
    };
    let lines = |out: &str| out.lines().filter(|l| l.starts_with("step ")).count();
    // About 20 lines by default (every 5th step, and the first).
    assert_eq!(lines(&train(&[])), 21);
    assert_eq!(lines(&train(&["--log-every", "50"])), 3);
    assert_eq!(lines(&train(&["--log-every", "1"])), 100);
    // The default --seq-len (256) yields to a model with 32 positions, and says so.
    let out = ok(&lora(&[
        "train",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--out",
        s(&t.join("o")),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--force",
    ]));
    assert!(
        out.contains("takes at most 32 positions; using 32"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&t);
}

/// The guide's troubleshooting table quotes the messages as lora-rs prints them: each row
/// checked here is triggered and every literal piece of its quoted message (the text between
/// `<placeholders>`, `...` and the counts N, M) must appear in what the command printed.
#[test]
fn the_troubleshooting_table_quotes_real_messages() {
    let guide =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/guide.md"))
            .unwrap();
    let table = &guide[guide.find("## Troubleshooting").unwrap()..];
    let row = |key: &str| -> String {
        let line = table
            .lines()
            .find(|l| l.starts_with("| `") && l.contains(key))
            .unwrap_or_else(|| panic!("no troubleshooting row with {key}"));
        // The first cell, up to the cell separator that follows a closing backtick.
        let end = line.find("` |").unwrap();
        line[3..end].to_string()
    };
    let t = tmp("guide");
    let m = t.join("m");
    copy_dir(&fixture("gpt2/model"), &m);
    let d = data(&t);
    let base = |out: &Path, extra: &[&str]| -> Output {
        let mut args = vec![
            "train",
            "--model",
            s(&m),
            "--data",
            s(&d),
            "--out",
            s(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        lora(&args)
    };
    let o = t.join("o");
    ok(&base(&o, &["--save-every", "1"]));
    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let foreign = t.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "x").unwrap();
    let bad = t.join("bad.jsonl");
    std::fs::write(&bad, "{\"txt\": \"a\"}\n").unwrap();
    let cases: Vec<(&str, Output)> = vec![
        (
            "not found (model directory)",
            lora(&["eval", "--model", "/nonexistent/dir", "--data", s(&d)]),
        ),
        (
            "is this a Hugging Face model directory",
            lora(&["eval", "--model", s(&empty), "--data", s(&d)]),
        ),
        (
            "matched no module; available",
            base(&t.join("x1"), &["--target", "q_proj"]),
        ),
        ("output directory is not empty", base(&o, &[])),
        ("not written by lora-rs", base(&foreign, &["--force"])),
        ("--out is the model directory", base(&m, &["--force"])),
        (
            "no checkpoint-* directory found",
            base(&t.join("x2"), &["--resume"]),
        ),
        ("settings differ", base(&o, &["--resume", "--lr", "1e-3"])),
        (
            "no string field",
            lora(&[
                "train",
                "--model",
                s(&m),
                "--data",
                s(&bad),
                "--out",
                s(&t.join("x3")),
            ]),
        ),
        (
            "a step would take",
            base(&t.join("x4"), &["--batch-size", "100"]),
        ),
        (
            "exceeds the model's maximum",
            base(&t.join("x5"), &["--seq-len", "5000"]),
        ),
        ("can use: at most", base(&t.join("x6"), &["--rank", "1000"])),
        (
            "no CUDA driver library",
            base(&t.join("x7"), &["--device", "cuda"]),
        ),
    ];
    for (key, out) in cases {
        let cell = row(key);
        let printed = String::from_utf8_lossy(&out.stderr).replace('`', "");
        assert!(!out.status.success(), "{key}: succeeded");
        // A row may quote alternatives (`a` / `b`): one of them must match whole.
        let missing: Vec<Vec<String>> = cell
            .split("` / `")
            .map(|alt| {
                literal_pieces(&alt.replace('`', ""))
                    .into_iter()
                    .filter(|lit| !printed.contains(lit.as_str()))
                    .collect()
            })
            .collect();
        assert!(
            missing.iter().any(|m| m.is_empty()),
            "guide row `{cell}`: {missing:?} not in what lora printed:\n{printed}"
        );
    }
    let _ = std::fs::remove_dir_all(&t);
}

/// The literal pieces of a quoted message: the text between `<placeholders>`, `...` and the
/// counts N and M, long enough to mean something.
fn literal_pieces(msg: &str) -> Vec<String> {
    let mut pieces = vec![msg.to_string()];
    for sep in ["<", ">", "..."] {
        pieces = pieces
            .iter()
            .flat_map(|p| p.split(sep).map(String::from).collect::<Vec<_>>())
            .collect();
    }
    let placeholder = |p: &str| msg.contains(&format!("<{p}>"));
    pieces
        .iter()
        .filter(|p| !placeholder(p))
        .flat_map(|p| split_counts(p))
        .map(|l| {
            l.trim()
                .trim_start_matches(['(', ':', ','])
                .trim()
                .to_string()
        })
        .filter(|l| l.len() >= 8)
        .collect()
}

/// `p` split at the standalone letters N and M (counts in a quoted message).
fn split_counts(p: &str) -> Vec<String> {
    let c: Vec<char> = p.chars().collect();
    let mut out = vec![String::new()];
    for (i, &ch) in c.iter().enumerate() {
        let alone = |j: Option<&char>| j.is_none_or(|x| !x.is_alphanumeric());
        if (ch == 'N' || ch == 'M')
            && alone(i.checked_sub(1).and_then(|j| c.get(j)))
            && alone(c.get(i + 1))
        {
            out.push(String::new());
        } else {
            out.last_mut().unwrap().push(ch);
        }
    }
    out
}

#[test]
fn more_classes_found_by_a_hostile_run() {
    let t = tmp("more");
    let m = fixture("gpt2/model");
    let a = fixture("gpt2/adapter");
    let d = data(&t);
    // Benchmarks size their buffers before allocating (a GEMM of 2^32 once crashed the
    // process: its length check wrapped around).
    for args in [
        &[
            "bench",
            "gemm",
            "--size",
            "4294967296",
            "--iters",
            "1",
            "--threads",
            "1",
        ][..],
        &["bench", "gemm", "--size", "18446744073709551615"],
        &[
            "bench",
            "linear",
            "--tokens",
            "18446744073709551615",
            "--threads",
            "1",
        ],
        &[
            "bench",
            "mixed",
            "--adapters",
            "18446744073709551615",
            "--tokens",
            "1",
            "--in",
            "1",
            "--out",
            "1",
            "--rank",
            "1",
        ],
        &[
            "bench",
            "train",
            "--hidden",
            "4294967296",
            "--heads",
            "1",
            "--kv-heads",
            "1",
        ],
    ] {
        refused(&lora(args), &["these sizes"]);
    }
    refused(
        &lora(&["bench", "linear", "--iters", "0"]),
        &["--iters must be at least 1"],
    );
    refused(
        &lora(&["bench", "train", "--vocab", "0"]),
        &["--vocab must be at least 1"],
    );
    // Data that is not a regular file, has no extension, or mixes formats on a line.
    let noext = t.join("data");
    std::fs::write(&noext, "{\"text\": \"a\"}").unwrap();
    let mixed = t.join("mixed.jsonl");
    std::fs::write(
        &mixed,
        "{\"text\": \"a b\", \"prompt\": \"a\", \"completion\": \"b\"}",
    )
    .unwrap();
    for (data, want) in [
        ("/dev/zero", "not a regular file"),
        (s(&noext), "has no extension"),
        (s(&mixed), "line 1: has `text` and also"),
    ] {
        refused(&lora(&["eval", "--model", s(&m), "--data", data]), &[want]);
    }
    // eval refuses a --seq-len past the model's positions, as train does.
    refused(
        &lora(&[
            "eval",
            "--model",
            s(&m),
            "--data",
            s(&d),
            "--seq-len",
            "100000",
        ]),
        &["--seq-len 100000 exceeds the model's maximum of 32 positions"],
    );
    // An adapter given as a file, a kohya -> PEFT output named like a file.
    let k = t.join("k.safetensors");
    ok(&lora(&["convert", "--from", s(&a), "--to", s(&k)]));
    refused(
        &lora(&[
            "eval",
            "--model",
            s(&m),
            "--adapter",
            s(&k),
            "--data",
            s(&d),
        ]),
        &[
            "is a file, but an adapter is a PEFT directory",
            "lora convert",
        ],
    );
    refused(
        &lora(&[
            "convert",
            "--from",
            s(&k),
            "--to",
            s(&t.join("y.safetensors")),
            "--model",
            s(&m),
        ]),
        &["--to must not end in .safetensors"],
    );
    assert!(!t.join("y.safetensors").exists());
    // A config file's booleans must be booleans, and its file is named.
    let toml = t.join("run.toml");
    std::fs::write(&toml, "rslora = \"yes\"\n").unwrap();
    refused(
        &train_with_config(&toml, &m, &d, &t.join("o")),
        &["run.toml: key `rslora` must be true or false"],
    );
    // --eval-split and --eval-data together: one of them would be ignored.
    let both = lora(&[
        "train",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--out",
        s(&t.join("o")),
        "--eval-data",
        s(&d),
        "--eval-split",
        "0.1",
    ]);
    assert_eq!(
        both.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    // `demo --build` never writes over a model or data of someone else's.
    let dir = t.join("demo");
    copy_dir(&m, &dir.join("base"));
    refused(
        &lora(&[
            "demo",
            "--build",
            "--dir",
            s(&dir),
            "--pretrain-steps",
            "1",
            "--threads",
            "1",
        ]),
        &["--dir: not written by lora-rs"],
    );
    assert_eq!(
        std::fs::read(dir.join("base/model.safetensors")).unwrap(),
        std::fs::read(m.join("model.safetensors")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn a_hangup_checkpoints_like_an_interrupt() {
    let t = tmp("hup");
    let m = fixture("gpt2/model");
    let d = data(&t);
    let out = t.join("o");
    let child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args([
            "train",
            "--model",
            s(&m),
            "--data",
            s(&d),
            "--out",
            s(&out),
            "--steps",
            "100000",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "2",
            "--threads",
            "1",
            "--save-every",
            "1",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Any checkpoint will do: with `--save-every 1` rotation may remove the first before a busy
    // machine lets this loop look for it. A child that ended early fails at once with its stderr.
    let mut child = child;
    let start = std::time::Instant::now();
    while !std::fs::read_dir(&out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
        .unwrap_or(false)
    {
        if let Some(status) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!(
                "train ended ({status}) before a checkpoint: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(start.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(129),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let step = v["steps"].as_u64().unwrap();
    assert!(v["interrupted"] == true && out.join(format!("checkpoint-{step:06}")).exists());
    let _ = std::fs::remove_dir_all(&t);
}

/// A stand-in for the Hub on a local port: `GET /tiny-org/tiny-gpt2/resolve/<rev>/<file>` serves
/// the files of `dir` with the headers `hf-hub` reads (ETag, X-Repo-Commit, Content-Range), 404
/// for anything else, until `GET /quit`; returns the paths it was asked for.
fn mock_hub(dir: PathBuf, commit: &'static str) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        listener.set_nonblocking(false).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || line.is_empty() {
                continue;
            }
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            if path == "/quit" {
                break;
            }
            seen.push(path.clone());
            let file = path.rsplit('/').next().unwrap_or("");
            let body = std::fs::read(dir.join(file))
                .ok()
                .filter(|_| path.starts_with("/tiny-org/tiny-gpt2/resolve/"));
            let resp = match body {
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
                Some(b) => {
                    let start: usize = range
                        .as_deref()
                        .and_then(|r| r.split('-').next())
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    let end = match range.as_deref() {
                        Some("0-0") => 1.min(b.len()),
                        _ => b.len(),
                    };
                    let part = &b[start.min(end)..end];
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\nETag: \"{}-{}\"\r\nX-Repo-Commit: {commit}\r\n\
                         Content-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        file.len(),
                        b.len(),
                        end.saturating_sub(1),
                        b.len(),
                        part.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(part);
                    r
                }
            };
            let _ = stream.write_all(&resp);
        }
        seen
    });
    (addr, h)
}

#[test]
fn a_hub_id_not_in_the_cache_is_downloaded_into_it() {
    let t = tmp("download");
    let cache = t.join("hub");
    let d = data(&t);
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let (addr, server) = mock_hub(fixture("gpt2/model"), commit);
    let endpoint = PathBuf::from(&addr);
    let out = eval_json(
        "tiny-org/tiny-gpt2",
        &d,
        &[
            ("HF_HUB_CACHE", cache.as_path()),
            ("HF_ENDPOINT", endpoint.as_path()),
        ],
    );
    let by_id = ok(&out);
    let by_dir = ok(&eval_json(s(&fixture("gpt2/model")), &d, &[]));
    assert_eq!(by_id, by_dir);
    let snap = cache
        .join("models--tiny-org--tiny-gpt2/snapshots")
        .join(commit);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(snap.join(f)).unwrap(),
            std::fs::read(fixture("gpt2/model").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("models--tiny-org--tiny-gpt2/refs/main")).unwrap(),
        commit
    );
    // Now cached: offline works, and nothing more is fetched.
    let offline = PathBuf::from("1");
    let again = eval_json(
        "tiny-org/tiny-gpt2",
        &d,
        &[
            ("HF_HUB_CACHE", cache.as_path()),
            ("HF_HUB_OFFLINE", offline.as_path()),
        ],
    );
    assert_eq!(ok(&again), by_dir);
    // A repository the Hub does not have: the cache message and the download's failure.
    let missing = lora_env(
        &["eval", "--model", "nobody/nothing", "--data", s(&d)],
        &[
            ("HF_HUB_CACHE", cache.as_path()),
            ("HF_ENDPOINT", endpoint.as_path()),
        ],
    );
    refused(
        &missing,
        &[
            "not in the local Hugging Face cache",
            "downloading it failed too",
            "config.json",
        ],
    );
    let _ = std::net::TcpStream::connect(addr.trim_start_matches("http://"))
        .and_then(|mut s| std::io::Write::write_all(&mut s, b"GET /quit HTTP/1.1\r\n\r\n"));
    let seen = server.join().unwrap();
    assert!(
        seen.iter()
            .any(|p| p == "/tiny-org/tiny-gpt2/resolve/main/model.safetensors"),
        "{seen:?}"
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn config_files_yield_to_the_command_line() {
    let t = tmp("toml");
    let m = fixture("gpt2/model");
    let d = data(&t);
    let toml = t.join("run.toml");
    // `epochs` in the file and `--steps` on the command line: the command line wins.
    std::fs::write(
        &toml,
        "epochs = 0.5\nbatch_size = 2\nseq_len = 16\nthreads = 1\n",
    )
    .unwrap();
    let out = ok(&lora(&[
        "train",
        "--config",
        s(&toml),
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--out",
        s(&t.join("o")),
        "--steps",
        "3",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["steps"], 3);
    // What to do with an existing output is said on the command line only.
    std::fs::write(&toml, "force = true\n").unwrap();
    refused(
        &train_with_config(&toml, &m, &d, &t.join("o")),
        &["`force` says what to do with an existing output"],
    );
    let _ = std::fs::remove_dir_all(&t);
}

/// `lora train --config TOML --model M --data D --out O`.
fn train_with_config(toml: &Path, m: &Path, d: &Path, out: &Path) -> Output {
    lora(&[
        "train",
        "--config",
        s(toml),
        "--model",
        s(m),
        "--data",
        s(d),
        "--out",
        s(out),
    ])
}
