//! The element ops of Stable Diffusion's UNet and VAE: GEGLU (the transformer blocks'
//! feed-forward), a per-channel bias broadcast over the pixels (the time embedding added in each
//! ResNet block) and nearest upsampling (`Upsample2D`).

use super::*;

/// GEGLU, diffusers' `GEGLU` after its projection: `x` `(..., 2F)` is `[hidden | gate]` along its
/// last dimension; returns `hidden * gelu(gate)` `(..., F)` (exact GELU, erf form).
pub fn geglu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu";
    let last = *x.shape().last().unwrap_or(&0);
    if last == 0 || !last.is_multiple_of(2) {
        return Err(shape_err(OP, "x", x, "[..., 2 * F] with F >= 1"));
    }
    let f = last / 2;
    let on = placement(OP, &[("x", x)])?;
    let gx = read(x)?;
    let out = on.accel.geglu_forward(f32_of(&gx)?, f)?;
    drop(gx);
    let y = on.tensor(out, &with_last(x.shape(), f), x.requires_grad())?;
    on.record(tape, GegluNode { f }, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct GegluNode {
    f: usize,
}

impl OpNode for GegluNode {
    fn name(&self) -> &'static str {
        "geglu"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dx) = g.take(0) {
            a.geglu_backward(dx, dout, data[0], self.f)?;
        }
        Ok(())
    }
}

/// `x (B, C, ...) + bias (B, C)`, each bias value added to every element of its `(b, c)` plane
/// (PyTorch's `x + bias[:, :, None, None]`).
pub fn add_planes(tape: &Tape, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    const OP: &str = "add_planes";
    let s = x.shape();
    if s.len() < 2 {
        return Err(shape_err(OP, "x", x, "[B, C, ...]"));
    }
    if bias.shape() != &s[..2] {
        return Err(shape_err(OP, "bias", bias, format!("[{}, {}]", s[0], s[1])));
    }
    let inner: usize = s[2..].iter().product();
    let on = placement(OP, &[("x", x), ("bias", bias)])?;
    let (gx, gb) = (read(x)?, read(bias)?);
    let out = on
        .accel
        .add_planes_forward(f32_of(&gx)?, f32_of(&gb)?, inner)?;
    drop((gx, gb));
    let y = on.tensor(out, s, x.requires_grad() || bias.requires_grad())?;
    on.record(
        tape,
        AddPlanesNode { inner },
        vec![x.clone(), bias.clone()],
        &y,
    );
    Ok(y)
}

/// [x, bias]
struct AddPlanesNode {
    inner: usize,
}

impl OpNode for AddPlanesNode {
    fn name(&self) -> &'static str {
        "add_planes"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dx) = g.take(0) {
            a.accumulate(dx, dout)?;
        }
        if let Some(db) = g.take(1) {
            a.add_planes_backward_bias(db, dout, self.inner)?;
        }
        Ok(())
    }
}

