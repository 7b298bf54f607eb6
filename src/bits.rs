//! Code width: 4-bit (the default) or 8-bit (ModelOpt's mixed-precision INT8 layers).
//!
//! ```text
//! symmetric:  s = amax / qmax,            q in [-(qmax + 1), qmax]     qmax = 2^(bits-1) - 1
//! zero point: s = (max - min) / levels,   q, zp in [0, levels]         levels = 2^bits - 1
//! ```

/// Bits per code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Bits {
    /// INT4 / UINT4, two codes per byte.
    #[default]
    Four,
    /// INT8 / UINT8, one code per byte.
    Eight,
}

impl Bits {
    /// From a bit count (4 or 8).
    pub fn from_count(bits: u32) -> Option<Bits> {
        match bits {
            4 => Some(Bits::Four),
            8 => Some(Bits::Eight),
            _ => None,
        }
    }

    /// 4 or 8.
    pub fn count(self) -> u32 {
        match self {
            Bits::Four => 4,
            Bits::Eight => 8,
        }
    }

    /// The largest symmetric code (7 or 127); the divisor of the symmetric scale.
    pub fn qmax(self) -> f32 {
        match self {
            Bits::Four => 7.0,
            Bits::Eight => 127.0,
        }
    }

    /// The smallest symmetric code (-8 or -128).
    pub fn qmin(self) -> f32 {
        -self.qmax() - 1.0
    }

    /// The largest zero-point code (15 or 255); the divisor of the zero-point scale.
    pub fn levels(self) -> f32 {
        match self {
            Bits::Four => 15.0,
            Bits::Eight => 255.0,
        }
    }

    /// Bytes holding `count` codes (two per byte for 4 bits, rounded up).
    pub fn bytes_for(self, count: usize) -> usize {
        match self {
            Bits::Four => count.div_ceil(2),
            Bits::Eight => count,
        }
    }
}
