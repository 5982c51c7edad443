//! [`Accel`] for [`CudaDevice`]: each op of the device backend as the `.cu` kernels (and cuBLAS
//! for the dense products) on device buffers. Ids, positions and targets are checked on the host
//! (the kernels trust them) and copied over per call.
//!
//! Not yet run on a GPU: each kernel is checked against its CPU twin by `tests/cuda_parity.rs`,
//! and the whole backend by the device training-step parity test, on a GPU machine.

use crate::accel::{check_range, Accel, ConvGrads, HeadOut, LinearGradBufs, LoraBufs, Unary};
use crate::buffers::{DBits, DBuf, DWeight, HalfFormat};
use crate::cuda::{CudaDevice, LoraDims};
use crate::error::{check_len, invalid, KernelError, Result};
use crate::operands::{LinearDims, WeightLayout};
use crate::ops::adamw::AdamStep;
use crate::ops::attention::AttnDims;
use crate::ops::conv::Conv2dDims;
use crate::ops::cross_entropy::check_targets;
use crate::ops::embedding::check_ids;
use crate::ops::norm::GroupDims;
use crate::ops::pool::PoolDims;
use crate::ops::rope::check as check_rope;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

fn c(b: &DBuf) -> Result<&CudaSlice<f32>> {
    match b {
        DBuf::Cuda(s) => Ok(s),
        _ => Err(KernelError::Device(
            "a host buffer was passed to a CUDA device".into(),
        )),
    }
}

fn cm(b: &mut DBuf) -> Result<&mut CudaSlice<f32>> {
    match b {
        DBuf::Cuda(s) => Ok(s),
        _ => Err(KernelError::Device(
            "a host buffer was passed to a CUDA device".into(),
        )),
    }
}

/// A weight operand as f32 device values: a 16-bit one is widened into `tmp` for this product
/// only (it stays 16-bit in device memory).
fn wide<'a>(dev: &CudaDevice, w: DWeight<'a>, tmp: &'a mut Option<DBuf>) -> Result<&'a DBuf> {
    match w {
        DWeight::F32(b) => Ok(b),
        DWeight::Half(bits, fmt) => {
            let b = Accel::widen(dev, bits, fmt == HalfFormat::F16)?;
            Ok(tmp.insert(b))
        }
        DWeight::PackedBf16(_) | DWeight::PackedBeside(..) => Err(KernelError::Device(
            "a weight packed for the CPU's bf16 products was passed to a CUDA device".into(),
        )),
    }
}

/// A null device pointer for a kernel's optional argument.
const NULL: u64 = 0;

/// One block of 256 threads per row (`rows` blocks), or one thread per column.
fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cols_cfg(cols: usize) -> LaunchConfig {
    rows_cfg(cols.div_ceil(256))
}

fn flat_cfg(n: usize) -> LaunchConfig {
    rows_cfg(n.div_ceil(256).clamp(1, 65535))
}

impl CudaDevice {
    fn run<'a>(
        &'a self,
        name: &'static str,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let f: &'a CudaFunction = self.func(name);
        let mut l = self.stream.launch_builder(f);
        args(&mut l);
        // SAFETY: every caller pushes the kernel's arguments in its order (see the .cu file),
        // with buffers whose lengths were checked against the dimensions it passes.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::Device(format!("{name}: {e:?}")))
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| KernelError::Device(format!("alloc: {e:?}")))
    }

    /// A buffer its kernel writes completely: uninitialised, or NaN-filled when the device
    /// poisons outputs (the parity tests), so an unwritten element shows up.
    fn out(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.output(n)
    }

    fn ints<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| KernelError::Device(format!("upload: {e:?}")))
    }

    fn lora_dims(d: LinearDims, l: &LoraBufs) -> LoraDims {
        let (p, seed) = l.dropout.map_or((0.0, 0), |dr| (dr.p, dr.seed));
        LoraDims {
            n: d.tokens,
            k: d.inp,
            m: d.out,
            r: l.rank,
            scale: l.scale,
            p,
            seed,
        }
    }
}

fn same_len(op: &'static str, pairs: &[(&'static str, usize)], n: usize) -> Result<()> {
    for &(arg, got) in pairs {
        check_len(op, arg, got, &[n])?;
    }
    Ok(())
}

