//! 2-D convolution (NCHW), PyTorch's `conv2d`.

use super::*;
use lora_kernels::ops::conv::Conv2dDims;
pub use lora_kernels::ops::conv::Conv2dParams;

fn four(op: &'static str, what: &'static str, t: &Tensor, layout: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape()).map_err(|_| shape_err(op, what, t, layout))
}

/// `conv2d(x, w) + bias`: `x` `(N, C, H, W)`, `w` `(O, C/groups, KH, KW)`, `bias` `(O)`, with
/// `p`'s stride, zero padding, dilation and groups; the output is `(N, O, OH, OW)`.
pub fn conv2d(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let xs = four(OP, "x", x, "(N, C, H, W)")?;
    let ws = four(OP, "w", w, "(O, C/groups, KH, KW)")?;
    let d = Conv2dDims::new(xs, ws, p)?;
    if let Some(b) = bias {
        check_vec(OP, "bias", b, ws[0])?;
    }
    let mut operands = vec![("x", x), ("w", w)];
    operands.extend(bias.map(|b| ("bias", b)));
    let on = placement(OP, &operands)?;
    // A frozen 16-bit weight (an fp16 checkpoint's) is widened for this product only.
    let (gx, gw) = (read(x)?, w.read_transient()?);
    let gb = bias.map(read).transpose()?;
    let bb = gb.as_ref().map(f32_of).transpose()?;
    let y = on.accel.conv2d_forward(f32_of(&gx)?, f32_of(&gw)?, bb, d)?;
    drop((gx, gw, gb));
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(bias.cloned());
    let requires = inputs.iter().any(|t| t.requires_grad());
    let y = on.tensor(y, &d.out_shape(), requires)?;
    let node = Conv2dNode {
        d,
        has_bias: bias.is_some(),
    };
    on.record(tape, node, inputs, &y);
    Ok(y)
}

/// `(conv2d(x, w) + bias, conv2d(x, a))` with the same params and `groups == 1`: a conv LoRA's
/// base convolution and its `lora_A` (`a` `(R, C, KH, KW)`), computed together where the
/// backend can share their input patches (the CPU's im2col), recorded as the two convolutions
/// they are, so each output's backward is exactly [`conv2d`]'s.
pub fn conv2d_pair(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    p: Conv2dParams,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "conv2d_pair";
    let xs = four(OP, "x", x, "(N, C, H, W)")?;
    let ws = four(OP, "w", w, "(O, C, KH, KW)")?;
    if p.groups != 1 {
        return Err(shape_err(
            OP,
            "w",
            w,
            format!("an ungrouped convolution's weight (groups {})", p.groups),
        ));
    }
    let as_ = four(OP, "a", a, "(R, C, KH, KW)")?;
    if as_[1..] != ws[1..] {
        return Err(shape_err(
            OP,
            "a",
            a,
            format!("[rank, {}, {}, {}]", ws[1], ws[2], ws[3]),
        ));
    }
    let d = Conv2dDims::new(xs, ws, p)?;
    let da = Conv2dDims::new(xs, as_, p)?;
    if let Some(b) = bias {
        check_vec(OP, "bias", b, ws[0])?;
    }
    let mut operands = vec![("x", x), ("w", w), ("a", a)];
    operands.extend(bias.map(|b| ("bias", b)));
    let on = placement(OP, &operands)?;
    let (gx, gw, ga) = (read(x)?, w.read_transient()?, read(a)?);
    let gb = bias.map(read).transpose()?;
    let bb = gb.as_ref().map(f32_of).transpose()?;
    let [y, h] = on
        .accel
        .conv2d_pair_forward(f32_of(&gx)?, f32_of(&gw)?, f32_of(&ga)?, bb, d)?;
    drop((gx, gw, ga, gb));
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(bias.cloned());
    let requires = inputs.iter().any(|t| t.requires_grad());
    let y = on.tensor(y, &d.out_shape(), requires)?;
    let node = Conv2dNode {
        d,
        has_bias: bias.is_some(),
    };
    on.record(tape, node, inputs, &y);
    let h = on.tensor(h, &da.out_shape(), x.requires_grad() || a.requires_grad())?;
    let node = Conv2dNode {
        d: da,
        has_bias: false,
    };
    on.record(tape, node, vec![x.clone(), a.clone()], &h);
    Ok((y, h))
}

/// [x, w, (bias)]
struct Conv2dNode {
    d: Conv2dDims,
    has_bias: bool,
}

