//! Rotary position embedding (`rotate_half`).

use super::*;
use lora_kernels::ops::rope;

/// Precomputed RoPE tables shared by all layers of a model.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// `(P, D/2)`.
    pub cos: Arc<Vec<f32>>,
    /// `(P, D/2)`.
    pub sin: Arc<Vec<f32>>,
    /// D.
    pub head_dim: usize,
    /// Copies on a device, made on first use there.
    device_copy: Arc<Mutex<Option<(Device, Tensor, Tensor)>>>,
}

impl RopeTables {
    /// Tables for positions `0..max_pos` from inverse frequencies `(D/2)`.
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let (c, s) = rope::rope_tables(inv_freq, max_pos);
        Self {
            cos: Arc::new(c),
            sin: Arc::new(s),
            head_dim: inv_freq.len() * 2,
            device_copy: Arc::default(),
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    /// The tables as tensors on `device` (uploaded once per device and shared by the clones).
    pub(crate) fn on_device(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let mut g = self.device_copy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((d, c, s)) = g.as_ref() {
            if *d == device {
                return Ok((c.clone(), s.clone()));
            }
        }
        let shape = [self.positions(), self.head_dim / 2];
        let c = Tensor::new_on(self.cos.to_vec(), &shape, false, device)?;
        let s = Tensor::new_on(self.sin.to_vec(), &shape, false, device)?;
        *g = Some((device, c.clone(), s.clone()));
        Ok((c, s))
    }
}

/// Rotary embedding on `x` `(N, H * D)` (or `(B, T, H * D)`) with one position per row.
pub fn rope(
    tape: &Tape,
    x: &Tensor,
    tables: &RopeTables,
    positions: &[u32],
    heads: usize,
) -> Result<Tensor> {
    let hd = tables.head_dim;
    if x.last_dim() != heads * hd || x.rows() != positions.len() {
        return Err(shape_err(
            "rope",
            "x",
            x,
            format!("({} rows, {heads} * {hd})", positions.len()),
        ));
    }
    let on = placement("rope", &[("x", x)])?;
    let (cos, sin) = tables.on_device(x.device())?;
    let mut out = on.accel.zeros(x.numel())?;
    {
        let (gx, gc, gs) = (read(x)?, read(&cos)?, read(&sin)?);
        let hd = tables.head_dim;
        on.accel.rope(
            false,
            &mut out,
            f32_of(&gx)?,
            f32_of(&gc)?,
            f32_of(&gs)?,
            positions,
            heads,
            hd,
        )?;
    }
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    let op = RopeNode {
        cos,
        sin,
        positions: positions.to_vec(),
        heads,
        head_dim: tables.head_dim,
    };
    on.record(tape, op, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct RopeNode {
    cos: Tensor,
    sin: Tensor,
    positions: Vec<u32>,
    heads: usize,
    head_dim: usize,
}

impl OpNode for RopeNode {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn saved_elems(&self) -> usize {
        self.positions.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            let (gc, gs) = (read(&self.cos)?, read(&self.sin)?);
            a.rope(
                true,
                g,
                dout,
                f32_of(&gc)?,
                f32_of(&gs)?,
                &self.positions,
                self.heads,
                self.head_dim,
            )?;
        }
        Ok(())
    }
}
