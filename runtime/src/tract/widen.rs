//! f16 models run in f32.
//!
//! tract 0.23.9 cannot build some all-f16 exports (its `Gemm` expansion multiplies the f16
//! bias by an f32 `beta`, so the node comes out f32 and the typed model is refused: "Output
//! mismatch after rewiring expansion"), and on CPUs without half-float arithmetic its f16
//! kernels round every intermediate sum. onnxruntime's CPU provider computes such models in
//! f32 and rounds only where the graph says so. The engine does the same: before tract sees the
//! graph, every f16 tensor type becomes f32 (initializers, constants, graph inputs, outputs and
//! value infos), while each weight keeps its f16 value (widened exactly) and each explicit
//! `Cast` to f16 keeps its rounding (a `Cast` to f16 followed by a `Cast` back to f32). Frames
//! are rounded to f16 before they are fed ([`super::InputType::F16`]) and the outputs of an f16
//! output are rounded to f16, so answers are those of the f16 model computed in f32.
//!
//! The cost is memory: the running model holds its f16 weights as f32 (twice their size on
//! flash). Switching is unchanged: weights are located and rewritten as f32 constants, each
//! reconstructed value rounded to f16 first, as the applied ONNX stores it.

use std::format;
use std::vec::Vec;

use half::f16;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{type_proto, GraphProto, ModelProto, TensorProto, ValueInfoProto};

const F16: i32 = DataType::Float16 as i32;
const F32: i32 = DataType::Float as i32;

/// What [`widen_f16`] found in the graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Widened {
    /// The graph's first output was f16: its values are rounded to f16.
    pub output: bool,
}

/// Rewrites every f16 tensor type of `proto` to f32 (see the module docs). Returns `None` when
/// the graph has nothing in f16 (and is left as it was).
pub(crate) fn widen_f16(proto: &mut ModelProto) -> Option<Widened> {
    let graph = proto.graph.as_mut()?;
    if !has_f16(graph) {
        return None;
    }
    let output = graph
        .output
        .first()
        .is_some_and(|v| elem_type(v) == Some(F16));
    widen_graph(graph);
    Some(Widened { output })
}

/// Rounds `v` to the nearest f16 (ties to even) and back.
pub(crate) fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t.elem_type),
    }
}

fn has_f16(g: &GraphProto) -> bool {
    g.initializer.iter().any(|t| t.data_type == F16)
        || g.input
            .iter()
            .chain(&g.output)
            .chain(&g.value_info)
            .any(|v| elem_type(v) == Some(F16))
        || g.node.iter().any(|n| {
            n.attribute.iter().any(|a| {
                (n.op_type == "Cast" && a.name == "to" && a.i == i64::from(F16))
                    || a.t.as_ref().is_some_and(|t| t.data_type == F16)
                    || a.tensors.iter().any(|t| t.data_type == F16)
                    || a.g.as_ref().is_some_and(has_f16)
                    || a.graphs.iter().any(has_f16)
            })
        })
}

fn widen_graph(g: &mut GraphProto) {
    g.initializer.iter_mut().for_each(widen_tensor);
    for v in g
        .input
        .iter_mut()
        .chain(&mut g.output)
        .chain(&mut g.value_info)
    {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if t.elem_type == F16 {
                t.elem_type = F32;
            }
        }
    }
    let mut nodes = Vec::with_capacity(g.node.len());
    for mut n in std::mem::take(&mut g.node) {
        for a in &mut n.attribute {
            if let Some(t) = a.t.as_mut() {
                widen_tensor(t);
            }
            a.tensors.iter_mut().for_each(widen_tensor);
            if let Some(sub) = a.g.as_mut() {
                widen_graph(sub);
            }
            a.graphs.iter_mut().for_each(widen_graph);
        }
        let to_f16 = n.op_type == "Cast"
            && n.attribute
                .iter()
                .any(|a| a.name == "to" && a.i == i64::from(F16));
        if to_f16 && n.output.len() == 1 {
            // y = Cast<f16>(x)  becomes  y.f16 = Cast<f16>(x); y = Cast<f32>(y.f16)
            let y = std::mem::take(&mut n.output[0]);
            let rounded = format!("{y}.bitdelta_f16");
            n.output[0] = rounded.clone();
            let mut back = n.clone();
            back.name = format!("{}.bitdelta_f32", n.name);
            back.input = vec![rounded];
            back.output = vec![y];
            for a in back.attribute.iter_mut().filter(|a| a.name == "to") {
                a.i = i64::from(F32);
            }
            nodes.push(n);
            nodes.push(back);
        } else {
            nodes.push(n);
        }
    }
    g.node = nodes;
}

