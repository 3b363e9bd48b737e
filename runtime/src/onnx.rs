//! ONNX weights, one tensor at a time, straight from the (memory-mapped) file bytes.
//!
//! The model is not decoded as a whole: the protobuf wire format is walked (with prost's
//! decoding primitives) to find each float initializer's name, dtype, shape and the byte range of
//! its little-endian data in the file. Reading a tensor is then a slice of the map, and writing a
//! variant is a copy of the base file with those byte ranges overwritten: everything else in the
//! model (graph, attributes, metadata) stays byte-identical.

use std::fmt;
use std::ops::Range;
use std::string::String;
use std::vec::Vec;

use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::format::DType;

/// ONNX `TensorProto.DataType.FLOAT`.
const ONNX_FLOAT: u64 = 1;
/// ONNX `TensorProto.DataType.FLOAT16`.
const ONNX_FLOAT16: u64 = 10;

/// A float initializer of an ONNX model (the weight table's one tensor type).
pub type Initializer = crate::weights::WeightTensor;

/// The float initializers of a model, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct OnnxWeights {
    /// Float initializers (f32, f16), in ascending byte order of their names.
    pub initializers: Vec<Initializer>,
    /// Number of initializers of other types (integers, strings), left untouched.
    pub other_initializers: usize,
}

/// Why an ONNX file could not be read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnnxError {
    /// The protobuf structure is broken at this byte offset.
    Malformed {
        /// Byte offset.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// The model has no graph.
    NoGraph,
    /// An initializer is stored in a way this build does not handle.
    Unsupported {
        /// Initializer name.
        name: String,
        /// How it is stored.
        what: &'static str,
    },
    /// Two initializers share a name.
    DuplicateName(String),
}

impl fmt::Display for OnnxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed { offset, what } => {
                write!(f, "not a valid ONNX model: {what} at byte {offset}")
            }
            Self::NoGraph => write!(f, "not a valid ONNX model: no graph"),
            Self::Unsupported { name, what } => {
                write!(f, "initializer {name:?}: {what} is not supported")
            }
            Self::DuplicateName(n) => write!(f, "initializer {n:?} appears twice"),
        }
    }
}

impl std::error::Error for OnnxError {}

/// One field of a protobuf message: number, wire type, and the value's byte range.
struct FieldRef {
    number: u32,
    wire: WireType,
    /// For varints, the decoded value.
    varint: u64,
    /// Byte range of the value (payload of a length-delimited field) within the walked slice.
    range: Range<usize>,
    /// Byte range of the whole field (key included) within the walked slice.
    span: Range<usize>,
}

/// Iterates the fields of one message `bytes`; `base` is its offset in the file, for errors.
fn fields(bytes: &[u8], base: usize) -> impl Iterator<Item = Result<FieldRef, OnnxError>> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let mut buf = &bytes[pos..];
        let before = buf.len();
        let at = base + pos;
        let bad = |what| OnnxError::Malformed { offset: at, what };
        let (number, wire) = match decode_key(&mut buf) {
            Ok(k) => k,
            Err(_) => {
                pos = bytes.len();
                return Some(Err(bad("bad field key")));
            }
        };
        let mut varint = 0;
        let header = before - buf.len();
        let len = match wire {
            WireType::Varint => match decode_varint(&mut buf) {
                Ok(v) => {
                    varint = v;
                    0
                }
                Err(_) => {
                    pos = bytes.len();
                    return Some(Err(bad("bad varint")));
                }
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => match decode_varint(&mut buf) {
                Ok(v) => match usize::try_from(v) {
                    Ok(v) => v,
                    Err(_) => {
                        pos = bytes.len();
                        return Some(Err(bad("length too large")));
                    }
                },
                Err(_) => {
                    pos = bytes.len();
                    return Some(Err(bad("bad length")));
                }
            },
            WireType::StartGroup | WireType::EndGroup => {
                pos = bytes.len();
                return Some(Err(bad("protobuf groups are not used by ONNX")));
            }
        };
        let start = pos + (before - buf.len());
        let value_start = if wire == WireType::Varint {
            pos + header
        } else {
            start
        };
        let end = match start.checked_add(len) {
            Some(e) if e <= bytes.len() => e,
            _ => {
                pos = bytes.len();
                return Some(Err(bad("field runs past the end")));
            }
        };
        let range = if wire == WireType::Varint {
            value_start..start
        } else {
            start..end
        };
        let span = pos..end;
        pos = end;
        Some(Ok(FieldRef {
            number,
            wire,
            varint,
            range,
            span,
        }))
    })
}

