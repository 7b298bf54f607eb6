//! Mixed precision (`--int8-layers`, `--mixed-precision`): the chosen layers carry INT8 (UINT8 with
//! a zero point) per-channel weights and a DequantizeLinear without `block_size`; ONNX Runtime runs
//! the result, which computes what the scalar reference's dequantized weights compute; MatMulNBits
//! (bits 8 for those layers) equals the DQ form; INT8 layers lower the error.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{tensor_proto::DataType, GraphProto, NodeProto};

fn config(format: FloatFormat) -> TransformerConfig {
    TransformerConfig { hidden: 64, intermediate: 96, layers: 3, vocab: 80, format, opset: 17, seed: 11 }
}

fn dq_node<'a>(g: &'a GraphProto, weight: &str) -> &'a NodeProto {
    let name = format!("{weight}_DequantizeLinear");
    g.node.iter().find(|n| n.name.as_deref() == Some(&name)).unwrap_or_else(|| panic!("no {name}"))
}

fn attr(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i)
}

/// Every MatMul weight of the layers named by `--int8-layers layers.1` (and only those) is INT8 per
/// channel; the model runs and equals the reference with those weights at INT8, f32 and f16,
/// symmetric and zero point.
#[test]
fn int8_layers_are_int8_per_channel_and_exact() {
    let d = tmp();
    for (format, zp) in [(FloatFormat::F32, false), (FloatFormat::F32, true), (FloatFormat::F16, false)] {
        let src = write(transformer(&config(format)), &d.path().join("m.onnx"), ExternalData::Never);
        let out = d.path().join("q.onnx");
        let mut args = vec![
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
            "--block-size",
            "32",
            "--int8-layers",
            "layers.1",
        ];
        if zp {
            args.push("--zero-point");
        }
        let text = nibble_ok(&args);
        assert!(text.contains("(6 at INT8)"), "{text}");
        let g = Model::load(&out).unwrap().proto.graph.unwrap();
        let original = Model::load(&src).unwrap().proto.graph.unwrap();
        let weights: Vec<String> = original
            .initializer
            .iter()
            .filter(|t| t.dims.len() == 2 && t.name.as_deref() != Some("lm_head.weight"))
            .map(|t| t.name.clone().unwrap())
            .collect();
        let mut int8 = vec![];
        for w in &weights {
            let codes = g.initializer.iter().find(|t| t.name.as_deref() == Some(&format!("{w}_i4"))).unwrap();
            let scale = g.initializer.iter().find(|t| t.name.as_deref() == Some(&format!("{w}_scale"))).unwrap();
            let dq = dq_node(&g, w);
            if w.starts_with("model.layers.1.") {
                int8.push(w.as_str());
                let want = if zp { DataType::Uint8 } else { DataType::Int8 } as i32;
                assert_eq!(codes.data_type, Some(want), "{w}");
                assert_eq!(scale.dims, vec![codes.dims[1]], "{w}: one scale per output channel");
                assert_eq!((attr(dq, "axis"), attr(dq, "block_size")), (Some(1), None), "{w}");
                assert_eq!(codes.raw_data.as_ref().unwrap().len() as i64, codes.dims[0] * codes.dims[1]);
            } else {
                let want = if zp { DataType::Uint4 } else { DataType::Int4 } as i32;
                assert_eq!(codes.data_type, Some(want), "{w}");
                assert_eq!((attr(dq, "axis"), attr(dq, "block_size")), (Some(0), Some(32)), "{w}");
            }
        }
        assert_eq!(int8.len(), 6);
        let all: Vec<(&str, usize)> = weights.iter().map(|w| (w.as_str(), 0)).collect();
        let reference = dequantized_reference_mixed(&src, &all, 32, zp, &int8, &d.path().join("ref.onnx"));
        let input = [random_input("input", &[2, 6, 64], 5)];
        let (q, e) = (run(&out, &input), run(&reference, &input));
        let err = rel_err(&q[0].data, &e[0].data);
        let tight = if format == FloatFormat::F16 { 2e-3 } else { 1e-5 };
        assert!(err <= tight, "{format:?} zp={zp}: differs from the INT8/INT4 reference by {err}");
    }
}