impl OpNode for Conv2dNode {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn reads_transient(&self, i: usize) -> bool {
        i == 1
    }
    /// dW reads x; dx reads w. The weight is kept (it is alive anyway); x, an activation, only
    /// when the weight trains.
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool {
        match i {
            0 => inputs[1].requires_grad(),
            1 => true,
            _ => false,
        }
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let grads = lora_kernels::accel::ConvGrads {
            dx: g.take(0),
            dw: g.take(1),
            dbias: if self.has_bias { g.take(2) } else { None },
        };
        a.conv2d_backward(grads, dout, data[0], data[1], self.d)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// Loss and every gradient on each backend equal the CPU's, the gradients agree with finite
    /// differences of the loss, x is kept only when the weight trains, and bad shapes are named
    /// errors.
    #[test]
    fn conv2d_trains_its_weight_bias_and_input() {
        let p = Conv2dParams {
            stride: (2, 1),
            padding: (1, 0),
            dilation: (1, 1),
            groups: 2,
        };
        let mut r = lora_kernels::rng::Rng::new(4);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (xv, wv, bv) = (rand(2 * 4 * 5 * 6), rand(6 * 2 * 3 * 2), rand(6));
        // y is (2, 6, 3, 5): 36 rows of 5 logits.
        let targets: Vec<i32> = (0..36).map(|i| i * 7 % 5).collect();
        let run = |device: Device, vals: [&[f32]; 3], w_trains: bool| {
            let x0 = Tensor::new_on(vals[0].to_vec(), &[2, 4, 5, 6], true, device).unwrap();
            let w = Tensor::new_on(vals[1].to_vec(), &[6, 2, 3, 2], w_trains, device).unwrap();
            let b = Tensor::new_on(vals[2].to_vec(), &[6], true, device).unwrap();
            let tape = Tape::new(0);
            let x = crate::ops::gelu(&tape, &x0).unwrap(); // an activation the tape may drop
            let y = conv2d(&tape, &x, &w, Some(&b), p).unwrap();
            assert_eq!(y.shape(), [2, 6, 3, 5]);
            let loss = crate::ops::cross_entropy(&tape, &y, &targets).unwrap();
            let saved = tape.saved_elems();
            let l = loss.try_to_vec().unwrap()[0];
            let g = tape.backward(&loss).unwrap();
            let grads: Vec<Option<Vec<f32>>> =
                [&x0, &w, &b].iter().map(|t| g.to_vec(t).unwrap()).collect();
            (l, grads, saved)
        };
        let vals = [&xv[..], &wv[..], &bv[..]];
        let (l, g, saved) = run(Device::Cpu, vals, true);
        let (_, g_frozen, saved_frozen) = run(Device::Cpu, vals, false);
        assert!(g_frozen[1].is_none() && g_frozen[0].is_some());
        assert_eq!(saved - saved_frozen, 2 * 4 * 5 * 6, "x is kept for dW only");
        // Finite differences of the loss (f32, central, h = 1e-2) at a few elements of each.
        let h = 1e-2f32;
        for (which, idx) in [
            (0usize, [0usize, 77, 239]),
            (1, [0, 31, 71]),
            (2, [0, 3, 5]),
        ] {
            for i in idx {
                let mut plus: Vec<Vec<f32>> = vec![xv.clone(), wv.clone(), bv.clone()];
                let mut minus = plus.clone();
                plus[which][i] += h;
                minus[which][i] -= h;
                let lp = run(Device::Cpu, [&plus[0], &plus[1], &plus[2]], true).0;
                let lm = run(Device::Cpu, [&minus[0], &minus[1], &minus[2]], true).0;
                let fd = (lp - lm) / (2.0 * h);
                let got = g[which].as_ref().unwrap()[i];
                assert!(
                    (fd - got).abs() <= 2e-3 * got.abs().max(0.1),
                    "input {which}[{i}]: backward {got} vs finite differences {fd}"
                );
            }
        }
        for dev in crate::device::test_devices() {
            let (ld, gd, _) = run(dev, vals, true);
            crate::device::assert_close("loss", dev, &[ld], &[l]);
            for (i, (h, d)) in g.iter().zip(&gd).enumerate() {
                let (h, d) = (h.as_ref().unwrap(), d.as_ref().unwrap());
                crate::device::assert_close(&format!("input {i}"), dev, d, h);
            }
        }
        // Bad shapes: named.
        let x = Tensor::new(vec![0.0; 2 * 4 * 5 * 6], &[2, 4, 5, 6]).unwrap();
        let w = Tensor::new(vec![0.0; 6 * 3 * 3 * 2], &[6, 3, 3, 2]).unwrap();
        let e = conv2d(&Tape::new(0), &x, &w, None, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input channels per group"), "{e}");
        let flat = Tensor::new(vec![0.0; 8], &[2, 4]).unwrap();
        let e = conv2d(&Tape::new(0), &flat, &w, None, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(N, C, H, W)"), "{e}");
    }

    /// The pair records the two convolutions it computes: outputs, saved activations and every
    /// gradient (x, the trained A and bias, a trainable W) are bit for bit those of two
    /// `conv2d` calls, on every backend; a grouped convolution or an A of another kernel shape
    /// is a named error.
    #[test]
    fn conv2d_pair_is_two_convolutions() {
        let p = Conv2dParams {
            stride: (2, 1),
            padding: (1, 1),
            ..Conv2dParams::default()
        };
        let mut r = lora_kernels::rng::Rng::new(9);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (xv, wv, av, bv) = (
            rand(3 * 4 * 6 * 5),
            rand(5 * 4 * 3 * 3),
            rand(2 * 4 * 3 * 3),
            rand(5),
        );
        let (dy, dh) = (rand(3 * 5 * 3 * 5), rand(3 * 2 * 3 * 5));
        let run = |device: Device, pair: bool| {
            let t =
                |v: &[f32], s: &[usize], g: bool| Tensor::new_on(v.to_vec(), s, g, device).unwrap();
            let x0 = t(&xv, &[3, 4, 6, 5], true);
            let (w, a, b) = (
                t(&wv, &[5, 4, 3, 3], true),
                t(&av, &[2, 4, 3, 3], true),
                t(&bv, &[5], true),
            );
            let tape = Tape::new(0);
            let x = crate::ops::gelu(&tape, &x0).unwrap();
            let (y, h) = if pair {
                conv2d_pair(&tape, &x, &w, Some(&b), &a, p).unwrap()
            } else {
                (
                    conv2d(&tape, &x, &w, Some(&b), p).unwrap(),
                    conv2d(&tape, &x, &a, None, p).unwrap(),
                )
            };
            let y2 = crate::ops::reshape(&tape, &y, &[1, 225]).unwrap();
            let h2 = crate::ops::reshape(&tape, &h, &[1, 90]).unwrap();
            let both = crate::ops::concat(&tape, &y2, &h2, 1).unwrap();
            let saved = tape.saved_elems();
            let dout: Vec<f32> = dy.iter().chain(&dh).copied().collect();
            let g = tape.backward_with(&both, &dout).unwrap();
            let grads: Vec<Vec<f32>> = [&x0, &w, &a, &b]
                .iter()
                .map(|t| g.to_vec(t).unwrap().unwrap())
                .collect();
            (
                y.try_to_vec().unwrap(),
                h.try_to_vec().unwrap(),
                grads,
                saved,
            )
        };
        let want = run(Device::Cpu, false);
        assert_eq!(run(Device::Cpu, true), want);
        for dev in crate::device::test_devices() {
            let got = run(dev, true);
            crate::device::assert_close("y", dev, &got.0, &want.0);
            crate::device::assert_close("h", dev, &got.1, &want.1);
            for (i, (g, w)) in got.2.iter().zip(&want.2).enumerate() {
                crate::device::assert_close(&format!("gradient {i}"), dev, g, w);
            }
        }
        let x = Tensor::new(vec![0.0; 4 * 5 * 5], &[1, 4, 5, 5]).unwrap();
        let w = Tensor::new(vec![0.0; 4 * 2 * 9], &[4, 2, 3, 3]).unwrap();
        let a = Tensor::new(vec![0.0; 2 * 4 * 9], &[2, 4, 3, 3]).unwrap();
        let grouped = Conv2dParams {
            groups: 2,
            ..Conv2dParams::default()
        };
        let e = conv2d_pair(&Tape::new(0), &x, &w, None, &a, grouped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("groups 2"), "{e}");
        let w = Tensor::new(vec![0.0; 4 * 4 * 9], &[4, 4, 3, 3]).unwrap();
        let a = Tensor::new(vec![0.0; 2 * 4], &[2, 4, 1, 1]).unwrap();
        let e = conv2d_pair(&Tape::new(0), &x, &w, None, &a, Conv2dParams::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[rank, 4, 3, 3]"), "{e}");
    }

    /// A frozen fp16 weight (a checkpoint's) is widened for each product only: after forward
    /// and backward it is still held as 16 bits, and every value equals the same convolution
    /// with the widened weight in f32.
    #[test]
    fn a_16_bit_weight_stays_16_bit() {
        struct Bits(Vec<u16>);
        impl crate::ExternalHalf for Bits {
            fn bits(&self) -> &[u16] {
                &self.0
            }
            fn format(&self) -> crate::HalfFormat {
                crate::HalfFormat::F16
            }
        }
        let mut r = lora_kernels::rng::Rng::new(9);
        let xv: Vec<f32> = (0..2 * 3 * 5 * 5).map(|_| r.normal() as f32).collect();
        let bits: Vec<u16> = (0..4 * 3 * 3 * 3)
            .map(|_| half::f16::from_f32(r.normal() as f32 * 0.3).to_bits())
            .collect();
        let wide: Vec<f32> = bits
            .iter()
            .map(|b| half::f16::from_bits(*b).to_f32())
            .collect();
        let p = Conv2dParams {
            padding: (1, 1),
            ..Conv2dParams::default()
        };
        let run = |w: &Tensor| {
            let x = Tensor::param(xv.clone(), &[2, 3, 5, 5]).unwrap();
            let tape = Tape::new(0);
            let y = conv2d(&tape, &x, w, None, p).unwrap();
            let loss =
                crate::ops::mse_loss(&tape, &y, &Tensor::zeros(y.shape()).unwrap(), None).unwrap();
            let g = tape.backward(&loss).unwrap();
            (y.try_to_vec().unwrap(), g.to_vec(&x).unwrap().unwrap())
        };
        let w16 =
            Tensor::from_external_half(std::sync::Arc::new(Bits(bits)), &[4, 3, 3, 3]).unwrap();
        let got = run(&w16);
        assert!(w16.is_half_stored(), "the weight was widened for good");
        let want = run(&Tensor::new(wide, &[4, 3, 3, 3]).unwrap());
        assert_eq!(got, want);
    }
}
