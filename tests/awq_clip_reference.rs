//! AWQ-clip's losses (block statistics computed once, scales and fake quantization per alpha)
//! equal a plain recomputation: `fake_quantize_with` of the whole weight per alpha, zero-padded
//! blocks and the scalar reference's `block_dot`, with ModelOpt's accumulation. Bit for bit, with
//! and without a zero point, 4 and 8 bits, K a multiple of the block or not, f32 and f16.

use nibble::awq::{clip_alphas, clip_search, subsample};
use nibble::quantize_weight::fake_quantize_with;
use nibble::{reference, Bits, BlockSize, FloatFormat, QuantParams, Tier};

fn data(n: usize, seed: u64, format: FloatFormat) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            format.round((((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32)
        })
        .collect()
}

/// The loss of every (block, column) for one alpha, computed the plain way.
fn plain_losses(format: FloatFormat, x: &[f32], w: &[f32], [k, n]: [usize; 2], p: &QuantParams) -> Vec<f32> {
    let block = p.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let xs = subsample(x, k, 64);
    let t = xs.len() / k;
    let dq = fake_quantize_with(Tier::Scalar, format, w, [k, n], p, None).unwrap();
    let mut loss = vec![0.0f32; nb * n];
    for b in 0..nb {
        let (r0, r1) = (b * block, ((b + 1) * block).min(k));
        let pad = |m: &[f32]| -> Vec<f32> {
            let mut v = m[r0 * n..r1 * n].to_vec();
            v.resize(block * n, 0.0);
            v
        };
        let xb: Vec<f32> = xs
            .chunks_exact(k)
            .flat_map(|row| row[r0..r1].iter().copied().chain(std::iter::repeat_n(0.0, block - (r1 - r0))))
            .collect();
        let org = reference::block_dot(format, &xb, &pad(w), [block, n], t);
        let cur = reference::block_dot(format, &xb, &pad(&dq), [block, n], t);
        for j in 0..n {
            let mut a = 0.0f32;
            for ti in 0..t {
                let d = format.round(org[ti * n + j] - cur[ti * n + j]);
                a += format.round(d * d);
            }
            loss[b * n + j] = format.round(a / t as f32);
        }
    }
    loss
}

#[test]
fn clip_losses_equal_a_plain_recomputation() {
    let alphas = clip_alphas(0.5, 0.05);
    let mut checked = 0;
    for (k, n, block) in [(96usize, 40usize, 32usize), (100, 24, 32), (64, 70, 64)] {
        for format in [FloatFormat::F32, FloatFormat::F16] {
            for zero_point in [false, true] {
                for bits in [Bits::Four, Bits::Eight] {
                    let x = data(80 * k, k as u64, format);
                    let w = data(k * n, n as u64 + 5, format);
                    let block_size =
                        if bits == Bits::Eight { BlockSize::PerChannel } else { BlockSize::Blocked(block) };
                    let params = QuantParams { block_size, axis: 0, zero_point, alpha: 1.0, bits };
                    let got = clip_search(Tier::best(), format, &x, &w, [k, n], &params, &alphas).unwrap();
                    for (a, &alpha) in alphas.iter().enumerate() {
                        let want = plain_losses(format, &x, &w, [k, n], &QuantParams { alpha, ..params });
                        let same = got.losses[a].iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                        assert!(same, "k={k} n={n} {format:?} zp={zero_point} {bits:?} alpha {alpha}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 24);
}
