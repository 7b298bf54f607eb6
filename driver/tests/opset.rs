//! The opset upgrade: for each converted operator, a model at the old opset is quantized (its MatMul
//! weight triggers the upgrade to 21); ONNX Runtime loads the output, and the converted operator's
//! output equals the original model's bit for bit.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::graph::build::{attr_f, attr_i, attr_ints, init, init_i64, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{
    attribute_proto::AttributeType, AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto,
};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{open, Input, InputData, SessionOptions};
use std::path::Path;

fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(bytes::Bytes::from(v.as_bytes().to_vec())),
        r#type: Some(AttributeType::String as i32),
        ..Default::default()
    }
}

/// A graph with `ops` computing output `r` from input `x` (shape `xs`), plus a MatMul on `m` to quantize.
fn with_matmul(
    ops: Vec<NodeProto>,
    mut inits: Vec<nibble_driver::graph::onnx::TensorProto>,
    xs: &[usize],
    rs_rank: usize,
    opset: i64,
) -> ModelProto {
    let mut rng = Rng::new(3);
    inits.push(init("W", &[32, 16], &rng.normals(32 * 16, 0.2), FloatFormat::F32));
    let mut nodes = ops;
    nodes.push(node("MatMul", "/mm/MatMul", &["m", "W"], &["y"], vec![]));
    let g = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![io("x", 1, &xs.iter().map(|&d| Some(d)).collect::<Vec<_>>()), io("m", 1, &[Some(2), Some(32)])],
        output: vec![io("r", 1, &vec![None; rs_rank]), io("y", 1, &[Some(2), Some(16)])],
        ..Default::default()
    };
    model(g, opset)
}

fn inputs(xs: &[usize], positive: bool) -> Vec<Input> {
    let mut rng = Rng::new(5);
    let n = xs.iter().product();
    let x: Vec<f32> = rng.normals(n, 1.0).into_iter().map(|v| if positive { v.abs() + 0.5 } else { v }).collect();
    vec![
        Input { name: "x".into(), shape: xs.to_vec(), data: InputData::F32(x) },
        Input { name: "m".into(), shape: vec![2, 32], data: InputData::F32(rng.normals(64, 1.0)) },
    ]
}

