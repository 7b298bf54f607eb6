//! The AWQ-lite loss through the Gram matrix of the activations (f32 weights, T > K) and through the
//! error matrix (`mean((x @ E)^2)`, f32 weights, T <= K) are the direct loss in exact arithmetic: on
//! activations with outlier channels, at several shapes (T above and below K), block sizes and
//! zero-point settings, the three forms give losses within a relative 1e-4 and choose the same alpha.

use nibble::awq::{lite_alphas, lite_search_with, LossForm};
use nibble::{Bits, BlockSize, FloatFormat, QuantParams, Tier};

fn data(n: usize, seed: u64, scale: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            ((u * 2.0 - 1.0) as f32) * scale(i)
        })
        .collect()
}

fn params(block: usize, zero_point: bool) -> QuantParams {
    QuantParams { block_size: BlockSize::Blocked(block), axis: 0, zero_point, alpha: 1.0, bits: Bits::Four }
}

#[test]
fn gram_and_direct_losses_agree() {
    let alphas = lite_alphas(0.1);
    let mut cases = 0;
    for (t, k, n, block, zp) in [
        (512, 64, 48, 32, false),
        (300, 128, 40, 128, false),
        (1024, 96, 64, 32, true),
        (257, 256, 16, 64, false),
        (64, 256, 48, 128, false),
        (100, 512, 24, 32, true),
    ] {
        for seed in 1..4u64 {
            let x = data(t * k, seed, |i| if (i % k) % 13 == 0 { 8.0 } else { 1.0 });
            let w = data(k * n, seed * 7, |_| 0.2);
            let params = params(block, zp);
            let run = |form| {
                lite_search_with(Tier::best(), FloatFormat::F32, &x, &w, [k, n], &params, &alphas, form).unwrap()
            };
            let direct = run(LossForm::Direct);
            for form in [LossForm::Gram, LossForm::Error] {
                let other = run(form);
                for (a, (d, g)) in direct.losses.iter().zip(&other.losses).enumerate() {
                    assert!((d - g).abs() <= 1e-4 * d.abs(), "{form:?} t={t} k={k} seed={seed} alpha {a}: {d} vs {g}");
                }
                assert_eq!(
                    direct.best, other.best,
                    "{form:?} t={t} k={k} seed={seed}: {:?} vs {:?}",
                    direct.losses, other.losses
                );
                assert_eq!(direct.best_scale, other.best_scale);
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 18);
}

/// The products write into buffers kept from earlier alphas without clearing them: whatever the
/// buffer held (NaN here, so any value read would show) must not reach the result.
#[test]
fn products_ignore_what_the_buffer_held() {
    use nibble::awq::matmul::{lower_triangular_matmul, lower_triangular_matmul_into, matmul, matmul_into};
    for (m, k, n) in [(1, 1, 1), (37, 300, 40), (256, 96, 130), (1024, 768, 64)] {
        let a = data(m * k, 3, |_| 1.0);
        let b = data(k * n, 5, |_| 1.0);
        let mut c = vec![f32::NAN; m * n + 7];
        matmul_into(&a, &b, m, k, n, &mut c);
        assert_eq!(c, matmul(&a, &b, m, k, n), "matmul {m}x{k}x{n}");
        let l = data(k * k, 7, |_| 1.0);
        let mut c = vec![f32::NAN; k * n];
        lower_triangular_matmul_into(&l, &b, k, n, &mut c);
        assert_eq!(c, lower_triangular_matmul(&l, &b, k, n), "triangular {k}x{n}");
        assert!(c.iter().all(|v| v.is_finite()));
    }
}

/// The fake quantization writes into a buffer kept from the previous alpha without clearing it:
/// whatever the buffer held (NaN here, longer or shorter than the weight) must not reach the
/// result, on every tier, with padded last blocks, zero points and f16 rounding.
#[test]
fn fake_quantization_ignores_what_the_buffer_held() {
    use nibble::quantize_weight::{fake_quantize_into, fake_quantize_with};
    let mut cases = 0;
    for tier in Tier::available() {
        for (k, n, block, zp, format) in [
            (256, 48, 128, false, FloatFormat::F32),
            (200, 40, 64, true, FloatFormat::F32),
            (96, 33, 32, false, FloatFormat::F16),
            (130, 16, 128, true, FloatFormat::BF16),
        ] {
            let w = data(k * n, 11, |_| 0.3);
            let params = params(block, zp);
            let want = fake_quantize_with(tier, format, &w, [k, n], &params, None).unwrap();
            for len in [k * n, k * n / 2, k * n + 100] {
                let mut out = vec![f32::NAN; len];
                fake_quantize_into(tier, format, &w, [k, n], &params, None, &mut out).unwrap();
                assert_eq!(out, want, "{tier:?} {k}x{n} block {block} zp {zp} {format:?}, buffer of {len}");
            }
            cases += 1;
        }
    }
    assert!(cases >= 4);
}

/// AWQ-lite's error matrix computed band by band of block rows (`error_matrix_into`) is bit for bit
/// the three passes over the whole weight it replaces (scale the rows, fake-quantize, `w - dq / s`),
/// on every tier: K a multiple of the block or not (a short last band), per-channel blocks, zero
/// point on and off, N odd and even, 4-bit and INT8 codes, buffers holding garbage.
#[test]
fn error_matrix_by_bands_is_the_three_passes() {
    use nibble::awq::lite::{error_matrix_into, scale_rows};
    use nibble::quantize_weight::fake_quantize_with;
    let mut cases = 0;
    for tier in Tier::available() {
        for (k, n, block, zp, bits, format) in [
            (256, 48, Some(128), false, Bits::Four, FloatFormat::F32),
            (200, 33, Some(64), true, Bits::Four, FloatFormat::F32),
            (130, 16, Some(128), false, Bits::Four, FloatFormat::F32),
            (96, 40, None, true, Bits::Four, FloatFormat::F32),
            (97, 7, None, false, Bits::Four, FloatFormat::F32),
            (300, 24, Some(32), false, Bits::Eight, FloatFormat::F32),
            (70, 9, Some(16), true, Bits::Eight, FloatFormat::F32),
            // Wider than one column stripe (512 columns for 128-row blocks), a narrower last one.
            (200, 1100, Some(128), false, Bits::Four, FloatFormat::F32),
            (64, 2100, None, false, Bits::Eight, FloatFormat::F32),
            (100, 36, Some(32), false, Bits::Four, FloatFormat::F16),
            (90, 20, Some(64), true, Bits::Four, FloatFormat::BF16),
            (64, 700, Some(32), false, Bits::Four, FloatFormat::BF16),
        ] {
            let block_size = block.map_or(BlockSize::PerChannel, BlockSize::Blocked);
            let params = QuantParams { block_size, axis: 0, zero_point: zp, alpha: 1.0, bits };
            // Mostly positive, so a short last block's padding zero changes its minimum.
            let w: Vec<f32> =
                data(k * n, k as u64, |i| if i % 29 == 0 { 3.0 } else { 0.2 }).iter().map(|v| v + 0.25).collect();
            let s: Vec<f32> =
                data(k, n as u64, |i| if i % 11 == 0 { 6.0 } else { 1.5 }).iter().map(|v| v.abs() + 0.1).collect();
            let (w, s) = (rounded(format, &w), rounded(format, &s));
            let scaled = scale_rows(format, &w, &s, n);
            let mut want = fake_quantize_with(tier, format, &scaled, [k, n], &params, None).unwrap();
            nibble::kernels::unscaled_error(&mut want, &w, &s, n).unwrap();
            let (mut band, mut e) = (vec![f32::NAN; 5], vec![f32::NAN; k * n / 2 + 3]);
            let ok = error_matrix_into(tier, format, &w, &s, [k, n], &params, true, &mut band, &mut e);
            assert_eq!(ok, Ok(true));
            let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits_of(&e), bits_of(&want), "{tier:?} {k}x{n} block {block:?} zp {zp} {bits:?} {format:?}");
            cases += 1;
        }
    }
    assert!(cases >= 12);
}

/// `v` rounded to `format`.
fn rounded(format: FloatFormat, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| format.round(x)).collect()
}

