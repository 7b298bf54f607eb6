//! Tied embeddings (issue 22 item 1): a table `E` read by the embedding Gather and by the LM head
//! (through Transpose, through Identity, or the genai builder's `MatMul(x, W)` with
//! `Gather(Transpose(W))`), quantized with `--no-default-exclude` at 4 and 8 head bits in both output
//! forms. The output holds exactly one copy of the head's codes and no float copy of the table; it
//! runs in ONNX Runtime with default session options and with optimizations disabled; its logits and
//! embeddings are those of the scalar reference's dequantized weights, computed here.

mod common;

use common::*;
use nibble::{reference, Bits, FloatFormat};
use nibble_driver::graph::build::{attr_ints, init, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{tensor_proto::DataType, GraphProto, ModelProto};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{Input, InputData};
use std::collections::HashMap;
use std::path::Path;

const V: usize = 96;
const H: usize = 64;
const S: usize = 16;
const BLOCK: usize = 32;

/// How the head and the Gather reach the one table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tie {
    /// `E [V, H]`: `Gather(E)`, head `MatMul(h, Transpose(E))`.
    Transpose,
    /// `E [V, H]`: `Gather(Identity(E))`, head `MatMul(h, Identity(Transpose(E)))`.
    Identity,
    /// The genai builder's: `W [H, V]`: head `MatMul(h, W)`, `Gather(Transpose(W))`.
    Builder,
}

/// The table `[V, H]` (one large hidden channel, as trained embeddings have) and the layer `[H, H]`.
fn weights() -> (Vec<f32>, Vec<f32>) {
    let mut e = Rng::new(6).normals(V * H, 0.5);
    for v in 0..V {
        e[v * H + 5] *= 8.0;
    }
    (e, Rng::new(7).normals(H * H, 0.15))
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| w[r * cols + c])).collect()
}

fn tied_model(tie: Tie, format: FloatFormat) -> ModelProto {
    let (e, w1) = weights();
    let elem = if format == FloatFormat::F16 { DataType::Float16 } else { DataType::Float } as i32;
    let mut inits = vec![init("layer.weight", &[H, H], &w1, format)];
    let mut nodes = vec![];
    match tie {
        Tie::Transpose | Tie::Identity => {
            inits.push(init("embed.weight", &[V, H], &e, format));
            let table = if tie == Tie::Identity {
                nodes.push(node("Identity", "/embed_tokens/Identity", &["embed.weight"], &["embed_id"], vec![]));
                "embed_id"
            } else {
                "embed.weight"
            };
            nodes.push(node("Gather", "/embed_tokens/Gather", &[table, "ids"], &["h"], vec![]));
            nodes.push(node(
                "Transpose",
                "/lm_head/Transpose",
                &["embed.weight"],
                &["embed_t"],
                vec![attr_ints("perm", &[1, 0])],
            ));
            let head_w = if tie == Tie::Identity {
                nodes.push(node("Identity", "/lm_head/Identity", &["embed_t"], &["embed_t_id"], vec![]));
                "embed_t_id"
            } else {
                "embed_t"
            };
            nodes.push(node("MatMul", "/layers.0/mlp/MatMul", &["h", "layer.weight"], &["h1"], vec![]));
            nodes.push(node("MatMul", "/lm_head/MatMul", &["h1", head_w], &["logits"], vec![]));
        }
        Tie::Builder => {
            inits.push(init("lm_head.weight", &[H, V], &transpose(&e, V, H), format));
            nodes.push(node(
                "Transpose",
                "/model/embed_tokens/Transpose",
                &["lm_head.weight"],
                &["embed"],
                vec![attr_ints("perm", &[1, 0])],
            ));
            nodes.push(node("Gather", "/model/embed_tokens/Gather", &["embed", "ids"], &["h"], vec![]));
            nodes.push(node("MatMul", "/layers.0/mlp/MatMul", &["h", "layer.weight"], &["h1"], vec![]));
            nodes.push(node("MatMul", "/lm_head/MatMul", &["h1", "lm_head.weight"], &["logits"], vec![]));
        }
    }
    let g = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![io("ids", DataType::Int64 as i32, &[Some(1), None])],
        output: vec![io("h", elem, &[Some(1), None, Some(H)]), io("logits", elem, &[Some(1), None, Some(V)])],
        name: Some("tied".into()),
        ..Default::default()
    };
    model(g, 17)
}

