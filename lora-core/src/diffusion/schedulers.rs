//! Noise schedules and samplers of Stable Diffusion, with diffusers' semantics (its
//! `scheduler_config.json` fields; `lora_io::diffusion` reads the file):
//!
//! - [`NoiseSchedule`]: the training side (DDPM): `betas` from `beta_schedule` (`linear`,
//!   `scaled_linear`, `squaredcos_cap_v2`, optionally rescaled to zero terminal SNR),
//!   `alphas_cumprod`, `add_noise`, the v-prediction target (`get_velocity`), and SNR(t) for
//!   min-SNR weighting.
//! - [`Ddim`] (deterministic, eta = 0), [`Euler`] (`EulerDiscreteScheduler`, linear sigma
//!   interpolation, final sigma 0) and [`DpmSolverPP`] (DPM++ 2M): inference, for epsilon, v and
//!   sample prediction, with the three `timestep_spacing`s.
//!
//! The schedule is computed in f64 (diffusers computes it in f32; the fixtures compare within
//! f32 rounding); latents are f32 slices, one sample or a whole batch at the same timestep.

use crate::error::{CoreError, Result};

fn invalid(field: &'static str, reason: String) -> CoreError {
    CoreError::InvalidConfig { field, reason }
}

/// How the betas run over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))^2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine `alpha_bar` of improved DDPM, betas capped at 0.999.
    SquaredCosCapV2,
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (SD 1.x, SD 2 base).
    Epsilon,
    /// `v = sqrt(a) noise - sqrt(1 - a) x0` (SD 2.x 768).
    V,
    /// The clean sample.
    Sample,
}

/// How inference picks its timesteps (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// `arange(n) * (T // n) + steps_offset`, descending.
    Leading,
    /// `round(arange(T, 0, -T / n)) - 1`.
    Trailing,
    /// `linspace(0, T - 1, n)`, descending (rounded for DDIM; fractional for Euler).
    Linspace,
}

/// The fields of `scheduler_config.json` these schedulers use.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleConfig {
    /// `num_train_timesteps` (T).
    pub num_train_timesteps: usize,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`.
    pub beta_schedule: BetaSchedule,
    /// `prediction_type`.
    pub prediction: Prediction,
    /// `timestep_spacing`.
    pub spacing: Spacing,
    /// `steps_offset` (added to leading timesteps).
    pub steps_offset: usize,
    /// DDIM's last step goes to `alpha_cumprod = 1` (else to `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// `rescale_betas_zero_snr`: rescale the betas so the last timestep is pure noise.
    pub rescale_betas_zero_snr: bool,
    /// DDIM's `clip_sample` / `clip_sample_range`: the predicted x0 clamped to
    /// `[-range, range]` (`None`: not clipped). Euler has no such step.
    pub clip_sample: Option<f64>,
    /// DPM++'s `solver_order` (1 or 2).
    pub solver_order: usize,
    /// DPM++'s `solver_type`: `heun` (true) or `midpoint` (false, diffusers' default).
    pub solver_heun: bool,
}

impl Default for ScheduleConfig {
    /// Stable Diffusion 1.5's values (`scheduler_config.json` of the v1-5 repositories).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction: Prediction::Epsilon,
            spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            solver_order: 2,
            solver_heun: false,
        }
    }
}

