//! End to end: models built by the tests are quantized with the `nibble` binary, loaded and run in
//! ONNX Runtime, and compared with (a) the same model carrying the scalar reference's dequantized
//! weights (tight tolerance: the graph computes exactly that) and (b) the original (INT4-sized error).

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::build::{attr_i, init, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{tensor_proto::DataType, GraphProto, TensorProto};
use nibble_driver::rng::Rng;
use std::path::Path;

fn small_transformer(format: FloatFormat) -> TransformerConfig {
    TransformerConfig { hidden: 64, intermediate: 96, layers: 2, vocab: 80, format, opset: 17, seed: 7 }
}

fn weights_of(path: &Path, skip_lm_head: bool) -> Vec<(String, usize)> {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.unwrap();
    g.initializer
        .iter()
        .filter(|t| t.dims.len() == 2)
        .filter(|t| !(skip_lm_head && t.name.as_deref() == Some("lm_head.weight")))
        .map(|t| (t.name.clone().unwrap(), 0))
        .collect()
}

fn initializer<'a>(g: &'a GraphProto, name: &str) -> &'a TensorProto {
    g.initializer.iter().find(|t| t.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no initializer {name}"))
}

/// Quantizes `src`, runs original, quantized and reference in ORT, checks both tolerances.
#[allow(clippy::too_many_arguments)]
fn check_model(
    src: &Path,
    input: &[nibble_driver::runtime::NamedTensor],
    args: &[&str],
    weights: &[(String, usize)],
    block: i64,
    zp: bool,
    tight: f32,
    loose: f32,
) {
    let dir = src.parent().unwrap();
    let out = dir.join("q.onnx");
    let mut full = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"];
    full.extend_from_slice(args);
    nibble_ok(&full);
    let w: Vec<(&str, usize)> = weights.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let reference = dequantized_reference(src, &w, block, zp, &dir.join("ref.onnx"));
    let original = run(src, input);
    let quantized = run(&out, input);
    let expected = run(&reference, input);
    for ((q, e), o) in quantized.iter().zip(&expected).zip(&original) {
        let tight_err = rel_err(&q.data, &e.data);
        let loose_err = rel_err(&q.data, &o.data);
        assert!(
            tight_err <= tight,
            "{}: output {} differs from the dequantized reference by {tight_err}",
            src.display(),
            q.name
        );
        assert!(loose_err <= loose, "{}: output {} differs from the original by {loose_err}", src.display(), q.name);
        assert!(loose_err > 0.0, "{}: quantization changed nothing", src.display());
    }
}

#[test]
fn transformer_f32_runs_and_matches_structure() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("input", &[2, 5, 64], 1)];
    check_model(&src, &input, &["--block-size", "32"], &weights_of(&src, true), 32, false, 2e-5, 0.2);
    // The structure ModelOpt writes.
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    assert_eq!(q.proto.ir_version, Some(10));
    assert_eq!(nibble_driver::graph::opset::default_opset(&q.proto), 21);
    let g = q.proto.graph.as_ref().unwrap();
    let w = "model.layers.0.attn.q_proj.weight";
    let codes = initializer(g, &format!("{w}_i4"));
    assert_eq!((codes.data_type, codes.dims.clone()), (Some(DataType::Int4 as i32), vec![64, 64]));
    let scale = initializer(g, &format!("{w}_scale"));
    assert_eq!((scale.data_type, scale.dims.clone()), (Some(DataType::Float as i32), vec![2, 64]));
    assert!(g.initializer.iter().all(|t| t.name.as_deref() != Some(w)), "the float weight must be removed");
    let dq = g.node.iter().find(|n| n.name.as_deref() == Some(&format!("{w}_DequantizeLinear"))).unwrap();
    assert_eq!(dq.op_type.as_deref(), Some("DequantizeLinear"));
    assert_eq!(dq.input, vec![format!("{w}_i4"), format!("{w}_scale")]);
    assert_eq!(dq.output, vec![format!("{w}_DequantizeLinear_Output")]);
    let attrs: Vec<(String, i64)> = dq.attribute.iter().map(|a| (a.name.clone().unwrap(), a.i.unwrap())).collect();
    assert_eq!(attrs, vec![("axis".to_string(), 0), ("block_size".to_string(), 32)]);
    assert!(g.value_info.iter().any(|v| v.name.as_deref() == Some(&format!("{w}_DequantizeLinear_Output"))));
    // /lm_head is excluded by default.
    assert!(g.initializer.iter().any(|t| t.name.as_deref() == Some("lm_head.weight")));
}

