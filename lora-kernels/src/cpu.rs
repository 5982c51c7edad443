//! The CPU backend: [`Accel`] over host memory ([`DBuf::Host`], or [`DBuf::Mapped`] read in
//! place), each op the CPU kernel of [`crate::ops`] / [`crate::lora_linear`]. 16-bit frozen
//! weights are read as stored by the products (widened panel by panel, never as a whole).

use crate::accel::{check_range, Accel, ConvGrads, HeadOut, LinearGradBufs, LoraBufs, Unary};
use crate::buffers::{DBits, DBuf, DWeight, HalfFormat};
use crate::error::Result;
use crate::lora_linear::{
    lora_linear_backward, lora_linear_forward, BaseLinear, LinearGrads, LoraWeights,
};
use crate::operands::{LinearDims, WeightData, WeightLayout};
use crate::ops::adamw::{adamw_step, AdamStep};
use crate::ops::attention::{self, AttnDims};
use crate::ops::conv::{self, Conv2dDims};
use crate::ops::norm::GroupDims;
use crate::ops::pool::{self, PoolDims};
use crate::ops::{cross_entropy, elementwise, embedding, norm, rope, slice};

/// Head weights widened per vocabulary block of a frozen 16-bit head (4 MiB of f32 scratch).
const HEAD_WIDEN_ELEMS: usize = 1 << 20;

/// The CPU backend (see the module docs). Threads: the kernels' rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

fn wrong(what: &str) -> crate::KernelError {
    crate::KernelError::Device(format!(
        "{what}: a buffer of another device was passed to the CPU backend"
    ))
}

fn h(b: &DBuf) -> Result<&[f32]> {
    b.host().ok_or_else(|| wrong("read"))
}

fn hm(b: &mut DBuf) -> Result<&mut [f32]> {
    b.host_mut().ok_or_else(|| wrong("write"))
}

fn hb(b: &DBits) -> Result<&[u16]> {
    b.host().ok_or_else(|| wrong("read"))
}

/// The kernels' view of a weight operand.
fn weight<'a>(w: &DWeight<'a>) -> Result<WeightData<'a>> {
    Ok(match *w {
        DWeight::F32(b) => WeightData::F32(h(b)?),
        DWeight::Half(b, HalfFormat::Bf16) => WeightData::Bf16(hb(b)?),
        DWeight::Half(b, HalfFormat::F16) => WeightData::F16(hb(b)?),
        DWeight::PackedBf16(p) | DWeight::PackedBeside(p, _) => WeightData::PackedBf16(p),
    })
}

fn hm_opt(b: Option<&mut DBuf>) -> Result<Option<&mut [f32]>> {
    b.map(hm).transpose()
}