/// `alphas_cumprod` of a [`ScheduleConfig`] and the training-side formulas.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    cfg: ScheduleConfig,
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule of `cfg` (a named error for values outside their ranges).
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        let t = cfg.num_train_timesteps;
        if !(2..=100_000).contains(&t) {
            return Err(invalid(
                "num_train_timesteps",
                format!("{t}: expected 2 to 100000"),
            ));
        }
        let ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
        if cfg.beta_schedule != BetaSchedule::SquaredCosCapV2
            && !(ok(cfg.beta_start) && ok(cfg.beta_end))
        {
            return Err(invalid(
                "beta_start",
                format!(
                    "beta_start {} and beta_end {} must lie in (0, 1)",
                    cfg.beta_start, cfg.beta_end
                ),
            ));
        }
        let lin = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (t - 1) as f64;
        let mut betas: Vec<f64> = (0..t)
            .map(|i| match cfg.beta_schedule {
                BetaSchedule::Linear => lin(cfg.beta_start, cfg.beta_end, i),
                BetaSchedule::ScaledLinear => {
                    lin(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), i).powi(2)
                }
                BetaSchedule::SquaredCosCapV2 => {
                    let f = |s: f64| {
                        ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    let (s0, s1) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                    (1.0 - f(s1) / f(s0)).min(0.999)
                }
            })
            .collect();
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            alphas_cumprod,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ScheduleConfig {
        &self.cfg
    }

    /// `alpha_bar(t)` for the training timesteps `0..T`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn at(&self, t: usize) -> Result<f64> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            invalid(
                "timestep",
                format!(
                    "{t} is past the {} training timesteps",
                    self.alphas_cumprod.len()
                ),
            )
        })
    }

    /// `x_t = sqrt(a) x0 + sqrt(1 - a) noise`, `a = alpha_bar(t)` (diffusers' `add_noise`).
    pub fn add_noise(&self, x0: &[f32], noise: &[f32], t: usize) -> Result<Vec<f32>> {
        let a = self.at(t)?;
        combine(x0, noise, a.sqrt(), (1.0 - a).sqrt())
    }

    /// `v = sqrt(a) noise - sqrt(1 - a) x0` (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: &[f32], noise: &[f32], t: usize) -> Result<Vec<f32>> {
        let a = self.at(t)?;
        combine(noise, x0, a.sqrt(), -(1.0 - a).sqrt())
    }

    /// What the model should output at `t` for this `prediction_type`: the noise, `v`, or x0.
    pub fn target(&self, x0: &[f32], noise: &[f32], t: usize) -> Result<Vec<f32>> {
        match self.cfg.prediction {
            Prediction::Epsilon => Ok(noise.to_vec()),
            Prediction::V => self.velocity(x0, noise, t),
            Prediction::Sample => Ok(x0.to_vec()),
        }
    }

    /// `SNR(t) = a / (1 - a)` (min-SNR loss weighting).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let a = self.at(t)?;
        Ok(a / (1.0 - a))
    }

    /// `sigma(t) = sqrt((1 - a) / a)` at each of `timesteps` (interpolated linearly between
    /// training timesteps, as `np.interp`), and a final 0.
    fn sigmas_at(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        let t = self.alphas_cumprod.len();
        let table: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas = Vec::with_capacity(timesteps.len() + 1);
        for &ts in timesteps {
            if !(0.0..=(t - 1) as f64).contains(&ts) {
                return Err(invalid(
                    "steps_offset",
                    format!("timestep {ts} is past the {t} training timesteps"),
                ));
            }
            let lo = ts.floor() as usize;
            let hi = (lo + 1).min(t - 1);
            let f = ts - lo as f64;
            sigmas.push(table[lo] + (table[hi] - table[lo]) * f);
        }
        sigmas.push(0.0);
        Ok(sigmas)
    }

    /// `(x0, eps)` predicted from the model output at `alpha_bar = a`.
    fn predict(&self, out: f64, x: f64, a: f64) -> (f64, f64) {
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        match self.cfg.prediction {
            Prediction::Epsilon => ((x - sb * out) / sa, out),
            Prediction::Sample => (out, (x - sa * out) / sb),
            Prediction::V => (sa * x - sb * out, sa * out + sb * x),
        }
    }
}

