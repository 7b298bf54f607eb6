//! Builders for ONNX graph pieces: nodes, initializers, attributes, value infos, models, and fresh
//! (unused) tensor names. Every part of nibble that adds to a graph builds with these.

use super::floats::{encode_floats, onnx_type};
use super::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use bytes::Bytes;
use nibble::FloatFormat;
use std::collections::HashSet;

/// An initializer of `values` stored as `format`.
pub fn init(name: &str, dims: &[usize], values: &[f32], format: FloatFormat) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(onnx_type(format)),
        raw_data: Some(Bytes::from(encode_floats(format, values))),
        ..Default::default()
    }
}

/// An int64 initializer.
pub fn init_i64(name: &str, dims: &[usize], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

/// A node.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A tensor graph input/output; a `None` dim is symbolic.
pub fn io(name: &str, elem: i32, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam(format!("d{i}")),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A dimension of [`io_named`]: a number or a symbolic name.
#[derive(Clone, Copy, Debug)]
pub enum Dim<'a> {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic dimension (`batch_size`, `past_sequence_length`, ...).
    Named(&'a str),
}

/// A tensor graph input/output with named symbolic dims.
pub fn io_named(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    let mut vi = io(
        name,
        elem,
        &dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => Some(*v),
                Dim::Named(_) => None,
            })
            .collect::<Vec<_>>(),
    );
    if let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        for (slot, d) in t.shape.as_mut().expect("shape").dim.iter_mut().zip(dims) {
            if let Dim::Named(n) = d {
                slot.value = Some(tensor_shape_proto::dimension::Value::DimParam(n.to_string()));
            }
        }
    }
    vi
}

/// A model around a graph, with a default-domain opset.
pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(if opset >= 21 { 10 } else { 8 }),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        producer_name: Some("nibble-synth".into()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// An initializer holding `raw` bytes of ONNX type `dtype`.
pub fn tensor(name: String, dims: Vec<i64>, dtype: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name),
        dims,
        data_type: Some(dtype),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

/// The value info of a tensor of ONNX type `elem_type` with fixed `dims`.
pub fn value_info(name: String, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let dims: Vec<Option<usize>> = dims.iter().map(|&d| Some(d as usize)).collect();
    io(&name, elem_type, &dims)
}

/// A `Constant` node named `OUTPUT_Constant` holding an int64 tensor.
pub fn constant_i64(output: &str, dims: &[i64], values: &[i64]) -> NodeProto {
    let t = TensorProto {
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())),
        ..Default::default()
    };
    NodeProto {
        op_type: Some("Constant".into()),
        name: Some(format!("{output}_Constant")),
        output: vec![output.to_string()],
        attribute: vec![AttributeProto {
            name: Some("value".into()),
            t: Some(t),
            r#type: Some(AttributeType::Tensor as i32),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Names already used in a graph, so that added tensors never collide.
pub struct Names(HashSet<String>);

impl Names {
    /// Every tensor name the nodes read or write, plus `extra`.
    pub fn of(nodes: &[NodeProto], extra: impl Iterator<Item = String>) -> Names {
        let mut s: HashSet<String> = extra.collect();
        for n in nodes {
            s.extend(n.input.iter().cloned());
            s.extend(n.output.iter().cloned());
        }
        Names(s)
    }

    /// `base` if unused, else `base_1`, `base_2`, ...; the result is marked used.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// Every name of a model (node names and tensor names, in the main graph and every If/Loop/Scan
/// body), so that what nibble adds never collides with anything, in any scope. Names are handed
/// out as asked when free (ModelOpt's and ONNX Runtime's names), else with `_1`, `_2`, ... appended.
pub struct ModelNames {
    nodes: HashSet<String>,
    tensors: HashSet<String>,
}

impl ModelNames {
    /// Every tensor name used in `root` and its bodies.
    pub fn tensors_of(root: &GraphProto) -> HashSet<String> {
        Self::of(root).tensors
    }

    /// The names used in `root` and its bodies.
    pub fn of(root: &GraphProto) -> ModelNames {
        fn walk(g: &GraphProto, nodes: &mut HashSet<String>, tensors: &mut HashSet<String>) {
            tensors.extend(g.input.iter().chain(&g.output).chain(&g.value_info).filter_map(|v| v.name.clone()));
            tensors.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
            tensors.extend(g.sparse_initializer.iter().filter_map(|s| s.values.as_ref().and_then(|v| v.name.clone())));
            for n in &g.node {
                nodes.extend(n.name.clone().filter(|s| !s.is_empty()));
                tensors.extend(n.input.iter().chain(&n.output).filter(|s| !s.is_empty()).cloned());
                for a in &n.attribute {
                    for s in a.g.iter().chain(&a.graphs) {
                        walk(s, nodes, tensors);
                    }
                }
            }
        }
        let (mut nodes, mut tensors) = (HashSet::new(), HashSet::new());
        walk(root, &mut nodes, &mut tensors);
        ModelNames { nodes, tensors }
    }

    fn fresh_in(set: &mut HashSet<String>, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while set.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        set.insert(name.clone());
        name
    }

    /// A tensor name: `base` if unused anywhere in the model, else `base_1`, `base_2`, ...
    pub fn tensor(&mut self, base: &str) -> String {
        Self::fresh_in(&mut self.tensors, base)
    }

    /// A node name: `base` if no node of the model has it, else `base_1`, `base_2`, ...
    pub fn node(&mut self, base: &str) -> String {
        Self::fresh_in(&mut self.nodes, base)
    }
}
