//! sign tests.
