//! `--target-bits B`: 4 or 8 bits per weight from measured sensitivity, within a size budget.
//!
//! `B` is the mean bits per parameter over every quantized weight, codes, scales and zero points
//! counted: `8 * sum(bytes) / sum(K * N)`. Each weight's two choices come from
//! [`crate::methods::sensitivity`]: relative output errors `e4`, `e8` and the bytes written at 4
//! and 8 bits. Choosing is the 0/1 knapsack of HAWQ-V3 (Yao et al. 2021, "HAWQ-V3: Dyadic Neural
//! Network Quantization", arXiv:2011.10680, section 3.3: there an integer linear program over a
//! Hessian-trace proxy; here the measured output error):
//!
//! ```text
//! maximize   sum over 8-bit weights of (e4 - e8)          (error removed)
//! subject to sum over 8-bit weights of (bytes8 - bytes4)  in [B (1 - 1%), B] * params / 8 - all-4-bit bytes
//! ```
//!
//! solved exactly (up to a byte unit of 1/200000 of the budget) by dynamic programming over bytes;
//! when no set lands in that window, the best one within 1% above `B`, else the fullest below, and
//! the plan says why (weights too few and too large for the target). Weights where 8 bits removes
//! no error stay at 4. The table ranks weights by error removed per extra byte, the greedy order
//! (the knapsack's fractional relaxation), to show why each was chosen.
//!
//! A target below the all-4-bit mean or above the all-8-bit mean is refused with the range this
//! model allows. The result is one [`Choice`] per weight ([`apply`] writes it into the plan's
//! `Candidate::bits`).

use crate::error::{Error, Result};
use crate::plan::Candidate;
use nibble::Bits;

/// What one candidate weight costs and loses at 4 and at 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub struct Sensitivity {
    /// The weight's base name (`Candidate::base`).
    pub weight: String,
    /// Its first quantized reader.
    pub node: String,
    /// The stored dims.
    pub dims: [usize; 2],
    /// Relative output error at 4 bits (run's block size), `tr(dW^T G dW) / tr(W^T G W)`.
    pub e4: f64,
    /// Relative output error at 8 bits per channel.
    pub e8: f64,
    /// Bytes written at 4 bits (codes, scales, zero points).
    pub bytes4: u64,
    /// Bytes written at 8 bits.
    pub bytes8: u64,
    /// `None`: measured on the calibration activations; else why it was measured on the weight
    /// alone.
    pub weight_only: Option<String>,
}

impl Sensitivity {
    /// Parameters (`K * N`).
    pub fn params(&self) -> u64 {
        (self.dims[0] * self.dims[1]) as u64
    }
}

/// The tolerance of the landing: 1% of the target.
pub const TOLERANCE: f64 = 0.01;

/// The choice for one weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// What was measured.
    pub sensitivity: Sensitivity,
    /// 4 or 8.
    pub bits: Bits,
    /// Its place in the ranking by error removed per extra byte (1 = first).
    pub rank: usize,
    /// Why.
    pub why: String,
}

/// The plan for a target.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetPlan {
    /// The target mean bits per parameter.
    pub target_bits: f64,
    /// The mean bits per parameter chosen.
    pub achieved_bits: f64,
    /// Mean bits with every weight at 4 and at 8 bits (the range a target may take).
    pub range: (f64, f64),
    /// One choice per weight, in the order given.
    pub choices: Vec<Choice>,
    /// Set when the plan lands more than 1% from the target: why.
    pub missed: Option<String>,
}

impl BudgetPlan {
    /// Weights at 8 bits.
    pub fn eight(&self) -> usize {
        self.choices.iter().filter(|c| c.bits == Bits::Eight).count()
    }

    /// The estimated relative output error summed over weights (each weight's own `e` at its
    /// chosen bits).
    pub fn summed_error(&self) -> f64 {
        self.choices.iter().map(|c| if c.bits == Bits::Eight { c.sensitivity.e8 } else { c.sensitivity.e4 }).sum()
    }

