//! calib tests.