#[test]
fn transformer_f16_weights_f32_io() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F16)), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("input", &[1, 7, 64], 2)];
    check_model(&src, &input, &["--block-size", "32"], &weights_of(&src, true), 32, false, 2e-3, 0.2);
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    let scale = initializer(q.proto.graph.as_ref().unwrap(), "model.layers.1.mlp.down_proj.weight_scale");
    assert_eq!(scale.data_type, Some(DataType::Float16 as i32));
}

#[test]
fn transformer_bf16_weights() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::BF16)), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
    let q = Model::load(&out).unwrap();
    let g = q.proto.graph.as_ref().unwrap();
    assert_eq!(initializer(g, "model.layers.0.attn.q_proj.weight_scale").data_type, Some(DataType::Bfloat16 as i32));
    // The codes equal the scalar reference's, for bf16 arithmetic.
    let m = Model::load(&src).unwrap();
    let t = initializer(m.proto.graph.as_ref().unwrap(), "model.layers.0.attn.q_proj.weight");
    let w = floats(&m, t);
    let s = nibble::reference::find_scales(FloatFormat::BF16, nibble::Bits::Four, &w, [64, 64], 32, 0, 1.0, false);
    let codes = nibble::reference::rtn(FloatFormat::BF16, nibble::Bits::Four, &w, [64, 64], &s, 32, 0);
    let packed = initializer(g, "model.layers.0.attn.q_proj.weight_i4");
    assert_eq!(q.tensor_bytes(packed).unwrap().to_vec(), nibble::reference::pack(&codes));
}

/// x[batch, K] -> MatMul(K x N) -> Relu -> MatMul(N x M), weights as initializers.
fn matmul_chain(k: usize, n: usize, m: usize, seed: u64) -> nibble_driver::graph::onnx::ModelProto {
    let mut rng = Rng::new(seed);
    let g = GraphProto {
        node: vec![
            node("MatMul", "/fc1/MatMul", &["x", "fc1.weight"], &["h"], vec![]),
            node("Relu", "/relu", &["h"], &["a"], vec![]),
            node("MatMul", "/fc2/MatMul", &["a", "fc2.weight"], &["y"], vec![]),
        ],
        initializer: vec![
            init("fc1.weight", &[k, n], &rng.normals(k * n, 0.1), FloatFormat::F32),
            init("fc2.weight", &[n, m], &rng.normals(n * m, 0.1), FloatFormat::F32),
        ],
        input: vec![io("x", 1, &[None, Some(k)])],
        output: vec![io("y", 1, &[None, Some(m)])],
        ..Default::default()
    };
    model(g, 17)
}

#[test]
fn k_not_a_multiple_of_the_block() {
    let d = tmp();
    let src = write(matmul_chain(200, 72, 40, 3), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("x", &[3, 200], 4)];
    let w = vec![("fc1.weight".to_string(), 0), ("fc2.weight".to_string(), 0)];
    check_model(&src, &input, &["--block-size", "128"], &w, 128, false, 2e-5, 0.2);
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    assert_eq!(initializer(q.proto.graph.as_ref().unwrap(), "fc1.weight_scale").dims, vec![2, 72]);
}

