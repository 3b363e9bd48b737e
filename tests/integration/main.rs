//! Integration tests: the `bitdelta` binary and library on the bundled species family
//! (`models/species/`), checked against independent references (f64 arithmetic over tensors
//! decoded with tract-onnx's protobuf types, tract inference of the rebuilt models).

mod badinput;
mod budget;
mod calib;
mod checkpoint;
mod cli;
mod eval;
mod golden;
mod mender;
mod quality;
mod real;
mod reference;
mod seed;
mod serve;
mod sign;
mod store;
mod switching;
mod unseen;
mod zoo;
