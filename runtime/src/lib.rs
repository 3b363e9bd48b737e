//! bitdelta: ship fine-tuned model variants as small deltas against one base model.
//!
//! The core (format parsing, sign packing, kernels, composition) is `no_std` and allocation-free;
//! the `alloc`, `std` and `tract` features add writers, memory-mapped sources, ONNX helpers and
//! the tract adapter.
//!
//! # Crate features
//! - `std` (default): implies `apply`; memory-mapped checkpoints, ONNX helpers, compression,
//!   signatures and the variant store.
//! - `apply`: implies `alloc`; an apply-only library for devices: the standard library, run-time
//!   CPU detection and memory helpers over the format, streaming decoder, composition and kernels,
//!   without prost, ed25519, serde_json or safetensors.
//! - `alloc`: the delta writer and owned helpers.
//! - `tract`: load and run ONNX models with deltas applied, through tract-onnx.
//! - `images`: camera frames to model inputs by a model card (decode, orient, resize, normalise).
#![cfg_attr(not(any(test, feature = "apply")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "std")]
pub mod apply;
#[cfg(feature = "tract")]
pub mod calibrate;
#[cfg(feature = "std")]
pub mod card;
#[cfg(feature = "std")]
pub mod checkpoint;
pub mod codec;
pub mod compose;
#[cfg(feature = "std")]
pub mod compress;
pub mod error;
pub mod fingerprint;
pub mod format;
#[cfg(feature = "images")]
pub mod frame;
pub mod kernels;
#[cfg(feature = "alloc")]
pub mod knapsack;
#[cfg(feature = "apply")]
pub mod mem;
#[cfg(feature = "std")]
pub mod metrics;
#[cfg(feature = "std")]
pub mod onnx;
pub mod pack;
#[cfg(feature = "std")]
pub mod sign;
#[cfg(feature = "std")]
pub mod store;
pub mod stream;
#[cfg(feature = "tract")]
pub mod tract;
#[cfg(feature = "std")]
pub mod weights;

pub use error::{Error, FormatError};
pub use format::DeltaFile;

#[cfg(target_endian = "big")]
compile_error!("bitdelta supports little-endian targets only");
