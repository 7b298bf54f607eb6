//! Graphs shaped like what real exporters write (issue 12): weights with several readers (tied
//! embeddings, excluded heads, non-MatMul readers), weights read inside If/Loop/Scan bodies and the
//! merged-decoder layout, weights behind constant chains (Identity, Transpose, Cast, Reshape), names
//! that collide with generated ones, `nibble compare`'s session options, and error messages.
//!
//! Every quantized model is run in ONNX Runtime with default session options (nothing pinned: DQ +
//! MatMul is fused into MatMulNBits at `session.qdq_matmulnbits_accuracy_level` 4) AND with
//! optimizations disabled, against the float model and against an "expected" model: the float graph
//! in which each quantized reader reads the scalar reference's dequantized weight and every other
//! reader the original. Outputs that only depend on readers that must get the original float weight
//! are compared bit for bit.

mod common;

use common::*;
use nibble::{reference, Bits, FloatFormat};
use nibble_driver::graph::build::{attr_i, attr_ints, init, init_i64, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{Input, InputData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Running models
// ---------------------------------------------------------------------------------------------

/// The two session modes every quality number is measured in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `SessionOptions` untouched: ONNX Runtime's defaults (DQ+MatMul fused, int8 activations).
    Default,
    /// All graph optimizations disabled: the graph as written.
    NoOpt,
}

const MODES: [Mode; 2] = [Mode::Default, Mode::NoOpt];

fn session(path: &Path, mode: Mode) -> Result<ort::session::Session, String> {
    let env = nibble_driver::runtime::environment(None).map_err(|e| e.to_string())?;
    let mut b = ort::session::Session::builder(env).map_err(|e| e.to_string())?;
    if mode == Mode::NoOpt {
        b = b
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
            .map_err(|e| e.to_string())?;
    }
    b.commit_from_file(path).map_err(|e| e.to_string())
}

/// Outputs of `path` on each sample, concatenated per output (panics naming the model if ONNX
/// Runtime refuses it).
fn outputs(path: &Path, mode: Mode, samples: &[Vec<Input>]) -> HashMap<String, Vec<f32>> {
    let mut s =
        session(path, mode).unwrap_or_else(|e| panic!("ONNX Runtime ({mode:?}) refuses {}: {e}", path.display()));
    let mut acc: HashMap<String, Vec<f32>> = HashMap::new();
    for inputs in samples {
        let out = nibble_driver::runtime::run(&mut s, inputs)
            .unwrap_or_else(|e| panic!("ONNX Runtime ({mode:?}) cannot run {}: {e}", path.display()));
        for t in out {
            acc.entry(t.name).or_default().extend(t.data);
        }
    }
    acc
}

/// Relative L2 error `||a - b|| / ||b||`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|q| (*q as f64).powi(2)).sum();
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

fn f32_input(name: &str, shape: &[usize], data: Vec<f32>) -> Input {
    Input { name: name.into(), shape: shape.to_vec(), data: InputData::F32(data) }
}

fn normal_input(name: &str, shape: &[usize], seed: u64) -> Input {
    f32_input(name, shape, Rng::new(seed).normals(shape.iter().product(), 1.0))
}

/// What a comparison found, per output and mode.
#[derive(Debug)]
struct Report {
    /// (mode, output) -> (error of the quantized model vs float, error of the expected model vs float).
    errors: HashMap<(String, String), (f64, f64)>,
}

/// Runs float, quantized and expected models in both modes and checks:
/// - outputs in `exact` are bit-identical to the float model's (their readers get the original);
/// - with optimizations disabled, every other output equals the expected model's within `tight`;
/// - with default options, no output is worse than the expected model's by more than 0.03.
fn check(float: &Path, quant: &Path, expected: &Path, samples: &[Vec<Input>], exact: &[&str]) -> Report {
    let mut errors = HashMap::new();
    for mode in MODES {
        let f = outputs(float, mode, samples);
        let q = outputs(quant, mode, samples);
        let e = outputs(expected, mode, samples);
        for (name, fv) in &f {
            let qv = q.get(name).unwrap_or_else(|| panic!("output '{name}' missing from {}", quant.display()));
            let ev = &e[name];
            let (eq, ee) = (rel(qv, fv), rel(ev, fv));
            errors.insert((format!("{mode:?}"), name.clone()), (eq, ee));
            if exact.contains(&name.as_str()) {
                let same = qv.iter().zip(fv).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{mode:?}: output '{name}' must be the float model's exactly (its reader must get the original weight); relative error {eq:.4}");
                continue;
            }
            match mode {
                Mode::NoOpt => {
                    let d = rel(qv, ev);
                    assert!(d <= 2e-4, "{mode:?}: output '{name}' differs from the expected model by {d:.2e} (error vs float {eq:.4}, expected {ee:.4})");
                }
                Mode::Default => {
                    assert!(eq <= ee + 0.03, "{mode:?}: output '{name}' error {eq:.4} is worse than quantizing each weight for its readers gives ({ee:.4})");
                }
            }
        }
    }
    Report { errors }
}

// ---------------------------------------------------------------------------------------------
// Building models
// ---------------------------------------------------------------------------------------------

fn attr_g(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        g: Some(g),
        r#type: Some(AttributeType::Graph as i32),
        ..Default::default()
    }
}

fn bool_init(name: &str, v: bool) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![],
        data_type: Some(9),
        raw_data: Some(bytes::Bytes::from(vec![v as u8])),
        ..Default::default()
    }
}

fn w(name: &str, dims: &[usize], seed: u64, scale: f32) -> TensorProto {
    init(name, dims, &Rng::new(seed).normals(dims.iter().product(), scale), FloatFormat::F32)
}

fn graph(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<nibble_driver::graph::onnx::ValueInfoProto>,
    outputs: Vec<nibble_driver::graph::onnx::ValueInfoProto>,
) -> GraphProto {
    GraphProto {
        node: nodes,
        initializer: inits,
        input: inputs,
        output: outputs,
        name: Some("g".into()),
        ..Default::default()
    }
}

fn save_model(m: ModelProto, dir: &Path, name: &str) -> PathBuf {
    write(m, &dir.join(name), ExternalData::Never)
}

/// Every graph of the model: the main graph and every If/Loop/Scan body, depth first.
fn all_graphs(m: &ModelProto) -> Vec<&GraphProto> {
    fn walk<'a>(g: &'a GraphProto, acc: &mut Vec<&'a GraphProto>) {
        acc.push(g);
        for n in &g.node {
            for a in &n.attribute {
                for s in a.g.iter().chain(&a.graphs) {
                    walk(s, acc);
                }
            }
        }
    }
    let mut acc = vec![];
    walk(m.graph.as_ref().unwrap(), &mut acc);
    acc
}

fn all_graphs_mut(g: &mut GraphProto, f: &mut dyn FnMut(&mut GraphProto)) {
    f(g);
    for n in g.node.iter_mut() {
        for a in n.attribute.iter_mut() {
            for s in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                all_graphs_mut(s, f);
            }
        }
    }
}

/// The float values of a constant (initializer or Constant node) anywhere in the model.
fn constant_values(m: &Model, name: &str) -> (Vec<f32>, Vec<usize>, FloatFormat) {
    for g in all_graphs(&m.proto) {
        for t in &g.initializer {
            if t.name.as_deref() == Some(name) {
                return (floats(m, t), t.dims.iter().map(|&d| d as usize).collect(), format_of(t));
            }
        }
        for n in &g.node {
            if n.op_type.as_deref() == Some("Constant") && n.output.first().map(String::as_str) == Some(name) {
                let t = n.attribute[0].t.as_ref().unwrap();
                return (floats(m, t), t.dims.iter().map(|&d| d as usize).collect(), format_of(t));
            }
        }
    }
    panic!("no constant '{name}'")
}

/// Scalar reference: `dq(q(w))`, symmetric INT4 (or INT8 per channel), blocks along `axis`.
fn dq_ref(format: FloatFormat, w: &[f32], shape: [usize; 2], block: usize, axis: usize) -> Vec<f32> {
    let s = reference::find_scales(format, Bits::Four, w, shape, block, axis, 1.0, false);
    let q = reference::rtn(format, Bits::Four, w, shape, &s, block, axis);
    reference::dq_tensor(format, &q, shape, &s, block, axis)
}

/// How one reader of the expected model reads its constant input `input`.
struct Want<'a> {
    /// The reading node's name (searched in every graph).
    node: &'a str,
    /// Which input.
    input: usize,
    /// Block size and axis of the stored tensor (None: the original float values).
    quant: Option<(usize, usize)>,
}

/// The expected model: each listed reader reads a fresh initializer (in its own graph) holding the
/// reference's `dq(q(w))` of its input (or the original values).
fn expected(src: &Path, wants: &[Want], out: &Path) -> PathBuf {
    let m = Model::load(src).unwrap();
    let mut proto = m.proto.clone();
    let mut done = 0;
    for (i, want) in wants.iter().enumerate() {
        let mut found = None;
        for g in all_graphs(&m.proto) {
            if let Some(n) = g.node.iter().find(|n| n.name.as_deref() == Some(want.node)) {
                found = Some(n.input[want.input].clone());
            }
        }
        let wname = found.unwrap_or_else(|| panic!("no node '{}'", want.node));
        let (v, dims, format) = constant_values(&m, &wname);
        let v = match want.quant {
            Some((block, axis)) => dq_ref(format, &v, [dims[0], dims[1]], block, axis),
            None => v,
        };
        let name = format!("{wname}__expected_{i}");
        let t = init(&name, &dims, &v, format);
        all_graphs_mut(proto.graph.as_mut().unwrap(), &mut |g: &mut GraphProto| {
            if let Some(n) = g.node.iter_mut().find(|n| n.name.as_deref() == Some(want.node)) {
                n.input[want.input] = name.clone();
                g.initializer.push(t.clone());
                done += 1;
            }
        });
    }
    assert_eq!(done, wants.len());
    write(proto, out, ExternalData::Never)
}

fn q(node: &str) -> Want<'_> {
    Want { node, input: 1, quant: Some((128, 0)) }
}

// ---------------------------------------------------------------------------------------------
// Running nibble
// ---------------------------------------------------------------------------------------------

/// `nibble quantize SRC -o OUT EXTRA...`, which must succeed; returns stdout and stderr.
fn quantize(src: &Path, out: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"];
    args.extend_from_slice(extra);
    let o = nibble(&args);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "nibble {args:?} failed ({:?}): {stdout}{stderr}", o.status.code());
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn inspect(src: &Path, extra: &[&str]) -> String {
    let mut args = vec!["inspect", src.to_str().unwrap()];
    args.extend_from_slice(extra);
    nibble_ok(&args)
}