#[test]
fn per_channel() {
    let d = tmp();
    let src = write(matmul_chain(96, 48, 24, 5), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("x", &[2, 96], 6)];
    let w = vec![("fc1.weight".to_string(), 0), ("fc2.weight".to_string(), 0)];
    check_model(&src, &input, &["--block-size", "-1"], &w, -1, false, 2e-5, 0.3);
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    let g = q.proto.graph.as_ref().unwrap();
    assert_eq!(initializer(g, "fc1.weight_scale").dims, vec![48]);
    let dq = g.node.iter().find(|n| n.name.as_deref() == Some("fc1.weight_DequantizeLinear")).unwrap();
    let attrs: Vec<&str> = dq.attribute.iter().map(|a| a.name.as_deref().unwrap()).collect();
    assert_eq!(attrs, vec!["axis"]);
    assert_eq!(dq.attribute[0].i, Some(1));
}

#[test]
fn zero_point() {
    let d = tmp();
    let src = write(matmul_chain(128, 64, 32, 8), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("x", &[2, 128], 9)];
    let w = vec![("fc1.weight".to_string(), 0), ("fc2.weight".to_string(), 0)];
    check_model(&src, &input, &["--block-size", "32", "--zero-point"], &w, 32, true, 2e-5, 0.2);
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    let g = q.proto.graph.as_ref().unwrap();
    assert_eq!(initializer(g, "fc1.weight_i4").data_type, Some(DataType::Uint4 as i32));
    let zp = initializer(g, "fc1.weight_zp");
    assert_eq!((zp.data_type, zp.dims.clone()), (Some(DataType::Uint4 as i32), vec![4, 64]));
}

/// y = Gemm(x, W, b) with W stored [K, N] (transB=0) or [N, K] (transB=1).
fn gemm(trans_b: bool, k: usize, n: usize) -> nibble_driver::graph::onnx::ModelProto {
    let mut rng = Rng::new(11);
    let wdims = if trans_b { [n, k] } else { [k, n] };
    let g = GraphProto {
        node: vec![node("Gemm", "/gemm/Gemm", &["x", "W", "b"], &["y"], vec![attr_i("transB", trans_b as i64)])],
        initializer: vec![
            init("W", &wdims, &rng.normals(k * n, 0.1), FloatFormat::F32),
            init("b", &[n], &rng.normals(n, 0.1), FloatFormat::F32),
        ],
        input: vec![io("x", 1, &[None, Some(k)])],
        output: vec![io("y", 1, &[None, Some(n)])],
        ..Default::default()
    };
    model(g, 17)
}

#[test]
fn gemm_trans_b_0_and_1_block_along_k() {
    for trans_b in [false, true] {
        let d = tmp();
        let src = write(gemm(trans_b, 96, 40), &d.path().join("m.onnx"), ExternalData::Never);
        let input = [random_input("x", &[3, 96], 12)];
        let axis = trans_b as usize;
        check_model(&src, &input, &["--block-size", "32"], &[("W".to_string(), axis)], 32, false, 2e-5, 0.2);
        let q = Model::load(&d.path().join("q.onnx")).unwrap();
        let g = q.proto.graph.as_ref().unwrap();
        let want = if trans_b { vec![40, 3] } else { vec![3, 40] };
        assert_eq!(initializer(g, "W_scale").dims, want, "transB={trans_b}");
        let dq = g.node.iter().find(|n| n.name.as_deref() == Some("W_DequantizeLinear")).unwrap();
        assert_eq!(dq.attribute[0].i, Some(axis as i64));
    }
}