    /// The `-v` table: weight, shape, e4, e8, bytes at 4 and 8 bits, chosen bits, why.
    pub fn table(&self) -> String {
        let mut s = format!(
            "target {:.3} bits/parameter: {} of {} weights at 8 bits, {:.3} bits/parameter achieved (range {:.3}..{:.3})\n",
            self.target_bits,
            self.eight(),
            self.choices.len(),
            self.achieved_bits,
            self.range.0,
            self.range.1
        );
        if let Some(m) = &self.missed {
            s += &format!("not within 1%: {m}\n");
        }
        s += &format!(
            "{:<40} {:>12} {:>10} {:>10} {:>10} {:>10} {:>4}  why\n",
            "weight", "shape", "e4", "e8", "bytes@4", "bytes@8", "bits"
        );
        for c in &self.choices {
            let m = &c.sensitivity;
            s += &format!(
                "{:<40} {:>12} {:>10.3e} {:>10.3e} {:>10} {:>10} {:>4}  {}\n",
                m.weight,
                format!("{}x{}", m.dims[0], m.dims[1]),
                m.e4,
                m.e8,
                m.bytes4,
                m.bytes8,
                c.bits.count(),
                c.why
            );
        }
        s
    }
}

/// Chooses 4 or 8 bits per weight for `target_bits` (see the module docs).
///
/// # Errors
/// [`Error::Usage`] for a target outside `[all-4-bit, all-8-bit]` of these weights (naming the
/// range), a non-finite target, or no weights.
pub fn choose(measured: Vec<Sensitivity>, target_bits: f64) -> Result<BudgetPlan> {
    if !target_bits.is_finite() || target_bits <= 0.0 {
        return Err(Error::Usage(format!("--target-bits {target_bits}: give a mean bits per parameter such as 5")));
    }
    let params: u64 = measured.iter().map(Sensitivity::params).sum();
    if params == 0 {
        return Err(Error::Usage(format!(
            "--target-bits {target_bits}: no weight is quantized (check --exclude), so there is nothing to choose"
        )));
    }
    let bits_of = |bytes: u64| 8.0 * bytes as f64 / params as f64;
    let all4: u64 = measured.iter().map(|m| m.bytes4).sum();
    let all8: u64 = measured.iter().map(|m| m.bytes8.max(m.bytes4)).sum();
    let range = (bits_of(all4), bits_of(all8));
    if target_bits < range.0 || target_bits > range.1 {
        return Err(Error::Usage(format!(
            "--target-bits {target_bits}: these {} weights take {:.4} bits/parameter with every weight at 4 bits and {:.4} with every weight at 8 bits (codes, scales and zero points); give a target in {:.3}..{:.3} (a larger --block-size lowers the 4-bit end)",
            measured.len(),
            range.0,
            range.1,
            (range.0 * 1e3).ceil() / 1e3,
            (range.1 * 1e3).floor() / 1e3
        )));
    }
    let budget = target_bits * params as f64 / 8.0;
    let extra = |m: &Sensitivity| m.bytes8.saturating_sub(m.bytes4);
    let gain = |m: &Sensitivity| (m.e4 - m.e8).max(0.0);
    let ratio = |m: &Sensitivity| gain(m) / extra(m).max(1) as f64;
    let mut order: Vec<usize> = (0..measured.len()).collect();
    order.sort_by(|&a, &b| ratio(&measured[b]).total_cmp(&ratio(&measured[a])).then(a.cmp(&b)));
    let mut rank = vec![0usize; measured.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r + 1;
    }
    let eight = knapsack(&measured, budget - all4 as f64);
    let total = all4 + (0..measured.len()).filter(|&i| eight[i]).map(|i| extra(&measured[i])).sum::<u64>();
    let achieved = bits_of(total);
    let missed = ((achieved - target_bits).abs() > TOLERANCE * target_bits).then(|| {
        let next = (0..measured.len())
            .filter(|&i| !eight[i] && gain(&measured[i]) > 0.0)
            .map(|i| bits_of(total + extra(&measured[i])))
            .reduce(f64::min);
        match next {
            Some(up) => format!(
                "the weights come in steps too coarse for this target: the best set gives {achieved:.3} and moving the smallest remaining weight to 8 bits gives {up:.3} bits/parameter"
            ),
            None => format!("every weight where 8 bits lowers the error is at 8 bits ({achieved:.3} bits/parameter)"),
        }
    });
    let choices = measured
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let (bits, why) = if eight[i] {
                (
                    Bits::Eight,
                    format!(
                        "rank {} by error removed per extra byte ({:.3e}/byte): in the best set",
                        rank[i],
                        ratio(&m)
                    ),
                )
            } else if gain(&m) <= 0.0 {
                (Bits::Four, "8 bits removes no measured error".to_string())
            } else {
                (
                    Bits::Four,
                    format!(
                        "rank {} ({:.3e}/byte): its {} more bytes do not fit the best set",
                        rank[i],
                        ratio(&m),
                        extra(&m)
                    ),
                )
            };
            Choice { sensitivity: m, bits, rank: rank[i], why }
        })
        .collect();
    Ok(BudgetPlan { target_bits, achieved_bits: achieved, range, choices, missed })
}

