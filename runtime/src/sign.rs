//! Signed delta envelopes (ed25519).
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

/// Envelope magic: `BDSIGN`, a zero byte, then the envelope version.
pub const SIGNED_MAGIC: [u8; 8] = *b"BDSIGN\0\x01";
/// The envelope version this build reads and writes (the last magic byte).
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the envelope header; the payload starts here.
pub const ENVELOPE_HEADER_LEN: usize = 112;
/// Domain string at the start of every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"bitdelta-signed-delta-v1\0";
/// First word of a public key file.
pub const PUBLIC_KEY_LABEL: &str = "bitdelta-ed25519-public";
/// First word of a secret key file.
pub const SECRET_KEY_LABEL: &str = "bitdelta-ed25519-secret";

/// Bytes of the magic that say "this file is meant to be signed", whatever follows.
const SIGNED_PREFIX: &[u8; 6] = b"BDSIGN";
/// Hex digits in a key file.
const KEY_HEX_LEN: usize = 64;

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
                write_hex(f, &key_id)
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
    let mut out = [0u8; 32];
    let mut nibbles = digits.chars().enumerate().map(|(position, c)| {
        c.to_digit(16)
            .map(|d| d as u8)
            .ok_or(KeyError::NotHex { kind, position })
    });
    for byte in &mut out {
        let (Some(hi), Some(lo)) = (nibbles.next(), nibbles.next()) else {
            return Err(KeyError::HexLength { kind, found: count });
        };
        *byte = (hi? << 4) | lo?;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Verifier;

    use super::*;

    const PAYLOAD: &[u8] = b"BITDELTA: any bytes, the envelope does not parse them";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn signed() -> (Vec<u8>, VerifyingKey) {
        let k = key(7);
        (sign(PAYLOAD, &k), k.verifying_key())
    }

    #[test]
    fn round_trip() {
        let (s, pk) = signed();
        assert_eq!(s.len(), ENVELOPE_HEADER_LEN + PAYLOAD.len());
        assert!(s.starts_with(&SIGNED_MAGIC));
        assert!(is_signed(&s));
        let v = verify(&s, &[key(1).verifying_key(), pk]).unwrap();
        assert_eq!(v.payload, PAYLOAD);
        assert_eq!(v.key, pk);
        let o = open(&s).unwrap();
        assert_eq!(
            (o.key, o.signature, o.payload),
            (v.key, v.signature, v.payload)
        );
        // Deterministic: ed25519 signatures depend only on key and message.
        assert_eq!(sign(PAYLOAD, &key(7)), s);
        // An empty payload is a valid envelope too.
        let e = sign(&[], &key(7));
        assert_eq!(verify(&e, &[pk]).unwrap().payload, &[] as &[u8]);
    }

    #[test]
    fn layout_matches_the_format() {
        let (s, pk) = signed();
        assert_eq!(s.get(..8), Some(&b"BDSIGN\0\x01"[..]));
        assert_eq!(s.get(8..40), Some(&pk.as_bytes()[..]));
        let len = (PAYLOAD.len() as u64).to_le_bytes();
        assert_eq!(s.get(104..112), Some(&len[..]));
        assert_eq!(s.get(112..), Some(PAYLOAD));
        // The signature is over domain || key || length || payload, with verify_strict.
        let mut m = b"bitdelta-signed-delta-v1\0".to_vec();
        m.extend_from_slice(pk.as_bytes());
        m.extend_from_slice(&len);
        m.extend_from_slice(PAYLOAD);
        let sig: [u8; 64] = s.get(40..104).unwrap().try_into().unwrap();
        pk.verify_strict(&m, &Signature::from_bytes(&sig)).unwrap();
    }

    #[test]
    fn every_truncation_is_refused() {
        let (s, pk) = signed();
        for n in 0..s.len() {
            let t = &s[..n];
            let want = if n < 6 {
                SignError::NotSigned
            } else if n < ENVELOPE_HEADER_LEN {
                SignError::Truncated {
                    expected: 112,
                    found: n as u64,
                }
            } else {
                SignError::LengthMismatch {
                    declared: PAYLOAD.len() as u64,
                    actual: (n - ENVELOPE_HEADER_LEN) as u64,
                }
            };
            assert_eq!(open(t).unwrap_err(), want, "length {n}");
            assert_eq!(verify(t, &[pk]).unwrap_err(), want, "length {n}");
            assert_eq!(is_signed(t), n >= 6, "length {n}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (s, pk) = signed();
        for i in 0..s.len() {
            for bit in 0..8 {
                let mut f = s.clone();
                f[i] ^= 1 << bit;
                let err = verify(&f, &[pk]).unwrap_err();
                match i {
                    0..6 => assert_eq!(err, SignError::NotSigned, "byte {i} bit {bit}"),
                    6 => assert_eq!(err, SignError::BadMagic { found: 1 << bit }),
                    7 => assert_eq!(
                        err,
                        SignError::UnsupportedVersion {
                            found: 1 ^ (1 << bit)
                        }
                    ),
                    8..40 => {
                        // The flipped key is either no key at all, or another key: untrusted,
                        // and still refused when it is trusted too (it signed nothing).
                        assert!(
                            matches!(
                                err,
                                SignError::BadKey(KeyError::InvalidPoint)
                                    | SignError::UntrustedKey { .. }
                            ),
                            "byte {i} bit {bit}: {err:?}"
                        );
                        if let Ok(o) = open(&f) {
                            assert_eq!(
                                verify(&f, &[pk, o.key]).unwrap_err(),
                                SignError::BadSignature,
                                "byte {i} bit {bit}"
                            );
                        }
                    }
                    40..104 => assert_eq!(err, SignError::BadSignature, "byte {i} bit {bit}"),
                    104..112 => {
                        assert!(
                            matches!(err, SignError::LengthMismatch { .. }),
                            "byte {i} bit {bit}: {err:?}"
                        );
                    }
                    _ => assert_eq!(err, SignError::BadSignature, "byte {i} bit {bit}"),
                }
            }
        }
    }

    #[test]
    fn wrong_key_is_untrusted() {
        let (s, pk) = signed();
        let other = key(9).verifying_key();
        let err = verify(&s, &[other]).unwrap_err();
        assert_eq!(
            err,
            SignError::UntrustedKey {
                key_id: id_bytes(&pk)
            }
        );
        assert!(err.to_string().contains(&key_id(&pk)), "{err}");
        assert_eq!(
            verify(&s, &[]).unwrap_err(),
            SignError::UntrustedKey {
                key_id: id_bytes(&pk)
            }
        );
        // Another key's envelope with this key's bytes in the header does not verify.
        let mut forged = sign(PAYLOAD, &key(9));
        forged[8..40].copy_from_slice(pk.as_bytes());
        assert_eq!(verify(&forged, &[pk]).unwrap_err(), SignError::BadSignature);
    }

    #[test]
    fn trailing_byte_is_refused() {
        let (mut s, pk) = signed();
        s.push(0);
        let want = SignError::LengthMismatch {
            declared: PAYLOAD.len() as u64,
            actual: PAYLOAD.len() as u64 + 1,
        };
        assert_eq!(verify(&s, &[pk]).unwrap_err(), want);
        assert_eq!(open(&s).unwrap_err(), want);
    }

    #[test]
    fn huge_declared_length_is_refused() {
        let (mut s, pk) = signed();
        s[104..112].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            verify(&s, &[pk]).unwrap_err(),
            SignError::LengthMismatch {
                declared: u64::MAX,
                actual: PAYLOAD.len() as u64
            }
        );
    }

    #[test]
    fn unsigned_input_is_not_signed() {
        let pk = key(7).verifying_key();
        for bytes in [PAYLOAD, b"", b"BDSIG", b"bdsign\0\x01"] {
            assert!(!is_signed(bytes));
            assert_eq!(open(bytes).unwrap_err(), SignError::NotSigned);
            assert_eq!(verify(bytes, &[pk]).unwrap_err(), SignError::NotSigned);
        }
    }

    #[test]
    fn signature_is_domain_separated() {
        // A signature of the bare payload by the trusted key is not an envelope signature.
        let k = key(7);
        let pk = k.verifying_key();
        let mut s = sign(PAYLOAD, &k);
        s[40..104].copy_from_slice(&k.sign(PAYLOAD).to_bytes());
        assert_eq!(verify(&s, &[pk]).unwrap_err(), SignError::BadSignature);
    }

    #[test]
    fn verification_is_strict() {
        // The identity key with R = identity and S = 0 passes lax verification for every
        // message; strict verification refuses small-order keys and points.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let mut s = sign(PAYLOAD, &key(7));
        s[8..40].copy_from_slice(&identity);
        let mut sig = [0u8; 64];
        sig[0] = 1;
        s[40..104].copy_from_slice(&sig);
        assert!(weak
            .verify(&message(&weak, PAYLOAD), &Signature::from_bytes(&sig))
            .is_ok());
        assert_eq!(verify(&s, &[weak]).unwrap_err(), SignError::BadSignature);

        // A non-canonical S (S + L) is refused.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let (mut s, pk) = signed();
        let mut carry = 0u16;
        for (b, l) in s[72..104].iter_mut().zip(L) {
            let v = u16::from(*b) + u16::from(l) + carry;
            *b = v as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0);
        assert_eq!(verify(&s, &[pk]).unwrap_err(), SignError::BadSignature);
    }

    #[test]
    fn envelope_key_that_is_not_a_point() {
        let bad = (0..=255u8)
            .map(|b| [b; 32])
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .expect("some byte pattern is not a curve point");
        let (mut s, pk) = signed();
        s[8..40].copy_from_slice(&bad);
        assert_eq!(
            open(&s).unwrap_err(),
            SignError::BadKey(KeyError::InvalidPoint)
        );
        assert_eq!(
            verify(&s, &[pk]).unwrap_err(),
            SignError::BadKey(KeyError::InvalidPoint)
        );
        let text = format!("{PUBLIC_KEY_LABEL} {}\n", hex(&bad));
        assert_eq!(
            parse_public_key(&text).unwrap_err(),
            SignError::BadKey(KeyError::InvalidPoint)
        );
    }

    #[test]
    fn key_files_round_trip() {
        let k = key(42);
        let pk = k.verifying_key();
        let public = public_key_text(&pk);
        let secret = secret_key_text(&k);
        assert_eq!(
            public,
            format!("bitdelta-ed25519-public {}\n", hex(pk.as_bytes()))
        );
        assert_eq!(
            secret,
            format!("bitdelta-ed25519-secret {}\n", "2a".repeat(32))
        );
        assert_eq!(parse_public_key(&public).unwrap(), pk);
        assert_eq!(parse_secret_key(&secret).unwrap().to_bytes(), k.to_bytes());
        // Tolerated: no final newline, CRLF, uppercase hex, a byte-order mark.
        assert_eq!(parse_public_key(public.trim_end()).unwrap(), pk);
        assert_eq!(parse_public_key(&public.replace('\n', "\r\n")).unwrap(), pk);
        let upper = format!("{SECRET_KEY_LABEL} {}", "2A".repeat(32));
        assert_eq!(parse_secret_key(&upper).unwrap().to_bytes(), k.to_bytes());
        assert_eq!(parse_public_key(&format!("\u{feff}{public}")).unwrap(), pk);
        assert_eq!(key_id(&pk), hex(&pk.as_bytes()[..8]));
        assert_eq!(key_id(&pk).len(), 16);
    }

    #[test]
    fn key_file_errors_say_what_was_expected_and_found() {
        use FoundLabel as F;
        use KeyKind::{Public, Secret};
        let k = key(42);
        let secret = secret_key_text(&k);
        let public = public_key_text(&k.verifying_key());
        let digits = "2a".repeat(32);
        let cases: [(&str, KeyKind, KeyError); 11] = [
            (
                "",
                Public,
                KeyError::WrongLabel {
                    expected: Public,
                    found: F::Empty,
                },
            ),
            (
                " \n",
                Secret,
                KeyError::WrongLabel {
                    expected: Secret,
                    found: F::Empty,
                },
            ),
            (
                &secret,
                Public,
                KeyError::WrongLabel {
                    expected: Public,
                    found: F::Secret,
                },
            ),
            (
                &public,
                Secret,
                KeyError::WrongLabel {
                    expected: Secret,
                    found: F::Public,
                },
            ),
            (
                &digits,
                Secret,
                KeyError::WrongLabel {
                    expected: Secret,
                    found: F::Other,
                },
            ),
            (
                SECRET_KEY_LABEL,
                Secret,
                KeyError::HexLength {
                    kind: Secret,
                    found: 0,
                },
            ),
            (
                &secret[..secret.len() - 3],
                Secret,
                KeyError::HexLength {
                    kind: Secret,
                    found: 62,
                },
            ),
            (
                &format!("{SECRET_KEY_LABEL} {}zz", &digits[..62]),
                Secret,
                KeyError::NotHex {
                    kind: Secret,
                    position: 62,
                },
            ),
            (
                &format!("{SECRET_KEY_LABEL} {}é", &digits[..63]),
                Secret,
                KeyError::NotHex {
                    kind: Secret,
                    position: 63,
                },
            ),
            (
                &format!("{secret}{secret}"),
                Secret,
                KeyError::TrailingText { kind: Secret },
            ),
            (
                &format!("{} extra", public.trim_end()),
                Public,
                KeyError::TrailingText { kind: Public },
            ),
        ];
        for (text, kind, want) in cases {
            let got = match kind {
                Public => parse_public_key(text).map(|_| ()),
                Secret => parse_secret_key(text).map(|_| ()),
            };
            assert_eq!(got, Err(SignError::BadKey(want)), "{text:?}");
            let msg = SignError::BadKey(want).to_string();
            assert!(msg.contains("expected") && msg.contains("found"), "{msg}");
            assert!(!msg.contains("2a2a"), "key material in {msg}");
        }
    }

    #[test]
    fn messages_say_what_was_expected_and_found() {
        let errors = [
            SignError::NotSigned,
            SignError::BadMagic { found: 7 },
            SignError::UnsupportedVersion { found: 2 },
            SignError::Truncated {
                expected: 112,
                found: 3,
            },
            SignError::LengthMismatch {
                declared: 5,
                actual: 6,
            },
            SignError::UntrustedKey { key_id: [0xab; 8] },
            SignError::BadSignature,
            SignError::BadKey(KeyError::InvalidPoint),
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.contains("expected") && msg.contains("found"), "{msg}");
        }
        assert!(SignError::UntrustedKey { key_id: [0xab; 8] }
            .to_string()
            .ends_with("found key abababababababab"));
    }
}
