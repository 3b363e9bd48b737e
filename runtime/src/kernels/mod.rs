//! Element-wise delta kernels: the contract, and the single dispatch point.
//!
//! May depend on: `core`, [`crate::pack`] (the sign-bit order), and `std` with the `apply`
//! feature (the cached backend choice, run-time CPU detection, `BITDELTA_FORCE_SCALAR`). Nothing
//! else in the crate: the format, codecs and decoders call the kernels, never the other way.
//!
//! # Contract
//! Every kernel works on `f32` slices, element by element. All arithmetic is plain `f32`, one
//! rounding per operation, in the order written below, and **never fused** (no FMA). Because of
//! that, every backend is bit-for-bit identical to the scalar reference ([`scalar()`]), and the
//! tests compare `to_bits()` exactly.
//!
//! Sign bits follow [`crate::pack`]: element `i` of a tensor uses bit `i % 8` of byte `i / 8`
//! (least significant bit first); bit `1` is `+scale`, bit `0` is `-scale`. Negating `scale` only
//! flips its sign bit, so `±scale` itself is exact.
//!
//! | operation       | computes, for every `i`                                  |
//! |-----------------|----------------------------------------------------------|
//! | [`apply_signs`] | `out[i] = base[i] + (±scale)` (bit `bit_offset + i`)     |
//! | [`add_signs`]   | `acc[i] = acc[i] + (±scale)` (bit `bit_offset + i`)      |
//! | [`apply_q8`]    | `out[i] = base[i] + alpha * (scale * f32::from(q[i]))`   |
//! | [`add_q8`]      | `acc[i] = acc[i] + alpha * (scale * f32::from(q[i]))`   |
//! | [`add_scaled`]  | `acc[i] = acc[i] + alpha * x[i]`                         |
//!
//! # Bodies and tails
//! The public functions (and the same-named methods on [`Kernels`]) are safe wrappers. They check
//! the lengths, run an unaligned sign-bit head through scalar code until the bit index is a
//! multiple of 8, hand a body of a multiple of [`LANES`] elements (whose sign bits start on a byte
//! boundary) to the backend, and run the remaining tail through scalar code again. SIMD kernels
//! therefore never see a tail; they `debug_assert!` the lane multiple. Slices need no particular
//! alignment (the kernels use unaligned loads and stores).
//!
//! # Dispatch
//! [`Kernels::get`] is the one place a backend is chosen. A backend is a table of function
//! pointers that starts as a copy of the scalar table with the slots its ISA implements
//! overwritten.
//! - **x86/x86_64**: AVX2 when the CPU has it. With the `std` feature this is detected at run time
//!   (once, cached in a `OnceLock`); without `std` it is decided at compile time by
//!   `target_feature = "avx2"` (e.g. `-C target-cpu=native`).
//! - **aarch64**: NEON is part of the baseline, so it is chosen at compile time.
//! - **armv7 and everything else**: scalar. 32-bit ARM NEON intrinsics are still unstable in Rust,
//!   so there is no armv7 NEON backend yet.
//!
//! Two knobs force the scalar backend: building with `--cfg bitdelta_backend="scalar"` (the SIMD
//! modules are then not compiled at all), and, with `std`, setting the environment variable
//! `BITDELTA_FORCE_SCALAR=1` (read once, at the first call to [`Kernels::get`]) for on-device A/B
//! comparisons. [`available`] still lists every backend the CPU supports, for tests and benches.

use core::fmt;

use crate::pack::packed_len;

mod scalar;