#[test]
fn constant_node_weights_are_quantized() {
    let d = tmp();
    let mut rng = Rng::new(13);
    let weight = init("Wc", &[64, 32], &rng.normals(64 * 32, 0.1), FloatFormat::F32);
    let mut constant = node("Constant", "/const", &[], &["Wc"], vec![]);
    constant.attribute.push(nibble_driver::graph::onnx::AttributeProto {
        name: Some("value".into()),
        t: Some(weight.clone()),
        r#type: Some(4),
        ..Default::default()
    });
    let g = GraphProto {
        node: vec![constant, node("MatMul", "/mm/MatMul", &["x", "Wc"], &["y"], vec![])],
        input: vec![io("x", 1, &[None, Some(64)])],
        output: vec![io("y", 1, &[None, Some(32)])],
        ..Default::default()
    };
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
    let q = Model::load(&out).unwrap();
    let g = q.proto.graph.as_ref().unwrap();
    assert!(g.node.iter().all(|n| n.op_type.as_deref() != Some("Constant")));
    assert!(g.initializer.iter().any(|t| t.name.as_deref() == Some("Wc_i4")));
    let input = [random_input("x", &[2, 64], 14)];
    let err = rel_err(&run(&out, &input)[0].data, &run(&src, &input)[0].data);
    assert!(err > 0.0 && err < 0.2, "{err}");
}

#[test]
fn rtn_qdq_mode_is_valid_and_runs() {
    let d = tmp();
    let src = write(matmul_chain(64, 32, 16, 15), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("x", &[2, 64], 16)];
    let w = vec![("fc1.weight".to_string(), 0), ("fc2.weight".to_string(), 0)];
    check_model(&src, &input, &["--method", "rtn", "--block-size", "32"], &w, 32, false, 2e-5, 0.2);
    let q = Model::load(&d.path().join("q.onnx")).unwrap();
    let g = q.proto.graph.as_ref().unwrap();
    let qn = g.node.iter().find(|n| n.name.as_deref() == Some("fc1.weight_QuantizeLinear")).unwrap();
    assert_eq!(qn.input, vec!["fc1.weight", "fc1.weight_scale", "fc1.weight_zp"]);
    assert!(qn.attribute.iter().any(|a| a.name.as_deref() == Some("block_size") && a.i == Some(32)));
    assert_eq!(initializer(g, "fc1.weight_zp").data_type, Some(DataType::Int4 as i32));
}

#[test]
fn external_data_in_and_out() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Always);
    assert!(d.path().join("m.onnx_data").exists());
    let input = [random_input("input", &[1, 4, 64], 17)];
    let out = d.path().join("q.onnx");
    let before = snapshot(d.path());
    nibble_ok(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--external-data",
        "always",
        "--block-size",
        "32",
    ]);
    assert!(d.path().join("q.onnx_data").exists());
    // The input files are untouched.
    let after = snapshot(d.path());
    for (name, bytes) in &before {
        assert_eq!(after.iter().find(|(n, _)| n == name).map(|(_, b)| b), Some(bytes), "{name} changed");
    }
    let err = rel_err(&run(&out, &input)[0].data, &run(&src, &input)[0].data);
    assert!(err > 0.0 && err < 0.2, "{err}");
    // Inline output from an external-data input.
    let out2 = d.path().join("q2.onnx");
    nibble_ok(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--external-data",
        "never",
        "--block-size",
        "32",
    ]);
    assert!(!d.path().join("q2.onnx_data").exists());
    assert_eq!(run(&out2, &input)[0].data, run(&out, &input)[0].data);
}

#[test]
fn exclude_patterns_are_anchored_regexes() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    nibble_ok(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--exclude",
        "/model/layers\\.1/",
        "--exclude",
        "mlp",
    ]);
    let g = Model::load(&out).unwrap().proto.graph.unwrap();
    let has = |n: &str| g.initializer.iter().any(|t| t.name.as_deref() == Some(n));
    assert!(has("model.layers.1.attn.q_proj.weight"), "layer 1 excluded");
    assert!(has("model.layers.0.attn.q_proj.weight_i4"));
    assert!(has("model.layers.0.mlp.up_proj.weight_i4"), "'mlp' is anchored at the start: matches nothing");
    assert!(has("lm_head.weight_i4"), "an explicit --exclude replaces the default /lm_head");
}

