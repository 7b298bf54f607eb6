//! Round f32 values to the weight format in place: `x = rnd(x)` (f16 or bf16 round to nearest even,
//! f32 unchanged). The same integer-only rounding every other kernel applies after each step; see
//! [`crate::float`].

use super::check_tier;
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{for_each_chunk, load_f32, store_f32};
use crate::{FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// Rounds every value to `format` (and back to f32).
pub fn round_to_format(format: FloatFormat, values: &mut [f32]) -> Result<()> {
    round_to_format_with(Tier::best(), format, values)
}

/// [`round_to_format`] on a chosen tier.
pub fn round_to_format_with(tier: Tier, format: FloatFormat, values: &mut [f32]) -> Result<()> {
    check_tier(tier)?;
    match format {
        FloatFormat::F32 => tier.dispatch(Round { values, _p: F32 }),
        FloatFormat::F16 => tier.dispatch(Round { values, _p: F16 }),
        FloatFormat::BF16 => tier.dispatch(Round { values, _p: BF16 }),
    }
    Ok(())
}

struct Round<'a, P> {
    values: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for Round<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let values = self.values;
        for_each_chunk::<S>(values.len(), |j, n| {
            let x = load_f32(simd, &values[j..j + n]);
            store_f32(simd, &mut values[j..j + n], P::round_simd(simd, x));
        });
    }
}
