//! badinput tests.