#[test]
fn inspect_lists_weights_and_opset() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Never);
    let text = nibble_ok(&["inspect", src.to_str().unwrap()]);
    assert!(text.contains("opset 17 (quantizing raises it to 21, converting 0 node(s))"), "{text}");
    assert!(text.contains("excluded by '/lm_head'"), "{text}");
    assert!(text.contains("12 of 13 weights would be quantized"), "{text}");
}

/// `--format matmulnbits`: ONNX Runtime's MatMulNBits computes what the DQ form computes, for f32
/// and f16 weights, symmetric and zero point, RTN and AWQ, MatMul and Gemm (transB 0/1, with bias).
#[test]
fn matmulnbits_format_equals_dq_form() {
    let d = tmp();
    let cases: Vec<(nibble_driver::graph::onnx::ModelProto, Vec<nibble_driver::runtime::NamedTensor>)> = vec![
        (transformer(&small_transformer(FloatFormat::F32)), vec![random_input("input", &[2, 5, 64], 1)]),
        (transformer(&small_transformer(FloatFormat::F16)), vec![random_input("input", &[1, 7, 64], 2)]),
        (gemm(false, 96, 40), vec![random_input("x", &[3, 96], 3)]),
        (gemm(true, 96, 40), vec![random_input("x", &[3, 96], 4)]),
    ];
    for (i, (m, input)) in cases.into_iter().enumerate() {
        let src = write(m, &d.path().join(format!("m{i}.onnx")), ExternalData::Never);
        for extra in [
            &["--method", "rtn_dq"][..],
            &["--zero-point"][..],
            &["--method", "awq_lite", "--calibration-samples", "2"][..],
        ] {
            if i >= 2 && extra.contains(&"awq_lite") {
                continue;
            }
            let dq = d.path().join("dq.onnx");
            let nb = d.path().join("nb.onnx");
            let mut a =
                vec!["quantize", src.to_str().unwrap(), "-o", dq.to_str().unwrap(), "--block-size", "32", "--force"];
            a.extend_from_slice(extra);
            nibble_ok(&a);
            let mut b = vec![
                "quantize",
                src.to_str().unwrap(),
                "-o",
                nb.to_str().unwrap(),
                "--block-size",
                "32",
                "--force",
                "--format",
                "matmulnbits",
                "--accuracy-level",
                "0",
            ];
            b.extend_from_slice(extra);
            nibble_ok(&b);
            let g = Model::load(&nb).unwrap().proto.graph.unwrap();
            assert!(g.node.iter().any(|n| n.op_type.as_deref() == Some("MatMulNBits")), "case {i} {extra:?}");
            assert!(g.node.iter().all(|n| n.op_type.as_deref() != Some("DequantizeLinear")));
            let (x, y) = (run(&dq, &input), run(&nb, &input));
            let e = rel_err(&y[0].data, &x[0].data);
            assert!(e < 1e-3, "case {i} {extra:?}: MatMulNBits differs from DQ by {e}");
            let orig = rel_err(&y[0].data, &run(&src, &input)[0].data);
            assert!(orig > 0.0 && orig < 0.3, "case {i} {extra:?}: {orig}");
        }
    }
    // Block sizes MatMulNBits cannot run are refused.
    let src = d.path().join("m0.onnx");
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        d.path().join("x.onnx").to_str().unwrap(),
        "--format",
        "matmulnbits",
        "--accuracy-level",
        "0",
        "--block-size",
        "48",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("power of two >= 16"));
}

