//! Key files: one line of text each, `bitdelta-ed25519-secret <64 hex digits>` (the 32-byte
//! secret seed) and `bitdelta-ed25519-public <64 hex digits>` (the 32-byte public key).
//! Errors describe the text, and never quote it: it could be secret material.

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};

use super::SignError;
use crate::fingerprint::{hex, parse_hex32};

/// First word of a public key file.
pub const PUBLIC_KEY_LABEL: &str = "bitdelta-ed25519-public";
/// First word of a secret key file.
pub const SECRET_KEY_LABEL: &str = "bitdelta-ed25519-secret";

/// Hex digits in a key file.
pub(super) const KEY_HEX_LEN: usize = 64;

/// The two kinds of key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// `KEY.pub`: a public key, given to devices.
    Public,
    /// `KEY`: a secret key, kept by whoever signs.
    Secret,
}

impl KeyKind {
    /// The first word of this kind of key file.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Public => PUBLIC_KEY_LABEL,
            Self::Secret => SECRET_KEY_LABEL,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Secret => "secret",
        })
    }
}

/// What a key file starts with, when it is not the expected label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FoundLabel {
    /// Nothing but whitespace.
    Empty,
    /// A public key file.
    Public,
    /// A secret key file.
    Secret,
    /// Any other text (not shown: it could be secret material).
    Other,
}

impl fmt::Display for FoundLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "an empty file",
            Self::Public => "a public key file",
            Self::Secret => "a secret key file",
            Self::Other => "other text",
        })
    }
}

/// Why key bytes or a key file were refused. Never carries key material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The text does not start with the label of the expected kind of key file.
    WrongLabel {
        /// Kind of key file expected.
        expected: KeyKind,
        /// What the text starts with.
        found: FoundLabel,
    },
    /// The key is not 64 hex digits long.
    HexLength {
        /// Kind of key file.
        kind: KeyKind,
        /// Characters found.
        found: usize,
    },
    /// A character of the key is not a hex digit.
    NotHex {
        /// Kind of key file.
        kind: KeyKind,
        /// Position of the character in the key (0-based).
        position: usize,
    },
    /// More text follows the key (another word or another line).
    TrailingText {
        /// Kind of key file.
        kind: KeyKind,
    },
    /// 32 bytes that do not encode an ed25519 public key.
    InvalidPoint,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::WrongLabel { expected, found } => write!(
                f,
                "expected a {expected} key file (one line \"{} <64 hex digits>\"), found {found}",
                expected.label()
            ),
            Self::HexLength { kind, found } => write!(
                f,
                "{kind} key: expected {KEY_HEX_LEN} hex digits after \"{}\", found {found} characters",
                kind.label()
            ),
            Self::NotHex { kind, position } => write!(
                f,
                "{kind} key: expected hex digits, found another character at position {position}"
            ),
            Self::TrailingText { kind } => write!(
                f,
                "{kind} key: expected one line \"{} <64 hex digits>\", found more text after the key",
                kind.label()
            ),
            Self::InvalidPoint => write!(
                f,
                "public key: expected 32 bytes encoding an ed25519 curve point, found bytes that do not decode"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// The text of a public key file (`KEY.pub`), newline included.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC_KEY_LABEL} {}\n", hex(key.as_bytes()))
}

/// The text of a secret key file (`KEY`), newline included. It holds the secret: write it to
/// a file only the owner can read, and drop it.
pub fn secret_key_text(key: &SigningKey) -> String {
    format!("{SECRET_KEY_LABEL} {}\n", hex(key.as_bytes()))
}

/// Parses a public key file: one line `bitdelta-ed25519-public <64 hex digits>`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, SignError> {
    let bytes = parse_key_text(text, KeyKind::Public)?;
    Ok(VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint)?)
}

/// Parses a secret key file: one line `bitdelta-ed25519-secret <64 hex digits>`. Errors never
/// contain any part of the text.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, SignError> {
    let mut bytes = parse_key_text(text, KeyKind::Secret)?;
    let key = SigningKey::from_bytes(&bytes);
    // Best effort: do not leave a copy of the seed behind (SigningKey wipes its own on drop).
    bytes.fill(0);
    core::hint::black_box(&bytes);
    Ok(key)
}

/// The 32 key bytes of a one-line key file of `kind`. Errors describe, never quote, the text.
fn parse_key_text(text: &str, kind: KeyKind) -> Result<[u8; 32], KeyError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text).trim();
    if text.contains(['\n', '\r']) {
        return Err(KeyError::TrailingText { kind });
    }
    let mut words = text.split_ascii_whitespace();
    let label = words.next().unwrap_or("");
    if label != kind.label() {
        let found = match label {
            "" => FoundLabel::Empty,
            PUBLIC_KEY_LABEL => FoundLabel::Public,
            SECRET_KEY_LABEL => FoundLabel::Secret,
            _ => FoundLabel::Other,
        };
        return Err(KeyError::WrongLabel {
            expected: kind,
            found,
        });
    }
    let digits = words.next().unwrap_or("");
    if words.next().is_some() {
        return Err(KeyError::TrailingText { kind });
    }
    let count = digits.chars().count();
    if count != KEY_HEX_LEN {
        return Err(KeyError::HexLength { kind, found: count });
    }
    if let Some(position) = digits.chars().position(|c| !c.is_ascii_hexdigit()) {
        return Err(KeyError::NotHex { kind, position });
    }
    Ok(parse_hex32(digits).expect("64 ASCII hex digits"))
}
