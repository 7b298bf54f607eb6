//! Differential: every kernel on every available tier against the scalar reference, bit for bit,
//! on arbitrary floats (finite ones for the quantizing kernels, any for the statistics).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble::kernels::*;
use nibble::{reference, Bits, FloatFormat, Tier};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let format = [FloatFormat::F32, FloatFormat::F16, FloatFormat::BF16][data[0] as usize % 3];
    let cols = 1 + data[1] as usize % 40;
    let alpha = 0.5 + (data[2] % 11) as f64 * 0.05;
    let width = if data[2] >= 128 { Bits::Eight } else { Bits::Four };
    let raw: Vec<f32> = data[3..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let n = raw.len() / cols * cols;
    let w: Vec<f32> = raw[..n].iter().map(|&x| format.round(x)).collect();
    let finite = w.iter().all(|x| x.is_finite());
    // Rounding: any non-NaN input.
    let some: Vec<f32> = raw.iter().copied().filter(|x| !x.is_nan()).collect();
    let want_round: Vec<f32> = some.iter().map(|&x| format.round(x)).collect();
    for tier in Tier::available() {
        let mut r = some.clone();
        round_to_format_with(tier, format, &mut r).unwrap();
        assert_eq!(bits(&r), bits(&want_round), "round {tier:?} {format:?}");
        let mut amax = vec![0.0; cols];
        block_absmax_with(tier, &w, cols, &mut amax).unwrap();
        let want = reference::block_absmax(&w, cols);
        for (a, b) in amax.iter().zip(&want) {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "absmax {tier:?}");
        }
        let (mut lo, mut hi) = (vec![0.0; cols], vec![0.0; cols]);
        block_minmax_with(tier, &w, cols, true, &mut lo, &mut hi).unwrap();
        if finite {
            let (wl, wh) = reference::block_minmax(&w, cols, true);
            assert_eq!((bits(&lo), bits(&hi)), (bits(&wl), bits(&wh)), "minmax {tier:?}");
        }
    }
    if !finite || w.is_empty() {
        return;
    }
    let amax = reference::block_absmax(&w, cols);
    let scale = reference::scales_symmetric(format, width, &amax, alpha);
    let (lo, hi) = reference::block_minmax(&w, cols, false);
    let (zs, zp) = reference::scales_zero_point(format, width, &lo, &hi, alpha);
    let want_q = reference::quantize(format, width, &w, cols, &scale, None);
    let want_qz = reference::quantize(format, width, &w, cols, &zs, Some(&zp));
    let want_dq = reference::dequantize(format, &want_q, cols, &scale, None);
    for tier in Tier::available() {
        let mut s = vec![0.0; cols];
        scales_symmetric_with(tier, format, width, &amax, alpha, &mut s).unwrap();
        assert_eq!(bits(&s), bits(&scale), "scales {tier:?}");
        let (mut s2, mut z2) = (vec![0.0; cols], vec![0.0; cols]);
        scales_zero_point_with(tier, format, width, &lo, &hi, alpha, &mut s2, &mut z2).unwrap();
        assert_eq!((bits(&s2), bits(&z2)), (bits(&zs), bits(&zp)), "zero point {tier:?}");
        let mut q = vec![0u8; w.len()];
        quantize_with(tier, format, width, &w, cols, &scale, None, &mut q).unwrap();
        assert_eq!(q, want_q, "quantize {tier:?}");
        quantize_with(tier, format, width, &w, cols, &zs, Some(&zp), &mut q).unwrap();
        assert_eq!(q, want_qz, "quantize zp {tier:?}");
        let mut dq = vec![0.0; w.len()];
        qdq_error_with(tier, format, width, &w, cols, &scale, None, QdqOutput::Dequantized, &mut dq).unwrap();
        assert_eq!(bits(&dq), bits(&want_dq), "qdq {tier:?}");
        let mut packed = vec![0u8; want_q.len().div_ceil(2)];
        pack_nibbles_with(tier, &want_q, &mut packed).unwrap();
        assert_eq!(packed, reference::pack(&want_q), "pack {tier:?}");
    }
});