/// `--gather-axis`: the embedding table becomes INT4 + DequantizeLinear (or GatherBlockQuantized
/// with `--format matmulnbits`), and the Gather output is exactly the scalar reference's
/// dequantized rows.
#[test]
fn gather_tables_are_quantized_and_gather_dequantized_rows() {
    let (v, h) = (100usize, 64usize);
    let mut rng = Rng::new(31);
    let table = rng.normals(v * h, 0.5);
    let g = GraphProto {
        node: vec![
            node("Gather", "/embed/Gather", &["table", "ids"], &["emb"], vec![]),
            node("MatMul", "/proj/MatMul", &["emb", "W"], &["y"], vec![]),
        ],
        initializer: vec![
            init("table", &[v, h], &table, FloatFormat::F32),
            init("W", &[h, 32], &rng.normals(h * 32, 0.1), FloatFormat::F32),
        ],
        input: vec![io("ids", DataType::Int64 as i32, &[None, None])],
        output: vec![io("emb", 1, &[None, None, Some(h)]), io("y", 1, &[None, None, Some(32)])],
        ..Default::default()
    };
    let d = tmp();
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let ids: Vec<i64> = vec![0, 5, 99, 42, 7, 7, 63, 1];
    for (axis, form) in [(1usize, "dq"), (0, "dq"), (1, "matmulnbits"), (0, "matmulnbits")] {
        let out = d.path().join(format!("q{axis}{form}.onnx"));
        nibble_ok(&[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--gather-axis",
            &axis.to_string(),
            "--block-size",
            "32",
            "--format",
            form,
            "--accuracy-level",
            "0",
            "--force",
        ]);
        let q = Model::load(&out).unwrap();
        let g = q.proto.graph.as_ref().unwrap();
        let attrs = |n: &nibble_driver::graph::onnx::NodeProto| -> Vec<(String, i64)> {
            n.attribute.iter().map(|a| (a.name.clone().unwrap(), a.i.unwrap())).collect()
        };
        if form == "dq" {
            assert!(g.initializer.iter().any(|t| t.name.as_deref() == Some("table_i4")));
            let dq = g.node.iter().find(|n| n.name.as_deref() == Some("table_DequantizeLinear")).unwrap();
            assert_eq!(attrs(dq), vec![("axis".to_string(), axis as i64), ("block_size".to_string(), 32)]);
        } else {
            // ONNX Runtime's quantizer's form: GatherBlockQuantized over INT4 `table_Q4`.
            let t = g.initializer.iter().find(|t| t.name.as_deref() == Some("table_Q4")).unwrap();
            assert_eq!((t.data_type, t.dims.clone()), (Some(DataType::Int4 as i32), vec![v as i64, h as i64]));
            let n = g.node.iter().find(|n| n.name.as_deref() == Some("/embed/Gather_Q4")).unwrap();
            assert_eq!(n.op_type.as_deref(), Some("GatherBlockQuantized"));
            let want = vec![
                ("gather_axis".to_string(), 0),
                ("quantize_axis".to_string(), axis as i64),
                ("block_size".to_string(), 32),
            ];
            assert_eq!(attrs(n), want);
            assert!(g.node.iter().all(|n| n.op_type.as_deref() != Some("Gather")));
        }
        let s =
            nibble::reference::find_scales(FloatFormat::F32, nibble::Bits::Four, &table, [v, h], 32, axis, 1.0, false);
        let codes = nibble::reference::rtn(FloatFormat::F32, nibble::Bits::Four, &table, [v, h], &s, 32, axis);
        let rows = nibble::reference::dq_tensor(FloatFormat::F32, &codes, [v, h], &s, 32, axis);
        let mut sess = nibble_driver::runtime::open(&out, Default::default()).unwrap();
        let input = nibble_driver::runtime::Input {
            name: "ids".into(),
            shape: vec![2, 4],
            data: nibble_driver::runtime::InputData::I64(ids.clone()),
        };
        let outs = nibble_driver::runtime::run(&mut sess, &[input]).unwrap();
        let emb = outs.iter().find(|t| t.name == "emb").unwrap();
        let want: Vec<u32> =
            ids.iter().flat_map(|&i| rows[i as usize * h..(i as usize + 1) * h].iter().map(|x| x.to_bits())).collect();
        assert_eq!(emb.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "axis {axis} {form}");
    }
    // With a zero point, GatherBlockQuantized (UINT4 + zero points) gives the DQ form's rows.
    let run_ids = |path: &std::path::Path| {
        let mut sess = nibble_driver::runtime::open(path, Default::default()).unwrap();
        let input = nibble_driver::runtime::Input {
            name: "ids".into(),
            shape: vec![2, 4],
            data: nibble_driver::runtime::InputData::I64(ids.clone()),
        };
        let outs = nibble_driver::runtime::run(&mut sess, &[input]).unwrap();
        outs.into_iter().find(|t| t.name == "emb").unwrap().data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let mut got = vec![];
    for form in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("zp{form}.onnx"));
        let o = out.to_str().unwrap();
        nibble_ok(&[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            o,
            "--gather-axis",
            "1",
            "--zero-point",
            "--format",
            form,
            "--accuracy-level",
            "0",
        ]);
        got.push(run_ids(&out));
    }
    assert_eq!(got[0], got[1], "zero point: GatherBlockQuantized rows differ from the DQ form's");
    // Block sizes GatherBlockQuantized cannot run are refused.
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        d.path().join("x.onnx").to_str().unwrap(),
        "--gather-axis",
        "1",
        "--gather-block-size",
        "24",
        "--format",
        "matmulnbits",
        "--accuracy-level",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--gather-block-size 24"));
}