/// `dq(q(w))` of the scalar reference: blocks of `BLOCK` along `axis`, `bits`.
fn dq_ref(format: FloatFormat, bits: Bits, w: &[f32], shape: [usize; 2], axis: usize, zp: bool) -> Vec<f32> {
    let s = reference::find_scales(format, bits, w, shape, BLOCK, axis, 1.0, zp);
    let q = reference::rtn(format, bits, w, shape, &s, BLOCK, axis);
    reference::dq_tensor(format, &q, shape, &s, BLOCK, axis)
}

fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for kk in 0..k {
            let x = a[i * k + kk];
            for j in 0..n {
                out[i * n + j] += x * b[kk * n + j];
            }
        }
    }
    out
}

/// `h` and `logits` of the model with the reference's dequantized weights (the table blocked along
/// its hidden axis as the head's K, the layer along K) and, with `quantized` false, of the float one.
fn expected(ids: &[i64], format: FloatFormat, head_bits: Bits, zp: bool, quantized: bool) -> HashMap<String, Vec<f32>> {
    let (e, w1) = weights();
    let round = |v: &[f32]| -> Vec<f32> {
        match format {
            FloatFormat::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            _ => v.to_vec(),
        }
    };
    let (e, w1) = if quantized {
        (dq_ref(format, head_bits, &e, [V, H], 1, zp), dq_ref(format, Bits::Four, &w1, [H, H], 0, zp))
    } else {
        (round(&e), round(&w1))
    };
    let h: Vec<f32> = ids.iter().flat_map(|&i| e[i as usize * H..][..H].to_vec()).collect();
    let h1 = matmul(&h, &w1, ids.len(), H, H);
    let logits = matmul(&h1, &transpose(&e, V, H), ids.len(), H, V);
    HashMap::from([("h".to_string(), h), ("logits".to_string(), logits)])
}

fn run_modes(path: &Path, ids: &[i64]) -> Vec<(&'static str, HashMap<String, Vec<f32>>)> {
    let env = nibble_driver::runtime::environment(None).unwrap();
    let mut out = vec![];
    for (mode, no_opt) in [("default", false), ("no optimization", true)] {
        let mut b = ort::session::Session::builder(env).unwrap();
        if no_opt {
            b = b.with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable).unwrap();
        }
        let mut s = b
            .commit_from_file(path)
            .unwrap_or_else(|e| panic!("ONNX Runtime ({mode}) refuses {}: {e}", path.display()));
        let input = Input { name: "ids".into(), shape: vec![1, ids.len()], data: InputData::I64(ids.to_vec()) };
        let res = nibble_driver::runtime::run(&mut s, &[input]).unwrap_or_else(|e| panic!("{mode}: {e}"));
        out.push((mode, res.into_iter().map(|t| (t.name, t.data)).collect()));
    }
    out
}

/// Relative L2 error `||a - b|| / ||b||`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// The initializers of the main graph: `(name, data type, bytes)`.
fn initializers(path: &Path) -> Vec<(String, i32, usize)> {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .map(|t| (t.name.clone().unwrap_or_default(), t.data_type.unwrap_or(0), m.tensor_bytes(t).unwrap().len()))
        .collect()
}

fn quantize(src: &Path, out: &Path, form: &str, head_bits: Bits, zp: bool) -> String {
    let bits = head_bits.count().to_string();
    let mut args = vec![
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--no-default-exclude",
        "--block-size",
        "32",
        "--format",
        form,
        "--head-bits",
        &bits,
        // Exact comparison with the dequantized reference: fp32 activations (the CLI's default is 4).
        "--accuracy-level",
        "0",
    ];
    if zp {
        args.push("--zero-point");
    }
    let o = nibble(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "nibble {args:?}: {err}");
    err
}

