//! `compress` and `apply` on safetensors checkpoints.
