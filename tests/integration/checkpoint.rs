//! checkpoint tests.