#[test]
fn tied_heads_share_one_quantized_copy_and_run() {
    let d = tmp();
    let ids: Vec<i64> = (0..S as i64).map(|i| (i * 37 + 5) % V as i64).collect();
    let mut cases = vec![];
    for tie in [Tie::Transpose, Tie::Identity, Tie::Builder] {
        for format in [FloatFormat::F32, FloatFormat::F16] {
            for form in ["matmulnbits", "dq"] {
                for bits in [Bits::Four, Bits::Eight] {
                    cases.push((tie, format, form, bits, false));
                }
            }
        }
    }
    cases.push((Tie::Builder, FloatFormat::F32, "matmulnbits", Bits::Four, true));
    cases.push((Tie::Transpose, FloatFormat::F32, "matmulnbits", Bits::Eight, true));
    cases.push((Tie::Transpose, FloatFormat::F32, "dq", Bits::Four, true));
    for (tie, format, form, bits, zp) in cases {
        let case = format!("{tie:?} {format:?} {form} head bits {} zp {zp}", bits.count());
        let src = write(tied_model(tie, format), &d.path().join("m.onnx"), ExternalData::Never);
        let out = d.path().join("q.onnx");
        let notes = quantize(&src, &out, form, bits, zp);
        assert!(notes.contains("tied embedding: Gather"), "{case}: {notes}");
        // One copy of the head's codes, no float table.
        let inits = initializers(&out);
        let float = |t: i32| t == DataType::Float as i32 || t == DataType::Float16 as i32;
        let float_tables: Vec<_> = inits.iter().filter(|(_, t, b)| float(*t) && *b >= V * H * 2).collect();
        assert!(float_tables.is_empty(), "{case}: float copies {float_tables:?}");
        let code_bytes = V * H * bits.count() as usize / 8;
        let codes: Vec<_> = inits.iter().filter(|(_, t, b)| !float(*t) && *b == code_bytes).collect();
        assert_eq!(codes.len(), 1, "{case}: head codes {codes:?} in {inits:?}");
        let m = Model::load(&out).unwrap();
        let ops: Vec<&str> =
            m.proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_deref().unwrap()).collect();
        if form == "matmulnbits" {
            assert!(ops.contains(&"GatherBlockQuantized") && !ops.contains(&"Gather"), "{case}: {ops:?}");
        }
        // Logits and embeddings: the reference's dequantized weights.
        let want = expected(&ids, format, bits, zp, true);
        let float_out = expected(&ids, format, bits, zp, false);
        for (mode, got) in run_modes(&out, &ids) {
            for name in ["h", "logits"] {
                let err = rel(&got[name], &want[name]);
                let vs_float = rel(&got[name], &float_out[name]);
                // Default sessions may run the DQ form with int8 activations; f16 rounds (logits sum 64
                // products in f16).
                let tol = match (mode, format) {
                    ("default", _) => 2e-2,
                    (_, FloatFormat::F16) => 1.5e-2,
                    _ => 1e-5,
                };
                assert!(err < tol, "{case} {mode} {name}: error {err} vs the reference (vs float {vs_float})");
                if mode == "no optimization" && bits == Bits::Four {
                    assert!(err * 10.0 < vs_float, "{case} {name}: {err} vs reference, {vs_float} vs float");
                }
            }
        }
    }
}

