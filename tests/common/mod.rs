//! Helpers shared by the GPTQ and scale-search tests: a deterministic generator and an
//! independent dequantizer of a [`QuantizedWeight`].
#![allow(dead_code)]

use nibble::{Bits, FloatFormat, QuantizedWeight};

/// xorshift64 in [-1, 1).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// Roughly normal (sum of 4 uniforms).
    pub fn normal(&mut self) -> f64 {
        (self.next() + self.next() + self.next() + self.next()) * 0.866
    }
}

/// The codes of a quantized weight, one per element (signed codes as i8 bit patterns).
pub fn codes(q: &QuantizedWeight, len: usize, bits: Bits) -> Vec<u8> {
    match bits {
        Bits::Eight => q.packed.clone(),
        Bits::Four => (0..len)
            .map(|e| {
                let v = (q.packed[e / 2] >> (4 * (e % 2))) & 0xf;
                if q.zero_point.is_none() {
                    ((v ^ 8) as i8 - 8) as u8
                } else {
                    v
                }
            })
            .collect(),
    }
}

/// `dq = rnd((q - zp) * s)` of an axis-0 quantized weight `[k, n]`, written independently of the
/// crate's kernels.
pub fn dequantize(q: &QuantizedWeight, format: FloatFormat, bits: Bits, [k, n]: [usize; 2]) -> Vec<f32> {
    let c = codes(q, k * n, bits);
    (0..k * n)
        .map(|e| {
            let si = (e / n / q.block) * n + e % n;
            let (code, zp) = match &q.zero_point {
                Some(z) => (c[e] as f32, z[si] as f32),
                None => (c[e] as i8 as f32, 0.0),
            };
            format.round((code - zp) * q.scale[si])
        })
        .collect()
}
