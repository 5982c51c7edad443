//! The diffusion schedulers against diffusers (fixtures/parity/make_schedulers.py): each
//! `scheduler_config.json` read as DDIM and as Euler read it, alphas_cumprod, the training-side
//! add_noise and velocity, the inference timesteps, sigmas and init_noise_sigma, and every step
//! of a 7-step trajectory with fixed model outputs (each step's scaled model input and its
//! result, from diffusers' previous sample), for SD 1.5's config, v-prediction with trailing spacing, the cosine schedule
//! with sample prediction and linspace spacing, and zero-terminal-SNR rescaling.

use lora_core::diffusion::{Ddim, DpmSolverPP, Euler, NoiseSchedule, Sampler};
use lora_io::diffusion::{read_scheduler_config, SamplerKind};
use lora_io::safetensors::SafetensorsFile;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/schedulers")
}

/// `|got - want| <= tol * max(1, |want|)` elementwise.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs diffusers {w}"
        );
    }
}

#[test]
fn schedulers_match_diffusers() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let t = |k: &str| r.read_f32(k).unwrap().0;
    let (latents, noise) = (t("latents"), t("noise"));
    let steps = cases["steps"].as_u64().unwrap() as usize;
    let train_ts: Vec<usize> = cases["train_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut checked = 0;
    for (name, case) in cases["configs"].as_object().unwrap() {
        let file = dir().join(name).join("scheduler_config.json");
        let cfg = read_scheduler_config(&file, SamplerKind::Ddim).unwrap();
        let sched = NoiseSchedule::new(&cfg).unwrap();
        for (ts, want) in case["alphas_cumprod"].as_object().unwrap() {
            let got = sched.alphas_cumprod()[ts.parse::<usize>().unwrap()];
            let want = want.as_f64().unwrap();
            // diffusers computes the schedule in f32 (a cumulative product over up to 1000
            // factors): relative 2e-6, and 1e-9 absolute for zero SNR's last value of 0.
            assert!(
                (got - want).abs() <= 2e-6 * want + 1e-9,
                "{name}: alphas_cumprod[{ts}] {got} vs {want}"
            );
        }
        for &ts in train_ts.iter().filter(|&&x| x < cfg.num_train_timesteps) {
            // diffusers' f32 alpha_bar is off by up to ~2e-6 of itself (the bound checked
            // above); its square roots then differ by d/(2 sqrt), which near t = 0 (1 - a ~
            // 1e-4) is far above f32 rounding: the bound below is that propagation per element.
            let a = sched.alphas_cumprod()[ts];
            let d = 2e-6 * a + 1e-9;
            let (ds, dn) = (d / (2.0 * a.sqrt()), d / (2.0 * (1.0 - a).sqrt()));
            for (what, got, c_x0, c_noise) in [
                (
                    "add_noise",
                    sched.add_noise(&latents, &noise, ts).unwrap(),
                    ds,
                    dn,
                ),
                (
                    "velocity",
                    sched.velocity(&latents, &noise, ts).unwrap(),
                    dn,
                    ds,
                ),
            ] {
                let want = t(&format!("{name}.{what}.{ts}"));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let bound = 2e-6 * w.abs().max(1.0) as f64
                        + c_x0 * latents[i].abs() as f64
                        + c_noise * noise[i].abs() as f64;
                    assert!(
                        ((g - w).abs() as f64) <= bound,
                        "{name} {what}({ts})[{i}]: {g} vs diffusers {w} (bound {bound:.2e})"
                    );
                }
            }
        }
        for kind in ["ddim", "euler", "dpmpp", "dpmpp_heun"] {
            let Some(want) = case.get(kind) else { continue };
            let mut sampler: Box<dyn Sampler> = match kind {
                "ddim" => Box::new(Ddim::new(&cfg, steps).unwrap()),
                "euler" => {
                    let cfg = read_scheduler_config(&file, SamplerKind::Euler).unwrap();
                    Box::new(Euler::new(&cfg, steps).unwrap())
                }
                _ => {
                    let mut cfg = read_scheduler_config(&file, SamplerKind::DpmPP).unwrap();
                    cfg.solver_heun = kind == "dpmpp_heun";
                    Box::new(DpmSolverPP::new(&cfg, steps).unwrap())
                }
            };
            let wt: Vec<f64> = want["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (g, w) in sampler.timesteps().iter().zip(&wt) {
                assert!(
                    (g - w).abs() <= 1e-4,
                    "{name} {kind}: timesteps {:?} vs {wt:?}",
                    sampler.timesteps()
                );
            }
            assert_eq!(sampler.timesteps().len(), wt.len());
            if let Some(ws) = want.get("sigmas") {
                let got: Vec<f64> = match kind {
                    "euler" => {
                        let cfg = read_scheduler_config(&file, SamplerKind::Euler).unwrap();
                        Euler::new(&cfg, steps).unwrap().sigmas().to_vec()
                    }
                    _ => {
                        let cfg = read_scheduler_config(&file, SamplerKind::DpmPP).unwrap();
                        DpmSolverPP::new(&cfg, steps).unwrap().sigmas().to_vec()
                    }
                };
                let ws: Vec<f64> = ws
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(got.len(), ws.len(), "{name} {kind}: sigmas");
                for (g, w) in got.iter().zip(&ws) {
                    // diffusers' f32 schedule: its sigma = sqrt((1 - a) / a) is off by half of
                    // alpha_bar's relative error (2e-6, checked above) divided by (1 - a).
                    assert!(
                        (g - w).abs() <= 2e-5 * w.max(1.0),
                        "{name} {kind}: sigmas {got:?} vs {ws:?}"
                    );
                }
            }
            let ins = want["init_noise_sigma"].as_f64().unwrap();
            assert!(
                (sampler.init_noise_sigma() - ins).abs() <= 1e-5 * ins.max(1.0),
                "{name} {kind}: init_noise_sigma {} vs {ins}",
                sampler.init_noise_sigma()
            );
            let s = sampler.init_noise_sigma() as f32;
            // Each step from diffusers' previous sample (its own f32 rounding, up to 3e-4 at the
            // cosine schedule's first step, is then not carried into the next comparison;
            // DPM++ still uses its own earlier x0 predictions, made from those same samples).
            let mut x: Vec<f32> = latents.iter().map(|v| v * s).collect();
            for i in 0..steps {
                let tag = format!("{name}.{kind}");
                if i > 0 {
                    x = t(&format!("{tag}.output.{}", i - 1));
                }
                let input = sampler.scale_model_input(&x, i);
                close(
                    &format!("{tag} input {i}"),
                    &input,
                    &t(&format!("{tag}.input.{i}")),
                    1e-5,
                );
                let scale = x.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                x = sampler.step(&t(&format!("model_out.{i}")), i, &x).unwrap();
                // diffusers steps in f32: `x + (x - x0) / sigma * dt` adds terms of the input
                // sample's size, which for the cosine schedule's first sigma (10146) is 3e4,
                // while the result is ~2: its rounding (a few 2^-24 of the input's scale) is
                // the second term of the bound.
                let want = t(&format!("{tag}.output.{i}"));
                for (j, (g, w)) in x.iter().zip(&want).enumerate() {
                    let bound = 1e-5 * w.abs().max(1.0) + 4e-7 * scale;
                    assert!(
                        (g - w).abs() <= bound,
                        "{tag} output {i}[{j}]: {g} vs diffusers {w} (bound {bound:.2e})"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 4 * steps, "every trajectory step was compared");
    // Timesteps for many step counts and every spacing (numpy's tie rounding and arange length).
    let (mut lists, mut wrapped) = (0, 0);
    for (name, by_spacing) in cases["timesteps_by_steps"].as_object().unwrap() {
        let file = dir().join(name).join("scheduler_config.json");
        for (spacing, by_kind) in by_spacing.as_object().unwrap() {
            let spacing = match spacing.as_str() {
                "leading" => lora_core::diffusion::Spacing::Leading,
                "trailing" => lora_core::diffusion::Spacing::Trailing,
                _ => lora_core::diffusion::Spacing::Linspace,
            };
            for (kind, by_n) in by_kind.as_object().unwrap() {
                let sk = match kind.as_str() {
                    "ddim" => SamplerKind::Ddim,
                    "euler" => SamplerKind::Euler,
                    _ => SamplerKind::DpmPP,
                };
                let mut cfg = read_scheduler_config(&file, sk).unwrap();
                cfg.spacing = spacing;
                for (n, want) in by_n.as_object().unwrap() {
                    let n: usize = n.parse().unwrap();
                    let got = match sk {
                        SamplerKind::Ddim => Ddim::new(&cfg, n).unwrap().timesteps().to_vec(),
                        SamplerKind::Euler => Euler::new(&cfg, n).unwrap().timesteps().to_vec(),
                        SamplerKind::DpmPP => {
                            DpmSolverPP::new(&cfg, n).unwrap().timesteps().to_vec()
                        }
                    };
                    let mut want: Vec<f64> = want
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap())
                        .collect();
                    // diffusers' trailing spacing sometimes appends a timestep -1 (numpy's
                    // arange length rounds up: 62 steps for 61 of 1000); we run the n asked.
                    if want.last().is_some_and(|&w| w < 0.0) {
                        want.pop();
                        wrapped += 1;
                    }
                    assert_eq!(want.len(), n);
                    assert_eq!(
                        got.len(),
                        want.len(),
                        "{name} {spacing:?} {kind} {n} steps: {got:?} vs {want:?}"
                    );
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-4,
                            "{name} {spacing:?} {kind} {n} steps: {got:?} vs {want:?}"
                        );
                    }
                    lists += 1;
                }
            }
        }
    }
    assert_eq!(lists, 2 * 3 * 3 * 23, "every timestep list was compared");
    assert!(
        wrapped > 0,
        "the fixture holds diffusers' extra -1 timestep case"
    );
    // SD 1.5's config as DPMSolverMultistepScheduler saves it (its own keys, and Python's
    // `-Infinity`) reads as the DDIM-saved one does.
    let dpm = read_scheduler_config(
        &dir().join("sd15_dpm/scheduler_config.json"),
        SamplerKind::DpmPP,
    )
    .unwrap();
    let ddim_saved = read_scheduler_config(
        &dir().join("sd15/scheduler_config.json"),
        SamplerKind::DpmPP,
    )
    .unwrap();
    assert_eq!(dpm, ddim_saved);
}

