//! ModelOpt's AWQ statistics and searches (`tests/data/golden/get_*`, `clip_search_*`,
//! `awq_lite_*`, `alpha_grids`) reproduced: statistics and everything computed elementwise from
//! a chosen alpha bit for bit, chosen alphas equal, losses within a stated relative bound.

use nibble::{awq, FloatFormat};
use nibble_driver::calibrate::npy::{read_arrays, Array, DType};
use std::collections::HashMap;
use std::path::PathBuf;

fn load(case: &str) -> HashMap<String, Array> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/golden/{case}.npz"));
    read_arrays(&p).unwrap().into_iter().collect()
}

fn format(a: &Array) -> FloatFormat {
    match a.dtype {
        DType::F32 => FloatFormat::F32,
        DType::F16 => FloatFormat::F16,
        d => panic!("{d:?}"),
    }
}

fn f32s(a: &Array) -> Vec<f32> {
    a.as_f32().unwrap()
}

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn alpha_grids() {
    let a = load("alpha_grids");
    assert_eq!(awq::lite_alphas(0.1), a["out_awq_lite_alphas"].to_f64());
    assert_eq!(awq::clip_alphas(0.5, 0.05), a["out_awq_clip_alphas"].to_f64());
}

#[test]
fn act_scale() {
    for case in ["get_act_scale_fp32", "get_act_scale_fp16"] {
        let a = load(case);
        let x = &a["in_x"];
        let got = awq::act_scale(format(x), &f32s(x), x.shape[1]);
        assert_eq!(bits(&got), bits(&f32s(&a["out_act_scale"])), "{case}");
    }
}

#[test]
fn weight_scale() {
    for case in [
        "get_weight_scale_fp32_256x64_b128",
        "get_weight_scale_fp32_200x48_b128",
        "get_weight_scale_fp32_256x64_b32",
        "get_weight_scale_fp16_256x64_b128",
        "get_weight_scale_fp16_200x48_b128",
        "get_weight_scale_fp16_256x64_b32",
    ] {
        let a = load(case);
        let w = &a["in_w"];
        let block = a["in_block_size"].to_f64()[0] as usize;
        let got = awq::weight_scale(format(w), &f32s(w), [w.shape[0], w.shape[1]], block);
        let want = f32s(&a["out_weight_scale"]);
        let same = got.iter().zip(&want).filter(|(g, w)| g.to_bits() == w.to_bits()).count();
        assert_eq!(same, want.len(), "{case}: {same} of {} equal", want.len());
    }
}

#[test]
fn awq_scale_formula() {
    for case in ["get_scale_fp32", "get_scale_fp16"] {
        let a = load(case);
        let (xm, wm) = (&a["in_x_max"], &a["in_w_max"]);
        for (i, alpha) in a["in_alphas"].to_f64().into_iter().enumerate() {
            let got = awq::awq_scale(format(xm), &f32s(xm), &f32s(wm), alpha);
            let want = f32s(&a[&format!("out_scale_alpha{i}")]);
            if format(xm) == FloatFormat::F16 {
                assert_eq!(bits(&got), bits(&want), "{case} alpha {alpha}");
            } else {
                // numpy's float32 power is CPU-dependent (SVML on AVX-512): within 1 ulp per step.
                let worst = got.iter().zip(&want).map(|(g, w)| ulps(*g, *w)).max().unwrap();
                assert!(worst <= 3, "{case} alpha {alpha}: {worst} ulp");
            }
        }
    }
}

#[test]
fn fused_mean() {
    let a = load("awq_lite_fused_mean");
    let s: Vec<Vec<f32>> = ["in_s0", "in_s1", "in_s2"].iter().map(|k| f32s(&a[*k])).collect();
    let refs: Vec<&[f32]> = s.iter().map(|v| v.as_slice()).collect();
    assert_eq!(bits(&awq::mean_scales(FloatFormat::F32, &refs)), bits(&f32s(&a["out_mean"])));
}

use nibble::quantize_weight::{quantize_weight_alphas_with, QuantParams};
use nibble::{BlockSize, Tier, WeightData};

