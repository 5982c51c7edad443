//! `CausalLm::loss` (output head fused with the cross-entropy, no `(B, T, V)` logits) against
//! the unfused `forward` + `causal_lm_loss` that the parity tests tie to transformers + PEFT:
//! same loss and same adapter gradients, on every fixture model (tied and untied heads).

use lora_core::models::causal_lm_loss;
use lora_core::Tape;
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn fused_loss_and_gradients_equal_the_unfused_path() {
    let mut checked = 0;
    for case in [
        "gpt2",
        "llama_gqa",
        "llama_bf16",
        "qwen2_bias",
        "mistral",
        "llama3_rope",
    ] {
        let dir = root().join(case);
        let md = ModelDir::open(dir.join("model")).unwrap();
        let mut model = md.load_model().unwrap();
        load_adapter(model.as_mut(), &dir.join("adapter")).unwrap();
        let (batch, seq) = (2, 7);
        let v = model.vocab_size() as u32;
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i as u32 * 37 + 11) % v).collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % 5 == 2 { -100 } else { t as i64 })
            .collect();

        let t1 = Tape::new(1);
        let logits = model.forward(&t1, &ids, batch, seq, true).unwrap();
        let l1 = causal_lm_loss(&t1, &logits, &labels, batch, seq).unwrap();
        let g1 = t1.backward(&l1).unwrap();

        let t2 = Tape::new(1);
        let l2 = model.loss(&t2, &ids, &labels, batch, seq, true).unwrap();
        let ops = t2.op_names();
        assert!(ops.contains(&"linear_cross_entropy"), "{case}: {ops:?}");
        let g2 = t2.backward(&l2).unwrap();

        let (a, b) = (l1.scalar().unwrap(), l2.scalar().unwrap());
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{case}: loss {a} vs fused {b}"
        );
        for (name, lin) in model.linears() {
            if let Some(l) = lin.lora() {
                for (part, t) in [("A", &l.lora_a), ("B", &l.lora_b)] {
                    let (x, y) = (g2.get(t).unwrap(), g1.get(t).unwrap());
                    let e = rel(x, y);
                    assert!(
                        e < 1e-4,
                        "{case} {name} {part}: relative gradient error {e}"
                    );
                    checked += 1;
                }
            }
        }
        // Inference: the same value, nothing recorded.
        let t3 = Tape::inference();
        let l3 = model.loss(&t3, &ids, &labels, batch, seq, true).unwrap();
        assert_eq!(l3.scalar().unwrap(), b);
        assert!(t3.is_empty());
    }
    assert!(checked > 20);
}