/// Declares the table of an ISA module, `static $table: Kernels`: the scalar table with the
/// listed slots overwritten. Each slot is a safe closure that `debug_assert!`s the body contract
/// of its slot type ([`ApplySignsFn`] and the others) and calls the ISA's `unsafe` entry point,
/// so the contract is written once for every backend.
///
/// Invoking it is a promise: the table must only be reachable on a CPU with every target feature
/// the entry points enable. The ISA module says why above the invocation.
#[cfg(all(
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    ),
    not(bitdelta_backend = "scalar")
))]
macro_rules! isa_table {
    (static $table:ident = $name:literal { $($slot:ident: $entry:ident),* $(,)? }) => {
        #[allow(
            clippy::needless_update,
            reason = "a slot added later defaults to scalar"
        )]
        static $table: $crate::kernels::Kernels = $crate::kernels::Kernels {
            name: $name,
            $($slot: isa_table!(@slot $slot $entry),)*
            ..$crate::kernels::scalar::SCALAR
        };
    };
    (@slot apply_signs $entry:ident) => {
        |out, base, bits, scale| {
            isa_table!(@lanes out);
            debug_assert_eq!(base.len(), out.len());
            debug_assert_eq!(bits.len(), out.len() / 8);
            isa_table!(@call $entry, (out, base, bits, scale))
        }
    };
    (@slot add_signs $entry:ident) => {
        |acc, bits, scale| {
            isa_table!(@lanes acc);
            debug_assert_eq!(bits.len(), acc.len() / 8);
            isa_table!(@call $entry, (acc, bits, scale))
        }
    };
    (@slot apply_q8 $entry:ident) => {
        |out, base, q, scale, alpha| {
            isa_table!(@lanes out);
            debug_assert_eq!(base.len(), out.len());
            debug_assert_eq!(q.len(), out.len());
            isa_table!(@call $entry, (out, base, q, scale, alpha))
        }
    };
    (@slot add_q8 $entry:ident) => {
        |acc, q, scale, alpha| {
            isa_table!(@lanes acc);
            debug_assert_eq!(q.len(), acc.len());
            isa_table!(@call $entry, (acc, q, scale, alpha))
        }
    };
    (@slot add_scaled $entry:ident) => {
        |acc, x, alpha| {
            isa_table!(@lanes acc);
            debug_assert_eq!(x.len(), acc.len());
            isa_table!(@call $entry, (acc, x, alpha))
        }
    };
    (@lanes $body:ident) => {
        debug_assert_eq!($body.len() % $crate::kernels::LANES, 0, "bodies are whole lanes")
    };
    (@call $entry:ident, ($($arg:ident),*)) => {
        // SAFETY: whoever invokes `isa_table!` hands the table out only on a CPU with the entry
        // point's target features (see the macro docs).
        unsafe { $entry($($arg),*) }
    };
}

#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    not(bitdelta_backend = "scalar")
))]
mod x86;

#[cfg(all(
    target_arch = "aarch64",
    target_feature = "neon",
    not(bitdelta_backend = "scalar")
))]
mod aarch64;

#[cfg(test)]
mod tests;

/// The lane multiple of every SIMD body, in elements.
///
/// The dispatcher hands backends only bodies whose length is a multiple of `LANES` (and, for the
/// sign kernels, whose first sign bit is bit 0 of a byte, so a body uses `LANES / 8` whole bytes
/// of bits per step). Shorter runs go through the scalar code.
pub const LANES: usize = 32;

// The body contract of every slot: the first slice's length is a multiple of [`LANES`], the other
// slices match it, and sign bits start at bit 0 of their first byte (one byte per 8 elements).
// [`isa_table!`] debug-asserts it in every SIMD slot; elements past the last whole chunk of
// `LANES` would be left untouched.

/// `out, base, bits, scale`; `base.len() == out.len()`, `bits.len() == out.len() / 8`.
type ApplySignsFn = fn(&mut [f32], &[f32], &[u8], f32);
/// `acc, bits, scale`; `bits.len() == acc.len() / 8`.
type AddSignsFn = fn(&mut [f32], &[u8], f32);
/// `out, base, q, scale, alpha`; `base` and `q` have `out.len()` elements.
type ApplyQ8Fn = fn(&mut [f32], &[f32], &[i8], f32, f32);
/// `acc, q, scale, alpha`; `q.len() == acc.len()`.
type AddQ8Fn = fn(&mut [f32], &[i8], f32, f32);
/// `acc, x, alpha`; `x.len() == acc.len()`.
type AddScaledFn = fn(&mut [f32], &[f32], f32);

