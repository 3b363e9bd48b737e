//! Signed delta envelopes (ed25519).
//!
//! May depend on: `std`, `ed25519-dalek` and [`crate::fingerprint`] (hex for key files and key
//! ids). Not on the delta format: an envelope is checked before its payload is parsed.
//!
//! A device that installs deltas from an SD card must know who produced a file before it spends
//! any effort on it: the delta parser is hardened, but a signature check in front of it means an
//! attacker's bytes never reach it at all. The envelope therefore wraps the delta bytes unchanged
//! and is checked on its own, without parsing anything beyond its fixed 112-byte header:
//!
//! ```text
//! [0, 8)      magic b"BDSIGN\0\x01" (the last byte is the envelope version, 1)
//! [8, 40)     ed25519 public key of the signer
//! [40, 104)   ed25519 signature
//! [104, 112)  u64 LE payload length: exactly the file length minus 112
//! [112, ..)   payload: the delta file, byte for byte
//! ```
//!
//! The signed message is `b"bitdelta-signed-delta-v1\0" || public key || u64 LE payload length
//! || payload`. The domain string keeps these signatures from being valid for any other use of
//! the same key; the key inside the message binds the signature to the signer named in the
//! header. Verification is [`VerifyingKey::verify_strict`] (no malleable or small-order
//! signatures, no small-order keys).
//!
//! [`verify`] builds the message in memory, so it holds one extra copy of the payload while it
//! runs (deltas are a few MiB).
//!
//! Key files are one line of text, so they survive being copied around by people:
//! `bitdelta-ed25519-secret <64 hex digits>` (the 32-byte secret seed) and
//! `bitdelta-ed25519-public <64 hex digits>` (the 32-byte public key). The normative description
//! is the "Signed envelope" section of `docs/FORMAT.md`.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::fingerprint::hex;

mod keys;
#[cfg(test)]
mod tests;

pub use keys::{
    parse_public_key, parse_secret_key, public_key_text, secret_key_text, FoundLabel, KeyError,
    KeyKind, PUBLIC_KEY_LABEL, SECRET_KEY_LABEL,
};

/// Envelope magic: `BDSIGN`, a zero byte, then the envelope version.
pub const SIGNED_MAGIC: [u8; 8] = *b"BDSIGN\0\x01";
/// The envelope version this build reads and writes (the last magic byte).
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the envelope header; the payload starts here.
pub const ENVELOPE_HEADER_LEN: usize = 112;
/// Domain string at the start of every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"bitdelta-signed-delta-v1\0";

/// Bytes of the magic that say "this file is meant to be signed", whatever follows.
const SIGNED_PREFIX: &[u8; 6] = b"BDSIGN";

/// Why a signed envelope, or a key, was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// The bytes do not start with `BDSIGN`: an unsigned file.
    NotSigned,
    /// Byte 6 of the magic is not zero.
    BadMagic {
        /// Byte found.
        found: u8,
    },
    /// An envelope version this build does not read.
    UnsupportedVersion {
        /// Version found.
        found: u8,
    },
    /// The file is shorter than the envelope header.
    Truncated {
        /// Bytes required.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The declared payload length is not the number of bytes after the header.
    LengthMismatch {
        /// Length in the header.
        declared: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// The signer's key is not one of the trusted keys.
    UntrustedKey {
        /// First 8 bytes of the signer's public key (see [`key_id`]).
        key_id: [u8; 8],
    },
    /// The signature does not verify for the signer's key and this payload.
    BadSignature,
    /// Key bytes or a key file are not valid.
    BadKey(KeyError),
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotSigned => write!(
                f,
                "not a signed delta: expected the magic \"BDSIGN\\0\\x01\" at byte 0, found an unsigned file"
            ),
            Self::BadMagic { found } => write!(
                f,
                "bad signed-envelope magic: expected byte 6 to be 0x00, found {found:#04x}"
            ),
            Self::UnsupportedVersion { found } => write!(
                f,
                "unsupported signed-envelope version: expected {ENVELOPE_VERSION}, found {found}"
            ),
            Self::Truncated { expected, found } => write!(
                f,
                "signed envelope truncated: expected at least {expected} bytes, found {found}"
            ),
            Self::LengthMismatch { declared, actual } => write!(
                f,
                "signed payload length mismatch: expected {declared} bytes (declared in the envelope), found {actual}"
            ),
            Self::UntrustedKey { key_id } => {
                f.write_str("untrusted signer: expected a key given as trusted, found key ")?;
                f.write_str(&hex(&key_id))
            }
            Self::BadSignature => write!(
                f,
                "bad signature: expected a valid ed25519 signature of the payload by the key in the envelope, found one that does not verify (file altered or corrupt)"
            ),
            Self::BadKey(e) => write!(f, "bad key: {e}"),
        }
    }
}

