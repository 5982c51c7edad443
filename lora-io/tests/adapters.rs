//! Several adapters on one model: switching gives each adapter's own outputs, disabling gives
//! the base model's, deleting the active one disables it.

use lora_core::models::CausalLm;
use lora_core::Tape;
use lora_io::adapters::AdapterSet;
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/llama_gqa")
}

fn logits(m: &dyn CausalLm) -> Vec<f32> {
    let ids: Vec<u32> = (0..10).map(|i| (i * 37 + 5) % 300).collect();
    m.forward(&Tape::inference(), &ids, 2, 5, true)
        .unwrap()
        .to_vec()
}

fn alone(dir: &str) -> Vec<f32> {
    let mut m = ModelDir::open(root().join("model"))
        .unwrap()
        .load_model()
        .unwrap();
    if !dir.is_empty() {
        load_adapter(m.as_mut(), &root().join(dir)).unwrap();
    }
    logits(m.as_ref())
}

#[test]
fn load_switch_disable_delete() {
    let (one, two, base) = (alone("adapter"), alone("adapter2"), alone(""));
    let mut m = ModelDir::open(root().join("model"))
        .unwrap()
        .load_model()
        .unwrap();
    let mut set = AdapterSet::new();
    set.load(m.as_mut(), "one", &root().join("adapter"))
        .unwrap();
    set.load(m.as_mut(), "two", &root().join("adapter2"))
        .unwrap();
    assert_eq!(set.names(), ["one", "two"]);
    assert_eq!(set.active(), None);
    assert_eq!(logits(m.as_ref()), base, "nothing active after loading");
    set.set_active(m.as_mut(), Some("two")).unwrap();
    assert_eq!(logits(m.as_ref()), two);
    set.set_active(m.as_mut(), Some("one")).unwrap();
    assert_eq!(logits(m.as_ref()), one);
    set.set_active(m.as_mut(), None).unwrap();
    assert_eq!(logits(m.as_ref()), base);
    set.set_active(m.as_mut(), Some("one")).unwrap();
    set.delete(m.as_mut(), "one").unwrap();
    assert_eq!((set.active(), set.names()), (None, vec!["two"]));
    assert_eq!(logits(m.as_ref()), base);
    assert!(set
        .set_active(m.as_mut(), Some("one"))
        .unwrap_err()
        .to_string()
        .contains("no adapter named `one`"));
    assert!(set
        .load(m.as_mut(), "two", &root().join("adapter"))
        .unwrap_err()
        .to_string()
        .contains("already loaded"));
    // A failed load leaves the set and the model as they were.
    set.set_active(m.as_mut(), Some("two")).unwrap();
    assert!(set.load(m.as_mut(), "bad", &root().join("model")).is_err());
    assert_eq!(set.active(), Some("two"));
    assert_eq!(logits(m.as_ref()), two);
}