/// The line of `text` naming `what` (exactly one must).
fn line_of<'a>(text: &'a str, what: &str) -> &'a str {
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(what)).collect();
    assert!(!lines.is_empty(), "no line names '{what}' in:\n{text}");
    lines[0]
}

/// Every tensor name defined in the model (graph inputs, initializers, node outputs, in every graph)
/// is defined once, and every non-empty node name is unique.
fn check_unique_names(path: &Path) {
    let m = Model::load(path).unwrap();
    let mut defined: HashMap<String, usize> = HashMap::new();
    let mut nodes: HashMap<String, usize> = HashMap::new();
    for g in all_graphs(&m.proto) {
        let inits: Vec<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
        for v in g.input.iter().filter(|v| !inits.contains(&v.name.as_deref().unwrap_or(""))) {
            *defined.entry(v.name.clone().unwrap_or_default()).or_default() += 1;
        }
        for t in &g.initializer {
            *defined.entry(t.name.clone().unwrap_or_default()).or_default() += 1;
        }
        for n in &g.node {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                *defined.entry(o.clone()).or_default() += 1;
            }
            if let Some(name) = n.name.as_deref().filter(|s| !s.is_empty()) {
                *nodes.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    let dup: Vec<_> = defined.iter().filter(|(_, &c)| c > 1).collect();
    assert!(dup.is_empty(), "{}: tensor names defined more than once: {dup:?}", path.display());
    let dup: Vec<_> = nodes.iter().filter(|(_, &c)| c > 1).collect();
    assert!(dup.is_empty(), "{}: node names used more than once: {dup:?}", path.display());
}

/// Whether the node writing `output` (anywhere in the model) is a quantized product: MatMulNBits,
/// or a MatMul/Gemm whose B is written by a DequantizeLinear (possibly through a bias Add).
fn quantized_product(path: &Path, output: &str) -> bool {
    let m = Model::load(path).unwrap();
    let graphs = all_graphs(&m.proto);
    let producer = |t: &str| -> Option<&NodeProto> {
        graphs.iter().flat_map(|g| g.node.iter()).find(|n| n.output.iter().any(|o| o == t))
    };
    let Some(n) = producer(output) else { return false };
    let n = if n.op_type.as_deref() == Some("Add") { producer(&n.input[0]).unwrap_or(n) } else { n };
    match n.op_type.as_deref() {
        Some("MatMulNBits") => true,
        Some("MatMul" | "Gemm") => {
            producer(&n.input[1]).is_some_and(|p| p.op_type.as_deref() == Some("DequantizeLinear"))
        }
        _ => false,
    }
}

/// The initializer `name` of the main graph, if present.
fn main_initializer(path: &Path, name: &str) -> Option<(Vec<f32>, Vec<i64>)> {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    g.initializer.iter().find(|t| t.name.as_deref() == Some(name)).map(|t| {
        let v = if matches!(t.data_type, Some(1 | 10 | 16)) { floats(&m, t) } else { vec![] };
        (v, t.dims.clone())
    })
}

// ---------------------------------------------------------------------------------------------
// npz writing (calibration data)
// ---------------------------------------------------------------------------------------------

enum Arr {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

fn write_npz(path: &Path, arrays: &[(&str, Arr)]) {
    let members: Vec<(&str, Vec<u8>)> = arrays
        .iter()
        .map(|(name, a)| {
            let (descr, shape, bytes): (&str, &Vec<usize>, Vec<u8>) = match a {
                Arr::F32(s, v) => ("<f4", s, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Arr::I64(s, v) => ("<i8", s, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
            (*name, npy(descr, false, &tuple, &bytes))
        })
        .collect();
    npz(path, &members);
}

/// Activations with two outlier channels (as real LLM activations have).
fn outlier_rows(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut v = Rng::new(seed).normals(rows * width, 1.0);
    for r in 0..rows {
        v[r * width + 3] *= 40.0;
        v[r * width + 17] *= 25.0;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Fault 2: a weight read by several nodes
// ---------------------------------------------------------------------------------------------

/// c05_shared_weight: Ws by two MatMuls, Wl by /block and the excluded /lm_head, Wa by a MatMul and
/// a ReduceMean, Wt by a MatMul and a Gemm with transB=1, Wb by a MatMul and a Mul.
fn c05() -> ModelProto {
    let h = 64;
    let mut inits: Vec<TensorProto> =
        ["Ws", "Wl", "Wa", "Wt", "Wb"].iter().enumerate().map(|(i, n)| w(n, &[h, h], 50 + i as u64, 0.1)).collect();
    inits.push(init_i64("shape2d", &[2], &[-1, h as i64]));
    let nodes = vec![
        node("MatMul", "/layer0/MatMul", &["x", "Ws"], &["h0"], vec![]),
        node("Tanh", "/layer0/Tanh", &["h0"], &["h0t"], vec![]),
        node("MatMul", "/layer1/MatMul", &["h0t", "Ws"], &["h1"], vec![]),
        node("MatMul", "/block/MatMul", &["h1", "Wl"], &["h2"], vec![]),
        node("MatMul", "/lm_head/MatMul", &["h2", "Wl"], &["logits"], vec![]),
        node("MatMul", "/attn/MatMul", &["x", "Wa"], &["a"], vec![]),
        node(
            "ReduceMean",
            "/bias/ReduceMean",
            &["Wa"],
            &["wa_mean"],
            vec![attr_ints("axes", &[0]), attr_i("keepdims", 0)],
        ),
        node("Add", "/bias/Add", &["a", "wa_mean"], &["a_plus_w"], vec![]),
        node("MatMul", "/plain/MatMul", &["x", "Wt"], &["p"], vec![]),
        node("Reshape", "/fc/Reshape", &["x", "shape2d"], &["x2d"], vec![]),
        node("Gemm", "/fc/Gemm", &["x2d", "Wt"], &["fc"], vec![attr_i("transB", 1)]),
        node("MatMul", "/attn2/MatMul", &["x", "Wb"], &["b"], vec![]),
        node("Mul", "/aux/Mul", &["Wb", "Wb"], &["wb_sq"], vec![]),
    ];
    let d3 = [None, None, Some(h)];
    let outs = vec![
        io("logits", 1, &d3),
        io("a_plus_w", 1, &d3),
        io("p", 1, &d3),
        io("fc", 1, &[None, Some(h)]),
        io("b", 1, &d3),
        io("wb_sq", 1, &[Some(h), Some(h)]),
    ];
    model(graph(nodes, inits, vec![io("x", 1, &d3)], outs), 17)
}

fn c05_samples() -> Vec<Vec<Input>> {
    (0..4).map(|s| vec![f32_input("x", &[1, 16, 64], outlier_rows(16, 64, 70 + s))]).collect()
}

fn c05_expected(src: &Path, dir: &Path, lm_head: bool) -> PathBuf {
    let mut wants = vec![
        q("/layer0/MatMul"),
        q("/layer1/MatMul"),
        q("/block/MatMul"),
        q("/attn/MatMul"),
        Want { node: "/bias/ReduceMean", input: 0, quant: None },
        q("/plain/MatMul"),
        Want { node: "/fc/Gemm", input: 1, quant: Some((128, 1)) },
        q("/attn2/MatMul"),
    ];
    if lm_head {
        wants.push(q("/lm_head/MatMul"));
    }
    expected(src, &wants, &dir.join(format!("expected_{lm_head}.onnx")))
}

#[test]
fn shared_weight_readers_get_what_they_ask_for() {
    let d = tmp();
    let src = save_model(c05(), d.path(), "c05.onnx");
    let samples = c05_samples();
    // Default exclusion: /lm_head reads the float Wl, /aux/Mul and /bias/ReduceMean the float Wb, Wa.
    let exp = c05_expected(&src, d.path(), false);
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("q_{format}.onnx"));
        let (stdout, _) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        check(&src, &out, &exp, &samples, &["wb_sq"]);
        check_unique_names(&out);
        for o in ["h0", "h1", "h2", "a", "b"] {
            assert!(quantized_product(&out, o), "{format}: the product writing '{o}' must be quantized");
        }
        assert!(!quantized_product(&out, "logits"), "{format}: the excluded /lm_head/MatMul must stay float");
        // The excluded head, the ReduceMean and the Mul read the original weights, bit for bit.
        let m = Model::load(&out).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        for (reader, input, weight) in
            [("/lm_head/MatMul", 1, "Wl"), ("/bias/ReduceMean", 0, "Wa"), ("/aux/Mul", 0, "Wb")]
        {
            let n = g.node.iter().find(|n| n.name.as_deref() == Some(reader)).unwrap();
            assert_eq!(n.input[input], weight, "{format}: {reader} must read the float '{weight}'");
            let (v, _) = main_initializer(&out, weight).unwrap();
            let (orig, _) = main_initializer(&src, weight).unwrap();
            assert_eq!(v, orig, "{format}: '{weight}' must keep its values");
        }
        // The summary says that float copies were kept and what they cost (3 weights of 16384 bytes).
        assert!(
            stdout.contains("; float copies kept for other readers: 3 (49152 bytes)"),
            "{format}: summary: {stdout}"
        );
    }
    // Without exclusion the head is quantized too.
    let exp = c05_expected(&src, d.path(), true);
    let out = d.path().join("q_all.onnx");
    quantize(&src, &out, &["--no-default-exclude"]);
    check(&src, &out, &exp, &samples, &["wb_sq"]);
    assert!(quantized_product(&out, "logits"));
}

#[test]
fn awq_scaled_weights_are_read_only_by_their_quantized_products() {
    let d = tmp();
    let src = save_model(c05(), d.path(), "c05.onnx");
    let calib = d.path().join("calib.npz");
    let rows: Vec<f32> = (0..8).flat_map(|s| outlier_rows(16, 64, 90 + s)).collect();
    write_npz(&calib, &[("x", Arr::F32(vec![8, 1, 16, 64], rows))]);
    let samples = c05_samples();
    let exp = c05_expected(&src, d.path(), false);
    for method in ["awq_lite", "awq_full"] {
        let out = d.path().join(format!("{method}.onnx"));
        quantize(&src, &out, &["--method", method, "--calibration-data", calib.to_str().unwrap()]);
        check_unique_names(&out);
        for mode in MODES {
            let f = outputs(&src, mode, &samples);
            let qo = outputs(&out, mode, &samples);
            let e = outputs(&exp, mode, &samples);
            // The Mul reads the original Wb, not W * s.
            assert_eq!(qo["wb_sq"], f["wb_sq"], "{method} {mode:?}: /aux/Mul must read the original Wb");
            // The ReduceMean reads the original Wa: a_plus_w's error comes from /attn/MatMul only,
            // no worse than plain RTN's (AWQ minimizes that product's loss).
            for o in ["a_plus_w", "b", "logits"] {
                let (eq, ee) = (rel(&qo[o], &f[o]), rel(&e[o], &f[o]));
                assert!(eq <= 1.25 * ee + 0.03, "{method} {mode:?}: '{o}' error {eq:.4} vs RTN's {ee:.4}");
            }
        }
    }
}

/// c06_tied_embedding: table E [512, 64] read by the embedding Gather and by the head, as
/// `Gemm(h, E, transB=1)` (model_gemm) or `MatMul(h, Transpose(E))` (model_transpose).
fn c06(head: &str) -> ModelProto {
    let (v, h) = (512, 64);
    let mut e = Rng::new(61).normals(v * h, 0.5);
    for r in 0..v {
        e[r * h + 5] *= 8.0;
    }
    let inits = vec![
        init("embed.weight", &[v, h], &e, FloatFormat::F32),
        w("layer.weight", &[h, h], 62, 0.15),
        init_i64("flat", &[2], &[-1, h as i64]),
    ];
    let mut nodes = vec![
        node("Gather", "/embed_tokens/Gather", &["embed.weight", "ids"], &["h"], vec![attr_i("axis", 0)]),
        node("MatMul", "/layers.0/mlp/MatMul", &["h", "layer.weight"], &["h1"], vec![]),
    ];
    let mut outs = vec![io("h", 1, &[None, None, Some(h)])];
    if head == "gemm" {
        nodes.push(node("Reshape", "/lm_head/Reshape", &["h1", "flat"], &["h2"], vec![]));
        nodes.push(node("Gemm", "/lm_head/Gemm", &["h2", "embed.weight"], &["logits"], vec![attr_i("transB", 1)]));
        outs.push(io("logits", 1, &[None, Some(v)]));
    } else {
        nodes.push(node(
            "Transpose",
            "/lm_head/Transpose",
            &["embed.weight"],
            &["embed_t"],
            vec![attr_ints("perm", &[1, 0])],
        ));
        nodes.push(node("MatMul", "/lm_head/MatMul", &["h1", "embed_t"], &["logits"], vec![]));
        outs.push(io("logits", 1, &[None, None, Some(v)]));
    }
    model(graph(nodes, inits, vec![io("ids", 7, &[None, None])], outs), 17)
}

fn ids_samples(n: usize, seed: u64) -> Vec<Vec<Input>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let ids: Vec<i64> = (0..16).map(|_| (rng.uniform() * 512.0) as i64).collect();
            vec![Input { name: "ids".into(), shape: vec![1, 16], data: InputData::I64(ids) }]
        })
        .collect()
}

/// The tied table of the Transpose head, folded as the test's own reference: `E^T` [64, 512].
fn transposed_expected(
    src: &Path,
    out: &Path,
    gather: Option<(usize, usize)>,
    head: Option<(usize, usize)>,
) -> PathBuf {
    let m = Model::load(src).unwrap();
    let (e, dims, format) = constant_values(&m, "embed.weight");
    let (v, h) = (dims[0], dims[1]);
    let et: Vec<f32> = (0..h * v).map(|i| e[(i % v) * h + i / v]).collect();
    let mut proto = m.proto.clone();
    let g = proto.graph.as_mut().unwrap();
    let table = match gather {
        Some((b, a)) => dq_ref(format, &e, [v, h], b, a),
        None => e.clone(),
    };
    let head_w = match head {
        Some((b, a)) => dq_ref(format, &et, [h, v], b, a),
        None => et.clone(),
    };
    g.initializer.push(init("E_gather", &[v, h], &table, format));
    g.initializer.push(init("E_head", &[h, v], &head_w, format));
    g.node.retain(|n| n.op_type.as_deref() != Some("Transpose"));
    for n in g.node.iter_mut() {
        match n.name.as_deref() {
            Some("/embed_tokens/Gather") => n.input[0] = "E_gather".into(),
            Some("/lm_head/MatMul") => n.input[1] = "E_head".into(),
            Some("/layers.0/mlp/MatMul") => n.input[1] = "L".into(),
            _ => {}
        }
    }
    let (l, _, _) = constant_values(&m, "layer.weight");
    g.initializer.push(init("L", &[64, 64], &dq_ref(format, &l, [64, 64], 128, 0), format));
    write(proto, out, ExternalData::Never)
}

#[test]
fn tied_embedding_gather_reads_the_original_or_its_own_quantized_table() {
    let d = tmp();
    let samples = ids_samples(4, 6);
    let src = save_model(c06("gemm"), d.path(), "gemm.onnx");
    let calib = d.path().join("ids.npz");
    let ids: Vec<i64> = (0..8 * 16).map(|i| (i * 37 % 512) as i64).collect();
    write_npz(&calib, &[("ids", Arr::I64(vec![8, 1, 16], ids))]);
    let calib = calib.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, Want, Option<&str>)> = vec![
        // The head is quantized; the Gather reads its quantized bytes (tied: one copy, no float table).
        (
            "rtn",
            vec!["--no-default-exclude"],
            Want { node: "/embed_tokens/Gather", input: 0, quant: Some((128, 1)) },
            None,
        ),
        // AWQ scales the head's weight: the Gather must still read the original.
        (
            "awq",
            vec!["--no-default-exclude", "--method", "awq_lite", "--calibration-data", calib],
            Want { node: "/embed_tokens/Gather", input: 0, quant: None },
            Some("h"),
        ),
        // Gather quantization asked along axis 0: the tied Gather still reads the head's bytes
        // (blocked along the hidden axis), with a warning.
        (
            "gather0",
            vec!["--no-default-exclude", "--gather-axis", "0"],
            Want { node: "/embed_tokens/Gather", input: 0, quant: Some((128, 1)) },
            None,
        ),
        // Along axis 1 with the head's block size: one shared table is exact.
        (
            "gather1",
            vec!["--no-default-exclude", "--gather-axis", "1", "--block-size", "32"],
            Want { node: "/embed_tokens/Gather", input: 0, quant: Some((32, 1)) },
            None,
        ),
    ];
    for (tag, args, gather, exact) in cases {
        let head_block = if tag == "gather1" { 32 } else { 128 };
        let exp = expected(
            &src,
            &[
                Want { node: "/layers.0/mlp/MatMul", input: 1, quant: Some((head_block, 0)) },
                Want { node: "/lm_head/Gemm", input: 1, quant: Some((head_block, 1)) },
                gather,
            ],
            &d.path().join(format!("exp_{tag}.onnx")),
        );
        let out = d.path().join(format!("{tag}.onnx"));
        let (stdout, _) = quantize(&src, &out, &args);
        check_unique_names(&out);
        let exact: Vec<&str> = exact.into_iter().collect();
        if tag == "awq" {
            for mode in MODES {
                let f = outputs(&src, mode, &samples);
                let qo = outputs(&out, mode, &samples);
                let e = outputs(&exp, mode, &samples);
                assert_eq!(qo["h"], f["h"], "awq {mode:?}: the Gather must read the original table, not E * s");
                let (eq, ee) = (rel(&qo["logits"], &f["logits"]), rel(&e["logits"], &f["logits"]));
                assert!(eq <= 1.25 * ee + 0.03, "awq {mode:?}: logits error {eq:.4} vs RTN's {ee:.4}");
            }
        } else {
            check(&src, &out, &exp, &samples, &exact);
        }
        assert!(quantized_product(&out, "logits"), "{tag}: the tied head must be quantized");
        let copies = main_initializer(&out, "embed.weight").is_some();
        match tag {
            "rtn" | "gather0" => {
                assert!(!copies, "{tag}: the tied Gather reads the head's bytes; no float copy");
                assert!(!stdout.contains("float copies kept"), "{tag}: {stdout}");
            }
            "awq" => {
                assert!(copies, "{tag}: the Gather's float table must be kept");
                assert!(stdout.contains("; float copies kept for other readers: 1 (131072 bytes)"), "{tag}: {stdout}");
            }
            "gather1" => {
                assert!(!copies, "{tag}: one shared quantized table is exact; no float copy");
                let m = Model::load(&out).unwrap();
                let tables = m.proto.graph.as_ref().unwrap().initializer.iter().filter(|t| t.dims == [512, 64]).count();
                assert_eq!(tables, 1, "{tag}: one shared table");
            }
            _ => {}
        }
    }
    // The Transpose head: the chain is folded, the head quantized, the tied Gather reads its bytes.
    let src = save_model(c06("transpose"), d.path(), "transpose.onnx");
    let exp = transposed_expected(&src, &d.path().join("exp_t.onnx"), Some((128, 1)), Some((128, 0)));
    let out = d.path().join("t.onnx");
    quantize(&src, &out, &["--no-default-exclude"]);
    check(&src, &out, &exp, &samples, &[]);
    assert!(quantized_product(&out, "logits"), "the head behind the Transpose must be quantized");
    let exp = transposed_expected(&src, &d.path().join("exp_t0.onnx"), Some((128, 1)), Some((128, 0)));
    let out = d.path().join("t0.onnx");
    quantize(&src, &out, &["--no-default-exclude", "--gather-axis", "0"]);
    check(&src, &out, &exp, &samples, &[]);
    let text = inspect(&src, &["--exclude", "nothing"]);
    assert!(line_of(&text, "/lm_head/MatMul").contains("quantize"), "{text}");
    assert!(line_of(&text, "/embed_tokens/Gather").contains("float"), "{text}");
}

#[test]
fn inspect_lists_every_reader_with_its_decision() {
    let d = tmp();
    let src = save_model(c05(), d.path(), "c05.onnx");
    let text = inspect(&src, &[]);
    for (reader, word) in [
        ("/layer0/MatMul", "quantize"),
        ("/layer1/MatMul", "quantize"),
        ("/block/MatMul", "quantize"),
        ("/lm_head/MatMul", "excluded"),
        ("/bias/ReduceMean", "float"),
        ("/aux/Mul", "float"),
        ("/fc/Gemm", "axis 1"),
    ] {
        assert!(line_of(&text, reader).contains(word), "{reader}: {text}");
    }
    assert!(line_of(&text, "/lm_head/MatMul").contains("float"), "{text}");
}

/// A table read by a Gather and two MatMuls (one-hot style `[B, 512] @ E`), plus a weight read by a
/// Gemm with transB=1 first and a MatMul second.
#[test]
fn gather_and_two_matmuls_and_gemm_before_matmul() {
    let d = tmp();
    let (v, h) = (512, 64);
    let inits = vec![w("E", &[v, h], 81, 0.3), w("G", &[h, h], 82, 0.1), init_i64("flat", &[2], &[-1, h as i64])];
    let nodes = vec![
        node("Gather", "/emb/Gather", &["E", "ids"], &["e"], vec![attr_i("axis", 0)]),
        node("MatMul", "/a/MatMul", &["oh", "E"], &["a"], vec![]),
        node("Tanh", "/a/Tanh", &["a"], &["at"], vec![]),
        node("MatMul", "/b/MatMul", &["oh", "E"], &["b"], vec![]),
        node("Reshape", "/g/Reshape", &["at", "flat"], &["a2"], vec![]),
        node("Gemm", "/g/Gemm", &["a2", "G"], &["g"], vec![attr_i("transB", 1)]),
        node("MatMul", "/m/MatMul", &["at", "G"], &["m"], vec![]),
    ];
    let outs = vec![
        io("e", 1, &[None, None, Some(h)]),
        io("b", 1, &[None, Some(h)]),
        io("g", 1, &[None, Some(h)]),
        io("m", 1, &[None, Some(h)]),
    ];
    let inputs = vec![io("ids", 7, &[None, None]), io("oh", 1, &[None, Some(v)])];
    let src = save_model(model(graph(nodes, inits, inputs, outs), 17), d.path(), "m.onnx");
    let samples: Vec<Vec<Input>> = (0..3)
        .map(|s| {
            let mut s = ids_samples(1, 100 + s).remove(0);
            s.push(normal_input("oh", &[4, v], 200 + s.len() as u64));
            s
        })
        .collect();
    let exp = expected(
        &src,
        &[
            Want { node: "/emb/Gather", input: 0, quant: None },
            q("/a/MatMul"),
            q("/b/MatMul"),
            Want { node: "/g/Gemm", input: 1, quant: Some((128, 1)) },
            q("/m/MatMul"),
        ],
        &d.path().join("exp.onnx"),
    );
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        check(&src, &out, &exp, &samples, &["e"]);
        check_unique_names(&out);
        assert!(quantized_product(&out, "b"), "{format}: /b/MatMul must be quantized");
    }
}

// ---------------------------------------------------------------------------------------------
// Fault 3: weights read inside If/Loop/Scan bodies
// ---------------------------------------------------------------------------------------------

/// c08_subgraph_if: /main/MatMul reads W_outer; an If whose then-branch reads W_outer by outer-scope
/// name and whose else-branch reads its own W_inner; a Loop whose body reads its own W_loop.
fn c08() -> ModelProto {
    let b = [None, Some(64)];
    let then_g = graph(
        vec![node("MatMul", "/then/MatMul", &["h", "W_outer"], &["t_out"], vec![])],
        vec![],
        vec![],
        vec![io("t_out", 1, &b)],
    );
    let else_g = graph(
        vec![node("MatMul", "/else/MatMul", &["h", "W_inner"], &["e_out"], vec![])],
        vec![w("W_inner", &[64, 64], 82, 0.12)],
        vec![],
        vec![io("e_out", 1, &b)],
    );
    let loop_g = graph(
        vec![
            node("Identity", "/loop_body/cond", &["cond_in"], &["cond_out"], vec![]),
            node("MatMul", "/loop_body/MatMul", &["acc_in", "W_loop"], &["acc_mm"], vec![]),
            node("Tanh", "/loop_body/Tanh", &["acc_mm"], &["acc_out"], vec![]),
        ],
        vec![w("W_loop", &[64, 64], 83, 0.12)],
        vec![io("iter", 7, &[]), io("cond_in", 9, &[]), io("acc_in", 1, &b)],
        vec![io("cond_out", 9, &[]), io("acc_out", 1, &b)],
    );
    let nodes = vec![
        node("MatMul", "/main/MatMul", &["x", "W_outer"], &["h"], vec![]),
        node(
            "If",
            "/branch/If",
            &["flag"],
            &["y_if"],
            vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
        ),
        node("Loop", "/loop/Loop", &["trip", "true_c", "h"], &["y_loop"], vec![attr_g("body", loop_g)]),
    ];
    let inits = vec![w("W_outer", &[64, 64], 81, 0.12), init_i64("trip", &[], &[2]), bool_init("true_c", true)];
    model(
        graph(nodes, inits, vec![io("x", 1, &b), io("flag", 9, &[])], vec![io("y_if", 1, &b), io("y_loop", 1, &b)]),
        17,
    )
}

fn flag_samples(width: usize) -> Vec<Vec<Input>> {
    [true, false]
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            vec![
                normal_input("x", &[4, width], 300 + i as u64),
                Input { name: "flag".into(), shape: vec![], data: InputData::Bool(vec![f]) },
            ]
        })
        .collect()
}