impl std::error::Error for SignError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::BadKey(e) => Some(e),
            _ => None,
        }
    }
}

impl From<KeyError> for SignError {
    fn from(e: KeyError) -> Self {
        Self::BadKey(e)
    }
}

/// An envelope whose structure is valid. The signature is checked only by [`verify`].
#[derive(Clone, Copy, Debug)]
pub struct Signed<'a> {
    /// The signer's public key, as stated in the envelope.
    pub key: VerifyingKey,
    /// The signature bytes.
    pub signature: [u8; 64],
    /// The wrapped delta file.
    pub payload: &'a [u8],
}

impl Signed<'_> {
    /// The signer's key id (see [`key_id`]).
    pub fn key_id(&self) -> String {
        key_id(&self.key)
    }
}

/// True when `bytes` start with `BDSIGN`: the file is meant to be a signed envelope (even when
/// it is truncated or of another envelope version), so it must not be read as a bare delta.
pub fn is_signed(bytes: &[u8]) -> bool {
    bytes.starts_with(SIGNED_PREFIX)
}

/// Checks the envelope structure (magic, version, lengths, signer key) without checking the
/// signature. Use it to show who signed a file; use [`verify`] before trusting the payload.
pub fn open(bytes: &[u8]) -> Result<Signed<'_>, SignError> {
    if !is_signed(bytes) {
        return Err(SignError::NotSigned);
    }
    if let Some(&b) = bytes.get(6) {
        if b != SIGNED_MAGIC[6] {
            return Err(SignError::BadMagic { found: b });
        }
    }
    if let Some(&v) = bytes.get(7) {
        if v != ENVELOPE_VERSION {
            return Err(SignError::UnsupportedVersion { found: v });
        }
    }
    let truncated = || SignError::Truncated {
        expected: ENVELOPE_HEADER_LEN as u64,
        found: bytes.len() as u64,
    };
    let (_magic, rest) = bytes.split_first_chunk::<8>().ok_or_else(truncated)?;
    let (key, rest) = rest.split_first_chunk::<32>().ok_or_else(truncated)?;
    let (signature, rest) = rest.split_first_chunk::<64>().ok_or_else(truncated)?;
    let (declared, payload) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
    let declared = u64::from_le_bytes(*declared);
    let actual = payload.len() as u64;
    if declared != actual {
        return Err(SignError::LengthMismatch { declared, actual });
    }
    let key = VerifyingKey::from_bytes(key).map_err(|_| KeyError::InvalidPoint)?;
    Ok(Signed {
        key,
        signature: *signature,
        payload,
    })
}

/// Opens the envelope, requires its key to be one of `trusted`, and checks the signature
/// strictly. Nothing inside the payload is read.
///
/// An unsigned file is [`SignError::NotSigned`]; an empty `trusted` refuses every file.
pub fn verify<'a>(bytes: &'a [u8], trusted: &[VerifyingKey]) -> Result<Signed<'a>, SignError> {
    let signed = open(bytes)?;
    if !trusted.contains(&signed.key) {
        return Err(SignError::UntrustedKey {
            key_id: id_bytes(&signed.key),
        });
    }
    let signature = Signature::from_bytes(&signed.signature);
    signed
        .key
        .verify_strict(&message(&signed.key, signed.payload), &signature)
        .map_err(|_| SignError::BadSignature)?;
    Ok(signed)
}

/// Wraps `payload` (a delta file) in an envelope signed by `key`.
pub fn sign(payload: &[u8], key: &SigningKey) -> Vec<u8> {
    let public = key.verifying_key();
    let signature = key.sign(&message(&public, payload));
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.extend_from_slice(&SIGNED_MAGIC);
    out.extend_from_slice(public.as_bytes());
    out.extend_from_slice(&signature.to_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The signed message: domain string, public key, u64 LE payload length, payload.
fn message(key: &VerifyingKey, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + 32 + 8 + payload.len());
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// The key id shown to users: the first 8 bytes of the public key as 16 lowercase hex digits.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&id_bytes(key))
}

fn id_bytes(key: &VerifyingKey) -> [u8; 8] {
    let mut id = [0u8; 8];
    for (d, s) in id.iter_mut().zip(key.as_bytes()) {
        *d = *s;
    }
    id
}
