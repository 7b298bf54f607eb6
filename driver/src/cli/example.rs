//! `nibble example`: a synthetic transformer-like decoder (LayerNorm, q/k/v projections sharing one
//! activation, attention, SiLU MLP, `/lm_head`) with seeded random weights, for the example in the
//! README, the tests and the benchmarks. Built with the [`crate::graph::build`] builders.

use crate::graph::build::{attr_f, attr_i, attr_ints, init, io, model, node};
use crate::graph::floats::onnx_type;
use crate::graph::onnx::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::rng::Rng;
use nibble::FloatFormat;

/// Shape of the synthetic transformer.
#[derive(Clone, Debug)]
pub struct TransformerConfig {
    /// Hidden size.
    pub hidden: usize,
    /// MLP size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Output size of `/lm_head`.
    pub vocab: usize,
    /// Weight format (inputs and outputs stay f32; f16/bf16 models cast at the edges).
    pub format: FloatFormat,
    /// Default-domain opset (>= 17 for LayerNormalization).
    pub opset: i64,
    /// Weight seed.
    pub seed: u64,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            hidden: 256,
            intermediate: 704,
            layers: 4,
            vocab: 1000,
            format: FloatFormat::F32,
            opset: 17,
            seed: 1,
        }
    }
}

impl TransformerConfig {
    /// Parameters in the MatMul weights.
    pub fn parameters(&self) -> usize {
        let (h, m) = (self.hidden, self.intermediate);
        self.layers * (4 * h * h + 2 * h * m) + h * self.vocab
    }
}

/// The transformer-like model: input `input` f32 `[batch, seq, hidden]`, output `logits` f32
/// `[batch, seq, vocab]`.
pub fn transformer(cfg: &TransformerConfig) -> ModelProto {
    let mut rng = Rng::new(cfg.seed);
    let (h, m, f) = (cfg.hidden, cfg.intermediate, cfg.format);
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let mut x = "input".to_string();
    if f != FloatFormat::F32 {
        nodes.push(node(
            "Cast",
            "/model/input_cast",
            &["input"],
            &["input_cast"],
            vec![attr_i("to", onnx_type(f) as i64)],
        ));
        x = "input_cast".into();
    }
    let ones = vec![1.0f32; h];
    let zeros = vec![0.0f32; h];
    let ln = |nodes: &mut Vec<NodeProto>, inits: &mut Vec<TensorProto>, name: &str, x: &str, out: &str| {
        inits.push(init(&format!("{name}.weight"), &[h], &ones, f));
        inits.push(init(&format!("{name}.bias"), &[h], &zeros, f));
        let p = format!("/model/{name}/LayerNormalization");
        nodes.push(node(
            "LayerNormalization",
            &p,
            &[x, &format!("{name}.weight"), &format!("{name}.bias")],
            &[out],
            vec![attr_i("axis", -1), attr_f("epsilon", 1e-5)],
        ));
    };
    let mut linear = |nodes: &mut Vec<NodeProto>,
                      inits: &mut Vec<TensorProto>,
                      path: &str,
                      w: &str,
                      x: &str,
                      out: &str,
                      k: usize,
                      n: usize| {
        inits.push(init(w, &[k, n], &rng.normals(k * n, 1.0 / (k as f32).sqrt()), f));
        nodes.push(node("MatMul", &format!("{path}/MatMul"), &[x, w], &[out], vec![]));
    };
    for l in 0..cfg.layers {
        let p = format!("/model/layers.{l}");
        let w = format!("model.layers.{l}");
        let t = |s: &str| format!("{p}/{s}");
        ln(&mut nodes, &mut inits, &format!("layers.{l}.input_layernorm"), &x, &t("ln1"));
        for proj in ["q", "k", "v"] {
            linear(
                &mut nodes,
                &mut inits,
                &t(&format!("attn/{proj}_proj")),
                &format!("{w}.attn.{proj}_proj.weight"),
                &t("ln1"),
                &t(proj),
                h,
                h,
            );
        }
        nodes.push(node(
            "Transpose",
            &t("attn/Transpose"),
            &[&t("k")],
            &[&t("kt")],
            vec![attr_ints("perm", &[0, 2, 1])],
        ));
        nodes.push(node("MatMul", &t("attn/scores/MatMul"), &[&t("q"), &t("kt")], &[&t("scores")], vec![]));
        inits.push(init(&format!("{w}.attn.scale"), &[], &[1.0 / (h as f32).sqrt()], f));
        nodes.push(node("Mul", &t("attn/Mul"), &[&t("scores"), &format!("{w}.attn.scale")], &[&t("scaled")], vec![]));
        nodes.push(node("Softmax", &t("attn/Softmax"), &[&t("scaled")], &[&t("probs")], vec![attr_i("axis", -1)]));
        nodes.push(node("MatMul", &t("attn/context/MatMul"), &[&t("probs"), &t("v")], &[&t("ctx")], vec![]));
        linear(&mut nodes, &mut inits, &t("attn/o_proj"), &format!("{w}.attn.o_proj.weight"), &t("ctx"), &t("o"), h, h);
        nodes.push(node("Add", &t("attn/residual/Add"), &[&x, &t("o")], &[&t("x2")], vec![]));
        ln(&mut nodes, &mut inits, &format!("layers.{l}.post_attention_layernorm"), &t("x2"), &t("ln2"));
        linear(
            &mut nodes,
            &mut inits,
            &t("mlp/up_proj"),
            &format!("{w}.mlp.up_proj.weight"),
            &t("ln2"),
            &t("up"),
            h,
            m,
        );
        nodes.push(node("Sigmoid", &t("mlp/Sigmoid"), &[&t("up")], &[&t("gate")], vec![]));
        nodes.push(node("Mul", &t("mlp/Mul"), &[&t("up"), &t("gate")], &[&t("act")], vec![]));
        linear(
            &mut nodes,
            &mut inits,
            &t("mlp/down_proj"),
            &format!("{w}.mlp.down_proj.weight"),
            &t("act"),
            &t("down"),
            m,
            h,
        );
        nodes.push(node("Add", &t("mlp/residual/Add"), &[&t("x2"), &t("down")], &[&t("x3")], vec![]));
        x = t("x3");
    }
    ln(&mut nodes, &mut inits, "norm", &x, "final_norm");
    let logits = if f == FloatFormat::F32 { "logits" } else { "logits_narrow" };
    linear(&mut nodes, &mut inits, "/lm_head", "lm_head.weight", "final_norm", logits, h, cfg.vocab);
    if f != FloatFormat::F32 {
        nodes.push(node(
            "Cast",
            "/model/output_cast",
            &["logits_narrow"],
            &["logits"],
            vec![attr_i("to", DataType::Float as i64)],
        ));
    }
    let graph = GraphProto {
        name: Some("nibble_synthetic_transformer".into()),
        node: nodes,
        initializer: inits,
        input: vec![io("input", DataType::Float as i32, &[None, None, Some(h)])],
        output: vec![io("logits", DataType::Float as i32, &[None, None, Some(cfg.vocab)])],
        ..Default::default()
    };
    model(graph, cfg.opset)
}