#[test]
fn weights_inside_if_and_loop_bodies_are_quantized() {
    let d = tmp();
    let src = save_model(c08(), d.path(), "c08.onnx");
    let exp = expected(
        &src,
        &[q("/main/MatMul"), q("/then/MatMul"), q("/else/MatMul"), q("/loop_body/MatMul")],
        &d.path().join("exp.onnx"),
    );
    let samples = flag_samples(64);
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        let (stdout, _) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        assert!(stdout.starts_with("quantized 3 of 3 weights"), "{format}: {stdout}");
        check(&src, &out, &exp, &samples, &[]);
        check_unique_names(&out);
        for o in ["h", "t_out", "e_out", "acc_mm"] {
            assert!(quantized_product(&out, o), "{format}: the product writing '{o}' must be quantized");
        }
    }
    let text = inspect(&src, &[]);
    for n in ["/main/MatMul", "/then/MatMul", "/else/MatMul", "/loop_body/MatMul"] {
        assert!(line_of(&text, n).contains("quantize"), "{n}: {text}");
    }
    assert!(line_of(&text, "/then/MatMul").contains("/branch/If"), "subgraph nodes name their If: {text}");
}

/// Optimum's decoder_model_merged layout: the main graph holds the weights and one If; both branches
/// run the layers and read the weights by outer-scope name. Nested: the then-branch holds another If.
fn merged(nested: bool) -> ModelProto {
    let b = [None, Some(64)];
    let layers = |p: &str, out: &str| {
        vec![
            node("MatMul", &format!("/{p}/l0/MatMul"), &["x", "W_a"], &[&format!("{p}1")], vec![]),
            node("MatMul", &format!("/{p}/l1/MatMul"), &[&format!("{p}1"), "W_b"], &[out], vec![]),
        ]
    };
    let then2 = if nested {
        let inner_then = graph(layers("deep", "d2"), vec![], vec![], vec![io("d2", 1, &b)]);
        let inner_else = graph(layers("shallow", "s2"), vec![], vec![], vec![io("s2", 1, &b)]);
        graph(
            vec![node(
                "If",
                "/inner/If",
                &["flag2"],
                &["t2"],
                vec![attr_g("then_branch", inner_then), attr_g("else_branch", inner_else)],
            )],
            vec![],
            vec![],
            vec![io("t2", 1, &b)],
        )
    } else {
        graph(layers("with_past", "t2"), vec![], vec![], vec![io("t2", 1, &b)])
    };
    let else2 = graph(layers("no_past", "e2"), vec![], vec![], vec![io("e2", 1, &b)]);
    let mut inputs = vec![io("x", 1, &b), io("flag", 9, &[])];
    if nested {
        inputs.push(io("flag2", 9, &[]));
    }
    let g = graph(
        vec![node(
            "If",
            "optimum::if",
            &["flag"],
            &["y"],
            vec![attr_g("then_branch", then2), attr_g("else_branch", else2)],
        )],
        vec![w("W_a", &[64, 64], 91, 0.12), w("W_b", &[64, 64], 92, 0.12)],
        inputs,
        vec![io("y", 1, &b)],
    );
    model(g, 17)
}

