//! Every kernel on every available tier, interleaved: each round runs every (kernel, tier) once on
//! the same 128 x 4096 f32 slab (2 MiB), and the best round of each is reported, in GiB/s of the
//! bytes the kernel reads, beside a plain read of the slab. The minimum over interleaved rounds is
//! what the kernel costs when it has the core; criterion's means are pulled apart by the load of
//! other jobs on a shared machine, so this is the run that decides the dispatch table in
//! `src/kernels/mod.rs`.
//!
//! `pack_nibbles` and `dequantize` also run on a whole 4096 x 4096 weight's codes (their pipeline
//! case; with these rows in the rounds the 128-row slab no longer stays in cache between calls)
//! and, 8 calls in a row, on a 16-row slab that stays in L2 (their own speed). Identical code can
//! come out up to about 10% apart in two tiers' columns (BENCHMARKS.md, branch pack).
//!
//! Then the whole 4096 x 4096 weight (`quantize_weight`, block 128, RTN, all cores) on each tier
//! for f32, f16 and bf16 input, beside a plain read of the same bytes, interleaved the same way
//! (ROUNDS / 20 rounds, at least 5).
//!
//! `cargo bench --bench tiers [-- ROUNDS] [whole | NAME]` (default 300 rounds; one line per kernel
//! and tier). With `whole`, only the whole weight, ROUNDS rounds (`RAYON_NUM_THREADS=1` for one
//! core; `NIBBLE_FP16=off` for f16 on the f32 lanes instead of the native AVX512-FP16 sub-path);
//! with another word, only the kernels whose name contains it (no whole weight).