/// An f16 tensor as f32 with the same values; external data (the engine's weights) only
/// changes type: the data resolver hands tract f32 bytes for it.
fn widen_tensor(t: &mut TensorProto) {
    if t.data_type != F16 {
        return;
    }
    t.data_type = F32;
    if !t.raw_data.is_empty() {
        let raw: Vec<u8> = t
            .raw_data
            .chunks_exact(2)
            .flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes())
            .collect();
        t.raw_data = raw;
    } else if !t.int32_data.is_empty() {
        // ONNX keeps non-raw f16 values as their bit patterns in int32_data.
        t.float_data = t
            .int32_data
            .iter()
            .map(|&b| f16::from_bits(b as u16).to_f32())
            .collect();
        t.int32_data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{AttributeProto, NodeProto};

    fn f16_tensor(name: &str, values: &[f32]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: F16,
            raw_data: values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            ..Default::default()
        }
    }

    fn cast(name: &str, x: &str, y: &str, to: i32) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: "Cast".into(),
            input: vec![x.into()],
            output: vec![y.into()],
            attribute: vec![AttributeProto {
                name: "to".into(),
                i: i64::from(to),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn f16_initializers_become_f32_with_the_same_values() {
        let mut t = f16_tensor("w", &[0.1, -2.5, 65504.0]);
        widen_tensor(&mut t);
        assert_eq!(t.data_type, F32);
        let got: Vec<f32> = t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want: Vec<f32> = [0.1f32, -2.5, 65504.0]
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(got, want);

        let mut bits = TensorProto {
            data_type: F16,
            int32_data: vec![i32::from(f16::from_f32(0.5).to_bits())],
            ..Default::default()
        };
        widen_tensor(&mut bits);
        assert_eq!((bits.float_data, bits.int32_data.len()), (vec![0.5], 0));
    }

    #[test]
    fn a_cast_to_f16_keeps_its_rounding() {
        let mut proto = ModelProto {
            graph: Some(GraphProto {
                node: vec![cast("c", "x", "y", F16)],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(widen_f16(&mut proto), Some(Widened { output: false }));
        let nodes = &proto.graph.unwrap().node;
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].output, ["y.bitdelta_f16"]);
        assert_eq!(nodes[0].attribute[0].i, i64::from(F16));
        assert_eq!(
            (nodes[1].input.as_slice(), nodes[1].output.as_slice()),
            (&["y.bitdelta_f16".to_string()][..], &["y".to_string()][..])
        );
        assert_eq!(nodes[1].attribute[0].i, i64::from(F32));
    }

    #[test]
    fn an_f32_graph_is_left_alone() {
        let graph = GraphProto {
            node: vec![cast("c", "x", "y", F32)],
            ..Default::default()
        };
        let mut proto = ModelProto {
            graph: Some(graph.clone()),
            ..Default::default()
        };
        assert_eq!(widen_f16(&mut proto), None);
        assert_eq!(proto.graph, Some(graph));
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-11 lies halfway between 1 and the next f16 (1 + 2^-10): ties go to 1.
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            round_f16(1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2.0 * 2f32.powi(-10)
        );
    }
}