/// A kernel backend: a table of body kernels for one instruction set.
///
/// Get the chosen one with [`Kernels::get`], the reference with [`scalar()`], or every one this
/// CPU can run with [`available`]. The methods have the same contract as the free functions of
/// this module; calling them on a specific table is how tests and benches compare backends.
///
/// A `Kernels` value can only be obtained for a backend the CPU supports.
pub struct Kernels {
    name: &'static str,
    apply_signs: ApplySignsFn,
    add_signs: AddSignsFn,
    apply_q8: ApplyQ8Fn,
    add_q8: AddQ8Fn,
    add_scaled: AddScaledFn,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernels")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The best backend for this CPU and build (see the module docs); [`None`] means scalar.
fn detect_simd() -> Option<&'static Kernels> {
    let found: Option<&'static Kernels> = None;
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        not(bitdelta_backend = "scalar")
    ))]
    let found = found.or_else(x86::table);
    #[cfg(all(
        target_arch = "aarch64",
        target_feature = "neon",
        not(bitdelta_backend = "scalar")
    ))]
    let found = found.or_else(aarch64::table);
    found
}

/// Whether `BITDELTA_FORCE_SCALAR=1` is set (std only; read by [`Kernels::get`] once).
fn scalar_forced() -> bool {
    #[cfg(feature = "apply")]
    {
        std::env::var_os("BITDELTA_FORCE_SCALAR").is_some_and(|v| v == "1")
    }
    #[cfg(not(feature = "apply"))]
    {
        false
    }
}

fn select() -> &'static Kernels {
    if scalar_forced() {
        return scalar();
    }
    detect_simd().unwrap_or_else(scalar)
}

/// The element count of the scalar head before the first byte-aligned bit, and the length of the
/// SIMD body after it, for `n` elements whose first sign bit is `bit_offset`.
#[inline]
fn split_signs(n: usize, bit_offset: usize) -> (usize, usize) {
    let head = ((8 - bit_offset % 8) % 8).min(n);
    (head, body_len(n - head))
}

/// The longest multiple of [`LANES`] that fits in `n`.
#[inline]
const fn body_len(n: usize) -> usize {
    n / LANES * LANES
}

#[inline]
#[track_caller]
fn check_bits(op: &str, bits: &[u8], bit_offset: usize, n: usize) {
    let needed = bit_offset.checked_add(n).map(packed_len);
    assert!(
        needed.is_some_and(|needed| needed <= bits.len()),
        "{op}: {n} elements from bit {bit_offset} need more than the {} bytes of sign bits given",
        bits.len()
    );
}

#[inline]
#[track_caller]
fn check_len(op: &str, what: &str, expected: usize, found: usize) {
    assert!(
        expected == found,
        "{op}: {what} has {found} elements, expected {expected}"
    );
}

