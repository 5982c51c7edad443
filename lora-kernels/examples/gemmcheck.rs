use std::time::Instant;
fn main() {
    let n = 2048usize;
    let a = vec![1.0f32; n*n]; let b = vec![1.0f32; n*n]; let mut c = vec![0.0f32; n*n];
    for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
        for _ in 0..3 {
            let t = Instant::now();
            unsafe { gemm::gemm(n,n,n,c.as_mut_ptr(),1,n as isize,false,a.as_ptr(),1,n as isize,b.as_ptr(),1,n as isize,1.0,1.0,false,false,false,par); }
            let s = t.elapsed().as_secs_f64();
            println!("{:?} {:.1} GF/s", par, 2.0*(n as f64).powi(3)/s/1e9);
        }
    }
}