/// True for the `ModelProto.graph` field (number 7, a message).
fn is_graph(f: &FieldRef) -> bool {
    f.number == 7 && f.wire == WireType::LengthDelimited
}

/// The byte range of the main graph in the `ModelProto` `bytes` (the last `graph` field, if
/// there are several).
fn main_graph(bytes: &[u8]) -> Result<Range<usize>, OnnxError> {
    let mut graph = None;
    for f in fields(bytes, 0) {
        let f = f?;
        if is_graph(&f) {
            graph = Some(f.range);
        }
    }
    graph.ok_or(OnnxError::NoGraph)
}

/// Finds every float initializer of the main graph. Non-float initializers are counted and left
/// alone; subgraph initializers (inside `If`/`Loop` attributes) are not touched.
pub fn scan(bytes: &[u8]) -> Result<OnnxWeights, OnnxError> {
    let graph = main_graph(bytes)?;
    let mut out = OnnxWeights::default();
    for f in fields(&bytes[graph.clone()], graph.start) {
        let f = f?;
        if f.number == 5 && f.wire == WireType::LengthDelimited {
            let start = graph.start + f.range.start;
            match tensor(&bytes[start..graph.start + f.range.end], start)? {
                Some(init) => out.initializers.push(init),
                None => out.other_initializers += 1,
            }
        }
    }
    out.initializers
        .sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    for w in out.initializers.windows(2) {
        if w[0].name == w[1].name {
            return Err(OnnxError::DuplicateName(w[0].name.clone()));
        }
    }
    Ok(out)
}

/// The model without the data of its float initializers: each one (every entry of
/// `weights`, as [`scan`] found them in `bytes`) is marked as ONNX external data at location
/// `"."` with its index in `weights` as `offset`, so a loader's data resolver can produce its
/// values (e.g. base + delta) while the rest of the model decodes without copying any weight.
pub fn without_weights(bytes: &[u8], weights: &OnnxWeights) -> Result<Vec<u8>, OnnxError> {
    let index: std::collections::BTreeMap<usize, usize> = weights
        .initializers
        .iter()
        .enumerate()
        .map(|(i, init)| (init.data.start, i))
        .collect();
    let mut out = Vec::with_capacity(bytes.len() - weights.data_bytes().min(bytes.len()));
    for f in fields(bytes, 0) {
        let f = f?;
        if !is_graph(&f) {
            out.extend_from_slice(&bytes[f.span]);
            continue;
        }
        let graph = f.range;
        let mut g = Vec::new();
        for f in fields(&bytes[graph.clone()], graph.start) {
            let f = f?;
            let start = graph.start + f.range.start;
            let whole = graph.start + f.span.start..graph.start + f.span.end;
            let init = if f.number == 5 && f.wire == WireType::LengthDelimited {
                tensor(&bytes[start..graph.start + f.range.end], start)?
            } else {
                None
            };
            match init.and_then(|init| index.get(&init.data.start).copied()) {
                Some(i) => {
                    let t = external_tensor(&bytes[start..graph.start + f.range.end], start, i)?;
                    encode_key(5, WireType::LengthDelimited, &mut g);
                    encode_varint(t.len() as u64, &mut g);
                    g.extend_from_slice(&t);
                }
                None => g.extend_from_slice(&bytes[whole]),
            }
        }
        encode_key(7, WireType::LengthDelimited, &mut out);
        encode_varint(g.len() as u64, &mut out);
        out.extend_from_slice(&g);
    }
    Ok(out)
}