/// The head left float (the default exclude): the Gather keeps the float table, and `--head-bits 8`
/// says it has nothing to do.
#[test]
fn excluded_head_keeps_the_table_and_head_bits_says_so() {
    let d = tmp();
    let src = write(tied_model(Tie::Builder, FloatFormat::F32), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--format",
        "matmulnbits",
        "--block-size",
        "32",
        "--head-bits",
        "8",
        "--gather-axis",
        "0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--head-bits 8: no LM head is quantized"), "{err}");
    assert!(err.contains("--gather-axis does not apply"), "{err}");
    let inits = initializers(&out);
    assert!(inits.iter().any(|(n, t, _)| n == "lm_head.weight" && *t == DataType::Float as i32), "{inits:?}");
    let bad = nibble(&["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force", "--head-bits", "6"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// How the embedding Gather of [`disagreeing_model`] reads the head's table `E [V, H]`.
#[derive(Clone, Copy, Debug)]
enum Disagree {
    /// `Gather(Transpose(E))`: rows of the head's `[K, N] = [H, V]` weight.
    KnRows,
    /// `Gather(Reshape(E, [2V, H/2]))`: another shape than the table.
    Reshape,
}

/// A head `MatMul(Gather(P, ids), Transpose(E))` whose table `E` an embedding Gather reads in
/// another shape than the head's `[N, K]` ([`Disagree`]); outputs `g` (the Gather's) and `logits`.
fn disagreeing_model(how: Disagree) -> ModelProto {
    let (e, _) = weights();
    let p = Rng::new(8).normals(V * H, 0.5);
    let inits = vec![
        init("embed.weight", &[V, H], &e, FloatFormat::F32),
        init("pos.weight", &[V, H], &p, FloatFormat::F32),
        nibble_driver::graph::build::init_i64("half_shape", &[2], &[2 * V as i64, H as i64 / 2]),
    ];
    let t =
        |from: &str, to: &str, name: &str| node("Transpose", name, &[from], &[to], vec![attr_ints("perm", &[1, 0])]);
    let mut nodes = vec![
        node("Gather", "/pos/Gather", &["pos.weight", "ids"], &["h0"], vec![]),
        t("embed.weight", "embed_t", "/lm_head/Transpose"),
        node("MatMul", "/lm_head/MatMul", &["h0", "embed_t"], &["logits"], vec![]),
    ];
    let g_width = match how {
        Disagree::KnRows => {
            nodes.push(node("Gather", "/embed/Gather", &["embed_t", "ids"], &["g"], vec![]));
            V
        }
        Disagree::Reshape => {
            nodes.push(node("Reshape", "/embed/Reshape", &["embed.weight", "half_shape"], &["embed_r"], vec![]));
            nodes.push(node("Gather", "/embed/Gather", &["embed_r", "ids"], &["g"], vec![]));
            H / 2
        }
    };
    let f = DataType::Float as i32;
    let g = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![io("ids", DataType::Int64 as i32, &[Some(1), None])],
        output: vec![io("g", f, &[Some(1), None, Some(g_width)]), io("logits", f, &[Some(1), None, Some(V)])],
        name: Some("disagree".into()),
        ..Default::default()
    };
    model(g, 17)
}

/// Issue 22's bad input: a tied head whose two readers disagree on shape (the Gather reads the
/// table as the head's `[K, N]`, or through a Reshape). The head is quantized, the Gather keeps
/// the float table and stderr says why; the Gather's output is the float rows and the logits are
/// quantized ones, in ONNX Runtime with default session options and with optimizations disabled.
#[test]
fn readers_disagreeing_on_shape_keep_the_float_table_with_the_reason() {
    let d = tmp();
    let ids: Vec<i64> = (0..S as i64).map(|i| (i * 29 + 3) % H as i64).collect();
    for how in [Disagree::KnRows, Disagree::Reshape] {
        let src = write(disagreeing_model(how), &d.path().join("m.onnx"), ExternalData::Never);
        let float = run_modes(&src, &ids).remove(1).1;
        for form in ["matmulnbits", "dq"] {
            let case = format!("{how:?} {form}");
            let out = d.path().join("q.onnx");
            let notes = quantize(&src, &out, form, Bits::Four, false);
            let why = match how {
                Disagree::KnRows => "it gathers rows of the head's [K, N] = [64, 96] weight, not of [N, K]",
                Disagree::Reshape => "it reads the table through a Cast or Reshape",
            };
            assert!(notes.contains("keeps the float table 'embed.weight'") && notes.contains(why), "{case}: {notes}");
            assert!(notes.contains("/embed/Gather"), "{case}: {notes}");
            assert!(!notes.contains("tied embedding: Gather"), "{case}: {notes}");
            let inits = initializers(&out);
            assert!(
                inits.iter().any(|(n, t, _)| n == "embed.weight" && *t == DataType::Float as i32),
                "{case}: the float table is gone: {inits:?}"
            );
            let ops: Vec<String> = Model::load(&out)
                .unwrap()
                .proto
                .graph
                .unwrap()
                .node
                .iter()
                .map(|n| n.op_type.clone().unwrap())
                .collect();
            let head_op = if form == "matmulnbits" { "MatMulNBits" } else { "DequantizeLinear" };
            assert!(
                ops.iter().any(|o| o == head_op) && !ops.iter().any(|o| o == "GatherBlockQuantized"),
                "{case}: {ops:?}"
            );
            for (mode, got) in run_modes(&out, &ids) {
                assert_eq!(got["g"], float["g"], "{case} {mode}: the Gather must read the float table");
                let e = rel(&got["logits"], &float["logits"]);
                assert!(e > 1e-4 && e < 0.2, "{case} {mode}: logits error {e} (the head must be quantized)");
            }
        }
    }
}