fn weight_data<'a>(a: &'a Array, w: &'a [f32], w16: &'a [half::f16]) -> WeightData<'a> {
    match a.dtype {
        DType::F16 => WeightData::F16(w16),
        _ => WeightData::F32(w),
    }
}

fn halves(a: &Array) -> Vec<half::f16> {
    a.as_u16().map(|v| v.into_iter().map(half::f16::from_bits).collect()).unwrap_or_default()
}

/// Co-major `[N * nb]` (ModelOpt's flattening) to block-major `[nb][N]`.
fn block_major(v: &[f32], n: usize, nb: usize) -> Vec<f32> {
    (0..nb).flat_map(|b| (0..n).map(move |j| (b, j))).map(|(b, j)| v[j * nb + b]).collect()
}

/// Relative loss agreement with ModelOpt. float32: both sides are float32 sums in another order.
/// float16: ModelOpt rounds every product, sum and difference of the loss to float16, nibble
/// computes the loss in float32, so the bound is float16's precision over the cancellation.
const LOSS_BOUND_F32: f64 = 1e-4;
const LOSS_BOUND_F16: f64 = 0.1;
/// The clip search reproduces ModelOpt's loss arithmetic exactly.
const CLIP_LOSS_BOUND: f64 = 0.0;

#[test]
fn clip_search_matches_modelopt() {
    let cases = [
        "clip_search_fp32_256x96_b128_tok100_bsz1024",
        "clip_search_fp32_200x40_b128_tok64_bsz16",
        "clip_search_fp32_256x96_b32_tok300_bsz32",
        "clip_search_fp32_128x24_b128_tok10_bsz1024",
        "clip_search_fp16_256x96_b128_tok100_bsz1024",
        "clip_search_fp16_200x40_b128_tok64_bsz16",
        "clip_search_fp16_256x96_b32_tok300_bsz32",
        "clip_search_fp16_128x24_b128_tok10_bsz1024",
    ];
    let (mut total, mut same_alpha) = (0usize, 0usize);
    let mut worst_rel = 0f64;
    for case in cases {
        let a = load(case);
        let (wa, xa) = (&a["in_w"], &a["in_x"]);
        let fmt = format(wa);
        let (k, n) = (wa.shape[0], wa.shape[1]);
        let block = a["in_block_size"].to_f64()[0] as usize;
        let nb = k.div_ceil(block);
        let params = QuantParams::rtn(BlockSize::Blocked(block));
        let alphas = a["in_alphas"].to_f64();
        let (w, x) = (f32s(wa), f32s(xa));
        let s = awq::clip_search(Tier::best(), fmt, &x, &w, [k, n], &params, &alphas).unwrap();
        // Losses: [alpha][co][nb] in the golden.
        let want_losses = f32s(&a["out_losses"]);
        for (ai, loss) in s.losses.iter().enumerate() {
            for j in 0..n {
                for b in 0..nb {
                    let (g, w) = (loss[b * n + j] as f64, want_losses[(ai * n + j) * nb + b] as f64);
                    let rel = (g - w).abs() / w.abs().max(1e-30);
                    worst_rel = worst_rel.max(rel);
                    assert!(rel <= CLIP_LOSS_BOUND, "{case}: loss alpha {ai} col {j} block {b}: {g} vs {w}");
                }
            }
        }
        // Chosen ratios: equal except where the two best losses are within float32 noise.
        let want_alpha = block_major(&f32s(&a["out_best_alpha"]), n, nb);
        for (i, (&mine_alpha, &their_alpha)) in s.best_alpha.iter().zip(&want_alpha).enumerate() {
            total += 1;
            if mine_alpha == their_alpha {
                same_alpha += 1;
                continue;
            }
            let ai = |v: f32| alphas.iter().position(|&x| fmt.constant(x) == v).unwrap();
            let (mine, theirs) = (s.losses[ai(mine_alpha)][i] as f64, s.losses[ai(their_alpha)][i] as f64);
            let bound = if fmt == FloatFormat::F16 { LOSS_BOUND_F16 } else { LOSS_BOUND_F32 };
            assert!(
                (mine - theirs).abs() <= 2.0 * bound * theirs.abs(),
                "{case}: block/col {i}: not a near-tie ({mine} vs {theirs})"
            );
        }
        // Final weights from ModelOpt's chosen ratios: bit-exact.
        let w16 = halves(wa);
        let q =
            quantize_weight_alphas_with(Tier::best(), weight_data(wa, &w, &w16), [k, n], &params, Some(&want_alpha))
                .unwrap();
        let want_q = nibble::reference::pack(&a["out_final_q"].data);
        assert_eq!(q.packed, want_q, "{case}: final codes");
        assert_eq!(bits(&q.scale), bits(&f32s(&a["out_final_scale"])), "{case}: final scales");
    }
    eprintln!("clip search: {same_alpha} of {total} ratios equal, worst loss difference {worst_rel:e} relative");
    assert_eq!(same_alpha, total, "clip ratios equal");
}