/// A `TensorProto` without `raw_data`/`float_data`, as external data `(".", offset = index)`.
fn external_tensor(bytes: &[u8], base: usize, index: usize) -> Result<Vec<u8>, OnnxError> {
    let mut t = Vec::new();
    for f in fields(bytes, base) {
        let f = f?;
        if !matches!(f.number, 4 | 9 | 13 | 14) {
            t.extend_from_slice(&bytes[f.span]);
        }
    }
    let index = index.to_string();
    for (key, value) in [("location", "."), ("offset", index.as_str())] {
        let mut e = Vec::new();
        for (n, v) in [(1, key), (2, value)] {
            encode_key(n, WireType::LengthDelimited, &mut e);
            encode_varint(v.len() as u64, &mut e);
            e.extend_from_slice(v.as_bytes());
        }
        encode_key(13, WireType::LengthDelimited, &mut t);
        encode_varint(e.len() as u64, &mut t);
        t.extend_from_slice(&e);
    }
    // data_location = EXTERNAL
    encode_key(14, WireType::Varint, &mut t);
    encode_varint(1, &mut t);
    Ok(t)
}

fn tensor(bytes: &[u8], base: usize) -> Result<Option<Initializer>, OnnxError> {
    let mut dims = Vec::new();
    let mut data_type = 0u64;
    let mut name = None;
    let mut raw = None;
    let mut float_data = None;
    let mut external = false;
    let mut other_data = false;
    for f in fields(bytes, base) {
        let f = f?;
        match (f.number, f.wire) {
            (1, WireType::Varint) => dims.push(f.varint),
            (1, WireType::LengthDelimited) => {
                let mut b = &bytes[f.range.clone()];
                while !b.is_empty() {
                    let d = decode_varint(&mut b).map_err(|_| OnnxError::Malformed {
                        offset: base + f.range.start,
                        what: "bad dims",
                    })?;
                    dims.push(d);
                }
            }
            (2, WireType::Varint) => data_type = f.varint,
            (4, WireType::LengthDelimited) => float_data = Some(f.range),
            (4, _) => other_data = true,
            (5..=7 | 10 | 11, _) => other_data = true,
            (8, WireType::LengthDelimited) => {
                let s = std::str::from_utf8(&bytes[f.range.clone()]).map_err(|_| {
                    OnnxError::Malformed {
                        offset: base + f.range.start,
                        what: "name is not UTF-8",
                    }
                })?;
                name = Some(s.to_owned());
            }
            (9, WireType::LengthDelimited) => raw = Some(f.range),
            (13, _) => external = true,
            (14, WireType::Varint) => external |= f.varint == 1,
            _ => {}
        }
    }
    let dtype = match data_type {
        ONNX_FLOAT => DType::F32,
        ONNX_FLOAT16 => DType::F16,
        _ => return Ok(None),
    };
    let name = name.unwrap_or_default();
    let unsupported = |what| {
        Err(OnnxError::Unsupported {
            name: name.clone(),
            what,
        })
    };
    if external {
        return unsupported("external data");
    }
    if dims.iter().any(|&d| d > i64::MAX as u64) {
        return unsupported("a negative dimension");
    }
    if dims.contains(&0) {
        return Ok(None); // empty tensors carry no weights
    }
    let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let Some(numel) = numel else {
        return unsupported("an element count that overflows");
    };
    let range = match (raw, float_data, dtype) {
        (Some(r), None, _) if !other_data => r,
        (None, Some(r), DType::F32) if !other_data => r,
        _ => return unsupported("data outside raw_data or packed float_data"),
    };
    if (range.len() as u64) != numel * dtype.size() as u64 {
        return Err(OnnxError::Malformed {
            offset: base + range.start,
            what: "tensor data length does not match its shape",
        });
    }
    Ok(Some(Initializer {
        name,
        dtype,
        dims,
        data: base + range.start..base + range.end,
    }))
}

impl OnnxWeights {
    /// Reads and indexes `bytes`.
    pub fn scan(bytes: &[u8]) -> Result<Self, OnnxError> {
        scan(bytes)
    }
    /// The initializer named `name`.
    pub fn get(&self, name: &str) -> Option<&Initializer> {
        self.initializers
            .binary_search_by(|i| i.name.as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| &self.initializers[i])
    }
    /// Bytes of float weight data in the file.
    pub fn data_bytes(&self) -> usize {
        self.initializers.iter().map(|i| i.data.len()).sum()
    }

    /// Total number of float parameters.
    pub fn params(&self) -> u64 {
        self.initializers.iter().map(Initializer::numel).sum()
    }
    /// Fingerprint of the float weights (see [`crate::fingerprint`]).
    pub fn fingerprint(&self, bytes: &[u8]) -> Fingerprint {
        let mut fp = Fingerprinter::new();
        for i in &self.initializers {
            fp.add(&i.name, i.dtype, &i.dims, &bytes[i.data.clone()]);
        }
        fp.finish()
    }
}