#[test]
fn merged_decoder_layout_is_quantized() {
    let d = tmp();
    for nested in [false, true] {
        let src = save_model(merged(nested), d.path(), &format!("merged_{nested}.onnx"));
        let names: Vec<&str> = if nested {
            vec![
                "/deep/l0/MatMul",
                "/deep/l1/MatMul",
                "/shallow/l0/MatMul",
                "/shallow/l1/MatMul",
                "/no_past/l0/MatMul",
                "/no_past/l1/MatMul",
            ]
        } else {
            vec!["/with_past/l0/MatMul", "/with_past/l1/MatMul", "/no_past/l0/MatMul", "/no_past/l1/MatMul"]
        };
        let wants: Vec<Want> = names.iter().map(|n| q(n)).collect();
        let exp = expected(&src, &wants, &d.path().join(format!("exp_{nested}.onnx")));
        let mut samples = flag_samples(64);
        if nested {
            samples = samples
                .into_iter()
                .flat_map(|s| {
                    [true, false].map(|f2| {
                        let mut s = s.clone();
                        s.push(Input { name: "flag2".into(), shape: vec![], data: InputData::Bool(vec![f2]) });
                        s
                    })
                })
                .collect();
        }
        for format in ["dq", "matmulnbits"] {
            let out = d.path().join(format!("{format}_{nested}.onnx"));
            let (stdout, _) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
            assert!(stdout.starts_with("quantized 2 of 2 weights"), "{format}: {stdout}");
            let r = check(&src, &out, &exp, &samples, &[]);
            let (eq, _) = r.errors[&("NoOpt".to_string(), "y".to_string())];
            assert!(eq > 1e-3, "{format}: the model must actually be quantized (error {eq})");
            check_unique_names(&out);
            // One quantized copy of each weight serves every branch; the float weights are gone.
            assert!(main_initializer(&out, "W_a").is_none() && main_initializer(&out, "W_b").is_none(), "{format}");
        }
        let text = inspect(&src, &[]);
        for n in &names {
            assert!(line_of(&text, n).contains("quantize"), "{n}: {text}");
        }
    }
}

