//! Every method of the backend trait ([`Accel`]) on the CUDA device against the CPU backend on
//! the same seeded inputs: odd sizes, both weight layouts, 16-bit weights, bias, dropout, GQA,
//! ignored targets, bf16 and f16 bits. The CUDA device poisons the outputs its kernels must
//! write (NaN), so an element left unwritten fails. This is the layer the training step calls,
//! so it checks the argument plumbing of `cuda_accel.rs` as well as the kernels. Needs a GPU:
//! where no CUDA device answers it says it was skipped; on the CPU alone it still runs the CPU
//! side (every call's argument checks).

#![cfg(feature = "cuda")]

mod common;

use lora_kernels::accel::{Accel, DBuf, DWeight, LinearGradBufs, LoraBufs, Unary};
use lora_kernels::cpu::Cpu;
use lora_kernels::lora_linear::{Dropout, LinearDims, WeightLayout};
use lora_kernels::ops::adamw::AdamStep;
use lora_kernels::ops::attention::AttnDims;
use lora_kernels::rng::Rng;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect()
}

/// Runs every backend method; returns each result as (name, host values).
fn run_all(a: &dyn Accel) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let up = |v: &[f32]| a.upload(v).unwrap();
    let down = |b: &DBuf| a.download(b).unwrap();
    let (n, c) = (7usize, 45usize);
    let x = up(&rand(n * c, 1));
    let y = up(&rand(n * c, 2));
    let dout = up(&rand(n * c, 3));
    out.push(("add".into(), down(&a.add(&x, &y).unwrap())));
    let mut acc = a.copy(&x).unwrap();
    a.accumulate(&mut acc, &y).unwrap();
    a.scale(&mut acc, -0.37).unwrap();
    out.push(("accumulate+scale".into(), down(&acc)));
    out.push((
        "sum_squares".into(),
        vec![a.sum_squares(&x).unwrap() as f32],
    ));
    // Several buffers at once (one block each on CUDA): 1, 255..257, a large one. (Empty
    // buffers are covered by the CUDA shim check, scripts/cuda_emu/check.py.)
    let bufs: Vec<DBuf> = [1usize, 255, 256, 257, 70_001]
        .iter()
        .enumerate()
        .map(|(i, &len)| up(&rand(len, 40 + i as u64)))
        .collect();
    let many = a
        .sum_squares_many(&bufs.iter().collect::<Vec<_>>())
        .unwrap();
    assert_eq!(many.len(), bufs.len());
    for (b, s) in bufs.iter().zip(&many) {
        assert_eq!(
            *s,
            a.sum_squares(b).unwrap(),
            "many and one agree bit for bit"
        );
    }
    out.push((
        "sum_squares_many".into(),
        many.iter().map(|&v| v as f32).collect(),
    ));
    let part = a.copy_range(&x, 10, 20).unwrap();
    out.push(("copy_range".into(), down(&part)));
    let mut dst = up(&rand(n * c, 31));
    a.write_range(&mut dst, 5, &part).unwrap();
    out.push(("write_range".into(), down(&dst)));
    assert!(a.copy_range(&x, n * c - 3, 4).is_err(), "out of range");
    for f in [
        Unary::Gelu,
        Unary::GeluErf,
        Unary::Silu,
        Unary::Relu,
        Unary::Sigmoid,
    ] {
        out.push((format!("{f:?} fwd"), down(&a.unary_forward(f, &x).unwrap())));
        let mut dx = up(&rand(n * c, 4));
        a.unary_backward(f, &mut dx, &dout, &x).unwrap();
        out.push((format!("{f:?} bwd"), down(&dx)));
    }
    out.push((
        "swiglu fwd".into(),
        down(&a.swiglu_forward(&x, &y).unwrap()),
    ));
    let (mut dg, mut du) = (a.zeros(n * c).unwrap(), up(&rand(n * c, 5)));
    a.swiglu_backward(&mut dg, &mut du, &dout, &x, &y).unwrap();
    out.push(("swiglu dgate".into(), down(&dg)));
    out.push(("swiglu dup".into(), down(&du)));

    let gamma = up(&rand(c, 6));
    let beta = up(&rand(c, 7));
    let [ln, mean, rstd] = a
        .layernorm_forward(&x, &gamma, Some(&beta), c, 1e-5)
        .unwrap();
    out.push(("layernorm out".into(), down(&ln)));
    let (mut dx, mut dgm, mut dbt) = (
        a.zeros(n * c).unwrap(),
        a.zeros(c).unwrap(),
        a.zeros(c).unwrap(),
    );
    a.layernorm_backward(
        Some(&mut dx),
        Some(&mut dgm),
        Some(&mut dbt),
        &dout,
        &x,
        &gamma,
        &mean,
        &rstd,
        c,
    )
    .unwrap();
    out.push(("layernorm dx".into(), down(&dx)));
    out.push(("layernorm dgamma".into(), down(&dgm)));
    out.push(("layernorm dbeta".into(), down(&dbt)));
    let [rms, rr] = a.rmsnorm_forward(&x, &gamma, c, 1e-6).unwrap();
    out.push(("rmsnorm out".into(), down(&rms)));
    let (mut dx, mut dgm) = (a.zeros(n * c).unwrap(), a.zeros(c).unwrap());
    a.rmsnorm_backward(Some(&mut dx), Some(&mut dgm), &dout, &x, &gamma, &rr, c)
        .unwrap();
    out.push(("rmsnorm dx".into(), down(&dx)));
    out.push(("rmsnorm dgamma".into(), down(&dgm)));

    let (v, ids) = (33usize, [0u32, 5, 32, 5, 17, 1, 9]);
    let table = up(&rand(v * c, 8));
    out.push((
        "embedding".into(),
        down(&a.embedding_forward(DWeight::F32(&table), &ids, c).unwrap()),
    ));
    let tbits: Vec<u16> = down(&table)
        .iter()
        .map(|&v| (v.to_bits() >> 16) as u16)
        .collect();
    let tb = a.upload_bits(&tbits).unwrap();
    let th = DWeight::Half(&tb, lora_kernels::accel::HalfFormat::Bf16);
    out.push((
        "embedding (bf16 table)".into(),
        down(&a.embedding_forward(th, &ids, c).unwrap()),
    ));
    // A grouped, strided, padded, dilated convolution with bias, and its gradients.
    let cd = lora_kernels::ops::conv::Conv2dDims {
        batch: 2,
        in_ch: 4,
        h: 9,
        w: 7,
        out_ch: 6,
        kh: 3,
        kw: 2,
        stride: (2, 1),
        padding: (1, 1),
        dilation: (1, 2),
        groups: 2,
    };
    let (cx, cw) = (up(&rand(cd.x_len(), 42)), up(&rand(cd.w_len(), 43)));
    let (cb, cdy) = (up(&rand(6, 44)), up(&rand(cd.y_len(), 45)));
    out.push((
        "conv2d y".into(),
        down(&a.conv2d_forward(&cx, &cw, Some(&cb), cd).unwrap()),
    ));
    let (mut cdx, mut cdw, mut cdb) = (
        up(&rand(cd.x_len(), 46)),
        up(&rand(cd.w_len(), 47)),
        up(&rand(6, 48)),
    );
    let g = lora_kernels::accel::ConvGrads {
        dx: Some(&mut cdx),
        dw: Some(&mut cdw),
        dbias: Some(&mut cdb),
    };
    a.conv2d_backward(g, &cdy, &cx, &cw, cd).unwrap();
    out.push(("conv2d dx".into(), down(&cdx)));
    out.push(("conv2d dw".into(), down(&cdw)));
    out.push(("conv2d dbias".into(), down(&cdb)));
    // dx alone, with no input kept (the tape's empty placeholder).
    let mut cdx = up(&rand(cd.x_len(), 49));
    let g = lora_kernels::accel::ConvGrads {
        dx: Some(&mut cdx),
        ..Default::default()
    };
    a.conv2d_backward(g, &cdy, &DBuf::Host(Vec::new()), &cw, cd)
        .unwrap();
    out.push(("conv2d dx (no x)".into(), down(&cdx)));
    // Batch norm (eval), max pooling (ResNet's 3x3 s2 p1) and adaptive average pooling.
    let (bn, bc, bp) = (2usize, 3usize, 35usize);
    let bx = up(&rand(bn * bc * bp, 52));
    let (bm, bg, bb) = (up(&rand(bc, 53)), up(&rand(bc, 54)), up(&rand(bc, 55)));
    let bv = up(&[0.5, 1.5, 0.25]);
    out.push((
        "batchnorm y".into(),
        down(
            &a.batchnorm_forward(&bx, &bm, &bv, &bg, &bb, (bn, bc, bp), 1e-5)
                .unwrap(),
        ),
    ));
    let bdy = up(&rand(bn * bc * bp, 56));
    let (mut bdx, mut bdg, mut bdb) = (
        up(&rand(bn * bc * bp, 57)),
        up(&rand(bc, 58)),
        up(&rand(bc, 59)),
    );
    a.batchnorm_backward(
        Some(&mut bdx),
        Some(&mut bdg),
        Some(&mut bdb),
        &bdy,
        &bx,
        &bm,
        &bv,
        &bg,
        (bn, bc, bp),
        1e-5,
    )
    .unwrap();
    out.push(("batchnorm dx".into(), down(&bdx)));
    out.push(("batchnorm dgamma".into(), down(&bdg)));
    out.push(("batchnorm dbeta".into(), down(&bdb)));
    let pd = lora_kernels::ops::pool::PoolDims {
        planes: bn * bc,
        h: 7,
        w: 5,
        kernel: (3, 3),
        stride: (2, 2),
        padding: (1, 1),
    };
    let py = a.max_pool2d_forward(&bx, pd).unwrap();
    out.push(("max_pool2d y".into(), down(&py)));
    let pdy = up(&rand(py.len(), 60));
    let mut pdx = up(&rand(bx.len(), 61));
    a.max_pool2d_backward(&mut pdx, &pdy, &bx, pd).unwrap();
    out.push(("max_pool2d dx".into(), down(&pdx)));
    let ay = a
        .adaptive_avg_pool2d_forward(&bx, bn * bc, (7, 5), (3, 2))
        .unwrap();
    out.push(("adaptive_avg_pool2d y".into(), down(&ay)));
    let ady = up(&rand(ay.len(), 62));
    let mut adx = up(&rand(bx.len(), 63));
    a.adaptive_avg_pool2d_backward(&mut adx, &ady, bn * bc, (7, 5), (3, 2))
        .unwrap();
    out.push(("adaptive_avg_pool2d dx".into(), down(&adx)));
    // The table's gradient: repeated ids add up, onto what the buffer held.
    let mut dtable = up(&rand(v * c, 13));
    a.embedding_backward(&mut dtable, &dout, &ids, c).unwrap();
    out.push(("embedding dtable".into(), down(&dtable)));

    // RoPE: 3 heads of 8 over 7 rows, tables for 12 positions.
    let (h, d) = (3usize, 8usize);
    let cos = up(&rand(12 * d / 2, 9));
    let sin = up(&rand(12 * d / 2, 10));
    let pos = [0u32, 3, 11, 2, 2, 7, 1];
    let xr = up(&rand(n * h * d, 11));
    let mut r = a.zeros(n * h * d).unwrap();
    a.rope(false, &mut r, &xr, &cos, &sin, &pos, h, d).unwrap();
    out.push(("rope fwd".into(), down(&r)));
    let mut dr = up(&rand(n * h * d, 12));
    a.rope(true, &mut dr, &xr, &cos, &sin, &pos, h, d).unwrap();
    out.push(("rope bwd".into(), down(&dr)));

    // Attention: B 2, T 5, 4 query heads over 2 kv heads, D 8; and cross-attention to S 3.
    for (causal, s) in [(true, 5), (false, 5), (false, 3)] {
        let tag = match (causal, s) {
            (true, _) => "",
            (false, 5) => " (bidirectional)",
            _ => " (cross)",
        };
        let ad = AttnDims {
            kv_seq: s,
            ..AttnDims::self_attn(2, 5, (4, 2, 8), causal)
        };
        let (qn, kn) = (2 * 5 * 4 * 8, 2 * s * 2 * 8);
        let (q, k, vv) = (up(&rand(qn, 13)), up(&rand(kn, 14)), up(&rand(kn, 15)));
        let [o, lse] = a.attention_forward(&q, &k, &vv, ad, 0.35).unwrap();
        out.push((format!("attention out{tag}"), down(&o)));
        out.push((format!("attention lse{tag}"), down(&lse)));
        let (mut dq, mut dk, mut dv) = (
            a.zeros(qn).unwrap(),
            a.zeros(kn).unwrap(),
            a.zeros(kn).unwrap(),
        );
        let dout_a = up(&rand(qn, 16));
        a.attention_backward(
            &mut dq, &mut dk, &mut dv, &dout_a, &lse, &q, &k, &vv, ad, 0.35,
        )
        .unwrap();
        out.push((format!("attention dq{tag}"), down(&dq)));
        out.push((format!("attention dk{tag}"), down(&dk)));
        out.push((format!("attention dv{tag}"), down(&dv)));
    }

    let mut nr = a.zeros(n * 10).unwrap();
    a.narrow(true, &mut nr, &x, n, c, 30, 10).unwrap();
    out.push(("narrow fwd".into(), down(&nr)));
    let mut dn = up(&rand(n * c, 17));
    a.narrow(false, &mut dn, &nr, n, c, 30, 10).unwrap();
    out.push(("narrow bwd".into(), down(&dn)));
    let mut tr = a.zeros(n * c).unwrap();
    a.transpose(&mut tr, &x, 1, n, c, false).unwrap();
    out.push(("transpose".into(), down(&tr)));
    let mut tb = up(&rand(n * c, 23));
    a.transpose(&mut tb, &tr, 1, c, n, true).unwrap();
    out.push(("transpose (acc)".into(), down(&tb)));
    // Box losses of 5 matched pairs: boxes built from random values in a valid range.
    let bx = |seed| -> Vec<f32> {
        rand(20, seed)
            .chunks(4)
            .flat_map(|v| {
                [
                    0.5 + 0.3 * v[0],
                    0.5 + 0.3 * v[1],
                    0.3 + 0.2 * v[2].abs(),
                    0.3 + 0.2 * v[3].abs(),
                ]
            })
            .collect()
    };
    let (bp, bt) = (up(&bx(24)), up(&bx(25)));
    let bl = a.box_losses_forward(&bp, &bt, 4.0).unwrap();
    out.push(("box losses".into(), down(&bl)));
    let mut dbp = up(&rand(20, 26));
    a.box_losses_backward(&mut dbp, &up(&[0.7, -1.3]), &bp, &bt, 4.0)
        .unwrap();
    out.push(("box losses backward".into(), down(&dbp)));

    // The LoRA linear: 7 tokens, 45 -> 33, rank 3, both layouts, bias, dropout 0.25.
    let (m, rank) = (33usize, 3usize);
    let dims = LinearDims {
        tokens: n,
        inp: c,
        out: m,
    };
    let w = up(&rand(m * c, 18));
    let bias = up(&rand(m, 19));
    let (la, lb) = (up(&rand(rank * c, 20)), up(&rand(m * rank, 21)));
    let dy = up(&rand(n * m, 22));
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let (yb, _) = a
            .linear_forward(&x, DWeight::F32(&w), layout, Some(&bias), None, dims)
            .unwrap();
        out.push((format!("linear {layout:?} y (frozen)"), down(&yb)));
        let mut dx = up(&rand(n * c, 23));
        let g = LinearGradBufs {
            dx: Some(&mut dx),
            ..Default::default()
        };
        a.linear_backward(g, &dy, &x, DWeight::F32(&w), layout, None, None, dims)
            .unwrap();
        out.push((format!("linear {layout:?} dx (frozen)"), down(&dx)));
        // A frozen bf16 weight read as stored (the CPU widens panel by panel, CUDA per product).
        let wbits: Vec<u16> = down(&w)
            .iter()
            .map(|&v| (v.to_bits() >> 16) as u16)
            .collect();
        let wb = a.upload_bits(&wbits).unwrap();
        let wh = DWeight::Half(&wb, lora_kernels::accel::HalfFormat::Bf16);
        let (yh, _) = a
            .linear_forward(&x, wh, layout, Some(&bias), None, dims)
            .unwrap();
        out.push((format!("linear {layout:?} y (bf16 weight)"), down(&yh)));
        let mut dx = up(&rand(n * c, 41));
        let g = LinearGradBufs {
            dx: Some(&mut dx),
            ..Default::default()
        };
        a.linear_backward(g, &dy, &x, wh, layout, None, None, dims)
            .unwrap();
        out.push((format!("linear {layout:?} dx (bf16 weight)"), down(&dx)));
        // No adapter, trainable weight and bias (full fine-tuning): dw and the column sums.
        let (mut dx, mut dw, mut dbias) =
            (up(&rand(n * c, 37)), up(&rand(m * c, 38)), up(&rand(m, 39)));
        let g = LinearGradBufs {
            dx: Some(&mut dx),
            dw: Some(&mut dw),
            dbias: Some(&mut dbias),
            ..Default::default()
        };
        a.linear_backward(g, &dy, &x, DWeight::F32(&w), layout, None, None, dims)
            .unwrap();
        out.push((format!("linear {layout:?} dx (full)"), down(&dx)));
        out.push((format!("linear {layout:?} dw (full)"), down(&dw)));
        out.push((format!("linear {layout:?} dbias (full)"), down(&dbias)));
        let lora = LoraBufs {
            a: &la,
            b: &lb,
            rank,
            scale: 1.7,
            dropout: Some(Dropout { p: 0.25, seed: 99 }),
        };
        let (yl, u) = a
            .linear_forward(&x, DWeight::F32(&w), layout, Some(&bias), Some(lora), dims)
            .unwrap();
        let u = u.unwrap();
        out.push((format!("linear {layout:?} y"), down(&yl)));
        out.push((format!("linear {layout:?} u"), down(&u)));
        // Every gradient accumulates into a buffer that already holds values.
        let (mut dx, mut dw, mut da, mut db, mut dbias) = (
            up(&rand(n * c, 32)),
            up(&rand(m * c, 40)),
            up(&rand(rank * c, 33)),
            up(&rand(m * rank, 24)),
            up(&rand(m, 34)),
        );
        let g = LinearGradBufs {
            dx: Some(&mut dx),
            dw: Some(&mut dw),
            dbias: Some(&mut dbias),
            da: Some(&mut da),
            db: Some(&mut db),
        };
        a.linear_backward(
            g,
            &dy,
            &x,
            DWeight::F32(&w),
            layout,
            Some(lora),
            Some(&u),
            dims,
        )
        .unwrap();
        out.push((format!("linear {layout:?} dx"), down(&dx)));
        out.push((format!("linear {layout:?} dw"), down(&dw)));
        out.push((format!("linear {layout:?} dA"), down(&da)));
        out.push((format!("linear {layout:?} dB"), down(&db)));
        out.push((format!("linear {layout:?} dbias"), down(&dbias)));
        // A first layer (its input needs no gradient) with a frozen bias: adapter grads only.
        let (mut da, mut db) = (up(&rand(rank * c, 35)), up(&rand(m * rank, 36)));
        let g = LinearGradBufs {
            da: Some(&mut da),
            db: Some(&mut db),
            ..Default::default()
        };
        a.linear_backward(
            g,
            &dy,
            &x,
            DWeight::F32(&w),
            layout,
            Some(lora),
            Some(&u),
            dims,
        )
        .unwrap();
        out.push((format!("linear {layout:?} dA (no dx)"), down(&da)));
        out.push((format!("linear {layout:?} dB (no dx)"), down(&db)));
        // A frozen (LoRA-FA): the tape keeps no x and passes an empty host placeholder.
        let (mut dx, mut db) = (up(&rand(n * c, 50)), up(&rand(m * rank, 51)));
        let g = LinearGradBufs {
            dx: Some(&mut dx),
            db: Some(&mut db),
            ..Default::default()
        };
        let none = DBuf::Host(Vec::new());
        a.linear_backward(
            g,
            &dy,
            &none,
            DWeight::F32(&w),
            layout,
            Some(lora),
            Some(&u),
            dims,
        )
        .unwrap();
        out.push((format!("linear {layout:?} dx (A frozen)"), down(&dx)));
        out.push((format!("linear {layout:?} dB (A frozen)"), down(&db)));
    }

    // Cross-entropy with an ignored row, and the fused head.
    let targets = [3i32, -100, 32, 0, 7, 7, 12];
    let logits = up(&rand(n * v, 25));
    let (loss, count, lse) = a.cross_entropy_forward(&logits, &targets, v).unwrap();
    assert_eq!(count, 6);
    out.push(("ce loss".into(), vec![loss]));
    out.push(("ce lse".into(), down(&lse)));
    let mut dl = a.zeros(n * v).unwrap();
    a.cross_entropy_backward(&mut dl, 0.5, &logits, &lse, &targets, v, count)
        .unwrap();
    out.push(("ce dlogits".into(), down(&dl)));
    let head = up(&rand(v * c, 26));
    let h = a
        .linear_cross_entropy(&x, DWeight::F32(&head), &targets, c, v, true, true)
        .unwrap();
    assert_eq!(h.count, 6);
    out.push(("head loss".into(), vec![h.loss]));
    out.push(("head dx".into(), down(&h.dx.unwrap())));
    out.push(("head dw".into(), down(&h.dw.unwrap())));
    let h = a
        .linear_cross_entropy(&x, DWeight::F32(&head), &targets, c, v, false, false)
        .unwrap();
    assert!(h.dx.is_none() && h.dw.is_none());
    out.push(("head loss (no grads)".into(), vec![h.loss]));

    // 16-bit widening: every bf16 pattern class and f16 subnormals, infinities, NaN.
    let bits: Vec<u16> = (0..4096u32).map(|i| (i * 16 + 3) as u16).collect();
    let b = a.upload_bits(&bits).unwrap();
    for f16 in [false, true] {
        let wv = down(&a.widen(&b, f16).unwrap());
        // NaN payloads compare unequal: map them to a sentinel.
        let wv = wv
            .iter()
            .map(|x| if x.is_nan() { 12345.0 } else { *x })
            .collect();
        out.push((format!("widen f16={f16}"), wv));
    }

    let (mut p, mut m1, mut m2) = (up(&rand(50, 27)), up(&rand(50, 28)), up(&rand(50, 29)));
    // Second moments are non-negative.
    m2 = up(&down(&m2).iter().map(|v| v.abs()).collect::<Vec<_>>());
    let g = up(&rand(50, 30));
    let h = AdamStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 4,
    };
    a.adamw(&mut p, &g, &mut m1, &mut m2, h).unwrap();
    out.push(("adamw p".into(), down(&p)));
    out.push(("adamw m".into(), down(&m1)));
    out.push(("adamw v".into(), down(&m2)));
    a.synchronize().unwrap();
    out
}

#[test]
fn every_backend_method_on_cuda_matches_the_cpu_backend() {
    let host = run_all(&Cpu);
    assert!(host.iter().all(|(_, v)| !v.is_empty()));
    if !common::gpu_present() {
        return; // the host side ran
    }
    let mut dev = lora_kernels::cuda::CudaDevice::open(0).expect("open cuda:0");
    dev.poison = true;
    let gpu = run_all(&dev);
    let mut worst = 0.0f32;
    for ((name, h), (_, g)) in host.iter().zip(&gpu) {
        assert_eq!(h.len(), g.len(), "{name}");
        assert!(
            g.iter().all(|v| !v.is_nan()),
            "{name}: an element was not written"
        );
        let scale = h.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let e = h
            .iter()
            .zip(g)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        println!("{name:<28} max relative difference {e:.2e}");
        worst = worst.max(e);
        assert!(e <= 2e-5, "{name}: relative difference {e:.2e}");
    }
    println!("worst {worst:.2e} over {} results", host.len());
}