/// One input or output of the main graph, as the ONNX file declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphValue {
    /// Name.
    pub name: String,
    /// ONNX element type (`TensorProto.DataType`: 1 = float, 10 = float16, ...); 0 if not given.
    pub elem_type: u64,
    /// Dimensions: `Some(n)` for a fixed size, `None` for a symbolic or unknown one.
    pub dims: Vec<Option<u64>>,
}

/// The main graph's inputs that are not initializers (the values a caller feeds), and its
/// outputs, in the order the file declares them. Only the graph's declarations are read; no
/// weight is decoded.
pub fn graph_io(bytes: &[u8]) -> Result<(Vec<GraphValue>, Vec<GraphValue>), OnnxError> {
    let graph = main_graph(bytes)?;
    let g = &bytes[graph.clone()];
    let (mut inputs, mut outputs, mut initializers) = (Vec::new(), Vec::new(), Vec::new());
    for f in fields(g, graph.start) {
        let f = f?;
        if f.wire != WireType::LengthDelimited {
            continue;
        }
        let at = graph.start + f.range.start;
        let body = &g[f.range.clone()];
        match f.number {
            11 => inputs.push(value_info(body, at)?),
            12 => outputs.push(value_info(body, at)?),
            5 => {
                for t in fields(body, at) {
                    let t = t?;
                    if t.number == 8 && t.wire == WireType::LengthDelimited {
                        initializers.push(utf8(&body[t.range], at)?);
                    }
                }
            }
            _ => {}
        }
    }
    inputs.retain(|v| !initializers.contains(&v.name));
    Ok((inputs, outputs))
}

fn utf8(b: &[u8], at: usize) -> Result<String, OnnxError> {
    String::from_utf8(b.to_vec()).map_err(|_| OnnxError::Malformed {
        offset: at,
        what: "name is not UTF-8",
    })
}

/// A `ValueInfoProto`: name (1) and `type.tensor_type` (2 -> 1) with `elem_type` (1) and
/// `shape.dim` (2 -> 1: `dim_value` 1 or `dim_param` 2).
fn value_info(bytes: &[u8], base: usize) -> Result<GraphValue, OnnxError> {
    let mut v = GraphValue {
        name: String::new(),
        elem_type: 0,
        dims: Vec::new(),
    };
    // The length-delimited field `number` of `bytes`, if any (the last one wins, as in protobuf).
    let sub = |bytes: &[u8], base: usize, number: u32| -> Result<Option<Range<usize>>, OnnxError> {
        let mut out = None;
        for f in fields(bytes, base) {
            let f = f?;
            if f.number == number && f.wire == WireType::LengthDelimited {
                out = Some(f.range);
            }
        }
        Ok(out)
    };
    for f in fields(bytes, base) {
        let f = f?;
        if f.number == 1 && f.wire == WireType::LengthDelimited {
            v.name = utf8(&bytes[f.range], base)?;
        }
    }
    let Some(ty) = sub(bytes, base, 2)? else {
        return Ok(v);
    };
    let ty_b = &bytes[ty.clone()];
    let Some(tt) = sub(ty_b, base + ty.start, 1)? else {
        return Ok(v);
    };
    let tt_base = base + ty.start + tt.start;
    let tt_b = &ty_b[tt];
    for f in fields(tt_b, tt_base) {
        let f = f?;
        match (f.number, f.wire) {
            (1, WireType::Varint) => v.elem_type = f.varint,
            (2, WireType::LengthDelimited) => {
                let shape = &tt_b[f.range.clone()];
                let shape_base = tt_base + f.range.start;
                for d in fields(shape, shape_base) {
                    let d = d?;
                    if d.number != 1 || d.wire != WireType::LengthDelimited {
                        continue;
                    }
                    let mut dim = None;
                    for x in fields(&shape[d.range], shape_base) {
                        let x = x?;
                        if x.number == 1 && x.wire == WireType::Varint {
                            dim = Some(x.varint);
                        }
                    }
                    v.dims.push(dim.filter(|&n| n > 0));
                }
            }
            _ => {}
        }
    }
    Ok(v)
}