impl Kernels {
    /// The backend chosen for this process: the fastest one the CPU supports, unless scalar is
    /// forced (see the module docs).
    ///
    /// With `std`, the choice is made once and cached; without `std` it is fixed at compile time.
    #[must_use]
    pub fn get() -> &'static Self {
        #[cfg(feature = "apply")]
        {
            static CHOSEN: std::sync::OnceLock<&'static Kernels> = std::sync::OnceLock::new();
            CHOSEN.get_or_init(select)
        }
        #[cfg(not(feature = "apply"))]
        {
            select()
        }
    }

    /// The backend's name: `"scalar"`, `"avx2"` or `"neon"`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `out[i] = base[i] + (±scale)`, the sign from bit `bit_offset + i` of `bits`.
    ///
    /// # Panics
    /// If `out.len() != base.len()`, or if `bits` holds fewer than
    /// [`packed_len`]`(bit_offset + out.len())` bytes.
    #[track_caller]
    pub fn apply_signs(
        &self,
        out: &mut [f32],
        base: &[f32],
        bits: &[u8],
        bit_offset: usize,
        scale: f32,
    ) {
        const OP: &str = "apply_signs";
        check_len(OP, "base", out.len(), base.len());
        check_bits(OP, bits, bit_offset, out.len());

        let (head, body) = split_signs(out.len(), bit_offset);
        let (out_head, out) = out.split_at_mut(head);
        let (base_head, base) = base.split_at(head);
        scalar::scalar_apply_signs_f32(out_head, base_head, bits, bit_offset, scale);

        let bit_offset = bit_offset + head;
        let (out_body, out_tail) = out.split_at_mut(body);
        let (base_body, base_tail) = base.split_at(body);
        if body > 0 {
            let byte = bit_offset / 8;
            (self.apply_signs)(out_body, base_body, &bits[byte..byte + body / 8], scale);
        }
        scalar::scalar_apply_signs_f32(out_tail, base_tail, bits, bit_offset + body, scale);
    }

    /// `acc[i] = acc[i] + (±scale)`, the sign from bit `bit_offset + i` of `bits`.
    ///
    /// # Panics
    /// If `bits` holds fewer than [`packed_len`]`(bit_offset + acc.len())` bytes.
    #[track_caller]
    pub fn add_signs(&self, acc: &mut [f32], bits: &[u8], bit_offset: usize, scale: f32) {
        check_bits("add_signs", bits, bit_offset, acc.len());

        let (head, body) = split_signs(acc.len(), bit_offset);
        let (acc_head, acc) = acc.split_at_mut(head);
        scalar::scalar_add_signs_f32(acc_head, bits, bit_offset, scale);

        let bit_offset = bit_offset + head;
        let (acc_body, acc_tail) = acc.split_at_mut(body);
        if body > 0 {
            let byte = bit_offset / 8;
            (self.add_signs)(acc_body, &bits[byte..byte + body / 8], scale);
        }
        scalar::scalar_add_signs_f32(acc_tail, bits, bit_offset + body, scale);
    }

    /// `out[i] = base[i] + alpha * (scale * f32::from(q[i]))`, each operation rounded to `f32`.
    ///
    /// # Panics
    /// If `base` or `q` differ in length from `out`.
    #[track_caller]
    pub fn apply_q8(&self, out: &mut [f32], base: &[f32], q: &[i8], scale: f32, alpha: f32) {
        const OP: &str = "apply_q8";
        check_len(OP, "base", out.len(), base.len());
        check_len(OP, "q", out.len(), q.len());

        let body = body_len(out.len());
        let (out_body, out_tail) = out.split_at_mut(body);
        let (base_body, base_tail) = base.split_at(body);
        let (q_body, q_tail) = q.split_at(body);
        if body > 0 {
            (self.apply_q8)(out_body, base_body, q_body, scale, alpha);
        }
        scalar::scalar_apply_q8_f32(out_tail, base_tail, q_tail, scale, alpha);
    }

    /// `acc[i] = acc[i] + alpha * (scale * f32::from(q[i]))`, each operation rounded to `f32`.
    ///
    /// # Panics
    /// If `q.len() != acc.len()`.
    #[track_caller]
    pub fn add_q8(&self, acc: &mut [f32], q: &[i8], scale: f32, alpha: f32) {
        check_len("add_q8", "q", acc.len(), q.len());

        let body = body_len(acc.len());
        let (acc_body, acc_tail) = acc.split_at_mut(body);
        let (q_body, q_tail) = q.split_at(body);
        if body > 0 {
            (self.add_q8)(acc_body, q_body, scale, alpha);
        }
        scalar::scalar_add_q8_f32(acc_tail, q_tail, scale, alpha);
    }

    /// `acc[i] = acc[i] + alpha * x[i]`, with two roundings (never fused).
    ///
    /// # Panics
    /// If `x.len() != acc.len()`.
    #[track_caller]
    pub fn add_scaled(&self, acc: &mut [f32], x: &[f32], alpha: f32) {
        check_len("add_scaled", "x", acc.len(), x.len());

        let body = body_len(acc.len());
        let (acc_body, acc_tail) = acc.split_at_mut(body);
        let (x_body, x_tail) = x.split_at(body);
        if body > 0 {
            (self.add_scaled)(acc_body, x_body, alpha);
        }
        scalar::scalar_add_scaled_f32(acc_tail, x_tail, alpha);
    }
}

