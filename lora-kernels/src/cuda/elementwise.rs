//! `elementwise.cu`: launches of element-wise kernels, 16-bit widening and column slices.

use super::*;

impl CudaDevice {
    /// Runs an element-wise kernel of `elementwise.cu` / `adamw.cu` by name over `n` elements
    /// with the given buffers (outputs first) — the launch shape every such kernel shares.
    pub fn launch_elementwise(
        &self,
        name: &str,
        outs: &mut [&mut CudaSlice<f32>],
        ins: &[&CudaSlice<f32>],
        n: usize,
    ) -> Result<()> {
        let n_i = n as i64;
        let cfg = grid(blocks(n, THREADS as usize).clamp(1, 65535), 1);
        let mut l = self.stream.launch_builder(self.func(name));
        for o in outs.iter_mut() {
            l.arg(&mut **o);
        }
        for i in ins {
            l.arg(*i);
        }
        l.arg(&n_i);
        // SAFETY: callers pass buffers in the kernel's order, each with at least n elements.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(cerr("element-wise kernel"))
    }

    /// GEGLU forward (`out` `(rows, f)` from `x` `(rows, 2f)`) or backward (`dx` += from
    /// `dout`, `x`): the twins of [`crate::ops::elementwise::geglu_forward`] / `geglu_backward`.
    pub fn geglu(
        &self,
        backward: bool,
        out: &mut CudaSlice<f32>,
        ins: &[&CudaSlice<f32>],
        f: usize,
    ) -> Result<()> {
        let n = if backward { ins[0].len() } else { out.len() }; // rows * f
        let x = ins[ins.len() - 1];
        if x.len() != 2 * n || (backward && out.len() != 2 * n) || (f > 0 && n % f != 0) {
            return Err(KernelError::Device(format!(
                "geglu: x holds {}, out {}, {n} outputs of rows of {f}",
                x.len(),
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (n_i, f_i) = (
            n as i64,
            i32::try_from(f)
                .map_err(|_| KernelError::Device(format!("geglu: {f} features per row")))?,
        );
        let name = if backward {
            "geglu_backward"
        } else {
            "geglu_forward"
        };
        let cfg = grid(blocks(n, THREADS as usize).clamp(1, 65535), 1);
        let mut l = self.stream.launch_builder(self.func(name));
        l.arg(out);
        for i in ins {
            l.arg(*i);
        }
        l.arg(&n_i).arg(&f_i);
        // SAFETY: argument order matches elementwise.cu; lengths checked above.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(cerr(name))
    }

    /// `out = x + bias` over planes of `inner` values, or (`backward`) `dbias += ` the plane
    /// sums of `dout`: the twins of [`crate::ops::elementwise::add_planes_forward`] /
    /// `add_planes_backward_bias`.
    pub fn add_planes(
        &self,
        backward: bool,
        out: &mut CudaSlice<f32>,
        ins: &[&CudaSlice<f32>],
        inner: usize,
    ) -> Result<()> {
        let (planes, n) = if backward {
            (out.len(), ins[0].len())
        } else {
            (ins[1].len(), ins[0].len())
        };
        if n != planes * inner || (!backward && out.len() != n) {
            return Err(KernelError::Device(format!(
                "add_planes: {n} values are not {planes} planes of {inner}"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let inner_i = i32::try_from(inner)
            .map_err(|_| KernelError::Device(format!("add_planes: planes of {inner}")))?;
        let (name, count, threads) = if backward {
            ("add_planes_backward_bias", planes as i64, planes * 32)
        } else {
            ("add_planes_forward", n as i64, n)
        };
        let cfg = if backward {
            grid(blocks(threads, THREADS as usize), 1)
        } else {
            grid(blocks(threads, THREADS as usize).clamp(1, 65535), 1)
        };
        let mut l = self.stream.launch_builder(self.func(name));
        l.arg(out);
        for i in ins {
            l.arg(*i);
        }
        l.arg(&count).arg(&inner_i);
        // SAFETY: argument order matches elementwise.cu; lengths checked above.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(cerr(name))
    }

    /// A 16-bit frozen weight (bf16 or f16 bits, `half = true` for f16) widened to f32 on the
    /// device: the twin of [`crate::operands::WeightData::widen`].
    pub fn widen(&self, bits: &CudaSlice<u16>, f16: bool) -> Result<CudaSlice<f32>> {
        let n = bits.len();
        let mut out = self.output(n)?;
        let name = if f16 { "widen_f16" } else { "widen_bf16" };
        let n_i = n as i64;
        let cfg = grid(blocks(n, THREADS as usize).clamp(1, 65535), 1);
        let mut l = self.stream.launch_builder(self.func(name));
        l.arg(&mut out).arg(bits).arg(&n_i);
        // SAFETY: argument types and order match elementwise.cu; out holds n values.
        unsafe { l.launch(cfg) }.map_err(cerr("widen"))?;
        Ok(out)
    }

    /// Columns `[start, start + len)` of the `(n, cols)` matrix `x` into `out` (`forward`), or
    /// `dx[:, start..start + len] += dout` (`!forward`): the twins of
    /// [`crate::ops::slice::narrow_forward`] / `narrow_backward`, outputs first.
    #[allow(clippy::too_many_arguments)]
    pub fn narrow(
        &self,
        forward: bool,
        out: &mut CudaSlice<f32>,
        input: &CudaSlice<f32>,
        n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<()> {
        let (o_len, i_len) = if forward {
            (n * len, n * cols)
        } else {
            (n * cols, n * len)
        };
        if start + len > cols || out.len() != o_len || input.len() != i_len {
            return Err(KernelError::Device(format!(
                "narrow: columns {start}..{} of {cols}, n {n}: buffers {} and {}",
                start + len,
                out.len(),
                input.len()
            )));
        }
        let name = if forward {
            "narrow_forward"
        } else {
            "narrow_backward"
        };
        let (n_i, c, s, l) = (n as i64, cols as i32, start as i32, len as i32);
        let cfg = grid(blocks(n * len, THREADS as usize).clamp(1, 65535), 1);
        let mut lb = self.stream.launch_builder(self.func(name));
        lb.arg(out).arg(input).arg(&n_i).arg(&c).arg(&s).arg(&l);
        // SAFETY: argument types and order match elementwise.cu; lengths checked above.
        unsafe { lb.launch(cfg) }.map_err(cerr("narrow"))?;
        Ok(())
    }

    /// `out (batch, n, m) = x (batch, m, n)` with the last two dimensions swapped, written or
    /// (`accumulate`) added: the twin of [`crate::ops::slice::transpose`].
    pub fn transpose(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        batch: usize,
        m: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let total = batch
            .checked_mul(m)
            .and_then(|v| v.checked_mul(n))
            .filter(|_| m <= i32::MAX as usize && n <= i32::MAX as usize)
            .ok_or_else(|| {
                KernelError::Device(format!("transpose: ({batch}, {m}, {n}) overflows"))
            })?;
        if out.len() != total || x.len() != total {
            return Err(KernelError::Device(format!(
                "transpose: ({batch}, {m}, {n}) needs {total} values, buffers hold {} and {}",
                out.len(),
                x.len()
            )));
        }
        if total == 0 {
            return Ok(());
        }
        let (b_i, m_i, n_i, acc) = (batch as i64, m as i32, n as i32, accumulate as i32);
        let cfg = grid(blocks(total, THREADS as usize).clamp(1, 65535), 1);
        let mut lb = self.stream.launch_builder(self.func("transpose_last2"));
        lb.arg(out).arg(x).arg(&b_i).arg(&m_i).arg(&n_i).arg(&acc);
        // SAFETY: argument types and order match elementwise.cu; lengths checked above.
        unsafe { lb.launch(cfg) }.map_err(cerr("transpose"))?;
        Ok(())
    }
}
