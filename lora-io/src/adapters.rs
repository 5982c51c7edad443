//! Several adapters on one model: load each under a name, make one active, disable all, delete.
//! Switching only moves tensor handles between the model's linear slots and this set (no
//! weights are copied or reloaded).

use crate::error::{IoError, Result};
use crate::peft::{load_adapter, PeftConfig};
use lora_core::lora::LoraLinear;
use lora_core::models::{CausalLm, Linear};
use std::collections::BTreeMap;
use std::path::Path;

/// Named adapters for one model.
#[derive(Default)]
pub struct AdapterSet {
    adapters: BTreeMap<String, (PeftConfig, BTreeMap<String, LoraLinear>)>,
    active: Option<String>,
}

fn strip(model: &mut dyn CausalLm) {
    for (_, lin) in model.linears_mut() {
        if let Linear::Lora(l) = lin {
            *lin = Linear::frozen(l.weight.clone(), l.layout, l.bias.clone());
        }
    }
}

impl AdapterSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names of the loaded adapters, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.keys().map(|s| s.as_str()).collect()
    }

    /// The active adapter, if any.
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Loads the PEFT adapter in `dir` as `name` (an existing name is an error). The active
    /// adapter does not change.
    pub fn load(&mut self, model: &mut dyn CausalLm, name: &str, dir: &Path) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(IoError::Config {
                path: dir.into(),
                field: "name".into(),
                reason: format!("an adapter named `{name}` is already loaded"),
            });
        }
        strip(model);
        let loaded = load_adapter(model, dir);
        let taken: BTreeMap<String, LoraLinear> = model
            .linears()
            .into_iter()
            .filter_map(|(n, l)| l.lora().map(|l| (n, l.clone())))
            .collect();
        strip(model);
        let restore = self.active.clone();
        match loaded {
            Ok(cfg) => {
                self.adapters.insert(name.to_string(), (cfg, taken));
                self.set_active(model, restore.as_deref())
            }
            Err(e) => {
                self.set_active(model, restore.as_deref())?;
                Err(e)
            }
        }
    }

    /// Makes `name` the adapter used by forward passes; `None` disables all adapters.
    pub fn set_active(&mut self, model: &mut dyn CausalLm, name: Option<&str>) -> Result<()> {
        strip(model);
        self.active = None;
        let Some(name) = name else { return Ok(()) };
        let (_, layers) = self.adapters.get(name).ok_or_else(|| IoError::Config {
            path: "adapters".into(),
            field: "name".into(),
            reason: format!("no adapter named `{name}` (loaded: {:?})", self.names()),
        })?;
        for (module, lin) in model.linears_mut() {
            if let Some(l) = layers.get(&module) {
                *lin = Linear::Lora(l.clone());
            }
        }
        self.active = Some(name.to_string());
        Ok(())
    }

    /// Removes `name`; if it was active, the model is left with no adapter.
    pub fn delete(&mut self, model: &mut dyn CausalLm, name: &str) -> Result<()> {
        if self.adapters.remove(name).is_none() {
            return Err(IoError::Config {
                path: "adapters".into(),
                field: "name".into(),
                reason: format!("no adapter named `{name}`"),
            });
        }
        if self.active.as_deref() == Some(name) {
            self.set_active(model, None)?;
        }
        Ok(())
    }

    /// The config an adapter was loaded with.
    pub fn config(&self, name: &str) -> Option<&PeftConfig> {
        self.adapters.get(name).map(|(c, _)| c)
    }
}
