//! The weight table of a model file: one [`WeightTensor`] per float tensor, whatever the
//! container (ONNX initializers in [`crate::onnx`], safetensors tensors in [`crate::checkpoint`]).
//!
//! May depend on: `std` and [`crate::format`] (the dtype). No parsing and no I/O: each container
//! module finds its tensors and describes them with this one struct.

use std::ops::Range;
use std::string::String;
use std::vec::Vec;

use crate::format::DType;

/// One float tensor of a model file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub dims: Vec<u64>,
    /// Byte range of the little-endian element data in the file.
    pub data: Range<usize>,
}

impl WeightTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}