/// Byte units of the knapsack: at most this many across the budget (rounding each weight's extra
/// bytes to a unit moves the total by well under 0.1% of the budget).
const UNITS: f64 = 200_000.0;

/// The 0/1 knapsack over the weights with positive gain `e4 - e8`: the set moved to 8 bits with
/// the largest summed gain whose extra bytes land in `[room - tol, room]` (`tol` = 1% of the
/// target's bytes), else in `(room, room + tol]`, else below; exact up to the byte unit (dynamic
/// programming over bytes, `O(weights * UNITS)` time, one bit per weight and unit of memory).
fn knapsack(measured: &[Sensitivity], room: f64) -> Vec<bool> {
    let extra = |m: &Sensitivity| m.bytes8.saturating_sub(m.bytes4) as f64;
    let gain = |m: &Sensitivity| (m.e4 - m.e8).max(0.0);
    let all4: f64 = measured.iter().map(|m| m.bytes4 as f64).sum();
    let tol = TOLERANCE * (room + all4);
    let mut eight = vec![false; measured.len()];
    let items: Vec<usize> = (0..measured.len()).filter(|&i| gain(&measured[i]) > 0.0).collect();
    let hi = room + tol;
    if hi <= 0.0 || items.is_empty() {
        return eight;
    }
    let unit = (hi / UNITS).max(1.0);
    let cap = (hi / unit).floor() as usize;
    let w: Vec<usize> = items.iter().map(|&i| (extra(&measured[i]) / unit).round() as usize).collect();
    let mut best = vec![f64::NEG_INFINITY; cap + 1];
    best[0] = 0.0;
    let words = (cap + 1).div_ceil(64);
    let mut take = vec![0u64; items.len() * words];
    for (j, &i) in items.iter().enumerate() {
        let g = gain(&measured[i]);
        for c in (w[j]..=cap).rev() {
            let with = best[c - w[j]] + g;
            if with > best[c] {
                best[c] = with;
                take[j * words + c / 64] |= 1 << (c % 64);
            }
        }
    }
    let target = (room / unit).floor().max(0.0) as usize;
    let lo = ((room - tol) / unit).ceil().max(0.0) as usize;
    let pick = |range: std::ops::RangeInclusive<usize>| {
        range.filter(|&c| best[c].is_finite()).max_by(|&a, &b| best[a].total_cmp(&best[b]).then(b.cmp(&a)))
    };
    let chosen = pick(lo.min(cap)..=target.min(cap))
        .or_else(|| pick((target + 1).min(cap)..=cap).filter(|&c| c > target))
        .or_else(|| pick(0..=lo.saturating_sub(1).min(cap)));
    let Some(mut c) = chosen else { return eight };
    for (j, &i) in items.iter().enumerate().rev() {
        if take[j * words + c / 64] & (1 << (c % 64)) != 0 {
            eight[i] = true;
            c -= w[j];
        }
    }
    eight
}

