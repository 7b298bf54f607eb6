//! The kernels, one operation per file. Each works on a *slab*: `rows` consecutive rows of a row-major
//! matrix of `cols` columns, that is one block along the quantized axis, and vectorizes across the
//! columns (no horizontal reductions). Each has a safe entry point that checks lengths once and runs
//! on [`Tier::best`](crate::Tier::best), and a `_with` variant that takes the tier.
//!
//! # Dispatch table
//!
//! Every kernel runs on the best tier of the CPU (AVX-512 > AVX2 > scalar; the AVX2 tier requires
//! F16C). Why each tier is as fast as it is, measured with `cargo bench --bench tiers` (every
//! kernel and tier interleaved, best of N rounds; `--bench kernels` is the criterion view; numbers
//! in BENCHMARKS.md):
//!
//! | kernel | what made the SIMD tiers slow, and the fix |
//! |---|---|
//! | `block_absmax`, `block_minmax` | nothing: integer max/min on the magnitude bits, one load and one op per vector |
//! | `quantize` (f32) | bound by the correctly rounded f32 division `w / s` (numpy's). The hand-written 8-lane AVX2 body ran below the scalar tier (8.5-8.9 vs 10.2-11.2 GiB/s) and the 16-lane AVX-512 body below LLVM's own vectorization of the scalar body: both x86 tiers now run the one-lane scalar body compiled with the tier's target features (`Tier::dispatch_autovec`), which LLVM vectorizes and unrolls (AVX2 12.4-14.0, AVX-512 13.6-14.4 GiB/s; `cargo bench --bench tiers`, three runs, BENCHMARKS.md). f16/bf16 rounding keeps the hand-written lanes (hardware conversions) |
//! | `quantize_packed` (f32) | AVX2: the auto-vectorized scalar body (11.3-11.8 vs hand-written 10.0-10.4 GiB/s); AVX-512: the hand-written lanes (13.2-14.0 vs 12.2-12.3 GiB/s auto-vectorized, in the two runs that measured both) |
//! | `quantize`, `quantize_packed`, `qdq_error` with bf16 rounding | the correctly rounded division and bf16's integer rounding (about 8 ops): the SIMD tiers now multiply by per-column reciprocals and round with 2 ops, taking the division only for vectors with a lane near a bf16 rounding boundary (never for bf16 weights and scales; `kernels::code` has the proof). 2026-12-04, load 5-6, best of 400 calls on a 128 x 4096 slab, 4 interleaved rounds: AVX-512 `quantize_packed` 13.8-13.9 vs 11.9-12.4 GiB/s (+13-16%), `quantize` 13.0-14.3 vs 11.9-12.2. f32 and f16 keep the division: the same idea with a half-integer test made f16 `quantize_packed` 6-13% slower (11.3-12.2 vs 12.8-13.3) and f32 no faster, these loops being bound by their instruction count, not by the divider |
//! | `quantize_packed` of f16 weights with f16 scales (the pipeline's fused pass) | the f32 lanes widen, divide in f32 (two `vdivps` per 32 lanes) and round trip through `vcvtps2ph` / `vcvtph2ps`: on a CPU with AVX512-FP16 the AVX-512 tier now divides in f16 (`vdivph`, 32 lanes, correctly rounded, equal to numpy's double rounding: proof in `kernels::code`), clamps and rounds in f16 ([`quantize_packed_f16`]; `NIBBLE_FP16=off` turns it off). 2026-12-04 22:34-22:38 UTC, load 4.6-6.5, Intel host: whole 4096 x 4096 f16 weight on one core 2.43-2.54 vs 2.12-2.35 GiB/s (three alternated pairs, +3-20%; +4% by the means at load 3.5); `rtn_dq` on the 0.54 GB fp16 model, CPU time median 252 vs 267-269 ms at load 5 and 226 vs 238-239 ms at load 3 (10 interleaved rounds each, -5 to -6%; wall 1.98x `cat` vs main's 2.07x in the one quiet pass); the kernel alone (`tiers`, 128 x 4096) a tie: `vdivph` zmm is no faster per lane than `vdivps` zmm on this CPU, the gain is the fewer instructions around it. Then `vdivph` went off the hot path: the product by the column's f32 reciprocal, rounded to f16, with the division only for vectors with a product near an f16 midpoint (proof in `kernels::code`): the kernel alone 6.0 -> 9.9 GiB/s, `rtn_dq` on the 0.54 GB fp16 model wall -10 to -12%, CPU time -7% (BENCHMARKS.md, 2026-12-05) |
//! | `quantize` with f16 rounding | the integer-only f16 rounding (about 15 ops a vector): AVX-512 and AVX2 now use the hardware pair `vcvtps2ph` / `vcvtph2ps` (AVX2 through F16C) |
//! | `quantize_packed` | lanes were paired through memory: now paired in registers (`v \| v >> 28` on u64 lanes, then `vpmovqb` or a byte shuffle) |
//! | `pack_nibbles` | each output pair was stored lane by lane: now u16 lanes narrowed in registers. AVX2: `vpackuswb` + `vpermq` per 32 output bytes. AVX-512 narrowed 64 codes with `vpmovwb` (2 port-5 uops per 32 bytes); since 2026-12-05 it takes 128 codes a step: `vpmaddubsw` by bytes `1, 16` makes each u16 lane `c0 + 16 * c1`, one `vpackuswb` of two vectors and one `vpermq` give 64 output bytes (half the shuffles per byte). Same-run AVX-512 / AVX2 ratios, three alternated runs each (2026-12-05 03:19-03:22 UTC, load 1.8-3.1): in L2 (`16 rows x 8`) 1.00-1.06 before, 1.12-1.15 after; on the 128-row slab 0.88-0.93 before, 0.93-0.94 after; on the whole 4096 x 4096 weight's codes (the pipeline's case: `quantize_weight` axis 1 and odd widths, GPTQ and the scale search pack whole weights) 0.96-1.00 before, 0.96-0.98 after. AVX2 first on the slab is the bench's column, not the code: a control build running the AVX2 body in the AVX-512 column had it 9-12% behind the same body in the AVX2 column (0.88-0.89), where the new AVX-512 body was at 0.91-0.98, and on the whole weight at 0.97-1.00 against 1.00-1.01. A tie at the memory traffic, first in L2: AVX-512 stays. Aligning the 64-byte loads (+7-8% in two filtered runs of three) or the 32-byte stores (nothing) was tried before and not kept |
//! | `dequantize` | code bytes were widened lane by lane through memory: now `vpmovsxbd` / `vpmovzxbd`. Then the loop itself: `for_each_chunk`'s per-run bookkeeping and the slices' bounds checks were about 30 scalar instructions per 16 lanes (`perf annotate`), so in L2 AVX-512 ran little faster than the auto-vectorized scalar tier (24 vs 24 GiB/s interleaved, AVX2 16): now a plain zip over each row's output vectors, code bytes and scale vectors, one partial vector per row for the tail: in L2 AVX-512 first in 5 of 6 runs (24.3-25.8 GiB/s, AVX2 22-30, scalar 18-21 with every kernel interleaved; run alone 34.2-34.5 vs 29.7-31.9 before, AVX2 30-31 vs 18-19). On the 128-row slab (2 MiB of f32 written per call, beyond L2) every tier runs at the store traffic's speed and the first place goes to any tier (2026-12-04, load 5-7: AVX-512 1, AVX2 4, scalar 1 of 6 runs, within 10%): a tie at memory. Non-temporal stores (`vmovntps`, 64-byte aligned, `sfence`) and 64-byte aligned ordinary stores were measured and gave nothing (both 14-16 GiB/s like the plain stores), not kept. 2026-12-05 (branch pack, load 1.3-3.2): on the pipeline's case (`QuantizedWeight::dequantize_axis0`: a whole 4096 x 4096 weight by 128-row blocks into one 64 MiB output, a row of `benches/tiers.rs`) all tiers write at the memory's speed (7.3-8.2 GiB/s), AVX2 first in the 3 runs of one build and AVX-512 in the 4 runs of a control build whose AVX-512 column also ran the AVX2 code 2 of 4 times: a tie at memory; in L2 AVX-512 first in 5 of 5 (+4-11%): AVX-512 stays |
//! | `widen_f16` | AVX2 went through `half`'s 4-lane F16C loop: now `vcvtph2ps` on 8 lanes (AVX-512: 16). The AVX-512 loop was bound by its 64-byte stores, every one split over two cache lines (the outputs are 16-byte aligned): it now writes the first elements up to a 64-byte boundary with `half` and then only aligned vectors. In L2 AVX-512 went from second (11.6-12.8 vs AVX2 13.3-14.1 GiB/s of f16, six runs of six) to first (14.5-15.2 vs 12.9-14.4, six of six); on the 128-row slab (beyond L2) first in 5 of 6 runs (before 3 of 6), 2026-12-04 22:30-22:37, load 5-7 |
//! | the whole weight (`quantize_weight`'s fused pass) | not the driving (rayon jobs, page faults: about 2%): each stripe's first pass (absmax) waited for memory and its second (the division, from L2) then ran alone. `quantize_packed_rows` now prefetches the next stripe (`simd::prefetch`) while it quantizes, and f32 uses 256 KiB stripes too: one core +24-27% for f16/bf16, +6-12% for f32 (BENCHMARKS.md, 2026-12-04) |
//! | f16/bf16 input to the fused pass (`block_absmax`, `block_minmax`, `quantize_packed` inside `quantize_weight`) | the stripe was widened into an f32 scratch and read back twice: the three kernels now take any `simd::Element` with a row stride and widen each vector in registers (`vcvtph2ps`, or `vpmovzxwd` + shift for bf16), reading the weight in place on AVX2 and AVX-512 (scalar and NEON keep the scratch: element-by-element widening was 2.5x slower there); no speed gain shown yet beyond the load's noise (BENCHMARKS.md) |
//! | `qdq_error`, `block_dot`, `scales_*`, `round_to_format` | the f16 rounding, as for `quantize` |
//! | AWQ-lite's elementwise loops: `scale_rows` (`rnd(w * s[row])` and the finite check), `unscaled_error` (`w - dq / s[row]`), `divide_columns` (`x / s[col]`, also the weight statistic's `\|w\| / amax`), `sum_f64` (the losses' f64 sums, 16 interleaved partial sums) | they ran on the crate's baseline SSE code: every tier now runs the one-lane body compiled with its target features (`Tier::dispatch_autovec`; IEEE operations per lane in a fixed order, so every tier gives the scalar body's bits). `cargo bench --bench tiers -- 300 AWQ`, 2026-12-05 00:36-00:37 UTC, load 0.5-1.3, two runs, 128 x 4096 slab: `sum_f64` 52-53 (AVX-512) / 55-56 (AVX2) vs 35 GiB/s (scalar tier = the old SSE code), `scale_rows` 13.0-13.2 / 11.6-11.8 vs 10.7-10.8; `unscaled_error` and `divide_columns` tie at the memory traffic (27.5-29.4 and 14.0-14.8 on every tier); in L2 (16 rows x 8) AVX2 47 and 24, AVX-512 43 and 22, scalar 39 and 20. AVX2 is 5-10% ahead of AVX-512 on three of the four: not settled, the loops are now below 1% of AWQ-lite's samples. End to end (awq_lite, 48M model) -6% CPU with the weight statistic's change (BENCHMARKS.md) |
//! | `qdq_unscaled_error` (AWQ-lite's error matrix `w - dq(q(rnd(w * t[row]))) / t[row]`, the symmetric search's only pass over a stripe after its absmax) | replaces `scale_rows`, `qdq_error` and `unscaled_error` (three stores per element, two re-reads): the scaled value is recomputed in registers. 2026-12-05 03:47-03:50 UTC, `tiers -- 300 AWQ`, 128 x 4096 slab: 9.8-10.1 GiB/s on AVX2 and AVX-512 against 4.0-4.4 for the three kernels in turn (2.3x), 8.4-8.6 scalar; in L2 AVX2 11.6, AVX-512 11.0: bound by its two correctly rounded divisions, a tie between the SIMD tiers (AVX-512 dispatched, as `qdq_error`). Its row loop is a plain loop: through `for_each_chunk` from two inlined call sites the closure was not inlined and ran without the tier's target features (the 48M model's searches 1.5x slower) |
//! | every kernel looping with `simd::for_each_chunk` | issue #20 split its loop into full runs and a tail at two call sites to drop about 25 scalar instructions of bookkeeping per vector; the kernels' closures then stopped being inlined and ran without the tier's target features (SIMD tiers 10-30x below scalar): back to one call site, see BENCHMARKS.md |
//!
//! Deciding runs (`cargo bench --bench tiers -- 1000`: every kernel and tier interleaved, best of
//! 1000 rounds, robust to the other jobs on a shared machine; 2026-12-03 13:28-13:47 UTC, load
//! 8-15, four runs; 2026-12-04 15:45-16:06 UTC, load 3.6-5.8, seven runs on an Intel AVX-512 CPU):
//! the dispatched tier is the fastest for every kernel but for ties inside the runs' spread, so no
//! tier is taken out: `dequantize` (AVX-512 the highest median, first in 4 of 7), `widen_f16`
//! (AVX2 and AVX-512 tie at the memory traffic's speed), `qdq_error` (AVX2 within 5% of scalar in
//! 2026-12-03's runs; 2026-12-04: AVX-512 first in 5 of 7, AVX2 ahead by 2-3% in the other two).
//! Every other kernel had AVX-512 first in all seven 2026-12-04 runs. `pack_nibbles` is settled
//! (AVX-512). Four more runs (`tiers -- 300`, 2026-12-04 19:49-19:51 UTC, load 4.6-5.9, Intel
//! AVX-512 host): `quantize` with f16 rounding AVX-512 first in 4 of 4 (14.0-14.5 vs AVX2
//! 8.0-8.7 GiB/s) and `widen_f16` in 4 of 4 (7.2-8.3 vs 6.6-8.0): both stay AVX-512, settled;
//! `pack_nibbles` AVX-512 and AVX2 within 1% in three runs (AVX2 ahead in two), AVX-512 8% ahead in
//! one: a tie, AVX-512 stays. `dequantize` had scalar first in 3 of those 4 (18.8-23.4 vs AVX-512
//! 14.6-20.1): not settled, left as it is (it writes 2 MiB of f32 per call; see its row).
//! Branch deq (2026-12-04 22:30-22:37 UTC, load 5-7, six runs each of main and the change,
//! alternated): `benches/tiers.rs` has in-L2 rows for `pack_nibbles`, `dequantize` and `widen_f16`
//! (16 rows, 8 calls in a row), which show each kernel's own speed; there AVX-512 is first for all
//! three (dequantize 5 of 6, the others 6 of 6). On the 128-row slab `dequantize` and
//! `pack_nibbles` remain ties at the memory traffic (any tier first, within 10%): not met there, and
//! no change that could be measured moved them (rows above). Branch pack (2026-12-05 03:09-03:57
//! UTC): the same for the whole-weight rows (the pipeline's case), and a control build showed that
//! `tiers` puts identical code 7-12% apart depending on its column: gaps under 10% on these rows
//! are not a ranking.

