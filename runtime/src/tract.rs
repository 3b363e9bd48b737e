//! tract adapter: run an ONNX classifier (a base, or a base with deltas applied).

use std::sync::Arc;
use std::vec::Vec;

use tract_onnx::prelude::*;

/// An optimized tract plan for a single-input, single-output classifier.
#[derive(Clone, Debug)]
pub struct Classifier {
    plan: Arc<TypedSimplePlan>,
    input_shape: Vec<usize>,
}

impl Classifier {
    /// Loads ONNX bytes, fixes the input to `input_shape` (batch included) and optimizes.
    pub fn from_onnx_bytes(bytes: &[u8], input_shape: &[usize]) -> TractResult<Self> {
        let mut reader = std::io::Cursor::new(bytes);
        let model = tract_onnx::onnx()
            .model_for_read(&mut reader)?
            .with_input_fact(0, f32::fact(input_shape).into())?
            .into_optimized()?;
        let plan = model.into_runnable()?;
        Ok(Self { plan, input_shape: input_shape.to_vec() })
    }

    /// The input shape the plan was built for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Runs one input (as many values as the input shape holds) and returns the flat output.
    pub fn run(&self, input: &[f32]) -> TractResult<Vec<f32>> {
        let t = Tensor::from_shape(&self.input_shape, input)?;
        let out = self.plan.run(tvec!(t.into()))?;
        let out = out.first().ok_or_else(|| tract_onnx::prelude::TractError::msg("model has no output"))?;
        Ok(out.to_plain_array_view::<f32>()?.iter().copied().collect())
    }
}

/// Index of the largest value (first one on ties), or `None` for an empty slice.
pub fn argmax(v: &[f32]) -> Option<usize> {
    v.iter().enumerate().fold(None, |best: Option<(usize, f32)>, (i, &x)| match best {
        Some((_, b)) if b >= x => best,
        _ => Some((i, x)),
    })
    .map(|(i, _)| i)
}

/// Softmax in f64 (numerically stable), as f32 probabilities.
pub fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| (x / s) as f32).collect()
}