/// diffusers' `rescale_zero_terminal_snr`: shift and scale `sqrt(alpha_bar)` so the last step's
/// is 0 and the first's unchanged, then recover the betas.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let sq: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            f64::sqrt(acc)
        })
        .collect();
    let (s0, st) = (sq[0], sq[sq.len() - 1]);
    let bar: Vec<f64> = sq
        .iter()
        .map(|s| ((s - st) * s0 / (s0 - st)).powi(2))
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `p a + q b` elementwise (f64 coefficients applied in f32 after rounding them, as diffusers
/// does with its f32 tensors).
fn combine(a: &[f32], b: &[f32], p: f64, q: f64) -> Result<Vec<f32>> {
    if a.len() != b.len() {
        return Err(invalid(
            "noise",
            format!("{} values for a sample of {}", b.len(), a.len()),
        ));
    }
    let (p, q) = (p as f32, q as f32);
    Ok(a.iter().zip(b).map(|(x, y)| p * x + q * y).collect())
}

/// An inference sampler: the timesteps to run the model at, how to scale its input, and one
/// step from `x_t` to the next sample given the model's output.
pub trait Sampler {
    /// The timesteps, in order (fractional for [`Euler`] with linspace spacing).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation the initial latents are scaled by (diffusers'
    /// `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// The model input at step `i` (diffusers' `scale_model_input`).
    fn scale_model_input(&self, x: &[f32], i: usize) -> Vec<f32>;
    /// The sample after step `i`, from the model's output at `timesteps()[i]` (multistep
    /// samplers remember earlier steps' predictions: run the steps in order from 0).
    fn step(&mut self, model_out: &[f32], i: usize, x: &[f32]) -> Result<Vec<f32>>;
}

fn check_steps(cfg: &ScheduleConfig, n: usize) -> Result<()> {
    if n == 0 || n > cfg.num_train_timesteps {
        return Err(invalid(
            "steps",
            format!(
                "{n} inference steps: expected 1 to num_train_timesteps ({})",
                cfg.num_train_timesteps
            ),
        ));
    }
    Ok(())
}

/// Zero terminal SNR makes the first sigma infinite (diffusers clamps alpha_bar there; not
/// implemented here): refused rather than stepping to NaN.
fn no_zero_snr(cfg: &ScheduleConfig, sampler: &str) -> Result<()> {
    if cfg.rescale_betas_zero_snr {
        return Err(invalid(
            "rescale_betas_zero_snr",
            format!("{sampler} with zero terminal SNR is not supported yet"),
        ));
    }
    Ok(())
}

fn check_step(i: usize, n: usize, model_out: &[f32], x: &[f32]) -> Result<()> {
    if i >= n {
        return Err(invalid("step", format!("step {i} of {n}")));
    }
    if model_out.len() != x.len() {
        return Err(invalid(
            "model_output",
            format!("{} values for a sample of {}", model_out.len(), x.len()),
        ));
    }
    Ok(())
}

/// DDIM with eta = 0 (`DDIMScheduler`): deterministic.
#[derive(Clone, Debug)]
pub struct Ddim {
    sched: NoiseSchedule,
    timesteps: Vec<f64>,
}

impl Ddim {
    /// DDIM over `steps` inference steps of `cfg`'s schedule.
    pub fn new(cfg: &ScheduleConfig, steps: usize) -> Result<Self> {
        check_steps(cfg, steps)?;
        let t = cfg.num_train_timesteps;
        let ts: Vec<usize> = match cfg.spacing {
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| linspace(t, steps, i).round_ties_even() as usize)
                .collect(),
            Spacing::Leading => (0..steps)
                .rev()
                .map(|i| i * (t / steps) + cfg.steps_offset)
                .collect(),
            Spacing::Trailing => trailing(t, steps),
        };
        if let Some(&bad) = ts.iter().find(|&&x| x >= t) {
            return Err(invalid(
                "steps_offset",
                format!("timestep {bad} is past the {t} training timesteps"),
            ));
        }
        Ok(Self {
            sched: NoiseSchedule::new(cfg)?,
            timesteps: ts.into_iter().map(|x| x as f64).collect(),
        })
    }
}

/// `linspace(0, T - 1, n)[i]` as numpy computes it: `i * ((T - 1) / (n - 1))`, the last point
/// exactly `T - 1` (the order of the operations decides ties when rounding: 499.49999999999994,
/// not 499.5, at i = 13 of 27 over 1000).
fn linspace(t: usize, n: usize, i: usize) -> f64 {
    if n == 1 {
        return 0.0;
    }
    if i == n - 1 {
        return (t - 1) as f64;
    }
    i as f64 * ((t - 1) as f64 / (n - 1) as f64)
}