/// `nibble compare` on pairs whose difference is known: a model against itself (no error), and a
/// linear model against a copy whose weight is scaled by 1.01 (relative error exactly 1%, cosine
/// 1, same arg-max everywhere).
#[test]
fn compare_reports_known_differences() {
    let d = tmp();
    let mut rng = Rng::new(77);
    let w = rng.normals(48 * 20, 0.3);
    let linear = |w: &[f32]| {
        model(
            GraphProto {
                node: vec![node("MatMul", "/mm/MatMul", &["x", "W"], &["y"], vec![])],
                initializer: vec![init("W", &[48, 20], w, FloatFormat::F32)],
                input: vec![io("x", 1, &[None, Some(48)])],
                output: vec![io("y", 1, &[None, Some(20)])],
                ..Default::default()
            },
            17,
        )
    };
    let a = write(linear(&w), &d.path().join("a.onnx"), ExternalData::Never);
    let scaled: Vec<f32> = w.iter().map(|v| v * 1.01).collect();
    let b = write(linear(&scaled), &d.path().join("b.onnx"), ExternalData::Never);
    let json = |x: &Path, y: &Path| nibble_ok(&["compare", x.to_str().unwrap(), y.to_str().unwrap(), "--json"]);
    let same = json(&a, &a);
    assert!(same.contains("\"relative_error\":0,") && same.contains("\"top1_agreement\":1"), "{same}");
    let r = nibble_driver::cli::compare::compare(&a, &a, 3).unwrap();
    assert!(r[0].relative_error == 0.0 && r[0].max_abs_error == 0.0 && (r[0].cosine - 1.0).abs() < 1e-12, "{:?}", r[0]);
    let r = nibble_driver::cli::compare::compare(&a, &b, 0).unwrap();
    assert_eq!(r.len(), 1);
    assert!((r[0].relative_error - 0.01).abs() < 1e-5, "{:?}", r[0]);
    assert!((r[0].cosine - 1.0).abs() < 1e-9 && r[0].top1_agreement == Some(1.0), "{:?}", r[0]);
    assert!(json(&a, &b).contains("\"output\":\"y\""));
}

/// Older exports list initializers among the graph inputs; quantized ones leave the inputs too.
#[test]
fn initializers_listed_as_graph_inputs() {
    let d = tmp();
    let mut m = matmul_chain(64, 32, 16, 21);
    let g = m.graph.as_mut().unwrap();
    g.input.push(io("fc1.weight", 1, &[Some(64), Some(32)]));
    g.input.push(io("fc2.weight", 1, &[Some(32), Some(16)]));
    m.ir_version = Some(3);
    let src = write(m, &d.path().join("m.onnx"), ExternalData::Never);
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        nibble_ok(&[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--block-size",
            "32",
            "--format",
            format,
            "--accuracy-level",
            "0",
        ]);
        let inputs: Vec<String> =
            Model::load(&out).unwrap().proto.graph.unwrap().input.iter().filter_map(|v| v.name.clone()).collect();
        assert_eq!(inputs, vec!["x".to_string()], "{format}");
        let x = [random_input("x", &[2, 64], 5)];
        let e = rel_err(&run(&out, &x)[0].data, &run(&src, &x)[0].data);
        assert!(e > 0.0 && e < 0.2, "{format}: {e}");
    }
}

