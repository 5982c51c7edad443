//! Full-parameter training (how the demo's base model is made): every weight of a GPT-2 gets a
//! gradient that matches finite differences (the tied `wte` through both of its uses), the
//! saved directory reloads to the same model, and a short run learns.

use lora_core::models::causal_lm_loss;
use lora_core::models::gpt2::Gpt2Config;
use lora_core::models::CausalLm;
use lora_core::Tape;
use lora_train::pretrain::{init_gpt2, pretrain, save_gpt2, PretrainConfig};

fn tiny() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 13,
        n_positions: 8,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        n_inner: 12,
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
    }
}

const IDS: [u32; 12] = [1, 5, 7, 2, 11, 0, 3, 3, 9, 12, 4, 6];

fn loss(m: &dyn CausalLm) -> f64 {
    let tape = Tape::inference();
    let logits = m.forward(&tape, &IDS, 2, 6, true).unwrap();
    let labels: Vec<i64> = IDS.iter().map(|&x| x as i64).collect();
    causal_lm_loss(&tape, &logits, &labels, 2, 6)
        .unwrap()
        .scalar()
        .unwrap() as f64
}

#[test]
fn every_weight_gradient_matches_finite_differences() {
    // Larger init than GPT-2's 0.02 so every path contributes measurably.
    let t = init_gpt2(&tiny(), 5).unwrap();
    for (_, p) in &t.params {
        let mut d = p.data_mut();
        let mut r = lora_kernels::rng::Rng::new(p.numel() as u64);
        d.iter_mut()
            .for_each(|x| *x += (r.uniform_range(-0.3, 0.3)) as f32);
    }
    // The training path: the fused head + loss, whose dW for the tied `wte` adds to the
    // embedding's scatter-add gradient. Finite differences use the unfused forward.
    let tape = Tape::new(0);
    let labels: Vec<i64> = IDS.iter().map(|&x| x as i64).collect();
    let l = t.model.loss(&tape, &IDS, &labels, 2, 6, true).unwrap();
    assert!(tape.op_names().contains(&"linear_cross_entropy"));
    let grads = tape.backward(&l).unwrap();
    assert_eq!(t.params.len(), 2 + 2 * 12 + 2);
    let mut checked = 0;
    for (name, p) in &t.params {
        let g = grads
            .get(p)
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .to_vec();
        // A few entries of each tensor, spread over it.
        let n = p.numel();
        for k in [0, n / 3, n / 2, n - 1] {
            let h = 1e-2f32;
            let orig = p.data()[k];
            p.data_mut()[k] = orig + h;
            let up = loss(&t.model);
            p.data_mut()[k] = orig - h;
            let down = loss(&t.model);
            p.data_mut()[k] = orig;
            let fd = (up - down) / (2.0 * h as f64);
            let err = (fd - g[k] as f64).abs();
            assert!(
                err <= 2e-3 + 2e-2 * fd.abs(),
                "{name}[{k}]: autograd {} vs finite difference {fd}",
                g[k]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * t.params.len());
}

#[test]
fn saved_directory_reloads_to_the_same_model() {
    let dir = std::env::temp_dir().join(format!("lora-pretrain-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = init_gpt2(&tiny(), 9).unwrap();
    let tok = dir.join("tok.json");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&tok, "{}").unwrap();
    save_gpt2(&dir.join("model"), &tiny(), &t.params, &tok, 0).unwrap();
    let md = lora_io::hf::ModelDir::open(dir.join("model")).unwrap();
    assert_eq!(md.config, lora_io::hf::ArchConfig::Gpt2(tiny()));
    let back = md.load_model().unwrap();
    assert_eq!(loss(back.as_ref()), loss(&t.model));
    assert_eq!(md.eos_token_ids().unwrap(), vec![0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn short_run_learns_a_repeating_text() {
    let dir = std::env::temp_dir().join(format!("lora-pretrain-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A word-level tokenizer over five words; the text cycles through them.
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"<unk>":0,"one":1,"two":2,"three":3,"four":4,"five":5},"unk_token":"<unk>"}}"#;
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    let text: String = (0..200)
        .map(|i| ["one", "two", "three", "four", "five"][i % 5])
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(dir.join("data.txt"), text).unwrap();
    let mut cfg = tiny();
    cfg.vocab_size = 6;
    let run = PretrainConfig {
        model: cfg,
        tokenizer: dir.join("tokenizer.json"),
        data: dir.join("data.txt"),
        out: dir.join("model"),
        steps: 200,
        batch_size: 4,
        seq_len: 8,
        lr: 1e-2,
        warmup: 5,
        seed: 3,
        special_id: 0,
    };
    let mut seen = 0;
    let sum = pretrain(&run, &mut |_, _, _| seen += 1).unwrap();
    assert_eq!(seen, 200);
    assert!(sum.first_loss > 1.4, "{sum:?}"); // about ln 6 at the start
    assert!(sum.last_loss < 0.2, "{sum:?}");
    assert!(dir.join("model/model.safetensors").exists());
    // A block longer than the model's positions is refused, naming the flag.
    let mut bad = run.clone();
    bad.seq_len = 9;
    let e = pretrain(&bad, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("--seq-len"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