fn outputs(path: &Path, inputs: &[Input]) -> Vec<nibble_driver::runtime::NamedTensor> {
    let mut s = open(path, SessionOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    nibble_driver::runtime::run(&mut s, inputs).unwrap()
}

/// Quantizes, checks the opset and that `r` is unchanged bit for bit; returns the output model.
fn upgraded_equal(m: ModelProto, xs: &[usize], positive: bool) -> Model {
    let d = tmp();
    let from = nibble_driver::graph::opset::default_opset(&m);
    let src = write(m, &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    nibble_ok(&["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "16"]);
    let q = Model::load(&out).unwrap();
    assert_eq!(nibble_driver::graph::opset::default_opset(&q.proto), 21, "from opset {from}");
    let ins = inputs(xs, positive);
    let (a, b) = (outputs(&src, &ins), outputs(&out, &ins));
    let (ra, rb) = (a.iter().find(|t| t.name == "r").unwrap(), b.iter().find(|t| t.name == "r").unwrap());
    assert_eq!(ra.shape, rb.shape);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&ra.data), bits(&rb.data), "converted output differs (from opset {from})");
    let (ya, yb) = (a.iter().find(|t| t.name == "y").unwrap(), b.iter().find(|t| t.name == "y").unwrap());
    let e = rel_err(&yb.data, &ya.data);
    assert!(e > 0.0 && e < 0.2, "{e}");
    q
}

#[test]
fn reduce_ops_axes_attribute_becomes_input() {
    let ops = [
        "ReduceMax",
        "ReduceMin",
        "ReduceMean",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    ];
    for opset in [13, 17] {
        for op in ops {
            for (axes, keep) in [(vec![1i64], 0i64), (vec![-1, 0], 1)] {
                let n = node(op, "/r", &["x"], &["r"], vec![attr_ints("axes", &axes), attr_i("keepdims", keep)]);
                let rank = if keep == 1 { 3 } else { 3 - axes.len() };
                let q = upgraded_equal(with_matmul(vec![n], vec![], &[2, 3, 4], rank, opset), &[2, 3, 4], true);
                let g = q.proto.graph.unwrap();
                let r = g.node.iter().find(|n| n.name.as_deref() == Some("/r")).unwrap();
                assert!(r.attribute.iter().all(|a| a.name.as_deref() != Some("axes")), "{op}");
                assert_eq!(r.input.len(), 2, "{op}");
            }
            // No axes: reduce over everything, nothing to move.
            let n = node(op, "/r", &["x"], &["r"], vec![attr_i("keepdims", 0)]);
            upgraded_equal(with_matmul(vec![n], vec![], &[2, 3, 4], 0, opset), &[2, 3, 4], true);
        }
    }
}

#[test]
fn group_normalization_scale_bias_become_per_channel() {
    let n = node(
        "GroupNormalization",
        "/gn",
        &["x", "gscale", "gbias"],
        &["r"],
        vec![attr_i("num_groups", 3), attr_f("epsilon", 1e-5)],
    );
    let inits = vec![
        init("gscale", &[3], &[0.5, 1.5, -2.0], FloatFormat::F32),
        init("gbias", &[3], &[0.1, -0.2, 0.3], FloatFormat::F32),
    ];
    upgraded_equal(with_matmul(vec![n], inits, &[2, 6, 3, 3], 4, 18), &[2, 6, 3, 3], false);
}

#[test]
fn roi_align_keeps_its_old_default_mode() {
    let n = node(
        "RoiAlign",
        "/roi",
        &["x", "rois", "idx"],
        &["r"],
        vec![attr_i("output_height", 2), attr_i("output_width", 3), attr_i("sampling_ratio", 2)],
    );
    let inits = vec![
        init("rois", &[2, 4], &[0.5, 0.5, 5.5, 6.0, 1.0, 2.0, 4.0, 7.5], FloatFormat::F32),
        init_i64("idx", &[2], &[0, 0]),
    ];
    let q = upgraded_equal(with_matmul(vec![n], inits, &[1, 2, 8, 8], 4, 13), &[1, 2, 8, 8], false);
    let g = q.proto.graph.unwrap();
    let roi = g.node.iter().find(|n| n.name.as_deref() == Some("/roi")).unwrap();
    assert!(roi.attribute.iter().any(|a| a.s.as_deref() == Some(b"output_half_pixel".as_slice())));
}

#[test]
fn grid_sample_modes_are_renamed() {
    let mut rng = Rng::new(9);
    let grid: Vec<f32> = (0..18).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    for mode in ["bilinear", "bicubic", "nearest"] {
        let n =
            node("GridSample", "/gs", &["x", "grid"], &["r"], vec![attr_s("mode", mode), attr_i("align_corners", 0)]);
        let inits = vec![init("grid", &[1, 3, 3, 2], &grid, FloatFormat::F32)];
        upgraded_equal(with_matmul(vec![n], inits, &[1, 1, 4, 4], 4, 16), &[1, 1, 4, 4], false);
    }
}

#[test]
fn dft_axis_attribute_becomes_input() {
    for axis in [None, Some(1i64)] {
        let attrs = axis.map(|a| vec![attr_i("axis", a)]).unwrap_or_default();
        let n = node("DFT", "/dft", &["x"], &["r"], attrs);
        upgraded_equal(with_matmul(vec![n], vec![], &[2, 8, 1], 3, 17), &[2, 8, 1], false);
    }
}

#[test]
fn batch_normalization_unused_training_outputs_are_dropped() {
    let inits = vec![
        init("s", &[3], &[1.0, 2.0, 0.5], FloatFormat::F32),
        init("b", &[3], &[0.0, 0.1, -0.1], FloatFormat::F32),
        init("mean", &[3], &[0.2, -0.3, 0.0], FloatFormat::F32),
        init("var", &[3], &[1.0, 0.5, 2.0], FloatFormat::F32),
    ];
    let n = node("BatchNormalization", "/bn", &["x", "s", "b", "mean", "var"], &["r"], vec![]);
    upgraded_equal(with_matmul(vec![n], inits.clone(), &[2, 3, 4], 3, 13), &[2, 3, 4], false);
    // Declared but unused training outputs: dropped.
    let mut m = with_matmul(vec![], inits.clone(), &[2, 3, 4], 3, 13);
    let g = m.graph.as_mut().unwrap();
    g.node.insert(0, node("BatchNormalization", "/bn", &["x", "s", "b", "mean", "var"], &["r", "rm", "rv"], vec![]));
    let mut copy = m.clone();
    assert!(nibble_driver::graph::opset::upgrade(&mut copy).unwrap().is_some());
    assert_eq!(copy.graph.unwrap().node[0].output, vec!["r"]);
    // A used training output cannot be converted: a precise error.
    m.graph.as_mut().unwrap().node.push(node("Identity", "/id", &["rm"], &["rm_out"], vec![]));
    let e = nibble_driver::graph::opset::upgrade(&mut m).unwrap_err().to_string();
    assert!(e.contains("/bn") && e.contains("BatchNormalization") && e.contains("'rm'"), "{e}");
}

#[test]
fn subgraphs_and_functions_are_converted() {
    // If with ReduceMax(axes) in both branches.
    let branch = |name: &str, op: &str| GraphProto {
        name: Some(name.into()),
        node: vec![node(
            op,
            &format!("/{name}/reduce"),
            &["x"],
            &[&format!("{name}_out")],
            vec![attr_ints("axes", &[2]), attr_i("keepdims", 0)],
        )],
        output: vec![io(&format!("{name}_out"), 1, &[None, None])],
        ..Default::default()
    };
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: Some(name.into()),
        g: Some(g),
        r#type: Some(AttributeType::Graph as i32),
        ..Default::default()
    };
    let mut cond = init("cond", &[], &[1.0], FloatFormat::F32);
    cond.data_type = Some(9); // BOOL
    cond.raw_data = Some(bytes::Bytes::from_static(&[1]));
    let iff = node(
        "If",
        "/if",
        &["cond"],
        &["r"],
        vec![
            graph_attr("then_branch", branch("then", "ReduceMax")),
            graph_attr("else_branch", branch("else", "ReduceMin")),
        ],
    );
    let q = upgraded_equal(with_matmul(vec![iff], vec![cond], &[2, 3, 4], 2, 15), &[2, 3, 4], false);
    let g = q.proto.graph.unwrap();
    let then = g.node.iter().find(|n| n.op_type.as_deref() == Some("If")).unwrap().attribute[0].g.clone().unwrap();
    assert!(then.node.iter().any(|n| n.op_type.as_deref() == Some("Constant")));

    // A model-local function using ReduceMean with axes.
    let f = FunctionProto {
        name: Some("MeanLast".into()),
        domain: Some("local".into()),
        input: vec!["fx".into()],
        output: vec!["fy".into()],
        node: vec![node(
            "ReduceMean",
            "/f/mean",
            &["fx"],
            &["fy"],
            vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
        )],
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        ..Default::default()
    };
    let mut call = node("MeanLast", "/call", &["x"], &["r"], vec![]);
    call.domain = Some("local".into());
    let mut m = with_matmul(vec![call], vec![], &[2, 3, 4], 3, 17);
    m.opset_import.push(OperatorSetIdProto { domain: Some("local".into()), version: Some(1) });
    m.functions.push(f);
    let q = upgraded_equal(m, &[2, 3, 4], false);
    let f = &q.proto.functions[0];
    assert_eq!(f.opset_import[0].version, Some(21));
    assert_eq!(f.node.iter().find(|n| n.op_type.as_deref() == Some("ReduceMean")).unwrap().input.len(), 2);
    assert!(
        q.proto.opset_import.iter().any(|o| o.domain.as_deref() == Some("local") && o.version == Some(1)),
        "other domains kept"
    );
}

#[test]
fn too_old_opset_is_a_precise_error() {
    let d = tmp();
    let n = node("Relu", "/relu", &["x"], &["r"], vec![]);
    let src = write(with_matmul(vec![n], vec![], &[2, 3], 2, 12), &d.path().join("m.onnx"), ExternalData::Never);
    let out = nibble(&["quantize", src.to_str().unwrap(), "-o", d.path().join("q.onnx").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("opset 12") && e.contains(">= 13"), "{e}");
    assert!(!d.path().join("q.onnx").exists());
}

#[test]
fn models_at_21_are_not_touched() {
    let n = node("ReduceMean", "/r", &["x", "ax"], &["r"], vec![attr_i("keepdims", 0)]);
    let m = with_matmul(vec![n], vec![init_i64("ax", &[1], &[1])], &[2, 3, 4], 2, 21);
    let mut copy = m.clone();
    assert!(nibble_driver::graph::opset::upgrade(&mut copy).unwrap().is_none());
    assert_eq!(copy, m);
}

/// A transformer-like block as exported at opset 17: RMSNorm from ReduceMean, and a ReduceL2
/// normalization head, through every method.
#[test]
fn exported_style_transformer_at_opset_17() {
    let h = 32;
    let mut rng = Rng::new(21);
    let mut nodes = vec![
        node("Mul", "/norm/Pow", &["x", "x"], &["sq"], vec![]),
        node("ReduceMean", "/norm/ReduceMean", &["sq"], &["ms"], vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)]),
        node("Add", "/norm/Add", &["ms", "eps"], &["mse"], vec![]),
        node("Sqrt", "/norm/Sqrt", &["mse"], &["rms"], vec![]),
        node("Div", "/norm/Div", &["x", "rms"], &["xn"], vec![]),
        node("Mul", "/norm/Mul", &["xn", "norm.weight"], &["h0"], vec![]),
    ];
    let mut inits =
        vec![init("eps", &[], &[1e-6], FloatFormat::F32), init("norm.weight", &[h], &vec![1.0; h], FloatFormat::F32)];
    let mut x = "h0".to_string();
    for (i, name) in ["/model/q_proj/MatMul", "/model/up_proj/MatMul", "/model/down_proj/MatMul"].iter().enumerate() {
        let w = format!("w{i}");
        inits.push(init(&w, &[h, h], &rng.normals(h * h, 0.2), FloatFormat::F32));
        let out = format!("h{}", i + 1);
        nodes.push(node("MatMul", name, &[&x, &w], &[&out], vec![]));
        x = out;
    }
    nodes.push(node(
        "ReduceL2",
        "/head/ReduceL2",
        &[&x],
        &["l2"],
        vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
    ));
    nodes.push(node("Div", "/head/Div", &[&x, "l2"], &["r"], vec![]));
    let g = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![io("x", 1, &[None, None, Some(h)])],
        output: vec![io("r", 1, &[None, None, Some(h)])],
        ..Default::default()
    };
    let d = tmp();
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let input = [random_input("x", &[2, 5, h], 4)];
    for method in ["rtn_dq", "rtn"] {
        let out = d.path().join(format!("{method}.onnx"));
        nibble_ok(&[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            method,
            "--block-size",
            "16",
            "--force",
        ]);
        let e = rel_err(&run(&out, &input)[0].data, &run(&src, &input)[0].data);
        assert!(e > 0.0 && e < 0.2, "{method}: {e}");
    }
}