/// `round(arange(T, 0, -T / n)) - 1` as numpy computes it: values `T + k * ((T - T / n) - T)`,
/// rounded half to even; the first `n` of them. (numpy's `arange` length, `ceil(T / (T / n))`,
/// can round up to n + 1, e.g. T = 1000, n = 61: diffusers 0.42.1 then runs 62 steps, the last
/// at timestep -1, which indexes its noisiest alpha_bar. The n steps asked for are given here.)
fn trailing(t: usize, n: usize) -> Vec<usize> {
    let ratio = t as f64 / n as f64;
    let len = ((t as f64 / ratio).ceil() as usize).min(n);
    let delta = (t as f64 - ratio) - t as f64;
    (0..len)
        .map(|k| {
            // The last value is about T / n >= 1 (n <= T is checked), so v - 1 >= 0.
            let v = (t as f64 + k as f64 * delta).round_ties_even();
            (v as usize).saturating_sub(1)
        })
        .collect()
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &[f32], _: usize) -> Vec<f32> {
        x.to_vec()
    }
    fn step(&mut self, model_out: &[f32], i: usize, x: &[f32]) -> Result<Vec<f32>> {
        let n = self.timesteps.len();
        check_step(i, n, model_out, x)?;
        let cfg = self.sched.config();
        let t = self.timesteps[i] as usize;
        // diffusers: prev = t - T // n, whatever the spacing.
        let prev = t as i64 - (cfg.num_train_timesteps / n) as i64;
        let a = self.sched.at(t)?;
        let a_prev = if prev >= 0 {
            self.sched.at(prev as usize)?
        } else if cfg.set_alpha_to_one {
            1.0
        } else {
            self.sched.alphas_cumprod[0]
        };
        Ok(model_out
            .iter()
            .zip(x)
            .map(|(&o, &s)| {
                let (x0, eps) = self.sched.predict(o as f64, s as f64, a);
                let x0 = cfg.clip_sample.map_or(x0, |r| x0.clamp(-r, r));
                (a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps) as f32
            })
            .collect())
    }
}

/// `EulerDiscreteScheduler` (no churn; sigmas interpolated linearly in t; final sigma 0).
#[derive(Clone, Debug)]
pub struct Euler {
    sched: NoiseSchedule,
    timesteps: Vec<f64>,
    /// One more than the timesteps: the last is 0.
    sigmas: Vec<f64>,
}

impl Euler {
    /// Euler over `steps` inference steps of `cfg`'s schedule.
    pub fn new(cfg: &ScheduleConfig, steps: usize) -> Result<Self> {
        check_steps(cfg, steps)?;
        no_zero_snr(cfg, "Euler")?;
        let sched = NoiseSchedule::new(cfg)?;
        let t = cfg.num_train_timesteps;
        let timesteps: Vec<f64> = match cfg.spacing {
            // numpy's f32 linspace, as diffusers builds it.
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| linspace(t, steps, i) as f32 as f64)
                .collect(),
            Spacing::Leading => (0..steps)
                .rev()
                .map(|i| (i * (t / steps) + cfg.steps_offset) as f64)
                .collect(),
            Spacing::Trailing => trailing(t, steps).into_iter().map(|x| x as f64).collect(),
        };
        let sigmas = sched.sigmas_at(&timesteps)?;
        Ok(Self {
            sched,
            timesteps,
            sigmas,
        })
    }

    /// The sigmas, one per timestep and a final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// The largest sigma for linspace and trailing spacing, `sqrt(sigma^2 + 1)` for leading
    /// (diffusers' rule).
    fn init_noise_sigma(&self) -> f64 {
        let m = self.sigmas.iter().cloned().fold(0.0, f64::max);
        match self.sched.config().spacing {
            Spacing::Linspace | Spacing::Trailing => m,
            Spacing::Leading => (m * m + 1.0).sqrt(),
        }
    }
    fn scale_model_input(&self, x: &[f32], i: usize) -> Vec<f32> {
        let s = self.sigmas[i.min(self.sigmas.len() - 1)];
        let inv = 1.0 / (s * s + 1.0).sqrt();
        x.iter().map(|&v| (v as f64 * inv) as f32).collect()
    }
    fn step(&mut self, model_out: &[f32], i: usize, x: &[f32]) -> Result<Vec<f32>> {
        check_step(i, self.timesteps.len(), model_out, x)?;
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let pred = self.sched.config().prediction;
        Ok(model_out
            .iter()
            .zip(x)
            .map(|(&o, &v)| {
                let (o, v) = (o as f64, v as f64);
                let x0 = match pred {
                    Prediction::Epsilon => v - s * o,
                    Prediction::V => o * (-s / (s * s + 1.0).sqrt()) + v / (s * s + 1.0),
                    Prediction::Sample => o,
                };
                (v + (v - x0) / s * (s_next - s)) as f32
            })
            .collect())
    }
}

