//! safetensors checkpoints: streaming compression.
