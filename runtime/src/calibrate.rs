//! Calibration-driven codec choice.
