//! Integration tests: the `bitdelta` binary and library on the bundled species family
//! (`models/species/`), checked against independent references (f64 arithmetic over tensors
//! decoded with tract-onnx's protobuf types, tract inference of the rebuilt models).

mod cli;
mod golden;
mod quality;
mod reference;
mod seed;
mod serve;
