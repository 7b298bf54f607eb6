//! Helpers shared by the benches (each bench uses some of them).
#![allow(dead_code)]

/// `n` deterministic pseudo-random weights in `[-0.1, 0.1)` (xorshift64 from `seed | 1`), the same
/// data in every run so that runs compare.
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// The seed `benches/kernels.rs` and `benches/tiers.rs` use for their slabs.
pub const SLAB_SEED: u64 = 0x2545_F491_4F6C_DD1D;
