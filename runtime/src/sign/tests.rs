//! The envelope and key files against their specification in `docs/FORMAT.md`.

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
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
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