mod common;
use common::data;
use nibble::kernels::*;
use nibble::quantize_weight::quantize_weight_with;
use nibble::{Bits, BlockSize, FloatFormat, QuantParams, Tier, WeightData};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// One measured kernel: its name, tier, bytes read per call, and the call.
struct Case<'a> {
    name: &'static str,
    tier: Option<Tier>,
    bytes: usize,
    run: Box<dyn FnMut() + 'a>,
    best: Duration,
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(300);
    if std::env::args().any(|a| a == "whole") {
        whole_weight(rounds);
        return;
    }
    let (rows, cols) = (128usize, 4096usize);
    let w = data(rows * cols, common::SLAB_SEED);
    let w16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
    let mut amax = vec![0.0f32; cols];
    block_absmax(&w, cols, &mut amax).unwrap();
    let mut scale = vec![0.0f32; cols];
    scales_symmetric(FloatFormat::F32, Bits::Four, &amax, 1.0, &mut scale).unwrap();
    let mut codes0 = vec![0u8; w.len()];
    quantize(FloatFormat::F32, Bits::Four, &w, cols, &scale, None, &mut codes0).unwrap();
    // f16 scales of the f16 slab, as the pipeline computes them.
    let w16_f32: Vec<f32> = w16.iter().map(|h| h.to_f32()).collect();
    block_absmax(&w16_f32, cols, &mut amax).unwrap();
    let mut scale16 = vec![0.0f32; cols];
    scales_symmetric(FloatFormat::F16, Bits::Four, &amax, 1.0, &mut scale16).unwrap();
    let f32_bytes = w.len() * 4;
    // A whole 4096 x 4096 weight's codes (the slab's codes 32 times), as the pipeline packs them.
    let big: Vec<u8> = codes0.iter().copied().cycle().take(32 * codes0.len()).collect();
    let (w, w16, scale, scale16, codes0, big) = (&w, &w16, &scale, &scale16, &codes0, &big);
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name, tier, bytes, run: Box<dyn FnMut()>| {
        cases.push(Case { name, tier, bytes, run, best: Duration::MAX });
    };
    add(
        "plain read",
        None,
        f32_bytes,
        Box::new(move || {
            black_box(w.iter().fold(0u32, |a, x| a ^ x.to_bits()));
        }),
    );
    for tier in Tier::available() {
        let t = Some(tier);
        let mut o = vec![0.0f32; cols];
        add(
            "block_absmax",
            t,
            f32_bytes,
            Box::new(move || block_absmax_with(tier, black_box(w), cols, &mut o).unwrap()),
        );
        let (mut lo, mut hi) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        add(
            "block_minmax",
            t,
            f32_bytes,
            Box::new(move || block_minmax_with(tier, black_box(w), cols, false, &mut lo, &mut hi).unwrap()),
        );
        let mut c = vec![0u8; w.len()];
        add(
            "quantize (f32, dispatched body)",
            t,
            f32_bytes,
            Box::new(move || {
                quantize_with(tier, FloatFormat::F32, Bits::Four, black_box(w), cols, scale, None, &mut c).unwrap()
            }),
        );
        let mut c = vec![0u8; w.len()];
        add(
            "quantize (f32, hand-written lanes)",
            t,
            f32_bytes,
            Box::new(move || {
                quantize::quantize_handwritten_with(
                    tier,
                    FloatFormat::F32,
                    Bits::Four,
                    black_box(w),
                    cols,
                    scale,
                    None,
                    &mut c,
                )
                .unwrap()
            }),
        );
        let mut c = vec![0u8; w.len()];
        add(
            "quantize (f16 rounding)",
            t,
            f32_bytes,
            Box::new(move || {
                quantize_with(tier, FloatFormat::F16, Bits::Four, black_box(w), cols, scale, None, &mut c).unwrap()
            }),
        );
        let mut p = vec![0u8; w.len() / 2];
        add(
            "quantize_packed (f32, dispatched body)",
            t,
            f32_bytes,
            Box::new(move || {
                quantize_packed_with(tier, FloatFormat::F32, black_box(w), cols, scale, None, &mut p).unwrap()
            }),
        );
        let mut p = vec![0u8; w.len() / 2];
        add(
            "quantize_packed (f32, hand-written lanes)",
            t,
            f32_bytes,
            Box::new(move || {
                quantize_packed::quantize_packed_handwritten_with(
                    tier,
                    FloatFormat::F32,
                    black_box(w),
                    cols,
                    scale,
                    None,
                    &mut p,
                )
                .unwrap()
            }),
        );
        for (name, format) in [
            ("quantize_packed (f16 rounding)", FloatFormat::F16),
            ("quantize_packed (bf16 rounding)", FloatFormat::BF16),
        ] {
            let mut p = vec![0u8; w.len() / 2];
            add(
                name,
                t,
                f32_bytes,
                Box::new(move || quantize_packed_with(tier, format, black_box(w), cols, scale, None, &mut p).unwrap()),
            );
        }
        // f16 weights read as f16 with f16 scales (the pipeline's case), per f16 byte: the tier's
        // f32 lanes, and the native f16 sub-path (AVX-512 tier of a CPU with AVX512-FP16; the
        // f32 lanes elsewhere).
        for (name, native) in [
            ("quantize_packed (f16 weight, f32 lanes; per f16 byte)", false),
            ("quantize_packed (f16 weight, native fp16; per f16 byte)", true),
        ] {
            let mut p = vec![0u8; w.len() / 2];
            add(
                name,
                t,
                w16.len() * 2,
                Box::new(move || {
                    quantize_packed_f16_with(tier, native, black_box(w16), cols, scale16, None, &mut p).unwrap()
                }),
            );
        }
        let mut p = vec![0u8; w.len() / 2];
        add(
            "pack_nibbles (per code byte)",
            t,
            w.len(),
            Box::new(move || pack_nibbles_with(tier, black_box(codes0), &mut p).unwrap()),
        );
        let mut o = vec![0.0f32; w.len()];
        add(
            "dequantize (per f32 written)",
            t,
            f32_bytes,
            Box::new(move || {
                dequantize_with(tier, FloatFormat::F32, black_box(codes0), cols, scale, None, &mut o).unwrap()
            }),
        );
        let mut o = vec![0.0f32; w.len()];
        add(
            "qdq_error",
            t,
            f32_bytes,
            Box::new(move || {
                qdq_error_with(
                    tier,
                    FloatFormat::F32,
                    Bits::Four,
                    black_box(w),
                    cols,
                    scale,
                    None,
                    QdqOutput::Error,
                    &mut o,
                )
                .unwrap()
            }),
        );
        let mut o = vec![0.0f32; w.len()];
        add(
            "widen_f16 (per f16 byte)",
            t,
            w.len() * 2,
            Box::new(move || widen_f16_with(tier, black_box(w16), &mut o).unwrap()),
        );
        // The same three kernels on a 16-row slab (256 KiB of f32), called 8 times in a row: after
        // the first call their data are in L2, so these rows show the kernels' own speed apart
        // from the memory traffic that bounds the 128-row rows above.
        let mut o = vec![0.0f32; w.len()];
        add(
            "scale_rows (AWQ w * s[row], f32)",
            t,
            f32_bytes,
            Box::new(move || {
                scale_rows_with(tier, FloatFormat::F32, black_box(w), &scale[..rows], cols, &mut o).unwrap();
            }),
        );
        // Row scales of 1: the error of the error stays bounded from call to call.
        let (mut e, ones) = (w.to_vec(), vec![1.0f32; rows]);
        add(
            "unscaled_error (AWQ w - dq / s[row])",
            t,
            2 * f32_bytes,
            Box::new(move || unscaled_error_with(tier, &mut e, black_box(w), &ones, cols).unwrap()),
        );
        let mut o = vec![0.0f32; w.len()];
        add(
            "divide_columns (AWQ x / s[col])",
            t,
            f32_bytes,
            Box::new(move || divide_columns_with(tier, black_box(w), scale, &mut o).unwrap()),
        );
        add(
            "sum_f64 (AWQ loss, a * b)",
            t,
            2 * f32_bytes,
            Box::new(move || {
                black_box(sum_f64_with(tier, black_box(w), w, |p, q| p * q).unwrap());
            }),
        );
        // AWQ-lite's error matrix from the weight, row factors 0.75 (scales of the unscaled slab:
        // codes in range): the one-pass kernel, and the three passes it replaces.
        let (mut e, rt) = (vec![0.0f32; w.len()], vec![0.75f32; rows]);
        add(
            "AWQ E in one pass: qdq_unscaled_error",
            t,
            f32_bytes,
            Box::new(move || {
                qdq_unscaled_error_with(
                    tier,
                    FloatFormat::F32,
                    Bits::Four,
                    black_box(w),
                    cols,
                    &rt,
                    scale,
                    None,
                    &mut e,
                )
                .unwrap()
            }),
        );
        let (mut scaled, mut e, rt) = (vec![0.0f32; w.len()], vec![0.0f32; w.len()], vec![0.75f32; rows]);
        add(
            "AWQ E in three passes: scale_rows + qdq_error + unscaled_error",
            t,
            f32_bytes,
            Box::new(move || {
                scale_rows_with(tier, FloatFormat::F32, black_box(w), &rt, cols, &mut scaled).unwrap();
                let dq = QdqOutput::Dequantized;
                qdq_error_with(tier, FloatFormat::F32, Bits::Four, &scaled, cols, scale, None, dq, &mut e).unwrap();
                unscaled_error_with(tier, &mut e, w, &rt, cols).unwrap();
            }),
        );
        let small = 16 * cols;
        let (mut e, rt) = (vec![0.0f32; small], vec![0.75f32; 16]);
        add(
            "AWQ E in one pass (16 rows x 8, in L2)",
            t,
            8 * small * 4,
            Box::new(move || {
                for _ in 0..8 {
                    let w = black_box(&w[..small]);
                    qdq_unscaled_error_with(tier, FloatFormat::F32, Bits::Four, w, cols, &rt, scale, None, &mut e)
                        .unwrap();
                }
            }),
        );
        let (mut e, ones) = (w[..small].to_vec(), vec![1.0f32; 16]);
        add(
            "unscaled_error (16 rows x 8, in L2)",
            t,
            8 * 2 * small * 4,
            Box::new(move || {
                for _ in 0..8 {
                    unscaled_error_with(tier, &mut e, black_box(&w[..small]), &ones, cols).unwrap();
                }
            }),
        );
        let mut o = vec![0.0f32; small];
        add(
            "divide_columns (16 rows x 8, in L2)",
            t,
            8 * small * 4,
            Box::new(move || {
                for _ in 0..8 {
                    divide_columns_with(tier, black_box(&w[..small]), scale, &mut o).unwrap();
                }
            }),
        );
        let mut p = vec![0u8; small / 2];
        add(
            "pack_nibbles (16 rows x 8, in L2)",
            t,
            8 * small,
            Box::new(move || {
                for _ in 0..8 {
                    pack_nibbles_with(tier, black_box(&codes0[..small]), &mut p).unwrap();
                }
            }),
        );
        let mut o = vec![0.0f32; small];
        add(
            "dequantize (16 rows x 8, in L2)",
            t,
            8 * small * 4,
            Box::new(move || {
                for _ in 0..8 {
                    dequantize_with(tier, FloatFormat::F32, black_box(&codes0[..small]), cols, scale, None, &mut o)
                        .unwrap();
                }
            }),
        );
        // The whole weight's codes, as `quantize_weight` (axis 1, odd column counts), GPTQ and the
        // scale search pack them (16 MiB read, 8 MiB written per call) and as
        // `QuantizedWeight::dequantize_axis0` dequantizes them, one 128-row block at a time into
        // the whole output (64 MiB written per call).
        let mut p = vec![0u8; big.len() / 2];
        add(
            "pack_nibbles (4096 x 4096 codes, a whole weight)",
            t,
            big.len(),
            Box::new(move || pack_nibbles_with(tier, black_box(big), &mut p).unwrap()),
        );
        let mut o = vec![0.0f32; big.len()];
        add(
            "dequantize (4096 x 4096 codes by 128-row blocks; per f32 written)",
            t,
            big.len() * 4,
            Box::new(move || {
                for (c, o) in big.chunks_exact(rows * cols).zip(o.chunks_exact_mut(rows * cols)) {
                    dequantize_with(tier, FloatFormat::F32, black_box(c), cols, scale, None, o).unwrap();
                }
            }),
        );
        let mut o = vec![0.0f32; small];
        add(
            "widen_f16 (16 rows x 8, in L2)",
            t,
            8 * small * 2,
            Box::new(move || {
                for _ in 0..8 {
                    widen_f16_with(tier, black_box(&w16[..small]), &mut o).unwrap();
                }
            }),
        );
    }
    // A word that is not a number or `whole` keeps only the kernels whose name contains it.
    let only = std::env::args().skip(1).find(|a| a.parse::<usize>().is_err() && a != "whole" && a != "--bench");
    if let Some(only) = &only {
        cases.retain(|c| c.tier.is_none() || c.name.contains(only.as_str()));
    }
    report(&mut cases, rounds);
    if only.is_none() {
        whole_weight((rounds / 20).max(5));
    }
}

