//! Diffusion (Stable Diffusion): the noise schedules and samplers, and text-to-image sampling
//! with classifier-free guidance. The models (the CLIP text encoder, the UNet and the VAE) are in
//! [`crate::models`].

pub mod pipeline;
pub mod schedulers;

pub use pipeline::{decode_latents, denoise, to_u8, Conditioning};
pub use schedulers::{
    BetaSchedule, Ddim, DpmSolverPP, Euler, NoiseSchedule, Prediction, Sampler, ScheduleConfig,
    Spacing,
};