#[test]
fn awq_lite_node_matches_modelopt() {
    let cases = [
        "awq_lite_node_fp32_256x96_b128",
        "awq_lite_node_fp32_256x96_b128_zp",
        "awq_lite_node_fp32_200x64_b128_clip",
        "awq_lite_node_fp32_256x64_b32_clip",
        "awq_lite_node_fp32_256x64_b32_zp_clip",
        "awq_lite_node_fp16_256x96_b128",
        "awq_lite_node_fp16_256x96_b128_zp",
        "awq_lite_node_fp16_200x64_b128_clip",
        "awq_lite_node_fp16_256x64_b32_clip",
        "awq_lite_node_fp16_256x64_b32_zp_clip",
    ];
    for case in cases {
        let a = load(case);
        let (wa, xa) = (&a["in_w"], &a["in_x"]);
        let fmt = format(wa);
        let (k, n) = (wa.shape[0], wa.shape[1]);
        let block = a["in_block_size"].to_f64()[0] as usize;
        let zp = a["in_use_zero_point"].to_f64()[0] != 0.0;
        let clip = a["in_weight_clipping"].to_f64()[0] != 0.0;
        let params = QuantParams {
            block_size: BlockSize::Blocked(block),
            axis: 0,
            zero_point: zp,
            alpha: 1.0,
            bits: nibble::Bits::Four,
        };
        let (w, x) = (f32s(wa), f32s(xa));
        let alphas = a["out_alphas"].to_f64();
        assert_eq!(alphas, awq::lite_alphas(0.1));
        let s = awq::lite_search(Tier::best(), fmt, &x, &w, [k, n], &params, &alphas).unwrap();
        assert_eq!(bits(&s.act_scale), bits(&f32s(&a["out_act_scale"])), "{case}: act scale");
        assert_eq!(bits(&s.weight_scale), bits(&f32s(&a["out_weight_scale"])), "{case}: weight scale");
        let want_losses = a["out_losses"].to_f64();
        let bound = if fmt == FloatFormat::F16 { LOSS_BOUND_F16 } else { LOSS_BOUND_F32 };
        for (g, w) in s.losses.iter().zip(&want_losses) {
            assert!((g - w).abs() <= bound * w.abs(), "{case}: loss {g} vs {w}");
        }
        let want_alpha = a["out_best_alpha"].to_f64()[0];
        let want_best = alphas.iter().position(|&v| v == want_alpha).unwrap();
        if s.best != want_best {
            let (mine, theirs) = (s.losses[s.best], s.losses[want_best]);
            assert!(
                (mine - theirs).abs() <= 2.0 * bound * theirs,
                "{case}: alpha {} vs {want_alpha}: not a near-tie",
                s.alphas[s.best]
            );
        } else {
            let want_scale = f32s(&a["out_best_scale"]);
            let worst = s.best_scale.iter().zip(&want_scale).map(|(g, w)| ulps(*g, *w)).max().unwrap();
            // float32: two powers (1 ulp each, CPU-dependent in numpy), a quotient and the normalization.
            let allowed = if fmt == FloatFormat::F16 { 0 } else { 6 };
            assert!(worst <= allowed, "{case}: best scale off by {worst} ulp");
        }
        // The Gram form (f32 weights, T > K) and the error form (f32 weights, T <= K) of the loss
        // against ModelOpt's losses.
        for form in [awq::LossForm::Gram, awq::LossForm::Error].into_iter().filter(|_| fmt == FloatFormat::F32) {
            let g = awq::lite_search_with(Tier::best(), fmt, &x, &w, [k, n], &params, &alphas, form).unwrap();
            for (g, w) in g.losses.iter().zip(&want_losses) {
                assert!((g - w).abs() <= bound * w.abs(), "{case}: {form:?} loss {g} vs {w}");
            }
            assert!(
                g.best == want_best
                    || (g.losses[g.best] - g.losses[want_best]).abs() <= 2.0 * bound * g.losses[want_best]
            );
        }
        // Everything downstream of ModelOpt's chosen scale (and clip ratios): bit-exact.
        let best_scale = f32s(&a["out_best_scale"]);
        let scaled = awq::lite::scale_rows(fmt, &w, &best_scale, n);
        let nb = k.div_ceil(block);
        let clip_alphas = clip.then(|| block_major(&f32s(&a["out_clip_alpha"]), n, nb));
        if clip && !zp {
            let c = awq::clip_search(
                Tier::best(),
                fmt,
                &x,
                &scaled,
                [k, n],
                &QuantParams { zero_point: false, ..params },
                &awq::clip_alphas(0.5, 0.05),
            )
            .unwrap();
            assert_eq!(&c.best_alpha, clip_alphas.as_ref().unwrap(), "{case}: clip ratios");
        }
        // ModelOpt ignores the clip ratio with a zero point (nibble applies it; see the README).
        let final_alphas = if zp { None } else { clip_alphas.as_deref() };
        let scaled16: Vec<half::f16> = scaled.iter().map(|&v| half::f16::from_f32(v)).collect();
        let data = if fmt == FloatFormat::F16 { WeightData::F16(&scaled16) } else { WeightData::F32(&scaled) };
        let q = quantize_weight_alphas_with(Tier::best(), data, [k, n], &params, final_alphas).unwrap();
        let codes: Vec<u8> = a["out_final_q"].data.clone();
        assert_eq!(q.packed, nibble::reference::pack(&codes), "{case}: final codes");
        assert_eq!(bits(&q.scale), bits(&f32s(&a["out_final_scale"])), "{case}: final scales");
        if zp {
            let want: Vec<u8> = f32s(&a["out_final_zp"]).iter().map(|&z| z as u8).collect();
            assert_eq!(q.zero_point.unwrap(), want, "{case}: zero points");
        }
        let inv: Vec<f32> = best_scale.iter().map(|&v| fmt.round(1.0 / v)).collect();
        assert_eq!(bits(&inv), bits(&f32s(&a["out_pqs_inv"])), "{case}: inverse pre-quant scale");
    }
}

