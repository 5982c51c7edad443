//! Diffusion (Stable Diffusion): the noise schedules and samplers so far; the UNet, the CLIP
//! text encoder and the VAE are to come (issue 19).

pub mod schedulers;

pub use schedulers::{
    BetaSchedule, Ddim, DpmSolverPP, Euler, NoiseSchedule, Prediction, Sampler, ScheduleConfig,
    Spacing,
};