impl Accel for CudaDevice {
    fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "?".into());
        let tf32 = if self.tf32() { ", TF32 GEMMs" } else { "" };
        format!("cuda:{} {name} ({}{tf32})", self.ctx.ordinal(), self.arch)
    }
    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }
    fn set_tf32(&self, on: bool) -> Result<()> {
        CudaDevice::set_tf32(self, on)
    }
    fn upload(&self, v: &[f32]) -> Result<DBuf> {
        CudaDevice::upload(self, v).map(DBuf::Cuda)
    }
    fn upload_bits(&self, v: &[u16]) -> Result<DBits> {
        CudaDevice::upload_bits(self, v).map(DBits::Cuda)
    }
    fn download(&self, b: &DBuf) -> Result<Vec<f32>> {
        CudaDevice::download(self, c(b)?)
    }
    fn zeros(&self, n: usize) -> Result<DBuf> {
        self.alloc(n).map(DBuf::Cuda)
    }
    fn copy(&self, b: &DBuf) -> Result<DBuf> {
        self.stream
            .clone_dtod(c(b)?)
            .map(DBuf::Cuda)
            .map_err(|e| KernelError::Device(format!("copy: {e:?}")))
    }
    fn copy_range(&self, b: &DBuf, offset: usize, len: usize) -> Result<DBuf> {
        check_range("copy_range", b.len(), offset, len)?;
        if len == 0 {
            return self.alloc(0).map(DBuf::Cuda);
        }
        let view = c(b)?.slice(offset..offset + len);
        self.stream
            .clone_dtod(&view)
            .map(DBuf::Cuda)
            .map_err(|e| KernelError::Device(format!("copy_range: {e:?}")))
    }
    fn write_range(&self, dst: &mut DBuf, offset: usize, src: &DBuf) -> Result<()> {
        check_range("write_range", dst.len(), offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let n = src.len();
        let s = c(src)?;
        let mut view = cm(dst)?.slice_mut(offset..offset + n);
        self.stream
            .memcpy_dtod(s, &mut view)
            .map_err(|e| KernelError::Device(format!("write_range: {e:?}")))
    }
    fn download_bits(&self, b: &DBits) -> Result<Vec<u16>> {
        let DBits::Cuda(b) = b else {
            return Err(KernelError::Device(
                "download_bits: a host buffer on a CUDA device".into(),
            ));
        };
        CudaDevice::download_bits(self, b)
    }
    fn widen(&self, bits: &DBits, f16: bool) -> Result<DBuf> {
        let DBits::Cuda(b) = bits else {
            return Err(KernelError::Device(
                "widen: a host buffer on a CUDA device".into(),
            ));
        };
        CudaDevice::widen(self, b, f16).map(DBuf::Cuda)
    }
    fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        same_len("add_forward", &[("b", b.len())], a.len())?;
        let mut out = self.out(a.len())?;
        self.launch_elementwise("add_forward", &mut [&mut out], &[c(a)?, c(b)?], a.len())?;
        Ok(DBuf::Cuda(out))
    }
    fn accumulate(&self, acc: &mut DBuf, g: &DBuf) -> Result<()> {
        let n = acc.len();
        same_len("accumulate", &[("src", g.len())], n)?;
        self.launch_elementwise("accumulate", &mut [cm(acc)?], &[c(g)?], n)
    }
    fn scale(&self, x: &mut DBuf, s: f32) -> Result<()> {
        let n = x.len() as i64;
        let x = cm(x)?;
        self.run("scale_in_place", flat_cfg(n as usize), |l| {
            l.arg(x).arg(&s).arg(&n);
        })
    }
    fn sum_squares(&self, x: &DBuf) -> Result<f64> {
        Ok(Accel::sum_squares_many(self, &[x])?[0])
    }
    fn sum_squares_many(&self, xs: &[&DBuf]) -> Result<Vec<f64>> {
        let slices = xs.iter().map(|x| c(x)).collect::<Result<Vec<_>>>()?;
        CudaDevice::sum_squares_many(self, &slices)
    }
    fn unary_forward(&self, f: Unary, x: &DBuf) -> Result<DBuf> {
        let name = f.kernels().0;
        let mut out = self.out(x.len())?;
        self.launch_elementwise(name, &mut [&mut out], &[c(x)?], x.len())?;
        Ok(DBuf::Cuda(out))
    }
    fn unary_backward(&self, f: Unary, dx: &mut DBuf, dout: &DBuf, x: &DBuf) -> Result<()> {
        let name = f.kernels().1;
        let n = dx.len();
        same_len(name, &[("dout", dout.len()), ("x", x.len())], n)?;
        self.launch_elementwise(name, &mut [cm(dx)?], &[c(dout)?, c(x)?], n)
    }
    fn swiglu_forward(&self, gate: &DBuf, up: &DBuf) -> Result<DBuf> {
        same_len("swiglu_forward", &[("up", up.len())], gate.len())?;
        let mut out = self.out(gate.len())?;
        self.launch_elementwise(
            "swiglu_forward",
            &mut [&mut out],
            &[c(gate)?, c(up)?],
            gate.len(),
        )?;
        Ok(DBuf::Cuda(out))
    }
    fn swiglu_backward(
        &self,
        dgate: &mut DBuf,
        dup: &mut DBuf,
        dout: &DBuf,
        gate: &DBuf,
        up: &DBuf,
    ) -> Result<()> {
        let n = dout.len();
        let pairs = [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ];
        same_len("swiglu_backward", &pairs, n)?;
        let (dg, du) = (cm(dgate)?, cm(dup)?);
        self.launch_elementwise(
            "swiglu_backward",
            &mut [dg, du],
            &[c(dout)?, c(gate)?, c(up)?],
            n,
        )
    }
    fn layernorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        cc: usize,
        eps: f32,
    ) -> Result<[DBuf; 3]> {
        const OP: &str = "layernorm_forward";
        let n = x.len() / cc.max(1);
        check_len(OP, "x", x.len(), &[n, cc])?;
        check_len(OP, "gamma", gamma.len(), &[cc])?;
        if let Some(b) = beta {
            check_len(OP, "beta", b.len(), &[cc])?;
        }
        let (mut out, mut mean, mut rstd) = (self.out(x.len())?, self.out(n)?, self.out(n)?);
        let (xs, gs, bs) = (c(x)?, c(gamma)?, beta.map(c).transpose()?);
        let (ni, ci) = (n as i32, cc as i32);
        self.run(OP, rows_cfg(n), |l| {
            l.arg(&mut out)
                .arg(&mut mean)
                .arg(&mut rstd)
                .arg(xs)
                .arg(gs);
            match bs {
                Some(b) => l.arg(b),
                None => l.arg(&NULL),
            };
            l.arg(&ni).arg(&ci).arg(&eps);
        })?;
        Ok([DBuf::Cuda(out), DBuf::Cuda(mean), DBuf::Cuda(rstd)])
    }
    fn groupnorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        d: GroupDims,
        eps: f32,
    ) -> Result<[DBuf; 3]> {
        const OP: &str = "groupnorm_forward";
        check_len(OP, "x", x.len(), &[d.batch, d.channels, d.spatial])?;
        check_len(OP, "gamma", gamma.len(), &[d.channels])?;
        if let Some(b) = beta {
            check_len(OP, "beta", b.len(), &[d.channels])?;
        }
        if d.groups == 0 || !d.channels.is_multiple_of(d.groups) {
            return Err(crate::error::invalid(
                OP,
                "groups",
                format!("{} groups do not divide {} channels", d.groups, d.channels),
            ));
        }
        let rows = d.batch * d.groups;
        let (mut out, mut mean, mut rstd) = (self.out(x.len())?, self.out(rows)?, self.out(rows)?);
        let (xs, gs, bs) = (c(x)?, c(gamma)?, beta.map(c).transpose()?);
        let (ri, gi, cgi, si) = (
            rows as i32,
            d.groups as i32,
            (d.channels / d.groups) as i32,
            d.spatial as i32,
        );
        self.run(OP, rows_cfg(rows), |l| {
            l.arg(&mut out)
                .arg(&mut mean)
                .arg(&mut rstd)
                .arg(xs)
                .arg(gs);
            match bs {
                Some(b) => l.arg(b),
                None => l.arg(&NULL),
            };
            l.arg(&ri).arg(&gi).arg(&cgi).arg(&si).arg(&eps);
        })?;
        Ok([DBuf::Cuda(out), DBuf::Cuda(mean), DBuf::Cuda(rstd)])
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
        const OP: &str = "groupnorm_backward";
        for (what, len, want) in [
            ("dout", dout.len(), d.batch * d.channels * d.spatial),
            ("x", x.len(), d.batch * d.channels * d.spatial),
            ("gamma", gamma.len(), d.channels),
            ("mean", mean.len(), d.batch * d.groups),
            ("rstd", rstd.len(), d.batch * d.groups),
        ] {
            check_len(OP, what, len, &[want])?;
        }
        for (what, g) in [("dgamma", &dgamma), ("dbeta", &dbeta)] {
            if let Some(g) = g {
                check_len(OP, what, g.len(), &[d.channels])?;
            }
        }
        if d.groups == 0 || !d.channels.is_multiple_of(d.groups) {
            return Err(crate::error::invalid(
                OP,
                "groups",
                format!("{} groups do not divide {} channels", d.groups, d.channels),
            ));
        }
        let (ds, xs, gs, ms, rs) = (c(dout)?, c(x)?, c(gamma)?, c(mean)?, c(rstd)?);
        let rows = d.batch * d.groups;
        let (ni, ci, gi, cgi, si) = (
            d.batch as i32,
            d.channels as i32,
            d.groups as i32,
            (d.channels / d.groups) as i32,
            d.spatial as i32,
        );
        let ri = rows as i32;
        if let Some(dx) = dx {
            check_len(OP, "dx", dx.len(), &[d.batch, d.channels, d.spatial])?;
            let dx = cm(dx)?;
            self.run(OP, rows_cfg(rows), |l| {
                l.arg(dx)
                    .arg(ds)
                    .arg(xs)
                    .arg(gs)
                    .arg(ms)
                    .arg(rs)
                    .arg(&ri)
                    .arg(&gi)
                    .arg(&cgi)
                    .arg(&si);
            })?;
        }
        if dgamma.is_some() || dbeta.is_some() {
            let dg = dgamma.map(cm).transpose()?;
            let db = dbeta.map(cm).transpose()?;
            self.run("groupnorm_backward_params", rows_cfg(d.channels), |l| {
                match dg {
                    Some(g) => l.arg(g),
                    None => l.arg(&NULL),
                };
                match db {
                    Some(b) => l.arg(b),
                    None => l.arg(&NULL),
                };
                l.arg(ds)
                    .arg(xs)
                    .arg(ms)
                    .arg(rs)
                    .arg(&ni)
                    .arg(&ci)
                    .arg(&gi)
                    .arg(&si);
            })?;
        }
        Ok(())
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
        cc: usize,
    ) -> Result<()> {
        let n = x.len() / cc.max(1);
        check_len("layernorm_backward", "dout", dout.len(), &[n, cc])?;
        let (ds, xs, gs, ms, rs) = (c(dout)?, c(x)?, c(gamma)?, c(mean)?, c(rstd)?);
        let (ni, ci) = (n as i32, cc as i32);
        if let Some(dx) = dx {
            check_len("layernorm_backward", "dx", dx.len(), &[n, cc])?;
            let dx = cm(dx)?;
            self.run("layernorm_backward", rows_cfg(n), |l| {
                l.arg(dx)
                    .arg(ds)
                    .arg(xs)
                    .arg(gs)
                    .arg(ms)
                    .arg(rs)
                    .arg(&ni)
                    .arg(&ci);
            })?;
        }
        if dgamma.is_some() || dbeta.is_some() {
            let dg = dgamma.map(cm).transpose()?;
            let db = dbeta.map(cm).transpose()?;
            self.run("layernorm_backward_params", cols_cfg(cc), |l| {
                match dg {
                    Some(g) => l.arg(g),
                    None => l.arg(&NULL),
                };
                match db {
                    Some(b) => l.arg(b),
                    None => l.arg(&NULL),
                };
                l.arg(ds).arg(xs).arg(ms).arg(rs).arg(&ni).arg(&ci);
            })?;
        }
        Ok(())
    }
    fn rmsnorm_forward(&self, x: &DBuf, gamma: &DBuf, cc: usize, eps: f32) -> Result<[DBuf; 2]> {
        const OP: &str = "rmsnorm_forward";
        let n = x.len() / cc.max(1);
        check_len(OP, "x", x.len(), &[n, cc])?;
        check_len(OP, "gamma", gamma.len(), &[cc])?;
        let (mut out, mut rstd) = (self.out(x.len())?, self.out(n)?);
        let (xs, gs) = (c(x)?, c(gamma)?);
        let (ni, ci) = (n as i32, cc as i32);
        self.run(OP, rows_cfg(n), |l| {
            l.arg(&mut out)
                .arg(&mut rstd)
                .arg(xs)
                .arg(gs)
                .arg(&ni)
                .arg(&ci)
                .arg(&eps);
        })?;
        Ok([DBuf::Cuda(out), DBuf::Cuda(rstd)])
    }
    fn rmsnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        rstd: &DBuf,
        cc: usize,
    ) -> Result<()> {
        let n = x.len() / cc.max(1);
        check_len("rmsnorm_backward", "dout", dout.len(), &[n, cc])?;
        let (ds, xs, gs, rs) = (c(dout)?, c(x)?, c(gamma)?, c(rstd)?);
        let (ni, ci) = (n as i32, cc as i32);
        if let Some(dx) = dx {
            check_len("rmsnorm_backward", "dx", dx.len(), &[n, cc])?;
            let dx = cm(dx)?;
            self.run("rmsnorm_backward", rows_cfg(n), |l| {
                l.arg(dx).arg(ds).arg(xs).arg(gs).arg(rs).arg(&ni).arg(&ci);
            })?;
        }
        if let Some(dg) = dgamma {
            let dg = cm(dg)?;
            self.run("rmsnorm_backward_params", cols_cfg(cc), |l| {
                l.arg(dg).arg(ds).arg(xs).arg(rs).arg(&ni).arg(&ci);
            })?;
        }
        Ok(())
    }
    fn embedding_forward(&self, table: DWeight, ids: &[u32], cc: usize) -> Result<DBuf> {
        const OP: &str = "embedding_forward";
        let mut tmp = None;
        let table = wide(self, table, &mut tmp)?;
        let v = table.len() / cc.max(1);
        check_len(OP, "table", table.len(), &[v, cc])?;
        check_ids(OP, ids, v)?;
        let n = ids.len();
        let mut out = self.out(n * cc)?;
        let (ts, is) = (c(table)?, self.ints(ids)?);
        let (ni, ci) = (n as i32, cc as i32);
        self.run(OP, rows_cfg(n), |l| {
            l.arg(&mut out).arg(ts).arg(&is).arg(&ni).arg(&ci);
        })?;
        Ok(DBuf::Cuda(out))
    }
    fn embedding_backward(
        &self,
        dtable: &mut DBuf,
        dout: &DBuf,
        ids: &[u32],
        cc: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let v = dtable.len() / cc.max(1);
        check_len(OP, "dtable", dtable.len(), &[v, cc])?;
        check_len(OP, "dout", dout.len(), &[ids.len(), cc])?;
        check_ids(OP, ids, v)?;
        let (ds, is) = (c(dout)?, self.ints(ids)?);
        let (ni, ci) = (ids.len() as i32, cc as i32);
        let dt = cm(dtable)?;
        // One thread per column walks the tokens in order: deterministic sums.
        self.run(OP, cols_cfg(cc), |l| {
            l.arg(dt).arg(ds).arg(&is).arg(&ni).arg(&ci);
        })
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
        let op = if backward {
            "rope_backward"
        } else {
            "rope_forward"
        };
        let n = positions.len();
        let (xl, ol) = (x.len(), ("out", out.len()));
        check_rope(op, xl, ol, cos.len(), sin.len(), positions, heads, head_dim)?;
        let (xs, cs, ss, ps) = (c(x)?, c(cos)?, c(sin)?, self.ints(positions)?);
        let o = cm(out)?;
        let (ni, hi, di) = (n as i32, heads as i32, head_dim as i32);
        self.run(op, rows_cfg(n), |l| {
            l.arg(o)
                .arg(xs)
                .arg(cs)
                .arg(ss)
                .arg(&ps)
                .arg(&ni)
                .arg(&hi)
                .arg(&di);
        })
    }
    fn attention_forward(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<[DBuf; 2]> {
        let (mut out, mut lse) = (self.out(q.len())?, self.out(d.lse_len())?);
        CudaDevice::attention_forward(self, &mut out, &mut lse, c(q)?, c(k)?, c(v)?, d, scale)?;
        Ok([DBuf::Cuda(out), DBuf::Cuda(lse)])
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
        CudaDevice::attention_backward(
            self,
            cm(dq)?,
            cm(dk)?,
            cm(dv)?,
            c(dout)?,
            c(lse)?,
            c(q)?,
            c(k)?,
            c(v)?,
            d,
            scale,
        )
    }
    fn narrow(
        &self,
        forward: bool,
        out: &mut DBuf,
        x: &DBuf,
        n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<()> {
        CudaDevice::narrow(self, forward, cm(out)?, c(x)?, n, cols, start, len)
    }
    fn box_losses_forward(&self, pred: &DBuf, target: &DBuf, num_boxes: f32) -> Result<DBuf> {
        Ok(DBuf::Cuda(CudaDevice::box_losses_forward(
            self,
            c(pred)?,
            c(target)?,
            num_boxes,
        )?))
    }
    fn box_losses_backward(
        &self,
        dpred: &mut DBuf,
        dout: &DBuf,
        pred: &DBuf,
        target: &DBuf,
        num_boxes: f32,
    ) -> Result<()> {
        CudaDevice::box_losses_backward(self, cm(dpred)?, c(dout)?, c(pred)?, c(target)?, num_boxes)
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
        CudaDevice::transpose(self, cm(out)?, c(x)?, batch, m, n, accumulate)
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
        const OP: &str = "lora_linear_forward";
        let mut tmp = None;
        let w = wide(self, w, &mut tmp)?;
        check_len(OP, "x", x.len(), &[d.tokens, d.inp])?;
        check_len(OP, "w", w.len(), &[d.out, d.inp])?;
        if let Some(b) = bias {
            check_len(OP, "bias", b.len(), &[d.out])?;
        }
        let bias = bias.map(c).transpose()?;
        let Some(l) = lora else {
            let mut y =
                CudaDevice::linear_forward(self, c(x)?, c(w)?, layout, (d.tokens, d.inp, d.out))?;
            if let Some(b) = bias {
                let (n, m) = (d.tokens as i64, d.out as i32);
                self.run("bias_add", flat_cfg(d.tokens * d.out), |lb| {
                    lb.arg(&mut y).arg(b).arg(&n).arg(&m);
                })?;
            }
            return Ok((DBuf::Cuda(y), None));
        };
        let ld = Self::lora_dims(d, &l);
        let (y, u) =
            CudaDevice::lora_forward(self, c(x)?, c(w)?, layout, bias, c(l.a)?, c(l.b)?, ld)?;
        Ok((DBuf::Cuda(y), Some(DBuf::Cuda(u))))
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
        const OP: &str = "lora_linear_backward";
        let mut tmp = None;
        let w = wide(self, w, &mut tmp)?;
        check_len(OP, "dy", dy.len(), &[d.tokens, d.out])?;
        let LinearGradBufs {
            dx,
            dw,
            dbias,
            da,
            db,
        } = grads;
        let dims = (d.tokens, d.inp, d.out);
        // x is kept (and read) only for dW and dA; the tape passes an empty host buffer else.
        let x = if x.is_empty() { None } else { Some(c(x)?) };
        if let Some(dw) = dw {
            let x = x.ok_or_else(|| invalid(OP, "x", "dW needs the layer's input"))?;
            CudaDevice::linear_backward_dw_accumulate(self, cm(dw)?, c(dy)?, x, layout, dims)?;
        }
        let (Some(l), Some(u)) = (lora, u) else {
            if da.is_some() || db.is_some() {
                return Err(invalid(
                    OP,
                    "grads",
                    "adapter gradients were asked of a layer without an adapter",
                ));
            }
            if let Some(dx) = dx {
                CudaDevice::linear_backward_dx_accumulate(
                    self,
                    cm(dx)?,
                    c(dy)?,
                    c(w)?,
                    layout,
                    dims,
                )?;
            }
            if let Some(dbias) = dbias {
                CudaDevice::column_sums_accumulate(self, cm(dbias)?, c(dy)?, (d.tokens, d.out))?;
            }
            return Ok(());
        };
        let ld = Self::lora_dims(d, &l);
        // Straight into the gradient buffers: no temporaries, no accumulate passes, and nothing
        // computed for a gradient nobody wants (dx of a first layer, dbias of a frozen bias).
        let grads = crate::cuda::LoraGrads {
            dx: dx.map(cm).transpose()?,
            da: da.map(cm).transpose()?,
            db: db.map(cm).transpose()?,
            dbias: dbias.map(cm).transpose()?,
        };
        CudaDevice::lora_backward_into(
            self,
            grads,
            c(dy)?,
            x,
            c(w)?,
            layout,
            c(l.a)?,
            c(l.b)?,
            c(u)?,
            ld,
        )
    }
    fn conv2d_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        bias: Option<&DBuf>,
        d: Conv2dDims,
    ) -> Result<DBuf> {
        let bias = bias.map(c).transpose()?;
        CudaDevice::conv2d_forward(self, c(x)?, c(w)?, bias, d).map(DBuf::Cuda)
    }
    fn conv2d_backward(
        &self,
        g: ConvGrads,
        dy: &DBuf,
        x: &DBuf,
        w: &DBuf,
        d: Conv2dDims,
    ) -> Result<()> {
        let ConvGrads { dx, dw, dbias } = g;
        let (dx, dw, dbias) = (
            dx.map(cm).transpose()?,
            dw.map(cm).transpose()?,
            dbias.map(cm).transpose()?,
        );
        // x is read for dW only; the tape passes an empty host buffer when it kept none.
        let x = if x.is_empty() { None } else { Some(c(x)?) };
        CudaDevice::conv2d_backward(self, dx, dw, dbias, c(dy)?, x, c(w)?, d)
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
        let (m, v, g, b) = (c(mean)?, c(var)?, c(gamma)?, c(beta)?);
        CudaDevice::batchnorm_forward(self, c(x)?, m, v, g, b, dims, eps).map(DBuf::Cuda)
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
        let (dx, dg, db) = (
            dx.map(cm).transpose()?,
            dgamma.map(cm).transpose()?,
            dbeta.map(cm).transpose()?,
        );
        // x is read for dgamma only; the tape passes an empty host buffer when it kept none.
        let x = if x.is_empty() { None } else { Some(c(x)?) };
        let (m, v, g) = (c(mean)?, c(var)?, c(gamma)?);
        CudaDevice::batchnorm_backward(self, dx, dg, db, c(dy)?, x, m, v, g, dims, eps)
    }
    fn geglu_forward(&self, x: &DBuf, f: usize) -> Result<DBuf> {
        let mut out = self.out(x.len() / 2)?;
        CudaDevice::geglu(self, false, &mut out, &[c(x)?], f)?;
        Ok(DBuf::Cuda(out))
    }
    fn geglu_backward(&self, dx: &mut DBuf, dout: &DBuf, x: &DBuf, f: usize) -> Result<()> {
        CudaDevice::geglu(self, true, cm(dx)?, &[c(dout)?, c(x)?], f)
    }
    fn add_planes_forward(&self, x: &DBuf, bias: &DBuf, inner: usize) -> Result<DBuf> {
        let mut out = self.out(x.len())?;
        CudaDevice::add_planes(self, false, &mut out, &[c(x)?, c(bias)?], inner)?;
        Ok(DBuf::Cuda(out))
    }
    fn add_planes_backward_bias(&self, dbias: &mut DBuf, dout: &DBuf, inner: usize) -> Result<()> {
        CudaDevice::add_planes(self, true, cm(dbias)?, &[c(dout)?], inner)
    }
    fn upsample_nearest_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<DBuf> {
        let mut y = self.out(planes * hw.0 * hw.1 * f * f)?;
        CudaDevice::upsample_nearest(self, false, &mut y, c(x)?, planes, hw, f)?;
        Ok(DBuf::Cuda(y))
    }
    fn upsample_nearest_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<()> {
        CudaDevice::upsample_nearest(self, true, cm(dx)?, c(dy)?, planes, hw, f)
    }
    fn max_pool2d_forward(&self, x: &DBuf, d: PoolDims) -> Result<DBuf> {
        CudaDevice::max_pool2d_forward(self, c(x)?, d).map(DBuf::Cuda)
    }
    fn max_pool2d_backward(&self, dx: &mut DBuf, dy: &DBuf, x: &DBuf, d: PoolDims) -> Result<()> {
        CudaDevice::max_pool2d_backward(self, cm(dx)?, c(dy)?, c(x)?, d)
    }
    fn adaptive_avg_pool2d_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<DBuf> {
        let mut y = self.out(planes * out.0 * out.1)?;
        self.adaptive_avg_pool2d(false, &mut y, c(x)?, planes, hw, out)?;
        Ok(DBuf::Cuda(y))
    }
    fn adaptive_avg_pool2d_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<()> {
        self.adaptive_avg_pool2d(true, cm(dx)?, c(dy)?, planes, hw, out)
    }
    fn cross_entropy_forward(
        &self,
        logits: &DBuf,
        targets: &[i32],
        v: usize,
    ) -> Result<(f32, usize, DBuf)> {
        const OP: &str = "cross_entropy_forward";
        let n = targets.len();
        check_len(OP, "logits", logits.len(), &[n, v])?;
        check_targets(OP, targets, v)?;
        let (mut lse, mut row_loss) = (self.out(n)?, self.out(n)?);
        let (ls, ts) = (c(logits)?, self.ints(targets)?);
        let (ni, vi) = (n as i32, v as i32);
        self.run(OP, rows_cfg(n), |l| {
            l.arg(&mut lse)
                .arg(&mut row_loss)
                .arg(ls)
                .arg(&ts)
                .arg(&ni)
                .arg(&vi);
        })?;
        // Summed on the host in f64, in row order, as the CPU kernel does.
        let rows = CudaDevice::download(self, &row_loss)?;
        let count = targets.iter().filter(|&&t| t >= 0).count();
        let total: f64 = rows.iter().map(|&r| r as f64).sum();
        let loss = if count == 0 {
            0.0
        } else {
            (total / count as f64) as f32
        };
        Ok((loss, count, DBuf::Cuda(lse)))
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
        const OP: &str = "cross_entropy_backward";
        let n = targets.len();
        check_len(OP, "dlogits", dlogits.len(), &[n, v])?;
        check_len(OP, "logits", logits.len(), &[n, v])?;
        check_len(OP, "lse", lse.len(), &[n])?;
        if count == 0 {
            return Ok(());
        }
        let scale = dloss / count as f32;
        let (ls, es, ts) = (c(logits)?, c(lse)?, self.ints(targets)?);
        let dl = cm(dlogits)?;
        let (ni, vi) = (n as i32, v as i32);
        self.run(OP, rows_cfg(n), |l| {
            l.arg(dl)
                .arg(ls)
                .arg(es)
                .arg(&ts)
                .arg(&ni)
                .arg(&vi)
                .arg(&scale);
        })
    }
    fn linear_cross_entropy(
        &self,
        x: &DBuf,
        w: DWeight,
        targets: &[i32],
        cc: usize,
        v: usize,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<HeadOut> {
        // The logits (N, V) of these rows exist once on the device (the caller passes row
        // chunks of bounded size); their gradient is computed in the same call, then folded
        // into dx and dW by one more product each.
        let n = targets.len();
        let d = LinearDims {
            tokens: n,
            inp: cc,
            out: v,
        };
        let mut tmp = None;
        let w = wide(self, w, &mut tmp)?;
        let (logits, _) =
            Accel::linear_forward(self, x, DWeight::F32(w), WeightLayout::OutIn, None, None, d)?;
        let (loss, count, lse) = Accel::cross_entropy_forward(self, &logits, targets, v)?;
        let mut out = HeadOut {
            loss,
            count,
            dx: None,
            dw: None,
        };
        if !want_dx && !want_dw {
            return Ok(out);
        }
        let mut dlogits = Accel::zeros(self, n * v)?;
        Accel::cross_entropy_backward(self, &mut dlogits, 1.0, &logits, &lse, targets, v, count)?;
        drop(logits);
        let (layout, dims) = (WeightLayout::OutIn, (n, cc, v));
        if want_dx {
            let dx = CudaDevice::linear_backward_dx(self, c(&dlogits)?, c(w)?, layout, dims)?;
            out.dx = Some(DBuf::Cuda(dx));
        }
        if want_dw {
            let mut dw = Accel::zeros(self, v * cc)?;
            let dwc = cm(&mut dw)?;
            self.linear_backward_dw_accumulate(dwc, c(&dlogits)?, c(x)?, layout, dims)?;
            out.dw = Some(dw);
        }
        Ok(out)
    }
    fn adamw(&self, p: &mut DBuf, g: &DBuf, m: &mut DBuf, v: &mut DBuf, h: AdamStep) -> Result<()> {
        let n = p.len();
        same_len(
            "adamw_step",
            &[("grad", g.len()), ("m", m.len()), ("v", v.len())],
            n,
        )?;
        let (ps, gs, ms, vs) = (cm(p)?, c(g)?, cm(m)?, cm(v)?);
        let ni = n as i64;
        let (step_size, bc2, decay) = (h.step_size(), h.bc2_sqrt(), h.decay());
        // (param, grad, m, v, n, decay, beta1, beta2, eps, step_size, bc2_sqrt), as adamw.cu.
        self.run("adamw_step", flat_cfg(n), |l| {
            l.arg(ps).arg(gs).arg(ms).arg(vs).arg(&ni);
            l.arg(&decay).arg(&h.beta1).arg(&h.beta2).arg(&h.eps);
            l.arg(&step_size).arg(&bc2);
        })
    }
}
