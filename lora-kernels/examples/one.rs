use lora_kernels::workload::*;
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let mut l = LinearWorkload::new(a[0],a[1],a[2],a[3],false,1);
    for _ in 0..a[4] { l.step().unwrap(); }
}