pub mod block_absmax;
pub mod block_dot;
pub mod block_minmax;
pub(crate) mod code;
pub mod dequantize;
pub mod divide_columns;
pub mod pack;
pub mod qdq_error;
pub mod qdq_unscaled_error;
pub mod quantize;
pub mod quantize_packed;
pub mod quantize_packed_f16;
pub mod round;
pub mod scale_rows;
pub mod scales;
pub mod sum_f64;
pub mod unscaled_error;
pub mod widen;

pub use block_absmax::{block_absmax, block_absmax_with};
pub use block_dot::{block_dot, block_dot_with};
pub use block_minmax::{block_minmax, block_minmax_with};
pub use dequantize::{dequantize, dequantize_with};
pub use divide_columns::{divide_columns, divide_columns_with};
pub use pack::{pack_nibbles, pack_nibbles_with, unpack_nibbles};
pub use qdq_error::{qdq_error, qdq_error_with, QdqOutput};
pub use qdq_unscaled_error::{qdq_unscaled_error, qdq_unscaled_error_with};
pub use quantize::{quantize, quantize_with};
pub use quantize_packed::{quantize_packed, quantize_packed_f16_with, quantize_packed_with};
pub use quantize_packed_f16::{native_f16, native_f16_available};
pub use round::{round_to_format, round_to_format_with};
pub use scale_rows::{scale_rows, scale_rows_with};
pub use scales::{
    scales_symmetric, scales_symmetric_alphas_with, scales_symmetric_with, scales_zero_point,
    scales_zero_point_alphas_with, scales_zero_point_with,
};
pub use sum_f64::{sum_f64, sum_f64_with};
pub use unscaled_error::{unscaled_error, unscaled_error_with};
pub use widen::{widen_bf16, widen_f16, widen_f16_with};

use crate::{Error, Result, Tier};

pub(crate) fn check_tier(tier: Tier) -> Result<()> {
    if tier.is_available() {
        Ok(())
    } else {
        Err(Error::TierUnavailable(tier))
    }
}

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::LengthMismatch { what, expected, actual })
    }
}

/// Checks that `len` elements form whole rows of `cols` and returns the row count.
pub(crate) fn slab_rows(what: &'static str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        return check_len(what, 0, len).map(|_| 0);
    }
    if !len.is_multiple_of(cols) {
        return Err(Error::LengthMismatch { what, expected: len.div_ceil(cols) * cols, actual: len });
    }
    Ok(len / cols)
}

/// The checks every per-column kernel makes: a tier this CPU runs, whole rows, one scale (and zero
/// point) per column, an output of `out_len` for `out_expected` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_slab(
    op: &'static str,
    tier: Tier,
    w_len: usize,
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out_expected: usize,
    out_len: usize,
) -> Result<()> {
    check_tier(tier)?;
    slab_rows(op, w_len, cols)?;
    check_len(op, cols, scale.len())?;
    if let Some(zp) = zero_point {
        check_len(op, cols, zp.len())?;
    }
    check_len(op, out_expected, out_len)
}