/// `compare --per-layer`: every quantized MatMul reported, worst first, and the first layer's error
/// equals an independent computation (x @ W against x @ dq(q(W)) from the scalar reference).
#[test]
fn compare_per_layer_matches_an_independent_computation() {
    let d = tmp();
    let src = write(matmul_chain(64, 48, 16, 41), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
    let samples = nibble_driver::cli::compare::samples(&src, None, 9).unwrap();
    let layers = nibble_driver::cli::compare::compare_layers(&src, &out, &samples).unwrap();
    assert_eq!(layers.len(), 2);
    assert!(layers[0].relative_error >= layers[1].relative_error);
    let fc1 = layers.iter().find(|l| l.node == "/fc1/MatMul").unwrap();
    // Independent: the weight, its reference dequantization, and the same input.
    let m = Model::load(&src).unwrap();
    let t = initializer(m.proto.graph.as_ref().unwrap(), "fc1.weight");
    let w = floats(&m, t);
    let s = nibble::reference::find_scales(FloatFormat::F32, nibble::Bits::Four, &w, [64, 48], 32, 0, 1.0, false);
    let dq = nibble::reference::dq_tensor(
        FloatFormat::F32,
        &nibble::reference::rtn(FloatFormat::F32, nibble::Bits::Four, &w, [64, 48], &s, 32, 0),
        [64, 48],
        &s,
        32,
        0,
    );
    let nibble_driver::runtime::InputData::F32(x) = &samples[0][0].data else { panic!("float input") };
    let (mut diff2, mut o2) = (0f64, 0f64);
    for row in x.chunks_exact(64) {
        for n in 0..48 {
            let (a, b): (f64, f64) = (0..64).fold((0.0, 0.0), |(a, b), k| {
                (a + row[k] as f64 * w[k * 48 + n] as f64, b + row[k] as f64 * dq[k * 48 + n] as f64)
            });
            diff2 += (a - b).powi(2);
            o2 += a * a;
        }
    }
    let want = (diff2 / o2).sqrt();
    assert!((fc1.relative_error - want).abs() <= 1e-4 * want, "{} vs {want}", fc1.relative_error);
    let text = nibble_ok(&["compare", src.to_str().unwrap(), out.to_str().unwrap(), "--per-layer"]);
    assert!(text.contains("/fc1/MatMul") && text.contains("/fc2/MatMul"), "{text}");
}

/// `--fsync` writes the same bytes (it only waits for the disk before the rename).
#[test]
fn fsync_writes_the_same_model() {
    let d = tmp();
    let src = write(transformer(&small_transformer(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Never);
    let (a, b) = (d.path().join("a.onnx"), d.path().join("b.onnx"));
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", a.to_str().unwrap(), "--external-data", "always"]);
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", b.to_str().unwrap(), "--external-data", "always", "--fsync"]);
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(read(&d.path().join("a.onnx_data")), read(&d.path().join("b.onnx_data")));
    let (ma, mb) = (read(&a), read(&b));
    // The data file's name is inside the model: the models differ only there.
    assert_eq!(ma.len(), mb.len());
    let diff = ma.iter().zip(&mb).filter(|(x, y)| x != y).count();
    assert!(diff > 0 && diff < ma.len() / 100, "{diff} bytes differ");
    assert_eq!(snapshot(d.path()).iter().filter(|(n, _)| n.contains("nibble-tmp")).count(), 0);
}