/// A Scan whose body reads a main-graph weight and its own, and a Loop body that reads a main-graph
/// weight also read by a main-graph MatMul and by an excluded node inside the body.
#[test]
fn scan_and_loop_bodies_with_outer_weights() {
    let d = tmp();
    let row = [Some(64)];
    let scan_body = graph(
        vec![
            node("MatMul", "/scan/MatMul", &["r", "W_s"], &["r1"], vec![]),
            node("MatMul", "/scan/own/MatMul", &["r1", "W_own"], &["r2"], vec![]),
            node("Add", "/scan/Add", &["acc_in", "r2"], &["acc_out"], vec![]),
            node("Identity", "/scan/Id", &["r2"], &["r_out"], vec![]),
        ],
        vec![w("W_own", &[64, 64], 102, 0.12)],
        vec![io("acc_in", 1, &row), io("r", 1, &row)],
        vec![io("acc_out", 1, &row), io("r_out", 1, &row)],
    );
    let b = [None, Some(64)];
    let loop_body = graph(
        vec![
            node("Identity", "/lb/cond", &["cond_in"], &["cond_out"], vec![]),
            node("MatMul", "/lb/MatMul", &["acc_l", "W_s"], &["mm"], vec![]),
            node("MatMul", "/lm_head/inner/MatMul", &["mm", "W_s"], &["mm2"], vec![]),
            node("Tanh", "/lb/Tanh", &["mm2"], &["acc_o"], vec![]),
        ],
        vec![],
        vec![io("iter", 7, &[]), io("cond_in", 9, &[]), io("acc_l", 1, &b)],
        vec![io("cond_out", 9, &[]), io("acc_o", 1, &b)],
    );
    let nodes = vec![
        node("MatMul", "/pre/MatMul", &["x", "W_s"], &["h"], vec![]),
        node(
            "Scan",
            "/scan/Scan",
            &["acc0", "x"],
            &["acc", "ys"],
            vec![attr_g("body", scan_body), attr_i("num_scan_inputs", 1)],
        ),
        node("Loop", "/loop/Loop", &["trip", "true_c", "h"], &["y_loop"], vec![attr_g("body", loop_body)]),
    ];
    let inits = vec![
        w("W_s", &[64, 64], 101, 0.12),
        init("acc0", &[64], &[0.0; 64], FloatFormat::F32),
        init_i64("trip", &[], &[2]),
        bool_init("true_c", true),
    ];
    let outs = vec![io("acc", 1, &row), io("ys", 1, &b), io("y_loop", 1, &b)];
    let src = save_model(model(graph(nodes, inits, vec![io("x", 1, &b)], outs), 17), d.path(), "scan.onnx");
    let exp = expected(
        &src,
        &[
            q("/pre/MatMul"),
            q("/scan/MatMul"),
            q("/scan/own/MatMul"),
            q("/lb/MatMul"),
            Want { node: "/lm_head/inner/MatMul", input: 1, quant: None },
        ],
        &d.path().join("exp.onnx"),
    );
    let samples: Vec<Vec<Input>> = (0..2).map(|s| vec![normal_input("x", &[6, 64], 400 + s)]).collect();
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        check(&src, &out, &exp, &samples, &[]);
        check_unique_names(&out);
        for o in ["h", "r1", "r2", "mm"] {
            assert!(quantized_product(&out, o), "{format}: '{o}' must be quantized");
        }
        assert!(!quantized_product(&out, "mm2"), "{format}: the excluded reader inside the body stays float");
    }
}

