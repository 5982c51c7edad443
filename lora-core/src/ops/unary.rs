//! Element-wise activations: GELU (tanh approximation) and SiLU.

use super::*;

/// GELU, tanh approximation (GPT-2's `gelu_new`).
pub fn gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::Gelu)
}

/// `sigmoid(x) = 1 / (1 + e^-x)`.
pub fn sigmoid(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::Sigmoid)
}

/// SiLU (`x * sigmoid(x)`).
pub fn silu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::Silu)
}

/// Exact GELU (`x Phi(x)`, with erf: PyTorch's `nn.GELU()`, ViT's `hidden_act = "gelu"`).
pub fn gelu_erf(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::GeluErf)
}

/// CLIP's `quick_gelu` (`x sigmoid(1.702 x)`).
pub fn quick_gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::QuickGelu)
}

/// ReLU (`max(x, 0)`).
pub fn relu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, x, Unary::Relu)
}

fn unary(tape: &Tape, x: &Tensor, f: Unary) -> Result<Tensor> {
    let on = placement(unary_name(f), &[("x", x)])?;
    let g = read(x)?;
    let out = on.accel.unary_forward(f, f32_of(&g)?)?;
    drop(g);
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    on.record(tape, UnaryNode(f), vec![x.clone()], &y);
    Ok(y)
}

fn unary_name(f: Unary) -> &'static str {
    match f {
        Unary::Gelu => "gelu",
        Unary::GeluErf => "gelu_erf",
        Unary::Silu => "silu",
        Unary::Relu => "relu",
        Unary::Sigmoid => "sigmoid",
        Unary::QuickGelu => "quick_gelu",
    }
}

/// [x]
struct UnaryNode(Unary);

impl OpNode for UnaryNode {
    fn name(&self) -> &'static str {
        unary_name(self.0)
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    /// The input is a product's output in the models (bf16 under autocast).
    fn saves_bf16(&self, _: usize) -> bool {
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
        if let Some(g) = g.take(0) {
            a.unary_backward(self.0, g, dout, data[0])?;
        }
        Ok(())
    }
}