/// Settings the samplers do not implement are refused by name; DDIM reads diffusers' class
/// defaults for what a file leaves out (clip_sample on, leading spacing), Euler its own
/// (linspace).
#[test]
fn scheduler_configs_use_each_class_defaults_and_refuse_the_unsupported() {
    let tmp = std::env::temp_dir().join(format!("lora-sched-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // SD 1.5's file as PNDMScheduler saves it: no timestep_spacing.
    let p = write(
        "pndm.json",
        r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
    );
    let d = read_scheduler_config(&p, SamplerKind::Ddim).unwrap();
    assert_eq!(d.spacing, lora_core::diffusion::Spacing::Leading);
    assert_eq!(d.clip_sample, None);
    let e = read_scheduler_config(&p, SamplerKind::Euler).unwrap();
    assert_eq!(e.spacing, lora_core::diffusion::Spacing::Linspace);
    let p = write("bare.json", "{}");
    assert_eq!(
        read_scheduler_config(&p, SamplerKind::Ddim)
            .unwrap()
            .clip_sample,
        Some(1.0)
    );
    for (text, field) in [
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
        (r#"{"prediction_type": "flow"}"#, "prediction_type"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"num_train_timesteps": -3}"#, "num_train_timesteps"),
        (r#"{"timestep_spacing": 7}"#, "timestep_spacing"),
        (r#"{"final_sigmas_type": "sigma_min"}"#, "final_sigmas_type"),
        ("[1, 2]", "(file)"),
    ] {
        let p = write("bad.json", text);
        let e = read_scheduler_config(&p, SamplerKind::Euler)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.json") && e.contains(field), "{text}: {e}");
    }
    let e = read_scheduler_config(&tmp.join("missing.json"), SamplerKind::Ddim).unwrap_err();
    assert!(e.to_string().contains("missing.json"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}
