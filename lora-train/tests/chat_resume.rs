//! A chat template that prints today's date (`strftime_now`, as Llama 3.x templates do) must
//! not change the data when a run is resumed on another day: the checkpoint records the time the
//! run rendered with, and a resumed run renders with it again. Its own test binary, because it
//! sets `SOURCE_DATE_EPOCH` (the clock `strftime_now` reads) for the whole process.

use lora_train::optim::Schedule;
use lora_train::run::{train, TrainConfig};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/llama_gqa/model")
}

fn config(model: &Path, data: &Path, out: PathBuf) -> TrainConfig {
    TrainConfig {
        model: model.into(),
        data: data.into(),
        out,
        rank: 2,
        alpha: 4.0,
        target: "all-linear".into(),
        dropout: 0.0,
        rslora: false,
        lr: 1e-2,
        loraplus_ratio: 1.0,
        batch_size: 2,
        grad_accum: 1,
        seq_len: 32,
        steps: 4,
        epochs: None,
        warmup: 0,
        schedule: Schedule::Constant,
        weight_decay: 0.0,
        optimizer: lora_train::optim::OptimizerKind::AdamW,
        max_grad_norm: Some(1.0),
        pack: false,
        eos: true,
        assistant_only_loss: true,
        seed: 3,
        eval_data: None,
        eval_split: 0.0,
        eval_every: 0,
        save_every: 2,
        save_minutes: 0.0,
        keep_checkpoints: 0,
        gradient_checkpointing: false,
        device: lora_core::Device::Cpu,
        stop_after: None,
        precision: lora_core::models::Precision::F32,
    }
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn a_resumed_run_renders_with_the_recorded_date() {
    let t = std::env::temp_dir().join(format!("lora-chat-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let model = t.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        "{{ strftime_now('%d %b') }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n\
         {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    let data = t.join("d.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "n{i}"}}, {{"role": "assistant", "content": "a{i}"}}]}}"#
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |tag: &str, secs: &str, resume: bool, stop: Option<usize>| {
        // This binary has this one test, so no other thread reads the environment meanwhile.
        std::env::set_var("SOURCE_DATE_EPOCH", secs);
        let mut cfg = config(&model, &data, t.join(tag));
        cfg.stop_after = stop;
        train(&cfg, resume, false, &mut |_| {}).unwrap();
        cfg.out
    };
    let whole = run("whole", "1234567890", false, None);
    let other_day = run("other-day", "1700000000", false, None);
    assert_ne!(
        adapter(&whole),
        adapter(&other_day),
        "the date is in the training text, so it changes the adapter"
    );
    let split = run("split", "1234567890", false, Some(2));
    assert!(split.join("checkpoint-000002").exists());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(split.join("checkpoint-000002/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["chat_now"], 1234567890);
    run("split", "1700000000", true, None);
    assert_eq!(
        adapter(&split),
        adapter(&whole),
        "resumed on another day, the same adapter as the uninterrupted run"
    );
    std::fs::remove_dir_all(&t).unwrap();
}