/// Runs every case once per round, keeps the best, and prints one table row per name.
fn report(cases: &mut [Case], rounds: usize) {
    for _ in 0..rounds {
        for case in cases.iter_mut() {
            let start = Instant::now();
            (case.run)();
            case.best = case.best.min(start.elapsed());
        }
    }
    println!("{rounds} interleaved rounds, best of each, GiB/s of bytes read");
    let gib = |c: &Case| c.bytes as f64 / c.best.as_secs_f64() / (1u64 << 30) as f64;
    let mut names: Vec<&str> = Vec::new();
    for c in cases.iter() {
        if !names.contains(&c.name) {
            names.push(c.name);
        }
    }
    println!("| kernel | {} | fastest |", Tier::available().iter().map(|t| t.name()).collect::<Vec<_>>().join(" | "));
    for name in names {
        let row: Vec<&Case> = cases.iter().filter(|c| c.name == name).collect();
        let cells: Vec<String> = row.iter().map(|c| format!("{:.2}", gib(c))).collect();
        let fastest = row.iter().max_by(|a, b| gib(a).total_cmp(&gib(b))).and_then(|c| c.tier).map_or("", |t| t.name());
        println!("| {name} | {} | {fastest} |", cells.join(" | "));
    }
}

/// The whole 4096 x 4096 weight in f32, f16 and bf16 on each tier, and plain reads of its bytes.
fn whole_weight(rounds: usize) {
    let (k, n) = (4096usize, 4096usize);
    let w = data(k * n, common::SLAB_SEED);
    let w16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
    let wb16: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let params = QuantParams::rtn(BlockSize::Blocked(128));
    let (w, w16, wb16, params) = (&w, &w16, &wb16, &params);
    println!("whole weight f16 on the avx512 tier: native fp16 sub-path {}", if native_f16() { "on" } else { "off" });
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name, tier, bytes, run: Box<dyn FnMut()>| {
        cases.push(Case { name, tier, bytes, run, best: Duration::MAX });
    };
    add(
        "plain read, f32 (one core)",
        None,
        k * n * 4,
        Box::new(move || {
            black_box(w.iter().fold(0u32, |a, x| a ^ x.to_bits()));
        }),
    );
    add(
        "plain read, 16-bit (one core)",
        None,
        k * n * 2,
        Box::new(move || {
            black_box(w16.iter().fold(0u16, |a, x| a ^ x.to_bits()));
        }),
    );
    for tier in Tier::available() {
        let t = Some(tier);
        add(
            "whole weight f32",
            t,
            k * n * 4,
            Box::new(move || {
                black_box(quantize_weight_with(tier, WeightData::F32(black_box(w)), [k, n], params).unwrap());
            }),
        );
        add(
            "whole weight f16",
            t,
            k * n * 2,
            Box::new(move || {
                black_box(quantize_weight_with(tier, WeightData::F16(black_box(w16)), [k, n], params).unwrap());
            }),
        );
        add(
            "whole weight bf16",
            t,
            k * n * 2,
            Box::new(move || {
                black_box(quantize_weight_with(tier, WeightData::BF16(black_box(wb16)), [k, n], params).unwrap());
            }),
        );
    }
    report(&mut cases, rounds);
}