/// Nearest upsampling of `x` `(N, C, H, W)` by the integer factor `f`: `(N, C, H f, W f)`
/// (PyTorch's `F.interpolate(x, scale_factor=f, mode="nearest")`).
pub fn upsample_nearest2d(tape: &Tape, x: &Tensor, f: usize) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2d";
    let [n, c, h, w] =
        <[usize; 4]>::try_from(x.shape()).map_err(|_| shape_err(OP, "x", x, "(N, C, H, W)"))?;
    if f == 0 {
        return Err(CoreError::InvalidConfig {
            field: "scale_factor",
            reason: "the upsampling factor must be at least 1".into(),
        });
    }
    let on = placement(OP, &[("x", x)])?;
    let gx = read(x)?;
    let y = on
        .accel
        .upsample_nearest_forward(f32_of(&gx)?, n * c, (h, w), f)?;
    drop(gx);
    let y = on.tensor(y, &[n, c, h * f, w * f], x.requires_grad())?;
    let node = UpsampleNode {
        planes: n * c,
        hw: (h, w),
        f,
    };
    on.record(tape, node, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct UpsampleNode {
    planes: usize,
    hw: (usize, usize),
    f: usize,
}

impl OpNode for UpsampleNode {
    fn name(&self) -> &'static str {
        "upsample_nearest2d"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dx) = g.take(0) {
            a.upsample_nearest_backward(dx, dout, self.planes, self.hw, self.f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Tape, Tensor};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = lora_kernels::rng::Rng::new(seed);
        (0..n).map(|_| r.uniform_range(-2.0, 2.0) as f32).collect()
    }

    /// `sum(w * f(x))` and its gradient by the tape, against central differences in f64 of the
    /// same forward, on every backend.
    fn check_grad(
        what: &str,
        shapes: &[&[usize]],
        f: impl Fn(&Tape, &[Tensor]) -> crate::Result<Tensor>,
    ) {
        for dev in crate::device::test_devices() {
            let vals: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| rand(s.iter().product(), 7 + i as u64))
                .collect();
            let tensors = |vals: &[Vec<f32>]| -> Vec<Tensor> {
                vals.iter()
                    .zip(shapes)
                    .map(|(v, s)| Tensor::new_on(v.clone(), s, true, dev).unwrap())
                    .collect()
            };
            let tape = Tape::new(0);
            let ts = tensors(&vals);
            let y = f(&tape, &ts).unwrap();
            let w = rand(y.numel(), 99);
            let grads = tape.backward_with(&y, &w).unwrap();
            let loss = |vals: &[Vec<f32>]| -> f64 {
                let tape = Tape::new(0);
                let y = f(&tape, &tensors(vals)).unwrap().try_to_vec().unwrap();
                y.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            for (i, t) in ts.iter().enumerate() {
                let g = grads.to_vec(t).unwrap().unwrap();
                for j in 0..vals[i].len() {
                    let h = 1e-2f32;
                    let mut p = vals.to_vec();
                    p[i][j] += h;
                    let mut m = vals.to_vec();
                    m[i][j] -= h;
                    let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
                    let err = (g[j] as f64 - fd).abs();
                    assert!(
                        err <= 2e-3 * (1.0 + fd.abs()),
                        "{dev} {what}: input {i}[{j}]: tape {} vs differences {fd}",
                        g[j]
                    );
                }
            }
        }
    }

    #[test]
    fn geglu_add_planes_and_upsample_match_their_definitions_and_differences() {
        // Values against the definitions.
        let x = rand(3 * 8, 1);
        let t = Tensor::new(x.clone(), &[3, 8]).unwrap();
        let y = ops::geglu(&Tape::new(0), &t).unwrap();
        assert_eq!(y.shape(), [3, 4]);
        let yv = y.try_to_vec().unwrap();
        for r in 0..3 {
            for j in 0..4 {
                let (h, g) = (x[r * 8 + j] as f64, x[r * 8 + 4 + j] as f64);
                let want = h * lora_kernels::ops::elementwise::reference::gelu_erf(g);
                assert!((yv[r * 4 + j] as f64 - want).abs() < 1e-6, "geglu {r},{j}");
            }
        }
        let xu = Tensor::new((0..6).map(|v| v as f32).collect(), &[1, 1, 2, 3]).unwrap();
        let up = ops::upsample_nearest2d(&Tape::new(0), &xu, 2).unwrap();
        assert_eq!(up.shape(), [1, 1, 4, 6]);
        assert_eq!(
            up.try_to_vec().unwrap(),
            [
                0., 0., 1., 1., 2., 2., 0., 0., 1., 1., 2., 2., 3., 3., 4., 4., 5., 5., 3., 3., 4.,
                4., 5., 5.
            ]
        );
        // Gradients against differences (odd sizes, factor 3, a single pixel).
        check_grad("geglu", &[&[2, 3, 10]], |t, v| ops::geglu(t, &v[0]));
        check_grad("add_planes", &[&[2, 3, 2, 5], &[2, 3]], |t, v| {
            ops::add_planes(t, &v[0], &v[1])
        });
        check_grad("upsample x3", &[&[1, 2, 3, 1]], |t, v| {
            ops::upsample_nearest2d(t, &v[0], 3)
        });
        // Named shape errors.
        let e = ops::geglu(&Tape::new(0), &Tensor::new(vec![0.0; 3], &[3]).unwrap());
        assert!(e.unwrap_err().to_string().contains("geglu"));
        let e = ops::add_planes(
            &Tape::new(0),
            &Tensor::new(vec![0.0; 12], &[2, 3, 2]).unwrap(),
            &Tensor::new(vec![0.0; 3], &[3]).unwrap(),
        );
        assert!(e.unwrap_err().to_string().contains("bias"));
    }
}