/// `--mixed-precision` alone picks ModelOpt's default layers (3 layers: no first/last eighth, every
/// third from the first, so the v_proj and down_proj of layer 0); INT8 lowers the error; MatMulNBits writes bits=8 nodes for them and equals the DQ form; AWQ runs with INT8 layers.
#[test]
fn mixed_precision_default_choice_formats_and_awq() {
    let d = tmp();
    let src = write(transformer(&config(FloatFormat::F32)), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("input", &[2, 6, 64], 9)];
    let original = run(&src, &input);
    let quantize = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut a =
            vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force", "--block-size", "32"];
        a.extend_from_slice(extra);
        let text = nibble_ok(&a);
        (out, text)
    };
    let (int4, _) = quantize("int4.onnx", &[]);
    let (mixed, text) = quantize("mixed.onnx", &["--mixed-precision"]);
    assert!(text.contains("(2 at INT8)"), "{text}");
    let g = Model::load(&mixed).unwrap().proto.graph.unwrap();
    for w in ["model.layers.0.attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"] {
        let codes = g.initializer.iter().find(|t| t.name.as_deref() == Some(&format!("{w}_i4"))).unwrap();
        assert_eq!(codes.data_type, Some(DataType::Int8 as i32), "{w}");
    }
    // Every layer at INT8 (the token `model` is in every layer's name): a far smaller error.
    let (all8, text) = quantize("all8.onnx", &["--int8-layers", "model"]);
    assert!(text.contains("(18 at INT8)"), "{text}");
    let e4 = rel_err(&run(&int4, &input)[0].data, &original[0].data);
    let e8 = rel_err(&run(&all8, &input)[0].data, &original[0].data);
    assert!(e8 < e4 / 4.0, "INT8 layers should lower the error: {e8} vs {e4}");

    for extra in [&["--mixed-precision"][..], &["--int8-layers", "layers.2", "--zero-point"][..]] {
        let (dq, _) = quantize("dq.onnx", extra);
        let mut nb_args = vec!["--format", "matmulnbits", "--accuracy-level", "0"];
        nb_args.extend_from_slice(extra);
        let (nb, _) = quantize("nb.onnx", &nb_args);
        let g = Model::load(&nb).unwrap().proto.graph.unwrap();
        let eight = g.node.iter().filter(|n| n.op_type.as_deref() == Some("MatMulNBits") && attr(n, "bits") == Some(8));
        assert!(eight.count() >= 2, "{extra:?}: INT8 layers are bits=8 MatMulNBits");
        let e = rel_err(&run(&nb, &input)[0].data, &run(&dq, &input)[0].data);
        assert!(e < 1e-4, "{extra:?}: MatMulNBits differs from DQ by {e}");
    }

    for method in ["awq_lite", "awq_full"] {
        let (q, text) = quantize("awq.onnx", &["--method", method, "--calibration-samples", "2", "--mixed-precision"]);
        assert!(text.contains("(2 at INT8)"), "{text}");
        let e = rel_err(&run(&q, &input)[0].data, &original[0].data);
        assert!(e > 0.0 && e < e4 * 1.5, "{method}: error {e}");
    }

    // A pattern that matches nothing says so (and quantizes everything to INT4).
    let none = d.path().join("none.onnx");
    let o = nibble(&["quantize", src.to_str().unwrap(), "-o", none.to_str().unwrap(), "--int8-layers", "nosuch"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("every layer stays INT4"));
    // Bad patterns and per-subgraph are refused with a clear message.
    let o = nibble(&["quantize", src.to_str().unwrap(), "-o", "/tmp/never.onnx", "--int8-layers", "layers.(1)"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--int8-layers"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        d.path().join("x.onnx").to_str().unwrap(),
        "--method",
        "awq_lite",
        "--per-subgraph",
        "--mixed-precision",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--per-subgraph"));
}
