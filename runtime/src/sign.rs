//! Signed delta envelopes (ed25519).