/// The band-by-band error matrix keeps the search's rules: a finite weight whose scaled value
/// overflows skips the alpha (`Ok(false)`), and a non-finite weight is the error the whole-weight
/// fake quantization reports (same block, column and rows).
#[test]
fn error_matrix_by_bands_skips_and_fails_as_before() {
    use nibble::awq::lite::{error_matrix_into, scale_rows};
    use nibble::quantize_weight::fake_quantize_with;
    let (k, n) = (200, 12);
    let params = params(64, false);
    let s = vec![2.0f32; k];
    let mut w = data(k * n, 5, |_| 0.2);
    let run = |w: &[f32], finite: bool| {
        error_matrix_into(Tier::best(), FloatFormat::F32, w, &s, [k, n], &params, finite, &mut vec![], &mut vec![])
    };
    w[150 * n + 3] = 3e38;
    assert_eq!(run(&w, true), Ok(false));
    w[150 * n + 3] = f32::NAN;
    let scaled = scale_rows(FloatFormat::F32, &w, &s, n);
    let want = fake_quantize_with(Tier::best(), FloatFormat::F32, &scaled, [k, n], &params, None).unwrap_err();
    assert!(matches!(want, nibble::Error::NonFinite { block: 2, column: 3, .. }), "{want:?}");
    assert_eq!(run(&w, false), Err(want));
    // Past the first column stripe of a band (1024 columns for 64-row blocks of f32): a NaN in the
    // second stripe, and an overflow there while the band's first stripe is finite.
    let (k, n) = (130, 1300);
    let s = vec![2.0f32; k];
    let mut w = data(k * n, 6, |_| 0.2);
    let run = |w: &[f32], finite: bool| {
        error_matrix_into(Tier::best(), FloatFormat::F32, w, &s, [k, n], &params, finite, &mut vec![], &mut vec![])
    };
    w[70 * n + 1200] = 3e38;
    assert_eq!(run(&w, true), Ok(false));
    w[70 * n + 1200] = f32::INFINITY;
    w[100 * n + 1100] = f32::NAN;
    let scaled = scale_rows(FloatFormat::F32, &w, &s, n);
    let want = fake_quantize_with(Tier::best(), FloatFormat::F32, &scaled, [k, n], &params, None).unwrap_err();
    assert!(matches!(want, nibble::Error::NonFinite { block: 1, column: 1100, .. }), "{want:?}");
    assert_eq!(run(&w, false), Err(want));
}
