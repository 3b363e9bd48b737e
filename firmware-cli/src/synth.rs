//! A generated MLP family (base + fine-tuned) whose weights dominate memory, for benchmarks.

use prost::Message;
use tract_onnx::pb::{
    attribute_proto, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// splitmix64: a small deterministic generator for weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn tensor(
    name: &str,
    dims: &[i64],
    rng: &mut Rng,
    scale: f32,
    fine: Option<&mut Rng>,
) -> TensorProto {
    let n: i64 = dims.iter().product();
    let mut raw = Vec::with_capacity(n as usize * 4);
    let mut fine = fine;
    for _ in 0..n {
        let mut w = rng.unit() * scale;
        if let Some(f) = fine.as_deref_mut() {
            w += f.unit() * scale * 0.05;
        }
        raw.extend_from_slice(&w.to_le_bytes());
    }
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: raw,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// An MLP over the species input (1x3x32x32 -> hidden -> hidden -> 10), ONNX opset 13.
/// `fine_seed` perturbs every weight by up to 5 % (a stand-in for a fine-tune).
pub(crate) fn mlp(hidden: i64, fine_seed: Option<u64>) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut fine = fine_seed.map(Rng);
    let input = 3 * 32 * 32;
    let layers = [(hidden, input), (hidden, hidden), (10, hidden)];
    let mut initializer = Vec::new();
    let mut nodes = vec![node("Flatten", &["input"], "x0", vec![int_attr("axis", 1)])];
    let mut x = "x0".to_string();
    for (k, &(out, inp)) in layers.iter().enumerate() {
        let scale = 1.0 / (inp as f32).sqrt();
        let (w, b) = (format!("fc{k}.weight"), format!("fc{k}.bias"));
        initializer.push(tensor(&w, &[out, inp], &mut rng, scale, fine.as_mut()));
        initializer.push(tensor(&b, &[out], &mut rng, scale, fine.as_mut()));
        let y = if k + 1 == layers.len() {
            "logits".to_string()
        } else {
            format!("h{k}")
        };
        nodes.push(node("Gemm", &[&x, &w, &b], &y, vec![int_attr("transB", 1)]));
        if k + 1 < layers.len() {
            let r = format!("r{k}");
            nodes.push(node("Relu", &[&y], &r, vec![]));
            x = r;
        }
    }
    let graph = GraphProto {
        name: "mlp".into(),
        node: nodes,
        initializer,
        input: vec![value_info("input", &[1, 3, 32, 32])],
        output: vec![value_info("logits", &[1, 10])],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "bitdelta bench".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