#[test]
fn awq_lite_subgraph_matches_modelopt() {
    for case in ["awq_lite_subgraph_fp32", "awq_lite_subgraph_fp16"] {
        let a = load(case);
        let fmt = format(&a["in_x"]);
        let x = f32s(&a["in_x"]);
        let w: Vec<(Vec<f32>, usize)> =
            ["in_w0", "in_w1", "in_w2"].iter().map(|n| (f32s(&a[*n]), a[*n].shape[1])).collect();
        let ws: Vec<(&[f32], usize)> = w.iter().map(|(v, n)| (v.as_slice(), *n)).collect();
        let k = a["in_x"].shape[1];
        let block = a["in_block_size"].to_f64()[0] as usize;
        let params = QuantParams::rtn(BlockSize::Blocked(block));
        let s = awq::subgraph_search(fmt, &x, k, &ws, &params, &awq::arange(0.0, 1.1, 0.1)).unwrap();
        assert_eq!(bits(&s.x_m), bits(&f32s(&a["out_x_m"])), "{case}: x_m");
        assert_eq!(bits(&s.w_m), bits(&f32s(&a["out_w_m"])), "{case}: w_m");
        assert_eq!(s.alphas[s.best], a["out_best_alpha"].to_f64()[0], "{case}: alpha (losses {:?})", s.losses);
        let want = a["out_best_scale"].to_f64();
        let worst = s.best_scale.iter().zip(&want).map(|(g, w)| ((g - w) / w).abs()).fold(0.0, f64::max);
        // float64 powers: numpy's SIMD pow against libm's, a few ulp.
        assert!(worst < 1e-14, "{case}: best scale off by {worst:e} relative");
    }
}