/// A chain inside a body reading an outer constant, a Gemm with a bias inside a branch (MatMulNBits
/// plus an Add there), and a weight that is also a graph output.
#[test]
fn chains_in_bodies_gemm_bias_in_a_branch_and_an_output_weight() {
    let d = tmp();
    let b = [None, Some(64)];
    let then_g = graph(
        vec![
            node("Identity", "/t/Identity", &["W1"], &["W1_id"], vec![]),
            node("MatMul", "/t/MatMul", &["x", "W1_id"], &["t"], vec![]),
        ],
        vec![],
        vec![],
        vec![io("t", 1, &b)],
    );
    let else_g = graph(
        vec![node("Gemm", "/e/Gemm", &["x", "W2", "bias"], &["e"], vec![attr_i("transB", 1)])],
        vec![],
        vec![],
        vec![io("e", 1, &b)],
    );
    let nodes = vec![
        node("MatMul", "/m/MatMul", &["x", "W3"], &["m"], vec![]),
        node("If", "/if", &["flag"], &["y"], vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)]),
    ];
    let inits = vec![
        w("W1", &[64, 64], 141, 0.1),
        w("W2", &[64, 64], 142, 0.1),
        w("W3", &[64, 64], 143, 0.1),
        w("bias", &[64], 144, 0.1),
    ];
    let outs = vec![io("y", 1, &b), io("m", 1, &b), io("W3", 1, &[Some(64), Some(64)])];
    let src =
        save_model(model(graph(nodes, inits, vec![io("x", 1, &b), io("flag", 9, &[])], outs), 17), d.path(), "m.onnx");
    // Expected: the Identity's result is W1 itself.
    let m = Model::load(&src).unwrap();
    let (w1, _, _) = constant_values(&m, "W1");
    let mut e = m.proto.clone();
    e.graph.as_mut().unwrap().initializer.push(init(
        "W1_q",
        &[64, 64],
        &dq_ref(FloatFormat::F32, &w1, [64, 64], 128, 0),
        FloatFormat::F32,
    ));
    all_graphs_mut(e.graph.as_mut().unwrap(), &mut |g: &mut GraphProto| {
        for n in g.node.iter_mut().filter(|n| n.name.as_deref() == Some("/t/MatMul")) {
            n.input[1] = "W1_q".into();
        }
    });
    let mid = save_model(e, d.path(), "mid.onnx");
    let exp = expected(
        &mid,
        &[Want { node: "/e/Gemm", input: 1, quant: Some((128, 1)) }, q("/m/MatMul")],
        &d.path().join("exp.onnx"),
    );
    let samples = flag_samples(64);
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        let (stdout, _) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        assert!(stdout.contains("; float copies kept for other readers: 1 (16384 bytes)"), "{format}: {stdout}");
        check(&src, &out, &exp, &samples, &["W3"]);
        check_unique_names(&out);
        for o in ["t", "e", "m"] {
            assert!(quantized_product(&out, o), "{format}: the product writing '{o}' must be quantized");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault 4: weights behind constant chains
// ---------------------------------------------------------------------------------------------

/// c14_weight_behind_op plus unseen variants: Identity of Identity, Transpose then Cast, a Constant
/// node behind an Identity, an Identity whose output has another reader, a Reshape to 3-D (stays
/// float, with its reason).
fn c14() -> (ModelProto, HashMap<&'static str, Vec<f32>>) {
    let n = 96;
    let mut folded = HashMap::new();
    let mut rng = Rng::new(14);
    let mut vals = |shape: usize| rng.normals(shape, 0.1);
    let wp = vals(n * n);
    let wi = vals(n * n);
    let wt = vals(n * n);
    let wh: Vec<f32> = vals(n * n).into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect();
    let wr = vals(n * n);
    let wii = vals(n * n);
    let wtc: Vec<f32> = vals(n * n).into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect();
    let wc = vals(n * n);
    let wo = vals(n * n);
    let tr = |v: &[f32]| -> Vec<f32> { (0..n * n).map(|i| v[(i % n) * n + i / n]).collect() };
    folded.insert("/plain/MatMul", wp.clone());
    folded.insert("/ident/MatMul", wi.clone());
    folded.insert("/trans/MatMul", tr(&wt));
    folded.insert("/cast/MatMul", wh.clone());
    folded.insert("/reshape/MatMul", wr.clone());
    folded.insert("/ident2/MatMul", wii.clone());
    folded.insert("/transcast/MatMul", tr(&wtc));
    folded.insert("/constnode/MatMul", wc.clone());
    folded.insert("/other/MatMul", wo.clone());
    let constant = NodeProto {
        attribute: vec![AttributeProto {
            name: Some("value".into()),
            t: Some(init("", &[n, n], &wc, FloatFormat::F32)),
            r#type: Some(AttributeType::Tensor as i32),
            ..Default::default()
        }],
        ..node("Constant", "/constnode/Constant", &[], &["Wc"], vec![])
    };
    let inits = vec![
        init("Wp", &[n, n], &wp, FloatFormat::F32),
        init("Wi", &[n, n], &wi, FloatFormat::F32),
        init("Wt", &[n, n], &wt, FloatFormat::F32),
        init("Wh", &[n, n], &wh, FloatFormat::F16),
        init("Wr", &[n * n], &wr, FloatFormat::F32),
        init_i64("shape", &[2], &[n as i64, n as i64]),
        init("Wii", &[n, n], &wii, FloatFormat::F32),
        init("Wtc", &[n, n], &wtc, FloatFormat::F16),
        init("Wo", &[n, n], &wo, FloatFormat::F32),
        init("W3", &[n * n], &vals(n * n), FloatFormat::F32),
        init_i64("shape3", &[3], &[1, n as i64, n as i64]),
    ];
    let nodes = vec![
        node("MatMul", "/plain/MatMul", &["x", "Wp"], &["p"], vec![]),
        node("Identity", "/ident/Identity", &["Wi"], &["Wi_id"], vec![]),
        node("MatMul", "/ident/MatMul", &["x", "Wi_id"], &["i"], vec![]),
        node("Transpose", "/trans/Transpose", &["Wt"], &["Wt_t"], vec![attr_ints("perm", &[1, 0])]),
        node("MatMul", "/trans/MatMul", &["x", "Wt_t"], &["t"], vec![]),
        node("Cast", "/cast/Cast", &["Wh"], &["Wh_f"], vec![attr_i("to", 1)]),
        node("MatMul", "/cast/MatMul", &["x", "Wh_f"], &["c"], vec![]),
        node("Reshape", "/reshape/Reshape", &["Wr", "shape"], &["Wr_2d"], vec![]),
        node("MatMul", "/reshape/MatMul", &["x", "Wr_2d"], &["r"], vec![]),
        node("Identity", "/ident2/Identity1", &["Wii"], &["Wii_1"], vec![]),
        node("Identity", "/ident2/Identity2", &["Wii_1"], &["Wii_2"], vec![]),
        node("MatMul", "/ident2/MatMul", &["x", "Wii_2"], &["ii"], vec![]),
        node("Transpose", "/transcast/Transpose", &["Wtc"], &["Wtc_t"], vec![attr_ints("perm", &[1, 0])]),
        node("Cast", "/transcast/Cast", &["Wtc_t"], &["Wtc_f"], vec![attr_i("to", 1)]),
        node("MatMul", "/transcast/MatMul", &["x", "Wtc_f"], &["tc"], vec![]),
        constant,
        node("Identity", "/constnode/Identity", &["Wc"], &["Wc_id"], vec![]),
        node("MatMul", "/constnode/MatMul", &["x", "Wc_id"], &["cn"], vec![]),
        node("Identity", "/other/Identity", &["Wo"], &["Wo_id"], vec![]),
        node("MatMul", "/other/MatMul", &["x", "Wo_id"], &["o"], vec![]),
        node("ReduceSum", "/other/ReduceSum", &["Wo_id"], &["wo_sum"], vec![attr_i("keepdims", 0)]),
        node("Reshape", "/rank3/Reshape", &["W3", "shape3"], &["W3_3d"], vec![]),
        node("MatMul", "/rank3/MatMul", &["x", "W3_3d"], &["r3"], vec![]),
        node("Sum", "/sum/Sum", &["p", "i", "t", "c", "r", "ii", "tc", "cn", "o"], &["y"], vec![]),
    ];
    let b = [None, Some(n)];
    let outs = vec![io("y", 1, &b), io("wo_sum", 1, &[]), io("r3", 1, &[Some(1), None, Some(n)])];
    (model(graph(nodes, inits, vec![io("x", 1, &b)], outs), 17), folded)
}

#[test]
fn weights_behind_constant_chains_are_folded_and_quantized() {
    let d = tmp();
    let (m, folded) = c14();
    let src = save_model(m.clone(), d.path(), "c14.onnx");
    // Expected: every MatMul of the Sum reads dq(q(folded weight)) directly; the chains are gone.
    let mut e = m.clone();
    let g = e.graph.as_mut().unwrap();
    for (name, v) in &folded {
        let t = format!("{name}__expected");
        g.initializer.push(init(&t, &[96, 96], &dq_ref(FloatFormat::F32, v, [96, 96], 128, 0), FloatFormat::F32));
        g.node.iter_mut().find(|n| n.name.as_deref() == Some(name)).unwrap().input[1] = t;
    }
    let exp = save_model(e, d.path(), "exp.onnx");
    let samples: Vec<Vec<Input>> = (0..2).map(|s| vec![normal_input("x", &[4, 96], 500 + s)]).collect();
    for format in ["dq", "matmulnbits"] {
        let out = d.path().join(format!("{format}.onnx"));
        let (stdout, stderr) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
        assert!(stdout.starts_with("quantized 9 of 10 weights"), "{format}: {stdout}");
        // The rank-3 weight stays float and the run says why.
        assert!(
            stderr.contains("W3") && stderr.contains("/rank3/MatMul") && stderr.contains("rank 3"),
            "{format}: {stderr}"
        );
        check(&src, &out, &exp, &samples, &["wo_sum", "r3"]);
        check_unique_names(&out);
        for o in ["p", "i", "t", "c", "r", "ii", "tc", "cn", "o"] {
            assert!(quantized_product(&out, o), "{format}: the product writing '{o}' must be quantized");
        }
        // Chains nobody else reads are dropped; the Identity whose output the ReduceSum reads stays.
        let qm = Model::load(&out).unwrap();
        let g = qm.proto.graph.as_ref().unwrap();
        for gone in [
            "/ident/Identity",
            "/trans/Transpose",
            "/cast/Cast",
            "/reshape/Reshape",
            "/ident2/Identity1",
            "/ident2/Identity2",
            "/transcast/Cast",
            "/constnode/Identity",
        ] {
            assert!(!g.node.iter().any(|n| n.name.as_deref() == Some(gone)), "{format}: '{gone}' must be dropped");
        }
        assert!(g.node.iter().any(|n| n.name.as_deref() == Some("/other/Identity")));
    }
    let text = inspect(&src, &[]);
    for n in [
        "/ident/MatMul",
        "/trans/MatMul",
        "/cast/MatMul",
        "/reshape/MatMul",
        "/ident2/MatMul",
        "/transcast/MatMul",
        "/constnode/MatMul",
        "/other/MatMul",
    ] {
        assert!(line_of(&text, n).contains("quantize"), "{n}: {text}");
    }
    assert!(line_of(&text, "/rank3/MatMul").contains("rank 3"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Fault 6: name collisions
// ---------------------------------------------------------------------------------------------

/// c12_names: existing `Wc_scale`, `Wc_DequantizeLinear_Output`, `Wq_Q4`; empty node names; nodes
/// `dup` and `dup_Q4`; odd weight names; and (unseen) a subgraph defining `Wz_i4` while the main graph
/// holds Wz.
fn c12() -> ModelProto {
    let uni = "\u{6743}\u{91cd}";
    let mut inits: Vec<TensorProto> = ["Wc", "We1", "We2", "Wd1", "Wd2", "model/dense:0", "w eight", uni, "Wq", "Wz"]
        .iter()
        .enumerate()
        .map(|(i, n)| w(n, &[64, 64], 120 + i as u64, 0.1))
        .collect();
    let gain: Vec<f32> = Rng::new(130).normals(64, 0.1).into_iter().map(|v| 1.0 + v).collect();
    inits.push(init("Wc_scale", &[64], &gain, FloatFormat::F32));
    inits.push(w("Wq_Q4", &[64], 131, 1.0));
    let b = [None, Some(64)];
    let then_g = graph(
        vec![
            node("Relu", "/then/Relu", &["y0"], &["Wz_i4"], vec![]),
            node("MatMul", "/then/MatMul", &["Wz_i4", "Wz"], &["Wz_scale"], vec![]),
        ],
        vec![],
        vec![],
        vec![io("Wz_scale", 1, &b)],
    );
    let else_g = graph(
        vec![node("MatMul", "Wz_DequantizeLinear", &["y0", "Wz"], &["e"], vec![])],
        vec![],
        vec![],
        vec![io("e", 1, &b)],
    );
    let nodes = vec![
        node("Mul", "/norm/Mul", &["x", "Wc_scale"], &["xn"], vec![]),
        node("Relu", "/relu/Relu", &["xn"], &["Wc_DequantizeLinear_Output"], vec![]),
        node("MatMul", "mm_c", &["Wc_DequantizeLinear_Output", "Wc"], &["c"], vec![]),
        node("MatMul", "", &["c", "We1"], &["e1"], vec![]),
        node("MatMul", "", &["e1", "We2"], &["e2"], vec![]),
        node("MatMul", "dup", &["e2", "Wd1"], &["d1"], vec![]),
        node("MatMul", "dup_Q4", &["d1", "Wd2"], &["d2"], vec![]),
        node("MatMul", "model/dense/MatMul:0", &["d2", "model/dense:0"], &["s1"], vec![]),
        node("MatMul", "mm space", &["s1", "w eight"], &["s2"], vec![]),
        node("MatMul", &format!("mm_{uni}"), &["s2", uni], &["s3"], vec![]),
        node("MatMul", "q", &["s3", "Wq"], &["qq"], vec![]),
        node("Add", "/add/Add", &["qq", "Wq_Q4"], &["y0"], vec![]),
        node("If", "/z/If", &["flag"], &["y"], vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)]),
    ];
    model(graph(nodes, inits, vec![io("x", 1, &b), io("flag", 9, &[])], vec![io("y", 1, &b)]), 17)
}

#[test]
fn generated_names_never_collide() {
    let d = tmp();
    let src = save_model(c12(), d.path(), "c12.onnx");
    let samples = flag_samples(64);
    let m = Model::load(&src).unwrap();
    let mut readers: Vec<String> = vec![];
    for g in all_graphs(&m.proto) {
        for n in g.node.iter().filter(|n| n.op_type.as_deref() == Some("MatMul")) {
            readers.push(n.output[0].clone());
        }
    }
    // Empty node names cannot be found by name: the expected model reads dq weights by weight name.
    let mut e = m.proto.clone();
    let mut added = HashMap::new();
    for g in all_graphs(&m.proto) {
        for n in g.node.iter().filter(|n| n.op_type.as_deref() == Some("MatMul")) {
            let wname = &n.input[1];
            let (v, dims, format) = constant_values(&m, wname);
            added.insert(wname.clone(), dq_ref(format, &v, [dims[0], dims[1]], 128, 0));
        }
    }
    all_graphs_mut(e.graph.as_mut().unwrap(), &mut |g: &mut GraphProto| {
        for n in g.node.iter_mut().filter(|n| n.op_type.as_deref() == Some("MatMul")) {
            n.input[1] = format!("{}__expected", n.input[1]);
        }
    });
    for (k, v) in &added {
        e.graph.as_mut().unwrap().initializer.push(init(&format!("{k}__expected"), &[64, 64], v, FloatFormat::F32));
    }
    let exp = save_model(e, d.path(), "exp.onnx");
    for (tag, args) in [
        ("dq", vec![]),
        ("qdq", vec!["--method", "rtn"]),
        ("nbits", vec!["--format", "matmulnbits", "--accuracy-level", "0"]),
    ] {
        let out = d.path().join(format!("{tag}.onnx"));
        quantize(&src, &out, &args);
        check_unique_names(&out);
        check(&src, &out, &exp, &samples, &[]);
        for o in &readers {
            assert!(quantized_product(&out, o), "{tag}: the product writing '{o}' must be quantized");
        }
        // The model's own tensors keep their names and values.
        for own in ["Wc_scale", "Wq_Q4"] {
            assert_eq!(main_initializer(&out, own), main_initializer(&src, own), "{tag}: '{own}' must be untouched");
        }
        // ModelOpt's (or ONNX Runtime's) names are kept wherever they are free.
        let m = Model::load(&out).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        let has_init = |n: &str| g.initializer.iter().any(|t| t.name.as_deref() == Some(n));
        let has_node = |n: &str| g.node.iter().any(|x| x.name.as_deref() == Some(n));
        match tag {
            "dq" => {
                assert!(has_init("We1_i4") && has_init("We1_scale") && has_node("We1_DequantizeLinear"), "{tag}");
                assert!(has_init("Wc_i4") && has_node("Wc_DequantizeLinear"), "{tag}");
            }
            "qdq" => assert!(has_node("We1_QuantizeLinear") && has_node("We1_DequantizeLinear"), "{tag}"),
            _ => assert!(has_init("We1_Q4") && has_init("We1_scales") && has_node("dup_Q4_Q4"), "{tag}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault 7: compare measures the session the user will have
// ---------------------------------------------------------------------------------------------

/// c11_massive_activations: W [256, 128] whose rows for two massive channels are small; activations
/// with those channels ~2000x larger.
fn c11(dir: &Path) -> (PathBuf, PathBuf) {
    let (k, n) = (256, 128);
    let mut wv = Rng::new(11).normals(k * n, 0.05);
    for r in [7, 100] {
        for c in 0..n {
            wv[r * n + c] *= 0.001;
        }
    }
    let g = graph(
        vec![node("MatMul", "/proj/MatMul", &["x", "W"], &["y"], vec![])],
        vec![init("W", &[k, n], &wv, FloatFormat::F32)],
        vec![io("x", 1, &[None, None, Some(k)])],
        vec![io("y", 1, &[None, None, Some(n)])],
    );
    let src = save_model(model(g, 17), dir, "c11.onnx");
    let mut x = Rng::new(12).normals(8 * 32 * k, 1.0);
    for t in 0..8 * 32 {
        x[t * k + 7] *= 2000.0;
        x[t * k + 100] *= 1500.0;
    }
    let calib = dir.join("calib.npz");
    write_npz(&calib, &[("x", Arr::F32(vec![8, 1, 32, k], x))]);
    (src, calib)
}

fn json_number(json: &str, key: &str) -> f64 {
    let at = json.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim().parse().unwrap_or_else(|e| panic!("{key}: {e} in {json}"))
}

#[test]
fn compare_reports_the_default_session_and_the_weight_only_error() {
    let d = tmp();
    let (src, calib) = c11(d.path());
    let out = d.path().join("q.onnx");
    quantize(&src, &out, &[]);
    // The numbers measured here independently: a default session, and the weight-only error (the
    // fused MatMulNBits computing in fp32).
    let samples: Vec<Vec<Input>> = {
        let mut x = Rng::new(12).normals(8 * 32 * 256, 1.0);
        for t in 0..8 * 32 {
            x[t * 256 + 7] *= 2000.0;
            x[t * 256 + 100] *= 1500.0;
        }
        x.chunks(32 * 256).map(|c| vec![f32_input("x", &[1, 32, 256], c.to_vec())]).collect()
    };
    let default_err = rel(&outputs(&out, Mode::Default, &samples)["y"], &outputs(&src, Mode::Default, &samples)["y"]);
    let weight_only = rel(&outputs(&out, Mode::NoOpt, &samples)["y"], &outputs(&src, Mode::NoOpt, &samples)["y"]);
    assert!(default_err > 2.0 * weight_only, "the case must show the gap: {default_err} vs {weight_only}");
    let json = nibble_ok(&[
        "compare",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--calibration-data",
        calib.to_str().unwrap(),
        "--json",
    ]);
    let r = json_number(&json, "relative_error");
    let wo = json_number(&json, "weight_only_relative_error");
    assert!(
        (r - default_err).abs() <= 0.01 * default_err,
        "compare reports {r}, a default session gives {default_err}"
    );
    assert!((wo - weight_only).abs() <= 0.01 * weight_only, "compare reports weight-only {wo}, measured {weight_only}");
    let text = nibble_ok(&[
        "compare",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--calibration-data",
        calib.to_str().unwrap(),
    ]);
    assert!(text.contains("session.qdq_matmulnbits_accuracy_level"), "{text}");
    assert!(text.contains("--format matmulnbits --accuracy-level"), "{text}");
    // A model whose default session computes in fp32 (MatMulNBits written with accuracy level 1):
    // one number.
    let out1 = d.path().join("q1.onnx");
    quantize(&src, &out1, &["--format", "matmulnbits", "--accuracy-level", "1"]);
    let json = nibble_ok(&[
        "compare",
        src.to_str().unwrap(),
        out1.to_str().unwrap(),
        "--calibration-data",
        calib.to_str().unwrap(),
        "--json",
    ]);
    assert!(!json.contains("weight_only_relative_error"), "accuracy level 1 written: one number: {json}");
    assert!((json_number(&json, "relative_error") - weight_only).abs() <= 0.01 * weight_only, "{json}");
}

// ---------------------------------------------------------------------------------------------
// Fault 8: messages say each cause once
// ---------------------------------------------------------------------------------------------

/// The message of a failing nibble invocation (exit 1), without panics.
fn error_of(args: &[&str], env: &[(&str, &str)]) -> String {
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_nibble")).args(args).envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// No part between ": " separators appears twice.
fn says_each_cause_once(msg: &str) {
    let parts: Vec<&str> = msg.trim_end().split(": ").filter(|p| p.len() > 6).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "cause repeated ('{p}'): {msg}");
    }
}

#[test]
fn messages_say_each_cause_once() {
    let d = tmp();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let missing = p("missing.onnx");
    let os = "No such file or directory (os error 2)";
    for cmd in [vec!["quantize", missing.as_str()], vec!["inspect", missing.as_str()]] {
        assert_eq!(error_of(&cmd, &[]), format!("nibble: error: cannot read {missing}: {os}\n"));
    }
    let (src, _) = c11(d.path());
    let s = src.to_str().unwrap();
    assert_eq!(error_of(&["compare", s, &missing], &[]), format!("nibble: error: cannot read {missing}: {os}\n"));
    // A folder given as the model.
    let dir = d.path().to_str().unwrap();
    assert_eq!(
        error_of(&["quantize", dir], &[]),
        format!(
            "nibble: error: folder {dir}: has neither genai_config.json (onnxruntime-genai) nor config.json (an Optimum export); to quantize one model file give its path: nibble quantize {dir}/c11.onnx\n"
        )
    );
    // An output folder that is a file.
    let file = p("afile");
    std::fs::write(&file, b"x").unwrap();
    let o = format!("{file}/out.onnx");
    assert_eq!(
        error_of(&["quantize", s, "-o", &o], &[]),
        format!("nibble: error: output {o}: {file} is not a folder\n")
    );
    // Calibration data that is missing.
    let npz = p("missing.npz");
    assert_eq!(
        error_of(&["quantize", s, "-o", &p("o.onnx"), "--method", "awq_lite", "--calibration-data", &npz], &[]),
        format!("nibble: error: --calibration-data: {npz}: {os}\n")
    );
    // Missing external data: the OS error appears once.
    let ext = d.path().join("ext");
    std::fs::create_dir(&ext).unwrap();
    let m = write(Model::load(&src).unwrap().proto, &ext.join("m.onnx"), ExternalData::Always);
    std::fs::remove_file(ext.join("m.onnx_data")).unwrap();
    let msg = error_of(&["quantize", m.to_str().unwrap(), "-o", &p("o2.onnx")], &[]);
    says_each_cause_once(&msg);
    assert_eq!(msg.matches("os error 2").count(), 1, "{msg}");
    // ONNX Runtime not found.
    says_each_cause_once(&error_of(&["compare", s, s], &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]));
    // A NaN weight.
    let mut proto = Model::load(&src).unwrap().proto;
    let t = &mut proto.graph.as_mut().unwrap().initializer[0];
    let mut v: Vec<u8> = t.raw_data.clone().unwrap().to_vec();
    v[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    t.raw_data = Some(bytes::Bytes::from(v));
    let nan = write(proto, &d.path().join("nan.onnx"), ExternalData::Never);
    assert_eq!(
        error_of(&["quantize", nan.to_str().unwrap(), "-o", &p("o3.onnx")], &[]),
        "nibble: error: weight 'W' holds NaN or Inf in block 0 (rows 0..128 along the quantized axis, column 0); fix the weight, or leave the node unquantized with --exclude\n"
    );
}

/// A MatMul inside a model-local function (its weight passed in from the main graph) is not
/// quantized, and that is said: a warning naming node and function on stderr, a line in `inspect`;
/// the plain MatMul beside it is quantized and the model runs in both session modes with the
/// function's output unchanged.
#[test]
fn matmuls_in_model_local_functions_are_reported_not_skipped_silently() {
    use nibble_driver::graph::onnx::{FunctionProto, OperatorSetIdProto};
    let dir = tempfile::tempdir().unwrap();
    let body = FunctionProto {
        name: Some("Linear".into()),
        domain: Some("local".into()),
        input: vec!["a".into(), "b".into()],
        output: vec!["c".into()],
        node: vec![node("MatMul", "/fn/MatMul", &["a", "b"], &["c"], vec![])],
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        ..Default::default()
    };
    let mut call = node("Linear", "/call/Linear", &["x", "Wf"], &["yf"], vec![]);
    call.domain = Some("local".into());
    let g = graph(
        vec![call, node("MatMul", "/plain/MatMul", &["x", "Wp"], &["yp"], vec![])],
        vec![w("Wf", &[64, 32], 1, 0.1), w("Wp", &[64, 32], 2, 0.1)],
        vec![io("x", 1, &[None, Some(64)])],
        vec![io("yf", 1, &[None, Some(32)]), io("yp", 1, &[None, Some(32)])],
    );
    let mut m = model(g, 17);
    m.functions.push(body);
    m.opset_import.push(OperatorSetIdProto { domain: Some("local".into()), version: Some(1) });
    let src = save_model(m, dir.path(), "fn.onnx");
    let out = dir.path().join("q.onnx");
    let (stdout, stderr) = quantize(&src, &out, &[]);
    assert!(
        stderr.contains("MatMul '/fn/MatMul' in model-local function 'Linear' stays float"),
        "no warning for the function body: {stderr}"
    );
    assert!(stdout.contains("1 of 1") || stdout.contains("quantized 1"), "{stdout}");
    let report = inspect(&src, &[]);
    line_of(&report, "model-local function 'Linear'");
    let samples = vec![vec![normal_input("x", &[4, 64], 3)]];
    for mode in MODES {
        let want = outputs(&src, Mode::NoOpt, &samples);
        let got = outputs(&out, mode, &samples);
        assert_eq!(got["yf"], want["yf"], "the function's output changed ({mode:?})");
        let e = rel(&got["yp"], &want["yp"]);
        assert!(e > 0.0 && e < 0.2, "plain MatMul error {e} ({mode:?})");
    }
}

/// `--sequential` on the cases' graphs: shared weights and readers (c05), weights inside If/Loop
/// bodies with an outer weight also read inside a branch (c08), weights behind constant chains
/// (c14). Each output runs in both session modes, the readers that must see the original weight
/// still do, and the error stays that of plain GPTQ's kind (within 25% + 0.03 of it).
#[test]
fn sequential_gptq_on_shared_weights_bodies_and_chains() {
    let d = tmp();
    let calib = d.path().join("calib.npz");
    let rows: Vec<f32> = (0..8).flat_map(|s| outlier_rows(16, 64, 90 + s)).collect();
    write_npz(&calib, &[("x", Arr::F32(vec![8, 1, 16, 64], rows))]);
    let c05_src = save_model(c05(), d.path(), "c05.onnx");
    let c08_src = save_model(c08(), d.path(), "c08.onnx");
    let c14_src = save_model(c14().0, d.path(), "c14.onnx");
    let c14_samples = vec![vec![normal_input("x", &[4, 96], 7)]];
    type Case<'a> = (&'a Path, Vec<Vec<Input>>, Vec<&'a str>);
    let cases: [Case; 3] = [
        (&c05_src, c05_samples(), vec!["--calibration-data", calib.to_str().unwrap()]),
        (&c08_src, flag_samples(64), vec![]),
        (&c14_src, c14_samples, vec![]),
    ];
    for (src, samples, extra) in &cases {
        let name = src.file_stem().unwrap().to_string_lossy().into_owned();
        let mut errors = vec![];
        for seq in [false, true] {
            let out = d.path().join(format!("{name}_{seq}.onnx"));
            let mut args = vec!["--method", "gptq"];
            args.extend(extra.iter().copied());
            if seq {
                args.push("--sequential");
            }
            quantize(src, &out, &args);
            check_unique_names(&out);
            let mut worst = 0.0f64;
            for mode in MODES {
                let f = outputs(src, mode, samples);
                let qo = outputs(&out, mode, samples);
                for (o, v) in &f {
                    let e = rel(&qo[o], v);
                    assert!(e.is_finite(), "{name} {mode:?} '{o}': {e}");
                    worst = worst.max(e);
                }
                if name == "c05" {
                    assert_eq!(qo["wb_sq"], f["wb_sq"], "{mode:?}: /aux/Mul must read the original Wb");
                }
            }
            errors.push(worst);
        }
        eprintln!("{name}: worst relative output error gptq {:.4}, --sequential {:.4}", errors[0], errors[1]);
        assert!(errors[0] > 1e-3, "{name}: the model must actually be quantized");
        assert!(errors[1] <= 1.25 * errors[0] + 0.03, "{name}: --sequential {} vs {}", errors[1], errors[0]);
    }
}

/// Weights behind the other shape-only ops of a constant of any rank (issue 18): Squeeze with and
/// without axes, Flatten (positive and negative axis), a rank-3 Transpose that moves data then a
/// Squeeze, Unsqueeze then Squeeze, a Gemm (`transB=1`) behind a Squeeze, and an Unsqueeze left at
/// rank 3 (stays float, listed with its reason). `opset` 17 gives Unsqueeze/Squeeze their axes as a
/// constant input; opset 11 as the `axes` attribute.
/// A product's node name, the folded weight it reads and the weight's block axis.
type Folded = (&'static str, Vec<f32>, usize);

fn shape_chains(opset: i64) -> (ModelProto, Vec<Folded>) {
    let (k, n) = (128usize, 64usize);
    let mut rng = Rng::new(1800 + opset as u64);
    let mut vals = || rng.normals(k * n, 0.1);
    let (ws, wsa, wf, wfn, wt, wus, wg, w3) = (vals(), vals(), vals(), vals(), vals(), vals(), vals(), vals());
    // wt is stored [N, 1, K]; Transpose perm [2, 1, 0] gives [K, 1, N]: out[k][0][n] = wt[n][0][k].
    let wt_folded: Vec<f32> = (0..k * n).map(|i| wt[(i % n) * k + i / n]).collect();
    // (node, folded weight as the product reads it, block axis)
    let folded = vec![
        ("/squeeze/MatMul", ws.clone(), 0),
        ("/squeeze_all/MatMul", wsa.clone(), 0),
        ("/flatten/MatMul", wf.clone(), 0),
        ("/flatten_neg/MatMul", wfn.clone(), 0),
        ("/transpose3/MatMul", wt_folded, 0),
        ("/unsq_sq/MatMul", wus.clone(), 0),
        ("/gemm/Gemm", wg.clone(), 1),
    ];
    let mut inits = vec![
        init("Ws", &[1, k, n], &ws, FloatFormat::F32),
        init("Wsa", &[k, 1, n], &wsa, FloatFormat::F32),
        init("Wf", &[k, 8, n / 8], &wf, FloatFormat::F32),
        init("Wfn", &[2, k / 2, n], &wfn, FloatFormat::F32),
        init("Wt", &[n, 1, k], &wt, FloatFormat::F32),
        init("Wus", &[k, n], &wus, FloatFormat::F32),
        init("Wg", &[n, 1, k], &wg, FloatFormat::F32),
        init("W3", &[k, n], &w3, FloatFormat::F32),
    ];
    // Unsqueeze/Squeeze axes: an input from opset 13, an attribute before.
    let axes =
        |name: &'static str, v: &[i64], inits: &mut Vec<TensorProto>| -> (Vec<&'static str>, Vec<AttributeProto>) {
            if opset >= 13 {
                inits.push(init_i64(name, &[v.len()], v));
                (vec![name], vec![])
            } else {
                (vec![], vec![attr_ints("axes", v)])
            }
        };
    let mut with_axes = |op: &str, name: &str, x: &'static str, y: &str, a: &'static str, v: &[i64]| {
        let (extra, attrs) = axes(a, v, &mut inits);
        let ins: Vec<&str> = std::iter::once(x).chain(extra).collect();
        node(op, name, &ins, &[y], attrs)
    };
    let nodes = vec![
        with_axes("Squeeze", "/squeeze/Squeeze", "Ws", "Ws_2d", "axes_s", &[0]),
        node("MatMul", "/squeeze/MatMul", &["x", "Ws_2d"], &["s"], vec![]),
        node("Squeeze", "/squeeze_all/Squeeze", &["Wsa"], &["Wsa_2d"], vec![]),
        node("MatMul", "/squeeze_all/MatMul", &["x", "Wsa_2d"], &["sa"], vec![]),
        node("Flatten", "/flatten/Flatten", &["Wf"], &["Wf_2d"], vec![attr_i("axis", 1)]),
        node("MatMul", "/flatten/MatMul", &["x", "Wf_2d"], &["f"], vec![]),
        node("Flatten", "/flatten_neg/Flatten", &["Wfn"], &["Wfn_2d"], vec![attr_i("axis", -1)]),
        node("MatMul", "/flatten_neg/MatMul", &["x", "Wfn_2d"], &["fn"], vec![]),
        node("Transpose", "/transpose3/Transpose", &["Wt"], &["Wt_t"], vec![attr_ints("perm", &[2, 1, 0])]),
        with_axes("Squeeze", "/transpose3/Squeeze", "Wt_t", "Wt_2d", "axes_t", &[-2]),
        node("MatMul", "/transpose3/MatMul", &["x", "Wt_2d"], &["t"], vec![]),
        with_axes("Unsqueeze", "/unsq_sq/Unsqueeze", "Wus", "Wus_3d", "axes_u", &[0, -1]),
        with_axes("Squeeze", "/unsq_sq/Squeeze", "Wus_3d", "Wus_2d", "axes_u2", &[0, 3]),
        node("MatMul", "/unsq_sq/MatMul", &["x", "Wus_2d"], &["us"], vec![]),
        with_axes("Squeeze", "/gemm/Squeeze", "Wg", "Wg_2d", "axes_g", &[1]),
        node("Gemm", "/gemm/Gemm", &["x", "Wg_2d"], &["g"], vec![attr_i("transB", 1)]),
        with_axes("Unsqueeze", "/rank3/Unsqueeze", "W3", "W3_3d", "axes_3", &[0]),
        node("MatMul", "/rank3/MatMul", &["x", "W3_3d"], &["r3"], vec![]),
        node("Sum", "/sum/Sum", &["s", "sa", "f", "fn", "t", "us", "g"], &["y"], vec![]),
    ];
    let outs = vec![io("y", 1, &[Some(4), Some(n)]), io("r3", 1, &[Some(1), Some(4), Some(n)])];
    (model(graph(nodes, inits, vec![io("x", 1, &[Some(4), Some(k)])], outs), opset), folded)
}

#[test]
fn weights_behind_squeeze_unsqueeze_flatten_and_rank3_transpose_are_folded() {
    let d = tmp();
    for opset in [17, 11] {
        let (m, folded) = shape_chains(opset);
        let src = save_model(m.clone(), d.path(), &format!("shape{opset}.onnx"));
        let mut e = m.clone();
        let g = e.graph.as_mut().unwrap();
        for (name, v, axis) in &folded {
            let t = format!("{name}__expected");
            let shape = if *axis == 0 { [128, 64] } else { [64, 128] };
            g.initializer.push(init(&t, &shape, &dq_ref(FloatFormat::F32, v, shape, 128, *axis), FloatFormat::F32));
            g.node.iter_mut().find(|n| n.name.as_deref() == Some(name)).unwrap().input[1] = t;
        }
        let exp = save_model(e, d.path(), &format!("exp{opset}.onnx"));
        let samples: Vec<Vec<Input>> = (0..2).map(|s| vec![normal_input("x", &[4, 128], 1900 + s)]).collect();
        // The DQ form needs opset 21, which nibble upgrades to from opset 13 only.
        let formats: &[&str] = if opset >= 13 { &["dq", "matmulnbits"] } else { &["matmulnbits"] };
        for format in formats {
            let out = d.path().join(format!("{format}{opset}.onnx"));
            let (stdout, stderr) = quantize(&src, &out, &["--format", format, "--accuracy-level", "0"]);
            assert!(stdout.starts_with("quantized 7 of 8 weights"), "opset {opset} {format}: {stdout}{stderr}");
            assert!(stderr.contains("/rank3/MatMul") && stderr.contains("rank 3"), "{format}: {stderr}");
            check(&src, &out, &exp, &samples, &["r3"]);
            check_unique_names(&out);
            for o in ["s", "sa", "f", "fn", "t", "us", "g"] {
                assert!(
                    quantized_product(&out, o),
                    "opset {opset} {format}: the product writing '{o}' must be quantized"
                );
            }
            // The folded chains' nodes are gone.
            let qm = Model::load(&out).unwrap();
            let ops: Vec<&str> =
                qm.proto.graph.as_ref().unwrap().node.iter().filter_map(|n| n.op_type.as_deref()).collect();
            assert!(!ops.contains(&"Flatten") && !ops.contains(&"Transpose"), "{ops:?}");
            assert_eq!(ops.iter().filter(|o| **o == "Squeeze").count(), 0, "{ops:?}");
            assert_eq!(ops.iter().filter(|o| **o == "Unsqueeze").count(), 1, "the rank-3 one stays: {ops:?}");
        }
        let text = inspect(&src, &[]);
        for (name, _, _) in &folded {
            assert!(line_of(&text, name).contains("quantize"), "{name}: {text}");
        }
        assert!(line_of(&text, "/rank3/MatMul").contains("rank 3"), "{text}");
    }
}