/// The scalar reference backend, available everywhere.
#[must_use]
pub fn scalar() -> &'static Kernels {
    &scalar::SCALAR
}

/// Every backend this CPU and build can run, the scalar reference first.
///
/// Unlike [`Kernels::get`], this ignores `BITDELTA_FORCE_SCALAR`, so tests and benches can still
/// compare the SIMD backend against scalar. With `--cfg bitdelta_backend="scalar"` it yields only
/// the scalar backend.
pub fn available() -> impl Iterator<Item = &'static Kernels> {
    core::iter::once(scalar()).chain(detect_simd())
}

/// The name of the backend [`Kernels::get`] chose: `"scalar"`, `"avx2"` or `"neon"`.
#[must_use]
pub fn backend_name() -> &'static str {
    Kernels::get().name()
}

/// Writes the free functions: each runs the same-named [`Kernels`] method on the backend
/// [`Kernels::get`] chose, with the same contract.
macro_rules! on_chosen_backend {
    ($($(#[$doc:meta])* pub fn $op:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {$(
        $(#[$doc])*
        #[track_caller]
        pub fn $op($($arg: $ty),*) {
            Kernels::get().$op($($arg),*);
        }
    )*};
}

on_chosen_backend! {
    /// `out[i] = base[i] + (±scale)`, the sign from bit `bit_offset + i` of `bits`, on the chosen
    /// backend.
    ///
    /// ```
    /// let base = [1.0f32, 2.0, 3.0];
    /// let mut out = [0.0f32; 3];
    /// // Bits 1 and 2 of the first byte: element 0 is +, element 1 is -.
    /// bitdelta::kernels::apply_signs(&mut out[..2], &base[..2], &[0b0000_0010], 1, 0.5);
    /// assert_eq!(out, [1.5, 1.5, 0.0]);
    /// ```
    ///
    /// # Panics
    /// If `out.len() != base.len()`, or if `bits` holds fewer than
    /// [`packed_len`]`(bit_offset + out.len())` bytes.
    pub fn apply_signs(out: &mut [f32], base: &[f32], bits: &[u8], bit_offset: usize, scale: f32);

    /// `acc[i] = acc[i] + (±scale)`, the sign from bit `bit_offset + i` of `bits`, on the chosen
    /// backend.
    ///
    /// # Panics
    /// If `bits` holds fewer than [`packed_len`]`(bit_offset + acc.len())` bytes.
    pub fn add_signs(acc: &mut [f32], bits: &[u8], bit_offset: usize, scale: f32);

    /// `out[i] = base[i] + alpha * (scale * f32::from(q[i]))` on the chosen backend.
    ///
    /// # Panics
    /// If `base` or `q` differ in length from `out`.
    pub fn apply_q8(out: &mut [f32], base: &[f32], q: &[i8], scale: f32, alpha: f32);

    /// `acc[i] = acc[i] + alpha * (scale * f32::from(q[i]))` on the chosen backend.
    ///
    /// # Panics
    /// If `q.len() != acc.len()`.
    pub fn add_q8(acc: &mut [f32], q: &[i8], scale: f32, alpha: f32);

    /// `acc[i] = acc[i] + alpha * x[i]` (two roundings, never fused) on the chosen backend.
    ///
    /// # Panics
    /// If `x.len() != acc.len()`.
    pub fn add_scaled(acc: &mut [f32], x: &[f32], alpha: f32);
}