impl Accel for Cpu {
    fn describe(&self) -> String {
        "cpu".into()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Off is accepted; on is an error: the CPU has no TF32 products.
    fn set_tf32(&self, on: bool) -> Result<()> {
        if on {
            return Err(crate::error::invalid(
                "set_tf32",
                "on",
                "TF32 is a GPU mode; the CPU computes in f32",
            ));
        }
        Ok(())
    }
    fn upload(&self, v: &[f32]) -> Result<DBuf> {
        Ok(DBuf::Host(v.to_vec()))
    }
    fn upload_bits(&self, v: &[u16]) -> Result<DBits> {
        Ok(DBits::Host(v.to_vec()))
    }
    fn download(&self, b: &DBuf) -> Result<Vec<f32>> {
        Ok(h(b)?.to_vec())
    }
    fn download_bits(&self, b: &DBits) -> Result<Vec<u16>> {
        Ok(hb(b)?.to_vec())
    }
    fn zeros(&self, n: usize) -> Result<DBuf> {
        Ok(DBuf::Host(vec![0.0; n]))
    }
    fn copy(&self, b: &DBuf) -> Result<DBuf> {
        Ok(DBuf::Host(h(b)?.to_vec()))
    }
    fn copy_range(&self, b: &DBuf, offset: usize, len: usize) -> Result<DBuf> {
        check_range("copy_range", b.len(), offset, len)?;
        Ok(DBuf::Host(h(b)?[offset..offset + len].to_vec()))
    }
    fn write_range(&self, dst: &mut DBuf, offset: usize, src: &DBuf) -> Result<()> {
        check_range("write_range", dst.len(), offset, src.len())?;
        hm(dst)?[offset..offset + src.len()].copy_from_slice(h(src)?);
        Ok(())
    }
    fn widen(&self, bits: &DBits, f16: bool) -> Result<DBuf> {
        let b = hb(bits)?;
        let data = if f16 {
            WeightData::F16(b)
        } else {
            WeightData::Bf16(b)
        };
        let mut out = vec![0.0; b.len()];
        const CHUNK: usize = 1 << 16;
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| data.widen(i * CHUNK, c));
        Ok(DBuf::Host(out))
    }
    fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; a.len()];
        elementwise::add_forward(&mut out, h(a)?, h(b)?)?;
        Ok(DBuf::Host(out))
    }
    fn accumulate(&self, acc: &mut DBuf, g: &DBuf) -> Result<()> {
        elementwise::accumulate(hm(acc)?, h(g)?)
    }
    fn scale(&self, x: &mut DBuf, s: f32) -> Result<()> {
        hm(x)?.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn sum_squares(&self, x: &DBuf) -> Result<f64> {
        Ok(h(x)?.iter().map(|&v| v as f64 * v as f64).sum())
    }
    fn unary_forward(&self, f: Unary, x: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; x.len()];
        match f {
            Unary::Gelu => elementwise::gelu_forward(&mut out, h(x)?)?,
            Unary::GeluErf => elementwise::gelu_erf_forward(&mut out, h(x)?)?,
            Unary::Silu => elementwise::silu_forward(&mut out, h(x)?)?,
            Unary::Relu => elementwise::relu_forward(&mut out, h(x)?)?,
            Unary::Sigmoid => elementwise::sigmoid_forward(&mut out, h(x)?)?,
            Unary::QuickGelu => elementwise::quick_gelu_forward(&mut out, h(x)?)?,
        }
        Ok(DBuf::Host(out))
    }
    fn unary_backward(&self, f: Unary, dx: &mut DBuf, dout: &DBuf, x: &DBuf) -> Result<()> {
        match f {
            Unary::Gelu => elementwise::gelu_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::GeluErf => elementwise::gelu_erf_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::Silu => elementwise::silu_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::Relu => elementwise::relu_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::Sigmoid => elementwise::sigmoid_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::QuickGelu => elementwise::quick_gelu_backward(hm(dx)?, h(dout)?, h(x)?),
        }
    }
    fn swiglu_forward(&self, gate: &DBuf, up: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; gate.len()];
        elementwise::swiglu_forward(&mut out, h(gate)?, h(up)?)?;
        Ok(DBuf::Host(out))
    }
    fn swiglu_backward(
        &self,
        dgate: &mut DBuf,
        dup: &mut DBuf,
        dout: &DBuf,
        gate: &DBuf,
        up: &DBuf,
    ) -> Result<()> {
        elementwise::swiglu_backward(Some(hm(dgate)?), Some(hm(dup)?), h(dout)?, h(gate)?, h(up)?)
    }
    fn layernorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        c: usize,
        eps: f32,
    ) -> Result<[DBuf; 3]> {
        let n = x.len() / c.max(1);
        let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; n], vec![0.0; n]);
        let beta = beta.map(h).transpose()?;
        norm::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            h(x)?,
            h(gamma)?,
            beta,
            c,
            eps,
        )?;
        Ok([DBuf::Host(out), DBuf::Host(mean), DBuf::Host(rstd)])
    }
    fn layernorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        mean: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()> {
        norm::layernorm_backward(
            hm_opt(dx)?,
            hm_opt(dgamma)?,
            hm_opt(dbeta)?,
            h(dout)?,
            h(x)?,
            h(gamma)?,
            h(mean)?,
            h(rstd)?,
            c,
        )
    }
    fn groupnorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        d: GroupDims,
        eps: f32,
    ) -> Result<[DBuf; 3]> {
        let ng = d.batch * d.groups;
        let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; ng], vec![0.0; ng]);
        let b = beta.map(h).transpose()?;
        norm::groupnorm_forward(&mut out, &mut mean, &mut rstd, h(x)?, h(gamma)?, b, d, eps)?;
        Ok([DBuf::Host(out), DBuf::Host(mean), DBuf::Host(rstd)])
    }
    fn groupnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        mean: &DBuf,
        rstd: &DBuf,
        d: GroupDims,
    ) -> Result<()> {
        norm::groupnorm_backward(
            hm_opt(dx)?,
            hm_opt(dgamma)?,
            hm_opt(dbeta)?,
            h(dout)?,
            h(x)?,
            h(gamma)?,
            h(mean)?,
            h(rstd)?,
            d,
        )
    }
    fn rmsnorm_forward(&self, x: &DBuf, gamma: &DBuf, c: usize, eps: f32) -> Result<[DBuf; 2]> {
        let n = x.len() / c.max(1);
        let (mut out, mut rstd) = (vec![0.0; x.len()], vec![0.0; n]);
        norm::rmsnorm_forward(&mut out, &mut rstd, h(x)?, h(gamma)?, c, eps)?;
        Ok([DBuf::Host(out), DBuf::Host(rstd)])
    }
    fn rmsnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()> {
        norm::rmsnorm_backward(
            hm_opt(dx)?,
            hm_opt(dgamma)?,
            h(dout)?,
            h(x)?,
            h(gamma)?,
            h(rstd)?,
            c,
        )
    }
    fn embedding_forward(&self, table: DWeight, ids: &[u32], c: usize) -> Result<DBuf> {
        let mut out = vec![0.0; ids.len() * c];
        embedding::embedding_forward_stored(&mut out, weight(&table)?, ids, c)?;
        Ok(DBuf::Host(out))
    }
    fn embedding_backward(
        &self,
        dtable: &mut DBuf,
        dout: &DBuf,
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::embedding_backward(hm(dtable)?, h(dout)?, ids, c)
    }
    fn rope(
        &self,
        backward: bool,
        out: &mut DBuf,
        x: &DBuf,
        cos: &DBuf,
        sin: &DBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (o, x, cs, sn) = (hm(out)?, h(x)?, h(cos)?, h(sin)?);
        if backward {
            rope::rope_backward(o, x, cs, sn, positions, heads, head_dim)
        } else {
            rope::rope_forward(o, x, cs, sn, positions, heads, head_dim)
        }
    }
    fn attention_forward(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<[DBuf; 2]> {
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; d.lse_len()]);
        attention::attention_forward(&mut out, &mut lse, h(q)?, h(k)?, h(v)?, d, scale)?;
        Ok([DBuf::Host(out), DBuf::Host(lse)])
    }
    fn attention_backward(
        &self,
        dq: &mut DBuf,
        dk: &mut DBuf,
        dv: &mut DBuf,
        dout: &DBuf,
        lse: &DBuf,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<()> {
        attention::attention_backward(
            hm(dq)?,
            hm(dk)?,
            hm(dv)?,
            h(dout)?,
            h(lse)?,
            h(q)?,
            h(k)?,
            h(v)?,
            d,
            scale,
        )
    }
    fn narrow(
        &self,
        forward: bool,
        out: &mut DBuf,
        x: &DBuf,
        _n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<()> {
        if forward {
            slice::narrow_forward(hm(out)?, h(x)?, cols, start, len)
        } else {
            slice::narrow_backward(hm(out)?, h(x)?, cols, start, len)
        }
    }
    fn box_losses_forward(&self, pred: &DBuf, target: &DBuf, num_boxes: f32) -> Result<DBuf> {
        let l = crate::ops::boxes::box_losses_forward(h(pred)?, h(target)?, num_boxes)?;
        Ok(DBuf::Host(l.to_vec()))
    }
    fn box_losses_backward(
        &self,
        dpred: &mut DBuf,
        dout: &DBuf,
        pred: &DBuf,
        target: &DBuf,
        num_boxes: f32,
    ) -> Result<()> {
        let d = h(dout)?;
        crate::error::check_len("box_losses_backward", "dout", d.len(), &[2])?;
        crate::ops::boxes::box_losses_backward(
            hm(dpred)?,
            [d[0], d[1]],
            h(pred)?,
            h(target)?,
            num_boxes,
        )
    }
    fn transpose(
        &self,
        out: &mut DBuf,
        x: &DBuf,
        batch: usize,
        m: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        slice::transpose(hm(out)?, h(x)?, batch, m, n, accumulate)
    }
    fn linear_forward(
        &self,
        x: &DBuf,
        w: DWeight,
        layout: WeightLayout,
        bias: Option<&DBuf>,
        lora: Option<LoraBufs>,
        d: LinearDims,
    ) -> Result<(DBuf, Option<DBuf>)> {
        let base = BaseLinear {
            weight: weight(&w)?,
            layout,
            bias: bias.map(h).transpose()?,
        };
        let mut y = vec![0.0; d.tokens * d.out];
        let Some(l) = lora else {
            lora_linear_forward(&mut y, None, h(x)?, &base, None, d)?;
            return Ok((DBuf::Host(y), None));
        };
        let lw = LoraWeights {
            a: h(l.a)?,
            b: h(l.b)?,
            rank: l.rank,
            scale: l.scale,
            dropout: l.dropout,
        };
        let mut u = vec![0.0; d.tokens * l.rank];
        lora_linear_forward(&mut y, Some(&mut u), h(x)?, &base, Some(&lw), d)?;
        Ok((DBuf::Host(y), Some(DBuf::Host(u))))
    }
    fn linear_backward(
        &self,
        grads: LinearGradBufs,
        dy: &DBuf,
        x: &DBuf,
        w: DWeight,
        layout: WeightLayout,
        lora: Option<LoraBufs>,
        u: Option<&DBuf>,
        d: LinearDims,
    ) -> Result<()> {
        let base = BaseLinear {
            weight: weight(&w)?,
            layout,
            bias: None,
        };
        let lw = match lora {
            Some(l) => Some(LoraWeights {
                a: h(l.a)?,
                b: h(l.b)?,
                rank: l.rank,
                scale: l.scale,
                dropout: l.dropout,
            }),
            None => None,
        };
        // dx reads only W (and A, B); x is read for dA alone, so an unread x may be empty.
        let x = if x.is_empty() { &[][..] } else { h(x)? };
        let g = LinearGrads {
            dx: hm_opt(grads.dx)?,
            dw: hm_opt(grads.dw)?,
            dbias: hm_opt(grads.dbias)?,
            da: hm_opt(grads.da)?,
            db: hm_opt(grads.db)?,
        };
        lora_linear_backward(g, h(dy)?, x, &base, lw.as_ref(), u.map(h).transpose()?, d)
    }
    fn conv2d_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        bias: Option<&DBuf>,
        d: Conv2dDims,
    ) -> Result<DBuf> {
        let mut y = vec![0.0; d.y_len()];
        conv::conv2d_forward(&mut y, h(x)?, h(w)?, bias.map(h).transpose()?, d)?;
        Ok(DBuf::Host(y))
    }
    fn conv2d_pair_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        a: &DBuf,
        bias: Option<&DBuf>,
        d: Conv2dDims,
    ) -> Result<[DBuf; 2]> {
        let r = a.len() / (d.w_len() / d.out_ch.max(1)).max(1);
        let mut y = vec![0.0; d.y_len()];
        let mut hv = vec![0.0; Conv2dDims { out_ch: r, ..d }.y_len()];
        let b = bias.map(h).transpose()?;
        conv::conv2d_pair_forward(&mut y, &mut hv, h(x)?, h(w)?, h(a)?, b, d)?;
        Ok([DBuf::Host(y), DBuf::Host(hv)])
    }
    fn conv2d_backward(
        &self,
        g: ConvGrads,
        dy: &DBuf,
        x: &DBuf,
        w: &DBuf,
        d: Conv2dDims,
    ) -> Result<()> {
        let g = conv::Conv2dGrads {
            dx: hm_opt(g.dx)?,
            dw: hm_opt(g.dw)?,
            dbias: hm_opt(g.dbias)?,
        };
        conv::conv2d_backward(g, h(dy)?, h(x)?, h(w)?, d)
    }
    fn batchnorm_forward(
        &self,
        x: &DBuf,
        mean: &DBuf,
        var: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> Result<DBuf> {
        let mut y = vec![0.0; x.len()];
        let (m, v, g, b) = (h(mean)?, h(var)?, h(gamma)?, h(beta)?);
        pool::batchnorm_forward(&mut y, h(x)?, m, v, g, b, dims, eps)?;
        Ok(DBuf::Host(y))
    }
    fn batchnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dy: &DBuf,
        x: &DBuf,
        mean: &DBuf,
        var: &DBuf,
        gamma: &DBuf,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        let (dx, dg, db) = (hm_opt(dx)?, hm_opt(dgamma)?, hm_opt(dbeta)?);
        let (m, v, g) = (h(mean)?, h(var)?, h(gamma)?);
        pool::batchnorm_backward(dx, dg, db, h(dy)?, h(x)?, m, v, g, dims, eps)
    }
    fn geglu_forward(&self, x: &DBuf, f: usize) -> Result<DBuf> {
        let mut out = vec![0.0; x.len() / 2];
        elementwise::geglu_forward(&mut out, h(x)?, f)?;
        Ok(DBuf::Host(out))
    }
    fn geglu_backward(&self, dx: &mut DBuf, dout: &DBuf, x: &DBuf, f: usize) -> Result<()> {
        elementwise::geglu_backward(hm(dx)?, h(dout)?, h(x)?, f)
    }
    fn add_planes_forward(&self, x: &DBuf, bias: &DBuf, inner: usize) -> Result<DBuf> {
        let mut out = vec![0.0; x.len()];
        elementwise::add_planes_forward(&mut out, h(x)?, h(bias)?, inner)?;
        Ok(DBuf::Host(out))
    }
    fn add_planes_backward_bias(&self, dbias: &mut DBuf, dout: &DBuf, inner: usize) -> Result<()> {
        elementwise::add_planes_backward_bias(hm(dbias)?, h(dout)?, inner)
    }
    fn upsample_nearest_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<DBuf> {
        let mut y = vec![0.0; planes * hw.0 * hw.1 * f * f];
        pool::upsample_nearest_forward(&mut y, h(x)?, planes, hw, f)?;
        Ok(DBuf::Host(y))
    }
    fn upsample_nearest_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<()> {
        pool::upsample_nearest_backward(hm(dx)?, h(dy)?, planes, hw, f)
    }
    fn max_pool2d_forward(&self, x: &DBuf, d: PoolDims) -> Result<DBuf> {
        let (oh, ow) = d.check()?;
        let mut y = vec![0.0; d.planes * oh * ow];
        pool::max_pool2d_forward(&mut y, h(x)?, d)?;
        Ok(DBuf::Host(y))
    }
    fn max_pool2d_backward(&self, dx: &mut DBuf, dy: &DBuf, x: &DBuf, d: PoolDims) -> Result<()> {
        pool::max_pool2d_backward(hm(dx)?, h(dy)?, h(x)?, d)
    }
    fn adaptive_avg_pool2d_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<DBuf> {
        let mut y = vec![0.0; planes * out.0 * out.1];
        pool::adaptive_avg_pool2d_forward(&mut y, h(x)?, planes, hw, out)?;
        Ok(DBuf::Host(y))
    }
    fn adaptive_avg_pool2d_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<()> {
        pool::adaptive_avg_pool2d_backward(hm(dx)?, h(dy)?, planes, hw, out)
    }
    fn cross_entropy_forward(
        &self,
        logits: &DBuf,
        targets: &[i32],
        v: usize,
    ) -> Result<(f32, usize, DBuf)> {
        let mut lse = vec![0.0; targets.len()];
        let (loss, count) = cross_entropy::cross_entropy_forward(&mut lse, h(logits)?, targets, v)?;
        Ok((loss, count, DBuf::Host(lse)))
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut DBuf,
        dloss: f32,
        logits: &DBuf,
        lse: &DBuf,
        targets: &[i32],
        v: usize,
        count: usize,
    ) -> Result<()> {
        cross_entropy::cross_entropy_backward(
            hm(dlogits)?,
            dloss,
            h(logits)?,
            h(lse)?,
            targets,
            v,
            count,
        )
    }
    fn linear_cross_entropy(
        &self,
        x: &DBuf,
        w: DWeight,
        targets: &[i32],
        c: usize,
        v: usize,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<HeadOut> {
        let mut dx = want_dx.then(|| vec![0.0f32; targets.len() * c]);
        let mut dw = want_dw.then(|| vec![0.0f32; v * c]);
        let (loss, count) = match w {
            DWeight::F32(w) => {
                let chunk = (cross_entropy::HEAD_CHUNK_ELEMS / v.max(1)).max(16);
                cross_entropy::linear_cross_entropy(
                    h(x)?,
                    h(w)?,
                    targets,
                    c,
                    v,
                    dx.as_deref_mut(),
                    dw.as_deref_mut(),
                    chunk,
                )?
            }
            DWeight::Half(..) | DWeight::PackedBf16(_) | DWeight::PackedBeside(..) if want_dw => {
                return Err(crate::error::invalid(
                    "linear_cross_entropy",
                    "w",
                    "a 16-bit head is frozen: it has no gradient",
                ))
            }
            // A head packed for the bf16 products (`--precision bf16`): autocast's lm_head;
            // a tied one's input gradient multiplies the f32 values it keeps.
            DWeight::PackedBf16(p) | DWeight::PackedBeside(p, _) => {
                let values = match w {
                    DWeight::PackedBeside(_, b) => Some(h(b)?),
                    _ => None,
                };
                let chunk = (cross_entropy::HEAD_CHUNK_ELEMS / v.max(1)).max(16);
                cross_entropy::linear_cross_entropy_packed(
                    h(x)?,
                    p,
                    values,
                    targets,
                    c,
                    v,
                    dx.as_deref_mut(),
                    chunk,
                )?
            }
            // A frozen 16-bit head (bf16 / f16 checkpoint) is read as stored, one vocabulary
            // block at a time, never widened as a whole.
            DWeight::Half(..) => {
                let block = (HEAD_WIDEN_ELEMS / c.max(1)).max(1);
                cross_entropy::linear_cross_entropy_stored(
                    h(x)?,
                    weight(&w)?,
                    targets,
                    c,
                    v,
                    dx.as_deref_mut(),
                    block,
                )?
            }
        };
        Ok(HeadOut {
            loss,
            count,
            dx: dx.map(DBuf::Host),
            dw: dw.map(DBuf::Host),
        })
    }
    fn head_rows(&self, _v: usize) -> usize {
        usize::MAX
    }
    fn adamw(
        &self,
        p: &mut DBuf,
        g: &DBuf,
        m: &mut DBuf,
        v: &mut DBuf,
        hp: AdamStep,
    ) -> Result<()> {
        adamw_step(hm(p)?, h(g)?, hm(m)?, hm(v)?, hp)
    }
}
