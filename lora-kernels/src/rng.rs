//! Seeded random numbers: a counter-based hash for dropout masks (any element's mask bit can be
//! recomputed from `(seed, index)` alone, so backward need not store the mask and a CUDA twin can
//! reproduce it exactly) and a small sequential generator for parameter initialisation.

/// SplitMix64 finaliser: a bijective 64-bit mix with good avalanche.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `[0, 1)` for element `index` of the stream `seed`, with 24 bits of resolution
/// (exactly representable in `f32`).
#[inline]
pub fn uniform_at(seed: u64, index: u64) -> f32 {
    let h = splitmix64(seed ^ splitmix64(index));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Inverted-dropout multiplier of element `index`: `0` when dropped, `1 / (1 - p)` when kept.
#[inline]
pub fn dropout_mult(p: f32, seed: u64, index: u64) -> f32 {
    if uniform_at(seed, index) < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// A small sequential generator (SplitMix64 stream) for initialisation and shuffling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The current state, for checkpointing; [`Rng::new`] of it resumes the stream.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_rate_is_close_to_p() {
        let p = 0.3;
        let n = 200_000u64;
        let dropped = (0..n).filter(|&i| dropout_mult(p, 42, i) == 0.0).count();
        let rate = dropped as f64 / n as f64;
        assert!((rate - 0.3).abs() < 0.01, "rate {rate}");
    }

    #[test]
    fn streams_differ_by_seed_and_repeat_by_seed() {
        let a: Vec<u64> = (0..4).map(splitmix64).collect();
        let mut r1 = Rng::new(7);
        let mut r2 = Rng::new(7);
        let mut r3 = Rng::new(8);
        let s1: Vec<u64> = (0..4).map(|_| r1.next_u64()).collect();
        let s2: Vec<u64> = (0..4).map(|_| r2.next_u64()).collect();
        let s3: Vec<u64> = (0..4).map(|_| r3.next_u64()).collect();
        assert_eq!(s1, s2);
        assert_ne!(s1, s3);
        assert_ne!(a, s1);
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(1);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
