//! Home of the criterion benchmarks (`benches/`). The workloads themselves live in
//! `lora_kernels::workload` so `lora bench` measures exactly the same thing.
