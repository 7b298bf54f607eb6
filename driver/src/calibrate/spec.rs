//! A model's graph inputs as calibration sees them ([`InputSpec`]: name, element type, fixed and
//! symbolic dimensions), and the vocabulary a token-id input indexes. Read by the feed plan
//! (`feed.rs`) and by the calibration inputs (`inputs.rs`).

use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, tensor_shape_proto::dimension::Value, type_proto, ValueInfoProto};

/// `[batch_size, 3, past_sequence_length, 64]`.
pub fn shape_text(s: &InputSpec) -> String {
    let d: Vec<String> = s
        .dims
        .iter()
        .zip(&s.symbols)
        .map(|(d, n)| match (d, n) {
            (Some(v), _) => v.to_string(),
            (None, Some(n)) => n.clone(),
            (None, None) => "?".into(),
        })
        .collect();
    format!(" [{}]", d.join(", "))
}

/// A model input: name, element type, dims (`None` = symbolic).
#[derive(Clone, Debug)]
pub struct InputSpec {
    /// Name.
    pub name: String,
    /// ONNX element type.
    pub elem_type: i32,
    /// Dimensions.
    pub dims: Vec<Option<usize>>,
    /// Names of the symbolic dimensions (`None` for fixed or unnamed ones).
    pub symbols: Vec<Option<String>>,
}

/// The graph inputs that are not initializers.
pub fn input_specs(model: &Model) -> Result<Vec<InputSpec>> {
    let g = model.proto.graph.as_ref().expect("graph");
    let inits: std::collections::HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    g.input.iter().filter(|v| !inits.contains(v.name.as_deref().unwrap_or(""))).map(spec).collect()
}

fn spec(vi: &ValueInfoProto) -> Result<InputSpec> {
    let name = vi.name.clone().unwrap_or_default();
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Error::Usage(format!("model input '{name}' is not a tensor; calibration needs tensor inputs")));
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim.iter().map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
        })
        .map(|d| d.collect())
        .unwrap_or_default();
    let symbols = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimParam(p)) if !p.is_empty() => Some(p.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // A bfloat16 input is fed as float32: calibration runs the model's float32 twin (crate::twin).
    let elem_type = match t.elem_type.unwrap_or(0) {
        e if e == DataType::Bfloat16 as i32 => DataType::Float as i32,
        e => e,
    };
    Ok(InputSpec { name, elem_type, dims, symbols })
}

/// Rows of the embedding table that `input` indexes through a Gather, if any. The table may be an
/// initializer or reached through Identity/Cast/Transpose of one (a tied embedding read as
/// `Gather(Transpose(lm_head weight))`, as onnxruntime-genai's builder writes it).
pub fn vocabulary(model: &Model, input: &str) -> Option<usize> {
    let g = model.proto.graph.as_ref()?;
    let node = g
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("Gather") && n.input.get(1).map(String::as_str) == Some(input))?;
    let mut name = node.input.first()?.clone();
    let mut transposed = false;
    for _ in 0..4 {
        if let Some(table) = g.initializer.iter().find(|t| t.name.as_deref() == Some(name.as_str())) {
            let axis = if transposed { 1 } else { 0 };
            return table.dims.get(axis).map(|&d| d as usize);
        }
        let producer = g.node.iter().find(|n| n.output.contains(&name))?;
        match producer.op_type.as_deref() {
            Some("Identity" | "Cast") => {}
            Some("Transpose") if producer.attribute.iter().all(|a| a.ints.is_empty() || a.ints == [1, 0]) => {
                transposed = !transposed;
            }
            _ => return None,
        }
        name = producer.input.first()?.clone();
    }
    None
}