/// DPM-Solver++ (`DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`, final
/// sigma 0): second order from the second step on ("DPM++ 2M"), first order on the first and the
/// last; `solver_order` 1 or 2, `solver_type` midpoint or heun.
#[derive(Clone, Debug)]
pub struct DpmSolverPP {
    sched: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    order: usize,
    heun: bool,
    /// The previous step's index and x0 prediction.
    prev: Option<(usize, Vec<f64>)>,
}

impl DpmSolverPP {
    /// DPM++ over `steps` inference steps of `cfg`'s schedule (its `solver_order` and
    /// `solver_type`).
    pub fn new(cfg: &ScheduleConfig, steps: usize) -> Result<Self> {
        check_steps(cfg, steps)?;
        let (order, heun) = (cfg.solver_order, cfg.solver_heun);
        no_zero_snr(cfg, "DPM++")?;
        if !(1..=2).contains(&order) {
            return Err(invalid(
                "solver_order",
                format!("{order}: DPM++ is implemented for orders 1 and 2"),
            ));
        }
        let sched = NoiseSchedule::new(cfg)?;
        let t = cfg.num_train_timesteps;
        // diffusers spaces n + 1 points and drops the last (0) for linspace and leading.
        let timesteps: Vec<f64> = match cfg.spacing {
            Spacing::Linspace => (1..=steps)
                .rev()
                .map(|i| linspace(t, steps + 1, i).round_ties_even())
                .collect(),
            Spacing::Leading => (1..=steps)
                .rev()
                .map(|i| (i * (t / (steps + 1)) + cfg.steps_offset) as f64)
                .collect(),
            Spacing::Trailing => trailing(t, steps).into_iter().map(|x| x as f64).collect(),
        };
        let sigmas = sched.sigmas_at(&timesteps)?;
        Ok(Self {
            sched,
            timesteps,
            sigmas,
            order,
            heun,
            prev: None,
        })
    }

    /// The sigmas, one per timestep and a final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// `(alpha_t, sigma_t, lambda_t)` of the VP parametrisation at Karras sigma `s`.
fn vp(s: f64) -> (f64, f64, f64) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    let sig = s * a;
    (a, sig, a.ln() - sig.ln())
}

