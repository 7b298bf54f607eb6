//! Instruction-set tiers and run-time dispatch.
//!
//! Every kernel is written once, generic over [`pulp::Simd`], and compiled for each tier by
//! `pulp`'s `vectorize` (which enables the tier's target features around the inlined kernel).
//! [`Tier::best`] detects the best tier once per process; the `_with` variants of the kernels let
//! tests and benches force any tier that [`Tier::is_available`].

use std::sync::OnceLock;

/// One instruction set a kernel can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Portable scalar code (one lane).
    Scalar,
    /// x86-64-v3 (AVX2 + FMA) with F16C, 8 lanes of f32. F16C is required so that f16 rounding and
    /// widening use the hardware conversions (`vcvtps2ph` / `vcvtph2ps`); every AVX2 CPU made has it.
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL, 16 lanes of f32.
    Avx512,
    /// AArch64 Advanced SIMD, 4 lanes of f32.
    Neon,
}

impl Tier {
    /// Every tier, best last.
    pub const ALL: [Tier; 4] = [Tier::Scalar, Tier::Neon, Tier::Avx2, Tier::Avx512];

    /// The tier's short name (`scalar`, `avx2`, `avx512`, `neon`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Neon => "neon",
        }
    }

    /// Parses [`Tier::name`].
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether this CPU runs the tier.
    pub fn is_available(self) -> bool {
        match self {
            Tier::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => pulp::x86::V3::try_new().is_some() && std::arch::is_x86_feature_detected!("f16c"),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => pulp::x86::V4::try_new().is_some(),
            #[cfg(target_arch = "aarch64")]
            Tier::Neon => pulp::aarch64::Neon::try_new().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The tiers this CPU runs, scalar first.
    pub fn available() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.is_available()).collect()
    }

    /// The best tier of this CPU, detected once. `NIBBLE_TIER=scalar|avx2|avx512|neon` caps it
    /// (for benchmarks and for checking a slower path end to end); an unavailable or unknown name
    /// is ignored.
    pub fn best() -> Tier {
        static BEST: OnceLock<Tier> = OnceLock::new();
        *BEST.get_or_init(|| {
            let detected = *Tier::available().last().unwrap_or(&Tier::Scalar);
            match std::env::var("NIBBLE_TIER").ok().and_then(|n| Tier::from_name(&n)) {
                Some(t) if t.is_available() => t,
                _ => detected,
            }
        })
    }

    /// Runs `op` on this tier.
    ///
    /// # Panics
    /// If the tier is not available; callers check [`Tier::is_available`] first (the public kernel
    /// functions return [`crate::Error::TierUnavailable`] instead).
    #[inline]
    pub(crate) fn dispatch<Op: pulp::WithSimd>(self, op: Op) -> Op::Output {
        use pulp::Simd;
        match self {
            Tier::Scalar => Simd::vectorize(pulp::Scalar::new(), op),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => {
                let v3 = pulp::x86::V3::try_new().filter(|_| std::arch::is_x86_feature_detected!("f16c"));
                let v3 = v3.expect("avx2 tier unavailable");
                // SAFETY: the CPU has every feature `with_avx2_f16c` enables (V3's, checked by the
                // token, and F16C, checked just above).
                unsafe { with_avx2_f16c(v3, op) }
            }
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => Simd::vectorize(pulp::x86::V4::try_new().expect("avx512 tier unavailable"), op),
            #[cfg(target_arch = "aarch64")]
            Tier::Neon => Simd::vectorize(pulp::aarch64::Neon::try_new().expect("neon tier unavailable"), op),
            #[allow(unreachable_patterns)]
            _ => panic!("tier {} is not compiled for this target", self.name()),
        }
    }

    /// Runs `op` with one-lane [`pulp::Scalar`] arithmetic compiled with this tier's target
    /// features, which LLVM auto-vectorizes (AVX2: 256-bit, AVX-512: LLVM's preferred width), for
    /// kernels whose hand-written lanes are slower than that (the dispatch table in `kernels`
    /// names them). Other tiers run [`Tier::dispatch`].
    ///
    /// # Panics
    /// As [`Tier::dispatch`].
    #[inline]
    pub(crate) fn dispatch_autovec<Op: pulp::WithSimd>(self, op: Op) -> Op::Output {
        match self {
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => {
                assert!(self.is_available(), "avx2 tier unavailable");
                // SAFETY: `is_available` checked x86-64-v3 (pulp's V3 token) and F16C, every
                // feature `scalar_lanes_avx2` enables.
                unsafe { scalar_lanes_avx2(op) }
            }
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => {
                assert!(self.is_available(), "avx512 tier unavailable");
                // SAFETY: `is_available` checked pulp's V4 token, whose features are the ones
                // `scalar_lanes_avx512` enables.
                unsafe { scalar_lanes_avx512(op) }
            }
            _ => self.dispatch(op),
        }
    }
}

/// Runs `op` on one-lane [`pulp::Scalar`] arithmetic inside x86-64-v3's features and F16C, so LLVM
/// auto-vectorizes the scalar body with AVX2 instructions.
///
/// # Safety
/// The CPU must have AVX2, FMA, BMI1/2, LZCNT and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,f16c")]
unsafe fn scalar_lanes_avx2<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    op.with_simd(pulp::Scalar::new())
}

/// Runs `op` on one-lane [`pulp::Scalar`] arithmetic inside x86-64-v4's features (pulp's `V4`), so
/// LLVM auto-vectorizes the scalar body with AVX-512 instructions.
///
/// # Safety
/// The CPU must have every feature of pulp's `V4` token.
#[cfg(target_arch = "x86_64")]
#[target_feature(
    enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl"
)]
unsafe fn scalar_lanes_avx512<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    op.with_simd(pulp::Scalar::new())
}

/// Runs `op` with x86-64-v3's features and F16C enabled, so the kernels inline into code that may
/// use the F16C conversions (pulp's own `V3` dispatch does not enable F16C).
///
/// # Safety
/// The CPU must have AVX2, FMA, BMI1/2, LZCNT and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,f16c")]
unsafe fn with_avx2_f16c<Op: pulp::WithSimd>(v3: pulp::x86::V3, op: Op) -> Op::Output {
    op.with_simd(v3)
}
