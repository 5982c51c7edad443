use lora_kernels::workload::*;
use std::time::Instant;
fn main() {
    let mut g = GemmWorkload::new(2048);
    let mut tg = vec![]; for _ in 0..7 { let t = Instant::now(); g.step().unwrap(); tg.push(t.elapsed().as_secs_f64()); }
    tg.sort_by(|a,b| a.partial_cmp(b).unwrap());
    println!("gemm 2048^3: {:.1} GFLOP/s", g.flops()/tg[3]/1e9);
    for &(n,k,m,r) in &[(2048,768,768,8),(2048,768,3072,16),(4096,2048,2048,16),(512,4096,4096,64)] {
        let mut l = LinearWorkload::new(n,k,m,r,false,1);
        let mut b = LinearWorkload::new(n,k,m,0,false,1);
        l.step().unwrap(); b.step().unwrap();
        let (mut tl, mut tb, mut ratio) = (vec![], vec![], vec![]);
        for _ in 0..15 {
            let t = Instant::now(); l.step().unwrap(); let a = t.elapsed().as_secs_f64();
            let t = Instant::now(); b.step().unwrap(); let c = t.elapsed().as_secs_f64();
            tl.push(a); tb.push(c); ratio.push(a/c);
        }
        for v in [&mut tl, &mut tb, &mut ratio] { v.sort_by(|a,b| a.partial_cmp(b).unwrap()); }
        println!("{n}x{k}x{m} r{r}: lora {:.2} ms ({:.0} GF/s) base {:.2} ms ({:.0} GF/s) overhead(med of ratios) {:.1}%", tl[7]*1e3, l.flops()/tl[7]/1e9, tb[7]*1e3, b.flops()/tb[7]/1e9, (ratio[7]-1.0)*100.0);
    }
}