impl Sampler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &[f32], _: usize) -> Vec<f32> {
        x.to_vec()
    }
    fn step(&mut self, model_out: &[f32], i: usize, x: &[f32]) -> Result<Vec<f32>> {
        let n = self.timesteps.len();
        check_step(i, n, model_out, x)?;
        let follows = matches!(&self.prev, Some((j, _)) if j + 1 == i);
        if !follows && i != 0 {
            return Err(invalid(
                "step",
                format!("DPM++ steps run in order from 0: step {i} after another"),
            ));
        }
        let prev = self.prev.take().filter(|_| follows).map(|(_, m)| m);
        let (s0, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (a0, sg0, l0) = vp(s0);
        // x0 predicted at this step (diffusers' convert_model_output).
        let pred = self.sched.config().prediction;
        let m0: Vec<f64> = model_out
            .iter()
            .zip(x)
            .map(|(&o, &v)| {
                let (o, v) = (o as f64, v as f64);
                match pred {
                    Prediction::Epsilon => (v - sg0 * o) / a0,
                    Prediction::V => a0 * v - sg0 * o,
                    Prediction::Sample => o,
                }
            })
            .collect();
        let out: Vec<f32> = if s_next == 0.0 {
            // The last step (final sigma 0): alpha_t = 1, sigma_t = 0, so x_t = x0.
            m0.iter().map(|&m| m as f32).collect()
        } else {
            let (at, sgt, lt) = vp(s_next);
            let h = lt - l0;
            let e = (-h).exp_m1(); // exp(-h) - 1
            let first = i == n - 1 || self.order == 1;
            match prev.filter(|_| !first) {
                None => x
                    .iter()
                    .zip(&m0)
                    .map(|(&v, &m)| ((sgt / sg0) * v as f64 - at * e * m) as f32)
                    .collect(),
                Some(m1) => {
                    let (_, _, l1) = vp(self.sigmas[i - 1]);
                    let r0 = (l0 - l1) / h;
                    x.iter()
                        .zip(m0.iter().zip(&m1))
                        .map(|(&v, (&m, &mp))| {
                            let d1 = (m - mp) / r0;
                            let second = if self.heun {
                                at * (e / h + 1.0) * d1
                            } else {
                                -0.5 * at * e * d1
                            };
                            ((sgt / sg0) * v as f64 - at * e * m + second) as f32
                        })
                        .collect()
                }
            }
        };
        self.prev = Some((i, m0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's schedule: the first and last alpha_bar, as the published values give them.
    #[test]
    fn sd15_schedule_ends_and_timesteps() {
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let a = s.alphas_cumprod();
        assert_eq!(a.len(), 1000);
        assert!((a[0] - (1.0 - 0.00085)).abs() < 1e-12);
        // Monotone, positive.
        assert!(a.windows(2).all(|w| w[1] < w[0] && w[1] > 0.0));
        let d = Ddim::new(&ScheduleConfig::default(), 10).unwrap();
        let want: Vec<f64> = (0..10).rev().map(|i| (i * 100 + 1) as f64).collect();
        assert_eq!(d.timesteps(), &want[..]);
        assert_eq!(
            trailing(1000, 10),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        // Zero terminal SNR: the last alpha_bar is 0, the first unchanged.
        let z = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        })
        .unwrap();
        assert!(z.alphas_cumprod()[999].abs() < 1e-12);
        assert!((z.alphas_cumprod()[0] - a[0]).abs() < 1e-12);
    }

    /// DDIM's clip_sample clamps the predicted x0 (the noise estimate is not re-derived, as in
    /// diffusers without `use_clipped_model_output`): by hand at the first step of 1.
    #[test]
    fn ddim_clips_the_predicted_sample() {
        let cfg = ScheduleConfig {
            clip_sample: Some(1.0),
            prediction: Prediction::Sample,
            ..Default::default()
        };
        let mut d = Ddim::new(&cfg, 1).unwrap();
        let (t, x, o) = (d.timesteps()[0] as usize, 0.5f32, 3.0f32);
        let s = NoiseSchedule::new(&cfg).unwrap();
        let a = s.alphas_cumprod()[t];
        let a_prev = s.alphas_cumprod()[0]; // set_alpha_to_one false
        let eps = (x as f64 - a.sqrt() * 3.0) / (1.0 - a).sqrt();
        let want = a_prev.sqrt() * 1.0 + (1.0 - a_prev).sqrt() * eps;
        let got = d.step(&[o], 0, &[x]).unwrap()[0];
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// Bad settings and shapes are named errors.
    #[test]
    fn bad_input_is_named() {
        let e = |r: Result<Ddim>| r.unwrap_err().to_string();
        assert!(e(Ddim::new(&ScheduleConfig::default(), 0)).contains("steps"));
        assert!(e(Ddim::new(&ScheduleConfig::default(), 1001)).contains("steps"));
        let cfg = ScheduleConfig {
            beta_end: 1.5,
            ..Default::default()
        };
        assert!(e(Ddim::new(&cfg, 10)).contains("beta"));
        let cfg = ScheduleConfig {
            steps_offset: 5,
            spacing: Spacing::Leading,
            ..Default::default()
        };
        assert!(e(Ddim::new(&cfg, 1000)).contains("past"));
        assert!(Ddim::new(&cfg, 10).is_ok());
        let mut d = Ddim::new(&ScheduleConfig::default(), 4).unwrap();
        assert!(d.step(&[0.0; 3], 0, &[0.0; 4]).is_err());
        assert!(d.step(&[0.0; 4], 4, &[0.0; 4]).is_err());
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        assert!(s.add_noise(&[0.0; 2], &[0.0; 2], 1000).is_err());
        // DPM++ remembers the previous step: steps run in order from 0.
        let mut p = DpmSolverPP::new(&ScheduleConfig::default(), 5).unwrap();
        let e = p.step(&[0.0; 2], 1, &[0.0; 2]).unwrap_err().to_string();
        assert!(e.contains("in order"), "{e}");
        p.step(&[0.0; 2], 0, &[0.0; 2]).unwrap();
        assert!(p.step(&[0.0; 2], 2, &[0.0; 2]).is_err());
        p.step(&[0.0; 2], 1, &[0.0; 2]).unwrap(); // the refused call changed nothing
        let cfg = ScheduleConfig {
            solver_order: 3,
            ..Default::default()
        };
        assert!(DpmSolverPP::new(&cfg, 5).is_err());
    }
}