/// Writes the plan's choices into the candidates (matched by `Candidate::base`): the one place a
/// per-weight bit width is set from a budget.
pub fn apply(plan: &BudgetPlan, candidates: &mut [Candidate]) {
    for choice in &plan.choices {
        for c in candidates.iter_mut().filter(|c| c.base == choice.sensitivity.weight && c.quantized()) {
            c.bits = choice.bits;
            // 8-bit weights are per output channel, as the byte model counts them (and as mixed.rs writes INT8 layers).
            if choice.bits == nibble::Bits::Eight {
                c.block_size = Some(nibble::BlockSize::PerChannel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, k: usize, e4: f64, e8: f64) -> Sensitivity {
        // f32 weights, N = 64, block 32, DQ form: 4 bits + 1 bit of scales; 8 bits + 32 / K bits.
        let n = 64;
        Sensitivity {
            weight: name.into(),
            node: name.into(),
            dims: [k, n],
            e4,
            e8,
            bytes4: (k * n / 2 + k / 32 * n * 4) as u64,
            bytes8: (k * n + n * 4) as u64,
            weight_only: None,
        }
    }

    #[test]
    fn greedy_takes_most_error_per_byte_first() {
        let ms = vec![m("a", 256, 1e-3, 1e-5), m("b", 256, 5e-3, 1e-5), m("c", 256, 2e-3, 1e-5)];
        let all4 = 5.0;
        let step = (8.0 + 32.0 / 256.0 - all4) / 3.0;
        // Room for exactly one: b (largest error drop).
        let p = choose(ms.clone(), all4 + step * 1.0 + 1e-9).unwrap();
        let bits: Vec<u32> = p.choices.iter().map(|c| c.bits.count()).collect();
        assert_eq!(bits, vec![4, 8, 4]);
        assert!(p.missed.is_none());
        // Two: b, then c.
        let p = choose(ms.clone(), all4 + step * 2.0 + 1e-9).unwrap();
        let bits: Vec<u32> = p.choices.iter().map(|c| c.bits.count()).collect();
        assert_eq!(bits, vec![4, 8, 8]);
        assert!((p.achieved_bits - (all4 + 2.0 * step)).abs() < 1e-9);
        assert!(p.summed_error() < choose(ms, all4).unwrap().summed_error());
    }

    #[test]
    fn targets_outside_the_range_are_refused_with_it() {
        let ms = vec![m("a", 256, 1e-3, 1e-5)];
        for t in [4.5, 8.5] {
            let e = choose(ms.clone(), t).unwrap_err().to_string();
            assert!(e.contains("give a target in 5.000..8.125"), "{e}");
        }
        assert!(choose(ms.clone(), f64::NAN).is_err());
        assert!(choose(vec![], 5.0).is_err());
    }

    #[test]
    fn lands_within_one_percent_above_when_below_would_miss() {
        // One weight: 5 or 8.125 bits. 8.1 is within 1% below 8.125: the move is taken.
        let p = choose(vec![m("a", 256, 1e-3, 1e-5)], 8.1).unwrap();
        assert_eq!(p.choices[0].bits, Bits::Eight);
        assert!(p.missed.is_none());
        // 6.5: neither 5 nor 8.125 is within 1%: said so.
        let p = choose(vec![m("a", 256, 1e-3, 1e-5)], 6.5).unwrap();
        assert!(p.missed.as_deref().unwrap().contains("too coarse"), "{:?}", p.missed);
    }
}
